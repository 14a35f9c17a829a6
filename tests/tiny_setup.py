"""A tiny dataset and config shared by the training-program tests."""

from __future__ import annotations

import os

import numpy as np

from configs import base


def write_tiny_npz(path: str, seed: int = 0) -> str:
  """Writes a learnable 4-class 12x12 grey-image dataset to ``path``.

  Class ``k`` lights up quadrant ``k`` (plus noise), so a tiny CNN separates
  the classes within a few steps.
  """
  rng = np.random.default_rng(seed)

  def make(n):
    labels = rng.integers(0, 4, n)
    images = rng.integers(0, 60, (n, 12, 12), dtype=np.int64)
    for i, k in enumerate(labels):
      r, c = divmod(int(k), 2)
      images[i, r * 6:(r + 1) * 6, c * 6:(c + 1) * 6] += 160
    return images.clip(0, 255).astype(np.uint8), labels.astype(np.uint8)

  train_images, train_labels = make(384)
  test_images, test_labels = make(96)
  np.savez(path, train_images=train_images, train_labels=train_labels,
           test_images=test_images, test_labels=test_labels)
  return path


def tiny_config(tmpdir: str, *, weight_bits=2, activation_bits=2,
                num_steps=12):
  """A W2A2 config on the tiny dataset with a 4/8/8-channel digits ResNet."""
  path = os.path.join(tmpdir, "tiny.npz")
  if not os.path.exists(path):
    write_tiny_npz(path)
  c = base.get_config("digits", weight_bits=weight_bits,
                      activation_bits=activation_bits)
  c.data.name = "npz"
  c.data.path = path
  c.data.validation_size = 64
  c.data.batch_size = 32
  c.data.eval_batch_size = 64
  c.data.calibration_batches = 2
  c.model.stage_widths = (4, 8, 8)
  c.model.stem_width = 4
  c.optim.learning_rate = 0.05
  c.optim.warmup_steps = 2
  c.train.num_steps = num_steps
  c.train.eval_every_steps = 4
  c.train.log_every_steps = 2
  c.train.checkpoint_every_steps = 4
  c.train.early_stopping_patience = 100
  c.teacher.num_steps = 30
  c.teacher.learning_rate = 1e-2
  c.teacher.warmup_steps = 3
  return c
