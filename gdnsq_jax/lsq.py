"""LSQ fixed-bit quantizers: the baseline GDNSQ is compared against.

Learned Step Size Quantization (Esser et al., ICLR 2020, arXiv 1902.08153)
learns the step size ``s`` of a grid with a *fixed* number of levels ``2^B``
and scales the step's gradient by ``g = 1 / sqrt(N * Qp)``, ``N`` the number
of values sharing the step, ``Qp = 2^B - 1`` the top code. docs/method.md D13:
this baseline belongs to benchmarks, not to GDNSQ's estimator list, so it is
a quantizer family of its own (``QuantSettings(method='lsq')``), with the
params of the GDNSQ layers so that calibration, placement and reports work
unchanged:

* weights: ``W_hat = s_c * clip(round((W - z_c) / s_c), 0, Qp) + z_c`` with
  GDNSQ's asymmetric grid (zero point ``z_c`` = channel min, a constant of
  the step), so that only the width rule and the estimator differ;
* activations: ``x_hat = s * clip(round((x - b) / s), 0, Qp) + b`` with the
  learnable lower clamp ``b`` (LSQ+'s offset). The grid width is tied to the
  step, ``q = 2^B s``; the layer's ``log2_range`` param is not used.

Gradients are LSQ's: straight-through inside the grid and zero outside for
the input; ``g * (round(v) - v)`` inside and ``g * Qp`` above the grid for
the step (``g * -Qn = 0`` below, as the grid starts at code 0); no dither.
The params hold ``log2 s``, so the step's gradient reaches them times
``ln2 * s``. Note that with GDNSQ's RAdam optimizer a constant ``g`` per
quantizer changes the updates only through RAdam's ``eps``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

__all__ = [
    "lsq_gradient_scale",
    "lsq_quantize_activation",
    "lsq_quantize_weight",
    "scale_gradient",
]


def _check_bits(bits) -> int:
  if not (float(bits).is_integer() and 1 <= bits < 32):
    raise ValueError(
        f"LSQ needs an integer bit-width in [1, 31], got {bits!r}")
  return int(bits)


def lsq_gradient_scale(num_elements: int, bits: int) -> float:
  """LSQ's step-gradient scale ``1 / sqrt(N * Qp)``, ``Qp = 2^bits - 1``."""
  bits = _check_bits(bits)
  if num_elements < 1:
    raise ValueError(f"num_elements must be >= 1, got {num_elements}")
  return 1.0 / math.sqrt(num_elements * (2.0**bits - 1.0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def scale_gradient(x: jax.Array, scale: float) -> jax.Array:
  """Identity whose backward multiplies the cotangent by ``scale``."""
  return x


def _scale_gradient_fwd(x, scale):
  del scale
  return x, None


def _scale_gradient_bwd(scale, _, g):
  return (g * jnp.asarray(scale, g.dtype),)


scale_gradient.defvjp(_scale_gradient_fwd, _scale_gradient_bwd)


def _codes(v: jax.Array, bits: int) -> jax.Array:
  """``round(clip(v, 0, Qp))``; backward: 1 on ``0 <= v <= Qp``, else 0.

  ``jnp.clip`` would halve the gradient where ``v`` equals a bound (ReLU
  zeros at ``b = 0``), so the clamp is written with ``where`` (ties keep the
  gradient, as ``torch.clamp`` in LSQ's reference implementations).
  """
  top = 2.0**bits - 1.0
  c = jnp.where(v < 0.0, 0.0, jnp.where(v > top, top, v))
  return c + jax.lax.stop_gradient(jnp.round(c) - c)


def lsq_quantize_weight(
    kernel: jax.Array,
    log2_step: jax.Array,
    *,
    bits: int,
    per_channel: bool = True,
) -> jax.Array:
  """LSQ fake quantization of a kernel to ``2^bits`` levels.

  Args:
    kernel: Flax kernel with output channels on the last axis.
    log2_step: ``(out,)`` when ``per_channel`` else a scalar.
    bits: the fixed bit-width ``B`` (codes ``0 .. 2^B - 1``).
    per_channel: one step and zero point per output channel, or per tensor.

  Returns:
    The fake-quantized kernel, in ``kernel.dtype``.
  """
  bits = _check_bits(bits)
  expected = (kernel.shape[-1],) if per_channel else ()
  if jnp.shape(log2_step) != expected:
    raise ValueError(
        f"log2_step has shape {jnp.shape(log2_step)} but a "
        f"{'per-channel' if per_channel else 'per-tensor'} quantizer of a "
        f"kernel of shape {kernel.shape} needs shape {expected}")
  w = kernel.astype(jnp.float32)
  per_step = w.size // kernel.shape[-1] if per_channel else w.size
  step = scale_gradient(jnp.exp2(jnp.asarray(log2_step, jnp.float32)),
                        lsq_gradient_scale(per_step, bits))
  axes = tuple(range(w.ndim - 1)) if per_channel else None
  zero = jax.lax.stop_gradient(jnp.min(w, axis=axes, keepdims=per_channel))
  codes = _codes((w - zero) / step, bits)
  return (step * codes + zero).astype(kernel.dtype)


def lsq_quantize_activation(
    x: jax.Array,
    log2_step: jax.Array,
    clamp_low: jax.Array,
    *,
    bits: int,
) -> jax.Array:
  """LSQ(+) fake quantization of activations to ``2^bits`` levels.

  Args:
    x: activations with the batch on axis 0 (any other shape).
    log2_step: scalar log2 of the step ``s``.
    clamp_low: scalar lower clamp and zero point ``b``.
    bits: the fixed bit-width ``B``; the grid is ``[b, b + (2^B - 1) s]``.

  Returns:
    Fake-quantized activations in ``x.dtype``. The step's gradient is
    scaled by ``1 / sqrt(N * Qp)`` with ``N`` the features per example.
  """
  bits = _check_bits(bits)
  for name, p in (("log2_step", log2_step), ("clamp_low", clamp_low)):
    if jnp.size(p) != 1:
      raise ValueError(f"{name} must be a scalar (per-tensor activation "
                       f"quantizer), got shape {jnp.shape(p)}")
  features = x.size // x.shape[0] if x.ndim > 1 else x.size
  step = scale_gradient(
      jnp.exp2(jnp.asarray(log2_step, jnp.float32).reshape(())),
      lsq_gradient_scale(max(features, 1), bits))
  low = jnp.asarray(clamp_low, jnp.float32).reshape(())
  codes = _codes((x.astype(jnp.float32) - low) / step, bits)
  return (step * codes + low).astype(x.dtype)
