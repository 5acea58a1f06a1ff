//! The files under `deploy/` against the agent they deploy: the systemd unit passes
//! `systemd-analyze verify` and keeps its hardening; the example config resolves; Prometheus's
//! own `promtool` accepts the scrape config and alert rules and their unit tests pass; every
//! metric a rule or a dashboard panel queries is one the agent exports; the Kubernetes
//! manifests have the shape the agent needs and use only flags and variables it knows.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use cache_agent::{
    config::{RunArgs, Settings},
    metrics::{FAMILIES, Kind, METRIC_NAMES},
};
use clap::Parser;
use serde_norway::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn deploy(rel: &str) -> PathBuf {
    root().join("deploy").join(rel)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn yaml_docs(path: &Path) -> Vec<Value> {
    let text = read(path);
    serde_norway::Deserializer::from_str(&text)
        .map(|d| {
            serde::Deserialize::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        })
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn tool(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A scratch directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("deploy-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------- the agent's vocabulary

fn config_source() -> String {
    read(&root().join("cache-agent/src/config.rs"))
}

/// `--metrics-addr` is a flag of `run` if RunArgs has a `metrics_addr` field.
fn assert_flag_exists(flag: &str, config_rs: &str, context: &str) {
    let name = flag
        .strip_prefix("--")
        .unwrap_or_else(|| panic!("{context}: {flag} is not a long flag"));
    let name = name.split('=').next().unwrap();
    let field = format!("pub {}:", name.replace('-', "_"));
    assert!(
        config_rs.contains(&field),
        "{context}: flag {flag} is not an option of cache-agent run (no `{field}` in config.rs)"
    );
}

fn assert_env_exists(var: &str, config_rs: &str, context: &str) {
    assert!(
        config_rs.contains(&format!("\"{var}\"")),
        "{context}: {var} is not a variable cache-agent reads (not in config.rs)"
    );
}

/// `check-config` is a subcommand if main.rs's Command enum has a `CheckConfig` variant.
fn assert_subcommand_exists(sub: &str) {
    let main_rs = read(&root().join("cache-agent/src/main.rs"));
    let variant: String = sub
        .split('-')
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect();
    let found = [
        format!("    {variant}("),
        format!("    {variant} {{"),
        format!("    {variant},"),
    ]
    .iter()
    .any(|p| main_rs.contains(p.as_str()));
    assert!(
        found,
        "`cache-agent {sub}` is not a subcommand (no `{variant}` variant in main.rs)"
    );
}

/// `cache-agent run` as clap parses it, so values are checked the way the agent checks them.
#[derive(Parser)]
struct RunCli {
    #[command(flatten)]
    args: RunArgs,
}

// ---------------------------------------------------------------- systemd

/// `[Section] Key=Value` lines of a unit, keys repeated as they appear.
fn unit_entries(text: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = s.to_string();
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("bad unit line {line:?}"));
        out.push((section.clone(), k.trim().to_string(), v.trim().to_string()));
    }
    out
}

fn unit_values(entries: &[(String, String, String)], section: &str, key: &str) -> Vec<String> {
    entries
        .iter()
        .filter(|(s, k, _)| s == section && k == key)
        .map(|(_, _, v)| v.clone())
        .collect()
}

fn words(values: &[String]) -> BTreeSet<String> {
    values
        .iter()
        .flat_map(|v| v.split_whitespace().map(str::to_string))
        .collect()
}

#[test]
fn systemd_unit_is_hardened_and_runs_the_agent() {
    let text = read(&deploy("systemd/cache-agent.service"));
    let e = unit_entries(&text);
    let one = |key: &str| {
        let v = unit_values(&e, "Service", key);
        assert_eq!(v.len(), 1, "Service.{key}: {v:?}");
        v[0].clone()
    };
    assert_eq!(one("Type"), "notify");
    assert_eq!(one("NotifyAccess"), "main");
    assert_eq!(one("Restart"), "on-failure");
    assert!(one("WatchdogSec").ends_with('s'), "WatchdogSec in seconds");
    assert_eq!(
        one("ExecStart"),
        "/usr/local/bin/cache-agent run --config /etc/cache-agent/agent.toml"
    );
    let caps: BTreeSet<String> = ["CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"]
        .map(String::from)
        .into();
    assert_eq!(
        words(&unit_values(&e, "Service", "AmbientCapabilities")),
        caps
    );
    assert_eq!(
        words(&unit_values(&e, "Service", "CapabilityBoundingSet")),
        caps
    );
    assert_eq!(one("NoNewPrivileges"), "yes");
    assert_eq!(one("ProtectSystem"), "strict");
    assert_eq!(one("ProtectHome"), "yes");
    assert_eq!(one("PrivateTmp"), "yes");
    assert_eq!(one("LimitMEMLOCK"), "infinity");
    assert_eq!(one("SystemCallArchitectures"), "native");
    // Plain text in the journal: no ANSI colour codes.
    let environment: Vec<String> = unit_values(&e, "Service", "Environment")
        .iter()
        .flat_map(|v| {
            v.split_whitespace()
                .map(|w| w.trim_matches('"').to_string())
        })
        .collect();
    assert!(
        environment.iter().any(|w| w == "NO_COLOR=1"),
        "Environment=NO_COLOR=1 missing: {environment:?}"
    );
    let families: BTreeSet<String> = ["AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"]
        .map(String::from)
        .into();
    assert_eq!(
        words(&unit_values(&e, "Service", "RestrictAddressFamilies")),
        families
    );
    // Pins and the pid file stay writable; /sys/fs/bpf must not be made read-only.
    let rw = words(&unit_values(&e, "Service", "ReadWritePaths"));
    for path in ["/sys/fs/bpf/memcache-accel", "/run/cache-agent"] {
        assert!(
            rw.iter()
                .any(|p| Path::new(path).starts_with(p.trim_start_matches('-'))),
            "{path} is not under ReadWritePaths {rw:?}"
        );
    }
    assert!(
        unit_values(&e, "Service", "ProtectKernelTunables").is_empty(),
        "ProtectKernelTunables makes /sys/fs/bpf read-only"
    );
    assert!(unit_values(&e, "Service", "ReadOnlyPaths").is_empty());
    assert!(words(&unit_values(&e, "Unit", "After")).contains("memcached.service"));
    assert!(words(&unit_values(&e, "Unit", "Wants")).contains("memcached.service"));
    assert_eq!(
        unit_values(&e, "Install", "WantedBy"),
        ["multi-user.target"]
    );

    // Every command line names a real subcommand and real flags.
    let config_rs = config_source();
    for key in ["ExecStartPre", "ExecStart"] {
        for cmd in unit_values(&e, "Service", key) {
            let argv: Vec<&str> = cmd
                .trim_start_matches(['-', '+', '@', '!', ':'])
                .split_whitespace()
                .collect();
            if argv[0] != "/usr/local/bin/cache-agent" {
                continue;
            }
            assert_subcommand_exists(argv[1]);
            for flag in argv.iter().filter(|a| a.starts_with("--")) {
                assert_flag_exists(flag, &config_rs, &format!("unit {key}"));
            }
        }
    }
}

/// Type=notify and WatchdogSec= only work if the agent speaks sd_notify: without READY=1
/// systemd kills it after TimeoutStartSec, without WATCHDOG=1 after WatchdogSec.
#[test]
fn systemd_unit_matches_what_the_agent_tells_systemd() {
    let e = unit_entries(&read(&deploy("systemd/cache-agent.service")));
    let main_rs = read(&root().join("cache-agent/src/main.rs"));
    if unit_values(&e, "Service", "Type") == ["notify"] {
        assert!(
            main_rs.contains("notify::ready()"),
            "the unit is Type=notify but main.rs never calls notify::ready()"
        );
        assert!(
            main_rs.contains("notify::stopping()"),
            "main.rs never calls notify::stopping()"
        );
    }
    if !unit_values(&e, "Service", "WatchdogSec").is_empty() {
        assert!(
            main_rs.contains("watchdog_loop()"),
            "the unit sets WatchdogSec but main.rs never runs notify::watchdog_loop()"
        );
    }
}

#[test]
fn systemd_analyze_verifies_the_unit() {
    let Some(analyze) = tool("systemd-analyze") else {
        eprintln!("skipped: systemd-analyze is not installed");
        return;
    };
    // verify insists that every Exec binary exists: point them at this test binary.
    let dir = TempDir::new("systemd");
    let exe = std::env::current_exe().unwrap();
    let text = read(&deploy("systemd/cache-agent.service"))
        .replace("/usr/local/bin/cache-agent", exe.to_str().unwrap());
    let unit = dir.0.join("cache-agent.service");
    std::fs::write(&unit, text).unwrap();

    let (ok, stdout, stderr) = run(Command::new(&analyze)
        .args(["verify", "--man=no"])
        .arg(&unit));
    // Unknown keys and bad values are only warnings (exit 0): none may name our unit.
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("cache-agent.service"))
        .collect();
    assert!(
        ok && ours.is_empty(),
        "systemd-analyze verify failed:\n{stdout}\n{stderr}"
    );

    // The exposure score of the hardening (0 best .. 100 worst; "OK" is below 50).
    let (_, help, _) = run(Command::new(&analyze).args(["security", "--help"]));
    if !help.contains("--offline") || !help.contains("--threshold") {
        eprintln!("skipped: this systemd-analyze cannot score a unit file offline");
        return;
    }
    let (ok, stdout, stderr) = run(Command::new(&analyze)
        .args(["security", "--offline=yes", "--threshold=35", "--no-pager"])
        .arg(&unit));
    let verdict = stdout.lines().last().unwrap_or_default();
    assert!(ok, "exposure above 3.5: {verdict}\n{stderr}");
}

#[test]
fn example_config_resolves() {
    let path = deploy("systemd/agent.toml");
    let args = RunArgs {
        config: Some(path.clone()),
        ..Default::default()
    };
    let s = Settings::resolve(&args).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(s.iface, "eth1");
    assert_eq!(
        s.metrics_addr.to_string(),
        "127.0.0.1:9477",
        "prometheus.yml scrapes 127.0.0.1:9477"
    );
    assert_eq!(
        s.pin_root,
        Path::new("/sys/fs/bpf/memcache-accel"),
        "the unit allows writes there"
    );
    assert!(
        !s.allow.is_empty(),
        "the example must not answer every client"
    );
    // Commented-out keys are options too.
    let config_rs = config_source();
    for line in read(&path).lines() {
        let line = line.trim_start_matches('#').trim();
        if let Some((key, _)) = line.split_once(" = ")
            && key.bytes().all(|b| b.is_ascii_lowercase() || b == b'-')
        {
            assert_flag_exists(&format!("--{key}"), &config_rs, "agent.toml");
        }
    }
}

// ---------------------------------------------------------------- Prometheus

fn promtool() -> PathBuf {
    tool("promtool")
        .expect("promtool is missing: apt-get install prometheus (scripts/setup.sh does)")
}

#[test]
fn promtool_accepts_config_and_rules() {
    let promtool = promtool();
    let dir = deploy("prometheus");
    for args in [
        vec!["check", "config", "prometheus.yml"],
        vec!["check", "rules", "alerts.yml"],
        vec!["test", "rules", "alerts_test.yml"],
    ] {
        let (ok, stdout, stderr) = run(Command::new(&promtool).args(&args).current_dir(&dir));
        assert!(ok, "promtool {}:\n{stdout}\n{stderr}", args.join(" "));
    }
    // The scrape target is the agent's default address.
    let cfg = &yaml_docs(&dir.join("prometheus.yml"))[0];
    let jobs = cfg["scrape_configs"].as_sequence().unwrap();
    let agent = jobs
        .iter()
        .find(|j| j["job_name"] == "cache-agent")
        .expect("cache-agent job");
    let targets = &agent["static_configs"][0]["targets"];
    assert_eq!(targets[0].as_str(), Some("127.0.0.1:9477"));
}

/// The names of the alerts in alerts.yml.
fn alert_names() -> BTreeSet<String> {
    let rules = &yaml_docs(&deploy("prometheus/alerts.yml"))[0];
    rules["groups"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_sequence().unwrap())
        .filter_map(|r| r["alert"].as_str().map(str::to_string))
        .collect()
}

/// Every alert named in the brief is there.
#[test]
fn alerts_cover_the_failure_modes() {
    let names = alert_names();
    for want in [
        "CacheAgentDown",
        "CacheAgentNotServing",
        "CacheAgentMemcachedUnreachable",
        "CacheAgentLowHitRatio",
        "CacheAgentHighFillRefusals",
        "CacheAgentWatchDisconnected",
        "CacheAgentFrequentFlushes",
        "CacheAgentKernelReadErrors",
        "CacheAgentCacheFull",
    ] {
        assert!(names.contains(want), "no {want} in alerts.yml: {names:?}");
    }
}

/// Every alert in alerts.yml has a promtool unit test in alerts_test.yml that makes it fire
/// (and the tests name no alert that does not exist); `promtool test rules` runs them in
/// promtool_accepts_config_and_rules.
#[test]
fn every_alert_has_a_unit_test() {
    let names = alert_names();
    let tests = &yaml_docs(&deploy("prometheus/alerts_test.yml"))[0];
    assert_eq!(
        str_list(&tests["rule_files"]),
        ["alerts.yml"],
        "alerts_test.yml tests alerts.yml"
    );
    let mut fired = BTreeSet::new();
    let mut named = BTreeSet::new();
    for test in tests["tests"].as_sequence().unwrap() {
        for case in test["alert_rule_test"].as_sequence().into_iter().flatten() {
            let name = case["alertname"].as_str().unwrap().to_string();
            if case["exp_alerts"]
                .as_sequence()
                .is_some_and(|a| !a.is_empty())
            {
                fired.insert(name.clone());
            }
            named.insert(name);
        }
    }
    let unknown: Vec<&String> = named.difference(&names).collect();
    assert!(
        unknown.is_empty(),
        "alerts_test.yml tests alerts alerts.yml lacks: {unknown:?}"
    );
    let untested: Vec<&String> = names.difference(&fired).collect();
    assert!(
        untested.is_empty(),
        "no test in alerts_test.yml makes these alerts fire: {untested:?}"
    );
}

/// PromQL modifiers followed by a label list in parentheses.
const LABEL_LIST_MODIFIERS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];
/// Other PromQL words that are not metric names.
const PROMQL_KEYWORDS: &[&str] = &[
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
    "atan2", // aggregations, which may come before their `by (...)`:
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];
/// Series Prometheus makes itself for every target.
const PROMETHEUS_SERIES: &[&str] = &["up"];

