//! The upstream: Cognito's `ForgotPassword` and `ConfirmForgotPassword` through the AWS SDK.
//! Owns the SDK client, the app client's `SECRET_HASH`, the retry policy and the time bound of
//! one upstream call, and turns every SDK failure into an [`UpstreamError`] that carries no SDK
//! type. Both operations are unauthenticated (the SDK sends them unsigned), so no AWS
//! credentials are loaded and the instance-metadata service is never asked for anything.
//! Under the SDK, [`response`] reads every answer with a cap and refuses malformed ones.

mod response;

use std::borrow::Cow;
use std::future::Future;
use std::time::Duration;

use aws_config::meta::region::RegionProviderChain;
use aws_config::retry::RetryConfig;
use aws_config::stalled_stream_protection::StalledStreamProtectionConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_cognitoidentityprovider::Client;
use aws_sdk_cognitoidentityprovider::config::http::HttpResponse;
use aws_sdk_cognitoidentityprovider::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_cognitoidentityprovider::operation::RequestId;
use aws_sdk_cognitoidentityprovider::types::{
    AnalyticsMetadataType, CodeDeliveryDetailsType, DeliveryMediumType, UserContextDataType,
};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use rand::Rng;
use secrecy::{ExposeSecret, SecretString};
use tokio::time::Instant;

use crate::config::ConfigError;
use crate::domain::{
    ClientId, CodeDelivery, ConfirmForgotPassword, DeliveryMedium, ForgotPassword, PassThrough,
    Rpc, Username,
};
use crate::metrics as m;

pub(crate) use response::InvalidResponse;

/// At most this many attempts per call, the first included.
const MAX_ATTEMPTS: u32 = 3;
/// The first retry waits up to this long; each later one twice as long.
const INITIAL_BACKOFF: Duration = Duration::from_millis(50);
/// The error code of Cognito's account-wide throttling: the request was not processed.
const TOO_MANY_REQUESTS: &str = "TooManyRequestsException";
/// The longest `Destination` or `AttributeName` accepted from Cognito, in characters. Real
/// ones are masked addresses and attribute names, a few dozen characters at most.
const MAX_DELIVERY_FIELD_CHARS: usize = 256;

/// `Base64(HMAC_SHA256(key = client_secret, msg = username + client_id))`, the `SECRET_HASH`
/// Cognito requires from app clients that have a secret.
pub fn secret_hash(client_secret: &SecretString, username: &str, client_id: &str) -> String {
    BASE64.encode(crate::privacy::hmac(
        client_secret.expose_secret().as_bytes(),
        &[username.as_bytes(), client_id.as_bytes()],
    ))
}

/// When the upstream call must have finished, retries included.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Budget {
    /// The instant the call is abandoned.
    pub(crate) deadline: Instant,
    /// True when the caller's deadline, not `COGNITO_TIMEOUT`, set `deadline`.
    pub(crate) set_by_caller: bool,
}

impl Budget {
    /// The earlier of `now + timeout` and the caller's deadline less a margin of
    /// min(50 ms, 10 %), so the service answers before the caller's own deadline fires.
    pub(crate) fn new(now: Instant, timeout: Duration, caller_timeout: Option<Duration>) -> Self {
        let caller = caller_timeout
            .map(|t| t.saturating_sub(Duration::from_millis(50).min(t / 10)))
            .filter(|t| *t < timeout);
        match caller {
            Some(t) => Self {
                deadline: now + t,
                set_by_caller: true,
            },
            None => Self {
                deadline: now + timeout,
                set_by_caller: false,
            },
        }
    }
}

/// Why an upstream call failed, in terms independent of the SDK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum UpstreamError {
    /// Cognito answered with an error code, e.g. `CodeMismatchException`.
    Service {
        /// The exception name.
        code: String,
        /// Cognito's message, if any.
        message: Option<String>,
        /// Cognito's request id, if any.
        request_id: Option<String>,
    },
    /// Cognito answered with no usable error code.
    Http {
        /// The HTTP status of the answer.
        status: u16,
        /// Cognito's request id, if any.
        request_id: Option<String>,
    },
    /// No answer: the connection failed or broke.
    Unreachable {
        /// True when the connection was never made, so Cognito cannot have processed the call.
        before_connecting: bool,
        /// The transport's own description (no request data in it).
        detail: String,
    },
    /// The budget ran out before Cognito answered.
    Timeout {
        /// True when the caller's deadline set the budget.
        set_by_caller: bool,
    },
    /// The SDK could not build the request: a fault of this service.
    Construction {
        /// The SDK's description.
        detail: String,
    },
    /// An answer that is not a well-formed Cognito answer (HTML from a proxy, an oversized
    /// body, a success that does not parse): never taken for a success, never retried.
    InvalidResponse(InvalidResponse),
}

