//! The `passwordrecovery.v1.PasswordRecovery` gRPC service: parses each request into its
//! validated domain type, checks the app client and the abuse limits, calls Cognito within
//! the call's budget, applies enumeration protection, and leaves one log line, one audit
//! event and its metrics per call.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::{Request, Response, Status};
use tracing::{Instrument, Level};

use crate::cognito::{Budget, Cognito, UpstreamError};
use crate::connections::{CallInProgress, ConnectionInfo};
use crate::domain::{
    ClientId, ClientMetadata, CodeDelivery, ConfirmForgotPassword, ConfirmationCode,
    DeliveryMedium, FieldViolation, ForgotPassword, PassThrough, Password, UserContext, Username,
    Violations, free_text, optional_client_id,
};
use crate::error::{Blame, Error, code_name};
use crate::limits::{Limits, Rpc};
use crate::metrics as m;
use crate::privacy::UsernameHasher;
use crate::proto::v1 as pb;
use crate::proto::v1::password_recovery_server::PasswordRecovery;
use crate::telemetry::{self, TraceParent};

/// The service's full name, as health, metrics and reflection show it.
pub const SERVICE_NAME: &str = "passwordrecovery.v1.PasswordRecovery";

/// The Cognito error codes that mean "no such user" for ForgotPassword under enumeration
/// protection: an unknown user, or one with no verified contact to send a code to.
const FORGOT_PASSWORD_MASKED: &[&str] = &["UserNotFoundException", "InvalidParameterException"];

/// The service's state, shared by every call.
#[derive(Debug, Clone)]
pub struct PasswordRecoveryService {
    cognito: Cognito,
    timeout: Duration,
    enumeration_protection: bool,
    limits: Arc<Limits>,
    /// Pseudonyms of usernames in logs and audit events.
    usernames: UsernameHasher,
    /// Simulated answers for unknown users.
    masking: UsernameHasher,
}

impl PasswordRecoveryService {
    /// A service calling `cognito`, each call bounded by `timeout` and passing `limits` first.
    /// `usernames` hashes usernames for logs, `masking` for simulated answers.
    pub fn new(
        cognito: Cognito,
        timeout: Duration,
        enumeration_protection: bool,
        limits: Arc<Limits>,
        usernames: UsernameHasher,
        masking: UsernameHasher,
    ) -> Self {
        Self {
            cognito,
            timeout,
            enumeration_protection,
            limits,
            usernames,
            masking,
        }
    }

    /// The order of DESIGN: client allowlist, global limit, per-username limit, then a place
    /// among the calls waiting on Cognito.
    fn admit(
        &self,
        rpc: Rpc,
        username: &Username,
        client_id: Option<&ClientId>,
    ) -> Result<OwnedSemaphorePermit, Error> {
        self.check_client(client_id)?;
        self.limits
            .check(rpc, username)
            .map_err(Error::RateLimited)?;
        self.limits.upstream_permit().ok_or(Error::Overloaded)
    }

    fn subject(&self, username: &Username, client_id: Option<&ClientId>) -> Subject {
        Subject {
            user: self.usernames.pseudonym(username),
            client_id: client_id.unwrap_or(self.cognito.client_id()).to_string(),
        }
    }

    fn check_client(&self, requested: Option<&ClientId>) -> Result<(), Error> {
        match requested {
            Some(id) if id != self.cognito.client_id() => Err(Error::ClientNotAllowed),
            _ => Ok(()),
        }
    }

    async fn forgot_password_inner(
        &self,
        request: ForgotPassword,
        budget: Budget,
    ) -> Result<CodeDelivery, Error> {
        let _permit = self.admit(
            Rpc::ForgotPassword,
            &request.username,
            request.client_id.as_ref(),
        )?;
        match self.cognito.forgot_password(&request, budget).await {
            Ok(delivery) => Ok(delivery),
            Err(UpstreamError::Service { code, .. })
                if self.enumeration_protection
                    && FORGOT_PASSWORD_MASKED.contains(&code.as_str()) =>
            {
                tracing::info!(
                    cognito.code = code,
                    "enumeration protection: answered with simulated delivery details"
                );
                Ok(self.masking.simulated_delivery(&request.username))
            }
            Err(err) => Err(Error::Upstream(err)),
        }
    }

