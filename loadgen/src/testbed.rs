//! A two-namespace veth testbed on one machine: `{name}-srv` runs memcached (and optionally the
//! cache agent or the zero-work reflector) behind veth `{name}s`; `{name}-cli` holds the peer
//! `{name}c` from which load is sent. Addresses come from 198.18.0.0/15 and 2001:2::/48
//! (benchmarking ranges), one /24 and one /64 per `subnet` index, so parallel testbeds never
//! collide.
//!
//! State (config and pid files) lives under `/run/loadgen-testbed/{name}/`, so another process
//! can tear a testbed down (`loadgen testbed down`). Dropping a [`Testbed`] removes everything it
//! made, also while a test unwinds from a panic, unless it was [`Testbed::persist`]ed.
//!
//! The agent and `xdp-pass` are started with `nsenter --net=…` (not `ip netns exec`, which
//! remounts `/sys` and hides `/sys/fs/bpf`).

use std::fs::{self, File};
use std::io::{self, Read as _, Write as _};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::{interrupt, netns};

/// Root of the per-testbed state directories.
pub const STATE_ROOT: &str = "/run/loadgen-testbed";
/// How long `start_agent` waits for the agent to report "attached".
pub const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long `start_memcached` waits for memcached to answer `version`.
pub const MEMCACHED_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a stopped process gets between SIGTERM and SIGKILL.
/// How long a process gets to exit after SIGTERM: an agent in upgrade mode hands over for
/// 1.5 s, and may wait for a warm start holding its maps, before it exits.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Longest a one-shot agent command (`stats`, `status`, `xdp-pass`) may run.
const AGENT_CMD_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors of testbed set-up, tear-down and process control.
#[derive(Debug, thiserror::Error)]
pub enum TestbedError {
    /// The testbed name cannot make valid namespace/interface names.
    #[error("invalid testbed name {name:?}: {reason}")]
    InvalidName {
        /// The name.
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// The subnet index is out of range.
    #[error("invalid testbed subnet {subnet}: must be 0..=250")]
    InvalidSubnet {
        /// The index.
        subnet: u8,
    },
    /// A program could not be started.
    #[error("cannot run {program}: {source} (is it installed and on PATH?)")]
    Spawn {
        /// The program.
        program: String,
        /// The OS error.
        source: io::Error,
    },
    /// A set-up command failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// Exit status.
        status: String,
        /// Its standard error.
        stderr: String,
    },
    /// A file under the state directory or a log could not be used.
    #[error("cannot access {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// memcached did not answer in time.
    #[error(
        "memcached in {netns} did not answer `version` on port {port} within {waited:?}; log: {log}"
    )]
    MemcachedNotReady {
        /// Server namespace.
        netns: String,
        /// Port.
        port: u16,
        /// How long we waited.
        waited: Duration,
        /// Log file.
        log: PathBuf,
    },
    /// The agent exited or did not report readiness.
    #[error("{what} on {iface} not ready after {waited:?}: {detail} (log {log})")]
    AgentNotReady {
        /// "agent" or "reflector".
        what: &'static str,
        /// Interface.
        iface: String,
        /// How long we waited.
        waited: Duration,
        /// Log file.
        log: PathBuf,
        /// "exited: STATUS" or "still running", and the last lines of the log.
        detail: String,
    },
    /// A one-shot agent command failed.
    #[error("`{agent} {args}` failed ({status}): {stderr}")]
    AgentCommand {
        /// Agent binary.
        agent: PathBuf,
        /// Arguments.
        args: String,
        /// Exit status.
        status: String,
        /// Its standard error.
        stderr: String,
    },
    /// No testbed of that name exists.
    #[error("no testbed named {name} (no {path})")]
    NotFound {
        /// The name.
        name: String,
        /// The missing state file.
        path: PathBuf,
    },
    /// Another live process owns a testbed of that name.
    #[error("testbed {name} is in use by pid {pid}; pick another --name or stop it")]
    InUse {
        /// The name.
        name: String,
        /// The owner's pid.
        pid: u32,
    },
    /// SIGINT or SIGTERM arrived while waiting (see [`crate::interrupt`]).
    #[error("interrupted by {}", crate::interrupt::signal_name(*signal))]
    Interrupted {
        /// The signal number.
        signal: i32,
    },
    /// The namespace could not be entered.
    #[error("cannot enter {netns}: {source}")]
    Netns {
        /// Namespace.
        netns: String,
        /// OS error.
        source: io::Error,
    },
}

