//! `ebpf-proxy trace --connect DST:PORT/PROTO`: what would a `connect()` of a process of
//! this node get from the socket programs, and why?
//!
//! BPF_PROG_TEST_RUN cannot run cgroup socket programs (the kernel has no test run for
//! `BPF_PROG_TYPE_CGROUP_SOCK_ADDR`), so the dry run is run for real, where it is harmless:
//! `epx_connect4_trace` — `connect4`'s own path, compiled with the dry-run mode the packet
//! trace uses — is attached to a cgroup of this process's own, made for the trace under
//! `--cgroup-root`, and this process `connect()`s a socket from inside it. The program reads
//! the live pinned maps, records its decision in its TRACE map, writes nothing else, and
//! fails the `connect()` with its own errno, so no packet is sent; it leaves the address
//! naming nothing, so the daemon's `connect4` (attached above, run after it) leaves the
//! call alone. The cgroup is removed again, this process moved back first.
//!
//! An IPv6 destination takes `epx_connect6_trace`, `connect6`'s dry run, from an IPv6
//! socket: IPv6's maps serve an IPv6 frontend, IPv4's an IPv4-mapped address
//! (`[::ffff:198.19.0.10]:80`, a dual-stack socket's IPv4 peer), as `connect6` serves them.

use std::fmt::Write as _;
use std::fs;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail, ensure};
use aya::EbpfLoader;
use aya::programs::{CgroupAttachMode, CgroupSockAddr};
use proxy_common::{
    Address, Ipv6, TRACE_ERRNO, TraceRecord, map_names, proto, sock_globals, sock_programs, stat,
};
use serde::Serialize;
use socket2::{Domain, Socket, Type};

use super::trace::{
    BackendMatch, Decision, Destination, FrontendMatch, Selection, clear_record, decision, record,
    service_name, write_decision,
};
use super::{Endpoint, object_beside_pins, protocol_name};
use crate::socket_lb;

/// Runs the dry run of a `connect()` to `destination` and explains it: `connect4`'s for an
/// IPv4 address, `connect6`'s for an IPv6 one (an IPv4-mapped one too, from an IPv6
/// socket, as a dual-stack socket names an IPv4 peer).
pub fn trace(
    root: &Path,
    destination: Destination,
    cgroup_root: Option<&Path>,
) -> Result<ConnectReport> {
    ensure!(
        destination.protocol != proto::SCTP,
        "the socket programs translate TCP and UDP only; SCTP is translated by the tc \
         program: trace SRC DST:PORT/sctp"
    );
    let (program, live) = if destination.endpoint.address.is_ipv6() {
        (sock_programs::CONNECT6_TRACE, sock_programs::CONNECT6)
    } else {
        (sock_programs::CONNECT4_TRACE, sock_programs::CONNECT4)
    };
    // This process's namespace counts as the node's: the trace shows a process of the node.
    let host_netns = socket_lb::own_netns_cookie()?;
    // `connect6` reads IPv4's maps too (for IPv4-mapped addresses).
    let mut pins = sock_pins::<u32>();
    if destination.endpoint.address.is_ipv6() {
        pins.extend(sock_pins::<Ipv6>());
    }
    let mut ebpf = object_beside_pins(
        root,
        &pins,
        EbpfLoader::new().override_global(sock_globals::HOST_NETNS, &host_netns, true),
    )?;
    let loaded: &mut CgroupSockAddr = ebpf
        .program_mut(program)
        .ok_or_else(|| anyhow!("program {program} missing from the eBPF object"))?
        .try_into()?;
    loaded
        .load()
        .with_context(|| format!("loading {program} (needs root)"))?;
    clear_record(&mut ebpf)?;
    let parent = socket_lb::cgroup_root(cgroup_root)?;
    let errno = {
        let cgroup = TraceCgroup::enter(&parent)?;
        let loaded: &mut CgroupSockAddr = ebpf
            .program_mut(program)
            .context("program missing")?
            .try_into()?;
        let link = loaded
            .attach(fs::File::open(&cgroup.path)?, CgroupAttachMode::Single)
            .with_context(|| format!("attaching {program} to {}", cgroup.path.display()))?;
        let errno = traced_connect(destination);
        loaded.detach(link)?;
        errno?
    };
    if errno != Some(TRACE_ERRNO) {
        bail!(
            "the dry run did not decide the connect() (it ended with {}): another program of \
             the cgroup may have refused it first",
            errno.map_or("success".to_owned(), |errno| io::Error::from_raw_os_error(
                errno
            )
            .to_string())
        );
    }
    let record = record(&mut ebpf, program)?;
    let facts = Facts {
        host_netns,
        socket_lb_attached: socket_lb::links_dir(root).join(live).exists(),
    };
    Ok(if served_by_ipv6(destination) {
        let name = service_name::<Ipv6>(&ebpf, record.service.rev_nat_id)?;
        report_as::<Ipv6>(destination, &record, name, facts)
    } else {
        let name = service_name::<u32>(&ebpf, record.service.rev_nat_id)?;
        report_as::<u32>(destination, &record, name, facts)
    })
}

