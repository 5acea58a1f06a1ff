//! Sizing the agent's own requests to memcached.
//!
//! The agent's connections to memcached cross `lo`, where the kernel's write scanner follows
//! them like any client's. The scanner reads a segment 2 KiB at a time, up to 32 times; the
//! agent's requests stay far below that anyway: with TCP_NODELAY and one request in flight at
//! a time, one write is one segment, and every write stays under [`MAX_REQUEST_BYTES`]
//! (one scan buffer, so each costs the scanner a single pass).

use std::{net::SocketAddr, time::Duration};

use tokio::{io::BufReader, net::TcpStream, time::timeout};

/// A connection for the agent's own requests: TCP_NODELAY, so each write leaves as it is
/// (one request, one segment), and buffered reads for memcached's line replies.
pub async fn connect(addr: SocketAddr, limit: Duration) -> std::io::Result<BufReader<TcpStream>> {
    let stream = timeout(limit, TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    stream.set_nodelay(true)?;
    Ok(BufReader::new(stream))
}

/// Largest request the agent writes at once.
pub const MAX_REQUEST_BYTES: usize = 1400;

/// Splits `items` into consecutive runs of at most `max_items` whose request fits
/// [`MAX_REQUEST_BYTES`]: `fixed` bytes per request plus `cost(item)` per item. An item too big
/// on its own gets a run of its own.
pub fn runs<T>(
    items: &[T],
    fixed: usize,
    max_items: usize,
    cost: impl Fn(&T) -> usize,
) -> Vec<&[T]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = fixed;
    for (i, item) in items.iter().enumerate() {
        let c = cost(item);
        let full = i - start == max_items.max(1) || bytes + c > MAX_REQUEST_BYTES;
        if i > start && full {
            out.push(&items[start..i]);
            start = i;
            bytes = fixed;
        }
        bytes += c;
    }
    if start < items.len() {
        out.push(&items[start..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_stay_under_the_scanners_buffer_and_keep_every_item_in_order() {
        let keys: Vec<usize> = (0..300).map(|i| 1 + (i * 37) % 250).collect();
        let split = runs(&keys, 5, 64, |&k| k + 1);
        assert_eq!(split.concat(), keys, "every item once, in order");
        for r in &split {
            assert!(r.len() <= 64);
            assert!(5 + r.iter().map(|k| k + 1).sum::<usize>() <= MAX_REQUEST_BYTES);
        }
        // Short keys fill runs up to the item limit.
        let short = vec![16usize; 200];
        assert!(
            runs(&short, 5, 64, |&k| k + 1)
                .iter()
                .all(|r| r.len() == 64 || r.len() == 8)
        );
        let big = vec![5000usize];
        assert_eq!(
            runs(&big, 5, 64, |&k| k).len(),
            1,
            "an oversized item alone"
        );
    }
}
