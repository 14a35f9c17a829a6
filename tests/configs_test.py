"""Tests of configs/: the reference recipes the presets encode."""

from __future__ import annotations

from absl.testing import absltest
from absl.testing import parameterized

from configs import base
from configs import w1a1
from configs import w2a2
from train import train_lib

_STEPS_PER_EPOCH = 45_000 // 1000  # CIFAR: 45k train images, batch 1000


class PresetTest(parameterized.TestCase):

  @parameterized.parameters(
      (w1a1, "cifar100", 1500),  # the reference's CIFAR-100 W1A1 recipe
      (w1a1, "cifar10", 1000),
      (w2a2, "cifar100", 1000),
      (w2a2, "cifar10", 1000),
  )
  def test_cifar_epochs(self, variant, preset, epochs):
    config = variant.get_config(preset)
    self.assertEqual(config.train.num_steps, epochs * _STEPS_PER_EPOCH)
    self.assertEqual(config.train.eval_every_steps, 2 * _STEPS_PER_EPOCH)

  def test_every_preset_builds_and_is_locked(self):
    for preset in base.PRESETS:
      config = w2a2.get_config(preset)
      self.assertEqual(config.preset, preset)
      with self.assertRaises(AttributeError):
        config.train.num_stpes = 1


class QuantSettingsTest(absltest.TestCase):

  def test_quant_keys_reach_the_settings(self):
    config = w2a2.get_config()
    self.assertFalse(train_lib.quant_settings(config).unsigned_if_nonnegative)
    with config.unlocked():
      config.quant.unsigned_if_nonnegative = True
      config.quant.learnable_clamp_low = False
      config.quant.dither = "half"
    settings = train_lib.quant_settings(config)
    self.assertTrue(settings.unsigned_if_nonnegative)
    self.assertFalse(settings.learnable_clamp_low)
    self.assertEqual((settings.dither, settings.weight_bits,
                      settings.activation_bits), ("half", 2, 2))


if __name__ == "__main__":
  absltest.main()
