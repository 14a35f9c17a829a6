"""Tests for gdnsq_jax.lsq (the fixed-bit LSQ baseline) and method='lsq'."""

from __future__ import annotations

import math

from absl.testing import absltest
from absl.testing import parameterized
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gdnsq_jax import bitwidths
from gdnsq_jax import calibration
from gdnsq_jax import export
from gdnsq_jax import interception
from gdnsq_jax import layers
from gdnsq_jax import lsq


class TinyNet(nn.Module):
  """Stem conv (kept FP by the default rules), one 3x3 conv, a classifier."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.relu(nn.Conv(4, (3, 3), name="stem")(x))
    x = nn.relu(nn.Conv(5, (3, 3), name="body")(x))
    return nn.Dense(3, name="head")(jnp.mean(x, axis=(1, 2)))


def _reference_codes(v, bits):
  return np.clip(np.round(v), 0, 2**bits - 1)


class BnNet(nn.Module):
  """A conv, BatchNorm and ReLU before one quantized 3x3 conv."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(4, (3, 3), name="stem")(x)
    x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
    x = nn.relu(nn.Conv(5, (3, 3), name="body")(nn.relu(x)))
    return nn.Dense(3, name="head")(jnp.mean(x, axis=(1, 2)))


class LsqQuantizerTest(parameterized.TestCase):

  def test_gradient_scale_is_one_over_sqrt_n_qp(self):
    self.assertAlmostEqual(lsq.lsq_gradient_scale(36, 2), 1 / math.sqrt(108))
    self.assertAlmostEqual(lsq.lsq_gradient_scale(1, 1), 1.0)

  @parameterized.parameters(0, 1.5, 32)
  def test_bits_must_be_an_integer_below_32(self, bits):
    with self.assertRaisesRegex(ValueError, "integer bit-width"):
      lsq.lsq_gradient_scale(4, bits)

  def test_scale_gradient_is_identity_forward_scaled_backward(self):
    x = jnp.array([1.0, -2.0, 3.0])
    chex.assert_trees_all_equal(lsq.scale_gradient(x, 0.25), x)
    g = jax.grad(lambda x: jnp.sum(lsq.scale_gradient(x, 0.25) * x))(x)
    chex.assert_trees_all_close(g, 0.25 * x + x)

  @parameterized.parameters(1, 2, 3)
  def test_weight_forward_has_two_to_the_bits_levels(self, bits):
    w = jax.random.normal(jax.random.key(0), (3, 3, 2, 4))
    log2_step = jnp.log2(jnp.array([0.05, 0.2, 0.5, 2.0]))
    out = np.asarray(lsq.lsq_quantize_weight(w, log2_step, bits=bits))
    wn = np.asarray(w)
    zero = wn.min(axis=(0, 1, 2))
    step = np.exp2(np.asarray(log2_step))
    expected = step * _reference_codes((wn - zero) / step, bits) + zero
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    for c in range(4):  # at most 2^bits distinct values per channel
      self.assertLessEqual(len(np.unique(out[..., c])), 2**bits)

  def test_weight_gradients_are_lsq(self):
    bits, shape = 2, (3, 3, 2, 4)
    w = jax.random.normal(jax.random.key(1), shape)
    log2_step = jnp.log2(jnp.array([0.1, 0.4, 0.8, 3.0]))
    cot = jax.random.normal(jax.random.key(2), shape)
    f = lambda w, l: jnp.sum(lsq.lsq_quantize_weight(w, l, bits=bits) * cot)
    gw, gl = jax.grad(f, argnums=(0, 1))(w, log2_step)
    wn, gn = np.asarray(w), np.asarray(cot)
    step = np.exp2(np.asarray(log2_step))
    v = (wn - wn.min(axis=(0, 1, 2))) / step
    inside = v <= 2**bits - 1
    # Input: straight-through inside the grid, zero above it.
    np.testing.assert_allclose(np.asarray(gw), gn * inside, atol=1e-6)
    # Step: g * (round(v) - v) inside, g * Qp above; then d s / d log2 s.
    ds = np.where(inside, np.round(v) - v, 2**bits - 1)
    g = 1 / math.sqrt(18 * (2**bits - 1))
    expected = g * (gn * ds).sum(axis=(0, 1, 2)) * np.log(2) * step
    np.testing.assert_allclose(np.asarray(gl), expected, rtol=1e-4,
                               atol=1e-6)
    self.assertTrue(np.any(~inside) and np.any(inside))

  def test_activation_gradients_are_lsq(self):
    bits = 2
    x = jax.random.uniform(jax.random.key(3), (4, 5, 5, 3), minval=-1.0,
                           maxval=2.0)
    x = x.at[0, 0, 0, 0].set(0.25)  # exactly on the lower clamp: passes
    log2_step, low = jnp.log2(0.3), jnp.float32(0.25)
    cot = jax.random.normal(jax.random.key(4), x.shape)

    def f(x, l, b):
      return jnp.sum(lsq.lsq_quantize_activation(x, l, b, bits=bits) * cot)

    out = lsq.lsq_quantize_activation(x, log2_step, low, bits=bits)
    gx, gl, gb = jax.grad(f, argnums=(0, 1, 2))(x, log2_step, low)
    xn, gn, s = np.asarray(x), np.asarray(cot), 0.3
    v = (xn - 0.25) / s
    np.testing.assert_allclose(np.asarray(out),
                               s * _reference_codes(v, bits) + 0.25,
                               rtol=1e-6, atol=1e-6)
    inside = (v >= 0) & (v <= 3)
    np.testing.assert_allclose(np.asarray(gx), gn * inside, atol=1e-6)
    self.assertEqual(float(gx[0, 0, 0, 0]), float(cot[0, 0, 0, 0]))
    ds = np.where(inside, np.round(v) - v, np.where(v > 3, 3.0, 0.0))
    g = 1 / math.sqrt(75 * 3)  # 5 * 5 * 3 features per example, Qp = 3
    np.testing.assert_allclose(float(gl),
                               g * (gn * ds).sum() * np.log(2) * s,
                               rtol=1e-4)
    np.testing.assert_allclose(float(gb), (gn * ~inside).sum(), rtol=1e-4)

  def test_shape_errors_name_the_expected_shape(self):
    with self.assertRaisesRegex(ValueError, r"needs shape \(4,\)"):
      lsq.lsq_quantize_weight(jnp.ones((3, 4)), jnp.zeros(()), bits=2)
    with self.assertRaisesRegex(ValueError, "log2_step must be a scalar"):
      lsq.lsq_quantize_activation(jnp.ones((2, 3)), jnp.zeros(2), 0.0,
                                  bits=2)


