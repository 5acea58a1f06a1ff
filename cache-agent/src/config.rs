//! Settings: every field can come from a flag, an environment variable (`CACHE_AGENT_*`) or
//! the TOML file given with `--config`, in that order of precedence, then the default.
//! [`Settings::resolve`] validates everything before anything is attached.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use cache_common::{BUCKET_BYTES, CLASS_COUNT, KeyMeta};
use clap::Args;
use serde::Deserialize;

use crate::error::{AgentError, Result};

/// Where maps are pinned; the layout version is part of the path so an upgrade that changes it
/// never reads the old maps with the new layout.
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/memcache-accel";
pub const PIN_LAYOUT: &str = "v9";

/// `cache-agent run` / `check-config` options. Unset options fall back to the config file,
/// then to the defaults shown.
#[derive(Args, Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RunArgs {
    /// TOML file with any of these options (kebab-case keys).
    #[arg(long, env = "CACHE_AGENT_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Interface in front of memcached (required).
    #[arg(long, env = "CACHE_AGENT_IFACE")]
    pub iface: Option<String>,
    /// memcached's TCP address, used for health checks, `stats` and `watch` (required).
    #[arg(long, env = "CACHE_AGENT_MEMCACHED")]
    pub memcached: Option<String>,
    /// memcached's UDP port [default: the port of --memcached].
    #[arg(long, env = "CACHE_AGENT_UDP_PORT")]
    pub udp_port: Option<u16>,
    /// XDP mode: `native` (driver) or `generic` (skb, slow; only when asked).
    #[arg(long, env = "CACHE_AGENT_XDP_MODE")]
    pub xdp_mode: Option<String>,
    /// Cache capacity in bytes; suffixes K, M, G (powers of 1024) [default: 64M].
    #[arg(long, env = "CACHE_AGENT_CAPACITY")]
    pub capacity: Option<String>,
    /// Share of capacity per size class (128, 384, 768, 1536-byte slots), percent [default: 40,30,20,10].
    #[arg(long, env = "CACHE_AGENT_CLASS_SHARES", value_delimiter = ',')]
    pub class_shares: Option<Vec<u32>>,
    /// Life of an entry whose TTL the kernel did not see, when --learn-ttl is off, seconds [default: 2].
    #[arg(long, env = "CACHE_AGENT_MAX_AGE")]
    pub max_age: Option<f64>,
    /// No fill from a GET that arrived within this many ms of a write to its key [default: 250].
    #[arg(long, env = "CACHE_AGENT_WRITE_SETTLE_MS")]
    pub write_settle_ms: Option<u64>,
    /// Lease the agent renews; the kernel stops serving this long after the agent stops renewing, ms [default: 1000].
    #[arg(long, env = "CACHE_AGENT_LEASE_MS")]
    pub lease_ms: Option<u64>,
    /// Prometheus endpoint [default: 127.0.0.1:9477].
    #[arg(long, env = "CACHE_AGENT_METRICS_ADDR")]
    pub metrics_addr: Option<String>,
    /// Answer only these client networks (CIDR, comma separated) [default: all].
    #[arg(long, env = "CACHE_AGENT_ALLOW", value_delimiter = ',')]
    pub allow: Option<Vec<String>>,
    /// Largest reply frame, as a multiple of the request frame; 0 = no limit [default: 32].
    #[arg(long, env = "CACHE_AGENT_MAX_AMPLIFICATION")]
    pub max_amplification: Option<u32>,
    /// Time the hit path in the kernel (two clock reads on one GET in 64) [default: true].
    #[arg(long, env = "CACHE_AGENT_HIT_LATENCY")]
    pub hit_latency: Option<bool>,
    /// Ask memcached (`me <key>`) the TTL of entries filled without one; they are served once
    /// it is known, and live as long as memcached's item. Off: they live --max-age [default: true].
    #[arg(long, env = "CACHE_AGENT_LEARN_TTL")]
    pub learn_ttl: Option<bool>,
    /// At start, fill the kernel cache with memcached's most recently used items
    /// (`lru_crawler metadump`, then `get`) [default: true].
    #[arg(long, env = "CACHE_AGENT_WARM_START")]
    pub warm_start: Option<bool>,
    /// Answer hits whose reply the XDP frame cannot grow to hold (veth, small driver buffers)
    /// from TC ingress instead of passing them to memcached [default: true].
    #[arg(long, env = "CACHE_AGENT_TC_SERVE")]
    pub tc_serve: Option<bool>,
    /// Follow memcached's `watch` stream as a coherence backstop [default: true].
    #[arg(long, env = "CACHE_AGENT_WATCH")]
    pub watch: Option<bool>,
    /// bpffs directory for pins [default: /sys/fs/bpf/memcache-accel].
    #[arg(long, env = "CACHE_AGENT_PIN_ROOT")]
    pub pin_root: Option<PathBuf>,
    /// Log format: `text` or `json`.
    #[arg(long, env = "CACHE_AGENT_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Upgrade mode: on SIGTERM leave the programs attached and the cache pinned (serving
    /// pauses, writes still invalidate) so the next agent adopts them warm [default: false].
    #[arg(long, env = "CACHE_AGENT_KEEP_ON_EXIT")]
    pub keep_on_exit: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdpMode {
    Native,
    Generic,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: std::net::IpAddr,
    pub prefix: u8,
}

