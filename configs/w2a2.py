"""GDNSQ W2A2: 2-bit weights, 2-bit activations.

Launch (embedded digits, CPU, minutes):
  python -m train.main --config configs/w2a2.py --workdir runs/w2a2
Other presets: `configs/w2a2.py:cifar10`, `:cifar100`, `:imagenet` (see base.py).
Expected (digits): true widths <= 2/2; accuracy within 1.5 pp of FP.
"""

from configs import base


def get_config(preset=None):
  return base.get_config(preset, weight_bits=2, activation_bits=2)
