"""Tests of the accuracy benchmark's summary (no training)."""

from __future__ import annotations

from absl.testing import absltest

from bench import accuracy


def _run(acc, seed, **extra):
  return {"quantized_test_accuracy": acc, "seed": seed, "converged": True,
          "true_weight_bits_max": 2.0, "true_activation_bits_max": 2.0,
          "steps": 1000, "bench_wall_time_s": 100.0, **extra}


class SummaryTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.rows = {
        "fp": [{"fp_test_accuracy": 0.98, "bench_wall_time_s": 50.0}],
        "w2a2": [_run(0.975, 0), _run(0.971, 1)],
        "oneshot_w2a2": [_run(0.95, 0), _run(0.96, 1)],
        "lsq_w2a2": [_run(0.978, 0), _run(0.978, 1)],
        "w1a1": [_run(0.96, 0), _run(0.94, 1, converged=False)],
        "oneshot_w1a1": [
            {"diverged": "non-finite", "quantized_test_accuracy": None,
             "seed": s, "bench_wall_time_s": 10.0} for s in (0, 1)],
    }

  def test_mean_sample_sd_delta_and_convergence(self):
    table = accuracy.summarize(self.rows)
    w2a2 = table["w2a2"]
    self.assertAlmostEqual(w2a2["test_accuracy_mean"], 97.3)
    self.assertAlmostEqual(w2a2["test_accuracy_sd"], 0.2828427, places=5)
    self.assertAlmostEqual(w2a2["delta_vs_fp"], -0.7)
    self.assertEqual(table["w1a1"]["converged"], 1)
    # Diverged runs count at chance (10 %) and are reported as such.
    self.assertEqual(table["oneshot_w1a1"]["diverged"], 2)
    self.assertAlmostEqual(table["oneshot_w1a1"]["test_accuracy_mean"], 10.0)
    text = accuracy.format_table(table)
    self.assertIn("| oneshot_w1a1 | 2 | diverged (2/2", text)
    self.assertIn("| w2a2 | 2 | 97.30 ± 0.28 | -0.70 |", text)

  def test_targets_met_and_missed(self):
    lines = accuracy.check_targets(accuracy.summarize(self.rows))
    self.assertIn("w2a2: +0.70 pp below FP (target <= 1.0): met", lines)
    self.assertIn("w1a1: +3.00 pp below FP (target <= 3.0): met", lines)
    self.assertIn("w2a2 vs oneshot_w2a2: +1.80 pp (target >= 0): met", lines)
    self.assertIn("w2a2 vs lsq_w2a2: -0.50 pp (target >= 0): MISSED", lines)
    self.assertIn("w1a1 vs oneshot_w1a1: +85.00 pp (target >= 0): met",
                  lines)


class RunConfigTest(absltest.TestCase):

  def test_preset_picks_the_model_and_its_own_teacher(self):
    config, workdir = accuracy.run_config("w2a2", 1, "out", 300,
                                          "digits_mobilenet_v2")
    self.assertEqual((config.model.name, config.seed, workdir),
                     ("mobilenet_v2", 1, "out/w2a2_seed1"))
    self.assertTrue(config.quant.quantize_1x1)
    self.assertEqual((config.quant.weight_bits, config.train.num_steps),
                     (2, 300))
    self.assertEqual(config.teacher.checkpoint, "out/fp/teacher/variables")
    config, workdir = accuracy.run_config(accuracy.FP, 0, "out", 300,
                                          "digits_vit")
    self.assertEqual((config.model.name, config.mode, workdir),
                     ("vit", "fp", "out/fp"))

  def test_variant_overrides_apply(self):
    config, _ = accuracy.run_config("lsq_w2a2", 0, "out", 0)
    self.assertEqual((config.model.name, config.quant.method),
                     ("digits_resnet", "lsq"))
    self.assertEqual(config.train.num_steps, 1000)  # 0: the preset's


if __name__ == "__main__":
  absltest.main()
