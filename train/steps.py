"""The train state and the pure train / eval steps (jitted by their callers).

One ``train_step(state, batch, teacher_variables)``: the teacher is an
argument, evaluated under ``stop_gradient`` and never donated or stored in
the state, so it is neither differentiated nor checkpointed with the student.
The dither key of step ``k`` is ``fold_in(state.rng, k)``, so a resumed run
draws the same noise as an uninterrupted one.

:func:`train.loop.compile_train_step` jits the train step with its shardings
(GDNSQ and the FP teacher); :func:`train.loop.fit` and
:func:`train.teacher.evaluate_fp` jit the eval step.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import optax

from gdnsq_jax import losses
from gdnsq_jax import penalty
from gdnsq_jax.layers import NOISE_RNG
from gdnsq_jax.layers import QUANT_STATS

LABELS = "labels"  # config.distill.loss value: train on labels, no teacher.


@flax.struct.dataclass
class TrainState:
  """Everything a step changes; checkpointed whole (docs/method.md D16).

  Attributes:
    step: completed optimizer steps.
    params: model params (quantizer params included).
    batch_stats: BatchNorm running statistics.
    opt_state: optimizer state (penalty t / running loss, LR factor, RAdam).
    trainable: bool pytree like ``params``; False leaves get no update
      (frozen quantizers, a frozen clamp).
    rng: raw PRNG key data; step ``k`` uses ``fold_in(rng, k)``.
    converged: whether the last evaluation met the target widths.
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  trainable: Any
  rng: jax.Array
  converged: jax.Array


def create_state(variables, tx, trainable, rng) -> TrainState:
  params = variables["params"]
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=variables.get("batch_stats", {}),
      opt_state=tx.init(params),
      trainable=trainable,
      rng=jnp.asarray(rng, jnp.uint32),
      converged=jnp.zeros((), bool),
  )


def make_task_loss(name: str, temperature: float) -> Callable[..., jax.Array]:
  """``(logits, teacher_logits, labels) -> scalar`` for a config name."""
  if name == LABELS:
    return lambda logits, teacher_logits, labels: losses.cross_entropy_loss(
        logits, labels)
  fn = losses.get_distillation_loss(name)
  return lambda logits, teacher_logits, labels: fn(
      logits, teacher_logits, temperature=temperature)


TEACHER_DTYPES = ("auto", "float32", "bfloat16")
"""``config.teacher.dtype`` values: the teacher forward's computation dtype."""


def teacher_compute_dtype(name: str, backend: Optional[str] = None):
  """The dtype of a ``config.teacher.dtype`` value on ``backend``.

  ``'auto'`` is bfloat16 on accelerators (GPU / TPU: half the teacher's
  memory traffic, tensor-core convolutions) and float32 on a CPU, where
  bfloat16 convolutions are emulated and slower (docs/results.md).

  Raises:
    ValueError: for a name outside :data:`TEACHER_DTYPES`.
  """
  if name not in TEACHER_DTYPES:
    raise ValueError(
        f"teacher.dtype={name!r}; choose one of {', '.join(TEACHER_DTYPES)}")
  if name == "auto":
    name = ("float32" if (backend or jax.default_backend()) == "cpu"
            else "bfloat16")
  return jnp.dtype(name)


def _with_compute_dtype(model: Any, dtype) -> Any:
  """``model`` computing in ``dtype`` (params stay as they are)."""
  if dtype == jnp.float32:
    return model
  if "dtype" not in getattr(model, "__dataclass_fields__", {}):
    raise ValueError(
        f"teacher.dtype={dtype.name!r} needs a teacher with a Flax-style "
        f"'dtype' (computation dtype) attribute; {type(model).__name__} has "
        "none. Use teacher.dtype='float32'.")
  return model.clone(dtype=dtype)


