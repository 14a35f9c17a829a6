"""Tests for gdnsq_jax.quantized_ops: the framework-agnostic per-op core."""

from __future__ import annotations

from absl.testing import absltest
import chex
import jax
import jax.numpy as jnp
import numpy as np

from gdnsq_jax import channels
from gdnsq_jax import quantized_ops
from gdnsq_jax import quantizers
from gdnsq_jax.settings import QuantSettings

_ACT = {"log2_step": jnp.float32(-2.0), "log2_range": jnp.float32(1.0),
        "clamp_low": jnp.float32(-0.25)}


class QuantizedOpsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_kernel_with_multi_dim_output_channels(self):
    # A DenseGeneral q-projection kernel (in, heads, head_dim): one step and
    # one zero point per (head, dim), over the input axis.
    kernel = jax.random.normal(jax.random.key(0), (6, 2, 3))
    log2_step = jnp.log2(jnp.linspace(0.1, 0.6, 6)).reshape(2, 3)
    s = QuantSettings()
    got = self.variant(lambda k, l: quantized_ops.quantize_kernel(
        k, l, None, s))(kernel, log2_step)
    expected = quantizers.quantize_weight(
        kernel.reshape(6, 6), log2_step.reshape(6)).reshape(6, 2, 3)
    chex.assert_trees_all_close(got, expected, atol=1e-6)
    step = np.exp2(np.asarray(log2_step))
    zero = np.asarray(kernel).min(axis=0)
    codes = (np.asarray(got) - zero) / step
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-4)

  def test_kernel_with_leading_output_channel(self):
    kernel = jax.random.normal(jax.random.key(1), (4, 5))  # 'bd,hd->bh'
    log2_step = jnp.full((4, 1), -3.0)
    got = quantized_ops.quantize_kernel(kernel, log2_step, None,
                                        QuantSettings())
    expected = quantizers.quantize_weight(kernel.T, jnp.full((4,), -3.0)).T
    chex.assert_trees_all_close(got, expected, atol=1e-6)
    # Conv / dense layouts go straight to the numerics (same values).
    conv = jax.random.normal(jax.random.key(2), (3, 3, 2, 4))
    chex.assert_trees_all_equal(
        quantized_ops.quantize_kernel(conv, jnp.full((4,), -3.0), None,
                                      QuantSettings()),
        quantizers.quantize_weight(conv, jnp.full((4,), -3.0)))

  def test_step_gradient_has_the_step_shape(self):
    kernel = jax.random.normal(jax.random.key(3), (6, 2, 3))
    g = jax.grad(lambda l: jnp.sum(quantized_ops.quantize_kernel(
        kernel, l, jax.random.key(4), QuantSettings()) ** 2))(
            jnp.full((2, 3), -3.0))
    self.assertEqual(g.shape, (2, 3))

  def test_quantizers_off_when_disabled_or_observing(self):
    x = jax.random.normal(jax.random.key(5), (4, 3))
    kernel = jax.random.normal(jax.random.key(6), (3, 2))
    s = QuantSettings()
    quantized = quantized_ops.quantize_input(x, _ACT, None, s)
    self.assertFalse(np.allclose(quantized, x))
    self.assertFalse(quantized_ops.is_observing())
    with quantized_ops.observing():
      self.assertTrue(quantized_ops.is_observing())
      chex.assert_trees_all_equal(
          quantized_ops.quantize_input(x, _ACT, None, s), x)
      chex.assert_trees_all_equal(
          quantized_ops.quantize_kernel(kernel, jnp.full((2,), -2.0), None,
                                        s), kernel)
    self.assertFalse(quantized_ops.is_observing())
    off = QuantSettings(enabled=False)
    chex.assert_trees_all_equal(
        quantized_ops.quantize_input(x, _ACT, None, off), x)

  def test_input_statistics(self):
    x = jnp.array([[-1.0, 0.1], [0.4, 2.0]])
    stats = quantized_ops.input_statistics(x, _ACT, QuantSettings())
    # Grid [-0.25, 1.5] in steps of 1/4: codes 0 (clamped) .. 7 (clamped).
    chex.assert_trees_all_close(
        {k: float(v) for k, v in stats.items()},
        {"input_min": -1.0, "input_max": 2.0, "code_min": 0.0,
         "code_max": 7.0, "input_sum": 1.5, "input_count": 4.0})
    self.assertEqual(set(stats), set(quantized_ops.STAT_REDUCERS))

  def test_weight_step_shape(self):
    self.assertEqual(quantized_ops.weight_step_shape(
        (16, 2, 8), (1, 2), QuantSettings()), (2, 8))
    self.assertEqual(quantized_ops.weight_step_shape(
        (16, 2, 8), (1, 2), QuantSettings(per_channel=False)), ())
    self.assertEqual(channels.step_shape((3, 3, 1, 8), (3,)), (8,))


if __name__ == "__main__":
  absltest.main()
