//! The one way a call fails: [`Error`], and its conversion to a `tonic::Status` carrying
//! exactly one `google.rpc.ErrorInfo` (AIP-193). [`COGNITO_ERRORS`] is the table of
//! README "Errors": every Cognito error code and the gRPC code, reason and details it becomes.

use std::collections::HashMap;
use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation as ProtoFieldViolation, StatusExt};

use crate::cognito::{NotAuthorized, UpstreamError};
use crate::domain::FieldViolation;
use crate::limits::{OVERLOAD_RETRY_DELAY, RateLimited};

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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Row {
    /// Cognito's exception name.
    pub cognito_code: &'static str,
    /// The gRPC status code.
    pub code: Code,
    /// The ErrorInfo reason.
    pub reason: &'static str,
    /// The status message (unless `extra` says Cognito's message replaces it).
    pub message: &'static str,
    /// Further details.
    pub extra: Extra,
}

const fn row(
    cognito_code: &'static str,
    code: Code,
    reason: &'static str,
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
    row("CodeMismatchException", Code::InvalidArgument, "CODE_MISMATCH", "the confirmation code is not correct", Extra::BadField("confirmation_code")),
    row("ExpiredCodeException", Code::FailedPrecondition, "EXPIRED_CODE", "the confirmation code has expired; request a new one with ForgotPassword", Extra::None),
    row("InvalidPasswordException", Code::InvalidArgument, "INVALID_PASSWORD", "the password does not satisfy the user pool's password policy", Extra::BadFieldCognitoMessage("password")),
    row("PasswordHistoryPolicyViolationException", Code::InvalidArgument, "PASSWORD_HISTORY_POLICY_VIOLATION", "the password was used recently by this user; choose another", Extra::BadField("password")),
    row("UserNotFoundException", Code::NotFound, "USER_NOT_FOUND", "no such user", Extra::None),
    row("UserNotConfirmedException", Code::FailedPrecondition, "USER_NOT_CONFIRMED", "the user has not confirmed their account", Extra::None),
    row("InvalidParameterException", Code::FailedPrecondition, "INVALID_PARAMETER", "the account cannot be recovered in its current state (for example, it has no verified email or phone number)", Extra::None),
    row("NotAuthorizedException", Code::PermissionDenied, "NOT_AUTHORIZED", "Cognito refused the reset in this account's state (disabled, or a password that must be changed first)", Extra::None),
    row("ForbiddenException", Code::PermissionDenied, "FORBIDDEN", "the user pool's web ACL blocked the request", Extra::None),
    row("LimitExceededException", Code::ResourceExhausted, "LIMIT_EXCEEDED", "the attempt limit for this user was exceeded; try again later", Extra::None),
    row("TooManyFailedAttemptsException", Code::ResourceExhausted, "TOO_MANY_FAILED_ATTEMPTS", "too many failed attempts for this user; try again later", Extra::None),
    row("TooManyRequestsException", Code::ResourceExhausted, "TOO_MANY_REQUESTS", "Cognito is throttling requests; retry shortly", Extra::RetryAfterThrottle),
    row("CodeDeliveryFailureException", Code::Unavailable, "CODE_DELIVERY_FAILURE", "Cognito could not deliver the confirmation code", Extra::None),
    row("UserLambdaValidationException", Code::FailedPrecondition, "USER_LAMBDA_VALIDATION", "a user pool Lambda trigger refused the request", Extra::CognitoMessage),
    row("OperationNotEnabledException", Code::FailedPrecondition, "OPERATION_NOT_ENABLED", "this operation is not enabled for the user pool", Extra::None),
    row("ResourceNotFoundException", Code::Internal, "RESOURCE_NOT_FOUND", MISCONFIGURED, Extra::Misconfiguration),
    row("InvalidEmailRoleAccessPolicyException", Code::Internal, "INVALID_EMAIL_ROLE_ACCESS_POLICY", MISCONFIGURED, Extra::Misconfiguration),
    row("InvalidSmsRoleAccessPolicyException", Code::Internal, "INVALID_SMS_ROLE_ACCESS_POLICY", MISCONFIGURED, Extra::Misconfiguration),
    row("InvalidSmsRoleTrustRelationshipException", Code::Internal, "INVALID_SMS_ROLE_TRUST_RELATIONSHIP", MISCONFIGURED, Extra::Misconfiguration),
    row("InvalidLambdaResponseException", Code::Internal, "INVALID_LAMBDA_RESPONSE", MISCONFIGURED, Extra::Misconfiguration),
    row("UnexpectedLambdaException", Code::Internal, "UNEXPECTED_LAMBDA", MISCONFIGURED, Extra::Misconfiguration),
    row("InternalErrorException", Code::Unavailable, "INTERNAL_ERROR", "Cognito had an internal error; retry later", Extra::None),
];

