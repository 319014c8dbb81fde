#!/usr/bin/env bash
# Runs the CUDA test binaries (and optionally the benchmarks) on a GPU machine, which has the
# driver and NVRTC but no Rust.
#
#   scripts/gpu-check.sh --prepare   # here (no GPU needed): build the CUDA tests and flash-moe in
#                                    # release; copy the test executables into .carry/gpu/ and the
#                                    # binary into .carry/bin/ (carry both)
#   scripts/gpu-check.sh             # on the GPU machine: run every executable in .carry/gpu/
#   scripts/gpu-check.sh --bench L   # ... then the benchmarks: the decode kernels' bandwidth
#                                    # (kernel_bench), and decoding a synthetic qwen3.5-397b of L
#                                    # layers (q4 experts, q8 dense): experts in GPU memory, from
#                                    # RAM (pinned), on the CPU backend, from disk (cold)
#   GPU_CHECK_RUNS="1 1e" scripts/gpu-check.sh --bench L
#                                    # only the named benchmarks (default: all, "k 1 1e 2 3 4";
#                                    # k is kernel_bench, 1e is run 1 without CUDA graphs, 1n
#                                    # without early launches (FLASH_MOE_EARLY_LAUNCH=0), 1b
#                                    # without bulk copies (FLASH_MOE_BULK=0); p,
#                                    # not in the default, profiles run 1's kernels with ncu at
#                                    # the clocks and caches of a normal run; t, not in the
#                                    # default, records run 1's device timeline with
#                                    # scripts/ktrace)
#   GPU_CHECK_TESTS=0 scripts/gpu-check.sh --bench L
#                                    # the benchmarks only
#   GPU_CHECK_BASELINE=.carry/base scripts/gpu-check.sh --bench L
#                                    # also runs k, 1 and 2 with the flash-moe and kernel_bench in
#                                    # that directory (built from another commit): before/after
#                                    # on the same machine
#
# The run step builds nothing. It requires a GPU (FLASH_MOE_REQUIRE_CUDA=1 turns the tests'
# "SKIPPED ... no CUDA device" into failures), uses a fresh PTX cache (so the first test binary
# compiles the kernels with NVRTC and the next ones load them from the cache), and writes the
# whole log to $OUT/gpu-check.log (benchmarks: $OUT/bench.log) when $OUT is set. Exit status: 0
# only if every binary passed.
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
    tests=()
    for t in crates/engine/tests/cuda_*.rs; do tests+=(--test "$(basename "$t" .rs)"); done
    cargo test --release --no-run --message-format=json -p moe-engine "${tests[@]}" >>"$json"
    jq -r 'select(.reason == "compiler-artifact" and .executable != null and .profile.test == true) | .executable' "$json" |
        sort -u | while read -r exe; do
        name="$(basename "$exe" | sed -E 's/-[0-9a-f]{16}$//')"
        objcopy --strip-debug "$exe" "$carry/$name"
        echo "carried $name ($(du -h "$carry/$name" | cut -f1))"
    done
    rm -f "$json"
    cargo build --release -p flash-moe
    cargo build --release -p moe-cuda --example kernel_bench
    mkdir -p "$root/.carry/bin"
    for b in flash-moe examples/kernel_bench; do
        objcopy --strip-debug "target/release/$b" "$root/.carry/bin/$(basename "$b")"
        echo "carried $(basename "$b") ($(du -h "$root/.carry/bin/$(basename "$b")" | cut -f1)) in .carry/bin"
    done
    exit 0
fi

bench_layers=""
if [[ "${1:-}" == "--bench" ]]; then
    bench_layers="${2:?--bench needs a layer count}"
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

# Benchmarks with the carried binary; each step has a time limit so that one hang cannot eat the
# machine's time. The model goes to a disk-backed directory (not tmpfs), so that dropping the page
# cache makes the last run read from disk.
runs=" ${GPU_CHECK_RUNS:-k 1 1e 2 3 4} "
wanted() { [[ "$runs" == *" $1 "* ]]; }

