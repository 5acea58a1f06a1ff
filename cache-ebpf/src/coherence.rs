//! What a write does to the cache: record its time and TTL for the key, clear the key from every
//! size class, or flush everything. Called from the write scanner on XDP ingress, before
//! memcached sees the write.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use cache_common::{
    Config, Counter, Counters, MEMCACHED_CLOCK_MARGIN_NS, REALTIME_MAXDELTA, State,
};

use crate::maps::{CLASS0, CLASS1, CLASS2, CLASS3, KEY_META, STATE};
use crate::stats::count;
use crate::store::invalidate;
use crate::time::coarse_ns;

const NS_PER_SEC: u64 = 1_000_000_000;
/// An item set with exptime E at time t may already be gone at t + E - 1: expire ours early.
const EXPIRY_MARGIN_NS: u64 = MEMCACHED_CLOCK_MARGIN_NS;

/// How a write changes the key's TTL.
#[derive(Clone, Copy)]
pub enum Ttl {
    /// append, prepend, incr, decr, delete: the TTL (if the item lives) is unchanged.
    Keep,
    /// A TTL we could not read: entries filled after this write must not be served.
    Unknown,
    /// A write memcached may refuse (add, replace, cas, an `ms` in those modes, a data block
    /// memcached rejects): its TTL is not recorded and the last one recorded is forgotten,
    /// so the next fill learns the item's TTL from memcached (see fill.rs).
    Forget,
    /// memcached exptime semantics: 0 never, < 0 expired, <= 30 days relative, else unix time.
    Exptime(i64),
}

/// Coarse monotonic time after which an item written now with `exptime` is gone.
#[inline(always)]
pub fn expiry_from_exptime(exptime: i64, now: u64, realtime_offset_ns: u64) -> u64 {
    if exptime == 0 {
        return u64::MAX;
    }
    if exptime < 0 {
        return 0;
    }
    let deadline = if exptime <= REALTIME_MAXDELTA {
        now + exptime as u64 * NS_PER_SEC
    } else {
        (exptime as u64 * NS_PER_SEC).saturating_sub(realtime_offset_ns)
    };
    deadline.saturating_sub(EXPIRY_MARGIN_NS)
}

/// A write to one key: called before memcached applies it.
#[inline(always)]
pub fn write_key(
    cfg: &Config,
    key_hash: u32,
    key_check: u32,
    ttl: Ttl,
    counters: Option<*mut Counters>,
    source: Option<Counter>,
) {
    let now = coarse_ns();
    // Record the write time first, then clear under each bucket lock (see store::insert).
    let recorded = match (cfg.key_meta_slots, ttl) {
        (0, _) => false,
        (slots, ttl) => match KEY_META.get_ptr_mut(key_hash % slots) {
            Some(meta) => unsafe {
                core::ptr::write_volatile(&raw mut (*meta).write_ts_ns, now);
                match ttl {
                    Ttl::Keep => {}
                    Ttl::Unknown => {
                        (*meta).ttl_expires_ns = 0;
                        (*meta).ttl_tag = key_hash;
                        (*meta).ttl_check = key_check;
                    }
                    // Key hashes are never 0 (hash::finish).
                    Ttl::Forget => (*meta).ttl_tag = 0,
                    Ttl::Exptime(e) => {
                        (*meta).ttl_expires_ns =
                            expiry_from_exptime(e, now, cfg.realtime_offset_ns);
                        (*meta).ttl_tag = key_hash;
                        (*meta).ttl_check = key_check;
                    }
                }
                true
            },
            None => false,
        },
    };
    if !recorded {
        // Without a write time a racing fill could slip through: flush instead.
        flush(counters, Counter::FlushUnsynced);
        return;
    }
    let b = &cfg.class_buckets;
    invalidate(&CLASS0, b[0], key_hash, counters, 0);
    invalidate(&CLASS1, b[1], key_hash, counters, 1);
    invalidate(&CLASS2, b[2], key_hash, counters, 2);
    invalidate(&CLASS3, b[3], key_hash, counters, 3);
    if let Some(source) = source {
        count(counters, source);
    }
}

/// Invalidates the whole cache: every entry remembers the epoch it was filled in. Like a
/// write, the flush also refuses fills from GETs of the next settle window (see fill.rs).
#[inline(always)]
pub fn flush(counters: Option<*mut Counters>, reason: Counter) {
    if let Some(state) = STATE.get_ptr_mut(0) {
        unsafe {
            // Concurrent flushes write times microseconds apart: no ordering needed.
            core::ptr::write_volatile(&raw mut (*state).last_flush_ns, coarse_ns());
            // Result unused: compiles to a plain atomic add, valid on every BPF CPU version.
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*state).kernel_epoch, 1)
        };
    }
    count(counters, reason);
}

/// Whether a fill for a GET (or warm-start read) that reached the kernel at `arrived` must be
/// refused because a flush, a resync or a delayed `flush_all` may not be applied in memcached
/// yet when memcached answers it.
#[inline(always)]
pub fn fill_held(cfg: &Config, state: &State, arrived: u64) -> bool {
    arrived < cfg.fill_hold_until_ns
        || arrived < state.flush_hold_until_ns
        || arrived < state.last_flush_ns.saturating_add(cfg.write_settle_ns)
}

/// `flush_all <delay>`: flush now, and refuse fills from GETs that arrive before the flush
/// takes effect in memcached (plus memcached's one-second clock), so nothing filled in between
/// survives it.
#[inline(always)]
pub fn flush_delayed(cfg: &Config, delay: i64, counters: Option<*mut Counters>) {
    flush(counters, Counter::FlushAll);
    if delay <= 0 {
        return;
    }
    let now = coarse_ns();
    let takes_effect = if delay <= REALTIME_MAXDELTA {
        now + delay as u64 * NS_PER_SEC
    } else {
        (delay as u64 * NS_PER_SEC).saturating_sub(cfg.realtime_offset_ns)
    };
    let hold_until = takes_effect + 2 * NS_PER_SEC;
    if let Some(state) = STATE.get_ptr_mut(0) {
        unsafe {
            if (*state).flush_hold_until_ns < hold_until {
                (*state).flush_hold_until_ns = hold_until;
            }
        }
    }
}
