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

Configurations:

* ``fp-xla`` / ``fp-fast`` / ``fp-matmul``: label cross-entropy, SGD with
  momentum; conv = ``lax.conv_general_dilated`` / :mod:`train.cpu_conv`
  ``auto`` / shifted-window matmuls for every pass.
* ``fp-distill`` / ``fp-distill-xla``: everything the GDNSQ step does except
  quantization: the FP student distils from the same FP teacher forward with
  the ``configs/w2a2.py`` loss (Jeffreys) and the same optimizer chain
  (penalty transformation, which finds no quantizer, RAdam, annealed LR).
  ``/distill`` thus isolates the cost of the quantizers.
* ``w2a2-fast`` / ``w2a2-xla``: the GDNSQ W2A2 step of the training program
  (``train.steps.make_train_step`` with the ``configs/w2a2.py`` settings,
  rules, optimizer and distillation loss; FP teacher with the same conv, in
  ``teacher.dtype``: 'auto', bfloat16 on accelerators, float32 on a CPU).
* ``*-tf32*`` / ``*-tbf16*``: the same with the teacher forward in float32 /
  bfloat16, compared with the FP distillation step of the same teacher.

The state of the GDNSQ rows is not calibrated (initial steps and ranges);
the step's work does not depend on the values.

Run from the repository root with the package importable::

  python -m bench.speed --models digits_resnet,resnet20 --repeats 10
  PYTHONPATH=. python bench/speed.py --help
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
import dataclasses
import functools
import statistics
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from configs import w2a2
from gdnsq_jax import interception
from train import cpu_conv as fast_conv
from train import host_memory
from train import loop
from train import models
from train import sharding
from train import steps
from train import train_lib

CONVS: dict[str, Callable[..., jax.Array]] = {
    "xla": jax.lax.conv_general_dilated,
    "fast": fast_conv.conv_general_dilated,
    "matmul": functools.partial(fast_conv.conv_general_dilated,
                                algorithm="matmul"),
}
CONFIGS: dict[str, tuple[str, str]] = {
    "fp-xla": ("fp", "xla"),
    "fp-fast": ("fp", "fast"),
    "fp-matmul": ("fp", "matmul"),
    "fp-distill": ("fp-distill", "fast"),
    "fp-distill-xla": ("fp-distill", "xla"),
    "w2a2-xla": ("w2a2", "xla"),
    "w2a2-fast": ("w2a2", "fast"),
    # Diagnostics: only the weight / only the activation quantizers.
    "w2a32-xla": ("w2a32", "xla"),
    "w32a2-xla": ("w32a2", "xla"),
    "w2a32-fast": ("w2a32", "fast"),
    "w32a2-fast": ("w32a2", "fast"),
    # The optimizer per param instead of on one raveled vector.
    "w2a2-unflat-xla": ("w2a2-unflat", "xla"),
    "w2a2-unflat-fast": ("w2a2-unflat", "fast"),
    # The teacher forward in float32 / bfloat16 instead of teacher.dtype's
    # default ('auto': bfloat16 on accelerators, float32 on a CPU).
    "fp-distill-tf32-xla": ("fp-distill-tf32", "xla"),
    "w2a2-tf32-xla": ("w2a2-tf32", "xla"),
    "fp-distill-tbf16": ("fp-distill-tbf16", "fast"),
    "w2a2-tbf16-fast": ("w2a2-tbf16", "fast"),
}
"""Configuration name -> (step kind, conv name in :data:`CONVS`)."""
DEFAULT_CONFIGS = ("fp-xla", "fp-fast", "fp-distill", "w2a2-fast")
GOAL_RATIOS = {"fp": 1.15, "distill": 1.05}
"""Targets of the GDNSQ step-time ratio to the plain FP step and to the FP
distillation step (issue 14)."""
IMAGE_SHAPES = {"digits_resnet": (28, 28, 1), "resnet20": (32, 32, 3),
                "resnet18": (224, 224, 3)}
W2A2_PRESETS = {"digits_resnet": None, "resnet20": "cifar10",
                "resnet18": "imagenet"}


def _swap_conv(conv, next_fun, args, kwargs, context):
  """Interceptor: gives every ``nn.Conv`` without a conv function ``conv``.

  The bound module is a fresh object in each trace, so setting its field
  (bypassing the frozen dataclass) changes only this call.
  """
  module = context.module
  if (type(module) is nn.Conv and context.method_name == "__call__"
      and module.conv_general_dilated is None):
    object.__setattr__(module, "conv_general_dilated", conv)
  return next_fun(*args, **kwargs)


