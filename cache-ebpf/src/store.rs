//! The cache store: size-class bucket arrays, 4-way set-associative. Writers take a bucket's
//! spin lock; the hit path reads it lock-free and checks its sequence ([`crate::lock`]).
//!
//! Replacement: when a bucket is full, the fill evicts the way with the lowest access frequency
//! and halves the others (LFU with aging). On Zipf traffic the hot keys are hit again and again,
//! so they keep high counts and survive a stream of one-hit keys; aging stops a key that was hot
//! long ago from squatting forever. Plain LRU would let every cold miss push out a hot key.

use aya_ebpf::btf_maps::Array as BtfArray;
use cache_common::{
    Bucket, Config, Counter, Counters, KeyMeta, MAX_KEYS_PER_GET, Slot, State, TEXT_CAPACITY, WAYS,
};

use crate::maps::{CLASS0, CLASS1, CLASS2, CLASS3};

use crate::lock::{Guard, ReadWindow, WriteGuard};
use crate::scratch::{BUF_MASK, Scratch, forget};
use crate::stats::count;

/// Offset of the key inside a stored text (`VALUE <key> ...`).
pub const KEY_AT: usize = 6;

/// Epochs and time every validity check needs, read once per packet.
#[derive(Clone, Copy)]
pub struct Validity {
    pub now: u64,
    pub kernel_epoch: u32,
    pub agent_epoch: u32,
    /// Readers take the bucket lock instead of the seqlock check ([`crate::lock::locked_reads`]).
    pub locked_reads: bool,
}

impl Validity {
    #[inline(always)]
    pub fn new(now: u64, state: &State, cfg: &Config) -> Self {
        Validity {
            now,
            kernel_epoch: state.kernel_epoch as u32,
            agent_epoch: cfg.agent_epoch,
            locked_reads: crate::lock::locked_reads(),
        }
    }
}

#[inline(always)]
fn slot_ptr<const TEXT: usize>(bucket: *mut Bucket<TEXT>, way: usize) -> *mut Slot<TEXT> {
    unsafe { (&raw mut (*bucket).slots[way & (WAYS - 1)]) }
}

#[inline(always)]
pub fn is_live<const TEXT: usize>(slot: *const Slot<TEXT>, v: &Validity) -> bool {
    unsafe {
        (*slot).tag != 0
            && (*slot).kernel_epoch == v.kernel_epoch
            && (*slot).agent_epoch == v.agent_epoch
            && v.now < (*slot).expires_at_ns
    }
}

pub enum Found {
    /// The text was staged; its length.
    Hit(u16),
    Miss,
    /// The key is there but expired or flushed.
    Stale,
    /// A write to the bucket overlapped the read.
    Busy,
}

/// The key `key_index` of the request being served: (hash, length). Read from memory for
/// every lookup: values refined by one lookup must not reach the next, or the verifier
/// explores every combination.
#[inline(always)]
fn key_at(s: *mut Scratch, key_index: usize) -> (u32, usize) {
    let k = unsafe { &raw const (*s).keys[key_index & (MAX_KEYS_PER_GET - 1)] };
    unsafe {
        (
            core::ptr::read_volatile(&raw const (*k).hash),
            core::ptr::read_volatile(&raw const (*k).len) as usize,
        )
    }
}

/// Under the bucket lock or inside a read window: is this the key (by tag, length and
/// instance: the bytes are compared later), live, and if so stage its text in `s.reply` at the
/// 8-byte aligned `stage_at`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn read_slot<const TEXT: usize>(
    slot: *mut Slot<TEXT>,
    key_hash: u32,
    key_len: usize,
    instance: u8,
    v: &Validity,
    s: *mut Scratch,
    stage_at: usize,
) -> Found {
    unsafe {
        if (*slot).tag != key_hash
            || (*slot).key_len as usize != key_len
            || (*slot).instance != instance
        {
            return Found::Miss;
        }
        if !is_live(slot, v) {
            return Found::Stale;
        }
        let text_len = (*slot).text_len as usize;
        if text_len > TEXT {
            return Found::Miss;
        }
        // The key bytes are compared after the lookup, on the staged copy (hitpath::keys_match):
        // once per request in its own callback, instead of once per lookup here.
        let text = &raw const (*slot).text;
        // Aligned 8-byte copy; bytes past text_len are ignored by the caller.
        let src = text as *const u64;
        let dst = (&raw mut (*s).reply) as *mut u8;
        let mut w = 0;
        while w < TEXT / 8 {
            if w * 8 >= text_len {
                break;
            }
            let off = (stage_at + w * 8) & (BUF_MASK & !7);
            *(dst.add(off) as *mut u64) = *src.add(w);
            w += 1;
        }
        // Re-read: the loop refined text_len differently at every exit.
        Found::Hit(core::ptr::read_volatile(&raw const (*slot).text_len))
    }
}

