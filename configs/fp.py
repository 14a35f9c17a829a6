"""FP recipe: trains the float teacher (no quantization).

Launch (embedded digits, CPU, minutes):
  python -m train.main --config configs/fp.py --workdir runs/fp
Other presets: `configs/fp.py:cifar10`, `:cifar100`, `:imagenet` (see base.py).
Expected: the FP accuracy that the quantized runs are compared with.
"""

from configs import base


def get_config(preset=None):
  return base.get_config(preset, weight_bits=32, activation_bits=32)
