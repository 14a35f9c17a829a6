"""The README's NNX example runs as written (on a tiny NNX CNN)."""

from __future__ import annotations

import os
import re

from absl.testing import absltest
from flax import nnx
import jax.numpy as jnp
import numpy as np

_README = os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")


class MyNnxCNN(nnx.Module):
  """A plain NNX CNN: nothing of gdnsq_jax in its definition."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 8, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(8, 8, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(8, rngs=rngs)
    self.conv3 = nnx.Conv(8, 8, (3, 3), rngs=rngs)
    self.head = nnx.Linear(8, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.conv1(x))
    x = nnx.relu(self.bn(self.conv2(x)))
    x = nnx.relu(self.conv3(x))
    return self.head(x.mean((1, 2)))


def _nnx_example() -> str:
  with open(_README) as f:
    text = f.read()
  section = text.split("## Use the library in your own Flax NNX model", 1)[1]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  # The placeholder the user fills in: defined by the test instead.
  return "\n".join(l for l in code.splitlines()
                   if not re.match(r"^\w+ = \.\.\.", l))


class ReadmeNnxTest(absltest.TestCase):

  def test_nnx_example_runs(self):
    images = jnp.asarray(
        np.random.default_rng(0).normal(size=(1024, 8, 8, 1)), jnp.float32)
    namespace = {"MyNnxCNN": MyNnxCNN, "images": images,
                 "print": lambda *a, **k: None}
    exec(_nnx_example(), namespace)  # pylint: disable=exec-used
    self.assertEqual(namespace["logits"].shape, (8, 10))
    self.assertTrue(np.isfinite(float(namespace["loss"])))
    self.assertEqual(
        sorted(namespace["widths"]),
        ["conv2/input_quantizer", "conv3/input_quantizer"])
    self.assertEqual(int(namespace["qmodel"].quant_noise.count[...]), 1)


if __name__ == "__main__":
  absltest.main()
