//! Runs a workload: the populate phase (one SET per key over TCP), then worker threads through
//! warm-up and measurement, then merges what they recorded into a [`RunResult`] with its report
//! (throughput, latency percentiles, outcome counters, the load generator's own CPU use and any
//! send-rate shortfall).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::Serialize;

use crate::error::LoadgenError;
use crate::ketama::Ketama;
use crate::progress;
use crate::proto::Dialect;
use crate::schedule::Clock;
use crate::stats::{Counters, LatencySummary, Live, Recorder, cdf_points};
use crate::worker::{PopulateSource, WorkerPlan, WorkerResult};
use crate::workload::{Arrivals, KeySpace, LoadMode, RequestGen, Workload};
use crate::{cpu, interrupt};
use crate::{tcp, udp};

/// Open loop: an achieved send rate this far below target is reported as a shortfall.
pub const SHORTFALL_TOLERANCE: f64 = 0.05;
/// A worker busier than this share of the time may be the bottleneck.
pub const BUSY_WARNING: f64 = 0.95;

/// Transport and dialect.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    /// UDP, text protocol, memcached frame header.
    Udp,
    /// TCP, text protocol.
    Tcp,
    /// TCP, meta protocol (mg/ms/md).
    Meta,
    /// UDP, meta protocol.
    UdpMeta,
}

impl Transport {
    /// Wire dialect.
    pub fn dialect(self) -> Dialect {
        match self {
            Self::Udp | Self::Tcp => Dialect::Text,
            Self::Meta | Self::UdpMeta => Dialect::Meta,
        }
    }

    /// True for datagram transports.
    pub fn is_udp(self) -> bool {
        matches!(self, Self::Udp | Self::UdpMeta)
    }
}

/// A fully specified run.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// Servers (ketama-hashed when several).
    pub servers: Vec<SocketAddr>,
    /// Transport.
    pub transport: Transport,
    /// Workload (keyspace, mix, phases, load).
    pub workload: Workload,
    /// Worker threads.
    pub workers: usize,
    /// Sockets or connections per server per worker.
    pub conns: usize,
    /// Requests per system call batch.
    pub batch: usize,
    /// UDP: most datagrams per segmented send message (1 = no segmentation).
    pub udp_segment: usize,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Pin worker i to `cpus[i % len]`; `None` = no pinning.
    pub cpus: Option<Vec<usize>>,
    /// Show a live progress bar (only drawn when stderr is a terminal).
    pub progress: bool,
    /// Timeline resolution.
    pub bucket: Duration,
    /// Free-form label carried into the report.
    pub label: Option<String>,
}

impl RunConfig {
    /// Defaults for `servers` and `workload`.
    pub fn new(servers: Vec<SocketAddr>, transport: Transport, workload: Workload) -> Self {
        Self {
            servers,
            transport,
            workload,
            workers: 1,
            conns: 1,
            batch: 32,
            udp_segment: crate::mmsg::MAX_SEGMENTS,
            timeout: Duration::from_millis(500),
            cpus: None,
            progress: false,
            bucket: Duration::from_millis(100),
            label: None,
        }
    }
}

/// Outcome of the populate phase.
#[derive(Clone, Debug, Serialize)]
pub struct PopulateSummary {
    /// Keys set.
    pub keys: u64,
    /// SETs answered STORED.
    pub stored: u64,
    /// SETs not stored, errors and timeouts.
    pub failed: u64,
    /// Wall time, seconds.
    pub seconds: f64,
}

/// The load generator's own resource use.
#[derive(Clone, Debug, Serialize)]
pub struct LoadgenUsage {
    /// Process CPU time during the run, seconds.
    pub cpu_seconds: f64,
    /// Average cores used (CPU time / wall time).
    pub cores: f64,
    /// Per worker: share of the time not spent waiting for replies or send times.
    pub worker_busy: Vec<f64>,
    /// Per worker: CPU time, seconds.
    pub worker_cpu_seconds: Vec<f64>,
}

/// Open loop: the generator did not send at the target rate.
#[derive(Clone, Debug, Serialize)]
pub struct Shortfall {
    /// Target rate, requests/s.
    pub target_rps: f64,
    /// Achieved send rate, requests/s.
    pub achieved_rps: f64,
    /// 1 - achieved/target.
    pub short_by: f64,
}

