//! Loads the eBPF object sized to the settings and attaches it: XDP on the interface (native
//! unless generic was asked for; no silent fallback), TC egress for fills, and TC ingress for
//! the hits whose reply the XDP frame cannot hold. The links belong
//! to this process: if it dies, the kernel detaches them and memcached answers everything.

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, ProgramArray},
    programs::{
        SchedClassifier, TcAttachType, Xdp, XdpMode as AyaXdpMode,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, SchedClassifierLinkId},
        xdp::{XdpLink, XdpLinkId},
    },
};
use cache_common::{CLASS_COUNT, Config, Instance, MAX_INSTANCES, flags, names};
use tracing::info;

use crate::config::{Settings, XdpMode};
use crate::error::{AgentError, Result};
use crate::kernel;

/// TCP flow states kept at once (LRU).
const FLOWS: u32 = 1 << 16;

pub struct Accelerator {
    pub ebpf: Ebpf,
}

/// Maps kept pinned under the pin directory: the cache and its bookkeeping survive an agent
/// restart in upgrade mode, and `cache-agent stats` reads the counters from another process.
/// JUMP is pinned because closing the last reference of a program array empties it (the
/// entry program would lose its tail calls between agents; it then passes everything and
/// flushes on writes), and SCRATCH because the old entry program and the new tail-called
/// programs share it while the links are handed over. (Not the allowlist: it is rebuilt from
/// the configuration every start.)
pub const PINNED_MAPS: [&str; 14] = [
    names::JUMP,
    names::SCRATCH,
    names::CLASS_MAPS[0],
    names::CLASS_MAPS[1],
    names::CLASS_MAPS[2],
    names::CLASS_MAPS[3],
    names::KEY_META,
    names::STATE,
    names::CONFIG,
    names::TCP_FLOWS,
    names::FILL_TICKETS,
    names::COUNTERS,
    names::HIT_LATENCY,
    names::MISS_LATENCY,
];
const LINK_XDP: &str = "link_xdp";
const LINK_TC: &str = "link_tc";
const LINK_TC_SERVE: &str = "link_tc_serve";

/// Whether `dir` holds a kept cache this agent can adopt: links pinned by an agent in upgrade
/// mode, and maps of the same sizes (the pinned CONFIG says which).
pub fn can_adopt(dir: &std::path::Path, settings: &Settings) -> bool {
    if !dir.join(LINK_XDP).exists() || !dir.join(LINK_TC).exists() {
        return false;
    }
    match kernel::pinned_config(dir) {
        Ok(c) => {
            c.class_buckets == settings.class_buckets && c.key_meta_slots == settings.key_meta_slots
        }
        Err(_) => false,
    }
}

/// Why the pins in `dir` are not adopted, for the log (found by QA round 7: one line said
/// "left by a previous agent" whatever the reason).
pub fn why_not_adopted(dir: &std::path::Path, settings: &Settings) -> &'static str {
    let kept_links = dir.join(LINK_XDP).exists() && dir.join(LINK_TC).exists();
    if !kept_links {
        "no kept links: the previous agent crashed or stopped without upgrade mode"
    } else if !settings.keep_on_exit {
        "the previous agent kept its cache for an upgrade, but this one runs without \
         --keep-on-exit true (only an agent in upgrade mode adopts)"
    } else {
        "the kept maps have other sizes (capacity, class shares or key slots changed)"
    }
}

/// Loads (and so verifies) every program, sized from `settings`, without attaching. The maps
/// in [`PINNED_MAPS`] are opened from `pin_dir` if pinned there, else created and pinned.
pub fn load_pinned(settings: &Settings, pin_dir: &std::path::Path) -> Result<Ebpf> {
    // The nearest part of the path that exists must be on bpffs: under `ip netns exec` (a
    // fresh /sys) or without bpffs mounted, /sys/fs/bpf is a plain sysfs directory.
    if !pin_dir
        .ancestors()
        .find(|p| p.exists())
        .is_some_and(on_bpffs)
    {
        return Err(AgentError::Pin {
            path: pin_dir.to_owned(),
            detail: "not on a BPF filesystem (bpffs), so nothing can be pinned there. Fix: \
                     `mount -t bpf bpf /sys/fs/bpf`; under `ip netns exec`, which mounts a \
                     /sys of its own, run the agent with `nsenter --net=/run/netns/NAME` \
                     instead"
                .into(),
        });
    }
    std::fs::create_dir_all(pin_dir).map_err(|e| AgentError::Pin {
        path: pin_dir.to_owned(),
        detail: e.to_string(),
    })?;
    let paths: Vec<(&str, std::path::PathBuf)> =
        PINNED_MAPS.iter().map(|n| (*n, pin_dir.join(n))).collect();
    let mut loader = EbpfLoader::new();
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    configure_and_load(&mut loader, settings, crate::EBPF_OBJECT)
}

