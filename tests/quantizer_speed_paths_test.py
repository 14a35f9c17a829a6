"""The fused ``ste`` / ``rounding_error`` activation quantizer equals the composition.

:func:`gdnsq_jax.quantize_activation` runs ``ste`` and ``rounding_error`` as one fused
primitive for speed (issue 6). Its forward must equal the composition
``c + s N(v, s)`` of docs/method.md §2.2 and §4.3 (arXiv 2508.14004)
bit for bit, and its gradients must be that composition's autodiff: the input
gradient exactly, the scalar gradients up to float32 summation order.
"""

from __future__ import annotations

import functools
import itertools
import math

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np

from gdnsq_jax import activation_quantizer
from gdnsq_jax import dither as dither_lib
from gdnsq_jax import quantizers

LN2 = math.log(2.0)
PARAMS = (-1.0, 1.5, -0.25)  # log2_step, log2_range, clamp_low: 2 bits + a bit


def _composed(x, log2_step, log2_range, clamp_low, key=None, *,
              estimator="ste", dither="uniform12"):
  """The quantizer written out with the public rounding-noise primitive."""
  xf = x.astype(jnp.float32)
  s, q = jnp.exp2(log2_step), jnp.exp2(log2_range)
  high = clamp_low + q - s
  c = jnp.where(xf < clamp_low, clamp_low, jnp.where(xf > high, high, xf))
  noise = quantizers.rounding_noise((c - clamp_low) / s, s, key, estimator,
                                    dither)
  return (c + s * noise).astype(x.dtype)


def _loss(fn, x, log2_step, log2_range, clamp_low, upstream, key=None,
          **kwargs):
  return jnp.sum(upstream * fn(x, log2_step, log2_range, clamp_low, key,
                               **kwargs))


def _inputs(shape=(10, 100), seed=0):
  """Activations below, inside and above [b, b + q - s], with exact ties."""
  x = 1.5 * jax.random.normal(jax.random.key(seed), shape)
  s, q, b = 2.0**PARAMS[0], 2.0**PARAMS[1], PARAMS[2]
  ties = jnp.array([b, b + q - s, -jnp.inf, jnp.inf, 0.0, -0.0])
  x = x.reshape(-1).at[:ties.size].set(ties).reshape(shape)
  upstream = jax.random.normal(jax.random.key(seed + 1), shape)
  return x, upstream


class FusedForwardTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(jnp.float32, jnp.bfloat16)
  def test_forward_is_the_composition_bit_for_bit(self, dtype):
    x, _ = _inputs()
    x = x.astype(dtype)
    for estimator in ("ste", "rounding_error"):
      fused = self.variant(functools.partial(
          activation_quantizer.quantize_activation, estimator=estimator))(x, *PARAMS)
      self.assertEqual(fused.dtype, dtype)
      chex.assert_trees_all_equal(
          fused, jax.jit(_composed)(x, *[jnp.float32(p) for p in PARAMS]))


class FusedBackwardTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(itertools.product(
      ("ste", "rounding_error"), dither_lib.DITHERS, (False, True)))
  def test_gradients_are_the_composition_autodiff(self, estimator, dither,
                                                  with_key):
    # 1000 elements: not a multiple of the 512-element summation block.
    x, upstream = _inputs()
    key = jax.random.key(7) if with_key else None
    kwargs = dict(estimator=estimator, dither=dither)
    args = (x, *[jnp.float32(p) for p in PARAMS], upstream, key)
    argnums = (0, 1, 2, 3)
    fused = self.variant(jax.grad(functools.partial(
        _loss, activation_quantizer.quantize_activation, **kwargs), argnums))(*args)
    composed = jax.jit(jax.grad(functools.partial(
        _loss, _composed, **kwargs), argnums))(*args)
    chex.assert_trees_all_equal(fused[0], composed[0])  # input gradient
    # Scalars: sums of 1000 terms of size ~1 in another order, so float32
    # rounding of ~1e-7 of the terms' magnitude.
    chex.assert_trees_all_close(fused[1:], composed[1:], rtol=1e-5,
                                atol=1e-5)

  def test_scalar_gradients_match_a_float64_sum(self):
    # 2**18 elements: the blocked sums keep float32 accuracy
    # (docs/method.md §4.3:
    # dL/ds = sum G n - sum G[above], dL/dq = sum G[above], dL/db = sum G
    # over both clamped sides; chained to the log2 params by ln2 * 2**l).
    x, upstream = _inputs(shape=(64, 64, 64), seed=3)
    grads = jax.jit(jax.grad(functools.partial(
        _loss, activation_quantizer.quantize_activation, estimator="ste"),
        (1, 2, 3)))(x, *[jnp.float32(p) for p in PARAMS], upstream)
    xs, g = np.asarray(x, np.float32), np.asarray(upstream, np.float64)
    s, q, b = (np.float32(2.0**PARAMS[0]), np.float32(2.0**PARAMS[1]),
               np.float32(PARAMS[2]))
    high = b + q - s
    below, above = xs < b, xs > high
    v = (np.clip(xs, b, high) - b) / s
    n = (np.round(v) - v).astype(np.float64)
    expected = (LN2 * s * (np.sum(g * n) - g[above].sum()),
                LN2 * q * g[above].sum(), g[below | above].sum())
    np.testing.assert_allclose(np.asarray(grads, np.float64), expected,
                               rtol=2e-6)

  @parameterized.parameters(
      (activation_quantizer._CPU_SUM_BLOCK, (7, 13)),  # padded last block
      (activation_quantizer._CPU_SUM_BLOCK, (64, 64)),
      (activation_quantizer._SUM_BLOCK, (7, 13)),
      (activation_quantizer._SUM_BLOCK, (3, 1000)))
  def test_blocked_sums_equal_float64_sums(self, block, shape):
    # The CPU backward sums rows of 8, other platforms rows of 512; both
    # must give every term's sum to float32 accuracy, padding included.
    terms = [jax.random.normal(jax.random.key(i), shape) + i
             for i in range(3)]
    sums = jax.jit(functools.partial(
        activation_quantizer._blocked_sums, block=block))(terms)
    self.assertLen(sums, 3)
    for total, term in zip(sums, terms):
      self.assertEqual(total.shape, ())
      np.testing.assert_allclose(
          float(total), np.sum(np.asarray(term, np.float64)), rtol=1e-6)

  def test_vmap_matches_a_loop(self):
    x, upstream = _inputs(shape=(3, 40))
    params = [jnp.float32(p) for p in PARAMS]
    grad = jax.grad(functools.partial(_loss, activation_quantizer.quantize_activation),
                    (0, 1))
    keys = jax.random.split(jax.random.key(2), 3)
    mapped = jax.jit(jax.vmap(
        lambda x, g, k: grad(x, *params, g, k)))(x, upstream, keys)
    for i in range(3):
      chex.assert_trees_all_close(
          jax.tree.map(lambda t, i=i: t[i], mapped),
          grad(x[i], *params, upstream[i], keys[i]), rtol=1e-6, atol=1e-6)

  def test_shard_map_sums_replicated_scalar_gradients(self):
    # Data parallel: activations sharded over 4 devices, quantizer params
    # replicated; the params get the sum over devices, i.e. the full batch.
    x, upstream = _inputs(shape=(8, 125))
    params = [jnp.float32(p) for p in PARAMS]
    grad = jax.grad(functools.partial(
        _loss, activation_quantizer.quantize_activation, estimator="rounding_error"),
        (0, 1, 2, 3))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("data",))
    rep, data = jax.sharding.PartitionSpec(), jax.sharding.PartitionSpec("data")
    sharded = jax.jit(jax.shard_map(
        lambda x, g, *p: grad(x, *p, g), mesh=mesh,
        in_specs=(data, data, rep, rep, rep),
        out_specs=(data, rep, rep, rep)))(x, upstream, *params)
    chex.assert_trees_all_close(sharded, grad(x, *params, upstream),
                                rtol=1e-5, atol=1e-5)


if __name__ == "__main__":
  absltest.main()
