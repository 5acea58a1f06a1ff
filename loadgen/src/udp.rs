//! The UDP worker: connected sockets (one or more per server), requests framed with memcached's
//! UDP header and a per-socket request id, sent with `sendmmsg` and received with `recvmmsg` in
//! batches; replies reassembled per request id; loss detected by a per-request timeout.
//!
//! Request ids index a slot table of `SLOTS` entries per socket; a datagram whose id names no
//! outstanding request (late, duplicate, or already timed out) is counted, not matched.

use std::collections::VecDeque;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};

use crate::error::LoadgenError;
use crate::mmsg::{RecvBatch, SendBatch, poll};
use crate::proto::frame::{FrameHeader, Reassembly};
use crate::proto::parse_reply;
use crate::schedule::Pacer;
use crate::worker::{KeyScratch, Router, Source, WorkerPlan, WorkerResult, encode_request};
use crate::workload::{LoadMode, Request, Verb};
use crate::{cpu, interrupt};

/// Outstanding requests per socket (a power of two); more at once expires the oldest.
pub const SLOTS: usize = 16384;
/// Largest reply datagram accepted (memcached sends at most 1400 payload bytes + header).
pub const MAX_DATAGRAM: usize = 2048;
/// Receive buffer requested per socket.
pub const RCVBUF_BYTES: usize = 8 << 20;
/// Below this many nanoseconds to the next event the worker spins instead of sleeping.
pub const SPIN_NS: u64 = 20_000;

#[derive(Debug, Default)]
struct Slot {
    id: u16,
    active: bool,
    start_ns: u64,
    verb: Option<Verb>,
    nkeys: u16,
    reasm: Reassembly,
}

struct Sock {
    sock: UdpSocket,
    fd: RawFd,
    slots: Vec<Slot>,
    next_id: u16,
    /// `(request id, deadline)` in send order.
    fifo: VecDeque<(u16, u64)>,
    tx: SendBatch,
}

/// Opens a UDP socket connected to `server`, with a large receive buffer.
pub fn connect_udp(server: SocketAddr) -> Result<UdpSocket, LoadgenError> {
    let err = |op, source| LoadgenError::Connect {
        op,
        proto: "udp",
        server,
        source,
    };
    let local: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    let sock = UdpSocket::bind(local).map_err(|e| err("bind", e))?;
    sock.connect(server).map_err(|e| err("connect", e))?;
    set_buf(
        sock.as_raw_fd(),
        libc::SO_RCVBUFFORCE,
        libc::SO_RCVBUF,
        RCVBUF_BYTES,
    );
    set_buf(
        sock.as_raw_fd(),
        libc::SO_SNDBUFFORCE,
        libc::SO_SNDBUF,
        RCVBUF_BYTES,
    );
    Ok(sock)
}

/// Sets a socket buffer size, trying the privileged option first (best effort).
fn set_buf(fd: RawFd, forced: libc::c_int, plain: libc::c_int, bytes: usize) {
    let v = bytes as libc::c_int;
    for opt in [forced, plain] {
        // SAFETY: v is a live c_int and the length matches it.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            return;
        }
    }
}

/// Asks for 1 µs timer slack so short sleeps end on time (best effort).
pub fn tighten_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes an integer argument and touches no memory.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1000u64, 0u64, 0u64, 0u64) };
}

