//! memcached connections whose replies the client is not taking (TCP flow control).
//!
//! memcached stops working on a connection while it cannot write that connection's replies:
//! the commands the client sent after them wait, read or not, inside memcached. A write among
//! them may land long after the kernel saw it, later than the write-settle time, and a GET
//! answered in between with the old value must not be cached (QA round 4: 200 pipelined `get`s
//! of a 500 KB item and then a `delete`; `DELETED` came 0.25-0.40 s later, and the old value
//! was served from then on). memcached cannot write when its socket's send buffer is full, so
//! the lease loop asks the kernel (sock_diag) about every connection to memcached's TCP port at
//! each probe, and extends the fill lease only while no connection has a backlog of replies.
//!
//! The same look counts connections memcached has not accepted yet (the listening socket's
//! accept queue): a client that connects for each write sends it before memcached takes the
//! connection, and memcached applies it only then. And it reads, for every connection, how
//! many bytes the kernel has received and how many of them memcached has not read yet
//! (`tcpi_bytes_received`, `idiag_rqueue`): bytes still unread a probe later are requests a
//! stalled worker thread holds back.

use std::collections::HashSet;
use std::io;
use std::net::IpAddr;

/// A memcached connection with a backlog of replies ([`is_backlogged`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backlogged {
    pub peer: IpAddr,
    pub peer_port: u16,
    /// Bytes memcached has queued (`sk_wmem_queued`) and its send buffer (`sk_sndbuf`).
    pub queued: u32,
    pub sndbuf: u32,
}

/// How far memcached has read one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    pub peer: IpAddr,
    pub peer_port: u16,
    /// Bytes the kernel has received from the client (`tcpi_bytes_received`).
    pub received: u64,
    /// Of those, bytes memcached has not read yet (`idiag_rqueue`).
    pub unread: u32,
}

impl Received {
    /// Bytes memcached has read.
    pub fn read(&self) -> u64 {
        self.received.saturating_sub(self.unread as u64)
    }
}

/// What one look at memcached's TCP sockets found.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// memcached listens on its port in this network namespace (else its connections cannot
    /// be seen from here).
    pub listening: bool,
    /// Connections the kernel has set up that memcached has not accepted yet (the listening
    /// sockets' accept queues). Their clients may have sent writes already, which the scanner
    /// saw; memcached applies them only once its listener thread takes the connection.
    pub unaccepted: u32,
    pub backlogged: Vec<Backlogged>,
    /// memcached's connections (but those of the sockets left out).
    pub connections: u32,
    /// How far memcached has read each of them (where the kernel says: tcp_info).
    pub received: Vec<Received>,
    /// Connections to memcached's port from this side (any process): address, port, inode.
    clients: Vec<(IpAddr, u16, u32)>,
    /// The client end of each of memcached's connections.
    peers: Vec<(IpAddr, u16)>,
}

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_HDR_LEN: usize = 16;
const INET_DIAG_MSG_LEN: usize = 72;
const INET_DIAG_INFO: u16 = 2;
const INET_DIAG_SKMEMINFO: u16 = 7;
/// Where `tcpi_bytes_received` (a u64) is in `struct tcp_info`.
const TCPI_BYTES_RECEIVED: usize = 128;
const SK_MEMINFO_SNDBUF: usize = 3;
const SK_MEMINFO_WMEM_QUEUED: usize = 5;
const TCP_ESTABLISHED: u8 = 1;
const TCP_CLOSE_WAIT: u8 = 8;
const TCP_LISTEN: u8 = 10;

/// Looks at every TCP socket on local port `port` (IPv4 and IPv6). Connections whose client
/// end is one of the sockets in `ignored` (inodes: see [`own_sockets`]) are left out.
pub fn snapshot(port: u16, ignored: &HashSet<u32>) -> io::Result<Snapshot> {
    let mut found = Snapshot::default();
    for family in [libc::AF_INET, libc::AF_INET6] {
        dump(family as u8, port, &mut found)?;
    }
    let ignored_ends: HashSet<(IpAddr, u16)> = found
        .clients
        .iter()
        .filter(|(_, _, inode)| ignored.contains(inode))
        .map(|(addr, port, _)| (*addr, *port))
        .collect();
    found
        .backlogged
        .retain(|b| !ignored_ends.contains(&(b.peer, b.peer_port)));
    found.connections = found
        .peers
        .iter()
        .filter(|end| !ignored_ends.contains(end))
        .count() as u32;
    found
        .received
        .retain(|r| !ignored_ends.contains(&(r.peer, r.peer_port)));
    Ok(found)
}

