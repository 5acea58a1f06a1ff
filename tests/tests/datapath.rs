//! The data path end to end (needs root): a real memcached on a veth testbed, the real agent,
//! real clients. The kernel must answer repeated GETs, byte-for-byte as memcached would.

use std::time::Duration;

use tests::{Rig, next_id, value_of, value_text};

// Generous: a loaded CI machine can take seconds to start an agent and fill a key.
const WARM: Duration = Duration::from_secs(10);

#[test]
fn first_get_fills_then_the_kernel_answers_and_memcached_is_not_asked() {
    let rig = Rig::with_agent("dpfill", 11, &[]);
    rig.set("user:1", b"hello", 7, 0);
    let first = rig.udp_get(&["user:1"]);
    assert_eq!(
        first.payload,
        [value_text("user:1", 7, b"hello"), b"END\r\n".to_vec()].concat()
    );
    let kernel = rig.warm("user:1", WARM);
    assert_eq!(
        kernel.payload, first.payload,
        "kernel reply differs from memcached's"
    );

    let mc_hits = rig.mc_stat("get_hits");
    let kernel_hits = rig.counter("hit_keys");
    for _ in 0..20 {
        assert_eq!(rig.udp_get(&["user:1"]).payload, first.payload);
    }
    assert_eq!(
        rig.mc_stat("get_hits"),
        mc_hits,
        "memcached served GETs the kernel should have"
    );
    assert!(rig.counter("hit_keys") >= kernel_hits + 20);
}

#[test]
fn replies_equal_memcacheds_for_every_value_size_and_crlf_inside_values() {
    let rig = Rig::with_agent("dpsize", 12, &[]);
    let mut cases: Vec<(String, Vec<u8>)> = [0usize, 1, 100, 250, 500, 1000, 1400, 4000]
        .iter()
        .map(|&n| (format!("size:{n}"), value_of(n, n as u8)))
        .collect();
    cases.push(("crlf".into(), b"line one\r\nline two\r\n\r\nend".to_vec()));
    cases.push(("lf".into(), b"a\nb\nc".to_vec()));
    for (key, value) in &cases {
        rig.set(key, value, 3, 0);
    }
    // memcached's own reply first (it fills), then whatever answers later must be identical.
    for (key, value) in &cases {
        let expected = [value_text(key, 3, value), b"END\r\n".to_vec()].concat();
        for attempt in 0..6 {
            let reply = rig.udp_get(&[key]);
            assert_eq!(reply.payload, expected, "{key}, attempt {attempt}");
            std::thread::sleep(Duration::from_millis(60));
        }
    }
    // The small ones certainly fit a veth frame: the kernel must have answered them.
    for key in ["size:0", "size:1", "size:100", "crlf", "lf"] {
        rig.warm(key, WARM);
    }
}

#[test]
fn multi_get_is_served_only_when_every_key_hits() {
    let rig = Rig::with_agent("dpmulti", 13, &[]);
    let keys: Vec<String> = (0..8).map(|i| format!("m{i}")).collect();
    for (i, k) in keys.iter().enumerate() {
        rig.set(k, format!("value-{i}").as_bytes(), i as u32, 0);
    }
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let mut expected = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        expected.extend(value_text(k, i as u32, format!("value-{i}").as_bytes()));
    }
    expected.extend_from_slice(b"END\r\n");
    for k in &refs {
        rig.warm(k, WARM);
    }
    let hits = rig.counter("hit_requests");
    let reply = rig.udp_get(&refs);
    assert_eq!(reply.payload, expected);
    assert_eq!(
        reply.datagrams, 1,
        "the kernel answers a multi-get in one datagram"
    );
    assert_eq!(rig.counter("hit_requests"), hits + 1);

    // One key memcached does not have: the whole request goes to memcached, untouched.
    let partial = rig.counter("pass_partial") + rig.counter("pass_miss");
    let mut with_absent = refs.clone();
    with_absent.insert(3, "absent");
    let reply = rig.udp_get(&with_absent);
    let text = reply.payload;
    for (i, k) in keys.iter().enumerate() {
        let item = value_text(k, i as u32, format!("value-{i}").as_bytes());
        assert!(
            text.windows(item.len()).any(|w| w == item),
            "{k} missing from the reply"
        );
    }
    assert!(text.ends_with(b"END\r\n"));
    assert!(rig.counter("pass_partial") + rig.counter("pass_miss") > partial);
}

