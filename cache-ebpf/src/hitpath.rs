//! The hit path: answer a UDP `get` from the cache with XDP_TX, or pass it to memcached. The
//! same code answers, from TC ingress, the hits whose reply the XDP frame could not grow to
//! hold ([`crate::tcserve`]; [`ReplyTarget`] is where the two differ).
//!
//! A request is served only when every key hits and the whole reply fits the frame; otherwise
//! it passes untouched (a miss leaves a fill ticket for the TC program). The reply payload is
//! byte-for-byte what memcached sends: the stored `VALUE <key> <flags> <bytes>\r\n<data>\r\n`
//! texts in request order, then `END\r\n`, behind the request's frame header (same request id,
//! seq 0, total 1).

use aya_ebpf::{
    bindings::xdp_action,
    cty::c_void,
    helpers::generated::{bpf_loop, bpf_xdp_adjust_meta},
    maps::lpm_trie::Key,
    programs::XdpContext,
};
use cache_common::{
    Config, Counter, Counters, END, FRAME_HEADER_LEN, MAX_KEY_LEN, MAX_KEYS_PER_GET, State,
    TC_HANDOFF, TC_HANDOFF_LEN, Ticket, TicketKey, flags,
    hash::{finish, seed, step},
};

use crate::csum::{fold, sum_buffer, udp_checksum_ok, udp_pseudo_sum};
use crate::maps::{
    ALLOW_V4, ALLOW_V6, CLASS0, CLASS1, CLASS2, CLASS3, CONFIG, HIT_LATENCY, SCRATCH, STATE,
};
use crate::net::{Frame, Headers, IPV4_LEN, IPV6_LEN, UDP_LEN};
use crate::reply::{ReplyTarget, XdpTarget};
use crate::scratch::{BUF_MASK, BUF_SIZE, MAX_TEXT, REPLY_MASK, Scratch, forget, helper_len};
use crate::stats::{count, count_n, record};
use crate::store::{Found, KEY_AT, Validity, lookup};
use crate::time::{hit_clock, precise_ns};
use crate::unaligned::{load_u16, load_u32, load_u64, store_u16, store_u32, store_u64};

/// Longest `get` line parsed (a 32-key multi-get of 30-byte keys is about 1000 bytes).
const MAX_REQUEST: usize = 1472;
const GET_LEN: usize = 4;

#[inline(always)]
fn rd(p: *const u32) -> u32 {
    unsafe { core::ptr::read_volatile(p) }
}

#[inline(always)]
fn wr(p: *mut u32, v: u32) {
    unsafe { core::ptr::write_volatile(p, v) }
}

/// The hit-path program (tail-called by `xdp_cache` for every UDP `get`).
pub fn run_get(ctx: &XdpContext) -> u32 {
    let (Some(s), Some(cfg)) = (SCRATCH.get_ptr_mut(0), CONFIG.get(0)) else {
        return xdp_action::XDP_PASS;
    };
    let h = crate::ingress::saved_headers(s);
    let (head, instance) = unsafe { ((*s).pkt.head, (*s).pkt.instance as u8) };
    let c = crate::stats::counters();
    match serve(&XdpTarget(ctx), s, h, &head, cfg, instance, c) {
        Served::Reply => xdp_action::XDP_TX,
        Served::Pass => xdp_action::XDP_PASS,
        // Not a plain one-line `get`: memcached runs every command in the datagram, and a
        // write may follow the get. The scanner reads it as it reads any other datagram.
        Served::Unparsed => crate::ingress::scan_datagram(ctx, s, h, c),
        Served::NoRoom => {
            // Handed over, tc_serve answers (and counts) it on its way up the stack.
            if cfg.flags & flags::TC_SERVE == 0 || !hand_over(ctx) {
                pass(c, Counter::PassNoRoom);
            }
            xdp_action::XDP_PASS
        }
        Served::Broken => xdp_action::XDP_DROP,
    }
}

/// Marks the frame for `tc_serve` with XDP metadata, which the driver hands to the skb.
#[inline(always)]
fn hand_over(ctx: &XdpContext) -> bool {
    if unsafe { bpf_xdp_adjust_meta(ctx.ctx, -(TC_HANDOFF_LEN as i32)) } != 0 {
        return false;
    }
    let meta = unsafe { (*ctx.ctx).data_meta } as usize;
    if meta + TC_HANDOFF_LEN > ctx.data() {
        return false;
    }
    unsafe { *(meta as *mut u32) = TC_HANDOFF };
    true
}

