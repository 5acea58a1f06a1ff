//! Keeping the kernel cache honest from user space.
//!
//! - The lease: the kernel serves hits only while `lease_until_ns` is in the future. It is
//!   renewed only while memcached answers and the `watch` backstop is connected, so a hung
//!   agent, a stopped memcached or a lost stream all stop serving within one lease.
//! - The fill lease: the kernel fills only while `fill_lease_until_ns` is in the future. It is
//!   extended only by health probes memcached answers promptly, and only while no memcached
//!   connection is held up by a client that does not take its replies ([`crate::backlog`]; see
//!   [`lease_loop`]).
//! - Resync: after any doubt (memcached unreachable then back, restarted, a `skipped` watch
//!   line, a lost stream) the agent bumps its epoch, which invalidates every entry, and holds
//!   fills for the write-settle time plus a second, before it renews the lease again.
//! - The backstop: every key `watch mutations evictions` reports is invalidated in the kernel
//!   (stores from clients the kernel cannot see, such as ones on loopback; evictions, so a hit
//!   never outlives memcached's copy).

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use aya::Ebpf;
use cache_common::{Config, HANDOVER_UNKNOWN, HEARTBEAT_NS, flags};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
    time::{sleep, timeout},
};
use tracing::{debug, info, warn};

use crate::config::Settings;
use crate::kernel;

/// State shared by the agent's tasks. The configuration is published to the kernel only
/// through [`Shared::publish`], so the kernel always sees one consistent copy.
pub struct Shared {
    pub ebpf: Mutex<Ebpf>,
    pub config: Mutex<Config>,
    pub settings: Settings,
    /// The watch stream is connected and in sync.
    pub watch_ok: AtomicBool,
    /// memcached answered the last health check.
    pub memcached_ok: AtomicBool,
    /// Counters the agent keeps itself (exported as metrics).
    pub resyncs: AtomicU64,
    pub watch_invalidations: AtomicU64,
    pub lease_renewals: AtomicU64,
    /// memcached connections whose send queue was at least half full at the last probe.
    pub backlogged_connections: AtomicU64,
    /// What became of the TTL questions (see [`crate::ttl`]).
    pub ttl: crate::ttl::Outcomes,
    /// memcached's clock as the last health check read it.
    clock: Mutex<Option<ClockSample>>,
    /// When memcached's clock last ticked, as far as the health check knows: after the check
    /// before the one that first saw the new `uptime` was sent, and before that one's answer.
    last_tick: Mutex<Option<TickWindow>>,
    /// Set when the cache was adopted warm (upgrade mode): the first watch connection does
    /// not flush it.
    pub skip_first_watch_resync: AtomicBool,
    /// memcached's own unix time minus the monotonic clock, as the health check bounds it
    /// ([`memcached_realtime_offset_ns`]), for the memcached process (pid, start) it was read
    /// from.
    memcached_offset: Mutex<Option<(Identity, u64)>>,
}

impl Shared {
    pub fn new(ebpf: Ebpf, config: Config, settings: Settings) -> Arc<Self> {
        Arc::new(Shared {
            ebpf: Mutex::new(ebpf),
            config: Mutex::new(config),
            watch_ok: AtomicBool::new(!settings.watch),
            memcached_ok: AtomicBool::new(false),
            settings,
            resyncs: AtomicU64::new(0),
            watch_invalidations: AtomicU64::new(0),
            lease_renewals: AtomicU64::new(0),
            backlogged_connections: AtomicU64::new(0),
            ttl: Default::default(),
            clock: Mutex::new(None),
            last_tick: Mutex::new(None),
            skip_first_watch_resync: AtomicBool::new(false),
            memcached_offset: Mutex::new(None),
        })
    }

    /// What absolute exptimes are converted with: memcached's unix time minus the monotonic
    /// clock. memcached reads the wall clock once, at start, and counts on the monotonic
    /// clock after that, so once the host's wall clock is stepped (NTP at boot, a restored
    /// VM) only memcached's own `time` says when it expires an item. The host's offset
    /// until the health check has read memcached's.
    pub fn realtime_offset_ns(&self) -> u64 {
        let known = *self
            .memcached_offset
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        known.map_or_else(kernel::realtime_offset_ns, |(_, offset)| offset)
    }

