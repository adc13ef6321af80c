//! The one way a call fails: [`Error`], and its conversion to a `tonic::Status` carrying
//! exactly one `google.rpc.ErrorInfo` (AIP-193). [`COGNITO_ERRORS`] is the table of
//! README "Errors": every Cognito error code and the gRPC code, reason and details it becomes.

use std::collections::HashMap;
use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation as ProtoFieldViolation, StatusExt};

use crate::callers::Lacks;
use crate::cognito::{ErrorCode, NotAuthorized, UpstreamError};
use crate::domain::FieldViolation;
use crate::limits::{OVERLOAD_RETRY_DELAY, RateLimited};
pub use crate::proto::v1::ErrorReason;

/// The `domain` of every ErrorInfo this service sends.
pub(crate) const ERROR_DOMAIN: &str = "password-recovery";

/// How long a throttled caller should wait before trying again.
pub(crate) const THROTTLE_RETRY_DELAY: Duration = Duration::from_secs(1);

/// What a status carries beyond its ErrorInfo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extra {
    /// Nothing more.
    None,
    /// A BadRequest on this proto field, described by a fixed text.
    BadField(&'static str),
    /// A BadRequest on this proto field, described by Cognito's own message (policy text).
    BadFieldCognitoMessage(&'static str),
    /// RetryInfo with [`THROTTLE_RETRY_DELAY`].
    RetryAfterThrottle,
    /// Cognito's message (a Lambda trigger's words) becomes the status message.
    CognitoMessage,
    /// A fault of this service's set-up: the caller learns no more, the log says it at error.
    Misconfiguration,
}

/// One row of the table: a Cognito error code and what the caller sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// Cognito's error code.
    pub cognito_code: ErrorCode,
    /// The gRPC status code.
    pub code: Code,
    /// The ErrorInfo reason.
    pub reason: ErrorReason,
    /// The status message (unless `extra` says Cognito's message replaces it).
    pub message: &'static str,
    /// Further details.
    pub extra: Extra,
}

const fn row(
    cognito_code: ErrorCode,
    code: Code,
    reason: ErrorReason,
    message: &'static str,
    extra: Extra,
) -> Row {
    Row {
        cognito_code,
        code,
        reason,
        message,
        extra,
    }
}

/// What every confirmation code that does not work is told under enumeration protection.
pub(crate) const CODE_REFUSED: &str =
    "the confirmation code is wrong or has expired; request a new one if it keeps failing";

const MISCONFIGURED: &str = "the password-recovery service is misconfigured; its operators \
                             have been told in its logs";

/// Every Cognito error code this service knows, and what it becomes (README "Errors"), one row
/// per line like the README's table.
#[rustfmt::skip]
pub const COGNITO_ERRORS: &[Row] = &[
    row(ErrorCode::CodeMismatch, Code::InvalidArgument, ErrorReason::CodeMismatch, "the confirmation code is not correct", Extra::BadField("confirmation_code")),
    row(ErrorCode::ExpiredCode, Code::FailedPrecondition, ErrorReason::ExpiredCode, "the confirmation code has expired; request a new one with ForgotPassword", Extra::None),
    row(ErrorCode::InvalidPassword, Code::InvalidArgument, ErrorReason::InvalidPassword, "the password does not satisfy the user pool's password policy", Extra::BadFieldCognitoMessage("password")),
    row(ErrorCode::PasswordHistoryPolicyViolation, Code::InvalidArgument, ErrorReason::PasswordHistoryPolicyViolation, "the password was used recently by this user; choose another", Extra::BadField("password")),
    row(ErrorCode::UserNotFound, Code::NotFound, ErrorReason::UserNotFound, "no such user", Extra::None),
    row(ErrorCode::UserNotConfirmed, Code::FailedPrecondition, ErrorReason::UserNotConfirmed, "the user has not confirmed their account", Extra::None),
    row(ErrorCode::InvalidParameter, Code::FailedPrecondition, ErrorReason::InvalidParameter, "the account cannot be recovered in its current state (for example, it has no verified email or phone number)", Extra::None),
    row(ErrorCode::NotAuthorized, Code::PermissionDenied, ErrorReason::NotAuthorized, "Cognito refused the reset in this account's state (disabled, or a password that must be changed first)", Extra::None),
    row(ErrorCode::Forbidden, Code::PermissionDenied, ErrorReason::Forbidden, "the user pool's web ACL blocked the request", Extra::None),
    row(ErrorCode::LimitExceeded, Code::ResourceExhausted, ErrorReason::LimitExceeded, "the attempt limit for this user was exceeded; try again later", Extra::None),
    row(ErrorCode::TooManyFailedAttempts, Code::ResourceExhausted, ErrorReason::TooManyFailedAttempts, "too many failed attempts for this user; try again later", Extra::None),
    row(ErrorCode::TooManyRequests, Code::ResourceExhausted, ErrorReason::TooManyRequests, "Cognito is throttling requests; retry shortly", Extra::RetryAfterThrottle),
    row(ErrorCode::CodeDeliveryFailure, Code::Unavailable, ErrorReason::CodeDeliveryFailure, "Cognito could not deliver the confirmation code", Extra::None),
    row(ErrorCode::UserLambdaValidation, Code::FailedPrecondition, ErrorReason::UserLambdaValidation, "a user pool Lambda trigger refused the request", Extra::CognitoMessage),
    row(ErrorCode::OperationNotEnabled, Code::FailedPrecondition, ErrorReason::OperationNotEnabled, "this operation is not enabled for the user pool", Extra::None),
    row(ErrorCode::ResourceNotFound, Code::Internal, ErrorReason::ResourceNotFound, MISCONFIGURED, Extra::Misconfiguration),
    row(ErrorCode::InvalidEmailRoleAccessPolicy, Code::Internal, ErrorReason::InvalidEmailRoleAccessPolicy, MISCONFIGURED, Extra::Misconfiguration),
    row(ErrorCode::InvalidSmsRoleAccessPolicy, Code::Internal, ErrorReason::InvalidSmsRoleAccessPolicy, MISCONFIGURED, Extra::Misconfiguration),
    row(ErrorCode::InvalidSmsRoleTrustRelationship, Code::Internal, ErrorReason::InvalidSmsRoleTrustRelationship, MISCONFIGURED, Extra::Misconfiguration),
    row(ErrorCode::InvalidLambdaResponse, Code::Internal, ErrorReason::InvalidLambdaResponse, MISCONFIGURED, Extra::Misconfiguration),
    row(ErrorCode::UnexpectedLambda, Code::Internal, ErrorReason::UnexpectedLambda, MISCONFIGURED, Extra::Misconfiguration),
    row(ErrorCode::InternalError, Code::Unavailable, ErrorReason::InternalError, "Cognito had an internal error; retry later", Extra::None),
];

