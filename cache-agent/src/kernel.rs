//! Typed access to the kernel side: the configuration the agent publishes, the counters and
//! histograms it reads, and per-key invalidation from user space.

use std::path::Path;

use aya::{
    Ebpf,
    maps::{Array, LpmTrie, Map, MapData, PerCpuArray, lpm_trie::Key},
    programs::{ProgramError, TestRun, TestRunOptions, Xdp},
};
use cache_common::{COUNTER_COUNT, Config, Counters, HISTOGRAM_BUCKETS, Histogram, State, names};

use crate::error::{AgentError, Result};

/// Sums of the per-CPU counters and histograms.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub counters: [u64; COUNTER_COUNT],
    pub hit_latency: Histogram,
    pub miss_latency: Histogram,
    pub config: Config,
    pub state: State,
}

fn map_err(map: &'static str) -> impl FnOnce(aya::maps::MapError) -> AgentError {
    move |source| AgentError::Map { map, source }
}

fn map_mut<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Map> {
    ebpf.map_mut(name).ok_or(AgentError::Map {
        map: name,
        source: aya::maps::MapError::InvalidName { name: name.into() },
    })
}

fn map_ref<'a>(ebpf: &'a Ebpf, name: &'static str) -> Result<&'a Map> {
    ebpf.map(name).ok_or(AgentError::Map {
        map: name,
        source: aya::maps::MapError::InvalidName { name: name.into() },
    })
}

pub fn write_config(ebpf: &mut Ebpf, config: &Config) -> Result<()> {
    let mut array: Array<&mut MapData, Config> =
        Array::try_from(map_mut(ebpf, names::CONFIG)?).map_err(map_err(names::CONFIG))?;
    array.set(0, config, 0).map_err(map_err(names::CONFIG))
}

pub fn read_config(ebpf: &Ebpf) -> Result<Config> {
    let array: Array<&MapData, Config> =
        Array::try_from(map_ref(ebpf, names::CONFIG)?).map_err(map_err(names::CONFIG))?;
    array.get(&0, 0).map_err(map_err(names::CONFIG))
}

/// Installs the allowlist (replacing nothing: called once, before attaching).
pub fn write_allowlist(ebpf: &mut Ebpf, allow: &[crate::config::Cidr]) -> Result<()> {
    for cidr in allow {
        match cidr.addr {
            std::net::IpAddr::V4(a) => {
                let mut trie: LpmTrie<&mut MapData, [u8; 4], u8> =
                    LpmTrie::try_from(map_mut(ebpf, names::ALLOW_V4)?)
                        .map_err(map_err(names::ALLOW_V4))?;
                trie.insert(&Key::new(cidr.prefix as u32, a.octets()), 1, 0)
                    .map_err(map_err(names::ALLOW_V4))?;
            }
            std::net::IpAddr::V6(a) => {
                let mut trie: LpmTrie<&mut MapData, [u8; 16], u8> =
                    LpmTrie::try_from(map_mut(ebpf, names::ALLOW_V6)?)
                        .map_err(map_err(names::ALLOW_V6))?;
                trie.insert(&Key::new(cidr.prefix as u32, a.octets()), 1, 0)
                    .map_err(map_err(names::ALLOW_V6))?;
            }
        }
    }
    Ok(())
}

/// The CONFIG a previous agent left pinned under `dir`.
pub fn pinned_config(dir: &Path) -> Result<Config> {
    let data = MapData::from_pin(dir.join(names::CONFIG)).map_err(map_err(names::CONFIG))?;
    let config: Array<MapData, Config> =
        Array::try_from(Map::Array(data)).map_err(map_err(names::CONFIG))?;
    config.get(&0, 0).map_err(map_err(names::CONFIG))
}

/// Reads a snapshot from the pins under `dir` (another process's agent).
pub fn snapshot_from_pins(dir: &Path) -> Result<Snapshot> {
    let open = |name: &'static str| -> Result<MapData> {
        MapData::from_pin(dir.join(name)).map_err(map_err(name))
    };
    let counters: PerCpuArray<MapData, Counters> =
        PerCpuArray::try_from(Map::PerCpuArray(open(names::COUNTERS)?))
            .map_err(map_err(names::COUNTERS))?;
    let hit: PerCpuArray<MapData, Histogram> =
        PerCpuArray::try_from(Map::PerCpuArray(open(names::HIT_LATENCY)?))
            .map_err(map_err(names::HIT_LATENCY))?;
    let miss: PerCpuArray<MapData, Histogram> =
        PerCpuArray::try_from(Map::PerCpuArray(open(names::MISS_LATENCY)?))
            .map_err(map_err(names::MISS_LATENCY))?;
    let config: Array<MapData, Config> =
        Array::try_from(Map::Array(open(names::CONFIG)?)).map_err(map_err(names::CONFIG))?;
    let state: Array<MapData, State> =
        Array::try_from(Map::Array(open(names::STATE)?)).map_err(map_err(names::STATE))?;
    Ok(Snapshot {
        counters: sum_counters(&counters)?,
        hit_latency: sum_histograms(&hit)?,
        miss_latency: sum_histograms(&miss)?,
        config: config.get(&0, 0).map_err(map_err(names::CONFIG))?,
        state: state.get(&0, 0).map_err(map_err(names::STATE))?,
    })
}

