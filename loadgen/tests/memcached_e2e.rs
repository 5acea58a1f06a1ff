//! End-to-end against a real memcached on 127.0.0.1 (started here with `-u root`, so run as
//! root): populate, then 2-second UDP and TCP runs, checking hits/misses against what memcached's
//! own `stats` counted. Skipped (with a message) when memcached is not installed.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use loadgen::runner::{self, RunConfig, Transport};
use loadgen::units::HumanDuration;
use loadgen::units::SizeRange;
use loadgen::workload::{Distribution, LoadMode, Workload};

/// The tests in this file share two CPUs with memcached; run them one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// A memcached child killed on drop (also when a test panics).
struct Memcached {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Memcached {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    for _ in 0..50 {
        let t = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = t.local_addr().unwrap().port();
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port");
}

fn start_memcached() -> Option<Memcached> {
    let bin = std::env::var("MEMCACHED_BIN").unwrap_or_else(|_| "memcached".into());
    let port = free_port();
    let child = match Command::new(&bin)
        .args(["-u", "root", "-l", "127.0.0.1", "-m", "64", "-t", "1"])
        .args(["-p", &port.to_string(), "-U", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("skipped: cannot start {bin}: {e}");
            return None;
        }
    };
    let mc = Memcached {
        child,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
    };
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        if loadgen::testbed::memcached_answers(mc.addr) {
            return Some(mc);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("memcached on {} did not come up", mc.addr);
}

/// memcached's `stats` as (name, value) pairs.
fn stat(addr: SocketAddr, name: &str) -> u64 {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s.write_all(b"stats\r\n").unwrap();
    let mut text = String::new();
    let mut buf = [0u8; 4096];
    while !text.ends_with("END\r\n") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "stats connection closed");
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    text.lines()
        .find_map(|l| {
            let mut t = l.split_whitespace();
            (t.next() == Some("STAT") && t.next() == Some(name))
                .then(|| t.next().unwrap().parse().unwrap())
        })
        .unwrap_or_else(|| panic!("no stat {name}"))
}

fn workload(keys: u64, duration: Duration) -> Workload {
    let mut w = Workload::default();
    w.keyspace.keys = keys;
    w.phases.populate = false;
    w.phases.warmup = HumanDuration(Duration::from_millis(200));
    w.phases.duration = HumanDuration(duration);
    w.load.mode = LoadMode::Closed;
    w.load.concurrency = 8;
    w
}

fn config(mc: &Memcached, transport: Transport, w: Workload) -> RunConfig {
    let mut rc = RunConfig::new(vec![mc.addr], transport, w);
    rc.timeout = Duration::from_millis(300);
    rc
}

/// Populate 20k keys, then 2 s of UDP and 2 s of TCP GETs: every key exists, so every GET hits,
/// nothing is lost, and memcached's get_hits grew by at least what we counted.
#[test]
fn populate_then_udp_and_tcp_gets_hit_needs_root() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mc) = start_memcached() else { return };
    let keys = 20_000;
    let mut w = workload(keys, Duration::from_secs(2));
    w.phases.populate = true;
    let pop = runner::populate(&config(&mc, Transport::Tcp, w.clone())).unwrap();
    assert_eq!(pop.stored, keys);
    assert_eq!(stat(mc.addr, "curr_items"), keys);
    w.phases.populate = false;
    for transport in [Transport::Udp, Transport::Tcp] {
        let hits_before = stat(mc.addr, "get_hits");
        let r = runner::run(&config(&mc, transport, w.clone()))
            .unwrap()
            .report;
        let c = r.counters;
        let hits_after = stat(mc.addr, "get_hits");
        eprintln!("{transport:?}: {}", loadgen::report::table(&r));
        assert!(
            c.completed > 1000,
            "{transport:?}: only {} replies",
            c.completed
        );
        assert_eq!(c.get_misses, 0, "{transport:?}: every key was populated");
        assert_eq!(c.get_hits, c.get_keys);
        assert_eq!(c.errors, 0);
        assert!(
            c.timeouts * 1000 <= c.sent,
            "{transport:?}: loss {}/{}",
            c.timeouts,
            c.sent
        );
        assert!(
            hits_after - hits_before >= c.get_hits,
            "memcached counted fewer hits than we did"
        );
        assert!(r.latency.count == c.completed && r.latency.p50_us > 0.0);
        assert!(r.throughput_rps > 500.0);
    }
}

