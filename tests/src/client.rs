//! Client helpers: requests to the echo servers from any lab namespace, with timeouts.
//!
//! Only socket creation has to happen inside the namespace ([`Netns::run`]); reads and
//! writes then work from the caller's thread. Every helper takes an address of either
//! family and makes its socket in the target's family (`[addr]:port` for IPv6).

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use socket2::{Domain, SockRef, Socket, Type};

use crate::netns::Netns;

/// Connect and read timeout of the helpers that do not take one.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// One answer from an echo server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The name of the pod that answered.
    pub body: String,
    /// Where the answer came from. For UDP this is the reply datagram's real source, so it
    /// shows whether reverse NAT restored the service address. For TCP it is the address
    /// the socket is connected to: a reply from any other source would not have completed
    /// the handshake, so a successful request already proves the reverse translation.
    pub peer: SocketAddr,
}

/// A connected UDP socket: one flow (a fixed source port, like a DNS resolver's) for many
/// datagrams. Being connected, it hears ICMP errors: a refused datagram makes the next
/// receive fail with [`ErrorKind::ConnectionRefused`].
#[derive(Debug)]
pub struct UdpFlow {
    pub(crate) socket: UdpSocket,
}

impl UdpFlow {
    /// One round: sends a datagram and returns the answer (the serving pod's name).
    pub fn request(&self) -> std::io::Result<String> {
        self.socket.send(b"ping")?;
        let mut buffer = [0u8; 512];
        let length = self.socket.recv(&mut buffer)?;
        Ok(String::from_utf8_lossy(&buffer[..length]).into_owned())
    }
}

/// A TCP connection to an echo server, for many request/response rounds.
#[derive(Debug)]
pub struct TcpSession {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl TcpSession {
    /// One round: sends a line and returns the reply line (the serving pod's name).
    pub fn request(&mut self) -> Result<String> {
        self.writer
            .write_all(b"ping\n")
            .context("sending request")?;
        let mut line = String::new();
        let read = self.reader.read_line(&mut line).context("reading reply")?;
        if read == 0 {
            bail!("connection closed by peer");
        }
        Ok(line.trim_end().to_owned())
    }

    /// The address this session is connected to.
    pub fn peer(&self) -> Result<SocketAddr> {
        Ok(self.writer.peer_addr()?)
    }

    /// Closing will send a reset instead of a FIN (SO_LINGER 0): no TIME_WAIT on this
    /// side, so the same source port can connect to the same destination again at once.
    pub fn reset_on_close(&self) -> std::io::Result<()> {
        SockRef::from(&self.writer).set_linger(Some(Duration::ZERO))
    }
}

/// The unspecified address of `addr`'s family: what a client socket for it binds.
fn unspecified_like(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    }
}

/// A socket of `kind` for talking to `peer`'s family, bound to `local_port` on every
/// address, with SO_REUSEADDR (other sockets may share the port, as `socat …,sourceport=`
/// or `dig -b` do) and a receive timeout. An IPv6 socket is IPv6 only.
fn bound_socket(
    kind: Type,
    peer: IpAddr,
    local_port: u16,
    timeout: Duration,
) -> std::io::Result<Socket> {
    let local = SocketAddr::new(unspecified_like(peer), local_port);
    let socket = Socket::new(Domain::for_address(local), kind, None)?;
    if local.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_read_timeout(Some(timeout))?;
    socket.set_write_timeout(Some(timeout))?;
    socket.bind(&local.into())?;
    Ok(socket)
}

impl Netns {
    /// Opens a TCP connection from this namespace. Returns the raw I/O error so tests can
    /// tell a dropped connection ([`ErrorKind::TimedOut`]) from a refused one.
    pub fn tcp_connect(
        &self,
        addr: impl Into<IpAddr>,
        port: u16,
        timeout: Duration,
    ) -> std::io::Result<TcpSession> {
        let target = SocketAddr::new(addr.into(), port);
        let stream = self
            .run(|| TcpStream::connect_timeout(&target, timeout))
            .map_err(std::io::Error::other)??;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        Ok(TcpSession {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        })
    }

    /// [`Netns::tcp_connect`] with [`REQUEST_TIMEOUT`].
    pub fn tcp_session(&self, addr: impl Into<IpAddr>, port: u16) -> Result<TcpSession> {
        let target = SocketAddr::new(addr.into(), port);
        self.tcp_connect(target.ip(), port, REQUEST_TIMEOUT)
            .with_context(|| format!("TCP connect from {} to {target}", self.name()))
    }

    /// A new TCP connection with one request/response round.
    pub fn tcp_request(&self, addr: impl Into<IpAddr>, port: u16) -> Result<Reply> {
        let addr = addr.into();
        let mut session = self.tcp_session(addr, port)?;
        let body = session.request().with_context(|| {
            let target = SocketAddr::new(addr, port);
            format!("TCP request from {} to {target}", self.name())
        })?;
        Ok(Reply {
            body,
            peer: session.peer()?,
        })
    }

