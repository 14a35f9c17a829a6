"""Files of an integer export: write, read back with checks, size table.

A directory written by :func:`save_export` holds::

  manifest.json     the manifest (layers, bit-widths, sizes, BOPs) plus
                    ``files``: byte size and SHA-256 of every other file
  arrays.npz        the arrays (packed uint8 codes, float32 parameters)
  model.stablehlo   optional: the serialized ``jax.export`` integer
                    inference function (see :mod:`gdnsq_jax.export.stablehlo`)

:func:`load_export` refuses, with an :class:`ExportFormatError` that names
the file and the fix, a missing, truncated or corrupt file, a manifest of
another format or version, and arrays whose shapes, dtypes or packed sizes
disagree with the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

import numpy as np

from gdnsq_jax.export import packing
from gdnsq_jax.export.exporter import EXPORT_FORMAT
from gdnsq_jax.export.exporter import EXPORT_VERSION
from gdnsq_jax.export.exporter import ExportError
from gdnsq_jax.export.exporter import IntegerExport

__all__ = [
    "ARRAYS_FILE",
    "ExportFormatError",
    "MANIFEST_FILE",
    "STABLEHLO_FILE",
    "format_size_table",
    "format_summary",
    "load_export",
    "read_stablehlo",
    "save_export",
]

MANIFEST_FILE = "manifest.json"
ARRAYS_FILE = "arrays.npz"
STABLEHLO_FILE = "model.stablehlo"
_FIX = "re-create it with `python -m train.export --workdir <run>`"


class ExportFormatError(ExportError):
  """An export directory is missing, truncated, corrupt or inconsistent."""


def _digest(data: bytes) -> dict:
  return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _write_atomic(path: str, data: bytes) -> None:
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def save_export(export: IntegerExport, directory: str,
                stablehlo: Optional[bytes] = None) -> dict:
  """Writes ``export`` (and optionally a serialized function) to ``directory``.

  Files are written to temporary names and renamed, the manifest last, so a
  reader never sees a manifest that describes files not yet written.

  Args:
    export: from :func:`gdnsq_jax.export.export_model`.
    directory: created if needed; existing export files are replaced.
    stablehlo: bytes of a serialized ``jax.export.Exported`` to store as
      :data:`STABLEHLO_FILE`.

  Returns:
    The manifest as written (with its ``files`` entry).
  """
  os.makedirs(directory, exist_ok=True)
  arrays_path = os.path.join(directory, ARRAYS_FILE)
  tmp = arrays_path + ".tmp.npz"
  np.savez(tmp, **export.arrays)
  with open(tmp, "rb") as f:
    files = {ARRAYS_FILE: _digest(f.read())}
  os.replace(tmp, arrays_path)
  stablehlo_path = os.path.join(directory, STABLEHLO_FILE)
  if stablehlo is not None:
    _write_atomic(stablehlo_path, stablehlo)
    files[STABLEHLO_FILE] = _digest(stablehlo)
  elif os.path.exists(stablehlo_path):
    os.remove(stablehlo_path)  # a stale function of an earlier export
  manifest = dict(export.manifest, files=files)
  text = json.dumps(manifest, indent=2, sort_keys=False) + "\n"
  _write_atomic(os.path.join(directory, MANIFEST_FILE), text.encode())
  return manifest


def _read_checked(directory: str, manifest: dict, name: str) -> bytes:
  path = os.path.join(directory, name)
  expected = manifest.get("files", {}).get(name)
  if expected is None:
    raise ExportFormatError(
        f"the manifest in {directory!r} lists no {name!r}; the export was "
        f"written without it, or the manifest is damaged: {_FIX}")
  if not os.path.isfile(path):
    raise ExportFormatError(f"{path!r} is missing: {_FIX}")
  with open(path, "rb") as f:
    data = f.read()
  if len(data) != expected["bytes"]:
    raise ExportFormatError(
        f"{path!r} has {len(data)} bytes but the manifest records "
        f"{expected['bytes']}: the file is truncated or was replaced; {_FIX}")
  if hashlib.sha256(data).hexdigest() != expected["sha256"]:
    raise ExportFormatError(
        f"{path!r} does not match the SHA-256 in the manifest: the file is "
        f"corrupt; {_FIX}")
  return data


def _read_manifest(directory: str) -> dict:
  path = os.path.join(directory, MANIFEST_FILE)
  if not os.path.isfile(path):
    raise ExportFormatError(
        f"no {MANIFEST_FILE} in {directory!r}; is this an export directory? "
        f"{_FIX}")
  try:
    with open(path) as f:
      manifest = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as err:
    raise ExportFormatError(
        f"{path!r} is not valid JSON ({err}); it is truncated or corrupt: "
        f"{_FIX}") from err
  if not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT:
    raise ExportFormatError(
        f"{path!r} is not a {EXPORT_FORMAT} manifest (format "
        f"{manifest.get('format') if isinstance(manifest, dict) else None!r})")
  if manifest.get("version") != EXPORT_VERSION:
    raise ExportFormatError(
        f"{path!r} has format version {manifest.get('version')!r}; this "
        f"reader handles version {EXPORT_VERSION}: {_FIX}")
  return manifest


def _expected_arrays(manifest: dict) -> dict[str, dict]:
  specs = {}
  for layer in manifest["layers"]:
    for name, spec in layer["arrays"].items():
      specs[f"layers/{layer['path']}/{name}"] = spec
  for name, spec in manifest["variables"].items():
    specs[name] = spec
  return specs


def load_export(directory: str) -> IntegerExport:
  """Reads an export written by :func:`save_export`, checking every file.

  Raises:
    ExportFormatError: a file is missing, truncated, corrupt, of another
      format version, or disagrees with the manifest; the message says which
      and how to re-create it.
  """
  manifest = _read_manifest(directory)
  _read_checked(directory, manifest, ARRAYS_FILE)
  try:
    with np.load(os.path.join(directory, ARRAYS_FILE),
                 allow_pickle=False) as data:
      arrays = {k: data[k] for k in data.files}
  except Exception as err:  # zipfile / numpy raise several types
    raise ExportFormatError(
        f"{os.path.join(directory, ARRAYS_FILE)!r} cannot be read "
        f"({type(err).__name__}: {err}): {_FIX}") from err
  expected = _expected_arrays(manifest)
  missing = sorted(set(expected) - set(arrays))
  extra = sorted(set(arrays) - set(expected))
  wrong = sorted(
      f"{k}: {arrays[k].dtype}{list(arrays[k].shape)} vs manifest "
      f"{spec['dtype']}{spec['shape']}"
      for k, spec in expected.items() if k in arrays and (
          list(arrays[k].shape) != spec["shape"]
          or str(arrays[k].dtype) != spec["dtype"]))
  for layer in manifest["layers"]:
    key = f"layers/{layer['path']}/weight_codes"
    if key in arrays:
      count = int(np.prod(layer["kernel_shape"]))
      size = packing.packed_size(count, layer["weight_bits"])
      if arrays[key].shape != (size,):
        wrong.append(f"{key}: {arrays[key].shape[0]} bytes, {count} codes of "
                     f"{layer['weight_bits']} bits need {size}")
  if missing or extra or wrong:
    raise ExportFormatError(
        f"the arrays in {directory!r} disagree with its manifest; missing: "
        f"{missing or 'none'}; unexpected: {extra or 'none'}; mismatched: "
        f"{wrong or 'none'}. {_FIX}")
  return IntegerExport(manifest, arrays)


def read_stablehlo(directory: str) -> bytes:
  """The checked bytes of :data:`STABLEHLO_FILE` (see ``load_export``)."""
  return _read_checked(directory, _read_manifest(directory), STABLEHLO_FILE)


def _bits(bits: Optional[int]) -> str:
  return "fp32" if bits is None or bits >= 32 else str(bits)


def format_size_table(manifest: dict) -> str:
  """A text table: layer, bits, MACs, bytes vs FP32, then the totals."""
  header = ("layer", "W bits", "A bits", "MACs", "bytes", "fp32 bytes",
            "BN folded")
  rows = [header] + [
      (e["path"], _bits(e["weight_bits"]), _bits(e["activation_bits"]),
       f"{e['macs']:,}", f"{e['bytes']:,}", f"{e['fp32_bytes']:,}",
       "yes" if e["batch_norm"] else "-")
      for e in manifest["layers"]]
  other = sum(int(np.prod(s["shape"])) * np.dtype(s["dtype"]).itemsize
              for s in manifest["variables"].values())
  rows.append(("other variables (float32)", "", "", "", f"{other:,}",
               f"{other:,}", ""))
  widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
  lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                     for i, (c, w) in enumerate(zip(r, widths))).rstrip()
           for r in rows]
  t = manifest["totals"]
  lines.append(
      f"model size: {t['size_bytes']:,} bytes vs {t['fp32_size_bytes']:,} "
      f"bytes FP32 ({t['compression']:.2f}x smaller); "
      f"{t['quantized_layers']} quantized layers, "
      f"{len(t['fp_layers'])} FP layers")
  lines.append(f"MACs: {t['macs']:,} per example; "
               f"BOPs: {t['bops']:,} ({t['bops'] / 1e9:.4f} G)")
  return "\n".join(lines)


def format_summary(manifest: dict) -> str:
  """:func:`format_size_table`, then the verification line of the manifest.

  What ``python -m train.export`` prints and README.md shows; the
  verification (written by the program's export) is optional.
  """
  lines = [format_size_table(manifest)]
  v = manifest.get("verification")
  if v:
    lines.append(
        f"verified on {v['count']} {v['split']} images: argmax agreement "
        f"{v['argmax_agreement']:.4f}; logits within 1e-4 relative on "
        f"{v['fraction_within_1e-4']:.2%} (max "
        f"{v['max_relative_error']:.1e}); every layer within "
        f"{v['max_layer_relative_error']:.1e} on the same input; accuracy "
        f"{v['integer_accuracy']:.4f} (fake-quant "
        f"{v['fake_quant_accuracy']:.4f})")
  return "\n".join(lines)
