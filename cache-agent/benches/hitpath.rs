//! Per-packet cost of the kernel programs, measured with BPF_PROG_TEST_RUN (a benchmark, not a
//! test: `cargo bench -p cache-agent --bench hitpath`, as root).
//!
//! The programs run on prepared frames, one run per syscall (a hit rewrites its frame, so the
//! kernel's `repeat` would time a different packet after the first run). The kernel times each
//! run itself; the average over many runs is stable to a few ns on a quiet machine, which live
//! traffic with `kernel.bpf_stats_enabled` is not. Cases run interleaved, so drift hits them
//! alike: UDP get hit (1 key, 4 keys, IPv6), a cold hit (50k keys in turn: each lookup lands on
//! a bucket not touched lately, as the Zipf tail does live), a miss, the zero-work reflector
//! (the floor), and the TC fill of a reply.
//!
//! `BASELINE=<object>` also loads another build of cache-ebpf (a copy of
//! `target/release/build/cache-agent-*/out/cache-ebpf` from before a change) and runs every
//! case on both, interleaved: compare a change within one run, not across runs.
//!
//! Everything but the cold case is cache-warm.

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
    // With a full UDP checksum, as a NIC delivers it (the hit path verifies it).
    f.extend(net.packet(IPPROTO_UDP, &udp(&net, sport, dport, payload, true)));
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
    name: String,
    /// Run `k` uses frame `k % frames.len()`.
    frames: Vec<Vec<u8>>,
    /// Which loaded object (this build, or the baseline).
    arm: usize,
    prog: &'static str,
    /// The verdict the case must get, or the numbers are not about what they claim.
    verdict: u32,
    total: Duration,
    runs: u32,
}

const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
/// TC_ACT_UNSPEC (-1): tc_fill lets every packet go on its way.
const TC_NEXT: u32 = u32::MAX;

