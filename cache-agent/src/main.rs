//! The `cache-agent` binary: CLI, logging, and the `run` lifecycle.

#![allow(clippy::result_large_err, reason = "see lib.rs")]

use std::{path::PathBuf, process::ExitCode, sync::Arc};

use anyhow::Context as _;
use cache_agent::{
    coherence::{self, Shared},
    config::{DEFAULT_PIN_ROOT, RunArgs, Settings, other_layout_pin_dirs, pin_dir},
    error::AgentError,
    interface, kernel, loader, stats,
};
use clap::{Parser, Subcommand};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

/// In-kernel memcached cache: XDP answers UDP GET hits, TC fills, every write invalidates.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Attach in front of memcached and keep the cache coherent until SIGINT/SIGTERM.
    Run(RunArgs),
    /// Validate the configuration and print the effective settings; attaches nothing.
    CheckConfig(RunArgs),
    /// Print the kernel counters of a running agent.
    Stats(Target),
    /// What is attached where, the lease, and the cache fill.
    Status(Target),
    /// Stop the agent running on an interface (clean detach), and remove leftover pins.
    Detach(Target),
    /// Attach a plain XDP_PASS program and pin it (a veth peer needs one for XDP_TX).
    XdpPass {
        #[arg(long)]
        iface: String,
        /// Remove it instead.
        #[arg(long)]
        detach: bool,
        #[arg(long, default_value = DEFAULT_PIN_ROOT)]
        pin_root: PathBuf,
    },
    /// Zero-work XDP reflector answering every UDP get with END (benchmark ceiling).
    Reflector {
        #[arg(long)]
        iface: String,
        #[arg(long, default_value_t = 11211)]
        port: u16,
    },
}

#[derive(clap::Args)]
struct Target {
    #[arg(long, env = "CACHE_AGENT_IFACE")]
    iface: String,
    #[arg(long)]
    json: bool,
    #[arg(long, env = "CACHE_AGENT_PIN_ROOT", default_value = DEFAULT_PIN_ROOT)]
    pin_root: PathBuf,
}

/// Set once the logs are JSON: the error that ends the agent is then logged as JSON too.
static JSON_LOGS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn init_logging(json: bool) {
    use std::io::IsTerminal as _;
    use tracing_subscriber::{EnvFilter, fmt};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Under journald the journal stamps each line; do not add a second timestamp.
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    // Colours only for a person at a terminal: in a file, a pipe or the journal (which shows
    // such lines as "[blob data]") they are noise. NO_COLOR is the convention to turn them off.
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    JSON_LOGS.store(json, std::sync::atomic::Ordering::Relaxed);
    match (json, journald) {
        (true, _) => builder.json().init(),
        (false, true) => builder.without_time().init(),
        (false, false) => builder.init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::CheckConfig(args) => check_config(args),
        Command::Stats(t) => show_stats(t),
        Command::Status(t) => show_status(t),
        Command::Detach(t) => detach(t),
        Command::XdpPass {
            iface,
            detach,
            pin_root,
        } => xdp_pass(&iface, detach, &pin_root),
        Command::Reflector { iface, port } => reflector(&iface, port),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(mut e) => {
            if let Some(fix) = privilege_fix(&e) {
                e = e.context(fix);
            }
            if JSON_LOGS.load(std::sync::atomic::Ordering::Relaxed) {
                error!(error = format!("{e:#}"), "cache-agent stopped");
            } else {
                eprintln!("cache-agent: {e:#}");
            }
            ExitCode::FAILURE
        }
    }
}

/// The fix for an error that only says "permission denied" when this process is not root
/// (found by QA round 7: `run`, `status`, `stats` and `detach` said nothing more).
fn privilege_fix(e: &anyhow::Error) -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let denied = e.chain().any(|cause| {
        cause.downcast_ref::<std::io::Error>().is_some_and(|io| {
            io.kind() == std::io::ErrorKind::PermissionDenied
                || matches!(io.raw_os_error(), Some(libc::EPERM | libc::EACCES))
        }) || cause.to_string().contains("Permission denied")
            || cause.to_string().contains("Operation not permitted")
    });
    (denied && !root).then(|| {
        "permission denied, and cache-agent is not running as root. Fix: run it as root, or \
         with CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON (as the systemd unit does)"
            .to_string()
    })
}

