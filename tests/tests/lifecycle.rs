//! Agent lifecycle (needs root): upgrade mode keeps the cache warm across a restart; a plain
//! stop detaches and unpins; bad configuration and a missing interface fail cleanly.

use std::time::Duration;

use tests::{Rig, value_text};

// Generous: a loaded CI machine can take seconds to start an agent and fill a key.
const WARM: Duration = Duration::from_secs(10);

#[test]
fn an_adopted_cache_is_flushed_when_memcached_evicted_between_agents() {
    // Between two agents in upgrade mode the attached scanner keeps invalidating writes, but
    // no watch stream reports evictions: the new agent keeps the cache only if memcached has
    // never evicted.
    let mut rig = Rig::with_memcached(
        "lcevict",
        72,
        &["-m", "2", "-t", "2", "-o", "no_lru_maintainer"],
    );
    rig.start_agent(&["--keep-on-exit", "true"]);
    rig.set("ev", &[b'x'; 60], 0, 0);
    rig.warm("ev", WARM);
    rig.bed.stop_agent();
    for round in 0.. {
        rig.set_burst("gap", 30_000);
        if rig.tcp(b"me ev\r\n", &[b"\r\n"]) == b"EN\r\n" {
            break;
        }
        assert!(round < 3, "memcached never evicted the key");
    }
    adopt_and_expect_a_miss(&mut rig, "ev", "an item evicted between agents");
    // A plain stop removes the pins.
    rig.bed.stop_agent();
    rig.start_agent(&[]);
}

#[test]
fn an_adopted_cache_is_kept_when_memcached_evicted_only_before_the_handover() {
    // Every production memcached has evicted at some point: evictions (and dropped log
    // entries) from before the first agent stopped were reported to it, and must not make
    // every later upgrade start cold. Found by QA round 7: the kept cache was flushed
    // whenever memcached's lifetime counters were not zero.
    let mut rig = Rig::with_memcached(
        "lcevold",
        92,
        &["-m", "2", "-t", "2", "-o", "no_lru_maintainer"],
    );
    for round in 0.. {
        rig.set_burst("before", 30_000);
        if rig.mc_stat("evictions") > 0 {
            break;
        }
        assert!(round < 3, "memcached never evicted");
    }
    rig.start_agent(&["--keep-on-exit", "true"]);
    rig.set("kept", b"warm", 0, 0);
    rig.warm("kept", WARM);
    rig.bed.stop_agent();
    rig.start_agent(&["--keep-on-exit", "true"]);
    let log = rig.agent_log();
    assert!(
        log.contains("adopted cache kept"),
        "the kept cache was not kept: {log}"
    );
    // Written to a file, the log carries no terminal colour codes (found by QA round 7:
    // journald shows such lines as "[blob data]").
    assert!(!log.contains('\u{1b}'), "colour codes in a log file: {log}");
    let hits = rig.counter("hit_keys");
    assert_eq!(
        rig.udp_get(&["kept"]).payload,
        [value_text("kept", 0, b"warm"), b"END\r\n".to_vec()].concat()
    );
    assert_eq!(
        rig.counter("hit_keys"),
        hits + 1,
        "the first GET after the upgrade was not a kernel hit"
    );
    rig.bed.stop_agent();
    rig.start_agent(&[]);
}

/// Starts an agent in upgrade mode that must adopt the kept cache, and checks it never
/// serves `key` (`what` says why it must not).
fn adopt_and_expect_a_miss(rig: &mut Rig, key: &str, what: &str) {
    rig.start_agent(&["--keep-on-exit", "true"]);
    assert!(
        rig.agent_log().contains("adopted"),
        "the new agent did not adopt: {}",
        rig.agent_log()
    );
    for i in 0..8 {
        assert_eq!(
            rig.udp_get(&[key]).payload,
            b"END\r\n",
            "reply #{i}: {what} was served"
        );
    }
}

