//! The gRPC listener's connections: accepted over TCP, through TLS when it is configured, each
//! carrying a [`ConnectionInfo`] into every request (the peer, the mTLS client's identity, and
//! the activity that drives the timeouts and the taking back of places).
//!
//! Every connection holds one of `MAX_CONNECTIONS` places, at most `MAX_CONNECTIONS_PER_PEER`
//! of them for one peer (`places`). A newcomer that finds none free takes back the place of a
//! connection that has sent no request yet (the oldest first), else of the one idle longest;
//! only when every connection has a call in progress is it closed at once, and counted.
//!
//! Time bounds: a connection with no call in progress and none started for
//! `GRPC_IDLE_TIMEOUT` is closed (HTTP/2 keepalive pings do not count as activity). A request's
//! headers must arrive within `REQUEST_HEADER_TIMEOUT`: from the connection's start (after
//! TLS) for its first request, and on HTTP/1.1 from the first byte of each later one; an
//! HTTP/2 client is held to it until its connection preface is complete, after which its
//! streams' headers arrive in frames HTTP/2 itself bounds. Past it the connection is closed.
//!
//! HTTP/2 bounds what a client may send unread (flow-control windows, the header list). An
//! HTTP/1.1 client (the Connect protocol) has no such windows, so the connection bounds it: it
//! may send at most `max_http1_unanswered` bytes (a header block and a request body) before
//! the server writes something back; one byte more and the connection is closed.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::either::Either;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::server::Connected;

use crate::metrics as m;
use crate::places::{Caps, Crowded, Holder, PeerKey, Place, Places, Standing};
use crate::telemetry::Occasionally;
use crate::tls::ReloadingTls;

/// How long a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Refusals, places taken back and header timeouts are each logged at warn at most this often.
const WARN_INTERVAL: Duration = Duration::from_secs(60);
static REFUSED_WARNING: Occasionally = Occasionally::every(WARN_INTERVAL);
static TAKEN_BACK_WARNING: Occasionally = Occasionally::every(WARN_INTERVAL);
static HEADER_TIMEOUT_WARNING: Occasionally = Occasionally::every(WARN_INTERVAL);

/// The listener's settings.
#[derive(Debug, Clone)]
pub(crate) struct ConnectionSettings {
    /// `GRPC_IDLE_TIMEOUT`.
    pub idle_timeout: Duration,
    /// `REQUEST_HEADER_TIMEOUT`.
    pub header_timeout: Duration,
    /// `MAX_CONNECTIONS`.
    pub max_connections: usize,
    /// `MAX_CONNECTIONS_PER_PEER`.
    pub max_per_peer: usize,
    /// `PEER_KEY`: what a peer is.
    pub peer_key: PeerKey,
    /// What an HTTP/1.1 client may send before it is answered.
    pub max_http1_unanswered: usize,
}

/// What every request on a connection can know about it.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    /// The mTLS client certificate's URI SAN, else its common name.
    pub peer_identity: Option<String>,
    /// True when the connection came through TLS.
    pub(crate) tls: bool,
    /// The peer, as `PEER_KEY` tells peers apart; `None` when it does not.
    pub(crate) peer: Option<IpAddr>,
    activity: Arc<Activity>,
}

impl ConnectionInfo {
    /// Marks a call in progress on this connection until the guard is dropped; `None` when
    /// the connection's place was taken back first (it is closing).
    pub fn call_started(&self) -> Option<CallInProgress> {
        let activity = &self.activity;
        activity
            .uses
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |uses| {
                (uses & TAKEN_BACK == 0).then_some(uses + 1)
            })
            .ok()?;
        activity.touch();
        Some(CallInProgress(activity.clone()))
    }

    /// A request's headers have arrived: the connection has proven it sends requests, and is
    /// in use until the guard is dropped; `None` when it is closing (see `call_started`).
    pub(crate) fn request_started(&self) -> Option<CallInProgress> {
        self.activity.requests.fetch_add(1, Ordering::SeqCst);
        self.call_started()
    }
}

/// A request or call in progress; keeps its connection from idling out or being taken back.
#[derive(Debug)]
pub struct CallInProgress(Arc<Activity>);

