"""Tests for train/models.py: layouts, parameter counts, BatchNorm, dtypes."""

from __future__ import annotations

import collections
import functools
import time

from absl.testing import absltest
from absl.testing import parameterized
import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np

from tests import model_setup
from train import models

# ResNet-20 (pytorchcv resnet20_cifar10), 10 classes, counted by hand.
# A 3x3 conv c_in -> c_out has 9*c_in*c_out weights; a BN has 2*c scale/bias.
#   stem: 9*3*16 + 2*16                                     =     464
#   stage1, 3 blocks: 3 * 2*(9*16*16 + 32)                  =  14,016
#   stage2 block1: 9*16*32+64 + 9*32*32+64 + 16*32+64       =  14,528
#   stage2 blocks 2-3: 2 * 2*(9*32*32 + 64)                 =  37,120
#   stage3 block1: 9*32*64+128 + 9*64*64+128 + 32*64+128    =  57,728
#   stage3 blocks 2-3: 2 * 2*(9*64*64 + 128)                = 147,968
#   classifier: 64*10 + 10                                  =     650
#   total                                                   = 272,474
RESNET20_PARAMS = 272_474
# torchvision resnet18 (1000 classes), as reported by torchvision.
RESNET18_PARAMS = 11_689_512
# DigitsResNet, 10 classes, 1 channel:
#   stem 9*1*16 + 32 = 176; stage1 2*(9*16*16 + 32) = 4,672;
#   stage2 14,528 and stage3 57,728 (as ResNet-20's first blocks); fc 650.
DIGITS_PARAMS = 77_754

# Two narrow stages (stride 1, then 2 with a projection): same code paths as
# the full models, fewer ops to compile.
SMALL_DIGITS = models.DigitsResNet(
    stage_widths=(4, 8), blocks_per_stage=(1, 1), stem_width=4
)
# Compiling threefry sampling for every kernel shape dominates init time on a
# CPU (~7 s for SMALL_DIGITS); the RBG generator compiles ~5x faster. The tests
# share one batch and one initialisation of SMALL_DIGITS.
INIT_KEY = jax.random.key(0, impl="rbg")
SMALL_BATCH = jax.random.normal(jax.random.key(1), (8, 8, 8, 1))


@functools.cache
def _small_variables():
  return jax.jit(SMALL_DIGITS.init)(INIT_KEY, SMALL_BATCH)


def _conv_kernel_shapes(params) -> collections.Counter:
  """Counts conv kernels by (kh, kw) from the flattened params tree."""
  flat = flax.traverse_util.flatten_dict(params)
  return collections.Counter(
      v.shape[:2] for k, v in flat.items() if k[-1] == "kernel" and v.ndim == 4
  )


class LayoutTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("resnet20", "resnet20", 10, (1, 32, 32, 3), RESNET20_PARAMS),
      ("resnet18", "resnet18", 1000, (1, 224, 224, 3), RESNET18_PARAMS),
      ("digits", "digits_resnet", 10, (1, 28, 28, 1), DIGITS_PARAMS),
  )
  def test_parameter_count(self, name, num_classes, shape, expected):
    variables = model_setup.abstract_variables(
        models.get_model(name, num_classes), shape)
    self.assertEqual(model_setup.param_count(variables["params"]), expected)

  @parameterized.named_parameters(
      # stem + 18 block convs (3x3) + 2 shortcut convs (1x1).
      ("resnet20", "resnet20", 10, (1, 32, 32, 3),
       {(3, 3): 1 + 18, (1, 1): 2}),
      # 7x7 stem + 16 block convs (3x3) + 3 shortcut convs (1x1).
      ("resnet18", "resnet18", 1000, (1, 224, 224, 3),
       {(7, 7): 1, (3, 3): 16, (1, 1): 3}),
      ("digits", "digits_resnet", 10, (1, 28, 28, 1),
       {(3, 3): 1 + 6, (1, 1): 2}),
  )
  def test_conv_count_by_kind(self, name, num_classes, shape, expected):
    variables = model_setup.abstract_variables(
        models.get_model(name, num_classes), shape)
    self.assertEqual(dict(_conv_kernel_shapes(variables["params"])), expected)

  def test_resnet20_module_names(self):
    params = model_setup.abstract_variables(
        models.ResNet20(), (1, 32, 32, 3))["params"]
    blocks = [f"stage{i}_block{j}" for i in (1, 2, 3) for j in (1, 2, 3)]
    self.assertSameElements(
        params, ["stem_conv", "stem_bn", "classifier"] + blocks
    )
    plain = {"conv1", "bn1", "conv2", "bn2"}
    projected = plain | {"shortcut_conv", "shortcut_bn"}
    for block in blocks:
      want = projected if block in ("stage2_block1", "stage3_block1") else plain
      self.assertSetEqual(set(params[block]), want, msg=block)
    # Conv kernels are HWIO (output channels last) with no bias.
    self.assertEqual(
        params["stage3_block1"]["shortcut_conv"]["kernel"].shape, (1, 1, 32, 64)
    )
    self.assertNotIn("bias", params["stage1_block1"]["conv1"])
    self.assertEqual(params["classifier"]["kernel"].shape, (64, 10))
    self.assertEqual(params["classifier"]["bias"].shape, (10,))

  @parameterized.named_parameters(
      ("resnet20", models.ResNet20(), (2, 32, 32, 3), (2, 10)),
      ("resnet18", models.ResNet18(), (2, 224, 224, 3), (2, 1000)),
      ("digits", models.DigitsResNet(), (2, 28, 28, 1), (2, 10)),
      ("resnet20_cifar100", models.ResNet20(num_classes=100),
       (2, 32, 32, 3), (2, 100)),
  )
  def test_output_shape(self, model, shape, expected):
    variables = model_setup.abstract_variables(model, shape)
    out = jax.eval_shape(
        lambda v, x: model.apply(v, x), variables, jnp.zeros(shape)
    )
    self.assertEqual(out.shape, expected)
    self.assertEqual(out.dtype, jnp.float32)

  def test_batch_stats_collection(self):
    variables = model_setup.abstract_variables(
        models.ResNet20(), (1, 32, 32, 3))
    stats = variables["batch_stats"]
    self.assertSetEqual(set(stats["stem_bn"]), {"mean", "var"})
    self.assertEqual(stats["stage3_block1"]["shortcut_bn"]["var"].shape, (64,))
    # One BN per conv: 21 BatchNorms of ResNet-20.
    n_bn = len(flax.traverse_util.flatten_dict(stats)) // 2
    self.assertEqual(n_bn, 21)

  def test_init_statistics(self):
    params = _small_variables()["params"]
    chex.assert_trees_all_close(params["stem_bn"]["scale"], jnp.ones(4))
    chex.assert_trees_all_close(params["stem_bn"]["bias"], jnp.zeros(4))
    # Kaiming normal, fan_out: std = sqrt(2 / (3 * 3 * 8)) = 0.167, estimated
    # from 3*3*8*8 = 576 draws (standard error ~0.005).
    kernel = params["stage2_block1"]["conv2"]["kernel"]
    self.assertEqual(kernel.shape, (3, 3, 8, 8))
    self.assertAlmostEqual(float(jnp.std(kernel)), np.sqrt(2 / 72),
                           delta=0.02)
    # PyTorch Linear default: |w| <= 1/sqrt(fan_in) = 1/sqrt(8); bias 0.
    dense = params["classifier"]
    self.assertLessEqual(float(jnp.max(jnp.abs(dense["kernel"]))),
                         1 / np.sqrt(8))
    self.assertGreater(float(jnp.std(dense["kernel"])), 0.1)
    chex.assert_trees_all_close(dense["bias"], jnp.zeros(10))

  def test_get_model_unknown_name(self):
    with self.assertRaisesRegex(
        ValueError,
        "unknown model 'resnet50'.*digits_resnet, resnet18, resnet20",
    ):
      models.get_model("resnet50", 10)

  def test_get_model_passes_attributes(self):
    model = models.get_model("resnet20", 100, axis_name="batch",
                             dtype=jnp.bfloat16)
    self.assertIsInstance(model, models.ResNet20)
    self.assertEqual((model.num_classes, model.axis_name, model.dtype),
                     (100, "batch", jnp.bfloat16))

  def test_inconsistent_config_raises(self):
    model = models.ResNet(num_classes=10, stage_widths=(16, 32),
                          blocks_per_stage=(1,), stem_width=16, stem="cifar")
    with self.assertRaisesRegex(ValueError, "same length"):
      model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    model = models.ResNet(num_classes=10, stage_widths=(16,),
                          blocks_per_stage=(1,), stem_width=16, stem="tiny")
    with self.assertRaisesRegex(ValueError, "unknown stem 'tiny'"):
      model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))


class BatchNormTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.model = SMALL_DIGITS
    cls.x = SMALL_BATCH
    cls.variables = _small_variables()

  def test_train_updates_batch_stats(self):
    _, updates = self.model.apply(
        self.variables, self.x, train=True,
        mutable=["batch_stats", "intermediates"],
        capture_intermediates=lambda mdl, _: mdl.name == "stem_conv",
    )
    old = self.variables["batch_stats"]["stem_bn"]
    new = updates["batch_stats"]["stem_bn"]
    conv = updates["intermediates"]["stem_conv"]["__call__"][0]
    # Running stats start at (0, 1); one step with momentum 0.9 gives
    # mean = 0.1 * batch_mean and var = 0.9 + 0.1 * batch_var (biased).
    chex.assert_trees_all_close(
        new["mean"], 0.1 * jnp.mean(conv, axis=(0, 1, 2)), atol=1e-6
    )
    chex.assert_trees_all_close(
        new["var"], 0.9 + 0.1 * jnp.var(conv, axis=(0, 1, 2)), atol=1e-5
    )
    self.assertFalse(np.allclose(new["var"], old["var"]))

  def test_eval_keeps_batch_stats(self):
    _, updates = self.model.apply(
        self.variables, self.x, train=False, mutable=["batch_stats"]
    )
    chex.assert_trees_all_equal(
        updates["batch_stats"], self.variables["batch_stats"]
    )

  def test_train_and_eval_differ(self):
    train_out, _ = self.model.apply(
        self.variables, self.x, train=True, mutable=["batch_stats"]
    )
    eval_out = self.model.apply(self.variables, self.x)
    self.assertFalse(np.allclose(train_out, eval_out, atol=1e-3))


