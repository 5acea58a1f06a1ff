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

/// Copies `len` (8 to 64) bytes from the packet at `src` (frame end `end`) to `dst`, eight at
/// a time, the last eight ending exactly at `len`. False, having copied nothing useful, if the
/// bytes are not all inside the frame.
#[inline(always)]
pub unsafe fn copy_short(src: usize, end: usize, dst: *mut u8, len: usize) -> bool {
    if !(8..=64).contains(&len) {
        return false;
    }
    let mut k = 0;
    while k < 56 {
        if k + 8 > len {
            break;
        }
        let p = src + k;
        if p + 8 > end {
            return false;
        }
        unsafe { store_u64(dst.add(k), load_u64(p as *const u8)) };
        k += 8;
    }
    // The verifier rejects a packet pointer with a negative constant offset, which is what
    // `src + len - 8` would compile to: step back as one opaque amount instead, masked (exact
    // for 8 <= len <= 64) so the bound is on the register the verifier checks.
    let back = opaque(len - 8) & 0x3f;
    let p = src + back;
    if p + 8 > end {
        return false;
    }
    unsafe { store_u64(dst.add(back), load_u64(p as *const u8)) };
    true
}

/// Copies `len` (8 to 128) bytes from `src` into the packet at `dst` (frame end `end`), eight
/// at a time, the last eight ending exactly at `len`. False if they do not all fit the frame
/// (then part of them may have been written).
#[inline(always)]
pub unsafe fn copy_into_frame(dst: usize, end: usize, src: *const u8, len: usize) -> bool {
    if !(8..=128).contains(&len) {
        return false;
    }
    let mut k = 0;
    while k < 120 {
        if k + 8 > len {
            break;
        }
        let p = dst + opaque(k);
        if p + 8 > end {
            return false;
        }
        unsafe { store_u64(p as *mut u8, load_u64(src.add(k))) };
        k += 8;
    }
    // Masked: exact for 8 <= len <= 128, and a bound the verifier sees on this register.
    let back = opaque(len - 8) & 0x7f;
    let p = dst + back;
    if p + 8 > end {
        return false;
    }
    unsafe { store_u64(p as *mut u8, load_u64(src.add(back))) };
    true
}

#[inline(always)]
pub unsafe fn store_u64(p: *mut u8, v: u64) {
    unsafe {
        core::arch::asm!("*(u64 *)({p} + 0) = {v}", p = in(reg) p, v = in(reg) v, options(nostack, preserves_flags))
    };
}
