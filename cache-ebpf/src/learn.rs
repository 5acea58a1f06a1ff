//! Learning TTLs the kernel did not see.
//!
//! A `get` reply carries no TTL. When the kernel saw the write that set the item it knows the
//! TTL (KEY_META); otherwise (the item was stored before the agent started, for instance) the
//! entry may live only `max_age_ns`, and the key goes back to memcached every `max_age_ns`.
//! So the fill also queues the key on TTL_QUERIES ([`ask`]); the agent asks memcached for
//! the item's remaining TTL and hands the answer to `xdp_learn_ttl` ([`run_answer`]), which
//! sets the entry's expiry unless a write to the key was seen since the question.
//!
//! Why that is safe: the entry's value is memcached's current item (any write since its fill
//! cleared it). A write recorded before the question minus the settle time is applied in
//! memcached before the question is, so the answer is about that same item; a later write is
//! refused under the bucket lock, by the same rule and lock order as a fill (store::insert).

use aya_ebpf::{
    bindings::{BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, xdp_action},
    btf_maps::Array as BtfArray,
    helpers::generated::bpf_xdp_load_bytes,
    programs::XdpContext,
};
use cache_common::{
    Bucket, Counter, Counters, KeyMeta, QUERY_KEY_BYTES, SHORT_QUERY_KEY_BYTES, Slot, TtlAnswer,
    TtlQuery, TtlQueryOf, WAYS, ttl_answer,
};

use crate::lock::WriteGuard;
use crate::maps::{CLASS0, CLASS1, CLASS2, CLASS3, CONFIG, KEY_META, SCRATCH, STATE, TTL_QUERIES};
use crate::net::Frame;
use crate::scratch::{Scratch, forget};
use crate::stats::count;
use crate::store::{KEY_AT, Validity};
use crate::time::coarse_ns;
use crate::unaligned::load_u64;

/// Every this many queries a CPU queues, it wakes the agent (which also polls every few
/// milliseconds): waking costs more than the rest of the fill.
const WAKE_EVERY: u64 = 64;

/// Queues a key just filled without a known TTL; the fill's value line (`VALUE <key> ...`) is
/// at the start of `s.reply`. Best effort: a full ring only means the entry lives
/// `max_age_ns`.
#[inline(always)]
pub fn ask(
    s: *const Scratch,
    key_hash: u32,
    key_len: usize,
    instance: u8,
    class: usize,
    c: Option<*mut Counters>,
) {
    let head = (key_hash, key_len as u8, instance, class as u8);
    let queued = if key_len <= SHORT_QUERY_KEY_BYTES {
        queue::<SHORT_QUERY_KEY_BYTES>(s, head, c)
    } else {
        queue::<QUERY_KEY_BYTES>(s, head, c)
    };
    count(
        c,
        if queued {
            Counter::TtlQueries
        } else {
            Counter::TtlQueriesDropped
        },
    );
}

