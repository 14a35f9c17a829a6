"""The one layer tracer: every weight-bearing layer call of a Flax model (shapes only).

:func:`trace_calls` runs the unmodified model abstractly (``jax.eval_shape``
of its ``init``, or of ``apply`` when variables are given) under
``nn.intercept_methods`` and records, in first-call order, every call of a
weight-bearing layer (the kinds of :mod:`gdnsq_jax.layer_kinds`: conv,
dense, ``DenseGeneral``, einsum, and the unsupported ones): its kernel
shape, its multiply-accumulates per example, whether it is an explicit Quant
layer, when it was last called, and the inference-mode BatchNorm that
consumes exactly its output (which the export may fold into it). Placement
(:func:`gdnsq_jax.interception.quantize_model`) and the export
(:func:`trace_layers`) both read it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gdnsq_jax import channels
from gdnsq_jax import layer_kinds
from gdnsq_jax import layers as qlayers

__all__ = ["TracedLayer", "trace_layers"]


@dataclasses.dataclass(frozen=True)
class TracedLayer:
  """One weight-bearing layer call of the traced model.

  Attributes:
    path: '/'-joined module path.
    kind: its kind (:mod:`gdnsq_jax.layer_kinds`), e.g. 'conv', 'dense',
      'dense_general', 'einsum', 'embed'.
    kernel_shape: Flax kernel (or embedding) shape.
    macs: multiply-accumulates per example.
    batch_norm: path of the inference-mode BatchNorm that consumes exactly
      this layer's output (foldable), else None.
    batch_norm_epsilon: that BatchNorm's epsilon.
    explicit: the layer is an explicit Quant layer (``QuantConv``, ...).
    last_call: position of its last call among all weight-layer calls.
  """

  path: str
  kind: str
  kernel_shape: tuple[int, ...]
  macs: int
  batch_norm: Optional[str] = None
  batch_norm_epsilon: Optional[float] = None
  explicit: bool = False
  last_call: int = 0


_FOLDABLE_KINDS = ("conv", "dense", "dense_general")  # channels last in out


def macs_per_example(kind: str, kernel_shape: Sequence[int],
                     axes: Sequence[int], out: Any) -> int:
  """Multiply-accumulates per example: outputs x kernel entries per channel.

  ``axes``: the kernel's output-channel axes (used for the quantizable
  kinds); an ``embed`` lookup, or an output without a shape, counts 0.
  """
  if kind == "embed" or not hasattr(out, "shape"):
    return 0
  if kind in layer_kinds.QUANTIZABLE:
    per_output = channels.entries_per_channel(
        kernel_shape, channels.step_shape(kernel_shape, axes))
  else:
    per_output = int(np.prod(kernel_shape[:-1]))
  return int(np.prod(out.shape[1:])) * per_output


def split_array_leaves(args: Sequence[Any], kwargs: Optional[Mapping[str, Any]]
                       ) -> tuple[list[Any], Callable[..., Any]]:
  """``(arrays, rebuild)`` of a call's ``(args, kwargs)``, for ``eval_shape``.

  ``arrays`` are the array-like leaves (arrays, ``jax.ShapeDtypeStruct``);
  ``rebuild(arrays)`` returns ``(args, kwargs)`` with them in place and the
  other leaves (a positional ``train`` flag) as static Python values.
  """
  leaves, treedef = jax.tree_util.tree_flatten((tuple(args), dict(kwargs or {})))
  is_array = [isinstance(l, (jax.Array, np.ndarray, jax.ShapeDtypeStruct))
              for l in leaves]

  def rebuild(arrays):
    it = iter(arrays)
    full = [next(it) if a else l for l, a in zip(leaves, is_array)]
    return jax.tree_util.tree_unflatten(treedef, full)

  return [l for l, a in zip(leaves, is_array) if a], rebuild


def first_calls(calls: Sequence[tuple[Any, ...]],
                norms: Sequence[tuple[str, Any, bool, float]],
                inputs_seen: Sequence[Any]) -> list[tuple[Any, ...]]:
  """Each layer's first call, in order, with the BatchNorm folding into it.

  The one folding rule of the Linen and NNX tracers: a BatchNorm folds into
  a layer of a foldable kind when its input *is* the array the layer
  returned, it is ``foldable`` (running averages over the last axis), both
  are called once and no other recorded call takes that output.

  Args:
    calls: every weight-layer call, tuples ``(path, kind, out, ...)``.
    norms: every BatchNorm call, ``(path, input, foldable, epsilon)``.
    inputs_seen: the input of every recorded call.

  Returns:
    ``(call, batch_norm, epsilon, last_call)`` per layer path in first-call
    order: the BatchNorm's path and epsilon (None, None when none folds) and
    the position of the path's last call.
  """
  count = lambda path, items: sum(item[0] == path for item in items)
  last_call = {call[0]: i for i, call in enumerate(calls)}
  layers, seen = [], set()
  for call in calls:
    path, kind, out = call[:3]
    if path in seen:
      continue
    seen.add(path)
    bn, epsilon = None, None
    for bn_path, x, foldable, eps in norms:
      if (x is out and foldable and kind in _FOLDABLE_KINDS
          and count(path, calls) == 1
          and count(bn_path, norms) == 1
          and sum(y is out for y in inputs_seen) == 1):
        bn, epsilon = bn_path, eps
    layers.append((call, bn, epsilon, last_call[path]))
  return layers


def trace_calls(
    model: nn.Module,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    variables: Optional[Mapping[str, Any]] = None,
) -> list[TracedLayer]:
  """Finds every weight-layer call, its MACs and a BatchNorm consuming it.

  The model runs abstractly (``jax.eval_shape``; nothing is allocated) under
  ``nn.intercept_methods``: ``model.init`` when ``variables`` is None, else
  ``model.apply(variables, ...)`` with every collection mutable (so a
  training-mode trace works). Array-like leaves of ``args`` / ``kwargs``
  (arrays, ``jax.ShapeDtypeStruct``) are traced; other leaves (a positional
  ``train`` flag) stay static Python values.

  A BatchNorm is foldable into a layer when its input *is* the array the
  layer returned, it runs on running averages over the last axis, both are
  called once and no other module call takes that output. A consumer outside
  module calls (``y = conv(x); z = y + bn(y)``) cannot be seen here;
  :mod:`gdnsq_jax.export.verification` (run by the CLI) would then report the
  folded layer's error.

  Args:
    model: the unmodified Flax model (or one with explicit Quant layers).
    args: example positional inputs of the model call.
    kwargs: keyword arguments of the model call (e.g. ``train=False``).
    variables: its variables, or their shapes; None traces ``init``.

  Returns:
    The layers in first-call order (a layer called twice appears once).
  """
  calls, norms, inputs_seen = [], [], []
  active = set()  # layers mid-call: an explicit Quant layer's inner FP call

  def record(next_fun, call_args, call_kwargs, context):
    module = context.module
    path = tuple(module.path)
    if (context.method_name != "__call__" or qlayers.inside_fp_twin()
        or path in active):
      return next_fun(*call_args, **call_kwargs)
    active.add(path)
    try:
      out = next_fun(*call_args, **call_kwargs)
    finally:
      active.discard(path)
    kind = layer_kinds.weight_kind(module)
    if kind is not None:
      x = layer_kinds.layer_input(call_args, call_kwargs)
      shape = tuple(module.get_variable(
          "params", layer_kinds.weight_param_name(kind)).shape)
      axes = (layer_kinds.channel_axes(module, x, shape, call_args[1:],
                                       call_kwargs)
              if kind in layer_kinds.QUANTIZABLE else ())
      macs = macs_per_example(kind, shape, axes, out)
      calls.append(("/".join(module.path), kind, out, module, shape, macs))
      inputs_seen.append(x)
    elif isinstance(module, nn.BatchNorm):
      x = call_args[0] if call_args else call_kwargs["x"]
      flag = call_kwargs.get("use_running_average",
                             call_args[1] if len(call_args) > 1 else None)
      running = nn.merge_param(
          "use_running_average", module.use_running_average, flag)
      axis_ok = module.axis in (-1, x.ndim - 1)
      norms.append(("/".join(module.path), x, running and axis_ok,
                    float(module.epsilon)))
      inputs_seen.append(x)
    return out

  arrays, rebuild = split_array_leaves(args, kwargs)

  def run(variables, *array_leaves):
    call_args, call_kwargs = rebuild(array_leaves)
    with nn.intercept_methods(record):
      if variables is None:
        rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
        return model.init(rngs, *call_args, **call_kwargs)
      return model.apply(variables, *call_args, mutable=True, **call_kwargs)

  jax.eval_shape(run, variables, *arrays)
  return [TracedLayer(path, kind, shape, macs, bn, epsilon,
                      isinstance(module, qlayers.EXPLICIT_LAYERS), last_call)
          for (path, kind, _, module, shape, macs), bn, epsilon, last_call
          in first_calls(calls, norms, inputs_seen)]


def trace_layers(
    model: nn.Module,
    variables: Mapping[str, Any],
    input_shape: Sequence[int],
    input_dtype: Any = jnp.float32,
    apply_kwargs: Optional[Mapping[str, Any]] = None,
) -> list[TracedLayer]:
  """:func:`trace_calls` of ``model.apply`` on one example (the export's view).

  Args:
    model: the unmodified Flax model.
    variables: its variables, or their shapes (quantizer params are ignored).
    input_shape: one example's shape (no batch axis).
    input_dtype: the input dtype.
    apply_kwargs: keyword arguments of ``apply`` selecting inference mode.

  Returns:
    The layers in first-call order.
  """
  sample = jax.ShapeDtypeStruct((1,) + tuple(input_shape), input_dtype)
  return trace_calls(model, (sample,), dict(apply_kwargs or {}), variables)
