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

    /// The underlying error is part of `problem`, not a `source`: printing the error chain
    /// would otherwise repeat it.
    #[error("config file {path} {problem}. Fix: {fix}")]
    ConfigFile {
        path: PathBuf,
        problem: String,
        fix: &'static str,
    },

    #[error(
        "interface `{iface}` does not exist in this network namespace. Fix: pass an existing interface (`ip link`) or run the agent in memcached's namespace"
    )]
    NoSuchInterface { iface: String },

    // `ip link set ... xdp off` only removes a program attached through netlink; one held by
    // a bpf_link refuses it ("Can't replace active BPF XDP link"), so the fix tells them apart.
    #[error(
        "interface `{iface}` already has an XDP program that this agent did not attach ({detail}). Fix: see what is attached with `bpftool net show dev {iface}` (and `bpftool link show` for links and the processes holding them); a program attached with `ip link` (netlink) is removed with `ip link set dev {iface} xdp off` (`xdpgeneric off` if bpftool says generic); one held by a bpf link must be released by the process that owns it (`cache-agent detach --iface {iface}` if it is another cache-agent's), or by removing its pin from /sys/fs/bpf if the link is pinned"
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

    // Transparent: with `{0}` the chain printed the io error twice (as message and as source).
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

pub type Result<T, E = AgentError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xdp_busy_tells_netlink_and_link_attachments_apart() {
        let e = AgentError::XdpBusy {
            iface: "eth1".into(),
            detail: "Device or resource busy".into(),
        }
        .to_string();
        for part in [
            "bpftool net show dev eth1",
            "`ip link set dev eth1 xdp off`",
            "bpf link",
            "cache-agent detach --iface eth1",
        ] {
            assert!(e.contains(part), "{part}: {e}");
        }
    }

    #[test]
    fn io_errors_print_once() {
        let e = AgentError::from(std::io::Error::from_raw_os_error(2));
        let text = format!("{:#}", anyhow::Error::from(e));
        assert_eq!(text.matches("os error 2").count(), 1, "{text}");
    }

    #[test]
    fn config_file_errors_have_no_source_to_print_twice() {
        let e = AgentError::ConfigFile {
            path: "/etc/agent.toml".into(),
            problem: "cannot be read: No such file or directory (os error 2)".into(),
            fix: "pass an existing file",
        };
        assert!(std::error::Error::source(&e).is_none());
        assert_eq!(
            e.to_string(),
            "config file /etc/agent.toml cannot be read: No such file or directory (os error 2). Fix: pass an existing file"
        );
    }
}
