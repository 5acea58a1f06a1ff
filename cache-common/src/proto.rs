//! memcached wire tokens used by both sides.

/// memcached's UDP frame header: request id, sequence number, datagram count, reserved.
pub const FRAME_HEADER_LEN: usize = 8;
pub const GET: &[u8; 4] = b"get ";
pub const VALUE: &[u8; 6] = b"VALUE ";
pub const END: &[u8; 5] = b"END\r\n";
/// First byte of a binary-protocol request.
pub const BINARY_REQUEST_MAGIC: u8 = 0x80;
/// memcached's clock ticks once a second and lags real time by up to a second (plus timer
/// slack): an item that expires at T in memcached's view may be gone this much before T.
/// Entries are expired this much early.
pub const MEMCACHED_CLOCK_MARGIN_NS: u64 = 1_010_000_000;
/// exptime values above this are absolute unix times (memcached's REALTIME_MAXDELTA).
pub const REALTIME_MAXDELTA: i64 = 60 * 60 * 24 * 30;