/// What became of a request.
pub enum Served {
    /// The packet is the reply now: send it back.
    Reply,
    /// Untouched, for memcached (the reason is counted).
    Pass,
    /// Not a canonical single-line `get` (the reason is counted): it may carry more commands
    /// than the get.
    Unparsed,
    /// Every key hit but the packet could not grow to hold the reply (not counted yet).
    NoRoom,
    /// The request was overwritten and the reply could not be finished.
    Broken,
}

/// Answers the `get` whose headers are `h` and whose memcached frame header and first four
/// payload bytes are `head`, if every key hits and the reply fits.
#[inline(always)]
pub fn serve<T: ReplyTarget>(
    target: &T,
    s: *mut Scratch,
    h: &Headers,
    head: &[u8; FRAME_HEADER_LEN + 4],
    cfg: &Config,
    instance: u8,
    c: Option<*mut Counters>,
) -> Served {
    // Time one request in 64: a precise clock read costs more than the rest of a cheap step.
    // A timed hit records the hit path's time (if asked), a timed miss memcached's service
    // time (the ticket carries the start to tc_fill); `started` is 0 otherwise.
    let timed = T::FIRST_STAGE && {
        let sample = c
            .map(|c| unsafe { (*c).get(Counter::GetRequests) } & 63 == 0)
            .unwrap_or(false);
        forget(s, sample as u32) != 0
    };
    let started = if timed { precise_ns() } else { 0 };
    if T::FIRST_STAGE {
        count(c, Counter::GetRequests);
    }
    let clock = hit_clock(s);
    let fh = head;
    // Only single-datagram requests: seq 0 of total 1.
    if u16::from_be_bytes([fh[2], fh[3]]) != 0 || u16::from_be_bytes([fh[4], fh[5]]) != 1 {
        return unparsed(c, Counter::PassUnsupported);
    }
    let request_id = u16::from_be_bytes([fh[0], fh[1]]);
    if cfg.flags & flags::SERVE == 0 || clock.lead >= cfg.lease_until_ns {
        return pass(c, Counter::PassNoLease);
    }
    if cfg.flags & flags::ALLOWLIST != 0 && !allowed(h) {
        return pass(c, Counter::PassDenied);
    }
    let req_len = h.payload_len - FRAME_HEADER_LEN;
    if req_len > MAX_REQUEST {
        return unparsed(c, Counter::PassUnsupported);
    }
    if req_len < GET_LEN + 3 {
        return unparsed(c, Counter::PassMalformed);
    }
    let n = helper_len(req_len);
    let off = (h.payload_off + FRAME_HEADER_LEN) as u32;
    if !target.load(off, unsafe { (&raw mut (*s).req).cast() }, n) {
        return unparsed(c, Counter::PassMalformed);
    }
    let Some(nkeys) = parse_keys(s, n as usize, instance) else {
        return unparsed(c, Counter::PassUnsupported);
    };
    if T::FIRST_STAGE {
        count_n(c, Counter::GetKeys, nkeys as u64);
    }
    let Some(state) = STATE.get(0) else {
        return pass(c, Counter::PassMiss);
    };

    let mut hits = HitCtx {
        now: clock.lead,
        kernel_epoch: state.kernel_epoch as u32,
        agent_epoch: cfg.agent_epoch,
        instance: instance as u32,
        staged: 0,
        hits: 0,
        outcome: OUTCOME_HIT,
        text_total: 0,
        _pad: 0,
    };
    // Four adjacent zero fields would become a byte-loop memset call.
    hits.zero_counts();
    // One key (the common case) by a direct call. (More keys inlined, even only in
    // keys_match, exceeded the verifier's budget of a million instructions when xdp_get
    // verified in about 795k; not tried again since it verifies in about 450k.)
    let ctx = (&raw mut hits).cast();
    for_each::<1>(nkeys, s, look_up_key, hit_step, ctx);
    if hits.outcome != OUTCOME_HIT || hits.hits != nkeys {
        if hits.outcome == OUTCOME_STALE {
            count(c, Counter::Expired);
        }
        leave_ticket(h, cfg, state, instance, request_id, clock.lag, started);
        let reason = match hits.outcome {
            OUTCOME_TOO_BIG => Counter::PassTooBig,
            OUTCOME_BUSY => Counter::PassContended,
            _ if hits.hits > 0 => Counter::PassPartial,
            _ => Counter::PassMiss,
        };
        return pass(c, reason);
    }

    if !keys_match(s, nkeys) {
        // Another key with the same 32-bit tag and length is cached: memcached answers.
        leave_ticket(h, cfg, state, instance, request_id, clock.lag, started);
        return pass(c, Counter::PassMiss);
    }

    let payload_len = FRAME_HEADER_LEN + hits.text_total as usize + END.len();
    if payload_len > cfg.max_reply_payload as usize {
        return pass(c, Counter::PassTooBig);
    }
    let l3_len = if h.is_v6 { IPV6_LEN } else { IPV4_LEN };
    let new_len = h.l3_off + l3_len + UDP_LEN + payload_len;
    let frame = target.frame();
    let old_len = frame.len();
    if cfg.max_amplification_pct != 0
        && new_len * 100 > old_len * cfg.max_amplification_pct as usize
    {
        return pass(c, Counter::PassAmplification);
    }
    let saved = SavedHeaders::read(&frame, h);
    let Some(saved) = saved else {
        return pass(c, Counter::PassMalformed);
    };
    let request = unsafe { (&raw mut (*s).req) as *mut u8 };
    if T::FIRST_STAGE && !udp_checksum_ok(&frame, h, head.as_ptr(), request, req_len) {
        return pass(c, Counter::PassMalformed);
    }
    if !target.resize(s, new_len as i32 - old_len as i32, new_len as u32) {
        return Served::NoRoom;
    }
    // From here on the request is gone: the packet is the reply.
    if !write_reply(target, s, h, &saved, request_id, nkeys, payload_len) {
        return Served::Broken;
    }
    count(c, Counter::HitRequests);
    count_n(c, Counter::HitKeys, nkeys as u64);
    if timed && cfg.flags & flags::HIT_LATENCY != 0 {
        record(HIT_LATENCY.get_ptr_mut(0), precise_ns() - started);
    }
    Served::Reply
}

