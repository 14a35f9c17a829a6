"""GDNSQ fine-tuning: teacher, calibration, sharded training, evaluation.

``train_and_evaluate(config, workdir)`` is the whole program; ``main.py``
only parses flags. Layout of ``workdir``::

  teacher/variables/   FP teacher (trained here unless config.teacher.checkpoint)
  teacher_state/<step>/  its train states while it trains (resume points;
                       deleted once teacher/variables is saved)
  checkpoints/<step>/  latest full train states (resume points)
  best/<step>/         best converged state by validation accuracy
  tensorboard/         scalars
  config.json          the config of the run (read by train.export)
  history.jsonl        one record per validation: widths, accuracy
  results.json, bitwidths.txt, bitwidth_dynamics.png
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections

from gdnsq_jax import bitwidths
from gdnsq_jax import calibration
from gdnsq_jax import families
from gdnsq_jax import interception
from gdnsq_jax import layers
from gdnsq_jax import penalty
from train import checkpointing
from train import data_loader
from train import device_data
from train import early_stopping as early_stopping_lib
from train import input_pipeline
from train import loop
from train import mobilenet
from train import models
from train import preemption
from train import reporting
from train import sharding
from train import steps
from train import teacher as teacher_lib
from train import vit


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Fails fast, before any data or compile work, on inconsistent keys."""
  if config.mode not in ("fp", "quantize"):
    raise ValueError(f"config.mode={config.mode!r}; choose 'fp' or 'quantize'")
  if config.distill.loss != steps.LABELS:
    steps.make_task_loss(config.distill.loss, config.distill.temperature)
  if config.data.name == "npz" and not config.data.path:
    raise ValueError("config.data.name='npz' needs --config.data.path=<file.npz>")
  for key in ("batch_size", "eval_batch_size"):
    if config.data[key] <= 0:
      raise ValueError(f"config.data.{key} must be positive")
  if config.data.device_resident not in device_data.MODES:
    raise ValueError(
        f"config.data.device_resident={config.data.device_resident!r}; "
        f"choose one of: {', '.join(device_data.MODES)}")
  if config.data.workers < -1 or config.data.prefetch < 0:
    raise ValueError(
        f"config.data.workers={config.data.workers} / prefetch="
        f"{config.data.prefetch}: workers is -1 (one per core for decoded "
        "data), 0 (in-process) or a count; prefetch >= 0")
  if config.train.num_steps < 0:
    raise ValueError("config.train.num_steps must be >= 0")
  t = config.teacher
  if not t.checkpoint and not 0 <= t.warmup_steps < t.num_steps:
    raise ValueError(
        f"config.teacher.warmup_steps={t.warmup_steps} must be below "
        f"config.teacher.num_steps={t.num_steps} (the FP recipe decays its "
        "learning rate over the steps after the warmup); lower "
        "--config.teacher.warmup_steps or raise --config.teacher.num_steps")
  if config.mode == "quantize":
    layers.QuantSettings(**{  # method / bits errors before any work
        "weight_bits": config.quant.weight_bits,
        "activation_bits": config.quant.activation_bits,
        "method": config.quant.method})


def load_data(config: ml_collections.ConfigDict) -> input_pipeline.Dataset:
  name = config.data.path if config.data.name == "npz" else config.data.name
  return input_pipeline.load_dataset(
      name, data_dir=config.data.data_dir or None,
      validation_size=config.data.validation_size, seed=config.seed)


MODELS = {**models.MODELS, **mobilenet.MODELS, **vit.MODELS}
"""Every ``config.model.name``: the ResNets, ``mobilenet_v2`` and ``vit``."""


def build_model(config: ml_collections.ConfigDict, num_classes: int):
  """The FP model named by ``config.model``.

  Raises:
    ValueError: an unknown ``model.name``, or a ``model`` key set that the
      model does not have (``stage_widths`` / ``stem_width`` for the ViT,
      ``patch_size`` for the CNNs).
  """
  name = config.model.name
  if name not in MODELS:
    raise ValueError(f"unknown config.model.name {name!r}; choose one of: "
                     f"{', '.join(sorted(MODELS))}")
  kwargs = {"dtype": jnp.dtype(config.model.dtype)}
  if config.model.stage_widths:
    kwargs["stage_widths"] = tuple(config.model.stage_widths)
  if config.model.stem_width:
    kwargs["stem_width"] = config.model.stem_width
  if config.model.patch_size:
    kwargs["patch_size"] = config.model.patch_size
  fields = {f.name for f in dataclasses.fields(MODELS[name])}
  unknown = sorted(k for k in kwargs if k not in fields)
  if unknown:
    raise ValueError(
        f"config.model.{unknown[0]} does not apply to model {name!r}; leave "
        "it at its default (() / 0)")
  return MODELS[name](num_classes=num_classes, **kwargs)


