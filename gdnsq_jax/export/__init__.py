"""Integer export of a GDNSQ-trained model (docs/method.md §10).

* :mod:`~gdnsq_jax.export.exporter` -- integer weight codes, per-channel
  steps and zero points, activation grids, BatchNorm folding, width checks;
* :mod:`~gdnsq_jax.export.packing` -- codes packed densely at their width;
* :mod:`~gdnsq_jax.export.files` -- ``manifest.json`` + ``arrays.npz`` +
  ``model.stablehlo`` on disk, and back;
* :mod:`~gdnsq_jax.export.inference` -- the int32-accumulated integer
  inference;
* :mod:`~gdnsq_jax.export.stablehlo` -- its ``jax.export`` StableHLO
  serialisation;
* :mod:`~gdnsq_jax.export.verification` -- layer-by-layer and logit
  comparison against the fake-quant model.
"""

from gdnsq_jax.export import exporter
from gdnsq_jax.export import files
from gdnsq_jax.export import inference
from gdnsq_jax.export import packing
from gdnsq_jax.export import stablehlo
from gdnsq_jax.export import verification
from gdnsq_jax.export.exporter import export_model
from gdnsq_jax.export.exporter import ExportError
from gdnsq_jax.export.exporter import IntegerExport
from gdnsq_jax.export.exporter import NotConvergedError
from gdnsq_jax.export.files import ExportFormatError
from gdnsq_jax.export.files import format_size_table
from gdnsq_jax.export.files import format_summary
from gdnsq_jax.export.files import load_export
from gdnsq_jax.export.files import save_export
from gdnsq_jax.export.inference import integer_apply
from gdnsq_jax.export.stablehlo import load_inference
from gdnsq_jax.export.stablehlo import serialize_inference
from gdnsq_jax.export.verification import compare_layers
from gdnsq_jax.export.verification import compare_logits

__all__ = (
    "ExportError",
    "ExportFormatError",
    "IntegerExport",
    "NotConvergedError",
    "compare_layers",
    "compare_logits",
    "export_model",
    "exporter",
    "files",
    "format_size_table",
    "format_summary",
    "inference",
    "integer_apply",
    "load_export",
    "load_inference",
    "packing",
    "save_export",
    "serialize_inference",
    "stablehlo",
    "verification",
)
