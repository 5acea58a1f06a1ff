#!/usr/bin/env bash
# Installs everything the build, the testbed and the tests need. Idempotent:
# each step checks before it installs, so a second run does nothing.
set -euo pipefail

log() { printf '\033[1;34m[setup]\033[0m %s\n' "$*"; }

need_apt=()
for pkg in memcached libmemcached-tools iproute2 prometheus bpftool tcpdump ethtool procps; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if ((${#need_apt[@]})); then
  log "apt: installing ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
# Debian starts the packaged services; we run our own instances.
for svc in memcached prometheus; do
  if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    systemctl disable --now "$svc" >/dev/null 2>&1 || true
  fi
  pkill -x "$svc" 2>/dev/null || true
done

export PATH="$HOME/.cargo/bin:$PATH"
if ! rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src'; then
  log "rustup: adding rust-src to the installed nightly"
  rustup component add rust-src --toolchain nightly
fi
if ! bpf-linker --version 2>/dev/null | grep -q '0.10.2'; then
  log "cargo: installing bpf-linker 0.10.2 (about a minute)"
  cargo +nightly install bpf-linker@0.10.2 --locked --quiet
fi

if ! mountpoint -q /sys/fs/bpf; then
  log "mounting bpffs on /sys/fs/bpf"
  mount -t bpf bpf /sys/fs/bpf
fi
log "ready"
