"""Tests of train/data_sources.py: embedded digits, npz files, splits."""

from __future__ import annotations

import importlib.resources
import os

from absl.testing import absltest
import numpy as np

from train import data_sources as ip
from train import input_pipeline
from tests import data_setup


class DigitsTest(absltest.TestCase):

  def test_embedded_dataset_shapes_and_disjoint_validation(self):
    ds = ip.load_dataset("digits")
    self.assertEqual((ds.num_classes, ds.image_shape), (10, (28, 28, 1)))
    self.assertEqual((len(ds.train), len(ds.validation), len(ds.test)),
                     (7200, 800, 2000))
    for split in (ds.train, ds.validation, ds.test):
      self.assertEqual(split.images.dtype, np.uint8)
      self.assertEqual(split.labels.dtype, np.int32)
      self.assertEqual(split.images.shape[1:], (28, 28, 1))
    self.assertEqual(set(np.unique(ds.test.labels)), set(range(10)))
    ref = importlib.resources.files("train").joinpath("data/mnist10k.npz")
    with ref.open("rb") as f:
      original = np.load(f)["train_images"]
    rows = lambda x: {r.tobytes() for r in x.reshape(len(x), -1)}
    train, validation = rows(ds.train.images), rows(ds.validation.images)
    self.assertEmpty(train & validation)
    self.assertEqual(train | validation, rows(original))
    self.assertEqual(ds.mean, (0.1307,))

  def test_validation_carve_is_seeded(self):
    a, b = ip.load_dataset("digits", seed=3), ip.load_dataset("digits", seed=3)
    c = ip.load_dataset("digits", seed=4, validation_size=0.25)
    np.testing.assert_array_equal(a.validation.labels, b.validation.labels)
    self.assertEqual(len(c.validation), 2000)
    self.assertFalse(
        np.array_equal(a.validation.images, c.validation.images[:800]))

  def test_errors_name_the_bad_value(self):
    with self.assertRaisesRegex(ValueError, "'cifar11'.*cifar10, cifar100"):
      ip.load_dataset("cifar11")
    with self.assertRaisesRegex(ValueError,
                                r"validation_size 8000 .*\[0, 8000\)"):
      ip.load_dataset("digits", validation_size=8000)
    with self.assertRaisesRegex(ValueError,
                                "'random_resized_crop' does not fit"):
      ip.load_dataset("digits", augmentation="random_resized_crop")


class NpzTest(absltest.TestCase):

  def test_images_labels_round_trip_adds_channel(self):
    directory = data_setup.tempdir(self)
    path = data_setup.write_npz(directory, count=50)
    with np.load(path) as arrays:
      images = arrays["images"]
    ds = ip.load_dataset(path, validation_size=10)
    self.assertEqual((ds.image_shape, ds.num_classes), ((6, 5, 1), 50))
    self.assertEqual((len(ds.train), len(ds.validation), len(ds.test)),
                     (40, 10, 0))
    back = np.concatenate([ds.train.images, ds.validation.images])
    order = np.concatenate([ds.train.labels, ds.validation.labels])
    np.testing.assert_array_equal(back[np.argsort(order)], images[..., None])
    np.testing.assert_allclose(ds.mean, [ds.train.images.mean() / 255],
                               rtol=1e-6)
    self.assertEmpty(list(input_pipeline.eval_batches(
        ds, "test", global_batch_size=8)))

  def test_train_test_arrays_and_bad_dtype(self):
    directory = data_setup.tempdir(self)
    images = np.full((4, 3, 3, 2), 9, np.uint8)
    path = os.path.join(directory, "tt.npz")
    np.savez(path, train_images=images, train_labels=[0, 1, 2, 3],
             test_images=images[:2], test_labels=[5, 1])
    ds = ip.load_dataset(path, validation_size=1)
    self.assertEqual((len(ds.train), len(ds.test), ds.num_classes), (3, 2, 6))
    np.testing.assert_array_equal(ds.test.labels, [5, 1])
    bad = os.path.join(directory, "bad.npz")
    np.savez(bad, images=np.zeros((2, 3, 3), np.float32), labels=[0, 1])
    with self.assertRaisesRegex(ValueError, "must be uint8 NHWC or NHW"):
      ip.load_dataset(bad)
    with self.assertRaises(ip.DatasetNotFoundError):
      ip.load_dataset(os.path.join(directory, "absent.npz"))


if __name__ == "__main__":
  absltest.main()
