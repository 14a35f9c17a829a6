"""Tests for gdnsq_jax.interception: quantize_model, rules, report, loading FP variables."""

from __future__ import annotations

from absl.testing import absltest
from absl.testing import parameterized
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gdnsq_jax import interception
from gdnsq_jax import layers
from tests import layer_setup
from train import models



class InterceptionTest(chex.TestCase):

  def setUp(self):
    super().setUp()
    self.x = layer_setup.normal((2, 8, 8, 3))
    self.qmodel = interception.quantize_model(layer_setup.PlainCNN(), self.x)

  def test_plain_cnn_is_quantized_where_the_rules_say(self):
    rows = {r.path: r for r in interception.quantization_report(self.qmodel)}
    self.assertEqual(list(rows), ["stem", "body", "proj", "hidden", "head"])
    self.assertEqual(self.qmodel.quantized_paths, {"body", "hidden"})
    self.assertEqual(
        {p: rows[p].role for p in rows},
        {"stem": "stem", "body": "", "proj": "1x1", "hidden": "",
         "head": "classifier"},
    )
    params = jax.eval_shape(self.qmodel.init, jax.random.key(0), self.x)[
        "params"]
    self.assertEqual(
        set(params["body"]), {"kernel", "bias", "log2_step", "input_quantizer"}
    )
    self.assertEqual(set(params["stem"]), {"kernel", "bias"})
    self.assertEqual(set(params["head"]), {"kernel", "bias"})
    table = interception.format_quantization_report(
        interception.quantization_report(self.qmodel)
    )
    self.assertIn("2 quantized, 3 full precision", table)
    self.assertRegex(table, r"proj\s+conv\s+1x1x6x6\s+1x1\s+no")

  @chex.variants(with_jit=True, without_jit=True)
  def test_intercepted_model_equals_explicit_quant_layers(self):
    v = layer_setup.variables(self.qmodel.init, self.x)
    explicit = layer_setup.ExplicitCNN()
    chex.assert_trees_all_equal_shapes(
        v, jax.eval_shape(explicit.init, jax.random.key(0), self.x)
    )
    got = self.variant(self.qmodel.apply)(v, self.x)
    want = jax.jit(explicit.apply)(v, self.x)
    chex.assert_trees_all_close(got, want, atol=1e-6)
    fp = jax.jit(layer_setup.PlainCNN().apply)(v, self.x)
    self.assertGreater(float(jnp.abs(got - fp).max()), 1e-3)

  def test_model_kwargs_and_mutable_collections_pass_through(self):
    v = layer_setup.variables(self.qmodel.init, self.x)
    _, state = self.qmodel.apply(v, self.x, train=True, mutable=["batch_stats"])
    self.assertFalse(
        np.allclose(state["batch_stats"]["bn"]["mean"],
                    v["batch_stats"]["bn"]["mean"])
    )

  def test_rule_dicts_regexes_and_unknown_keys(self):
    with self.assertRaisesRegex(
        ValueError, "unknown quantization rule key 'foo'; valid keys: include"
    ):
      interception.quantize_model(layer_setup.PlainCNN(), self.x, rules={"foo": 1})
    q = interception.quantize_model(
        layer_setup.PlainCNN(), self.x,
        rules={"quantize_stem": True, "quantize_1x1": True,
               "quantize_classifier": True, "exclude": ["hid.*"]},
    )
    self.assertEqual(q.quantized_paths, {"stem", "body", "proj", "head"})
    q = interception.quantize_model(
        layer_setup.PlainCNN(), self.x, rules=interception.QuantizationRules(
            include=["b.*"]))
    self.assertEqual(q.quantized_paths, {"body"})

  def test_jitted_forward_backward_traces_once(self):
    v = layer_setup.variables(self.qmodel.init, self.x)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def grads(params, x, key):
      def loss(p):
        out, _ = self.qmodel.apply(
            dict(v, params=p), x, train=True, mutable=["batch_stats"],
            rngs={layers.NOISE_RNG: key},
        )
        return jnp.sum(out**2)
      return jax.grad(loss)(params)

    grads(v["params"], self.x, jax.random.key(1))
    g = grads(v["params"], self.x + 1.0, jax.random.key(2))
    self.assertTrue(all(bool(jnp.isfinite(l).all())
                        for l in jax.tree.leaves(g)))

  def test_noise_rng_changes_step_gradients_only(self):
    v = layer_setup.variables(self.qmodel.init, self.x)

    @jax.jit
    def grads(keys):  # keys: () for no dither, or (key,)
      rngs = {layers.NOISE_RNG: keys[0]} if keys else {}

      def loss(p):
        return jnp.sum(self.qmodel.apply(dict(v, params=p), self.x,
                                         rngs=rngs) ** 2)
      return jax.grad(loss)(v["params"])

    g1 = grads((jax.random.key(1),))
    g2 = grads((jax.random.key(2),))
    body1, body2 = g1["body"], g2["body"]
    self.assertFalse(np.allclose(body1["log2_step"], body2["log2_step"]))
    self.assertFalse(np.allclose(body1["input_quantizer"]["log2_step"],
                                 body2["input_quantizer"]["log2_step"]))
    chex.assert_trees_all_close(body1["kernel"], body2["kernel"])
    no_dither = grads(())
    chex.assert_trees_all_equal(no_dither, grads(()))
    self.assertFalse(np.allclose(no_dither["body"]["log2_step"],
                                 body1["log2_step"]))

  def test_undecided_layer_raises(self):
    class TwoModes(nn.Module):
      @nn.compact
      def __call__(self, x, train=False):
        x = nn.Dense(3, name="a")(x)
        return nn.Dense(2, name="b")(x) if train else x

    q = interception.quantize_model(TwoModes(), layer_setup.normal((2, 4)))
    with self.assertRaisesRegex(ValueError, "layer 'b' was not called"):
      jax.eval_shape(lambda x: q.init(jax.random.key(0), x, train=True),
                     layer_setup.normal((2, 4)))
    q = interception.quantize_model(TwoModes(), layer_setup.normal((2, 4)), train=True)
    self.assertEqual(q.quantized_paths, set())  # 'a' is the stem, 'b' the head