#[test]
fn ipv6_clients_get_the_same_bytes_with_a_valid_udp_checksum() {
    let rig = Rig::with_agent("dpv6", 14, &[]);
    rig.set("six", b"over ipv6", 1, 0);
    let expected = [value_text("six", 1, b"over ipv6"), b"END\r\n".to_vec()].concat();
    let hits = rig.counter("hit_keys");
    let mut got_kernel = false;
    for _ in 0..30 {
        // The kernel drops nothing: a bad checksum would make the socket discard the reply.
        let reply = rig.udp(b"get six\r\n", next_id(), true);
        assert_eq!(reply.payload, expected);
        if rig.counter("hit_keys") > hits {
            got_kernel = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        got_kernel,
        "the kernel never answered over IPv6: {:?}",
        rig.agent_stats()
    );
}

/// The memcache crate (0.21) writes over TCP; its UDP `get` never flushes the request (a bug
/// in the crate: only its store commands flush), so reads use the raw UDP client.
#[test]
fn values_written_by_the_memcache_crate_are_served_exactly() {
    let rig = Rig::with_agent("dpcrate", 15, &[]);
    let url = format!("memcache://{}?protocol=ascii&timeout=2", rig.server(false));
    rig.bed.in_client(move || {
        let client = memcache::Client::connect(url.as_str()).expect("memcache client");
        client
            .set("crate:key", "from-a-real-client", 0)
            .expect("set");
        client.set("crate:num", 42u64, 0).expect("set");
    });
    let reply = rig.warm("crate:key", WARM);
    assert_eq!(
        reply.payload,
        [
            value_text("crate:key", 0, b"from-a-real-client"),
            b"END\r\n".to_vec()
        ]
        .concat()
    );
    let url = format!("memcache://{}?protocol=ascii&timeout=2", rig.server(false));
    let read_back: Option<String> = rig.bed.in_client(move || {
        memcache::Client::connect(url.as_str())
            .unwrap()
            .get("crate:key")
            .expect("get")
    });
    assert_eq!(read_back.as_deref(), Some("from-a-real-client"));
}

#[test]
fn after_the_agent_stops_memcached_answers_everything() {
    let mut rig = Rig::with_agent("dpstop", 16, &[]);
    rig.set("k", b"v", 0, 0);
    rig.warm("k", WARM);
    rig.bed.stop_agent();
    let before = rig.mc_stat("get_hits");
    for _ in 0..5 {
        assert_eq!(
            rig.udp_get(&["k"]).payload,
            [value_text("k", 0, b"v"), b"END\r\n".to_vec()].concat()
        );
    }
    assert_eq!(
        rig.mc_stat("get_hits"),
        before + 5,
        "memcached must see every GET after detach"
    );
}

#[test]
fn gets_and_meta_gets_pass_to_memcached_untouched() {
    let rig = Rig::with_agent("dpgets", 17, &[]);
    rig.set("g", b"value", 2, 0);
    rig.warm("g", WARM);
    let reply = rig.udp(b"gets g\r\n", next_id(), false);
    let text = String::from_utf8_lossy(&reply.payload).into_owned();
    assert!(
        text.starts_with("VALUE g 2 5 "),
        "gets must carry a CAS unique: {text}"
    );
    // A plain get afterwards never carries the CAS token.
    let plain = rig.udp_get(&["g"]);
    assert_eq!(
        plain.payload,
        [value_text("g", 2, b"value"), b"END\r\n".to_vec()].concat()
    );
    let meta = rig.udp(b"mg g v f\r\n", next_id(), false);
    assert_eq!(meta.payload, b"VA 5 f2\r\nvalue\r\n");
}

/// The client's count of UDP datagrams dropped for a bad checksum (its namespace's
/// /proc/net/snmp, read from the thread that joined it).
fn client_udp_csum_errors(rig: &Rig) -> u64 {
    rig.bed.in_client(|| {
        let snmp = std::fs::read_to_string("/proc/thread-self/net/snmp").unwrap_or_default();
        let mut udp = snmp.lines().filter(|l| l.starts_with("Udp: "));
        let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
            return 0;
        };
        names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(n, _)| *n == "InCsumErrors")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0)
    })
}

