"""Tests of train/preemption.py: SIGTERM becomes a save-and-stop step."""

from __future__ import annotations

import os
import signal

from absl.testing import absltest

from train import preemption


class PreemptionGuardTest(absltest.TestCase):

  def test_sigterm_sets_the_stop_step_and_the_handler_is_restored(self):
    before = signal.getsignal(signal.SIGTERM)
    with preemption.PreemptionGuard() as guard:
      self.assertFalse(guard.reached(1))
      os.kill(os.getpid(), signal.SIGTERM)  # delivered before kill returns
      self.assertTrue(guard.received)
      self.assertTrue(guard.reached(2))
      self.assertEqual(guard.stopped_at, 2)
    self.assertIs(signal.getsignal(signal.SIGTERM), before)

  def test_messages_name_step_and_directory(self):
    self.assertEqual(
        str(preemption.Preempted(7, "/w/checkpoints/7")),
        "preempted: GDNSQ saved the checkpoint of step 7 to "
        "/w/checkpoints/7; rerun the same command to resume")
    self.assertEqual(
        preemption.message(3, None, "the FP teacher"),
        "preempted: the FP teacher stopped after step 3; it keeps no "
        "checkpoint, so the rerun of the same command starts it again")


if __name__ == "__main__":
  absltest.main()
