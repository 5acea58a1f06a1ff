//! The memcached meta protocol (1.6+): `mg <key> v`, `ms <key> <len>`, `md <key>`, and `mn` to
//! mark the end of a pipelined multi-get. Replies: `VA <len> …` + data (hit), `EN` (miss),
//! `HD` (stored/deleted/hit without value), `NS`, `EX`, `NF`, `MN`.

use super::{CRLF, Dialect};
use super::{
    ProtoError, Reply, ReplyKind, is_error_line, line, parse_usize, push_decimal, push_value,
};
use crate::workload::Verb;

/// Meta get, asking for the value.
pub const MG: &[u8] = b"mg ";
/// Flag asking `mg` to return the value.
pub const MG_VALUE_FLAG: &[u8] = b" v";
/// Meta set.
pub const MS: &[u8] = b"ms ";
/// Meta delete.
pub const MD: &[u8] = b"md ";
/// Meta no-op, answered by `MN`; ends a multi-get.
pub const MN: &[u8] = b"mn";
/// Value follows.
pub const VA: &[u8] = b"VA ";
/// Miss.
pub const EN: &[u8] = b"EN";
/// Success without value.
pub const HD: &[u8] = b"HD";
/// Not stored.
pub const NS: &[u8] = b"NS";
/// CAS mismatch.
pub const EX: &[u8] = b"EX";
/// Not found.
pub const NF: &[u8] = b"NF";
/// Reply to `mn`.
pub const MN_REPLY: &[u8] = b"MN";

fn is_token(l: &[u8], tok: &[u8]) -> bool {
    l.starts_with(tok) && (l.len() == tok.len() || l[tok.len()] == b' ')
}

/// One `mg <key> v` per key, followed by `mn` when there is more than one key.
pub fn encode_get<'a>(keys: impl ExactSizeIterator<Item = &'a [u8]>, out: &mut Vec<u8>) {
    let multi = keys.len() > 1;
    for k in keys {
        out.extend_from_slice(MG);
        out.extend_from_slice(k);
        out.extend_from_slice(MG_VALUE_FLAG);
        out.extend_from_slice(CRLF);
    }
    if multi {
        out.extend_from_slice(MN);
        out.extend_from_slice(CRLF);
    }
}

/// `ms <key> <len>\r\n<data>\r\n`.
pub fn encode_set(key: &[u8], value_len: usize, out: &mut Vec<u8>) {
    out.extend_from_slice(MS);
    out.extend_from_slice(key);
    out.push(b' ');
    push_decimal(value_len, out);
    out.extend_from_slice(CRLF);
    push_value(value_len, out);
}

/// `md <key>\r\n`.
pub fn encode_delete(key: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(MD);
    out.extend_from_slice(key);
    out.extend_from_slice(CRLF);
}

