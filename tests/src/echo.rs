//! The pods' servers: they answer every request with the pod's name, so a test can tell
//! which backend served it. They run as threads of the test process, inside the pod's
//! namespace, and stop on drop.
//!
//! Every server listens on both families (an IPv4 socket and an IPv6-only one, served by
//! one thread), so IPv4 clients see exactly what they saw before the lab was dual-stack.
//! TCP: one reply line `<pod-name>\n` for every line received, so a single connection can
//! carry many request/response rounds. UDP: one datagram `<pod-name>` for every datagram.
//! The peer reporter (multi-node lab) answers every line with the source address it sees,
//! so a test can tell whether the client's address was kept or rewritten.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use socket2::{Domain, Socket, Type};

use crate::lab::Pod;
use crate::netns::{Netns, enter};

/// How often blocked server threads look at the stop flag.
pub(crate) const STOP_POLL: Duration = Duration::from_millis(100);

/// Echo servers of one lab; stopped and joined on drop.
#[derive(Debug, Default)]
pub(crate) struct EchoServers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl EchoServers {
    /// Starts the TCP and UDP servers of `pod`.
    pub(crate) fn spawn_pair(&mut self, pod: &Pod, tcp_port: u16, udp_port: u16) -> Result<()> {
        self.spawn_tcp(&pod.ns, &pod.name, tcp_port)?;
        self.spawn_udp(&pod.ns, &pod.name, udp_port)
    }

    /// Starts a TCP server on `port` in `ns` answering `name`; returns once it listens.
    pub(crate) fn spawn_tcp(&mut self, ns: &Netns, name: &str, port: u16) -> Result<()> {
        let reply = format!("{name}\n").into_bytes();
        self.spawn_tcp_answering(ns, format!("tcp-echo {name}"), port, move |_| reply.clone())
            .with_context(|| format!("TCP echo server of {name} on port {port}"))
    }

    /// Starts a TCP server on `port` in `ns` answering each line with the connection's
    /// source address as it arrived (`198.18.16.100\n`); returns once it listens.
    pub(crate) fn spawn_tcp_peer_reporter(&mut self, ns: &Netns, port: u16) -> Result<()> {
        let thread_name = format!("tcp-peer {}", ns.name());
        self.spawn_tcp_answering(ns, thread_name, port, |peer| {
            format!("{}\n", peer.ip()).into_bytes()
        })
        .with_context(|| format!("TCP peer reporter in {} on port {port}", ns.name()))
    }

    /// A TCP server whose reply to every line of a connection is `reply(source address)`.
    fn spawn_tcp_answering(
        &mut self,
        ns: &Netns,
        thread_name: String,
        port: u16,
        reply: impl Fn(&SocketAddr) -> Vec<u8> + Send + 'static,
    ) -> Result<()> {
        let stop = self.stop.clone();
        self.spawn_in(ns, thread_name, move |ready| {
            let listeners = both_families(port, Type::STREAM).and_then(|sockets| {
                (sockets.into_iter())
                    .map(|socket| {
                        socket.listen(128)?;
                        Ok(TcpListener::from(socket))
                    })
                    .collect::<std::io::Result<Vec<_>>>()
            });
            let listeners = match listeners {
                Ok(listeners) => listeners,
                Err(error) => return ready.send(Err(error)).unwrap_or(()),
            };
            let _ = ready.send(Ok(()));
            serve_tcp(&listeners, &reply, &stop);
        })
    }

    /// Starts a UDP server on `port` in `ns` answering `name`; returns once it is bound.
    pub(crate) fn spawn_udp(&mut self, ns: &Netns, name: &str, port: u16) -> Result<()> {
        let stop = self.stop.clone();
        let reply = name.as_bytes().to_vec();
        self.spawn_in(ns, format!("udp-echo {name}"), move |ready| {
            let sockets = both_families(port, Type::DGRAM).and_then(|sockets| {
                (sockets.into_iter())
                    .map(|socket| {
                        socket.set_nonblocking(true)?;
                        Ok(UdpSocket::from(socket))
                    })
                    .collect::<std::io::Result<Vec<_>>>()
            });
            let sockets = match sockets {
                Ok(sockets) => sockets,
                Err(error) => return ready.send(Err(error)).unwrap_or(()),
            };
            let _ = ready.send(Ok(()));
            serve_udp(&sockets, &reply, &stop);
        })
        .with_context(|| format!("UDP echo server of {name} on port {port}"))
    }