/// Looks up a Cognito error code in [`COGNITO_ERRORS`].
pub(crate) fn cognito_row(cognito_code: &str) -> Option<&'static Row> {
    COGNITO_ERRORS
        .iter()
        .find(|r| r.cognito_code == cognito_code)
}

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Error {
    /// The request broke Cognito's documented limits; Cognito was not called.
    InvalidRequest(Vec<FieldViolation>),
    /// The request named an app client this server does not serve.
    ClientNotAllowed,
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
    /// This service's own set-up.
    Server,
}

/// An [`Error`] decided: everything its status and log line need.
#[derive(Debug, Clone)]
pub(crate) struct Classified {
    /// The gRPC code.
    pub(crate) code: Code,
    /// The ErrorInfo reason.
    pub(crate) reason: &'static str,
    /// The status message.
    pub(crate) message: String,
    /// Who is to blame.
    pub(crate) blame: Blame,
    details: ErrorDetails,
}

impl Error {
    /// Decides the status, reason and details of this error.
    pub(crate) fn classify(&self) -> Classified {
        let mut metadata = HashMap::new();
        let mut details = ErrorDetails::new();
        let (code, reason, message, blame) = match self {
            Self::InvalidRequest(violations) => {
                details.set_bad_request(
                    violations
                        .iter()
                        .map(|v| ProtoFieldViolation::new(&v.field, &v.description))
                        .collect::<Vec<_>>(),
                );
                let summary = violations
                    .iter()
                    .map(|v| format!("{} {}", v.field, v.description))
                    .collect::<Vec<_>>()
                    .join("; ");
                (
                    Code::InvalidArgument,
                    "INVALID_REQUEST",
                    format!("invalid request: {summary}"),
                    Blame::Caller,
                )
            }
            Self::ClientNotAllowed => (
                Code::PermissionDenied,
                "CLIENT_NOT_ALLOWED",
                "client_id is not an app client this server serves; leave it empty for the \
                 configured one"
                    .to_owned(),
                Blame::Caller,
            ),
            Self::Upstream(upstream) => classify_upstream(upstream, &mut metadata, &mut details),
            Self::CodeRefused { request_id } => {
                metadata.insert("cognitoCode".into(), "CodeMismatchException".into());
                if let Some(id) = request_id {
                    metadata.insert("awsRequestId".into(), id.clone());
                }
                details.add_bad_request_violation("confirmation_code", CODE_REFUSED);
                (
                    Code::InvalidArgument,
                    "CODE_MISMATCH",
                    CODE_REFUSED.into(),
                    Blame::Caller,
                )
            }
            Self::RateLimited(refused) => {
                let limiter = refused.limiter.name();
                metadata.insert("limit".into(), refused.limit.clone());
                metadata.insert("limiter".into(), limiter.into());
                details.set_retry_info(Some(refused.retry_after));
                details.add_quota_failure_violation(
                    limiter,
                    format!("at most {} calls ({limiter} limit)", refused.limit),
                );
                (
                    Code::ResourceExhausted,
                    "RATE_LIMITED",
                    format!(
                        "rate limited ({limiter} limit {}); retry in {}",
                        refused.limit,
                        humantime::format_duration(Duration::from_secs(
                            refused.retry_after.as_secs_f64().ceil() as u64
                        ))
                    ),
                    Blame::Caller,
                )
            }
            Self::Overloaded { limit } => {
                metadata.insert("limit".into(), (*limit).into());
                details.set_retry_info(Some(OVERLOAD_RETRY_DELAY));
                (
                    Code::Unavailable,
                    "OVERLOADED",
                    format!(
                        "too many calls are in progress or waiting on Cognito ({limit}); retry shortly"
                    ),
                    Blame::Upstream,
                )
            }
            Self::TakenBack { limit } => {
                metadata.insert("limit".into(), (*limit).into());
                details.set_retry_info(Some(OVERLOAD_RETRY_DELAY));
                (
                    Code::Unavailable,
                    "OVERLOADED",
                    format!(
                        "the request message was still arriving when its place among the calls \
                         in progress ({limit}) was needed by a new call; retry shortly"
                    ),
                    Blame::SlowCaller,
                )
            }
            Self::RequestTimeout { limit } => {
                let limit = humantime::format_duration(*limit).to_string();
                metadata.insert("limit".into(), limit.clone());
                (
                    Code::DeadlineExceeded,
                    "REQUEST_TIMEOUT",
                    format!("the request message did not arrive within {limit} of its headers"),
                    Blame::SlowCaller,
                )
            }
            Self::DeadlineTooShort => (
                Code::DeadlineExceeded,
                "DEADLINE_TOO_SHORT",
                format!(
                    "the call's deadline left less than {} ms to reach Cognito; it was not sent",
                    crate::cognito::MIN_UPSTREAM_TIME.as_millis()
                ),
                Blame::Caller,
            ),
            Self::MalformedRequest => (
                Code::InvalidArgument,
                "MALFORMED_REQUEST",
                "the request message could not be decoded".into(),
                Blame::Caller,
            ),
            Self::Cancelled => (
                Code::Cancelled,
                "CANCELLED",
                "the call was cancelled before it reached Cognito".into(),
                Blame::Caller,
            ),
            Self::Internal => (
                Code::Internal,
                "INTERNAL_FAULT",
                "the password-recovery service failed; its operators have been told in its \
                 logs"
                    .into(),
                Blame::Server,
            ),
            Self::ShuttingDown => {
                details.set_retry_info(Some(OVERLOAD_RETRY_DELAY));
                (
                    Code::Unavailable,
                    "SHUTTING_DOWN",
                    "this replica stopped before the call finished; its outcome is unknown".into(),
                    Blame::Upstream,
                )
            }
            Self::RequestTooLarge { limit } => {
                metadata.insert("limit".into(), limit.to_string());
                (
                    Code::ResourceExhausted,
                    "REQUEST_TOO_LARGE",
                    format!("the request message is larger than {limit} bytes"),
                    Blame::Caller,
                )
            }
        };
        details.set_error_info(reason, ERROR_DOMAIN, metadata);
        Classified {
            code,
            reason,
            message,
            blame,
            details,
        }
    }
}