#[test]
fn an_adopted_cache_is_flushed_when_memcached_restarted_between_agents() {
    // Upgrade mode keeps the cache between two agents; a memcached restarted in that gap has
    // lost every item, and a new memcached has no evictions or dropped log lines to tell.
    let mut rig = Rig::with_agent("lcrestup", 80, &["--keep-on-exit", "true"]);
    rig.set("kept", b"old", 0, 0);
    rig.warm("kept", WARM);
    rig.bed.stop_agent();
    rig.bed.stop_memcached();
    rig.bed.start_memcached().unwrap();
    adopt_and_expect_a_miss(
        &mut rig,
        "kept",
        "an item of the memcached before the restart",
    );
    assert!(
        rig.agent_log().contains("memcached restarted"),
        "{}",
        rig.agent_log()
    );
    // A plain stop removes the pins.
    rig.bed.stop_agent();
    rig.start_agent(&[]);
}

#[test]
fn an_agent_in_upgrade_mode_starts_cold_when_the_kept_links_are_gone() {
    // The interface the kept programs were attached to was deleted and made again (a pod's
    // veth, say): the pinned links are severed, and the new agent must start cold, not fail.
    let mut rig = Rig::with_agent("lcsever", 73, &["--keep-on-exit", "true"]);
    rig.bed.stop_agent();
    drop(rig);
    let mut rig = Rig::new("lcsever", 73);
    rig.start_agent(&["--keep-on-exit", "true"]);
    assert!(
        rig.agent_log().contains("starting cold"),
        "{}",
        rig.agent_log()
    );
    rig.set("k", b"v", 0, 0);
    rig.warm("k", WARM);
    rig.bed.stop_agent();
    rig.start_agent(&[]);
}

#[test]
fn a_second_agent_for_the_same_interface_is_refused_and_the_first_keeps_serving() {
    // Found by QA: the second agent removed the first one's pins as leftovers of a crash,
    // then failed to attach, leaving the first serving with no pins (no status, no detach).
    let rig = Rig::with_agent("lctwice", 74, &[]);
    rig.set("k", b"v", 0, 0);
    rig.warm("k", WARM);
    let ns = format!("--net=/run/netns/{}", rig.bed.server_netns());
    let memcached = rig.bed.memcached_addr().to_string();
    let out = std::process::Command::new("nsenter")
        .arg(&ns)
        .arg(loadgen::agent_bin())
        .args([
            "run",
            "--iface",
            rig.bed.server_iface(),
            "--memcached",
            &memcached,
        ])
        .args(["--metrics-addr", "127.0.0.1:19478"])
        .output()
        .expect("run a second cache-agent");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("already runs") && err.contains("Fix:"),
        "{err}"
    );
    // The first agent still has its pins and still serves.
    let status = rig
        .bed
        .agent_cmd(&["status", "--iface", rig.bed.server_iface(), "--json"])
        .expect("status of the first agent");
    assert!(status.contains("\"serving\":true"), "{status}");
    // Without privileges, each command says what it needs (found by QA round 7: only
    // "Permission denied").
    for args in [
        vec!["status", "--iface", rig.bed.server_iface()],
        vec!["detach", "--iface", rig.bed.server_iface()],
    ] {
        let out = std::process::Command::new("nsenter")
            .arg(&ns)
            .args([
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
            ])
            .arg(loadgen::agent_bin())
            .args(&args)
            .output()
            .expect("run cache-agent unprivileged");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("not running as root") && err.contains("Fix:"),
            "{args:?} unprivileged: {err}"
        );
    }
    let hits = rig.counter("hit_keys");
    rig.udp_get(&["k"]);
    assert_eq!(
        rig.counter("hit_keys"),
        hits + 1,
        "the first agent stopped serving"
    );
}