/// Validated settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub iface: String,
    pub memcached: SocketAddr,
    pub tcp_port: u16,
    pub udp_port: u16,
    pub xdp_mode: XdpMode,
    pub capacity_bytes: u64,
    /// Percent of the capacity per size class, and the buckets that makes.
    pub class_shares: [u32; CLASS_COUNT],
    pub class_buckets: [u32; CLASS_COUNT],
    pub key_meta_slots: u32,
    pub max_age: Duration,
    pub write_settle: Duration,
    pub lease: Duration,
    pub metrics_addr: SocketAddr,
    pub allow: Vec<Cidr>,
    pub max_amplification: u32,
    pub hit_latency: bool,
    pub watch: bool,
    pub learn_ttl: bool,
    pub warm_start: bool,
    pub tc_serve: bool,
    pub pin_root: PathBuf,
    pub json_logs: bool,
    pub keep_on_exit: bool,
}

/// The agent probes memcached at most this often: see
/// [`Settings::probe_interval`].
const MIN_PROBE_INTERVAL: Duration = Duration::from_millis(20);

/// Shortest `--write-settle-ms`. The settle time covers a write still queued inside memcached
/// when a GET's reply is filled into the cache; shorter than this, ordinary queueing outlives
/// it and stale values get cached (QA measured hundreds of stale reads in 15 s at 0 ms, none
/// at the default 250 ms).
pub const MIN_WRITE_SETTLE_MS: u64 = 50;
/// Longest `--write-settle-ms`: a minute, like the longest lease.
pub const MAX_WRITE_SETTLE_MS: u64 = 60_000;

impl Settings {
    /// The settings as a file `--config` takes (`check-config` prints it): every option, with
    /// the value in effect.
    pub fn to_toml(&self) -> String {
        use toml::Value;
        let text = |s: String| Value::String(s);
        let int = |n: u64| Value::Integer(n as i64);
        let entries = [
            ("iface", text(self.iface.clone())),
            ("memcached", text(self.memcached.to_string())),
            ("udp-port", int(self.udp_port as u64)),
            (
                "xdp-mode",
                text(match self.xdp_mode {
                    XdpMode::Native => "native".into(),
                    XdpMode::Generic => "generic".into(),
                }),
            ),
            ("capacity", text(size_text(self.capacity_bytes))),
            (
                "class-shares",
                Value::Array(self.class_shares.iter().map(|&s| int(s as u64)).collect()),
            ),
            ("max-age", Value::Float(self.max_age.as_secs_f64())),
            ("write-settle-ms", int(self.write_settle.as_millis() as u64)),
            ("lease-ms", int(self.lease.as_millis() as u64)),
            ("metrics-addr", text(self.metrics_addr.to_string())),
            (
                "allow",
                Value::Array(
                    self.allow
                        .iter()
                        .map(|c| text(format!("{}/{}", c.addr, c.prefix)))
                        .collect(),
                ),
            ),
            ("max-amplification", int(self.max_amplification as u64)),
            ("hit-latency", Value::Boolean(self.hit_latency)),
            ("watch", Value::Boolean(self.watch)),
            ("learn-ttl", Value::Boolean(self.learn_ttl)),
            ("warm-start", Value::Boolean(self.warm_start)),
            ("tc-serve", Value::Boolean(self.tc_serve)),
            ("pin-root", text(self.pin_root.display().to_string())),
            (
                "log-format",
                text(if self.json_logs { "json" } else { "text" }.into()),
            ),
            ("keep-on-exit", Value::Boolean(self.keep_on_exit)),
        ];
        entries
            .iter()
            .map(|(key, value)| format!("{key} = {value}\n"))
            .collect()
    }

