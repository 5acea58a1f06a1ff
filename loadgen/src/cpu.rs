//! CPU placement and accounting: pinning worker threads, the load generator's own CPU time, and
//! the server-side CPU estimate used by compare mode (a process's utime+stime from
//! `/proc/PID/stat`, and the machine-wide softirq time from `/proc/stat`).

use std::io;

/// CPUs this process may run on, in order.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity writes at most size_of::<cpu_set_t>().
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return (0..num_cpus()).collect();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

/// Number of online CPUs.
pub fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Pins the calling thread to one CPU.
pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
    // SAFETY: as above; the set is built locally and passed by pointer with its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid, writable timespec.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CPU time used by the calling thread, in nanoseconds.
pub fn thread_cpu_ns() -> u64 {
    clock_ns(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// CPU time used by this process (all threads), in nanoseconds.
pub fn process_cpu_ns() -> u64 {
    clock_ns(libc::CLOCK_PROCESS_CPUTIME_ID)
}

fn ticks_to_ns(ticks: u64) -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    ticks * (1_000_000_000 / hz)
}

/// utime + stime of process `pid` (all its threads), in nanoseconds, from `/proc/PID/stat`.
pub fn pid_cpu_ns(pid: u32) -> io::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_pid_stat_ticks(&text)
        .map(ticks_to_ns)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unexpected /proc/PID/stat"))
}

/// utime + stime ticks from the text of `/proc/PID/stat` (fields 14 and 15; the command name in
/// parentheses may contain spaces, so fields are counted after the last `)`).
pub fn parse_pid_stat_ticks(text: &str) -> Option<u64> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut f = rest.split_whitespace();
    // rest starts at field 3 (state); utime is field 14 → index 11.
    let utime: u64 = f.nth(11)?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Machine-wide softirq time (all CPUs), in nanoseconds, from the `cpu` line of `/proc/stat`.
pub fn softirq_ns() -> io::Result<u64> {
    let text = std::fs::read_to_string("/proc/stat")?;
    parse_proc_stat_softirq(&text)
        .map(ticks_to_ns)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unexpected /proc/stat"))
}

/// The softirq column (7th value) of the aggregate `cpu` line.
pub fn parse_proc_stat_softirq(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    line.split_whitespace().nth(7)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        let stat = "1234 (mem cached) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 4 0 100";
        assert_eq!(parse_pid_stat_ticks(stat), Some(300));
        let pstat = "cpu  100 2 300 4000 50 6 77 0 0 0\ncpu0 1 2 3 4 5 6 7 0 0 0\n";
        assert_eq!(parse_proc_stat_softirq(pstat), Some(77));
    }

    #[test]
    fn reads_own_cpu() {
        let me = std::process::id();
        pid_cpu_ns(me).unwrap();
        softirq_ns().unwrap();
        let a = thread_cpu_ns();
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        std::hint::black_box(x);
        assert!(thread_cpu_ns() > a);
        assert!(!allowed_cpus().is_empty());
    }
}
