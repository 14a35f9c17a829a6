"""GDNSQ W3A3: 3-bit weights, 3-bit activations.

Launch (embedded digits, CPU, minutes):
  python -m train.main --config configs/w3a3.py --workdir runs/w3a3
Other presets: `configs/w3a3.py:cifar10`, `:cifar100`, `:imagenet` (see base.py).
Expected (digits): true widths <= 3/3; accuracy within ~0.5 pp of FP.
"""

from configs import base


def get_config(preset=None):
  return base.get_config(preset, weight_bits=3, activation_bits=3)
