"""Tests for train/vit.py: layout, parameter count, the block, modes."""

from __future__ import annotations

import functools
import os

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np

from configs import base
from gdnsq_jax import interception
from tests import model_setup
from tests import tiny_setup
from train import train_lib
from train import vit

# ViT for digits, 10 classes, counted by hand (hidden 64, MLP 128).
#   patch embedding 7*7*1*64 + 64                            =  3,200
#   position embedding 16 tokens * 64                        =  1,024
#   per block: 2 LayerNorms 2*128; query/key/value 3*(64*64 + 64);
#     out 64*64 + 64; MLP 64*128+128 + 128*64+64
#     = 256 + 12,480 + 4,160 + 8,320 + 8,256                 = 33,472
#   2 blocks                                                 = 66,944
#   encoder norm 128; classifier 64*10 + 10                  =    778
#   total                                                    = 71,946
PARAMS = 71_946
ATTENTION = ("query", "key", "value", "out")

# One narrow block on 8x8 images: the same code paths, less to compile.
SMALL = vit.ViT(patch_size=4, hidden_size=8, num_layers=1, num_heads=2,
                mlp_dim=16)
INIT_KEY = jax.random.key(0, impl="rbg")
SMALL_BATCH = jax.random.normal(jax.random.key(1), (3, 8, 8, 1))


@functools.cache
def _small_variables():
  return jax.jit(SMALL.init)(INIT_KEY, SMALL_BATCH)


class LayoutTest(parameterized.TestCase):

  def test_parameter_count(self):
    variables = model_setup.abstract_variables(vit.ViT())
    self.assertSetEqual(set(variables), {"params"})  # no batch_stats
    self.assertEqual(model_setup.param_count(variables["params"]), PARAMS)
    # A cls token adds one token's embedding and its position: 2 * 64.
    cls = model_setup.abstract_variables(vit.ViT(pool="cls"))["params"]
    self.assertEqual(model_setup.param_count(cls), PARAMS + 128)
    self.assertEqual(cls["position_embedding"].shape, (1, 17, 64))

  def test_module_names_and_kernel_shapes(self):
    params = model_setup.abstract_variables(vit.ViT())["params"]
    self.assertSameElements(
        params, ["patch_embedding", "position_embedding", "encoder_block1",
                 "encoder_block2", "encoder_norm", "classifier"])
    self.assertEqual(params["patch_embedding"]["kernel"].shape, (7, 7, 1, 64))
    self.assertEqual(params["position_embedding"].shape, (1, 16, 64))
    for block in ("encoder_block1", "encoder_block2"):
      p = params[block]
      self.assertSetEqual(set(p), {"attention_norm", "attention", "mlp_norm",
                                   "mlp_dense1", "mlp_dense2"})
      self.assertSetEqual(set(p["attention"]), set(ATTENTION))
      for name in ("query", "key", "value"):  # DenseGeneral, 4 heads of 16
        self.assertEqual(p["attention"][name]["kernel"].shape, (64, 4, 16))
      self.assertEqual(p["attention"]["out"]["kernel"].shape, (4, 16, 64))
      self.assertEqual(p["mlp_dense1"]["kernel"].shape, (64, 128))
      self.assertEqual(p["mlp_dense2"]["kernel"].shape, (128, 64))
    self.assertEqual(params["classifier"]["kernel"].shape, (64, 10))

  @parameterized.named_parameters(("patch4", 4, 49), ("patch7", 7, 16))
  def test_tokens(self, patch_size, tokens):
    model = vit.ViT(patch_size=patch_size)
    params = model_setup.abstract_variables(model)["params"]
    self.assertEqual(params["position_embedding"].shape, (1, tokens, 64))

  def test_output_shape_and_dtypes(self):
    model = vit.ViT(num_classes=7, dtype=jnp.bfloat16)
    variables = model_setup.abstract_variables(model, (2, 28, 28, 1))
    for leaf in jax.tree.leaves(variables):
      self.assertEqual(leaf.dtype, jnp.float32)
    logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=True),
                            variables, jnp.zeros((2, 28, 28, 1)))
    self.assertEqual((logits.shape, logits.dtype), ((2, 7), jnp.float32))

  def test_init_statistics(self):
    params = jax.jit(vit.ViT().init)(INIT_KEY, jnp.zeros((1, 28, 28, 1)))[
        "params"]
    # LeCun normal (truncated), fan_in 7*7 = 49: std 1/7 from 3136 draws.
    self.assertAlmostEqual(float(jnp.std(params["patch_embedding"]["kernel"])),
                           1 / 7, delta=0.01)
    self.assertAlmostEqual(float(jnp.std(params["position_embedding"])),
                           0.02, delta=0.002)
    # Xavier uniform: |w| <= sqrt(6 / (fan_in + fan_out)).
    dense1 = params["encoder_block1"]["mlp_dense1"]["kernel"]
    self.assertLessEqual(float(jnp.max(jnp.abs(dense1))),
                         np.sqrt(6 / (64 + 128)))
    self.assertLessEqual(float(jnp.max(jnp.abs(
        params["classifier"]["kernel"]))), 1 / np.sqrt(64))

  def test_inconsistent_config_raises(self):
    x = jnp.zeros((1, 28, 28, 1))
    with self.assertRaisesRegex(ValueError, "patch_size 5 must divide.*28x28"):
      vit.ViT(patch_size=5).init(jax.random.key(0), x)
    with self.assertRaisesRegex(ValueError, "multiple of num_heads 3"):
      vit.ViT(num_heads=3).init(jax.random.key(0), x)
    with self.assertRaisesRegex(ValueError, "unknown pool 'max'.*mean, cls"):
      vit.ViT(pool="max").init(jax.random.key(0), x)
    with self.assertRaisesRegex(ValueError, "NHWC"):
      vit.ViT().init(jax.random.key(0), jnp.zeros((28, 28, 1)))


