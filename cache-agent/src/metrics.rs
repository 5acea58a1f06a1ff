//! Every Prometheus metric the agent exports, declared once with its help text, and the
//! collector that builds them from the kernel's counters at scrape time.
//!
//! Conventions (Prometheus naming practice): one prefix, `memcache_accel_`; base units
//! (seconds, bytes); counters end in `_total`; totals and hits are separate metrics, never a
//! `result` label; labels come from small fixed vocabularies (`reason`, `source`, `class`,
//! `interface`, `mode`, `version`), and every combination is exported from the first scrape on,
//! as zero if need be.
//!
//! The kernel keeps per-CPU `u64` counters and log2 nanosecond histograms; nothing is cached in
//! user space: [`AgentCollector`] reads them under the `ebpf` lock on every scrape, and
//! [`families`] turns one reading into metric families (a pure function, tested below).

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use cache_common::{CLASS_COUNT, Counter, HISTOGRAM_BUCKETS, Histogram, SLOT_SIZES, WAYS};
use prometheus::{
    Encoder as _, Registry, TextEncoder,
    core::{Collector, Desc},
    proto::{self, LabelPair, MetricFamily, MetricType},
};

use crate::{
    coherence::Shared,
    config::XdpMode,
    kernel::{self, Snapshot},
};

/// What kind of metric a family is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One exported metric family: its full name, help text, type and label names.
#[derive(Clone, Copy, Debug)]
pub struct Family {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: Kind,
    pub labels: &'static [&'static str],
}

const fn counter(
    name: &'static str,
    labels: &'static [&'static str],
    help: &'static str,
) -> Family {
    Family {
        name,
        help,
        kind: Kind::Counter,
        labels,
    }
}

