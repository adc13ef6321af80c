//! A fake Cognito: a real HTTP server on loopback speaking Cognito's JSON 1.1 protocol
//! (`X-Amz-Target`, `__type` errors, `x-amzn-RequestId`) that answers from a script and records
//! every request it receives. It can answer by a rule of its own (`respond_with`), hold answers
//! until a test releases them, and tell a test when requests have arrived, so tests wait on
//! signals, never on sleeps.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

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
    /// This reply once the test calls `release`.
    Held(Box<Reply>),
    /// Any status, content type and body bytes.
    Bytes {
        status: u16,
        content_type: &'static str,
        body: Vec<u8>,
    },
    /// 200 with Cognito's content type and a body of this many bytes, streamed.
    Huge(usize),
    /// 200 announcing a JSON body, of which only the first bytes are sent before the
    /// connection breaks.
    Truncated,
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

    /// The error answer that is `code`'s row of the error table: a NotAuthorizedException
    /// says an account's state (other messages are a misconfiguration, not the row's).
    pub fn row_error(code: &'static str) -> Self {
        match code {
            "NotAuthorizedException" => Self::Error {
                status: 400,
                code,
                message: "User is disabled.",
            },
            _ => Self::error(code),
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

type Rule = Arc<dyn Fn(&Recorded) -> Reply + Send + Sync>;

#[derive(Default)]
struct FakeState {
    script: VecDeque<Reply>,
    recorded: Vec<Recorded>,
    rule: Option<Rule>,
    /// The service's proofs of its app clients, kept apart from the calls.
    probes: Vec<Recorded>,
    probe_rule: Option<Rule>,
}

struct Shared {
    state: Mutex<FakeState>,
    arrived: tokio::sync::Notify,
    released: tokio::sync::Semaphore,
    /// Bytes of `Reply::Huge` bodies handed to the connection so far.
    huge_sent: std::sync::atomic::AtomicUsize,
}

/// A local HTTP server that speaks Cognito's JSON protocol.
#[derive(Clone)]
pub struct FakeCognito {
    pub url: String,
    shared: Arc<Shared>,
}

impl FakeCognito {
    /// Starts the server on a free loopback port. Unscripted requests succeed.
    pub async fn start() -> Self {
        let shared = Arc::new(Shared {
            state: Mutex::default(),
            arrived: tokio::sync::Notify::new(),
            released: tokio::sync::Semaphore::new(0),
            huge_sent: std::sync::atomic::AtomicUsize::new(0),
        });
        let router = axum::Router::new()
            .fallback(handle)
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        Self { url, shared }
    }

    /// Queues replies for the next requests, in order.
    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.shared.state.lock().unwrap().script.extend(replies);
    }

    /// Answers every unscripted request by `rule`.
    pub fn respond_with(&self, rule: impl Fn(&Recorded) -> Reply + Send + Sync + 'static) {
        self.shared.state.lock().unwrap().rule = Some(Arc::new(rule));
    }

    /// Answers the service's proofs (a ForgotPassword for `probe-…@probe.password-recovery.invalid`)
    /// by `rule`. Without one, they are answered by the `respond_with` rule (a user pool model
    /// answers them as its mode says) or else as a simulated delivery; they never take a
    /// scripted reply and are not among `recorded`.
    pub fn probe_with(&self, rule: impl Fn(&Recorded) -> Reply + Send + Sync + 'static) {
        self.shared.state.lock().unwrap().probe_rule = Some(Arc::new(rule));
    }

    /// Every proof received so far.
    pub fn probes(&self) -> Vec<Recorded> {
        self.shared.state.lock().unwrap().probes.clone()
    }

    /// Waits (at most 30 s) until at least `count` proofs have arrived in all.
    pub async fn probed(&self, count: usize) {
        let wait = async {
            loop {
                let notified = self.shared.arrived.notified();
                if self.shared.state.lock().unwrap().probes.len() >= count {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(Duration::from_secs(30), wait)
            .await
            .unwrap_or_else(|_| panic!("{count} proofs did not arrive within 30 s"));
    }

    /// Every request received so far.
    pub fn recorded(&self) -> Vec<Recorded> {
        self.shared.state.lock().unwrap().recorded.clone()
    }

    /// Waits (at most 30 s) until at least `count` requests have arrived in all.
    pub async fn arrived(&self, count: usize) {
        let wait = async {
            loop {
                let notified = self.shared.arrived.notified();
                if self.shared.state.lock().unwrap().recorded.len() >= count {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(Duration::from_secs(30), wait)
            .await
            .unwrap_or_else(|_| panic!("{count} requests did not arrive within 30 s"));
    }

    /// Bytes of `Reply::Huge` bodies handed to the connection so far: what the client read,
    /// plus at most what the sockets' buffers hold.
    pub fn huge_bytes_sent(&self) -> usize {
        self.shared
            .huge_sent
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Lets `count` held answers go.
    pub fn release(&self, count: usize) {
        self.shared.released.add_permits(count);
    }
}

async fn handle(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let target = headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let operation = target
        .strip_prefix("AWSCognitoIdentityProviderService.")
        .unwrap_or(target)
        .to_owned();
    let recorded = Recorded {
        operation: operation.clone(),
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        signed: headers.contains_key("authorization"),
    };
    let probe = recorded.body["Username"].as_str().is_some_and(|name| {
        name.starts_with("probe-") && name.ends_with("@probe.password-recovery.invalid")
    });
    let reply = {
        let mut state = shared.state.lock().unwrap();
        let rule = state.rule.clone();
        if probe {
            state.probes.push(recorded.clone());
            state
                .probe_rule
                .clone()
                .or(rule)
                .map(|rule| rule(&recorded))
        } else {
            state.recorded.push(recorded.clone());
            state
                .script
                .pop_front()
                .or_else(|| rule.map(|rule| rule(&recorded)))
        }
    };
    shared.arrived.notify_waiters();
    let reply = reply.unwrap_or_else(|| default_reply(&operation));
    respond(reply, &shared).await
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

async fn respond(reply: Reply, shared: &Arc<Shared>) -> Response {
    let mut reply = reply;
    loop {
        match reply {
            Reply::Held(then) => {
                shared.released.acquire().await.unwrap().forget();
                reply = *then;
            }
            Reply::Bytes {
                status,
                content_type,
                body,
            } => {
                return (
                    StatusCode::from_u16(status).unwrap(),
                    [
                        ("content-type", content_type),
                        ("x-amzn-requestid", REQUEST_ID),
                    ],
                    body,
                )
                    .into_response();
            }
            Reply::Huge(bytes) => {
                let chunk = Bytes::from(vec![b' '; 64 * 1024]);
                let chunks = bytes.div_ceil(chunk.len());
                let shared = shared.clone();
                let stream = tokio_stream::iter((0..chunks).map(move |_| {
                    let sent = std::sync::atomic::Ordering::SeqCst;
                    shared.huge_sent.fetch_add(chunk.len(), sent);
                    Ok::<_, std::io::Error>(chunk.clone())
                }));
                return (
                    StatusCode::OK,
                    [("content-type", "application/x-amz-json-1.1")],
                    axum::body::Body::from_stream(stream),
                )
                    .into_response();
            }
            Reply::Truncated => {
                let stream = tokio_stream::iter([
                    Ok(Bytes::from_static(b"{\"CodeDeliveryDetails\": {")),
                    Err(std::io::Error::other("connection broken mid-answer")),
                ]);
                return (
                    StatusCode::OK,
                    [("content-type", "application/x-amz-json-1.1")],
                    axum::body::Body::from_stream(stream),
                )
                    .into_response();
            }
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