def make_train_step(
    model: Any,
    tx: optax.GradientTransformationExtraArgs,
    task_loss: Callable[..., jax.Array],
    teacher_model: Optional[Any] = None,
    quantized: bool = True,
    teacher_dtype: str = "float32",
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
  """Builds ``train_step(state, batch, teacher_variables)``.

  Args:
    model: object with a Flax-style ``apply`` (a Linen module or a
      :class:`gdnsq_jax.interception.QuantizedModel`).
    tx: optimizer whose ``update`` accepts ``value=`` and ``converged=``.
    task_loss: from :func:`make_task_loss`.
    teacher_model: FP model applied to ``teacher_variables`` (None: labels).
    quantized: add bit-width metrics and pass the quantizer noise stream.
    teacher_dtype: computation dtype of the teacher forward, one of
      :data:`TEACHER_DTYPES` (:func:`teacher_compute_dtype`); its logits
      reach the divergence in float32.

  Returns:
    The pure step; metrics are a flat dict of scalars.
  """
  teacher = None
  if teacher_model is not None:
    teacher = _with_compute_dtype(teacher_model,
                                  teacher_compute_dtype(teacher_dtype))

  def train_step(state: TrainState, batch, teacher_variables):
    images, labels = batch["image"], batch["label"]
    teacher_logits = None
    if teacher is not None:
      teacher_logits = jax.lax.stop_gradient(teacher.apply(
          teacher_variables, images, train=False)).astype(jnp.float32)
    rngs = {NOISE_RNG: jax.random.fold_in(state.rng, state.step)}

    def loss_fn(params):
      logits, new_vars = model.apply(
          {"params": params, "batch_stats": state.batch_stats},
          images, train=True, rngs=rngs, mutable=["batch_stats"])
      loss = task_loss(logits, teacher_logits, labels)
      return loss, (logits, new_vars["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    # Masking, the gradient norm and the update run on all params raveled
    # into one vector (a few kernels, not a few per param); the optimizer
    # sees trees (gdnsq_optimizer(flatten=True) ravels them again, which XLA
    # folds away) and the new params are unraveled once.
    flat_params, unravel = ravel_pytree(state.params)
    flat_trainable = ravel_pytree(jax.tree.map(
        lambda p, m: jnp.broadcast_to(m, jnp.shape(p)), state.params,
        state.trainable))[0]
    flat_grads = jnp.where(flat_trainable, ravel_pytree(grads)[0], 0.0)
    updates, opt_state = tx.update(
        unravel(flat_grads), state.opt_state, state.params, value=loss,
        converged=state.converged)
    flat_updates = jnp.where(flat_trainable, ravel_pytree(updates)[0], 0.0)
    params = unravel(flat_params + flat_updates)
    metrics = {
        "train/loss": loss,
        "train/accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
        "train/grad_norm": jnp.sqrt(jnp.sum(jnp.square(flat_grads))),
    }
    # Includes the largest differentiable widths, as the penalty saw them.
    metrics.update(penalty.schedule_metrics(opt_state)
                   if quantized else {})
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats,
        opt_state=opt_state)
    return new_state, metrics

  return train_step


def make_eval_step(model: Any, quantized: bool = True):
  """Builds ``eval_step(variables, batch) -> sums`` (deterministic rounding).

  Returns per-batch sums (correct predictions, label cross-entropy, count)
  and, for quantized models, the min / max integer code of every activation
  quantizer (masked rows excluded by the caller's padding: padded rows are
  zeros, which lie inside the calibrated range of the normalised inputs,
  hence the codes of padded rows are excluded explicitly below).
  """

  def eval_step(variables, batch):
    images, labels, mask = batch["image"], batch["label"], batch["mask"]
    if quantized:
      logits, stats = model.apply(variables, images, train=False,
                                  mutable=[QUANT_STATS])
    else:
      logits, stats = model.apply(variables, images, train=False), {}
    m = mask.astype(jnp.float32)
    ce = jax.vmap(losses.cross_entropy_loss)(logits, labels)
    out = {
        "correct": jnp.sum((jnp.argmax(logits, -1) == labels) * m),
        "loss": jnp.sum(ce * m),
        "count": jnp.sum(m),
    }
    return out, stats.get(QUANT_STATS, {})

  return eval_step
