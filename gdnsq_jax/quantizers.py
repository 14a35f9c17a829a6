"""GDNSQ fake-quantization numerics: pure functions around custom_vjps.

Reference: S. Salishev, I. Akhremchik, "GDNSQ: Gradual Differentiable Noise
Scale Quantization for Low-bit Neural Networks", arXiv 2508.14004.

A quantizer with step ``s = 2**log2_step`` and zero point ``z`` maps an input
``c`` to ``s * round((c - z) / s) + z``. GDNSQ treats the rounding error
``n = round(v) - v`` (``v = (c - z) / s``) as additive noise whose derivative
is customised by :func:`rounding_noise`:

* the input sees a straight-through gradient (or the EWGS / AEWGS
  correction), and
* the step size sees a random dither ``rho`` (``+-1/(2 sqrt 3)`` by default),
  hashed from the step key, the quantizer and the element index
  (:mod:`gdnsq_jax.dither`).

The quantizers are written as ``c + s * N(v, s)``, which equals
``(v + N) * s + z`` algebraically, so ordinary autodiff produces the
product-rule terms of the reference composition (docs/method.md §4.3):

* weights (``ste``): ``dL/dW = G`` exactly (the zero-point path cancels) and
  ``dL/ds_c = sum_c G * (n + s_c * rho)``;
* activations (``ste``): ``dL/dx = G`` inside ``[b, b + q - s]`` (a value on a
  bound keeps its gradient), ``dL/db`` = sum of G over clamped elements,
  ``dL/dq`` = sum of G above the top, ``dL/ds = sum G * (n + s rho) - sum
  G[above]``.

The activation quantizer, :func:`gdnsq_jax.activation_quantizer.quantize_activation`,
is built on the same primitive and lives in its own module.

All arithmetic runs in float32 whatever the input dtype; the output has the
input dtype. Every function is pure and works under ``jit``, ``grad``,
``vmap`` and ``shard_map`` (pass ``axis_name`` to average AEWGS statistics
across a data-parallel axis).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
from jax import lax
import jax.numpy as jnp

from gdnsq_jax.dither import dither_values
from gdnsq_jax.dither import validate_dither

__all__ = [
    "ESTIMATORS",
    "RENAMED_ESTIMATORS",
    "quantize_weight",
    "rounding_noise",
    "validate_estimator",
    "weight_channel_range",
]

ESTIMATORS = ("aewgs", "ewgs", "rounding_error", "ste")
"""Backward rules of the rounding noise (docs/method.md §4.1)."""

EWGS_DELTA = 0.01
"""EWGS scaling factor delta (docs/method.md D13)."""

AEWGS_VARIANCE_FLOOR = 1e-3
AEWGS_MAX_PHI = 0.99  # the input-gradient multiplier 1 - phi stays >= 0.01

_FLOAT32_INTEGER_LIMIT = 2.0**23  # every float32 of this size is an integer

RENAMED_ESTIMATORS = {"lsq": "rounding_error"}
"""Old estimator spellings: ``lsq`` read as the LSQ baseline, which it is not."""


def validate_estimator(estimator: str) -> str:
  """Returns ``estimator`` or raises a ValueError listing the valid names."""
  if estimator in RENAMED_ESTIMATORS:
    raise ValueError(
        f"estimator {estimator!r} is now spelled "
        f"{RENAMED_ESTIMATORS[estimator]!r} (the reference's variant it calls "
        "'LSQ': step gradient from the rounding error, no gradient scale); "
        "the LSQ baseline itself is QuantSettings(method='lsq') "
        "(docs/method.md D13)")
  if estimator not in ESTIMATORS:
    raise ValueError(
        f"unknown estimator {estimator!r}; choose one of: "
        f"{', '.join(ESTIMATORS)}"
    )
  return estimator


def _sum_to_shape(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Sums ``x`` over the axes along which ``shape`` was broadcast to it."""
  lead = x.ndim - len(shape)
  axes = tuple(range(lead)) + tuple(
      lead + i
      for i, d in enumerate(shape)
      if d == 1 and x.shape[lead + i] != 1
  )
  if axes:
    x = jnp.sum(x, axis=axes)
  return x.reshape(shape)


def _varying_axes(x: jax.Array) -> frozenset:
  """Manual mesh axes (shard_map) along which ``x`` varies; empty outside."""
  typeof = getattr(jax, "typeof", None)  # absent from older jax
  if typeof is None:
    return frozenset()
  aval = typeof(x)
  manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.10
  if manual is not None:
    return frozenset(manual.varying)
  return frozenset(getattr(aval, "vma", ()))  # earlier jax releases


