"""Quantize an unmodified Flax NNX model with GDNSQ (graph surgery on its layers).

:func:`quantize_model` takes an NNX model written with stock layers
(``nnx.Conv`` incl. depthwise, ``nnx.Linear``, ``nnx.LinearGeneral``,
``nnx.Einsum``, hence ``nnx.MultiHeadAttention``'s projections), traces it
once (:func:`gdnsq_jax.nnx_tracing.trace_calls`), places quantizers with the
Linen rules and roles (:mod:`gdnsq_jax.interception`: stem, classifier and
1x1 convs FP by default) and returns a quantized copy in which every
selected layer object holds, next to its ``kernel``:

* ``log2_step`` -- a :class:`~gdnsq_jax.nnx_quantizers.QuantParam`, one per
  output channel;
* ``input_quantizer`` -- an
  :class:`~gdnsq_jax.nnx_quantizers.ActivationQuantizer` with ``QuantParam``
  ``log2_step`` / ``log2_range`` / ``clamp_low`` and ``QuantStat``
  statistics.

So ``nnx.state(model, nnx.Param)`` has Linen's params layout: the bit-widths,
the penalty, the calibration and the export (:mod:`gdnsq_jax.bitwidths`,
:mod:`gdnsq_jax.penalty`, :mod:`gdnsq_jax.nnx_calibration`,
:mod:`gdnsq_jax.nnx_export`) read it as they read Linen params, and the FP
model's state loads unchanged (it is a subset). ``QuantParam`` subclasses
``nnx.Param``: ``wrt=nnx.Param`` trains it, ``nnx.state(model, QuantParam)``
selects it.

Design -- graph surgery plus the layers' own ``promote_dtype`` hook:

* each selected layer object keeps its attributes, state and path and is
  given a direct subclass of its class (``QuantizedConv``, ...; same
  instance layout, so NNX's split / merge / ``nnx.jit`` rebuild it) whose
  ``__call__`` quantizes the layer input, then runs the layer's *own*
  ``__call__`` (padding, groups, masks, axes, equation and dtype policy
  unchanged);
* the kernel is quantized in ``promote_dtype``, the one injection hook all
  four layers call, with the kernel as read from its Variable (float32,
  before dtype promotion: what the Linen glue quantizes). The op hooks
  (``dot_general`` / ``conv_general_dilated`` / ``einsum_op``) have three
  signatures, see the kernel already cast to the compute dtype, and
  ``LinearGeneral``'s ``dot_general_cls`` overrides ``dot_general``; one
  ``promote_dtype`` hook covers every kind. A hook is a static attribute and
  cannot hold the layer's Variables (after a split / merge they would be
  stale), so it finds them through the call stack of the subclass;
* activation x activation products (attention's ``q k``, ``attn v``) are not
  layer calls and stay float, as in Linen (docs/method.md §5).

Dither (docs/method.md §4.1, D16): the quantized root model holds
``quant_noise``, an ``nnx.RngStream`` (from ``rngs``, stream
:data:`NOISE_STREAM`). Each call of the model in training mode draws *one*
key from it (``fold_in(key, count)``, then ``count += 1``), shared by all its
quantizers, which tell their dithers apart by a static id of their path and
call count (:func:`gdnsq_jax.dither.quantizer_id`, as the Linen layers:
the same paths and step key give the same dither in both APIs). After
``model.eval()`` (``deterministic=True``) nothing is drawn: the forward
rounds deterministically and needs no key. A layer called outside the model
gets no dither, as a Linen layer applied without the ``quant_noise`` RNG.

Numerics are the shared, framework-agnostic core
(:mod:`gdnsq_jax.quantized_ops`, :mod:`gdnsq_jax.families`); nothing numeric
is implemented here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

from flax import nnx
import jax
import jax.numpy as jnp

from gdnsq_jax import dither
from gdnsq_jax import interception
from gdnsq_jax import nnx_tracing
from gdnsq_jax import quantized_ops
from gdnsq_jax.interception import LayerInfo
from gdnsq_jax.interception import QuantizationRules
from gdnsq_jax.nnx_quantizers import ActivationQuantizer
from gdnsq_jax.nnx_quantizers import QuantParam
from gdnsq_jax.quantizer_params import INPUT_QUANTIZER
from gdnsq_jax.quantizer_params import WEIGHT_LOG2_STEP_INIT
from gdnsq_jax.settings import QuantSettings

__all__ = [
    "NOISE_STREAM",
    "LayerQuantization",
    "QuantizationPlan",
    "activation_quantizers",
    "quantization_plan",
    "quantization_report",
    "quantize_model",
    "quantized_layers",
]

NOISE_STREAM = "quant_noise"
"""The ``nnx.Rngs`` stream of the dither keys (Linen's ``NOISE_RNG``)."""


@dataclasses.dataclass(frozen=True)
class LayerQuantization:
  """Static description of one quantized layer (its ``quantized_as``).

  Attributes:
    path: '/'-joined module path.
    settings: the model's :class:`QuantSettings`.
  """

  path: str
  settings: QuantSettings


@dataclasses.dataclass(frozen=True)
class QuantizationPlan:
  """Static placement of a quantized model (its ``quantization``).

  Attributes:
    settings: quantization settings of every quantized layer.
    layers: every weight-bearing layer with its placement (call order).
  """

  settings: QuantSettings
  layers: tuple[LayerInfo, ...]

  @property
  def quantized_paths(self) -> frozenset[str]:
    """Module paths of the quantized layers."""
    return frozenset(l.path for l in self.layers if l.quantized)


# ---------------------------------------------------------------------------
# The dither key and the active layer, set by the quantized calls.
# ---------------------------------------------------------------------------

_calls = threading.local()


def _stack(name: str) -> list:
  if not hasattr(_calls, name):
    setattr(_calls, name, [])
  return getattr(_calls, name)


@contextlib.contextmanager
def _pushed(name: str, value: Any) -> Iterator[None]:
  stack = _stack(name)
  stack.append(value)
  try:
    yield
  finally:
    stack.pop()


@dataclasses.dataclass
class _ModelCall:
  """One call of a quantized model: its step key and the quantizer calls."""

  key: Optional[jax.Array]
  calls: dict[str, int] = dataclasses.field(default_factory=dict)

  def dither_key(self, path: str) -> Optional[jax.Array]:
    """The key of the quantizer at ``path`` (None without a step key).

    ``dither_key(step key, quantizer_id(path names, n))`` for its n-th call
    in this model call: the Linen layers' derivation
    (:func:`gdnsq_jax.dither.quantizer_id`).
    """
    if self.key is None:
      return None
    self.calls[path] = self.calls.get(path, 0) + 1
    names = tuple(path.split("/"))
    return dither.dither_key(
        self.key, dither.quantizer_id(names, self.calls[path]))


def _dither_key(path: str) -> Optional[jax.Array]:
  """The dither key of a quantizer inside a quantized model call, or None."""
  calls = _stack("model_calls")
  return calls[-1].dither_key(path) if calls else None


@dataclasses.dataclass(frozen=True)
class _QuantizingPromote:
  """A layer's ``promote_dtype`` that first quantizes the kernel operand."""

  promote: Callable[..., Any]

  def __call__(self, arrays, /, **kwargs):
    layers = _stack("layers")
    if not layers:
      raise RuntimeError(
          "a quantized layer's promote_dtype ran outside its quantized call; "
          "call the layer itself (gdnsq_jax.nnx_quantize)")
    layer, key = layers[-1]
    inputs, kernel, *rest = arrays
    if isinstance(getattr(layer, "log2_step", None), QuantParam):
      q = layer.quantized_as
      kernel = quantized_ops.quantize_kernel(kernel, layer.log2_step[...],
                                             key, q.settings)
    return self.promote((inputs, kernel, *rest), **kwargs)


def _quantized_layer_call(base: Callable[..., Any]) -> Callable[..., Any]:
  def __call__(self, *args, **kwargs):
    if not args:  # layer(inputs=x)
      kwargs = dict(kwargs)
      args = (kwargs.pop("inputs"),)
    inputs, *rest = args
    path = self.quantized_as.path
    quantizer = getattr(self, INPUT_QUANTIZER, None)
    if isinstance(quantizer, ActivationQuantizer):
      inputs = quantizer(inputs, _dither_key(f"{path}/{INPUT_QUANTIZER}"))
    key = (_dither_key(path)
           if isinstance(getattr(self, "log2_step", None), QuantParam)
           else None)
    with _pushed("layers", (self, key)):
      return base(self, inputs, *rest, **kwargs)
  return __call__


def _quantized_model_call(base: Callable[..., Any]) -> Callable[..., Any]:
  def __call__(self, *args, **kwargs):
    settings = self.quantization.settings
    key = None
    if (not self.deterministic and settings.enabled
        and settings.family.uses_noise):
      key = self.quant_noise()
    with _pushed("model_calls", _ModelCall(key)):
      return base(self, *args, **kwargs)
  return __call__


# ---------------------------------------------------------------------------
# Placement and surgery.
# ---------------------------------------------------------------------------


def _attach(layer: nnx.Module, path: str, kernel_shape: Sequence[int],
            axes: Sequence[int], settings: QuantSettings) -> None:
  """Adds the quantizers to ``layer`` in place and swaps its class."""
  layer.quantized_as = LayerQuantization(path, settings)
  if settings.quantize_weights:
    shape = quantized_ops.weight_step_shape(kernel_shape, axes, settings)
    layer.log2_step = QuantParam(
        jnp.full(shape, WEIGHT_LOG2_STEP_INIT, jnp.float32))
  if settings.quantize_activations:
    setattr(layer, INPUT_QUANTIZER, ActivationQuantizer(settings))
  layer.promote_dtype = _QuantizingPromote(layer.promote_dtype)
  layer.__class__ = nnx_tracing.subclass_with_call(
      type(layer), "Quantized", _quantized_layer_call)


def quantize_model(
    model: nnx.Module,
    *sample_args: Any,
    settings: Optional[QuantSettings] = None,
    rules: Union[QuantizationRules, Mapping[str, Any], None] = None,
    rngs: Optional[nnx.Rngs] = None,
    copy: bool = True,
    **sample_kwargs: Any,
) -> nnx.Module:
  """A GDNSQ-quantized version of an NNX model (module docs).

  The model is traced once abstractly, in its current mode, on the sample
  call ``model(*sample_args, **sample_kwargs)``, which must call every
  weight layer. Quantizer params start at their pre-calibration values
  (:mod:`gdnsq_jax.quantizer_params`); calibrate before training
  (:func:`gdnsq_jax.nnx_calibration.calibrate`).

  Args:
    model: an NNX model built from stock Flax layers.
    *sample_args: example positional inputs (arrays or
      ``jax.ShapeDtypeStruct``).
    settings: quantization settings (default :class:`QuantSettings()`).
    rules: :class:`gdnsq_jax.QuantizationRules` or a dict of its fields;
      paths are '/'-joined attribute paths (``blocks/0/attention/query``).
    rngs: holds the :data:`NOISE_STREAM` stream of the dither keys (default
      ``nnx.Rngs(quant_noise=0)``).
    copy: quantize a copy (``nnx.clone``) and leave ``model`` as it is, e.g.
      as the FP teacher; False modifies ``model`` in place.
    **sample_kwargs: keyword arguments of the sample call.

  Returns:
    The quantized model: the same class with a ``Quantized`` prefix (a
    subclass), the same attributes and paths.

  Raises:
    ValueError: for unknown rule keys or invalid regexes, or a model that
      is already quantized.
  """
  if isinstance(getattr(model, "quantization", None), QuantizationPlan):
    raise ValueError("the model is already quantized (it has a "
                     "QuantizationPlan); quantize the FP model")
  settings = settings if settings is not None else QuantSettings()
  rules = QuantizationRules.coerce(rules)
  traced = nnx_tracing.trace_calls(model, sample_args, sample_kwargs)
  infos = interception.place_layers(traced, rules)
  if copy:
    model = nnx.clone(model)
  modules = {"/".join(str(p) for p in path): m
             for path, m in nnx.iter_modules(model)}
  for layer, info in zip(traced, infos):
    if info.quantized:
      _attach(modules[info.path], info.path, layer.kernel_shape,
              layer.channel_axes, settings)
  if rngs is None:
    rngs = nnx.Rngs(**{NOISE_STREAM: 0})
  model.quant_noise = getattr(rngs, NOISE_STREAM)
  if not hasattr(model, "deterministic"):
    model.deterministic = False
  model.quantization = QuantizationPlan(settings, tuple(infos))
  model.__class__ = nnx_tracing.subclass_with_call(
      type(model), "Quantized", _quantized_model_call)
  return model


def quantization_report(model: nnx.Module) -> list[LayerInfo]:
  """Every weight-bearing layer of a quantized model with its placement.

  Print it with :func:`gdnsq_jax.format_quantization_report`.
  """
  return list(quantization_plan(model).layers)


def quantization_plan(model: nnx.Module) -> QuantizationPlan:
  plan = getattr(model, "quantization", None)
  if not isinstance(plan, QuantizationPlan):
    raise TypeError(
        f"{type(model).__name__} is not a quantized NNX model; build it with "
        "gdnsq_jax.nnx_quantize.quantize_model")
  return plan


def quantized_layers(model: nnx.Module) -> dict[str, nnx.Module]:
  """``{path: layer}`` of the quantized layers of ``model``."""
  return {"/".join(str(p) for p in path): m
          for path, m in nnx.iter_modules(model)
          if isinstance(getattr(m, "quantized_as", None), LayerQuantization)}


def activation_quantizers(model: nnx.Module
                          ) -> dict[str, ActivationQuantizer]:
  """``{path: quantizer}`` (``<layer>/input_quantizer``) of ``model``."""
  return {"/".join(str(p) for p in path): m
          for path, m in nnx.iter_modules(model)
          if isinstance(m, ActivationQuantizer)}

