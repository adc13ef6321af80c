//! The life of one call, from the moment its headers arrive to its one log line, audit event
//! and metrics: its span, request id, caller, budget, and the places it holds (a place among
//! the calls in progress, activity on its connection). Every call that starts is finished
//! exactly once: answered, its caller gone, or abandoned at the end of the grace period.
//!
//! While its message is still arriving a call may lose its place to a newcomer ([`Arrival`]),
//! and its message must arrive within `REQUEST_BODY_TIMEOUT` ([`Call::stalled`]).

use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Level;

use crate::callers::Callers;
use crate::cognito::{Budget, ErrorCode, UpstreamError};
use crate::connections::{CallInProgress, ConnectionInfo};
use crate::domain::Rpc;
use crate::error::{Blame, Classified, Error, ErrorReason, grpc_code_name};
use crate::metrics::{self as m, CallLabels, CallSeries};
use crate::places::{Crowded, Holder, Place, Standing};
use crate::telemetry::{self, Occasionally, TraceParent};

/// What a call came to.
#[derive(Debug)]
pub(crate) struct Outcome<T> {
    /// The answer, or why there is none.
    pub result: Result<T, Error>,
    /// When enumeration protection masked the answer: what Cognito really said.
    pub masked: Option<ErrorCode>,
}

impl<T> Outcome<T> {
    /// An answer as it is.
    pub fn plain(result: Result<T, Error>) -> Self {
        Self {
            result,
            masked: None,
        }
    }
}

/// What a finished call is answered, for its door to render: the answer, or its error
/// decided, and the call's request id (sent back in a header or trailer).
#[derive(Debug)]
pub(crate) struct Reply<T> {
    /// The call's request id.
    pub request_id: String,
    /// The answer, or the error to answer.
    pub result: Result<T, Box<Classified>>,
    /// True when it is the remembered outcome of an earlier call with the same `request_id`
    /// (`idempotent-replayed: true` in the answer's metadata).
    pub replayed: bool,
}

impl<T> Reply<T> {
    /// The same reply with the answer turned into `U`.
    pub fn map<U>(self, answer: impl FnOnce(T) -> U) -> Reply<U> {
        Reply {
            request_id: self.request_id,
            result: self.result.map(answer),
            replayed: self.replayed,
        }
    }
}

/// A reply that can only be an error: a call refused before it reached the service.
pub(crate) type Refusal = Reply<Infallible>;

impl Refusal {
    /// The refusal, as a reply of any type.
    pub fn widen<T>(self) -> Reply<T> {
        self.map(|never| match never {})
    }
}

/// The protocol a call came in by: gRPC, or Connect (JSON or binary proto over HTTP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocol {
    /// gRPC over HTTP/2.
    Grpc,
    /// The Connect protocol's unary calls (`api::connect`).
    Connect,
}

impl Protocol {
    /// The value of the `protocol` label and log field.
    pub fn label(self) -> &'static str {
        match self {
            Self::Grpc => "grpc",
            Self::Connect => "connect",
        }
    }

    /// The caller's deadline, from `grpc-timeout` or `Connect-Timeout-Ms`; `None` when absent
    /// or malformed (the call's own budget still bounds it).
    fn caller_timeout(self, headers: &http::HeaderMap) -> Option<Duration> {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        match self {
            Self::Grpc => header("grpc-timeout").and_then(parse_grpc_timeout),
            Self::Connect => header("connect-timeout-ms").and_then(parse_connect_timeout),
        }
    }
}

/// How a call ended for its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    /// The caller got the answer.
    Answered,
    /// The caller cancelled or went away first; the outcome is recorded all the same.
    CallerGone,
    /// The caller was answered at its deadline (`UPSTREAM_TIMEOUT`) while the call, which has
    /// a `request_id`, went on for its retry to be told its outcome.
    AnsweredAtDeadline,
}

