#!/usr/bin/env bash
# One lent GPU session's measurements, in priority order, each step capped in time, everything
# logged: the training profile at the reference DynaMight's model size, deformed
# backprojection, the whole pipeline with its defaults, physics, the GPU tests, variants.
#
# On the GPU machine, from the repository root (wheels as ../shared/device/README.md says):
#   source .whl/on_device.sh && bash benchmarks/gpu_session.sh
# Output: $OUT/log.txt (every step's output), $OUT/results.tgz (operator tables, a Chrome trace,
# the pipeline run's logs and scores). Dry run on a CPU with tiny sizes:
#   DRY=1 OUT=/tmp/gpu_dry bash benchmarks/gpu_session.sh
# BUDGET (seconds, default 520): steps that would start after it are skipped.
set -u
BUDGET=${BUDGET:-520}
source "$(dirname "$0")/_gpu_steps.sh"
if [ "${DRY:-0}" = 1 ]; then
  DEV=cpu; GPU=(); G=2000; N=64; BOXES_REF="64"; BOXES_BIG="64"; BATCH=32
  QUALITY=(--n-particles 400 -- --n-gaussians 500 --n-epochs 2)
else
  DEV=cuda; GPU=(--gpu-id 0); G=30000; N=2048; BOXES_REF="128 256 320"; BOXES_BIG="256 320"
  BATCH=128; QUALITY=()
fi

step env 20 bash -c "nvidia-smi -L 2>/dev/null; nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.total,power.limit --format=csv 2>/dev/null; nproc; python3 -c 'import torch, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda)'"

# 1. training at the reference model size: throughput per box, a profile of one epoch by part,
#    the operator/kernel table and a Chrome trace of 4 batches
step train_reference 150 python3 benchmarks/bench_optimize_deformations.py --device $DEV \
  --boxes $BOXES_REF --n-gaussians $G --n-latent-dimensions 6 --n-linear-layers 8 \
  --batch-size $BATCH --n-particles $N --profile --profile-output "$WORK/prof"

# 2. deformed backprojection: the benchmark's batches, then batch 64 with 8x the chunk
step backprojection 60 python3 benchmarks/bench_backprojection.py --device $DEV \
  --boxes $BOXES_BIG --n-gaussians $G
step backprojection_chunk 60 python3 benchmarks/bench_backprojection.py --device $DEV \
  --boxes $BOXES_BIG --n-gaussians $G --batch-size 64 --n-particles 512 \
  --max-chunk-voxels 134217728

# 3. the whole pipeline with the command's defaults (twist-hinge, SNR 0.05, 6,000 particles,
#    box 64): seconds per stage and the quality scores, to compare with the CPU runs
step pipeline 210 python3 benchmarks/bench_quality.py --output-directory "$WORK/quality" \
  --presets twist-hinge --snrs 0.05 "${GPU[@]}" --n-threads 8 --job-name gpu "${QUALITY[@]}"

# 4. physics, the GPU tests, training at the command's default model size, batch and precision
step physics 40 python3 benchmarks/bench_physics.py --device $DEV --boxes $BOXES_BIG \
  --batch-size $BATCH --n-gaussians $G
step gpu_tests 60 python3 -m pytest -q -m gpu -p no:cacheprovider tests
step train_default 60 python3 benchmarks/bench_optimize_deformations.py --device $DEV \
  --boxes 64 128 256 --n-particles $N
step train_batch512 40 python3 benchmarks/bench_optimize_deformations.py --device $DEV \
  --boxes 256 --n-gaussians $G --n-latent-dimensions 6 --n-linear-layers 8 \
  --batch-size 512 --n-particles $N
step train_float32 40 python3 benchmarks/bench_optimize_deformations.py --device $DEV \
  --boxes 256 --n-gaussians $G --n-latent-dimensions 6 --n-linear-layers 8 \
  --batch-size $BATCH --n-particles $N --decoder-precision float32
step inverse 40 python3 benchmarks/bench_inverse.py --device $DEV --boxes $BOXES_BIG \
  --n-gaussians $G

# what comes back: the log and one archive (the tool returns at most 8 files)
find "$WORK/quality" -name "*.mrc*" -o -name "*.mrcs" -o -name "*.pth" 2>/dev/null | xargs -r rm -f
tar czf "$OUT/results.tgz" -C "$WORK" . 2>/dev/null
ls -la "$OUT" | tee -a "$LOG"
echo "### done at $(( $(date +%s) - START )) s" | tee -a "$LOG"
