//! Issue 18, item 1: a connection whose backend never answers its SYN holds its client's
//! port on that backend only for netfilter's SYN_SENT timeout, not for the 24 hours of an
//! established connection; once it expires, the next SYN from the port selects again.
//!
//! pod-1 never answers pod-4 (its answers to pod-4 go to a blackhole route), pod-2 does.
//! The daemon runs with `--conntrack-tcp-timeout-syn-sent 3s` so the test need not wait
//! two minutes.

mod common;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use common::{SERVICE_TCP_PORT, SYNC_TIMEOUT, caller, echo_service, flows_of};
use proxy_lab::{addr, is_timeout, require_lab};

const SYN_SENT_TIMEOUT: Duration = Duration::from_secs(3);
const CLIENT_PORT: u16 = 40_100;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Tries before the client's port lands on pod-1: all on pod-2 with probability 2^-30.
const TRIES: usize = 30;

#[test]
fn an_unanswered_syn_holds_its_backend_only_until_syn_sent_expires() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let silent = lab.pod(1);
    silent.ns.ip(&[
        "route",
        "add",
        "blackhole",
        &format!("{}/32", lab.pod(4).ip),
    ])?;
    let daemon = lab
        .daemon()
        .manifest(echo_service().manifest(&lab.pods()[..2]))
        .arg("--conntrack-tcp-timeout-syn-sent")
        .arg(format!("{}s", SYN_SENT_TIMEOUT.as_secs()))
        .start()?;
    daemon.wait_synced(SYNC_TIMEOUT)?;
    let client = caller(&lab);
    let connect = || {
        client.tcp_connect_from(
            CLIENT_PORT,
            addr::CLUSTER_IP,
            SERVICE_TCP_PORT,
            CONNECT_TIMEOUT,
        )
    };
    // Until the port's new connection lands on the silent pod (an answered one ends with a
    // reset, so the port's next SYN selects anew).
    let mut landed = false;
    for _ in 0..TRIES {
        match connect() {
            Ok(mut session) => {
                ensure!(session.request()? == "pod-2");
                session.reset_on_close()?;
            }
            Err(error) if is_timeout(&error) => {
                landed = true;
                break;
            }
            Err(error) => return Err(error).context("connecting"),
        }
    }
    ensure!(landed, "{TRIES} connections never reached the silent pod");

    let flows = flows_of(&daemon, lab.pod(4).ip, &[])?;
    let flow = flows
        .iter()
        .find(|flow| flow["client"]["port"] == CLIENT_PORT)
        .with_context(|| format!("no flow from port {CLIENT_PORT}: {flows:?}"))?;
    ensure!(flow["flow_state"] == "syn_sent", "{flow:#}");
    ensure!(flow["assured"] == false, "{flow:#}");
    ensure!(
        flow["expires_in_seconds"].as_u64() <= Some(SYN_SENT_TIMEOUT.as_secs()),
        "an unanswered SYN must not live like an established connection: {flow:#}"
    );
    ensure!(
        flow["backend"]["address"] == silent.ip.to_string(),
        "{flow:#}"
    );

    // While the flow lives, the port's SYNs stay on the silent pod…
    let error = connect()
        .err()
        .context("the pinned port reached a backend")?;
    ensure!(is_timeout(&error), "{error}");
    // … and once it expired, they are balanced again.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        std::thread::sleep(SYN_SENT_TIMEOUT + Duration::from_millis(500));
        match connect() {
            Ok(mut session) => {
                ensure!(session.request()? == "pod-2");
                session.reset_on_close()?;
                return Ok(());
            }
            Err(error) if is_timeout(&error) && Instant::now() < deadline => {}
            Err(error) => bail!("the port never left the silent pod: {error}"),
        }
    }
}
