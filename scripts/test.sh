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
echo "== Dynamo 1.6.1 for the live interop tests (best effort)"
# server/tests/dynamo_interop.rs runs its live tests against the real `python -m dynamo.indexer`
# when KVINDEX_DYNAMO_PYTHON names a python that has it (its recorded-fixture test always runs).
# Measured on the 2-core CI-like machine: a fresh venv + `pip install ai-dynamo-runtime==1.6.1`
# takes 23-27 s (75 MB wheel download, 275 MB installed), 7 s from pip's cache; the live tests
# then take about 3 s. Without python3's venv module or without network the live tests are
# skipped (and say so). KVINDEX_DYNAMO_PYTHON set by the caller wins; KVINDEX_SKIP_DYNAMO=1
# skips the install.
if [ -z "${KVINDEX_DYNAMO_PYTHON:-}" ] && [ "${KVINDEX_SKIP_DYNAMO:-0}" != 1 ]; then
  dynamo_venv="${KVINDEX_DYNAMO_VENV:-$PWD/target/dynamo-venv}"
  if "$dynamo_venv/bin/python" -c 'import dynamo.llm' >/dev/null 2>&1; then
    export KVINDEX_DYNAMO_PYTHON="$dynamo_venv/bin/python"
  elif command -v python3 >/dev/null 2>&1 \
    && python3 -m venv "$dynamo_venv" >/dev/null 2>&1 \
    && timeout 300 "$dynamo_venv/bin/pip" install -q --disable-pip-version-check \
      ai-dynamo-runtime==1.6.1 >/dev/null 2>&1 \
    && "$dynamo_venv/bin/python" -c 'import dynamo.llm' >/dev/null 2>&1; then
    export KVINDEX_DYNAMO_PYTHON="$dynamo_venv/bin/python"
  else
    echo "warning: could not install ai-dynamo-runtime==1.6.1 into $dynamo_venv;" \
      "the live Dynamo interop tests will be skipped" >&2
  fi
fi
echo "KVINDEX_DYNAMO_PYTHON=${KVINDEX_DYNAMO_PYTHON:-<unset: live Dynamo tests skipped>}"
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
