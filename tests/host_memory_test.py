"""train.host_memory: freed host memory is reused, not faulted in again."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from absl.testing import absltest

from train import host_memory

# Mallocs, writes and frees a 128 MB block ten times (as XLA:CPU does with
# a step's temporaries) and prints the minor page faults of the last nine.
_CHILD = textwrap.dedent("""
    import ctypes, ctypes.util, resource, sys
    if sys.argv[1] == "keep":
      from train import host_memory
      assert host_memory.keep_freed_memory()
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = (ctypes.c_void_p,)
    def touch(size=128 * 2**20):
      block = libc.malloc(size)
      ctypes.memset(block, 1, size)  # writes every page
      libc.free(block)
    touch()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(9):
      touch()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _faults(mode: str) -> int:
  out = subprocess.run([sys.executable, "-c", _CHILD, mode], check=True,
                       capture_output=True, text=True).stdout
  return int(out.split()[-1])


class KeepFreedMemoryTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    if host_memory._glibc() is None:  # pylint: disable=protected-access
      self.skipTest("mallopt needs glibc")

  def test_freed_blocks_are_reused_without_page_faults(self):
    # 9 x 32,768 pages of 4 KB: glibc's default mmaps and unmaps each block,
    # faulting every page in again; with the settings, the heap keeps it.
    default = _faults("default")
    kept = _faults("keep")
    self.assertGreater(default, 9 * 30_000)
    self.assertLess(kept, 1_000)

  def test_is_idempotent_in_this_process(self):
    self.assertTrue(host_memory.keep_freed_memory())
    self.assertTrue(host_memory.keep_freed_memory())


if __name__ == "__main__":
  absltest.main()
