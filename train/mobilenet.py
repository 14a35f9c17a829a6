"""A full-precision MobileNetV2 (Sandler et al. 2018) sized for 28x28x1 digits.

Plain Flax Linen (``nn.Conv`` with and without ``feature_group_count``,
``nn.BatchNorm``, ReLU6, ``nn.Dense``), NHWC, no quantizer code: the library
quantizes it by intercepting the layer calls and matching module paths, so
the module names are API:

* ``stem_conv``, ``stem_bn`` -- the 3x3 stem;
* ``block{k}`` (1-based, numbered through all stages) -- an inverted
  residual block holding ``expand`` (1x1 conv, absent when the expansion is
  1), ``expand_bn``, ``depthwise`` (3x3 conv with one group per channel:
  kernel ``(3, 3, 1, C)``), ``depthwise_bn``, ``project`` (1x1 linear
  bottleneck) and ``project_bn``;
* ``head_conv``, ``head_bn`` -- the final 1x1 conv;
* ``classifier`` -- the final ``nn.Dense``.

Placement: under the default rules (docs/method.md §5, D6) every 1x1 conv
here would stay FP, since the "1x1 stays FP" rule exists for ResNet
projection shortcuts; in MobileNetV2 the pointwise convs hold most of the
weights and MACs, so the ``digits_mobilenet_v2`` preset sets
``quant.quantize_1x1=True``.

Conventions are those of :mod:`train.models`: symmetric padding ``k // 2``,
He/Kaiming-normal ``fan_out`` conv init (torchvision's MobileNetV2 init; for
the depthwise kernel ``fan_out = 9 * C``), BatchNorm momentum 0.9 and
epsilon 1e-5, PyTorch's ``nn.Linear`` init for the classifier, float32
params and batch statistics, ``dtype`` the computation dtype, float32
logits. torchvision's classifier dropout is left out (the digits train for
a few epochs only, and the program passes no dropout RNG).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Union

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from train import cpu_conv as fast_conv
from train import models

__all__ = ["InvertedResidual", "MODELS", "MobileNetV2", "conv_general_dilated"]

_NHWC = ("NHWC", "HWIO", "NHWC")


def conv_general_dilated(
    lhs: jax.typing.ArrayLike,
    rhs: jax.typing.ArrayLike,
    window_strides: Sequence[int],
    padding: Union[str, Sequence[tuple[int, int]]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> jax.Array:
  """:func:`train.cpu_conv.conv_general_dilated` plus a CPU depthwise path.

  XLA:CPU runs a depthwise convolution (``feature_group_count`` = input
  channels, HWIO kernel ``(kh, kw, 1, C)``) as a grouped convolution whose
  weight gradient is very slow: a MobileNetV2 train step on the digits took
  8x a digits-ResNet step. Where :func:`train.cpu_conv.fast_conv_enabled`
  (CPU backend), an NHWC depthwise conv without dilation is computed here as
  ``y = sum_ij x_ij * W[i, j, 0]`` over the ``kh * kw`` strided windows
  ``x_ij`` of the padded input -- elementwise products that XLA fuses, in
  the forward pass and in both gradients (plain autodiff). Anything else
  goes to :func:`train.cpu_conv.conv_general_dilated` unchanged.

  Args: as ``lax.conv_general_dilated``.

  Returns:
    The convolution: lax's shape and dtype, equal up to float rounding.
  """
  geometry = None
  if fast_conv.fast_conv_enabled():
    geometry = fast_conv.plain_conv_geometry(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
        dimension_numbers, feature_group_count, batch_group_count,
        depthwise=True)
  if geometry is None:
    return fast_conv.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, precision=precision,
        preferred_element_type=preferred_element_type)
  (sh, sw), pads = geometry
  lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
  out_dtype = preferred_element_type or lhs.dtype
  sum_dtype = jnp.promote_types(out_dtype, jnp.float32)
  x = jnp.pad(lhs, ((0, 0), *pads, (0, 0))).astype(sum_dtype)
  kh, kw = rhs.shape[:2]
  n, hp, wp, c = x.shape
  ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
  y = None
  for i in range(kh):
    for j in range(kw):
      window = lax.slice(x, (0, i, j, 0),
                         (n, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c),
                         (1, sh, sw, 1))
      term = window * rhs[i, j, 0].astype(sum_dtype)
      y = term if y is None else y + term
  return y.astype(out_dtype)


class InvertedResidual(nn.Module):
  """MobileNetV2 block: expand (1x1) -> depthwise (3x3) -> project (1x1).

  ``y = project_bn(project(relu6(depthwise_bn(depthwise(relu6(expand_bn(
  expand(x))))))))``, plus ``x`` when ``strides == 1`` and the channel count
  is unchanged. The projection has no activation (the linear bottleneck).

  Attributes:
    features: output channels.
    expansion: hidden channels are ``expansion * input channels``; 1 drops
      the expand conv (the first block of MobileNetV2).
    strides: stride of the depthwise conv.
    axis_name: data-parallel axis over which BatchNorm averages statistics.
    dtype: computation dtype.
    conv_general_dilated: convolution op of the convs (default:
      :func:`conv_general_dilated`; None: ``lax.conv_general_dilated``).
  """

  features: int
  expansion: int
  strides: int = 1
  axis_name: str | None = None
  dtype: Any = jnp.float32
  conv_general_dilated: models.ConvOp = conv_general_dilated

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Applies the block to NHWC ``x``; ``train`` uses batch statistics."""
    op = self.conv_general_dilated
    hidden = x.shape[-1] * self.expansion
    y = x
    if self.expansion != 1:
      y = models.conv(hidden, 1, 1, self.dtype, "expand", op)(y)
      y = models.batch_norm(train, self.axis_name, self.dtype,
                            "expand_bn")(y)
      y = nn.relu6(y)
    y = models.conv(hidden, 3, self.strides, self.dtype, "depthwise", op,
                    groups=hidden)(y)
    y = models.batch_norm(train, self.axis_name, self.dtype,
                          "depthwise_bn")(y)
    y = nn.relu6(y)
    y = models.conv(self.features, 1, 1, self.dtype, "project", op)(y)
    y = models.batch_norm(train, self.axis_name, self.dtype,
                          "project_bn")(y)
    if self.strides == 1 and x.shape[-1] == self.features:
      y = y + x
    return y


