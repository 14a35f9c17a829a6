#!/usr/bin/env bash
# GPU check for the `device` tool (at most about 8.5 minutes of device time).
#
# Runs from the repository root on the device machine (Python 3.12, jax CUDA,
# flax, optax, orbax, chex preinstalled; no network). Pure-Python wheels the
# machine lacks travel in .whl/ (git-ignored), made here once with:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     -d .whl ml_collections==1.1.0 tensorboardX==2.6.5 tqdm flatbuffers \
#     grain array_record dm-tree cloudpickle more-itertools
#
# and the call: run(command="bash bench/gpu_check.sh", carry=[".whl"],
#                   timeout_s=480)
# Writes under $OUT: speed.txt (FP vs GDNSQ W2A2 step, ResNet-20, batch
# 1000, with the teacher in bfloat16 -- teacher.dtype 'auto' -- and in
# float32, and the optimizer per param), profile.txt +
# w2a2-xla.hlo.txt.gz (where the step's GPU time goes), w2a2/results.json +
# bitwidths.txt (short CIFAR-shaped W2A2 run on random data: throughput and
# the bit-width descent, not accuracy), input_pipeline.txt (ResNet-20 W2A2
# batch 1000: the bare step vs the whole loop fed by the grain pipeline and
# by the train set kept on the device), env.txt.
#
# Arguments choose parts (default: all): speed profile train input, e.g.
#   bash bench/gpu_check.sh speed profile
set -uo pipefail
PARTS=" ${*:-speed profile train input} "
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# 1. Train-step throughput, FP vs FP distillation vs GDNSQ W2A2 (XLA's conv
#    on GPU), ResNet-20 at batch 1000. fp-distill-xla / w2a2-xla: the
#    teacher forward in teacher.dtype='auto' (bfloat16 on a GPU);
#    *-tf32-xla: in float32 (the speed side of the teacher.dtype choice);
#    w2a2-unflat-xla: the optimizer per param (optim.flatten=False).
if [[ $PARTS == *" speed "* ]]; then
timeout 200 python3 -m bench.speed --models resnet20 --batch 1000 \
  --configs fp-xla,fp-distill-xla,w2a2-xla,fp-distill-tf32-xla,w2a2-tf32-xla,w2a2-unflat-xla \
  --repeats 20 2>&1 | tee "$OUT/speed.txt"
fi

# 1b. Where the GPU time of the W2A2 step goes (profiler trace, summarised).
if [[ $PARTS == *" profile "* ]]; then
timeout 150 python3 -m bench.profile_step --model resnet20 --batch 1000 \
  --configs fp-distill-xla,w2a2-xla --steps 5 --out /tmp/profile 2>&1 \
  | tee "$OUT/profile.txt"
gzip -c /tmp/profile/w2a2-xla.hlo.txt > "$OUT/w2a2-xla.hlo.txt.gz" 2>/dev/null
fi

# 2. A short CIFAR-shaped W2A2 run on random data (timing + width descent).
if [[ $PARTS == *" train "* ]]; then
python3 - <<'PY'
import numpy as np
rng = np.random.default_rng(0)
np.savez("/tmp/cifar_shaped.npz",
         train_images=rng.integers(0, 256, (20000, 32, 32, 3), np.uint8),
         train_labels=rng.integers(0, 10, 20000).astype(np.uint8),
         test_images=rng.integers(0, 256, (2000, 32, 32, 3), np.uint8),
         test_labels=rng.integers(0, 10, 2000).astype(np.uint8))
PY
timeout 150 python3 -m train.main --config configs/w2a2.py:cifar10 \
  --workdir /tmp/w2a2_gpu --config.data.name=npz \
  --config.data.path=/tmp/cifar_shaped.npz --config.data.validation_size=2000 \
  --config.teacher.num_steps=100 --config.teacher.warmup_steps=20 \
  --config.train.num_steps=400 \
  --config.optim.warmup_steps=50 --config.optim.learning_rate=0.02 \
  --config.train.eval_every_steps=100 --config.train.checkpoint_every_steps=300 \
  2>&1 | tail -n 40 | tee "$OUT/w2a2.log"
mkdir -p "$OUT/w2a2"
cp /tmp/w2a2_gpu/results.json /tmp/w2a2_gpu/bitwidths.txt \
  /tmp/w2a2_gpu/bitwidth_dynamics.png "$OUT/w2a2/" 2>/dev/null
fi
# 3. Loop efficiency on the GPU: ResNet-20 W2A2 at batch 1000, the bare
#    compiled step on batches already on the device vs the whole loop
#    (train.loop.run_steps) fed by the grain pipeline with device prefetch
#    ("host") and by the train set kept on the device ("device"); goal:
#    loop / bare >= 0.9.
if [[ $PARTS == *" input "* ]]; then
timeout 200 python3 -m bench.input_pipeline --parts loop --models resnet20 \
  --batch 1000 --loop-steps 60 --repeats 3 2>&1 | tee "$OUT/input_pipeline.txt"
fi
echo "done: $OUT"
