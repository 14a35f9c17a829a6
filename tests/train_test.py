"""Tests of the training program on a tiny config and 4 fake CPU devices."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

from absl.testing import absltest
import chex
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from gdnsq_jax import interception
from train import checkpointing
from train import data_loader
from train import input_pipeline
from train import sharding
from train import steps
from train import teacher as teacher_lib
from train import train_lib
from tests import tiny_setup

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Shared:
  """One trained tiny teacher for the whole module (saves compile time)."""

  tmp = None
  teacher = None

  @classmethod
  def setup(cls):
    if cls.tmp is None:
      cls.tmp = tempfile.mkdtemp(prefix="gdnsq_train_test_")
      config = tiny_setup.tiny_config(cls.tmp)
      workdir = os.path.join(cls.tmp, "teacher_run")
      fp = tiny_setup.tiny_config(cls.tmp, weight_bits=32, activation_bits=32)
      cls.fp_results = train_lib.train_and_evaluate(fp, workdir)
      cls.teacher = os.path.join(workdir, teacher_lib.TEACHER_SUBDIR)
      del config
    return cls


def _config(**kwargs):
  shared = _Shared.setup()
  c = tiny_setup.tiny_config(shared.tmp, **kwargs)
  c.teacher.checkpoint = shared.teacher
  return c


def _final_params(workdir):
  ck = checkpointing.StateCheckpointer(os.path.join(workdir, "checkpoints"))
  step = ck.latest_step()
  restored = ck.restore_raw(step)
  ck.close()
  return step, restored["train"]["params"]


class TrainProgramTest(absltest.TestCase):

  def test_fp_recipe_learns(self):
    results = _Shared.setup().fp_results
    self.assertEqual(results["mode"], "fp")
    self.assertGreater(results["fp_test_accuracy"], 0.9)
    self.assertTrue(os.path.isdir(_Shared.teacher))

  def test_end_to_end_on_four_devices(self):
    self.assertEqual(jax.device_count(), 4)
    workdir = self.create_tempdir().full_path
    config = _config(num_steps=12)
    results = train_lib.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, "results.json")) as f:
      on_disk = json.load(f)
    self.assertEqual(on_disk["steps"], 12)
    self.assertEqual(on_disk["num_devices"], 4)
    for key in ("fp_test_accuracy", "quantized_test_accuracy", "converged",
                "true_weight_bits_max", "true_activation_bits_max",
                "wall_time_s", "device_kind"):
      self.assertIn(key, on_disk)
    # 3 quantized 3x3 convs in the 1-block-per-stage model (stem/classifier/
    # 1x1 shortcuts stay FP), each with an input quantizer.
    self.assertLen(results["quantized_layers"], 6 - 0 - 0 - 3 + 3)
    self.assertIn("stem_conv", results["fp_layers"])
    self.assertIn("classifier", results["fp_layers"])
    # The penalty started pushing widths down from the calibrated 10 bits.
    self.assertLess(on_disk["true_weight_bits_max"], 10.0)
    self.assertTrue(os.path.exists(os.path.join(workdir, "bitwidths.txt")))
    self.assertTrue(
        os.path.exists(os.path.join(workdir, "bitwidth_dynamics.png")))
    with open(os.path.join(workdir, "history.jsonl")) as f:
      history = [json.loads(l) for l in f]
    self.assertEqual([h["step"] for h in history], [4, 8, 12])

  def test_lsq_baseline_keeps_fixed_widths_without_penalty(self):
    workdir = self.create_tempdir().full_path
    config = _config(num_steps=8)
    config.quant.method = "lsq"
    results = train_lib.train_and_evaluate(config, workdir)
    self.assertLessEqual(results["true_weight_bits_max"], 2.0)
    self.assertLessEqual(results["true_activation_bits_max"], 2.0)
    self.assertTrue(results["converged"])
    with open(os.path.join(workdir, "history.jsonl")) as f:
      history = [json.loads(l) for l in f]
    self.assertEqual([h["converged"] for h in history], [True, True])
    self.assertTrue(all(b <= 2.0 for h in history
                        for b in h["weight_bits"].values()))
    ck = checkpointing.StateCheckpointer(os.path.join(workdir, "checkpoints"))
    early, late = (ck.restore_raw(s)["train"]["params"] for s in (4, 8))
    ck.close()
    early, late = (traverse_util.flatten_dict(p, sep="/")
                   for p in (early, late))
    steps_ = [k for k in early if k.endswith("input_quantizer/log2_step")]
    self.assertLen(steps_, 6)
    for key in steps_:
      grid = key.replace("log2_step", "log2_range")
      # LSQ's gradient moves the step; the tied grid width stays frozen.
      self.assertNotEqual(float(early[key]), float(late[key]))
      self.assertEqual(float(early[grid]), float(late[grid]))
    settings = train_lib.quant_settings(config)
    self.assertEqual((settings.method, settings.calibration_bits), ("lsq", 2))

  def test_teacher_through_the_shared_loop_matches_a_plain_loop(self):
    # train_fp runs the FP recipe through loop.run_steps (sharded step,
    # logging, non-finite check); the variables are those of a bare loop.
    shared = _Shared.setup()
    config = tiny_setup.tiny_config(shared.tmp, weight_bits=32,
                                    activation_bits=32)
    dataset = train_lib.load_data(config)
    model = train_lib.build_model(config, dataset.num_classes)
    mesh = sharding.make_mesh()
    sample = jnp.zeros((1,) + tuple(dataset.image_shape), jnp.float32)
    variables = model.init(jax.random.key(config.seed), sample, train=False)
    tx = teacher_lib.fp_optimizer(config)
    state = sharding.replicate(steps.create_state(
        variables, tx, jax.tree.map(lambda _: True, variables["params"]),
        jax.random.key_data(jax.random.key(config.seed + 1))), mesh)
    step = jax.jit(steps.make_train_step(
        model, tx, steps.make_task_loss(steps.LABELS, 1.0), quantized=False))
    with data_loader.train_stream(config, dataset, mesh) as batches:
      for _ in range(config.teacher.num_steps):
        state, _ = step(state, next(batches), None)
    trained = checkpointing.restore_variables(
        shared.teacher, teacher_lib.abstract_variables(model,
                                                       dataset.image_shape))
    chex.assert_trees_all_equal(
        trained, jax.device_get({"params": state.params,
                                 "batch_stats": state.batch_stats}))

  def test_early_stopping_state_is_checkpointed_and_resumed(self):
    # LSQ keeps its widths on target, so every validation is converged.
    workdir = self.create_tempdir().full_path
    config = _config(num_steps=40)
    config.quant.method = "lsq"
    config.train.early_stopping_patience = 2
    first = train_lib.train_and_evaluate(config, workdir)
    self.assertTrue(first["early_stopped"])
    ck = checkpointing.StateCheckpointer(os.path.join(workdir, "checkpoints"))
    stopped_at = ck.latest_step()
    saved = ck.restore_raw(stopped_at)["early_stopping"]
    ck.close()
    self.assertEqual(first["steps"], stopped_at)
    self.assertEqual(int(saved["patience_count"]), 2)
    self.assertTrue(bool(saved["should_stop"]))
    best_step = int(saved["best_step"])
    self.assertEqual(first["selected_model"],
                     f"best converged (step {best_step})")
    self.assertTrue(os.path.isdir(os.path.join(workdir, "best",
                                               str(best_step))))
    # Running again continues from the stop with the restored count: the
    # state after each validation is the rule replayed over the history.
    train_lib.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, "history.jsonl")) as f:
      history = [json.loads(l) for l in f]
    self.assertEqual([h["step"] for h in history],
                     list(range(4, history[-1]["step"] + 1, 4)))
    self.assertGreater(history[-1]["step"], stopped_at)
    replay = train_lib.make_early_stopping(config)
    for h in history:
      replay = replay.update(h["accuracy"], h["step"], h["converged"])
    ck = checkpointing.StateCheckpointer(os.path.join(workdir, "checkpoints"))
    resumed = ck.restore_raw(ck.latest_step())["early_stopping"]
    ck.close()
    self.assertEqual(
        {k: np.asarray(v).item() for k, v in resumed.items()},
        {k: np.asarray(getattr(replay, k)).item() for k in resumed})

  def test_teacher_warmup_longer_than_training_is_one_clear_error(self):
    config = tiny_setup.tiny_config(self.create_tempdir().full_path)
    config.teacher.num_steps = 100
    config.teacher.warmup_steps = 225
    with self.assertRaisesRegex(
        ValueError, r"teacher.warmup_steps=225 must be below "
        r"config.teacher.num_steps=100"):
      train_lib.train_and_evaluate(config, self.create_tempdir().full_path)

  def test_resume_is_bit_identical(self):
    straight = self.create_tempdir().full_path
    resumed = self.create_tempdir().full_path
    train_lib.train_and_evaluate(_config(num_steps=8), straight)
    train_lib.train_and_evaluate(_config(num_steps=4), resumed)
    train_lib.train_and_evaluate(_config(num_steps=8), resumed)
    step_a, params_a = _final_params(straight)
    step_b, params_b = _final_params(resumed)
    self.assertEqual((step_a, step_b), (8, 8))
    chex.assert_trees_all_equal(params_a, params_b)

  def test_sharded_step_matches_single_device(self):
    config = _config()
    dataset = train_lib.load_data(config)
    model = train_lib.build_model(config, dataset.num_classes)
    fp_vars, _ = teacher_lib.load_or_train_teacher(
        config, "/nonexistent", model, dataset, sharding.make_mesh(),
        None)
    sample = jax.ShapeDtypeStruct((1,) + dataset.image_shape, jnp.float32)
    qmodel = interception.quantize_model(
        model, sample, settings=train_lib.quant_settings(config),
        rules=train_lib.quant_rules(config), train=False)
    tx = train_lib.make_optimizer(config, 2)
    batch = next(input_pipeline.train_batches(
        dataset, global_batch_size=32, seed=0))
    losses, params = [], []
    for devices in (jax.devices()[:1], jax.devices()):
      mesh = sharding.make_mesh(devices)
      state = train_lib._fresh_state(config, qmodel, fp_vars, dataset, mesh,
                                     tx)
      step = jax.jit(steps.make_train_step(
          qmodel, tx, steps.make_task_loss("jeffreys", 1.0), model))
      state = sharding.replicate(state, mesh)
      new_state, metrics = step(state, sharding.host_to_global(batch, mesh),
                                sharding.replicate(fp_vars, mesh))
      losses.append(float(metrics["train/loss"]))
      params.append(jax.device_get(new_state.params))
    # The distillation loss right after calibration is ~3e-3 (student ~
    # teacher): compare in absolute terms, to float32 summation-order noise.
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4, atol=1e-5)
    chex.assert_trees_all_close(params[0], params[1], rtol=1e-4, atol=1e-6)

  def test_train_step_traces_once(self):
    config = _config()
    dataset = train_lib.load_data(config)
    model = train_lib.build_model(config, dataset.num_classes)
    mesh = sharding.make_mesh()
    fp_vars, _ = teacher_lib.load_or_train_teacher(
        config, "/nonexistent", model, dataset, mesh, None)
    sample = jax.ShapeDtypeStruct((1,) + dataset.image_shape, jnp.float32)
    qmodel = interception.quantize_model(
        model, sample, settings=train_lib.quant_settings(config),
        train=False)
    tx = train_lib.make_optimizer(config, 2)
    state = sharding.replicate(
        train_lib._fresh_state(config, qmodel, fp_vars, dataset, mesh, tx),
        mesh)
    step = jax.jit(chex.assert_max_traces(steps.make_train_step(
        qmodel, tx, steps.make_task_loss("jeffreys", 1.0), model), n=1))
    batches = input_pipeline.train_batches(dataset, global_batch_size=32)
    teacher_vars = sharding.replicate(fp_vars, mesh)
    for _ in range(3):
      state, _ = step(state, sharding.host_to_global(next(batches), mesh),
                      teacher_vars)
    self.assertEqual(int(state.step), 3)


def _run_in_subprocess(workdir, workers, *signal_at):
  """``tests.interrupted_run`` in a fresh process: (return code, output)."""
  shared = _Shared.setup()
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([_REPO, env.get("PYTHONPATH", "")])
  proc = subprocess.run(
      [sys.executable, "-m", "tests.interrupted_run", shared.tmp, workdir,
       shared.teacher, str(workers), *map(str, signal_at)],
      cwd=_REPO, env=env, capture_output=True, text=True, timeout=600)
  return proc.returncode, proc.stdout + proc.stderr


# results.json entries that must not depend on an interruption.
_RESULT_KEYS = ("fp_test_accuracy", "quantized_validation_accuracy",
                "quantized_test_accuracy", "converged", "selected_model",
                "true_weight_bits_max", "true_weight_bits_mean",
                "true_activation_bits_max", "true_activation_bits_mean",
                "steps", "early_stopped")


class InterruptedRunTest(absltest.TestCase):
  """kill -9 / SIGTERM mid-run, then the same command: the same run."""

  @classmethod
  def _uninterrupted(cls):
    if not hasattr(cls, "_straight"):
      cls._straight = os.path.join(_Shared.setup().tmp, "straight12")
      train_lib.train_and_evaluate(_config(num_steps=12), cls._straight)
    return cls._straight

  def _assert_same_run(self, workdir, params_rtol=0.0):
    straight = self._uninterrupted()
    read = lambda d, name: open(os.path.join(d, name)).read()
    self.assertEqual(read(workdir, "history.jsonl"),
                     read(straight, "history.jsonl"))
    got, want = (json.loads(read(d, "results.json"))
                 for d in (workdir, straight))
    self.assertEqual({k: got[k] for k in _RESULT_KEYS},
                     {k: want[k] for k in _RESULT_KEYS})
    (step_a, params_a), (step_b, params_b) = (
        _final_params(d) for d in (workdir, straight))
    self.assertEqual((step_a, step_b), (12, 12))
    if params_rtol:
      chex.assert_trees_all_close(params_a, params_b, rtol=params_rtol,
                                  atol=0.0)
    else:
      chex.assert_trees_all_equal(params_a, params_b)

  def test_kill_9_mid_run_then_rerun_is_bit_identical(self):
    workdir = self.create_tempdir().full_path
    code, out = _run_in_subprocess(workdir, 0, "KILL", 6)
    self.assertEqual(code, -9, out[-3000:])  # after checkpoint 4, before 8
    self.assertFalse(os.path.exists(os.path.join(workdir, "results.json")))
    code, out = _run_in_subprocess(workdir, 0)
    self.assertEqual(code, 0, out[-3000:])
    self._assert_same_run(workdir)

  def test_sigterm_then_kill_9_with_worker_processes(self):
    workdir = self.create_tempdir().full_path
    code, out = _run_in_subprocess(workdir, 2, "TERM", 5)
    self.assertEqual(code, 0, out[-3000:])
    checkpoint = os.path.join(workdir, "checkpoints", "5")
    self.assertIn("preempted: GDNSQ saved the checkpoint of step 5 to "
                  f"{checkpoint}; rerun the same command to resume", out)
    self.assertTrue(os.path.isdir(checkpoint))
    code, out = _run_in_subprocess(workdir, 2, "KILL", 10)
    self.assertEqual(code, -9, out[-3000:])
    code, out = _run_in_subprocess(workdir, 2)
    self.assertEqual(code, 0, out[-3000:])
    # History and results are exact; one run on the heavily shared CPU
    # ended with one classifier weight 1 ulp off (not reproduced by
    # uninterrupted runs with 0 or 2 workers, nor by a SIGTERM resume
    # in-process), so the final params are compared to float32 rounding.
    self._assert_same_run(workdir, params_rtol=1e-6)


class TrainProgramErrorsTest(absltest.TestCase):

  def test_missing_teacher_path(self):
    config = _config()
    config.teacher.checkpoint = "/nonexistent/teacher"
    with self.assertRaisesRegex(checkpointing.CheckpointError,
                                "/nonexistent/teacher.*does not exist"):
      train_lib.train_and_evaluate(config, self.create_tempdir().full_path)

  def test_teacher_of_wrong_architecture(self):
    config = _config()
    config.model.stage_widths = (4, 8, 16)
    with self.assertRaisesRegex(checkpointing.CheckpointError,
                                "(?s)does not match the model.*shape mismatch"):
      train_lib.train_and_evaluate(config, self.create_tempdir().full_path)

  def test_corrupt_teacher_checkpoint(self):
    broken = os.path.join(self.create_tempdir().full_path, "teacher")
    shutil.copytree(_Shared.setup().teacher, broken)
    for root, _, files in os.walk(broken):
      for name in files:
        with open(os.path.join(root, name), "wb") as f:
          f.write(b"garbage")
    config = _config()
    config.teacher.checkpoint = broken
    with self.assertRaisesRegex(checkpointing.CheckpointError,
                                "missing or corrupt|is corrupt"):
      train_lib.train_and_evaluate(config, self.create_tempdir().full_path)

  def test_missing_tfds_dataset(self):
    config = _config()
    config.data.name = "cifar10"
    data_dir = self.create_tempdir().full_path
    config.data.data_dir = data_dir
    with self.assertRaisesRegex(input_pipeline.DatasetNotFoundError,
                                "cifar10.*" + data_dir):
      train_lib.train_and_evaluate(config, self.create_tempdir().full_path)

  def test_non_finite_loss_stops_with_diagnostic(self):
    config = _config(num_steps=6)
    nan_loss = lambda name, temperature: (
        lambda logits, teacher_logits, labels: jnp.sum(logits) * jnp.nan)
    with absltest.mock.patch.object(steps, "make_task_loss", nan_loss):
      with self.assertRaisesRegex(
          FloatingPointError,
          r"non-finite train/loss.*at step 2; last good checkpoint: none"):
        train_lib.train_and_evaluate(config, self.create_tempdir().full_path)

  def test_config_typo_is_one_clear_error(self):
    proc = subprocess.run(
        [sys.executable, "-m", "train.main", "--config", "configs/w2a2.py",
         "--config.optim.learning_rat=0.1", "--workdir",
         self.create_tempdir().full_path],
        cwd=_REPO, capture_output=True, text=True, timeout=120)
    self.assertNotEqual(proc.returncode, 0)
    self.assertIn("learning_rat", proc.stderr)

  def test_unknown_preset(self):
    with self.assertRaisesRegex(ValueError, "unknown preset 'cifar11'"):
      from configs import w2a2  # pylint: disable=g-import-not-at-top
      w2a2.get_config("cifar11")


if __name__ == "__main__":
  absltest.main()
