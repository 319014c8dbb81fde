#!/usr/bin/env bash
# Trains the demo model on one GPU: two dropout settings side by side on the same card, each for MINUTES of wall
# time, keeps the one with the lower validation loss and copies it to OUT_DIR/model (the other's logs and results
# stay under OUT_DIR/runs). DATA is the folder made by scripts/demo_corpus.sh + `train_demo.py tokenizer`.
#
# usage: scripts/train_demo_gpu.sh DATA OUT_DIR [MINUTES [more `train_demo.py train` options]]
set -euo pipefail
data=${1:?usage: $0 DATA OUT_DIR [MINUTES [options]]}
out=${2:?usage: $0 DATA OUT_DIR [MINUTES [options]]}
minutes=${3:-4}
shift $(($# < 3 ? $# : 3))
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out/runs"
pids=()
for run in drop010:0.1 drop025:0.25; do
  name=${run%%:*}
  mkdir -p "$out/runs/$name"
  python3 "$here/train_demo.py" train "$data" "$out/runs/$name/model" --extra "$out/runs/$name" \
    --dropout "${run##*:}" --minutes "$minutes" --log-every 100 "$@" >"$out/runs/$name/log.txt" 2>&1 &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
for f in "$out"/runs/*/log.txt; do
  echo "=== $f"
  grep -E '^(torch|tokens|parameters|grouped|step|final|valid|test|---|hard|Traceback|[A-Za-z]*Error)' "$f" | tail -n 40 || true
done
best=$(python3 - "$out/runs" <<'EOF'
import json, os, sys
runs = []
for name in sorted(os.listdir(sys.argv[1])):
    path = os.path.join(sys.argv[1], name, "train_results.json")
    if os.path.exists(path):
        runs.append((json.load(open(path))["results"]["valid"]["nll_per_token"], name))
print(min(runs)[1] if runs else "")
EOF
)
[ -n "$best" ] || { echo "no run finished" >&2; exit 1; }
echo "kept: $best"
rm -rf "$out/model"
cp -r "$out/runs/$best/model" "$out/model"
echo "$best" >"$out/kept.txt"
exit $status
