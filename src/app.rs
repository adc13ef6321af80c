//! The application: builds the Cognito client, the gRPC services (PasswordRecovery, health,
//! reflection v1 and v1alpha) and the listener, then serves until told to stop, draining
//! in-flight calls (DESIGN.md §5).

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use secrecy::ExposeSecret;
use tokio::net::TcpListener;
use tonic::service::Routes;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::api::PasswordRecoveryService;
use crate::cognito::Cognito;
use crate::config::{Config, ConfigError};
use crate::privacy::UsernameHasher;
use crate::proto;
use crate::proto::v1::password_recovery_server::PasswordRecoveryServer;

/// The name health reports the API under.
pub const SERVICE_NAME: &str = "passwordrecovery.v1.PasswordRecovery";

/// Why the application could not start or keep serving.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// A setting is missing or malformed (exit code 2).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr} (GRPC_LISTEN_ADDR): {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The reflection service could not load a descriptor set.
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The gRPC server failed.
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// A built application, bound to its port and ready to serve.
pub struct Application {
    listener: TcpListener,
    local_addr: SocketAddr,
    routes: Routes,
    health: HealthReporter,
    shutdown_delay: Duration,
    shutdown_grace_period: Duration,
}

impl Application {
    /// Builds every part and binds the listener. Health turns SERVING once the Cognito client
    /// is built.
    pub async fn build(config: Config) -> Result<Self, StartupError> {
        let cognito = Cognito::connect(&config.cognito).await?;
        tracing::info!(
            client_id = %config.cognito.client_id,
            client_secret = if config.cognito.client_secret.is_some() { "set" } else { "none" },
            region = cognito.region(),
            endpoint = config.cognito.endpoint_url.as_deref().unwrap_or("default"),
            cognito_timeout = %humantime::format_duration(config.cognito.timeout),
            enumeration_protection = config.enumeration_protection,
            "Cognito client ready"
        );

        // With a client secret, replicas share the key, so an unknown user gets the same
        // simulated answer from each of them.
        let usernames = match &config.cognito.client_secret {
            Some(secret) => UsernameHasher::derived(
                secret.expose_secret().as_bytes(),
                "password-recovery/usernames",
            ),
            None => {
                tracing::warn!(
                    "no client secret: usernames are hashed under a random per-process key, so \
                     simulated answers for unknown users differ between replicas"
                );
                UsernameHasher::random()
            }
        };
        let service = PasswordRecoveryService::new(
            cognito,
            config.cognito.timeout,
            config.enumeration_protection,
            usernames,
        );

        let health = HealthReporter::new();
        health
            .set_serving::<PasswordRecoveryServer<PasswordRecoveryService>>()
            .await;
        health.set_service_status("", ServingStatus::Serving).await;
        let health_service = tonic_health::pb::health_server::HealthServer::new(
            tonic_health::server::HealthService::from_health_reporter(health.clone()),
        );

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
        let routes = Routes::new(PasswordRecoveryServer::new(service))
            .add_service(health_service)
            .add_service(reflection().build_v1()?)
            .add_service(reflection().build_v1alpha()?);

        let addr = config.grpc_listen_addr;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StartupError::Bind { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| StartupError::Bind { addr, source })?;

        Ok(Self {
            listener,
            local_addr,
            routes,
            health,
            shutdown_delay: config.shutdown_delay,
            shutdown_grace_period: config.shutdown_grace_period,
        })
    }

    /// The address the listener is bound to (with the real port when configured as 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until SIGTERM or SIGINT, then shuts down gracefully.
    pub async fn run_until_stopped(self) -> Result<(), StartupError> {
        self.run_until(stop_signal()).await
    }

    /// Serves until `stop` completes, then: health NOT_SERVING; keep serving for
    /// `SHUTDOWN_DELAY`; stop accepting; let in-flight calls finish within
    /// `SHUTDOWN_GRACE_PERIOD`.
    pub async fn run_until(self, stop: impl Future<Output = ()>) -> Result<(), StartupError> {
        let (close, closed) = tokio::sync::oneshot::channel::<()>();
        let incoming = TcpIncoming::from(self.listener).with_nodelay(Some(true));
        let server = Server::builder()
            .add_routes(self.routes)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = closed.await;
            });
        tokio::pin!(server);
        tracing::info!(addr = %self.local_addr, "serving gRPC");

        tokio::select! {
            result = &mut server => return result.map_err(Into::into),
            () = stop => {}
        }
        tracing::info!(
            delay = %humantime::format_duration(self.shutdown_delay),
            grace = %humantime::format_duration(self.shutdown_grace_period),
            "stop requested: NOT_SERVING"
        );
        self.health
            .set_not_serving::<PasswordRecoveryServer<PasswordRecoveryService>>()
            .await;
        self.health
            .set_service_status("", ServingStatus::NotServing)
            .await;

        tokio::select! {
            result = &mut server => return result.map_err(Into::into),
            () = tokio::time::sleep(self.shutdown_delay) => {}
        }
        tracing::info!("no longer accepting connections; draining in-flight calls");
        let _ = close.send(());
        match tokio::time::timeout(self.shutdown_grace_period, server).await {
            Ok(result) => result?,
            Err(_) => tracing::warn!(
                grace = %humantime::format_duration(self.shutdown_grace_period),
                "grace period over with calls still in flight; stopping anyway"
            ),
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// Completes on the first SIGTERM or SIGINT.
async fn stop_signal() {
    let interrupt = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %err, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                tracing::error!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => tracing::info!("SIGINT received"),
        () = terminate => tracing::info!("SIGTERM received"),
    }
}
