//! cache-agent: loads the in-kernel memcached cache (the `cache-ebpf` object embedded at build
//! time), attaches it in front of memcached, keeps it coherent and exports its metrics.
//!
//! - [`config`]: settings from flags, environment and an optional TOML file, validated.
//! - [`loader`]: loads the object sized to the configured capacity and attaches XDP, TC egress
//!   (fills) and TC ingress (hits too big for the XDP frame).
//! - [`kernel`]: typed access to the maps (configuration, counters, histograms, invalidation).
//! - [`coherence`]: the lease and fill lease, memcached's health and restarts, and the `watch`
//!   backstop.
//! - [`backlog`]: memcached connections whose client is not taking its replies (sock_diag): a
//!   write behind them may be applied late, so the fill lease is not extended meanwhile.
//! - [`warm`]: fills the kernel cache from memcached's contents when the agent starts.
//! - [`interface`]: the served interface's index and MTU, followed while the agent runs.
//! - [`requests`]: keeps the agent's own requests to memcached within one scanner buffer.
//! - [`ttl`]: learns from memcached the TTLs of entries filled without one.
//! - [`stats`]: counters read from pinned maps, for `cache-agent stats` and `status`.
//! - [`metrics`], [`http`]: Prometheus metrics on /metrics; [`notify`]: systemd readiness and
//!   watchdog.
//! - [`error`]: the crate's error type.

#![allow(
    clippy::result_large_err,
    reason = "errors are rare and carry aya's error values whole, for the message"
)]

pub mod backlog;
pub mod coherence;
pub mod config;
pub mod error;
pub mod exposure;
pub mod http;
pub mod interface;
pub mod kernel;
pub mod loader;
pub mod metrics;
pub mod notify;
pub mod requests;
pub mod stats;
pub mod ttl;
pub mod warm;

/// The eBPF object built from cache-ebpf by build.rs.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/cache-ebpf"));
