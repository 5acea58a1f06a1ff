//! Learning the TTLs the kernel did not see (the kernel half is cache-ebpf's `learn.rs`).
//!
//! A `get` reply carries no TTL, so an entry filled for an item whose write the kernel never
//! saw (stored before the agent started, say), or whose last write memcached may have refused
//! (add, replace, cas), has no TTL the kernel can trust. tc_fill stores it expired and queues
//! the key on the TTL_QUERIES ring buffer. This task asks memcached with `me <key>` (meta
//! debug: it changes nothing and does not count as a get in memcached's `stats`) and installs
//! the answer through `xdp_learn_ttl`, which refuses it if a write to the key was seen since
//! the question (see `learn.rs` for why that is enough). Until then the entry is not served:
//! memcached's item may expire at any moment.
//!
//! memcached 1.6 prints `exp=` as its clock minus the item's exptime: `-N` for N seconds left,
//! and `-1` both for "never expires" and for "one second left". A `-1` is asked again once
//! memcached's own one-second clock (its `uptime`, read by the health check) has ticked past
//! the answer: an item with one second left is gone by then, so a second `-1` means "never" (a
//! write in between is caught by the kernel's check against the first question's time). A
//! positive `exp=` (a memcached that prints the time left) is read as the time left.

use std::{
    collections::{HashSet, VecDeque},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use cache_common::{TtlAnswer, TtlQuery, names, ttl_answer};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Interest, unix::AsyncFd},
    net::TcpStream,
    sync::mpsc,
    time::{sleep, timeout},
};
use tracing::{debug, warn};

use crate::coherence::{ClockSample, Shared};
use crate::kernel::coarse_now_ns;
use crate::requests;

/// Questions sent to memcached in one pipelined write.
const BATCH: usize = 64;
/// Queries waiting for the asking task; more are dropped (the entries live `--max-age`).
const QUEUE: usize = 16_384;
/// How often answers waiting for memcached's clock to tick are checked.
const CLOCK_POLL: Duration = Duration::from_millis(100);
/// memcached's clock lags real time by up to a second: expire that much early.
const EXPIRY_MARGIN_NS: u64 = cache_common::MEMCACHED_CLOCK_MARGIN_NS;
const NS_PER_SEC: u64 = 1_000_000_000;
const IO_LIMIT: Duration = Duration::from_secs(1);
/// The kernel's coarse clock runs up to a tick (4 ms at 250 Hz) behind the monotonic clock:
/// an entry served until memcached's next clock tick stops this much before it.
const TICK_MARGIN_NS: u64 = 10_000_000;
/// How often the ring buffer is read when the kernel did not wake the agent.
const POLL_EVERY: Duration = Duration::from_millis(10);

/// What became of the queries, for the metrics.
#[derive(Default)]
pub struct Outcomes {
    /// The entry now expires with memcached's item.
    pub installed: AtomicU64,
    /// memcached no longer holds the item, or the entry went first.
    pub gone: AtomicU64,
    /// A write to the key was seen since the question: the answer was not used.
    pub raced: AtomicU64,
    /// memcached or the kernel could not be asked, or answered something unexpected.
    pub failed: AtomicU64,
    /// The agent's queue was full.
    pub dropped: AtomicU64,
}

/// memcached's answer to `me <key>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Remaining {
    /// No such item (`EN`).
    Gone,
    /// `exp=-1`: never expires, or one second left.
    NeverOrOneSecond,
    Seconds(u64),
    /// `ERROR`: a memcached without meta commands (before 1.6).
    Unsupported,
}

/// Reads one answer line to `me <key>`; `None` if it is not one.
pub fn parse_meta_debug(line: &str) -> Option<Remaining> {
    let line = line.trim_end();
    match line {
        "EN" => return Some(Remaining::Gone),
        "ERROR" => return Some(Remaining::Unsupported),
        _ => {}
    }
    if !line.starts_with("ME ") {
        return None;
    }
    // After `ME <key>`: a key may itself start with `exp=`.
    let exp: i64 = line
        .split(' ')
        .skip(2)
        .find_map(|f| f.strip_prefix("exp="))?
        .parse()
        .ok()?;
    Some(match exp {
        -1 => Remaining::NeverOrOneSecond,
        // Expiring this very second.
        0 => Remaining::Gone,
        e => Remaining::Seconds(e.unsigned_abs()),
    })
}

