"""GDNSQ's step-size dither: counter-based, hashed inside the backward.

The step gradient of a quantizer takes a Rademacher dither ``rho``
(``+-1/(2 sqrt 3)`` by default; docs/method.md §4.1, D2) per element of the
quantized array. No quantizer draws it with the PRNG: the training step
passes one key per step, each quantizer xors that key with a static hash of
its module path and call count (:func:`quantizer_id`, :func:`dither_key`),
and its backward hashes (key, element index // 32) into a word whose bits
are the signs of 32 consecutive elements (:func:`dither_values`): integer
arithmetic that XLA fuses into the pass that uses ``rho``, with the same
draw for the same key (resume).

How the dither enters the gradients (the ``pure`` option included) is the
backward of :func:`gdnsq_jax.quantizers.rounding_noise` and of
:func:`gdnsq_jax.activation_quantizer.quantize_activation`; under
``shard_map`` they pass this device's global element offset
(:func:`gdnsq_jax.quantizers.global_index_offset`) as ``index_offset``.
"""

from __future__ import annotations

import hashlib
import math
from typing import Sequence

import jax
from jax import lax
import jax.numpy as jnp

__all__ = [
    "DITHERS",
    "dither_key",
    "dither_values",
    "quantizer_id",
    "validate_dither",
]

DITHERS = ("uniform12", "half", "pure")
"""Step-size dither options.

* ``uniform12``: rho = +-1/(2 sqrt 3), variance 1/12 (the default;
  docs/method.md D2);
* ``half``: rho = +-1/2, variance 1/4 (the reference's tagged GDNSQ release);
* ``pure``: the total step gradient is the pure dither ``sum G * rho``
  (rho = +-1/(2 sqrt 3)) without the product-rule ``sum G * n`` term
  (the ablation of docs/method.md D1).
"""

_DITHER_AMPLITUDE = {
    "uniform12": 0.5 / math.sqrt(3.0),
    "half": 0.5,
    "pure": 0.5 / math.sqrt(3.0),
}


def validate_dither(dither: str) -> str:
  """Returns ``dither`` or raises a ValueError listing the valid names."""
  if dither not in DITHERS:
    raise ValueError(
        f"unknown dither {dither!r}; choose one of: {', '.join(DITHERS)}"
    )
  return dither


# Multipliers of C. Wellons' "lowbias32" integer hash (hash-prospector,
# 2018): x ^= x >> 16; x *= M0; x ^= x >> 15; x *= M1; x ^= x >> 16.
_MIX_MULTIPLIERS = (0x7FEB352D, 0x846CA68B)


def _mix32(x):
  """lowbias32 on uint32 arrays, or on Python ints (at trace time)."""
  m0, m1 = _MIX_MULTIPLIERS
  if isinstance(x, int):
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * m0) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * m1) & 0xFFFFFFFF
    return x ^ (x >> 16)
  x = x ^ (x >> 16)
  x = x * jnp.uint32(m0)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(m1)
  return x ^ (x >> 16)


def _key_words(key) -> tuple[jax.Array, jax.Array]:
  """Two uint32 words of a PRNG key (typed, or raw key data of any size)."""
  key = jnp.asarray(key)
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  words = key.astype(jnp.uint32).reshape(-1)
  second = words[1] if words.size > 1 else jnp.uint32(0x6A09E667)
  for extra in range(2, words.size):  # e.g. the 4 words of an 'rbg' key
    second = _mix32(second ^ words[extra])
  return words[0], second


def quantizer_id(names: Sequence[str], call: int = 1) -> int:
  """The static dither id of a quantizer: its module path and call count.

  What Flax's ``make_rng`` folds in (the module path names and the how-many-th
  draw in that scope), hashed at trace time: the Linen layers
  (:mod:`gdnsq_jax.layers`) and the NNX layers (:mod:`gdnsq_jax.nnx_quantize`)
  derive it alike, so a model written in either API, with the same paths and
  step key, draws the same dither.

  Args:
    names: the quantizer's module path, e.g. ``('body', 'input_quantizer')``.
    call: its 1-based call count within one model call.

  Returns:
    An int below ``2**64`` for :func:`dither_key`.
  """
  digest = hashlib.sha1(repr(tuple(names) + (call,)).encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "little")