fn classify_upstream(
    error: &UpstreamError,
    metadata: &mut HashMap<String, String>,
    details: &mut ErrorDetails,
) -> (Code, &'static str, String, Blame) {
    match error {
        UpstreamError::Service {
            code: cognito_code,
            message: cognito_message,
            request_id,
        } => {
            metadata.insert("cognitoCode".into(), cognito_code.clone());
            if let Some(id) = request_id {
                metadata.insert("awsRequestId".into(), id.clone());
            }
            if cognito_code == "NotAuthorizedException" {
                // A bad secret hash, or a cause Cognito does not say, is this service's
                // set-up: never the caller's, never an account's state.
                let reason = match NotAuthorized::of(cognito_message.as_deref()) {
                    NotAuthorized::SecretHash => Some("INVALID_SECRET_HASH"),
                    NotAuthorized::Unrecognised => Some("UNEXPECTED_NOT_AUTHORIZED"),
                    NotAuthorized::Disabled | NotAuthorized::CannotReset => None,
                };
                if let Some(reason) = reason {
                    return (Code::Internal, reason, MISCONFIGURED.into(), Blame::Server);
                }
            }
            let Some(row) = cognito_row(cognito_code) else {
                return (
                    Code::Unknown,
                    "UNKNOWN_UPSTREAM_ERROR",
                    "Cognito answered with an error this service does not know".into(),
                    Blame::Server,
                );
            };
            let cognito_message = cognito_message.as_deref().filter(|m| !m.is_empty());
            let mut message = row.message.to_owned();
            let mut blame = match row.code {
                Code::Unavailable => Blame::Upstream,
                _ => Blame::Caller,
            };
            match row.extra {
                Extra::None => {}
                Extra::BadField(field) => {
                    details.add_bad_request_violation(field, row.message);
                }
                Extra::BadFieldCognitoMessage(field) => {
                    details
                        .add_bad_request_violation(field, cognito_message.unwrap_or(row.message));
                }
                Extra::RetryAfterThrottle => {
                    details.set_retry_info(Some(THROTTLE_RETRY_DELAY));
                    blame = Blame::Upstream;
                }
                Extra::CognitoMessage => {
                    if let Some(text) = cognito_message {
                        message = text.to_owned();
                    }
                }
                Extra::Misconfiguration => blame = Blame::Server,
            }
            (row.code, row.reason, message, blame)
        }
        UpstreamError::Http { status, request_id } => {
            metadata.insert("httpStatus".into(), status.to_string());
            if let Some(id) = request_id {
                metadata.insert("awsRequestId".into(), id.clone());
            }
            match status {
                500..=599 => (
                    Code::Unavailable,
                    "INTERNAL_ERROR",
                    "Cognito had an internal error; retry later".into(),
                    Blame::Upstream,
                ),
                429 => {
                    details.set_retry_info(Some(THROTTLE_RETRY_DELAY));
                    (
                        Code::ResourceExhausted,
                        "TOO_MANY_REQUESTS",
                        "Cognito is throttling requests; retry shortly".into(),
                        Blame::Upstream,
                    )
                }
                _ => (
                    Code::Unknown,
                    "UNKNOWN_UPSTREAM_ERROR",
                    format!("Cognito answered HTTP {status} with no error code"),
                    Blame::Server,
                ),
            }
        }
        UpstreamError::Unreachable { .. } => (
            Code::Unavailable,
            "UPSTREAM_UNAVAILABLE",
            "Cognito could not be reached".into(),
            Blame::Upstream,
        ),
        UpstreamError::Timeout { set_by_caller } => (
            Code::DeadlineExceeded,
            "UPSTREAM_TIMEOUT",
            if *set_by_caller {
                "the call's deadline ran out while waiting for Cognito".into()
            } else {
                "Cognito did not answer within COGNITO_TIMEOUT".into()
            },
            Blame::Upstream,
        ),
        UpstreamError::Construction { .. } => (
            Code::Internal,
            "REQUEST_CONSTRUCTION_FAILED",
            MISCONFIGURED.into(),
            Blame::Server,
        ),
        UpstreamError::InvalidResponse(invalid) => {
            metadata.insert("httpStatus".into(), invalid.status.to_string());
            (
                Code::Unavailable,
                "UPSTREAM_INVALID_RESPONSE",
                "Cognito's answer was not a well-formed Cognito answer".into(),
                Blame::Server,
            )
        }
    }
}