impl UpstreamError {
    /// True only when Cognito certainly did not process the call, so it is safe to send
    /// again: throttling, or a connection that was never made.
    pub(crate) fn is_retryable(&self) -> bool {
        match self {
            Self::Service { code, .. } => code == TOO_MANY_REQUESTS,
            Self::Http { status: 429, .. } => true,
            Self::Unreachable {
                before_connecting, ..
            } => *before_connecting,
            _ => false,
        }
    }

    /// The metrics label of this failure: Cognito's error code, or what went wrong without one.
    /// A code that is not a plain exception name is not used as a label.
    pub(crate) fn outcome(&self) -> Cow<'static, str> {
        match self {
            Self::Service { code, .. }
                if code.len() <= 64 && code.bytes().all(|b| b.is_ascii_alphanumeric()) =>
            {
                Cow::Owned(code.clone())
            }
            Self::Service { .. } => Cow::Borrowed("malformed_code"),
            Self::Http { status, .. } => Cow::Owned(format!("http_{status}")),
            Self::Unreachable { .. } => Cow::Borrowed("unreachable"),
            Self::Timeout { .. } => Cow::Borrowed("timeout"),
            Self::Construction { .. } => Cow::Borrowed("construction_failure"),
            Self::InvalidResponse(_) => Cow::Borrowed("invalid_response"),
        }
    }

    /// The Cognito exception name, if Cognito gave one.
    pub(crate) fn cognito_code(&self) -> Option<&str> {
        match self {
            Self::Service { code, .. } => Some(code),
            _ => None,
        }
    }

    fn from_sdk<E>(err: SdkError<E, HttpResponse>) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let request_id = err.request_id().map(str::to_owned);
        match &err {
            SdkError::ServiceError(service) => match service.err().code() {
                Some(code) if !code.is_empty() => Self::Service {
                    code: code.to_owned(),
                    message: service.err().message().map(str::to_owned),
                    request_id,
                },
                _ => Self::Http {
                    status: service.raw().status().as_u16(),
                    request_id,
                },
            },
            // An error status whose body the SDK could not parse (SDK 1.144 and later; earlier
            // ones gave a service error without a code): judged by its status alone.
            SdkError::ResponseError(response) if !response.raw().status().is_success() => {
                Self::Http {
                    status: response.raw().status().as_u16(),
                    request_id,
                }
            }
            // A success the SDK could not parse.
            SdkError::ResponseError(response) => {
                let raw = response.raw();
                Self::InvalidResponse(InvalidResponse {
                    status: raw.status().as_u16(),
                    content_type: response::printable(
                        raw.headers().get("content-type").unwrap_or_default(),
                    ),
                    bytes: raw.body().bytes().map_or(0, <[u8]>::len),
                    problem: "an answer the SDK could not parse",
                })
            }
            SdkError::TimeoutError(_) => Self::Timeout {
                set_by_caller: false,
            },
            SdkError::DispatchFailure(failure) if failure.is_timeout() => Self::Timeout {
                set_by_caller: false,
            },
            SdkError::DispatchFailure(_) if let Some(invalid) = invalid_response(&err) => {
                Self::InvalidResponse(invalid.clone())
            }
            SdkError::DispatchFailure(_) => Self::Unreachable {
                before_connecting: failed_to_connect(&err),
                detail: DisplayErrorContext(&err).to_string(),
            },
            _ => Self::Construction {
                detail: DisplayErrorContext(&err).to_string(),
            },
        }
    }
}

/// The guard's verdict on the answer, if the error chain holds one.
fn invalid_response<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a InvalidResponse> {
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(invalid) = e.downcast_ref::<InvalidResponse>() {
            return Some(invalid);
        }
        current = e.source();
    }
    None
}