@dataclasses.dataclass(frozen=True)
class WithConv:
  """``model`` whose ``apply`` runs its ``nn.Conv`` layers with ``conv``.

  Used while ``train.models`` has no ``conv_general_dilated`` attribute;
  ``model_with_conv`` passes the attribute directly once it exists.
  """

  model: Any
  conv: Callable[..., jax.Array]

  def init(self, *args, **kwargs):
    return self.model.init(*args, **kwargs)

  def apply(self, *args, **kwargs):
    with nn.intercept_methods(functools.partial(_swap_conv, self.conv)):
      return self.model.apply(*args, **kwargs)


def model_with_conv(name: str, num_classes: int, conv) -> Any:
  """A ``train.models`` model whose convs call ``conv``."""
  fields = {f.name for f in dataclasses.fields(models.MODELS[name])}
  if "conv_general_dilated" in fields:
    return models.get_model(name, num_classes, conv_general_dilated=conv)
  return WithConv(models.get_model(name, num_classes), conv)


def _all_true(params):
  return jax.tree.map(lambda _: jnp.asarray(True), params)


class StepRun:
  """One compiled train step, called as the training program calls it.

  Compiled by :func:`train.loop.compile_train_step` on a one-device mesh,
  so the input state is donated (no copy of the state's buffers into the
  outputs); each call feeds the step's new state to the next one.
  """

  def __init__(self, step_fn, state, batch, teacher_variables):
    mesh = sharding.make_mesh(jax.devices()[:1])
    self.step = loop.compile_train_step(step_fn, mesh)
    # The state's own buffers: donating them must not delete arrays it
    # shares with the teacher variables or with another configuration.
    self.args = [jax.tree.map(jnp.copy, state), batch, teacher_variables]

  def __call__(self):
    """Runs one step and waits for it; returns its metrics."""
    self.args[0], metrics = self.step(*self.args)
    return jax.block_until_ready(metrics)

  def compiled_text(self) -> str:
    """The optimized HLO of the step."""
    return self.step.lower(*self.args).compile().as_text()

  def flops(self) -> float | None:
    """XLA's count of the step's floating-point operations, or None.

    From the cost analysis of the step as lowered (before XLA's
    optimizations, so every convolution, matmul and elementwise op counts
    once, whatever the backend later fuses); None where the backend gives
    no count.
    """
    analysis = self.step.lower(*self.args).cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one per device
      analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def make_fp_step(model, variables, batch) -> StepRun:
  """FP training on labels, SGD + momentum."""
  tx = optax.with_extra_args_support(optax.sgd(0.05, momentum=0.9))
  state = steps.create_state(variables, tx, _all_true(variables["params"]),
                             jax.random.key_data(jax.random.key(1)))
  step = steps.make_train_step(
      model, tx, steps.make_task_loss(steps.LABELS, 1.0), quantized=False)
  return StepRun(step, state, batch, None)


def make_distill_step(model, variables, batch, config) -> StepRun:
  """``config``'s GDNSQ step without its quantizers.

  The FP student distils from the FP teacher with ``config``'s loss and
  optimizer chain; the bit-width penalty finds no quantizer in the FP params,
  so it adds nothing but its (empty) bookkeeping.
  """
  tx = train_lib.make_optimizer(config, config.quant.activation_bits)
  state = steps.create_state(variables, tx, _all_true(variables["params"]),
                             jax.random.key_data(jax.random.key(2)))
  step = steps.make_train_step(
      model, tx,
      steps.make_task_loss(config.distill.loss, config.distill.temperature),
      teacher_model=model, teacher_dtype=config.teacher.dtype)
  return StepRun(step, state, batch, variables)


def make_gdnsq_step(model, variables, batch, config) -> StepRun:
  """The GDNSQ step of ``config`` distilling from FP.

  Plug-in point for other quantized models: ``model`` is the FP model (used
  as the teacher and quantized by ``quantize_model``), ``variables`` its FP
  variables, ``batch`` ``{'image', 'label'}``.
  """
  settings = train_lib.quant_settings(config)
  sample = jax.ShapeDtypeStruct((1,) + batch["image"].shape[1:], jnp.float32)
  qmodel = interception.quantize_model(
      model, sample, settings=settings, rules=train_lib.quant_rules(config),
      train=False)
  abstract = jax.eval_shape(
      lambda x: qmodel.init(jax.random.key(0), x, train=False), sample)
  qvariables = interception.add_quantizer_params(variables, abstract)
  tx = train_lib.make_optimizer(config, config.quant.activation_bits)  # as train_lib.quantize
  state = steps.create_state(qvariables, tx, _all_true(qvariables["params"]),
                             jax.random.key_data(jax.random.key(2)))
  step = steps.make_train_step(
      qmodel, tx,
      steps.make_task_loss(config.distill.loss, config.distill.temperature),
      teacher_model=model, teacher_dtype=config.teacher.dtype)
  return StepRun(step, state, batch, variables)


