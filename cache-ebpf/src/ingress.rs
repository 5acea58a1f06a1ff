//! XDP ingress dispatch: which packets are memcached requests, and what happens to each.
//! UDP `get` goes to the hit path; every other UDP request and every TCP segment to memcached
//! goes through the write scanner. Everything else passes untouched.

use aya_ebpf::{
    bindings::xdp_action,
    cty::c_void,
    helpers::generated::{bpf_loop, bpf_xdp_load_bytes},
    programs::XdpContext,
};
use cache_common::{
    AGENT_SOURCE_PORT, Config, Counter, Counters, FRAME_HEADER_LEN, FlowKey, GET, MAX_INSTANCES,
};

use crate::coherence::{Ttl, flush, write_key};
use crate::csum::udp_checksum_ok;
use crate::guard;
use crate::maps::{CONFIG, JUMP, JUMP_GET, JUMP_SCAN, SCRATCH, TCP_FLOWS};
use crate::net::{
    Frame, Headers, IPPROTO_TCP, IPPROTO_UDP, TCP_FIN, TCP_RST, TCP_SYN, TCP_URG,
    carried_destination, parse,
};
use crate::scanner::{FLOW_SCANNED_BYTES, HoleFill, scan_chunk};
use crate::scratch::{BUF_SIZE, MAX_PENDING, Scratch, helper_len};
use crate::stats::{count, counters};
use crate::store::{copy_leading_words, copy_words};
use crate::unaligned::{load_u32, load_u64, store_u32, store_u64};

pub fn run(ctx: &XdpContext) -> u32 {
    let frame = Frame {
        start: ctx.data(),
        end: ctx.data_end(),
    };
    let Some(h) = parse(&frame) else {
        // A fragmented datagram (or IPv6 with extension headers) for memcached: the scanner
        // cannot follow what memcached will reassemble, and it may be a write.
        if let (Some((proto, port)), Some(cfg)) = (carried_destination(&frame), CONFIG.get(0))
            && instance_for(cfg, port, proto == IPPROTO_TCP).is_some()
        {
            flush(counters(), Counter::FlushUnsynced);
        }
        return xdp_action::XDP_PASS;
    };
    let (Some(cfg), Some(s)) = (CONFIG.get(0), SCRATCH.get_ptr_mut(0)) else {
        return xdp_action::XDP_PASS;
    };
    let c = counters();
    if h.proto == IPPROTO_UDP {
        let Some(instance) = instance_for(cfg, h.dst_port, false) else {
            return xdp_action::XDP_PASS;
        };
        // One bounds check for the frame header and the command: with variable offsets the
        // verifier only trusts the exact pointer that was checked.
        let Some(head) = frame.bytes::<{ FRAME_HEADER_LEN + 4 }>(h.payload_off) else {
            return xdp_action::XDP_PASS;
        };
        let head = PacketHead::read(head);
        save(s, &h, instance, head);
        if head.is_get() {
            // Only the interface in front of memcached serves; elsewhere (loopback) a GET
            // just goes to memcached.
            if ctx.ingress_ifindex() as u32 != cfg.serve_ifindex {
                return xdp_action::XDP_PASS;
            }
            unsafe { JUMP.tail_call(ctx, JUMP_GET) };
            // Only reached if the hit path is not installed: memcached answers.
            return xdp_action::XDP_PASS;
        }
        // Any other datagram may be a write: scan it from a fresh state.
        count(c, Counter::UdpOther);
        return scan_datagram(ctx, s, &h, c);
    } else if h.proto == IPPROTO_TCP {
        let Some(instance) = instance_for(cfg, h.dst_port, true) else {
            return xdp_action::XDP_PASS;
        };
        save(s, &h, instance, PacketHead::NONE);
        let Some((off, len)) = tcp_segment(cfg, &h, s, c) else {
            return xdp_action::XDP_PASS;
        };
        unsafe {
            (*s).pkt.scan_off = off as u32;
            (*s).pkt.scan_len = len as u32;
            (*s).pkt.is_tcp = 1;
        }
    } else {
        return xdp_action::XDP_PASS;
    }
    unsafe { JUMP.tail_call(ctx, JUMP_SCAN) };
    // The scanner is not installed: a write could slip past, so nothing cached may stay.
    flush(c, Counter::FlushUnsynced);
    xdp_action::XDP_PASS
}

/// Hands the UDP datagram whose headers are `h` to the write scanner, from a fresh state.
#[inline(always)]
pub fn scan_datagram(
    ctx: &XdpContext,
    s: *mut Scratch,
    h: &Headers,
    c: Option<*mut Counters>,
) -> u32 {
    unsafe {
        (*s).flow.start(0);
        (*s).pkt.scan_off = (h.payload_off + FRAME_HEADER_LEN) as u32;
        (*s).pkt.scan_len = h.payload_len.saturating_sub(FRAME_HEADER_LEN) as u32;
        (*s).pkt.is_tcp = 0;
        JUMP.tail_call(ctx, JUMP_SCAN);
    }
    // The scanner is not installed: a write could slip past, so nothing cached may stay.
    flush(c, Counter::FlushUnsynced);
    xdp_action::XDP_PASS
}

