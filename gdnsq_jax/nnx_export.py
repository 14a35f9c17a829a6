"""Integer export, integer inference and its verification for NNX models.

The NNX glue of :mod:`gdnsq_jax.export` (docs/method.md §12); the codes,
packing, BatchNorm folding, integer kernels and checks are the shared ones:

* :func:`export_model` -- the NNX model's state in Linen's layout
  (:func:`gdnsq_jax.nnx_quantizers.linen_variables`) and its inference-mode
  trace (:func:`gdnsq_jax.nnx_tracing.trace_calls`) go to
  :func:`gdnsq_jax.export.export_model`: the same manifest and arrays;
* :func:`integer_apply` -- runs a copy of the NNX model in eval mode in which
  every exported weight layer computes
  :func:`gdnsq_jax.export.inference.exported_layer_apply` from the export's
  arrays (int32-accumulated integer convs / einsums), a folded BatchNorm is
  the identity, and every other module (LayerNorm, attention's products, an
  unfolded BatchNorm, embeddings) runs in float on the variables the export
  keeps;
* :func:`export_inference` -- that function lowered with ``jax.export``
  (StableHLO; the arrays are constants), served with
  :func:`gdnsq_jax.export.load_inference`;
* :func:`compare_layers` -- teacher-forced, layer by layer: each exported
  layer recomputed from the fake-quant model's own input and activation
  codes; with :func:`gdnsq_jax.export.compare_logits` this is the Linen
  export's verification (:mod:`gdnsq_jax.export.verification`).

The layers are swapped, on a copy, for subclasses calling the exported
computation (the same surgery as :mod:`gdnsq_jax.nnx_quantize`); the model
passed in is never changed.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

from flax import nnx
from flax import traverse_util
import jax
import jax.numpy as jnp

from gdnsq_jax import layer_kinds
from gdnsq_jax import nnx_quantize
from gdnsq_jax import nnx_tracing
from gdnsq_jax.bitwidths import FLOAT_BITS
from gdnsq_jax.export import exporter
from gdnsq_jax.export import inference
from gdnsq_jax.export import stablehlo
from gdnsq_jax.export.exporter import ExportError
from gdnsq_jax.export.exporter import IntegerExport
from gdnsq_jax.export.verification import relative_error
from gdnsq_jax.nnx_quantizers import ActivationQuantizer
from gdnsq_jax.nnx_quantizers import linen_variables

__all__ = [
    "compare_layers",
    "export_inference",
    "export_model",
    "integer_apply",
]


def _eval_copy(model: nnx.Module) -> nnx.Module:
  copy = nnx.merge(*nnx.split(model))
  copy.eval()
  return copy


def export_model(model: nnx.Module, input_shape: Sequence[int], *,
                 input_dtype: Any = jnp.float32,
                 fold_batch_norm: bool = False,
                 weight_bits: float = FLOAT_BITS,
                 activation_bits: float = FLOAT_BITS,
                 activation_widths: Optional[Mapping[str, float]] = None,
                 force: bool = False) -> IntegerExport:
  """Exports a trained quantized NNX model as integer codes.

  Args:
    model: a model from :func:`gdnsq_jax.nnx_quantize.quantize_model`.
    input_shape: one example's shape, without the batch axis.
    input_dtype: the input dtype.
    fold_batch_norm: fold inference-mode BatchNorms into the layer before.
    weight_bits: target weight width checked (default: unchecked).
    activation_bits: target activation width checked.
    activation_widths: measured true widths by quantizer path
      (:func:`gdnsq_jax.nnx_calibration.measure_activation_widths`).
    force: export despite widths above the targets.

  Returns:
    The :class:`gdnsq_jax.export.IntegerExport` (as the Linen export's).

  Raises:
    NotConvergedError, ExportError: as :func:`gdnsq_jax.export.export_model`.
  """
  plan = nnx_quantize.quantization_plan(model)
  copy = _eval_copy(model)
  sample = jax.ShapeDtypeStruct((1,) + tuple(input_shape), input_dtype)
  traced = nnx_tracing.trace_calls(copy, (sample,))
  return exporter.export_model(
      plan, linen_variables(copy), input_shape, input_dtype=input_dtype,
      apply_kwargs={}, fold_batch_norm=fold_batch_norm,
      weight_bits=weight_bits, activation_bits=activation_bits,
      activation_widths=activation_widths, force=force, traced=traced)


def _with_kept_variables(model: nnx.Module, export: IntegerExport
                         ) -> nnx.Module:
  """An eval-mode copy holding the float variables the export keeps."""
  kept = traverse_util.flatten_dict(export.variables(), sep="/")

  def replace(path, variable):
    collection = ("params" if isinstance(variable, nnx.Param) else
                  "batch_stats" if isinstance(variable, nnx.BatchStat)
                  else None)
    key = f"{collection}/" + "/".join(str(p) for p in path)
    if collection is None or key not in kept:
      return variable
    return variable.replace(jnp.asarray(kept[key], variable[...].dtype))

  graphdef, state = nnx.split(model)
  copy = nnx.merge(graphdef, nnx.map_state(replace, state))
  copy.eval()
  return copy


def _equation(module, inputs, entry, args, kwargs) -> Optional[str]:
  if entry["kind"] in layer_kinds.DENSE_LIKE:
    return nnx_tracing.einsum_equation(module, inputs, entry["kernel_shape"],
                                       args, kwargs)
  return None


def _swap(module: nnx.Module, make_call: Callable) -> None:
  # Not cached: the calls close over one export / one comparison.
  cls = type(module)
  module.__class__ = type(f"Exported{cls.__name__}", (cls,),
                          {"__call__": make_call(cls.__call__),
                           "__module__": cls.__module__})


def _split_input(args, kwargs):
  """``(input, other args, other kwargs)`` of a layer call."""
  if args:
    return args[0], args[1:], kwargs
  kwargs = dict(kwargs)
  name = "inputs" if "inputs" in kwargs else "x"
  return kwargs.pop(name), (), kwargs


def integer_apply(model: nnx.Module, export: IntegerExport, x: jax.Array,
                  arrays: Optional[Mapping[str, Any]] = None) -> Any:
  """Runs the exported network on ``x`` with integer codes (module docs).

  Jittable; under ``jax.jit(lambda x: integer_apply(model, export, x))`` the
  arrays are constants (:func:`export_inference`).

  Args:
    model: the NNX model the export came from (quantized or its FP twin;
      only its structure and code are used).
    export: the :class:`gdnsq_jax.export.IntegerExport`.
    x: a batch of inputs.
    arrays: replaces ``export.arrays`` (same keys), e.g. traced arguments.

  Returns:
    What the model returns (the logits).

  Raises:
    ExportError: the model calls a weight layer the export does not hold.
  """
  if arrays is not None:
    export = IntegerExport(export.manifest, dict(arrays))
  entries = {e["path"]: e for e in export.layers}
  folded = {e["batch_norm"] for e in export.layers if e["batch_norm"]}
  copy = _with_kept_variables(model, export)
  paths = nnx_tracing.module_paths(copy)

  def exported_call(base):
    def __call__(self, *args, **kwargs):
      path = paths[id(self)]
      if path not in entries:
        raise ExportError(
            f"the model calls layer {path!r}, which the export does not "
            "hold; export with an input that calls every layer")
      inputs, rest, kwargs = _split_input(args, kwargs)
      entry = entries[path]
      return inference.exported_layer_apply(
          self, entry, export.layer_arrays(path), inputs,
          equation=_equation(self, inputs, entry, rest, kwargs))
    return __call__

  def identity_call(base):
    return lambda self, *args, **kwargs: _split_input(args, kwargs)[0]

  for module in list(_modules(copy).values()):
    path = paths[id(module)]
    if nnx_tracing.kind_of(module) in layer_kinds.QUANTIZABLE:
      _swap(module, exported_call)
    elif isinstance(module, nnx.BatchNorm) and path in folded:
      _swap(module, identity_call)
  return copy(x, **export.manifest["apply_kwargs"])


def _modules(model: nnx.Module) -> dict[str, nnx.Module]:
  """``{'/'-joined path: module}`` of every module of ``model``."""
  return {"/".join(str(p) for p in path): m
          for path, m in nnx.iter_modules(model)}


def export_inference(model: nnx.Module, export: IntegerExport, *,
                     batch_size: Optional[int] = None,
                     platforms: Optional[Sequence[str]] = None
                     ) -> jax.export.Exported:
  """``jax.export`` (StableHLO) of :func:`integer_apply`, arrays baked in.

  Serialise with :func:`gdnsq_jax.export.stablehlo.serialize_inference`;
  serve with ``jax.export.deserialize(data).call(images)``.
  """
  return stablehlo.export_inference(
      model, export, batch_size=batch_size, platforms=platforms,
      apply_fn=lambda x: integer_apply(model, export, x))


def compare_layers(model: nnx.Module, export: IntegerExport, x: jax.Array
                   ) -> dict[str, jax.Array]:
  """Teacher-forced relative error of every exported layer (jittable).

  The fake-quant model runs in eval mode; every exported layer is also
  computed by the integer inference on the same input and the same
  activation codes (read off its input quantizer's ``x_hat``) and compared
  with the fake-quant output (after its BatchNorm when that was folded).

  Returns:
    ``{layer path: max |integer - fake| / max |fake|}`` over the batch.
  """
  entries = {e["path"]: e for e in export.layers}
  folded = {e["batch_norm"] for e in export.layers if e["batch_norm"]}
  copy = _eval_copy(model)
  paths = nnx_tracing.module_paths(copy)
  calls, norms, x_hats = [], [], {}

  def recording_call(base):
    def __call__(self, *args, **kwargs):
      out = base(self, *args, **kwargs)
      path = paths[id(self)]
      inputs, rest, rest_kwargs = _split_input(args, kwargs)
      if isinstance(self, ActivationQuantizer):
        x_hats[path.rpartition("/")[0]] = out
      elif isinstance(self, nnx.BatchNorm):
        norms.append((inputs, out))
      else:
        calls.append((self, path, inputs, rest, rest_kwargs, out))
      return out
    return __call__

  for module in list(_modules(copy).values()):
    path = paths[id(module)]
    if ((nnx_tracing.kind_of(module) in layer_kinds.QUANTIZABLE
         and path in entries)
        or isinstance(module, ActivationQuantizer)
        or (isinstance(module, nnx.BatchNorm) and path in folded)):
      _swap(module, recording_call)
  copy(x, **export.manifest["apply_kwargs"])

  errors = {}
  for module, path, inputs, rest, kwargs, out in calls:
    entry, arrays = entries[path], export.layer_arrays(path)
    codes = None
    if path in x_hats and "activation_step" in arrays:
      codes = jnp.round((x_hats[path].astype(jnp.float32)
                         - arrays["activation_clamp_low"])
                        / arrays["activation_step"]).astype(jnp.int32)
    integer = inference.exported_layer_apply(
        module, entry, arrays, inputs, codes,
        equation=_equation(module, inputs, entry, rest, kwargs))
    reference = out
    if entry["batch_norm"]:
      reference = next(y for bn_x, y in norms if bn_x is out)
    errors[path] = relative_error(integer, reference)
  return errors
