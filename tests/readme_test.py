"""The README's library example runs as written (on a tiny CNN)."""

from __future__ import annotations

import os
import re

from absl.testing import absltest
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_README = os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")


class MyFlaxCNN(nn.Module):
  """A plain Flax CNN: nothing of gdnsq_jax in its definition."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.relu(nn.Conv(8, (3, 3))(x))
    x = nn.Conv(8, (3, 3))(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
    x = nn.relu(nn.Conv(8, (3, 3))(x))
    return nn.Dense(10)(x.mean((1, 2)))


def _library_example(index: int = 0) -> str:
  """The ``index``-th python block of the library section, placeholders cut."""
  with open(_README) as f:
    text = f.read()
  section = text.split("## Use the library in your own Flax model", 1)[1]
  section = section.split("\n## ", 1)[0]
  code = re.findall(r"```python\n(.*?)```", section, re.S)[index]
  # The placeholders the user fills in: defined by the test instead.
  return "\n".join(l for l in code.splitlines()
                   if not re.match(r"^\w+ = (\.\.\.|MyFlaxCNN\(\))", l))


class ReadmeTest(absltest.TestCase):

  def test_library_example_runs(self):
    model = MyFlaxCNN()
    images = jnp.asarray(
        np.random.default_rng(0).normal(size=(2048, 12, 12, 1)), jnp.float32)
    namespace = {
        "model": model,
        "images": images,
        "fp_variables": model.init(jax.random.key(0), images[:1]),
        "print": lambda *a, **k: None,
    }
    exec(_library_example(), namespace)  # pylint: disable=exec-used
    self.assertEqual(namespace["logits"].shape, (8, 10))
    summary = namespace["gq"].summarize_bitwidths(
        namespace["calib"].variables, activation_widths=namespace["widths"])
    self.assertEqual(sorted(summary.weight_layers), ["Conv_1", "Conv_2"])
    self.assertAlmostEqual(summary.weight_max, 10.0, places=4)

  def test_transformer_block_example_runs(self):
    tokens = jnp.asarray(
        np.random.default_rng(1).normal(size=(64, 6, 16)), jnp.float32)
    namespace = {"tokens": tokens, "print": lambda *a, **k: None}
    exec(_library_example(1), namespace)  # pylint: disable=exec-used
    gq, qblock = namespace["gq"], namespace["qblock"]
    rows = gq.quantization_report(qblock)
    self.assertEqual(
        [(r.path.rsplit("/", 1)[-1], r.kind, r.quantized) for r in rows],
        [("query", "dense_general", True), ("key", "dense_general", True),
         ("value", "dense_general", True), ("out", "dense_general", True),
         ("Dense_0", "dense", True), ("Dense_1", "dense", True)])
    fake = qblock.apply(namespace["calib"].variables, tokens)
    agreement = gq.export.compare_logits(namespace["out"], fake)
    self.assertLess(agreement["max_relative_error"], 1e-4)


if __name__ == "__main__":
  absltest.main()
