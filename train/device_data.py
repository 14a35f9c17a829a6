"""A uint8 train set kept on the devices: shuffle and augment inside jit.

For train sets that fit beside the model (digits, MNIST, CIFAR: at most
:data:`MAX_BYTES` of uint8), the images and labels are placed once,
replicated on every device, and each batch is made by one jitted function:
the epoch's permutation (``jax.random.permutation``, drawn once per epoch),
the batch's rows, the crop / flip / shift of :mod:`train.augmentation` (the
same :func:`~train.augmentation.apply_augmentation` and
:func:`~train.augmentation.normalize` as the host pipeline, on
``jax.numpy``) and normalisation, its output sharded along the batch axis.
No host work per step beyond the dispatch.

``config.data.device_resident``: ``auto`` keeps the train set on the devices
when it is held in memory, fits :data:`MAX_BYTES` and the backend is an
accelerator (GPU, TPU); on the CPU the host pipeline runs beside the step
instead. The random stream differs from the host pipeline's (JAX keys
instead of numpy generators), with the same distributions; each is exact on
resume.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from train import sharding
from train.augmentation import apply_augmentation
from train.augmentation import draw_augmentation_jax
from train.augmentation import normalize
from train.data_sources import ArraySplit
from train.data_sources import Dataset
from train.input_pipeline import DataPosition

MAX_BYTES = 150 * 2**20  # Largest uint8 train set kept on the devices.
MODES = ("auto", "on", "off")


def fits(dataset: Dataset) -> bool:
  """Whether ``dataset``'s train split can be kept on the devices."""
  train = dataset.train
  return isinstance(train, ArraySplit) and train.images.nbytes <= MAX_BYTES


def use_device_data(mode: str, dataset: Dataset) -> bool:
  """Resolves ``config.data.device_resident`` (one of :data:`MODES`).

  Raises:
    ValueError: unknown mode, or ``on`` for a train set that does not fit.
  """
  if mode not in MODES:
    raise ValueError(f"config.data.device_resident={mode!r}; choose one of: "
                     f"{', '.join(MODES)}")
  if mode == "on" and not fits(dataset):
    raise ValueError(
        f"config.data.device_resident='on' needs a train set held in memory "
        f"of at most {MAX_BYTES >> 20} MB of uint8; {dataset.name!r} is not "
        "one. Use 'auto' or 'off'")
  if mode == "auto":
    return fits(dataset) and jax.default_backend() != "cpu"
  return mode == "on"


class DeviceBatches:
  """Endless train stream made on the devices; same interface as Batches.

  Attributes:
    steps_per_epoch: global batches per epoch (the remainder is dropped).
    position: ``(epoch, batch)`` of the next batch; checkpoint it.
  """

  def __init__(self, dataset: Dataset, *, global_batch_size: int, seed: int,
               mesh: jax.sharding.Mesh,
               position: Sequence[int] = DataPosition(0, 0)):
    if not fits(dataset):
      raise ValueError(f"{dataset.name!r} cannot be kept on the devices")
    sharding.check_global_batch(global_batch_size, mesh)
    count = len(dataset.train)
    self.steps_per_epoch = count // global_batch_size
    if not self.steps_per_epoch:
      raise ValueError(
          f"global batch size {global_batch_size} exceeds the {count} "
          f"training examples of {dataset.name!r}")
    self._mesh = mesh
    self._next = int(position[0]) * self.steps_per_epoch + int(position[1])
    self._images, self._labels = sharding.replicate(
        (dataset.train.images, dataset.train.labels.astype(np.int32)), mesh)
    shuffle_key, augment_key = jax.random.split(jax.random.key(seed))
    repl = sharding.replicated(mesh)

    def order(epoch):
      return jax.random.permutation(jax.random.fold_in(shuffle_key, epoch),
                                    count).astype(jnp.int32)

    def make_batch(images, labels, permutation, index):
      start = (index % self.steps_per_epoch) * global_batch_size
      rows = jax.lax.dynamic_slice_in_dim(permutation, start,
                                          global_batch_size)
      offsets, flips = draw_augmentation_jax(
          dataset.augmentation, jax.random.fold_in(augment_key, index),
          global_batch_size)
      x = apply_augmentation(dataset.augmentation, images[rows], offsets,
                             flips, xp=jnp)
      return {"image": normalize(x, dataset.mean, dataset.std, xp=jnp),
              "label": labels[rows]}

    self._order = jax.jit(order, out_shardings=repl)
    self._make_batch = jax.jit(
        make_batch, out_shardings=sharding.batch_sharding(mesh))
    self._epoch, self._permutation = None, None

  @property
  def position(self) -> DataPosition:
    return DataPosition(*divmod(self._next, self.steps_per_epoch))

  def __iter__(self) -> DeviceBatches:
    return self

  def __next__(self) -> dict[str, jax.Array]:
    epoch = self._next // self.steps_per_epoch
    scalars = sharding.replicate(
        (np.int32(epoch), np.int32(self._next)), self._mesh)
    if self._epoch != epoch:
      self._epoch, self._permutation = epoch, self._order(scalars[0])
    batch = self._make_batch(self._images, self._labels, self._permutation,
                             scalars[1])
    self._next += 1
    return batch

  def close(self) -> None:
    self._images = self._labels = self._permutation = None

  def __enter__(self) -> DeviceBatches:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()
