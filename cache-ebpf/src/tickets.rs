//! Fill tickets: XDP leaves one for each GET it passed on a miss; TC fills the cache only from a
//! reply that matches one (see fill.rs).
//!
//! The table is a plain array indexed by a hash of the client's address, port and request id:
//! leaving a ticket is a few stores, where an LRU hash map update cost more than the whole hit
//! path. A ticket whose slot another request took is simply gone (that reply does not fill).
//! Two CPUs may write one slot at once, or TC may read it mid-write, so every slot carries a
//! seal over its words: a torn slot fails the seal and counts as no ticket.

use cache_common::{FILL_TICKET_SLOTS, Ticket, TicketKey};

use crate::maps::FILL_TICKETS;

const KEY_WORDS: usize = 3;
const TICKET_WORDS: usize = 3;
const _: () = assert!(core::mem::size_of::<TicketKey>() == KEY_WORDS * 8);
const _: () = assert!(core::mem::size_of::<Ticket>() == TICKET_WORDS * 8);
/// Key and ticket words, then the seal.
pub const SLOT_WORDS: usize = KEY_WORDS + TICKET_WORDS + 1;

/// One slot of FILL_TICKETS.
#[repr(C)]
pub struct TicketSlot {
    pub words: [u64; SLOT_WORDS],
}

#[inline(always)]
fn key_words(key: &TicketKey) -> [u64; KEY_WORDS] {
    // SAFETY: plain data of the same size, no padding bytes left uninitialised (`_pad` is set).
    unsafe { core::mem::transmute_copy(key) }
}

/// Which slot holds the ticket for `key`: the top bits of the mixed key words.
#[inline(always)]
fn slot_index(k: &[u64; KEY_WORDS]) -> u32 {
    const { assert!(FILL_TICKET_SLOTS.is_power_of_two()) };
    let mixed = k[0] ^ k[1].rotate_left(21) ^ k[2].rotate_left(42);
    (mixed.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - FILL_TICKET_SLOTS.trailing_zeros())) as u32
}

/// Nonzero, so a slot never written (all zero) never passes.
#[inline(always)]
fn seal(words: &[u64; SLOT_WORDS]) -> u64 {
    let mut h = 0x243f_6a88_85a3_08d3u64;
    let mut i = 0;
    while i < SLOT_WORDS - 1 {
        h = (h ^ words[i]).wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 29;
        i += 1;
    }
    h | 1
}

/// Leaves the ticket for `key`, replacing whatever the slot held.
#[inline(always)]
pub fn leave(key: &TicketKey, ticket: &Ticket) {
    let k = key_words(key);
    let Some(slot) = FILL_TICKETS.get_ptr_mut(slot_index(&k)) else {
        return;
    };
    // SAFETY: as in key_words.
    let t: [u64; TICKET_WORDS] = unsafe { core::mem::transmute_copy(ticket) };
    let mut words = [k[0], k[1], k[2], t[0], t[1], t[2], 0];
    words[SLOT_WORDS - 1] = seal(&words);
    let dst = unsafe { &raw mut (*slot).words };
    for (i, w) in words.iter().enumerate() {
        unsafe { core::ptr::write_volatile(&raw mut (*dst)[i], *w) };
    }
}

/// The ticket left for `key`, if its slot still holds it whole.
#[inline(always)]
pub fn find(key: &TicketKey) -> Option<Ticket> {
    let k = key_words(key);
    let slot = FILL_TICKETS.get_ptr(slot_index(&k))?;
    let mut words = [0u64; SLOT_WORDS];
    let src = unsafe { &raw const (*slot).words };
    for (i, w) in words.iter_mut().enumerate() {
        *w = unsafe { core::ptr::read_volatile(&raw const (*src)[i]) };
    }
    // Word by word: a slice comparison would become a memcmp call.
    if words[SLOT_WORDS - 1] != seal(&words)
        || words[0] != k[0]
        || words[1] != k[1]
        || words[2] != k[2]
    {
        return None;
    }
    let t = [words[3], words[4], words[5]];
    // SAFETY: every bit pattern is a valid Ticket.
    Some(unsafe { core::mem::transmute_copy(&t) })
}
