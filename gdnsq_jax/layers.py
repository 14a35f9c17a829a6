"""Flax Linen quantized layers (arXiv 2508.14004, docs/method.md §2, §5).

* :class:`QuantAct` -- a per-tensor activation quantizer (params
  ``log2_step``, ``log2_range``, ``clamp_low``; all scalars).
* :class:`QuantConv` / :class:`QuantDense` / :class:`QuantDenseGeneral` /
  :class:`QuantEinsum` -- the Flax layers whose kernel is fake-quantized
  (param ``log2_step``, per output channel or per tensor) and whose *input*
  passes an activation quantizer held in the child module
  ``input_quantizer`` (input-side placement, as the reference).
  :func:`apply_quantized_layer` does it for any bound layer of a kind in
  :data:`gdnsq_jax.layer_kinds.QUANTIZABLE`; placement
  (:mod:`gdnsq_jax.interception`) calls it on unmodified models.

This module is the Linen glue only: the numerics and the per-op core
(quantize kernel / input, statistics, calibration's observation mode) are
framework-agnostic functions of arrays and params in
:mod:`gdnsq_jax.quantized_ops` and :mod:`gdnsq_jax.families`, which an NNX
front end shares.

The params of a quantized conv are therefore::

    {'kernel': (kh, kw, in, out), 'bias': (out,)  # if use_bias
     'log2_step': (out,) or (),
     'input_quantizer': {'log2_step': (), 'log2_range': (), 'clamp_low': ()}}

Param names and their pre-calibration values are API, defined once in
:mod:`gdnsq_jax.quantizer_params`. A
*frozen* (pruned) activation quantizer has ``log2_step = log2_range = 0`` and
``clamp_low = c``: it outputs the constant c and its differentiable width is 0.

Randomness: the step-size dither draws from the Flax RNG stream
:data:`NOISE_RNG` (``'quant_noise'``) when the caller provides it
(``apply(..., rngs={'quant_noise': key})``); without it the backward has no
dither. The forward always rounds, so outputs never depend on the key.

No module keeps state: calibration statistics and true activation widths are
``sow``-n into the :data:`QUANT_STATS` collection, and only when the caller
marks it mutable (``apply(..., mutable=['quant_stats'])``) outside ``init``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from gdnsq_jax import layer_kinds
from gdnsq_jax import quantized_ops
from gdnsq_jax.dither import dither_key
from gdnsq_jax.dither import quantizer_id
from gdnsq_jax.quantized_ops import STAT_REDUCERS
from gdnsq_jax.quantizer_params import ACTIVATION_INIT
from gdnsq_jax.quantizer_params import ACTIVATION_KEYS
from gdnsq_jax.quantizer_params import INPUT_QUANTIZER
from gdnsq_jax.quantizer_params import WEIGHT_LOG2_STEP_INIT
from gdnsq_jax.settings import METHODS
from gdnsq_jax.settings import QuantSettings

__all__ = [
    "METHODS",
    "NOISE_RNG",
    "QUANT_STATS",
    "EXPLICIT_LAYERS",
    "QuantAct",
    "QuantConv",
    "QuantDense",
    "QuantDenseGeneral",
    "QuantEinsum",
    "QuantSettings",
    "STAT_REDUCERS",
    "apply_quantized_layer",
]

NOISE_RNG = "quant_noise"
"""Flax RNG stream of the step-size dither."""

QUANT_STATS = "quant_stats"
"""Collection into which :class:`QuantAct` sows input and code min / max."""

_QUANTIZER_PARAM_KEYS = ("log2_step", INPUT_QUANTIZER)


def _noise_key(module: nn.Module) -> Optional[jax.Array]:
  """This quantizer's dither key if the caller provided :data:`NOISE_RNG`.

  What ``module.make_rng`` would fold in (the module path and a call
  count) is hashed at trace time into a static id
  (:func:`gdnsq_jax.dither.quantizer_id`, shared with the NNX layers),
  and the caller's key
  (one per step) is xor-ed with it (:func:`gdnsq_jax.dither.dither_key`):
  no PRNG fold-in per quantizer; the backward hashes the element indices.
  """
  if not module.has_rng(NOISE_RNG):
    return None
  scope = module.scope
  stream = scope.rngs[NOISE_RNG]  # flax LazyRng: apply()'s key + the path
  scope.rng_counters[NOISE_RNG] += 1  # each call its own dither, as make_rng
  return dither_key(getattr(stream, "rng", stream), quantizer_id(
      tuple(getattr(stream, "suffix", ())), scope.rng_counters[NOISE_RNG]))


def _scalar_param(module: nn.Module, name: str, value: float) -> jax.Array:
  return module.param(name, nn.initializers.constant(value), (), jnp.float32)


class QuantAct(nn.Module):
  """Per-tensor activation quantizer ``s round((clip(x, b, b+q-s) - b)/s) + b``.

  ``s = 2**log2_step``, ``q = 2**log2_range``, ``b = clamp_low``
  (docs/method.md §2.2).
  With ``settings.activation_bits >= 32`` it is the identity and has no
  params. When :data:`QUANT_STATS` is mutable (and not during ``init``) it
  sows ``input_min`` / ``input_max`` of its input and ``code_min`` /
  ``code_max`` of its integer codes, reduced over repeated calls.

  Attributes:
    settings: the shared :class:`QuantSettings`.
  """

  settings: QuantSettings = QuantSettings()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Fake-quantizes ``x``; the output has ``x``'s shape and dtype."""
    s = self.settings
    if not s.quantize_activations:
      return x
    params = {name: _scalar_param(self, name, ACTIVATION_INIT[name])
              for name in ACTIVATION_KEYS}
    if self.is_mutable_collection(QUANT_STATS) and not self.is_initializing():
      for name, value in quantized_ops.input_statistics(x, params, s).items():
        reduce_fn, identity = STAT_REDUCERS[name]
        self.sow(
            QUANT_STATS,
            name,
            value,
            init_fn=lambda identity=identity: jnp.float32(identity),
            reduce_fn=reduce_fn,
        )
    key = _noise_key(self) if s.family.uses_noise else None
    return quantized_ops.quantize_input(x, params, key, s)


