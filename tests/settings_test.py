"""Tests for gdnsq_jax.settings: QuantSettings."""

from __future__ import annotations

from absl.testing import absltest

from gdnsq_jax import layers
from gdnsq_jax import settings


class SettingsTest(absltest.TestCase):

  def test_defaults_and_errors(self):
    s = settings.QuantSettings()
    self.assertEqual((s.method, s.family.name), ("gdnsq", "gdnsq"))
    self.assertTrue(s.quantize_weights and s.quantize_activations)
    self.assertFalse(settings.QuantSettings(activation_bits=32)
                     .quantize_activations)
    self.assertIs(layers.QuantSettings, settings.QuantSettings)
    self.assertEqual(settings.METHODS, ("gdnsq", "lsq"))
    with self.assertRaisesRegex(ValueError, "choose one of gdnsq, lsq"):
      settings.QuantSettings(method="dorefa")
    with self.assertRaisesRegex(ValueError, "fixed integer widths"):
      settings.QuantSettings(method="lsq", activation_bits=1.5)
    with self.assertRaisesRegex(ValueError, "calibration_bits=0"):
      settings.QuantSettings(calibration_bits=0)


if __name__ == "__main__":
  absltest.main()
