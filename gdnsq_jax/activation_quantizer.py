"""GDNSQ's per-tensor activation quantizer (docs/method.md §2.2, §4.3).

``x_hat = s * round((clip(x, b, b + q - s) - b) / s) + b`` with ``s =
2**log2_step``, ``q = 2**log2_range`` and the learnable lower clamp ``b``,
written as ``c + s * N(v, s)`` on :func:`gdnsq_jax.quantizers.rounding_noise`
so that autodiff gives the reference's product-rule terms:
``dL/dx = G`` inside ``[b, b + q - s]`` (a value on a bound keeps its
gradient), ``dL/db`` = sum of G over clamped elements, ``dL/dq`` = sum of G
above the top, ``dL/ds = sum G * (n + s rho) - sum G[above]``.

For ``ste`` (the default) or ``rounding_error`` the same values come from one fused
primitive, ``_quantize_clamped``: its backward recomputes the rounding error
and the dither from the input in two fused passes instead of writing them to
memory, which cut the quantizers' cost in a CPU train step several fold
(bench/speed.py); on a CPU its input is written once and its scalar sums
run in vectorised blocks (:func:`_materialized`, :func:`_sums`). Float32
arithmetic whatever the input dtype.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
from jax import lax
import jax.numpy as jnp

from gdnsq_jax.dither import dither_values
from gdnsq_jax.dither import validate_dither
from gdnsq_jax.quantizers import global_index_offset
from gdnsq_jax.quantizers import rounding_error
from gdnsq_jax.quantizers import rounding_noise
from gdnsq_jax.quantizers import sum_to_primal_axes
from gdnsq_jax.quantizers import validate_estimator

__all__ = ["quantize_activation"]


def _clamp(x: jax.Array, low: jax.Array, high: jax.Array) -> jax.Array:
  """Clamp with PyTorch's gradient routing: ties keep the gradient on x."""
  return jnp.where(x < low, low, jnp.where(x > high, high, x))


# ---------------------------------------------------------------------------
# The activation quantizer for ``ste`` / ``rounding_error`` as one fused
# primitive.
# ---------------------------------------------------------------------------


def _clamped_rounding(x, step, width, low):
  """Masks ``x < b`` and ``x > b + q - s``, the clip ``c`` and ``round(v) - v``.

  ``c - b`` is formed branch by branch from ``x`` (``b - b`` below,
  ``high - b`` above, ``x - b`` inside: the values ``c - b`` has), so ``c``
  has one user and XLA fuses the quantizer instead of writing ``c`` out.
  """
  high = low + width - step
  below, above = x < low, x > high
  c = jnp.where(below, low, jnp.where(above, high, x))
  offset = jnp.where(below, low - low, jnp.where(above, high - low, x - low))
  return below, above, c, rounding_error(offset / step)


def _materialized(x: jax.Array, anchor: jax.Array) -> jax.Array:
  """``x``, written to memory once on CPU for all its consumers.

  XLA:CPU fuses cheap producers into every consumer: the quantizer's input
  (BatchNorm, residual add, ReLU of one or two conv outputs) would be
  recomputed in its forward, its backward and the other users of that
  input, and a sum of padded tap products (a strided conv's input gradient,
  the backward's ``g``) written out as each padded product, several times
  ``x``'s size. A conditional is a fusion boundary that XLA keeps (it drops
  ``optimization_barrier`` on CPU); both branches are the identity (``x *
  1`` is exact), so its predicate only has to be one that XLA cannot fold:
  a comparison of ``anchor`` (any float scalar of the computation) behind
  an ``optimization_barrier``. Other platforms get ``x`` as it is (a
  conditional can cost a device-to-host read of the predicate there).
  """
  def write_once(x):
    flag = lax.optimization_barrier(anchor) >= 0
    return lax.cond(flag, lambda t: t, lambda t: t * 1.0, x)
  return lax.platform_dependent(x, cpu=write_once, default=lambda x: x)


_SUM_BLOCK = 512  # elements summed in sequence before the tree sum
_CPU_SUM_BLOCK = 8  # XLA:CPU vectorises a variadic reduce of rows this short


def _blocked_sums(terms: list[jax.Array], block: int) -> list[jax.Array]:
  """The sums of equally shaped arrays: one variadic reduce of ``block``-long
  rows of every term (computed on the fly), then one sum per term."""
  pad = -terms[0].size % block
  blocks = [jnp.pad(t.reshape(-1), (0, pad)).reshape(-1, block)
            for t in terms]
  block_sums = lax.reduce(
      blocks, [jnp.zeros((), t.dtype) for t in terms],
      lambda a, b: [p + q for p, q in zip(a, b)], (1,))
  return [jnp.sum(s) for s in block_sums]


def _sums(terms: list[jax.Array]) -> list[jax.Array]:
  """The sums of equally shaped arrays, with one pass over their inputs.

  One variadic reduce computes the terms on the fly and sums blocks of
  each (XLA would otherwise give each sum a library reduction whose
  operands, broadcast scalars included, are first written to memory); one
  sum per term then adds the block sums. On a CPU the blocks are
  :data:`_CPU_SUM_BLOCK` elements long: XLA:CPU emits a reduce as a scalar
  loop per output element, and with rows of 8 it vectorises across rows,
  while the block sums, a plain array, go to its vectorised library
  reduction (in the digits W2A2 train step the activation quantizers'
  backward took 4.8 ms against 18.2 ms with rows of 512, by
  ``python -m bench.profile_step``). Elsewhere the blocks are
  :data:`_SUM_BLOCK` long (one kernel, then a small one). The rounding error
  stays that of a blocked sum (~1e-7 relative).
  """
  return lax.platform_dependent(
      terms,
      cpu=lambda terms: _blocked_sums(terms, _CPU_SUM_BLOCK),
      default=lambda terms: _blocked_sums(terms, _SUM_BLOCK))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _quantize_clamped(x, step, width, low, key, estimator, dither):
  """Fused float32 ``quantize_activation`` (``dL/dc = G``: ste, rounding_error).

  The forward is the composition's; the backward is autodiff of
  ``c + s N(v, s)`` term by term, summed in another order. Only ``x`` is
  kept: masks, rounding error and dither are recomputed in two fused passes
  (the input gradient; one reduce for the scalar gradients).
  """
  del key, estimator, dither
  _, _, c, e = _clamped_rounding(x, step, width, low)
  return c + step * e


