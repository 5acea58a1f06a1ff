//! The TCP worker (text or meta dialect): non-blocking connections, requests pipelined into a
//! write buffer, replies parsed in order from a read buffer, all connections of a worker
//! multiplexed with `ppoll`. A connection whose oldest request exceeds the timeout, or that
//! closes, has its outstanding requests counted as timeouts and is reconnected.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Duration;

use crate::error::LoadgenError;
use crate::mmsg::poll;
use crate::proto::parse_reply;
use crate::schedule::Pacer;
use crate::stats::Recorder;
use crate::udp::{SPIN_NS, tighten_timer_slack};
use crate::worker::{KeyScratch, Router, Source, WorkerPlan, WorkerResult, encode_request};
use crate::workload::{LoadMode, Request, Verb};
use crate::{cpu, interrupt};

/// Open loop: requests queued on one connection beyond this are dropped (counted).
pub const MAX_BACKLOG: usize = 1 << 16;
/// Initial read buffer size (grows only for a reply larger than it).
const READ_CHUNK: usize = 64 * 1024;

#[derive(Debug, Clone, Copy)]
struct Pending {
    start_ns: u64,
    sent_ns: u64,
    verb: Verb,
    nkeys: u16,
}

struct Conn {
    server: SocketAddr,
    stream: Option<TcpStream>,
    wbuf: Vec<u8>,
    wpos: usize,
    rbuf: Vec<u8>,
    rpos: usize,
    rlen: usize,
    inflight: VecDeque<Pending>,
}

/// Opens a non-blocking TCP connection with Nagle disabled.
pub fn connect_tcp(server: SocketAddr, timeout: Duration) -> Result<TcpStream, LoadgenError> {
    let err = |op, source| LoadgenError::Connect {
        op,
        proto: "tcp",
        server,
        source,
    };
    let s = TcpStream::connect_timeout(&server, timeout).map_err(|e| err("connect", e))?;
    s.set_nodelay(true).map_err(|e| err("configure", e))?;
    s.set_nonblocking(true).map_err(|e| err("configure", e))?;
    Ok(s)
}

impl Conn {
    fn fail_all(&mut self, rec: &mut Recorder, now: u64) -> usize {
        let n = self.inflight.len();
        for p in self.inflight.drain(..) {
            rec.timeout(p.start_ns, now);
        }
        self.wbuf.clear();
        self.wpos = 0;
        self.rpos = 0;
        self.rlen = 0;
        self.stream = None;
        n
    }

