"""gdnsq_jax: GDNSQ quantization-aware fine-tuning for JAX/Flax.

Implements "GDNSQ: Gradual Differentiable Noise Scale Quantization for
Low-bit Neural Networks" (S. Salishev, I. Akhremchik, arXiv 2508.14004):
learnable log2 step sizes and clamps give every quantized layer a
differentiable bit-width; an exterior-point penalty drives the widths below
the target while the network distils from its FP teacher.
"""

from gdnsq_jax.activation_quantizer import quantize_activation
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
from gdnsq_jax.calibration import calibrate
from gdnsq_jax.calibration import calibrate_weights
from gdnsq_jax.calibration import CalibrationResult
from gdnsq_jax.calibration import measure_activation_widths
from gdnsq_jax.calibration import trainable_mask
from gdnsq_jax.export import export_model
from gdnsq_jax.export import ExportError
from gdnsq_jax.export import IntegerExport
from gdnsq_jax.export import NotConvergedError
from gdnsq_jax.export_files import ExportFormatError
from gdnsq_jax.export_files import format_size_table
from gdnsq_jax.export_files import load_export
from gdnsq_jax.export_files import save_export
from gdnsq_jax.integer_inference import integer_apply
from gdnsq_jax.integer_inference import load_inference
from gdnsq_jax.integer_inference import serialize_inference
from gdnsq_jax.interception import add_quantizer_params
from gdnsq_jax.interception import format_quantization_report
from gdnsq_jax.interception import LayerInfo
from gdnsq_jax.interception import quantization_report
from gdnsq_jax.interception import QuantizationRules
from gdnsq_jax.interception import QuantizedModel
from gdnsq_jax.interception import quantize_model
from gdnsq_jax.layers import NOISE_RNG
from gdnsq_jax.layers import QUANT_STATS
from gdnsq_jax.layers import QuantAct
from gdnsq_jax.layers import QuantConv
from gdnsq_jax.layers import QuantDense
from gdnsq_jax.layers import QuantSettings
from gdnsq_jax.learning_rate import AnnealedLearningRateState
from gdnsq_jax.learning_rate import scale_by_annealed_learning_rate
from gdnsq_jax.losses import cross_entropy_loss
from gdnsq_jax.losses import DEFAULT_DISTILLATION_LOSS
from gdnsq_jax.losses import distillation_loss
from gdnsq_jax.losses import get_distillation_loss
from gdnsq_jax.losses import jeffreys_divergence
from gdnsq_jax.losses import jensen_shannon_divergence
from gdnsq_jax.losses import kl_divergence
from gdnsq_jax.losses import l1_logit_loss
from gdnsq_jax.losses import l2_logit_loss
from gdnsq_jax.lsq import lsq_quantize_activation
from gdnsq_jax.lsq import lsq_quantize_weight
from gdnsq_jax.losses import LOSSES
from gdnsq_jax.losses import reverse_kl_divergence
from gdnsq_jax.losses import soft_cross_entropy
from gdnsq_jax.losses import symmetric_cross_entropy
from gdnsq_jax.penalty import bitwidth_penalty
from gdnsq_jax.penalty import BitwidthPenalty
from gdnsq_jax.penalty import exterior_point_penalty
from gdnsq_jax.penalty import ExteriorPointPenaltyState
from gdnsq_jax.penalty import gdnsq_optimizer
from gdnsq_jax.penalty import schedule_metrics
from gdnsq_jax.quantizers import DITHERS
from gdnsq_jax.quantizers import ESTIMATORS
from gdnsq_jax.quantizers import quantize_weight
from gdnsq_jax.quantizers import rounding_noise

__version__ = "0.1.0"

__all__ = (
    "AnnealedLearningRateState",
    "BitwidthPenalty",
    "BitwidthSummary",
    "CalibrationResult",
    "DEFAULT_DISTILLATION_LOSS",
    "DITHERS",
    "ESTIMATORS",
    "ExportError",
    "ExportFormatError",
    "ExteriorPointPenaltyState",
    "IntegerExport",
    "LOSSES",
    "LayerInfo",
    "NOISE_RNG",
    "NotConvergedError",
    "QUANT_STATS",
    "QuantAct",
    "QuantConv",
    "QuantDense",
    "QuantSettings",
    "QuantizationRules",
    "QuantizedModel",
    "QuantizerIndex",
    "activation_bitwidth",
    "activation_code_range",
    "activation_level_bound",
    "add_quantizer_params",
    "bitwidth_penalty",
    "calibrate",
    "calibrate_weights",
    "cross_entropy_loss",
    "differentiable_bitwidths",
    "distillation_loss",
    "export_model",
    "exterior_point_penalty",
    "find_quantizers",
    "format_quantization_report",
    "format_size_table",
    "gdnsq_optimizer",
    "get_distillation_loss",
    "integer_apply",
    "jeffreys_divergence",
    "jensen_shannon_divergence",
    "kl_divergence",
    "l1_logit_loss",
    "l2_logit_loss",
    "load_export",
    "load_inference",
    "lsq_quantize_activation",
    "lsq_quantize_weight",
    "measure_activation_widths",
    "quantization_report",
    "quantize_activation",
    "quantize_model",
    "quantize_weight",
    "reverse_kl_divergence",
    "rounding_noise",
    "save_export",
    "scale_by_annealed_learning_rate",
    "schedule_metrics",
    "serialize_inference",
    "soft_cross_entropy",
    "summarize_bitwidths",
    "symmetric_cross_entropy",
    "trainable_mask",
    "true_bitwidth_from_codes",
    "true_weight_bitwidth",
    "weight_bitwidth",
    "__version__",
)