/// Runs one UDP worker until its window ends (or `source` is exhausted) and outstanding
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
    let batch = plan.batch.max(1);
    let mut socks = Vec::new();
    let mut socks_of_server = Vec::new();
    for &server in plan.servers.iter() {
        let mut ids = Vec::new();
        for _ in 0..plan.conns_per_server.max(1) {
            let sock = connect_udp(server)?;
            ids.push(socks.len());
            socks.push(Sock {
                fd: sock.as_raw_fd(),
                sock,
                slots: (0..SLOTS).map(|_| Slot::default()).collect(),
                next_id: 0,
                fifo: VecDeque::with_capacity(1024),
                tx: SendBatch::new(batch, plan.udp_segment),
            });
        }
        socks_of_server.push(ids);
    }
    let mut rr = vec![0usize; socks_of_server.len()];
    let mut pfds: Vec<libc::pollfd> = socks
        .iter()
        .map(|s| libc::pollfd {
            fd: s.fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let mut rng = plan.rng();
    let mut rec = plan.recorder();
    let mut router = Router::new(plan.ketama.clone());
    let mut scratch = KeyScratch::default();
    let mut req = Request::default();
    let mut rx = RecvBatch::new(batch, MAX_DATAGRAM);
    let mut pacer = Pacer::new(plan.rate.max(1e-9), plan.arrivals, plan.start_ns, &mut rng);
    let target = plan.concurrency * socks.len();
    let mut outstanding = 0usize;
    let mut exhausted = false;
    let mut idle_ns = 0u64;
    let mask = SLOTS - 1;
    let hard_end = plan.window_end_ns + plan.timeout_ns + 1_000_000;

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
                    let list = &socks_of_server[server];
                    let si = list[rr[server] % list.len()];
                    rr[server] += 1;
                    let s = &mut socks[si];
                    if s.tx.is_full() {
                        flush(s, plan)?;
                    }
                    let id = s.next_id;
                    s.next_id = s.next_id.wrapping_add(1);
                    let slot = &mut s.slots[id as usize & mask];
                    if slot.active {
                        // More than SLOTS outstanding on this socket: the oldest is given up.
                        rec.timeout(slot.start_ns, now);
                        outstanding -= 1;
                    }
                    slot.id = id;
                    slot.active = true;
                    slot.start_ns = start;
                    slot.verb = Some(verb);
                    slot.nkeys = keys.len() as u16;
                    slot.reasm.clear();
                    let buf = s.tx.push();
                    buf.extend_from_slice(FrameHeader::new(id, 0, 1).bytes());
                    encode_request(
                        plan.dialect,
                        verb,
                        source.keyspace(),
                        keys,
                        req.value_len,
                        &mut scratch,
                        buf,
                    );
                    s.fifo.push_back((id, now + plan.timeout_ns));
                    outstanding += 1;
                    rec.sent(start, now, open);
                    busy = true;
                }
            }
            for s in &mut socks {
                if !s.tx.is_empty() {
                    flush(s, plan)?;
                }
            }
        }

        for s in &mut socks {
            loop {
                let n = match rx.recv(s.fd) {
                    Ok(n) => n,
                    // An ICMP port-unreachable from an earlier send: those requests time out.
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => 0,
                    Err(e) => {
                        return Err(LoadgenError::Worker {
                            worker: plan.id,
                            reason: format!("recvmmsg: {e}"),
                        });
                    }
                };
                if n == 0 {
                    break;
                }
                busy = true;
                let now = clock.now_ns();
                for i in 0..n {
                    let (d, truncated) = rx.datagram(i);
                    let Some(h) = FrameHeader::parse(d) else {
                        rec.late();
                        continue;
                    };
                    let id = h.request_id();
                    let slot = &mut s.slots[id as usize & mask];
                    if !slot.active || slot.id != id {
                        rec.late();
                        continue;
                    }
                    let verb = slot.verb.expect("active slot has a verb");
                    let nkeys = slot.nkeys as usize;
                    let payload = &d[FrameHeader::LEN..];
                    let parsed = if truncated {
                        Err(())
                    } else if slot.reasm.is_empty() && h.total() <= 1 {
                        match parse_reply(plan.dialect, verb, nkeys, payload) {
                            Ok(None) => {
                                slot.reasm.push(h.seq(), h.total(), payload);
                                Ok(None)
                            }
                            Ok(Some((_, r))) => Ok(Some(r)),
                            Err(_) => Err(()),
                        }
                    } else if slot.reasm.push(h.seq(), h.total(), payload) {
                        match parse_reply(plan.dialect, verb, nkeys, slot.reasm.stream()) {
                            Ok(r) => Ok(r.map(|(_, r)| r)),
                            Err(_) => Err(()),
                        }
                    } else {
                        Ok(None)
                    };
                    match parsed {
                        Ok(None) => {}
                        Ok(Some(reply)) => {
                            rec.reply(slot.start_ns, now, verb, nkeys, &reply);
                            slot.active = false;
                            outstanding -= 1;
                        }
                        Err(()) => {
                            rec.malformed(slot.start_ns, now);
                            slot.active = false;
                            outstanding -= 1;
                        }
                    }
                }
                if n < batch {
                    break;
                }
            }
        }

        let now = clock.now_ns();
        let mut next_deadline = u64::MAX;
        for s in &mut socks {
            while let Some(&(id, deadline)) = s.fifo.front() {
                let slot = &mut s.slots[id as usize & mask];
                if !slot.active || slot.id != id {
                    s.fifo.pop_front();
                    continue;
                }
                if deadline > now {
                    next_deadline = next_deadline.min(deadline);
                    break;
                }
                rec.timeout(slot.start_ns, now);
                slot.active = false;
                outstanding -= 1;
                s.fifo.pop_front();
            }
        }

        let still_sending = now < plan.window_end_ns && !exhausted;
        if !still_sending && outstanding == 0 {
            break;
        }
        if now >= hard_end {
            for s in &mut socks {
                for slot in s.slots.iter_mut().filter(|s| s.active) {
                    rec.timeout(slot.start_ns, now);
                    slot.active = false;
                }
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
            let before = clock.now_ns();
            poll(&mut pfds, wake - now - SPIN_NS / 2).map_err(|e| LoadgenError::Worker {
                worker: plan.id,
                reason: format!("ppoll: {e}"),
            })?;
            idle_ns += clock.now_ns() - before;
        }
    }
    drop(socks.into_iter().map(|s| s.sock).collect::<Vec<_>>());
    Ok(WorkerResult {
        recorder: rec,
        cpu_ns: cpu::thread_cpu_ns() - cpu0,
        idle_ns,
        elapsed_ns: clock.now_ns() - t0,
    })
}

/// Sends a socket's batch; a refused destination (ICMP port unreachable) is not fatal, the
/// requests simply time out.
fn flush(s: &mut Sock, plan: &WorkerPlan) -> Result<(), LoadgenError> {
    match s.tx.flush(s.fd) {
        Err(e) if e.kind() != std::io::ErrorKind::ConnectionRefused => Err(send_err(plan, e)),
        _ => Ok(()),
    }
}

fn send_err(plan: &WorkerPlan, e: std::io::Error) -> LoadgenError {
    LoadgenError::Worker {
        worker: plan.id,
        reason: format!("sendmmsg: {e}"),
    }
}
