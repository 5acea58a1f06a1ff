//! Warm start: a new agent in front of a populated memcached fills the kernel cache from
//! memcached's own contents, instead of beginning with every key a miss.
//!
//! Once the kernel accepts fills, the agent lists the items (`lru_crawler metadump all`: key,
//! absolute expiry, last access), keeps the most recently used that the cache can hold,
//! fetches them with plain `get`s and stores each through `xdp_warm_fill` (cache-ebpf's
//! `warm.rs`), least recent first so the most recent win a full bucket. Each item is stored as
//! if its GET had reached XDP when the listing started: a write seen since then refuses it, and
//! a flush since then leaves it dead (its epochs are those of that moment).

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap},
    sync::Arc,
    time::Duration,
};

use cache_common::{
    MAX_KEY_LEN, TEXT3, WARM_FILL_HEADER, WAYS, WarmFill, hash::key_hash, names, warm_fill,
};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
    time::{sleep, timeout},
};
use tracing::{info, warn};

use crate::coherence::{Shared, watch_key};
use crate::kernel;
use crate::requests;

/// Items kept from the listing at most (bounds the agent's memory on a huge memcached).
const MAX_ITEMS: usize = 500_000;
/// More than memcached's per-item header, so `size=` never rules out an item that fits a slot.
const ITEM_HEADER_SLACK: usize = 128;
/// Keys fetched with one `get`.
const GET_BATCH: usize = 100;
/// memcached's clock margin, plus a second: the listing's `exp` is memcached's clock plus its
/// start time, both in whole seconds.
const EXPIRY_MARGIN_NS: u64 = cache_common::MEMCACHED_CLOCK_MARGIN_NS + 1_000_000_000;
const NS_PER_SEC: u64 = 1_000_000_000;
const DUMP_LIMIT: Duration = Duration::from_secs(120);
const IO_LIMIT: Duration = Duration::from_secs(5);

/// One line of `lru_crawler metadump`. Ordered by last access first.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Listed {
    /// Unix time of the last access.
    pub last_access: u64,
    pub key: Vec<u8>,
    /// Absolute unix time the item expires, or None for never.
    pub expires_unix: Option<u64>,
}

/// Parses `key=<uri-encoded> exp=<unix or -1> la=<unix> ... size=<bytes>`; None for keys the
/// text protocol cannot `get` and for items too big for any slot (not worth fetching).
pub fn parse_metadump_line(line: &str) -> Option<Listed> {
    let key = watch_key(line)?;
    if key.len() > MAX_KEY_LEN || key.iter().any(|&b| b <= b' ' || b == 0x7f) {
        return None;
    }
    let field = |name: &str| {
        line.split(' ')
            .find_map(|f| f.strip_prefix(name))
            .and_then(|v| v.trim().parse::<i64>().ok())
    };
    // memcached's item size includes its header (about 50 bytes) and the value: an item
    // larger than the biggest slot plus that never fits one.
    if field("size=").is_some_and(|size| size > (TEXT3 + ITEM_HEADER_SLACK) as i64) {
        return None;
    }
    let exp = field("exp=")?;
    Some(Listed {
        key,
        expires_unix: (exp >= 0).then_some(exp as u64),
        last_access: field("la=")?.max(0) as u64,
    })
}

/// Coarse monotonic time the kernel may serve an item expiring at `expires_unix` until;
/// None if that is already past. `offset_ns` is CLOCK_REALTIME minus CLOCK_MONOTONIC.
pub fn expiry_ns(expires_unix: Option<u64>, offset_ns: u64, now_ns: u64) -> Option<u64> {
    let Some(unix) = expires_unix else {
        return Some(u64::MAX);
    };
    let at = (unix.saturating_mul(NS_PER_SEC))
        .checked_sub(offset_ns)?
        .checked_sub(EXPIRY_MARGIN_NS)?;
    (at > now_ns).then_some(at)
}

/// Runs once, after the agent starts serving. Best effort: any failure only leaves the cache
/// to fill from traffic.
pub async fn warm_start(shared: Arc<Shared>) {
    // Fills are refused until the first lease and the start-up hold have passed.
    loop {
        let hold = shared
            .config
            .lock()
            .expect("config lock")
            .fill_hold_until_ns;
        if shared.lease_valid() && kernel::coarse_now_ns() > hold {
            break;
        }
        sleep(Duration::from_millis(100)).await;
    }
    let started = std::time::Instant::now();
    match warm(&shared).await {
        Ok((listed, chosen, outcome)) => info!(
            listed,
            chosen,
            filled = outcome.filled,
            raced = outcome.raced,
            refused = outcome.refused,
            gone = outcome.gone,
            seconds = started.elapsed().as_secs_f64(),
            "warm start: filled the kernel cache from memcached"
        ),
        Err(e) => warn!(error = %e, "warm start skipped: the cache fills from traffic"),
    }
}