/// Looks up a Cognito error code in [`COGNITO_ERRORS`].
pub(crate) fn cognito_row(cognito_code: &ErrorCode) -> Option<&'static Row> {
    COGNITO_ERRORS
        .iter()
        .find(|r| r.cognito_code == *cognito_code)
}

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Error {
    /// The request broke Cognito's documented limits; Cognito was not called.
    InvalidRequest(Vec<FieldViolation>),
    /// The request named an app client this server does not serve.
    ClientNotAllowed,
    /// The app client's last proof found it misconfigured: refused before any upstream call.
    ClientMisconfigured {
        /// Its alias.
        client: String,
    },
    /// The callers policy does not let this caller make this call.
    CallerNotAllowed {
        /// The caller's name: its identity, or `anonymous`.
        caller: String,
        /// What it lacks.
        lacks: Lacks,
    },
    /// Cognito, or the way to it, failed.
    Upstream(UpstreamError),
    /// Under enumeration protection, the one answer to a confirmation code that does not work,
    /// whatever the account's state (a wrong or expired code, none requested, no such user,
    /// a disabled or unconfirmed one).
    CodeRefused {
        /// Cognito's request id, if any.
        request_id: Option<String>,
    },
    /// A limit of this service refused the call before Cognito.
    RateLimited(RateLimited),
    /// Too many calls are already waiting on Cognito, or in progress (in all, or from the
    /// call's peer).
    Overloaded {
        /// The setting whose bound was reached.
        limit: &'static str,
    },
    /// The call's message was still arriving when its place among the calls in progress was
    /// given to a new call.
    TakenBack {
        /// The setting whose bound was reached: `MAX_CONCURRENT_CALLS`, or its per-peer share.
        limit: &'static str,
    },
    /// The call's message did not arrive within `REQUEST_BODY_TIMEOUT` of its headers.
    RequestTimeout {
        /// `REQUEST_BODY_TIMEOUT`.
        limit: Duration,
    },
    /// The caller's deadline left too little time to reach Cognito: the call was not sent.
    DeadlineTooShort,
    /// The request message could not be decoded; the service never saw it.
    MalformedRequest,
    /// The `request_id` of an earlier call came with another request.
    RequestIdReused,
    /// The request message was larger than `MAX_REQUEST_BYTES`; it was not read.
    RequestTooLarge {
        /// `MAX_REQUEST_BYTES`.
        limit: usize,
    },
    /// The caller cancelled before the call reached Cognito.
    Cancelled,
    /// The call's own task failed: a fault of this service.
    Internal,
    /// The shutdown grace period ended before the call did; its outcome is unknown.
    ShuttingDown,
}

/// Who is to blame for a failure, which sets the level of its log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Blame {
    /// The caller or the end user (bad input, wrong code, limits).
    Caller,
    /// A caller too slow to send its request, as a flood of stalled requests would be: each
    /// call's line is at info, and a warning at most once a minute.
    SlowCaller,
    /// Cognito or the network, usually passing.
    Upstream,
    /// This replica's own capacity: its places were full, or it was stopping.
    Capacity,
    /// This service's own set-up.
    Server,
    /// A call refused for a set-up fault already told at error once (an app client proven
    /// misconfigured): each refusal is a warn line.
    Refused,
}

