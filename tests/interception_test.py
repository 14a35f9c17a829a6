"""Tests for gdnsq_jax.interception: quantize_model, rules, report, loading FP variables."""

from __future__ import annotations

from absl.testing import absltest
from absl.testing import parameterized
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gdnsq_jax import bitwidths
from gdnsq_jax import calibration
from gdnsq_jax import interception
from gdnsq_jax import layers
from gdnsq_jax import penalty
from tests import layer_setup
from train import mobilenet
from train import models
from train import steps
from train import vit



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
    rules = interception.QuantizationRules(include=["b.*"])
    self.assertIs(interception.QuantizationRules.coerce(rules), rules)
    self.assertEqual(interception.QuantizationRules.coerce(None),
                     interception.QuantizationRules())

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


def _weight_owners(fp_params):
  """Paths of every param dict holding a kernel (the weight ops)."""
  flat = jax.tree_util.tree_leaves_with_path(fp_params)
  return {"/".join(str(k.key) for k in p[:-1]) for p, _ in flat
          if p[-1].key == "kernel"}


_ANY_MODELS = (
    ("resnet", lambda: models.ResNet20(stage_widths=(4, 8, 8),
                                       blocks_per_stage=(1, 1, 1)),
     (4, 8, 8, 3)),
    ("vit", layer_setup.TinyViT, (4, 8, 8, 1)),
    ("mobilenet", layer_setup.TinyMobileNet, (4, 8, 8, 3)),
    ("zoo_vit", lambda: vit.ViT(hidden_size=16, num_layers=1, num_heads=2,
                                mlp_dim=32, patch_size=4), (4, 8, 8, 1)),
    ("zoo_mobilenet_v2", lambda: mobilenet.MobileNetV2(
        stage_widths=(8, 12), blocks_per_stage=(1, 2), stage_strides=(1, 2),
        expansions=(1, 4), stem_width=8, head_width=16), (4, 8, 8, 1)),
)