/// True when the error chain holds hyper's "could not connect" (refused, DNS, TLS handshake).
fn failed_to_connect(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(err);
    while let Some(e) = current {
        if e.downcast_ref::<hyper_util::client::legacy::Error>()
            .is_some_and(hyper_util::client::legacy::Error::is_connect)
        {
            return true;
        }
        current = e.source();
    }
    false
}

/// The app client this server acts as.
#[derive(Debug, Clone)]
pub(crate) struct AppClient {
    /// Its id.
    pub(crate) id: ClientId,
    /// Its secret, when it has one.
    pub(crate) secret: Option<SecretString>,
}

impl AppClient {
    fn secret_hash(&self, username: &Username) -> Option<String> {
        self.secret
            .as_ref()
            .map(|secret| secret_hash(secret, username.as_str(), self.id.as_str()))
    }
}

/// The upstream: region, endpoint, app client and time bound.
#[derive(Debug)]
pub struct CognitoSettings {
    /// The only app client this server serves.
    pub client_id: ClientId,
    /// The app client's secret, when it has one.
    pub client_secret: Option<SecretString>,
    /// Bound on one upstream call, retries included.
    pub timeout: Duration,
    /// `AWS_REGION`; when absent the profile's region is used.
    pub region: Option<String>,
    /// `AWS_ENDPOINT_URL`: the SDK's standard endpoint override, e.g. an emulator.
    pub endpoint_url: Option<String>,
}

/// A Cognito client bound to one app client.
#[derive(Debug, Clone)]
pub(crate) struct Cognito {
    sdk: Client,
    app_client: AppClient,
}

impl Cognito {
    /// Builds the SDK client: region from the settings, `AWS_REGION` or the AWS profile (never
    /// the instance-metadata service), no credentials, no SDK retries (see [`Self::call`]).
    pub(crate) async fn connect(settings: &CognitoSettings) -> Result<Self, ConfigError> {
        let region = RegionProviderChain::first_try(settings.region.clone().map(Region::new))
            .or_else(aws_config::environment::EnvironmentVariableRegionProvider::new())
            .or_else(aws_config::profile::ProfileFileRegionProvider::new())
            .region()
            .await
            .ok_or_else(|| {
                ConfigError::setting(
                    "AWS_REGION",
                    "no region found in the environment or the AWS profile; set AWS_REGION",
                )
            })?;

        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(region)
            .no_credentials()
            .http_client(response::guarded_https_client())
            .retry_config(RetryConfig::disabled())
            // Every attempt is already bounded by the call's budget and its answer by the
            // guarded client's size cap; the SDK's own throughput watch on each body is a
            // second timer per request that can only fire later (5 % of the CPU per call).
            .stalled_stream_protection(StalledStreamProtectionConfig::disabled());
        if let Some(url) = &settings.endpoint_url {
            loader = loader.endpoint_url(url);
        }
        let sdk_config = loader.load().await;
        let sdk = Client::new(&sdk_config);
        Ok(Self {
            sdk,
            app_client: AppClient {
                id: settings.client_id.clone(),
                secret: settings.client_secret.clone(),
            },
        })
    }

    /// The region the client calls.
    pub(crate) fn region(&self) -> &str {
        self.sdk.config().region().map_or("", |r| r.as_ref())
    }

    /// The app client this server serves.
    pub(crate) fn client_id(&self) -> &ClientId {
        &self.app_client.id
    }

    /// Starts a reset: Cognito sends the user a code.
    pub(crate) async fn forgot_password(
        &self,
        request: &ForgotPassword,
        budget: Budget,
    ) -> Result<CodeDelivery, UpstreamError> {
        let secret_hash = self.app_client.secret_hash(&request.account.username);
        let extra = SdkPassThrough::from(&request.pass_through);
        let output = self
            .call(Rpc::ForgotPassword.method(), budget, || {
                self.sdk
                    .forgot_password()
                    .client_id(self.app_client.id.as_str())
                    .username(request.account.username.as_str())
                    .set_secret_hash(secret_hash.clone())
                    .set_client_metadata(extra.client_metadata.clone())
                    .set_user_context_data(extra.user_context.clone())
                    .set_analytics_metadata(extra.analytics.clone())
                    .send()
            })
            .await?;
        match output.code_delivery_details() {
            Some(details) => code_delivery(details),
            None => Ok(CodeDelivery {
                destination: String::new(),
                medium: DeliveryMedium::Unspecified,
                attribute_name: String::new(),
            }),
        }
    }

