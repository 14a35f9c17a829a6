"""numpy references of gdnsq_jax.quantizers, shared by the quantizer tests.

The references follow the formulas of docs/method.md §2, §3 and §4
in numpy float32; the losses wrap the quantizers so that ``jax.grad`` gives
the backward of an upstream gradient ``G``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from gdnsq_jax import activation_quantizer
from gdnsq_jax import quantizers

LN2 = math.log(2.0)  # d 2^l / dl = ln2 * 2^l


def random_kernel(seed=0, shape=(3, 3, 2, 4), scale=1.0) -> jax.Array:
  """A standard normal float32 kernel of ``shape`` times ``scale``."""
  return scale * jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def weight_reference(kernel, log2_step, per_channel=True):
  """numpy s*round((W - z)/s) + z with z the channel (or tensor) minimum.

  Returns:
    ``(quantized, z, s, v)`` with ``v = (W - z) / s`` before rounding.
  """
  w = np.asarray(kernel, np.float32)
  s = np.exp2(np.asarray(log2_step, np.float32))
  axes = tuple(range(w.ndim - 1)) if per_channel else None
  z = w.min(axis=axes, keepdims=per_channel)
  codes = np.round((w - z) / s)
  return s * codes + z, z, s, (w - z) / s


def activation_reference(x, log2_step, log2_range, clamp_low):
  """numpy s*round(v) + b, v = (clip(x, b, b + q - s) - b) / s.

  Returns:
    ``(quantized, v)``.
  """
  x = np.asarray(x, np.float32)
  s, q = np.float32(2.0**log2_step), np.float32(2.0**log2_range)
  b = np.float32(clamp_low)
  v = (np.clip(x, b, b + q - s) - b) / s
  return s * np.round(v) + b, v


def weight_loss(kernel, log2_step, upstream, key=None, **kwargs):
  """``sum(G * quantize_weight(...))``: its gradient is the backward of G."""
  return jnp.sum(
      upstream * quantizers.quantize_weight(kernel, log2_step, key, **kwargs)
  )


def activation_loss(x, log2_step, log2_range, clamp_low, upstream, key=None,
                    **kwargs):
  """``sum(G * quantize_activation(...))``: its gradient is G's backward."""
  out = activation_quantizer.quantize_activation(
      x, log2_step, log2_range, clamp_low, key, **kwargs)
  return jnp.sum(upstream * out)
