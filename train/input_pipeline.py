"""Train and eval batches as grain pipelines over :mod:`train.data_sources`.

Use: ``ds = load_dataset(name)``; ``it = train_batches(ds, global_batch_size=
..., seed=..., position=..., workers=..., mesh=...)`` (checkpoint
``it.position``, pass it back as ``position=`` to resume; ``it.close()``);
``eval_batches(ds, 'validation', global_batch_size=..., mesh=...)``.

Train pipeline: example positions ``MapDataset.range(N)`` -> ``shuffle``
(seeded by ``seed``, reshuffled every epoch) -> ``batch`` of the global
batch (the epoch's remainder dropped) -> ``repeat`` -> :class:`ReadRows`
(this process's rows of the global batch) -> the augmentation of
:mod:`train.augmentation` -> normalisation. Every element is a whole global
batch, so element ``k`` is ``epoch * steps_per_epoch + batch``, resuming is
slicing at ``k``, and the output does not depend on the number of worker
processes (``mp_prefetch``) or of JAX processes (each reads its rows; random
draws are made for the whole global batch). Eval: positions in order ->
``batch`` -> :class:`ReadRows` with padding -> resizing (ImageNet) ->
normalisation.

Given a ``mesh``, batches are placed with the batch ``NamedSharding`` (uint8)
and normalised there, and a thread keeps ``prefetch`` of them ready: batch
``k + 1`` is read, moved and normalised while step ``k`` runs. A train set
kept on the devices instead: :mod:`train.device_data`.
"""

from __future__ import annotations

import dataclasses
import functools
import multiprocessing
import os
import signal
import threading
import time
from typing import Any, Iterator, NamedTuple, Optional, Sequence

from absl import flags
import grain
import jax
import numpy as np

from train import sharding
from train.augmentation import AugmentRows
from train.augmentation import augment
from train.augmentation import ImagenetCrop
from train.augmentation import normalize
from train.augmentation import Normalize
from train.data_sources import ArraySplit
from train.data_sources import Dataset
from train.data_sources import DatasetFormatError
from train.data_sources import DatasetNotFoundError
from train.data_sources import LazySplit
from train.data_sources import load_dataset
from train.data_sources import SPLITS

__all__ = [
    "ArraySplit", "Batches", "DataPosition", "Dataset", "DatasetFormatError",
    "DatasetNotFoundError", "LazySplit", "ReadRows", "SPLITS", "augment",
    "default_workers", "eval_batches", "load_dataset", "normalize",
    "train_batches",
]


class DataPosition(NamedTuple):
  """Where the training stream is: ``batch`` global batches into ``epoch``."""

  epoch: int
  batch: int


def default_workers(dataset: Dataset) -> int:
  """Worker processes for ``config.data.workers = -1``.

  Splits decoded per batch (ImageNet JPEGs) get one worker per CPU core the
  process may use (at most 16); splits held in memory get 0: their batches
  are one vectorised gather + augmentation, cheaper in-process than the
  hand-off from a worker (see ``bench/input_pipeline.py``).
  """
  if not isinstance(dataset.train, LazySplit):
    return 0
  cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
           else os.cpu_count() or 1)
  return max(1, min(cores, 16))


@dataclasses.dataclass(frozen=True)
class ReadRows(grain.transforms.Map):
  """Grain transform: this process's rows of a global batch of positions.

  Reads rows ``[first, first + count)`` of the batch from ``split``. With
  ``pad`` (evaluation), a short final batch is completed with copies of the
  global batch's first example and ``mask`` marks the real rows: every
  process has ``count`` rows, and padding leaves activation ranges as they
  are.
  """

  split: Any  # ArraySplit | LazySplit
  first: int
  count: int
  pad: bool = False

  def map(self, positions: np.ndarray) -> dict[str, Any]:
    positions = np.asarray(positions)
    mine = positions[self.first:self.first + self.count]
    if not self.pad:
      return self.split.read(mine)
    padding = np.repeat(positions[:1], self.count - len(mine))
    out = self.split.read(np.concatenate([mine, padding]))
    out["mask"] = np.arange(self.count) < len(mine)
    return out


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


