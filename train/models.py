"""Full-precision ResNets for GDNSQ: CIFAR ResNet-20, ResNet-18, digits.

The models are plain Flax Linen (``nn.Conv``, ``nn.Dense``, ``nn.BatchNorm``,
``nn.relu``), NHWC, with no quantizer code: the library quantizes them by
intercepting the ``nn.Conv`` / ``nn.Dense`` calls and matching module paths,
so the module names below are API:

* ``stem_conv``, ``stem_bn`` -- the stem;
* ``stage{i}_block{j}`` (1-based, as pytorchcv's ``stage1.unit1``) holding
  ``conv1``, ``bn1``, ``conv2``, ``bn2`` and, where the shape changes,
  ``shortcut_conv``, ``shortcut_bn`` (1x1 projection);
* ``classifier`` -- the final ``nn.Dense``.

One :class:`ResNet` class is written once; :class:`ResNet20` (pytorchcv
``resnet20_cifar10``, docs/method.md §10, D7), :class:`ResNet18`
(torchvision ``resnet18``) and :class:`DigitsResNet` (28x28x1 digits, trains
in minutes on a CPU) are configurations of it.

Conventions (chosen to match the PyTorch originals, so weights map one to one):

* Padding is explicit and symmetric, ``k // 2`` on each side (PyTorch), not
  ``'SAME'``: for stride 2 on an even input, ``'SAME'`` pads (0, 1) and would
  shift every strided conv by one pixel relative to PyTorch.
* BatchNorm: momentum 0.9 and epsilon 1e-5 (PyTorch's 0.1 / 1e-5 in Flax
  terms), scale 1, bias 0. Flax keeps the biased batch variance in
  ``batch_stats['var']`` (PyTorch stores the unbiased one); with axis_name set
  the batch mean and mean square are averaged over that axis
  (docs/method.md D15).
* Conv kernels: He/Kaiming normal, ``fan_out`` mode, untruncated, as
  torchvision's ``kaiming_normal_(mode='fan_out', nonlinearity='relu')``:
  ``std = sqrt(2 / (kh * kw * out_channels))``.
* Classifier: PyTorch's default ``nn.Linear`` kernel init,
  ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``; bias 0.
* ``dtype`` is the computation dtype (e.g. bfloat16); parameters and batch
  statistics are float32 and the logits are returned as float32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from train import cpu_conv as fast_conv

ConvOp = Callable[..., jax.Array] | None
"""A ``lax.conv_general_dilated``-compatible op for ``nn.Conv`` (None: XLA's)."""

__all__ = [
    "BasicBlock",
    "DigitsResNet",
    "MODELS",
    "ResNet",
    "ResNet18",
    "ResNet20",
    "STEMS",
    "batch_norm",
    "conv",
    "get_model",
    "nhwc_images",
]

STEMS = ("cifar", "imagenet")
"""Stems: ``cifar`` 3x3/1 conv; ``imagenet`` 7x7/2 conv + 3x3/2 max pool."""

conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
"""He/Kaiming normal, fan_out mode (torchvision ResNet init)."""

dense_kernel_init = nn.initializers.variance_scaling(
    1.0 / 3.0, "fan_in", "uniform"
)
"""PyTorch ``nn.Linear`` default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""


def conv(
    features: int, kernel_size: int, strides: int, dtype: Any, name: str,
    conv_op: ConvOp = None, groups: int = 1,
) -> nn.Conv:
  """A bias-free conv with PyTorch padding ``kernel_size // 2`` on each side.

  He-normal ``fan_out`` kernel init; ``groups`` is ``feature_group_count``
  (the input channels for a depthwise conv).
  """
  pad = kernel_size // 2
  return nn.Conv(
      features,
      (kernel_size, kernel_size),
      strides=(strides, strides),
      padding=((pad, pad), (pad, pad)),
      feature_group_count=groups,
      use_bias=False,
      dtype=dtype,
      kernel_init=conv_kernel_init,
      conv_general_dilated=conv_op,
      name=name,
  )


def batch_norm(
    train: bool, axis_name: str | None, dtype: Any, name: str
) -> nn.BatchNorm:
  """BatchNorm with PyTorch defaults (its momentum 0.1 is 0.9 here)."""
  return nn.BatchNorm(
      use_running_average=not train,
      momentum=0.9,
      epsilon=1e-5,
      axis_name=axis_name,
      dtype=dtype,
      name=name,
  )


def nhwc_images(x: jax.typing.ArrayLike) -> jax.Array:
  """``x`` as an array; a ValueError unless it has 4 dims (NHWC images)."""
  x = jnp.asarray(x)
  if x.ndim != 4:
    raise ValueError(
        f"expected NHWC images (4 dims), got shape {x.shape}; add the batch "
        "and channel axes"
    )
  return x


class BasicBlock(nn.Module):
  """Basic block: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)).

  conv1 is 3x3 with stride ``strides``, conv2 is 3x3 with stride 1. The
  shortcut is the identity, or ``shortcut_bn(shortcut_conv(x))`` (1x1 conv with
  stride ``strides``) when the stride is not 1 or the channel count changes
  (He et al. 2016 option B; pytorchcv and torchvision alike).

  Attributes:
    features: output channels of both 3x3 convs.
    strides: stride of conv1 and of the projection shortcut.
    axis_name: data-parallel axis over which BatchNorm averages statistics.
    dtype: computation dtype.
    conv_general_dilated: convolution op of the convs (see :class:`ResNet`).
  """

  features: int
  strides: int = 1
  axis_name: str | None = None
  dtype: Any = jnp.float32
  conv_general_dilated: ConvOp = fast_conv.conv_general_dilated

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Applies the block to NHWC ``x``; ``train`` uses batch statistics."""
    y = conv(self.features, 3, self.strides, self.dtype, "conv1",
             self.conv_general_dilated)(x)
    y = batch_norm(train, self.axis_name, self.dtype, "bn1")(y)
    y = nn.relu(y)
    y = conv(self.features, 3, 1, self.dtype, "conv2",
             self.conv_general_dilated)(y)
    y = batch_norm(train, self.axis_name, self.dtype, "bn2")(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = conv(self.features, 1, self.strides, self.dtype,
               "shortcut_conv", self.conv_general_dilated)(x)
      x = batch_norm(train, self.axis_name, self.dtype, "shortcut_bn")(x)
    return nn.relu(y + x)


class ResNet(nn.Module):
  """A ResNet of basic blocks: stem, stages, global average pool, classifier.

  Stage ``i`` (1-based) has ``blocks_per_stage[i-1]`` blocks of width
  ``stage_widths[i-1]``; the first block of every stage after the first has
  stride 2.

  Attributes:
    num_classes: number of logits.
    stage_widths: channels of each stage, e.g. ``(16, 32, 64)``.
    blocks_per_stage: basic blocks in each stage, same length as stage_widths.
    stem_width: channels of the stem conv.
    stem: one of :data:`STEMS`.
    axis_name: data-parallel axis name for synchronised BatchNorm (None: local).
    dtype: computation dtype; params stay float32, logits are float32.
    conv_general_dilated: the convolution op of every conv. The default,
      :func:`train.cpu_conv.conv_general_dilated`, is XLA's convolution on
      GPU/TPU and a faster custom-VJP formulation on CPU; None uses
      ``lax.conv_general_dilated`` directly.
  """

  num_classes: int
  stage_widths: Sequence[int]
  blocks_per_stage: Sequence[int]
  stem_width: int
  stem: str
  axis_name: str | None = None
  dtype: Any = jnp.float32
  conv_general_dilated: ConvOp = fast_conv.conv_general_dilated

  def _check_config(self) -> None:
    """Raises ValueError for an inconsistent configuration."""
    if self.stem not in STEMS:
      raise ValueError(
          f"unknown stem {self.stem!r}; choose one of: {', '.join(STEMS)}"
      )
    if len(self.stage_widths) != len(self.blocks_per_stage):
      raise ValueError(
          f"stage_widths {tuple(self.stage_widths)} and blocks_per_stage "
          f"{tuple(self.blocks_per_stage)} must have the same length (one "
          "entry per stage)"
      )
    if not self.stage_widths or min(self.blocks_per_stage) < 1:
      raise ValueError(
          f"blocks_per_stage {tuple(self.blocks_per_stage)} must name at least "
          "one stage and give every stage at least one block"
      )

  @nn.compact
  def __call__(self, x: jax.typing.ArrayLike, train: bool = False) -> jax.Array:
    """Computes logits.

    Args:
      x: images, NHWC, shape (batch, height, width, channels).
      train: use batch statistics and update ``batch_stats`` (call ``apply``
        with ``mutable=['batch_stats']``); False uses the running statistics.

    Returns:
      float32 logits of shape (batch, num_classes).

    Raises:
      ValueError: for an inconsistent configuration or a non-4D input.
    """
    self._check_config()
    x = nhwc_images(x)
    if self.stem == "imagenet":
      x = conv(self.stem_width, 7, 2, self.dtype, "stem_conv",
               self.conv_general_dilated)(x)
    else:
      x = conv(self.stem_width, 3, 1, self.dtype, "stem_conv",
               self.conv_general_dilated)(x)
    x = batch_norm(train, self.axis_name, self.dtype, "stem_bn")(x)
    x = nn.relu(x)
    if self.stem == "imagenet":
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for i, (width, blocks) in enumerate(
        zip(self.stage_widths, self.blocks_per_stage), start=1
    ):
      for j in range(1, blocks + 1):
        strides = 2 if i > 1 and j == 1 else 1
        x = BasicBlock(
            width,
            strides=strides,
            axis_name=self.axis_name,
            dtype=self.dtype,
            conv_general_dilated=self.conv_general_dilated,
            name=f"stage{i}_block{j}",
        )(x, train=train)
    # Global average pool, accumulated in float32 whatever the compute dtype.
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    x = nn.Dense(
        self.num_classes,
        dtype=self.dtype,
        kernel_init=dense_kernel_init,
        name="classifier",
    )(x)
    return x.astype(jnp.float32)


class ResNet20(ResNet):
  """CIFAR ResNet-20, pytorchcv ``resnet20_cifar10`` (docs/method.md D7).

  3x3 stem (16 ch), 3 stages x 3 basic blocks (16/32/64 ch), 1x1 projection
  shortcuts in the first block of stages 2 and 3; 272,474 parameters for 10
  classes (BatchNorm scale/bias included).
  """

  num_classes: int = 10
  stage_widths: Sequence[int] = (16, 32, 64)
  blocks_per_stage: Sequence[int] = (3, 3, 3)
  stem_width: int = 16
  stem: str = "cifar"


class ResNet18(ResNet):
  """ImageNet ResNet-18, torchvision ``resnet18`` layout (docs/method.md D7).

  7x7/2 stem (64 ch) + 3x3/2 max pool, 4 stages x 2 basic blocks
  (64/128/256/512 ch), 1x1/2 projection in the first block of stages 2-4;
  11,689,512 parameters for 1000 classes.
  """

  num_classes: int = 1000
  stage_widths: Sequence[int] = (64, 128, 256, 512)
  blocks_per_stage: Sequence[int] = (2, 2, 2, 2)
  stem_width: int = 64
  stem: str = "imagenet"


class DigitsResNet(ResNet):
  """Small ResNet for 28x28x1 digits: 3x3 stem (16 ch), 3 stages x 1 block.

  Stage widths 16/32/64 with strides 1/2/2 (28 -> 28 -> 14 -> 7); 1x1
  projections where the shape changes. Trains in minutes on two CPU cores.
  """

  num_classes: int = 10
  stage_widths: Sequence[int] = (16, 32, 64)
  blocks_per_stage: Sequence[int] = (1, 1, 1)
  stem_width: int = 16
  stem: str = "cifar"


MODELS: dict[str, type[ResNet]] = {
    "digits_resnet": DigitsResNet,
    "resnet18": ResNet18,
    "resnet20": ResNet20,
}
"""Model registry used by :func:`get_model` (config key ``model.name``)."""


def get_model(name: str, num_classes: int, **kwargs: Any) -> ResNet:
  """Builds a registered model.

  Args:
    name: one of the keys of :data:`MODELS`.
    num_classes: number of logits.
    **kwargs: further attributes of :class:`ResNet` (``axis_name``,
      ``dtype``, ``stage_widths``, ...).

  Returns:
    The (unbound) Flax module.

  Raises:
    ValueError: if ``name`` is not registered.
  """
  if name not in MODELS:
    raise ValueError(
        f"unknown model {name!r}; choose one of: {', '.join(sorted(MODELS))}"
    )
  return MODELS[name](num_classes=num_classes, **kwargs)