    /// How often the agent asks memcached for its health (and renews the leases): a quarter of
    /// the write-settle time, so a stall longer than that time is seen in time (see
    /// [`Settings::fill_lease`]); never more often than every 20 ms, never less often than a
    /// quarter lease.
    pub fn probe_interval(&self) -> Duration {
        (self.write_settle / 4)
            .min(self.lease / 4)
            .max(MIN_PROBE_INTERVAL)
    }

    /// How long a prompt probe lets the kernel fill: the write-settle time (a write queued in
    /// memcached longer than that is exactly what the per-key settle rule cannot see), or
    /// three probe intervals if that is longer.
    pub fn fill_lease(&self) -> Duration {
        self.write_settle.max(3 * self.probe_interval())
    }

    /// Directory of this interface's pins.
    pub fn pin_dir(&self) -> PathBuf {
        pin_dir(&self.pin_root, &self.iface)
    }

    /// Flags, then file, then defaults; then validation.
    pub fn resolve(cli: &RunArgs) -> Result<Settings> {
        let file = match &cli.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| AgentError::ConfigFile {
                    path: path.clone(),
                    problem: format!("cannot be read: {e}"),
                    fix: "pass the path of a readable TOML file to --config (or CACHE_AGENT_CONFIG)",
                })?;
                toml::from_str::<RunArgs>(&text).map_err(|e| AgentError::ConfigFile {
                    path: path.clone(),
                    // toml's message spans lines and ends with a newline.
                    problem: format!("is not valid: {}", e.to_string().trim_end()),
                    fix: "use the long flag names as kebab-case keys, e.g. capacity = \"256M\"",
                })?
            }
            None => RunArgs::default(),
        };
        macro_rules! pick {
            ($f:ident) => {
                cli.$f.clone().or(file.$f.clone())
            };
        }
        let iface = pick!(iface).ok_or_else(|| {
            missing(
                "iface",
                "--iface eth1 (the interface memcached's clients reach it through)",
            )
        })?;
        if iface.is_empty() || iface.len() > 15 {
            return Err(bad(
                "iface",
                format!("`{iface}` is not an interface name"),
                "pass a name of at most 15 characters",
            ));
        }
        let memcached_text =
            pick!(memcached).ok_or_else(|| missing("memcached", "--memcached 127.0.0.1:11211"))?;
        let memcached = parse_socket_addr(
            "memcached",
            &memcached_text,
            "e.g. 127.0.0.1:11211 or [::1]:11211",
        )?;
        // Port 0 is no port memcached listens on; checked here, or the error would blame
        // udp-port, which defaults to this port.
        if memcached.port() == 0 {
            return Err(bad(
                "memcached",
                format!("`{memcached_text}` has port 0"),
                "pass the port memcached listens on (its -p), e.g. 127.0.0.1:11211",
            ));
        }
        let udp_port = pick!(udp_port).unwrap_or(memcached.port());
        if udp_port == 0 {
            return Err(bad("udp-port", "is 0".into(), "pass memcached's -U port"));
        }
        let xdp_mode = match pick!(xdp_mode).as_deref().unwrap_or("native") {
            "native" | "driver" => XdpMode::Native,
            "generic" | "skb" => XdpMode::Generic,
            other => {
                return Err(bad(
                    "xdp-mode",
                    format!("`{other}` is unknown"),
                    "use `native` or `generic`",
                ));
            }
        };
        let capacity_text = pick!(capacity).unwrap_or_else(|| "64M".into());
        let capacity_bytes = parse_size(&capacity_text)?;
        if capacity_bytes < 1 << 20 {
            return Err(bad(
                "capacity",
                format!("{capacity_bytes} bytes is too small"),
                "use at least 1M",
            ));
        }
        let shares = pick!(class_shares).unwrap_or_else(|| vec![40, 30, 20, 10]);
        if shares.len() != CLASS_COUNT || shares.iter().sum::<u32>() != 100 {
            return Err(bad(
                "class-shares",
                format!("{shares:?}"),
                "give 4 percentages that add up to 100, e.g. 40,30,20,10",
            ));
        }
        let mut class_buckets = [0u32; CLASS_COUNT];
        let mut slots = 0u64;
        for c in 0..CLASS_COUNT {
            // In u128: a capacity near 2^64 bytes times a percentage overflows u64.
            let bytes = (capacity_bytes as u128 * shares[c] as u128 / 100) as u64;
            let buckets = (bytes / BUCKET_BYTES[c] as u64)
                .clamp(if shares[c] > 0 { 1 } else { 0 }, u32::MAX as u64 / 2);
            class_buckets[c] = buckets as u32;
            slots += buckets * cache_common::WAYS as u64;
        }
        // Twice the slots, so keys rarely share write times and TTLs.
        let key_meta_slots = (slots * 2).next_power_of_two().clamp(1 << 12, 1 << 26) as u32;
        check_fits_memory(
            &capacity_text,
            map_bytes(&class_buckets, key_meta_slots),
            mem_total(),
        )?;
        let max_age = secs("max-age", pick!(max_age).unwrap_or(2.0))?;
        let write_settle_ms = pick!(write_settle_ms).unwrap_or(250);
        if write_settle_ms < MIN_WRITE_SETTLE_MS {
            return Err(bad(
                "write-settle-ms",
                format!(
                    "{write_settle_ms} ms is too short: a write still queued in memcached when a GET's reply is filled would leave the old value cached"
                ),
                "use at least 50 ms (the default, 250, is safe under load)",
            ));
        }
        if write_settle_ms > MAX_WRITE_SETTLE_MS {
            // Found by QA round 7: 2^64-1 was taken, overflowed the kernel's times and
            // refused every fill as a stall while `status` said serving.
            return Err(bad(
                "write-settle-ms",
                format!(
                    "{write_settle_ms} ms is too long: every write would keep its key out of the cache for that long"
                ),
                "use 50 to 60000 (the default, 250, is safe under load)",
            ));
        }
        let write_settle = Duration::from_millis(write_settle_ms);
        let lease = Duration::from_millis(pick!(lease_ms).unwrap_or(1000));
        if lease < Duration::from_millis(200) || lease > Duration::from_secs(60) {
            return Err(bad(
                "lease-ms",
                format!("{} ms", lease.as_millis()),
                "use 200 to 60000",
            ));
        }
        let metrics_addr = parse_socket_addr(
            "metrics-addr",
            pick!(metrics_addr).as_deref().unwrap_or("127.0.0.1:9477"),
            "e.g. 127.0.0.1:9477",
        )?;
        let allow = pick!(allow)
            .unwrap_or_default()
            .iter()
            .map(|s| parse_cidr(s))
            .collect::<Result<Vec<_>>>()?;
        Ok(Settings {
            tcp_port: memcached.port(),
            iface,
            memcached,
            udp_port,
            xdp_mode,
            capacity_bytes,
            class_shares: [shares[0], shares[1], shares[2], shares[3]],
            class_buckets,
            key_meta_slots,
            max_age,
            write_settle,
            lease,
            metrics_addr,
            allow,
            max_amplification: pick!(max_amplification).unwrap_or(32),
            hit_latency: pick!(hit_latency).unwrap_or(true),
            watch: pick!(watch).unwrap_or(true),
            learn_ttl: pick!(learn_ttl).unwrap_or(true),
            warm_start: pick!(warm_start).unwrap_or(true),
            tc_serve: pick!(tc_serve).unwrap_or(true),
            pin_root: pick!(pin_root).unwrap_or_else(|| DEFAULT_PIN_ROOT.into()),
            keep_on_exit: pick!(keep_on_exit).unwrap_or(false),
            json_logs: match pick!(log_format).as_deref().unwrap_or("text") {
                "text" => false,
                "json" => true,
                other => {
                    return Err(bad(
                        "log-format",
                        format!("`{other}` is unknown"),
                        "use `text` or `json`",
                    ));
                }
            },
        })
    }

    /// Bytes of map memory the cache will take (buckets plus per-key bookkeeping).
    pub fn map_bytes(&self) -> u64 {
        map_bytes(&self.class_buckets, self.key_meta_slots)
    }
}

