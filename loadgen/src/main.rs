//! The `loadgen` command line: `run`, `sweep`, `compare`, `workload` (print the effective
//! workload) and `testbed up|down`. Parses flags (each with an environment variable), sets up
//! logging, optionally enters a network namespace, and hands over to the library.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};

use loadgen::compare::{self, CompareConfig, TestbedChoice};
use loadgen::runner::{self, RunConfig, RunReport, Transport};
use loadgen::sweep::{self, SweepConfig};
use loadgen::testbed::{self, Testbed, TestbedConfig};
use loadgen::units::{HumanDuration, SizeRange, count_arg, duration_arg, size_arg};
use loadgen::workload::{Arrivals, Distribution, LoadMode, MAX_KEYS, Workload};
use loadgen::{cpu, interrupt, netns, plot, reflect, report};

/// memcached load generator with a veth testbed and a plain-vs-accelerated compare mode.
#[derive(Parser, Debug)]
#[command(name = "loadgen", version, about)]
struct Cli {
    /// Log filter (tracing EnvFilter syntax), e.g. "info" or "loadgen=debug".
    #[arg(long, env = "LOADGEN_LOG", default_value = "info", global = true)]
    log: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run one workload against one or more servers and print a table.
    Run {
        #[command(flatten)]
        load: LoadArgs,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Open-loop steps at increasing rates; reports the saturation point.
    Sweep {
        #[command(flatten)]
        load: LoadArgs,
        /// First target rate (requests/s, k/M suffixes).
        #[arg(long, value_parser = count_arg, default_value = "20k", env = "LOADGEN_SWEEP_START")]
        start: f64,
        /// Each step multiplies the rate by this.
        #[arg(long, default_value_t = 1.5, env = "LOADGEN_SWEEP_FACTOR")]
        factor: f64,
        /// Highest target rate.
        #[arg(long, value_parser = count_arg, default_value = "5M", env = "LOADGEN_SWEEP_MAX")]
        max_rate: f64,
        /// Explicit list of rates instead of start/factor/max, e.g. "50k,100k,200k".
        #[arg(long, value_delimiter = ',', value_parser = count_arg)]
        rates: Vec<f64>,
        /// Measured time per step.
        #[arg(long, value_parser = duration_arg, default_value = "3s", env = "LOADGEN_SWEEP_STEP")]
        step: Duration,
        /// Warm-up per step.
        #[arg(long, value_parser = duration_arg, default_value = "500ms")]
        step_warmup: Duration,
        /// p99 latency objective a step must meet (e.g. 1ms); none by default.
        #[arg(long, value_parser = duration_arg, env = "LOADGEN_SLO_P99")]
        slo_p99: Option<Duration>,
        /// Highest acceptable loss ratio per step.
        #[arg(long, default_value_t = 0.01)]
        max_loss: f64,
        /// JSON results file.
        #[arg(long, env = "LOADGEN_JSON")]
        json: Option<PathBuf>,
    },
    /// Plain vs accelerated memcached (and optionally the XDP reflector) on a veth testbed,
    /// interleaved in rounds; prints ratios of throughput, p50, p99 and server CPU per request.
    Compare {
        #[command(flatten)]
        load: LoadArgs,
        /// Use an existing testbed (from `loadgen testbed up`) instead of building one.
        #[arg(long, env = "LOADGEN_TESTBED")]
        testbed: Option<String>,
        /// Name of the testbed to build when --testbed is not given.
        #[arg(long, default_value = "lgcmp")]
        name: String,
        /// Subnet index of the testbed to build.
        #[arg(long, default_value_t = 201)]
        subnet: u8,
        /// Extra memcached arguments for the testbed to build (repeat).
        #[arg(long = "memcached-arg", allow_hyphen_values = true)]
        memcached_args: Vec<String>,
        /// Keep the built testbed afterwards.
        #[arg(long)]
        keep_testbed: bool,
        /// Rounds (each runs every arm once).
        #[arg(long, default_value_t = 3, env = "LOADGEN_ROUNDS")]
        rounds: usize,
        /// Measured time per arm per round.
        #[arg(long, value_parser = duration_arg, default_value = "3s", env = "LOADGEN_ROUND")]
        round: Duration,
        /// Warm-up per arm per round, not measured: covers the agent's start (it holds fills
        /// for its write-settle time plus a second, then warm starts from memcached).
        #[arg(long, value_parser = duration_arg, default_value = "3s")]
        round_warmup: Duration,
        /// Also run the zero-work XDP reflector arm (`cache-agent reflector`).
        #[arg(long)]
        reflector: bool,
        /// Extra `cache-agent run` arguments (repeat).
        #[arg(long = "agent-arg", allow_hyphen_values = true)]
        agent_args: Vec<String>,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Zero-work memcached-compatible UDP and TCP responder (answers every GET as a hit) for
    /// measuring load generators; busy-polls one CPU per protocol; stops after --duration.
    Reflect {
        /// Address to listen on.
        #[arg(
            long,
            default_value = "127.0.0.1:22199",
            env = "LOADGEN_REFLECT_LISTEN"
        )]
        listen: SocketAddr,
        /// Value size of every hit.
        #[arg(long, default_value_t = 32)]
        value_size: usize,
        /// CPU to pin the responder to.
        #[arg(long)]
        cpu: Option<usize>,
        /// Stop after this long.
        #[arg(long, value_parser = duration_arg, default_value = "60s")]
        duration: Duration,
        /// Protocols to serve: "udp", "tcp" or both (each busy-polls its own thread).
        #[arg(long, value_delimiter = ',', default_value = "udp,tcp")]
        protocols: Vec<String>,
        /// Enter this network namespace first.
        #[arg(long)]
        netns: Option<String>,
    },
    /// Print the effective workload (file plus flags) as TOML and exit.
    Workload {
        #[command(flatten)]
        load: LoadArgs,
    },
    /// Create or remove a two-namespace veth testbed with memcached.
    Testbed {
        #[command(subcommand)]
        cmd: TestbedCmd,
    },
}

