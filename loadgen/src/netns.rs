//! Joining a network namespace: the calling thread `setns`es into `/run/netns/NAME` (as made by
//! `ip netns add`); threads it spawns afterwards inherit the namespace. Used by `--netns` and by
//! the testbed's `in_client` / `in_server`.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

/// The bind-mount path of a named namespace (a value containing `/` is taken as a path).
pub fn netns_path(name: &str) -> PathBuf {
    if name.contains('/') {
        PathBuf::from(name)
    } else {
        PathBuf::from("/run/netns").join(name)
    }
}

/// Moves the calling thread into network namespace `name`.
pub fn enter(name: &str) -> io::Result<()> {
    let file = File::open(netns_path(name))?;
    // SAFETY: the fd is valid for the duration of the call; setns only affects this thread.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `f` on a new thread inside namespace `name`; a panic in `f` is propagated.
pub fn run_in<R: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> R + Send + 'static,
) -> io::Result<R> {
    let name = name.to_owned();
    let handle = std::thread::Builder::new()
        .name(format!("netns-{name}"))
        .spawn(move || enter(&name).map(|()| f()))?;
    match handle.join() {
        Ok(r) => r,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}
