"""Integer export of a GDNSQ-quantized network (arXiv 2508.14004).

:func:`export_model` turns a trained :class:`gdnsq_jax.QuantizedModel` and
its variables into an :class:`IntegerExport`: plain numpy arrays plus a JSON
manifest. Per quantized layer (docs/method.md §2.1, §2.2):

* ``weight_codes`` -- ``k = round((W - z_c) / s_c)``, unsigned, packed for
  the layer's integer width ``ceil(max_c log2(k_max,c + 1))`` (see
  :mod:`gdnsq_jax.export.packing`); ``weight_step`` ``s_c = 2**log2_step`` and
  ``weight_zero`` ``z_c = min W[..., c]`` (float32, per channel or scalar);
* ``activation_step`` ``s``, ``activation_clamp_low`` ``b``,
  ``activation_clamp_high`` ``b + q - s`` and ``activation_levels``
  ``round(q / s - 1) + 1`` of its input quantizer; codes then lie in
  ``0 .. levels - 1`` and take ``ceil(log2 levels)`` bits;
* ``bias`` (float32) when the layer has one.

Layers are the quantizable kinds of :mod:`gdnsq_jax.layer_kinds` (conv,
depthwise included; dense; ``DenseGeneral``, the attention projections
included; einsum); steps and zero points have the shape of the layer's
``log2_step`` (one per output channel of its kernel,
:mod:`gdnsq_jax.channels`). Full-precision layers keep ``kernel`` / ``bias``
in float32; every other variable (BatchNorm not folded, LayerNorm, position
embeddings, weight layers of unsupported kinds such as ``nn.Embed``, ...) is
kept in float32 under ``variables/<collection>/<module path>/<name>`` and
runs in float in the integer inference.

BatchNorm folding (``fold_batch_norm=True``; docs/method.md §12, D15):
a BatchNorm in inference mode whose input is exactly the output of a conv /
dense (found by tracing the model) is folded. With ``m = scale /
sqrt(var + eps)`` and ``o = bn_bias - mean m``: into an FP layer's float
weights (``W' = W m``, ``bias' = bias m + o``); into a quantized layer's
float *epilogue* (``output_scale = m``, ``bias' = bias m + o``), so its
integer codes stay exactly those of training.

Sizes and BOPs (manifest ``layers[i]`` and ``totals``): ``bytes`` is the
storage of the layer's arrays as exported (packed codes, float32
parameters); ``fp32_bytes`` that of the same layer with a float32 kernel and
bias; ``macs`` counts multiply-accumulates per example (output elements x
kernel elements per output channel, padding included); ``bops = macs x
weight bits x activation bits`` with 32 bits for float operands.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Sequence

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from gdnsq_jax import channels
from gdnsq_jax import layer_kinds
from gdnsq_jax import layers as qlayers
from gdnsq_jax import quantized_ops
from gdnsq_jax.bitwidths import FLOAT_BITS
from gdnsq_jax.bitwidths import is_float
from gdnsq_jax.bitwidths import WIDTH_TOLERANCE
from gdnsq_jax.quantizer_params import INPUT_QUANTIZER
from gdnsq_jax.export import packing
from gdnsq_jax.settings import QuantSettings
from gdnsq_jax.tracing import TracedLayer
from gdnsq_jax.tracing import trace_layers

__all__ = [
    "EXPORT_FORMAT",
    "ExportError",
    "IntegerExport",
    "NotConvergedError",
    "export_model",
]

EXPORT_FORMAT = "gdnsq-jax-integer-export"
EXPORT_VERSION = 1
_INT32_MAX = 2**31 - 1
_FLOAT32_INTEGER_LIMIT = 2**23  # quantize_weight leaves larger codes unrounded


class ExportError(ValueError):
  """The model or its variables cannot be exported as integers."""


class NotConvergedError(ExportError):
  """True bit-widths exceed the targets (the run has not converged)."""


@dataclasses.dataclass(frozen=True)
class IntegerExport:
  """An exported network: a JSON-able manifest and named numpy arrays.

  Attributes:
    manifest: layer table, shapes, bit-widths, sizes, BOPs (module docs).
    arrays: ``layers/<path>/<name>`` and ``variables/<collection>/<path>``
      arrays (packed codes are flat ``uint8``).
  """

  manifest: dict
  arrays: dict[str, np.ndarray]

  @property
  def layers(self) -> list[dict]:
    """The manifest's per-layer entries, in call order."""
    return self.manifest["layers"]

  def layer_arrays(self, path: str) -> dict[str, np.ndarray]:
    """``{name: array}`` of the layer at module ``path``."""
    prefix = f"layers/{path}/"
    return {k[len(prefix):]: v for k, v in self.arrays.items()
            if k.startswith(prefix) and "/" not in k[len(prefix):]}

  def variables(self) -> dict:
    """The kept float variables as a nested ``{collection: {...}}`` tree."""
    flat = {k[len("variables/"):]: v for k, v in self.arrays.items()
            if k.startswith("variables/")}
    return traverse_util.unflatten_dict(flat, sep="/") if flat else {}


