//! What the UDP and TCP workers share: the plan handed to each worker thread, request sources
//! (the random workload, or the populate phase's one SET per key), splitting a request by server
//! (ketama) and encoding it, and the result a worker returns.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::ketama::Ketama;
use crate::proto::{self, Dialect};
use crate::rng::Rng;
use crate::schedule::Clock;
use crate::stats::{Live, Recorder};
use crate::workload::{Arrivals, KeySpace, LoadMode, Request, RequestGen, Verb};

/// Everything one worker thread needs.
#[derive(Clone, Debug)]
pub struct WorkerPlan {
    /// Worker index (also the RNG stream).
    pub id: usize,
    /// Target servers.
    pub servers: Arc<Vec<SocketAddr>>,
    /// Key → server.
    pub ketama: Arc<Ketama>,
    /// Wire dialect.
    pub dialect: Dialect,
    /// Open or closed loop.
    pub mode: LoadMode,
    /// Open loop: this worker's share of the rate (requests/s).
    pub rate: f64,
    /// Open loop: arrival process.
    pub arrivals: Arrivals,
    /// Closed loop: outstanding requests per socket/connection.
    pub concurrency: usize,
    /// Sockets (UDP) or connections (TCP) per server.
    pub conns_per_server: usize,
    /// Requests per `sendmmsg`/`recvmmsg`.
    pub batch: usize,
    /// UDP: most datagrams per segmented send message (1 = no segmentation).
    pub udp_segment: usize,
    /// A request without reply after this long is a timeout.
    pub timeout_ns: u64,
    /// Shared clock.
    pub clock: Clock,
    /// Sending starts at this time.
    pub start_ns: u64,
    /// Recording starts (end of warm-up).
    pub window_start_ns: u64,
    /// Sending and recording stop; outstanding requests get `timeout_ns` more to finish.
    pub window_end_ns: u64,
    /// Timeline resolution.
    pub bucket_ns: u64,
    /// CPU to pin to.
    pub cpu: Option<usize>,
    /// Seed of the run.
    pub seed: u64,
    /// Progress counters.
    pub live: Arc<Live>,
}

impl WorkerPlan {
    /// A recorder for this plan's window.
    pub fn recorder(&self) -> Recorder {
        Recorder::new(
            self.window_start_ns,
            self.window_end_ns,
            self.bucket_ns,
            self.live.clone(),
        )
    }

    /// This worker's RNG.
    pub fn rng(&self) -> Rng {
        Rng::new(self.seed, self.id as u64 + 1)
    }
}

/// What a worker measured.
#[derive(Debug)]
pub struct WorkerResult {
    /// Latencies, counters, timeline.
    pub recorder: Recorder,
    /// CPU time of the worker thread.
    pub cpu_ns: u64,
    /// Time spent blocked waiting for replies or the next send time.
    pub idle_ns: u64,
    /// Wall time from start to the end of the drain.
    pub elapsed_ns: u64,
}

/// Produces requests.
pub trait Source {
    /// Fills `req`; false when the source is exhausted.
    fn next(&mut self, rng: &mut Rng, req: &mut Request) -> bool;
    /// The keyspace keys are drawn from.
    fn keyspace(&self) -> &KeySpace;
}

impl Source for RequestGen {
    fn next(&mut self, rng: &mut Rng, req: &mut Request) -> bool {
        RequestGen::next(self, rng, req);
        true
    }

    fn keyspace(&self) -> &KeySpace {
        RequestGen::keyspace(self)
    }
}

/// One SET per key id in `next..end` with a step (so several workers can share a keyspace).
#[derive(Clone, Debug)]
pub struct PopulateSource {
    keyspace: KeySpace,
    next: u64,
    end: u64,
    step: u64,
}

impl PopulateSource {
    /// Keys `first, first + step, …` below `keyspace.keys()`.
    pub fn new(keyspace: KeySpace, first: u64, step: u64) -> Self {
        let end = keyspace.keys();
        Self {
            keyspace,
            next: first,
            end,
            step: step.max(1),
        }
    }
}

impl Source for PopulateSource {
    fn next(&mut self, rng: &mut Rng, req: &mut Request) -> bool {
        if self.next >= self.end {
            return false;
        }
        req.verb = Some(Verb::Set);
        req.keys.clear();
        req.keys.push(self.next);
        req.value_len = self.keyspace.value_len(rng);
        self.next += self.step;
        true
    }

    fn keyspace(&self) -> &KeySpace {
        &self.keyspace
    }
}