/// An [`Error`] decided: everything its status and log line need.
#[derive(Debug, Clone)]
pub(crate) struct Classified {
    /// The gRPC code.
    pub(crate) code: Code,
    /// The ErrorInfo reason.
    pub(crate) reason: ErrorReason,
    /// The status message.
    pub(crate) message: String,
    /// Who is to blame.
    pub(crate) blame: Blame,
    /// The ErrorInfo's metadata, until [`Classified::done`] moves it into `details`.
    metadata: HashMap<String, String>,
    /// Every detail: the ErrorInfo, and a BadRequest, QuotaFailure or RetryInfo.
    pub(crate) details: ErrorDetails,
}

impl Classified {
    fn new(code: Code, reason: ErrorReason, message: impl Into<String>, blame: Blame) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            blame,
            metadata: HashMap::new(),
            details: ErrorDetails::new(),
        }
    }

    /// An answer remembered for retries on the fleet's Redis, as it was given: `None` when
    /// `reason` is not one of Cognito's errors', the only answers remembered.
    pub(crate) fn restored(
        code: Code,
        reason: &str,
        message: String,
        blame: Blame,
        details: ErrorDetails,
    ) -> Option<Self> {
        let reason = COGNITO_ERRORS
            .iter()
            .map(|row| row.reason)
            .find(|known| known.as_str_name() == reason)?;
        Some(Self {
            code,
            reason,
            message,
            blame,
            metadata: HashMap::new(),
            details,
        })
    }

    /// With `value` under `key` in the ErrorInfo's metadata.
    fn with(mut self, key: &str, value: impl Into<String>) -> Self {
        self.metadata.insert(key.to_owned(), value.into());
        self
    }

    /// With Cognito's request id, if there is one, in the ErrorInfo's metadata.
    fn with_request_id(self, request_id: Option<&String>) -> Self {
        match request_id {
            Some(id) => self.with("awsRequestId", id.clone()),
            None => self,
        }
    }

    /// With a RetryInfo of `delay`.
    fn retry_after(mut self, delay: Duration) -> Self {
        self.details.set_retry_info(Some(delay));
        self
    }

    /// With a BadRequest on `field`.
    fn bad_field(mut self, field: &str, description: &str) -> Self {
        self.details.add_bad_request_violation(field, description);
        self
    }

    /// Completes the details with the ErrorInfo.
    fn done(mut self) -> Self {
        let metadata = std::mem::take(&mut self.metadata);
        self.details
            .set_error_info(self.reason.as_str_name(), ERROR_DOMAIN, metadata);
        self
    }
}

impl Error {
    /// Decides the status, reason and details of this error.
    pub(crate) fn classify(&self) -> Classified {
        use Blame::*;
        let classified = match self {
            Self::InvalidRequest(violations) => invalid_request(violations),
            Self::ClientNotAllowed => Classified::new(
                Code::PermissionDenied,
                ErrorReason::ClientNotAllowed,
                "client_id is not an app client this server serves; leave it empty for the \
                 configured one",
                Caller,
            ),
            Self::ClientMisconfigured { client } => Classified::new(
                Code::FailedPrecondition,
                ErrorReason::ClientMisconfigured,
                format!(
                    "the app client {client} is misconfigured, so its calls are refused until it \
                                          is proven again; its operators have been told in the service's logs"
                ),
                Refused,
            )
            .with("client", client.clone()),
            Self::CallerNotAllowed { caller, lacks } => caller_not_allowed(caller, lacks),
            Self::Upstream(upstream) => classify_upstream(upstream),
            Self::CodeRefused { request_id } => {
                Classified::new(Code::InvalidArgument, ErrorReason::CodeMismatch, CODE_REFUSED, Caller)
                    .with("cognitoCode", ErrorCode::CodeMismatch.name())
                    .with_request_id(request_id.as_ref())
                    .bad_field("confirmation_code", CODE_REFUSED)
            }
            Self::RateLimited(refused) => rate_limited(refused),
            Self::Overloaded { limit } => Classified::new(
                Code::Unavailable,
                ErrorReason::Overloaded,
                format!(
                    "too many calls are in progress or waiting on Cognito ({limit}); retry shortly"
                ),
                Capacity,
            )
            .with("limit", *limit)
            .retry_after(OVERLOAD_RETRY_DELAY),
            Self::TakenBack { limit } => Classified::new(
                Code::Unavailable,
                ErrorReason::Overloaded,
                format!(
                    "the request message was still arriving when its place among the calls in \
                     progress ({limit}) was needed by a new call; retry shortly"
                ),
                SlowCaller,
            )
            .with("limit", *limit)
            .retry_after(OVERLOAD_RETRY_DELAY),
            Self::RequestTimeout { limit } => {
                let limit = humantime::format_duration(*limit).to_string();
                Classified::new(
                    Code::DeadlineExceeded,
                    ErrorReason::RequestTimeout,
                    format!("the request message did not arrive within {limit} of its headers"),
                    SlowCaller,
                )
                .with("limit", limit)
            }
            Self::DeadlineTooShort => Classified::new(
                Code::DeadlineExceeded,
                ErrorReason::DeadlineTooShort,
                format!(
                    "the call's deadline left less than {} ms to reach Cognito; it was not sent",
                    crate::cognito::MIN_UPSTREAM_TIME.as_millis()
                ),
                Caller,
            ),
            Self::RequestIdReused => Classified::new(
                Code::InvalidArgument,
                ErrorReason::RequestIdReused,
                "request_id was already used for another request; use a new one per request",
                Caller,
            )
            .bad_field(
                "request_id",
                "already used for another request within IDEMPOTENCY_WINDOW",
            ),
            Self::MalformedRequest => Classified::new(
                Code::InvalidArgument,
                ErrorReason::MalformedRequest,
                "the request message could not be decoded",
                Caller,
            ),
            Self::RequestTooLarge { limit } => Classified::new(
                Code::ResourceExhausted,
                ErrorReason::RequestTooLarge,
                format!("the request message is larger than {limit} bytes"),
                Caller,
            )
            .with("limit", limit.to_string()),
            Self::Cancelled => Classified::new(
                Code::Cancelled,
                ErrorReason::Cancelled,
                "the call was cancelled before it reached Cognito",
                Caller,
            ),
            Self::Internal => Classified::new(
                Code::Internal,
                ErrorReason::InternalFault,
                "the password-recovery service failed; its operators have been told in its logs",
                Server,
            ),
            Self::ShuttingDown => Classified::new(
                Code::Unavailable,
                ErrorReason::ShuttingDown,
                "this replica stopped before the call finished; its outcome is unknown",
                Capacity,
            )
            .retry_after(OVERLOAD_RETRY_DELAY),
        };
        classified.done()
    }
}