_twin_state = threading.local()


def inside_fp_twin() -> bool:
  """True while a quantized layer runs its full-precision twin (see below)."""
  return getattr(_twin_state, "depth", 0) > 0


@contextlib.contextmanager
def _fp_twin_scope():
  _twin_state.depth = getattr(_twin_state, "depth", 0) + 1
  try:
    yield
  finally:
    _twin_state.depth -= 1


def apply_quantized_layer(
    module: nn.Module,
    fp_call: Callable[..., Any],
    fp_twin: nn.Module,
    settings: QuantSettings,
    inputs: jax.Array,
    *args: Any,
    **kwargs: Any,
) -> Any:
  """Runs a bound weight layer with a quantized kernel and a quantized input.

  Called from inside ``module``'s compact ``__call__`` (by the Quant layer
  classes or a method interceptor), so the quantizer params are
  created in ``module``'s own scope, next to its ``kernel``. The layer's own
  computation then runs on an unbound copy, ``fp_twin``, given the module's
  params with ``kernel`` replaced by the fake-quantized kernel: padding,
  strides, dilation, groups, masks, axes, equations and dtype promotion stay
  the layer's own. ``log2_step`` has one step per output channel of the
  kernel (:func:`gdnsq_jax.layer_kinds.channel_axes`).

  Args:
    module: the bound layer, a kind in
      :data:`gdnsq_jax.layer_kinds.QUANTIZABLE` (or a subclass).
    fp_call: the layer's full-precision call; run once during ``init`` to
      create ``kernel`` / ``bias`` with the layer's own initializers.
    fp_twin: an unbound module computing the layer from ``{'params': ...}``.
    settings: quantization settings.
    inputs: the layer input (quantized by the ``input_quantizer`` child).
    *args: further positional arguments of the layer call.
    **kwargs: keyword arguments of the layer call.

  Returns:
    The layer output.
  """
  if not module.has_variable("params", "kernel"):
    fp_call(inputs, *args, **kwargs)
  kernel = module.get_variable("params", "kernel")
  axes = layer_kinds.channel_axes(module, inputs, kernel.shape, args, kwargs)
  if settings.quantize_activations:
    inputs = QuantAct(settings, name=INPUT_QUANTIZER)(inputs)
  if settings.quantize_weights:
    log2_step = module.param(
        "log2_step",
        nn.initializers.constant(WEIGHT_LOG2_STEP_INIT),
        quantized_ops.weight_step_shape(kernel.shape, axes, settings),
        jnp.float32,
    )
    key = (_noise_key(module)
           if settings.enabled and settings.family.uses_noise else None)
    kernel = quantized_ops.quantize_kernel(kernel, log2_step, key, settings)
  params = {
      k: v
      for k, v in module.variables["params"].items()
      if k not in _QUANTIZER_PARAM_KEYS
  }
  params["kernel"] = kernel
  with _fp_twin_scope():
    return fp_twin.apply({"params": params}, inputs, *args, **kwargs)