/// Metric names in a PromQL expression: identifiers outside strings, label matchers, range
/// selectors and label lists, that are not functions, aggregations or keywords.
fn promql_metric_names(expr: &str) -> Vec<String> {
    let b = expr.as_bytes();
    let mut names = Vec::new();
    let mut i = 0;
    let is_ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b':';
    let skip_to = |mut i: usize, close: u8| {
        while i < b.len() && b[i] != close {
            if b[i] == b'"' || b[i] == b'\'' || b[i] == b'`' {
                let q = b[i];
                i += 1;
                while i < b.len() && b[i] != q {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
            }
            i += 1;
        }
        i + 1
    };
    let mut after_grouping_keyword = false;
    while i < b.len() {
        let c = b[i];
        match c {
            b'"' | b'\'' | b'`' => i = skip_to(i + 1, c),
            b'{' => i = skip_to(i + 1, b'}'),
            b'[' => i = skip_to(i + 1, b']'),
            b'(' if after_grouping_keyword => {
                after_grouping_keyword = false;
                i = skip_to(i + 1, b')');
            }
            b'$' => {
                i += 1;
                while i < b.len() && (is_ident(b[i]) || b[i] == b'{' || b[i] == b'}') {
                    i += 1;
                }
            }
            _ if c.is_ascii_digit()
                || (c == b'.' && b.get(i + 1).is_some_and(u8::is_ascii_digit)) =>
            {
                while i < b.len() && (is_ident(b[i]) || b[i] == b'.') {
                    i += 1;
                }
            }
            _ if is_ident(c) => {
                let start = i;
                while i < b.len() && is_ident(b[i]) {
                    i += 1;
                }
                let word = &expr[start..i];
                let mut j = i;
                while j < b.len() && b[j].is_ascii_whitespace() {
                    j += 1;
                }
                let lower = word.to_ascii_lowercase();
                if LABEL_LIST_MODIFIERS.contains(&lower.as_str()) {
                    after_grouping_keyword = true;
                } else if PROMQL_KEYWORDS.contains(&lower.as_str()) {
                } else if b.get(j) == Some(&b'(') {
                    // A function or an aggregation (`sum by (x) (...)` is handled by the keyword).
                } else {
                    names.push(word.to_string());
                }
            }
            _ => i += 1,
        }
        if !c.is_ascii_whitespace() && !is_ident(c) && c != b'(' {
            after_grouping_keyword = false;
        }
    }
    names
}

#[test]
fn promql_name_extraction() {
    let e = r#"histogram_quantile(0.99, sum by (le, instance) (rate(a_bucket{job=~"x|y",le!="1"}[$__rate_interval])))
        / on (instance) group_left (mode) b offset 5m > bool 0.5 and c{x="}"} unless sum without (z) (d[5m:1m]) * 2e3"#;
    assert_eq!(promql_metric_names(e), ["a_bucket", "b", "c", "d"]);
    assert_eq!(promql_metric_names(r#"up{job=~"$job"} == 0"#), ["up"]);
}

/// Whether `name` is an exported series: a family name, or a histogram's `_bucket`, `_sum`
/// or `_count`.
fn exported(name: &str) -> bool {
    if METRIC_NAMES.contains(&name) || PROMETHEUS_SERIES.contains(&name) {
        return true;
    }
    ["_bucket", "_sum", "_count"].iter().any(|suffix| {
        name.strip_suffix(suffix).is_some_and(|base| {
            FAMILIES
                .iter()
                .any(|f| f.name == base && f.kind == Kind::Histogram)
        })
    })
}

fn base_name(name: &str) -> &str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix)
            && METRIC_NAMES.contains(&base)
        {
            return base;
        }
    }
    name
}