/// The canonical name of a gRPC code, as Prometheus labels and logs show it (`OK`,
/// `RESOURCE_EXHAUSTED`, …).
pub(crate) fn code_name(code: Code) -> &'static str {
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
            code: code.into(),
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
        (row.cognito_code == "NotAuthorizedException").then_some("User is disabled.")
    }

    /// Every error the service can answer with, one of each kind.
    fn every_kind_of_error() -> Vec<Error> {
        let mut errors: Vec<Error> = COGNITO_ERRORS
            .iter()
            .map(|row| service_error(row.cognito_code, account_state_message(row)))
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
            let short = row.cognito_code.trim_end_matches("Exception");
            let (_, code, reasons) = rows
                .iter()
                .find(|(cause, ..)| {
                    cause
                        .split([',', ' ', '('])
                        .any(|word| word == row.cognito_code || word == short)
                })
                .unwrap_or_else(|| {
                    panic!("the README's table has no row for {}", row.cognito_code)
                });
            assert_eq!(code, code_name(row.code), "{}", row.cognito_code);
            assert!(
                reasons.iter().any(|r| r == row.reason),
                "{}",
                row.cognito_code
            );
        }
        let mut answered = std::collections::BTreeSet::new();
        for error in every_kind_of_error() {
            let classified = error.classify();
            let (_, code, _) = rows
                .iter()
                .find(|(.., reasons)| reasons.iter().any(|r| r == classified.reason))
                .unwrap_or_else(|| panic!("the README's table lacks {}", classified.reason));
            assert_eq!(code, code_name(classified.code), "{}", classified.reason);
            answered.insert(classified.reason.to_owned());
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
    }

    #[test]
    fn every_row_of_the_table_answers_with_its_error_info() {
        for row in COGNITO_ERRORS {
            let message = account_state_message(row).unwrap_or("m");
            let status: Status = service_error(row.cognito_code, Some(message)).into();
            assert_eq!(status.code(), row.code, "{}", row.cognito_code);
            let info = status.get_details_error_info().expect("ErrorInfo");
            assert_eq!(info.reason, row.reason, "{}", row.cognito_code);
            assert_eq!(info.domain, ERROR_DOMAIN);
            assert_eq!(info.metadata["cognitoCode"], row.cognito_code);
            assert_eq!(info.metadata["awsRequestId"], "req-1");
        }
    }

    #[test]
    fn internal_rows_are_reason_of_the_name_without_exception() {
        for row in COGNITO_ERRORS.iter().filter(|r| r.code == Code::Internal) {
            let name = row.cognito_code.trim_end_matches("Exception");
            let mut snake = String::new();
            for (i, c) in name.chars().enumerate() {
                if c.is_uppercase() && i > 0 {
                    snake.push('_');
                }
                snake.push(c.to_ascii_uppercase());
            }
            assert_eq!(row.reason, snake);
            let classified = service_error(row.cognito_code, Some("pool xyz is gone")).classify();
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
                (classified.code, classified.reason, classified.blame),
                (code, reason, blame),
                "{message}"
            );
            assert!(
                !classified.message.contains("1example"),
                "the caller learns no more"
            );
        }
        let classified = service_error("NotAuthorizedException", None).classify();
        assert_eq!(classified.reason, "UNEXPECTED_NOT_AUTHORIZED");
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
            (classified.code, classified.reason),
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
            (short.code, short.reason),
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
