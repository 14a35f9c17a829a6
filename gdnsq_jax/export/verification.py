"""Checks that an integer export computes the fake-quant network.

Two complementary checks (the CLI ``train.export`` runs both on the test
split):

* :func:`compare_logits` -- end to end: integer logits against the
  fake-quant evaluation ``qmodel.apply(variables, x, train=False)``.
  Float32 summation differs between an integer and a float convolution, so
  a layer input that lies within float rounding of a code boundary (a
  rounding tie) can take the neighbouring code on one side, and the logits
  of that input then move by more than float rounding; a handful of such
  inputs per thousand is expected, which is why argmax agreement is judged
  on a fraction of the inputs.
* :func:`compare_layers` -- layer by layer, teacher-forced: the fake-quant
  model runs, and every exported layer is also computed by the integer
  inference on the same input *and the same activation codes* (read off the
  fake-quant ``x_hat``); its output is compared with the fake-quant layer
  output (after its BatchNorm when that was folded). This checks the
  integer algebra itself, free of tie flips.

The codes can differ at a tie even for the same input: XLA on CPU divides
by multiplying with a reciprocal (or rewrites ``a / exp2(l)`` as
``a * exp2(-l)``) depending on what it fuses, so ``(c - b) / s`` is not
bit-reproducible across compilations, not even of the fake-quant model
itself (variables as constants or as arguments).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gdnsq_jax import layer_kinds
from gdnsq_jax import layers as qlayers
from gdnsq_jax.quantizer_params import INPUT_QUANTIZER
from gdnsq_jax.export.exporter import IntegerExport
from gdnsq_jax.export.inference import exported_layer_apply

__all__ = ["compare_layers", "compare_logits", "relative_error"]


def relative_error(value: jax.Array, reference: jax.Array) -> jax.Array:
  """``max |value - reference| / max |reference|`` (0 for a zero reference)."""
  value = jnp.asarray(value, jnp.float32)
  reference = jnp.asarray(reference, jnp.float32)
  scale = jnp.maximum(jnp.max(jnp.abs(reference)), jnp.finfo(jnp.float32).tiny)
  return jnp.max(jnp.abs(value - reference)) / scale


def compare_layers(qmodel: Any, variables: Mapping[str, Any],
                   export: IntegerExport, x: jax.Array,
                   apply_kwargs: Optional[Mapping[str, Any]] = None
                   ) -> dict[str, jax.Array]:
  """Teacher-forced relative error of every exported weight layer.

  Jittable (the result is a dict of scalars).

  Args:
    qmodel: the :class:`gdnsq_jax.QuantizedModel` that was exported.
    variables: its variables.
    export: the export (with or without folded BatchNorms).
    x: a batch of inputs.
    apply_kwargs: inference-mode keyword arguments (default: the manifest's).

  Returns:
    ``{layer path: max |integer - fake| / max |fake|}`` over the batch.
  """
  entries = {e["path"]: e for e in export.layers}
  folded = {e["batch_norm"] for e in entries.values() if e["batch_norm"]}
  pending, errors, quantized_inputs = [], {}, {}

  def intercept(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name != "__call__":
      return out
    path = "/".join(module.path)
    if isinstance(module, qlayers.QuantAct):
      quantized_inputs[path] = out  # x_hat of the layer that owns it
      return out
    if qlayers.inside_fp_twin():
      return out
    inputs = args[0] if args else kwargs.get("inputs", kwargs.get("x"))
    if (layer_kinds.kind_of(module) in layer_kinds.QUANTIZABLE
        and path in entries):
      arrays = export.layer_arrays(path)
      x_hat = quantized_inputs.get(f"{path}/{INPUT_QUANTIZER}")
      codes = None
      if x_hat is not None and "activation_step" in arrays:
        codes = jnp.round((x_hat.astype(jnp.float32)
                           - arrays["activation_clamp_low"])
                          / arrays["activation_step"]).astype(jnp.int32)
      integer = exported_layer_apply(
          module, entries[path], arrays, inputs, codes, call_args=args[1:],
          call_kwargs={k: v for k, v in kwargs.items() if k != "inputs"})
      if entries[path]["batch_norm"]:
        pending.append((out, path, integer))  # compared after its BatchNorm
      else:
        errors[path] = relative_error(integer, out)
    elif isinstance(module, nn.BatchNorm) and path in folded:
      for fake, layer, integer in pending:
        if fake is inputs:
          errors[layer] = relative_error(integer, out)
    return out

  if apply_kwargs is None:
    apply_kwargs = export.manifest["apply_kwargs"]
  with nn.intercept_methods(intercept):
    qmodel.apply(variables, x, **apply_kwargs)
  return errors


def compare_logits(integer_logits: jax.typing.ArrayLike,
                   reference_logits: jax.typing.ArrayLike) -> dict[str, float]:
  """Agreement of integer and fake-quant logits, per example.

  ``relative_error`` of an example is ``max |a - r| / max |r|`` over its
  logits. Argmax agreement ignores examples whose reference top two logits
  tie within that example's error budget ``1e-4 max |r|``.

  Returns:
    ``max_relative_error``, ``fraction_within_1e-4``, ``argmax_agreement``
    (fraction of non-tied examples) and ``count``.
  """
  reference = np.asarray(reference_logits, np.float64)
  a = np.asarray(integer_logits, np.float64).reshape(-1, reference.shape[-1])
  r = reference.reshape(a.shape)
  scale = np.maximum(np.abs(r).max(axis=-1), np.finfo(np.float32).tiny)
  rel = np.abs(a - r).max(axis=-1) / scale
  if r.shape[-1] > 1:
    top2 = np.sort(r, axis=-1)[:, -2:]
    untied = (top2[:, 1] - top2[:, 0]) > 1e-4 * scale
  else:
    untied = np.ones(len(r), bool)
  same = np.argmax(a, -1) == np.argmax(r, -1)
  return {
      "max_relative_error": float(rel.max()) if len(rel) else 0.0,
      "fraction_within_1e-4": float(np.mean(rel <= 1e-4)) if len(rel) else 1.0,
      "argmax_agreement": float(same[untied].mean()) if untied.any() else 1.0,
      "count": int(len(rel)),
  }