#[derive(Subcommand, Debug)]
enum TestbedCmd {
    /// Build the testbed, start memcached (and optionally the agent), leave it running.
    Up {
        /// Name prefix (at most 14 characters).
        #[arg(long, default_value = "lgtb", env = "LOADGEN_TESTBED")]
        name: String,
        /// Subnet index 0..=250: 198.18.N.0/24 and 2001:2:0:N::/64.
        #[arg(long, default_value_t = 0)]
        subnet: u8,
        /// veth MTU.
        #[arg(long, default_value_t = 1500)]
        mtu: u32,
        /// memcached port (TCP and UDP).
        #[arg(long, default_value_t = 11211)]
        port: u16,
        /// Extra memcached arguments (repeat), e.g. --memcached-arg=-t --memcached-arg=2.
        #[arg(long = "memcached-arg", allow_hyphen_values = true)]
        memcached_args: Vec<String>,
        /// Also start the cache agent in the server namespace.
        #[arg(long)]
        agent: bool,
        /// Extra `cache-agent run` arguments (repeat).
        #[arg(long = "agent-arg", allow_hyphen_values = true)]
        agent_args: Vec<String>,
    },
    /// Stop its processes, delete its namespaces, state directory and /tmp logs.
    Down {
        /// Name prefix.
        #[arg(long, default_value = "lgtb", env = "LOADGEN_TESTBED")]
        name: String,
        /// Keep the /tmp/loadgen-testbed-NAME-*.log files (e.g. to read why the agent failed).
        #[arg(long)]
        keep_logs: bool,
    },
}

