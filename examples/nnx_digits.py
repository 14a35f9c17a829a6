"""GDNSQ on a Flax NNX model: FP CNN -> W2A2 -> integer export, on the digits.

  python examples/nnx_digits.py                      # default budget (~minutes)
  python examples/nnx_digits.py --fp_steps 20 --steps 20 --eval_every 10  # smoke

An NNX CNN written with stock layers (``nnx.Conv``, ``nnx.BatchNorm``,
``nnx.Dropout``, ``nnx.Linear``) is trained in full precision on the 8,000
embedded MNIST digits (``train.input_pipeline``: 7,200 train / 800
validation / 2,000 test), quantized with GDNSQ
(:func:`gdnsq_jax.nnx_quantize.quantize_model`: stem and classifier stay FP),
calibrated to 10 bits, trained towards W2A2 by distillation from the FP model
(Jeffreys divergence) under the exterior-point penalty
(:func:`gdnsq_jax.gdnsq_optimizer` through ``nnx.Optimizer``), the best
converged validation checkpoint is kept, and it is exported as integers with
BatchNorm folded, verified against the fake-quant model on the test split
and lowered to StableHLO. Accuracies, widths and the verification are
printed (and written as JSON with ``--output``).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Optional, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import gdnsq_jax as gq
from gdnsq_jax import nnx_calibration
from gdnsq_jax import nnx_export
from gdnsq_jax import nnx_quantize
from gdnsq_jax.export import stablehlo
from gdnsq_jax.export import verification
from gdnsq_jax.nnx_quantizers import params_dict
from train import input_pipeline


class DigitsCNN(nnx.Module):
  """A plain CNN for the digits, written with stock NNX layers only.

  conv-BN-ReLU stem, three stages of two conv-BN-ReLU (16, 32, 64 channels,
  stride 2 into stages 2 and 3), global average pool, dropout, linear.
  """

  def __init__(self, rngs: nnx.Rngs, width: int = 16, classes: int = 10):
    conv = lambda i, o, s=1: nnx.Conv(i, o, (3, 3), strides=s,
                                      use_bias=False, rngs=rngs)
    norm = lambda c: nnx.BatchNorm(c, momentum=0.9, rngs=rngs)  # PyTorch's
    self.stem, self.stem_bn = conv(1, width), norm(width)
    self.convs, self.norms = nnx.List(), nnx.List()
    channels = width
    for stage in range(3):
      out = width * 2**stage
      for block in range(2):
        self.convs.append(conv(channels, out, 2 if stage and not block else 1))
        self.norms.append(norm(out))
        channels = out
    self.dropout = nnx.Dropout(0.1, rngs=rngs)
    self.classifier = nnx.Linear(channels, classes, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.stem_bn(self.stem(x)))
    for conv, norm in zip(self.convs, self.norms):
      x = nnx.relu(norm(conv(x)))
    return self.classifier(self.dropout(jnp.mean(x, axis=(1, 2))))


def _split(dataset, name: str) -> tuple[np.ndarray, np.ndarray]:
  split = dataset.split(name)
  images = input_pipeline.normalize(split.images, dataset.mean, dataset.std)
  return images, np.asarray(split.labels)


@nnx.jit
def logits_of(model, images):
  return model(images)


EVAL_BATCH = 400  # divides the validation (800) and test (2,000) splits: one
                 # compiled eval program per model


def _batches(images, batch: int = EVAL_BATCH):
  return [images[i:i + batch] for i in range(0, len(images), batch)]


def accuracy(model: nnx.Module, images, labels) -> float:
  """Eval-mode accuracy (the model is put in eval mode)."""
  model.eval()
  predictions = np.concatenate([np.argmax(logits_of(model, x), -1)
                                for x in _batches(images)])
  return float(np.mean(predictions == labels))


@nnx.jit
def fp_step(model, optimizer, images, labels):
  def loss_fn(model):
    logits = model(images)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, labels).mean()
  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def gdnsq_step(model, optimizer, teacher, images, converged):
  teacher_logits = jax.lax.stop_gradient(teacher(images))  # eval mode
  def loss_fn(model):
    return gq.distillation_loss(model(images), teacher_logits)
  loss, grads = nnx.value_and_grad(loss_fn)(model)
  grads = nnx_calibration.zero_frozen(grads)  # frozen quantizer params
  optimizer.update(model, grads, value=loss, converged=converged)
  return loss


def _widths(model, images):
  """True widths: weight codes, and activation codes over ``images``."""
  model.eval()
  widths = nnx_calibration.measure_activation_widths(model, _batches(images))
  return widths, gq.summarize_bitwidths(params_dict(model),
                                        activation_widths=widths)


def run(*, fp_steps: int = 500, steps: int = 1000, eval_every: int = 50,
        batch_size: int = 64, seed: int = 0, weight_bits: float = 2,
        activation_bits: float = 2, log=print) -> dict[str, Any]:
  """Trains, quantizes, trains with GDNSQ, exports; returns the results."""
  start = time.time()
  dataset = input_pipeline.load_dataset("digits")
  validation, test = _split(dataset, "validation"), _split(dataset, "test")
  stream = input_pipeline.train_batches(dataset, global_batch_size=batch_size,
                                        seed=seed, prefetch=0)

  # 1. The FP model (AdamW, warmup + cosine decay).
  model = DigitsCNN(nnx.Rngs(params=seed, dropout=seed + 1))
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, 3e-3, min(40, max(fp_steps // 10, 1)), max(fp_steps, 1))
  optimizer = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=1e-4),
                            wrt=nnx.Param)
  model.train()
  for _ in range(fp_steps):
    batch = next(stream)
    fp_step(model, optimizer, batch["image"], batch["label"])
  fp_accuracy = accuracy(model, *test)
  log(f"FP model: test accuracy {fp_accuracy:.4f} after {fp_steps} steps")

  # 2. Quantize (a copy: `model` stays the FP teacher) and calibrate.
  qmodel = nnx_quantize.quantize_model(
      model, test[0][:1], rngs=nnx.Rngs(quant_noise=seed),
      settings=gq.QuantSettings(weight_bits=weight_bits,
                                activation_bits=activation_bits))
  log(gq.format_quantization_report(nnx_quantize.quantization_report(qmodel)))
  qmodel.eval()
  train_images = input_pipeline.normalize(  # no augmentation (D9)
      dataset.train.images[:4 * EVAL_BATCH], dataset.mean, dataset.std)
  nnx_calibration.calibrate(qmodel, _batches(train_images))

  # 3. GDNSQ: distillation + penalty; keep the best converged model.
  tx = gq.gdnsq_optimizer(
      gq.differentiable_bitwidths, learning_rate=2.5e-2,
      weight_bits=weight_bits, activation_bits=activation_bits,
      warmup_steps=min(50, max(steps // 10, 1)), gamma=0.99)
  optimizer = nnx.Optimizer(qmodel, tx, wrt=nnx.Param)
  converged, best, history = False, None, []
  for step in range(1, steps + 1):
    qmodel.train()
    batch = next(stream)
    loss = gdnsq_step(qmodel, optimizer, model, batch["image"],
                      jnp.asarray(converged))
    if step % eval_every == 0 or step == steps:
      _, summary = _widths(qmodel, validation[0])
      converged = gq.is_converged(summary, weight_bits, activation_bits)
      val_accuracy = accuracy(qmodel, *validation)
      history.append((step, float(loss), val_accuracy, summary.weight_max,
                      summary.activation_max, converged))
      log(f"step {step}: loss {float(loss):.4f}, validation {val_accuracy:.4f}"
          f", W max {summary.weight_max:.3f}, A max "
          f"{summary.activation_max:.3f}, converged {converged}")
      if converged and (best is None or val_accuracy > best[1]):
        best = (step, val_accuracy, nnx.clone(nnx.state(qmodel)))
  stream.close()
  if best is not None:
    nnx.update(qmodel, best[2])

  # 4. Widths, accuracy, integer export verified on the test split.
  widths, summary = _widths(qmodel, np.concatenate([validation[0], test[0]]))
  converged = gq.is_converged(summary, weight_bits, activation_bits)
  q_accuracy = accuracy(qmodel, *test)
  export = nnx_export.export_model(
      qmodel, dataset.image_shape, fold_batch_norm=True,
      weight_bits=weight_bits, activation_bits=activation_bits,
      activation_widths=widths, force=not converged)
  integer_fn = jax.jit(lambda x: nnx_export.integer_apply(qmodel, export, x))
  layers_fn = jax.jit(lambda x: nnx_export.compare_layers(qmodel, export, x))
  images, labels = test
  integer = np.concatenate([integer_fn(x) for x in _batches(images)])
  qmodel.eval()
  fake = np.concatenate([logits_of(qmodel, x) for x in _batches(images)])
  check = verification.compare_logits(integer, fake)
  layer_error = max(max(float(e) for e in layers_fn(x).values())
                    for x in _batches(images))
  served = stablehlo.load_inference(stablehlo.serialize_inference(
      nnx_export.export_inference(qmodel, export)))
  stablehlo_error = float(np.max(np.abs(served(images[:EVAL_BATCH])
                                       - integer[:EVAL_BATCH])))
  results = {
      "fp_test_accuracy": fp_accuracy,
      "gdnsq_test_accuracy": q_accuracy,
      "integer_test_accuracy": float(np.mean(integer.argmax(-1) == labels)),
      "weight_bits_max": summary.weight_max,
      "activation_bits_max": summary.activation_max,
      "converged": converged,
      "best_step": best[0] if best else None,
      "argmax_agreement": check["argmax_agreement"],
      "max_layer_relative_error": layer_error,
      "stablehlo_max_abs_error": stablehlo_error,
      "export_bytes": export.manifest["totals"]["size_bytes"],
      "fp32_bytes": export.manifest["totals"]["fp32_size_bytes"],
      "fp_steps": fp_steps, "steps": steps, "history": history,
      "seconds": time.time() - start,
  }
  log(f"W{weight_bits}A{activation_bits}: test accuracy {q_accuracy:.4f} "
      f"(FP {fp_accuracy:.4f}), true widths W {summary.weight_max:.3f} A "
      f"{summary.activation_max:.3f}, converged {converged} (best step "
      f"{results['best_step']})")
  log(f"integer export: {results['export_bytes']:,} bytes vs "
      f"{results['fp32_bytes']:,} FP32; argmax agreement "
      f"{check['argmax_agreement']:.4f} on {check['count']} test images, "
      f"every layer within {layer_error:.1e}; StableHLO max |diff| "
      f"{stablehlo_error:.1e}; {results['seconds']:.0f} s in all")
  return results


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--fp_steps", type=int, default=500,
                      help="FP training steps")
  parser.add_argument("--steps", type=int, default=1000,
                      help="GDNSQ training steps")
  parser.add_argument("--eval_every", type=int, default=50,
                      help="validation / convergence check period")
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--output", default="", help="write results JSON here")
  args = parser.parse_args(argv)
  results = run(fp_steps=args.fp_steps, steps=args.steps,
                eval_every=args.eval_every, batch_size=args.batch_size,
                seed=args.seed)
  if args.output:
    with open(args.output, "w") as f:
      json.dump(results, f, indent=1)
  return results


if __name__ == "__main__":
  main()