def quant_settings(config: ml_collections.ConfigDict) -> layers.QuantSettings:
  q = config.quant
  return layers.QuantSettings(
      weight_bits=q.weight_bits, activation_bits=q.activation_bits,
      estimator=q.estimator, activation_estimator=q.activation_estimator,
      per_channel=q.per_channel, dither=q.dither,
      learnable_clamp_low=q.learnable_clamp_low,
      unsigned_if_nonnegative=q.unsigned_if_nonnegative, method=q.method,
      # One-shot and fixed-width (LSQ) families start at the target widths.
      calibration_bits=(q.calibration_bits
                        if q.gradual and families.get_family(q.method)
                        .learns_widths else q.weight_bits))


def quant_rules(config: ml_collections.ConfigDict) -> dict[str, Any]:
  q = config.quant
  rules = {"quantize_stem": q.quantize_stem,
           "quantize_classifier": q.quantize_classifier,
           "quantize_1x1": q.quantize_1x1}
  if q.exclude:
    rules["exclude"] = (q.exclude,)
  return rules


def make_optimizer(config, activation_bits):
  o = config.optim
  return penalty.gdnsq_optimizer(
      bitwidths.differentiable_bitwidths,
      learning_rate=o.learning_rate,
      weight_bits=config.quant.weight_bits,
      activation_bits=activation_bits,
      warmup_steps=o.warmup_steps, gamma=o.gamma,
      # Fixed widths (LSQ): the penalty weight stays 0 (no penalty).
      t_increment=(0.0 if not families.get_family(config.quant.method)
                   .learns_widths
                   else None if o.t_increment < 0 else o.t_increment),
      b1=o.b1, b2=o.b2, eps=o.eps, flatten=o.flatten)


def make_early_stopping(config: ml_collections.ConfigDict
                        ) -> early_stopping_lib.EarlyStopping:
  """Model selection before the first validation, from ``config.train``."""
  return early_stopping_lib.EarlyStopping.create(
      min_delta=config.train.early_stopping_min_delta,
      patience=config.train.early_stopping_patience)


def _calibration_batches(config, dataset, mesh):
  """The first ``calibration_batches`` train batches, unaugmented, on mesh."""
  it = data_loader.eval_stream(config, dataset, "train", mesh,
                               config.data.batch_size)
  try:
    return [batch["image"] for _, batch in zip(
        range(config.data.calibration_batches), it)]
  finally:
    it.close()


def _fresh_state(config, qmodel, fp_variables, dataset, mesh, tx):
  """Calibrated quantized state from the FP variables (docs/method.md §6)."""
  sample = jax.ShapeDtypeStruct((1,) + tuple(dataset.image_shape),
                                jnp.float32)
  abstract = jax.eval_shape(
      lambda x: qmodel.init(jax.random.key(0), x, train=False), sample)
  variables = interception.add_quantizer_params(fp_variables, abstract)
  calibrated = calibration.calibrate(
      qmodel, variables, _calibration_batches(config, dataset, mesh),
      apply_kwargs=({"train": True, "mutable": ["batch_stats"]}
                    if config.quant.calibrate_with_batch_stats
                    else {"train": False}))
  trainable = jax.tree.map(lambda t: jnp.asarray(t, bool),
                           calibrated.trainable)
  variables = calibrated.variables
  rng = jax.random.key_data(jax.random.key(config.seed + 2))
  return steps.create_state(variables, tx, trainable, rng)


