"""Tests for gdnsq_jax.layers: QuantAct, QuantConv, QuantDense, QuantSettings."""

from __future__ import annotations

from absl.testing import absltest
import chex
import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from gdnsq_jax import activation_quantizer
from gdnsq_jax import layers
from gdnsq_jax import quantizers
from tests import layer_setup

_DN = ("NHWC", "HWIO", "NHWC")


class QuantLayerTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_quant_act_equals_functional_and_lies_on_grid(self):
    act = layers.QuantAct()
    x = 2.0 * layer_setup.normal((3, 7))
    params = dict(layer_setup.COARSE_ACT)
    y = self.variant(lambda p, x: act.apply({"params": p}, x))(params, x)
    expected = activation_quantizer.quantize_activation(x, -2.0, 1.0, -0.25)
    chex.assert_trees_all_close(y, expected, atol=1e-6)
    codes = (np.asarray(y) + 0.25) / 0.25
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-5)
    self.assertBetween(float(codes.min()), 0.0, 7.0)
    self.assertBetween(float(codes.max()), 0.0, 7.0)

  def test_param_names_and_init_values(self):
    conv = layers.QuantConv(5, (3, 3))
    v = conv.init(jax.random.key(0), layer_setup.normal((1, 6, 6, 2)))
    p = v["params"]
    self.assertEqual(set(v), {"params"})  # nothing sown during init
    self.assertEqual(
        set(p), {"kernel", "bias", "log2_step", "input_quantizer"}
    )
    self.assertEqual(
        set(p["input_quantizer"]), {"log2_step", "log2_range", "clamp_low"}
    )
    chex.assert_trees_all_close(p["log2_step"], jnp.full((5,), -12.0))
    chex.assert_trees_all_close(
        p["input_quantizer"],
        {"log2_step": -10.0, "log2_range": 10.0, "clamp_low": 0.0},
    )
    per_tensor = layers.QuantDense(
        3, settings=layers.QuantSettings(per_channel=False)
    ).init(jax.random.key(0), layer_setup.normal((2, 4)))
    self.assertEqual(per_tensor["params"]["log2_step"].shape, ())

  @chex.variants(with_jit=True, without_jit=True)
  def test_quant_conv_equals_conv_of_quantized_operands(self):
    conv = layers.QuantConv(5, (3, 3), strides=2, padding=((1, 1), (1, 1)))
    x = layer_setup.normal((2, 7, 7, 3))
    params = layer_setup.variables(conv.init, x)["params"]
    params["bias"] = layer_setup.normal((5,), 2)
    y = self.variant(lambda p, x: conv.apply({"params": p}, x))(params, x)
    qx = activation_quantizer.quantize_activation(x, -2.0, 1.0, -0.25)
    qk = quantizers.quantize_weight(params["kernel"], jnp.full((5,), -3.0))
    expected = lax.conv_general_dilated(
        qx, qk, (2, 2), ((1, 1), (1, 1)), dimension_numbers=_DN
    ) + params["bias"]
    chex.assert_trees_all_close(y, expected, atol=1e-5)
    unquantized = lax.conv_general_dilated(
        x, params["kernel"], (2, 2), ((1, 1), (1, 1)), dimension_numbers=_DN
    ) + params["bias"]
    self.assertGreater(float(jnp.abs(y - unquantized).max()), 1e-2)

  @chex.variants(with_jit=True, without_jit=True)
  def test_quant_dense_equals_dot_of_quantized_operands(self):
    dense = layers.QuantDense(4)
    x = layer_setup.normal((3, 6))
    params = layer_setup.variables(dense.init, x)["params"]
    y = self.variant(lambda p, x: dense.apply({"params": p}, x))(params, x)
    qx = activation_quantizer.quantize_activation(x, -2.0, 1.0, -0.25)
    qk = quantizers.quantize_weight(params["kernel"], jnp.full((4,), -3.0))
    chex.assert_trees_all_close(y, qx @ qk + params["bias"], atol=1e-5)

  def test_a32_has_no_activation_quantizer(self):
    settings = layers.QuantSettings(activation_bits=32)
    conv = layers.QuantConv(4, (3, 3), settings=settings)
    x = layer_setup.normal((1, 5, 5, 2))
    params = layer_setup.variables(conv.init, x)["params"]
    self.assertNotIn("input_quantizer", params)
    qk = quantizers.quantize_weight(params["kernel"], jnp.full((4,), -3.0))
    expected = lax.conv_general_dilated(
        x, qk, (1, 1), "SAME", dimension_numbers=_DN
    ) + params["bias"]
    chex.assert_trees_all_close(
        conv.apply({"params": params}, x), expected, atol=1e-5
    )
    self.assertEqual(
        layers.QuantAct(settings).init(jax.random.key(0), x), {}
    )

  def test_disabled_settings_compute_full_precision_with_same_tree(self):
    conv = layers.QuantConv(4, (3, 3))
    x = layer_setup.normal((1, 5, 5, 2))
    params = layer_setup.variables(conv.init, x)["params"]
    off = layers.QuantConv(4, (3, 3), settings=layers.QuantSettings(
        enabled=False))
    fp = nn.Conv(4, (3, 3)).apply(
        {"params": {"kernel": params["kernel"], "bias": params["bias"]}}, x
    )
    chex.assert_trees_all_close(off.apply({"params": params}, x), fp)

  def test_frozen_clamp_low_gets_no_gradient(self):
    act = layers.QuantAct(layers.QuantSettings(learnable_clamp_low=False))
    x = 3.0 * layer_setup.normal((4, 5))  # values below the low clamp and above the top
    params = dict(layer_setup.COARSE_ACT)
    g = jax.grad(lambda p: act.apply({"params": p}, x).sum())(params)
    self.assertEqual(float(g["clamp_low"]), 0.0)
    self.assertNotEqual(float(g["log2_range"]), 0.0)

  def test_stats_are_sown_only_into_a_mutable_collection(self):
    act = layers.QuantAct()
    x = layer_setup.normal((4, 5))
    v = act.init(jax.random.key(0), x)
    out = act.apply(v, x)
    self.assertIsInstance(out, jax.Array)  # pure apply: no state returned
    _, state = act.apply(v, x, mutable=[layers.QUANT_STATS])
    stats = state[layers.QUANT_STATS]
    chex.assert_trees_all_close(
        (stats["input_min"], stats["input_max"]), (x.min(), x.max())
    )

  def test_invalid_settings_name_the_choices(self):
    with self.assertRaisesRegex(ValueError, "unknown estimator 'st'"):
      layers.QuantSettings(estimator="st")
    with self.assertRaisesRegex(ValueError, "weight_bits=0"):
      layers.QuantSettings(weight_bits=0)