/// A UDP request's memcached frame header and first four command bytes, as two words (a
/// 12-byte array copy compiles to 12 byte loads and 12 byte stores).
#[derive(Clone, Copy)]
pub struct PacketHead {
    frame_header: u64,
    command: u32,
}

impl PacketHead {
    pub const NONE: PacketHead = PacketHead {
        frame_header: 0,
        command: 0,
    };

    #[inline(always)]
    pub fn read(at: *mut [u8; FRAME_HEADER_LEN + 4]) -> Self {
        let p = at as *const u8;
        unsafe {
            PacketHead {
                frame_header: load_u64(p),
                command: load_u32(p.add(FRAME_HEADER_LEN)),
            }
        }
    }

    #[inline(always)]
    pub fn is_get(&self) -> bool {
        self.command == u32::from_ne_bytes(*GET)
    }
}

#[inline(always)]
pub fn save(s: *mut Scratch, h: &Headers, instance: u8, head: PacketHead) {
    unsafe {
        let p = &raw mut (*s).pkt;
        copy_words(&raw mut (*p).hdr, h);
        (*p).instance = instance as u32;
        let at = (&raw mut (*p).head) as *mut u8;
        store_u64(at, head.frame_header);
        store_u32(at.add(FRAME_HEADER_LEN), head.command);
    }
}

/// The headers `run` saved, for a tail-called program. Kept in scratch, not on the 512-byte
/// stack; every offset in them is bounded again where it meets the packet (Frame::bytes).
#[inline(always)]
pub fn saved_headers(s: *mut Scratch) -> &'static Headers {
    unsafe { &(*s).pkt.hdr }
}

/// The write scanner program (tail-called): scans what `run` chose, one scan buffer at a
/// time, applies the writes, and for TCP stores the flow's state back. A payload longer than
/// one buffer (jumbo frames, large segments on `lo`) is scanned a buffer per call: the program
/// tail-calls itself for the rest, exactly as if the rest were the next segment.
pub fn run_scan(ctx: &XdpContext) -> u32 {
    let Some(s) = SCRATCH.get_ptr_mut(0) else {
        return xdp_action::XDP_PASS;
    };
    let c = counters();
    let h = *saved_headers(s);
    let (off, len, instance, is_tcp) = unsafe {
        let p = &(*s).pkt;
        (
            p.scan_off as usize & 0xffff,
            p.scan_len as usize & 0xffff,
            p.instance as u8,
            p.is_tcp != 0,
        )
    };
    let chunk = if len > BUF_SIZE { BUF_SIZE } else { len };
    let rest = len - chunk;
    let mut followed = scan(ctx, s, off, chunk, instance);
    // A datagram whose checksum is wrong never reaches memcached: its writes are not writes (a
    // TTL taken from one would outlive memcached's item). Checked when the datagram is scanned
    // whole (up to 2 KiB: any on an MTU-sized link; a bigger one on `lo` is left unchecked),
    // after the scan: checked before it, xdp_scan verified in 364k instructions instead of
    // 156k. What the scan did at once stays done: flushes, which only cost hits.
    if !is_tcp && rest == 0 && !datagram_checksum_ok(ctx, s, &h, chunk) {
        return xdp_action::XDP_PASS;
    }
    apply_pending(s);
    // Before a tail call to the segment's next chunk, whose scan starts the flag afresh (found
    // by QA round 8: a binary write in a segment of more than one scan buffer was not flushed).
    if unsafe { (*s).guard_flush } != 0 {
        flush(c, Counter::FlushUnsynced);
    }
    let key = flow_key(&h);
    if is_tcp && let Some(flow) = TCP_FLOWS.get_ptr_mut(&key) {
        unsafe {
            let seq = (*flow).next_seq;
            copy_leading_words(flow, &raw const (*s).flow, FLOW_SCANNED_BYTES);
            (*flow).next_seq = seq.wrapping_add(chunk as u32);
            // Where the next chunk (a tail call) starts, for a guarded scan's positions.
            (*s).flow.next_seq = (*flow).next_seq;
        }
    }
    if followed && rest > 0 {
        unsafe {
            (*s).pkt.scan_off = (off + chunk) as u32;
            (*s).pkt.scan_len = rest as u32;
            JUMP.tail_call(ctx, JUMP_SCAN);
        }
        // Out of tail calls (a payload of more than 32 buffers): the rest goes unscanned.
        followed = false;
    }
    if is_tcp {
        if !followed && let (Some(flow), Some(cfg)) = (TCP_FLOWS.get_ptr_mut(&key), CONFIG.get(0)) {
            // Lost somewhere in this chunk; the rest of the segment goes unscanned.
            unsafe {
                let end = (*flow).next_seq.wrapping_add(rest as u32);
                (*flow).enter_guard(end, guard::window(cfg));
            }
            count(c, Counter::TcpFlowsGuarded);
        }
        if h.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
            let _ = TCP_FLOWS.remove(&key);
        }
    }
    if !followed {
        flush(c, Counter::FlushUnsynced);
    }
    xdp_action::XDP_PASS
}