/// Turns transmit checksum offload off (`tx off`) on one end of the veth pair, so checksums
/// leaving it are computed in software.
fn tx_checksum_off(ns: &str, iface: &str) {
    tests::in_netns(ns, &["ethtool", "-K", iface, "tx", "off"]);
}

/// A raw socket on the client's veth that sees every frame in both directions.
struct WireCapture {
    fd: i32,
}

impl WireCapture {
    fn open(rig: &Rig) -> WireCapture {
        let iface = std::ffi::CString::new(rig.bed.client_iface()).unwrap();
        let fd = rig.bed.in_client(move || {
            // SAFETY: plain socket and bind calls on a zeroed sockaddr_ll.
            unsafe {
                let proto = (libc::ETH_P_ALL as u16).to_be();
                let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto as i32);
                assert!(fd >= 0, "AF_PACKET socket");
                let mut addr: libc::sockaddr_ll = std::mem::zeroed();
                addr.sll_family = libc::AF_PACKET as u16;
                addr.sll_protocol = proto;
                addr.sll_ifindex = libc::if_nametoindex(iface.as_ptr()) as i32;
                let rc = libc::bind(
                    fd,
                    (&raw const addr).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                );
                assert_eq!(rc, 0, "bind AF_PACKET");
                fd
            }
        });
        WireCapture { fd }
    }

    /// Every frame captured so far.
    fn frames(&self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 65536];
        loop {
            // SAFETY: reads into a buffer of the given length.
            let n = unsafe {
                libc::recv(
                    self.fd,
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n <= 0 {
                return out;
            }
            out.push(buf[..n as usize].to_vec());
        }
    }
}

impl Drop for WireCapture {
    fn drop(&mut self) {
        // SAFETY: closes the socket this capture owns.
        unsafe { libc::close(self.fd) };
    }
}

/// The UDP datagrams from `port` in `frames` whose checksum does not verify (IPv4 may send 0,
/// "no checksum"), and how many were checked.
fn bad_udp_checksums(frames: &[Vec<u8>], port: u16) -> (usize, usize) {
    fn sum(bytes: &[u8]) -> u64 {
        bytes
            .chunks(2)
            .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u64)
            .sum()
    }
    let (mut bad, mut checked) = (0, 0);
    for f in frames {
        let (pseudo, udp) = match u16::from_be_bytes([f[12], f[13]]) {
            0x0800 if f[14 + 9] == 17 => {
                let ihl = (f[14] & 0x0f) as usize * 4;
                let udp = &f[14 + ihl..];
                (sum(&f[26..34]) + 17 + udp.len() as u64, udp)
            }
            0x86dd if f[14 + 6] == 17 => {
                let udp = &f[54..];
                (sum(&f[22..54]) + 17 + udp.len() as u64, udp)
            }
            _ => continue,
        };
        if u16::from_be_bytes([udp[0], udp[1]]) != port {
            continue;
        }
        checked += 1;
        let field = u16::from_be_bytes([udp[6], udp[7]]);
        if field == 0 && f[12] == 0x08 {
            continue;
        }
        let mut total = pseudo + sum(udp);
        while total > 0xffff {
            total = (total & 0xffff) + (total >> 16);
        }
        if total != 0xffff {
            bad += 1;
        }
    }
    (bad, checked)
}

