"""Names and initial values of GDNSQ's quantizer params: the one home.

Param names are API (:mod:`gdnsq_jax.bitwidths` finds quantizers by them,
calibration sets them, the export reads them):

* ``kernel``, ``bias`` -- the latent full-precision weights (Flax names);
* ``log2_step`` -- log2 of the step size s (weights: one per output channel);
* ``log2_range`` -- log2 of the activation grid width q = levels x step;
* ``clamp_low`` -- the activation lower clamp b, which is also its zero point.

A quantized conv / dense holds ``kernel`` and ``log2_step`` and keeps its
input's activation quantizer (``log2_step``, ``log2_range``, ``clamp_low``;
scalars) in the child :data:`INPUT_QUANTIZER`.

Before calibration (docs/method.md §6) weight ``log2_step = -12``,
activation ``log2_step = -10``, ``log2_range = 10`` (20 bits) and
``clamp_low = 0``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

__all__ = [
    "ACTIVATION_INIT",
    "ACTIVATION_KEYS",
    "INPUT_QUANTIZER",
    "WEIGHT_KEYS",
    "WEIGHT_LOG2_STEP_INIT",
    "initial_value",
    "is_quantizer_leaf",
]

INPUT_QUANTIZER = "input_quantizer"
"""Name of the activation quantizer child of a quantized conv / dense."""

WEIGHT_KEYS = ("kernel", "log2_step")
"""A dict holding these is a weight quantizer (output channels last)."""

ACTIVATION_KEYS = ("log2_step", "log2_range", "clamp_low")
"""A dict holding these (scalars) is an activation quantizer."""

WEIGHT_LOG2_STEP_INIT = -12.0
"""Pre-calibration weight ``log2_step``; also calibration's floor."""

ACTIVATION_INIT = {"log2_step": -10.0, "log2_range": 10.0, "clamp_low": 0.0}
"""Pre-calibration activation quantizer params (a 20-bit grid on [0, 1024))."""


def initial_value(path: Sequence[str], siblings: Mapping[str, Any]) -> float:
  """The pre-calibration value of the quantizer param at ``path``.

  Args:
    path: the param's key path; its last entry is the param name.
    siblings: the dict holding the param (a weight quantizer's holds
      ``kernel``).

  Returns:
    The init value.

  Raises:
    KeyError: if ``path`` names no quantizer param.
  """
  name = path[-1]
  if name == "log2_step" and "kernel" in siblings:
    return WEIGHT_LOG2_STEP_INIT
  if name not in ACTIVATION_INIT:
    raise KeyError(
        f"{'/'.join(path)!r} is not a quantizer param; quantizer params are "
        f"named {', '.join(ACTIVATION_KEYS)}")
  return ACTIVATION_INIT[name]


def is_quantizer_leaf(path: Sequence[str]) -> bool:
  """Whether a variables key path is a quantizer param (not in FP models)."""
  return path[-1] == "log2_step" or INPUT_QUANTIZER in path
