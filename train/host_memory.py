"""Host malloc settings for the training process: keep freed memory.

XLA:CPU allocates the temporaries of every step afresh (about 100 MB for
the digits ResNet at batch 128, 127 MB for its GDNSQ W2A2 step) and glibc
hands allocations that large to ``mmap`` and back to the kernel on free, so
each step page-faults its whole working set in again: 25,000-33,000 minor
faults and 65-85 ms of kernel time per digits step on the 2-core dev CPU,
more for the step with more temporaries. :func:`keep_freed_memory` makes
glibc serve them from one heap that it does not trim, so a step reuses the
pages of the one before (0-2,000 faults and 4-6 ms of kernel time per
step, measured the same way: ``resource.getrusage`` around 10 steps).

It must run before the process starts threads (XLA's thread pools, input
workers): a thread takes its malloc arena when it first allocates. Only
glibc has ``mallopt``; elsewhere it does nothing. The cost is that the
process keeps its peak heap for its lifetime, which a training process
reaches on its first step anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

__all__ = ["keep_freed_memory"]

# mallopt parameters of glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_NEVER_TRIM = 2**31 - 1  # bytes of free heap top kept before trimming


def _glibc():
  """The C library if it is glibc (has ``mallopt``), else None."""
  name = ctypes.util.find_library("c")
  if name is None:
    return None
  try:
    libc = ctypes.CDLL(name)
  except OSError:
    return None
  if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
    return None
  return libc


@functools.lru_cache(maxsize=None)
def keep_freed_memory() -> bool:
  """Makes glibc keep and reuse freed memory in this process.

  One malloc arena (threads share the main heap instead of per-thread
  ``mmap``-ed ones), no ``mmap`` for large blocks, and no trimming of the
  heap's free top. Idempotent.

  Returns:
    True if every setting was applied (glibc), False otherwise.
  """
  libc = _glibc()
  if libc is None:
    return False
  libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  return all(libc.mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0),
      (_M_TRIM_THRESHOLD, _NEVER_TRIM)))
