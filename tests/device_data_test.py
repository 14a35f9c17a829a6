"""Tests of train/device_data.py: the train set kept on the devices."""

from __future__ import annotations

from unittest import mock

from absl.testing import absltest
import jax
import numpy as np

from train import data_sources
from train import device_data
from train import input_pipeline as ip
from train import sharding
from tests import data_setup


class DeviceBatchesTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    path = data_setup.write_npz(data_setup.tempdir(self))
    self.ds = ip.load_dataset(path, validation_size=0, augmentation="shift")
    self.mesh = sharding.make_mesh()

  def _batches(self, dataset=None, **kwargs):
    return device_data.DeviceBatches(
        dataset or self.ds, global_batch_size=32, seed=5, mesh=self.mesh,
        **kwargs)

  def test_epochs_are_permutations_sharded_over_the_devices(self):
    with self._batches() as it:
      self.assertEqual(it.steps_per_epoch, 3)
      epochs = []
      for _ in range(2):
        batches = [next(it) for _ in range(3)]
        epochs.append(np.concatenate([np.asarray(b["label"])
                                      for b in batches]))
      self.assertEqual(it.position, ip.DataPosition(2, 0))
    first = batches[0]["image"]
    self.assertEqual(first.sharding, sharding.batch_sharding(self.mesh))
    self.assertEqual((first.shape, first.dtype), ((32, 6, 5, 1), np.float32))
    for labels in epochs:
      self.assertLen(np.unique(labels), 96)
    self.assertFalse(np.array_equal(epochs[0], epochs[1]))

  def test_unaugmented_rows_are_the_normalised_examples(self):
    plain = ip.load_dataset(self.ds.name, validation_size=0,
                            augmentation="none")
    with self._batches(plain) as it:
      batch = jax.device_get(next(it))
    images = plain.train.images[batch["label"]].astype(np.float64)
    np.testing.assert_allclose(
        batch["image"], (images / 255 - plain.mean) / plain.std, atol=1e-5)

  def test_resume_from_position_matches_uninterrupted(self):
    with self._batches() as it:
      for _ in range(2):
        next(it)
      saved = it.position
      expected = [jax.device_get(next(it)) for _ in range(4)]
    with self._batches(position=saved) as resumed:
      for want in expected:
        got = jax.device_get(next(resumed))
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["label"], want["label"])

  def test_modes(self):
    self.assertTrue(device_data.fits(self.ds))
    self.assertTrue(device_data.use_device_data("on", self.ds))
    self.assertFalse(device_data.use_device_data("off", self.ds))
    # auto: on accelerators only (the CPU runs the host pipeline beside).
    self.assertFalse(device_data.use_device_data("auto", self.ds))
    with mock.patch.object(jax, "default_backend", return_value="gpu"):
      self.assertTrue(device_data.use_device_data("auto", self.ds))
    lazy = data_setup.jpeg_dataset()
    self.assertFalse(device_data.use_device_data("auto", lazy))
    with self.assertRaisesRegex(ValueError, "'on' needs a train set held in"):
      device_data.use_device_data("on", lazy)
    with self.assertRaisesRegex(ValueError, "'yes'; choose one of: auto, on"):
      device_data.use_device_data("yes", self.ds)
    big = data_sources.ArraySplit(
        np.zeros((1,), np.uint8), np.zeros((1,), np.int32))
    with mock.patch.object(device_data, "MAX_BYTES", 0):
      self.assertFalse(device_data.fits(
          ip.Dataset("big", big, big, big, 1, (1, 1, 1), (0.,), (1.,),
                     "none")))


if __name__ == "__main__":
  absltest.main()
