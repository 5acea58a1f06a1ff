//! Concurrent workloads with a recorded history, and the staleness check.
//!
//! Writers (TCP) and readers (UDP) run at once on a small hot key set. Every value a writer
//! stores carries a unique token, so a read names the write that produced it. A read is stale
//! when some later write to that key (or a flush, or the expiry of a TTL) had certainly taken
//! effect before the read was sent: that write was invoked after the producing write completed,
//! and completed before the read was invoked. Misses are never stale, only counted.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{try_tcp_exchange, udp_exchange};

#[derive(Debug, Clone)]
pub enum Kind {
    /// set/append producing a value whose last token is `token`; `ttl` if it set one.
    Write {
        token: String,
        ttl: Option<u64>,
    },
    Delete,
    /// touch: the value stays, its TTL changes.
    Touch {
        ttl: u64,
    },
    FlushAll,
    /// A read returning the value whose last token is `token` (None: a miss).
    Read {
        token: Option<String>,
    },
}

#[derive(Debug, Clone)]
pub struct Op {
    pub key: String,
    pub kind: Kind,
    pub invoked: Instant,
    pub completed: Instant,
}

#[derive(Debug, Default)]
pub struct Outcome {
    pub reads: usize,
    pub misses: usize,
    pub writes: usize,
    pub stale: Vec<String>,
}

/// memcached may expire an item up to a second early and its clock ticks once a second: a TTL
/// has certainly taken effect this long after the write that set it completed.
const TTL_SLACK: Duration = Duration::from_millis(2100);

pub struct Load {
    pub tcp: SocketAddr,
    pub udp: SocketAddr,
    pub keys: Vec<String>,
    pub writers: usize,
    pub readers: usize,
    /// Include flush_all in the writers' mix.
    pub flushes: bool,
    /// Include short TTLs (touch, set with exptime).
    pub ttls: bool,
    /// Each writer's pause between operations (lets entries live long enough to be served).
    pub pause: Duration,
}

/// Runs the load until `stop` is set; returns the history.
pub fn run(load: &Load, stop: Arc<AtomicBool>) -> Vec<Op> {
    let history = Arc::new(Mutex::new(Vec::<Op>::new()));
    let mut handles = Vec::new();
    for w in 0..load.writers {
        let (history, stop, keys, addr) = (
            Arc::clone(&history),
            Arc::clone(&stop),
            load.keys.clone(),
            load.tcp,
        );
        let (flushes, ttls, pause) = (load.flushes, load.ttls, load.pause);
        handles.push(std::thread::spawn(move || {
            let mut rng = 0x9e37_79b9u64 ^ (w as u64 * 7919);
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let key = keys[(rng % keys.len() as u64) as usize].clone();
                seq += 1;
                let token = format!("w{w}.{seq};");
                let choice = (rng >> 20) % 100;
                let invoked = Instant::now();
                let (request, kind) = if flushes && choice < 1 && (rng >> 50).is_multiple_of(4) {
                    ("flush_all\r\n".to_string(), Kind::FlushAll)
                } else if choice < 15 {
                    (format!("delete {key}\r\n"), Kind::Delete)
                } else if choice < 30 {
                    (
                        format!("append {key} 0 0 {}\r\n{token}\r\n", token.len()),
                        Kind::Write {
                            token: token.clone(),
                            ttl: None,
                        },
                    )
                } else if ttls && choice < 38 {
                    let ttl = 1 + (rng >> 40) % 3;
                    (format!("touch {key} {ttl}\r\n"), Kind::Touch { ttl })
                } else if ttls && choice < 45 {
                    let ttl = 1 + (rng >> 40) % 3;
                    (
                        format!("set {key} 0 {ttl} {}\r\n{token}\r\n", token.len()),
                        Kind::Write {
                            token: token.clone(),
                            ttl: Some(ttl),
                        },
                    )
                } else {
                    (
                        format!("set {key} 0 0 {}\r\n{token}\r\n", token.len()),
                        Kind::Write {
                            token: token.clone(),
                            ttl: None,
                        },
                    )
                };
                let Some(reply) = try_tcp_exchange(addr, request.as_bytes(), &[b"\r\n".to_vec()])
                else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue; // never reached memcached
                };
                let completed = Instant::now();
                let applied = matches!(
                    &reply[..],
                    b"STORED\r\n" | b"DELETED\r\n" | b"TOUCHED\r\n" | b"OK\r\n"
                );
                if applied {
                    history.lock().unwrap().push(Op {
                        key,
                        kind,
                        invoked,
                        completed,
                    });
                } else if reply.is_empty() {
                    // No answer (memcached stopped or restarting): it may still take effect, at
                    // an unknown time. It can produce values but proves nothing stale.
                    let completed = completed + Duration::from_secs(3600);
                    history.lock().unwrap().push(Op {
                        key,
                        kind,
                        invoked,
                        completed,
                    });
                }
                // Otherwise (NOT_STORED, NOT_FOUND...) the write changed nothing.
                std::thread::sleep(pause);
            }
        }));
    }
    for r in 0..load.readers {
        let (history, stop, keys, addr) = (
            Arc::clone(&history),
            Arc::clone(&stop),
            load.keys.clone(),
            load.udp,
        );
        handles.push(std::thread::spawn(move || {
            let mut i = r;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let key = keys[i % keys.len()].clone();
                let invoked = Instant::now();
                let reply =
                    udp_exchange(addr, format!("get {key}\r\n").as_bytes(), crate::next_id());
                let completed = Instant::now();
                if !reply.payload.ends_with(b"END\r\n") {
                    continue; // lost datagram or timeout: no answer is no stale answer
                }
                let token = last_token(&reply.payload);
                history.lock().unwrap().push(Op {
                    key,
                    kind: Kind::Read { token },
                    invoked,
                    completed,
                });
            }
        }));
    }
    for h in handles {
        h.join().unwrap();
    }
    Arc::try_unwrap(history).unwrap().into_inner().unwrap()
}

