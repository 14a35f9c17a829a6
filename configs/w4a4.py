"""GDNSQ W4A4: 4-bit weights, 4-bit activations.

Launch (embedded digits, CPU, minutes):
  python -m train.main --config configs/w4a4.py --workdir runs/w4a4
Other presets: `configs/w4a4.py:cifar10`, `:cifar100`, `:imagenet` (see base.py).
Expected (digits): true widths <= 4/4; accuracy within 0.3 pp of FP.
"""

from configs import base


def get_config(preset=None):
  return base.get_config(preset, weight_bits=4, activation_bits=4)
