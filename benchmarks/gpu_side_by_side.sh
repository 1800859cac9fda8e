#!/usr/bin/env bash
# Training side by side with the reference DynaMight on one lent GPU, in one call of about 2-3
# minutes (benchmarks/reference_side_by_side.py: the same simulated particles, the reference's
# model size, this project's joint epochs against the reference's). A call of its own, after
# gpu_speedup_check.sh on the same warm machine.
#
#   bash benchmarks/prepare_reference.sh   # here: .reference_dynamight and .whl/reference
#   # on the GPU machine (carry .whl and .reference_dynamight):
#   source .whl/on_device.sh && bash benchmarks/gpu_side_by_side.sh
# Output: $OUT/log.txt ("RESULT side_by_side ..." lines). Dry run on the CPU (the carried wheels
# are for the GPU machine's Python 3.12, so the dry run takes the reference's dependencies from
# /tmp/refsite: python3 -m pip install --target /tmp/refsite tqdm typer scikit-learn):
#   DRY=1 OUT=/tmp/x bash benchmarks/gpu_side_by_side.sh
set -u
BUDGET=${BUDGET:-200}
source "$(dirname "$0")/_gpu_steps.sh"
if [ "${DRY:-0}" = 1 ]; then
  ARGS=(--device cpu --n-particles 400 --box-size 32 --n-gaussians 2000 --n-threads 2
        --reference-seconds 150)
else
  # the issue's comparison: box 64 as in its measurement (reference 450-600 particles/s on an
  # H200), 3,000 particles so that three joint epochs of the reference fit in 90 s
  ARGS=(--device cuda --n-particles 3000 --box-size 64 --n-threads 8 --reference-seconds 90)
fi
[ -d .reference_dynamight ] || { echo "no .reference_dynamight: run benchmarks/prepare_reference.sh" | tee -a "$LOG"; exit 1; }
step env 20 bash -c "nvidia-smi --query-gpu=name,clocks.sm,memory.total --format=csv 2>/dev/null; cat .reference_dynamight/COMMIT"
if [ "${DRY:-0}" != 1 ]; then
  step install 40 python3 -m pip install -q --no-index --no-deps --target /tmp/refsite \
    .whl/reference/*.whl
fi
step side_by_side 180 env PYTHONPATH="/tmp/refsite:${PYTHONPATH:-}" python3 \
  benchmarks/reference_side_by_side.py --reference-source .reference_dynamight \
  --work-directory "$WORK/side_by_side" --n-epochs 6 "${ARGS[@]}"
cp "$WORK"/side_by_side/*.log "$OUT/" 2>/dev/null
echo "### done at $(( $(date +%s) - START )) s" | tee -a "$LOG"
grep -h "RESULT\|^this project\|^reference" "$LOG" | tail -10