/// A child process killed when the test ends, passed or not.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An agent run from a binary under another name (a versioned copy, a wrapper) is still the
/// agent of its interface: a second `run` is refused, and `detach` stops it. Found by QA
/// round 5: both looked for a process named `cache-agent`, so the second run took the first
/// one's pins, and `detach` said it had detached while the agent kept serving.
#[test]
fn an_agent_run_from_a_renamed_binary_is_refused_a_twin_and_stopped_by_detach() {
    let rig = Rig::new("lcrename", 89);
    let dir = std::env::temp_dir().join(format!("lcrename-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let renamed = dir.join("memcache-accel-agent-v2");
    std::fs::copy(loadgen::agent_bin(), &renamed).expect("copy the agent binary");
    let ns = format!("--net=/run/netns/{}", rig.bed.server_netns());
    let iface = rig.bed.server_iface().to_string();
    let memcached = rig.bed.memcached_addr().to_string();
    let log = std::fs::File::create(dir.join("agent.log")).unwrap();
    let mut first = KillOnDrop(
        std::process::Command::new("nsenter")
            .arg(&ns)
            .arg(&renamed)
            .args(["run", "--iface", &iface, "--memcached", &memcached])
            .args(["--metrics-addr", "127.0.0.1:19479"])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start the renamed agent"),
    );
    let started = std::time::Instant::now();
    while !rig
        .bed
        .agent_cmd(&["status", "--iface", &iface, "--json"])
        .is_ok_and(|s| s.contains("\"serving\":true"))
    {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the renamed agent never served: {}",
            std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let twin = std::process::Command::new("nsenter")
        .arg(&ns)
        .arg(loadgen::agent_bin())
        .args(["run", "--iface", &iface, "--memcached", &memcached])
        .args(["--metrics-addr", "127.0.0.1:19480"])
        .output()
        .expect("run a second cache-agent");
    let err = String::from_utf8_lossy(&twin.stderr);
    assert!(
        !twin.status.success() && err.contains("already runs"),
        "a second agent was not refused: {err}"
    );
    let status = rig
        .bed
        .agent_cmd(&["status", "--iface", &iface, "--json"])
        .expect("status of the renamed agent");
    assert!(
        status.contains(&format!("\"pid\":{}", first.0.id())),
        "status does not name the renamed agent (pid {}): {status}",
        first.0.id()
    );
    // With --json, what detach did is one JSON object (found by QA round 7: it printed
    // nothing).
    let detached = rig
        .bed
        .agent_cmd(&["detach", "--iface", &iface, "--json"])
        .expect("detach");
    let result: serde_json::Value = serde_json::from_str(detached.trim())
        .unwrap_or_else(|e| panic!("detach --json printed {detached:?}: {e}"));
    assert_eq!(result["stopped_pid"], first.0.id(), "{detached}");
    assert_eq!(result["iface"], iface.as_str(), "{detached}");
    let exited = (0..50).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        first.0.try_wait().ok().flatten().is_some()
    });
    let _ = std::fs::remove_dir_all(&dir);
    assert!(exited, "detach did not stop the renamed agent");
}

/// An agent in a PID namespace of its own (a container without hostPID, as the DaemonSet
/// runs it) has a pid file whose pid means nothing on the node. Found by QA round 7: `detach`
/// from the node took it for a dead agent and removed its live pins (while it kept serving),
/// and a second `run` did the same. Its heartbeat in the pinned configuration tells it is
/// alive: both are refused and leave it serving.
#[test]
fn an_agent_in_another_pid_namespace_is_neither_detached_nor_replaced_from_outside() {
    let rig = Rig::new("lcpidns", 93);
    let ns = format!("--net=/run/netns/{}", rig.bed.server_netns());
    let iface = rig.bed.server_iface().to_string();
    let memcached = rig.bed.memcached_addr().to_string();
    let log_path = std::env::temp_dir().join(format!("lcpidns-{}.log", std::process::id()));
    let log = std::fs::File::create(&log_path).unwrap();
    let log_text = || std::fs::read_to_string(&log_path).unwrap_or_default();
    // unshare passes SIGTERM on to the agent when it is killed (--kill-child).
    let _hidden = KillOnDrop(
        std::process::Command::new("nsenter")
            .arg(&ns)
            .args([
                "unshare",
                "--pid",
                "--fork",
                "--mount-proc",
                "--kill-child=SIGTERM",
            ])
            .arg(loadgen::agent_bin())
            .args(["run", "--iface", &iface, "--memcached", &memcached])
            .args(["--metrics-addr", "127.0.0.1:19481"])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start an agent in its own PID namespace"),
    );
    let serving = || {
        rig.bed
            .agent_cmd(&["status", "--iface", &iface, "--json"])
            .is_ok_and(|s| s.contains("\"serving\":true"))
    };
    let started = std::time::Instant::now();
    while !serving() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the agent never served: {}",
            log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let outside = |args: &[&str]| {
        std::process::Command::new("nsenter")
            .arg(&ns)
            .arg(loadgen::agent_bin())
            .args(args)
            .output()
            .expect("run cache-agent")
    };
    let detach = outside(&["detach", "--iface", &iface]);
    let err = String::from_utf8_lossy(&detach.stderr);
    assert!(
        !detach.status.success() && err.contains("cannot see"),
        "detach from outside did not refuse: {err}"
    );
    let twin = outside(&["run", "--iface", &iface, "--memcached", &memcached]);
    let err = String::from_utf8_lossy(&twin.stderr);
    assert!(
        !twin.status.success() && err.contains("cannot see"),
        "a second agent was not refused: {err}"
    );
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        serving(),
        "the hidden agent stopped serving: {}",
        log_text()
    );
    let _ = std::fs::remove_file(&log_path);
}

