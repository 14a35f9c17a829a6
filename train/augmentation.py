"""Host-side image preprocessing: train augmentation and normalisation.

Method spec section 10, in numpy on the host: CIFAR train = reflect-pad 4 +
random crop + horizontal flip (``crop_flip``); digits/MNIST train = zero-pad
2 + random crop, a shift of at most 2 px (``shift``); ImageNet train =
RandomResizedCrop + flip, eval = resize 256 + centre crop 224
(:func:`preprocess_imagenet`); then ``(x / 255 - mean) / std``
(:func:`normalize`).

The random parameters of a batch held in memory are drawn apart from their
application (:func:`draw_augmentation`, :func:`apply_augmentation`), so
:mod:`train.input_pipeline` can draw them for the whole global batch and
apply each process's slice.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = [
    "AUGMENTATIONS", "apply_augmentation", "augment", "draw_augmentation",
    "normalize", "preprocess_imagenet",
]

AUGMENTATIONS = ("crop_flip", "none", "random_resized_crop", "shift")


def normalize(images: np.ndarray, mean: Sequence[float],
              std: Sequence[float]) -> np.ndarray:
  """Scales uint8 images to [0, 1] and standardises each channel.

  Args:
    images: uint8 (..., C).
    mean, std: per-channel statistics of the [0, 1] images, length C.

  Returns:
    float32 ``(images / 255 - mean) / std``.
  """
  mean, std = np.float32(mean), np.float32(std)
  return (images.astype(np.float32) * np.float32(1 / 255) - mean) / std


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
  pad = 4 if augmentation == "crop_flip" else 2
  offsets = rng.integers(0, 2 * pad + 1, size=(count, 2))
  flips = rng.random(count) < 0.5
  return offsets, flips & (augmentation == "crop_flip")


def apply_augmentation(augmentation: str, images: np.ndarray,
                       offsets: np.ndarray, flips: np.ndarray) -> np.ndarray:
  """Pads, crops each image at its offset (vectorised), flips where asked.

  Args:
    augmentation: ``crop_flip`` (reflect-pad 4), ``shift`` (zero-pad 2) or
      ``none`` (images returned as they are).
    images: uint8 (N, H, W, C).
    offsets, flips: from :func:`draw_augmentation`, one row per image.

  Returns:
    uint8 (N, H, W, C).
  """
  if augmentation == "none" or not len(images):
    return images
  pad, mode = (4, "reflect") if augmentation == "crop_flip" else (2, "constant")
  n, height, width, _ = images.shape
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=mode)
  rows = offsets[:, :1] + np.arange(height)  # (n, H)
  cols = offsets[:, 1:] + np.arange(width)  # (n, W)
  out = padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
  return np.where(flips[:, None, None, None], out[:, :, ::-1], out)


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


def preprocess_imagenet(image, size: int, train: bool,
                        rng: np.random.Generator) -> np.ndarray:
  """One ImageNet image, cropped and resized to ``size`` x ``size``.

  Train: RandomResizedCrop(size) + horizontal flip with probability 1/2;
  eval: Resize(size * 256/224) + CenterCrop(size). Bilinear resizing with
  PIL; grey images are repeated to 3 channels.

  Args:
    image: uint8 (H, W, C), C in {1, 3}.
    size: output side.
    train: whether to draw the random crop (else the centre crop).
    rng: the source of randomness (unused for eval).

  Returns:
    uint8 (size, size, 3).
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top

  image = np.asarray(image, np.uint8)
  image = np.repeat(image, 3, -1) if image.shape[-1] == 1 else image
  height, width = image.shape[:2]
  if train:
    top, left, h, w = _crop_box(height, width, rng)
    crop = Image.fromarray(image[top:top + h, left:left + w])
    out = np.asarray(crop.resize((size, size), Image.BILINEAR))
    return out[:, ::-1] if rng.random() < 0.5 else out
  short = round(size * 256 / 224)
  scale = short / min(height, width)
  h, w = round(height * scale), round(width * scale)
  out = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
  top, left = (h - size) // 2, (w - size) // 2
  return out[top:top + size, left:left + size]
