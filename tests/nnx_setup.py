"""Shared NNX test models (and a Linen twin) for the nnx_* tests."""

from __future__ import annotations

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np


def normal(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape),
                     jnp.float32)


class NnxCNN(nnx.Module):
  """Stock NNX layers only: conv stem, BN, depthwise, strided, 1x1, dense."""

  def __init__(self, rngs: nnx.Rngs, dropout: float = 0.0):
    self.stem = nnx.Conv(3, 4, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(4, rngs=rngs)
    self.depthwise = nnx.Conv(4, 4, (3, 3), feature_group_count=4,
                              use_bias=False, rngs=rngs)
    self.body = nnx.Conv(4, 6, (3, 3), strides=2, padding=((1, 1), (1, 1)),
                         rngs=rngs)
    self.body_bn = nnx.BatchNorm(6, rngs=rngs)
    self.proj = nnx.Conv(6, 6, (1, 1), rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.hidden = nnx.Linear(6, 5, rngs=rngs)
    self.head = nnx.Linear(5, 3, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn(self.stem(x)))
    x = self.depthwise(x)
    x = nnx.relu(self.body_bn(self.body(x)))
    x = jnp.mean(self.proj(x), axis=(1, 2))
    x = nnx.relu(self.hidden(self.dropout(x)))
    return self.head(x)


class LinenCNN(nn.Module):
  """:class:`NnxCNN` in Linen, with the same module names (no dropout)."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(4, (3, 3), name="stem")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn")(x))
    x = nn.Conv(4, (3, 3), feature_group_count=4, use_bias=False,
                name="depthwise")(x)
    x = nn.Conv(6, (3, 3), strides=2, padding=((1, 1), (1, 1)),
                name="body")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train,
                             name="body_bn")(x))
    x = jnp.mean(nn.Conv(6, (1, 1), name="proj")(x), axis=(1, 2))
    x = nn.relu(nn.Dense(5, name="hidden")(x))
    return nn.Dense(3, name="head")(x)


class NnxViTBlock(nnx.Module):
  """Patch embedding, one pre-LN attention block with an MLP, classifier."""

  def __init__(self, rngs: nnx.Rngs, dim: int = 8, heads: int = 2):
    self.patch = nnx.Conv(1, dim, (4, 4), strides=4, rngs=rngs)
    self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(
        num_heads=heads, in_features=dim, decode=False, rngs=rngs)
    self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
    self.mlp = nnx.List([
        nnx.LinearGeneral(dim, (2, dim), rngs=rngs),
        nnx.Einsum("btkd,kde->bte", (2, dim, dim), (dim,), rngs=rngs),
    ])
    self.head = nnx.Linear(dim, 3, rngs=rngs)

  def __call__(self, x):
    x = self.patch(x)
    b, h, w, c = x.shape
    x = x.reshape(b, h * w, c)
    x = x + self.attention(self.norm1(x))
    x = x + self.mlp[1](nnx.gelu(self.mlp[0](self.norm2(x))))
    return self.head(jnp.mean(x, axis=1))


def nnx_cnn(seed: int = 0, dropout: float = 0.0) -> NnxCNN:
  return NnxCNN(nnx.Rngs(seed), dropout=dropout)


def nnx_vit(seed: int = 0) -> NnxViTBlock:
  return NnxViTBlock(nnx.Rngs(seed))


def warm_batch_stats(model: nnx.Module, x: jax.Array, steps: int = 3):
  """Moves BatchNorm running statistics off their init (train-mode calls)."""
  model.train()
  for _ in range(steps):
    model(x)
  model.eval()
