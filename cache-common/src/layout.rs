//! Map value layouts shared by the kernel programs and the agent.

/// `bpf_spin_lock` as the verifier knows it: the BTF type must carry exactly this name.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
#[allow(
    non_camel_case_types,
    reason = "the verifier matches the BTF type name"
)]
pub struct bpf_spin_lock {
    pub val: u32,
}

/// memcached instances (port pairs) one agent can front.
pub const MAX_INSTANCES: usize = 4;
/// memcached's own key length limit.
pub const MAX_KEY_LEN: usize = 250;
/// Gaps inside values (segments lost on the way, not yet sent again) the write scanner keeps
/// per TCP flow; one more loses the stream. Losses on veth come in bursts: 4 were too few for
/// a writer of 1 MB values under load, 16 were enough.
pub const MAX_HOLES: usize = 16;
/// Keys per `get` the hit path serves; longer multi-gets pass to memcached.
pub const MAX_KEYS_PER_GET: usize = 32;
/// Ways per bucket: a set-associative cache, one spin lock per bucket.
pub const WAYS: usize = 4;
/// Bytes of [`Slot`] before the stored reply text.
pub const SLOT_HEADER: usize = 32;
/// Size classes, like memcached's slabs: a slot stores `VALUE <key> <flags> <bytes>\r\n<data>\r\n`
/// in the smallest class that holds it. 128 bytes keeps a 16-byte key with a 32-byte value at
/// 130 bytes of map per item (bucket lock included); 1536 holds any reply a 1500-byte MTU frame
/// can carry.
pub const SLOT_SIZES: [usize; CLASS_COUNT] = [128, 384, 768, 1536];
pub const CLASS_COUNT: usize = 4;
/// Text capacity of each class (slot size minus header).
pub const TEXT_CAPACITY: [usize; CLASS_COUNT] = [
    SLOT_SIZES[0] - SLOT_HEADER,
    SLOT_SIZES[1] - SLOT_HEADER,
    SLOT_SIZES[2] - SLOT_HEADER,
    SLOT_SIZES[3] - SLOT_HEADER,
];
pub const TEXT0: usize = TEXT_CAPACITY[0];
pub const TEXT1: usize = TEXT_CAPACITY[1];
pub const TEXT2: usize = TEXT_CAPACITY[2];
pub const TEXT3: usize = TEXT_CAPACITY[3];

/// [`Config::flags`] bits.
pub mod flags {
    /// Answer GET hits from the cache.
    pub const SERVE: u32 = 1 << 0;
    /// Fill the cache from memcached's replies.
    pub const FILL: u32 = 1 << 1;
    /// Only answer clients whose address is in ALLOW_V4 / ALLOW_V6.
    pub const ALLOWLIST: u32 = 1 << 2;
    /// Time the hit path into HIT_LATENCY (two clock reads on one GET in 64).
    pub const HIT_LATENCY: u32 = 1 << 3;
    /// Queue entries filled without a known TTL on TTL_QUERIES, for the agent to ask memcached.
    pub const LEARN_TTL: u32 = 1 << 4;
    /// `tc_serve` is attached on TC ingress: a hit whose reply the XDP frame cannot hold is
    /// handed to it (XDP metadata [`crate::TC_HANDOFF`]) instead of passing to memcached.
    pub const TC_SERVE: u32 = 1 << 5;
}

/// XDP metadata (4 bytes in front of the frame) marking a request `tc_serve` should answer.
pub const TC_HANDOFF: u32 = 0x6d63_7463; // "mctc"
pub const TC_HANDOFF_LEN: usize = 4;
/// Source port of the `delete` frames the agent runs through `xdp_cache` for the keys
/// memcached's watch stream reports: the kernel leaves them out of its per-protocol
/// invalidation counts (the agent counts them as `watch`). No client sends from port 0.
pub const AGENT_SOURCE_PORT: u16 = 0;
/// `skb->mark` of a reply `tc_serve` sends out: `tc_fill` (on the same interface's egress)
/// lets it pass unlooked-at and clears the mark. Without it every such hit counted as a fill
/// refused for want of a ticket (found by QA round 6).
pub const TC_SERVED_MARK: u32 = 0x6d63_7273; // "mcrs"

/// One memcached instance: the ports it listens on (host byte order, 0 = none).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Instance {
    pub tcp_port: u16,
    pub udp_port: u16,
}