/// Coarse monotonic time an item with `remaining` seconds left when asked at `asked_at_ns` is
/// surely still there; `None` if that is already now.
pub fn expiry_ns(asked_at_ns: u64, remaining: u64) -> Option<u64> {
    let deadline = asked_at_ns.saturating_add(remaining.saturating_mul(NS_PER_SEC));
    let safe = deadline.checked_sub(asked_at_ns + EXPIRY_MARGIN_NS)?;
    (safe > 0).then_some(asked_at_ns + safe)
}

/// Reads TTL_QUERIES and asks memcached, until dropped.
pub async fn learn_loop(shared: Arc<Shared>, ring: RingBuf<MapData>) {
    let (tx, rx) = mpsc::channel(QUEUE);
    let reader = tokio::spawn(read_queries(Arc::clone(&shared), ring, tx));
    ask_loop(&shared, rx).await;
    reader.abort();
}

async fn read_queries(
    shared: Arc<Shared>,
    ring: RingBuf<MapData>,
    tx: mpsc::Sender<TtlQuery>,
) -> std::io::Result<()> {
    // SAFETY: the ring buffer owns its fd for as long as the AsyncFd owns the ring buffer.
    let mut fd = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)?;
    // The kernel wakes the agent only once a batch has built up: poll for the rest.
    let mut poll = tokio::time::interval(POLL_EVERY);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            guard = fd.readable_mut() => guard?.clear_ready(),
            _ = poll.tick() => {}
        }
        let ring = fd.get_mut();
        while let Some(item) = ring.next() {
            let Some(query) = read_query(&item) else {
                continue;
            };
            if tx.try_send(query).is_err() {
                shared.ttl.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// A ring buffer record: a [`TtlQuery`], or a [`cache_common::ShortTtlQuery`] (the same
/// layout, cut short) for short keys.
pub fn read_query(record: &[u8]) -> Option<TtlQuery> {
    let head = size_of::<TtlQuery>() - cache_common::QUERY_KEY_BYTES;
    if record.len() < head || record.len() > size_of::<TtlQuery>() {
        return None;
    }
    let mut query = TtlQuery {
        key_hash: 0,
        key_len: 0,
        instance: 0,
        class: 0,
        _pad: 0,
        key: [0; cache_common::QUERY_KEY_BYTES],
    };
    // SAFETY: TtlQuery is plain `repr(C)` data; at most its size is written.
    unsafe {
        std::ptr::copy_nonoverlapping(record.as_ptr(), (&raw mut query).cast::<u8>(), record.len())
    };
    (query.key_len as usize <= record.len() - head).then_some(query)
}

/// One key to ask about.
struct Question {
    query: TtlQuery,
    /// Set when asking again after a `-1`: when the first question was asked.
    first_asked_at_ns: Option<u64>,
}

impl Question {
    fn key(&self) -> &[u8] {
        &self.query.key[..(self.query.key_len as usize).min(self.query.key.len())]
    }
}

/// Keys answered `-1`, waiting for memcached's clock to tick past the answer.
#[derive(Default)]
struct Confirmations {
    groups: VecDeque<AnsweredTogether>,
    /// Their keys, so a refill of the same key meanwhile is not asked about again.
    keys: HashSet<Vec<u8>>,
}

struct AnsweredTogether {
    answered_at: std::time::Instant,
    /// memcached's clock in a `stats` sent after the answers arrived: at least the clock the
    /// answers were given at.
    clock_bound: Option<u64>,
    questions: Vec<Question>,
}

impl Confirmations {
    fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    fn waiting(&self, key: &[u8]) -> bool {
        self.keys.contains(key)
    }

    fn push(&mut self, answered_at: std::time::Instant, q: Question) {
        self.keys.insert(q.key().to_vec());
        match self.groups.back_mut() {
            Some(g) if g.answered_at == answered_at => g.questions.push(q),
            _ => self.groups.push_back(AnsweredTogether {
                answered_at,
                clock_bound: None,
                questions: vec![q],
            }),
        }
    }

    /// Questions to ask again: memcached's clock has moved past the bound taken after their
    /// answers, so an item that had one second left is gone by now.
    fn ready(&mut self, clock: Option<ClockSample>) -> Vec<Question> {
        let Some(clock) = clock else {
            return Vec::new();
        };
        for g in self.groups.iter_mut() {
            if g.clock_bound.is_none() && clock.asked_at > g.answered_at {
                g.clock_bound = Some(clock.uptime);
            }
        }
        let mut out = Vec::new();
        while self
            .groups
            .front()
            .is_some_and(|g| g.clock_bound.is_some_and(|b| clock.uptime > b))
        {
            let g = self.groups.pop_front().expect("front checked");
            for q in &g.questions {
                self.keys.remove(q.key());
            }
            out.extend(g.questions);
        }
        out
    }
}

/// Keys asked about lately. An entry whose TTL is not learned yet is not served, so every GET
/// for it goes to memcached and every reply refills it and queues the key again: one question
/// per key and [`RECENT`] is enough.
#[derive(Default)]
struct Recent {
    asked: VecDeque<(std::time::Instant, Vec<u8>)>,
    keys: HashSet<Vec<u8>>,
}

/// How long a key just asked about is not asked about again.
const RECENT: Duration = Duration::from_millis(20);

impl Recent {
    /// Whether `key` was not asked about within [`RECENT`]; records it if so.
    fn first_time(&mut self, key: &[u8]) -> bool {
        let now = std::time::Instant::now();
        while let Some((at, _)) = self.asked.front() {
            if now.duration_since(*at) < RECENT {
                break;
            }
            let (_, old) = self.asked.pop_front().expect("front checked");
            self.keys.remove(&old);
        }
        if self.keys.contains(key) {
            return false;
        }
        self.keys.insert(key.to_vec());
        self.asked.push_back((now, key.to_vec()));
        true
    }
}

async fn ask_loop(shared: &Shared, mut rx: mpsc::Receiver<TtlQuery>) {
    let mut conn: Option<BufReader<TcpStream>> = None;
    let mut confirm = Confirmations::default();
    let mut recent = Recent::default();
    let mut clock_poll = tokio::time::interval(CLOCK_POLL);
    clock_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut batch: Vec<Question> = Vec::with_capacity(BATCH);
        tokio::select! {
            q = rx.recv() => match q {
                Some(query) => batch.push(Question { query, first_asked_at_ns: None }),
                None => return,
            },
            _ = clock_poll.tick(), if !confirm.is_empty() => {}
        }
        let mut again = confirm.ready(shared.memcached_clock());
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(query) => batch.push(Question {
                    query,
                    first_asked_at_ns: None,
                }),
                Err(_) => break,
            }
        }
        batch.retain(|q| !confirm.waiting(q.key()) && recent.first_time(q.key()));
        batch.append(&mut again);
        // `me <key>\r\n` per key.
        for chunk in requests::runs(&batch, 0, BATCH, |q| q.key().len() + 5) {
            if let Err(Unsupported) = ask_and_install(shared, &mut conn, chunk, &mut confirm).await
            {
                warn!(
                    "memcached does not know `me` (meta commands need memcached 1.6): TTLs the \
                     kernel did not see stay bounded by --max-age"
                );
                shared.stop_ttl_queries();
                // Whatever was queued before the kernel stopped is not asked about.
                while let Some(_query) = rx.recv().await {
                    shared.ttl.failed.fetch_add(1, Ordering::Relaxed);
                }
                return;
            }
        }
    }
}