/// Half of the keys exist: single and multi-key GETs over UDP (memcached answers a multi-get
/// with one datagram per item plus a final END) and TCP meta report ~50 % hits, in agreement
/// with memcached's get_hits and get_misses.
#[test]
fn half_populated_multiget_hit_ratio_needs_root() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mc) = start_memcached() else { return };
    let mut pw = workload(5_000, Duration::from_secs(1));
    pw.phases.populate = true;
    runner::populate(&config(&mc, Transport::Tcp, pw)).unwrap();
    for (transport, width) in [
        (Transport::Udp, 1),
        (Transport::Udp, 4),
        (Transport::Meta, 4),
    ] {
        let mut w = workload(10_000, Duration::from_secs(2));
        w.popularity.distribution = Distribution::Uniform;
        w.mix.multiget_width = width;
        let (h0, m0) = (stat(mc.addr, "get_hits"), stat(mc.addr, "get_misses"));
        let c = runner::run(&config(&mc, transport, w))
            .unwrap()
            .report
            .counters;
        let (h1, m1) = (stat(mc.addr, "get_hits"), stat(mc.addr, "get_misses"));
        let ratio = c.hit_ratio().unwrap();
        eprintln!("{transport:?} width {width}: {c:?}");
        assert!(
            (ratio - 0.5).abs() < 0.05,
            "{transport:?} width {width}: hit ratio {ratio}"
        );
        assert_eq!(c.get_keys, c.get_requests * width as u64);
        assert!(h1 - h0 >= c.get_hits && m1 - m0 >= c.get_misses);
        assert_eq!(c.errors, 0);
        assert!(c.timeouts * 100 <= c.sent);
    }
}

/// Values bigger than one datagram: memcached sends each reply as several datagrams (1400-byte
/// pieces and a shorter last one), which the receive path may get coalesced by UDP GRO; every
/// GET must still come back as one whole, correct hit.
#[test]
fn multi_datagram_udp_replies_are_reassembled_needs_root() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mc) = start_memcached() else { return };
    let mut w = workload(2_000, Duration::from_secs(2));
    w.keyspace.value_size = SizeRange::fixed(5_000);
    w.phases.populate = true;
    let pop = runner::populate(&config(&mc, Transport::Tcp, w.clone())).unwrap();
    assert_eq!(pop.stored, 2_000);
    w.phases.populate = false;
    let hits_before = stat(mc.addr, "get_hits");
    let c = runner::run(&config(&mc, Transport::Udp, w))
        .unwrap()
        .report
        .counters;
    eprintln!("{c:?}");
    assert!(c.completed > 1000, "only {} replies", c.completed);
    assert_eq!(c.get_misses, 0);
    assert_eq!(c.get_hits, c.get_keys);
    assert_eq!(c.errors, 0);
    assert!(c.timeouts * 100 <= c.sent, "loss {}/{}", c.timeouts, c.sent);
    assert!(stat(mc.addr, "get_hits") - hits_before >= c.get_hits);
}

/// A SET/GET/DELETE mix over UDP and TCP text: every reply is classified, none is an error.
#[test]
fn mixed_verbs_are_classified_needs_root() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mc) = start_memcached() else { return };
    for transport in [Transport::Udp, Transport::Tcp, Transport::Meta] {
        let mut w = workload(2_000, Duration::from_secs(1));
        w.mix.get = 6.0;
        w.mix.set = 3.0;
        w.mix.delete = 1.0;
        let sets0 = stat(mc.addr, "cmd_set");
        let c = runner::run(&config(&mc, transport, w))
            .unwrap()
            .report
            .counters;
        eprintln!("{transport:?}: {c:?}");
        assert!(c.set_requests > 100 && c.delete_requests > 10 && c.get_requests > 100);
        assert_eq!(c.set_stored, c.set_requests);
        assert_eq!(c.delete_deleted + c.delete_not_found, c.delete_requests);
        assert!(c.get_hits > 0 && c.delete_deleted > 0);
        assert_eq!(c.errors, 0);
        assert!(stat(mc.addr, "cmd_set") - sets0 >= c.set_requests);
    }
}

/// Two memcached servers behind ketama: populate spreads the keys over both, and a UDP run that
/// routes GETs the same way hits every key, with both servers answering.
#[test]
fn two_servers_with_ketama_needs_root() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(a) = start_memcached() else { return };
    let Some(b) = start_memcached() else { return };
    let mut w = workload(4_000, Duration::from_secs(1));
    w.phases.populate = true;
    w.mix.multiget_width = 3;
    let mut rc = RunConfig::new(vec![a.addr, b.addr], Transport::Udp, w);
    rc.timeout = Duration::from_millis(300);
    let r = runner::run(&rc).unwrap().report;
    let (ia, ib) = (stat(a.addr, "curr_items"), stat(b.addr, "curr_items"));
    assert_eq!(ia + ib, 4_000);
    assert!(ia > 1_000 && ib > 1_000, "ketama split {ia}/{ib}");
    let c = r.counters;
    assert_eq!(c.get_misses, 0, "{c:?}");
    assert!(c.get_hits > 1_000);
    assert!(stat(a.addr, "get_hits") > 100 && stat(b.addr, "get_hits") > 100);
}