#[derive(Default, Debug)]
struct Outcome {
    filled: u64,
    raced: u64,
    refused: u64,
    /// Listed but gone, expired or too big by the time it was fetched.
    gone: u64,
}

async fn warm(shared: &Shared) -> std::io::Result<(usize, usize, Outcome)> {
    let asked_at_ns = kernel::coarse_now_ns();
    let (kernel_epoch, agent_epoch) = {
        let ebpf = shared.ebpf.lock().expect("ebpf lock");
        let snap = kernel::snapshot(&ebpf).map_err(std::io::Error::other)?;
        (snap.state.kernel_epoch as u32, snap.config.agent_epoch)
    };
    let capacity: usize = shared
        .settings
        .class_buckets
        .iter()
        .map(|&b| b as usize * WAYS)
        .sum::<usize>()
        .min(MAX_ITEMS);
    let mut conn = requests::connect(shared.settings.memcached, IO_LIMIT).await?;
    let (listed, mut chosen) = timeout(DUMP_LIMIT, list(&mut conn, capacity))
        .await
        .map_err(|_| std::io::Error::other("metadump took too long"))??;
    // Least recent first: in a full bucket the most recent are stored last and stay.
    chosen.sort_by_key(|l| l.last_access);
    let offset_ns = shared.realtime_offset_ns();
    let mut outcome = Outcome::default();
    // `get` and ` <key>` per key, then CRLF.
    for batch in requests::runs(&chosen, 5, GET_BATCH, |l| l.key.len() + 1) {
        let expiries: HashMap<&[u8], Option<u64>> = batch
            .iter()
            .map(|l| (l.key.as_slice(), l.expires_unix))
            .collect();
        let items = timeout(IO_LIMIT, fetch(&mut conn, batch)).await??;
        outcome.gone += (batch.len() - items.len()) as u64;
        for (key, text) in items {
            let expires = expiries.get(key.as_slice()).copied().flatten();
            let Some(expires_at_ns) = expiry_ns(expires, offset_ns, kernel::coarse_now_ns()) else {
                outcome.gone += 1;
                continue;
            };
            let fill = WarmFill {
                key_hash: key_hash(0, &key),
                text_len: text.len() as u16,
                key_len: key.len() as u8,
                instance: 0,
                kernel_epoch,
                agent_epoch,
                asked_at_ns,
                expires_at_ns,
                result: 0,
                _pad: 0,
                text: [0; TEXT3],
            };
            let result = {
                let ebpf = shared.ebpf.lock().unwrap_or_else(|p| p.into_inner());
                run_warm_fill(&ebpf, &fill, &text)
            };
            match result {
                Ok(warm_fill::FILLED) => outcome.filled += 1,
                Ok(warm_fill::RACED) => outcome.raced += 1,
                Ok(warm_fill::REFUSED) => {
                    // A flush, resync or lost lease since the listing: the rest would be too.
                    outcome.refused += 1;
                    return Ok((listed, chosen.len(), outcome));
                }
                Ok(other) => {
                    warn!(result = other, "xdp_warm_fill refused an item as malformed");
                    outcome.refused += 1;
                }
                Err(e) => return Err(std::io::Error::other(e)),
            }
        }
    }
    Ok((listed, chosen.len(), outcome))
}

/// Lists memcached's items; returns how many were listed and the `limit` most recently used.
async fn list(
    conn: &mut BufReader<TcpStream>,
    limit: usize,
) -> std::io::Result<(usize, Vec<Listed>)> {
    for _ in 0..10 {
        if let Some(done) = list_once(conn, limit).await? {
            return Ok(done);
        }
        // Another crawl is running: try again shortly.
        sleep(Duration::from_millis(500)).await;
    }
    Err(std::io::Error::other("memcached's LRU crawler stayed busy"))
}