/// Written only by the agent (one element). The kernel only reads it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Config {
    /// The agent's lease: serving and filling stop once `bpf_ktime_get_coarse_ns` passes it.
    pub lease_until_ns: u64,
    /// Fills are refused for GETs that reached XDP before this time (set after any resync).
    pub fill_hold_until_ns: u64,
    /// Fills (and warm fills and learned TTLs) are refused once `bpf_ktime_get_coarse_ns`
    /// passes this. The agent extends it only while memcached answers its probes promptly:
    /// a memcached stalled with a write queued longer than the write-settle time could
    /// otherwise answer later GETs from the old value, and those replies would be filled.
    pub fill_lease_until_ns: u64,
    /// Life of an entry whose TTL the kernel did not see.
    pub max_age_ns: u64,
    /// A key written less than this long before a GET arrived is not filled from that GET's
    /// reply: the write may still be queued inside memcached.
    pub write_settle_ns: u64,
    /// CLOCK_REALTIME minus CLOCK_MONOTONIC, to turn absolute exptimes into kernel time.
    pub realtime_offset_ns: u64,
    /// Bumped by the agent to flush every entry (entries remember the epoch they were filled in).
    pub agent_epoch: u32,
    pub flags: u32,
    pub instances: [Instance; MAX_INSTANCES],
    /// Buckets in each class map (its max_entries).
    pub class_buckets: [u32; CLASS_COUNT],
    /// Elements of KEY_META.
    pub key_meta_slots: u32,
    /// Largest UDP payload (memcached frame header included) a reply may have.
    pub max_reply_payload: u32,
    /// A reply frame may be at most this many percent of the request frame; 0 = no limit.
    pub max_amplification_pct: u32,
    /// The interface whose GETs may be answered (and filled). On any other interface the
    /// programs only scan for writes: the agent also attaches them to `lo`, so clients on
    /// memcached's own host invalidate too.
    pub serve_ifindex: u32,
    /// The memcached the cache was filled from (`pid` and `time - uptime` from its `stats`;
    /// 0 = not known yet). Only the agent reads them: a new agent adopting a kept cache
    /// (upgrade mode) keeps it only if memcached is still that process.
    pub memcached_pid: u32,
    /// Bytes after the place the write scanner lost a TCP stream within which a write begun
    /// before that place may still land in memcached: a command line plus the largest data
    /// block memcached takes (its `item_size_max`; see [`guard_window`]). 0 until the agent
    /// has read it: [`GUARD_WINDOW_DEFAULT`].
    pub guard_window: u32,
    pub memcached_started_s: u64,
    /// memcached's `evictions`, and the sum of its counters of drops no `watch` stream hears
    /// of, as an agent in upgrade mode read them when it stopped (then it followed `watch`
    /// long enough for every eviction they count to reach it); [`HANDOVER_UNKNOWN`] if it
    /// could not. Only the agent reads them: the next agent keeps the cache only if they have
    /// not moved since.
    pub handover_evictions: u64,
    pub handover_dropped: u64,
    /// `bpf_ktime_get_coarse_ns` when the running agent last wrote this (at least every
    /// [`HEARTBEAT_NS`]); 0 once it stopped. Only agents read it: an agent another PID
    /// namespace hides (a container's) is alive while this is recent, so no one else takes
    /// or removes its pins.
    pub agent_heartbeat_ns: u64,
}
const _: () = assert!(core::mem::size_of::<Config>() == 144);

/// The guard window for memcached's `item_size_max`: its largest data block (plus CRLF), a
/// command line (memcached closes a connection whose line runs past 2048 bytes) and a binary
/// header with extras and key, rounded up.
pub const fn guard_window(item_size_max: u32) -> u32 {
    item_size_max.saturating_add(4096)
}

/// The guard window while memcached's `item_size_max` is not known: its largest (1 GiB).
pub const GUARD_WINDOW_DEFAULT: u32 = guard_window(1 << 30);

/// How often a running agent stamps [`Config::agent_heartbeat_ns`].
pub const HEARTBEAT_NS: u64 = 500_000_000;

/// [`Config::handover_evictions`] and [`Config::handover_dropped`] when not known.
pub const HANDOVER_UNKNOWN: u64 = u64::MAX;

