"""The training loop, as parts: one step runner, validation, model selection.

:func:`run_steps` is the loop shared by the FP teacher and GDNSQ: batches
-> the jitted, sharded train step (:func:`compile_train_step`) -> at log
steps one host read of the metrics, one non-finite check and the logs -> an
``after_step`` hook (validation, model selection, checkpoints). :func:`fit`
is GDNSQ's use of it; validation is :func:`train.evaluation.validate`, its
logs :func:`train.reporting.log_validation`.

Convergence (docs/method.md §8.3, D11): right after each validation
pass, the model is converged when the max true weight width <= W and the max
true activation width over that whole pass <= A
(:func:`gdnsq_jax.bitwidths.is_converged`). Model selection and early
stopping follow the converged validation accuracy only
(:class:`train.early_stopping.EarlyStopping`, kept in the checkpointed
:class:`LoopState`).
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any, Callable, Iterator, NamedTuple, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from gdnsq_jax import bitwidths
from train import checkpointing
from train import data_loader
from train import evaluation
from train import input_pipeline
from train import preemption
from train import reporting
from train import sharding
from train import steps
from train.early_stopping import EarlyStopping

# Metrics every train step returns and the host checks at log steps.
FINITE_METRICS = ("train/loss", "train/grad_norm")


@flax.struct.dataclass
class LoopState:
  """The train state plus the loop's own state, checkpointed together."""

  train: steps.TrainState
  epoch: jax.Array  # data position: epoch of the next batch
  batch: jax.Array  # data position: batch index within that epoch
  early_stopping: EarlyStopping  # converged-gated model selection

  @classmethod
  def initial(cls, train: steps.TrainState,
              early_stopping: Optional[EarlyStopping] = None) -> "LoopState":
    """The state of a fresh run (data at its start, no best model yet)."""
    i = lambda v: jnp.asarray(v, jnp.int32)
    return cls(train=train, epoch=i(0), batch=i(0),
               early_stopping=(EarlyStopping.create() if early_stopping is None
                               else early_stopping))


def compile_train_step(step_fn: Callable[..., Any], mesh: jax.sharding.Mesh):
  """``jax.jit`` of ``step_fn(state, batch, teacher_variables)`` on ``mesh``.

  State and teacher replicated, the batch split over the data axis, the
  input state donated: the one compiled step of a training run.
  """
  repl = sharding.replicated(mesh)
  return jax.jit(step_fn,
                 in_shardings=(repl, sharding.batch_sharding(mesh), repl),
                 out_shardings=(repl, repl), donate_argnums=(0,))


def check_finite(metrics: dict[str, Any], step: int, *, fix: str,
                 checkpoints: Optional[checkpointing.StateCheckpointer] = None
                 ) -> None:
  """Raises ``FloatingPointError`` if a :data:`FINITE_METRICS` value is not.

  Args:
    metrics: host metrics of ``step``.
    step: the step they belong to.
    fix: what to change, ending the message ("Lower config.x").
    checkpoints: where the last good checkpoint would be (None: none).
  """
  bad = [k for k in FINITE_METRICS if k in metrics
         and not np.isfinite(metrics[k])]
  if not bad:
    return
  last = None if checkpoints is None else checkpoints.latest_step()
  raise FloatingPointError(
      f"non-finite {' and '.join(bad)} ("
      + ", ".join(f"{k}={metrics[k]}" for k in bad)
      + f") at step {step}; last good checkpoint: "
      + ("none" if last is None else checkpoints.step_dir(last))
      + f". {fix}")


def run_steps(
    train_step: Callable[..., Any],
    loop_state: LoopState,
    batches: Iterator[dict[str, np.ndarray]],
    teacher_variables: Any,
    *,
    mesh: jax.sharding.Mesh,
    num_steps: int,
    log_every: Sequence[int],
    log: Callable[[int, dict[str, Any]], None],
    fix: str,
    checkpoints: Optional[checkpointing.StateCheckpointer] = None,
    after_step: Optional[Callable[[int, LoopState],
                                  tuple[LoopState, bool]]] = None,
    guard: Optional[preemption.PreemptionGuard] = None,
) -> tuple[LoopState, bool]:
  """Runs ``train_step`` from ``loop_state.train.step`` to ``num_steps``.

  Args:
    train_step: from :func:`compile_train_step`.
    loop_state: replicated on ``mesh``.
    batches: global batches on ``mesh`` (:mod:`train.data_loader`: read
      and placed while the previous step runs); host numpy batches are
      placed by the jitted step (one process only).
    teacher_variables: the step's third argument (replicated, or None).
    mesh: the device mesh.
    num_steps: the step to stop at.
    log_every: log after step ``k`` when one of these divides ``k``, and
      after the last step; the metrics are read to the host only then.
    log: ``(step, host metrics)``, called after the non-finite check.
    fix: the advice ending the non-finite error.
    checkpoints: named by the non-finite error as the last good one.
    after_step: ``(step, loop_state) -> (loop_state, stop)`` after every
      step and its log: validation, model selection, checkpoints.
    guard: asked after every step whether to stop for a preemption (then
      ``guard.stopped_at`` is the step; the caller saves).

  Returns:
    The final loop state and whether ``after_step`` or ``guard`` stopped
    the run early.

  Raises:
    FloatingPointError: a logged loss or gradient norm is not finite.
  """
  step = int(jax.device_get(loop_state.train.step))
  while step < num_steps:
    state, metrics = train_step(loop_state.train, next(batches),
                                teacher_variables)
    loop_state = loop_state.replace(train=state)
    step += 1
    if step == num_steps or any(step % n == 0 for n in log_every):
      metrics = jax.device_get(metrics)
      check_finite(metrics, step, fix=fix, checkpoints=checkpoints)
      log(step, metrics)
    if after_step is not None:
      loop_state, stop = after_step(step, loop_state)
      if stop:
        return loop_state, True
    if guard is not None and guard.reached(step):
      return loop_state, True
  return loop_state, False


