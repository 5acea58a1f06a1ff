//! loadgen: a memcached load generator for measuring the in-kernel cache accelerator.
//!
//! How the modules fit:
//! - the workload model: [`workload`] (keyspace, verb mix, phases, load shape, TOML file),
//!   [`zipf`] (key popularity), [`rng`], [`units`] (durations, rates, size ranges);
//! - the wire: [`proto`] (text and meta protocols, the UDP frame header and reassembly),
//!   [`ketama`] (+ [`md5`]) to spread keys over several servers;
//! - the engine: [`schedule`] (clock, open-loop arrivals), [`worker`] (what UDP and TCP workers
//!   share), [`udp`] (batched `sendmmsg`/`recvmmsg` via [`mmsg`]), [`tcp`], [`stats`] (HDR
//!   histograms, counters), [`runner`] (populate, warm-up, measure, merge), [`cpu`] (pinning and
//!   CPU accounting), [`netns`] (running inside a network namespace);
//! - output and modes: [`report`] (table, JSON), [`plot`] (SVG), [`progress`] (live bar),
//!   [`sweep`] (find the saturation rate), [`compare`] (plain vs accelerated memcached),
//!   [`reflect`] (a zero-work UDP responder to measure generators against);
//! - [`testbed`]: two network namespaces joined by a veth pair, memcached and the agent;
//!   [`interrupt`]: SIGINT/SIGTERM turned into an orderly stop that tears the testbed down.

pub mod compare;
pub mod cpu;
pub mod error;
pub mod interrupt;
pub mod ketama;
pub mod md5;
pub mod mmsg;
pub mod netns;
pub mod plot;
pub mod progress;
pub mod proto;
pub mod reflect;
pub mod report;
pub mod rng;
pub mod runner;
pub mod schedule;
pub mod stats;
pub mod sweep;
pub mod tcp;
pub mod testbed;
pub mod udp;
pub mod units;
pub mod worker;
pub mod workload;
pub mod zipf;

pub use error::LoadgenError;
pub use runner::{RunConfig, RunReport, Transport};
pub use testbed::{Testbed, TestbedConfig, TestbedError, agent_bin};
pub use workload::Workload;