/// The maps of family `A` the socket programs read, which the daemon must have pinned.
fn sock_pins<A: Address>() -> Vec<&'static str> {
    let maps = A::MAPS;
    vec![
        maps.services,
        maps.backend_slots,
        sock_affinity::<A>(),
        maps.membership,
        maps.source_ranges,
        maps.svc_names,
    ]
}

/// SOCK_AFFINITY, or SOCK_AFFINITY6 for IPv6.
fn sock_affinity<A: Address>() -> &'static str {
    if A::BITS == 32 {
        map_names::SOCK_AFFINITY
    } else {
        map_names::SOCK_AFFINITY6
    }
}

/// Whether IPv6's maps serve a `connect()` to `destination`: an IPv6 address that is not
/// IPv4-mapped (`connect6` serves a mapped one from IPv4's, as IPv4).
fn served_by_ipv6(destination: Destination) -> bool {
    Ipv6::from_ip(destination.endpoint.address).is_some_and(|addr| addr.ipv4_mapped().is_none())
}

/// What the report takes besides the record: the node's network namespace (the affinity
/// key) and whether the daemon's live hook is attached.
#[derive(Clone, Copy)]
struct Facts {
    host_netns: u64,
    socket_lb_attached: bool,
}

/// The report of the dry run of a `connect()` to `destination` that left `record`, read in
/// the place of the family `A` whose maps served it (IPv4's for an IPv4-mapped address,
/// whose frontend and backend are then IPv4's, and the socket connected to the backend's
/// mapped address, as `connect6` writes it back). Pure.
fn report_as<A: Address>(
    destination: Destination,
    record: &TraceRecord,
    frontend_name: Option<String>,
    facts: Facts,
) -> ConnectReport {
    // What connect6 looks up for an IPv4-mapped address: its IPv4 address.
    let mapped = match destination.endpoint.address {
        IpAddr::V6(addr) if A::BITS == 32 => addr.to_ipv4_mapped().map(IpAddr::V4),
        _ => None,
    };
    let mut decided_by = Vec::new();
    if mapped.is_some() {
        decided_by.push(format!(
            "{}: IPv4-mapped (a dual-stack socket's IPv4 peer): connect6 serves it from \
             IPv4's maps",
            destination.endpoint.address
        ));
    }
    let affinity_key = format!(
        "{}[netns {} service port {}]",
        sock_affinity::<A>(),
        facts.host_netns,
        record.service.service_port_id
    );
    let Decision {
        frontend,
        selection,
        backend,
    } = decision::<A>(record, frontend_name, &affinity_key, &mut decided_by);
    let outcome = Outcome::of(u32::from(record.outcome), frontend.is_some());
    if frontend.is_none() {
        decided_by.push(format!(
            "no {} entry for {}/{}",
            A::MAPS.services,
            Endpoint {
                address: mapped.unwrap_or(destination.endpoint.address),
                port: destination.endpoint.port
            },
            protocol_name(destination.protocol)
        ));
    }
    let connects_to = match outcome {
        Outcome::Translated => backend.as_ref().map(|backend| Endpoint {
            address: match backend.address {
                IpAddr::V4(addr) if mapped.is_some() => IpAddr::V6(addr.to_ipv6_mapped()),
                addr => addr,
            },
            port: backend.port,
        }),
        Outcome::Untouched => Some(destination.endpoint),
        Outcome::Refused | Outcome::Unreachable => None,
    };
    ConnectReport {
        family: A::NAME,
        protocol: protocol_name(destination.protocol),
        destination: destination.endpoint,
        outcome: outcome.name(),
        errno: outcome.errno(),
        explanation: outcome.explanation(),
        connects_to,
        frontend,
        selection,
        backend,
        socket_lb_attached: facts.socket_lb_attached,
        decided_by,
    }
}

