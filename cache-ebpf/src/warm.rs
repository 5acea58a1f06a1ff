//! Warm start: `xdp_warm_fill` stores an item the agent read from memcached when it started
//! (`lru_crawler metadump`, then a `get`), so a new agent in front of a populated memcached
//! does not begin with every key a miss.
//!
//! The item goes through the same store::insert as a TC fill, as if its GET had reached XDP
//! when the agent started asking: refused under the bucket lock if a write to the key was seen
//! since then (plus the settle time), and tagged with the epochs of that moment, so a flush in
//! between makes it dead on arrival.

use aya_ebpf::{
    bindings::xdp_action, helpers::generated::bpf_xdp_load_bytes, programs::XdpContext,
};
use cache_common::{Counter, WARM_FILL_HEADER, WarmFill, flags, warm_fill};

use crate::coherence::fill_held;
use crate::maps::{CONFIG, KEY_META, SCRATCH, STATE};
use crate::scratch::{MAX_TEXT, helper_len};
use crate::stats::{count, counters};
use crate::store::{FillItem, KEY_AT, Stored, Validity, class_of, insert_into_class};
use crate::time::coarse_ns;

/// `xdp_warm_fill`: the packet is one [`WarmFill`]; writes its `result` and passes.
pub fn run(ctx: &XdpContext) -> u32 {
    let frame = crate::net::Frame {
        start: ctx.data(),
        end: ctx.data_end(),
    };
    let Some(header) = frame.bytes::<WARM_FILL_HEADER>(0) else {
        return xdp_action::XDP_ABORTED;
    };
    let w = header as *mut WarmFill;
    let result = store(ctx, w, frame.len());
    unsafe { (*w).result = result };
    xdp_action::XDP_PASS
}

#[inline(always)]
fn store(ctx: &XdpContext, w: *const WarmFill, frame_len: usize) -> u32 {
    let (Some(cfg), Some(state), Some(s)) = (CONFIG.get(0), STATE.get(0), SCRATCH.get_ptr_mut(0))
    else {
        return warm_fill::MALFORMED;
    };
    let (text_len, key_len) = unsafe { ((*w).text_len as usize, (*w).key_len as usize) };
    if text_len == 0
        || text_len > MAX_TEXT
        || WARM_FILL_HEADER + text_len > frame_len
        || key_len == 0
        || key_len + KEY_AT > text_len
    {
        return warm_fill::MALFORMED;
    }
    let asked_at = unsafe { (*w).asked_at_ns };
    let now = coarse_ns();
    if cfg.flags & flags::FILL == 0
        || now >= cfg.lease_until_ns
        || now >= cfg.fill_lease_until_ns
        || state.kernel_epoch as u32 != unsafe { (*w).kernel_epoch }
        || cfg.agent_epoch != unsafe { (*w).agent_epoch }
        || fill_held(cfg, state, asked_at)
    {
        return warm_fill::REFUSED;
    }
    let loaded = unsafe {
        bpf_xdp_load_bytes(
            ctx.ctx,
            WARM_FILL_HEADER as u32,
            (&raw mut (*s).reply).cast(),
            helper_len(text_len),
        )
    };
    if loaded != 0 {
        return warm_fill::MALFORMED;
    }
    let key_hash = unsafe { (*w).key_hash };
    let Some(meta) = KEY_META.get_ptr(key_hash % cfg.key_meta_slots.max(1)) else {
        return warm_fill::MALFORMED;
    };
    let item = FillItem {
        key_hash,
        instance: unsafe { (*w).instance },
        key_len: key_len as u8,
        text_len,
        expires_at_ns: unsafe { (*w).expires_at_ns },
        kernel_epoch: unsafe { (*w).kernel_epoch },
        agent_epoch: unsafe { (*w).agent_epoch },
        get_arrived_ns: asked_at,
        settle_ns: cfg.write_settle_ns,
    };
    let v = Validity::new(now, state, cfg);
    let c = counters();
    match insert_into_class(class_of(text_len), cfg, &item, meta, &v, s, c) {
        Stored::Filled => {
            count(c, Counter::WarmFills);
            warm_fill::FILLED
        }
        Stored::Race => warm_fill::RACED,
    }
}
