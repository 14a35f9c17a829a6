"""Tests of bench/speed.py's ratio statistics and configuration table."""

from __future__ import annotations

from absl.testing import absltest

from bench import speed


class PairedRatioTest(absltest.TestCase):

  def test_per_round_ratios_cancel_the_load_of_a_round(self):
    # Round 2 ran while the machine was three times as busy: the ratio of
    # medians would be skewed, the median per-round ratio is not.
    times = [1.2, 3.6, 1.2, 1.2]
    reference = [1.0, 3.0, 1.0, 1.0]
    ratio, (q1, q3) = speed.paired_ratio(times, reference)
    self.assertAlmostEqual(ratio, 1.2)
    self.assertAlmostEqual(q1, 1.2)
    self.assertAlmostEqual(q3, 1.2)
    ratio, (q1, q3) = speed.paired_ratio([1.0, 2.0, 3.0], [1.0, 1.0, 1.0])
    self.assertEqual((ratio, q1, q3), (2.0, 1.5, 2.5))

  def test_quantized_rows_compare_with_the_same_teacher(self):
    self.assertEqual(speed._distill_kind("w2a2"), "fp-distill")  # pylint: disable=protected-access
    self.assertEqual(speed._distill_kind("w2a2-tf32"), "fp-distill-tf32")  # pylint: disable=protected-access
    self.assertEqual(speed._distill_kind("w2a2-tbf16"), "fp-distill-tbf16")  # pylint: disable=protected-access
    for name, (kind, conv) in speed.CONFIGS.items():
      self.assertIn(conv, speed.CONVS, name)
      self.assertIn(kind, {"fp", *speed.DISTILL_KINDS, *speed.QUANT_KINDS},
                    name)


if __name__ == "__main__":
  absltest.main()