def _node(tree: Mapping[str, Any], path: str) -> Mapping[str, Any]:
  for part in path.split("/"):
    tree = tree[part]
  return tree


def _f32(x) -> np.ndarray:
  return np.asarray(jax.device_get(x), np.float32)


@jax.jit
def _fake_quant_kernel(kernel, log2_step):
  return quantized_ops.quantize_kernel(kernel, log2_step, None,
                                       QuantSettings())


def _weight_codes(kernel, log2_step):
  """Codes, step and zero point of the kernel the fake-quant model uses.

  The codes are read off the jitted ``quantize_weight`` output
  ``W_hat ~ s k + z`` (float32 error far below s / 2), so they are the codes
  of the evaluated network even where XLA's division differs from IEEE.
  """
  kernel = jnp.asarray(kernel, jnp.float32)
  log2_step = jnp.asarray(log2_step, jnp.float32)
  w_hat = np.asarray(_fake_quant_kernel(kernel, log2_step), np.float64)
  step = _f32(jnp.exp2(log2_step))
  lo, _ = channels.channel_range(kernel, step.shape)
  zero = _f32(lo)
  codes = np.round((w_hat - zero) / step.astype(np.float64))
  return codes, step, zero


def _activation_grid(quantizer):
  """Step, clamps and level count of an input quantizer (docs/method.md §2.2).

  The clamps are computed as ``quantize_activation`` computes them, and
  ``levels - 1 = round((high - low) / s)`` is its largest possible code
  (``round(q / s - 1)`` up to float32 rounding).
  """
  log2_step = jnp.asarray(quantizer["log2_step"], jnp.float32).reshape(())
  log2_range = jnp.asarray(quantizer["log2_range"], jnp.float32).reshape(())
  step, width = jnp.exp2(log2_step), jnp.exp2(log2_range)
  low = jnp.asarray(quantizer["clamp_low"], jnp.float32).reshape(())
  high = low + width - step
  levels = int(jnp.maximum(jnp.round((high - low) / step), 0.0)) + 1
  return _f32(step), _f32(low), _f32(high), levels


def _fold_factors(variables, path, epsilon):
  """``(m, o)`` with ``bn(y) = y m + o`` for an inference-mode BatchNorm.

  Flax: ``bn(y) = (y - mean) rsqrt(var + eps) scale + bias``.
  """
  flat = traverse_util.flatten_dict(variables, sep="/")
  get = lambda collection, name: flat.get(f"{collection}/{path}/{name}")
  mean, var = get("batch_stats", "mean"), get("batch_stats", "var")
  if mean is None or var is None:
    raise ExportError(
        f"BatchNorm {path!r} has no batch_stats mean / var to fold; pass the "
        "variables with their 'batch_stats' collection")
  params = {n: get("params", n) for n in ("scale", "bias")}
  params = {n: v for n, v in params.items() if v is not None}
  mean, var = _f32(mean), _f32(var)
  m = 1.0 / np.sqrt(var + np.float32(epsilon), dtype=np.float32)
  if "scale" in params:
    m = m * _f32(params["scale"])
  offset = -mean * m
  if "bias" in params:
    offset = offset + _f32(params["bias"])
  return m.astype(np.float32), offset.astype(np.float32)


