"""Tests of train/checkpointing.py's resume helpers (StateCheckpointer)."""

from __future__ import annotations

import os

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from train import checkpointing


def _state(value: float):
  return {"w": jnp.full((3,), value, jnp.float32), "step": jnp.int32(value)}


class StateCheckpointerTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = os.path.join(self.create_tempdir().full_path, "ckpt")
    self.checkpoints = checkpointing.StateCheckpointer(self.dir, 3)
    self.addCleanup(self.checkpoints.close)

  def test_restore_latest_is_none_without_a_checkpoint(self):
    calls = []
    self.assertIsNone(self.checkpoints.restore_latest(
        lambda: calls.append(1)))
    self.assertEqual(calls, [])  # the target is only built to restore

  def test_restore_latest_reads_the_newest_step(self):
    self.checkpoints.save(2, _state(2.0))
    self.checkpoints.save(5, _state(5.0))
    restored = self.checkpoints.restore_latest(
        lambda: jax.eval_shape(lambda: _state(0.0)))
    np.testing.assert_array_equal(restored["w"], np.full((3,), 5.0))
    self.assertEqual(int(restored["step"]), 5)

  def test_save_if_new_skips_the_latest_step_only(self):
    self.checkpoints.save(4, _state(4.0))
    self.checkpoints.save_if_new(4, _state(9.0))  # already saved: kept
    self.checkpoints.save_if_new(6, _state(6.0))
    self.checkpoints.wait()
    self.assertEqual(self.checkpoints.latest_step(), 6)
    kept = self.checkpoints.restore(4, jax.eval_shape(lambda: _state(0.0)))
    np.testing.assert_array_equal(kept["w"], np.full((3,), 4.0))


if __name__ == "__main__":
  absltest.main()
