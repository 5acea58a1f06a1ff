//! Per-CPU counters and latency histograms.

use cache_common::{Counter, Counters, Histogram, histogram_bucket};

use crate::maps::COUNTERS;

/// This CPU's counters. The per-CPU array always has element 0, so this only fails if the map
/// is missing, in which case counting is silently skipped.
#[inline(always)]
pub fn counters() -> Option<*mut Counters> {
    COUNTERS.get_ptr_mut(0)
}

#[inline(always)]
pub fn count(c: Option<*mut Counters>, counter: Counter) {
    if let Some(c) = c {
        unsafe { (*c).add(counter, 1) };
    }
}

#[inline(always)]
pub fn count_n(c: Option<*mut Counters>, counter: Counter, n: u64) {
    if let Some(c) = c {
        unsafe { (*c).add(counter, n) };
    }
}

#[inline(always)]
pub fn record(h: Option<*mut Histogram>, ns: u64) {
    if let Some(h) = h {
        let bucket = histogram_bucket(ns) & 31;
        unsafe {
            (*h).buckets[bucket] += 1;
            (*h).sum_ns += ns;
        }
    }
}
