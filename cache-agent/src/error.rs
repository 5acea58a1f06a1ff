//! The agent's errors. Each says what failed and, where there is one, the fix.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("config: `{field}` {problem}. Fix: {fix}")]
    Config {
        field: &'static str,
        problem: String,
        fix: String,
    },

    #[error("config file {path}: {source}")]
    ConfigFile {
        path: PathBuf,
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    #[error(
        "interface `{iface}` does not exist in this network namespace. Fix: pass an existing interface (`ip link`) or run the agent in memcached's namespace"
    )]
    NoSuchInterface { iface: String },

    #[error(
        "interface `{iface}` already has an XDP program that this agent did not attach ({detail}). Fix: remove it (`ip link set dev {iface} xdp off`) if it is not needed, or run `cache-agent detach --iface {iface}` if it is a leftover of ours"
    )]
    XdpBusy { iface: String, detail: String },

    #[error("attaching `{program}` to `{iface}` failed: {source}. Fix: {fix}")]
    Attach {
        program: &'static str,
        iface: String,
        fix: &'static str,
        source: aya::programs::ProgramError,
    },

    #[error(
        "loading the eBPF object failed: {0}. Fix: needs root (or CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON) and a kernel with BTF, bpf_loop and spin locks (5.17+)"
    )]
    Load(#[from] aya::EbpfError),

    #[error("program `{program}` was rejected by the kernel: {source}")]
    Program {
        program: &'static str,
        source: aya::programs::ProgramError,
    },

    #[error("map `{map}`: {source}")]
    Map {
        map: &'static str,
        source: aya::maps::MapError,
    },

    #[error("pin {path}: {detail}")]
    Pin { path: PathBuf, detail: String },

    #[error(
        "memcached at {addr} is unreachable: {detail}. Fix: start memcached (with -U for UDP) or pass the right --memcached address"
    )]
    MemcachedUnreachable { addr: String, detail: String },

    #[error(
        "no running agent found for `{iface}` (no pins under {path}). Fix: start `cache-agent run --iface {iface} ...`"
    )]
    NotRunning { iface: String, path: PathBuf },

    #[error("{0}")]
    Io(#[from] std::io::Error),
}

pub type Result<T, E = AgentError> = std::result::Result<T, E>;
