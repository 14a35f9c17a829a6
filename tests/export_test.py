"""Tests of the integer export, integer inference, files and CLI."""

from __future__ import annotations

import functools
import json
import os
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gdnsq_jax import calibration
from gdnsq_jax import export as export_lib
from gdnsq_jax import export_files
from gdnsq_jax import export_verification
from gdnsq_jax import integer_inference
from gdnsq_jax import interception
from gdnsq_jax import layers
from gdnsq_jax import packing
from gdnsq_jax import tracing
from tests import tiny_setup
from train import checkpointing
from train import export as export_cli
from train import input_pipeline
from train import loop
from train import models
from train import steps
from train import train_lib

EVAL = {"train": False}


class TwoLayerNet(nn.Module):
  """conv 3x3 (2 -> 3 channels, zero padding 1) -> relu -> dense (48 -> 5)."""

  @nn.compact
  def __call__(self, x, train=False):
    del train
    x = nn.Conv(3, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                name="conv")(x)
    x = nn.relu(x).reshape((x.shape[0], -1))
    return nn.Dense(5, name="dense")(x)


@functools.lru_cache(maxsize=None)
def _two_layer_setup():
  """A W3/A2 conv and a W1/A4 dense with hand-chosen, exactly known codes."""
  model = TwoLayerNet()
  sample = jax.ShapeDtypeStruct((1, 4, 4, 2), jnp.float32)
  qmodel = interception.quantize_model(
      model, sample, rules={"quantize_stem": True, "quantize_classifier": True},
      train=False)
  rng = np.random.default_rng(0)
  conv_codes = rng.integers(0, 8, (3, 3, 2, 3))
  conv_codes[0, 0, 0, :], conv_codes[1, 1, 1, 0] = 0, 7  # channel min 0; max 7
  conv_zero = np.array([-0.5, -0.25, -0.375], np.float32)
  dense_codes = rng.integers(0, 2, (48, 5))
  dense_codes[0], dense_codes[1] = 0, 1
  dense_zero = np.array([-0.5, -0.25, 0.0, 0.25, -1.0], np.float32)
  quantizer = lambda log2_step, log2_range, low: {
      "log2_step": np.float32(log2_step), "log2_range": np.float32(log2_range),
      "clamp_low": np.float32(low)}
  params = {
      "conv": {
          "kernel": (conv_zero + 0.125 * conv_codes).astype(np.float32),
          "log2_step": np.full((3,), -3.0, np.float32),
          # s = 1/4, q = 1: levels round(4 - 1) + 1 = 4; b = -0.5 != 0, so
          # the zero padding (0, not b) matters.
          "input_quantizer": quantizer(-2.0, 0.0, -0.5)},
      "dense": {
          "kernel": (dense_zero + 0.5 * dense_codes).astype(np.float32),
          "bias": np.array([0.1, -0.2, 0.3, 0.0, 0.5], np.float32),
          "log2_step": np.full((5,), -1.0, np.float32),
          "input_quantizer": quantizer(-3.0, 1.0, 0.0)},  # 16 levels
  }
  x = jax.random.uniform(jax.random.key(3), (6, 4, 4, 2), minval=-1.0,
                         maxval=1.5)
  variables = {"params": params}
  export = export_lib.export_model(qmodel, variables, (4, 4, 2),
                                   apply_kwargs=EVAL)
  return model, qmodel, variables, x, conv_codes, dense_codes, export


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
     self.dense_codes, self.export) = _two_layer_setup()

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
    _, qmodel, variables, x, _, _, export = _two_layer_setup()
    errors = export_verification.compare_layers(qmodel, variables, export, x)
    self.assertLess(max(map(float, errors.values())), 1e-6)
    arrays = dict(export.arrays)
    arrays["layers/conv/weight_step"] = arrays["layers/conv/weight_step"] * 1.01
    broken = export_lib.IntegerExport(export.manifest, arrays)
    errors = export_verification.compare_layers(qmodel, variables, broken, x)
    self.assertGreater(float(errors["conv"]), 1e-3)
    self.assertLess(float(errors["dense"]), 1e-6)  # teacher-forced input