fn map_bytes(class_buckets: &[u32; CLASS_COUNT], key_meta_slots: u32) -> u64 {
    let buckets: u64 = (0..CLASS_COUNT)
        .map(|c| class_buckets[c] as u64 * BUCKET_BYTES[c] as u64)
        .sum();
    buckets + key_meta_slots as u64 * size_of::<KeyMeta>() as u64
}

/// The machine's memory (MemTotal in /proc/meminfo), if it can be read.
fn mem_total() -> Option<u64> {
    parse_mem_total(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

fn parse_mem_total(meminfo: &str) -> Option<u64> {
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    kib.checked_mul(1024)
}

/// Map memory is kernel memory: maps larger than the machine fail to load with "Cannot
/// allocate memory", which reads like a permission or kernel problem. Say what it is here.
/// Unknown memory (no /proc/meminfo) skips the check.
/// Maps may take at most half the machine's memory: memcached, beside the agent, holds the
/// items the cache copies, and the system needs the rest (found by QA round 7: 18G of a
/// 23.5 GiB machine was taken, 20.9 GB of maps and no room for memcached).
fn check_fits_memory(capacity: &str, map_bytes: u64, mem_total: Option<u64>) -> Result<()> {
    match mem_total {
        Some(mem) if map_bytes > mem / 2 => Err(bad(
            "capacity",
            format!(
                "`{capacity}` needs {} of map memory, more than half this machine's {} \
                 (MemTotal): memcached and the system need the rest",
                human_size(map_bytes),
                human_size(mem)
            ),
            "use a smaller capacity that leaves memory for memcached and the system, e.g. 256M",
        )),
        _ => Ok(()),
    }
}

fn human_size(bytes: u64) -> String {
    let b = bytes as f64;
    if bytes >= 1 << 30 {
        format!("{:.1} GiB", b / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    }
}

pub fn pin_dir(root: &std::path::Path, iface: &str) -> PathBuf {
    root.join(PIN_LAYOUT).join(iface)
}

/// This interface's pins under every other layout version in `root`: an older agent's, left in
/// upgrade mode. They cannot be adopted (the layout differs), and their pinned links keep the
/// old programs attached, which would make this agent's attach fail.
pub fn other_layout_pin_dirs(root: &std::path::Path, iface: &str) -> Vec<PathBuf> {
    let Ok(layouts) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    layouts
        .flatten()
        .filter(|l| l.file_name() != PIN_LAYOUT)
        .map(|l| l.path().join(iface))
        .filter(|d| d.is_dir())
        .collect()
}

fn missing(field: &'static str, example: &str) -> AgentError {
    AgentError::Config {
        field,
        problem: "is required".into(),
        fix: format!("pass {example}"),
    }
}

fn bad(field: &'static str, problem: String, fix: &str) -> AgentError {
    AgentError::Config {
        field,
        problem,
        fix: fix.into(),
    }
}

fn secs(field: &'static str, s: f64) -> Result<Duration> {
    // 0 is excluded (every entry would expire as it is filled); the fix says so.
    if !(s.is_finite() && s > 0.0 && s <= 86400.0) {
        return Err(bad(
            field,
            format!("{s} seconds is out of range"),
            "use more than 0 and at most 86400 seconds (a day), e.g. 2",
        ));
    }
    Ok(Duration::from_secs_f64(s))
}

/// `HOST:PORT` to the first address it resolves to. A string of that shape whose name does
/// not resolve is reported as such, with the resolver's error, not as malformed.
fn parse_socket_addr(field: &'static str, s: &str, example: &str) -> Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    if let Ok(addr) = s.parse() {
        return Ok(addr);
    }
    let shaped = s
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    if !shaped {
        return Err(bad(field, format!("`{s}` is not HOST:PORT"), example));
    }
    let fix = format!("pass a name this host resolves, or an IP address ({example})");
    match s.to_socket_addrs() {
        Ok(mut addrs) => addrs.next().ok_or_else(|| {
            bad(
                field,
                format!("`{s}`: the name resolved to no address"),
                &fix,
            )
        }),
        Err(e) => Err(bad(
            field,
            format!("`{s}`: the name could not be resolved ({e})"),
            &fix,
        )),
    }
}

/// `64M`, `1G`, `1048576`.
/// A size as `--capacity` takes it: with the largest unit that divides it.
fn size_text(bytes: u64) -> String {
    for (unit, size) in [("G", 1u64 << 30), ("M", 1 << 20), ("K", 1 << 10)] {
        if bytes.is_multiple_of(size) {
            return format!("{}{unit}", bytes / size);
        }
    }
    bytes.to_string()
}

pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let unit = t[i..].to_ascii_uppercase();
            let mult = match unit.trim_end_matches("IB").trim_end_matches('B') {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                _ => {
                    return Err(bad(
                        "capacity",
                        format!("`{s}` has an unknown unit"),
                        "use K, M or G, e.g. 256M",
                    ));
                }
            };
            (&t[..i], mult)
        }
        None => (t, 1),
    };
    let too_large = || {
        bad(
            "capacity",
            format!("`{s}` is too large (more than 2^64 bytes)"),
            "use a size below the machine's memory, e.g. 256M",
        )
    };
    let n: u64 = num.trim().parse().map_err(|e: std::num::ParseIntError| {
        if *e.kind() == std::num::IntErrorKind::PosOverflow {
            too_large()
        } else {
            bad("capacity", format!("`{s}` is not a size"), "e.g. 256M")
        }
    })?;
    // Checked: a wrapped product would silently give another size (17179869185G was 1G).
    n.checked_mul(mult).ok_or_else(too_large)
}

