"""Where the time of one train step goes: a profiler trace, summarised.

Builds the steps of :mod:`bench.speed` (same models, data and configs),
prints the executed ops of each step's optimized HLO by part
(:func:`hlo_op_counts`: fusions, copies, ... -- about one kernel each on a
GPU), traces ``--steps`` calls of each with ``jax.profiler`` and prints, per
configuration, the device time by kernel (or by XLA op on a CPU) grouped by
the part of the model it belongs to (read from the optimized HLO's op_name
metadata: quantizer, teacher, optimizer, convolution, ...), then the top
kernels. Writes the perfetto traces and the optimized HLO text under
``--out``. Not a unit test.

  python -m bench.profile_step --model resnet20 --batch 1000 \\
      --configs fp-distill-xla,w2a2-xla --out /tmp/profile
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re

import jax

from bench import speed
from bench import step_configs
from train import host_memory


def _instruction_names(hlo_text: str) -> dict[str, str]:
  """HLO instruction / fusion name -> the op_name of its metadata."""
  names = {}
  for m in re.finditer(r"%?([\w.\-]+) = [^\n]*?op_name=\"([^\"]*)\"",
                       hlo_text):
    names.setdefault(m.group(1), m.group(2))
  # Fusion computations: the called computation's root carries the metadata.
  for m in re.finditer(r"%?([\w.\-]+) = [^\n]*calls=%?([\w.\-]+)", hlo_text):
    if m.group(1) not in names:
      body = re.search(re.escape(m.group(2)) + r" [^{]*\{(.*?)\n\}",
                       hlo_text, re.S)
      if body:
        op = re.search(r"op_name=\"([^\"]*)\"", body.group(1))
        if op:
          names[m.group(1)] = op.group(1)
  return names


def _part(op_name: str) -> str:
  """The part of a train step an XLA op belongs to, from its op_name."""
  if op_name.startswith("command_buffer"):  # CUDA graph of several kernels
    return "command buffers (several parts; not attributed)"
  if "fold_in" in op_name:  # flax make_rng: a threefry fold-in per key
    return "dither keys (fold_in)"
  if ("threefry" in op_name or "random_bits" in op_name
      or "iota_2x32_shape" in op_name or "/while/" in op_name):
    return "dither random bits"
  model = re.search(r"(transpose\(jvp\(|jvp\()?([A-Z]\w*)\)*/(.*)",
                    op_name)
  if not model:
    return "optimizer, penalty, loss, metrics"
  direction, rest = model.group(1), model.group(3)
  if not direction:
    return "teacher forward"
  pass_ = "backward" if direction.startswith("transpose") else "forward"
  if "input_quantizer" in rest:
    part = "activation quantizer"
  elif "conv_general_dilated" in rest or "dot_general" in rest:
    part = "conv / dense"
  elif re.search(r"(^|/)(\w*bn\w*|batch_norm)(/|$)", rest):
    part = "batchnorm"
  elif re.search(r"conv\d*/", rest) and "shortcut" not in rest:
    part = "weight quantizer"
  else:
    part = "other layers"
  return f"student {part} ({pass_})"


_COMPUTATION = re.compile(r"^(ENTRY )?%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}$",
                          re.S | re.M)
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT )?%?([\w.\-]+) = .*? ([a-z][\w\-]*)\((.*)$")
_NOT_EXECUTED = frozenset({
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast",
    "after-all", "call", "while", "conditional"})
"""Opcodes that launch no work themselves (``call`` / ``while`` /
``conditional`` bodies are counted instead)."""


def hlo_op_counts(hlo_text: str) -> collections.Counter:
  """Executed ops of an optimized HLO module, by (part, opcode).

  Counts every instruction of the entry computation and of the computations
  it runs (``call``, ``while`` body and condition, ``conditional``
  branches, recursively) except those in :data:`_NOT_EXECUTED`: fusions,
  copies, convolutions, custom calls, ... -- on a GPU roughly one kernel
  each. A ``while`` body counts once, whatever its trip count. The part is
  read from the op's ``op_name`` metadata as in :func:`summarize_trace`.
  """
  bodies, entry = {}, None
  for m in _COMPUTATION.finditer(hlo_text):
    bodies[m.group(2)] = m.group(3)
    if m.group(1):
      entry = m.group(2)
  names = _instruction_names(hlo_text)
  counts = collections.Counter()
  pending, seen = [entry], set()
  while pending:
    computation = pending.pop()
    if computation in seen or computation not in bodies:
      continue
    seen.add(computation)
    for line in bodies[computation].split("\n"):
      m = _INSTRUCTION.match(line)
      if not m:
        continue
      name, opcode, rest = m.groups()
      if opcode in ("call", "while", "conditional"):
        pending += re.findall(
            r"(?:to_apply|condition|body|true_computation|false_computation)"
            r"=%?([\w.\-]+)", rest)
        for branches in re.findall(r"branch_computations=\{([^}]*)\}", rest):
          pending += [b.strip().lstrip("%") for b in branches.split(",")]
      if opcode not in _NOT_EXECUTED:
        counts[(_part(names.get(name, "")), opcode)] += 1
  return counts


def format_op_counts(counts: collections.Counter) -> list[str]:
  """Lines of a table of :func:`hlo_op_counts`: ops per part, by opcode."""
  parts = collections.defaultdict(collections.Counter)
  for (part, opcode), n in counts.items():
    parts[part]["fusion" if opcode == "fusion" else
                "copy" if opcode == "copy" else "other"] += n
  lines = [f"{'part':<44} {'ops':>5} {'fusion':>6} {'copy':>5} {'other':>5}"]
  for part, c in sorted(parts.items(), key=lambda kv: -sum(kv[1].values())):
    lines.append(f"{part:<44} {sum(c.values()):>5} {c['fusion']:>6} "
                 f"{c['copy']:>5} {c['other']:>5}")
  total = collections.Counter()
  for c in parts.values():
    total.update(c)
  lines.append(f"{'total executed HLO ops':<44} {sum(total.values()):>5} "
               f"{total['fusion']:>6} {total['copy']:>5} {total['other']:>5}")
  return lines


def summarize_trace(path: str, hlo_text: str, steps: int, top: int = 25):
  """Lines of a table: device time per part of the step and top kernels."""
  with gzip.open(path, "rt") as f:
    events = json.load(f)
  events = events.get("traceEvents", events)
  pids = {e["pid"]: e["args"]["name"] for e in events
          if e.get("ph") == "M" and e.get("name") == "process_name"}
  device = [p for p, n in pids.items() if "/device:" in n and "GPU" in n
            or "TPU" in n]
  names = _instruction_names(hlo_text)
  by_kernel = collections.defaultdict(lambda: [0.0, 0])
  for e in events:
    if e.get("ph") != "X" or "dur" not in e:
      continue
    if device and e["pid"] not in device:
      continue
    # The HLO instruction a kernel ran for (cuDNN kernels included).
    name = e.get("args", {}).get("hlo_op") or e["name"]
    if not device and name not in names:
      continue  # CPU: keep XLA ops of the step only
    k = by_kernel[name]
    k[0] += e["dur"] / steps
    k[1] += 1
  total = sum(v[0] for v in by_kernel.values())
  launches = sum(v[1] for v in by_kernel.values()) / steps
  by_part = collections.Counter()
  for name, (dur, _) in by_kernel.items():
    base = re.sub(r"(_\d+)?$", "", name)
    by_part[_part(names.get(name, names.get(base, name)))] += dur
  lines = [f"{'part':<44} {'us/step':>9} {'share':>6}"]
  for part, dur in by_part.most_common():
    lines.append(f"{part:<44} {dur:>9.0f} {dur / max(total, 1e-9):>6.1%}")
  lines.append(f"{'total (' + format(launches, '.0f') + ' kernels per step)':<44} "
               f"{total:>9.0f}")
  lines.append("")
  lines.append(f"{'kernel':<40} {'us/step':>8} {'calls':>6}  op_name")
  ranked = sorted(by_kernel.items(), key=lambda kv: -kv[1][0])[:top]
  for name, (dur, calls) in ranked:
    op = names.get(name, "")
    lines.append(f"{name[:40]:<40} {dur:>8.0f} {calls // steps:>6}  "
                 f"{op[-90:]}")
  return lines


def main(argv=None) -> None:
  kept = host_memory.keep_freed_memory()  # as train.main does
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="resnet20",
                      choices=tuple(step_configs.IMAGE_SHAPES))
  parser.add_argument("--configs", default="fp-distill-xla,w2a2-xla",
                      type=lambda s: speed.comma_separated_names(
                          s, tuple(step_configs.CONFIGS)))
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--out", default="runs/profile")
  parser.add_argument("--no-trace", action="store_true",
                      help="only count the HLO ops (no profiler trace)")
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  variables, batch = step_configs.random_inputs(args.model, args.batch)
  print(f"backend {jax.default_backend()}, {jax.devices()[0].device_kind}, "
        f"freed host memory kept: {kept}; {args.model}, batch {args.batch}, "
        f"{args.steps} traced steps", flush=True)
  for name in args.configs:
    run = step_configs.StepRun(
        step_configs.build_step(name, args.model, variables, batch))
    hlo = run.compiled_text()
    with open(os.path.join(args.out, f"{name}.hlo.txt"), "w") as f:
      f.write(hlo)
    print(f"\n== {name}: executed HLO ops by part", flush=True)
    print("\n".join(format_op_counts(hlo_op_counts(hlo))), flush=True)
    if args.no_trace:
      continue
    for _ in range(3):
      run()
    trace_dir = os.path.join(args.out, f"trace_{name}")
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for _ in range(args.steps):
        run()
    path = sorted(glob.glob(os.path.join(trace_dir, "**",
                                         "perfetto_trace.json.gz"),
                            recursive=True))[-1]
    print(f"\n== {name} ({path})", flush=True)
    print("\n".join(summarize_trace(path, hlo, args.steps)), flush=True)


if __name__ == "__main__":
  main()
