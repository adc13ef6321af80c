//! The application: builds the Cognito client, the gRPC services (PasswordRecovery, health,
//! reflection v1 and v1alpha) and the Connect door in front of them, the listeners (gRPC,
//! plaintext health when TLS is on, metrics), then serves until told to stop, draining
//! in-flight calls (`SHUTDOWN_DELAY`, `SHUTDOWN_GRACE_PERIOD` in the README's "Configuration").

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use secrecy::ExposeSecret;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::task::AbortOnDropHandle;
use tonic::service::Routes;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};

use crate::api::{
    Connect, Gate, Grpc, InFlightCalls, Intake, IntakeSettings, ProtocolsLayer, Service,
    ServiceState,
};
use crate::callers::Callers;
use crate::cognito::Cognito;
use crate::cognito::proof::Verdict;
use crate::config::{Config, ConfigError};
use crate::connections::{self, ConnectionSettings};
use crate::fleet::Backend;
use crate::idempotency::{Idempotency, SharedOutcomes};
use crate::limits::{Limits, SharedLimits};
use crate::masking::Masking;
use crate::memory;
use crate::metrics;
use crate::privacy::{UsernameHasher, hmac};
use crate::proofs::Proofs;
use crate::proto;
use crate::proto::v1::password_recovery_server::PasswordRecoveryServer;
use crate::reload::{self, Watched};
use crate::settings::SettingError;
use crate::tls::ReloadingTls;

/// How long a keepalive ping may go unanswered before the connection is closed.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// HTTP/2 flow-control windows: how much request data one stream, and one connection, may
/// have sent that the service has not read yet. Requests are small; these bound memory.
const STREAM_WINDOW_BYTES: u32 = 64 * 1024;
const CONNECTION_WINDOW_BYTES: u32 = 128 * 1024;
/// The largest header list a request may send (gRPC metadata of a normal call is < 1 KiB).
const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;
/// How long abandoned calls get to record themselves at the end of the grace period.
const ABANDON_RECORD_TIME: Duration = Duration::from_secs(5);

pub use crate::api::SERVICE_NAME;

/// Why the application could not start, or stopped other than when asked.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// A setting is missing or malformed (exit code 2).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A listen address could not be bound.
    #[error("cannot listen on {addr} ({setting}): {source}")]
    Bind {
        /// The setting naming the address.
        setting: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The reflection service could not load a descriptor set.
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// A gRPC server failed.
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    /// The metrics server failed.
    #[error("metrics server failed: {0}")]
    Metrics(std::io::Error),
    /// A server stopped before it was asked to.
    #[error("stopped unexpectedly: {0}")]
    Stopped(String),
    /// Calls were still in flight when the shutdown grace period ended (exit code 1).
    #[error("{0} calls were still in flight when the shutdown grace period ended")]
    Abandoned(usize),
    /// `check`: an app client was not proven to work (exit code 2).
    #[error("an app client was not proven to work")]
    Unproven,
}

impl From<SettingError> for AppError {
    fn from(err: SettingError) -> Self {
        Self::Config(err.into())
    }
}

/// Binds the address of `setting`, and returns the listener with the address it got.
async fn bind(
    setting: &'static str,
    addr: SocketAddr,
) -> Result<(TcpListener, SocketAddr), AppError> {
    let error = |source| AppError::Bind {
        setting,
        addr,
        source,
    };
    let listener = TcpListener::bind(addr).await.map_err(error)?;
    let local = listener.local_addr().map_err(error)?;
    Ok((listener, local))
}

/// A built application, bound to its ports and ready to serve.
pub struct Application {
    grpc: TcpListener,
    grpc_addr: SocketAddr,
    /// The plaintext health listener, with TLS only.
    health_listener: Option<(TcpListener, SocketAddr)>,
    metrics: TcpListener,
    metrics_addr: SocketAddr,
    metrics_handle: PrometheusHandle,
    tls: Option<ReloadingTls>,
    /// The files re-read while serving (TLS, app client secrets), every
    /// `file_reload_interval`.
    watched: Vec<Arc<dyn Watched>>,
    file_reload_interval: Duration,
    routes: Routes,
    /// The Connect door on the gRPC port (`CONNECT_PROTOCOL`); `None` when it is closed.
    connect: Option<Connect>,
    health: HealthReporter,
    /// The app clients' proofs, which go on while serving, and their first verdicts.
    proofs: (Arc<Proofs>, Vec<Verdict>),
    shutdown_delay: Duration,
    shutdown_grace_period: Duration,
    keepalive_interval: Duration,
    /// The gRPC listener's connections: their caps, shares and time bounds.
    connections: ConnectionSettings,
    max_concurrent_streams: u32,
    calls: Arc<InFlightCalls>,
}

