"""Tests for gdnsq_jax.quantizers (docs/method.md §2, §3, §4, §14 items 1-8).

Every expected value is hand-derived in numpy float32 from docs/method.md
(tests/quantizer_reference.py). The EWGS/AEWGS and shard_map backward tests
are in quantizers_backward_test.py, the step-size dither's in
dither_test.py.
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
from tests import quantizer_reference as ref

class ForwardTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(True, False)
  def test_weight_forward_and_codes(self, per_channel):
    kernel = ref.random_kernel()
    log2_step = jnp.array([-3.0, -2.0, -4.0, -1.0]) if per_channel else -3.0
    fn = self.variant(functools.partial(
        quantizers.quantize_weight, per_channel=per_channel))
    out = np.asarray(fn(kernel, jnp.asarray(log2_step)))
    expected, z, s, v = ref.weight_reference(kernel, log2_step, per_channel)
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
    out = np.asarray(self.variant(activation_quantizer.quantize_activation)(x, *params))
    expected, _ = ref.activation_reference(x, *params)
    chex.assert_trees_all_close(out, expected, atol=1e-6, rtol=1e-6)
    codes = (out + 0.7) / 0.25
    np.testing.assert_allclose(codes, np.rint(codes), atol=1e-4)
    self.assertEqual(np.rint(codes).min(), 0.0)
    self.assertEqual(np.rint(codes).max(), round(2.0 / 0.25 - 1.0))

  def test_disabled_activation_quantizer_is_identity(self):
    x = jax.random.normal(jax.random.key(2), (4, 3))
    out = activation_quantizer.quantize_activation(x, -2.0, 1.0, 0.0, enabled=False)
    np.testing.assert_array_equal(out, x)

  @chex.variants(with_jit=True, without_jit=True)
  def test_bfloat16_in_bfloat16_out_with_float32_math(self):
    kernel = ref.random_kernel(scale=3.0).astype(jnp.bfloat16)
    log2_step = jnp.array([-5.0, -4.0, -6.0, -3.0])
    out = self.variant(quantizers.quantize_weight)(kernel, log2_step)
    self.assertEqual(out.dtype, jnp.bfloat16)
    expected, *_ = ref.weight_reference(kernel.astype(jnp.float32), log2_step)
    np.testing.assert_array_equal(
        np.asarray(out, np.float32),
        np.asarray(jnp.asarray(expected).astype(jnp.bfloat16), np.float32))
    x = kernel.reshape(-1, 4)
    act = self.variant(activation_quantizer.quantize_activation)(x, -4.0, 2.0, -1.0)
    self.assertEqual(act.dtype, jnp.bfloat16)
    expected, _ = ref.activation_reference(
        x.astype(jnp.float32), -4.0, 2.0, -1.0)
    np.testing.assert_array_equal(
        np.asarray(act, np.float32),
        np.asarray(jnp.asarray(expected).astype(jnp.bfloat16), np.float32))
    # The rounding itself runs in float32.
    for fn, args in ((quantizers.quantize_weight, (kernel, log2_step)),
                     (activation_quantizer.quantize_activation, (x, -4.0, 2.0, -1.0))):
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
    kernel = ref.random_kernel()
    upstream = ref.random_kernel(seed=5)
    log2_step = jnp.full((4,) if per_channel else (), -2.0)
    key = None if seed is None else jax.random.key(seed)
    grad = self.variant(jax.grad(functools.partial(
        ref.weight_loss, per_channel=per_channel, dither=dither)))(
            kernel, log2_step, upstream, key)
    # Exactly G everywhere, the channel minima included: the zero point path
    # cancels, so the zero point itself receives no gradient.
    np.testing.assert_array_equal(grad, upstream)

  @chex.variants(with_jit=True, without_jit=True)
  def test_rounding_error_step_gradient_is_exact(self):
    kernel, upstream = ref.random_kernel(), ref.random_kernel(seed=5)
    log2_step = jnp.array([-1.0, 0.5, -2.0, 1.0])
    grad = self.variant(jax.grad(functools.partial(
        ref.weight_loss, estimator="rounding_error"), argnums=1))(
            kernel, log2_step, upstream, jax.random.key(3))
    _, _, s, v = ref.weight_reference(kernel, log2_step)
    s = s.reshape(-1)
    g_n = np.sum(np.asarray(upstream) * (np.round(v) - v), axis=(0, 1, 2))
    # dL/ds = sum G n (1 + s), chained to log2_step by ln2 * s.
    chex.assert_trees_all_close(grad, ref.LN2 * s * g_n * (1 + s), rtol=1e-5)


class StepGradientStatisticsTest(parameterized.TestCase):
  """Key averages (docs/method.md §4.3): dL/ds -> sum G n; pure: sum G rho."""

  def setUp(self):
    super().setUp()
    self.kernel = ref.random_kernel(shape=(16, 3))
    self.upstream = ref.random_kernel(seed=5, shape=(16, 3))
    self.log2_step = jnp.array([-1.0, -0.5, -2.0])
    self.keys = jax.random.split(jax.random.key(11), 4096)
    _, _, s, v = ref.weight_reference(self.kernel, self.log2_step)
    self.s = s.reshape(-1)
    g = np.asarray(self.upstream, np.float64)
    self.g_n = np.sum(g * (np.round(v) - v), axis=0)
    self.g2 = np.sum(g * g, axis=0)

  def _step_grads(self, dither):
    grad = jax.grad(functools.partial(ref.weight_loss, dither=dither),
                    argnums=1)
    per_key = jax.jit(jax.vmap(grad, in_axes=(None, None, None, 0)))(
        self.kernel, self.log2_step, self.upstream, self.keys)
    return np.asarray(per_key, np.float64) / (ref.LN2 * self.s)  # dL/ds per key

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
    grads = self.variant(jax.grad(ref.activation_loss, argnums=(0, 1, 2, 3)))(
        x, 0.0, 2.0, 0.0, upstream)
    gx, gl_s, gl_q, gb = (np.asarray(g) for g in grads)
    g = np.asarray(upstream)
    below, above = np.asarray(x) < 0.0, np.asarray(x) > 3.0
    inside = ~below & ~above
    np.testing.assert_array_equal(gx, np.where(inside, g, 0.0))
    chex.assert_trees_all_close(gb, g[below | above].sum(), rtol=1e-6)
    chex.assert_trees_all_close(gl_q, ref.LN2 * 4.0 * g[above].sum(), rtol=1e-6)
    _, v = ref.activation_reference(x, 0.0, 2.0, 0.0)
    g_n = np.sum(g * (np.round(v) - v))  # no key: no dither
    chex.assert_trees_all_close(gl_s, ref.LN2 * (g_n - g[above].sum()),
                                rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_post_relu_zeros_do_not_leak_into_clamp_low(self):
    x = jax.nn.relu(jax.random.normal(jax.random.key(3), (8, 8)))
    upstream = jax.random.normal(jax.random.key(4), (8, 8))
    gx, gb = self.variant(jax.grad(ref.activation_loss, argnums=(0, 3)))(
        x, -3.0, 10.0, 0.0, upstream, jax.random.key(5))
    self.assertGreater(int(jnp.sum(x == 0.0)), 10)
    self.assertEqual(float(gb), 0.0)
    np.testing.assert_array_equal(gx, upstream)


class EstimatorGridTest(parameterized.TestCase):

  @parameterized.parameters(*quantizers.ESTIMATORS)
  def test_finite_gradients_on_extremes_for_every_dither(self, estimator):
    base = ref.random_kernel(shape=(3, 4))
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
      return ref.activation_loss(c[0] * x, c[1], c[2], c[3], g, key, **kw)

    @jax.jit
    def all_grads(key):
      grads = {}
      for dither in dither_lib.DITHERS:
        kw = dict(estimator=estimator, dither=dither)
        grads[dither] = (
            jax.vmap(jax.grad(functools.partial(ref.weight_loss, **kw),
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
    kernel = ref.random_kernel()
    for fn, args in ((quantizers.quantize_weight, (kernel, jnp.zeros(4))),
                     (activation_quantizer.quantize_activation, (kernel, 0., 2., 0.))):
      with self.assertRaisesRegex(
          ValueError, r"unknown estimator 'st'.*aewgs, ewgs, rounding_error, ste"):
        fn(*args, estimator="st")
      with self.assertRaisesRegex(
          ValueError, r"estimator 'lsq' is now spelled 'rounding_error'.*"
          r"QuantSettings\(method='lsq'\)"):
        fn(*args, estimator="lsq")
      with self.assertRaisesRegex(
          ValueError, r"unknown dither 'gauss'.*uniform12, half, pure"):
        fn(*args, dither="gauss")

  @parameterized.parameters(((), True), ((3,), True), ((4,), False))
  def test_wrong_log2_step_shape(self, shape, per_channel):
    with self.assertRaisesRegex(ValueError, r"log2_step has shape .* needs"):
      quantizers.quantize_weight(ref.random_kernel(), jnp.zeros(shape),
                                 per_channel=per_channel)

  def test_activation_parameters_must_be_scalars(self):
    with self.assertRaisesRegex(ValueError, "log2_range must be a scalar"):
      activation_quantizer.quantize_activation(
          ref.random_kernel(), 0.0, jnp.zeros(2), 0.0)


class VmapTest(parameterized.TestCase):

  def test_vmap_over_a_batch_of_kernels(self):
    kernels = ref.random_kernel(shape=(3, 3, 4))
    log2_steps = -jax.random.uniform(jax.random.key(1), (3, 4), maxval=4.0)
    keys = jax.random.split(jax.random.key(2), 3)
    upstream = ref.random_kernel(seed=3, shape=(3, 4))
    grad = jax.grad(functools.partial(ref.weight_loss, estimator="aewgs"),
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
