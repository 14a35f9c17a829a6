"""Tests for train.cpu_conv: equal to lax.conv_general_dilated, values and VJPs."""

from __future__ import annotations

import functools
import os
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import chex
import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from train import cpu_conv as conv

_NHWC = ("NHWC", "HWIO", "NHWC")
_EXPLICIT = ((1, 1), (1, 1))

# (batch, height, width, in, out, kernel, stride, padding): odd and even
# sizes, batch 1 and 3, 1x1 / 3x3 / 7x7, strides 1 and 2, SAME / VALID /
# explicit; 3x3 with <= 4 input channels takes the elementwise auto forward.
_CASES = (
    (1, 9, 7, 3, 4, 3, 1, _EXPLICIT),
    (3, 8, 7, 3, 4, 3, 2, "SAME"),
    (3, 7, 9, 5, 2, 3, 1, "VALID"),
    (1, 9, 9, 5, 4, 3, 2, "VALID"),
    (3, 9, 7, 2, 3, 3, 2, _EXPLICIT),
    (3, 9, 7, 3, 4, 1, 1, "VALID"),
    (1, 9, 8, 3, 4, 1, 2, "SAME"),
    (3, 11, 9, 2, 3, 7, 2, "SAME"),
    (1, 9, 9, 1, 2, 7, 1, _EXPLICIT),
)

# Every formulation of every pass runs in at least one plan.
_PLANS = (
    ("auto", "auto"),
    ("matmul", "matmul"),
    ("elementwise_pretransposed", conv.ConvPlan("elementwise", "pretransposed",
                                                "xla")),
    ("xla_inside_custom_vjp", conv.ConvPlan("xla", "xla", "xla")),
)


def _normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape),
                     jnp.float32)


def _value_and_vjp(conv_fn, x, kernel, cotangent, **kwargs):
  """(output, input gradient, kernel gradient) of ``<conv(x, k), cotangent>``."""
  out, vjp = jax.vjp(lambda a, b: conv_fn(a, b, **kwargs), x, kernel)
  return (out,) + vjp(cotangent)


def _uses_custom_path(fn, *args) -> bool:
  return "custom_vjp_call" in str(jax.make_jaxpr(fn)(*args))


def _case_inputs(case):
  n, h, w, cin, cout, k, s, padding = case
  x, kernel = _normal(1, (n, h, w, cin)), _normal(2, (k, k, cin, cout))
  kwargs = dict(window_strides=(s, s), padding=padding,
                dimension_numbers=_NHWC)
  cotangent = _normal(3, lax.conv_general_dilated(x, kernel, **kwargs).shape)
  return (x, kernel, cotangent), kwargs


def _all_cases(conv_fn, cases, inputs):
  """(output, input gradient, kernel gradient) of every case."""
  return [_value_and_vjp(conv_fn, *args, **_case_inputs(case)[1])
          for case, args in zip(cases, inputs)]


