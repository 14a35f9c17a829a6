"""Calibration, true activation widths and frozen params of a quantized NNX model.

The NNX glue of :mod:`gdnsq_jax.calibration` (docs/method.md §6); every
formula is the shared one:

* weights: :func:`gdnsq_jax.calibration.calibrate_weights` on the model's
  params (:func:`gdnsq_jax.nnx_quantizers.params_dict`);
* activations: the model runs on every batch with its quantizers off
  (:func:`gdnsq_jax.quantized_ops.observing`: the full-precision network's
  activations) while each :class:`~gdnsq_jax.nnx_quantizers.ActivationQuantizer`
  reduces its input min / max into its ``QuantStat`` variables; the
  quantizer family (``settings.family.init_activation``) turns them into
  ``log2_step``, ``log2_range``, ``clamp_low``;
* frozen params: :func:`gdnsq_jax.calibration.trainable_mask` decides; a
  frozen ``QuantParam`` gets the metadata ``frozen=True``, selected by
  :data:`Frozen` and zeroed in gradients by :func:`zero_frozen`.

The model runs in its current mode (``model.eval()``: BatchNorm running
statistics, no dither); whatever else the passes change (BatchNorm
statistics in training mode, RNG counts) is restored afterwards, as Linen's
calibration drops mutable updates.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Iterable, Iterator, Mapping, NamedTuple, Optional

from flax import nnx
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from gdnsq_jax import calibration
from gdnsq_jax import nnx_quantize
from gdnsq_jax import quantized_ops
from gdnsq_jax.bitwidths import true_activation_widths
from gdnsq_jax.nnx_quantizers import QuantParam
from gdnsq_jax.nnx_quantizers import QuantStat
from gdnsq_jax.nnx_quantizers import params_dict
from gdnsq_jax.quantizer_params import ACTIVATION_KEYS

__all__ = [
    "Frozen",
    "NnxCalibration",
    "calibrate",
    "measure_activation_widths",
    "zero_frozen",
]


def Frozen(path: tuple, variable: Any) -> bool:  # pylint: disable=invalid-name
  """NNX filter: the quantizer params calibration froze (``frozen=True``)."""
  del path
  return (isinstance(variable, QuantParam)
          and bool(variable.get_metadata().get("frozen", False)))


class NnxCalibration(NamedTuple):
  """What :func:`calibrate` returns (the model itself is updated in place).

  Attributes:
    activation_ranges: quantizer path -> observed ``(min, max)`` input.
    frozen: '/'-joined paths of the params the optimizer must not move.
  """

  activation_ranges: dict[str, tuple[float, float]]
  frozen: tuple[str, ...]


@contextlib.contextmanager
def _recording(model: nnx.Module) -> Iterator[dict]:
  """Quantizers record fresh statistics; the rest of the state is restored."""
  saved = nnx.clone(nnx.state(model, nnx.Not(QuantStat)))
  quantizers = nnx_quantize.activation_quantizers(model)
  for q in quantizers.values():
    q.reset_statistics()
    q.recording = True
  try:
    yield quantizers
  finally:
    for q in quantizers.values():
      q.recording = False
    nnx.update(model, saved)


@functools.partial(nnx.jit, static_argnums=(2, 3))
def _forward(model, batch, call_kwargs, observe):
  with quantized_ops.observing() if observe else contextlib.nullcontext():
    model(batch, **dict(call_kwargs))


def _run(model: nnx.Module, batches: Iterable[Any],
         call_kwargs: Mapping[str, Any], observe: bool = False) -> None:
  """Calls ``model`` on every batch, jitted (one trace per shape and mode).

  ``observe``: with every quantizer off (the FP network's activations); a
  static argument, so the observation trace is never reused for a
  quantized pass.
  """
  ran = False
  for batch in batches:
    _forward(model, batch, tuple(sorted(call_kwargs.items())), observe)
    ran = True
  if not ran:
    raise ValueError("no batches given; pass at least one input batch")


def _set(variable: nnx.Variable, value: Any) -> None:
  variable[...] = jnp.asarray(value, variable[...].dtype)


def calibrate(model: nnx.Module, batches: Iterable[Any], *,
              bits: Optional[int] = None,
              call_kwargs: Optional[Mapping[str, Any]] = None
              ) -> NnxCalibration:
  """Calibrates every quantizer of ``model`` to ``bits`` bits, in place.

  Args:
    model: a model from :func:`gdnsq_jax.nnx_quantize.quantize_model`.
    batches: model inputs (the first positional argument of the call).
    bits: calibration width (default ``settings.calibration_bits``, 10);
      fixed-width (LSQ) quantizers take their own widths.
    call_kwargs: keyword arguments of the model call.

  Returns:
    The observed ranges and the frozen params (:class:`NnxCalibration`).

  Raises:
    ValueError: no batch, an activation quantizer the passes never called,
      or ``bits`` for fixed-width quantizers.
  """
  settings = nnx_quantize.quantization_plan(model).settings
  family = settings.family
  weight_bits, activation_bits = family.calibration_widths(settings, bits)
  with _recording(model) as quantizers:
    _run(model, batches, dict(call_kwargs or {}), observe=True)
    stats = {path: jax.device_get(q.statistics())
             for path, q in quantizers.items()}
  unobserved = sorted(p for p, s in stats.items() if s["input_count"] == 0)
  if unobserved:
    raise ValueError(
        f"activation quantizers {unobserved} were not called by the "
        "calibration forward pass; pass call_kwargs that run every layer")
  ranges = {}
  for path, quantizer in quantizers.items():
    s = stats[path]
    ranges[path] = (float(np.float32(s["input_min"])),
                    float(np.float32(s["input_max"])))
    for name, value in family.init_activation(s, activation_bits,
                                              settings).items():
      _set(getattr(quantizer, name), value)
  calibrated = calibration.calibrate_weights(params_dict(model), weight_bits,
                                             settings)
  flat = traverse_util.flatten_dict(calibrated, sep="/")
  for path, layer in nnx_quantize.quantized_layers(model).items():
    if isinstance(getattr(layer, "log2_step", None), QuantParam):
      _set(layer.log2_step, flat[f"{path}/log2_step"])
  return NnxCalibration(ranges, _mark_frozen(model, settings))


def _mark_frozen(model: nnx.Module, settings) -> tuple[str, ...]:
  """Sets ``frozen`` metadata from the shared trainable mask."""
  mask = traverse_util.flatten_dict(
      calibration.trainable_mask(params_dict(model), settings), sep="/")
  frozen = []
  for path, quantizer in nnx_quantize.activation_quantizers(model).items():
    for name in ACTIVATION_KEYS:
      is_frozen = not mask[f"{path}/{name}"]
      getattr(quantizer, name).set_metadata(frozen=is_frozen)
      if is_frozen:
        frozen.append(f"{path}/{name}")
  return tuple(frozen)


def zero_frozen(grads: nnx.State) -> nnx.State:
  """``grads`` with the :data:`Frozen` params' gradients set to 0.

  Takes the ``nnx.State`` that ``nnx.grad`` returns (its Variables carry the
  ``frozen`` metadata). A zero gradient gives a zero GDNSQ update (RAdam's
  moments stay 0 and the penalty does not depend on a frozen param), so the
  optimizer leaves those params where calibration put them.
  """

  def zero(path, variable):
    if Frozen(path, variable):
      return variable.replace(jnp.zeros_like(variable[...]))
    return variable

  return nnx.map_state(zero, grads)


def measure_activation_widths(model: nnx.Module, batches: Iterable[Any], *,
                              call_kwargs: Optional[Mapping[str, Any]] = None
                              ) -> dict[str, float]:
  """True activation widths over a pass (docs/method.md D11).

  ``log2(k_max - k_min + 1)`` of the union of the codes each quantizer
  produced over all batches (:func:`gdnsq_jax.bitwidths.
  true_activation_widths`), with the quantizers on; run it after
  ``model.eval()``.

  Returns:
    ``{quantizer path: width}``; pass it as ``summarize_bitwidths(
    params_dict(model), activation_widths=...)``.
  """
  with _recording(model) as quantizers:
    _run(model, batches, dict(call_kwargs or {}))
    codes = {path: {name: q.statistics()[name]
                    for name in ("code_min", "code_max")}
             for path, q in quantizers.items()}
  return true_activation_widths([jax.device_get(codes)])
