"""Input pipeline throughput: the loader alone, the loop vs the bare step.

Prints three tables:

* ``loader``: images/s of ``train.input_pipeline.train_batches`` (grain,
  host numpy batches of augmented uint8 images: the host's share of the
  loop, which normalises on the devices) for the embedded digits (batch 64, zero-pad
  shift), CIFAR-shaped in-memory data (45,000 random 32x32x3, batch 1000,
  reflect-pad crop + flip) and ImageNet-shaped JPEGs (synthetic 500x375,
  about 80 KB each, written once by this script into an ArrayRecord file;
  batch 64, RandomResizedCrop 224 + flip) at 0, 1 and 2 worker processes.
  ``cpu/img`` is the CPU time per image of the process that does the work
  (the main process at 0 workers, the workers otherwise): on a shared CPU it
  is steadier than the wall clock; ``1/cpu`` is the rate one idle core would
  give.
* ``loop``: images/s of the program's loop (``train.loop.run_steps``:
  batches from the pipeline, the compiled GDNSQ W2A2 step, metrics read
  every ``--log-every`` steps, no evaluation) over images/s of the same
  loop on four batches already on the devices (the bare step), for the
  digits model and ResNet-20 on CIFAR-shaped data;
  ``host`` is the grain pipeline with device prefetch, ``device`` the train
  set kept on the devices (``train.device_data``).
* ``overlap``: a stand-in step of fixed duration (a sleep: an accelerator
  busy while the host is free) fed by the ImageNet-shaped pipeline; with
  prefetch the loop takes about max(step, host) per step, without it the
  sum.

Run from the repository root::

  python -m bench.input_pipeline                      # all parts
  python -m bench.input_pipeline --parts loop --models resnet20 --batch 1000
"""

from __future__ import annotations

import argparse
import io
import itertools
import multiprocessing
import os
import statistics
import time
from typing import Any

from absl import flags
import jax
import numpy as np

from bench import speed
from bench import step_configs
from configs import w2a2
from train import data_sources
from train import device_data
from train import input_pipeline
from train import loop
from train import models
from train import sharding

PARTS = ("loader", "loop", "overlap")
JPEG_SHAPE = (375, 500)  # ImageNet's typical height x width.


def synthetic_jpeg(rng: np.random.Generator, noise: np.ndarray) -> bytes:
  """A smooth random 500x375 JPEG (quality 90) with photo-like noise."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
  image = np.asarray(Image.fromarray(small).resize(JPEG_SHAPE[::-1],
                                                   Image.BICUBIC), np.int16)
  dy, dx = rng.integers(0, 64, 2)
  image = image + noise[dy:dy + JPEG_SHAPE[0], dx:dx + JPEG_SHAPE[1]]
  out = io.BytesIO()
  Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(out, "JPEG",
                                                           quality=90)
  return out.getvalue()


def write_jpeg_records(path: str, count: int, seed: int = 0) -> str:
  """Writes ``count`` synthetic JPEGs (2-byte label + bytes) to ArrayRecord.

  An existing file with ``count`` records is reused.
  """
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  import grain  # pylint: disable=g-import-not-at-top

  if os.path.exists(path) and len(
      grain.sources.ArrayRecordDataSource(path)) == count:
    return path
  rng = np.random.default_rng(seed)
  noise = rng.normal(0, 10, (JPEG_SHAPE[0] + 64, JPEG_SHAPE[1] + 64, 3))
  noise = noise.round().astype(np.int16)
  writer = array_record_module.ArrayRecordWriter(path + ".tmp", "group_size:1")
  for i in range(count):
    label = int(rng.integers(0, 1000)).to_bytes(2, "little")
    writer.write(label + synthetic_jpeg(rng, noise))
  writer.close()
  os.replace(path + ".tmp", path)
  return path


class JpegRecords:
  """Random-access source of ``{'image': JPEG bytes, 'label': int}``."""

  def __init__(self, path: str):
    import grain  # pylint: disable=g-import-not-at-top

    self._records = grain.sources.ArrayRecordDataSource(path)

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = self._records[index]
    return {"image": record[2:], "label": int.from_bytes(record[:2], "little")}


def imagenet_shaped(path: str, image_size: int = 224) -> data_sources.Dataset:
  """A :class:`Dataset` whose train split reads ``path`` lazily (as ImageNet)."""
  source = JpegRecords(path)
  split = data_sources.LazySplit(source, np.arange(len(source)))
  return data_sources.Dataset(
      "imagenet-shaped", split, split.subset(np.arange(0)),
      split.subset(np.arange(0)), 1000, (image_size, image_size, 3),
      data_sources.IMAGENET_MEAN, data_sources.IMAGENET_STD,
      "random_resized_crop")


def cifar_shaped(count: int = 45_000) -> data_sources.Dataset:
  """Random uint8 32x32x3 images held in memory, CIFAR's augmentation."""
  rng = np.random.default_rng(0)
  split = data_sources.ArraySplit(
      rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8),
      rng.integers(0, 10, count).astype(np.int32))
  empty = data_sources.ArraySplit(split.images[:0], split.labels[:0])
  return data_sources.Dataset(
      "cifar-shaped", split, empty, empty, 10, (32, 32, 3),
      data_sources.CIFAR10_MEAN, data_sources.CIFAR10_STD, "crop_flip")