    async fn confirm_forgot_password_inner(
        &self,
        request: ConfirmForgotPassword,
        budget: Budget,
    ) -> Result<(), Error> {
        let _permit = self.admit(
            Rpc::ConfirmForgotPassword,
            &request.username,
            request.client_id.as_ref(),
        )?;
        match self.cognito.confirm_forgot_password(&request, budget).await {
            Ok(()) => Ok(()),
            // Answer exactly as a wrong code does, so the answer says nothing of the user.
            Err(UpstreamError::Service {
                code, request_id, ..
            }) if self.enumeration_protection && code == "UserNotFoundException" => {
                Err(Error::Upstream(UpstreamError::Service {
                    code: "CodeMismatchException".into(),
                    message: None,
                    request_id,
                }))
            }
            Err(err) => Err(Error::Upstream(err)),
        }
    }
}

#[tonic::async_trait]
impl PasswordRecovery for PasswordRecoveryService {
    async fn forgot_password(
        &self,
        request: Request<pb::ForgotPasswordRequest>,
    ) -> Result<Response<pb::ForgotPasswordResponse>, Status> {
        let call = Call::start("ForgotPassword", &request, self.timeout);
        let parsed = parse_forgot_password(request.into_inner());
        self.serve(call, parsed, |request, budget| async move {
            let delivery = self.forgot_password_inner(request, budget).await?;
            Ok(pb::ForgotPasswordResponse {
                code_delivery_details: Some(code_delivery_details(delivery)),
            })
        })
        .await
    }

    async fn confirm_forgot_password(
        &self,
        request: Request<pb::ConfirmForgotPasswordRequest>,
    ) -> Result<Response<pb::ConfirmForgotPasswordResponse>, Status> {
        let call = Call::start("ConfirmForgotPassword", &request, self.timeout);
        let parsed = parse_confirm_forgot_password(request.into_inner());
        self.serve(call, parsed, |request, budget| async move {
            self.confirm_forgot_password_inner(request, budget).await?;
            Ok(pb::ConfirmForgotPasswordResponse {})
        })
        .await
    }
}

/// A validated request: whom it is about and for which app client.
trait Addressed {
    fn username(&self) -> &Username;
    fn client_id(&self) -> Option<&ClientId>;
}

impl Addressed for ForgotPassword {
    fn username(&self) -> &Username {
        &self.username
    }
    fn client_id(&self) -> Option<&ClientId> {
        self.client_id.as_ref()
    }
}

impl Addressed for ConfirmForgotPassword {
    fn username(&self) -> &Username {
        &self.username
    }
    fn client_id(&self) -> Option<&ClientId> {
        self.client_id.as_ref()
    }
}

impl PasswordRecoveryService {
    /// The life of every call, in its span: a request that failed validation is answered
    /// at once, a valid one is `run` within the call's budget; then `Call::finish`.
    async fn serve<R, T, Fut>(
        &self,
        call: Call,
        parsed: Result<R, Vec<FieldViolation>>,
        run: impl FnOnce(R, Budget) -> Fut,
    ) -> Result<Response<T>, Status>
    where
        R: Addressed,
        Fut: Future<Output = Result<T, Error>>,
    {
        let span = call.span.clone();
        async move {
            let (subject, result) = match parsed {
                Ok(request) => {
                    let subject = self.subject(request.username(), request.client_id());
                    (Some(subject), run(request, call.budget).await)
                }
                Err(violations) => (None, Err(Error::InvalidRequest(violations))),
            };
            call.finish(subject, result)
        }
        .instrument(span)
        .await
    }
}