    /// Finishes a reset: sets the new password if the code is right.
    pub(crate) async fn confirm_forgot_password(
        &self,
        request: &ConfirmForgotPassword,
        budget: Budget,
    ) -> Result<(), UpstreamError> {
        let secret_hash = self.app_client.secret_hash(&request.account.username);
        let extra = SdkPassThrough::from(&request.pass_through);
        self.call(Rpc::ConfirmForgotPassword.method(), budget, || {
            self.sdk
                .confirm_forgot_password()
                .client_id(self.app_client.id.as_str())
                .username(request.account.username.as_str())
                .confirmation_code(request.confirmation_code.expose())
                .password(request.password.expose())
                .set_secret_hash(secret_hash.clone())
                .set_client_metadata(extra.client_metadata.clone())
                .set_user_context_data(extra.user_context.clone())
                .set_analytics_metadata(extra.analytics.clone())
                .send()
        })
        .await?;
        Ok(())
    }

    /// Runs `attempt` until it succeeds, fails in a way that is not safe to retry, has been
    /// tried [`MAX_ATTEMPTS`] times, or the budget runs out. Backoff is jittered exponential
    /// from [`INITIAL_BACKOFF`]; a retry that could not start before the deadline is not made.
    async fn call<T, E, F, Fut>(
        &self,
        operation: &'static str,
        budget: Budget,
        mut attempt: F,
    ) -> Result<T, UpstreamError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, SdkError<E, HttpResponse>>>,
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        // When the attempt in progress was sent, so an attempt cut off by the deadline is
        // observed too.
        let current = std::sync::Mutex::new(Instant::now());
        let attempts = async {
            let mut backoff = INITIAL_BACKOFF;
            let mut made = 1;
            loop {
                let sent = Instant::now();
                *current.lock().expect("attempt clock") = sent;
                let result = attempt().await.map_err(UpstreamError::from_sdk);
                record(operation, sent, result.as_ref().err());
                let error = match result {
                    Ok(output) => return Ok(output),
                    Err(error) => error,
                };
                let pause = rand::rng().random_range(backoff / 2..=backoff);
                if made >= MAX_ATTEMPTS
                    || !error.is_retryable()
                    || Instant::now() + pause >= budget.deadline
                {
                    return Err(error);
                }
                tracing::debug!(
                    attempt = made,
                    ?pause,
                    cognito.code = error.cognito_code(),
                    "retrying Cognito call"
                );
                tokio::time::sleep(pause).await;
                backoff *= 2;
                made += 1;
            }
        };
        match tokio::time::timeout_at(budget.deadline, attempts).await {
            Ok(result) => result,
            Err(_) => {
                let timeout = UpstreamError::Timeout {
                    set_by_caller: budget.set_by_caller,
                };
                let sent = *current.lock().expect("attempt clock");
                record(operation, sent, Some(&timeout));
                Err(timeout)
            }
        }
    }
}

/// Counts one request to Cognito and its latency.
fn record(operation: &'static str, sent: Instant, error: Option<&UpstreamError>) {
    let outcome = error.map_or(Cow::Borrowed("ok"), UpstreamError::outcome);
    metrics::counter!(m::COGNITO_REQUESTS, "operation" => operation, "outcome" => outcome)
        .increment(1);
    metrics::histogram!(m::COGNITO_SECONDS, "operation" => operation)
        .record(sent.elapsed().as_secs_f64());
}

/// The pass-through fields in the SDK's types, built once per call and cloned per attempt.
struct SdkPassThrough {
    client_metadata: Option<std::collections::HashMap<String, String>>,
    user_context: Option<UserContextDataType>,
    analytics: Option<AnalyticsMetadataType>,
}

impl From<&PassThrough> for SdkPassThrough {
    fn from(pass_through: &PassThrough) -> Self {
        Self {
            client_metadata: pass_through.client_metadata.clone().into_map(),
            user_context: pass_through.user_context.as_ref().map(|context| {
                UserContextDataType::builder()
                    .set_ip_address(context.ip_address.clone())
                    .set_encoded_data(context.encoded_data.clone())
                    .build()
            }),
            analytics: pass_through.analytics_endpoint_id.as_ref().map(|id| {
                AnalyticsMetadataType::builder()
                    .analytics_endpoint_id(id)
                    .build()
            }),
        }
    }
}