#[test]
fn a_restart_in_upgrade_mode_keeps_the_cache_warm() {
    let mut rig = Rig::with_agent("lcup", 51, &["--keep-on-exit", "true"]);
    rig.set("warm", b"kept", 0, 0);
    rig.warm("warm", WARM);
    let fills = rig.counter("fills");
    rig.bed.stop_agent();
    // Between agents the programs stay attached but do not serve: memcached answers.
    let before = rig.mc_stat("get_hits");
    assert_eq!(
        rig.udp_get(&["warm"]).payload,
        [value_text("warm", 0, b"kept"), b"END\r\n".to_vec()].concat()
    );
    assert_eq!(
        rig.mc_stat("get_hits"),
        before + 1,
        "served while no agent held the lease"
    );
    // A write in the gap is still invalidated by the attached scanner.
    rig.set("gap", b"old", 0, 0);

    rig.start_agent(&["--keep-on-exit", "true"]);
    assert!(
        rig.agent_log().contains("adopted"),
        "the new agent did not adopt: {}",
        rig.agent_log()
    );
    let hits = rig.counter("hit_keys");
    let reply = rig.udp_get(&["warm"]);
    assert_eq!(
        reply.payload,
        [value_text("warm", 0, b"kept"), b"END\r\n".to_vec()].concat()
    );
    assert_eq!(
        rig.counter("hit_keys"),
        hits + 1,
        "the first GET after the upgrade was not a kernel hit: {:?}\n{}",
        rig.agent_stats(),
        rig.agent_log()
    );
    assert_eq!(
        rig.counter("fills"),
        fills,
        "the cache was refilled, not kept"
    );

    // A plain stop afterwards detaches and removes the pins.
    rig.bed.stop_agent();
    assert!(rig.agent_stats().is_some(), "pins vanished in upgrade mode");
    rig.start_agent(&[]);
    assert!(
        rig.agent_log().contains("without --keep-on-exit true"),
        "a kept cache left cold without saying why: {}",
        rig.agent_log()
    );
    rig.bed.stop_agent();
    assert!(rig.agent_stats().is_none(), "a plain stop must unpin");
}

