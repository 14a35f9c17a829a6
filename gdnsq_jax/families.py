"""Quantizer families: one small interface, two implementations (framework-agnostic).

A *family* says how a quantized op quantizes and how its quantizers start;
*where* quantizers go is placement's business (:mod:`gdnsq_jax.interception`).
``QuantSettings.method`` selects one, once (``settings.family``), and every
user -- the per-op core (:mod:`gdnsq_jax.quantized_ops`), calibration, the
trainable mask, the export, the training program -- asks it instead of
comparing method names:

* :class:`Gdnsq` -- GDNSQ (arXiv 2508.14004): learnable widths, noise-scale
  backward, penalised towards the target (docs/method.md §2, §3, §4);
* :class:`Lsq` -- the LSQ baseline (Esser et al., arXiv 1902.08153): fixed
  ``2^B`` levels, LSQ's gradient scale, no penalty (docs/method.md §4.4,
  D13; numerics in :mod:`gdnsq_jax.lsq`).

Both use the same params (docs/method.md notation; names in
:mod:`gdnsq_jax.quantizer_params`): a kernel's ``log2_step`` and an input
quantizer's ``log2_step``, ``log2_range``, ``clamp_low``. Everything here is
a pure function of arrays, a params dict and the settings, so the Linen and
NNX front ends share it.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from gdnsq_jax import lsq
from gdnsq_jax.activation_quantizer import quantize_activation
from gdnsq_jax.bitwidths import FLOAT_BITS
from gdnsq_jax.quantizer_params import WEIGHT_LOG2_STEP_INIT
from gdnsq_jax.quantizers import quantize_weight

if TYPE_CHECKING:
  from gdnsq_jax.settings import QuantSettings

__all__ = ["FAMILIES", "Gdnsq", "Lsq", "QuantizerFamily", "get_family"]

Grid = tuple[jax.Array, jax.Array, jax.Array]
"""An activation quantizer's effective ``(log2_step, log2_range, clamp_low)``."""


class QuantizerFamily(abc.ABC):
  """How a family quantizes, starts and trains its quantizers.

  Attributes:
    name: the ``QuantSettings.method`` spelling.
    learns_widths: widths are learned under the exterior-point penalty
      (False: fixed widths, trained with penalty weight 0).
    exportable: the integer export (:mod:`gdnsq_jax.export`) supports it.
    uses_noise: its backward draws the step-size dither (a key is needed).
  """

  name: str = ""
  learns_widths: bool = True
  exportable: bool = True
  uses_noise: bool = True

  def check_settings(self, settings: "QuantSettings") -> None:
    """Raises ValueError for settings this family cannot run."""

  @abc.abstractmethod
  def quantize_weight(self, kernel: jax.Array, log2_step: jax.Array,
                      key: Optional[jax.Array],
                      settings: "QuantSettings") -> jax.Array:
    """Fake-quantizes a kernel, output channels last (``log2_step`` ``(C,)``
    or ``()``; other layouts go through :mod:`gdnsq_jax.quantized_ops`)."""

  @abc.abstractmethod
  def quantize_activation(self, x: jax.Array, grid: Grid,
                          key: Optional[jax.Array],
                          settings: "QuantSettings") -> jax.Array:
    """Fake-quantizes activations on the grid of :meth:`activation_grid`."""

  def activation_grid(self, params: Mapping[str, jax.Array],
                      settings: "QuantSettings") -> Grid:
    """The effective grid of an input quantizer (b: docs/method.md D3)."""
    clamp_low = params["clamp_low"]
    if not settings.learnable_clamp_low:
      clamp_low = jax.lax.stop_gradient(clamp_low)
    return params["log2_step"], params["log2_range"], clamp_low

  def fixed_widths(self, settings: "QuantSettings"
                   ) -> tuple[Optional[float], Optional[float]]:
    """``(weight, activation)`` widths the quantizers cannot exceed, or None."""
    del settings
    return None, None

  def calibration_widths(self, settings: "QuantSettings",
                         bits: Optional[int]) -> tuple[float, float]:
    """``(weight, activation)`` widths calibration sets (docs/method.md §6)."""
    bits = settings.calibration_bits if bits is None else bits
    return bits, bits

  def init_weight(self, channel_min: jax.Array, channel_max: jax.Array,
                  bits: float) -> jax.Array:
    """``l_c = max(-12, log2(R_c / (2^bits - 1)))`` (docs/method.md §6)."""
    fitted = jnp.log2((channel_max - channel_min) / (2.0**bits - 1.0))
    return jnp.maximum(WEIGHT_LOG2_STEP_INIT, fitted)

  def _activation_low(self, low: np.float32, high: np.float32,
                      settings: "QuantSettings") -> np.float32:
    if low == high:  # a constant input: frozen at it
      return low
    if not settings.learnable_clamp_low or (
        settings.unsigned_if_nonnegative and low >= 0):
      return np.float32(0.0)
    return low

  def _activation_step(self, stats: Mapping[str, Any], low: np.float32,
                       high: np.float32, levels: np.float32) -> np.float32:
    del stats
    return (high - low) / levels

  def init_activation(self, stats: Mapping[str, Any], bits: float,
                      settings: "QuantSettings") -> dict[str, np.float32]:
    """Input quantizer params from its observed input (docs/method.md §6).

    ``b = m`` (0 for a frozen clamp or an unsigned quantizer), ``l_s =
    log2((M - b) / (2^bits - 1))``, ``l_q = l_s + bits``; a constant input,
    or one entirely at or below ``b = 0``, gives the frozen state
    ``l_s = l_q = 0``.

    Args:
      stats: observed ``input_min``, ``input_max`` (and ``input_sum``,
        ``input_count``) over the calibration batches.
      bits: the calibration width.
      settings: the quantization settings.

    Returns:
      ``{'log2_step', 'log2_range', 'clamp_low'}`` as float32 scalars.
    """
    low = np.float32(stats["input_min"])
    high = np.float32(stats["input_max"])
    low = self._activation_low(low, high, settings)
    if high > low:
      levels = np.float32(2.0**bits - 1.0)
      step = self._activation_step(stats, low, high, levels)
      log2_step = np.log2(step, dtype=np.float32)
      log2_range = np.float32(log2_step + bits)
    else:
      log2_step = log2_range = np.float32(0.0)
    return {"log2_step": np.float32(log2_step),
            "log2_range": np.float32(log2_range), "clamp_low": low}

  def frozen_activation_params(self, params: Mapping[str, Any],
                               settings: "QuantSettings") -> tuple[str, ...]:
    """Names of an input quantizer's params the optimizer must not update.

    Every param of a frozen quantizer (``l_s == l_q == 0``); ``clamp_low``
    when it is not learnable, or zero under ``unsigned_if_nonnegative``.
    Host-side: ``params`` are concrete.
    """
    if (float(params["log2_step"]) == 0.0
        and float(params["log2_range"]) == 0.0):
      return ("log2_step", "log2_range", "clamp_low")
    if not settings.learnable_clamp_low or (
        settings.unsigned_if_nonnegative
        and float(params["clamp_low"]) == 0.0):
      return ("clamp_low",)
    return ()


