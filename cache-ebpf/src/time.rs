//! Clocks. Coherence uses the coarse monotonic clock (cheap, jiffy resolution: every margin it
//! feeds is far larger); latency uses the precise one.

use aya_ebpf::helpers::generated::{bpf_jiffies64, bpf_ktime_get_coarse_ns, bpf_ktime_get_ns};

use crate::scratch::Scratch;

#[inline(always)]
pub fn coarse_ns() -> u64 {
    unsafe { bpf_ktime_get_coarse_ns() }
}

#[inline(always)]
pub fn precise_ns() -> u64 {
    unsafe { bpf_ktime_get_ns() }
}

/// How far [`HitClock::lag`] may trail the coarse clock: two ticks at the slowest tick rate
/// (HZ=100). See [`hit_clock`].
pub const HIT_CLOCK_SLACK_NS: u64 = 20_000_000;

/// The coarse clock as the hit path reads it (see [`hit_clock`]).
#[derive(Clone, Copy)]
pub struct HitClock {
    /// Never ahead of the coarse clock, at most [`HIT_CLOCK_SLACK_NS`] behind it: for times
    /// recorded for later comparison (a ticket's arrival), where early is the safe side.
    pub lag: u64,
    /// Never behind the coarse clock: for deadlines (lease, expiry), where late is the safe
    /// side.
    pub lead: u64,
}

/// The coarse clock without a helper call on most packets. The coarse clock only moves when
/// jiffies do (both advance at the tick), so each CPU keeps the value it read during the
/// current jiffy: `bpf_jiffies64` is inlined by the verifier into one load, while
/// `bpf_ktime_get_coarse_ns` is a call and a return through the return thunk, per packet.
///
/// The kernel bumps jiffies just before it moves the coarse clock, so a read in between caches
/// the previous tick's time for the new jiffy: the cached value trails the coarse clock by up
/// to two ticks, never leads it. Deadlines are checked against `lag + HIT_CLOCK_SLACK_NS`.
#[inline(always)]
pub fn hit_clock(s: *mut Scratch) -> HitClock {
    let jiffies = unsafe { bpf_jiffies64() };
    let cache = unsafe { &raw mut (*s).clock };
    let lag = unsafe {
        if core::ptr::read_volatile(&raw const (*cache).jiffies) == jiffies {
            core::ptr::read_volatile(&raw const (*cache).coarse_ns)
        } else {
            let now = coarse_ns();
            core::ptr::write_volatile(&raw mut (*cache).coarse_ns, now);
            core::ptr::write_volatile(&raw mut (*cache).jiffies, jiffies);
            now
        }
    };
    HitClock {
        lag,
        lead: lag + HIT_CLOCK_SLACK_NS,
    }
}

/// Per-CPU cache of [`hit_clock`], in scratch memory.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ClockCache {
    pub jiffies: u64,
    pub coarse_ns: u64,
}
