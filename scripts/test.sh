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

# The NATS tests (server/tests/nats_*.rs) start their own `nats-server` on a free loopback port;
# Debian's package installs it as /usr/sbin/nats-server. Its systemd unit is not wanted.
if ! command -v nats-server >/dev/null 2>&1 && [ ! -x /usr/sbin/nats-server ]; then
  echo "installing nats-server (needed by the NATS tests)" >&2
  apt-get update -qq && apt-get install -y -qq nats-server >/dev/null
  if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl disable --now nats-server.service >/dev/null 2>&1 || true
  fi
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
echo "== loom models (loom-tests/, bounded: LOOM_MAX_PREEMPTIONS=${LOOM_MAX_PREEMPTIONS:-2})"
# The production code under loom's model checker: the engine's and the log's sync shims swap in
# loom's primitives under --cfg loom, crossbeam-epoch under --cfg crossbeam_loom. Its own target
# directory, so the normal build's artefacts are not rebuilt; release, because loom explores
# hundreds of thousands of executions. About a minute of models plus the build on 2 cores.
RUSTFLAGS="--cfg loom --cfg crossbeam_loom" CARGO_TARGET_DIR=target/loom \
  LOOM_MAX_PREEMPTIONS="${LOOM_MAX_PREEMPTIONS:-2}" \
  cargo test --release --locked -p kvindex-loom-tests
