//! Compare mode: the same workload against memcached on a veth testbed with the accelerator
//! detached ("plain") and attached ("accel"), optionally also against the zero-work XDP
//! reflector, interleaved round by round (plain, accel, [reflector], plain, accel, …) so drift
//! affects every arm alike. Prints per-arm throughput, p50, p99, server CPU per request and the
//! share of GET keys answered by the kernel, and the ratios to plain. An accelerated round starts
//! once the agent reports `"serving": true` (at most 15 s), then warms up the in-kernel cache.
//!
//! Server CPU per request = (memcached's utime+stime from `/proc/PID/stat` + machine-wide
//! softirq time from `/proc/stat`) over a round / replies in that round. On a single-host veth
//! testbed the softirq part also contains the client's packet processing, so it is an upper
//! bound on the server's share; compare arms with each other, not with other machines.

use std::time::Duration;

use serde::Serialize;

use crate::error::LoadgenError;
use crate::report::{micros, rate};
use crate::runner::{self, RunConfig};
use crate::stats::{Counters, LatencySummary, Recorder, cdf_points};
use crate::testbed::{Testbed, TestbedConfig};
use crate::units::HumanDuration;
use crate::{cpu, interrupt};

/// One configuration of the server side.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Arm {
    /// memcached alone.
    Plain,
    /// memcached with the cache agent attached.
    Accel,
    /// The zero-work XDP reflector (an upper bound for any XDP fast path).
    Reflector,
}

impl Arm {
    /// Display name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Plain => "plain",
            Self::Accel => "accel",
            Self::Reflector => "reflector",
        }
    }
}

/// Which testbed to use.
#[derive(Clone, Debug)]
pub enum TestbedChoice {
    /// Build one for this run (and remove it afterwards unless kept).
    New(TestbedConfig),
    /// Use one made by `loadgen testbed up`.
    Existing(String),
}

/// What to compare.
#[derive(Clone, Debug)]
pub struct CompareConfig {
    /// Workload, transport, workers…; `servers` is replaced by the testbed's memcached.
    pub base: RunConfig,
    /// Rounds (each runs every arm once).
    pub rounds: usize,
    /// Warm-up of each arm's run (lets the in-kernel cache fill).
    pub warmup: Duration,
    /// Measured time of each arm's run.
    pub round: Duration,
    /// Also run the reflector arm.
    pub reflector: bool,
    /// Extra `cache-agent run` arguments.
    pub agent_args: Vec<String>,
    /// Testbed.
    pub testbed: TestbedChoice,
    /// Keep a newly built testbed running afterwards.
    pub keep_testbed: bool,
}

/// One arm's run in one round.
#[derive(Clone, Debug, Serialize)]
pub struct RoundRecord {
    /// Round index.
    pub round: usize,
    /// Arm.
    pub arm: Arm,
    /// Replies per second.
    pub throughput_rps: f64,
    /// p50, µs.
    pub p50_us: f64,
    /// p99, µs.
    pub p99_us: f64,
    /// memcached CPU over the run, seconds.
    pub memcached_cpu_s: f64,
    /// Machine-wide softirq CPU over the run, seconds.
    pub softirq_cpu_s: f64,
    /// Replies over the whole run (warm-up included), the denominator of CPU per request.
    pub replies: u64,
    /// Kernel-answered GET keys / GET keys seen by the agent, if its stats were readable.
    pub kernel_share: Option<f64>,
}

/// Aggregate of one arm.
#[derive(Clone, Debug, Serialize)]
pub struct ArmSummary {
    /// Arm.
    pub arm: Arm,
    /// Rounds that ran.
    pub rounds: usize,
    /// Why the arm could not run, if it could not.
    pub error: Option<String>,
    /// Replies per second over all its rounds.
    pub throughput_rps: Option<f64>,
    /// Latency over all its rounds.
    pub latency: Option<LatencySummary>,
    /// Server CPU per reply, µs.
    pub server_cpu_us_per_req: Option<f64>,
    /// Share of GET keys answered in the kernel.
    pub kernel_share: Option<f64>,
    /// Summed counters.
    pub counters: Counters,
    /// Latency CDF.
    pub cdf: Vec<(f64, f64)>,
}

