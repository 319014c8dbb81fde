#!/usr/bin/env sh
# First run on a fresh Linux machine: installs a Rust toolchain if there is none, builds
# flash-moe in release mode and generates text with the demo model shipped in models/demo.
# Extra arguments go to `flash-moe generate` (e.g. --prompt "..." --max-tokens 200).
set -eu
cd "$(dirname "$0")/.."
if ! command -v cargo >/dev/null 2>&1; then
    [ -x "$HOME/.cargo/bin/cargo" ] || curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
    PATH="$HOME/.cargo/bin:$PATH"
fi
if [ $# -eq 0 ]; then
    set -- --prompt "And God said unto Moses," --max-tokens 120
fi
exec cargo run --release -p flash-moe -- generate --stats "$@"
