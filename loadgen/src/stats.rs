//! Latency and outcome recording: per-worker [`Recorder`]s (an HDR histogram of latencies in
//! nanoseconds, outcome counters per verb, a completions timeline), merged into a [`Summary`]
//! at the end. Only requests whose intended start lies inside the measurement window are
//! recorded; the timeline covers the whole run, warm-up included.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::proto::{Reply, ReplyKind};
use crate::workload::Verb;

/// Highest latency the histograms track (60 s); larger values are clamped.
pub const MAX_LATENCY_NS: u64 = 60_000_000_000;
/// Significant decimal digits of the histograms.
pub const SIGFIGS: u8 = 3;

/// A latency histogram in nanoseconds.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_NS, SIGFIGS).expect("static bounds are valid")
}

/// Outcome counters.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Counters {
    /// Requests sent (one per wire request; a multi-get split over servers counts once per server).
    pub sent: u64,
    /// Requests answered.
    pub completed: u64,
    /// GET requests answered.
    pub get_requests: u64,
    /// Keys asked for by answered GETs.
    pub get_keys: u64,
    /// Keys that returned a value.
    pub get_hits: u64,
    /// Keys that did not.
    pub get_misses: u64,
    /// SETs answered.
    pub set_requests: u64,
    /// SETs stored.
    pub set_stored: u64,
    /// SETs not stored.
    pub set_not_stored: u64,
    /// DELETEs answered.
    pub delete_requests: u64,
    /// DELETEs that removed a key.
    pub delete_deleted: u64,
    /// DELETEs of absent keys.
    pub delete_not_found: u64,
    /// Replies that were server errors or unparseable.
    pub errors: u64,
    /// Requests without a complete reply within the timeout (UDP loss, or a stalled connection).
    pub timeouts: u64,
    /// Datagrams for unknown or already expired request ids.
    pub late_datagrams: u64,
    /// Open loop: requests never sent because the connection's backlog was full.
    pub dropped: u64,
}

impl Counters {
    /// Adds `o` field by field.
    pub fn add(&mut self, o: &Counters) {
        self.sent += o.sent;
        self.completed += o.completed;
        self.get_requests += o.get_requests;
        self.get_keys += o.get_keys;
        self.get_hits += o.get_hits;
        self.get_misses += o.get_misses;
        self.set_requests += o.set_requests;
        self.set_stored += o.set_stored;
        self.set_not_stored += o.set_not_stored;
        self.delete_requests += o.delete_requests;
        self.delete_deleted += o.delete_deleted;
        self.delete_not_found += o.delete_not_found;
        self.errors += o.errors;
        self.timeouts += o.timeouts;
        self.late_datagrams += o.late_datagrams;
        self.dropped += o.dropped;
    }

    fn count_reply(&mut self, verb: Verb, nkeys: usize, reply: &Reply) {
        self.completed += 1;
        if reply.kind == ReplyKind::Error {
            self.errors += 1;
        }
        match verb {
            Verb::Get => {
                self.get_requests += 1;
                self.get_keys += nkeys as u64;
                let hits = (reply.hits as u64).min(nkeys as u64);
                self.get_hits += hits;
                self.get_misses += nkeys as u64 - hits;
            }
            Verb::Set => {
                self.set_requests += 1;
                match reply.kind {
                    ReplyKind::Stored => self.set_stored += 1,
                    ReplyKind::Error => {}
                    _ => self.set_not_stored += 1,
                }
            }
            Verb::Delete => {
                self.delete_requests += 1;
                match reply.kind {
                    ReplyKind::Deleted => self.delete_deleted += 1,
                    ReplyKind::NotFound => self.delete_not_found += 1,
                    _ => {}
                }
            }
        }
    }

    /// Hit ratio of GET keys, if any GET was answered.
    pub fn hit_ratio(&self) -> Option<f64> {
        (self.get_keys > 0).then(|| self.get_hits as f64 / self.get_keys as f64)
    }
}

