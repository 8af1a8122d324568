//! Connections a listener accepts, held within bounds: at most so many at once per listener,
//! and each closed when the peer sends nothing for a while.
//!
//! A connection that opens and sends nothing, sends half a request, or stalls in the TLS
//! handshake would otherwise hold its socket and task forever; enough of them exhaust the
//! process's file descriptors. Here every accepted connection holds a permit of its listener
//! (the listener stops accepting while all are held, and the kernel's backlog queues the rest),
//! and a read that waits longer than the listener's idle limit fails, which closes the
//! connection. Healthy peers are never idle that long: the gRPC server pings each connection
//! (HTTP/2 keepalive) more often than its limit, and an HTTP request arrives whole in far less.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// How many connections a listener holds at once, and how long a read may wait.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub max_connections: usize,
    pub idle: Duration,
}

/// A listener whose connections are [`Guarded`].
#[derive(Debug)]
pub struct GuardedListener {
    listener: TcpListener,
    permits: Arc<Semaphore>,
    idle: Duration,
}

impl GuardedListener {
    pub fn new(listener: TcpListener, bounds: Bounds) -> Self {
        Self {
            listener,
            permits: Arc::new(Semaphore::new(bounds.max_connections)),
            idle: bounds.idle,
        }
    }

    /// The next connection, once a place is free. Accept errors (out of file descriptors, a
    /// connection reset before it was accepted) are waited out and retried.
    pub async fn accept(&self) -> (Guarded, std::net::SocketAddr) {
        let Ok(permit) = Arc::clone(&self.permits).acquire_owned().await else {
            // The semaphore is never closed.
            std::future::pending::<()>().await;
            unreachable!()
        };
        loop {
            match self.listener.accept().await {
                Ok((stream, addr)) => {
                    let _ = stream.set_nodelay(true);
                    return (Guarded::new(stream, permit, self.idle), addr);
                }
                Err(err) => {
                    tracing::debug!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

impl axum::serve::Listener for GuardedListener {
    type Io = Guarded;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        GuardedListener::accept(self).await
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

/// An accepted connection: it holds its listener's permit until it is dropped, and a read that
/// waits longer than the idle limit fails with `TimedOut`.
#[derive(Debug)]
pub struct Guarded {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl Guarded {
    fn new(stream: TcpStream, permit: OwnedSemaphorePermit, idle: Duration) -> Self {
        Self {
            stream,
            _permit: permit,
            idle,
            deadline: Box::pin(tokio::time::sleep(idle)),
        }
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    let next = Instant::now() + self.idle;
                    self.deadline.as_mut().reset(next);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the peer sent nothing for too long",
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for Guarded {
    type ConnectInfo = <TcpStream as tonic::transport::server::Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[tokio::test]
    async fn a_silent_peer_is_cut_and_a_full_listener_waits() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let guarded = Arc::new(GuardedListener::new(
            listener,
            Bounds {
                max_connections: 1,
                idle: Duration::from_millis(200),
            },
        ));
        let _silent = TcpStream::connect(addr).await.unwrap();
        let (mut first, _) = guarded.accept().await;
        let started = Instant::now();
        let mut byte = [0u8; 1];
        let err = first.read(&mut byte).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(190));
        // While `first` holds the only place, the next connection is not accepted.
        let mut talker = TcpStream::connect(addr).await.unwrap();
        let next = {
            let guarded = Arc::clone(&guarded);
            tokio::spawn(async move { guarded.accept().await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!next.is_finished());
        drop(first);
        let (mut second, _) = tokio::time::timeout(Duration::from_secs(5), next)
            .await
            .unwrap()
            .unwrap();
        // A peer that keeps sending is not cut, however long it stays.
        for _ in 0..4 {
            talker.write_all(b"x").await.unwrap();
            second.read_exact(&mut byte).await.unwrap();
            tokio::time::sleep(Duration::from_millis(120)).await;
        }
    }
}