class ComputationTest(chex.TestCase):

  def test_block_is_pre_layer_norm(self):
    variables = _small_variables()
    _, state = SMALL.apply(variables, SMALL_BATCH, mutable=["intermediates"],
                           capture_intermediates=True)
    acts = state["intermediates"]["encoder_block1"]
    params = variables["params"]["encoder_block1"]
    patches = state["intermediates"]["patch_embedding"]["__call__"][0]
    tokens = (patches.reshape(3, 4, 8)
              + variables["params"]["position_embedding"])

    def layer_norm(x, p):
      mean = jnp.mean(x, -1, keepdims=True)
      var = jnp.var(x, -1, keepdims=True)
      return (x - mean) / jnp.sqrt(var + 1e-6) * p["scale"] + p["bias"]

    # Attention by hand: 2 heads of 4, softmax(q k^T / 2) v, then out.
    a = params["attention"]
    y = layer_norm(tokens, params["attention_norm"])
    q, k, v = (jnp.einsum("btc,chd->bthd", y, a[n]["kernel"]) + a[n]["bias"]
               for n in ("query", "key", "value"))
    weights = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / 2.0)
    attended = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    x = tokens + (jnp.einsum("bthd,hdc->btc", attended, a["out"]["kernel"])
                  + a["out"]["bias"])
    y = layer_norm(x, params["mlp_norm"])
    y = nn_gelu(y @ params["mlp_dense1"]["kernel"]
                + params["mlp_dense1"]["bias"])
    want = x + y @ params["mlp_dense2"]["kernel"] + params["mlp_dense2"]["bias"]
    chex.assert_trees_all_close(acts["__call__"][0], want, atol=1e-5,
                                rtol=1e-5)

  def test_train_and_eval_agree(self):
    variables = _small_variables()
    chex.assert_trees_all_equal(
        SMALL.apply(variables, SMALL_BATCH, train=True),
        SMALL.apply(variables, SMALL_BATCH, train=False))

  @chex.variants(with_jit=True, without_jit=True)
  def test_jit_matches_eager_and_gradients_are_finite(self):
    variables = _small_variables()
    labels = jnp.arange(3)

    def loss(params):
      logits = SMALL.apply({"params": params}, SMALL_BATCH, train=True)
      return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(3), labels])

    value, grads = self.variant(jax.value_and_grad(loss))(variables["params"])
    chex.assert_trees_all_close(value, loss(variables["params"]), atol=1e-5,
                                rtol=1e-5)
    model_setup.assert_gradients_finite_and_nonzero(self, grads)


def nn_gelu(x):
  """Flax's default GELU (tanh approximation)."""
  return 0.5 * x * (1 + jnp.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


class ProgramTest(absltest.TestCase):

  def test_preset_builds_it_with_stem_and_classifier_fp(self):
    config = base.get_config("digits_vit", weight_bits=4, activation_bits=4)
    self.assertEqual(config.model.name, "vit")
    model = train_lib.build_model(config, 10)
    self.assertIsInstance(model, vit.ViT)
    qmodel = interception.quantize_model(
        model, jax.ShapeDtypeStruct((1, 28, 28, 1), jnp.float32),
        settings=train_lib.quant_settings(config),
        rules=train_lib.quant_rules(config), train=False)
    paths = set(qmodel.quantized_paths)
    for block in ("encoder_block1", "encoder_block2"):
      self.assertContainsSubset({f"{block}/mlp_dense1", f"{block}/mlp_dense2"},
                                paths)
    self.assertNoCommonElements({"patch_embedding", "classifier"}, paths)

  def test_teacher_restores_and_quantizes(self):
    # The program end to end on tiny data: a teacher without batch_stats is
    # saved, restored from config.teacher.checkpoint, and fine-tuned.
    tmp = self.create_tempdir().full_path
    config = tiny_setup.tiny_config(tmp, weight_bits=4, activation_bits=4,
                                    num_steps=2)
    config.model.name = "vit"
    config.model.stage_widths, config.model.stem_width = (), 0
    config.model.patch_size = 4  # the 12x12 images
    config.teacher.num_steps = 4
    config.mode = "fp"
    fp = train_lib.train_and_evaluate(config, os.path.join(tmp, "fp"))
    config.mode = "quantize"
    config.teacher.checkpoint = os.path.join(tmp, "fp", "teacher",
                                             "variables")
    results = train_lib.train_and_evaluate(config, os.path.join(tmp, "q"))
    self.assertEqual(results["fp_test_accuracy"], fp["fp_test_accuracy"])
    self.assertEqual(results["steps"], 2)
    self.assertIn("encoder_block1/mlp_dense1", results["quantized_layers"])

  def test_resnet_keys_are_refused(self):
    config = base.get_config("digits_vit")
    config.model.stage_widths = (16, 32)
    with self.assertRaisesRegex(
        ValueError, "config.model.stage_widths does not apply to model 'vit'"):
      train_lib.build_model(config, 10)


if __name__ == "__main__":
  absltest.main()
