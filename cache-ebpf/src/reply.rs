//! Where a hit's reply is built: in the XDP frame (sent back with XDP_TX) or in the skb at TC
//! ingress (sent back with bpf_redirect). The hit path ([`crate::hitpath::serve`]) is written
//! once against [`ReplyTarget`]; each target brings its own packet helpers, its way of
//! growing the packet and its UDP checksum rule.

use aya_ebpf::{
    bindings::{__sk_buff, xdp_md},
    cty::c_void,
    helpers::generated::{
        bpf_l4_csum_replace, bpf_skb_change_tail, bpf_skb_load_bytes, bpf_skb_store_bytes,
        bpf_xdp_adjust_head, bpf_xdp_adjust_tail, bpf_xdp_load_bytes, bpf_xdp_store_bytes,
    },
    programs::{TcContext, XdpContext},
};

use crate::csum::fold;
use crate::net::{Frame, HEADER_SPAN_MASK};
use crate::scratch::Scratch;
use crate::unaligned::copy_with_frame;

/// Longest text the XDP target copies into the frame itself; longer ones go through
/// bpf_xdp_store_bytes (the copy loop is bounded by this).
const DIRECT_STORE_MAX: usize = 128;
/// Bounds a frame offset for the verifier (no reply reaches 4 KiB).
const FRAME_OFFSET_MASK: usize = 0xfff;

/// `bpf_l4_csum_replace` flags: a 2-byte field, and a result of 0 is sent as 0xffff (0 means
/// "no checksum" in UDP).
const CSUM_FIELD_2: u64 = 2;
const BPF_F_MARK_MANGLED_0: u64 = 1 << 5;

pub trait ReplyTarget {
    /// True for the stage that sees every request first (XDP): it counts and times them, and
    /// may hand a reply it has no room for to the next stage. The TC stage sees only what XDP
    /// handed over, already counted.
    const FIRST_STAGE: bool;
    /// Whether IPv4 replies need a computed UDP checksum (0, "none", is legal for IPv4).
    const SUM_IPV4: bool;

    fn frame(&self) -> Frame;
    /// The context as an integer, for bpf_loop callbacks (see [`ReplyTarget::store_raw`]).
    fn raw(&self) -> u64;
    /// Copies `len` packet bytes at `off` to `to`.
    fn load(&self, off: u32, to: *mut c_void, len: u32) -> bool;
    /// Copies `len` bytes from `from` into the packet at `off`; `raw` is [`ReplyTarget::raw`].
    fn store_raw(raw: u64, off: u32, from: *mut c_void, len: u32) -> bool;
    /// Makes the packet `delta` bytes longer (or shorter) so it is `new_len` bytes; on failure
    /// the packet is as it was. `s`: this CPU's scratch memory.
    fn resize(&self, s: *mut Scratch, delta: i32, new_len: u32) -> bool;
    /// Writes the UDP checksum at `off`, given the folded sums of the pseudo-header and of the
    /// UDP header (checksum field zero) plus payload.
    fn finish_udp_csum(&self, off: usize, pseudo: u16, datagram: u16) -> bool;
}

/// The XDP frame: the reply replaces the request in place and leaves with XDP_TX.
pub struct XdpTarget<'a>(pub &'a XdpContext);

