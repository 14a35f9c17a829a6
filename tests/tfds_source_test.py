"""Tests of train/tfds_source.py through load_dataset: mocked TFDS data."""

from __future__ import annotations

import shutil
import tempfile
import time
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import tensorflow_datasets as tfds

from train import input_pipeline as ip
from train import data_sources
from train import tfds_source


def _tempdir(test: absltest.TestCase) -> str:
  """A fresh directory removed after the test (absl flags are not parsed)."""
  directory = tempfile.mkdtemp()
  test.addCleanup(shutil.rmtree, directory)
  return directory


def _write_prepared(name, data_dir, splits, file_format="array_record"):
  """Writes the metadata TFDS reads for a prepared dataset (no records)."""
  builder = tfds.builder(name, data_dir=data_dir, file_format=file_format)
  builder.info.set_splits(tfds.core.SplitDict([
      tfds.core.SplitInfo(name=s, shard_lengths=[n], num_bytes=0,
                          filename_template=None) for s, n in splits.items()
  ]))
  builder.data_path.mkdir(parents=True)
  builder.info.write_to_directory(builder.data_path)


class TfdsTest(parameterized.TestCase):

  @parameterized.parameters(
      ("cifar10", (32, 32, 3), data_sources.CIFAR10_MEAN, data_sources.CIFAR10_STD),
      ("mnist", (28, 28, 1), data_sources.MNIST_MEAN, data_sources.MNIST_STD),
  )
  def test_mocked_array_record_dataset(self, name, shape, mean, std):
    data_dir = _tempdir(self)
    _write_prepared(name, data_dir, {"train": 24, "test": 24})
    with tfds.testing.mock_data(num_examples=24, data_dir=data_dir,
                                policy=tfds.testing.MockPolicy.USE_FILES):
      ds = ip.load_dataset(name, data_dir=data_dir, validation_size=4)
      source = tfds.data_source(name, split="test", data_dir=data_dir)
      raw = np.stack([source[i]["image"] for i in range(len(source))])
    self.assertEqual((ds.image_shape, ds.num_classes), (shape, 10))
    self.assertEqual((len(ds.train), len(ds.validation), len(ds.test)),
                     (20, 4, 24))
    np.testing.assert_array_equal(ds.test.images, raw)
    batch = next(ip.train_batches(ds, global_batch_size=8))
    self.assertEqual(batch["image"].shape, (8,) + shape)
    self.assertEqual((batch["image"].dtype, batch["label"].dtype),
                     (np.float32, np.int32))
    test = next(ip.eval_batches(ds, "test", global_batch_size=8))
    expected = (raw[:8].astype(np.float64) / 255 - mean) / std
    np.testing.assert_allclose(test["image"], expected, rtol=1e-5, atol=1e-5)

  def test_mocked_imagenet_is_lazy_and_cropped(self):
    data_dir = _tempdir(self)
    _write_prepared("imagenet2012", data_dir, {"train": 12, "validation": 6})
    with tfds.testing.mock_data(num_examples=12, data_dir=data_dir,
                                policy=tfds.testing.MockPolicy.USE_FILES):
      ds = ip.load_dataset("imagenet2012", data_dir=data_dir,
                           validation_size=2, image_size=16)
    self.assertIsInstance(ds.train, ip.LazySplit)
    self.assertEqual((ds.image_shape, ds.num_classes), ((16, 16, 3), 1000))
    self.assertEmpty(set(ds.train.indices) & set(ds.validation.indices))
    a = next(ip.train_batches(ds, global_batch_size=4, seed=2))
    b = next(ip.train_batches(ds, global_batch_size=4, seed=2))
    np.testing.assert_array_equal(a["image"], b["image"])
    self.assertEqual(a["image"].shape, (4, 16, 16, 3))
    masks = [b["mask"] for b in ip.eval_batches(ds, "test",
                                                global_batch_size=8)]
    self.assertEqual(sum(int(m.sum()) for m in masks), 12)

  def test_missing_dataset_fails_fast_with_the_prepare_command(self):
    data_dir = _tempdir(self)
    start = time.monotonic()
    with self.assertRaises(ip.DatasetNotFoundError) as caught:
      ip.load_dataset("cifar10", data_dir=data_dir)
    self.assertLess(time.monotonic() - start, 5.0)
    message = str(caught.exception)
    self.assertIn("'cifar10'", message)
    self.assertIn(data_dir, message)
    self.assertIn(f"tfds build cifar10 --data_dir {data_dir}", message)
    self.assertIsInstance(caught.exception, ValueError)

  def test_tfrecord_without_tensorflow_says_so(self):
    data_dir = _tempdir(self)
    _write_prepared("cifar10", data_dir, {"train": 4, "test": 4}, "tfrecord")
    with mock.patch.object(tfds_source, "_has_tensorflow", return_value=False):
      with self.assertRaisesRegex(ip.DatasetFormatError,
                                  "TensorFlow.*--file_format array_record"):
        ip.load_dataset("cifar10", data_dir=data_dir)


if __name__ == "__main__":
  absltest.main()
