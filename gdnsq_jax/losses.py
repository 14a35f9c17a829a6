"""Distillation losses behind a name registry, and the label cross-entropy.

Reference: S. Salishev, I. Akhremchik, "GDNSQ: Gradual Differentiable Noise
Scale Quantization for Low-bit Neural Networks", arXiv 2508.14004. GDNSQ
distils the quantized student from its own full-precision checkpoint with
the Jeffreys divergence (docs/method.md §7.2, D14):

    J(p_T, p_S) = KL(p_T || p_S) + KL(p_S || p_T)
                = sum_c (p_T,c - p_S,c) * (log p_T,c - log p_S,c),

from the log-softmax of the logits, summed over classes and averaged over
the batch. Every loss here follows the same conventions:

* Arguments are ``(student_logits, teacher_logits)`` of equal shape
  ``(..., num_classes)``. Class-wise losses sum over the last axis and average
  over all leading (batch) axes; ``l1`` and ``l2`` average over every element.
* The teacher is a constant: its logits pass through ``lax.stop_gradient``.
* Arithmetic runs in float32 whatever the input dtype; results are float32.
* Probabilities come from ``jax.nn.log_softmax``, so log-probabilities are
  finite for finite logits (about ``-2e4`` at logits of ``+-1e4``) and a class
  with ``p == 0`` (an underflow, or a ``-inf`` logit) contributes exactly 0 to
  ``p * (log p - log q)``: the log term is replaced by 0 there *before* the
  product, so neither the value nor the gradient can meet ``0 * inf``.
* ``temperature`` T divides both logits before anything else, for every loss
  (``l1``/``l2`` included). The result is **not** multiplied by ``T**2``: a
  loss equals the divergence between the softened distributions, so bounds
  such as ``js <= ln 2`` hold at any T. For Hinton-style gradient magnitudes
  multiply the loss by ``T**2`` yourself. The default T = 1 matches the
  reference (docs/method.md D14).
"""

from __future__ import annotations

from typing import Callable, Union

import jax
from jax import lax
import jax.numpy as jnp

__all__ = [
    "DEFAULT_DISTILLATION_LOSS",
    "LOSSES",
    "DistillationLoss",
    "cross_entropy_loss",
    "distillation_loss",
    "get_distillation_loss",
    "hellinger_distance",
    "jeffreys_divergence",
    "jensen_shannon_divergence",
    "kl_divergence",
    "l1_logit_loss",
    "l2_logit_loss",
    "reverse_kl_divergence",
    "soft_cross_entropy",
    "symmetric_cross_entropy",
]

Temperature = Union[float, jax.typing.ArrayLike]
DistillationLoss = Callable[..., jax.Array]
"""``loss(student_logits, teacher_logits, *, temperature=1.0) -> scalar``."""

DEFAULT_DISTILLATION_LOSS = "jeffreys"
"""The reference's "Symmetrical KL" (docs/method.md §7.2)."""


def _validate_temperature(temperature: Temperature) -> None:
  """Raises a ValueError for a concrete temperature that is not > 0."""
  if isinstance(temperature, (int, float)) and not temperature > 0:
    raise ValueError(
        f"distillation temperature must be > 0, got {temperature!r}; use 1.0 "
        "for the plain softmax (the reference's setting)"
    )


def _tempered_logits(
    student_logits: jax.typing.ArrayLike,
    teacher_logits: jax.typing.ArrayLike,
    temperature: Temperature,
) -> tuple[jax.Array, jax.Array]:
  """Returns float32 ``(student / T, stop_gradient(teacher) / T)``."""
  student = jnp.asarray(student_logits, jnp.float32)
  teacher = lax.stop_gradient(jnp.asarray(teacher_logits, jnp.float32))
  if student.shape != teacher.shape or student.ndim < 1:
    raise ValueError(
        f"student logits {student.shape} and teacher logits {teacher.shape} "
        "must have the same shape (..., num_classes); pass the two models' "
        "outputs for the same batch"
    )
  _validate_temperature(temperature)
  scale = 1.0 / jnp.asarray(temperature, jnp.float32)
  return student * scale, teacher * scale