#[inline(always)]
fn unparsed(c: Option<*mut Counters>, reason: Counter) -> Served {
    count(c, reason);
    Served::Unparsed
}

#[inline(always)]
pub fn pass(c: Option<*mut Counters>, reason: Counter) -> Served {
    count(c, reason);
    Served::Pass
}

#[inline(always)]
fn allowed(h: &Headers) -> bool {
    if h.is_v6 {
        ALLOW_V6.get(Key::new(128, h.src)).is_some()
    } else {
        ALLOW_V4
            .get(Key::new(32, [h.src[0], h.src[1], h.src[2], h.src[3]]))
            .is_some()
    }
}

/// Splits `get <key> <key>...\r\n` (in `s.req[..len]`) into keys. Only the canonical form:
/// single spaces, CRLF, 1 to 32 keys of 1 to 250 printable bytes. Anything else is None and
/// goes to memcached.
///
/// The loop index is the only value the verifier tracks exactly; key start and count go
/// through scratch memory (volatile) so states of different iterations merge instead of
/// multiplying.
#[inline(always)]
fn parse_keys(s: *mut Scratch, len: usize, instance: u8) -> Option<u32> {
    let req = unsafe { &raw mut (*s).req };
    let last = len - 1;
    unsafe {
        if (*req)[last & BUF_MASK] != b'\n' || (*req)[(last - 1) & BUF_MASK] != b'\r' {
            return None;
        }
    }
    let nkeys = unsafe { &raw mut (*s).nkeys };
    let key_start = unsafe { &raw mut (*s).key_start };
    let hash = unsafe { &raw mut (*s).hash };
    let bad = unsafe { &raw mut (*s).bad };
    // The scan runs in a bpf_loop over PARSE_PIECE-byte pieces: verified once, whatever the
    // length.
    let limit = unsafe { &raw mut (*s).staged };
    wr(limit, (len - 2) as u32);
    wr(nkeys, 0);
    wr(key_start, GET_LEN as u32);
    wr(hash, seed(instance));
    wr(bad, 0);
    let pieces = ((len - 2 - GET_LEN).div_ceil(PARSE_PIECE)) as u32;
    let mut pc = ParseCtx {
        instance: instance as u32,
        _pad: 0,
    };
    let ctx = (&raw mut pc).cast();
    for_each::<DIRECT_PIECES>(pieces, s, parse_piece, parse_step, ctx);
    finish_key(s, rd(limit) as usize & BUF_MASK, rd(hash));
    if rd(bad) != 0 {
        return None;
    }
    let n = rd(nkeys);
    if n == 0 || n as usize > MAX_KEYS_PER_GET {
        return None;
    }
    Some(n)
}

/// A bpf_loop callback: iteration index and context; nonzero stops the loop.
type Step = extern "C" fn(u64, *mut c_void) -> i64;
/// The same step called directly, given this CPU's scratch memory.
type DirectStep = fn(*mut Scratch, u64, *mut c_void) -> i64;

