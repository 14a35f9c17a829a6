r"""Integer inference of an exported GDNSQ network.

:func:`integer_apply` runs the *original* Flax model (unmodified) under
``nn.intercept_methods``: every exported conv / dense call is replaced by a
computation that reads only the export's arrays, and a folded BatchNorm by
the identity; every other module runs on the kept float variables.

Quantized layer (weights and input both quantized). Activation codes
``k_x = round((clip(x, b, b + q - s_a) - b) / s_a)`` (clipped to
``0 .. levels - 1``) and the unpacked weight codes ``k_w`` are integers; the
fake-quant layer computes ``conv(x_hat, W_hat)`` with ``x_hat = s_a k_x + b``
inside the image, 0 in its zero padding, and ``W_hat[c] = s_w[c] k_w + z_w[c]``
(:mod:`gdnsq_jax.quantizers` forms them as ``c + s (round(v) - v)``, equal
up to float32 rounding). With ``valid`` = 1 inside the image and 0 in the
padding (and in input-dilation holes):

.. math::

  conv(\hat x, \hat W)[c] = s_a s_w[c]\, conv(k_x, k_w)[c]
      + s_a z_w[c]\, conv(k_x, 1)
      + b\, s_w[c]\, conv(valid, k_w)[c]
      + b\, z_w[c]\, conv(valid, 1)

``conv(k_x, k_w)`` and ``conv(k_x, 1)`` (window sums of the codes, per group)
are integer convolutions accumulated in int32
(``preferred_element_type=jnp.int32``) on int8 / int16 operands; the last two
terms depend only on the input's spatial shape. The epilogue, in float32,
multiplies by the scales, then by ``output_scale`` (a folded BatchNorm) and
adds ``bias``. A dense-like layer (``nn.Dense``, ``nn.DenseGeneral``,
``nn.Einsum``: the einsum of :func:`gdnsq_jax.layer_kinds.einsum_equation`)
is the same with sums over its contracted axes and no padding: the integer
einsum ``einsum(k_x, k_w)`` with int32 accumulation, the code sums
``einsum(k_x, 1)``, the kernel sums ``einsum(1, k_w)`` and the count of
contracted entries, the per-channel ``s_w``, ``z_w`` (one per output channel,
:mod:`gdnsq_jax.channels`) laid out along the output's axes.

Everything that is not a weight layer runs in float, as in the fake-quant
model: LayerNorm, softmax, GELU, residual sums, pooling, and attention's
activation x activation products (``q k^T``, the weighted sum of ``v``),
which take the float outputs of the integer ``query`` / ``key`` / ``value``
projections (docs/method.md §5). So do weight layers of unsupported kinds
(``nn.Embed``, ...), from the float variables the export keeps.

A layer with only one quantized side (``A >= 32`` or ``W >= 32``) and every FP
layer run Flax's float computation (the same ``lax`` call) on the
dequantized / float operands. The result equals the fake-quant evaluation
``qmodel.apply(variables, x, train=False)`` up to float32 rounding, and a
rare activation code flipping at a rounding tie because of it (see
:mod:`gdnsq_jax.export.verification`).

Its StableHLO artifact (``jax.export``): :mod:`gdnsq_jax.export.stablehlo`.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from gdnsq_jax import layer_kinds
from gdnsq_jax.export import packing
from gdnsq_jax.export.exporter import ExportError
from gdnsq_jax.export.exporter import IntegerExport

__all__ = [
    "exported_layer_apply",
    "integer_apply",
]


def _code_dtype(max_code: int):
  """The narrowest signed integer type holding codes up to ``max_code``."""
  if max_code <= 127:
    return jnp.int8
  if max_code <= 32767:
    return jnp.int16
  return jnp.int32


def _activation_codes(arrays, x):
  """``clip(round((clip(x, b, high) - b) / s), 0, levels - 1)``, int32."""
  step, low = arrays["activation_step"], arrays["activation_clamp_low"]
  high = arrays["activation_clamp_high"]
  xf = x.astype(jnp.float32)
  c = jnp.where(xf < low, low, jnp.where(xf > high, high, xf))
  codes = jnp.round((c - low) / step).astype(jnp.int32)
  return jnp.clip(codes, 0, arrays["activation_levels"] - 1)


def _weight_codes(entry, arrays):
  shape = tuple(entry["kernel_shape"])
  codes = packing.unpack_codes_jax(
      arrays["weight_codes"], entry["weight_bits"], int(np.prod(shape)))
  return codes.reshape(shape)


def _dequantized_kernel(entry, arrays):
  if "kernel" in arrays:
    return jnp.asarray(arrays["kernel"], jnp.float32)
  step, zero = arrays["weight_step"], arrays["weight_zero"]
  return step * _weight_codes(entry, arrays).astype(jnp.float32) + zero


def _conv_geometry(module: nn.Conv):
  """Flax ``nn.Conv``'s strides, dilations, padding as lax arguments."""
  kernel_size = ((module.kernel_size,) if isinstance(module.kernel_size, int)
                 else tuple(module.kernel_size))
  n = len(kernel_size)

  def broadcast(value):  # None means 1, as in flax
    value = 1 if value is None else value
    return (value,) * n if isinstance(value, int) else tuple(value)

  strides = broadcast(module.strides)
  lhs_dilation = broadcast(module.input_dilation)
  rhs_dilation = broadcast(module.kernel_dilation)
  padding = nn.linear.canonicalize_padding(module.padding, n)
  pre_pad = None
  if padding in ("CIRCULAR", "REFLECT"):
    dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, rhs_dilation)]
    pre_pad = ([(0, 0)] + [((k - 1) // 2, k // 2) for k in dilated]
               + [(0, 0)], {"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding])
    padding = "VALID"
  elif padding == "CAUSAL":
    pre_pad = ([(0, 0), (rhs_dilation[0] * (kernel_size[0] - 1), 0), (0, 0)],
               "constant")
    padding = "VALID"
  spatial = "".join("HWDXYZ"[i] for i in range(n))
  numbers = lax.conv_dimension_numbers(
      (1,) * (n + 2), (1,) * (n + 2),
      (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"))

  def conv(lhs, rhs, groups=1, integer=True):
    if pre_pad is not None:
      lhs = jnp.pad(lhs, pre_pad[0], mode=pre_pad[1])
    return lax.conv_general_dilated(
        lhs, rhs, strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=numbers,
        feature_group_count=groups,
        precision=None if integer else module.precision,
        preferred_element_type=jnp.int32 if integer else None)

  return kernel_size, conv


def _flat_batch(x, kernel_size):
  """``x`` with its batch axes as one, and a function restoring them."""
  n_batch = x.ndim - (len(kernel_size) + 1)
  batch_shape = x.shape[:n_batch]
  x = x.reshape((-1,) + x.shape[n_batch:])
  return x, lambda y: y.reshape(batch_shape + y.shape[1:])


def _integer_conv(module: nn.Conv, entry, arrays, x, kx=None):
  """The four-term integer convolution of the module docstring (float32)."""
  if module.mask is not None:
    raise ExportError(
        f"layer {entry['path']!r} is a masked conv; integer inference does "
        "not support kernel masks (keep it FP with QuantizationRules.exclude)")
  kernel_size, conv = _conv_geometry(module)
  x, restore_batch = _flat_batch(x, kernel_size)
  kx = _activation_codes(arrays, x) if kx is None else kx.reshape(x.shape)
  kw = _weight_codes(entry, arrays)
  max_code = max(entry["activation_levels"] - 1, 2**entry["weight_bits"] - 1)
  dtype = _code_dtype(max_code)
  groups = module.feature_group_count
  in_per_group, out = kw.shape[-2], kw.shape[-1]
  acc = conv(kx.astype(dtype), kw.astype(dtype), groups)
  group_ones = jnp.ones(kernel_size + (in_per_group, groups), dtype)
  code_sums = jnp.repeat(conv(kx.astype(dtype), group_ones, groups),
                         out // groups, axis=-1)
  valid = jnp.ones((1,) + x.shape[1:-1] + (1,), jnp.int32)
  valid_kernel_sums = conv(
      valid, jnp.sum(kw, axis=-2, keepdims=True, dtype=jnp.int32))
  valid_counts = conv(valid, jnp.ones(kernel_size + (1, 1), jnp.int32))
  valid_counts = valid_counts * in_per_group
  y = _epilogue(arrays, acc, code_sums, valid_kernel_sums, valid_counts)
  return restore_batch(y)


def _split(equation):
  lhs, rest = equation.split(",")
  rhs, out = rest.split("->")
  return lhs, rhs, out


def _output_layout(values, equation, kernel_ndim):
  """Per-channel values (``log2_step``'s layout) along the output's axes."""
  _, rhs, out = _split(equation)
  v = jnp.asarray(values, jnp.float32)
  v = v.reshape((1,) * (kernel_ndim - v.ndim) + v.shape)
  keep = [i for i, c in enumerate(rhs) if c in out]  # the rest have size 1
  letters = [rhs[i] for i in keep]
  order = sorted(range(len(keep)), key=lambda j: out.index(letters[j]))
  v = jnp.transpose(v.reshape([v.shape[i] for i in keep]), order)
  letters = [letters[j] for j in order]
  return v.reshape([v.shape[letters.index(c)] if c in letters else 1
                    for c in out])


def _dense_bias(bias, equation, kernel_shape):
  """A dense-like layer's bias (its output channels) along the output."""
  _, rhs, out = _split(equation)
  shape = [kernel_shape[rhs.index(c)] if c in rhs else 1 for c in out]
  bias = jnp.asarray(bias)
  return bias.reshape(shape) if bias.size == np.prod(shape) else bias


def _integer_einsum(equation, entry, arrays, x, kx=None):
  """The integer einsum of a dense-like layer (module docstring)."""
  lhs, rhs, out = _split(equation)
  kx = _activation_codes(arrays, x) if kx is None else kx.reshape(x.shape)
  kw = _weight_codes(entry, arrays)
  dtype = _code_dtype(max(entry["activation_levels"] - 1,
                          2**entry["weight_bits"] - 1))
  einsum = lambda a, b: jnp.einsum(equation, a, b,
                                   preferred_element_type=jnp.int32)
  acc = einsum(kx.astype(dtype), kw.astype(dtype))
  # Ones keep the size of the letters shared or summed away, 1 elsewhere.
  ones = lambda spec, other, shape, dt: jnp.ones(
      [d if c in other or c not in out else 1 for c, d in zip(spec, shape)],
      dt)
  code_sums = einsum(kx.astype(dtype), ones(rhs, lhs, kw.shape, dtype))
  kernel_sums = einsum(ones(lhs, rhs, kx.shape, jnp.int32),
                       kw.astype(jnp.int32))
  sizes = dict(zip(lhs, kx.shape)) | dict(zip(rhs, kw.shape))
  count = jnp.int32(np.prod([d for c, d in sizes.items() if c not in out],
                            dtype=np.int64))
  laid_out = dict(arrays)
  for name in ("weight_step", "weight_zero"):
    laid_out[name] = _output_layout(arrays[name], equation, kw.ndim)
  if "bias" in arrays:
    laid_out["bias"] = _dense_bias(arrays["bias"], equation, kw.shape)
  return _epilogue(laid_out, acc, code_sums, kernel_sums, count)


def _epilogue(arrays, acc, code_sums, valid_kernel_sums, valid_counts):
  """``s_a (s_w acc + z_w sums) + b (s_w valid_k + z_w valid_n)``, scaled."""
  f = lambda v: jnp.asarray(v).astype(jnp.float32)
  s_a, b = arrays["activation_step"], arrays["activation_clamp_low"]
  s_w, z_w = arrays["weight_step"], arrays["weight_zero"]
  y = (s_a * (s_w * f(acc) + z_w * f(code_sums))
       + b * (s_w * f(valid_kernel_sums) + z_w * f(valid_counts)))
  if "output_scale" in arrays:
    y = y * arrays["output_scale"]
  if "bias" in arrays:
    y = y + arrays["bias"]
  return y


def _float_layer(module, entry, arrays, x, kx=None, equation=None):
  """The layer's float computation (as Flax's) on dequantized / float data.

  ``x`` is replaced by ``x_hat = s_a k_x + b`` when the input is quantized,
  the kernel by ``W_hat = s_w k_w + z_w`` when the weights are.
  """
  if "activation_step" in arrays:
    kx = _activation_codes(arrays, x) if kx is None else kx
    codes = kx.astype(jnp.float32)
    x = (arrays["activation_step"] * codes
         + arrays["activation_clamp_low"]).astype(x.dtype)
  kernel = _dequantized_kernel(entry, arrays)
  if getattr(module, "mask", None) is not None:  # nn.Conv's kernel mask
    kernel = kernel * module.mask
  dtype = module.dtype or jnp.result_type(x.dtype, kernel.dtype)
  x, kernel = x.astype(dtype), kernel.astype(dtype)
  if equation is None:  # a conv
    kernel_size, conv = _conv_geometry(module)
    x, restore_batch = _flat_batch(x, kernel_size)
    y = restore_batch(conv(x, kernel, module.feature_group_count,
                           integer=False))
  else:
    y = jnp.einsum(equation, x, kernel, precision=module.precision)
  if "output_scale" in arrays:
    y = y * arrays["output_scale"]
  if "bias" in arrays:
    y = y + (arrays["bias"] if equation is None else
             _dense_bias(arrays["bias"], equation, kernel.shape))
  return y


def exported_layer_apply(module: nn.Module, entry: Mapping[str, Any],
                         arrays: Mapping[str, Any], inputs: jax.Array,
                         activation_codes: Optional[jax.Array] = None,
                         call_args: Sequence[Any] = (),
                         call_kwargs: Optional[Mapping[str, Any]] = None,
                         equation: Optional[str] = None,
                         ) -> jax.Array:
  """One exported weight layer on ``inputs`` (integer path when possible).

  Args:
    module: the bound layer being replaced (a kind of
      :data:`gdnsq_jax.layer_kinds.QUANTIZABLE`).
    entry: its manifest entry.
    arrays: its arrays (``IntegerExport.layer_arrays``).
    inputs: the layer input.
    activation_codes: the input's integer codes if already known (int32,
      ``inputs``' shape); by default computed from ``inputs``.
    call_args: the layer call's arguments after the input (``nn.Einsum``'s
      equation).
    call_kwargs: the layer call's keyword arguments.
    equation: a dense-like layer's ``'lhs,rhs->out'`` einsum, when the
      caller knows it (the NNX front end, :mod:`gdnsq_jax.nnx_export`, whose
      layers are not Linen modules); by default derived from the Linen
      ``module``. Without one, ``module`` is a conv (Linen's or NNX's: the
      same attribute names).

  Returns:
    The layer output (folded BatchNorm included), in the layer's dtype.
  """
  out_dtype = module.dtype or jnp.result_type(inputs.dtype, jnp.float32)
  if (equation is None
      and layer_kinds.kind_of(module) in layer_kinds.DENSE_LIKE):
    equation = layer_kinds.einsum_equation(
        module, inputs, entry["kernel_shape"], call_args, call_kwargs)
  if "weight_codes" in arrays and "activation_step" in arrays:
    if equation is None:
      y = _integer_conv(module, entry, arrays, inputs, activation_codes)
    else:
      y = _integer_einsum(equation, entry, arrays, inputs, activation_codes)
  else:
    y = _float_layer(module, entry, arrays, inputs, activation_codes,
                     equation)
  return y.astype(out_dtype)


def integer_apply(model: nn.Module, export: IntegerExport, x: jax.Array,
                  arrays: Optional[Mapping[str, Any]] = None) -> Any:
  """Runs the exported network on ``x`` with integer codes (module docs).

  Jittable; under ``jax.jit(lambda x: integer_apply(model, export, x))`` the
  arrays are compile-time constants. To pass them as arguments instead,
  jit ``lambda arrays, x: integer_apply(model, export, x, arrays)``.

  Args:
    model: the unmodified Flax model the export came from.
    export: an :class:`IntegerExport` (from ``export_model`` or
      ``load_export``).
    x: a batch of inputs, ``(batch,) + manifest['input_shape']``.
    arrays: replaces ``export.arrays`` (same keys), e.g. traced arguments.

  Returns:
    What ``model.apply`` returns (the logits).

  Raises:
    ExportError: the model calls a weight layer the export does not hold.
  """
  if arrays is not None:
    export = IntegerExport(export.manifest, dict(arrays))
  entries = {e["path"]: e for e in export.layers}
  folded = {e["batch_norm"] for e in entries.values() if e["batch_norm"]}

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    path = "/".join(module.path)
    if isinstance(module, nn.BatchNorm) and path in folded:
      return args[0] if args else kwargs["x"]
    if layer_kinds.kind_of(module) not in layer_kinds.QUANTIZABLE:
      return next_fun(*args, **kwargs)  # float, from the kept variables
    if path not in entries:
      raise ExportError(
          f"the model calls layer {path!r}, which the export does not hold;"
          " export with inputs and apply_kwargs that call every layer")
    inputs = layer_kinds.layer_input(args, kwargs)
    return exported_layer_apply(
        module, entries[path], export.layer_arrays(path), inputs,
        call_args=args[1:], call_kwargs={k: v for k, v in kwargs.items()
                                         if k != "inputs"})

  with nn.intercept_methods(intercept):
    return model.apply(export.variables(), x,
                       **export.manifest["apply_kwargs"])
