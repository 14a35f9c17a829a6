"""Tests of bench/speed.py's ratio statistics and configuration table."""

from __future__ import annotations

from absl.testing import absltest
import jax

from bench import speed
from train import models


class PairedRatioTest(absltest.TestCase):

  def test_per_round_ratios_cancel_the_load_of_a_round(self):
    # Round 2 ran while the machine was three times as busy: the ratio of
    # medians would be skewed, the median per-round ratio is not.
    times = [1.2, 3.6, 1.2, 1.2]
    reference = [1.0, 3.0, 1.0, 1.0]
    ratio, (q1, q3) = speed.paired_ratio(times, reference)
    self.assertAlmostEqual(ratio, 1.2)
    self.assertAlmostEqual(q1, 1.2)
    self.assertAlmostEqual(q3, 1.2)
    ratio, (q1, q3) = speed.paired_ratio([1.0, 2.0, 3.0], [1.0, 1.0, 1.0])
    self.assertEqual((ratio, q1, q3), (2.0, 1.5, 2.5))

  def test_quantized_rows_compare_with_the_same_teacher(self):
    self.assertEqual(speed._distill_kind("w2a2"), "fp-distill")  # pylint: disable=protected-access
    self.assertEqual(speed._distill_kind("w2a2-tf32"), "fp-distill-tf32")  # pylint: disable=protected-access
    self.assertEqual(speed._distill_kind("w2a2-tbf16"), "fp-distill-tbf16")  # pylint: disable=protected-access
    for name, (kind, conv) in speed.CONFIGS.items():
      self.assertIn(conv, speed.CONVS, name)
      self.assertIn(kind, {"fp", *speed.DISTILL_KINDS, *speed.QUANT_KINDS},
                    name)

  def test_goal_check_uses_each_reference_goal(self):
    # 1.10x is within the 1.15x goal against plain FP, not within the
    # 1.05x goal against the FP distillation step.
    row = {"model": "m", "config": "w2a2-fast", "wall_s": 0.11,
           "cpu_s": 0.11, "images_per_s": 1.0, "speedup": None,
           "host_is_device": True}
    for label in ("fp", "distill"):
      for clock in ("wall", "cpu"):
        row[f"over_{label}_{clock}"] = 1.10
        row[f"over_{label}_{clock}_spread"] = (1.05, 1.15)
    row["over_fp_flops"] = 1.3
    text = speed.format_table([row])
    self.assertIn("w2a2-fast / fp: 1.10 wall [1.05-1.15], 1.10 cpu "
                  "[1.05-1.15] (goal <= 1.15: met; FLOPs 1.30x)", text)
    self.assertIn("w2a2-fast / distill: 1.10 wall [1.05-1.15], 1.10 cpu "
                  "[1.05-1.15] (goal <= 1.05: not met)", text)


class BuildStepTest(absltest.TestCase):

  def test_every_configuration_builds_and_adds_its_work(self):
    variables, batch = speed.random_inputs("digits_resnet", 2)
    flops = {name: speed.build_step(name, "digits_resnet", variables,
                                    batch).flops()
             for name in speed.CONFIGS}
    # With the same conv, a distillation step adds a teacher forward to the
    # FP step, a quantized step its quantizers to its distillation step.
    for name, (kind, conv) in speed.CONFIGS.items():
      if kind in speed.DISTILL_KINDS:
        reference = speed._config_name("fp", conv)  # pylint: disable=protected-access
        self.assertGreater(flops[name], 1.2 * flops[reference], name)
      elif kind in speed.QUANT_KINDS:
        reference = speed._config_name(speed._distill_kind(kind), conv)  # pylint: disable=protected-access
        self.assertIsNotNone(reference, name)
        self.assertGreater(flops[name], flops[reference], name)


class StepFlopsTest(absltest.TestCase):

  def test_distillation_adds_one_teacher_forward_of_flops(self):
    variables, batch = speed.random_inputs("digits_resnet", 2)
    fp = speed.build_step("fp-fast", "digits_resnet", variables, batch)
    distill = speed.build_step("fp-distill", "digits_resnet", variables, batch)
    model = models.get_model("digits_resnet", 10)
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(
        variables, batch["image"]).cost_analysis()["flops"]
    # Everything but the teacher forward (and the divergence, a few % of
    # it) is the same in both steps.
    extra = (distill.flops() - fp.flops()) / forward
    self.assertBetween(extra, 1.0, 1.1)
    # Twice the batch, twice the work (the optimizer's share is tiny).
    variables, batch = speed.random_inputs("digits_resnet", 4)
    fp4 = speed.build_step("fp-fast", "digits_resnet", variables, batch)
    self.assertBetween(fp4.flops() / fp.flops(), 1.98, 2.0)


if __name__ == "__main__":
  absltest.main()