/// Runs a step for `0..n` as bpf_loop does (until it returns nonzero): `direct`, inlined, when
/// `n <= DIRECT`, else `looped` through bpf_loop. Each bpf_loop iteration costs a call and a
/// return (through the return thunk); each direct copy adds to what the verifier walks.
/// `looped` is the same step as a callback, which must look up scratch itself; `direct` gets
/// it from the caller (each per-CPU lookup costs a few ns). (A closure here would be compiled
/// as a BPF function of its own: a call and a return per step.)
#[inline(always)]
fn for_each<const DIRECT: u32>(
    n: u32,
    s: *mut Scratch,
    direct: DirectStep,
    looped: Step,
    ctx: *mut c_void,
) {
    if n <= DIRECT {
        for index in 0..DIRECT {
            if index >= n || direct(s, index as u64, ctx) != 0 {
                break;
            }
        }
    } else {
        unsafe { bpf_loop(n, looped as *const () as *mut c_void, ctx, 0) };
    }
}

/// Bytes of the request line one `parse_step` call scans: one call covers a BMC-sized key.
const PARSE_PIECE: usize = 16;
/// Request lines of up to this many pieces (a key of up to 64 bytes) are parsed by direct
/// calls ([`for_each`]).
const DIRECT_PIECES: u32 = 4;

#[repr(C)]
struct ParseCtx {
    instance: u32,
    _pad: u32,
}

/// Scans bytes `4 + PARSE_PIECE*index ..` of the request line (up to the CRLF). The running
/// hash stays in a register inside the piece (it changes on every byte); key boundaries,
/// which are rare, go through scratch memory. Four bytes at a time where they are all plain
/// key bytes (the common case), one at a time around spaces and the line's end.
#[inline(always)]
extern "C" fn parse_step(index: u64, ctx: *mut c_void) -> i64 {
    match SCRATCH.get_ptr_mut(0) {
        Some(s) => parse_piece(s, index, ctx),
        None => 1,
    }
}

/// [`parse_step`]'s work.
#[inline(always)]
fn parse_piece(s: *mut Scratch, index: u64, ctx: *mut c_void) -> i64 {
    let instance = unsafe { (*(ctx as *mut ParseCtx)).instance } as u8;
    let req = unsafe { &raw mut (*s).req };
    let hash_cell = unsafe { &raw mut (*s).hash };
    let end = rd(unsafe { &raw mut (*s).staged }) as usize;
    let base = GET_LEN + (index as usize & 0xff) * PARSE_PIECE;
    let mut hash = rd(hash_cell);
    let mut stop = 0;
    for group in 0..PARSE_PIECE / 4 {
        let at = base + group * 4;
        if at >= end {
            stop = 1;
            break;
        }
        // 4-byte aligned: `base` is, and the request sits at an aligned offset of scratch.
        let word = unsafe { *((req as *const u8).add(at & BUF_MASK) as *const u32) };
        if at + 4 <= end && plain_key_bytes(word) {
            hash = step4(hash, word);
            continue;
        }
        for j in 0..4 {
            let i = at + j;
            if i >= end {
                stop = 1;
                break;
            }
            let b = unsafe { (*req)[i & BUF_MASK] };
            if b == b' ' {
                finish_key(s, i, hash);
                hash = seed(instance);
            } else if b <= b' ' || b == 0x7f {
                wr(unsafe { &raw mut (*s).bad }, 1);
            } else {
                hash = step(hash, b);
            }
        }
        if stop != 0 {
            break;
        }
    }
    wr(hash_cell, hash);
    stop
}

/// Whether none of the four bytes of `word` is a space, a control byte or DEL (the classic
/// "has a byte less than n" and "has a zero byte" bit tricks: never a false "yes").
#[inline(always)]
fn plain_key_bytes(word: u32) -> bool {
    const ONES: u32 = 0x0101_0101;
    const HIGH: u32 = 0x8080_8080;
    let below_33 = word.wrapping_sub(ONES * 33) & !word & HIGH;
    let del = word ^ (ONES * 0x7f);
    let has_del = del.wrapping_sub(ONES) & !del & HIGH;
    below_33 | has_del == 0
}

/// [`step`] over the four bytes of `word`, in memory order (little-endian).
#[inline(always)]
fn step4(hash: u32, word: u32) -> u32 {
    let hash = step(hash, word as u8);
    let hash = step(hash, (word >> 8) as u8);
    let hash = step(hash, (word >> 16) as u8);
    step(hash, (word >> 24) as u8)
}

