"""Flax Linen quantized layers (arXiv 2508.14004, docs/method.md §2, §5).

* :class:`QuantAct` -- a per-tensor activation quantizer (params
  ``log2_step``, ``log2_range``, ``clamp_low``; all scalars).
* :class:`QuantConv` / :class:`QuantDense` -- ``nn.Conv`` / ``nn.Dense`` whose
  kernel is fake-quantized (param ``log2_step``, per output channel or per
  tensor) and whose *input* passes an activation quantizer held in the child
  module ``input_quantizer`` (input-side placement, as the reference).

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
import hashlib
import threading
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from gdnsq_jax.activation_quantizer import quantize_activation
from gdnsq_jax.bitwidths import activation_code_range
from gdnsq_jax.bitwidths import FLOAT_BITS
from gdnsq_jax.quantizer_params import ACTIVATION_INIT
from gdnsq_jax.quantizer_params import INPUT_QUANTIZER
from gdnsq_jax.quantizer_params import WEIGHT_LOG2_STEP_INIT
from gdnsq_jax.lsq import lsq_quantize_activation
from gdnsq_jax.lsq import lsq_quantize_weight
from gdnsq_jax.quantizers import dither_key
from gdnsq_jax.quantizers import quantize_weight
from gdnsq_jax.quantizers import validate_dither
from gdnsq_jax.quantizers import validate_estimator

__all__ = [
    "METHODS",
    "NOISE_RNG",
    "QUANT_STATS",
    "QuantAct",
    "QuantConv",
    "QuantDense",
    "QuantSettings",
    "apply_quantized_layer",
]

NOISE_RNG = "quant_noise"
"""Flax RNG stream of the step-size dither."""

QUANT_STATS = "quant_stats"
"""Collection into which :class:`QuantAct` sows input and code min / max."""

METHODS = ("gdnsq", "lsq")
"""Quantizer families: GDNSQ, and the LSQ baseline (:mod:`gdnsq_jax.lsq`)."""

STAT_REDUCERS: dict[str, tuple[Callable[..., jax.Array], float]] = {
    "input_min": (jnp.minimum, float("inf")),
    "input_max": (jnp.maximum, float("-inf")),
    "code_min": (jnp.minimum, float("inf")),
    "code_max": (jnp.maximum, float("-inf")),
    "input_sum": (jnp.add, 0.0),  # with input_count: the input mean (LSQ init)
    "input_count": (jnp.add, 0.0),
}
"""Sown statistic -> (reduction across calls and batches, its identity)."""

_QUANTIZER_PARAM_KEYS = ("log2_step", INPUT_QUANTIZER)


@dataclasses.dataclass(frozen=True)
class QuantSettings:
  """How the layers quantize (one value shared by every quantized layer).

  Attributes:
    weight_bits: target weight bit-width; ``>= 32`` disables weight
      quantizers (no ``log2_step`` param).
    activation_bits: target activation bit-width; ``>= 32`` disables
      activation quantizers entirely, no params (W1A32, docs/method.md D12).
    estimator: backward rule of weight quantizers, one of
      :data:`gdnsq_jax.quantizers.ESTIMATORS` (docs/method.md D4).
    activation_estimator: the activations' rule, ``ste`` (docs/method.md D4).
    per_channel: one weight step per output channel (True) or per tensor.
    dither: step-size dither, one of :data:`gdnsq_jax.quantizers.DITHERS`.
    learnable_clamp_low: train the lower clamp b (docs/method.md D3);
      False freezes it at 0 (the reference's tagged release).
    enabled: False makes every quantizer the identity while keeping its params
      (evaluate the latent FP network with the same variables).
    calibration_bits: bit-width the calibration sets (docs/method.md §6: 10).
    axis_name: data-parallel axis over which AEWGS statistics are averaged.
    method: ``'gdnsq'`` (differentiable widths, noise-scale backward) or
      ``'lsq'``: the fixed-bit LSQ baseline of :mod:`gdnsq_jax.lsq` (integer
      widths; ``estimator``, ``activation_estimator`` and ``dither`` unused;
      calibrated to the target widths, trained without the penalty).
  """

  weight_bits: float = 4
  activation_bits: float = 4
  estimator: str = "ste"
  activation_estimator: str = "ste"
  per_channel: bool = True
  dither: str = "uniform12"
  learnable_clamp_low: bool = True
  enabled: bool = True
  calibration_bits: int = 10
  axis_name: Optional[str] = None
  method: str = "gdnsq"

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(
          f"method={self.method!r}; choose one of {', '.join(METHODS)}")
    validate_estimator(self.estimator)
    validate_estimator(self.activation_estimator)
    validate_dither(self.dither)
    for name in ("weight_bits", "activation_bits", "calibration_bits"):
      if not getattr(self, name) >= 1:
        raise ValueError(
            f"{name}={getattr(self, name)!r} must be >= 1 (use "
            f">= {FLOAT_BITS} to disable a quantizer)"
        )
    if self.method == "lsq":
      for name in ("weight_bits", "activation_bits"):
        bits = getattr(self, name)
        if bits < FLOAT_BITS and not float(bits).is_integer():
          raise ValueError(
              f"method='lsq' has fixed integer widths but {name}={bits!r}; "
              "use an integer (or >= 32 to disable the quantizer)")

  @property
  def quantize_weights(self) -> bool:
    """Whether layers create a weight quantizer (``weight_bits < 32``)."""
    return self.weight_bits < FLOAT_BITS

  @property
  def quantize_activations(self) -> bool:
    """Whether layers create an activation quantizer (``bits < 32``)."""
    return self.activation_bits < FLOAT_BITS


def _noise_key(module: nn.Module) -> Optional[jax.Array]:
  """This quantizer's dither key if the caller provided :data:`NOISE_RNG`.

  What ``module.make_rng`` would fold in (the module path and a call
  count) is hashed at trace time into a static id, and the caller's key
  (one per step) is xor-ed with it (:func:`gdnsq_jax.quantizers.dither_key`):
  no PRNG fold-in per quantizer; the backward hashes the element indices.
  """
  if not module.has_rng(NOISE_RNG):
    return None
  scope = module.scope
  stream = scope.rngs[NOISE_RNG]  # flax LazyRng: apply()'s key + the path
  scope.rng_counters[NOISE_RNG] += 1  # each call its own dither, as make_rng
  suffix = tuple(getattr(stream, "suffix", ())) + (
      scope.rng_counters[NOISE_RNG],)
  digest = hashlib.sha1(repr(suffix).encode("utf-8")).digest()
  return dither_key(getattr(stream, "rng", stream),
                    int.from_bytes(digest[:8], "little"))


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
    log2_step, log2_range, clamp_low = (
        _scalar_param(self, name, ACTIVATION_INIT[name])
        for name in ("log2_step", "log2_range", "clamp_low"))
    if not s.learnable_clamp_low:
      clamp_low = jax.lax.stop_gradient(clamp_low)
    if s.method == "lsq":  # fixed width: the grid width follows the step
      log2_range = log2_step + s.activation_bits
    if self.is_mutable_collection(QUANT_STATS) and not self.is_initializing():
      xs = jax.lax.stop_gradient(x).astype(jnp.float32)
      code_min, code_max = activation_code_range(
          xs, log2_step, log2_range, clamp_low
      )
      values = {
          "input_min": jnp.min(xs),
          "input_max": jnp.max(xs),
          "code_min": code_min,
          "code_max": code_max,
          "input_sum": jnp.sum(xs),
          "input_count": jnp.float32(xs.size),
      }
      for name, value in values.items():
        reduce_fn, identity = STAT_REDUCERS[name]
        self.sow(
            QUANT_STATS,
            name,
            value,
            init_fn=lambda identity=identity: jnp.float32(identity),
            reduce_fn=reduce_fn,
        )
    if s.method == "lsq":
      if not s.enabled:
        return x
      return lsq_quantize_activation(
          x, log2_step, clamp_low, bits=int(s.activation_bits))
    return quantize_activation(
        x,
        log2_step,
        log2_range,
        clamp_low,
        _noise_key(self),
        estimator=s.activation_estimator,
        dither=s.dither,
        axis_name=s.axis_name,
        enabled=s.enabled,
    )


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
  """Runs a bound conv / dense with a quantized kernel and a quantized input.

  Called from inside ``module``'s compact ``__call__`` (by :class:`QuantConv`,
  :class:`QuantDense` or a method interceptor), so the quantizer params are
  created in ``module``'s own scope, next to its ``kernel``. The layer's own
  computation then runs on an unbound copy, ``fp_twin``, given the module's
  params with ``kernel`` replaced by the fake-quantized kernel: padding,
  strides, dilation, groups, masks and dtype promotion stay the layer's own.

  Args:
    module: the bound ``nn.Conv`` / ``nn.Dense`` (or subclass).
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
  if settings.quantize_activations:
    inputs = QuantAct(settings, name=INPUT_QUANTIZER)(inputs)
  if settings.quantize_weights:
    shape = (kernel.shape[-1],) if settings.per_channel else ()
    log2_step = module.param(
        "log2_step",
        nn.initializers.constant(WEIGHT_LOG2_STEP_INIT),
        shape,
        jnp.float32,
    )
    if settings.enabled and settings.method == "lsq":
      kernel = lsq_quantize_weight(
          kernel, log2_step, bits=int(settings.weight_bits),
          per_channel=settings.per_channel)
    elif settings.enabled:
      kernel = quantize_weight(
          kernel,
          log2_step,
          _noise_key(module),
          estimator=settings.estimator,
          dither=settings.dither,
          per_channel=settings.per_channel,
          axis_name=settings.axis_name,
      )
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