/// Values too big for the request's XDP frame to grow into (veth leaves tens of bytes of
/// tailroom and 256 of headroom) are answered by `tc_serve` at TC ingress: same bytes as
/// memcached, over IPv4 and IPv6, with UDP checksums that verify on the wire whether the
/// request's checksum was left to offload (veth's default: the reply's is then finished on the
/// way out) or computed by the client (the kernel then writes the final one).
#[test]
fn replies_too_big_for_the_xdp_frame_are_answered_from_tc_ingress() {
    for (round, offload) in ["default", "server tx off", "both tx off"]
        .iter()
        .enumerate()
    {
        // Warm start off: its own gets would show in memcached's get_hits.
        let rig = Rig::with_agent(
            &format!("dptc{round}"),
            18 + round as u8,
            &["--warm-start", "false"],
        );
        if *offload != "default" {
            tx_checksum_off(rig.bed.server_netns(), rig.bed.server_iface());
        }
        if *offload == "both tx off" {
            tx_checksum_off(rig.bed.client_netns(), rig.bed.client_iface());
        }
        let wire = WireCapture::open(&rig);
        let csum_errors = client_udp_csum_errors(&rig);
        for n in [400usize, 1000, 1340] {
            let key = format!("big:{n}");
            let value = value_of(n, n as u8);
            rig.set(&key, &value, 9, 0);
            let expected = [value_text(&key, 9, &value), b"END\r\n".to_vec()].concat();
            assert_eq!(rig.udp_get(&[&key]).payload, expected, "{offload}: {key}");
            let kernel = rig.warm(&key, WARM);
            assert_eq!(
                kernel.payload, expected,
                "{offload}: kernel reply for {key}"
            );
            assert_eq!(kernel.datagrams, 1);
            let (mc_hits, tc_hits) = (rig.mc_stat("get_hits"), rig.counter("hit_requests_tc"));
            let no_ticket = rig.counter("fill_refused_no_ticket");
            for v6 in [false, true, false, true] {
                let reply = rig.udp(format!("get {key}\r\n").as_bytes(), next_id(), v6);
                assert_eq!(reply.payload, expected, "{offload}: {key} v6={v6}");
            }
            assert_eq!(
                rig.mc_stat("get_hits"),
                mc_hits,
                "{offload}: memcached answered GETs for {key} the kernel should have"
            );
            // The kernel's own replies pass tc_fill on the way out: not fills refused (found
            // by QA round 6: every TC-answered hit counted as one).
            assert_eq!(
                rig.counter("fill_refused_no_ticket"),
                no_ticket,
                "{offload}: {key}: the kernel's replies were counted as refused fills"
            );
            // XDP itself sometimes has the room (a page-pool fragment's tailroom varies);
            // a kilobyte more than the request never fits on veth.
            if n >= 1000 {
                assert!(
                    rig.counter("hit_requests_tc") >= tc_hits + 4,
                    "{offload}: {key} was not answered from TC ingress: {:?}",
                    rig.agent_stats()
                );
            }
        }
        assert_eq!(
            client_udp_csum_errors(&rig),
            csum_errors,
            "{offload}: the client dropped replies with a bad UDP checksum"
        );
        // With offload on, checksums on the veth are left for "hardware" that never runs:
        // only the other rounds carry final checksums on the wire.
        if *offload != "default" {
            let (bad, checked) = bad_udp_checksums(&wire.frames(), rig.bed.memcached_port());
            assert!(checked >= 20, "{offload}: only {checked} replies captured");
            assert_eq!(
                bad, 0,
                "{offload}: {bad} of {checked} replies with a bad UDP checksum"
            );
        }
        // A write still invalidates what TC ingress serves.
        rig.set("big:1000", &value_of(1000, 77), 9, 0);
        assert_eq!(
            rig.udp_get(&["big:1000"]).payload,
            [
                value_text("big:1000", 9, &value_of(1000, 77)),
                b"END\r\n".to_vec()
            ]
            .concat(),
            "{offload}: stale value after a write"
        );
    }
}

