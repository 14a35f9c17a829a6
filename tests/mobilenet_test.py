"""Tests for train/mobilenet.py: layout, parameter count, residuals, modes."""

from __future__ import annotations

import functools

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np

from configs import base
from gdnsq_jax import interception
from tests import model_setup
from train import mobilenet
from train import train_lib

# MobileNetV2 for digits, 10 classes, counted by hand. A 1x1 conv c -> d has
# c*d weights, a depthwise 3x3 conv on c channels 9*c, a BN 2*c scale/bias.
#   stem 9*1*16 + 32                                           =    176
#   block1 (t=1, 16->16): 9*16+32 + 16*16+32                   =    464
#   block2 (16->24, hidden 64): 16*64+128 + 9*64+128 + 64*24+48 =  3,440
#   block3 (24->24, hidden 96): 24*96+192 + 9*96+192 + 96*24+48 =  5,904
#   block4 (24->32, hidden 96): 24*96+192 + 9*96+192 + 96*32+64 =  6,688
#   block5 (32->32, hidden 128): 32*128+256 + 9*128+256 + 128*32+64 = 9,920
#   block6 (32->64, hidden 128): 32*128+256 + 9*128+256 + 128*64+128 = 14,080
#   head 64*128 + 256                                          =  8,448
#   classifier 128*10 + 10                                     =  1,290
#   total                                                      = 50,410
PARAMS = 50_410
BLOCKS = [f"block{k}" for k in range(1, 7)]
# (channels in, hidden, channels out, stride) of each block.
BLOCK_SHAPES = [(16, 16, 16, 1), (16, 64, 24, 2), (24, 96, 24, 1),
                (24, 96, 32, 2), (32, 128, 32, 1), (32, 128, 64, 1)]
# Blocks with an identity residual: stride 1 and channels unchanged.
RESIDUAL = ("block1", "block3", "block5")

# Narrow, short and on small images: the same code paths, less to compile.
SMALL = mobilenet.MobileNetV2(stage_widths=(4, 8), blocks_per_stage=(1, 2),
                              stage_strides=(1, 2), expansions=(1, 2),
                              stem_width=4, stem_strides=1, head_width=8)
INIT_KEY = jax.random.key(0, impl="rbg")
SMALL_BATCH = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))


@functools.cache
def _small_variables():
  return jax.jit(SMALL.init)(INIT_KEY, SMALL_BATCH)


class LayoutTest(parameterized.TestCase):

  def test_parameter_count(self):
    params = model_setup.abstract_variables(mobilenet.MobileNetV2())["params"]
    self.assertEqual(model_setup.param_count(params), PARAMS)

  def test_module_names_and_kernel_shapes(self):
    params = model_setup.abstract_variables(mobilenet.MobileNetV2())["params"]
    self.assertSameElements(
        params, ["stem_conv", "stem_bn", *BLOCKS, "head_conv", "head_bn",
                 "classifier"])
    self.assertEqual(params["stem_conv"]["kernel"].shape, (3, 3, 1, 16))
    for block, (c_in, hidden, c_out, _) in zip(BLOCKS, BLOCK_SHAPES):
      p = params[block]
      want = {"depthwise", "depthwise_bn", "project", "project_bn"}
      if block != "block1":  # expansion 1: no expand conv
        want |= {"expand", "expand_bn"}
        self.assertEqual(p["expand"]["kernel"].shape, (1, 1, c_in, hidden))
      self.assertSetEqual(set(p), want, msg=block)
      # Depthwise: one input channel per group, HWIO (3, 3, 1, C).
      self.assertEqual(p["depthwise"]["kernel"].shape, (3, 3, 1, hidden))
      self.assertEqual(p["project"]["kernel"].shape, (1, 1, hidden, c_out))
      for conv in ("depthwise", "project"):
        self.assertNotIn("bias", p[conv])
    self.assertEqual(params["head_conv"]["kernel"].shape, (1, 1, 64, 128))
    self.assertEqual(params["classifier"]["kernel"].shape, (128, 10))

  def test_feature_sizes(self):
    model = mobilenet.MobileNetV2()
    shape = (1, 28, 28, 1)
    _, state = jax.eval_shape(
        lambda v, x: model.apply(v, x, mutable=["intermediates"],
                                 capture_intermediates=True),
        model_setup.abstract_variables(model), jnp.zeros(shape))
    acts = state["intermediates"]
    self.assertEqual(acts["stem_conv"]["__call__"][0].shape, (1, 14, 14, 16))
    sizes = [14, 7, 7, 4, 4, 4]
    for block, size, (_, _, c_out, _) in zip(BLOCKS, sizes, BLOCK_SHAPES):
      self.assertEqual(acts[block]["__call__"][0].shape,
                       (1, size, size, c_out), msg=block)

  def test_output_shape_and_dtypes(self):
    model = mobilenet.MobileNetV2(num_classes=7, dtype=jnp.bfloat16)
    variables = model_setup.abstract_variables(model, (2, 28, 28, 1))
    for leaf in jax.tree.leaves(variables):
      self.assertEqual(leaf.dtype, jnp.float32)
    logits, updates = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]),
        variables, jnp.zeros((2, 28, 28, 1)))
    self.assertEqual((logits.shape, logits.dtype), ((2, 7), jnp.float32))
    for leaf in jax.tree.leaves(updates):
      self.assertEqual(leaf.dtype, jnp.float32)

  def test_init_statistics(self):
    params = jax.jit(mobilenet.MobileNetV2().init)(
        INIT_KEY, jnp.zeros((1, 28, 28, 1)))["params"]
    # He normal, fan_out: the depthwise kernel (3, 3, 1, 128) has fan_out
    # 9 * 128, std sqrt(2 / 1152) = 0.042 from 1152 draws (s.e. ~0.001).
    kernel = params["block6"]["depthwise"]["kernel"]
    self.assertAlmostEqual(float(jnp.std(kernel)), np.sqrt(2 / 1152),
                           delta=0.004)
    kernel = params["block6"]["project"]["kernel"]  # fan_out 64
    self.assertAlmostEqual(float(jnp.std(kernel)), np.sqrt(2 / 64),
                           delta=0.01)
    chex.assert_trees_all_close(params["block6"]["project_bn"]["scale"],
                                jnp.ones(64))
    # PyTorch Linear default: |w| <= 1/sqrt(fan_in); bias 0.
    self.assertLessEqual(float(jnp.max(jnp.abs(
        params["classifier"]["kernel"]))), 1 / np.sqrt(128))
    chex.assert_trees_all_close(params["classifier"]["bias"], jnp.zeros(10))

  def test_inconsistent_config_raises(self):
    model = mobilenet.MobileNetV2(stage_widths=(16, 24))
    with self.assertRaisesRegex(ValueError, "same length"):
      model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    model = mobilenet.MobileNetV2(expansions=(1, 0, 4, 4))
    with self.assertRaisesRegex(ValueError, r"expansion >= 1.*\(1, 0, 4, 4\)"):
      model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    with self.assertRaisesRegex(ValueError, "NHWC"):
      SMALL.init(jax.random.key(0), jnp.zeros((8, 8, 1)))


