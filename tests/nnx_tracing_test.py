"""Tests for gdnsq_jax.nnx_tracing: kinds, channel axes, call order, MACs, foldable BatchNorms."""

from __future__ import annotations

from absl.testing import absltest
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from gdnsq_jax import nnx_tracing
from gdnsq_jax import tracing
from tests import nnx_setup


def _arrays(model):
  """The model's state as numpy arrays (key data for PRNG keys)."""

  def to_numpy(x):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    return np.asarray(x)

  return jax.tree.map(to_numpy, nnx.to_pure_dict(nnx.state(model)))


class NnxTracingTest(absltest.TestCase):

  def test_cnn_layers_in_call_order_with_kinds_and_channels(self):
    model = nnx_setup.nnx_cnn()
    layers = nnx_tracing.trace_calls(model, (nnx_setup.normal((2, 8, 8, 3)),))
    self.assertEqual([l.path for l in layers],
                     ["stem", "depthwise", "body", "proj", "hidden", "head"])
    self.assertEqual({l.path: l.kind for l in layers}["depthwise"], "conv")
    self.assertEqual(layers[1].kernel_shape, (3, 3, 1, 4))
    self.assertEqual({l.channel_axes for l in layers}, {(3,), (1,)})
    self.assertEqual([l.last_call for l in layers], list(range(6)))

  def test_macs_equal_the_linen_tracer_on_the_same_architecture(self):
    x = nnx_setup.normal((1, 8, 8, 3))
    nnx_macs = {l.path: l.macs for l in nnx_tracing.trace_calls(
        nnx_setup.nnx_cnn(), (x,))}
    linen = nnx_setup.LinenCNN()
    linen_macs = {l.path: l.macs for l in tracing.trace_calls(
        linen, (x,), {"train": False})}
    self.assertEqual(nnx_macs, linen_macs)
    self.assertEqual(nnx_macs["depthwise"], 8 * 8 * 4 * 9)

  def test_attention_einsum_and_list_children(self):
    layers = {l.path: l for l in nnx_tracing.trace_calls(
        nnx_setup.nnx_vit(), (nnx_setup.normal((2, 8, 8, 1)),))}
    self.assertEqual(list(layers), [
        "patch", "attention/query", "attention/key", "attention/value",
        "attention/out", "mlp/0", "mlp/1", "head"])
    self.assertEqual(layers["attention/query"].kind, "dense_general")
    self.assertEqual(layers["attention/query"].kernel_shape, (8, 2, 4))
    self.assertEqual(layers["attention/query"].channel_axes, (1, 2))
    self.assertEqual(layers["attention/out"].channel_axes, (2,))
    self.assertEqual(layers["mlp/1"].kind, "einsum")
    self.assertEqual(layers["mlp/1"].channel_axes, (2,))  # 'e' reaches out
    self.assertEqual(layers["mlp/1"].macs, 4 * 2 * 8 * 8)

  def test_foldable_batch_norms_only_in_eval_mode(self):
    model = nnx_setup.nnx_cnn()
    x = nnx_setup.normal((2, 8, 8, 3))
    train = {l.path: l.batch_norm for l in nnx_tracing.trace_calls(
        model, (x,))}
    self.assertEqual(set(train.values()), {None})
    model.eval()
    folded = {l.path: l.batch_norm for l in nnx_tracing.trace_calls(
        model, (x,))}
    self.assertEqual(folded["stem"], "bn")
    self.assertEqual(folded["body"], "body_bn")
    self.assertIsNone(folded["depthwise"])

  def test_tracing_leaves_the_model_untouched(self):
    model = nnx_setup.nnx_cnn(dropout=0.5)
    before = _arrays(model)
    nnx_tracing.trace_calls(model, (jax.ShapeDtypeStruct((2, 8, 8, 3),
                                                         jnp.float32),))
    self.assertIs(type(model.stem), nnx.Conv)
    after = _arrays(model)
    jax.tree.map(np.testing.assert_array_equal, before, after)

  def test_unsupported_kinds_are_traced(self):

    class WithEmbed(nnx.Module):

      def __init__(self, rngs):
        self.embed = nnx.Embed(10, 4, rngs=rngs)
        self.up = nnx.ConvTranspose(4, 2, (2,), rngs=rngs)

      def __call__(self, tokens):
        return self.up(self.embed(tokens))

    layers = nnx_tracing.trace_calls(
        WithEmbed(nnx.Rngs(0)), (jnp.zeros((1, 3), jnp.int32),))
    self.assertEqual([(l.path, l.kind) for l in layers],
                     [("embed", "embed"), ("up", "conv_transpose")])


if __name__ == "__main__":
  absltest.main()
