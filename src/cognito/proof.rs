//! The proof of an app client (README "Proving the app clients"): one unauthenticated
//! ForgotPassword for a fresh random username no user can have registered,
//! `probe-<uuid>@probe.password-recovery.invalid` (a random v4 UUID, in a domain RFC 2606
//! reserves so that no mailbox can exist), so it reaches no real user. Its answer says whether
//! the client works as configured, and how its pool answers for an unknown user: AWS, "When a
//! user isn't found, is deactivated, or doesn't have a verified delivery mechanism … Amazon
//! Cognito returns CodeDeliveryDetails with a simulated delivery medium" under
//! `PreventUserExistenceErrors=ENABLED`, and `UserNotFoundException` under `LEGACY`
//! (Managing user existence error responses, Amazon Cognito developer guide).

use std::time::Duration;

use tokio::time::Instant;

use super::{AppClient, Budget, ErrorCode, NotAuthorized, UpstreamError};
use crate::domain::{Account, CodeDelivery, ForgotPassword, PassThrough, Username};

/// The domain of every probe username.
pub const PROBE_DOMAIN: &str = "probe.password-recovery.invalid";
/// The `operation` label of a proof's request in `cognito_requests_total`.
pub(crate) const PROBE_OPERATION: &str = "ForgotPasswordProbe";

/// How a user pool answers a request for an unknown user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A simulated delivery (`PreventUserExistenceErrors=ENABLED`).
    Enabled,
    /// `UserNotFoundException` (`LEGACY`): the pool itself tells who exists.
    Legacy,
}

impl Mode {
    /// The setting's value, as AWS spells it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Enabled => "ENABLED",
            Self::Legacy => "LEGACY",
        }
    }
}

/// What a proof found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The client works, and its pool answers an unknown user so.
    Works(Mode),
    /// The client cannot work as configured: the cause (never the secret).
    Misconfigured(String),
    /// No verdict: Cognito could not be asked, or answered what says nothing of the client.
    Unproven(String),
}

impl Verdict {
    /// True when the client works.
    pub fn works(&self) -> bool {
        matches!(self, Self::Works(_))
    }

    /// Its name in log lines, metrics and the `check` command's output.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Works(_) => "ready",
            Self::Misconfigured(_) => "misconfigured",
            Self::Unproven(_) => "unproven",
        }
    }

    /// The verdict on `answer`, a proof's answer.
    pub(crate) fn of(answer: &Result<CodeDelivery, UpstreamError>) -> Self {
        let error = match answer {
            Ok(_) => return Self::Works(Mode::Enabled),
            Err(error) => error,
        };
        let (code, message) = match error {
            UpstreamError::Service { code, message, .. } => (code, message.as_deref()),
            UpstreamError::Timeout { .. } => {
                return Self::Unproven("no answer within the client's timeout".into());
            }
            UpstreamError::Unreachable { detail, .. } => {
                return Self::Unproven(format!("Cognito could not be reached: {detail}"));
            }
            UpstreamError::Http { status, .. } => {
                return Self::Unproven(format!("HTTP {status} without an error code"));
            }
            UpstreamError::InvalidResponse(_) => {
                return Self::Unproven("an answer that is not Cognito's".into());
            }
            UpstreamError::Construction { detail } => {
                return Self::Unproven(format!("the SDK could not build the request: {detail}"));
            }
        };
        let said = |what: &str| format!("{what} ({}: {})", code.name(), message.unwrap_or("-"));
        match code {
            ErrorCode::UserNotFound => Self::Works(Mode::Legacy),
            ErrorCode::ResourceNotFound => Self::Misconfigured(said(
                "Cognito knows no such app client or user pool in this region",
            )),
            ErrorCode::NotAuthorized => match NotAuthorized::of(message) {
                NotAuthorized::SecretHash => Self::Misconfigured(said(
                    "the client secret is wrong: Cognito cannot verify the secret hash",
                )),
                // An answer only an existing account gives: a user has the probe's name.
                NotAuthorized::Disabled | NotAuthorized::CannotReset => {
                    Self::Unproven(said("an answer only an existing account gives"))
                }
                NotAuthorized::Unrecognised
                    if message.is_some_and(|m| m.to_lowercase().contains("secret")) =>
                {
                    Self::Misconfigured(said("the client secret is missing or wrong"))
                }
                NotAuthorized::Unrecognised => {
                    Self::Misconfigured(said("Cognito does not let this client reset passwords"))
                }
            },
            ErrorCode::TooManyRequests | ErrorCode::InternalError | ErrorCode::LimitExceeded => {
                Self::Unproven(said("Cognito could not answer now"))
            }
            _ => Self::Unproven(said("an answer a proof does not expect")),
        }
    }
}