def _quantized_layer(node, layer, arrays, entry):
  """Fills ``arrays`` / ``entry`` for a quantized conv / dense."""
  if "log2_step" in node:
    codes, step, zero = _weight_codes(node["kernel"], node["log2_step"])
    max_code = int(codes.max())
    if max_code >= _FLOAT32_INTEGER_LIMIT:
      raise ExportError(
          f"layer {layer.path!r} has weight codes up to {max_code} (> 23 bits);"
          " its quantizer is far from any low-bit target. Train it further "
          "or keep it FP (QuantizationRules.exclude)")
    bits = packing.bits_for_max_code(max_code)
    arrays["weight_codes"] = packing.pack_codes(codes.astype(np.int64), bits)
    arrays["weight_step"], arrays["weight_zero"] = step, zero
    # The true width of the layer: max over channels of log2(k_max,c + 1).
    entry.update(weight_bits=bits,
                 true_weight_bits=float(np.log2(max_code + 1.0)),
                 weight_container_bits=packing.container_bits(bits),
                 per_channel=bool(step.ndim))
  else:
    arrays["kernel"] = _f32(node["kernel"])
    entry.update(weight_bits=FLOAT_BITS, true_weight_bits=None)
    max_code = None
  if INPUT_QUANTIZER in node:
    step, low, high, levels = _activation_grid(node[INPUT_QUANTIZER])
    arrays["activation_step"] = step
    arrays["activation_clamp_low"] = low
    arrays["activation_clamp_high"] = high
    arrays["activation_levels"] = np.asarray(levels, np.int32)
    entry.update(activation_bits=packing.bits_for_max_code(levels - 1),
                 activation_levels=levels,
                 true_activation_bits=float(np.log2(levels)))
    if max_code is not None:
      fan_in = channels.entries_per_channel(layer.kernel_shape,
                                            np.shape(node["log2_step"]))
      if (levels - 1) * max_code * fan_in > _INT32_MAX:
        raise ExportError(
            f"layer {layer.path!r}: codes up to {levels - 1} x {max_code} "
            f"summed over {fan_in} inputs can overflow the int32 accumulator;"
            " such widths are not a low-bit network (train to the target)")
  else:
    entry.update(activation_bits=FLOAT_BITS, activation_levels=None,
                 true_activation_bits=None)


def _array_spec(arrays: Mapping[str, np.ndarray]) -> dict:
  return {k: {"shape": list(v.shape), "dtype": str(v.dtype)}
          for k, v in sorted(arrays.items())}


def _width_violations(entries, weight_bits, activation_bits):
  problems = []
  for e in entries:
    if not e["quantized"]:
      continue
    w, a = e["true_weight_bits"], e["true_activation_bits"]
    if (not is_float(weight_bits) and w is not None
        and w > weight_bits + WIDTH_TOLERANCE):
      problems.append(f"{e['path']}: weight {w:.3f} bits > {weight_bits}")
    if (not is_float(activation_bits) and a is not None
        and a > activation_bits + WIDTH_TOLERANCE):
      problems.append(
          f"{e['path']}: activation {a:.3f} bits > {activation_bits}")
  return problems


