//! A real Prometheus (Debian's `/usr/bin/prometheus`) scrapes a real agent (needs root).
//!
//! The agent, memcached and Prometheus run in the server namespace `prmsrv` of a veth pair
//! (`prm0` 198.18.250.1/24 there, `prm1` 198.18.250.2/24 in `prmcli`); the agent runs with only
//! the three capabilities the systemd unit and the DaemonSet grant. UDP gets from the client
//! namespace make kernel hits, and the test asks Prometheus's HTTP API, from a thread that has
//! joined `prmsrv`, for the kernel hit ratio. Along the way: the scrape is healthy (so the
//! exposition parses), histogram quantiles come out, every dashboard query is valid PromQL and
//! every alert rule evaluates.

use std::{
    fs::File,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::{fd::AsRawFd, unix::net::UnixDatagram},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use cache_common::{END, FRAME_HEADER_LEN, GET, VALUE};
use serde_json::Value;

const SERVER_NS: &str = "prmsrv";
const CLIENT_NS: &str = "prmcli";
const SERVER_IF: &str = "prm0";
const CLIENT_IF: &str = "prm1";
const SERVER_IP: &str = "198.18.250.1";
const CLIENT_IP: &str = "198.18.250.2";
const MEMCACHED_PORT: u16 = 11211;
const PROMETHEUS_BIN: &str = "/usr/bin/prometheus";
/// How long the agent may take to attach and serve, and the hit ratio to show up.
const READY_LIMIT: Duration = Duration::from_secs(20);
const HIT_LIMIT: Duration = Duration::from_secs(30);

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// `CACHE_AGENT_BIN`; else `cache-agent` in the target directory this test was built in; else
/// `target/debug/cache-agent` under the workspace root.
fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("CACHE_AGENT_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().unwrap();
    // target/debug/deps/prometheus-<hash> -> target/debug/cache-agent
    let beside = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("cache-agent"));
    let candidates = [beside, Some(root().join("target/debug/cache-agent"))];
    candidates.into_iter().flatten().find(|p| p.is_file()).unwrap_or_else(|| {
        panic!("no cache-agent binary: run `cargo build -p cache-agent` first, or set CACHE_AGENT_BIN")
    })
}