class PaddingTest(parameterized.TestCase):
  """Convs pad k // 2 on every side, as PyTorch (not Flax's 'SAME')."""

  def test_strided_convs_match_symmetric_padding(self):
    variables = _small_variables()
    _, state = SMALL_DIGITS.apply(
        variables, SMALL_BATCH, mutable=["intermediates"],
        capture_intermediates=True,
    )
    acts = state["intermediates"]
    block_in = acts["stage1_block1"]["__call__"][0]
    block = variables["params"]["stage2_block1"]
    conv1 = jax.lax.conv_general_dilated(
        block_in, block["conv1"]["kernel"], window_strides=(2, 2),
        padding=((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    chex.assert_trees_all_close(
        acts["stage2_block1"]["conv1"]["__call__"][0], conv1,
        atol=1e-5, rtol=1e-5,
    )
    # 1x1 stride-2 projection: rows and columns 0, 2, 4, 6 times the kernel.
    shortcut = jnp.einsum(
        "nhwc,cd->nhwd", block_in[:, ::2, ::2],
        block["shortcut_conv"]["kernel"][0, 0],
    )
    chex.assert_trees_all_close(
        acts["stage2_block1"]["shortcut_conv"]["__call__"][0], shortcut,
        atol=1e-5, rtol=1e-5,
    )

  def test_resnet18_feature_sizes(self):
    model = models.ResNet18()
    shape = (1, 224, 224, 3)
    variables = model_setup.abstract_variables(model, shape)
    _, state = jax.eval_shape(
        lambda v, x: model.apply(
            v, x, mutable=["intermediates"], capture_intermediates=True
        ),
        variables, jnp.zeros(shape),
    )
    acts = state["intermediates"]
    self.assertEqual(acts["stem_conv"]["__call__"][0].shape, (1, 112, 112, 64))
    # After the 3x3/2 max pool: 56; then 56, 28, 14, 7.
    for stage, (size, width) in enumerate(
        [(56, 64), (28, 128), (14, 256), (7, 512)], start=1
    ):
      self.assertEqual(
          acts[f"stage{stage}_block2"]["__call__"][0].shape,
          (1, size, size, width),
      )


class SyncBatchNormTest(chex.TestCase):
  """With axis_name set, a split batch behaves as the full batch."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.local = SMALL_DIGITS
    cls.synced = SMALL_DIGITS.clone(axis_name="batch")
    cls.x = SMALL_BATCH
    cls.variables = _small_variables()
    cls.want = cls.local.apply(
        cls.variables, cls.x, train=True, mutable=["batch_stats"]
    )

  def _apply_synced(self, variables, x):
    return self.synced.apply(variables, x, train=True, mutable=["batch_stats"])

  @chex.variants(with_jit=True, without_jit=True)
  def test_vmap_matches_full_batch(self):
    split = jax.vmap(
        self._apply_synced, in_axes=(None, 0), out_axes=(0, 0),
        axis_name="batch",
    )
    logits, updates = self.variant(split)(
        self.variables, self.x.reshape(4, 2, 8, 8, 1)
    )
    want_logits, want_updates = self.want
    chex.assert_trees_all_close(logits.reshape(8, 10), want_logits,
                                atol=1e-5, rtol=1e-5)
    # Every replica holds the same, full-batch running statistics.
    for i in range(4):
      chex.assert_trees_all_close(
          jax.tree.map(lambda a, i=i: a[i], updates), want_updates,
          atol=1e-6, rtol=1e-5,
      )

  def test_shard_map_matches_full_batch(self):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("batch",))
    p = jax.sharding.PartitionSpec
    split = jax.shard_map(
        self._apply_synced, mesh=mesh, in_specs=(p(), p("batch")),
        out_specs=(p("batch"), p()),
    )
    logits, updates = jax.jit(split)(self.variables, self.x)
    want_logits, want_updates = self.want
    chex.assert_trees_all_close(logits, want_logits, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(updates, want_updates, atol=1e-6, rtol=1e-5)


class DtypeAndSpeedTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("digits", models.DigitsResNet, (2, 28, 28, 1)),
      ("resnet18", models.ResNet18, (2, 224, 224, 3)),
  )
  def test_bfloat16_compute(self, cls, shape):
    model = cls(dtype=jnp.bfloat16)
    variables = model_setup.abstract_variables(model, shape)
    for leaf in jax.tree.leaves(variables):
      self.assertEqual(leaf.dtype, jnp.float32)
    out = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]),
        variables, jnp.zeros(shape),
    )
    logits, updates = out
    self.assertEqual(logits.dtype, jnp.float32)
    for leaf in jax.tree.leaves(updates):
      self.assertEqual(leaf.dtype, jnp.float32)

  def test_bfloat16_close_to_float32(self):
    variables = _small_variables()
    want = SMALL_DIGITS.apply(variables, SMALL_BATCH)
    got = SMALL_DIGITS.clone(dtype=jnp.bfloat16).apply(variables, SMALL_BATCH)
    self.assertEqual(got.dtype, jnp.float32)
    chex.assert_trees_all_close(got, want, atol=0.1, rtol=0.05)

  def test_digits_forward_backward_is_fast(self):
    model = models.DigitsResNet()
    x = jax.random.normal(jax.random.key(1), (8, 28, 28, 1))
    labels = jnp.arange(8) % 10
    variables = jax.jit(model.init)(INIT_KEY, x)

    @jax.jit
    def grad_fn(params, batch_stats):
      def loss_fn(p):
        logits, updates = model.apply(
            {"params": p, "batch_stats": batch_stats}, x, train=True,
            mutable=["batch_stats"],
        )
        log_probs = jax.nn.log_softmax(logits)
        return -jnp.mean(log_probs[jnp.arange(8), labels]), updates
      return jax.grad(loss_fn, has_aux=True)(params)

    grads, _ = jax.block_until_ready(
        grad_fn(variables["params"], variables["batch_stats"]))
    start = time.perf_counter()
    grads, _ = jax.block_until_ready(
        grad_fn(variables["params"], variables["batch_stats"]))
    elapsed = time.perf_counter() - start
    # Typically ~10 ms on two cores; 2 s leaves room for a loaded machine.
    self.assertLess(elapsed, 2.0)
    model_setup.assert_gradients_finite_and_nonzero(self, grads)


if __name__ == "__main__":
  absltest.main()