def with_data_position(loop_state: LoopState,
                       position: input_pipeline.DataPosition,
                       mesh: jax.sharding.Mesh) -> LoopState:
  """``loop_state`` with the data position of the next batch (to save it)."""
  epoch, batch = sharding.replicate(
      (np.asarray(position.epoch, np.int32),
       np.asarray(position.batch, np.int32)), mesh)
  return loop_state.replace(epoch=epoch, batch=batch)


class _Run(NamedTuple):
  """What GDNSQ's ``after_step`` reads (see :func:`_after_gdnsq_step`)."""

  config: Any
  eval_step: Callable[..., Any]
  update_stopping: Callable[..., EarlyStopping]
  dataset: input_pipeline.Dataset
  mesh: jax.sharding.Mesh
  writer: reporting.MetricWriter
  bar: reporting.ProgressBar
  batches: Any  # the train iterator (its position is checkpointed)
  checkpoints: checkpointing.StateCheckpointer
  best: checkpointing.StateCheckpointer
  history: list[dict[str, Any]]
  history_path: Optional[str]  # None on processes other than 0
  fixed_weight_bits: Optional[float]


def _after_gdnsq_step(run: _Run, step: int, loop_state: LoopState
                      ) -> tuple[LoopState, bool]:
  """Validation, model selection, early stopping and checkpoints of a step."""
  c = run.config.train
  stop = False
  if step % c.eval_every_steps == 0 or step == c.num_steps:
    v = evaluation.validate(
        run.eval_step, loop_state.train, run.dataset, "validation",
        config=run.config, mesh=run.mesh,
        fixed_weight_bits=run.fixed_weight_bits)
    run.history.append(reporting.log_validation(
        run.writer, run.bar, step, v, run.history_path))
    es = run.update_stopping(loop_state.early_stopping, v.result.accuracy,
                             step, v.converged)
    converged = jax.device_put(jnp.asarray(v.converged),
                               sharding.replicated(run.mesh))
    loop_state = loop_state.replace(
        train=loop_state.train.replace(converged=converged),
        early_stopping=es)
    if bool(es.has_improved):
      run.best.save(step, with_data_position(loop_state,
                                             run.batches.position, run.mesh))
    if bool(es.should_stop):
      run.bar.write(f"early stopping at step {step}: no converged gain for "
                    f"{int(es.patience_count)} validations")
      stop = True
  if step % c.checkpoint_every_steps == 0 or stop:
    run.checkpoints.save(step, with_data_position(loop_state,
                                                  run.batches.position,
                                                  run.mesh))
  return loop_state, stop


def select_model(best: checkpointing.StateCheckpointer,
                 loop_state: LoopState, mesh: jax.sharding.Mesh
                 ) -> tuple[steps.TrainState, str]:
  """The best converged train state if one was saved, else the final one.

  Returns:
    The replicated train state and how it was selected (for results.json).
  """
  step = best.latest_step()
  if step is None:
    return loop_state.train, "final"
  restored = best.restore(step, loop_state)
  return (sharding.replicate(restored.train, mesh),
          f"best converged (step {step})")


def evaluate_selected(eval_step, state: steps.TrainState, dataset, *,
                      config, mesh, fixed_weight_bits=None):
  """Validation and test of the selected model and their joint widths.

  Returns:
    ``(validation, test, summary)``: the two
    :class:`train.evaluation.Validation` passes and the
    :class:`BitwidthSummary` whose activation widths are those of the codes
    of both passes together (docs/method.md D11; the export's rule).
  """
  val, test = (
      evaluation.validate(eval_step, state, dataset, split, config=config,
                          mesh=mesh, fixed_weight_bits=fixed_weight_bits)
      for split in ("validation", "test"))
  widths = bitwidths.true_activation_widths(
      val.result.code_stats + test.result.code_stats)
  summary = bitwidths.summarize_bitwidths(jax.device_get(state.params),
                                          activation_widths=widths,
                                          fixed_weight_bits=fixed_weight_bits)
  return val, test, summary