/// Records the key that ends at `end` (exclusive) with running hash `hash`.
#[inline(always)]
fn finish_key(s: *mut Scratch, end: usize, hash: u32) {
    let nkeys = unsafe { &raw mut (*s).nkeys };
    let key_start = unsafe { &raw mut (*s).key_start };
    let bad = unsafe { &raw mut (*s).bad };
    let start = rd(key_start) as usize;
    let len = end.wrapping_sub(start);
    if len == 0 || len > MAX_KEY_LEN {
        wr(bad, 1);
    } else {
        let n = rd(nkeys) as usize;
        if n >= MAX_KEYS_PER_GET {
            wr(bad, 1);
        } else {
            unsafe {
                let k = &mut (*s).keys[n & (MAX_KEYS_PER_GET - 1)];
                k.start = start as u16;
                k.len = len as u16;
                k.hash = finish(hash);
            }
            wr(nkeys, n as u32 + 1);
        }
    }
    wr(key_start, end as u32 + 1);
}

const OUTCOME_HIT: u32 = 0;
const OUTCOME_MISS: u32 = 1;
const OUTCOME_STALE: u32 = 2;
const OUTCOME_TOO_BIG: u32 = 3;
const OUTCOME_BUSY: u32 = 4;

/// bpf_loop context of the per-key lookup.
#[repr(C)]
struct HitCtx {
    now: u64,
    kernel_epoch: u32,
    agent_epoch: u32,
    /// Next free 8-byte aligned offset in `Scratch::reply`.
    staged: u32,
    hits: u32,
    outcome: u32,
    text_total: u32,
    instance: u32,
    _pad: u32,
}

impl HitCtx {
    #[inline(always)]
    fn zero_counts(&mut self) {
        let p = (&raw mut self.staged) as *mut u64;
        unsafe {
            core::ptr::write_volatile(p, 0);
            core::ptr::write_volatile(p.add(1), 0);
        }
    }
}

/// Looks up key `index` in every class (smallest first) and stages its text.
#[inline(always)]
extern "C" fn hit_step(index: u64, ctx: *mut c_void) -> i64 {
    match SCRATCH.get_ptr_mut(0) {
        Some(s) => look_up_key(s, index, ctx),
        None => 1,
    }
}

/// [`hit_step`]'s work.
#[inline(always)]
fn look_up_key(s: *mut Scratch, index: u64, ctx: *mut c_void) -> i64 {
    let ctx = ctx as *mut HitCtx;
    let hc = unsafe { &mut *ctx };
    let v = Validity {
        now: hc.now,
        kernel_epoch: hc.kernel_epoch,
        agent_epoch: hc.agent_epoch,
        locked_reads: crate::lock::locked_reads(),
    };
    // Forgotten: otherwise the first key's exact offset (0) makes the verifier walk every copy
    // loop once for it and once for the rest.
    let stage_at = forget(s, hc.staged) as usize & (BUF_MASK & !7);
    if stage_at + MAX_TEXT > BUF_SIZE + MAX_TEXT {
        hc.outcome = OUTCOME_TOO_BIG;
        return 1;
    }
    let (k, inst) = (index as usize, hc.instance as u8);
    // Looked up here, not carried in the context: a copy on the stack is a value the verifier
    // tracks, and every bucket-count check would split its states (a million instructions).
    let Some(cfg) = CONFIG.get(0) else {
        return 1;
    };
    let b = &cfg.class_buckets;
    let mut found = lookup(&CLASS0, b[0], k, inst, &v, s, stage_at);
    if let Found::Miss = found {
        found = lookup(&CLASS1, b[1], k, inst, &v, s, stage_at);
    }
    if let Found::Miss = found {
        found = lookup(&CLASS2, b[2], k, inst, &v, s, stage_at);
    }
    if let Found::Miss = found {
        found = lookup(&CLASS3, b[3], k, inst, &v, s, stage_at);
    }
    match found {
        Found::Hit(text_len) => staged(hc, s, index, stage_at, text_len),
        // Keep looking at the other keys, only to tell a partial multi-get from a miss: the
        // request goes to memcached either way.
        Found::Stale => {
            hc.outcome = OUTCOME_STALE;
            0
        }
        // A fill or invalidation overlapped the read: memcached answers.
        Found::Busy => {
            hc.outcome = OUTCOME_BUSY;
            1
        }
        Found::Miss => {
            if hc.outcome == OUTCOME_HIT {
                hc.outcome = OUTCOME_MISS;
            }
            0
        }
    }
}

