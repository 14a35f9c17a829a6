"""The GDNSQ training loop: steps, validation, convergence, early stopping.

Convergence (method spec 8.3, Decision D11): right after each validation
pass, the model is converged when the max true weight width <= W and the max
true activation width over that whole pass <= A. The converged-gated
accuracy ``ns_accuracy`` is the validation accuracy when converged, else 0;
early stopping and the best checkpoint follow it, so pre-convergence
evaluations never count.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Optional

from absl import logging
import flax
import jax
import jax.numpy as jnp
import numpy as np

from gdnsq_jax import bitwidths
from train import checkpointing
from train import evaluation
from train import input_pipeline
from train import reporting
from train import sharding
from train import steps

_TOLERANCE = 1e-6  # log2 of an integer level count vs an integer target


@flax.struct.dataclass
class LoopState:
  """The train state plus the loop's own counters, checkpointed together."""

  train: steps.TrainState
  epoch: jax.Array  # data position: epoch of the next batch
  batch: jax.Array  # data position: batch index within that epoch
  best_accuracy: jax.Array  # best converged validation accuracy (-1: none)
  best_step: jax.Array
  bad_evals: jax.Array  # converged evaluations without improvement

  @classmethod
  def initial(cls, train: steps.TrainState) -> "LoopState":
    i = lambda v: jnp.asarray(v, jnp.int32)
    return cls(train=train, epoch=i(0), batch=i(0),
               best_accuracy=jnp.asarray(-1.0, jnp.float32),
               best_step=i(-1), bad_evals=i(0))


def is_converged(summary: bitwidths.BitwidthSummary, weight_bits: float,
                 activation_bits: Optional[float]) -> bool:
  ok = summary.weight_max <= weight_bits + _TOLERANCE
  if activation_bits is not None:
    ok = ok and summary.activation_max <= activation_bits + _TOLERANCE
  return bool(ok)


def _history_record(step, summary, accuracy, converged):
  return {
      "step": int(step),
      "weight_bits": {k: v[0] for k, v in summary.weight_layers.items()},
      "activation_bits": dict(summary.activation_layers),
      "accuracy": float(accuracy),
      "converged": bool(converged),
  }


def _read_history(path: str, up_to_step: int) -> list[dict[str, Any]]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  return [r for r in records if r["step"] <= up_to_step]


