//! memcached's 8-byte UDP frame header (request id, sequence number, datagram count, reserved;
//! all big-endian u16) and the reassembly of a reply spread over several datagrams.
//!
//! memcached 1.6 answers a multi-key `get` with one datagram per item, each marked seq 0 of
//! total 1, followed by a final `END\r\n` datagram, all with the request's id. An item larger than
//! one datagram's payload (1400 bytes) is sent as a group `seq 0..total-1` of `total > 1`.
//! [`Reassembly`] therefore appends `total == 1` datagrams to the reply stream in arrival order
//! and holds back a multi-part group until all its parts arrived, then appends them in `seq` order.

/// The frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader([u8; FrameHeader::LEN]);

impl FrameHeader {
    /// Header length in bytes.
    pub const LEN: usize = 8;

    /// A header for datagram `seq` of `total` of request `request_id`.
    pub fn new(request_id: u16, seq: u16, total: u16) -> Self {
        let mut b = [0u8; Self::LEN];
        b[0..2].copy_from_slice(&request_id.to_be_bytes());
        b[2..4].copy_from_slice(&seq.to_be_bytes());
        b[4..6].copy_from_slice(&total.to_be_bytes());
        Self(b)
    }

    /// Reads a header from the start of a datagram.
    pub fn parse(datagram: &[u8]) -> Option<Self> {
        datagram
            .get(..Self::LEN)
            .map(|h| Self(h.try_into().expect("length checked")))
    }

    /// The raw bytes.
    pub fn bytes(&self) -> &[u8; Self::LEN] {
        &self.0
    }

    /// Request id, echoed by the server.
    pub fn request_id(&self) -> u16 {
        u16::from_be_bytes([self.0[0], self.0[1]])
    }

    /// Sequence number of this datagram.
    pub fn seq(&self) -> u16 {
        u16::from_be_bytes([self.0[2], self.0[3]])
    }

    /// Number of datagrams in this message.
    pub fn total(&self) -> u16 {
        u16::from_be_bytes([self.0[4], self.0[5]])
    }
}

/// Collects the datagrams of one reply into a byte stream for the protocol decoder.
#[derive(Debug, Default)]
pub struct Reassembly {
    stream: Vec<u8>,
    parts: Vec<(u16, Vec<u8>)>,
    total: u16,
}

impl Reassembly {
    /// Forgets everything (keeps the allocations).
    pub fn clear(&mut self) {
        self.stream.clear();
        self.parts.clear();
        self.total = 0;
    }

    /// True when nothing is buffered.
    pub fn is_empty(&self) -> bool {
        self.stream.is_empty() && self.parts.is_empty()
    }

    /// Adds one datagram's payload (after the header). Returns true if the stream grew.
    pub fn push(&mut self, seq: u16, total: u16, payload: &[u8]) -> bool {
        if total <= 1 {
            self.stream.extend_from_slice(payload);
            return true;
        }
        if self.total != total && !self.parts.is_empty() {
            // A new group started before the previous one completed: a part was lost.
            self.parts.clear();
        }
        self.total = total;
        if seq >= total || self.parts.iter().any(|(s, _)| *s == seq) {
            return false;
        }
        self.parts.push((seq, payload.to_vec()));
        if self.parts.len() < total as usize {
            return false;
        }
        self.parts.sort_unstable_by_key(|(s, _)| *s);
        for (_, p) in self.parts.drain(..) {
            self.stream.extend_from_slice(&p);
        }
        self.total = 0;
        true
    }

    /// The contiguous bytes received so far.
    pub fn stream(&self) -> &[u8] {
        &self.stream
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Dialect, ReplyKind, parse_reply};
    use crate::workload::Verb;

    #[test]
    fn header_round_trip() {
        let h = FrameHeader::new(0xBEEF, 2, 3);
        assert_eq!(h.bytes(), &[0xBE, 0xEF, 0, 2, 0, 3, 0, 0]);
        let p = FrameHeader::parse(&[0xBE, 0xEF, 0, 2, 0, 3, 0, 0, b'x']).unwrap();
        assert_eq!((p.request_id(), p.seq(), p.total()), (0xBEEF, 2, 3));
        assert!(FrameHeader::parse(&[1, 2, 3]).is_none());
    }

    fn get_hits(r: &Reassembly) -> Option<u32> {
        parse_reply(Dialect::Text, Verb::Get, 3, r.stream())
            .unwrap()
            .map(|(_, rep)| {
                assert_eq!(rep.kind, ReplyKind::Values);
                rep.hits
            })
    }

    /// memcached 1.6's multi-get form: one datagram per item, each seq 0 / total 1, then `END`.
    #[test]
    fn per_item_datagrams() {
        let mut r = Reassembly::default();
        r.push(0, 1, b"VALUE a 0 3\r\nabc\r\n");
        assert_eq!(get_hits(&r), None);
        r.push(0, 1, b"VALUE b 0 5\r\nhello\r\n");
        assert_eq!(get_hits(&r), None);
        r.push(0, 1, b"END\r\n");
        assert_eq!(get_hits(&r), Some(2));
    }

    /// A large item split over a group of datagrams that arrive out of order, mixed with
    /// single-datagram items (as memcached sends `get a big b`).
    #[test]
    fn multi_part_group_out_of_order() {
        let big: Vec<u8> = [b"VALUE big 0 10\r\n".as_slice(), b"0123456789\r\n"].concat();
        let (p0, rest) = big.split_at(7);
        let (p1, p2) = rest.split_at(9);
        let mut r = Reassembly::default();
        r.push(0, 1, b"VALUE a 0 3\r\nabc\r\n");
        assert!(!r.push(2, 3, p2));
        assert!(!r.push(0, 3, p0));
        assert_eq!(get_hits(&r), None);
        assert!(!r.push(0, 3, p0), "duplicate part is ignored");
        assert!(r.push(1, 3, p1));
        assert_eq!(get_hits(&r), None);
        r.push(0, 1, b"VALUE b 0 5\r\nhello\r\nEND\r\n");
        assert_eq!(get_hits(&r), Some(3));
        r.clear();
        assert!(r.is_empty());
    }

    #[test]
    fn single_datagram_miss_and_hit() {
        let mut r = Reassembly::default();
        r.push(0, 1, b"END\r\n");
        assert_eq!(get_hits(&r), Some(0));
        r.clear();
        r.push(0, 1, b"VALUE k 0 2\r\nhi\r\nEND\r\n");
        assert_eq!(get_hits(&r), Some(1));
    }
}
