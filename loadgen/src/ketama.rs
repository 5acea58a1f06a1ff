//! Ketama consistent hashing (the last.fm / libmemcached scheme): each server gets 160 points on a
//! 32-bit ring, 4 per MD5 digest of `"host:port-i"`; a key goes to the first point at or after the
//! first 4 bytes (little-endian) of MD5(key), wrapping around.

use std::net::SocketAddr;

use crate::md5::md5;

/// Points per server (40 digests × 4 points), as in libmemcached's default ketama.
pub const POINTS_PER_SERVER: usize = 160;

/// A ketama ring over server indices `0..servers.len()`.
#[derive(Clone, Debug)]
pub struct Ketama {
    /// Sorted `(point, server index)`.
    ring: Vec<(u32, usize)>,
    servers: usize,
}

impl Ketama {
    /// Builds the ring; `servers` must not be empty.
    pub fn new(servers: &[SocketAddr]) -> Self {
        let mut ring = Vec::with_capacity(servers.len() * POINTS_PER_SERVER);
        for (idx, addr) in servers.iter().enumerate() {
            let host = match addr {
                SocketAddr::V4(a) => a.ip().to_string(),
                SocketAddr::V6(a) => format!("[{}]", a.ip()),
            };
            for i in 0..POINTS_PER_SERVER / 4 {
                let digest = md5(format!("{host}:{}-{i}", addr.port()).as_bytes());
                for h in 0..4 {
                    let p = u32::from_le_bytes([
                        digest[h * 4],
                        digest[h * 4 + 1],
                        digest[h * 4 + 2],
                        digest[h * 4 + 3],
                    ]);
                    ring.push((p, idx));
                }
            }
        }
        ring.sort_unstable();
        Self {
            ring,
            servers: servers.len(),
        }
    }

    /// Number of servers on the ring.
    pub fn servers(&self) -> usize {
        self.servers
    }

    /// The server index for `key`.
    pub fn server_for(&self, key: &[u8]) -> usize {
        if self.servers <= 1 {
            return 0;
        }
        let d = md5(key);
        let h = u32::from_le_bytes([d[0], d[1], d[2], d[3]]);
        let pos = self.ring.partition_point(|&(p, _)| p < h);
        self.ring[if pos == self.ring.len() { 0 } else { pos }].1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(n: usize) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| format!("198.18.0.{}:11211", i + 1).parse().unwrap())
            .collect()
    }

    #[test]
    fn spreads_keys_roughly_evenly() {
        let k = Ketama::new(&addrs(4));
        let mut counts = [0usize; 4];
        for i in 0..40_000 {
            counts[k.server_for(format!("key{i}").as_bytes())] += 1;
        }
        for c in counts {
            assert!((6_000..14_000).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn adding_a_server_moves_few_keys() {
        let a = Ketama::new(&addrs(4));
        let b = Ketama::new(&addrs(5));
        let moved = (0..20_000)
            .filter(|i| {
                let key = format!("key{i}");
                let (x, y) = (a.server_for(key.as_bytes()), b.server_for(key.as_bytes()));
                x != y && y != 4
            })
            .count();
        // Keys move only to the new server.
        assert_eq!(moved, 0);
    }

    #[test]
    fn single_server_is_trivial() {
        let k = Ketama::new(&addrs(1));
        assert_eq!(k.server_for(b"anything"), 0);
    }
}
