//! Loads and stores at any byte address. Rust may only dereference aligned pointers, and the
//! BPF backend splits an unaligned access into single bytes (eight loads, shifts and ors for a
//! u64). The kernel accepts unaligned packet and map accesses on the machines that run this
//! (x86 and arm64 have efficient unaligned access), so these say what they mean in BPF
//! assembly, one instruction each.

#[inline(always)]
pub unsafe fn load_u64(p: *const u8) -> u64 {
    let v: u64;
    unsafe {
        core::arch::asm!("{v} = *(u64 *)({p} + 0)", p = in(reg) p, v = lateout(reg) v, options(readonly, nostack, preserves_flags))
    };
    v
}

#[inline(always)]
pub unsafe fn load_u32(p: *const u8) -> u32 {
    let v: u32;
    unsafe {
        core::arch::asm!("{v} = *(u32 *)({p} + 0)", p = in(reg) p, v = lateout(reg) v, options(readonly, nostack, preserves_flags))
    };
    v
}

#[inline(always)]
pub unsafe fn load_u16(p: *const u8) -> u16 {
    let v: u64;
    unsafe {
        core::arch::asm!("{v} = *(u16 *)({p} + 0)", p = in(reg) p, v = lateout(reg) v, options(readonly, nostack, preserves_flags))
    };
    v as u16
}

#[inline(always)]
pub unsafe fn store_u32(p: *mut u8, v: u32) {
    unsafe {
        core::arch::asm!("*(u32 *)({p} + 0) = {v}", p = in(reg) p, v = in(reg) v as u64, options(nostack, preserves_flags))
    };
}

#[inline(always)]
pub unsafe fn store_u16(p: *mut u8, v: u16) {
    unsafe {
        core::arch::asm!("*(u16 *)({p} + 0) = {v}", p = in(reg) p, v = in(reg) v as u64, options(nostack, preserves_flags))
    };
}

/// `x`, as a value the compiler knows nothing about, so it cannot rewrite the packet pointer
/// arithmetic around it into a form the verifier rejects (one `mov` instruction).
#[inline(always)]
fn opaque(mut x: usize) -> usize {
    unsafe {
        core::arch::asm!("{0} = {0}", inout(reg) x, options(pure, nomem, nostack, preserves_flags))
    };
    x
}

/// Copies `len` (8 to `MAX`) bytes between the packet at `frame_at` (frame end `end`) and
/// memory at `mem`: into the frame if `INTO_FRAME`, out of it otherwise. Eight bytes at a
/// time, the last eight ending exactly at `len`. False if the bytes are not all inside the
/// frame (then part of them may have been copied).
#[inline(always)]
pub unsafe fn copy_with_frame<const MAX: usize, const INTO_FRAME: bool>(
    frame_at: usize,
    end: usize,
    mem: *mut u8,
    len: usize,
) -> bool {
    const { assert!(MAX.is_power_of_two() && MAX >= 16) };
    if !(8..=MAX).contains(&len) {
        return false;
    }
    // One word at `off`; the bounds check is on the pointer that is dereferenced.
    let word = |off: usize| {
        let p = frame_at + off;
        if p + 8 > end {
            return false;
        }
        unsafe {
            if INTO_FRAME {
                store_u64(p as *mut u8, load_u64(mem.add(off)));
            } else {
                store_u64(mem.add(off), load_u64(p as *const u8));
            }
        }
        true
    };
    let mut k = 0;
    while k < MAX - 8 {
        if k + 8 > len {
            break;
        }
        if !word(opaque(k)) {
            return false;
        }
        k += 8;
    }
    // The verifier rejects a packet pointer with a negative constant offset, which is what
    // `frame_at + len - 8` would compile to: step back as one opaque amount instead, masked
    // (exact for 8 <= len <= MAX) so the bound is on the register the verifier checks.
    word(opaque(len - 8) & (MAX - 1))
}

#[inline(always)]
pub unsafe fn store_u64(p: *mut u8, v: u64) {
    unsafe {
        core::arch::asm!("*(u64 *)({p} + 0) = {v}", p = in(reg) p, v = in(reg) v, options(nostack, preserves_flags))
    };
}