impl Drop for CallInProgress {
    fn drop(&mut self) {
        self.0.touch();
        self.0.uses.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Set in `Activity::uses` once the connection's place was taken back: no use starts after.
const TAKEN_BACK: usize = 1 << (usize::BITS - 1);

#[derive(Debug)]
struct Activity {
    opened: Instant,
    /// Milliseconds after `opened` of the last request, call start or call end.
    last_ms: AtomicU64,
    /// Requests and calls in progress, with [`TAKEN_BACK`] set once the place was taken back:
    /// one word, so that a use starting and the taking back cannot both win.
    uses: AtomicUsize,
    /// Requests whose headers have arrived.
    requests: AtomicU64,
    /// Cancelled when the connection's place is taken back.
    taken_back: CancellationToken,
}

impl Activity {
    fn new() -> Self {
        Self {
            opened: Instant::now(),
            last_ms: AtomicU64::new(0),
            uses: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            taken_back: CancellationToken::new(),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.fetch_max(ms, Ordering::SeqCst);
    }

    /// True while a request or call is in progress.
    fn in_use(&self) -> bool {
        self.uses.load(Ordering::SeqCst) & !TAKEN_BACK > 0
    }

    fn last_active(&self) -> Instant {
        self.opened + Duration::from_millis(self.last_ms.load(Ordering::SeqCst))
    }

    /// When the connection may be closed for idleness, counting from the last activity; `None`
    /// while a call is in progress.
    fn idle_deadline(&self, timeout: Duration) -> Option<Instant> {
        if self.in_use() {
            return None;
        }
        Some(self.last_active() + timeout)
    }
}

/// A connection's place is taken back first when it has sent no request (the oldest first),
/// then when it is idle (the longest idle first); never while a call is in progress.
impl Holder for Arc<Activity> {
    fn standing(&self) -> Option<Standing> {
        if self.uses.load(Ordering::SeqCst) != 0 {
            return None;
        }
        Some(match self.requests.load(Ordering::SeqCst) {
            0 => Standing {
                tier: 0,
                since: self.opened,
            },
            _ => Standing {
                tier: 1,
                since: self.last_active(),
            },
        })
    }

    fn take_back(&self, _: Crowded) -> bool {
        let taken = self
            .uses
            .compare_exchange(0, TAKEN_BACK, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok();
        if taken {
            self.taken_back.cancel();
        }
        taken
    }
}

/// Why a connection's reading stopped: its HTTP/1.1 client sent more than a request's worth
/// (a header block and `MAX_REQUEST_BYTES`) without an answer.
#[derive(Debug, thiserror::Error)]
#[error("an HTTP/1.1 client sent more than a request's worth without an answer")]
pub(crate) struct Unanswered;

/// A connection's byte stream: plain TCP, or TLS over it.
type Transport = Either<TcpStream, Box<TlsStream<TcpStream>>>;

/// The HTTP/2 client connection preface; no HTTP/1.1 method begins with its first three bytes.
const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// How many bytes of the preface tell HTTP/2 from HTTP/1.1.
const HTTP2_PREFACE_DECIDES: usize = 3;

/// Which HTTP a connection speaks, as its first bytes tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// This many bytes have matched the HTTP/2 preface, and it is not complete yet.
    Preface(usize),
    /// HTTP/2, its preface complete: its own windows bound what it holds.
    Http2,
    /// HTTP/1.1: the bytes read since the server last wrote.
    Http1 { unanswered: usize },
}

impl Framing {
    /// The framing once `bytes` more have been read.
    fn after(self, bytes: &[u8]) -> Self {
        match self {
            Self::Preface(matched) => {
                let wanted = &HTTP2_PREFACE[matched..];
                let n = bytes.len().min(wanted.len());
                let deciding = n.min(HTTP2_PREFACE_DECIDES.saturating_sub(matched));
                if bytes[..deciding] != wanted[..deciding] {
                    Self::Http1 {
                        unanswered: matched,
                    }
                    .after(bytes)
                } else if matched + n == HTTP2_PREFACE.len() {
                    // A preface gone wrong after its first bytes is HTTP/2's to refuse.
                    Self::Http2
                } else {
                    Self::Preface(matched + n)
                }
            }
            Self::Http2 => Self::Http2,
            Self::Http1 { unanswered } => Self::Http1 {
                unanswered: unanswered.saturating_add(bytes.len()),
            },
        }
    }
}

/// An accepted connection with its info, place and timers.
#[derive(Debug)]
pub struct Connection {
    transport: Transport,
    info: ConnectionInfo,
    idle_timeout: Duration,
    idle_check: Pin<Box<Sleep>>,
    header_timeout: Duration,
    /// When a request's headers are due; `None` while none is owed.
    headers_due: Option<Instant>,
    header_check: Pin<Box<Sleep>>,
    /// HTTP/1.1, answered with no call in progress: the next bytes begin a request.
    between_requests: bool,
    /// `Activity::requests` as last seen.
    requests_seen: u64,
    taken_back: Pin<Box<WaitForCancellationFutureOwned>>,
    /// Set once the connection is to end: every read is end of stream.
    ended: bool,
    framing: Framing,
    max_http1_unanswered: usize,
    _place: Place<Arc<Activity>>,
}

impl Connection {
    fn new(
        transport: Transport,
        info: ConnectionInfo,
        settings: &ConnectionSettings,
        place: Place<Arc<Activity>>,
    ) -> Self {
        let now = Instant::now();
        let taken_back = info.activity.taken_back.clone().cancelled_owned();
        Self {
            transport,
            idle_check: Box::pin(tokio::time::sleep(settings.idle_timeout)),
            idle_timeout: settings.idle_timeout,
            header_timeout: settings.header_timeout,
            headers_due: Some(now + settings.header_timeout),
            header_check: Box::pin(tokio::time::sleep_until(now + settings.header_timeout)),
            between_requests: false,
            requests_seen: 0,
            taken_back: Box::pin(taken_back),
            ended: false,
            info,
            framing: Framing::Preface(0),
            max_http1_unanswered: settings.max_http1_unanswered,
            _place: place,
        }
    }

    /// How many more bytes may be read now: all there is room for, except on HTTP/1.1.
    fn allowance(&self) -> usize {
        match self.framing {
            Framing::Http1 { unanswered } => self.max_http1_unanswered.saturating_sub(unanswered),
            Framing::Preface(_) | Framing::Http2 => usize::MAX,
        }
    }

    /// Something was written back: an HTTP/1.1 client may send again, and with no call in
    /// progress its next bytes begin a new request.
    fn answered(&mut self, written: usize) {
        if written > 0
            && let Framing::Http1 { unanswered } = &mut self.framing
        {
            *unanswered = 0;
            if !self.info.activity.in_use() {
                self.between_requests = true;
                self.headers_due = None;
            }
        }
    }

    /// Bytes were read: the framing, and whether they begin a request whose headers are due.
    fn received(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        self.framing = self.framing.after(bytes);
        match self.framing {
            Framing::Http2 => self.headers_due = None,
            // Bytes read during a request (its body, say) begin nothing.
            Framing::Http1 { .. } if self.between_requests && !self.info.activity.in_use() => {
                self.between_requests = false;
                self.headers_due = Some(Instant::now() + self.header_timeout);
            }
            Framing::Http1 { .. } | Framing::Preface(_) => {}
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

    /// True once a request's headers are overdue; arms the timer while they are due.
    fn headers_overdue(&mut self, cx: &mut Context<'_>) -> bool {
        let requests = self.info.activity.requests.load(Ordering::SeqCst);
        if requests != self.requests_seen {
            // A request arrived (perhaps pipelined, read before the last answer was written).
            self.requests_seen = requests;
            self.headers_due = None;
            self.between_requests = false;
        }
        let Some(due) = self.headers_due else {
            return false;
        };
        if self.header_check.deadline() != due {
            self.header_check.as_mut().reset(due);
        }
        self.header_check.as_mut().poll(cx).is_ready()
    }

    /// Whether the connection must end now, and if so, records why.
    fn must_end(&mut self, cx: &mut Context<'_>) -> bool {
        if self.ended {
            return true;
        }
        if self.taken_back.as_mut().poll(cx).is_ready() || self.idled_out(cx) {
            self.ended = true;
        } else if self.headers_overdue(cx) {
            self.ended = true;
            metrics::counter!(m::REQUEST_TIMEOUTS, "stage" => "headers").increment(1);
            if let Some(held_back) = HEADER_TIMEOUT_WARNING.due() {
                tracing::warn!(
                    header_timeout = %humantime::format_duration(self.header_timeout),
                    since_last_warning = held_back,
                    "a connection sent no complete request headers within \
                     REQUEST_HEADER_TIMEOUT: closed"
                );
            }
        }
        self.ended
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
        if self.must_end(cx) {
            // End of stream: the HTTP server closes the connection.
            return Poll::Ready(Ok(()));
        }
        let allowance = self.allowance();
        if allowance == 0 {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, Unanswered)));
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
            this.received(&buf.filled()[filled_before..]);
        }
        read
    }
}

/// The error of a write to a connection that must end: hyper may be waiting to write (a
/// client that does not read), and never read again, so writes end it too.
fn ended() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "the connection was closed",
    )
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.must_end(cx) {
            return Poll::Ready(Err(ended()));
        }
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
        if self.must_end(cx) {
            return Poll::Ready(Err(ended()));
        }
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
        if self.must_end(cx) {
            return Poll::Ready(Err(ended()));
        }
        Pin::new(&mut self.transport).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.transport).poll_shutdown(cx)
    }
}

