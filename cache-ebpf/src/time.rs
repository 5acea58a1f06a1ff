//! Clocks. Coherence uses the coarse monotonic clock (cheap, jiffy resolution: every margin it
//! feeds is far larger); latency uses the precise one.

use aya_ebpf::helpers::generated::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns};

#[inline(always)]
pub fn coarse_ns() -> u64 {
    unsafe { bpf_ktime_get_coarse_ns() }
}

#[inline(always)]
pub fn precise_ns() -> u64 {
    unsafe { bpf_ktime_get_ns() }
}