def sum_to_primal_axes(cotangent: jax.Array, primal: jax.Array) -> jax.Array:
  """psums a cotangent over mesh axes where it varies but its primal doesn't.

  Under ``shard_map`` a replicated parameter (a step size, or a kernel under
  data parallelism) receives the sum of the per-device cotangents, which is
  what JAX's own transpose rules do for ordinary operations.
  """
  extra = _varying_axes(cotangent) - _varying_axes(primal)
  return lax.psum(cotangent, tuple(extra)) if extra else cotangent


def _broadcast_axes(shape: tuple[int, ...], ndim: int) -> tuple[int, ...]:
  """Axes of an ``ndim`` array along which a ``shape`` array is broadcast."""
  lead = ndim - len(shape)
  return tuple(range(lead)) + tuple(
      lead + i for i, d in enumerate(shape) if d == 1
  )


def global_index_offset(x: jax.Array):
  """Offset of this device's block of ``x`` under ``shard_map``, else 0.

  Where ``x`` varies over manual mesh axes (a batch-sharded activation) the
  block of device ``d`` starts at global element ``d * x.size`` for
  sharding along the leading axis, so the dither of the sharded program
  equals the unsharded one. A replicated ``x`` (a data-parallel kernel)
  keeps offset 0: every device dithers the same elements alike.
  """
  axes = _varying_axes(x)
  if not axes:
    return 0
  device = lax.axis_index(tuple(sorted(axes)))
  return device.astype(jnp.uint32) * jnp.uint32(x.size % 2**32)


# ---------------------------------------------------------------------------
# The rounding-noise primitive.
# ---------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def rounding_noise(
    v: jax.Array,
    step: jax.Array,
    key: Optional[jax.Array],
    estimator: str = "ste",
    dither: str = "uniform12",
    axis_name: Optional[str] = None,
) -> jax.Array:
  """The rounding error ``round(v) - v`` with GDNSQ's custom backward.

  Forward: ``N(v, s) = round(v) - v`` (round half to even, like torch.round).
  Where ``|v| >= 2**23`` every float32 is already an integer, so ``N = 0``
  exactly; this also holds for ``v`` that overflowed to ``inf`` (a grid far
  finer than float32 at that magnitude), which would otherwise give NaN.
  Backward, with ``g = dL/dN`` and ``e = round(v) - v``:

  * input term ``dL/dv`` (added to the straight-through ``g`` that reaches
    ``v`` through ``v + N``):

    - ``ste``, ``rounding_error``: 0;
    - ``ewgs``: ``-delta |g| e`` with delta = 0.01, so the total input
      gradient is ``g + delta |g| (v - round v)`` (Lee et al., 2021);
    - ``aewgs``: ``-g phi`` with ``phi = min(delta sign(g) e, 0.99)`` and
      ``delta = mean(sign(g) e) / max(var(e), 1e-3)`` over the axes along
      which ``step`` is broadcast (per output channel for weights, the whole
      tensor for activations), statistics under ``stop_gradient`` and
      averaged over ``axis_name`` when given. The multiplier ``1 - phi`` is
      therefore >= 0.01.

  * step term ``dL/ds`` (summed to ``step``'s shape):

    - ``ste``, ``ewgs``, ``aewgs``: ``g * rho`` with ``rho`` a Rademacher
      dither of amplitude 1/(2 sqrt 3) hashed from ``key`` and the element
      index (:func:`gdnsq_jax.dither.dither_values`; ``dither='half'``:
      amplitude 1/2; ``dither='pure'``: ``g * (rho - e) / s``, which turns the
      total step gradient of a quantizer into ``sum G rho``);
    - ``rounding_error``: ``g * e`` (the reference's variant it calls
      ``LSQ``, without LSQ's gradient scale).

    With ``key=None`` the dither is zero (deterministic backward).

  Under ``shard_map``, a cotangent that varies over a mesh axis along which
  its primal is replicated (a replicated step, or a replicated kernel with
  per-device upstream gradients) is summed over that axis, as JAX's own
  transpose rules do for ordinary operations. A ``v`` sharded over a mesh
  axis is dithered by its global element index (:func:`global_index_offset`).

  Args:
    v: the scaled input ``(c - z) / s``, float32.
    step: the step size ``s``, broadcastable to ``v``.
    key: a PRNG key for the dither (typed or raw), or None.
    estimator: one of :data:`ESTIMATORS`.
    dither: one of :data:`gdnsq_jax.dither.DITHERS`.
    axis_name: optional named axis over which AEWGS statistics are averaged.

  Returns:
    ``round(v) - v`` with ``v``'s shape and dtype.
  """
  del step, key, estimator, dither, axis_name
  return rounding_error(v)


def rounding_error(v: jax.Array) -> jax.Array:
  """``round(v) - v``, and 0 where ``|v| >= 2**23`` (including ``inf``)."""
  return jnp.where(jnp.abs(v) < _FLOAT32_INTEGER_LIMIT, jnp.round(v) - v, 0.0)


