"""Image classification datasets: random-access sources and their splits.

``load_dataset(name)`` gives a :class:`Dataset` whose splits grain reads by
position (:mod:`train.input_pipeline`):

* ``digits`` (default): 10,000 real MNIST digits embedded in
  ``train/data/mnist10k.npz`` (see ``NOTICE.md`` there), held in memory;
* a ``.npz`` path with ``train_images/train_labels/test_images/test_labels``
  or ``images/labels`` (empty test split), images uint8 NHWC or NHW;
* prepared TFDS ``cifar10``, ``cifar100``, ``mnist`` (decoded into memory
  once) and ``imagenet2012`` (``tfds.data_source``, decoded per batch), see
  :mod:`train.tfds_source`.

Nothing is downloaded: absent data raises :class:`DatasetNotFoundError`
naming the command that prepares it.

Splits (docs/method.md D9): ``train``; ``validation``, a seeded hold-out of the
official train split, for checkpoint selection; ``test``, the official test
split (ImageNet: its ``validation`` split), only reported.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
from typing import Any, NamedTuple, Optional, Union

import numpy as np

from train import tfds_source
from train.augmentation import AUGMENTATIONS
from train.tfds_source import DatasetFormatError
from train.tfds_source import DatasetNotFoundError
from train.tfds_source import LazySplit

__all__ = [
    "ArraySplit", "Dataset", "DatasetFormatError", "DatasetNotFoundError",
    "LazySplit", "SPLITS", "load_dataset",
]

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2557, 0.2761)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SPLITS = ("train", "validation", "test")


class _Spec(NamedTuple):
  mean: tuple[float, ...]
  std: tuple[float, ...]
  augmentation: str
  validation_size: int
  num_classes: int
  test_split: str = "test"


_SPECS = {
    "digits": _Spec(MNIST_MEAN, MNIST_STD, "shift", 800, 10),
    "mnist": _Spec(MNIST_MEAN, MNIST_STD, "shift", 5000, 10),
    "cifar10": _Spec(CIFAR10_MEAN, CIFAR10_STD, "crop_flip", 5000, 10),
    "cifar100": _Spec(CIFAR100_MEAN, CIFAR100_STD, "crop_flip", 5000, 100),
    "imagenet2012": _Spec(IMAGENET_MEAN, IMAGENET_STD, "random_resized_crop",
                          10000, 1000, "validation"),
}


@dataclasses.dataclass(frozen=True)
class ArraySplit:
  """A split held in memory: ``images`` uint8 (N, H, W, C), ``labels`` int32."""

  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {"image": self.images[index], "label": self.labels[index]}

  def read(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Images and labels at positions ``rows`` (one gather each)."""
    return {"image": self.images[rows], "label": self.labels[rows]}


