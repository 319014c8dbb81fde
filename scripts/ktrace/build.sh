#!/usr/bin/env bash
# Builds the CUPTI tracer (ktrace.c) here, for the GPU machine: the CUPTI, CUDA runtime and CRT
# headers and CUPTI's library come from NVIDIA's PyPI wheels (the GPU machine's toolkit has no
# CUPTI), cached in ~/.cache/flash-moe/cupti. Writes .carry/ktrace/libktrace.so with
# libcupti.so.13 beside it (found through the library's RUNPATH); carry .carry/ktrace and run
#   CUDA_INJECTION64_PATH=$PWD/.carry/ktrace/libktrace.so KTRACE=$OUT/t.csv flash-moe bench ...
# then read the CSV with scripts/ktrace/timeline.py.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/flash-moe/cupti"
mkdir -p "$cache"
if [[ ! -f "$cache/nvidia/cu13/include/cupti.h" ]]; then
    (cd "$cache" && pip download --quiet --no-deps nvidia-cuda-cupti nvidia-cuda-runtime nvidia-cuda-crt &&
        for w in *.whl; do python3 -m zipfile -e "$w" .; done)
fi
cuda="$cache/nvidia/cu13"
out="$root/.carry/ktrace"
mkdir -p "$out"
cp "$cuda/lib/libcupti.so.13" "$out/"
gcc -O2 -Wall -shared -fPIC -I"$cuda/include" "$root/scripts/ktrace/ktrace.c" -L"$out" -l:libcupti.so.13 \
    -Wl,-rpath,'$ORIGIN' -o "$out/libktrace.so"
echo "built $out/libktrace.so (carry .carry/ktrace)"