/// The inodes of this process's sockets. The agent's own connections to memcached carry no
/// writes (`stats`, `watch`, `me`, warm start's listing and `get`s), so a backlog on them
/// holds nothing back; warm start's listing of 100k items showed as one for a moment.
pub fn own_sockets() -> HashSet<u32> {
    let Ok(fds) = std::fs::read_dir("/proc/self/fd") else {
        return HashSet::new();
    };
    fds.filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|target| {
            let t = target.to_str()?;
            t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect()
}

/// A netlink socket, closed on drop.
struct Netlink(i32);

impl Drop for Netlink {
    fn drop(&mut self) {
        unsafe { libc::close(self.0) };
    }
}

fn dump(family: u8, port: u16, found: &mut Snapshot) -> io::Result<()> {
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let sock = Netlink(fd);
    let request = dump_request(family);
    let sent = unsafe { libc::send(sock.0, request.as_ptr().cast(), request.len(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = unsafe { libc::recv(sock.0, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Ok(());
        }
        if read_messages(&buf[..n as usize], port, found)? {
            return Ok(());
        }
    }
}

/// `struct nlmsghdr` + `struct inet_diag_req_v2`: dump TCP sockets of `family` in the states
/// memcached reads and writes in (and LISTEN), with their memory counters.
fn dump_request(family: u8) -> Vec<u8> {
    let states: u32 = 1 << TCP_ESTABLISHED | 1 << TCP_CLOSE_WAIT | 1 << TCP_LISTEN;
    let mut m = Vec::with_capacity(NLMSG_HDR_LEN + 56);
    m.extend_from_slice(&((NLMSG_HDR_LEN + 56) as u32).to_ne_bytes());
    m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    m.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel
    m.push(family);
    m.push(libc::IPPROTO_TCP as u8);
    m.push(1 << (INET_DIAG_SKMEMINFO - 1) | 1 << (INET_DIAG_INFO - 1));
    m.push(0);
    m.extend_from_slice(&states.to_ne_bytes());
    m.extend_from_slice(&[0u8; 48]); // inet_diag_sockid: no filter
    m
}

/// Reads one datagram of netlink messages; true once the dump is done.
fn read_messages(mut data: &[u8], port: u16, found: &mut Snapshot) -> io::Result<bool> {
    while data.len() >= NLMSG_HDR_LEN {
        let len = u32::from_ne_bytes(data[0..4].try_into().unwrap()) as usize;
        let kind = u16::from_ne_bytes(data[4..6].try_into().unwrap());
        if len < NLMSG_HDR_LEN || len > data.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "truncated sock_diag message",
            ));
        }
        let body = &data[NLMSG_HDR_LEN..len];
        match kind {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let errno = body
                    .get(0..4)
                    .map(|b| i32::from_ne_bytes(b.try_into().unwrap()))
                    .unwrap_or(0);
                return Err(io::Error::from_raw_os_error(-errno));
            }
            SOCK_DIAG_BY_FAMILY => read_socket(body, port, found),
            _ => {}
        }
        // Messages are 4-byte aligned.
        let step = (len + 3) & !3;
        data = data.get(step..).unwrap_or(&[]);
    }
    Ok(false)
}

/// One `struct inet_diag_msg` and its attributes.
fn read_socket(msg: &[u8], port: u16, found: &mut Snapshot) {
    if msg.len() < INET_DIAG_MSG_LEN {
        return;
    }
    let (family, state) = (msg[0], msg[1]);
    let local_port = u16::from_be_bytes([msg[4], msg[5]]);
    let peer_port = u16::from_be_bytes([msg[6], msg[7]]);
    let address = |at: usize| -> IpAddr {
        if family == libc::AF_INET as u8 {
            IpAddr::from(<[u8; 4]>::try_from(&msg[at..at + 4]).unwrap())
        } else {
            IpAddr::from(<[u8; 16]>::try_from(&msg[at..at + 16]).unwrap())
        }
    };
    if local_port != port {
        if peer_port == port && state != TCP_LISTEN {
            let inode = u32::from_ne_bytes(msg[68..72].try_into().unwrap());
            found.clients.push((address(8), local_port, inode));
        }
        return;
    }
    if state == TCP_LISTEN {
        found.listening = true;
        // A listening socket's idiag_rqueue is its accept queue's length.
        found.unaccepted += u32::from_ne_bytes(msg[56..60].try_into().unwrap());
        return;
    }
    let peer = address(24);
    found.peers.push((peer, peer_port));
    // An established socket's idiag_rqueue is what memcached has not read of what arrived.
    let unread = u32::from_ne_bytes(msg[56..60].try_into().unwrap());
    let mut attrs = &msg[INET_DIAG_MSG_LEN..];
    while attrs.len() >= 4 {
        let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
        let kind = u16::from_ne_bytes([attrs[2], attrs[3]]);
        if len < 4 || len > attrs.len() {
            return;
        }
        if kind == INET_DIAG_INFO
            && let Some(bytes) = attrs.get(4 + TCPI_BYTES_RECEIVED..12 + TCPI_BYTES_RECEIVED)
            && len >= 12 + TCPI_BYTES_RECEIVED
        {
            found.received.push(Received {
                peer,
                peer_port,
                received: u64::from_ne_bytes(bytes.try_into().unwrap()),
                unread,
            });
        }
        if kind == INET_DIAG_SKMEMINFO {
            let word = |i: usize| {
                attrs
                    .get(4 + i * 4..8 + i * 4)
                    .map(|b| u32::from_ne_bytes(b.try_into().unwrap()))
            };
            if let (Some(queued), Some(sndbuf)) =
                (word(SK_MEMINFO_WMEM_QUEUED), word(SK_MEMINFO_SNDBUF))
                && is_backlogged(queued, sndbuf)
            {
                found.backlogged.push(Backlogged {
                    peer,
                    peer_port,
                    queued,
                    sndbuf,
                });
            }
        }
        attrs = attrs.get((len + 3) & !3..).unwrap_or(&[]);
    }
}

