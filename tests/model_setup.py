"""Shared helpers of the model tests (ResNets, MobileNetV2, ViT)."""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np


def abstract_variables(model, shape=(1, 28, 28, 1)):
  """The shapes of ``model.init`` on zeros of ``shape`` (nothing allocated)."""
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))


def param_count(tree) -> int:
  """The number of entries of every leaf of ``tree``."""
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def assert_gradients_finite_and_nonzero(test, grads) -> None:
  """Every gradient leaf is finite and somewhere non-zero (named on failure)."""
  for path, g in flax.traverse_util.flatten_dict(grads).items():
    test.assertTrue(bool(jnp.all(jnp.isfinite(g))), msg=str(path))
    test.assertGreater(float(jnp.max(jnp.abs(g))), 0.0, msg=str(path))