/// memcached answered `ERROR` to `me`.
struct Unsupported;

/// Asks about one batch and acts on the answers.
async fn ask_and_install(
    shared: &Shared,
    conn: &mut Option<BufReader<TcpStream>>,
    batch: &[Question],
    confirm: &mut Confirmations,
) -> Result<(), Unsupported> {
    let asked_at_ns = coarse_now_ns();
    let asked_at = std::time::Instant::now();
    let Some(answers) = ask(shared, conn, batch).await else {
        shared
            .ttl
            .failed
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        sleep(Duration::from_millis(200)).await;
        return Ok(());
    };
    let answered_at = std::time::Instant::now();
    for (q, answer) in batch.iter().zip(answers) {
        match answer {
            None => {
                shared.ttl.failed.fetch_add(1, Ordering::Relaxed);
            }
            Some(Remaining::Unsupported) => {
                shared.ttl.failed.fetch_add(1, Ordering::Relaxed);
                return Err(Unsupported);
            }
            // Asked again after a `-1`: the item had one second left, and the entry served
            // meanwhile must go now.
            Some(Remaining::Gone) if q.first_asked_at_ns.is_some() => {
                let first = q.first_asked_at_ns.unwrap_or(asked_at_ns);
                expire(shared, &q.query, first);
            }
            // Not cached by memcached: the entry, stored expired, stays so.
            Some(Remaining::Gone) => {
                shared.ttl.gone.fetch_add(1, Ordering::Relaxed);
            }
            // Still `-1` after memcached's clock ticked: it never expires. The kernel checks
            // for writes since the first question.
            Some(Remaining::NeverOrOneSecond) if q.first_asked_at_ns.is_some() => {
                let first = q.first_asked_at_ns.unwrap_or(asked_at_ns);
                install(shared, &q.query, first, u64::MAX);
            }
            // Never, or one second left: an item with a second left goes at memcached's next
            // clock tick, so the entry is served until the earliest time that tick can come
            // (known from the health check's samples of memcached's clock), and the second
            // answer, after the tick, says which.
            Some(Remaining::NeverOrOneSecond) => {
                if let Some(tick) = shared.next_memcached_tick_after(asked_at) {
                    let left = tick.saturating_duration_since(std::time::Instant::now());
                    let until = coarse_now_ns() + left.as_nanos() as u64;
                    if let Some(until) = until.checked_sub(TICK_MARGIN_NS) {
                        install(shared, &q.query, asked_at_ns, until);
                    }
                }
                confirm.push(
                    answered_at,
                    Question {
                        query: q.query,
                        first_asked_at_ns: Some(asked_at_ns),
                    },
                )
            }
            // (On a second question, a TTL means a write changed it, which the kernel saw.)
            Some(Remaining::Seconds(s)) => match expiry_ns(asked_at_ns, s) {
                Some(expires) => install(shared, &q.query, asked_at_ns, expires),
                None => {
                    shared.ttl.gone.fetch_add(1, Ordering::Relaxed);
                }
            },
        }
    }
    Ok(())
}

