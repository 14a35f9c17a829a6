"""Tests of bench/results_table.py: the README table from a run's files."""

from __future__ import annotations

import json
import os
import sys

from absl.testing import absltest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(_ROOT, "bench"))
import results_table  # pylint: disable=g-import-not-at-top,wrong-import-position


def _write_run(run_dir: str, *, converged_at=550) -> None:
  results = {
      "fp_test_accuracy": 0.977, "quantized_test_accuracy": 0.975,
      "weight_bits_target": 2, "activation_bits_target": 2,
      "true_weight_bits_max": 2.0, "true_activation_bits_max": 2.0,
      "selected_model": "best converged (step 1000)", "steps": 1000,
      "code_commit": "0123456789ab", "device_kind": "cpu",
      "wall_time_s": 151.2}
  with open(os.path.join(run_dir, "results.json"), "w") as f:
    json.dump(results, f)
  with open(os.path.join(run_dir, "config.json"), "w") as f:
    json.dump({"teacher": {"num_steps": 500}}, f)
  with open(os.path.join(run_dir, "history.jsonl"), "w") as f:
    for step in (500, 550, 600):
      converged = converged_at is not None and step >= converged_at
      f.write(json.dumps({"step": step, "converged": converged}) + "\n")


class ResultsTableTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.run_dir = self.create_tempdir().full_path
    _write_run(self.run_dir)
    self.readme = os.path.join(self.create_tempdir().full_path, "README.md")
    with open(self.readme, "w") as f:
      f.write(f"# x\n\n{results_table.START}\nold\n{results_table.END}\n"
              "tail\n")

  def test_render_names_values_and_commit(self):
    table = results_table.render(self.run_dir)
    self.assertIn("| FP teacher | 97.70 % | 32 | 32 | 500 |", table)
    self.assertIn("| GDNSQ W2A2 (best converged (step 1000); converged at 550)"
                  " | 97.50 % | 2.000 | 2.000 | 1,000 |", table)
    self.assertIn("commit `0123456789ab`", table)

  def test_write_then_check_round_trip_and_drift_fails(self):
    self.assertEqual(results_table.main([self.run_dir, "--check",
                                         self.readme]), 1)
    self.assertEqual(results_table.main([self.run_dir, "--write",
                                         self.readme]), 0)
    with open(self.readme) as f:
      text = f.read()
    self.assertTrue(text.startswith("# x\n\n") and text.endswith("tail\n"))
    self.assertEqual(results_table.main([self.run_dir, "--check",
                                         self.readme]), 0)
    _write_run(self.run_dir, converged_at=None)
    self.assertIn("never converged", results_table.render(self.run_dir))
    self.assertEqual(results_table.main([self.run_dir, "--check",
                                         self.readme]), 1)

  def test_widths_and_export_blocks_and_save(self):
    with open(os.path.join(self.run_dir, "bitwidths.txt"), "w") as f:
      f.write("layer  W max\nconv1  2.000\n")
    manifest = {
        "layers": [{"path": "conv1", "weight_bits": 2, "activation_bits": 2,
                    "macs": 864, "bytes": 67, "fp32_bytes": 216,
                    "batch_norm": True}],
        "variables": {}, "totals": {
            "size_bytes": 67, "fp32_size_bytes": 216, "compression": 3.22,
            "quantized_layers": 1, "fp_layers": [], "macs": 864,
            "bops": 3456}}
    os.makedirs(os.path.join(self.run_dir, "export"))
    with open(os.path.join(self.run_dir, "export", "manifest.json"),
              "w") as f:
      json.dump(manifest, f)
    blocks = {name: results_table.markers(name)
              for name in ("bitwidths", "export-summary")}
    with open(self.readme, "a") as f:
      for start, end in blocks.values():
        f.write(f"{start}\nold\n{end}\nbetween\n")
    self.assertEqual(results_table.main([self.run_dir, "--check",
                                         self.readme]), 1)
    saved = self.create_tempdir().full_path
    self.assertEqual(results_table.main(
        [self.run_dir, "--write", self.readme, "--save", saved]), 0)
    with open(self.readme) as f:
      text = f.read()
    start, end = blocks["bitwidths"]
    self.assertIn(f"{start}\n```\nlayer  W max\nconv1  2.000\n```\n{end}",
                  text)
    self.assertRegex(text, r"conv1\s+2\s+2\s+864\s+67\s+216\s+yes")
    self.assertIn("67 bytes vs 216 bytes FP32 (3.22x smaller)", text)
    self.assertEqual(text.count("between\n"), 2)
    # The saved copy renders the same blocks: the README checks against it.
    self.assertEqual(sorted(os.listdir(saved)), [
        "bitwidths.txt", "config.json", "export", "history.jsonl",
        "results.json"])
    self.assertEqual(results_table.main([saved, "--check", self.readme]), 0)
    os.remove(os.path.join(saved, "export", "manifest.json"))
    with self.assertRaisesRegex(SystemExit, "no export/manifest.json"):
      results_table.main([saved, "--check", self.readme])

  def test_unfinished_run_and_missing_markers_are_clear_errors(self):
    os.remove(os.path.join(self.run_dir, "history.jsonl"))
    with self.assertRaisesRegex(SystemExit, "not a finished run: missing"):
      results_table.render(self.run_dir)
    _write_run(self.run_dir)
    with open(self.readme, "w") as f:
      f.write("no markers\n")
    with self.assertRaisesRegex(SystemExit, "has no"):
      results_table.main([self.run_dir, "--write", self.readme])


if __name__ == "__main__":
  absltest.main()
