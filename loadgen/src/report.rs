//! Human output: the final table of a run, the per-step table of a sweep, and JSON files.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::error::LoadgenError;
use crate::runner::RunReport;
use crate::workload::LoadMode;

/// Formats a rate with a k/M suffix.
pub fn rate(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

/// Formats microseconds with a sensible unit.
pub fn micros(us: f64) -> String {
    if us >= 1e6 {
        format!("{:.2}s", us / 1e6)
    } else if us >= 1e3 {
        format!("{:.2}ms", us / 1e3)
    } else {
        format!("{us:.1}µs")
    }
}

/// The final table of one run.
pub fn table(r: &RunReport) -> String {
    let w = &r.workload;
    let c = &r.counters;
    let mut s = String::new();
    let load = match w.load.mode {
        LoadMode::Open => format!(
            "open loop, {:?} arrivals at {} req/s",
            w.load.arrivals,
            rate(w.load.rate)
        ),
        LoadMode::Closed => format!("closed loop, {} outstanding per socket", w.load.concurrency),
    };
    let _ = writeln!(
        s,
        "{}servers {}  transport {:?}  {}  workers {} x {} conns",
        r.label
            .as_deref()
            .map(|l| format!("[{l}] "))
            .unwrap_or_default(),
        r.servers.join(","),
        r.transport,
        load,
        r.workers,
        r.conns
    );
    let _ = writeln!(
        s,
        "keys {} ({}B keys, {}B values, {:?} θ={})  mix get/set/delete {}/{}/{}  width {}  measured {:.1}s",
        w.keyspace.keys,
        w.keyspace.key_size,
        w.keyspace.value_size,
        w.popularity.distribution,
        w.popularity.theta,
        w.mix.get,
        w.mix.set,
        w.mix.delete,
        w.mix.multiget_width,
        r.measured_seconds
    );
    if let Some(p) = &r.populate {
        let _ = writeln!(
            s,
            "populate: {} keys, {} stored, {} failed, {:.2}s",
            p.keys, p.stored, p.failed, p.seconds
        );
    }
    let _ = writeln!(s, "{:-<78}", "");
    let _ = writeln!(
        s,
        "{:<12}{:>12}{:>12}{:>12}{:>12}{:>12}",
        "throughput", "sent/s", "replies/s", "get keys/s", "hit ratio", "loss"
    );
    let _ = writeln!(
        s,
        "{:<12}{:>12}{:>12}{:>12}{:>12}{:>12}",
        "",
        rate(r.send_rps),
        rate(r.throughput_rps),
        rate(r.get_keys_per_second),
        r.hit_ratio
            .map(|h| format!("{:.2}%", h * 100.0))
            .unwrap_or_else(|| "-".into()),
        format!("{:.3}%", r.loss_ratio * 100.0)
    );
    let l = &r.latency;
    let _ = writeln!(
        s,
        "{:<12}{:>11}{:>11}{:>11}{:>11}{:>11}{:>11}",
        "latency", "mean", "p50", "p90", "p99", "p99.9", "max"
    );
    let _ = writeln!(
        s,
        "{:<12}{:>11}{:>11}{:>11}{:>11}{:>11}{:>11}",
        "",
        micros(l.mean_us),
        micros(l.p50_us),
        micros(l.p90_us),
        micros(l.p99_us),
        micros(l.p999_us),
        micros(l.max_us)
    );
    if let Some(lag) = &r.send_lag {
        let _ = writeln!(
            s,
            "{:<12}{:>11}{:>11}{:>11}{:>11}{:>11}{:>11}",
            "send lag",
            micros(lag.mean_us),
            micros(lag.p50_us),
            micros(lag.p90_us),
            micros(lag.p99_us),
            micros(lag.p999_us),
            micros(lag.max_us)
        );
    }
    let _ = writeln!(
        s,
        "counts: sent {} replies {} | get {} (keys {}, hits {}, misses {}) | set {} (stored {}) | \
         delete {} (deleted {}) | errors {} timeouts {} late {} dropped {}",
        c.sent,
        c.completed,
        c.get_requests,
        c.get_keys,
        c.get_hits,
        c.get_misses,
        c.set_requests,
        c.set_stored,
        c.delete_requests,
        c.delete_deleted,
        c.errors,
        c.timeouts,
        c.late_datagrams,
        c.dropped
    );
    let busy: Vec<String> = r
        .loadgen
        .worker_busy
        .iter()
        .map(|b| format!("{:.0}%", b * 100.0))
        .collect();
    let _ = writeln!(
        s,
        "loadgen: {:.2} cores ({:.2} CPU-s), worker busy {}",
        r.loadgen.cores,
        r.loadgen.cpu_seconds,
        busy.join(" ")
    );
    if let Some(sf) = &r.shortfall {
        let _ = writeln!(
            s,
            "SHORTFALL: sent {} req/s of {} target ({:.1}% short)",
            rate(sf.achieved_rps),
            rate(sf.target_rps),
            sf.short_by * 100.0
        );
    }
    for w in &r.warnings {
        let _ = writeln!(s, "warning: {w}");
    }
    s
}

/// Writes `value` as pretty JSON to `path`.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), LoadgenError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| LoadgenError::Output {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    std::fs::write(path, text).map_err(|e| LoadgenError::Output {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(rate(1_234_567.0), "1.23M");
        assert_eq!(rate(45_600.0), "45.6k");
        assert_eq!(rate(12.0), "12");
        assert_eq!(micros(12.34), "12.3µs");
        assert_eq!(micros(1500.0), "1.50ms");
    }
}