/// Live counters read by the progress display (relaxed atomics, updated by one worker).
#[derive(Debug, Default)]
pub struct Live {
    /// Requests sent so far.
    pub sent: AtomicU64,
    /// Replies so far.
    pub completed: AtomicU64,
    /// Timeouts and errors so far.
    pub failed: AtomicU64,
}

/// One timeline interval (by completion time).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Bucket {
    /// Requests sent in the interval.
    pub sent: u64,
    /// Replies received in the interval.
    pub completed: u64,
    /// Timeouts detected in the interval.
    pub timeouts: u64,
}

/// Per-worker recorder.
#[derive(Debug)]
pub struct Recorder {
    /// Latencies of recorded requests, ns.
    pub latency: Histogram<u64>,
    /// Open loop: how late requests left compared to their intended time, ns.
    pub send_lag: Histogram<u64>,
    /// Outcomes of recorded requests.
    pub counters: Counters,
    /// Whole-run timeline.
    pub timeline: Vec<Bucket>,
    window_start_ns: u64,
    window_end_ns: u64,
    bucket_ns: u64,
    live: Arc<Live>,
}

impl Recorder {
    /// Records requests whose intended start is in `[window_start_ns, window_end_ns)`.
    pub fn new(window_start_ns: u64, window_end_ns: u64, bucket_ns: u64, live: Arc<Live>) -> Self {
        let buckets = (window_end_ns / bucket_ns + 2) as usize;
        Self {
            latency: new_histogram(),
            send_lag: new_histogram(),
            counters: Counters::default(),
            timeline: vec![Bucket::default(); buckets],
            window_start_ns,
            window_end_ns,
            bucket_ns,
            live,
        }
    }

    #[inline]
    fn in_window(&self, start_ns: u64) -> bool {
        start_ns >= self.window_start_ns && start_ns < self.window_end_ns
    }

    #[inline]
    fn bucket(&mut self, t_ns: u64) -> Option<&mut Bucket> {
        let i = (t_ns / self.bucket_ns) as usize;
        self.timeline.get_mut(i)
    }

    /// A request left at `now_ns`, intended for `start_ns`.
    #[inline]
    pub fn sent(&mut self, start_ns: u64, now_ns: u64, open_loop: bool) {
        self.live.sent.fetch_add(1, Ordering::Relaxed);
        if let Some(b) = self.bucket(now_ns) {
            b.sent += 1;
        }
        if self.in_window(start_ns) {
            self.counters.sent += 1;
            if open_loop {
                self.send_lag
                    .saturating_record(now_ns.saturating_sub(start_ns).max(1));
            }
        }
    }

    /// A reply to a request intended for `start_ns` arrived at `now_ns`.
    #[inline]
    pub fn reply(&mut self, start_ns: u64, now_ns: u64, verb: Verb, nkeys: usize, reply: &Reply) {
        self.live.completed.fetch_add(1, Ordering::Relaxed);
        if reply.kind == ReplyKind::Error {
            self.live.failed.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(b) = self.bucket(now_ns) {
            b.completed += 1;
        }
        if self.in_window(start_ns) {
            self.latency
                .saturating_record(now_ns.saturating_sub(start_ns).max(1));
            self.counters.count_reply(verb, nkeys, reply);
        }
    }

    /// A reply could not be parsed.
    pub fn malformed(&mut self, start_ns: u64, now_ns: u64) {
        self.live.failed.fetch_add(1, Ordering::Relaxed);
        if let Some(b) = self.bucket(now_ns) {
            b.completed += 1;
        }
        if self.in_window(start_ns) {
            self.counters.completed += 1;
            self.counters.errors += 1;
        }
    }

    /// No reply within the timeout.
    #[inline]
    pub fn timeout(&mut self, start_ns: u64, now_ns: u64) {
        self.live.failed.fetch_add(1, Ordering::Relaxed);
        if let Some(b) = self.bucket(now_ns) {
            b.timeouts += 1;
        }
        if self.in_window(start_ns) {
            self.counters.timeouts += 1;
        }
    }

    /// A datagram for no outstanding request.
    #[inline]
    pub fn late(&mut self) {
        self.counters.late_datagrams += 1;
    }

    /// An open-loop request that could not be queued.
    #[inline]
    pub fn dropped(&mut self, start_ns: u64) {
        self.live.failed.fetch_add(1, Ordering::Relaxed);
        if self.in_window(start_ns) {
            self.counters.dropped += 1;
        }
    }

    /// Adds another recorder's data (same window and bucket size).
    pub fn merge(&mut self, o: &Recorder) {
        self.latency.add(&o.latency).expect("same bounds");
        self.send_lag.add(&o.send_lag).expect("same bounds");
        self.counters.add(&o.counters);
        if self.timeline.len() < o.timeline.len() {
            self.timeline.resize(o.timeline.len(), Bucket::default());
        }
        for (a, b) in self.timeline.iter_mut().zip(&o.timeline) {
            a.sent += b.sent;
            a.completed += b.completed;
            a.timeouts += b.timeouts;
        }
    }

    /// Length of one timeline bucket.
    pub fn bucket_ns(&self) -> u64 {
        self.bucket_ns
    }
}

/// Latency percentiles in microseconds.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub struct LatencySummary {
    /// Samples.
    pub count: u64,
    /// Mean.
    pub mean_us: f64,
    /// Median.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Maximum.
    pub max_us: f64,
}

