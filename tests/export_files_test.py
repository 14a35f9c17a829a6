"""Tests of the export files and the export CLI."""

from __future__ import annotations

import json
import os
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp

from gdnsq_jax import calibration
from gdnsq_jax.export import exporter as export_lib
from gdnsq_jax.export import files as export_files
from gdnsq_jax.export import stablehlo as export_stablehlo
from gdnsq_jax import interception
from tests import export_setup
from tests import tiny_setup
from train import checkpointing
from train import export as export_cli
from train import input_pipeline
from train import loop
from train import steps
from train import train_lib

EVAL = export_setup.EVAL


class FilesTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.export = export_setup.two_layer_setup()[-1]
    self.dir = self.create_tempdir().full_path
    export_files.save_export(self.export, self.dir, stablehlo=b"hlo bytes")

  def _path(self, name):
    return os.path.join(self.dir, name)

  def _truncate(self, name, size):
    with open(self._path(name), "r+b") as f:
      f.truncate(size)

  def _assert_load_fails(self, regex):
    with self.assertRaisesRegex(export_files.ExportFormatError, regex):
      export_files.load_export(self.dir)

  def test_round_trip(self):
    loaded = export_files.load_export(self.dir)
    self.assertEqual(loaded.manifest["layers"], self.export.manifest["layers"])
    chex.assert_trees_all_equal(loaded.arrays, self.export.arrays)
    self.assertEqual(export_files.read_stablehlo(self.dir), b"hlo bytes")

  def test_truncated_arrays_file(self):
    self._truncate("arrays.npz", 100)
    self._assert_load_fails("arrays.npz.*truncated")

  def test_corrupt_arrays_file(self):
    with open(self._path("arrays.npz"), "r+b") as f:
      f.seek(200)
      byte = f.read(1)
      f.seek(200)
      f.write(bytes([byte[0] ^ 0xFF]))
    self._assert_load_fails("corrupt")

  def test_truncated_manifest(self):
    self._truncate("manifest.json", 50)
    self._assert_load_fails("not valid JSON")

  def test_manifest_that_disagrees_with_arrays(self):
    with open(self._path("manifest.json")) as f:
      manifest = json.load(f)
    manifest["layers"][0]["weight_bits"] = 8  # 54 codes would need 54 bytes
    with open(self._path("manifest.json"), "w") as f:
      json.dump(manifest, f)
    self._assert_load_fails("weight_codes: 27 bytes.*need 54")

  def test_missing_and_truncated_stablehlo(self):
    self._truncate("model.stablehlo", 3)
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

  def test_summary_is_the_table_then_the_verification(self):
    manifest = dict(self.export.manifest)
    self.assertEqual(export_files.format_summary(manifest),
                     export_files.format_size_table(manifest))
    manifest["verification"] = {
        "count": 2000, "split": "test", "argmax_agreement": 0.9995,
        "fraction_within_1e-4": 0.9965, "max_relative_error": 0.015,
        "max_layer_relative_error": 5.3e-6, "integer_accuracy": 0.975,
        "fake_quant_accuracy": 0.9755}
    summary = export_files.format_summary(manifest).split("\n")
    self.assertEqual(summary[:-1],
                     export_files.format_size_table(manifest).split("\n"))
    self.assertEqual(
        summary[-1], "verified on 2000 test images: argmax agreement "
        "0.9995; logits within 1e-4 relative on 99.65% (max 1.5e-02); every "
        "layer within 5.3e-06 on the same input; accuracy 0.9750 "
        "(fake-quant 0.9755)")


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
      served = export_stablehlo.load_inference(
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