/// Whether `path` lies on a BPF filesystem (where maps and links can be pinned).
fn on_bpffs(path: &std::path::Path) -> bool {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs on a NUL-terminated path into a zeroed struct.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

/// Loads (and so verifies) every program, sized from `settings`, without attaching or pinning.
pub fn load(settings: &Settings) -> Result<Ebpf> {
    load_object(settings, crate::EBPF_OBJECT)
}

/// [`load`] for another build of the kernel object (the hit-path benchmark's baseline arm).
pub fn load_object(settings: &Settings, object: &[u8]) -> Result<Ebpf> {
    let mut loader = EbpfLoader::new();
    configure_and_load(&mut loader, settings, object)
}

fn configure_and_load(
    loader: &mut EbpfLoader<'_>,
    settings: &Settings,
    object: &[u8],
) -> Result<Ebpf> {
    for c in 0..CLASS_COUNT {
        loader.map_max_entries(names::CLASS_MAPS[c], settings.class_buckets[c].max(1));
    }
    loader.map_max_entries(names::KEY_META, settings.key_meta_slots);
    loader.map_max_entries(names::FILL_TICKETS, cache_common::FILL_TICKET_SLOTS);
    loader.map_max_entries(names::TCP_FLOWS, FLOWS);
    // The hit path's lock-free bucket read relies on x86 keeping loads in order; elsewhere its
    // readers take the bucket lock. (Not required to exist: older builds, loaded as the hit-path
    // benchmark's baseline, lack it.)
    const LOCKED_READS: u8 = !cfg!(target_arch = "x86_64") as u8;
    loader.override_global(names::LOCKED_READS, &LOCKED_READS, false);
    let mut ebpf = loader.load(object)?;
    for name in [
        names::XDP_GET,
        names::XDP_SCAN,
        names::XDP_CACHE,
        names::XDP_PASS,
        names::XDP_REFLECTOR,
        names::XDP_LEARN_TTL,
        names::XDP_WARM_FILL,
    ] {
        let prog: &mut Xdp = ebpf
            .program_mut(name)
            .expect("in object")
            .try_into()
            .expect("xdp");
        prog.load().map_err(|source| AgentError::Program {
            program: name,
            source,
        })?;
    }
    // The entry program tail-calls these; the map stays open as long as `ebpf` lives (closing
    // the last user fd of a program array empties it).
    for (index, name) in [
        (names::JUMP_GET, names::XDP_GET),
        (names::JUMP_SCAN, names::XDP_SCAN),
    ] {
        let fd = {
            let prog: &Xdp = ebpf
                .program(name)
                .expect("in object")
                .try_into()
                .expect("xdp");
            prog.fd()
                .map_err(|source| AgentError::Program {
                    program: name,
                    source,
                })?
                .try_clone()?
        };
        let mut jump: ProgramArray<&mut MapData> = ProgramArray::try_from(
            ebpf.map_mut(names::JUMP).expect("in object"),
        )
        .map_err(|source| AgentError::Map {
            map: names::JUMP,
            source,
        })?;
        jump.set(index, &fd, 0).map_err(|source| AgentError::Map {
            map: names::JUMP,
            source,
        })?;
    }
    for name in [names::TC_FILL, names::TC_SERVE] {
        let tc: &mut SchedClassifier = ebpf
            .program_mut(name)
            .expect("in object")
            .try_into()
            .expect("tc");
        tc.load().map_err(|source| AgentError::Program {
            program: name,
            source,
        })?;
    }
    Ok(ebpf)
}

/// The configuration the kernel starts with: serving off until the first lease renewal.
pub fn initial_config(settings: &Settings) -> Config {
    let mut instances = [Instance::default(); MAX_INSTANCES];
    instances[0] = Instance {
        tcp_port: settings.tcp_port,
        udp_port: settings.udp_port,
    };
    let mut f = flags::FILL;
    if settings.hit_latency {
        f |= flags::HIT_LATENCY;
    }
    if !settings.allow.is_empty() {
        f |= flags::ALLOWLIST;
    }
    if settings.learn_ttl {
        f |= flags::LEARN_TTL;
    }
    let serve_ifindex = std::ffi::CString::new(settings.iface.as_str())
        // SAFETY: NUL-terminated name.
        .map(|n| unsafe { libc::if_nametoindex(n.as_ptr()) })
        .unwrap_or(0);
    Config {
        lease_until_ns: 0,
        fill_hold_until_ns: 0,
        fill_lease_until_ns: 0,
        max_age_ns: settings.max_age.as_nanos() as u64,
        write_settle_ns: settings.write_settle.as_nanos() as u64,
        realtime_offset_ns: kernel::realtime_offset_ns(),
        agent_epoch: 1,
        flags: f,
        instances,
        class_buckets: settings.class_buckets,
        key_meta_slots: settings.key_meta_slots,
        max_reply_payload: 0,
        max_amplification_pct: settings.max_amplification.saturating_mul(100),
        serve_ifindex,
        memcached_pid: 0,
        guard_window: 0,
        memcached_started_s: 0,
        handover_evictions: cache_common::HANDOVER_UNKNOWN,
        handover_dropped: cache_common::HANDOVER_UNKNOWN,
        agent_heartbeat_ns: kernel::coarse_now_ns(),
    }
}

/// The largest UDP payload a reply frame may carry on `iface`: its MTU minus IP and UDP headers
/// (the IPv6 header is the larger), and never more than memcached puts in one datagram.
pub fn max_reply_payload(iface: &str) -> Result<u32> {
    // Asked of the kernel in this network namespace: /sys may show another one (nsenter).
    let mtu = crate::interface::mtu(iface).unwrap_or(1500);
    Ok(crate::interface::max_reply_payload(mtu))
}

pub fn interface_exists(iface: &str) -> bool {
    crate::interface::index(iface) != 0
}

/// The links this agent owns (dropping the Ebpf detaches them, unless [`keep_attached`]).
pub struct Links {
    xdp: XdpLinkId,
    tc: SchedClassifierLinkId,
    /// `tc_serve` on TC ingress, if it could be attached (without it, hits too big for the
    /// XDP frame go to memcached).
    pub tc_serve: Option<SchedClassifierLinkId>,
    /// The write scanner on `lo` (generic XDP), if it could be attached.
    lo: Option<XdpLinkId>,
}

const LINK_LO: &str = "link_lo";

fn xdp_program(ebpf: &mut Ebpf) -> &mut Xdp {
    ebpf.program_mut(names::XDP_CACHE)
        .expect("loaded")
        .try_into()
        .expect("xdp")
}

fn tc_program(ebpf: &mut Ebpf) -> &mut SchedClassifier {
    classifier(ebpf, names::TC_FILL)
}

fn classifier<'a>(ebpf: &'a mut Ebpf, name: &str) -> &'a mut SchedClassifier {
    ebpf.program_mut(name)
        .expect("loaded")
        .try_into()
        .expect("tc")
}

