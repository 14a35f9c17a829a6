"""Tests for gdnsq_jax.nnx_calibration: 10 / 16-bit calibration, widths, frozen params."""

from __future__ import annotations

from absl.testing import absltest
from absl.testing import parameterized
import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from gdnsq_jax import bitwidths
from gdnsq_jax import nnx_calibration
from gdnsq_jax import nnx_quantize
from gdnsq_jax.nnx_quantizers import QuantParam
from gdnsq_jax.nnx_quantizers import QuantStat
from gdnsq_jax.nnx_quantizers import params_dict
from gdnsq_jax.settings import QuantSettings
from tests import nnx_setup


def _models():
  return {
      "cnn": (nnx_setup.nnx_cnn, (8, 8, 3)),
      "vit": (nnx_setup.nnx_vit, (8, 8, 1)),
  }


class CalibrationTest(parameterized.TestCase):

  def _quantized(self, name, **settings):
    build, shape = _models()[name]
    fp = build()
    batches = [nnx_setup.normal((16,) + shape, seed=s) for s in range(3)]
    nnx_setup.warm_batch_stats(fp, batches[0])
    model = nnx_quantize.quantize_model(
        fp, batches[0][:1], settings=QuantSettings(**settings))
    model.eval()
    return fp, model, batches

  @parameterized.parameters("cnn", "vit")
  def test_16_bits_match_the_fp_model(self, name):
    fp, model, batches = self._quantized(name, weight_bits=2,
                                         activation_bits=2)
    nnx_calibration.calibrate(model, batches, bits=16)
    x = jnp.concatenate(batches)  # inside the calibrated ranges
    reference = fp(x)
    error = jnp.max(jnp.abs(model(x) - reference)) / jnp.max(
        jnp.abs(reference))
    self.assertLess(float(error), 1e-3)
    report = nnx_quantize.quantization_report(model)
    weight_ops = {"/".join(map(str, p)) for p, m in nnx.iter_modules(model)
                  if isinstance(getattr(m, "kernel", None), nnx.Param)}
    self.assertEqual({r.path for r in report}, weight_ops)  # every one
    self.assertLen(report, len(weight_ops))
    self.assertTrue(any(r.quantized for r in report))

  def test_ten_bits_by_default_and_observed_ranges(self):
    _, model, batches = self._quantized("cnn")
    result = nnx_calibration.calibrate(model, batches)
    weights, activations = bitwidths.differentiable_bitwidths(
        params_dict(model))
    np.testing.assert_allclose(activations, 10.0, atol=1e-5)
    self.assertLessEqual(float(weights.max()), 10.0 + 1e-5)
    low, high = result.activation_ranges["depthwise/input_quantizer"]
    q = model.depthwise.input_quantizer
    self.assertAlmostEqual(float(q.clamp_low[...]), low, places=6)
    step, width = jnp.exp2(q.log2_step[...]), jnp.exp2(q.log2_range[...])
    self.assertAlmostEqual(float(q.clamp_low[...] + width - step), high,
                           places=4)
    self.assertEqual(result.frozen, ())

  def test_calibration_observes_fp_activations_and_restores_state(self):
    fp, model, batches = self._quantized("cnn")
    model.train()  # observe with batch statistics: their updates are dropped
    bn_before = jax.tree.map(np.asarray, nnx.to_pure_dict(
        nnx.state(model, nnx.BatchStat)))
    result = nnx_calibration.calibrate(model, batches)
    chex.assert_trees_all_close(nnx.to_pure_dict(
        nnx.state(model, nnx.BatchStat)), bn_before)
    self.assertEqual(int(model.quant_noise.count[...]), 0)
    # Negative inputs of the hidden layer are observed (FP network).
    self.assertFalse(model.depthwise.input_quantizer.recording)
    low, _ = result.activation_ranges["body/input_quantizer"]
    self.assertLess(low, 0.0)

  def test_frozen_quantizer_metadata_and_zero_gradients(self):
    _, model, batches = self._quantized("cnn", activation_bits=2,
                                        learnable_clamp_low=False)
    result = nnx_calibration.calibrate(model, batches)
    self.assertIn("body/input_quantizer/clamp_low", result.frozen)
    frozen = nnx.state(model, nnx_calibration.Frozen)
    self.assertEqual(
        {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(frozen)},
        set(result.frozen))
    model.train()
    grads = nnx.grad(lambda m: jnp.sum(m(batches[0]) ** 2))(model)
    masked = nnx_calibration.zero_frozen(grads)
    self.assertEqual(float(masked["body"]["input_quantizer"]["clamp_low"][...]),
                     0.0)
    np.testing.assert_array_equal(masked["body"]["kernel"][...],
                                  grads["body"]["kernel"][...])

  def test_true_activation_widths_over_a_pass(self):
    _, model, batches = self._quantized("cnn", weight_bits=2,
                                        activation_bits=2)
    nnx_calibration.calibrate(model, batches, bits=2)
    widths = nnx_calibration.measure_activation_widths(model, batches)
    self.assertEqual(set(widths), {f"{p}/input_quantizer" for p in
                                   ("depthwise", "body", "hidden")})
    for width in widths.values():
      self.assertLessEqual(width, 2.0)
    summary = bitwidths.summarize_bitwidths(params_dict(model),
                                            activation_widths=widths)
    self.assertLessEqual(summary.weight_max, 2.0 + 1e-6)
    stats = nnx.state(model, QuantStat)
    self.assertTrue(stats)  # explicit Variables, not sown collections

  def test_errors(self):
    _, model, _ = self._quantized("cnn")
    with self.assertRaisesRegex(ValueError, "no batches"):
      nnx_calibration.calibrate(model, [])
    lsq = self._quantized("cnn", method="lsq", weight_bits=2,
                          activation_bits=2)[1]
    with self.assertRaisesRegex(ValueError, "fixed widths"):
      nnx_calibration.calibrate(lsq, [nnx_setup.normal((2, 8, 8, 3))], bits=8)
    self.assertTrue(issubclass(QuantParam, nnx.Param))


if __name__ == "__main__":
  absltest.main()