/// [`udp_checksum_ok`] for a datagram whose payload after the frame header (`len` bytes) the
/// scanner has loaded into `s.req`.
#[inline(always)]
fn datagram_checksum_ok(ctx: &XdpContext, s: *mut Scratch, h: &Headers, len: usize) -> bool {
    let frame = Frame {
        start: ctx.data(),
        end: ctx.data_end(),
    };
    let Some(fh) = frame.bytes::<FRAME_HEADER_LEN>(h.payload_off) else {
        return false;
    };
    let body = unsafe { (&raw mut (*s).req).cast() };
    udp_checksum_ok(&frame, h, fh as *const u8, body, len)
}

/// Which configured memcached instance listens on `port`.
#[inline(always)]
pub fn instance_for(cfg: &Config, port: u16, tcp: bool) -> Option<u8> {
    for i in 0..MAX_INSTANCES {
        let inst = cfg.instances[i];
        let p = if tcp { inst.tcp_port } else { inst.udp_port };
        if p != 0 && p == port {
            // Forgotten, or each instance index is its own verifier state downstream.
            return Some(crate::scratch::forget_value(i) as u8);
        }
    }
    None
}

/// Loads `len` (at most one buffer) payload bytes at `off` into scratch and scans them. False
/// if the stream was lost.
#[inline(always)]
fn scan(ctx: &XdpContext, s: *mut Scratch, off: usize, len: usize, instance: u8) -> bool {
    unsafe {
        (*s).pending_len = 0;
        (*s).pending_overflow = 0;
        (*s).guard_flush = 0;
    }
    if len == 0 {
        return true;
    }
    if len > BUF_SIZE {
        return false;
    }
    let n = helper_len(len);
    if unsafe { bpf_xdp_load_bytes(ctx.ctx, off as u32, (&raw mut (*s).req).cast(), n) } != 0 {
        return false;
    }
    scan_chunk(n, instance) && unsafe { (*s).pending_overflow == 0 }
}

/// Applies the writes the scanner queued, in order (a bpf_loop, so the verifier checks one
/// write, not every count of them).
#[inline(always)]
fn apply_pending(s: *mut Scratch) {
    let n = unsafe { (*s).pending_len };
    if n == 0 {
        return;
    }
    let n = if n as usize > MAX_PENDING {
        MAX_PENDING as u32
    } else {
        n
    };
    let mut unused = 0u64;
    unsafe {
        bpf_loop(
            n,
            apply_step as *const () as *mut c_void,
            (&raw mut unused).cast(),
            0,
        )
    };
}

extern "C" fn apply_step(index: u64, _ctx: *mut c_void) -> i64 {
    let (Some(s), Some(cfg)) = (SCRATCH.get_ptr_mut(0), CONFIG.get(0)) else {
        return 1;
    };
    let p = unsafe { &raw const (*s).pending[index as usize & (MAX_PENDING - 1)] };
    let (key_hash, key_check, kind, exptime, source) = unsafe {
        (
            (*p).key_hash,
            (*p).key_check,
            (*p).ttl_kind,
            (*p).exptime,
            (*p).source,
        )
    };
    let ttl = match kind {
        0 => Ttl::Keep,
        2 => Ttl::Exptime(exptime),
        3 => Ttl::Forget,
        _ => Ttl::Unknown,
    };
    let source = match source {
        x if x == Counter::InvalidateMeta as u32 => Counter::InvalidateMeta,
        x if x == Counter::InvalidateBinary as u32 => Counter::InvalidateBinary,
        _ => Counter::InvalidateText,
    };
    // The agent's own deletes (keys watch reported) are counted by the agent, as `watch`.
    let from_agent = unsafe { (*s).pkt.hdr.src_port } == AGENT_SOURCE_PORT;
    let source = if from_agent { None } else { Some(source) };
    write_key(cfg, key_hash, key_check, ttl, counters(), source);
    0
}

#[inline(always)]
fn flow_key(h: &Headers) -> FlowKey {
    FlowKey {
        addr: h.src,
        client_port: h.src_port,
        server_port: h.dst_port,
        is_v6: h.is_v6 as u8,
        _pad: [0; 3],
    }
}