const fn gauge(name: &'static str, labels: &'static [&'static str], help: &'static str) -> Family {
    Family {
        name,
        help,
        kind: Kind::Gauge,
        labels,
    }
}

const fn histogram(name: &'static str, help: &'static str) -> Family {
    Family {
        name,
        help,
        kind: Kind::Histogram,
        labels: &[],
    }
}

pub const GET_REQUESTS: Family = counter(
    "memcache_accel_get_requests_total",
    &[],
    "UDP get requests parsed by the XDP hit path.",
);
pub const GET_KEYS: Family = counter(
    "memcache_accel_get_keys_total",
    &[],
    "Keys in the UDP get requests parsed by XDP (memcached's cmd_get counts keys the same way).",
);
pub const HIT_REQUESTS: Family = counter(
    "memcache_accel_hit_requests_total",
    &[],
    "UDP get requests answered entirely by the kernel (XDP_TX, or TC ingress for replies the XDP frame could not hold), never reaching memcached.",
);
pub const HIT_KEYS: Family = counter(
    "memcache_accel_hit_keys_total",
    &[],
    "Keys answered by the kernel; divide by memcache_accel_get_keys_total for the hit ratio.",
);
pub const TC_HIT_REQUESTS: Family = counter(
    "memcache_accel_tc_hit_requests_total",
    &[],
    "UDP get requests answered from TC ingress because the XDP frame had no room for the reply (a subset of hit_requests).",
);
pub const PASSED_REQUESTS: Family = counter(
    "memcache_accel_passed_requests_total",
    &["reason"],
    "UDP get requests passed to memcached, by why the kernel did not answer them.",
);
pub const FILLS: Family = counter(
    "memcache_accel_fills_total",
    &[],
    "Entries stored in the kernel cache from memcached's replies (TC egress).",
);
pub const FILL_REFUSED: Family = counter(
    "memcache_accel_fill_refused_total",
    &["reason"],
    "Replies from memcached the kernel did not store, by the coherence or size rule that refused them.",
);
pub const INVALIDATIONS: Family = counter(
    "memcache_accel_invalidations_total",
    &["source"],
    "Keys invalidated, by where the write was seen: text, meta or binary protocol on the wire, or memcached's watch stream.",
);
pub const FLUSHES: Family = counter(
    "memcache_accel_flushes_total",
    &["reason"],
    "Whole-cache flushes: flush_all seen on the wire, a TCP stream the kernel could not follow (unsynced), or an agent resync.",
);
pub const EVICTIONS: Family = counter(
    "memcache_accel_evictions_total",
    &[],
    "Valid entries replaced by a fill (the bucket's ways were full).",
);
pub const EXPIRED: Family = counter(
    "memcache_accel_expired_total",
    &[],
    "Lookups that found the key but did not serve it: expired, flushed, or waiting for the TTL the agent learns from memcached.",
);
pub const TCP_FLOWS_GUARDED: Family = counter(
    "memcache_accel_tcp_flows_guarded_total",
    &[],
    "TCP connections the write scanner lost its place in (opened before the agent, a segment lost inside a command line) and follows in guard mode: each flushes the cache on its segments until about memcached's item_size_max has passed on it.",
);
pub const TCP_SEGMENTS_SCANNED: Family = counter(
    "memcache_accel_tcp_segments_scanned_total",
    &[],
    "TCP segments with payload the kernel scanned for writes to memcached.",
);
pub const UDP_DATAGRAMS_SCANNED: Family = counter(
    "memcache_accel_udp_datagrams_scanned_total",
    &[],
    "UDP datagrams to memcached other than get requests the kernel scanned for writes.",
);
pub const TTL_QUERIES: Family = counter(
    "memcache_accel_ttl_queries_total",
    &[],
    "Entries filled without a TTL the kernel saw, queued for the agent to ask memcached (they live --max-age until answered).",
);
pub const TTL_ANSWERS: Family = counter(
    "memcache_accel_ttl_answers_total",
    &["result"],
    "What became of the TTL queries: installed (the entry lives as long as memcached's item), gone (the item or entry went first), raced (a write was seen since asking: not used), failed, ring_full or queue_full (not asked).",
);
pub const WARM_FILLS: Family = counter(
    "memcache_accel_warm_fills_total",
    &[],
    "Entries stored from memcached's own contents when the agent started (warm start).",
);
pub const CACHE_ENTRIES: Family = gauge(
    "memcache_accel_cache_entries",
    &["class"],
    "Slots holding an entry in the kernel cache, by size class (0..3: 128, 384, 768 and 1536-byte slots). A flush makes every entry dead at once without emptying slots: they count until a fill reuses them.",
);
pub const CACHE_BYTES: Family = gauge(
    "memcache_accel_cache_bytes",
    &["class"],
    "Slot bytes in use in the kernel cache, by size class (slots holding an entry, live or flushed, times slot size).",
);
pub const CACHE_CAPACITY_BYTES: Family = gauge(
    "memcache_accel_cache_capacity_bytes",
    &["class"],
    "Slot bytes the kernel cache can hold, by size class (buckets times ways times slot size).",
);
pub const LEASE_VALID: Family = gauge(
    "memcache_accel_lease_valid",
    &[],
    "1 while the kernel may serve hits (serving is on and the agent's lease has not run out), else 0.",
);
pub const LEASE_RENEWALS: Family = counter(
    "memcache_accel_lease_renewals_total",
    &[],
    "Times the agent renewed its lease in the kernel.",
);
pub const MEMCACHED_BACKLOGGED: Family = gauge(
    "memcache_accel_memcached_backlogged_connections",
    &[],
    "memcached connections holding fills at the last health check: a send queue at least half full (a client not taking its replies), or requests received before the previous check that memcached has not read yet (a stalled worker thread). While any is, fills pause: a write that client sent may be applied late.",
);
pub const MEMCACHED_UP: Family = gauge(
    "memcache_accel_memcached_up",
    &[],
    "1 if memcached answered the agent's last health check, else 0.",
);
pub const WATCH_CONNECTED: Family = gauge(
    "memcache_accel_watch_connected",
    &[],
    "1 while memcached's watch stream (the coherence backstop) is connected and in sync, or is turned off; else 0.",
);
pub const ATTACHED: Family = gauge(
    "memcache_accel_attached",
    &["interface", "mode"],
    "1 for the interface the XDP and TC programs are attached to, with the XDP mode (native or generic).",
);
pub const BUILD_INFO: Family = gauge(
    "memcache_accel_build_info",
    &["version"],
    "Always 1; the agent's version as a label.",
);
pub const KERNEL_READ_ERRORS: Family = counter(
    "memcache_accel_kernel_read_errors_total",
    &[],
    "Scrapes at which the kernel's maps could not be read (the kernel metrics are missing from those scrapes).",
);
pub const HIT_DURATION: Family = histogram(
    "memcache_accel_hit_duration_seconds",
    "Time the XDP hit path spent on requests it answered (log2 buckets; one get in 64 is timed; empty unless hit latency timing is on).",
);
pub const MISS_SERVICE_DURATION: Family = histogram(
    "memcache_accel_miss_service_duration_seconds",
    "memcached's service time for kernel misses, from XDP ingress of the get to TC egress of its reply (log2 buckets; one get in 64 is timed).",
);

/// Every family the agent exports (the registry sorts them by name).
pub const FAMILIES: [Family; 31] = [
    GET_REQUESTS,
    GET_KEYS,
    HIT_REQUESTS,
    HIT_KEYS,
    TC_HIT_REQUESTS,
    PASSED_REQUESTS,
    FILLS,
    FILL_REFUSED,
    INVALIDATIONS,
    FLUSHES,
    EVICTIONS,
    EXPIRED,
    TCP_SEGMENTS_SCANNED,
    TCP_FLOWS_GUARDED,
    UDP_DATAGRAMS_SCANNED,
    TTL_QUERIES,
    TTL_ANSWERS,
    WARM_FILLS,
    CACHE_ENTRIES,
    CACHE_BYTES,
    CACHE_CAPACITY_BYTES,
    LEASE_VALID,
    LEASE_RENEWALS,
    MEMCACHED_BACKLOGGED,
    MEMCACHED_UP,
    WATCH_CONNECTED,
    ATTACHED,
    BUILD_INFO,
    KERNEL_READ_ERRORS,
    HIT_DURATION,
    MISS_SERVICE_DURATION,
];

const fn family_names<const N: usize>(families: &[Family; N]) -> [&'static str; N] {
    let mut out = [""; N];
    let mut i = 0;
    while i < N {
        out[i] = families[i].name;
        i += 1;
    }
    out
}

const NAMES: [&str; FAMILIES.len()] = family_names(&FAMILIES);

/// Every exported family name (histograms by their base name, without `_bucket`, `_sum` or
/// `_count`). Dashboards and alert rules may only use these.
pub const METRIC_NAMES: &[&str] = &NAMES;

/// A kernel counter exported as one series of a family (`label` is the value of the family's
/// only label, or empty).
#[derive(Clone, Copy, Debug)]
pub struct CounterSeries {
    pub counter: Counter,
    pub family: Family,
    pub label: &'static str,
}

const fn series(counter: Counter, family: Family, label: &'static str) -> CounterSeries {
    CounterSeries {
        counter,
        family,
        label,
    }
}

/// Every kernel counter except the per-class slot counters (those become the cache gauges).
pub const KERNEL_COUNTERS: [CounterSeries; 38] = [
    series(Counter::GetRequests, GET_REQUESTS, ""),
    series(Counter::GetKeys, GET_KEYS, ""),
    series(Counter::HitRequests, HIT_REQUESTS, ""),
    series(Counter::HitKeys, HIT_KEYS, ""),
    series(Counter::HitRequestsTc, TC_HIT_REQUESTS, ""),
    series(Counter::PassMiss, PASSED_REQUESTS, "miss"),
    series(Counter::PassPartial, PASSED_REQUESTS, "partial"),
    series(Counter::PassTooBig, PASSED_REQUESTS, "too_big"),
    series(Counter::PassUnsupported, PASSED_REQUESTS, "unsupported"),
    series(Counter::PassMalformed, PASSED_REQUESTS, "malformed"),
    series(Counter::PassNoLease, PASSED_REQUESTS, "no_lease"),
    series(Counter::PassDenied, PASSED_REQUESTS, "denied"),
    series(Counter::PassAmplification, PASSED_REQUESTS, "amplification"),
    series(Counter::PassNoRoom, PASSED_REQUESTS, "no_room"),
    series(Counter::PassContended, PASSED_REQUESTS, "contended"),
    series(Counter::Fills, FILLS, ""),
    series(Counter::FillRefusedNoTicket, FILL_REFUSED, "no_ticket"),
    series(Counter::FillRefusedRace, FILL_REFUSED, "race"),
    series(Counter::FillRefusedEpoch, FILL_REFUSED, "epoch"),
    series(Counter::FillRefusedHold, FILL_REFUSED, "hold"),
    series(Counter::FillRefusedCas, FILL_REFUSED, "cas"),
    series(
        Counter::FillRefusedMultiDatagram,
        FILL_REFUSED,
        "multi_datagram",
    ),
    series(Counter::FillRefusedTooBig, FILL_REFUSED, "too_big"),
    series(Counter::FillRefusedMalformed, FILL_REFUSED, "malformed"),
    series(Counter::FillRefusedStall, FILL_REFUSED, "stall"),
    series(Counter::InvalidateText, INVALIDATIONS, "text"),
    series(Counter::InvalidateMeta, INVALIDATIONS, "meta"),
    series(Counter::InvalidateBinary, INVALIDATIONS, "binary"),
    series(Counter::FlushAll, FLUSHES, "flush_all"),
    series(Counter::FlushUnsynced, FLUSHES, "unsynced"),
    series(Counter::Evictions, EVICTIONS, ""),
    series(Counter::TcpSegments, TCP_SEGMENTS_SCANNED, ""),
    series(Counter::TcpFlowsGuarded, TCP_FLOWS_GUARDED, ""),
    series(Counter::UdpOther, UDP_DATAGRAMS_SCANNED, ""),
    series(Counter::Expired, EXPIRED, ""),
    series(Counter::TtlQueries, TTL_QUERIES, ""),
    series(Counter::TtlQueriesDropped, TTL_ANSWERS, "ring_full"),
    series(Counter::WarmFills, WARM_FILLS, ""),
];

/// Label value the agent's own invalidations (from the watch stream) carry.
pub const WATCH_SOURCE: &str = "watch";
/// Label value of flushes the agent makes itself (resyncs).
pub const AGENT_FLUSH_REASON: &str = "agent";

/// Label values of the agent's own [`TTL_ANSWERS`] series, in [`View::ttl_answers`] order.
pub const TTL_ANSWER_LABELS: [&str; 5] = ["installed", "gone", "raced", "failed", "queue_full"];

/// What one scrape knows: the kernel's counters (if they could be read) and the agent's state.
#[derive(Debug, Clone)]
pub struct View {
    pub snapshot: Option<Snapshot>,
    pub lease_valid: bool,
    pub memcached_up: bool,
    pub watch_connected: bool,
    pub resyncs: u64,
    pub watch_invalidations: u64,
    pub lease_renewals: u64,
    pub backlogged_connections: u64,
    /// The agent's TTL answers: installed, gone, raced, failed, queue_full.
    pub ttl_answers: [u64; 5],
    pub interface: String,
    pub mode: &'static str,
    pub kernel_read_errors: u64,
}

/// The `mode` label of [`ATTACHED`].
pub fn mode_label(mode: XdpMode) -> &'static str {
    match mode {
        XdpMode::Native => "native",
        XdpMode::Generic => "generic",
    }
}