/// One timeline point.
#[derive(Clone, Debug, Serialize)]
pub struct TimelinePoint {
    /// Seconds since the start of sending (warm-up included).
    pub t: f64,
    /// Send rate in the interval, requests/s.
    pub sent_rps: f64,
    /// Completion rate, requests/s.
    pub completed_rps: f64,
    /// Timeouts per second.
    pub timeouts_ps: f64,
}

/// Everything a run reports (also the JSON output).
#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    /// Label.
    pub label: Option<String>,
    /// Servers.
    pub servers: Vec<String>,
    /// Transport.
    pub transport: Transport,
    /// Workload as run.
    pub workload: Workload,
    /// Worker threads.
    pub workers: usize,
    /// Sockets/connections per server per worker.
    pub conns: usize,
    /// Populate phase, if run.
    pub populate: Option<PopulateSummary>,
    /// Measured seconds.
    pub measured_seconds: f64,
    /// Outcome counters of requests started in the measurement window.
    pub counters: Counters,
    /// Replies per second.
    pub throughput_rps: f64,
    /// GET keys answered per second.
    pub get_keys_per_second: f64,
    /// Requests sent per second.
    pub send_rps: f64,
    /// Hit ratio of GET keys.
    pub hit_ratio: Option<f64>,
    /// Timeouts / sent.
    pub loss_ratio: f64,
    /// Latency: from the intended send time (open loop) or the actual send time (closed loop)
    /// to the complete reply.
    pub latency: LatencySummary,
    /// Open loop: how late requests left relative to their schedule.
    pub send_lag: Option<LatencySummary>,
    /// The generator's own CPU use.
    pub loadgen: LoadgenUsage,
    /// Open loop send-rate shortfall beyond 5 %, if any.
    pub shortfall: Option<Shortfall>,
    /// Human-readable warnings (generator-bound, loss, errors).
    pub warnings: Vec<String>,
    /// Throughput over time.
    pub timeline: Vec<TimelinePoint>,
    /// Latency CDF `(µs, fraction)`.
    pub cdf: Vec<(f64, f64)>,
}

/// A finished run: the report and the merged recorder (for further merging, e.g. in compare).
#[derive(Debug)]
pub struct RunResult {
    /// Report.
    pub report: RunReport,
    /// Merged recorder of all workers.
    pub recorder: Recorder,
}

/// SETs every key once over TCP (text or meta as the transport's dialect), 4 pipelined
/// connections per server, 64 requests deep.
pub fn populate(cfg: &RunConfig) -> Result<PopulateSummary, LoadgenError> {
    let keyspace = KeySpace::new(&cfg.workload.keyspace);
    let clock = Clock::start();
    let servers = Arc::new(cfg.servers.clone());
    let limit = Duration::from_secs(3600);
    let plan = WorkerPlan {
        id: 1000,
        ketama: Arc::new(Ketama::new(&cfg.servers)),
        servers,
        dialect: cfg.transport.dialect(),
        mode: LoadMode::Closed,
        rate: 0.0,
        arrivals: Arrivals::Fixed,
        concurrency: 64,
        conns_per_server: 4,
        batch: 64,
        udp_segment: cfg.udp_segment,
        timeout_ns: cfg.timeout.max(Duration::from_secs(2)).as_nanos() as u64,
        clock,
        start_ns: 0,
        window_start_ns: 0,
        window_end_ns: limit.as_nanos() as u64,
        bucket_ns: 1_000_000_000,
        cpu: None,
        seed: cfg.workload.seed,
        live: Arc::new(Live::default()),
    };
    let src = PopulateSource::new(keyspace.clone(), 0, 1);
    let res = tcp::run(&plan, src)?;
    interrupt::check()?;
    let c = res.recorder.counters;
    let summary = PopulateSummary {
        keys: keyspace.keys(),
        stored: c.set_stored,
        failed: c.sent - c.set_stored,
        seconds: res.elapsed_ns as f64 / 1e9,
    };
    if summary.stored == 0 {
        return Err(LoadgenError::Populate {
            server: cfg.servers[0],
            reason: format!("no SET was stored ({c:?})"),
        });
    }
    if summary.failed > 0 {
        tracing::warn!(
            failed = summary.failed,
            stored = summary.stored,
            "some populate SETs failed"
        );
    }
    tracing::info!(keys = summary.keys, seconds = summary.seconds, "populated");
    Ok(summary)
}