/// memcached's writes fail once the queue reaches the send buffer: a queue at half the buffer
/// is a writer that is, or was a moment ago, waiting for the client. A buffer the kernel has
/// grown large (up to `tcp_wmem`'s 4 MB) dips much further while memcached refills it: in
/// 15 holds of about 400 ms (a client reading 100 MB of replies at 400 MB/s), looks during
/// the hold saw 66 KB, 243 KB and 360 KB once each, 600 KB or more otherwise. So 64 KiB
/// queued is a backlog too, and the lease loop needs two clear looks in a row. A client
/// taking small replies rarely has that much outstanding, and never at look after look.
pub fn is_backlogged(queued: u32, sndbuf: u32) -> bool {
    const LARGE_QUEUE: u64 = 64 << 10;
    sndbuf > 0 && queued as u64 >= (sndbuf as u64 / 2).min(LARGE_QUEUE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queue_of_half_the_send_buffer_or_more_is_a_backlog() {
        assert!(!is_backlogged(0, 16384));
        assert!(!is_backlogged(8191, 16384));
        assert!(is_backlogged(8192, 16384));
        assert!(is_backlogged(20000, 16384));
        assert!(!is_backlogged(0, 0));
        // A large buffer: 64 KiB outstanding is enough.
        assert!(!is_backlogged((64 << 10) - 1, 4 << 20));
        assert!(is_backlogged(64 << 10, 4 << 20));
    }

    #[test]
    fn an_idle_connection_to_a_listening_port_is_seen_and_not_backlogged() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (_served, _) = listener.accept().unwrap();
        let seen = snapshot(port, &HashSet::new()).expect("sock_diag");
        assert!(seen.listening, "the listening socket");
        assert!(seen.backlogged.is_empty(), "{:?}", seen.backlogged);
        drop(client);
    }

    #[test]
    fn connections_memcached_has_not_accepted_are_counted() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert_eq!(snapshot(port, &HashSet::new()).unwrap().unaccepted, 0);
        let _first = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let _second = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        assert_eq!(snapshot(port, &HashSet::new()).unwrap().unaccepted, 2);
        let _taken = listener.accept().unwrap();
        assert_eq!(snapshot(port, &HashSet::new()).unwrap().unaccepted, 1);
    }

    #[test]
    fn a_connection_whose_client_does_not_read_is_backlogged() {
        use std::io::Write;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (mut served, _) = listener.accept().unwrap();
        served.set_nonblocking(true).unwrap();
        // Write until the socket refuses (the client reads nothing).
        let chunk = vec![0u8; 64 * 1024];
        let mut written = 0usize;
        while written < 256 << 20 {
            match served.write(&chunk) {
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        let client_port = client.local_addr().unwrap().port();
        let seen = snapshot(port, &HashSet::new()).expect("sock_diag");
        let mine = seen.backlogged.iter().find(|b| b.peer_port == client_port);
        assert!(mine.is_some(), "not seen backlogged: {:?}", seen.backlogged);
        // The same connection, its client end one of the sockets to leave out.
        let seen = snapshot(port, &own_sockets()).expect("sock_diag");
        assert!(
            !seen.backlogged.iter().any(|b| b.peer_port == client_port),
            "a connection of this process was not left out: {:?}",
            seen.backlogged
        );
    }
}