impl Application {
    /// Builds every part, proves every app client once, and binds the listeners. Health is
    /// SERVING for `""` at once, and for the service unless the default app client was proven
    /// misconfigured.
    pub async fn build(config: Config) -> Result<Self, AppError> {
        let metrics_handle = metrics::install();
        let tls = match config.tls.clone() {
            // ALPN offers HTTP/1.1 too when the Connect door serves it.
            Some(settings) => Some(
                ReloadingTls::load(settings, config.connect_protocol)
                    .map_err(SettingError::from)?,
            ),
            None => None,
        };
        let cognito = Cognito::build(&config.cognito).await?;
        log_clients(&config, &cognito, tls.is_some());
        let callers = Arc::new(Callers::new(config.callers.as_ref()));
        log_callers(&config);
        let mut watched = cognito.watched_secrets();
        watched.extend(tls.as_ref().map(ReloadingTls::watched));
        if config.callers.is_some() {
            watched.push(callers.clone());
        }
        let calls = Arc::new(InFlightCalls::default());
        let (clients, default) = (cognito.clients().to_vec(), cognito.default_index());
        let service = service(&config, cognito, callers.clone(), calls.clone())?;

        // Alive at once; ready once the default client is not proven misconfigured.
        let health = HealthReporter::new();
        health.set_service_status("", ServingStatus::Serving).await;
        let proofs = Proofs::new(
            clients,
            default,
            config.client_check_interval,
            health.clone(),
        );
        let verdicts = proofs.first().await;
        let (routes, connect) = routes(&config, service, callers, &health)?;

        let (grpc, grpc_addr) = bind("GRPC_LISTEN_ADDR", config.grpc_listen_addr).await?;
        let health_listener = match &tls {
            Some(_) => Some(bind("HEALTH_LISTEN_ADDR", config.health_listen_addr).await?),
            None => None,
        };
        let (metrics, metrics_addr) =
            bind("METRICS_LISTEN_ADDR", config.metrics_listen_addr).await?;

        Ok(Self {
            grpc,
            grpc_addr,
            health_listener,
            metrics,
            metrics_addr,
            metrics_handle,
            tls,
            watched,
            file_reload_interval: config.file_reload_interval,
            routes,
            connect,
            health,
            proofs: (proofs, verdicts),
            shutdown_delay: config.shutdown_delay,
            shutdown_grace_period: config.shutdown_grace_period,
            keepalive_interval: config.keepalive_interval,
            connections: ConnectionSettings {
                idle_timeout: config.idle_timeout,
                header_timeout: config.request_header_timeout,
                max_connections: config.max_connections.get(),
                max_per_peer: config.max_connections_per_peer.get(),
                peer_key: config.peer_key,
                max_http1_unanswered: memory::HTTP1_HEADER_BYTES as usize
                    + config.max_request_bytes,
            },
            max_concurrent_streams: config.max_concurrent_streams,
            calls,
        })
    }

    /// The gRPC listener's address (with the real port when configured as 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// The plaintext health listener's address, when TLS is on.
    pub fn health_addr(&self) -> Option<SocketAddr> {
        self.health_listener.as_ref().map(|(_, addr)| *addr)
    }

    /// The metrics listener's address.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// Serves until SIGTERM or SIGINT, then shuts down gracefully.
    pub async fn run_until_stopped(self) -> Result<(), AppError> {
        self.run_until(stop_signals()).await
    }

    /// Serves until `stop` completes, then: health NOT_SERVING; keep serving for
    /// `SHUTDOWN_DELAY`; stop accepting; let in-flight calls finish within
    /// `SHUTDOWN_GRACE_PERIOD`. Calls still in flight then are abandoned, each recorded, and
    /// the result is [`AppError::Abandoned`].
    pub async fn run_until(self, stop: impl Future<Output = ()>) -> Result<(), AppError> {
        let (close, closed) = watch::channel(false);
        let mut running = self.serve(closed);
        tokio::select! {
            ended = running.servers.join_next() => return Err(unexpected_end(ended)),
            () = stop => {}
        }
        // No proof may turn the service SERVING again.
        running.proving.shutdown().await;
        running.proofs.stopping().await;
        tracing::info!(
            delay = %humantime::format_duration(running.shutdown_delay),
            grace = %humantime::format_duration(running.shutdown_grace_period),
            "stop requested: NOT_SERVING"
        );
        running
            .health
            .set_not_serving::<PasswordRecoveryServer<Grpc>>()
            .await;
        running
            .health
            .set_service_status("", ServingStatus::NotServing)
            .await;
        tokio::select! {
            ended = running.servers.join_next() => return Err(unexpected_end(ended)),
            () = tokio::time::sleep(running.shutdown_delay) => {}
        }
        tracing::info!("no longer accepting connections; draining in-flight calls");
        let _ = close.send(true);
        running.drain().await
    }

