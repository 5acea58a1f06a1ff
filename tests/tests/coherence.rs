//! Coherence (needs root): after any write, on any protocol and transport, the kernel never
//! answers with the old value. Each test warms the cache (the kernel answered the key), writes,
//! and then reads: the reply must be what memcached itself returns now.

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::{Duration, Instant},
};

use tests::{Rig, next_id, value_text};

// Generous: a loaded CI machine can take seconds to start an agent and fill a key.
const WARM: Duration = Duration::from_secs(10);

/// What memcached itself returns for a plain get of `key` (over TCP, never cached).
fn authoritative(rig: &Rig, key: &str) -> Vec<u8> {
    rig.tcp(format!("get {key}\r\n").as_bytes(), &[b"END\r\n"])
}

/// Reads `key` over UDP several times: every reply must equal memcached's current answer.
fn assert_fresh(rig: &Rig, key: &str, expected: &[u8], what: &str) {
    assert_eq!(
        authoritative(rig, key),
        expected,
        "{what}: memcached itself disagrees with the test"
    );
    for i in 0..8 {
        let reply = rig.udp_get(&[key]);
        assert_eq!(
            reply.payload, expected,
            "{what}: stale or wrong reply #{i} for {key}"
        );
    }
}

/// TCP segments retransmitted so far in network namespace `ns` (RetransSegs).
fn tcp_retransmits(ns: &str) -> u64 {
    let text = tests::in_netns(ns, &["cat", "/proc/net/snmp"]);
    let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next().unwrap_or(""), tcp.next().unwrap_or(""));
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RetransSegs")
        .and_then(|(_, v)| v.parse().ok())
        .expect("RetransSegs in /proc/net/snmp")
}

fn item(key: &str, flags: u32, value: &[u8]) -> Vec<u8> {
    [value_text(key, flags, value), b"END\r\n".to_vec()].concat()
}

const MISS: &[u8] = b"END\r\n";

#[test]
fn text_protocol_writes_invalidate() {
    let rig = Rig::with_agent("cotext", 31, &[]);
    let warm = |key: &str, value: &[u8]| {
        rig.set(key, value, 0, 0);
        rig.warm(key, WARM);
    };

    warm("del", b"old");
    assert_eq!(rig.tcp_line("delete del\r\n"), "DELETED\r\n");
    assert_fresh(&rig, "del", MISS, "delete");

    warm("app", b"old");
    assert_eq!(
        rig.tcp(b"append app 0 0 4\r\n-new\r\n", &[b"\r\n"]),
        b"STORED\r\n"
    );
    assert_fresh(&rig, "app", &item("app", 0, b"old-new"), "append");

    warm("pre", b"old");
    assert_eq!(
        rig.tcp(b"prepend pre 0 0 4\r\nnew-\r\n", &[b"\r\n"]),
        b"STORED\r\n"
    );
    assert_fresh(&rig, "pre", &item("pre", 0, b"new-old"), "prepend");

    warm("num", b"10");
    assert_eq!(rig.tcp_line("incr num 5\r\n"), "15\r\n");
    assert_fresh(&rig, "num", &item("num", 0, b"15"), "incr");
    rig.warm("num", WARM);
    assert_eq!(rig.tcp_line("decr num 3\r\n"), "12\r\n");
    assert_fresh(&rig, "num", &item("num", 0, b"12"), "decr");

    warm("rep", b"old");
    assert_eq!(
        rig.tcp(b"replace rep 4 0 3\r\nnew\r\n", &[b"\r\n"]),
        b"STORED\r\n"
    );
    assert_fresh(&rig, "rep", &item("rep", 4, b"new"), "replace");

    warm("cas", b"old");
    let gets = String::from_utf8(rig.tcp(b"gets cas\r\n", &[b"END\r\n"])).unwrap();
    let unique = gets
        .lines()
        .next()
        .unwrap()
        .split(' ')
        .nth(4)
        .unwrap()
        .to_owned();
    let req = format!("cas cas 0 0 3 {unique}\r\nnew\r\n");
    assert_eq!(rig.tcp(req.as_bytes(), &[b"\r\n"]), b"STORED\r\n");
    assert_fresh(&rig, "cas", &item("cas", 0, b"new"), "cas");

    warm("nor", b"old");
    rig.tcp(
        b"set nor 0 0 3 noreply\r\nnew\r\nget nor\r\n",
        &[b"END\r\n"],
    );
    assert_fresh(&rig, "nor", &item("nor", 0, b"new"), "set noreply");
}

#[test]
fn pipelined_and_split_writes_invalidate() {
    let rig = Rig::with_agent("copipe", 32, &[]);
    for k in ["p1", "p2", "p3", "p4"] {
        rig.set(k, b"old", 0, 0);
        rig.warm(k, WARM);
    }
    // Many commands in one segment, values containing command-like text and CRLF.
    let batch = b"set p1 0 0 15\r\ndelete p2\r\nxx\r\n\r\ndelete p2 noreply\r\nset p3 0 0 3 noreply\r\nnew\r\nincr nothing 1\r\nget p4\r\nappend p4 0 0 1 noreply\r\n!\r\nget p4\r\n";
    let reply = rig.tcp(batch, &[b"VALUE p4 0 4\r\nold!\r\nEND\r\n"]);
    assert!(
        reply.ends_with(b"old!\r\nEND\r\n"),
        "{}",
        String::from_utf8_lossy(&reply)
    );
    assert_fresh(
        &rig,
        "p1",
        &item("p1", 0, b"delete p2\r\nxx\r\n"),
        "pipelined set",
    );
    assert_fresh(&rig, "p2", MISS, "pipelined delete");
    assert_fresh(&rig, "p3", &item("p3", 0, b"new"), "pipelined set noreply");
    assert_fresh(&rig, "p4", &item("p4", 0, b"old!"), "pipelined append");

    // One command split over several TCP segments, even inside the key and the value.
    rig.set("split-key", b"old", 0, 0);
    rig.warm("split-key", WARM);
    let addr = rig.server(false);
    rig.bed.in_client(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        for part in [&b"set spl"[..], b"it-key 0 0 9\r\nnew", b"-value\r\n"] {
            s.write_all(part).unwrap();
            std::thread::sleep(Duration::from_millis(150));
        }
        let mut buf = [0u8; 16];
        let n = std::io::Read::read(&mut s, &mut buf).unwrap();
        assert_eq!(&buf[..n], b"STORED\r\n");
    });
    assert_fresh(
        &rig,
        "split-key",
        &item("split-key", 0, b"new-value"),
        "split set",
    );
}