fn invalid_request(violations: &[FieldViolation]) -> Classified {
    let summary = violations
        .iter()
        .map(|v| format!("{} {}", v.field, v.description))
        .collect::<Vec<_>>()
        .join("; ");
    let mut classified = Classified::new(
        Code::InvalidArgument,
        ErrorReason::InvalidRequest,
        format!("invalid request: {summary}"),
        Blame::Caller,
    );
    classified.details.set_bad_request(
        violations
            .iter()
            .map(|v| ProtoFieldViolation::new(&v.field, &v.description))
            .collect::<Vec<_>>(),
    );
    classified
}

fn caller_not_allowed(caller: &str, lacks: &Lacks) -> Classified {
    let refused = |message: String| {
        Classified::new(
            Code::PermissionDenied,
            ErrorReason::CallerNotAllowed,
            message,
            Blame::Caller,
        )
        .with("caller", caller)
    };
    match lacks {
        Lacks::Unnamed => refused(format!(
            "the caller {caller} is not named in this server's callers policy"
        )),
        Lacks::Rpc(rpc) => {
            refused(format!("the caller {caller} may not call {rpc}")).with("rpc", *rpc)
        }
        Lacks::Client(alias) => refused(format!(
            "the caller {caller} may not use the app client {alias}"
        ))
        .with("client", alias.clone()),
    }
}

fn rate_limited(refused: &RateLimited) -> Classified {
    let limiter = refused.limiter.name();
    let retry_in = Duration::from_secs(refused.retry_after.as_secs_f64().ceil() as u64);
    let mut classified = Classified::new(
        Code::ResourceExhausted,
        ErrorReason::RateLimited,
        format!(
            "rate limited ({limiter} limit {}); retry in {}",
            refused.limit,
            humantime::format_duration(retry_in)
        ),
        Blame::Caller,
    )
    .with("limit", refused.limit.clone())
    .with("limiter", limiter)
    .retry_after(refused.retry_after);
    classified.details.add_quota_failure_violation(
        limiter,
        format!("at most {} calls ({limiter} limit)", refused.limit),
    );
    classified
}

