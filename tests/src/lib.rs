//! End-to-end test harness: a veth testbed (loadgen::testbed) with a real memcached and the
//! real agent, and small raw clients that show exactly what came back on the wire.
//!
//! Every test here needs root (network namespaces, XDP); CI runs as root.

use std::{
    collections::HashMap,
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use loadgen::{Testbed, TestbedConfig};

pub mod history;

/// A testbed with memcached and (optionally) the agent attached.
pub struct Rig {
    pub bed: Testbed,
}

/// One UDP reply: the datagrams' payloads (frame headers stripped) joined in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpReply {
    pub request_id: u16,
    pub datagrams: usize,
    pub payload: Vec<u8>,
}

impl Rig {
    /// A testbed named `name` (at most 8 characters) on its own subnet, memcached started.
    pub fn new(name: &str, subnet: u8) -> Rig {
        Rig::with_memcached(name, subnet, &["-m", "256", "-t", "2"])
    }

    /// A testbed with memcached started with `memcached_args` (besides its address and port).
    pub fn with_memcached(name: &str, subnet: u8, memcached_args: &[&str]) -> Rig {
        let _ = tracing_init();
        let cfg = TestbedConfig {
            name: name.to_owned(),
            subnet,
            memcached_args: memcached_args.iter().map(|a| a.to_string()).collect(),
            ..TestbedConfig::default()
        };
        let bed = Testbed::up(cfg).unwrap_or_else(|e| panic!("testbed {name}: {e}"));
        Rig { bed }
    }

    /// Same, with the agent attached and serving.
    pub fn with_agent(name: &str, subnet: u8, args: &[&str]) -> Rig {
        let mut rig = Rig::new(name, subnet);
        rig.start_agent(args);
        rig
    }

