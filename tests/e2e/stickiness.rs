//! An established connection stays on its backend: every round of a TCP connection is
//! answered by the backend that answered the first, also with other connections
//! interleaved.

mod common;

use anyhow::{Result, ensure};
use common::{BACKEND_NAMES, SERVICE_TCP_PORT, caller, daemon_with_echo};
use proxy_lab::{addr, require_lab};

const SESSIONS: usize = 4;
const ROUNDS: usize = 60;

#[test]
fn each_tcp_connection_keeps_its_backend() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let _daemon = daemon_with_echo(&lab)?;
    let mut sessions = Vec::with_capacity(SESSIONS);
    for _ in 0..SESSIONS {
        let mut session = caller(&lab).tcp_session(addr::CLUSTER_IP, SERVICE_TCP_PORT)?;
        let backend = session.request()?;
        ensure!(
            BACKEND_NAMES.contains(&backend.as_str()),
            "answered by {backend:?}"
        );
        sessions.push((session, backend));
    }
    for round in 1..ROUNDS {
        for (index, (session, backend)) in sessions.iter_mut().enumerate() {
            let answer = session.request()?;
            ensure!(
                answer == *backend,
                "connection {index} moved from {backend} to {answer} in round {round}"
            );
        }
    }
    Ok(())
}
