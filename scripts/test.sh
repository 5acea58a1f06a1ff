#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what it needs (scripts/setup.sh), builds
# the eBPF object and the workspace, checks formatting and lints, then runs every test.
# Needs root: the end-to-end tests create network namespaces and attach XDP programs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"

echo "== fmt"
cargo fmt --all -- --check
echo "== clippy"
cargo clippy --all-targets -- -D warnings
echo "== build"
cargo build --all-targets
echo "== tests"
# Test binaries run one after another; inside one, at most two tests at a time (2-core box,
# each end-to-end test runs its own memcached, agent and verifier).
mkdir -p target
set +e
cargo test --no-fail-fast -- --test-threads=2 2>&1 | tee target/test-output.log
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole run (cargo's last line is a doc-test binary with 0 tests).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "%d passed, %d failed\n", p, f }' target/test-output.log
exit "$status"