/// A fresh probe username: `probe-<uuid>@probe.password-recovery.invalid`.
pub(crate) fn probe_username() -> Username {
    let name = format!("probe-{}@{PROBE_DOMAIN}", uuid::Uuid::new_v4());
    Username::parse("username", name).expect("a probe username is a valid username")
}

/// What a proof found, and how long it took.
#[derive(Debug, Clone)]
pub struct Proven {
    /// The client's alias.
    pub alias: String,
    /// The verdict.
    pub verdict: Verdict,
    /// How long Cognito took (retries included).
    pub latency: Duration,
}

impl Proven {
    /// One line: alias, verdict, mode, latency, and the cause unless it works.
    pub fn line(&self) -> String {
        let mode = match &self.verdict {
            Verdict::Works(mode) => mode.name(),
            _ => "-",
        };
        let mut line = format!(
            "client={} verdict={} prevent_user_existence_errors={mode} latency={}ms",
            self.alias,
            self.verdict.name(),
            self.latency.as_millis()
        );
        if let Verdict::Misconfigured(cause) | Verdict::Unproven(cause) = &self.verdict {
            line.push_str(&format!(" cause={cause:?}"));
        }
        line
    }
}

impl AppClient {
    /// Proves this client once, within its timeout and `within`.
    pub(crate) async fn prove(&self, within: Duration) -> Proven {
        let request = ForgotPassword {
            account: Account {
                username: probe_username(),
                client_id: None,
            },
            request_id: None,
            pass_through: PassThrough::default(),
        };
        let started = Instant::now();
        let budget = Budget::new(started, self.timeout.min(within), None);
        let answer = self
            .send_forgot_password(PROBE_OPERATION, &request, budget)
            .await;
        Proven {
            alias: self.alias.clone(),
            verdict: Verdict::of(&answer),
            latency: started.elapsed(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(code: &str, message: &str) -> Result<CodeDelivery, UpstreamError> {
        Err(UpstreamError::Service {
            code: ErrorCode::parse(code),
            message: Some(message.to_owned()),
            request_id: None,
        })
    }

    #[test]
    fn every_answer_shape_has_its_verdict() {
        let delivered = Ok(CodeDelivery {
            destination: "p***@p***".into(),
            medium: crate::domain::DeliveryMedium::Email,
            attribute_name: "email".into(),
        });
        assert_eq!(Verdict::of(&delivered), Verdict::Works(Mode::Enabled));
        let not_found = service(
            "UserNotFoundException",
            "Username/client id combination not found.",
        );
        assert_eq!(Verdict::of(&not_found), Verdict::Works(Mode::Legacy));
        for (code, message, verdict) in [
            (
                "ResourceNotFoundException",
                "User pool client x does not exist.",
                "misconfigured",
            ),
            (
                "NotAuthorizedException",
                "Unable to verify secret hash for client x",
                "misconfigured",
            ),
            (
                "NotAuthorizedException",
                "Client x is configured for secret but secret was not received",
                "misconfigured",
            ),
            (
                "NotAuthorizedException",
                "Cannot reset password for the user.",
                "misconfigured",
            ),
            ("NotAuthorizedException", "User is disabled.", "unproven"),
            ("TooManyRequestsException", "Rate exceeded", "unproven"),
            ("InternalErrorException", "", "unproven"),
            ("SomethingNewException", "", "unproven"),
        ] {
            let found = Verdict::of(&service(code, message));
            assert_eq!(found.name(), verdict, "{code}: {message}");
            let (Verdict::Misconfigured(cause) | Verdict::Unproven(cause)) = &found else {
                panic!("{found:?}");
            };
            assert!(cause.contains(code), "{cause}");
        }
        for error in [
            UpstreamError::Timeout {
                set_by_caller: false,
            },
            UpstreamError::Unreachable {
                before_connecting: true,
                detail: "refused".into(),
            },
            UpstreamError::Http {
                status: 503,
                request_id: None,
            },
        ] {
            assert_eq!(Verdict::of(&Err(error)).name(), "unproven");
        }
    }

    #[test]
    fn a_probe_username_is_fresh_and_can_belong_to_nobody() {
        let (one, two) = (probe_username(), probe_username());
        assert_ne!(one.as_str(), two.as_str());
        assert!(one.as_str().starts_with("probe-"), "{}", one.as_str());
        assert!(one.as_str().ends_with("@probe.password-recovery.invalid"));
    }
}
