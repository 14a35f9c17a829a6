"""Tests for gdnsq_jax.nnx_quantize: placement, NNX state, dither keys, jitted training."""

from __future__ import annotations

from absl.testing import absltest
from absl.testing import parameterized
import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from gdnsq_jax import bitwidths
from gdnsq_jax import interception
from gdnsq_jax import nnx_quantize
from gdnsq_jax import penalty
from gdnsq_jax.nnx_quantizers import QuantParam
from gdnsq_jax.nnx_quantizers import params_dict
from gdnsq_jax.settings import QuantSettings
from tests import nnx_setup


def _paths(state) -> set[str]:
  return {"/".join(str(k) for k in path)
          for path, _ in nnx.to_flat_state(state)}


class PlacementTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.x = nnx_setup.normal((2, 8, 8, 3))
    self.fp = nnx_setup.nnx_cnn()
    self.model = nnx_quantize.quantize_model(self.fp, self.x)

  def test_cnn_report_follows_the_rules(self):
    rows = {r.path: r for r in nnx_quantize.quantization_report(self.model)}
    self.assertEqual(list(rows), ["stem", "depthwise", "body", "proj",
                                  "hidden", "head"])
    self.assertEqual({p for p, r in rows.items() if r.quantized},
                     {"depthwise", "body", "hidden"})
    self.assertEqual(rows["proj"].role, "1x1")
    self.assertEqual(rows["head"].role, "classifier")
    text = interception.format_quantization_report(list(rows.values()))
    self.assertIn("3 quantized, 3 full precision", text)

  def test_vit_attention_and_mlp_are_quantized_stem_and_head_not(self):
    x = nnx_setup.normal((2, 8, 8, 1))
    model = nnx_quantize.quantize_model(nnx_setup.nnx_vit(), x)
    rows = {r.path: r.quantized for r in
            nnx_quantize.quantization_report(model)}
    self.assertEqual(rows, {
        "patch": False, "attention/query": True, "attention/key": True,
        "attention/value": True, "attention/out": True, "mlp/0": True,
        "mlp/1": True, "head": False})
    shapes = jax.tree.map(jnp.shape, nnx.state(model, QuantParam))
    self.assertEqual(shapes["attention"]["query"]["log2_step"], (2, 4))
    self.assertEqual(shapes["attention"]["out"]["log2_step"], (8,))
    self.assertEqual(shapes["mlp"][0]["log2_step"], (2, 8))
    self.assertEqual(shapes["mlp"][1]["log2_step"], (8,))

  def test_quantizer_params_sit_next_to_the_kernel(self):
    paths = _paths(nnx.state(self.model, QuantParam))
    expected = set()
    for layer in ("depthwise", "body", "hidden"):
      expected |= {f"{layer}/log2_step"} | {
          f"{layer}/input_quantizer/{n}"
          for n in ("log2_step", "log2_range", "clamp_low")}
    self.assertEqual(paths, expected)
    self.assertEqual(self.model.depthwise.log2_step.shape, (4,))
    index = bitwidths.find_quantizers(params_dict(self.model))
    self.assertEqual(index.weights, ("body", "depthwise", "hidden"))
    # QuantParam is an nnx.Param: wrt=nnx.Param trains it.
    self.assertTrue(paths <= _paths(nnx.state(self.model, nnx.Param)))

  def test_fp_state_loads_unchanged_and_the_fp_model_is_untouched(self):
    self.assertIs(type(self.fp.body), nnx.Conv)
    fp_state = nnx.state(self.fp)
    self.assertTrue(_paths(fp_state) <= _paths(nnx.state(self.model)))
    other = nnx_setup.nnx_cnn(seed=7)
    nnx.update(self.model, nnx.state(other))
    np.testing.assert_array_equal(self.model.body.kernel[...],
                                  other.body.kernel[...])
    self.assertEqual(float(self.model.body.log2_step[0]), -12.0)

  def test_rules_and_errors(self):
    model = nnx_quantize.quantize_model(
        self.fp, self.x, rules={"exclude": ["body"], "quantize_1x1": True})
    self.assertEqual(nnx_quantize.quantization_plan(model).quantized_paths,
                     {"depthwise", "proj", "hidden"})
    with self.assertRaisesRegex(ValueError, "already quantized"):
      nnx_quantize.quantize_model(model, self.x)
    with self.assertRaisesRegex(ValueError, "unknown quantization rule"):
      nnx_quantize.quantize_model(self.fp, self.x, rules={"stem": True})
    with self.assertRaisesRegex(TypeError, "not a quantized NNX model"):
      nnx_quantize.quantization_report(self.fp)

  def test_in_place_quantization_keeps_the_object(self):
    fp = nnx_setup.nnx_cnn()
    model = nnx_quantize.quantize_model(fp, self.x, copy=False)
    self.assertIs(model, fp)
    self.assertIsInstance(model, nnx_setup.NnxCNN)
    self.assertIsInstance(model.body, nnx.Conv)


