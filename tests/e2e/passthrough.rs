//! Traffic that is not for a Service passes untouched while the daemon runs: direct
//! pod-to-pod and client-to-pod requests are answered by the pod addressed, from its own
//! address.

mod common;

use std::net::{SocketAddr, SocketAddrV4};

use anyhow::{Result, ensure};
use common::daemon_with_echo;
use proxy_lab::require_lab;

#[test]
fn direct_pod_and_client_traffic_is_unaffected() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let _daemon = daemon_with_echo(&lab)?;
    let sources = lab.pods().iter().map(|pod| (&pod.name, &pod.ns));
    let client = (&"client".to_owned(), lab.client());
    for (source, ns) in sources.chain([client]) {
        for target in lab.pods() {
            let tcp = ns.tcp_request(target.ip, lab.tcp_port())?;
            ensure!(
                tcp.body == target.name,
                "{source} → {}: TCP {tcp:?}",
                target.name
            );
            let udp = ns.udp_request(target.ip, lab.udp_port())?;
            let direct = SocketAddr::V4(SocketAddrV4::new(target.ip, lab.udp_port()));
            ensure!(
                udp.body == target.name && udp.peer == direct,
                "{source} → {}: UDP {udp:?}",
                target.name
            );
        }
    }
    Ok(())
}
