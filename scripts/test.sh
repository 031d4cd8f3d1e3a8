#!/usr/bin/env bash
# The whole test suite, as the README's second command and CI (.ci/run) run it.
# Works on a fresh Debian machine with only the Rust toolchain: it installs what it needs.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: install the Rust toolchain (https://rustup.rs) first" >&2
  exit 1
fi
if ! command -v cc >/dev/null 2>&1; then
  echo "installing a C compiler (needed by mimalloc's build)" >&2
  apt-get update -qq && apt-get install -y -qq build-essential >/dev/null
fi

# The shared trace and golden vectors live beside the repository (../shared).
if [ ! -d ../shared/spec ]; then
  echo "warning: ../shared not found beside the repository; tests that read it will fail" >&2
fi

export CARGO_TERM_COLOR=never
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test (workspace)"
cargo test --workspace --locked
