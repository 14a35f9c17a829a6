"""Tests of train/augmentation.py: crops, flips and their determinism."""

from __future__ import annotations

from absl.testing import absltest
import numpy as np

from train import augmentation


class AugmentTest(absltest.TestCase):

  def test_shift_translates_with_zero_fill(self):
    image = np.arange(1, 31, dtype=np.uint8).reshape(1, 6, 5, 1)
    out = augmentation.apply_augmentation(
        "shift", image, np.array([[0, 4]]), np.array([False]))
    expected = np.zeros_like(image)
    expected[:, 2:, :3] = image[:, :4, 2:]  # Down 2 (dy=0), left 2 (dx=4).
    np.testing.assert_array_equal(out, expected)

  def test_crop_flip_reflects_and_flips(self):
    image = np.arange(64, dtype=np.uint8).reshape(1, 8, 8, 1)
    centre = augmentation.apply_augmentation(
        "crop_flip", image, np.array([[4, 4]]), np.array([True]))
    np.testing.assert_array_equal(centre, image[:, :, ::-1])
    corner = augmentation.apply_augmentation(
        "crop_flip", image, np.array([[0, 4]]), np.array([False]))
    np.testing.assert_array_equal(corner[0, :4, :, 0], image[0, 4:0:-1, :, 0])
    np.testing.assert_array_equal(corner[0, 4:], image[0, :4])

  def test_shapes_kept_and_deterministic_per_generator(self):
    images = np.random.default_rng(0).integers(0, 256, (16, 8, 8, 3), np.uint8)
    for kind in ("crop_flip", "shift"):
      a = augmentation.augment(images, kind, np.random.default_rng(1))
      b = augmentation.augment(images, kind, np.random.default_rng(1))
      c = augmentation.augment(images, kind, np.random.default_rng(2))
      self.assertEqual((a.shape, a.dtype), (images.shape, np.uint8))
      np.testing.assert_array_equal(a, b)
      self.assertFalse(np.array_equal(a, c))


if __name__ == "__main__":
  absltest.main()
