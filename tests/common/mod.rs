//! Test support: the real application started in-process on `127.0.0.1:0` against a fake
//! Cognito, the real binary as a child process, moto, and the real third-party tools.

#![allow(dead_code, unused_imports)]

pub mod certs;
pub mod cognito_model;
pub mod fake_cognito;
pub mod fleet;
pub mod moto;
pub mod process;
pub mod raw;
pub mod redis_cluster;
pub mod redis_server;
pub mod symbol_order;

pub mod tools;

use std::collections::HashMap;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::time::Duration;

pub use fake_cognito::{FakeCognito, REQUEST_ID, Recorded, Reply};
use password_recovery::app::{AppError, Application};
use password_recovery::config::{Command, Config};
use password_recovery::proto::v1::password_recovery_client::PasswordRecoveryClient;
use password_recovery::proto::v1::{ConfirmForgotPasswordRequest, ForgotPasswordRequest};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic_types::{ErrorInfo, StatusExt};

/// The app client the test application serves.
pub const CLIENT_ID: &str = "testclient123";
/// Its secret.
pub const CLIENT_SECRET: &str = "test-client-secret";

/// What every in-process test application has on top of the service's own defaults: the fake
/// Cognito's app client, loopback ports on 0, text logs, and no per-username limit (tests call
/// the same usernames many times). Tests override any setting by its environment variable.
fn test_settings(cognito_url: &str) -> Vec<(&'static str, String)> {
    vec![
        ("COGNITO_CLIENT_ID", CLIENT_ID.into()),
        ("COGNITO_CLIENT_SECRET", CLIENT_SECRET.into()),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_ENDPOINT_URL", cognito_url.into()),
        ("GRPC_LISTEN_ADDR", "127.0.0.1:0".into()),
        ("HEALTH_LISTEN_ADDR", "127.0.0.1:0".into()),
        ("METRICS_LISTEN_ADDR", "127.0.0.1:0".into()),
        ("LOG_FORMAT", "text".into()),
        ("USERNAME_RATE_LIMIT", "off".into()),
        // Proven at start-up only: a long test's calls never meet a proof.
        ("CLIENT_CHECK_INTERVAL", "1h".into()),
    ]
}

/// The application, serving on a free loopback port in this process.
pub struct TestApp {
    pub addr: SocketAddr,
    /// The plaintext health port, with TLS on.
    pub health_addr: Option<SocketAddr>,
    pub metrics_addr: SocketAddr,
    pub cognito: FakeCognito,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), AppError>>,
}

impl TestApp {
    /// Starts the application with the test settings.
    pub async fn spawn() -> Self {
        Self::spawn_with(&[]).await
    }

    /// Starts the application against a fresh fake Cognito, configured as the binary is (the
    /// same parsing of the same settings): the service's defaults, the test settings, then
    /// `overrides`, each named by its environment variable.
    pub async fn spawn_with(overrides: &[(&str, &str)]) -> Self {
        let cognito = FakeCognito::start().await;
        let mut settings: HashMap<&str, String> = test_settings(&cognito.url).into_iter().collect();
        for (name, value) in overrides {
            settings.insert(name, (*value).to_owned());
        }
        let loaded = Config::load_from(["password-recovery"], |name| {
            settings.get(name).map(OsString::from)
        });
        let config = match loaded.expect("valid test settings") {
            Command::Run(config) => *config,
            Command::Check(_) => panic!("the settings asked to check"),
            Command::Print(text) => panic!("the settings asked to print {text}"),
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
    pub async fn stop(mut self) -> Result<(), AppError> {
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

/// A TCP connection to `target` from the loopback address `from` (all of 127.0.0.0/8 is
/// loopback: another address plays another peer).
pub async fn connect_from(
    from: std::net::IpAddr,
    target: SocketAddr,
) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    socket.connect(target).await
}

/// The `n`th peer address other than 127.0.0.1: 127.0.0.{n + 2}.
pub fn peer(n: usize) -> std::net::IpAddr {
    std::net::IpAddr::from([127, 0, 0, u8::try_from(n + 2).expect("at most 253 peers")])
}

/// The shipped default of the numeric setting `name`.
pub fn default_number(name: &str) -> u64 {
    password_recovery::config::default_value(name)
        .unwrap_or_else(|| panic!("{name} has a default"))
        .parse()
        .unwrap()
}

/// The README's memory bound (`memory::bound_bytes`) at the shipped defaults.
pub fn shipped_memory_bound() -> u64 {
    password_recovery::memory::bound_bytes(
        default_number("MAX_CONNECTIONS"),
        default_number("MAX_CONCURRENT_CALLS"),
        default_number("MAX_REQUEST_BYTES"),
        default_number("USERNAME_RATE_LIMIT_MAX_KEYS"),
        default_number("IDEMPOTENCY_MAX_KEYS"),
    )
}

/// Reads `stream` until the server closes it, within `within`; panics saying `what` otherwise.
pub async fn closed_within(stream: &mut tokio::net::TcpStream, within: Duration, what: &str) {
    use tokio::io::AsyncReadExt;
    let mut sink = Vec::new();
    tokio::time::timeout(within, stream.read_to_end(&mut sink))
        .await
        .unwrap_or_else(|_| panic!("{what}: still open after {within:?}"))
        .ok();
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

/// The sum of every series of `name` whose line holds all of `labels` (0 when none does).
pub fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| {
            l.split(['{', ' ']).next() == Some(name) && labels.iter().all(|label| l.contains(label))
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
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

/// The gRPC health status of `service` at `target` (`127.0.0.1:PORT`, plaintext); `None` when
/// the server knows no such service.
pub async fn health_status(
    target: &str,
    service: &str,
) -> Option<tonic_health::pb::health_check_response::ServingStatus> {
    let channel = Channel::from_shared(format!("http://{target}"))
        .unwrap()
        .connect()
        .await
        .expect("connects");
    let answer = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        })
        .await;
    match answer {
        Ok(answer) => Some(answer.into_inner().status()),
        Err(status) if status.code() == tonic::Code::NotFound => None,
        Err(status) => panic!("health check failed: {status:?}"),
    }
}

/// A loopback port free at the time of asking.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
