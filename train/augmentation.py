"""Image preprocessing: train augmentation and normalisation, host and device.

docs/method.md §10: CIFAR train = reflect-pad 4 + random crop +
horizontal flip (``crop_flip``); digits/MNIST train = zero-pad 2 + random
crop, a shift of at most 2 px (``shift``); ImageNet train =
RandomResizedCrop + flip, eval = resize 256 + centre crop 224
(:func:`preprocess_imagenet`); then ``(x / 255 - mean) / std``
(:func:`normalize`).

One definition of each: :func:`apply_augmentation` and :func:`normalize`
take the array module, ``numpy`` in the host pipeline (the grain transforms
below) and ``jax.numpy`` inside jitted code (:mod:`train.device_data`). The
random parameters are drawn apart from their application, for the whole
global batch, by :func:`draw_augmentation` (a numpy ``Generator``) or
:func:`draw_augmentation_jax` (a JAX key) from the same ranges, so each
process applies its rows of one global draw.

The grain transforms (:class:`AugmentRows`, :class:`ImagenetCrop`,
:class:`Normalize`) work on batch elements ``{'image', 'label'}`` holding a
process's rows of a global batch; :mod:`train.input_pipeline` chains them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import grain
import numpy as np

__all__ = [
    "AUGMENTATIONS", "AugmentRows", "ImagenetCrop", "Normalize",
    "apply_augmentation", "augment", "draw_augmentation",
    "draw_augmentation_jax", "normalize", "preprocess_imagenet",
]

AUGMENTATIONS = ("crop_flip", "none", "random_resized_crop", "shift")
# Pad width and mode of the in-memory augmentations.
_PADDING = {"crop_flip": (4, "reflect"), "shift": (2, "constant")}


def normalize(images, mean: Sequence[float], std: Sequence[float], xp=np):
  """Scales uint8 images to [0, 1] and standardises each channel.

  Args:
    images: uint8 (..., C).
    mean, std: per-channel statistics of the [0, 1] images, length C.
    xp: the array module (``numpy``, or ``jax.numpy`` inside jit).

  Returns:
    float32 ``(images / 255 - mean) / std``.
  """
  mean, std = xp.asarray(mean, xp.float32), xp.asarray(std, xp.float32)
  return (images.astype(xp.float32) * xp.float32(1 / 255) - mean) / std


def draw_augmentation(augmentation: str, rng: np.random.Generator,
                      count: int) -> tuple[np.ndarray, np.ndarray]:
  """Random parameters of ``count`` examples for :func:`apply_augmentation`.

  Args:
    augmentation: ``crop_flip``, ``shift`` or ``none``.
    rng: the source of randomness.
    count: number of examples.

  Returns:
    ``(offsets, flips)``: int (count, 2) crop offsets ``(dy, dx)`` into the
    padded image, in ``[0, 2 * pad]``; bool (count,) flips (all False unless
    ``crop_flip``).
  """
  pad, _ = _PADDING.get(augmentation, (0, None))
  offsets = rng.integers(0, 2 * pad + 1, size=(count, 2))
  flips = rng.random(count) < 0.5
  return offsets, flips & (augmentation == "crop_flip")


def draw_augmentation_jax(augmentation: str, key, count: int):
  """:func:`draw_augmentation` from a JAX key (same ranges), for jitted code."""
  import jax  # pylint: disable=g-import-not-at-top

  pad, _ = _PADDING.get(augmentation, (0, None))
  offsets_key, flips_key = jax.random.split(key)
  offsets = jax.random.randint(offsets_key, (count, 2), 0, 2 * pad + 1)
  flips = jax.random.bernoulli(flips_key, 0.5, (count,))
  return offsets, flips & (augmentation == "crop_flip")


def apply_augmentation(augmentation: str, images, offsets, flips, xp=np):
  """Pads, crops each image at its offset (one gather), flips where asked.

  Args:
    augmentation: ``crop_flip`` (reflect-pad 4), ``shift`` (zero-pad 2) or
      ``none`` (images returned as they are).
    images: uint8 (N, H, W, C).
    offsets, flips: from :func:`draw_augmentation`, one row per image.
    xp: the array module (``numpy``, or ``jax.numpy`` inside jit).

  Returns:
    uint8 (N, H, W, C).
  """
  if augmentation == "none" or not len(images):
    return images
  pad, mode = _PADDING[augmentation]
  n, height, width, _ = images.shape
  padded = xp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=mode)
  rows = offsets[:, :1] + xp.arange(height)  # (n, H)
  cols = offsets[:, 1:] + xp.arange(width)  # (n, W)
  out = padded[xp.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
  return xp.where(flips[:, None, None, None], out[:, :, ::-1], out)


def augment(images: np.ndarray, augmentation: str,
            rng: np.random.Generator) -> np.ndarray:
  """Random train augmentation of a batch held in memory.

  Args:
    images: uint8 (N, H, W, C).
    augmentation: ``crop_flip`` (reflect-pad 4, random crop, flip with
      probability 1/2), ``shift`` (zero-pad 2, random crop) or ``none``.
    rng: the source of randomness (same state, same output).

  Returns:
    uint8 (N, H, W, C).
  """
  return apply_augmentation(
      augmentation, images, *draw_augmentation(augmentation, rng, len(images)))


def _crop_box(height: int, width: int, rng: np.random.Generator):
  """RandomResizedCrop box (top, left, h, w): area 8-100%, ratio 3/4-4/3.

  Ten tries; then the largest centred box whose ratio is clamped to range.
  """
  for _ in range(10):
    area = height * width * rng.uniform(0.08, 1.0)
    ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    w, h = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      return top, int(rng.integers(0, width - w + 1)), h, w
  ratio = min(max(width / height, 3 / 4), 4 / 3)
  w, h = min(width, round(height * ratio)), min(height, round(width / ratio))
  return (height - h) // 2, (width - w) // 2, h, w


def _decoded(image):
  """A PIL RGB image from uint8 (H, W, C) pixels or encoded bytes (JPEG...)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  if isinstance(image, (bytes, bytearray, memoryview)):
    import io  # pylint: disable=g-import-not-at-top
    decoded = Image.open(io.BytesIO(image))
    return decoded if decoded.mode == "RGB" else decoded.convert("RGB")
  image = np.asarray(image, np.uint8)
  image = np.repeat(image, 3, -1) if image.shape[-1] == 1 else image
  return Image.fromarray(image)


