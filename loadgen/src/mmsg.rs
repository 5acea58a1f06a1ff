//! Batched datagram I/O: `sendmmsg(2)` and `recvmmsg(2)` over fixed sets of reusable buffers,
//! so one system call moves up to a batch of requests or replies.
//!
//! With UDP segmentation offload (`UDP_SEGMENT`, Linux 4.18+), a run of equal-length datagrams
//! leaves as one message: the kernel builds and routes one buffer and cuts it into datagrams
//! at the device, instead of walking the UDP and IP send path once per datagram. On the wire
//! nothing changes: the server sees the same datagrams. Where the kernel refuses, plain
//! datagrams are sent.

use std::io;
use std::os::fd::RawFd;

const SOL_UDP: libc::c_int = 17;
const UDP_SEGMENT: libc::c_int = 103;
/// Most datagrams the kernel segments from one message (UDP_MAX_SEGMENTS).
pub const MAX_SEGMENTS: usize = 64;
/// Largest UDP payload of one message.
const MAX_MESSAGE: usize = 65_507;

/// Room for one control message carrying `T`, as the kernel lays it out (CMSG_SPACE).
fn cmsg_space<T>() -> usize {
    // SAFETY: CMSG_SPACE is pure arithmetic.
    unsafe { libc::CMSG_SPACE(std::mem::size_of::<T>() as u32) as usize }
}

fn zeroed_mmsghdr() -> libc::mmsghdr {
    // SAFETY: mmsghdr is plain C data for which all-zero is a valid (empty) value.
    unsafe { std::mem::zeroed() }
}

fn empty_iovec() -> libc::iovec {
    libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }
}

/// Up to `capacity` outgoing datagrams for a connected socket.
pub struct SendBatch {
    bufs: Vec<Vec<u8>>,
    len: usize,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    /// One UDP_SEGMENT control message per outgoing message (8-byte aligned storage).
    ctrl: Vec<u64>,
    ctrl_words: usize,
    /// Datagrams in each message of the current send.
    counts: Vec<usize>,
    /// Most equal-length datagrams sent as one segmented message (1: no segmentation).
    max_segments: usize,
}

impl SendBatch {
    /// Room for `capacity` datagrams, sent with up to `max_segments` per segmented message.
    pub fn new(capacity: usize, max_segments: usize) -> Self {
        let ctrl_words = cmsg_space::<u16>().div_ceil(8);
        Self {
            bufs: (0..capacity).map(|_| Vec::with_capacity(256)).collect(),
            len: 0,
            iovs: vec![empty_iovec(); capacity],
            hdrs: (0..capacity).map(|_| zeroed_mmsghdr()).collect(),
            ctrl: vec![0; capacity * ctrl_words],
            ctrl_words,
            counts: vec![0; capacity],
            max_segments: max_segments.clamp(1, MAX_SEGMENTS),
        }
    }

    /// Datagrams queued.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// True when no more datagrams fit.
    pub fn is_full(&self) -> bool {
        self.len == self.bufs.len()
    }

    /// A cleared buffer for the next datagram (the batch must not be full).
    pub fn push(&mut self) -> &mut Vec<u8> {
        let b = &mut self.bufs[self.len];
        b.clear();
        self.len += 1;
        b
    }

    /// Builds the messages for datagrams `from..len`: one per datagram, or with segmentation
    /// one per run of equal lengths. Returns how many.
    fn build(&mut self, from: usize) -> usize {
        for (i, b) in self.bufs[from..self.len].iter_mut().enumerate() {
            self.iovs[i] = libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            };
        }
        let total = self.len - from;
        let mut messages = 0;
        let mut i = 0;
        while i < total {
            let size = self.bufs[from + i].len();
            let mut n = 1;
            if size > 0 {
                while i + n < total
                    && n < self.max_segments
                    && self.bufs[from + i + n].len() == size
                    && (n + 1) * size <= MAX_MESSAGE
                {
                    n += 1;
                }
            }
            let h = &mut self.hdrs[messages].msg_hdr;
            h.msg_iov = &mut self.iovs[i];
            h.msg_iovlen = n;
            if n > 1 {
                let ctrl = &mut self.ctrl[messages * self.ctrl_words..];
                h.msg_control = ctrl.as_mut_ptr().cast();
                h.msg_controllen = cmsg_space::<u16>();
                // SAFETY: msg_control points at CMSG_SPACE(u16) writable, aligned bytes.
                unsafe {
                    let c = libc::CMSG_FIRSTHDR(h);
                    (*c).cmsg_level = SOL_UDP;
                    (*c).cmsg_type = UDP_SEGMENT;
                    (*c).cmsg_len = libc::CMSG_LEN(2) as usize;
                    std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), size as u16);
                }
            } else {
                h.msg_control = std::ptr::null_mut();
                h.msg_controllen = 0;
            }
            self.hdrs[messages].msg_len = 0;
            self.counts[messages] = n;
            messages += 1;
            i += n;
        }
        messages
    }

    /// Sends every queued datagram on `fd` (blocking until the kernel took them all) and
    /// empties the batch.
    pub fn flush(&mut self, fd: RawFd) -> io::Result<()> {
        let mut done = 0;
        while done < self.len {
            let messages = self.build(done);
            // SAFETY: hdrs[..messages] point to iovecs and control buffers that point into
            // live buffers; none is touched during the call.
            let rc = unsafe { libc::sendmmsg(fd, self.hdrs.as_mut_ptr(), messages as u32, 0) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                if self.max_segments > 1 && refuses_segmentation(&e) {
                    // This route or device cannot segment: plain datagrams from now on.
                    self.max_segments = 1;
                    continue;
                }
                self.len = 0;
                return Err(e);
            }
            done += self.counts[..rc as usize].iter().sum::<usize>();
        }
        self.len = 0;
        Ok(())
    }
}

