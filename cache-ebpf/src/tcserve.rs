//! TC ingress: answers the hits XDP handed over because its frame could not grow to hold the
//! reply (veth, and drivers whose receive buffers have little tailroom). An skb grows at the
//! tail as far as the reply needs, so values up to what one datagram carries are answered in
//! the kernel; the reply leaves through the interface the request came in on (bpf_redirect).
//!
//! Only requests XDP marked ([`TC_HANDOFF`] in the XDP metadata) are looked at: the lookup
//! runs again here (the same seqlock reads), so a write that arrived in between is honoured.
//! Everything else goes up the stack untouched.

use aya_ebpf::{
    bindings::TC_ACT_SHOT,
    helpers::generated::{bpf_redirect, bpf_skb_pull_data},
    programs::TcContext,
};
use cache_common::{Counter, FRAME_HEADER_LEN, TC_HANDOFF, TC_HANDOFF_LEN, TC_SERVED_MARK};

use crate::fill::TC_NEXT;
use crate::hitpath::{Served, pass, serve};
use crate::ingress::{PacketHead, instance_for, save, saved_headers};
use crate::maps::{CONFIG, SCRATCH};
use crate::net::{Frame, IPPROTO_UDP, IPV4_LEN, parse};
use crate::reply::SkbTarget;
use crate::stats::{count, counters};

pub fn run(ctx: &TcContext) -> i32 {
    if !handed_over(ctx) {
        return TC_NEXT;
    }
    let c = counters();
    // The headers must be in the linear part of the skb to be read in place.
    let len = ctx.len();
    if ((ctx.data_end() - ctx.data()) as u32) < len
        && unsafe { bpf_skb_pull_data(ctx.skb.skb, len) } != 0
    {
        pass(c, Counter::PassMalformed);
        return TC_NEXT;
    }
    let frame = Frame {
        start: ctx.data(),
        end: ctx.data_end(),
    };
    let (Some(h), Some(cfg), Some(s)) = (parse(&frame), CONFIG.get(0), SCRATCH.get_ptr_mut(0))
    else {
        pass(c, Counter::PassMalformed);
        return TC_NEXT;
    };
    if h.proto != IPPROTO_UDP {
        pass(c, Counter::PassMalformed);
        return TC_NEXT;
    }
    // The reply has a plain 20-byte IPv4 header, so with options its UDP header would move,
    // and an skb whose checksum is left to offload (CHECKSUM_PARTIAL) points at the old place.
    if !h.is_v6 && h.l4_off != h.l3_off + IPV4_LEN {
        pass(c, Counter::PassUnsupported);
        return TC_NEXT;
    }
    let Some(instance) = instance_for(cfg, h.dst_port, false) else {
        pass(c, Counter::PassUnsupported);
        return TC_NEXT;
    };
    let Some(head) = frame.bytes::<{ FRAME_HEADER_LEN + 4 }>(h.payload_off) else {
        pass(c, Counter::PassMalformed);
        return TC_NEXT;
    };
    let head = PacketHead::read(head);
    if !head.is_get() {
        pass(c, Counter::PassUnsupported);
        return TC_NEXT;
    }
    save(s, &h, instance, head);
    let h = saved_headers(s);
    let head = unsafe { (*s).pkt.head };
    match serve(&SkbTarget(ctx), s, h, &head, cfg, instance, c) {
        Served::Reply => {
            count(c, Counter::HitRequestsTc);
            let ifindex = unsafe { (*ctx.skb.skb).ifindex };
            // The reply passes tc_fill on its way out: it is ours, not memcached's.
            unsafe { (*ctx.skb.skb).mark = TC_SERVED_MARK };
            unsafe { bpf_redirect(ifindex, 0) as i32 }
        }
        Served::Pass => TC_NEXT,
        // XDP parsed this request before handing it over: not reached.
        Served::Unparsed => TC_NEXT,
        Served::NoRoom => {
            pass(c, Counter::PassNoRoom);
            TC_NEXT
        }
        Served::Broken => TC_ACT_SHOT as i32,
    }
}

/// Whether XDP marked this packet for us.
#[inline(always)]
fn handed_over(ctx: &TcContext) -> bool {
    let meta = unsafe { (*ctx.skb.skb).data_meta } as usize;
    if meta + TC_HANDOFF_LEN > ctx.data() {
        return false;
    }
    unsafe { *(meta as *const u32) == TC_HANDOFF }
}
