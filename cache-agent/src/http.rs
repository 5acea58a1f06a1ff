//! The /metrics endpoint (minimal: replaced by the full exporter).

use std::{net::SocketAddr, sync::Arc};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};
use tracing::{info, warn};

use crate::coherence::Shared;

pub async fn serve(addr: SocketAddr, shared: Arc<Shared>) {
    let listener = match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            warn!(%addr, error = %e, "metrics endpoint not available");
            return;
        }
    };
    info!(%addr, "metrics on /metrics");
    loop {
        let Ok((mut sock, _)) = listener.accept().await else { continue };
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let _ = sock.read(&mut buf).await;
            let body = {
                let ebpf = shared.ebpf.lock().expect("ebpf lock");
                crate::kernel::snapshot(&ebpf).map(|s| crate::metrics::render(&s)).unwrap_or_default()
            };
            let resp = format!("HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}", body.len(), body);
            let _ = sock.write_all(resp.as_bytes()).await;
        });
    }
}