fn check_config(args: RunArgs) -> anyhow::Result<()> {
    let s = Settings::resolve(&args)?;
    println!(
        "# The settings in effect (flags, CACHE_AGENT_* environment, --config file, defaults),\n\
         # as a file --config takes."
    );
    print!("{}", s.to_toml());
    let [b0, b1, b2, b3] = s.class_buckets;
    println!(
        "# map memory: {} bytes ({:.1} MiB) of kernel maps, charged to the agent's cgroup\n\
         # buckets per size class (128, 384, 768, 1536-byte slots): {b0}, {b1}, {b2}, {b3}; \
         key records: {}",
        s.map_bytes(),
        s.map_bytes() as f64 / (1u64 << 20) as f64,
        s.key_meta_slots
    );
    // The file may be checked on another host than the one it is for: a note, not an error.
    if interface::index(&s.iface) == 0 {
        eprintln!(
            "note: no interface named `{}` in this network namespace: `run` here would refuse \
             it",
            s.iface
        );
    }
    Ok(())
}

/// Loads the programs with the maps pinned in `dir`, writes the first configuration and
/// attaches: adopting the previous agent's links and warm cache (upgrade mode), or cold after
/// removing whatever pins are left.
fn bring_up(
    settings: &Settings,
    dir: &std::path::Path,
    adopting: bool,
    guard_window: u32,
) -> anyhow::Result<(aya::Ebpf, cache_common::Config, loader::Links)> {
    // The verifier gives up a load when a signal is pending for the loading thread, and the
    // retry (with its log on) takes many times longer: SIGTERM, SIGINT and SIGHUP go to the runtime's
    // other threads meanwhile, and are acted on once the programs are attached.
    let _quiet = SignalsElsewhere::new();
    if !adopting && dir.exists() {
        // A crashed or differently sized agent's pins: its links died with it; start cold.
        warn!(
            dir = %dir.display(),
            reason = loader::why_not_adopted(dir, settings),
            "removing pins left by a previous agent: starting cold"
        );
        let _ = std::fs::remove_dir_all(dir);
    }
    let up = load_and_attach(settings, dir, adopting, guard_window);
    if up.is_err() && !adopting {
        // Nothing attached: leave no pinned maps (the cache's memory) behind either.
        let _ = std::fs::remove_dir_all(dir);
    }
    up
}

fn load_and_attach(
    settings: &Settings,
    dir: &std::path::Path,
    adopting: bool,
    guard_window: u32,
) -> anyhow::Result<(aya::Ebpf, cache_common::Config, loader::Links)> {
    let mut ebpf = loader::load_pinned(settings, dir)?;
    let mut config = loader::initial_config(settings);
    config.guard_window = guard_window;
    config.max_reply_payload = loader::max_reply_payload(&settings.iface)?;
    if adopting {
        // Keep the epoch the cached entries were filled in: the cache stays warm. And which
        // memcached they came from: the health check flushes them if it is another process.
        let kept = kernel::pinned_config(dir)?;
        config.agent_epoch = kept.agent_epoch;
        if kept.memcached_pid == 0 {
            // Never told which memcached it holds: start from a clean epoch.
            config.agent_epoch = kept.agent_epoch.wrapping_add(1).max(1);
        }
        config.memcached_pid = kept.memcached_pid;
        config.memcached_started_s = kept.memcached_started_s;
        config.handover_evictions = kept.handover_evictions;
        config.handover_dropped = kept.handover_dropped;
    }
    kernel::write_config(&mut ebpf, &config)?;
    kernel::write_allowlist(&mut ebpf, &settings.allow)?;
    if settings.allow.is_empty() {
        warn!("no --allow list: the kernel answers every client that reaches the interface");
    }
    let links = if adopting {
        loader::adopt(&mut ebpf, settings, dir)?
    } else {
        loader::attach(&mut ebpf, settings)?
    };
    Ok((ebpf, config, links))
}

