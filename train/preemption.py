"""Preemption: on SIGTERM, finish the step, checkpoint, exit 0.

Cloud GPU / TPU schedulers send SIGTERM some time before they stop a job.
:class:`PreemptionGuard` turns it into a decision the loop takes after each
step: ``guard.reached(step)`` is True at the step where every process should
save a checkpoint and stop.

* One process: a Python SIGTERM handler sets a flag; the first step that
  ends after the signal is the save step.
* Several processes (``jax.distributed``): JAX's preemption sync manager
  receives the notice on any process and agrees on the step with the others;
  ``jax.experimental.multihost_utils.reached_preemption_sync_point(step)``
  is True on every process at the same step, so their checkpoints never
  mix steps. The loop must call :meth:`PreemptionGuard.reached` at every
  step on every process.

Grain worker processes ignore SIGTERM (:mod:`train.input_pipeline`): the
main process saves, then ends them.
"""

from __future__ import annotations

import signal
import threading
from typing import Optional

from absl import logging
import jax
from jax.experimental import multihost_utils


class PreemptionGuard:
  """Context manager that watches for SIGTERM while training.

  Usage::

    with PreemptionGuard() as guard:
      while step < num_steps:
        state = train_step(state, next(batches))
        step += 1
        if guard.reached(step):
          save(step); break
  """

  def __init__(self):
    self._received = threading.Event()
    self._previous = None
    self._multiprocess = jax.process_count() > 1
    self._calls = 0  # sync-point ids: increasing over the teacher and GDNSQ
    self.stopped_at: Optional[int] = None  # the step reached() was True at

  @property
  def received(self) -> bool:
    """Whether this process got SIGTERM (single-process mode)."""
    return self._received.is_set()

  def _handle(self, signum, frame) -> None:
    del frame
    if not self._received.is_set():
      logging.warning("signal %d: finishing the current step, then saving a "
                      "checkpoint and exiting", signum)
    self._received.set()

  def reached(self, step: int) -> bool:
    """True when ``step`` (just finished) is the step to save and stop at.

    Call it once after every step, on every process.
    """
    self._calls += 1
    if self._multiprocess:
      stop = multihost_utils.reached_preemption_sync_point(self._calls)
    else:
      stop = self._received.is_set()
    if stop:
      self.stopped_at = step
    return stop

  def __enter__(self) -> PreemptionGuard:
    # Several processes: JAX's sync manager owns SIGTERM; a Python handler
    # would replace its notifier. A handler can only be set from the main
    # thread; elsewhere (e.g. a test runner's worker thread) SIGTERM keeps
    # its default action.
    if (not self._multiprocess
        and threading.current_thread() is threading.main_thread()):
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


class Preempted(Exception):
  """Raised once the preemption checkpoint is written (or cannot be).

  ``train_lib.train_and_evaluate`` prints it and returns; the program exits
  with status 0.
  """

  def __init__(self, step: int, checkpoint_dir: Optional[str],
               what: str = "GDNSQ"):
    self.step, self.checkpoint_dir = step, checkpoint_dir
    super().__init__(message(step, checkpoint_dir, what))


def message(step: int, checkpoint_dir: Optional[str],
            what: str = "GDNSQ") -> str:
  """The line the program prints when it stops for a preemption."""
  if checkpoint_dir is None:
    return (f"preempted: {what} stopped after step {step}; it keeps no "
            "checkpoint, so the rerun of the same command starts it again")
  return (f"preempted: {what} saved the checkpoint of step {step} to "
          f"{checkpoint_dir}; rerun the same command to resume")