class ComputationTest(chex.TestCase):

  def _intermediates(self, train):
    variables = _small_variables()
    _, state = SMALL.apply(
        variables, SMALL_BATCH, train=train,
        mutable=["intermediates", "batch_stats"], capture_intermediates=True)
    return variables, state["intermediates"]

  def test_depthwise_is_per_channel(self):
    variables, acts = self._intermediates(train=False)
    # block2's depthwise conv (stride 2) against one conv per channel.
    x = acts["block2"]["expand_bn"]["__call__"][0]
    x = jnp.clip(x, 0, 6)
    kernel = variables["params"]["block2"]["depthwise"]["kernel"]
    want = jnp.concatenate([
        jax.lax.conv_general_dilated(
            x[..., c:c + 1], kernel[..., c:c + 1], (2, 2),
            ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
        for c in range(kernel.shape[-1])], axis=-1)
    chex.assert_trees_all_close(
        acts["block2"]["depthwise"]["__call__"][0], want, atol=1e-5,
        rtol=1e-5)

  def test_residual_only_where_shapes_match(self):
    _, acts = self._intermediates(train=False)
    # SMALL: block1 4->4 stride 1 (identity residual), block2 4->8 stride 2
    # (none), block3 8->8 stride 1 (identity residual).
    stem = jnp.clip(acts["stem_bn"]["__call__"][0], 0, 6)
    inputs = {"block1": stem, "block2": acts["block1"]["__call__"][0],
              "block3": acts["block2"]["__call__"][0]}
    for block, residual in (("block1", True), ("block2", False),
                            ("block3", True)):
      out = acts[block]["__call__"][0]
      projected = acts[block]["project_bn"]["__call__"][0]
      want = projected + inputs[block] if residual else projected
      chex.assert_trees_all_close(out, want, atol=1e-6, rtol=1e-6)

  def test_train_updates_batch_stats_and_eval_keeps_them(self):
    variables = _small_variables()
    train_out, updates = SMALL.apply(variables, SMALL_BATCH, train=True,
                                     mutable=["batch_stats"])
    self.assertFalse(np.allclose(
        updates["batch_stats"]["block2"]["depthwise_bn"]["var"],
        variables["batch_stats"]["block2"]["depthwise_bn"]["var"]))
    eval_out, kept = SMALL.apply(variables, SMALL_BATCH, train=False,
                                 mutable=["batch_stats"])
    chex.assert_trees_all_equal(kept["batch_stats"],
                                variables["batch_stats"])
    self.assertFalse(np.allclose(train_out, eval_out, atol=1e-3))

  @chex.variants(with_jit=True, without_jit=True)
  def test_jit_matches_eager_and_gradients_are_finite(self):
    variables = _small_variables()
    labels = jnp.arange(4) % 10

    def loss(params):
      logits, _ = SMALL.apply(
          {"params": params, "batch_stats": variables["batch_stats"]},
          SMALL_BATCH, train=True, mutable=["batch_stats"])
      return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), labels])

    value, grads = self.variant(jax.value_and_grad(loss))(variables["params"])
    want = loss(variables["params"])
    chex.assert_trees_all_close(value, want, atol=1e-5, rtol=1e-5)
    model_setup.assert_gradients_finite_and_nonzero(self, grads)


