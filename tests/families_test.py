"""Tests for gdnsq_jax.families: GDNSQ and the LSQ baseline, one interface."""

from __future__ import annotations

import math

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np

from gdnsq_jax import activation_quantizer
from gdnsq_jax import families
from gdnsq_jax import lsq
from gdnsq_jax import quantizers
from gdnsq_jax.settings import QuantSettings

_STATS = {"input_min": -1.0, "input_max": 3.0, "input_sum": 0.0,
          "input_count": 4.0}


class FamiliesTest(parameterized.TestCase):

  def test_registry_and_settings_choose_one_family(self):
    self.assertEqual(set(families.FAMILIES), {"gdnsq", "lsq"})
    self.assertIsInstance(QuantSettings().family, families.Gdnsq)
    self.assertIsInstance(QuantSettings(method="lsq").family, families.Lsq)
    with self.assertRaisesRegex(ValueError, "method='x'; choose one of "
                                "gdnsq, lsq"):
      families.get_family("x")
    for family in families.FAMILIES.values():
      self.assertIsInstance(family, families.QuantizerFamily)

  def test_flags(self):
    gdnsq, lsq_family = families.FAMILIES["gdnsq"], families.FAMILIES["lsq"]
    self.assertEqual(
        (gdnsq.learns_widths, gdnsq.exportable, gdnsq.uses_noise),
        (True, True, True))
    self.assertEqual(
        (lsq_family.learns_widths, lsq_family.exportable,
         lsq_family.uses_noise), (False, False, False))
    s = QuantSettings(weight_bits=2, activation_bits=3, method="lsq")
    self.assertEqual(lsq_family.fixed_widths(s), (2, 3))
    self.assertEqual(gdnsq.fixed_widths(s), (None, None))

  def test_numerics_are_the_families_functions(self):
    w = jax.random.normal(jax.random.key(0), (3, 4))
    log2_step = jnp.full((4,), -2.0)
    x = jax.random.normal(jax.random.key(1), (2, 5))
    params = {"log2_step": jnp.float32(-2.0), "log2_range": jnp.float32(1.0),
              "clamp_low": jnp.float32(-0.5)}
    s = QuantSettings()
    gdnsq = s.family
    chex.assert_trees_all_close(
        gdnsq.quantize_weight(w, log2_step, None, s),
        quantizers.quantize_weight(w, log2_step))
    chex.assert_trees_all_close(
        gdnsq.quantize_activation(x, gdnsq.activation_grid(params, s), None,
                                  s),
        activation_quantizer.quantize_activation(x, -2.0, 1.0, -0.5))
    s = QuantSettings(weight_bits=2, activation_bits=3, method="lsq")
    chex.assert_trees_all_close(
        s.family.quantize_weight(w, log2_step, None, s),
        lsq.lsq_quantize_weight(w, log2_step, bits=2))
    grid = s.family.activation_grid(params, s)
    self.assertEqual(float(grid[1]), -2.0 + 3)  # LSQ ties q = 2^B s
    chex.assert_trees_all_close(
        s.family.quantize_activation(x, grid, None, s),
        lsq.lsq_quantize_activation(x, -2.0, -0.5, bits=3))

  def test_frozen_clamp_gets_no_gradient(self):
    s = QuantSettings(learnable_clamp_low=False)
    params = {"log2_step": -2.0, "log2_range": 1.0, "clamp_low": 0.5}
    g = jax.grad(lambda p: s.family.activation_grid(p, s)[2])(params)
    self.assertEqual(g["clamp_low"], 0.0)

  def test_init_from_observed_stats(self):
    s = QuantSettings()
    grid = s.family.init_activation(_STATS, 10, s)
    self.assertEqual(float(grid["clamp_low"]), -1.0)
    self.assertAlmostEqual(2.0 ** float(grid["log2_step"]), 4.0 / 1023, 6)
    self.assertAlmostEqual(float(grid["log2_range"] - grid["log2_step"]),
                           10.0, 5)
    frozen = s.family.init_activation(
        dict(_STATS, input_min=0.7, input_max=0.7), 10, s)
    self.assertEqual(frozen, {"log2_step": 0.0, "log2_range": 0.0,
                              "clamp_low": np.float32(0.7)})
    lo, hi = jnp.array([-1.0, 0.0]), jnp.array([1.0, 1e-6])
    chex.assert_trees_all_close(s.family.init_weight(lo, hi, 10),
                                jnp.array([math.log2(2 / 1023), -12.0]))

  @parameterized.parameters((0.0, 0.0, True), (0.25, 0.0, True),
                            (-0.5, -0.5, False))
  def test_unsigned_if_nonnegative(self, low, expected_low, frozen):
    s = QuantSettings(unsigned_if_nonnegative=True)
    grid = s.family.init_activation(dict(_STATS, input_min=low), 4, s)
    self.assertEqual(float(grid["clamp_low"]), expected_low)
    np.testing.assert_allclose(2.0 ** float(grid["log2_step"]),
                               (3.0 - expected_low) / 15, rtol=1e-6)
    self.assertEqual(
        s.family.frozen_activation_params(grid, s),
        ("clamp_low",) if frozen else ())
    # Without the option a non-negative minimum stays a learnable b = m.
    plain = QuantSettings()
    grid = plain.family.init_activation(dict(_STATS, input_min=low), 4, plain)
    self.assertEqual(float(grid["clamp_low"]), low)

  def test_lsq_calibration_widths_and_frozen_range(self):
    s = QuantSettings(weight_bits=2, activation_bits=3, method="lsq",
                      calibration_bits=2)
    self.assertEqual(s.family.calibration_widths(s, None), (2, 3))
    with self.assertRaisesRegex(ValueError, "calibrate them without bits="):
      s.family.calibration_widths(s, 10)
    params = {"log2_step": -2.0, "log2_range": 1.0, "clamp_low": 0.0}
    self.assertEqual(s.family.frozen_activation_params(params, s),
                     ("log2_range",))
    self.assertEqual(
        s.family.frozen_activation_params(
            dict(params, log2_step=0.0, log2_range=0.0), s),
        ("log2_step", "log2_range", "clamp_low"))
    self.assertEqual(QuantSettings().family.calibration_widths(
        QuantSettings(), None), (10, 10))


if __name__ == "__main__":
  absltest.main()
