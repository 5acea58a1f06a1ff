//! Guard mode: how the write scanner follows a TCP stream whose command boundaries it does not
//! know (a connection opened before the agent attached, or evicted from the flow map; a
//! segment lost outside a data block; a line memcached may read otherwise than the scanner).
//!
//! Exact parsing needs to know where a command starts. Guard mode only needs where one *can*
//! start: right after a LF (the end of a line, or of a data block), or right after a data
//! block's last byte (memcached reads on from there even when the block did not end in CRLF),
//! or after a block it swallows. Wherever that is, it is inside (or at the start of) some
//! space-separated token, so the command's verb is a suffix of that token, and every key it
//! names is a whole later token of the same LF-terminated line: the next one (after a `gat`'s
//! exptime, every one). So, line by line:
//! - the token after one that ends in a write verb is a key: it is invalidated as a write,
//!   its TTL forgotten (memcached may set any); after a `gat` or `gats`, every token after
//!   the next;
//! - after a token that ends in a storage verb or `ms`, the token where the data length would
//!   be gives the end of a block, and every segment up to that end flushes the whole cache
//!   (memcached applies the write at the block's last byte, which may come much later);
//! - a token that ends in `flush_all` flushes at the LF, with the delay the next token gives;
//! - a token that starts with `b` after a meta verb's key (a base64 flag: memcached reads a
//!   flag by its first byte; the key is base64 then, which the scanner cannot hash) flushes at
//!   the LF;
//! - keys are invalidated as their tokens end, before memcached runs the line (at its LF): a
//!   line whose keys came in an earlier chunk than its LF flushes at the LF.
//!
//! A binary request starts with 0x80. Every 0x80 whose next 11 bytes make a write header
//! memcached takes (its opcode's extras length, a key of 1 to 250 bytes, a body that holds
//! them; memcached closes the connection on any other) has its key hashed and invalidated, and
//! every segment up to the end of the body it announces flushes (a set is applied there); a
//! second such header while a key is being hashed flushes its chunk instead. A binary flush is
//! read exactly from its header and extras. The flow keeps its last 32 bytes in a ring.
//!
//! What the scanner could not see (the command in flight where it lost its place) is covered
//! by the guard window: every segment that starts within item_size_max plus a command line of
//! that place flushes, as every segment of a lost stream did before.
//!
//! The price is over-invalidation: a value that holds a word ending like a verb costs the hits
//! of the word after it. A stream of `get`s costs nothing once its window has passed.

use cache_common::{
    BINARY_REQUEST_MAGIC, Config, Counter, GUARD_WINDOW_DEFAULT, MAX_KEY_LEN,
    hash::{check_seed, check_step, finish, seed, step as hash_step},
};

use crate::coherence::{Ttl, flush, flush_delayed};
use crate::scanner::{
    Env, FlowState, number, number_byte, queue_write, start_token, strtol_byte, strtol_result,
};

// FlowState::guard_line bits, for the current line.
/// The next token is the key of a write verb.
const KEY_NEXT: u16 = 1 << 0;
/// A meta verb was seen: a flag that starts with `b` means its key is base64.
const META: u16 = 1 << 1;
/// A token ending in `flush_all` was seen: flush at the LF.
const FLUSH_ALL: u16 = 1 << 2;
/// The next token is that `flush_all`'s delay.
const FLUSH_DELAY_NEXT: u16 = 1 << 3;
/// The last byte was a CR, not yet part of a token: memcached drops it if a LF follows.
const PENDING_CR: u16 = 1 << 4;
/// A `b` flag after a meta verb: the line's key is base64, which the scan cannot hash.
const BASE64: u16 = 1 << 5;
/// A key of the line was invalidated in an earlier chunk than its LF: memcached runs the
/// line only at the LF, maybe much later (a slow client). The LF's chunk flushes.
const SPANS_CHUNKS: u16 = 1 << 6;
/// The next token is the key of the line's first meta verb: a key may start with `b`.
const META_KEY_NEXT: u16 = 1 << 7;
/// The next token is a `gat`'s exptime; every token after it is a key.
const GAT_EXPTIME_NEXT: u16 = 1 << 8;
const GAT_KEYS: u16 = 1 << 9;
/// A key of this line was invalidated.
const KEYED: u16 = 1 << 10;

/// The data length of a storage command is its 4th token after the verb; of `ms`, its 2nd.
/// Bit k of `FlowState::guard_len_at` marks the (k+1)th token to come.
const STORAGE_LEN_AT: u8 = 1 << 3;
const MS_LEN_AT: u8 = 1 << 1;