class DepthwiseOpTest(chex.TestCase):
  """The shifted-window depthwise path equals lax's grouped conv."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ("stride1", (1, 1), ((1, 1), (1, 1))),
      ("stride2", (2, 2), ((1, 1), (1, 1))),
      ("same_stride2", (2, 2), "SAME"),
      ("asymmetric", (2, 1), ((0, 1), (2, 0))),
  )
  def test_matches_lax_with_gradients(self, strides, padding):
    x = jax.random.normal(jax.random.key(0), (2, 7, 6, 5))
    w = jax.random.normal(jax.random.key(1), (3, 3, 1, 5))
    numbers = ("NHWC", "HWIO", "NHWC")

    def loss(op, x, w):
      y = op(x, w, strides, padding, dimension_numbers=numbers,
             feature_group_count=5)
      return jnp.sum(jnp.sin(y)), y

    want_grads, (_, want) = jax.grad(
        functools.partial(loss, jax.lax.conv_general_dilated),
        argnums=(0, 1), has_aux=True)(x, w)
    got_grads, (_, got) = self.variant(jax.grad(
        functools.partial(loss, mobilenet.conv_general_dilated),
        argnums=(0, 1), has_aux=True))(x, w)
    self.assertEqual(got.shape, want.shape)
    chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(got_grads, want_grads, atol=1e-4, rtol=1e-4)

  def test_other_convs_pass_through(self):
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 4))
    numbers = ("NHWC", "HWIO", "NHWC")
    for w, groups in ((jnp.ones((3, 3, 2, 4)), 2),    # grouped
                      (jnp.ones((3, 3, 4, 8)), 1),    # plain
                      (jnp.ones((3, 3, 1, 8)), 4)):   # channel multiplier 2
      got = mobilenet.conv_general_dilated(
          x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=numbers,
          feature_group_count=groups)
      want = jax.lax.conv_general_dilated(
          x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=numbers,
          feature_group_count=groups)
      chex.assert_trees_all_close(got, want, atol=1e-4, rtol=1e-5)

  def test_bfloat16_keeps_dtype(self):
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 4), jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), (3, 3, 1, 4), jnp.bfloat16)
    got = mobilenet.conv_general_dilated(
        x, w, (1, 1), ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=4)
    self.assertEqual(got.dtype, jnp.bfloat16)


class ProgramTest(absltest.TestCase):

  def test_preset_builds_it_and_quantizes_every_hidden_conv(self):
    config = base.get_config("digits_mobilenet_v2", weight_bits=2,
                             activation_bits=2)
    self.assertEqual(config.model.name, "mobilenet_v2")
    model = train_lib.build_model(config, 10)
    self.assertIsInstance(model, mobilenet.MobileNetV2)
    qmodel = interception.quantize_model(
        model, jax.ShapeDtypeStruct((1, 28, 28, 1), jnp.float32),
        settings=train_lib.quant_settings(config),
        rules=train_lib.quant_rules(config), train=False)
    # Every depthwise and pointwise conv; the stem and classifier stay FP.
    want = {f"{b}/{c}" for b in BLOCKS for c in ("depthwise", "project")}
    want |= {f"{b}/expand" for b in BLOCKS[1:]} | {"head_conv"}
    self.assertSetEqual(set(qmodel.quantized_paths), want)
    self.assertLen(want, 18)

  def test_config_keys_reach_the_model(self):
    config = base.get_config("digits_mobilenet_v2")
    config.model.stage_widths = (8, 16, 16, 32)
    config.model.stem_width = 8
    config.model.dtype = "bfloat16"
    model = train_lib.build_model(config, 10)
    self.assertEqual((tuple(model.stage_widths), model.stem_width,
                      model.dtype), ((8, 16, 16, 32), 8, jnp.bfloat16))

  def test_unknown_model_name_lists_all(self):
    config = base.get_config()
    config.model.name = "mobilenet_v3"
    with self.assertRaisesRegex(
        ValueError, "unknown config.model.name 'mobilenet_v3'.*"
        "digits_resnet, mobilenet_v2, resnet18, resnet20, vit"):
      train_lib.build_model(config, 10)


if __name__ == "__main__":
  absltest.main()
