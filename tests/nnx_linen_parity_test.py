"""One architecture in Linen and in NNX: same FP params and dither key, same GDNSQ.

Calibration, eval logits, bit-widths, dithered gradients and one
``gdnsq_optimizer`` update agree within 1e-6 (docs/method.md §2, §4, §6, §8.2).
"""

from __future__ import annotations

from absl.testing import absltest
import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from gdnsq_jax import bitwidths
from gdnsq_jax import calibration
from gdnsq_jax import dither
from gdnsq_jax import interception
from gdnsq_jax import nnx_calibration
from gdnsq_jax import nnx_quantize
from gdnsq_jax import penalty
from gdnsq_jax.nnx_quantizers import linen_variables
from gdnsq_jax.settings import QuantSettings
from tests import nnx_setup

_SETTINGS = QuantSettings(weight_bits=2, activation_bits=2)
_TOL = dict(rtol=1e-6, atol=1e-6)


def _pure(state) -> dict:
  return jax.tree.map(np.asarray, nnx.to_pure_dict(state))


class LinenParityTest(chex.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.x = nnx_setup.normal((8, 8, 8, 3), seed=1)
    cls.batches = [nnx_setup.normal((16, 8, 8, 3), seed=s) for s in (2, 3)]
    fp = nnx_setup.nnx_cnn(seed=0)
    nnx_setup.warm_batch_stats(fp, cls.batches[0])
    fp_variables = linen_variables(fp)
    # Linen: quantize_model, FP variables loaded, calibrated to 10 bits.
    cls.linen = interception.quantize_model(
        nnx_setup.LinenCNN(), cls.x, train=False, settings=_SETTINGS)
    shapes = jax.eval_shape(
        lambda x: cls.linen.init(jax.random.key(0), x, train=False), cls.x)
    variables = interception.add_quantizer_params(fp_variables, shapes)
    cls.linen_variables = calibration.calibrate(
        cls.linen, variables, cls.batches,
        apply_kwargs={"train": False}).variables
    # NNX: the same, on the NNX model itself.
    cls.model = nnx_quantize.quantize_model(fp, cls.x, settings=_SETTINGS)
    cls.model.eval()
    nnx_calibration.calibrate(cls.model, cls.batches)

  def test_calibrated_params_are_identical(self):
    chex.assert_trees_all_close(linen_variables(self.model),
                                self.linen_variables, **_TOL)

  def test_eval_logits_and_widths(self):
    self.model.eval()
    chex.assert_trees_all_close(
        self.model(self.x),
        self.linen.apply(self.linen_variables, self.x, train=False), **_TOL)
    params = linen_variables(self.model)["params"]
    chex.assert_trees_all_close(
        bitwidths.differentiable_bitwidths(params),
        bitwidths.differentiable_bitwidths(self.linen_variables), **_TOL)
    self.assertEqual(
        bitwidths.summarize_bitwidths(params),
        bitwidths.summarize_bitwidths(self.linen_variables))

  def test_dither_ids_are_the_linen_ones(self):
    self.assertEqual(dither.quantizer_id(("body", "input_quantizer")),
                     dither.quantizer_id(("body", "input_quantizer"), 1))
    self.assertNotEqual(dither.quantizer_id(("body",)),
                        dither.quantizer_id(("body",), 2))

  def test_gradients_and_one_optimizer_update(self):
    model = nnx.clone(self.model)
    model.train()
    # The NNX model's first draw: fold_in(key(0), count=0) of nnx.Rngs(0).
    step_key = jax.random.fold_in(jax.random.key(0), 0)
    v = self.linen_variables

    def linen_loss(params):
      logits, _ = self.linen.apply(
          {"params": params, "batch_stats": v["batch_stats"]}, self.x,
          train=True, mutable=["batch_stats"],
          rngs={"quant_noise": step_key})
      return jnp.mean(jax.nn.log_softmax(logits)[:, 0])

    loss, linen_grads = jax.value_and_grad(linen_loss)(v["params"])
    nnx_loss, grads = nnx.value_and_grad(
        lambda m: jnp.mean(jax.nn.log_softmax(m(self.x))[:, 0]))(model)
    np.testing.assert_allclose(nnx_loss, loss, **_TOL)
    chex.assert_trees_all_close(_pure(grads), linen_grads, **_TOL)
    # The dither moved the step gradients (a key was drawn and used).
    self.assertEqual(int(model.quant_noise.count[...]), 1)

    tx = penalty.gdnsq_optimizer(
        bitwidths.differentiable_bitwidths, learning_rate=1e-3,
        weight_bits=2, activation_bits=2, warmup_steps=0, gamma=0.99,
        t_increment=1.0)
    opt_state = tx.init(v["params"])
    for _ in range(2):  # the second update runs with t > 0 (penalty on)
      linen_updates, opt_state = tx.update(
          linen_grads, opt_state, v["params"], value=loss,
          converged=jnp.array(False))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    before = _pure(nnx.state(model, nnx.Param))
    for _ in range(2):
      nnx.update(model, before)
      updates = optimizer.update(model, grads, value=nnx_loss,
                                 converged=jnp.array(False))
    chex.assert_trees_all_close(_pure(updates), linen_updates, **_TOL)
    self.assertGreater(float(jnp.abs(linen_updates["body"]["log2_step"]).max()),
                       0.0)


if __name__ == "__main__":
  absltest.main()
