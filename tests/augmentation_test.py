"""Tests of train/augmentation.py: crops, flips, ImageNet crops, transforms."""

from __future__ import annotations

import io

from absl.testing import absltest
import chex
import jax
import jax.numpy as jnp
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



class OneDefinitionTest(absltest.TestCase):
  """The same functions on numpy (host) and jax.numpy (inside jit)."""

  def test_augmentation_and_normalisation_agree_under_jit(self):
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (8, 6, 7, 3), np.uint8)
    for kind in ("crop_flip", "shift", "none"):
      offsets, flips = augmentation.draw_augmentation(kind, rng, 8)
      host = augmentation.apply_augmentation(kind, images, offsets, flips)
      device = jax.jit(lambda x, o, f, kind=kind:
                       augmentation.apply_augmentation(kind, x, o, f,
                                                       xp=jnp))(
                                                           images, offsets,
                                                           flips)
      np.testing.assert_array_equal(np.asarray(device), host)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.2)
    chex.assert_trees_all_close(
        np.asarray(jax.jit(lambda x: augmentation.normalize(
            x, mean, std, xp=jnp))(images)),
        augmentation.normalize(images, mean, std), rtol=1e-6, atol=1e-6)

  def test_jax_draws_have_the_host_ranges(self):
    offsets, flips = augmentation.draw_augmentation_jax(
        "crop_flip", jax.random.key(0), 4000)
    self.assertEqual((offsets.min(), offsets.max()), (0, 8))
    self.assertBetween(float(flips.mean()), 0.45, 0.55)
    offsets, flips = augmentation.draw_augmentation_jax(
        "shift", jax.random.key(1), 1000)
    self.assertEqual((offsets.min(), offsets.max()), (0, 4))
    self.assertFalse(flips.any())


class AugmentRowsTest(absltest.TestCase):

  def test_process_rows_tile_the_global_draw(self):
    images = np.random.default_rng(0).integers(0, 256, (8, 8, 8, 1), np.uint8)
    whole = augmentation.AugmentRows("crop_flip", 0, 8).random_map(
        {"image": images}, np.random.default_rng(5))["image"]
    halves = [augmentation.AugmentRows("crop_flip", first, 8).random_map(
        {"image": images[first:first + 4]}, np.random.default_rng(5))["image"]
              for first in (0, 4)]
    np.testing.assert_array_equal(np.concatenate(halves), whole)


class ImagenetTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    from PIL import Image  # pylint: disable=g-import-not-at-top

    self.pixels = np.random.default_rng(1).integers(0, 256, (30, 40, 3),
                                                    np.uint8)
    buf = io.BytesIO()
    Image.fromarray(self.pixels).save(buf, "PNG")  # lossless
    self.encoded = buf.getvalue()

  def test_bytes_and_pixels_give_the_same_crops(self):
    for train in (True, False):
      a = augmentation.preprocess_imagenet(self.pixels, 16, train,
                                           np.random.default_rng(2))
      b = augmentation.preprocess_imagenet(self.encoded, 16, train,
                                           np.random.default_rng(2))
      self.assertEqual((a.shape, a.dtype), ((16, 16, 3), np.uint8))
      np.testing.assert_array_equal(a, b)

  def test_eval_is_the_centre_crop_of_the_resized_image(self):
    from PIL import Image  # pylint: disable=g-import-not-at-top

    out = augmentation.preprocess_imagenet(self.pixels, 14, False, None)
    resized = np.asarray(Image.fromarray(self.pixels).resize(
        (21, 16), Image.BILINEAR))  # short side 16 = round(14 * 256 / 224)
    np.testing.assert_array_equal(out, resized[1:15, 3:17])

  def test_grey_images_become_rgb(self):
    grey = self.pixels[..., :1]
    out = augmentation.preprocess_imagenet(grey, 8, True,
                                           np.random.default_rng(0))
    self.assertEqual(out.shape, (8, 8, 3))
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


if __name__ == "__main__":
  absltest.main()