class StableHloTest(absltest.TestCase):

  def test_serialized_function_reloads_with_identical_outputs(self):
    model, _, _, x, _, _, export = _two_layer_setup()
    exported = integer_inference.export_inference(model, export)
    served = integer_inference.load_inference(
        integer_inference.serialize_inference(exported))
    direct = jax.jit(
        lambda x: integer_inference.integer_apply(model, export, x))
    for batch in (x, x[:3]):  # the batch size is symbolic
      np.testing.assert_array_equal(np.asarray(served(batch)),
                                    np.asarray(direct(batch)))

  def test_garbage_bytes_give_a_clear_error(self):
    with self.assertRaisesRegex(export_lib.ExportError,
                                "not a serialized jax.export"):
      integer_inference.load_inference(b"\x00not an export")


class FilesTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.export = _two_layer_setup()[-1]
    self.dir = self.create_tempdir().full_path
    export_files.save_export(self.export, self.dir, stablehlo=b"hlo bytes")

  def _path(self, name):
    return os.path.join(self.dir, name)

  def test_round_trip(self):
    loaded = export_files.load_export(self.dir)
    self.assertEqual(loaded.manifest["layers"], self.export.manifest["layers"])
    chex.assert_trees_all_equal(loaded.arrays, self.export.arrays)
    self.assertEqual(export_files.read_stablehlo(self.dir), b"hlo bytes")

  def test_truncated_arrays_file(self):
    with open(self._path("arrays.npz"), "r+b") as f:
      f.truncate(100)
    with self.assertRaisesRegex(export_files.ExportFormatError,
                                "arrays.npz.*truncated"):
      export_files.load_export(self.dir)

  def test_corrupt_arrays_file(self):
    with open(self._path("arrays.npz"), "r+b") as f:
      f.seek(200)
      byte = f.read(1)
      f.seek(200)
      f.write(bytes([byte[0] ^ 0xFF]))
    with self.assertRaisesRegex(export_files.ExportFormatError, "corrupt"):
      export_files.load_export(self.dir)

  def test_truncated_manifest(self):
    with open(self._path("manifest.json"), "r+b") as f:
      f.truncate(50)
    with self.assertRaisesRegex(export_files.ExportFormatError,
                                "not valid JSON"):
      export_files.load_export(self.dir)

  def test_manifest_that_disagrees_with_arrays(self):
    with open(self._path("manifest.json")) as f:
      manifest = json.load(f)
    manifest["layers"][0]["weight_bits"] = 8  # 54 codes would need 54 bytes
    with open(self._path("manifest.json"), "w") as f:
      json.dump(manifest, f)
    with self.assertRaisesRegex(export_files.ExportFormatError,
                                "weight_codes: 27 bytes.*need 54"):
      export_files.load_export(self.dir)

  def test_missing_and_truncated_stablehlo(self):
    with open(self._path("model.stablehlo"), "r+b") as f:
      f.truncate(3)
    with self.assertRaisesRegex(export_files.ExportFormatError, "truncated"):
      export_files.read_stablehlo(self.dir)
    os.remove(self._path("model.stablehlo"))
    with self.assertRaisesRegex(export_files.ExportFormatError, "is missing"):
      export_files.read_stablehlo(self.dir)

  def test_not_an_export_directory(self):
    with self.assertRaisesRegex(export_files.ExportFormatError,
                                "no manifest.json"):
      export_files.load_export(self.create_tempdir().full_path)

  def test_size_table_lists_layers_and_totals(self):
    table = export_files.format_size_table(self.export.manifest)
    self.assertRegex(table, r"conv\s+3\s+2\s+864\s+67\s+216")
    self.assertIn("173 bytes vs 1,196 bytes FP32 (6.91x smaller)", table)
    self.assertIn("BOPs: 6,144", table)


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


