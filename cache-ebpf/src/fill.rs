//! TC egress fill: memcached's UDP reply to a `get` that missed becomes a cache entry.
//!
//! Only replies to a `get` that XDP saw miss (a fill ticket exists for the client address,
//! port and request id) are used; only single-datagram replies; never `gets` replies (a fifth
//! token is a CAS unique); the item is copied exactly as `<bytes>` says, so values containing
//! `\r\n` round-trip. The reply always continues to the client unchanged.

use aya_ebpf::{helpers::generated::bpf_skb_load_bytes, programs::TcContext};
use cache_common::{
    Config, Counter, Counters, END, FRAME_HEADER_LEN, MAX_KEY_LEN, TC_SERVED_MARK, Ticket,
    TicketKey, VALUE, flags,
    hash::{check_seed, check_step, finish, seed, step},
};

use crate::coherence::fill_held;
use crate::ingress::instance_for;
use crate::learn;
use crate::maps::{CONFIG, KEY_META, MISS_LATENCY, SCRATCH, STATE};
use crate::net::{Frame, IPPROTO_UDP, parse};
use crate::scratch::{MAX_TEXT, Scratch, helper_len};
use crate::stats::{count, counters, record};
use crate::store::{FillItem, Stored, Validity, class_of, insert_into_class};
use crate::time::{coarse_ns, precise_ns};

/// Let later TC programs run; the packet is never changed.
pub const TC_NEXT: i32 = -1;

pub fn run(ctx: &TcContext) -> i32 {
    // A reply tc_serve answered from the cache: nothing to fill.
    unsafe {
        if (*ctx.skb.skb).mark == TC_SERVED_MARK {
            (*ctx.skb.skb).mark = 0;
            return TC_NEXT;
        }
    }
    let frame = Frame {
        start: ctx.data(),
        end: ctx.data_end(),
    };
    let Some(h) = parse(&frame) else {
        return TC_NEXT;
    };
    if h.proto != IPPROTO_UDP || h.payload_len < FRAME_HEADER_LEN + VALUE.len() {
        return TC_NEXT;
    }
    let Some(cfg) = CONFIG.get(0) else {
        return TC_NEXT;
    };
    let Some(instance) = instance_for(cfg, h.src_port, false) else {
        return TC_NEXT;
    };
    let Some(head) = frame.bytes::<{ FRAME_HEADER_LEN + 6 }>(h.payload_off) else {
        return TC_NEXT;
    };
    let head = unsafe { *head };
    let fh = &head[..FRAME_HEADER_LEN];
    if head[FRAME_HEADER_LEN..] != *VALUE {
        return TC_NEXT;
    }
    let c = counters();
    if u16::from_be_bytes([fh[2], fh[3]]) != 0 || u16::from_be_bytes([fh[4], fh[5]]) != 1 {
        count(c, Counter::FillRefusedMultiDatagram);
        return TC_NEXT;
    }
    let key = TicketKey {
        addr: h.dst,
        port: h.dst_port,
        request_id: u16::from_be_bytes([fh[0], fh[1]]),
        instance,
        is_v6: h.is_v6 as u8,
        _pad: 0,
    };
    let Some(ticket) = crate::tickets::find(&key) else {
        count(c, Counter::FillRefusedNoTicket);
        return TC_NEXT;
    };
    // Only timed requests carry their arrival (one in 64, see hitpath::serve).
    if ticket.arrived_ns != 0 {
        record(
            MISS_LATENCY.get_ptr_mut(0),
            precise_ns().wrapping_sub(ticket.arrived_ns),
        );
    }
    let reason = fill(
        ctx,
        cfg,
        &ticket,
        instance,
        h.payload_off + FRAME_HEADER_LEN,
        h.payload_len - FRAME_HEADER_LEN,
        c,
    );
    count(c, reason);
    TC_NEXT
}