def dither_key(key: jax.Array, quantizer_id: int) -> jax.Array:
  """The dither key of one quantizer: ``key``'s words xor a hash of its id.

  ``quantizer_id`` is a static int (< 2**64), e.g. a hash of the module path
  (:mod:`gdnsq_jax.layers`), so the derivation is two xors with constants,
  fused into the quantizer's backward: no PRNG fold-in per quantizer.

  Args:
    key: the step's PRNG key (typed or raw uint32 key data).
    quantizer_id: static int telling apart quantizers that share ``key``.

  Returns:
    Raw key data, uint32 of shape (2,), for :func:`dither_values`.
  """
  low, high = quantizer_id & 0xFFFFFFFF, (quantizer_id >> 32) & 0xFFFFFFFF
  return jnp.stack(_key_words(key)) ^ jnp.array(
      [_mix32(low ^ 0x9E3779B9), _mix32(_mix32(high) ^ low)], jnp.uint32)


_WORD_BITS = 32
"""Signs per hash word: element ``i`` reads bit ``i % 32`` of word
``i // 32``."""


def dither_values(
    key: jax.Array,
    shape: tuple[int, ...],
    dither: str,
    index_offset=0,
) -> jax.Array:
  """The step-size dither ``rho``: ``+-amplitude`` per element, float32.

  Counter-based: element ``i`` (row-major, plus ``index_offset``) gets bit
  ``i % 32`` of the word ``mix(mix(i // 32 ^ s0) ^ s1)``, with ``mix`` the
  lowbias32 integer hash and ``(s0, s1)`` the key's two words mixed together
  (scalar work, once per call: keys a few bits apart give unrelated seeds).
  One hash per 32 elements, then a shift and a mask per element: XLA fuses
  it into the backward pass that uses ``rho`` (no random-bit kernels), and
  on a CPU it costs a fraction of a hash per element (measured on a
  128x28x28x16 activation: 0.6-1.8 ms against 5.8 ms for one hash per
  element). Each element is ``+amplitude`` or ``-amplitude`` with
  probability 1/2, independently across elements, quantizers
  (:func:`dither_key`) and steps (tests/dither_test.py checks mean,
  variance and correlations, at lags across word boundaries too); the same
  key gives the same dither (resume), and a block at ``index_offset`` gives
  the elements of the whole array at those indices (``shard_map``).

  Args:
    key: PRNG key (typed or raw uint32 key data, e.g. from
      :func:`dither_key`).
    shape: shape of the dithered array.
    dither: one of :data:`DITHERS` (sets the amplitude).
    index_offset: added to the element index (an int, or a uint32 scalar
      under ``shard_map``; see
      :func:`gdnsq_jax.quantizers.global_index_offset`).

  Returns:
    ``rho`` of shape ``shape``.
  """
  amplitude = jnp.float32(_DITHER_AMPLITUDE[dither])
  word0, word1 = _key_words(key)
  seed0 = _mix32(word0 ^ _mix32(word1 ^ jnp.uint32(0x6A09E667)))
  seed1 = _mix32(word1 ^ _mix32(seed0 ^ jnp.uint32(0xBB67AE85)))
  shape = tuple(shape)
  size = math.prod(shape)
  static = isinstance(index_offset, int)
  if static:  # the word of element 0 and the bit it starts at
    first = (index_offset // _WORD_BITS) % 2**32
    skip = index_offset % _WORD_BITS
  else:
    offset = jnp.asarray(index_offset, jnp.uint32)
    first, skip = offset // _WORD_BITS, offset % _WORD_BITS
  # One more word when the block does not start on a word boundary.
  count = -(-size // _WORD_BITS) + (0 if static and skip == 0 else 1)
  words = lax.iota(jnp.uint32, count) + jnp.asarray(first, jnp.uint32)
  words = _mix32(_mix32(words ^ seed0) ^ seed1)
  bits = (words[:, None] >> lax.iota(jnp.uint32, _WORD_BITS)[None, :]) & 1
  bits = bits.reshape(-1)
  bits = (bits[skip:skip + size] if static
          else lax.dynamic_slice(bits, (skip,), (size,)))
  return jnp.where(bits.reshape(shape) == 1, amplitude, -amplitude)