/// Accepts connections on `listener`, through TLS when `tls` is given, and yields them to the
/// gRPC server, each in a place of its own (see the module docs). Failed handshakes (e.g. a
/// client without an accepted certificate) are logged and dropped. Stops accepting when the
/// stream is dropped.
pub(crate) fn incoming(
    listener: TcpListener,
    tls: Option<ReloadingTls>,
    settings: ConnectionSettings,
) -> ReceiverStream<io::Result<Connection>> {
    let (send, receive) = mpsc::channel(64);
    let caps = Caps {
        max: settings.max_connections,
        per_peer: settings.max_per_peer,
    };
    let places = Places::new(caps, Some(m::CONNECTIONS_OPEN));
    let settings = Arc::new(settings);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = send.closed() => return,
            };
            let (stream, addr) = match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let peer = settings.peer_key.peer(addr);
            let activity = Arc::new(Activity::new());
            let Some(place) = place_for(&places, &settings, peer, activity.clone()) else {
                drop(stream);
                continue;
            };
            let _ = stream.set_nodelay(true);
            let accepted = Accepted {
                stream,
                addr,
                peer,
                activity,
                place,
            };
            tokio::spawn(hand_over(
                accepted,
                tls.clone(),
                settings.clone(),
                send.clone(),
            ));
        }
    });
    ReceiverStream::new(receive)
}

