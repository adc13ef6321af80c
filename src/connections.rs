//! The gRPC listener's connections: accepted over TCP, through TLS when it is configured, each
//! carrying a [`ConnectionInfo`] into every request (the mTLS client's identity, and the
//! activity that drives the idle timeout). A connection with no call in progress and none
//! started for `GRPC_IDLE_TIMEOUT` is closed; HTTP/2 keepalive pings do not count as activity,
//! so idle clients do not pin connections forever. At most `MAX_CONNECTIONS` are open at once:
//! one more is closed as soon as it is accepted, and counted.
//!
//! HTTP/2 bounds what a client may send unread (flow-control windows, the header list). An
//! HTTP/1.1 client (the Connect protocol) has no such windows, so the connection bounds it: it
//! may send at most `max_http1_unanswered` bytes (a header block and a request body) before
//! the server writes something back; one byte more and the connection is closed.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::{Instant, Sleep};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::either::Either;
use tonic::transport::server::Connected;

use crate::metrics as m;
use crate::tls::ReloadingTls;

/// How long a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Refused connections are logged at warn at most this often.
const REFUSAL_WARN_INTERVAL: Duration = Duration::from_secs(60);

/// What every request on a connection can know about it.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    /// The mTLS client certificate's URI SAN, else its common name.
    pub peer_identity: Option<String>,
    activity: Arc<Activity>,
}

impl ConnectionInfo {
    /// Marks a call in progress on this connection until the guard is dropped.
    pub fn call_started(&self) -> CallInProgress {
        self.activity.in_flight.fetch_add(1, Ordering::SeqCst);
        self.activity.touch();
        CallInProgress(self.activity.clone())
    }
}

/// A call in progress; keeps its connection from idling out.
#[derive(Debug)]
pub struct CallInProgress(Arc<Activity>);

impl Drop for CallInProgress {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Debug)]
struct Activity {
    opened: Instant,
    /// Milliseconds after `opened` of the last call start or end.
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
}

impl Activity {
    fn new() -> Self {
        Self {
            opened: Instant::now(),
            last_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.fetch_max(ms, Ordering::SeqCst);
    }

    /// When the connection may be closed for idleness, counting from the last activity; `None`
    /// while a call is in progress.
    fn idle_deadline(&self, timeout: Duration) -> Option<Instant> {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let last = Duration::from_millis(self.last_ms.load(Ordering::SeqCst));
        Some(self.opened + last + timeout)
    }
}

/// A connection's byte stream: plain TCP, or TLS over it.
type Transport = Either<TcpStream, Box<TlsStream<TcpStream>>>;

/// The HTTP/2 connection preface's first bytes; no HTTP/1.1 method begins with them.
const HTTP2_PREFACE_START: &[u8] = b"PRI";

/// Which HTTP a connection speaks, as its first bytes tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// Too few bytes yet: this many have matched the HTTP/2 preface's start.
    Unknown(usize),
    /// HTTP/2: its own windows bound what it holds.
    Http2,
    /// HTTP/1.1: the bytes read since the server last wrote.
    Http1 { unanswered: usize },
}

impl Framing {
    /// The framing once `bytes` more have been read.
    fn after(self, bytes: &[u8]) -> Self {
        match self {
            Self::Unknown(matched) => {
                let wanted = &HTTP2_PREFACE_START[matched..];
                let n = bytes.len().min(wanted.len());
                if bytes[..n] != wanted[..n] {
                    Self::Http1 {
                        unanswered: matched,
                    }
                    .after(bytes)
                } else if matched + n == HTTP2_PREFACE_START.len() {
                    Self::Http2
                } else {
                    Self::Unknown(matched + n)
                }
            }
            Self::Http2 => Self::Http2,
            Self::Http1 { unanswered } => Self::Http1 {
                unanswered: unanswered.saturating_add(bytes.len()),
            },
        }
    }
}

