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