/// Workload, target and engine flags shared by run, sweep and compare.
#[derive(Args, Debug, Clone)]
struct LoadArgs {
    /// TOML workload file; flags override its values (see loadgen/workloads/bmc.toml).
    #[arg(long, short = 'w', env = "LOADGEN_WORKLOAD")]
    workload: Option<PathBuf>,
    /// Server HOST:PORT; repeat or comma-separate for several (keys spread by ketama).
    #[arg(
        long,
        short = 's',
        env = "LOADGEN_SERVER",
        value_delimiter = ',',
        default_value = "127.0.0.1:11211"
    )]
    server: Vec<String>,
    /// Transport: udp (text + frame header), tcp (text), meta (TCP meta commands), udp-meta.
    #[arg(long, value_enum, env = "LOADGEN_PROTO", default_value = "udp")]
    proto: Transport,
    /// Load mode: open (target rate) or closed (N outstanding per socket).
    #[arg(long, value_enum, env = "LOADGEN_MODE")]
    mode: Option<LoadMode>,
    /// Open loop: total target rate in requests/s (k/M suffixes); implies --mode open.
    #[arg(long, value_parser = count_arg, env = "LOADGEN_RATE")]
    rate: Option<f64>,
    /// Open loop: poisson or fixed inter-arrival gaps.
    #[arg(long, value_enum, env = "LOADGEN_ARRIVALS")]
    arrivals: Option<Arrivals>,
    /// Closed loop: outstanding requests per socket/connection; implies --mode closed.
    #[arg(long, short = 'c', env = "LOADGEN_CONCURRENCY")]
    concurrency: Option<usize>,
    /// Number of distinct keys (k/M suffixes).
    #[arg(long, value_parser = count_arg, env = "LOADGEN_KEYS")]
    keys: Option<f64>,
    /// Key size in bytes, fixed ("16") or uniform range ("16..64").
    #[arg(long, value_parser = size_arg, env = "LOADGEN_KEY_SIZE")]
    key_size: Option<SizeRange>,
    /// Value size in bytes, fixed or uniform range.
    #[arg(long, value_parser = size_arg, env = "LOADGEN_VALUE_SIZE")]
    value_size: Option<SizeRange>,
    /// Key popularity: zipf or uniform.
    #[arg(long, value_enum, env = "LOADGEN_DISTRIBUTION")]
    distribution: Option<Distribution>,
    /// Zipf skew θ (implies --distribution zipf).
    #[arg(long, env = "LOADGEN_THETA")]
    theta: Option<f64>,
    /// Verb weights, e.g. "get=9,set=1" or "get=0.9,set=0.05,delete=0.05".
    #[arg(long, env = "LOADGEN_MIX")]
    mix: Option<String>,
    /// Keys per GET (multi-get width).
    #[arg(long, env = "LOADGEN_WIDTH")]
    width: Option<usize>,
    /// Skip the populate phase (SET of every key over TCP).
    #[arg(long, conflicts_with = "populate")]
    no_populate: bool,
    /// Force the populate phase.
    #[arg(long)]
    populate: bool,
    /// Warm-up time (not recorded).
    #[arg(long, value_parser = duration_arg, env = "LOADGEN_WARMUP")]
    warmup: Option<Duration>,
    /// Measured time.
    #[arg(long, short = 'd', value_parser = duration_arg, env = "LOADGEN_DURATION")]
    duration: Option<Duration>,
    /// Random seed.
    #[arg(long, env = "LOADGEN_SEED")]
    seed: Option<u64>,
    /// Worker threads.
    #[arg(long, short = 't', default_value_t = 1, env = "LOADGEN_WORKERS")]
    workers: usize,
    /// Sockets (UDP) or connections (TCP) per server per worker.
    #[arg(long, default_value_t = 1, env = "LOADGEN_CONNS")]
    conns: usize,
    /// Requests per sendmmsg/recvmmsg batch.
    #[arg(long, default_value_t = 32, env = "LOADGEN_BATCH")]
    batch: usize,
    /// UDP: most equal-length requests sent as one segmented message (UDP_SEGMENT); the server
    /// still gets separate datagrams. Saves the generator most of its send cost; 1 sends each
    /// datagram on its own (closer pacing against a fast server at low concurrency).
    #[arg(long, default_value_t = loadgen::mmsg::MAX_SEGMENTS, env = "LOADGEN_UDP_SEGMENT")]
    udp_segment: usize,
    /// A request without a complete reply after this long counts as lost.
    #[arg(long, value_parser = duration_arg, default_value = "500ms", env = "LOADGEN_TIMEOUT")]
    timeout: Duration,
    /// CPUs to pin workers to, e.g. "0,1" or "2-5" (default: all allowed CPUs, round-robin).
    #[arg(long, env = "LOADGEN_CPUS")]
    cpus: Option<String>,
    /// Do not pin workers.
    #[arg(long, env = "LOADGEN_NO_PIN")]
    no_pin: bool,
    /// Enter this network namespace (name in /run/netns, or a path) before connecting.
    #[arg(long, env = "LOADGEN_NETNS")]
    netns: Option<String>,
    /// Never draw the live progress bar.
    #[arg(long, env = "LOADGEN_NO_PROGRESS")]
    no_progress: bool,
    /// Label carried into the report.
    #[arg(long)]
    label: Option<String>,
}

