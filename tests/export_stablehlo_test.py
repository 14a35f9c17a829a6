"""Tests of gdnsq_jax.export.stablehlo: the serialized integer inference."""

from __future__ import annotations

from absl.testing import absltest
import jax
import numpy as np

from gdnsq_jax.export import exporter as export_lib
from gdnsq_jax.export import inference as integer_inference
from gdnsq_jax.export import stablehlo as export_stablehlo
from tests import export_setup


class StableHloTest(absltest.TestCase):

  def test_serialized_function_reloads_with_identical_outputs(self):
    model, _, _, x, _, _, export = export_setup.two_layer_setup()
    exported = export_stablehlo.export_inference(model, export)
    served = export_stablehlo.load_inference(
        export_stablehlo.serialize_inference(exported))
    direct = jax.jit(
        lambda x: integer_inference.integer_apply(model, export, x))
    for batch in (x, x[:3]):  # the batch size is symbolic
      np.testing.assert_array_equal(np.asarray(served(batch)),
                                    np.asarray(direct(batch)))

  def test_garbage_bytes_give_a_clear_error(self):
    with self.assertRaisesRegex(export_lib.ExportError,
                                "not a serialized jax.export"):
      export_stablehlo.load_inference(b"\x00not an export")


if __name__ == "__main__":
  absltest.main()