def _preprocess(ds: grain.MapDataset, dataset: Dataset, train: bool,
                first: int, global_count: int, on_devices: bool):
  """Augmentation (train) or resizing (ImageNet), then normalisation."""
  if isinstance(dataset.split("train"), LazySplit):
    crop = ImagenetCrop(dataset.image_shape[0], train, first, global_count)
    ds = ds.random_map(crop) if train else ds.random_map(crop, seed=0)
  elif train:
    ds = ds.random_map(
        AugmentRows(dataset.augmentation, first, global_count))
  # On the devices, normalisation happens after the transfer (uint8 moves).
  return ds if on_devices else ds.map(Normalize(dataset.mean, dataset.std))


def _init_worker(worker_index: int, worker_count: int) -> None:
  """Set-up of a grain worker process.

  It ignores SIGTERM and SIGINT (a scheduler or Ctrl-C signals the whole
  process group; the main process finishes its step, saves, then ends the
  workers) and exits when the main process is gone (e.g. ``kill -9``), which
  grain's workers do not notice on their own.
  """
  del worker_index, worker_count
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  # The process that spawned this one (it may be gone before this runs).
  parent = getattr(multiprocessing.parent_process(), "pid", os.getppid())

  def exit_with_parent():
    while os.getppid() == parent:
      time.sleep(1.0)
    os._exit(1)  # pylint: disable=protected-access

  threading.Thread(target=exit_with_parent, daemon=True).start()


def _iterate(ds: grain.MapDataset, dataset: Dataset, *, workers: int,
             mesh: Optional[jax.sharding.Mesh], prefetch: int):
  """The grain iterator of ``ds``: workers, then device placement."""
  if not flags.FLAGS.is_parsed():  # grain reads absl flags (defaults here)
    flags.FLAGS.mark_as_parsed()
  lazy = isinstance(dataset.train, LazySplit)
  # Elements are whole batches: a small read-ahead buffer bounds memory.
  read = grain.ReadOptions(num_threads=2 if lazy and not workers else 1,
                           prefetch_buffer_size=2)
  it_ds = ds.to_iter_dataset(read)
  if workers:
    it_ds = it_ds.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=workers,
                                     per_worker_buffer_size=2),
        worker_init_fn=_init_worker)
  if mesh is not None:
    it_ds = it_ds.map(_Placement(mesh, dataset.mean, dataset.std))
  if prefetch:
    it_ds = grain.experimental.ThreadPrefetchIterDataset(
        it_ds, prefetch_buffer_size=prefetch)
  return iter(it_ds)


@functools.lru_cache(maxsize=None)
def _normalize_on(mesh, mean, std):
  """``normalize`` jitted for ``mesh`` (one compile per run, not per pass)."""
  return jax.jit(
      functools.partial(normalize, mean=mean, std=std, xp=jax.numpy),
      out_shardings=sharding.batch_sharding(mesh))


class _Placement:
  """Global arrays with the batch sharding; images normalised on the devices."""

  def __init__(self, mesh, mean, std):
    self._mesh = mesh
    self._normalize = _normalize_on(mesh, tuple(mean), tuple(std))

  def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    out = sharding.host_to_global(batch, self._mesh)
    out["image"] = self._normalize(out["image"])
    return out


