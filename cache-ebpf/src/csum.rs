//! Internet checksums (RFC 1071), summed in native byte order: the ones' complement sum is
//! byte-order independent, so a sum of native words, folded and stored natively, lands right.

/// Folds a 64-bit running sum to 16 bits.
#[inline(always)]
pub fn fold(mut sum: u64) -> u16 {
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The running sum of `bytes` as 16-bit words (an odd last byte is padded with zero).
#[inline(always)]
pub fn sum_bytes(bytes: &[u8]) -> u64 {
    let mut acc = 0u64;
    let mut i = 0;
    while i + 1 < bytes.len() {
        acc += u16::from_ne_bytes([bytes[i], bytes[i + 1]]) as u64;
        i += 2;
    }
    if i < bytes.len() {
        acc += u16::from_ne_bytes([bytes[i], 0]) as u64;
    }
    acc
}

/// The IPv4 header checksum of a 20-byte header whose checksum field is zero.
#[inline(always)]
pub fn ipv4_header(ip: &[u8; 20]) -> [u8; 2] {
    (!fold(sum_bytes(ip))).to_ne_bytes()
}