def fit(*, config, qmodel, teacher_model, teacher_variables, loop_state, tx,
        dataset, mesh, writer, checkpoints, best, workdir, activation_bits):
  """Trains until ``config.train.num_steps`` or early stopping.

  Returns:
    Results (accuracies of the selected model, widths, steps) and, under
    ``_summary``, its :class:`BitwidthSummary` on the test pass.
  """
  main = sharding.is_main_process()
  c = config.train
  weight_bits = config.quant.weight_bits
  # LSQ's fixed-bit weight quantizers clip their codes to 2^B levels.
  fixed_weight_bits = weight_bits if qmodel.settings.method == "lsq" else None
  repl = sharding.replicated(mesh)
  labels_only = config.distill.loss == steps.LABELS
  train_step = jax.jit(
      steps.make_train_step(
          qmodel, tx,
          steps.make_task_loss(config.distill.loss,
                               config.distill.temperature),
          teacher_model=None if labels_only else teacher_model),
      in_shardings=(repl, sharding.batch_sharding(mesh), repl),
      out_shardings=(repl, repl),
      donate_argnums=(0,))
  eval_step = jax.jit(steps.make_eval_step(qmodel))
  teacher_variables = sharding.replicate(teacher_variables, mesh)
  loop_state = sharding.replicate(loop_state, mesh)
  state = loop_state.train
  host = jax.device_get(loop_state.replace(train=None))
  step = int(jax.device_get(state.step))
  best_accuracy, best_step = float(host.best_accuracy), int(host.best_step)
  bad_evals = int(host.bad_evals)
  batches = input_pipeline.train_batches(
      dataset, global_batch_size=config.data.batch_size, seed=config.seed,
      position=(int(host.epoch), int(host.batch)))
  history_path = os.path.join(workdir, "history.jsonl")
  history = _read_history(history_path, step) if main else []
  method = qmodel.settings.method.upper()  # GDNSQ, or the LSQ baseline
  bar = reporting.ProgressBar(c.num_steps, initial=step, desc=method,
                              enabled=main)

  def current_loop_state():
    position = batches.position
    i = lambda v: np.asarray(v, np.int32)
    counters = sharding.replicate(
        (i(position.epoch), i(position.batch),
         np.asarray(best_accuracy, np.float32), i(best_step), i(bad_evals)),
        mesh)
    return LoopState(state, *counters)

  def validate():
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    result = evaluation.evaluate(
        eval_step, variables, dataset, "validation",
        global_batch_size=config.data.eval_batch_size, mesh=mesh)
    summary = bitwidths.summarize_bitwidths(
        jax.device_get(state.params),
        activation_widths=result.activation_widths,
        fixed_weight_bits=fixed_weight_bits)
    return result, summary

  early_stopped = False
  start = time.time()
  while step < c.num_steps:
    batch = sharding.host_to_global(next(batches), mesh)
    state, metrics = train_step(state, batch, teacher_variables)
    step += 1
    is_eval = step % c.eval_every_steps == 0 or step == c.num_steps
    if step % c.log_every_steps == 0 or is_eval:
      metrics = jax.device_get(metrics)
      bad = [k for k in ("train/loss", "train/grad_norm")
             if not np.isfinite(metrics[k])]
      if bad:
        last = checkpoints.latest_step()
        raise FloatingPointError(
            f"non-finite {' and '.join(bad)} ("
            + ", ".join(f"{k}={metrics[k]}" for k in bad)
            + f") at step {step}; last good checkpoint: "
            + (checkpoints.step_dir(last) if last is not None else "none")
            + ". Lower config.optim.learning_rate or check the data")
      writer.write_scalars(step, metrics)
      bar.update(step, metrics)
    if is_eval:
      result, summary = validate()
      converged = is_converged(summary, weight_bits, activation_bits)
      state = state.replace(converged=jax.device_put(
          jnp.asarray(converged), repl))
      ns_accuracy = result.accuracy if converged else 0.0
      scalars = {
          "val/accuracy": result.accuracy, "val/loss": result.loss,
          "val/ns_accuracy": ns_accuracy, "val/converged": float(converged),
          "bits/weight_max": summary.weight_max,
          "bits/weight_mean": summary.weight_mean,
          "bits/activation_max": summary.activation_max,
          "bits/activation_mean": summary.activation_mean,
      }
      scalars.update({f"bits_layer/weight/{k}": v[0]
                      for k, v in summary.weight_layers.items()})
      scalars.update({f"bits_layer/activation/{k}": v
                      for k, v in summary.activation_layers.items()})
      writer.write_scalars(step, scalars)
      bar.update(step, scalars)
      record = _history_record(step, summary, result.accuracy, converged)
      history.append(record)
      if main:
        with open(history_path, "a") as f:
          f.write(json.dumps(record) + "\n")
      if converged:
        if ns_accuracy > best_accuracy + c.early_stopping_min_delta:
          best_accuracy, best_step, bad_evals = ns_accuracy, step, 0
          best.save(step, current_loop_state())
        else:
          bad_evals += 1
      elif best_step >= 0:
        bad_evals += 1  # convergence lost after it was reached
      if best_step >= 0 and bad_evals >= c.early_stopping_patience:
        bar.write(f"early stopping at step {step}: no converged gain for "
                  f"{bad_evals} validations")
        early_stopped = True
    if step % c.checkpoint_every_steps == 0 or early_stopped:
      checkpoints.save(step, current_loop_state())
    if early_stopped:
      break
  if step == c.num_steps and checkpoints.latest_step() != step:
    checkpoints.save(step, current_loop_state())
  checkpoints.wait()
  bar.close()
  train_time = time.time() - start

  # Report the best converged model; if none converged, the final one.
  selected = "final"
  if best.latest_step() is not None:
    restored = best.restore(best.latest_step(), current_loop_state())
    state = sharding.replicate(restored.train, mesh)
    selected = f"best converged (step {best.latest_step()})"
  val, val_summary = validate()
  test = evaluation.evaluate(
      eval_step, {"params": state.params, "batch_stats": state.batch_stats},
      dataset, "test", global_batch_size=config.data.eval_batch_size,
      mesh=mesh)
  widths = {k: max(v, test.activation_widths.get(k, 0.0))
            for k, v in val.activation_widths.items()}
  summary = bitwidths.summarize_bitwidths(jax.device_get(state.params),
                                          activation_widths=widths,
                                          fixed_weight_bits=fixed_weight_bits)
  if main:
    reporting.plot_bitwidth_dynamics(
        history, os.path.join(workdir, "bitwidth_dynamics.png"),
        title=f"{method} W{weight_bits}A{activation_bits or 32} "
              f"({config.model.name}, {dataset.name})")
  return {
      "quantized_validation_accuracy": val.accuracy,
      "quantized_test_accuracy": test.accuracy,
      "converged": is_converged(summary, weight_bits, activation_bits),
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
