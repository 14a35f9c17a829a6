"""Tests of gdnsq_jax.export.inference: the integer network equals fake-quant eval.
"""

from __future__ import annotations

import functools

from absl.testing import absltest
from absl.testing import parameterized
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gdnsq_jax import calibration
from gdnsq_jax import interception
from gdnsq_jax import layers
from gdnsq_jax.export import exporter as export_lib
from gdnsq_jax.export import inference as integer_inference
from gdnsq_jax.export import stablehlo as export_stablehlo
from gdnsq_jax.export import verification as export_verification
from tests import export_setup
from tests import layer_setup
from train import models

EVAL = export_setup.EVAL


@functools.lru_cache(maxsize=None)
def _resnet20(bits: int):
  """ResNet-20 on 8x8 inputs, random FP variables, calibrated to ``bits``."""
  model = models.ResNet20(num_classes=10)
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
  settings = layers.QuantSettings(weight_bits=bits, activation_bits=bits,
                                  calibration_bits=bits)
  qmodel = interception.quantize_model(
      model, jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32),
      settings=settings, train=False)
  rng = np.random.default_rng(bits)

  def draw(path, leaf):
    name = path[-1].key
    if name == "var":
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    center = 1.0 if name == "scale" else 0.0
    return rng.normal(center, 0.3, leaf.shape).astype(np.float32)

  shapes = jax.eval_shape(lambda: qmodel.init(jax.random.key(0), x, **EVAL))
  fp = jax.tree_util.tree_map_with_path(
      draw, jax.eval_shape(lambda: model.init(jax.random.key(0), x, **EVAL)))
  variables = interception.add_quantizer_params(fp, shapes)
  variables = calibration.calibrate(qmodel, variables, [x], bits=bits,
                                    apply_kwargs=EVAL).variables
  reference = jax.jit(lambda v, x: qmodel.apply(v, x, **EVAL))(variables, x)
  return model, qmodel, variables, x, np.asarray(reference)


class ResNetIntegerInferenceTest(parameterized.TestCase):

  @parameterized.parameters((2, False), (1, True))
  def test_equals_fake_quant_eval(self, bits, fold):
    model, qmodel, variables, x, reference = _resnet20(bits)
    export = export_lib.export_model(
        qmodel, variables, (8, 8, 3), apply_kwargs=EVAL, fold_batch_norm=fold,
        weight_bits=bits, activation_bits=bits)
    for e in export.layers:
      if e["quantized"]:
        self.assertEqual((e["weight_bits"], e["activation_bits"]), (bits, bits))
    folded = [e["batch_norm"] for e in export.layers if e["batch_norm"]]
    self.assertLen(folded, 21 if fold else 0)  # every conv has its BatchNorm
    kept = [k for k in export.arrays if k.startswith("variables/")]
    self.assertEqual(kept == [], fold)
    logits = jax.jit(
        lambda x: integer_inference.integer_apply(model, export, x))(x)
    agreement = export_verification.compare_logits(logits, reference)
    self.assertLess(agreement["max_relative_error"], 1e-4)
    self.assertEqual(agreement["argmax_agreement"], 1.0)
    if fold:  # each layer on the fake-quant input, against conv + BN
      layer_errors = jax.jit(lambda v, x: export_verification.compare_layers(
          qmodel, v, export, x))(variables, x)
      self.assertLen(layer_errors, 22)  # every conv and the classifier
      self.assertLess(max(map(float, layer_errors.values())), 1e-5)


def _export_calibrated(model, x, **bits):
  """``model`` with stem and classifier quantized, calibrated on x, exported."""
  settings = layers.QuantSettings(calibration_bits=3, **bits)
  qmodel = interception.quantize_model(
      model, x, settings=settings, train=False,
      rules={"quantize_stem": True, "quantize_classifier": True})
  variables = qmodel.init(jax.random.key(0), x, train=False)
  variables = calibration.calibrate(qmodel, variables, [x],
                                    apply_kwargs=EVAL).variables
  export = export_lib.export_model(qmodel, variables, x.shape[1:],
                                   apply_kwargs=EVAL)
  return qmodel, variables, export


def _assert_integer_equals_fake_quant(model, qmodel, variables, export, x):
  reference = qmodel.apply(variables, x, **EVAL)
  logits = jax.jit(
      lambda x: integer_inference.integer_apply(model, export, x))(x)
  scale = float(jnp.abs(reference).max())
  chex.assert_trees_all_close(logits, reference, atol=1e-5 * scale)


class OddGeometryNet(nn.Module):
  """Grouped strided SAME, circular dilated, input-dilated padded convs."""

  @nn.compact
  def __call__(self, x, train=False):
    del train
    x = nn.Conv(4, (3, 3), strides=2, padding="SAME", feature_group_count=2,
                name="grouped")(x)
    x = nn.Conv(6, (3, 2), padding="CIRCULAR", kernel_dilation=(2, 1),
                name="circular")(nn.relu(x))
    x = nn.Conv(3, (2, 2), padding=((1, 0), (0, 1)), input_dilation=2,
                name="dilated")(x)
    return nn.Dense(3, name="dense")(x.reshape((x.shape[0], -1)))


