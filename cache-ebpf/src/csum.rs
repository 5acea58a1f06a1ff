//! Internet checksums (RFC 1071), summed in native byte order: the ones' complement sum is
//! byte-order independent, so a sum of native words, folded and stored natively, lands right.

use aya_ebpf::helpers::generated::bpf_csum_diff;

use crate::net::{Frame, Headers, IPPROTO_UDP, UDP_LEN};
use crate::scratch::BUF_MASK;
use crate::unaligned::{load_u16, load_u32};

/// Folds a 64-bit running sum to 16 bits.
#[inline(always)]
pub fn fold(mut sum: u64) -> u16 {
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The running sum of `bytes` as 16-bit words (an odd last byte is padded with zero).
#[inline(always)]
pub fn sum_bytes(bytes: &[u8]) -> u64 {
    let mut acc = 0u64;
    let mut i = 0;
    while i + 1 < bytes.len() {
        acc += u16::from_ne_bytes([bytes[i], bytes[i + 1]]) as u64;
        i += 2;
    }
    if i < bytes.len() {
        acc += u16::from_ne_bytes([bytes[i], 0]) as u64;
    }
    acc
}

/// The IPv4 header checksum of a 20-byte header whose checksum field is zero.
#[inline(always)]
pub fn ipv4_header(ip: &[u8; 20]) -> [u8; 2] {
    (!fold(sum_bytes(ip))).to_ne_bytes()
}

/// Whether a UDP datagram to memcached has a checksum right, absent (IPv4), or the
/// pseudo-header seed a sender leaves to be completed by offload (CHECKSUM_PARTIAL, seen on
/// veth; on a wire the NIC has completed it). The stack drops a datagram whose checksum is
/// wrong: memcached never sees it, so the cache may neither answer it nor take its writes.
/// The payload is the memcached frame header (8 bytes at `frame_header`) and `body_len` bytes
/// at the aligned scratch buffer `body`, summed only if the checksum is a full one.
#[inline(always)]
pub fn udp_checksum_ok(
    frame: &Frame,
    h: &Headers,
    frame_header: *const u8,
    body: *mut u8,
    body_len: usize,
) -> bool {
    let Some(udp) = frame.bytes::<{ UDP_LEN }>(h.l4_off) else {
        return false;
    };
    let udp = udp as *const u8;
    let field = unsafe { load_u16(udp.add(6)) };
    if field == 0 {
        return !h.is_v6;
    }
    let pseudo = udp_pseudo_sum(h, (UDP_LEN + h.payload_len) as u32);
    if field == fold(pseudo) {
        return true;
    }
    let header = unsafe { load_u32(udp) as u64 + load_u32(udp.add(4)) as u64 };
    let frame_header =
        unsafe { load_u32(frame_header) as u64 + load_u32(frame_header.add(4)) as u64 };
    fold(pseudo + header + frame_header + sum_body(body, body_len)) == 0xffff
}

/// The running sum of the UDP pseudo-header of a datagram of `udp_len` bytes between the
/// addresses in `h` (IPv4 addresses fill the first four bytes; the zeros after them add
/// nothing).
#[inline(always)]
pub fn udp_pseudo_sum(h: &Headers, udp_len: u32) -> u64 {
    sum16(h.src.as_ptr())
        + sum16(h.dst.as_ptr())
        + sum_bytes(&udp_len.to_be_bytes())
        + sum_bytes(&[0, 0, 0, IPPROTO_UDP])
}

/// [`sum_buffer`] of `len` bytes from the start of the aligned scratch buffer `base`, by hand
/// for a short one (a `get` of a key or two: the helper call costs more than the adds).
#[inline(always)]
pub fn sum_body(base: *mut u8, len: usize) -> u64 {
    const SHORT: usize = 64;
    if len > SHORT {
        return sum_buffer(base, 0, len) as u64;
    }
    let whole = len & !3;
    let mut acc = 0u64;
    for word in 0..SHORT / 4 {
        if word * 4 >= whole {
            break;
        }
        acc += unsafe { *(base.add(word * 4) as *const u32) } as u64;
    }
    acc + sum_tail(base, whole, len - whole)
}

/// The last `rem` (0-3) bytes at `base + at`, as one zero-padded native word (read only, never
/// padded in place: another text may start right after them).
#[inline(always)]
fn sum_tail(base: *mut u8, at: usize, rem: usize) -> u64 {
    let mut tail = [0u8; 4];
    for (i, t) in tail.iter_mut().enumerate().take(3) {
        if i < rem {
            *t = unsafe { *base.add((at + i) & BUF_MASK) };
        }
    }
    u32::from_ne_bytes(tail) as u64
}

/// Ones' complement running sum of 16 bytes at `p`, as native 32-bit words.
#[inline(always)]
pub fn sum16(p: *const u8) -> u64 {
    unsafe {
        load_u32(p) as u64
            + load_u32(p.add(4)) as u64
            + load_u32(p.add(8)) as u64
            + load_u32(p.add(12)) as u64
    }
}

/// Ones' complement sum (native order) of `len` bytes at the aligned offset `at` of a scratch
/// buffer (`base`, up to 2 KiB): whole 4-byte words by bpf_csum_diff in 512-byte pieces, the
/// last 1-3 bytes by hand ([`sum_tail`]).
#[inline(always)]
pub fn sum_buffer(base: *mut u8, at: usize, len: usize) -> u16 {
    let whole = len & !3;
    let mut acc = 0u64;
    for piece in 0..4usize {
        let off = piece * 512;
        if off >= whole {
            break;
        }
        let rest = whole - off;
        let size = (if rest > 512 { 512 } else { rest }) & 0x3fc;
        let src = unsafe { base.add(at + off) };
        let sum = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, src.cast(), size as u32, 0) };
        acc += sum as u32 as u64;
    }
    let rem = len - whole;
    if rem > 0 {
        acc += sum_tail(base, at + whole, rem);
    }
    fold(acc)
}
