//! Prometheus metrics (placeholder: replaced by the full exporter).

use crate::kernel::Snapshot;

pub fn render(snap: &Snapshot) -> String {
    let mut out = String::new();
    for (k, v) in crate::stats::counters_by_name(snap) {
        out.push_str(&format!("memcache_accel_{k}_total {v}\n"));
    }
    out
}