fn classify_upstream(error: &UpstreamError) -> Classified {
    match error {
        UpstreamError::Service {
            code,
            message,
            request_id,
        } => classify_service_error(code, message.as_deref())
            .with("cognitoCode", code.name())
            .with_request_id(request_id.as_ref()),
        UpstreamError::Http { status, request_id } => {
            // An answer with no code is judged by its status, as the row it stands for.
            let row = match status {
                500..=599 => cognito_row(&ErrorCode::InternalError),
                429 => cognito_row(&ErrorCode::TooManyRequests),
                _ => None,
            };
            let classified = match row {
                Some(row) => answer_row(row, None),
                None => Classified::new(
                    Code::Unknown,
                    ErrorReason::UnknownUpstreamError,
                    format!("Cognito answered HTTP {status} with no error code"),
                    Blame::Server,
                ),
            };
            classified
                .with("httpStatus", status.to_string())
                .with_request_id(request_id.as_ref())
        }
        UpstreamError::Unreachable { .. } => Classified::new(
            Code::Unavailable,
            ErrorReason::UpstreamUnavailable,
            "Cognito could not be reached",
            Blame::Upstream,
        ),
        UpstreamError::Timeout { set_by_caller } => Classified::new(
            Code::DeadlineExceeded,
            ErrorReason::UpstreamTimeout,
            match set_by_caller {
                true => "the call's deadline ran out while waiting for Cognito",
                false => "Cognito did not answer within COGNITO_TIMEOUT",
            },
            Blame::Upstream,
        ),
        UpstreamError::Construction { .. } => Classified::new(
            Code::Internal,
            ErrorReason::RequestConstructionFailed,
            MISCONFIGURED,
            Blame::Server,
        ),
        UpstreamError::InvalidResponse(invalid) => Classified::new(
            Code::Unavailable,
            ErrorReason::UpstreamInvalidResponse,
            "Cognito's answer was not a well-formed Cognito answer",
            Blame::Server,
        )
        .with("httpStatus", invalid.status.to_string()),
    }
}

/// Cognito's error `code` with `message`, by the table; a `NotAuthorizedException` that is a
/// bad secret hash, or of a cause Cognito does not say, is this service's set-up: never the
/// caller's, never an account's state.
fn classify_service_error(code: &ErrorCode, message: Option<&str>) -> Classified {
    if *code == ErrorCode::NotAuthorized {
        let reason = match NotAuthorized::of(message) {
            NotAuthorized::SecretHash => Some(ErrorReason::InvalidSecretHash),
            NotAuthorized::Unrecognised => Some(ErrorReason::UnexpectedNotAuthorized),
            NotAuthorized::Disabled | NotAuthorized::CannotReset => None,
        };
        if let Some(reason) = reason {
            return Classified::new(Code::Internal, reason, MISCONFIGURED, Blame::Server);
        }
    }
    match cognito_row(code) {
        Some(row) => answer_row(row, message.filter(|m| !m.is_empty())),
        None => Classified::new(
            Code::Unknown,
            ErrorReason::UnknownUpstreamError,
            "Cognito answered with an error this service does not know",
            Blame::Server,
        ),
    }
}

/// What a row of the table answers, with Cognito's `message` where the row passes it on.
fn answer_row(row: &Row, message: Option<&str>) -> Classified {
    let blame = match row.code {
        Code::Unavailable => Blame::Upstream,
        _ => Blame::Caller,
    };
    let classified = Classified::new(row.code, row.reason, row.message, blame);
    match row.extra {
        Extra::None => classified,
        Extra::BadField(field) => classified.bad_field(field, row.message),
        Extra::BadFieldCognitoMessage(field) => {
            classified.bad_field(field, message.unwrap_or(row.message))
        }
        Extra::RetryAfterThrottle => Classified {
            blame: Blame::Upstream,
            ..classified.retry_after(THROTTLE_RETRY_DELAY)
        },
        Extra::CognitoMessage => Classified {
            message: message.map_or(classified.message.clone(), str::to_owned),
            ..classified
        },
        Extra::Misconfiguration => Classified {
            blame: Blame::Server,
            ..classified
        },
    }
}

/// The canonical name of a gRPC code, as Prometheus labels and logs show it (`OK`,
/// `RESOURCE_EXHAUSTED`, …).
pub(crate) fn grpc_code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

impl Classified {
    /// The status sent to the caller.
    pub(crate) fn into_status(self) -> Status {
        Status::with_error_details(self.code, self.message, self.details)
    }
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        error.classify().into_status()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service_error(code: &str, message: Option<&str>) -> Error {
        Error::Upstream(UpstreamError::Service {
            code: ErrorCode::parse(code),
            message: message.map(Into::into),
            request_id: Some("req-1".into()),
        })
    }

    /// The README's error table: (cause, gRPC code, reasons) per row.
    fn readme_rows() -> Vec<(String, String, Vec<String>)> {
        let readme = include_str!("../README.md");
        let table = readme
            .split("\n## Errors\n")
            .nth(1)
            .and_then(|section| section.split("**Enumeration protection**").next())
            .expect("the README's Errors section");
        table
            .lines()
            .filter(|line| line.starts_with("| ") && !line.starts_with("| cause"))
            .map(|line| {
                let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
                let code = cells[1].split_whitespace().next().unwrap_or_default();
                let reasons = cells[2]
                    .split('`')
                    .skip(1)
                    .step_by(2)
                    .map(str::to_owned)
                    .collect();
                (cells[0].to_owned(), code.to_owned(), reasons)
            })
            .collect()
    }