/// Decides what of a TCP segment to scan, with the flow's state loaded into scratch.
/// None: nothing to scan (or the segment was handled by a flush).
#[inline(always)]
fn tcp_segment(
    cfg: &Config,
    h: &Headers,
    s: *mut Scratch,
    c: Option<*mut Counters>,
) -> Option<(usize, usize)> {
    let key = flow_key(h);
    // The sequence number of the segment's first data byte: a SYN takes one itself.
    let mut data_seq = h.tcp_seq;
    if h.tcp_flags & TCP_SYN != 0 {
        // A new connection: we see it from its first byte, so we can follow it exactly.
        data_seq = h.tcp_seq.wrapping_add(1);
        unsafe {
            (*s).flow.start(data_seq);
            let _ = TCP_FLOWS.insert(&key, &(*s).flow, 0);
        }
        // Data in the SYN (TCP Fast Open) is the stream's first bytes: memcached reads them
        // once the server accepts the cookie (found by QA round 5: a delete sent that way was
        // never seen). If it refuses it, the client sends them again and the scanner, which
        // has seen them, flushes as for any retransmission.
        if h.payload_len == 0 {
            return None;
        }
    }
    if h.payload_len == 0 {
        if h.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
            let _ = TCP_FLOWS.remove(&key);
        }
        return None;
    }
    count(c, Counter::TcpSegments);
    let len = h.payload_len as u32;
    let end = data_seq.wrapping_add(len);
    let Some(flow) = TCP_FLOWS.get_ptr_mut(&key) else {
        // Opened before we were attached (or evicted): we cannot know where commands start.
        // This segment flushes, and the flow goes on in guard mode from its end.
        flush(c, Counter::FlushUnsynced);
        if h.tcp_flags & (TCP_FIN | TCP_RST) == 0 {
            unsafe {
                (*s).flow.start(end);
                (*s).flow.enter_guard(end, guard::window(cfg));
                let _ = TCP_FLOWS.insert(&key, &(*s).flow, 0);
            }
            count(c, Counter::TcpFlowsGuarded);
        }
        return None;
    };
    let state = unsafe { &mut *flow };
    if h.tcp_flags & TCP_URG != 0 {
        // Urgent data: the kernel takes the urgent byte out of the stream memcached reads, so
        // memcached reads other bytes than the scanner would. Lost for good.
        state.mode_lost();
    }
    if state.is_lost() {
        flush(c, Counter::FlushUnsynced);
        return None;
    }
    // The end of what the scan has seen of this flow once this segment is counted.
    let seen_end = if guard::seq_after(end, state.next_seq) {
        end
    } else {
        state.next_seq
    };
    match state.fill_hole(data_seq, len) {
        HoleFill::Elsewhere => {}
        HoleFill::Filled { closed, past } => {
            // memcached reads on past the hole from now on, and applies the writes the
            // scan saw there (maybe later than the write-settle time after it saw them).
            if closed {
                flush(c, Counter::FlushUnsynced);
            }
            // Block bytes only: nothing to scan. Past the hole, the bytes were seen (a
            // retransmission, below) and some may be new.
            if !past {
                return None;
            }
        }
        HoleFill::Lost => {
            state.enter_guard(seen_end, guard::window(cfg));
            count(c, Counter::TcpFlowsGuarded);
            flush(c, Counter::FlushUnsynced);
            return None;
        }
    }
    let expected = state.next_seq;
    let behind = expected.wrapping_sub(data_seq);
    let mut skip = 0u32;
    if behind != 0 {
        if (behind as i32) > 0 {
            // A retransmission: memcached may apply the write later than we saw it.
            flush(c, Counter::FlushUnsynced);
            if behind >= len {
                return None;
            }
            skip = behind;
        } else {
            // A gap: bytes we have not seen yet. Inside a data block memcached only counts
            // them: the scan goes on from this segment, and the gap is one of the flow's holes.
            // Anywhere else the place is lost: guard mode from this segment's end (the bytes
            // missing flush when they come, as any retransmission).
            if !state.jump_gap(behind.wrapping_neg()) {
                state.enter_guard(seen_end, guard::window(cfg));
                count(c, Counter::TcpFlowsGuarded);
                flush(c, Counter::FlushUnsynced);
                return None;
            }
        }
    }
    if state.guard_flushes(data_seq.wrapping_add(skip)) {
        flush(c, Counter::FlushUnsynced);
    }
    unsafe {
        copy_words(&raw mut (*s).flow, flow);
        // next_seq is advanced by the caller from the segment start it expects.
        (*flow).next_seq = data_seq.wrapping_add(skip);
    }
    Some((h.payload_off + skip as usize, (len - skip) as usize))
}