/// One call in progress: its method, start, budget, request id and span, counted in flight
/// until dropped (a call the client cancels is dropped without finishing).
struct Call {
    method: &'static str,
    started: Instant,
    budget: Budget,
    request_id: MetadataValue<Ascii>,
    /// Who called: the mTLS client's identity, or `anonymous`.
    caller: String,
    span: tracing::Span,
    _in_flight: InFlight,
    _on_connection: Option<CallInProgress>,
}

/// Whom a valid request is about, as logs and audit events name them.
struct Subject {
    /// The keyed hash of the normalised username.
    user: String,
    /// The app client the call is for.
    client_id: String,
}

/// Counts one call in `grpc_server_in_flight` for as long as it lives.
struct InFlight;

impl InFlight {
    fn enter() -> Self {
        metrics::gauge!(m::GRPC_IN_FLIGHT).increment(1.0);
        Self
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics::gauge!(m::GRPC_IN_FLIGHT).decrement(1.0);
    }
}

impl Call {
    fn start<T>(method: &'static str, request: &Request<T>, timeout: Duration) -> Self {
        let started = Instant::now();
        let connection = request.extensions().get::<ConnectionInfo>();
        let caller = connection
            .and_then(|c| c.peer_identity.clone())
            .unwrap_or_else(|| "anonymous".to_owned());
        let metadata = request.metadata();
        let request_id = telemetry::request_id(
            metadata
                .get(telemetry::REQUEST_ID_HEADER)
                .and_then(|v| v.to_str().ok()),
        );
        let trace = metadata
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .and_then(TraceParent::parse);
        let span = tracing::info_span!(
            "call",
            grpc.method = method,
            request_id = %request_id,
            trace_id = trace.as_ref().map(|t| t.trace_id.as_str()),
            parent_span_id = trace.as_ref().map(|t| t.parent_id.as_str()),
        );
        telemetry::link_remote_parent(&span, trace.as_ref());
        metrics::counter!(m::GRPC_STARTED, "grpc_service" => SERVICE_NAME, "grpc_method" => method)
            .increment(1);
        Self {
            method,
            started,
            budget: Budget::new(started, timeout, caller_timeout(request)),
            // A request id is printable ASCII by construction.
            request_id: request_id.parse().expect("printable ASCII"),
            caller,
            span,
            _in_flight: InFlight::enter(),
            _on_connection: connection.map(ConnectionInfo::call_started),
        }
    }

    /// Turns the outcome into the answer, carrying the request id (in headers on success,
    /// trailers on error), and leaves its log line, audit event and metrics.
    fn finish<T>(
        self,
        subject: Option<Subject>,
        result: Result<T, Error>,
    ) -> Result<Response<T>, Status> {
        let user = subject.as_ref().map_or("-", |s| s.user.as_str());
        let (answer, code, reason) = match result {
            Ok(response) => {
                self.log_success(user);
                let mut response = Response::new(response);
                response
                    .metadata_mut()
                    .insert(telemetry::REQUEST_ID_HEADER, self.request_id.clone());
                (Ok(response), "OK", None)
            }
            Err(error) => {
                let classified = error.classify();
                let (code, reason) = (code_name(classified.code), classified.reason);
                self.log_failure(user, &error, code, reason, classified.blame);
                let mut status = classified.into_status();
                status
                    .metadata_mut()
                    .insert(telemetry::REQUEST_ID_HEADER, self.request_id.clone());
                (Err(status), code, Some(reason))
            }
        };
        self.audit(subject.as_ref(), code, reason);
        let method = self.method;
        metrics::counter!(m::GRPC_HANDLED, "grpc_service" => SERVICE_NAME, "grpc_method" => method, "grpc_code" => code)
            .increment(1);
        metrics::histogram!(m::GRPC_SECONDS, "grpc_service" => SERVICE_NAME, "grpc_method" => method)
            .record(self.started.elapsed().as_secs_f64());
        answer
    }

