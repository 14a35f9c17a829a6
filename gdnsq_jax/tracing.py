"""Tracing a Flax model's conv / dense calls for export (shapes only).

:func:`trace_layers` runs the unmodified model abstractly (``jax.eval_shape``)
on one example under ``nn.intercept_methods`` and records, in first-call
order, every ``nn.Conv`` / ``nn.Dense`` call: its kernel shape, its
multiply-accumulates per example, and the inference-mode BatchNorm that
consumes exactly its output (which the export may fold into it).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gdnsq_jax import layers as qlayers

__all__ = ["TracedLayer", "trace_layers"]


@dataclasses.dataclass(frozen=True)
class TracedLayer:
  """One conv / dense call of the traced model.

  Attributes:
    path: '/'-joined module path.
    kind: 'conv' or 'dense'.
    kernel_shape: Flax kernel shape, output channels last.
    macs: multiply-accumulates per example.
    batch_norm: path of the inference-mode BatchNorm that consumes exactly
      this layer's output (foldable), else None.
    batch_norm_epsilon: that BatchNorm's epsilon.
  """

  path: str
  kind: str
  kernel_shape: tuple[int, ...]
  macs: int
  batch_norm: Optional[str] = None
  batch_norm_epsilon: Optional[float] = None


def _is_layer(module: nn.Module) -> bool:
  return isinstance(module, (nn.Conv, nn.Dense))


def _first_input(args, kwargs, name):
  return args[0] if args else kwargs[name]


def trace_layers(
    model: nn.Module,
    variables: Mapping[str, Any],
    input_shape: Sequence[int],
    input_dtype: Any = jnp.float32,
    apply_kwargs: Optional[Mapping[str, Any]] = None,
) -> list[TracedLayer]:
  """Finds every conv / dense call, its MACs and a BatchNorm consuming it.

  The model runs abstractly (``jax.eval_shape``) on one example under
  ``nn.intercept_methods``. A BatchNorm is foldable into a layer when its
  input *is* the array the layer returned, it runs on running averages over
  the last axis, both are called once and no other module call takes that
  output. A consumer outside module calls (``y = conv(x); z = y + bn(y)``)
  cannot be seen here; :mod:`gdnsq_jax.export_verification` (run by the CLI)
  would then report the folded layer's error.

  Args:
    model: the unmodified Flax model.
    variables: its variables, or their shapes (quantizer params are ignored).
    input_shape: one example's shape (no batch axis).
    input_dtype: the input dtype.
    apply_kwargs: keyword arguments of ``apply`` selecting inference mode.

  Returns:
    The layers in first-call order.
  """
  calls, norms, inputs_seen = [], [], []

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name != "__call__" or qlayers.inside_fp_twin():
      return out
    if _is_layer(module):
      x = _first_input(args, kwargs, "inputs")
      kernel = module.get_variable("params", "kernel")
      calls.append(("/".join(module.path), module, tuple(kernel.shape), out))
      inputs_seen.append(x)
    elif isinstance(module, nn.BatchNorm):
      x = _first_input(args, kwargs, "x")
      flag = kwargs.get("use_running_average",
                        args[1] if len(args) > 1 else None)
      running = nn.merge_param(
          "use_running_average", module.use_running_average, flag)
      axis_ok = module.axis in (-1, x.ndim - 1)
      norms.append(("/".join(module.path), x, running and axis_ok,
                    float(module.epsilon)))
      inputs_seen.append(x)
    return out

  def run(variables, x):
    with nn.intercept_methods(record):  # mutable: a training-mode trace works
      return model.apply(variables, x, mutable=True, **dict(apply_kwargs or {}))

  sample = jax.ShapeDtypeStruct((1,) + tuple(input_shape), input_dtype)
  jax.eval_shape(run, variables, sample)
  count = lambda path, items: sum(item[0] == path for item in items)
  layers, seen = [], set()
  for path, module, kernel_shape, out in calls:
    if path in seen:
      continue
    seen.add(path)
    bn, epsilon = None, None
    for bn_path, x, foldable, eps in norms:
      if (x is out and foldable and count(path, calls) == 1
          and count(bn_path, norms) == 1
          and sum(y is out for y in inputs_seen) == 1):
        bn, epsilon = bn_path, eps
    macs = int(np.prod(out.shape)) * int(np.prod(kernel_shape[:-1]))
    kind = "conv" if isinstance(module, nn.Conv) else "dense"
    layers.append(TracedLayer(path, kind, kernel_shape, macs, bn, epsilon))
  return layers
