"""A two-layer quantized net with exactly known codes, for the export tests."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gdnsq_jax.export import exporter as export_lib
from gdnsq_jax import interception

EVAL = {"train": False}


class TwoLayerNet(nn.Module):
  """conv 3x3 (2 -> 3 channels, zero padding 1) -> relu -> dense (48 -> 5)."""

  @nn.compact
  def __call__(self, x, train=False):
    del train
    x = nn.Conv(3, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                name="conv")(x)
    x = nn.relu(x).reshape((x.shape[0], -1))
    return nn.Dense(5, name="dense")(x)


@functools.lru_cache(maxsize=None)
def two_layer_setup():
  """A W3/A2 conv and a W1/A4 dense with hand-chosen, exactly known codes."""
  model = TwoLayerNet()
  sample = jax.ShapeDtypeStruct((1, 4, 4, 2), jnp.float32)
  qmodel = interception.quantize_model(
      model, sample, rules={"quantize_stem": True, "quantize_classifier": True},
      train=False)
  rng = np.random.default_rng(0)
  conv_codes = rng.integers(0, 8, (3, 3, 2, 3))
  conv_codes[0, 0, 0, :], conv_codes[1, 1, 1, 0] = 0, 7  # channel min 0; max 7
  conv_zero = np.array([-0.5, -0.25, -0.375], np.float32)
  dense_codes = rng.integers(0, 2, (48, 5))
  dense_codes[0], dense_codes[1] = 0, 1
  dense_zero = np.array([-0.5, -0.25, 0.0, 0.25, -1.0], np.float32)
  quantizer = lambda log2_step, log2_range, low: {
      "log2_step": np.float32(log2_step), "log2_range": np.float32(log2_range),
      "clamp_low": np.float32(low)}
  params = {
      "conv": {
          "kernel": (conv_zero + 0.125 * conv_codes).astype(np.float32),
          "log2_step": np.full((3,), -3.0, np.float32),
          # s = 1/4, q = 1: levels round(4 - 1) + 1 = 4; b = -0.5 != 0, so
          # the zero padding (0, not b) matters.
          "input_quantizer": quantizer(-2.0, 0.0, -0.5)},
      "dense": {
          "kernel": (dense_zero + 0.5 * dense_codes).astype(np.float32),
          "bias": np.array([0.1, -0.2, 0.3, 0.0, 0.5], np.float32),
          "log2_step": np.full((5,), -1.0, np.float32),
          "input_quantizer": quantizer(-3.0, 1.0, 0.0)},  # 16 levels
  }
  x = jax.random.uniform(jax.random.key(3), (6, 4, 4, 2), minval=-1.0,
                         maxval=1.5)
  variables = {"params": params}
  export = export_lib.export_model(qmodel, variables, (4, 4, 2),
                                   apply_kwargs=EVAL)
  return model, qmodel, variables, x, conv_codes, dense_codes, export
