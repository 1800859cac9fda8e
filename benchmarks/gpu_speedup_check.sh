#!/usr/bin/env bash
# A speed change checked on one lent GPU, in one call: the GPU tests, training throughput and
# profile of this tree at the reference DynaMight's model size (all six latent dimensions in
# use, then one, as a one-dimensional motion leaves it), the same benchmark run from a baseline
# tree on the same machine, the command's default model size, the whole pipeline's quality
# (twist-hinge, SNR 0.05) to compare with earlier runs, and seconds per 10,000 particles for
# each stage (benchmarks/bench_pipeline.py); training and projection with the fused kernels and
# with the torch code (DYNAMIGHT_FUSED_TANGENTS=0, DYNAMIGHT_FUSED_SPLAT=0,
# DYNAMIGHT_FUSED_DECODER_PASS=0, DYNAMIGHT_FUSED_MLP=0); the deformed
# backprojection with its fused voxel lookup and with the torch code (DYNAMIGHT_FUSED_LOOKUP=0).
#
#   mkdir .gpu_baseline && git archive BASE dynamight_core relion_external benchmarks \
#     | tar -x -C .gpu_baseline && cp benchmarks/*.py .gpu_baseline/benchmarks/
#   # on the GPU machine (carry .whl and .gpu_baseline):
#   source .whl/on_device.sh && BASELINE=.gpu_baseline bash benchmarks/gpu_speedup_check.sh
# Output: $OUT/log.txt and $OUT/results.tgz (operator table, Chrome trace, pipeline scores).
# Dry run: DRY=1 OUT=/tmp/x BASELINE=.gpu_baseline bash benchmarks/gpu_speedup_check.sh
set -u
BUDGET=${BUDGET:-300}
BASELINE=${BASELINE:-}
source "$(dirname "$0")/_gpu_steps.sh"
if [ "${DRY:-0}" = 1 ]; then
  DEV=cpu; GPU=(); G=2000; N=64; BIG=64; OTHERS="64"; BATCH=32
  QUALITY=(--n-particles 400 -- --n-gaussians 500 --n-epochs 2)
else
  DEV=cuda; GPU=(--gpu-id 0); G=30000; N=2048; BIG=256; OTHERS="128 320"; BATCH=128
  QUALITY=()
fi
REF=(--device $DEV --n-gaussians $G --n-latent-dimensions 6 --n-linear-layers 8
     --batch-size $BATCH --n-particles $N)

step env 20 bash -c "nvidia-smi --query-gpu=name,clocks.sm,memory.total --format=csv 2>/dev/null; python3 -c 'import torch, triton; print(torch.__version__, triton.__version__)'"
step gpu_tests 180 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_tangent_kernel.py \
  tests/test_decoder_pass_kernel.py tests/test_mlp_kernel.py tests/test_splat_kernel.py tests/test_lookup_kernel.py tests/test_deformed_backprojection.py tests/test_batch_prefetch.py \
  tests/test_device.py
# the decoder alone: fused kernels against torch, and the training kernels' rows / warps
step decoder 60 python3 benchmarks/bench_decoder.py --device $DEV --n-gaussians $G \
  --batch-size $BATCH --sweep
step train_new_profiled 80 python3 benchmarks/bench_optimize_deformations.py "${REF[@]}" \
  --boxes $BIG --profile --profile-output "$WORK/prof"
if [ -n "$BASELINE" ]; then
  step train_baseline 50 python3 "$BASELINE/benchmarks/bench_optimize_deformations.py" \
    "${REF[@]}" --boxes $BIG
fi
# the codes step's decoder pass by the torch code and the tangent kernel, as before the kernel
step train_new_torch_decoder_pass 40 env DYNAMIGHT_FUSED_DECODER_PASS=0 python3 \
  benchmarks/bench_optimize_deformations.py "${REF[@]}" --boxes $BIG
# the training step's decoder MLP by torch autograd, as before its kernels
step train_new_torch_mlp 40 env DYNAMIGHT_FUSED_MLP=0 python3 \
  benchmarks/bench_optimize_deformations.py "${REF[@]}" --boxes $BIG
step train_new_boxes 50 python3 benchmarks/bench_optimize_deformations.py "${REF[@]}" \
  --boxes $OTHERS
# a one-dimensional motion: the motion-mode start leaves 5 of the 6 dimensions unused, whose
# Jacobian is then not rendered
step train_new_one_dimension_used 40 python3 benchmarks/bench_optimize_deformations.py \
  "${REF[@]}" --boxes $BIG $OTHERS --active-dimensions 1
# larger batches: the same host work per step for four times the particles
step train_new_batch512 40 python3 benchmarks/bench_optimize_deformations.py "${REF[@]}" \
  --boxes $BIG --batch-size $(( BATCH * 4 ))
step backprojection 30 python3 benchmarks/bench_backprojection.py --device $DEV \
  --boxes $BIG $OTHERS --n-gaussians $G --batch-size 32 --n-particles 512
step backprojection_torch_lookup 30 env DYNAMIGHT_FUSED_LOOKUP=0 python3 \
  benchmarks/bench_backprojection.py --device $DEV --boxes $BIG $OTHERS --n-gaussians $G \
  --batch-size 32 --n-particles 512
# the backprojection's decoder pass by torch (no grad: the MLP kernel's forward alone)
step backprojection_torch_mlp 30 env DYNAMIGHT_FUSED_MLP=0 python3 \
  benchmarks/bench_backprojection.py --device $DEV --boxes $BIG $OTHERS --n-gaussians $G \
  --batch-size 32 --n-particles 512
step train_new_default 40 python3 benchmarks/bench_optimize_deformations.py --device $DEV \
  --boxes 64 128 256 --n-particles $N
step pipeline 150 python3 benchmarks/bench_quality.py --output-directory "$WORK/quality" \
  --presets twist-hinge --snrs 0.05 "${GPU[@]}" --n-threads 8 --job-name gpu "${QUALITY[@]}"

step train_new_unfused 40 env DYNAMIGHT_FUSED_TANGENTS=0 python3 \
  benchmarks/bench_optimize_deformations.py "${REF[@]}" --boxes $BIG

step train_new_torch_splat 40 env DYNAMIGHT_FUSED_SPLAT=0 python3 \
  benchmarks/bench_optimize_deformations.py "${REF[@]}" --boxes $BIG
step physics 40 bash -c "python3 benchmarks/bench_physics.py --device $DEV --boxes $BIG $OTHERS \
  --batch-size $BATCH --n-gaussians $G; DYNAMIGHT_FUSED_SPLAT=0 python3 \
  benchmarks/bench_physics.py --device $DEV --boxes $BIG $OTHERS --batch-size $BATCH \
  --n-gaussians $G"

step pipeline_times 150 python3 benchmarks/bench_pipeline.py --output-directory "$WORK/times" \
  "${GPU[@]}" --n-threads 8 "${QUALITY[@]}"

find "$WORK/quality" "$WORK/times" \( -name "*.mrc*" -o -name "*.mrcs" -o -name "*.pth" \) -delete 2>/dev/null
tar czf "$OUT/results.tgz" -C "$WORK" . 2>/dev/null
echo "### done at $(( $(date +%s) - START )) s" | tee -a "$LOG"
grep -h "^ *[0-9]\+  [0-9.]\+ .*[0-9]$\|RESULT\|passed\|failed\|^###.*rc" "$LOG" | tail -40