#[test]
fn bad_configuration_and_missing_interfaces_fail_with_a_clear_message() {
    let rig = Rig::new("lcbad", 52);
    let agent = loadgen::agent_bin();
    let run = |args: &[&str]| {
        std::process::Command::new(&agent)
            .args(args)
            .output()
            .expect("run cache-agent")
    };
    let out = run(&[
        "run",
        "--iface",
        "nosuchif0",
        "--memcached",
        "127.0.0.1:1",
        "--capacity",
        "12Q",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("`capacity`") && err.contains("Fix:"), "{err}");
    // check-config validates a file that may be meant for another host: a missing interface is
    // a note there, not a failure (found by QA round 5: it said nothing).
    let out = run(&[
        "check-config",
        "--iface",
        "nosuchif0",
        "--memcached",
        "127.0.0.1:11211",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && err.contains("no interface named `nosuchif0`"),
        "{err}"
    );
    // Refused at config resolution, each naming its field: a settle time too short to cover a
    // write queued in memcached, maps larger than the machine (which would otherwise fail to
    // load with a misleading "Cannot allocate memory"), and port 0 (not blamed on udp-port).
    for (memcached, extra, field, says) in [
        (
            "127.0.0.1:1",
            &["--write-settle-ms", "0"][..],
            "`write-settle-ms`",
            "250",
        ),
        (
            "127.0.0.1:1",
            &["--capacity", "2000G"],
            "`capacity`",
            "MemTotal",
        ),
        ("198.18.231.1:0", &[], "`memcached`", "port 0"),
    ] {
        let mut args = vec!["run", "--iface", "lo", "--memcached", memcached];
        args.extend(extra);
        let out = run(&args);
        assert!(!out.status.success(), "{args:?} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(field) && err.contains(says) && err.contains("Fix:"),
            "{args:?}: {err}"
        );
    }

    let mc = rig.server(false).to_string();
    let out = rig
        .bed
        .agent_cmd(&["run", "--iface", "nosuchif0", "--memcached", &mc])
        .unwrap_err()
        .to_string();
    assert!(
        out.contains("nosuchif0") && out.contains("does not exist"),
        "{out}"
    );
    let out = run(&["run", "--iface", "lo", "--memcached", "127.0.0.1:1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unreachable"));

    // The metrics address is bound before anything is attached: a taken one (memcached's own
    // here) fails the start instead of leaving an agent without /metrics and /healthz.
    let iface = rig.bed.server_iface();
    let out = rig
        .bed
        .agent_cmd(&[
            "run",
            "--iface",
            iface,
            "--memcached",
            &mc,
            "--metrics-addr",
            &mc,
        ])
        .unwrap_err()
        .to_string();
    assert!(
        out.contains("`metrics-addr`") && out.contains("Fix:"),
        "{out}"
    );
    // `ip netns exec` mounts a /sys of its own, without bpffs: the error says so, and how to
    // run the agent instead (found by QA: it said only "No such file or directory").
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", rig.bed.server_netns()])
        .arg(&agent)
        .args(["run", "--iface", iface, "--memcached", &mc])
        .output()
        .expect("ip netns exec cache-agent");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("BPF filesystem") && err.contains("nsenter"),
        "{err}"
    );
}

/// With JSON logs, the error that ends the agent is a JSON line too: a log shipper parsing
/// the agent's output must not lose the one line that says why it stopped.
#[test]
fn the_error_that_stops_the_agent_is_logged_as_json_in_json_mode() {
    let out = std::process::Command::new(loadgen::agent_bin())
        .args(["run", "--iface", "nosuchif0", "--memcached", "127.0.0.1:1"])
        .args(["--log-format", "json"])
        .output()
        .expect("run cache-agent");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "no error at all");
    for line in &lines {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_ok(),
            "not a JSON line: {line}"
        );
    }
    assert!(err.contains("\"error\"") && err.contains("Fix:"), "{err}");
}

#[test]
fn a_memcached_without_udp_is_refused_with_the_fix() {
    // Found by QA: with memcached's UDP off the agent served the keys it warmed and every
    // other UDP get timed out, while it reported healthy.
    let mut rig = Rig::with_memcached("lcnoudp", 84, &["-U", "0"]);
    let err = rig.bed.start_agent(&[]).unwrap_err().to_string();
    assert!(
        err.contains("does not answer UDP") && err.contains("-U"),
        "{err}"
    );
}

/// A stopped memcached still accepts connections (the kernel queues them) but answers
/// nothing: the agent says so, not that UDP is off (found by QA round 7: it told the operator
/// to start memcached with -U).
#[test]
fn a_stopped_memcached_is_named_at_start_not_blamed_on_udp() {
    let mut rig = Rig::new("lcstopped", 94);
    let pid = rig.bed.memcached_pid() as i32;
    // SAFETY: signals to the testbed's own memcached.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let result = rig.bed.start_agent(&[]);
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let err = result
        .expect_err("an agent started against a stopped memcached")
        .to_string();
    assert!(
        err.contains("did not answer `version`") && !err.contains("does not answer UDP"),
        "{err}"
    );
}

#[test]
fn a_memcached_reachable_through_an_unwatched_interface_is_reported_at_start() {
    // Found by QA: writes that reach memcached through another interface are never seen by
    // the scanner (a delete through a second NIC: 10 of 10 GETs stale), and nothing said so.
    let mut rig = Rig::with_memcached("lcexpose", 85, &[]);
    let ns = rig.bed.server_netns().to_string();
    let v4 = rig.bed.server_v4().to_string();
    // A second interface that carries one of the addresses memcached listens on.
    tests::in_netns(
        &ns,
        &[
            "ip",
            "link",
            "add",
            "lcexpose9",
            "type",
            "veth",
            "peer",
            "name",
            "lcexpose8",
        ],
    );
    tests::in_netns(
        &ns,
        &["ip", "addr", "add", &format!("{v4}/32"), "dev", "lcexpose9"],
    );
    tests::in_netns(&ns, &["ip", "link", "set", "lcexpose9", "up"]);
    rig.start_agent(&[]);
    let log = rig.agent_log();
    assert!(
        log.contains("interfaces the agent does not watch") && log.contains("lcexpose9"),
        "{log}"
    );
}