    /// Starts every server (each stops accepting once `closed` turns true) and the file
    /// reloader.
    fn serve(self, closed: watch::Receiver<bool>) -> Running {
        let closing = move || {
            let mut closed = closed.clone();
            async move {
                let _ = closed.wait_for(|closed| *closed).await;
            }
        };
        let health_addr = self.health_addr();
        memory::spawn_trimmer();
        let mut servers = JoinSet::new();
        let tls = self.tls.is_some();
        let reloader = (!self.watched.is_empty())
            .then(|| reload::spawn(self.file_reload_interval, self.watched));
        let (proofs, verdicts) = self.proofs;
        let proving = proofs.spawn(verdicts);
        let connect = self.connect.is_some();
        let serve = Server::builder()
            .accept_http1(connect)
            .http2_keepalive_interval(Some(self.keepalive_interval))
            .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
            .max_concurrent_streams(self.max_concurrent_streams)
            .initial_stream_window_size(STREAM_WINDOW_BYTES)
            .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
            .http2_adaptive_window(Some(false))
            .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
            .layer(ProtocolsLayer::new(self.connect))
            .add_routes(self.routes)
            .serve_with_incoming_shutdown(
                connections::incoming(self.grpc, self.tls, self.connections),
                closing(),
            );
        servers.spawn(async move { serve.await.map_err(AppError::from) });
        if let Some((listener, _)) = self.health_listener {
            let serve = Server::builder()
                .add_service(health_service(&self.health))
                .serve_with_incoming_shutdown(TcpIncoming::from(listener), closing());
            servers.spawn(async move { serve.await.map_err(AppError::from) });
        }
        let serve = metrics::serve(self.metrics, self.metrics_handle, closing());
        servers.spawn(async move { serve.await.map_err(AppError::Metrics) });
        tracing::info!(
            addr = %self.grpc_addr,
            tls,
            connect,
            health_addr = health_addr.map(|a| a.to_string()),
            metrics_addr = %self.metrics_addr,
            "serving gRPC"
        );
        Running {
            servers,
            reloader: reloader.map(AbortOnDropHandle::new),
            proving,
            proofs,
            health: self.health,
            shutdown_delay: self.shutdown_delay,
            shutdown_grace_period: self.shutdown_grace_period,
            calls: self.calls,
        }
    }
}

/// A serving application.
struct Running {
    servers: JoinSet<Result<(), AppError>>,
    /// Stops re-reading files when dropped.
    reloader: Option<AbortOnDropHandle<()>>,
    /// The app clients' proofs (stopped when dropped).
    proving: JoinSet<()>,
    proofs: Arc<Proofs>,
    health: HealthReporter,
    shutdown_delay: Duration,
    shutdown_grace_period: Duration,
    calls: Arc<InFlightCalls>,
}

impl Running {
    /// Once the listeners are closed: lets in-flight calls finish within the grace period;
    /// those still in flight then are abandoned, each recorded ([`AppError::Abandoned`]).
    async fn drain(mut self) -> Result<(), AppError> {
        self.reloader = None;
        let grace = self.shutdown_grace_period;
        let drained = tokio::time::timeout(grace, async {
            while let Some(ended) = self.servers.join_next().await {
                ended.map_err(|e| AppError::Stopped(e.to_string()))??;
            }
            Ok::<_, AppError>(())
        })
        .await;
        if let Ok(result) = drained {
            result?;
            tracing::info!("stopped");
            return Ok(());
        }
        let abandoned = self.calls.abandon(ABANDON_RECORD_TIME).await;
        if abandoned > 0 {
            tracing::error!(
                abandoned,
                grace = %humantime::format_duration(grace),
                "grace period over: {abandoned} calls still in flight were abandoned"
            );
            return Err(AppError::Abandoned(abandoned));
        }
        tracing::warn!(
            grace = %humantime::format_duration(grace),
            "grace period over with connections still open and no call in flight; stopping \
             anyway"
        );
        tracing::info!("stopped");
        Ok(())
    }
}

