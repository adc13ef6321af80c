//! The upstream: Cognito's `ForgotPassword` and `ConfirmForgotPassword` through the AWS SDK.
//! Owns the app clients ([`clients`]: their settings; here: one SDK client per region, each
//! client's `SECRET_HASH` and secret rotation), the retry policy and the time bound of one
//! upstream call, and turns every SDK failure into an [`UpstreamError`] that carries no SDK
//! type. Both operations are unauthenticated (the SDK sends them unsigned), so no AWS
//! credentials are loaded and the instance-metadata service is never asked for anything.
//! Under the SDK, [`response`] reads every answer with a cap and refuses malformed ones.

pub(crate) mod clients;
mod code;
pub mod proof;
mod response;

use std::borrow::Cow;
use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
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
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::domain::{
    ClientId, CodeDelivery, ConfirmForgotPassword, DeliveryMedium, ForgotPassword, PassThrough,
    Rpc, Username,
};
use crate::metrics as m;
use crate::privacy::HmacKey;
use crate::reload::Watched;
use crate::settings::{SettingError, read_secret_file};
pub use clients::{ClientSettings, CognitoSettings};

pub use code::ErrorCode;
pub(crate) use response::InvalidResponse;

/// At most this many attempts per call, the first included.
const MAX_ATTEMPTS: u32 = 3;
/// The first retry waits up to this long; each later one twice as long.
const INITIAL_BACKOFF: Duration = Duration::from_millis(50);
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

/// An app client's secret, with the HMAC key its `SECRET_HASH` is computed under.
#[derive(Debug)]
struct ClientSecret {
    secret: SecretString,
    key: HmacKey,
}

impl ClientSecret {
    fn new(secret: SecretString) -> Self {
        let key = HmacKey::new(secret.expose_secret().as_bytes());
        Self { secret, key }
    }

    /// [`secret_hash`] under this secret.
    fn hash(&self, username: &str, client_id: &str) -> String {
        BASE64.encode(self.key.mac(&[username.as_bytes(), client_id.as_bytes()]))
    }
}

/// When the upstream call must have finished, retries included.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Budget {
    /// The instant the call is abandoned.
    pub(crate) deadline: Instant,
    /// True when the caller's deadline, not `COGNITO_TIMEOUT`, set `deadline`.
    pub(crate) set_by_caller: bool,
}

/// The least time a call to Cognito is given: a call whose caller's deadline leaves less when
/// it would be sent is not sent (it could not be answered in time, and a code might still be
/// sent).
pub(crate) const MIN_UPSTREAM_TIME: Duration = Duration::from_millis(50);

impl Budget {
    /// True when the caller's deadline leaves less than [`MIN_UPSTREAM_TIME`] from `now`.
    pub(crate) fn too_short(&self, now: Instant) -> bool {
        self.set_by_caller && self.deadline.saturating_duration_since(now) < MIN_UPSTREAM_TIME
    }

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

/// Why Cognito answered `NotAuthorizedException`, told apart by its message. AWS documents
/// the exception ("This exception is thrown when a user isn't authorized.", ForgotPassword and
/// ConfirmForgotPassword API references) but none of its messages; these are the ones Cognito
/// is seen to send for these two operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotAuthorized {
    /// "User is disabled.": the account exists and is disabled (seen for password resets and
    /// sign-in; under `PreventUserExistenceErrors=ENABLED` Cognito masks it itself: "When a
    /// user isn't found, is deactivated, or doesn't have a verified delivery mechanism …
    /// Amazon Cognito returns CodeDeliveryDetails with a simulated delivery medium").
    Disabled,
    /// "User password cannot be reset in the current state.": the account exists and must
    /// change its password first (`FORCE_CHANGE_PASSWORD`: "users can't use the
    /// ForgotPassword API", AWS Knowledge Center "cognito-forgot-password").
    CannotReset,
    /// "Unable to verify secret hash for client …": this service's client secret is wrong
    /// ("If your app client has a client secret and you don't provide a SECRET_HASH
    /// parameter, this API returns NotAuthorizedException.", ForgotPassword API reference).
    SecretHash,
    /// Any other message: treated as a misconfiguration, never as an account's state.
    Unrecognised,
}

