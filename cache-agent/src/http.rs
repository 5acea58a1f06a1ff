//! The agent's HTTP endpoint: `GET /metrics` (Prometheus text format 0.0.4, read from the
//! kernel at scrape time), `GET /healthz` (200 `ok` while the lease is valid, 503 otherwise) and
//! a landing page at `/`; anything else is 404.
//!
//! A deliberately small HTTP/1.x server on tokio: one request per connection (`Connection:
//! close`), requests bounded in size and time, a bounded number of connections at once, and
//! rendering on the blocking pool (it takes the `ebpf` lock). Bad requests get a 4xx, never a
//! panic. Idle clients cannot starve `/healthz`: a connection gets [`HEAD_TIMEOUT`] to send its
//! request, and when every slot is taken the one that has waited longest on its client is
//! closed to make room. [`run`] is the testable core; [`serve`] runs it for the agent.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use prometheus::Registry;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{Semaphore, TryAcquireError, oneshot},
    time::timeout,
};
use tracing::{debug, error, info, warn};

use crate::{coherence::Shared, metrics};

/// Largest request head (request line and headers) accepted.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// Time a client has to send its request head. Short: a probe sends it at once, and an idle
/// connection holds a slot until then.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(2);
/// Time a connection may take in all: its request, the rendering and reading the response.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once. When all are taken, the oldest waiting on its client is closed
/// (see [`Waiting`]); only if every one is rendering does a new one wait for a slot.
pub const MAX_CONNECTIONS: usize = 256;

/// What the server serves. Both methods may block; they run on the blocking pool.
pub trait Endpoints: Send + Sync + 'static {
    /// The metrics in text format 0.0.4.
    fn metrics(&self) -> Result<String, String>;
    /// Whether `/healthz` says ok.
    fn healthy(&self) -> bool;
}

/// The agent's endpoints: its metrics registry and its lease.
struct Agent {
    registry: Registry,
    shared: Arc<Shared>,
}

impl Endpoints for Agent {
    fn metrics(&self) -> Result<String, String> {
        metrics::encode(&self.registry.gather()).map_err(|e| e.to_string())
    }

    fn healthy(&self) -> bool {
        self.shared.lease_valid()
    }
}

/// Serves the agent's metrics and health on `listener` (bound by the agent before it attaches
/// anything, so a taken address fails the start) until the task is aborted.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let registry = match metrics::registry(Arc::clone(&shared)) {
        Ok(r) => r,
        Err(e) => {
            error!(error = %e, "metrics registry could not be built; no /metrics");
            return;
        }
    };
    if let Ok(bound) = listener.local_addr() {
        info!(addr = %bound, "serving /metrics, /healthz and /livez");
    }
    run(listener, Arc::new(Agent { registry, shared })).await;
}

/// Connections waiting on their client (for the request head, or to hang up after the
/// response), oldest first: the ones closed to make room when every slot is taken.
#[derive(Default)]
struct Waiting {
    next: u64,
    shed: BTreeMap<u64, oneshot::Sender<()>>,
}

type WaitingSet = Arc<Mutex<Waiting>>;

fn lock(set: &WaitingSet) -> std::sync::MutexGuard<'_, Waiting> {
    set.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `f`, which waits on the client, unless the connection is shed first (`None`).
async fn sheddable<T>(set: &WaitingSet, f: impl Future<Output = T>) -> Option<T> {
    /// Leaves the set however the wait ends.
    struct Ticket<'a>(&'a WaitingSet, u64);
    impl Drop for Ticket<'_> {
        fn drop(&mut self) {
            lock(self.0).shed.remove(&self.1);
        }
    }
    let (tx, rx) = oneshot::channel();
    let _ticket = {
        let mut w = lock(set);
        let id = w.next;
        w.next += 1;
        w.shed.insert(id, tx);
        Ticket(set, id)
    };
    tokio::select! {
        r = f => Some(r),
        _ = rx => None,
    }
}

/// Tells the connection that has waited longest on its client to close; false if none waits.
fn shed_oldest(set: &WaitingSet) -> bool {
    let mut w = lock(set);
    while let Some((_, tx)) = w.shed.pop_first() {
        if tx.send(()).is_ok() {
            return true;
        }
    }
    false
}

