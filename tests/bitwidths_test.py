"""Tests for gdnsq_jax.bitwidths (docs/method.md §2.3, §14 items 3-5).

Expected values are hand-derived in numpy from docs/method.md.
"""

from __future__ import annotations

import math

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np

from gdnsq_jax import bitwidths
from gdnsq_jax import quantizers

LN2 = math.log(2.0)


def _kernel_with_codes(levels, log2_step, offsets, seed=0, rows=12):
  """Kernel (rows, out) whose channel c spans codes 0..levels[c] - 1 exactly.

  Channel c holds ``offsets[c] + s_c * k`` with integer k, both ends present.
  """
  rng = np.random.default_rng(seed)
  s = np.exp2(np.asarray(log2_step, np.float32))
  codes = np.stack([rng.integers(0, n, rows) for n in levels], axis=-1)
  codes[0], codes[1] = 0, np.asarray(levels) - 1
  return jnp.asarray(offsets + s * codes, jnp.float32)


class FormulaTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_weight_bitwidth_is_log2_range_over_step_plus_one(self):
    kernel = jax.random.normal(jax.random.key(0), (3, 3, 2, 4))
    log2_step = jnp.array([-12.0, -3.0, 0.0, 2.5])
    w = np.asarray(kernel, np.float64)
    r = w.max(axis=(0, 1, 2)) - w.min(axis=(0, 1, 2))
    got = self.variant(bitwidths.weight_bitwidth)(kernel, log2_step)
    chex.assert_trees_all_close(
        got, np.log2(r / np.exp2(np.asarray(log2_step)) + 1), rtol=1e-5)
    per_tensor = self.variant(bitwidths.weight_bitwidth)(kernel, -3.0)
    self.assertEqual(per_tensor.shape, ())
    chex.assert_trees_all_close(
        per_tensor, np.log2((w.max() - w.min()) * 8 + 1), rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_activation_bitwidth_is_log2_range_minus_log2_step(self):
    got = self.variant(bitwidths.activation_bitwidth)(-3.25, 4.5)
    chex.assert_trees_all_close(got, 7.75)

  @chex.variants(with_jit=True, without_jit=True)
  def test_calibrated_to_ten_bits(self):
    # Calibration sets l_c = log2(R_c / (2**10 - 1)): 10 bits, true and
    # differentiable (docs/method.md §6).
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 2, 4))
    w = np.asarray(kernel)
    r = w.max(axis=(0, 1, 2)) - w.min(axis=(0, 1, 2))
    log2_step = jnp.asarray(np.log2(r / 1023.0), jnp.float32)
    chex.assert_trees_all_close(
        self.variant(bitwidths.weight_bitwidth)(kernel, log2_step),
        jnp.full((4,), 10.0), atol=1e-4)
    chex.assert_trees_all_close(
        self.variant(bitwidths.true_weight_bitwidth)(kernel, log2_step),
        jnp.full((4,), 10.0))

  @chex.variants(with_jit=True, without_jit=True)
  def test_weight_bitwidth_gradients(self):
    kernel = jax.random.normal(jax.random.key(2), (5, 3))
    log2_step = jnp.array([-2.0, 0.0, 1.5])
    weights = jnp.array([1.0, -2.0, 0.5])  # d loss / d width per channel
    grad_kernel, grad_step = self.variant(jax.grad(
        lambda k, l: jnp.sum(weights * bitwidths.weight_bitwidth(k, l)),
        argnums=(0, 1)))(kernel, log2_step)
    w, c = np.asarray(kernel), np.asarray(weights)
    r, s = w.max(axis=0) - w.min(axis=0), np.exp2(np.asarray(log2_step))
    chex.assert_trees_all_close(grad_step, c * -r / (r + s), rtol=1e-5)
    slope = c / ((r + s) * LN2)
    expected = np.where(w == w.max(axis=0), slope, 0.0) - np.where(
        w == w.min(axis=0), slope, 0.0)
    chex.assert_trees_all_close(grad_kernel, expected, rtol=1e-5, atol=1e-7)

  def test_all_equal_channel_has_zero_width_and_finite_gradient(self):
    kernel = jnp.ones((4, 2)).at[:, 1].set(jnp.arange(4.0))
    widths, grads = jax.value_and_grad(
        lambda k: jnp.sum(bitwidths.weight_bitwidth(k, jnp.zeros(2))))(kernel)
    self.assertAlmostEqual(float(widths), math.log2(3 + 1))
    self.assertTrue(bool(jnp.all(jnp.isfinite(grads))))
    chex.assert_trees_all_close(
        bitwidths.true_weight_bitwidth(kernel, jnp.zeros(2)),
        jnp.array([0.0, 2.0]))


class TrueWidthTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_true_bitwidth_from_codes(self):
    got = self.variant(bitwidths.true_bitwidth_from_codes)(
        jnp.array([0.0, 3.0, 5.0, 2.0]), jnp.array([2.0, 3.0, 12.0, 1.0]))
    # 3 levels -> log2(3) bits; one level -> 0; an empty range counts as one.
    chex.assert_trees_all_close(
        got, np.log2([3.0, 1.0, 8.0, 1.0]).astype(np.float32))

  @chex.variants(with_jit=True, without_jit=True)
  def test_true_weight_width_counts_levels_of_the_codes(self):
    levels = [2, 3, 16, 5]
    log2_step = jnp.array([-2.0, -1.0, -4.0, 0.0])
    kernel = _kernel_with_codes(levels, log2_step, np.array([0.25, -1, 2, 0]))
    got = self.variant(bitwidths.true_weight_bitwidth)(kernel, log2_step)
    chex.assert_trees_all_close(got, np.log2(levels).astype(np.float32))
    # The same count from the codes the quantizer actually produces.
    out = quantizers.quantize_weight(kernel, log2_step)
    codes = np.rint((np.asarray(out) - np.asarray(kernel).min(axis=0))
                    / np.exp2(np.asarray(log2_step)))
    chex.assert_trees_all_close(
        got, bitwidths.true_bitwidth_from_codes(codes.min(0), codes.max(0)))

  @chex.variants(with_jit=True, without_jit=True)
  def test_activation_code_range_and_level_bound(self):
    x = 4.0 * jax.random.normal(jax.random.key(3), (64,))
    params = (-2.0, 1.5, -1.0)  # s = 1/4, q = 2**1.5: 10.3 steps, top code 10
    lo, hi = self.variant(bitwidths.activation_code_range)(x, *params)
    s, q = 0.25, 2.0**1.5
    codes = np.round((np.clip(np.asarray(x), -1.0, -1.0 + q - s) + 1.0) / s)
    self.assertEqual((float(lo), float(hi)), (codes.min(), codes.max()))
    self.assertEqual(float(hi), round(q / s - 1))
    bound = self.variant(bitwidths.activation_level_bound)(-2.0, 1.5)
    chex.assert_trees_all_close(bound, math.log2(round(q / s - 1) + 1))


class SoundnessTest(parameterized.TestCase):
  """beta <= B - 1e-3 gives true width <= B (docs/method.md §2.3, §14)."""

  def _draws(self, seed, n=4096):
    rng = np.random.default_rng(seed)
    bits = np.repeat(np.arange(1, 9), n)  # B = 1..8
    # Half of the draws just below B - 1e-3 (the tight band), half spread
    # over [B - 1, B + 0.5] (some above the margin: they may break B).
    near = bits - 1e-3 - rng.uniform(0.0, 2e-3, bits.size)
    wide = bits - 1.0 + rng.uniform(0.0, 1.5, bits.size)
    beta = np.where(rng.random(bits.size) < 0.5, near, wide)
    log2_step = rng.uniform(-12.0, 3.0, bits.size)
    return bits, beta, log2_step

  def test_weights(self):
    bits, beta, log2_step = self._draws(0)
    s = np.exp2(log2_step)
    r = s * (np.exp2(beta) - 1.0)
    kernel = jnp.asarray(np.stack([-0.5 * r, 0.5 * r, np.zeros_like(r)]),
                         jnp.float32)
    log2_step = jnp.asarray(log2_step, jnp.float32)
    width = np.asarray(jax.jit(bitwidths.weight_bitwidth)(kernel, log2_step))
    true = np.asarray(jax.jit(bitwidths.true_weight_bitwidth)(
        kernel, log2_step))
    sound = width <= bits - 1e-3
    self.assertGreater(sound.sum(), 0.5 * bits.size)
    np.testing.assert_array_less(true[sound], bits[sound] + 1e-6)
    for b in range(1, 9):  # the band right under the margin is covered
      self.assertGreater(width[sound & (bits == b)].max(), b - 1.2e-3)
    self.assertTrue(np.any(true[~sound] > bits[~sound]))  # the test can fail

  def test_activations(self):
    bits, beta, log2_step = self._draws(1)
    log2_step = jnp.asarray(log2_step, jnp.float32)
    log2_range = log2_step + jnp.asarray(beta, jnp.float32)
    clamp_low = jnp.asarray(
        np.random.default_rng(2).uniform(-4, 4, bits.size), jnp.float32)
    width = np.asarray(bitwidths.activation_bitwidth(log2_step, log2_range))

    def true_width(l_s, l_q, b):
      # Inputs far beyond both clamps reach the lowest and the top code.
      x = b + jnp.array([-1.0, 2.0]) * jnp.exp2(l_q)
      return bitwidths.true_bitwidth_from_codes(
          *bitwidths.activation_code_range(x, l_s, l_q, b))

    true = np.asarray(jax.jit(jax.vmap(true_width))(
        log2_step, log2_range, clamp_low))
    bound = np.asarray(jax.jit(bitwidths.activation_level_bound)(
        log2_step, log2_range))
    sound = width <= bits - 1e-3
    self.assertGreater(sound.sum(), 0.5 * bits.size)
    np.testing.assert_array_less(true[sound], bits[sound] + 1e-6)
    np.testing.assert_array_less(bound[sound], bits[sound] + 1e-6)
    self.assertTrue(np.any(bound[~sound] > bits[~sound]))


