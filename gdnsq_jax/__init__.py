"""gdnsq_jax: GDNSQ quantization-aware fine-tuning for JAX/Flax.

Implements "GDNSQ: Gradual Differentiable Noise Scale Quantization for
Low-bit Neural Networks" (S. Salishev, I. Akhremchik, arXiv 2508.14004).
"""

from gdnsq_jax.bitwidths import activation_bitwidth
from gdnsq_jax.bitwidths import activation_code_range
from gdnsq_jax.bitwidths import activation_level_bound
from gdnsq_jax.bitwidths import BitwidthSummary
from gdnsq_jax.bitwidths import differentiable_bitwidths
from gdnsq_jax.bitwidths import find_quantizers
from gdnsq_jax.bitwidths import QuantizerIndex
from gdnsq_jax.bitwidths import summarize_bitwidths
from gdnsq_jax.bitwidths import true_bitwidth_from_codes
from gdnsq_jax.bitwidths import true_weight_bitwidth
from gdnsq_jax.bitwidths import weight_bitwidth
from gdnsq_jax.quantizers import DITHERS
from gdnsq_jax.quantizers import ESTIMATORS
from gdnsq_jax.quantizers import quantize_activation
from gdnsq_jax.quantizers import quantize_weight
from gdnsq_jax.quantizers import rounding_noise

__version__ = "0.1.0"

__all__ = (
    "BitwidthSummary",
    "DITHERS",
    "ESTIMATORS",
    "QuantizerIndex",
    "activation_bitwidth",
    "activation_code_range",
    "activation_level_bound",
    "differentiable_bitwidths",
    "find_quantizers",
    "quantize_activation",
    "quantize_weight",
    "rounding_noise",
    "summarize_bitwidths",
    "true_bitwidth_from_codes",
    "true_weight_bitwidth",
    "weight_bitwidth",
)