#[inline(always)]
fn fill(
    ctx: &TcContext,
    cfg: &Config,
    ticket: &Ticket,
    instance: u8,
    off: usize,
    len: usize,
    c: Option<*mut Counters>,
) -> Counter {
    let now = coarse_ns();
    if cfg.flags & flags::FILL == 0 || now >= cfg.lease_until_ns {
        return Counter::FillRefusedHold;
    }
    if now >= cfg.fill_lease_until_ns {
        return Counter::FillRefusedStall;
    }
    let Some(state) = STATE.get(0) else {
        return Counter::FillRefusedHold;
    };
    if state.kernel_epoch as u32 != ticket.kernel_epoch || cfg.agent_epoch != ticket.agent_epoch {
        return Counter::FillRefusedEpoch;
    }
    if fill_held(cfg, state, ticket.arrived_coarse_ns) {
        return Counter::FillRefusedHold;
    }
    // The datagram is one item, optionally followed by END.
    if len > MAX_TEXT + END.len() {
        return Counter::FillRefusedTooBig;
    }
    let Some(s) = SCRATCH.get_ptr_mut(0) else {
        return Counter::FillRefusedHold;
    };
    if len == 0 {
        return Counter::FillRefusedMalformed;
    }
    let n = helper_len(len);
    if unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            off as u32,
            (&raw mut (*s).reply).cast(),
            n,
        )
    } != 0
    {
        return Counter::FillRefusedMalformed;
    }
    let Some(line) = parse_value_line(s, instance) else {
        return Counter::FillRefusedMalformed;
    };
    if line.has_cas {
        return Counter::FillRefusedCas;
    }
    let text_len = line.header_len + line.bytes + 2;
    if text_len > MAX_TEXT {
        return Counter::FillRefusedTooBig;
    }
    let n = n as usize;
    if !(n == text_len || n == text_len + END.len()) {
        return Counter::FillRefusedMalformed;
    }
    let reply = unsafe { &raw const (*s).reply };
    unsafe {
        if (*reply)[(text_len - 2) & 4095] != b'\r' || (*reply)[(text_len - 1) & 4095] != b'\n' {
            return Counter::FillRefusedMalformed;
        }
    }
    let Some(meta) = KEY_META.get_ptr(line.key_hash % cfg.key_meta_slots.max(1)) else {
        return Counter::FillRefusedHold;
    };
    // The check hash too: a key whose 32-bit hash collides with the written key's must not
    // take its TTL.
    let ttl_known =
        unsafe { (*meta).ttl_tag == line.key_hash && (*meta).ttl_check == line.key_check };
    // A TTL the kernel did not see: with learning on, the entry is stored expired and served
    // only once the agent has read the item's TTL from memcached and installed it (learn.rs),
    // so it never outlives memcached's item. Without learning it lives `max_age_ns`.
    let learn = !ttl_known && cfg.flags & flags::LEARN_TTL != 0;
    let expires_at_ns = if ttl_known {
        unsafe { (*meta).ttl_expires_ns }
    } else if learn {
        0
    } else {
        ticket.arrived_coarse_ns + cfg.max_age_ns
    };
    if expires_at_ns <= now && !learn {
        return Counter::FillRefusedHold;
    }
    let item = FillItem {
        key_hash: line.key_hash,
        instance,
        key_len: line.key_len as u8,
        text_len,
        expires_at_ns,
        kernel_epoch: ticket.kernel_epoch,
        agent_epoch: ticket.agent_epoch,
        get_arrived_ns: ticket.arrived_coarse_ns,
        settle_ns: cfg.write_settle_ns,
    };
    let v = Validity::new(now, state, cfg);
    let class = class_of(text_len);
    match insert_into_class(class, cfg, &item, meta, &v, s, c) {
        Stored::Filled => {
            if learn {
                learn::ask(s, item.key_hash, line.key_len, instance, class, c);
            }
            Counter::Fills
        }
        Stored::Race => Counter::FillRefusedRace,
    }
}

struct ValueLine {
    key_hash: u32,
    key_check: u32,
    key_len: usize,
    /// Bytes up to and including the line's CRLF.
    header_len: usize,
    bytes: usize,
    has_cas: bool,
}

/// Parses `VALUE <key> <flags> <bytes>[ <cas>]\r\n` at the start of `s.reply`. Positions go
/// through scratch memory between the three loops so the verifier does not multiply their
/// exit states.
#[inline(always)]
fn parse_value_line(s: *mut Scratch, instance: u8) -> Option<ValueLine> {
    let reply = unsafe { &raw const (*s).reply };
    let at = |i: usize| unsafe { (*reply)[i & 4095] };
    let pos = unsafe { &raw mut (*s).key_start };
    // Key: from offset 6 to the next space.
    let mut hash = seed(instance);
    let mut check = check_seed(instance);
    let mut i = VALUE.len();
    while i < VALUE.len() + MAX_KEY_LEN + 1 {
        let b = at(i);
        if b == b' ' {
            break;
        }
        if b <= b' ' {
            return None;
        }
        hash = step(hash, b);
        check = check_step(check, b);
        i += 1;
    }
    let key_len = i - VALUE.len();
    if key_len == 0 || key_len > MAX_KEY_LEN {
        return None;
    }
    unsafe { core::ptr::write_volatile(pos, i as u32 + 1) };
    // Flags: decimal digits, then a space.
    let start = unsafe { core::ptr::read_volatile(pos) } as usize;
    let mut j = 0;
    while j < 11 {
        let b = at(start + j);
        if b == b' ' {
            break;
        }
        if !b.is_ascii_digit() {
            return None;
        }
        j += 1;
    }
    if j == 0 || j == 11 {
        return None;
    }
    unsafe { core::ptr::write_volatile(pos, (start + j + 1) as u32) };
    // Bytes: decimal digits, then CRLF (or a space and a CAS unique: a gets reply).
    let start = unsafe { core::ptr::read_volatile(pos) } as usize;
    let mut bytes = 0usize;
    let mut k = 0;
    let mut has_cas = false;
    while k < 11 {
        let b = at(start + k);
        if b == b'\r' {
            break;
        }
        if b == b' ' {
            has_cas = true;
            break;
        }
        if !b.is_ascii_digit() {
            return None;
        }
        bytes = bytes * 10 + (b - b'0') as usize;
        k += 1;
    }
    if k == 0 || k == 11 {
        return None;
    }
    let header_len = start + k + 2;
    if !has_cas && at(start + k + 1) != b'\n' {
        return None;
    }
    if bytes > MAX_TEXT {
        return Some(ValueLine {
            key_hash: 0,
            key_check: 0,
            key_len,
            header_len,
            bytes: MAX_TEXT + 1,
            has_cas,
        });
    }
    // Through memory: each loop exit refined these differently; the rest of the fill must
    // be verified once, not once per exit.
    let forget = |v: usize| crate::scratch::forget(s, v as u32) as usize;
    let key_len = forget(key_len);
    let header_len = forget(header_len);
    let bytes = forget(bytes);
    let key_hash = forget(finish(hash) as usize) as u32;
    let key_check = forget(check as usize) as u32;
    Some(ValueLine {
        key_hash,
        key_check,
        key_len,
        header_len,
        bytes,
        has_cas,
    })
}
