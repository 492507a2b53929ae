//! The test API server's socket, which can go down and come back on the same address: while
//! down nothing listens (a client's connect is refused), and every connection accepted
//! before fails at its next read or write — what a client meets when the real server dies.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Where the socket is bound: an address, and the network namespace to bind it in (a lab
/// node's, so the daemon there reaches it on its own loopback).
#[derive(Clone, Debug)]
pub(crate) struct Binding {
    pub address: SocketAddr,
    pub netns: Option<PathBuf>,
}

impl Binding {
    /// Binds a listener, in the namespace if one is given (on a thread that enters it: the
    /// socket stays in the namespace it was made in).
    pub fn bind(&self) -> io::Result<TcpListener> {
        let address = self.address;
        let listener = match &self.netns {
            None => std::net::TcpListener::bind(address)?,
            Some(path) => {
                let namespace = std::fs::File::open(path)?;
                std::thread::scope(|scope| {
                    scope
                        .spawn(|| {
                            crate::netns::enter(&namespace)?;
                            std::net::TcpListener::bind(address)
                        })
                        .join()
                        .expect("the binding thread")
                })?
            }
        };
        listener.set_nonblocking(true)?;
        TcpListener::from_std(listener)
    }
}

/// Shared between the server handle and its listener: whether the server is up, and the
/// generation of its connections (bumped when it goes down, which ends the older ones).
#[derive(Debug)]
pub(crate) struct Power {
    up: watch::Sender<bool>,
    generation: Arc<AtomicU64>,
}

impl Power {
    pub fn new() -> Arc<Self> {
        Arc::new(Power {
            up: watch::Sender::new(true),
            generation: Arc::new(AtomicU64::new(0)),
        })
    }

    pub fn set_up(&self, up: bool) {
        if !up {
            self.generation.fetch_add(1, Ordering::SeqCst);
        }
        self.up.send_replace(up);
    }
}

/// An axum listener that stops listening while the server is down.
pub(crate) struct GatedListener {
    binding: Binding,
    listener: Option<TcpListener>,
    up: watch::Receiver<bool>,
    generation: Arc<AtomicU64>,
}

impl GatedListener {
    /// Binds `binding`; with port 0 the kernel picks one, kept for every later bind.
    pub fn bind(mut binding: Binding, power: &Power) -> io::Result<Self> {
        let listener = binding.bind()?;
        binding.address = listener.local_addr()?;
        Ok(GatedListener {
            binding,
            listener: Some(listener),
            up: power.up.subscribe(),
            generation: power.generation.clone(),
        })
    }

    pub fn address(&self) -> SocketAddr {
        self.binding.address
    }
}

impl axum::serve::Listener for GatedListener {
    type Io = GatedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (GatedStream, SocketAddr) {
        loop {
            if !*self.up.borrow_and_update() {
                // Closing the socket makes connects fail with "connection refused".
                self.listener = None;
                let _ = self.up.wait_for(|up| *up).await;
                continue;
            }
            if self.listener.is_none() {
                match self.binding.bind() {
                    Ok(listener) => self.listener = Some(listener),
                    Err(error) => panic!("rebinding {:?}: {error}", self.binding),
                }
            }
            let listener = self.listener.as_ref().expect("bound above");
            tokio::select! {
                accepted = listener.accept() => {
                    if let Ok((stream, peer)) = accepted {
                        let stream = GatedStream {
                            stream,
                            generation: self.generation.load(Ordering::SeqCst),
                            current: self.generation.clone(),
                        };
                        return (stream, peer);
                    }
                }
                _ = self.up.changed() => {}
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.binding.address)
    }
}

/// A connection that fails once the server has gone down since it was accepted.
pub(crate) struct GatedStream {
    stream: TcpStream,
    generation: u64,
    current: Arc<AtomicU64>,
}

impl GatedStream {
    fn check(&self) -> io::Result<()> {
        if self.current.load(Ordering::SeqCst) == self.generation {
            Ok(())
        } else {
            Err(io::Error::from(io::ErrorKind::ConnectionReset))
        }
    }
}

impl AsyncRead for GatedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.check()?;
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for GatedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check()?;
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
