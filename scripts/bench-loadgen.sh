#!/usr/bin/env bash
# Benchmark (not a test): how fast is one loadgen worker against memcaslap (libmemcached-tools),
# both driving the zero-work XDP reflector on a veth testbed, one client thread pinned to CPU 0,
# GET only, 16-byte keys, 32-byte values, at 16 and 64 outstanding requests. Needs root.
# Results: target/bench/loadgen-vs-memcaslap.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release -p cache-agent -p loadgen
export CACHE_AGENT_BIN="$PWD/target/release/cache-agent"
L=target/release/loadgen
NAME=lgbench
SECONDS_PER_RUN=${SECONDS_PER_RUN:-5}
mkdir -p target/bench
out=target/bench/loadgen-vs-memcaslap.txt

cfg=$(mktemp)
json=$(mktemp)
reflector=""
cleanup() {
  [[ -n "$reflector" ]] && kill "$reflector" 2>/dev/null || true
  "$L" testbed down --name "$NAME" >/dev/null 2>&1 || true
  rm -f "$cfg" "$json"
}
trap cleanup EXIT
# memcaslap's workload: 16-byte keys, 32-byte values, GETs only.
printf 'key\n16 16 1\nvalue\n32 32 1\ncmd\n0 0\n1 1\n' >"$cfg"

"$L" testbed up --name "$NAME" --subnet 202 >/dev/null
server=198.18.202.1:11211
# nsenter, not `ip netns exec`: the latter hides /sys/fs/bpf.
nsenter --net=/run/netns/$NAME-srv "$CACHE_AGENT_BIN" reflector --iface ${NAME}s >/dev/null 2>&1 &
reflector=$!
sleep 2

loadgen_rate() {
  "$L" run --netns $NAME-cli --server $server --proto udp --keys 100000 --key-size 16 \
    --value-size 32 --no-populate --warmup 1s --duration "${SECONDS_PER_RUN}s" --cpus 0 \
    --no-progress --concurrency "$1" --json "$json" >/dev/null 2>&1
  python3 -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["throughput_rps"]))' "$json"
}
memcaslap_rate() {
  ip netns exec $NAME-cli taskset -c 0 memcaslap -s $server -T 1 -c "$1" \
    -t "${SECONDS_PER_RUN}s" -U -F "$cfg" 2>&1 | sed -n 's/.*TPS: \([0-9]*\).*/\1/p'
}

{
  printf '%-12s %14s %14s %8s\n' outstanding "memcaslap/s" "loadgen/s" ratio
  for c in 16 64; do
    m=$(memcaslap_rate "$c")
    l=$(loadgen_rate "$c")
    printf '%-12s %14s %14s %7.2fx\n' "$c" "$m" "$l" "$(python3 -c "print($l / $m)")"
  done
} | tee "$out"