    /// A message of Cognito's for the row's error that makes it the row's answer: for
    /// NotAuthorizedException, an account's state (other causes are not the row's).
    fn account_state_message(row: &Row) -> Option<&'static str> {
        (row.cognito_code == ErrorCode::NotAuthorized).then_some("User is disabled.")
    }

    /// Every error the service can answer with, one of each kind.
    fn every_kind_of_error() -> Vec<Error> {
        let mut errors: Vec<Error> = COGNITO_ERRORS
            .iter()
            .map(|row| service_error(row.cognito_code.name(), account_state_message(row)))
            .collect();
        let http = |status| {
            Error::Upstream(UpstreamError::Http {
                status,
                request_id: None,
            })
        };
        errors.extend([
            service_error(
                "NotAuthorizedException",
                Some("Unable to verify secret hash for client abc"),
            ),
            service_error("NotAuthorizedException", Some("Something new.")),
            Error::InvalidRequest(vec![]),
            Error::ClientNotAllowed,
            Error::ClientMisconfigured {
                client: "billing".into(),
            },
            Error::CallerNotAllowed {
                caller: "spiffe://example.org/ns/web/sa/api".into(),
                lacks: Lacks::Client("support".into()),
            },
            service_error("BrandNewException", None),
            http(503),
            http(429),
            http(418),
            Error::Upstream(UpstreamError::Unreachable {
                before_connecting: true,
                detail: String::new(),
            }),
            Error::Upstream(UpstreamError::Timeout {
                set_by_caller: false,
            }),
            Error::Upstream(UpstreamError::Construction {
                detail: String::new(),
            }),
            Error::Upstream(UpstreamError::InvalidResponse(
                crate::cognito::InvalidResponse {
                    status: 200,
                    content_type: String::new(),
                    bytes: 0,
                    problem: "",
                },
            )),
            Error::MalformedRequest,
            Error::RequestIdReused,
            Error::RequestTooLarge { limit: 1 },
            Error::RateLimited(RateLimited {
                limiter: crate::limits::Limiter::Username,
                limit: "5/15m".into(),
                retry_after: Duration::from_secs(1),
            }),
            Error::CodeRefused { request_id: None },
            Error::Overloaded {
                limit: "MAX_CONCURRENT_CALLS",
            },
            Error::TakenBack {
                limit: "MAX_CONCURRENT_CALLS",
            },
            Error::RequestTimeout {
                limit: Duration::from_secs(10),
            },
            Error::DeadlineTooShort,
            Error::Cancelled,
            Error::Internal,
            Error::ShuttingDown,
        ]);
        errors
    }

    #[test]
    fn the_readmes_error_table_and_the_codes_agree() {
        let rows = readme_rows();
        for row in COGNITO_ERRORS {
            let short = row.cognito_code.name().trim_end_matches("Exception");
            let (_, code, reasons) = rows
                .iter()
                .find(|(cause, ..)| {
                    cause
                        .split([',', ' ', '('])
                        .any(|word| word == row.cognito_code.name() || word == short)
                })
                .unwrap_or_else(|| {
                    panic!("the README's table has no row for {}", row.cognito_code)
                });
            assert_eq!(code, grpc_code_name(row.code), "{}", row.cognito_code);
            assert!(
                reasons.iter().any(|r| r == row.reason.as_str_name()),
                "{}",
                row.cognito_code
            );
        }
        let mut answered = std::collections::BTreeSet::new();
        for error in every_kind_of_error() {
            let classified = error.classify();
            let reason = classified.reason.as_str_name();
            let (_, code, _) = rows
                .iter()
                .find(|(.., reasons)| reasons.iter().any(|r| r == reason))
                .unwrap_or_else(|| panic!("the README's table lacks {reason}"));
            assert_eq!(code, grpc_code_name(classified.code), "{reason}");
            answered.insert(reason.to_owned());
        }
        let documented: std::collections::BTreeSet<String> = rows
            .into_iter()
            .flat_map(|(.., reasons)| reasons)
            .filter(|r| r.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
            .collect();
        assert_eq!(
            documented, answered,
            "reasons documented but never answered, or the reverse"
        );
        assert_eq!(
            typed_reasons(),
            answered,
            "the proto's ErrorReason and the reasons answered differ: give every reason \
             answered its value in proto/passwordrecovery/v1/error_reason.proto, and answer \
             every value"
        );
    }

    /// The names of the proto's `ErrorReason` values, but the unspecified one, whose numbers
    /// run from 1 without a gap.
    fn typed_reasons() -> std::collections::BTreeSet<String> {
        let values: Vec<ErrorReason> = (1..)
            .map_while(|number| ErrorReason::try_from(number).ok())
            .collect();
        assert!(
            ErrorReason::try_from(values.len() as i32 + 2).is_err(),
            "ErrorReason's numbers have a gap"
        );
        assert_eq!(
            ErrorReason::Unspecified.as_str_name(),
            "ERROR_REASON_UNSPECIFIED"
        );
        values
            .iter()
            .map(|reason| reason.as_str_name().to_owned())
            .collect()
    }

    #[test]
    fn a_reason_is_the_name_of_its_error_reason_value() {
        for error in every_kind_of_error() {
            let classified = error.classify();
            let status: Status = error.into();
            let info = status.get_details_error_info().expect("ErrorInfo");
            assert_eq!(
                ErrorReason::from_str_name(&info.reason),
                Some(classified.reason),
                "{}",
                info.reason
            );
        }
    }

    #[test]
    fn every_row_of_the_table_answers_with_its_error_info() {
        for row in COGNITO_ERRORS {
            let message = account_state_message(row).unwrap_or("m");
            let status: Status = service_error(row.cognito_code.name(), Some(message)).into();
            assert_eq!(status.code(), row.code, "{}", row.cognito_code);
            let info = status.get_details_error_info().expect("ErrorInfo");
            assert_eq!(
                info.reason,
                row.reason.as_str_name(),
                "{}",
                row.cognito_code
            );
            assert_eq!(info.domain, ERROR_DOMAIN);
            assert_eq!(info.metadata["cognitoCode"], row.cognito_code.name());
            assert_eq!(info.metadata["awsRequestId"], "req-1");
        }
    }

    #[test]
    fn internal_rows_are_reason_of_the_name_without_exception() {
        for row in COGNITO_ERRORS.iter().filter(|r| r.code == Code::Internal) {
            let name = row.cognito_code.name().trim_end_matches("Exception");
            let mut snake = String::new();
            for (i, c) in name.chars().enumerate() {
                if c.is_uppercase() && i > 0 {
                    snake.push('_');
                }
                snake.push(c.to_ascii_uppercase());
            }
            assert_eq!(row.reason.as_str_name(), snake);
            let classified =
                service_error(row.cognito_code.name(), Some("pool xyz is gone")).classify();
            assert_eq!(classified.blame, Blame::Server);
            assert!(!classified.message.contains("xyz"), "caller learns no more");
        }
    }

    #[test]
    fn not_authorized_is_an_account_state_or_a_misconfiguration_by_its_message() {
        for (message, code, reason, blame) in [
            (
                "User is disabled.",
                Code::PermissionDenied,
                "NOT_AUTHORIZED",
                Blame::Caller,
            ),
            (
                "User password cannot be reset in the current state.",
                Code::PermissionDenied,
                "NOT_AUTHORIZED",
                Blame::Caller,
            ),
            (
                "Unable to verify secret hash for client 1example23456789",
                Code::Internal,
                "INVALID_SECRET_HASH",
                Blame::Server,
            ),
            (
                "Access denied.",
                Code::Internal,
                "UNEXPECTED_NOT_AUTHORIZED",
                Blame::Server,
            ),
        ] {
            let classified = service_error("NotAuthorizedException", Some(message)).classify();
            assert_eq!(
                (
                    classified.code,
                    classified.reason.as_str_name(),
                    classified.blame
                ),
                (code, reason, blame),
                "{message}"
            );
            assert!(
                !classified.message.contains("1example"),
                "the caller learns no more"
            );
        }
        let classified = service_error("NotAuthorizedException", None).classify();
        assert_eq!(classified.reason.as_str_name(), "UNEXPECTED_NOT_AUTHORIZED");
    }

    #[test]
    fn code_mismatch_points_at_the_confirmation_code() {
        let status: Status = service_error("CodeMismatchException", None).into();
        let bad = status.get_details_bad_request().expect("BadRequest");
        assert_eq!(bad.field_violations[0].field, "confirmation_code");
    }

    #[test]
    fn invalid_password_carries_cognitos_policy_text() {
        let policy = "Password does not conform to policy: Password not long enough";
        let status: Status = service_error("InvalidPasswordException", Some(policy)).into();
        let bad = status.get_details_bad_request().expect("BadRequest");
        assert_eq!(bad.field_violations[0].field, "password");
        assert_eq!(bad.field_violations[0].description, policy);
    }

    #[test]
    fn password_history_points_at_the_password() {
        let status: Status = service_error("PasswordHistoryPolicyViolationException", None).into();
        let bad = status.get_details_bad_request().expect("BadRequest");
        assert_eq!(bad.field_violations[0].field, "password");
    }

    #[test]
    fn throttling_says_when_to_retry() {
        let status: Status = service_error("TooManyRequestsException", None).into();
        let retry = status.get_details_retry_info().expect("RetryInfo");
        assert_eq!(retry.retry_delay, Some(THROTTLE_RETRY_DELAY));
    }

    #[test]
    fn lambda_validation_passes_the_triggers_message() {
        let status: Status = service_error(
            "UserLambdaValidationException",
            Some("CustomMessage failed: no"),
        )
        .into();
        assert_eq!(status.message(), "CustomMessage failed: no");
    }

    #[test]
    fn an_unknown_code_is_unknown_and_keeps_the_code() {
        let status: Status = service_error("BrandNewException", Some("x")).into();
        assert_eq!(status.code(), Code::Unknown);
        let info = status.get_details_error_info().unwrap();
        assert_eq!(info.reason, "UNKNOWN_UPSTREAM_ERROR");
        assert_eq!(info.metadata["cognitoCode"], "BrandNewException");
    }

    #[test]
    fn answers_without_a_code_fall_back_on_http_status() {
        let http = |status| {
            Status::from(Error::Upstream(UpstreamError::Http {
                status,
                request_id: None,
            }))
        };
        let s = http(503);
        assert_eq!(s.code(), Code::Unavailable);
        assert_eq!(s.get_details_error_info().unwrap().reason, "INTERNAL_ERROR");
        let s = http(429);
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert!(s.get_details_retry_info().is_some());
        assert_eq!(http(418).code(), Code::Unknown);
    }

    #[test]
    fn transport_failures_and_timeouts() {
        let s = Status::from(Error::Upstream(UpstreamError::Unreachable {
            before_connecting: true,
            detail: "refused".into(),
        }));
        assert_eq!(s.code(), Code::Unavailable);
        assert_eq!(
            s.get_details_error_info().unwrap().reason,
            "UPSTREAM_UNAVAILABLE"
        );
        let s = Status::from(Error::Upstream(UpstreamError::Timeout {
            set_by_caller: true,
        }));
        assert_eq!(s.code(), Code::DeadlineExceeded);
        assert_eq!(
            s.get_details_error_info().unwrap().reason,
            "UPSTREAM_TIMEOUT"
        );
    }

    #[test]
    fn rate_limits_say_which_limit_and_when_to_retry() {
        let status = Status::from(Error::RateLimited(RateLimited {
            limiter: crate::limits::Limiter::Username,
            limit: "5/15m".into(),
            retry_after: Duration::from_millis(179_500),
        }));
        assert_eq!(status.code(), Code::ResourceExhausted);
        let info = status.get_details_error_info().unwrap();
        assert_eq!(info.reason, "RATE_LIMITED");
        assert_eq!(info.metadata["limit"], "5/15m");
        assert_eq!(info.metadata["limiter"], "username");
        let retry = status.get_details_retry_info().unwrap();
        assert_eq!(retry.retry_delay, Some(Duration::from_millis(179_500)));
        let quota = status.get_details_quota_failure().unwrap();
        assert_eq!(quota.violations[0].subject, "username");
        assert!(status.message().contains("3m"), "{}", status.message());

        let status = Status::from(Error::Overloaded {
            limit: "MAX_CONCURRENT_CALLS_PER_PEER",
        });
        assert_eq!(status.code(), Code::Unavailable);
        let info = status.get_details_error_info().unwrap();
        assert_eq!(info.reason, "OVERLOADED");
        assert_eq!(info.metadata["limit"], "MAX_CONCURRENT_CALLS_PER_PEER");
        assert!(status.get_details_retry_info().is_some());
    }

    #[test]
    fn a_stalled_message_is_told_which_bound_it_ran_into_and_is_not_a_warning_each() {
        let classified = Error::TakenBack {
            limit: "MAX_CONCURRENT_CALLS",
        }
        .classify();
        assert_eq!(
            (classified.code, classified.reason.as_str_name()),
            (Code::Unavailable, "OVERLOADED")
        );
        assert_eq!(classified.blame, Blame::SlowCaller);
        let status = Error::RequestTimeout {
            limit: Duration::from_secs(10),
        }
        .classify()
        .into_status();
        assert_eq!(status.code(), Code::DeadlineExceeded);
        let info = status.get_details_error_info().unwrap();
        assert_eq!(info.reason, "REQUEST_TIMEOUT");
        assert_eq!(info.metadata["limit"], "10s");
        let short = Error::DeadlineTooShort.classify();
        assert_eq!(
            (short.code, short.reason.as_str_name()),
            (Code::DeadlineExceeded, "DEADLINE_TOO_SHORT")
        );
        assert!(short.message.contains("50 ms"), "{}", short.message);
    }

    #[test]
    fn local_failures_name_their_fields() {
        let s = Status::from(Error::InvalidRequest(vec![
            FieldViolation {
                field: "username".into(),
                description: "is required".into(),
            },
            FieldViolation {
                field: "password".into(),
                description: "is required".into(),
            },
        ]));
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(
            s.get_details_error_info().unwrap().reason,
            "INVALID_REQUEST"
        );
        let fields: Vec<_> = s
            .get_details_bad_request()
            .unwrap()
            .field_violations
            .into_iter()
            .map(|v| v.field)
            .collect();
        assert_eq!(fields, ["username", "password"]);
        let s = Status::from(Error::ClientNotAllowed);
        assert_eq!(s.code(), Code::PermissionDenied);
        assert_eq!(
            s.get_details_error_info().unwrap().reason,
            "CLIENT_NOT_ALLOWED"
        );
    }
}
