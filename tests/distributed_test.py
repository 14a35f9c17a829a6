"""Two processes x 2 CPU devices (jax.distributed on 127.0.0.1) == 1 x 4."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from absl.testing import absltest
import numpy as np

from train import teacher as teacher_lib
from train import train_lib
from tests import tiny_setup

_TESTS = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_TESTS)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(out_dir, teacher, num_processes, devices_per_process):
  env = dict(os.environ)
  env["XLA_FLAGS"] = (
      f"--xla_force_host_platform_device_count={devices_per_process}")
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join([_REPO,
                                       env.get("PYTHONPATH", "")])
  port = str(_free_port())
  procs = [
      subprocess.Popen(
          [sys.executable, os.path.join(_TESTS, "distributed_worker.py"),
           out_dir, teacher, str(num_processes), str(i), port],
          cwd=_REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
          text=True)
      for i in range(num_processes)
  ]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    if p.returncode:
      raise AssertionError(f"worker failed ({p.returncode}):\n{out[-4000:]}")
  return [dict(np.load(os.path.join(out_dir, f"params_{i}.npz")))
          for i in range(num_processes)]


class DistributedTest(absltest.TestCase):

  def test_two_processes_match_one_process_on_four_devices(self):
    root = self.create_tempdir().full_path
    fp = tiny_setup.tiny_config(root, weight_bits=32, activation_bits=32)
    fp.teacher.num_steps = 10
    train_lib.train_and_evaluate(fp, os.path.join(root, "fp"))
    teacher = os.path.join(root, "fp", teacher_lib.TEACHER_SUBDIR)
    multi_dir = os.path.join(root, "multi")
    single_dir = os.path.join(root, "single")
    os.makedirs(multi_dir)
    os.makedirs(single_dir)
    multi = _launch(multi_dir, teacher, 2, 2)
    (single,) = _launch(single_dir, teacher, 1, 4)
    self.assertEqual(sorted(multi[0]), sorted(single))
    for name in single:
      np.testing.assert_array_equal(multi[0][name], multi[1][name],
                                    err_msg=name)
      # Same program, different all-reduce order (gloo across processes vs
      # one process): equal up to float32 summation-order noise.
      np.testing.assert_allclose(multi[0][name], single[name], rtol=1e-3,
                                 atol=1e-4, err_msg=name)


if __name__ == "__main__":
  absltest.main()