class MobileNetV2(nn.Module):
  """MobileNetV2: stem, stages of inverted residuals, 1x1 head, pool, dense.

  Stage ``i`` (1-based) has ``blocks_per_stage[i-1]`` blocks of
  ``stage_widths[i-1]`` output channels and expansion ``expansions[i-1]``;
  its first block has stride ``stage_strides[i-1]``, the others stride 1.
  The defaults are sized for 28x28x1 digits (stem 28 -> 14, stages 14 ->
  7 -> 4 -> 4): torchvision's ``mobilenet_v2`` table with a stride-2 stem of
  16 channels instead of 32, the first four stages at widths 16 / 24 / 32 /
  64, expansion 4 instead of 6 and a 128-channel head instead of 1280: 6
  blocks, hence 6 depthwise and 12 pointwise (1x1) convs besides the stem;
  50,410 parameters for 10 classes. (A stride-1 stem made the CPU train
  step about 9x slower for no need on the digits.)

  Attributes:
    num_classes: number of logits.
    stage_widths: output channels of each stage.
    blocks_per_stage: blocks in each stage.
    stage_strides: stride of the first block of each stage.
    expansions: expansion factor of each stage's blocks.
    stem_width: channels of the 3x3 stem conv.
    stem_strides: stride of the stem conv.
    head_width: channels of the final 1x1 conv.
    axis_name: data-parallel axis name for synchronised BatchNorm.
    dtype: computation dtype; params stay float32, logits are float32.
    conv_general_dilated: the convolution op of every conv. The default,
      :func:`conv_general_dilated`, is :mod:`train.cpu_conv`'s op with a
      shifted-window depthwise path on CPU; None uses
      ``lax.conv_general_dilated`` directly.
  """

  num_classes: int = 10
  stage_widths: Sequence[int] = (16, 24, 32, 64)
  blocks_per_stage: Sequence[int] = (1, 2, 2, 1)
  stage_strides: Sequence[int] = (1, 2, 2, 1)
  expansions: Sequence[int] = (1, 4, 4, 4)
  stem_width: int = 16
  stem_strides: int = 2
  head_width: int = 128
  axis_name: str | None = None
  dtype: Any = jnp.float32
  conv_general_dilated: models.ConvOp = conv_general_dilated

  def _check_config(self) -> None:
    """Raises ValueError for an inconsistent configuration."""
    lengths = {len(self.stage_widths), len(self.blocks_per_stage),
               len(self.stage_strides), len(self.expansions)}
    if len(lengths) != 1:
      raise ValueError(
          f"stage_widths {tuple(self.stage_widths)}, blocks_per_stage "
          f"{tuple(self.blocks_per_stage)}, stage_strides "
          f"{tuple(self.stage_strides)} and expansions "
          f"{tuple(self.expansions)} must have the same length (one entry "
          "per stage)")
    if (not self.stage_widths or min(self.blocks_per_stage) < 1
        or min(self.expansions) < 1 or min(self.stage_strides) < 1):
      raise ValueError(
          "MobileNetV2 needs at least one stage, and every stage at least "
          f"one block, expansion >= 1 and stride >= 1; got blocks_per_stage "
          f"{tuple(self.blocks_per_stage)}, expansions "
          f"{tuple(self.expansions)}, stage_strides "
          f"{tuple(self.stage_strides)}")

  @nn.compact
  def __call__(self, x: jax.typing.ArrayLike, train: bool = False) -> jax.Array:
    """Float32 logits ``(batch, num_classes)`` of NHWC images ``x``.

    Args, Returns and Raises as :meth:`train.models.ResNet.__call__`.
    """
    self._check_config()
    x = models.nhwc_images(x)
    op = self.conv_general_dilated
    x = models.conv(self.stem_width, 3, self.stem_strides, self.dtype,
                    "stem_conv", op)(x)
    x = models.batch_norm(train, self.axis_name, self.dtype, "stem_bn")(x)
    x = nn.relu6(x)
    k = 0
    for width, blocks, strides, expansion in zip(
        self.stage_widths, self.blocks_per_stage, self.stage_strides,
        self.expansions):
      for j in range(blocks):
        k += 1
        x = InvertedResidual(
            width, expansion, strides=strides if j == 0 else 1,
            axis_name=self.axis_name, dtype=self.dtype,
            conv_general_dilated=op, name=f"block{k}")(x, train=train)
    x = models.conv(self.head_width, 1, 1, self.dtype, "head_conv", op)(x)
    x = models.batch_norm(train, self.axis_name, self.dtype, "head_bn")(x)
    x = nn.relu6(x)
    # Global average pool, accumulated in float32 whatever the compute dtype.
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype,
                 kernel_init=models.dense_kernel_init, name="classifier")(x)
    return x.astype(jnp.float32)


MODELS: dict[str, type[nn.Module]] = {"mobilenet_v2": MobileNetV2}
"""Registered under ``model.name`` (see ``train.train_lib.build_model``)."""
