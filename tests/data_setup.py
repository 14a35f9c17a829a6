"""Small datasets shared by the data tests (npz files, JPEG records)."""

from __future__ import annotations

import io
import os
import shutil
import tempfile

from absl.testing import absltest
import numpy as np

from train import data_sources


def tempdir(test: absltest.TestCase) -> str:
  """A fresh directory removed after the test (absl flags are not parsed)."""
  directory = tempfile.mkdtemp()
  test.addCleanup(shutil.rmtree, directory)
  return directory


def write_npz(directory, count=103, height=6, width=5, channels=None):
  """An npz whose label i is unique, so batches can be traced to examples."""
  rng = np.random.default_rng(7)
  shape = (count, height, width) + ((channels,) if channels else ())
  path = os.path.join(directory, "toy.npz")
  np.savez(path, images=rng.integers(0, 256, shape, dtype=np.uint8),
           labels=np.arange(count))
  return path


def jpeg_dataset(count=12):
  """A LazySplit of JPEG-bytes records, as ImageNet is read (uneven sizes)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(3)
  records = []
  for i in range(count):
    height, width = 20 + i, 28 - i % 5
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
                    ).save(buf, "JPEG")
    records.append({"image": buf.getvalue(), "label": i})
  split = data_sources.LazySplit(records, np.arange(count))
  return data_sources.Dataset(
      "jpegs", split, split.subset(np.arange(4)), split.subset(np.arange(5)),
      1000, (16, 16, 3), data_sources.IMAGENET_MEAN,
      data_sources.IMAGENET_STD, "random_resized_crop")
