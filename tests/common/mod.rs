//! Test support: a fake Cognito (a real HTTP server on loopback speaking Cognito's JSON 1.1
//! protocol, recording every request it receives) and the real application started on
//! `127.0.0.1:0` against it, driven through the generated gRPC client.

#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use password_recovery::app::{Application, StartupError};
use password_recovery::config::{CognitoSettings, Config, LogFormat, LogSettings};
use password_recovery::domain::ClientId;
use password_recovery::proto::v1::password_recovery_client::PasswordRecoveryClient;
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic_types::{ErrorInfo, StatusExt};

/// The app client the test application serves.
pub const CLIENT_ID: &str = "testclient123";
/// Its secret.
pub const CLIENT_SECRET: &str = "test-client-secret";
/// The request id the fake Cognito puts on every answer.
pub const REQUEST_ID: &str = "11111111-2222-3333-4444-555555555555";

/// What the fake Cognito answers to one request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// 200 with this JSON body.
    Ok(Value),
    /// A Cognito error: `__type` and `message` in a JSON body with this HTTP status.
    Error {
        status: u16,
        code: &'static str,
        message: &'static str,
    },
    /// This HTTP status and raw body (e.g. empty), with no error code.
    Raw { status: u16, body: &'static str },
    /// No answer for 30 s (bounded, so a broken test still ends).
    Hang,
    /// This reply after a pause.
    After(Duration, Box<Reply>),
}

impl Reply {
    /// Cognito's usual error answer: HTTP 400 with the exception name.
    pub fn error(code: &'static str) -> Self {
        Self::Error {
            status: 400,
            code,
            message: "message from Cognito",
        }
    }
}

/// One request the fake Cognito received.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// The operation, from `X-Amz-Target` without the service prefix.
    pub operation: String,
    /// The JSON body.
    pub body: Value,
    /// Whether the request carried an `Authorization` header (it must not: no credentials).
    pub signed: bool,
}

#[derive(Default)]
struct FakeState {
    script: VecDeque<Reply>,
    recorded: Vec<Recorded>,
}

/// A local HTTP server that speaks Cognito's JSON protocol.
#[derive(Clone)]
pub struct FakeCognito {
    pub url: String,
    state: Arc<Mutex<FakeState>>,
}

impl FakeCognito {
    /// Starts the server on a free loopback port. Unscripted requests succeed.
    pub async fn start() -> Self {
        let state = Arc::new(Mutex::new(FakeState::default()));
        let router = axum::Router::new()
            .fallback(handle)
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        Self { url, state }
    }

    /// Queues replies for the next requests, in order.
    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.state.lock().unwrap().script.extend(replies);
    }

    /// Every request received so far.
    pub fn recorded(&self) -> Vec<Recorded> {
        self.state.lock().unwrap().recorded.clone()
    }
}

async fn handle(
    State(state): State<Arc<Mutex<FakeState>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let target = headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let operation = target
        .strip_prefix("AWSCognitoIdentityProviderService.")
        .unwrap_or(target)
        .to_owned();
    let reply = {
        let mut state = state.lock().unwrap();
        state.recorded.push(Recorded {
            operation: operation.clone(),
            body: serde_json::from_slice(&body).unwrap_or(Value::Null),
            signed: headers.contains_key("authorization"),
        });
        state.script.pop_front()
    };
    let reply = reply.unwrap_or_else(|| default_reply(&operation));
    respond(reply).await
}

fn default_reply(operation: &str) -> Reply {
    match operation {
        "ForgotPassword" => Reply::Ok(json!({
            "CodeDeliveryDetails": {
                "Destination": "a***@e***",
                "DeliveryMedium": "EMAIL",
                "AttributeName": "email"
            }
        })),
        "ConfirmForgotPassword" => Reply::Ok(json!({})),
        _ => Reply::Error {
            status: 400,
            code: "UnknownOperationException",
            message: "",
        },
    }
}

async fn respond(reply: Reply) -> Response {
    let mut reply = reply;
    loop {
        match reply {
            Reply::After(pause, then) => {
                tokio::time::sleep(pause).await;
                reply = *then;
            }
            Reply::Hang => {
                tokio::time::sleep(Duration::from_secs(30)).await;
                return StatusCode::GATEWAY_TIMEOUT.into_response();
            }
            Reply::Ok(body) => return amz_json(200, body.to_string()),
            Reply::Error {
                status,
                code,
                message,
            } => {
                return amz_json(
                    status,
                    json!({ "__type": code, "message": message }).to_string(),
                );
            }
            Reply::Raw { status, body } => return amz_json(status, body.to_owned()),
        }
    }
}

fn amz_json(status: u16, body: String) -> Response {
    (
        StatusCode::from_u16(status).unwrap(),
        [
            ("content-type", "application/x-amz-json-1.1"),
            ("x-amzn-requestid", REQUEST_ID),
        ],
        body,
    )
        .into_response()
}

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
        }
    }
}

/// The application, serving on a free loopback port in this process.
pub struct TestApp {
    pub addr: SocketAddr,
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
        };
        let app = Application::build(config)
            .await
            .expect("application builds");
        let addr = app.local_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until(async {
            let _ = stopped.await;
        }));
        Self {
            addr,
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