/// The token of the write that produced the value in a `get` reply (its last `...;`).
fn last_token(payload: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(payload);
    let mut lines = text.split("\r\n");
    let header = lines.next()?;
    if !header.starts_with("VALUE ") {
        return None;
    }
    let value = lines.next()?;
    let trimmed = value.trim_end_matches(';');
    let start = trimmed.rfind(';').map(|i| i + 1).unwrap_or(0);
    Some(format!("{};", &trimmed[start..]))
}

/// Checks every read against the writes (indexed per key, so long runs stay fast).
pub fn check(history: &[Op]) -> Outcome {
    use std::collections::HashMap;
    let mut out = Outcome::default();
    // Per key: its writes plus every flush, sorted by invocation.
    let mut by_key: HashMap<&str, Vec<&Op>> = HashMap::new();
    let mut flushes: Vec<&Op> = Vec::new();
    let mut producers: HashMap<(&str, &str), &Op> = HashMap::new();
    for op in history {
        match &op.kind {
            Kind::Read { .. } => {}
            Kind::FlushAll => flushes.push(op),
            kind => {
                by_key.entry(op.key.as_str()).or_default().push(op);
                if let Kind::Write { token, .. } = kind {
                    producers.insert((op.key.as_str(), token.as_str()), op);
                }
            }
        }
        if !matches!(op.kind, Kind::Read { .. }) {
            out.writes += 1;
        }
    }
    for list in by_key.values_mut() {
        list.sort_by_key(|o| o.invoked);
    }
    // Is there a write to `key` invoked strictly inside (after, before)?
    let written_between = |key: &str, after: Instant, before: Instant, except: &Op| -> bool {
        by_key.get(key).is_some_and(|list| {
            let start = list.partition_point(|o| o.invoked <= after);
            list[start..]
                .iter()
                .take_while(|o| o.invoked < before)
                .any(|o| !std::ptr::eq(*o, except))
        })
    };
    for read in history {
        let Kind::Read { token } = &read.kind else {
            continue;
        };
        out.reads += 1;
        let Some(token) = token else {
            out.misses += 1;
            continue;
        };
        let Some(producer) = producers.get(&(read.key.as_str(), token.as_str())) else {
            out.stale.push(format!(
                "{}: value {token} was never written by this test",
                read.key
            ));
            continue;
        };
        let empty = Vec::new();
        let same_key = by_key.get(read.key.as_str()).unwrap_or(&empty);
        let start = same_key.partition_point(|o| o.invoked <= producer.completed);
        let later = same_key[start..]
            .iter()
            .take_while(|o| o.invoked < read.invoked);
        let flush_start = flushes.partition_point(|o| o.invoked <= producer.completed);
        let later_flushes = flushes[flush_start..]
            .iter()
            .take_while(|o| o.invoked < read.invoked);
        let mut stale = None;
        for w in later.chain(later_flushes) {
            let effective = match w.kind {
                // A TTL takes effect only if no later write to the key renewed it.
                Kind::Touch { ttl } => {
                    if written_between(&read.key, w.invoked, read.completed, w) {
                        continue;
                    }
                    w.completed + Duration::from_secs(ttl) + TTL_SLACK
                }
                _ => w.completed,
            };
            if effective < read.invoked {
                stale = Some(format!(
                    "{}: read returned {token} although {:?} (invoked {:?} after that value was written) took effect {:?} before the read",
                    read.key,
                    w.kind,
                    w.invoked - producer.completed,
                    read.invoked - effective,
                ));
                break;
            }
        }
        if let (None, Kind::Write { ttl: Some(ttl), .. }) = (&stale, &producer.kind) {
            let expired = producer.completed + Duration::from_secs(*ttl) + TTL_SLACK;
            if expired < read.invoked
                && !written_between(&read.key, producer.invoked, read.completed, producer)
            {
                stale = Some(format!("{}: {token} served after its {ttl}s TTL", read.key));
            }
        }
        if let Some(s) = stale {
            out.stale.push(s);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(key: &str, kind: Kind, at: Instant, from_ms: u64, to_ms: u64) -> Op {
        Op {
            key: key.into(),
            kind,
            invoked: at + Duration::from_millis(from_ms),
            completed: at + Duration::from_millis(to_ms),
        }
    }

    #[test]
    fn a_value_overwritten_before_the_read_started_is_stale() {
        let t = Instant::now();
        let w = |tok: &str| Kind::Write {
            token: tok.into(),
            ttl: None,
        };
        let h = vec![
            op("k", w("a;"), t, 0, 10),
            op("k", w("b;"), t, 20, 30),
            op(
                "k",
                Kind::Read {
                    token: Some("a;".into()),
                },
                t,
                40,
                50,
            ),
            op(
                "k",
                Kind::Read {
                    token: Some("a;".into()),
                },
                t,
                25,
                50,
            ), // overlaps b: fine
        ];
        let out = check(&h);
        assert_eq!(out.stale.len(), 1, "{:?}", out.stale);
    }

    #[test]
    fn tokens_come_from_the_end_of_the_value() {
        assert_eq!(
            last_token(b"VALUE k 0 12\r\nw1.1;w2.7;\r\nEND\r\n").as_deref(),
            Some("w2.7;")
        );
        assert_eq!(last_token(b"END\r\n"), None);
    }
}