/// Says how many client connections memcached has from before the agent attached: the kernel
/// cannot know where their commands start, so each flushes the cache for a while (guard mode).
fn report_older_connections(settings: &Settings, guard_window: u32) {
    let own = cache_agent::backlog::own_sockets();
    let Ok(look) = cache_agent::backlog::snapshot(settings.memcached.port(), &own) else {
        return;
    };
    if look.connections > 0 {
        let window = if guard_window == 0 {
            cache_common::GUARD_WINDOW_DEFAULT
        } else {
            guard_window
        };
        warn!(
            connections = look.connections,
            guard_window_bytes = window,
            "memcached has client connections older than the agent: the kernel did not see \
             where their commands start, so each of them flushes the cache on every segment \
             until guard_window_bytes (memcached's item_size_max and a line) have passed on it; \
             hits may be rare until then. memcache_accel_tcp_flows_guarded_total counts them"
        );
    }
}

fn pid_file(iface: &str) -> PathBuf {
    PathBuf::from(format!("/run/cache-agent/{iface}.pid"))
}

/// Whether memcached answers `version` on `stream` within 2 s.
async fn memcached_answers_tcp(mut stream: tokio::net::TcpStream) -> bool {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut reply = [0u8; 64];
    let asked = async {
        stream.write_all(b"version\r\n").await.ok()?;
        let n = stream.read(&mut reply).await.ok()?;
        Some(reply[..n].starts_with(b"VERSION"))
    };
    matches!(
        tokio::time::timeout(std::time::Duration::from_secs(2), asked).await,
        Ok(Some(true))
    )
}

/// Whether memcached answers a UDP `version` on `port` (three tries, a second in all).
async fn memcached_answers_udp(addr: std::net::SocketAddr, port: u16) -> bool {
    let target = std::net::SocketAddr::new(addr.ip(), port);
    let bind: std::net::SocketAddr = if addr.is_ipv6() {
        "[::]:0".parse().expect("literal")
    } else {
        "0.0.0.0:0".parse().expect("literal")
    };
    let Ok(socket) = tokio::net::UdpSocket::bind(bind).await else {
        return false;
    };
    if socket.connect(target).await.is_err() {
        return false;
    }
    // Frame header: request id, sequence 0, one datagram, reserved.
    let request = b"\x4d\x43\x00\x00\x00\x01\x00\x00version\r\n";
    let mut reply = [0u8; 64];
    for _ in 0..3 {
        if socket.send(request).await.is_err() {
            return false;
        }
        let wait = tokio::time::timeout(
            std::time::Duration::from_millis(333),
            socket.recv(&mut reply),
        );
        if let Ok(Ok(n)) = wait.await
            && n > 8
            && reply[8..n].starts_with(b"VERSION")
        {
            return true;
        }
    }
    false
}

/// Blocks SIGTERM, SIGINT and SIGHUP on this thread until dropped.
struct SignalsElsewhere(libc::sigset_t);

impl SignalsElsewhere {
    fn new() -> Self {
        // SAFETY: a sigset built with sigemptyset/sigaddset, applied to this thread only.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGHUP);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            SignalsElsewhere(set)
        }
    }
}

impl Drop for SignalsElsewhere {
    fn drop(&mut self) {
        // SAFETY: unblocks what `new` blocked, on the same thread.
        unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &self.0, std::ptr::null_mut()) };
    }
}

/// This agent's pid file, from before it loads anything until it exits, however it exits.
struct PidFile(PathBuf);