/// Looks key `key_index` up in one bucket; on a hit stages the stored text in `s.reply` at the
/// 8-byte aligned `stage_at` and bumps the way's frequency. Lock-free unless
/// `v.locked_reads` (see [`crate::lock`]).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn lookup<const TEXT: usize, const N: usize>(
    map: &BtfArray<Bucket<TEXT>, N>,
    buckets: u32,
    key_index: usize,
    instance: u8,
    v: &Validity,
    s: *mut Scratch,
    stage_at: usize,
) -> Found {
    let (key_hash, key_len) = key_at(s, key_index);
    if buckets == 0 || key_len + KEY_AT > TEXT {
        return Found::Miss;
    }
    let Some(bucket) = map.get_ptr_mut(bucket_index(key_hash, buckets)) else {
        return Found::Miss;
    };
    // Peek at the tags: only a hint, everything is checked again under the lock or inside the
    // read window.
    let mut way = WAYS;
    for w in 0..WAYS {
        let slot = slot_ptr(bucket, w);
        let (tag, len) = unsafe { (core::ptr::read_volatile(&(*slot).tag), (*slot).key_len) };
        if tag == key_hash && len as usize == key_len {
            way = w;
            break;
        }
    }
    if way == WAYS {
        return Found::Miss;
    }
    // Through memory, so the verifier walks one path with an unknown way, not four.
    let way = forget(s, way as u32) as usize;
    let slot = slot_ptr(bucket, way);
    let found = if v.locked_reads {
        let _guard = Guard::lock(unsafe { &raw mut (*bucket).lock });
        read_slot(slot, key_hash, key_len, instance, v, s, stage_at)
    } else {
        let Some(window) = ReadWindow::open(unsafe { &raw const (*bucket).seq }) else {
            return Found::Busy;
        };
        let found = read_slot(slot, key_hash, key_len, instance, v, s, stage_at);
        if !window.clean() {
            return Found::Busy;
        }
        found
    };
    if let Found::Hit(_) = found {
        // Unlocked: a lost increment only blurs the replacement policy.
        unsafe {
            if (*slot).freq < u8::MAX {
                (*slot).freq += 1;
            }
        }
    }
    found
}

/// Which bucket of `buckets` holds `key_hash`: multiply-shift instead of a modulo (a 64-bit
/// division costs more than the rest of the index math together).
#[inline(always)]
pub fn bucket_index(key_hash: u32, buckets: u32) -> u32 {
    ((key_hash as u64 * buckets as u64) >> 32) as u32
}

pub enum Stored {
    Filled,
    /// A write to the key was seen too recently or after the GET: refused.
    Race,
}

/// What a fill carries besides the text in `s.reply[..text_len]`.
pub struct FillItem {
    pub key_hash: u32,
    pub instance: u8,
    pub key_len: u8,
    pub text_len: usize,
    pub expires_at_ns: u64,
    pub kernel_epoch: u32,
    pub agent_epoch: u32,
    /// Coarse time the GET reached XDP, and the write-settle margin.
    pub get_arrived_ns: u64,
    pub settle_ns: u64,
}

