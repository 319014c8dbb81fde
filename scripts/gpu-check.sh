#!/usr/bin/env bash
# Runs the CUDA test binaries on a GPU machine, which has the driver and NVRTC but no Rust.
#
#   scripts/gpu-check.sh --prepare   # here (no GPU needed): build the CUDA tests in release and
#                                    # copy their executables into .carry/gpu/
#   scripts/gpu-check.sh             # on the GPU machine: run every executable in .carry/gpu/
#
# The run step builds nothing. It requires a GPU (FLASH_MOE_REQUIRE_CUDA=1 turns the tests'
# "SKIPPED ... no CUDA device" into failures), uses a fresh PTX cache (so the first test binary
# compiles the kernels with NVRTC and the next ones load them from the cache), and writes the
# whole log to $OUT/gpu-check.log when $OUT is set. Exit status: 0 only if every binary passed.
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
carry="$root/.carry/gpu"

if [[ "${1:-}" == "--prepare" ]]; then
    set -e
    cd "$root"
    mkdir -p "$carry"
    rm -f "$carry"/*
    exclude="$(git rev-parse --git-path info/exclude)"
    mkdir -p "$(dirname "$exclude")"
    grep -qxF '/.carry/' "$exclude" 2>/dev/null || echo '/.carry/' >>"$exclude"
    json="$(mktemp)"
    cargo test --release --no-run --message-format=json -p moe-cuda --lib >"$json"
    cargo test --release --no-run --message-format=json -p moe-engine --test cuda_ops --test cuda_models >>"$json"
    jq -r 'select(.reason == "compiler-artifact" and .executable != null and .profile.test == true) | .executable' "$json" |
        sort -u | while read -r exe; do
        name="$(basename "$exe" | sed -E 's/-[0-9a-f]{16}$//')"
        objcopy --strip-debug "$exe" "$carry/$name"
        echo "carried $name ($(du -h "$carry/$name" | cut -f1))"
    done
    rm -f "$json"
    exit 0
fi

cd "$root"
shopt -s nullglob
bins=("$carry"/*)
if [[ ${#bins[@]} -eq 0 ]]; then
    echo "no test executables in $carry: run scripts/gpu-check.sh --prepare where Rust is installed" >&2
    exit 2
fi

log="${OUT:+$OUT/gpu-check.log}"
log="${log:-/dev/null}"
run() { "$@" 2>&1 | tee -a "$log"; }

# The CUDA toolkit's libraries (NVRTC) are not always on the loader path.
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    [[ -d "$d" ]] && export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
export FLASH_MOE_REQUIRE_CUDA=1
export FLASH_MOE_FIXTURES="$root/tests/fixtures"
export XDG_CACHE_HOME="$(mktemp -d)"
export RUST_BACKTRACE=1

run nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
failed=()
for bin in "${bins[@]}"; do
    name="$(basename "$bin")"
    chmod +x "$bin" 2>/dev/null || true
    run echo "=== $name"
    start=$(date +%s%N)
    if run "$bin" --test-threads=1 --nocapture; then status=ok; else status=FAILED; failed+=("$name"); fi
    run echo "=== $name: $status in $((($(date +%s%N) - start) / 1000000)) ms"
done
run echo "PTX cache: $(ls "$XDG_CACHE_HOME"/flash-moe 2>/dev/null | tr '\n' ' ')"
if [[ ${#failed[@]} -gt 0 ]]; then
    run echo "gpu-check: FAILED: ${failed[*]}"
    exit 1
fi
run echo "gpu-check: all ${#bins[@]} test binaries passed"
