"""Tests of the training loop's parts on a toy step and 4 fake CPU devices."""

from __future__ import annotations

import json
import os

from absl.testing import absltest
import chex
import jax
import jax.numpy as jnp
import numpy as np

from gdnsq_jax import bitwidths
from train import checkpointing
from train import evaluation
from train import input_pipeline
from train import loop
from train import reporting
from train import sharding
from train import steps


def _toy_step(state, batch, teacher_variables):
  """loss = mean(x) * w; w grows by one per step."""
  del teacher_variables
  loss = jnp.mean(batch["x"]) * state.params["w"]
  new = state.replace(step=state.step + 1,
                      params={"w": state.params["w"] + 1.0})
  return new, {"train/loss": loss, "train/grad_norm": jnp.abs(loss),
               "train/accuracy": jnp.zeros(())}


def _loop_state(mesh, step=0):
  state = steps.TrainState(
      step=jnp.asarray(step, jnp.int32),
      params={"w": jnp.asarray(float(step), jnp.float32)},
      batch_stats={}, opt_state=(), trainable={"w": jnp.asarray(True)},
      rng=jnp.zeros((2,), jnp.uint32), converged=jnp.asarray(False))
  return sharding.replicate(loop.LoopState.initial(state), mesh)


def _batches(nan_at=()):
  """Batch ``k`` (1-based) is eight copies of ``k`` (NaN at ``nan_at``)."""
  k = 0
  while True:
    k += 1
    yield {"x": np.full((8,), np.nan if k in nan_at else float(k),
                        np.float32)}


class _Writer:

  def __init__(self):
    self.scalars = {}

  def write_scalars(self, step, scalars):
    self.scalars.setdefault(step, {}).update(scalars)


class RunStepsTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.mesh = sharding.make_mesh()
    self.logged = []

  def _log(self, step, metrics):
    self.logged.append((step, float(metrics["train/loss"])))

  def _run(self, loop_state, batches, **kwargs):
    step = loop.compile_train_step(
        chex.assert_max_traces(_toy_step, n=1), self.mesh)
    kwargs.setdefault("log_every", (3, 5))
    kwargs.setdefault("fix", "Lower it")
    return loop.run_steps(step, loop_state, batches, None, mesh=self.mesh,
                          log=self._log, **kwargs)

  def test_logs_host_metrics_at_every_period_and_the_last_step(self):
    loop_state, stopped = self._run(_loop_state(self.mesh), _batches(),
                                    num_steps=11)
    self.assertFalse(stopped)
    self.assertEqual(int(loop_state.train.step), 11)
    # Step k sees w = k - 1 and mean(x) = k.
    self.assertEqual(self.logged,
                     [(k, float(k * (k - 1))) for k in (3, 5, 6, 9, 10, 11)])

  def test_state_is_donated_and_stays_replicated(self):
    start = _loop_state(self.mesh)
    w = start.train.params["w"]
    loop_state, _ = self._run(start, _batches(), num_steps=2)
    self.assertTrue(w.is_deleted())
    self.assertEqual(loop_state.train.params["w"].sharding,
                     sharding.replicated(self.mesh))
    self.assertEqual(float(loop_state.train.params["w"]), 2.0)

  def test_resumes_at_the_state_step(self):
    batches = _batches()
    loop_state, _ = self._run(_loop_state(self.mesh, step=5), batches,
                              num_steps=8)
    self.assertEqual(int(loop_state.train.step), 8)
    # Three batches consumed (1, 2, 3) while w went 5, 6, 7.
    self.assertEqual(self.logged, [(6, 1.0 * 5.0), (8, 3.0 * 7.0)])
    self.assertEqual(next(batches)["x"][0], 4.0)

  def test_after_step_sees_every_step_and_can_stop(self):
    seen = []

    def after_step(step, loop_state):
      seen.append((step, int(loop_state.train.step)))
      return loop_state, step == 4

    loop_state, stopped = self._run(_loop_state(self.mesh), _batches(),
                                    num_steps=10, after_step=after_step)
    self.assertTrue(stopped)
    self.assertEqual(seen, [(1, 1), (2, 2), (3, 3), (4, 4)])
    self.assertEqual(int(loop_state.train.step), 4)
    self.assertEqual(self.logged, [(3, 6.0)])

  def test_non_finite_metrics_stop_at_the_log_step(self):
    with self.assertRaisesRegex(
        FloatingPointError,
        r"^non-finite train/loss and train/grad_norm \(train/loss=nan, "
        r"train/grad_norm=nan\) at step 6; last good checkpoint: none\. "
        r"Lower it$"):
      self._run(_loop_state(self.mesh), _batches(nan_at=(6,)), num_steps=9)
    self.assertEqual(self.logged, [(3, 6.0), (5, 20.0)])

  def test_non_finite_error_names_the_last_checkpoint(self):
    ck = checkpointing.StateCheckpointer(self.create_tempdir().full_path)
    ck.save(2, {"x": np.zeros(())})
    with self.assertRaisesRegex(
        FloatingPointError,
        "at step 3; last good checkpoint: " + ck.step_dir(2)):
      self._run(_loop_state(self.mesh), _batches(nan_at=(3,)), num_steps=4,
                checkpoints=ck)
    ck.close()

  def test_metrics_between_log_steps_are_not_read(self):
    # A NaN at step 2 is gone by the log at step 3: the host never saw it.
    loop_state, _ = self._run(_loop_state(self.mesh), _batches(nan_at=(2,)),
                              num_steps=3)
    self.assertEqual(int(loop_state.train.step), 3)
    self.assertEqual(self.logged, [(3, 6.0)])