def _params():
  """conv1 (4 channels, 2..16 levels) with its input quantizer, FP dense."""
  levels = [2, 3, 16, 5]
  log2_step = jnp.array([-2.0, -1.0, -4.0, 0.0])
  kernel = _kernel_with_codes(levels, log2_step, np.array([0.25, -1, 2, 0]),
                              rows=18).reshape(3, 3, 2, 4)
  return {
      "conv1": {
          "kernel": kernel,
          "log2_step": log2_step,
          "input_quantizer": {
              "log2_step": jnp.array(-3.0),
              "log2_range": jnp.array(0.5),  # q / s = 2**3.5 = 11.3
              "clamp_low": jnp.array(0.0),
          },
      },
      "dense": {"kernel": jnp.ones((8, 10)), "bias": jnp.zeros((10,))},
  }


class ParamsTreeTest(parameterized.TestCase):

  def test_find_quantizers(self):
    expected = bitwidths.QuantizerIndex(
        weights=("conv1",), activations=("conv1/input_quantizer",))
    self.assertEqual(bitwidths.find_quantizers(_params()), expected)
    self.assertEqual(bitwidths.find_quantizers({"params": _params()}),
                     expected)
    self.assertEqual(bitwidths.find_quantizers({"dense": _params()["dense"]}),
                     bitwidths.QuantizerIndex((), ()))

  def test_differentiable_bitwidths_and_their_gradient(self):
    params = _params()
    weights, acts = jax.jit(bitwidths.differentiable_bitwidths)(params)
    conv = params["conv1"]
    chex.assert_trees_all_close(
        weights, bitwidths.weight_bitwidth(conv["kernel"], conv["log2_step"]))
    chex.assert_trees_all_close(
        weights, np.log2([2.0, 3.0, 16.0, 5.0]).astype(np.float32), rtol=1e-6)
    chex.assert_trees_all_close(acts, jnp.array([3.5]))
    grads = jax.grad(lambda p: jnp.sum(
        jnp.concatenate(bitwidths.differentiable_bitwidths(p))))(params)
    self.assertEqual(float(grads["conv1"]["input_quantizer"]["log2_range"]),
                     1.0)
    self.assertEqual(float(grads["conv1"]["input_quantizer"]["log2_step"]),
                     -1.0)
    np.testing.assert_array_equal(grads["dense"]["kernel"], 0.0)
    r = np.array([1.0, 2.0, 15.0, 4.0])  # R / s per channel
    chex.assert_trees_all_close(grads["conv1"]["log2_step"], -r / (r + 1),
                                rtol=1e-5)

  def test_summarize_bitwidths(self):
    params = _params()
    true = bitwidths.summarize_bitwidths(params)
    per_channel = np.log2([2.0, 3.0, 16.0, 5.0])
    self.assertEqual(set(true.weight_layers), {"conv1"})
    np.testing.assert_allclose(true.weight_layers["conv1"],
                               (4.0, per_channel.mean()), rtol=1e-6)
    # The analytic activation bound: round(q / s - 1) + 1 = 11 levels.
    np.testing.assert_allclose(true.activation_layers["conv1/input_quantizer"],
                               math.log2(11), rtol=1e-6)
    override = bitwidths.summarize_bitwidths(
        {"params": params},
        activation_widths={"conv1/input_quantizer": 2.5})
    self.assertEqual(override.activation_layers, {"conv1/input_quantizer": 2.5})
    self.assertEqual(override.activation_max, 2.5)
    smooth = bitwidths.summarize_bitwidths(params, true=False)
    self.assertAlmostEqual(smooth.activation_max, 3.5)

  def test_model_max_and_mean_over_layers(self):
    params = _params()
    second = _kernel_with_codes([3, 9], jnp.array([-1.0, -1.0]),
                                np.zeros(2), seed=1)
    params["conv2"] = {
        "kernel": second, "log2_step": jnp.array([-1.0, -1.0]),
        "input_quantizer": {"log2_step": jnp.array(-2.0),
                            "log2_range": jnp.array(-0.5),
                            "clamp_low": jnp.array(-1.0)}}
    summary = bitwidths.summarize_bitwidths(
        params, activation_widths={"conv1/input_quantizer": 3.0})
    conv2 = math.log2(9)
    self.assertAlmostEqual(summary.weight_layers["conv2"][0], conv2, places=5)
    self.assertAlmostEqual(summary.weight_max, 4.0, places=5)
    self.assertAlmostEqual(summary.weight_mean, (4.0 + conv2) / 2, places=5)
    # conv2's activation has no measurement: bound log2(round(2**1.5 - 1) + 1).
    self.assertAlmostEqual(summary.activation_layers["conv2/input_quantizer"],
                           math.log2(3), places=5)
    self.assertAlmostEqual(summary.activation_max, 3.0, places=5)
    self.assertAlmostEqual(summary.activation_mean, (3.0 + math.log2(3)) / 2,
                           places=5)
    empty = bitwidths.summarize_bitwidths({"dense": params["dense"]})
    self.assertEqual((empty.weight_max, empty.weight_mean,
                      empty.activation_max, empty.activation_mean),
                     (0.0, 0.0, 0.0, 0.0))

  def test_int_keys_of_nnx_list_children(self):
    # An nnx.State holding an nnx.List: its children have int keys.
    params = {"blocks": {1: _params()["conv1"], 0: _params()["conv1"]}}
    index = bitwidths.find_quantizers(params)
    self.assertEqual(index.weights, ("blocks/0", "blocks/1"))
    self.assertEqual(index.activations[0], "blocks/0/input_quantizer")
    weights, _ = jax.jit(bitwidths.differentiable_bitwidths)(params)
    self.assertEqual(weights.shape, (8,))
    summary = bitwidths.summarize_bitwidths(params)
    self.assertAlmostEqual(summary.weight_layers["blocks/1"][0], 4.0, places=5)