class EqualsLaxTest(parameterized.TestCase):

  @parameterized.named_parameters(*_PLANS)
  def test_values_and_gradients_equal_lax(self, algorithm):
    inputs = [_case_inputs(case)[0] for case in _CASES]
    fast = functools.partial(conv.conv_general_dilated, algorithm=algorithm)
    actual = jax.jit(functools.partial(_all_cases, fast, _CASES))(inputs)
    expected = _all_cases(lax.conv_general_dilated, _CASES, inputs)
    for case, got, want in zip(_CASES, actual, expected):
      with self.subTest(case=str(case)):
        chex.assert_trees_all_close(got, want, rtol=1e-5, atol=2e-5)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*_PLANS[:2])
  def test_variants(self, algorithm):
    cases = (_CASES[1], _CASES[6])  # 3x3 and 1x1, stride 2, SAME, even size
    inputs = [_case_inputs(case)[0] for case in cases]
    fast = functools.partial(conv.conv_general_dilated, algorithm=algorithm)
    chex.assert_trees_all_close(
        self.variant(functools.partial(_all_cases, fast, cases))(inputs),
        _all_cases(lax.conv_general_dilated, cases, inputs),
        rtol=1e-5, atol=2e-5)

  @parameterized.named_parameters(*_PLANS)
  def test_hand_derived_sums(self, algorithm):
    # x[h, w] = 4h + w, 3x3 kernel of ones, VALID: y = 9 x[h + 1, w + 1];
    # with G = 1: dW[i, j] = sum_{h,w<2} x[h + i, w + j] = 16i + 4j + 10 and
    # dx[h, w] = c[h] c[w], c = windows covering a row = (1, 2, 2, 1).
    x = jnp.arange(16.0).reshape(1, 4, 4, 1)
    out, d_x, d_kernel = jax.jit(functools.partial(
        _value_and_vjp, functools.partial(conv.conv_general_dilated,
                                          algorithm=algorithm),
        window_strides=(1, 1), padding="VALID", dimension_numbers=_NHWC))(
            x, jnp.ones((3, 3, 1, 1)), jnp.ones((1, 2, 2, 1)))
    rows = np.arange(2.0)[:, None]
    chex.assert_trees_all_close(out[0, ..., 0],
                                9 * (4 * (rows + 1) + rows.T + 1))
    i = np.arange(3.0)[:, None]
    chex.assert_trees_all_close(d_kernel[..., 0, 0], 16 * i + 4 * i.T + 10)
    c = np.array([1.0, 2.0, 2.0, 1.0])
    chex.assert_trees_all_close(d_x[0, ..., 0], np.outer(c, c))

  def test_auto_takes_the_custom_path_on_cpu(self):
    self.assertEqual(jax.default_backend(), "cpu")
    self.assertTrue(conv.fast_conv_enabled())
    # A fresh partial per trace: the choice is made when a function is traced.
    fn = lambda **kw: functools.partial(
        conv.conv_general_dilated, window_strides=(1, 1), padding="SAME",
        dimension_numbers=_NHWC, **kw)
    x, kernel = jnp.ones((1, 5, 5, 2)), jnp.ones((3, 3, 2, 2))
    self.assertTrue(_uses_custom_path(fn(), x, kernel))
    self.assertFalse(_uses_custom_path(fn(algorithm="xla"), x, kernel))
    with mock.patch.dict(os.environ, {conv.DISABLE_ENV_VAR: "1"}):
      self.assertFalse(conv.fast_conv_enabled())
      self.assertFalse(_uses_custom_path(fn(), x, kernel))
      self.assertTrue(_uses_custom_path(fn(algorithm="matmul"), x, kernel))


class FallbackTest(parameterized.TestCase):

  # (Negative padding also falls back; XLA:CPU returns garbage for it.)
  @parameterized.named_parameters(
      ("grouped", dict(feature_group_count=2), (2, 7, 7, 4), (3, 3, 2, 4)),
      ("batch_grouped", dict(batch_group_count=2), (2, 7, 7, 4), (3, 3, 4, 4)),
      ("kernel_dilation", dict(rhs_dilation=(2, 2)), (2, 7, 7, 4),
       (3, 3, 4, 4)),
      ("input_dilation", dict(lhs_dilation=(2, 1), padding=_EXPLICIT),
       (2, 7, 7, 4), (3, 3, 4, 4)),
      ("nchw", dict(dimension_numbers=("NCHW", "OIHW", "NCHW")), (2, 4, 7, 7),
       (3, 4, 3, 3)),
      ("conv1d", dict(window_strides=(1,), dimension_numbers=("NWC", "WIO",
                                                              "NWC")),
       (2, 7, 4), (3, 4, 4)),
  )
  def test_falls_back_to_lax_and_stays_equal(self, overrides, x_shape,
                                             kernel_shape):
    kwargs = dict(window_strides=(1, 1), padding="SAME",
                  dimension_numbers=_NHWC)
    kwargs.update(overrides)
    x, kernel = _normal(4, x_shape), _normal(5, kernel_shape)
    for algorithm in ("auto", "matmul"):
      fn = functools.partial(conv.conv_general_dilated, algorithm=algorithm,
                             **kwargs)
      self.assertFalse(_uses_custom_path(fn, x, kernel))
      expected = lax.conv_general_dilated(x, kernel, **kwargs)
      cotangent = _normal(6, expected.shape)
      chex.assert_trees_all_close(
          jax.jit(functools.partial(_value_and_vjp, fn))(x, kernel, cotangent),
          _value_and_vjp(functools.partial(lax.conv_general_dilated, **kwargs),
                         x, kernel, cotangent),
          rtol=1e-5, atol=1e-5)


