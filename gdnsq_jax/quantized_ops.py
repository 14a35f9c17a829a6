"""The per-op quantization core: pure functions of arrays and params (any front end).

A quantized weight-bearing op (conv, dense, ``DenseGeneral``, einsum)
computes ``op(quantize_input(x, input_params), quantize_kernel(kernel,
log2_step))`` (docs/method.md §3, §5): the op itself, its padding, groups,
axes or equation, is the layer's own. This module holds everything between
the params and those two operands, with no framework in it: the Linen glue
(:mod:`gdnsq_jax.layers`, :mod:`gdnsq_jax.interception`) creates params in a
module scope and calls these functions, and an NNX front end calls the same
ones on its own variables.

* :func:`weight_step_shape` -- the shape of a kernel's ``log2_step`` (the
  names and pre-calibration values of every param:
  :mod:`gdnsq_jax.quantizer_params`);
* :func:`quantize_kernel` -- any kernel layout: the output-channel axes are
  those ``log2_step`` keeps (:mod:`gdnsq_jax.channels`);
* :func:`quantize_input` and :func:`input_statistics` -- the input quantizer
  and what calibration / width measurement record of it;
* :func:`observing` -- calibration's observation pass: every quantizer is
  the identity, so ranges are those of the full-precision network
  (docs/method.md §6).

The family (GDNSQ or the LSQ baseline, :mod:`gdnsq_jax.families`) comes from
``settings.family``.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp

from gdnsq_jax import channels
from gdnsq_jax.bitwidths import activation_code_range
from gdnsq_jax.settings import QuantSettings

__all__ = [
    "STAT_REDUCERS",
    "input_statistics",
    "is_observing",
    "observing",
    "quantize_input",
    "quantize_kernel",
    "weight_step_shape",
]

STAT_REDUCERS: dict[str, tuple[Callable[..., jax.Array], float]] = {
    "input_min": (jnp.minimum, float("inf")),
    "input_max": (jnp.maximum, float("-inf")),
    "code_min": (jnp.minimum, float("inf")),
    "code_max": (jnp.maximum, float("-inf")),
    "input_sum": (jnp.add, 0.0),  # with input_count: the input mean (LSQ init)
    "input_count": (jnp.add, 0.0),
}
"""Recorded statistic -> (reduction across calls and batches, its identity)."""

_observation = threading.local()


@contextlib.contextmanager
def observing() -> Iterator[None]:
  """While active (at trace time), quantizers are the identity.

  Calibration traces its observation pass inside it, so every input
  quantizer records the input of the *full-precision* network: nothing
  upstream is clamped to an initial grid (a LayerNorm output or a linear
  bottleneck keeps its negative values; docs/method.md §6).

  The flag is read when a function is traced: a function jitted and traced
  before, then called inside the context, keeps the quantizers it was
  traced with (calibration traces its own jitted pass, so it is unaffected).
  """
  _observation.depth = getattr(_observation, "depth", 0) + 1
  try:
    yield
  finally:
    _observation.depth -= 1


def is_observing() -> bool:
  """Whether :func:`observing` is active on this thread."""
  return getattr(_observation, "depth", 0) > 0


def weight_step_shape(kernel_shape: Sequence[int],
                      channel_axes: Sequence[int],
                      settings: QuantSettings) -> tuple[int, ...]:
  """Shape of a kernel's ``log2_step``: one per output channel, or ``()``."""
  return channels.step_shape(kernel_shape, channel_axes, settings.per_channel)


def quantize_kernel(kernel: jax.Array, log2_step: jax.Array,
                    key: Optional[jax.Array],
                    settings: QuantSettings) -> jax.Array:
  """The fake-quantized kernel the op uses (docs/method.md §2.1).

  Args:
    kernel: the latent kernel, any layout.
    log2_step: one per output channel, broadcasting against ``kernel``
      (:mod:`gdnsq_jax.channels`), or a scalar.
    key: the dither key (None: no dither).
    settings: quantization settings (family, estimator, dither).

  Returns:
    ``W_hat`` of ``kernel``'s shape and dtype; ``kernel`` itself when the
    quantizers are off (``settings.enabled=False`` or :func:`observing`).
  """
  if not settings.enabled or is_observing():
    return kernel
  flat, restore = channels.to_channels_last(kernel, jnp.shape(log2_step))
  if flat is not kernel:
    log2_step = jnp.reshape(log2_step, (flat.shape[-1],))
  return restore(settings.family.quantize_weight(flat, log2_step, key,
                                                 settings))


def quantize_input(x: jax.Array, params: Mapping[str, jax.Array],
                   key: Optional[jax.Array],
                   settings: QuantSettings) -> jax.Array:
  """An input quantizer on ``x`` (docs/method.md §2.2).

  Args:
    x: the op's input.
    params: ``log2_step``, ``log2_range``, ``clamp_low`` (scalars).
    key: the dither key (None: no dither).
    settings: quantization settings.

  Returns:
    ``x_hat`` of ``x``'s shape and dtype; ``x`` when the quantizers are off.
  """
  if not settings.enabled or is_observing():
    return x
  family = settings.family
  return family.quantize_activation(x, family.activation_grid(params, settings),
                                    key, settings)


def input_statistics(x: jax.Array, params: Mapping[str, jax.Array],
                     settings: QuantSettings) -> dict[str, jax.Array]:
  """What an input quantizer records (reduced by :data:`STAT_REDUCERS`).

  ``input_min`` / ``input_max`` / ``input_sum`` / ``input_count`` of ``x``
  (calibration) and ``code_min`` / ``code_max`` of its integer codes on the
  effective grid (true widths, docs/method.md D11); no gradient.
  """
  xs = jax.lax.stop_gradient(x).astype(jnp.float32)
  log2_step, log2_range, clamp_low = settings.family.activation_grid(
      params, settings)
  code_min, code_max = activation_code_range(xs, log2_step, log2_range,
                                             clamp_low)
  return {
      "input_min": jnp.min(xs),
      "input_max": jnp.max(xs),
      "code_min": code_min,
      "code_max": code_max,
      "input_sum": jnp.sum(xs),
      "input_count": jnp.float32(xs.size),
  }