    /// The flag the servers' threads stop at.
    pub(crate) fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Spawns a long-lived thread inside `ns` and waits for it to report that its socket
    /// is ready (or why not).
    pub(crate) fn spawn_in(
        &mut self,
        ns: &Netns,
        thread_name: String,
        serve: impl FnOnce(mpsc::Sender<std::io::Result<()>>) + Send + 'static,
    ) -> Result<()> {
        let namespace = ns.open()?;
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(thread_name)
            .spawn(move || {
                if let Err(error) = enter(&namespace) {
                    let _ = ready_tx.send(Err(error));
                    return;
                }
                drop(namespace);
                serve(ready_tx);
            })
            .context("spawning server thread")?;
        self.threads.push(thread);
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .map_err(|_| anyhow!("server thread did not start"))?
            .context("binding")
    }
}

impl Drop for EchoServers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Sockets of `kind` bound to `port` on every address of each family: an IPv4 one and an
/// IPv6-only one.
fn both_families(port: u16, kind: Type) -> std::io::Result<[Socket; 2]> {
    let bound = |address: SocketAddr| -> std::io::Result<Socket> {
        let socket = Socket::new(Domain::for_address(address), kind, None)?;
        if address.is_ipv6() {
            socket.set_only_v6(true)?;
        }
        if kind == Type::STREAM {
            // As std's TcpListener::bind: a restarted server may bind at once.
            socket.set_reuse_address(true)?;
        }
        socket.bind(&address.into())?;
        Ok(socket)
    };
    Ok([
        bound(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))?,
        bound(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)))?,
    ])
}

fn serve_tcp(
    listeners: &[TcpListener],
    reply: &impl Fn(&SocketAddr) -> Vec<u8>,
    stop: &Arc<AtomicBool>,
) {
    let mut connections: Vec<JoinHandle<()>> = Vec::new();
    let fds: Vec<RawFd> = listeners.iter().map(AsRawFd::as_raw_fd).collect();
    while !stop.load(Ordering::Relaxed) {
        for ready in readable_within(&fds, STOP_POLL) {
            let Ok((stream, peer)) = listeners[ready].accept() else {
                continue;
            };
            connections.retain(|connection| !connection.is_finished());
            let reply = reply(&peer);
            let stop = stop.clone();
            connections.push(std::thread::spawn(move || {
                answer_lines(stream, &reply, &stop)
            }));
        }
    }
    for connection in connections {
        let _ = connection.join();
    }
}

/// Replies once per newline received until the peer closes, an error occurs, or stop.
fn answer_lines(mut stream: TcpStream, reply: &[u8], stop: &AtomicBool) {
    if stream.set_read_timeout(Some(STOP_POLL)).is_err() {
        return;
    }
    let mut buffer = [0u8; 1024];
    while !stop.load(Ordering::Relaxed) {
        match stream.read(&mut buffer) {
            Ok(0) => return,
            Ok(read) => {
                for _ in buffer[..read].iter().filter(|&&byte| byte == b'\n') {
                    if stream.write_all(reply).is_err() {
                        return;
                    }
                }
            }
            Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

/// Answers every datagram on `sockets` (non-blocking) until `stop`.
fn serve_udp(sockets: &[UdpSocket], reply: &[u8], stop: &AtomicBool) {
    let mut buffer = [0u8; 1024];
    let fds: Vec<RawFd> = sockets.iter().map(AsRawFd::as_raw_fd).collect();
    while !stop.load(Ordering::Relaxed) {
        for ready in readable_within(&fds, STOP_POLL) {
            while let Ok((_, peer)) = sockets[ready].recv_from(&mut buffer) {
                let _ = sockets[ready].send_to(reply, peer);
            }
        }
    }
}

/// Waits until some of `fds` are readable (a connection to accept, a datagram), at most
/// `timeout`; returns their indices.
fn readable_within(fds: &[RawFd], timeout: Duration) -> Vec<usize> {
    let mut poll_fds: Vec<libc::pollfd> = (fds.iter())
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: valid pollfds, as many as passed, for the duration of the call.
    let ready = unsafe {
        libc::poll(
            poll_fds.as_mut_ptr(),
            poll_fds.len() as libc::nfds_t,
            timeout.as_millis() as libc::c_int,
        )
    };
    if ready <= 0 {
        return Vec::new();
    }
    (poll_fds.iter().enumerate())
        .filter(|(_, poll_fd)| poll_fd.revents & libc::POLLIN != 0)
        .map(|(index, _)| index)
        .collect()
}