impl ReplyTarget for XdpTarget<'_> {
    const FIRST_STAGE: bool = true;
    const SUM_IPV4: bool = false;

    #[inline(always)]
    fn frame(&self) -> Frame {
        Frame {
            start: self.0.data(),
            end: self.0.data_end(),
        }
    }

    #[inline(always)]
    fn raw(&self) -> u64 {
        self.0.ctx as u64
    }

    /// A short request (a `get` of a key or two) is copied straight from the frame: the
    /// helper call costs more than the copy.
    #[inline(always)]
    fn load(&self, off: u32, to: *mut c_void, len: u32) -> bool {
        let f = self.frame();
        let src = f.start + (off as usize & HEADER_SPAN_MASK);
        let direct = off as usize <= HEADER_SPAN_MASK
            && unsafe { copy_with_frame::<64, false>(src, f.end, to.cast(), len as usize) };
        direct || unsafe { bpf_xdp_load_bytes(self.0.ctx, off, to, len) == 0 }
    }

    /// Texts up to [`DIRECT_STORE_MAX`] bytes are copied straight into the frame.
    #[inline(always)]
    fn store_raw(raw: u64, off: u32, from: *mut c_void, len: u32) -> bool {
        let ctx = raw as *mut xdp_md;
        let direct = off as usize <= FRAME_OFFSET_MASK && len as usize <= DIRECT_STORE_MAX && {
            let (start, end) = unsafe { ((*ctx).data as usize, (*ctx).data_end as usize) };
            let dst = start + (off as usize & FRAME_OFFSET_MASK);
            unsafe {
                copy_with_frame::<DIRECT_STORE_MAX, true>(dst, end, from.cast(), len as usize)
            }
        };
        direct || unsafe { bpf_xdp_store_bytes(ctx, off, from, len) == 0 }
    }

    /// Tail growth is the cheap way but veth (and drivers with small buffers) often refuse it;
    /// head growth works inside the 256-byte XDP headroom; a mix covers the rest.
    #[inline(always)]
    fn resize(&self, s: *mut Scratch, delta: i32, _new_len: u32) -> bool {
        let ctx = self.0.ctx;
        unsafe {
            if delta <= 0 {
                return delta == 0 || bpf_xdp_adjust_tail(ctx, delta) == 0;
            }
            // Drivers either have tailroom (page-sized buffers) or not (veth): start with what
            // worked last time on this CPU, so the common case costs one helper call.
            let head_first = &raw mut (*s).grow_head_first;
            let prefer_head = *head_first != 0;
            if prefer_head && bpf_xdp_adjust_head(ctx, -delta) == 0 {
                return true;
            }
            if bpf_xdp_adjust_tail(ctx, delta) == 0 {
                *head_first = 0;
                return true;
            }
            if !prefer_head && bpf_xdp_adjust_head(ctx, -delta) == 0 {
                *head_first = 1;
                return true;
            }
            for head in [192i32, 128, 64] {
                if head < delta && bpf_xdp_adjust_head(ctx, -head) == 0 {
                    if bpf_xdp_adjust_tail(ctx, delta - head) == 0 {
                        return true;
                    }
                    bpf_xdp_adjust_head(ctx, head);
                }
            }
        }
        false
    }

    /// The frame leaves as it is: the final checksum (IPv6 only; IPv4 sends 0).
    #[inline(always)]
    fn finish_udp_csum(&self, off: usize, pseudo: u16, datagram: u16) -> bool {
        let mut csum = !fold(pseudo as u64 + datagram as u64);
        if csum == 0 {
            csum = 0xffff;
        }
        let Some(c) = self.frame().bytes::<2>(off) else {
            return false;
        };
        unsafe { *c = csum.to_ne_bytes() };
        true
    }
}

/// The skb at TC ingress: the reply is built in it and redirected out of the same interface.
pub struct SkbTarget<'a>(pub &'a TcContext);

impl SkbTarget<'_> {
    #[inline(always)]
    fn skb(&self) -> *mut __sk_buff {
        self.0.skb.skb
    }
}

impl ReplyTarget for SkbTarget<'_> {
    const FIRST_STAGE: bool = false;
    const SUM_IPV4: bool = true;

    #[inline(always)]
    fn frame(&self) -> Frame {
        Frame {
            start: self.0.data(),
            end: self.0.data_end(),
        }
    }

    #[inline(always)]
    fn raw(&self) -> u64 {
        self.skb() as u64
    }

    #[inline(always)]
    fn load(&self, off: u32, to: *mut c_void, len: u32) -> bool {
        unsafe { bpf_skb_load_bytes(self.skb().cast(), off, to, len) == 0 }
    }

    #[inline(always)]
    fn store_raw(raw: u64, off: u32, from: *mut c_void, len: u32) -> bool {
        unsafe { bpf_skb_store_bytes(raw as *mut __sk_buff, off, from, len, 0) == 0 }
    }

    /// An skb grows at the tail as far as needed (the kernel reallocates it if it must).
    #[inline(always)]
    fn resize(&self, _s: *mut Scratch, _delta: i32, new_len: u32) -> bool {
        unsafe { bpf_skb_change_tail(self.skb(), new_len, 0) == 0 }
    }

    /// The skb may still be CHECKSUM_PARTIAL (veth, virtio: the sender left the checksum to
    /// "hardware"), and then whoever transmits it computes the checksum over the datagram,
    /// starting from the pseudo-header sum in the field. So the field gets that seed first;
    /// then one non-pseudo-header replace turns the seed into the final checksum, which the
    /// kernel applies only when the skb is not CHECKSUM_PARTIAL. Seed s, datagram sum d: the
    /// replace computes ~(~s + to), and ~s + to = s + d for to = 2s + d.
    #[inline(always)]
    fn finish_udp_csum(&self, off: usize, pseudo: u16, datagram: u16) -> bool {
        {
            let Some(c) = self.frame().bytes::<2>(off) else {
                return false;
            };
            unsafe { *c = pseudo.to_ne_bytes() };
        }
        let to = fold(2 * pseudo as u64 + datagram as u64);
        unsafe {
            bpf_l4_csum_replace(
                self.skb(),
                off as u32,
                0,
                to as u64,
                CSUM_FIELD_2 | BPF_F_MARK_MANGLED_0,
            ) == 0
        }
    }
}