def _cpu_seconds(pids) -> float:
  """User + system CPU seconds of processes ``pids`` (Linux /proc)."""
  total = 0
  for pid in pids:
    try:
      with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
      total += int(fields[11]) + int(fields[12])
    except OSError:
      pass
  return total / os.sysconf("SC_CLK_TCK")


def loader_rate(dataset, batch_size: int, workers: int,
                batches: int) -> dict[str, float]:
  """Steady-state images/s of the host pipeline and CPU s per image.

  The first batches (worker start-up and the buffers it filled) are not
  timed.
  """
  it = input_pipeline.train_batches(dataset, global_batch_size=batch_size,
                                    seed=0, workers=workers,
                                    normalized=False)
  try:
    for _ in range(3 + 4 * workers):  # start-up, buffers
      next(it)
    pids = ([p.pid for p in multiprocessing.active_children()] if workers
            else [os.getpid()])
    cpu, wall = _cpu_seconds(pids), time.perf_counter()
    for _ in range(batches):
      next(it)
    wall, cpu = time.perf_counter() - wall, _cpu_seconds(pids) - cpu
  finally:
    it.close()
  images = batches * batch_size
  return {"images_per_s": images / wall, "cpu_per_image_s": cpu / images}


def loader_table(args) -> str:
  jpeg = imagenet_shaped(write_jpeg_records(args.jpeg_path, args.jpegs))
  sources = [("digits", input_pipeline.load_dataset("digits"), 64, 40),
             ("cifar-shaped", cifar_shaped(), 1000, 10),
             ("imagenet-shaped jpeg", jpeg, 64, args.jpeg_batches)]
  lines = [f"{'source':<22} {'batch':>5} {'workers':>7} {'img/s':>8} "
           f"{'img/s/worker':>12} {'cpu/img ms':>10} {'1/cpu img/s':>11}"]
  for name, dataset, batch, count in sources:
    for workers in args.workers:
      rates = [loader_rate(dataset, batch, workers, count)
               for _ in range(args.repeats)]
      rate = statistics.median(r["images_per_s"] for r in rates)
      cpu = statistics.median(r["cpu_per_image_s"] for r in rates)
      per_worker = f"{rate / workers:.0f}" if workers else "-"
      lines.append(f"{name:<22} {batch:>5} {workers:>7} {rate:>8.0f} "
                   f"{per_worker:>12} {cpu * 1e3:>10.3f} {1 / cpu:>11.0f}")
      print(lines[-1], flush=True)
  return "\n".join(lines)


def _w2a2_loop_state(model_name: str, batch_size: int, mesh):
  """(compiled W2A2 train step, loop state, teacher variables) on ``mesh``.

  The W2A2 step of ``bench.step_configs`` (the program's GDNSQ step with the
  ``configs/w2a2.py`` settings), compiled as the program compiles it
  (``train.loop.compile_train_step``: shardings, donation).
  """
  variables, batch = step_configs.random_inputs(model_name, batch_size)
  config = w2a2.get_config(step_configs.W2A2_PRESETS[model_name])
  model = models.get_model(model_name, 10)
  step = step_configs.make_gdnsq_step(model, variables, batch, config)
  # Fresh buffers: the state's FP params and the teacher share arrays, and
  # the step donates the state.
  return (loop.compile_train_step(step.step_fn, mesh),
          sharding.replicate(
              jax.device_get(loop.LoopState.initial(step.state)), mesh),
          sharding.replicate(jax.device_get(step.teacher_variables), mesh))


def _run(train_step, loop_state, teacher, batches, steps: int, mesh,
         log_every: int):
  """Seconds of ``steps`` iterations of the program's loop, and its state.

  ``train.loop.run_steps``: the step, a host read of the metrics and the
  non-finite check every ``log_every`` steps; no evaluation.
  """
  start_step = int(jax.device_get(loop_state.train.step))
  start = time.perf_counter()
  loop_state, _ = loop.run_steps(
      train_step, loop_state, batches, teacher, mesh=mesh,
      num_steps=start_step + steps, log_every=(log_every,),
      log=lambda step, metrics: None, fix="")
  jax.block_until_ready(loop_state)
  return time.perf_counter() - start, loop_state


