//! The memcached text protocol: `get k1 k2`, `set k 0 0 n`, `delete k`, and the replies
//! `VALUE <key> <flags> <bytes> [<cas>]` … `END`, `STORED`, `DELETED`, …

use super::{CRLF, Dialect};
use super::{
    ProtoError, Reply, ReplyKind, is_error_line, line, parse_usize, push_decimal, push_value,
};
use crate::workload::Verb;

/// `get ` command prefix.
pub const GET: &[u8] = b"get ";
/// `set ` command prefix.
pub const SET: &[u8] = b"set ";
/// `delete ` command prefix.
pub const DELETE: &[u8] = b"delete ";
/// Start of a value line.
pub const VALUE: &[u8] = b"VALUE ";
/// End of a GET reply.
pub const END: &[u8] = b"END";
/// SET succeeded.
pub const STORED: &[u8] = b"STORED";
/// DELETE succeeded.
pub const DELETED: &[u8] = b"DELETED";
/// Key absent.
pub const NOT_FOUND: &[u8] = b"NOT_FOUND";
/// SET refused (add/replace semantics, or CAS mismatch).
pub const NOT_STORED: &[u8] = b"NOT_STORED";
/// CAS mismatch.
pub const EXISTS: &[u8] = b"EXISTS";

/// `get k1 k2 ...\r\n`.
pub fn encode_get<'a>(keys: impl Iterator<Item = &'a [u8]>, out: &mut Vec<u8>) {
    out.extend_from_slice(&GET[..3]);
    for k in keys {
        out.push(b' ');
        out.extend_from_slice(k);
    }
    out.extend_from_slice(CRLF);
}

/// `set <key> 0 0 <len>\r\n<data>\r\n`.
pub fn encode_set(key: &[u8], value_len: usize, out: &mut Vec<u8>) {
    out.extend_from_slice(SET);
    out.extend_from_slice(key);
    out.extend_from_slice(b" 0 0 ");
    push_decimal(value_len, out);
    out.extend_from_slice(CRLF);
    push_value(value_len, out);
}

/// `delete <key>\r\n`.
pub fn encode_delete(key: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(DELETE);
    out.extend_from_slice(key);
    out.extend_from_slice(CRLF);
}

/// Decodes one text-protocol reply to `verb` from the front of `buf`.
pub fn parse_reply(verb: Verb, buf: &[u8]) -> Result<Option<(usize, Reply)>, ProtoError> {
    let err = |l: &[u8]| ProtoError::new(Dialect::Text, verb, l);
    let simple = |kind| Reply { kind, hits: 0 };
    match verb {
        Verb::Get => {
            let mut pos = 0;
            let mut hits = 0u32;
            loop {
                let Some((l, next)) = line(&buf[pos..]) else {
                    return Ok(None);
                };
                if l == END {
                    return Ok(Some((
                        pos + next,
                        Reply {
                            kind: ReplyKind::Values,
                            hits,
                        },
                    )));
                }
                if let Some(rest) = l.strip_prefix(VALUE) {
                    // VALUE <key> <flags> <bytes> [<cas>]
                    let mut toks = rest.split(|&b| b == b' ').filter(|t| !t.is_empty());
                    let bytes = toks.nth(2).and_then(parse_usize).ok_or_else(|| err(l))?;
                    let data_end = pos + next + bytes + 2;
                    if buf.len() < data_end {
                        return Ok(None);
                    }
                    if &buf[data_end - 2..data_end] != CRLF {
                        return Err(err(l));
                    }
                    hits += 1;
                    pos = data_end;
                } else if is_error_line(l) {
                    return Ok(Some((pos + next, simple(ReplyKind::Error))));
                } else {
                    return Err(err(l));
                }
            }
        }
        Verb::Set | Verb::Delete => {
            let Some((l, next)) = line(buf) else {
                return Ok(None);
            };
            let kind = match l {
                _ if l == STORED => ReplyKind::Stored,
                _ if l == NOT_STORED || l == EXISTS => ReplyKind::NotStored,
                _ if l == DELETED => ReplyKind::Deleted,
                _ if l == NOT_FOUND && verb == Verb::Delete => ReplyKind::NotFound,
                _ if l == NOT_FOUND => ReplyKind::NotStored,
                _ if is_error_line(l) => ReplyKind::Error,
                _ => return Err(err(l)),
            };
            Ok(Some((next, simple(kind))))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes() {
        let mut out = Vec::new();
        encode_get([&b"a"[..], b"bc"].into_iter(), &mut out);
        assert_eq!(out, b"get a bc\r\n");
        out.clear();
        encode_set(b"key", 5, &mut out);
        assert_eq!(out, b"set key 0 0 5\r\nxxxxx\r\n");
        out.clear();
        encode_delete(b"key", &mut out);
        assert_eq!(out, b"delete key\r\n");
    }

    #[test]
    fn get_hit_miss_and_multi() {
        let hit = b"VALUE k 0 3\r\nabc\r\nEND\r\n";
        let r = parse_reply(Verb::Get, hit).unwrap().unwrap();
        assert_eq!(
            r,
            (
                hit.len(),
                Reply {
                    kind: ReplyKind::Values,
                    hits: 1
                }
            )
        );
        let miss = b"END\r\n";
        assert_eq!(
            parse_reply(Verb::Get, miss).unwrap().unwrap(),
            (
                5,
                Reply {
                    kind: ReplyKind::Values,
                    hits: 0
                }
            )
        );
        let multi = b"VALUE a 0 3 99\r\nabc\r\nVALUE b 5 5\r\nhe\r\no\r\nEND\r\nSTORED\r\n";
        let (used, r) = parse_reply(Verb::Get, multi).unwrap().unwrap();
        assert_eq!(r.hits, 2);
        assert_eq!(&multi[used..], b"STORED\r\n");
    }

    #[test]
    fn get_incomplete_at_every_cut() {
        let full = b"VALUE a 0 3\r\nabc\r\nVALUE b 0 5\r\nhello\r\nEND\r\n";
        for cut in 0..full.len() {
            assert_eq!(
                parse_reply(Verb::Get, &full[..cut]).unwrap(),
                None,
                "cut {cut}"
            );
        }
        assert!(parse_reply(Verb::Get, full).unwrap().is_some());
    }

    #[test]
    fn set_delete_and_errors() {
        let p = |v, b: &[u8]| parse_reply(v, b).unwrap().unwrap().1.kind;
        assert_eq!(p(Verb::Set, b"STORED\r\n"), ReplyKind::Stored);
        assert_eq!(p(Verb::Set, b"NOT_STORED\r\n"), ReplyKind::NotStored);
        assert_eq!(p(Verb::Delete, b"DELETED\r\n"), ReplyKind::Deleted);
        assert_eq!(p(Verb::Delete, b"NOT_FOUND\r\n"), ReplyKind::NotFound);
        assert_eq!(
            p(Verb::Set, b"SERVER_ERROR out of memory\r\n"),
            ReplyKind::Error
        );
        assert_eq!(
            p(Verb::Get, b"CLIENT_ERROR bad command line format\r\n"),
            ReplyKind::Error
        );
        assert!(parse_reply(Verb::Set, b"WAT\r\n").is_err());
        assert!(parse_reply(Verb::Get, b"VALUE k 0 3\r\nabcd\r\nEND\r\n").is_err());
        assert_eq!(parse_reply(Verb::Set, b"STOR").unwrap(), None);
    }
}
