"""train/steps.py: the update in the raveled space equals the per-leaf one."""

from __future__ import annotations

from absl.testing import absltest
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from gdnsq_jax import bitwidths
from gdnsq_jax import layers
from gdnsq_jax import learning_rate
from gdnsq_jax import penalty
from train import steps


class _Net(nn.Module):

  @nn.compact
  def __call__(self, x, train=False):
    settings = layers.QuantSettings(weight_bits=2, activation_bits=2)
    x = layers.QuantDense(12, settings=settings, name="first")(x)
    x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
    x = layers.QuantDense(8, settings=settings, name="second")(nn.relu(x))
    return nn.Dense(4, name="head")(x)


class _Teacher(nn.Module):
  """An FP teacher with a Flax-style computation dtype."""

  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train=False):
    del train
    x = nn.relu(nn.Dense(12, dtype=self.dtype)(x))
    return nn.Dense(4, dtype=self.dtype)(x).astype(jnp.float32)


def _setup(flatten: bool):
  model = _Net()
  x = jax.random.normal(jax.random.key(0), (16, 6))
  variables = model.init(jax.random.key(1), x)
  tx = penalty.gdnsq_optimizer(
      bitwidths.differentiable_bitwidths, learning_rate=0.05, weight_bits=2,
      activation_bits=2, warmup_steps=0, gamma=0.99, t_increment=5.0,
      flatten=flatten)
  trainable = jax.tree.map(lambda _: jnp.asarray(True), variables["params"])
  trainable["second"]["log2_step"] = jnp.asarray(False)  # a frozen leaf
  state = steps.create_state(variables, tx, trainable,
                             jax.random.key_data(jax.random.key(2)))
  teacher = _Teacher().init(jax.random.key(3), x)
  batch = {"image": x,
           "label": jax.random.randint(jax.random.key(4), (16,), 0, 4)}
  return model, tx, state, batch, teacher


def _per_leaf_step(model, tx, task_loss, state, batch):
  """The step written leaf by leaf (the code before the raveled update)."""
  rngs = {layers.NOISE_RNG: jax.random.fold_in(state.rng, state.step)}

  def loss_fn(params):
    logits, new_vars = model.apply(
        {"params": params, "batch_stats": state.batch_stats}, batch["image"],
        train=True, rngs=rngs, mutable=["batch_stats"])
    return task_loss(logits, None, batch["label"]), new_vars

  (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grads = jax.tree.map(lambda g, m: jnp.where(m, g, 0.0), grads,
                       state.trainable)
  updates, _ = tx.update(grads, state.opt_state, state.params, value=loss,
                         converged=state.converged)
  updates = jax.tree.map(lambda u, m: jnp.where(m, u, 0.0), updates,
                         state.trainable)
  return optax.apply_updates(state.params, updates), optax.global_norm(grads)


class RaveledUpdateTest(absltest.TestCase):

  def test_raveled_update_equals_per_leaf_update(self):
    task_loss = steps.make_task_loss(steps.LABELS, 1.0)
    results = {}
    for flatten in (True, False):
      model, tx, state, batch, _ = _setup(flatten)
      step = jax.jit(steps.make_train_step(model, tx, task_loss))
      for _ in range(3):  # past the warmup: the penalty is on
        state, metrics = step(state, batch, None)
      results[flatten] = state
      expected, norm = jax.jit(_per_leaf_step, static_argnums=(0, 1, 2))(
          model, tx, task_loss, state, batch)
      new_state, metrics = step(state, batch, None)
      chex.assert_trees_all_close(new_state.params, expected, rtol=1e-6,
                                  atol=1e-7)
      chex.assert_trees_all_close(metrics["train/grad_norm"], norm,
                                  rtol=1e-6)
      # The frozen leaf did not move.
      chex.assert_trees_all_equal(new_state.params["second"]["log2_step"],
                                  state.params["second"]["log2_step"])
    # The optimizer on one raveled vector: the same values to float rounding.
    chex.assert_trees_all_close(results[True].params, results[False].params,
                                rtol=1e-5, atol=1e-6)

  def test_raveled_state_equals_optax_flatten_state(self):
    # Checkpoints written before the raveled update still restore.
    _, tx, state, _, _ = _setup(True)
    old = optax.chain(
        penalty.exterior_point_penalty(
            bitwidths.differentiable_bitwidths, weight_bits=2,
            activation_bits=2, warmup_steps=0, t_increment=5.0),
        optax.flatten(optax.chain(
            optax.scale_by_radam(),
            learning_rate.scale_by_annealed_learning_rate(
                0.05, warmup_steps=0, gamma=0.99))))
    chex.assert_trees_all_equal_shapes_and_dtypes(
        tx.init(state.params), old.init(state.params))
    self.assertEqual(jax.tree.structure(tx.init(state.params)),
                     jax.tree.structure(old.init(state.params)))


class TeacherDtypeTest(absltest.TestCase):

  def test_auto_is_bfloat16_on_accelerators_only(self):
    self.assertEqual(steps.teacher_compute_dtype("auto", "cpu"), jnp.float32)
    for backend in ("gpu", "tpu"):
      self.assertEqual(steps.teacher_compute_dtype("auto", backend),
                       jnp.bfloat16)
    self.assertEqual(steps.teacher_compute_dtype("bfloat16"), jnp.bfloat16)
    with self.assertRaisesRegex(ValueError, "float16.*choose one of"):
      steps.teacher_compute_dtype("float16")

  def test_bfloat16_teacher_forward_float32_divergence(self):
    model, tx, state, batch, teacher_variables = _setup(True)
    teacher = _Teacher()
    task_loss = steps.make_task_loss("jeffreys", 1.0)
    outputs = {}
    for dtype in ("float32", "bfloat16"):
      step = steps.make_train_step(model, tx, task_loss, teacher,
                                   teacher_dtype=dtype)
      jaxpr = str(jax.make_jaxpr(step)(state, batch, teacher_variables))
      self.assertEqual("bf16" in jaxpr, dtype == "bfloat16")
      _, metrics = jax.jit(step)(state, batch, teacher_variables)
      self.assertEqual(metrics["train/loss"].dtype, jnp.float32)
      outputs[dtype] = float(metrics["train/loss"])
    self.assertNotEqual(outputs["float32"], outputs["bfloat16"])
    self.assertAlmostEqual(outputs["float32"], outputs["bfloat16"],
                           delta=2e-2 * abs(outputs["float32"]))
    with self.assertRaisesRegex(ValueError, "'dtype'.*float32"):
      steps.make_train_step(model, tx, task_loss, _Net(),
                            teacher_dtype="bfloat16")


if __name__ == "__main__":
  absltest.main()