def _abstract_loop_state(config, qmodel, dataset, tx):
  """Shapes of the checkpointed loop state (``jax.eval_shape``)."""
  sample = jax.ShapeDtypeStruct((1,) + tuple(dataset.image_shape),
                                jnp.float32)

  def build(x):
    variables = qmodel.init(jax.random.key(0), x, train=False)
    trainable = jax.tree.map(lambda _: jnp.asarray(True),
                             variables["params"])
    rng = jax.random.key_data(jax.random.key(0))
    return loop.LoopState.initial(
        steps.create_state(variables, tx, trainable, rng),
        make_early_stopping(config))

  return jax.eval_shape(build, sample)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str
                       ) -> dict[str, Any]:
  """Runs the configured job in ``workdir``; returns the results dict.

  On SIGTERM (:mod:`train.preemption`) the current step finishes, the FP
  teacher's training or GDNSQ saves its checkpoint, and the results are
  ``{'preempted': True, 'preempted_step', 'checkpoint'}`` (no
  ``results.json``): the program exits with status 0 and rerunning it
  resumes.
  """
  start_time = time.time()
  validate_config(config)
  workdir = os.path.abspath(workdir)
  main = sharding.is_main_process()
  if main:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2) + "\n")
  mesh = sharding.make_mesh()
  sharding.log_topology(mesh)
  for key in ("batch_size", "eval_batch_size"):
    sharding.check_global_batch(config.data[key], mesh)
  dataset = load_data(config)
  model = build_model(config, dataset.num_classes)
  writer = reporting.MetricWriter(
      os.path.join(workdir, "tensorboard") if main else None)
  try:
    with preemption.PreemptionGuard() as guard:
      fp_variables, teacher_source = teacher_lib.load_or_train_teacher(
          config, workdir, model, dataset, mesh, writer, guard)
      fp_val, fp_test = teacher_lib.evaluate_fp(
          model, fp_variables, dataset, ("validation", "test"), config, mesh)
      results = {
          "mode": config.mode, "preset": config.preset,
          "model": config.model.name, "dataset": dataset.name,
          "teacher": teacher_source,
          "fp_validation_accuracy": fp_val.accuracy,
          "fp_test_accuracy": fp_test.accuracy,
          "device_kind": jax.devices()[0].device_kind,
          "num_devices": jax.device_count(),
          "num_processes": jax.process_count(),
          "code_commit": reporting.code_commit(),
      }
      if config.mode == "quantize":
        results.update(quantize(config, workdir, model, fp_variables,
                                dataset, mesh, writer, guard))
    results["wall_time_s"] = time.time() - start_time
    if main:
      reporting.write_json_atomic(os.path.join(workdir, "results.json"),
                                  results)
    return results
  except preemption.Preempted as stop:
    logging.warning("%s", stop)
    if main:
      print(stop, flush=True)
    return {"preempted": True, "preempted_step": stop.step,
            "checkpoint": stop.checkpoint_dir}
  finally:
    writer.close()


def quantize(config, workdir, model, fp_variables, dataset, mesh, writer,
             guard=None):
  """GDNSQ fine-tuning of ``model`` from ``fp_variables``; returns results."""
  settings = quant_settings(config)
  sample = jax.ShapeDtypeStruct((1,) + tuple(dataset.image_shape),
                                jnp.float32)
  qmodel = interception.quantize_model(
      model, sample, settings=settings, rules=quant_rules(config),
      train=False)
  report = interception.quantization_report(qmodel)
  if sharding.is_main_process():
    print("quantization placement:\n"
          + interception.format_quantization_report(report), flush=True)
  tx = make_optimizer(config, config.quant.activation_bits)
  checkpoints = checkpointing.StateCheckpointer(
      os.path.join(workdir, "checkpoints"),
      max_to_keep=config.train.max_checkpoints_to_keep)
  best = checkpointing.StateCheckpointer(os.path.join(workdir, "best"), 1)
  # Resume order: (1) the latest checkpoint in <workdir>/checkpoints (an
  # interrupted run continues exactly: params, optimizer and schedule state,
  # data position, RNG, early-stopping counters); (2) otherwise a fresh,
  # calibrated state from the FP teacher variables.
  loop_state = checkpoints.restore_latest(
      lambda: _abstract_loop_state(config, qmodel, dataset, tx))
  if loop_state is None:
    loop_state = loop.LoopState.initial(
        _fresh_state(config, qmodel, fp_variables, dataset, mesh, tx),
        make_early_stopping(config))
  fp_paths = [r.path for r in report if not r.quantized]
  try:
    out = loop.fit(
        config=config, qmodel=qmodel, teacher_model=model,
        teacher_variables=fp_variables, loop_state=loop_state, tx=tx,
        dataset=dataset, mesh=mesh, writer=writer, checkpoints=checkpoints,
        best=best, workdir=workdir, guard=guard)
  finally:
    checkpoints.close()
    best.close()
  out["fp_layers"] = fp_paths
  out["quantized_layers"] = [r.path for r in report if r.quantized]
  if sharding.is_main_process():
    summary = out.pop("_summary")
    table = reporting.format_bitwidth_table(
        summary, fp_paths, config.quant.weight_bits,
        config.quant.activation_bits)
    with open(os.path.join(workdir, "bitwidths.txt"), "w") as f:
      f.write(table + "\n")
    print(table)
  else:
    out.pop("_summary")
  return out
