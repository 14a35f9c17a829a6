"""Tests for gdnsq_jax.learning_rate (docs/method.md §8.1)."""

from __future__ import annotations

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax.numpy as jnp
import numpy as np

from gdnsq_jax import learning_rate as learning_rate_lib


class AnnealedLearningRateTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_warmup_then_decay_only_while_converged(self):
    tx = learning_rate_lib.scale_by_annealed_learning_rate(
        0.1, warmup_steps=2, gamma=0.5)
    grads = {"w": jnp.ones((3,))}
    update = self.variant(lambda u, s, c: tx.update(u, s, converged=c))
    state = tx.init(grads)
    converged = [True, True, True, True, False, False, True, True]
    lrs = []
    for flag in converged:
      updates, state = update(grads, state, jnp.bool_(flag))
      chex.assert_trees_all_close(updates["w"], -state.learning_rate *
                                  jnp.ones((3,)))
      lrs.append(state.learning_rate)
    # k = 0..7: warmup 0, 0.05, 0.1 (flags ignored); then decay on k = 3,
    # pause on k = 4, 5 (not converged), decay on k = 6, 7.
    chex.assert_trees_all_close(
        jnp.stack(lrs),
        jnp.array([0.0, 0.05, 0.1, 0.05, 0.05, 0.05, 0.025, 0.0125]),
        rtol=1e-6)
    chex.assert_trees_all_close(state.lr_factor, 0.125)

  def test_no_warmup_starts_at_peak_and_converged_defaults_false(self):
    tx = learning_rate_lib.scale_by_annealed_learning_rate(
        0.1, warmup_steps=0, gamma=0.5)
    grads = jnp.ones(())
    state = tx.init(grads)
    lrs = []
    for _ in range(3):
      _, state = tx.update(grads, state)
      lrs.append(float(state.learning_rate))
    np.testing.assert_allclose(lrs, [0.1, 0.1, 0.1], rtol=1e-6)

  @parameterized.named_parameters(
      ("zero_lr", dict(learning_rate=0.0)),
      ("zero_gamma", dict(gamma=0.0)),
      ("gamma_above_one", dict(gamma=1.5)),
      ("negative_warmup", dict(warmup_steps=-3)),
  )
  def test_invalid_hyperparameters_raise(self, override):
    config = dict(learning_rate=0.1, warmup_steps=2, gamma=0.9)
    config.update(override)
    name = next(iter(override))
    with self.assertRaisesRegex(ValueError, f"{name}="):
      learning_rate_lib.scale_by_annealed_learning_rate(
          config.pop("learning_rate"), **config)


if __name__ == "__main__":
  absltest.main()
