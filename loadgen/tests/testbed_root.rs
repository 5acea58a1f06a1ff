//! The veth testbed, for real (needs root: network namespaces, veth, memcached as root).
//! Builds a testbed, runs UDP and TCP workloads from the client namespace over IPv4 and IPv6,
//! restarts memcached, and checks that dropping the handle (or `down`) removes everything.

use std::path::Path;
use std::time::Duration;

use loadgen::runner::{self, RunConfig, Transport};
use loadgen::testbed::{self, Testbed, TestbedConfig, TestbedError};
use loadgen::units::HumanDuration;
use loadgen::workload::Workload;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn short_run(
    server: std::net::SocketAddr,
    transport: Transport,
    populate: bool,
) -> loadgen::RunReport {
    let mut w = Workload::default();
    w.keyspace.keys = 5_000;
    w.phases.populate = populate;
    w.phases.warmup = HumanDuration(Duration::from_millis(100));
    w.phases.duration = HumanDuration(Duration::from_secs(1));
    let mut rc = RunConfig::new(vec![server], transport, w);
    rc.timeout = Duration::from_millis(300);
    runner::run(&rc).unwrap().report
}

#[test]
fn testbed_up_run_restart_and_drop_needs_root() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let ns_srv = Path::new("/run/netns/lgtst-srv");
    {
        let mut tb = Testbed::up(TestbedConfig {
            name: "lgtst".into(),
            subnet: 249,
            memcached_port: 11311,
            memcached_args: vec!["-m".into(), "64".into(), "-t".into(), "1".into()],
            ..TestbedConfig::default()
        })
        .unwrap();
        assert!(ns_srv.exists());
        assert_eq!(tb.server_iface(), "lgtsts");
        assert_eq!(tb.client_netns(), "lgtst-cli");
        assert_eq!(tb.server_v4().to_string(), "198.18.249.1");
        assert_eq!(tb.server_v6().to_string(), "2001:2:0:f9::1");
        let pid = tb.memcached_pid();
        assert!(pid > 0 && Path::new(&format!("/proc/{pid}")).exists());

        let v4 = std::net::SocketAddr::from((tb.server_v4(), tb.memcached_port()));
        let r = tb.in_client(move || short_run(v4, Transport::Udp, true));
        assert!(r.counters.get_hits > 100, "{:?}", r.counters);
        assert_eq!(r.counters.get_misses, 0);
        let v6 = std::net::SocketAddr::from((tb.server_v6(), tb.memcached_port()));
        let r = tb.in_client(move || short_run(v6, Transport::Tcp, false));
        assert!(r.counters.get_hits > 100, "{:?}", r.counters);

        // The client namespace cannot see the server's loopback, the server namespace can.
        let port = tb.memcached_port();
        let lo = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        assert!(tb.in_server(move || testbed::memcached_answers(lo)));
        assert!(!tb.in_client(move || testbed::memcached_answers(lo)));

        tb.start_memcached().unwrap();
        assert_ne!(tb.memcached_pid(), pid);
        assert!(
            !Path::new(&format!("/proc/{pid}/cmdline")).exists() || {
                std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|s| s.contains(") Z"))
            }
        );
        let r = tb.in_client(move || short_run(v4, Transport::Udp, false));
        assert_eq!(r.counters.get_hits, 0, "a restarted memcached is empty");

        if !testbed::agent_bin().is_file() {
            // The agent is not built: start_agent must fail cleanly.
            let e = tb.start_agent(&[]).unwrap_err();
            assert!(
                matches!(
                    e,
                    TestbedError::AgentNotReady { .. } | TestbedError::Spawn { .. }
                ),
                "{e}"
            );
            assert_eq!(tb.agent_pid(), None);
        }
    }
    assert!(!ns_srv.exists(), "drop must delete the namespaces");
    assert!(!Path::new("/run/loadgen-testbed/lgtst").exists());
}

#[test]
fn persisted_testbed_is_reopened_and_torn_down_needs_root() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let tb = Testbed::up(TestbedConfig {
        name: "lgtsp".into(),
        subnet: 248,
        memcached_port: 11312,
        ..TestbedConfig::default()
    })
    .unwrap();
    let pid = tb.memcached_pid();
    tb.persist();
    assert!(Path::new("/run/netns/lgtsp-cli").exists());
    {
        let again = Testbed::open("lgtsp").unwrap();
        assert_eq!(again.memcached_pid(), pid);
        assert_eq!(again.server_v4().to_string(), "198.18.248.1");
    }
    // Dropping an opened handle leaves the testbed running.
    assert!(Path::new("/run/netns/lgtsp-cli").exists());
    testbed::down("lgtsp").unwrap();
    testbed::down("lgtsp").unwrap();
    assert!(!Path::new("/run/netns/lgtsp-cli").exists());
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while Path::new(&format!("/proc/{pid}/cmdline")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z"))
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(matches!(
        Testbed::open("lgtsp"),
        Err(TestbedError::NotFound { .. })
    ));
}
