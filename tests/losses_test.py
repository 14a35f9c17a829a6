"""Tests for gdnsq_jax.losses against float64 numpy references."""

from __future__ import annotations

import functools
import math

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np

from gdnsq_jax import losses

_DIVERGENCES = ("jeffreys", "js", "kl", "reverse_kl")


def _np_log_softmax(logits: np.ndarray) -> np.ndarray:
  shifted = logits - logits.max(axis=-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _np_kl(log_p: np.ndarray, log_q: np.ndarray) -> np.ndarray:
  """Per-row KL(p || q) in float64."""
  return (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)


def _np_reference(name: str, student: np.ndarray, teacher: np.ndarray):
  """Float64 reference value of loss ``name`` at temperature 1."""
  student = student.astype(np.float64)
  teacher = teacher.astype(np.float64)
  log_ps, log_pt = _np_log_softmax(student), _np_log_softmax(teacher)
  p_s, p_t = np.exp(log_ps), np.exp(log_pt)
  if name == "jeffreys":
    per_row = ((p_t - p_s) * (log_pt - log_ps)).sum(axis=-1)
  elif name == "kl":
    per_row = _np_kl(log_pt, log_ps)
  elif name == "reverse_kl":
    per_row = _np_kl(log_ps, log_pt)
  elif name == "soft_ce":
    per_row = -(p_t * log_ps).sum(axis=-1)
  elif name == "symmetric_ce":
    per_row = -(p_t * log_ps).sum(axis=-1) - (p_s * log_pt).sum(axis=-1)
  elif name == "js":
    log_m = np.log(0.5 * (p_t + p_s))
    per_row = 0.5 * _np_kl(log_pt, log_m) + 0.5 * _np_kl(log_ps, log_m)
  elif name == "hellinger":
    per_row = 0.5 * np.square(np.sqrt(p_s) - np.sqrt(p_t)).sum(axis=-1)
  elif name == "l1":
    return np.abs(student - teacher).mean()
  elif name == "l2":
    return np.square(student - teacher).mean()
  else:
    raise AssertionError(name)
  return per_row.mean()


def _logits(seed: int, shape=(4, 5), scale: float = 3.0) -> np.ndarray:
  return (scale * np.random.default_rng(seed).normal(size=shape)).astype(
      np.float32
  )


class RegistryTest(parameterized.TestCase):

  def test_names_are_sorted_and_complete(self):
    self.assertEqual(
        losses.LOSSES,
        (
            "hellinger",
            "jeffreys",
            "js",
            "kl",
            "l1",
            "l2",
            "reverse_kl",
            "soft_ce",
            "symmetric_ce",
        ),
    )
    self.assertIs(
        losses.get_distillation_loss("jeffreys"), losses.jeffreys_divergence
    )

  def test_unknown_name_lists_choices(self):
    with self.assertRaisesRegex(
        ValueError,
        r"unknown distillation loss 'kld'; choose one of: hellinger, jeffreys, "
        r"js, kl, "
        r"l1, l2, reverse_kl, soft_ce, symmetric_ce",
    ):
      losses.distillation_loss(_logits(0), _logits(1), name="kld")

  def test_default_is_jeffreys(self):
    student, teacher = _logits(0), _logits(1)
    chex.assert_trees_all_close(
        losses.distillation_loss(student, teacher),
        np.float32(_np_reference("jeffreys", student, teacher)),
        rtol=1e-5,
    )

  @parameterized.parameters(0.0, -1.0, float("nan"))
  def test_bad_temperature_raises(self, temperature):
    with self.assertRaisesRegex(ValueError, "temperature must be > 0"):
      losses.distillation_loss(
          _logits(0), _logits(1), temperature=temperature
      )

  def test_shape_mismatch_raises(self):
    with self.assertRaisesRegex(ValueError, r"\(4, 5\).*\(4, 6\)"):
      losses.kl_divergence(_logits(0), _logits(1, shape=(4, 6)))


class DistillationLossTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*losses.LOSSES)
  def test_matches_numpy_reference(self, name):
    student, teacher = _logits(0), _logits(1)
    loss_fn = self.variant(
        functools.partial(losses.distillation_loss, name=name)
    )
    chex.assert_trees_all_close(
        loss_fn(student, teacher),
        np.float32(_np_reference(name, student, teacher)),
        rtol=1e-5,
        atol=1e-6,
    )

  def test_hellinger_is_symmetric_bounded_and_matches_the_reference_form(self):
    student, teacher = _logits(4), _logits(5)
    h = float(losses.hellinger_distance(student, teacher))
    self.assertAlmostEqual(h, float(losses.hellinger_distance(teacher,
                                                              student)),
                           places=6)
    self.assertBetween(h, 0.0, 1.0)
    # Disjoint one-hot distributions are at the maximum distance 1.
    far = np.array([[1e4, -1e4]], np.float32)
    self.assertAlmostEqual(
        float(losses.hellinger_distance(far, far[:, ::-1])), 1.0, places=6)
    # The reference's element-mean of squared sqrt-prob differences: 2 H^2/C.
    p_s = np.exp(_np_log_softmax(student.astype(np.float64)))
    p_t = np.exp(_np_log_softmax(teacher.astype(np.float64)))
    reference = np.square(np.sqrt(p_s) - np.sqrt(p_t)).mean()
    self.assertAlmostEqual(2 * h / student.shape[-1], reference, places=6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_jeffreys_is_symmetric_and_sums_the_two_kls(self):
    student, teacher = _logits(2), _logits(3)
    jeffreys = self.variant(losses.jeffreys_divergence)
    forward = jeffreys(student, teacher)
    chex.assert_trees_all_close(forward, jeffreys(teacher, student), rtol=1e-6)
    chex.assert_trees_all_close(
        forward,
        losses.kl_divergence(student, teacher)
        + losses.reverse_kl_divergence(student, teacher),
        rtol=1e-6,
    )
    # KL is not symmetric, so the check above is not vacuous.
    self.assertGreater(
        abs(
            float(losses.kl_divergence(student, teacher))
            - float(losses.reverse_kl_divergence(student, teacher))
        ),
        1e-3,
    )

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*_DIVERGENCES)
  def test_zero_for_same_distribution(self, name):
    logits = _logits(4)
    row_shift = np.array([[-7.0], [0.5], [3.0], [100.0]], np.float32)
    loss_fn = self.variant(
        functools.partial(losses.distillation_loss, name=name)
    )
    chex.assert_trees_all_close(loss_fn(logits, logits), 0.0, atol=0.0)
    chex.assert_trees_all_close(
        loss_fn(logits + row_shift, logits), 0.0, atol=2e-5
    )
    self.assertGreater(float(loss_fn(logits, _logits(5))), 1e-2)

  @chex.variants(with_jit=True, without_jit=True)
  def test_js_is_symmetric_and_bounded_by_ln2(self):
    js = self.variant(losses.jensen_shannon_divergence)
    student, teacher = _logits(6), _logits(7)
    chex.assert_trees_all_close(
        js(student, teacher), js(teacher, student), rtol=1e-6
    )
    # Disjoint supports reach the bound ln 2.
    one_hot = 1e4 * np.eye(5, dtype=np.float32)[:4]
    other_hot = 1e4 * np.eye(5, dtype=np.float32)[1:]
    chex.assert_trees_all_close(
        js(one_hot, other_hot), np.float32(math.log(2.0)), rtol=1e-6
    )
    for seed in range(4):
      value = float(js(_logits(seed, scale=30.0), _logits(seed + 10)))
      self.assertBetween(value, 0.0, math.log(2.0) + 1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_soft_ce_minus_teacher_entropy_is_kl(self):
    student, teacher = _logits(8), _logits(9)
    log_pt = _np_log_softmax(teacher.astype(np.float64))
    entropy = -(np.exp(log_pt) * log_pt).sum(axis=-1).mean()
    soft_ce = self.variant(losses.soft_cross_entropy)(student, teacher)
    chex.assert_trees_all_close(
        soft_ce - np.float32(entropy),
        losses.kl_divergence(student, teacher),
        rtol=1e-5,
        atol=1e-6,
    )

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*losses.LOSSES)
  def test_finite_value_and_gradient_at_extreme_logits(self, name):
    student = np.array(
        [[1e4, -1e4, 0.0], [-1e4, -1e4, 1e4], [0.0, 1e4, -1e4]], np.float32
    )
    teacher = np.array(
        [[-1e4, 1e4, 0.0], [-1e4, -1e4, 1e4], [1e4, -1e4, -1e4]], np.float32
    )
    loss_fn = functools.partial(losses.distillation_loss, name=name)
    value, (student_grad, teacher_grad) = self.variant(
        jax.value_and_grad(loss_fn, argnums=(0, 1))
    )(student, teacher)
    chex.assert_tree_all_finite((value, student_grad))
    self.assertGreater(float(value), 0.0)
    # The teacher is a constant.
    chex.assert_trees_all_close(teacher_grad, jnp.zeros_like(teacher_grad))

  @chex.variants(with_jit=True, without_jit=True)
  def test_masked_teacher_class_contributes_zero(self):
    # A -inf teacher logit gives p_T = 0 there: KL(p_T || p_S) stays finite.
    teacher = np.array([[2.0, -np.inf, 0.5]], np.float32)
    student = np.array([[1.0, 3.0, -1.0]], np.float32)
    value, grad = self.variant(jax.value_and_grad(losses.kl_divergence))(
        student, teacher
    )
    expected = _np_reference(
        "kl", student[:, [0, 2]], teacher[:, [0, 2]]
    ) + np.log(np.exp(student).sum() / np.exp(student[:, [0, 2]]).sum())
    chex.assert_trees_all_close(value, np.float32(expected), rtol=1e-5)
    chex.assert_tree_all_finite(grad)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*losses.LOSSES)
  def test_temperature_divides_logits_without_rescaling(self, name):
    student, teacher = _logits(11), _logits(12)
    loss_fn = self.variant(
        functools.partial(losses.distillation_loss, name=name, temperature=4.0)
    )
    chex.assert_trees_all_close(
        loss_fn(student, teacher),
        np.float32(_np_reference(name, student / 4.0, teacher / 4.0)),
        rtol=1e-5,
        atol=1e-6,
    )

  def test_high_temperature_softens_divergence(self):
    student, teacher = _logits(13), _logits(14)
    values = [
        float(losses.jeffreys_divergence(student, teacher, temperature=t))
        for t in (1.0, 2.0, 8.0, 64.0)
    ]
    self.assertEqual(values, sorted(values, reverse=True))
    self.assertLess(values[-1], 1e-2 * values[0])

  def test_traced_temperature_under_jit(self):
    student, teacher = _logits(15), _logits(16)
    loss_fn = jax.jit(
        lambda s, t, temp: losses.distillation_loss(s, t, temperature=temp)
    )
    chex.assert_trees_all_close(
        loss_fn(student, teacher, jnp.float32(2.0)),
        losses.jeffreys_divergence(student, teacher, temperature=2.0),
        rtol=1e-6,
    )

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*losses.LOSSES)
  def test_bfloat16_inputs_give_float32(self, name):
    student = jnp.asarray(_logits(17), jnp.bfloat16)
    teacher = jnp.asarray(_logits(18), jnp.bfloat16)
    loss_fn = self.variant(
        functools.partial(losses.distillation_loss, name=name)
    )
    value = loss_fn(student, teacher)
    self.assertEqual(value.dtype, jnp.float32)
    self.assertEqual(value.shape, ())
    # The float32 math on the bf16-rounded inputs matches the reference.
    chex.assert_trees_all_close(
        value,
        np.float32(
            _np_reference(
                name,
                np.asarray(student, np.float32),
                np.asarray(teacher, np.float32),
            )
        ),
        rtol=1e-5,
        atol=1e-6,
    )

  def test_batch_mean_over_leading_axes(self):
    student, teacher = _logits(19, shape=(2, 3, 5)), _logits(20, (2, 3, 5))
    chex.assert_trees_all_close(
        losses.jeffreys_divergence(student, teacher),
        losses.jeffreys_divergence(
            student.reshape(6, 5), teacher.reshape(6, 5)
        ),
        rtol=1e-6,
    )


class CrossEntropyLossTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_numpy_reference(self):
    logits = _logits(21)
    labels = np.array([0, 4, 2, 2], np.int32)
    expected = -_np_log_softmax(logits.astype(np.float64))[
        np.arange(4), labels
    ].mean()
    chex.assert_trees_all_close(
        self.variant(losses.cross_entropy_loss)(logits, labels),
        np.float32(expected),
        rtol=1e-6,
    )

  @chex.variants(with_jit=True, without_jit=True)
  def test_bfloat16_and_extreme_logits(self):
    logits = jnp.asarray([[1e4, -1e4], [-1e4, 1e4]], jnp.bfloat16)
    labels = jnp.asarray([1, 1], jnp.int32)
    value, grad = self.variant(jax.value_and_grad(losses.cross_entropy_loss))(
        logits, labels
    )
    self.assertEqual(value.dtype, jnp.float32)
    # Row 0 costs 2x, row 1 costs 0, with x = 1e4 rounded to bfloat16.
    chex.assert_trees_all_close(value, np.float32(logits[0, 0]))
    chex.assert_tree_all_finite(grad)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(-1, 5)
  def test_out_of_range_label_gives_nan(self, bad_label):
    labels = np.array([0, bad_label, 2, 2], np.int32)
    value = self.variant(losses.cross_entropy_loss)(_logits(22), labels)
    self.assertTrue(np.isnan(value))

  def test_bad_labels_raise(self):
    with self.assertRaisesRegex(ValueError, "integer class indices"):
      losses.cross_entropy_loss(_logits(23), np.zeros((4,), np.float32))
    with self.assertRaisesRegex(ValueError, r"labels \(4, 1\)"):
      losses.cross_entropy_loss(_logits(23), np.zeros((4, 1), np.int32))


if __name__ == "__main__":
  absltest.main()