impl LatencySummary {
    /// From a histogram in nanoseconds.
    pub fn from_histogram(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let us = |ns: u64| ns as f64 / 1e3;
        Self {
            count: h.len(),
            mean_us: h.mean() / 1e3,
            p50_us: us(h.value_at_quantile(0.50)),
            p90_us: us(h.value_at_quantile(0.90)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
        }
    }
}

/// Points `(latency µs, cumulative fraction)` of a histogram's CDF, dense in the tail.
pub fn cdf_points(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    if h.is_empty() {
        return Vec::new();
    }
    let mut pts = Vec::new();
    // Quantiles 0..0.9 linearly, then 1 - 10^-x up to 1 - 10^-5, then the max.
    for i in 0..=90 {
        let q = i as f64 / 100.0;
        pts.push((h.value_at_quantile(q) as f64 / 1e3, q));
    }
    let mut x = 1.0;
    while x <= 5.0 {
        let q = 1.0 - 10f64.powf(-x);
        pts.push((h.value_at_quantile(q) as f64 / 1e3, q));
        x += 0.05;
    }
    pts.push((h.max() as f64 / 1e3, 1.0));
    pts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_only_the_window() {
        let live = Arc::new(Live::default());
        let mut r = Recorder::new(1_000, 2_000, 100, live.clone());
        let hit = Reply {
            kind: ReplyKind::Values,
            hits: 1,
        };
        r.sent(500, 500, false);
        r.reply(500, 600, Verb::Get, 1, &hit);
        r.sent(1_500, 1_500, true);
        r.reply(1_500, 1_750, Verb::Get, 2, &hit);
        r.timeout(1_900, 2_500);
        assert_eq!(r.counters.sent, 1);
        assert_eq!(r.counters.completed, 1);
        assert_eq!(r.counters.get_keys, 2);
        assert_eq!(r.counters.get_hits, 1);
        assert_eq!(r.counters.get_misses, 1);
        assert_eq!(r.counters.timeouts, 1);
        assert_eq!(r.latency.len(), 1);
        assert_eq!(r.latency.max(), 250);
        assert_eq!(live.completed.load(Ordering::Relaxed), 2);
        assert_eq!(r.timeline[6].completed, 1);
        assert_eq!(r.timeline[17].completed, 1);
    }

    #[test]
    fn summary_percentiles() {
        let mut h = new_histogram();
        for v in 1..=1000u64 {
            h.record(v * 1000).unwrap();
        }
        let s = LatencySummary::from_histogram(&h);
        assert!((s.p50_us - 500.0).abs() < 1.0);
        assert!((s.p99_us - 990.0).abs() < 1.0);
        assert!((s.max_us - 1000.0).abs() < 1.0);
        let pts = cdf_points(&h);
        assert!(pts.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1));
    }
}
