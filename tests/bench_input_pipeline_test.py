"""Tests of bench/input_pipeline.py's loop table (digits, tiny batch)."""

from __future__ import annotations

import contextlib
import io

from absl.testing import absltest

from bench import input_pipeline


class LoopTableTest(absltest.TestCase):

  def test_loop_runs_the_w2a2_step_fed_by_both_streams(self):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      input_pipeline.main([
          "--parts", "loop", "--models", "digits_resnet", "--batch", "8",
          "--loop-steps", "2", "--repeats", "1", "--log-every", "1"])
    rows = [line.split() for line in out.getvalue().splitlines()
            if line.startswith("digits_resnet")]
    # Printed as measured and again in the final table.
    self.assertEqual(sorted({row[2] for row in rows}), ["device", "host"])
    for model, batch, _, bare, rate, efficiency in rows:
      self.assertEqual((model, batch), ("digits_resnet", "8"))
      self.assertGreater(float(bare), 0)
      self.assertGreater(float(rate), 0)
      # Rates print rounded to 1 img/s, the efficiency to 0.001.
      bare, rate = float(bare), float(rate)
      self.assertAlmostEqual(float(efficiency), rate / bare,
                             delta=0.5 * (1 + rate / bare) / bare + 5e-4)


if __name__ == "__main__":
  absltest.main()
