//! The one lock guard. While it lives, the verifier forbids helper calls: critical sections do
//! plain loads and stores only.

use aya_ebpf::helpers::generated::{bpf_spin_lock, bpf_spin_unlock};
use cache_common::bpf_spin_lock as SpinLock;

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
