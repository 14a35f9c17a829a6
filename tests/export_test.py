"""Tests of the integer export, integer inference, verification, tracing.

The export files, the StableHLO artifact and the CLI: export_files_test.py.
"""

from __future__ import annotations

import functools

from absl.testing import absltest
from absl.testing import parameterized
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gdnsq_jax import calibration
from gdnsq_jax.export import exporter as export_lib
from gdnsq_jax.export import verification as export_verification
from gdnsq_jax.export import inference as integer_inference
from gdnsq_jax import interception
from gdnsq_jax import layers
from gdnsq_jax.export import packing
from gdnsq_jax import tracing
from tests import export_setup
from train import models

EVAL = export_setup.EVAL


@functools.lru_cache(maxsize=None)
def _resnet20(bits: int):
  """ResNet-20 on 8x8 inputs, random FP variables, calibrated to ``bits``."""
  model = models.ResNet20(num_classes=10)
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
  settings = layers.QuantSettings(weight_bits=bits, activation_bits=bits,
                                  calibration_bits=bits)
  qmodel = interception.quantize_model(
      model, jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32),
      settings=settings, train=False)
  rng = np.random.default_rng(bits)

  def draw(path, leaf):
    name = path[-1].key
    if name == "var":
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    center = 1.0 if name == "scale" else 0.0
    return rng.normal(center, 0.3, leaf.shape).astype(np.float32)

  shapes = jax.eval_shape(lambda: qmodel.init(jax.random.key(0), x, **EVAL))
  fp = jax.tree_util.tree_map_with_path(
      draw, jax.eval_shape(lambda: model.init(jax.random.key(0), x, **EVAL)))
  variables = interception.add_quantizer_params(fp, shapes)
  variables = calibration.calibrate(qmodel, variables, [x], bits=bits,
                                    apply_kwargs=EVAL).variables
  reference = jax.jit(lambda v, x: qmodel.apply(v, x, **EVAL))(variables, x)
  return model, qmodel, variables, x, np.asarray(reference)


class HandCountedExportTest(chex.TestCase):

  def setUp(self):
    super().setUp()
    (self.model, self.qmodel, self.variables, self.x, self.conv_codes,
     self.dense_codes, self.export) = export_setup.two_layer_setup()

  def test_manifest_sizes_and_bops_by_hand(self):
    conv, dense = self.export.layers
    # conv: 54 codes of 3 bits in 4-bit containers = 27 bytes; step, zero 3
    # float32 each; activation step, low, high, levels 4 bytes each.
    self.assertEqual((conv["weight_bits"], conv["activation_bits"]), (3, 2))
    self.assertEqual(conv["activation_levels"], 4)
    self.assertEqual(conv["bytes"], 27 + 12 + 12 + 16)
    self.assertEqual(conv["fp32_bytes"], 54 * 4)
    self.assertEqual(conv["macs"], 4 * 4 * 3 * (3 * 3 * 2))
    self.assertEqual(conv["bops"], 864 * 3 * 2)
    # dense: 240 one-bit codes = 30 bytes; step, zero, bias 5 float32 each.
    self.assertEqual((dense["weight_bits"], dense["activation_bits"]), (1, 4))
    self.assertEqual(dense["bytes"], 30 + 20 + 20 + 20 + 16)
    self.assertEqual(dense["fp32_bytes"], (240 + 5) * 4)
    self.assertEqual(dense["macs"], 48 * 5)
    self.assertEqual(dense["bops"], 240 * 1 * 4)
    totals = self.export.manifest["totals"]
    self.assertEqual(totals["size_bytes"], 67 + 106)
    self.assertEqual(totals["fp32_size_bytes"], 216 + 980)
    self.assertAlmostEqual(totals["compression"], 1196 / 173)
    self.assertEqual(totals["bops"], 5184 + 960)
    self.assertEqual(totals["fp_layers"], [])

  def test_codes_and_grid_are_exported_exactly(self):
    arrays = self.export.layer_arrays("conv")
    codes = packing.unpack_codes(arrays["weight_codes"], 3, 54)
    np.testing.assert_array_equal(codes.reshape(3, 3, 2, 3), self.conv_codes)
    np.testing.assert_array_equal(arrays["weight_step"], [0.125] * 3)
    np.testing.assert_array_equal(arrays["weight_zero"], [-0.5, -0.25, -0.375])
    np.testing.assert_array_equal(
        [arrays["activation_step"], arrays["activation_clamp_low"],
         arrays["activation_clamp_high"]], [0.25, -0.5, 0.25])
    dense = self.export.layer_arrays("dense")
    np.testing.assert_array_equal(
        packing.unpack_codes(dense["weight_codes"], 1, 240).reshape(48, 5),
        self.dense_codes)

  @chex.variants(with_jit=True, without_jit=True)
  def test_integer_inference_equals_fake_quant(self):
    reference = self.qmodel.apply(self.variables, self.x, **EVAL)
    run = self.variant(
        lambda x: integer_inference.integer_apply(self.model, self.export, x))
    chex.assert_trees_all_close(run(self.x), reference, rtol=1e-5, atol=1e-5)

  def test_arrays_may_be_arguments_instead_of_constants(self):
    as_arguments = jax.jit(lambda arrays, x: integer_inference.integer_apply(
        self.model, self.export, x, arrays))
    as_constants = jax.jit(
        lambda x: integer_inference.integer_apply(self.model, self.export, x))
    chex.assert_trees_all_close(as_arguments(self.export.arrays, self.x),
                                as_constants(self.x), rtol=1e-6)

  def test_refuses_widths_above_target_and_names_layers(self):
    with self.assertRaisesRegex(
        export_lib.NotConvergedError,
        r"conv: weight 3\.000 bits > 2(.|\n)*dense: activation 4\.000 bits > 2"
        r"(.|\n)*--force"):
      export_lib.export_model(self.qmodel, self.variables, (4, 4, 2),
                              apply_kwargs=EVAL, weight_bits=2,
                              activation_bits=2)
    forced = export_lib.export_model(
        self.qmodel, self.variables, (4, 4, 2), apply_kwargs=EVAL,
        weight_bits=2, activation_bits=2, force=True)
    self.assertTrue(forced.manifest["forced"])
    self.assertLen(forced.manifest["width_violations"], 2)
    ok = export_lib.export_model(self.qmodel, self.variables, (4, 4, 2),
                                 apply_kwargs=EVAL, weight_bits=3,
                                 activation_bits=4)
    self.assertFalse(ok.manifest["forced"])