/// Attaches `tc_serve` on TC ingress (adopting the previous agent's link if one is pinned in
/// `dir`). Best effort: without it, XDP passes the hits it has no room for to memcached.
fn attach_tc_serve(
    ebpf: &mut Ebpf,
    iface: &str,
    dir: &std::path::Path,
) -> Option<SchedClassifierLinkId> {
    let tc = classifier(ebpf, names::TC_SERVE);
    if dir.join(LINK_TC_SERVE).exists() {
        match unpin_link::<SchedClassifierLink>(dir, LINK_TC_SERVE)
            .and_then(|l| tc.attach_to_link(l).map_err(program_error(names::TC_SERVE)))
        {
            Ok(id) => return Some(id),
            Err(e) => tracing::warn!(error = %e, "could not adopt the TC ingress hit path"),
        }
    }
    match tc.attach(iface, TcAttachType::Ingress) {
        Ok(id) => Some(id),
        Err(e) => {
            tracing::warn!(iface, error = %e, "no TC ingress hit path: hits too big for the XDP frame go to memcached");
            None
        }
    }
}

fn program_error(program: &'static str) -> impl FnOnce(aya::programs::ProgramError) -> AgentError {
    move |source| AgentError::Program { program, source }
}

fn pin_error(path: std::path::PathBuf) -> impl FnOnce(String) -> AgentError {
    move |detail| AgentError::Pin { path, detail }
}