bench() {
    local layers="$1" bin="$root/.carry/bin/flash-moe" blog="${OUT:+$OUT/bench.log}" dir
    chmod +x "$bin" 2>/dev/null || true
    blog="${blog:-/dev/null}"
    for dir in /tmp /var/tmp "$root"; do
        [[ "$(stat -f -c %T "$dir")" != tmpfs ]] && break
    done
    local model="$dir/s397-$layers"
    step() {
        local limit="$1"
        shift
        echo "+ $* (limit ${limit}s)" | tee -a "$blog"
        local t0=$(date +%s)
        timeout "$limit" "$@" 2>&1 | tee -a "$blog"
        echo "= exit ${PIPESTATUS[0]} after $(($(date +%s) - t0))s" | tee -a "$blog"
    }
    uname -a >>"$blog"
    chmod +x "$root/.carry/bin/kernel_bench" 2>/dev/null || true
    local base="${GPU_CHECK_BASELINE:+$root/${GPU_CHECK_BASELINE#$root/}}"
    [[ -n "$base" ]] && chmod +x "$base"/* 2>/dev/null
    wanted k && step 120 "$root/.carry/bin/kernel_bench"
    wanted k && [[ -n "$base" ]] && step 120 "$base/kernel_bench"
    free -g | tee -a "$blog"
    df -h "$dir" | tee -a "$blog"
    step 150 "$bin" synth --shape qwen3.5-397b --layers "$layers" --experts q4 --dense q8 --out "$model" --force
    local common=(--model "$model" --probe-seconds 1)
    # 1. Every expert in GPU memory: they all fit the budget, so loading the model uploads them
    #    (through the page cache), and decoding routes on the GPU without copying anything back.
    local resident=(--device cuda --vram-budget auto --ram-budget 0 --no-direct-io --prompt-tokens 16 --tokens 64)
    if wanted 1; then
        step 150 "$bin" bench "${common[@]}" "${resident[@]}"
        nvidia-smi --query-gpu=memory.used,memory.total --format=csv,noheader | tee -a "$blog"
    fi
    wanted 1e && step 150 "$bin" bench "${common[@]}" "${resident[@]}" --no-graphs
    wanted 1n && step 150 env FLASH_MOE_EARLY_LAUNCH=0 "$bin" bench "${common[@]}" "${resident[@]}"
    wanted 1b && step 150 env FLASH_MOE_BULK=0 "$bin" bench "${common[@]}" "${resident[@]}"
    wanted 1 && [[ -n "$base" ]] && step 150 "$base/flash-moe" bench "${common[@]}" "${resident[@]}"
    # p. Every kernel of run 1 (one-token prompt, three decoded tokens, no graphs) under Nsight
    #    Compute: time, DRAM and SM throughput per kernel name, summed over the four steps.
    if wanted p; then
        local csv="${OUT:-/tmp}/ncu.csv"
        step 300 /usr/local/cuda/bin/ncu --csv --log-file "$csv" --clock-control none --cache-control none --metrics \
            gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__throughput.avg.pct_of_peak_sustained_elapsed,launch__registers_per_thread \
            "$bin" bench "${common[@]}" --device cuda --vram-budget auto --ram-budget 0 --no-direct-io \
            --prompt-tokens 1 --tokens 3 --no-graphs
        python3 "$root/scripts/ncu-summary.py" "$csv" 4 | tee -a "$blog"
    fi
    # t. Run 1's device timeline (kernels, copies) under CUPTI (scripts/ktrace; build it with
    #    scripts/ktrace/build.sh and carry .carry/ktrace), with graphs and without: the traces go
    #    to $OUT/ktrace-{graphs,direct}.csv and a summary of each to the log.
    if wanted t; then
        local tracer="$root/.carry/ktrace/libktrace.so" mode
        for mode in graphs direct; do
            local flags=()
            [[ "$mode" == direct ]] && flags=(--no-graphs)
            local csv="${OUT:-/tmp}/ktrace-$mode.csv"
            step 150 env CUDA_INJECTION64_PATH="$tracer" KTRACE="$csv" "$bin" bench "${common[@]}" --device cuda \
                --vram-budget auto --ram-budget 0 --no-direct-io --prompt-tokens 16 --tokens 12 "${flags[@]}"
            python3 "$root/scripts/ktrace/timeline.py" "$csv" | tee -a "$blog"
        done
    fi
    # 2. No VRAM tier: every expert copied from the RAM tier (pinned memory, warmed with every
    #    expert first) by the copy engine at each use.
    local from_ram=(--device cuda --vram-budget 0 --ram-budget auto --no-direct-io --warm-ram --prompt-tokens 16 --tokens 32)
    wanted 2 && step 150 "$bin" bench "${common[@]}" "${from_ram[@]}"
    wanted 2 && [[ -n "$base" ]] && step 150 "$base/flash-moe" bench "${common[@]}" "${from_ram[@]}"
    # 3. The CPU backend on the same model, experts from RAM.
    wanted 3 && step 90 "$bin" bench "${common[@]}" --device cpu --ram-budget auto --no-direct-io \
        --prompt-tokens 8 --tokens 8
    # 4. Cold: page cache dropped, every expert from disk (O_DIRECT) each time it is used.
    if wanted 4; then
        sync
        echo 3 >/proc/sys/vm/drop_caches
        step 90 "$bin" bench "${common[@]}" --device cuda --vram-budget 0 --ram-budget 0 --prompt-tokens 8 --tokens 16
    fi
    rm -rf "$model"
}

run nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
failed=()
[[ "${GPU_CHECK_TESTS:-1}" == 0 ]] && bins=()
for bin in "${bins[@]}"; do
    name="$(basename "$bin")"
    chmod +x "$bin" 2>/dev/null || true
    run echo "=== $name"
    start=$(date +%s%N)
    if run timeout 240 "$bin" --test-threads=1 --nocapture; then status=ok; else status=FAILED; failed+=("$name"); fi
    run echo "=== $name: $status in $((($(date +%s%N) - start) / 1000000)) ms"
done
run echo "PTX cache: $(ls "$XDG_CACHE_HOME"/flash-moe 2>/dev/null | tr '\n' ' ')"
[[ -n "$bench_layers" ]] && bench "$bench_layers"
if [[ ${#failed[@]} -gt 0 ]]; then
    run echo "gpu-check: FAILED: ${failed[*]}"
    exit 1
fi
run echo "gpu-check: all ${#bins[@]} test binaries passed"