/// Every `"expr"` string in a JSON document, and every `label_values(metric, label)` query.
fn json_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(s)) => out.push(s.clone()),
                    ("query" | "definition", serde_json::Value::String(s))
                        if s.starts_with("label_values(") =>
                    {
                        let inner = &s["label_values(".len()..s.rfind(',').unwrap_or(s.len())];
                        out.push(inner.to_string());
                    }
                    _ => json_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| json_exprs(v, out)),
        _ => {}
    }
}

/// All PromQL of the dashboard (panels, annotations, variables).
fn dashboard_exprs() -> Vec<String> {
    let dash: serde_json::Value =
        serde_json::from_str(&read(&deploy("grafana/dashboard.json"))).expect("dashboard JSON");
    let mut exprs = Vec::new();
    json_exprs(&dash, &mut exprs);
    exprs
}

#[test]
fn dashboard_queries_only_exported_metrics_and_shows_them_all() {
    let exprs = dashboard_exprs();
    assert!(exprs.len() > 20, "{} queries", exprs.len());
    let mut used = BTreeSet::new();
    for expr in &exprs {
        let names = promql_metric_names(expr);
        assert!(!names.is_empty(), "no metric in {expr}");
        for name in names {
            assert!(
                exported(&name),
                "dashboard query uses {name}, which the agent does not export: {expr}"
            );
            used.insert(base_name(&name).to_string());
        }
    }
    let missing: Vec<&&str> = METRIC_NAMES
        .iter()
        .filter(|n| !used.contains(**n))
        .collect();
    assert!(missing.is_empty(), "exported but on no panel: {missing:?}");
    // Histogram panels use the buckets.
    for f in FAMILIES.iter().filter(|f| f.kind == Kind::Histogram) {
        let bucket = format!("{}_bucket", f.name);
        assert!(
            exprs
                .iter()
                .any(|e| e.contains("histogram_quantile") && e.contains(&bucket)),
            "no quantiles of {}",
            f.name
        );
    }
    // Panels are laid out on the 24-column grid without overlapping.
    let dash: serde_json::Value =
        serde_json::from_str(&read(&deploy("grafana/dashboard.json"))).unwrap();
    let mut cells = BTreeMap::new();
    for p in dash["panels"].as_array().unwrap() {
        let g = &p["gridPos"];
        let (x, y, w, h) = (
            g["x"].as_u64().unwrap(),
            g["y"].as_u64().unwrap(),
            g["w"].as_u64().unwrap(),
            g["h"].as_u64().unwrap(),
        );
        assert!(x + w <= 24, "{} overflows the grid", p["title"]);
        for cx in x..x + w {
            for cy in y..y + h {
                if let Some(other) = cells.insert((cx, cy), p["title"].clone()) {
                    panic!("{} overlaps {other}", p["title"]);
                }
            }
        }
    }
}