# Quantized step kinds -> overrides of the configs/w2a2.py config.
QUANT_KINDS = {
    "w2a2": {},
    "w2a32": {"quant.activation_bits": 32},
    "w32a2": {"quant.weight_bits": 32},
    "w2a2-unflat": {"optim.flatten": False},
    "w2a2-tf32": {"teacher.dtype": "float32"},
    "w2a2-tbf16": {"teacher.dtype": "bfloat16"},
}
# FP distillation step kinds -> overrides; a quantized kind ending in one of
# their suffixes is compared with that distillation step.
DISTILL_KINDS = {
    "fp-distill": {},
    "fp-distill-tf32": {"teacher.dtype": "float32"},
    "fp-distill-tbf16": {"teacher.dtype": "bfloat16"},
}


def _distill_kind(kind: str) -> str:
  """The FP distillation kind a quantized ``kind`` is compared with."""
  for distill in DISTILL_KINDS:
    suffix = distill[len("fp-distill"):]
    if suffix and kind.endswith(suffix):
      return distill
  return "fp-distill"


def build_step(name: str, model_name: str, variables, batch) -> StepRun:
  """The step of configuration ``name`` for ``model_name``."""
  kind, conv = CONFIGS[name]
  model = model_with_conv(model_name, 10, CONVS[conv])
  config = w2a2.get_config(W2A2_PRESETS[model_name])
  if kind == "fp":
    return make_fp_step(model, variables, batch)
  overrides = {**DISTILL_KINDS, **QUANT_KINDS}[kind]
  for dotted, value in overrides.items():
    group, key = dotted.split(".")
    config[group][key] = value
  if kind in DISTILL_KINDS:
    return make_distill_step(model, variables, batch, config)
  return make_gdnsq_step(model, variables, batch, config)


def _timed(run: StepRun) -> tuple[float, float]:
  """(wall, process CPU) seconds of one step."""
  cpu, wall = time.process_time(), time.perf_counter()
  run()
  return time.perf_counter() - wall, time.process_time() - cpu


def random_inputs(model_name: str, batch_size: int):
  """(FP variables, random batch ``{'image', 'label'}``) for ``model_name``."""
  rng = np.random.default_rng(0)
  shape = (batch_size,) + IMAGE_SHAPES[model_name]
  batch = {"image": jnp.asarray(rng.standard_normal(shape), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 10, batch_size), jnp.int32)}
  plain = models.get_model(model_name, 10)
  variables = plain.init(jax.random.key(0), batch["image"][:1], train=False)
  return variables, batch


def benchmark(model_name: str, configs, batch_size: int, repeats: int,
              warmup: int) -> list[dict[str, Any]]:
  """Interleaved timings of ``configs`` for one model; one dict per config."""
  variables, batch = random_inputs(model_name, batch_size)
  runs, flops = {}, {}
  for name in configs:
    runs[name] = build_step(name, model_name, variables, batch)
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
    kind, conv = CONFIGS[row["config"]]
    references = {
        "fp": _config_name("fp", conv),
        "distill": _config_name(_distill_kind(kind), conv),
    }
    for label, ref in references.items():
      for i, clock in enumerate(("wall", "cpu")):
        ratio = spread = None
        if kind in QUANT_KINDS and ref in times:
          ratio, spread = paired_ratio(
              [t[i] for t in times[row["config"]]], [t[i] for t in times[ref]])
        row[f"over_{label}_{clock}"] = ratio
        row[f"over_{label}_{clock}_spread"] = spread
      work = None
      if kind in QUANT_KINDS and flops.get(ref) and flops[row["config"]]:
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


def _config_name(kind: str, conv: str) -> str | None:
  """The configuration of ``kind`` with ``conv``, or None if there is none."""
  for name, value in CONFIGS.items():
    if value == (kind, conv):
      return name
  return None


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
                          s, tuple(IMAGE_SHAPES)),
                      help="comma-separated models (default: %(default)s)")
  parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                      type=lambda s: comma_separated_names(s, tuple(CONFIGS)),
                      help=f"comma-separated, from {', '.join(CONFIGS)} "
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
