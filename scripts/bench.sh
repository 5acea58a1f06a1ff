#!/usr/bin/env bash
# Benchmark (not a test): BMC's workload on the veth testbed, memcached alone vs accelerated vs
# the zero-work XDP reflector, interleaved in one run, plus each program's average run time
# from kernel.bpf_stats_enabled. Needs root. Results: target/bench/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release -p cache-agent -p loadgen
export CACHE_AGENT_BIN="$PWD/target/release/cache-agent"
mkdir -p target/bench
old_stats=$(sysctl -n kernel.bpf_stats_enabled)
sysctl -qw kernel.bpf_stats_enabled=1
trap 'sysctl -qw kernel.bpf_stats_enabled=$old_stats' EXIT

# Per-program cost: run_time_ns / run_cnt. Programs come and go with the arms, so sample
# every second and keep, per program id, the last sample.
rm -f target/bench/bpf_samples.jsonl
( while true; do bpftool -j prog show 2>/dev/null >> target/bench/bpf_samples.jsonl; echo >> target/bench/bpf_samples.jsonl; sleep 1; done ) &
sampler=$!
target/release/loadgen compare \
  --workload loadgen/workloads/bmc.toml --name bench --subnet 201 \
  --rounds "${ROUNDS:-3}" --round "${ROUND:-5s}" --round-warmup "${ROUND_WARMUP:-6s}" \
  --reflector --no-progress \
  --json target/bench/compare.json "$@" | tee target/bench/compare.txt
kill $sampler 2>/dev/null || true
echo "== per-program run time (kernel.bpf_stats_enabled)"
python3 - <<'PY' | tee target/bench/bpf_stats.txt
import json
last = {}
for line in open("target/bench/bpf_samples.jsonl"):
    line = line.strip()
    if not line:
        continue
    try:
        progs = json.loads(line)
    except ValueError:
        continue
    for p in progs:
        if p.get("name") in ("xdp_cache", "xdp_get", "xdp_scan", "tc_fill", "tc_serve", "xdp_reflector") and p.get("run_cnt"):
            last[p["id"]] = p
by_name = {}
for p in last.values():
    n = by_name.setdefault(p["name"], [0, 0])
    n[0] += p["run_cnt"]
    n[1] += p["run_time_ns"]
for name, (cnt, ns) in sorted(by_name.items()):
    print(f"{name:<14} runs {cnt:>10}  avg {ns / cnt:8.0f} ns")
PY

# Cache-warm cost of each path, from BPF_PROG_TEST_RUN (no traffic, no memory stalls): the
# floor of what the programs cost, next to the reflector's.
echo "== per-path cost, cache-warm (BPF_PROG_TEST_RUN, cargo bench --bench hitpath)"
cargo bench -q -p cache-agent --bench hitpath 2>/dev/null | tee target/bench/hitpath.txt