/// Cognito's delivery details, refused unless each text is of sane length and characters.
fn code_delivery(details: &CodeDeliveryDetailsType) -> Result<CodeDelivery, UpstreamError> {
    let sane = |value: &str| {
        value.chars().count() <= MAX_DELIVERY_FIELD_CHARS && !value.chars().any(char::is_control)
    };
    let destination = details.destination().unwrap_or_default();
    let attribute_name = details.attribute_name().unwrap_or_default();
    if !sane(destination) || !sane(attribute_name) {
        return Err(UpstreamError::InvalidResponse(InvalidResponse {
            status: 200,
            content_type: String::new(),
            bytes: destination.len() + attribute_name.len(),
            problem: "delivery details of insane length or characters",
        }));
    }
    Ok(CodeDelivery {
        destination: destination.to_owned(),
        medium: match details.delivery_medium() {
            Some(DeliveryMediumType::Email) => DeliveryMedium::Email,
            Some(DeliveryMediumType::Sms) => DeliveryMedium::Sms,
            _ => DeliveryMedium::Unspecified,
        },
        attribute_name: attribute_name.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Account;

    #[test]
    fn secret_hash_matches_the_known_vector() {
        let secret = SecretString::from("user-pool-client-secret");
        assert_eq!(
            secret_hash(&secret, "a@b.com", "user-pool-client-id"),
            "hJAY3VKwKQyz2H1A6+Jgy7nUxmNepNrLTL8ltH+BzX8="
        );
    }

    #[test]
    fn budget_answers_before_the_callers_deadline() {
        let now = Instant::now();
        let five = Duration::from_secs(5);

        let own = Budget::new(now, five, None);
        assert_eq!(own.deadline - now, five);
        assert!(!own.set_by_caller);

        let half_second = Budget::new(now, five, Some(Duration::from_millis(500)));
        assert_eq!(half_second.deadline - now, Duration::from_millis(450));
        assert!(half_second.set_by_caller);

        // 10 % is less than 50 ms for short deadlines.
        let short = Budget::new(now, five, Some(Duration::from_millis(200)));
        assert_eq!(short.deadline - now, Duration::from_millis(180));

        // A caller more patient than COGNITO_TIMEOUT does not extend it.
        let long = Budget::new(now, five, Some(Duration::from_secs(60)));
        assert_eq!(long.deadline - now, five);
        assert!(!long.set_by_caller);
    }

    #[test]
    fn only_unprocessed_failures_are_retried() {
        let service = |code: &str| UpstreamError::Service {
            code: code.into(),
            message: None,
            request_id: None,
        };
        assert!(service("TooManyRequestsException").is_retryable());
        assert!(!service("LimitExceededException").is_retryable());
        assert!(!service("InternalErrorException").is_retryable());
        assert!(
            !UpstreamError::Http {
                status: 503,
                request_id: None
            }
            .is_retryable()
        );
        let unreachable = |before_connecting| UpstreamError::Unreachable {
            before_connecting,
            detail: String::new(),
        };
        assert!(unreachable(true).is_retryable());
        assert!(!unreachable(false).is_retryable());
        assert!(
            !UpstreamError::Timeout {
                set_by_caller: true
            }
            .is_retryable()
        );
    }

    #[tokio::test]
    async fn a_refused_connection_is_known_to_be_unprocessed() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let settings = CognitoSettings {
            client_id: ClientId::parse("COGNITO_CLIENT_ID", "client".into()).unwrap(),
            client_secret: None,
            timeout: Duration::from_secs(5),
            region: Some("us-east-1".into()),
            endpoint_url: Some(format!("http://{addr}")),
        };
        let cognito = Cognito::connect(&settings).await.unwrap();
        let request = ForgotPassword {
            account: Account {
                username: Username::parse("username", "a".into()).unwrap(),
                client_id: None,
            },
            pass_through: PassThrough::default(),
        };
        let budget = Budget::new(Instant::now(), settings.timeout, None);

        let err = cognito.forgot_password(&request, budget).await.unwrap_err();

        assert!(
            matches!(
                err,
                UpstreamError::Unreachable {
                    before_connecting: true,
                    ..
                }
            ),
            "{err:?}"
        );
    }
}