/// Splits requests by server.
#[derive(Debug)]
pub struct Router {
    ketama: Arc<Ketama>,
    groups: Vec<Vec<u64>>,
    keybuf: Vec<u8>,
}

impl Router {
    /// For the plan's servers.
    pub fn new(ketama: Arc<Ketama>) -> Self {
        let n = ketama.servers().max(1);
        Self {
            ketama,
            groups: vec![Vec::new(); n],
            keybuf: Vec::with_capacity(256),
        }
    }

    /// Groups `req.keys` by server; read them back with [`Router::group`].
    pub fn split(&mut self, keyspace: &KeySpace, req: &Request) {
        for g in &mut self.groups {
            g.clear();
        }
        if self.groups.len() == 1 {
            self.groups[0].extend_from_slice(&req.keys);
            return;
        }
        for &k in &req.keys {
            self.keybuf.clear();
            keyspace.write_key(k, &mut self.keybuf);
            let s = self.ketama.server_for(&self.keybuf);
            self.groups[s].push(k);
        }
    }

    /// Number of servers.
    pub fn servers(&self) -> usize {
        self.groups.len()
    }

    /// Keys of the last split that go to server `s`.
    pub fn group(&self, s: usize) -> &[u64] {
        &self.groups[s]
    }
}

/// Appends the wire form of `verb` on `keys` to `out`; `scratch` holds the encoded keys.
pub fn encode_request(
    dialect: Dialect,
    verb: Verb,
    keyspace: &KeySpace,
    keys: &[u64],
    value_len: usize,
    scratch: &mut KeyScratch,
    out: &mut Vec<u8>,
) {
    scratch.fill(keyspace, keys);
    match verb {
        Verb::Get => proto::encode_get(dialect, scratch.iter(), out),
        Verb::Set => proto::encode_set(dialect, scratch.get(0), value_len, out),
        Verb::Delete => proto::encode_delete(dialect, scratch.get(0), out),
    }
}

/// Encoded keys of one request, reused between requests.
#[derive(Debug, Default)]
pub struct KeyScratch {
    bytes: Vec<u8>,
    ends: Vec<usize>,
}

impl KeyScratch {
    fn fill(&mut self, keyspace: &KeySpace, keys: &[u64]) {
        self.bytes.clear();
        self.ends.clear();
        for &k in keys {
            keyspace.write_key(k, &mut self.bytes);
            self.ends.push(self.bytes.len());
        }
    }

    fn get(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.bytes[start..self.ends[i]]
    }

    fn iter(&self) -> impl ExactSizeIterator<Item = &[u8]> {
        (0..self.ends.len()).map(|i| self.get(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::KeySpaceSpec;

    #[test]
    fn encodes_routed_multiget() {
        let servers: Vec<SocketAddr> = vec![
            "198.18.1.1:11211".parse().unwrap(),
            "198.18.1.2:11211".parse().unwrap(),
        ];
        let ketama = Arc::new(Ketama::new(&servers));
        let ks = KeySpace::new(&KeySpaceSpec::default());
        let mut router = Router::new(ketama.clone());
        let req = Request {
            verb: Some(Verb::Get),
            keys: (0..20).collect(),
            value_len: 0,
        };
        router.split(&ks, &req);
        let total: usize = (0..2).map(|s| router.group(s).len()).sum();
        assert_eq!(total, 20);
        for s in 0..2 {
            for &k in router.group(s) {
                assert_eq!(ketama.server_for(&ks.key(k)), s);
            }
        }
        let mut scratch = KeyScratch::default();
        let mut out = Vec::new();
        encode_request(
            Dialect::Text,
            Verb::Get,
            &ks,
            &[1, 2],
            0,
            &mut scratch,
            &mut out,
        );
        assert_eq!(out, b"get k000000000000001 k000000000000002\r\n");
        out.clear();
        encode_request(
            Dialect::Meta,
            Verb::Set,
            &ks,
            &[7],
            4,
            &mut scratch,
            &mut out,
        );
        assert_eq!(out, b"ms k000000000000007 4\r\nxxxx\r\n");
    }

    #[test]
    fn populate_source_covers_keys_once() {
        let ks = KeySpace::new(&KeySpaceSpec {
            keys: 10,
            ..KeySpaceSpec::default()
        });
        let mut rng = Rng::new(1, 1);
        let mut seen = Vec::new();
        for first in 0..3 {
            let mut src = PopulateSource::new(ks.clone(), first, 3);
            let mut req = Request::default();
            while src.next(&mut rng, &mut req) {
                seen.push(req.keys[0]);
            }
        }
        seen.sort_unstable();
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
    }
}