#[test]
fn alert_rules_query_only_exported_metrics() {
    for file in ["alerts.yml"] {
        let rules = &yaml_docs(&deploy(&format!("prometheus/{file}")))[0];
        for group in rules["groups"].as_sequence().unwrap() {
            for rule in group["rules"].as_sequence().unwrap() {
                let expr = rule["expr"].as_str().unwrap();
                for name in promql_metric_names(expr) {
                    assert!(
                        exported(&name),
                        "{file}: {:?} uses {name}, which the agent does not export",
                        rule["alert"]
                    );
                }
            }
        }
    }
}

// ---------------------------------------------------------------- Kubernetes

fn str_list(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Every document of every manifest in deploy/kubernetes.
fn kube_docs() -> Vec<Value> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(deploy("kubernetes"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    paths.sort();
    paths.iter().flat_map(|p| yaml_docs(p)).collect()
}

/// A pod's containers, init containers (and native sidecars) included.
fn pod_containers(pod: &Value) -> Vec<&Value> {
    ["initContainers", "containers"]
        .iter()
        .flat_map(|k| {
            pod[*k]
                .as_sequence()
                .map(|s| s.iter().collect::<Vec<_>>())
                .unwrap_or_default()
        })
        .collect()
}

/// The DaemonSet whose pod runs a container named `container`, and that container.
fn daemonset_running<'a>(docs: &'a [Value], container: &str) -> (&'a Value, &'a Value) {
    let found: Vec<(&Value, &Value)> = docs
        .iter()
        .filter(|d| d["kind"] == "DaemonSet")
        .flat_map(|ds| {
            pod_containers(&ds["spec"]["template"]["spec"])
                .into_iter()
                .filter(|c| c["name"] == container)
                .map(move |c| (ds, c))
        })
        .collect();
    assert_eq!(
        found.len(),
        1,
        "exactly one DaemonSet container named {container}"
    );
    found[0]
}

/// The agent container's environment as the kubelet would set it (ConfigMap keys resolved,
/// `$(VAR)` references expanded, field references given a node address), and the same
/// settings as `cache-agent` flags (each CACHE_AGENT_X is the variable of --x).
fn agent_env(docs: &[Value], agent: &Value) -> (BTreeMap<String, String>, Vec<String>) {
    let config_maps: BTreeMap<&str, &Value> = docs
        .iter()
        .filter(|d| d["kind"] == "ConfigMap")
        .map(|d| (d["metadata"]["name"].as_str().unwrap(), &d["data"]))
        .collect();
    let config_rs = config_source();
    let mut env = BTreeMap::new();
    let mut cli = vec!["cache-agent".to_string()];
    for var in agent["env"].as_sequence().unwrap() {
        let name = var["name"].as_str().unwrap();
        let value = if let Some(v) = var["value"].as_str() {
            // $(NAME) expands variables defined earlier in the list, as the kubelet does.
            env.iter()
                .fold(v.to_string(), |v, (k, x): (&String, &String)| {
                    v.replace(&format!("$({k})"), x)
                })
        } else if let Some(r) = var["valueFrom"]["configMapKeyRef"].as_mapping() {
            let cm = r[&Value::from("name")].as_str().unwrap();
            let key = r[&Value::from("key")].as_str().unwrap();
            let data = config_maps
                .get(cm)
                .unwrap_or_else(|| panic!("{name}: no ConfigMap {cm}"));
            data[key]
                .as_str()
                .unwrap_or_else(|| panic!("{name}: ConfigMap {cm} has no key {key}"))
                .to_string()
        } else {
            assert!(
                var["valueFrom"]["fieldRef"].is_mapping(),
                "{name}: unexpected valueFrom"
            );
            "10.1.2.3".to_string()
        };
        assert!(
            !value.contains("$("),
            "{name}={value}: refers to a variable not defined before it"
        );
        env.insert(name.to_string(), value.clone());
        if let Some(option) = name.strip_prefix("CACHE_AGENT_") {
            assert_env_exists(name, &config_rs, "daemonset env");
            cli.push(format!(
                "--{}",
                option.to_ascii_lowercase().replace('_', "-")
            ));
            cli.push(value);
        }
    }
    (env, cli)
}

/// The memcached argument after `flag`.
fn arg_after<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

#[test]
fn kubernetes_manifests() {
    let docs = kube_docs();
    let kinds: BTreeSet<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    assert_eq!(
        kinds,
        BTreeSet::from(["ConfigMap", "DaemonSet", "Namespace"])
    );
    let namespace = docs.iter().find(|d| d["kind"] == "Namespace").unwrap()["metadata"]["name"]
        .as_str()
        .unwrap();
    for d in docs.iter().filter(|d| d["kind"] != "Namespace") {
        assert_eq!(
            d["metadata"]["namespace"].as_str(),
            Some(namespace),
            "{:?}",
            d["metadata"]["name"]
        );
    }

    // Two DaemonSets: the agent's and memcached's, so an agent rollout never restarts
    // memcached (and empties the cache).
    let daemonsets: Vec<&Value> = docs.iter().filter(|d| d["kind"] == "DaemonSet").collect();
    assert_eq!(
        daemonsets.len(),
        2,
        "the agent's and memcached's DaemonSets"
    );
    let (ds, agent) = daemonset_running(&docs, "cache-agent");
    let (mc_ds, memcached) = daemonset_running(&docs, "memcached");
    assert_ne!(
        ds["metadata"]["name"], mc_ds["metadata"]["name"],
        "memcached must not run in the agent's pod"
    );
    let pod = &ds["spec"]["template"]["spec"];
    let mc_pod = &mc_ds["spec"]["template"]["spec"];
    let agent_pod_containers: Vec<&str> = pod_containers(pod)
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(
        agent_pod_containers,
        ["cache-agent"],
        "the agent's pod runs the agent only"
    );
    assert!(
        pod_containers(pod)
            .iter()
            .all(|c| !c["image"].as_str().unwrap_or("").contains("memcached")),
        "no memcached image in the agent's pod"
    );
    for (what, ds) in [("agent", ds), ("memcached", mc_ds)] {
        let pod = &ds["spec"]["template"]["spec"];
        // The agent: XDP sees only the host's NIC traffic, and it must see memcached's sockets
        // and reach it on 127.0.0.1; memcached: clients reach it on the node's address.
        assert_eq!(
            pod["hostNetwork"].as_bool(),
            Some(true),
            "{what}: hostNetwork"
        );
        let selector = ds["spec"]["selector"]["matchLabels"].as_mapping().unwrap();
        for (k, v) in selector {
            assert_eq!(
                &ds["spec"]["template"]["metadata"]["labels"][k], v,
                "{what}: selector does not match the pod labels"
            );
        }
    }
    // Neither DaemonSet's selector matches the other's pods.
    for (a, b) in [(ds, mc_ds), (mc_ds, ds)] {
        let labels = &b["spec"]["template"]["metadata"]["labels"];
        let selector = a["spec"]["selector"]["matchLabels"].as_mapping().unwrap();
        assert!(
            selector.iter().any(|(k, v)| &labels[k] != v),
            "{:?}'s selector matches {:?}'s pods",
            a["metadata"]["name"],
            b["metadata"]["name"]
        );
    }
    // Same nodes.
    assert_eq!(pod["nodeSelector"], mc_pod["nodeSelector"], "nodeSelector");
    assert!(pod["nodeSelector"].is_mapping(), "cache nodes are labelled");
    assert_eq!(pod["tolerations"], mc_pod["tolerations"], "tolerations");
    // memcached is restarted only deliberately; the agent rolls.
    assert_eq!(
        mc_ds["spec"]["updateStrategy"]["type"].as_str(),
        Some("OnDelete"),
        "memcached's pods restart only when deleted on purpose"
    );
    assert_ne!(
        ds["spec"]["updateStrategy"]["type"].as_str(),
        Some("OnDelete")
    );

    // memcached: the exact version the coherence rules follow, with UDP on.
    let image = memcached["image"].as_str().unwrap();
    let (repo, tag) = image
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("memcached image {image} has no tag"));
    assert!(repo.ends_with("memcached"), "{image}");
    let version = tag.split('-').next().unwrap();
    assert_eq!(
        version, "1.6.18",
        "memcached image {image}: pin the exact version the coherence rules follow (1.6.18)"
    );
    assert!(
        version.split('.').count() == 3 && version.split('.').all(|p| p.parse::<u32>().is_ok()),
        "{image}: not an exact version"
    );
    let mc_args = str_list(&memcached["args"]);
    assert!(
        mc_args.contains(&"-U".to_string()),
        "memcached needs -U for UDP"
    );

    // Agent privileges: exactly three capabilities, not privileged.
    let sc = &agent["securityContext"];
    assert_ne!(sc["privileged"].as_bool(), Some(true));
    assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
    let mut add = str_list(&sc["capabilities"]["add"]);
    add.sort();
    assert_eq!(add, ["BPF", "NET_ADMIN", "PERFMON"]);
    assert_eq!(str_list(&sc["capabilities"]["drop"]), ["ALL"]);

    // bpffs and /run from the host.
    let volumes: BTreeMap<&str, &Value> = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| (v["name"].as_str().unwrap(), v))
        .collect();
    let mounts = agent["volumeMounts"].as_sequence().unwrap();
    let host_path_of = |mount_path: &str| {
        let m = mounts.iter().find(|m| m["mountPath"] == mount_path)?;
        volumes[m["name"].as_str().unwrap()]["hostPath"]["path"]
            .as_str()
            .map(str::to_string)
    };
    assert_eq!(
        host_path_of("/sys/fs/bpf").as_deref(),
        Some("/sys/fs/bpf"),
        "bpffs hostPath mount"
    );
    let run_mount = mounts
        .iter()
        .find(|m| {
            m["mountPath"]
                .as_str()
                .is_some_and(|p| p.starts_with("/run"))
        })
        .expect("a /run mount");
    let run_path = run_mount["mountPath"].as_str().unwrap();
    assert!(
        host_path_of(run_path).is_some_and(|p| p.starts_with("/run")),
        "/run from the host"
    );

    // Flags and variables are the agent's; the ConfigMap keys they use exist.
    let config_rs = config_source();
    let args = str_list(&agent["args"]);
    assert_subcommand_exists(&args[0]);
    for flag in args.iter().filter(|a| a.starts_with("--")) {
        assert_flag_exists(flag, &config_rs, "daemonset args");
    }
    let (env, cli) = agent_env(&docs, agent);
    assert!(
        agent["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|v| v["name"] == "CACHE_AGENT_IFACE"
                && v["valueFrom"]["configMapKeyRef"].is_mapping()),
        "CACHE_AGENT_IFACE comes from the ConfigMap"
    );
    assert_eq!(
        env.get("NO_COLOR").map(String::as_str),
        Some("1"),
        "no ANSI colour codes in the agent's logs"
    );
    // The same settings, as flags, resolve.
    let parsed = RunCli::try_parse_from(&cli).unwrap_or_else(|e| panic!("{cli:?}: {e}"));
    let settings = Settings::resolve(&parsed.args).unwrap_or_else(|e| panic!("{cli:?}: {e}"));

    // The agent finds memcached where its DaemonSet listens: on loopback (same host network),
    // TCP and UDP on the ports the agent uses.
    assert!(
        settings.memcached.ip().is_loopback(),
        "the agent reaches memcached on the node's loopback: {}",
        settings.memcached
    );
    assert_eq!(
        arg_after(&mc_args, "-p"),
        Some(settings.tcp_port.to_string().as_str()),
        "memcached's TCP port (-p) is the agent's"
    );
    assert_eq!(
        arg_after(&mc_args, "-U"),
        Some(settings.udp_port.to_string().as_str()),
        "memcached's UDP port (-U) is the agent's"
    );
    let listen = arg_after(&mc_args, "-l").expect("memcached -l");
    assert!(
        listen.split(',').any(|a| a == "127.0.0.1"),
        "memcached listens on loopback for the agent: -l {listen}"
    );
    let mc_ports: BTreeSet<(u64, &str)> = memcached["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["containerPort"].as_u64().unwrap(),
                p["protocol"].as_str().unwrap_or("TCP"),
            )
        })
        .collect();
    assert!(mc_ports.contains(&(u64::from(settings.tcp_port), "TCP")));
    assert!(mc_ports.contains(&(u64::from(settings.udp_port), "UDP")));

    // Metrics port, probes and the scrape annotation agree with the agent's address.
    let port = agent["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "metrics")
        .and_then(|p| p["containerPort"].as_u64())
        .expect("a metrics port");
    assert_eq!(u64::from(settings.metrics_addr.port()), port);
    let annotations = &ds["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(
        annotations["prometheus.io/port"].as_str(),
        Some(port.to_string().as_str())
    );
    assert_eq!(annotations["prometheus.io/path"].as_str(), Some("/metrics"));
    for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
        let get = &agent[probe]["httpGet"];
        if probe == "livenessProbe" {
            assert!(get.is_mapping(), "the agent needs a liveness probe");
        }
        if get.is_mapping() {
            // Liveness must not depend on memcached: a restart would not bring it back.
            let path = if probe == "livenessProbe" {
                "/livez"
            } else {
                "/healthz"
            };
            assert_eq!(get["path"].as_str(), Some(path), "{probe}");
            assert!(
                get["port"] == "metrics" || get["port"].as_u64() == Some(port),
                "{probe} port"
            );
        }
    }
}