    /// Takes one health check's bound on memcached's offset: the largest bound seen for the
    /// same memcached process (each is an upper bound; a later tick phase gives a larger one,
    /// and larger only expires items earlier).
    fn record_memcached_clock(&self, id: &Identity, asked_at_ns: u64) {
        let sample = memcached_realtime_offset_ns(id.started + id.uptime, asked_at_ns);
        let mut known = self
            .memcached_offset
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *known = Some(match *known {
            Some((before, offset)) if before.pid == id.pid && before.started == id.started => {
                (before, offset.max(sample))
            }
            _ => (*id, sample),
        });
    }

    /// Writes the configuration to the kernel after `change`; every write stamps the
    /// heartbeat.
    fn publish(&self, change: impl FnOnce(&mut Config)) {
        let mut config = self.config.lock().expect("config lock");
        config.agent_heartbeat_ns = kernel::coarse_now_ns();
        change(&mut config);
        let mut ebpf = self.ebpf.lock().expect("ebpf lock");
        if let Err(e) = kernel::write_config(&mut ebpf, &config) {
            warn!(error = %e, "could not publish the configuration to the kernel");
        }
    }

    /// Lets the kernel serve for one more lease, and fill until `fill_until` if given (else
    /// fills stop when the fill lease already given runs out).
    pub fn renew(&self, fill_until: Option<u64>) {
        let until = kernel::coarse_now_ns() + self.settings.lease.as_nanos() as u64;
        self.publish(|c| {
            c.lease_until_ns = until;
            c.flags |= flags::SERVE;
            c.realtime_offset_ns = self.realtime_offset_ns();
            if let Some(f) = fill_until {
                c.fill_lease_until_ns = c.fill_lease_until_ns.max(f);
            }
        });
        self.lease_renewals.fetch_add(1, Ordering::Relaxed);
    }

    /// Stops tc_fill queueing TTL queries (nobody will answer them).
    pub fn stop_ttl_queries(&self) {
        self.publish(|c| c.flags &= !flags::LEARN_TTL);
    }

    /// Stops serving now (memcached answers everything).
    pub fn revoke(&self) {
        self.publish(|c| {
            c.lease_until_ns = 0;
            c.fill_lease_until_ns = 0;
            c.flags &= !flags::SERVE;
        });
    }

    /// Invalidates every entry and refuses fills from GETs seen in the next settle window.
    pub fn resync(&self, reason: &str) {
        let hold =
            kernel::coarse_now_ns() + self.settings.write_settle.as_nanos() as u64 + 1_000_000_000;
        self.publish(|c| {
            c.agent_epoch = c.agent_epoch.wrapping_add(1).max(1);
            c.fill_hold_until_ns = hold;
        });
        self.resyncs.fetch_add(1, Ordering::Relaxed);
        warn!(reason, "flushed the kernel cache");
    }

    /// Replies may be at most this large from now on (the interface's MTU changed).
    pub fn set_max_reply_payload(&self, payload: u32) {
        self.publish(|c| c.max_reply_payload = payload);
    }

    /// Stamps the heartbeat unless a write did lately (see [`Config::agent_heartbeat_ns`]).
    pub fn heartbeat(&self) {
        let last = self.config.lock().expect("config lock").agent_heartbeat_ns;
        if kernel::coarse_now_ns().saturating_sub(last) >= HEARTBEAT_NS {
            self.publish(|_| {});
        }
    }

    /// Marks this agent stopped in the kept configuration (upgrade mode), so the next one
    /// need not wait for the heartbeat to go stale.
    pub fn stop_heartbeat(&self) {
        self.publish(|c| c.agent_heartbeat_ns = 0);
    }

    /// Keeps memcached's loss counters with the pinned configuration for the next agent
    /// (upgrade mode; see [`handover_counters`]).
    pub fn record_handover(&self, counters: Option<(u64, u64)>) {
        let (evictions, dropped) = counters.unwrap_or((HANDOVER_UNKNOWN, HANDOVER_UNKNOWN));
        self.publish(|c| {
            c.handover_evictions = evictions;
            c.handover_dropped = dropped;
        });
    }

    /// Records which memcached process the cache holds items of (kept with the pinned
    /// config, for the next agent in upgrade mode).
    fn record_memcached(&self, id: &Identity) {
        let known = {
            let c = self.config.lock().expect("config lock");
            c.memcached_pid as u64 == id.pid && c.memcached_started_s == id.started
        };
        if !known {
            self.publish(|c| {
                c.memcached_pid = id.pid as u32;
                c.memcached_started_s = id.started;
            });
        }
    }