class DitherAndTrainingTest(chex.TestCase):

  def setUp(self):
    super().setUp()
    self.x = nnx_setup.normal((4, 8, 8, 3))
    self.model = nnx_quantize.quantize_model(
        nnx_setup.nnx_cnn(), self.x,
        settings=QuantSettings(weight_bits=2, activation_bits=2))
    coarse(self.model)

  def _step_grads(self, model):
    loss = lambda m: jnp.sum(m(self.x) ** 2)
    return nnx.grad(loss)(model)

  def test_one_key_per_training_call_none_in_eval(self):
    self.assertEqual(int(self.model.quant_noise.count[...]), 0)
    self.model(self.x)
    self.assertEqual(int(self.model.quant_noise.count[...]), 1)
    self.model.eval()
    self.assertTrue(self.model.deterministic)
    first = self.model(self.x)
    np.testing.assert_array_equal(first, self.model(self.x))
    self.assertEqual(int(self.model.quant_noise.count[...]), 1)

  def test_the_dither_moves_step_gradients_only(self):
    grads1 = self._step_grads(self.model)
    grads2 = self._step_grads(self.model)  # next key
    np.testing.assert_allclose(grads1["body"]["kernel"][...],
                               grads2["body"]["kernel"][...], rtol=1e-6)
    self.assertFalse(np.allclose(grads1["body"]["log2_step"][...],
                                 grads2["body"]["log2_step"][...]))
    self.model.deterministic = True  # no key: no dither, reproducible
    grads3 = self._step_grads(self.model)
    grads4 = self._step_grads(self.model)
    np.testing.assert_array_equal(grads3["body"]["log2_step"][...],
                                  grads4["body"]["log2_step"][...])

  def test_lsq_family_draws_no_key(self):
    model = nnx_quantize.quantize_model(
        nnx_setup.nnx_cnn(), self.x,
        settings=QuantSettings(method="lsq", weight_bits=2, activation_bits=2))
    coarse(model)
    model(self.x)
    self.assertEqual(int(model.quant_noise.count[...]), 0)


class JittedTrainStepTest(parameterized.TestCase):

  @parameterized.parameters(("cnn", (4, 8, 8, 3)), ("vit", (4, 8, 8, 1)))
  def test_traces_once_and_trains(self, name, shape):
    chex.clear_trace_counter()
    x = nnx_setup.normal(shape)
    fp = nnx_setup.nnx_cnn() if name == "cnn" else nnx_setup.nnx_vit()
    model = nnx_quantize.quantize_model(
        fp, x, settings=QuantSettings(weight_bits=2, activation_bits=2))
    coarse(model)
    tx = penalty.gdnsq_optimizer(
        bitwidths.differentiable_bitwidths, learning_rate=1e-2,
        weight_bits=2, activation_bits=2, warmup_steps=1, gamma=0.99)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    @chex.assert_max_traces(n=1)
    def train_step(model, optimizer, teacher, x):
      teacher_logits = teacher(x)
      def loss_fn(model):
        return jnp.mean((model(x) - teacher_logits) ** 2)
      loss, grads = nnx.value_and_grad(loss_fn)(model)
      optimizer.update(model, grads, value=loss, converged=jnp.array(False))
      return loss

    fp.eval()
    layer = nnx_quantize.quantized_layers(model)["attention/query" if name ==
                                                 "vit" else "body"]
    before = np.asarray(layer.log2_step[...])
    for _ in range(3):
      loss = train_step(model, optimizer, fp, x)
    self.assertTrue(np.isfinite(float(loss)))
    self.assertEqual(int(optimizer.step[...]), 3)
    self.assertEqual(int(model.quant_noise.count[...]), 3)
    self.assertFalse(np.array_equal(before, layer.log2_step[...]))


def coarse(model):
  """A coarse grid on every quantizer, so that rounding is visible."""
  for layer in nnx_quantize.quantized_layers(model).values():
    layer.log2_step[...] = jnp.full(layer.log2_step.shape, -3.0, jnp.float32)
    q = layer.input_quantizer
    q.log2_step[...], q.log2_range[...] = jnp.float32(-2), jnp.float32(1)
    q.clamp_low[...] = jnp.float32(-0.25)


if __name__ == "__main__":
  absltest.main()
