"""Differentiable and true bit-widths of GDNSQ quantizers (arXiv 2508.14004).

Definitions (docs/method.md §2.3):

* differentiable weight width per output channel
  ``beta_w,c = log2(R_c + s_c) - log2 s_c = log2(R_c / s_c + 1)``;
* differentiable activation width ``beta_a = log2 q - log2 s``;
* true width = ``log2(number of integer levels actually used)``: for weights
  ``log2(round(R_c / s_c) + 1)`` per channel (layer value = max over
  channels); for activations ``log2(k_max - k_min + 1)`` of the codes seen
  during an evaluation pass (docs/method.md D11: max over the whole pass).

Sound: ``beta <= B - 1e-3`` implies true width ``<= B`` for B in 1..9.

Params-tree conventions (the layers of :mod:`gdnsq_jax.layers` follow them):

* a *weight quantizer* is any dict holding ``kernel`` and ``log2_step``
  (``log2_step`` one per output channel, broadcasting against the kernel as
  :mod:`gdnsq_jax.channels` says: ``(out,)`` for conv / dense, or ``()``);
* an *activation quantizer* is any dict holding ``log2_step``,
  ``log2_range`` and ``clamp_low`` (scalars). A quantized conv/dense keeps its
  input quantizer in the child dict ``input_quantizer``.

Any ``Mapping`` works, e.g. the ``nnx.State`` of an NNX model quantized by
:mod:`gdnsq_jax.nnx_quantize` (as ``nnx.Optimizer`` passes it to the
penalty), whose ``nnx.List`` children have int keys: their paths name them
by ``str`` (``blocks/0/conv``).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gdnsq_jax.channels import channel_range
from gdnsq_jax.quantizer_params import ACTIVATION_KEYS
from gdnsq_jax.quantizer_params import WEIGHT_KEYS

__all__ = [
    "ACTIVATION_KEYS",
    "FLOAT_BITS",
    "WIDTH_TOLERANCE",
    "BitwidthSummary",
    "QuantizerIndex",
    "activation_bitwidth",
    "activation_code_range",
    "activation_level_bound",
    "differentiable_bitwidths",
    "find_quantizers",
    "is_converged",
    "is_float",
    "key_path_name",
    "summarize_bitwidths",
    "true_activation_widths",
    "true_bitwidth_from_codes",
    "true_weight_bitwidth",
    "weight_bitwidth",
]


FLOAT_BITS = 32
"""A width target at or above this means "not quantized" (docs/method.md D12).

