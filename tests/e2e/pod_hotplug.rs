//! Pods that appear after the daemon started: their veth gets the program (found through
//! rtnetlink link events), and when they go, the daemon releases their link.

mod common;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use common::{SERVICE_TCP_PORT, SYNC_TIMEOUT, echo_service};
use proxy_lab::{Lab, Reply, Service, addr, require_lab};

/// A second Service whose only endpoint is the late pod.
const LATE_VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 12);
/// How long the daemon may take to notice a new or vanished veth.
const NOTICE_WITHIN: Duration = Duration::from_secs(5);

/// Retries `request` until it succeeds or `NOTICE_WITHIN` passes; returns the last error.
fn eventually(mut request: impl FnMut() -> Result<Reply>) -> Result<Reply> {
    let deadline = Instant::now() + NOTICE_WITHIN;
    loop {
        match request() {
            Ok(reply) => return Ok(reply),
            Err(error) if Instant::now() >= deadline => return Err(error),
            Err(_) => sleep(Duration::from_millis(100)),
        }
    }
}

fn pinned_links(root: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(root.join("links"))? {
        names.push(entry?.file_name().to_string_lossy().into_owned());
    }
    Ok(names)
}

#[test]
fn late_pods_are_attached_and_their_links_released_when_they_go() -> Result<()> {
    require_lab!();
    // pod-1 is the endpoint of `echo`; pod-2 calls; pod-3 arrives later.
    let lab = Lab::builder().pods(2).build()?;
    let daemon = lab
        .daemon()
        .manifest(echo_service().manifest(&lab.pods()[..1]))
        .start()?;
    daemon.wait_synced(SYNC_TIMEOUT)?;
    let late = lab.start_late_pod(3)?;

    // As a caller: its packets to the VIP are only translated if lxc3 has the program.
    let reply = eventually(|| late.pod.ns.tcp_request(addr::CLUSTER_IP, SERVICE_TCP_PORT))?;
    ensure!(reply.body == "pod-1", "late caller answered by {reply:?}");

    // As a backend: its replies are only reverse-NATed if lxc3 has the program.
    daemon.apply(
        &Service::cluster_ip("late", LATE_VIP)
            .tcp(SERVICE_TCP_PORT, addr::ECHO_TCP_PORT)
            .manifest([&late.pod]),
    )?;
    let reply = eventually(|| lab.pod(2).ns.tcp_request(LATE_VIP, SERVICE_TCP_PORT))?;
    ensure!(
        reply.body == "pod-3",
        "late backend's Service answered by {reply:?}"
    );
    let vip = SocketAddr::V4(SocketAddrV4::new(LATE_VIP, SERVICE_TCP_PORT));
    ensure!(
        reply.peer == vip,
        "reply came from {} instead of {vip}",
        reply.peer
    );

    let root = daemon.bpffs_root();
    ensure!(
        pinned_links(&root)?
            .iter()
            .any(|pin| pin.ends_with("-lxc3")),
        "no link pinned for lxc3: {:?}",
        pinned_links(&root)?
    );
    drop(late);
    let deadline = Instant::now() + NOTICE_WITHIN;
    while pinned_links(&root)?
        .iter()
        .any(|pin| pin.ends_with("-lxc3"))
    {
        if Instant::now() >= deadline {
            bail!(
                "the link of the deleted pod is still pinned: {:?}",
                pinned_links(&root)?
            );
        }
        sleep(Duration::from_millis(100));
    }
    Ok(())
}