    /// Writes as much of the write buffer as the socket takes. Err = connection broken.
    fn flush(&mut self) -> Result<bool, ()> {
        let Some(stream) = self.stream.as_mut() else {
            return Err(());
        };
        let mut progressed = false;
        while self.wpos < self.wbuf.len() {
            match stream.write(&self.wbuf[self.wpos..]) {
                Ok(0) => return Err(()),
                Ok(n) => {
                    self.wpos += n;
                    progressed = true;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return Err(()),
            }
        }
        if self.wpos == self.wbuf.len() {
            self.wbuf.clear();
            self.wpos = 0;
        }
        Ok(progressed)
    }

    /// Reads what is available and completes the replies found. Err = connection broken.
    fn read(
        &mut self,
        plan: &WorkerPlan,
        rec: &mut Recorder,
        now: u64,
        done: &mut usize,
    ) -> Result<bool, ()> {
        let Some(stream) = self.stream.as_mut() else {
            return Err(());
        };
        let mut progressed = false;
        loop {
            // Data lives in rbuf[rpos..rlen]; make room at the end without zeroing per read.
            if self.rpos == self.rlen {
                self.rpos = 0;
                self.rlen = 0;
            } else if self.rlen == self.rbuf.len() {
                if self.rpos > 0 {
                    self.rbuf.copy_within(self.rpos..self.rlen, 0);
                    self.rlen -= self.rpos;
                    self.rpos = 0;
                } else {
                    // One reply larger than the buffer.
                    let n = self.rbuf.len() * 2;
                    self.rbuf.resize(n, 0);
                }
            }
            let room = self.rbuf.len() - self.rlen;
            match stream.read(&mut self.rbuf[self.rlen..]) {
                Ok(0) => return Err(()),
                Ok(n) => {
                    self.rlen += n;
                    progressed = true;
                    while let Some(p) = self.inflight.front().copied() {
                        match parse_reply(
                            plan.dialect,
                            p.verb,
                            p.nkeys as usize,
                            &self.rbuf[self.rpos..self.rlen],
                        ) {
                            Ok(Some((used, reply))) => {
                                self.rpos += used;
                                rec.reply(p.start_ns, now, p.verb, p.nkeys as usize, &reply);
                                self.inflight.pop_front();
                                *done += 1;
                            }
                            Ok(None) => break,
                            Err(e) => {
                                tracing::warn!(worker = plan.id, server = %self.server, error = %e, "bad reply; reconnecting");
                                rec.malformed(p.start_ns, now);
                                self.inflight.pop_front();
                                *done += 1;
                                return Err(());
                            }
                        }
                    }
                    if n < room {
                        return Ok(progressed);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(progressed),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return Err(()),
            }
        }
    }
}

/// Runs one TCP worker until its window ends (or `source` is exhausted) and outstanding
/// requests are answered or timed out.
pub fn run<S: Source>(plan: &WorkerPlan, mut source: S) -> Result<WorkerResult, LoadgenError> {
    if let Some(c) = plan.cpu
        && let Err(e) = cpu::pin_current_thread(c)
    {
        tracing::warn!(worker = plan.id, cpu = c, error = %e, "cannot pin worker");
    }
    tighten_timer_slack();
    let clock = plan.clock;
    let open = plan.mode == LoadMode::Open;
    let connect_timeout = Duration::from_secs(2);
    let mut conns = Vec::new();
    let mut conns_of_server = Vec::new();
    for &server in plan.servers.iter() {
        let mut ids = Vec::new();
        for _ in 0..plan.conns_per_server.max(1) {
            ids.push(conns.len());
            conns.push(Conn {
                server,
                stream: Some(connect_tcp(server, connect_timeout)?),
                wbuf: Vec::with_capacity(64 * 1024),
                wpos: 0,
                rbuf: vec![0; READ_CHUNK],
                rpos: 0,
                rlen: 0,
                inflight: VecDeque::with_capacity(plan.concurrency.max(16)),
            });
        }
        conns_of_server.push(ids);
    }
    let mut rr = vec![0usize; conns_of_server.len()];
    let mut rng = plan.rng();
    let mut rec = plan.recorder();
    let mut router = Router::new(plan.ketama.clone());
    let mut scratch = KeyScratch::default();
    let mut req = Request::default();
    let mut pacer = Pacer::new(plan.rate.max(1e-9), plan.arrivals, plan.start_ns, &mut rng);
    let target = plan.concurrency * conns.len();
    let batch = plan.batch.max(1);
    let mut outstanding = 0usize;
    let mut exhausted = false;
    let mut idle_ns = 0u64;
    let hard_end = plan.window_end_ns + plan.timeout_ns + 1_000_000;
    let mut pfds: Vec<libc::pollfd> = Vec::with_capacity(conns.len());

    clock.wait_until(plan.start_ns, 200_000);
    let cpu0 = cpu::thread_cpu_ns();
    let t0 = clock.now_ns();
    loop {
        // A stop signal ends sending like an exhausted source; outstanding requests still drain.
        exhausted |= interrupt::received().is_some();
        let now = clock.now_ns();
        let sending = now < plan.window_end_ns && !exhausted;
        let mut busy = false;
        if sending {
            for _ in 0..batch {
                let Some(start) = pacer.next_start(open, now, outstanding, target, &mut rng) else {
                    break;
                };
                if !source.next(&mut rng, &mut req) {
                    exhausted = true;
                    break;
                }
                let verb = req.verb.expect("source fills the verb");
                router.split(source.keyspace(), &req);
                for server in 0..router.servers() {
                    let keys = router.group(server);
                    if keys.is_empty() {
                        continue;
                    }
                    let list = &conns_of_server[server];
                    let c = &mut conns[list[rr[server] % list.len()]];
                    rr[server] += 1;
                    if c.stream.is_none() {
                        match connect_tcp(c.server, connect_timeout) {
                            Ok(s) => c.stream = Some(s),
                            Err(e) => {
                                tracing::warn!(worker = plan.id, error = %e, "reconnect failed");
                                rec.dropped(start);
                                continue;
                            }
                        }
                    }
                    if c.inflight.len() >= MAX_BACKLOG {
                        rec.dropped(start);
                        continue;
                    }
                    encode_request(
                        plan.dialect,
                        verb,
                        source.keyspace(),
                        keys,
                        req.value_len,
                        &mut scratch,
                        &mut c.wbuf,
                    );
                    c.inflight.push_back(Pending {
                        start_ns: start,
                        sent_ns: now,
                        verb,
                        nkeys: keys.len() as u16,
                    });
                    outstanding += 1;
                    rec.sent(start, now, open);
                    busy = true;
                }
            }
        }

        let now = clock.now_ns();
        let mut next_deadline = u64::MAX;
        for c in &mut conns {
            if c.stream.is_none() {
                continue;
            }
            let mut ok = c.wbuf.len() <= c.wpos || c.flush().is_ok();
            if ok && !c.inflight.is_empty() {
                let mut done = 0;
                match c.read(plan, &mut rec, now, &mut done) {
                    Ok(p) => busy |= p,
                    Err(()) => ok = false,
                }
                outstanding -= done;
            }
            let stalled = c
                .inflight
                .front()
                .is_some_and(|p| p.sent_ns + plan.timeout_ns <= now);
            if !ok || stalled {
                if stalled {
                    tracing::warn!(worker = plan.id, server = %c.server, "request timed out; reconnecting");
                }
                outstanding -= c.fail_all(&mut rec, now);
                busy = true;
            } else if let Some(p) = c.inflight.front() {
                next_deadline = next_deadline.min(p.sent_ns + plan.timeout_ns);
            }
        }

        let still_sending = now < plan.window_end_ns && !exhausted;
        if !still_sending && outstanding == 0 {
            break;
        }
        if now >= hard_end {
            for c in &mut conns {
                c.fail_all(&mut rec, now);
            }
            break;
        }
        if busy {
            continue;
        }
        let mut wake = next_deadline.min(hard_end);
        if still_sending {
            if open {
                wake = wake.min(pacer.peek());
            } else if outstanding < target {
                continue;
            }
            wake = wake.min(plan.window_end_ns);
        }
        if wake > now + SPIN_NS {
            pfds.clear();
            for c in &conns {
                if let Some(s) = &c.stream {
                    let mut events = libc::POLLIN;
                    if c.wpos < c.wbuf.len() {
                        events |= libc::POLLOUT;
                    }
                    pfds.push(libc::pollfd {
                        fd: s.as_raw_fd(),
                        events,
                        revents: 0,
                    });
                }
            }
            let before = clock.now_ns();
            poll(&mut pfds, wake - now - SPIN_NS / 2).map_err(|e| LoadgenError::Worker {
                worker: plan.id,
                reason: format!("ppoll: {e}"),
            })?;
            idle_ns += clock.now_ns() - before;
        }
    }
    Ok(WorkerResult {
        recorder: rec,
        cpu_ns: cpu::thread_cpu_ns() - cpu0,
        idle_ns,
        elapsed_ns: clock.now_ns() - t0,
    })
}
