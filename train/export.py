"""Export a trained GDNSQ run as integers, verified against fake-quant eval.

  python -m train.export --workdir runs/w2a2
  python -m train.export --workdir runs/w2a2 --force   # not converged

Reads ``<workdir>/config.json``, rebuilds the quantized model, restores the
best converged state (``<workdir>/best/<step>``) or else the latest
(``<workdir>/checkpoints/<step>``), and writes ``<workdir>/export/``:
``manifest.json``, ``arrays.npz`` and ``model.stablehlo`` (see
:mod:`gdnsq_jax.export.files`). Before writing it checks that the integer
inference gives the fake-quant model's logits on the whole test split (within
1e-4 relative, same argmax on >= 99.9% of inputs) and that the StableHLO
artifact reloads and reproduces them; it prints the size table.

A run whose true widths exceed the config's targets (weights: integer
levels; activations: max over validation and test passes, docs/method.md
D11) is refused unless ``--force``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Optional

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gdnsq_jax import calibration
from gdnsq_jax.export import exporter as export_lib
from gdnsq_jax.export import files as export_files
from gdnsq_jax.export import verification as export_verification
from gdnsq_jax.export import inference as integer_inference
from gdnsq_jax.export import stablehlo as export_stablehlo
from gdnsq_jax import interception
from train import checkpointing
from train import input_pipeline
from train import train_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by train.main.")
_OUTPUT = flags.DEFINE_string("output", "", "Export directory ('' = <workdir>/export).")
_FORCE = flags.DEFINE_bool("force", False, "Export even if true widths exceed the targets.")
_FOLD_BN = flags.DEFINE_bool("fold_batch_norm", True, "Fold BatchNorm into the preceding layer.")
_STABLEHLO = flags.DEFINE_bool("stablehlo", True, "Also write the jax.export StableHLO function.")

MIN_ARGMAX_AGREEMENT = 0.999  # of the test inputs, ties aside
LAYER_TOLERANCE = 1e-4  # relative, every layer on the same (teacher) input
APPLY_KWARGS = {"train": False}


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was trained with (``<workdir>/config.json``)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"{path!r} does not exist; pass --workdir of a run written by "
        "`python -m train.main` (it writes config.json first)")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def restore_run_variables(workdir: str) -> tuple[dict, str]:
  """``({params, batch_stats}, checkpoint dir)``: best converged, else latest.

  Raises:
    checkpointing.CheckpointError: the run has no checkpoint.
  """
  for sub in ("best", "checkpoints"):
    directory = os.path.join(workdir, sub)
    if not os.path.isdir(directory):
      continue
    manager = checkpointing.StateCheckpointer(directory, max_to_keep=1_000_000)
    try:
      step = manager.latest_step()
      if step is not None:
        state = manager.restore_raw(step)["train"]
        variables = {"params": state["params"],
                     "batch_stats": state["batch_stats"]}
        return variables, manager.step_dir(step)
    finally:
      manager.close()
  raise checkpointing.CheckpointError(
      f"no checkpoint in {workdir}/best or {workdir}/checkpoints; train the "
      "run first (python -m train.main --config ... --workdir ...)")


def _images(dataset, split: str, batch_size: int):
  for batch in input_pipeline.eval_batches(dataset, split,
                                           global_batch_size=batch_size):
    yield batch["image"][batch["mask"]], batch["label"][batch["mask"]]


def verify(qmodel, variables, integer, export, dataset, split: str,
           batch_size: int) -> dict[str, Any]:
  """Integer vs fake-quant over ``split``: logits and teacher-forced layers.

  See :mod:`gdnsq_jax.export.verification`. ``passed``: argmax agreement
  >= 99.9% (ties aside) and every layer within 1e-4 relative.
  """
  reference = jax.jit(lambda v, x: qmodel.apply(v, x, **APPLY_KWARGS))
  layers = jax.jit(lambda v, x: export_verification.compare_layers(
      qmodel, v, export, x))
  ref, out, labels, layer_errors = [], [], [], {}
  for images, y in _images(dataset, split, batch_size):
    ref.append(np.asarray(reference(variables, images)))
    out.append(np.asarray(integer(images)))
    labels.append(y)
    for path, error in jax.device_get(layers(variables, images)).items():
      layer_errors[path] = max(float(error), layer_errors.get(path, 0.0))
  ref, out, labels = map(np.concatenate, (ref, out, labels))
  result = export_verification.compare_logits(out, ref)
  worst = max(layer_errors.values(), default=0.0)
  result.update(
      split=split,
      fake_quant_accuracy=float(np.mean(ref.argmax(-1) == labels)),
      integer_accuracy=float(np.mean(out.argmax(-1) == labels)),
      max_layer_relative_error=worst,
      layer_relative_errors=layer_errors,
      passed=bool(result["argmax_agreement"] >= MIN_ARGMAX_AGREEMENT
                  and worst <= LAYER_TOLERANCE))
  return result


def export_run(workdir: str, *, output_dir: Optional[str] = None,
               force: bool = False, fold_batch_norm: bool = True,
               stablehlo: bool = True) -> dict[str, Any]:
  """Exports, verifies and writes a run; returns the written manifest.

  Raises:
    gdnsq_jax.export.NotConvergedError: widths above target and not force.
    gdnsq_jax.export.ExportError: the integer inference or its StableHLO
      artifact disagrees with the fake-quant model (nothing is written).
  """
  workdir = os.path.abspath(workdir)
  config = load_run_config(workdir)
  if config.mode != "quantize":
    raise export_lib.ExportError(
        f"{workdir} is an FP run (config.mode={config.mode!r}); export a "
        "run trained with a quantized config such as configs/w2a2.py")
  dataset = train_lib.load_data(config)
  model = train_lib.build_model(config, dataset.num_classes)
  settings = train_lib.quant_settings(config)
  shape = tuple(dataset.image_shape)
  qmodel = interception.quantize_model(
      model, jax.ShapeDtypeStruct((1,) + shape, jnp.float32),
      settings=settings, rules=train_lib.quant_rules(config), **APPLY_KWARGS)
  variables, source = restore_run_variables(workdir)
  batch_size = config.data.eval_batch_size
  widths = {}
  if settings.quantize_activations:  # docs/method.md D11: both passes
    images = (x for split in ("validation", "test")
              for x, _ in _images(dataset, split, batch_size))
    widths = calibration.measure_activation_widths(
        qmodel, variables, images, apply_kwargs=APPLY_KWARGS)
  export = export_lib.export_model(
      qmodel, variables, shape, apply_kwargs=APPLY_KWARGS,
      fold_batch_norm=fold_batch_norm, weight_bits=config.quant.weight_bits,
      activation_bits=config.quant.activation_bits,
      activation_widths=widths, force=force)
  integer = jax.jit(
      lambda x: integer_inference.integer_apply(model, export, x))
  check = verify(qmodel, variables, integer, export, dataset, "test",
                 batch_size)
  if not check["passed"]:
    raise export_lib.ExportError(
        f"integer inference disagrees with the fake-quant model on the test "
        f"split: {check}; nothing was written. Please report this as a bug")
  blob = None
  if stablehlo:
    exported = export_stablehlo.export_inference(model, export)
    blob = export_stablehlo.serialize_inference(exported)
    images = next(_images(dataset, "test", batch_size))[0]
    served = export_stablehlo.load_inference(blob)(images)
    check["stablehlo_max_abs_difference"] = float(
        np.abs(np.asarray(served) - np.asarray(integer(images))).max())
    check["stablehlo_platforms"] = list(exported.platforms)
  manifest = dict(export.manifest, verification=check, source={
      "workdir": workdir, "checkpoint": source,
      "config": {"model": config.model.name, "preset": config.preset}})
  output_dir = output_dir or os.path.join(workdir, "export")
  written = export_files.save_export(
      export_lib.IntegerExport(manifest, export.arrays), output_dir, blob)
  export_files.load_export(output_dir)  # the files read back as written
  return written


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every read at INFO
  try:
    manifest = export_run(_WORKDIR.value, output_dir=_OUTPUT.value or None,
                          force=_FORCE.value, fold_batch_norm=_FOLD_BN.value,
                          stablehlo=_STABLEHLO.value)
  except export_lib.ExportError as err:
    sys.exit(f"error: {err}")
  print(export_files.format_summary(manifest))
  if manifest["forced"]:
    print("forced export; widths above target:\n  "
          + "\n  ".join(manifest["width_violations"]))
  print(f"wrote {_OUTPUT.value or os.path.join(_WORKDIR.value, 'export')}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
