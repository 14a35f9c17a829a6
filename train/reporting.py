"""Console progress, TensorBoard scalars, history, bit-width tables and plots.

The loop's logs: :func:`log_scalars` (train metrics at log steps) and
:func:`log_validation` (validation scalars and a ``history.jsonl`` record).

Only process 0 writes anything; the other processes get no-op writers.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from gdnsq_jax import bitwidths
from train import evaluation


def write_json_atomic(path: str, obj: Any) -> None:
  """Writes JSON to ``path`` via a temporary file and an atomic rename."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp_", suffix=".json")
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(obj, f, indent=2, sort_keys=True)
      f.write("\n")
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


class MetricWriter:
  """TensorBoard scalars (tensorboardX) from process 0; no-op elsewhere."""

  def __init__(self, logdir: Optional[str]):
    self._writer = None
    if logdir:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

      self._writer = SummaryWriter(logdir, flush_secs=30)

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if self._writer is None:
      return
    for name, value in scalars.items():
      self._writer.add_scalar(name, float(value), step)

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()


class ProgressBar:
  """A one-line console progress bar: step, rate and a few metrics."""

  _SHOWN = (
      ("train/loss", "loss", "{:.4f}"),
      ("bits/weight_max", "Wb", "{:.2f}"),
      ("bits/activation_max", "Ab", "{:.2f}"),
      ("val/accuracy", "val", "{:.4f}"),
      ("penalty/t", "t", "{:.3g}"),
  )

  def __init__(self, total: int, initial: int = 0, desc: str = "train",
               enabled: bool = True):
    self._bar = None
    if enabled:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top

      self._bar = tqdm(
          total=total, initial=initial, desc=desc, dynamic_ncols=True,
          file=sys.stdout, mininterval=1.0,
      )
    self._last = initial
    self._shown: dict[str, str] = {}

  def update(self, step: int, metrics: Optional[Mapping[str, float]] = None):
    if self._bar is None:
      return
    for key, short, fmt in self._SHOWN:
      if metrics and key in metrics:
        self._shown[short] = fmt.format(float(metrics[key]))
    if metrics:
      self._bar.set_postfix(self._shown, refresh=False)
    self._bar.update(step - self._last)
    self._last = step

  def write(self, text: str) -> None:
    if self._bar is None:
      return
    self._bar.write(text)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


def log_scalars(writer: MetricWriter, bar: ProgressBar,
                step: int, metrics: dict[str, Any], prefix: str = "") -> None:
  """TensorBoard scalars (``train/x`` renamed ``<prefix>x``) and the bar."""
  if prefix:
    metrics_out = {prefix + k.split("/", 1)[1]: v for k, v in metrics.items()}
  else:
    metrics_out = metrics
  writer.write_scalars(step, metrics_out)
  bar.update(step, metrics)


def history_record(step: int, validation: evaluation.Validation
                   ) -> dict[str, Any]:
  """The ``history.jsonl`` record of a validation (widths, accuracy)."""
  summary = validation.summary
  return {
      "step": int(step),
      "weight_bits": {k: v[0] for k, v in summary.weight_layers.items()},
      "activation_bits": dict(summary.activation_layers),
      "accuracy": float(validation.result.accuracy),
      "converged": bool(validation.converged),
  }


