# Sourced by the GPU session scripts of this folder (not run by itself): the common set-up and
# `step NAME CAP_SECONDS COMMAND...`, which runs a command under a time cap, logs its output and
# exit status to $LOG, and skips it when less than 10 s of $BUDGET (seconds since START) is left.
# Expects BUDGET set by the caller (a default of its own).
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
WORK=$(mktemp -d)
LOG=$OUT/log.txt
START=$(date +%s)
export PYTHONUNBUFFERED=1

step() {  # step NAME CAP_SECONDS COMMAND...
  local name=$1 cap=$2; shift 2
  local now=$(( $(date +%s) - START ))
  if (( now + 10 > BUDGET )); then
    echo "### $name: skipped ($now s used of $BUDGET)" | tee -a "$LOG"; return
  fi
  (( cap > BUDGET - now )) && cap=$(( BUDGET - now ))
  echo "### $name (cap $cap s, at $now s): $*" | tee -a "$LOG"
  local t0=$(date +%s)
  timeout -k 5 "$cap" "$@" 2>&1 \
    | grep -v "^USDT\|SyncActivityProfilerHandler\|_warn_once\|acc_events" | tee -a "$LOG"
  echo "### $name: rc ${PIPESTATUS[0]}, $(( $(date +%s) - t0 )) s" | tee -a "$LOG"
}
