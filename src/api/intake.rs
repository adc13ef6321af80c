//! The door in front of the PasswordRecovery service, as a tower layer under tonic's router.
//! Every call of the service starts here, before its message is read: it takes a place among
//! the calls in progress ([`Gate`]: `MAX_CONCURRENT_CALLS`, at most
//! `MAX_CONCURRENT_CALLS_PER_PEER` from one peer). With none free it takes back the place of
//! the call whose message has been arriving longest (that call is answered `OVERLOADED`);
//! when every call has its message, the newcomer is `OVERLOADED` at once, its message never
//! read, so memory stays bounded whatever arrives. Its [`Call`] is handed to the gRPC
//! handler in the request's extensions ([`Unclaimed`]). A message must arrive within
//! `REQUEST_BODY_TIMEOUT` of the headers, or the call is answered `REQUEST_TIMEOUT`. A call the
//! handler never claims was refused by tonic while decoding its message; it is answered here
//! with this service's own status (`MALFORMED_REQUEST`, or `REQUEST_TOO_LARGE` for a message
//! over `MAX_REQUEST_BYTES`) and finished like any other. A call whose caller goes away before
//! the handler claims it is dropped, and so finished as `CANCELLED`.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::body::Body;
use tonic::server::NamedService;
use tonic::{Code, Status};
use tower::Service;

use super::call::{Arrival, Call, Caller, Ending, Protocol, Refusal};
use super::{HttpFuture, HttpResponse, SERVICE_NAME, grpc};
use crate::callers::{Callers, IdentityHeader, Lacks};
use crate::connections::ConnectionInfo;
use crate::domain::Rpc;
use crate::error::Error;
use crate::limits::UPSTREAM_REJECTED;
use crate::metrics as m;
use crate::places::{Caps, Crowded, Places};

/// A call started by the intake, waiting for its handler to claim it.
#[derive(Clone)]
pub(crate) struct Unclaimed(Arc<Mutex<Option<Call>>>);

impl Unclaimed {
    /// A slot holding `call`.
    pub fn new(call: Call) -> Self {
        Self(Arc::new(Mutex::new(Some(call))))
    }

    /// Takes the call; `None` when it was already taken.
    pub fn claim(&self) -> Option<Call> {
        self.0.lock().expect("call slot lock").take()
    }
}

/// The intake's settings.
#[derive(Debug, Clone)]
pub struct IntakeSettings {
    /// `CALLER_IDENTITY_HEADER`: where a caller without a client certificate is named.
    pub identity_header: Option<IdentityHeader>,
    /// `MAX_CONCURRENT_CALLS`.
    pub max_calls: usize,
    /// `MAX_CONCURRENT_CALLS_PER_PEER`.
    pub max_calls_per_peer: usize,
    /// `MAX_REQUEST_BYTES`.
    pub max_request_bytes: usize,
    /// `REQUEST_BODY_TIMEOUT`.
    pub body_timeout: Duration,
}

/// The places among the calls in progress (`MAX_CONCURRENT_CALLS`), shared by the calls of
/// both protocols, and where every call starts.
#[derive(Clone)]
pub(crate) struct Gate {
    calls: Arc<Places<Arc<Arrival>>>,
    settings: Arc<IntakeSettings>,
    callers: Arc<Callers>,
}

impl Gate {
    /// A gate with `settings`, naming callers as `callers` does.
    pub fn new(settings: IntakeSettings, callers: Arc<Callers>) -> Self {
        Self {
            calls: Places::new(
                Caps {
                    max: settings.max_calls,
                    per_peer: settings.max_calls_per_peer,
                },
                None,
            ),
            settings: Arc::new(settings),
            callers,
        }
    }

    /// Who sent a request of `rpc` with `headers` on the connection of `extensions`: its
    /// client certificate's identity; behind a mesh (when configured), on a plaintext
    /// connection only, the sidecar's header's. A TLS connection is never named by a header.
    /// And whether the callers policy lets it call `rpc` at all.
    fn caller(
        &self,
        rpc: Rpc,
        headers: &http::HeaderMap,
        extensions: &http::Extensions,
    ) -> (Caller, Result<(), Lacks>) {
        let connection = extensions.get::<ConnectionInfo>();
        let identity = match connection {
            Some(connection) if connection.tls => connection.peer_identity.clone(),
            _ => self
                .settings
                .identity_header
                .and_then(|header| header.identity(headers)),
        };
        let (label, may_call) = self.callers.at_intake(identity.as_deref(), rpc);
        (Caller { identity, label }, may_call)
    }

    /// `MAX_REQUEST_BYTES`.
    pub fn max_request_bytes(&self) -> usize {
        self.settings.max_request_bytes
    }

    /// `REQUEST_BODY_TIMEOUT`.
    pub fn body_timeout(&self) -> Duration {
        self.settings.body_timeout
    }