/// Upper bound, in seconds, of kernel histogram bucket `i` (samples in `[2^i, 2^(i+1))` ns).
pub fn bucket_upper_bound_seconds(i: usize) -> f64 {
    (1u64 << (i + 1)) as f64 / 1e9
}

/// A kernel log2 histogram as a Prometheus histogram in seconds. The kernel's last bucket also
/// holds every larger sample, so it becomes the `+Inf` bucket.
pub fn to_prometheus_histogram(h: &Histogram) -> proto::Histogram {
    let mut out = proto::Histogram::default();
    let mut cumulative = 0u64;
    let mut buckets = Vec::with_capacity(HISTOGRAM_BUCKETS - 1);
    for i in 0..HISTOGRAM_BUCKETS - 1 {
        cumulative = cumulative.saturating_add(h.buckets[i]);
        let mut b = proto::Bucket::default();
        b.set_upper_bound(bucket_upper_bound_seconds(i));
        b.set_cumulative_count(cumulative);
        buckets.push(b);
    }
    out.set_bucket(buckets);
    out.set_sample_count(cumulative.saturating_add(h.buckets[HISTOGRAM_BUCKETS - 1]));
    out.set_sample_sum(h.sum_ns as f64 / 1e9);
    out
}

/// Builds metric families one sample at a time, keeping [`FAMILIES`] order.
struct Builder {
    families: Vec<MetricFamily>,
}