/// An accepted connection with its info and idle timer.
#[derive(Debug)]
pub struct Connection {
    transport: Transport,
    info: ConnectionInfo,
    idle_timeout: Duration,
    idle_check: Pin<Box<Sleep>>,
    framing: Framing,
    max_http1_unanswered: usize,
    _open: OpenConnection,
}

/// One of the `MAX_CONNECTIONS` places, counted in `grpc_connections_open` while held.
#[derive(Debug)]
struct OpenConnection {
    _place: OwnedSemaphorePermit,
}

impl OpenConnection {
    fn new(place: OwnedSemaphorePermit) -> Self {
        metrics::gauge!(m::CONNECTIONS_OPEN).increment(1.0);
        Self { _place: place }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        metrics::gauge!(m::CONNECTIONS_OPEN).decrement(1.0);
    }
}

impl Connection {
    fn new(
        transport: Transport,
        info: ConnectionInfo,
        idle_timeout: Duration,
        max_http1_unanswered: usize,
        open: OpenConnection,
    ) -> Self {
        Self {
            transport,
            idle_check: Box::pin(tokio::time::sleep(idle_timeout)),
            info,
            idle_timeout,
            framing: Framing::Unknown(0),
            max_http1_unanswered,
            _open: open,
        }
    }

    /// How many more bytes may be read now: all there is room for, except on HTTP/1.1.
    fn allowance(&self) -> usize {
        match self.framing {
            Framing::Http1 { unanswered } => self.max_http1_unanswered.saturating_sub(unanswered),
            Framing::Unknown(_) | Framing::Http2 => usize::MAX,
        }
    }

    /// Something was written back: an HTTP/1.1 client may send again.
    fn answered(&mut self, written: usize) {
        if written > 0
            && let Framing::Http1 { unanswered } = &mut self.framing
        {
            *unanswered = 0;
        }
    }

    /// True once the connection has been idle for the timeout; re-arms the timer otherwise.
    fn idled_out(&mut self, cx: &mut Context<'_>) -> bool {
        while self.idle_check.as_mut().poll(cx).is_ready() {
            match self.info.activity.idle_deadline(self.idle_timeout) {
                Some(deadline) if deadline <= Instant::now() => return true,
                Some(deadline) => self.idle_check.as_mut().reset(deadline),
                None => self
                    .idle_check
                    .as_mut()
                    .reset(Instant::now() + self.idle_timeout),
            }
        }
        false
    }
}

impl Connected for Connection {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let filled_before = buf.filled().len();
        if self.idled_out(cx) {
            // End of stream: the HTTP server closes the connection.
            return Poll::Ready(Ok(()));
        }
        let allowance = self.allowance();
        if allowance == 0 {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "an HTTP/1.1 client sent more than a request's worth without an answer",
            )));
        }
        let this = &mut *self;
        let read = if allowance < buf.remaining() {
            // A smaller window into the caller's buffer, so no more than allowed is read.
            let mut limited = ReadBuf::new(buf.initialize_unfilled_to(allowance));
            let polled = Pin::new(&mut this.transport).poll_read(cx, &mut limited);
            let n = limited.filled().len();
            buf.advance(n);
            polled
        } else {
            Pin::new(&mut this.transport).poll_read(cx, buf)
        };
        if read.is_ready() {
            let new = &buf.filled()[filled_before..];
            this.framing = this.framing.after(new);
        }
        read
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.transport).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = written {
            self.answered(n);
        }
        written
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.transport).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = written {
            self.answered(n);
        }
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.transport.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.transport).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.transport).poll_shutdown(cx)
    }
}