def fit(*, config, qmodel, teacher_model, teacher_variables, loop_state, tx,
        dataset, mesh, writer, checkpoints, best, workdir, guard=None):
  """GDNSQ (or LSQ) training until ``config.train.num_steps`` or early stop.

  :func:`run_steps` with :func:`_after_gdnsq_step`, a final checkpoint, then
  :func:`select_model` and :func:`evaluate_selected`.

  Args:
    config: the run's config.
    qmodel: the quantized model; ``teacher_model`` / ``teacher_variables``
      the FP teacher (unused when ``config.distill.loss`` is labels).
    loop_state: where to start (fresh, or restored from ``checkpoints``).
    tx: the optimizer the state was built with.
    dataset: the data.
    mesh: the device mesh.
    writer: TensorBoard scalars.
    checkpoints: the latest states; ``best`` the best converged one.
    workdir: for ``history.jsonl`` and ``bitwidth_dynamics.png``.
    guard: a :class:`train.preemption.PreemptionGuard`, or None.

  Returns:
    Results (accuracies of the selected model, widths, steps) and, under
    ``_summary``, its :class:`BitwidthSummary` on the test pass.

  Raises:
    train.preemption.Preempted: after the checkpoint of the step at which
      ``guard`` stopped the run.
  """
  main = sharding.is_main_process()
  c = config.train
  weight_bits = config.quant.weight_bits
  activation_bits = config.quant.activation_bits
  # Fixed-bit weight quantizers (LSQ) clip their codes to 2^B levels.
  fixed_weight_bits, _ = qmodel.settings.family.fixed_widths(qmodel.settings)
  labels_only = config.distill.loss == steps.LABELS
  train_step = compile_train_step(
      steps.make_train_step(
          qmodel, tx,
          steps.make_task_loss(config.distill.loss,
                               config.distill.temperature),
          teacher_model=None if labels_only else teacher_model,
          teacher_dtype=config.teacher.dtype),
      mesh)
  eval_step = jax.jit(steps.make_eval_step(qmodel))
  teacher_variables = sharding.replicate(teacher_variables, mesh)
  loop_state = sharding.replicate(loop_state, mesh)
  host = jax.device_get((loop_state.train.step, loop_state.epoch,
                         loop_state.batch))
  step = int(host[0])
  batches = data_loader.train_stream(config, dataset, mesh,
                                     (int(host[1]), int(host[2])))
  history_path = os.path.join(workdir, "history.jsonl")
  method = qmodel.settings.method.upper()  # GDNSQ, or the LSQ baseline
  bar = reporting.ProgressBar(c.num_steps, initial=step, desc=method,
                              enabled=main)
  run = _Run(
      config=config, eval_step=eval_step,
      update_stopping=jax.jit(EarlyStopping.update,
                              out_shardings=sharding.replicated(mesh)),
      dataset=dataset, mesh=mesh, writer=writer, bar=bar, batches=batches,
      checkpoints=checkpoints, best=best,
      history=reporting.read_history(history_path, step) if main else [],
      history_path=history_path if main else None,
      fixed_weight_bits=fixed_weight_bits)
  start = time.time()
  with batches:
    loop_state, early_stopped = run_steps(
        train_step, loop_state, batches, teacher_variables, mesh=mesh,
        num_steps=c.num_steps,
        log_every=(c.log_every_steps, c.eval_every_steps),
        log=functools.partial(reporting.log_scalars, writer, bar),
        fix="Lower config.optim.learning_rate or check the data",
        checkpoints=checkpoints,
        after_step=functools.partial(_after_gdnsq_step, run), guard=guard)
    step = int(jax.device_get(loop_state.train.step))
    loop_state = with_data_position(loop_state, batches.position, mesh)
  preempted = guard is not None and guard.stopped_at == step
  if step == c.num_steps or preempted:
    checkpoints.save_if_new(step, loop_state)
  checkpoints.wait()
  bar.close()
  if preempted:
    raise preemption.Preempted(step, checkpoints.step_dir(step))
  train_time = time.time() - start

  state, selected = select_model(best, loop_state, mesh)
  val, test, summary = evaluate_selected(
      eval_step, state, dataset, config=config, mesh=mesh,
      fixed_weight_bits=fixed_weight_bits)
  if main:
    reporting.plot_bitwidth_dynamics(
        run.history, os.path.join(workdir, "bitwidth_dynamics.png"),
        title=f"{method} W{weight_bits}A{activation_bits} "
              f"({config.model.name}, {dataset.name})")
  return {
      "quantized_validation_accuracy": val.result.accuracy,
      "quantized_test_accuracy": test.result.accuracy,
      "converged": bitwidths.is_converged(summary, weight_bits,
                                          activation_bits),
      "selected_model": selected,
      "weight_bits_target": weight_bits,
      "activation_bits_target": activation_bits,
      "true_weight_bits_max": summary.weight_max,
      "true_weight_bits_mean": summary.weight_mean,
      "true_activation_bits_max": summary.activation_max,
      "true_activation_bits_mean": summary.activation_mean,
      "steps": step,
      "early_stopped": early_stopped,
      "train_time_s": train_time,
      "_summary": summary,
  }