class PartsTest(absltest.TestCase):

  def test_with_data_position(self):
    mesh = sharding.make_mesh()
    loop_state = loop.with_data_position(
        _loop_state(mesh), input_pipeline.DataPosition(3, 7), mesh)
    self.assertEqual((int(loop_state.epoch), int(loop_state.batch)), (3, 7))
    self.assertEqual(loop_state.epoch.sharding, sharding.replicated(mesh))
    self.assertEqual(loop_state.epoch.dtype, jnp.int32)

  def test_initial_loop_state_has_no_best(self):
    es = loop.LoopState.initial(None).early_stopping
    self.assertEqual((int(es.best_step), int(es.patience_count)), (-1, 0))

  def test_log_scalars_renames_for_the_teacher(self):
    writer = _Writer()
    reporting.log_scalars(writer, reporting.ProgressBar(10, enabled=False),
                          4, {"train/loss": 0.5}, prefix="teacher/")
    self.assertEqual(writer.scalars, {4: {"teacher/loss": 0.5}})

  def test_log_validation_scalars_and_history(self):
    summary = bitwidths.BitwidthSummary(
        weight_layers={"conv": (3.0, 2.5)},
        activation_layers={"conv/input_quantizer": 2.0},
        weight_max=3.0, weight_mean=3.0, activation_max=2.0,
        activation_mean=2.0)
    result = evaluation.EvalResult(0.75, 0.6, 64,
                                   {"conv/input_quantizer": 2.0})
    path = os.path.join(self.create_tempdir().full_path, "history.jsonl")
    writer = _Writer()
    bar = reporting.ProgressBar(10, enabled=False)
    for step, converged in ((4, False), (8, True)):
      record = reporting.log_validation(
          writer, bar, step, evaluation.Validation(result, summary, converged),
          path)
    self.assertEqual(record, {
        "step": 8, "weight_bits": {"conv": 3.0},
        "activation_bits": {"conv/input_quantizer": 2.0}, "accuracy": 0.75,
        "converged": True})
    # The converged-gated accuracy is 0 before convergence.
    self.assertEqual(writer.scalars[4]["val/ns_accuracy"], 0.0)
    self.assertEqual(writer.scalars[8]["val/ns_accuracy"], 0.75)
    self.assertEqual(writer.scalars[8]["bits_layer/weight/conv"], 3.0)
    self.assertEqual(
        writer.scalars[8]["bits_layer/activation/conv/input_quantizer"], 2.0)
    with open(path) as f:
      self.assertEqual([json.loads(l)["step"] for l in f], [4, 8])
    self.assertEqual([r["step"] for r in reporting.read_history(path, 7)],
                     [4])
    self.assertEqual(reporting.read_history(path + ".absent", 8), [])


if __name__ == "__main__":
  absltest.main()