class Gdnsq(QuantizerFamily):
  """GDNSQ's quantizers (docs/method.md §2, §4): noise-scale backward."""

  name = "gdnsq"

  def quantize_weight(self, kernel, log2_step, key, settings):
    return quantize_weight(
        kernel, log2_step, key, estimator=settings.estimator,
        dither=settings.dither, per_channel=jnp.ndim(log2_step) > 0,
        axis_name=settings.axis_name)

  def quantize_activation(self, x, grid, key, settings):
    log2_step, log2_range, clamp_low = grid
    return quantize_activation(
        x, log2_step, log2_range, clamp_low, key,
        estimator=settings.activation_estimator, dither=settings.dither,
        axis_name=settings.axis_name)


class Lsq(QuantizerFamily):
  """The fixed-bit LSQ baseline (docs/method.md §4.4): no penalty, no export.

  Its activation grid width follows the step, ``q = 2^B s``, so the
  ``log2_range`` param is unused and frozen; weight codes are clipped to
  ``2^B`` levels; calibration starts at the fixed widths, the activation step
  at LSQ's ``2 mean(x - b) / sqrt(Qp)`` capped at the min / max step.
  """

  name = "lsq"
  learns_widths = False
  exportable = False
  uses_noise = False

  def check_settings(self, settings):
    for name in ("weight_bits", "activation_bits"):
      bits = getattr(settings, name)
      if bits < FLOAT_BITS and not float(bits).is_integer():
        raise ValueError(
            f"method='lsq' has fixed integer widths but {name}={bits!r}; "
            "use an integer (or >= 32 to disable the quantizer)")

  def quantize_weight(self, kernel, log2_step, key, settings):
    del key
    return lsq.lsq_quantize_weight(kernel, log2_step,
                                   bits=int(settings.weight_bits),
                                   per_channel=jnp.ndim(log2_step) > 0)

  def quantize_activation(self, x, grid, key, settings):
    del key
    log2_step, _, clamp_low = grid
    return lsq.lsq_quantize_activation(x, log2_step, clamp_low,
                                       bits=int(settings.activation_bits))

  def activation_grid(self, params, settings):
    log2_step, _, clamp_low = super().activation_grid(params, settings)
    return log2_step, log2_step + settings.activation_bits, clamp_low

  def fixed_widths(self, settings):
    return settings.weight_bits, settings.activation_bits

  def calibration_widths(self, settings, bits):
    if bits is not None and bits != settings.calibration_bits:
      raise ValueError(
          f"bits={bits} but LSQ quantizers have fixed widths (weights "
          f"{settings.weight_bits}, activations {settings.activation_bits}); "
          "calibrate them without bits=")
    return settings.weight_bits, settings.activation_bits

  def _activation_step(self, stats, low, high, levels):
    step = (high - low) / levels
    mean = np.float32(stats["input_sum"]
                      / max(float(stats["input_count"]), 1.0))
    lsq_step = 2.0 * max(mean - low, 0.0) / np.sqrt(levels)
    return np.float32(min(step, lsq_step) if lsq_step > 0 else step)

  def frozen_activation_params(self, params, settings):
    frozen = super().frozen_activation_params(params, settings)
    if "log2_range" in frozen:
      return frozen
    return frozen + ("log2_range",)  # its width follows the step: unused


FAMILIES: dict[str, QuantizerFamily] = {"gdnsq": Gdnsq(), "lsq": Lsq()}
"""``QuantSettings.method`` -> its family."""


def get_family(method: str) -> QuantizerFamily:
  """The family named ``method``; the error lists the choices."""
  if method not in FAMILIES:
    raise ValueError(
        f"method={method!r}; choose one of {', '.join(FAMILIES)}")
  return FAMILIES[method]