/// Accepts connections on `listener` forever, answering each with `endpoints`.
pub async fn run(listener: TcpListener, endpoints: Arc<dyn Endpoints>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let waiting = WaitingSet::default();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Accept first, then find a slot: a full server still answers a new probe at once by
        // closing an idle connection, instead of leaving the probe in the listen backlog.
        let permit = match Arc::clone(&slots).try_acquire_owned() {
            Ok(p) => p,
            Err(TryAcquireError::Closed) => return,
            Err(TryAcquireError::NoPermits) => {
                if shed_oldest(&waiting) {
                    debug!(%peer, "all http slots taken: closed the longest idle connection");
                }
                // Released by the shed connection, or within REQUEST_TIMEOUT by a busy one.
                let Ok(p) = Arc::clone(&slots).acquire_owned().await else {
                    return;
                };
                p
            }
        };
        let endpoints = Arc::clone(&endpoints);
        let waiting = Arc::clone(&waiting);
        tokio::spawn(async move {
            let _permit = permit;
            match timeout(REQUEST_TIMEOUT, handle(stream, endpoints, waiting)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(%peer, error = %e, "http connection failed"),
                Err(_) => debug!(%peer, "http request timed out"),
            }
        });
    }
}

/// A parsed request line.
#[derive(Debug, PartialEq, Eq)]
pub struct Request<'a> {
    pub method: &'a str,
    /// The path without the query string.
    pub path: &'a str,
}

/// Why a request head was not accepted.
#[derive(Debug, PartialEq, Eq)]
pub enum BadRequest {
    /// Not `METHOD TARGET HTTP/x.y`.
    Malformed,
    /// Longer than [`MAX_REQUEST_BYTES`] without the blank line that ends it.
    TooLarge,
}

/// Index just past the blank line ending a request head, if `buf` holds one.
fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Parses the request line of a complete request head.
pub fn parse_request_line(head: &[u8]) -> Result<Request<'_>, BadRequest> {
    let line_end = head
        .iter()
        .position(|&b| b == b'\n')
        .ok_or(BadRequest::Malformed)?;
    let line = std::str::from_utf8(&head[..line_end]).map_err(|_| BadRequest::Malformed)?;
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(BadRequest::Malformed);
    };
    let method_ok = !method.is_empty() && method.bytes().all(|b| b.is_ascii_uppercase());
    if !method_ok || !target.starts_with('/') || !version.starts_with("HTTP/1.") {
        return Err(BadRequest::Malformed);
    }
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    Ok(Request { method, path })
}

/// Reads one request head from `stream`, at most [`MAX_REQUEST_BYTES`].
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Result<Vec<u8>, BadRequest>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(Err(BadRequest::Malformed));
        }
        let scan_from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = head_end(&buf[scan_from..]) {
            buf.truncate(scan_from + end);
            return Ok(Ok(buf));
        }
        if buf.len() > MAX_REQUEST_BYTES {
            return Ok(Err(BadRequest::TooLarge));
        }
    }
}

/// A response to write.
struct Response {
    status: &'static str,
    content_type: &'static str,
    extra_header: Option<&'static str>,
    body: String,
}

impl Response {
    fn text(status: &'static str, body: impl Into<String>) -> Self {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            extra_header: None,
            body: body.into(),
        }
    }
}

const LANDING_PAGE: &str = "<html><head><title>cache-agent</title></head><body>\
<h1>cache-agent</h1><p>In-kernel memcached cache.</p>\
<ul><li><a href=\"/metrics\">/metrics</a></li><li><a href=\"/healthz\">/healthz</a></li>\
<li><a href=\"/livez\">/livez</a></li></ul>\
</body></html>\n";