    /// memcached's clock at the last health check.
    pub fn memcached_clock(&self) -> Option<ClockSample> {
        *self.clock.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The earliest time memcached's clock can tick after `t` (see [`TickWindow::next_after`]).
    /// None until a tick was seen.
    pub fn next_memcached_tick_after(&self, t: std::time::Instant) -> Option<std::time::Instant> {
        let window = (*self.last_tick.lock().unwrap_or_else(|p| p.into_inner()))?;
        Some(window.next_after(t))
    }

    pub fn lease_valid(&self) -> bool {
        let c = self.config.lock().expect("config lock");
        c.flags & flags::SERVE != 0 && c.lease_until_ns > kernel::coarse_now_ns()
    }
}

/// A span of time memcached's clock ticked in: after `after`, no later than `by`.
#[derive(Debug, Clone, Copy)]
pub struct TickWindow {
    pub after: std::time::Instant,
    pub by: std::time::Instant,
}

/// How much later than a whole number of seconds after the last seen tick the next ones may
/// come (memcached re-arms its one-second timer when it fires, so ticks drift later), per
/// second since then, and at least.
const TICK_DRIFT_PER_SEC: Duration = Duration::from_millis(5);
const TICK_DRIFT_MIN: Duration = Duration::from_millis(20);

impl TickWindow {
    /// The earliest time memcached's clock can tick after `t`. Its timer fires every second
    /// (a little more), so the ticks after one seen in this window fall in the same window a
    /// whole number of seconds later: a `t` inside one of those windows may see a tick at
    /// any moment (`t` itself is returned), one between them not before the next window.
    pub fn next_after(&self, t: std::time::Instant) -> std::time::Instant {
        let Some(since) = t.checked_duration_since(self.after) else {
            return t;
        };
        let whole = since.as_secs();
        let phase = since - Duration::from_secs(whole);
        let drift = TICK_DRIFT_MIN + TICK_DRIFT_PER_SEC * whole as u32;
        if phase <= self.by.saturating_duration_since(self.after) + drift {
            return t;
        }
        self.after + Duration::from_secs(whole + 1)
    }
}

/// memcached's one-second clock (`uptime` in `stats`) and when the `stats` was sent: memcached
/// answered it no earlier than that.
#[derive(Debug, Clone, Copy)]
pub struct ClockSample {
    pub uptime: u64,
    pub asked_at: std::time::Instant,
}

/// memcached's unix time minus the monotonic clock (ns), bounded from above from its `time`
/// stat (`unix_time`) answered to a `stats` sent at monotonic `asked_at_ns`: memcached read
/// that time after the request was sent, and its one-second clock may tick right after; one
/// more second covers a tick its clock event ran late. From above, because the kernel
/// expires an item with an absolute exptime at `exptime - offset`: too large an offset only
/// expires it early.
pub fn memcached_realtime_offset_ns(unix_time: u64, asked_at_ns: u64) -> u64 {
    (unix_time + 2)
        .saturating_mul(1_000_000_000)
        .saturating_sub(asked_at_ns)
}

/// What `stats` says about memcached, as far as the health check needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pid: u64,
    /// When the process started (`time - uptime`, both from memcached's own clock: exact).
    started: u64,
    uptime: u64,
    /// Items or log entries about them memcached dropped without a watch stream hearing of
    /// it ([`UNREPORTED_DROPS`]). Under a burst of writes the worker threads drop log entries
    /// without a `skipped=` line on the watch stream, evictions among them.
    dropped: u64,
}

/// memcached's counters of items it dropped, or of log entries about them, that never reach
/// a `watch` stream: log entries the worker threads dropped under a burst of writes (evictions
/// among them) or the watcher skipped, and items the slab mover dropped when it found no free
/// chunk to move them to (`slabs reassign`, or the background automover) or found busy.
const UNREPORTED_DROPS: [&str; 4] = [
    "log_worker_dropped",
    "log_watcher_skipped",
    "slab_reassign_evictions_nomem",
    "slab_reassign_busy_deletes",
];

/// One persistent connection for health checks.
struct Probe {
    stream: Option<BufReader<TcpStream>>,
}

impl Probe {
    async fn request(
        &mut self,
        addr: std::net::SocketAddr,
        cmd: &str,
        until: &str,
        limit: Duration,
    ) -> Option<Vec<String>> {
        if self.stream.is_none() {
            self.stream = Some(crate::requests::connect(addr, limit).await.ok()?);
        }
        let result = timeout(limit, async {
            let s = self.stream.as_mut()?;
            s.get_mut().write_all(cmd.as_bytes()).await.ok()?;
            let mut lines = Vec::new();
            loop {
                let mut line = String::new();
                if s.read_line(&mut line).await.ok()? == 0 {
                    return None;
                }
                let line = line.trim_end().to_string();
                let done = line.starts_with(until) || line.starts_with("ERROR");
                lines.push(line);
                if done {
                    return Some(lines);
                }
            }
        })
        .await
        .ok()
        .flatten();
        if result.is_none() {
            self.stream = None;
        }
        result
    }

