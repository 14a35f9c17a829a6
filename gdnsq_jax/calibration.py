"""Min / max calibration of quantizers to N bits (arXiv 2508.14004).

docs/method.md §6 (calibration runs before training; N = 10 by default):

* weights, per output channel c with range ``R_c = max W_c - min W_c``:
  ``l_c <- max(-12, log2(R_c / (2^N - 1)))``, so the differentiable width
  ``log2(R_c / s_c + 1)`` is exactly N, or less where the floor ``2^-12``
  binds (tiny ranges);
* activations, from the input range ``[m, M]`` observed over all calibration
  batches (min of mins, max of maxes) on the *full-precision* network: the
  observation pass runs with every quantizer off
  (:func:`gdnsq_jax.quantized_ops.observing`), so no upstream clamp distorts
  a downstream range (negative LayerNorm outputs, linear bottlenecks);
  ``b <- m``, ``l_s <- log2((M - m) / (2^N - 1))``, ``l_q <- l_s + N``; the
  clamp interval ``[b, b + q - s]`` is then exactly ``[m, M]`` with ``2^N``
  levels. With ``learnable_clamp_low=False`` b stays 0 and the grid covers
  ``[0, M]``; with ``unsigned_if_nonnegative`` a quantizer with ``m >= 0``
  gets ``b = 0``, frozen (the reference's unsigned quantizers).
* a constant input (``m == M``) gives a *frozen* quantizer: ``l_s = l_q = 0``,
  ``b = m`` (it outputs the constant; width 0, never penalised); its params
  are False in the :func:`trainable_mask`.

How a family starts its quantizers (GDNSQ, or LSQ at its fixed widths with
its own activation step) is the family's (:mod:`gdnsq_jax.families`).
Statistics come from the ``quant_stats`` collection that
:class:`gdnsq_jax.layers.QuantAct` sows when it is mutable; one jitted
function runs the model and reduces each batch, with no Python side effects.
:func:`measure_activation_widths` reuses it for the true activation widths
(``log2(k_max - k_min + 1)`` over a whole pass, docs/method.md D11).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from gdnsq_jax import quantized_ops
from gdnsq_jax.bitwidths import find_quantizers
from gdnsq_jax.bitwidths import key_path_name
from gdnsq_jax.bitwidths import true_activation_widths
from gdnsq_jax.layers import QUANT_STATS
from gdnsq_jax.channels import channel_range
from gdnsq_jax.quantizer_params import ACTIVATION_KEYS
from gdnsq_jax.settings import QuantSettings

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
    params: Mapping[str, Any], bits: int = 10,
    settings: Optional[QuantSettings] = None,
) -> dict:
  """Sets every weight step to give ``bits`` bits (floor ``2^-12``).

  ``l_c = max(-12, log2(R_c / (2^bits - 1)))`` (docs/method.md §6). A constant
  channel (``R_c = 0``) gets the floor, never NaN. Pure; works under jit.

  Args:
    params: the ``params`` collection of a quantized model.
    bits: the calibration bit-width N.
    settings: its family's weight init is used (default GDNSQ's).

  Returns:
    ``params`` with every weight quantizer's ``log2_step`` replaced.
  """
  family = (settings or QuantSettings()).family
  flat = _flat(params)
  for path in find_quantizers(params).weights:
    log2_step = jnp.asarray(flat[_key(path, "log2_step")])
    lo, hi = channel_range(flat[_key(path, "kernel")], log2_step.shape)
    flat[_key(path, "log2_step")] = family.init_weight(
        lo, hi, bits).astype(log2_step.dtype)
  return _unflat(flat)


def trainable_mask(
    params: Mapping[str, Any], settings: Optional[QuantSettings] = None
) -> Any:
  """Which params the optimizer may update (host-side, concrete params).

  The leaves ``settings.family`` freezes
  (:meth:`~gdnsq_jax.families.QuantizerFamily.frozen_activation_params`):
  every param of a frozen activation quantizer (``log2_step == log2_range
  == 0``); ``clamp_low`` when ``settings.learnable_clamp_low`` is False, or
  when it is 0 under ``settings.unsigned_if_nonnegative``; for the LSQ
  baseline every ``log2_range`` (LSQ ties the grid width to the step).

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
    node = {k: flat[_key(path, k)] for k in ACTIVATION_KEYS}
    frozen_leaves.update(
        _key(path, k)
        for k in settings.family.frozen_activation_params(node, settings))

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
          name: quantized_ops.STAT_REDUCERS[name][0](running[path][name],
                                                     value)
          for name, value in s.items()
      }
      for path, s in stats.items()
  }


def _initial_ranges(shapes: dict) -> dict:
  return {
      path: {
          name: jnp.full(v.shape, quantized_ops.STAT_REDUCERS[name][1],
                         v.dtype)
          for name, v in s.items()
      }
      for path, s in shapes.items()
  }


def _model_apply(model: Any) -> Callable[..., Any]:
  if not hasattr(model, "apply"):
    raise TypeError(
        f"model {model!r} has no apply method; pass a QuantizedModel or a "
        "Flax module built from the Quant layers of gdnsq_jax.layers"
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

  Weights from their kernels (:func:`calibrate_weights`); activations from
  the input ranges observed while the model runs on every batch with its
  quantizers off, i.e. on the full-precision network (docs/method.md §6).

  The family (``settings.family``) decides the widths and the activation
  grids: LSQ quantizers (``method='lsq'``) are calibrated to their own fixed
  widths, their activation step set to LSQ's initialisation ``2 mean(x -
  b) / sqrt(Qp)`` (Esser et al.; measured from the offset ``b = min``),
  capped at the min / max step: at 1-2 bits a min / max grid rounds almost
  every activation to one level.

  Args:
    model: a :class:`gdnsq_jax.QuantizedModel` or a Flax module using
      the Quant layers of :mod:`gdnsq_jax.layers`.
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
    ValueError: when no batch is given, an activation quantizer was never
      called by the calibration forward pass, or ``bits`` is given for
      fixed-width (LSQ) quantizers.
  """
  settings = settings or getattr(model, "settings", None) or QuantSettings()
  family = settings.family
  weight_bits, activation_bits = family.calibration_widths(settings, bits)
  apply_fn = _model_apply(model)
  apply_kwargs = dict(apply_kwargs or {})

  flat = _flat(calibrate_weights(variables["params"], weight_bits, settings))
  index = find_quantizers(variables["params"])
  with quantized_ops.observing():  # the FP network's activations
    ranges = _reduce_over_batches(
        apply_fn, variables, batches, apply_kwargs, _combine_ranges,
        _initial_ranges,
    )
  unobserved = sorted(set(index.activations) - set(ranges))
  if unobserved:
    raise ValueError(
        f"activation quantizers {unobserved} were not called by the "
        "calibration forward pass; pass apply_kwargs that run every layer"
    )

  activation_ranges = {}
  for path in index.activations:
    stats = jax.device_get(ranges[path])
    activation_ranges[path] = (float(np.float32(stats["input_min"])),
                               float(np.float32(stats["input_max"])))
    grid = family.init_activation(stats, activation_bits, settings)
    for name, value in grid.items():
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