impl Ending {
    /// The gRPC code the caller got, when the outcome's own `code` is not it, and the reason
    /// of the answer (that of the outcome, which a caller gone would have got).
    fn caller_answer(
        self,
        code: &'static str,
        reason: Option<&'static str>,
    ) -> (&'static str, Option<&'static str>) {
        match self {
            Self::Answered => (code, reason),
            Self::CallerGone => ("CANCELLED", reason),
            Self::AnsweredAtDeadline => (
                "DEADLINE_EXCEEDED",
                Some(ErrorReason::UpstreamTimeout.as_str_name()),
            ),
        }
    }
}

/// Whether a call's message is still arriving, and whether its place was taken back for a
/// newcomer meanwhile: only a call still waiting for its message may lose its place, and the
/// first of the two to decide (the message arriving, or the taking back) wins.
pub(crate) struct Arrival {
    started: Instant,
    state: AtomicU8,
    taken_back: CancellationToken,
}

const ARRIVING: u8 = 0;
const ARRIVED: u8 = 1;
/// Taken back because every place was held.
const TAKEN_BACK_FULL: u8 = 2;
/// Taken back because its peer held its share.
const TAKEN_BACK_PEER: u8 = 3;

impl Arrival {
    fn new(started: Instant) -> Self {
        Self {
            started,
            state: AtomicU8::new(ARRIVING),
            taken_back: CancellationToken::new(),
        }
    }
}

/// A call waiting for its message may be taken back, the one waiting longest first.
impl Holder for Arc<Arrival> {
    fn standing(&self) -> Option<Standing> {
        (self.state.load(Ordering::SeqCst) == ARRIVING).then_some(Standing {
            tier: 0,
            since: self.started,
        })
    }

    fn take_back(&self, why: Crowded) -> bool {
        let taken = match why {
            Crowded::Full => TAKEN_BACK_FULL,
            Crowded::PeerShare => TAKEN_BACK_PEER,
        };
        let won = self
            .state
            .compare_exchange(ARRIVING, taken, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok();
        if won {
            self.taken_back.cancel();
        }
        won
    }
}

/// The error a call whose place was taken back in `state` is answered with.
fn taken_back_error(state: u8) -> Error {
    Error::TakenBack {
        limit: match state {
            TAKEN_BACK_PEER => "MAX_CONCURRENT_CALLS_PER_PEER",
            _ => "MAX_CONCURRENT_CALLS",
        },
    }
}

/// Stalled messages are logged at warn at most this often (each call's own line is at info).
static REQUEST_TIMEOUT_WARNING: Occasionally = Occasionally::every(Duration::from_secs(60));
static TAKEN_BACK_WARNING: Occasionally = Occasionally::every(Duration::from_secs(60));

/// Whom a valid request is about, as logs and audit events name them.
#[derive(Debug, Clone)]
pub(crate) struct Subject {
    /// The keyed hash of the normalised username.
    pub user: String,
    /// The app client the call is for.
    pub client_id: String,
    /// That client's alias (`unknown` for one this server does not serve).
    pub client: String,
}

/// Who called: its name in the callers policy (its identity, or `anonymous`), and its label in
/// the call metrics (bounded by the policy).
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    /// The mTLS client's identity (or the mesh's header's); `None` for neither.
    pub identity: Option<String>,
    /// The policy's name for it, `anonymous`, or `unknown`.
    pub label: String,
}

impl Caller {
    /// Its identity, or `anonymous`: its name in the callers policy, logs and audit events.
    pub fn name(&self) -> &str {
        Callers::name(self.identity.as_deref())
    }
}

/// One call in progress. A call dropped before it was finished (its door gave up on it: the
/// caller went away while its message was arriving) is finished as `CANCELLED`.
pub(crate) struct Call {
    rpc: Rpc,
    protocol: Protocol,
    started: Instant,
    /// The caller's deadline, from `grpc-timeout` or `Connect-Timeout-Ms`.
    caller_timeout: Option<Duration>,
    request_id: String,
    /// Who called.
    caller: Caller,
    /// The peer it came from, as `PEER_KEY` tells peers apart.
    peer: Option<IpAddr>,
    span: tracing::Span,
    _in_flight: InFlight,
    _on_connection: Option<CallInProgress>,
    /// Its place among the calls in progress, and whether its message has arrived.
    arrival: Option<Arc<Arrival>>,
    _place: Option<Place<Arc<Arrival>>>,
    /// Its log line, audit event and metrics have been left.
    finished: bool,
}

