//! Experiment: connections continuously across resyncs and conntrack sweeps.
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use anyhow::Result;
use common::{SERVICE_TCP_PORT, SYNC_TIMEOUT, backends, echo_service};
use proxy_lab::{addr, require_lab};

fn reset_on_close(stream: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

fn connection(target: SocketAddrV4) -> std::io::Result<()> {
    let stream = TcpStream::connect_timeout(&SocketAddr::V4(target), Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(1)))?;
    let hold: u64 = std::env::var("CHURN_HOLD_MS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    std::thread::sleep(Duration::from_millis(hold));
    (&stream).write_all(b"ping\n")?;
    let mut reply = [0u8; 64];
    let read = (&stream).read(&mut reply)?;
    reset_on_close(&stream);
    if read == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

#[test]
fn connections_survive_resyncs_and_sweeps() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let daemon = lab
        .daemon()
        .manifest(echo_service().manifest(backends(&lab)))
        .arg("--resync-seconds")
        .arg("1")
        .start()?;
    daemon.wait_synced(SYNC_TIMEOUT)?;
    let secs: u64 = std::env::var("CHURN_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(35);
    let caller = &lab.pod(4).ns;
    if let Ok(range) = std::env::var("CHURN_PORTS") {
        caller.sysctl("net/ipv4/ip_local_port_range", &range)?;
    }
    let target = SocketAddrV4::new(addr::CLUSTER_IP, SERVICE_TCP_PORT);
    let started = Instant::now();
    let results = std::thread::scope(|s| {
        let threads: usize = std::env::var("CHURN_THREADS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(3);
        let pause: u64 = std::env::var("CHURN_PAUSE_US")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(move || {
                    caller
                        .run(move || {
                            let (mut ok, mut failed) = (0u64, Vec::new());
                            while started.elapsed() < Duration::from_secs(secs) {
                                if pause > 0 {
                                    std::thread::sleep(Duration::from_micros(pause));
                                }
                                match connection(target) {
                                    Ok(()) => ok += 1,
                                    Err(e) => failed.push((started.elapsed(), e.to_string())),
                                }
                            }
                            (ok, failed)
                        })
                        .unwrap()
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap())
            .collect::<Vec<_>>()
    });
    let ok: u64 = results.iter().map(|r| r.0).sum();
    let failed: Vec<_> = results.iter().flat_map(|r| r.1.clone()).collect();
    println!("{ok} ok, {} failed: {failed:?}", failed.len());
    assert!(failed.is_empty());
    Ok(())
}