class Batches:
  """A train stream made by :func:`train_batches`; close it when done.

  Attributes:
    steps_per_epoch: global batches per epoch (the remainder is dropped).
    position: ``(epoch, batch)`` of the next batch :func:`next` returns
      (batches prefetched but not yet returned do not count); checkpoint it.
  """

  def __init__(self, iterator, start: int, steps_per_epoch: int):
    self._iterator, self._next = iterator, start
    self.steps_per_epoch = steps_per_epoch

  @property
  def position(self) -> DataPosition:
    return DataPosition(*divmod(self._next, self.steps_per_epoch))

  def __iter__(self) -> Batches:
    return self

  def __next__(self) -> dict[str, Any]:
    batch = next(self._iterator)
    self._next += 1
    return batch

  def close(self) -> None:
    """Stops the prefetch thread and the worker processes."""
    self._iterator.close()

  def __enter__(self) -> Batches:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def train_batches(
    dataset: Dataset,
    *,
    global_batch_size: int,
    seed: int = 0,
    position: Sequence[int] = DataPosition(0, 0),
    workers: int = 0,
    mesh: Optional[jax.sharding.Mesh] = None,
    prefetch: int = 2,
    normalized: bool = True,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
) -> Batches:
  """This process's endless, shuffled, augmented training stream (grain).

  Each ``next()`` gives ``{'image': float32 (B, H, W, C), 'label': int32
  (B,)}``: without ``mesh``, numpy arrays of this process's rows ``[
  process_index * B, (process_index + 1) * B)`` of the global batch, ``B =
  global_batch_size / process_count``; with ``mesh``, global ``jax.Array``s
  of the whole batch sharded along the mesh's data axis. Epoch ``e`` is a
  permutation drawn from ``seed`` and ``e``; the epoch's remainder is
  dropped.

  Args:
    dataset: from :func:`load_dataset`.
    global_batch_size: examples per optimizer step over all processes.
    seed: seed of the epoch orders and augmentations.
    position: ``(epoch, batch)`` to start at, e.g. a checkpointed
      :attr:`Batches.position`; resuming there is exact.
    workers: grain worker processes (0: read in this process).
    mesh: place batches on this mesh (and normalise them there).
    prefetch: batches read ahead by a background thread (placed on the
      devices when ``mesh`` is given); 0: read when asked.
    normalized: False: host batches keep uint8 images (what the host does
      for a ``mesh``, which normalises on the devices).
    process_index, process_count: default ``jax.process_index()`` /
      ``jax.process_count()``.

  Returns:
    A :class:`Batches` iterator.

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
  ds = (grain.MapDataset.range(len(dataset.train)).seed(seed).shuffle()
        .batch(global_batch_size, drop_remainder=True).repeat()
        .map(ReadRows(dataset.train, first, rows)))
  ds = _preprocess(ds, dataset, True, first, global_batch_size,
                   mesh is not None or not normalized)
  start = epoch * steps + batch
  return Batches(_iterate(ds[start:], dataset, workers=workers, mesh=mesh,
                          prefetch=prefetch), start, steps)


def eval_batches(
    dataset: Dataset,
    split: str,
    *,
    global_batch_size: int,
    workers: int = 0,
    mesh: Optional[jax.sharding.Mesh] = None,
    prefetch: int = 2,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
) -> Iterator[dict[str, Any]]:
  """One pass over a whole split in order, without augmentation (grain).

  The last global batch is padded to full size with copies of a real
  example; ``mask`` (bool) is False on padding, so summing over ``mask``
  counts every example exactly once over all processes and batches.

  Args:
    dataset: from :func:`load_dataset`.
    split: ``train`` (calibration, docs/method.md D9), ``validation``, ``test``.
    global_batch_size: rows per global batch.
    workers, mesh, prefetch, process_index, process_count: as in
      :func:`train_batches`.

  Returns:
    An iterator of ``{'image': float32 (B, H, W, C), 'label': int32 (B,),
    'mask': bool (B,)}`` (numpy rows of this process, or global arrays on
    ``mesh``); the same number of batches on every process. The worker
    processes end with the pass.

  Raises:
    ValueError: unknown split, or batch not divisible by the process count.
  """
  data = dataset.split(split)  # Errors are raised here, not at first next().
  first, rows = _process_slice(global_batch_size, process_index, process_count)
  ds = (grain.MapDataset.range(len(data)).batch(global_batch_size)
        .map(ReadRows(data, first, rows, pad=True)))
  ds = _preprocess(ds, dataset, False, first, global_batch_size,
                   mesh is not None)
  return _closing(_iterate(ds, dataset, workers=workers, mesh=mesh,
                           prefetch=prefetch))


def _closing(iterator) -> Iterator[dict[str, Any]]:
  try:
    yield from iterator
  finally:
    iterator.close()
