#!/usr/bin/env bash
# The main job, from a fresh machine: installs what it needs, builds, brings up a veth testbed
# with a real memcached (UDP on), and runs BMC's workload (16-byte keys, 32-byte values,
# Zipf 0.99, 100k keys) against memcached alone and with the accelerator attached,
# interleaved in rounds, then prints the measured gain and the share of GETs the kernel
# answered. Needs root. ROUNDS and ROUND (seconds per arm, e.g. 4s) set the length; extra
# arguments go to `loadgen compare` (e.g. --reflector).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release -p cache-agent -p loadgen
export CACHE_AGENT_BIN="$PWD/target/release/cache-agent"
exec target/release/loadgen compare \
  --workload loadgen/workloads/bmc.toml \
  --name demo --subnet 200 \
  --rounds "${ROUNDS:-3}" --round "${ROUND:-4s}" --no-progress "$@"