class TransformsTest(absltest.TestCase):

  def test_vmap_of_values_and_per_example_gradients(self):
    xs, kernel = _normal(7, (2, 3, 9, 7, 3)), _normal(8, (3, 3, 3, 4))

    def loss(conv_fn, kernel, x):
      y = conv_fn(x, kernel, (2, 2), "SAME", dimension_numbers=_NHWC)
      return jnp.sum(jnp.sin(y)), y

    def per_example(conv_fn):
      grad = jax.grad(functools.partial(loss, conv_fn), has_aux=True)
      return jax.jit(jax.vmap(grad, in_axes=(None, 0)))(kernel, xs)

    chex.assert_trees_all_close(per_example(conv.conv_general_dilated),
                                per_example(lax.conv_general_dilated),
                                rtol=1e-5, atol=2e-5)

  def test_dtypes_follow_lax(self):
    x = _normal(9, (2, 6, 6, 3)).astype(jnp.bfloat16)
    kernel = _normal(10, (3, 3, 3, 4)).astype(jnp.bfloat16)
    for out_type in (None, jnp.float32):
      fn = functools.partial(conv.conv_general_dilated, window_strides=(1, 1),
                             padding="SAME", dimension_numbers=_NHWC,
                             preferred_element_type=out_type)
      ref = functools.partial(lax.conv_general_dilated, window_strides=(1, 1),
                              padding="SAME", dimension_numbers=_NHWC,
                              preferred_element_type=out_type)
      cotangent = jnp.ones(ref(x, kernel).shape, ref(x, kernel).dtype)
      actual = jax.jit(functools.partial(_value_and_vjp, fn))(x, kernel,
                                                              cotangent)
      expected = _value_and_vjp(ref, x, kernel, cotangent)
      chex.assert_trees_all_equal_dtypes(actual, expected)
      chex.assert_trees_all_close(
          jax.tree.map(lambda a: a.astype(jnp.float32), actual),
          jax.tree.map(lambda a: a.astype(jnp.float32), expected),
          rtol=2e-2, atol=5e-2)


class FlaxConvTest(absltest.TestCase):

  def test_nn_conv_with_the_fast_conv_equals_plain_nn_conv(self):
    layer = dict(features=5, kernel_size=(3, 3), strides=(2, 2),
                 padding="SAME")
    plain = nn.Conv(**layer)
    fast = nn.Conv(**layer, conv_general_dilated=conv.conv_general_dilated)
    x = _normal(11, (3, 9, 8, 3))
    params = plain.init(jax.random.key(0), x)
    params = jax.tree.map(lambda p: p + 0.1, params)  # nonzero bias

    def value_and_grads(module):
      loss = lambda p, x: jnp.sum(jnp.cos(module.apply(p, x)))
      return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)

    self.assertTrue(_uses_custom_path(fast.apply, params, x))
    chex.assert_trees_all_close(value_and_grads(fast), value_and_grads(plain),
                                rtol=1e-5, atol=2e-5)


class PlanTest(absltest.TestCase):

  def test_auto_rules(self):
    plan = conv.conv_plan
    self.assertEqual(plan((3, 3, 1, 16), (1, 1)),
                     conv.ConvPlan("elementwise", "pretransposed", "xla"))
    self.assertEqual(plan((3, 3, 16, 32), (2, 2)),
                     conv.ConvPlan("xla", "pretransposed", "matmul"))
    self.assertEqual(plan((1, 1, 16, 32), (2, 2)),
                     conv.ConvPlan("matmul", "matmul", "matmul"))
    self.assertEqual(plan((7, 7, 3, 64), (2, 2)).forward, "xla")
    self.assertEqual(plan((3, 3, 64, 64), (1, 1), "matmul"),
                     conv.ConvPlan("matmul", "matmul", "matmul"))

  def test_plain_and_depthwise_geometry(self):
    geometry = lambda x, w, groups, **kw: conv.plain_conv_geometry(
        jnp.ones(x), jnp.ones(w), (2, 1), "SAME", None, None, _NHWC, groups,
        1, **kw)
    self.assertEqual(geometry((1, 6, 5, 4), (3, 3, 4, 8), 1),
                     ((2, 1), ((0, 1), (1, 1))))
    self.assertEqual(geometry((1, 6, 5, 4), (3, 3, 1, 4), 4, depthwise=True),
                     ((2, 1), ((0, 1), (1, 1))))
    self.assertIsNone(geometry((1, 6, 5, 4), (3, 3, 1, 4), 4))  # grouped
    self.assertIsNone(geometry((1, 6, 5, 4), (3, 3, 1, 8), 4,  # multiplier 2
                               depthwise=True))
    self.assertIsNone(geometry((1, 6, 5, 4), (3, 3, 2, 4), 2, depthwise=True))

  def test_errors_name_the_choices(self):
    x, kernel = jnp.ones((1, 4, 4, 1)), jnp.ones((3, 3, 1, 1))
    with self.assertRaisesRegex(ValueError, "'im2col'.*auto, matmul, xla"):
      conv.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                dimension_numbers=_NHWC, algorithm="im2col")
    with self.assertRaisesRegex(ValueError, "weight_grad.*'fft'.*matmul"):
      conv.ConvPlan(weight_grad="fft")
    with self.assertRaisesRegex(ValueError, "'xla'"):
      conv.conv_plan((3, 3, 1, 1), (1, 1), "xla")


if __name__ == "__main__":
  absltest.main()
