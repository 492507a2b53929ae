//! Large payloads, for the packets around a translated flow: a UDP server that answers
//! each datagram with one of the size it asks for (IP fragments once over the MTU), a TCP
//! server that sends a fixed amount to every connection (Path-MTU discovery at work), and
//! the clients of both.
//!
//! A sized request starts with `size=<bytes>;` and is zero-filled to the size the client
//! chose; the answer is the pod's name, zero-filled to the size asked for. A connected
//! client socket hears ICMP errors: a refusal fails the receive with
//! [`std::io::ErrorKind::ConnectionRefused`].

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::client::Reply;
use crate::echo::EchoServers;
use crate::lab::Pod;
use crate::netns::Netns;

/// The largest datagram UDP carries over IPv4.
const MAX_DATAGRAM: usize = 65_507;

/// Servers a test starts beside the lab's echo servers, in pods of its choice; stopped on
/// drop (declare them after the lab, so they stop before its namespaces go).
#[derive(Debug, Default)]
pub struct LargeServers(EchoServers);

impl LargeServers {
    /// A UDP server on `port` in `pod` answering each datagram with the size it asks for.
    pub fn udp_sized(&mut self, pod: &Pod, port: u16) -> Result<()> {
        let name = pod.name.clone();
        self.0
            .spawn_udp_with(&pod.ns, &pod.name, port, move |request| {
                let size = requested_size(request)?;
                let mut answer = name.as_bytes().to_vec();
                answer.resize(size.max(answer.len()), 0);
                Some(answer)
            })
    }

    /// A TCP server on `port` in `pod` that sends `bytes` to every connection, then closes.
    pub fn tcp_bulk(&mut self, pod: &Pod, port: u16, bytes: usize) -> Result<()> {
        self.0
            .spawn_tcp_sending(&pod.ns, &pod.name, port, vec![0x5a; bytes])
    }
}

/// The size a sized request asks for.
fn requested_size(request: &[u8]) -> Option<usize> {
    let text = request.strip_prefix(b"size=")?;
    let end = text.iter().position(|&byte| byte == b';')?;
    let size: usize = std::str::from_utf8(&text[..end]).ok()?.parse().ok()?;
    (size <= MAX_DATAGRAM).then_some(size)
}

impl Netns {
    /// From a new socket connected to `addr:port`: a datagram of `query_len` bytes asking
    /// for an answer of `answer_len` bytes. The answer must be whole, from `addr:port`,
    /// within `timeout`; its body is the answering pod's name. The raw error tells a
    /// refusal ([`ErrorKind::ConnectionRefused`]) from a lost query or answer (a timeout).
    pub fn udp_sized_request(
        &self,
        addr: impl Into<IpAddr>,
        port: u16,
        query_len: usize,
        answer_len: usize,
        timeout: Duration,
    ) -> std::io::Result<Reply> {
        let socket = self.udp_flow(addr, port, timeout)?.socket;
        let mut query = format!("size={answer_len};").into_bytes();
        query.resize(query_len.max(query.len()), 0);
        socket.send(&query)?;
        let mut buffer = vec![0u8; MAX_DATAGRAM];
        let length = socket.recv(&mut buffer)?;
        let name_end = buffer[..length]
            .iter()
            .position(|&byte| byte == 0)
            .unwrap_or(length);
        if length != answer_len {
            return Err(std::io::Error::new(
                ErrorKind::InvalidData,
                format!("an answer of {length} bytes, not {answer_len}"),
            ));
        }
        Ok(Reply {
            body: String::from_utf8_lossy(&buffer[..name_end]).into_owned(),
            peer: socket.peer_addr()?,
        })
    }

    /// Connects to `addr:port` and reads until the server closes: how many bytes arrived
    /// within `timeout` (the connection's whole life), and whether it ended in time.
    pub fn tcp_receive_all(
        &self,
        addr: Ipv4Addr,
        port: u16,
        timeout: Duration,
    ) -> std::io::Result<Received> {
        let started = Instant::now();
        let target = SocketAddr::from((addr, port));
        let mut stream = self
            .run(|| std::net::TcpStream::connect_timeout(&target, timeout))
            .map_err(std::io::Error::other)??;
        let mut bytes = 0;
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let left = timeout.saturating_sub(started.elapsed());
            if left.is_zero() {
                return Ok(Received {
                    bytes,
                    complete: false,
                });
            }
            stream.set_read_timeout(Some(left))?;
            match stream.read(&mut buffer) {
                Ok(0) => {
                    return Ok(Received {
                        bytes,
                        complete: true,
                    });
                }
                Ok(read) => bytes += read,
                Err(error)
                    if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                {
                    return Ok(Received {
                        bytes,
                        complete: false,
                    });
                }
                Err(error) => return Err(error),
            }
        }
    }
}

/// What [`Netns::tcp_receive_all`] got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Received {
    pub bytes: usize,
    /// The server closed the connection (all was sent) before the timeout.
    pub complete: bool,
}

impl EchoServers {
    /// A UDP server on `port` in `ns` answering each datagram with `answer(datagram)`, if
    /// any, over both families (one dual-stack socket); returns once it is bound.
    pub(crate) fn spawn_udp_with(
        &mut self,
        ns: &Netns,
        name: &str,
        port: u16,
        answer: impl Fn(&[u8]) -> Option<Vec<u8>> + Send + 'static,
    ) -> Result<()> {
        let stop = self.stop_flag();
        self.spawn_in(ns, format!("udp-sized {name}"), move |ready| {
            let socket = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, port)).and_then(|socket| {
                socket
                    .set_read_timeout(Some(crate::echo::STOP_POLL))
                    .map(|()| socket)
            });
            let socket = match socket {
                Ok(socket) => socket,
                Err(error) => return ready.send(Err(error)).unwrap_or(()),
            };
            let _ = ready.send(Ok(()));
            let mut buffer = vec![0u8; MAX_DATAGRAM];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok((length, peer)) = socket.recv_from(&mut buffer)
                    && let Some(reply) = answer(&buffer[..length])
                {
                    let _ = socket.send_to(&reply, peer);
                }
            }
        })
    }

    /// A TCP server on `port` in `ns` that writes `data` to every connection, then closes
    /// it; returns once it listens.
    pub(crate) fn spawn_tcp_sending(
        &mut self,
        ns: &Netns,
        name: &str,
        port: u16,
        data: Vec<u8>,
    ) -> Result<()> {
        let stop = self.stop_flag();
        self.spawn_in(ns, format!("tcp-bulk {name}"), move |ready| {
            let listener = match TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))
                .and_then(|listener| listener.set_nonblocking(true).map(|()| listener))
            {
                Ok(listener) => listener,
                Err(error) => return ready.send(Err(error)).unwrap_or(()),
            };
            let _ = ready.send(Ok(()));
            let mut senders = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut stream, _)) => {
                        let data = data.clone();
                        senders.push(std::thread::spawn(move || {
                            let _ = stream.set_nonblocking(false);
                            let _ = stream.set_write_timeout(Some(Duration::from_secs(30)));
                            let _ = stream.write_all(&data);
                        }));
                    }
                    Err(_) => std::thread::sleep(crate::echo::STOP_POLL),
                }
            }
            for sender in senders {
                let _ = sender.join();
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sized_request_names_its_size() {
        assert_eq!(requested_size(b"size=30000;\0\0\0"), Some(30_000));
        assert_eq!(requested_size(b"size=70000;"), None);
        assert_eq!(requested_size(b"ping"), None);
        assert_eq!(requested_size(b"size=12"), None);
    }
}
