"""Tests of the converged-gated early stopping state."""

from __future__ import annotations

import os

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import numpy as np

from train import checkpointing
from train.early_stopping import EarlyStopping


def _reference(evaluations, min_delta, patience):
  """The rules of the loop before EarlyStopping, in Python ints and floats.

  Returns, per evaluation, (best metric, best step, count, improved, stop).
  """
  best, best_step, bad, out = -1.0, -1, 0, []
  for step, metric, converged in evaluations:
    gated = metric if converged else 0.0
    improved = False
    if converged:
      if gated > best + min_delta:
        best, best_step, bad, improved = gated, step, 0, True
      else:
        bad += 1
    elif best_step >= 0:
      bad += 1
    out.append((best, best_step, bad, improved,
                best_step >= 0 and bad >= patience))
  return out


def _fields(es):
  return (float(es.best_metric), int(es.best_step), int(es.patience_count),
          bool(es.has_improved), bool(es.should_stop))


class EarlyStoppingTest(chex.TestCase, parameterized.TestCase):

  def test_initial_state(self):
    es = EarlyStopping.create(min_delta=1e-3, patience=3)
    self.assertEqual(_fields(es), (-np.inf, -1, 0, False, False))
    self.assertEqual((es.min_delta, es.patience), (1e-3, 3))
    # Static fields are not leaves: only the five arrays are checkpointed.
    self.assertLen(jax.tree.leaves(es), 5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_rules_step_by_step(self):
    update = self.variant(EarlyStopping.update)
    es = EarlyStopping.create(min_delta=0.01, patience=2)
    # Before convergence nothing counts, however good the accuracy.
    es = update(es, 0.99, 10, False)
    self.assertEqual(_fields(es), (-np.inf, -1, 0, False, False))
    # The first converged evaluation is the best, whatever its value.
    es = update(es, 0.5, 20, True)
    self.assertEqual(_fields(es), (0.5, 20, 0, True, False))
    # A gain of at most min_delta is no gain.
    es = update(es, 0.505, 30, True)
    self.assertEqual(_fields(es), (0.5, 20, 1, False, False))
    # A real gain resets the count.
    es = update(es, 0.52, 40, True)
    self.assertEqual(_fields(es)[1:], (40, 0, True, False))
    np.testing.assert_allclose(float(es.best_metric), 0.52, rtol=1e-6)
    # Losing convergence after reaching it counts against patience, even
    # with a higher accuracy.
    es = update(es, 0.9, 50, False)
    self.assertEqual(_fields(es)[1:], (40, 1, False, False))
    es = update(es, 0.3, 60, True)
    self.assertEqual(_fields(es)[1:], (40, 2, False, True))

  def test_patience_zero_stops_at_first_converged_evaluation(self):
    es = EarlyStopping.create(patience=0).update(0.1, 4, False)
    self.assertFalse(bool(es.should_stop))
    es = es.update(0.1, 8, True)
    self.assertEqual(_fields(es)[1:], (8, 0, True, True))

  @parameterized.parameters((0.0, 1), (1e-4, 3), (0.05, 2))
  def test_matches_the_loop_rules_on_random_runs(self, min_delta, patience):
    rng = np.random.default_rng(int(patience + 100 * min_delta))
    for _ in range(20):
      n = int(rng.integers(1, 12))
      # Accuracies on a grid of 1/64 like a 64-image validation split, so
      # ties and gains of exactly one image occur.
      evaluations = [(4 * (i + 1), float(rng.integers(0, 65)) / 64,
                      bool(rng.random() < 0.6)) for i in range(n)]
      es = EarlyStopping.create(min_delta=min_delta, patience=patience)
      got = []
      for step, metric, converged in evaluations:
        es = es.update(metric, step, converged)
        got.append(_fields(es))
      want = _reference(evaluations, min_delta, patience)
      for g, w in zip(got, want):
        # The reference starts its best at -1; both mean "none yet".
        w = (-np.inf if w[1] < 0 else w[0],) + w[1:]
        self.assertEqual(g[1:], w[1:], msg=str(evaluations))
        np.testing.assert_allclose(g[0], w[0], rtol=1e-6)

  def test_jitted_update_traces_once(self):
    update = jax.jit(chex.assert_max_traces(EarlyStopping.update, n=1))
    es = EarlyStopping.create(patience=5)
    for i, (metric, converged) in enumerate(
        [(0.2, False), (0.4, True), (0.3, True), (0.5, False)]):
      es = update(es, metric, 4 * (i + 1), converged)
    self.assertEqual(_fields(es)[1:], (8, 2, False, False))

  def test_checkpoint_round_trip_keeps_the_count(self):
    es = EarlyStopping.create(min_delta=1e-4, patience=3)
    for step, metric, converged in ((4, 0.6, True), (8, 0.55, True)):
      es = es.update(metric, step, converged)
    directory = os.path.join(self.create_tempdir().full_path, "ck")
    saver = checkpointing.StateCheckpointer(directory)
    saver.save(8, es)
    target = jax.eval_shape(
        lambda: EarlyStopping.create(min_delta=1e-4, patience=3))
    restored = saver.restore(8, target)
    saver.close()
    self.assertIsInstance(restored, EarlyStopping)
    self.assertEqual((restored.min_delta, restored.patience), (1e-4, 3))
    self.assertEqual(_fields(restored)[1:], (4, 1, False, False))
    np.testing.assert_allclose(float(restored.best_metric), 0.6, rtol=1e-6)
    # The resumed state continues the same count to the same stop.
    restored = restored.update(0.6, 12, True).update(0.6, 16, True)
    self.assertEqual(_fields(restored)[1:], (4, 3, False, True))


if __name__ == "__main__":
  absltest.main()