impl NotAuthorized {
    /// The cause of a `NotAuthorizedException` with `message`.
    pub(crate) fn of(message: Option<&str>) -> Self {
        match message.map(str::trim) {
            Some("User is disabled.") => Self::Disabled,
            Some("User password cannot be reset in the current state.") => Self::CannotReset,
            Some(m) if m.starts_with("Unable to verify secret hash for client") => Self::SecretHash,
            _ => Self::Unrecognised,
        }
    }

    /// True for a cause only an existing account can produce.
    pub(crate) fn is_account_state(self) -> bool {
        matches!(self, Self::Disabled | Self::CannotReset)
    }
}

/// Why an upstream call failed, in terms independent of the SDK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum UpstreamError {
    /// Cognito answered with an error code, e.g. `CodeMismatchException`.
    Service {
        /// The exception.
        code: ErrorCode,
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
            Self::Service { code, .. } => *code == ErrorCode::TooManyRequests,
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
            Self::Service {
                code: ErrorCode::Other(name),
                ..
            } if name.len() > 64 || !name.bytes().all(|b| b.is_ascii_alphanumeric()) => {
                Cow::Borrowed("malformed_code")
            }
            Self::Service { code, .. } => Cow::Owned(code.name().to_owned()),
            Self::Http { status, .. } => Cow::Owned(format!("http_{status}")),
            Self::Unreachable { .. } => Cow::Borrowed("unreachable"),
            Self::Timeout { .. } => Cow::Borrowed("timeout"),
            Self::Construction { .. } => Cow::Borrowed("construction_failure"),
            Self::InvalidResponse(_) => Cow::Borrowed("invalid_response"),
        }
    }

    /// The Cognito error code, if Cognito gave one.
    pub(crate) fn cognito_code(&self) -> Option<&ErrorCode> {
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
                    code: ErrorCode::parse(code),
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

/// One app client this server acts as: its settings, the SDK client of its region, and its
/// secret, replaced when its file changes (it is [`Watched`]).
#[derive(Debug)]
pub(crate) struct AppClient {
    /// Its short name in logs, audit events and metrics.
    pub(crate) alias: String,
    /// Its id.
    pub(crate) id: ClientId,
    /// Its user pool, when configured: usernames are keyed by it.
    pub(crate) pool: Option<String>,
    /// Bound on one upstream call, retries included.
    pub(crate) timeout: Duration,
    sdk: Client,
    secret: RwLock<Option<ClientSecret>>,
    secret_file: Option<PathBuf>,
    /// True while its last proof found it misconfigured: its calls are refused.
    misconfigured: AtomicBool,
    /// Told when its secret changed, so that it is proven again.
    secret_changed: Notify,
}

impl AppClient {
    fn secret_hash(&self, username: &Username) -> Option<String> {
        self.secret
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|secret| secret.hash(username.as_str(), self.id.as_str()))
    }

    /// The region its SDK client calls.
    pub(crate) fn region(&self) -> &str {
        self.sdk.config().region().map_or("", |r| r.as_ref())
    }

    /// True while its last proof found it misconfigured.
    pub(crate) fn misconfigured(&self) -> bool {
        self.misconfigured.load(Ordering::Relaxed)
    }

    /// Refuses its calls (`true`) or serves them again, as its last proof says.
    pub(crate) fn set_misconfigured(&self, misconfigured: bool) {
        self.misconfigured.store(misconfigured, Ordering::Relaxed);
    }

    /// Waits until its secret changes.
    pub(crate) async fn secret_changed(&self) {
        self.secret_changed.notified().await;
    }

    /// Starts a reset: Cognito sends the user a code.
    pub(crate) async fn forgot_password(
        &self,
        request: &ForgotPassword,
        budget: Budget,
    ) -> Result<CodeDelivery, UpstreamError> {
        self.send_forgot_password(Rpc::ForgotPassword.method(), request, budget)
            .await
    }

    /// ForgotPassword, counted in `cognito_requests_total` under `operation`.
    async fn send_forgot_password(
        &self,
        operation: &'static str,
        request: &ForgotPassword,
        budget: Budget,
    ) -> Result<CodeDelivery, UpstreamError> {
        let secret_hash = self.secret_hash(&request.account.username);
        let extra = SdkPassThrough::from(&request.pass_through);
        let output = call(operation, budget, || {
            self.sdk
                .forgot_password()
                .client_id(self.id.as_str())
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
        let secret_hash = self.secret_hash(&request.account.username);
        let extra = SdkPassThrough::from(&request.pass_through);
        call(Rpc::ConfirmForgotPassword.method(), budget, || {
            self.sdk
                .confirm_forgot_password()
                .client_id(self.id.as_str())
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
}

/// A client's secret file: a changed secret replaces the one in use, a file that does not load
/// leaves it. Each change noticed counts in `cognito_client_secret_reloads_total{client,result}`.
impl Watched for AppClient {
    fn reload(&self) -> Result<bool, String> {
        let Some(path) = self.secret_file.as_deref() else {
            return Ok(false);
        };
        let read = read_secret_file(path).map_err(|err| format!("secret_file: {err}"))?;
        let mut secret = self.secret.write().unwrap_or_else(|e| e.into_inner());
        let changed = secret
            .as_ref()
            .is_none_or(|s| s.secret.expose_secret() != read);
        if changed {
            *secret = Some(ClientSecret::new(SecretString::from(read)));
        }
        Ok(changed)
    }

    fn report(&self, outcome: Result<(), &str>) {
        let alias = self.alias.clone();
        match outcome {
            Ok(()) => {
                self.reloads("reloaded").increment(1);
                tracing::info!(client = alias, "app client secret reloaded");
                self.secret_changed.notify_one();
            }
            Err(problem) => {
                self.reloads("failed").increment(1);
                tracing::error!(
                    client = alias,
                    error = problem,
                    "app client secret not reloaded; the previous one stays in use"
                );
            }
        }
    }

    fn reloads(&self, result: &'static str) -> metrics::Counter {
        metrics::counter!(m::SECRET_RELOADS, "client" => self.alias.clone(), "result" => result)
    }
}

/// Every app client served, found by id, and the one for requests that name none.
#[derive(Debug)]
pub(crate) struct Cognito {
    clients: Vec<Arc<AppClient>>,
    by_id: HashMap<ClientId, usize>,
    default: usize,
}

impl Cognito {
    /// Builds one SDK client per region and endpoint, sharing one configuration and one
    /// connection pool (it connects lazily, on the first call). A region comes from the
    /// client's settings, else `AWS_REGION` or the AWS profile (never the instance-metadata
    /// service). No credentials, no SDK retries (see [`call`]).
    pub(crate) async fn build(settings: &CognitoSettings) -> Result<Self, SettingError> {
        // For a client without a region: the environment, then the profile; never the
        // instance-metadata service (the default chain's last resort).
        let default_region = RegionProviderChain::first_try(
            aws_config::environment::EnvironmentVariableRegionProvider::new(),
        )
        .or_else(aws_config::profile::ProfileFileRegionProvider::new());
        let base = aws_config::defaults(BehaviorVersion::latest())
            .region(default_region)
            .no_credentials()
            .http_client(response::guarded_https_client())
            .retry_config(RetryConfig::disabled())
            // Every attempt is already bounded by the call's budget and its answer by the
            // guarded client's size cap; the SDK's own throughput watch on each body is a
            // second timer per request that can only fire later (5 % of the CPU per call).
            .stalled_stream_protection(StalledStreamProtectionConfig::disabled())
            .load()
            .await;

        let mut sdks: HashMap<(Option<String>, Option<String>), Client> = HashMap::new();
        let mut clients = Vec::with_capacity(settings.clients.len());
        let mut by_id = HashMap::new();
        for (index, client) in settings.clients.iter().enumerate() {
            let place = (client.region.clone(), client.endpoint_url.clone());
            let sdk = match sdks.get(&place) {
                Some(sdk) => sdk.clone(),
                None => {
                    let mut config = aws_sdk_cognitoidentityprovider::config::Builder::from(&base);
                    if let Some(region) = &client.region {
                        config = config.region(Region::new(region.clone()));
                    }
                    if let Some(url) = &client.endpoint_url {
                        config = config.endpoint_url(url);
                    }
                    let config = config.build();
                    if config.region().is_none() {
                        return Err(SettingError::new(
                            "AWS_REGION",
                            "no region found in the environment or the AWS profile; set \
                             AWS_REGION",
                        ));
                    }
                    let sdk = Client::from_conf(config);
                    sdks.insert(place, sdk.clone());
                    sdk
                }
            };
            by_id.insert(client.client_id.clone(), index);
            clients.push(Arc::new(AppClient {
                alias: client.alias.clone(),
                id: client.client_id.clone(),
                pool: client.user_pool_id.clone(),
                timeout: client.timeout,
                sdk,
                secret: RwLock::new(client.secret.clone().map(ClientSecret::new)),
                secret_file: client.secret_file.clone(),
                misconfigured: AtomicBool::new(false),
                secret_changed: Notify::new(),
            }));
        }
        Ok(Self {
            clients,
            by_id,
            default: settings.default,
        })
    }

    /// The client a request names, or the default when it names none; `None` for a client
    /// this server does not serve.
    pub(crate) fn select(&self, requested: Option<&ClientId>) -> Option<&Arc<AppClient>> {
        let index = match requested {
            None => self.default,
            Some(id) => *self.by_id.get(id)?,
        };
        self.clients.get(index)
    }

    /// Every client, in the order configured.
    pub(crate) fn clients(&self) -> &[Arc<AppClient>] {
        &self.clients
    }

    /// The index in [`Cognito::clients`] of the client for requests that name none.
    pub(crate) fn default_index(&self) -> usize {
        self.default
    }

    /// The secret files to watch for rotation (a Kubernetes Secret update swaps a `..data`
    /// symlink): a rotated secret is used by the next call.
    pub(crate) fn watched_secrets(&self) -> Vec<Arc<dyn Watched>> {
        self.clients
            .iter()
            .filter(|c| c.secret_file.is_some())
            .map(|c| c.clone() as Arc<dyn Watched>)
            .collect()
    }
}

/// Runs `attempt` until it succeeds, fails in a way that is not safe to retry, has been tried
/// [`MAX_ATTEMPTS`] times, or the budget runs out. Backoff is jittered exponential from
/// [`INITIAL_BACKOFF`]; a retry that could not start before the deadline is not made.
async fn call<T, E, F, Fut>(
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
            // The SDK's future is kilobytes: boxed, the futures that hold it (this one, the
            // call's task) stay small, and are not copied whole as they move and are spawned.
            let result = Box::pin(attempt()).await.map_err(UpstreamError::from_sdk);
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
                cognito.code = error.cognito_code().map(ErrorCode::name),
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

/// Counts one request to Cognito and its latency (nowhere before the recorder is installed).
fn record(operation: &'static str, sent: Instant, error: Option<&UpstreamError>) {
    let Some(series) = m::CallSeries::get().map(|calls| calls.upstream(operation)) else {
        return;
    };
    series.seconds.record(sent.elapsed().as_secs_f64());
    match error {
        None => series.ok.increment(1),
        Some(error) => {
            let outcome = error.outcome();
            metrics::counter!(m::COGNITO_REQUESTS, "operation" => operation, "outcome" => outcome)
                .increment(1);
        }
    }
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

    #[test]
    fn not_authorized_causes_are_told_apart_by_cognitos_messages() {
        assert_eq!(
            NotAuthorized::of(Some("User is disabled.")),
            NotAuthorized::Disabled
        );
        assert_eq!(
            NotAuthorized::of(Some("User password cannot be reset in the current state.")),
            NotAuthorized::CannotReset
        );
        assert_eq!(
            NotAuthorized::of(Some("Unable to verify secret hash for client 3abc123")),
            NotAuthorized::SecretHash
        );
        for other in [
            None,
            Some(""),
            Some("Incorrect username or password."),
            Some("user is disabled"),
            Some("User is disabled. Or is it?"),
        ] {
            assert_eq!(
                NotAuthorized::of(other),
                NotAuthorized::Unrecognised,
                "{other:?}"
            );
        }
        assert!(NotAuthorized::Disabled.is_account_state());
        assert!(NotAuthorized::CannotReset.is_account_state());
        assert!(!NotAuthorized::SecretHash.is_account_state());
        assert!(!NotAuthorized::Unrecognised.is_account_state());
    }
    use crate::domain::Account;

    #[test]
    fn secret_hash_matches_the_known_vector() {
        let secret = SecretString::from("user-pool-client-secret");
        assert_eq!(
            secret_hash(&secret, "a@b.com", "user-pool-client-id"),
            "hJAY3VKwKQyz2H1A6+Jgy7nUxmNepNrLTL8ltH+BzX8="
        );
        assert_eq!(
            ClientSecret::new(secret).hash("a@b.com", "user-pool-client-id"),
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
            code: ErrorCode::parse(code),
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

    fn client(alias: &str, region: &str, endpoint_url: Option<String>) -> ClientSettings {
        ClientSettings {
            alias: alias.into(),
            client_id: ClientId::parse("client_id", format!("client{alias}")).unwrap(),
            user_pool_id: Some(format!("{region}_Pool")),
            region: Some(region.into()),
            endpoint_url,
            timeout: Duration::from_secs(5),
            secret: None,
            secret_file: None,
        }
    }

    #[tokio::test]
    async fn clients_are_found_by_id_and_share_one_sdk_client_per_region() {
        let settings = CognitoSettings {
            clients: vec![
                client("a", "eu-west-1", None),
                client("b", "eu-west-1", None),
                client("c", "us-east-1", None),
            ],
            default: 1,
        };
        let cognito = Cognito::build(&settings).await.unwrap();

        assert_eq!(cognito.select(None).unwrap().alias, "b");
        let id = |s: &str| ClientId::parse("client_id", s.into()).unwrap();
        let c = cognito.select(Some(&id("clientc"))).unwrap();
        assert_eq!((c.alias.as_str(), c.region()), ("c", "us-east-1"));
        assert_eq!(
            cognito.select(Some(&id("clienta"))).unwrap().region(),
            "eu-west-1"
        );
        assert!(cognito.select(Some(&id("someoneelse"))).is_none());
        // One SDK client (one configuration, one connection pool) per region: the clients of
        // one region hold the very same one.
        let [a, b, c] = [0, 1, 2].map(|i| cognito.clients()[i].sdk.config());
        assert!(std::ptr::eq(a, b), "one SDK client for eu-west-1");
        assert!(!std::ptr::eq(a, c), "another for us-east-1");
    }

    #[tokio::test]
    async fn a_refused_connection_is_known_to_be_unprocessed() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let settings = CognitoSettings {
            clients: vec![client("only", "us-east-1", Some(format!("http://{addr}")))],
            default: 0,
        };
        let cognito = Cognito::build(&settings).await.unwrap();
        let client = cognito.select(None).unwrap();
        let request = ForgotPassword {
            account: Account {
                username: Username::parse("username", "a".into()).unwrap(),
                client_id: None,
            },
            request_id: None,
            pass_through: PassThrough::default(),
        };
        let budget = Budget::new(Instant::now(), client.timeout, None);

        let err = client.forgot_password(&request, budget).await.unwrap_err();

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