impl Builder {
    fn new() -> Self {
        Builder {
            families: Vec::with_capacity(FAMILIES.len()),
        }
    }

    fn family(&mut self, f: &Family) -> &mut MetricFamily {
        if let Some(i) = self.families.iter().position(|m| m.name() == f.name) {
            return &mut self.families[i];
        }
        let mut mf = MetricFamily::default();
        mf.set_name(f.name.to_string());
        mf.set_help(f.help.to_string());
        mf.set_field_type(match f.kind {
            Kind::Counter => MetricType::COUNTER,
            Kind::Gauge => MetricType::GAUGE,
            Kind::Histogram => MetricType::HISTOGRAM,
        });
        self.families.push(mf);
        self.families.last_mut().expect("just pushed")
    }

    fn labels(f: &Family, values: &[&str]) -> Vec<LabelPair> {
        debug_assert_eq!(f.labels.len(), values.len(), "{}", f.name);
        f.labels
            .iter()
            .zip(values)
            .map(|(name, value)| {
                let mut lp = LabelPair::default();
                lp.set_name(name.to_string());
                lp.set_value(value.to_string());
                lp
            })
            .collect()
    }

    fn counter(&mut self, f: &Family, labels: &[&str], value: u64) {
        let mut m = proto::Metric::from_label(Self::labels(f, labels));
        let mut c = proto::Counter::default();
        c.set_value(value as f64);
        m.set_counter(c);
        self.family(f).mut_metric().push(m);
    }

