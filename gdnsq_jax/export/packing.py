"""Dense bit packing of unsigned integer codes (the integer export's format).

A quantized layer's weight codes ``k`` lie in ``{0, ..., 2**bits - 1}``
(docs/method.md §2.1: unsigned codes above the channel minimum). They are
stored in the smallest *container* of :data:`CONTAINER_BITS` that holds
``bits``:

========  =========  ==============
bits      container  codes per byte
========  =========  ==============
1         1          8
2         2          4
3, 4      4          2
5 .. 8    8          1
9 .. 16   16         1/2 (two bytes, little-endian)
17 .. 32  32         1/4 (four bytes, little-endian)
========  =========  ==============

Layout: the codes are flattened in C order; within a byte the first code
takes the lowest bits (code ``i`` of a byte is ``(byte >> (i * c)) & (2**c -
1)`` for container ``c``); the last byte is padded with zero bits. So
``count`` codes of container ``c`` take ``ceil(count * c / 8)`` bytes.

:func:`pack_codes` / :func:`unpack_codes` run on the host (numpy);
:func:`unpack_codes_jax` is the same unpacking as traceable JAX operations, so
a jitted or ``jax.export``-ed function can hold the packed bytes as constants.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "CONTAINER_BITS",
    "bits_for_max_code",
    "container_bits",
    "pack_codes",
    "packed_size",
    "unpack_codes",
    "unpack_codes_jax",
]

CONTAINER_BITS = (1, 2, 4, 8, 16, 32)
"""Storage widths; a code of ``bits`` bits uses the smallest one >= bits."""

_WIDE_DTYPES = {8: np.dtype("u1"), 16: np.dtype("<u2"), 32: np.dtype("<u4")}


def container_bits(bits: int) -> int:
  """The storage width of ``bits``-bit codes (see the module table).

  Raises:
    ValueError: ``bits`` is not an integer in 1..32.
  """
  if isinstance(bits, bool) or int(bits) != bits or not 1 <= bits <= 32:
    raise ValueError(
        f"bits={bits!r} must be an integer in 1..32 (an integer export "
        "stores unsigned codes of at most 32 bits)"
    )
  return next(c for c in CONTAINER_BITS if c >= bits)


def bits_for_max_code(max_code: int) -> int:
  """Integer bits holding codes ``0..max_code``: ``ceil(log2(max_code + 1))``.

  At least 1 (a layer whose codes are all 0 still stores one bit per code).
  """
  max_code = int(max_code)
  if max_code < 0:
    raise ValueError(f"max_code={max_code} must be >= 0 (codes are unsigned)")
  return max(1, max_code.bit_length())


def packed_size(count: int, bits: int) -> int:
  """Bytes taken by ``count`` codes of ``bits`` bits: ``ceil(count c / 8)``."""
  return math.ceil(int(count) * container_bits(bits) / 8)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
  """Packs unsigned integer codes densely for their bit-width.

  Args:
    codes: integer array of any shape, values in ``[0, 2**bits)``.
    bits: the codes' bit-width (1..32).

  Returns:
    A flat ``uint8`` array of :func:`packed_size` bytes.

  Raises:
    ValueError: non-integer codes, or a code outside ``[0, 2**bits)``.
  """
  codes = np.asarray(codes)
  c = container_bits(bits)
  if codes.size and not np.issubdtype(codes.dtype, np.integer):
    raise ValueError(
        f"codes have dtype {codes.dtype}; pass integer codes (round and cast "
        "the quantized values first)"
    )
  flat = codes.reshape(-1).astype(np.int64)
  if flat.size and (flat.min() < 0 or flat.max() >= 2**bits):
    raise ValueError(
        f"codes span [{flat.min()}, {flat.max()}] but {bits}-bit codes must "
        f"lie in [0, {2**bits - 1}]; pass the layer's true bit-width"
    )
  if c >= 8:
    return np.ascontiguousarray(flat.astype(_WIDE_DTYPES[c])).view(np.uint8)
  per_byte = 8 // c
  padded = np.zeros(math.ceil(flat.size / per_byte) * per_byte, np.int64)
  padded[: flat.size] = flat
  shifts = np.arange(per_byte, dtype=np.int64) * c
  packed = np.sum(padded.reshape(-1, per_byte) << shifts, axis=1)
  return packed.astype(np.uint8)


def _check_packed(packed, bits: int, count: int) -> None:
  expected = packed_size(count, bits)
  if packed.dtype != np.uint8 or packed.ndim != 1:
    raise ValueError(
        f"packed codes must be a flat uint8 array, got {packed.dtype} of "
        f"shape {packed.shape}"
    )
  if packed.shape[0] != expected:
    raise ValueError(
        f"{count} codes of {bits} bits take {expected} bytes but "
        f"{packed.shape[0]} were given; the packed array is truncated or "
        "belongs to another tensor"
    )


def unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
  """Inverse of :func:`pack_codes` (exact), on the host.

  Args:
    packed: the flat ``uint8`` array :func:`pack_codes` returned.
    bits: the codes' bit-width.
    count: the number of codes (the unpacked size).

  Returns:
    A flat array of ``count`` codes: ``uint8`` for containers up to 8 bits,
    else ``uint16`` / ``uint32``.

  Raises:
    ValueError: wrong dtype, or a byte count that does not match.
  """
  packed = np.asarray(packed)
  _check_packed(packed, bits, count)
  c = container_bits(bits)
  if c >= 8:
    little_endian = packed.view(_WIDE_DTYPES[c])
    return little_endian.astype(little_endian.dtype.newbyteorder("="))
  shifts = np.arange(8 // c, dtype=np.uint8) * c
  codes = (packed[:, None] >> shifts) & np.uint8(2**c - 1)
  return codes.reshape(-1)[:count]


def unpack_codes_jax(packed: jax.Array, bits: int, count: int) -> jax.Array:
  """Traceable :func:`unpack_codes`: the same codes, as ``int32``.

  Only shifts, masks and reshapes, so it lowers to any backend and to
  StableHLO; ``bits`` and ``count`` are static.

  Args:
    packed: flat ``uint8`` array of ``packed_size(count, bits)`` bytes.
    bits: the codes' bit-width.
    count: the number of codes.

  Returns:
    A flat ``int32`` array of ``count`` codes (a 32-bit code >= 2**31 wraps
    to a negative value; widths used by the export stay far below).
  """
  if tuple(packed.shape) != (packed_size(count, bits),):
    raise ValueError(
        f"{count} codes of {bits} bits take {packed_size(count, bits)} bytes, "
        f"got packed shape {tuple(packed.shape)}"
    )
  c = container_bits(bits)
  data = jnp.asarray(packed, jnp.uint8).astype(jnp.uint32)
  if c >= 8:
    width = c // 8
    shifts = jnp.arange(width, dtype=jnp.uint32) * 8
    codes = jnp.sum(data.reshape(-1, width) << shifts, axis=1, dtype=jnp.uint32)
  else:
    shifts = jnp.arange(8 // c, dtype=jnp.uint32) * c
    codes = ((data[:, None] >> shifts) & jnp.uint32(2**c - 1)).reshape(-1)
  return codes[:count].astype(jnp.int32)