/// One record with room for `KEY` key bytes (a multiple of 8); false if the ring was full.
#[inline(always)]
fn queue<const KEY: usize>(
    s: *const Scratch,
    head: (u32, u8, u8, u8),
    c: Option<*mut Counters>,
) -> bool {
    let Some(mut entry) = TTL_QUERIES.reserve::<TtlQueryOf<KEY>>(0) else {
        return false;
    };
    let q = entry.as_mut_ptr();
    let (key_hash, key_len, instance, class) = head;
    unsafe {
        (*q).key_hash = key_hash;
        (*q).key_len = key_len;
        (*q).instance = instance;
        (*q).class = class;
        (*q)._pad = 0;
        // The key, eight bytes at a time from the scratch copy of the reply (bytes past the
        // key are undefined in a query).
        let src = ((&raw const (*s).reply) as *const u8).add(KEY_AT);
        let dst = (&raw mut (*q).key) as *mut u64;
        let mut w = 0;
        while w < KEY / 8 {
            if w * 8 >= key_len as usize {
                break;
            }
            *dst.add(w) = load_u64(src.add(w * 8));
            w += 1;
        }
    }
    let queued_here = c
        .map(|c| unsafe { (*c).get(Counter::TtlQueries) })
        .unwrap_or(0);
    let wake = if queued_here % WAKE_EVERY == WAKE_EVERY - 1 {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    entry.submit(wake as u64);
    true
}

/// `xdp_learn_ttl`: the packet is one [`TtlAnswer`]; writes its `result` and passes.
pub fn run_answer(ctx: &XdpContext) -> u32 {
    let frame = Frame {
        start: ctx.data(),
        end: ctx.data_end(),
    };
    let Some(answer) = frame.bytes::<{ core::mem::size_of::<TtlAnswer>() }>(0) else {
        return xdp_action::XDP_ABORTED;
    };
    let answer = answer as *mut TtlAnswer;
    let result = match SCRATCH.get_ptr_mut(0) {
        Some(s) => install(ctx, answer, s),
        None => ttl_answer::MALFORMED,
    };
    unsafe { (*answer).result = result };
    xdp_action::XDP_PASS
}

#[inline(always)]
fn install(ctx: &XdpContext, answer: *const TtlAnswer, s: *mut Scratch) -> u32 {
    let (Some(cfg), Some(state)) = (CONFIG.get(0), STATE.get(0)) else {
        return ttl_answer::MALFORMED;
    };
    // The key goes to scratch memory: compared there under the lock, at variable offsets.
    let key_at = core::mem::offset_of!(TtlAnswer, query) + core::mem::offset_of!(TtlQuery, key);
    let loaded = unsafe {
        bpf_xdp_load_bytes(
            ctx.ctx,
            key_at as u32,
            (&raw mut (*s).req).cast(),
            QUERY_KEY_BYTES as u32,
        )
    };
    let q = unsafe { &(*answer).query };
    let key_len = q.key_len as usize;
    if loaded != 0 || key_len == 0 || key_len > cache_common::MAX_KEY_LEN {
        return ttl_answer::MALFORMED;
    }
    let Some(meta) = KEY_META.get_ptr(q.key_hash % cfg.key_meta_slots.max(1)) else {
        return ttl_answer::MALFORMED;
    };
    let want = Wanted {
        key_hash: q.key_hash,
        key_len,
        instance: q.instance,
        asked_at_ns: unsafe { (*answer).asked_at_ns },
        expires_at_ns: unsafe { (*answer).expires_at_ns },
        settle_ns: cfg.write_settle_ns,
    };
    let v = Validity::new(coarse_ns(), state, cfg);
    // memcached may have answered from before a write it still had queued.
    if v.now >= cfg.fill_lease_until_ns {
        return ttl_answer::WRITTEN;
    }
    let b = &cfg.class_buckets;
    match q.class {
        0 => install_in(&CLASS0, b[0], &want, meta, &v, s),
        1 => install_in(&CLASS1, b[1], &want, meta, &v, s),
        2 => install_in(&CLASS2, b[2], &want, meta, &v, s),
        3 => install_in(&CLASS3, b[3], &want, meta, &v, s),
        _ => ttl_answer::MALFORMED,
    }
}

struct Wanted {
    key_hash: u32,
    key_len: usize,
    instance: u8,
    asked_at_ns: u64,
    expires_at_ns: u64,
    settle_ns: u64,
}

#[inline(always)]
fn install_in<const TEXT: usize, const N: usize>(
    map: &BtfArray<Bucket<TEXT>, N>,
    buckets: u32,
    want: &Wanted,
    meta: *const KeyMeta,
    v: &Validity,
    s: *const Scratch,
) -> u32 {
    if buckets == 0 || want.key_len + KEY_AT > TEXT {
        return ttl_answer::NO_ENTRY;
    }
    let Some(bucket) = map.get_ptr_mut(crate::store::bucket_index(want.key_hash, buckets)) else {
        return ttl_answer::NO_ENTRY;
    };
    let _guard = WriteGuard::lock(unsafe { &raw mut (*bucket).lock }, unsafe {
        &raw mut (*bucket).seq
    });
    let write_ts = unsafe { core::ptr::read_volatile(&(*meta).write_ts_ns) };
    if write_ts != 0 && write_ts + want.settle_ns >= want.asked_at_ns {
        return ttl_answer::WRITTEN;
    }
    // One way at most can match: a fill replaces a way with the same tag, length and
    // instance (store::insert).
    let mut way = WAYS;
    for w in 0..WAYS {
        let slot = unsafe { &raw const (*bucket).slots[w] };
        let same = unsafe {
            (*slot).tag == want.key_hash
                && (*slot).key_len as usize == want.key_len
                && (*slot).instance == want.instance
        };
        // An entry past max_age may be revived: every write since its fill would have cleared
        // it, so it still holds memcached's item; only flushes (epochs) rule it out.
        if same && filled_in_epoch(slot, v) {
            way = w;
            break;
        }
    }
    if way == WAYS {
        return ttl_answer::NO_ENTRY;
    }
    // Through memory, so the verifier walks the key comparison once, not once per way.
    let way = forget(s as *mut Scratch, way as u32) as usize & (WAYS - 1);
    let slot = unsafe { &raw mut (*bucket).slots[way] };
    if !key_equal(unsafe { &(*slot).text }, s, want.key_len) {
        return ttl_answer::NO_ENTRY;
    }
    unsafe { (*slot).expires_at_ns = want.expires_at_ns };
    ttl_answer::INSTALLED
}

#[inline(always)]
fn filled_in_epoch<const TEXT: usize>(slot: *const Slot<TEXT>, v: &Validity) -> bool {
    unsafe { (*slot).kernel_epoch == v.kernel_epoch && (*slot).agent_epoch == v.agent_epoch }
}

/// Whether the stored text holds the key in `s.req[..key_len]` (tags can collide).
#[inline(always)]
fn key_equal<const TEXT: usize>(text: &[u8; TEXT], s: *const Scratch, key_len: usize) -> bool {
    let req = unsafe { &(*s).req };
    let mut i = 0;
    while i < QUERY_KEY_BYTES {
        if i >= key_len {
            return true;
        }
        if KEY_AT + i >= TEXT || text[KEY_AT + i] != req[i & (QUERY_KEY_BYTES - 1)] {
            return false;
        }
        i += 1;
    }
    true
}
