"""Tests of bench/step_configs.py: every benchmarked step builds and runs."""

from __future__ import annotations

from absl.testing import absltest
import jax
import numpy as np

from bench import step_configs
from train import models


class ConfigurationTest(absltest.TestCase):

  def test_quantized_steps_compare_with_the_same_teacher(self):
    self.assertEqual(step_configs.distill_kind("w2a2"), "fp-distill")
    self.assertEqual(step_configs.distill_kind("w2a2-tf32"),
                     "fp-distill-tf32")
    self.assertEqual(step_configs.distill_kind("w2a2-tbf16"),
                     "fp-distill-tbf16")
    for name, (kind, conv) in step_configs.CONFIGS.items():
      self.assertIn(conv, step_configs.CONVS, name)
      self.assertIn(kind, {"fp", *step_configs.DISTILL_KINDS,
                           *step_configs.QUANT_KINDS}, name)
      self.assertEqual(step_configs.config_name(kind, conv), name)
    self.assertIsNone(step_configs.config_name("fp", "no-such-conv"))

  def test_every_configuration_builds_and_adds_its_work(self):
    variables, batch = step_configs.random_inputs("digits_resnet", 2)
    flops = {name: step_configs.StepRun(step_configs.build_step(
        name, "digits_resnet", variables, batch)).flops()
             for name in step_configs.CONFIGS}
    # With the same conv, a distillation step adds a teacher forward to the
    # FP step, a quantized step its quantizers to its distillation step.
    for name, (kind, conv) in step_configs.CONFIGS.items():
      if kind in step_configs.DISTILL_KINDS:
        reference = step_configs.config_name("fp", conv)
        self.assertGreater(flops[name], 1.2 * flops[reference], name)
      elif kind in step_configs.QUANT_KINDS:
        reference = step_configs.config_name(
            step_configs.distill_kind(kind), conv)
        self.assertIsNotNone(reference, name)
        self.assertGreater(flops[name], flops[reference], name)


class StepRunTest(absltest.TestCase):

  def _run(self, name, batch_size=2):
    variables, batch = step_configs.random_inputs("digits_resnet",
                                                  batch_size)
    step = step_configs.build_step(name, "digits_resnet", variables, batch)
    return variables, step, step_configs.StepRun(step)

  def test_distillation_adds_one_teacher_forward_of_flops(self):
    variables, _, fp = self._run("fp-fast")
    _, step, distill = self._run("fp-distill")
    model = models.get_model("digits_resnet", 10)
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(
        variables, step.batch["image"]).cost_analysis()["flops"]
    # Everything but the teacher forward (and the divergence, a few % of
    # it) is the same in both steps.
    extra = (distill.flops() - fp.flops()) / forward
    self.assertBetween(extra, 1.0, 1.1)
    # Twice the batch, twice the work (the optimizer's share is tiny).
    _, _, fp4 = self._run("fp-fast", batch_size=4)
    self.assertBetween(fp4.flops() / fp.flops(), 1.98, 2.0)

  def test_calls_feed_the_new_state_forward_and_keep_the_inputs(self):
    variables, step, run = self._run("w2a2-fast")
    before = jax.device_get(step.state.params)
    for expected in (1, 2):
      metrics = run()
      self.assertEqual(int(run.args[0].step), expected)
      self.assertTrue(np.isfinite(float(metrics["train/loss"])))
    # The step donated copies: the builder's state and the teacher's
    # variables are intact, the state moved.
    np.testing.assert_array_equal(
        jax.tree.leaves(jax.device_get(step.state.params))[0],
        jax.tree.leaves(before)[0])
    self.assertFalse(any(leaf.is_deleted()
                         for leaf in jax.tree.leaves(variables)))
    moved = [not np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(before), jax.tree.leaves(
            jax.device_get(run.args[0].params)))]
    self.assertTrue(any(moved))


if __name__ == "__main__":
  absltest.main()
