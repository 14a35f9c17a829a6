"""Device mesh, shardings and multi-host set-up for the training program.

Data parallelism over every device of every host: the batch is sharded along
the mesh axis ``data`` and params, optimizer state and the teacher are
replicated. The step is written for the global view (``jax.jit`` with
explicit ``NamedSharding``s), so batch means (BatchNorm statistics, losses,
AEWGS statistics) are means over the global batch: XLA inserts the
cross-device reductions, which is what PyTorch's SyncBatchNorm does by hand.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from absl import logging
import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

DATA_AXIS = "data"

# Environment variables that mean "this process is one of several".
_CLUSTER_ENV = (
    "JAX_COORDINATOR_ADDRESS",
    "TPU_WORKER_HOSTNAMES",
    "MEGASCALE_COORDINATOR_ADDRESS",
)


def _in_multiprocess_cluster() -> bool:
  if any(os.environ.get(k) for k in _CLUSTER_ENV):
    return True
  for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    if int(os.environ.get(var, "1") or 1) > 1:
      return True
  return False


def initialize_distributed(
    coordinator_address: Optional[str] = None,
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
) -> bool:
  """Calls ``jax.distributed.initialize`` when running on several processes.

  Explicit arguments (the program's ``--coordinator_address``,
  ``--num_processes``, ``--process_id`` flags) win; otherwise JAX's cluster
  auto-detection is used when a known cluster environment is present (TPU
  pods, SLURM, Open MPI, ``JAX_COORDINATOR_ADDRESS``). Single-process runs
  do nothing.

  Returns:
    True if the distributed runtime was initialised.
  """
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise ValueError(
          "--coordinator_address needs --num_processes and --process_id too"
      )
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )
    return True
  if _in_multiprocess_cluster():
    jax.distributed.initialize()
    return True
  return False


def make_mesh(devices: Optional[list[Any]] = None) -> Mesh:
  """A 1-D data-parallel mesh over ``devices`` (default: all devices)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the data axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """Fully replicated over the mesh."""
  return NamedSharding(mesh, P())


def check_global_batch(global_batch: int, mesh: Mesh) -> None:
  """Raises a clear error if the batch cannot be split over the mesh."""
  n = mesh.devices.size
  if global_batch % n:
    raise ValueError(
        f"global batch size {global_batch} is not divisible by the {n} "
        f"devices of the mesh; set --config.data.batch_size to a multiple "
        f"of {n}"
    )


def host_to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict:
  """Assembles per-process batch slices into global sharded arrays.

  Each process passes the rows it loaded (its slice of the global batch); the
  result is a dict of global ``jax.Array``s sharded along the batch axis.
  """
  sharding = batch_sharding(mesh)
  return {
      k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
      for k, v in batch.items()
  }


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a host pytree replicated on every device of the mesh."""
  sharding = replicated(mesh)
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  return jax.tree.map(
      lambda x: jax.make_array_from_callback(
          np.shape(x), sharding, lambda idx: np.asarray(x)[idx]
      ),
      tree,
  )


def is_main_process() -> bool:
  return jax.process_index() == 0


def log_topology(mesh: Mesh) -> None:
  logging.info(
      "process %d/%d, %d local / %d global devices (%s), mesh %s",
      jax.process_index(),
      jax.process_count(),
      jax.local_device_count(),
      jax.device_count(),
      jax.devices()[0].device_kind,
      dict(mesh.shape),
  )