    fn gauge(&mut self, f: &Family, labels: &[&str], value: f64) {
        let mut m = proto::Metric::from_label(Self::labels(f, labels));
        let mut g = proto::Gauge::default();
        g.set_value(value);
        m.set_gauge(g);
        self.family(f).mut_metric().push(m);
    }

    fn histogram(&mut self, f: &Family, h: &Histogram) {
        let mut m = proto::Metric::default();
        m.set_histogram(to_prometheus_histogram(h));
        self.family(f).mut_metric().push(m);
    }
}

fn bool_gauge(b: bool) -> f64 {
    if b { 1.0 } else { 0.0 }
}

/// Every family for one scrape. Without a snapshot the kernel families are left out (and
/// [`KERNEL_READ_ERRORS`] tells why); the agent's own metrics are always there.
pub fn families(view: &View) -> Vec<MetricFamily> {
    let mut b = Builder::new();
    if let Some(snap) = &view.snapshot {
        for s in &KERNEL_COUNTERS {
            let labels: &[&str] = if s.label.is_empty() { &[] } else { &[s.label] };
            b.counter(&s.family, labels, snap.counters[s.counter as usize]);
        }
        let classes: [String; CLASS_COUNT] = std::array::from_fn(|c| c.to_string());
        for (c, class) in classes.iter().enumerate() {
            let filled = snap.counters[Counter::SLOTS_FILLED[c] as usize];
            let cleared = snap.counters[Counter::SLOTS_CLEARED[c] as usize];
            // Per-CPU sums are not read atomically: a clear may be seen before its fill.
            let entries = filled.saturating_sub(cleared);
            b.gauge(&CACHE_ENTRIES, &[class], entries as f64);
            b.gauge(
                &CACHE_BYTES,
                &[class],
                (entries * SLOT_SIZES[c] as u64) as f64,
            );
            let capacity = snap.config.class_buckets[c] as u64 * WAYS as u64 * SLOT_SIZES[c] as u64;
            b.gauge(&CACHE_CAPACITY_BYTES, &[class], capacity as f64);
        }
        b.histogram(&HIT_DURATION, &snap.hit_latency);
        b.histogram(&MISS_SERVICE_DURATION, &snap.miss_latency);
    }
    // The agent's own series of two kernel families.
    b.counter(&INVALIDATIONS, &[WATCH_SOURCE], view.watch_invalidations);
    b.counter(&FLUSHES, &[AGENT_FLUSH_REASON], view.resyncs);
    for (label, n) in TTL_ANSWER_LABELS.iter().zip(view.ttl_answers) {
        b.counter(&TTL_ANSWERS, &[label], n);
    }
    b.gauge(&LEASE_VALID, &[], bool_gauge(view.lease_valid));
    b.counter(&LEASE_RENEWALS, &[], view.lease_renewals);
    b.gauge(
        &MEMCACHED_BACKLOGGED,
        &[],
        view.backlogged_connections as f64,
    );
    b.gauge(&MEMCACHED_UP, &[], bool_gauge(view.memcached_up));
    b.gauge(&WATCH_CONNECTED, &[], bool_gauge(view.watch_connected));
    b.gauge(&ATTACHED, &[&view.interface, view.mode], 1.0);
    b.gauge(&BUILD_INFO, &[env!("CARGO_PKG_VERSION")], 1.0);
    b.counter(&KERNEL_READ_ERRORS, &[], view.kernel_read_errors);
    b.families
}

/// Text exposition format 0.0.4 of `families`.
pub fn encode(families: &[MetricFamily]) -> prometheus::Result<String> {
    let mut buf = Vec::new();
    TextEncoder::new().encode(families, &mut buf)?;
    String::from_utf8(buf).map_err(|e| prometheus::Error::Msg(e.to_string()))
}

/// Content type of [`encode`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Prometheus descriptors of [`FAMILIES`] (validates every name and label name).
pub fn descs() -> prometheus::Result<Vec<Desc>> {
    FAMILIES
        .iter()
        .map(|f| {
            Desc::new(
                f.name.to_string(),
                f.help.to_string(),
                f.labels.iter().map(|l| l.to_string()).collect(),
                Default::default(),
            )
        })
        .collect()
}

