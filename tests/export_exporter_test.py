"""Tests of gdnsq_jax.export.exporter: codes, grids, sizes, BOPs, width checks.

The export files, the StableHLO artifact and the CLI: export_files_test.py.
"""

from __future__ import annotations

from absl.testing import absltest
import chex
import jax
import numpy as np

from gdnsq_jax.export import exporter as export_lib
from gdnsq_jax.export import inference as integer_inference
from gdnsq_jax.export import packing
from tests import export_setup

EVAL = export_setup.EVAL


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


if __name__ == "__main__":
  absltest.main()
