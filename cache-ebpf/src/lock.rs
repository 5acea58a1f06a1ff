//! Bucket locking. Writers hold the bucket's spin lock and keep its sequence odd while they
//! change it ([`WriteGuard`]); the hit path reads without the lock and checks the sequence
//! around its read ([`ReadWindow`]), a seqlock. Where loads may be reordered by the CPU
//! (anything but x86), the agent sets [`LOCKED_READS`] when it loads the object and readers
//! take the lock too ([`Guard`]).
//!
//! While a lock is held the verifier forbids helper calls: critical sections do plain loads
//! and stores only.

use aya_ebpf::helpers::generated::{bpf_spin_lock, bpf_spin_unlock};
use cache_common::bpf_spin_lock as SpinLock;

/// Set by the agent before loading (a read-only global, so the verifier sees a constant and
/// checks only the read path in use): 1 where the CPU may reorder loads.
#[unsafe(no_mangle)]
static LOCKED_READS: u8 = 0;

#[inline(always)]
pub fn locked_reads() -> bool {
    unsafe { core::ptr::read_volatile(&raw const LOCKED_READS) != 0 }
}

pub struct Guard {
    lock: *mut SpinLock,
}

impl Guard {
    #[inline(always)]
    pub fn lock(lock: *mut SpinLock) -> Self {
        unsafe { bpf_spin_lock(lock.cast()) };
        Guard { lock }
    }
}

impl Drop for Guard {
    #[inline(always)]
    fn drop(&mut self) {
        unsafe { bpf_spin_unlock(self.lock.cast()) };
    }
}

/// A writer's hold on a bucket: its lock, and its sequence odd until dropped.
pub struct WriteGuard {
    seq: *mut u32,
    _lock: Guard,
}

impl WriteGuard {
    #[inline(always)]
    pub fn lock(lock: *mut SpinLock, seq: *mut u32) -> Self {
        let guard = Guard::lock(lock);
        bump(seq);
        // The slot stores below must not be moved above the bump.
        compiler_barrier();
        WriteGuard { seq, _lock: guard }
    }
}

impl Drop for WriteGuard {
    #[inline(always)]
    fn drop(&mut self) {
        compiler_barrier();
        bump(self.seq);
    }
}

/// Keeps the compiler from moving memory accesses across this point (the BPF backend has no
/// `compiler_fence`; an empty asm block that may touch memory does the same).
#[inline(always)]
fn compiler_barrier() {
    unsafe { core::arch::asm!("", options(nostack, preserves_flags)) };
}

#[inline(always)]
fn bump(seq: *mut u32) {
    unsafe { core::ptr::write_volatile(seq, core::ptr::read_volatile(seq).wrapping_add(1)) };
}

/// A lock-free read of a bucket: open it, read, and [`ReadWindow::clean`] says whether no
/// write overlapped. x86 keeps loads in program order; the compiler fences keep the compiler
/// from moving the slot loads out of the window.
pub struct ReadWindow {
    seq: *const u32,
    opened_at: u32,
}

impl ReadWindow {
    /// None while a writer holds the bucket.
    #[inline(always)]
    pub fn open(seq: *const u32) -> Option<Self> {
        let opened_at = unsafe { core::ptr::read_volatile(seq) };
        compiler_barrier();
        if opened_at & 1 != 0 {
            return None;
        }
        Some(ReadWindow { seq, opened_at })
    }

    /// Whether the bucket was not written since [`ReadWindow::open`].
    #[inline(always)]
    pub fn clean(self) -> bool {
        compiler_barrier();
        unsafe { core::ptr::read_volatile(self.seq) == self.opened_at }
    }
}