/// Runs populate (if the workload asks for it), warm-up and measurement.
pub fn run(cfg: &RunConfig) -> Result<RunResult, LoadgenError> {
    cfg.workload.validate()?;
    let w = &cfg.workload;
    let populate = if w.phases.populate {
        Some(populate(cfg)?)
    } else {
        None
    };
    let workers = cfg.workers.max(1);
    let clock = Clock::start();
    let start_ns = 20_000_000u64;
    let window_start_ns = start_ns + w.phases.warmup.0.as_nanos() as u64;
    let window_end_ns = window_start_ns + w.phases.duration.0.as_nanos() as u64;
    let ketama = Arc::new(Ketama::new(&cfg.servers));
    let servers = Arc::new(cfg.servers.clone());
    let lives: Vec<Arc<Live>> = (0..workers).map(|_| Arc::new(Live::default())).collect();
    let plans: Vec<WorkerPlan> = (0..workers)
        .map(|id| WorkerPlan {
            id,
            servers: servers.clone(),
            ketama: ketama.clone(),
            dialect: cfg.transport.dialect(),
            mode: w.load.mode,
            rate: w.load.rate / workers as f64,
            arrivals: w.load.arrivals,
            concurrency: w.load.concurrency,
            conns_per_server: cfg.conns.max(1),
            batch: cfg.batch.max(1),
            udp_segment: cfg.udp_segment.max(1),
            timeout_ns: cfg.timeout.as_nanos() as u64,
            clock,
            start_ns,
            window_start_ns,
            window_end_ns,
            bucket_ns: cfg.bucket.as_nanos().max(1_000_000) as u64,
            cpu: cfg
                .cpus
                .as_ref()
                .filter(|c| !c.is_empty())
                .map(|c| c[id % c.len()]),
            seed: w.seed,
            live: lives[id].clone(),
        })
        .collect();

    let cpu_before = cpu::process_cpu_ns();
    let done = Arc::new(AtomicBool::new(false));
    let bar = cfg.progress.then(|| {
        progress::spawn(
            lives.clone(),
            clock,
            start_ns,
            window_start_ns,
            window_end_ns,
            done.clone(),
        )
    });
    let transport = cfg.transport;
    let handles: Vec<_> = plans
        .into_iter()
        .map(|plan| {
            let source = RequestGen::new(w);
            std::thread::Builder::new()
                .name(format!("lg-worker-{}", plan.id))
                .spawn(move || {
                    if transport.is_udp() {
                        udp::run(&plan, source)
                    } else {
                        tcp::run(&plan, source)
                    }
                })
        })
        .collect();
    let mut results: Vec<WorkerResult> = Vec::with_capacity(workers);
    let mut first_err = None;
    for (id, h) in handles.into_iter().enumerate() {
        let joined = match h {
            Ok(h) => h.join().unwrap_or_else(|_| {
                Err(LoadgenError::Worker {
                    worker: id,
                    reason: "panicked".into(),
                })
            }),
            Err(e) => Err(LoadgenError::Worker {
                worker: id,
                reason: format!("cannot spawn: {e}"),
            }),
        };
        match joined {
            Ok(r) => results.push(r),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    done.store(true, Ordering::Relaxed);
    if let Some(Ok(h)) = bar {
        let _ = h.join();
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    interrupt::check()?;
    let cpu_ns = cpu::process_cpu_ns() - cpu_before;
    let wall_ns = clock.now_ns().saturating_sub(start_ns).max(1);

    let mut merged = results
        .first()
        .map(|r| {
            let mut m = Recorder::new(
                window_start_ns,
                window_end_ns,
                r.recorder.bucket_ns(),
                lives[0].clone(),
            );
            m.merge(&r.recorder);
            m
        })
        .expect("at least one worker");
    for r in results.iter().skip(1) {
        merged.merge(&r.recorder);
    }
    let usage = LoadgenUsage {
        cpu_seconds: cpu_ns as f64 / 1e9,
        cores: cpu_ns as f64 / wall_ns as f64,
        worker_busy: results
            .iter()
            .map(|r| 1.0 - r.idle_ns as f64 / r.elapsed_ns.max(1) as f64)
            .collect(),
        worker_cpu_seconds: results.iter().map(|r| r.cpu_ns as f64 / 1e9).collect(),
    };
    let report = build_report(cfg, populate, &merged, usage, start_ns, window_end_ns);
    Ok(RunResult {
        report,
        recorder: merged,
    })
}

/// `Err(NoReplies)` if not one request of the run was answered (every one timed out, or none
/// could be sent): the numbers would be meaningless, and the usual cause is an unreachable server.
pub fn require_replies(cfg: &RunConfig, report: &RunReport) -> Result<(), LoadgenError> {
    if report.counters.completed > 0 {
        return Ok(());
    }
    Err(LoadgenError::NoReplies {
        servers: report.servers.join(", "),
        sent: report.counters.sent,
        timeouts: report.counters.timeouts,
        timeout: crate::units::format_duration(cfg.timeout),
    })
}

fn build_report(
    cfg: &RunConfig,
    populate: Option<PopulateSummary>,
    rec: &Recorder,
    loadgen: LoadgenUsage,
    start_ns: u64,
    window_end_ns: u64,
) -> RunReport {
    let w = &cfg.workload;
    let secs = w.phases.duration.0.as_secs_f64();
    let c = rec.counters;
    let open = w.load.mode == LoadMode::Open;
    let send_rps = c.sent as f64 / secs;
    let mut warnings = Vec::new();
    let shortfall = (open && send_rps < w.load.rate * (1.0 - SHORTFALL_TOLERANCE)).then(|| {
        let s = Shortfall {
            target_rps: w.load.rate,
            achieved_rps: send_rps,
            short_by: 1.0 - send_rps / w.load.rate,
        };
        warnings.push(format!(
            "load generator sent {:.0} req/s, {:.1}% below the {:.0} req/s target: the generator, \
             not the server, limited this run (add --workers, or lower --rate)",
            s.achieved_rps,
            s.short_by * 100.0,
            s.target_rps
        ));
        s
    });
    for (i, b) in loadgen.worker_busy.iter().enumerate() {
        if *b > BUSY_WARNING && !open {
            warnings.push(format!(
                "worker {i} was busy {:.0}% of the time: throughput may be bounded by the load \
                 generator (add --workers)",
                b * 100.0
            ));
        }
    }
    let send_lag = open.then(|| LatencySummary::from_histogram(&rec.send_lag));
    if let Some(lag) = &send_lag
        && lag.p99_us > 1000.0
    {
        warnings.push(format!(
            "p99 send lag {:.0} µs: requests left late, which inflates latency (the generator \
             could not keep its schedule)",
            lag.p99_us
        ));
    }
    let loss_ratio = if c.sent > 0 {
        c.timeouts as f64 / c.sent as f64
    } else {
        0.0
    };
    if loss_ratio > 0.01 {
        warnings.push(format!(
            "{:.2}% of requests timed out (lost or slower than --timeout)",
            loss_ratio * 100.0
        ));
    }
    if c.errors > 0 {
        warnings.push(format!("{} error replies", c.errors));
    }
    if c.dropped > 0 {
        warnings.push(format!(
            "{} requests dropped: connection backlog full (server saturated)",
            c.dropped
        ));
    }
    let bucket_s = rec.bucket_ns() as f64 / 1e9;
    let first = (start_ns / rec.bucket_ns()) as usize;
    let last = ((window_end_ns + cfg.timeout.as_nanos() as u64) / rec.bucket_ns()) as usize;
    let timeline = rec
        .timeline
        .iter()
        .enumerate()
        .skip(first)
        .take(last.saturating_sub(first) + 1)
        .map(|(i, b)| TimelinePoint {
            t: (i as f64 * rec.bucket_ns() as f64 - start_ns as f64) / 1e9,
            sent_rps: b.sent as f64 / bucket_s,
            completed_rps: b.completed as f64 / bucket_s,
            timeouts_ps: b.timeouts as f64 / bucket_s,
        })
        .collect();
    RunReport {
        label: cfg.label.clone(),
        servers: cfg.servers.iter().map(|s| s.to_string()).collect(),
        transport: cfg.transport,
        workload: w.clone(),
        workers: cfg.workers,
        conns: cfg.conns,
        populate,
        measured_seconds: secs,
        counters: c,
        throughput_rps: c.completed as f64 / secs,
        get_keys_per_second: c.get_keys as f64 / secs,
        send_rps,
        hit_ratio: c.hit_ratio(),
        loss_ratio,
        latency: LatencySummary::from_histogram(&rec.latency),
        send_lag,
        loadgen,
        shortfall,
        warnings,
        timeline,
        cdf: cdf_points(&rec.latency),
    }
}