class GeneralLayerTest(chex.TestCase):
  """QuantDenseGeneral / QuantEinsum: per-output-channel steps, any layout."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_quant_dense_general_equals_op_of_quantized_operands(self):
    layer = layers.QuantDenseGeneral((2, 3), axis=(-2, -1))
    x = layer_setup.normal((4, 5, 6))
    params = layer_setup.variables(layer.init, x)["params"]
    self.assertEqual(params["kernel"].shape, (5, 6, 2, 3))
    self.assertEqual(params["log2_step"].shape, (2, 3))
    y = self.variant(lambda p, x: layer.apply({"params": p}, x))(params, x)
    qx = activation_quantizer.quantize_activation(x, -2.0, 1.0, -0.25)
    qk = quantizers.quantize_weight(
        params["kernel"].reshape(30, 6), jnp.full((6,), -3.0)
    ).reshape(5, 6, 2, 3)
    expected = jnp.einsum("bij,ijkl->bkl", qx, qk) + params["bias"]
    chex.assert_trees_all_close(y, expected, atol=1e-5)

  def test_quant_einsum_with_leading_output_channel(self):
    layer = layers.QuantEinsum((4, 6), "bd,hd->bh")
    x = layer_setup.normal((3, 6))
    params = layer_setup.variables(layer.init, x)["params"]
    self.assertEqual(params["log2_step"].shape, (4, 1))
    y = layer.apply({"params": params}, x)
    qx = activation_quantizer.quantize_activation(x, -2.0, 1.0, -0.25)
    qk = quantizers.quantize_weight(params["kernel"].T,
                                    jnp.full((4,), -3.0)).T
    chex.assert_trees_all_close(y, qx @ qk.T + params["bias"], atol=1e-5)
    # The equation may also come with the call.
    late = layers.QuantEinsum((4, 6))
    chex.assert_trees_all_close(
        late.apply({"params": params}, x, "bd,hd->bh"), y)

  def test_depthwise_conv_has_one_step_per_output_channel(self):
    conv = layers.QuantConv(6, (3, 3), feature_group_count=3)
    x = layer_setup.normal((2, 5, 5, 3))
    params = layer_setup.variables(conv.init, x)["params"]
    self.assertEqual(params["kernel"].shape, (3, 3, 1, 6))
    self.assertEqual(params["log2_step"].shape, (6,))
    qx = activation_quantizer.quantize_activation(x, -2.0, 1.0, -0.25)
    qk = quantizers.quantize_weight(params["kernel"], jnp.full((6,), -3.0))
    expected = lax.conv_general_dilated(
        qx, qk, (1, 1), "SAME", dimension_numbers=_DN,
        feature_group_count=3) + params["bias"]
    chex.assert_trees_all_close(conv.apply({"params": params}, x), expected,
                                atol=1e-5)


if __name__ == "__main__":
  absltest.main()