/// A connection accepted, in its place.
struct Accepted {
    stream: TcpStream,
    addr: SocketAddr,
    peer: Option<IpAddr>,
    activity: Arc<Activity>,
    place: Place<Arc<Activity>>,
}

/// Secures `accepted` (unless its place is taken back first) and hands it to the server.
async fn hand_over(
    accepted: Accepted,
    tls: Option<ReloadingTls>,
    settings: Arc<ConnectionSettings>,
    server: mpsc::Sender<io::Result<Connection>>,
) {
    let Accepted {
        stream,
        addr,
        peer,
        activity,
        place,
    } = accepted;
    let taken_back = activity.taken_back.clone();
    let through_tls = tls.is_some();
    let (transport, peer_identity) = tokio::select! {
        secured = secure(stream, tls, addr) => match secured {
            Some(secured) => secured,
            None => return,
        },
        () = taken_back.cancelled() => return,
    };
    let info = ConnectionInfo {
        peer_identity,
        tls: through_tls,
        peer,
        activity,
    };
    let connection = Connection::new(transport, info, &settings, place);
    let _ = server.send(Ok(connection)).await;
}

/// A place among the connections for one from `peer`, taken back from another if need be;
/// `None` (counted, and logged at most once a minute) when every connection is in use.
fn place_for(
    places: &Arc<Places<Arc<Activity>>>,
    settings: &ConnectionSettings,
    peer: Option<IpAddr>,
    activity: Arc<Activity>,
) -> Option<Place<Arc<Activity>>> {
    match places.take(peer, activity) {
        Ok(taken) => {
            if let Some(crowded) = taken.took_back {
                let reason = crowded.label("max_connections");
                metrics::counter!(m::CONNECTIONS_TAKEN_BACK, "reason" => reason).increment(1);
                if let Some(held_back) = TAKEN_BACK_WARNING.due() {
                    tracing::warn!(
                        reason,
                        max_connections = settings.max_connections,
                        max_connections_per_peer = settings.max_per_peer,
                        since_last_warning = held_back,
                        "connections are crowded: an idle connection, or one that sent no \
                         request, was closed to let a new one in"
                    );
                }
            }
            Some(taken.place)
        }
        Err(crowded) => {
            let reason = crowded.label("max_connections");
            metrics::counter!(m::CONNECTIONS_REFUSED, "reason" => reason).increment(1);
            if let Some(held_back) = REFUSED_WARNING.due() {
                tracing::warn!(
                    reason,
                    max_connections = settings.max_connections,
                    max_connections_per_peer = settings.max_per_peer,
                    since_last_warning = held_back,
                    "every connection has a call in progress: new connections are closed at once"
                );
            }
            None
        }
    }
}