class ResNetPlacementTest(parameterized.TestCase):

  @parameterized.parameters(
      (models.ResNet20(), (1, 32, 32, 3), 18,
       ["stage2_block1", "stage3_block1"]),
      (models.ResNet18(), (1, 64, 64, 3), 16,
       ["stage2_block1", "stage3_block1", "stage4_block1"]),
  )
  def test_default_rules_quantize_every_3x3_body_conv(
      self, model, shape, expected, shortcut_blocks
  ):
    q = interception.quantize_model(
        model, jax.ShapeDtypeStruct(shape, jnp.float32)
    )
    quantized = q.quantized_paths
    self.assertLen(quantized, expected)
    self.assertTrue(all(p.endswith(("/conv1", "/conv2")) for p in quantized))
    fp = {r.path for r in q.layers if not r.quantized}
    self.assertEqual(
        fp,
        {"stem_conv", "classifier"}
        | {f"{b}/shortcut_conv" for b in shortcut_blocks},
    )
    roles = {r.path: r.role for r in q.layers}
    self.assertEqual(roles["stem_conv"], "stem")
    self.assertEqual(roles["classifier"], "classifier")

  def test_fp_variables_load_and_codes_are_integers(self):
    model = models.ResNet20(stage_widths=(4, 8, 8), blocks_per_stage=(1, 1, 1))
    x = layer_setup.normal((2, 8, 8, 3))
    q = interception.quantize_model(model, x)
    fp = layer_setup.variables(model.init, x)
    abstract = jax.eval_shape(q.init, jax.random.key(1), x)
    v = interception.add_quantizer_params(fp, abstract)
    chex.assert_trees_all_equal_shapes_and_dtypes(v, abstract)
    chex.assert_trees_all_equal(
        v["params"]["stage1_block1"]["conv1"]["log2_step"], jnp.full((4,), -12.)
    )
    chex.assert_trees_all_equal(v["batch_stats"], fp["batch_stats"])
    chex.assert_trees_all_equal(
        v["params"]["stage1_block1"]["conv1"]["kernel"],
        fp["params"]["stage1_block1"]["conv1"]["kernel"],
    )
    v = dict(v, params=layer_setup.coarse(v["params"]))

    @jax.jit
    def quantized_operands(v, x):
      seen = []

      def capture(next_fun, args, kwargs, context):
        module = context.module
        if type(module) is nn.Conv and module.path == ():  # a layer's FP twin
          seen.append((args[0], module.variables["params"]["kernel"]))
        return next_fun(*args, **kwargs)

      with nn.intercept_methods(capture):
        q.apply(v, x)
      return seen

    seen = quantized_operands(v, x)
    paths = [r.path for r in q.layers if r.quantized]
    self.assertLen(seen, len(paths))
    for path, (qx, qk) in zip(paths, seen):
      node = v["params"]
      for part in path.split("/"):
        node = node[part]
      k_codes = (qk - qk.min(axis=(0, 1, 2))) / 2.0 ** node["log2_step"]
      x_codes = (qx + 0.25) / 0.25
      np.testing.assert_allclose(k_codes, np.round(k_codes), atol=1e-4)
      np.testing.assert_allclose(x_codes, np.round(x_codes), atol=1e-4)

  def test_fp_variables_that_do_not_fit_raise_with_both_lists(self):
    x = layer_setup.normal((2, 8, 8, 3))
    q = interception.quantize_model(layer_setup.PlainCNN(), x)
    quantized = jax.eval_shape(q.init, jax.random.key(0), x)
    fp = layer_setup.variables(layer_setup.PlainCNN().init, x)
    fp["params"]["extra"] = {"kernel": jnp.zeros(2)}
    del fp["params"]["bn"]
    fp["params"]["head"]["bias"] = jnp.zeros(4)
    with self.assertRaisesRegex(
        ValueError,
        r"in FP only: \['params/extra/kernel'\]; missing from FP: "
        r"\['params/bn/bias', 'params/bn/scale'\]; shape mismatches: "
        r"\['params/head/bias: \(4,\) vs \(3,\)'\]",
    ):
      interception.add_quantizer_params(fp, quantized)


if __name__ == "__main__":
  absltest.main()