/// Connects a new socket to `destination` from the trace's cgroup; the errno it failed
/// with (`None`: it connected).
fn traced_connect(destination: Destination) -> Result<Option<i32>> {
    let kind = if destination.protocol == proto::TCP {
        Type::STREAM
    } else {
        Type::DGRAM
    };
    let target = SocketAddr::new(destination.endpoint.address, destination.endpoint.port);
    let socket =
        Socket::new(Domain::for_address(target), kind, None).context("opening a socket")?;
    if target.is_ipv6() {
        // Dual-stack, as a socket that names an IPv4 peer by its mapped address is.
        socket.set_only_v6(false)?;
    }
    Ok(socket
        .connect(&target.into())
        .err()
        .and_then(|error| error.raw_os_error()))
}

/// A cgroup made for one trace under `parent`, with this process (or, in a threaded
/// subtree, this thread) inside it until it drops: then moved back and the cgroup removed.
struct TraceCgroup {
    path: PathBuf,
    /// Where the task was before, and the file that moves it back.
    home: PathBuf,
    /// The pid or tid written to move it.
    task: String,
}

impl TraceCgroup {
    fn enter(parent: &Path) -> Result<Self> {
        let mount = socket_lb::unified_root()?;
        // A thread can only move within its process's threaded subtree, a process only
        // between domains: follow the parent's kind.
        let threaded = fs::read_to_string(parent.join("cgroup.type"))
            .is_ok_and(|kind| kind.trim() == "threaded");
        let (membership, file, task) = if threaded {
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() };
            (
                "/proc/thread-self/cgroup",
                "cgroup.threads",
                tid.to_string(),
            )
        } else {
            (
                "/proc/self/cgroup",
                "cgroup.procs",
                std::process::id().to_string(),
            )
        };
        let own = fs::read_to_string(membership)?;
        let own = own
            .lines()
            .find_map(|line| line.strip_prefix("0::"))
            .context("this process is in no cgroup v2")?;
        let home = mount.join(own.trim_start_matches('/')).join(file);
        let path = parent.join(format!("ebpf-proxy-trace-{}", std::process::id()));
        fs::create_dir(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        let cgroup = Self { path, home, task };
        if threaded {
            fs::write(cgroup.path.join("cgroup.type"), "threaded")
                .with_context(|| format!("making {} threaded", cgroup.path.display()))?;
        }
        fs::write(cgroup.path.join(file), &cgroup.task)
            .with_context(|| format!("joining cgroup {}", cgroup.path.display()))?;
        Ok(cgroup)
    }
}

impl Drop for TraceCgroup {
    fn drop(&mut self) {
        if let Err(error) = fs::write(&self.home, &self.task) {
            eprintln!("cannot move back to {}: {error}", self.home.display());
        }
        if let Err(error) = fs::remove_dir(&self.path) {
            eprintln!(
                "cannot remove the trace's cgroup {}: {error}",
                self.path.display()
            );
        }
    }
}

/// What the dry run decided for the `connect()`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Translated,
    Refused,
    Unreachable,
    Untouched,
}

impl Outcome {
    fn of(counter: u32, frontend: bool) -> Self {
        match counter {
            stat::SOCK_CONNECT if frontend => Self::Translated,
            stat::SOCK_REFUSED if frontend => Self::Refused,
            stat::SOCK_UNREACHABLE | stat::BACKEND_MISSING if frontend => Self::Unreachable,
            _ => Self::Untouched,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Translated => "translated",
            Self::Refused => "refused",
            Self::Unreachable => "unreachable",
            Self::Untouched => "untouched",
        }
    }

    fn errno(self) -> Option<i32> {
        match self {
            Self::Refused => Some(proxy_common::ECONNREFUSED),
            Self::Unreachable => Some(proxy_common::EHOSTUNREACH),
            Self::Translated | Self::Untouched => None,
        }
    }

    fn explanation(self) -> &'static str {
        match self {
            Self::Translated => {
                "the socket is connected to the backend: no packet of it is translated"
            }
            Self::Refused => {
                "the frontend has no endpoints: connect() fails with ECONNREFUSED at once \
                 (kube-proxy's REJECT)"
            }
            Self::Unreachable => {
                "the frontend drops (no local endpoint under a Local policy, a client outside \
                 its source ranges, or a slot mid-update): connect() fails with EHOSTUNREACH"
            }
            Self::Untouched => "not a frontend: connect() goes where it was addressed",
        }
    }
}