#[test]
fn meta_and_binary_writes_invalidate() {
    let rig = Rig::with_agent("cometa", 33, &[]);
    let warm = |key: &str| {
        rig.set(key, b"old", 0, 0);
        rig.warm(key, WARM);
    };
    warm("ms");
    assert_eq!(rig.tcp_line("ms ms 3 F5\r\nnew\r\n"), "HD\r\n");
    assert_fresh(&rig, "ms", &item("ms", 5, b"new"), "meta set");
    warm("md");
    assert_eq!(rig.tcp_line("md md\r\n"), "HD\r\n");
    assert_fresh(&rig, "md", MISS, "meta delete");
    rig.set("ma", b"7", 0, 0);
    rig.warm("ma", WARM);
    assert_eq!(rig.tcp_line("ma ma\r\n"), "HD\r\n");
    assert_fresh(&rig, "ma", &item("ma", 0, b"8"), "meta arithmetic");
    warm("mgt");
    assert_eq!(rig.tcp_line("mg mgt T1\r\n"), "HD\r\n");
    std::thread::sleep(Duration::from_millis(2200));
    assert_fresh(&rig, "mgt", MISS, "meta get with a new TTL, expired");

    // Binary protocol: set then delete, 24-byte header, extras, key, value.
    warm("bin");
    let mut set = vec![
        0x80, 0x01, 0, 3, 8, 0, 0, 0, 0, 0, 0, 14, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    set.extend_from_slice(&[0, 0, 0, 9, 0, 0, 0, 0]); // flags 9, exptime 0
    set.extend_from_slice(b"binnew");
    let reply = rig.tcp(&set, &[]);
    assert!(
        reply.len() >= 24 && reply[0] == 0x81 && reply[6..8] == [0, 0],
        "binary set: {reply:?}"
    );
    assert_fresh(&rig, "bin", &item("bin", 9, b"new"), "binary set");
    rig.warm("bin", WARM);
    let del = [
        0x80, 0x04, 0, 3, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, b'b', b'i',
        b'n',
    ];
    let reply = rig.tcp(&del, &[]);
    assert!(
        reply.len() >= 24 && reply[6..8] == [0, 0],
        "binary delete: {reply:?}"
    );
    assert_fresh(&rig, "bin", MISS, "binary delete");
}

#[test]
fn writes_over_udp_and_ipv6_invalidate() {
    let rig = Rig::with_agent("coudp", 34, &[]);
    rig.set("u1", b"old", 0, 0);
    rig.warm("u1", WARM);
    let reply = rig.udp(b"delete u1\r\n", next_id(), false);
    assert_eq!(reply.payload, b"DELETED\r\n");
    assert_fresh(&rig, "u1", MISS, "delete over UDP");

    rig.set("u2", b"old", 0, 0);
    rig.warm("u2", WARM);
    let reply = rig.udp(b"set u2 0 0 3\r\nnew\r\n", next_id(), false);
    assert_eq!(reply.payload, b"STORED\r\n");
    assert_fresh(&rig, "u2", &item("u2", 0, b"new"), "set over UDP");

    rig.set("v6", b"old", 0, 0);
    rig.warm("v6", WARM);
    let addr = rig.server(true);
    rig.bed.in_client(move || {
        let reply = tests::tcp_exchange(addr, b"set v6 0 0 3\r\nnew\r\n", &[b"\r\n".to_vec()]);
        assert_eq!(reply, b"STORED\r\n");
    });
    assert_fresh(&rig, "v6", &item("v6", 0, b"new"), "set over IPv6 TCP");
}

#[test]
fn writes_memcached_refuses_never_extend_a_cached_items_life() {
    const TOUCHW_TTL_S: u64 = 5; // 4294967301 - 2^32
    // Each key is cached with a TTL; then a write memcached refuses (or one that keeps the
    // TTL) is sent. The kernel must not take that write's exptime for the item's: after
    // memcached expires the item, nobody may answer it.
    let rig = Rig::with_agent("corefuse", 68, &[]);
    let cases: [(&str, i64, &[u8], &str); 10] = [
        ("r-add", 8, b"add r-add 0 0 2\r\nxx\r\n", "NOT_STORED\r\n"),
        (
            "r-cas",
            8,
            b"cas r-cas 0 0 2 999999\r\nxx\r\n",
            "EXISTS\r\n",
        ),
        ("r-mse", 8, b"ms r-mse 2 ME\r\nxx\r\n", "NS\r\n"),
        ("r-msc", 8, b"ms r-msc 2 C999999\r\nxx\r\n", "EX\r\n"),
        // memcached reads 2 + 2 bytes as the block, then the CRLF as an empty command line.
        (
            "r-chunk",
            8,
            b"set r-chunk 0 0 2\r\nxxxx\r\n",
            "CLIENT_ERROR bad data chunk\r\nERROR\r\n",
        ),
        ("r-msa", 8, b"ms r-msa 2 MA\r\nzz\r\n", "HD\r\n"),
        // Found by QA: memcached keeps the exptime in an int32, so this is a TTL of
        // TOUCHW_TTL_S, not a unix time in 2106.
        (
            "r-touchw",
            8,
            b"touch r-touchw 4294967301\r\n",
            "TOUCHED\r\n",
        ),
        // A token too many: memcached refuses the touch.
        (
            "r-touchx",
            8,
            b"touch r-touchx 1000 noreply x\r\n",
            "ERROR\r\n",
        ),
        // A flag memcached does not take: it refuses the whole command, T included.
        (
            "r-mgbad",
            8,
            b"mg r-mgbad T1000 v !\r\n",
            "CLIENT_ERROR invalid flag\r\n",
        ),
        // Shorter than --max-age: the refill after the refused add must wait for the TTL
        // memcached reports instead of living --max-age.
        (
            "r-short",
            3,
            b"add r-short 0 0 2\r\nxx\r\n",
            "NOT_STORED\r\n",
        ),
    ];
    // One case at a time, so that under load no key's TTL runs out while the others warm.
    let mut deadlines = Vec::new();
    for (key, exptime, write, reply) in cases {
        rig.set(key, b"v1", 0, exptime);
        // memcached's one-second clock: gone by exptime + 1 s at the latest.
        let mut deadline = Instant::now() + Duration::from_millis(exptime as u64 * 1000 + 1200);
        rig.warm(key, WARM);
        let got = rig.tcp(write, &[reply.as_bytes()]);
        assert_eq!(String::from_utf8_lossy(&got), reply, "{key}");
        if key == "r-touchw" {
            deadline = Instant::now() + Duration::from_millis(TOUCHW_TTL_S * 1000 + 1200);
        }
        deadlines.push(deadline);
        // Served again by the kernel, with what memcached holds, before the expiry (not
        // r-short: with a second or less left, memcached's `me` cannot tell it from "never
        // expires", so the kernel may well not serve it again).
        if key != "r-short" {
            let value: &[u8] = if key == "r-msa" { b"v1zz" } else { b"v1" };
            let reply = rig.warm(key, WARM);
            assert_eq!(reply.payload, item(key, 0, value), "{key} after the write");
        }
    }
    // GETs keep refilling the entries until well past every expiry.
    let end = *deadlines.iter().max().unwrap() + Duration::from_secs(2);
    while Instant::now() < end {
        for (i, (key, _, _, _)) in cases.iter().enumerate() {
            let reply = rig.udp_get(&[key]);
            if Instant::now() > deadlines[i] {
                assert_eq!(
                    reply.payload, MISS,
                    "{key} served after memcached expired it"
                );
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn an_item_memcached_evicts_during_a_write_burst_is_never_served_after() {
    // A 2 MiB memcached: a burst of sets evicts the cached key. Under such a burst memcached's
    // worker threads drop log entries (`log_worker_dropped`) without telling the watch
    // stream, so the eviction may never be reported: the agent must notice the drop.
    // A flat LRU: with memcached's segmented one, a key fetched twice moves to the warm LRU
    // and a burst of new items may never evict it.
    let mut rig = Rig::with_memcached(
        "coevict",
        70,
        &["-m", "2", "-t", "2", "-o", "no_lru_maintainer"],
    );
    rig.start_agent(&[]);
    // memcached full first, so the key is evicted in the middle of a later burst, when the log
    // is already overflowing, rather than at its start.
    let epoch = rig.counter("agent_epoch");
    for round in 0.. {
        rig.set_burst("pre", 40_000);
        if rig.mc_stat("log_worker_dropped") > 0 {
            break;
        }
        assert!(
            round < 5,
            "the bursts never made memcached drop log entries"
        );
    }
    // The agent's next health check (every write-settle / 4) sees the drop.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        rig.counter("agent_epoch") > epoch,
        "the agent flushed after memcached dropped log entries"
    );
    rig.set("ev", &[b'x'; 60], 0, 0);
    rig.warm("ev", WARM);
    for round in 0.. {
        rig.set_burst("fill", 40_000);
        if rig.tcp(b"me ev\r\n", &[b"\r\n"]) == b"EN\r\n" {
            break;
        }
        assert!(round < 3, "memcached never evicted the key");
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_fresh(&rig, "ev", MISS, "evicted during a write burst");
}

#[test]
fn lines_memcached_reads_otherwise_than_a_naive_parser_never_hide_a_delete() {
    // Each stream makes memcached run `delete <key>` right after a line a parser could frame
    // differently: a storage line memcached refuses (so it reads no data block), a number
    // with a sign, a CR or NUL inside a line, a 0x80 byte on a text connection.
    let rig = Rig::with_agent("coframe", 71, &[]);
    let long_key = "L".repeat(251);
    let flags = "q ".repeat(30);
    let mut binary_header = vec![0x80, 0x0b, 0, 0, 0, 0, 0, 0, 0, 0, 0, 13];
    binary_header.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x0a]);
    let cases: Vec<(&str, Vec<u8>, Vec<u8>)> = vec![
        (
            "flags -1",
            b"set zz -1 0 13\r\n".to_vec(),
            b"\r\n\r\n".to_vec(),
        ),
        (
            "bad exptime",
            b"set zz 0 abc 13\r\n".to_vec(),
            b"\r\n\r\n".to_vec(),
        ),
        (
            "too many tokens",
            b"set zz 0 0 13 a b\r\n".to_vec(),
            b"\r\n\r\n".to_vec(),
        ),
        (
            "cas without unique",
            b"cas zz 0 0 13\r\n".to_vec(),
            b"\r\n\r\n".to_vec(),
        ),
        (
            "cas bad unique",
            b"cas zz 0 0 13 abc\r\n".to_vec(),
            b"\r\n\r\n".to_vec(),
        ),
        (
            "ms key > 250",
            format!("ms {long_key} 13\r\n").into_bytes(),
            b"\r\n\r\n".to_vec(),
        ),
        (
            "ms too many flags",
            format!("ms zz 13 {flags}\r\n").into_bytes(),
            b"\r\n\r\n".to_vec(),
        ),
        (
            "length +12",
            b"set x 0 0 +12\r\nset y 0 0 10\r\n".to_vec(),
            b"\r\n".to_vec(),
        ),
        (
            "CR inside a key",
            b"set a\rb 0 12 0\r\n\r\n".to_vec(),
            b"\r\n".to_vec(),
        ),
        (
            "0x80 on a text connection",
            [b"mn\r\n".to_vec(), binary_header].concat(),
            b"\r\n".to_vec(),
        ),
        // Found by QA: memcached keeps the length in an int32, so it reads a 12-byte block
        // (`set x 0 0 50`), not a line that would hide the delete inside a 50-byte block.
        (
            "ms length past int32",
            b"ms wrapk 4294967308\r\nset x 0 0 50\r\n".to_vec(),
            b"\r\n".to_vec(),
        ),
    ];
    let addr = rig.server(false);
    for (i, (what, before, after)) in cases.into_iter().enumerate() {
        let key = format!("frame{i}");
        rig.set(&key, b"old", 0, 0);
        rig.warm(&key, WARM);
        let stream = [before, format!("delete {key}").into_bytes(), after].concat();
        let reply = rig.bed.in_client(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(&stream).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            let mut reply = Vec::new();
            let mut buf = [0u8; 4096];
            while let Ok(n) = std::io::Read::read(&mut s, &mut buf) {
                if n == 0 {
                    break;
                }
                reply.extend_from_slice(&buf[..n]);
            }
            reply
        });
        assert!(
            reply.windows(9).any(|w| w == b"DELETED\r\n"),
            "{what}: memcached ran the delete: {}",
            String::from_utf8_lossy(&reply)
        );
        assert_fresh(&rig, &key, MISS, what);
    }
    // TCP urgent data (found by QA): the kernel takes the urgent byte out of the stream, so
    // memcached runs `delete frame-urg` where the bytes on the wire say `delete frame-urgX`.
    rig.set("frame-urg", b"old", 0, 0);
    rig.warm("frame-urg", WARM);
    let reply = rig.bed.in_client(move || {
        use std::os::fd::AsRawFd;
        let mut s = TcpStream::connect(addr).unwrap();
        let urgent = b"delete frame-urgX";
        let sent = unsafe {
            libc::send(
                s.as_raw_fd(),
                urgent.as_ptr().cast(),
                urgent.len(),
                libc::MSG_OOB,
            )
        };
        assert_eq!(sent, urgent.len() as isize);
        s.write_all(b"\r\n").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut reply = vec![0u8; 64];
        let n = std::io::Read::read(&mut s, &mut reply).unwrap_or(0);
        reply.truncate(n);
        reply
    });
    assert_eq!(reply, b"DELETED\r\n", "memcached ran `delete frame-urg`");
    assert_fresh(&rig, "frame-urg", MISS, "a delete sent with urgent data");
    // A NUL ends memcached's line: `delete <key>\0zz` deletes <key>.
    rig.set("frame-nul", b"old", 0, 0);
    rig.warm("frame-nul", WARM);
    rig.tcp(b"delete frame-nul\0zz\r\n", &[b"\r\n"]);
    assert_fresh(&rig, "frame-nul", MISS, "NUL in a line");
}

#[test]
fn a_write_after_a_get_in_one_udp_datagram_invalidates() {
    let rig = Rig::with_agent("copiped", 69, &[]);
    rig.set("pk", b"old", 0, 0);
    rig.warm("pk", WARM);
    rig.udp(b"get other\r\ndelete pk\r\n", next_id(), false);
    assert_fresh(&rig, "pk", MISS, "delete after a get in one datagram");
}

#[test]
fn ttl_expiry_touch_gat_and_flush_all_are_honoured() {
    let rig = Rig::with_agent("cottl", 35, &[]);
    // Long enough to be warmed on a loaded machine: with a second or less left the kernel
    // does not fill an item.
    let stored = Instant::now();
    rig.set("ttl", b"short", 0, 5);
    rig.warm("ttl", WARM);
    let expired = stored + Duration::from_millis(5_300);
    std::thread::sleep(expired.saturating_duration_since(Instant::now()));
    assert_fresh(&rig, "ttl", MISS, "exptime 5");

    rig.set("touch", b"v", 0, 0);
    rig.warm("touch", WARM);
    assert_eq!(rig.tcp_line("touch touch 2\r\n"), "TOUCHED\r\n");
    std::thread::sleep(Duration::from_millis(2600));
    assert_fresh(&rig, "touch", MISS, "touch 2");

    rig.set("gat", b"v", 0, 0);
    rig.warm("gat", WARM);
    rig.tcp(b"gat 2 gat\r\n", &[b"END\r\n"]);
    std::thread::sleep(Duration::from_millis(2600));
    assert_fresh(&rig, "gat", MISS, "gat 2");

    rig.set("fl", b"v", 0, 0);
    rig.warm("fl", WARM);
    assert_eq!(rig.tcp_line("flush_all\r\n"), "OK\r\n");
    assert_fresh(&rig, "fl", MISS, "flush_all");

    rig.set("fld", b"v", 0, 0);
    assert_eq!(rig.tcp_line("flush_all 2\r\n"), "OK\r\n");
    let until = Instant::now() + Duration::from_millis(3500);
    while Instant::now() < until {
        // Before the flush takes effect memcached still has it; after, nobody may.
        let reply = rig.udp_get(&["fld"]);
        let now_auth = authoritative(&rig, "fld");
        assert!(
            reply.payload == now_auth || reply.payload == item("fld", 0, b"v"),
            "flush_all 2"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_fresh(&rig, "fld", MISS, "flush_all 2 after it took effect");

    // A delay of 30 days or more is a unix time (found by QA: read as "now", the kernel
    // refilled the item before memcached's flush took effect and served it from then on).
    let unix_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    delayed_flush_is_followed(&rig, "fla", &format!("flush_all {}", unix_now + 2), 4500);

    // memcached keeps a number in an int32 (found by QA): -4294967291 is a delay of 5 s. Read
    // as negative ("now"), the kernel refilled the item and served it after memcached's flush.
    delayed_flush_is_followed(&rig, "flw", "flush_all -4294967291", 7500);
}

/// Caches `key`, sends `flush` (a delayed flush_all) and polls for `wait_ms`: every GET is
/// answered with memcached's current answer or the value from before (memcached may not have
/// flushed yet); after that, only with memcached's miss.
fn delayed_flush_is_followed(rig: &Rig, key: &str, flush: &str, wait_ms: u64) {
    rig.set(key, b"v", 0, 0);
    rig.warm(key, WARM);
    assert_eq!(rig.tcp_line(&format!("{flush}\r\n")), "OK\r\n", "{flush}");
    let until = Instant::now() + Duration::from_millis(wait_ms);
    while Instant::now() < until {
        let reply = rig.udp_get(&[key]);
        let now_auth = authoritative(rig, key);
        assert!(
            reply.payload == now_auth || reply.payload == item(key, 0, b"v"),
            "{flush}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_fresh(rig, key, MISS, &format!("{flush}, after it took effect"));
}

#[test]
fn a_get_racing_a_write_never_refills_the_old_value() {
    let rig = Rig::with_agent("corace", 36, RACE_AGENT);
    rig.set("race", b"old", 0, 0);
    rig.warm("race", WARM);
    let reply = race_gets_against(&rig, "race", b"set race 0 0 3\r\nnew\r\n", None);
    assert_eq!(reply, b"STORED\r\n");
    assert_stays(
        &rig,
        "race",
        &item("race", 0, b"new"),
        "stale refill after the race",
    );
}

/// A value whose data block arrives more slowly than the write-settle time: memcached keeps
/// the old item until the last byte, and a GET in between may fill it. The kernel must drop
/// that entry when the block ends, before memcached stores the new value (the watch backstop
/// may report the store up to a second later).
#[test]
fn a_value_arriving_slower_than_the_settle_time_never_leaves_the_old_one_cached() {
    let rig = Rig::with_agent("cotrickle", 86, &["--write-settle-ms", "50"]);
    let addr = rig.server(false);
    // key, the write up to its data block's first byte (the rest is `ew\r\n`), memcached's
    // answer, the value after it.
    let cases = [
        (
            "trickle-set",
            "set trickle-set 0 0 3\r\nn",
            "STORED\r\n",
            "new",
        ),
        ("trickle-ms", "ms trickle-ms 3 T0\r\nn", "HD\r\n", "new"),
        (
            "trickle-cat",
            "append trickle-cat 0 0 3\r\nn",
            "STORED\r\n",
            "oldnew",
        ),
    ];
    for (key, head, stored, value) in cases {
        rig.set(key, b"old", 0, 0);
        rig.warm(key, WARM);
        let mut conn = rig.bed.in_client(move || TcpStream::connect(addr).unwrap());
        conn.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        conn.write_all(head.as_bytes()).unwrap();
        // Past the settle time: memcached still holds the old value, and this GET's reply
        // may be cached.
        std::thread::sleep(Duration::from_millis(300));
        rig.warm(key, WARM);
        conn.write_all(b"ew\r\n").unwrap();
        let mut buf = [0u8; 32];
        let n = std::io::Read::read(&mut conn, &mut buf).unwrap();
        assert_eq!(&buf[..n], stored.as_bytes(), "{key}: memcached's answer");
        let new = item(key, 0, value.as_bytes());
        for i in 0..20 {
            let reply = rig.udp_get(&[key]);
            assert_eq!(
                reply.payload, new,
                "{key}: stale reply #{i} after the value landed"
            );
        }
    }
}

/// Stores a 500 KB item and caches `key` (value `old`); returns a pipeline of 200 `get`s of
/// the big item (100 MB of replies) followed by `delete key`.
fn held_up_delete(rig: &Rig, key: &str) -> Vec<u8> {
    let big = vec![b'x'; 500_000];
    let mut set_big = format!("set {key}-big 0 0 {}\r\n", big.len()).into_bytes();
    set_big.extend_from_slice(&big);
    set_big.extend_from_slice(b"\r\n");
    assert_eq!(rig.tcp(&set_big, &[b"\r\n"]), b"STORED\r\n");
    rig.set(key, b"old", 0, 0);
    rig.warm(key, WARM);
    let mut pipeline = format!("get {key}-big\r\n").into_bytes().repeat(200);
    pipeline.extend_from_slice(format!("delete {key}\r\n").as_bytes());
    pipeline
}

/// Reads `conn` until `DELETED\r\n`, pausing `pause` after each read of up to 1 MB.
fn read_until_deleted(conn: &mut TcpStream, pause: Duration) {
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut tail = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    while !tail.ends_with(b"DELETED\r\n") {
        let n = std::io::Read::read(conn, &mut buf).unwrap();
        assert!(n > 0, "memcached closed the connection");
        tail.extend_from_slice(&buf[..n]);
        let keep = tail.len().saturating_sub(16);
        tail.drain(..keep);
        std::thread::sleep(pause);
    }
}

/// A client that does not take memcached's replies holds up the commands it sent after them:
/// memcached applies its `delete` only once the client reads. A GET from another client in
/// between must not be cached: the agent sees memcached's backlog of replies and lets the
/// fill lease run out until the client reads.
#[test]
fn a_write_held_up_behind_replies_a_client_does_not_take_never_leaves_the_old_value_cached() {
    let rig = Rig::with_agent("coheld", 87, &["--write-settle-ms", "100"]);
    let addr = rig.server(false);
    let pipeline = held_up_delete(&rig, "held");
    let mut conn = rig.bed.in_client(move || TcpStream::connect(addr).unwrap());
    conn.write_all(&pipeline).unwrap();
    // memcached now waits for the client to read 100 MB of replies; the delete waits with it.
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(
            rig.udp_get(&["held"]).payload,
            item("held", 0, b"old"),
            "memcached has not applied the delete yet"
        );
    }
    read_until_deleted(&mut conn, Duration::ZERO);
    assert_fresh(
        &rig,
        "held",
        MISS,
        "delete applied behind 100 MB of replies",
    );
    assert!(
        rig.agent_log().contains("not taking memcached's replies"),
        "the agent never said why fills paused: {}",
        rig.agent_log()
    );
}

/// The same with a client that reads all the while, at about 400 MB/s (QA round 4's case:
/// `DELETED` came 0.25-0.40 s after the pipeline, past the default settle time, and every GET
/// after it was answered with the deleted value). Another client polls the key over UDP
/// throughout: once memcached has answered `DELETED`, no reply may carry the value.
#[test]
fn a_write_held_up_behind_replies_a_client_reads_slowly_never_leaves_the_old_value_cached() {
    let rig = Rig::with_agent("coheldr", 88, &[]);
    let addr = rig.server(false);
    let pipeline = held_up_delete(&rig, "heldr");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let polled = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let (stop_poll, log) = (stop.clone(), polled.clone());
    let poller = rig.bed.in_client(move || {
        std::thread::spawn(move || {
            while !stop_poll.load(std::sync::atomic::Ordering::Relaxed) {
                let sent = Instant::now();
                let reply = tests::udp_exchange(addr, b"get heldr\r\n", next_id());
                log.lock().unwrap().push((sent, reply.payload));
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    });
    let mut conn = rig.bed.in_client(move || TcpStream::connect(addr).unwrap());
    conn.write_all(&pipeline).unwrap();
    read_until_deleted(&mut conn, Duration::from_micros(2500));
    let deleted = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    poller.join().unwrap();
    let polled = polled.lock().unwrap();
    let after: Vec<_> = polled.iter().filter(|(t, _)| *t > deleted).collect();
    let stale = after
        .iter()
        .filter(|(_, p)| p.starts_with(b"VALUE"))
        .count();
    assert!(
        after.len() > 50,
        "too few GETs after DELETED: {}",
        after.len()
    );
    assert_eq!(
        stale,
        0,
        "{stale} of {} GETs after DELETED returned the deleted value",
        after.len()
    );
}

#[test]
fn a_connection_opened_before_the_agent_still_invalidates() {
    let mut rig = Rig::new("coearly", 37);
    rig.set("early", b"old", 0, 0);
    let addr = rig.server(false);
    // Opened before the agent attaches: the kernel never saw where its commands start.
    let conn = rig.bed.in_client(move || TcpStream::connect(addr).unwrap());
    rig.start_agent(&[]);
    rig.warm("early", WARM);
    let mut conn = conn;
    conn.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    conn.write_all(b"delete early\r\n").unwrap();
    let mut buf = [0u8; 32];
    let n = std::io::Read::read(&mut conn, &mut buf).unwrap();
    assert_eq!(&buf[..n], b"DELETED\r\n");
    assert_fresh(
        &rig,
        "early",
        MISS,
        "delete on a connection older than the agent",
    );
}

/// Sends `count` pipelined `get`s of an absent key on `conn` (16 bytes each) and reads their
/// answers: moves a stream on by `16 * count` bytes.
fn stream_gets(conn: &mut TcpStream, count: usize) {
    const BATCH: usize = 1000;
    let request = b"get guard:none\r\n".repeat(BATCH);
    let mut reply = vec![0u8; 5 * BATCH];
    for _ in 0..count.div_ceil(BATCH) {
        conn.write_all(&request).unwrap();
        conn.read_exact(&mut reply).unwrap();
        assert!(
            reply.chunks(5).all(|c| c == MISS),
            "memcached answered a get oddly"
        );
    }
}

/// Sends one command on `conn` and reads memcached's one-line answer.
fn command(conn: &mut TcpStream, request: &[u8]) -> String {
    conn.write_all(request).unwrap();
    let mut buf = [0u8; 64];
    let n = conn.read(&mut buf).unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// Clients keep their connections for days, and an agent is often started (or restarted) in
/// front of a busy memcached. Found by QA round 7: 15 writers on connections older than the
/// agent kept the cache empty (0 of 92k GETs answered by the kernel), because every segment
/// of such a connection flushed the whole cache until it closed. Now such a connection
/// flushes only until a write begun before the agent must have landed (memcached's largest
/// item and a line: about 1 MiB of its stream at the default `-I`); after that its reads cost
/// nothing and its writes invalidate just their keys.
#[test]
fn connections_opened_before_the_agent_stop_flushing_once_their_guard_window_has_passed() {
    let mut rig = Rig::new("coguard", 96);
    // A TTL memcached's `me` states exactly (exptime 0 reads as "-1", which the agent asks
    // again after memcached's next clock tick, not serving the key in between).
    rig.set("guard:a", b"old", 0, 3600);
    rig.set("guard:b", b"old", 0, 3600);
    let addr = rig.server(false);
    let open = || {
        let conn = rig.bed.in_client(move || TcpStream::connect(addr).unwrap());
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        conn
    };
    let (mut reader, mut writer) = (open(), open());
    rig.start_agent(&[]);
    // The guard window: memcached's default item_size_max (1 MiB) plus 4 KiB.
    let window = 1024 * 1024 + 4096;
    let before = rig.counter("flush_unsynced");
    stream_gets(&mut reader, 1000);
    assert!(
        rig.counter("flush_unsynced") > before,
        "a connection older than the agent did not flush within its window"
    );
    assert!(
        rig.agent_log()
            .contains("memcached has client connections older than the agent"),
        "the agent did not say that old connections flush for a while: {}",
        rig.agent_log()
    );
    for conn in [&mut reader, &mut writer] {
        stream_gets(conn, window / 16 + 1000);
    }
    assert_eq!(
        rig.counter("tcp_flows_guarded"),
        2,
        "both old connections are guarded"
    );
    rig.warm("guard:a", WARM);
    rig.warm("guard:b", WARM);
    let flushes = rig.counter("flush_unsynced");
    let hits = rig.counter("hit_keys");
    assert_eq!(
        command(&mut reader, b"get guard:a guard:b\r\n"),
        "VALUE guard:a 0 3\r\nold\r\nVALUE guard:b 0 3\r\nold\r\nEND\r\n"
    );
    stream_gets(&mut reader, 100);
    for _ in 0..4 {
        assert_eq!(
            rig.udp_get(&["guard:a"]).payload,
            item("guard:a", 0, b"old")
        );
    }
    assert_eq!(
        rig.counter("hit_keys"),
        hits + 4,
        "reads on the old connection cost hits: {:?}",
        rig.agent_stats()
    );
    assert_eq!(
        command(&mut writer, b"set guard:a 0 0 3\r\nnew\r\n"),
        "STORED\r\n"
    );
    assert_fresh(
        &rig,
        "guard:a",
        &item("guard:a", 0, b"new"),
        "set on an old connection",
    );
    rig.warm("guard:a", WARM);
    assert_eq!(command(&mut writer, b"delete guard:a\r\n"), "DELETED\r\n");
    assert_fresh(&rig, "guard:a", MISS, "delete on an old connection");
    assert_eq!(command(&mut writer, b"touch guard:b 1\r\n"), "TOUCHED\r\n");
    std::thread::sleep(Duration::from_millis(2100));
    assert_fresh(&rig, "guard:b", MISS, "touch on an old connection");
    assert_eq!(
        rig.counter("flush_unsynced"),
        flushes,
        "old connections still flush the whole cache past their window"
    );
}

#[test]
fn multi_gets_mixing_cached_uncached_and_absent_keys_return_everything_memcached_holds() {
    let rig = Rig::with_agent("comix", 38, &[]);
    for i in 0..32 {
        rig.set(&format!("mx{i}"), format!("v{i}").as_bytes(), i, 0);
    }
    for i in (0..32).step_by(3) {
        rig.warm(&format!("mx{i}"), WARM);
    }
    for width in [1usize, 2, 7, 16, 31, 32] {
        let keys: Vec<String> = (0..width)
            .map(|i| {
                if i % 5 == 4 {
                    format!("absent{i}")
                } else {
                    format!("mx{}", (i * 7) % 32)
                }
            })
            .collect();
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let want = authoritative_multi(&rig, &refs);
        let got = rig.udp_get(&refs);
        assert_eq!(got.payload, want, "multi-get of {width}");
    }
}

fn authoritative_multi(rig: &Rig, keys: &[&str]) -> Vec<u8> {
    rig.tcp(
        format!("get {}\r\n", keys.join(" ")).as_bytes(),
        &[b"END\r\n"],
    )
}

unsafe fn libc_kill(pid: i32, sig: i32) {
    unsafe extern "C" {
        fn kill(pid: i32, sig: i32) -> i32;
    }
    unsafe { kill(pid, sig) };
}

/// Stores from a client on memcached's own host never cross the NIC the kernel watches:
/// the agent's `watch mutations` backstop must invalidate them (within its stream's latency).
#[test]
fn stores_over_loopback_are_invalidated_by_the_watch_backstop() {
    let rig = Rig::with_agent("cowatch", 40, &[]);
    rig.set("lo", b"old", 0, 0);
    rig.warm("lo", WARM);
    let port = rig.bed.memcached_port();
    let reply = rig.bed.in_server(move || {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        tests::tcp_exchange(addr, b"set lo 0 0 3\r\nnew\r\n", &[b"\r\n".to_vec()])
    });
    assert_eq!(reply, b"STORED\r\n");
    std::thread::sleep(Duration::from_millis(200));
    assert_fresh(&rig, "lo", &item("lo", 0, b"new"), "store over loopback");
    assert!(rig.counter("hit_keys") > 0);
}

/// Each write counts once per place it was seen (found by QA round 6: the deletes the agent
/// runs through the kernel for keys watch reports were counted as text writes as well, so the
/// per-source series added up to twice the writes).
#[test]
fn writes_reported_by_watch_are_counted_once_as_watch_and_once_as_text() {
    let rig = Rig::with_agent("cowcount", 91, &[]);
    const WATCH: &str = r#"memcache_accel_invalidations_total{source="watch"}"#;
    const TEXT: &str = r#"memcache_accel_invalidations_total{source="text"}"#;
    let (text, watch) = (
        rig.metric(TEXT).unwrap_or(0.0),
        rig.metric(WATCH).unwrap_or(0.0),
    );
    for i in 0..20 {
        rig.set(&format!("count:{i}"), b"v", 0, 0);
    }
    // watch reports the stores a little later.
    let until = Instant::now() + Duration::from_secs(5);
    while rig.metric(WATCH).unwrap_or(0.0) < watch + 20.0 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        rig.metric(WATCH).unwrap_or(0.0) - watch,
        20.0,
        "watch series"
    );
    // The agent runs its delete for a report before it counts the report: any text count
    // those deletes made is in by now.
    assert_eq!(rig.metric(TEXT).unwrap_or(0.0) - text, 20.0, "text series");
}

/// Deletes and arithmetic from a client on memcached's own host: the agent also runs the
/// write scanner on `lo`, so they invalidate like remote ones (watch reports neither).
#[test]
fn deletes_and_incr_over_loopback_invalidate() {
    let rig = Rig::with_agent("colodel", 46, &[]);
    rig.set("lodel", b"old", 0, 0);
    rig.set("loinc", b"5", 0, 0);
    rig.warm("lodel", WARM);
    rig.warm("loinc", WARM);
    let port = rig.bed.memcached_port();
    let (del, inc) = rig.bed.in_server(move || {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        (
            tests::tcp_exchange(addr, b"delete lodel\r\n", &[b"\r\n".to_vec()]),
            tests::tcp_exchange(addr, b"incr loinc 1\r\n", &[b"\r\n".to_vec()]),
        )
    });
    assert_eq!(del, b"DELETED\r\n");
    assert_eq!(inc, b"6\r\n");
    assert_fresh(&rig, "lodel", MISS, "delete over loopback");
    assert_fresh(&rig, "loinc", &item("loinc", 0, b"6"), "incr over loopback");
}

/// Segments longer than one scan buffer (2 KiB): `lo` carries up to 64 KiB in one, as do
/// jumbo frames. The scanner follows them buffer by buffer, so writes after a big value in the
/// same segment still invalidate, and nothing is flushed.
#[test]
fn writes_in_segments_longer_than_a_scan_buffer_invalidate_without_a_flush() {
    let rig = Rig::with_agent("cobigseg", 64, &[]);
    for k in ["bs:del", "bs:incr", "bs:set"] {
        rig.set(k, b"5", 0, 0);
        rig.warm(k, WARM);
    }
    let flushes = rig.counter("flush_unsynced");
    let segments = rig.counter("tcp_segments");
    let mut batch = Vec::new();
    for (i, key) in ["bs:big1", "bs:big2", "bs:big3"].iter().enumerate() {
        let value = tests::value_of(9000, i as u8);
        batch.extend(format!("set {key} 0 0 {}\r\n", value.len()).into_bytes());
        batch.extend(&value);
        batch.extend(b"\r\n");
    }
    batch.extend(b"delete bs:del\r\nincr bs:incr 2\r\nset bs:set 0 0 3\r\nnew\r\n");
    let port = rig.bed.memcached_port();
    let reply = rig.bed.in_server(move || {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        tests::tcp_exchange(
            addr,
            &batch,
            &[b"STORED\r\nDELETED\r\n7\r\nSTORED\r\n".to_vec()],
        )
    });
    assert!(
        reply.ends_with(b"DELETED\r\n7\r\nSTORED\r\n"),
        "{}",
        String::from_utf8_lossy(&reply)
    );
    assert!(
        rig.counter("tcp_segments") < segments + 4,
        "the batch did not travel in a few large segments: {} segments",
        rig.counter("tcp_segments") - segments
    );
    assert_fresh(&rig, "bs:del", MISS, "delete after 27 KB in its segment");
    assert_fresh(
        &rig,
        "bs:incr",
        &item("bs:incr", 0, b"7"),
        "incr after 27 KB",
    );
    assert_fresh(
        &rig,
        "bs:set",
        &item("bs:set", 0, b"new"),
        "set after 27 KB",
    );
    assert_eq!(
        rig.counter("flush_unsynced"),
        flushes,
        "a long segment made the scanner lose the stream"
    );
}

const TTL_INSTALLED: &str = r#"memcache_accel_ttl_answers_total{result="installed"}"#;

/// Waits (up to 15 s) until `progress` reaches `n`; `what` names it in the failure.
fn wait_for(rig: &Rig, what: &str, n: f64, progress: impl Fn(&Rig) -> f64) {
    let start = Instant::now();
    while progress(rig) < n {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "{what}: {} of {n}; log: {}",
            progress(rig),
            rig.agent_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the agent has installed `n` learned TTLs.
fn wait_learned(rig: &Rig, n: f64) {
    wait_for(rig, "TTLs learned", n, |r| {
        r.metric(TTL_INSTALLED).unwrap_or(0.0)
    });
}

#[test]
fn an_item_stored_before_the_agent_expires_when_memcached_says_not_after_max_age() {
    // The kernel never saw this TTL; --max-age alone would serve the item for 30 s.
    let mut rig = Rig::new("cottlold", 56);
    let stored = Instant::now();
    // Long enough for a loaded machine to start the agent and warm the key in time.
    rig.set("old:ttl", b"short-lived", 0, 12);
    // Warm start off: the item must reach the cache through a GET and its TTL be learned.
    rig.start_agent(&["--max-age", "30", "--warm-start", "false"]);
    rig.warm("old:ttl", WARM);
    wait_learned(&rig, 1.0);
    assert_eq!(
        rig.udp_get(&["old:ttl"]).payload,
        item("old:ttl", 0, b"short-lived"),
        "before it expires"
    );
    let expired = stored + Duration::from_millis(12_300);
    std::thread::sleep(expired.saturating_duration_since(Instant::now()));
    assert_fresh(
        &rig,
        "old:ttl",
        MISS,
        "exptime 12, set before the agent started",
    );
}

#[test]
fn an_item_stored_before_the_agent_without_ttl_stays_cached_past_max_age() {
    let mut rig = Rig::new("cottlinf", 57);
    rig.set("old:never", b"forever", 0, 0);
    rig.start_agent(&["--max-age", "1", "--warm-start", "false"]);
    rig.warm("old:never", WARM);
    wait_learned(&rig, 1.0);
    // memcached 1.6 answers "never" and "one second left" alike: a first answer is served
    // only until memcached's clock can next tick, and a second one, asked after the tick,
    // confirms "never". Between the two a GET may go to memcached; this test is about after.
    std::thread::sleep(Duration::from_millis(1_500));
    let hits = rig.mc_stat("get_hits");
    let before = rig.counter("hit_keys");
    for _ in 0..10 {
        assert_eq!(
            rig.udp_get(&["old:never"]).payload,
            item("old:never", 0, b"forever")
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(
        rig.counter("hit_keys") - before,
        10,
        "the kernel answered every GET"
    );
    assert_eq!(
        rig.mc_stat("get_hits"),
        hits,
        "memcached answered none (the agent's questions are not gets)"
    );
    // A write still invalidates the learned entry.
    rig.set("old:never", b"changed", 0, 0);
    assert_fresh(
        &rig,
        "old:never",
        &item("old:never", 0, b"changed"),
        "set after learning",
    );
}

/// Waits until the agent's warm start has stored `n` items.
fn wait_warmed(rig: &Rig, n: u64) {
    wait_for(rig, "items warmed", n as f64, |r| {
        r.counter("warm_fills") as f64
    });
}

#[test]
fn a_new_agent_serves_memcacheds_items_from_the_first_get_and_honours_their_ttl() {
    let mut rig = Rig::new("cowarm", 58);
    let stored = Instant::now();
    rig.set("warm:a", b"alpha", 1, 0);
    rig.set("warm:b", b"beta\r\nwith a line break", 2, 0);
    // Long enough that the warmed entry (which expires 2 s before memcached's item) is still
    // there when a slow machine has loaded the agent and warmed the cache.
    rig.set("warm:ttl", b"short-lived", 3, 10);
    // Keys are bytes: one that is not UTF-8 must not stop the warm start.
    assert_eq!(
        rig.tcp(b"set warm:\xc3\x28 4 0 3\r\nraw\r\n", &[b"\r\n"]),
        b"STORED\r\n"
    );
    rig.start_agent(&["--max-age", "30"]);
    wait_warmed(&rig, 4);
    let hits = rig.mc_stat("get_hits");
    let before = rig.counter("hit_keys");
    for (key, flags, value) in [
        ("warm:a", 1, &b"alpha"[..]),
        ("warm:b", 2, &b"beta\r\nwith a line break"[..]),
        ("warm:ttl", 3, &b"short-lived"[..]),
    ] {
        assert_eq!(
            rig.udp_get(&[key]).payload,
            item(key, flags, value),
            "{key}"
        );
    }
    assert_eq!(
        rig.udp(b"get warm:\xc3\x28\r\n", next_id(), false).payload,
        b"VALUE warm:\xc3\x28 4 3\r\nraw\r\nEND\r\n",
        "a key that is not UTF-8"
    );
    assert_eq!(
        rig.counter("hit_keys") - before,
        4,
        "the kernel answered the first GETs"
    );
    assert_eq!(
        rig.mc_stat("get_hits"),
        hits,
        "memcached answered none of them"
    );
    // A write still invalidates a warmed entry.
    rig.set("warm:a", b"changed", 1, 0);
    assert_fresh(
        &rig,
        "warm:a",
        &item("warm:a", 1, b"changed"),
        "set after warm start",
    );
    // The TTL memcached listed, not --max-age, bounds the warmed entry.
    let expired = stored + Duration::from_millis(10_300);
    std::thread::sleep(expired.saturating_duration_since(Instant::now()));
    assert_fresh(&rig, "warm:ttl", MISS, "exptime 10, warmed at start");
}

#[test]
fn the_agents_own_requests_with_long_keys_never_flush_the_cache() {
    // The agent's warm-start gets and TTL questions cross `lo`, where the kernel follows them
    // like any client's stream: requests longer than one scan buffer would make it flush.
    let mut rig = Rig::new("colong", 59);
    let keys: Vec<String> = (0..60)
        .map(|i| format!("{i:03}{}", "k".repeat(197)))
        .collect();
    for k in &keys {
        rig.set(k, b"v", 0, 0);
    }
    rig.start_agent(&[]);
    wait_warmed(&rig, keys.len() as u64);
    assert_eq!(
        rig.counter("flush_unsynced"),
        0,
        "warm start flushed the cache"
    );

    // A new agent that does not warm start learns their TTLs instead.
    rig.start_agent(&["--warm-start", "false"]);
    for k in &keys {
        rig.udp_get(&[k]);
    }
    wait_learned(&rig, keys.len() as f64);
    assert_eq!(
        rig.counter("flush_unsynced"),
        0,
        "TTL questions flushed the cache"
    );
}

#[test]
fn writes_during_warm_start_never_leave_an_old_value_cached() {
    // A writer rewrites every key over and over while the agent starts and warm starts: an
    // item fetched before one of those writes must never be stored.
    let mut rig = Rig::new("cowrace", 60);
    const KEYS: usize = 3000;
    let key = |i: usize| format!("wr:{i}");
    let mut load = Vec::new();
    for i in 0..KEYS {
        load.extend_from_slice(format!("set {} 0 0 2 noreply\r\nv0\r\n", key(i)).as_bytes());
    }
    load.extend_from_slice(b"version\r\n");
    rig.tcp(&load, &[b"\r\n"]);

    // Segments no longer than an Ethernet MTU, as on a NIC: a veth pair would otherwise pass
    // the writer's pipelined sets on as 64 KiB GSO segments, which the scanner cannot follow
    // (it flushes instead, and the warm start under test would never run).
    tests::in_netns(
        rig.bed.client_netns(),
        &[
            "ethtool",
            "-K",
            rig.bed.client_iface(),
            "tso",
            "off",
            "gso",
            "off",
        ],
    );
    // Attached (not yet serving): the writer's connection is then followed from its SYN.
    rig.bed.start_agent(&[]).expect("agent");
    let start = Instant::now();
    while !rig.agent_log().contains("attached XDP") {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "agent never attached"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let addr = rig.server(false);
    let ns = rig.bed.client_netns().to_owned();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            loadgen::netns::run_in(&ns, move || {
                let mut s = TcpStream::connect(addr).expect("connect");
                s.set_nodelay(true).expect("nodelay");
                let mut pass = 1u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    // Even keys only: the odd ones are warmed, the even ones must not be.
                    for chunk in (0..KEYS).step_by(2).collect::<Vec<_>>().chunks(20) {
                        let mut req = Vec::new();
                        for &i in chunk {
                            let v = format!("v{pass}");
                            req.extend_from_slice(
                                format!("set wr:{i} 0 0 {} noreply\r\n{v}\r\n", v.len()).as_bytes(),
                            );
                        }
                        s.write_all(&req).expect("write");
                        // About 20k writes/s: memcached's watch stream keeps up.
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    pass += 1;
                }
                // Every write applied before the writer says it is done.
                let mut ack = [0u8; 64];
                s.write_all(b"version\r\n").expect("write");
                let _ = std::io::Read::read(&mut s, &mut ack);
                pass
            })
            .expect("client namespace")
        })
    };
    rig.wait_serving(true, Duration::from_secs(15));
    // The warm start runs once the start-up hold is over (settle time plus a second).
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let passes = writer.join().expect("writer");
    assert!(passes > 1, "the writer ran {passes} passes only");
    std::thread::sleep(Duration::from_millis(1500));

    let log = rig.agent_log();
    let warm_line = log
        .lines()
        .find(|l| l.contains("warm start: filled"))
        .unwrap_or_else(|| panic!("no warm start; log: {log}"));
    // The log is colored: drop the escape sequences (ESC ... m) first.
    let mut plain = String::new();
    let mut in_escape = false;
    for c in warm_line.chars() {
        match (in_escape, c) {
            (false, '\u{1b}') => in_escape = true,
            (true, 'm') => in_escape = false,
            (false, c) => plain.push(c),
            (true, _) => {}
        }
    }
    let field = |name: &str| -> u64 {
        plain
            .split_whitespace()
            .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {plain}"))
    };
    assert!(
        field("filled") > 0 && field("raced") > 0,
        "the warm start did not run through the writes: {warm_line}"
    );
    assert_eq!(
        rig.counter("flush_unsynced"),
        0,
        "the writer's stream was lost"
    );

    // Twice: the first round fills what the writes cleared, the second is answered by the
    // kernel. Every reply must be memcached's current value.
    let before = rig.counter("hit_keys");
    for round in 0..2 {
        for i in (0..KEYS).step_by(7) {
            let k = key(i);
            let reply = rig.udp_get(&[&k]);
            assert_eq!(
                reply.payload,
                authoritative(&rig, &k),
                "round {round}: {k} after {passes} write passes"
            );
        }
    }
    assert!(
        rig.counter("hit_keys") > before,
        "the kernel answered none of the reads: {:?}",
        rig.agent_stats()
    );
}

/// Found by QA round 6: on veth, writers of large values lose segments under load (veth's
/// queue to an XDP-enabled peer overflows), and the scanner lost each such connection for
/// good: every later segment of it flushed the whole cache, so a connection pool writing
/// small keys kept the cache empty (0 of 4,700 GETs answered by the kernel) until it
/// reconnected. Gaps inside values are now stepped over. Needs root (veth, XDP).
#[test]
fn connections_that_lost_segments_inside_values_are_still_followed() {
    let rig = Rig::with_agent("cogap", 90, &[]);
    for k in ["gap:hot", "gap:gone"] {
        rig.set(k, b"old", 0, 0);
        rig.warm(k, WARM);
    }
    let addr = rig.server(false);
    let retransmitted = tcp_retransmits(rig.bed.client_netns());
    // Two persistent connections write 1 MB values together for 3 s.
    let mut conns: Vec<TcpStream> = rig.bed.in_client(move || {
        let writers: Vec<_> = (0..2)
            .map(|w| {
                std::thread::spawn(move || {
                    let mut conn = TcpStream::connect(addr).expect("connect memcached");
                    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    let value = vec![b'y'; 1_000_000 - 2_000];
                    let mut request =
                        format!("set gap:big{w} 0 0 {}\r\n", value.len()).into_bytes();
                    request.extend_from_slice(&value);
                    request.extend_from_slice(b"\r\n");
                    let end = Instant::now() + Duration::from_secs(3);
                    while Instant::now() < end {
                        conn.write_all(&request).unwrap();
                        assert_eq!(read_line(&mut conn), "STORED\r\n");
                    }
                    conn
                })
            })
            .collect();
        writers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let lost = tcp_retransmits(rig.bed.client_netns()) - retransmitted;
    eprintln!("segments sent again during the burst: {lost}");
    // Every byte sent has reached memcached (each set was answered): no gap is left open.
    let flushes = rig.counter("flush_unsynced");
    // The same connections go on writing small items: followed, not flushed.
    for i in 0..20 {
        for conn in conns.iter_mut() {
            conn.write_all(format!("set gap:small{i} 0 0 1\r\nx\r\n").as_bytes())
                .unwrap();
            assert_eq!(read_line(conn), "STORED\r\n");
        }
    }
    conns[0].write_all(b"delete gap:gone\r\n").unwrap();
    assert_eq!(read_line(&mut conns[0]), "DELETED\r\n");
    assert_fresh(&rig, "gap:gone", MISS, "delete after the burst");
    if lost > 0 {
        assert_eq!(
            rig.counter("flush_unsynced"),
            flushes,
            "connections that lost segments were not followed: {:?}",
            rig.agent_stats()
        );
    }
    // And the kernel still answers.
    let reply = rig.warm("gap:hot", WARM);
    assert_eq!(reply.payload, item("gap:hot", 0, b"old"));
}

/// One reply line from a blocking stream, byte by byte (replies here are short).
fn read_line(conn: &mut TcpStream) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\r\n") {
        match conn.read(&mut byte) {
            Ok(1) => line.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&line).into_owned()
}

#[test]
fn a_client_pipelining_hundreds_of_small_writes_is_followed_without_flushing() {
    // Full segments of short noreply writes (50 or more per segment): the kernel must follow
    // every one, not lose the stream and flush the cache on each later segment.
    let rig = Rig::with_agent("cosmall", 61, &[]);
    for k in ["kept", "hit"] {
        rig.set(k, b"old", 0, 0);
        rig.warm(k, WARM);
    }
    let mut batch = Vec::new();
    for i in 0..1000 {
        batch.extend_from_slice(format!("set sm:{i} 0 0 1 noreply\r\nv\r\n").as_bytes());
    }
    for i in 0..1000 {
        batch.extend_from_slice(format!("md sm:{i} q\r\n").as_bytes());
    }
    batch.extend_from_slice(b"set hit 0 0 3 noreply\r\nnew\r\nversion\r\n");
    let retransmitted = tcp_retransmits(rig.bed.client_netns());
    let epoch = rig.counter("agent_epoch");
    let reply = rig.tcp(&batch, &[b"\r\n"]);
    assert!(
        reply.starts_with(b"VERSION"),
        "{}",
        String::from_utf8_lossy(&reply)
    );
    // A retransmitted segment makes the scanner lose the stream and flush, by design (it
    // cannot tell what memcached kept): only a clean stream must be followed. Under the
    // suite's parallel load veth sometimes drops a segment.
    let clean = tcp_retransmits(rig.bed.client_netns()) == retransmitted;
    if clean {
        assert_eq!(rig.counter("flush_unsynced"), 0, "the stream was lost");
    }
    assert_fresh(
        &rig,
        "hit",
        &item("hit", 0, b"new"),
        "the last of 2001 pipelined writes",
    );
    let before = rig.counter("hit_keys");
    assert_eq!(rig.udp_get(&["kept"]).payload, item("kept", 0, b"old"));
    // After a retransmission the scanner's flush takes every entry with it, and so does the
    // agent's when memcached's logger drops watch entries under the burst (by design: a
    // dropped entry may have been an eviction).
    if clean && rig.counter("agent_epoch") == epoch {
        assert_eq!(
            rig.counter("hit_keys"),
            before + 1,
            "a key nobody wrote stays cached; stats: {:?}",
            rig.agent_stats()
        );
    }
}

/// A lease long enough that the agent's health check sits out a 1.5 s stall of memcached:
/// otherwise it resyncs (flush and fill hold) when memcached comes back, which would hide the
/// race these tests look for.
const RACE_AGENT: &[&str] = &["--lease-ms", "10000"];

/// Stalls memcached, sends `write` on `conn` (or a new connection), then GETs of `key` over
/// UDP, and resumes memcached: inside it the GETs and the write run in either order. Returns
/// the write's reply.
fn race_gets_against(rig: &Rig, key: &str, write: &[u8], conn: Option<TcpStream>) -> Vec<u8> {
    assert!(
        fill_lease_remaining_ms(rig) > 0,
        "no fill lease while memcached answers"
    );
    let pid = rig.bed.memcached_pid() as i32;
    unsafe { libc_kill(pid, 19) };
    let addr = rig.server(false);
    let write = write.to_vec();
    let writer = rig.bed.in_client(move || {
        std::thread::spawn(move || match conn {
            Some(mut c) => {
                c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                c.write_all(&write).unwrap();
                let mut buf = [0u8; 64];
                let n = std::io::Read::read(&mut c, &mut buf).unwrap_or(0);
                buf[..n].to_vec()
            }
            None => tests::tcp_exchange(addr, &write, &[b"\r\n".to_vec()]),
        })
    });
    std::thread::sleep(Duration::from_millis(100));
    let request = format!("get {key}\r\n").into_bytes();
    let readers = rig.bed.in_client(move || {
        std::thread::spawn(move || {
            for _ in 0..5 {
                tests::udp_exchange(addr, &request, next_id());
            }
        })
    });
    std::thread::sleep(Duration::from_millis(1500));
    // The agent's probes went unanswered: the kernel may fill nothing now.
    let stalled = fill_lease_remaining_ms(rig);
    unsafe { libc_kill(pid, 18) };
    assert_eq!(
        stalled, 0,
        "fill lease still running while memcached is stopped"
    );
    let reply = writer.join().unwrap();
    let _ = readers.join();
    reply
}

/// What `cache-agent status` says of the fill lease.
fn fill_lease_remaining_ms(rig: &Rig) -> u64 {
    let status = rig
        .bed
        .agent_cmd(&["status", "--json", "--iface", rig.bed.server_iface()])
        .expect("status");
    let status: serde_json::Value = serde_json::from_str(status.trim()).expect("status JSON");
    status["fill_lease_remaining_ms"]
        .as_u64()
        .unwrap_or_else(|| panic!("no fill_lease_remaining_ms in {status}"))
}

/// Asserts that for 3 s every UDP GET of `key` returns `expected`.
fn assert_stays(rig: &Rig, key: &str, expected: &[u8], what: &str) {
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        assert_eq!(rig.udp_get(&[key]).payload, expected, "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `flush_all` flushes the kernel cache when XDP sees it, but memcached may still answer GETs
/// that arrived after it from the old contents: none of those replies may be cached.
#[test]
fn gets_racing_flush_all_never_refill_the_old_value() {
    let rig = Rig::with_agent("coflrace", 62, RACE_AGENT);
    rig.set("flr", b"old", 0, 0);
    rig.warm("flr", WARM);
    let reply = race_gets_against(&rig, "flr", b"flush_all\r\n", None);
    assert_eq!(reply, b"OK\r\n");
    assert_stays(&rig, "flr", MISS, "stale refill after flush_all");
}

/// A write the kernel cannot attribute to a key (here: on a connection opened before the
/// agent) flushes everything; GETs racing it must not refill the old value either.
#[test]
fn gets_racing_an_unattributable_write_never_refill_the_old_value() {
    let mut rig = Rig::new("counrace", 63);
    rig.set("unr", b"old", 0, 0);
    let addr = rig.server(false);
    let conn = rig.bed.in_client(move || TcpStream::connect(addr).unwrap());
    rig.start_agent(RACE_AGENT);
    rig.warm("unr", WARM);
    let reply = race_gets_against(&rig, "unr", b"set unr 0 0 3\r\nnew\r\n", Some(conn));
    assert_eq!(reply, b"STORED\r\n");
    assert_stays(
        &rig,
        "unr",
        &item("unr", 0, b"new"),
        "stale refill after an unattributed write",
    );
}

/// A UDP write bigger than the MTU reaches memcached as IP fragments, which the scanner cannot
/// read as a request: the first fragment flushes the cache before memcached can reassemble and
/// apply it. (Watch off: the backstop would hide a miss here.)
#[test]
fn fragmented_udp_writes_invalidate() {
    let rig = Rig::with_agent("cofrag", 65, &["--watch", "false"]);
    for (key, v6) in [("frag4", false), ("frag6", true)] {
        rig.set(key, b"old", 0, 0);
        rig.warm(key, WARM);
        let flushes = rig.counter("flush_unsynced");
        let value = tests::value_of(3000, 5);
        let mut request = format!("set {key} 0 0 {}\r\n", value.len()).into_bytes();
        request.extend(&value);
        request.extend(b"\r\n");
        let reply = rig.udp(&request, next_id(), v6);
        assert_eq!(reply.payload, b"STORED\r\n", "{key}");
        assert!(rig.counter("flush_unsynced") > flushes, "{key}: no flush");
        assert_fresh(&rig, key, &item(key, 0, &value), "fragmented UDP set");
    }
}

#[test]
fn items_memcached_drops_when_it_moves_a_slab_page_are_never_served_after() {
    // Found by QA: the slab mover (`slabs reassign`, or memcached's background automover)
    // drops the items of the page it moves when it finds no free chunk for them, and no
    // watch stream hears of it. Here one class is exactly two full pages, so moving one of
    // them can rescue nothing.
    let mut rig = Rig::with_memcached("coslab", 83, &["-o", "slab_automove=0"]);
    rig.start_agent(&[]);
    rig.set_burst("sl", 1);
    let slabs = String::from_utf8_lossy(&rig.tcp(b"stats slabs\r\n", &[b"END\r\n"])).into_owned();
    let stat = |class: &str, name: &str| -> u64 {
        slabs
            .lines()
            .find_map(|l| l.strip_prefix(&format!("STAT {class}:{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let class = slabs
        .lines()
        .filter_map(|l| l.strip_prefix("STAT "))
        .find_map(|l| {
            let (name, value) = l.split_once(' ')?;
            let (class, field) = name.split_once(':')?;
            (field == "used_chunks" && value.trim() != "0").then(|| class.to_owned())
        })
        .expect("the class of the burst's items");
    let per_page = stat(&class, "chunks_per_page") as usize;
    rig.set_burst("sl", 2 * per_page);
    rig.warm("sl0", WARM);
    let dropped = rig.mc_stat("slab_reassign_evictions_nomem");
    assert_eq!(
        rig.tcp_line(&format!("slabs reassign {class} 0\r\n")),
        "OK\r\n"
    );
    let start = Instant::now();
    while rig.mc_stat("slab_reassign_evictions_nomem") == dropped
        || authoritative(&rig, "sl0") != MISS
    {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "memcached did not drop sl0 (evictions_nomem {} -> {})",
            dropped,
            rig.mc_stat("slab_reassign_evictions_nomem")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The agent reads memcached's counters every quarter settle time.
    std::thread::sleep(Duration::from_millis(300));
    assert_fresh(&rig, "sl0", MISS, "an item the slab mover dropped");
}