def fp_twin_of(module: nn.Module, base: type[nn.Module]) -> nn.Module:
  """An unbound ``base`` module with ``module``'s ``base`` attributes."""
  fields = {
      f.name: getattr(module, f.name)
      for f in dataclasses.fields(base)
      if f.init and f.name not in ("parent", "name")
  }
  return base(parent=None, **fields)


class QuantConv(nn.Conv):
  """``nn.Conv`` with a quantized kernel and an input activation quantizer.

  Same attributes and kernel layout ``(kh, kw, in / groups, out)`` as
  ``nn.Conv``, plus ``settings``. Params: ``kernel``, ``bias`` (if
  ``use_bias``), ``log2_step`` (shape ``(out,)`` per channel or ``()``) and
  the child ``input_quantizer`` (see :class:`QuantAct`).

  Attributes:
    settings: the shared :class:`QuantSettings`.
  """

  settings: QuantSettings = QuantSettings()

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    """``conv(quantize_activation(inputs), quantize_weight(kernel))``."""
    return apply_quantized_layer(
        self,
        super().__call__,
        fp_twin_of(self, nn.Conv),
        self.settings,
        inputs,
    )


class QuantDense(nn.Dense):
  """``nn.Dense`` with a quantized kernel and an input activation quantizer.

  Same attributes and kernel layout ``(in, out)`` as ``nn.Dense``, plus
  ``settings``. Params: ``kernel``, ``bias`` (if ``use_bias``),
  ``log2_step`` and the child ``input_quantizer``.

  Attributes:
    settings: the shared :class:`QuantSettings`.
  """

  settings: QuantSettings = QuantSettings()

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    """``dense(quantize_activation(inputs), quantize_weight(kernel))``."""
    return apply_quantized_layer(
        self,
        super().__call__,
        fp_twin_of(self, nn.Dense),
        self.settings,
        inputs,
    )


class QuantDenseGeneral(nn.DenseGeneral):
  """``nn.DenseGeneral`` with a quantized kernel and input quantizer.

  Same attributes and kernel layout ``batch + in + features`` as
  ``nn.DenseGeneral``, plus ``settings``; ``log2_step`` has one step per
  output channel, i.e. per entry of the batch and feature axes
  (:mod:`gdnsq_jax.channels`: shape ``features`` without ``batch_dims``).

  Attributes:
    settings: the shared :class:`QuantSettings`.
  """

  settings: QuantSettings = QuantSettings()

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    """``dense_general(quantize_activation(inputs), quantize_weight(kernel))``."""
    return apply_quantized_layer(
        self,
        super().__call__,
        fp_twin_of(self, nn.DenseGeneral),
        self.settings,
        inputs,
    )


class QuantEinsum(nn.Einsum):
  """``nn.Einsum`` with a quantized kernel and input quantizer.

  ``log2_step`` has one step per output channel: per entry of the kernel
  axes whose letter reaches the output (size 1 on the contracted ones).

  Attributes:
    settings: the shared :class:`QuantSettings`.
  """

  settings: QuantSettings = QuantSettings()

  @nn.compact
  def __call__(self, inputs: jax.Array,
               einsum_str: Optional[str] = None) -> jax.Array:
    """``einsum(quantize_activation(inputs), quantize_weight(kernel))``."""
    return apply_quantized_layer(
        self,
        super().__call__,
        fp_twin_of(self, nn.Einsum),
        self.settings,
        inputs,
        einsum_str,
    )


EXPLICIT_LAYERS = (QuantConv, QuantDense, QuantDenseGeneral, QuantEinsum)
"""The quantized layer classes (placement leaves them quantized)."""
