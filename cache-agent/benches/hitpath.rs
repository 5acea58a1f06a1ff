//! Per-packet cost of the kernel programs, measured with BPF_PROG_TEST_RUN (a benchmark, not a
//! test: `cargo bench -p cache-agent --bench hitpath`, as root).
//!
//! The programs run on prepared frames, one run per syscall (a hit rewrites its frame, so the
//! kernel's `repeat` would time a different packet after the first run). The kernel times each
//! run itself; the average over many runs is stable to a few ns on a quiet machine, which live
//! traffic with `kernel.bpf_stats_enabled` is not. Cases run interleaved, so drift hits them
//! alike: UDP get hit (1 key, 4 keys, IPv6), a miss, and the zero-work reflector (the floor).
//!
//! Everything here is cache-warm: on live traffic a lookup of a rarely requested key also waits
//! for memory (see the README's performance section), which this benchmark does not show.

#[path = "../tests/fixtures/packet.rs"]
#[allow(dead_code)]
mod packet;

use std::time::Duration;

use aya::{
    Ebpf,
    programs::{ProgramError, SchedClassifier, TestRun, TestRunOptions, TestRunResult, Xdp},
};
use cache_agent::{
    config::{RunArgs, Settings},
    kernel, loader,
};
use cache_common::{flags, names};
use packet::{Eth, IPPROTO_UDP, Ipv4, Ipv6, Net, mc_frame, udp};

const PORT: u16 = 11211;
const SEC: u64 = 1_000_000_000;
const CLIENT_MAC: [u8; 6] = [0x02, 0xc1, 0x1e, 0x47, 0x00, 0x01];
const SERVER_MAC: [u8; 6] = [0x02, 0x5e, 0x7f, 0xe7, 0x00, 0x02];

/// One direction of a v4 or v6 conversation between the client and memcached.
fn frame(v6: bool, to_server: bool, payload: &[u8]) -> Vec<u8> {
    let (client, server) = if v6 {
        let mut c = [0u8; 16];
        c[..2].copy_from_slice(&[0x20, 0x01]);
        c[2..4].copy_from_slice(&[0x00, 0x02]);
        let mut s = c;
        c[15] = 2;
        s[15] = 1;
        (c, s)
    } else {
        let mut c = [0u8; 16];
        c[..4].copy_from_slice(&[198, 18, 0, 2]);
        let mut s = c;
        s[3] = 1;
        (c, s)
    };
    let (src, dst, src_mac, dst_mac) = if to_server {
        (client, server, CLIENT_MAC, SERVER_MAC)
    } else {
        (server, client, SERVER_MAC, CLIENT_MAC)
    };
    let net = if v6 {
        Net::V6(Ipv6 {
            word0: [0x60, 0, 0, 0],
            hop_limit: 64,
            src,
            dst,
        })
    } else {
        Net::V4(Ipv4 {
            tos: 0,
            id: 1,
            df: true,
            ttl: 64,
            src: [src[0], src[1], src[2], src[3]],
            dst: [dst[0], dst[1], dst[2], dst[3]],
            options: Vec::new(),
        })
    };
    let (sport, dport) = if to_server {
        (40000, PORT)
    } else {
        (PORT, 40000)
    };
    let mut f = Eth {
        dst: dst_mac,
        src: src_mac,
        vlan: None,
    }
    .bytes(net.ethertype());
    f.extend(net.packet(IPPROTO_UDP, &udp(&net, sport, dport, payload, false)));
    f
}

fn get(v6: bool, keys: &[String]) -> Vec<u8> {
    frame(
        v6,
        true,
        &mc_frame(7, 0, 1, format!("get {}\r\n", keys.join(" ")).as_bytes()),
    )
}

fn reply(v6: bool, key: &str, value: &[u8]) -> Vec<u8> {
    let mut body = format!("VALUE {key} 0 {}\r\n", value.len()).into_bytes();
    body.extend_from_slice(value);
    body.extend_from_slice(b"\r\nEND\r\n");
    frame(v6, false, &mc_frame(7, 0, 1, &body))
}

fn xdp<'a>(ebpf: &'a Ebpf, name: &str) -> &'a Xdp {
    ebpf.program(name).unwrap().try_into().unwrap()
}