    async fn identity(&mut self, addr: std::net::SocketAddr, limit: Duration) -> Option<Identity> {
        let lines = self.request(addr, "stats\r\n", "END", limit).await?;
        let stat = |name: &str| stat_number(&lines, name);
        let uptime = stat("uptime")?;
        Some(Identity {
            pid: stat("pid")?,
            started: stat("time")?.saturating_sub(uptime),
            uptime,
            dropped: UNREPORTED_DROPS
                .iter()
                .map(|name| stat(name).unwrap_or(0))
                .sum(),
        })
    }
}

/// Renews the lease while memcached is healthy; resyncs after any doubt. Runs until dropped.
///
/// Each probe that memcached answers within half the fill lease also extends the fill lease
/// to the probe's send time plus the fill lease. A stalled memcached answers late, so fills
/// stop by themselves in the kernel, whatever this task is doing: a write queued inside
/// memcached for longer than the write-settle time (which the per-key settle rule alone
/// cannot see) never lets an answer from before it be cached.
pub async fn lease_loop(shared: Arc<Shared>) {
    let s = &shared.settings;
    let interval = s.probe_interval();
    let limit = s.lease / 2;
    let fill_lease = s.fill_lease();
    let mut probe = Probe { stream: None };
    // An adopted cache (upgrade mode) comes with the memcached it was filled from: any other
    // process (restarted between the two agents) is a restart like any seen while running.
    let mut identity: Option<Identity> = {
        let c = shared.config.lock().expect("config lock");
        (c.memcached_pid != 0).then_some(Identity {
            pid: c.memcached_pid as u64,
            started: c.memcached_started_s,
            uptime: 0,
            dropped: 0,
        })
    };
    let mut healthy = false;
    let mut backlog = BacklogWatch::default();
    // When the previous probe was sent, if no connection was backlogged at it.
    let mut previous_clear: Option<u64> = None;
    loop {
        let asked_at = std::time::Instant::now();
        let asked_at_ns = kernel::coarse_now_ns();
        // Looked at after asked_at_ns, so "clear at this probe" holds from before it.
        let clear = !backlog.look(&shared, s.memcached.port());
        let id = probe.identity(s.memcached, limit).await;
        let answered_at = std::time::Instant::now();
        let ok = id.is_some();
        // Counted from the previous probe, and only if both probes found no backlog: a write
        // that reached memcached just before this look may not have stopped it yet, but one
        // that arrived before the previous probe and is still held shows by now.
        let fill_until = match (clear, previous_clear) {
            (true, Some(since)) if asked_at.elapsed() < fill_lease / 2 => {
                Some(since + fill_lease.as_nanos() as u64)
            }
            _ => None,
        };
        previous_clear = clear.then_some(asked_at_ns);
        if let Some(id) = id {
            let mut clock = shared.clock.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(before) = *clock
                && id.uptime > before.uptime
            {
                *shared.last_tick.lock().unwrap_or_else(|p| p.into_inner()) = Some(TickWindow {
                    after: before.asked_at,
                    by: answered_at,
                });
            }
            *clock = Some(ClockSample {
                uptime: id.uptime,
                asked_at,
            });
            drop(clock);
            shared.record_memcached_clock(&id, asked_at_ns);
        }
        shared.memcached_ok.store(ok, Ordering::Relaxed);
        match (id, identity) {
            (Some(now), Some(before))
                if now.pid != before.pid
                    || now.started != before.started
                    || now.uptime < before.uptime =>
            {
                shared.resync("memcached restarted");
                identity = Some(now);
                // It may take larger items now (`-I`): the scanner's guard window follows.
                if let Some(lines) = probe
                    .request(s.memcached, "stats settings\r\n", "END", limit)
                    .await
                    && let Some(window) = guard_window_of(&lines)
                {
                    shared.publish(|c| c.guard_window = window);
                }
            }
            // An eviction the watch stream never reported may be cached.
            (Some(now), Some(before)) if now.dropped > before.dropped => {
                shared.resync(
                    "memcached dropped items or log entries the watch stream never reported \
                     (log_worker_dropped, log_watcher_skipped, slab mover)",
                );
                identity = Some(now);
            }
            (Some(now), _) => identity = Some(now),
            (None, _) => {}
        }
        if let Some(id) = identity {
            shared.record_memcached(&id);
        }
        if ok && shared.watch_ok.load(Ordering::Relaxed) {
            if !healthy {
                if identity.is_some() && shared.lease_renewals.load(Ordering::Relaxed) > 0 {
                    shared.resync("memcached reachable again");
                }
                info!("memcached healthy: serving");
                healthy = true;
            }
            shared.renew(fill_until);
        } else {
            if healthy {
                warn!(
                    memcached_ok = ok,
                    watch_ok = shared.watch_ok.load(Ordering::Relaxed),
                    "stopped serving until memcached and the watch stream are back"
                );
                shared.revoke();
            }
            healthy = false;
        }
        sleep(interval).await;
    }
}