// ---------------------------------------------------------------- memory sizing

/// What the agent needs beyond its maps: its own RSS (~25 MB) and the small fixed maps.
const AGENT_HEADROOM: u64 = 64 << 20;

/// A Kubernetes memory quantity in bytes ("448Mi", "1Gi", "500M", "1e9", "1048576").
fn quantity_bytes(q: &str) -> u64 {
    const SUFFIXES: &[(&str, f64)] = &[
        ("Ki", 1024.0),
        ("Mi", 1048576.0),
        ("Gi", 1073741824.0),
        ("Ti", 1099511627776.0),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
    ];
    let (num, mult) = SUFFIXES
        .iter()
        .find_map(|(s, m)| q.strip_suffix(s).map(|n| (n, *m)))
        .unwrap_or((q, 1.0));
    let n: f64 = num
        .parse()
        .unwrap_or_else(|e| panic!("memory quantity {q:?}: {e}"));
    (n * mult) as u64
}

/// The map memory `cache-agent check-config` reports: its `map memory: N bytes` line (without
/// an exact byte count there, the largest figure with a KiB/MiB/GiB unit on that line).
fn parse_map_memory(stdout: &str) -> Option<u64> {
    let line = stdout
        .lines()
        .find(|l| l.to_ascii_lowercase().contains("map memory"))?;
    let tokens: Vec<&str> = line
        .split(|c: char| c.is_whitespace() || "():,=".contains(c))
        .filter(|t| !t.is_empty())
        .collect();
    let figures: Vec<(bool, u64)> = tokens
        .windows(2)
        .filter_map(|w| {
            let n: f64 = w[0].parse().ok()?;
            let mult = match w[1] {
                "bytes" | "byte" | "B" => 1.0,
                "KiB" => 1024.0,
                "MiB" => 1048576.0,
                "GiB" => 1073741824.0,
                _ => return None,
            };
            Some((mult == 1.0, (n * mult) as u64))
        })
        .collect();
    let exact = figures.iter().filter(|f| f.0).map(|f| f.1).max();
    exact.or_else(|| figures.iter().map(|f| f.1).max())
}

