//! The contract between the kernel programs (`cache-ebpf`) and the agent (`cache-agent`).
//!
//! Everything both sides must agree on lives here and nowhere else: map names, the layout of
//! every map value, the counter table, limits, protocol tokens and the key hash. All structs are
//! `#[repr(C)]`, `Copy`, with explicit padding and a size assertion beside them, so the kernel
//! and user-space views cannot drift.
#![no_std]

pub mod counters;
pub mod hash;
pub mod layout;
pub mod proto;

pub use counters::{
    COUNTER_COUNT, COUNTER_NAMES, Counter, Counters, HISTOGRAM_BUCKETS, Histogram, histogram_bucket,
};
pub use layout::*;
pub use proto::*;

/// Names of the maps and programs in the eBPF object, used by the agent to find them.
pub mod names {
    pub const XDP_CACHE: &str = "xdp_cache";
    /// Tail-call targets of XDP_CACHE, in JUMP at these indices.
    pub const XDP_GET: &str = "xdp_get";
    pub const XDP_SCAN: &str = "xdp_scan";
    pub const JUMP: &str = "JUMP";
    pub const JUMP_GET: u32 = 0;
    pub const JUMP_SCAN: u32 = 1;
    pub const TC_FILL: &str = "tc_fill";
    /// TC ingress: answers the hits XDP could not grow the frame for (see flags::TC_SERVE).
    pub const TC_SERVE: &str = "tc_serve";
    pub const XDP_PASS: &str = "xdp_pass";
    pub const XDP_REFLECTOR: &str = "xdp_reflector";
    /// Run by the agent (BPF_PROG_TEST_RUN) to install a learned TTL; never attached.
    pub const XDP_LEARN_TTL: &str = "xdp_learn_ttl";
    /// Run by the agent (BPF_PROG_TEST_RUN) to store an item read at start; never attached.
    pub const XDP_WARM_FILL: &str = "xdp_warm_fill";

    pub const CONFIG: &str = "CONFIG";
    pub const STATE: &str = "STATE";
    pub const COUNTERS: &str = "COUNTERS";
    pub const HIT_LATENCY: &str = "HIT_LATENCY";
    pub const MISS_LATENCY: &str = "MISS_LATENCY";
    pub const KEY_META: &str = "KEY_META";
    pub const FILL_TICKETS: &str = "FILL_TICKETS";
    /// Load-time global: 1 makes hit-path readers take the bucket lock.
    pub const LOCKED_READS: &str = "LOCKED_READS";
    pub const TCP_FLOWS: &str = "TCP_FLOWS";
    pub const SCRATCH: &str = "SCRATCH";
    pub const ALLOW_V4: &str = "ALLOW_V4";
    pub const ALLOW_V6: &str = "ALLOW_V6";
    pub const TTL_QUERIES: &str = "TTL_QUERIES";
    /// One bucket array per size class, in the order of [`crate::SLOT_SIZES`].
    pub const CLASS_MAPS: [&str; crate::CLASS_COUNT] = ["CLASS0", "CLASS1", "CLASS2", "CLASS3"];
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are `#[repr(C)]` plain data with explicit padding (asserted sizes).
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for State {}
    unsafe impl aya::Pod for Counters {}
    unsafe impl aya::Pod for Histogram {}
    unsafe impl aya::Pod for KeyMeta {}
    unsafe impl aya::Pod for TicketKey {}
    unsafe impl aya::Pod for Ticket {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl<const KEY: usize> aya::Pod for TtlQueryOf<KEY> {}
    unsafe impl aya::Pod for TtlAnswer {}
    unsafe impl aya::Pod for WarmFill {}
    unsafe impl<const TEXT: usize> aya::Pod for Bucket<TEXT> {}
}
