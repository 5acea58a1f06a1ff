//! Orderly stop on SIGINT / SIGTERM. A command that starts testbed processes calls [`install`] before it
//! starts any thread: SIGINT and SIGTERM are blocked in every thread (the mask is inherited) and
//! one thread takes them with `sigwait`, only recording which signal came. The run notices at its
//! next check (worker loops stop sending, readiness waits give up, compare stops between arms),
//! unwinds with [`LoadgenError::Interrupted`], and the testbed's normal teardown runs on the way
//! out. `main` then exits with 128 + the signal number.
//!
//! A blocked signal stays blocked across `fork` and `exec`, so children must be started through
//! [`prepare_child`], or memcached and the agent would ignore the SIGTERM of the teardown.

use std::os::unix::process::CommandExt as _;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use crate::error::LoadgenError;

/// The first stop signal received (0 = none).
static RECEIVED: AtomicI32 = AtomicI32::new(0);
/// Set by [`install`]: this process turns stop signals into an orderly teardown.
static INSTALLED: AtomicBool = AtomicBool::new(false);

fn stop_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        set
    }
}

/// Blocks SIGINT and SIGTERM in the calling thread (and so in every thread it spawns later) and
/// starts the thread that receives them. Call from `main` before any other thread exists.
pub fn install() -> std::io::Result<()> {
    let set = stop_signals();
    // SAFETY: `set` is a valid sigset_t; the old mask is not needed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    std::thread::Builder::new()
        .name("lg-signals".into())
        .spawn(move || {
            loop {
                let mut sig: libc::c_int = 0;
                // SAFETY: `set` and `sig` are valid for the call.
                if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                    continue;
                }
                if RECEIVED
                    .compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
                {
                    eprintln!(
                        "loadgen: {} received: stopping the run and tearing down the testbed \
                         (SIGKILL abandons it; then `loadgen testbed down --name NAME`)",
                        signal_name(sig)
                    );
                } else {
                    eprintln!("loadgen: {} received: still tearing down", signal_name(sig));
                }
            }
        })?;
    INSTALLED.store(true, Ordering::SeqCst);
    Ok(())
}

/// True once [`install`] ran (children are then shielded from the terminal's Ctrl-C, see
/// [`crate::testbed`]).
pub fn installed() -> bool {
    INSTALLED.load(Ordering::Relaxed)
}

/// Readies a child command once [`install`] ran: unblocks SIGINT and SIGTERM in the child (the
/// blocked mask would survive `exec`) and gives it a process group of its own, so that a
/// terminal's Ctrl-C reaches only loadgen, which then stops the children in order (the agent
/// first, so it detaches cleanly) instead of all of them dying at once. No-op otherwise.
pub fn prepare_child(cmd: &mut Command) {
    if !installed() {
        return;
    }
    let set = stop_signals();
    // SAFETY: the closure runs between fork and exec and only calls sigprocmask (async-signal
    // safe) on a set built beforehand.
    unsafe {
        cmd.pre_exec(move || {
            if libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.process_group(0);
}

/// The stop signal received so far, if any.
pub fn received() -> Option<i32> {
    match RECEIVED.load(Ordering::Relaxed) {
        0 => None,
        sig => Some(sig),
    }
}

/// `Err(Interrupted)` once a stop signal came: the `?`-able check between steps of a run.
pub fn check() -> Result<(), LoadgenError> {
    match received() {
        Some(signal) => Err(LoadgenError::Interrupted { signal }),
        None => Ok(()),
    }
}

/// Exit status for a run ended by `sig`: 128 + the signal number, as a shell reports it.
pub fn exit_status(sig: i32) -> u8 {
    (128 + sig).clamp(0, 255) as u8
}

/// "SIGINT", "SIGTERM" or "signal N".
pub fn signal_name(sig: i32) -> String {
    match sig {
        libc::SIGINT => "SIGINT".into(),
        libc::SIGTERM => "SIGTERM".into(),
        other => format!("signal {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_status_is_128_plus_signal() {
        assert_eq!(exit_status(libc::SIGINT), 130);
        assert_eq!(exit_status(libc::SIGTERM), 143);
        assert_eq!(signal_name(libc::SIGTERM), "SIGTERM");
    }
}
