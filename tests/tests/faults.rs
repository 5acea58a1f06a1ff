//! Concurrency and faults under load (needs root): zero stale reads, whatever happens to the
//! agent or memcached. Misses are allowed and reported.

use std::{
    io::{Read as _, Write as _},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tests::{
    Rig,
    history::{self, Load, Outcome},
    value_text,
};

fn load(rig: &Rig, flushes: bool, ttls: bool) -> Load {
    Load {
        tcp: rig.server(false),
        udp: rig.server(false),
        keys: (0..12).map(|i| format!("hot{i}")).collect(),
        writers: 3,
        readers: 3,
        flushes,
        ttls,
        // Each key is written about every 600 ms: long enough past the write-settle time
        // for entries to be filled and served between writes.
        pause: Duration::from_millis(150),
    }
}

/// Runs the load in the client namespace for `secs`, doing `during` (after `at`) meanwhile.
fn run_with(
    rig: &mut Rig,
    secs: u64,
    flushes: bool,
    ttls: bool,
    at: Duration,
    during: impl FnOnce(&mut Rig),
) -> Outcome {
    let stop = Arc::new(AtomicBool::new(false));
    let l = load(rig, flushes, ttls);
    let s = Arc::clone(&stop);
    let runner = rig
        .bed
        .in_client(move || std::thread::spawn(move || history::run(&l, s)));
    let started = Instant::now();
    std::thread::sleep(at);
    during(rig);
    let rest = Duration::from_secs(secs).saturating_sub(started.elapsed());
    std::thread::sleep(rest);
    stop.store(true, Ordering::Relaxed);
    let h = runner.join().unwrap();
    let out = history::check(&h);
    eprintln!(
        "reads {} (misses {}), writes {}, stale {}",
        out.reads,
        out.misses,
        out.writes,
        out.stale.len()
    );
    out
}

fn assert_no_stale(out: &Outcome, what: &str) {
    assert!(
        out.reads > 100,
        "{what}: too few reads to mean anything ({})",
        out.reads
    );
    assert!(
        out.stale.is_empty(),
        "{what}: {} stale reads, first: {:#?}",
        out.stale.len(),
        &out.stale[..out.stale.len().min(5)]
    );
}

fn seconds() -> u64 {
    std::env::var("COHERENCE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30)
}

#[test]
fn randomized_concurrent_writers_and_readers_never_read_stale() {
    let mut rig = Rig::with_agent("farand", 41, &[]);
    let out = run_with(&mut rig, seconds(), true, true, Duration::ZERO, |_| {});
    assert_no_stale(&out, "randomized");
    let (hits, keys) = (rig.counter("hit_keys"), rig.counter("get_keys"));
    eprintln!("kernel answered {hits} of {keys} keys");
    assert!(
        hits * 10 > keys,
        "the kernel answered only {hits} of {keys}: the test proves little"
    );
}

#[test]
fn killing_the_agent_under_load_fails_open() {
    let mut rig = Rig::with_agent("fakill", 42, &[]);
    let out = run_with(&mut rig, 10, false, false, Duration::from_secs(4), |rig| {
        rig.bed.kill_agent();
    });
    assert_no_stale(&out, "kill -9 agent");
    // With the agent gone, memcached answers: its get_hits moves with our GETs.
    rig.set("after", b"v", 0, 0);
    let before = rig.mc_stat("get_hits");
    for _ in 0..5 {
        rig.udp_get(&["after"]);
    }
    assert_eq!(rig.mc_stat("get_hits"), before + 5);
    // A new agent starts cleanly over the leftovers.
    rig.start_agent(&[]);
    rig.warm("after", Duration::from_secs(10));
}

#[test]
fn restarting_memcached_under_load_serves_nothing_old() {
    let mut rig = Rig::with_agent("farest", 43, &[]);
    let out = run_with(&mut rig, 12, false, false, Duration::from_secs(4), |rig| {
        rig.bed.stop_memcached();
        rig.bed.start_memcached().unwrap();
    });
    assert_no_stale(&out, "memcached restart");
}

#[test]
fn an_agent_whose_interface_is_deleted_stops_with_an_error_and_leaves_nothing_pinned() {
    // Found by QA: with its interface deleted (and made again, as a pod's veth is) the agent
    // kept running and reporting healthy, its programs gone with the old interface.
    let mut rig = Rig::with_agent("fadel", 82, &[]);
    tests::in_netns(
        rig.bed.server_netns(),
        &["ip", "link", "del", rig.bed.server_iface()],
    );
    let start = Instant::now();
    let status = loop {
        if let Some(status) = rig.bed.agent_exit() {
            break status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the agent still runs without its interface: {}",
            rig.agent_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.contains("status: 0"), "exit status: {status}");
    let log = rig.agent_log();
    assert!(log.contains("was deleted"), "{log}");
    let pins = std::path::Path::new("/sys/fs/bpf/memcache-accel")
        .join(cache_agent::config::PIN_LAYOUT)
        .join(rig.bed.server_iface());
    assert!(!pins.exists(), "{} is left pinned", pins.display());
}

#[test]
fn stopping_memcached_under_load_serves_nothing_stale() {
    let mut rig = Rig::with_agent("fastop", 44, &[]);
    let out = run_with(&mut rig, 12, false, false, Duration::from_secs(4), |rig| {
        let pid = rig.bed.memcached_pid() as i32;
        unsafe { signal(pid, 19) };
        std::thread::sleep(Duration::from_secs(3));
        unsafe { signal(pid, 18) };
    });
    assert_no_stale(&out, "SIGSTOP memcached");
}

#[test]
fn a_hung_agent_stops_serving_within_its_lease() {
    let rig = Rig::with_agent("fahang", 45, &["--lease-ms", "1000"]);
    rig.set("lease", b"v", 0, 0);
    rig.warm("lease", Duration::from_secs(10));
    let pid = rig.bed.agent_pid().unwrap() as i32;
    unsafe { signal(pid, 19) };
    std::thread::sleep(Duration::from_millis(1500));
    let before = rig.mc_stat("get_hits");
    for _ in 0..5 {
        rig.udp_get(&["lease"]);
    }
    let after = rig.mc_stat("get_hits");
    unsafe { signal(pid, 18) };
    assert_eq!(
        after,
        before + 5,
        "the kernel kept serving after the lease expired"
    );
}

unsafe fn signal(pid: i32, sig: i32) {
    unsafe extern "C" {
        fn kill(pid: i32, sig: i32) -> i32;
    }
    unsafe { kill(pid, sig) };
}

/// One key, rewritten with values of different lengths while readers on every CPU read it,
/// with fills allowed soon after writes (the shortest settle allowed, 50 ms: this test is about
/// torn replies, not staleness): every reply must be one whole value, never a mix.
#[test]
fn one_key_hammered_from_every_cpu_never_tears() {
    let rig = Rig::with_agent("fatear", 47, &["--write-settle-ms", "50"]);
    let values: Vec<Vec<u8>> = (0..4).map(|w| vec![b'a' + w as u8; 10 + w * 97]).collect();
    rig.set("tear", &values[0], 0, 0);
    let stop = Arc::new(AtomicBool::new(false));
    let (tcp, udp) = (rig.server(false), rig.server(false));
    let writer = {
        let (stop, values) = (Arc::clone(&stop), values.clone());
        rig.bed.in_client(move || {
            std::thread::spawn(move || {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let v = &values[i % values.len()];
                    let mut req = format!("set tear 0 0 {}\r\n", v.len()).into_bytes();
                    req.extend_from_slice(v);
                    req.extend_from_slice(b"\r\n");
                    let _ = tests::try_tcp_exchange(tcp, &req, &[b"\r\n".to_vec()]);
                    i += 1;
                    // Every eighth write a pause longer than the settle time, so GETs after
                    // it fill and the writes that follow invalidate while readers hit.
                    let pause = if i % 8 == 0 { 90 } else { 5 };
                    std::thread::sleep(Duration::from_millis(pause));
                }
            })
        })
    };
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let (stop, values) = (Arc::clone(&stop), values.clone());
            rig.bed.in_client(move || {
                std::thread::spawn(move || {
                    let mut bad = Vec::new();
                    let mut n = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let r = tests::udp_exchange(udp, b"get tear\r\n", tests::next_id());
                        if !r.payload.ends_with(b"END\r\n") || r.payload == b"END\r\n" {
                            continue;
                        }
                        n += 1;
                        let whole = values.iter().any(|v| {
                            r.payload == [value_text("tear", 0, v), b"END\r\n".to_vec()].concat()
                        });
                        if !whole {
                            bad.push(String::from_utf8_lossy(&r.payload).into_owned());
                        }
                    }
                    (n, bad)
                })
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(8));
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    let mut total = 0;
    for r in readers {
        let (n, bad) = r.join().unwrap();
        total += n;
        assert!(
            bad.is_empty(),
            "torn or mixed replies: {:?}",
            &bad[..bad.len().min(3)]
        );
    }
    assert!(total > 1000, "too few replies: {total}");
    assert!(
        rig.counter("hit_keys") > 0,
        "the kernel never answered: {:?}",
        rig.agent_stats()
    );
}

/// Stops one thread of memcached (ptrace: the others go on) until dropped.
struct FrozenThread(i32);

impl FrozenThread {
    fn new(tid: i32) -> FrozenThread {
        // SAFETY: ptrace requests on a thread of the testbed's own memcached; SEIZE and
        // INTERRUPT stop that thread only (no group stop), and waitpid collects the stop.
        unsafe {
            assert_eq!(
                libc::ptrace(libc::PTRACE_SEIZE, tid, 0, 0),
                0,
                "ptrace seize"
            );
            assert_eq!(
                libc::ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0),
                0,
                "ptrace interrupt"
            );
            let mut status = 0;
            assert_eq!(
                libc::waitpid(tid, &mut status, libc::__WALL),
                tid,
                "waitpid"
            );
        }
        FrozenThread(tid)
    }
}

impl Drop for FrozenThread {
    fn drop(&mut self) {
        // SAFETY: detaching the thread `new` attached.
        unsafe { libc::ptrace(libc::PTRACE_DETACH, self.0, 0, 0) };
    }
}

/// A client that connects for each write (a PHP script, a cron job) sends its write before
/// memcached has accepted the connection; the scanner sees it at once, memcached applies it
/// once its listener thread takes the connection. Found by a CI run on an overloaded machine
/// (138 stale reads): writes were applied over a second after the scanner saw them, while the
/// health probes, on an accepted connection served by a worker thread, were answered at once,
/// so GETs after the settle time were filled from the old value. memcached's listener thread
/// (its main thread) is stopped here: connections wait in the accept queue, the workers go on.
#[test]
fn a_write_on_a_connection_memcached_has_not_accepted_never_leaves_the_old_value_cached() {
    let rig = Rig::with_agent("faccept", 95, &[]);
    rig.set("acc", b"old", 0, 0);
    rig.warm("acc", Duration::from_secs(10));
    let frozen = FrozenThread::new(rig.bed.memcached_pid() as i32);
    let addr = rig.server(false);
    let mut writer = rig
        .bed
        .in_client(move || std::net::TcpStream::connect(addr))
        .expect("connect (the kernel completes the handshake)");
    writer.write_all(b"set acc 0 0 3\r\nnew\r\n").unwrap();
    // Past the write-settle time, GETs are answered by the workers, from the old item.
    std::thread::sleep(Duration::from_millis(800));
    for _ in 0..10 {
        rig.udp_get(&["acc"]);
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(frozen);
    writer
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut reply = [0u8; 8];
    writer
        .read_exact(&mut reply)
        .expect("memcached's reply to the set");
    assert_eq!(&reply, b"STORED\r\n");
    let expected = [value_text("acc", 0, b"new"), b"END\r\n".to_vec()].concat();
    for i in 0..10 {
        let got = rig.udp_get(&["acc"]).payload;
        assert!(
            got == expected || got == b"END\r\n",
            "GET #{i} after STORED returned {:?} (fill_refused_stall {})",
            String::from_utf8_lossy(&got),
            rig.counter("fill_refused_stall")
        );
    }
}

/// memcached's worker threads (`mc-worker`), by thread id.
fn memcached_workers(pid: u32) -> Vec<i32> {
    let mut workers: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("memcached's threads")
        .filter_map(|t| {
            let t = t.ok()?;
            let comm = std::fs::read_to_string(t.path().join("comm")).ok()?;
            (comm.trim() == "mc-worker").then(|| t.file_name().to_str()?.parse().ok())?
        })
        .collect();
    workers.sort();
    workers
}

/// Whether memcached answers `version` on `conn` within `limit`.
fn answers(conn: &mut std::net::TcpStream, limit: Duration) -> bool {
    conn.set_read_timeout(Some(limit)).unwrap();
    conn.write_all(b"version\r\n").unwrap();
    let mut reply = [0u8; 64];
    matches!(conn.read(&mut reply), Ok(n) if reply[..n].starts_with(b"VERSION"))
}

/// One worker thread of memcached stops reading its connections (starved, swapped out, stuck)
/// while the others, which answer the agent's probes, go on: a write on one of its connections
/// waits in the socket's receive queue, unread, for as long as that lasts. Before, the probes
/// saw nothing of it (a known limit until now), GETs past the settle time were
/// answered by the other worker with the old value, filled, and served after `STORED`. Now the
/// agent compares, at each probe, what every connection has received with what memcached has
/// read of it (sock_diag): bytes that arrived before the previous probe and are still unread
/// hold fills, as a backlog of replies does.
#[test]
fn a_write_a_stalled_worker_thread_has_not_read_never_leaves_the_old_value_cached() {
    // Without the watch backstop, which would invalidate the key late when memcached logs
    // the store, so the test sees the kernel's own rule.
    let rig = Rig::with_agent("fworker", 97, &["--watch", "false"]);
    rig.set("stall", b"old", 0, 3600);
    rig.warm("stall", Duration::from_secs(10));
    let addr = rig.server(false);
    let workers = memcached_workers(rig.bed.memcached_pid());
    assert_eq!(workers.len(), 2, "memcached -t 2 has two workers");
    // Find a connection whose worker is not the one answering the agent's probes: freeze a
    // worker, and keep the connection if it stalls while the agent goes on serving.
    let (mut writer, frozen) = (0..8)
        .find_map(|_| {
            let mut conn = rig
                .bed
                .in_client(move || std::net::TcpStream::connect(addr))
                .unwrap();
            for &tid in &workers {
                let frozen = FrozenThread::new(tid);
                if !answers(&mut conn, Duration::from_millis(300)) {
                    std::thread::sleep(Duration::from_millis(1500));
                    let status = rig
                        .bed
                        .agent_cmd(&["status", "--json", "--iface", rig.bed.server_iface()])
                        .unwrap_or_default();
                    if status.contains("\"serving\":true") {
                        return Some((conn, frozen));
                    }
                    drop(frozen);
                    // The version sent meanwhile is answered now.
                    conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                    let mut reply = [0u8; 64];
                    let _ = conn.read(&mut reply);
                    return None;
                }
            }
            None
        })
        .expect("a connection on the worker that does not answer the agent's probes");
    // The `version` sent while finding it waits in front of the set.
    writer.write_all(b"set stall 0 0 3\r\nnew\r\n").unwrap();
    // Past the write-settle time, GETs are answered by the other worker, from the old item.
    std::thread::sleep(Duration::from_millis(800));
    for _ in 0..10 {
        rig.udp_get(&["stall"]);
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(frozen);
    writer
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut reply = Vec::new();
    let mut buf = [0u8; 64];
    while !reply.ends_with(b"STORED\r\n") {
        let n = writer.read(&mut buf).expect("memcached's replies");
        assert!(n > 0, "memcached closed the connection");
        reply.extend_from_slice(&buf[..n]);
    }
    assert!(
        rig.agent_log()
            .contains("memcached has not read what a client sent"),
        "the agent did not say what held fills: {}",
        rig.agent_log()
    );
    let expected = [value_text("stall", 0, b"new"), b"END\r\n".to_vec()].concat();
    for i in 0..10 {
        let got = rig.udp_get(&["stall"]).payload;
        assert!(
            got == expected || got == b"END\r\n",
            "GET #{i} after STORED returned {:?} (fill_refused_stall {})",
            String::from_utf8_lossy(&got),
            rig.counter("fill_refused_stall")
        );
    }
}
