//! The gRPC listener's connections: accepted over TCP, through TLS when it is configured, each
//! carrying a [`ConnectionInfo`] into every request (the mTLS client's identity, and the
//! activity that drives the idle timeout). A connection with no call in progress and none
//! started for `GRPC_IDLE_TIMEOUT` is closed; HTTP/2 keepalive pings do not count as activity,
//! so idle clients do not pin connections forever. At most `MAX_CONNECTIONS` are open at once:
//! one more is closed as soon as it is accepted, and counted.

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

/// An accepted connection with its info and idle timer.
#[derive(Debug)]
pub struct Connection {
    transport: Transport,
    info: ConnectionInfo,
    idle_timeout: Duration,
    idle_check: Pin<Box<Sleep>>,
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
        open: OpenConnection,
    ) -> Self {
        Self {
            transport,
            idle_check: Box::pin(tokio::time::sleep(idle_timeout)),
            info,
            idle_timeout,
            _open: open,
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
        if self.idled_out(cx) {
            // End of stream: the HTTP/2 server closes the connection.
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.transport).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.transport).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.transport).poll_write_vectored(cx, bufs)
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
/// and dropped. Beyond `max_connections` open at once, a new connection is closed at once.
/// Stops accepting when the stream is dropped.
pub fn incoming(
    listener: TcpListener,
    tls: Option<ReloadingTls>,
    idle_timeout: Duration,
    max_connections: usize,
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
                    .send(Ok(Connection::new(transport, info, idle_timeout, open)))
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
