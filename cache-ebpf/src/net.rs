//! Header parsing. One bounds-checked accessor touches the packet; everything else goes through
//! [`Headers`], the parsed view of Ethernet (one 802.1Q tag), IPv4 (with options, never
//! fragments) or IPv6 (no extension headers), and UDP or TCP.

use crate::unaligned::{load_u16, load_u32, load_u64};

pub const ETH_LEN: usize = 14;
pub const VLAN_LEN: usize = 4;
pub const IPV4_LEN: usize = 20;
pub const IPV6_LEN: usize = 40;
pub const UDP_LEN: usize = 8;
/// Every header offset is below this (Ethernet, VLAN, IPv4 with options, TCP with options
/// come to at most 198 bytes).
pub const HEADER_SPAN_MASK: usize = 0x3ff;

const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_URG: u8 = 0x20;

/// The packet between `start` and `end` (xdp_md / __sk_buff data pointers).
#[derive(Clone, Copy)]
pub struct Frame {
    pub start: usize,
    pub end: usize,
}

impl Frame {
    /// A pointer to `N` bytes at `off`, or None if they are not all inside the frame.
    /// Offsets are masked to the header span: parse() hands out offsets the verifier knows nothing
    /// about (see [`forget`]), and a packet pointer may only move by a bounded amount.
    #[inline(always)]
    pub fn bytes<const N: usize>(&self, off: usize) -> Option<*mut [u8; N]> {
        let p = self.start + (off & HEADER_SPAN_MASK);
        if p + N > self.end {
            return None;
        }
        Some(p as *mut [u8; N])
    }

    #[inline(always)]
    pub fn be16_at(&self, off: usize) -> Option<u16> {
        self.bytes::<2>(off)
            .map(|p| u16::from_be(unsafe { load_u16(p as *const u8) }))
    }

    #[inline(always)]
    pub fn len(&self) -> usize {
        self.end - self.start
    }
}

/// What the parsers learned about a frame. Addresses first and 8-byte aligned: zeroing or
/// copying them is then two word stores each, not a byte-loop memset call.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
pub struct Headers {
    /// Source and destination addresses; IPv4 in the first four bytes.
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Offset of the IP header (after Ethernet and an optional VLAN tag).
    pub l3_off: usize,
    /// Offset of the UDP or TCP header.
    pub l4_off: usize,
    /// Offset and length of the L4 payload (IP/UDP lengths, not the frame: no Ethernet padding).
    pub payload_off: usize,
    pub payload_len: usize,
    pub is_v6: bool,
    pub proto: u8,
    pub src_port: u16,
    pub dst_port: u16,
    /// TCP only.
    pub tcp_seq: u32,
    pub tcp_flags: u8,
}

impl Headers {
    /// All fields zero, written as whole words: a struct literal of zeros becomes a call to a
    /// byte-at-a-time memset on this target.
    #[inline(always)]
    pub fn zeroed() -> Headers {
        let mut h = core::mem::MaybeUninit::<Headers>::uninit();
        let words = h.as_mut_ptr() as *mut u64;
        let mut i = 0;
        while i < core::mem::size_of::<Headers>() / 8 {
            unsafe { core::ptr::write_volatile(words.add(i), 0) };
            i += 1;
        }
        // All zeros is a valid Headers (false, 0, empty addresses).
        unsafe { h.assume_init() }
    }
}

