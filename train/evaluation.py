"""Evaluation passes and validation (docs/method.md D11).

:func:`evaluate`: accuracy, loss and true activation widths of one pass;
:func:`validate`: that pass plus the model's width summary and convergence.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import numpy as np

from gdnsq_jax import bitwidths
from train import data_loader
from train import input_pipeline
from train import steps


class EvalResult(NamedTuple):
  accuracy: float
  loss: float
  count: int
  activation_widths: dict[str, float]  # quantizer path -> true width (pass)
  code_stats: tuple[Any, ...] = ()  # per batch: sown code min / max (host)


def evaluate(
    eval_step: Callable[..., Any],
    variables: Any,
    dataset: input_pipeline.Dataset,
    split: str,
    *,
    global_batch_size: int,
    mesh: jax.sharding.Mesh,
    workers: int = 0,
    prefetch: int = 2,
) -> EvalResult:
  """One deterministic pass over ``split`` with the jitted ``eval_step``.

  Batches come from :func:`train.input_pipeline.eval_batches` on ``mesh``
  (``workers`` processes, ``prefetch`` batches placed ahead); its padding
  repeats a real example, which leaves activation code ranges unchanged.
  Activation widths follow docs/method.md D11: per quantizer, the codes of the
  whole pass (:func:`gdnsq_jax.bitwidths.true_activation_widths`).
  """
  totals = np.zeros(3)
  batch_stats = []
  for batch in input_pipeline.eval_batches(
      dataset, split, global_batch_size=global_batch_size, workers=workers,
      mesh=mesh, prefetch=prefetch):
    sums, stats = jax.device_get(eval_step(variables, batch))
    totals += (sums["correct"], sums["loss"], sums["count"])
    batch_stats.append(stats)
  count = max(int(totals[2]), 1)
  return EvalResult(float(totals[0] / count), float(totals[1] / count),
                    int(totals[2]),
                    bitwidths.true_activation_widths(batch_stats),
                    tuple(batch_stats))


class Validation(NamedTuple):
  """One validation pass with the widths it measured."""

  result: EvalResult
  summary: bitwidths.BitwidthSummary
  converged: bool


def validate(eval_step, state: steps.TrainState, dataset, split: str, *,
             config, mesh, fixed_weight_bits=None) -> Validation:
  """Evaluates ``state`` on ``split``; true widths and convergence.

  Args:
    eval_step: the jitted :func:`train.steps.make_eval_step`.
    state: the train state (replicated).
    dataset: the data.
    split: ``validation`` or ``test``.
    config: the run's config (batch size, width targets).
    mesh: the device mesh.
    fixed_weight_bits: cap of fixed-bit (LSQ) weight widths, or None.

  Returns:
    The evaluation, its :class:`BitwidthSummary` and whether it converged.
  """
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  result = evaluate(
      eval_step, variables, dataset, split,
      global_batch_size=config.data.eval_batch_size, mesh=mesh,
      workers=data_loader.workers(config, dataset),
      prefetch=config.data.prefetch)
  summary = bitwidths.summarize_bitwidths(
      jax.device_get(state.params),
      activation_widths=result.activation_widths,
      fixed_weight_bits=fixed_weight_bits)
  converged = bitwidths.is_converged(summary, config.quant.weight_bits,
                                     config.quant.activation_bits)
  return Validation(result, summary, converged)