/// What `trace --connect` found. JSON schema: every field always present; objects that
/// did not take part are null.
#[derive(Debug, Serialize)]
pub struct ConnectReport {
    /// `IPv4` or `IPv6`: the family whose maps served the `connect()` (IPv4's for an
    /// IPv4-mapped destination, as `connect6` serves it).
    pub family: &'static str,
    pub protocol: &'static str,
    pub destination: Endpoint,
    /// `translated`, `refused`, `unreachable` or `untouched`.
    pub outcome: &'static str,
    /// The errno connect() fails with (refused: 111, unreachable: 113), else null.
    pub errno: Option<i32>,
    pub explanation: &'static str,
    /// Where the socket gets connected; null when connect() fails.
    pub connects_to: Option<Endpoint>,
    pub frontend: Option<FrontendMatch>,
    pub selection: Option<Selection>,
    pub backend: Option<BackendMatch>,
    /// Whether the daemon's `connect4` link is pinned (`--socket-lb` host or all).
    pub socket_lb_attached: bool,
    pub decided_by: Vec<String>,
}

pub fn render(report: &ConnectReport) -> String {
    let mut out = String::new();
    writeln!(
        out,
        "connect     {} → {} (a process of this node)",
        report.protocol, report.destination
    )
    .unwrap();
    writeln!(
        out,
        "outcome     {} ({})",
        report.outcome, report.explanation
    )
    .unwrap();
    write_decision(&mut out, &report.decided_by, report.backend.as_ref());
    if let Some(target) = &report.connects_to {
        writeln!(out, "connects to {target}").unwrap();
    }
    if !report.socket_lb_attached {
        writeln!(
            out,
            "note        the daemon's socket programs are not attached (--socket-lb off): \
             connect() is not translated today"
        )
        .unwrap();
    }
    out.push_str(
        "dry run     nothing was written: no socket entry, no affinity, no counter; the \
         traced connect() itself was refused",
    );
    if report
        .selection
        .as_ref()
        .is_some_and(|selection| selection.of > 1)
    {
        out.push_str(
            "\n            (the slot is random: another connect() may get another backend)",
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use proxy_common::TraceRecord;

    use super::super::trace::tests::{cluster_ip, endpoint, endpoint6, new_flow_record, recorded};
    use super::*;

    const FACTS: Facts = Facts {
        host_netns: 4096,
        socket_lb_attached: true,
    };

    /// The report of `record` for a connect() to `destination`, read as [`trace`] reads
    /// it: in the place of the family whose maps served it.
    fn report(destination: &str, record: &TraceRecord, name: Option<&str>) -> ConnectReport {
        let destination: Destination = destination.parse().unwrap();
        let name = name.map(str::to_owned);
        if served_by_ipv6(destination) {
            report_as::<Ipv6>(destination, record, name, FACTS)
        } else {
            report_as::<u32>(destination, record, name, FACTS)
        }
    }

    #[test]
    fn a_translated_connect_names_its_familys_entries_and_a_mapped_one_ipv4s() {
        let v4 = (
            endpoint([198, 19, 0, 10], 80),
            endpoint([198, 18, 1, 12], 8080),
        );
        let v6 = (
            endpoint6("2001:db8:ff::10", 80),
            endpoint6("2001:db8:1::12", 8080),
        );
        for (destination, (frontend, backend), family, decided_by, connects_to) in [
            (
                "198.19.0.10:80/tcp",
                v4,
                "IPv4",
                vec![
                    "SERVICES[198.19.0.10:80/tcp] = ClusterIP default/echo:tcp-80, rev_nat_id \
                     1, 3 backends at BACKEND_SLOTS[12..15]",
                    "BACKEND_SLOTS[13] = backend 5, 198.18.1.12:8080 (slot 2 of 3, chosen at \
                     random)",
                ],
                "198.18.1.12:8080",
            ),
            (
                "[2001:db8:ff::10]:80/tcp",
                v6,
                "IPv6",
                vec![
                    "SERVICES6[[2001:db8:ff::10]:80/tcp] = ClusterIP default/echo:tcp-80, \
                     rev_nat_id 1, 3 backends at BACKEND_SLOTS6[12..15]",
                    "BACKEND_SLOTS6[13] = backend 5, [2001:db8:1::12]:8080 (slot 2 of 3, \
                     chosen at random)",
                ],
                "[2001:db8:1::12]:8080",
            ),
            // connect6 serves an IPv4-mapped address from IPv4's maps and writes the
            // backend back mapped.
            (
                "[::ffff:198.19.0.10]:80/tcp",
                v4,
                "IPv4",
                vec![
                    "::ffff:198.19.0.10: IPv4-mapped (a dual-stack socket's IPv4 peer): \
                     connect6 serves it from IPv4's maps",
                    "SERVICES[198.19.0.10:80/tcp] = ClusterIP default/echo:tcp-80, rev_nat_id \
                     1, 3 backends at BACKEND_SLOTS[12..15]",
                    "BACKEND_SLOTS[13] = backend 5, 198.18.1.12:8080 (slot 2 of 3, chosen at \
                     random)",
                ],
                "[::ffff:198.18.1.12]:8080",
            ),
        ] {
            let record = TraceRecord {
                outcome: stat::SOCK_CONNECT as u8,
                ..new_flow_record((2, 5, backend), frontend, cluster_ip(1, 12, 3))
            };
            let report = report(destination, &record, Some("default/echo:tcp-80"));
            assert_eq!(
                (report.outcome, report.family, report.errno),
                ("translated", family, None),
                "{destination}"
            );
            assert_eq!(report.decided_by, decided_by, "{destination}");
            let json = serde_json::to_value(&report).unwrap();
            assert_eq!(json["backend"]["address"], backend.address.to_string());
            assert_eq!(json["selection"]["set"], "frontend");
            let text = render(&report);
            for line in [
                format!(
                    "connect     tcp → {} (a process of this node)",
                    report.destination
                ),
                format!("backend     {backend} (id 5)"),
                format!("connects to {connects_to}"),
            ] {
                assert!(text.contains(&line), "{line:?} not in\n{text}");
            }
        }
    }

    #[test]
    fn an_ipv6_connect_keeps_its_affinity_in_sock_affinity6_and_is_refused_or_untouched() {
        // Session affinity: the client's backend from SOCK_AFFINITY6, keyed by the netns.
        let mut record = TraceRecord {
            outcome: stat::SOCK_CONNECT as u8,
            affinity: 1,
            slot: 0,
            ..new_flow_record(
                (0, 7, endpoint6("2001:db8:1::13", 8080)),
                endpoint6("2001:db8:ff::13", 80),
                cluster_ip(2, 20, 3),
            )
        };
        record.service.service_port_id = 9;
        let sticky = report("[2001:db8:ff::13]:80/tcp", &record, None);
        assert_eq!(
            sticky.decided_by[1],
            "SOCK_AFFINITY6[netns 4096 service port 9] = backend 7, [2001:db8:1::13]:8080 \
             (session affinity: the client's backend on this Service port, still one of the \
             frontend's)"
        );
        assert_eq!(sticky.connects_to, Some(endpoint6("2001:db8:1::13", 8080)));

        // No endpoints: refused with ECONNREFUSED, connected nowhere.
        let record = TraceRecord {
            outcome: stat::SOCK_REFUSED as u8,
            ..new_flow_record(
                (0, 0, endpoint6("::", 0)),
                endpoint6("2001:db8:ff::12", 80),
                cluster_ip(3, 0, 0),
            )
        };
        let refused = report("[2001:db8:ff::12]:80/udp", &record, None);
        assert_eq!(
            (refused.outcome, refused.errno, refused.connects_to),
            ("refused", Some(111), None)
        );

        // No frontend, of either kind: untouched, the lookup that missed named.
        for (destination, missed) in [
            (
                "[2001:db8:ff::99]:80/tcp",
                "no SERVICES6 entry for [2001:db8:ff::99]:80/tcp",
            ),
            (
                "[::ffff:198.19.0.99]:80/tcp",
                "no SERVICES entry for 198.19.0.99:80/tcp",
            ),
        ] {
            let untouched = report(destination, &recorded(0), None);
            assert_eq!(untouched.outcome, "untouched");
            assert_eq!(untouched.decided_by.last().unwrap(), missed);
            assert_eq!(
                untouched.connects_to,
                Some(destination.parse::<Destination>().unwrap().endpoint)
            );
        }
    }

    #[test]
    fn outcomes_follow_the_last_counter_of_a_found_frontend() {
        assert_eq!(Outcome::of(stat::SOCK_CONNECT, true), Outcome::Translated);
        assert_eq!(Outcome::of(stat::SOCK_REFUSED, true), Outcome::Refused);
        assert_eq!(
            Outcome::of(stat::SOCK_UNREACHABLE, true),
            Outcome::Unreachable
        );
        assert_eq!(
            Outcome::of(stat::BACKEND_MISSING, true),
            Outcome::Unreachable
        );
        // Nothing counted (the record's counter is 0) and no frontend: not ours.
        assert_eq!(Outcome::of(0, false), Outcome::Untouched);
        assert_eq!(Outcome::Refused.errno(), Some(111));
        assert_eq!(Outcome::Unreachable.errno(), Some(113));
    }
}