/// Logs every app client as built, and the service's protections.
fn log_clients(config: &Config, cognito: &Cognito, tls: bool) {
    for (settings, client) in config.cognito.clients.iter().zip(cognito.clients()) {
        tracing::info!(
            client = settings.alias,
            client_id = %settings.client_id,
            client_secret = match (&settings.secret, &settings.secret_file) {
                (None, _) => "none",
                (Some(_), None) => "set",
                (Some(_), Some(_)) => "from file, reloaded on change",
            },
            user_pool_id = settings.user_pool_id.as_deref().unwrap_or("-"),
            region = client.region(),
            endpoint = settings.endpoint_url.as_deref().unwrap_or("default"),
            cognito_timeout = %humantime::format_duration(settings.timeout),
            default = settings.alias == config.cognito.default_client().alias,
            "Cognito app client ready"
        );
    }
    tracing::info!(
        clients = cognito.clients().len(),
        enumeration_protection = config.enumeration_protection,
        tls,
        mtls = config
            .tls
            .as_ref()
            .is_some_and(|t| t.client_ca_file.is_some()),
        "Cognito clients ready"
    );
}

/// Says who may call: the policy's callers, or that every caller may do everything.
fn log_callers(config: &Config) {
    let header = config.identity_header.map(|h| format!("{h:?}"));
    match &config.callers {
        Some(settings) => tracing::info!(
            file = %settings.file.display(),
            callers = settings.policy.len(),
            identity_header = header,
            "callers policy in force: callers it does not name are refused"
        ),
        None => tracing::info!(
            identity_header = header,
            "CALLERS_FILE is not set: every caller may call every RPC for every app client"
        ),
    }
}

/// The abuse limits, fleet-wide on `backend` when Redis is configured.
fn limits(config: &Config, backend: Option<&Arc<Backend>>) -> Limits {
    let mut limits = Limits::new(&config.limits);
    if let (Some(redis), Some(backend)) = (&config.limits.redis, backend) {
        limits = limits.with_shared(SharedLimits::new(backend.clone(), redis));
        tracing::info!(
            prefix = redis.prefix,
            timeout = %humantime::format_duration(redis.timeout),
            "abuse limits are shared by the fleet on Redis"
        );
    }
    tracing::info!(
        username_rate_limit = %config.limits.username,
        username_rate_limit_max_keys = config.limits.username_max_keys,
        global_rate_limit_rps = config.limits.global_rps.map_or(0, |rps| rps.get()),
        max_concurrent_upstream = config.limits.max_concurrent_upstream,
        "abuse limits"
    );
    tracing::info!(
        max_connections = config.max_connections,
        max_connections_per_peer = config.max_connections_per_peer,
        max_concurrent_calls = config.max_concurrent_calls,
        max_concurrent_calls_per_peer = config.max_concurrent_calls_per_peer,
        peer_key = ?config.peer_key,
        request_header_timeout = %humantime::format_duration(config.request_header_timeout),
        request_body_timeout = %humantime::format_duration(config.request_body_timeout),
        "places, fair shares and time bounds"
    );
    limits
}

/// The outcomes remembered for retries, fleet-wide on `backend` when Redis is configured.
/// Their hashes derive from `USERNAME_HASH_KEY_FILE` when it is set, so replicas agree.
fn idempotency(config: &Config, backend: Option<&Arc<Backend>>) -> Idempotency {
    const REQUESTS: &str = "password-recovery/request-ids";
    let key = match &config.username_hash_key {
        Some(key) => hmac(key.expose_secret(), &[REQUESTS.as_bytes()]),
        None => rand::random(),
    };
    let idempotency = Idempotency::new(
        config.idempotency_window,
        config.idempotency_max_keys.get(),
        key,
    );
    match backend {
        Some(backend) => idempotency.with_fleet(SharedOutcomes::new(backend.clone())),
        None => idempotency,
    }
}

/// The service core behind both doors: `cognito`'s clients, the limits, the hashers and
/// enumeration protection; every call runs among `calls`.
fn service(
    config: &Config,
    cognito: Cognito,
    callers: Arc<Callers>,
    calls: Arc<InFlightCalls>,
) -> Result<Service, AppError> {
    let (usernames, masking) = username_hashers(config);
    let regions: Vec<String> = cognito
        .clients()
        .iter()
        .map(|c| c.region().to_owned())
        .collect();
    let masking = Masking::new(
        config.enumeration_protection,
        masking,
        regions.iter().map(String::as_str),
    );
    // One connection to Redis, when configured, for the limits and the remembered outcomes.
    let backend = config
        .limits
        .redis
        .as_ref()
        .map(Backend::start)
        .transpose()?;
    let limits = Arc::new(limits(config, backend.as_ref()));
    let idempotency = idempotency(config, backend.as_ref());
    Ok(Service::new(ServiceState {
        cognito,
        callers,
        limits,
        usernames,
        masking,
        calls,
        idempotency,
    }))
}