/// Result files.
#[derive(Args, Debug, Clone)]
struct OutputArgs {
    /// Write results as JSON to this file.
    #[arg(long, env = "LOADGEN_JSON")]
    json: Option<PathBuf>,
    /// Write SVG plots PREFIX-throughput.svg and PREFIX-latency-cdf.svg.
    #[arg(long, env = "LOADGEN_SVG")]
    svg: Option<PathBuf>,
}

/// Parses `--cpus` ("0,1", "2-5") and checks every CPU is one this process may run on.
fn parse_cpus(text: &str, allowed: &[usize]) -> Result<Vec<usize>> {
    let number = |n: &str| -> Result<usize> {
        n.trim()
            .parse()
            .with_context(|| format!("--cpus {text:?}: {n:?} is not a CPU number"))
    };
    let mut v = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => v.extend(number(a)?..=number(b)?),
            None => v.push(number(part)?),
        }
    }
    if v.is_empty() {
        bail!("--cpus {text:?} names no CPU; give e.g. --cpus 0,1 or --cpus 2-5");
    }
    if let Some(bad) = v.iter().find(|c| !allowed.contains(c)) {
        bail!(
            "--cpus {text:?}: CPU {bad} is not available (this process may run on CPUs {}); \
             pick from those, or use --no-pin",
            cpu_ranges(allowed)
        );
    }
    Ok(v)
}

/// "0-3,6" for [0, 1, 2, 3, 6].
fn cpu_ranges(cpus: &[usize]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        parts.push(if i == j {
            cpus[i].to_string()
        } else {
            format!("{}-{}", cpus[i], cpus[j])
        });
        i = j + 1;
    }
    parts.join(",")
}