/// Stores one item. The write check happens under the bucket lock: a writer records its write
/// time *before* taking the same lock to invalidate, so either it clears our entry afterwards
/// or we see its write time here.
#[inline(always)]
pub fn insert<const TEXT: usize, const N: usize>(
    map: &BtfArray<Bucket<TEXT>, N>,
    buckets: u32,
    item: &FillItem,
    meta: *const KeyMeta,
    v: &Validity,
    s: *const Scratch,
    counters: Option<*mut Counters>,
    class: usize,
) -> Stored {
    if buckets == 0 || item.text_len > TEXT {
        return Stored::Race;
    }
    let Some(bucket) = map.get_ptr_mut(bucket_index(item.key_hash, buckets)) else {
        return Stored::Race;
    };
    let _guard = WriteGuard::lock(unsafe { &raw mut (*bucket).lock }, unsafe {
        &raw mut (*bucket).seq
    });
    unsafe {
        let write_ts = core::ptr::read_volatile(&(*meta).write_ts_ns);
        if write_ts != 0 && write_ts + item.settle_ns >= item.get_arrived_ns {
            return Stored::Race;
        }
        // Same key first, then an empty way, then a dead one, then the least frequent.
        let mut target = WAYS;
        let mut empty = WAYS;
        let mut dead = WAYS;
        let mut coldest = 0;
        let mut coldest_freq = u8::MAX as u32 + 1;
        for w in 0..WAYS {
            let slot = slot_ptr(bucket, w);
            let tag = (*slot).tag;
            if tag == item.key_hash
                && (*slot).key_len == item.key_len
                && (*slot).instance == item.instance
            {
                target = w;
                break;
            }
            if tag == 0 {
                if empty == WAYS {
                    empty = w;
                }
            } else if !is_live(slot, v) {
                if dead == WAYS {
                    dead = w;
                }
            } else if ((*slot).freq as u32) < coldest_freq {
                coldest_freq = (*slot).freq as u32;
                coldest = w;
            }
        }
        if target == WAYS {
            if empty != WAYS {
                target = empty;
                count(counters, Counter::SLOTS_FILLED[class & 3]);
            } else if dead != WAYS {
                target = dead;
            } else {
                target = coldest;
                count(counters, Counter::Evictions);
                for w in 0..WAYS {
                    let slot = slot_ptr(bucket, w);
                    (*slot).freq >>= 1;
                }
            }
        }
        let target = forget(s as *mut Scratch, target as u32) as usize;
        let slot = slot_ptr(bucket, target);
        let src = (&raw const (*s).reply) as *const u64;
        let dst = (&raw mut (*slot).text) as *mut u64;
        let mut w = 0;
        while w < TEXT / 8 {
            if w * 8 >= item.text_len {
                break;
            }
            *dst.add(w) = *src.add(w);
            w += 1;
        }
        (*slot).tag = item.key_hash;
        (*slot).text_len = item.text_len as u16;
        (*slot).key_len = item.key_len;
        (*slot).freq = 1;
        (*slot).instance = item.instance;
        (*slot).kernel_epoch = item.kernel_epoch;
        (*slot).agent_epoch = item.agent_epoch;
        (*slot).expires_at_ns = item.expires_at_ns;
    }
    Stored::Filled
}

/// The size class whose slots hold a text of `text_len` bytes (the smallest that fits).
#[inline(always)]
pub fn class_of(text_len: usize) -> usize {
    if text_len <= TEXT_CAPACITY[0] {
        0
    } else if text_len <= TEXT_CAPACITY[1] {
        1
    } else if text_len <= TEXT_CAPACITY[2] {
        2
    } else {
        3
    }
}

/// [`insert`] into the bucket array of `class`: the one entry point of TC fills and warm fills.
#[inline(always)]
pub fn insert_into_class(
    class: usize,
    cfg: &Config,
    item: &FillItem,
    meta: *const KeyMeta,
    v: &Validity,
    s: *const Scratch,
    c: Option<*mut Counters>,
) -> Stored {
    let b = &cfg.class_buckets;
    match class {
        0 => insert(&CLASS0, b[0], item, meta, v, s, c, 0),
        1 => insert(&CLASS1, b[1], item, meta, v, s, c, 1),
        2 => insert(&CLASS2, b[2], item, meta, v, s, c, 2),
        _ => insert(&CLASS3, b[3], item, meta, v, s, c, 3),
    }
}

/// Clears every way holding `key_hash`, counting each in `SLOTS_CLEARED[class]` (counted in
/// place rather than returned, so no per-path value reaches the caller's verification).
#[inline(always)]
pub fn invalidate<const TEXT: usize, const N: usize>(
    map: &BtfArray<Bucket<TEXT>, N>,
    buckets: u32,
    key_hash: u32,
    counters: Option<*mut Counters>,
    class: usize,
) {
    if buckets == 0 {
        return;
    }
    let Some(bucket) = map.get_ptr_mut(bucket_index(key_hash, buckets)) else {
        return;
    };
    let _guard = WriteGuard::lock(unsafe { &raw mut (*bucket).lock }, unsafe {
        &raw mut (*bucket).seq
    });
    for w in 0..WAYS {
        let slot = slot_ptr(bucket, w);
        unsafe {
            if (*slot).tag == key_hash {
                (*slot).tag = 0;
                count(counters, Counter::SLOTS_CLEARED[class & 3]);
            }
        }
    }
}

/// Copies a plain struct word by word with volatile accesses: a struct assignment would
/// become a call to a byte-at-a-time memcpy.
#[inline(always)]
pub fn copy_words<T>(dst: *mut T, src: *const T) {
    const { assert!(core::mem::size_of::<T>() % 8 == 0) };
    copy_leading_words(dst, src, core::mem::size_of::<T>());
}

/// [`copy_words`] of the struct's first `bytes` (a multiple of 8) only.
#[inline(always)]
pub fn copy_leading_words<T>(dst: *mut T, src: *const T, bytes: usize) {
    let (d, s) = (dst as *mut u64, src as *const u64);
    let mut i = 0;
    while i < bytes / 8 && i < core::mem::size_of::<T>() / 8 {
        unsafe { core::ptr::write_volatile(d.add(i), core::ptr::read_volatile(s.add(i))) };
        i += 1;
    }
}
