"""Tests of gdnsq_jax.argument_checks: errors name the value and the fix."""

from __future__ import annotations

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from gdnsq_jax import argument_checks


class ArgumentChecksTest(parameterized.TestCase):

  @parameterized.parameters(1, 2.5, np.float32(3.0), -4)
  def test_real_numbers(self, x):
    self.assertTrue(argument_checks.is_real(x))

  @parameterized.parameters(True, float("nan"), float("inf"), "1", None)
  def test_not_real_numbers(self, x):
    self.assertFalse(argument_checks.is_real(x))

  def test_check_message_names_value_allowed_and_fix(self):
    with self.assertRaisesRegex(
        ValueError, r"^gamma=2 is invalid; it must be in \(0, 1\]\. Use 0.99\.$"):
      argument_checks.check("gamma", 2, False, "in (0, 1]", "Use 0.99.")
    argument_checks.check("gamma", 0.5, True, "in (0, 1]", "Use 0.99.")

  @parameterized.parameters(-1, 1.5, True)
  def test_steps_must_be_non_negative_integers(self, x):
    with self.assertRaisesRegex(ValueError, "an integer >= 0"):
      argument_checks.check_steps("warmup_steps", x)

  def test_zero_steps_are_fine(self):
    argument_checks.check_steps("warmup_steps", 0)


if __name__ == "__main__":
  absltest.main()