/// Decodes one meta reply to `verb` from the front of `buf`; a GET of `nkeys > 1` keys ends at
/// `MN`, a single-key GET at its first `VA`/`EN`/`HD`.
pub fn parse_reply(
    verb: Verb,
    nkeys: usize,
    buf: &[u8],
) -> Result<Option<(usize, Reply)>, ProtoError> {
    let err = |l: &[u8]| ProtoError::new(Dialect::Meta, verb, l);
    match verb {
        Verb::Get => {
            let mut pos = 0;
            let mut hits = 0u32;
            let mut errors = false;
            loop {
                let Some((l, next)) = line(&buf[pos..]) else {
                    return Ok(None);
                };
                let after = pos + next;
                if let Some(rest) = l.strip_prefix(VA) {
                    let len = rest
                        .split(|&b| b == b' ')
                        .next()
                        .and_then(parse_usize)
                        .ok_or_else(|| err(l))?;
                    let data_end = after + len + 2;
                    if buf.len() < data_end {
                        return Ok(None);
                    }
                    if &buf[data_end - 2..data_end] != CRLF {
                        return Err(err(l));
                    }
                    hits += 1;
                    pos = data_end;
                } else if is_token(l, EN) {
                    pos = after;
                } else if is_token(l, HD) {
                    hits += 1;
                    pos = after;
                } else if is_error_line(l) {
                    errors = true;
                    pos = after;
                } else if is_token(l, MN_REPLY) && nkeys > 1 {
                    let kind = if errors {
                        ReplyKind::Error
                    } else {
                        ReplyKind::Values
                    };
                    return Ok(Some((after, Reply { kind, hits })));
                } else {
                    return Err(err(l));
                }
                if nkeys <= 1 {
                    let kind = if errors {
                        ReplyKind::Error
                    } else {
                        ReplyKind::Values
                    };
                    return Ok(Some((pos, Reply { kind, hits })));
                }
            }
        }
        Verb::Set | Verb::Delete => {
            let Some((l, next)) = line(buf) else {
                return Ok(None);
            };
            let kind = if is_token(l, HD) {
                if verb == Verb::Set {
                    ReplyKind::Stored
                } else {
                    ReplyKind::Deleted
                }
            } else if is_token(l, NS) || is_token(l, EX) {
                ReplyKind::NotStored
            } else if is_token(l, NF) {
                if verb == Verb::Set {
                    ReplyKind::NotStored
                } else {
                    ReplyKind::NotFound
                }
            } else if is_error_line(l) {
                ReplyKind::Error
            } else {
                return Err(err(l));
            };
            Ok(Some((next, Reply { kind, hits: 0 })))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes() {
        let mut out = Vec::new();
        encode_get([&b"a"[..]].into_iter(), &mut out);
        assert_eq!(out, b"mg a v\r\n");
        out.clear();
        encode_get([&b"a"[..], b"b"].into_iter(), &mut out);
        assert_eq!(out, b"mg a v\r\nmg b v\r\nmn\r\n");
        out.clear();
        encode_set(b"k", 3, &mut out);
        assert_eq!(out, b"ms k 3\r\nxxx\r\n");
        out.clear();
        encode_delete(b"k", &mut out);
        assert_eq!(out, b"md k\r\n");
    }

    #[test]
    fn single_and_multi_get() {
        let r = parse_reply(Verb::Get, 1, b"VA 3\r\nabc\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(
            r,
            (
                11,
                Reply {
                    kind: ReplyKind::Values,
                    hits: 1
                }
            )
        );
        let r = parse_reply(Verb::Get, 1, b"EN\r\nVA 1\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(
            r,
            (
                4,
                Reply {
                    kind: ReplyKind::Values,
                    hits: 0
                }
            )
        );
        let multi = b"VA 3 f0\r\nabc\r\nEN\r\nVA 2\r\nhi\r\nMN\r\n";
        for cut in 0..multi.len() {
            assert_eq!(parse_reply(Verb::Get, 3, &multi[..cut]).unwrap(), None);
        }
        let (used, r) = parse_reply(Verb::Get, 3, multi).unwrap().unwrap();
        assert_eq!((used, r.hits, r.kind), (multi.len(), 2, ReplyKind::Values));
    }

    #[test]
    fn set_delete() {
        let p = |v, b: &[u8]| parse_reply(v, 1, b).unwrap().unwrap().1.kind;
        assert_eq!(p(Verb::Set, b"HD\r\n"), ReplyKind::Stored);
        assert_eq!(p(Verb::Set, b"NS\r\n"), ReplyKind::NotStored);
        assert_eq!(p(Verb::Delete, b"HD\r\n"), ReplyKind::Deleted);
        assert_eq!(p(Verb::Delete, b"NF\r\n"), ReplyKind::NotFound);
        assert_eq!(p(Verb::Delete, b"SERVER_ERROR x\r\n"), ReplyKind::Error);
        assert!(parse_reply(Verb::Delete, 1, b"HDX\r\n").is_err());
    }
}