The one spelling of "no quantization": ``QuantSettings(activation_bits=32)``
creates no activation quantizers, the penalty and the convergence test leave
such a target unconstrained, and the export records float layers with it.
"""

WIDTH_TOLERANCE = 1e-6
"""Slack of ``true width <= target``: log2 of an integer level count."""


def is_float(bits: float) -> bool:
  """Whether a width target means "not quantized" (``>= FLOAT_BITS``)."""
  return bits >= FLOAT_BITS


def key_path_name(key_path: Sequence[Any]) -> str:
  """The '/'-joined name of a pytree key path (``a/b/0/c``)."""
  return jax.tree_util.keystr(tuple(key_path), simple=True, separator="/")


def weight_bitwidth(kernel: jax.Array, log2_step: jax.Array) -> jax.Array:
  """Differentiable weight bit-width ``log2(R + s) - log2 s`` per channel.

  Args:
    kernel: Flax kernel, any layout.
    log2_step: one per output channel, broadcasting against ``kernel``
      (:mod:`gdnsq_jax.channels`; ``(out,)`` for conv / dense), or scalar.

  Returns:
    float32 array of ``log2_step``'s shape. Gradients flow into
    ``log2_step`` and into the channel max / min of ``kernel``.
  """
  log2_step = jnp.asarray(log2_step, jnp.float32)
  lo, hi = channel_range(kernel, log2_step.shape)
  return jnp.log2(hi - lo + jnp.exp2(log2_step)) - log2_step


def activation_bitwidth(
    log2_step: jax.Array, log2_range: jax.Array
) -> jax.Array:
  """Differentiable activation bit-width ``log2 q - log2 s``."""
  return jnp.asarray(log2_range, jnp.float32) - jnp.asarray(
      log2_step, jnp.float32
  )


def true_bitwidth_from_codes(
    code_min: jax.Array, code_max: jax.Array
) -> jax.Array:
  """``log2(code_max - code_min + 1)``: bits for the levels actually used."""
  levels = jnp.maximum(jnp.asarray(code_max) - jnp.asarray(code_min), 0) + 1
  return jnp.log2(levels.astype(jnp.float32))


def true_weight_bitwidth(kernel: jax.Array, log2_step: jax.Array) -> jax.Array:
  """True weight width ``log2(round(R_c / s_c) + 1)`` per channel (no grad)."""
  kernel = jax.lax.stop_gradient(kernel)
  log2_step = jax.lax.stop_gradient(jnp.asarray(log2_step, jnp.float32))
  lo, hi = channel_range(kernel, log2_step.shape)
  code_max = jnp.round((hi - lo) / jnp.exp2(log2_step))
  return true_bitwidth_from_codes(jnp.zeros_like(code_max), code_max)


def activation_code_range(
    x: jax.Array,
    log2_step: jax.Array,
    log2_range: jax.Array,
    clamp_low: jax.Array,
) -> tuple[jax.Array, jax.Array]:
  """Min and max integer code an activation quantizer produces on ``x``."""
  x = jax.lax.stop_gradient(x).astype(jnp.float32)
  step = jnp.exp2(jnp.asarray(log2_step, jnp.float32))
  low = jnp.asarray(clamp_low, jnp.float32)
  high = low + jnp.exp2(jnp.asarray(log2_range, jnp.float32)) - step
  codes = jnp.round((jnp.clip(x, low, high) - low) / step)
  return jnp.min(codes), jnp.max(codes)


def activation_level_bound(
    log2_step: jax.Array, log2_range: jax.Array
) -> jax.Array:
  """Analytic upper bound ``log2(round(q / s - 1) + 1)`` of the true width."""
  ratio = jnp.exp2(activation_bitwidth(log2_step, log2_range))
  return jnp.log2(jnp.maximum(jnp.round(ratio - 1.0), 0.0) + 1.0)


# ---------------------------------------------------------------------------
# Walking a params tree.
# ---------------------------------------------------------------------------


class QuantizerIndex(NamedTuple):
  """Paths ('/'-joined) of the quantizers found in a params tree, sorted."""

  weights: tuple[str, ...]
  activations: tuple[str, ...]


def _walk(tree: Any, prefix: tuple[str, ...] = ()):
  # Keys may be ints (an ``nnx.State``'s ``nnx.List`` children): sorted
  # within their type, named by str(key).
  if isinstance(tree, Mapping):
    yield prefix, tree
    for k in sorted(tree, key=lambda k: (isinstance(k, str), k)):
      yield from _walk(tree[k], prefix + (str(k),))


def _child(node: Mapping[Any, Any], name: str) -> Any:
  if name in node:
    return node[name]
  for key in node:  # an int key named by its str
    if str(key) == name:
      return node[key]
  raise KeyError(name)


def _get(tree: Mapping[str, Any], path: str) -> Mapping[str, Any]:
  node = tree
  for part in path.split("/") if path else ():
    node = _child(node, part)
  return node


def _unwrap(params: Mapping[str, Any]) -> Mapping[str, Any]:
  """Accepts either ``{'params': ...}`` variables or the params dict."""
  if isinstance(params, Mapping) and set(params) >= {"params"} and not any(
      k in params for k in WEIGHT_KEYS
  ):
    return params["params"]
  return params


def find_quantizers(params: Mapping[str, Any]) -> QuantizerIndex:
  """Locates weight and activation quantizers by the tree conventions."""
  params = _unwrap(params)
  weights, activations = [], []
  for path, node in _walk(params):
    keys = set(node)
    name = "/".join(path)
    if keys >= set(WEIGHT_KEYS):
      weights.append(name)
    elif keys >= set(ACTIVATION_KEYS):
      activations.append(name)
  return QuantizerIndex(tuple(weights), tuple(activations))


def differentiable_bitwidths(
    params: Mapping[str, Any],
    index: Optional[QuantizerIndex] = None,
) -> tuple[jax.Array, jax.Array]:
  """All differentiable bit-widths of a model, flattened.

  This is the ``bitwidth_fn`` that :func:`gdnsq_jax.exterior_point_penalty`
  expects.

  Args:
    params: a params tree (or ``{'params': ...}`` variables).
    index: quantizer locations; found from ``params`` if omitted.

  Returns:
    ``(weight_widths, activation_widths)``: float32 vectors holding every
    weight channel of every quantized layer, and every activation quantizer.
  """
  params = _unwrap(params)
  index = index or find_quantizers(params)
  w = [
      jnp.ravel(weight_bitwidth(n["kernel"], n["log2_step"]))
      for n in (_get(params, p) for p in index.weights)
  ]
  a = [
      jnp.ravel(activation_bitwidth(n["log2_step"], n["log2_range"]))
      for n in (_get(params, p) for p in index.activations)
  ]
  empty = jnp.zeros((0,), jnp.float32)
  return (
      jnp.concatenate(w) if w else empty,
      jnp.concatenate(a) if a else empty,
  )


class BitwidthSummary(NamedTuple):
  """Per-layer and model-level bit-widths.

  Attributes:
    weight_layers: path -> (max, mean) over channels of the weight width.
    activation_layers: path -> activation width.
    weight_max: max over layers of the per-layer max (convergence check).
    weight_mean: mean over layers of the per-layer max.
    activation_max: max over activation quantizers.
    activation_mean: mean over activation quantizers.
  """

  weight_layers: dict[str, tuple[float, float]]
  activation_layers: dict[str, float]
  weight_max: float
  weight_mean: float
  activation_max: float
  activation_mean: float


def summarize_bitwidths(
    params: Mapping[str, Any],
    *,
    true: bool = True,
    activation_widths: Optional[Mapping[str, float]] = None,
    fixed_weight_bits: Optional[float] = None,
) -> BitwidthSummary:
  """Bit-width table of a model (host-side, for logs and reports).

  Args:
    params: a params tree (or ``{'params': ...}`` variables).
    true: integer-level (true) widths; False gives differentiable widths.
    activation_widths: measured true activation widths by quantizer path
      (e.g. max over an evaluation pass). Missing entries fall back to the
      analytic bound :func:`activation_level_bound` when ``true``.
    fixed_weight_bits: the width of fixed-bit weight quantizers (the LSQ
      baseline, :mod:`gdnsq_jax.lsq`), which clip codes to ``2^bits``
      levels: true weight widths are capped at it.

  Returns:
    A :class:`BitwidthSummary`; empty categories report 0.
  """
  params = _unwrap(params)
  index = find_quantizers(params)
  weight_layers = {}
  for path in index.weights:
    node = _get(params, path)
    fn = true_weight_bitwidth if true else weight_bitwidth
    b = np.asarray(fn(node["kernel"], node["log2_step"]))
    if true and fixed_weight_bits is not None:
      b = np.minimum(b, np.float32(fixed_weight_bits))
    weight_layers[path] = (float(b.max()), float(b.mean()))
  activation_layers = {}
  for path in index.activations:
    node = _get(params, path)
    if true and activation_widths is not None and path in activation_widths:
      activation_layers[path] = float(activation_widths[path])
    elif true:
      activation_layers[path] = float(
          activation_level_bound(node["log2_step"], node["log2_range"])
      )
    else:
      activation_layers[path] = float(
          activation_bitwidth(node["log2_step"], node["log2_range"])
      )
  w_max = [m for m, _ in weight_layers.values()]
  a = list(activation_layers.values())
  return BitwidthSummary(
      weight_layers=weight_layers,
      activation_layers=activation_layers,
      weight_max=max(w_max, default=0.0),
      weight_mean=float(np.mean(w_max)) if w_max else 0.0,
      activation_max=max(a, default=0.0),
      activation_mean=float(np.mean(a)) if a else 0.0,
  )


def is_converged(
    summary: BitwidthSummary, weight_bits: float, activation_bits: float
) -> bool:
  """GDNSQ's convergence test: every true width on or below its target.

  ``max true weight width <= weight_bits`` and ``max true activation width
  <= activation_bits`` (up to :data:`WIDTH_TOLERANCE`); a target of
  :data:`FLOAT_BITS` or more is unconstrained (docs/method.md D11, D12).

  Args:
    summary: true widths (:func:`summarize_bitwidths`).
    weight_bits: target weight width.
    activation_bits: target activation width.

  Returns:
    Whether the model is converged.
  """
  ok = is_float(weight_bits) or (
      summary.weight_max <= weight_bits + WIDTH_TOLERANCE)
  if not is_float(activation_bits):
    ok = ok and summary.activation_max <= activation_bits + WIDTH_TOLERANCE
  return bool(ok)


def true_activation_widths(
    batch_stats: Iterable[Mapping[str, Any]]
) -> dict[str, float]:
  """True activation widths over a whole pass (docs/method.md D11).

  The one definition used by training (convergence), calibration and export:
  per quantizer, the *union* of the integer codes over every batch --
  ``log2(max code_max - min code_min + 1)`` -- not the max of per-batch
  widths (two batches with codes {0, 1} and {2, 3} use 4 levels: 2 bits).

  Args:
    batch_stats: per batch, the sown ``quant_stats`` collection (host or
      device arrays; nested dicts, possibly tuples from repeated ``sow``),
      or ``{quantizer path: {'code_min': .., 'code_max': ..}}``.

  Returns:
    ``{quantizer path: width}`` for every quantizer that produced codes, the
    paths of :func:`find_quantizers`.
  """
  ranges: dict[str, list[float]] = {}
  for stats in batch_stats:
    for key_path, value in jax.tree_util.tree_leaves_with_path(stats):
      keys = [k for k in key_path
              if not isinstance(k, jax.tree_util.SequenceKey)]
      name = key_path_name(keys[-1:])
      if name not in ("code_min", "code_max"):
        continue
      lo_hi = ranges.setdefault(key_path_name(keys[:-1]), [np.inf, -np.inf])
      v = np.asarray(jax.device_get(value), np.float64)
      if name == "code_min":
        lo_hi[0] = min(lo_hi[0], float(v.min()))
      else:
        lo_hi[1] = max(lo_hi[1], float(v.max()))
  return {
      path: float(true_bitwidth_from_codes(lo, hi))
      for path, (lo, hi) in ranges.items()
      if np.isfinite(lo) and np.isfinite(hi)
  }