    /// A datagram from a new socket (so a new flow) and its answer, with [`REQUEST_TIMEOUT`].
    pub fn udp_request(&self, addr: impl Into<IpAddr>, port: u16) -> Result<Reply> {
        let target = SocketAddr::new(addr.into(), port);
        self.udp_request_within(target.ip(), port, REQUEST_TIMEOUT)
            .with_context(|| format!("UDP request from {} to {target}", self.name()))
    }

    /// Like [`Netns::udp_request`] with a chosen timeout; the raw error tells a lost
    /// answer ([`ErrorKind::WouldBlock`] or [`ErrorKind::TimedOut`]) from others.
    pub fn udp_request_within(
        &self,
        addr: impl Into<IpAddr>,
        port: u16,
        timeout: Duration,
    ) -> std::io::Result<Reply> {
        let addr = addr.into();
        let socket = self
            .run(|| UdpSocket::bind((unspecified_like(addr), 0)))
            .map_err(std::io::Error::other)??;
        socket.set_read_timeout(Some(timeout))?;
        socket.send_to(b"ping", (addr, port))?;
        let mut buffer = [0u8; 512];
        let (length, peer) = socket.recv_from(&mut buffer)?;
        Ok(Reply {
            body: String::from_utf8_lossy(&buffer[..length]).into_owned(),
            peer,
        })
    }

    /// One HTTP/1.0 `GET path` to `addr:port` from this namespace: (status code, body).
    pub fn http_get(
        &self,
        addr: impl Into<IpAddr>,
        port: u16,
        path: &str,
    ) -> Result<(u16, String)> {
        let target = SocketAddr::new(addr.into(), port);
        let mut session = self.tcp_session(target.ip(), port)?;
        write!(
            session.writer,
            "GET {path} HTTP/1.0\r\nHost: {target}\r\n\r\n"
        )?;
        let mut response = String::new();
        session
            .reader
            .read_to_string(&mut response)
            .with_context(|| format!("HTTP GET {target}{path}"))?;
        let (head, body) = response
            .split_once("\r\n\r\n")
            .with_context(|| format!("no end of the HTTP header in {response:?}"))?;
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .with_context(|| format!("no status code in {head:?}"))?;
        Ok((code, body.to_owned()))
    }

    /// A TCP connection from this namespace's `local_port` to `addr:port`, as
    /// `socat - TCP:addr:port,sourceport=local_port` makes one: another socket may hold the
    /// same port at the same time (SO_REUSEADDR).
    pub fn tcp_connect_from(
        &self,
        local_port: u16,
        addr: impl Into<IpAddr>,
        port: u16,
        timeout: Duration,
    ) -> std::io::Result<TcpSession> {
        let target = SocketAddr::new(addr.into(), port);
        let socket = self
            .run(|| bound_socket(Type::STREAM, target.ip(), local_port, timeout))
            .map_err(std::io::Error::other)??;
        socket.connect_timeout(&target.into(), timeout)?;
        let stream = TcpStream::from(socket);
        stream.set_nodelay(true)?;
        Ok(TcpSession {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        })
    }

    /// An unconnected IPv4 UDP socket on this namespace's `local_port` (SO_REUSEADDR), as
    /// `dig -b address#local_port` uses one, receiving with `timeout`.
    pub fn udp_socket_from(
        &self,
        local_port: u16,
        timeout: Duration,
    ) -> std::io::Result<UdpSocket> {
        self.udp_socket_for(Ipv4Addr::UNSPECIFIED.into(), local_port, timeout)
    }

    /// [`Netns::udp_socket_from`] in the family of `peer` (IPv6 only for an IPv6 peer).
    pub fn udp_socket_for(
        &self,
        peer: IpAddr,
        local_port: u16,
        timeout: Duration,
    ) -> std::io::Result<UdpSocket> {
        let socket = self
            .run(|| bound_socket(Type::DGRAM, peer, local_port, timeout))
            .map_err(std::io::Error::other)??;
        Ok(UdpSocket::from(socket))
    }

    /// A UDP socket in this namespace connected to `addr:port`, receiving with `timeout`.
    pub fn udp_flow(
        &self,
        addr: impl Into<IpAddr>,
        port: u16,
        timeout: Duration,
    ) -> std::io::Result<UdpFlow> {
        let addr = addr.into();
        let socket = self
            .run(|| UdpSocket::bind((unspecified_like(addr), 0)))
            .map_err(std::io::Error::other)??;
        socket.set_read_timeout(Some(timeout))?;
        socket.connect((addr, port))?;
        Ok(UdpFlow { socket })
    }
}

/// True for the errors a socket reports when nothing answered in time.
pub fn is_timeout(error: &std::io::Error) -> bool {
    matches!(error.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock)
}

/// One query on an unconnected UDP socket: sends to `addr:port`, waits for the answer.
pub fn udp_exchange(
    socket: &UdpSocket,
    addr: impl Into<IpAddr>,
    port: u16,
) -> std::io::Result<Reply> {
    socket.send_to(b"ping", (addr.into(), port))?;
    let mut buffer = [0u8; 512];
    let (length, peer) = socket.recv_from(&mut buffer)?;
    Ok(Reply {
        body: String::from_utf8_lossy(&buffer[..length]).into_owned(),
        peer,
    })
}
