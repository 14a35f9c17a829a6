"""The weight-bearing Flax Linen layers: their kinds, kernels and equations.

Linen glue shared by placement (:mod:`gdnsq_jax.interception`), the layer
tracer (:mod:`gdnsq_jax.tracing`), the quantized layers
(:mod:`gdnsq_jax.layers`) and the integer inference
(:mod:`gdnsq_jax.export.inference`). A kind names a Flax layer class whose
one weight-bearing op multiplies its input by its ``kernel``:

* quantizable (:data:`QUANTIZABLE`): ``conv`` -- ``nn.Conv`` and its
  subclasses, grouped and depthwise (``feature_group_count``) included,
  output channels on the kernel's last axis; ``dense`` -- ``nn.Dense``;
  ``dense_general`` -- ``nn.DenseGeneral`` (any ``axis``, ``batch_dims``,
  multi-dim ``features``), hence the ``query`` / ``key`` / ``value`` / ``out``
  projections of ``nn.MultiHeadDotProductAttention`` and ``nn.SelfAttention``;
  ``einsum`` -- ``nn.Einsum``. The three dense-like kinds are einsums: their
  output channels are the kernel axes whose letter reaches the output
  (:func:`einsum_equation`);
* weight-bearing but kept full precision (:data:`UNSUPPORTED`):
  ``conv_transpose``, ``conv_local``, ``embed`` (a lookup, and its
  ``attend``), and ``other`` -- any module holding its own ``kernel`` param.
  They are listed in the quantization report with the reason, never silently.
"""

from __future__ import annotations

import string
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import opt_einsum

__all__ = [
    "DENSE_LIKE",
    "QUANTIZABLE",
    "UNSUPPORTED",
    "channel_axes",
    "dense_like_equation",
    "einsum_equation",
    "kernel_output_axes",
    "kind_of",
    "layer_input",
    "weight_kind",
    "weight_param_name",
]

QUANTIZABLE = ("conv", "dense", "dense_general", "einsum")
"""Kinds whose kernel and input get GDNSQ quantizers."""

DENSE_LIKE = ("dense", "dense_general", "einsum")
"""Quantizable kinds that are einsums of the input and the kernel."""

UNSUPPORTED = ("conv_transpose", "conv_local", "embed", "other")
"""Weight-bearing kinds that stay full precision (reported as such)."""

_CLASSES = (
    ("conv", nn.Conv),
    ("dense", nn.Dense),
    ("dense_general", nn.DenseGeneral),
    ("einsum", nn.Einsum),
    ("conv_transpose", nn.ConvTranspose),
    ("conv_local", nn.ConvLocal),
    ("embed", nn.Embed),
)


def kind_of(module: nn.Module) -> Optional[str]:
  """The kind of a Flax layer class (None for other modules)."""
  for kind, cls in _CLASSES:
    if isinstance(module, cls):
      return kind
  return None


def weight_param_name(kind: str) -> str:
  """The param holding a kind's weights (``embedding`` or ``kernel``)."""
  return "embedding" if kind == "embed" else "kernel"


def weight_kind(module: nn.Module) -> Optional[str]:
  """:func:`kind_of`, or ``'other'`` for a bound module with its own kernel."""
  kind = kind_of(module)
  if kind is None and module.has_variable("params", "kernel"):
    return "other"
  return kind


def layer_input(args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
  """The input of a layer call, positional or ``inputs=``."""
  return args[0] if args else kwargs["inputs"]


def _normalize(axes, ndim):
  axes = (axes,) if isinstance(axes, int) else tuple(axes)
  return tuple(a % ndim for a in axes)


def dense_like_equation(kind: str, input_shape: Sequence[int],
                        kernel_shape: Sequence[int], *, axis: Any = -1,
                        batch_dims: Any = (), num_features: int = 1,
                        einsum_str: Optional[str] = None) -> str:
  """The explicit ``'lhs,rhs->out'`` of a dense-like kind, any framework.

  ``dense`` contracts the last input axis with the kernel ``(in, out)``;
  ``dense_general`` the input ``axis`` with the kernel ``batch_dims + axis +
  features`` (``num_features`` feature axes); ``einsum`` is ``einsum_str``
  with every axis named by one letter (no ellipsis). The Linen
  (:func:`einsum_equation`) and NNX layers read these from their modules.
  """
  ndim = len(input_shape)
  letters = string.ascii_letters
  lhs = letters[:ndim]
  if kind == "dense":
    rhs = lhs[-1] + letters[ndim]
    return f"{lhs},{rhs}->{lhs[:-1]}{rhs[-1]}"
  if kind == "dense_general":
    axis = _normalize(axis, ndim)
    batch = _normalize(batch_dims, ndim)
    features = letters[ndim:ndim + num_features]
    rhs = ("".join(lhs[b] for b in batch) + "".join(lhs[a] for a in axis)
           + features)
    out = "".join(lhs[i] for i in range(ndim) if i not in axis)
    return f"{lhs},{rhs}->{out}{features}"
  operands, out, _ = opt_einsum.parser.parse_einsum_input((
      einsum_str.replace(" ", ""),
      jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32),
      jax.ShapeDtypeStruct(tuple(kernel_shape), jnp.float32)))
  return f"{operands}->{out}"


def einsum_equation(module: nn.Module, inputs: Any,
                    kernel_shape: Sequence[int], args: Sequence[Any] = (),
                    kwargs: Optional[Mapping[str, Any]] = None) -> str:
  """The explicit equation ``'lhs,rhs->out'`` a dense-like layer computes.

  Args:
    module: an ``nn.Dense``, ``nn.DenseGeneral`` or ``nn.Einsum``.
    inputs: its input (an array or anything with ``shape``).
    kernel_shape: its kernel's shape.
    args: call arguments after the input (``nn.Einsum``'s ``einsum_str``).
    kwargs: call keyword arguments.

  Returns:
    The equation, every axis named by one letter (no ellipsis).
  """
  kind = kind_of(module)
  if kind not in DENSE_LIKE:
    raise ValueError(f"{type(module).__name__} is not a dense-like layer "
                     f"(one of {', '.join(DENSE_LIKE)})")
  attributes = {}
  if kind == "dense_general":
    attributes = dict(axis=module.axis, batch_dims=module.batch_dims,
                      num_features=(1 if isinstance(module.features, int)
                                    else len(tuple(module.features))))
  elif kind == "einsum":
    kwargs = kwargs or {}
    call_str = args[0] if args else kwargs.get("einsum_str")
    attributes = dict(einsum_str=nn.merge_param(
        "einsum_str", module.einsum_str, call_str))
  return dense_like_equation(kind, inputs.shape, kernel_shape, **attributes)


def kernel_output_axes(equation: str) -> tuple[int, ...]:
  """The kernel (second operand) axes of ``equation`` that reach its output."""
  rhs, out = equation.split(",")[1].split("->")
  return tuple(i for i, c in enumerate(rhs) if c in out)


def channel_axes(module: nn.Module, inputs: Any, kernel_shape: Sequence[int],
                 args: Sequence[Any] = (),
                 kwargs: Optional[Mapping[str, Any]] = None
                 ) -> tuple[int, ...]:
  """The kernel's output-channel axes (one weight step each).

  A conv's last axis; for a dense-like layer, the kernel axes whose letter
  appears in the output (``DenseGeneral``'s ``batch_dims`` and features).
  """
  if kind_of(module) == "conv":
    return (len(kernel_shape) - 1,)
  return kernel_output_axes(
      einsum_equation(module, inputs, kernel_shape, args, kwargs))