/// Parses up to the L4 payload. None for anything that is not plain UDP/TCP over IP.
///
/// Header fields are read as whole words ([`crate::unaligned`]): a byte-array access compiles
/// to one load per byte plus the shifts and ors that join them.
#[inline(always)]
pub fn parse(frame: &Frame) -> Option<Headers> {
    let mut l3_off = ETH_LEN;
    let mut ethertype = frame.be16_at(12)?;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        ethertype = frame.be16_at(16)?;
        l3_off += VLAN_LEN;
    }
    let mut h = Headers::zeroed();
    h.l3_off = l3_off;
    // Bytes of L4 (header + payload) according to the IP header.
    let l4_total;
    if ethertype == ETH_P_IPV4 {
        let ip = frame.bytes::<IPV4_LEN>(l3_off)? as *const u8;
        // Version/IHL, TOS, total length; id, flags and fragment offset; TTL, protocol.
        let [ver_ihl, _, total_hi, total_lo] = unsafe { load_u32(ip) }.to_ne_bytes();
        let [_, _, frag_hi, frag_lo] = unsafe { load_u32(ip.add(4)) }.to_ne_bytes();
        if ver_ihl >> 4 != 4 {
            return None;
        }
        let ihl = ((ver_ihl & 0x0f) as usize) * 4;
        if ihl < IPV4_LEN {
            return None;
        }
        // More-fragments flag or a fragment offset: never ours to touch.
        if u16::from_be_bytes([frag_hi, frag_lo]) & 0x3fff != 0 {
            return None;
        }
        let total = u16::from_be_bytes([total_hi, total_lo]) as usize;
        if total < ihl || !ipv4_checksum_ok(frame, ip, l3_off, ihl) {
            return None;
        }
        h.proto = unsafe { *ip.add(9) };
        // Source and destination are adjacent: one word holds both.
        let addrs = unsafe { load_u64(ip.add(12)) };
        unsafe {
            let src = h.src.as_mut_ptr() as *mut u32;
            let dst = h.dst.as_mut_ptr() as *mut u32;
            *src = addrs as u32;
            *dst = (addrs >> 32) as u32;
        }
        h.l4_off = l3_off + ihl;
        l4_total = total - ihl;
    } else if ethertype == ETH_P_IPV6 {
        let ip = frame.bytes::<IPV6_LEN>(l3_off)? as *const u8;
        // Version...flow label; payload length, next header, hop limit.
        let [ver, ..] = unsafe { load_u32(ip) }.to_ne_bytes();
        let [len_hi, len_lo, next, _] = unsafe { load_u32(ip.add(4)) }.to_ne_bytes();
        if ver >> 4 != 6 {
            return None;
        }
        h.is_v6 = true;
        h.proto = next;
        unsafe {
            let src = h.src.as_mut_ptr() as *mut u64;
            let dst = h.dst.as_mut_ptr() as *mut u64;
            *src = load_u64(ip.add(8));
            *src.add(1) = load_u64(ip.add(16));
            *dst = load_u64(ip.add(24));
            *dst.add(1) = load_u64(ip.add(32));
        }
        h.l4_off = l3_off + IPV6_LEN;
        l4_total = u16::from_be_bytes([len_hi, len_lo]) as usize;
    } else {
        return None;
    }
    if h.proto == IPPROTO_UDP {
        let udp = frame.bytes::<UDP_LEN>(h.l4_off)? as *const u8;
        let [sp_hi, sp_lo, dp_hi, dp_lo, len_hi, len_lo, _, _] =
            unsafe { load_u64(udp) }.to_ne_bytes();
        h.src_port = u16::from_be_bytes([sp_hi, sp_lo]);
        h.dst_port = u16::from_be_bytes([dp_hi, dp_lo]);
        let udp_len = u16::from_be_bytes([len_hi, len_lo]) as usize;
        if udp_len < UDP_LEN || udp_len > l4_total {
            return None;
        }
        h.payload_off = h.l4_off + UDP_LEN;
        h.payload_len = udp_len - UDP_LEN;
    } else if h.proto == IPPROTO_TCP {
        let tcp = frame.bytes::<20>(h.l4_off)? as *const u8;
        let [sp_hi, sp_lo, dp_hi, dp_lo] = unsafe { load_u32(tcp) }.to_ne_bytes();
        h.src_port = u16::from_be_bytes([sp_hi, sp_lo]);
        h.dst_port = u16::from_be_bytes([dp_hi, dp_lo]);
        h.tcp_seq = u32::from_be(unsafe { load_u32(tcp.add(4)) });
        let [doff, flags] = unsafe { load_u16(tcp.add(12)) }.to_ne_bytes();
        let doff = ((doff >> 4) as usize) * 4;
        h.tcp_flags = flags;
        if doff < 20 || doff > l4_total {
            return None;
        }
        h.payload_off = h.l4_off + doff;
        h.payload_len = l4_total - doff;
    } else {
        return None;
    }
    Some(forget(h))
}

