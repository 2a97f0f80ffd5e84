#!/usr/bin/env bash
# The GPU tests (tests/test_gpu.py, marker gpu) in N concurrent pytest processes on one GPU.
#
#   JW4A16_TEST_GPU=1 scripts/gpu_tests.sh [N] [pytest -k expression]
#   JW4A16_TEST_GPU=1 scripts/gpu_tests.sh 3 "frag or fragment"
#
# Test ids are collected first (pytest --co, not -q: with -q it prints counts per file, no ids) and dealt round
# robin to the N processes; an empty selection is an error (never an unfiltered run of the whole suite).  Each
# process's log is left in $LOGDIR (default: a temporary folder); the exit status is nonzero if any process failed.
set -euo pipefail
n=${1:-3}
expr=${2:-}
if [[ "${JW4A16_TEST_GPU:-}" != 1 ]]; then
  echo "gpu_tests.sh: set JW4A16_TEST_GPU=1 (otherwise the gpu tests are skipped and the interpreter is used)" >&2
  exit 2
fi
export XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.3}
logdir=${LOGDIR:-$(mktemp -d)}
mkdir -p "$logdir"
args=(tests/test_gpu.py -m gpu -p no:cacheprovider)
[[ -n "$expr" ]] && args+=(-k "$expr")
python3 -m pytest --co "${args[@]}" 2>/dev/null | grep "::" | sort -u > "$logdir/ids" || true
count=$(wc -l < "$logdir/ids")
if [[ "$count" -eq 0 ]]; then
  echo "gpu_tests.sh: no test selected by ${expr:-(all)}" >&2
  exit 2
fi
echo "gpu_tests.sh: $count tests in $n processes, logs in $logdir"
rm -f "$logdir"/shard_*  # a reused LOGDIR: an old log would be dealt out as a list of test ids
split -n "r/$n" "$logdir/ids" "$logdir/shard_"
pids=()
for f in "$logdir"/shard_*; do
  (mapfile -t ids < "$f"; python3 -m pytest -q -rf -p no:cacheprovider "${ids[@]}" > "$f.log" 2>&1) &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
tail -qn 1 "$logdir"/shard_*.log
grep -h "^FAILED" "$logdir"/shard_*.log || true
exit $status
