//! `cache-agent stats` and `status`: what a running agent's pinned maps say.

use std::collections::BTreeMap;

use cache_common::{COUNTER_NAMES, flags};

use crate::kernel::{Snapshot, coarse_now_ns};

pub fn counters_by_name(snap: &Snapshot) -> BTreeMap<&'static str, u64> {
    COUNTER_NAMES
        .iter()
        .copied()
        .zip(snap.counters.iter().copied())
        .collect()
}

/// Share of requested keys answered by the kernel.
pub fn hit_ratio(snap: &Snapshot) -> f64 {
    let m = counters_by_name(snap);
    let keys = m["get_keys"];
    if keys == 0 {
        0.0
    } else {
        m["hit_keys"] as f64 / keys as f64
    }
}

pub fn to_json(snap: &Snapshot) -> serde_json::Value {
    let mut obj = serde_json::Map::new();
    for (k, v) in counters_by_name(snap) {
        obj.insert(k.into(), v.into());
    }
    obj.insert("serving".into(), serving(snap).into());
    obj.insert("agent_epoch".into(), snap.config.agent_epoch.into());
    obj.insert("kernel_epoch".into(), snap.state.kernel_epoch.into());
    obj.insert("hit_ratio".into(), hit_ratio(snap).into());
    serde_json::Value::Object(obj)
}

pub fn serving(snap: &Snapshot) -> bool {
    snap.config.flags & flags::SERVE != 0 && snap.config.lease_until_ns > coarse_now_ns()
}

pub fn to_text(snap: &Snapshot) -> String {
    let mut out = String::new();
    for (k, v) in counters_by_name(snap) {
        out.push_str(&format!("{k:<30} {v}\n"));
    }
    out.push_str(&format!("{:<30} {:.4}\n", "hit_ratio", hit_ratio(snap)));
    out.push_str(&format!("{:<30} {}\n", "serving", serving(snap)));
    out
}