/// Takes the link pinned at `dir/name` (removing the pin) as a link of type `L`.
fn unpin_link<L>(dir: &std::path::Path, name: &str) -> Result<L>
where
    L: TryFrom<FdLink>,
    L::Error: std::fmt::Display,
{
    let path = dir.join(name);
    let fd_link = PinnedLink::from_pin(&path)
        .map_err(|e| e.to_string())
        .and_then(|p| p.unpin().map_err(|e| e.to_string()))
        .map_err(pin_error(path.clone()))?;
    L::try_from(fd_link).map_err(|e| pin_error(path)(e.to_string()))
}

/// Pins `link` at `dir/name`, so it outlives this process.
fn pin_link<L>(link: L, dir: &std::path::Path, name: &str) -> Result<()>
where
    L: TryInto<FdLink, Error = aya::programs::links::LinkError>,
{
    let path = dir.join(name);
    let _ = std::fs::remove_file(&path);
    let fd_link: FdLink = link
        .try_into()
        .map_err(|e| pin_error(path.clone())(e.to_string()))?;
    fd_link
        .pin(&path)
        .map(|_| ())
        .map_err(|e| pin_error(path)(e.to_string()))
}

/// Also runs the entry program on `lo` (generic XDP; it only scans for writes there, see
/// Config::serve_ifindex), so clients on memcached's own host invalidate like remote ones.
/// Best effort: without it, their stores are still caught by the watch backstop.
fn attach_loopback(ebpf: &mut Ebpf, dir: &std::path::Path) -> Option<XdpLinkId> {
    let xdp = xdp_program(ebpf);
    if dir.join(LINK_LO).exists() {
        match unpin_link::<XdpLink>(dir, LINK_LO).and_then(|l| {
            xdp.attach_to_link(l)
                .map_err(program_error(names::XDP_CACHE))
        }) {
            Ok(id) => return Some(id),
            Err(e) => tracing::warn!(error = %e, "could not adopt the loopback scanner"),
        }
    }
    match xdp.attach("lo", AyaXdpMode::Skb) {
        Ok(id) => Some(id),
        Err(e) => {
            tracing::warn!(error = %e, "no write scanner on lo: deletes by clients on this host are not seen (stores still are, through watch)");
            None
        }
    }
}

/// Takes over the links a previous agent left pinned in `dir` (upgrade mode): the new
/// programs replace the old ones atomically, with no moment where nothing is attached.
pub fn adopt(ebpf: &mut Ebpf, settings: &Settings, dir: &std::path::Path) -> Result<Links> {
    let xdp_link: XdpLink = unpin_link(dir, LINK_XDP)?;
    let xdp = xdp_program(ebpf)
        .attach_to_link(xdp_link)
        .map_err(program_error(names::XDP_CACHE))?;
    let tc_link: SchedClassifierLink = unpin_link(dir, LINK_TC)?;
    let tc = tc_program(ebpf)
        .attach_to_link(tc_link)
        .map_err(program_error(names::TC_FILL))?;
    let lo = attach_loopback(ebpf, dir);
    let tc_serve = if settings.tc_serve {
        attach_tc_serve(ebpf, &settings.iface, dir)
    } else {
        // A previous agent's link stays pinned only until this one exits or detaches.
        let _ = std::fs::remove_file(dir.join(LINK_TC_SERVE));
        None
    };
    info!(dir = %dir.display(), "adopted the attached programs and the warm cache of the previous agent");
    Ok(Links {
        xdp,
        tc,
        tc_serve,
        lo,
    })
}

/// Upgrade mode on exit: pins the links so the programs stay attached after this process.
pub fn keep_attached(ebpf: &mut Ebpf, dir: &std::path::Path, links: Links) -> Result<()> {
    let xdp = xdp_program(ebpf);
    if let Some(lo) = links.lo {
        pin_link(
            xdp.take_link(lo).map_err(program_error(names::XDP_CACHE))?,
            dir,
            LINK_LO,
        )?;
    }
    pin_link(
        xdp.take_link(links.xdp)
            .map_err(program_error(names::XDP_CACHE))?,
        dir,
        LINK_XDP,
    )?;
    let tc = tc_program(ebpf);
    pin_link(
        tc.take_link(links.tc)
            .map_err(program_error(names::TC_FILL))?,
        dir,
        LINK_TC,
    )?;
    if let Some(id) = links.tc_serve {
        let tc = classifier(ebpf, names::TC_SERVE);
        pin_link(
            tc.take_link(id).map_err(program_error(names::TC_SERVE))?,
            dir,
            LINK_TC_SERVE,
        )?;
    }
    Ok(())
}

