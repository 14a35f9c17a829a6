"""The program's data streams, chosen by ``config.data`` once.

:func:`train_stream` gives the endless train batches as global arrays on
the mesh: the train set kept on the devices (:mod:`train.device_data`)
when ``config.data.device_resident`` says so, else the grain pipeline
(:func:`train.input_pipeline.train_batches`) with ``config.data.workers``
worker processes and ``config.data.prefetch`` batches placed ahead of the
step. :func:`eval_stream` is one pass over a split through the same
pipeline and prefetch. Both have a ``position`` / ``close()`` interface.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence, Union

import jax
import ml_collections

from train import device_data
from train import input_pipeline
from train.data_sources import Dataset
from train.input_pipeline import DataPosition

TrainStream = Union[input_pipeline.Batches, device_data.DeviceBatches]


def workers(config: ml_collections.ConfigDict, dataset: Dataset) -> int:
  """``config.data.workers``, with -1 resolved by ``default_workers``."""
  count = config.data.workers
  if count < -1:
    raise ValueError(f"config.data.workers={count}; use -1 (default), 0 "
                     "(in-process) or a number of worker processes")
  return input_pipeline.default_workers(dataset) if count == -1 else count


def train_stream(config: ml_collections.ConfigDict, dataset: Dataset,
                 mesh: jax.sharding.Mesh,
                 position: Sequence[int] = DataPosition(0, 0)
                 ) -> TrainStream:
  """Endless global train batches on ``mesh`` from ``position``.

  Raises:
    ValueError: a bad ``config.data`` key (the message names the fix).
  """
  if device_data.use_device_data(config.data.device_resident, dataset):
    return device_data.DeviceBatches(
        dataset, global_batch_size=config.data.batch_size, seed=config.seed,
        mesh=mesh, position=position)
  return input_pipeline.train_batches(
      dataset, global_batch_size=config.data.batch_size, seed=config.seed,
      position=position, workers=workers(config, dataset), mesh=mesh,
      prefetch=config.data.prefetch)


def eval_stream(config: ml_collections.ConfigDict, dataset: Dataset,
                split: str, mesh: jax.sharding.Mesh,
                global_batch_size: int = 0) -> Iterator[dict[str, Any]]:
  """One pass over ``split`` as global batches on ``mesh`` (with ``mask``).

  ``global_batch_size`` defaults to ``config.data.eval_batch_size``.
  """
  return input_pipeline.eval_batches(
      dataset, split,
      global_batch_size=global_batch_size or config.data.eval_batch_size,
      workers=workers(config, dataset), mesh=mesh,
      prefetch=config.data.prefetch)
