"""Quantize an unmodified Flax Linen model by intercepting its weight layers.

:func:`quantize_model` takes a Linen model written with stock layers and
returns a :class:`QuantizedModel` whose ``init`` / ``apply`` run the model
under :func:`flax.linen.intercept_methods`: every selected layer call
creates its quantizer params in the layer's own scope (next to ``kernel``,
see :mod:`gdnsq_jax.layers`) and computes the layer with the quantized
kernel and input. Covered (:mod:`gdnsq_jax.layer_kinds`): ``nn.Conv``
(grouped and depthwise included), ``nn.Dense``, ``nn.DenseGeneral``,
``nn.Einsum``, hence the ``query`` / ``key`` / ``value`` / ``out``
projections of ``nn.MultiHeadDotProductAttention``. The model's code and its
FP params tree are unchanged; the quantized tree only adds ``log2_step`` and
``input_quantizer`` entries, so :func:`add_quantizer_params` loads FP
variables into it.

Design: interception at the *layer* (module method) level, not at the
``lax`` op level as google/qwix patches ``dot_general`` /
``conv_general_dilated`` / ``einsum`` process-wide. Reasons:

* a Flax layer names its one weight-bearing op's weight (``kernel``) and
  its layout, so the output channels of GDNSQ's per-channel step are known
  exactly per kind (a conv's last axis, a ``DenseGeneral``'s features, the
  kernel letters of an einsum that reach its output), where an op-level hook
  sees a kernel already reshaped, masked or dtype-promoted and would have to
  guess which operand is a weight;
* activation x activation products (attention's ``q k`` and ``attn v``) are
  not layer calls, so they stay float by construction, with no provenance
  analysis of operands (docs/method.md §5);
* the layer's own code (padding, dilation, groups, masks, axes, equation,
  dtype promotion) runs unchanged on the quantized operands (an unbound FP
  twin, :func:`gdnsq_jax.layers.apply_quantized_layer`), and nothing in
  ``jax.lax`` is patched, so custom op hooks (``train/cpu_conv.py``) and
  other threads are untouched;
* the quantizer params sit next to ``kernel`` in the layer's scope, so paths
  (and rules) are module paths and FP checkpoints load unchanged.

The cost: a custom module that multiplies by its own param without a Flax
layer is not quantized; the tracer still lists any module with its own
``kernel`` (kind ``other``), and embeddings / transposed / local convs, in
the report as full precision with the reason -- nothing stays float
silently. The numerics below the glue are framework-agnostic
(:mod:`gdnsq_jax.quantized_ops`, :mod:`gdnsq_jax.families`).

Placement (docs/method.md §5, D6): by default the stem (the first
weight-bearing layer applied), the classifier (the last dense-like layer
applied) and 1x1 convs stay full precision; :class:`QuantizationRules`
changes that.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gdnsq_jax import layer_kinds
from gdnsq_jax import layers as qlayers
from gdnsq_jax import quantizer_params
from gdnsq_jax import tracing
from gdnsq_jax.layers import QuantSettings

__all__ = [
    "LayerInfo",
    "QuantizationRules",
    "QuantizedModel",
    "add_quantizer_params",
    "format_quantization_report",
    "place_layers",
    "quantization_report",
    "quantize_model",
]


@dataclasses.dataclass(frozen=True)
class QuantizationRules:
  """Which weight layers to quantize, by role and module path.

  A layer of a quantizable kind (:data:`gdnsq_jax.layer_kinds.QUANTIZABLE`)
  is quantized iff its '/'-joined module path fully matches one of
  ``include`` (when given), matches none of ``exclude`` and its role is not
  left FP by a flag. Patterns use :func:`re.fullmatch`; the attention
  projections of ``encoder_block1/attention`` are
  ``encoder_block1/attention/(query|key|value|out)``.

  Attributes:
    include: regexes; when non-empty only matching layers are candidates.
    exclude: regexes of layers that stay FP.
    quantize_stem: quantize the first weight layer applied to the input.
    quantize_classifier: quantize the last dense-like layer applied.
    quantize_1x1: quantize convs whose spatial kernel is 1x1 (shortcuts).
  """

  include: Sequence[str] = ()
  exclude: Sequence[str] = ()
  quantize_stem: bool = False
  quantize_classifier: bool = False
  quantize_1x1: bool = False

  def __post_init__(self):
    for field in ("include", "exclude"):
      patterns = getattr(self, field)
      if isinstance(patterns, str):
        patterns = (patterns,)
      patterns = tuple(patterns)
      for p in patterns:
        try:
          re.compile(p)
        except re.error as e:
          raise ValueError(f"invalid {field} regex {p!r}: {e}") from e
      object.__setattr__(self, field, patterns)

  @classmethod
  def from_dict(cls, rules: Mapping[str, Any]) -> "QuantizationRules":
    """Builds rules from a dict (e.g. a config); unknown keys raise."""
    valid = [f.name for f in dataclasses.fields(cls)]
    for key in rules:
      if key not in valid:
        raise ValueError(
            f"unknown quantization rule key {key!r}; valid keys: "
            f"{', '.join(valid)}"
        )
    return cls(**rules)

  @classmethod
  def coerce(cls, rules: Union["QuantizationRules", Mapping[str, Any], None]
             ) -> "QuantizationRules":
    """``rules`` itself, :meth:`from_dict` of a dict, or the defaults (None)."""
    if isinstance(rules, Mapping):
      return cls.from_dict(rules)
    return cls() if rules is None else rules


@dataclasses.dataclass(frozen=True)
class LayerInfo:
  """One weight-bearing layer of a model, in first-call order.

  Attributes:
    path: '/'-joined module path (also its params path).
    kind: a kind of :mod:`gdnsq_jax.layer_kinds` (``conv``, ``dense``,
      ``dense_general``, ``einsum``; unsupported: ``conv_transpose``,
      ``conv_local``, ``embed``, ``other``).
    kernel_shape: the weight's shape (Flax layout).
    role: 'stem', 'classifier', '1x1' or '' (a plain hidden layer).
    quantized: whether the quantized model quantizes it.
    reason: why it is (or is not) quantized.
  """

  path: str
  kind: str
  kernel_shape: tuple[int, ...]
  role: str
  quantized: bool
  reason: str


def _is_layer_call(context: Any) -> bool:
  return (context.method_name == "__call__"
          and layer_kinds.kind_of(context.module) in layer_kinds.QUANTIZABLE)


def _decide(path: str, kind: str, role: str,
            rules: QuantizationRules) -> tuple[bool, str]:
  """Whether the layer at ``path`` with ``role`` is quantized, and why."""
  if kind not in layer_kinds.QUANTIZABLE:
    return False, f"{kind}: not quantizable (stays FP)"
  if rules.include and not any(re.fullmatch(p, path) for p in rules.include):
    return False, "not matched by include"
  for p in rules.exclude:
    if re.fullmatch(p, path):
      return False, f"excluded by {p!r}"
  if role == "stem" and not rules.quantize_stem:
    return False, "stem (quantize_stem=False)"
  if role == "classifier" and not rules.quantize_classifier:
    return False, "classifier (quantize_classifier=False)"
  if role == "1x1" and not rules.quantize_1x1:
    return False, "1x1 conv (quantize_1x1=False)"
  return True, "quantized"


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedModel:
  """A Linen model whose selected weight-layer calls are quantized.

  ``init`` and ``apply`` take exactly the arguments of the wrapped model's
  (rngs, inputs, ``train=...``, ``mutable=...``, ...); pass
  ``rngs={'quant_noise': key}`` to ``apply`` for the training dither.

  Attributes:
    model: the unmodified Linen model.
    settings: quantization settings of every quantized layer.
    layers: every weight-bearing layer with its placement (call order).
  """

  model: nn.Module
  settings: QuantSettings
  layers: tuple[LayerInfo, ...]

  @property
  def quantized_paths(self) -> frozenset[str]:
    """Module paths of the quantized layers."""
    return frozenset(l.path for l in self.layers if l.quantized)

  def _intercept(self, next_fun, args, kwargs, context):
    module = context.module
    if (
        not _is_layer_call(context)
        or qlayers.inside_fp_twin()
        or isinstance(module, qlayers.EXPLICIT_LAYERS)
    ):
      return next_fun(*args, **kwargs)
    path = "/".join(module.path)
    if path not in {l.path for l in self.layers}:
      raise ValueError(
          f"layer {path!r} was not called when quantize_model traced the "
          "model, so its placement is undecided; pass sample inputs and "
          "model kwargs to quantize_model that call every layer"
      )
    if path not in self.quantized_paths:
      return next_fun(*args, **kwargs)
    if not args and "inputs" in kwargs:  # conv(inputs=x)
      kwargs = dict(kwargs)
      args = (kwargs.pop("inputs"),)
    return qlayers.apply_quantized_layer(
        module,
        next_fun,
        module.clone(parent=None),
        self.settings,
        *args,
        **kwargs,
    )

  def init(self, rngs, *args, **kwargs) -> Any:
    """``model.init`` with the quantized layers; returns all variables."""
    with nn.intercept_methods(self._intercept):
      return self.model.init(rngs, *args, **kwargs)

  def apply(self, variables, *args, **kwargs) -> Any:
    """``model.apply`` with the quantized layers."""
    with nn.intercept_methods(self._intercept):
      return self.model.apply(variables, *args, **kwargs)


def quantize_model(
    model: nn.Module,
    *sample_args: Any,
    settings: Optional[QuantSettings] = None,
    rules: Union[QuantizationRules, Mapping[str, Any], None] = None,
    **sample_kwargs: Any,
) -> QuantizedModel:
  """Selects the weight layers of ``model`` to quantize.

  The model is traced once abstractly (``jax.eval_shape`` of its ``init``;
  nothing is allocated) to find its weight-bearing layers, their call order
  (stem = first called, classifier = last dense-like called) and kernels.

  Args:
    model: a Linen model using stock Flax layers.
    *sample_args: example positional inputs of ``model`` (arrays or
      ``jax.ShapeDtypeStruct``).
    settings: quantization settings (default :class:`QuantSettings()`).
    rules: :class:`QuantizationRules` or a dict of its fields.
    **sample_kwargs: keyword arguments of the traced call (e.g.
      ``train=False``).

  Returns:
    The :class:`QuantizedModel`.

  Raises:
    ValueError: for unknown rule keys or invalid regexes.
  """
  settings = settings if settings is not None else QuantSettings()
  rules = QuantizationRules.coerce(rules)
  traced = tracing.trace_calls(model, sample_args, sample_kwargs)
  return QuantizedModel(model, settings, place_layers(traced, rules))


def place_layers(traced: Sequence[tracing.TracedLayer],
                 rules: QuantizationRules) -> tuple[LayerInfo, ...]:
  """Roles and placement of traced layers (docs/method.md §5, D6).

  Stem: the first layer called; classifier: the dense-like layer called
  last; ``1x1``: a conv with a 1x1 spatial kernel; explicit Quant layers stay
  quantized; every other layer is decided by ``rules``. Framework-agnostic:
  the NNX front end (:mod:`gdnsq_jax.nnx_quantize`) places its traced layers
  with it too.

  Args:
    traced: the layers in first-call order (:mod:`gdnsq_jax.tracing`).
    rules: the placement rules.

  Returns:
    One :class:`LayerInfo` per traced layer, in the same order.
  """
  dense = [l for l in traced if l.kind in layer_kinds.DENSE_LIKE]
  stem = traced[0].path if traced else None
  classifier = max(dense, key=lambda l: l.last_call).path if dense else None
  infos = []
  for layer in traced:
    path, kind, shape = layer.path, layer.kind, layer.kernel_shape
    if path == stem:
      role = "stem"
    elif path == classifier:
      role = "classifier"
    elif kind == "conv" and all(d == 1 for d in shape[:-2]):
      role = "1x1"
    else:
      role = ""
    if layer.explicit:
      quantized, reason = True, "explicit Quant layer"
    else:
      quantized, reason = _decide(path, kind, role, rules)
    infos.append(LayerInfo(path, kind, shape, role, quantized, reason))
  return tuple(infos)


def quantization_report(qmodel: QuantizedModel) -> list[LayerInfo]:
  """Every weight-bearing layer with its placement (call order).

  Quantized or not: the quantizable kinds with the rule that decided them,
  and every other weight-bearing layer (embeddings, transposed or local
  convs, modules with their own ``kernel``) as full precision with the
  reason. Activation x activation products (attention) are not layers and
  stay float (docs/method.md §5).
  """
  return list(qmodel.layers)


def format_quantization_report(rows: Sequence[LayerInfo]) -> str:
  """A text table of :func:`quantization_report` rows and the FP / Q counts."""
  header = ("path", "kind", "kernel", "role", "quantized", "reason")
  table = [header] + [
      (
          r.path,
          r.kind,
          "x".join(map(str, r.kernel_shape)),
          r.role or "-",
          "yes" if r.quantized else "no",
          r.reason,
      )
      for r in rows
  ]
  widths = [max(len(row[i]) for row in table) for i in range(len(header))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
           for row in table]
  n_q = sum(r.quantized for r in rows)
  lines.append(f"{n_q} quantized, {len(rows) - n_q} full precision")
  return "\n".join(lines)


# ---------------------------------------------------------------------------
# Loading FP variables into the quantized tree.
# ---------------------------------------------------------------------------


def add_quantizer_params(fp_variables: Mapping[str, Any],
                         quantized_variables: Mapping[str, Any]) -> dict:
  """Loads FP variables into a quantized model's variable tree.

  Every leaf of ``fp_variables`` must exist, with the same shape, in
  ``quantized_variables``; every leaf only in ``quantized_variables`` must be
  a quantizer param. Quantizer params keep their value from
  ``quantized_variables``, or get their pre-calibration init value when that
  tree is abstract (``jax.eval_shape(qmodel.init, ...)``), so a big model
  needs no real quantized init.

  Args:
    fp_variables: variables of the FP model (``params``, ``batch_stats``...).
    quantized_variables: variables (or shapes) from ``QuantizedModel.init``.

  Returns:
    The quantized variables holding the FP values.

  Raises:
    ValueError: listing the FP leaves the quantized tree lacks, the
      non-quantizer leaves the FP tree lacks, and shape mismatches.
  """
  fp_flat = {
      tuple(str(getattr(k, "key", k)) for k in p): v
      for p, v in jax.tree_util.tree_leaves_with_path(fp_variables)
  }
  q_flat = jax.tree_util.tree_leaves_with_path(quantized_variables)
  q_paths = {tuple(str(getattr(k, "key", k)) for k in p) for p, _ in q_flat}
  unexpected = sorted("/".join(p) for p in fp_flat if p not in q_paths)
  missing, mismatched = [], []
  for p in q_paths:
    if p not in fp_flat and not quantizer_params.is_quantizer_leaf(p):
      missing.append("/".join(p))
  for p, v in fp_flat.items():
    if p in q_paths:
      q_shape = _leaf(quantized_variables, p).shape
      if tuple(np.shape(v)) != tuple(q_shape):
        mismatched.append(f"{'/'.join(p)}: {np.shape(v)} vs {q_shape}")
  if unexpected or missing or mismatched:
    raise ValueError(
        "FP variables do not fit the quantized model; in FP only: "
        f"{_listing(unexpected)}; missing from FP: {_listing(sorted(missing))}"
        f"; shape mismatches: {_listing(sorted(mismatched))}. Build the FP "
        "and the quantized model from the same module and config"
    )

  def fill(path, value, siblings):
    if path in fp_flat:
      return jnp.asarray(fp_flat[path])
    if isinstance(value, jax.ShapeDtypeStruct):
      init = quantizer_params.initial_value(path, siblings)
      return jnp.full(value.shape, init, value.dtype)
    return value

  def walk(tree, prefix):
    return {
        k: walk(v, prefix + (k,)) if isinstance(v, Mapping)
        else fill(prefix + (k,), v, tree)
        for k, v in tree.items()
    }

  return walk(quantized_variables, ())


def _listing(items: list[str], limit: int = 10) -> str:
  """``items`` as a list, cut after ``limit`` entries with a count."""
  if not items:
    return "none"
  if len(items) <= limit:
    return str(items)
  return f"{items[:limit]} and {len(items) - limit} more"


def _leaf(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
  for k in path:
    tree = tree[k]
  return tree