/// Refuses a result file that cannot be written, before any work is done. An existing file is
/// opened without truncating it; a new one is created and removed again.
fn check_writable(path: &Path, flag: &str) -> Result<()> {
    let existed = path.exists();
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .with_context(|| {
            format!(
                "{flag} {}: cannot write that file; pick a writable path",
                path.display()
            )
        })?;
    if !existed {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

fn parse_mix(text: &str, w: &mut Workload) -> Result<()> {
    w.mix.get = 0.0;
    w.mix.set = 0.0;
    w.mix.delete = 0.0;
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .with_context(|| format!("mix entry {part:?} is not VERB=WEIGHT"))?;
        let v: f64 = v
            .trim()
            .parse()
            .with_context(|| format!("weight in {part:?}"))?;
        match k.trim() {
            "get" => w.mix.get = v,
            "set" => w.mix.set = v,
            "delete" | "del" => w.mix.delete = v,
            other => bail!("unknown verb {other:?} in --mix (get, set, delete)"),
        }
    }
    Ok(())
}

impl LoadArgs {
    fn workload(&self) -> Result<Workload> {
        let mut w = match &self.workload {
            Some(p) => Workload::from_file(p)?,
            None => Workload::default(),
        };
        if let Some(r) = self.rate {
            w.load.rate = r;
            w.load.mode = LoadMode::Open;
        }
        if let Some(c) = self.concurrency {
            w.load.concurrency = c;
            if self.rate.is_none() {
                w.load.mode = LoadMode::Closed;
            }
        }
        if let Some(m) = self.mode {
            w.load.mode = m;
        }
        if let Some(a) = self.arrivals {
            w.load.arrivals = a;
        }
        if let Some(k) = self.keys {
            // Checked before the cast, which would turn 1e20 into u64::MAX without a word.
            if k > MAX_KEYS as f64 {
                bail!("--keys {k}: at most {MAX_KEYS} (1G) keys are supported; lower --keys");
            }
            if k < 1.0 || k.fract() != 0.0 {
                bail!("--keys {k}: must be a whole number of at least 1 (e.g. --keys 100k)");
            }
            w.keyspace.keys = k as u64;
        }
        if let Some(s) = self.key_size {
            w.keyspace.key_size = s;
        }
        if let Some(s) = self.value_size {
            w.keyspace.value_size = s;
        }
        if let Some(t) = self.theta {
            w.popularity.theta = t;
            w.popularity.distribution = Distribution::Zipf;
        }
        if let Some(d) = self.distribution {
            w.popularity.distribution = d;
        }
        if let Some(m) = &self.mix {
            parse_mix(m, &mut w)?;
        }
        if let Some(x) = self.width {
            w.mix.multiget_width = x;
        }
        if self.no_populate {
            w.phases.populate = false;
        }
        if self.populate {
            w.phases.populate = true;
        }
        if let Some(d) = self.warmup {
            w.phases.warmup = HumanDuration(d);
        }
        if let Some(d) = self.duration {
            w.phases.duration = HumanDuration(d);
        }
        if let Some(s) = self.seed {
            w.seed = s;
        }
        w.validate()?;
        Ok(w)
    }

    fn servers(&self) -> Result<Vec<SocketAddr>> {
        self.server
            .iter()
            .map(|s| {
                s.to_socket_addrs()
                    .with_context(|| format!("cannot resolve server {s:?}"))?
                    .next()
                    .with_context(|| format!("server {s:?} resolves to nothing"))
            })
            .collect()
    }

    /// Engine flags out of range are refused, not clamped: a run with other settings than the
    /// ones asked for would be measured and reported as if it had them.
    fn check_engine(&self) -> Result<()> {
        let max_segments = loadgen::mmsg::MAX_SEGMENTS;
        if self.workers == 0 {
            bail!("--workers 0: at least one worker thread is needed (e.g. --workers 1)");
        }
        if self.conns == 0 {
            bail!("--conns 0: each worker needs at least one socket per server (e.g. --conns 1)");
        }
        if !(1..=MAX_BATCH).contains(&self.batch) {
            bail!(
                "--batch {}: must be in 1..={MAX_BATCH} (requests per sendmmsg/recvmmsg)",
                self.batch
            );
        }
        if !(1..=max_segments).contains(&self.udp_segment) {
            bail!(
                "--udp-segment {}: must be in 1..={max_segments} (1 sends each datagram on its own)",
                self.udp_segment
            );
        }
        if self.timeout.is_zero() {
            bail!("--timeout 0s: every request would time out at once; give e.g. --timeout 500ms");
        }
        Ok(())
    }

    fn run_config(&self) -> Result<RunConfig> {
        self.check_engine()?;
        let mut rc = RunConfig::new(self.servers()?, self.proto, self.workload()?);
        rc.workers = self.workers;
        rc.conns = self.conns;
        rc.batch = self.batch;
        rc.udp_segment = self.udp_segment;
        rc.timeout = self.timeout;
        rc.cpus = if self.no_pin {
            None
        } else {
            let allowed = cpu::allowed_cpus();
            Some(match &self.cpus {
                Some(c) => parse_cpus(c, &allowed)?,
                None => allowed,
            })
        };
        rc.progress = !self.no_progress;
        rc.label = self.label.clone();
        Ok(rc)
    }
}

/// Largest `--batch` (requests per sendmmsg/recvmmsg).
const MAX_BATCH: usize = 1024;

fn with_suffix(prefix: &Path, suffix: &str) -> PathBuf {
    let mut s = prefix.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

impl OutputArgs {
    /// Refuses unwritable result paths before the run. `svg_plots` are the suffixes written
    /// after the `--svg` prefix.
    fn check_writable(&self, svg_plots: &[&str]) -> Result<()> {
        if let Some(p) = &self.json {
            check_writable(p, "--json")?;
        }
        if let Some(prefix) = &self.svg {
            for suffix in svg_plots {
                check_writable(&with_suffix(prefix, suffix), "--svg")?;
            }
        }
        Ok(())
    }
}

fn write_outputs(out: &OutputArgs, report: &RunReport) -> Result<()> {
    if let Some(p) = &out.json {
        report::write_json(p, report)?;
        eprintln!("wrote {}", p.display());
    }
    if let Some(prefix) = &out.svg {
        let label = report.label.as_deref().unwrap_or("run");
        let tp = with_suffix(prefix, "-throughput.svg");
        plot::throughput_svg(&tp, &[(label, &report.timeline)])?;
        let cdf = with_suffix(prefix, "-latency-cdf.svg");
        plot::cdf_svg(&cdf, &[(label, &report.cdf)])?;
        eprintln!("wrote {} and {}", tp.display(), cdf.display());
    }
    Ok(())
}

fn enter_netns(load: &LoadArgs) -> Result<()> {
    if let Some(ns) = &load.netns {
        netns::enter(ns).with_context(|| format!("cannot enter network namespace {ns}"))?;
        tracing::info!(netns = %ns, "entered network namespace");
    }
    Ok(())
}

/// True for commands that start testbed processes (a testbed, or the agent on an existing one):
/// SIGINT/SIGTERM must stop them and tear down what the command built.
fn starts_testbed_processes(cmd: &Cmd) -> bool {
    matches!(
        cmd,
        Cmd::Compare { .. }
            | Cmd::Testbed {
                cmd: TestbedCmd::Up { .. }
            }
    )
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cli.log)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    // Before any thread exists, so that every thread inherits the blocked signals.
    if starts_testbed_processes(&cli.cmd)
        && let Err(e) = interrupt::install()
    {
        eprintln!("Error: cannot set up SIGINT/SIGTERM handling: {e}");
        return ExitCode::FAILURE;
    }
    let result = run(cli.cmd);
    // Teardown has run by now (the testbed is dropped inside `run`).
    if let Some(sig) = interrupt::received() {
        eprintln!("loadgen: stopped by {}", interrupt::signal_name(sig));
        return ExitCode::from(interrupt::exit_status(sig));
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:?}");
            ExitCode::FAILURE
        }
    }
}

