"""Prepared TFDS datasets as numpy arrays or lazily read splits.

Nothing is downloaded: a dataset must already be prepared in ``data_dir``.
ArrayRecord data is read with ``builder.as_data_source`` (no TensorFlow
needed); TFRecord data is read with ``builder.as_dataset``, which needs
TensorFlow. Absent data raises :class:`DatasetNotFoundError` and unreadable
data :class:`DatasetFormatError`, each naming the command that prepares it.

:func:`decoded_arrays` decodes whole splits into memory (CIFAR, MNIST);
:func:`lazy_splits` leaves them on disk as :class:`LazySplit` records that
grain reads and decodes per batch (ImageNet). :mod:`train.data_sources`
re-exports the errors and :class:`LazySplit`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any, Optional, Sequence

import numpy as np

__all__ = [
    "DatasetFormatError", "DatasetNotFoundError", "LazySplit",
    "decoded_arrays", "lazy_splits",
]

class DatasetNotFoundError(ValueError):
  """The dataset is not on disk; the message says how to prepare it."""


class DatasetFormatError(ValueError):
  """The dataset is on disk in a format this environment cannot read."""


@dataclasses.dataclass(frozen=True)
class LazySplit:
  """Records ``indices`` of a random-access source, read per batch.

  ``source`` is e.g. ``tfds.data_source(...)`` or a
  ``grain.sources.ArrayRecordDataSource`` of dicts with ``image`` and
  ``label``; it must pickle, so grain worker processes can read it.
  """

  source: Sequence[dict[str, Any]]
  indices: np.ndarray

  def __len__(self) -> int:
    return len(self.indices)

  def subset(self, rows: np.ndarray) -> LazySplit:
    """The split of this split's records at positions ``rows``."""
    return LazySplit(self.source, self.indices[rows])

  def read(self, rows: np.ndarray) -> dict[str, Any]:
    """``{'image': [raw image per row], 'label': int32 (rows,)}`` at ``rows``.

    A raw image is what the source gives: uint8 pixels, or encoded bytes
    that :func:`train.augmentation.preprocess_imagenet` decodes.
    """
    records = [self.source[int(i)] for i in self.indices[rows]]
    return {"image": [r["image"] for r in records],
            "label": np.asarray([r["label"] for r in records], np.int32)}


def _has_tensorflow() -> bool:
  return importlib.util.find_spec("tensorflow") is not None


def _prepared_builder(name: str, data_dir: Optional[str]):
  """The TFDS builder of ``name`` and its prepare command.

  Raises:
    DatasetNotFoundError: ``name`` is not prepared in ``data_dir``.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  builder = tfds.builder(name, data_dir=data_dir)
  root = builder.data_path.parents[1]
  prepare = (
      f'pip install "gdnsq-jax[tensorflow]" && tfds build {name} '
      f"--data_dir {root} --file_format array_record"
  )
  if name == "imagenet2012":  # Its archives must be placed by hand.
    prepare = (
        "put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in "
        f"{root}/downloads/manual, then run: {prepare}"
    )
  if not builder.is_prepared():  # Checked first: tfds.load would retry DNS.
    raise DatasetNotFoundError(
        f"TFDS dataset {name!r} is not prepared in data_dir {str(root)!r} "
        f"(looked for {builder.data_path}). Prepare it with: {prepare}; or "
        "point config.data.data_dir at a directory that holds it."
    )
  return builder, prepare


def _has_random_access(builder) -> bool:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  random_access = tfds.core.FileFormat.with_random_access()
  return bool(builder.info.available_file_formats() & set(random_access))


def _format_error(name: str, builder, prepare: str,
                  why: str) -> DatasetFormatError:
  return DatasetFormatError(
      f"TFDS dataset {name!r} in {builder.data_path} is stored as "
      f"{builder.info.file_format.value}; {why}. Or rebuild it: {prepare}"
  )


def lazy_splits(
    name: str, data_dir: Optional[str], splits: Sequence[str],
) -> list[LazySplit]:
  """Every record of ``splits``, left on disk and read lazily.

  Args:
    name: TFDS name, e.g. ``imagenet2012``.
    data_dir: TFDS data directory (None: TFDS's default).
    splits: TFDS split names, e.g. ``("train", "validation")``.

  Returns:
    One :class:`LazySplit` per split, holding all of its records.

  Raises:
    DatasetNotFoundError: the dataset is not prepared (names the command).
    DatasetFormatError: it is prepared without ArrayRecord files.
  """
  builder, prepare = _prepared_builder(name, data_dir)
  if not _has_random_access(builder):
    raise _format_error(
        name, builder, prepare,
        f"{name} is read lazily, which needs ArrayRecord files")
  sources = [builder.as_data_source(split=split) for split in splits]
  return [LazySplit(source, np.arange(len(source))) for source in sources]


def decoded_arrays(
    name: str, data_dir: Optional[str], splits: Sequence[str],
) -> list[tuple[np.ndarray, np.ndarray]]:
  """Every record of ``splits`` decoded once into memory.

  ArrayRecord data is read through ``as_data_source``; TFRecord data through
  ``as_dataset``, which needs TensorFlow.

  Args:
    name: TFDS name, e.g. ``cifar10``.
    data_dir: TFDS data directory (None: TFDS's default).
    splits: TFDS split names, e.g. ``("train", "test")``.

  Returns:
    One ``(images, labels)`` pair per split: uint8 (N, H, W, C), int32 (N,).

  Raises:
    DatasetNotFoundError: the dataset is not prepared (names the command).
    DatasetFormatError: TFRecord data without TensorFlow installed.
  """
  builder, prepare = _prepared_builder(name, data_dir)
  if _has_random_access(builder):
    return [_decode_all(builder.as_data_source(split=split))
            for split in splits]
  if not _has_tensorflow():
    raise _format_error(
        name, builder, prepare, "reading TFRecord needs TensorFlow "
        '(not installed: pip install "gdnsq-jax[tensorflow]")')
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  arrays = []
  for split in splits:
    split_arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    arrays.append((split_arrays["image"],
                   split_arrays["label"].astype(np.int32)))
  return arrays


def _decode_all(
    source: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
  """Decodes every record of a TFDS data source once, into memory."""
  examples = [source[i] for i in range(len(source))]
  images = np.stack([np.asarray(e["image"], np.uint8) for e in examples])
  labels = np.asarray([e["label"] for e in examples], np.int32)
  return images, labels
