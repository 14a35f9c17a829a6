"""Shared test models and data for the layer and interception tests."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gdnsq_jax import layers

class PlainCNN(nn.Module):
  """A plain Flax CNN: nothing of gdnsq_jax in its definition."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(4, (3, 3), name="stem")(x)
    x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
    x = nn.relu(x)
    x = nn.Conv(6, (3, 3), strides=2, padding=((1, 1), (1, 1)), name="body")(x)
    x = nn.relu(x)
    x = nn.Conv(6, (1, 1), name="proj")(x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.relu(nn.Dense(5, name="hidden")(x))
    return nn.Dense(3, name="head")(x)


class ExplicitCNN(nn.Module):
  """PlainCNN with QuantConv / QuantDense written where the rules put them."""

  settings: layers.QuantSettings = layers.QuantSettings()

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(4, (3, 3), name="stem")(x)
    x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
    x = nn.relu(x)
    x = layers.QuantConv(
        6, (3, 3), strides=2, padding=((1, 1), (1, 1)),
        settings=self.settings, name="body",
    )(x)
    x = nn.relu(x)
    x = nn.Conv(6, (1, 1), name="proj")(x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.relu(layers.QuantDense(5, settings=self.settings, name="hidden")(x))
    return nn.Dense(3, name="head")(x)


COARSE_ACT = {"log2_step": -2.0, "log2_range": 1.0, "clamp_low": -0.25}


def coarse(params):
  """Sets every conv / dense quantizer to a coarse grid (rounding visible).

  Weights: step 2^-3. Input quantizers: step 1/4, grid width 2, clamp low
  -1/4, i.e. 8 levels on [-0.25, 1.5].
  """
  def set_leaf(path, v):
    names = [str(getattr(k, "key", k)) for k in path]
    if names[-1] == "log2_step":
      return jnp.full_like(v, -2.0 if "input_quantizer" in names else -3.0)
    if names[-1] == "log2_range":
      return jnp.full_like(v, 1.0)
    if names[-1] == "clamp_low":
      return jnp.full_like(v, -0.25)
    return v
  return jax.tree_util.tree_map_with_path(set_leaf, params)


def normal(shape, seed=0):
  """Standard normal float32 data (numpy: no per-shape XLA compile)."""
  return jnp.asarray(
      np.random.default_rng(seed).normal(size=shape), jnp.float32
  )


def variables(init_fn, *args, seed=0, **kwargs):
  """Variables with ``init_fn``'s tree, filled without running it.

  Weights are N(0, 0.5^2), BatchNorm statistics (0, 1) and quantizers get the
  coarse grid of :func:`coarse`; only the shapes come from ``init_fn``.
  """
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(init_fn, jax.random.key(0), *args, **kwargs)

  def fill(path, s):
    name = str(getattr(path[-1], "key", path[-1]))
    if name == "var":
      return jnp.ones(s.shape, s.dtype)
    if name == "mean":
      return jnp.zeros(s.shape, s.dtype)
    return jnp.asarray(0.5 * rng.normal(size=s.shape), s.dtype)

  variables = jax.tree_util.tree_map_with_path(fill, shapes)
  return dict(variables, params=coarse(variables["params"]))


class TinyViT(nn.Module):
  """A stock-layer ViT: patch conv, pre-LN blocks with MHA and an MLP."""

  hidden: int = 16
  heads: int = 2
  blocks: int = 2

  @nn.compact
  def __call__(self, x, train=False):
    del train
    x = nn.Conv(self.hidden, (4, 4), strides=4, padding="VALID",
                name="patch_embedding")(x)
    x = x.reshape(x.shape[0], -1, self.hidden)
    x = x + self.param("position_embedding", nn.initializers.normal(0.02),
                       (1,) + x.shape[1:])
    for i in range(1, self.blocks + 1):
      y = nn.LayerNorm(name=f"block{i}_norm1")(x)
      y = nn.MultiHeadDotProductAttention(
          num_heads=self.heads, name=f"block{i}_attention")(y, y)
      x = x + y
      y = nn.LayerNorm(name=f"block{i}_norm2")(x)
      y = nn.gelu(nn.Dense(2 * self.hidden, name=f"block{i}_mlp1")(y))
      x = x + nn.Dense(self.hidden, name=f"block{i}_mlp2")(y)
    x = nn.LayerNorm(name="final_norm")(x).mean(axis=1)
    return nn.Dense(10, name="head")(x)


class TinyMobileNet(nn.Module):
  """A stock-layer MobileNetV2: inverted residuals, depthwise convs, linear
  bottlenecks (the projection has no ReLU, so the next block's input and the
  residual sums are signed)."""

  @nn.compact
  def __call__(self, x, train=False):
    bn = lambda name: nn.BatchNorm(use_running_average=not train, name=name)
    x = nn.relu6(bn("stem_bn")(nn.Conv(8, (3, 3), strides=2, use_bias=False,
                                       name="stem")(x)))
    for i, (width, stride) in enumerate(((8, 1), (12, 2)), start=1):
      y = nn.relu6(bn(f"block{i}_expand_bn")(nn.Conv(
          4 * x.shape[-1], (1, 1), use_bias=False, name=f"block{i}_expand")(x)))
      y = nn.relu6(bn(f"block{i}_depthwise_bn")(nn.Conv(
          y.shape[-1], (3, 3), strides=stride, use_bias=False,
          feature_group_count=y.shape[-1], name=f"block{i}_depthwise")(y)))
      y = bn(f"block{i}_project_bn")(nn.Conv(
          width, (1, 1), use_bias=False, name=f"block{i}_project")(y))
      x = x + y if stride == 1 and width == x.shape[-1] else y
    x = nn.relu6(bn("head_bn")(nn.Conv(16, (1, 1), use_bias=False,
                                       name="head_conv")(x)))
    return nn.Dense(10, name="classifier")(x.mean(axis=(1, 2)))


def random_variables(init_fn, *args, seed=0, **kwargs):
  """FP variables of ``init_fn``'s tree: weights N(0, 0.3^2), BatchNorm
  scale N(1, 0.2^2), running variance U(0.5, 1.5) (no real init is run)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda *a: init_fn(*a, **kwargs),
                          jax.random.key(0), *args)

  def fill(path, s):
    names = [str(getattr(k, "key", k)) for k in path]
    if names[-1] == "var":
      return jnp.asarray(rng.uniform(0.5, 1.5, s.shape), s.dtype)
    if names[-1] == "scale":
      return jnp.asarray(rng.normal(1.0, 0.2, s.shape), s.dtype)
    return jnp.asarray(0.3 * rng.normal(size=s.shape), s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)