#[test]
fn map_memory_line_parses() {
    assert_eq!(
        parse_map_memory("Settings {}\nmap memory: 369093040 bytes\n"),
        Some(369093040)
    );
    assert_eq!(
        parse_map_memory("map memory: 352.0 MiB (369093040 bytes)"),
        Some(369093040)
    );
    assert_eq!(parse_map_memory("map memory: 352 MiB"), Some(352 << 20));
    assert_eq!(parse_map_memory("Settings {}"), None);
    assert_eq!(quantity_bytes("448Mi"), 448 << 20);
    assert_eq!(quantity_bytes("1Gi"), 1 << 30);
    assert_eq!(quantity_bytes("500M"), 500_000_000);
    assert_eq!(quantity_bytes("1048576"), 1 << 20);
}

/// `CACHE_AGENT_BIN`; else the newest `cache-agent` of the target directory this test was
/// built in, `target/debug` and `target/release`.
fn agent_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CACHE_AGENT_BIN") {
        return Some(p.into());
    }
    let exe = std::env::current_exe().ok()?;
    // target/debug/deps/deploy-<hash> -> target/debug/cache-agent
    let beside = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("cache-agent"));
    [
        beside,
        Some(root().join("target/debug/cache-agent")),
        Some(root().join("target/release/cache-agent")),
    ]
    .into_iter()
    .flatten()
    .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
    .max_by_key(|(t, _)| *t)
    .map(|(_, p)| p)
}

