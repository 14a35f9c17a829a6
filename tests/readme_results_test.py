"""README.md's default-run blocks are those of the committed default run.

docs/default_run holds the files of ``python -m train.main --config
configs/w2a2.py`` (and of ``python -m train.export`` on it) that the README's
results table, per-layer widths and export summary are rendered from
(``bench/results_table.py``); this test fails when the README drifts from
them.
"""

from __future__ import annotations

import json
import os
import sys

from absl.testing import absltest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(_ROOT, "bench"))
import results_table  # pylint: disable=g-import-not-at-top,wrong-import-position

_RUN = os.path.join(_ROOT, "docs", "default_run")
_README = os.path.join(_ROOT, "README.md")


class ReadmeResultsTest(absltest.TestCase):

  def test_readme_blocks_match_the_committed_default_run(self):
    self.assertEqual(results_table.main([_RUN, "--check", _README]), 0)
    with open(_README) as f:
      readme = f.read()
    for name, _, _ in results_table.BLOCKS:  # every block is in the README
      self.assertIn(results_table.markers(name)[0], readme)

  def test_the_committed_run_is_the_default_configuration(self):
    with open(os.path.join(_RUN, "config.json")) as f:
      config = json.load(f)
    with open(os.path.join(_RUN, "results.json")) as f:
      results = json.load(f)
    self.assertEqual((config["preset"], config["quant"]["weight_bits"],
                      config["quant"]["activation_bits"]), ("digits", 2, 2))
    self.assertRegex(results["code_commit"], r"^[0-9a-f]{7,40}")


if __name__ == "__main__":
  absltest.main()