/// Follows memcached's connections for [`crate::backlog`] from one probe to the next.
#[derive(Default)]
struct BacklogWatch {
    /// What was last logged: that a backlog holds fills, that memcached cannot be seen.
    logged_hold: bool,
    logged_blind: bool,
    logged_unaccepted: bool,
    logged_unread: bool,
    /// What each connection had received at the previous look.
    received_before: HashMap<(IpAddr, u16), u64>,
}

impl BacklogWatch {
    /// Whether a connection is backlogged now (false if that cannot be seen). The lease loop
    /// extends fills only from two clear looks in a row, counted from the first: a write held
    /// longer than the settle time shows at every look after the first one that follows it
    /// (and a writer woken a moment ago, with a short queue, makes one look miss a hold, not
    /// two in a row), so the fill lease given before it runs out before a GET after the
    /// settle time can be filled.
    fn look(&mut self, shared: &Shared, port: u16) -> bool {
        let snapshot = match crate::backlog::snapshot(port, &crate::backlog::own_sockets()) {
            Ok(s) => s,
            Err(e) => {
                if !self.logged_blind {
                    warn!(error = %e, "cannot list memcached's connections (sock_diag): a write held up by a client that does not read its replies is not detected");
                    self.logged_blind = true;
                }
                return false;
            }
        };
        if !snapshot.listening && !self.logged_blind {
            warn!(
                port,
                "no socket listens on memcached's port in the agent's network namespace (memcached is down, or runs in another namespace): a write held up by a client that does not read its replies is not detected"
            );
            self.logged_blind = true;
        }
        // A connection waiting to be accepted holds whatever its client sent (a client that
        // connects for each write, under load): found by a CI run on an overloaded machine,
        // where such a write was applied over a second after the scanner saw it while the
        // probes, on an accepted connection, were answered at once.
        if snapshot.unaccepted > 0 && !self.logged_unaccepted {
            warn!(
                connections = snapshot.unaccepted,
                "memcached is slow to accept connections: fills pause until it catches up \
                 (a write sent on a new connection is applied only once it is accepted)"
            );
            self.logged_unaccepted = true;
        } else if snapshot.unaccepted == 0 && self.logged_unaccepted {
            info!("memcached accepts connections promptly again: fills resume");
            self.logged_unaccepted = false;
        }
        let unread = self.unread_since_last_look(&snapshot.received);
        let now = !snapshot.backlogged.is_empty() || snapshot.unaccepted > 0 || !unread.is_empty();
        shared.backlogged_connections.store(
            (snapshot.backlogged.len() + unread.len()) as u64,
            Ordering::Relaxed,
        );
        let now_backlogged = !snapshot.backlogged.is_empty();
        if now_backlogged && !self.logged_hold {
            let first = &snapshot.backlogged[0];
            warn!(
                connections = snapshot.backlogged.len(),
                peer = %first.peer,
                peer_port = first.peer_port,
                queued = first.queued,
                sndbuf = first.sndbuf,
                "a client is not taking memcached's replies: fills pause until it does (a write it sent after them may be applied late)"
            );
            self.logged_hold = true;
        } else if !now_backlogged && self.logged_hold {
            info!("no memcached connection is backlogged: fills resume");
            self.logged_hold = false;
        }
        if let Some(first) = unread.first()
            && !self.logged_unread
        {
            warn!(
                connections = unread.len(),
                peer = %first.peer,
                peer_port = first.peer_port,
                unread = first.unread,
                "memcached has not read what a client sent before the last probe (a stalled \
                 worker thread): fills pause until it does (a \
                 write among those bytes is applied late)"
            );
            self.logged_unread = true;
        } else if unread.is_empty() && self.logged_unread {
            info!("memcached has read what its clients sent: fills resume");
            self.logged_unread = false;
        }
        now
    }