/// Attaches XDP and TC egress. XDP goes first: if it fails nothing is attached.
pub fn attach(ebpf: &mut Ebpf, settings: &Settings) -> Result<Links> {
    let iface = settings.iface.as_str();
    if !interface_exists(iface) {
        return Err(AgentError::NoSuchInterface {
            iface: iface.into(),
        });
    }
    let mode = match settings.xdp_mode {
        XdpMode::Native => AyaXdpMode::Driver,
        XdpMode::Generic => AyaXdpMode::Skb,
    };
    let xdp = xdp_program(ebpf);
    let xdp_id = xdp
        .attach(iface, mode)
        .map_err(|source| classify_xdp_error(iface, source))?;
    let tc = tc_program(ebpf);
    let tc_id = match tc.attach(iface, TcAttachType::Egress) {
        Ok(id) => id,
        Err(source) => {
            // Leave nothing half attached: dropping the XDP link detaches it.
            let xdp = xdp_program(ebpf);
            let _ = xdp.unload();
            return Err(AgentError::Attach {
                program: names::TC_FILL,
                iface: iface.into(),
                fix: "the kernel needs TCX (6.6+) or clsact",
                source,
            });
        }
    };
    let lo = if iface == "lo" {
        None
    } else {
        attach_loopback(ebpf, &settings.pin_dir())
    };
    let tc_serve = settings
        .tc_serve
        .then(|| attach_tc_serve(ebpf, iface, &settings.pin_dir()))
        .flatten();
    info!(iface, mode = ?settings.xdp_mode, loopback_scanner = lo.is_some(), tc_ingress_hits = tc_serve.is_some(), "attached XDP hit path, TC egress fill and TC ingress hit path");
    Ok(Links {
        xdp: xdp_id,
        tc: tc_id,
        tc_serve,
        lo,
    })
}

fn classify_xdp_error(iface: &str, source: aya::programs::ProgramError) -> AgentError {
    let text = format!("{source:?}");
    if text.contains("EBUSY")
        || text.contains("Device or resource busy")
        || text.contains("File exists")
        || text.contains("os error 16")
        || text.contains("os error 17")
    {
        return AgentError::XdpBusy {
            iface: iface.into(),
            detail: source.to_string(),
        };
    }
    let fix = if text.contains("EOPNOTSUPP") || text.contains("os error 95") {
        "the driver has no native XDP; pass --xdp-mode generic to use the (slower) generic mode"
    } else {
        "check `ip link show` for the interface and that the kernel supports XDP links (5.9+)"
    };
    AgentError::Attach {
        program: names::XDP_CACHE,
        iface: iface.into(),
        fix,
        source,
    }
}

/// Attaches the XDP_PASS program to `iface` and pins the link at `pin`, so it stays after this
/// process exits (a veth peer needs an XDP program for XDP_TX frames to arrive).
pub fn attach_pass_pinned(iface: &str, pin: &std::path::Path) -> Result<()> {
    if !interface_exists(iface) {
        return Err(AgentError::NoSuchInterface {
            iface: iface.into(),
        });
    }
    let mut ebpf = Ebpf::load(crate::EBPF_OBJECT)?;
    let prog: &mut Xdp = ebpf
        .program_mut(names::XDP_PASS)
        .expect("in object")
        .try_into()
        .expect("xdp");
    prog.load().map_err(|source| AgentError::Program {
        program: names::XDP_PASS,
        source,
    })?;
    let id = prog
        .attach(iface, AyaXdpMode::Driver)
        .map_err(|source| classify_xdp_error(iface, source))?;
    let link = prog.take_link(id).map_err(|source| AgentError::Program {
        program: names::XDP_PASS,
        source,
    })?;
    let fd_link: aya::programs::links::FdLink =
        link.try_into()
            .map_err(|e: aya::programs::links::LinkError| AgentError::Pin {
                path: pin.into(),
                detail: e.to_string(),
            })?;
    if let Some(parent) = pin.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let _ = std::fs::remove_file(pin);
    fd_link.pin(pin).map_err(|e| AgentError::Pin {
        path: pin.into(),
        detail: e.to_string(),
    })?;
    Ok(())
}
