//! The zero-work baseline for benchmarks: answers every UDP `get` to memcached's port with
//! `END\r\n`, doing only the header swap every reply needs. The ceiling of this machine.

use aya_ebpf::{
    bindings::xdp_action, helpers::generated::bpf_xdp_adjust_tail, programs::XdpContext,
};
use cache_common::{END, FRAME_HEADER_LEN, GET};

use crate::ingress::instance_for;
use crate::maps::CONFIG;
use crate::net::{Frame, IPPROTO_UDP, parse};

pub fn run(ctx: &XdpContext) -> u32 {
    let frame = Frame {
        start: ctx.data(),
        end: ctx.data_end(),
    };
    let Some(h) = parse(&frame) else {
        return xdp_action::XDP_PASS;
    };
    let Some(cfg) = CONFIG.get(0) else {
        return xdp_action::XDP_PASS;
    };
    if h.proto != IPPROTO_UDP || h.is_v6 || instance_for(cfg, h.dst_port, false).is_none() {
        return xdp_action::XDP_PASS;
    }
    let cmd_off = h.payload_off + FRAME_HEADER_LEN;
    match frame.bytes::<{ FRAME_HEADER_LEN + 4 }>(h.payload_off) {
        Some(head) if unsafe { (&*head)[FRAME_HEADER_LEN..] == *GET } => {}
        _ => return xdp_action::XDP_PASS,
    }
    // Reply = headers + frame header + END\r\n: shrink to that (a get is always longer).
    let new_len = cmd_off + END.len();
    let delta = new_len as i32 - frame.len() as i32;
    if delta > 0 || unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta) } != 0 {
        return xdp_action::XDP_PASS;
    }
    let frame = Frame {
        start: ctx.data(),
        end: ctx.data_end(),
    };
    let Some(eth) = frame.bytes::<12>(0) else {
        return xdp_action::XDP_DROP;
    };
    let Some(ip) = frame.bytes::<20>(h.l3_off) else {
        return xdp_action::XDP_DROP;
    };
    let Some(udp) = frame.bytes::<16>(h.l4_off) else {
        return xdp_action::XDP_DROP;
    };
    let Some(end) = frame.bytes::<5>(cmd_off) else {
        return xdp_action::XDP_DROP;
    };
    unsafe {
        let eth = &mut *eth;
        let e = *eth;
        eth[0..6].copy_from_slice(&e[6..12]);
        eth[6..12].copy_from_slice(&e[0..6]);
        let ip = &mut *ip;
        let total = (new_len - h.l3_off) as u16;
        // Keep options out of it: the baseline only handles plain 20-byte headers.
        if ip[0] != 0x45 {
            return xdp_action::XDP_DROP;
        }
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        ip[12..16].copy_from_slice(&h.dst[..4]);
        ip[16..20].copy_from_slice(&h.src[..4]);
        ip[10..12].copy_from_slice(&[0, 0]);
        let csum = crate::csum::ipv4_header(ip);
        ip[10..12].copy_from_slice(&csum);
        let udp = &mut *udp;
        udp[0..2].copy_from_slice(&h.dst_port.to_be_bytes());
        udp[2..4].copy_from_slice(&h.src_port.to_be_bytes());
        udp[4..6].copy_from_slice(&((8 + FRAME_HEADER_LEN + END.len()) as u16).to_be_bytes());
        udp[6..8].copy_from_slice(&[0, 0]);
        udp[10..16].copy_from_slice(&[0, 0, 0, 1, 0, 0]);
        *end = *END;
    }
    xdp_action::XDP_TX
}