/// Books key `index`'s text, staged at `stage_at`, into the reply being built.
#[inline(always)]
fn staged(hc: &mut HitCtx, s: *mut Scratch, index: u64, stage_at: usize, text_len: u16) -> i64 {
    if text_len as usize > MAX_TEXT || text_len == 0 {
        hc.outcome = OUTCOME_MISS;
        return 1;
    }
    unsafe {
        let kr = &mut (*s).keys[index as usize & (MAX_KEYS_PER_GET - 1)];
        kr.staged_at = stage_at as u16;
        kr.text_len = text_len;
    }
    hc.hits += 1;
    hc.text_total += text_len as u32;
    hc.staged = (stage_at + text_len as usize + 7) as u32 & !7;
    if hc.staged as usize > BUF_SIZE {
        hc.outcome = OUTCOME_TOO_BIG;
        return 1;
    }
    0
}

/// Whether every staged text is for exactly the requested key (lookups match by tag only).
#[inline(always)]
fn keys_match(s: *mut Scratch, nkeys: u32) -> bool {
    let mut mismatch = 0u64;
    let ctx = (&raw mut mismatch).cast();
    for_each::<1>(nkeys, s, check_key, key_check_step, ctx);
    mismatch == 0
}

/// Compares key `index` of the request with the key inside its staged `VALUE <key> ...` text.
#[inline(always)]
extern "C" fn key_check_step(index: u64, ctx: *mut c_void) -> i64 {
    match SCRATCH.get_ptr_mut(0) {
        Some(s) => check_key(s, index, ctx),
        None => {
            unsafe { *(ctx as *mut u64) = 1 };
            1
        }
    }
}

/// [`key_check_step`]'s work.
#[inline(always)]
fn check_key(s: *mut Scratch, index: u64, ctx: *mut c_void) -> i64 {
    let mismatch = ctx as *mut u64;
    let kr = unsafe { (*s).keys[index as usize & (MAX_KEYS_PER_GET - 1)] };
    let (start, len) = (kr.start as usize, kr.len as usize);
    let text = (kr.staged_at as usize & (BUF_MASK & !7)) + KEY_AT;
    let req = unsafe { (&raw const (*s).req) as *const u8 };
    let reply = unsafe { (&raw const (*s).reply) as *const u8 };
    // Eight bytes at a time; the last word's bytes past the key are masked off.
    let mut j = 0;
    while j < MAX_KEY_LEN {
        if j >= len {
            break;
        }
        let (a, b) = unsafe {
            (
                load_u64(req.add((start + j) & BUF_MASK)),
                load_u64(reply.add((text + j) & REPLY_MASK)),
            )
        };
        let left = len - j;
        let mask = if left >= 8 {
            u64::MAX
        } else {
            (1u64 << (left * 8)) - 1
        };
        if (a ^ b) & mask != 0 {
            unsafe { *mismatch = 1 };
            return 1;
        }
        j += 8;
    }
    0
}

/// Records that this GET missed, so TC may fill the cache from memcached's reply.
#[inline(always)]
/// `started`: the precise time the request arrived if it is timed, else 0 (see `serve`).
#[allow(clippy::too_many_arguments)]
fn leave_ticket(
    h: &Headers,
    cfg: &Config,
    state: &State,
    instance: u8,
    request_id: u16,
    now: u64,
    started: u64,
) {
    if cfg.flags & flags::FILL == 0 {
        return;
    }
    let key = TicketKey {
        addr: h.src,
        port: h.src_port,
        request_id,
        instance,
        is_v6: h.is_v6 as u8,
        _pad: 0,
    };
    let ticket = Ticket {
        arrived_coarse_ns: now,
        arrived_ns: started,
        kernel_epoch: state.kernel_epoch as u32,
        agent_epoch: cfg.agent_epoch,
    };
    crate::tickets::leave(&key, &ticket);
}

/// The request's header fields the reply needs, read before the frame is resized (as words,
/// in memory order).
struct SavedHeaders {
    /// Destination MAC: bytes 0-3 and 4-5.
    dst_mac: (u32, u16),
    /// Source MAC: bytes 6-9 and 10-11.
    src_mac: (u32, u16),
    /// The VLAN tag (TPID and TCI), if any.
    vlan: u32,
    /// The first 4 bytes of the IP header (IPv4: version, TOS; IPv6: version, class, flow).
    l3_word0: u32,
}