/// Verbs whose data block follows the line (the length is their 4th token).
const STORAGE_VERBS: [&[u8]; 6] = [b"set", b"add", b"cas", b"append", b"replace", b"prepend"];
/// Meta verbs besides `ms`. mg changes the item only with some flags: taken as a write
/// whatever they are.
const OTHER_META_VERBS: [&[u8]; 3] = [b"md", b"ma", b"mg"];
/// The other text verbs that change an item, their key the next token.
const OTHER_WRITE_VERBS: [&[u8]; 4] = [b"incr", b"decr", b"touch", b"delete"];
/// Verbs whose keys follow an exptime.
const GAT_VERBS: [&[u8]; 2] = [b"gat", b"gats"];

/// The bytes of `s`, the last one lowest: how [`FlowState::word`] holds a token's tail.
const fn tail(s: &[u8]) -> u64 {
    let mut w = 0u64;
    let mut i = 0;
    while i < s.len() {
        w = (w << 8) | s[i] as u64;
        i += 1;
    }
    w
}

/// Whether the token (`len` bytes, last 8 in `w`) ends in `s`.
#[inline(always)]
fn ends_with(w: u64, len: u16, s: &[u8]) -> bool {
    let n = s.len();
    let mask = if n >= 8 {
        u64::MAX
    } else {
        (1u64 << (8 * n)) - 1
    };
    len as usize >= n && w & mask == tail(s)
}

#[inline(always)]
fn ends_with_any(w: u64, len: u16, verbs: &[&[u8]]) -> bool {
    verbs.iter().any(|v| ends_with(w, len, v))
}

/// Bytes after the place the scan was lost within which a write begun before it may still
/// land in memcached (see [`Config::guard_window`]).
#[inline(always)]
pub fn window(cfg: &Config) -> u32 {
    if cfg.guard_window == 0 {
        GUARD_WINDOW_DEFAULT
    } else {
        cfg.guard_window
    }
}

/// Whether sequence number `a` comes after `b`.
#[inline(always)]
pub fn seq_after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// Every segment that starts before `until` flushes.
#[inline(always)]
fn extend(st: &mut FlowState, until: u32) {
    if seq_after(until, st.guard_until) {
        st.guard_until = until;
    }
}

/// A chunk of a guarded stream is about to be scanned.
#[inline(always)]
pub fn chunk_start(st: &mut FlowState) {
    if st.guard_line & KEYED != 0 {
        st.guard_line |= SPANS_CHUNKS;
    }
}

/// One byte of a guarded stream, at sequence number `seq`.
#[inline(always)]
pub fn step(st: &mut FlowState, b: u8, seq: u32, env: &Env) {
    binary_key_byte(st, b, seq, env);
    binary_byte(st, b, seq, env);
    match b {
        b'\n' => {
            st.guard_line &= !PENDING_CR;
            end_token(st, env);
            end_line(st, seq.wrapping_add(1), env);
        }
        // memcached splits a line at spaces only, and ends it at a NUL: what follows a NUL
        // is not read at all, so taking it as more tokens only adds keys.
        b' ' | 0 => {
            commit_cr(st, env);
            end_token(st, env);
        }
        b'\r' => {
            commit_cr(st, env);
            st.guard_line |= PENDING_CR;
        }
        _ => {
            commit_cr(st, env);
            token_byte(st, b, env);
        }
    }
}

/// A CR not followed by a LF is a key byte to memcached.
#[inline(always)]
fn commit_cr(st: &mut FlowState, env: &Env) {
    if st.guard_line & PENDING_CR != 0 {
        st.guard_line &= !PENDING_CR;
        token_byte(st, b'\r', env);
    }
}

#[inline(always)]
fn token_byte(st: &mut FlowState, b: u8, env: &Env) {
    strtol_byte(st, b);
    if st.tok_len == 0 {
        start_token(st, b, env);
        st.word = 0;
    }
    st.tok_len = st.tok_len.saturating_add(1);
    st.word = (st.word << 8) | b as u64;
    if st.guard_line & (KEY_NEXT | GAT_KEYS) != 0 {
        st.hash = hash_step(st.hash, b);
        st.check = check_step(st.check, b);
    }
    number_byte(st, b, false);
}