/// A scratch directory, removed on drop unless the test failed (then its logs stay).
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("prometheus-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("logs kept in {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

// ---------------------------------------------------------------- namespaces and processes

fn sh(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{args:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Runs `f` on a thread that has joined network namespace `ns` (None: this one).
fn in_netns<T: Send + 'static>(ns: Option<&str>, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = ns.map(|ns| format!("/run/netns/{ns}"));
    std::thread::spawn(move || {
        if let Some(path) = path {
            let file = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            // SAFETY: a valid namespace fd; setns changes only this thread's namespace.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        }
        f()
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// A free TCP port on 127.0.0.1 in namespace `ns`.
fn free_port(ns: Option<&str>) -> u16 {
    in_netns(ns.map(str::to_string).as_deref(), || {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    })
}

/// A child process (in a namespace through nsenter) with its output in `log`; SIGTERM, then
/// SIGKILL, on drop.
struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &'static str, ns: Option<&str>, argv: &[&str], logs: &Path) -> Proc {
        Self::spawn_with_env(name, ns, argv, &[], logs)
    }

    fn spawn_with_env(
        name: &'static str,
        ns: Option<&str>,
        argv: &[&str],
        env: &[(&str, &str)],
        logs: &Path,
    ) -> Proc {
        let log = logs.join(format!("{name}.log"));
        let out = File::create(&log).unwrap();
        let mut cmd = match ns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}")).arg("--").args(argv);
                c
            }
            None => {
                let mut c = Command::new(argv[0]);
                c.args(&argv[1..]);
                c
            }
        };
        cmd.envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("{name}: cannot start {argv:?}: {e}"));
        Proc { name, child, log }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Panics with the log if the process has exited.
    fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{} exited ({status}):\n{}", self.name, self.log_tail());
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- {} log (last lines) ---\n{}",
                self.name,
                self.log_tail()
            );
        }
        let pid = self.child.id() as libc::pid_t;
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: signalling our own child by pid (nsenter execs the program, same pid).
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Two namespaces joined by a veth pair; everything removed on drop, also after a panic.
struct VethPair;

impl VethPair {
    fn create() -> Result<VethPair, String> {
        Self::remove();
        let pair = VethPair;
        sh(&["ip", "netns", "add", SERVER_NS])?;
        sh(&["ip", "netns", "add", CLIENT_NS])?;
        sh(&[
            "ip", "link", "add", SERVER_IF, "type", "veth", "peer", "name", CLIENT_IF,
        ])?;
        sh(&["ip", "link", "set", SERVER_IF, "netns", SERVER_NS])?;
        sh(&["ip", "link", "set", CLIENT_IF, "netns", CLIENT_NS])?;
        for (ns, ifname, ip) in [
            (SERVER_NS, SERVER_IF, SERVER_IP),
            (CLIENT_NS, CLIENT_IF, CLIENT_IP),
        ] {
            sh(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{ip}/24"),
                "dev",
                ifname,
            ])?;
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
            sh(&["ip", "-n", ns, "link", "set", ifname, "up"])?;
        }
        Ok(pair)
    }

    /// Removes what a previous (killed) run may have left: processes in our namespaces, the
    /// namespaces (which takes the veth with them) and the pins of our interfaces.
    fn remove() {
        for ns in [SERVER_NS, CLIENT_NS] {
            if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    if let Ok(pid) = pid.parse::<libc::pid_t>() {
                        // SAFETY: only processes inside this test's own namespaces.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                }
            }
            let _ = sh(&["ip", "netns", "del", ns]);
        }
        let _ = sh(&["ip", "link", "del", SERVER_IF]);
        let pins = Path::new(cache_agent::config::DEFAULT_PIN_ROOT);
        let _ = std::fs::remove_file(pins.join(format!("peer-pass-{CLIENT_IF}")));
        let _ = std::fs::remove_dir_all(cache_agent::config::pin_dir(pins, SERVER_IF));
    }
}

impl Drop for VethPair {
    fn drop(&mut self) {
        Self::remove();
    }
}

// ---------------------------------------------------------------- HTTP and Prometheus