def read_history(path: str, up_to_step: int) -> list[dict[str, Any]]:
  """The records of ``path`` up to ``up_to_step`` (a resumed run's past)."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  return [r for r in records if r["step"] <= up_to_step]


def log_validation(writer: MetricWriter, bar: ProgressBar, step: int,
                   validation: evaluation.Validation,
                   history_path: Optional[str]) -> dict[str, Any]:
  """Scalars, progress bar and (if a path) a ``history.jsonl`` line.

  Returns:
    The history record.
  """
  result, summary, converged = validation
  scalars = {
      "val/accuracy": result.accuracy, "val/loss": result.loss,
      "val/ns_accuracy": result.accuracy if converged else 0.0,
      "val/converged": float(converged),
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
  record = history_record(step, validation)
  if history_path:
    with open(history_path, "a") as f:
      f.write(json.dumps(record) + "\n")
  return record


def format_bitwidth_table(
    summary: bitwidths.BitwidthSummary,
    fp_layers: Sequence[str] = (),
    weight_target: Optional[float] = None,
    activation_target: Optional[float] = None,
) -> str:
  """A per-layer table of true weight / activation widths.

  Args:
    summary: the widths (:func:`gdnsq_jax.bitwidths.summarize_bitwidths`).
    fp_layers: layers left in floating point, listed as ``fp32``.
    weight_target: the weight target, named in the last line.
    activation_target: the activation target; not named when ``None`` or
      at least :data:`gdnsq_jax.bitwidths.FLOAT_BITS` (not quantized).

  Returns:
    The table, one line per layer and a model line.
  """
  rows = []
  layers = sorted(set(summary.weight_layers) | {
      p.rsplit("/input_quantizer", 1)[0] for p in summary.activation_layers
  })
  for layer in layers:
    w = summary.weight_layers.get(layer)
    a = summary.activation_layers.get(layer + "/input_quantizer")
    if a is None:
      a = summary.activation_layers.get(layer)
    rows.append((
        layer,
        "-" if w is None else f"{w[0]:.3f}",
        "-" if w is None else f"{w[1]:.3f}",
        "-" if a is None else f"{a:.3f}",
    ))
  for layer in fp_layers:
    rows.append((layer, "fp32", "fp32", "fp32"))
  header = ("layer", "W max", "W mean", "A")
  widths = [max(len(r[i]) for r in rows + [header]) for i in range(4)]
  fmt = "  ".join("{:<%d}" % w if i == 0 else "{:>%d}" % w
                  for i, w in enumerate(widths))
  lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
  lines += [fmt.format(*r) for r in rows]
  targets = ""
  if weight_target is not None:
    targets = f" (targets W{weight_target:g}"
    if activation_target is not None and not bitwidths.is_float(
        activation_target):
      targets += f" A{activation_target:g}"
    targets += ")"
  lines.append(
      f"model: W max {summary.weight_max:.3f} mean {summary.weight_mean:.3f}"
      f" | A max {summary.activation_max:.3f} mean "
      f"{summary.activation_mean:.3f}{targets}"
  )
  return "\n".join(lines)


def plot_bitwidth_dynamics(
    history: Sequence[Mapping[str, Any]],
    path: str,
    title: str = "",
) -> None:
  """Saves a PNG of per-layer weight/activation widths and accuracy vs step.

  Args:
    history: records with ``step``, ``weight_bits`` ({layer: max true
      width}), ``activation_bits`` ({quantizer: true width}) and ``accuracy``.
    path: output PNG path.
    title: figure title.
  """
  if not history:
    return
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
  except ImportError:  # a declared dependency; tolerate bare accelerator hosts
    print(f"matplotlib is not installed; {path} not written")
    return

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  steps = np.array([h["step"] for h in history])
  fig, axes = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
  for ax, key, label in (
      (axes[0], "weight_bits", "weight bits (layer max)"),
      (axes[1], "activation_bits", "activation bits"),
  ):
    names = sorted({n for h in history for n in h.get(key, {})})
    cmap = plt.get_cmap("viridis", max(len(names), 1))
    for i, name in enumerate(names):
      values = [h.get(key, {}).get(name, math.nan) for h in history]
      ax.plot(steps, values, color=cmap(i), lw=1.2, label=name)
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    if 0 < len(names) <= 12:
      ax.legend(fontsize=6, ncol=2)
  axes[2].plot(steps, [h.get("accuracy", math.nan) for h in history],
               color="k", marker=".", lw=1)
  axes[2].set_ylabel("validation accuracy")
  axes[2].set_xlabel("step")
  axes[2].grid(alpha=0.3)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=110)
  plt.close(fig)
  os.replace(tmp, path)


def code_commit() -> str | None:
  """The git commit of the running code (``+dirty`` with local changes).

  None outside a git checkout (an installed wheel): results then say
  "unknown commit" rather than a wrong one.
  """
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    run = lambda *args: subprocess.run(
        ("git", "-C", root) + args, capture_output=True, text=True,
        timeout=10, check=True).stdout.strip()
    commit = run("rev-parse", "--short=12", "HEAD")
    dirty = run("status", "--porcelain", "--untracked-files=no")
  except (OSError, subprocess.SubprocessError):
    return None
  return commit + ("+dirty" if dirty else "")
