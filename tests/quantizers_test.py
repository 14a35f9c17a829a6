"""Tests for gdnsq_jax.quantizers (arXiv 2508.14004; method spec 2-4, 14.1-8).

Every expected value is hand-derived in numpy float32 from the spec formulas.
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

from gdnsq_jax import quantizers

LN2 = math.log(2.0)
RHO = 0.5 / math.sqrt(3.0)  # default dither amplitude, variance 1/12


def _kernel(seed=0, shape=(3, 3, 2, 4), scale=1.0):
  return scale * jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _weight_reference(kernel, log2_step, per_channel=True):
  """numpy s*round((W - z)/s) + z with z the channel (or tensor) minimum."""
  w = np.asarray(kernel, np.float32)
  s = np.exp2(np.asarray(log2_step, np.float32))
  axes = tuple(range(w.ndim - 1)) if per_channel else None
  z = w.min(axis=axes, keepdims=per_channel)
  codes = np.round((w - z) / s)
  return s * codes + z, z, s, (w - z) / s


def _activation_reference(x, log2_step, log2_range, clamp_low):
  x = np.asarray(x, np.float32)
  s, q = np.float32(2.0**log2_step), np.float32(2.0**log2_range)
  b = np.float32(clamp_low)
  v = (np.clip(x, b, b + q - s) - b) / s
  return s * np.round(v) + b, v


def _weight_loss(kernel, log2_step, upstream, key=None, **kwargs):
  return jnp.sum(
      upstream * quantizers.quantize_weight(kernel, log2_step, key, **kwargs)
  )


def _activation_loss(x, log2_step, log2_range, clamp_low, upstream, key=None,
                     **kwargs):
  out = quantizers.quantize_activation(
      x, log2_step, log2_range, clamp_low, key, **kwargs)
  return jnp.sum(upstream * out)


class ForwardTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(True, False)
  def test_weight_forward_and_codes(self, per_channel):
    kernel = _kernel()
    log2_step = jnp.array([-3.0, -2.0, -4.0, -1.0]) if per_channel else -3.0
    fn = self.variant(functools.partial(
        quantizers.quantize_weight, per_channel=per_channel))
    out = np.asarray(fn(kernel, jnp.asarray(log2_step)))
    expected, z, s, v = _weight_reference(kernel, log2_step, per_channel)
    chex.assert_trees_all_close(out, expected, atol=1e-6, rtol=1e-6)
    codes = (out - z) / s
    np.testing.assert_allclose(codes, np.rint(codes), atol=1e-4)
    axes = tuple(range(3)) if per_channel else None
    np.testing.assert_array_equal(np.rint(codes).min(axis=axes), 0.0)
    np.testing.assert_array_equal(
        np.rint(codes).max(axis=axes), np.round(v.max(axis=axes)))
    # The channel minimum is exactly representable: it maps to code 0.
    w = np.asarray(kernel)
    at_min = w == w.min(axis=axes, keepdims=per_channel)
    np.testing.assert_array_equal(out[at_min], w[at_min])

  @chex.variants(with_jit=True, without_jit=True)
  def test_activation_forward_and_codes(self):
    x = 3.0 * jax.random.normal(jax.random.key(1), (6, 5))
    params = (-2.0, 1.0, -0.7)  # s = 1/4, q = 2, interval [-0.7, 1.05]
    out = np.asarray(self.variant(quantizers.quantize_activation)(x, *params))
    expected, _ = _activation_reference(x, *params)
    chex.assert_trees_all_close(out, expected, atol=1e-6, rtol=1e-6)
    codes = (out + 0.7) / 0.25
    np.testing.assert_allclose(codes, np.rint(codes), atol=1e-4)
    self.assertEqual(np.rint(codes).min(), 0.0)
    self.assertEqual(np.rint(codes).max(), round(2.0 / 0.25 - 1.0))

  def test_disabled_activation_quantizer_is_identity(self):
    x = jax.random.normal(jax.random.key(2), (4, 3))
    out = quantizers.quantize_activation(x, -2.0, 1.0, 0.0, enabled=False)
    np.testing.assert_array_equal(out, x)

  @chex.variants(with_jit=True, without_jit=True)
  def test_bfloat16_in_bfloat16_out_with_float32_math(self):
    kernel = _kernel(scale=3.0).astype(jnp.bfloat16)
    log2_step = jnp.array([-5.0, -4.0, -6.0, -3.0])
    out = self.variant(quantizers.quantize_weight)(kernel, log2_step)
    self.assertEqual(out.dtype, jnp.bfloat16)
    expected, *_ = _weight_reference(kernel.astype(jnp.float32), log2_step)
    np.testing.assert_array_equal(
        np.asarray(out, np.float32),
        np.asarray(jnp.asarray(expected).astype(jnp.bfloat16), np.float32))
    x = kernel.reshape(-1, 4)
    act = self.variant(quantizers.quantize_activation)(x, -4.0, 2.0, -1.0)
    self.assertEqual(act.dtype, jnp.bfloat16)
    expected, _ = _activation_reference(x.astype(jnp.float32), -4.0, 2.0, -1.0)
    np.testing.assert_array_equal(
        np.asarray(act, np.float32),
        np.asarray(jnp.asarray(expected).astype(jnp.bfloat16), np.float32))
    # The rounding itself runs in float32.
    for fn, args in ((quantizers.quantize_weight, (kernel, log2_step)),
                     (quantizers.quantize_activation, (x, -4.0, 2.0, -1.0))):
      jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
      rounds = [e for e in jaxpr.eqns
                if e.primitive.name.startswith("custom_vjp_call")]
      self.assertLen(rounds, 1)
      self.assertEqual(rounds[0].invars[0].aval.dtype, jnp.float32)


class WeightGradientTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(
      (True, None, "uniform12"), (True, 0, "pure"), (False, 0, "half"))
  def test_ste_kernel_gradient_is_upstream(self, per_channel, seed, dither):
    kernel = _kernel()
    upstream = _kernel(seed=5)
    log2_step = jnp.full((4,) if per_channel else (), -2.0)
    key = None if seed is None else jax.random.key(seed)
    grad = self.variant(jax.grad(functools.partial(
        _weight_loss, per_channel=per_channel, dither=dither)))(
            kernel, log2_step, upstream, key)
    # Exactly G everywhere, the channel minima included: the zero point path
    # cancels, so the zero point itself receives no gradient.
    np.testing.assert_array_equal(grad, upstream)

  @chex.variants(with_jit=True, without_jit=True)
  def test_lsq_step_gradient_is_exact(self):
    kernel, upstream = _kernel(), _kernel(seed=5)
    log2_step = jnp.array([-1.0, 0.5, -2.0, 1.0])
    grad = self.variant(jax.grad(functools.partial(
        _weight_loss, estimator="lsq"), argnums=1))(
            kernel, log2_step, upstream, jax.random.key(3))
    _, _, s, v = _weight_reference(kernel, log2_step)
    s = s.reshape(-1)
    g_n = np.sum(np.asarray(upstream) * (np.round(v) - v), axis=(0, 1, 2))
    # dL/ds = sum G n (1 + s), chained to log2_step by ln2 * s.
    chex.assert_trees_all_close(grad, LN2 * s * g_n * (1 + s), rtol=1e-5)


def _step_cotangent(v, key, dither="uniform12", estimator="ste"):
  """Per-element step term of rounding_noise for upstream gradient 1."""
  step = jnp.ones_like(v)  # same shape as v: nothing is summed
  _, vjp = jax.vjp(
      lambda v, s: quantizers.rounding_noise(v, s, key, estimator, dither),
      v, step)
  return vjp(jnp.ones_like(v))[1]


class DitherTest(chex.TestCase):

  @parameterized.parameters(("uniform12", RHO), ("half", 0.5))
  def test_per_element_values_mean_and_variance(self, dither, amplitude):
    v = jax.random.uniform(jax.random.key(0), (64, 256), maxval=10.0)
    keys = jax.random.split(jax.random.key(1), 8)
    terms = np.asarray(jax.jit(jax.vmap(
        lambda k: _step_cotangent(v, k, dither)))(keys), np.float64)
    np.testing.assert_allclose(np.unique(np.abs(terms)), [amplitude],
                               rtol=1e-6)
    n = terms.size
    self.assertLess(abs(terms.mean()), 5 * amplitude / math.sqrt(n))
    self.assertAlmostEqual(terms.var(), amplitude**2, delta=0.01 * amplitude**2)
    # Per key as well: every key has mean ~0.
    per_key = terms.reshape(8, -1).mean(axis=1)
    self.assertLess(np.abs(per_key).max(), 5 * amplitude / math.sqrt(n / 8))

  def test_keys_change_signs_and_same_key_repeats(self):
    v = jnp.linspace(0.0, 20.0, 4096)
    a = np.sign(_step_cotangent(v, jax.random.key(0)))
    b = np.sign(_step_cotangent(v, jax.random.key(1)))
    np.testing.assert_array_equal(
        a, np.sign(_step_cotangent(v, jax.random.key(0))))
    self.assertBetween(np.mean(a != b), 0.45, 0.55)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(True, False)
  def test_weight_step_gradient_sums_to_step_shape(self, per_channel):
    kernel, upstream, key = _kernel(), _kernel(seed=5), jax.random.key(7)
    log2_step = jnp.array([-1.0, 0.5, -2.0, 1.0]) if per_channel else 0.5
    grad = self.variant(jax.grad(functools.partial(
        _weight_loss, per_channel=per_channel), argnums=1))(
            kernel, jnp.asarray(log2_step), upstream, key)
    self.assertEqual(grad.shape, np.shape(log2_step))
    _, _, s, v = _weight_reference(kernel, log2_step, per_channel)
    rho = np.asarray(_step_cotangent(jnp.asarray(v), key))  # same key
    # dL/ds = sum over the channel (or tensor) of G (n + s rho); d s/dl = ln2 s.
    terms = np.asarray(upstream) * (np.round(v) - v + s * rho) * s * LN2
    expected = terms.sum(axis=(0, 1, 2) if per_channel else None)
    chex.assert_trees_all_close(grad, expected, rtol=1e-5, atol=1e-6)


class StepGradientStatisticsTest(parameterized.TestCase):
  """Averages over many keys (spec 4.3: dL/ds -> sum G n; pure: sum G rho)."""

  def setUp(self):
    super().setUp()
    self.kernel = _kernel(shape=(16, 3))
    self.upstream = _kernel(seed=5, shape=(16, 3))
    self.log2_step = jnp.array([-1.0, -0.5, -2.0])
    self.keys = jax.random.split(jax.random.key(11), 4096)
    _, _, s, v = _weight_reference(self.kernel, self.log2_step)
    self.s = s.reshape(-1)
    g = np.asarray(self.upstream, np.float64)
    self.g_n = np.sum(g * (np.round(v) - v), axis=0)
    self.g2 = np.sum(g * g, axis=0)

  def _step_grads(self, dither):
    grad = jax.grad(functools.partial(_weight_loss, dither=dither), argnums=1)
    per_key = jax.jit(jax.vmap(grad, in_axes=(None, None, None, 0)))(
        self.kernel, self.log2_step, self.upstream, self.keys)
    return np.asarray(per_key, np.float64) / (LN2 * self.s)  # dL/ds per key

  def test_ste_mean_tends_to_sum_g_n_and_pure_to_zero(self):
    ste, pure = self._step_grads("uniform12"), self._step_grads("pure")
    sigma = np.sqrt(self.g2 / 12.0)  # std of sum G rho
    k = len(self.keys)
    # ste: sum G n + s sum G rho, so mean -> sum G n and std -> s sigma.
    np.testing.assert_array_less(
        np.abs(ste.mean(axis=0) - self.g_n), 5 * self.s * sigma / math.sqrt(k))
    np.testing.assert_allclose(ste.std(axis=0), self.s * sigma, rtol=0.1)
    # pure: sum G rho, so mean -> 0 and std -> sigma.
    np.testing.assert_array_less(np.abs(pure.mean(axis=0)),
                                 5 * sigma / math.sqrt(k))
    np.testing.assert_allclose(pure.std(axis=0), sigma, rtol=0.1)
    # Same key, same rho: ste = sum G n + s * sum G rho, pure = sum G rho.
    np.testing.assert_allclose(pure, (ste - self.g_n) / self.s,
                               rtol=1e-4, atol=1e-4)


class ActivationGradientTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_clamp_masks_route_gradients(self):
    # b = 0, s = 1, q = 4: interval [0, 3]; ties at 0 and 3.
    x = jnp.array([-2.0, 0.0, 0.4, 1.5, 2.2, 3.0, 3.2, 7.0, -0.5])
    upstream = jnp.array([0.3, -1.1, 0.7, 2.0, -0.4, 1.3, -0.8, 0.6, 1.9])
    grads = self.variant(jax.grad(_activation_loss, argnums=(0, 1, 2, 3)))(
        x, 0.0, 2.0, 0.0, upstream)
    gx, gl_s, gl_q, gb = (np.asarray(g) for g in grads)
    g = np.asarray(upstream)
    below, above = np.asarray(x) < 0.0, np.asarray(x) > 3.0
    inside = ~below & ~above
    np.testing.assert_array_equal(gx, np.where(inside, g, 0.0))
    chex.assert_trees_all_close(gb, g[below | above].sum(), rtol=1e-6)
    chex.assert_trees_all_close(gl_q, LN2 * 4.0 * g[above].sum(), rtol=1e-6)
    _, v = _activation_reference(x, 0.0, 2.0, 0.0)
    g_n = np.sum(g * (np.round(v) - v))  # no key: no dither
    chex.assert_trees_all_close(gl_s, LN2 * (g_n - g[above].sum()), rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_post_relu_zeros_do_not_leak_into_clamp_low(self):
    x = jax.nn.relu(jax.random.normal(jax.random.key(3), (8, 8)))
    upstream = jax.random.normal(jax.random.key(4), (8, 8))
    gx, gb = self.variant(jax.grad(_activation_loss, argnums=(0, 3)))(
        x, -3.0, 10.0, 0.0, upstream, jax.random.key(5))
    self.assertGreater(int(jnp.sum(x == 0.0)), 10)
    self.assertEqual(float(gb), 0.0)
    np.testing.assert_array_equal(gx, upstream)


class EWGSTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_ewgs_input_gradient(self):
    # W_hat = W + s N(v, s), v = (W - z) / s, dL/dN = s G. EWGS gives
    # dL/dv = -0.01 |s G| (round v - v), so dL/dW = G + 0.01 |G| (v - round v)
    # directly, and the zero point (channel argmin) collects minus the
    # channel sum of the correction through v's -z / s.
    kernel, upstream = _kernel(), _kernel(seed=5)
    log2_step = jnp.array([-3.0, -2.0, -4.0, -1.0])
    grad = self.variant(jax.grad(functools.partial(
        _weight_loss, estimator="ewgs")))(
            kernel, log2_step, upstream, jax.random.key(0))
    _, _, _, v = _weight_reference(kernel, log2_step)
    g = np.asarray(upstream)
    correction = 0.01 * np.abs(g) * (v - np.round(v))
    w = np.asarray(kernel)
    at_min = w == w.min(axis=(0, 1, 2), keepdims=True)
    expected = g + correction - at_min * correction.sum(axis=(0, 1, 2))
    chex.assert_trees_all_close(grad, expected, atol=1e-6, rtol=1e-5)
    x = kernel.reshape(-1, 4)  # inside the interval: pure EWGS on x
    gx = self.variant(jax.grad(functools.partial(
        _activation_loss, estimator="ewgs")))(
            x, -3.0, 4.0, -8.0, upstream.reshape(-1, 4))
    _, v = _activation_reference(x, -3.0, 4.0, -8.0)
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
        _weight_loss, estimator="aewgs")))(
            kernel, jnp.full((3,), -2.0), upstream)
    _, _, _, v = _weight_reference(kernel, jnp.full((3,), -2.0))
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
          _activation_loss, estimator="aewgs", axis_name=axis_name),
                      argnums=(0, 1))(x, log2_step, 6.0, -32.0, g)

    full = jax.jit(grads)(x, upstream)
    _, v = _activation_reference(x, -2.0, 6.0, -32.0)
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
    kernel, log2_step = _kernel(shape=(6, 4)), jnp.array([-3., -2., -4., -1.])
    upstream = _kernel(seed=5, shape=(4, 6, 4))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("data",))
    rep, data = jax.sharding.PartitionSpec(), jax.sharding.PartitionSpec("data")
    grads = jax.jit(jax.shard_map(
        lambda k, l, g: jax.grad(functools.partial(
            _weight_loss, estimator="ewgs"), argnums=(0, 1))(k, l, g[0]),
        mesh=mesh, in_specs=(rep, rep, data), out_specs=(rep, rep)))(
            kernel, log2_step, upstream)
    _, _, s, v = _weight_reference(kernel, log2_step)
    g, e = np.asarray(upstream).sum(axis=0), np.round(v) - v
    correction = -0.01 * np.abs(g) * e
    w = np.asarray(kernel)
    at_min = w == w.min(axis=0, keepdims=True)
    expected_kernel = g + correction - at_min * correction.sum(axis=0)
    # dL/ds = sum G n + sum (s |G| 0.01 e) v / s: the EWGS term reaches s
    # through v = (W - z) / s.
    expected_step = np.sum(g * e + 0.01 * np.abs(g) * e * v, axis=0)
    chex.assert_trees_all_close(
        grads, (expected_kernel, LN2 * s.reshape(-1) * expected_step),
        atol=1e-5, rtol=1e-5)


class EstimatorGridTest(parameterized.TestCase):

  @parameterized.parameters(*quantizers.ESTIMATORS)
  def test_finite_gradients_on_extremes_for_every_dither(self, estimator):
    base = _kernel(shape=(3, 4))
    equal = jnp.ones((3, 4)).at[:, 1].set(-2.0)  # min == max in every channel
    # Ranges of 1e30 with steps of 2**-30 overflow v = (W - z) / s to inf.
    cases = list(itertools.product(
        (base, 1e30 * base, equal), (-30.0, -12.0, 0.0, 30.0)))
    kernels = jnp.stack([k for k, _ in cases])
    log2_steps = jnp.stack([jnp.full((4,), l) for _, l in cases])
    act_cases = jnp.array([  # scale of x, log2_step, log2_range, clamp_low
        [1.0, -30.0, -20.0, 0.0], [1.0, 30.0, 40.0, -1.0],
        [1e30, -12.0, 100.0, -1e30], [1e30, -30.0, 101.0, -1e30],
        [0.0, -2.0, 1.0, 0.0], [1.0, 0.0, -5.0, 0.0]])

    def act_loss(c, x, g, key, **kw):
      return _activation_loss(c[0] * x, c[1], c[2], c[3], g, key, **kw)

    @jax.jit
    def all_grads(key):
      grads = {}
      for dither in quantizers.DITHERS:
        kw = dict(estimator=estimator, dither=dither)
        grads[dither] = (
            jax.vmap(jax.grad(functools.partial(_weight_loss, **kw),
                              argnums=(0, 1)),
                     in_axes=(0, 0, None, None))(
                         kernels, log2_steps, base, key),
            jax.vmap(jax.grad(functools.partial(act_loss, **kw)),
                     in_axes=(0, None, None, None))(act_cases, base, base, key))
      return grads

    for path, g in jax.tree_util.tree_leaves_with_path(
        all_grads(jax.random.key(0))):
      self.assertTrue(bool(jnp.all(jnp.isfinite(g))), (estimator, path, g))


class ValidationTest(parameterized.TestCase):

  def test_unknown_estimator_lists_valid_names(self):
    for fn, args in ((quantizers.quantize_weight, (_kernel(), jnp.zeros(4))),
                     (quantizers.quantize_activation, (_kernel(), 0., 2., 0.))):
      with self.assertRaisesRegex(
          ValueError, r"unknown estimator 'st'.*aewgs, ewgs, lsq, ste"):
        fn(*args, estimator="st")
      with self.assertRaisesRegex(
          ValueError, r"unknown dither 'gauss'.*uniform12, half, pure"):
        fn(*args, dither="gauss")

  @parameterized.parameters(((), True), ((3,), True), ((4,), False))
  def test_wrong_log2_step_shape(self, shape, per_channel):
    with self.assertRaisesRegex(ValueError, r"log2_step has shape .* needs"):
      quantizers.quantize_weight(_kernel(), jnp.zeros(shape),
                                 per_channel=per_channel)

  def test_activation_parameters_must_be_scalars(self):
    with self.assertRaisesRegex(ValueError, "log2_range must be a scalar"):
      quantizers.quantize_activation(_kernel(), 0.0, jnp.zeros(2), 0.0)


class VmapTest(parameterized.TestCase):

  def test_vmap_over_a_batch_of_kernels(self):
    kernels = _kernel(shape=(3, 3, 4))
    log2_steps = -jax.random.uniform(jax.random.key(1), (3, 4), maxval=4.0)
    keys = jax.random.split(jax.random.key(2), 3)
    upstream = _kernel(seed=3, shape=(3, 4))
    grad = jax.grad(functools.partial(_weight_loss, estimator="aewgs"),
                    argnums=(0, 1))
    batched = jax.jit(jax.vmap(grad, in_axes=(0, 0, None, 0)))(
        kernels, log2_steps, upstream, keys)
    outs = jax.jit(jax.vmap(quantizers.quantize_weight))(kernels, log2_steps)
    for i in range(3):
      chex.assert_trees_all_close(
          outs[i], quantizers.quantize_weight(kernels[i], log2_steps[i]),
          atol=1e-6)
      # AEWGS statistics stay per kernel (not pooled over the vmapped batch).
      single = jax.jit(grad)(kernels[i], log2_steps[i], upstream, keys[i])
      chex.assert_trees_all_close(
          (batched[0][i], batched[1][i]), single, atol=2e-4, rtol=1e-3)


if __name__ == "__main__":
  absltest.main()
