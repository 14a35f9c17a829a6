"""Model selection and early stopping as data, gated by convergence.

GDNSQ selects the model with the best *converged* validation accuracy
(docs/method.md §8.3, D11): evaluations before the widths first reach
their targets never count, and losing convergence after reaching it counts
as an evaluation without improvement. :class:`EarlyStopping` holds that
rule's state as a pytree of arrays (in the style of
``flax.training.early_stopping.EarlyStopping``), so it is checkpointed with
the train state and a resumed run continues the same count::

  es = EarlyStopping.create(min_delta=1e-4, patience=50)
  es = es.update(accuracy, step, converged)
  if es.has_improved: ...  # save the best model
  if es.should_stop: ...
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike


@flax.struct.dataclass
class EarlyStopping:
  """Converged-gated best-metric tracking and patience (higher is better).

  Attributes:
    best_metric: best converged metric so far (``-inf``: none yet).
    best_step: step of ``best_metric`` (-1: no converged evaluation yet).
    patience_count: evaluations without improvement since ``best_step``.
    has_improved: whether the last :meth:`update` set a new best.
    should_stop: whether training should stop (patience exhausted).
    min_delta: smallest gain over ``best_metric`` that counts (static).
    patience: evaluations without improvement before stopping (static).
  """

  best_metric: jax.Array
  best_step: jax.Array
  patience_count: jax.Array
  has_improved: jax.Array
  should_stop: jax.Array
  min_delta: float = flax.struct.field(pytree_node=False, default=0.0)
  patience: int = flax.struct.field(pytree_node=False, default=0)

  @classmethod
  def create(cls, min_delta: float = 0.0, patience: int = 0
             ) -> "EarlyStopping":
    """The state before any evaluation.

    Args:
      min_delta: a converged metric must exceed the best by more than this.
      patience: stop once this many evaluations since the best brought no
        improvement.

    Returns:
      A state with no best yet (``best_step == -1``).
    """
    return cls(
        best_metric=jnp.asarray(-jnp.inf, jnp.float32),
        best_step=jnp.asarray(-1, jnp.int32),
        patience_count=jnp.asarray(0, jnp.int32),
        has_improved=jnp.asarray(False),
        should_stop=jnp.asarray(False),
        min_delta=float(min_delta), patience=int(patience))

  def update(self, metric: ArrayLike, step: ArrayLike,
             converged: ArrayLike) -> "EarlyStopping":
    """The state after one evaluation (pure; traceable under ``jax.jit``).

    Rules: a converged ``metric`` above ``best_metric + min_delta`` (the
    first converged one always) becomes the best and resets the count; any
    other converged evaluation, and an unconverged one once a best exists,
    adds one to the count; unconverged evaluations before that are ignored.
    ``should_stop`` once a best exists and the count reaches ``patience``.

    Args:
      metric: the evaluation's metric (validation accuracy).
      step: the step it was taken at.
      converged: whether the model met its width targets at that step.

    Returns:
      The new state; ``has_improved`` says whether ``metric`` is the new best.
    """
    metric = jnp.asarray(metric, jnp.float32)
    converged = jnp.asarray(converged, bool)
    has_best = self.best_step >= 0
    improved = converged & (
        ~has_best | (metric > self.best_metric + self.min_delta))
    counts = ~improved & (converged | has_best)
    best_step = jnp.where(improved, jnp.asarray(step, jnp.int32),
                          self.best_step)
    patience_count = jnp.where(improved, 0, self.patience_count + counts)
    return self.replace(
        best_metric=jnp.where(improved, metric, self.best_metric),
        best_step=best_step,
        patience_count=patience_count.astype(jnp.int32),
        has_improved=improved,
        should_stop=(best_step >= 0) & (patience_count >= self.patience))