def _stats(code_min, code_max):
  """One batch's sown ``quant_stats`` for the quantizer ``conv/input_quantizer``."""
  return {"conv": {"input_quantizer": {
      "code_min": jnp.float32(code_min), "code_max": jnp.float32(code_max),
      "input_min": jnp.float32(-1.0)}}}


class TrueActivationWidthsTest(parameterized.TestCase):

  def test_union_of_codes_over_the_pass_not_max_of_batches(self):
    # Codes {0, 1} then {2, 3}: each batch alone uses 1 bit, the pass 2 bits.
    widths = bitwidths.true_activation_widths([_stats(0, 1), _stats(2, 3)])
    self.assertEqual(widths, {"conv/input_quantizer": 2.0})

  def test_single_batch_and_repeated_sow_tuples(self):
    stats = {"a": {"code_min": (jnp.float32(1.0),),
                   "code_max": (jnp.float32(5.0),)}}
    self.assertAlmostEqual(
        bitwidths.true_activation_widths([stats])["a"], math.log2(5.0),
        places=6)

  def test_no_batches_gives_no_widths(self):
    self.assertEqual(bitwidths.true_activation_widths([]), {})


class ConvergenceTest(parameterized.TestCase):

  def _summary(self, weight_max, activation_max):
    return bitwidths.BitwidthSummary({}, {}, weight_max, weight_max,
                                     activation_max, activation_max)

  @parameterized.parameters(
      (2.0, 2.0, 2, 2, True),
      (2.0 + 5e-7, 2.0, 2, 2, True),  # within WIDTH_TOLERANCE
      (2.0 + 1e-5, 2.0, 2, 2, False),
      (2.0, 2.1, 2, 2, False),
      (1.0, 20.0, 1, 32, True),  # A >= 32: unconstrained (docs/method.md D12)
      (9.0, 1.0, 32, 1, True),
  )
  def test_is_converged(self, w, a, weight_bits, activation_bits, expected):
    self.assertEqual(
        bitwidths.is_converged(self._summary(w, a), weight_bits,
                               activation_bits), expected)

  def test_float_bits_is_the_no_quantization_target(self):
    self.assertTrue(bitwidths.is_float(bitwidths.FLOAT_BITS))
    self.assertFalse(bitwidths.is_float(bitwidths.FLOAT_BITS - 1))


class KeyPathNameTest(absltest.TestCase):

  def test_dict_and_sequence_keys_join_with_slashes(self):
    tree = {"block": [{"conv": 1}], "x": 2}
    names = [bitwidths.key_path_name(p)
             for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
    self.assertEqual(names, ["block/0/conv", "x"])


if __name__ == "__main__":
  absltest.main()