/// Written only by the kernel (one element).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct State {
    /// Bumped by `flush_all` and by writes the parser cannot attribute to a key (a u64
    /// because the BPF target only has 64-bit atomics); entries keep its low 32 bits.
    pub kernel_epoch: u64,
    /// After `flush_all <delay>`: no fill from GETs that arrived before this time.
    pub flush_hold_until_ns: u64,
    /// When the kernel last flushed everything (`flush_all`, a write it could not attribute):
    /// like a write to every key, no fill from a GET that arrived within the write-settle
    /// time after it (memcached may not have applied what caused it yet).
    pub last_flush_ns: u64,
}
const _: () = assert!(core::mem::size_of::<State>() == 24);

/// One cached item: the exact text memcached sent for it in a `get` reply.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Slot<const TEXT: usize> {
    /// Key hash ([`crate::hash::key_hash`]); 0 = empty.
    pub tag: u32,
    /// Bytes of `text` in use: `VALUE <key> <flags> <bytes>\r\n<data>\r\n`.
    pub text_len: u16,
    pub key_len: u8,
    /// Access frequency for the replacement policy (saturating, halved on eviction).
    pub freq: u8,
    /// Index of the memcached instance in [`Config::instances`].
    pub instance: u8,
    pub _pad0: [u8; 3],
    pub kernel_epoch: u32,
    pub agent_epoch: u32,
    pub _pad1: u32,
    /// Coarse monotonic time after which the entry must not be served.
    pub expires_at_ns: u64,
    pub text: [u8; TEXT],
}

/// A set of [`WAYS`] slots behind one spin lock. Must start with the lock (BTF requirement).
///
/// Writers (fills, invalidations, learned TTLs) take the lock and keep `seq` odd while they
/// change a slot. The hit path reads without the lock: it reads `seq`, then the slot, then
/// `seq` again, and passes the request to memcached if a write overlapped (a seqlock).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Bucket<const TEXT: usize> {
    pub lock: bpf_spin_lock,
    pub seq: u32,
    pub slots: [Slot<TEXT>; WAYS],
}
const _: () = assert!(core::mem::size_of::<Slot<TEXT0>>() == SLOT_SIZES[0]);
const _: () = assert!(core::mem::size_of::<Slot<TEXT3>>() == SLOT_SIZES[3]);
const _: () = assert!(core::mem::size_of::<Bucket<TEXT0>>() == 8 + WAYS * SLOT_SIZES[0]);

/// Map bytes per bucket of each class.
pub const BUCKET_BYTES: [usize; CLASS_COUNT] = [
    core::mem::size_of::<Bucket<TEXT0>>(),
    core::mem::size_of::<Bucket<TEXT1>>(),
    core::mem::size_of::<Bucket<TEXT2>>(),
    core::mem::size_of::<Bucket<TEXT3>>(),
];

/// Per key-hash bookkeeping for coherence (KEY_META, indexed by hash modulo its size).
/// Colliding keys share an element; that only makes the kernel more conservative.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct KeyMeta {
    /// Coarse time of the last write seen to any key with this index.
    pub write_ts_ns: u64,
    /// Expiry from the TTL of the last TTL-setting write, valid when `ttl_tag` and
    /// `ttl_check` are the key's hash and check hash ([`crate::hash::key_check`]).
    pub ttl_expires_ns: u64,
    pub ttl_tag: u32,
    pub ttl_check: u32,
}
const _: () = assert!(core::mem::size_of::<KeyMeta>() == 24);

/// A GET that missed: the fill of its reply is allowed only against this record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TicketKey {
    /// Client address; IPv4 as the first four bytes.
    pub addr: [u8; 16],
    /// Client UDP port, network byte order as on the wire.
    pub port: u16,
    /// memcached UDP frame request id, network byte order.
    pub request_id: u16,
    pub instance: u8,
    pub is_v6: u8,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<TicketKey>() == 24);

/// Slots of the kernel's fill-ticket table (a power of two). A slot is 56 bytes.
pub const FILL_TICKET_SLOTS: u32 = 1 << 16;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Ticket {
    /// Coarse time the GET reached XDP (coherence).
    pub arrived_coarse_ns: u64,
    /// Precise time the GET reached XDP, for memcached's service time; 0 if the request was
    /// not one of the timed ones (one in 64).
    pub arrived_ns: u64,
    pub kernel_epoch: u32,
    pub agent_epoch: u32,
}
const _: () = assert!(core::mem::size_of::<Ticket>() == 24);

