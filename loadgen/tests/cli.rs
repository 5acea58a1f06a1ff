//! The `loadgen` binary as a user runs it: exit statuses, refusals and what a run leaves behind.
//! Tests named `..._needs_root` build veth testbeds of their own (names lgsig, lgsigt, lguse,
//! lgarm, lglog; subnets 241..=247) and are skipped without root.

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The testbed tests share the machine's two CPUs; one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const LOADGEN: &str = env!("CARGO_BIN_EXE_loadgen");

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn loadgen(args: &[&str]) -> Command {
    let mut cmd = Command::new(LOADGEN);
    cmd.args(args)
        .env("LOADGEN_LOG", "info")
        .stdin(Stdio::null());
    cmd
}

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn state_dir(name: &str) -> PathBuf {
    Path::new("/run/loadgen-testbed").join(name)
}

fn log_files(name: &str) -> Vec<PathBuf> {
    ["memcached", "agent", "reflector"]
        .iter()
        .map(|w| PathBuf::from(format!("/tmp/loadgen-testbed-{name}-{w}.log")))
        .collect()
}

fn read_pid(name: &str, file: &str) -> Option<u32> {
    std::fs::read_to_string(state_dir(name).join(file))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Waits up to `limit` for `cond`; true if it came.
fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    cond()
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rfind(')')
            .and_then(|i| s[i + 1..].split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// Pids of live processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<u32> {
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me && alive(pid))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
        })
        .collect()
}

