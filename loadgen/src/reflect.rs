//! A zero-work memcached-compatible UDP and TCP responder for measuring load generators themselves:
//! every `get`/`mg` is answered as a hit with a fixed-size value, `set`/`ms` with STORED/HD,
//! `delete`/`md` with DELETED/HD, each in one datagram carrying the request's frame header.
//! Batched with `recvmmsg`/`sendmmsg` and busy-polling (it keeps one CPU busy), it answers far faster than memcached, so a generator
//! driving it is measured against its own limits. Not a cache: it stores nothing.

use std::io::{self, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::proto::frame::FrameHeader;
use crate::proto::{CRLF, VALUE_FILL, push_decimal};

/// Datagrams per system call.
const BATCH: usize = 64;
/// Receive slot size.
const SLOT: usize = 2048;
/// Largest reply payload (memcached's UDP_MAX_PAYLOAD_SIZE).
const MAX_REPLY: usize = 1400;

/// Builds the reply to one request datagram payload (after the frame header) into `out`.
pub fn answer(req: &[u8], value_len: usize, out: &mut Vec<u8>) {
    let line_end = req.iter().position(|&b| b == b'\n').unwrap_or(req.len());
    let line = req[..line_end]
        .strip_suffix(b"\r")
        .unwrap_or(&req[..line_end]);
    let mut toks = line.split(|&b| b == b' ').filter(|t| !t.is_empty());
    let Some(cmd) = toks.next() else {
        out.extend_from_slice(b"ERROR\r\n");
        return;
    };
    match cmd {
        b"get" | b"gets" => {
            let start = out.len();
            for key in toks {
                if out.len() - start + key.len() + value_len + 32 > MAX_REPLY {
                    break;
                }
                out.extend_from_slice(b"VALUE ");
                out.extend_from_slice(key);
                out.extend_from_slice(b" 0 ");
                push_decimal(value_len, out);
                out.extend_from_slice(CRLF);
                out.resize(out.len() + value_len, VALUE_FILL);
                out.extend_from_slice(CRLF);
            }
            out.extend_from_slice(b"END\r\n");
        }
        b"mg" => {
            out.extend_from_slice(b"VA ");
            push_decimal(value_len, out);
            out.extend_from_slice(CRLF);
            out.resize(out.len() + value_len, VALUE_FILL);
            out.extend_from_slice(CRLF);
        }
        b"set" | b"add" | b"replace" => out.extend_from_slice(b"STORED\r\n"),
        b"delete" => out.extend_from_slice(b"DELETED\r\n"),
        b"ms" | b"md" | b"mn" => {
            out.extend_from_slice(if cmd == b"mn" { b"MN\r\n" } else { b"HD\r\n" })
        }
        _ => out.extend_from_slice(b"ERROR\r\n"),
    }
}

/// Length of the data block that follows a storage command line (`set k f e n`, `ms k n`), if
/// any.
fn data_len(line: &[u8]) -> Option<usize> {
    let mut toks = line.split(|&b| b == b' ').filter(|t| !t.is_empty());
    let idx = match toks.next()? {
        b"set" | b"add" | b"replace" | b"append" | b"prepend" => 3,
        b"ms" => 1,
        _ => return None,
    };
    std::str::from_utf8(toks.nth(idx)?).ok()?.parse().ok()
}

/// Answers every complete request at the front of `buf` into `out`; returns the bytes consumed
/// and the number of requests answered.
pub fn answer_stream(buf: &[u8], value_len: usize, out: &mut Vec<u8>) -> (usize, u64) {
    let mut pos = 0;
    let mut n = 0;
    while let Some(nl) = buf[pos..].iter().position(|&b| b == b'\n') {
        let line_end = pos + nl + 1;
        let line = &buf[pos..line_end];
        let trimmed = line.strip_suffix(b"\r\n").unwrap_or(line);
        let end = match data_len(trimmed) {
            Some(len) if line_end + len + 2 > buf.len() => break,
            Some(len) => line_end + len + 2,
            None => line_end,
        };
        answer(line, value_len, out);
        pos = end;
        n += 1;
    }
    (pos, n)
}

/// Serves the text and meta protocols over TCP on `listen` until `stop` is set (one thread,
/// non-blocking sockets, busy-polling with `poll(2)` at zero timeout).
pub fn serve_tcp(
    listen: SocketAddr,
    value_len: usize,
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
) -> io::Result<()> {
    let listener = TcpListener::bind(listen)?;
    listener.set_nonblocking(true)?;
    struct Conn {
        s: TcpStream,
        rbuf: Vec<u8>,
        rlen: usize,
        wbuf: Vec<u8>,
        wpos: usize,
    }
    let mut conns: Vec<Conn> = Vec::new();
    let mut pfds: Vec<libc::pollfd> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        while let Ok((s, _)) = listener.accept() {
            s.set_nonblocking(true)?;
            s.set_nodelay(true)?;
            conns.push(Conn {
                s,
                rbuf: vec![0; 64 * 1024],
                rlen: 0,
                wbuf: Vec::with_capacity(64 * 1024),
                wpos: 0,
            });
        }
        pfds.clear();
        pfds.extend(conns.iter().map(|c| libc::pollfd {
            fd: c.s.as_raw_fd(),
            events: libc::POLLIN
                | if c.wpos < c.wbuf.len() {
                    libc::POLLOUT
                } else {
                    0
                },
            revents: 0,
        }));
        // SAFETY: pfds is a valid slice of pollfd for the duration of the call.
        let ready = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 0) };
        if ready <= 0 {
            std::hint::spin_loop();
            continue;
        }
        let mut closed = Vec::new();
        for (i, c) in conns.iter_mut().enumerate() {
            let re = pfds[i].revents;
            if re == 0 {
                continue;
            }
            if re & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                if c.rlen == c.rbuf.len() {
                    let n = c.rbuf.len() * 2;
                    c.rbuf.resize(n, 0);
                }
                match c.s.read(&mut c.rbuf[c.rlen..]) {
                    Ok(0) => {
                        closed.push(i);
                        continue;
                    }
                    Ok(n) => {
                        c.rlen += n;
                        let (used, k) = answer_stream(&c.rbuf[..c.rlen], value_len, &mut c.wbuf);
                        c.rbuf.copy_within(used..c.rlen, 0);
                        c.rlen -= used;
                        answered.fetch_add(k, Ordering::Relaxed);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => {
                        closed.push(i);
                        continue;
                    }
                }
            }
            while c.wpos < c.wbuf.len() {
                match c.s.write(&c.wbuf[c.wpos..]) {
                    Ok(n) if n > 0 => c.wpos += n,
                    _ => break,
                }
            }
            if c.wpos == c.wbuf.len() {
                c.wbuf.clear();
                c.wpos = 0;
            }
        }
        for i in closed.into_iter().rev() {
            conns.swap_remove(i);
        }
    }
    Ok(())
}