/// Counts one call in `grpc_server_in_flight` for as long as it lives: the gauge it raised
/// on entering is the one it lowers, so a call that began before the recorder was installed
/// lowers nothing.
struct InFlight(Option<&'static metrics::Gauge>);

impl InFlight {
    fn enter() -> Self {
        let gauge = CallSeries::get().map(CallSeries::in_flight);
        if let Some(gauge) = gauge {
            gauge.increment(1.0);
        }
        Self(gauge)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(gauge) = self.0 {
            gauge.decrement(1.0);
        }
    }
}

impl Call {
    /// A call of `rpc` by `protocol` from `caller` whose request carries `headers` and
    /// `extensions`.
    pub fn start(
        rpc: Rpc,
        protocol: Protocol,
        caller: Caller,
        headers: &http::HeaderMap,
        extensions: &http::Extensions,
    ) -> Self {
        let started = Instant::now();
        let connection = extensions.get::<ConnectionInfo>();
        let peer = connection.and_then(|c| c.peer);
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let request_id = telemetry::request_id(header(telemetry::REQUEST_ID_HEADER));
        let trace = header("traceparent").and_then(TraceParent::parse);
        let method = rpc.method();
        let span = tracing::info_span!(
            "call",
            grpc.method = method,
            protocol = protocol.label(),
            request_id = request_id.as_str(),
            trace_id = trace.as_ref().map(|t| t.trace_id.as_str()),
            parent_span_id = trace.as_ref().map(|t| t.parent_id.as_str()),
        );
        telemetry::link_remote_parent(&span, trace.as_ref());
        if let Some(series) = CallSeries::get() {
            series
                .started(method, protocol.label(), &caller.label)
                .increment(1);
        }
        let caller_timeout = protocol.caller_timeout(headers);
        Self {
            rpc,
            protocol,
            started,
            caller_timeout,
            request_id,
            caller,
            peer,
            span,
            _in_flight: InFlight::enter(),
            _on_connection: connection.and_then(ConnectionInfo::call_started),
            arrival: None,
            _place: None,
            finished: false,
        }
    }

    /// Its request id.
    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    /// Who called.
    pub fn caller(&self) -> &Caller {
        &self.caller
    }

    /// The RPC called.
    pub fn rpc(&self) -> Rpc {
        self.rpc
    }

    /// The peer the call came from, when `PEER_KEY` tells peers apart.
    pub fn peer(&self) -> Option<IpAddr> {
        self.peer
    }

    /// A new record of this call's message arriving, to hold a place among the calls.
    pub fn arrival(&self) -> Arc<Arrival> {
        Arc::new(Arrival::new(self.started))
    }

    /// Holds `place` among the calls in progress until the call is finished; `arrival` says
    /// whether it may be taken back.
    pub fn hold(&mut self, place: Place<Arc<Arrival>>, arrival: Arc<Arrival>) {
        self._place = Some(place);
        self.arrival = Some(arrival);
    }

    /// The message has arrived: from now on the call keeps its place. The error to answer
    /// when its place was taken back first.
    pub fn arrived(&self) -> Result<(), Error> {
        let Some(arrival) = &self.arrival else {
            return Ok(());
        };
        match arrival
            .state
            .compare_exchange(ARRIVING, ARRIVED, Ordering::SeqCst, Ordering::SeqCst)
        {
            Ok(_) => Ok(()),
            Err(ARRIVED) => Ok(()),
            Err(taken) => Err(taken_back_error(taken)),
        }
    }

    /// Completes, with the error to answer, when the message has not arrived within
    /// `body_timeout` of the call's start (`REQUEST_TIMEOUT`) or its place was taken back
    /// for a newcomer; never while the message is still arriving in time. A door races its
    /// reading of the message against this.
    pub fn stalled(&self, body_timeout: Duration) -> impl Future<Output = Error> + Send + 'static {
        let due = self.started + body_timeout;
        let arrival = self.arrival.clone();
        async move {
            let taken_back = async {
                match &arrival {
                    Some(arrival) => {
                        arrival.taken_back.cancelled().await;
                        taken_back_error(arrival.state.load(Ordering::SeqCst))
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = tokio::time::sleep_until(due) => Error::RequestTimeout { limit: body_timeout },
                error = taken_back => error,
            }
        }
    }

    /// When the upstream call must be done: `timeout` (the app client's) after the call
    /// started, or earlier at the caller's deadline.
    pub fn budget(&self, timeout: Duration) -> Budget {
        Budget::new(self.started, timeout, self.caller_timeout)
    }

    /// `timeout` after the call started, whatever the caller's deadline: the budget of an
    /// idempotent call's upstream call, whose outcome its retry will be told.
    pub fn budget_without_caller(&self, timeout: Duration) -> Budget {
        Budget::new(self.started, timeout, None)
    }

    /// The call's span: every line logged for it carries its request id and trace.
    pub fn span(&self) -> &tracing::Span {
        &self.span
    }

    /// Finishes a call refused before it reached the service with `error`: its log line,
    /// audit event and metrics, and the refusal to answer.
    pub fn refuse(mut self, error: Error, ending: Ending) -> Refusal {
        self.conclude(None, Outcome::plain(Err(error)), ending)
    }

    /// Turns the outcome into the reply, and leaves the call's log line, audit event and
    /// metrics.
    pub fn finish<T>(
        mut self,
        subject: Option<&Subject>,
        outcome: Outcome<T>,
        ending: Ending,
    ) -> Reply<T> {
        self.conclude(subject, outcome, ending)
    }

    fn conclude<T>(
        &mut self,
        subject: Option<&Subject>,
        outcome: Outcome<T>,
        ending: Ending,
    ) -> Reply<T> {
        self.finished = true;
        // The call's log line and its audit event go out in one write.
        let _lines = telemetry::together();
        let _entered = self.span.clone().entered();
        let user = subject.map_or("-", |s| s.user.as_str());
        let client = subject.map_or("-", |s| s.client.as_str());
        let masked = outcome.masked.as_ref();
        let (result, code, reason) = match outcome.result {
            Ok(response) => {
                self.log_success(user, client, masked, ending);
                (Ok(response), "OK", None)
            }
            Err(error) => {
                if let Error::RequestTimeout { .. } = error {
                    metrics::counter!(m::REQUEST_TIMEOUTS, "stage" => "body").increment(1);
                }
                let classified = error.classify();
                let (code, reason) = (
                    grpc_code_name(classified.code),
                    classified.reason.as_str_name(),
                );
                let failure = Failure {
                    code,
                    reason,
                    blame: classified.blame,
                    masked,
                };
                self.log_failure(user, client, &error, &failure, ending);
                (Err(Box::new(classified)), code, Some(reason))
            }
        };
        let event = match (reason, masked) {
            (Some(_), _) | (None, Some(_)) => "password_reset.refused",
            (None, None) => match self.rpc {
                Rpc::ForgotPassword => "password_reset.requested",
                Rpc::ConfirmForgotPassword => "password_reset.confirmed",
            },
        };
        let answered = reason;
        let reason = masked.map(masked_reason).or(reason);
        self.audit(event, subject, code, reason, ending == Ending::CallerGone);
        let (caller_code, answered) = ending.caller_answer(code, answered);
        self.record(caller_code, answered, client);
        Reply {
            request_id: self.request_id.clone(),
            result,
            replayed: false,
        }
    }

    /// Finishes a call answered `result`, the remembered outcome of an earlier call with the
    /// same `request_id`: one log line and an audit event marked as a replay (not a second
    /// reset), its metrics, and the reply marked replayed.
    pub fn replay<T>(
        mut self,
        subject: Option<&Subject>,
        result: Result<T, Box<Classified>>,
        ending: Ending,
    ) -> Reply<T> {
        self.finished = true;
        // The call's log line and its audit event go out in one write.
        let _lines = telemetry::together();
        let _entered = self.span.clone().entered();
        let (method, latency_ms) = (self.rpc.method(), self.latency_ms());
        let user = subject.map_or("-", |s| s.user.as_str());
        let client = subject.map_or("-", |s| s.client.as_str());
        let (code, reason) = match &result {
            Ok(_) => ("OK", None),
            Err(error) => (grpc_code_name(error.code), Some(error.reason.as_str_name())),
        };
        let caller_gone = ending == Ending::CallerGone;
        tracing::info!(
            grpc.method = method,
            grpc.code = code,
            reason,
            replayed = true,
            user,
            client,
            latency_ms,
            caller_gone,
            "call finished: answered the remembered outcome of the earlier call with its \
             request_id"
        );
        self.audit(
            "password_reset.replayed",
            subject,
            code,
            reason,
            caller_gone,
        );
        metrics::counter!(m::IDEMPOTENT_REPLAYS, "grpc_method" => method).increment(1);
        let (caller_code, answered) = ending.caller_answer(code, reason);
        self.record(caller_code, answered, client);
        Reply {
            request_id: self.request_id.clone(),
            result,
            replayed: true,
        }
    }

    /// Records a call still in flight when the grace period ended: its outcome is unknown,
    /// and it is answered `SHUTTING_DOWN` if its caller still waits.
    pub fn abandon(mut self, subject: Option<&Subject>) -> Refusal {
        self.finished = true;
        // The call's log line and its audit event go out in one write.
        let _lines = telemetry::together();
        let _entered = self.span.clone().entered();
        let (method, latency_ms) = (self.rpc.method(), self.latency_ms());
        let client = subject.map_or("-", |s| s.client.as_str());
        tracing::warn!(
            grpc.method = method,
            user = subject.map_or("-", |s| s.user.as_str()),
            client,
            latency_ms,
            "call abandoned: the shutdown grace period ended before it did; outcome unknown"
        );
        self.audit("password_reset.abandoned", subject, "UNKNOWN", None, false);
        self.record(
            "UNAVAILABLE",
            Some(ErrorReason::ShuttingDown.as_str_name()),
            client,
        );
        Reply {
            request_id: self.request_id.clone(),
            result: Err(Box::new(Error::ShuttingDown.classify())),
            replayed: false,
        }
    }

    /// Counts the call by code (and the reason of an error) and its latency, labelled with the
    /// app client's alias (`-` when the request was refused before naming one).
    fn record(&self, code: &'static str, reason: Option<&'static str>, client: &str) {
        let Some(series) = CallSeries::get() else {
            return;
        };
        let labels = CallLabels {
            method: self.rpc.method(),
            protocol: self.protocol.label(),
            caller: &self.caller.label,
            client,
            code,
            reason,
        };
        series.handled(&labels).increment(1);
        series
            .seconds(&labels)
            .record(self.started.elapsed().as_secs_f64());
    }

    fn latency_ms(&self) -> f64 {
        self.started.elapsed().as_secs_f64() * 1e3
    }

    fn log_success(&self, user: &str, client: &str, masked: Option<&ErrorCode>, ending: Ending) {
        let (method, latency_ms) = (self.rpc.method(), self.latency_ms());
        let caller_gone = ending == Ending::CallerGone;
        match masked {
            None => tracing::info!(
                grpc.method = method,
                grpc.code = "OK",
                user,
                client,
                latency_ms,
                caller_gone,
                "call finished"
            ),
            Some(cognito_code) => tracing::info!(
                grpc.method = method,
                grpc.code = "OK",
                masked = true,
                cognito.code = cognito_code.name(),
                user,
                client,
                latency_ms,
                caller_gone,
                "call finished: enumeration protection answered for an unknown user"
            ),
        }
    }

    /// Logs a failure at the level its blame calls for: caller mistakes and passing upstream
    /// trouble at warn, this service's own faults at error.
    fn log_failure(
        &self,
        user: &str,
        client: &str,
        error: &Error,
        failure: &Failure,
        ending: Ending,
    ) {
        let (method, latency_ms) = (self.rpc.method(), self.latency_ms());
        let caller_gone = ending == Ending::CallerGone;
        let Failure {
            code,
            reason,
            blame,
            masked,
        } = *failure;
        // A masked answer logs what Cognito really said.
        let cognito_code = masked
            .or(match error {
                Error::Upstream(upstream) => upstream.cognito_code(),
                _ => None,
            })
            .map(ErrorCode::name);
        let masked = masked.is_some().then_some(true);
        let detail = upstream_detail(error);
        let detail = detail.as_deref();
        macro_rules! failed {
            ($level:expr, $message:literal) => {
                tracing::event!(
                    $level,
                    grpc.method = method,
                    grpc.code = code,
                    reason,
                    masked,
                    cognito.code = cognito_code,
                    detail,
                    user,
                    client,
                    latency_ms,
                    caller_gone,
                    $message
                )
            };
        }
        match blame {
            Blame::Caller => failed!(Level::WARN, "call failed"),
            Blame::SlowCaller => {
                failed!(
                    Level::INFO,
                    "call failed: its message did not arrive in time"
                );
                self.warn_of_stalling(error);
            }
            Blame::Upstream => failed!(Level::WARN, "call failed upstream"),
            Blame::Capacity => failed!(
                Level::WARN,
                "call refused: this replica is at capacity or stopping"
            ),
            Blame::Server => failed!(Level::ERROR, "call failed: server-side fault"),
            Blame::Refused => failed!(
                Level::WARN,
                "call refused: its app client is proven misconfigured"
            ),
        }
    }

    /// At most once a minute per kind, a warning that callers' messages are stalling.
    fn warn_of_stalling(&self, error: &Error) {
        let (warning, what) = match error {
            Error::RequestTimeout { .. } => (
                &REQUEST_TIMEOUT_WARNING,
                "request messages are not arriving within REQUEST_BODY_TIMEOUT: such calls \
                 are answered DEADLINE_EXCEEDED (REQUEST_TIMEOUT)",
            ),
            _ => (
                &TAKEN_BACK_WARNING,
                "calls are crowded: calls whose message was still arriving lost their place to \
                 new calls (OVERLOADED)",
            ),
        };
        if let Some(held_back) = warning.due() {
            tracing::warn!(since_last_warning = held_back, "{what}");
        }
    }

    /// The audit event: a reset requested, confirmed, refused, or abandoned.
    fn audit(
        &self,
        event: &str,
        subject: Option<&Subject>,
        code: &str,
        reason: Option<&str>,
        caller_gone: bool,
    ) {
        tracing::info!(
            target: "audit",
            event,
            user = subject.map_or("-", |s| s.user.as_str()),
            caller = self.caller.name(),
            client = subject.map_or("-", |s| s.client.as_str()),
            client_id = subject.map_or("-", |s| s.client_id.as_str()),
            grpc.method = self.rpc.method(),
            grpc.code = code,
            reason,
            caller_gone,
            request_id = self.request_id,
            "audit"
        );
    }
}

/// How a failed call is logged.
struct Failure<'a> {
    code: &'static str,
    reason: &'static str,
    blame: Blame,
    masked: Option<&'a ErrorCode>,
}

/// The reason the audit records for a masked answer: that of Cognito's real error.
fn masked_reason(cognito_code: &ErrorCode) -> &'static str {
    crate::error::cognito_row(cognito_code).map_or("MASKED", |row| row.reason.as_str_name())
}