#[inline(always)]
fn end_token(st: &mut FlowState, env: &Env) {
    if st.tok_len == 0 {
        return;
    }
    let is_length = st.guard_len_at & 1 != 0;
    st.guard_len_at >>= 1;
    if is_length {
        // A length memcached reads otherwise (a sign, out of range) counts as the largest.
        let block = match number(st) {
            Some(n) if n < 0 => 0,
            Some(n) => n + 2,
            None => i64::MAX,
        };
        let block = block.min(window(env.cfg) as i64);
        if block > st.len {
            st.len = block;
        }
    }
    if st.guard_line & FLUSH_DELAY_NEXT != 0 {
        st.guard_line &= !FLUSH_DELAY_NEXT;
        if let Some(n) = strtol_result(st)
            && n > 0
        {
            st.exptime = n;
        }
    }
    // The key of a write verb: the token right after it (after a gat's exptime, all of them).
    if st.guard_line & (KEY_NEXT | GAT_KEYS) != 0 && st.tok_len as usize <= MAX_KEY_LEN {
        let key = finish(st.hash);
        queue_write(env.s, key, st.check, Ttl::Forget, Counter::InvalidateText);
        st.guard_line |= KEYED;
    }
    st.guard_line &= !KEY_NEXT;
    if st.guard_line & GAT_EXPTIME_NEXT != 0 {
        st.guard_line = (st.guard_line & !GAT_EXPTIME_NEXT) | GAT_KEYS;
    }
    // memcached reads a meta flag by its first byte only: `bx` is base64 too (found by QA
    // round 8: `md Zm9v bx` deleted foo, and guard mode looked for a token `b`).
    if st.guard_line & META_KEY_NEXT != 0 {
        st.guard_line &= !META_KEY_NEXT;
    } else if st.guard_line & META != 0 && st.tok_first == b'b' {
        st.guard_line |= BASE64;
    }
    let (w, n) = (st.word, st.tok_len);
    if ends_with_any(w, n, &STORAGE_VERBS) {
        st.guard_line |= KEY_NEXT;
        st.guard_len_at |= STORAGE_LEN_AT;
    } else if ends_with(w, n, b"ms") {
        meta_verb(st);
        st.guard_len_at |= MS_LEN_AT;
    } else if ends_with_any(w, n, &OTHER_META_VERBS) {
        meta_verb(st);
    } else if ends_with_any(w, n, &OTHER_WRITE_VERBS) {
        st.guard_line |= KEY_NEXT;
    } else if ends_with_any(w, n, &GAT_VERBS) {
        st.guard_line |= GAT_EXPTIME_NEXT;
    } else if n >= 9 && ends_with(w, n, b"lush_all") {
        // `flush_all` is 9 bytes: its last 8 are what the token keeps.
        st.guard_line |= FLUSH_ALL | FLUSH_DELAY_NEXT;
    }
    st.tok_len = 0;
}

/// A token ending in a meta verb: the next token is its key (no base64 flag, if the verb is
/// the line's first meta verb: a flag of an earlier one may be that token).
#[inline(always)]
fn meta_verb(st: &mut FlowState) {
    if st.guard_line & META == 0 {
        st.guard_line |= META_KEY_NEXT;
    }
    st.guard_line |= KEY_NEXT | META;
}

/// The LF at `after_lf - 1` ended a line: memcached runs it now, and a storage command's data
/// block follows.
#[inline(always)]
fn end_line(st: &mut FlowState, after_lf: u32, env: &Env) {
    if st.guard_line & FLUSH_ALL != 0 {
        flush_delayed(env.cfg, st.exptime, env.counters);
    }
    if st.guard_line & (BASE64 | SPANS_CHUNKS) != 0 {
        flush(env.counters, Counter::FlushUnsynced);
    }
    if st.len > 0 {
        extend(st, after_lf.wrapping_add(st.len as u32));
    }
    st.guard_line = 0;
    st.guard_len_at = 0;
    st.len = 0;
    st.exptime = 0;
}

/// The binary side: `seq`'s byte goes into the ring, and a header that may have started 11,
/// 23 or 27 bytes back is read from it.
#[inline(always)]
fn binary_byte(st: &mut FlowState, b: u8, seq: u32, env: &Env) {
    st.bin_header[(seq & 31) as usize] = b;
    st.guard_magic = (st.guard_magic << 1) | (b == BINARY_REQUEST_MAGIC) as u32;
    let m = st.guard_magic;
    if m & (1 << 11) != 0 {
        binary_write(st, seq.wrapping_sub(11), env);
    }
    if m & (1 << 23) != 0 {
        binary_flush(st, seq.wrapping_sub(23), 0, env);
    }
    if m & (1 << 27) != 0 {
        binary_flush(st, seq.wrapping_sub(27), 4, env);
    }
}

