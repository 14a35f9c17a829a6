"""The FP teacher: restore it from a checkpoint, or train it with the FP recipe.

Decision D8: no pretrained teacher can be downloaded here, so either
``config.teacher.checkpoint`` names an orbax checkpoint of FP
``{params, batch_stats}``, or the program trains one first (AdamW, warmup +
cosine decay, label cross-entropy) and stores it under
``<workdir>/teacher/variables``, where later runs find and reuse it.
"""

from __future__ import annotations

import os
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import optax

from train import checkpointing
from train import evaluation
from train import input_pipeline
from train import reporting
from train import sharding
from train import steps

TEACHER_SUBDIR = os.path.join("teacher", "variables")


def abstract_variables(model: Any, image_shape: tuple[int, ...]) -> Any:
  """Shapes of the FP variables (``jax.eval_shape``, nothing allocated)."""
  sample = jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32)
  return jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False), sample)


def fp_optimizer(config: ml_collections.ConfigDict):
  t = config.teacher
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, t.learning_rate, max(t.warmup_steps, 1), max(t.num_steps, 2))
  return optax.with_extra_args_support(
      optax.adamw(schedule, weight_decay=t.weight_decay))


def train_fp(
    config: ml_collections.ConfigDict,
    model: Any,
    dataset: input_pipeline.Dataset,
    mesh: jax.sharding.Mesh,
    writer: reporting.MetricWriter,
) -> Any:
  """Trains the FP model with labels; returns ``{params, batch_stats}``."""
  sample = jnp.zeros((1,) + tuple(dataset.image_shape), jnp.float32)
  variables = model.init(jax.random.key(config.seed), sample, train=False)
  tx = fp_optimizer(config)
  trainable = jax.tree.map(lambda _: True, variables["params"])
  state = steps.create_state(
      variables, tx, trainable, jax.random.key_data(
          jax.random.key(config.seed + 1)))
  state = sharding.replicate(state, mesh)
  step_fn = jax.jit(
      steps.make_train_step(
          model, tx, steps.make_task_loss(steps.LABELS, 1.0),
          teacher_model=None, quantized=False),
      donate_argnums=(0,))
  batches = input_pipeline.train_batches(
      dataset, global_batch_size=config.data.batch_size, seed=config.seed)
  num_steps = config.teacher.num_steps
  bar = reporting.ProgressBar(num_steps, desc="teacher (FP)",
                              enabled=sharding.is_main_process())
  start = time.time()
  for step in range(1, num_steps + 1):
    batch = sharding.host_to_global(next(batches), mesh)
    state, metrics = step_fn(state, batch, None)
    if step % config.train.log_every_steps == 0 or step == num_steps:
      metrics = jax.device_get(metrics)
      if not jnp.isfinite(metrics["train/loss"]):
        raise FloatingPointError(
            f"FP teacher training diverged at step {step} (loss "
            f"{metrics['train/loss']}); lower config.teacher.learning_rate")
      writer.write_scalars(step, {"teacher/" + k.split("/", 1)[1]: v
                                  for k, v in metrics.items()})
      bar.update(step, metrics)
  bar.close()
  logging.info("FP teacher: %d steps in %.1f s", num_steps,
               time.time() - start)
  return jax.device_get(
      {"params": state.params, "batch_stats": state.batch_stats})


def load_or_train_teacher(
    config: ml_collections.ConfigDict,
    workdir: str,
    model: Any,
    dataset: input_pipeline.Dataset,
    mesh: jax.sharding.Mesh,
    writer: reporting.MetricWriter,
) -> tuple[Any, str]:
  """Returns (FP variables, where they came from).

  Order: ``config.teacher.checkpoint`` if set (an error if it is missing or
  does not fit the model), else ``<workdir>/teacher/variables`` from an
  earlier run, else train with the FP recipe and save there.
  """
  target = abstract_variables(model, dataset.image_shape)
  if config.teacher.checkpoint:
    path = config.teacher.checkpoint
    variables = checkpointing.restore_variables(
        path, target, what="teacher checkpoint (config.teacher.checkpoint)")
    return variables, os.path.abspath(path)
  path = os.path.join(workdir, TEACHER_SUBDIR)
  if os.path.isdir(path):
    return checkpointing.restore_variables(
        path, target, what="teacher checkpoint"), path
  variables = train_fp(config, model, dataset, mesh, writer)
  checkpointing.save_variables(path, variables)  # every process (orbax)
  return variables, path


def evaluate_fp(model, variables, dataset, splits, config, mesh):
  """Evaluations of the FP model on each of ``splits`` (one compiled step)."""
  eval_step = jax.jit(steps.make_eval_step(model, quantized=False))
  variables = sharding.replicate(variables, mesh)
  return [
      evaluation.evaluate(
          eval_step, variables, dataset, split,
          global_batch_size=config.data.eval_batch_size, mesh=mesh)
      for split in splits
  ]