/// Asks memcached about every key of `batch` in one write; one answer per key (`None` for a
/// line that is not an answer). `None` if the connection failed.
async fn ask(
    shared: &Shared,
    conn: &mut Option<BufReader<TcpStream>>,
    batch: &[Question],
) -> Option<Vec<Option<Remaining>>> {
    if batch.is_empty() {
        return Some(Vec::new());
    }
    if conn.is_none() {
        match requests::connect(shared.settings.memcached, IO_LIMIT).await {
            Ok(c) => *conn = Some(c),
            Err(e) => {
                debug!(error = %e, "TTL learning: memcached unreachable");
                return None;
            }
        }
    }
    let mut request = Vec::with_capacity(batch.len() * 24);
    for q in batch {
        request.extend_from_slice(b"me ");
        request.extend_from_slice(q.key());
        request.extend_from_slice(b"\r\n");
    }
    let result = timeout(IO_LIMIT * 2, async {
        let s = conn.as_mut()?;
        s.get_mut().write_all(&request).await.ok()?;
        let mut answers = Vec::with_capacity(batch.len());
        // Bytes: the answer repeats the key, which need not be UTF-8.
        let mut line = Vec::new();
        for _ in batch {
            line.clear();
            if s.read_until(b'\n', &mut line).await.ok()? == 0 {
                return None;
            }
            answers.push(parse_meta_debug(&String::from_utf8_lossy(&line)));
        }
        Some(answers)
    })
    .await
    .ok()
    .flatten();
    if result.is_none() {
        *conn = None;
    }
    result
}