def _quantize_clamped_fwd(x, step, width, low, key, estimator, dither):
  # Written once (CPU): XLA would otherwise recompute x's producers (a
  # BatchNorm, a residual add, a ReLU) in each of its consumers here and
  # in the backward.
  x = _materialized(x, step)
  _, _, c, e = _clamped_rounding(x, step, width, low)
  return c + step * e, (x, step, width, low, key)


def _quantize_clamped_bwd(estimator, dither, residuals, g):
  x, step, width, low, key = residuals
  # Opaque scalars: XLA would otherwise merge the recomputed rounding error
  # with the forward's and keep that array alive until the backward.
  step, width, low = lax.optimization_barrier((step, width, low))
  g = _materialized(g, step)
  below, above, _, e = _clamped_rounding(x, step, width, low)
  zero = jnp.zeros_like(g)
  at_high = jnp.where(below, zero, jnp.where(above, g, zero))
  terms = [g * e, jnp.where(below, g, zero), at_high]  # s * N; b; b + q - s
  g_noise = step * g  # dL/dN, as the composition's
  if estimator == "rounding_error":
    terms.append(g_noise * e)
  elif key is not None or dither == "pure":  # else the step term is 0
    rho = zero if key is None else dither_values(
        key, g.shape, dither, global_index_offset(x))
    terms.append(g_noise * (rho - e) / step if dither == "pure"
                 else g_noise * rho)
  sums = _sums(terms)
  cotangents = (
      jnp.where(below, zero, jnp.where(above, zero, g)),
      sum(sums[3:], sums[0]) - sums[2],  # dL/ds
      sums[2],  # dL/dq
      sums[1] + sums[2],  # dL/db
  )
  return tuple(sum_to_primal_axes(c, p) for c, p in zip(
      cotangents, (x, step, width, low))) + (None,)


_quantize_clamped.defvjp(_quantize_clamped_fwd, _quantize_clamped_bwd)


def quantize_activation(
    x: jax.Array,
    log2_step: jax.Array,
    log2_range: jax.Array,
    clamp_low: jax.Array,
    key: Optional[jax.Array] = None,
    *,
    estimator: str = "ste",
    dither: str = "uniform12",
    axis_name: Optional[str] = None,
    enabled: bool = True,
) -> jax.Array:
  """Per-tensor clamp-and-round activation quantizer (docs/method.md §2.2).

  With ``s = 2**log2_step``, ``q = 2**log2_range`` and ``b = clamp_low``:
  ``c = clip(x, b, b + q - s)`` and ``x_hat = s * round((c - b) / s) + b``,
  codes in ``{0, ..., round(q / s - 1)}``. The clamp routes gradients like
  ``torch.clamp``: an input equal to a bound passes its gradient to ``x``.
  ``ste`` and ``rounding_error`` run as one fused primitive with the same values (the
  backward of the composition ``c + s N(v, s)`` up to float32 summation
  order); ``ewgs`` and ``aewgs`` differentiate the composition.

  Args:
    x: activations, any shape and float dtype.
    log2_step: scalar log2 of the step size.
    log2_range: scalar log2 of the grid width ``q`` (levels x step).
    clamp_low: scalar lower clamp and zero point ``b``.
    key: PRNG key for the step-size dither (None: no dither).
    estimator: backward rule (``ste`` for activations, docs/method.md D4).
    dither: one of :data:`gdnsq_jax.dither.DITHERS`.
    axis_name: named data-parallel axis for AEWGS statistics.
    enabled: False returns ``x`` unchanged (A >= 32; docs/method.md D12).

  Returns:
    Fake-quantized activations in ``x.dtype``.
  """
  validate_estimator(estimator)
  validate_dither(dither)
  if not enabled:
    return x
  for name, p in (
      ("log2_step", log2_step),
      ("log2_range", log2_range),
      ("clamp_low", clamp_low),
  ):
    if jnp.size(p) != 1:
      raise ValueError(
          f"{name} must be a scalar (per-tensor activation quantizer), got "
          f"shape {jnp.shape(p)}"
      )
  step = jnp.exp2(jnp.asarray(log2_step, jnp.float32).reshape(()))
  width = jnp.exp2(jnp.asarray(log2_range, jnp.float32).reshape(()))
  low = jnp.asarray(clamp_low, jnp.float32).reshape(())
  xf = x.astype(jnp.float32)
  if estimator in ("ste", "rounding_error"):
    out = _quantize_clamped(xf, step, width, low, key, estimator, dither)
  else:  # the composition c + s N(v, s), differentiated by JAX
    c = _clamp(xf, low, low + width - step)
    out = c + step * rounding_noise(
        (c - low) / step, step, key, estimator, dither, axis_name)
  return out.astype(x.dtype)