/// Ratios of an arm to plain.
#[derive(Clone, Debug, Serialize)]
pub struct Ratios {
    /// The arm.
    pub arm: Arm,
    /// Throughput ratio.
    pub throughput: Option<f64>,
    /// p50 ratio.
    pub p50: Option<f64>,
    /// p99 ratio.
    pub p99: Option<f64>,
    /// Server CPU per request ratio.
    pub cpu_per_req: Option<f64>,
}

/// Compare result.
#[derive(Clone, Debug, Serialize)]
pub struct CompareReport {
    /// Per arm.
    pub arms: Vec<ArmSummary>,
    /// Per arm and round.
    pub rounds: Vec<RoundRecord>,
    /// Arms relative to plain.
    pub ratios: Vec<Ratios>,
    /// What the CPU figure measures.
    pub cpu_note: String,
    /// memcached's address in the testbed.
    pub server: String,
}

struct ArmState {
    arm: Arm,
    error: Option<String>,
    rec: Option<Recorder>,
    measured_s: f64,
    cpu_ns: u64,
    replies: u64,
    kernel_hits: u64,
    kernel_gets: u64,
    stats_ok: bool,
    rounds: usize,
}

/// Reads `(hit_keys, get_keys)` from `cache-agent stats --json`.
pub fn parse_agent_stats(json: &str) -> Option<(u64, u64)> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    let find = |k: &str| -> Option<u64> {
        v.get(k)
            .or_else(|| v.get("counters").and_then(|c| c.get(k)))
            .and_then(|x| x.as_u64())
    };
    Some((find("hit_keys")?, find("get_keys")?))
}

/// Longest wait for a freshly started agent to report `"serving": true`.
const SERVING_TIMEOUT: Duration = Duration::from_secs(15);

