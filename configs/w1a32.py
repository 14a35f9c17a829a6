"""GDNSQ W1A32: 1-bit weights, float activations (docs/method.md D12).

Launch (embedded digits, CPU, minutes):
  python -m train.main --config configs/w1a32.py --workdir runs/w1a32
Other presets: `configs/w1a32.py:cifar10`, `:cifar100`, `:imagenet` (see base.py).
Expected (digits): true weight widths <= 1; accuracy close to FP.
"""

from configs import base


def get_config(preset=None):
  return base.get_config(preset, weight_bits=1, activation_bits=32)