/// Reads a snapshot from this process's maps.
pub fn snapshot(ebpf: &Ebpf) -> Result<Snapshot> {
    let counters: PerCpuArray<&MapData, Counters> =
        PerCpuArray::try_from(map_ref(ebpf, names::COUNTERS)?).map_err(map_err(names::COUNTERS))?;
    let hit: PerCpuArray<&MapData, Histogram> =
        PerCpuArray::try_from(map_ref(ebpf, names::HIT_LATENCY)?)
            .map_err(map_err(names::HIT_LATENCY))?;
    let miss: PerCpuArray<&MapData, Histogram> =
        PerCpuArray::try_from(map_ref(ebpf, names::MISS_LATENCY)?)
            .map_err(map_err(names::MISS_LATENCY))?;
    let state: Array<&MapData, State> =
        Array::try_from(map_ref(ebpf, names::STATE)?).map_err(map_err(names::STATE))?;
    Ok(Snapshot {
        counters: sum_counters(&counters)?,
        hit_latency: sum_histograms(&hit)?,
        miss_latency: sum_histograms(&miss)?,
        config: read_config(ebpf)?,
        state: state.get(&0, 0).map_err(map_err(names::STATE))?,
    })
}

fn sum_counters<T: std::borrow::Borrow<MapData>>(
    map: &PerCpuArray<T, Counters>,
) -> Result<[u64; COUNTER_COUNT]> {
    let per_cpu = map.get(&0, 0).map_err(map_err(names::COUNTERS))?;
    let mut out = [0u64; COUNTER_COUNT];
    for cpu in per_cpu.iter() {
        for (o, v) in out.iter_mut().zip(cpu.values.iter()) {
            *o += v;
        }
    }
    Ok(out)
}

fn sum_histograms<T: std::borrow::Borrow<MapData>>(
    map: &PerCpuArray<T, Histogram>,
) -> Result<Histogram> {
    let per_cpu = map.get(&0, 0).map_err(map_err(names::HIT_LATENCY))?;
    let mut out = Histogram::default();
    for cpu in per_cpu.iter() {
        for i in 0..HISTOGRAM_BUCKETS {
            out.buckets[i] += cpu.buckets[i];
        }
        out.sum_ns += cpu.sum_ns;
    }
    Ok(out)
}

/// Invalidates one key from user space by running the XDP program on a synthetic
/// `delete <key>` datagram (BPF_PROG_TEST_RUN): the same code path, under the same bucket
/// locks, as a delete on the wire, and the datagram goes nowhere.
pub fn invalidate_key(ebpf: &Ebpf, udp_port: u16, key: &[u8]) -> Result<(), ProgramError> {
    let prog: &Xdp = ebpf
        .program(names::XDP_CACHE)
        .ok_or(ProgramError::NotLoaded)?
        .try_into()?;
    let frame = synthetic_udp_frame(udp_port, &[b"delete ", key, b"\r\n"].concat());
    prog.test_run(TestRunOptions {
        data_in: Some(&frame),
        ..TestRunOptions::new()
    })?;
    Ok(())
}

/// Runs one of the agent's control programs (`xdp_learn_ttl`, `xdp_warm_fill`: XDP programs
/// that are never attached) on `data` with BPF_PROG_TEST_RUN, and returns the u32 verdict the
/// program wrote back at `result_at`.
pub fn run_control(
    ebpf: &Ebpf,
    program: &'static str,
    data: &[u8],
    result_at: usize,
) -> Result<u32, ProgramError> {
    let prog: &Xdp = ebpf
        .program(program)
        .ok_or(ProgramError::NotLoaded)?
        .try_into()?;
    let mut data_out = vec![0u8; data.len()];
    prog.test_run(TestRunOptions {
        data_in: Some(data),
        data_out: Some(&mut data_out),
        ..TestRunOptions::new()
    })?;
    let verdict = &data_out[result_at..result_at + 4];
    Ok(u32::from_ne_bytes(verdict.try_into().expect("4 bytes")))
}

/// Ethernet + IPv4 + UDP (to `port`) + memcached frame header + `payload`.
pub fn synthetic_udp_frame(port: u16, payload: &[u8]) -> Vec<u8> {
    let udp_len = 8 + 8 + payload.len();
    let ip_len = 20 + udp_len;
    let mut f = Vec::with_capacity(14 + ip_len);
    f.extend_from_slice(&[2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x08, 0x00]);
    f.extend_from_slice(&[
        0x45,
        0,
        (ip_len >> 8) as u8,
        ip_len as u8,
        0,
        0,
        0x40,
        0,
        64,
        17,
        0,
        0,
    ]);
    f.extend_from_slice(&[127, 0, 0, 1, 127, 0, 0, 1]);
    let sum = ipv4_checksum(&f[14..34]);
    f[24..26].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(&cache_common::AGENT_SOURCE_PORT.to_be_bytes());
    f.extend_from_slice(&port.to_be_bytes());
    f.extend_from_slice(&(udp_len as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(&[0, 0, 0, 0, 0, 1, 0, 0]);
    f.extend_from_slice(payload);
    f
}

pub fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32)
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// CLOCK_MONOTONIC_COARSE in ns: the clock `bpf_ktime_get_coarse_ns` reads.
pub fn coarse_now_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC_COARSE)
}

/// CLOCK_REALTIME minus CLOCK_MONOTONIC, for absolute exptimes.
pub fn realtime_offset_ns() -> u64 {
    clock_ns(libc::CLOCK_REALTIME).saturating_sub(clock_ns(libc::CLOCK_MONOTONIC))
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec; clock ids are constants.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