    /// The connections that still have bytes unread which had arrived by the previous look:
    /// requests memcached has held back for at least a probe interval. Found by a test that
    /// stops one worker thread (ptrace) while the other answers the probes: a write on one of
    /// its connections waited unread past the settle time, and the old value was cached.
    fn unread_since_last_look(
        &mut self,
        now: &[crate::backlog::Received],
    ) -> Vec<crate::backlog::Received> {
        let held = now
            .iter()
            .filter(|r| {
                self.received_before
                    .get(&(r.peer, r.peer_port))
                    .is_some_and(|&before| r.read() < before)
            })
            .copied()
            .collect();
        self.received_before = now
            .iter()
            .map(|r| ((r.peer, r.peer_port), r.received))
            .collect();
        held
    }
}

/// `cmd`'s answer lines up to the one starting with `until` (or an error), on a connection
/// of its own; None if memcached did not answer within `limit`.
pub async fn request_once(
    addr: std::net::SocketAddr,
    cmd: &str,
    until: &str,
    limit: Duration,
) -> Option<Vec<String>> {
    Probe { stream: None }
        .request(addr, cmd, until, limit)
        .await
}

/// The value of `STAT <name> <value>` among `stats` answer lines.
pub fn stat<'a>(lines: &'a [String], name: &str) -> Option<&'a str> {
    lines.iter().find_map(|l| {
        l.strip_prefix("STAT ")?
            .strip_prefix(name)?
            .strip_prefix(' ')
    })
}

fn stat_number(lines: &[String], name: &str) -> Option<u64> {
    stat(lines, name)?.parse().ok()
}

/// memcached's `stats settings`.
pub async fn memcached_settings(addr: std::net::SocketAddr) -> Option<Vec<String>> {
    request_once(addr, "stats settings\r\n", "END", Duration::from_secs(1)).await
}

/// The write scanner's guard window (see `Config::guard_window`) for memcached's `stats
/// settings`: it follows from `item_size_max`, the largest data block memcached stores.
pub fn guard_window_of(settings: &[String]) -> Option<u32> {
    let largest = stat_number(settings, "item_size_max")?;
    Some(cache_common::guard_window(
        largest.min(u32::MAX as u64) as u32
    ))
}

/// memcached's `evictions` and the sum of its [`UNREPORTED_DROPS`] counters.
async fn loss_counters(addr: std::net::SocketAddr) -> std::io::Result<(u64, u64)> {
    let lines = request_once(addr, "stats\r\n", "END", Duration::from_secs(1))
        .await
        .ok_or_else(|| std::io::Error::other("stats"))?;
    let count = |name: &str| stat_number(&lines, name);
    let evictions = count("evictions").ok_or_else(|| std::io::Error::other("no evictions stat"))?;
    let dropped: u64 = UNREPORTED_DROPS
        .iter()
        .map(|name| count(name).unwrap_or(0))
        .sum();
    Ok((evictions, dropped))
}

/// How long memcached may hold a log entry before its watch streams get it: the logger thread
/// sleeps up to a second when idle (memcached 1.6 `MAX_LOGGER_SLEEP`).
const WATCH_DELIVERY: Duration = Duration::from_millis(1500);

/// Reads memcached's loss counters for the next agent (upgrade mode), then keeps following
/// `watch` for [`WATCH_DELIVERY`], so every eviction they count has been invalidated when
/// this agent stops. None if the counters could not be read or the stream was lost meanwhile.
pub async fn handover_counters(shared: &Shared) -> Option<(u64, u64)> {
    let counters = loss_counters(shared.settings.memcached).await.ok()?;
    if shared.settings.watch {
        sleep(WATCH_DELIVERY).await;
        if !shared.watch_ok.load(Ordering::Relaxed) {
            return None;
        }
    }
    Some(counters)
}

/// Why an adopted cache cannot be kept, given memcached's loss counters now and as the
/// previous agent handed them over; None if nothing was lost since.
fn adoption_doubt(now: (u64, u64), handed_over: (u64, u64)) -> Option<String> {
    let (evictions, dropped) = now;
    let (evictions_then, dropped_then) = handed_over;
    if evictions_then == HANDOVER_UNKNOWN || dropped_then == HANDOVER_UNKNOWN {
        Some("the previous agent did not hand over memcached's eviction counters".into())
    } else if evictions != evictions_then {
        Some(format!(
            "memcached's evictions went from {evictions_then} to {evictions} between the two \
             agents (no watch stream saw them)"
        ))
    } else if dropped != dropped_then {
        Some(
            "memcached dropped items or log entries between the two agents \
             (log_worker_dropped, log_watcher_skipped, slab mover)"
                .into(),
        )
    } else {
        None
    }
}

