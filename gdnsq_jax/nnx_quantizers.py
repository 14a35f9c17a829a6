"""NNX variables of GDNSQ quantizers, and the Linen-layout views of NNX state.

* :class:`QuantParam` -- an ``nnx.Param`` subtype for every quantizer param
  (``log2_step``, ``log2_range``, ``clamp_low``; names and initial values
  from :mod:`gdnsq_jax.quantizer_params`), so NNX filters select, train or
  freeze them: ``nnx.state(model, QuantParam)``, ``wrt=nnx.Param``;
* :class:`QuantStat` -- the statistics an input quantizer records, explicit
  state (not ``sow``);
* :class:`ActivationQuantizer` -- the ``input_quantizer`` child of a
  quantized NNX layer (the shared numerics of :mod:`gdnsq_jax.quantized_ops`);
* :func:`params_dict` / :func:`linen_variables` -- NNX state in the Linen
  ``params`` / ``batch_stats`` layout, which the shared bit-width, calibration
  and export code reads.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from flax import nnx
import jax
import jax.numpy as jnp

from gdnsq_jax import quantized_ops
from gdnsq_jax.quantized_ops import STAT_REDUCERS
from gdnsq_jax.quantizer_params import ACTIVATION_INIT
from gdnsq_jax.quantizer_params import ACTIVATION_KEYS
from gdnsq_jax.settings import QuantSettings

__all__ = [
    "ActivationQuantizer",
    "QuantParam",
    "QuantStat",
    "linen_variables",
    "params_dict",
]


class QuantParam(nnx.Param):
  """A GDNSQ quantizer param: ``log2_step``, ``log2_range`` or ``clamp_low``.

  An ``nnx.Param``, so ``wrt=nnx.Param`` includes it; select or exclude it
  alone with ``nnx.state(model, QuantParam)`` / ``nnx.Not(QuantParam)``.
  Calibration marks the params the optimizer must not move with the
  metadata ``frozen=True`` (:func:`gdnsq_jax.nnx_calibration.zero_frozen`).
  """


class QuantStat(nnx.Variable):
  """What an input quantizer records while ``recording`` (min / max, codes).

  Explicit state, reduced across calls and batches by
  :data:`gdnsq_jax.quantized_ops.STAT_REDUCERS`; not a param.
  """


class ActivationQuantizer(nnx.Module):
  """Per-tensor input quantizer of a quantized layer (docs/method.md §2.2).

  Params (:class:`QuantParam`, float32 scalars): ``log2_step``,
  ``log2_range``, ``clamp_low`` at their pre-calibration values. While
  ``recording`` is True every call reduces into its :class:`QuantStat`
  variables ``input_min`` / ``input_max`` / ``code_min`` / ``code_max`` /
  ``input_sum`` / ``input_count`` (calibration and width measurement set it).

  Attributes:
    settings: the shared :class:`QuantSettings`.
    recording: update the statistics on every call.
  """

  def __init__(self, settings: QuantSettings):
    self.settings = settings
    self.recording = False
    for name in ACTIVATION_KEYS:
      setattr(self, name, QuantParam(jnp.float32(ACTIVATION_INIT[name])))
    for name, (_, identity) in STAT_REDUCERS.items():
      setattr(self, name, QuantStat(jnp.float32(identity)))

  def quantizer_params(self) -> dict[str, jax.Array]:
    """``{'log2_step', 'log2_range', 'clamp_low'}`` values."""
    return {name: getattr(self, name)[...] for name in ACTIVATION_KEYS}

  def reset_statistics(self) -> None:
    """Sets every statistic to its reduction's identity."""
    for name, (_, identity) in STAT_REDUCERS.items():
      getattr(self, name)[...] = jnp.float32(identity)

  def statistics(self) -> dict[str, jax.Array]:
    """The recorded statistics by name."""
    return {name: getattr(self, name)[...] for name in STAT_REDUCERS}

  def __call__(self, x: jax.Array, key: Optional[jax.Array] = None
               ) -> jax.Array:
    """Fake-quantizes ``x`` (shape and dtype kept); ``key``: the dither."""
    params = self.quantizer_params()
    if self.recording:
      stats = quantized_ops.input_statistics(x, params, self.settings)
      for name, value in stats.items():
        reduce_fn, _ = STAT_REDUCERS[name]
        variable = getattr(self, name)
        variable[...] = reduce_fn(variable[...], value)
    return quantized_ops.quantize_input(x, params, key, self.settings)


# ---------------------------------------------------------------------------
# The Linen-layout views the shared code reads.
# ---------------------------------------------------------------------------


def _str_keyed(tree: Any) -> Any:
  if isinstance(tree, Mapping):
    return {str(k): _str_keyed(v) for k, v in tree.items()}
  return tree[...] if isinstance(tree, nnx.Variable) else tree


def params_dict(model: nnx.Module) -> dict:
  """``nnx.state(model, nnx.Param)`` as a nested dict of arrays, str keys.

  The Linen ``params`` layout (an ``nnx.List`` index ``0`` becomes the key
  ``'0'``): what :func:`gdnsq_jax.summarize_bitwidths`,
  :func:`gdnsq_jax.calibration.calibrate_weights` and the export read.
  """
  return _str_keyed(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def linen_variables(model: nnx.Module) -> dict:
  """``{'params': ..., 'batch_stats': ...}``: the model's state as Linen's.

  ``nnx.Param`` (and :class:`QuantParam`) leaves go to ``params``,
  ``nnx.BatchStat`` (BatchNorm ``mean`` / ``var``) to ``batch_stats``, under
  the same module paths; other state (RNG streams, :class:`QuantStat`) is
  left out. For a model written alike in both APIs this is the Linen model's
  variables tree.
  """
  variables = {"params": params_dict(model)}
  stats = nnx.state(model, nnx.BatchStat)
  if stats:
    variables["batch_stats"] = _str_keyed(nnx.to_pure_dict(stats))
  return variables
