//! Test support: the real application started in-process on `127.0.0.1:0` against a fake
//! Cognito, the real binary as a child process, moto, and the real third-party tools.

#![allow(dead_code, unused_imports)]

pub mod certs;
pub mod fake_cognito;
pub mod moto;
pub mod process;
pub mod raw;
pub mod redis_server;
pub mod tools;

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::time::Duration;

pub use fake_cognito::{FakeCognito, REQUEST_ID, Recorded, Reply};
use password_recovery::app::{Application, StartupError};
use password_recovery::cognito::CognitoSettings;
use password_recovery::config::Config;
use password_recovery::domain::ClientId;
use password_recovery::limits::{LimitSettings, UsernameRateLimit};
use password_recovery::proto::v1::password_recovery_client::PasswordRecoveryClient;
use password_recovery::proto::v1::{ConfirmForgotPasswordRequest, ForgotPasswordRequest};
use password_recovery::telemetry::{LogFormat, LogSettings};
use password_recovery::tls::TlsSettings;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic_types::{ErrorInfo, StatusExt};

/// The app client the test application serves.
pub const CLIENT_ID: &str = "testclient123";
/// Its secret.
pub const CLIENT_SECRET: &str = "test-client-secret";

/// How to start the application under test.
#[derive(Debug, Clone)]
pub struct Options {
    pub enumeration_protection: bool,
    pub cognito_timeout: Duration,
    pub client_secret: Option<&'static str>,
    pub shutdown_delay: Duration,
    pub shutdown_grace_period: Duration,
    /// Point at this URL instead of the fake Cognito.
    pub endpoint_url: Option<String>,
    /// TLS on the gRPC port.
    pub tls: Option<TlsSettings>,
    /// Rate limits and load shedding (off unless a test turns them on).
    pub limits: LimitSettings,
    pub idle_timeout: Duration,
    pub max_request_bytes: usize,
    pub max_concurrent_calls: usize,
    pub max_connections: usize,
    pub username_hash_key: Option<&'static [u8]>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            enumeration_protection: true,
            cognito_timeout: Duration::from_secs(5),
            client_secret: Some(CLIENT_SECRET),
            shutdown_delay: Duration::ZERO,
            shutdown_grace_period: Duration::from_secs(10),
            endpoint_url: None,
            tls: None,
            limits: LimitSettings {
                username: UsernameRateLimit::Off,
                username_max_keys: NonZeroUsize::new(100_000).unwrap(),
                global_rps: None,
                max_concurrent_upstream: NonZeroUsize::new(64).unwrap(),
                redis: None,
            },
            idle_timeout: Duration::from_secs(300),
            max_request_bytes: 1 << 16,
            max_concurrent_calls: 128,
            max_connections: 256,
            username_hash_key: None,
        }
    }
}

/// The application, serving on a free loopback port in this process.
pub struct TestApp {
    pub addr: SocketAddr,
    /// The plaintext health port, with TLS on.
    pub health_addr: Option<SocketAddr>,
    pub metrics_addr: SocketAddr,
    pub cognito: FakeCognito,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), StartupError>>,
}

impl TestApp {
    /// Starts the application with the default options.
    pub async fn spawn() -> Self {
        Self::spawn_with(Options::default()).await
    }

    /// Starts the application with `options` against a fresh fake Cognito.
    pub async fn spawn_with(options: Options) -> Self {
        let cognito = FakeCognito::start().await;
        let config = Config {
            grpc_listen_addr: "127.0.0.1:0".parse().unwrap(),
            cognito: CognitoSettings {
                client_id: ClientId::parse("COGNITO_CLIENT_ID", CLIENT_ID.into()).unwrap(),
                client_secret: options.client_secret.map(Into::into),
                timeout: options.cognito_timeout,
                region: Some("us-east-1".into()),
                endpoint_url: Some(options.endpoint_url.unwrap_or_else(|| cognito.url.clone())),
            },
            enumeration_protection: options.enumeration_protection,
            shutdown_delay: options.shutdown_delay,
            shutdown_grace_period: options.shutdown_grace_period,
            log: LogSettings {
                filter: "info".into(),
                format: LogFormat::Text,
            },
            tls: options.tls,
            health_listen_addr: "127.0.0.1:0".parse().unwrap(),
            metrics_listen_addr: "127.0.0.1:0".parse().unwrap(),
            otlp_endpoint: None,
            limits: options.limits,
            max_request_bytes: options.max_request_bytes,
            keepalive_interval: Duration::from_secs(30),
            idle_timeout: options.idle_timeout,
            username_hash_key: options.username_hash_key.map(|key| key.to_vec().into()),
            max_concurrent_calls: NonZeroUsize::new(options.max_concurrent_calls).unwrap(),
            max_connections: NonZeroUsize::new(options.max_connections).unwrap(),
            max_concurrent_streams: 32,
        };
        let app = Application::build(config)
            .await
            .expect("application builds");
        let addr = app.local_addr();
        let health_addr = app.health_addr();
        let metrics_addr = app.metrics_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until(async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            health_addr,
            metrics_addr,
            cognito,
            stop: Some(stop),
            task,
        }
    }

    /// A channel to the application.
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .expect("connects")
    }

    /// A PasswordRecovery client.
    pub async fn client(&self) -> PasswordRecoveryClient<Channel> {
        PasswordRecoveryClient::new(self.channel().await)
    }

    /// Sends the stop signal without waiting.
    pub fn request_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Sends the stop signal and waits for the application to finish.
    pub async fn stop(mut self) -> Result<(), StartupError> {
        self.request_stop();
        self.task.await.expect("application task")
    }
}

/// A ForgotPassword request for `username`, nothing else set.
pub fn forgot(username: &str) -> ForgotPasswordRequest {
    ForgotPasswordRequest {
        username: username.into(),
        ..Default::default()
    }
}

/// A valid ConfirmForgotPassword request for `username`.
pub fn confirm(username: &str) -> ConfirmForgotPasswordRequest {
    ConfirmForgotPasswordRequest {
        username: username.into(),
        confirmation_code: "123456".into(),
        password: "N3w-Passw0rd!".into(),
        ..Default::default()
    }
}

/// The status's one ErrorInfo, asserting its domain.
pub fn error_info(status: &tonic::Status) -> ErrorInfo {
    let info = status
        .get_details_error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"));
    assert_eq!(info.domain, "password-recovery");
    info
}

/// Asserts the gRPC code and ErrorInfo reason of `status`.
pub fn assert_error(status: &tonic::Status, code: tonic::Code, reason: &str) -> ErrorInfo {
    assert_eq!(status.code(), code, "{status:?}");
    let info = error_info(status);
    assert_eq!(info.reason, reason, "{status:?}");
    info
}

/// A loopback URL where nothing listens.
pub async fn closed_port_url() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}")
}

/// The value of the first Prometheus series named `name` (a prefix: `_total`, `_count`, … may
/// follow) whose line holds every one of `labels`, if any.
pub fn metric(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|label| l.contains(label)))
        .find_map(|l| l.rsplit_once(' ')?.1.parse().ok())
}

/// `GET /metrics` over plain HTTP/1.1; returns the body.
pub async fn scrape(addr: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("metrics port");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: metrics\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_lowercase().contains("content-type: text/plain"),
        "{head}"
    );
    body.to_owned()
}
