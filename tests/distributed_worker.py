"""One process of the multi-process test (run by distributed_test.py).

usage: distributed_worker.py OUT_DIR TEACHER NUM_PROCESSES PROCESS_ID PORT
Runs the tiny W2A2 config and saves this process's final params to
OUT_DIR/params_<PROCESS_ID>.npz.
"""

import os
import sys

import jax
import numpy as np


def main():
  out_dir, teacher, num_processes, process_id, port = sys.argv[1:6]
  num_processes, process_id = int(num_processes), int(process_id)
  if num_processes > 1:
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=num_processes, process_id=process_id)
  from train import checkpointing  # pylint: disable=g-import-not-at-top
  from train import train_lib  # pylint: disable=g-import-not-at-top
  from gdnsq_jax import bitwidths  # pylint: disable=g-import-not-at-top
  from tests import tiny_setup  # pylint: disable=g-import-not-at-top

  config = tiny_setup.tiny_config(out_dir, num_steps=6)
  config.teacher.checkpoint = teacher
  workdir = os.path.join(out_dir, "run")
  results = train_lib.train_and_evaluate(config, workdir)
  ck = checkpointing.StateCheckpointer(os.path.join(workdir, "checkpoints"))
  step = ck.latest_step()
  state = ck.restore_raw(step)
  ck.close()
  flat = {
      bitwidths.key_path_name(path): np.asarray(v)
      for path, v in jax.tree_util.tree_flatten_with_path(
          state["train"]["params"])[0]
  }
  np.savez(os.path.join(out_dir, f"params_{process_id}.npz"), **flat)
  print("devices", jax.device_count(), "steps", results["steps"])


if __name__ == "__main__":
  main()
