"""Eager checks of hyper-parameters: one clear error naming value and fix.

The optax factories (:mod:`gdnsq_jax.penalty`,
:mod:`gdnsq_jax.learning_rate`) validate their arguments with these before
closing over them, so a bad value fails at construction, not inside jit.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

__all__ = ["check", "check_steps", "is_real"]


def check(name: str, x: Any, ok: bool, allowed: str, fix: str) -> None:
  """Raises ``ValueError('<name>=<x> is invalid; it must be <allowed>. <fix>')``
  unless ``ok``."""
  if not ok:
    raise ValueError(f"{name}={x!r} is invalid; it must be {allowed}. {fix}")


def is_real(x: Any) -> bool:
  """A finite real Python / numpy number (not a bool)."""
  return (isinstance(x, numbers.Real) and not isinstance(x, bool)
          and math.isfinite(x))


def check_steps(name: str, x: Any) -> None:
  """Checks an optimizer-step count: an integer >= 0."""
  check(name, x, isinstance(x, numbers.Integral)
        and not isinstance(x, bool) and x >= 0, "an integer >= 0",
        "Count optimizer steps of the global batch; 0 disables the warmup.")