def _log_probs(
    student_logits: jax.typing.ArrayLike,
    teacher_logits: jax.typing.ArrayLike,
    temperature: Temperature,
) -> tuple[jax.Array, jax.Array]:
  """Returns float32 log-softmax of ``(student, teacher)`` at temperature T."""
  student, teacher = _tempered_logits(
      student_logits, teacher_logits, temperature
  )
  return jax.nn.log_softmax(student, axis=-1), jax.nn.log_softmax(
      teacher, axis=-1
  )


def _cross_entropy_terms(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
  """Per-row ``-sum_c p_c log q_c``; classes with ``p_c == 0`` give 0."""
  p = jnp.exp(log_p)
  safe_log_q = jnp.where(p > 0, log_q, 0.0)
  return -jnp.sum(p * safe_log_q, axis=-1)


def _kl_terms(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
  """Per-row ``sum_c p_c (log p_c - log q_c)``; ``p_c == 0`` classes give 0."""
  p = jnp.exp(log_p)
  safe_log_ratio = jnp.where(p > 0, log_p - log_q, 0.0)
  return jnp.sum(p * safe_log_ratio, axis=-1)


def _log_mean_exp(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
  """``log((p + q) / 2)`` in log space, exact (``log p``) where ``p == q``.

  Uses ``max + log1p(expm1(-|log p - log q|) / 2)`` instead of
  ``logaddexp(log p, log q) - ln 2``, whose two roundings leave a small
  negative JSD for identical inputs. Equal entries (both ``-inf`` included)
  take the difference 0, so no NaN reaches the value or the gradient.
  """
  equal = log_p == log_q
  gap = jnp.abs(jnp.where(equal, 0.0, log_p - log_q))
  return jnp.maximum(log_p, log_q) + jnp.log1p(0.5 * jnp.expm1(-gap))


def kl_divergence(
    student_logits: jax.typing.ArrayLike,
    teacher_logits: jax.typing.ArrayLike,
    *,
    temperature: Temperature = 1.0,
) -> jax.Array:
  """Forward KL ``KL(p_T || p_S) = sum_c p_T,c (log p_T,c - log p_S,c)``.

  Args:
    student_logits: student logits, shape ``(..., num_classes)``.
    teacher_logits: teacher logits of the same shape (no gradient).
    temperature: T > 0; both logits are divided by T (no ``T**2`` factor).

  Returns:
    Float32 scalar: the class sum averaged over the leading axes.

  Raises:
    ValueError: on mismatched shapes or a concrete temperature <= 0.
  """
  log_ps, log_pt = _log_probs(student_logits, teacher_logits, temperature)
  return jnp.mean(_kl_terms(log_pt, log_ps))


def reverse_kl_divergence(
    student_logits: jax.typing.ArrayLike,
    teacher_logits: jax.typing.ArrayLike,
    *,
    temperature: Temperature = 1.0,
) -> jax.Array:
  """Reverse KL ``KL(p_S || p_T) = sum_c p_S,c (log p_S,c - log p_T,c)``.

  Args and Returns as :func:`kl_divergence`.

  Raises:
    ValueError: on mismatched shapes or a concrete temperature <= 0.
  """
  log_ps, log_pt = _log_probs(student_logits, teacher_logits, temperature)
  return jnp.mean(_kl_terms(log_ps, log_pt))


def jeffreys_divergence(
    student_logits: jax.typing.ArrayLike,
    teacher_logits: jax.typing.ArrayLike,
    *,
    temperature: Temperature = 1.0,
) -> jax.Array:
  """Jeffreys divergence ``KL(p_T || p_S) + KL(p_S || p_T)`` (the default).

  Equals ``sum_c (p_T,c - p_S,c)(log p_T,c - log p_S,c)``; symmetric in its
  arguments and zero iff the softmax distributions agree (arXiv 2508.14004;
  the reference calls it "Symmetrical KL", docs/method.md §7.2).

  Args and Returns as :func:`kl_divergence`.

  Raises:
    ValueError: on mismatched shapes or a concrete temperature <= 0.
  """
  log_ps, log_pt = _log_probs(student_logits, teacher_logits, temperature)
  return jnp.mean(_kl_terms(log_pt, log_ps) + _kl_terms(log_ps, log_pt))


def soft_cross_entropy(
    student_logits: jax.typing.ArrayLike,
    teacher_logits: jax.typing.ArrayLike,
    *,
    temperature: Temperature = 1.0,
) -> jax.Array:
  """Soft-target cross-entropy ``-sum_c p_T,c log p_S,c``.

  Equals ``KL(p_T || p_S) + H(p_T)``: the same student gradient as
  :func:`kl_divergence`, offset by the teacher's entropy.

  Args and Returns as :func:`kl_divergence`.

  Raises:
    ValueError: on mismatched shapes or a concrete temperature <= 0.
  """
  log_ps, log_pt = _log_probs(student_logits, teacher_logits, temperature)
  return jnp.mean(_cross_entropy_terms(log_pt, log_ps))


def symmetric_cross_entropy(
    student_logits: jax.typing.ArrayLike,
    teacher_logits: jax.typing.ArrayLike,
    *,
    temperature: Temperature = 1.0,
) -> jax.Array:
  """Symmetric cross-entropy ``-sum p_T log p_S - sum p_S log p_T`` (over c).

  Args and Returns as :func:`kl_divergence`.

  Raises:
    ValueError: on mismatched shapes or a concrete temperature <= 0.
  """
  log_ps, log_pt = _log_probs(student_logits, teacher_logits, temperature)
  return jnp.mean(
      _cross_entropy_terms(log_pt, log_ps)
      + _cross_entropy_terms(log_ps, log_pt)
  )


def jensen_shannon_divergence(
    student_logits: jax.typing.ArrayLike,
    teacher_logits: jax.typing.ArrayLike,
    *,
    temperature: Temperature = 1.0,
) -> jax.Array:
  """Jensen-Shannon divergence ``KL(p_T || m)/2 + KL(p_S || m)/2``.

  ``m = (p_T + p_S) / 2`` is formed in log space,
  ``log m = max(log p_T, log p_S) + log1p(expm1(-|log p_T - log p_S|) / 2)``
  (a logaddexp), so it never underflows where either distribution has mass
  and ``log p - log m <= ln 2`` term by term. This is the true JSD (symmetric,
  ``0 <= JSD <= ln 2``), not the reference's "JSD" against the average of
  the two log-prob vectors (docs/method.md §7.2).

  Args and Returns as :func:`kl_divergence`.

  Raises:
    ValueError: on mismatched shapes or a concrete temperature <= 0.
  """
  log_ps, log_pt = _log_probs(student_logits, teacher_logits, temperature)
  log_m = _log_mean_exp(log_pt, log_ps)
  return jnp.mean(
      0.5 * _kl_terms(log_pt, log_m) + 0.5 * _kl_terms(log_ps, log_m)
  )


def hellinger_distance(
    student_logits: jax.typing.ArrayLike,
    teacher_logits: jax.typing.ArrayLike,
    *,
    temperature: Temperature = 1.0,
) -> jax.Array:
  """Squared Hellinger distance ``1/2 sum_c (sqrt p_S,c - sqrt p_T,c)^2``.

  ``sqrt p = exp(log p / 2)`` from the log-softmax, so gradients stay finite
  where a probability underflows; ``0 <= H^2 <= 1``. The reference's
  Hellinger-like loss is the element mean of the same squared differences,
  i.e. ``2 H^2 / C`` for C classes (docs/method.md §7.2).

  Args and Returns as :func:`kl_divergence`.

  Raises:
    ValueError: on mismatched shapes or a concrete temperature <= 0.
  """
  log_ps, log_pt = _log_probs(student_logits, teacher_logits, temperature)
  diff = jnp.exp(0.5 * log_ps) - jnp.exp(0.5 * log_pt)
  return jnp.mean(0.5 * jnp.sum(jnp.square(diff), axis=-1))


def l1_logit_loss(
    student_logits: jax.typing.ArrayLike,
    teacher_logits: jax.typing.ArrayLike,
    *,
    temperature: Temperature = 1.0,
) -> jax.Array:
  """Mean absolute logit difference ``mean |z_S - z_T| / T``, all elements.

  Args and Returns as :func:`kl_divergence`, except that the mean runs over
  every element (classes included).

  Raises:
    ValueError: on mismatched shapes or a concrete temperature <= 0.
  """
  student, teacher = _tempered_logits(
      student_logits, teacher_logits, temperature
  )
  return jnp.mean(jnp.abs(student - teacher))


def l2_logit_loss(
    student_logits: jax.typing.ArrayLike,
    teacher_logits: jax.typing.ArrayLike,
    *,
    temperature: Temperature = 1.0,
) -> jax.Array:
  """Mean squared logit difference ``mean (z_S - z_T)^2 / T^2``, all elements.

  Args and Returns as :func:`l1_logit_loss`.

  Raises:
    ValueError: on mismatched shapes or a concrete temperature <= 0.
  """
  student, teacher = _tempered_logits(
      student_logits, teacher_logits, temperature
  )
  return jnp.mean(jnp.square(student - teacher))


_DISTILLATION_LOSSES: dict[str, DistillationLoss] = {
    "hellinger": hellinger_distance,
    "jeffreys": jeffreys_divergence,
    "js": jensen_shannon_divergence,
    "kl": kl_divergence,
    "l1": l1_logit_loss,
    "l2": l2_logit_loss,
    "reverse_kl": reverse_kl_divergence,
    "soft_ce": soft_cross_entropy,
    "symmetric_ce": symmetric_cross_entropy,
}

LOSSES = tuple(sorted(_DISTILLATION_LOSSES))
"""Sorted names of :func:`get_distillation_loss` (docs/method.md D14)."""


def get_distillation_loss(name: str) -> DistillationLoss:
  """Returns the distillation loss function registered under ``name``.

  Args:
    name: one of :data:`LOSSES`.

  Returns:
    ``loss(student_logits, teacher_logits, *, temperature=1.0) -> scalar``.

  Raises:
    ValueError: if ``name`` is not registered; the message lists the names.
  """
  try:
    return _DISTILLATION_LOSSES[name]
  except (KeyError, TypeError):
    raise ValueError(
        f"unknown distillation loss {name!r}; choose one of: "
        f"{', '.join(LOSSES)}"
    ) from None


def distillation_loss(
    student_logits: jax.typing.ArrayLike,
    teacher_logits: jax.typing.ArrayLike,
    *,
    name: str = DEFAULT_DISTILLATION_LOSS,
    temperature: Temperature = 1.0,
) -> jax.Array:
  """Distillation loss ``name`` between student and (constant) teacher logits.

  Args:
    student_logits: student logits, shape ``(..., num_classes)``.
    teacher_logits: teacher logits of the same shape; no gradient flows
      into them.
    name: one of :data:`LOSSES`, default ``"jeffreys"`` (docs/method.md D14).
      A Python string: close over it (or mark it static) under ``jit``.
    temperature: T > 0 dividing both logits; the loss is not rescaled by
      ``T**2``.

  Returns:
    Float32 scalar loss.

  Raises:
    ValueError: on an unknown ``name``, mismatched shapes or a concrete
      temperature <= 0.
  """
  loss_fn = get_distillation_loss(name)
  return loss_fn(student_logits, teacher_logits, temperature=temperature)


def cross_entropy_loss(
    logits: jax.typing.ArrayLike, labels: jax.typing.ArrayLike
) -> jax.Array:
  """Label cross-entropy ``-mean_b log softmax(z_b)[y_b]``.

  The task loss without a teacher: the FP teacher recipe and the
  "no distillation" ablation.

  Args:
    logits: shape ``(..., num_classes)``, any float dtype (math in float32).
    labels: integer class indices of shape ``logits.shape[:-1]``. A label
      outside ``[0, num_classes)`` makes the loss NaN (never wraps around),
      so the host's non-finite check catches bad data.

  Returns:
    Float32 scalar: the mean over the leading axes.

  Raises:
    ValueError: if ``labels`` is not integer or its shape does not match.
  """
  logits = jnp.asarray(logits, jnp.float32)
  labels = jnp.asarray(labels)
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(
        f"labels must be integer class indices, got dtype {labels.dtype}; "
        "for soft targets use soft_cross_entropy with teacher logits"
    )
  if logits.ndim < 1 or labels.shape != logits.shape[:-1]:
    raise ValueError(
        f"labels {labels.shape} must have the shape of logits {logits.shape} "
        "without the class axis"
    )
  num_classes = logits.shape[-1]
  log_p = jax.nn.log_softmax(logits, axis=-1)
  in_range = (labels >= 0) & (labels < num_classes)
  index = jnp.where(in_range, labels, 0)[..., None]
  label_log_p = jnp.take_along_axis(log_p, index, axis=-1)[..., 0]
  return -jnp.mean(jnp.where(in_range, label_log_p, jnp.nan))
