"""Accuracy of GDNSQ variants on the embedded digits, from one FP teacher.

Prints a table (mean and spread over seeds) of test accuracy, true final
widths, convergence, steps and wall time, and writes it as JSON. Every run
uses the same FP teacher and the same step budget (``--steps``).

  python bench/accuracy.py --out runs/bench_accuracy --seeds 0 1
  python bench/accuracy.py --variants w2a2 oneshot_w2a2 --seeds 0

Variants:
  w4a4 w3a3 w2a2 w1a1 w1a32   GDNSQ (gradual penalty, Jeffreys distillation)
  oneshot_w2a2 oneshot_w1a1  calibrate straight to the target, no descent
  labels_w2a2 labels_w1a1    GDNSQ without distillation (label loss)
  aewgs_w1a1                 AEWGS weight estimator at W1A1 (ste = w1a1)
Not a unit test: a run takes minutes on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from configs import base
from train import teacher as teacher_lib
from train import train_lib

# name -> (weight bits, activation bits, overrides {dotted key: value})
VARIANTS = {
    "w4a4": (4, 4, {}),
    "w3a3": (3, 3, {}),
    "w2a2": (2, 2, {}),
    "w1a1": (1, 1, {}),
    "w1a32": (1, 32, {}),
    "oneshot_w2a2": (2, 2, {"quant.gradual": False}),
    "oneshot_w1a1": (1, 1, {"quant.gradual": False}),
    "labels_w2a2": (2, 2, {"distill.loss": "labels"}),
    "labels_w1a1": (1, 1, {"distill.loss": "labels"}),
    "aewgs_w1a1": (1, 1, {"quant.estimator": "aewgs"}),
}


def _set(config, dotted, value):
  node = config
  *parents, leaf = dotted.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value


def run_variant(name, seed, out, teacher, steps):
  w, a, overrides = VARIANTS[name]
  config = base.get_config("digits", weight_bits=w, activation_bits=a)
  config.seed = seed
  config.teacher.checkpoint = teacher
  if steps:
    config.train.num_steps = steps
  for k, v in overrides.items():
    _set(config, k, v)
  workdir = os.path.join(out, f"{name}_seed{seed}")
  start = time.time()
  results = train_lib.train_and_evaluate(config, workdir)
  results["bench_wall_time_s"] = time.time() - start
  return results


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="runs/bench_accuracy")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
  parser.add_argument("--variants", nargs="+", default=list(VARIANTS),
                      choices=list(VARIANTS))
  parser.add_argument("--steps", type=int, default=0,
                      help="optimizer steps per run (0: the config's)")
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)

  # One FP teacher for every run (the FP recipe, seed 0).
  fp_dir = os.path.join(args.out, "fp")
  fp = train_lib.train_and_evaluate(
      base.get_config("digits", weight_bits=32, activation_bits=32), fp_dir)
  teacher = os.path.join(fp_dir, teacher_lib.TEACHER_SUBDIR)
  rows = {"fp": [fp]}
  for name in args.variants:
    rows[name] = [run_variant(name, s, args.out, teacher, args.steps)
                  for s in args.seeds]
    with open(os.path.join(args.out, "results.json"), "w") as f:
      json.dump(rows, f, indent=2, default=str)

  header = (f"{'variant':<14} {'test acc % (mean +- sd)':>24} {'W bits':>7} "
            f"{'A bits':>7} {'conv.':>6} {'steps':>6} {'time s':>7}")
  print(header)
  print("-" * len(header))
  for name, runs in rows.items():
    key = "fp_test_accuracy" if name == "fp" else "quantized_test_accuracy"
    acc = 100 * np.array([r[key] for r in runs])
    wb = max(r.get("true_weight_bits_max", 32) for r in runs)
    ab = max(r.get("true_activation_bits_max", 32) for r in runs)
    conv = all(r.get("converged", True) for r in runs)
    steps = int(np.mean([r.get("steps", 0) for r in runs]))
    wall = np.mean([r.get("bench_wall_time_s", r["wall_time_s"])
                    for r in runs])
    print(f"{name:<14} {acc.mean():>15.2f} +- {acc.std():<5.2f} {wb:>7.3f} "
          f"{ab:>7.3f} {str(conv):>6} {steps:>6} {wall:>7.0f}")


if __name__ == "__main__":
  main()
