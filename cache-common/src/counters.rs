//! Per-CPU counters and latency histograms written by the kernel and summed by the agent.

/// Every counter the kernel keeps, in COUNTERS order. The agent maps each to a metric.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// UDP `get` requests parsed by XDP.
    GetRequests,
    /// Keys in those requests.
    GetKeys,
    /// Requests answered by XDP.
    HitRequests,
    /// Keys answered by XDP.
    HitKeys,
    /// Passed to memcached: a key was not cached.
    PassMiss,
    /// Passed: a multi-get where some keys hit and some missed.
    PassPartial,
    /// Passed: the reply would exceed the frame or the cache's slot size.
    PassTooBig,
    /// Passed: a command the hit path does not serve (gets, gat, meta, binary, odd spacing).
    PassUnsupported,
    /// Passed: the request could not be parsed.
    PassMalformed,
    /// Passed: the agent's lease expired or serving is off.
    PassNoLease,
    /// Passed: the client is outside the allowlist.
    PassDenied,
    /// Passed: the reply would exceed the amplification limit.
    PassAmplification,
    /// Passed: every key hit but the frame could not grow to hold the reply, and TC ingress
    /// did not answer it either (`--tc-serve false`, or the skb could not grow).
    PassNoRoom,
    /// Entries stored from memcached's replies.
    Fills,
    FillRefusedNoTicket,
    FillRefusedRace,
    FillRefusedEpoch,
    FillRefusedHold,
    FillRefusedCas,
    FillRefusedMultiDatagram,
    FillRefusedTooBig,
    FillRefusedMalformed,
    /// Keys invalidated by text-protocol writes.
    InvalidateText,
    /// Keys invalidated by meta-protocol writes.
    InvalidateMeta,
    /// Keys invalidated by binary-protocol writes.
    InvalidateBinary,
    /// `flush_all` commands seen (each flushes the whole cache).
    FlushAll,
    /// Whole-cache flushes because a TCP stream could not be followed (gap, retransmit,
    /// connection opened before the agent, unparseable write).
    FlushUnsynced,
    /// Valid entries replaced by a fill.
    Evictions,
    /// TCP segments with payload scanned for writes.
    TcpSegments,
    /// UDP datagrams other than `get` scanned for writes.
    UdpOther,
    /// Lookups that found the key but expired or flushed.
    Expired,
    SlotsFilled0,
    SlotsFilled1,
    SlotsFilled2,
    SlotsFilled3,
    SlotsCleared0,
    SlotsCleared1,
    SlotsCleared2,
    SlotsCleared3,
    /// Entries filled without a known TTL, queued for the agent to ask memcached.
    TtlQueries,
    /// Such entries not queued because the ring buffer was full (they live `max_age`).
    TtlQueriesDropped,
    /// Entries stored from what the agent read from memcached when it started (warm start).
    WarmFills,
    /// Requests answered by `tc_serve` (TC ingress): every key hit but XDP could not grow the
    /// frame to hold the reply. Also counted in HitRequests.
    HitRequestsTc,
    /// Fills refused because the agent's fill lease ran out: memcached did not answer its
    /// probes promptly, and may be stalled with writes queued (see Config::fill_lease_until_ns).
    FillRefusedStall,
    /// Passed: a fill or invalidation wrote the bucket while the hit path read it (the
    /// lock-free read saw the bucket's sequence move; see the kernel's lock module).
    PassContended,
    /// TCP flows the write scanner lost its place in (opened before the agent, a segment lost
    /// inside a command line) and went on following in guard mode: each flushes the cache on
    /// every segment until a write begun before must have landed (the guard window). A flow
    /// enters again after another gap.
    TcpFlowsGuarded,
}

pub const COUNTER_COUNT: usize = Counter::TcpFlowsGuarded as usize + 1;

impl Counter {
    pub const SLOTS_FILLED: [Counter; 4] = [
        Counter::SlotsFilled0,
        Counter::SlotsFilled1,
        Counter::SlotsFilled2,
        Counter::SlotsFilled3,
    ];
    pub const SLOTS_CLEARED: [Counter; 4] = [
        Counter::SlotsCleared0,
        Counter::SlotsCleared1,
        Counter::SlotsCleared2,
        Counter::SlotsCleared3,
    ];
}

/// One CPU's counters (COUNTERS is a one-element per-CPU array of these).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Counters {
    pub values: [u64; COUNTER_COUNT],
}

impl Default for Counters {
    fn default() -> Self {
        Self {
            values: [0; COUNTER_COUNT],
        }
    }
}

impl Counters {
    #[inline(always)]
    pub fn add(&mut self, counter: Counter, n: u64) {
        self.values[counter as usize] += n;
    }

    #[inline(always)]
    pub fn get(&self, counter: Counter) -> u64 {
        self.values[counter as usize]
    }
}

/// log2 buckets of nanoseconds: bucket `i` counts samples in `[2^i, 2^(i+1))` (bucket 0 also 0).
pub const HISTOGRAM_BUCKETS: usize = 32;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Histogram {
    pub buckets: [u64; HISTOGRAM_BUCKETS],
    /// Sum of all samples in nanoseconds.
    pub sum_ns: u64,
}

/// Bucket index of a sample, shared by kernel and tests.
#[inline(always)]
pub fn histogram_bucket(ns: u64) -> usize {
    let log = 63 - (ns | 1).leading_zeros() as usize;
    if log >= HISTOGRAM_BUCKETS {
        HISTOGRAM_BUCKETS - 1
    } else {
        log
    }
}

/// Counter names in COUNTERS order (snake_case of [`Counter`]); `cache-agent stats` prints these.
pub const COUNTER_NAMES: [&str; COUNTER_COUNT] = [
    "get_requests",
    "get_keys",
    "hit_requests",
    "hit_keys",
    "pass_miss",
    "pass_partial",
    "pass_too_big",
    "pass_unsupported",
    "pass_malformed",
    "pass_no_lease",
    "pass_denied",
    "pass_amplification",
    "pass_no_room",
    "fills",
    "fill_refused_no_ticket",
    "fill_refused_race",
    "fill_refused_epoch",
    "fill_refused_hold",
    "fill_refused_cas",
    "fill_refused_multi_datagram",
    "fill_refused_too_big",
    "fill_refused_malformed",
    "invalidate_text",
    "invalidate_meta",
    "invalidate_binary",
    "flush_all",
    "flush_unsynced",
    "evictions",
    "tcp_segments",
    "udp_other",
    "expired",
    "slots_filled_0",
    "slots_filled_1",
    "slots_filled_2",
    "slots_filled_3",
    "slots_cleared_0",
    "slots_cleared_1",
    "slots_cleared_2",
    "slots_cleared_3",
    "ttl_queries",
    "ttl_queries_dropped",
    "warm_fills",
    "hit_requests_tc",
    "fill_refused_stall",
    "pass_contended",
    "tcp_flows_guarded",
];
