"""Evaluation passes: accuracy, loss and true activation widths (D11)."""

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


def _collect_code_ranges(stats: Any, into: dict[str, list[float]]) -> None:
  """Folds sown ``code_min`` / ``code_max`` of a batch into running extrema."""
  flat = jax.tree_util.tree_flatten_with_path(stats)[0]
  for path, value in flat:
    keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
    keys = [k for k in keys if not k.isdigit()]
    name = keys[-1]
    if name not in ("code_min", "code_max"):
      continue
    quantizer = "/".join(keys[:-1])
    lo_hi = into.setdefault(quantizer, [np.inf, -np.inf])
    v = np.asarray(value)
    if name == "code_min":
      lo_hi[0] = min(lo_hi[0], float(v.min()))
    else:
      lo_hi[1] = max(lo_hi[1], float(v.max()))


def evaluate(
    eval_step: Callable[..., Any],
    variables: Any,
    dataset: input_pipeline.Dataset,
    split: str,
    *,
    global_batch_size: int,
    mesh: jax.sharding.Mesh,
) -> EvalResult:
  """One deterministic pass over ``split`` with the jitted ``eval_step``."""
  totals = np.zeros(3)
  ranges: dict[str, list[float]] = {}
  for batch in input_pipeline.eval_batches(
      dataset, split, global_batch_size=global_batch_size):
    batch = sharding.host_to_global(_fill_padding(batch), mesh)
    sums, stats = eval_step(variables, batch)
    sums = jax.device_get(sums)
    totals += (sums["correct"], sums["loss"], sums["count"])
    _collect_code_ranges(jax.device_get(stats), ranges)
  count = max(int(totals[2]), 1)
  widths = {
      q: float(bitwidths.true_bitwidth_from_codes(lo, hi))
      for q, (lo, hi) in ranges.items() if np.isfinite(lo) and np.isfinite(hi)
  }
  return EvalResult(float(totals[0] / count), float(totals[1] / count),
                    int(totals[2]), widths)
