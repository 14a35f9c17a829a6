"""examples/nnx_digits.py runs end to end on a tiny budget (FP, W2A2, export)."""

from __future__ import annotations

import importlib.util
import os

from absl.testing import absltest

_EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(__file__)),
                        "examples", "nnx_digits.py")


def _load_example():
  spec = importlib.util.spec_from_file_location("nnx_digits", _EXAMPLE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


class NnxDigitsTest(absltest.TestCase):

  def test_tiny_budget_runs_every_stage(self):
    results = _load_example().main(
        ["--fp_steps=2", "--steps=2", "--eval_every=2", "--batch_size=32"])
    self.assertEqual(results["fp_steps"], 2)
    self.assertLen(results["history"], 1)
    for key in ("fp_test_accuracy", "gdnsq_test_accuracy",
                "integer_test_accuracy"):
      self.assertBetween(results[key], 0.0, 1.0)
    # Two steps from the 10-bit calibration: not converged, export forced.
    self.assertFalse(results["converged"])
    self.assertGreater(results["weight_bits_max"], 2.0)
    self.assertGreaterEqual(results["argmax_agreement"], 0.999)
    self.assertLess(results["stablehlo_max_abs_error"], 1e-4)
    self.assertLess(results["export_bytes"], results["fp32_bytes"])


if __name__ == "__main__":
  absltest.main()