async fn respond(endpoints: Arc<dyn Endpoints>, req: &Request<'_>) -> Response {
    let known = matches!(req.path, "/metrics" | "/healthz" | "/livez" | "/");
    if !known {
        return Response::text("404 Not Found", "not found\n");
    }
    if req.method != "GET" && req.method != "HEAD" {
        let mut r = Response::text("405 Method Not Allowed", "method not allowed\n");
        r.extra_header = Some("Allow: GET, HEAD\r\n");
        return r;
    }
    match req.path {
        "/metrics" => match tokio::task::spawn_blocking(move || endpoints.metrics()).await {
            Ok(Ok(body)) => Response {
                status: "200 OK",
                content_type: metrics::CONTENT_TYPE,
                extra_header: None,
                body,
            },
            Ok(Err(e)) => {
                warn!(error = %e, "rendering /metrics failed");
                Response::text("500 Internal Server Error", format!("{e}\n"))
            }
            Err(e) => {
                error!(error = %e, "rendering /metrics panicked");
                Response::text("500 Internal Server Error", "internal error\n")
            }
        },
        // The agent answers: for a liveness probe, which must not restart an agent that is
        // only waiting for memcached (/healthz is for readiness).
        "/livez" => Response::text("200 OK", "alive\n"),
        "/healthz" => match tokio::task::spawn_blocking(move || endpoints.healthy()).await {
            Ok(true) => Response::text("200 OK", "ok"),
            Ok(false) => Response::text(
                "503 Service Unavailable",
                "lease not valid: the kernel is not serving\n",
            ),
            Err(_) => Response::text("503 Service Unavailable", "health check failed\n"),
        },
        _ => Response {
            status: "200 OK",
            content_type: "text/html; charset=utf-8",
            extra_header: None,
            body: LANDING_PAGE.into(),
        },
    }
}