/// What to build.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TestbedConfig {
    /// Short unique prefix; namespaces are "{name}-srv" / "{name}-cli", veths "{name}s" /
    /// "{name}c" (so at most 14 characters).
    pub name: String,
    /// Index 0..=250 selecting the /24 inside 198.18.0.0/15 and the /64 inside 2001:2::/48.
    pub subnet: u8,
    /// MTU of both veth ends (default 1500).
    pub mtu: u32,
    /// memcached's TCP and UDP port (default 11211).
    pub memcached_port: u16,
    /// Extra memcached arguments, e.g. `["-m", "1024", "-t", "2"]`.
    pub memcached_args: Vec<String>,
}

impl Default for TestbedConfig {
    fn default() -> Self {
        Self {
            name: "lgtb".to_owned(),
            subnet: 0,
            mtu: 1500,
            memcached_port: 11211,
            memcached_args: Vec::new(),
        }
    }
}

impl TestbedConfig {
    fn validate(&self) -> Result<(), TestbedError> {
        let bad = |reason| TestbedError::InvalidName {
            name: self.name.clone(),
            reason,
        };
        if self.name.is_empty() || self.name.len() > 14 {
            return Err(bad(
                "must be 1 to 14 characters (interface names are at most 15)",
            ));
        }
        if !self
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(bad("only letters, digits, '-' and '_' are allowed"));
        }
        if self.subnet > 250 {
            return Err(TestbedError::InvalidSubnet {
                subnet: self.subnet,
            });
        }
        Ok(())
    }
}

/// A child process started by this testbed, or one found through a pid file.
#[derive(Debug)]
enum Proc {
    /// Our child: can be waited for.
    Owned(Child),
    /// Started by another process (`testbed up`): signalled by pid after checking its name.
    Foreign(u32),
}

impl Proc {
    fn pid(&self) -> u32 {
        match self {
            Self::Owned(c) => c.id(),
            Self::Foreign(p) => *p,
        }
    }

    /// Exit status if it already exited (always `None` for a foreign process that still runs).
    fn try_exited(&mut self) -> Option<String> {
        match self {
            Self::Owned(c) => c.try_wait().ok().flatten().map(|s| s.to_string()),
            Self::Foreign(p) => (!pid_alive(*p)).then(|| "exited".to_owned()),
        }
    }

    /// Sends `sig`, waits up to the grace period, then SIGKILLs and waits.
    fn stop(mut self, sig: libc::c_int) {
        let pid = self.pid();
        signal(pid, sig);
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if self.try_exited().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        tracing::warn!(pid, "process ignored the signal; killing it");
        signal(pid, libc::SIGKILL);
        match &mut self {
            Self::Owned(c) => {
                let _ = c.wait();
            }
            Self::Foreign(p) => {
                let until = Instant::now() + STOP_GRACE;
                while pid_alive(*p) && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill has no memory-safety preconditions; pid is a positive process id.
    unsafe { libc::kill(pid as libc::pid_t, sig) };
}

/// True if `pid` exists and is not a zombie.
fn pid_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rfind(')')
            .and_then(|i| s[i + 1..].split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// True if process `pid`'s command line (arguments separated by NUL bytes) contains `needle`
/// (guards against pid reuse).
fn pid_runs(pid: u32, needle: &str) -> bool {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains(needle))
        .unwrap_or(false)
}

/// Start time of process `pid` in clock ticks since boot (`/proc/PID/stat` field 22): with the
/// pid it names one process, even after the pid is reused.
fn process_start_ticks(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields are counted after the command name, which may contain spaces; field 3 comes first.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The file in the state directory naming the process that built the testbed: "PID START_TICKS".
const OWNER_FILE: &str = "owner";

/// The pid recorded as owner of testbed `name`, if that process still runs (same pid and start
/// time). A testbed left by `testbed up`, or by a crashed run, has no live owner.
pub fn live_owner(name: &str) -> Option<u32> {
    let text = fs::read_to_string(state_dir(name).join(OWNER_FILE)).ok()?;
    let mut fields = text.split_whitespace().map(str::parse::<u64>);
    let (Some(Ok(pid)), Some(Ok(start))) = (fields.next(), fields.next()) else {
        return None;
    };
    let pid = u32::try_from(pid).ok()?;
    (pid_alive(pid) && process_start_ticks(pid) == Some(start)).then_some(pid)
}

/// Makes this process the owner of testbed `name`: refuses if another live process owns it,
/// removes what a dead owner left, then records this process. Runs under an exclusive lock per
/// name, so of two runs racing for a name one wins and the other is refused (rather than both
/// checking, then one tearing down what the other just built).
fn claim(name: &str) -> Result<(), TestbedError> {
    let root = Path::new(STATE_ROOT);
    fs::create_dir_all(root).map_err(io_err(root))?;
    // Beside the state directory, which the teardown removes.
    let lock_path = root.join(format!(".{name}.lock"));
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io_err(&lock_path))?;
    // SAFETY: flock has no memory-safety preconditions; the fd is open until `lock` drops,
    // which releases the lock.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(io_err(&lock_path)(io::Error::last_os_error()));
    }
    let me = std::process::id();
    if let Some(pid) = live_owner(name).filter(|&p| p != me) {
        return Err(TestbedError::InUse {
            name: name.to_owned(),
            pid,
        });
    }
    down(name)?;
    let dir = state_dir(name);
    fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let path = dir.join(OWNER_FILE);
    let start = process_start_ticks(me).unwrap_or(0);
    fs::write(&path, format!("{me} {start}\n")).map_err(io_err(&path))
}

/// The log files testbed `name` writes under /tmp (memcached, agent, reflector).
pub fn log_files(name: &str) -> [PathBuf; 3] {
    ["memcached", "agent", "reflector"]
        .map(|what| PathBuf::from(format!("/tmp/loadgen-testbed-{name}-{what}.log")))
}

/// A running testbed.
#[derive(Debug)]
pub struct Testbed {
    cfg: TestbedConfig,
    srv_ns: String,
    cli_ns: String,
    srv_if: String,
    cli_if: String,
    memcached: Option<Proc>,
    memcached_pid: u32,
    agent: Option<Proc>,
    agent_log: Option<PathBuf>,
    reflector: Option<Proc>,
    persistent: bool,
    /// Keep the /tmp logs on teardown (something failed; they explain what).
    keep_logs: bool,
}

/// Path of the cache-agent binary: env `CACHE_AGENT_BIN`; else `cache-agent` beside the current
/// executable (`target/{debug,release}/`), also one level up for test binaries in
/// `target/debug/deps/`; else `cache-agent` on PATH.
pub fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("CACHE_AGENT_BIN") {
        return PathBuf::from(p);
    }
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        let candidates = [
            Some(dir.join("cache-agent")),
            dir.parent().map(|p| p.join("cache-agent")),
        ];
        for c in candidates.into_iter().flatten() {
            if c.is_file() {
                return c;
            }
        }
    }
    PathBuf::from("cache-agent")
}

