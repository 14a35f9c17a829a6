"""Tests for gdnsq_jax.channels: the log2_step broadcast convention."""

from __future__ import annotations

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax.numpy as jnp
import numpy as np

from gdnsq_jax import channels


class ChannelsTest(parameterized.TestCase):

  @parameterized.parameters(
      ((3, 3, 4, 8), (3,), (8,)),           # conv / depthwise conv
      ((6, 5), (1,), (5,)),                 # dense
      ((6, 1), (1,), (1,)),                 # a dense with one output
      ((16, 2, 8), (1, 2), (2, 8)),         # DenseGeneral q / k / v
      ((2, 8, 16), (2,), (16,)),            # DenseGeneral out projection
      ((5, 4), (0,), (5, 1)),               # einsum 'bd,hd->bh'
      ((3, 4, 5), (0, 2), (3, 1, 5)),       # DenseGeneral with batch_dims
      ((4, 5), (), ()),                     # nothing reaches the output
  )
  def test_step_shape_and_axes(self, kernel_shape, axes, expected):
    shape = channels.step_shape(kernel_shape, axes)
    self.assertEqual(shape, expected)
    self.assertEqual(channels.step_shape(kernel_shape, axes, False), ())
    kept = channels.channel_axes(kernel_shape, shape)
    self.assertEqual(kept, tuple(a for a in axes if kernel_shape[a] != 1))
    self.assertEqual(
        channels.entries_per_channel(kernel_shape, shape),
        int(np.prod(kernel_shape)) // int(np.prod(shape or (1,))))

  def test_channel_range_per_output_channel(self):
    kernel = jnp.asarray(np.random.default_rng(0).normal(size=(5, 4)))
    lo, hi = channels.channel_range(kernel, (5, 1))
    chex.assert_trees_all_close(lo, kernel.min(axis=1, keepdims=True))
    chex.assert_trees_all_close(hi, kernel.max(axis=1, keepdims=True))
    lo, hi = channels.channel_range(kernel, ())
    self.assertEqual((lo.shape, float(hi)), ((), float(kernel.max())))

  @parameterized.parameters(((3, 3, 4, 8), (8,)), ((5, 4), (5, 1)),
                            ((16, 2, 8), (2, 8)), ((3, 4, 5), (3, 1, 5)))
  def test_channels_last_round_trip(self, kernel_shape, shape):
    kernel = jnp.arange(np.prod(kernel_shape), dtype=jnp.float32).reshape(
        kernel_shape)
    flat, restore = channels.to_channels_last(kernel, shape)
    self.assertEqual(flat.shape[-1], int(np.prod(shape)))
    chex.assert_trees_all_equal(restore(flat), kernel)
    # Column c holds exactly channel c's entries.
    lo, _ = channels.channel_range(kernel, shape)
    chex.assert_trees_all_equal(flat.reshape(-1, flat.shape[-1]).min(axis=0),
                                lo.reshape(-1))

  def test_bad_shape_names_the_convention(self):
    with self.assertRaisesRegex(ValueError, r"\(4,\) does not broadcast"):
      channels.channel_range(jnp.ones((3, 5)), (4,))


if __name__ == "__main__":
  absltest.main()