class ResNetIntegerInferenceTest(parameterized.TestCase):

  @parameterized.parameters((2, False), (1, True))
  def test_equals_fake_quant_eval(self, bits, fold):
    model, qmodel, variables, x, reference = _resnet20(bits)
    export = export_lib.export_model(
        qmodel, variables, (8, 8, 3), apply_kwargs=EVAL, fold_batch_norm=fold,
        weight_bits=bits, activation_bits=bits)
    for e in export.layers:
      if e["quantized"]:
        self.assertEqual((e["weight_bits"], e["activation_bits"]), (bits, bits))
    folded = [e["batch_norm"] for e in export.layers if e["batch_norm"]]
    self.assertLen(folded, 21 if fold else 0)  # every conv has its BatchNorm
    kept = [k for k in export.arrays if k.startswith("variables/")]
    self.assertEqual(kept == [], fold)
    logits = jax.jit(
        lambda x: integer_inference.integer_apply(model, export, x))(x)
    agreement = export_verification.compare_logits(logits, reference)
    self.assertLess(agreement["max_relative_error"], 1e-4)
    self.assertEqual(agreement["argmax_agreement"], 1.0)
    if fold:  # each layer on the fake-quant input, against conv + BN
      layer_errors = jax.jit(lambda v, x: export_verification.compare_layers(
          qmodel, v, export, x))(variables, x)
      self.assertLen(layer_errors, 22)  # every conv and the classifier
      self.assertLess(max(map(float, layer_errors.values())), 1e-5)


class OddGeometryNet(nn.Module):
  """Grouped strided SAME, circular dilated, input-dilated padded convs."""

  @nn.compact
  def __call__(self, x, train=False):
    del train
    x = nn.Conv(4, (3, 3), strides=2, padding="SAME", feature_group_count=2,
                name="grouped")(x)
    x = nn.Conv(6, (3, 2), padding="CIRCULAR", kernel_dilation=(2, 1),
                name="circular")(nn.relu(x))
    x = nn.Conv(3, (2, 2), padding=((1, 0), (0, 1)), input_dilation=2,
                name="dilated")(x)
    return nn.Dense(3, name="dense")(x.reshape((x.shape[0], -1)))