/// Path of the memcached binary: env `MEMCACHED_BIN`, else `memcached` on PATH.
pub fn memcached_bin() -> PathBuf {
    std::env::var_os("MEMCACHED_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("memcached"))
}

/// The state directory of testbed `name`.
pub fn state_dir(name: &str) -> PathBuf {
    Path::new(STATE_ROOT).join(name)
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> TestbedError + '_ {
    move |source| TestbedError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Runs a command to completion (bounded by `timeout`), returning its output.
fn run_bounded(mut cmd: Command, timeout: Duration) -> Result<Output, TestbedError> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    interrupt::prepare_child(&mut cmd);
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| TestbedError::Spawn {
            program: program.clone(),
            source,
        })?;
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(timeout) {
        Ok(r) => r,
        Err(_) => {
            signal(pid, libc::SIGKILL);
            rx.recv()
                .unwrap_or_else(|_| Err(io::Error::other("waiter thread vanished")))
        }
    };
    out.map_err(|source| TestbedError::Spawn { program, source })
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

fn status_text(s: &ExitStatus) -> String {
    s.to_string()
}

/// Runs `ip ARGS`, failing on a non-zero exit.
fn ip(args: &[&str]) -> Result<(), TestbedError> {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    let text = describe(&cmd);
    let out = run_bounded(cmd, Duration::from_secs(20))?;
    if !out.status.success() {
        return Err(TestbedError::Command {
            command: text,
            status: status_text(&out.status),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

/// Runs `ip ARGS`, ignoring failures (for idempotent clean-up).
fn ip_quiet(args: &[&str]) {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    let _ = run_bounded(cmd, Duration::from_secs(20));
}

fn read_pid(path: &Path) -> Option<u32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join(" | ")
}

/// Removes testbed `name`: kills the processes recorded in its pid files (after checking their
/// command line), deletes both namespaces (which deletes the veth pair), unpins the client
/// veth's xdp-pass link, removes the state directory and the /tmp logs. Idempotent; tolerates
/// partial state.
pub fn down(name: &str) -> Result<(), TestbedError> {
    teardown(name, false)
}

/// [`down`], but the /tmp logs stay (for diagnosing a failed run); returns those that exist.
pub fn down_keeping_logs(name: &str) -> Result<Vec<PathBuf>, TestbedError> {
    teardown(name, true)?;
    Ok(log_files(name).into_iter().filter(|p| p.exists()).collect())
}

fn teardown(name: &str, keep_logs: bool) -> Result<(), TestbedError> {
    TestbedConfig {
        name: name.to_owned(),
        ..TestbedConfig::default()
    }
    .validate()?;
    let dir = state_dir(name);
    // The agent and reflector are recognised by their `--iface {name}s` argument, whatever the
    // binary is called; memcached by its name.
    let srv_if = format!("--iface\0{name}s\0");
    for (file, needle) in [
        ("agent.pid", srv_if.as_str()),
        ("reflector.pid", srv_if.as_str()),
        ("memcached.pid", "memcached"),
    ] {
        if let Some(pid) = read_pid(&dir.join(file))
            && pid_alive(pid)
            && pid_runs(pid, needle)
        {
            tracing::info!(testbed = name, pid, file, "stopping");
            Proc::Foreign(pid).stop(libc::SIGTERM);
        }
    }
    for ns in [format!("{name}-srv"), format!("{name}-cli")] {
        if Path::new("/run/netns").join(&ns).exists() {
            ip_quiet(&["netns", "del", &ns]);
        }
    }
    // A veth left in the root namespace by an interrupted set-up.
    for link in [format!("{name}s"), format!("{name}c")] {
        if Path::new("/sys/class/net").join(&link).exists() {
            ip_quiet(&["link", "del", &link]);
        }
    }
    // The client veth's xdp-pass link is pinned in bpffs, outside the namespace: unpin it (the
    // agent knows where its pins live).
    let mut unpin = Command::new(agent_bin());
    unpin.args(["xdp-pass", "--detach", "--iface", &format!("{name}c")]);
    let _ = run_bounded(unpin, Duration::from_secs(20));
    if dir.exists() {
        fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
    }
    if !keep_logs {
        for log in log_files(name) {
            let _ = fs::remove_file(log);
        }
    }
    Ok(())
}

impl Testbed {
    /// Builds the testbed and starts memcached. Refuses ([`TestbedError::InUse`]) when another
    /// live process owns a testbed of this name; leftovers of a dead owner are removed first.
    pub fn up(cfg: TestbedConfig) -> Result<Testbed, TestbedError> {
        cfg.validate()?;
        claim(&cfg.name)?;
        let mut tb = Self::from_config(cfg);
        // From here on, Drop cleans up whatever part was built.
        tb.build()?;
        tb.start_memcached()?;
        Ok(tb)
    }

    /// Attaches to a testbed made by another process (`loadgen testbed up`). Dropping the
    /// handle leaves the testbed running; processes started through it are stopped on drop.
    pub fn open(name: &str) -> Result<Testbed, TestbedError> {
        let dir = state_dir(name);
        let path = dir.join("config.json");
        let text = fs::read_to_string(&path).map_err(|_| TestbedError::NotFound {
            name: name.to_owned(),
            path: path.clone(),
        })?;
        let cfg: TestbedConfig = serde_json::from_str(&text).map_err(|e| TestbedError::Io {
            path: path.clone(),
            source: io::Error::new(io::ErrorKind::InvalidData, e),
        })?;
        let mut tb = Self::from_config(cfg);
        tb.persistent = true;
        if let Some(pid) = read_pid(&dir.join("memcached.pid")).filter(|&p| pid_alive(p)) {
            tb.memcached = Some(Proc::Foreign(pid));
            tb.memcached_pid = pid;
        }
        // An agent or reflector started by `testbed up --agent` can be stopped through this
        // handle (compare mode needs memcached alone for its plain arm).
        let srv_if = format!("--iface\0{name}s\0");
        let alive = |file: &str| {
            read_pid(&dir.join(file)).filter(|&p| pid_alive(p) && pid_runs(p, &srv_if))
        };
        tb.agent = alive("agent.pid").map(Proc::Foreign);
        tb.reflector = alive("reflector.pid").map(Proc::Foreign);
        let [_, log, _] = log_files(name);
        tb.agent_log = log.exists().then_some(log);
        Ok(tb)
    }

    fn from_config(cfg: TestbedConfig) -> Self {
        let n = &cfg.name;
        Self {
            srv_ns: format!("{n}-srv"),
            cli_ns: format!("{n}-cli"),
            srv_if: format!("{n}s"),
            cli_if: format!("{n}c"),
            cfg,
            memcached: None,
            memcached_pid: 0,
            agent: None,
            agent_log: None,
            reflector: None,
            persistent: false,
            keep_logs: false,
        }
    }

    fn build(&mut self) -> Result<(), TestbedError> {
        let dir = state_dir(&self.cfg.name);
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let cfg_path = dir.join("config.json");
        let json = serde_json::to_string_pretty(&self.cfg).expect("config serializes");
        fs::write(&cfg_path, json).map_err(io_err(&cfg_path))?;

        ip(&["netns", "add", &self.srv_ns])?;
        ip(&["netns", "add", &self.cli_ns])?;
        ip(&[
            "link",
            "add",
            &self.srv_if,
            "netns",
            &self.srv_ns,
            "type",
            "veth",
            "peer",
            "name",
            &self.cli_if,
            "netns",
            &self.cli_ns,
        ])?;
        let mtu = self.cfg.mtu.to_string();
        let s = self.cfg.subnet;
        for (ns, ifc, host) in [
            (&self.srv_ns, &self.srv_if, 1u8),
            (&self.cli_ns, &self.cli_if, 2u8),
        ] {
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["-n", ns, "link", "set", ifc, "mtu", &mtu, "up"])?;
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("198.18.{s}.{host}/24"),
                "dev",
                ifc,
            ])?;
            ip(&[
                "-n",
                ns,
                "-6",
                "addr",
                "add",
                &format!("2001:2:0:{s:x}::{host}/64"),
                "dev",
                ifc,
                "nodad",
            ])?;
        }
        tracing::info!(testbed = %self.cfg.name, server_ns = %self.srv_ns, client_ns = %self.cli_ns, "namespaces and veth ready");
        // XDP_TX on veth only reaches the peer when the peer has an XDP program.
        match self.agent_cmd_in(&self.cli_ns, &["xdp-pass", "--iface", &self.cli_if]) {
            Ok(_) => tracing::info!(iface = %self.cli_if, "xdp-pass attached on client veth"),
            Err(e) => tracing::warn!(iface = %self.cli_if, error = %e,
                "cannot attach xdp-pass on the client veth; accelerated replies (XDP_TX) will not arrive, memcached-only operation is fine"),
        }
        Ok(())
    }

    /// The testbed's configuration.
    pub fn config(&self) -> &TestbedConfig {
        &self.cfg
    }

    /// Testbed name.
    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    /// 198.18.{subnet}.1.
    pub fn server_v4(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.cfg.subnet, 1)
    }

    /// 198.18.{subnet}.2.
    pub fn client_v4(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.cfg.subnet, 2)
    }

    /// 2001:2:0:{subnet}::1.
    pub fn server_v6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0x2001, 2, 0, self.cfg.subnet as u16, 0, 0, 0, 1)
    }

    /// 2001:2:0:{subnet}::2.
    pub fn client_v6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0x2001, 2, 0, self.cfg.subnet as u16, 0, 0, 0, 2)
    }

    /// Server-side veth, "{name}s".
    pub fn server_iface(&self) -> &str {
        &self.srv_if
    }

    /// Client-side veth, "{name}c".
    pub fn client_iface(&self) -> &str {
        &self.cli_if
    }

    /// "{name}-srv".
    pub fn server_netns(&self) -> &str {
        &self.srv_ns
    }

    /// "{name}-cli".
    pub fn client_netns(&self) -> &str {
        &self.cli_ns
    }

    /// memcached's port (TCP and UDP).
    pub fn memcached_port(&self) -> u16 {
        self.cfg.memcached_port
    }

    /// memcached's IPv4 socket address as seen from the client namespace.
    pub fn memcached_addr(&self) -> SocketAddr {
        SocketAddr::from((self.server_v4(), self.cfg.memcached_port))
    }

    /// memcached's pid (0 if not running).
    pub fn memcached_pid(&self) -> u32 {
        self.memcached_pid
    }

    /// memcached's log file.
    pub fn memcached_log(&self) -> PathBuf {
        let [memcached, _, _] = log_files(&self.cfg.name);
        memcached
    }

    /// (Re)starts memcached in the server namespace, listening on the server's IPv4 and IPv6
    /// addresses and 127.0.0.1, TCP and UDP; returns once it answers `version`.
    pub fn start_memcached(&mut self) -> Result<(), TestbedError> {
        self.stop_memcached();
        let port = self.cfg.memcached_port.to_string();
        let listen = format!("{},[{}],127.0.0.1", self.server_v4(), self.server_v6());
        let log_path = self.memcached_log();
        let log = File::create(&log_path).map_err(io_err(&log_path))?;
        let log2 = log.try_clone().map_err(io_err(&log_path))?;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!(
            "--net={}",
            netns::netns_path(&self.srv_ns).display()
        ))
        .arg(memcached_bin())
        .args(["-u", "root", "-l", &listen, "-p", &port, "-U", &port])
        .args(&self.cfg.memcached_args)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2);
        interrupt::prepare_child(&mut cmd);
        tracing::debug!(command = %describe(&cmd), "starting memcached");
        let child = cmd.spawn().map_err(|source| TestbedError::Spawn {
            program: "nsenter".into(),
            source,
        })?;
        self.memcached_pid = child.id();
        self.memcached = Some(Proc::Owned(child));
        self.write_pid("memcached.pid", self.memcached_pid)?;

        let started = Instant::now();
        let port = self.cfg.memcached_port;
        loop {
            let exited = self.memcached.as_mut().and_then(Proc::try_exited);
            let ready = exited.is_none()
                && self
                    .in_server(move || memcached_answers(SocketAddr::from(([127, 0, 0, 1], port))));
            if ready {
                tracing::info!(pid = self.memcached_pid, netns = %self.srv_ns, port, "memcached ready");
                return Ok(());
            }
            if let Some(signal) = interrupt::received() {
                return Err(TestbedError::Interrupted { signal });
            }
            if exited.is_some() || started.elapsed() > MEMCACHED_READY_TIMEOUT {
                let waited = started.elapsed();
                self.keep_logs = true;
                self.stop_memcached();
                return Err(TestbedError::MemcachedNotReady {
                    netns: self.srv_ns.clone(),
                    port,
                    waited,
                    log: log_path,
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops memcached (SIGTERM, then wait; SIGKILL after a grace period).
    pub fn stop_memcached(&mut self) {
        if let Some(p) = self.memcached.take()
            && (matches!(p, Proc::Owned(_)) || pid_runs(p.pid(), "memcached"))
        {
            p.stop(libc::SIGTERM);
        }
        self.memcached_pid = 0;
        let _ = fs::remove_file(state_dir(&self.cfg.name).join("memcached.pid"));
    }

    /// Runs `f` on a new thread that has joined the client namespace and returns its result.
    pub fn in_client<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> R {
        netns::run_in(&self.cli_ns, f)
            .unwrap_or_else(|e| panic!("cannot enter namespace {}: {e}", self.cli_ns))
    }

    /// Runs `f` on a new thread that has joined the server namespace and returns its result.
    pub fn in_server<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> R {
        netns::run_in(&self.srv_ns, f)
            .unwrap_or_else(|e| panic!("cannot enter namespace {}: {e}", self.srv_ns))
    }

    /// Starts the agent in the server namespace:
    /// `nsenter --net=/run/netns/{srv} {agent_bin} run --iface {server_iface}
    /// --memcached {server_v4}:{port} {extra...}`, output to a log under /tmp, and waits until
    /// [`Testbed::agent_ready`] (at most 20 s).
    pub fn start_agent(&mut self, extra_args: &[&str]) -> Result<(), TestbedError> {
        self.stop_agent();
        let mc = format!("{}:{}", self.server_v4(), self.cfg.memcached_port);
        let mut args = vec!["run", "--iface", &self.srv_if, "--memcached", &mc];
        args.extend_from_slice(extra_args);
        let [_, log, _] = log_files(&self.cfg.name);
        let proc_ = self.spawn_agent(&args, &log)?;
        self.write_pid("agent.pid", proc_.pid())?;
        self.agent = Some(proc_);
        self.agent_log = Some(log.clone());
        let started = Instant::now();
        loop {
            if let Some(status) = self.agent.as_mut().and_then(Proc::try_exited) {
                self.agent = None;
                let _ = fs::remove_file(state_dir(&self.cfg.name).join("agent.pid"));
                return Err(self.not_ready("agent", started, format!("exited: {status}"), &log));
            }
            if self.agent_ready() {
                tracing::info!(pid = self.agent_pid(), iface = %self.srv_if, "agent attached");
                return Ok(());
            }
            // The agent stays recorded: the teardown stops it like any other.
            if let Some(signal) = interrupt::received() {
                return Err(TestbedError::Interrupted { signal });
            }
            if started.elapsed() > AGENT_READY_TIMEOUT {
                let err = self.not_ready("agent", started, "still running".into(), &log);
                self.stop_agent();
                return Err(err);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The error for an agent or reflector that did not come up; its log is kept for diagnosis.
    fn not_ready(
        &mut self,
        what: &'static str,
        started: Instant,
        state: String,
        log: &Path,
    ) -> TestbedError {
        self.keep_logs = true;
        TestbedError::AgentNotReady {
            what,
            iface: self.srv_if.clone(),
            waited: started.elapsed(),
            log: log.to_owned(),
            detail: format!("{state}; log tail: {}", log_tail(log, 5)),
        }
    }

    fn spawn_agent(&self, args: &[&str], log: &Path) -> Result<Proc, TestbedError> {
        let out = File::create(log).map_err(io_err(log))?;
        let err = out.try_clone().map_err(io_err(log))?;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!(
            "--net={}",
            netns::netns_path(&self.srv_ns).display()
        ))
        .arg(agent_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
        interrupt::prepare_child(&mut cmd);
        tracing::debug!(command = %describe(&cmd), "starting agent");
        let child = cmd.spawn().map_err(|source| TestbedError::Spawn {
            program: "nsenter".into(),
            source,
        })?;
        Ok(Proc::Owned(child))
    }

    /// True once the running agent logged a line containing "attached", or
    /// `cache-agent status --iface {server_iface}` exits 0.
    pub fn agent_ready(&self) -> bool {
        if self.agent.is_none() {
            return false;
        }
        if let Some(log) = &self.agent_log
            && fs::read_to_string(log).is_ok_and(|t| t.contains("attached"))
        {
            return true;
        }
        self.agent_cmd(&["status", "--iface", &self.srv_if]).is_ok()
    }

    /// How the agent ended, once it has exited by itself (None while it runs).
    pub fn agent_exit(&mut self) -> Option<String> {
        let status = self.agent.as_mut().and_then(Proc::try_exited)?;
        self.agent = None;
        let _ = fs::remove_file(state_dir(&self.cfg.name).join("agent.pid"));
        Some(status)
    }

    /// The agent's pid, if this handle started it and it runs.
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(Proc::pid)
    }

    /// Stops the agent with SIGTERM and waits (a clean detach).
    pub fn stop_agent(&mut self) {
        if let Some(p) = self.agent.take() {
            p.stop(libc::SIGTERM);
        }
        let _ = fs::remove_file(state_dir(&self.cfg.name).join("agent.pid"));
    }

    /// Kills the agent with SIGKILL and waits (a crash: links stay pinned if it pinned them).
    pub fn kill_agent(&mut self) {
        if let Some(p) = self.agent.take() {
            p.stop(libc::SIGKILL);
        }
        let _ = fs::remove_file(state_dir(&self.cfg.name).join("agent.pid"));
    }

    /// The agent's log file (set once an agent was started).
    pub fn agent_log(&self) -> Option<PathBuf> {
        self.agent_log.clone()
    }

    /// Starts the zero-work XDP reflector (`cache-agent reflector --iface {server_iface}`) in the
    /// server namespace; ready when it logs "attached" (or after 2 s if it keeps running).
    pub fn start_reflector(&mut self) -> Result<(), TestbedError> {
        self.stop_reflector();
        let [_, _, log] = log_files(&self.cfg.name);
        let p = self.spawn_agent(&["reflector", "--iface", &self.srv_if], &log)?;
        // Recorded at once, so a teardown in the meantime (another process's `down`) finds it.
        self.write_pid("reflector.pid", p.pid())?;
        self.reflector = Some(p);
        let started = Instant::now();
        loop {
            if let Some(status) = self.reflector.as_mut().and_then(Proc::try_exited) {
                self.reflector = None;
                let _ = fs::remove_file(state_dir(&self.cfg.name).join("reflector.pid"));
                return Err(self.not_ready(
                    "reflector",
                    started,
                    format!("exited: {status}"),
                    &log,
                ));
            }
            let attached = fs::read_to_string(&log).is_ok_and(|t| t.contains("attached"));
            if attached || started.elapsed() > Duration::from_secs(2) {
                return Ok(());
            }
            if let Some(signal) = interrupt::received() {
                return Err(TestbedError::Interrupted { signal });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the reflector (SIGTERM + wait).
    pub fn stop_reflector(&mut self) {
        if let Some(p) = self.reflector.take() {
            p.stop(libc::SIGTERM);
        }
        let _ = fs::remove_file(state_dir(&self.cfg.name).join("reflector.pid"));
    }

    /// Runs `{agent_bin} {args}` in the server namespace to completion; returns its stdout.
    pub fn agent_cmd(&self, args: &[&str]) -> Result<String, TestbedError> {
        self.agent_cmd_in(&self.srv_ns, args)
    }

    fn agent_cmd_in(&self, ns: &str, args: &[&str]) -> Result<String, TestbedError> {
        let bin = agent_bin();
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", netns::netns_path(ns).display()))
            .arg(&bin)
            .args(args);
        let out = run_bounded(cmd, AGENT_CMD_TIMEOUT)?;
        if !out.status.success() {
            return Err(TestbedError::AgentCommand {
                agent: bin,
                args: args.join(" "),
                status: status_text(&out.status),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn write_pid(&self, file: &str, pid: u32) -> Result<(), TestbedError> {
        let dir = state_dir(&self.cfg.name);
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let path = dir.join(file);
        let mut f = File::create(&path).map_err(io_err(&path))?;
        writeln!(f, "{pid}").map_err(io_err(&path))
    }

    /// Keeps the /tmp logs when the testbed is torn down (call when the run failed); the
    /// teardown prints where they are.
    pub fn keep_logs(&mut self) {
        self.keep_logs = true;
    }

    /// Leaves the testbed running when this handle is dropped (for `loadgen testbed up`); tear
    /// it down later with [`down`].
    pub fn persist(mut self) {
        self.persistent = true;
        // Forget our Child handles without killing: the processes keep running.
        self.memcached = None;
        self.agent = None;
        self.reflector = None;
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if self.persistent {
            // An attached handle stops only what it started itself.
            if matches!(self.agent, Some(Proc::Owned(_))) {
                self.stop_agent();
            }
            if matches!(self.reflector, Some(Proc::Owned(_))) {
                self.stop_reflector();
            }
            return;
        }
        self.stop_agent();
        self.stop_reflector();
        self.stop_memcached();
        let name = &self.cfg.name;
        if !self.keep_logs {
            if let Err(e) = down(name) {
                tracing::warn!(testbed = %name, error = %e, "testbed clean-up incomplete");
            }
            return;
        }
        match down_keeping_logs(name) {
            Ok(logs) if !logs.is_empty() => {
                let list: Vec<String> = logs.iter().map(|p| p.display().to_string()).collect();
                eprintln!(
                    "testbed {name} removed; its logs are kept: {}",
                    list.join(" ")
                );
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(testbed = %name, error = %e, "testbed clean-up incomplete");
            }
        }
    }
}

/// True if a memcached at `addr` answers `version` within a short time.
pub fn memcached_answers(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(300)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"version\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"VERSION"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_addresses() {
        let tb = Testbed::from_config(TestbedConfig {
            name: "lgx".into(),
            subnet: 42,
            ..TestbedConfig::default()
        });
        assert_eq!(tb.server_netns(), "lgx-srv");
        assert_eq!(tb.client_netns(), "lgx-cli");
        assert_eq!(tb.server_iface(), "lgxs");
        assert_eq!(tb.client_iface(), "lgxc");
        assert_eq!(tb.server_v4(), Ipv4Addr::new(198, 18, 42, 1));
        assert_eq!(tb.client_v4(), Ipv4Addr::new(198, 18, 42, 2));
        assert_eq!(tb.server_v6().to_string(), "2001:2:0:2a::1");
        assert_eq!(tb.client_v6().to_string(), "2001:2:0:2a::2");
        let mut tb = tb;
        tb.persistent = true;
    }

    #[test]
    fn rejects_bad_names() {
        for name in ["", "this-name-is-too-long", "a b", "x/y"] {
            let cfg = TestbedConfig {
                name: name.into(),
                ..TestbedConfig::default()
            };
            assert!(cfg.validate().is_err(), "{name:?}");
        }
        let cfg = TestbedConfig {
            subnet: 251,
            ..TestbedConfig::default()
        };
        assert!(matches!(
            cfg.validate(),
            Err(TestbedError::InvalidSubnet { .. })
        ));
    }

    #[test]
    fn a_live_owner_keeps_its_testbed_a_dead_one_does_not_needs_root() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root");
            return;
        }
        let name = "lgown";
        let dir = state_dir(name);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let mut other = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = other.id();
        let start = process_start_ticks(pid).unwrap();
        fs::write(dir.join(OWNER_FILE), format!("{pid} {start}\n")).unwrap();
        fs::write(dir.join("config.json"), "{}").unwrap();
        assert_eq!(live_owner(name), Some(pid));
        let cfg = TestbedConfig {
            name: name.into(),
            subnet: 242,
            ..TestbedConfig::default()
        };
        let err = Testbed::up(cfg).unwrap_err();
        assert!(
            matches!(err, TestbedError::InUse { pid: p, .. } if p == pid),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            format!("testbed {name} is in use by pid {pid}; pick another --name or stop it")
        );
        assert!(
            dir.join("config.json").exists(),
            "the owner's state must stay"
        );

        // Same pid, other start time: the pid was reused, the owner is gone.
        fs::write(dir.join(OWNER_FILE), format!("{pid} {}\n", start + 1)).unwrap();
        assert_eq!(live_owner(name), None);
        fs::write(dir.join(OWNER_FILE), format!("{pid} {start}\n")).unwrap();
        other.kill().unwrap();
        other.wait().unwrap();
        assert_eq!(live_owner(name), None);
        claim(name).unwrap();
        assert!(
            !dir.join("config.json").exists(),
            "a dead owner's state is removed"
        );
        assert_eq!(live_owner(name), Some(std::process::id()));
        down(name).unwrap();
        assert!(!dir.exists());
    }

    #[test]
    fn agent_bin_honours_env() {
        // Only read here: other tests do not set it, and the binary path logic is pure.
        if std::env::var_os("CACHE_AGENT_BIN").is_none() {
            let p = agent_bin();
            assert!(p.ends_with("cache-agent"));
        }
    }
}