async fn handle(
    mut stream: TcpStream,
    endpoints: Arc<dyn Endpoints>,
    waiting: WaitingSet,
) -> std::io::Result<()> {
    use std::io::{Error, ErrorKind};
    let bad = || Response::text("400 Bad Request", "bad request\n");
    let head = match sheddable(&waiting, timeout(HEAD_TIMEOUT, read_head(&mut stream))).await {
        None => return Err(Error::other("closed to make room for a new connection")),
        Some(Err(_)) => return Err(Error::new(ErrorKind::TimedOut, "no request head in time")),
        Some(Ok(head)) => head?,
    };
    let (response, head_only) = match head {
        Ok(head) => match parse_request_line(&head) {
            Ok(req) => (respond(endpoints, &req).await, req.method == "HEAD"),
            Err(_) => (bad(), false),
        },
        Err(BadRequest::Malformed) => (bad(), false),
        Err(BadRequest::TooLarge) => {
            let body = "request too large\n";
            (
                Response::text("431 Request Header Fields Too Large", body),
                false,
            )
        }
    };
    let mut out = format!(
        "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{}Connection: close\r\n\r\n",
        response.status,
        response.content_type,
        response.body.len(),
        response.extra_header.unwrap_or(""),
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(response.body.as_bytes());
    }
    stream.write_all(&out).await?;
    stream.shutdown().await?;
    // Closing with unread input (a body, an oversized head) would reset the connection and
    // could destroy the response before the client reads it: read what is left, within bounds,
    // until the client closes (it has the whole response already).
    let drain = async {
        let mut sink = [0u8; 4096];
        let mut left = 1usize << 20;
        while left > 0 {
            match timeout(Duration::from_secs(1), stream.read(&mut sink)).await {
                Ok(Ok(n)) if n > 0 => left = left.saturating_sub(n),
                _ => break,
            }
        }
    };
    sheddable(&waiting, drain).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::{
        net::SocketAddr,
        sync::atomic::{AtomicBool, AtomicUsize, Ordering},
    };

    use super::*;

    struct Fake {
        healthy: AtomicBool,
        scrapes: AtomicUsize,
        fail: bool,
    }

    impl Endpoints for Fake {
        fn metrics(&self) -> Result<String, String> {
            self.scrapes.fetch_add(1, Ordering::Relaxed);
            if self.fail {
                return Err("kernel gone".into());
            }
            let view = metrics::View {
                snapshot: None,
                lease_valid: true,
                memcached_up: true,
                watch_connected: true,
                resyncs: 0,
                watch_invalidations: 0,
                lease_renewals: 1,
                backlogged_connections: 0,
                ttl_answers: [0; 5],
                interface: "lo".into(),
                mode: "generic",
                kernel_read_errors: 0,
            };
            metrics::encode(&metrics::families(&view)).map_err(|e| e.to_string())
        }

        fn healthy(&self) -> bool {
            self.healthy.load(Ordering::Relaxed)
        }
    }

    async fn server(fail: bool) -> (SocketAddr, Arc<Fake>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let fake = Arc::new(Fake {
            healthy: AtomicBool::new(true),
            scrapes: AtomicUsize::new(0),
            fail,
        });
        tokio::spawn(run(listener, fake.clone()));
        (addr, fake)
    }

    async fn raw(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut out = Vec::new();
        timeout(Duration::from_secs(5), s.read_to_end(&mut out))
            .await
            .unwrap()
            .unwrap();
        String::from_utf8(out).unwrap()
    }

    fn status(resp: &str) -> &str {
        resp.lines().next().unwrap_or_default()
    }

    fn body(resp: &str) -> &str {
        resp.split_once("\r\n\r\n")
            .map(|(_, b)| b)
            .unwrap_or_default()
    }

    #[test]
    fn request_lines() {
        let r = parse_request_line(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
        assert_eq!(
            r,
            Request {
                method: "GET",
                path: "/metrics"
            }
        );
        assert!(parse_request_line(b"GET /metrics\r\n\r\n").is_err());
        assert!(parse_request_line(b"GET metrics HTTP/1.1\r\n\r\n").is_err());
        assert!(parse_request_line(b"get / HTTP/1.1\r\n\r\n").is_err());
        assert!(parse_request_line(b"GET / HTTP/2 x\r\n\r\n").is_err());
        assert!(parse_request_line(b"\xff\xfe / HTTP/1.1\r\n\r\n").is_err());
        assert_eq!(head_end(b"GET / HTTP/1.0\n\n"), Some(16));
    }

    #[tokio::test]
    async fn metrics_and_health() {
        let (addr, fake) = server(false).await;
        let resp = raw(
            addr,
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n",
        )
        .await;
        assert_eq!(status(&resp), "HTTP/1.1 200 OK");
        assert!(
            resp.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"),
            "{resp}"
        );
        let len: usize = resp
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .and_then(|v| v.parse().ok())
            .unwrap();
        assert_eq!(len, body(&resp).len());
        assert!(
            body(&resp).contains("memcache_accel_lease_valid 1\n"),
            "{resp}"
        );
        assert!(
            body(&resp).contains("memcache_accel_attached{interface=\"lo\",mode=\"generic\"} 1\n")
        );

        let resp = raw(addr, b"GET /healthz HTTP/1.1\r\n\r\n").await;
        assert_eq!(status(&resp), "HTTP/1.1 200 OK");
        assert_eq!(body(&resp), "ok");
        fake.healthy.store(false, Ordering::Relaxed);
        let resp = raw(addr, b"GET /healthz HTTP/1.0\r\n\r\n").await;
        assert_eq!(status(&resp), "HTTP/1.1 503 Service Unavailable");

        let resp = raw(addr, b"HEAD /metrics HTTP/1.1\r\n\r\n").await;
        assert_eq!(status(&resp), "HTTP/1.1 200 OK");
        assert_eq!(body(&resp), "");
        let resp = raw(addr, b"GET / HTTP/1.1\r\n\r\n").await;
        assert!(body(&resp).contains("/metrics"));
    }

    #[tokio::test]
    async fn bad_requests_get_4xx_and_the_server_lives_on() {
        let (addr, fake) = server(false).await;
        assert_eq!(
            status(&raw(addr, b"GET /nope HTTP/1.1\r\n\r\n").await),
            "HTTP/1.1 404 Not Found"
        );
        let resp = raw(addr, b"POST /metrics HTTP/1.1\r\n\r\n").await;
        assert_eq!(status(&resp), "HTTP/1.1 405 Method Not Allowed");
        assert!(resp.contains("Allow: GET, HEAD\r\n"));
        assert_eq!(
            status(&raw(addr, b"hello\r\n\r\n").await),
            "HTTP/1.1 400 Bad Request"
        );
        assert_eq!(
            status(&raw(addr, b"\0\0\0\0\n\n").await),
            "HTTP/1.1 400 Bad Request"
        );
        let huge = [
            b"GET /metrics HTTP/1.1\r\nX: ".as_slice(),
            &vec![b'a'; 64 * 1024],
        ]
        .concat();
        let resp = raw(addr, &huge).await;
        assert_eq!(
            status(&resp),
            "HTTP/1.1 431 Request Header Fields Too Large"
        );
        // A client that connects and says nothing, or hangs up half-way, costs nothing.
        drop(TcpStream::connect(addr).await.unwrap());
        let mut half = TcpStream::connect(addr).await.unwrap();
        half.write_all(b"GET /met").await.unwrap();
        drop(half);
        assert_eq!(fake.scrapes.load(Ordering::Relaxed), 0);
        assert_eq!(
            status(&raw(addr, b"GET /metrics HTTP/1.1\r\n\r\n").await),
            "HTTP/1.1 200 OK"
        );
    }

    #[tokio::test]
    async fn concurrent_scrapes() {
        let (addr, fake) = server(false).await;
        let tasks: Vec<_> = (0..50)
            .map(|_| tokio::spawn(async move { raw(addr, b"GET /metrics HTTP/1.1\r\n\r\n").await }))
            .collect();
        for t in tasks {
            let resp = t.await.unwrap();
            assert_eq!(status(&resp), "HTTP/1.1 200 OK");
            assert!(
                body(&resp).contains("\nmemcache_accel_watch_connected 1\n"),
                "{resp}"
            );
            assert!(
                body(&resp).ends_with("memcache_accel_kernel_read_errors_total 0\n"),
                "{resp}"
            );
        }
        assert_eq!(fake.scrapes.load(Ordering::Relaxed), 50);
    }

    #[tokio::test]
    async fn idle_connections_do_not_starve_health_checks() {
        let (addr, _) = server(false).await;
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS + 44 {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        // A probe is answered at once, not after the idle connections time out.
        for request in [
            b"GET /healthz HTTP/1.1\r\n\r\n".as_slice(),
            b"GET /metrics HTTP/1.1\r\n\r\n",
        ] {
            let resp = timeout(Duration::from_secs(1), raw(addr, request))
                .await
                .expect("starved by idle connections");
            assert_eq!(status(&resp), "HTTP/1.1 200 OK");
        }
        // The oldest idle connection was closed to make room.
        let mut buf = [0u8; 16];
        let n = timeout(Duration::from_secs(1), idle[0].read(&mut buf))
            .await
            .expect("the oldest idle connection is still open")
            .unwrap_or(0);
        assert_eq!(n, 0);
    }

    #[tokio::test]
    async fn livez_answers_while_healthz_says_not_serving() {
        let (addr, fake) = server(false).await;
        fake.healthy.store(false, Ordering::Relaxed);
        let live = raw(addr, b"GET /livez HTTP/1.1\r\n\r\n").await;
        assert_eq!(status(&live), "HTTP/1.1 200 OK");
        let health = raw(addr, b"GET /healthz HTTP/1.1\r\n\r\n").await;
        assert_eq!(status(&health), "HTTP/1.1 503 Service Unavailable");
    }

    #[tokio::test]
    async fn a_silent_client_is_closed_after_the_head_timeout() {
        let (addr, _) = server(false).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        let start = std::time::Instant::now();
        let mut buf = [0u8; 16];
        let n = timeout(HEAD_TIMEOUT * 2, s.read(&mut buf))
            .await
            .expect("still open after twice the head timeout")
            .unwrap_or(0);
        assert_eq!(n, 0);
        assert!(start.elapsed() >= HEAD_TIMEOUT - Duration::from_millis(100));
    }

    #[tokio::test]
    async fn render_errors_are_500() {
        let (addr, _) = server(true).await;
        let resp = raw(addr, b"GET /metrics HTTP/1.1\r\n\r\n").await;
        assert_eq!(status(&resp), "HTTP/1.1 500 Internal Server Error");
        assert!(body(&resp).contains("kernel gone"));
    }
}