/// Stamps the heartbeat every [`HEARTBEAT_NS`] until dropped, whatever memcached does.
pub async fn heartbeat_loop(shared: Arc<Shared>) {
    loop {
        shared.heartbeat();
        sleep(Duration::from_nanos(HEARTBEAT_NS / 2)).await;
    }
}

/// Follows `watch mutations evictions` and invalidates every key it reports.
pub async fn watch_loop(shared: Arc<Shared>) {
    let addr = shared.settings.memcached;
    loop {
        if let Err(e) = follow_watch(&shared, addr).await {
            debug!(error = %e, "watch stream ended");
        }
        if shared.watch_ok.swap(false, Ordering::Relaxed) {
            warn!("watch stream lost: not serving until it is back");
            shared.revoke();
        }
        sleep(Duration::from_millis(200)).await;
    }
}

async fn follow_watch(shared: &Shared, addr: std::net::SocketAddr) -> std::io::Result<()> {
    let stream = timeout(Duration::from_secs(1), TcpStream::connect(addr)).await??;
    let mut stream = BufReader::new(stream);
    let mut line = String::new();
    for cmd in ["watch mutations evictions\r\n", "watch mutations\r\n"] {
        stream.get_mut().write_all(cmd.as_bytes()).await?;
        line.clear();
        timeout(Duration::from_secs(1), stream.read_line(&mut line)).await??;
        if line.starts_with("OK") {
            break;
        }
    }
    if !line.starts_with("OK") {
        return Err(std::io::Error::other(format!(
            "memcached refused watch: {}",
            line.trim()
        )));
    }
    // Events before this point were not seen: start from a clean cache. An adopted cache was
    // kept invalidating by the attached scanner, but evictions in the gap between agents went
    // to no watch stream: it is kept only if memcached has never evicted (or dropped a log
    // entry), which its counters, read after the stream is up, tell.
    if !shared
        .skip_first_watch_resync
        .swap(false, Ordering::Relaxed)
    {
        shared.resync("watch stream (re)connected");
    } else {
        let handed_over = {
            let c = shared.config.lock().expect("config lock");
            (c.handover_evictions, c.handover_dropped)
        };
        match loss_counters(addr).await {
            Ok(now) => match adoption_doubt(now, handed_over) {
                None => info!("adopted cache kept: memcached lost nothing between the two agents"),
                Some(why) => shared.resync(&format!("adopted cache: {why}")),
            },
            Err(_) => shared.resync("adopted cache: memcached's stats could not be read"),
        }
    }
    shared.watch_ok.store(true, Ordering::Relaxed);
    info!("following memcached's watch stream");
    loop {
        line.clear();
        if stream.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let event = line.trim_end();
        if event.contains("skipped=") {
            shared.resync("watch stream skipped events");
            continue;
        }
        if let Some(key) = watch_key(event) {
            let ebpf = shared.ebpf.lock().expect("ebpf lock");
            match kernel::invalidate_key(&ebpf, shared.settings.udp_port, &key) {
                Ok(()) => {
                    shared.watch_invalidations.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    drop(ebpf);
                    warn!(error = %e, "could not invalidate a watched key");
                    shared.resync("watch invalidation failed");
                }
            }
        }
    }
}