impl SavedHeaders {
    #[inline(always)]
    fn read(frame: &Frame, h: &Headers) -> Option<Self> {
        let eth = frame.bytes::<16>(0)? as *const u8;
        let first = frame.bytes::<4>(h.l3_off)? as *const u8;
        unsafe {
            Some(SavedHeaders {
                dst_mac: (load_u32(eth), load_u16(eth.add(4))),
                src_mac: (load_u32(eth.add(6)), load_u16(eth.add(10))),
                vlan: load_u32(eth.add(12)),
                l3_word0: load_u32(first),
            })
        }
    }
}

/// bpf_loop context of the per-key payload writes.
#[repr(C)]
struct EmitCtx {
    /// The packet context, as an integer (the callback cannot take it otherwise).
    raw: u64,
    pos: u32,
    payload_off: u32,
    /// 1 if the texts are summed for the UDP checksum.
    sum: u32,
    failed: u32,
    csum: u64,
}

/// Copies key `index`'s staged text into the packet (and adds it to the UDP checksum).
#[inline(always)]
extern "C" fn emit_step<T: ReplyTarget>(index: u64, ctx: *mut c_void) -> i64 {
    match SCRATCH.get_ptr_mut(0) {
        Some(s) => emit_text::<T>(s, index, ctx),
        None => {
            unsafe { (*(ctx as *mut EmitCtx)).failed = 1 };
            1
        }
    }
}

/// [`emit_step`]'s work.
#[inline(always)]
fn emit_text<T: ReplyTarget>(s: *mut Scratch, index: u64, ctx: *mut c_void) -> i64 {
    let e = unsafe { &mut *(ctx as *mut EmitCtx) };
    let kr = unsafe { (*s).keys[index as usize & (MAX_KEYS_PER_GET - 1)] };
    // The last key's text carries END (append_end).
    let len = kr.text_len as usize;
    if len == 0 || len > MAX_TEXT + END.len() {
        e.failed = 1;
        return 1;
    }
    let len = helper_len(len) as usize;
    let at = kr.staged_at as usize & (BUF_MASK & !7);
    let src = unsafe { ((&raw mut (*s).reply) as *mut u8).add(at) };
    // Through memory: the verifier then checks one iteration with an unknown write offset,
    // instead of following the offset from one iteration to the next.
    let pos = forget(s, e.pos) as usize;
    if !T::store_raw(e.raw, pos as u32, src.cast(), len as u32) {
        e.failed = 1;
        return 1;
    }
    if e.sum != 0 {
        let part = sum_buffer(unsafe { (&raw mut (*s).reply) as *mut u8 }, at, len);
        // A text starting at an odd payload offset lands byte-swapped in the sum.
        let odd = (pos - e.payload_off as usize) & 1 == 1;
        e.csum += if odd { part.swap_bytes() } else { part } as u64;
    }
    e.pos = (pos + len) as u32;
    0
}