/// Waits until `cache-agent stats --json` says `"serving": true` (agents that do not report the
/// field are taken as serving at once).
fn wait_serving(tb: &Testbed) {
    let start = std::time::Instant::now();
    while start.elapsed() < SERVING_TIMEOUT {
        if interrupt::received().is_some() {
            return;
        }
        let out = tb.agent_cmd(&["stats", "--json", "--iface", tb.server_iface()]);
        let serving = out
            .ok()
            .and_then(|o| serde_json::from_str::<serde_json::Value>(&o).ok())
            .map(|v| v.get("serving").is_none_or(|s| s.as_bool() == Some(true)));
        if serving == Some(true) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    tracing::warn!(waited = ?SERVING_TIMEOUT, "agent did not report serving; measuring anyway");
}

fn agent_stats(tb: &Testbed) -> Option<(u64, u64)> {
    match tb.agent_cmd(&["stats", "--json", "--iface", tb.server_iface()]) {
        Ok(out) => parse_agent_stats(&out),
        Err(e) => {
            tracing::warn!(error = %e, "agent stats unavailable");
            None
        }
    }
}

fn server_cpu_ns(tb: &Testbed) -> (u64, u64) {
    let mc = cpu::pid_cpu_ns(tb.memcached_pid()).unwrap_or(0);
    let si = cpu::softirq_ns().unwrap_or(0);
    (mc, si)
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

/// Runs the comparison.
pub fn run(cfg: &CompareConfig) -> Result<CompareReport, LoadgenError> {
    let mut tb = match &cfg.testbed {
        TestbedChoice::New(tc) => Testbed::up(tc.clone())?,
        TestbedChoice::Existing(name) => Testbed::open(name)?,
    };
    if tb.memcached_pid() == 0 {
        tb.start_memcached()?;
    }
    let result = run_on(cfg, &mut tb);
    tb.stop_agent();
    tb.stop_reflector();
    // A failed run keeps the testbed's logs (and says where); an interrupted one was not a
    // failure of the testbed.
    let failed = match &result {
        Ok(r) => !r.failures().is_empty(),
        Err(LoadgenError::Interrupted { .. }) => false,
        Err(_) => true,
    };
    if failed {
        tb.keep_logs();
    }
    if cfg.keep_testbed && matches!(cfg.testbed, TestbedChoice::New(_)) {
        tb.persist();
    }
    result
}

fn run_on(cfg: &CompareConfig, tb: &mut Testbed) -> Result<CompareReport, LoadgenError> {
    let mut base = cfg.base.clone();
    base.servers = vec![tb.memcached_addr()];
    if base.workload.phases.populate {
        let pc = base.clone();
        let p = tb.in_client(move || runner::populate(&pc))?;
        tracing::info!(keys = p.keys, stored = p.stored, "populated memcached");
    }
    base.workload.phases.populate = false;
    base.workload.phases.warmup = HumanDuration(cfg.warmup);
    base.workload.phases.duration = HumanDuration(cfg.round);
    base.progress = false;

    let mut arms: Vec<ArmState> = [Arm::Plain, Arm::Accel]
        .into_iter()
        .chain(cfg.reflector.then_some(Arm::Reflector))
        .map(|arm| ArmState {
            arm,
            error: None,
            rec: None,
            measured_s: 0.0,
            cpu_ns: 0,
            replies: 0,
            kernel_hits: 0,
            kernel_gets: 0,
            stats_ok: true,
            rounds: 0,
        })
        .collect();
    let agent_args: Vec<&str> = cfg.agent_args.iter().map(String::as_str).collect();
    let mut rounds = Vec::new();
    for round in 0..cfg.rounds.max(1) {
        for st in arms.iter_mut() {
            interrupt::check()?;
            if st.error.is_some() {
                continue;
            }
            // Set up the arm.
            tb.stop_agent();
            tb.stop_reflector();
            let setup = match st.arm {
                Arm::Plain => Ok(()),
                Arm::Accel => tb.start_agent(&agent_args).inspect(|()| wait_serving(tb)),
                Arm::Reflector => tb.start_reflector(),
            };
            if let Err(e) = setup {
                // Not the arm's fault: the run is being stopped.
                interrupt::check()?;
                tracing::warn!(arm = st.arm.name(), error = %e, "arm unavailable");
                st.error = Some(e.to_string());
                continue;
            }
            let stats_before = (st.arm == Arm::Accel).then(|| agent_stats(tb)).flatten();
            let (mc0, si0) = server_cpu_ns(tb);
            let mut rc = base.clone();
            rc.label = Some(format!("{} round {}", st.arm.name(), round + 1));
            rc.workload.seed = base.workload.seed.wrapping_add(round as u64);
            let res = tb.in_client(move || runner::run(&rc))?;
            let (mc1, si1) = server_cpu_ns(tb);
            let stats_after = (st.arm == Arm::Accel).then(|| agent_stats(tb)).flatten();
            let mut kernel_share = None;
            match (stats_before, stats_after) {
                (Some((h0, g0)), Some((h1, g1))) if st.arm == Arm::Accel => {
                    st.kernel_hits += h1.saturating_sub(h0);
                    st.kernel_gets += g1.saturating_sub(g0);
                    if g1 > g0 {
                        kernel_share = Some(h1.saturating_sub(h0) as f64 / (g1 - g0) as f64);
                    }
                }
                _ => st.stats_ok = false,
            }
            let replies: u64 = res.recorder.timeline.iter().map(|b| b.completed).sum();
            let cpu_ns = mc1.saturating_sub(mc0) + si1.saturating_sub(si0);
            let r = &res.report;
            println!(
                "round {} {:<9} {:>9} req/s  p50 {:>9}  p99 {:>9}  server CPU/req {}  kernel share {}",
                round + 1,
                st.arm.name(),
                rate(r.throughput_rps),
                micros(r.latency.p50_us),
                micros(r.latency.p99_us),
                if replies > 0 {
                    micros(cpu_ns as f64 / 1e3 / replies as f64)
                } else {
                    "n/a".into()
                },
                kernel_share.map_or("n/a".to_owned(), |s| format!("{:.1}%", s * 100.0)),
            );
            for w in &r.warnings {
                println!("  warning: {w}");
            }
            rounds.push(RoundRecord {
                round,
                arm: st.arm,
                throughput_rps: r.throughput_rps,
                p50_us: r.latency.p50_us,
                p99_us: r.latency.p99_us,
                memcached_cpu_s: mc1.saturating_sub(mc0) as f64 / 1e9,
                softirq_cpu_s: si1.saturating_sub(si0) as f64 / 1e9,
                replies,
                kernel_share,
            });
            st.cpu_ns += cpu_ns;
            st.replies += replies;
            st.measured_s += r.measured_seconds;
            st.rounds += 1;
            match &mut st.rec {
                Some(m) => m.merge(&res.recorder),
                None => st.rec = Some(res.recorder),
            }
            if st.arm == Arm::Accel {
                tb.stop_agent();
            }
            if st.arm == Arm::Reflector {
                tb.stop_reflector();
            }
        }
    }

    let summaries: Vec<ArmSummary> = arms
        .iter()
        .map(|st| {
            let counters = st.rec.as_ref().map(|r| r.counters).unwrap_or_default();
            ArmSummary {
                arm: st.arm,
                rounds: st.rounds,
                error: st.error.clone(),
                throughput_rps: (st.rounds > 0)
                    .then(|| counters.completed as f64 / st.measured_s.max(1e-9)),
                latency: st
                    .rec
                    .as_ref()
                    .map(|r| LatencySummary::from_histogram(&r.latency)),
                server_cpu_us_per_req: (st.replies > 0)
                    .then(|| st.cpu_ns as f64 / 1e3 / st.replies as f64),
                kernel_share: (st.arm == Arm::Accel
                    && st.rounds > 0
                    && st.stats_ok
                    && st.kernel_gets > 0)
                    .then(|| st.kernel_hits as f64 / st.kernel_gets as f64),
                counters,
                cdf: st
                    .rec
                    .as_ref()
                    .map(|r| cdf_points(&r.latency))
                    .unwrap_or_default(),
            }
        })
        .collect();
    let plain = &summaries[0];
    let ratios = summaries[1..]
        .iter()
        .map(|a| Ratios {
            arm: a.arm,
            throughput: ratio(a.throughput_rps, plain.throughput_rps),
            p50: ratio(a.latency.map(|l| l.p50_us), plain.latency.map(|l| l.p50_us)),
            p99: ratio(a.latency.map(|l| l.p99_us), plain.latency.map(|l| l.p99_us)),
            cpu_per_req: ratio(a.server_cpu_us_per_req, plain.server_cpu_us_per_req),
        })
        .collect();
    Ok(CompareReport {
        server: base.servers[0].to_string(),
        arms: summaries,
        rounds,
        ratios,
        cpu_note: "server CPU/req = (memcached utime+stime from /proc/PID/stat + machine-wide \
                   softirq time from /proc/stat) / replies, over each run including warm-up; on a \
                   one-host veth testbed softirq also includes the client's packet path"
            .into(),
    })
}

impl CompareReport {
    /// What makes this comparison incomplete: arms that could not run (and why), arms that got
    /// no reply at all. Empty for a complete comparison.
    pub fn failures(&self) -> Vec<String> {
        let mut v = Vec::new();
        for a in &self.arms {
            if let Some(e) = &a.error {
                v.push(format!("{} arm unavailable: {e}", a.arm.name()));
            } else if a.counters.completed == 0 {
                v.push(format!(
                    "{} arm got no replies ({} requests sent, {} timed out): is memcached \
                     reachable at {}?",
                    a.arm.name(),
                    a.counters.sent,
                    a.counters.timeouts,
                    self.server
                ));
            }
        }
        v
    }
}

/// The final compare table.
pub fn table(r: &CompareReport) -> String {
    let na = || "n/a".to_owned();
    let mut s = format!(
        "{:<10} {:>6} {:>11} {:>10} {:>10} {:>15} {:>13}\n",
        "arm", "rounds", "replies/s", "p50", "p99", "server CPU/req", "kernel share"
    );
    for a in &r.arms {
        s.push_str(&format!(
            "{:<10} {:>6} {:>11} {:>10} {:>10} {:>15} {:>13}\n",
            a.arm.name(),
            a.rounds,
            a.throughput_rps.map_or_else(na, rate),
            a.latency.map_or_else(na, |l| micros(l.p50_us)),
            a.latency.map_or_else(na, |l| micros(l.p99_us)),
            a.server_cpu_us_per_req.map_or_else(na, micros),
            if a.arm == Arm::Accel {
                a.kernel_share
                    .map_or_else(na, |k| format!("{:.1}%", k * 100.0))
            } else {
                "-".into()
            },
        ));
        if let Some(e) = &a.error {
            s.push_str(&format!("  {} unavailable: {e}\n", a.arm.name()));
        }
    }
    for q in &r.ratios {
        let f = |v: Option<f64>| v.map_or_else(na, |v| format!("{v:.2}x"));
        s.push_str(&format!(
            "{}/plain: throughput {}  p50 {}  p99 {}  server CPU/req {}\n",
            q.arm.name(),
            f(q.throughput),
            f(q.p50),
            f(q.p99),
            f(q.cpu_per_req)
        ));
    }
    s.push_str(&format!("note: {}\n", r.cpu_note));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_stats_json() {
        let j = r#"{"get_requests": 10, "get_keys": 12, "hit_requests": 7, "hit_keys": 9, "pass_miss": 3}"#;
        assert_eq!(parse_agent_stats(j), Some((9, 12)));
        let nested = r#"{"counters": {"get_keys": 4, "hit_keys": 1}}"#;
        assert_eq!(parse_agent_stats(nested), Some((1, 4)));
        assert_eq!(parse_agent_stats("not json"), None);
        assert_eq!(parse_agent_stats("{}"), None);
    }

    fn summary(arm: Arm, completed: u64, error: Option<&str>) -> ArmSummary {
        ArmSummary {
            arm,
            rounds: usize::from(error.is_none()),
            error: error.map(str::to_owned),
            throughput_rps: None,
            latency: None,
            server_cpu_us_per_req: None,
            kernel_share: None,
            counters: Counters {
                sent: 10,
                completed,
                timeouts: 10 - completed,
                ..Counters::default()
            },
            cdf: Vec::new(),
        }
    }

    #[test]
    fn unavailable_or_silent_arms_make_the_comparison_incomplete() {
        let mut r = CompareReport {
            arms: vec![summary(Arm::Plain, 10, None), summary(Arm::Accel, 10, None)],
            rounds: Vec::new(),
            ratios: Vec::new(),
            cpu_note: String::new(),
            server: "198.18.9.1:11211".into(),
        };
        assert!(r.failures().is_empty());
        r.arms[1] = summary(Arm::Accel, 0, Some("agent on x9s not ready"));
        r.arms.push(summary(Arm::Reflector, 0, None));
        let f = r.failures();
        assert_eq!(f.len(), 2, "{f:?}");
        assert_eq!(f[0], "accel arm unavailable: agent on x9s not ready");
        assert!(
            f[1].starts_with("reflector arm got no replies") && f[1].contains("198.18.9.1:11211"),
            "{f:?}"
        );
    }

    #[test]
    fn ratios() {
        assert_eq!(ratio(Some(3.0), Some(1.5)), Some(2.0));
        assert_eq!(ratio(None, Some(1.0)), None);
        assert_eq!(ratio(Some(1.0), Some(0.0)), None);
    }
}