/// The agent container's memory request and limit cover the map memory that `cache-agent
/// check-config` reports for the pod's settings (the ConfigMap's capacity), plus the agent's
/// own: BPF maps are charged to the container's memory cgroup, and more than `capacity`.
#[test]
fn kubernetes_memory_covers_the_agents_maps() {
    let docs = kube_docs();
    let (_, agent) = daemonset_running(&docs, "cache-agent");
    let (env, cli) = agent_env(&docs, agent);
    let capacity = &env["CACHE_AGENT_CAPACITY"];

    // The function check-config prints, in this build.
    let parsed = RunCli::try_parse_from(&cli).unwrap_or_else(|e| panic!("{cli:?}: {e}"));
    let settings = Settings::resolve(&parsed.args).unwrap_or_else(|e| panic!("{cli:?}: {e}"));
    let in_process = settings.map_bytes();

    // check-config itself, with exactly the pod's CACHE_AGENT_* environment.
    let maps = match agent_bin() {
        Some(bin) => {
            let mut cmd = Command::new(&bin);
            cmd.arg("check-config");
            for (k, _) in std::env::vars_os() {
                if k.to_string_lossy().starts_with("CACHE_AGENT_") {
                    cmd.env_remove(k);
                }
            }
            cmd.envs(env.iter().filter(|(k, _)| k.starts_with("CACHE_AGENT_")));
            let (ok, stdout, stderr) = run(&mut cmd);
            assert!(ok, "{} check-config:\n{stdout}\n{stderr}", bin.display());
            let reported = parse_map_memory(&stdout).unwrap_or_else(|| {
                panic!(
                    "{} check-config printed no map memory:\n{stdout}",
                    bin.display()
                )
            });
            if reported != in_process {
                eprintln!(
                    "note: {} reports {reported} bytes of map memory, this source {in_process}: \
                     a stale binary? Checking against the larger.",
                    bin.display()
                );
            }
            reported.max(in_process)
        }
        None => {
            eprintln!(
                "note: no cache-agent binary (cargo build -p cache-agent, or CACHE_AGENT_BIN): \
                 checking against Settings::map_bytes(), the figure check-config prints"
            );
            in_process
        }
    };
    assert!(
        maps > settings.capacity_bytes,
        "map memory {maps} for capacity {capacity}: expected more than the capacity"
    );

    let need = maps + AGENT_HEADROOM;
    let mib = |b: u64| b as f64 / 1048576.0;
    let resources = &agent["resources"];
    let request = resources["requests"]["memory"]
        .as_str()
        .expect("the agent's memory request");
    let limit = resources["limits"]["memory"]
        .as_str()
        .expect("the agent's memory limit");
    for (what, q) in [("request", request), ("limit", limit)] {
        assert!(
            quantity_bytes(q) >= need,
            "the agent's memory {what} {q} ({:.0} MiB) is below the map memory of capacity \
             {capacity} ({:.0} MiB, cache-agent check-config) plus {:.0} MiB for the agent: \
             at least {:.0} MiB",
            mib(quantity_bytes(q)),
            mib(maps),
            mib(AGENT_HEADROOM),
            mib(need)
        );
    }
    assert!(
        quantity_bytes(limit) >= quantity_bytes(request),
        "limit {limit} below request {request}"
    );
}
