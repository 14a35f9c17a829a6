"""Tests of bench/speed.py's ratio statistics and goal table."""

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

  def test_goal_check_uses_each_reference_goal(self):
    # 1.10x is within the 1.15x goal against plain FP, not within the
    # 1.05x goal against the FP distillation step.
    row = {"model": "m", "config": "w2a2-fast", "wall_s": 0.11,
           "cpu_s": 0.11, "images_per_s": 1.0, "speedup": None,
           "host_is_device": True}
    for label in ("fp", "distill"):
      for clock in ("wall", "cpu"):
        row[f"over_{label}_{clock}"] = 1.10
        row[f"over_{label}_{clock}_spread"] = (1.05, 1.15)
    row["over_fp_flops"] = 1.3
    text = speed.format_table([row])
    self.assertIn("w2a2-fast / fp: 1.10 wall [1.05-1.15], 1.10 cpu "
                  "[1.05-1.15] (goal <= 1.15: met; FLOPs 1.30x)", text)
    self.assertIn("w2a2-fast / distill: 1.10 wall [1.05-1.15], 1.10 cpu "
                  "[1.05-1.15] (goal <= 1.05: not met)", text)


if __name__ == "__main__":
  absltest.main()
