//! memcached wire protocols as the load generator speaks them: the text protocol
//! ([`text`]), the meta protocol ([`meta`]) and the UDP frame header with reply reassembly
//! ([`frame`]). Encoders append to a caller-owned buffer; decoders are incremental and return
//! `Ok(None)` until a whole reply is buffered.

pub mod frame;
pub mod meta;
pub mod text;

use serde::Serialize;

use crate::workload::Verb;

/// Which command set is used on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Dialect {
    /// `get`/`set`/`delete` with `VALUE ... END` replies.
    Text,
    /// `mg`/`ms`/`md` with `VA`/`EN`/`HD`/`NS`/`NF` replies (`mn` ends a multi-get).
    Meta,
}

/// What a complete reply said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyKind {
    /// A GET reply (hits counted in [`Reply::hits`]).
    Values,
    /// SET stored.
    Stored,
    /// SET not stored (NOT_STORED, EXISTS, NOT_FOUND / NS, EX, NF).
    NotStored,
    /// DELETE removed the key.
    Deleted,
    /// DELETE found no key.
    NotFound,
    /// ERROR, CLIENT_ERROR or SERVER_ERROR.
    Error,
}

/// A decoded reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reply {
    /// Its kind.
    pub kind: ReplyKind,
    /// Keys that returned a value (GET only).
    pub hits: u32,
}

/// A reply that does not follow the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed {dialect:?} reply to {verb:?}: {line:?}")]
pub struct ProtoError {
    /// Dialect being parsed.
    pub dialect: Dialect,
    /// Verb whose reply was parsed.
    pub verb: Verb,
    /// The offending line (lossy UTF-8, at most 64 bytes).
    pub line: String,
}

impl ProtoError {
    fn new(dialect: Dialect, verb: Verb, line: &[u8]) -> Self {
        let cut = &line[..line.len().min(64)];
        Self {
            dialect,
            verb,
            line: String::from_utf8_lossy(cut).into_owned(),
        }
    }
}

/// Filler byte of generated values.
pub const VALUE_FILL: u8 = b'x';
/// Line terminator.
pub const CRLF: &[u8; 2] = b"\r\n";

/// Appends a GET for `keys` (already-encoded key bytes, each followed by nothing).
pub fn encode_get<'a>(
    dialect: Dialect,
    keys: impl ExactSizeIterator<Item = &'a [u8]>,
    out: &mut Vec<u8>,
) {
    match dialect {
        Dialect::Text => text::encode_get(keys, out),
        Dialect::Meta => meta::encode_get(keys, out),
    }
}

/// Appends a SET of `key` with a `value_len`-byte value.
pub fn encode_set(dialect: Dialect, key: &[u8], value_len: usize, out: &mut Vec<u8>) {
    match dialect {
        Dialect::Text => text::encode_set(key, value_len, out),
        Dialect::Meta => meta::encode_set(key, value_len, out),
    }
}

/// Appends a DELETE of `key`.
pub fn encode_delete(dialect: Dialect, key: &[u8], out: &mut Vec<u8>) {
    match dialect {
        Dialect::Text => text::encode_delete(key, out),
        Dialect::Meta => meta::encode_delete(key, out),
    }
}

/// Decodes one reply to `verb` (with `nkeys` keys) from the front of `buf`.
/// Returns the bytes consumed and the reply, or `None` if more bytes are needed.
pub fn parse_reply(
    dialect: Dialect,
    verb: Verb,
    nkeys: usize,
    buf: &[u8],
) -> Result<Option<(usize, Reply)>, ProtoError> {
    match dialect {
        Dialect::Text => text::parse_reply(verb, buf),
        Dialect::Meta => meta::parse_reply(verb, nkeys, buf),
    }
}

/// The first line of `buf` without its CRLF, and the offset just past it.
#[inline]
pub(crate) fn line(buf: &[u8]) -> Option<(&[u8], usize)> {
    let nl = buf.iter().position(|&b| b == b'\n')?;
    let end = if nl > 0 && buf[nl - 1] == b'\r' {
        nl - 1
    } else {
        nl
    };
    Some((&buf[..end], nl + 1))
}

/// Parses an unsigned decimal token.
#[inline]
pub(crate) fn parse_usize(tok: &[u8]) -> Option<usize> {
    if tok.is_empty() || tok.len() > 19 {
        return None;
    }
    let mut v = 0usize;
    for &b in tok {
        if !b.is_ascii_digit() {
            return None;
        }
        v = v * 10 + (b - b'0') as usize;
    }
    Some(v)
}

/// True for the error lines every memcached command may return.
#[inline]
pub(crate) fn is_error_line(l: &[u8]) -> bool {
    l == b"ERROR" || l.starts_with(b"CLIENT_ERROR") || l.starts_with(b"SERVER_ERROR")
}

/// Appends `len` filler bytes and a CRLF (the data block of a SET).
pub(crate) fn push_value(len: usize, out: &mut Vec<u8>) {
    out.resize(out.len() + len, VALUE_FILL);
    out.extend_from_slice(CRLF);
}

/// Appends `n` in decimal.
pub(crate) fn push_decimal(n: usize, out: &mut Vec<u8>) {
    let mut tmp = [0u8; 20];
    let mut i = tmp.len();
    let mut v = n;
    loop {
        i -= 1;
        tmp[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&tmp[i..]);
}
