"""Weight channels: which kernel entries share a weight step (docs/method.md §2.1).

The one convention, shared by every kernel layout (conv, dense,
``DenseGeneral``, einsum) and by every reader of the params (bit-widths,
calibration, export): a weight quantizer's ``log2_step`` *broadcasts against
its kernel* by numpy's rules (right-aligned). A kernel axis that ``log2_step``
lacks, or holds with size 1, is *reduced*: its entries share one step and one
zero point (``z_c`` = their minimum). The other axes are the output-channel
axes, one step per output channel.

* conv ``(kh, kw, in, out)`` and dense ``(in, out)``: ``log2_step`` ``(out,)``;
* ``DenseGeneral(features=(heads, dim))`` kernel ``(in, heads, dim)``:
  ``(heads, dim)``; its ``out`` projection ``(heads, dim, out)``: ``(out,)``;
* einsum ``'bd,hd->bh'`` kernel ``(h, d)``: ``(h, 1)``;
* per tensor: ``()``.

:func:`step_shape` builds that shape from the output-channel axes (the
axes before the first output-channel axis dropped, so conv and dense keep
their ``(out,)``).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "channel_axes",
    "channel_range",
    "entries_per_channel",
    "reduced_axes",
    "step_shape",
    "to_channels_last",
]


def step_shape(kernel_shape: Sequence[int], channel_axes: Sequence[int],
               per_channel: bool = True) -> tuple[int, ...]:
  """The ``log2_step`` shape of a kernel with these output-channel axes.

  Args:
    kernel_shape: the kernel's shape.
    channel_axes: its output-channel axes (negative values allowed).
    per_channel: False gives the per-tensor shape ``()``.

  Returns:
    ``kernel_shape`` from its first output-channel axis on, with every
    other axis set to 1 (``()`` without output-channel axes).
  """
  if not per_channel:
    return ()
  ndim = len(kernel_shape)
  axes = {a % ndim for a in channel_axes}
  start = min(axes, default=ndim)
  return tuple(int(d) if i in axes else 1
               for i, d in enumerate(kernel_shape) if i >= start)


def _aligned(kernel_shape, shape):
  kernel_shape, shape = tuple(kernel_shape), tuple(shape)
  if len(shape) > len(kernel_shape) or any(
      s not in (1, k) for s, k in zip(shape[::-1], kernel_shape[::-1])):
    raise ValueError(
        f"log2_step shape {shape} does not broadcast against kernel shape "
        f"{kernel_shape}: a weight step is one value per output channel, with "
        "size 1 (or absent) on the kernel's reduced axes (gdnsq_jax.channels)")
  return (1,) * (len(kernel_shape) - len(shape)) + shape


def channel_axes(kernel_shape: Sequence[int],
                 shape: Sequence[int]) -> tuple[int, ...]:
  """Kernel axes with one step per entry (``log2_step`` shape ``shape``)."""
  full = _aligned(kernel_shape, shape)
  return tuple(i for i, (s, k) in enumerate(zip(full, kernel_shape))
               if s == k and k != 1)


def reduced_axes(kernel_shape: Sequence[int],
                 shape: Sequence[int]) -> tuple[int, ...]:
  """Kernel axes whose entries share a step (the complement)."""
  keep = set(channel_axes(kernel_shape, shape))
  return tuple(i for i in range(len(kernel_shape)) if i not in keep)


def entries_per_channel(kernel_shape: Sequence[int],
                        shape: Sequence[int]) -> int:
  """Kernel entries sharing one step (a conv's ``kh * kw * in``)."""
  return int(np.prod([kernel_shape[i] for i in
                      reduced_axes(kernel_shape, shape)], dtype=np.int64))


def channel_range(kernel: jax.Array, shape: Sequence[int]
                  ) -> tuple[jax.Array, jax.Array]:
  """Min and max of each channel, float32, with ``log2_step``'s shape."""
  k = jnp.asarray(kernel, jnp.float32)
  axes = reduced_axes(k.shape, shape)
  lo = jnp.min(k, axis=axes, keepdims=True)
  hi = jnp.max(k, axis=axes, keepdims=True)
  return lo.reshape(tuple(shape)), hi.reshape(tuple(shape))


def to_channels_last(kernel: jax.Array, shape: Sequence[int]):
  """``kernel`` as ``(entries, channels)`` and the function undoing it.

  Conv / dense kernels (one trailing channel axis) and per-tensor steps are
  returned unchanged, so their quantization is exactly that of
  :func:`gdnsq_jax.quantizers.quantize_weight`.

  Returns:
    ``(kernel_2d, restore)`` with ``restore(kernel_2d)`` of ``kernel``'s
    shape; ``kernel_2d`` is ``kernel`` itself when no change is needed.
  """
  shape = tuple(shape)
  if shape == () or shape == (kernel.shape[-1],):
    _aligned(kernel.shape, shape)
    return kernel, lambda k: k
  keep = channel_axes(kernel.shape, shape)
  reduce = tuple(i for i in range(kernel.ndim) if i not in keep)
  order = reduce + keep
  moved = jnp.transpose(kernel, order)
  flat = moved.reshape((-1, int(np.prod([kernel.shape[i] for i in keep],
                                        dtype=np.int64))))
  inverse = tuple(int(i) for i in np.argsort(order))

  def restore(k2):
    return jnp.transpose(k2.reshape(moved.shape), inverse)

  return flat, restore