pub fn parse_cidr(s: &str) -> Result<Cidr> {
    let fix = "use CIDR notation, e.g. 10.0.0.0/8 or 2001:db8::/32";
    let (a, p) = s.trim().split_once('/').unwrap_or((s.trim(), ""));
    let addr: std::net::IpAddr = a
        .parse()
        .map_err(|_| bad("allow", format!("`{s}` is not an address"), fix))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = if p.is_empty() {
        max
    } else {
        p.parse()
            .map_err(|_| bad("allow", format!("`{s}` has a bad prefix"), fix))?
    };
    if prefix > max {
        return Err(bad(
            "allow",
            format!("`{s}` prefix is longer than {max}"),
            fix,
        ));
    }
    Ok(Cidr { addr, prefix })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(iface: &str, mc: &str) -> RunArgs {
        RunArgs {
            iface: Some(iface.into()),
            memcached: Some(mc.into()),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_resolve() {
        let s = Settings::resolve(&args("eth1", "127.0.0.1:11211")).unwrap();
        assert_eq!(s.udp_port, 11211);
        assert_eq!(s.xdp_mode, XdpMode::Native);
        // 64 MiB of buckets plus the per-key bookkeeping (24 bytes per 2 slots).
        assert!(s.map_bytes() <= 96 << 20, "{}", s.map_bytes());
    }

    #[test]
    fn errors_name_the_field_and_the_fix() {
        let mut a = args("eth1", "127.0.0.1:11211");
        a.capacity = Some("12X".into());
        let e = Settings::resolve(&a).unwrap_err().to_string();
        assert!(e.contains("`capacity`") && e.contains("Fix:"), "{e}");
        let e = Settings::resolve(&RunArgs::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("`iface`"), "{e}");
    }

    #[test]
    fn file_fills_in_what_flags_leave_out() {
        let dir = std::env::temp_dir().join(format!("agent-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("agent.toml");
        std::fs::write(
            &path,
            "iface = \"from-file\"\nmemcached = \"127.0.0.1:1\"\ncapacity = \"2M\"\n",
        )
        .unwrap();
        let mut a = args("from-flag", "127.0.0.1:11211");
        a.config = Some(path);
        let s = Settings::resolve(&a).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(s.iface, "from-flag");
        assert_eq!(s.capacity_bytes, 2 << 20);
    }

    /// What `check-config` prints is a file `--config` takes, and it gives the same settings.
    #[test]
    fn printed_settings_read_back_as_the_same_settings() {
        let mut a = args("eth9", "[::1]:11311");
        a.udp_port = Some(11312);
        a.xdp_mode = Some("generic".into());
        a.capacity = Some("3G".into());
        a.class_shares = Some(vec![10, 20, 30, 40]);
        a.max_age = Some(2.5);
        a.write_settle_ms = Some(400);
        a.allow = Some(vec!["10.1.0.0/16".into(), "2001:db8::/32".into()]);
        a.hit_latency = Some(false);
        a.keep_on_exit = Some(true);
        a.log_format = Some("json".into());
        let printed = Settings::resolve(&a).unwrap();
        let path =
            std::env::temp_dir().join(format!("agent-cfg-print-{}.toml", std::process::id()));
        std::fs::write(&path, printed.to_toml()).unwrap();
        let read = Settings::resolve(&RunArgs {
            config: Some(path.clone()),
            ..Default::default()
        });
        let _ = std::fs::remove_file(&path);
        assert_eq!(read.unwrap(), printed);
        assert!(printed.to_toml().contains("capacity = \"3G\""));
    }

    fn resolve_err(a: &RunArgs) -> String {
        Settings::resolve(a).unwrap_err().to_string()
    }

    #[test]
    fn write_settle_outside_50_ms_to_a_minute_is_refused() {
        for ms in [0, 1, 49] {
            let mut a = args("eth1", "127.0.0.1:11211");
            a.write_settle_ms = Some(ms);
            let e = resolve_err(&a);
            assert!(
                e.contains("`write-settle-ms`")
                    && e.contains("at least 50 ms")
                    && e.contains("250"),
                "{e}"
            );
        }
        for ms in [60_001, u64::MAX] {
            let mut a = args("eth1", "127.0.0.1:11211");
            a.write_settle_ms = Some(ms);
            let e = resolve_err(&a);
            assert!(
                e.contains("`write-settle-ms`") && e.contains("too long") && e.contains("60000"),
                "{e}"
            );
        }
        for ms in [50, 60_000] {
            let mut a = args("eth1", "127.0.0.1:11211");
            a.write_settle_ms = Some(ms);
            let s = Settings::resolve(&a).unwrap();
            assert_eq!(s.write_settle, Duration::from_millis(ms));
        }
    }

    #[test]
    fn a_capacity_whose_maps_take_over_half_the_machine_is_refused() {
        let meminfo = "MemTotal:       24683784 kB\nMemFree:        21462580 kB\n";
        assert_eq!(parse_mem_total(meminfo), Some(24683784 * 1024));
        assert_eq!(parse_mem_total("MemFree: 1 kB\n"), None);
        let e = check_fits_memory("2000G", 2001 << 30, Some(24 << 30))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`capacity`") && e.contains("`2000G`") && e.contains("24.0 GiB"),
            "{e}"
        );
        assert!(check_fits_memory("2000G", 2001 << 30, None).is_ok());
        assert!(check_fits_memory("1G", 1 << 30, Some(24 << 30)).is_ok());
        assert!(check_fits_memory("8G", 12 << 30, Some(24 << 30)).is_ok());
        let e = check_fits_memory("9G", (12 << 30) + 1, Some(24 << 30))
            .unwrap_err()
            .to_string();
        assert!(e.contains("more than half"), "{e}");
        // Through resolve, on any machine with less than 2000 GiB.
        if mem_total().is_some_and(|m| m < 2000 << 30) {
            let mut a = args("eth1", "127.0.0.1:11211");
            a.capacity = Some("2000G".into());
            let e = resolve_err(&a);
            assert!(e.contains("`capacity`") && e.contains("MemTotal"), "{e}");
        }
    }

    #[test]
    fn overflowing_sizes_are_errors() {
        for s in ["17179869185G", "17179869184G", "18446744073709551616"] {
            let e = parse_size(s).unwrap_err().to_string();
            assert!(
                e.contains("`capacity`") && e.contains(s) && e.contains("too large"),
                "{e}"
            );
        }
        assert_eq!(
            parse_size("17179869183G").unwrap(),
            u64::MAX - (1 << 30) + 1
        );
        assert_eq!(parse_size("18446744073709551615").unwrap(), u64::MAX);
        // The largest size does not overflow the per-class arithmetic either.
        let mut a = args("eth1", "127.0.0.1:11211");
        a.capacity = Some("17179869183G".into());
        let _ = Settings::resolve(&a);
    }

    #[test]
    fn memcached_port_0_names_memcached() {
        let e = resolve_err(&args("eth1", "198.18.231.1:0"));
        assert!(
            e.contains("`memcached`") && !e.contains("udp-port") && e.contains("port 0"),
            "{e}"
        );
    }

    #[test]
    fn an_unresolvable_name_is_not_called_malformed() {
        let e = resolve_err(&args("eth1", "nosuchhost.invalid:11211"));
        assert!(
            e.contains("`memcached`")
                && e.contains("could not be resolved")
                && !e.contains("is not HOST:PORT"),
            "{e}"
        );
        for bad in ["nonsense", "host:port", ":11211", "127.0.0.1"] {
            let e = resolve_err(&args("eth1", bad));
            assert!(e.contains("is not HOST:PORT"), "{bad}: {e}");
        }
        let mut a = args("eth1", "127.0.0.1:11211");
        a.metrics_addr = Some("nosuchhost.invalid:9477".into());
        let e = resolve_err(&a);
        assert!(
            e.contains("`metrics-addr`") && e.contains("could not be resolved"),
            "{e}"
        );
    }

    #[test]
    fn a_missing_config_file_says_its_path_and_the_os_error_once() {
        let path = std::env::temp_dir().join(format!("agent-cfg-none-{}.toml", std::process::id()));
        let mut a = args("eth1", "127.0.0.1:11211");
        a.config = Some(path.clone());
        let e = Settings::resolve(&a).unwrap_err();
        // As main prints it: the whole chain.
        let text = format!("{:#}", anyhow::Error::from(e));
        let p = path.display().to_string();
        assert_eq!(text.matches(&p).count(), 1, "{text}");
        assert_eq!(
            text.matches("No such file or directory").count(),
            1,
            "{text}"
        );
        assert!(text.contains("Fix:"), "{text}");
    }

    #[test]
    fn max_age_0_is_refused_with_the_real_rule() {
        let mut a = args("eth1", "127.0.0.1:11211");
        a.max_age = Some(0.0);
        let e = resolve_err(&a);
        assert!(
            e.contains("`max-age`") && e.contains("more than 0") && !e.contains("between 0"),
            "{e}"
        );
        a.max_age = Some(86400.0);
        assert!(Settings::resolve(&a).is_ok());
        a.max_age = Some(86400.5);
        assert!(Settings::resolve(&a).is_err());
    }

    #[test]
    fn sizes_and_cidrs_parse() {
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_cidr("198.18.0.0/15").unwrap().prefix, 15);
        assert!(parse_cidr("198.18.0.0/33").is_err());
    }
}
