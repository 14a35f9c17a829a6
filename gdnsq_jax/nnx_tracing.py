"""The weight-bearing layers of a Flax NNX model, and the layer tracer for NNX.

The NNX counterpart of :mod:`gdnsq_jax.layer_kinds` plus
:mod:`gdnsq_jax.tracing`: the same kinds, the same
:class:`gdnsq_jax.tracing.TracedLayer` records, read from NNX modules.

Kinds (names shared with the Linen side, so reports and exports read alike):
``conv`` -- ``nnx.Conv`` (grouped and depthwise included, output channels on
the kernel's last axis); ``dense`` -- ``nnx.Linear``; ``dense_general`` --
``nnx.LinearGeneral``, hence the ``query`` / ``key`` / ``value`` / ``out``
projections of ``nnx.MultiHeadAttention``; ``einsum`` -- ``nnx.Einsum``.
Weight-bearing but kept full precision: ``conv_transpose``, ``embed`` and
``other`` (any module holding its own ``kernel`` variable).

:func:`trace_calls` runs the model abstractly (``jax.eval_shape`` of a
merged copy; nothing is allocated and the model is not touched) with a
recording subclass swapped in for every weight layer and BatchNorm of the
copy, and returns, in first-call order, each layer's kernel shape, MACs per
example, last call and the inference-mode BatchNorm consuming exactly its
output (foldable by the export).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Optional, Sequence

from flax import nnx
import jax

from gdnsq_jax import layer_kinds
from gdnsq_jax import tracing

__all__ = [
    "NnxTracedLayer",
    "channel_axes",
    "einsum_equation",
    "kind_of",
    "module_paths",
    "subclass_with_call",
    "trace_calls",
    "weight_kind",
]

_CLASSES = (
    ("conv", nnx.Conv),
    ("dense", nnx.Linear),
    ("dense_general", nnx.LinearGeneral),
    ("einsum", nnx.Einsum),
    ("conv_transpose", nnx.ConvTranspose),
    ("embed", nnx.Embed),
)


def kind_of(module: Any) -> Optional[str]:
  """The kind of an NNX layer (None for other modules)."""
  for kind, cls in _CLASSES:
    if isinstance(module, cls):
      return kind
  return None


def weight_kind(module: Any) -> Optional[str]:
  """:func:`kind_of`, or ``'other'`` for a module with its own ``kernel``."""
  kind = kind_of(module)
  if kind is None and isinstance(getattr(module, "kernel", None),
                                 nnx.Variable):
    return "other"
  return kind


def _weight(module: Any, kind: str) -> nnx.Variable:
  return module.embedding if kind == "embed" else module.kernel


def einsum_equation(module: Any, inputs: Any, kernel_shape: Sequence[int],
                    args: Sequence[Any] = (),
                    kwargs: Optional[Mapping[str, Any]] = None) -> str:
  """The explicit ``'lhs,rhs->out'`` einsum a dense-like NNX layer computes.

  :func:`gdnsq_jax.layer_kinds.dense_like_equation` of the module's
  attributes, as :func:`gdnsq_jax.layer_kinds.einsum_equation` for the Linen
  layers: ``nnx.Linear`` contracts the last input axis; ``nnx.LinearGeneral``
  its ``axis`` against the kernel ``batch + in + out``; ``nnx.Einsum`` its
  own equation (``einsum_str`` of the call or the module).

  Raises:
    ValueError: for a module that is not dense-like.
  """
  kind = kind_of(module)
  if kind not in layer_kinds.DENSE_LIKE:
    raise ValueError(f"{type(module).__name__} is not a dense-like NNX layer "
                     f"(kinds {', '.join(layer_kinds.DENSE_LIKE)})")
  attributes = {}
  if kind == "dense_general":
    attributes = dict(axis=module.axis, batch_dims=tuple(module.batch_axis),
                      num_features=len(module.out_features))
  elif kind == "einsum":
    kwargs = kwargs or {}
    attributes = dict(einsum_str=(
        args[0] if args and args[0] is not None
        else kwargs.get("einsum_str") or module.einsum_str))
  return layer_kinds.dense_like_equation(kind, inputs.shape, kernel_shape,
                                         **attributes)


def channel_axes(module: Any, inputs: Any, kernel_shape: Sequence[int],
                 args: Sequence[Any] = (),
                 kwargs: Optional[Mapping[str, Any]] = None
                 ) -> tuple[int, ...]:
  """The kernel's output-channel axes (one weight step each).

  A conv's last axis; for a dense-like layer the kernel axes whose letter
  reaches the output (:func:`einsum_equation`): a ``LinearGeneral``'s batch
  and feature axes -- as :mod:`gdnsq_jax.layer_kinds` for the Linen layers.
  """
  if kind_of(module) == "conv":
    return (len(kernel_shape) - 1,)
  return layer_kinds.kernel_output_axes(
      einsum_equation(module, inputs, kernel_shape, args, kwargs))


def module_paths(model: Any) -> dict[int, str]:
  """``id(module) -> '/'-joined path`` (first path of a shared module)."""
  paths: dict[int, str] = {}
  for path, module in nnx.iter_modules(model):
    paths.setdefault(id(module), "/".join(str(p) for p in path))
  return paths


def _subclass(cls, prefix, make_call):
  return type(f"{prefix}{cls.__name__}", (cls,),
              {"__call__": make_call(cls.__call__),
               "__module__": cls.__module__,
               "__qualname__": f"{prefix}{cls.__qualname__}"})


@functools.lru_cache(maxsize=None)
def subclass_with_call(cls: type, prefix: str,
                       make_call: Callable[[Callable[..., Any]],
                                           Callable[..., Any]]) -> type:
  """A direct subclass of ``cls`` whose ``__call__`` is ``make_call(base)``.

  Cached, so every instance of one class gets the same type (NNX compares
  graph node types). A direct subclass keeps the instance layout, so an
  existing module can take it (``module.__class__ = ...``) with its state.
  """
  return _subclass(cls, prefix, make_call)


@dataclasses.dataclass(frozen=True)
class NnxTracedLayer(tracing.TracedLayer):
  """A :class:`gdnsq_jax.tracing.TracedLayer` with its weight channels.

  Attributes:
    channel_axes: the kernel's output-channel axes (:func:`channel_axes`;
      empty for the full-precision kinds).
  """

  channel_axes: tuple[int, ...] = ()


def _record_call(base, record):
  def __call__(self, *args, **kwargs):
    out = base(self, *args, **kwargs)
    record(self, args, kwargs, out)
    return out
  return __call__


def trace_calls(model: Any, args: Sequence[Any],
                kwargs: Optional[Mapping[str, Any]] = None
                ) -> list[NnxTracedLayer]:
  """Every weight-layer call of ``model(*args, **kwargs)``, in first-call order.

  The model runs abstractly in its current mode (``model.eval()`` /
  ``model.train()``); array-like leaves of ``args`` / ``kwargs`` (arrays,
  ``jax.ShapeDtypeStruct``) are traced, other leaves stay static. The
  foldable-BatchNorm rule is :func:`gdnsq_jax.tracing.first_calls`: the
  BatchNorm's input *is* the layer's output, it runs on running averages
  over the last axis, both are called once and nothing else takes that
  output.

  Args:
    model: an NNX module (unmodified or quantized).
    args: example positional inputs.
    kwargs: keyword arguments of the call.

  Returns:
    The layers as :class:`NnxTracedLayer`; a layer called twice appears
    once.
  """
  graphdef, state = nnx.split(model)
  arrays, rebuild = tracing.split_array_leaves(args, kwargs)
  calls, norms, inputs_seen = [], [], []

  def run(state, *array_leaves):
    copy = nnx.merge(graphdef, state)
    paths = module_paths(copy)

    def record(module, call_args, call_kwargs, out):
      path = paths[id(module)]
      kind = weight_kind(module)
      x = call_args[0] if call_args else next(iter(call_kwargs.values()))
      if kind is not None:
        shape = tuple(_weight(module, kind).shape)
        axes = (channel_axes(module, x, shape, call_args[1:], call_kwargs)
                if kind in layer_kinds.QUANTIZABLE else ())
        macs = tracing.macs_per_example(kind, shape, axes, out)
        calls.append((path, kind, out, shape, macs, axes))
      else:  # BatchNorm
        flag = call_kwargs.get("use_running_average",
                               call_args[1] if len(call_args) > 1 else None)
        running = module.use_running_average if flag is None else flag
        foldable = bool(running) and module.axis in (-1, x.ndim - 1)
        norms.append((path, x, foldable, float(module.epsilon)))
      inputs_seen.append(x)

    make_call = lambda base: _record_call(base, record)
    for _, module in list(nnx.iter_modules(copy)):
      if weight_kind(module) is not None or isinstance(module, nnx.BatchNorm):
        # Not cached across traces: ``make_call`` closes over these records.
        module.__class__ = _subclass(type(module), "Traced", make_call)
    call_args, call_kwargs = rebuild(array_leaves)
    copy(*call_args, **call_kwargs)

  jax.eval_shape(run, state, *arrays)
  return [NnxTracedLayer(path, kind, shape, macs, bn, epsilon, False,
                         last_call, axes)
          for (path, kind, _, shape, macs, axes), bn, epsilon, last_call
          in tracing.first_calls(calls, norms, inputs_seen)]