    /// Starts a call of `rpc` and gives it a place among the calls in progress, taken back
    /// from a call still waiting for its message if need be. With none to take, the call is
    /// finished at once as `OVERLOADED`, and that answer is the error.
    pub fn start(
        &self,
        rpc: Rpc,
        protocol: Protocol,
        headers: &http::HeaderMap,
        extensions: &http::Extensions,
    ) -> Result<Call, Refusal> {
        let (caller, may_call) = self.caller(rpc, headers, extensions);
        let mut call = Call::start(rpc, protocol, caller, headers, extensions);
        // A caller that may not call the RPC is refused before it holds a place or sends a
        // byte of its message: it learns nothing of its request.
        if let Err(lacks) = may_call {
            let caller = call.caller().name().to_owned();
            let refused = Error::CallerNotAllowed { caller, lacks };
            return Err(call.refuse(refused, Ending::Answered));
        }
        let arrival = call.arrival();
        match self.calls.take(call.peer(), arrival.clone()) {
            Ok(taken) => {
                if let Some(crowded) = taken.took_back {
                    let reason = crowded.label("max_concurrent_calls");
                    metrics::counter!(m::CALLS_TAKEN_BACK, "reason" => reason).increment(1);
                }
                call.hold(taken.place, arrival);
                Ok(call)
            }
            Err(crowded) => {
                let (old_reason, limit) = match crowded {
                    Crowded::Full => ("calls", "MAX_CONCURRENT_CALLS"),
                    Crowded::PeerShare => ("peer_calls", "MAX_CONCURRENT_CALLS_PER_PEER"),
                };
                let reason = crowded.label("max_concurrent_calls");
                metrics::counter!(m::CALLS_REFUSED, "reason" => reason).increment(1);
                // The name it had before `grpc_calls_refused_total`, kept for dashboards.
                metrics::counter!(UPSTREAM_REJECTED, "reason" => old_reason).increment(1);
                Err(call.refuse(Error::Overloaded { limit }, Ending::Answered))
            }
        }
    }
}

/// The PasswordRecovery gRPC server `S` behind the intake.
#[derive(Clone)]
pub struct Intake<S> {
    inner: S,
    gate: Gate,
}

impl<S> Intake<S> {
    /// `inner` behind `gate`.
    pub(crate) fn new(inner: S, gate: Gate) -> Self {
        Self { inner, gate }
    }
}

impl<S: NamedService> NamedService for Intake<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<Body>> for Intake<S>
where
    S: Service<http::Request<Body>, Response = HttpResponse, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = HttpResponse;
    type Error = Infallible;
    type Future = HttpFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        let Some(rpc) = Rpc::from_path(SERVICE_NAME, request.uri().path()) else {
            return Box::pin(self.inner.call(request));
        };
        let call =
            match self
                .gate
                .start(rpc, Protocol::Grpc, request.headers(), request.extensions())
            {
                Ok(call) => call,
                Err(refused) => {
                    return Box::pin(std::future::ready(Ok(grpc::refusal(refused).into_http())));
                }
            };
        let stalled = call.stalled(self.gate.body_timeout());
        let slot = Unclaimed::new(call);
        request.extensions_mut().insert(slot.clone());
        let served = self.inner.call(request);
        let limit = self.gate.max_request_bytes();
        // Dropped unclaimed (the caller went away), the slot drops its call: `CANCELLED`.
        Box::pin(async move {
            let mut served = std::pin::pin!(served);
            let stalled = tokio::select! {
                Ok(response) = &mut served => return Ok(unclaimed_answer(&slot, response, limit)),
                error = stalled => error,
            };
            // Still unclaimed, the call is still waiting for its message: answered so, and
            // the stream reset behind the answer.
            if let Some(call) = slot.claim() {
                let refused = call.refuse(stalled, Ending::Answered);
                return Ok(grpc::refusal(refused).into_http());
            }
            let Ok(response) = served.await;
            Ok(unclaimed_answer(&slot, response, limit))
        })
    }
}

/// tonic's `response`, or, for a call the handler never claimed, this service's own answer:
/// the message could not be read (over `limit` bytes, or undecodable), or the caller reset
/// the stream while it was being read.
fn unclaimed_answer(slot: &Unclaimed, response: HttpResponse, limit: usize) -> HttpResponse {
    let Some(call) = slot.claim() else {
        return response;
    };
    let (error, ending) = match Status::from_header_map(response.headers()) {
        Some(status) if status.code() == Code::OutOfRange => {
            (Error::RequestTooLarge { limit }, Ending::Answered)
        }
        // A reset stream (CANCELLED) or a broken connection (UNKNOWN, UNAVAILABLE).
        Some(status)
            if matches!(
                status.code(),
                Code::Cancelled | Code::Unknown | Code::Unavailable
            ) =>
        {
            (Error::Cancelled, Ending::CallerGone)
        }
        _ => (Error::MalformedRequest, Ending::Answered),
    };
    grpc::refusal(call.refuse(error, ending)).into_http()
}
