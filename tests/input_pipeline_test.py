"""Tests of train/input_pipeline.py: sources, splits, augmented batches."""

from __future__ import annotations

import importlib.resources
import os
import shutil
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from train import input_pipeline as ip


def _tempdir(test: absltest.TestCase) -> str:
  """A fresh directory removed after the test (absl flags are not parsed)."""
  directory = tempfile.mkdtemp()
  test.addCleanup(shutil.rmtree, directory)
  return directory


def _write_npz(directory, count=103, height=6, width=5, channels=None):
  """An npz whose label i is unique, so batches can be traced to examples."""
  rng = np.random.default_rng(7)
  shape = (count, height, width) + ((channels,) if channels else ())
  path = os.path.join(directory, "toy.npz")
  np.savez(path, images=rng.integers(0, 256, shape, dtype=np.uint8),
           labels=np.arange(count))
  return path


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


class AugmentTest(absltest.TestCase):

  def test_train_augmentation_is_deterministic_per_seed_and_epoch(self):
    ds = ip.load_dataset("digits")
    batches = lambda seed, epoch: next(ip.train_batches(
        ds, global_batch_size=1200, seed=seed, position=(epoch, 0)))
    a, b, c = batches(0, 1), batches(0, 1), batches(0, 2)
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
    self.assertFalse(np.array_equal(a["label"], c["label"]))
    self.assertFalse(np.array_equal(a["image"], batches(1, 1)["image"]))


class BatchingTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.path = _write_npz(_tempdir(self))
    self.ds = ip.load_dataset(self.path, validation_size=0,
                              augmentation="shift")

  def test_epochs_are_shuffled_permutations_without_remainder(self):
    it = ip.train_batches(self.ds, global_batch_size=32, seed=5)
    self.assertEqual(it.steps_per_epoch, 3)
    epochs = [np.concatenate([next(it)["label"] for _ in range(3)])
              for _ in range(2)]
    self.assertEqual(it.position, ip.DataPosition(2, 0))
    for labels in epochs:
      self.assertLen(np.unique(labels), 96)
    self.assertFalse(np.array_equal(epochs[0], epochs[1]))

  def test_train_batches_are_the_augmented_normalised_examples(self):
    plain = ip.load_dataset(self.path, validation_size=0, augmentation="none")
    a = next(ip.train_batches(plain, global_batch_size=32, seed=5))
    b = next(ip.train_batches(self.ds, global_batch_size=32, seed=5))
    np.testing.assert_array_equal(a["label"], b["label"])  # Same order.
    images = plain.train.images[a["label"]].astype(np.float64)
    np.testing.assert_allclose(
        a["image"], (images / 255 - plain.mean) / plain.std, atol=1e-5)
    self.assertFalse(np.array_equal(a["image"], b["image"]))

  def test_resume_from_position_matches_uninterrupted(self):
    it = ip.train_batches(self.ds, global_batch_size=32, seed=5)
    for _ in range(2):
      next(it)
    saved = tuple(it.position)
    expected = [next(it) for _ in range(5)]  # Crosses into epoch 2.
    resumed = ip.train_batches(self.ds, global_batch_size=32, seed=5,
                               position=saved)
    self.assertEqual(saved, (0, 2))
    for want in expected:
      got = next(resumed)
      np.testing.assert_array_equal(got["image"], want["image"])
      np.testing.assert_array_equal(got["label"], want["label"])
    self.assertEqual(resumed.position, it.position)

  @parameterized.parameters(1, 2, 4)
  def test_process_slices_tile_the_global_batch(self, process_count):
    single = next(ip.train_batches(self.ds, global_batch_size=32, seed=1,
                                   process_index=0, process_count=1))
    parts = [next(ip.train_batches(self.ds, global_batch_size=32, seed=1,
                                   process_index=p,
                                   process_count=process_count))
             for p in range(process_count)]
    for key in ("image", "label"):
      self.assertEqual(parts[0][key].shape[0], 32 // process_count)
      np.testing.assert_array_equal(
          np.concatenate([p[key] for p in parts]), single[key])

  @parameterized.parameters(1, 4)
  def test_eval_covers_every_example_once(self, process_count):
    labels, images = [], []
    for p in range(process_count):
      for batch in ip.eval_batches(self.ds, "train", global_batch_size=16,
                                   process_index=p,
                                   process_count=process_count):
        self.assertEqual(batch["image"].shape, (16 // process_count, 6, 5, 1))
        self.assertEqual(batch["mask"].dtype, bool)
        labels.append(batch["label"][batch["mask"]])
        images.append(batch["image"][batch["mask"]])
    labels = np.concatenate(labels)
    np.testing.assert_array_equal(np.sort(labels), np.arange(103))
    expected = (self.ds.train.images[labels] / 255 - self.ds.mean) / self.ds.std
    np.testing.assert_allclose(np.concatenate(images), expected, rtol=1e-5,
                               atol=1e-5)

  def test_batch_errors(self):
    with self.assertRaisesRegex(ValueError, "batch size 10 .* process count 4"):
      ip.train_batches(self.ds, global_batch_size=10, process_index=0,
                       process_count=4)
    with self.assertRaisesRegex(ValueError, r"position \(0, 9\)"):
      ip.train_batches(self.ds, global_batch_size=32, position=(0, 9))
    with self.assertRaisesRegex(ValueError, "exceeds the 103"):
      ip.train_batches(self.ds, global_batch_size=128)
    with self.assertRaisesRegex(ValueError, "unknown split 'val'"):
      ip.eval_batches(self.ds, "val", global_batch_size=8)  # Eager error.


class NpzTest(absltest.TestCase):

  def test_images_labels_round_trip_adds_channel(self):
    directory = _tempdir(self)
    path = _write_npz(directory, count=50)
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
    self.assertEmpty(list(ip.eval_batches(ds, "test", global_batch_size=8)))

  def test_train_test_arrays_and_bad_dtype(self):
    directory = _tempdir(self)
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
