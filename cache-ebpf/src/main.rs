//! The kernel side of the memcached accelerator.
//!
//! - `xdp_cache` (XDP, the memcached host's NIC, and `lo` in generic mode): parses the headers
//!   ([`net`]) and tail-calls, through the JUMP program array, one of
//!   - `xdp_get`: answers UDP `get` hits from the cache ([`hitpath`], [`store`]), only on the
//!     interface in front of memcached;
//!   - `xdp_scan`: follows every other request stream to memcached ([`scanner`]) so writes
//!     invalidate before memcached applies them ([`coherence`]).
//!
//!   The split keeps each program small enough to verify once; state crosses the tail call in
//!   per-CPU [`scratch`] memory.
//! - `tc_fill` (TC egress, the NIC): fills the cache from memcached's replies ([`fill`]), and
//!   queues keys whose TTL it does not know for the agent to learn ([`learn`]).
//! - `tc_serve` (TC ingress, the NIC): answers the hits whose reply the XDP frame could not
//!   grow to hold ([`tcserve`]); the hit path is written once for both ([`reply`]).
//! - `xdp_learn_ttl`: never attached; the agent runs it to install a learned TTL ([`learn`]).
//! - `xdp_warm_fill`: never attached; the agent runs it to store items it read from memcached
//!   when it started ([`warm`]).
//! - `xdp_pass`, `xdp_reflector`: testbed helpers (the peer veth needs an XDP program for
//!   XDP_TX frames to arrive; the reflector is the zero-work benchmark ceiling).
//!
//! Every program fails open: anything unexpected returns XDP_PASS / TC "next", never a drop.
#![no_std]
#![no_main]
// The BPF target has atomic add but no core::sync::atomic RMW methods.
#![allow(internal_features)]
#![feature(core_intrinsics)]
// An empty asm block is the compiler barrier of the lock-free reads (lock.rs).
#![feature(asm_experimental_arch)]

mod coherence;
mod csum;
mod fill;
mod guard;
mod hitpath;
mod ingress;
mod learn;
mod lock;
mod maps;
mod net;
mod reflector;
mod reply;
mod scanner;
mod scratch;
mod stats;
mod store;
mod tcserve;
mod tickets;
mod time;
mod unaligned;
mod warm;

use aya_ebpf::{
    bindings::xdp_action,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

#[xdp]
pub fn xdp_cache(ctx: XdpContext) -> u32 {
    ingress::run(&ctx)
}

/// Tail-called by `xdp_cache` for UDP `get` requests.
#[xdp]
pub fn xdp_get(ctx: XdpContext) -> u32 {
    hitpath::run_get(&ctx)
}

/// Tail-called by `xdp_cache` for every other request to memcached.
#[xdp]
pub fn xdp_scan(ctx: XdpContext) -> u32 {
    ingress::run_scan(&ctx)
}

#[classifier]
pub fn tc_fill(ctx: TcContext) -> i32 {
    fill::run(&ctx)
}

/// TC ingress: answers the hits `xdp_get` had no room for in the XDP frame.
#[classifier]
pub fn tc_serve(ctx: TcContext) -> i32 {
    tcserve::run(&ctx)
}

/// Never attached: the agent runs it on one `TtlAnswer` to install a TTL memcached told it.
#[xdp]
pub fn xdp_learn_ttl(ctx: XdpContext) -> u32 {
    learn::run_answer(&ctx)
}

/// Never attached: the agent runs it on one `WarmFill` read from memcached at start.
#[xdp]
pub fn xdp_warm_fill(ctx: XdpContext) -> u32 {
    warm::run(&ctx)
}

#[xdp]
pub fn xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[xdp]
pub fn xdp_reflector(ctx: XdpContext) -> u32 {
    reflector::run(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
