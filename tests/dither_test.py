"""The step-size dither: distribution, independence, reproducibility, sharding.

GDNSQ's step gradient takes a Rademacher dither ``rho = +-1/(2 sqrt 3)``
(docs/method.md §4.1, D2; ``dither='half'``: ``+-1/2``). It is hashed from
(step key, quantizer id, element index) inside the quantizers' backward
(:func:`gdnsq_jax.dither.dither_values`). These tests read ``rho``
element by element from the backward of the rounding noise with a step of
the input's shape and upstream gradient 1 (then ``dL/ds_i = rho_i``), and
check it statistically: values, mean, variance and the correlation between
neighbouring elements, quantizers and steps, each within 5 standard errors
(a false alarm about once in 3 million).
"""

from __future__ import annotations

import functools
import math

from absl.testing import absltest
from absl.testing import parameterized
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gdnsq_jax import activation_quantizer
from gdnsq_jax import dither as dither_lib
from gdnsq_jax import layers
from gdnsq_jax import quantizers
from tests import quantizer_reference as ref

AMPLITUDE = 0.5 / math.sqrt(3.0)
SHAPE = (16, 32, 32, 16)  # an activation of 262,144 elements
Z = 5.0  # standard errors allowed


def _rho(key, shape=SHAPE, dither="uniform12"):
  """``rho`` per element, read from the backward of ``rounding_noise``."""
  def noise_sum(step):
    v = jnp.zeros(shape, jnp.float32)  # round(v) - v = 0: only the dither
    return jnp.sum(quantizers.rounding_noise(v, step, key, "ste", dither))
  return np.asarray(jax.jit(jax.grad(noise_sum))(jnp.ones(shape)))


def _step_key(step, seed=0):
  """The training program's key of step ``step`` (train/steps.py)."""
  rng = jax.random.key_data(jax.random.key(seed))
  return jax.random.fold_in(rng, step)


def _assert_uncorrelated(test, a, b):
  a, b = np.ravel(a) / AMPLITUDE, np.ravel(b) / AMPLITUDE
  bound = Z / math.sqrt(a.size)
  test.assertLess(abs(float(np.mean(a * b))), bound)


class DistributionTest(parameterized.TestCase):

  @parameterized.parameters(("uniform12", AMPLITUDE), ("half", 0.5))
  def test_values_mean_and_variance(self, dither, amplitude):
    rho = _rho(dither_lib.dither_key(_step_key(3), 17), dither=dither)
    np.testing.assert_array_equal(np.unique(rho),
                                  np.float32([-amplitude, amplitude]))
    n = rho.size
    # Mean 0 and variance amplitude**2 (1/12 for uniform12, as U(-1/2, 1/2)).
    self.assertLess(abs(rho.mean()) / (amplitude / math.sqrt(n)), Z)
    variance = float(np.var(rho, dtype=np.float64))
    self.assertLess(abs(variance - amplitude**2),
                    Z * amplitude**2 * 2 / math.sqrt(n))
    if dither == "uniform12":
      self.assertAlmostEqual(variance, 1 / 12, delta=1e-3)

  def test_neighbouring_elements_are_uncorrelated(self):
    rho = _rho(dither_lib.dither_key(_step_key(1), 5))
    for axis in range(rho.ndim):  # next element along every axis
      first = np.take(rho, range(rho.shape[axis] - 1), axis=axis)
      second = np.take(rho, range(1, rho.shape[axis]), axis=axis)
      _assert_uncorrelated(self, first, second)
    flat = rho.ravel()
    for lag in (2, 31, 32, 33, 1024):
      _assert_uncorrelated(self, flat[:-lag], flat[lag:])
    # Four neighbours at once (a Walsh coefficient of order 4).
    quads = (flat / AMPLITUDE).reshape(-1, 4).prod(axis=1)
    self.assertLess(abs(quads.mean()) * math.sqrt(quads.size), Z)

  def test_quantizers_are_uncorrelated(self):
    key = _step_key(7)
    ids = (0, 1, 2, 1 << 32, 0x1234_5678_9ABC_DEF0)
    draws = [_rho(dither_lib.dither_key(key, i)) for i in ids]
    for i in range(len(ids)):
      for j in range(i):
        _assert_uncorrelated(self, draws[i], draws[j])

  def test_steps_are_uncorrelated(self):
    draws = [_rho(dither_lib.dither_key(_step_key(step), 11))
             for step in (0, 1, 2, 1000)]
    for i in range(len(draws)):
      for j in range(i):
        _assert_uncorrelated(self, draws[i], draws[j])
    # Keys one bit apart (not what fold_in gives, a worst case).
    raw = [jnp.array(w, jnp.uint32) for w in ((0, 0), (0, 1), (1, 0))]
    draws = [_rho(k) for k in raw]
    for i in range(len(draws)):
      for j in range(i):
        _assert_uncorrelated(self, draws[i], draws[j])


class ReproducibilityTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_same_key_same_dither_typed_or_raw(self):
    typed = jax.random.fold_in(jax.random.key(0), 4)
    raw = jax.random.key_data(typed)
    values = self.variant(functools.partial(
        dither_lib.dither_values, shape=(3, 5), dither="uniform12"))
    chex.assert_trees_all_equal(values(typed), values(raw), values(raw))
    keyed = self.variant(dither_lib.dither_key, static_argnums=1)
    chex.assert_trees_all_equal(keyed(typed, 9), keyed(raw, 9))
    self.assertFalse(np.array_equal(values(keyed(raw, 9)),
                                    values(keyed(raw, 10))))

  def test_dither_depends_only_on_key_and_index(self):
    # A sub-block of a larger array does not share its neighbours' values,
    # but the same (key, shape) always gives the same draw: resume-safe.
    key = _step_key(12)
    chex.assert_trees_all_equal(_rho(key, (64, 8)), _rho(key, (64, 8)))
    np.testing.assert_array_equal(
        _rho(key, (64, 8)).ravel(), _rho(key, (512,)))


def _step_cotangent(v, key, dither="uniform12", estimator="ste"):
  """Per-element step term of rounding_noise for upstream gradient 1."""
  step = jnp.ones_like(v)  # same shape as v: nothing is summed
  _, vjp = jax.vjp(
      lambda v, s: quantizers.rounding_noise(v, s, key, estimator, dither),
      v, step)
  return vjp(jnp.ones_like(v))[1]


class StepTermTest(chex.TestCase):
  """The step term of the rounding noise per element (docs/method.md §14)."""

  @parameterized.parameters(("uniform12", AMPLITUDE), ("half", 0.5))
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
    kernel, upstream = ref.random_kernel(), ref.random_kernel(seed=5)
    key = jax.random.key(7)
    log2_step = jnp.array([-1.0, 0.5, -2.0, 1.0]) if per_channel else 0.5
    grad = self.variant(jax.grad(functools.partial(
        ref.weight_loss, per_channel=per_channel), argnums=1))(
            kernel, jnp.asarray(log2_step), upstream, key)
    self.assertEqual(grad.shape, np.shape(log2_step))
    _, _, s, v = ref.weight_reference(kernel, log2_step, per_channel)
    rho = np.asarray(_step_cotangent(jnp.asarray(v), key))  # same key
    # dL/ds = sum over the channel (or tensor) of G (n + s rho); d s/dl = ln2 s.
    terms = np.asarray(upstream) * (np.round(v) - v + s * rho) * s * ref.LN2
    expected = terms.sum(axis=(0, 1, 2) if per_channel else None)
    chex.assert_trees_all_close(grad, expected, rtol=1e-5, atol=1e-6)


class _TwoLayers(nn.Module):

  @nn.compact
  def __call__(self, x):
    settings = layers.QuantSettings(weight_bits=2, activation_bits=2)
    x = layers.QuantDense(16, settings=settings, name="first")(x)
    return layers.QuantDense(16, settings=settings, name="second")(x)


class LayerTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.model = _TwoLayers()
    self.x = jax.random.normal(jax.random.key(0), (32, 16))
    self.variables = self.model.init(jax.random.key(1), self.x)

  def _grads(self, key):
    def loss(params):
      out = self.model.apply({"params": params}, self.x,
                             rngs={layers.NOISE_RNG: key})
      return jnp.sum(out)
    return jax.grad(loss)(self.variables["params"])

  def test_no_prng_work_in_the_quantized_step(self):
    def loss(params, key):
      return jnp.sum(self.model.apply({"params": params}, self.x,
                                      rngs={layers.NOISE_RNG: key}))
    jaxpr = jax.make_jaxpr(jax.grad(loss))(
        self.variables["params"], jax.random.key_data(jax.random.key(2)))
    names = set()

    def collect(jaxpr):
      for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for sub in jax.core.jaxprs_in_params(eqn.params):
          collect(sub)
    collect(jaxpr.jaxpr)
    random = {n for n in names if "random" in n or "threefry" in n}
    self.assertEqual(random, set(), "per-quantizer key or random-bit work")

  def test_layers_get_their_own_dither_and_a_step_its_own(self):
    key = jax.random.key_data(_step_key(5))
    grads = self._grads(key)
    chex.assert_trees_all_equal(grads, self._grads(key))  # reproducible
    other = self._grads(jax.random.key_data(_step_key(6)))
    for name in ("first", "second"):
      self.assertFalse(np.allclose(grads[name]["log2_step"],
                                   other[name]["log2_step"]))
    no_dither = jax.grad(lambda p: jnp.sum(self.model.apply(
        {"params": p}, self.x)))(self.variables["params"])
    chex.assert_trees_all_close(grads["first"]["kernel"],
                                no_dither["first"]["kernel"])


class ShardingTest(absltest.TestCase):

  def test_shard_map_activation_dither_equals_the_unsharded_one(self):
    x = 3.0 * jax.random.normal(jax.random.key(0), (8, 6, 5))
    upstream = jax.random.normal(jax.random.key(1), (8, 6, 5))
    key = jax.random.key_data(_step_key(3))
    params = (jnp.float32(-1.0), jnp.float32(1.5), jnp.float32(-0.25))

    def grads(x, g, *p):
      def loss(x, *p):
        return jnp.sum(activation_quantizer.quantize_activation(
            x, *p, key) * g)
      return jax.grad(loss, argnums=(0, 1, 2, 3))(x, *p)

    full = jax.jit(grads)(x, upstream, *params)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("data",))
    rep, data = jax.sharding.PartitionSpec(), jax.sharding.PartitionSpec("data")
    sharded = jax.jit(jax.shard_map(
        grads, mesh=mesh, in_specs=(data, data, rep, rep, rep),
        out_specs=(data, rep, rep, rep)))(x, upstream, *params)
    chex.assert_trees_all_close(sharded, full, rtol=1e-5, atol=1e-5)
    batch = jax.sharding.NamedSharding(mesh, data)
    partitioned = jax.jit(grads)(jax.device_put(x, batch),
                                 jax.device_put(upstream, batch), *params)
    chex.assert_trees_all_close(partitioned, full, rtol=1e-5, atol=1e-5)

  def test_replicated_kernel_is_dithered_alike_on_every_device(self):
    kernel = jax.random.normal(jax.random.key(0), (3, 3, 4, 8))
    log2_step = jnp.full((8,), -3.0)
    upstream = jax.random.normal(jax.random.key(1), (4, 3, 3, 4, 8))
    key = jax.random.key_data(_step_key(8))

    def step_grad(k, l, g):
      return jax.grad(lambda l: jnp.sum(
          quantizers.quantize_weight(k, l, key) * g))(l)

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("data",))
    rep, data = jax.sharding.PartitionSpec(), jax.sharding.PartitionSpec("data")
    sharded = jax.jit(jax.shard_map(
        lambda k, l, g: step_grad(k, l, g[0]), mesh=mesh,
        in_specs=(rep, rep, data), out_specs=rep))(kernel, log2_step,
                                                   upstream)
    chex.assert_trees_all_close(
        sharded, step_grad(kernel, log2_step, upstream.sum(axis=0)),
        rtol=1e-5, atol=1e-5)


if __name__ == "__main__":
  absltest.main()