def _write_tiny_run(tmpdir: str) -> str:
  """A run directory as train.main leaves it: config and a calibrated state.

  One-shot calibration straight to the W2A2 target (``quant.gradual=False``)
  gives true widths of exactly 2 bits, i.e. a converged state, without
  training.
  """
  config = tiny_setup.tiny_config(tmpdir)
  config.quant.gradual = False
  workdir = os.path.join(tmpdir, "run")
  os.makedirs(workdir)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  dataset = train_lib.load_data(config)
  model = train_lib.build_model(config, dataset.num_classes)
  settings = train_lib.quant_settings(config)
  sample = jnp.zeros((1,) + tuple(dataset.image_shape))
  qmodel = interception.quantize_model(
      model, sample, settings=settings, rules=train_lib.quant_rules(config),
      **EVAL)
  fp = model.init(jax.random.key(0), sample, **EVAL)
  variables = interception.add_quantizer_params(
      fp, jax.eval_shape(
          lambda: qmodel.init(jax.random.key(0), sample, **EVAL)))
  images = next(input_pipeline.eval_batches(dataset, "train",
                                            global_batch_size=64))["image"]
  calibrated = calibration.calibrate(qmodel, variables, [images],
                                     apply_kwargs=EVAL)
  tx = train_lib.make_optimizer(config, config.quant.activation_bits)
  trainable = jax.tree.map(jnp.asarray, calibrated.trainable)
  state = steps.create_state(calibrated.variables, tx, trainable,
                             jax.random.key_data(jax.random.key(0)))
  manager = checkpointing.StateCheckpointer(os.path.join(workdir,
                                                         "checkpoints"))
  manager.save(0, loop.LoopState.initial(state))
  manager.close()
  return workdir


def _set_targets(workdir: str, weight_bits: int, activation_bits: int):
  path = os.path.join(workdir, "config.json")
  with open(path) as f:
    config = json.load(f)
  config["quant"].update(weight_bits=weight_bits,
                         activation_bits=activation_bits)
  with open(path, "w") as f:
    json.dump(config, f)


class ExportCliTest(absltest.TestCase):

  def test_exports_verifies_and_refuses_widths_above_target(self):
    with tempfile.TemporaryDirectory() as tmpdir:
      workdir = _write_tiny_run(tmpdir)
      out = os.path.join(workdir, "export")
      manifest = export_cli.export_run(workdir)
      self.assertFalse(manifest["forced"])
      check = manifest["verification"]
      self.assertTrue(check["passed"])
      self.assertEqual(check["count"], 96)  # the whole test split
      self.assertLess(check["max_relative_error"], 1e-4)
      self.assertEqual(check["argmax_agreement"], 1.0)
      self.assertLess(check["max_layer_relative_error"], 1e-4)
      self.assertLen(check["layer_relative_errors"], 10)
      self.assertEqual(check["stablehlo_max_abs_difference"], 0.0)
      self.assertEqual(manifest["source"]["checkpoint"],
                       os.path.join(workdir, "checkpoints", "0"))
      self.assertEqual(manifest["totals"]["fp_layers"], [
          "stem_conv", "stage2_block1/shortcut_conv",
          "stage3_block1/shortcut_conv", "classifier"])
      loaded = export_files.load_export(out)
      self.assertEqual(loaded.manifest["totals"], manifest["totals"])
      served = integer_inference.load_inference(
          export_files.read_stablehlo(out))
      self.assertEqual(served(jnp.zeros((2, 12, 12, 1))).shape, (2, 4))

      _set_targets(workdir, 1, 1)  # the 2-bit state is now above target
      with self.assertRaisesRegex(
          export_lib.NotConvergedError,
          r"stage1_block1/conv1: weight 2\.000 bits > 1(.|\n)*"
          r"stage1_block1/conv1: activation 2\.000 bits > 1"):
        export_cli.export_run(workdir, output_dir=os.path.join(tmpdir, "no"))
      self.assertFalse(os.path.exists(os.path.join(tmpdir, "no")))
      forced = export_cli.export_run(workdir, force=True, stablehlo=False)
      self.assertTrue(forced["forced"])
      self.assertLen(forced["width_violations"], 12)
      self.assertNotIn("model.stablehlo", os.listdir(out))


if __name__ == "__main__":
  absltest.main()
