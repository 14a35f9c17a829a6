"""The GDNSQ training program.

  python -m train.main --config configs/w2a2.py --workdir runs/w2a2
  python -m train.main --config configs/w2a2.py:cifar10 --workdir runs/c10 \
      --config.data.data_dir=~/tensorflow_datasets

Multi-host: on TPU pods / SLURM / Open MPI the JAX cluster is detected; by
hand pass --coordinator_address=host:port --num_processes=N --process_id=i.
"""

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from train import host_memory
from train import sharding
from train import train_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with a preset: configs/w2a2.py:cifar10",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Index of this process (multi-process runs).")

flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  host_memory.keep_freed_memory()  # before JAX or the input workers start threads
  if not flags.FLAGS["verbosity"].present:
    # Orbax and JAX log every save at INFO; -v 0 brings them back.
    logging.set_verbosity(logging.WARNING)
  sharding.initialize_distributed(
      _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)
  logging.info("config:\n%s", _CONFIG.value)
  results = train_lib.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if jax.process_index() == 0:
    keys = ("fp_test_accuracy", "quantized_test_accuracy", "converged",
            "true_weight_bits_max", "true_activation_bits_max", "steps",
            "wall_time_s")
    print("results:", {k: results[k] for k in keys if k in results})


if __name__ == "__main__":
  app.run(main)