/// The key of a watch line (`... key=<uri-encoded> ...`), decoded.
pub fn watch_key(line: &str) -> Option<Vec<u8>> {
    let raw = line.split(' ').find_map(|f| f.strip_prefix("key="))?;
    let mut out = Vec::with_capacity(raw.len());
    let b = raw.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) = u8::from_str_radix(&raw[i + 1..i + 3], 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    (!out.is_empty() && out.len() <= cache_common::MAX_KEY_LEN).then_some(out)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::{
        BacklogWatch, TickWindow, adoption_doubt, memcached_realtime_offset_ns, watch_key,
    };
    use crate::backlog::Received;
    use cache_common::HANDOVER_UNKNOWN;

    #[test]
    fn bytes_still_unread_a_look_after_they_arrived_hold_fills() {
        let peer = "198.18.0.2".parse().unwrap();
        let conn = |received, unread| Received {
            peer,
            peer_port: 40000,
            received,
            unread,
        };
        let mut watch = BacklogWatch::default();
        // A first look knows nothing of what came before.
        assert!(watch.unread_since_last_look(&[conn(1000, 200)]).is_empty());
        // All of the 1000 bytes from before are read (more may have come): clear.
        assert!(watch.unread_since_last_look(&[conn(1500, 500)]).is_empty());
        // 1,450 of 1,500 bytes read: 50 that arrived before the last look are still unread.
        assert_eq!(
            watch.unread_since_last_look(&[conn(1600, 150)]),
            vec![conn(1600, 150)]
        );
        // A connection gone, another new: nothing to compare.
        let other = Received {
            peer_port: 40001,
            ..conn(10, 10)
        };
        assert!(watch.unread_since_last_look(&[other]).is_empty());
    }

    #[test]
    fn an_adopted_cache_is_kept_only_if_nothing_was_lost_since_the_handover() {
        // Evictions and drops from before the handover were reported to the previous agent.
        assert_eq!(adoption_doubt((5000, 18919), (5000, 18919)), None);
        let e = adoption_doubt((5001, 18919), (5000, 18919)).unwrap();
        assert!(e.contains("evictions went from 5000 to 5001"), "{e}");
        let e = adoption_doubt((5000, 18920), (5000, 18919)).unwrap();
        assert!(e.contains("dropped") && !e.contains("evictions"), "{e}");
        for unknown in [(HANDOVER_UNKNOWN, 0), (0, HANDOVER_UNKNOWN)] {
            let e = adoption_doubt((0, 0), unknown).unwrap();
            assert!(e.contains("did not hand over"), "{e}");
        }
    }

    /// memcached's clock: `unix = started_unix + floor((mono - mono_at_start) / 1 s)`, read
    /// up to a second late (its clock event runs once a second). Whenever the `stats` is
    /// answered after it was sent, the bound is at least memcached's real offset, so an
    /// absolute exptime is never converted to a deadline after memcached's own.
    #[test]
    fn the_offset_from_memcacheds_clock_never_falls_below_memcacheds() {
        const SEC: u64 = 1_000_000_000;
        let started_unix = 1_765_000_000u64;
        let mono_at_start = 123_456_789_012u64;
        // memcached's exact offset: unix seconds minus monotonic, in ns.
        let exact = started_unix * SEC - mono_at_start;
        for asked in (0..40u64).map(|i| mono_at_start + 5 * SEC + i * 97_000_000) {
            for delay in [0, 1_000_000, 300_000_000, 900_000_000] {
                for late in [0, 999_000_000] {
                    let answered = asked + delay;
                    let seen = (answered - mono_at_start).saturating_sub(late) / SEC;
                    let bound = memcached_realtime_offset_ns(started_unix + seen, asked);
                    assert!(bound >= exact, "asked {asked} delay {delay} late {late}");
                    assert!(
                        bound - exact <= 3 * SEC + delay,
                        "too loose: {}",
                        bound - exact
                    );
                }
            }
        }
    }

    #[test]
    fn the_next_tick_is_never_placed_after_one_that_may_come_sooner() {
        let after = Instant::now();
        let ms = Duration::from_millis;
        // A tick was seen between `after` and 60 ms later.
        let w = TickWindow {
            after,
            by: after + ms(60),
        };
        // Before or inside that window, or inside its copies a second later: any moment.
        for t in [ms(0), ms(30), ms(79), ms(1030), ms(2000) + ms(60) + ms(29)] {
            assert_eq!(w.next_after(after + t), after + t, "{t:?}");
        }
        // Between windows: not before the next one opens.
        assert_eq!(w.next_after(after + ms(100)), after + ms(1000));
        assert_eq!(w.next_after(after + ms(1500)), after + ms(2000));
        // A question asked before the window was seen.
        let earlier = after.checked_sub(ms(5)).unwrap_or(after);
        assert_eq!(w.next_after(earlier), earlier);
    }

    #[test]
    fn watch_lines_yield_decoded_keys() {
        let line = "ts=1.2 gid=7 type=item_store key=user%3A1 status=stored cmd=set ttl=0 clsid=1";
        assert_eq!(watch_key(line).unwrap(), b"user:1");
        assert_eq!(
            watch_key("ts=1 gid=2 type=eviction key=abc ttl=-1").unwrap(),
            b"abc"
        );
        assert!(watch_key("OK").is_none());
    }
}