Split = Union[ArraySplit, LazySplit]


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A loaded dataset.

  Attributes:
    name: source name (``digits``, ``cifar10``, ..., or the npz path).
    train, validation, test: the splits (docs/method.md D9).
    num_classes: number of classes; labels are in ``[0, num_classes)``.
    image_shape: ``(H, W, C)`` of the batches' images.
    mean, std: per-channel normalisation of images scaled to [0, 1].
    augmentation: train augmentation, one of :data:`AUGMENTATIONS`.
  """

  name: str
  train: Split
  validation: Split
  test: Split
  num_classes: int
  image_shape: tuple[int, int, int]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  augmentation: str

  def split(self, name: str) -> Split:
    """The split called ``name`` (one of :data:`SPLITS`)."""
    if name not in SPLITS:
      raise ValueError(f"unknown split {name!r}; choose one of: {SPLITS}")
    return getattr(self, name)


def load_dataset(
    name: str,
    *,
    data_dir: Optional[str] = None,
    validation_size: Union[int, float, None] = None,
    seed: int = 0,
    augmentation: Optional[str] = None,
    image_size: int = 224,
) -> Dataset:
  """Loads a dataset and carves the validation split from its train split.

  Args:
    name: ``digits``, ``mnist``, ``cifar10``, ``cifar100``, ``imagenet2012``
      or a path to a ``.npz`` file.
    data_dir: TFDS data directory (default: TFDS's, ``~/tensorflow_datasets``).
    validation_size: examples held out of train for validation; an int count
      or a fraction in (0, 1). Default: 800 (digits), 5000 (mnist, cifar),
      10000 (imagenet2012), 10% (npz).
    seed: seed of the hold-out choice.
    augmentation: override of the train augmentation (:data:`AUGMENTATIONS`).
    image_size: ImageNet crop side (resize side is ``image_size * 256/224``).

  Returns:
    The :class:`Dataset`.

  Raises:
    DatasetNotFoundError: the data is absent (names the prepare command).
    DatasetFormatError: TFRecord data without TensorFlow installed.
    ValueError: unknown name, bad validation size or augmentation.
  """
  if name.endswith(".npz"):
    try:
      with np.load(name) as arrays:
        train, test = _npz_splits(arrays, name)
    except FileNotFoundError:
      raise DatasetNotFoundError(f"no npz file at {name!r}") from None
    num_classes = int(max(train.labels.max(), test.labels.max(initial=0))) + 1
    spec = _Spec((), (), "none", len(train) // 10, num_classes)
  elif name == "digits":
    ref = importlib.resources.files(__package__).joinpath("data/mnist10k.npz")
    with ref.open("rb") as f:
      train, test = _npz_splits(np.load(f), str(ref))
    spec = _SPECS[name]
  elif name in _SPECS:
    spec = _SPECS[name]
    splits = ("train", spec.test_split)
    if name == "imagenet2012":  # Too large for memory: read lazily.
      train, test = tfds_source.lazy_splits(name, data_dir, splits)
    else:
      train, test = (ArraySplit(*arrays) for arrays
                     in tfds_source.decoded_arrays(name, data_dir, splits))
  else:
    raise ValueError(
        f"unknown dataset {name!r}; choose one of: {', '.join(sorted(_SPECS))}"
        ", or a path to a .npz file"
    )
  augmentation = augmentation or spec.augmentation
  if augmentation not in AUGMENTATIONS or (
      (augmentation == "random_resized_crop") != isinstance(train, LazySplit)
  ):
    raise ValueError(
        f"augmentation {augmentation!r} does not fit dataset {name!r}; choose"
        " one of: crop_flip, none, shift (random_resized_crop: imagenet2012)"
    )
  count = spec.validation_size if validation_size is None else validation_size
  if isinstance(count, float) and 0 < count < 1:
    count = int(round(count * len(train)))
  if not isinstance(count, int) or not 0 <= count < len(train):
    raise ValueError(
        f"validation_size {validation_size!r} must be an int in [0, "
        f"{len(train)}) or a fraction in (0, 1) for dataset {name!r}"
    )
  order = np.random.default_rng(seed).permutation(len(train))
  held, kept = np.sort(order[:count]), np.sort(order[count:])
  if isinstance(train, LazySplit):
    validation, train = train.subset(held), train.subset(kept)
    shape = (image_size, image_size, 3)
  else:
    validation = ArraySplit(train.images[held], train.labels[held])
    train = ArraySplit(train.images[kept], train.labels[kept])
    shape = train.images.shape[1:]
  mean, std = (spec.mean, spec.std) if spec.mean else _channel_stats(train)
  return Dataset(name, train, validation, test, spec.num_classes,
                 tuple(shape), mean, std, augmentation)


def _npz_splits(arrays, where: str) -> tuple[ArraySplit, ArraySplit]:
  """Train/test ArraySplits from an npz mapping (see module docstring)."""
  if "train_images" in arrays:
    keys = ("train_images", "train_labels", "test_images", "test_labels")
  elif "images" in arrays:
    keys = ("images", "labels")
  else:
    raise ValueError(
        f"{where} holds arrays {sorted(arrays.keys())}; expected images/labels "
        "or train_images/train_labels/test_images/test_labels"
    )
  splits = []
  for images_key, labels_key in zip(keys[::2], keys[1::2]):
    images, labels = arrays[images_key], arrays[labels_key]
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
      raise ValueError(
          f"{where}: {images_key} must be uint8 NHWC or NHW, got "
          f"{images.dtype} {images.shape}; convert with "
          "np.round(x * 255).astype(np.uint8)"
      )
    images = images[..., None] if images.ndim == 3 else images
    splits.append(ArraySplit(images, labels.astype(np.int32).reshape(-1)))
  if len(splits) == 1:  # images/labels only: everything is train.
    empty = splits[0].images[:0]
    splits.append(ArraySplit(empty, np.zeros((0,), np.int32)))
  return splits[0], splits[1]


def _channel_stats(split: ArraySplit) -> tuple[tuple[float, ...], ...]:
  """Per-channel mean and std (floored at 1e-3) of the train images."""
  x = split.images.reshape(-1, split.images.shape[-1]) / 255.0
  return tuple(x.mean(0).tolist()), tuple(np.maximum(x.std(0), 1e-3).tolist())