class GeometryTest(parameterized.TestCase):

  @parameterized.parameters(
      dict(per_channel=False, weight_bits=3, activation_bits=3),
      dict(per_channel=True, weight_bits=3, activation_bits=32),  # float x
      dict(per_channel=True, weight_bits=32, activation_bits=3))  # float W
  def test_integer_inference_equals_fake_quant(self, **bits):
    model = OddGeometryNet()
    x = jax.random.normal(jax.random.key(5), (3, 7, 7, 2))
    settings = layers.QuantSettings(calibration_bits=3, **bits)
    qmodel = interception.quantize_model(
        model, x, settings=settings, train=False,
        rules={"quantize_stem": True, "quantize_classifier": True})
    variables = qmodel.init(jax.random.key(0), x, train=False)
    variables = calibration.calibrate(qmodel, variables, [x],
                                      apply_kwargs=EVAL).variables
    export = export_lib.export_model(qmodel, variables, (7, 7, 2),
                                     apply_kwargs=EVAL)
    reference = qmodel.apply(variables, x, **EVAL)
    logits = jax.jit(
        lambda x: integer_inference.integer_apply(model, export, x))(x)
    scale = float(jnp.abs(reference).max())
    chex.assert_trees_all_close(logits, reference, atol=1e-5 * scale)
    quantized_widths = [(e["weight_bits"], e["activation_bits"])
                        for e in export.layers]
    self.assertEqual(quantized_widths, [(
        min(bits["weight_bits"], 32), min(bits["activation_bits"], 32))] * 4)


class VerificationTest(absltest.TestCase):

  def test_compare_logits_by_hand(self):
    reference = np.array([[1.0, 2.0, 4.0], [3.0, 3.0, -1.0], [0.0, -2.0, 1.0]])
    integer = reference + np.array([[0.0, 0.0, 4e-5], [0.0, 1e-6, 0.0],
                                    [0.0, 0.0, -2.0]])
    result = export_verification.compare_logits(integer, reference)
    self.assertAlmostEqual(result["max_relative_error"], 1.0)  # 2 / max 2
    self.assertAlmostEqual(result["fraction_within_1e-4"], 2 / 3)
    # Row 1 is a tie (3 vs 3) and ignored; row 2's argmax moved: 1 of 2.
    self.assertAlmostEqual(result["argmax_agreement"], 0.5)
    self.assertEqual(result["count"], 3)

  def test_compare_layers_finds_a_wrong_layer(self):
    _, qmodel, variables, x, _, _, export = export_setup.two_layer_setup()
    errors = export_verification.compare_layers(qmodel, variables, export, x)
    self.assertLess(max(map(float, errors.values())), 1e-6)
    arrays = dict(export.arrays)
    arrays["layers/conv/weight_step"] = arrays["layers/conv/weight_step"] * 1.01
    broken = export_lib.IntegerExport(export.manifest, arrays)
    errors = export_verification.compare_layers(qmodel, variables, broken, x)
    self.assertGreater(float(errors["conv"]), 1e-3)
    self.assertLess(float(errors["dense"]), 1e-6)  # teacher-forced input


class TracingTest(absltest.TestCase):

  def test_finds_batch_norm_consuming_each_conv(self):
    model = models.ResNet20(num_classes=10)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3))))
    traced = {t.path: t for t in tracing.trace_layers(model, shapes, (8, 8, 3),
                                                      apply_kwargs=EVAL)}
    self.assertEqual(traced["stage1_block1/conv1"].batch_norm,
                     "stage1_block1/bn1")
    self.assertEqual(traced["stage2_block1/shortcut_conv"].batch_norm,
                     "stage2_block1/shortcut_bn")
    self.assertIsNone(traced["classifier"].batch_norm)
    self.assertEqual(traced["stem_conv"].macs, 8 * 8 * 16 * 27)
    # In training mode BatchNorm uses batch statistics: nothing to fold.
    training = tracing.trace_layers(model, shapes, (8, 8, 3),
                                    apply_kwargs={"train": True})
    self.assertTrue(all(t.batch_norm is None for t in training))


if __name__ == "__main__":
  absltest.main()
