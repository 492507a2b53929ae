//! When a UDP backend leaves a Service, a client that keeps its source port (as DNS
//! resolvers do) reaches a live backend with its next datagrams instead of sending into the
//! old one for as long as it keeps talking (what kube-proxy's conntrack cleanup is for):
//! the datapath checks on the conntrack hit that the flow's backend still serves. The
//! removed pod keeps running in the lab, so without the check the flow would visibly stay
//! on it. When the last backend goes, the flow ends too, as kube-proxy's
//! `CleanStaleEntries` clears it: the next datagram is refused.

mod common;

use std::io::ErrorKind;
use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use common::{BACKEND_NAMES, SERVICE_UDP_PORT, backends, caller, daemon_with_echo, echo_service};
use proxy_lab::{Pod, addr, is_timeout, require_lab};

const RECEIVE_TIMEOUT: Duration = Duration::from_secs(1);
const ROUNDS: usize = 20;
const GIVE_UP: Duration = Duration::from_secs(5);
const RESEND_EVERY: Duration = Duration::from_millis(50);

#[test]
fn udp_flow_moves_to_a_live_backend_when_its_backend_is_removed() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let daemon = daemon_with_echo(&lab)?;
    let flow = caller(&lab).udp_flow(addr::CLUSTER_IP, SERVICE_UDP_PORT, RECEIVE_TIMEOUT)?;
    let removed = flow.request()?;
    ensure!(
        BACKEND_NAMES.contains(&removed.as_str()),
        "answered by {removed:?}"
    );
    for _ in 0..ROUNDS {
        let answer = flow.request()?;
        ensure!(
            answer == removed,
            "the flow moved from {removed} to {answer} on its own"
        );
    }

    let remaining: Vec<&Pod> = backends(&lab)
        .iter()
        .filter(|pod| pod.name != removed)
        .collect();
    daemon.apply(&echo_service().manifest(remaining.iter().copied()))?;
    let changed = Instant::now();
    let moved_to = loop {
        let answer = flow.request()?;
        if answer != removed {
            break answer;
        }
        if changed.elapsed() > GIVE_UP {
            bail!("the flow still reaches the removed {removed} {GIVE_UP:?} after its removal");
        }
        std::thread::sleep(RESEND_EVERY);
    };
    println!(
        "the flow moved from {removed} to {moved_to} {:?} after the removal",
        changed.elapsed()
    );
    for _ in 0..ROUNDS {
        let answer = flow.request()?;
        ensure!(
            answer == moved_to,
            "the flow left its new backend {moved_to} for {answer}"
        );
    }
    Ok(())
}

#[test]
fn udp_flow_is_refused_when_its_last_backend_is_removed() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let daemon = daemon_with_echo(&lab)?;
    let flow = caller(&lab).udp_flow(addr::CLUSTER_IP, SERVICE_UDP_PORT, RECEIVE_TIMEOUT)?;
    let answered = flow.request()?;
    ensure!(
        BACKEND_NAMES.contains(&answered.as_str()),
        "answered by {answered:?}"
    );

    daemon.apply(&echo_service().manifest([]))?;
    let changed = Instant::now();
    loop {
        match flow.request() {
            Err(error) if error.kind() == ErrorKind::ConnectionRefused => break,
            Err(error) if is_timeout(&error) => {}
            Err(error) => bail!("the flow failed otherwise than refused: {error}"),
            Ok(answer) => ensure!(
                answer == answered,
                "the flow moved from {answered} to {answer} without endpoints"
            ),
        }
        if changed.elapsed() > GIVE_UP {
            bail!("the flow still reaches {answered} {GIVE_UP:?} after the last endpoint left");
        }
        std::thread::sleep(RESEND_EVERY);
    }
    println!(
        "the flow was refused {:?} after its last backend left",
        changed.elapsed()
    );
    Ok(())
}