#[test]
fn clients_outside_the_allowlist_are_never_answered_by_the_kernel() {
    let rig = Rig::with_agent(
        "lcallow",
        53,
        // Warm start off: its own gets would show in memcached's get_hits.
        &[
            "--allow",
            "198.18.254.0/24,2001:2:ff::/48",
            "--warm-start",
            "false",
        ],
    );
    rig.set("k", b"v", 0, 0);
    let before = rig.mc_stat("get_hits");
    for _ in 0..10 {
        assert_eq!(
            rig.udp_get(&["k"]).payload,
            [value_text("k", 0, b"v"), b"END\r\n".to_vec()].concat()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        rig.mc_stat("get_hits"),
        before + 10,
        "the kernel answered a client outside --allow"
    );
    assert_eq!(rig.counter("hit_keys"), 0);
    assert!(rig.counter("pass_denied") >= 10);
}

#[test]
fn replies_never_exceed_the_amplification_limit() {
    // A 3x limit: a 1000-byte value answers a ~60-byte request with ~1 KB, far more.
    let rig = Rig::with_agent("lcampl", 54, &["--max-amplification", "3"]);
    rig.set("small", b"v", 0, 0);
    rig.set("big", &tests::value_of(1000, 1), 0, 0);
    rig.warm("small", WARM);
    let before = rig.counter("pass_amplification");
    for _ in 0..5 {
        rig.udp_get(&["big"]);
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        rig.counter("pass_amplification") > before,
        "{:?}",
        rig.agent_stats()
    );
}

/// An older agent version left in upgrade mode pins its links under another pin layout: this
/// agent cannot adopt them, so it removes them (detaching the old programs) and starts cold,
/// instead of failing to attach to an interface that still has the old XDP program.
#[test]
fn pins_an_older_agent_version_left_are_removed_and_the_agent_starts() {
    let mut rig = Rig::with_agent("lcold", 55, &["--keep-on-exit", "true"]);
    rig.bed.stop_agent();
    let root = std::path::Path::new(cache_agent::config::DEFAULT_PIN_ROOT);
    let iface = rig.bed.server_iface().to_owned();
    let current = cache_agent::config::pin_dir(root, &iface);
    assert!(
        current.join("link_xdp").exists(),
        "upgrade mode pinned no link"
    );
    // Make it look like an older layout's: the same pins, another version directory.
    let old = root.join("v0-test").join(&iface);
    std::fs::create_dir_all(old.parent().unwrap()).unwrap();
    std::fs::rename(&current, &old).expect("rename in bpffs");

    rig.start_agent(&[]);
    assert!(!old.exists(), "the older layout's pins are still there");
    rig.set("fresh", b"v", 0, 0);
    rig.warm("fresh", WARM);
    let _ = std::fs::remove_dir(old.parent().unwrap());
}

/// Someone else's XDP program on the interface: the agent refuses with a message naming the
/// fix, and leaves nothing pinned (the cache maps would otherwise hold their memory).
#[test]
fn an_interface_with_someone_elses_xdp_program_is_refused_and_nothing_stays_pinned() {
    let rig = Rig::new("lcbusy", 66);
    let iface = rig.bed.server_iface().to_owned();
    let foreign_root = format!("/sys/fs/bpf/lcbusy-foreign-{}", std::process::id());
    /// Removes the foreign program's pin even when an assertion fails.
    struct Unpin(String);
    impl Drop for Unpin {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _unpin = Unpin(foreign_root.clone());
    rig.bed
        .agent_cmd(&["xdp-pass", "--iface", &iface, "--pin-root", &foreign_root])
        .expect("attach a foreign XDP program");
    let mc = rig.server(false).to_string();
    let err = rig
        .bed
        .agent_cmd(&["run", "--iface", &iface, "--memcached", &mc])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("already has an XDP program") && err.contains("Fix:"),
        "{err}"
    );
    let pins = cache_agent::config::pin_dir(
        std::path::Path::new(cache_agent::config::DEFAULT_PIN_ROOT),
        &iface,
    );
    assert!(
        !pins.exists(),
        "a refused start left {} behind",
        pins.display()
    );
}
