"""Tests for gdnsq_jax.layer_kinds: kinds, equations and output channels."""

from __future__ import annotations

from absl.testing import absltest
from absl.testing import parameterized
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gdnsq_jax import layer_kinds
from gdnsq_jax import layers


def _bound(module, x, *args):
  """``module`` bound to its init variables (and its kernel shape)."""
  variables = module.init(jax.random.key(0), x, *args)
  return module.bind(variables), variables["params"]["kernel"].shape


class LayerKindsTest(parameterized.TestCase):

  def test_kinds(self):
    self.assertEqual(
        [layer_kinds.kind_of(m) for m in (
            nn.Conv(2, (3, 3), feature_group_count=2), layers.QuantConv(2, (1,)),
            nn.Dense(2), nn.DenseGeneral(2), nn.Einsum((2, 3), "ab,bc->ac"),
            nn.ConvTranspose(2, (3,)), nn.Embed(3, 2), nn.LayerNorm(),
            nn.MultiHeadDotProductAttention(num_heads=1))],
        ["conv", "conv", "dense", "dense_general", "einsum",
         "conv_transpose", "embed", None, None])

  @parameterized.parameters(
      (nn.Dense(5), (2, 3, 4), (), "abc,cd->abd", (1,)),
      (nn.DenseGeneral((2, 3)), (2, 7, 4), (), "abc,cde->abde", (1, 2)),
      (nn.DenseGeneral(5, axis=(-2, -1)), (2, 3, 4), (), "abc,bcd->ad", (2,)),
      (nn.DenseGeneral(5, axis=(1, -1)), (2, 3, 6, 4), (),
       "abcd,bde->ace", (2,)),
      (nn.DenseGeneral(5, axis=-1, batch_dims=(0,)), (3, 2, 4), (),
       "abc,acd->abd", (0, 2)),
      (nn.Einsum((4, 6), "...d,hd->...h"), (2, 3, 6), (), None, (0,)),
      (nn.Einsum((6, 4)), (2, 6), ("bd,dh->bh",), "bd,dh->bh", (1,)),
  )
  def test_equation_and_channel_axes(self, module, shape, args, equation,
                                     axes):
    x = jnp.ones(shape)
    bound, kernel_shape = _bound(module, x, *args)
    got = layer_kinds.einsum_equation(bound, x, kernel_shape, args)
    if equation is not None:
      self.assertEqual(got, equation)
    # The equation computes the layer (bias zero-initialised).
    kernel = bound.variables["params"]["kernel"]
    np.testing.assert_allclose(jnp.einsum(got, x, kernel),
                               bound(x, *args), rtol=1e-5, atol=1e-6)
    self.assertEqual(layer_kinds.channel_axes(bound, x, kernel_shape, args),
                     axes)

  def test_conv_channel_axis_and_dense_like_only(self):
    x = jnp.ones((1, 5, 5, 4))
    bound, shape = _bound(nn.Conv(4, (3, 3), feature_group_count=4), x)
    self.assertEqual(layer_kinds.channel_axes(bound, x, shape), (3,))
    with self.assertRaisesRegex(ValueError, "not a dense-like layer"):
      layer_kinds.einsum_equation(bound, x, shape)

  def test_weight_kind_other_for_modules_with_own_kernel(self):

    class Custom(nn.Module):

      @nn.compact
      def __call__(self, x):
        return x @ self.param("kernel", nn.initializers.ones, (3, 2))

    x = jnp.ones((1, 3))
    bound = Custom().bind(Custom().init(jax.random.key(0), x))
    self.assertEqual(layer_kinds.weight_kind(bound), "other")
    self.assertEqual(layer_kinds.weight_param_name("embed"), "embedding")


if __name__ == "__main__":
  absltest.main()