#[inline(always)]
fn ring(st: &FlowState, seq: u32) -> u8 {
    st.bin_header[(seq & 31) as usize]
}

#[inline(always)]
fn ring_u32(st: &FlowState, seq: u32) -> u32 {
    u32::from_be_bytes([
        ring(st, seq),
        ring(st, seq.wrapping_add(1)),
        ring(st, seq.wrapping_add(2)),
        ring(st, seq.wrapping_add(3)),
    ])
}

/// Whether memcached 1.6 runs a binary request with opcode `op` and these lengths as a write
/// (set, add, replace, delete, incr, decr, append, prepend, touch, gat, gatk and their quiet
/// forms): any other shape of a write opcode is a protocol error, and memcached closes the
/// connection. flush and flushq are read exactly ([`binary_flush`]).
#[inline(always)]
fn is_binary_write(op: u8, key_len: u32, extras: u32, body: u32) -> bool {
    if key_len == 0 || key_len as usize > MAX_KEY_LEN || key_len + extras > body {
        return false;
    }
    match op {
        0x01..=0x03 | 0x11..=0x13 => extras == 8,
        0x04 | 0x14 => extras == 0 && body == key_len,
        0x05 | 0x06 | 0x15 | 0x16 => extras == 20 && body == key_len + 20,
        0x0e | 0x0f | 0x19 | 0x1a => extras == 0,
        0x1c..=0x1e | 0x23 | 0x24 => extras == 4,
        _ => false,
    }
}

/// A header may start at `at`, whose first 12 bytes (up to the body length) are in the ring.
/// Its key is hashed as it comes; the write lands when the body ends (every segment up to
/// there flushes).
#[inline(always)]
fn binary_write(st: &mut FlowState, at: u32, env: &Env) {
    let key_len = ring(st, at.wrapping_add(2)) as u32 * 256 + ring(st, at.wrapping_add(3)) as u32;
    let extras = ring(st, at.wrapping_add(4)) as u32;
    let body = ring_u32(st, at.wrapping_add(8));
    if !is_binary_write(ring(st, at.wrapping_add(1)), key_len, extras, body) {
        return;
    }
    extend(
        st,
        at.wrapping_add(24).wrapping_add(body.min(window(env.cfg))),
    );
    if st.guard_key_left != 0 {
        // Another key is being hashed (one of the two headers is bytes of a value): this
        // chunk flushes, and so does every segment up to this body's end.
        unsafe { (*env.s).guard_flush = 1 };
        return;
    }
    st.guard_key_at = at.wrapping_add(24).wrapping_add(extras);
    st.guard_key_left = key_len;
    st.key_hash = seed(env.instance);
    st.key_check = check_seed(env.instance);
}

/// A byte of the binary key being hashed, if `seq` is one: its last byte invalidates it.
#[inline(always)]
fn binary_key_byte(st: &mut FlowState, b: u8, seq: u32, env: &Env) {
    if st.guard_key_left == 0 || seq_after(st.guard_key_at, seq) {
        return;
    }
    st.key_hash = hash_step(st.key_hash, b);
    st.key_check = check_step(st.key_check, b);
    st.guard_key_left -= 1;
    if st.guard_key_left == 0 {
        let key = finish(st.key_hash);
        queue_write(
            env.s,
            key,
            st.key_check,
            Ttl::Forget,
            Counter::InvalidateBinary,
        );
    }
}

/// A flush header may start at `at`, with `extras` (0 or 4) bytes of delay after it, all in
/// the ring. memcached runs it (and closes the connection on any other shape) once it has
/// read the extras.
#[inline(always)]
fn binary_flush(st: &mut FlowState, at: u32, extras: u8, env: &Env) {
    let op = ring(st, at.wrapping_add(1));
    let key_len = ring(st, at.wrapping_add(2)) as u32 | ring(st, at.wrapping_add(3)) as u32;
    if !(op == 0x08 || op == 0x18)
        || key_len != 0
        || ring(st, at.wrapping_add(4)) != extras
        || ring_u32(st, at.wrapping_add(8)) != extras as u32
    {
        return;
    }
    let delay = if extras == 4 {
        ring_u32(st, at.wrapping_add(24)) as i64
    } else {
        0
    };
    flush_delayed(env.cfg, delay, env.counters);
}