/// The connection's transport, through TLS when `tls` is given, with the client
/// certificate's identity; `None` when the handshake failed or timed out.
async fn secure(
    stream: TcpStream,
    tls: Option<ReloadingTls>,
    addr: std::net::SocketAddr,
) -> Option<(Transport, Option<String>)> {
    let Some(tls) = tls else {
        return Some((Either::Left(stream), None));
    };
    let handshake = tls.acceptor().accept(stream);
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(stream)) => {
            let identity = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|certs| certs.first())
                .and_then(|cert| certificate_identity(cert));
            Some((Either::Right(Box::new(stream)), identity))
        }
        Ok(Err(err)) => {
            tracing::info!(peer = %addr, error = %err, "TLS handshake refused");
            None
        }
        Err(_) => {
            tracing::info!(peer = %addr, "TLS handshake timed out");
            None
        }
    }
}

/// A client certificate's identity: its first URI SAN (e.g. a SPIFFE id), else its CN; any
/// character that is not printable ASCII becomes `?` (it then matches no callers policy name,
/// and reaches no log line as it was).
pub fn certificate_identity(der: &[u8]) -> Option<String> {
    raw_certificate_identity(der).map(|identity| {
        identity
            .chars()
            .map(|c| if c.is_ascii_graphic() { c } else { '?' })
            .collect()
    })
}

fn raw_certificate_identity(der: &[u8]) -> Option<String> {
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
        let start = Framing::Preface(0);
        assert_eq!(start.after(HTTP2_PREFACE), Framing::Http2);
        assert_eq!(
            start.after(b"P").after(b"R").after(b"I *"),
            Framing::Preface(5)
        );
        let (head, tail) = HTTP2_PREFACE.split_at(10);
        assert_eq!(start.after(head).after(tail), Framing::Http2);
        assert_eq!(
            start.after(b"PRI * HTTP/1.1\r\n\r\nSM\r\n\r\n"),
            Framing::Http2
        );
        assert_eq!(start.after(b""), Framing::Preface(0));
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
            tls: false,
            peer: None,
            activity: Arc::new(activity),
        };
        tokio::time::advance(Duration::from_secs(10)).await;
        let call = info.call_started().expect("in use");
        assert_eq!(info.activity.idle_deadline(timeout), None);
        tokio::time::advance(Duration::from_secs(20)).await;
        drop(call);
        assert_eq!(
            info.activity.idle_deadline(timeout),
            Some(info.activity.opened + Duration::from_secs(30) + timeout)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_without_a_request_goes_first_then_the_longest_idle_never_a_busy_one() {
        let silent = Arc::new(Activity::new());
        let idle = Arc::new(Activity::new());
        let busy = Arc::new(Activity::new());
        tokio::time::advance(Duration::from_secs(5)).await;
        for served in [&idle, &busy] {
            let info = ConnectionInfo {
                peer_identity: None,
                tls: false,
                peer: None,
                activity: served.clone(),
            };
            std::mem::forget(info.request_started().expect("in use"));
        }
        // `idle`'s request ends; `busy`'s does not.
        idle.uses.fetch_sub(1, Ordering::SeqCst);

        let (s, i) = (silent.standing().unwrap(), idle.standing().unwrap());
        assert!(s < i, "{s:?} {i:?}");
        assert_eq!(busy.standing(), None);
        assert!(!busy.take_back(Crowded::Full));
        assert!(silent.take_back(Crowded::Full));
        assert!(silent.taken_back.is_cancelled());
        assert_eq!(silent.standing(), None, "not taken back twice");
        let closing = ConnectionInfo {
            peer_identity: None,
            tls: false,
            peer: None,
            activity: silent,
        };
        assert!(
            closing.request_started().is_none(),
            "no request starts on a connection taken back"
        );
    }
}