impl Drop for Call {
    fn drop(&mut self) {
        if !self.finished {
            let (error, ending) = unfinished();
            let _ = self.conclude::<()>(None, Outcome::plain(Err(error)), ending);
        }
    }
}

/// What a call dropped unfinished ends as. Dropped while its task unwinds from a panic (a
/// task's panic drops the live values of its futures as it unwinds), its caller is answered
/// INTERNAL_FAULT, and so it is recorded; otherwise its caller went away.
fn unfinished() -> (Error, Ending) {
    match std::thread::panicking() {
        true => (Error::Internal, Ending::Answered),
        false => (Error::Cancelled, Ending::CallerGone),
    }
}

/// What an operator needs to see of an upstream failure; Cognito's messages and transport
/// errors hold no request data, and an invalid answer is described, never quoted.
fn upstream_detail(error: &Error) -> Option<String> {
    match error {
        Error::Upstream(UpstreamError::Service { message, .. }) => message.clone(),
        Error::Upstream(UpstreamError::Unreachable { detail, .. })
        | Error::Upstream(UpstreamError::Construction { detail }) => Some(detail.clone()),
        Error::Upstream(UpstreamError::InvalidResponse(invalid)) => Some(invalid.to_string()),
        _ => None,
    }
}

/// Parses a gRPC `TimeoutValue TimeoutUnit` (at most 8 digits, unit one of `HMSmun`).
pub(crate) fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let unit_at = value.len().checked_sub(1)?;
    if !value.is_char_boundary(unit_at) {
        return None;
    }
    let (digits, unit) = value.split_at(unit_at);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Parses `Connect-Timeout-Ms`: a positive integer of at most 10 digits, in milliseconds.