/// A TCP flow to memcached, from the client's side.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub addr: [u8; 16],
    pub client_port: u16,
    pub server_port: u16,
    pub is_v6: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 24);

/// Key bytes a [`TtlQuery`] carries: [`MAX_KEY_LEN`] rounded up to whole words.
pub const QUERY_KEY_BYTES: usize = 256;
/// Key bytes of a [`ShortTtlQuery`], the record for keys up to this long: a quarter of the
/// ring buffer traffic for typical keys.
pub const SHORT_QUERY_KEY_BYTES: usize = 64;

/// tc_fill to the agent (TTL_QUERIES ring buffer): an entry was filled whose TTL the kernel
/// never saw, so it lives only `max_age_ns`. The agent asks memcached and answers with a
/// [`TtlAnswer`]. Records are a [`TtlQuery`] or, for short keys, a [`ShortTtlQuery`]: the
/// same layout, cut after 64 key bytes.
pub type TtlQuery = TtlQueryOf<QUERY_KEY_BYTES>;
pub type ShortTtlQuery = TtlQueryOf<SHORT_QUERY_KEY_BYTES>;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct TtlQueryOf<const KEY: usize> {
    pub key_hash: u32,
    pub key_len: u8,
    pub instance: u8,
    /// The size class the entry went to.
    pub class: u8,
    pub _pad: u8,
    /// The key; bytes past `key_len` are undefined.
    pub key: [u8; KEY],
}
const _: () = assert!(core::mem::size_of::<TtlQuery>() == 264);
const _: () = assert!(core::mem::size_of::<ShortTtlQuery>() == 72);

/// The agent to `xdp_learn_ttl` (the data of a BPF_PROG_TEST_RUN): the key's entry expires at
/// `expires_at_ns`, as memcached said when asked at `asked_at_ns`. The program writes `result`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TtlAnswer {
    pub query: TtlQuery,
    /// Coarse monotonic time taken before the question was sent to memcached.
    pub asked_at_ns: u64,
    /// Coarse monotonic time the item is gone by (u64::MAX: never expires).
    pub expires_at_ns: u64,
    /// One of [`ttl_answer`], set by the kernel.
    pub result: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<TtlAnswer>() == 288);

/// [`TtlAnswer::result`] values.
pub mod ttl_answer {
    /// The entry now expires when memcached's item does.
    pub const INSTALLED: u32 = 1;
    /// No entry for the key any more (evicted, invalidated or flushed).
    pub const NO_ENTRY: u32 = 2;
    /// A write to the key was seen after (or just before) the question, or the fill lease ran
    /// out (memcached may be stalled with writes queued): the answer may be about an item
    /// that no longer exists.
    pub const WRITTEN: u32 = 3;
    /// The answer could not be read.
    pub const MALFORMED: u32 = 4;
}

/// The agent to `xdp_warm_fill` (the data of a BPF_PROG_TEST_RUN): one item the agent read
/// from memcached when it started, stored like a fill of a GET that reached XDP at
/// `asked_at_ns`. The program writes `result`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct WarmFill {
    pub key_hash: u32,
    /// Bytes of `text` in use: `VALUE <key> <flags> <bytes>\r\n<data>\r\n`.
    pub text_len: u16,
    pub key_len: u8,
    pub instance: u8,
    /// The epochs when the agent started asking (a flush since then refuses the item).
    pub kernel_epoch: u32,
    pub agent_epoch: u32,
    /// Coarse monotonic time taken before the agent asked memcached.
    pub asked_at_ns: u64,
    /// Coarse monotonic time the item is gone by (u64::MAX: never expires).
    pub expires_at_ns: u64,
    /// One of [`warm_fill`], set by the kernel.
    pub result: u32,
    pub _pad: u32,
    pub text: [u8; TEXT3],
}
/// Bytes of [`WarmFill`] before `text`.
pub const WARM_FILL_HEADER: usize = 40;
const _: () = assert!(core::mem::size_of::<WarmFill>() == WARM_FILL_HEADER + TEXT3);

/// [`WarmFill::result`] values.
pub mod warm_fill {
    pub const FILLED: u32 = 1;
    /// A write to the key was seen after (or just before) the agent asked: not stored.
    pub const RACED: u32 = 2;
    /// Filling is off, the lease or the fill lease ran out, a flush or resync happened since
    /// (or just before) the agent asked.
    pub const REFUSED: u32 = 3;
    pub const MALFORMED: u32 = 4;
}