/// Writes headers (addresses and ports swapped) and the payload into the resized packet.
#[inline(always)]
fn write_reply<T: ReplyTarget>(
    target: &T,
    s: *mut Scratch,
    h: &Headers,
    saved: &SavedHeaders,
    request_id: u16,
    nkeys: u32,
    payload_len: usize,
) -> bool {
    let frame = target.frame();
    let l3 = h.l3_off;
    let l3_len = if h.is_v6 { IPV6_LEN } else { IPV4_LEN };
    let l4 = l3 + l3_len;
    let payload_off = l4 + UDP_LEN;
    let udp_len = (UDP_LEN + payload_len) as u16;

    // Word stores throughout: a byte-array copy compiles to one load and one store per byte.
    // Ethernet: addresses swapped, the VLAN tag kept as it was.
    let Some(eth) = frame.bytes::<18>(0) else {
        return false;
    };
    let eth = eth as *mut u8;
    let ethertype = if h.is_v6 { [0x86, 0xdd] } else { [0x08, 0x00] };
    unsafe {
        store_u32(eth, saved.src_mac.0);
        store_u16(eth.add(4), saved.src_mac.1);
        store_u32(eth.add(6), saved.dst_mac.0);
        store_u16(eth.add(10), saved.dst_mac.1);
        if l3 > 14 {
            store_u32(eth.add(12), saved.vlan);
            store_u16(eth.add(16), u16::from_ne_bytes(ethertype));
        } else {
            store_u16(eth.add(12), u16::from_ne_bytes(ethertype));
        }
    }

    let src = h.dst.as_ptr();
    let dst = h.src.as_ptr();
    if h.is_v6 {
        let Some(ip) = frame.bytes::<{ IPV6_LEN }>(l3) else {
            return false;
        };
        let ip = ip as *mut u8;
        let [len_hi, len_lo] = udp_len.to_be_bytes();
        unsafe {
            store_u32(ip, saved.l3_word0);
            store_u32(
                ip.add(4),
                u32::from_ne_bytes([len_hi, len_lo, crate::net::IPPROTO_UDP, 64]),
            );
            store_u64(ip.add(8), load_u64(src));
            store_u64(ip.add(16), load_u64(src.add(8)));
            store_u64(ip.add(24), load_u64(dst));
            store_u64(ip.add(32), load_u64(dst.add(8)));
        }
    } else {
        let Some(ip) = frame.bytes::<{ IPV4_LEN }>(l3) else {
            return false;
        };
        let ip = ip as *mut u8;
        let [total_hi, total_lo] = ((IPV4_LEN + UDP_LEN + payload_len) as u16).to_be_bytes();
        let tos = saved.l3_word0.to_ne_bytes()[1];
        let words = [
            u32::from_ne_bytes([0x45, tos, total_hi, total_lo]),
            u32::from_ne_bytes([0, 0, 0x40, 0]), // id 0, DF
            u32::from_ne_bytes([64, crate::net::IPPROTO_UDP, 0, 0]), // TTL, protocol, checksum
            unsafe { load_u32(src) },
            unsafe { load_u32(dst) },
        ];
        let sum = words.iter().map(|w| *w as u64).sum::<u64>();
        // The checksum is bytes 10-11: the upper half of the third word.
        let csum = (!fold(sum)) as u32;
        unsafe {
            store_u32(ip, words[0]);
            store_u32(ip.add(4), words[1]);
            store_u32(ip.add(8), words[2] | csum << 16);
            store_u32(ip.add(12), words[3]);
            store_u32(ip.add(16), words[4]);
        }
    }

    // UDP header (checksum 0 for now), then the memcached frame header: same request id,
    // seq 0, total 1.
    let Some(udp) = frame.bytes::<{ UDP_LEN + FRAME_HEADER_LEN }>(l4) else {
        return false;
    };
    let udp = udp as *mut u8;
    let [sport_hi, sport_lo] = h.dst_port.to_be_bytes();
    let [dport_hi, dport_lo] = h.src_port.to_be_bytes();
    let [len_hi, len_lo] = udp_len.to_be_bytes();
    let [id_hi, id_lo] = request_id.to_be_bytes();
    let ports = u32::from_ne_bytes([sport_hi, sport_lo, dport_hi, dport_lo]);
    let length = u32::from_ne_bytes([len_hi, len_lo, 0, 0]);
    let frame_header = u64::from_ne_bytes([id_hi, id_lo, 0, 0, 0, 1, 0, 0]);
    unsafe {
        store_u32(udp, ports);
        store_u32(udp.add(4), length);
        store_u64(udp.add(8), frame_header);
    }
    let summed = h.is_v6 || T::SUM_IPV4;
    let (pseudo, mut datagram) = if summed {
        let pseudo = udp_pseudo_sum(h, udp_len as u32);
        let header =
            ports as u64 + length as u64 + (frame_header & 0xffff_ffff) + (frame_header >> 32);
        (fold(pseudo), header)
    } else {
        (0, 0)
    };

    append_end(s, nkeys);
    let mut emit = EmitCtx {
        raw: target.raw(),
        pos: (payload_off + FRAME_HEADER_LEN) as u32,
        payload_off: payload_off as u32,
        sum: summed as u32,
        failed: 0,
        csum: 0,
    };
    // A single key (the common case) is emitted by a direct call.
    let ctx = (&raw mut emit).cast();
    for_each::<1>(nkeys, s, emit_text::<T>, emit_step::<T>, ctx);
    if emit.failed != 0 {
        return false;
    }
    if summed {
        datagram += emit.csum;
        return target.finish_udp_csum(l4 + 6, pseudo, fold(datagram));
    }
    true
}

/// Stages `END\r\n` right after the last key's text, so the emit copies it along: one packet
/// write fewer than copying it on its own. The last key's text is the last one staged.
#[inline(always)]
fn append_end(s: *mut Scratch, nkeys: u32) {
    unsafe {
        let kr = &raw mut (*s).keys[(nkeys as usize).wrapping_sub(1) & (MAX_KEYS_PER_GET - 1)];
        let at =
            ((*kr).staged_at as usize & (BUF_MASK & !7)) + ((*kr).text_len as usize & BUF_MASK);
        for (i, b) in END.iter().enumerate() {
            (*s).reply[(at + i) & REPLY_MASK] = *b;
        }
        (*kr).text_len += END.len() as u16;
    }
}
