"""Tests of gdnsq_jax.export.packing: dense bit packing of unsigned codes."""

from __future__ import annotations

import math

from absl.testing import absltest
from absl.testing import parameterized
import chex
import numpy as np

from gdnsq_jax.export import packing

_COUNTS = (1, 3, 7, 9, 13, 1001)  # odd counts leave a partly filled last byte


class ContainerTest(parameterized.TestCase):

  @parameterized.parameters(
      (1, 1), (2, 2), (3, 4), (4, 4), (5, 8), (8, 8), (9, 16), (16, 16),
      (17, 32), (32, 32))
  def test_container_is_smallest_storage_width(self, bits, container):
    self.assertEqual(packing.container_bits(bits), container)

  @parameterized.parameters(0, 33, 2.5, -1)
  def test_invalid_bits_are_refused(self, bits):
    with self.assertRaisesRegex(ValueError, "must be an integer in 1..32"):
      packing.container_bits(bits)

  @parameterized.parameters((0, 1), (1, 1), (2, 2), (3, 2), (4, 3), (7, 3),
                            (255, 8), (256, 9))
  def test_bits_for_max_code(self, max_code, bits):
    self.assertEqual(packing.bits_for_max_code(max_code), bits)

  @parameterized.parameters((54, 3, 27), (240, 1, 30), (5, 2, 2), (3, 8, 3),
                            (3, 10, 6), (1, 4, 1))
  def test_packed_size_counts_by_hand(self, count, bits, size):
    self.assertEqual(packing.packed_size(count, bits), size)


class PackTest(parameterized.TestCase):

  def test_two_bit_layout_by_hand(self):
    # Byte 0 holds codes 1, 2, 3, 0 from the low bits up: 1 + 2*4 + 3*16 = 57.
    packed = packing.pack_codes(np.array([1, 2, 3, 0, 1]), 2)
    np.testing.assert_array_equal(packed, np.array([57, 1], np.uint8))

  def test_one_and_four_bit_layout_by_hand(self):
    packed = packing.pack_codes(np.array([1, 0, 1, 1, 0, 0, 0, 1, 1]), 1)
    np.testing.assert_array_equal(packed, np.array([0b10001101, 1], np.uint8))
    packed = packing.pack_codes(np.array([[3, 12], [15, 0]]), 4)  # C order
    np.testing.assert_array_equal(packed, np.array([0xC3, 0x0F], np.uint8))

  def test_ten_bit_codes_take_two_little_endian_bytes(self):
    packed = packing.pack_codes(np.array([0x3FF, 0x102]), 10)
    np.testing.assert_array_equal(packed,
                                  np.array([0xFF, 0x03, 0x02, 0x01], np.uint8))

  @parameterized.product(bits=tuple(range(1, 9)) + (10, 16, 23),
                         count=_COUNTS)
  def test_round_trip_is_exact(self, bits, count):
    rng = np.random.default_rng(bits * 1000 + count)
    codes = rng.integers(0, 2**bits, size=count)
    codes[0] = 2**bits - 1  # the top code survives packing
    packed = packing.pack_codes(codes, bits)
    self.assertEqual(packed.dtype, np.uint8)
    self.assertEqual(packed.shape,
                     (math.ceil(count * packing.container_bits(bits) / 8),))
    np.testing.assert_array_equal(packing.unpack_codes(packed, bits, count),
                                  codes)

  def test_out_of_range_codes_are_refused(self):
    with self.assertRaisesRegex(ValueError, r"codes span \[0, 4\].*\[0, 3\]"):
      packing.pack_codes(np.array([0, 4]), 2)
    with self.assertRaisesRegex(ValueError, "unsigned|span"):
      packing.pack_codes(np.array([-1, 1]), 2)
    with self.assertRaisesRegex(ValueError, "integer codes"):
      packing.pack_codes(np.array([0.5]), 2)

  def test_truncated_packed_array_is_refused(self):
    packed = packing.pack_codes(np.arange(8) % 4, 2)
    with self.assertRaisesRegex(ValueError, "truncated"):
      packing.unpack_codes(packed[:-1], 2, 8)


class UnpackJaxTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(bits=(1, 2, 3, 4, 5, 8, 12, 20), count=(1, 13, 100))
  def test_matches_host_unpacking(self, bits, count):
    rng = np.random.default_rng(7 * bits + count)
    codes = rng.integers(0, 2**bits, size=count)
    packed = packing.pack_codes(codes, bits)
    unpack = self.variant(
        lambda p: packing.unpack_codes_jax(p, bits, count))
    out = unpack(packed)
    self.assertEqual(out.dtype, np.int32)
    chex.assert_trees_all_equal(np.asarray(out), codes.astype(np.int32))

  def test_wrong_size_is_refused(self):
    with self.assertRaisesRegex(ValueError, "take 2 bytes"):
      packing.unpack_codes_jax(np.zeros(3, np.uint8), 2, 5)


if __name__ == "__main__":
  absltest.main()