/// Ends the entry now (an expiry of 0), counted as gone.
fn expire(shared: &Shared, query: &TtlQuery, asked_at_ns: u64) {
    install_counted(shared, query, asked_at_ns, 0, &shared.ttl.gone);
}

/// Runs `xdp_learn_ttl` on one answer and counts its verdict.
fn install(shared: &Shared, query: &TtlQuery, asked_at_ns: u64, expires_at_ns: u64) {
    install_counted(
        shared,
        query,
        asked_at_ns,
        expires_at_ns,
        &shared.ttl.installed,
    );
}

fn install_counted(
    shared: &Shared,
    query: &TtlQuery,
    asked_at_ns: u64,
    expires_at_ns: u64,
    installed: &AtomicU64,
) {
    let answer = TtlAnswer {
        query: *query,
        asked_at_ns,
        expires_at_ns,
        result: 0,
        _pad: 0,
    };
    let result = {
        let ebpf = shared.ebpf.lock().unwrap_or_else(|p| p.into_inner());
        run_answer(&ebpf, &answer)
    };
    let counter = match result {
        Ok(ttl_answer::INSTALLED) => installed,
        Ok(ttl_answer::NO_ENTRY) => &shared.ttl.gone,
        Ok(ttl_answer::WRITTEN) => &shared.ttl.raced,
        Ok(other) => {
            warn!(
                result = other,
                "xdp_learn_ttl refused an answer as malformed"
            );
            &shared.ttl.failed
        }
        Err(e) => {
            warn!(error = %e, "could not run xdp_learn_ttl");
            &shared.ttl.failed
        }
    };
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Hands one answer to the kernel; the program's verdict (a [`ttl_answer`] value).
pub fn run_answer(
    ebpf: &aya::Ebpf,
    answer: &TtlAnswer,
) -> Result<u32, aya::programs::ProgramError> {
    // SAFETY: TtlAnswer is plain `repr(C)` data with explicit padding.
    let data = unsafe {
        std::slice::from_raw_parts(
            (answer as *const TtlAnswer).cast::<u8>(),
            size_of::<TtlAnswer>(),
        )
    };
    crate::kernel::run_control(
        ebpf,
        names::XDP_LEARN_TTL,
        data,
        std::mem::offset_of!(TtlAnswer, result),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_debug_answers_are_read_as_memcached_1_6_prints_them() {
        let line = "ME user:1 exp=-100 la=0 cas=1 fetch=no cls=1 size=67\r\n";
        assert_eq!(parse_meta_debug(line), Some(Remaining::Seconds(100)));
        assert_eq!(
            parse_meta_debug("ME k exp=-1 la=3 cas=2 fetch=yes cls=1 size=62"),
            Some(Remaining::NeverOrOneSecond)
        );
        assert_eq!(parse_meta_debug("EN\r\n"), Some(Remaining::Gone));
        // The key is not a field, whatever it looks like.
        assert_eq!(
            parse_meta_debug("ME exp=999 exp=-5 la=0 cas=1 fetch=no cls=1 size=1"),
            Some(Remaining::Seconds(5))
        );
        assert_eq!(parse_meta_debug("ERROR\r\n"), Some(Remaining::Unsupported));
        // A memcached that prints the time left.
        assert_eq!(
            parse_meta_debug("ME k exp=42 la=0 cas=1 fetch=no cls=1 size=1"),
            Some(Remaining::Seconds(42))
        );
        assert_eq!(
            parse_meta_debug("CLIENT_ERROR bad command line format"),
            None
        );
        assert_eq!(parse_meta_debug("ME k la=0"), None);
    }

    #[test]
    fn learned_expiry_keeps_a_margin_for_memcacheds_clock() {
        let t = 5 * NS_PER_SEC;
        assert_eq!(
            expiry_ns(t, 10),
            Some(t + 10 * NS_PER_SEC - EXPIRY_MARGIN_NS)
        );
        assert_eq!(expiry_ns(t, 1), None);
        assert_eq!(expiry_ns(t, u64::MAX).map(|e| e > t), Some(true));
    }
}