fn netns_list() -> String {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits for `child` (at most `limit`, then kills it and fails); returns status and stderr.
fn finish(mut child: Child, limit: Duration) -> (ExitStatus, String) {
    let until = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read as _;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return (status, err);
        }
        if Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            panic!("loadgen did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Removes what a failed test may have left (by name: these testbeds are this file's own).
fn force_down(name: &str) {
    let _ = loadgen(&["testbed", "down", "--name", name]).output();
}

/// Starts `compare` on testbed `name` with rounds long enough to be interrupted, stderr piped.
fn spawn_compare(name: &str, subnet: u8) -> Child {
    loadgen(&["compare", "--name", name, "--subnet", &subnet.to_string()])
        .args(["--rounds", "20", "--round", "2s", "--round-warmup", "500ms"])
        .args(["--keys", "1000", "--no-progress"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Sends `signal` to a compare run once its testbed is up (and, if the agent can start, during
/// an accelerated round), then checks the exit status and that nothing of the testbed remains.
fn interrupted_compare_tears_down(name: &str, subnet: u8, signal: i32, expected_status: i32) {
    force_down(name);
    let child = spawn_compare(name, subnet);
    let pid = child.id();
    assert!(
        wait_for(Duration::from_secs(60), || read_pid(name, "memcached.pid")
            .is_some()),
        "testbed {name} did not come up"
    );
    // The accelerated arm follows the first plain one; without a working agent the run still
    // goes on with the plain arm.
    wait_for(Duration::from_secs(30), || {
        read_pid(name, "agent.pid").is_some()
    });
    std::thread::sleep(Duration::from_millis(500));
    let recorded: Vec<u32> = ["memcached.pid", "agent.pid"]
        .iter()
        .filter_map(|f| read_pid(name, f))
        .collect();
    assert!(netns_list().contains(&format!("{name}-srv")));
    // SAFETY: kill has no memory-safety preconditions; pid is our child.
    unsafe { libc::kill(pid as libc::pid_t, signal) };
    let (status, err) = finish(child, Duration::from_secs(60));

    assert_eq!(status.code(), Some(expected_status), "stderr:\n{err}");
    let namespaces = netns_list();
    assert!(
        !namespaces.contains(&format!("{name}-srv"))
            && !namespaces.contains(&format!("{name}-cli")),
        "namespaces left: {namespaces}"
    );
    assert!(!state_dir(name).exists(), "state directory left");
    for p in &recorded {
        assert!(!alive(*p), "process {p} of the testbed survived");
    }
    let server = format!("198.18.{subnet}.");
    let left: Vec<u32> = processes_mentioning(&server)
        .into_iter()
        .chain(processes_mentioning(&format!("{name}s")))
        .collect();
    assert!(left.is_empty(), "processes left: {left:?}");
    assert!(
        !err.contains("ignored the signal"),
        "children must stop on SIGTERM, not need SIGKILL:\n{err}"
    );
    for log in log_files(name) {
        assert!(!log.exists(), "{} left", log.display());
    }
}

#[test]
fn sigint_during_compare_tears_down_and_exits_130_needs_root() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let _serial = serial();
    interrupted_compare_tears_down("lgsig", 247, libc::SIGINT, 130);
}

#[test]
fn sigterm_during_compare_tears_down_and_exits_143_needs_root() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let _serial = serial();
    interrupted_compare_tears_down("lgsigt", 241, libc::SIGTERM, 143);
}

#[test]
fn second_compare_with_the_same_name_is_refused_needs_root() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let _serial = serial();
    let name = "lguse";
    force_down(name);
    let first = spawn_compare(name, 246);
    let first_pid = first.id();
    assert!(wait_for(Duration::from_secs(60), || read_pid(
        name,
        "memcached.pid"
    )
    .is_some()));
    let memcached = read_pid(name, "memcached.pid").unwrap();

    let second = loadgen(&["compare", "--name", name, "--subnet", "246"])
        .args(["--rounds", "1", "--round", "1s", "--keys", "1000"])
        .output()
        .unwrap();
    let err = stderr_of(&second);
    assert_eq!(second.status.code(), Some(1), "stderr:\n{err}");
    assert!(
        err.contains(&format!(
            "testbed {name} is in use by pid {first_pid}; pick another --name or stop it"
        )),
        "{err}"
    );
    assert!(alive(memcached), "the first run's memcached was stopped");
    assert!(Path::new(&format!("/run/netns/{name}-cli")).exists());

    // SAFETY: as above.
    unsafe { libc::kill(first_pid as libc::pid_t, libc::SIGTERM) };
    let (status, err) = finish(first, Duration::from_secs(60));
    assert_eq!(status.code(), Some(143), "{err}");
    assert!(!state_dir(name).exists());
}

#[test]
fn compare_with_an_unavailable_arm_fails_and_keeps_logs_needs_root() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let _serial = serial();
    let name = "lgarm";
    force_down(name);
    // An "agent" that exits at once: the accelerated arm cannot run.
    let out = loadgen(&["compare", "--name", name, "--subnet", "245"])
        .args([
            "--rounds",
            "1",
            "--round",
            "500ms",
            "--round-warmup",
            "200ms",
        ])
        .args(["--keys", "1000", "--no-progress"])
        .env("CACHE_AGENT_BIN", "/bin/false")
        .output()
        .unwrap();
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "stderr:\n{err}");
    assert!(
        err.contains("comparison incomplete: accel arm unavailable: agent on lgarms not ready"),
        "{err}"
    );
    let agent_log = format!("/tmp/loadgen-testbed-{name}-agent.log");
    assert!(err.contains(&agent_log), "kept logs must be named:\n{err}");
    assert!(Path::new(&agent_log).exists());
    assert!(!netns_list().contains(&format!("{name}-srv")));
    assert!(!state_dir(name).exists());
    for log in log_files(name) {
        let _ = std::fs::remove_file(log);
    }
}

#[test]
fn testbed_down_removes_its_logs_unless_asked_to_keep_them_needs_root() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let _serial = serial();
    let name = "lglog";
    let memcached_log = PathBuf::from(format!("/tmp/loadgen-testbed-{name}-memcached.log"));
    for keep in [false, true] {
        let up = loadgen(&["testbed", "up", "--name", name, "--subnet", "243"])
            .output()
            .unwrap();
        assert!(up.status.success(), "{}", stderr_of(&up));
        assert!(memcached_log.exists());
        let mut down = loadgen(&["testbed", "down", "--name", name]);
        if keep {
            down.arg("--keep-logs");
        }
        let out = down.output().unwrap();
        assert!(out.status.success(), "{}", stderr_of(&out));
        assert_eq!(memcached_log.exists(), keep, "--keep-logs {keep}");
        if keep {
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                stdout.contains(&memcached_log.display().to_string()),
                "{stdout}"
            );
        }
    }
    for log in log_files(name) {
        let _ = std::fs::remove_file(log);
    }
}

#[test]
fn a_run_without_any_reply_fails() {
    // A UDP port nobody listens on.
    let port = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = format!("127.0.0.1:{port}");
    let out = loadgen(&[
        "run",
        "--server",
        &server,
        "--proto",
        "udp",
        "--no-populate",
    ])
    .args([
        "--warmup",
        "0s",
        "--duration",
        "300ms",
        "--timeout",
        "100ms",
    ])
    .args(["--no-progress", "--no-pin"])
    .output()
    .unwrap();
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "stderr:\n{err}");
    assert!(
        err.contains(&format!("no replies: is memcached reachable at {server}?")),
        "{err}"
    );
}

#[test]
fn an_unwritable_json_path_is_refused_before_the_run() {
    let started = Instant::now();
    let out = loadgen(&["run", "--server", "127.0.0.1:9", "--no-populate"])
        .args(["--duration", "5s", "--json", "/nonexistent-dir/out.json"])
        .output()
        .unwrap();
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "stderr:\n{err}");
    assert!(err.contains("--json /nonexistent-dir/out.json"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "refused only after the 5 s run"
    );
}

#[test]
fn zero_timeout_is_refused_with_the_flag_named() {
    let out = loadgen(&["run", "--timeout", "0s", "--no-populate"])
        .output()
        .unwrap();
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "stderr:\n{err}");
    assert!(err.contains("--timeout 0s"), "{err}");
}