/// Reads the kernel and the agent's state on every `collect` (every scrape).
pub struct AgentCollector {
    shared: Arc<Shared>,
    descs: Vec<Desc>,
    read_errors: AtomicU64,
}

impl AgentCollector {
    pub fn new(shared: Arc<Shared>) -> prometheus::Result<Self> {
        Ok(AgentCollector {
            shared,
            descs: descs()?,
            read_errors: AtomicU64::new(0),
        })
    }

    /// One reading. Blocks on the `ebpf` lock and reads three small per-CPU maps.
    pub fn view(&self) -> View {
        let snapshot = {
            // A task that panicked while holding the lock left the maps as they were: read on.
            let ebpf = self.shared.ebpf.lock().unwrap_or_else(|p| p.into_inner());
            kernel::snapshot(&ebpf)
        };
        let snapshot = match snapshot {
            Ok(s) => Some(s),
            Err(e) => {
                self.read_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "could not read the kernel's counters for /metrics");
                None
            }
        };
        let s = &self.shared;
        View {
            snapshot,
            lease_valid: s.lease_valid(),
            memcached_up: s.memcached_ok.load(Ordering::Relaxed),
            watch_connected: s.watch_ok.load(Ordering::Relaxed),
            resyncs: s.resyncs.load(Ordering::Relaxed),
            watch_invalidations: s.watch_invalidations.load(Ordering::Relaxed),
            lease_renewals: s.lease_renewals.load(Ordering::Relaxed),
            backlogged_connections: s.backlogged_connections.load(Ordering::Relaxed),
            ttl_answers: [
                &s.ttl.installed,
                &s.ttl.gone,
                &s.ttl.raced,
                &s.ttl.failed,
                &s.ttl.dropped,
            ]
            .map(|c| c.load(Ordering::Relaxed)),
            interface: s.settings.iface.clone(),
            mode: mode_label(s.settings.xdp_mode),
            kernel_read_errors: self.read_errors.load(Ordering::Relaxed),
        }
    }
}

impl Collector for AgentCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        families(&self.view())
    }
}

