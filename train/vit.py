"""A small full-precision Vision Transformer (Dosovitskiy et al. 2021) for digits.

Plain Flax Linen (``nn.Conv`` patch embedding, ``nn.LayerNorm``,
``nn.MultiHeadDotProductAttention``, ``nn.Dense``), no quantizer code; the
library quantizes it by intercepting the layer calls and matching module
paths, so the module names are API:

* ``patch_embedding`` -- a ``patch_size`` x ``patch_size`` conv with stride
  ``patch_size`` (the stem); ``position_embedding`` -- the learned
  ``(1, tokens, hidden_size)`` param added to the tokens (a ``cls_token``
  param too with ``pool='cls'``);
* ``encoder_block{i}`` (1-based), pre-LN: ``attention_norm``, ``attention``
  (its ``query`` / ``key`` / ``value`` / ``out`` projections are
  ``nn.DenseGeneral``), ``mlp_norm``, ``mlp_dense1`` (GELU), ``mlp_dense2``;
* ``encoder_norm`` -- the final LayerNorm; ``classifier`` -- the final
  ``nn.Dense``.

Conventions shared with :mod:`train.models`: PyTorch's ``nn.Linear`` init
of the classifier, float32 params, ``dtype`` the computation dtype, float32
logits, a ``train`` argument. Elsewhere the ViT's own: LeCun-normal patch
conv (the CNNs' He ``fan_out`` init made the tokens about 5x smaller than
the residual branches' outputs and cost 1.1 pp of validation accuracy on
the digits), Xavier-uniform encoder kernels, MLP biases ``N(0, 1e-6)``,
LayerNorm epsilon 1e-6, position embedding ``N(0, 0.02)``. There is no dropout and no BatchNorm, so ``train`` changes
nothing and the model has no ``batch_stats``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from train import cpu_conv as fast_conv
from train import models

__all__ = ["EncoderBlock", "MODELS", "POOLS", "ViT"]

POOLS = ("mean", "cls")
"""Token pooling before the classifier: mean of the tokens, or a cls token."""

_xavier = nn.initializers.xavier_uniform()


class EncoderBlock(nn.Module):
  """Pre-LN transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``.

  Attributes:
    num_heads: attention heads (``hidden_size`` must divide by it).
    mlp_dim: hidden width of the MLP.
    dtype: computation dtype.
  """

  num_heads: int
  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies the block to tokens ``x`` of shape (batch, tokens, hidden)."""
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="attention_norm")(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype, kernel_init=_xavier,
        deterministic=True, name="attention")(y, y)
    x = x + y
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="mlp_norm")(x)
    mlp_bias_init = nn.initializers.normal(1e-6)
    y = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=_xavier,
                 bias_init=mlp_bias_init, name="mlp_dense1")(y)
    y = nn.gelu(y)
    y = nn.Dense(x.shape[-1], dtype=self.dtype, kernel_init=_xavier,
                 bias_init=mlp_bias_init, name="mlp_dense2")(y)
    return x + y


class ViT(nn.Module):
  """ViT: patch embedding, position embedding, pre-LN encoder, pool, dense.

  The defaults are sized for 28x28x1 digits: 7x7 patches (16 tokens),
  hidden size 64, 2 blocks of 4 heads, MLP width 128, mean pooling (71,946
  parameters for 10 classes).

  Attributes:
    num_classes: number of logits.
    patch_size: side of the square patches; must divide the image sides.
    hidden_size: token width.
    num_layers: encoder blocks.
    num_heads: attention heads per block.
    mlp_dim: hidden width of each block's MLP.
    pool: one of :data:`POOLS`.
    dtype: computation dtype; params stay float32, logits are float32.
    conv_general_dilated: the convolution op of the patch embedding (see
      :class:`train.models.ResNet`).
  """

  num_classes: int = 10
  patch_size: int = 7
  hidden_size: int = 64
  num_layers: int = 2
  num_heads: int = 4
  mlp_dim: int = 128
  pool: str = "mean"
  dtype: Any = jnp.float32
  conv_general_dilated: models.ConvOp = fast_conv.conv_general_dilated

  def _check_config(self, image_shape: tuple[int, ...]) -> None:
    """Raises ValueError for an inconsistent configuration or image size."""
    if self.pool not in POOLS:
      raise ValueError(
          f"unknown pool {self.pool!r}; choose one of: {', '.join(POOLS)}")
    if self.hidden_size % self.num_heads:
      raise ValueError(
          f"hidden_size {self.hidden_size} must be a multiple of num_heads "
          f"{self.num_heads}")
    height, width = image_shape[1:3]
    if height % self.patch_size or width % self.patch_size:
      raise ValueError(
          f"patch_size {self.patch_size} must divide the image size "
          f"{height}x{width} (e.g. 4 or 7 for 28x28 digits)")

  @nn.compact
  def __call__(self, x: jax.typing.ArrayLike, train: bool = False) -> jax.Array:
    """Computes logits.

    Args:
      x: images, NHWC, shape (batch, height, width, channels).
      train: accepted for the program's interface; the ViT has no dropout or
        BatchNorm, so training and evaluation compute the same function.

    Returns:
      float32 logits of shape (batch, num_classes).

    Raises:
      ValueError: for an inconsistent configuration or a non-4D input.
    """
    del train  # No dropout, no batch statistics.
    x = models.nhwc_images(x)
    self._check_config(x.shape)
    p = self.patch_size
    x = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding="VALID",
                dtype=self.dtype, kernel_init=nn.initializers.lecun_normal(),
                conv_general_dilated=self.conv_general_dilated,
                name="patch_embedding")(x)
    n, h, w, c = x.shape
    x = x.reshape(n, h * w, c)
    if self.pool == "cls":
      cls = self.param("cls_token", nn.initializers.zeros, (1, 1, c))
      x = jnp.concatenate([jnp.broadcast_to(cls, (n, 1, c)).astype(x.dtype),
                           x], axis=1)
    position = self.param("position_embedding",
                          nn.initializers.normal(stddev=0.02),
                          (1, x.shape[1], c))
    x = x + position.astype(x.dtype)
    for i in range(1, self.num_layers + 1):
      x = EncoderBlock(self.num_heads, self.mlp_dim, dtype=self.dtype,
                       name=f"encoder_block{i}")(x)
    x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="encoder_norm")(x)
    # Pool in float32 whatever the compute dtype.
    x = x.astype(jnp.float32)
    x = x[:, 0] if self.pool == "cls" else jnp.mean(x, axis=1)
    x = nn.Dense(self.num_classes, dtype=self.dtype,
                 kernel_init=models.dense_kernel_init, name="classifier")(x)
    return x.astype(jnp.float32)


MODELS: dict[str, type[nn.Module]] = {"vit": ViT}
"""Registered under ``model.name`` (see ``train.train_lib.build_model``)."""
