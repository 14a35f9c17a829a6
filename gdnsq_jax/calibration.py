"""Min / max calibration of GDNSQ quantizers to N bits (arXiv 2508.14004).

docs/method.md §6 (calibration runs before training; N = 10 by default):

* weights, per output channel c with range ``R_c = max W_c - min W_c``:
  ``l_c <- max(-12, log2(R_c / (2^N - 1)))``, so the differentiable width
  ``log2(R_c / s_c + 1)`` is exactly N, or less where the floor ``2^-12``
  binds (tiny ranges);
* activations, from the input range ``[m, M]`` observed over all calibration
  batches (min of mins, max of maxes) in eval mode, with the weights already
  calibrated and every activation quantizer at its 20-bit init state:
  ``b <- m``, ``l_s <- log2((M - m) / (2^N - 1))``, ``l_q <- l_s + N``; the
  clamp interval ``[b, b + q - s]`` is then exactly ``[m, M]`` with ``2^N``
  levels. With ``learnable_clamp_low=False`` b stays 0 and the grid covers
  ``[0, M]``.
* a constant input (``m == M``) gives a *frozen* quantizer: ``l_s = l_q = 0``,
  ``b = m`` (it outputs the constant; width 0, never penalised); its params
  are False in the :func:`trainable_mask`.

Statistics come from the ``quant_stats`` collection that
:class:`gdnsq_jax.layers.QuantAct` sows when it is mutable; one jitted
function runs the model and reduces each batch, with no Python side effects.
:func:`measure_activation_widths` reuses it for the true activation widths
(``log2(k_max - k_min + 1)`` over a whole pass, docs/method.md D11).
"""

from __future__ import annotations

import dataclasses

from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from gdnsq_jax import layers as qlayers
from gdnsq_jax.bitwidths import find_quantizers
from gdnsq_jax.bitwidths import key_path_name
from gdnsq_jax.bitwidths import true_activation_widths
from gdnsq_jax.layers import QUANT_STATS
from gdnsq_jax.layers import QuantSettings
from gdnsq_jax.quantizer_params import ACTIVATION_INIT
from gdnsq_jax.quantizer_params import WEIGHT_LOG2_STEP_INIT
from gdnsq_jax.quantizers import weight_channel_range

__all__ = [
    "CalibrationResult",
    "calibrate",
    "calibrate_weights",
    "measure_activation_widths",
    "trainable_mask",
]

class CalibrationResult(NamedTuple):
  """What :func:`calibrate` returns.

  Attributes:
    variables: the calibrated variables (all collections of the input).
    trainable: bool pytree matching ``variables['params']``; False for
      frozen quantizer params (use with ``optax.masked`` /
      ``optax.multi_transform``).
    activation_ranges: quantizer path -> observed ``(min, max)`` input.
  """

  variables: dict
  trainable: Any
  activation_ranges: dict[str, tuple[float, float]]


def _flat(params: Mapping[str, Any]) -> dict[str, Any]:
  return traverse_util.flatten_dict(params, sep="/")


def _unflat(flat: Mapping[str, Any]) -> dict:
  return traverse_util.unflatten_dict(dict(flat), sep="/")


def _key(path: str, name: str) -> str:
  """Flat key of param ``name`` of the quantizer at ``path`` ('' = root)."""
  return f"{path}/{name}" if path else name


def calibrate_weights(
    params: Mapping[str, Any], bits: int = 10
) -> dict:
  """Sets every weight step to give ``bits`` bits (floor ``2^-12``).

  ``l_c = max(-12, log2(R_c / (2^bits - 1)))`` (docs/method.md §6). A constant
  channel (``R_c = 0``) gets the floor, never NaN. Pure; works under jit.

  Args:
    params: the ``params`` collection of a quantized model.
    bits: the calibration bit-width N.

  Returns:
    ``params`` with every weight quantizer's ``log2_step`` replaced.
  """
  flat = _flat(params)
  for path in find_quantizers(params).weights:
    log2_step = jnp.asarray(flat[_key(path, "log2_step")])
    lo, hi = weight_channel_range(
        flat[_key(path, "kernel")], per_channel=log2_step.ndim > 0
    )
    fitted = jnp.log2((hi - lo) / (2.0**bits - 1.0))
    flat[_key(path, "log2_step")] = jnp.maximum(
        WEIGHT_LOG2_STEP_INIT, fitted
    ).astype(log2_step.dtype)
  return _unflat(flat)