pub(crate) fn parse_connect_timeout(value: &str) -> Option<Duration> {
    if value.is_empty() || value.len() > 10 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value
        .parse()
        .ok()
        .filter(|ms| *ms > 0)
        .map(Duration::from_millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a call dropped with it would end as.
    struct Witness(Arc<std::sync::Mutex<Option<(&'static str, Ending)>>>);

    impl Drop for Witness {
        fn drop(&mut self) {
            let (error, ending) = unfinished();
            let reason = error.classify().reason.as_str_name();
            *self.0.lock().unwrap() = Some((reason, ending));
        }
    }

    #[tokio::test]
    async fn a_call_dropped_by_its_tasks_panic_ends_as_an_internal_fault() {
        let seen = Arc::new(std::sync::Mutex::new(None));
        let witness = Witness(seen.clone());
        let task = tokio::spawn(async move {
            let _call = witness;
            tokio::task::yield_now().await;
            async { panic!("a bug") }.await
        });
        assert!(task.await.unwrap_err().is_panic());
        let ended = seen.lock().unwrap().take();
        assert!(
            matches!(ended, Some(("INTERNAL_FAULT", Ending::Answered))),
            "{ended:?}"
        );

        // Dropped unfinished without a panic: its caller went away.
        let witness = Witness(seen.clone());
        let (_held, hold) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _call = witness;
            let _ = hold.await;
        });
        tokio::task::yield_now().await;
        task.abort();
        assert!(task.await.unwrap_err().is_cancelled());
        let ended = seen.lock().unwrap().take();
        assert!(
            matches!(ended, Some(("CANCELLED", Ending::CallerGone))),
            "{ended:?}"
        );
    }

    #[test]
    fn connect_timeouts_are_milliseconds_of_at_most_ten_digits() {
        assert_eq!(
            parse_connect_timeout("1500"),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            parse_connect_timeout("9999999999"),
            Some(Duration::from_millis(9_999_999_999))
        );
        assert_eq!(
            parse_connect_timeout("0001"),
            Some(Duration::from_millis(1))
        );
        for bad in [
            "",
            "0",
            "0000",
            "12345678901",
            "-5",
            "5s",
            "1.5",
            " 5",
            "abc",
        ] {
            assert_eq!(parse_connect_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn grpc_timeouts_parse_every_unit() {
        assert_eq!(parse_grpc_timeout("500m"), Some(Duration::from_millis(500)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1M"), Some(Duration::from_secs(60)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse_grpc_timeout("9n"), Some(Duration::from_nanos(9)));
        for bad in ["", "m", "123456789m", "5x", "-5m", "5 m", "5é"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }
}