impl PidFile {
    /// Holds the pid and the process's start time: together they name this process, whatever
    /// its binary is called, and never a later one given the same pid.
    fn create(iface: &str) -> PidFile {
        let path = pid_file(iface);
        let pid = std::process::id() as i32;
        let started = process_start_time(pid).unwrap_or(0);
        let written = std::fs::create_dir_all("/run/cache-agent")
            .and_then(|()| std::fs::write(&path, format!("{pid} {started}\n")));
        if let Err(e) = written {
            // Found by QA round 7: a read-only /run went unnoticed.
            warn!(
                path = %path.display(),
                error = %e,
                "could not write the pid file: `cache-agent detach` will not find this agent \
                 (stop it with SIGTERM). Fix: make /run/cache-agent writable (a tmpfs or a \
                 hostPath volume)"
            );
        }
        PidFile(path)
    }
}

/// Field `n` (counted from 3, the state) of `/proc/PID/stat`, if the process exists.
fn proc_stat_field(pid: i32, n: usize) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces or parentheses itself.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(n - 3).map(str::to_owned)
}

/// When process `pid` started (clock ticks since boot: field 22), if it exists.
fn process_start_time(pid: i32) -> Option<u64> {
    proc_stat_field(pid, 22)?.parse().ok()
}

/// Whether process `pid` exists and has not exited (an exited child its parent has not
/// reaped yet is a zombie: its agent is gone).
fn process_running(pid: i32) -> bool {
    proc_stat_field(pid, 3).is_some_and(|state| state != "Z" && state != "X")
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The pid of the cache-agent running for `iface`, per its pid file: None if there is no
/// pid file, or its process is gone or is another one (a pid used again: its start time
/// differs). By start time, not by name: an agent run from a renamed binary is found too
/// (found by QA round 5: a second `run` took its pins, and `detach` said it had stopped it).
/// A pid file without a start time (written by an older agent) falls back to the name.
fn running_agent(iface: &str) -> Option<i32> {
    let text = std::fs::read_to_string(pid_file(iface)).ok()?;
    let mut fields = text.split_whitespace();
    let pid: i32 = fields.next()?.parse().ok()?;
    if pid == std::process::id() as i32 {
        return None;
    }
    let alive = match fields.next().and_then(|f| f.parse::<u64>().ok()) {
        Some(started) if started != 0 => process_start_time(pid) == Some(started),
        _ => std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .is_ok_and(|comm| comm.trim().starts_with("cache-agent")),
    };
    alive.then_some(pid)
}

/// How long an agent's heartbeat ([`cache_common::Config::agent_heartbeat_ns`]) stays recent
/// after its last stamp: a few stamps, since a busy agent may stamp late.
const HEARTBEAT_STALE: std::time::Duration = std::time::Duration::from_secs(3);

/// How long ago the agent whose pins are under `dir` stamped its heartbeat, if lately: an
/// agent runs there, seen by its pid file or not (in a container, its pid is in another PID
/// namespace; found by QA round 7: `detach` on the node removed a pod's live pins).
fn recent_heartbeat(dir: &std::path::Path) -> Option<std::time::Duration> {
    let stamped = kernel::pinned_config(dir).ok()?.agent_heartbeat_ns;
    let age = std::time::Duration::from_nanos(kernel::coarse_now_ns().saturating_sub(stamped));
    (stamped != 0 && age < HEARTBEAT_STALE).then_some(age)
}

/// Waits for a heartbeat under `dir` to go stale (an agent that just crashed); an error if
/// an agent this process cannot see still stamps it.
fn wait_out_hidden_agent(dir: &std::path::Path, iface: &str) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + HEARTBEAT_STALE;
    if let Some(age) = recent_heartbeat(dir) {
        info!(
            heartbeat_age_ms = age.as_millis() as u64,
            "the pins of `{iface}` have a recent heartbeat and no agent this process can see: \
             waiting for it to go stale (an agent that just crashed)"
        );
    }
    while recent_heartbeat(dir).is_some() {
        if std::time::Instant::now() > deadline {
            anyhow::bail!(
                "a cache-agent this process cannot see (another PID namespace: a container?) \
                 still serves `{iface}`: its pins under {} are alive. Fix: stop that agent \
                 where it runs (its pod or container), or serve another interface",
                dir.display()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    Ok(())
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let settings = Settings::resolve(&args)?;
    init_logging(settings.json_logs);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run_async(settings))
}

async fn run_async(settings: Settings) -> anyhow::Result<()> {
    // Pins and pid file are per interface name: a second agent would take the first one's.
    if let Some(pid) = running_agent(&settings.iface) {
        anyhow::bail!(
            "another cache-agent (pid {pid}) already runs for an interface named `{iface}` (in \
             this or another network namespace: pins and pid files go by name). Fix: stop it \
             first (`cache-agent detach --iface {iface}`), or serve another interface",
            iface = settings.iface
        );
    }
    wait_out_hidden_agent(&settings.pin_dir(), &settings.iface)?;
    let _pid_file = PidFile::create(&settings.iface);
    // From here on SIGTERM and SIGINT are handled: one that arrives while the programs load
    // is acted on once they are attached, by the same clean detach as any other.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    // SIGHUP's default action ends the process without a word (and leaves the cache to the
    // next start): there is nothing to reload, so say so and keep serving.
    let mut hangup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            warn!(
                "SIGHUP ignored: cache-agent has no reload; restart it to apply a changed \
                 configuration"
            );
        }
    });
    // Refuse to start half-way: memcached must answer before anything is attached.
    let addr = settings.memcached;
    match tokio::time::timeout(
        std::time::Duration::from_secs(2),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    {
        Ok(Ok(stream)) => {
            // A stopped memcached still accepts connections (the kernel queues them): ask it
            // something, or its silence on UDP below is blamed on a missing -U (found by QA
            // round 7).
            if !memcached_answers_tcp(stream).await {
                anyhow::bail!(
                    "memcached at {addr} accepts connections but did not answer `version` \
                     within 2 s: it is stopped (SIGSTOP, a debugger) or overloaded. Fix: make \
                     memcached answer, then start the agent"
                );
            }
        }
        Ok(Err(e)) => {
            return Err(AgentError::MemcachedUnreachable {
                addr: addr.to_string(),
                detail: e.to_string(),
            }
            .into());
        }
        Err(_) => {
            return Err(AgentError::MemcachedUnreachable {
                addr: addr.to_string(),
                detail: "timed out".into(),
            }
            .into());
        }
    }
    if !memcached_answers_udp(addr, settings.udp_port).await {
        anyhow::bail!(
            "memcached at {addr} does not answer UDP on port {port}: without UDP no client \
             can use what the kernel caches. Fix: start memcached with `-U {port}` (UDP is off \
             by default since 1.5.6), or set `udp-port` to the port it uses",
            port = settings.udp_port
        );
    }
    let memcached_settings = coherence::memcached_settings(addr)
        .await
        .unwrap_or_default();
    let guard_window = coherence::guard_window_of(&memcached_settings).unwrap_or_else(|| {
        warn!(
            "could not read memcached's item_size_max (stats settings): a connection opened \
             before the agent flushes the cache on each segment until 1 GiB has passed on it"
        );
        0
    });
    if let Some(inter) = cache_agent::exposure::listen_setting(&memcached_settings) {
        let others = cache_agent::exposure::unseen_interfaces(
            inter,
            &settings.iface,
            &cache_agent::exposure::interface_addresses(),
        );
        if !others.is_empty() {
            warn!(
                memcached_listens_on = %inter,
                other_interfaces = ?others,
                "memcached can be reached through interfaces the agent does not watch: a delete, \
                 touch or incr sent through them is never seen by the kernel, which may keep \
                 serving the old value (stores are caught later by watch). Fix: bind memcached \
                 (-l) to the served interface's addresses and 127.0.0.1 only"
            );
        }
    }
    // Bound before anything is attached: a taken address fails the start, not the metrics.
    let metrics_listener = tokio::net::TcpListener::bind(settings.metrics_addr)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "`metrics-addr` {}: {e}. Fix: pick a free address with --metrics-addr (another \
                 agent or exporter may hold this one)",
                settings.metrics_addr
            )
        })?;
    if !loader::interface_exists(&settings.iface) {
        return Err(AgentError::NoSuchInterface {
            iface: settings.iface.clone(),
        }
        .into());
    }
    for old in other_layout_pin_dirs(&settings.pin_root, &settings.iface) {
        // Unpinning its links detaches the older agent's programs: this one starts cold.
        warn!(dir = %old.display(), "removing pins of an older agent version (another pin layout)");
        if let Err(e) = std::fs::remove_dir_all(&old) {
            warn!(dir = %old.display(), error = %e, "could not remove them");
        }
    }
    let dir = settings.pin_dir();
    // Upgrade mode: a previous agent left its programs attached and its cache pinned.
    let mut adopting = settings.keep_on_exit && loader::can_adopt(&dir, &settings);
    let (mut ebpf, mut config, links) = match bring_up(&settings, &dir, adopting, guard_window) {
        Ok(up) => up,
        Err(e) if adopting => {
            // Its links are gone (the interface was recreated, say): start cold.
            warn!(error = %e, "could not adopt the previous agent's programs; starting cold");
            adopting = false;
            bring_up(&settings, &dir, false, guard_window)?
        }
        Err(e) => return Err(e),
    };
    if links.tc_serve.is_some() {
        // XDP may hand hits it has no room for to TC ingress only once something is there.
        config.flags |= cache_common::flags::TC_SERVE;
        kernel::write_config(&mut ebpf, &config)?;
    }
    info!(
        iface = %settings.iface,
        memcached = %settings.memcached,
        capacity = settings.capacity_bytes,
        map_bytes = settings.map_bytes(),
        "attached; serving once memcached and the watch stream are confirmed"
    );
    if !adopting {
        report_older_connections(&settings, config.guard_window);
    }

    let ttl_queries = match ebpf.take_map(cache_common::names::TTL_QUERIES) {
        Some(map) => Some(aya::maps::RingBuf::try_from(map)?),
        None => None,
    };
    let shared = Shared::new(ebpf, config, settings.clone());
    // The kernel kept invalidating while no agent ran, so the first watch connection does not
    // flush an adopted cache unless memcached has evicted items (coherence::follow_watch).
    shared
        .skip_first_watch_resync
        .store(adopting, std::sync::atomic::Ordering::Relaxed);
    let lease = tokio::spawn(coherence::lease_loop(Arc::clone(&shared)));
    let heartbeat = tokio::spawn(coherence::heartbeat_loop(Arc::clone(&shared)));
    let watch = settings
        .watch
        .then(|| tokio::spawn(coherence::watch_loop(Arc::clone(&shared))));
    let learn = match (settings.learn_ttl, ttl_queries) {
        (true, Some(ring)) => Some(tokio::spawn(cache_agent::ttl::learn_loop(
            Arc::clone(&shared),
            ring,
        ))),
        _ => None,
    };
    // Not after an adoption: the kept cache is warm already.
    let warm = (settings.warm_start && !adopting)
        .then(|| tokio::spawn(cache_agent::warm::warm_start(Arc::clone(&shared))));
    let metrics = tokio::spawn(cache_agent::http::serve(
        metrics_listener,
        Arc::clone(&shared),
    ));
    let mut interface = tokio::spawn(cache_agent::interface::watch(
        Arc::clone(&shared),
        settings.iface.clone(),
        config.serve_ifindex,
    ));
    cache_agent::notify::ready();
    let watchdog = tokio::spawn(cache_agent::notify::watchdog_loop());

    let failure = tokio::select! {
        _ = term.recv() => { info!("SIGTERM: stopping"); None }
        _ = int.recv() => { info!("SIGINT: stopping"); None }
        gone = &mut interface => {
            let why = gone.unwrap_or_else(|e| format!("interface watch failed: {e}"));
            error!(reason = %why, "stopping: the programs are no longer attached where they serve");
            Some(why)
        }
    };
    cache_agent::notify::stopping();
    // Upgrade mode: memcached's loss counters for the next agent, read while this one still
    // serves and follows watch.
    let handover = if failure.is_none() && settings.keep_on_exit {
        cache_agent::coherence::handover_counters(&shared).await
    } else {
        None
    };
    interface.abort();
    watchdog.abort();
    lease.abort();
    heartbeat.abort();
    if let Some(w) = watch {
        w.abort();
    }
    if let Some(l) = learn {
        l.abort();
    }
    if let Some(w) = warm {
        w.abort();
    }
    metrics.abort();
    // A task aborted while it runs stops only at its next await: a lease renewal or heartbeat
    // already under way would land after the revoke (a fresh lease with no agent, found by a
    // CI run: a GET right after an upgrade-mode stop was answered by the kernel).
    for task in [lease, heartbeat] {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), task).await;
    }
    shared.revoke();
    if let Some(why) = failure {
        // Nothing worth keeping: the links died with the interface.
        let _ = std::fs::remove_dir_all(&dir);
        drop(shared);
        return Err(anyhow::anyhow!(
            "{why}; stopped so that the service manager starts the agent again on the \
             interface as it is now"
        ));
    }
    if settings.keep_on_exit {
        shared.record_handover(handover);
        shared.stop_heartbeat();
        let mut ebpf = shared.ebpf.lock().expect("ebpf lock");
        match loader::keep_attached(&mut ebpf, &dir, links) {
            Ok(()) => {
                info!(dir = %dir.display(), "upgrade mode: programs stay attached, cache kept (not serving until the next agent)");
                return Ok(());
            }
            Err(e) => error!(error = %e, "could not keep the programs attached; detaching"),
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    drop(shared);
    info!("detached");
    Ok(())
}

/// The kernel's counters as pinned by the agent on `t.iface`.
fn pinned_snapshot(t: &Target) -> anyhow::Result<kernel::Snapshot> {
    let dir = pin_dir(&t.pin_root, &t.iface);
    if !dir.exists() {
        return Err(AgentError::NotRunning {
            iface: t.iface.clone(),
            path: dir,
        }
        .into());
    }
    Ok(kernel::snapshot_from_pins(&dir)?)
}

fn show_stats(t: Target) -> anyhow::Result<()> {
    let snap = pinned_snapshot(&t)?;
    if t.json {
        println!("{}", stats::to_json(&snap));
    } else {
        print!("{}", stats::to_text(&snap));
    }
    Ok(())
}

fn show_status(t: Target) -> anyhow::Result<()> {
    let snap = pinned_snapshot(&t)?;
    let agent = running_agent(&t.iface);
    let m = stats::counters_by_name(&snap);
    let entries: i64 = (0..4)
        .map(|c| {
            m[format!("slots_filled_{c}").as_str()] as i64
                - m[format!("slots_cleared_{c}").as_str()] as i64
        })
        .sum();
    let status = serde_json::json!({
        "iface": t.iface,
        // null when no agent runs (crashed: the kernel serves until its lease runs out).
        "pid": agent,
        // How long ago an agent last wrote the configuration (null once it stopped): an
        // agent in another PID namespace has no pid here but a recent heartbeat.
        "heartbeat_age_ms": (snap.config.agent_heartbeat_ns != 0).then(|| kernel::coarse_now_ns().saturating_sub(snap.config.agent_heartbeat_ns) / 1_000_000),
        "serving": stats::serving(&snap),
        "lease_remaining_ms": snap.config.lease_until_ns.saturating_sub(kernel::coarse_now_ns()) / 1_000_000,
        // 0 while memcached answers the agent's probes late: the kernel fills nothing then.
        "fill_lease_remaining_ms": snap.config.fill_lease_until_ns.saturating_sub(kernel::coarse_now_ns()) / 1_000_000,
        "agent_epoch": snap.config.agent_epoch,
        "kernel_epoch": snap.state.kernel_epoch,
        // Slots in use: a flush (an epoch bump) makes entries dead without emptying their
        // slots, so they count until a fill reuses them.
        "entries": entries.max(0),
        "class_buckets": snap.config.class_buckets,
        "hit_ratio": stats::hit_ratio(&snap),
    });
    if t.json {
        println!("{status}");
    } else {
        println!("{}", serde_json::to_string_pretty(&status)?);
    }
    Ok(())
}

fn detach(t: Target) -> anyhow::Result<()> {
    let pid_path = pid_file(&t.iface);
    let dir = pin_dir(&t.pin_root, &t.iface);
    let mut stopped = None;
    if let Some(pid) = running_agent(&t.iface) {
        // SAFETY: sending a signal to the cache-agent the pid file names.
        if unsafe { libc::kill(pid, libc::SIGTERM) } == 0 {
            if !t.json {
                println!("asked agent {pid} to detach from {}", t.iface);
            }
            stopped = Some(pid);
            let mut gone = false;
            // An agent in upgrade mode hands over for 1.5 s before it exits.
            for _ in 0..100 {
                if !process_running(pid) {
                    gone = true;
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            // Its links live as long as its file descriptors: removing its pins would stop
            // nothing, and would take the next agent's guard away.
            if !gone {
                anyhow::bail!(
                    "agent {pid} did not stop within 10 s (stopped or hung?); its programs stay \
                     attached and its pins are left in place. Fix: `kill -KILL {pid}`, then run \
                     `cache-agent detach --iface {}` again",
                    t.iface
                );
            }
        }
    } else if let Some(age) = recent_heartbeat(&dir) {
        anyhow::bail!(
            "a cache-agent this process cannot see (another PID namespace: a container?) \
             serves `{}` (heartbeat {} ms ago); its pins are left in place. Fix: stop it where \
             it runs (delete its pod, or run `cache-agent detach` inside its container)",
            t.iface,
            age.as_millis()
        );
    }
    let _ = std::fs::remove_file(&pid_path);
    let removed = dir.exists();
    if removed {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        if !t.json {
            println!("removed pins under {}", dir.display());
        }
    }
    if t.json {
        // Found by QA round 7: `detach --json` printed nothing.
        let result = serde_json::json!({
            "iface": t.iface,
            "stopped_pid": stopped,
            "removed_pins": removed.then(|| dir.display().to_string()),
        });
        println!("{result}");
    }
    Ok(())
}

fn xdp_pass(iface: &str, detach: bool, pin_root: &std::path::Path) -> anyhow::Result<()> {
    let pin = pin_root.join(format!("peer-pass-{iface}"));
    if detach {
        let _ = std::fs::remove_file(&pin);
        return Ok(());
    }
    loader::attach_pass_pinned(iface, &pin)?;
    println!("attached xdp_pass to {iface}, pinned at {}", pin.display());
    Ok(())
}

fn reflector(iface: &str, port: u16) -> anyhow::Result<()> {
    use aya::programs::{Xdp, XdpMode};
    init_logging(false);
    let mut ebpf = aya::Ebpf::load(cache_agent::EBPF_OBJECT)?;
    let mut config = cache_common::Config::default();
    config.instances[0] = cache_common::Instance {
        tcp_port: port,
        udp_port: port,
    };
    kernel::write_config(&mut ebpf, &config)?;
    let prog: &mut Xdp = ebpf
        .program_mut(cache_common::names::XDP_REFLECTOR)
        .context("program")?
        .try_into()?;
    prog.load()?;
    prog.attach(iface, XdpMode::Driver)?;
    info!(iface, port, "reflector attached");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut term = signal(SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => {},
            _ = tokio::signal::ctrl_c() => {},
        }
        Ok::<_, anyhow::Error>(())
    })?;
    if let Err(e) = std::fs::metadata("/") {
        error!(error = %e, "unreachable");
    }
    Ok(())
}