/// tonic's routes (the gRPC door behind its intake, health, reflection v1 and v1alpha) and
/// the Connect door in front of them, when it is open. Calls of both doors take their places
/// at one gate.
fn routes(
    config: &Config,
    service: Service,
    callers: Arc<Callers>,
    health: &HealthReporter,
) -> Result<(Routes, Option<Connect>), AppError> {
    // Both reflection versions list every service, each other included.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .include_reflection_service(false)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            )
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
    };
    let settings = IntakeSettings {
        identity_header: config.identity_header,
        max_calls: config.max_concurrent_calls.get(),
        max_calls_per_peer: config.max_concurrent_calls_per_peer.get(),
        max_request_bytes: config.max_request_bytes,
        body_timeout: config.request_body_timeout,
    };
    let gate = Gate::new(settings, callers);
    let connect = config
        .connect_protocol
        .then(|| Connect::new(service.clone(), gate.clone()));
    let grpc = PasswordRecoveryServer::new(Grpc::new(service))
        .max_decoding_message_size(config.max_request_bytes);
    let routes = Routes::new(Intake::new(grpc, gate))
        .add_service(health_service(health))
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?);
    Ok((routes, connect))
}

/// The hashers of usernames: one for log pseudonyms and audit events, one for simulated
/// answers. Both derive from `USERNAME_HASH_KEY_FILE` when it is set, so replicas agree.
/// Without it, pseudonyms use a random per-process key, and simulated answers a key derived
/// from the default client's secret as read at start-up (or the same random key), so an
/// unknown user still gets the same answer from every replica that shares the secret.
fn username_hashers(config: &Config) -> (UsernameHasher, UsernameHasher) {
    const PSEUDONYMS: &str = "password-recovery/log-pseudonyms";
    const MASKING: &str = "password-recovery/simulated-delivery";
    if let Some(key) = &config.username_hash_key {
        let key = key.expose_secret();
        return (
            UsernameHasher::derived(key, PSEUDONYMS),
            UsernameHasher::derived(key, MASKING),
        );
    }
    tracing::warn!(
        "USERNAME_HASH_KEY_FILE is not set: usernames in logs and audit events are hashed under \
         a random per-process key, so their hashes differ across replicas and restarts"
    );
    let random = UsernameHasher::random();
    let masking = match &config.cognito.default_client().secret {
        Some(secret) => UsernameHasher::derived(secret.expose_secret().as_bytes(), MASKING),
        None => {
            tracing::warn!(
                "no client secret either: simulated answers for unknown users differ between \
                 replicas"
            );
            random.clone()
        }
    };
    (random, masking)
}

fn health_service(reporter: &HealthReporter) -> HealthServer<HealthService> {
    HealthServer::new(HealthService::from_health_reporter(reporter.clone()))
}

/// A server that ended before shutdown was asked for: always a failure.
fn unexpected_end(ended: Option<Result<Result<(), AppError>, tokio::task::JoinError>>) -> AppError {
    match ended {
        Some(Ok(Err(err))) => err,
        Some(Err(join)) => AppError::Stopped(join.to_string()),
        Some(Ok(Ok(()))) | None => AppError::Stopped("a server stopped on its own".into()),
    }
}

/// Completes on the first SIGTERM or SIGINT. A second one, during the drain, ends the process
/// at once (exit code 1).
fn stop_signals() -> impl Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    // Installed now, before anything is served, so that from the first "serving gRPC" line on
    // a stop signal is never the default action (exit at once, mid-call).
    let handlers = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    let (first, stopped) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut terminate, mut interrupt) = match handlers {
            (Ok(terminate), Ok(interrupt)) => (terminate, interrupt),
            (Err(err), _) | (_, Err(err)) => {
                tracing::error!(error = %err, "cannot listen for stop signals");
                return std::mem::forget(first);
            }
        };
        let mut next = async || {
            tokio::select! {
                _ = terminate.recv() => "SIGTERM",
                _ = interrupt.recv() => "SIGINT",
            }
        };
        let signal = next().await;
        tracing::info!("{signal} received");
        let _ = first.send(());
        let signal = next().await;
        tracing::error!("{signal} received again during the drain: exiting at once");
        std::process::exit(1);
    });
    async {
        if stopped.await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}
