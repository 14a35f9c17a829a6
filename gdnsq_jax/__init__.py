"""gdnsq_jax: GDNSQ quantization-aware fine-tuning for JAX/Flax.

Implements "GDNSQ: Gradual Differentiable Noise Scale Quantization for
Low-bit Neural Networks" (S. Salishev, I. Akhremchik, arXiv 2508.14004):
learnable log2 step sizes and clamps give every quantized layer a
differentiable bit-width; an exterior-point penalty drives the widths below
the target while the network distils from its FP teacher. The method and
this implementation's decisions: docs/method.md.

The top level holds what a user needs to quantize, calibrate, train and
export a model; everything else lives in the namespaces below (as optax and
qwix do): :mod:`~gdnsq_jax.quantizers` and
:mod:`~gdnsq_jax.activation_quantizer` (the custom_vjp numerics),
:mod:`~gdnsq_jax.dither` (their hashed step-size dither),
:mod:`~gdnsq_jax.bitwidths`, :mod:`~gdnsq_jax.penalty`,
:mod:`~gdnsq_jax.learning_rate`, :mod:`~gdnsq_jax.losses`,
:mod:`~gdnsq_jax.settings` (``QuantSettings``),
:mod:`~gdnsq_jax.families` (GDNSQ and the LSQ baseline behind one
interface), :mod:`~gdnsq_jax.quantized_ops` (the framework-agnostic per-op
core), :mod:`~gdnsq_jax.channels` (per-output-channel steps of any kernel),
:mod:`~gdnsq_jax.layers`, :mod:`~gdnsq_jax.layer_kinds` and
:mod:`~gdnsq_jax.interception` (the Linen glue),
:mod:`~gdnsq_jax.calibration`, :mod:`~gdnsq_jax.lsq` (the LSQ numerics),
:mod:`~gdnsq_jax.quantizer_params` (param names and init values),
:mod:`~gdnsq_jax.tracing` and :mod:`~gdnsq_jax.export` (integer export).
"""

from gdnsq_jax import activation_quantizer
from gdnsq_jax import bitwidths
from gdnsq_jax import calibration
from gdnsq_jax import channels
from gdnsq_jax import export
from gdnsq_jax import families
from gdnsq_jax import interception
from gdnsq_jax import layer_kinds
from gdnsq_jax import layers
from gdnsq_jax import learning_rate
from gdnsq_jax import losses
from gdnsq_jax import lsq
from gdnsq_jax import penalty
from gdnsq_jax import quantized_ops
from gdnsq_jax import quantizer_params
from gdnsq_jax import quantizers
from gdnsq_jax import settings
from gdnsq_jax import tracing
from gdnsq_jax.activation_quantizer import quantize_activation
from gdnsq_jax.bitwidths import differentiable_bitwidths
from gdnsq_jax.bitwidths import FLOAT_BITS
from gdnsq_jax.bitwidths import is_converged
from gdnsq_jax.bitwidths import summarize_bitwidths
from gdnsq_jax.calibration import calibrate
from gdnsq_jax.calibration import measure_activation_widths
from gdnsq_jax.calibration import trainable_mask
from gdnsq_jax.export import export_model
from gdnsq_jax.export import integer_apply
from gdnsq_jax.export import load_export
from gdnsq_jax.export import save_export
from gdnsq_jax.interception import add_quantizer_params
from gdnsq_jax.interception import format_quantization_report
from gdnsq_jax.interception import quantization_report
from gdnsq_jax.interception import QuantizationRules
from gdnsq_jax.interception import QuantizedModel
from gdnsq_jax.interception import quantize_model
from gdnsq_jax.layers import NOISE_RNG
from gdnsq_jax.layers import QuantAct
from gdnsq_jax.layers import QuantConv
from gdnsq_jax.layers import QuantDense
from gdnsq_jax.layers import QuantDenseGeneral
from gdnsq_jax.layers import QuantEinsum
from gdnsq_jax.layers import QuantSettings
from gdnsq_jax.losses import distillation_loss
from gdnsq_jax.penalty import exterior_point_penalty
from gdnsq_jax.penalty import gdnsq_optimizer
from gdnsq_jax.quantizers import quantize_weight

__version__ = "0.1.0"

__all__ = (
    "FLOAT_BITS",
    "NOISE_RNG",
    "QuantAct",
    "QuantConv",
    "QuantDense",
    "QuantDenseGeneral",
    "QuantEinsum",
    "QuantSettings",
    "QuantizationRules",
    "QuantizedModel",
    "add_quantizer_params",
    "calibrate",
    "differentiable_bitwidths",
    "distillation_loss",
    "export_model",
    "exterior_point_penalty",
    "format_quantization_report",
    "gdnsq_optimizer",
    "integer_apply",
    "is_converged",
    "load_export",
    "measure_activation_widths",
    "quantization_report",
    "quantize_activation",
    "quantize_model",
    "quantize_weight",
    "save_export",
    "summarize_bitwidths",
    "trainable_mask",
)
