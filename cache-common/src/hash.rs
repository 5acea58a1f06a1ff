//! The key hash: 32-bit FNV-1a, seeded by the memcached instance so that equal keys of two
//! instances never share an entry. Computed byte by byte while parsing, as BMC does.

pub const FNV_OFFSET: u32 = 0x811c_9dc5;
pub const FNV_PRIME: u32 = 0x0100_0193;

/// Starting value for a key of `instance`.
#[inline(always)]
pub const fn seed(instance: u8) -> u32 {
    FNV_OFFSET ^ ((instance as u32).wrapping_mul(0x9e37_79b1))
}

#[inline(always)]
pub const fn step(hash: u32, byte: u8) -> u32 {
    (hash ^ byte as u32).wrapping_mul(FNV_PRIME)
}

/// Turns a running hash into a slot tag; 0 is reserved for "empty".
#[inline(always)]
pub const fn finish(hash: u32) -> u32 {
    if hash == 0 { 1 } else { hash }
}

/// A second, independent 32-bit hash of a key ("check"), kept with the TTL a write recorded
/// for it (KeyMeta): keys whose 32-bit hashes collide, by chance or on purpose, must not take
/// each other's TTL. Multiply-xor with a rotation, another constant and another seed than
/// FNV, so a pair of keys colliding under both is a 64-bit event.
#[inline(always)]
pub const fn check_seed(instance: u8) -> u32 {
    0x2545_f491 ^ ((instance as u32).wrapping_mul(0x85eb_ca6b))
}

#[inline(always)]
pub const fn check_step(check: u32, byte: u8) -> u32 {
    (check ^ byte as u32)
        .wrapping_mul(0x9e37_79b1)
        .rotate_left(13)
}

/// The whole check hash of `key` for `instance` (user space and tests).
pub fn key_check(instance: u8, key: &[u8]) -> u32 {
    let mut h = check_seed(instance);
    let mut i = 0;
    while i < key.len() {
        h = check_step(h, key[i]);
        i += 1;
    }
    h
}

/// The whole hash of `key` for `instance` (user space and tests).
pub fn key_hash(instance: u8, key: &[u8]) -> u32 {
    let mut h = seed(instance);
    let mut i = 0;
    while i < key.len() {
        h = step(h, key[i]);
        i += 1;
    }
    finish(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_reference_vectors() {
        // Published FNV-1a 32 vectors (instance 0 seeds with the plain offset basis).
        assert_eq!(key_hash(0, b"a"), 0xe40c_292c);
        assert_eq!(key_hash(0, b"foobar"), 0xbf9c_f968);
    }

    #[test]
    fn keys_colliding_in_fnv_differ_in_the_check_hash() {
        let (a, b) = (b"ck:0062789", b"ck:0279192");
        assert_eq!(key_hash(0, a), key_hash(0, b));
        assert_ne!(key_check(0, a), key_check(0, b));
    }

    #[test]
    fn instances_do_not_share_hashes() {
        assert_ne!(key_hash(0, b"user:1"), key_hash(1, b"user:1"));
    }
}
