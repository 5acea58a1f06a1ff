//! systemd's notification protocol (`sd_notify`) without libsystemd: `KEY=VALUE` lines in one
//! datagram to the Unix socket named by `$NOTIFY_SOCKET` (a path, or an abstract name when it
//! starts with `@`). Outside systemd (no `$NOTIFY_SOCKET`) every function here does nothing.
//!
//! With `Type=notify` systemd waits for [`ready`] before it considers the agent started; with
//! `WatchdogSec=` it restarts the agent when [`watchdog_loop`] stops petting it (a wedged
//! runtime, since the loop runs on it).

use std::{
    ffi::OsStr,
    io,
    os::unix::{ffi::OsStrExt as _, net::UnixDatagram},
    time::Duration,
};

use tracing::{debug, warn};

/// Environment variable naming the socket.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";
/// Longest a notification may block when the receiver's queue is full (systemd busy): a
/// message is dropped rather than stalling the agent.
pub const SEND_TIMEOUT: Duration = Duration::from_millis(500);

/// Sends `state` (e.g. `READY=1`, or several `KEY=VALUE` lines) to systemd, if the agent runs
/// under it. Failures are logged, never fatal: the agent works the same without systemd. May
/// block for up to [`SEND_TIMEOUT`] if systemd does not keep up.
pub fn notify(state: &str) {
    let Some(socket) = std::env::var_os(NOTIFY_SOCKET) else {
        return;
    };
    match send(&socket, state) {
        Ok(()) => debug!(state, "notified systemd"),
        Err(e) => {
            warn!(state, socket = %socket.to_string_lossy(), error = %e, "could not notify systemd")
        }
    }
}

/// Startup is complete (programs attached, metrics served).
pub fn ready() {
    notify("READY=1");
}

/// Shutdown has begun (detaching).
pub fn stopping() {
    notify("STOPPING=1");
}

/// A one-line status `systemctl status` shows.
pub fn status(text: &str) {
    notify(&format!("STATUS={}", text.replace('\n', " ")));
}

/// Sends one notification datagram to `socket`: an absolute path, or `@name` for the abstract
/// namespace.
pub fn send(socket: &OsStr, state: &str) -> io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    sock.set_write_timeout(Some(SEND_TIMEOUT))?;
    let name = socket.as_bytes();
    let sent = match name.split_first() {
        Some((b'@', abstract_name)) => {
            use std::os::linux::net::SocketAddrExt as _;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)?;
            sock.send_to_addr(state.as_bytes(), &addr)?
        }
        Some((b'/', _)) => sock.send_to(state.as_bytes(), socket)?,
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "NOTIFY_SOCKET is neither an absolute path nor an abstract name (@...)",
            ));
        }
    };
    if sent != state.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "notification truncated",
        ));
    }
    Ok(())
}

/// How often to pet the watchdog given `$WATCHDOG_USEC` and `$WATCHDOG_PID` (half the timeout,
/// as sd_watchdog_enabled advises), or `None` when there is no watchdog for this process.
pub fn watchdog_interval(usec: Option<&str>, pid: Option<&str>, my_pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    if let Some(pid) = pid {
        // The watchdog is meant for another process (we were forked or exec'd by it).
        if pid.trim().parse::<u32>().ok()? != my_pid {
            return None;
        }
    }
    Some(Duration::from_micros(usec / 2).max(Duration::from_millis(1)))
}

/// Sends `WATCHDOG=1` every `$WATCHDOG_USEC / 2` forever. Returns at once when systemd set no
/// watchdog for this process (spawn it, do not `select!` on it).
pub async fn watchdog_loop() {
    let usec = std::env::var("WATCHDOG_USEC").ok();
    let pid = std::env::var("WATCHDOG_PID").ok();
    let Some(every) = watchdog_interval(usec.as_deref(), pid.as_deref(), std::process::id()) else {
        return;
    };
    if std::env::var_os(NOTIFY_SOCKET).is_none() {
        return;
    }
    debug!(
        every_ms = every.as_millis() as u64,
        "petting the systemd watchdog"
    );
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // The send may block (up to SEND_TIMEOUT): not on a runtime worker.
        let _ = tokio::task::spawn_blocking(|| notify("WATCHDOG=1")).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recv(sock: &UnixDatagram) -> String {
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 256];
        let n = sock.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn sends_to_a_path() {
        let dir = std::env::temp_dir().join(format!("notify-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let server = UnixDatagram::bind(&path).unwrap();
        send(path.as_os_str(), "READY=1\nSTATUS=serving").unwrap();
        assert_eq!(recv(&server), "READY=1\nSTATUS=serving");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn sends_to_an_abstract_name() {
        use std::os::linux::net::SocketAddrExt as _;
        let name = format!("cache-agent-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let server = UnixDatagram::bind_addr(&addr).unwrap();
        send(OsStr::new(&format!("@{name}")), "WATCHDOG=1").unwrap();
        assert_eq!(recv(&server), "WATCHDOG=1");
    }

    #[test]
    fn a_full_receiver_does_not_block_the_sender() {
        let dir = std::env::temp_dir().join(format!("notify-full-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let _server = UnixDatagram::bind(&path).unwrap(); // never reads
        let start = std::time::Instant::now();
        let mut failed = 0;
        for _ in 0..1000 {
            if send(path.as_os_str(), "WATCHDOG=1").is_err() {
                failed += 1;
            }
            if failed == 2 {
                break;
            }
        }
        assert_eq!(failed, 2, "the queue never filled");
        assert!(start.elapsed() < SEND_TIMEOUT * 4, "{:?}", start.elapsed());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn rejects_relative_and_empty_names() {
        assert_eq!(
            send(OsStr::new("relative.sock"), "READY=1")
                .unwrap_err()
                .kind(),
            io::ErrorKind::InvalidInput
        );
        assert_eq!(
            send(OsStr::new(""), "READY=1").unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        // Nobody listening: an error, not a panic.
        assert!(send(OsStr::new("/nonexistent/notify.sock"), "READY=1").is_err());
    }

    #[test]
    fn watchdog_interval_is_half_the_timeout_for_this_process() {
        assert_eq!(
            watchdog_interval(Some("30000000"), None, 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(
            watchdog_interval(Some("30000000"), Some("7"), 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(watchdog_interval(Some("30000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval(Some("soon"), None, 7), None);
        assert_eq!(watchdog_interval(None, Some("7"), 7), None);
    }
}
