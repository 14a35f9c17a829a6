"""GDNSQ's learning-rate rule (TemperatureScale), as an optax transformation.

Reference: S. Salishev, I. Akhremchik, "GDNSQ: Gradual Differentiable Noise
Scale Quantization for Low-bit Neural Networks", arXiv 2508.14004
(docs/method.md §8.1). The learning rate warms up linearly, then anneals by
``gamma`` on every step the host reports as converged; its state (step, LR
factor, last learning rate) lives in the optimizer state and is checkpointed
(docs/method.md D16). ``converged`` arrives as an extra argument of
``update``::

  updates, opt_state = tx.update(grads, opt_state, params,
                                 converged=converged)

:func:`gdnsq_jax.penalty.gdnsq_optimizer` chains it after the penalty and
RAdam. The hyper-parameter checks here are shared with
:mod:`gdnsq_jax.penalty`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from gdnsq_jax.argument_checks import check
from gdnsq_jax.argument_checks import check_steps
from gdnsq_jax.argument_checks import is_real

__all__ = [
    "AnnealedLearningRateState",
    "scale_by_annealed_learning_rate",
]


class AnnealedLearningRateState(NamedTuple):
  """State of :func:`scale_by_annealed_learning_rate`; all scalar arrays."""

  count: jax.Array  # int32, completed optimizer steps
  lr_factor: jax.Array  # lambda, the annealing factor (starts at 1)
  learning_rate: jax.Array  # the learning rate used at the last step


def scale_by_annealed_learning_rate(
    learning_rate: float,
    *,
    warmup_steps: int,
    gamma: float,
) -> optax.GradientTransformationExtraArgs:
  """Scales updates by ``-lr``: linear warmup, then anneal while converged.

  GDNSQ's TemperatureScale rule (arXiv 2508.14004; docs/method.md §8.1). At
  step ``k + 1`` (``k`` steps completed) with ``eta0 = learning_rate``:

  * ``k <= W``: ``lr = eta0 * k / W`` (the first step runs at 0; ``W = 0``
    gives ``eta0``);
  * ``k > W``: ``lambda <- lambda * (gamma if converged else 1)`` and
    ``lr = eta0 * lambda``; the decay pauses while convergence is lost.

  ``converged`` is an extra argument of ``update`` (bool scalar; False when
  absent). Put this last in the chain, after ``optax.scale_by_radam()``.

  Args:
    learning_rate: peak learning rate ``eta0``.
    warmup_steps: warmup length ``W`` in optimizer steps.
    gamma: decay factor per converged post-warmup step, in ``(0, 1]``.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose state is an
    :class:`AnnealedLearningRateState`.

  Raises:
    ValueError: for invalid hyper-parameters, or at trace time for a
      non-scalar ``converged``.
  """
  check("learning_rate", learning_rate, is_real(learning_rate)
         and learning_rate > 0, "a number > 0",
         "The CIFAR reference configs use 2e-3.")
  check_steps("warmup_steps", warmup_steps)
  check("gamma", gamma, is_real(gamma) and 0 < gamma <= 1, "in (0, 1]",
         "The reference uses 0.9985 per step; 1 disables the annealing.")

  def init_fn(params):
    del params
    return AnnealedLearningRateState(
        jnp.zeros((), jnp.int32), jnp.ones((), jnp.float32),
        jnp.zeros((), jnp.float32))

  def update_fn(updates, state, params=None, *, converged=False, **extra_args):
    del params, extra_args
    converged = jnp.asarray(converged, jnp.bool_)
    if converged.shape:
      raise ValueError(
          f"converged must be a scalar bool; got shape {converged.shape}.")
    completed = state.count
    in_warmup = completed <= warmup_steps
    decay = jnp.where(converged & ~in_warmup, jnp.float32(gamma), 1.0)
    lr_factor = state.lr_factor * decay
    if warmup_steps > 0:
      warmup_lr = learning_rate * completed.astype(jnp.float32) / warmup_steps
    else:
      warmup_lr = jnp.float32(learning_rate)
    lr = jnp.where(in_warmup, warmup_lr, learning_rate * lr_factor).astype(
        jnp.float32)
    updates = jax.tree.map(
        lambda u: None if u is None else (-lr).astype(u.dtype) * u,
        updates, is_leaf=lambda x: x is None)
    new_state = AnnealedLearningRateState(
        count=optax.safe_increment(completed), lr_factor=lr_factor,
        learning_rate=lr)
    return updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