def export_model(
    qmodel: Any,
    variables: Mapping[str, Any],
    input_shape: Sequence[int],
    *,
    input_dtype: Any = jnp.float32,
    apply_kwargs: Optional[Mapping[str, Any]] = None,
    fold_batch_norm: bool = False,
    weight_bits: float = FLOAT_BITS,
    activation_bits: float = FLOAT_BITS,
    activation_widths: Optional[Mapping[str, float]] = None,
    force: bool = False,
    traced: Optional[Sequence[TracedLayer]] = None,
) -> IntegerExport:
  """Exports a quantized model's variables as integer codes (module docs).

  Args:
    qmodel: a :class:`gdnsq_jax.QuantizedModel` (its ``model`` is exported).
    variables: trained variables (``params``, ``batch_stats``, ...).
    input_shape: one example's shape, without the batch axis.
    input_dtype: dtype of the model input.
    apply_kwargs: JSON-able keyword arguments of ``apply`` for inference
      (e.g. ``{'train': False}``); recorded in the manifest.
    fold_batch_norm: fold inference-mode BatchNorms into the preceding layer.
    weight_bits: target weight width; layers above it are refused
      (``>= FLOAT_BITS``, the default: unchecked).
    activation_bits: target activation width (``>= FLOAT_BITS``: unchecked).
    activation_widths: measured true activation widths by quantizer path
      (``<layer>/input_quantizer``, e.g. from
      :func:`gdnsq_jax.measure_activation_widths`, docs/method.md D11); a layer
      without one is judged by its level count ``log2(levels)``.
    force: export despite widths above the targets (recorded in manifest).
    traced: the model's layers in inference mode, when the caller traced
      them (the NNX front end, :mod:`gdnsq_jax.nnx_export`, passing its
      :class:`gdnsq_jax.nnx_quantize.QuantizationPlan` as ``qmodel``); by
      default :func:`gdnsq_jax.tracing.trace_layers` of ``qmodel.model``.

  Returns:
    The :class:`IntegerExport`.

  Raises:
    NotConvergedError: a true width exceeds its target and not ``force``;
      the message names every offending layer.
    ExportError: the quantizers are disabled, a layer was never called, or
      its integer accumulator could overflow.
  """
  settings = qmodel.settings
  if not settings.family.exportable:
    raise ExportError(
        f"qmodel.settings.method={settings.method!r}: export writes GDNSQ's "
        "unclipped weight grids, and the LSQ baseline clips weight codes; "
        "train with method='gdnsq' to export")
  if not settings.enabled:
    raise ExportError(
        "qmodel.settings.enabled is False: its quantizers are the identity, "
        "so there are no integer codes to export; build the QuantizedModel "
        "with QuantSettings(enabled=True)")
  variables = {k: v for k, v in variables.items() if k != qlayers.QUANT_STATS}
  if traced is None:
    traced = trace_layers(qmodel.model, variables, input_shape, input_dtype,
                          apply_kwargs)
  quantized = qmodel.quantized_paths
  arrays, entries, used = {}, [], set()
  for layer in traced:
    if layer.kind not in layer_kinds.QUANTIZABLE:
      continue  # kept in 'variables', run in float (module docs)
    node = _node(variables["params"], layer.path)
    used.update(f"params/{layer.path}/{k}" for k in traverse_util.flatten_dict(
        dict(node), sep="/"))
    entry = {"path": layer.path, "kind": layer.kind,
             "quantized": layer.path in quantized,
             "kernel_shape": list(layer.kernel_shape), "macs": layer.macs}
    own = {}
    if entry["quantized"]:
      _quantized_layer(node, layer, own, entry)
      if activation_widths and entry["activation_levels"] is not None:
        key = f"{layer.path}/{INPUT_QUANTIZER}"
        if key in activation_widths:
          entry["true_activation_bits"] = float(activation_widths[key])
    else:
      own["kernel"] = _f32(node["kernel"])
      entry.update(weight_bits=FLOAT_BITS, true_weight_bits=None,
                   activation_bits=FLOAT_BITS, activation_levels=None,
                   true_activation_bits=None)
    if "bias" in node:
      own["bias"] = _f32(node["bias"])
    entry["batch_norm"] = None
    if fold_batch_norm and layer.batch_norm is not None:
      m, offset = _fold_factors(variables, layer.batch_norm,
                                layer.batch_norm_epsilon)
      bias = own.get("bias", np.zeros_like(m))
      own["bias"] = (bias * m + offset).astype(np.float32)
      if "kernel" in own:
        own["kernel"] = (own["kernel"] * m).astype(np.float32)
      else:
        own["output_scale"] = m
      entry["batch_norm"] = layer.batch_norm
      used.update(f"{c}/{layer.batch_norm}/{n}" for c in
                  ("params", "batch_stats") for n in
                  ("scale", "bias", "mean", "var"))
    entry["arrays"] = _array_spec(own)
    entry["bytes"] = int(sum(a.nbytes for a in own.values()))
    bias_size = own["bias"].size if "bias" in own else 0
    entry["fp32_bytes"] = 4 * (int(np.prod(layer.kernel_shape)) + bias_size)
    entry["bops"] = layer.macs * entry["weight_bits"] * entry["activation_bits"]
    arrays.update({f"layers/{layer.path}/{k}": v for k, v in own.items()})
    entries.append(entry)

  others = {}
  for key, value in traverse_util.flatten_dict(variables, sep="/").items():
    if key not in used:
      value = np.asarray(jax.device_get(value))
      if np.issubdtype(value.dtype, np.floating):
        value = value.astype(np.float32)
      others[f"variables/{key}"] = value
  arrays.update(others)

  violations = _width_violations(entries, weight_bits, activation_bits)
  if violations and not force:
    raise NotConvergedError(
        "the run has not converged: true bit-widths exceed the targets "
        f"(W{weight_bits} A{activation_bits}) in "
        f"{len(violations)} place(s):\n  " + "\n  ".join(violations)
        + "\nTrain longer, or pass force=True (CLI: --force) to export anyway")
  other_bytes = int(sum(v.nbytes for v in others.values()))
  size = sum(e["bytes"] for e in entries) + other_bytes
  fp32 = sum(e["fp32_bytes"] for e in entries) + other_bytes
  manifest = {
      "format": EXPORT_FORMAT,
      "version": EXPORT_VERSION,
      "input_shape": list(input_shape),
      "input_dtype": str(np.dtype(input_dtype)),
      "apply_kwargs": dict(apply_kwargs or {}),
      "fold_batch_norm": bool(fold_batch_norm),
      "targets": {"weight_bits": weight_bits,
                  "activation_bits": activation_bits},
      "width_violations": violations,
      "forced": bool(violations) and force,
      "layers": entries,
      "variables": _array_spec(others),
      "totals": {
          "size_bytes": int(size),
          "fp32_size_bytes": int(fp32),
          "compression": fp32 / size if size else math.inf,
          "macs": int(sum(e["macs"] for e in entries)),
          "bops": int(sum(e["bops"] for e in entries)),
          "quantized_layers": sum(e["quantized"] for e in entries),
          "fp_layers": [e["path"] for e in entries if not e["quantized"]],
      },
  }
  return IntegerExport(manifest, arrays)
