"""Tests of train/input_pipeline.py: the grain train and eval pipelines."""

from __future__ import annotations

from absl.testing import absltest
from absl.testing import parameterized
import jax
import numpy as np

from train import data_sources
from train import input_pipeline as ip
from train import sharding
from tests import data_setup


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
    self.path = data_setup.write_npz(data_setup.tempdir(self))
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



class GrainPipelineTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.ds = ip.load_dataset(data_setup.write_npz(data_setup.tempdir(self)), validation_size=0,
                              augmentation="shift")

  def test_worker_processes_give_the_same_stream(self):
    inline = ip.train_batches(self.ds, global_batch_size=16, seed=3,
                              position=(1, 4))
    with ip.train_batches(self.ds, global_batch_size=16, seed=3,
                          position=(1, 4), workers=2) as workers:
      for _ in range(5):  # crosses into epoch 2
        want, got = next(inline), next(workers)
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["label"], want["label"])
      self.assertEqual(workers.position, inline.position)
      self.assertEqual(workers.position, ip.DataPosition(2, 3))
    inline.close()

  def test_lazy_jpeg_split_in_a_worker_matches_in_process(self):
    ds = data_setup.jpeg_dataset()
    with ip.train_batches(ds, global_batch_size=4, seed=1) as inline:
      want = [next(inline) for _ in range(4)]
    with ip.train_batches(ds, global_batch_size=4, seed=1,
                          workers=1) as worker:
      got = [next(worker) for _ in range(4)]
    for a, b in zip(want, got):
      self.assertEqual(a["image"].shape, (4, 16, 16, 3))
      np.testing.assert_array_equal(a["image"], b["image"])
      np.testing.assert_array_equal(a["label"], b["label"])
    masks = [b["mask"] for b in ip.eval_batches(ds, "test",
                                                global_batch_size=4)]
    self.assertEqual([int(m.sum()) for m in masks], [4, 1])

  def test_mesh_batches_are_global_sharded_and_normalised_on_devices(self):
    mesh = sharding.make_mesh()
    host = next(ip.train_batches(self.ds, global_batch_size=32, seed=2))
    with ip.train_batches(self.ds, global_batch_size=32, seed=2,
                          mesh=mesh) as batches:
      placed = next(batches)
      self.assertEqual(batches.position, ip.DataPosition(0, 1))
    self.assertEqual(placed["image"].sharding, sharding.batch_sharding(mesh))
    self.assertLen(placed["image"].sharding.device_set, jax.device_count())
    self.assertEqual(placed["image"].dtype, np.float32)
    np.testing.assert_allclose(np.asarray(placed["image"]), host["image"],
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(placed["label"]), host["label"])
    evals = list(ip.eval_batches(self.ds, "train", global_batch_size=64,
                                 mesh=mesh))
    self.assertLen(evals, 2)
    self.assertEqual(int(np.asarray(evals[1]["mask"]).sum()), 103 - 64)

  def test_position_counts_returned_batches_not_prefetched_ones(self):
    with ip.train_batches(self.ds, global_batch_size=32, prefetch=2) as it:
      next(it)
      self.assertEqual(it.position, ip.DataPosition(0, 1))
      next(it), next(it)
      self.assertEqual(it.position, ip.DataPosition(1, 0))

  def test_eval_padding_repeats_a_real_example(self):
    (*_, last) = ip.eval_batches(self.ds, "train", global_batch_size=48,
                                 process_index=1, process_count=2)
    # Global rows 96..143 of 103: process 1 holds 120..143, all padding.
    self.assertFalse(last["mask"].any())
    np.testing.assert_array_equal(last["label"], np.full(24, 96))

  def test_default_workers(self):
    self.assertEqual(ip.default_workers(self.ds), 0)
    self.assertBetween(ip.default_workers(data_setup.jpeg_dataset()), 1, 16)


if __name__ == "__main__":
  absltest.main()