def _rounding_noise_fwd(v, step, key, estimator, dither, axis_name):
  del estimator, dither, axis_name
  e = rounding_error(v)
  return e, (e, step, key)


def _rounding_noise_bwd(estimator, dither, axis_name, residuals, g):
  e, step, key = residuals
  if estimator == "rounding_error":
    step_term = g * e
  else:
    if key is None:
      rho = jnp.zeros_like(e)
    else:
      rho = dither_values(key, e.shape, dither, global_index_offset(e))
    if dither == "pure":
      step_term = g * (rho - e) / step
    else:
      step_term = g * rho
  step_grad = _sum_to_shape(step_term, step.shape).astype(step.dtype)

  if estimator in ("ste", "rounding_error"):
    v_grad = None  # a symbolic zero: no pass over v's producers
  elif estimator == "ewgs":
    v_grad = -EWGS_DELTA * jnp.abs(g) * e
  elif estimator == "aewgs":
    axes = _broadcast_axes(step.shape, e.ndim)
    sign_g = jnp.sign(g)
    stats = (
        jnp.mean(sign_g * e, axis=axes, keepdims=True),
        jnp.mean(e * e, axis=axes, keepdims=True),
        jnp.mean(e, axis=axes, keepdims=True),
    )
    stats = lax.stop_gradient(stats)
    if axis_name is not None:
      stats = lax.pmean(stats, axis_name)
    mean_sign_e, mean_e2, mean_e = stats
    delta = mean_sign_e / jnp.maximum(
        mean_e2 - mean_e * mean_e, AEWGS_VARIANCE_FLOOR
    )
    phi = jnp.minimum(delta * sign_g * e, AEWGS_MAX_PHI)
    v_grad = -g * phi
  else:  # validated by the public entry points
    raise ValueError(validate_estimator(estimator))
  return (
      None if v_grad is None else sum_to_primal_axes(v_grad, e),
      sum_to_primal_axes(step_grad, step),
      None,
  )


rounding_noise.defvjp(_rounding_noise_fwd, _rounding_noise_bwd)


# ---------------------------------------------------------------------------
# Weight and activation quantizers.
# ---------------------------------------------------------------------------


def weight_channel_range(
    kernel: jax.Array, per_channel: bool = True
) -> tuple[jax.Array, jax.Array]:
  """Per-output-channel (last axis) or per-tensor min and max of a kernel.

  Flax kernels keep output channels last: Dense ``(in, out)``, Conv
  ``(kh, kw, in, out)``.

  Returns:
    ``(minimum, maximum)`` in float32, shape ``(out,)`` or ``()``.
  """
  k = kernel.astype(jnp.float32)
  axes = tuple(range(k.ndim - 1)) if per_channel else None
  return jnp.min(k, axis=axes), jnp.max(k, axis=axes)


def quantize_weight(
    kernel: jax.Array,
    log2_step: jax.Array,
    key: Optional[jax.Array] = None,
    *,
    estimator: str = "ste",
    dither: str = "uniform12",
    per_channel: bool = True,
    axis_name: Optional[str] = None,
) -> jax.Array:
  """Asymmetric fake quantization of a kernel (docs/method.md §2.1).

  ``W_hat = s_c * round((W - z_c) / s_c) + z_c`` with ``s_c = 2**log2_step``
  and zero point ``z_c = min(W[..., c])`` recomputed from the current kernel
  on every call; no clamp, so the grid always covers the channel and codes
  lie in ``{0, ..., round(R_c / s_c)}`` with ``R_c = max - min``.

  Args:
    kernel: Flax kernel with output channels on the last axis.
    log2_step: ``(out,)`` when ``per_channel`` else a scalar.
    key: PRNG key for the step-size dither (None: no dither).
    estimator: backward rule, one of :data:`ESTIMATORS`.
    dither: one of :data:`gdnsq_jax.dither.DITHERS`.
    per_channel: per-output-channel (default) or per-tensor step and zero.
    axis_name: named data-parallel axis for AEWGS statistics.

  Returns:
    The fake-quantized kernel, in ``kernel.dtype``.
  """
  validate_estimator(estimator)
  validate_dither(dither)
  expected = (kernel.shape[-1],) if per_channel else ()
  if jnp.shape(log2_step) != expected:
    raise ValueError(
        f"log2_step has shape {jnp.shape(log2_step)} but a "
        f"{'per-channel' if per_channel else 'per-tensor'} quantizer of a "
        f"kernel of shape {kernel.shape} needs shape {expected}"
    )
  w = kernel.astype(jnp.float32)
  step = jnp.exp2(jnp.asarray(log2_step, jnp.float32))
  axes = tuple(range(w.ndim - 1)) if per_channel else None
  zero = jnp.min(w, axis=axes, keepdims=per_channel)
  v = (w - zero) / step
  out = w + step * rounding_noise(v, step, key, estimator, dither, axis_name)
  return out.astype(kernel.dtype)