    pub fn start_agent(&mut self, args: &[&str]) {
        self.bed
            .start_agent(args)
            .unwrap_or_else(|e| panic!("agent: {e}"));
        // Pins a previous agent kept (upgrade mode, or a kill) answer `status` and may still
        // hold a valid lease: wait until they are this agent's.
        let pid = self.bed.agent_pid().expect("the agent just started");
        let start = Instant::now();
        while !self
            .bed
            .agent_cmd(&["status", "--json", "--iface", self.bed.server_iface()])
            .is_ok_and(|s| s.contains(&format!("\"pid\":{pid}")))
        {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "the agent (pid {pid}) never wrote its pid file; log: {}",
                self.agent_log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        self.wait_serving(true, Duration::from_secs(15));
        // A new agent flushes and holds fills for the write-settle time plus a second.
        std::thread::sleep(Duration::from_millis(1300));
    }

    /// Waits until the agent's `status` says serving == `want`.
    pub fn wait_serving(&self, want: bool, limit: Duration) {
        let start = Instant::now();
        loop {
            let serving = self
                .agent_stats()
                .map(|s| s["serving"] == serde_json::Value::Bool(true))
                .unwrap_or(false);
            if serving == want {
                return;
            }
            assert!(
                start.elapsed() < limit,
                "agent serving != {want} after {limit:?}; log: {}",
                self.agent_log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn agent_log(&self) -> String {
        self.bed
            .agent_log()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    /// The agent's kernel counters (`cache-agent stats --json`), or None if no agent runs.
    pub fn agent_stats(&self) -> Option<serde_json::Value> {
        let out = self
            .bed
            .agent_cmd(&["stats", "--json", "--iface", self.bed.server_iface()])
            .ok()?;
        serde_json::from_str(out.trim()).ok()
    }

    pub fn counter(&self, name: &str) -> u64 {
        self.agent_stats()
            .and_then(|s| s[name].as_u64())
            .unwrap_or(0)
    }

    /// The value of one series of the agent's /metrics (its default address, in the server
    /// namespace), e.g. `memcache_accel_ttl_answers_total{result="installed"}`; None if the
    /// agent does not answer or has no such series.
    pub fn metric(&self, series: &str) -> Option<f64> {
        let series = series.to_owned();
        self.bed.in_server(move || {
            let mut s = TcpStream::connect("127.0.0.1:9477").ok()?;
            s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
            s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
                .ok()?;
            let mut body = String::new();
            s.read_to_string(&mut body).ok()?;
            body.lines()
                .find_map(|l| l.strip_prefix(series.as_str())?.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
    }

    pub fn server(&self, v6: bool) -> SocketAddr {
        let ip: IpAddr = if v6 {
            self.bed.server_v6().into()
        } else {
            self.bed.server_v4().into()
        };
        SocketAddr::new(ip, self.bed.memcached_port())
    }

    /// Sends `request` over TCP from the client namespace and reads until the reply ends with
    /// one of `terminators` (or 2 s pass). Returns the raw reply.
    pub fn tcp(&self, request: &[u8], terminators: &[&[u8]]) -> Vec<u8> {
        let addr = self.server(false);
        let request = request.to_vec();
        let terms: Vec<Vec<u8>> = terminators.iter().map(|t| t.to_vec()).collect();
        self.bed
            .in_client(move || tcp_exchange(addr, &request, &terms))
    }

    /// One text-protocol command whose reply is a single line.
    pub fn tcp_line(&self, request: &str) -> String {
        String::from_utf8_lossy(&self.tcp(request.as_bytes(), &[b"\r\n"])).into_owned()
    }

    pub fn set(&self, key: &str, value: &[u8], flags: u32, exptime: i64) {
        let mut req = format!("set {key} {flags} {exptime} {}\r\n", value.len()).into_bytes();
        req.extend_from_slice(value);
        req.extend_from_slice(b"\r\n");
        let reply = self.tcp(&req, &[b"STORED\r\n", b"ERROR\r\n"]);
        assert_eq!(reply, b"STORED\r\n", "set {key}");
    }

    /// `count` 60-byte `set <prefix><i> ... noreply` over one connection from the client
    /// namespace, in one write; returns once memcached has run them all (its reply to `mn`).
    pub fn set_burst(&self, prefix: &str, count: usize) {
        let addr = self.server(false);
        let mut burst = Vec::new();
        for i in 0..count {
            burst.extend_from_slice(format!("set {prefix}{i} 0 0 60 noreply\r\n").as_bytes());
            burst.extend_from_slice(&[b'y'; 60]);
            burst.extend_from_slice(b"\r\n");
        }
        burst.extend_from_slice(b"mn\r\n");
        self.bed.in_client(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(&burst).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut reply = Vec::new();
            let mut buf = [0u8; 256];
            while !reply.ends_with(b"MN\r\n") {
                let n = s.read(&mut buf).unwrap();
                assert!(n > 0, "memcached closed the connection");
                reply.extend_from_slice(&buf[..n]);
            }
        });
    }

    /// A raw UDP `get` (or any request) from the client namespace: all datagrams of the reply.
    pub fn udp(&self, request: &[u8], request_id: u16, v6: bool) -> UdpReply {
        let addr = self.server(v6);
        let request = request.to_vec();
        self.bed
            .in_client(move || udp_exchange(addr, &request, request_id))
    }

    pub fn udp_get(&self, keys: &[&str]) -> UdpReply {
        self.udp(
            format!("get {}\r\n", keys.join(" ")).as_bytes(),
            next_id(),
            false,
        )
    }

    /// memcached's own `stats`.
    pub fn mc_stats(&self) -> HashMap<String, String> {
        let reply = String::from_utf8_lossy(&self.tcp(b"stats\r\n", &[b"END\r\n"])).into_owned();
        reply
            .lines()
            .filter_map(|l| l.strip_prefix("STAT "))
            .filter_map(|l| l.split_once(' '))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }

    pub fn mc_stat(&self, name: &str) -> u64 {
        self.mc_stats()
            .get(name)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// GETs `key` over UDP until the kernel answers it (hit_keys moves), within `limit`.
    /// Returns the kernel's reply.
    pub fn warm(&self, key: &str, limit: Duration) -> UdpReply {
        let start = Instant::now();
        loop {
            let before = self.counter("hit_keys");
            let reply = self.udp_get(&[key]);
            if self.counter("hit_keys") > before {
                return reply;
            }
            assert!(
                start.elapsed() < limit,
                "kernel never answered `{key}` within {limit:?}; stats: {:?}",
                self.agent_stats()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

static NEXT_ID: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(1);

/// Runs a command (`ip netns exec NS ARGS...`) inside network namespace `ns`, asserting it
/// succeeds; its standard output.
pub fn in_netns(ns: &str, args: &[&str]) -> String {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("ip netns exec {ns} {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} in {ns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn next_id() -> u16 {
    NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

fn tracing_init() -> Result<(), ()> {
    Ok(())
}

pub fn tcp_exchange(addr: SocketAddr, request: &[u8], terminators: &[Vec<u8>]) -> Vec<u8> {
    try_tcp_exchange(addr, request, terminators).expect("connect memcached")
}

/// Like [`tcp_exchange`], but None when memcached cannot be reached.
pub fn try_tcp_exchange(
    addr: SocketAddr,
    request: &[u8],
    terminators: &[Vec<u8>],
) -> Option<Vec<u8>> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    Some(exchange_on(&mut s, request, terminators))
}

fn exchange_on(s: &mut TcpStream, request: &[u8], terminators: &[Vec<u8>]) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_millis(2000)))
        .unwrap();
    if s.write_all(request).is_err() {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
        if terminators.iter().any(|t| out.ends_with(t)) {
            return out;
        }
    }
}

/// Sends one datagram (frame header + `request`) and collects the reply datagrams with the
/// same request id until `total` of them arrived, the payload ends with `END\r\n`, or 1 s.
pub fn udp_exchange(addr: SocketAddr, request: &[u8], request_id: u16) -> UdpReply {
    let bind = if addr.is_ipv6() {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    };
    let sock = UdpSocket::bind(bind).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(1000)))
        .unwrap();
    let mut dgram = Vec::with_capacity(8 + request.len());
    dgram.extend_from_slice(&request_id.to_be_bytes());
    dgram.extend_from_slice(&[0, 0, 0, 1, 0, 0]);
    dgram.extend_from_slice(request);
    sock.send_to(&dgram, addr).unwrap();
    let mut reply = UdpReply {
        request_id,
        datagrams: 0,
        payload: Vec::new(),
    };
    let mut buf = [0u8; 65536];
    let deadline = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < deadline {
        let Ok(n) = sock.recv(&mut buf) else { break };
        if n < 8 || u16::from_be_bytes([buf[0], buf[1]]) != request_id {
            continue;
        }
        reply.datagrams += 1;
        reply.payload.extend_from_slice(&buf[8..n]);
        let total = u16::from_be_bytes([buf[4], buf[5]]) as usize;
        if reply.payload.ends_with(b"END\r\n") || (total > 1 && reply.datagrams >= total) {
            break;
        }
    }
    reply
}

/// The bytes memcached sends for one item of a `get`.
pub fn value_text(key: &str, flags: u32, value: &[u8]) -> Vec<u8> {
    let mut v = format!("VALUE {key} {flags} {}\r\n", value.len()).into_bytes();
    v.extend_from_slice(value);
    v.extend_from_slice(b"\r\n");
    v
}

/// A deterministic pseudo-random printable value of `len` bytes.
pub fn value_of(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| b'a' + ((i as u32 * 7 + seed as u32) % 26) as u8)
        .collect()
}