def trainable_mask(
    params: Mapping[str, Any], settings: Optional[QuantSettings] = None
) -> Any:
  """Which params the optimizer may update (host-side, concrete params).

  False for every param of a frozen activation quantizer
  (``log2_step == log2_range == 0``) and, when
  ``settings.learnable_clamp_low`` is False, for every ``clamp_low``; with
  ``settings.method == 'lsq'`` for every ``log2_range`` (LSQ ties the grid
  width to the step).

  Args:
    params: the ``params`` collection (concrete values).
    settings: quantization settings (default :class:`QuantSettings()`).

  Returns:
    A pytree of Python bools with ``params``' structure.
  """
  settings = settings if settings is not None else QuantSettings()
  flat = _flat(params)
  frozen_leaves = set()
  for path in find_quantizers(params).activations:
    if (
        float(flat[_key(path, "log2_step")]) == 0.0
        and float(flat[_key(path, "log2_range")]) == 0.0
    ):
      frozen_leaves.update(_key(path, k) for k in ACTIVATION_INIT)
    else:
      if not settings.learnable_clamp_low:
        frozen_leaves.add(_key(path, "clamp_low"))
      if settings.method == "lsq":  # its width follows the step: unused
        frozen_leaves.add(_key(path, "log2_range"))

  def is_trainable(key_path, _):
    return key_path_name(key_path) not in frozen_leaves

  return jax.tree_util.tree_map_with_path(is_trainable, params)


def _stats_by_quantizer(stats: Mapping[str, Any]) -> dict[str, dict]:
  """``{quantizer path: {stat name: scalar}}`` from the sown collection."""
  out: dict[str, dict] = {}
  for key, value in _flat(stats).items():
    path, _, name = key.rpartition("/")
    out.setdefault(path, {})[name] = value
  return out


def _reduce_over_batches(
    apply_fn: Callable[..., Any],
    variables: Mapping[str, Any],
    batches: Iterable[Any],
    apply_kwargs: Mapping[str, Any],
    combine: Callable[[Any, dict], Any],
    initial: Callable[[dict], Any],
) -> Any:
  """Runs the model on each batch (jitted) and folds its stats with combine."""
  variables = {k: v for k, v in variables.items() if k != QUANT_STATS}
  apply_kwargs = dict(apply_kwargs)
  # Collections the caller lets the model update (e.g. 'batch_stats' with
  # train=True); their new values are dropped.
  mutable = [QUANT_STATS] + list(apply_kwargs.pop("mutable", []))

  def observe(variables, batch):
    _, state = apply_fn(variables, batch, mutable=mutable, **apply_kwargs)
    return _stats_by_quantizer(state.get(QUANT_STATS, {}))

  @jax.jit
  def step(running, variables, batch):
    return combine(running, observe(variables, batch))

  running = None
  for batch in batches:
    if running is None:
      running = initial(jax.eval_shape(observe, variables, batch))
    running = step(running, variables, batch)
  if running is None:
    raise ValueError("no batches given; pass at least one input batch")
  return running


def _combine_ranges(running: dict, stats: dict) -> dict:
  return {
      path: {
          name: qlayers.STAT_REDUCERS[name][0](running[path][name], value)
          for name, value in s.items()
      }
      for path, s in stats.items()
  }


def _initial_ranges(shapes: dict) -> dict:
  return {
      path: {
          name: jnp.full(v.shape, qlayers.STAT_REDUCERS[name][1], v.dtype)
          for name, v in s.items()
      }
      for path, s in shapes.items()
  }


def _model_apply(model: Any) -> Callable[..., Any]:
  if not hasattr(model, "apply"):
    raise TypeError(
        f"model {model!r} has no apply method; pass a QuantizedModel or a "
        "Flax module built from QuantConv / QuantDense"
    )
  return model.apply