class GeometryTest(parameterized.TestCase):

  @parameterized.parameters(
      dict(per_channel=False, weight_bits=3, activation_bits=3),
      dict(per_channel=True, weight_bits=3, activation_bits=32),  # float x
      dict(per_channel=True, weight_bits=32, activation_bits=3))  # float W
  def test_integer_inference_equals_fake_quant(self, **bits):
    model = OddGeometryNet()
    x = jax.random.normal(jax.random.key(5), (3, 7, 7, 2))
    qmodel, variables, export = _export_calibrated(model, x, **bits)
    _assert_integer_equals_fake_quant(model, qmodel, variables, export, x)
    quantized_widths = [(e["weight_bits"], e["activation_bits"])
                        for e in export.layers]
    self.assertEqual(quantized_widths, [(
        min(bits["weight_bits"], 32), min(bits["activation_bits"], 32))] * 4)


class DenseLikeNet(nn.Module):
  """Depthwise conv, DenseGeneral over two axes, einsums with a leading and a
  trailing output channel axis."""

  @nn.compact
  def __call__(self, x, train=False):
    del train
    x = nn.Conv(4, (3, 3), feature_group_count=2, name="depthwise")(x)
    x = x.reshape((x.shape[0], -1, 4))                        # (b, t, 4)
    x = nn.DenseGeneral((2, 3), name="heads")(nn.relu(x))     # (b, t, 2, 3)
    x = nn.Einsum((3, 5), "btnh,hd->btnd", name="mix")(x)     # (b, t, 2, 5)
    x = nn.DenseGeneral(6, axis=(-2, -1), name="merge")(x)    # (b, t, 6)
    return nn.Einsum((4, 6), "btd,cd->bc", name="head")(x)    # (b, 4)


class DenseLikeTest(parameterized.TestCase):

  @parameterized.parameters(
      dict(per_channel=True, weight_bits=3, activation_bits=3),
      dict(per_channel=False, weight_bits=3, activation_bits=3),
      dict(per_channel=True, weight_bits=3, activation_bits=32),  # float x
      dict(per_channel=True, weight_bits=32, activation_bits=3))  # float W
  def test_integer_inference_equals_fake_quant(self, **bits):
    model = DenseLikeNet()
    x = jax.random.normal(jax.random.key(6), (3, 4, 4, 2))
    qmodel, variables, export = _export_calibrated(model, x, **bits)
    self.assertEqual([e["kind"] for e in export.layers],
                     ["conv", "dense_general", "einsum", "dense_general",
                      "einsum"])
    if bits["per_channel"] and bits["weight_bits"] < 32:
      steps = [export.layer_arrays(e["path"])["weight_step"].shape
               for e in export.layers]
      self.assertEqual(steps, [(4,), (2, 3), (5,), (6,), (4, 1)])
    _assert_integer_equals_fake_quant(model, qmodel, variables, export, x)
    errors = export_verification.compare_layers(qmodel, variables, export, x)
    self.assertLen(errors, 5)
    self.assertLess(max(map(float, errors.values())), 1e-5)


class AnyLinenModelExportTest(parameterized.TestCase):
  """The ViT (attention projections) and the MobileNetV2 (depthwise)."""

  @parameterized.named_parameters(
      ("vit", layer_setup.TinyViT, (8, 8, 1), False),
      ("mobilenet", layer_setup.TinyMobileNet, (8, 8, 3), True))
  def test_integer_inference_agrees_with_fake_quant(self, make, shape, fold):
    model = make()
    x = jax.random.normal(jax.random.key(7), (256,) + shape)
    qmodel = interception.quantize_model(
        model, x[:1], settings=layers.QuantSettings(
            weight_bits=4, activation_bits=4, calibration_bits=4),
        rules={"quantize_1x1": True}, train=False)
    fp = layer_setup.random_variables(model.init, x[:1], train=False)
    variables = interception.add_quantizer_params(
        fp, jax.eval_shape(lambda x: qmodel.init(jax.random.key(0), x,
                                                 train=False), x[:1]))
    variables = calibration.calibrate(qmodel, variables, [x[:64]],
                                      apply_kwargs=EVAL).variables
    export = export_lib.export_model(qmodel, variables, shape,
                                     apply_kwargs=EVAL, fold_batch_norm=fold,
                                     weight_bits=4, activation_bits=4)
    self.assertEqual({e["path"] for e in export.layers if e["quantized"]},
                     set(qmodel.quantized_paths))
    reference = jax.jit(lambda v, x: qmodel.apply(v, x, **EVAL))(variables, x)
    exported = export_stablehlo.export_inference(model, export)
    logits = exported.call(x)
    agreement = export_verification.compare_logits(logits, reference)
    self.assertGreaterEqual(agreement["argmax_agreement"], 0.999)
    errors = jax.jit(lambda v, x: export_verification.compare_layers(
        qmodel, v, export, x))(variables, x[:16])
    self.assertLen(errors, len(export.layers))
    self.assertLess(max(map(float, errors.values())), 1e-4)


if __name__ == "__main__":
  absltest.main()