    fn latency_ms(&self) -> f64 {
        self.started.elapsed().as_secs_f64() * 1e3
    }

    fn log_success(&self, user: &str) {
        let (method, latency_ms) = (self.method, self.latency_ms());
        tracing::info!(
            grpc.method = method,
            grpc.code = "OK",
            user,
            latency_ms,
            "call finished"
        );
    }

    /// Logs a failure at the level its blame calls for: caller mistakes and passing upstream
    /// trouble at warn, this service's own faults at error.
    fn log_failure(&self, user: &str, error: &Error, code: &str, reason: &str, blame: Blame) {
        let (method, latency_ms) = (self.method, self.latency_ms());
        let cognito_code = match error {
            Error::Upstream(upstream) => upstream.cognito_code(),
            _ => None,
        };
        let detail = upstream_detail(error);
        macro_rules! failed {
            ($level:expr, $message:literal) => {
                tracing::event!(
                    $level,
                    grpc.method = method,
                    grpc.code = code,
                    reason,
                    cognito.code = cognito_code,
                    detail,
                    user,
                    latency_ms,
                    $message
                )
            };
        }
        match blame {
            Blame::Caller => failed!(Level::WARN, "call failed"),
            Blame::Upstream => failed!(Level::WARN, "call failed upstream"),
            Blame::Server => failed!(Level::ERROR, "call failed: server-side fault"),
        }
    }

    /// The audit event: a reset requested, confirmed, or refused.
    fn audit(&self, subject: Option<&Subject>, code: &str, reason: Option<&str>) {
        let event = match (reason, self.method) {
            (Some(_), _) => "password_reset.refused",
            (None, "ForgotPassword") => "password_reset.requested",
            (None, _) => "password_reset.confirmed",
        };
        tracing::info!(
            target: "audit",
            event,
            user = subject.map_or("-", |s| s.user.as_str()),
            caller = self.caller,
            client_id = subject.map_or("-", |s| s.client_id.as_str()),
            grpc.method = self.method,
            grpc.code = code,
            reason,
            request_id = self.request_id.to_str().unwrap_or_default(),
            "audit"
        );
    }
}

/// What an operator needs to see of an upstream failure; Cognito's messages and transport
/// errors hold no request data.
fn upstream_detail(error: &Error) -> Option<&str> {
    match error {
        Error::Upstream(UpstreamError::Service { message, .. }) => message.as_deref(),
        Error::Upstream(UpstreamError::Unreachable { detail, .. })
        | Error::Upstream(UpstreamError::Construction { detail }) => Some(detail),
        _ => None,
    }
}

/// The caller's deadline from the `grpc-timeout` header, if it sent one and it parses.
fn caller_timeout<T>(request: &Request<T>) -> Option<Duration> {
    let value = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    parse_grpc_timeout(value)
}

/// Parses a gRPC `TimeoutValue TimeoutUnit` (at most 8 digits, unit one of `HMSmun`).
fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let unit_at = value.len().checked_sub(1)?;
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

fn pass_through(
    violations: &mut Violations,
    client_metadata: HashMap<String, String>,
    user_context: Option<pb::UserContext>,
    analytics_endpoint_id: String,
) -> PassThrough {
    let client_metadata = violations
        .check(ClientMetadata::parse("client_metadata", client_metadata))
        .unwrap_or_default();
    let user_context = user_context
        .and_then(|c| UserContext::parse("user_context", c.ip_address, c.encoded_data, violations));
    let analytics_endpoint_id = violations
        .check(free_text("analytics_endpoint_id", analytics_endpoint_id))
        .flatten();
    PassThrough {
        client_metadata,
        user_context,
        analytics_endpoint_id,
    }
}