/// Accepts connections on `listener`, through TLS when `tls` is given, and yields them to the
/// gRPC server. Failed handshakes (e.g. a client without an accepted certificate) are logged
/// and dropped. Beyond `max_connections` open at once, a new connection is closed at once. An
/// HTTP/1.1 client may send `max_http1_unanswered` bytes before it is answered. Stops
/// accepting when the stream is dropped.
pub fn incoming(
    listener: TcpListener,
    tls: Option<ReloadingTls>,
    idle_timeout: Duration,
    max_connections: usize,
    max_http1_unanswered: usize,
) -> ReceiverStream<io::Result<Connection>> {
    let (send, receive) = mpsc::channel(64);
    let places = Arc::new(Semaphore::new(max_connections));
    let mut last_warned: Option<Instant> = None;
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = send.closed() => return,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(place) = places.clone().try_acquire_owned() else {
                drop(stream);
                metrics::counter!(m::CONNECTIONS_REFUSED).increment(1);
                if last_warned.is_none_or(|at| at.elapsed() >= REFUSAL_WARN_INTERVAL) {
                    last_warned = Some(Instant::now());
                    tracing::warn!(
                        max_connections,
                        "MAX_CONNECTIONS reached: new connections are closed at once"
                    );
                }
                continue;
            };
            let open = OpenConnection::new(place);
            let _ = stream.set_nodelay(true);
            let send = send.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let (transport, peer_identity) = match tls {
                    None => (Either::Left(stream), None),
                    Some(tls) => {
                        let handshake = tls.acceptor().accept(stream);
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                            Ok(Ok(stream)) => {
                                let identity = stream
                                    .get_ref()
                                    .1
                                    .peer_certificates()
                                    .and_then(|certs| certs.first())
                                    .and_then(|cert| certificate_identity(cert));
                                (Either::Right(Box::new(stream)), identity)
                            }
                            Ok(Err(err)) => {
                                tracing::info!(%peer, error = %err, "TLS handshake refused");
                                return;
                            }
                            Err(_) => {
                                tracing::info!(%peer, "TLS handshake timed out");
                                return;
                            }
                        }
                    }
                };
                let info = ConnectionInfo {
                    peer_identity,
                    activity: Arc::new(Activity::new()),
                };
                let _ = send
                    .send(Ok(Connection::new(
                        transport,
                        info,
                        idle_timeout,
                        max_http1_unanswered,
                        open,
                    )))
                    .await;
            });
        }
    });
    ReceiverStream::new(receive)
}

/// A client certificate's identity: its first URI SAN (e.g. a SPIFFE id), else its CN.
pub fn certificate_identity(der: &[u8]) -> Option<String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let uri = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .and_then(|san| {
            san.value.general_names.iter().find_map(|name| match name {
                GeneralName::URI(uri) => Some((*uri).to_owned()),
                _ => None,
            })
        });
    uri.or_else(|| {
        cert.subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_bytes_tell_http2_from_http1_however_they_arrive() {
        let start = Framing::Unknown(0);
        assert_eq!(start.after(b"PRI * HTTP/2.0\r\n"), Framing::Http2);
        assert_eq!(start.after(b"P").after(b"R").after(b"I *"), Framing::Http2);
        assert_eq!(start.after(b""), Framing::Unknown(0));
        assert_eq!(
            start.after(b"POST / HTTP/1.1\r\n"),
            Framing::Http1 { unanswered: 17 }
        );
        assert_eq!(
            start.after(b"P").after(b"OST"),
            Framing::Http1 { unanswered: 4 }
        );
        assert_eq!(
            Framing::Http1 { unanswered: 3 }.after(b"abc"),
            Framing::Http1 { unanswered: 6 }
        );
        assert_eq!(Framing::Http2.after(b"GET"), Framing::Http2);
    }

    #[tokio::test(start_paused = true)]
    async fn idleness_counts_from_the_last_call_and_not_during_one() {
        let activity = Activity::new();
        let timeout = Duration::from_secs(300);
        assert_eq!(
            activity.idle_deadline(timeout),
            Some(activity.opened + timeout)
        );

        let info = ConnectionInfo {
            peer_identity: None,
            activity: Arc::new(activity),
        };
        tokio::time::advance(Duration::from_secs(10)).await;
        let call = info.call_started();
        assert_eq!(info.activity.idle_deadline(timeout), None);
        tokio::time::advance(Duration::from_secs(20)).await;
        drop(call);
        assert_eq!(
            info.activity.idle_deadline(timeout),
            Some(info.activity.opened + Duration::from_secs(30) + timeout)
        );
    }
}