/// Errors with which the kernel refuses UDP segmentation (not the destination).
fn refuses_segmentation(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EIO) | Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) | Some(libc::ENOPROTOOPT)
    )
}

/// Reusable receive buffers for up to `capacity` datagrams of at most `slot` bytes.
pub struct RecvBatch {
    buf: Vec<u8>,
    slot: usize,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    received: usize,
}

impl RecvBatch {
    /// `capacity` slots of `slot` bytes.
    pub fn new(capacity: usize, slot: usize) -> Self {
        Self {
            buf: vec![0; capacity * slot],
            slot,
            iovs: vec![empty_iovec(); capacity],
            hdrs: (0..capacity).map(|_| zeroed_mmsghdr()).collect(),
            received: 0,
        }
    }

    /// Receives up to a batch without blocking; `Ok(0)` when nothing is queued.
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        let cap = self.hdrs.len();
        let base = self.buf.as_mut_ptr();
        for i in 0..cap {
            self.iovs[i] = libc::iovec {
                // SAFETY: i * slot < buf.len(), so the offset stays inside the allocation.
                iov_base: unsafe { base.add(i * self.slot) }.cast(),
                iov_len: self.slot,
            };
            let h = &mut self.hdrs[i];
            h.msg_hdr.msg_iov = &mut self.iovs[i];
            h.msg_hdr.msg_iovlen = 1;
            h.msg_hdr.msg_flags = 0;
            h.msg_len = 0;
        }
        self.received = 0;
        loop {
            // SAFETY: every header points at a distinct slot of `buf`, which outlives the call.
            let rc = unsafe {
                libc::recvmmsg(
                    fd,
                    self.hdrs.as_mut_ptr(),
                    cap as u32,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if rc >= 0 {
                self.received = rc as usize;
                return Ok(self.received);
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Ok(0),
                _ => return Err(e),
            }
        }
    }

    /// Datagram `i` of the last receive, and whether it was truncated.
    pub fn datagram(&self, i: usize) -> (&[u8], bool) {
        let len = (self.hdrs[i].msg_len as usize).min(self.slot);
        let truncated = self.hdrs[i].msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
        (&self.buf[i * self.slot..i * self.slot + len], truncated)
    }
}

/// Waits until one of `fds` is readable (or writable, per its `events`) or `timeout_ns` passes.
/// Returns the number of ready descriptors.
pub fn poll(fds: &mut [libc::pollfd], timeout_ns: u64) -> io::Result<usize> {
    let ts = libc::timespec {
        tv_sec: (timeout_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (timeout_ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: fds is a valid slice of pollfd; ts lives across the call; no signal mask change.
    let rc = unsafe {
        libc::ppoll(
            fds.as_mut_ptr(),
            fds.len() as libc::nfds_t,
            &ts,
            std::ptr::null(),
        )
    };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(0);
        }
        return Err(e);
    }
    Ok(rc as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;

    #[test]
    fn batch_round_trip_over_loopback() {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        a.connect(b.local_addr().unwrap()).unwrap();
        let mut tx = SendBatch::new(8, 1);
        for i in 0..5u8 {
            tx.push().extend_from_slice(&[i; 10]);
        }
        assert_eq!(tx.len(), 5);
        tx.flush(a.as_raw_fd()).unwrap();
        assert!(tx.is_empty());
        let mut rx = RecvBatch::new(8, 64);
        let mut pfd = [libc::pollfd {
            fd: b.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        poll(&mut pfd, 1_000_000_000).unwrap();
        let mut got = Vec::new();
        for _ in 0..100 {
            let n = rx.recv(b.as_raw_fd()).unwrap();
            for i in 0..n {
                got.push(rx.datagram(i).0.to_vec());
            }
            if got.len() == 5 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(got.len(), 5);
        assert_eq!(got[3], vec![3u8; 10]);
        assert_eq!(rx.recv(b.as_raw_fd()).unwrap(), 0);
    }

    /// Runs of equal-length datagrams leave as segmented messages and arrive as the same
    /// datagrams, in order, whatever the mix of lengths.
    #[test]
    fn segmented_batch_arrives_as_separate_datagrams() {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        a.connect(b.local_addr().unwrap()).unwrap();
        let mut tx = SendBatch::new(200, MAX_SEGMENTS);
        let mut sent = Vec::new();
        for i in 0..150u8 {
            // 70 of 10 bytes (more than one message holds), 3 of 7, then 10 again.
            let len = if (70..73).contains(&i) { 7 } else { 10 };
            let d = vec![i; len];
            tx.push().extend_from_slice(&d);
            sent.push(d);
        }
        tx.flush(a.as_raw_fd()).unwrap();
        assert_eq!(
            tx.max_segments, MAX_SEGMENTS,
            "the kernel refused segmentation on lo"
        );
        let mut rx = RecvBatch::new(64, 64);
        let mut pfd = [libc::pollfd {
            fd: b.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        let mut got = Vec::new();
        for _ in 0..1000 {
            poll(&mut pfd, 10_000_000).unwrap();
            let n = rx.recv(b.as_raw_fd()).unwrap();
            for i in 0..n {
                got.push(rx.datagram(i).0.to_vec());
            }
            if got.len() >= sent.len() {
                break;
            }
        }
        assert_eq!(got, sent);
    }
}
