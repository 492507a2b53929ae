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

use std::fmt::Write as _;
use std::fs;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail, ensure};
use aya::EbpfLoader;
use aya::programs::{CgroupAttachMode, CgroupSockAddr};
use proxy_common::{TRACE_ERRNO, map_names, proto, sock_globals, sock_programs, stat};
use serde::Serialize;
use socket2::{Domain, Socket, Type};

use super::trace::{
    BackendMatch, Decision, Destination, FrontendMatch, Selection, clear_record, decision, record,
    service_name, write_decision,
};
use super::{Endpoint, object_beside_pins, protocol_name};
use crate::socket_lb;

const PROGRAM: &str = sock_programs::CONNECT4_TRACE;

/// Runs the dry run of a `connect()` to `destination` and explains it.
pub fn trace(
    root: &Path,
    destination: Destination,
    cgroup_root: Option<&Path>,
) -> Result<ConnectReport> {
    ensure!(
        destination.endpoint.address.is_ipv4(),
        "{}: the socket programs translate IPv4 connects only (no connect6 hook); an IPv6 \
         connection is translated per packet by the tc program: trace SRC DST",
        destination.endpoint
    );
    ensure!(
        destination.protocol != proto::SCTP,
        "the socket programs translate TCP and UDP only; SCTP is translated by the tc \
         program: trace SRC DST:PORT/sctp"
    );
    // This process's namespace counts as the node's: the trace shows a process of the node.
    let host_netns = socket_lb::own_netns_cookie()?;
    let mut ebpf = object_beside_pins(
        root,
        &[
            map_names::SERVICES,
            map_names::BACKEND_SLOTS,
            map_names::SOCK_AFFINITY,
            map_names::MEMBERSHIP,
            map_names::SOURCE_RANGES,
            map_names::SVC_NAMES,
        ],
        EbpfLoader::new().override_global(sock_globals::HOST_NETNS, &host_netns, true),
    )?;
    let program: &mut CgroupSockAddr = ebpf
        .program_mut(PROGRAM)
        .ok_or_else(|| anyhow!("program {PROGRAM} missing from the eBPF object"))?
        .try_into()?;
    program
        .load()
        .with_context(|| format!("loading {PROGRAM} (needs root)"))?;
    clear_record(&mut ebpf)?;
    let parent = socket_lb::cgroup_root(cgroup_root)?;
    let errno = {
        let cgroup = TraceCgroup::enter(&parent)?;
        let program: &mut CgroupSockAddr = ebpf
            .program_mut(PROGRAM)
            .context("program missing")?
            .try_into()?;
        let link = program
            .attach(fs::File::open(&cgroup.path)?, CgroupAttachMode::Single)
            .with_context(|| format!("attaching {PROGRAM} to {}", cgroup.path.display()))?;
        let errno = traced_connect(destination);
        program.detach(link)?;
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
    let record = record(&mut ebpf, PROGRAM)?;
    let frontend_name = service_name::<u32>(&ebpf, record.service.rev_nat_id)?;
    let mut decided_by = Vec::new();
    let affinity_key = format!(
        "SOCK_AFFINITY[netns {host_netns} service port {}]",
        record.service.service_port_id
    );
    let Decision {
        frontend,
        selection,
        backend,
    } = decision::<u32>(&record, frontend_name, &affinity_key, &mut decided_by);
    let outcome = Outcome::of(u32::from(record.outcome), frontend.is_some());
    if frontend.is_none() {
        decided_by.push(format!(
            "no SERVICES entry for {}/{}",
            destination.endpoint,
            protocol_name(destination.protocol)
        ));
    }
    Ok(ConnectReport {
        protocol: protocol_name(destination.protocol),
        destination: destination.endpoint,
        outcome: outcome.name(),
        errno: outcome.errno(),
        explanation: outcome.explanation(),
        connects_to: match outcome {
            Outcome::Translated => backend.as_ref().map(|backend| Endpoint {
                address: backend.address,
                port: backend.port,
            }),
            Outcome::Untouched => Some(destination.endpoint),
            Outcome::Refused | Outcome::Unreachable => None,
        },
        frontend,
        selection,
        backend,
        socket_lb_attached: socket_lb::links_dir(root)
            .join(sock_programs::CONNECT4)
            .exists(),
        decided_by,
    })
}

/// Connects a new socket to `destination` from the trace's cgroup; the errno it failed
/// with (`None`: it connected).
fn traced_connect(destination: Destination) -> Result<Option<i32>> {
    let kind = if destination.protocol == proto::TCP {
        Type::STREAM
    } else {
        Type::DGRAM
    };
    let socket = Socket::new(Domain::IPV4, kind, None).context("opening a socket")?;
    let target = SocketAddr::new(destination.endpoint.address, destination.endpoint.port);
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
    use super::*;

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
