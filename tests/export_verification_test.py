"""Tests of gdnsq_jax.export.verification: logit and layer-by-layer comparison.
"""

from __future__ import annotations

from absl.testing import absltest
import numpy as np

from gdnsq_jax.export import exporter as export_lib
from gdnsq_jax.export import verification as export_verification
from tests import export_setup

EVAL = export_setup.EVAL


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


if __name__ == "__main__":
  absltest.main()