def preprocess_imagenet(image, size: int, train: bool,
                        rng: np.random.Generator) -> np.ndarray:
  """One ImageNet image, cropped and resized to ``size`` x ``size``.

  Train: RandomResizedCrop(size) + horizontal flip with probability 1/2;
  eval: Resize(size * 256/224) + CenterCrop(size). Bilinear resizing with
  PIL (the crop is resized straight from its box); grey images are repeated
  to 3 channels.

  Args:
    image: uint8 (H, W, C), C in {1, 3}, or encoded image bytes.
    size: output side.
    train: whether to draw the random crop (else the centre crop).
    rng: the source of randomness (unused for eval).

  Returns:
    uint8 (size, size, 3).
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top

  image = _decoded(image)
  width, height = image.size
  if train:
    top, left, h, w = _crop_box(height, width, rng)
    out = np.asarray(image.resize((size, size), Image.BILINEAR,
                                  box=(left, top, left + w, top + h)))
    return out[:, ::-1] if rng.random() < 0.5 else out
  short = round(size * 256 / 224)
  scale = short / min(height, width)
  h, w = round(height * scale), round(width * scale)
  out = np.asarray(image.resize((w, h), Image.BILINEAR))
  top, left = (h - size) // 2, (w - size) // 2
  return out[top:top + size, left:left + size]


@dataclasses.dataclass(frozen=True)
class AugmentRows(grain.transforms.RandomMap):
  """Grain transform: in-memory train augmentation of a process's rows.

  The parameters are drawn for the whole global batch of ``global_count``
  rows; rows ``[first, first + count)`` (this process's) are applied, so the
  processes' outputs tile the single-process batch.
  """

  augmentation: str
  first: int
  global_count: int

  def random_map(self, element: dict[str, Any],
                 rng: np.random.Generator) -> dict[str, Any]:
    offsets, flips = draw_augmentation(self.augmentation, rng,
                                       self.global_count)
    rows = slice(self.first, self.first + len(element["image"]))
    return {**element, "image": apply_augmentation(
        self.augmentation, element["image"], offsets[rows], flips[rows])}


@dataclasses.dataclass(frozen=True)
class ImagenetCrop(grain.transforms.RandomMap):
  """Grain transform: :func:`preprocess_imagenet` of each row (decoding it).

  ``element['image']`` is a list of raw images; the output stacks them as
  uint8 (rows, size, size, 3). Train rows draw from generators seeded for
  the whole global batch (row ``first + r`` of ``global_count``).
  """

  size: int
  train: bool
  first: int = 0
  global_count: int = 0

  def random_map(self, element: dict[str, Any],
                 rng: np.random.Generator) -> dict[str, Any]:
    seeds = rng.integers(0, 2**63, size=max(self.global_count, 1))
    images = np.zeros((len(element["image"]), self.size, self.size, 3),
                      np.uint8)
    for row, image in enumerate(element["image"]):
      row_rng = np.random.default_rng(seeds[self.first + row]
                                      if self.train else 0)
      images[row] = preprocess_imagenet(image, self.size, self.train, row_rng)
    return {**element, "image": images}


@dataclasses.dataclass(frozen=True)
class Normalize(grain.transforms.Map):
  """Grain transform: :func:`normalize` of ``element['image']``."""

  mean: tuple[float, ...]
  std: tuple[float, ...]

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    return {**element, "image": normalize(element["image"], self.mean,
                                          self.std)}