/// A registry holding the agent's collector; `gather` on it reads the kernel.
pub fn registry(shared: Arc<Shared>) -> prometheus::Result<Registry> {
    let registry = Registry::new();
    registry.register(Box::new(AgentCollector::new(shared)?))?;
    Ok(registry)
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet, HashSet};

    use cache_common::{COUNTER_COUNT, Config, State};

    use super::*;

    /// One parsed sample line: name, labels, value.
    type Sample = (String, BTreeMap<String, String>, f64);

    /// A strict little parser for the text format: `# HELP`/`# TYPE` lines and samples
    /// `name{a="b",...} value`; panics on anything else.
    fn parse(text: &str) -> (BTreeMap<String, String>, Vec<Sample>) {
        let mut types = BTreeMap::new();
        let mut samples = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, ty) = rest.split_once(' ').expect("TYPE line");
                assert!(
                    types.insert(name.to_string(), ty.to_string()).is_none(),
                    "TYPE twice: {name}"
                );
                continue;
            }
            if line.starts_with("# HELP ") {
                continue;
            }
            assert!(
                !line.is_empty() && !line.starts_with('#'),
                "unexpected line {line:?}"
            );
            let (series, value) = line.rsplit_once(' ').expect("sample line");
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                v => v
                    .parse()
                    .unwrap_or_else(|_| panic!("bad value in {line:?}")),
            };
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => {
                    let inner = rest.strip_suffix('}').expect("closing brace");
                    let labels = inner
                        .split(',')
                        .filter(|p| !p.is_empty())
                        .map(|p| {
                            let (k, v) = p.split_once('=').expect("label pair");
                            let v = v
                                .strip_prefix('"')
                                .and_then(|v| v.strip_suffix('"'))
                                .expect("quoted");
                            (k.to_string(), v.to_string())
                        })
                        .collect();
                    (name, labels)
                }
                None => (series, BTreeMap::new()),
            };
            assert!(
                name.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_')
                    && name.starts_with("memcache_accel_"),
                "bad name {name}"
            );
            samples.push((name.to_string(), labels, value));
        }
        (types, samples)
    }

    fn view(snapshot: Option<Snapshot>) -> View {
        View {
            snapshot,
            lease_valid: true,
            memcached_up: true,
            watch_connected: false,
            resyncs: 3,
            watch_invalidations: 7,
            lease_renewals: 11,
            backlogged_connections: 0,
            ttl_answers: [1, 2, 3, 4, 5],
            interface: "eth1".into(),
            mode: "native",
            kernel_read_errors: 0,
        }
    }

    fn snapshot() -> Snapshot {
        let mut counters = [0u64; COUNTER_COUNT];
        for (i, c) in counters.iter_mut().enumerate() {
            *c = 1000 + i as u64;
        }
        counters[Counter::SlotsFilled1 as usize] = 50;
        counters[Counter::SlotsCleared1 as usize] = 20;
        // A clear seen before its fill must not go negative.
        counters[Counter::SlotsFilled2 as usize] = 5;
        counters[Counter::SlotsCleared2 as usize] = 6;
        let mut hit = Histogram::default();
        hit.buckets[9] = 4; // [512, 1024) ns
        hit.buckets[10] = 6; // [1024, 2048) ns
        hit.buckets[31] = 1; // the overflow bucket
        hit.sum_ns = 4 * 600 + 6 * 1500 + 5_000_000_000;
        let config = Config {
            class_buckets: [10, 20, 30, 40],
            ..Config::default()
        };
        Snapshot {
            counters,
            hit_latency: hit,
            miss_latency: Histogram::default(),
            config,
            state: State::default(),
        }
    }

    fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let found: Vec<_> = samples
            .iter()
            .filter(|(n, l, _)| n == name && *l == want)
            .collect();
        assert_eq!(found.len(), 1, "{name} {labels:?}: {found:?}");
        found[0].2
    }

    #[test]
    fn every_family_is_listed_once() {
        let unique: HashSet<&str> = FAMILIES.iter().map(|f| f.name).collect();
        assert_eq!(
            unique.len(),
            FAMILIES.len(),
            "FAMILIES lists a family twice"
        );
        assert_eq!(METRIC_NAMES.len(), FAMILIES.len());
        assert_eq!(METRIC_NAMES.iter().copied().collect::<HashSet<_>>(), unique);
        for f in &FAMILIES {
            assert!(f.name.starts_with("memcache_accel_"), "{}", f.name);
            assert_eq!(
                f.kind == Kind::Counter,
                f.name.ends_with("_total"),
                "{}",
                f.name
            );
            assert!(!f.help.is_empty());
        }
        descs().expect("valid names");
    }

    #[test]
    fn every_kernel_counter_is_exported_once() {
        let mut seen: BTreeSet<usize> =
            KERNEL_COUNTERS.iter().map(|s| s.counter as usize).collect();
        assert_eq!(
            seen.len(),
            KERNEL_COUNTERS.len(),
            "a counter is mapped twice"
        );
        seen.extend(Counter::SLOTS_FILLED.iter().map(|&c| c as usize));
        seen.extend(Counter::SLOTS_CLEARED.iter().map(|&c| c as usize));
        assert_eq!(
            seen,
            (0..COUNTER_COUNT).collect(),
            "a kernel counter has no metric"
        );
        for s in &KERNEL_COUNTERS {
            assert_eq!(
                s.family.labels.len(),
                usize::from(!s.label.is_empty()),
                "{:?}",
                s.counter
            );
        }
    }

    #[test]
    fn exposition_parses_and_has_every_family() {
        let text = encode(&families(&view(Some(snapshot())))).unwrap();
        let (types, samples) = parse(&text);
        let exported: BTreeSet<&str> = types.keys().map(String::as_str).collect();
        assert_eq!(exported, METRIC_NAMES.iter().copied().collect());
        for f in &FAMILIES {
            let want = match f.kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
                Kind::Histogram => "histogram",
            };
            assert_eq!(types[f.name], want, "{}", f.name);
        }
        // Counters carry the kernel's values.
        assert_eq!(
            value(&samples, "memcache_accel_get_requests_total", &[]),
            1000.0
        );
        assert_eq!(
            value(&samples, "memcache_accel_hit_keys_total", &[]),
            1003.0
        );
        let pass_no_room = 1000.0 + Counter::PassNoRoom as u64 as f64;
        assert_eq!(
            value(
                &samples,
                "memcache_accel_passed_requests_total",
                &[("reason", "no_room")]
            ),
            pass_no_room
        );
        assert_eq!(
            value(
                &samples,
                "memcache_accel_invalidations_total",
                &[("source", "watch")]
            ),
            7.0
        );
        assert_eq!(
            value(
                &samples,
                "memcache_accel_flushes_total",
                &[("reason", "agent")]
            ),
            3.0
        );
        assert_eq!(
            value(&samples, "memcache_accel_lease_renewals_total", &[]),
            11.0
        );
        // Every reason is there from the start.
        let reasons = samples
            .iter()
            .filter(|(n, _, _)| n == "memcache_accel_passed_requests_total")
            .count();
        assert_eq!(reasons, 10);
        assert_eq!(
            samples
                .iter()
                .filter(|(n, _, _)| n == "memcache_accel_fill_refused_total")
                .count(),
            9
        );
        // Cache gauges.
        assert_eq!(
            value(&samples, "memcache_accel_cache_entries", &[("class", "1")]),
            30.0
        );
        assert_eq!(
            value(&samples, "memcache_accel_cache_bytes", &[("class", "1")]),
            30.0 * 384.0
        );
        assert_eq!(
            value(&samples, "memcache_accel_cache_entries", &[("class", "2")]),
            0.0
        );
        let cap = 40.0 * WAYS as f64 * 1536.0;
        assert_eq!(
            value(
                &samples,
                "memcache_accel_cache_capacity_bytes",
                &[("class", "3")]
            ),
            cap
        );
        // State and info.
        assert_eq!(value(&samples, "memcache_accel_lease_valid", &[]), 1.0);
        assert_eq!(value(&samples, "memcache_accel_watch_connected", &[]), 0.0);
        let attached = [("interface", "eth1"), ("mode", "native")];
        assert_eq!(value(&samples, "memcache_accel_attached", &attached), 1.0);
        let version = [("version", env!("CARGO_PKG_VERSION"))];
        assert_eq!(value(&samples, "memcache_accel_build_info", &version), 1.0);
    }

    #[test]
    fn histograms_are_cumulative_in_seconds() {
        let text = encode(&families(&view(Some(snapshot())))).unwrap();
        let (_, samples) = parse(&text);
        let name = "memcache_accel_hit_duration_seconds";
        let buckets: Vec<(f64, f64)> = samples
            .iter()
            .filter(|(n, _, _)| *n == format!("{name}_bucket"))
            .map(|(_, l, v)| {
                let le = &l["le"];
                (
                    if le == "+Inf" {
                        f64::INFINITY
                    } else {
                        le.parse().unwrap()
                    },
                    *v,
                )
            })
            .collect();
        assert_eq!(buckets.len(), HISTOGRAM_BUCKETS);
        assert!(
            buckets
                .windows(2)
                .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
            "{buckets:?}"
        );
        assert_eq!(buckets[0].0, 2e-9);
        // Bucket 9 holds [512, 1024) ns: everything at or below le = 1.024 µs.
        let at = |le: f64| buckets.iter().find(|b| (b.0 - le).abs() < 1e-15).unwrap().1;
        assert_eq!(at(512e-9), 0.0);
        assert_eq!(at(1024e-9), 4.0);
        assert_eq!(at(2048e-9), 10.0);
        assert_eq!(buckets[HISTOGRAM_BUCKETS - 2].0, (1u64 << 31) as f64 / 1e9);
        assert_eq!(buckets.last().unwrap(), &(f64::INFINITY, 11.0));
        assert_eq!(value(&samples, &format!("{name}_count"), &[]), 11.0);
        let sum = value(&samples, &format!("{name}_sum"), &[]);
        assert!((sum - 5.0000114).abs() < 1e-9, "{sum}");
        // An empty histogram still has all its buckets.
        let empty = "memcache_accel_miss_service_duration_seconds_bucket";
        assert_eq!(
            samples.iter().filter(|(n, _, _)| n == empty).count(),
            HISTOGRAM_BUCKETS
        );
    }

    #[test]
    fn without_the_kernel_only_agent_metrics_remain() {
        let mut v = view(None);
        v.kernel_read_errors = 2;
        let text = encode(&families(&v)).unwrap();
        let (types, samples) = parse(&text);
        assert!(!types.contains_key("memcache_accel_get_keys_total"));
        assert_eq!(
            value(&samples, "memcache_accel_kernel_read_errors_total", &[]),
            2.0
        );
        assert_eq!(value(&samples, "memcache_accel_memcached_up", &[]), 1.0);
    }

    #[test]
    fn label_values_are_escaped() {
        let mut v = view(None);
        v.interface = "we\"ird\\".into();
        let text = encode(&families(&v)).unwrap();
        assert!(text.contains(r#"interface="we\"ird\\""#), "{text}");
    }
}
