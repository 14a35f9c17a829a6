"""The FP teacher's training resumes exactly after a preemption or a crash.

train/teacher.py checkpoints the teacher's loop state (train state, data
position) to ``<workdir>/teacher_state`` every
``config.train.checkpoint_every_steps`` steps and at a SIGTERM; the rerun of
the same command continues from the latest one. These tests stop the tiny
program inside the teacher's training and compare the rerun with an
uninterrupted run of the same config: teacher variables, results, history
and the student's final params are bit-identical.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import threading

from absl.testing import absltest
import chex

from train import checkpointing
from train import preemption
from train import teacher as teacher_lib
from train import train_lib
from tests import tiny_setup

# The tiny config: teacher 30 steps, checkpoint_every_steps 4, 2 kept.
_PREEMPT_AT = 10  # between periodic checkpoints 8 and 12
_CRASH_AT = 14  # after checkpoint 12 of the resumed run

# results.json entries that depend on the workdir or the clock only.
_RUN_SPECIFIC = ("teacher", "wall_time_s", "train_time_s")


class _Crash(Exception):
  """A stand-in for a process killed without warning."""


class _StopAt(preemption.PreemptionGuard):
  """The real guard plus a SIGTERM (or a crash) after step ``at_step``.

  Fires once, at the first ``reached(at_step)``: the teacher's steps in these
  tests, since GDNSQ's run stops before ``at_step``.
  """

  def __init__(self, at_step: int, crash: bool = False):
    super().__init__()
    self._at_step, self._crash, self._fired = at_step, crash, False

  def reached(self, step: int) -> bool:
    if step == self._at_step and not self._fired:
      self._fired = True
      if self._crash:
        raise _Crash(f"simulated crash after step {step}")
      if threading.current_thread() is threading.main_thread():
        os.kill(os.getpid(), signal.SIGTERM)  # the guard's handler runs
      else:  # no handler outside the main thread: call it as the signal would
        self._handle(signal.SIGTERM, None)
    return super().reached(step)


def _config(tmpdir):
  return tiny_setup.tiny_config(tmpdir, num_steps=4)


def _teacher_variables(config, workdir):
  dataset = train_lib.load_data(config)
  model = train_lib.build_model(config, dataset.num_classes)
  return checkpointing.restore_variables(
      os.path.join(workdir, teacher_lib.TEACHER_SUBDIR),
      teacher_lib.abstract_variables(model, dataset.image_shape))


def _student_params(workdir):
  ck = checkpointing.StateCheckpointer(os.path.join(workdir, "checkpoints"))
  try:
    step = ck.latest_step()
    return step, ck.restore_raw(step)["train"]["params"]
  finally:
    ck.close()


def _read(workdir, name):
  with open(os.path.join(workdir, name)) as f:
    return f.read()


def _state_steps(workdir):
  ck = checkpointing.StateCheckpointer(
      os.path.join(workdir, teacher_lib.TEACHER_STATE_SUBDIR))
  try:
    return ck._manager.all_steps()  # pylint: disable=protected-access
  finally:
    ck.close()


class TeacherResumeTest(absltest.TestCase):

  def test_preempted_then_crashed_teacher_resumes_bit_identically(self):
    tmp = self.create_tempdir().full_path
    config = _config(tmp)
    self.assertEqual(config.train.checkpoint_every_steps, 4)
    straight = os.path.join(tmp, "straight")
    want = train_lib.train_and_evaluate(config, straight)

    workdir = os.path.join(tmp, "interrupted")
    state_dir = os.path.join(workdir, teacher_lib.TEACHER_STATE_SUBDIR)
    # 1. SIGTERM after teacher step 10: that step is saved, the run returns.
    out = io.StringIO()
    with absltest.mock.patch.object(
        preemption, "PreemptionGuard", lambda: _StopAt(_PREEMPT_AT)), \
        contextlib.redirect_stdout(out):
      stopped = train_lib.train_and_evaluate(config, workdir)
    checkpoint = os.path.join(state_dir, str(_PREEMPT_AT))
    self.assertEqual(stopped, {"preempted": True,
                               "preempted_step": _PREEMPT_AT,
                               "checkpoint": checkpoint})
    self.assertIn(
        f"preempted: the FP teacher saved the checkpoint of step "
        f"{_PREEMPT_AT} to {checkpoint}; rerun the same command to resume",
        out.getvalue())
    self.assertEqual(_state_steps(workdir), [8, 10])  # 2 kept
    self.assertFalse(os.path.exists(
        os.path.join(workdir, teacher_lib.TEACHER_SUBDIR)))
    self.assertFalse(os.path.exists(os.path.join(workdir, "results.json")))

    # 2. The rerun resumes at 10, saves 12, then dies without a save at 14.
    with absltest.mock.patch.object(
        preemption, "PreemptionGuard",
        lambda: _StopAt(_CRASH_AT, crash=True)):
      with self.assertRaisesRegex(_Crash, "after step 14"):
        train_lib.train_and_evaluate(config, workdir)
    self.assertEqual(_state_steps(workdir), [10, 12])

    # 3. The rerun resumes at 12 and finishes: the same run as `straight`.
    got = train_lib.train_and_evaluate(config, workdir)
    self.assertFalse(os.path.exists(state_dir))  # deleted once saved
    chex.assert_trees_all_equal(_teacher_variables(config, workdir),
                                _teacher_variables(config, straight))
    self.assertEqual(got["teacher"],
                     os.path.join(workdir, teacher_lib.TEACHER_SUBDIR))
    drop = lambda r: {k: v for k, v in r.items() if k not in _RUN_SPECIFIC}
    self.assertEqual(drop(got), drop(want))
    self.assertEqual(
        drop(json.loads(_read(workdir, "results.json"))),
        drop(json.loads(_read(straight, "results.json"))))
    self.assertEqual(_read(workdir, "history.jsonl"),
                     _read(straight, "history.jsonl"))
    (step_a, params_a), (step_b, params_b) = (
        _student_params(d) for d in (workdir, straight))
    self.assertEqual((step_a, step_b), (4, 4))
    chex.assert_trees_all_equal(params_a, params_b)

  def test_checkpoint_period_must_be_positive(self):
    tmp = self.create_tempdir().full_path
    config = _config(tmp)
    config.train.checkpoint_every_steps = 0
    with self.assertRaisesRegex(
        ValueError, r"config.train.checkpoint_every_steps=0 must be positive"):
      train_lib.train_and_evaluate(config, os.path.join(tmp, "run"))


if __name__ == "__main__":
  absltest.main()
