"""The FP teacher: restore it from a checkpoint, or train it with the FP recipe.

docs/method.md D8: no pretrained teacher can be downloaded here, so either
``config.teacher.checkpoint`` names an orbax checkpoint of FP
``{params, batch_stats}``, or the program trains one first (AdamW, warmup +
cosine decay, label cross-entropy) and stores it under
``<workdir>/teacher/variables``, where later runs find and reuse it.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any, Optional

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import optax

from train import checkpointing
from train import data_loader
from train import evaluation
from train import input_pipeline
from train import loop
from train import preemption
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
    guard: Optional[preemption.PreemptionGuard] = None,
) -> Any:
  """Trains the FP model with labels; returns ``{params, batch_stats}``.

  The same loop as GDNSQ (:func:`train.loop.run_steps`, one sharded step)
  without validation or checkpoints; scalars are logged as ``teacher/*``.

  Raises:
    train.preemption.Preempted: ``guard`` stopped it (nothing is saved).
  """
  sample = jnp.zeros((1,) + tuple(dataset.image_shape), jnp.float32)
  variables = model.init(jax.random.key(config.seed), sample, train=False)
  tx = fp_optimizer(config)
  trainable = jax.tree.map(lambda _: True, variables["params"])
  state = steps.create_state(
      variables, tx, trainable, jax.random.key_data(
          jax.random.key(config.seed + 1)))
  train_step = loop.compile_train_step(
      steps.make_train_step(
          model, tx, steps.make_task_loss(steps.LABELS, 1.0),
          teacher_model=None, quantized=False),
      mesh)
  num_steps = config.teacher.num_steps
  bar = reporting.ProgressBar(num_steps, desc="teacher (FP)",
                              enabled=sharding.is_main_process())
  start = time.time()
  with data_loader.train_stream(config, dataset, mesh) as batches:
    loop_state, stopped = loop.run_steps(
        train_step, sharding.replicate(loop.LoopState.initial(state), mesh),
        batches, None, mesh=mesh, num_steps=num_steps,
        log_every=(config.train.log_every_steps,),
        log=functools.partial(reporting.log_scalars, writer, bar,
                              prefix="teacher/"),
        fix="The FP teacher diverged: lower config.teacher.learning_rate",
        guard=guard)
  bar.close()
  if stopped:
    raise preemption.Preempted(guard.stopped_at, None, "the FP teacher")
  logging.info("FP teacher: %d steps in %.1f s", num_steps,
               time.time() - start)
  state = loop_state.train
  variables = {"params": state.params}
  # A model without BatchNorm (the ViT) has no batch_stats: saving an empty
  # one would not restore into the tree of its model.init.
  if jax.tree_util.tree_leaves(state.batch_stats):
    variables["batch_stats"] = state.batch_stats
  return jax.device_get(variables)


def load_or_train_teacher(
    config: ml_collections.ConfigDict,
    workdir: str,
    model: Any,
    dataset: input_pipeline.Dataset,
    mesh: jax.sharding.Mesh,
    writer: reporting.MetricWriter,
    guard: Optional[preemption.PreemptionGuard] = None,
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
  variables = train_fp(config, model, dataset, mesh, writer, guard)
  checkpointing.save_variables(path, variables)  # every process (orbax)
  return variables, path


def evaluate_fp(model, variables, dataset, splits, config, mesh):
  """Evaluations of the FP model on each of ``splits`` (one compiled step)."""
  eval_step = jax.jit(steps.make_eval_step(model, quantized=False))
  variables = sharding.replicate(variables, mesh)
  return [
      evaluation.evaluate(
          eval_step, variables, dataset, split,
          global_batch_size=config.data.eval_batch_size, mesh=mesh,
          workers=data_loader.workers(config, dataset),
          prefetch=config.data.prefetch)
      for split in splits
  ]