def loop_table(args) -> str:
  mesh = sharding.make_mesh()
  lines = [f"{'model':<14} {'batch':>5} {'data':<7} {'bare img/s':>10} "
           f"{'loop img/s':>10} {'efficiency':>10}"]
  for model_name in args.models:
    batch = args.batch or (64 if model_name == "digits_resnet" else 1000)
    dataset = (input_pipeline.load_dataset("digits")
               if model_name == "digits_resnet" else cifar_shaped())
    step, state, teacher = _w2a2_loop_state(model_name, batch, mesh)
    with input_pipeline.train_batches(dataset, global_batch_size=batch,
                                      mesh=mesh) as it:
      placed = [next(it) for _ in range(4)]
    streams = {
        "host": lambda: input_pipeline.train_batches(
            dataset, global_batch_size=batch, mesh=mesh, workers=0),
        "device": lambda: device_data.DeviceBatches(
            dataset, global_batch_size=batch, seed=0, mesh=mesh),
    }
    steps = args.loop_steps or (60 if model_name == "digits_resnet" else 6)
    bare = lambda: (placed[i % 4] for i in itertools.count())
    _, state = _run(step, state, teacher, bare(), 2, mesh, args.log_every)
    times = {"bare": [], "host": [], "device": []}
    for _ in range(args.repeats):
      seconds, state = _run(step, state, teacher, bare(), steps, mesh,
                            args.log_every)
      times["bare"].append(seconds)
      for name, make in streams.items():
        with make() as batches:
          jax.block_until_ready(next(batches))  # start-up, compiles
          seconds, state = _run(step, state, teacher, batches, steps, mesh,
                                args.log_every)
        times[name].append(seconds)
    bare_rate = steps * batch / statistics.median(times["bare"])
    for name in streams:
      rate = steps * batch / statistics.median(times[name])
      lines.append(f"{model_name:<14} {batch:>5} {name:<7} {bare_rate:>10.0f} "
                   f"{rate:>10.0f} {rate / bare_rate:>10.3f}")
      print(lines[-1], flush=True)
  return "\n".join(lines)


def overlap_table(args) -> str:
  """Loop time per step with a sleeping stand-in step, with/without prefetch."""
  mesh = sharding.make_mesh()
  dataset = imagenet_shaped(write_jpeg_records(args.jpeg_path, args.jpegs))
  batch = 32
  lines = [f"{'workers':>7} {'prefetch':>8} {'host ms':>8} {'step ms':>8} "
           f"{'loop ms':>8} {'max ms':>7} {'sum ms':>7} {'loop/max':>8}"]
  for workers in (0, 1):
    host = batch / loader_rate(dataset, batch, workers,
                               args.jpeg_batches)["images_per_s"]
    for factor in (0.5, 1.0, 2.0):
      duration = factor * host
      for prefetch in (2, 0):
        if prefetch == 0 and workers:
          continue  # workers always run ahead: no sequential baseline
        with input_pipeline.train_batches(
            dataset, global_batch_size=batch, mesh=mesh, workers=workers,
            prefetch=prefetch) as batches:
          for _ in range(3 + 4 * workers):
            jax.block_until_ready(next(batches))
          start = time.perf_counter()
          steps = 12
          for _ in range(steps):
            jax.block_until_ready(next(batches))
            time.sleep(duration)  # the stand-in step
          loop = (time.perf_counter() - start) / steps
        lines.append(
            f"{workers:>7} {prefetch:>8} {host * 1e3:>8.1f} "
            f"{duration * 1e3:>8.1f} {loop * 1e3:>8.1f} "
            f"{max(host, duration) * 1e3:>7.1f} "
            f"{(host + duration) * 1e3:>7.1f} "
            f"{loop / max(host, duration):>8.2f}")
        print(lines[-1], flush=True)
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--parts", default=",".join(PARTS),
                      type=lambda s: speed.comma_separated_names(s, PARTS),
                      help="comma-separated (default: %(default)s)")
  parser.add_argument("--workers", default="0,1,2",
                      type=lambda s: tuple(int(w) for w in s.split(",")),
                      help="loader worker counts (default: %(default)s)")
  parser.add_argument("--models", default="digits_resnet,resnet20",
                      type=lambda s: speed.comma_separated_names(
                          s, ("digits_resnet", "resnet20")),
                      help="loop models (default: %(default)s)")
  parser.add_argument("--batch", type=int, default=0,
                      help="loop batch (default: 64 digits, 1000 ResNet-20)")
  parser.add_argument("--loop-steps", type=int, default=0,
                      help="timed loop steps (default: 60 digits, 6 "
                      "ResNet-20)")
  parser.add_argument("--log-every", type=int, default=20,
                      help="metrics read period in the loop (program: 20)")
  parser.add_argument("--repeats", type=int, default=3,
                      help="interleaved repeats; medians (default: 3)")
  parser.add_argument("--jpegs", type=int, default=2000,
                      help="synthetic JPEGs written (default: %(default)s)")
  parser.add_argument("--jpeg-batches", type=int, default=12,
                      help="timed JPEG batches (default: %(default)s)")
  parser.add_argument("--jpeg-path", default=os.path.join(
      "/tmp", "gdnsq_bench_jpegs.array_record"))
  args = parser.parse_args(argv)
  flags.FLAGS.mark_as_parsed()  # grain reads absl flags
  print(f"backend {jax.default_backend()}, {jax.devices()[0].device_kind}, "
        f"{os.cpu_count()} CPUs; medians of {args.repeats}", flush=True)
  tables = {"loader": loader_table, "loop": loop_table,
            "overlap": overlap_table}
  out = [tables[part](args) for part in args.parts]
  print("\n\n".join(out))


if __name__ == "__main__":
  main()