fn main() -> anyhow::Result<()> {
    let runs: u32 = std::env::var("RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    // CAPACITY, SHARES (as --capacity, --class-shares) and COLD_KEYS: see how the cold case
    // moves with the size of the bucket arrays.
    let args = RunArgs {
        iface: Some("lo".into()),
        memcached: Some(format!("127.0.0.1:{PORT}")),
        capacity: Some(std::env::var("CAPACITY").unwrap_or_else(|_| "64M".into())),
        class_shares: std::env::var("SHARES")
            .ok()
            .map(|s| s.split(',').filter_map(|x| x.parse().ok()).collect()),
        ..Default::default()
    };
    let settings = Settings::resolve(&args)?;
    // BASELINE=<object>: also time another build of cache-ebpf (e.g. a copy of
    // target/release/build/cache-agent-*/out/cache-ebpf from before a change), interleaved
    // with this one, so the two compare within one run.
    let mut arms = vec![("", loader::load(&settings)?)];
    if let Some(path) = std::env::var_os("BASELINE") {
        let object = std::fs::read(&path)?;
        arms.push((" [base]", loader::load_object(&settings, &object)?));
    }
    // How close each program is to the verifier's budget of a million instructions: inlining
    // on the hit path trades run time for verification, and past the budget nothing loads.
    for (label, ebpf) in &arms {
        for (name, program) in ebpf.programs() {
            if let Some(n) = program
                .info()
                .ok()
                .and_then(|i| i.verified_instruction_count())
            {
                eprintln!("verified{label}: {name} {n} instructions");
            }
        }
    }
    let keys: Vec<String> = (0..4).map(|i| format!("key:{i:012}")).collect();
    // BMC's keys are 16 bytes; keys in the field are often longer.
    let long_key = format!("user:{:024}:profile", 7);
    for (_, ebpf) in arms.iter_mut() {
        prepare(ebpf, &settings, &keys)?;
        prepare(ebpf, &settings, std::slice::from_ref(&long_key))?;
    }

    let shapes = [
        (
            "hit, 1 key (v4)",
            get(false, &keys[..1]),
            names::XDP_CACHE,
            XDP_TX,
        ),
        (
            "hit, 1 key (v6)",
            get(true, &keys[..1]),
            names::XDP_CACHE,
            XDP_TX,
        ),
        (
            "hit, 1 key of 37 bytes (v4)",
            get(false, std::slice::from_ref(&long_key)),
            names::XDP_CACHE,
            XDP_TX,
        ),
        (
            "hit, 4 keys (v4)",
            get(false, &keys),
            names::XDP_CACHE,
            XDP_TX,
        ),
        (
            "miss, 1 key (v4)",
            get(false, &["key:absent00000".to_string()]),
            names::XDP_CACHE,
            XDP_PASS,
        ),
        (
            "reflector (v4)",
            get(false, &keys[..1]),
            names::XDP_REFLECTOR,
            XDP_TX,
        ),
        // memcached's reply to the GET that filled key 0, refilling it (its ticket stays).
        (
            "fill, 1 key (v4, TC)",
            reply(false, &keys[0], &[b'v'; 32]),
            names::TC_FILL,
            TC_NEXT,
        ),
    ];
    let mut shapes: Vec<_> = shapes
        .into_iter()
        .map(|(name, frame, prog, verdict)| (name, vec![frame], prog, verdict))
        .collect();
    // ONLY=<text>: just the cases whose name contains it (for profiling one with perf).
    let only = std::env::var("ONLY").ok();
    let wanted = |name: &str| only.as_ref().is_none_or(|o| name.contains(o.as_str()));
    // The live hit path's cost is mostly the first touch of a bucket nobody asked for lately
    // (README): GETs for many keys, each a different bucket of the 64 MiB cache, in turn.
    const COLD: &str = "hit, 1 key, cold (v4)";
    if wanted(COLD) {
        let cold_keys = std::env::var("COLD_KEYS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(COLD_KEYS);
        let cold = cold_gets(&mut arms, cold_keys)?;
        shapes.insert(3, (COLD, cold, names::XDP_CACHE, XDP_TX));
    }
    let mut cases = Vec::new();
    for (name, frames, prog, verdict) in shapes {
        for (arm, (label, _)) in arms.iter().enumerate() {
            cases.push(Case {
                name: format!("{name}{label}"),
                frames: frames.clone(),
                arm,
                prog,
                verdict,
                total: Duration::ZERO,
                runs: 0,
            });
        }
    }
    cases.retain(|c| wanted(&c.name));
    // ANY_VERDICT=1: time cut-down builds of the programs (profiling by ablation).
    let any_verdict = std::env::var_os("ANY_VERDICT").is_some();
    // Interleaved in blocks, so slow drift of the machine spreads over every case.
    let block = 1000;
    for _ in 0..runs.div_ceil(block) {
        for case in cases.iter_mut() {
            let ebpf = &arms[case.arm].1;
            for _ in 0..block {
                let frame = &case.frames[case.runs as usize % case.frames.len()];
                let (verdict, took) = if case.prog == names::TC_FILL {
                    let tc: &SchedClassifier = ebpf.program(case.prog).unwrap().try_into()?;
                    run_once(tc, frame)?
                } else {
                    run_once(xdp(ebpf, case.prog), frame)?
                };
                anyhow::ensure!(
                    verdict == case.verdict || any_verdict,
                    "{}: verdict {verdict}, expected {}",
                    case.name,
                    case.verdict
                );
                case.total += took;
                case.runs += 1;
            }
        }
    }
    println!("{:<36} {:>10} {:>10}", "case", "runs", "ns/run");
    for c in &cases {
        println!(
            "{:<36} {:>10} {:>10.0}",
            c.name,
            c.runs,
            c.total.as_nanos() as f64 / c.runs as f64
        );
    }
    Ok(())
}

/// Keys of the cold case: a quarter of what the 128-byte class holds at the bench's default
/// capacity, so few buckets overflow.
const COLD_KEYS: u32 = 50_000;

/// Fills `count` keys into every arm and returns GETs for them in a scattered order, keeping
/// only keys that hit in every arm (a few land in a full bucket).
fn cold_gets(arms: &mut [(&str, Ebpf)], count: u32) -> anyhow::Result<Vec<Vec<u8>>> {
    let value = [b'v'; 32];
    // A multiplicative permutation of 0..count (7919 is prime): consecutive runs hit
    // unrelated buckets.
    anyhow::ensure!(
        count > 0 && !count.is_multiple_of(7919),
        "COLD_KEYS {count}"
    );
    let keys: Vec<String> = (0..count as u64)
        .map(|i| format!("cold:{:011}", (i * 7919) % count as u64))
        .collect();
    for key in &keys {
        let get_frame = get(false, std::slice::from_ref(key));
        for (_, ebpf) in arms.iter_mut() {
            let (verdict, _) = run_once(xdp(ebpf, names::XDP_CACHE), &get_frame)?;
            if verdict == XDP_PASS {
                let tc: &SchedClassifier = ebpf.program(names::TC_FILL).unwrap().try_into()?;
                run_once(tc, &reply(false, key, &value))?;
            }
        }
    }
    let mut gets = Vec::new();
    for key in &keys {
        let get_frame = get(false, std::slice::from_ref(key));
        let mut hits_everywhere = true;
        for (_, ebpf) in arms.iter() {
            let (verdict, _) = run_once(xdp(ebpf, names::XDP_CACHE), &get_frame)?;
            hits_everywhere &= verdict == XDP_TX;
        }
        if hits_everywhere {
            gets.push(get_frame);
        }
    }
    anyhow::ensure!(
        gets.len() as u32 > count * 9 / 10,
        "only {} of {count} cold keys stayed cached",
        gets.len()
    );
    Ok(gets)
}

/// Configures `ebpf` to serve and fills BMC's item shape (a 16-byte key, a 32-byte value)
/// for `keys` through the programs themselves: a missed GET, then memcached's reply on TC.
fn prepare(ebpf: &mut Ebpf, settings: &Settings, keys: &[String]) -> anyhow::Result<()> {
    let mut config = loader::initial_config(settings);
    config.lease_until_ns = kernel::coarse_now_ns() + 3600 * SEC;
    config.fill_lease_until_ns = config.lease_until_ns;
    config.flags |= flags::SERVE | flags::FILL;
    config.max_reply_payload = 1400;
    config.write_settle_ns = 0;
    config.fill_hold_until_ns = 0;
    config.max_age_ns = 3600 * SEC;
    // No agent answers TTL questions here: entries whose TTL the kernel did not see live
    // max_age instead of waiting for an answer (as live, where the sets were seen).
    config.flags &= !flags::LEARN_TTL;
    kernel::write_config(ebpf, &config)?;
    let value = [b'v'; 32];
    let tc: &SchedClassifier = ebpf.program(names::TC_FILL).unwrap().try_into()?;
    for k in keys {
        let (verdict, _) = run_once(
            xdp(ebpf, names::XDP_CACHE),
            &get(false, std::slice::from_ref(k)),
        )?;
        anyhow::ensure!(
            verdict == XDP_PASS,
            "first get of {k} must miss, got {verdict}"
        );
        run_once(tc, &reply(false, k, &value))?;
    }
    Ok(())
}
