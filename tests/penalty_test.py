"""Tests for gdnsq_jax.penalty (docs/method.md §7.3, §8.1, §14 items 9-11)."""

from __future__ import annotations

import math

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gdnsq_jax import bitwidths
from gdnsq_jax import penalty as penalty_lib

EPS = 1e-3


def _params(log2_step_w=(-1.0, -1.0), log2_step_a=-2.0, log2_range_a=1.0):
  """Dense layer (in 2, out 2) with its input activation quantizer.

  Channel 0 holds {0, 0.5} (R = 0.5), channel 1 holds {1, 3} (R = 2). With
  the defaults: beta_w = (log2 2, log2 5) = (1, 2.3219), beta_a = 3.
  """
  return {
      "layer": {
          "kernel": jnp.array([[0.0, 1.0], [0.5, 3.0]], jnp.float32),
          "log2_step": jnp.array(log2_step_w, jnp.float32),
          "input_quantizer": {
              "log2_step": jnp.float32(log2_step_a),
              "log2_range": jnp.float32(log2_range_a),
              "clamp_low": jnp.float32(0.0),
          },
      }
  }


def _penalty_state(completed_steps: int, loss_sum: float):
  """Penalty state after ``completed_steps`` steps with a given loss sum."""
  zero, zero_count = jnp.float32(0), jnp.int32(0)
  return penalty_lib.ExteriorPointPenaltyState(
      jnp.int32(completed_steps), jnp.float32(loss_sum), zero, zero, zero, zero,
      zero_count, zero_count, zero, zero)


class BitwidthPenaltyTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_value_counts_and_multipliers(self):
    fn = self.variant(lambda w, a: penalty_lib.bitwidth_penalty(
        w, a, weight_bits=2, activation_bits=2))
    terms = fn(jnp.array([3.0, 1.0, 2.5]), jnp.array([2.0]))
    hinge_w = np.array([3.0 - 1.999, 0.0, 2.5 - 1.999])
    p_w, p_a = hinge_w.sum() / 3, 2.0 - 1.999
    a_w, a_a = (2 + EPS) / (3 + EPS), (1 + EPS) / (3 + EPS)
    chex.assert_trees_all_close(
        (terms.weight_penalty, terms.activation_penalty,
         terms.weight_multiplier, terms.activation_multiplier, terms.value),
        (p_w, p_a, a_w, a_a, a_w * p_w + a_a * p_a), rtol=1e-4)
    self.assertEqual(int(terms.active_weight_constraints), 2)
    self.assertEqual(int(terms.active_activation_constraints), 1)

  def test_power_two(self):
    terms = penalty_lib.bitwidth_penalty(
        jnp.array([3.0, 1.0]), jnp.zeros((0,)), weight_bits=2,
        activation_bits=2, power=2.0)
    # One active weight constraint, none for activations: a_w = 1.
    chex.assert_trees_all_close(terms.value, 1.001**2 / 2, rtol=1e-5)

  def test_empty_vectors_give_zero_without_nan(self):
    empty = jnp.zeros((0,), jnp.float32)
    fn = lambda w, a: penalty_lib.bitwidth_penalty(
        w, a, weight_bits=2, activation_bits=2).value
    value, grads = jax.value_and_grad(fn, argnums=(0, 1))(empty, empty)
    self.assertEqual(float(value), 0.0)
    self.assertEqual([g.shape for g in grads], [(0,), (0,)])

  @parameterized.parameters(32, 64.0)
  def test_unconstrained_activations(self, activation_bits):
    terms = penalty_lib.bitwidth_penalty(
        jnp.array([3.0]), jnp.array([20.0]), weight_bits=2,
        activation_bits=activation_bits)
    self.assertEqual(float(terms.activation_penalty), 0.0)
    self.assertEqual(int(terms.active_activation_constraints), 0)
    chex.assert_trees_all_close(terms.weight_multiplier, 1.0)
    chex.assert_trees_all_close(terms.value, 3.0 - 1.999, rtol=1e-5)


