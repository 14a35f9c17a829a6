"""Train-step throughput of FP and GDNSQ steps with XLA's and the fast conv.

Prints one row per (model, configuration): the median wall time of one
jitted train step on random data (batch of CIFAR-shaped 32x32x3 images for
ResNet-20, 28x28x1 for the digits ResNet), images per second, the median
process CPU time of a step (steadier than wall time when other processes
share the CPU), XLA's count of the step's floating-point operations (GFLOP),
the speed-up over ``fp-xla`` and, for GDNSQ rows, the GDNSQ
step-time ratios against the FP step (``/fp``) and against the FP
distillation step (``/distill``), both with the same conv, by wall and by CPU
time. The goal check adds the two steps' FLOP ratio: the floor of a
compute-bound step's time ratio. Configurations run interleaved
(A B C A B C ...) after their warm-up, in one process.

Configurations (``--configs``): the names of
:data:`bench.step_configs.CONFIGS` (``fp-xla``, ``fp-fast``, ``fp-distill``,
``w2a2-fast``, ...), described there. ``/distill`` compares a GDNSQ step
with the FP distillation step of the same teacher and conv, so it isolates
the cost of the quantizers.

Run from the repository root with the package importable::

  python -m bench.speed --models digits_resnet,resnet20 --repeats 10
  PYTHONPATH=. python bench/speed.py --help
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import jax

from bench import step_configs
from train import cpu_conv as fast_conv
from train import host_memory

DEFAULT_CONFIGS = ("fp-xla", "fp-fast", "fp-distill", "w2a2-fast")
GOAL_RATIOS = {"fp": 1.15, "distill": 1.05}
"""Targets of the GDNSQ step-time ratio to the plain FP step and to the FP
distillation step (issue 14)."""


def _timed(run: step_configs.StepRun) -> tuple[float, float]:
  """(wall, process CPU) seconds of one step."""
  cpu, wall = time.process_time(), time.perf_counter()
  run()
  return time.perf_counter() - wall, time.process_time() - cpu


def benchmark(model_name: str, configs, batch_size: int, repeats: int,
              warmup: int) -> list[dict[str, Any]]:
  """Interleaved timings of ``configs`` for one model; one dict per config."""
  variables, batch = step_configs.random_inputs(model_name, batch_size)
  runs, flops = {}, {}
  for name in configs:
    runs[name] = step_configs.StepRun(
        step_configs.build_step(name, model_name, variables, batch))
    flops[name] = runs[name].flops()
    for _ in range(warmup + 1):  # the first call compiles
      _timed(runs[name])
  times = {name: [] for name in configs}
  for _ in range(repeats):
    for name in configs:
      times[name].append(_timed(runs[name]))
  rows = []
  for name in configs:
    wall = statistics.median(t[0] for t in times[name])
    cpu = statistics.median(t[1] for t in times[name])
    rows.append({"model": model_name, "config": name, "wall_s": wall,
                 "cpu_s": cpu, "images_per_s": batch_size / wall,
                 "gflop": flops[name] / 1e9 if flops[name] else None,
                 "host_is_device": jax.default_backend() == "cpu"})
  by_name = {r["config"]: r for r in rows}
  for row in rows:
    base = by_name.get("fp-xla")
    row["speedup"] = base["wall_s"] / row["wall_s"] if base else None
    kind, conv = step_configs.CONFIGS[row["config"]]
    references = {
        "fp": step_configs.config_name("fp", conv),
        "distill": step_configs.config_name(
            step_configs.distill_kind(kind), conv),
    }
    for label, ref in references.items():
      for i, clock in enumerate(("wall", "cpu")):
        ratio = spread = None
        if kind in step_configs.QUANT_KINDS and ref in times:
          ratio, spread = paired_ratio(
              [t[i] for t in times[row["config"]]], [t[i] for t in times[ref]])
        row[f"over_{label}_{clock}"] = ratio
        row[f"over_{label}_{clock}_spread"] = spread
      work = None
      if kind in step_configs.QUANT_KINDS and flops.get(ref) and flops[row["config"]]:
        work = flops[row["config"]] / flops[ref]
      row[f"over_{label}_flops"] = work
  return rows


def paired_ratio(times, reference) -> tuple[float, tuple[float, float]]:
  """Median and quartiles of the per-round ratios ``times / reference``.

  Round ``r`` of two interleaved configurations ran seconds apart, so the
  ratio of that round's times cancels most of the load that other processes
  put on a shared machine; the quartiles say how much remains.
  """
  ratios = sorted(t / r for t, r in zip(times, reference))
  if len(ratios) < 2:
    return ratios[0], (ratios[0], ratios[0])
  q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
  return statistics.median(ratios), (q1, q3)


def format_table(rows) -> str:
  """A fixed-width table of :func:`benchmark` rows, then the goal check.

  ``/fp`` and ``/distill`` are the GDNSQ step time over the FP and the FP
  distillation step time (same conv), by wall and by CPU time: the median
  of the per-round ratios (:func:`paired_ratio`), with their quartiles in
  the goal check; that check calls a ratio met when both clocks are within
  :data:`GOAL_RATIOS` (on an accelerator: the wall clock), and gives the
  ratio of the two steps' FLOPs (``GFLOP``: XLA's count, :meth:`StepRun.flops`)
  as the floor a compute-bound step's time ratio cannot go below.
  """
  header = (f"{'model':<14} {'config':<16} {'step ms':>8} {'img/s':>6} "
            f"{'cpu ms':>7} {'GFLOP':>6} {'vs fp-xla':>9} {'/fp':>5} {'/distill':>8} "
            f"{'/fp cpu':>7} {'/distill cpu':>12}")
  lines = [header, "-" * len(header)]
  fmt = lambda v, f: format(v, f) if v is not None else "-"
  for r in rows:
    lines.append(
        f"{r['model']:<14} {r['config']:<16} {r['wall_s'] * 1e3:>8.1f} "
        f"{r['images_per_s']:>6.0f} {r['cpu_s'] * 1e3:>7.1f} "
        f"{fmt(r.get('gflop'), '.2f'):>6} {fmt(r['speedup'], '.2f'):>9} "
        f"{fmt(r['over_fp_wall'], '.2f'):>5} "
        f"{fmt(r['over_distill_wall'], '.2f'):>8} "
        f"{fmt(r['over_fp_cpu'], '.2f'):>7} "
        f"{fmt(r['over_distill_cpu'], '.2f'):>12}")
  for r in rows:
    for label in ("fp", "distill"):
      wall, cpu = r[f"over_{label}_wall"], r[f"over_{label}_cpu"]
      if wall is None:
        continue
      # On an accelerator the host CPU time only measures waiting.
      judged = max(wall, cpu) if r.get("host_is_device", True) else wall
      goal = GOAL_RATIOS[label]
      met = "met" if judged <= goal else "not met"
      (w1, w3), (c1, c3) = (r[f"over_{label}_wall_spread"],
                            r[f"over_{label}_cpu_spread"])
      work = r.get(f"over_{label}_flops")
      work = f"; FLOPs {work:.2f}x" if work else ""
      lines.append(
          f"{r['model']} {r['config']} / {label}: {wall:.2f} wall "
          f"[{w1:.2f}-{w3:.2f}], {cpu:.2f} cpu [{c1:.2f}-{c3:.2f}] "
          f"(goal <= {goal}: {met}{work})")
  return "\n".join(lines)


def comma_separated_names(text: str, allowed) -> tuple[str, ...]:
  """argparse type: ``'a,b'`` -> ``('a', 'b')``, each one of ``allowed``."""
  names = tuple(n for n in text.split(",") if n)
  unknown = [n for n in names if n not in allowed]
  if unknown or not names:
    raise argparse.ArgumentTypeError(
        f"unknown or no names {unknown or text!r}; choose from: "
        f"{', '.join(allowed)} (comma-separated)")
  return names


def main(argv=None) -> None:
  kept = host_memory.keep_freed_memory()  # as train.main does
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", default="digits_resnet,resnet20",
                      type=lambda s: comma_separated_names(
                          s, tuple(step_configs.IMAGE_SHAPES)),
                      help="comma-separated models (default: %(default)s)")
  parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                      type=lambda s: comma_separated_names(
                          s, tuple(step_configs.CONFIGS)),
                      help="comma-separated, from "
                      f"{', '.join(step_configs.CONFIGS)} "
                      "(default: %(default)s)")
  parser.add_argument("--batch", type=int, default=128,
                      help="images per step (default: %(default)s)")
  parser.add_argument("--repeats", type=int, default=10,
                      help="timed steps per config (default: %(default)s)")
  parser.add_argument("--warmup", type=int, default=2,
                      help="untimed steps after compiling (default: "
                      "%(default)s)")
  args = parser.parse_args(argv)
  print(f"backend {jax.default_backend()}, {jax.devices()[0].device_kind}, "
        f"fast conv enabled: {fast_conv.fast_conv_enabled()}, freed host "
        f"memory kept (train.host_memory): {kept}; batch "
        f"{args.batch}, median of {args.repeats} interleaved steps; ratios: "
        "median [quartiles] of the per-round ratios", flush=True)
  rows = []
  for model_name in args.models:
    rows += benchmark(model_name, args.configs, args.batch, args.repeats,
                      args.warmup)
    print(format_table(rows[-len(args.configs):]), flush=True)
  if len(args.models) > 1:
    print("\n" + format_table(rows))


if __name__ == "__main__":
  main()