fn run(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Run { load, out } => {
            enter_netns(&load)?;
            let rc = load.run_config()?;
            out.check_writable(&["-throughput.svg", "-latency-cdf.svg"])?;
            let res = runner::run(&rc)?;
            print!("{}", report::table(&res.report));
            write_outputs(&out, &res.report)?;
            runner::require_replies(&rc, &res.report)?;
        }
        Cmd::Sweep {
            load,
            start,
            factor,
            max_rate,
            rates,
            step,
            step_warmup,
            slo_p99,
            max_loss,
            json,
        } => {
            enter_netns(&load)?;
            let mut base = load.run_config()?;
            base.progress = false;
            if let Some(p) = &json {
                check_writable(p, "--json")?;
            }
            let rates = if rates.is_empty() {
                sweep::geometric_rates(start, factor, max_rate)
            } else {
                rates
            };
            let cfg = SweepConfig {
                base,
                rates,
                warmup: step_warmup,
                step,
                slo_p99,
                max_loss,
            };
            let r = sweep::run(&cfg)?;
            print!("{}", sweep::table(&r));
            if let Some(p) = json {
                report::write_json(&p, &r)?;
            }
        }
        Cmd::Compare {
            load,
            testbed,
            name,
            subnet,
            memcached_args,
            keep_testbed,
            rounds,
            round,
            round_warmup,
            reflector,
            agent_args,
            out,
        } => {
            if load.netns.is_some() {
                bail!("compare runs in the testbed's client namespace; --netns is not used");
            }
            let mut base = load.run_config()?;
            base.servers = Vec::new();
            out.check_writable(&["-latency-cdf.svg"])?;
            let choice = match testbed {
                Some(n) => TestbedChoice::Existing(n),
                None => TestbedChoice::New(TestbedConfig {
                    name,
                    subnet,
                    memcached_args,
                    ..TestbedConfig::default()
                }),
            };
            let cfg = CompareConfig {
                base,
                rounds,
                warmup: round_warmup,
                round,
                reflector,
                agent_args,
                testbed: choice,
                keep_testbed,
            };
            let r = compare::run(&cfg)?;
            print!("{}", compare::table(&r));
            if let Some(p) = &out.json {
                report::write_json(p, &r)?;
            }
            if let Some(prefix) = &out.svg {
                let series: Vec<(&str, &[(f64, f64)])> = r
                    .arms
                    .iter()
                    .filter(|a| !a.cdf.is_empty())
                    .map(|a| (a.arm.name(), a.cdf.as_slice()))
                    .collect();
                let path = with_suffix(prefix, "-latency-cdf.svg");
                plot::cdf_svg(&path, &series)?;
                eprintln!("wrote {}", path.display());
            }
            let failures = r.failures();
            if !failures.is_empty() {
                bail!("comparison incomplete: {}", failures.join("; "));
            }
        }
        Cmd::Reflect {
            listen,
            value_size,
            cpu: pin,
            duration,
            netns: ns,
            protocols,
        } => {
            if let Some(ns) = &ns {
                netns::enter(ns).with_context(|| format!("cannot enter network namespace {ns}"))?;
            }
            if let Some(c) = pin {
                cpu::pin_current_thread(c).context("cannot pin")?;
            }
            let stop = Arc::new(AtomicBool::new(false));
            let answered = Arc::new(AtomicU64::new(0));
            let mut handles = Vec::new();
            for p in &protocols {
                let (s2, a2) = (stop.clone(), answered.clone());
                handles.push(match p.as_str() {
                    "udp" => std::thread::spawn(move || reflect::serve(listen, value_size, s2, a2)),
                    "tcp" => {
                        std::thread::spawn(move || reflect::serve_tcp(listen, value_size, s2, a2))
                    }
                    other => bail!("unknown protocol {other:?} (udp, tcp)"),
                });
            }
            tracing::info!(%listen, ?duration, "reflecting");
            std::thread::sleep(duration);
            stop.store(true, Ordering::Relaxed);
            for h in handles {
                h.join()
                    .map_err(|_| anyhow::anyhow!("responder panicked"))??;
            }
            println!("answered {} requests", answered.load(Ordering::Relaxed));
        }
        Cmd::Workload { load } => {
            print!("{}", toml::to_string_pretty(&load.workload()?)?);
        }
        Cmd::Testbed { cmd } => match cmd {
            TestbedCmd::Up {
                name,
                subnet,
                mtu,
                port,
                memcached_args,
                agent,
                agent_args,
            } => {
                let mut tb = Testbed::up(TestbedConfig {
                    name,
                    subnet,
                    mtu,
                    memcached_port: port,
                    memcached_args,
                })?;
                if agent {
                    let a: Vec<&str> = agent_args.iter().map(String::as_str).collect();
                    tb.start_agent(&a)?;
                }
                println!("testbed {} is up", tb.name());
                println!(
                    "  server: netns {} iface {} {} / {}  memcached pid {} port {} (TCP+UDP)",
                    tb.server_netns(),
                    tb.server_iface(),
                    tb.server_v4(),
                    tb.server_v6(),
                    tb.memcached_pid(),
                    tb.memcached_port()
                );
                println!(
                    "  client: netns {} iface {} {} / {}",
                    tb.client_netns(),
                    tb.client_iface(),
                    tb.client_v4(),
                    tb.client_v6()
                );
                if let Some(pid) = tb.agent_pid() {
                    println!(
                        "  agent: pid {pid}, log {}",
                        tb.agent_log().unwrap_or_default().display()
                    );
                }
                println!(
                    "  run:  loadgen run --netns {} --server {}:{} --proto udp --duration 5s",
                    tb.client_netns(),
                    tb.server_v4(),
                    tb.memcached_port()
                );
                println!("  down: loadgen testbed down --name {}", tb.name());
                // Interrupted while coming up: tear down (on drop) rather than leave it running.
                interrupt::check()?;
                tb.persist();
            }
            TestbedCmd::Down { name, keep_logs } => {
                if keep_logs {
                    let logs = testbed::down_keeping_logs(&name)?;
                    println!("testbed {name} removed; logs kept:");
                    for log in logs {
                        println!("  {}", log.display());
                    }
                } else {
                    testbed::down(&name)?;
                    println!("testbed {name} removed");
                }
            }
        },
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `run` subcommand's load flags, parsed from `flags`.
    fn load_args(flags: &[&str]) -> LoadArgs {
        let argv = ["loadgen", "run"].iter().chain(flags);
        match Cli::try_parse_from(argv).expect("flags parse").cmd {
            Cmd::Run { load, .. } => load,
            other => panic!("not a run: {other:?}"),
        }
    }

    fn refused(flags: &[&str]) -> String {
        match load_args(flags).run_config() {
            Ok(_) => panic!("{flags:?} was accepted"),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn zero_and_out_of_range_engine_flags_are_refused() {
        for (flags, names) in [
            (&["--timeout", "0s"][..], "--timeout"),
            (&["--workers", "0"], "--workers"),
            (&["--conns", "0"], "--conns"),
            (&["--batch", "0"], "--batch"),
            (&["--batch", "5000"], "--batch"),
            (&["--udp-segment", "0"], "--udp-segment"),
            (&["--udp-segment", "65"], "--udp-segment"),
        ] {
            let e = refused(flags);
            assert!(e.contains(names), "{flags:?}: {e}");
        }
        let rc = load_args(&["--workers", "2", "--batch", "1024", "--udp-segment", "1"])
            .run_config()
            .unwrap();
        assert_eq!((rc.workers, rc.batch, rc.udp_segment), (2, 1024, 1));
    }

    #[test]
    fn absurd_key_counts_are_refused_not_saturated() {
        let e = refused(&["--keys", "1e20"]);
        assert!(e.contains("--keys") && e.contains("1000000000"), "{e}");
        let e = refused(&["--keys", "0.5"]);
        assert!(e.contains("--keys"), "{e}");
        let rc = load_args(&["--keys", "1G"]).run_config().unwrap();
        assert_eq!(rc.workload.keyspace.keys, MAX_KEYS);
    }

    #[test]
    fn cpus_must_exist() {
        let beyond = cpu::allowed_cpus().iter().max().unwrap() + 1;
        let e = refused(&["--cpus", &beyond.to_string()]);
        assert!(
            e.contains("--cpus") && e.contains(&format!("CPU {beyond}")),
            "{e}"
        );
        let e = refused(&["--cpus", "0,x"]);
        assert!(e.contains("--cpus"), "{e}");
        let first = cpu::allowed_cpus()[0].to_string();
        let rc = load_args(&["--cpus", &first]).run_config().unwrap();
        assert_eq!(rc.cpus, Some(vec![cpu::allowed_cpus()[0]]));
        assert_eq!(cpu_ranges(&[0, 1, 2, 3, 6, 8, 9]), "0-3,6,8-9");
    }

    #[test]
    fn unwritable_result_paths_are_refused_and_probing_leaves_no_trace() {
        let e = check_writable(Path::new("/nonexistent-dir/out.json"), "--json").unwrap_err();
        assert!(
            format!("{e:#}").contains("--json /nonexistent-dir/out.json"),
            "{e:#}"
        );
        let dir = std::env::temp_dir().join(format!("loadgen-probe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fresh = dir.join("fresh.json");
        check_writable(&fresh, "--json").unwrap();
        assert!(
            !fresh.exists(),
            "a probe must not leave an empty file behind"
        );
        let old = dir.join("old.json");
        std::fs::write(&old, "previous results").unwrap();
        check_writable(&old, "--json").unwrap();
        assert_eq!(std::fs::read_to_string(&old).unwrap(), "previous results");
        assert!(
            check_writable(&dir, "--json").is_err(),
            "a directory is not a file"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