/// One `lru_crawler metadump all`; None if the crawler was busy.
async fn list_once(
    conn: &mut BufReader<TcpStream>,
    limit: usize,
) -> std::io::Result<Option<(usize, Vec<Listed>)>> {
    conn.get_mut()
        .write_all(b"lru_crawler metadump all\r\n")
        .await?;
    // The newest kept: a min-heap on last access, of at most `limit` entries.
    let mut newest: BinaryHeap<Reverse<Listed>> = BinaryHeap::new();
    let mut listed = 0;
    let mut line = String::new();
    loop {
        line.clear();
        if conn.read_line(&mut line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let l = line.trim_end();
        if l == "END" {
            break;
        }
        if l.starts_with("BUSY") {
            return Ok(None);
        }
        if l.starts_with("ERROR") || l.contains("_ERROR") {
            return Err(std::io::Error::other(format!("metadump: {l}")));
        }
        let Some(item) = parse_metadump_line(l) else {
            continue;
        };
        listed += 1;
        newest.push(Reverse(item));
        if newest.len() > limit {
            newest.pop();
        }
    }
    let chosen = newest.into_iter().map(|Reverse(l)| l).collect();
    Ok(Some((listed, chosen)))
}

/// `get`s a batch of keys; each item found, as (key, `VALUE ...\r\n<data>\r\n`).
async fn fetch(
    conn: &mut BufReader<TcpStream>,
    batch: &[Listed],
) -> std::io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut request = b"get".to_vec();
    for l in batch {
        request.push(b' ');
        request.extend_from_slice(&l.key);
    }
    request.extend_from_slice(b"\r\n");
    conn.get_mut().write_all(&request).await?;
    let mut items = Vec::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        if conn.read_until(b'\n', &mut line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if line == b"END\r\n" {
            return Ok(items);
        }
        // Keys are bytes, not necessarily UTF-8: split the line as bytes.
        let header = line
            .strip_suffix(b"\r\n")
            .and_then(|l| l.strip_prefix(b"VALUE "))
            .ok_or_else(|| {
                std::io::Error::other(format!(
                    "unexpected reply to get: {}",
                    String::from_utf8_lossy(&line).trim_end()
                ))
            })?;
        let fields: Vec<&[u8]> = header.split(|b| *b == b' ').collect();
        let (key, bytes) = match fields.as_slice() {
            [key, _flags, bytes] => (
                key.to_vec(),
                std::str::from_utf8(bytes)
                    .map_err(std::io::Error::other)?
                    .parse::<usize>(),
            ),
            _ => {
                return Err(std::io::Error::other(format!(
                    "bad VALUE line: {}",
                    String::from_utf8_lossy(header)
                )));
            }
        };
        let bytes = bytes.map_err(std::io::Error::other)?;
        let mut text = line.clone();
        let start = text.len();
        text.resize(start + bytes + 2, 0);
        conn.read_exact(&mut text[start..]).await?;
        if !text.ends_with(b"\r\n") {
            return Err(std::io::Error::other("value without its CRLF"));
        }
        if text.len() <= TEXT3 {
            items.push((key, text));
        }
    }
}

/// Hands one item to the kernel; the program's verdict (a [`warm_fill`] value).
pub fn run_warm_fill(
    ebpf: &aya::Ebpf,
    fill: &WarmFill,
    text: &[u8],
) -> Result<u32, aya::programs::ProgramError> {
    // SAFETY: WarmFill is plain `repr(C)` data with explicit padding.
    let header = unsafe {
        std::slice::from_raw_parts((fill as *const WarmFill).cast::<u8>(), WARM_FILL_HEADER)
    };
    kernel::run_control(
        ebpf,
        names::XDP_WARM_FILL,
        &[header, text].concat(),
        std::mem::offset_of!(WarmFill, result),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadump_lines_are_read_with_decoded_keys() {
        let l = parse_metadump_line(
            "key=user%3A1 exp=1795618914 la=1795618814 cas=1 fetch=no cls=1 size=67",
        )
        .unwrap();
        assert_eq!(l.key, b"user:1");
        assert_eq!(l.expires_unix, Some(1795618914));
        assert_eq!(l.last_access, 1795618814);
        let never = parse_metadump_line("key=b exp=-1 la=5 cas=2 fetch=no cls=1 size=62").unwrap();
        assert_eq!(never.expires_unix, None);
        // A key the text protocol cannot ask for (a binary-protocol key with a space).
        assert!(
            parse_metadump_line("key=a%20b exp=-1 la=5 cas=2 fetch=no cls=1 size=62").is_none()
        );
        assert!(parse_metadump_line("END").is_none());
        // Too big for any slot: not fetched at all.
        assert!(
            parse_metadump_line("key=big exp=-1 la=5 cas=2 fetch=no cls=9 size=100000").is_none()
        );
        assert!(
            parse_metadump_line("key=fits exp=-1 la=5 cas=2 fetch=no cls=9 size=1500").is_some()
        );
    }

    #[test]
    fn warm_expiry_keeps_a_margin_and_skips_the_expired() {
        let offset = 1_700_000_000 * NS_PER_SEC;
        let now = 100 * NS_PER_SEC;
        assert_eq!(expiry_ns(None, offset, now), Some(u64::MAX));
        assert_eq!(
            expiry_ns(Some(1_700_000_200), offset, now),
            Some(200 * NS_PER_SEC - EXPIRY_MARGIN_NS)
        );
        assert_eq!(expiry_ns(Some(1_700_000_101), offset, now), None);
    }
}