/// Whether the IPv4 header of `ihl` bytes at `l3_off` sums to all ones (its checksum is right).
/// The stack drops a header that does not, so memcached never sees the packet: neither may
/// the cache answer it nor the scanner count its write.
#[inline(always)]
fn ipv4_checksum_ok(frame: &Frame, ip: *const u8, l3_off: usize, ihl: usize) -> bool {
    // The fixed 20 bytes, already known to be in the frame; then any options.
    let mut sum = 0u64;
    for word in 0..IPV4_LEN / 4 {
        sum += unsafe { load_u32(ip.add(word * 4)) } as u64;
    }
    for word in IPV4_LEN / 4..15 {
        if word * 4 >= ihl {
            break;
        }
        let Some(w) = frame.bytes::<4>(l3_off + word * 4) else {
            return false;
        };
        sum += unsafe { load_u32(w as *const u8) } as u64;
    }
    crate::csum::fold(sum) == 0xffff
}

/// Passes the parsed offsets and flags through scratch memory so the verifier forgets their
/// exact values. Otherwise every header shape (VLAN or not, IPv4 or IPv6, each IHL) enters
/// the rest of the program as a separate state and the program is verified once per shape.
#[inline(always)]
fn forget(mut h: Headers) -> Headers {
    let Some(s) = crate::maps::SCRATCH.get_ptr_mut(0) else {
        return h;
    };
    let pass = |v: usize| crate::scratch::forget(s, v as u32) as usize;
    h.l3_off = pass(h.l3_off) & 0xff;
    h.l4_off = pass(h.l4_off) & 0xff;
    h.payload_off = pass(h.payload_off) & HEADER_SPAN_MASK;
    h.payload_len = pass(h.payload_len) & 0xffff;
    h.is_v6 = pass(h.is_v6 as usize) != 0;
    h.proto = pass(h.proto as usize) as u8;
    h
}

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_DSTOPTS: u8 = 60;
/// IPv6 extension headers walked to find the transport header (each one a few instructions).
const MAX_EXTENSION_HEADERS: usize = 4;

/// For a packet [`parse`] refuses because of how it is carried, not what it is: the first
/// fragment of a fragmented IPv4 datagram, or IPv6 with extension headers (fragment, hop-by-hop,
/// routing, destination options). Returns its transport protocol and destination port: the
/// datagram memcached will reassemble may be a write the scanner cannot follow. Later
/// fragments carry no port; the first one always exists, so it is the one that counts.
#[inline(always)]
pub fn carried_destination(frame: &Frame) -> Option<(u8, u16)> {
    let mut l3_off = ETH_LEN;
    let mut ethertype = frame.be16_at(12)?;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        ethertype = frame.be16_at(16)?;
        l3_off += VLAN_LEN;
    }
    let (proto, l4_off) = if ethertype == ETH_P_IPV4 {
        let ip = unsafe { &*frame.bytes::<IPV4_LEN>(l3_off)? };
        let frag = u16::from_be_bytes([ip[6], ip[7]]);
        // More fragments follow, and this is the one at offset 0.
        if frag & 0x2000 == 0 || frag & 0x1fff != 0 {
            return None;
        }
        (ip[9], l3_off + ((ip[0] & 0x0f) as usize) * 4)
    } else if ethertype == ETH_P_IPV6 {
        let ip = unsafe { &*frame.bytes::<IPV6_LEN>(l3_off)? };
        let mut next = ip[6];
        let mut off = l3_off + IPV6_LEN;
        let mut walked = 0;
        for _ in 0..MAX_EXTENSION_HEADERS {
            let ext = unsafe { &*frame.bytes::<8>(off)? };
            if next == IPPROTO_FRAGMENT {
                if u16::from_be_bytes([ext[2], ext[3]]) >> 3 != 0 {
                    return None;
                }
                off += 8;
            } else if next == IPPROTO_HOPOPTS || next == IPPROTO_ROUTING || next == IPPROTO_DSTOPTS
            {
                off += (ext[1] as usize + 1) * 8;
            } else {
                break;
            }
            next = ext[0];
            walked += 1;
        }
        if walked == 0 {
            return None;
        }
        (next, off)
    } else {
        return None;
    };
    if proto != IPPROTO_UDP && proto != IPPROTO_TCP {
        return None;
    }
    let ports = unsafe { &*frame.bytes::<4>(l4_off)? };
    Some((proto, u16::from_be_bytes([ports[2], ports[3]])))
}