/// Serves on `listen` until `stop` is set; counts answered requests in `answered`.
pub fn serve(
    listen: SocketAddr,
    value_len: usize,
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
) -> io::Result<()> {
    let sock = UdpSocket::bind(listen)?;
    let fd = sock.as_raw_fd();
    // SAFETY: zeroed C structs are valid empty values; every pointer set below points into
    // vectors that are neither moved nor resized while the system calls use them.
    let mut names: Vec<libc::sockaddr_storage> = vec![unsafe { std::mem::zeroed() }; BATCH];
    let mut rbuf = vec![0u8; BATCH * SLOT];
    let mut riov: Vec<libc::iovec> = (0..BATCH)
        .map(|_| libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        })
        .collect();
    let mut rhdr: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; BATCH];
    let mut replies: Vec<Vec<u8>> = (0..BATCH)
        .map(|_| Vec::with_capacity(MAX_REPLY + 8))
        .collect();
    let mut siov = riov.clone();
    let mut shdr: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; BATCH];
    while !stop.load(Ordering::Relaxed) {
        for i in 0..BATCH {
            riov[i] = libc::iovec {
                // SAFETY: i * SLOT < rbuf.len().
                iov_base: unsafe { rbuf.as_mut_ptr().add(i * SLOT) }.cast(),
                iov_len: SLOT,
            };
            let h = &mut rhdr[i].msg_hdr;
            h.msg_iov = &mut riov[i];
            h.msg_iovlen = 1;
            h.msg_name = (&mut names[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
        }
        // SAFETY: headers point at live buffers and address slots (see above). Busy-polling
        // (MSG_DONTWAIT) keeps the responder awake, so no wake-up latency is added.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                rhdr.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n <= 0 {
            std::hint::spin_loop();
            continue;
        }
        let n = n as usize;
        for i in 0..n {
            let len = rhdr[i].msg_len as usize;
            let d = &rbuf[i * SLOT..i * SLOT + len.min(SLOT)];
            let out = &mut replies[i];
            out.clear();
            let Some(h) = FrameHeader::parse(d) else {
                continue;
            };
            out.extend_from_slice(FrameHeader::new(h.request_id(), 0, 1).bytes());
            answer(&d[FrameHeader::LEN..], value_len, out);
            siov[i] = libc::iovec {
                iov_base: out.as_mut_ptr().cast(),
                iov_len: out.len(),
            };
            let sh = &mut shdr[i].msg_hdr;
            sh.msg_iov = &mut siov[i];
            sh.msg_iovlen = 1;
            sh.msg_name = (&mut names[i] as *mut libc::sockaddr_storage).cast();
            sh.msg_namelen = rhdr[i].msg_hdr.msg_namelen;
        }
        let mut sent = 0;
        while sent < n {
            // SAFETY: shdr[sent..n] point at live reply buffers and addresses.
            let rc =
                unsafe { libc::sendmmsg(fd, shdr.as_mut_ptr().add(sent), (n - sent) as u32, 0) };
            if rc <= 0 {
                break;
            }
            sent += rc as usize;
        }
        answered.fetch_add(n as u64, Ordering::Relaxed);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Dialect, ReplyKind, parse_reply};
    use crate::workload::Verb;

    #[test]
    fn answers_parse_as_hits() {
        let mut out = Vec::new();
        answer(b"get a bb ccc\r\n", 5, &mut out);
        let (used, r) = parse_reply(Dialect::Text, Verb::Get, 3, &out)
            .unwrap()
            .unwrap();
        assert_eq!((used, r.hits, r.kind), (out.len(), 3, ReplyKind::Values));
        out.clear();
        answer(b"set k 0 0 2\r\nhi\r\n", 5, &mut out);
        assert_eq!(out, b"STORED\r\n");
        out.clear();
        answer(b"mg k v\r\n", 2, &mut out);
        assert_eq!(out, b"VA 2\r\nxx\r\n");
    }

    #[test]
    fn stream_waits_for_data_blocks() {
        let mut out = Vec::new();
        let req = b"get a\r\nset k 0 0 5\r\nhel";
        let (used, n) = answer_stream(req, 1, &mut out);
        assert_eq!((used, n), (7, 1));
        out.clear();
        let req = b"set k 0 0 5\r\nhello\r\nms k 2\r\nhi\r\nmn\r\n";
        let (used, n) = answer_stream(req, 1, &mut out);
        assert_eq!((used, n), (req.len(), 3));
        assert_eq!(out, b"STORED\r\nHD\r\nMN\r\n");
    }
}
