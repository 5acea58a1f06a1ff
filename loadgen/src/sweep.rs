//! Rate sweep: open-loop steps at increasing target rates until the server stops keeping up;
//! the saturation point is the highest rate whose step still met every criterion (replies within
//! 5 % of the target, loss at most `max_loss`, p99 within the SLO if one is given). A step where
//! the generator itself fell short of the target stops the sweep as inconclusive.

use std::time::Duration;

use serde::Serialize;

use crate::error::LoadgenError;
use crate::report::{micros, rate};
use crate::runner::{self, RunConfig, RunReport};
use crate::units::HumanDuration;
use crate::workload::LoadMode;

/// Consecutive failing steps after which the sweep stops.
pub const FAILURES_TO_STOP: usize = 2;

/// What to sweep.
#[derive(Clone, Debug)]
pub struct SweepConfig {
    /// Base run (workload, servers, transport); its load mode and rate are overridden.
    pub base: RunConfig,
    /// Target rates in order.
    pub rates: Vec<f64>,
    /// Warm-up of each step.
    pub warmup: Duration,
    /// Measured time of each step.
    pub step: Duration,
    /// Optional p99 latency objective.
    pub slo_p99: Option<Duration>,
    /// Highest acceptable loss ratio.
    pub max_loss: f64,
}

/// One step's outcome.
#[derive(Clone, Debug, Serialize)]
pub struct SweepStep {
    /// Target rate.
    pub target_rps: f64,
    /// Replies per second.
    pub throughput_rps: f64,
    /// p50 latency, µs.
    pub p50_us: f64,
    /// p99 latency, µs.
    pub p99_us: f64,
    /// Loss ratio.
    pub loss_ratio: f64,
    /// Met every criterion.
    pub ok: bool,
    /// Why not.
    pub reason: Option<String>,
    /// The full report.
    pub report: RunReport,
}

/// Sweep result.
#[derive(Clone, Debug, Serialize)]
pub struct SweepReport {
    /// Steps run.
    pub steps: Vec<SweepStep>,
    /// Highest target rate that passed.
    pub saturation_rps: Option<f64>,
    /// Highest throughput seen in any step.
    pub max_throughput_rps: f64,
    /// True if a step was limited by the generator, not the server.
    pub generator_bound: bool,
}

/// `start, start·factor, …` up to `max` (at most 40 steps).
pub fn geometric_rates(start: f64, factor: f64, max: f64) -> Vec<f64> {
    let mut v = Vec::new();
    let mut r = start;
    while r <= max * 1.0001 && v.len() < 40 {
        v.push(r.round());
        r *= factor.max(1.01);
    }
    v
}

/// Runs the sweep.
pub fn run(cfg: &SweepConfig) -> Result<SweepReport, LoadgenError> {
    let mut steps = Vec::new();
    let mut failures = 0;
    let mut generator_bound = false;
    for (i, &target) in cfg.rates.iter().enumerate() {
        let mut rc = cfg.base.clone();
        rc.workload.load.mode = LoadMode::Open;
        rc.workload.load.rate = target;
        rc.workload.phases.populate = i == 0 && cfg.base.workload.phases.populate;
        rc.workload.phases.warmup = HumanDuration(cfg.warmup);
        rc.workload.phases.duration = HumanDuration(cfg.step);
        rc.label = Some(format!("sweep {}", rate(target)));
        let report = runner::run(&rc)?.report;
        if i == 0 {
            // Nothing answered at the lowest rate: the server is unreachable, not saturated.
            runner::require_replies(&rc, &report)?;
        }
        let mut reasons = Vec::new();
        if report.shortfall.is_some() {
            reasons.push("generator fell short of the target".to_owned());
            generator_bound = true;
        }
        if report.throughput_rps < target * (1.0 - runner::SHORTFALL_TOLERANCE) {
            reasons.push(format!("replies {} < target", rate(report.throughput_rps)));
        }
        if report.loss_ratio > cfg.max_loss {
            reasons.push(format!("loss {:.2}%", report.loss_ratio * 100.0));
        }
        if let Some(slo) = cfg.slo_p99
            && report.latency.p99_us > slo.as_secs_f64() * 1e6
        {
            reasons.push(format!("p99 {} > SLO", micros(report.latency.p99_us)));
        }
        let ok = reasons.is_empty();
        tracing::info!(
            target_rps = target,
            throughput = report.throughput_rps,
            p99_us = report.latency.p99_us,
            ok,
            "sweep step"
        );
        steps.push(SweepStep {
            target_rps: target,
            throughput_rps: report.throughput_rps,
            p50_us: report.latency.p50_us,
            p99_us: report.latency.p99_us,
            loss_ratio: report.loss_ratio,
            ok,
            reason: (!ok).then(|| reasons.join("; ")),
            report,
        });
        if generator_bound {
            break;
        }
        failures = if ok { 0 } else { failures + 1 };
        if failures >= FAILURES_TO_STOP {
            break;
        }
    }
    let saturation_rps = steps
        .iter()
        .filter(|s| s.ok)
        .map(|s| s.target_rps)
        .fold(None, |m: Option<f64>, r| Some(m.map_or(r, |m| m.max(r))));
    let max_throughput_rps = steps.iter().map(|s| s.throughput_rps).fold(0.0, f64::max);
    Ok(SweepReport {
        steps,
        saturation_rps,
        max_throughput_rps,
        generator_bound,
    })
}

/// The sweep table.
pub fn table(r: &SweepReport) -> String {
    let mut s = format!(
        "{:>10} {:>10} {:>10} {:>10} {:>8}  {}\n",
        "target", "replies/s", "p50", "p99", "loss", "verdict"
    );
    for st in &r.steps {
        s.push_str(&format!(
            "{:>10} {:>10} {:>10} {:>10} {:>7.2}%  {}\n",
            rate(st.target_rps),
            rate(st.throughput_rps),
            micros(st.p50_us),
            micros(st.p99_us),
            st.loss_ratio * 100.0,
            st.reason.as_deref().unwrap_or("ok")
        ));
    }
    match r.saturation_rps {
        Some(sat) => s.push_str(&format!(
            "saturation: about {} req/s (highest passing step); max throughput seen {} req/s\n",
            rate(sat),
            rate(r.max_throughput_rps)
        )),
        None => s.push_str("saturation: below the first step\n"),
    }
    if r.generator_bound {
        s.push_str(
            "note: the generator could not send at a step's target; the server's saturation point \
             may be higher (add --workers)\n",
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometric() {
        assert_eq!(
            geometric_rates(1000.0, 2.0, 10_000.0),
            vec![1000.0, 2000.0, 4000.0, 8000.0]
        );
        assert_eq!(geometric_rates(1.0, 1.0, 1e12).len(), 40);
    }
}
