//! Live progress on stderr (indicatif), drawn only when stderr is a terminal: phase, elapsed
//! time, current send and reply rates, and failures so far.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::schedule::Clock;
use crate::stats::Live;

/// Refresh period.
const TICK: Duration = Duration::from_millis(250);

/// Starts the progress thread; it exits when `done` is set. Returns `Err` only if the thread
/// could not be spawned; when stderr is not a terminal the thread exits at once.
pub fn spawn(
    lives: Vec<Arc<Live>>,
    clock: Clock,
    start_ns: u64,
    window_start_ns: u64,
    window_end_ns: u64,
    done: Arc<AtomicBool>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("lg-progress".into())
        .spawn(move || {
            if !std::io::stderr().is_terminal() {
                return;
            }
            let total_ms = (window_end_ns - start_ns) / 1_000_000;
            let bar = ProgressBar::with_draw_target(Some(total_ms), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("{prefix:>8} [{bar:30}] {elapsed:>4} {msg}")
                    .expect("static template")
                    .progress_chars("=> "),
            );
            let sum = |f: fn(&Live) -> u64| lives.iter().map(|l| f(l)).sum::<u64>();
            let (mut last_sent, mut last_done, mut last_t) = (0u64, 0u64, clock.now_ns());
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(TICK);
                let now = clock.now_ns();
                let sent = sum(|l| l.sent.load(Ordering::Relaxed));
                let completed = sum(|l| l.completed.load(Ordering::Relaxed));
                let failed = sum(|l| l.failed.load(Ordering::Relaxed));
                let dt = (now - last_t).max(1) as f64 / 1e9;
                let phase = if now < window_start_ns {
                    "warm-up"
                } else if now < window_end_ns {
                    "measure"
                } else {
                    "drain"
                };
                bar.set_prefix(phase);
                bar.set_position(
                    now.saturating_sub(start_ns).min(window_end_ns - start_ns) / 1_000_000,
                );
                bar.set_message(format!(
                    "sent {:>9.0}/s  replies {:>9.0}/s  failed {failed}",
                    (sent - last_sent) as f64 / dt,
                    (completed - last_done) as f64 / dt,
                ));
                (last_sent, last_done, last_t) = (sent, completed, now);
            }
            bar.finish_and_clear();
        })
}
