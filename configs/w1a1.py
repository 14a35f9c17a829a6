"""GDNSQ W1A1: 1-bit weights, 1-bit activations.

Launch (embedded digits, CPU, minutes):
  python -m train.main --config configs/w1a1.py --workdir runs/w1a1
Other presets: `configs/w1a1.py:cifar10`, `:cifar100`, `:imagenet` (see base.py).
Expected (digits): true widths <= 1/1; accuracy within ~3 pp of FP.
"""

from configs import base


def get_config(preset=None):
  return base.get_config(preset, weight_bits=1, activation_bits=1)
