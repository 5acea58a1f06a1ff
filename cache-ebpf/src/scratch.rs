//! Per-CPU working memory. The eBPF stack is 512 bytes; requests, replies and key lists live here.
//! Buffers are a power of two plus slack, so an offset masked with [`BUF_MASK`] plus an 8-byte
//! access always stays inside, which is what lets the verifier accept variable offsets.

use cache_common::MAX_KEYS_PER_GET;

use crate::net::Headers;
use crate::scanner::FlowState;
use crate::time::ClockCache;

pub const BUF_SIZE: usize = 2048;
pub const BUF_MASK: usize = BUF_SIZE - 1;
const BUF_ALLOC: usize = BUF_SIZE + 16;
/// The largest text one slot holds.
pub const MAX_TEXT: usize = cache_common::TEXT3;
/// Room for a helper-sized copy (up to BUF_SIZE) from any staged offset, so `staged_at +
/// len` needs no joint bound.
const REPLY_ALLOC: usize = 2 * BUF_SIZE + 16;
/// Masks an offset into `Scratch::reply` (staged texts may run past BUF_SIZE).
pub const REPLY_MASK: usize = 2 * BUF_SIZE - 1;

/// Passes a value through scratch memory: the verifier forgets what it knew about it. Used
/// wherever values that differ per path (a loop's exit, a header shape, a way index) would
/// otherwise make the verifier walk the rest of the program once per value.
#[inline(always)]
pub fn forget(s: *mut Scratch, v: u32) -> u32 {
    unsafe {
        let cell = &raw mut (*s).launder;
        core::ptr::write_volatile(cell, v);
        core::ptr::read_volatile(cell)
    }
}

/// [`forget`] for callers that do not hold the scratch pointer.
#[inline(always)]
pub fn forget_value(v: usize) -> usize {
    match crate::maps::SCRATCH.get_ptr_mut(0) {
        Some(s) => forget(s, v as u32) as usize,
        None => v,
    }
}

/// A length for a helper's size argument, in `1..=BUF_SIZE` by construction: the verifier
/// rejects a size whose range includes 0, and a bounds check on another register does not
/// count. Exact for `1 <= len <= BUF_SIZE`, which callers check first.
#[inline(always)]
pub fn helper_len(len: usize) -> u32 {
    ((len.wrapping_sub(1) & BUF_MASK) + 1) as u32
}

/// One key of a `get` request, located in [`Scratch::req`].
#[repr(C)]
#[derive(Clone, Copy)]
pub struct KeyRef {
    pub start: u16,
    pub len: u16,
    pub hash: u32,
    /// Where the key's reply text was staged in [`Scratch::reply`], and its length.
    pub staged_at: u16,
    pub text_len: u16,
    pub _pad: u32,
}

/// Writes found in one scanned chunk, applied after the scan (see scanner::queue_write).
/// Enough for every write a full buffer can hold (the shortest, `md k\n`, is 5 bytes): a
/// client pipelining small writes must not overflow it, or its stream would be lost and
/// every later segment of it would flush the cache.
pub const MAX_PENDING: usize = 512;
const _: () = assert!(MAX_PENDING * 5 >= BUF_SIZE);

#[repr(C)]
#[derive(Clone, Copy)]
pub struct PendingWrite {
    pub key_hash: u32,
    /// The Counter naming the protocol.
    pub source: u32,
    /// 0 keep, 1 unknown, 2 exptime, 3 forget.
    pub ttl_kind: u32,
    /// The key's check hash (cache_common::hash::key_check).
    pub key_check: u32,
    pub exptime: i64,
}

/// What the entry program learned about the packet, for the program it tail-calls. The
/// callee reads it from memory, so it is verified once, whatever header shape led to it.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
pub struct PacketInfo {
    pub hdr: Headers,
    pub instance: u32,
    /// The stream bytes to scan (write scanner).
    pub scan_off: u32,
    pub scan_len: u32,
    /// TCP: the flow whose state is in `Scratch::flow` and must be written back.
    pub is_tcp: u32,
    /// The memcached frame header and first 4 command bytes (hit path).
    pub head: [u8; 12],
    pub _pad: u32,
}

#[repr(C)]
pub struct Scratch {
    pub pkt: PacketInfo,
    /// Request payload (after the memcached frame header), or a chunk of a write stream.
    pub req: [u8; BUF_ALLOC],
    /// Reply texts staged at 8-byte aligned offsets, or the reply payload being filled.
    pub reply: [u8; REPLY_ALLOC],
    pub keys: [KeyRef; MAX_KEYS_PER_GET],
    // Parser state kept in memory on purpose (see hitpath::parse_keys).
    pub nkeys: u32,
    pub key_start: u32,
    pub hash: u32,
    pub bad: u32,
    pub staged: u32,
    pub hits: u32,
    /// Where values go to be forgotten by the verifier (see [`forget`]).
    pub launder: u32,
    /// 1 if growing the frame at the head worked last time on this CPU (see hitpath::resize).
    pub grow_head_first: u32,
    pub pending: [PendingWrite; MAX_PENDING],
    pub pending_len: u32,
    pub pending_overflow: u32,
    /// Set by the scan of a guarded flow ([`crate::guard`]): a binary write may land within
    /// this chunk, so it flushes.
    pub guard_flush: u32,
    pub _pad: u32,
    /// Scanner state of the stream being scanned (copied in and out of TCP_FLOWS).
    pub flow: FlowState,
    /// The hit path's clock (see time::hit_clock).
    pub clock: ClockCache,
}

// hitpath::parse_step reads the request four bytes at a time from 4-byte aligned offsets.
const _: () = assert!(core::mem::offset_of!(Scratch, req) % 8 == 0);
