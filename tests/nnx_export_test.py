"""Tests for gdnsq_jax.nnx_export: integer export, inference, StableHLO, checks."""

from __future__ import annotations

import functools

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np

from gdnsq_jax import interception
from gdnsq_jax import nnx_calibration
from gdnsq_jax import nnx_export
from gdnsq_jax import nnx_quantize
from gdnsq_jax.export import exporter
from gdnsq_jax.export import files
from gdnsq_jax.export import stablehlo
from gdnsq_jax.export import verification
from gdnsq_jax.nnx_quantizers import linen_variables
from gdnsq_jax.settings import QuantSettings
from tests import nnx_setup

_SHAPES = {"cnn": (8, 8, 3), "vit": (8, 8, 1)}


@functools.lru_cache(maxsize=None)
def _calibrated(name: str):
  """A model calibrated straight to W4A4 (small integer codes), its data."""
  shape = _SHAPES[name]
  fp = nnx_setup.nnx_cnn() if name == "cnn" else nnx_setup.nnx_vit()
  batches = [nnx_setup.normal((16,) + shape, seed=s) for s in range(3)]
  nnx_setup.warm_batch_stats(fp, batches[0])
  model = nnx_quantize.quantize_model(
      fp, batches[0][:1],
      settings=QuantSettings(weight_bits=4, activation_bits=4))
  model.eval()
  nnx_calibration.calibrate(model, batches, bits=4)
  return fp, model, jnp.concatenate(batches)


class NnxExportTest(parameterized.TestCase):

  @parameterized.parameters("cnn", "vit")
  def test_integer_inference_agrees_with_fake_quant(self, name):
    _, model, x = _calibrated(name)
    export = nnx_export.export_model(model, _SHAPES[name],
                                     fold_batch_norm=True, weight_bits=4,
                                     activation_bits=4)
    integer = jax.jit(lambda x: nnx_export.integer_apply(model, export, x))(x)
    check = verification.compare_logits(integer, model(x))
    self.assertEqual(check["argmax_agreement"], 1.0)
    self.assertLess(check["max_relative_error"], 1e-4)
    errors = jax.jit(lambda x: nnx_export.compare_layers(model, export, x))(x)
    self.assertEqual(set(errors), {e["path"] for e in export.layers})
    self.assertLess(max(float(e) for e in errors.values()), 1e-4)
    served = stablehlo.load_inference(stablehlo.serialize_inference(
        nnx_export.export_inference(model, export)))
    np.testing.assert_allclose(served(x[:5]), integer[:5], rtol=1e-6,
                               atol=1e-6)

  def test_cnn_manifest_folds_batch_norms_and_keeps_fp_layers(self):
    _, model, _ = _calibrated("cnn")
    export = nnx_export.export_model(model, _SHAPES["cnn"],
                                     fold_batch_norm=True)
    layers = {e["path"]: e for e in export.layers}
    self.assertEqual(layers["stem"]["batch_norm"], "bn")
    self.assertEqual(layers["body"]["batch_norm"], "body_bn")
    self.assertFalse(layers["stem"]["quantized"])
    self.assertEqual(layers["depthwise"]["weight_bits"], 4)
    self.assertEqual(export.manifest["totals"]["fp_layers"],
                     ["stem", "proj", "head"])

  def test_the_linen_twin_exports_the_same_arrays(self):
    _, model, x = _calibrated("cnn")
    variables = linen_variables(model)
    linen = interception.quantize_model(
        nnx_setup.LinenCNN(), x[:1], train=False,
        settings=QuantSettings(weight_bits=4, activation_bits=4))
    linen_export = exporter.export_model(
        linen, variables, _SHAPES["cnn"], apply_kwargs={"train": False},
        fold_batch_norm=True)
    export = nnx_export.export_model(model, _SHAPES["cnn"],
                                     fold_batch_norm=True)
    self.assertEqual(sorted(export.arrays), sorted(linen_export.arrays))
    chex.assert_trees_all_equal(export.arrays, linen_export.arrays)
    self.assertEqual(export.layers, linen_export.layers)

  def test_saved_export_reloads_and_runs(self):
    _, model, x = _calibrated("vit")
    export = nnx_export.export_model(model, _SHAPES["vit"])
    directory = self.create_tempdir().full_path
    files.save_export(export, directory)
    loaded = files.load_export(directory)
    np.testing.assert_allclose(nnx_export.integer_apply(model, loaded, x),
                               nnx_export.integer_apply(model, export, x),
                               rtol=1e-6, atol=1e-6)

  def test_refusals(self):
    _, model, _ = _calibrated("cnn")
    with self.assertRaisesRegex(exporter.NotConvergedError, "depthwise"):
      nnx_export.export_model(model, _SHAPES["cnn"], weight_bits=2)
    lsq = nnx_quantize.quantize_model(
        nnx_setup.nnx_cnn(), jnp.zeros((1, 8, 8, 3)),
        settings=QuantSettings(method="lsq", weight_bits=2,
                               activation_bits=2))
    with self.assertRaisesRegex(exporter.ExportError, "method='lsq'"):
      nnx_export.export_model(lsq, _SHAPES["cnn"])


if __name__ == "__main__":
  absltest.main()
