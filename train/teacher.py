"""The FP teacher: restore it from a checkpoint, or train it with the FP recipe.

docs/method.md D8: no pretrained teacher can be downloaded here, so either
``config.teacher.checkpoint`` names an orbax checkpoint of FP
``{params, batch_stats}``, or the program trains one first (AdamW, warmup +
cosine decay, label cross-entropy) and stores it under
``<workdir>/teacher/variables``, where later runs find and reuse it.

That training is resumable like GDNSQ's: its loop state (train state and
data position, :class:`train.loop.LoopState`) is saved under
``<workdir>/teacher_state/<step>`` every ``config.train.checkpoint_every_steps``
steps and at a preemption; the rerun of the same command continues from the
latest one, bit-identically, and deletes them once the teacher is saved.
"""

from __future__ import annotations

import functools
import os
import shutil
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
TEACHER_STATE_SUBDIR = "teacher_state"
"""The FP teacher's resumable loop states while it trains (then deleted)."""


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


def initial_loop_state(config: ml_collections.ConfigDict, model: Any,
                       image_shape: tuple[int, ...], tx: Any
                       ) -> loop.LoopState:
  """The FP loop state at step 0 (``model.init`` of ``config.seed``)."""
  sample = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  variables = model.init(jax.random.key(config.seed), sample, train=False)
  trainable = jax.tree.map(lambda _: jnp.asarray(True), variables["params"])
  return loop.LoopState.initial(steps.create_state(
      variables, tx, trainable, jax.random.key_data(
          jax.random.key(config.seed + 1))))


def _checkpoint_every(every: int, num_steps: int,
                      checkpoints: checkpointing.StateCheckpointer,
                      batches: data_loader.TrainStream,
                      mesh: jax.sharding.Mesh, step: int,
                      loop_state: loop.LoopState
                      ) -> tuple[loop.LoopState, bool]:
  """``after_step`` of the teacher: the periodic checkpoint, never a stop.

  The last step is not saved here: its variables are saved as the teacher.
  """
  if step % every == 0 and step < num_steps:
    checkpoints.save(step, loop.with_data_position(loop_state,
                                                   batches.position, mesh))
  return loop_state, False


def train_fp(
    config: ml_collections.ConfigDict,
    workdir: str,
    model: Any,
    dataset: input_pipeline.Dataset,
    mesh: jax.sharding.Mesh,
    writer: reporting.MetricWriter,
    guard: Optional[preemption.PreemptionGuard] = None,
) -> Any:
  """Trains the FP model with labels; returns ``{params, batch_stats}``.

  The same loop as GDNSQ (:func:`train.loop.run_steps`, one sharded step)
  without validation; scalars are logged as ``teacher/*``. The loop state
  is checkpointed to ``<workdir>/teacher_state`` every
  ``config.train.checkpoint_every_steps`` steps and when ``guard`` stops
  it; a call with such a checkpoint continues from the latest one exactly.

  Raises:
    train.preemption.Preempted: ``guard`` stopped it, after the checkpoint
      of that step.
    train.checkpointing.CheckpointError: the latest teacher checkpoint does
      not fit the model (written by a different config).
    ValueError: ``config.train.checkpoint_every_steps`` is not positive.
  """
  every = config.train.checkpoint_every_steps
  if every <= 0:
    raise ValueError(
        f"config.train.checkpoint_every_steps={every} must be positive: the "
        "FP teacher and GDNSQ save their train state every that many steps")
  tx = fp_optimizer(config)
  train_step = loop.compile_train_step(
      steps.make_train_step(
          model, tx, steps.make_task_loss(steps.LABELS, 1.0),
          teacher_model=None, quantized=False),
      mesh)
  num_steps = config.teacher.num_steps
  checkpoints = checkpointing.StateCheckpointer(
      os.path.join(workdir, TEACHER_STATE_SUBDIR),
      max_to_keep=config.train.max_checkpoints_to_keep)
  try:
    initial = functools.partial(initial_loop_state, config, model,
                                dataset.image_shape, tx)
    loop_state = checkpoints.restore_latest(
        functools.partial(jax.eval_shape, initial))
    if loop_state is None:
      loop_state = initial()
    loop_state = sharding.replicate(loop_state, mesh)
    first, epoch, batch = (int(v) for v in jax.device_get(
        (loop_state.train.step, loop_state.epoch, loop_state.batch)))
    bar = reporting.ProgressBar(num_steps, initial=first, desc="teacher (FP)",
                                enabled=sharding.is_main_process())
    start = time.time()
    with data_loader.train_stream(config, dataset, mesh,
                                  (epoch, batch)) as batches:
      loop_state, stopped = loop.run_steps(
          train_step, loop_state, batches, None, mesh=mesh,
          num_steps=num_steps, log_every=(config.train.log_every_steps,),
          log=functools.partial(reporting.log_scalars, writer, bar,
                                prefix="teacher/"),
          fix="The FP teacher diverged: lower config.teacher.learning_rate",
          checkpoints=checkpoints,
          after_step=functools.partial(_checkpoint_every, every, num_steps,
                                       checkpoints, batches, mesh),
          guard=guard)
      step = int(jax.device_get(loop_state.train.step))
      if stopped:
        checkpoints.save_if_new(step, loop.with_data_position(
            loop_state, batches.position, mesh))
    checkpoints.wait()
    bar.close()
  finally:
    checkpoints.close()
  if stopped:
    raise preemption.Preempted(step, checkpoints.step_dir(step),
                               "the FP teacher")
  logging.info("FP teacher: steps %d to %d in %.1f s", first, num_steps,
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
  earlier run, else train with the FP recipe (resuming from
  ``<workdir>/teacher_state`` if an earlier run was stopped) and save there;
  then the train-state checkpoints are deleted.
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
  variables = train_fp(config, workdir, model, dataset, mesh, writer, guard)
  checkpointing.save_variables(path, variables)  # every process (orbax)
  if sharding.is_main_process():  # the teacher is saved: no resume needed
    shutil.rmtree(os.path.join(workdir, TEACHER_STATE_SUBDIR),
                  ignore_errors=True)
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