class ExteriorPointPenaltyTest(parameterized.TestCase):

  def _tx(self, **kwargs):
    config = dict(weight_bits=2, activation_bits=2, warmup_steps=0,
                  t_increment=1.0)
    config.update(kwargs)
    return penalty_lib.exterior_point_penalty(
        bitwidths.differentiable_bitwidths, **config)

  @chex.variants(with_jit=True, without_jit=True)
  def test_feasible_params_leave_updates_unchanged(self):
    params = _params(log2_step_w=(-1.0, -0.5), log2_range_a=-0.1)  # all < 2
    updates = jax.tree.map(lambda p: jnp.full_like(p, 0.37), params)
    tx = self._tx()
    new_updates, state = self.variant(
        lambda u, s, p: tx.update(u, s, p, value=2.0))(
            updates, _penalty_state(3, 6.0), params)
    chex.assert_trees_all_equal(new_updates, updates)
    self.assertEqual(float(state.penalty), 0.0)
    self.assertEqual(int(state.active_weight_constraints), 0)
    self.assertEqual(int(state.active_activation_constraints), 0)
    self.assertGreater(float(state.penalty_weight * state.mean_task_loss), 0)

  @chex.variants(with_jit=True, without_jit=True)
  def test_value_gradient_and_descent_direction(self):
    params = _params()  # beta_w = (1, log2 5), beta_a = 3; targets 2
    zeros = jax.tree.map(jnp.zeros_like, params)
    tx = self._tx()
    # 3 steps done, warmup 0, t_increment 1: t = 3, Lbar = 6 / 4 = 1.5.
    added, state = self.variant(
        lambda u, s, p: tx.update(u, s, p, value=2.0))(
            zeros, _penalty_state(3, 6.0), params)
    a = (1 + EPS) / (2 + EPS)  # a_w = a_a: one active constraint each
    p_w, p_a = (math.log2(5) - 1.999) / 2, 3 - 1.999
    value = a * (p_w + p_a)
    scale = 3 * 1.5
    ln2 = math.log(2)
    # beta_c = log2(R_c + 2^l_c) - l_c: d/dl = -R/(R+s) = -0.8,
    # d/dmax = -d/dmin = 1/((R+s) ln2), R = 2, s = 0.5; the mean halves it.
    d_range = a / 2 / (2.5 * ln2)
    expected = {
        "layer": {
            "kernel": scale * jnp.array([[0.0, -d_range], [0.0, d_range]]),
            "log2_step": scale * jnp.array([0.0, -0.8 * a / 2]),
            "input_quantizer": {
                "log2_step": scale * jnp.float32(-a),
                "log2_range": scale * jnp.float32(a),
                "clamp_low": jnp.float32(0.0),
            },
        }
    }
    chex.assert_trees_all_close(added, expected, rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(
        (state.penalty, state.weighted_penalty, state.penalty_weight,
         state.mean_task_loss), (value, scale * value, 3.0, 1.5), rtol=1e-5)
    # Descent (params - added): raises weight log2_step, shrinks the channel
    # range, lowers log2_range and raises the activation log2_step.
    layer = jax.tree.map(lambda p, u: p - u, params, added)["layer"]
    self.assertGreater(float(layer["log2_step"][1]), -1.0)
    self.assertLess(float(layer["kernel"][1, 1]), 3.0)
    self.assertGreater(float(layer["kernel"][0, 1]), 1.0)
    self.assertLess(float(layer["input_quantizer"]["log2_range"]), 1.0)
    self.assertGreater(float(layer["input_quantizer"]["log2_step"]), -2.0)

  def test_none_is_not_a_width_target(self):
    with self.assertRaisesRegex(ValueError, r"activation_bits=None .*Pass 32"):
      penalty_lib.bitwidth_penalty(
          jnp.array([3.0]), jnp.array([20.0]), weight_bits=2,
          activation_bits=None)

  @parameterized.parameters(32, 64.0)
  def test_unconstrained_activations_get_no_gradient(self, activation_bits):
    params = _params(log2_range_a=10.0)  # beta_a = 12, far over 2 bits
    tx = self._tx(activation_bits=activation_bits)
    zeros = jax.tree.map(jnp.zeros_like, params)
    added, state = tx.update(zeros, _penalty_state(3, 6.0), params, value=1.0)
    chex.assert_trees_all_equal(
        added["layer"]["input_quantizer"],
        jax.tree.map(jnp.zeros_like, params["layer"]["input_quantizer"]))
    self.assertEqual(int(state.active_activation_constraints), 0)
    # a_w = (1 + eps) / (1 + eps) = 1; only channel 1 is over budget.
    chex.assert_trees_all_close(
        state.penalty, (math.log2(5) - 1.999) / 2, rtol=1e-5)
    self.assertLess(float(added["layer"]["log2_step"][1]), 0.0)

  @chex.variants(with_jit=True, without_jit=True)
  def test_schedule_of_t_and_running_loss(self):
    tx = self._tx(warmup_steps=2, t_increment=0.5)
    params = _params()
    grads = jax.tree.map(jnp.zeros_like, params)
    update = self.variant(lambda u, s, p, v: tx.update(u, s, p, value=v))
    state = tx.init(params)
    ts, lbars = [], []
    for loss in [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]:
      _, state = update(grads, state, params, jnp.float32(loss))
      ts.append(state.penalty_weight)
      lbars.append(state.mean_task_loss)
    # t at step k+1 = 0.5 * max(0, k - 2); Lbar = (sum of k losses) / (k+1).
    chex.assert_trees_all_close(
        (jnp.stack(ts), jnp.stack(lbars)),
        (jnp.array([0, 0, 0, 0.5, 1.0, 1.5]),
         jnp.array([0, 1 / 2, 3 / 3, 6 / 4, 10 / 5, 15 / 6])), rtol=1e-6)
    self.assertEqual(int(state.count), 6)
    chex.assert_trees_all_close(state.loss_sum / (state.count + 1), 21 / 7)

  def test_non_finite_loss_propagates_to_running_mean(self):
    tx = self._tx()
    params = _params()
    grads = jax.tree.map(jnp.zeros_like, params)
    _, state = tx.update(grads, tx.init(params), params, value=jnp.nan)
    updates, state = tx.update(grads, state, params, value=1.0)
    self.assertTrue(np.isnan(float(state.mean_task_loss)))
    self.assertTrue(np.isnan(float(updates["layer"]["log2_step"][1])))

  def test_missing_value_or_params_raises(self):
    params = _params()
    tx = self._tx()
    state = tx.init(params)
    with self.assertRaisesRegex(ValueError, "value=task_loss"):
      tx.update(params, state, params)
    with self.assertRaisesRegex(ValueError, "value=task_loss"):
      tx.update(params, state, None, value=1.0)
    with self.assertRaisesRegex(ValueError, "scalar task loss"):
      tx.update(params, state, params, value=jnp.ones((4,)))

  @parameterized.named_parameters(
      ("zero_weight_bits", dict(weight_bits=0)),
      ("negative_activation_bits", dict(activation_bits=-1)),
      ("negative_warmup", dict(warmup_steps=-1)),
      ("float_warmup", dict(warmup_steps=1.5)),
      ("negative_increment", dict(t_increment=-0.1)),
      ("nan_increment", dict(t_increment=float("nan"))),
      ("zero_epsilon", dict(epsilon=0.0)),
      ("small_power", dict(power=0.5)),
  )
  def test_invalid_hyperparameters_raise(self, override):
    name = next(iter(override))
    with self.assertRaisesRegex(ValueError, f"{name}="):
      self._tx(**override)


class GdnsqOptimizerTest(absltest.TestCase):

  def test_chain_under_jit_with_extra_args(self):
    params = _params()
    tx = penalty_lib.gdnsq_optimizer(
        bitwidths.differentiable_bitwidths, learning_rate=0.05,
        weight_bits=2, activation_bits=2, warmup_steps=1, gamma=0.5)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, opt_state, converged):
      grads = jax.tree.map(jnp.zeros_like, params)
      updates, opt_state = tx.update(
          grads, opt_state, params, value=jnp.float32(1.0),
          converged=converged)
      return (optax.apply_updates(params, updates), opt_state,
              penalty_lib.schedule_metrics(opt_state))

    opt_state = tx.init(params)
    history = []
    for _ in range(6):
      params, opt_state, metrics = step(params, opt_state, jnp.bool_(False))
      history.append(metrics)
    leaves = jax.tree.leaves(opt_state)
    self.assertTrue(all(isinstance(x, jax.Array) for x in leaves))
    # t_increment defaults to 2 * lr: t at step 6 = 0.1 * (5 - 1).
    chex.assert_trees_all_close(history[-1]["penalty/t"], 0.4, rtol=1e-6)
    chex.assert_trees_all_close(
        [h["optimizer/learning_rate"] for h in history],
        [0.0, 0.05, 0.05, 0.05, 0.05, 0.05], rtol=1e-6)
    # With zero task gradients, only the penalty moves the quantizers.
    layer = params["layer"]
    self.assertGreater(float(layer["log2_step"][1]), -1.0)
    self.assertLess(float(layer["input_quantizer"]["log2_range"]), 1.0)
    self.assertGreater(float(layer["input_quantizer"]["log2_step"]), -2.0)
    # Channel 0 (1 bit) is feasible: its log2_step never moves.
    self.assertEqual(float(layer["log2_step"][0]), -1.0)

  def test_flattened_optimizer_gives_the_same_updates(self):
    params = _params()
    grads = jax.tree.map(
        lambda p: jnp.sin(jnp.arange(p.size, dtype=jnp.float32) + 1.0
                          ).reshape(p.shape), params)
    results = []
    for flatten in (True, False):
      tx = penalty_lib.gdnsq_optimizer(
          bitwidths.differentiable_bitwidths, learning_rate=0.05,
          weight_bits=2, activation_bits=2, warmup_steps=1, gamma=0.5,
          flatten=flatten)
      p, state, seen = params, tx.init(params), None
      for _ in range(4):
        seen = bitwidths.differentiable_bitwidths(p)  # before this update
        updates, state = tx.update(grads, state, p, value=jnp.float32(0.7),
                                   converged=jnp.bool_(True))
        p = optax.apply_updates(p, updates)
      results.append((p, penalty_lib.schedule_metrics(state)))
    chex.assert_trees_all_close(results[0], results[1], rtol=1e-6, atol=0)
    # The penalty reports the largest differentiable widths it saw.
    metrics = results[0][1]
    chex.assert_trees_all_close(
        (metrics["penalty/max_weight_width"],
         metrics["penalty/max_activation_width"]),
        (jnp.max(seen[0]), jnp.max(seen[1])), rtol=1e-6)

  def test_schedule_metrics_needs_a_schedule_state(self):
    with self.assertRaisesRegex(ValueError, "gdnsq_optimizer"):
      penalty_lib.schedule_metrics(optax.sgd(0.1).init(jnp.zeros(())))


if __name__ == "__main__":
  absltest.main()
