"""The StableHLO artifact of the integer inference: ``jax.export`` and bytes.

:func:`export_inference` lowers the integer function
(:func:`gdnsq_jax.export.inference.integer_apply`) with ``jax.export``
(batch size symbolic); :func:`serialize_inference` / :func:`load_inference`
turn it into bytes and back. The exported function takes only the input:
the packed codes and float parameters are *constants baked into* the
StableHLO module (unpacked in-graph by :func:`gdnsq_jax.export.packing.
unpack_codes_jax`), so the artifact is served without the arrays file or any
of this package's Python code. (``jax.export`` serialization needs the
``flatbuffers`` package.)
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from gdnsq_jax.export.exporter import ExportError
from gdnsq_jax.export.exporter import IntegerExport
from gdnsq_jax.export.inference import integer_apply

__all__ = [
    "export_inference",
    "load_inference",
    "serialize_inference",
]


def export_inference(model: Any, export: IntegerExport, *,
                     batch_size: Optional[int] = None,
                     platforms: Optional[Sequence[str]] = None,
                     apply_fn: Optional[Callable[[jax.Array], Any]] = None,
                     ) -> jax.export.Exported:
  """``jax.export`` of the integer inference (arrays baked in as constants).

  Args:
    model: the unmodified Flax model.
    export: the :class:`IntegerExport`.
    batch_size: a fixed batch size, or None for a symbolic one.
    platforms: lowering platforms (default: the current backend), e.g.
      ``('cpu', 'cuda')``.
    apply_fn: the integer inference ``x -> logits`` to lower (default
      ``integer_apply(model, export, x)``; the NNX front end passes
      :func:`gdnsq_jax.nnx_export.integer_apply`'s).

  Returns:
    The ``jax.export.Exported``; its ``call(x)`` runs it.
  """
  shape = tuple(export.manifest["input_shape"])
  if batch_size is None:
    dims = ", ".join(["batch"] + [str(d) for d in shape])
    shape = jax.export.symbolic_shape(dims)
  else:
    shape = (batch_size,) + shape
  spec = jax.ShapeDtypeStruct(shape, jnp.dtype(export.manifest["input_dtype"]))
  if apply_fn is None:
    apply_fn = lambda x: integer_apply(model, export, x)
  return jax.export.export(jax.jit(apply_fn), platforms=platforms)(spec)


def serialize_inference(exported: jax.export.Exported) -> bytes:
  """``exported.serialize()``, with a clear error if flatbuffers is missing."""
  try:
    return bytes(exported.serialize())
  except ImportError as err:
    raise ExportError(
        f"jax.export serialization needs the 'flatbuffers' package ({err}); "
        "install it (pip install flatbuffers)") from err


def load_inference(serialized: bytes) -> Callable[[jax.Array], Any]:
  """The callable of a serialized export: ``deserialize(bytes).call``.

  Raises:
    ExportError: the bytes are not a serialized ``jax.export.Exported``.
  """
  try:
    exported = jax.export.deserialize(bytearray(serialized))
  except ImportError as err:
    raise ExportError(
        f"jax.export deserialization needs the 'flatbuffers' package ({err});"
        " install it (pip install flatbuffers)") from err
  except Exception as err:  # flatbuffers raises several types
    raise ExportError(
        f"the bytes are not a serialized jax.export function "
        f"({type(err).__name__}: {err}); re-create model.stablehlo") from err
  return exported.call
