"""2-D convolution with a faster CPU path: a drop-in ``lax.conv_general_dilated``.

:func:`conv_general_dilated` takes ``jax.lax.conv_general_dilated``'s
arguments, so a model uses it as
``nn.Conv(..., conv_general_dilated=train.cpu_conv.conv_general_dilated)``.
On the CPU backend a *plain* convolution (NHWC input, HWIO kernel, NHWC
output, no input or kernel dilation, one group, non-negative padding, one
floating dtype) runs a ``jax.custom_vjp`` whose three passes each use the
formulation measured fastest on a 2-core x86 CPU (jax 0.10.2, XLA:CPU with
YNNPACK). Anything else (GPU/TPU, grouped, dilated, NCHW) is passed to
``lax.conv_general_dilated`` unchanged.

Formulations (``x_p``: the zero-padded input; ``s``: the stride; ``(i, j)``:
a kernel tap; ``x_ij = x_p[:, i::s, j::s]`` cut to the output size; ``G``:
the output cotangent; ``M``: batch x output pixels):

* ``xla`` -- XLA's convolution, or its transpose for a gradient.
* ``matmul`` -- kh*kw shifted-window matmuls, no im2col buffer: forward
  ``y = sum_ij x_ij W[i, j]``; weight gradient ``dW[i, j] = x_ij^T G``
  (contracting M); input gradient ``dx_p = sum_ij scatter_s(G W[i, j]^T)``,
  each product placed at offset ``(i, j)`` with ``s - 1`` zeros between
  pixels (``lax.pad`` interior padding), then cropped.
* ``elementwise`` (forward) -- ``y = sum_ijc x_ij[..., c] W[i, j, c]``, one
  fused loop; fast when taps x input channels is small (stems).
* ``pretransposed`` (weight gradient) -- XLA's weight-gradient convolution
  (batch = input channel, feature = image) on ``x^T``, which is made by a
  matmul with the identity: XLA needs ``x`` channel-major there and otherwise
  fuses that transpose with the BatchNorm / residual producers of ``x``, a
  slow strided loop (half of a ResNet-20 CPU step).

``algorithm='auto'`` (see :func:`conv_plan`): elementwise forward when
``kh * kw * in_channels <= 36``; matmul for every pass of a 1x1 conv; the
pretransposed weight gradient otherwise; the matmul input gradient when
strided (XLA dilates G with zeros there). Train step, batch 128, shared
2-core CPU (``bench/speed.py``): ResNet-20 on CIFAR shapes 1.39-1.45x the
throughput of XLA's convs, the digits ResNet 1.02-1.14x, GDNSQ W2A2 steps
about the same. The shifted-window matmul weight gradient of 3x3 convs made
FP steps 1.6-1.8x *slower* than ``auto`` (every window is a copy that XLA
lays out transposed for its matmul), so ``auto`` keeps it to 1x1 convs;
``algorithm='matmul'`` forces the matmul formulations everywhere.

``GDNSQ_DISABLE_FAST_CONV=1`` (read at trace time) makes ``auto`` plain
XLA. The custom VJP supports ``grad`` / ``vjp``, ``jit`` and ``vmap``, not
forward-mode ``jvp``.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import functools
import os
from typing import Any, Union

import jax
from jax import lax
import jax.numpy as jnp

__all__ = [
    "ALGORITHMS",
    "ConvPlan",
    "DISABLE_ENV_VAR",
    "ELEMENTWISE_MAX_TAPS",
    "FORMULATIONS",
    "conv_general_dilated",
    "conv_plan",
    "fast_conv_enabled",
    "plain_conv_geometry",
]

ALGORITHMS = ("auto", "matmul", "xla")
"""``auto``: the fastest measured formulation per pass on CPU, lax elsewhere;
``matmul``: shifted-window matmuls for all passes of a plain conv, any
backend; ``xla``: always ``lax.conv_general_dilated``."""

DISABLE_ENV_VAR = "GDNSQ_DISABLE_FAST_CONV"
"""Set to 1 / true / yes to make ``auto`` use ``lax.conv_general_dilated``."""

ELEMENTWISE_MAX_TAPS = 36
"""Largest ``kh * kw * in_channels`` with an elementwise ``auto`` forward
(3x3 with <= 4 input channels: 2-10x faster than XLA; 3x3x8 is slower)."""

FORMULATIONS = {
    "forward": ("elementwise", "matmul", "xla"),
    "weight_grad": ("matmul", "pretransposed", "xla"),
    "input_grad": ("matmul", "xla"),
}
"""The formulations each pass of a :class:`ConvPlan` may use."""

_NHWC = ("NHWC", "HWIO", "NHWC")


@dataclasses.dataclass(frozen=True)
class ConvPlan:
  """How each pass of one convolution is computed (see :data:`FORMULATIONS`).

  Attributes:
    forward: ``elementwise``, ``matmul`` or ``xla``.
    weight_grad: ``matmul``, ``pretransposed`` or ``xla``.
    input_grad: ``matmul`` or ``xla``.
  """

  forward: str = "xla"
  weight_grad: str = "xla"
  input_grad: str = "xla"

  def __post_init__(self):
    for name, allowed in FORMULATIONS.items():
      if getattr(self, name) not in allowed:
        raise ValueError(
            f"unknown {name} formulation {getattr(self, name)!r}; choose one "
            f"of: {', '.join(allowed)}")


def fast_conv_enabled() -> bool:
  """Whether ``algorithm='auto'`` takes the custom path when traced now.

  Returns:
    True when ``jax.default_backend()`` is ``cpu`` and
    :data:`DISABLE_ENV_VAR` is not 1 / true / yes.
  """
  flag = os.environ.get(DISABLE_ENV_VAR, "").strip().lower()
  return flag not in ("1", "true", "yes") and jax.default_backend() == "cpu"


def conv_plan(
    kernel_shape: Sequence[int], strides: Sequence[int], algorithm: str = "auto"
) -> ConvPlan:
  """The :class:`ConvPlan` that ``algorithm`` uses for a plain conv.

  Args:
    kernel_shape: HWIO shape ``(kh, kw, in_channels, out_channels)``.
    strides: ``(stride_h, stride_w)``.
    algorithm: ``auto`` or ``matmul``.

  Returns:
    The plan (``auto``: the rules in the module docstring).

  Raises:
    ValueError: for any other algorithm.
  """
  if algorithm == "matmul":
    return ConvPlan("matmul", "matmul", "matmul")
  if algorithm != "auto":
    raise ValueError(f"conv_plan needs 'auto' or 'matmul', got {algorithm!r}")
  kh, kw, in_channels, _ = kernel_shape
  if kh == kw == 1:
    return ConvPlan("matmul", "matmul", "matmul")
  few_taps = kh * kw * in_channels <= ELEMENTWISE_MAX_TAPS
  return ConvPlan(
      forward="elementwise" if few_taps else "xla",
      weight_grad="pretransposed",
      input_grad="matmul" if max(strides) > 1 else "xla",
  )


def conv_general_dilated(
    lhs: jax.typing.ArrayLike,
    rhs: jax.typing.ArrayLike,
    window_strides: Sequence[int],
    padding: Union[str, Sequence[tuple[int, int]]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
    *,
    algorithm: Union[str, ConvPlan] = "auto",
) -> jax.Array:
  """``lax.conv_general_dilated`` with a fast CPU path for plain 2-D convs.

  Args:
    lhs: the input (NHWC for the fast path).
    rhs: the kernel (HWIO for the fast path).
    window_strides: spatial strides.
    padding: ``'SAME'``, ``'SAME_LOWER'``, ``'VALID'`` or ``(low, high)``
      pairs.
    lhs_dilation: input dilation; other than 1 -> lax.
    rhs_dilation: kernel dilation; other than 1 -> lax.
    dimension_numbers: as lax; the fast path needs NHWC / HWIO / NHWC in any
      spelling (flax passes ``ConvDimensionNumbers``).
    feature_group_count: other than 1 -> lax.
    batch_group_count: other than 1 -> lax.
    precision: passed to lax and to the matmuls.
    preferred_element_type: output dtype, as lax (sums run in >= float32).
    algorithm: one of :data:`ALGORITHMS`, or a :class:`ConvPlan` to use for
      every plain conv on any backend (for benchmarks).

  Returns:
    The convolution: lax's shape and dtype, equal up to float rounding.

  Raises:
    ValueError: for an unknown algorithm (lax raises for invalid convs).
  """
  if isinstance(algorithm, ConvPlan):
    use_custom = True
  elif algorithm in ALGORITHMS:
    use_custom = algorithm == "matmul" or (
        algorithm == "auto" and fast_conv_enabled())
  else:
    raise ValueError(
        f"unknown conv algorithm {algorithm!r}; choose one of: "
        f"{', '.join(ALGORITHMS)} or pass a ConvPlan")
  plain = use_custom and plain_conv_geometry(
      lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
      dimension_numbers, feature_group_count, batch_group_count)
  if not plain:
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, precision=precision,
        preferred_element_type=preferred_element_type)
  strides, pads = plain
  lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
  plan = (algorithm if isinstance(algorithm, ConvPlan)
          else conv_plan(rhs.shape, strides, algorithm))
  return _conv(lhs, rhs, strides, pads, plan, precision, preferred_element_type)


def plain_conv_geometry(lhs, rhs, strides, padding, lhs_dilation,
                        rhs_dilation, dimension_numbers, feature_group_count,
                        batch_group_count, *, depthwise: bool = False):
  """``(strides, pads)`` of a plain NHWC/HWIO conv (lax's arguments), else None.

  Plain: one float dtype, no dilation, pads >= 0, one group (``depthwise``:
  one per input channel, kernel ``(kh, kw, 1, C)``, as train.mobilenet's).
  """
  if jnp.ndim(lhs) != 4 or jnp.ndim(rhs) != 4 or dimension_numbers is None:
    return None
  dtype = jnp.result_type(lhs)
  if dtype != jnp.result_type(rhs) or not jnp.issubdtype(dtype, jnp.floating):
    return None
  lhs_shape, rhs_shape = jnp.shape(lhs), jnp.shape(rhs)
  groups = lhs_shape[3] if depthwise else 1
  unit = lambda d: d is None or all(int(v) == 1 for v in d)
  if (feature_group_count, batch_group_count) != (groups, 1) or not (
      unit(lhs_dilation) and unit(rhs_dilation)):
    return None
  try:
    numbers = lax.conv_dimension_numbers(lhs_shape, rhs_shape, dimension_numbers)
    strides = tuple(int(s) for s in strides)
    if isinstance(padding, str):
      padding = lax.padtype_to_pads(lhs_shape[1:3], rhs_shape[:2], strides,
                                    padding)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  except (TypeError, ValueError):
    return None  # lax raises the informative error
  if (numbers != lax.conv_dimension_numbers(lhs_shape, rhs_shape, _NHWC)
      or lhs_shape[3] != rhs_shape[2] * groups
      or (depthwise and rhs_shape[3] != lhs_shape[3])
      or len(strides) != 2 or min(strides) < 1
      or len(pads) != 2 or min(min(p) for p in pads) < 0):
    return None
  for size, k, (lo, hi) in zip(lhs_shape[1:3], rhs_shape[:2], pads):
    if size + lo + hi < k:
      return None
  return strides, pads


# --- the custom VJP ---------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _conv(lhs, rhs, strides, pads, plan, precision, out_type):
  return _forward(lhs, rhs, strides, pads, plan.forward, precision, out_type)


def _conv_fwd(lhs, rhs, strides, pads, plan, precision, out_type):
  out = _forward(lhs, rhs, strides, pads, plan.forward, precision, out_type)
  return out, (lhs, rhs)


def _conv_bwd(strides, pads, plan, precision, out_type, residuals, cotangent):
  lhs, rhs = residuals
  if plan.input_grad == "matmul":
    d_lhs = _input_grad_matmul(lhs.shape, rhs, cotangent, strides, pads,
                               precision)
  else:
    d_lhs = jax.linear_transpose(
        lambda a: _xla_conv(a, rhs, strides, pads, precision, out_type),
        jax.ShapeDtypeStruct(lhs.shape, lhs.dtype))(cotangent)[0]
  if plan.weight_grad == "matmul":
    d_rhs = _weight_grad_matmul(lhs, rhs.shape, cotangent, strides, pads,
                                precision)
  elif plan.weight_grad == "pretransposed":
    d_rhs = _weight_grad_pretransposed(lhs, rhs.shape, cotangent, strides,
                                       pads, precision)
  else:
    d_rhs = jax.linear_transpose(
        lambda b: _xla_conv(lhs, b, strides, pads, precision, out_type),
        jax.ShapeDtypeStruct(rhs.shape, rhs.dtype))(cotangent)[0]
  return d_lhs.astype(lhs.dtype), d_rhs.astype(rhs.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


# --- the formulations -------------------------------------------------------


def _xla_conv(lhs, rhs, strides, pads, precision, out_type):
  return lax.conv_general_dilated(
      lhs, rhs, strides, pads, dimension_numbers=_NHWC, precision=precision,
      preferred_element_type=out_type)


def _types(*dtypes):
  """(common operand dtype, accumulation dtype >= float32)."""
  common = jnp.result_type(*dtypes)
  return common, jnp.promote_types(common, jnp.float32)


def _windows(lhs, kernel_hw, strides, pads):
  """The shifted strided windows ``x_ij`` (N, Ho, Wo, C), taps row-major."""
  n, h, w, c = lhs.shape
  (kh, kw), (sh, sw), ((pt, pb), (pl, pr)) = kernel_hw, strides, pads
  ho, wo = (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1
  padded = jnp.pad(lhs, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  return [
      lax.slice(padded, (0, i, j, 0),
                (n, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c),
                (1, sh, sw, 1))
      for i in range(kh) for j in range(kw)
  ]


def _forward(lhs, rhs, strides, pads, formulation, precision, out_type):
  """The convolution by ``formulation`` (elementwise / matmul / xla)."""
  if formulation == "xla":
    return _xla_conv(lhs, rhs, strides, pads, precision, out_type)
  _, acc_type = _types(lhs.dtype)
  kh, kw, in_channels, _ = rhs.shape
  total = None
  for tap, window in enumerate(_windows(lhs, (kh, kw), strides, pads)):
    weights = rhs[tap // kw, tap % kw]
    if formulation == "elementwise":
      window, weights = window.astype(acc_type), weights.astype(acc_type)
      terms = [window[..., c:c + 1] * weights[c] for c in range(in_channels)]
    else:
      terms = [lax.dot_general(window, weights, (((3,), (0,)), ((), ())),
                               precision=precision,
                               preferred_element_type=acc_type)]
    for term in terms:
      total = term if total is None else total + term
  return total.astype(out_type if out_type is not None else lhs.dtype)


def _weight_grad_matmul(lhs, kernel_shape, cotangent, strides, pads, precision):
  """``dW[i, j] = x_ij^T G``: one matmul over batch x space per tap."""
  common, acc_type = _types(lhs.dtype, cotangent.dtype)
  cotangent = cotangent.astype(common)
  grads = [
      lax.dot_general(window.astype(common), cotangent,
                      (((0, 1, 2), (0, 1, 2)), ((), ())), precision=precision,
                      preferred_element_type=acc_type)
      for window in _windows(lhs, kernel_shape[:2], strides, pads)
  ]
  return jnp.stack(grads).reshape(kernel_shape)


def _weight_grad_pretransposed(lhs, kernel_shape, cotangent, strides, pads,
                               precision):
  """XLA's weight-gradient conv on ``x^T = I x`` (channel-major input).

  ``dW[i, j, c, o] = sum_{n,h,w} x_p[n, s h + i, s w + j, c] G[n, h, w, o]``
  is a convolution with batch ``c``, feature ``n`` and kernel ``G`` dilated
  by ``s``; its spatial output is cut to ``(kh, kw)``.
  """
  n, h, w, c = lhs.shape
  kh, kw = kernel_shape[:2]
  common, _ = _types(lhs.dtype, cotangent.dtype)
  identity = jnp.eye(c, dtype=common)
  lhs_t = lax.dot_general(identity, lhs.astype(common).reshape(-1, c),
                          (((1,), (1,)), ((), ())),
                          precision=lax.Precision.HIGHEST).reshape(c, n, h, w)
  grad = lax.conv_general_dilated(
      lhs_t, cotangent.astype(common), (1, 1), pads, rhs_dilation=strides,
      dimension_numbers=("NCHW", "IHWO", "NHWC"), precision=precision)
  return grad[:, :kh, :kw, :].transpose(1, 2, 0, 3)


def _input_grad_matmul(lhs_shape, rhs, cotangent, strides, pads, precision):
  """``dx = crop(sum_ij scatter_s(G W[i, j]^T))``: one matmul per tap.

  Tap (i, j) of output pixel (h, w) reads padded pixel ``(s h + i, s w + j)``,
  so ``G W[i, j]^T`` is put there by ``lax.pad`` (low ``i``, interior
  ``s - 1``); the sum is cropped to the unpadded input.
  """
  n, h, w, c = lhs_shape
  kh, kw = rhs.shape[:2]
  (sh, sw), ((pt, pb), (pl, pr)) = strides, pads
  ho, wo = cotangent.shape[1:3]
  common, acc_type = _types(rhs.dtype, cotangent.dtype)
  cotangent, rhs = cotangent.astype(common), rhs.astype(common)
  zero = jnp.zeros((), acc_type)
  total = None
  for i in range(kh):
    for j in range(kw):
      product = lax.dot_general(cotangent, rhs[i, j], (((3,), (1,)), ((), ())),
                                precision=precision,
                                preferred_element_type=acc_type)
      placed = lax.pad(product, zero, (
          (0, 0, 0),
          (i, h + pt + pb - i - sh * (ho - 1) - 1, sh - 1),
          (j, w + pl + pr - j - sw * (wo - 1) - 1, sw - 1),
          (0, 0, 0)))
      total = placed if total is None else total + placed
  return lax.slice(total, (0, pt, pl, 0), (n, pt + h, pl + w, c))
