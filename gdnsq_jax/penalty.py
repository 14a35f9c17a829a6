"""GDNSQ's exterior-point bit-width penalty and full optimizer, as optax.

Reference: S. Salishev, I. Akhremchik, "GDNSQ: Gradual Differentiable Noise
Scale Quantization for Low-bit Neural Networks", arXiv 2508.14004
(docs/method.md §7.1, §7.3, §8.1, §8.2). The objective
``L_task + t * Lbar * (a_w P_w + a_a P_a)`` is optimized by adding the
penalty's gradient to the task gradient inside the optimizer, so the schedule
(step, ``t``, running loss ``Lbar``, LR factor) lives in the optimizer state
and is checkpointed (docs/method.md D16).
flax's ``TrainState.apply_gradients`` drops extra arguments; call::

  updates, opt_state = tx.update(grads, opt_state, params,
                                 value=task_loss, converged=converged)

A non-finite ``value`` enters the running loss sum as is, so ``Lbar``
(logged as ``penalty/mean_task_loss``) and every later update become
non-finite and the host's non-finite check stops the run; nothing is skipped
silently. The learning-rate rule lives in :mod:`gdnsq_jax.learning_rate`;
:func:`gdnsq_optimizer` chains it after the penalty and RAdam.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.flatten_util
import jax.numpy as jnp
import optax

from gdnsq_jax.argument_checks import check
from gdnsq_jax.argument_checks import check_steps
from gdnsq_jax.argument_checks import is_real
from gdnsq_jax.bitwidths import FLOAT_BITS
from gdnsq_jax.bitwidths import is_float
from gdnsq_jax.learning_rate import AnnealedLearningRateState
from gdnsq_jax.learning_rate import scale_by_annealed_learning_rate

__all__ = [
    "BitwidthPenalty",
    "ExteriorPointPenaltyState",
    "bitwidth_penalty",
    "exterior_point_penalty",
    "gdnsq_optimizer",
    "in_raveled_space",
    "schedule_metrics",
]

BitwidthFn = Callable[[Any], tuple[jax.Array, jax.Array]]


def _validate_penalty_args(weight_bits, activation_bits, epsilon, power):
  check("weight_bits", weight_bits, is_real(weight_bits) and weight_bits > 0,
         "a number > 0", "Pass the target weight bit-width, e.g. 2.")
  check("activation_bits", activation_bits,
        is_real(activation_bits) and activation_bits > 0, "a number > 0",
        f"Pass {FLOAT_BITS} (FLOAT_BITS) to leave activations unconstrained.")
  check("epsilon", epsilon, is_real(epsilon) and epsilon > 0, "a number > 0",
         "The reference uses 1e-3.")
  check("power", power, is_real(power) and power >= 1, "a number >= 1",
         "The reference uses 1 (hinge); below 1 the penalty has no gradient "
         "at the constraint boundary.")


class BitwidthPenalty(NamedTuple):
  """Terms of the exterior-point penalty (docs/method.md §7.3)."""

  value: jax.Array  # a_w * P_w + a_a * P_a
  weight_penalty: jax.Array  # P_w, mean hinge over weight channels
  activation_penalty: jax.Array  # P_a, mean hinge over activation quantizers
  active_weight_constraints: jax.Array  # n_w, int32, positive hinge terms
  active_activation_constraints: jax.Array  # n_a, int32
  weight_multiplier: jax.Array  # a_w = (n_w + eps) / (n_w + n_a + eps)
  activation_multiplier: jax.Array  # a_a = (n_a + eps) / (n_w + n_a + eps)


def _mean_hinge(widths: jax.Array, bits: float, epsilon: float,
                power: float) -> tuple[jax.Array, jax.Array]:
  """``mean(max(0, beta - (B - eps))^p)`` and the count of positive terms."""
  widths = jnp.ravel(jnp.asarray(widths, jnp.float32))
  excess = widths - (bits - epsilon)
  violated = excess > 0
  # jnp.where (not jnp.maximum) gives exactly zero gradient on the boundary.
  terms = jnp.where(violated, excess, 0.0)
  if power != 1:
    terms = terms**power
  mean = jnp.sum(terms) / max(terms.size, 1)  # an empty vector gives 0
  return mean, jnp.sum(violated, dtype=jnp.int32)


def bitwidth_penalty(
    weight_widths: jax.typing.ArrayLike,
    activation_widths: jax.typing.ArrayLike,
    *,
    weight_bits: float,
    activation_bits: float,
    epsilon: float = 1e-3,
    power: float = 1.0,
) -> BitwidthPenalty:
  """The exterior-point penalty ``a_w P_w + a_a P_a`` (arXiv 2508.14004).

  ``P_w = mean_c max(0, beta_w,c - (B_w - eps))^p`` over every weight
  channel, ``P_a`` likewise over activation quantizers; ``a_w = (n_w + eps) /
  (n_w + n_a + eps)`` and ``a_a = (n_a + eps) / (n_w + n_a + eps)`` carry no
  gradient (docs/method.md §7.3).

  Args:
    weight_widths: differentiable weight widths ``beta_w``, any shape.
    activation_widths: differentiable activation widths ``beta_a``.
    weight_bits: target ``B_w``.
    activation_bits: target ``B_a``; ``>= FLOAT_BITS`` (32) leaves activations
      unconstrained (``P_a = n_a = 0``; docs/method.md D12).
    epsilon: margin ``eps``; ``beta <= B - eps`` guarantees true width
      ``<= B`` (docs/method.md §2.3). Also smooths the multipliers.
    power: exponent ``p`` (1 in the reference).

  Returns:
    A :class:`BitwidthPenalty`; empty width vectors contribute 0.

  Raises:
    ValueError: for a non-positive target, ``epsilon <= 0`` or ``power < 1``.
  """
  _validate_penalty_args(weight_bits, activation_bits, epsilon, power)
  weight_penalty, n_w = _mean_hinge(weight_widths, weight_bits, epsilon,
                                    power)
  if not is_float(activation_bits):
    activation_penalty, n_a = _mean_hinge(activation_widths, activation_bits,
                                          epsilon, power)
  else:
    activation_penalty, n_a = jnp.float32(0), jnp.int32(0)
  total = (n_w + n_a).astype(jnp.float32) + epsilon
  a_w = jax.lax.stop_gradient((n_w.astype(jnp.float32) + epsilon) / total)
  a_a = jax.lax.stop_gradient((n_a.astype(jnp.float32) + epsilon) / total)
  return BitwidthPenalty(
      value=a_w * weight_penalty + a_a * activation_penalty,
      weight_penalty=weight_penalty,
      activation_penalty=activation_penalty,
      active_weight_constraints=n_w,
      active_activation_constraints=n_a,
      weight_multiplier=a_w,
      activation_multiplier=a_a,
  )


class ExteriorPointPenaltyState(NamedTuple):
  """Schedule state of :func:`exterior_point_penalty`; all scalar arrays.

  ``count`` and ``loss_sum`` run over the completed steps; the other fields
  are the values used at the last step (``k`` = steps completed before it).
  """

  count: jax.Array  # int32, completed optimizer steps
  loss_sum: jax.Array  # sum of the task losses of the completed steps
  penalty_weight: jax.Array  # t = t_increment * max(0, k - warmup_steps)
  mean_task_loss: jax.Array  # Lbar = loss_sum / (k + 1); 0 at the first step
  penalty: jax.Array  # a_w P_w + a_a P_a
  weighted_penalty: jax.Array  # t * Lbar * (a_w P_w + a_a P_a)
  active_weight_constraints: jax.Array  # n_w, int32
  active_activation_constraints: jax.Array  # n_a, int32
  max_weight_width: jax.Array  # max differentiable weight width (0: none)
  max_activation_width: jax.Array  # max differentiable activation width


def _max_or_zero(widths: jax.Array) -> jax.Array:
  widths = jnp.ravel(jnp.asarray(widths, jnp.float32))
  return jnp.max(widths) if widths.size else jnp.float32(0)


def exterior_point_penalty(
    bitwidth_fn: BitwidthFn,
    *,
    weight_bits: float,
    activation_bits: float,
    warmup_steps: int,
    t_increment: float,
    epsilon: float = 1e-3,
    power: float = 1.0,
) -> optax.GradientTransformationExtraArgs:
  """Adds the gradient of GDNSQ's gradual exterior-point penalty to updates.

  At step ``k + 1`` (``k`` steps completed) the transformation adds
  ``t * Lbar * grad_params(a_w P_w + a_a P_a)`` (see :func:`bitwidth_penalty`)
  to the updates, with ``t = t_increment * max(0, k - warmup_steps)`` and
  ``Lbar = (sum of the k previous task losses) / (k + 1)`` (arXiv 2508.14004;
  docs/method.md §7.3, §8.1). Chain it before the base optimizer.
  ``update(updates, state, params, *, value, **extra_args)`` needs ``params``
  and ``value``, the scalar task loss of this step.

  Args:
    bitwidth_fn: ``params -> (weight_widths, activation_widths)``, e.g.
      :func:`gdnsq_jax.differentiable_bitwidths`.
    weight_bits: target weight bit-width ``B_w``.
    activation_bits: target activation bit-width ``B_a``; None or >= 32
      leaves activations unconstrained (W1A32, docs/method.md D12).
    warmup_steps: steps ``W`` with ``t = 0``.
    t_increment: growth of ``t`` per step after the warmup (the reference
      uses ``2 * learning_rate``).
    epsilon: margin ``eps`` and multiplier smoothing (1e-3 in the reference).
    power: hinge exponent ``p`` (1 in the reference).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose state is an
    :class:`ExteriorPointPenaltyState`.

  Raises:
    ValueError: for invalid hyper-parameters (eagerly), or at trace time
      when ``params`` or ``value`` is missing or ``value`` is not a scalar.
  """
  _validate_penalty_args(weight_bits, activation_bits, epsilon, power)
  check_steps("warmup_steps", warmup_steps)
  check("t_increment", t_increment, is_real(t_increment)
         and t_increment >= 0, "a number >= 0",
         "The reference uses 2 * learning_rate.")

  def penalty_value(params):
    weight_widths, activation_widths = bitwidth_fn(params)
    terms = bitwidth_penalty(
        weight_widths, activation_widths, weight_bits=weight_bits,
        activation_bits=activation_bits, epsilon=epsilon, power=power)
    maxima = jax.lax.stop_gradient(
        (_max_or_zero(weight_widths), _max_or_zero(activation_widths)))
    return terms.value, (terms, maxima)

  def init_fn(params):
    del params
    zero, no_steps = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)
    return ExteriorPointPenaltyState(
        no_steps, zero, zero, zero, zero, zero, no_steps, no_steps, zero,
        zero)

  def update_fn(updates, state, params=None, *, value=None, **extra_args):
    del extra_args
    if params is None or value is None:
      raise ValueError(
          "exterior_point_penalty needs the params and the task loss: call "
          "tx.update(grads, opt_state, params, value=task_loss) (flax's "
          "TrainState.apply_gradients drops extra arguments).")
    value = jnp.asarray(value, jnp.float32)
    if value.shape:
      raise ValueError(
          f"value must be the scalar task loss; got shape {value.shape}. "
          "Reduce it (e.g. mean over the batch) before tx.update.")
    completed = state.count
    t = t_increment * jnp.maximum(completed - warmup_steps, 0).astype(
        jnp.float32)
    lbar = state.loss_sum / (completed + 1).astype(jnp.float32)
    scale = t * lbar
    (penalty, (terms, maxima)), grads = jax.value_and_grad(
        penalty_value, has_aux=True)(params)
    updates = jax.tree.map(
        lambda u, g: None if u is None else u + (scale * g).astype(u.dtype),
        updates, grads, is_leaf=lambda x: x is None)
    new_state = ExteriorPointPenaltyState(
        count=optax.safe_increment(completed),
        loss_sum=state.loss_sum + value,
        penalty_weight=t,
        mean_task_loss=lbar,
        penalty=penalty,
        weighted_penalty=scale * penalty,
        active_weight_constraints=terms.active_weight_constraints,
        active_activation_constraints=terms.active_activation_constraints,
        max_weight_width=maxima[0],
        max_activation_width=maxima[1])
    return updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def gdnsq_optimizer(
    bitwidth_fn: BitwidthFn,
    *,
    learning_rate: float,
    weight_bits: float,
    activation_bits: float,
    warmup_steps: int,
    gamma: float,
    t_increment: Optional[float] = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    threshold: float = 5.0,
    flatten: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """GDNSQ's optimizer: penalty, RAdam, annealed LR (docs/method.md §8.2).

  ``optax.chain(exterior_point_penalty(...), optax.scale_by_radam(...),
  scale_by_annealed_learning_rate(...))`` with one warmup for ``t`` and the
  LR and the reference hinge (``p = 1``, ``eps = 1e-3``; chain the parts
  yourself to change them). ``update`` needs ``params``, ``value=`` and
  optionally ``converged=``.

  Args:
    bitwidth_fn: ``params -> (weight_widths, activation_widths)``.
    learning_rate: peak learning rate ``eta0``.
    weight_bits: target weight bit-width.
    activation_bits: target activation bit-width; ``>= FLOAT_BITS`` (32) leaves
      activations unconstrained.
    warmup_steps: warmup length in optimizer steps.
    gamma: learning-rate decay per converged post-warmup step.
    t_increment: growth of the penalty weight per step after the warmup;
      ``2 * learning_rate`` when None (docs/method.md §8.1, ``kappa = 2``).
    b1: RAdam first-moment decay.
    b2: RAdam second-moment decay.
    eps: RAdam denominator epsilon (not the bit margin).
    threshold: RAdam rectification threshold.
    flatten: run the whole chain on all params raveled into one vector
      (:func:`in_raveled_space`; the penalty reads its widths from the
      unraveled view): the same values, computed by a few large kernels
      instead of a few per param; quantizers add four scalar params per
      layer, and on a GPU their per-param kernels cost more launch time
      than work. The state is the same as ``optax.flatten``'s of the RAdam
      and learning-rate part (checkpoints of either load).

  Returns:
    The chained :class:`optax.GradientTransformationExtraArgs`.

  Raises:
    ValueError: for invalid hyper-parameters.
  """
  learning_rate_rule = scale_by_annealed_learning_rate(
      learning_rate, warmup_steps=warmup_steps, gamma=gamma)
  if t_increment is None:
    t_increment = 2.0 * learning_rate
  elementwise = optax.chain(
      optax.scale_by_radam(b1=b1, b2=b2, eps=eps, threshold=threshold),
      learning_rate_rule,
  )

  def chain(widths_fn):
    return optax.chain(
        exterior_point_penalty(
            widths_fn, weight_bits=weight_bits,
            activation_bits=activation_bits, warmup_steps=warmup_steps,
            t_increment=t_increment),
        elementwise,
    )

  if not flatten:
    return chain(bitwidth_fn)
  return in_raveled_space(
      lambda unravel: chain(lambda flat: bitwidth_fn(unravel(flat))))


def in_raveled_space(
    make_inner: Callable[[Callable[[jax.Array], Any]],
                         optax.GradientTransformationExtraArgs],
) -> optax.GradientTransformationExtraArgs:
  """Runs a transformation on the params and updates raveled into one vector.

  Like ``optax.flatten``, but the inner transformation is built per call by
  ``make_inner(unravel)``, where ``unravel`` maps the vector back to the
  params tree, so a part that reads the tree (the bit-width penalty) works
  on the vector too: its gradient arrives raveled and is added there, and
  the updates are unraveled once at the end. Raveling follows
  ``jax.flatten_util.ravel_pytree`` (leaf order of ``jax.tree.flatten``, as
  ``optax.flatten``), so the state equals ``optax.flatten``'s.

  Args:
    make_inner: ``unravel -> transformation`` on raveled vectors.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` on params trees.
  """

  def init_fn(params):
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    return make_inner(unravel).init(flat)

  def update_fn(updates, state, params=None, **extra_args):
    flat_updates, unravel = jax.flatten_util.ravel_pytree(updates)
    flat_params = (None if params is None
                   else jax.flatten_util.ravel_pytree(params)[0])
    inner = optax.with_extra_args_support(make_inner(unravel))
    flat_updates, state = inner.update(flat_updates, state, flat_params,
                                       **extra_args)
    return unravel(flat_updates), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def schedule_metrics(opt_state: Any) -> dict[str, jax.Array]:
  """Flat dict of the schedule scalars found in an optimizer state.

  Finds an :class:`ExteriorPointPenaltyState` and/or an
  :class:`AnnealedLearningRateState` anywhere in ``opt_state`` (e.g. an
  ``optax.chain`` state) with :func:`optax.tree_utils.tree_get`; works inside
  ``jit``. Values describe the last completed step.

  Args:
    opt_state: an optimizer state holding at most one of each.

  Returns:
    ``penalty/{value, weighted, t, mean_task_loss, active_weight_constraints,
    active_activation_constraints, max_weight_width, max_activation_width}`` and ``optimizer/{learning_rate,
    lr_factor}`` for the states present.

  Raises:
    ValueError: when neither state is present.
    KeyError: when one of them appears more than once.
  """
  metrics = {}
  penalty = optax.tree_utils.tree_get(
      opt_state, ExteriorPointPenaltyState.__name__)
  if penalty is not None:
    metrics.update({
        "penalty/value": penalty.penalty,
        "penalty/weighted": penalty.weighted_penalty,
        "penalty/t": penalty.penalty_weight,
        "penalty/mean_task_loss": penalty.mean_task_loss,
        "penalty/active_weight_constraints":
            penalty.active_weight_constraints,
        "penalty/active_activation_constraints":
            penalty.active_activation_constraints,
        "penalty/max_weight_width": penalty.max_weight_width,
        "penalty/max_activation_width": penalty.max_activation_width,
    })
  learning_rate = optax.tree_utils.tree_get(
      opt_state, AnnealedLearningRateState.__name__)
  if learning_rate is not None:
    metrics.update({
        "optimizer/learning_rate": learning_rate.learning_rate,
        "optimizer/lr_factor": learning_rate.lr_factor,
    })
  if not metrics:
    raise ValueError(
        "opt_state holds no ExteriorPointPenaltyState or "
        "AnnealedLearningRateState; build it with gdnsq_optimizer(...).")
  return metrics
