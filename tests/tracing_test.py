"""Tests of gdnsq_jax.tracing: the one layer tracer (placement and export).
"""

from __future__ import annotations

from absl.testing import absltest
import flax.linen as nn
import jax
import jax.numpy as jnp

from gdnsq_jax import layers
from gdnsq_jax import tracing
from tests import export_setup
from train import models

EVAL = export_setup.EVAL


class TracingTest(absltest.TestCase):

  def test_finds_batch_norm_consuming_each_conv(self):
    model = models.ResNet20(num_classes=10)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3))))
    traced = {t.path: t for t in tracing.trace_layers(model, shapes, (8, 8, 3),
                                                      apply_kwargs=EVAL)}
    self.assertEqual(traced["stage1_block1/conv1"].batch_norm,
                     "stage1_block1/bn1")
    self.assertEqual(traced["stage2_block1/shortcut_conv"].batch_norm,
                     "stage2_block1/shortcut_bn")
    self.assertIsNone(traced["classifier"].batch_norm)
    self.assertEqual(traced["stem_conv"].macs, 8 * 8 * 16 * 27)
    # In training mode BatchNorm uses batch statistics: nothing to fold.
    training = tracing.trace_layers(model, shapes, (8, 8, 3),
                                    apply_kwargs={"train": True})
    self.assertTrue(all(t.batch_norm is None for t in training))


class _Twice(nn.Module):
  """A dense called twice, then a conv, an explicit QuantDense and a head."""

  @nn.compact
  def __call__(self, x, train=False):
    del train
    shared = nn.Dense(4, name="shared")
    x = shared(shared(x[..., :4]))
    x = nn.Conv(4, (1,), name="conv")(x[:, None, :])[:, 0]
    x = layers.QuantDense(4, name="explicit")(x)
    return nn.Dense(2, name="head")(x)


class TraceCallsTest(absltest.TestCase):

  def test_init_trace_records_first_call_order_last_call_and_explicit(self):
    x = jax.ShapeDtypeStruct((3, 6), jnp.float32)
    traced = tracing.trace_calls(_Twice(), (x,), {"train": False})
    self.assertEqual([t.path for t in traced],
                     ["shared", "conv", "explicit", "head"])
    self.assertEqual([t.last_call for t in traced], [1, 2, 3, 4])
    self.assertEqual([t.explicit for t in traced], [False, False, True, False])
    self.assertEqual([t.kind for t in traced],
                     ["dense", "conv", "dense", "dense"])
    self.assertEqual(traced[0].kernel_shape, (4, 4))
    # MACs per example: the dense's 4 outputs x 4 inputs; the conv's 1x1x4.
    self.assertEqual(traced[0].macs, 16)
    self.assertEqual(traced[1].macs, 16)

  def test_apply_trace_with_variables_matches_init_trace(self):
    model = models.ResNet20(num_classes=10)
    x = jnp.zeros((1, 8, 8, 3))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    by_init = tracing.trace_calls(model, (x,), EVAL)
    by_apply = tracing.trace_calls(model, (x,), EVAL, variables=shapes)
    self.assertEqual([(t.path, t.kernel_shape, t.macs) for t in by_init],
                     [(t.path, t.kernel_shape, t.macs) for t in by_apply])
    self.assertLen(by_init, 22)


if __name__ == "__main__":
  absltest.main()
