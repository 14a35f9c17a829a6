"""Tests of bench/profile_step.py's trace summary (synthetic trace, no JAX)."""

from __future__ import annotations

import gzip
import json
import os

from absl.testing import absltest

from bench import profile_step

_HLO = """
ENTRY %main {
  %fusion.1 = f32[8] fusion(%p), kind=kLoop, calls=%fused_1, metadata={op_name="jit(train_step)/transpose(jvp(ResNet20))/stage1_block1/conv1/input_quantizer/mul"}
  %cudnn-conv.2 = f32[8] custom-call(%p), metadata={op_name="jit(train_step)/jvp(ResNet20)/stage1_block1/conv1/conv1/conv_general_dilated"}
  %fusion.3 = f32[8] fusion(%p), kind=kLoop, calls=%fused_3, metadata={op_name="jit(train_step)/ResNet20/stage1_block1/bn1/sub"}
  %fusion.4 = f32[8] fusion(%p), kind=kLoop, calls=%fused_4, metadata={op_name="jit(train_step)/add"}
}
"""


class PartTest(absltest.TestCase):

  def test_parts_from_op_names(self):
    part = profile_step._part  # pylint: disable=protected-access
    self.assertEqual(part("jit(train_step)/ResNet20/stage1_block1/conv1/"
                          "conv_general_dilated"), "teacher forward")
    self.assertEqual(
        part("jit(train_step)/transpose(jvp(ResNet20))/stage2_block1/conv1/"
             "input_quantizer/reduce"),
        "student activation quantizer (backward)")
    self.assertEqual(
        part("jit(train_step)/jvp(ResNet20)/stage1_block1/conv1/reduce_min"),
        "student weight quantizer (forward)")
    self.assertEqual(part("jit(train_step)/jvp(ResNet20)/stage1_block1/bn1/"
                          "sub"), "student batchnorm (forward)")
    self.assertEqual(part("jit(train_step)/add"),
                     "optimizer, penalty, loss, metrics")
    self.assertEqual(part("jit(_threefry_split)/threefry2x32"),
                     "dither random bits")
    self.assertEqual(
        part("jit(train_step)/jvp(ResNet20)/stage1_block1/conv1/"
             "jit(_threefry_fold_in)/train_step/while"),
        "dither keys (fold_in)")


_HLO_WITH_LOOPS = """
%fused_1 (p: f32[8]) -> f32[8] {
  ROOT %m = f32[8] multiply(%p, %p), metadata={op_name="jit(train_step)/mul"}
}

%body (t: (s32[], u32[2])) -> (s32[], u32[2]) {
  %t = (s32[], u32[2]) parameter(0)
  %fusion.7 = u32[2] fusion(%t), kind=kLoop, calls=%fused_1, metadata={op_name="jit(train_step)/jvp(ResNet20)/conv1/jit(_threefry_fold_in)/while/body/add"}
  ROOT %tuple.1 = (s32[], u32[2]) tuple(%t, %fusion.7)
}

%cond (t: (s32[], u32[2])) -> pred[] {
  %t = (s32[], u32[2]) parameter(0)
  ROOT %lt = pred[] fusion(%t), kind=kLoop, calls=%fused_1, metadata={op_name="jit(train_step)/jvp(ResNet20)/conv1/jit(_threefry_fold_in)/while/cond/lt"}
}

%loop (t: (s32[], u32[2])) -> (s32[], u32[2]) {
  %t = (s32[], u32[2]) parameter(0)
  ROOT %while.1 = (s32[], u32[2]) while(%t), condition=%cond, body=%body
}

ENTRY %main (p: f32[8]) -> f32[8] {
  %p = f32[8] parameter(0)
  %c = s32[] constant(0)
  %call = (s32[], u32[2]) call(%p), to_apply=%loop
  %fusion.1 = f32[8] fusion(%p), kind=kLoop, calls=%fused_1, metadata={op_name="jit(train_step)/transpose(jvp(ResNet20))/stage1_block1/conv1/input_quantizer/mul"}
  %copy.2 = f32[8] copy(%p)
  ROOT %fusion.4 = f32[8] fusion(%copy.2), kind=kLoop, calls=%fused_1, metadata={op_name="jit(train_step)/add"}
}
"""


class OpCountTest(absltest.TestCase):

  def test_counts_entry_and_loop_bodies_not_fused_computations(self):
    counts = profile_step.hlo_op_counts(_HLO_WITH_LOOPS)
    self.assertEqual(dict(counts), {
        ("student activation quantizer (backward)", "fusion"): 1,
        ("optimizer, penalty, loss, metrics", "copy"): 1,
        ("optimizer, penalty, loss, metrics", "fusion"): 1,
        ("dither keys (fold_in)", "fusion"): 2,  # while body and condition
    })
    text = "\n".join(profile_step.format_op_counts(counts))
    self.assertRegex(text, r"dither keys \(fold_in\)\s+2\s+2\s+0\s+0")
    self.assertRegex(text, r"total executed HLO ops\s+5\s+4\s+1\s+0")


class SummaryTest(absltest.TestCase):

  def test_device_kernels_are_summed_per_step_by_part(self):
    events = [
        {"ph": "M", "pid": 1, "name": "process_name",
         "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "pid": 2, "name": "process_name",
         "args": {"name": "/host:CPU"}},
    ]
    for _ in range(2):  # two traced steps
      events += [
          {"ph": "X", "pid": 1, "name": "loop_mul_fusion", "dur": 30.0,
           "args": {"hlo_op": "fusion.1"}},
          {"ph": "X", "pid": 1, "name": "sm90_xmma_fprop", "dur": 50.0,
           "args": {"hlo_op": "cudnn-conv.2"}},
          {"ph": "X", "pid": 1, "name": "loop_sub_fusion", "dur": 20.0,
           "args": {"hlo_op": "fusion.3"}},
          {"ph": "X", "pid": 2, "name": "host work", "dur": 999.0},
      ]
    path = os.path.join(self.create_tempdir().full_path, "t.json.gz")
    with gzip.open(path, "wt") as f:
      json.dump({"traceEvents": events}, f)
    lines = profile_step.summarize_trace(path, _HLO, steps=2)
    text = "\n".join(lines)
    self.assertRegex(text, r"student conv / dense \(forward\)\s+50\s+50.0%")
    self.assertRegex(
        text, r"student activation quantizer \(backward\)\s+30\s+30.0%")
    self.assertRegex(text, r"teacher forward\s+20\s+20.0%")
    self.assertRegex(text, r"total \(3 kernels per step\)\s+100")
    self.assertNotIn("999", text)  # host events are not device time


if __name__ == "__main__":
  absltest.main()
