//! The door in front of the PasswordRecovery service, as a tower layer under tonic's router.
//! Every call of the service starts here, before its message is read: it takes a place among
//! the calls in progress (`MAX_CONCURRENT_CALLS`; none left: `OVERLOADED` at once, the message
//! never read, so memory stays bounded whatever arrives), and its [`Call`] is handed to the
//! handler. A call the handler never claims was refused by tonic while decoding its message;
//! it is answered here with this service's own status (`MALFORMED_REQUEST`, or
//! `REQUEST_TOO_LARGE` for a message over `MAX_REQUEST_BYTES`) and finished like any other.
//! A call whose caller goes away before the handler claims it is finished as `CANCELLED`.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::sync::Semaphore;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::{Code, Status};
use tower::Service;

use super::call::{Call, Ending, Protocol};
use super::{Answer, AnswerFuture, SERVICE_NAME};
use crate::domain::Rpc;
use crate::error::Error;
use crate::limits::UPSTREAM_REJECTED;

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

/// Finishes the call as cancelled if it was never claimed nor answered: the caller went away
/// while its message was being read.
pub(crate) struct CancelUnclaimed(pub Unclaimed);

impl Drop for CancelUnclaimed {
    fn drop(&mut self) {
        if let Some(call) = self.0.claim() {
            call.refuse(Error::Cancelled, Ending::CallerGone);
        }
    }
}

/// The intake's settings.
#[derive(Debug, Clone)]
pub struct IntakeSettings {
    /// `MAX_CONCURRENT_CALLS`.
    pub max_calls: usize,
    /// `MAX_REQUEST_BYTES`.
    pub max_request_bytes: usize,
}

/// The places among the calls in progress (`MAX_CONCURRENT_CALLS`), shared by the calls of
/// both protocols, and where every call starts.
#[derive(Clone)]
pub(crate) struct Gate {
    calls: Arc<Semaphore>,
    settings: Arc<IntakeSettings>,
}

impl Gate {
    /// A gate with `settings`.
    pub fn new(settings: IntakeSettings) -> Self {
        Self {
            calls: Arc::new(Semaphore::new(settings.max_calls)),
            settings: Arc::new(settings),
        }
    }

    /// `MAX_REQUEST_BYTES`.
    pub fn max_request_bytes(&self) -> usize {
        self.settings.max_request_bytes
    }

    /// Starts a call of `rpc` and gives it a place among the calls in progress. With none
    /// left, the call is finished at once as `OVERLOADED`, and that answer is the error.
    pub fn start(
        &self,
        rpc: Rpc,
        protocol: Protocol,
        headers: &http::HeaderMap,
        extensions: &http::Extensions,
    ) -> Result<Call, Status> {
        let mut call = Call::start(rpc, protocol, headers, extensions);
        let Ok(permit) = self.calls.clone().try_acquire_owned() else {
            metrics::counter!(UPSTREAM_REJECTED, "reason" => "calls").increment(1);
            return Err(call.refuse(Error::Overloaded, Ending::Answered));
        };
        call.hold(permit);
        Ok(call)
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
    S: Service<http::Request<Body>, Response = Answer, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Answer;
    type Error = Infallible;
    type Future = AnswerFuture;

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
                Err(refused) => return Box::pin(std::future::ready(Ok(refused.into_http()))),
            };
        let slot = Unclaimed::new(call);
        request.extensions_mut().insert(slot.clone());
        let served = self.inner.call(request);
        let limit = self.gate.max_request_bytes();
        Box::pin(async move {
            let guard = CancelUnclaimed(slot);
            let Ok(response) = served.await;
            let Some(call) = guard.0.claim() else {
                return Ok(response);
            };
            // tonic answered without the handler: the message could not be read, or the
            // caller reset the stream while it was being read.
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
            Ok(call.refuse(error, ending).into_http())
        })
    }
}
