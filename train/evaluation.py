"""Evaluation: accuracy, loss, true activation widths (docs/method.md D11)."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import numpy as np

from gdnsq_jax import bitwidths
from train import input_pipeline
from train import sharding


class EvalResult(NamedTuple):
  accuracy: float
  loss: float
  count: int
  activation_widths: dict[str, float]  # quantizer path -> true width (max)


def _fill_padding(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Replaces padded rows by a copy of a real row.

  Padded rows are excluded from accuracy by the mask, but activation code
  ranges are reduced over whole tensors; a duplicate of a real row leaves
  every min / max unchanged.
  """
  mask = batch["mask"]
  if mask.all() or not mask.any():
    return batch
  out = dict(batch)
  first = int(np.argmax(mask))
  out["image"] = np.where(mask[:, None, None, None], batch["image"],
                          batch["image"][first][None])
  return out


def evaluate(
    eval_step: Callable[..., Any],
    variables: Any,
    dataset: input_pipeline.Dataset,
    split: str,
    *,
    global_batch_size: int,
    mesh: jax.sharding.Mesh,
) -> EvalResult:
  """One deterministic pass over ``split`` with the jitted ``eval_step``.

  Activation widths follow docs/method.md D11: per quantizer, the codes of the
  whole pass (:func:`gdnsq_jax.bitwidths.true_activation_widths`).
  """
  totals = np.zeros(3)
  batch_stats = []
  for batch in input_pipeline.eval_batches(
      dataset, split, global_batch_size=global_batch_size):
    batch = sharding.host_to_global(_fill_padding(batch), mesh)
    sums, stats = jax.device_get(eval_step(variables, batch))
    totals += (sums["correct"], sums["loss"], sums["count"])
    batch_stats.append(stats)
  count = max(int(totals[2]), 1)
  return EvalResult(float(totals[0] / count), float(totals[1] / count),
                    int(totals[2]),
                    bitwidths.true_activation_widths(batch_stats))