/// `GET path` over HTTP/1.0 (no chunking, the server closes): status and body.
fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("{addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .map_err(|e| format!("{addr}{path}: {e}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP head: {text}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line: {head}"))?;
    Ok((status, body.to_string()))
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A Prometheus server with a temporary config and storage, scraping `targets` every second
/// as job `cache-agent` (and itself as job `prometheus`), evaluating `rule_files`.
struct Prometheus {
    addr: SocketAddr,
    ns: Option<String>,
    proc: Proc,
}

impl Prometheus {
    fn start(
        ns: Option<&str>,
        targets: &[SocketAddr],
        rule_files: &[PathBuf],
        dir: &Path,
    ) -> Prometheus {
        assert!(
            Path::new(PROMETHEUS_BIN).is_file(),
            "{PROMETHEUS_BIN} is missing: apt-get install prometheus"
        );
        let port = free_port(ns);
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let targets: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
        let rules: Vec<String> = rule_files
            .iter()
            .map(|r| format!("  - \"{}\"\n", r.display()))
            .collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n{}\
             scrape_configs:\n  - job_name: cache-agent\n    static_configs:\n      - targets: [{}]\n\
             \x20 - job_name: prometheus\n    static_configs:\n      - targets: [\"{addr}\"]\n",
            if rules.is_empty() {
                "  []\n".to_string()
            } else {
                rules.concat()
            },
            targets.join(", ")
        );
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let data = dir.join("data");
        let argv = [
            PROMETHEUS_BIN,
            &format!("--config.file={}", config_path.display()),
            &format!("--storage.tsdb.path={}", data.display()),
            &format!("--web.listen-address={addr}"),
            "--log.level=warn",
        ];
        let proc = Proc::spawn("prometheus", ns, &argv, dir);
        let mut p = Prometheus {
            addr,
            ns: ns.map(str::to_string),
            proc,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            p.proc.assert_running();
            if matches!(p.get("/-/ready"), Ok((200, _))) {
                return p;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready:\n{}",
                p.proc.log_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn get(&self, path: &str) -> Result<(u16, String), String> {
        let (addr, path) = (self.addr, path.to_string());
        in_netns(self.ns.as_deref(), move || http_get(addr, &path))
    }

    /// `/api/v1/<endpoint>` as JSON `data`, or the API's error.
    fn api(&self, endpoint: &str) -> Result<Value, String> {
        let (status, body) = self.get(&format!("/api/v1/{endpoint}"))?;
        let v: Value = serde_json::from_str(&body).map_err(|e| format!("{status} {body}: {e}"))?;
        if v["status"] != "success" {
            return Err(format!("{status}: {} {}", v["errorType"], v["error"]));
        }
        Ok(v["data"].clone())
    }

    /// An instant query: the (labels, value) of each series of a vector result.
    fn query(&self, promql: &str) -> Result<Vec<(Value, f64)>, String> {
        let data = self.api(&format!("query?query={}", url_encode(promql)))?;
        let result = data["result"].as_array().cloned().unwrap_or_default();
        Ok(result
            .into_iter()
            .map(|s| {
                let v = s["value"][1]
                    .as_str()
                    .unwrap_or("NaN")
                    .parse()
                    .unwrap_or(f64::NAN);
                (s["metric"].clone(), v)
            })
            .collect())
    }

    /// The single value of a query, if it has exactly one series.
    fn scalar(&self, promql: &str) -> Option<f64> {
        match self.query(promql) {
            Ok(v) if v.len() == 1 => Some(v[0].1),
            _ => None,
        }
    }
}

/// The helper on its own: Prometheus scraping itself in this namespace.
#[test]
fn prometheus_helper_scrapes_and_answers_queries() {
    let dir = TempDir::new("self");
    let prom = Prometheus::start(None, &[], &[], &dir.0);
    let deadline = Instant::now() + Duration::from_secs(20);
    while prom.scalar("up{job=\"prometheus\"}") != Some(1.0) {
        assert!(
            Instant::now() < deadline,
            "no successful scrape: {:?}",
            prom.query("up")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let n = prom.scalar("count(prometheus_build_info)");
    assert_eq!(n, Some(1.0));
    let err = prom.query("sum(rate(").unwrap_err();
    assert!(err.contains("bad_data"), "{err}");
}

// ---------------------------------------------------------------- load

/// One UDP get datagram: the memcached frame header then `get <key>\r\n`.
fn udp_get(request_id: u16, key: &str) -> Vec<u8> {
    let mut frame = vec![0u8; FRAME_HEADER_LEN];
    frame[0..2].copy_from_slice(&request_id.to_be_bytes());
    frame[4..6].copy_from_slice(&1u16.to_be_bytes()); // one datagram in total
    frame.extend_from_slice(GET);
    frame.extend_from_slice(key.as_bytes());
    frame.extend_from_slice(b"\r\n");
    frame
}

/// Stores `keys` over TCP from the client namespace.
fn set_keys(keys: &[String]) {
    let keys = keys.to_vec();
    in_netns(Some(CLIENT_NS), move || {
        let addr: SocketAddr = format!("{SERVER_IP}:{MEMCACHED_PORT}").parse().unwrap();
        let mut s =
            TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("memcached over TCP");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        for key in &keys {
            let value = format!("value-of-{key}");
            write!(s, "set {key} 0 0 {}\r\n{value}\r\n", value.len()).unwrap();
            let mut reply = [0u8; 8];
            s.read_exact(&mut reply).unwrap();
            assert_eq!(&reply, b"STORED\r\n", "set {key}");
        }
    });
}

/// Counts of the load thread.
#[derive(Default)]
struct LoadCounts {
    sent: AtomicU64,
    answered: AtomicU64,
}

/// Sends UDP gets for `keys` round-robin from the client namespace until `stop`.
fn start_load(keys: Vec<String>, stop: Arc<AtomicBool>, counts: Arc<LoadCounts>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        in_netns(Some(CLIENT_NS), move || {
            let sock = UdpSocket::bind(format!("{CLIENT_IP}:0")).unwrap();
            sock.connect(format!("{SERVER_IP}:{MEMCACHED_PORT}"))
                .unwrap();
            sock.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            let mut buf = [0u8; 2048];
            let mut id: u16 = 0;
            while !stop.load(Ordering::Relaxed) {
                for key in &keys {
                    id = id.wrapping_add(1);
                    if sock.send(&udp_get(id, key)).is_err() {
                        continue;
                    }
                    counts.sent.fetch_add(1, Ordering::Relaxed);
                    // Replies to earlier ids that timed out may still arrive: skip them.
                    while let Ok(n) = sock.recv(&mut buf) {
                        if n >= FRAME_HEADER_LEN && buf[..2] == id.to_be_bytes() {
                            let payload = &buf[FRAME_HEADER_LEN..n];
                            if payload.starts_with(VALUE) && payload.ends_with(END) {
                                counts.answered.fetch_add(1, Ordering::Relaxed);
                            }
                            break;
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    })
}

// ---------------------------------------------------------------- sd_notify

/// A stand-in for systemd's notification socket: receives (and keeps) every message.
struct NotifyListener {
    path: PathBuf,
    messages: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl NotifyListener {
    fn bind(path: &Path) -> NotifyListener {
        let sock = UnixDatagram::bind(path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let messages = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let (messages, stop) = (Arc::clone(&messages), Arc::clone(&stop));
            move || {
                let mut buf = [0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(n) = sock.recv(&mut buf) {
                        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                        messages.lock().unwrap().push(msg);
                    }
                }
            }
        });
        NotifyListener {
            path: path.to_path_buf(),
            messages,
            stop,
            thread: Some(thread),
        }
    }

    fn messages(&self) -> Vec<String> {
        self.messages.lock().unwrap().clone()
    }

    /// Whether a message with the line `line` arrived within `limit`.
    fn wait_for(&self, line: &str, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if self.messages().iter().any(|m| m.lines().any(|l| l == line)) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for NotifyListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------- the agent under Prometheus

/// Every PromQL expression of the Grafana dashboard, with its variables filled in.
fn dashboard_queries() -> Vec<String> {
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr", Value::String(s)) => out.push(s.clone()),
                        _ => walk(v, out),
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let text = std::fs::read_to_string(root().join("deploy/grafana/dashboard.json")).unwrap();
    let mut out = Vec::new();
    walk(&serde_json::from_str(&text).unwrap(), &mut out);
    out.iter()
        .map(|e| {
            e.replace("$__rate_interval", "15s")
                .replace("$job", ".+")
                .replace("$instance", ".+")
        })
        .collect()
}

#[test]
fn prometheus_scrapes_the_agent_and_sees_kernel_hits() {
    if !is_root() {
        eprintln!("skipped: needs root (network namespaces, XDP)");
        return;
    }
    let started = Instant::now();
    let dir = TempDir::new("agent");
    let agent_bin = agent_bin();
    let agent = agent_bin.to_str().unwrap();
    let _veth = VethPair::create().unwrap_or_else(|e| panic!("veth pair: {e}"));

    let mc_port = MEMCACHED_PORT.to_string();
    let mut memcached = Proc::spawn(
        "memcached",
        Some(SERVER_NS),
        &[
            "memcached",
            "-u",
            "root",
            "-l",
            SERVER_IP,
            "-p",
            &mc_port,
            "-U",
            &mc_port,
            "-t",
            "1",
            "-m",
            "64",
        ],
        &dir.0,
    );
    // A veth peer must have an XDP program for XDP_TX frames to arrive on it.
    let out = Command::new("nsenter")
        .args([
            &format!("--net=/run/netns/{CLIENT_NS}"),
            "--",
            agent,
            "xdp-pass",
            "--iface",
            CLIENT_IF,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "xdp-pass: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The agent with only the capabilities deploy/ grants it.
    let metrics_port = free_port(Some(SERVER_NS));
    let metrics_addr: SocketAddr = format!("127.0.0.1:{metrics_port}").parse().unwrap();
    let mc_addr = format!("{SERVER_IP}:{MEMCACHED_PORT}");
    let metrics = metrics_addr.to_string();
    let run = [
        "run",
        "--iface",
        SERVER_IF,
        "--memcached",
        &mc_addr,
        "--metrics-addr",
        &metrics,
    ];
    let mut argv: Vec<&str> = Vec::new();
    let setpriv = Path::new("/usr/bin/setpriv").is_file();
    if setpriv {
        argv.extend([
            "/usr/bin/setpriv",
            "--bounding-set",
            "-all,+bpf,+net_admin,+perfmon",
            "--no-new-privs",
            "--",
        ]);
    } else {
        eprintln!("setpriv missing: the agent runs with all of root's capabilities");
    }
    argv.push(agent);
    argv.extend(run);
    // memcached must answer before the agent starts.
    let deadline = Instant::now() + Duration::from_secs(10);
    while in_netns(Some(SERVER_NS), {
        let a = mc_addr.clone();
        move || TcpStream::connect(a).is_err()
    }) {
        memcached.assert_running();
        assert!(Instant::now() < deadline, "memcached does not answer");
        std::thread::sleep(Duration::from_millis(50));
    }
    // systemd's notification socket, as the unit's Type=notify and WatchdogSec= provide it
    // (a path: abstract names are per network namespace).
    let notify = NotifyListener::bind(&dir.0.join("notify.sock"));
    let notify_path = notify.path.to_str().unwrap().to_string();
    let env = [
        ("NOTIFY_SOCKET", notify_path.as_str()),
        ("WATCHDOG_USEC", "1000000"),
    ];
    let mut agent_proc = Proc::spawn_with_env("cache-agent", Some(SERVER_NS), &argv, &env, &dir.0);

    // Serving: /healthz says the lease is valid.
    let deadline = Instant::now() + READY_LIMIT;
    loop {
        agent_proc.assert_running();
        if in_netns(Some(SERVER_NS), move || http_get(metrics_addr, "/healthz"))
            .is_ok_and(|(s, b)| s == 200 && b == "ok")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "agent never served:\n{}",
            agent_proc.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // The agent told systemd it is ready and pets the watchdog (every WATCHDOG_USEC / 2).
    let main_rs = std::fs::read_to_string(root().join("cache-agent/src/main.rs")).unwrap();
    let notify_wired = main_rs.contains("notify::ready");
    if notify_wired {
        for msg in ["READY=1", "WATCHDOG=1"] {
            assert!(
                notify.wait_for(msg, Duration::from_secs(5)),
                "no {msg}: {:?}",
                notify.messages()
            );
        }
    } else {
        eprintln!("skipped: sd_notify check (main.rs does not call notify::ready yet)");
    }

    let rules = root().join("deploy/prometheus/alerts.yml");
    let prom = Prometheus::start(Some(SERVER_NS), &[metrics_addr], &[rules], &dir.0);

    // A resync holds fills for write-settle + 1 s; writes settle for 250 ms.
    std::thread::sleep(Duration::from_millis(1300));
    let keys: Vec<String> = (0..32).map(|i| format!("prm:key:{i}")).collect();
    set_keys(&keys);
    std::thread::sleep(Duration::from_millis(400));
    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(LoadCounts::default());
    let load = start_load(keys, Arc::clone(&stop), Arc::clone(&counts));
    struct StopOnDrop(Arc<AtomicBool>, Option<JoinHandle<()>>);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
            if let Some(h) = self.1.take() {
                let _ = h.join();
            }
        }
    }
    let load = StopOnDrop(stop, Some(load));

    // The kernel hit ratio, through Prometheus.
    let hit_ratio = "sum(rate(memcache_accel_hit_keys_total[15s])) / sum(rate(memcache_accel_get_keys_total[15s]))";
    let deadline = Instant::now() + HIT_LIMIT;
    let ratio = loop {
        agent_proc.assert_running();
        if let Some(r) = prom.scalar(hit_ratio).filter(|r| *r > 0.0) {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "no kernel hits seen by Prometheus: ratio {:?}, targets {:?}, sent {} answered {}, passes {:?}, fills {:?}",
            prom.query(hit_ratio),
            prom.api("targets").map(|t| t["activeTargets"].clone()),
            counts.sent.load(Ordering::Relaxed),
            counts.answered.load(Ordering::Relaxed),
            prom.query("memcache_accel_passed_requests_total > 0"),
            prom.query("memcache_accel_fill_refused_total > 0 or memcache_accel_fills_total"),
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(ratio > 0.0 && ratio <= 1.0, "hit ratio {ratio}");
    assert!(
        counts.answered.load(Ordering::Relaxed) > 0,
        "the client got no answers"
    );

    // The scrape is healthy: Prometheus parsed every line the agent sent.
    let targets = prom.api("targets").unwrap();
    let target = &targets["activeTargets"][0];
    assert_eq!(target["health"], "up", "{target}");
    assert_eq!(target["lastError"], "", "{target}");

    // Histograms: quantiles of the hit path come out in seconds.
    let p50 = "histogram_quantile(0.5, sum by (le) (rate(memcache_accel_hit_duration_seconds_bucket[15s])))";
    let q = prom.scalar(p50).unwrap_or(f64::NAN);
    assert!(q.is_finite() && q > 0.0 && q < 1.0, "hit path p50 {q} s");
    assert!(
        prom.scalar("sum(memcache_accel_hit_duration_seconds_count)")
            .unwrap_or(0.0)
            > 0.0
    );
    assert!(
        prom.scalar("sum(memcache_accel_miss_service_duration_seconds_count)")
            .is_some()
    );
    let attached = format!("memcache_accel_attached{{interface=\"{SERVER_IF}\",mode=\"native\"}}");
    assert_eq!(prom.scalar(&attached), Some(1.0));
    assert_eq!(prom.scalar("memcache_accel_lease_valid"), Some(1.0));
    let fills = prom
        .scalar("sum(memcache_accel_fills_total)")
        .unwrap_or(0.0);
    assert!(fills > 0.0, "kernel hits without fills?");
    let entries = prom
        .scalar("sum(memcache_accel_cache_entries)")
        .unwrap_or(0.0);
    assert!(entries > 0.0, "cache entries {entries}");

    // Every dashboard query is valid PromQL that Prometheus accepts.
    for q in dashboard_queries() {
        if let Err(e) = prom.query(&q) {
            panic!("dashboard query rejected by Prometheus: {q}: {e}");
        }
    }
    // Every alert rule has been evaluated without error, and none fires on a healthy agent
    // (some may be pending: the hit ratio was 0 a moment ago).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let groups = prom.api("rules").unwrap();
        let rules: Vec<Value> = groups["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        assert!(rules.len() >= 6, "{} rules loaded", rules.len());
        let unevaluated = rules.iter().filter(|r| r["health"] == "unknown").count();
        if unevaluated == 0 {
            for r in &rules {
                assert_eq!(
                    r["health"], "ok",
                    "rule {} failed: {}",
                    r["name"], r["lastError"]
                );
                assert_ne!(
                    r["state"], "firing",
                    "{} fires on a healthy agent: {r}",
                    r["name"]
                );
            }
            break;
        }
        assert!(Instant::now() < deadline, "rules not evaluated: {rules:?}");
        std::thread::sleep(Duration::from_millis(200));
    }

    drop(load);
    // SIGTERM: the agent detaches and says so.
    drop(agent_proc);
    if notify_wired {
        assert!(
            notify.wait_for("STOPPING=1", Duration::from_secs(2)),
            "{:?}",
            notify.messages()
        );
    }
    let elapsed = started.elapsed();
    eprintln!(
        "kernel hit ratio {ratio:.3} via Prometheus, hit p50 {:.0} ns, {} gets sent, {} answered, {elapsed:.1?}",
        q * 1e9,
        counts.sent.load(Ordering::Relaxed),
        counts.answered.load(Ordering::Relaxed),
    );
}