def calibrate(
    model: Any,
    variables: Mapping[str, Any],
    batches: Iterable[Any],
    *,
    bits: Optional[int] = None,
    settings: Optional[QuantSettings] = None,
    apply_kwargs: Optional[Mapping[str, Any]] = None,
) -> CalibrationResult:
  """Calibrates every weight and activation quantizer to ``bits`` bits.

  Weights first (:func:`calibrate_weights`); then activation quantizers are
  reset to their 20-bit init and the model runs in eval mode on every batch,
  recording each quantizer's input min / max (docs/method.md §6).

  LSQ quantizers (``settings.method == 'lsq'``) are calibrated to their own
  fixed widths; their activation step is LSQ's initialisation ``2 mean(x -
  b) / sqrt(Qp)`` (Esser et al.; measured from the offset ``b = min``),
  capped at the min / max step: at 1-2 bits a min / max grid rounds almost
  every activation to one level.

  Args:
    model: a :class:`gdnsq_jax.QuantizedModel` or a Flax module using
      :class:`gdnsq_jax.QuantConv` / ``QuantDense`` / ``QuantAct``.
    variables: its variables (``params``, ``batch_stats``, ...).
    batches: iterable of model inputs (the first positional argument, e.g.
      images without labels or augmentation).
    bits: calibration bit-width (default ``settings.calibration_bits``).
    settings: defaults to ``model.settings`` or :class:`QuantSettings()`.
    apply_kwargs: extra keyword arguments of ``apply`` selecting eval mode
      (e.g. ``{'train': False}``); ``{'train': True, 'mutable':
      ['batch_stats']}`` observes with batch statistics instead (their
      updates are dropped).

  Returns:
    A :class:`CalibrationResult`.

  Raises:
    ValueError: when no batch is given or an activation quantizer was never
      called by the calibration forward pass.
  """
  settings = settings or getattr(model, "settings", None) or QuantSettings()
  if settings.method == "lsq":
    # An LSQ grid's width follows its step, so the 20-bit activation init
    # does not exist there: observe through GDNSQ quantizers instead (the
    # same calibrated weights, activations at the 20-bit init).
    if not (dataclasses.is_dataclass(model)
            and isinstance(getattr(model, "settings", None), QuantSettings)):
      raise ValueError(
          "calibrating LSQ quantizers needs a model with a QuantSettings "
          "`settings` field that reaches its quantizers (a QuantizedModel "
          "from gdnsq_jax.quantize_model, or a Flax module passing its "
          "settings to its QuantConv / QuantDense / QuantAct), so that the "
          "observation pass can switch them to GDNSQ's; got "
          f"{type(model).__name__}")
    model = dataclasses.replace(
        model, settings=dataclasses.replace(settings, method="gdnsq"))
  apply_fn = _model_apply(model)
  bits = settings.calibration_bits if bits is None else bits
  activation_bits = bits
  if settings.method == "lsq":  # fixed widths: each quantizer at its own
    if bits != settings.calibration_bits:
      raise ValueError(
          f"bits={bits} but LSQ quantizers have fixed widths (weights "
          f"{settings.weight_bits}, activations {settings.activation_bits}); "
          "calibrate them without bits=")
    bits, activation_bits = settings.weight_bits, settings.activation_bits
  apply_kwargs = dict(apply_kwargs or {})

  flat = _flat(calibrate_weights(variables["params"], bits))
  index = find_quantizers(variables["params"])
  for path in index.activations:
    for name, value in ACTIVATION_INIT.items():
      flat[_key(path, name)] = jnp.full_like(flat[_key(path, name)], value)
  observed = dict(variables, params=_unflat(flat))

  ranges = _reduce_over_batches(
      apply_fn, observed, batches, apply_kwargs, _combine_ranges,
      _initial_ranges,
  )
  unobserved = sorted(set(index.activations) - set(ranges))
  if unobserved:
    raise ValueError(
        f"activation quantizers {unobserved} were not called by the "
        "calibration forward pass; pass apply_kwargs that run every layer"
    )

  activation_ranges = {}
  levels = np.float32(2.0**activation_bits - 1.0)
  for path in index.activations:
    m = np.float32(ranges[path]["input_min"])
    big_m = np.float32(ranges[path]["input_max"])
    activation_ranges[path] = (float(m), float(big_m))
    low = m if settings.learnable_clamp_low or m == big_m else np.float32(0)
    if big_m > low:
      step = (big_m - low) / levels
      if settings.method == "lsq":  # LSQ's init 2 <|x|> / sqrt(Qp), from b
        mean = np.float32(ranges[path]["input_sum"]
                          / max(float(ranges[path]["input_count"]), 1.0))
        lsq_step = 2.0 * max(mean - low, 0.0) / np.sqrt(levels)
        step = min(step, lsq_step) if lsq_step > 0 else step
      log2_step = np.log2(step, dtype=np.float32)
      log2_range = np.float32(log2_step + activation_bits)
    else:  # constant input (or all below a clamp frozen at 0): frozen
      log2_step = log2_range = np.float32(0.0)
    for name, value in (
        ("log2_step", log2_step),
        ("log2_range", log2_range),
        ("clamp_low", low),
    ):
      old = jnp.asarray(flat[_key(path, name)])
      flat[_key(path, name)] = jnp.asarray(value, old.dtype)
  params = _unflat(flat)
  return CalibrationResult(
      variables=dict(variables, params=params),
      trainable=trainable_mask(params, settings),
      activation_ranges=activation_ranges,
  )


def measure_activation_widths(
    model: Any,
    variables: Mapping[str, Any],
    batches: Iterable[Any],
    *,
    apply_kwargs: Optional[Mapping[str, Any]] = None,
) -> dict[str, float]:
  """True activation widths over an evaluation pass (docs/method.md D11).

  For each activation quantizer: ``log2(k_max - k_min + 1)`` of the union of
  the integer codes it produced over all batches
  (:func:`gdnsq_jax.bitwidths.true_activation_widths`, the one definition
  training and export share).

  Args:
    model: as for :func:`calibrate`.
    variables: the model variables.
    batches: iterable of model inputs.
    apply_kwargs: extra keyword arguments of ``apply`` (eval mode).

  Returns:
    ``{quantizer path: width}``, the paths of
    :func:`gdnsq_jax.bitwidths.find_quantizers`; pass it as
    ``summarize_bitwidths(params, activation_widths=...)``.
  """

  def combine(running, stats):
    return {
        path: {"code_min": jnp.minimum(running[path]["code_min"],
                                       s["code_min"]),
               "code_max": jnp.maximum(running[path]["code_max"],
                                       s["code_max"])}
        for path, s in stats.items()
    }

  def initial(shapes):
    return {path: {"code_min": jnp.float32(np.inf),
                   "code_max": jnp.float32(-np.inf)} for path in shapes}

  ranges = _reduce_over_batches(
      _model_apply(model), variables, batches, dict(apply_kwargs or {}),
      combine, initial,
  )
  return true_activation_widths([jax.device_get(ranges)])