class AnyLinenModelTest(parameterized.TestCase):
  """A ResNet, a ViT and a MobileNetV2 written with stock Linen layers."""

  def _setup(self, make, shape, bits=4):
    model = make()
    x = layer_setup.normal(shape, seed=3)
    qmodel = interception.quantize_model(
        model, x[:1], settings=layers.QuantSettings(
            weight_bits=bits, activation_bits=bits), train=False)
    fp = layer_setup.random_variables(model.init, x[:1], train=False)
    v = interception.add_quantizer_params(
        fp, jax.eval_shape(lambda x: qmodel.init(jax.random.key(0), x,
                                                 train=False), x[:1]))
    return model, qmodel, fp, v, x

  @parameterized.named_parameters(*_ANY_MODELS)
  def test_every_weight_op_is_reported_and_16_bits_match_fp(self, make, shape):
    model, qmodel, fp, v, x = self._setup(make, shape)
    rows = interception.quantization_report(qmodel)
    self.assertEqual({r.path for r in rows}, _weight_owners(fp["params"]))
    self.assertTrue(all(r.reason for r in rows))
    result = calibration.calibrate(qmodel, v, [x], bits=16,
                                   apply_kwargs={"train": False})
    got = jax.jit(lambda v, x: qmodel.apply(v, x, train=False))(
        result.variables, x)
    want = jax.jit(lambda v, x: model.apply(v, x, train=False))(fp, x)
    rel = float(jnp.abs(got - want).max() / jnp.abs(want).max())
    self.assertLess(rel, 1e-3)

  @parameterized.named_parameters(*_ANY_MODELS)
  def test_jitted_train_step_traces_once(self, make, shape):
    chex.clear_trace_counter()  # the step's code is shared by the models
    model, qmodel, fp, v, x = self._setup(make, shape, bits=2)
    tx = penalty.gdnsq_optimizer(
        bitwidths.differentiable_bitwidths, learning_rate=1e-2, weight_bits=2,
        activation_bits=2, warmup_steps=1, gamma=0.99)
    v = calibration.calibrate(qmodel, v, [x],
                              apply_kwargs={"train": False}).variables
    trainable = jax.tree.map(lambda _: jnp.asarray(True), v["params"])
    state = steps.create_state(v, tx, trainable,
                               jax.random.key_data(jax.random.key(0)))
    step = jax.jit(chex.assert_max_traces(steps.make_train_step(
        qmodel, tx, steps.make_task_loss("jeffreys", 1.0),
        teacher_model=model), n=1))
    batch = {"image": x, "label": jnp.arange(len(x)) % 10}
    state, _ = step(state, batch, fp)
    state, metrics = step(state, dict(batch, image=x + 0.5), fp)
    self.assertTrue(np.isfinite(float(metrics["train/loss"])))
    self.assertEqual(int(state.step), 2)

  def test_vit_projections_and_mlp_are_quantized_by_default(self):
    _, qmodel, _, v, _ = self._setup(layer_setup.TinyViT, (4, 8, 8, 1))
    rows = {r.path: r for r in qmodel.layers}
    projections = {f"block{i}_attention/{p}" for i in (1, 2)
                   for p in ("query", "key", "value", "out")}
    mlp = {f"block{i}_mlp{j}" for i in (1, 2) for j in (1, 2)}
    self.assertEqual(qmodel.quantized_paths, projections | mlp)
    self.assertEqual((rows["patch_embedding"].role, rows["head"].role),
                     ("stem", "classifier"))
    self.assertEqual(rows["block1_attention/query"].kind, "dense_general")
    attention = v["params"]["block1_attention"]
    # One step per output channel: (heads, head_dim) for q / k / v, the
    # model width for the output projection.
    self.assertEqual(attention["query"]["log2_step"].shape, (2, 8))
    self.assertEqual(attention["out"]["log2_step"].shape, (16,))
    self.assertIn("input_quantizer", attention["value"])

  def test_zoo_models_under_default_rules_and_path_regexes(self):
    _, qmodel, _, v, _ = self._setup(*_ANY_MODELS[3][1:])
    blocks = {f"encoder_block1/attention/{p}"
              for p in ("query", "key", "value", "out")}
    mlp = {"encoder_block1/mlp_dense1", "encoder_block1/mlp_dense2"}
    self.assertEqual(qmodel.quantized_paths, blocks | mlp)
    self.assertEqual(
        v["params"]["encoder_block1"]["attention"]["key"]["log2_step"].shape,
        (2, 8))
    q = interception.quantize_model(
        qmodel.model, layer_setup.normal((1, 8, 8, 1)), train=False,
        rules={"exclude": [r".*attention/(query|key)"]})
    self.assertEqual(q.quantized_paths, mlp | {
        "encoder_block1/attention/value", "encoder_block1/attention/out"})
    self.assertEqual(
        {r.reason for r in q.layers if r.path.endswith(("query", "key"))},
        {"excluded by '.*attention/(query|key)'"})
    _, qmodel, _, v, _ = self._setup(*_ANY_MODELS[4][1:])
    rows = {r.path: r for r in qmodel.layers}
    depthwise = [p for p in rows if p.endswith("/depthwise")]
    self.assertLen(depthwise, 3)
    for path in depthwise:
      self.assertTrue(rows[path].quantized)
      self.assertEqual(rows[path].kernel_shape[-2], 1)  # one input per group
      node = v["params"]
      for part in path.split("/"):
        node = node[part]
      self.assertEqual(node["log2_step"].shape, (rows[path].kernel_shape[-1],))

  def test_depthwise_convs_get_one_step_per_output_channel(self):
    _, qmodel, _, v, _ = self._setup(layer_setup.TinyMobileNet, (4, 8, 8, 3))
    rows = {r.path: r for r in qmodel.layers}
    self.assertTrue(rows["block1_depthwise"].quantized)
    self.assertEqual(rows["block1_depthwise"].kernel_shape, (3, 3, 1, 32))
    self.assertEqual(v["params"]["block1_depthwise"]["log2_step"].shape,
                     (32,))
    self.assertEqual(v["params"]["block2_depthwise"]["log2_step"].shape,
                     (32,))
    self.assertEqual(rows["block1_project"].reason,
                     "1x1 conv (quantize_1x1=False)")
    q = interception.quantize_model(
        layer_setup.TinyMobileNet(), layer_setup.normal((1, 8, 8, 3)),
        rules={"quantize_1x1": True}, train=False)
    self.assertEqual({r.path for r in q.layers if not r.quantized},
                     {"stem", "classifier"})

  def test_unsupported_weight_layers_are_listed_as_fp(self):

    class WithEmbed(nn.Module):

      @nn.compact
      def __call__(self, tokens):
        x = nn.Embed(7, 4, name="embed")(tokens)
        x = nn.ConvTranspose(4, (3,), name="up")(x)
        w = self.param("kernel", nn.initializers.ones, (4, 4))
        x = nn.Dense(4, name="hidden")(x @ w)
        return nn.Einsum((4, 3), "btd,dc->btc", name="head")(x)

    tokens = jnp.zeros((2, 5), jnp.int32)
    q = interception.quantize_model(WithEmbed(), tokens)
    rows = {r.path: (r.kind, r.role, r.quantized) for r in q.layers}
    self.assertEqual(rows, {
        "embed": ("embed", "stem", False),
        "up": ("conv_transpose", "", False),
        "hidden": ("dense", "", True),
        "head": ("einsum", "classifier", False),
        "": ("other", "", False),
    })
    self.assertEqual(q.layers[1].reason, "conv_transpose: not quantizable "
                     "(stays FP)")


if __name__ == "__main__":
  absltest.main()