class LsqMethodTest(absltest.TestCase):

  def _calibrated(self, settings):
    x = jax.random.normal(jax.random.key(5), (8, 6, 6, 2))
    qmodel = interception.quantize_model(TinyNet(), x, settings=settings)
    variables = qmodel.init(jax.random.key(6), x)
    return qmodel, calibration.calibrate(qmodel, variables, [x]), x

  def test_settings_reject_fractional_bits(self):
    with self.assertRaisesRegex(ValueError, "fixed integer widths"):
      layers.QuantSettings(weight_bits=2.5, method="lsq")
    with self.assertRaisesRegex(ValueError, "choose one of gdnsq, lsq"):
      layers.QuantSettings(method="dorefa")

  def test_calibrates_each_quantizer_to_its_own_width(self):
    settings = layers.QuantSettings(weight_bits=2, activation_bits=3,
                                    method="lsq", calibration_bits=2)
    qmodel, result, x = self._calibrated(settings)
    params = result.variables["params"]
    act = params["body"]["input_quantizer"]
    lo, hi = result.activation_ranges["body/input_quantizer"]
    # LSQ's init 2 mean(x - b) / sqrt(Qp), capped at the min / max step.
    body_input = np.asarray(jax.nn.relu(nn.Conv(4, (3, 3)).apply(
        {"params": params["stem"]}, x)))
    self.assertAlmostEqual(lo, float(body_input.min()), places=5)
    expected = min(2 * (body_input.mean() - lo) / np.sqrt(7), (hi - lo) / 7)
    self.assertLess(expected, (hi - lo) / 7)  # the LSQ init is the smaller
    np.testing.assert_allclose(np.exp2(float(act["log2_step"])), expected,
                               rtol=1e-4)
    kernel = np.asarray(params["body"]["kernel"])
    span = kernel.max(axis=(0, 1, 2)) - kernel.min(axis=(0, 1, 2))
    np.testing.assert_allclose(np.exp2(np.asarray(params["body"]["log2_step"])),
                               span / 3, rtol=1e-5)
    # The grid width param is frozen: LSQ ties it to the step.
    self.assertFalse(result.trainable["body"]["input_quantizer"]["log2_range"])
    self.assertTrue(result.trainable["body"]["input_quantizer"]["log2_step"])
    # Measured codes never exceed the fixed width.
    widths = calibration.measure_activation_widths(qmodel, result.variables,
                                                   [x])
    self.assertLessEqual(widths["body/input_quantizer"], 3.0)
    self.assertGreater(widths["body/input_quantizer"], 2.0)
    with self.assertRaisesRegex(ValueError, "calibrate them without bits="):
      calibration.calibrate(qmodel, result.variables, [x], bits=10)

  def test_true_weight_widths_are_capped_and_export_refuses(self):
    settings = layers.QuantSettings(weight_bits=2, activation_bits=2,
                                    method="lsq")
    qmodel, result, x = self._calibrated(settings)
    params = jax.tree.map(lambda p: p, result.variables["params"])
    params["body"]["log2_step"] = params["body"]["log2_step"] - 3.0  # clips
    out = qmodel.apply(dict(result.variables, params=params), x)
    self.assertTrue(np.all(np.isfinite(np.asarray(out))))
    uncapped = bitwidths.summarize_bitwidths(params)
    capped = bitwidths.summarize_bitwidths(params, fixed_weight_bits=2)
    self.assertGreater(uncapped.weight_max, 4.0)
    self.assertEqual(capped.weight_max, 2.0)
    with self.assertRaisesRegex(export.ExportError, "method='lsq'"):
      export.export_model(qmodel, result.variables, x.shape[1:])

  def test_calibration_can_observe_with_batch_statistics(self):
    settings = layers.QuantSettings(weight_bits=2, activation_bits=2)
    x = 5.0 + 3.0 * jax.random.normal(jax.random.key(7), (16, 6, 6, 1))
    qmodel = interception.quantize_model(BnNet(), x, settings=settings,
                                         train=False)
    variables = qmodel.init(jax.random.key(8), x, train=False)
    calibrate = lambda kwargs: calibration.calibrate(
        qmodel, variables, [x], apply_kwargs=kwargs).activation_ranges
    running = calibrate({"train": False})["body/input_quantizer"]
    batch = calibrate({"train": True, "mutable": ["batch_stats"]})[
        "body/input_quantizer"]
    # Fresh running statistics (mean 0, var 1) leave the stem's scale; batch
    # statistics normalise it, so the ReLU output's range differs.
    self.assertNotAlmostEqual(running[1], batch[1], places=2)
    stem = nn.Conv(4, (3, 3)).apply(
        {"params": variables["params"]["stem"]}, x)
    normalised = (stem - stem.mean((0, 1, 2))) / jnp.sqrt(
        stem.var((0, 1, 2)) + 1e-5)
    np.testing.assert_allclose(batch[1], float(jnp.max(jax.nn.relu(
        normalised))), rtol=1e-3)

  def test_calibrating_a_module_without_settings_field(self):
    settings = layers.QuantSettings(weight_bits=2, activation_bits=2,
                                    method="lsq")

    class Wrapped(nn.Module):  # its quantizer's settings are not reachable

      @nn.compact
      def __call__(self, x):
        return layers.QuantAct(settings)(x)

    x = jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)
    variables = Wrapped().init(jax.random.key(0), x)
    # Observation runs every quantizer off whatever the model (no family
    # switch through a settings field), so the given settings suffice.
    wrapped = calibration.calibrate(Wrapped(), variables, [x],
                                    settings=settings)
    act = layers.QuantAct(settings)
    result = calibration.calibrate(act, act.init(jax.random.key(0), x), [x])
    for params in (result.variables["params"],
                   wrapped.variables["params"]["QuantAct_0"]):
      np.testing.assert_allclose(float(params["log2_step"]),
                                 np.log2(2.0 / 3.0), rtol=1e-5)

if __name__ == "__main__":
  absltest.main()