/// Validates a ForgotPassword request, naming every violated field.
pub fn parse_forgot_password(
    request: pb::ForgotPasswordRequest,
) -> Result<ForgotPassword, Vec<FieldViolation>> {
    let mut violations = Violations::default();
    let username = violations.check(Username::parse("username", request.username));
    let client_id = violations.check(optional_client_id("client_id", request.client_id));
    let pass_through = pass_through(
        &mut violations,
        request.client_metadata,
        request.user_context,
        request.analytics_endpoint_id,
    );
    violations.finish(|| {
        Some(ForgotPassword {
            username: username?,
            client_id: client_id?,
            pass_through,
        })
    })
}

/// Validates a ConfirmForgotPassword request, naming every violated field.
pub fn parse_confirm_forgot_password(
    request: pb::ConfirmForgotPasswordRequest,
) -> Result<ConfirmForgotPassword, Vec<FieldViolation>> {
    let mut violations = Violations::default();
    let username = violations.check(Username::parse("username", request.username));
    let confirmation_code = violations.check(ConfirmationCode::parse(
        "confirmation_code",
        request.confirmation_code,
    ));
    let password = violations.check(Password::parse("password", request.password));
    let client_id = violations.check(optional_client_id("client_id", request.client_id));
    let pass_through = pass_through(
        &mut violations,
        request.client_metadata,
        request.user_context,
        request.analytics_endpoint_id,
    );
    violations.finish(|| {
        Some(ConfirmForgotPassword {
            username: username?,
            confirmation_code: confirmation_code?,
            password: password?,
            client_id: client_id?,
            pass_through,
        })
    })
}

fn code_delivery_details(delivery: CodeDelivery) -> pb::CodeDeliveryDetails {
    let medium = match delivery.medium {
        DeliveryMedium::Unspecified => pb::DeliveryMedium::Unspecified,
        DeliveryMedium::Email => pb::DeliveryMedium::Email,
        DeliveryMedium::Sms => pb::DeliveryMedium::Sms,
    };
    pb::CodeDeliveryDetails {
        destination: delivery.destination,
        delivery_medium: medium.into(),
        attribute_name: delivery.attribute_name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_every_unit() {
        assert_eq!(parse_grpc_timeout("500m"), Some(Duration::from_millis(500)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1M"), Some(Duration::from_secs(60)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse_grpc_timeout("9n"), Some(Duration::from_nanos(9)));
        for bad in ["", "m", "123456789m", "5x", "-5m", "5 m"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn every_violated_field_is_named_at_once() {
        let violations = parse_confirm_forgot_password(pb::ConfirmForgotPasswordRequest {
            username: " bob".into(),
            confirmation_code: String::new(),
            password: "has space".into(),
            client_id: "bad-id".into(),
            user_context: Some(pb::UserContext {
                ip_address: "x".repeat(131_073),
                encoded_data: String::new(),
            }),
            ..Default::default()
        })
        .unwrap_err();
        let fields: Vec<_> = violations.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "username",
                "confirmation_code",
                "password",
                "client_id",
                "user_context.ip_address"
            ]
        );
        let text = format!("{violations:?}");
        assert!(!text.contains("has space"), "values are never echoed");
    }

    #[test]
    fn a_valid_request_passes_everything_through() {
        let request = parse_forgot_password(pb::ForgotPasswordRequest {
            username: "a@b.com".into(),
            client_id: String::new(),
            client_metadata: HashMap::from([("k".into(), "v".into())]),
            user_context: Some(pb::UserContext {
                ip_address: "192.0.2.1".into(),
                encoded_data: String::new(),
            }),
            analytics_endpoint_id: "endpoint".into(),
        })
        .unwrap();
        assert_eq!(request.client_id, None);
        assert_eq!(
            request.pass_through.analytics_endpoint_id.as_deref(),
            Some("endpoint")
        );
        let context = request.pass_through.user_context.unwrap();
        assert_eq!(context.ip_address.as_deref(), Some("192.0.2.1"));
        assert_eq!(context.encoded_data, None);
    }
}
