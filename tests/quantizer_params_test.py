"""Tests of gdnsq_jax.quantizer_params: the one home of names and init values."""

from __future__ import annotations

from absl.testing import absltest
import jax
import jax.numpy as jnp

from gdnsq_jax import bitwidths
from gdnsq_jax import layers
from gdnsq_jax import quantizer_params


class QuantizerParamsTest(absltest.TestCase):

  def test_layers_create_params_with_these_names_and_values(self):
    layer = layers.QuantDense(3)
    params = layer.init(jax.random.key(0), jnp.ones((1, 2)))["params"]
    self.assertEqual(sorted(params), ["bias", "input_quantizer", "kernel",
                                      "log2_step"])
    q = params[quantizer_params.INPUT_QUANTIZER]
    self.assertEqual(tuple(sorted(q)),
                     tuple(sorted(quantizer_params.ACTIVATION_KEYS)))
    for name, value in quantizer_params.ACTIVATION_INIT.items():
      self.assertEqual(float(q[name]), value)
      self.assertEqual(
          quantizer_params.initial_value(("dense", "input_quantizer", name), q),
          value)
    self.assertEqual(float(params["log2_step"][0]),
                     quantizer_params.WEIGHT_LOG2_STEP_INIT)
    self.assertEqual(
        quantizer_params.initial_value(("dense", "log2_step"), params),
        quantizer_params.WEIGHT_LOG2_STEP_INIT)
    index = bitwidths.find_quantizers(params)
    self.assertEqual(index.weights, ("",))
    self.assertEqual(index.activations, ("input_quantizer",))

  def test_quantizer_leaves_and_unknown_names(self):
    self.assertTrue(quantizer_params.is_quantizer_leaf(("c", "log2_step")))
    self.assertTrue(quantizer_params.is_quantizer_leaf(
        ("c", "input_quantizer", "clamp_low")))
    self.assertFalse(quantizer_params.is_quantizer_leaf(("c", "kernel")))
    with self.assertRaisesRegex(KeyError, "'c/kernel' is not a quantizer"):
      quantizer_params.initial_value(("c", "kernel"), {})


if __name__ == "__main__":
  absltest.main()