/// `--tc-serve false`: a hit too big for the XDP frame passes to memcached, counted as no room.
#[test]
fn without_tc_serve_hits_too_big_for_the_frame_go_to_memcached() {
    let rig = Rig::with_agent(
        "dpnotc",
        21,
        &["--tc-serve", "false", "--warm-start", "false"],
    );
    let value = value_of(1340, 3);
    rig.set("huge", &value, 1, 0);
    rig.set("tiny", b"t", 1, 0);
    rig.warm("tiny", WARM);
    let expected = [value_text("huge", 1, &value), b"END\r\n".to_vec()].concat();
    // GETs miss until one fills; from then on they find the entry but no room in the frame.
    let start = std::time::Instant::now();
    loop {
        let before = rig.counter("pass_no_room");
        assert_eq!(rig.udp_get(&["huge"]).payload, expected);
        if rig.counter("pass_no_room") > before {
            break;
        }
        assert!(
            start.elapsed() < WARM,
            "never filled: {:?}",
            rig.agent_stats()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (mc_hits, no_room) = (rig.mc_stat("get_hits"), rig.counter("pass_no_room"));
    for _ in 0..5 {
        assert_eq!(rig.udp_get(&["huge"]).payload, expected);
    }
    assert_eq!(rig.mc_stat("get_hits"), mc_hits + 5);
    assert_eq!(rig.counter("pass_no_room"), no_room + 5);
    assert_eq!(rig.counter("hit_requests_tc"), 0);
}

/// A GET carrying IPv4 options, whose reply the XDP frame cannot hold: TC ingress would move
/// the UDP header (replies have a plain 20-byte IP header) under an skb whose checksum is left
/// to the transmitting device, so it passes the request to memcached instead. The server veth
/// computes checksums in software here, which is where a misplaced one would show.
#[test]
fn a_get_with_ip_options_too_big_for_the_xdp_frame_passes_to_memcached() {
    let rig = Rig::with_agent("dpopts", 22, &["--warm-start", "false"]);
    tx_checksum_off(rig.bed.server_netns(), rig.bed.server_iface());
    let value = value_of(1000, 9);
    rig.set("opts", &value, 2, 0);
    let expected = [value_text("opts", 2, &value), b"END\r\n".to_vec()].concat();
    rig.warm("opts", WARM);
    let (unsupported, tc_hits) = (
        rig.counter("pass_unsupported"),
        rig.counter("hit_requests_tc"),
    );
    let addr = rig.server(false);
    let replies: Vec<Vec<u8>> = rig.bed.in_client(move || {
        let sock = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        // Four NOPs: a 24-byte IP header on every datagram of this socket.
        let nops = [1u8, 1, 1, 1];
        // SAFETY: setsockopt on a valid socket with a 4-byte option buffer.
        let rc = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&sock),
                libc::IPPROTO_IP,
                libc::IP_OPTIONS,
                nops.as_ptr().cast(),
                nops.len() as u32,
            )
        };
        assert_eq!(rc, 0, "IP_OPTIONS");
        sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        (0..3u16)
            .map(|i| {
                let mut dgram = vec![0, i as u8 + 1, 0, 0, 0, 1, 0, 0];
                dgram.extend_from_slice(b"get opts\r\n");
                sock.send_to(&dgram, addr).unwrap();
                let mut buf = [0u8; 2048];
                let n = sock.recv(&mut buf).unwrap_or(0);
                buf[8.min(n)..n].to_vec()
            })
            .collect()
    });
    for reply in replies {
        assert_eq!(reply, expected);
    }
    assert_eq!(rig.counter("hit_requests_tc"), tc_hits);
    assert_eq!(rig.counter("pass_unsupported"), unsupported + 3);
}

/// Sets the MTU of both ends of the testbed's veth pair.
fn set_mtu(rig: &Rig, mtu: u32) {
    for (ns, iface) in [
        (rig.bed.server_netns(), rig.bed.server_iface()),
        (rig.bed.client_netns(), rig.bed.client_iface()),
    ] {
        tests::in_netns(ns, &["ip", "link", "set", iface, "mtu", &mtu.to_string()]);
    }
}

#[test]
fn a_smaller_mtu_is_followed_and_hits_that_no_longer_fit_go_to_memcached() {
    // Found by QA: the MTU was read once at start, so after it shrank the kernel kept
    // answering with frames the link dropped, and clients of those keys timed out for good.
    let rig = Rig::with_agent("dpmtu", 81, &["--warm-start", "false"]);
    let value = value_of(1000, 7);
    rig.set("mtu:big", &value, 0, 0);
    let expected = [value_text("mtu:big", 0, &value), b"END\r\n".to_vec()].concat();
    assert_eq!(rig.warm("mtu:big", WARM).payload, expected, "kernel reply");
    set_mtu(&rig, 600);
    // The agent looks at the interface every 250 ms.
    std::thread::sleep(Duration::from_millis(1000));
    let (hits, too_big) = (rig.counter("hit_requests"), rig.counter("pass_too_big"));
    for i in 0..4 {
        assert_eq!(
            rig.udp_get(&["mtu:big"]).payload,
            expected,
            "reply #{i} after the MTU went down to 600"
        );
    }
    assert_eq!(
        rig.counter("hit_requests"),
        hits,
        "the kernel answered with a reply bigger than the link's MTU"
    );
    assert!(rig.counter("pass_too_big") >= too_big + 4);
    assert!(
        rig.agent_log().contains("interface MTU changed"),
        "{}",
        rig.agent_log()
    );
    // Back up: the kernel answers again.
    set_mtu(&rig, 1500);
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(
        rig.warm("mtu:big", WARM).payload,
        expected,
        "after the MTU came back"
    );
}
