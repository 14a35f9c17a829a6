"""Tests for gdnsq_jax.calibration (docs/method.md §6, D11)."""

from __future__ import annotations

import math

from absl.testing import absltest
import chex
import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import optax

from gdnsq_jax import bitwidths
from gdnsq_jax import calibration
from gdnsq_jax import interception
from gdnsq_jax import layers
from train import models

_DN = ("NHWC", "HWIO", "NHWC")


class TinyCNN(nn.Module):
  """Two 3x3 convs and a classifier, plain Flax."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.relu(nn.Conv(4, (3, 3), name="conv_a")(x))
    x = nn.Conv(5, (3, 3), name="conv_b")(x)
    return nn.Dense(3, name="head")(jnp.mean(x, axis=(1, 2)))


def _x(shape, seed=0, scale=1.0, shift=0.0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(scale * rng.normal(size=shape) + shift, jnp.float32)


def _variables(init_fn, *args, seed=0, weight_std=0.3):
  """``init_fn``'s tree filled from numpy (quantizers get odd values).

  Calibration must overwrite every quantizer param, so they start at 3.
  """
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = str(getattr(path[-1], "key", path[-1]))
    if name in ("log2_step", "log2_range", "clamp_low"):
      return jnp.full(s.shape, 3.0, s.dtype)
    if name == "var":
      return jnp.ones(s.shape, s.dtype)
    if name == "mean":
      return jnp.zeros(s.shape, s.dtype)
    return jnp.asarray(weight_std * rng.normal(size=s.shape), s.dtype)

  shapes = jax.eval_shape(init_fn, jax.random.key(0), *args)
  return jax.tree_util.tree_map_with_path(fill, shapes)


def _tiny(settings=None):
  x = _x((2, 6, 6, 2))
  q = interception.quantize_model(
      TinyCNN(), x, settings=settings, rules={"quantize_stem": True}
  )
  return q, _variables(q.init, x)


class WeightCalibrationTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_weights_get_exactly_n_bits_unless_the_floor_binds(self):
    kernel = np.zeros((3, 3, 2, 3), np.float32)
    kernel[..., 0] = np.linspace(-0.7, 0.5, 18).reshape(3, 3, 2)  # R = 1.2
    kernel[..., 1] = np.linspace(0.0, 1e-3, 18).reshape(3, 3, 2)  # tiny R
    kernel[..., 2] = 0.25  # constant channel, R = 0
    params = {"conv": {"kernel": jnp.asarray(kernel),
                       "log2_step": jnp.zeros(3)}}
    out = self.variant(calibration.calibrate_weights, static_argnums=1)(
        params, 10)
    log2_step = out["conv"]["log2_step"]
    chex.assert_trees_all_close(
        log2_step, jnp.array([math.log2(1.2 / 1023), -12.0, -12.0]),
        atol=1e-5,
    )
    widths = bitwidths.weight_bitwidth(out["conv"]["kernel"], log2_step)
    # l = max(-12, log2(R / (2^N - 1))): N bits, or log2(R * 2^12 + 1) < N
    # where the floor binds, 0 for a constant channel; never NaN.
    chex.assert_trees_all_close(
        widths, jnp.array([10.0, math.log2(1e-3 * 4096 + 1), 0.0]),
        atol=1e-4,
    )

  def test_per_tensor_weight_quantizer(self):
    kernel = jnp.asarray(np.linspace(-1.0, 3.0, 24).reshape(4, 6))
    out = calibration.calibrate_weights(
        {"kernel": kernel, "log2_step": jnp.zeros(())}, 8)
    chex.assert_trees_all_close(out["log2_step"], math.log2(4.0 / 255))


class ActivationCalibrationTest(absltest.TestCase):

  def test_clamps_equal_observed_ranges_and_widths_are_n(self):
    q, v = _tiny()
    batches = [
        _x((2, 6, 6, 2), seed=1),
        _x((3, 6, 6, 2), seed=2, scale=3.0),
        _x((2, 6, 6, 2), seed=3, shift=1.0),
    ]
    result = calibration.calibrate(q, v, batches)
    params = result.variables["params"]

    # conv_a's input is the network input: [min of mins, max of maxes].
    expected = {"conv_a/input_quantizer": (
        min(float(b.min()) for b in batches),
        max(float(b.max()) for b in batches))}
    # conv_b's input is that of the FP network (docs/method.md §6: observed
    # with every quantizer off, so nothing upstream clamps the negative
    # inputs of conv_a to an initial grid).
    conv_a = params["conv_a"]
    inputs_b = [
        jax.nn.relu(lax.conv_general_dilated(
            b, conv_a["kernel"], (1, 1), "SAME", dimension_numbers=_DN)
            + conv_a["bias"])
        for b in batches
    ]
    expected["conv_b/input_quantizer"] = (
        min(float(b.min()) for b in inputs_b),
        max(float(b.max()) for b in inputs_b))
    self.assertEqual(result.activation_ranges.keys(), expected.keys())
    for path, (low, high) in expected.items():
      np.testing.assert_allclose(result.activation_ranges[path], (low, high),
                                 rtol=1e-5, atol=1e-6)
      node = params[path.split("/")[0]]["input_quantizer"]
      step = 2.0 ** float(node["log2_step"])
      top = float(node["clamp_low"]) + 2.0 ** float(node["log2_range"]) - step
      np.testing.assert_allclose(float(node["clamp_low"]), low, rtol=1e-6)
      np.testing.assert_allclose(top, high, rtol=1e-5)
      np.testing.assert_allclose(step, (high - low) / 1023, rtol=1e-5)

    w, a = bitwidths.differentiable_bitwidths(params)
    chex.assert_trees_all_close(w, jnp.full_like(w, 10.0), atol=1e-4)
    chex.assert_trees_all_close(a, jnp.full_like(a, 10.0), atol=1e-6)
    self.assertTrue(all(jax.tree.leaves(result.trainable)))

  def test_constant_input_freezes_the_quantizer(self):
    q, v = _tiny()
    x = jnp.full((2, 6, 6, 2), 0.7)
    result = calibration.calibrate(q, v, [x, x])
    params = result.variables["params"]
    frozen = params["conv_a"]["input_quantizer"]
    chex.assert_trees_all_close(
        frozen, {"log2_step": 0.0, "log2_range": 0.0, "clamp_low": 0.7})
    self.assertEqual(
        result.trainable["conv_a"]["input_quantizer"],
        {"log2_step": False, "log2_range": False, "clamp_low": False},
    )
    self.assertTrue(result.trainable["conv_a"]["log2_step"])
    self.assertTrue(all(jax.tree.leaves(result.trainable["conv_b"])))
    _, a = bitwidths.differentiable_bitwidths(params)
    self.assertEqual(sorted(np.asarray(a).tolist())[0], 0.0)  # never penalised

    def loss(p, key):
      out = q.apply(dict(result.variables, params=p), x,
                    rngs={layers.NOISE_RNG: key})
      return jnp.sum(out**2), out

    grads, out = jax.jit(jax.grad(loss, has_aux=True))(params,
                                                      jax.random.key(0))
    self.assertTrue(bool(jnp.isfinite(out).all()))
    self.assertTrue(all(bool(jnp.isfinite(g).all())
                        for g in jax.tree.leaves(grads)))
    # The mask freezes the quantizer under an optimizer update.
    tx = optax.multi_transform(
        {True: optax.sgd(0.1), False: optax.set_to_zero()}, result.trainable)
    updates, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    chex.assert_trees_all_equal(new["conv_a"]["input_quantizer"], frozen)
    self.assertFalse(np.allclose(new["conv_b"]["log2_step"],
                                 params["conv_b"]["log2_step"]))

  def test_clamp_low_frozen_at_zero(self):
    q, v = _tiny(layers.QuantSettings(learnable_clamp_low=False))
    x = _x((2, 6, 6, 2), seed=4)
    result = calibration.calibrate(q, v, [x])
    node = result.variables["params"]["conv_a"]["input_quantizer"]
    step = 2.0 ** float(node["log2_step"])
    self.assertEqual(float(node["clamp_low"]), 0.0)
    np.testing.assert_allclose(step, float(x.max()) / 1023, rtol=1e-5)
    self.assertEqual(
        result.trainable["conv_a"]["input_quantizer"],
        {"log2_step": True, "log2_range": True, "clamp_low": False},
    )

  def test_calibration_traces_the_model_a_fixed_number_of_times(self):
    q, v = _tiny()
    traces = []

    class CountingModel:
      settings = q.settings

      def apply(self, *args, **kwargs):
        traces.append(1)
        return q.apply(*args, **kwargs)

    batches = [_x((2, 6, 6, 2), seed=s) for s in range(4)]
    calibration.calibrate(CountingModel(), v, batches)
    self.assertLessEqual(len(traces), 2)  # shapes once + one jit trace

  def test_errors_name_the_problem(self):
    q, v = _tiny()
    with self.assertRaisesRegex(ValueError, "no batches given"):
      calibration.calibrate(q, v, [])

    class Branchy(nn.Module):
      @nn.compact
      def __call__(self, x, extra=False):
        x = nn.Dense(4, name="a")(x)
        if extra:
          x = nn.Dense(4, name="b")(x)
        return nn.Dense(2, name="c")(x)

    x = _x((2, 3))
    qb = interception.quantize_model(Branchy(), x, extra=True)
    vb = _variables(lambda k, x: qb.init(k, x, extra=True), x)
    with self.assertRaisesRegex(
        ValueError, r"\['b/input_quantizer'\] were not called"):
      calibration.calibrate(qb, vb, [x])


class SixteenBitTest(absltest.TestCase):

  def test_sixteen_bit_resnet_matches_full_precision(self):
    model = models.ResNet20(stage_widths=(4, 8, 8), blocks_per_stage=(1, 1, 1))
    x = _x((4, 8, 8, 3), seed=5)
    q = interception.quantize_model(model, x)
    fp = _variables(model.init, x)
    v = interception.add_quantizer_params(
        fp, jax.eval_shape(q.init, jax.random.key(0), x))
    result = calibration.calibrate(q, v, [x], bits=16)
    got = jax.jit(q.apply)(result.variables, x)
    want = jax.jit(model.apply)(fp, x)
    rel = float(jnp.abs(got - want).max() / jnp.abs(want).max())
    self.assertLess(rel, 1e-3)
    four_bit = calibration.calibrate(q, v, [x], bits=4).variables
    coarse = jax.jit(q.apply)(four_bit, x)  # same path, visible rounding
    self.assertGreater(float(jnp.abs(coarse - want).max()),
                       100 * rel * float(jnp.abs(want).max()))


class ActivationWidthTest(absltest.TestCase):

  def test_true_widths_are_the_max_over_batches(self):
    q, v = _tiny()
    wide = _x((2, 6, 6, 2), seed=6, scale=2.0)
    narrow = _x((2, 6, 6, 2), seed=7, scale=0.1)
    calibrated = calibration.calibrate(q, v, [wide], bits=4).variables
    node = calibrated["params"]["conv_a"]["input_quantizer"]

    def expected(batch):
      lo, hi = bitwidths.activation_code_range(
          batch, node["log2_step"], node["log2_range"], node["clamp_low"])
      return float(bitwidths.true_bitwidth_from_codes(lo, hi))

    both = calibration.measure_activation_widths(
        q, calibrated, [narrow, wide])
    only_narrow = calibration.measure_activation_widths(
        q, calibrated, [narrow])
    index = bitwidths.find_quantizers(calibrated)
    self.assertEqual(set(both), set(index.activations))
    self.assertAlmostEqual(both["conv_a/input_quantizer"],
                           max(expected(narrow), expected(wide)), places=6)
    self.assertAlmostEqual(only_narrow["conv_a/input_quantizer"],
                           expected(narrow), places=6)
    self.assertLess(expected(narrow), expected(wide))
    self.assertEqual(expected(wide), 4.0)
    self.assertTrue(all(0.0 < w <= 4.0 for w in both.values()))
    summary = bitwidths.summarize_bitwidths(
        calibrated, activation_widths=both)
    self.assertEqual(summary.activation_layers, both)


class FullPrecisionObservationTest(absltest.TestCase):
  """Observation runs on the FP network (docs/method.md §6)."""

  class _Bottleneck(nn.Module):
    """LayerNorm -> dense (signed output) -> dense -> relu -> dense."""

    @nn.compact
    def __call__(self, x, train=False):
      x = nn.Dense(6, name="a")(nn.LayerNorm(name="norm")(x))
      x = nn.relu(nn.Dense(5, name="b")(x))
      return nn.Dense(3, name="c")(x)

  def _setup(self, settings=None):
    model = self._Bottleneck()
    x = _x((8, 4), seed=8)
    q = interception.quantize_model(
        model, x, settings=settings,
        rules={"quantize_stem": True, "quantize_classifier": True})
    fp = model.init(jax.random.key(1), x)
    v = interception.add_quantizer_params(
        fp, jax.eval_shape(q.init, jax.random.key(0), x))
    return model, q, fp, v, x

  def test_negative_inputs_are_observed_unclipped(self):
    model, q, fp, v, x = self._setup()
    result = calibration.calibrate(q, v, [x])
    _, inter = model.apply(fp, x, capture_intermediates=True)
    inter = inter["intermediates"]
    for path, value in (("a", inter["norm"]["__call__"][0]),
                        ("b", inter["a"]["__call__"][0])):
      low, high = result.activation_ranges[f"{path}/input_quantizer"]
      self.assertLess(low, 0.0)  # the 20-bit init clamp [0, 1024) would cut
      np.testing.assert_allclose((low, high),
                                 (float(value.min()), float(value.max())),
                                 rtol=1e-6)
    sixteen = calibration.calibrate(q, v, [x], bits=16).variables
    got, want = q.apply(sixteen, x), model.apply(fp, x)
    self.assertLess(float(jnp.abs(got - want).max() / jnp.abs(want).max()),
                    1e-3)

  def test_unsigned_if_nonnegative_freezes_clamp_low_at_zero(self):
    _, q, _, v, x = self._setup(
        layers.QuantSettings(unsigned_if_nonnegative=True))
    result = calibration.calibrate(q, v, [x])
    params = result.variables["params"]
    c_low, c_high = result.activation_ranges["c/input_quantizer"]
    self.assertGreaterEqual(c_low, 0.0)  # after the ReLU
    self.assertEqual(float(params["c"]["input_quantizer"]["clamp_low"]), 0.0)
    np.testing.assert_allclose(
        2.0 ** float(params["c"]["input_quantizer"]["log2_step"]),
        c_high / 1023, rtol=1e-5)
    self.assertFalse(result.trainable["c"]["input_quantizer"]["clamp_low"])
    # A signed input keeps its learnable b = m.
    b_low, _ = result.activation_ranges["b/input_quantizer"]
    self.assertEqual(float(params["b"]["input_quantizer"]["clamp_low"]),
                     np.float32(b_low))
    self.assertTrue(result.trainable["b"]["input_quantizer"]["clamp_low"])


if __name__ == "__main__":
  absltest.main()
