"""The train steps the benchmarks run: configurations, builders, compiled runs.

One definition of each step that ``bench.speed``, ``bench.profile_step`` and
``bench.input_pipeline`` measure. A configuration name (:data:`CONFIGS`)
names a step kind and a conv:

* ``fp``: the plain FP step: label cross-entropy, SGD with momentum.
* ``fp-distill`` (and ``-tf32`` / ``-tbf16``): everything the GDNSQ step does
  except quantization: the FP student distils from the same FP teacher
  forward with the ``configs/w2a2.py`` loss (Jeffreys) and the same
  optimizer chain (penalty transformation, which finds no quantizer, RAdam,
  annealed LR).
* ``w2a2`` and its variants (:data:`QUANT_KINDS`): the GDNSQ W2A2 step of the
  training program (``train.steps.make_train_step`` with the
  ``configs/w2a2.py`` settings, rules, optimizer and distillation loss; FP
  teacher with the same conv, in ``teacher.dtype``).
* convs (:data:`CONVS`): ``xla`` = ``lax.conv_general_dilated``, ``fast`` =
  :mod:`train.cpu_conv` ``auto``, ``matmul`` = its shifted-window matmuls for
  every pass.

The builders return a :class:`TrainStep` (the step function and its
arguments); :class:`StepRun` compiles one as the program does. The state of
the GDNSQ steps is not calibrated (initial steps and ranges): the step's
work does not depend on the values.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from configs import w2a2
from gdnsq_jax import interception
from train import cpu_conv as fast_conv
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
IMAGE_SHAPES = {"digits_resnet": (28, 28, 1), "resnet20": (32, 32, 3),
                "resnet18": (224, 224, 3)}
W2A2_PRESETS = {"digits_resnet": None, "resnet20": "cifar10",
                "resnet18": "imagenet"}

def _all_true(params):
  return jax.tree.map(lambda _: jnp.asarray(True), params)


@dataclasses.dataclass(frozen=True)
class TrainStep:
  """A train step function and the arguments the program calls it with.

  ``step_fn(state, batch, teacher_variables) -> (state, metrics)``, as
  ``train.steps.make_train_step`` returns it; ``teacher_variables`` is None
  for the plain FP step.
  """

  step_fn: Callable[..., Any]
  state: Any
  batch: dict[str, jax.Array]
  teacher_variables: Any


class StepRun:
  """One compiled train step, called as the training program calls it.

  Compiled by :func:`train.loop.compile_train_step` on a one-device mesh,
  so the input state is donated (no copy of the state's buffers into the
  outputs); each call feeds the step's new state to the next one. Lowered
  once and compiled once, on first use: the calls, :meth:`flops` and
  :meth:`compiled_text` share both.
  """

  def __init__(self, step: TrainStep):
    mesh = sharding.make_mesh(jax.devices()[:1])
    self._jitted = loop.compile_train_step(step.step_fn, mesh)
    # The state's own buffers: donating them must not delete arrays it
    # shares with the teacher variables or with another configuration.
    self.args = [jax.tree.map(jnp.copy, step.state), step.batch,
                 step.teacher_variables]

  @functools.cached_property
  def _lowered(self):
    return self._jitted.lower(*self.args)

  @functools.cached_property
  def _compiled(self):
    return self._lowered.compile()

  def __call__(self):
    """Runs one step and waits for it; returns its metrics."""
    self.args[0], metrics = self._compiled(*self.args)
    return jax.block_until_ready(metrics)

  def compiled_text(self) -> str:
    """The optimized HLO of the step."""
    return self._compiled.as_text()

  def flops(self) -> float | None:
    """XLA's count of the step's floating-point operations, or None.

    From the cost analysis of the step as lowered (before XLA's
    optimizations, so every convolution, matmul and elementwise op counts
    once, whatever the backend later fuses); None where the backend gives
    no count.
    """
    analysis = self._lowered.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one per device
      analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def make_fp_step(model, variables, batch) -> TrainStep:
  """FP training on labels, SGD + momentum."""
  tx = optax.with_extra_args_support(optax.sgd(0.05, momentum=0.9))
  state = steps.create_state(variables, tx, _all_true(variables["params"]),
                             jax.random.key_data(jax.random.key(1)))
  step = steps.make_train_step(
      model, tx, steps.make_task_loss(steps.LABELS, 1.0), quantized=False)
  return TrainStep(step, state, batch, None)


def make_distill_step(model, variables, batch, config) -> TrainStep:
  """``config``'s GDNSQ step without its quantizers.

  The FP student distils from the FP teacher with ``config``'s loss and
  optimizer chain; the bit-width penalty finds no quantizer in the FP params,
  so it adds nothing but its (empty) bookkeeping.
  """
  return _distilling_step(model, variables, model, variables, batch, config)


def _distilling_step(student, student_variables, teacher, teacher_variables,
                     batch, config) -> TrainStep:
  """``student`` distilling from ``teacher`` with ``config``'s loss and
  optimizer, as ``train_lib.quantize`` builds them."""
  tx = train_lib.make_optimizer(config, config.quant.activation_bits)
  state = steps.create_state(
      student_variables, tx, _all_true(student_variables["params"]),
      jax.random.key_data(jax.random.key(2)))
  step = steps.make_train_step(
      student, tx,
      steps.make_task_loss(config.distill.loss, config.distill.temperature),
      teacher_model=teacher, teacher_dtype=config.teacher.dtype)
  return TrainStep(step, state, batch, teacher_variables)


def make_gdnsq_step(model, variables, batch, config) -> TrainStep:
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
  return _distilling_step(qmodel, qvariables, model, variables, batch, config)


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


def distill_kind(kind: str) -> str:
  """The FP distillation kind a quantized ``kind`` is compared with."""
  for distill in DISTILL_KINDS:
    suffix = distill[len("fp-distill"):]
    if suffix and kind.endswith(suffix):
      return distill
  return "fp-distill"


def build_step(name: str, model_name: str, variables, batch) -> TrainStep:
  """The step of configuration ``name`` for ``model_name``."""
  kind, conv = CONFIGS[name]
  model = models.get_model(model_name, 10, conv_general_dilated=CONVS[conv])
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


def random_inputs(model_name: str, batch_size: int):
  """(FP variables, random batch ``{'image', 'label'}``) for ``model_name``."""
  rng = np.random.default_rng(0)
  shape = (batch_size,) + IMAGE_SHAPES[model_name]
  batch = {"image": jnp.asarray(rng.standard_normal(shape), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 10, batch_size), jnp.int32)}
  plain = models.get_model(model_name, 10)
  variables = plain.init(jax.random.key(0), batch["image"][:1], train=False)
  return variables, batch


def config_name(kind: str, conv: str) -> str | None:
  """The configuration of ``kind`` with ``conv``, or None if there is none."""
  for name, value in CONFIGS.items():
    if value == (kind, conv):
      return name
  return None
