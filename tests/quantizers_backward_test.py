"""Backward tests of the EWGS/AEWGS estimators in gdnsq_jax.quantizers.

Also their cross-device statistics under shard_map/vmap with ``axis_name``
(docs/method.md §4, §14). Expected values are hand-derived in
numpy float32 (tests/quantizer_reference.py).
"""

from __future__ import annotations

import functools
import itertools

from absl.testing import absltest
import chex
import jax
import jax.numpy as jnp
import numpy as np

from gdnsq_jax import quantizers
from tests import quantizer_reference as ref


class EWGSTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_ewgs_input_gradient(self):
    # W_hat = W + s N(v, s), v = (W - z) / s, dL/dN = s G. EWGS gives
    # dL/dv = -0.01 |s G| (round v - v), so dL/dW = G + 0.01 |G| (v - round v)
    # directly, and the zero point (channel argmin) collects minus the
    # channel sum of the correction through v's -z / s.
    kernel, upstream = ref.random_kernel(), ref.random_kernel(seed=5)
    log2_step = jnp.array([-3.0, -2.0, -4.0, -1.0])
    grad = self.variant(jax.grad(functools.partial(
        ref.weight_loss, estimator="ewgs")))(
            kernel, log2_step, upstream, jax.random.key(0))
    _, _, _, v = ref.weight_reference(kernel, log2_step)
    g = np.asarray(upstream)
    correction = 0.01 * np.abs(g) * (v - np.round(v))
    w = np.asarray(kernel)
    at_min = w == w.min(axis=(0, 1, 2), keepdims=True)
    expected = g + correction - at_min * correction.sum(axis=(0, 1, 2))
    chex.assert_trees_all_close(grad, expected, atol=1e-6, rtol=1e-5)
    x = kernel.reshape(-1, 4)  # inside the interval: pure EWGS on x
    gx = self.variant(jax.grad(functools.partial(
        ref.activation_loss, estimator="ewgs")))(
            x, -3.0, 4.0, -8.0, upstream.reshape(-1, 4))
    _, v = ref.activation_reference(x, -3.0, 4.0, -8.0)
    g = g.reshape(-1, 4)
    chex.assert_trees_all_close(
        gx, g + 0.01 * np.abs(g) * (v - np.round(v)), atol=1e-6, rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_aewgs_delta_per_channel_with_variance_floor(self):
    rng = np.random.default_rng(0)
    s = np.float32(0.25)
    # Channel 0 sits within +-0.01 of the grid: var(e) < 1e-3 hits the floor.
    v = np.stack([rng.integers(1, 8, 32) + rng.uniform(-0.01, 0.01, 32),
                  rng.uniform(0.5, 8, 32), rng.uniform(0.5, 8, 32)], axis=-1)
    v[0] = 0.0  # the (unique) channel minimum is the zero point
    kernel = jnp.asarray(s * v, jnp.float32)
    upstream = jnp.asarray(rng.normal(size=v.shape), jnp.float32)
    grad = self.variant(jax.grad(functools.partial(
        ref.weight_loss, estimator="aewgs")))(
            kernel, jnp.full((3,), -2.0), upstream)
    _, _, _, v = ref.weight_reference(kernel, jnp.full((3,), -2.0))
    e, g = np.round(v) - v, np.asarray(upstream)
    var = (e * e).mean(axis=0) - e.mean(axis=0) ** 2
    self.assertLess(var[0], 1e-3)
    delta = (np.sign(g) * e).mean(axis=0) / np.maximum(var, 1e-3)
    phi = np.minimum(delta * np.sign(g) * e, 0.99)
    at_min = np.arange(v.shape[0])[:, None] == 0
    expected = g * (1 - phi) + at_min * (g * phi).sum(axis=0)
    chex.assert_trees_all_close(grad, expected, atol=1e-5, rtol=1e-5)

  def test_aewgs_multiplier_at_least_one_percent(self):
    v = jax.random.uniform(jax.random.key(0), (64, 8), maxval=6.0)
    g = jax.random.normal(jax.random.key(1), (64, 8))
    # sign(g) aligned with e = round(v) - v: delta ~ 3, phi hits its cap.
    aligned = jnp.sign(jnp.round(v) - v) * jnp.abs(g)

    @jax.jit
    def v_term(v, step, upstream):
      _, vjp = jax.vjp(lambda v, s: quantizers.rounding_noise(
          v, s, None, "aewgs"), v, step)
      return vjp(upstream)[0]

    for shape, upstream in itertools.product(((8,), ()), (g, aligned)):
      multiplier = 1.0 + v_term(v, jnp.ones(shape), upstream) / upstream
      self.assertGreaterEqual(float(multiplier.min()), 0.01 - 1e-6)
      if upstream is aligned:
        self.assertAlmostEqual(float(multiplier.min()), 0.01, places=6)

  def test_aewgs_axis_name_averages_statistics_across_devices(self):
    x = 2.0 * jax.random.normal(jax.random.key(0), (8, 5))
    upstream = jax.random.normal(jax.random.key(1), (8, 5))

    def grads(x, g, log2_step=-2.0, axis_name=None):  # d/dx, d/dlog2_step
      return jax.grad(functools.partial(
          ref.activation_loss, estimator="aewgs", axis_name=axis_name),
                      argnums=(0, 1))(x, log2_step, 6.0, -32.0, g)

    full = jax.jit(grads)(x, upstream)
    _, v = ref.activation_reference(x, -2.0, 6.0, -32.0)
    e, g = np.round(v) - v, np.asarray(upstream)
    delta = np.mean(np.sign(g) * e) / max(np.var(e), 1e-3)
    expected = g * (1 - np.minimum(delta * np.sign(g) * e, 0.99))
    chex.assert_trees_all_close(full[0], expected, atol=1e-5, rtol=1e-5)

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("data",))
    rep, data = jax.sharding.PartitionSpec(), jax.sharding.PartitionSpec("data")
    sharded = jax.jit(jax.shard_map(
        functools.partial(grads, axis_name="data"), mesh=mesh,
        in_specs=(data, data, rep), out_specs=(data, rep)))(
            x, upstream, jnp.float32(-2.0))
    # The replicated step gets the sum over devices, i.e. the full batch.
    chex.assert_trees_all_close(sharded, full, atol=1e-5, rtol=1e-5)
    mapped = jax.jit(jax.vmap(
        functools.partial(grads, axis_name="data"), axis_name="data"))(
            x.reshape(4, 2, 5), upstream.reshape(4, 2, 5))
    chex.assert_trees_all_close(
        (mapped[0].reshape(8, 5), mapped[1].sum()), full, atol=1e-5,
        rtol=1e-5)
    local = jax.jit(jax.vmap(grads))(
        x.reshape(4, 2, 5), upstream.reshape(4, 2, 5))[0]
    self.assertGreater(float(jnp.abs(local.reshape(8, 5) - full[0]).max()),
                       1e-3)

  def test_replicated_kernel_under_shard_map_sums_device_gradients(self):
    # Data parallel: kernel and step replicated, one upstream gradient per
    # device. The quantized kernel is replicated, so JAX sums the upstream
    # gradients before the rounding backward: EWGS sees G = sum_d G_d.
    kernel = ref.random_kernel(shape=(6, 4))
    log2_step = jnp.array([-3., -2., -4., -1.])
    upstream = ref.random_kernel(seed=5, shape=(4, 6, 4))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("data",))
    rep, data = jax.sharding.PartitionSpec(), jax.sharding.PartitionSpec("data")
    grads = jax.jit(jax.shard_map(
        lambda k, l, g: jax.grad(functools.partial(
            ref.weight_loss, estimator="ewgs"), argnums=(0, 1))(k, l, g[0]),
        mesh=mesh, in_specs=(rep, rep, data), out_specs=(rep, rep)))(
            kernel, log2_step, upstream)
    _, _, s, v = ref.weight_reference(kernel, log2_step)
    g, e = np.asarray(upstream).sum(axis=0), np.round(v) - v
    correction = -0.01 * np.abs(g) * e
    w = np.asarray(kernel)
    at_min = w == w.min(axis=0, keepdims=True)
    expected_kernel = g + correction - at_min * correction.sum(axis=0)
    # dL/ds = sum G n + sum (s |G| 0.01 e) v / s: the EWGS term reaches s
    # through v = (W - z) / s.
    expected_step = np.sum(g * e + 0.01 * np.abs(g) * e * v, axis=0)
    chex.assert_trees_all_close(
        grads, (expected_kernel, ref.LN2 * s.reshape(-1) * expected_step),
        atol=1e-5, rtol=1e-5)


if __name__ == "__main__":
  absltest.main()
