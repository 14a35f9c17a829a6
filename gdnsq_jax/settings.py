"""How a model is quantized: :class:`QuantSettings` (framework-agnostic).

One frozen value shared by every quantized op of a model; the Linen layers
(:mod:`gdnsq_jax.layers`), calibration, export and the training program read
it. ``settings.family`` is the quantizer family it selects
(:mod:`gdnsq_jax.families`): chosen here, once, instead of branching on the
method name wherever a quantizer is used.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from gdnsq_jax import families
from gdnsq_jax.bitwidths import FLOAT_BITS
from gdnsq_jax.dither import validate_dither
from gdnsq_jax.quantizers import validate_estimator

__all__ = ["METHODS", "QuantSettings"]

METHODS = tuple(families.FAMILIES)
"""Quantizer families: ``gdnsq``, and ``lsq`` (the LSQ baseline)."""


@dataclasses.dataclass(frozen=True)
class QuantSettings:
  """How the layers quantize (one value shared by every quantized layer).

  Attributes:
    weight_bits: target weight bit-width; ``>= 32`` disables weight
      quantizers (no ``log2_step`` param).
    activation_bits: target activation bit-width; ``>= 32`` disables
      activation quantizers entirely, no params (W1A32, docs/method.md D12).
    estimator: backward rule of weight quantizers, one of
      :data:`gdnsq_jax.quantizers.ESTIMATORS` (docs/method.md D4).
    activation_estimator: the activations' rule, ``ste`` (docs/method.md D4).
    per_channel: one weight step per output channel (True) or per tensor.
    dither: step-size dither, one of :data:`gdnsq_jax.dither.DITHERS`.
    learnable_clamp_low: train the lower clamp b (docs/method.md D3);
      False freezes it at 0 (the reference's tagged release).
    enabled: False makes every quantizer the identity while keeping its params
      (evaluate the latent FP network with the same variables).
    calibration_bits: bit-width the calibration sets (docs/method.md §6: 10).
    axis_name: data-parallel axis over which AEWGS statistics are averaged.
    method: the quantizer family, one of :data:`METHODS`: ``'gdnsq'``
      (differentiable widths, noise-scale backward) or ``'lsq'``, the
      fixed-bit LSQ baseline of :mod:`gdnsq_jax.lsq` (integer widths;
      ``estimator``, ``activation_estimator`` and ``dither`` unused;
      calibrated to the target widths, trained without the penalty).
    unsigned_if_nonnegative: calibration makes an activation quantizer whose
      observed input minimum is >= 0 unsigned: ``clamp_low = 0``, frozen
      (the reference's rule after ReLUs; docs/method.md §6, D3).
  """

  weight_bits: float = 4
  activation_bits: float = 4
  estimator: str = "ste"
  activation_estimator: str = "ste"
  per_channel: bool = True
  dither: str = "uniform12"
  learnable_clamp_low: bool = True
  enabled: bool = True
  calibration_bits: int = 10
  axis_name: Optional[str] = None
  method: str = "gdnsq"
  unsigned_if_nonnegative: bool = False

  def __post_init__(self):
    family = families.get_family(self.method)
    validate_estimator(self.estimator)
    validate_estimator(self.activation_estimator)
    validate_dither(self.dither)
    for name in ("weight_bits", "activation_bits", "calibration_bits"):
      if not getattr(self, name) >= 1:
        raise ValueError(
            f"{name}={getattr(self, name)!r} must be >= 1 (use "
            f">= {FLOAT_BITS} to disable a quantizer)"
        )
    family.check_settings(self)

  @property
  def family(self) -> families.QuantizerFamily:
    """The quantizer family of :attr:`method` (its one implementation)."""
    return families.get_family(self.method)

  @property
  def quantize_weights(self) -> bool:
    """Whether layers create a weight quantizer (``weight_bits < 32``)."""
    return self.weight_bits < FLOAT_BITS

  @property
  def quantize_activations(self) -> bool:
    """Whether layers create an activation quantizer (``bits < 32``)."""
    return self.activation_bits < FLOAT_BITS