/// One run of an XDP or TC program on `input`: (verdict, kernel-timed duration).
fn run_once<P>(prog: &P, input: &[u8]) -> Result<(u32, Duration), ProgramError>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    let mut out = [0u8; 4096];
    let r = prog.test_run(TestRunOptions {
        data_in: Some(input),
        data_out: Some(&mut out),
        ..TestRunOptions::new()
    })?;
    Ok((r.return_value, r.duration))
}

struct Case {
    name: &'static str,
    frame: Vec<u8>,
    prog: &'static str,
    /// The verdict the case must get, or the numbers are not about what they claim.
    verdict: u32,
    total: Duration,
    runs: u32,
}

const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

fn main() -> anyhow::Result<()> {
    let runs: u32 = std::env::var("RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let args = RunArgs {
        iface: Some("lo".into()),
        memcached: Some(format!("127.0.0.1:{PORT}")),
        capacity: Some("64M".into()),
        ..Default::default()
    };
    let settings = Settings::resolve(&args)?;
    let mut ebpf = loader::load(&settings)?;
    let mut config = loader::initial_config(&settings);
    config.lease_until_ns = kernel::coarse_now_ns() + 3600 * SEC;
    config.fill_lease_until_ns = config.lease_until_ns;
    config.flags |= flags::SERVE | flags::FILL;
    config.max_reply_payload = 1400;
    config.write_settle_ns = 0;
    config.fill_hold_until_ns = 0;
    config.max_age_ns = 3600 * SEC;
    kernel::write_config(&mut ebpf, &config)?;

    // The BMC workload's item: a 16-byte key, a 32-byte value. Fill through the programs.
    let keys: Vec<String> = (0..4).map(|i| format!("key:{i:012}")).collect();
    let value = [b'v'; 32];
    let tc: &SchedClassifier = ebpf.program(names::TC_FILL).unwrap().try_into()?;
    for k in &keys {
        let (verdict, _) = run_once(
            xdp(&ebpf, names::XDP_CACHE),
            &get(false, std::slice::from_ref(k)),
        )?;
        anyhow::ensure!(
            verdict == XDP_PASS,
            "first get of {k} must miss, got {verdict}"
        );
        run_once(tc, &reply(false, k, &value))?;
    }

    let mut cases = vec![
        Case {
            name: "hit, 1 key (v4)",
            frame: get(false, &keys[..1]),
            prog: names::XDP_CACHE,
            verdict: XDP_TX,
            total: Duration::ZERO,
            runs: 0,
        },
        Case {
            name: "hit, 1 key (v6)",
            frame: get(true, &keys[..1]),
            prog: names::XDP_CACHE,
            verdict: XDP_TX,
            total: Duration::ZERO,
            runs: 0,
        },
        Case {
            name: "hit, 4 keys (v4)",
            frame: get(false, &keys),
            prog: names::XDP_CACHE,
            verdict: XDP_TX,
            total: Duration::ZERO,
            runs: 0,
        },
        Case {
            name: "miss, 1 key (v4)",
            frame: get(false, &["key:absent00000".to_string()]),
            prog: names::XDP_CACHE,
            verdict: XDP_PASS,
            total: Duration::ZERO,
            runs: 0,
        },
        Case {
            name: "reflector (v4)",
            frame: get(false, &keys[..1]),
            prog: names::XDP_REFLECTOR,
            verdict: XDP_TX,
            total: Duration::ZERO,
            runs: 0,
        },
    ];
    // ONLY=<text>: just the cases whose name contains it (for profiling one with perf).
    if let Ok(only) = std::env::var("ONLY") {
        cases.retain(|c| c.name.contains(&only));
    }
    // Interleaved in blocks, so slow drift of the machine spreads over every case.
    let block = 1000;
    for _ in 0..runs.div_ceil(block) {
        for case in cases.iter_mut() {
            for _ in 0..block {
                let (verdict, took) = run_once(xdp(&ebpf, case.prog), &case.frame)?;
                anyhow::ensure!(
                    verdict == case.verdict,
                    "{}: verdict {verdict}, expected {}",
                    case.name,
                    case.verdict
                );
                case.total += took;
                case.runs += 1;
            }
        }
    }
    println!("{:<22} {:>10} {:>10}", "case", "runs", "ns/run");
    for c in &cases {
        println!(
            "{:<22} {:>10} {:>10.0}",
            c.name,
            c.runs,
            c.total.as_nanos() as f64 / c.runs as f64
        );
    }
    Ok(())
}
