"""Tests for gdnsq_jax.layers and gdnsq_jax.interception."""

from __future__ import annotations

from absl.testing import absltest
from absl.testing import parameterized
import chex
import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from gdnsq_jax import activation_quantizer
from gdnsq_jax import interception
from gdnsq_jax import layers
from gdnsq_jax import quantizers
from train import models

_DN = ("NHWC", "HWIO", "NHWC")


class PlainCNN(nn.Module):
  """A plain Flax CNN: nothing of gdnsq_jax in its definition."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(4, (3, 3), name="stem")(x)
    x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
    x = nn.relu(x)
    x = nn.Conv(6, (3, 3), strides=2, padding=((1, 1), (1, 1)), name="body")(x)
    x = nn.relu(x)
    x = nn.Conv(6, (1, 1), name="proj")(x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.relu(nn.Dense(5, name="hidden")(x))
    return nn.Dense(3, name="head")(x)


class ExplicitCNN(nn.Module):
  """PlainCNN with QuantConv / QuantDense written where the rules put them."""

  settings: layers.QuantSettings = layers.QuantSettings()

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(4, (3, 3), name="stem")(x)
    x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
    x = nn.relu(x)
    x = layers.QuantConv(
        6, (3, 3), strides=2, padding=((1, 1), (1, 1)),
        settings=self.settings, name="body",
    )(x)
    x = nn.relu(x)
    x = nn.Conv(6, (1, 1), name="proj")(x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.relu(layers.QuantDense(5, settings=self.settings, name="hidden")(x))
    return nn.Dense(3, name="head")(x)


_COARSE_ACT = {"log2_step": -2.0, "log2_range": 1.0, "clamp_low": -0.25}


def _coarse(params):
  """Sets every conv / dense quantizer to a coarse grid (rounding visible).

  Weights: step 2^-3. Input quantizers: step 1/4, grid width 2, clamp low
  -1/4, i.e. 8 levels on [-0.25, 1.5].
  """
  def set_leaf(path, v):
    names = [str(getattr(k, "key", k)) for k in path]
    if names[-1] == "log2_step":
      return jnp.full_like(v, -2.0 if "input_quantizer" in names else -3.0)
    if names[-1] == "log2_range":
      return jnp.full_like(v, 1.0)
    if names[-1] == "clamp_low":
      return jnp.full_like(v, -0.25)
    return v
  return jax.tree_util.tree_map_with_path(set_leaf, params)


def _x(shape, seed=0):
  """Standard normal float32 data (numpy: no per-shape XLA compile)."""
  return jnp.asarray(
      np.random.default_rng(seed).normal(size=shape), jnp.float32
  )


def _variables(init_fn, *args, seed=0, **kwargs):
  """Variables with ``init_fn``'s tree, filled without running it.

  Weights are N(0, 0.5^2), BatchNorm statistics (0, 1) and quantizers get the
  coarse grid of :func:`_coarse`; only the shapes come from ``init_fn``.
  """
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(init_fn, jax.random.key(0), *args, **kwargs)

  def fill(path, s):
    name = str(getattr(path[-1], "key", path[-1]))
    if name == "var":
      return jnp.ones(s.shape, s.dtype)
    if name == "mean":
      return jnp.zeros(s.shape, s.dtype)
    return jnp.asarray(0.5 * rng.normal(size=s.shape), s.dtype)

  variables = jax.tree_util.tree_map_with_path(fill, shapes)
  return dict(variables, params=_coarse(variables["params"]))


class QuantLayerTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_quant_act_equals_functional_and_lies_on_grid(self):
    act = layers.QuantAct()
    x = 2.0 * _x((3, 7))
    params = dict(_COARSE_ACT)
    y = self.variant(lambda p, x: act.apply({"params": p}, x))(params, x)
    expected = activation_quantizer.quantize_activation(x, -2.0, 1.0, -0.25)
    chex.assert_trees_all_close(y, expected, atol=1e-6)
    codes = (np.asarray(y) + 0.25) / 0.25
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-5)
    self.assertBetween(float(codes.min()), 0.0, 7.0)
    self.assertBetween(float(codes.max()), 0.0, 7.0)

  def test_param_names_and_init_values(self):
    conv = layers.QuantConv(5, (3, 3))
    v = conv.init(jax.random.key(0), _x((1, 6, 6, 2)))
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
    ).init(jax.random.key(0), _x((2, 4)))
    self.assertEqual(per_tensor["params"]["log2_step"].shape, ())

  @chex.variants(with_jit=True, without_jit=True)
  def test_quant_conv_equals_conv_of_quantized_operands(self):
    conv = layers.QuantConv(5, (3, 3), strides=2, padding=((1, 1), (1, 1)))
    x = _x((2, 7, 7, 3))
    params = _variables(conv.init, x)["params"]
    params["bias"] = _x((5,), 2)
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
    x = _x((3, 6))
    params = _variables(dense.init, x)["params"]
    y = self.variant(lambda p, x: dense.apply({"params": p}, x))(params, x)
    qx = activation_quantizer.quantize_activation(x, -2.0, 1.0, -0.25)
    qk = quantizers.quantize_weight(params["kernel"], jnp.full((4,), -3.0))
    chex.assert_trees_all_close(y, qx @ qk + params["bias"], atol=1e-5)

  def test_a32_has_no_activation_quantizer(self):
    settings = layers.QuantSettings(activation_bits=32)
    conv = layers.QuantConv(4, (3, 3), settings=settings)
    x = _x((1, 5, 5, 2))
    params = _variables(conv.init, x)["params"]
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
    x = _x((1, 5, 5, 2))
    params = _variables(conv.init, x)["params"]
    off = layers.QuantConv(4, (3, 3), settings=layers.QuantSettings(
        enabled=False))
    fp = nn.Conv(4, (3, 3)).apply(
        {"params": {"kernel": params["kernel"], "bias": params["bias"]}}, x
    )
    chex.assert_trees_all_close(off.apply({"params": params}, x), fp)

  def test_frozen_clamp_low_gets_no_gradient(self):
    act = layers.QuantAct(layers.QuantSettings(learnable_clamp_low=False))
    x = 3.0 * _x((4, 5))  # values below the low clamp and above the top
    params = dict(_COARSE_ACT)
    g = jax.grad(lambda p: act.apply({"params": p}, x).sum())(params)
    self.assertEqual(float(g["clamp_low"]), 0.0)
    self.assertNotEqual(float(g["log2_range"]), 0.0)

  def test_stats_are_sown_only_into_a_mutable_collection(self):
    act = layers.QuantAct()
    x = _x((4, 5))
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


class InterceptionTest(chex.TestCase):

  def setUp(self):
    super().setUp()
    self.x = _x((2, 8, 8, 3))
    self.qmodel = interception.quantize_model(PlainCNN(), self.x)

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
    v = _variables(self.qmodel.init, self.x)
    explicit = ExplicitCNN()
    chex.assert_trees_all_equal_shapes(
        v, jax.eval_shape(explicit.init, jax.random.key(0), self.x)
    )
    got = self.variant(self.qmodel.apply)(v, self.x)
    want = jax.jit(explicit.apply)(v, self.x)
    chex.assert_trees_all_close(got, want, atol=1e-6)
    fp = jax.jit(PlainCNN().apply)(v, self.x)
    self.assertGreater(float(jnp.abs(got - fp).max()), 1e-3)

  def test_model_kwargs_and_mutable_collections_pass_through(self):
    v = _variables(self.qmodel.init, self.x)
    _, state = self.qmodel.apply(v, self.x, train=True, mutable=["batch_stats"])
    self.assertFalse(
        np.allclose(state["batch_stats"]["bn"]["mean"],
                    v["batch_stats"]["bn"]["mean"])
    )

  def test_rule_dicts_regexes_and_unknown_keys(self):
    with self.assertRaisesRegex(
        ValueError, "unknown quantization rule key 'foo'; valid keys: include"
    ):
      interception.quantize_model(PlainCNN(), self.x, rules={"foo": 1})
    q = interception.quantize_model(
        PlainCNN(), self.x,
        rules={"quantize_stem": True, "quantize_1x1": True,
               "quantize_classifier": True, "exclude": ["hid.*"]},
    )
    self.assertEqual(q.quantized_paths, {"stem", "body", "proj", "head"})
    q = interception.quantize_model(
        PlainCNN(), self.x, rules=interception.QuantizationRules(
            include=["b.*"]))
    self.assertEqual(q.quantized_paths, {"body"})

  def test_jitted_forward_backward_traces_once(self):
    v = _variables(self.qmodel.init, self.x)

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
    v = _variables(self.qmodel.init, self.x)

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

    q = interception.quantize_model(TwoModes(), _x((2, 4)))
    with self.assertRaisesRegex(ValueError, "layer 'b' was not called"):
      jax.eval_shape(lambda x: q.init(jax.random.key(0), x, train=True),
                     _x((2, 4)))
    q = interception.quantize_model(TwoModes(), _x((2, 4)), train=True)
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
    x = _x((2, 8, 8, 3))
    q = interception.quantize_model(model, x)
    fp = _variables(model.init, x)
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
    v = dict(v, params=_coarse(v["params"]))

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
    x = _x((2, 8, 8, 3))
    q = interception.quantize_model(PlainCNN(), x)
    quantized = jax.eval_shape(q.init, jax.random.key(0), x)
    fp = _variables(PlainCNN().init, x)
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
