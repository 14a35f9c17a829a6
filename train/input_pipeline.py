"""Image classification data: sources, splits, host-side augmentation, batches.

Use: ``ds = load_dataset(name)``; ``it = train_batches(ds, global_batch_size=
...)`` (checkpoint ``it.position``, pass it back as ``position=`` to resume);
``eval_batches(ds, 'validation', global_batch_size=...)``.

Sources: ``digits`` (default; 10,000 real MNIST digits embedded in
``train/data/mnist10k.npz``, see ``NOTICE.md`` there); a ``.npz`` path with
``train_images/train_labels/test_images/test_labels`` or ``images/labels``
(empty test split), images uint8 NHWC or NHW; prepared TFDS ``cifar10``,
``cifar100``, ``mnist`` (decoded into memory) and ``imagenet2012`` (read
lazily), see :mod:`train.tfds_source`. Nothing is downloaded: absent data
raises :class:`DatasetNotFoundError` naming the command that prepares it.

Splits (Decision D9): ``train``; ``validation``, a seeded hold-out of the
official train split, for checkpoint selection; ``test``, the official test
split (ImageNet: its ``validation`` split), only reported.

Preprocessing (method spec section 10): :mod:`train.augmentation`.

Determinism (D10): epoch ``e`` is ordered by ``default_rng((seed, 0, e))``;
global batch ``b`` is augmented from ``default_rng((seed, 1, e, b))`` drawn
for the whole global batch, so ``(epoch, batch)`` restarts the stream exactly
and the processes' slices tile the single-process batch.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
from typing import Iterator, NamedTuple, Optional, Sequence, Union

import jax
import numpy as np

from train import tfds_source
from train.augmentation import apply_augmentation
from train.augmentation import augment
from train.augmentation import AUGMENTATIONS
from train.augmentation import draw_augmentation
from train.augmentation import normalize
from train.augmentation import preprocess_imagenet
from train.tfds_source import DatasetFormatError
from train.tfds_source import DatasetNotFoundError
from train.tfds_source import LazySplit

__all__ = [
    "ArraySplit", "DataPosition", "Dataset", "DatasetFormatError",
    "DatasetNotFoundError", "LazySplit", "TrainIterator", "augment",
    "eval_batches", "load_dataset", "normalize", "train_batches",
]

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2557, 0.2761)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SPLITS = ("train", "validation", "test")
_SHUFFLE, _AUGMENT = 0, 1  # Salts that keep the random streams apart.


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


Split = Union[ArraySplit, LazySplit]


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A loaded dataset.

  Attributes:
    name: source name (``digits``, ``cifar10``, ..., or the npz path).
    train, validation, test: the splits (Decision D9).
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


class DataPosition(NamedTuple):
  """Where the training stream is: ``batch`` global batches into ``epoch``."""

  epoch: int
  batch: int


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


def _load_batch(dataset, split, positions, train, seed=0, epoch=0, batch=0,
                first=0, global_count=0) -> dict[str, np.ndarray]:
  """Images and labels of ``positions`` of ``split``, preprocessed.

  ``first``/``global_count`` place these rows in the global batch so that the
  augmentation drawn for the global batch is sliced consistently.
  """
  key = (seed, _AUGMENT, epoch, batch)
  if isinstance(split, ArraySplit):
    images, labels = split.images[positions], split.labels[positions]
    if train:
      offsets, flips = draw_augmentation(
          dataset.augmentation, np.random.default_rng(key), global_count)
      rows = slice(first, first + len(positions))
      images = apply_augmentation(
          dataset.augmentation, images, offsets[rows], flips[rows])
  else:
    examples = split.records(positions)
    labels = np.asarray([e["label"] for e in examples], np.int32)
    images = np.zeros((len(examples),) + dataset.image_shape, np.uint8)
    for row, example in enumerate(examples):
      rng = np.random.default_rng(key + (first + row,))
      images[row] = preprocess_imagenet(
          example["image"], dataset.image_shape[0], train, rng)
  return {
      "image": normalize(images, dataset.mean, dataset.std),
      "label": labels.astype(np.int32),
  }


def _process_slice(global_batch_size, process_index, process_count):
  """(first row, row count) of this process in a global batch."""
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if global_batch_size <= 0 or global_batch_size % count:
    raise ValueError(
        f"global batch size {global_batch_size} must be a positive multiple "
        f"of the process count {count}; set config.data.batch_size to one"
    )
  if not 0 <= index < count:
    raise ValueError(f"process_index {index} is not in [0, {count})")
  per_process = global_batch_size // count
  return index * per_process, per_process


class TrainIterator:
  """Endless training stream made by :func:`train_batches`.

  Attributes:
    steps_per_epoch: global batches per epoch (the remainder is dropped).
    position: ``(epoch, batch)`` of the next batch; checkpoint it to resume.
  """

  def __init__(self, dataset: Dataset, global_batch_size: int, seed: int,
               position: DataPosition, first: int, rows: int):
    self.dataset, self.global_batch_size, self.seed = (
        dataset, global_batch_size, seed)
    self.steps_per_epoch = len(dataset.train) // global_batch_size
    self._position, self._first, self._rows = position, first, rows
    self._order = (None, None)  # (epoch, permutation) of the latest epoch.

  @property
  def position(self) -> DataPosition:
    epoch, batch = self._position
    if batch == self.steps_per_epoch:
      return DataPosition(epoch + 1, 0)
    return self._position

  def __iter__(self) -> TrainIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    epoch, batch = self.position
    if self._order[0] != epoch:
      rng = np.random.default_rng((self.seed, _SHUFFLE, epoch))
      self._order = (epoch, rng.permutation(len(self.dataset.train)))
    start = batch * self.global_batch_size + self._first
    positions = self._order[1][start:start + self._rows]
    self._position = DataPosition(epoch, batch + 1)
    return _load_batch(self.dataset, self.dataset.train, positions, True,
                       self.seed, epoch, batch, self._first,
                       self.global_batch_size)


def train_batches(
    dataset: Dataset,
    *,
    global_batch_size: int,
    seed: int = 0,
    position: Sequence[int] = DataPosition(0, 0),
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
) -> TrainIterator:
  """This process's endless, shuffled, augmented training stream.

  Each ``next()`` gives ``{'image': float32 (B, H, W, C), 'label': int32
  (B,)}``, ``B = global_batch_size / process_count``: rows ``[process_index *
  B, (process_index + 1) * B)`` of the global batch. Epochs drop the
  remainder. ``.position`` is the ``(epoch, batch)`` of the next batch.

  Args:
    dataset: from :func:`load_dataset`.
    global_batch_size: examples per optimizer step over all processes.
    seed: seed of the epoch orders and augmentations.
    position: ``(epoch, batch)`` to start at, e.g. a checkpointed
      :attr:`TrainIterator.position`; resuming there is exact.
    process_index, process_count: default ``jax.process_index()`` /
      ``jax.process_count()``.

  Returns:
    A :class:`TrainIterator`.

  Raises:
    ValueError: batch not divisible by the process count, larger than the
      train split, or a bad position.
  """
  first, rows = _process_slice(global_batch_size, process_index, process_count)
  steps = len(dataset.train) // global_batch_size
  if not steps:
    raise ValueError(
        f"global batch size {global_batch_size} exceeds the "
        f"{len(dataset.train)} training examples of {dataset.name!r}"
    )
  epoch, batch = (int(v) for v in position)
  if epoch < 0 or not 0 <= batch <= steps:
    raise ValueError(
        f"position {tuple(position)} is not (epoch >= 0, batch in [0, {steps}])"
    )
  return TrainIterator(dataset, global_batch_size, seed,
                       DataPosition(epoch, batch), first, rows)


def eval_batches(
    dataset: Dataset,
    split: str,
    *,
    global_batch_size: int,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
) -> Iterator[dict[str, np.ndarray]]:
  """One pass over a whole split in order, without augmentation.

  The last global batch is padded (zero images, label 0) to full size;
  ``mask`` (bool) is False on padding, so summing over ``mask`` counts every
  example exactly once over all processes and batches.

  Args:
    dataset: from :func:`load_dataset`.
    split: ``train`` (e.g. for calibration, D9), ``validation`` or ``test``.
    global_batch_size: rows per global batch.
    process_index, process_count: as in :func:`train_batches`.

  Returns:
    An iterator of ``{'image': float32 (B, H, W, C), 'label': int32 (B,),
    'mask': bool (B,)}``, ``B = global_batch_size / process_count``; the
    same number of batches on every process.

  Raises:
    ValueError: unknown split, or batch not divisible by the process count.
  """
  data = dataset.split(split)  # Errors are raised here, not at first next().
  first, rows = _process_slice(global_batch_size, process_index, process_count)
  count = math.ceil(len(data) / global_batch_size)
  return (_padded_batch(dataset, data, b * global_batch_size + first, rows)
          for b in range(count))


def _padded_batch(dataset, data, start, rows) -> dict[str, np.ndarray]:
  """Eval rows ``[start, start + rows)``, zero-padded past the split's end."""
  positions = np.arange(start, min(start + rows, len(data)))
  out = _load_batch(dataset, data, positions, False)
  out["mask"] = np.ones((len(positions),), bool)
  pad = rows - len(positions)
  return {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
          for k, v in out.items()}
