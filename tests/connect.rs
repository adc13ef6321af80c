//! The Connect protocol on the gRPC port, driven by real clients: `curl` (HTTP/1.1, h2c, and
//! HTTP/1.1 over TLS) and `buf curl --protocol connect`, next to grpcurl and the tonic client
//! on the same port. The application runs in-process against the fake Cognito, which records
//! what reaches it.

mod common;

use std::collections::HashMap;
use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use common::certs::{Ca, SecretMount};
use common::tools::{buf, curl, run_grpcurl};
use common::{CLIENT_ID, CLIENT_SECRET, REQUEST_ID, Reply, TestApp, forgot};
use password_recovery::error::COGNITO_ERRORS;
use password_recovery::proto::v1::ForgotPasswordResponse;
use prost::Message;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

/// One HTTP answer, as curl printed it.
#[derive(Debug)]
struct Answer {
    status: u16,
    /// Header names in lowercase.
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    /// The Connect error's detail of `type_name`: its `debug` JSON, after checking that its
    /// base64 `value` holds the same message.
    fn detail(&self, type_name: &str) -> Option<Value> {
        let body = self.json();
        let detail = body["details"]
            .as_array()?
            .iter()
            .find(|d| d["type"] == type_name)?
            .clone();
        let value = STANDARD_NO_PAD
            .decode(detail["value"].as_str().expect("a base64 value"))
            .expect("unpadded standard base64");
        if type_name == "google.rpc.ErrorInfo" {
            let info = tonic_types::pb::ErrorInfo::decode(&*value).unwrap();
            assert_eq!(detail["debug"]["reason"], info.reason);
            assert_eq!(detail["debug"]["domain"], info.domain);
        }
        Some(detail["debug"].clone())
    }

    /// Asserts a Connect error: HTTP status, code and ErrorInfo reason; returns the ErrorInfo.
    fn assert_error(&self, http: u16, code: &str, reason: &str) -> Value {
        let body = self.json();
        assert_eq!(self.status, http, "{body}");
        assert_eq!(body["code"], code, "{body}");
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "{body}"
        );
        let info = self.detail("google.rpc.ErrorInfo").expect("an ErrorInfo");
        assert_eq!(info["reason"], reason, "{body}");
        assert_eq!(info["domain"], "password-recovery");
        info
    }
}

/// Runs curl with `args`, and returns the final answer (after any `100 Continue`).
async fn run_curl(args: &[&str]) -> Answer {
    let output = tokio::process::Command::new(curl())
        .args(["--silent", "--show-error", "--include", "--max-time", "20"])
        .args(args)
        .output()
        .await
        .expect("curl runs");
    // Arguments are shown cut short: a body may be 100 KB.
    let shown: Vec<String> = args.iter().map(|a| a.chars().take(200).collect()).collect();
    assert!(
        output.status.success(),
        "curl {shown:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    parse_answer(&output.stdout)
}

fn parse_answer(mut raw: &[u8]) -> Answer {
    loop {
        let end = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a header block");
        let head = String::from_utf8_lossy(&raw[..end]).into_owned();
        raw = &raw[end + 4..];
        let mut lines = head.lines();
        let status: u16 = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .expect("a status line");
        if (100..200).contains(&status) {
            continue;
        }
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        return Answer {
            status,
            headers,
            body: raw.to_vec(),
        };
    }
}

fn url(app: &TestApp, method: &str) -> String {
    format!(
        "http://{}/passwordrecovery.v1.PasswordRecovery/{method}",
        app.addr
    )
}

/// POSTs `body` as JSON over HTTP/1.1, with `extra` curl arguments.
async fn post_json(app: &TestApp, method: &str, body: &str, extra: &[&str]) -> Answer {
    let url = url(app, method);
    let mut args = vec![
        "--http1.1",
        "--header",
        "content-type: application/json",
        "--data-binary",
        body,
    ];
    args.extend_from_slice(extra);
    args.push(&url);
    run_curl(&args).await
}

/// A ConfirmForgotPassword for `username` by curl over HTTP/1.1 (with `extra` arguments),
/// running until it is answered.
fn confirm_in_the_background(
    app: &TestApp,
    username: &str,
    extra: &[&str],
) -> tokio::task::JoinHandle<Answer> {
    let url = url(app, "ConfirmForgotPassword");
    let body = confirm_json(username);
    let extra: Vec<String> = extra.iter().map(|a| (*a).to_owned()).collect();
    tokio::spawn(async move {
        let mut args = vec!["--http1.1", "--header", "content-type: application/json"];
        args.extend(extra.iter().map(String::as_str));
        args.extend(["--data-binary", &body, &url]);
        run_curl(&args).await
    })
}

fn confirm_json(username: &str) -> String {
    json!({"username": username, "confirmationCode": "123456", "password": "N3w-Passw0rd!"})
        .to_string()
}

/// The HTTP status Connect gives a code (its protocol's table).
fn connect_status(code: Code) -> (u16, &'static str) {
    match code {
        Code::InvalidArgument => (400, "invalid_argument"),
        Code::FailedPrecondition => (400, "failed_precondition"),
        Code::NotFound => (404, "not_found"),
        Code::PermissionDenied => (403, "permission_denied"),
        Code::ResourceExhausted => (429, "resource_exhausted"),
        Code::Unavailable => (503, "unavailable"),
        Code::Internal => (500, "internal"),
        Code::Unknown => (500, "unknown"),
        Code::DeadlineExceeded => (504, "deadline_exceeded"),
        other => panic!("no row maps to {other:?}"),
    }
}

#[tokio::test]
async fn both_rpcs_succeed_over_http1_and_h2c_with_json_and_proto() {
    let app = TestApp::spawn().await;

    let answer = post_json(
        &app,
        "ForgotPassword",
        r#"{"username": "alice", "clientMetadata": {"k": "v"}, "user_context": {"ipAddress": "192.0.2.1"}}"#,
        &["--header", "x-request-id: connect-request-1"],
    )
    .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.header("content-type"), Some("application/json"));
    assert_eq!(answer.header("x-request-id"), Some("connect-request-1"));
    let details = &answer.json()["codeDeliveryDetails"];
    assert_eq!(details["deliveryMedium"], "DELIVERY_MEDIUM_EMAIL");
    assert_eq!(details["destination"], "a***@e***", "{details}");
    assert_eq!(details["attributeName"], "email", "{details}");
    let sent = &app.cognito.recorded()[0];
    assert_eq!(sent.operation, "ForgotPassword");
    assert_eq!(sent.body["Username"], "alice");
    assert_eq!(sent.body["ClientId"], CLIENT_ID);
    assert_eq!(sent.body["ClientMetadata"]["k"], "v");
    assert_eq!(sent.body["UserContextData"]["IpAddress"], "192.0.2.1");
    let secret = secrecy::SecretString::from(CLIENT_SECRET);
    let expected = password_recovery::cognito::secret_hash(&secret, "alice", CLIENT_ID);
    assert_eq!(sent.body["SecretHash"], expected);

    let confirm_url = url(&app, "ConfirmForgotPassword");
    let body = confirm_json("alice");
    let answer = run_curl(&[
        "--http2-prior-knowledge",
        "--header",
        "content-type: application/json",
        "--header",
        "connect-protocol-version: 1",
        "--data-binary",
        &body,
        &confirm_url,
    ])
    .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.json(), json!({}));
    assert!(answer.header("x-request-id").is_some());
    let sent = &app.cognito.recorded()[1];
    assert_eq!(sent.operation, "ConfirmForgotPassword");
    assert_eq!(sent.body["ConfirmationCode"], "123456");
    assert_eq!(sent.body["Password"], "N3w-Passw0rd!");

    // Binary protobuf in and out.
    let request = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(request.path(), forgot("bob").encode_to_vec()).unwrap();
    let data = format!("@{}", request.path().display());
    let forgot_url = url(&app, "ForgotPassword");
    let answer = run_curl(&[
        "--http1.1",
        "--header",
        "content-type: application/proto",
        "--data-binary",
        &data,
        &forgot_url,
    ])
    .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.header("content-type"), Some("application/proto"));
    let response = ForgotPasswordResponse::decode(&*answer.body).unwrap();
    assert!(response.code_delivery_details.is_some());
    assert_eq!(app.cognito.recorded()[2].body["Username"], "bob");
}

#[tokio::test]
async fn connect_calls_are_counted_with_their_protocol() {
    // A process of its own: its metrics are its calls' alone.
    let cognito = common::FakeCognito::start().await;
    let service = common::process::ServiceProcess::against(&cognito, &[]).await;
    let url = format!(
        "http://{}/passwordrecovery.v1.PasswordRecovery/ForgotPassword",
        service.target
    );
    for _ in 0..2 {
        let answer = run_curl(&[
            "--http1.1",
            "--header",
            "content-type: application/json",
            "--data-binary",
            r#"{"username": "counted"}"#,
            &url,
        ])
        .await;
        assert_eq!(answer.status, 200, "{answer:?}");
    }
    service
        .client()
        .await
        .forgot_password(forgot("by-grpc"))
        .await
        .unwrap();

    let labels = |protocol| {
        [
            "grpc_method=\"ForgotPassword\"".to_owned(),
            "grpc_code=\"OK\"".to_owned(),
            format!("protocol=\"{protocol}\""),
        ]
    };
    let scraped = service.scrape().await;
    for (protocol, count) in [("connect", 2.0), ("grpc", 1.0)] {
        let labels = labels(protocol);
        let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
        let counted = common::metric(&scraped, "grpc_server_handled_total", &labels);
        assert_eq!(counted, Some(count), "{protocol}: {scraped}");
    }
    service.terminate().await;
}

#[tokio::test]
async fn every_cognito_error_has_its_connect_code_http_status_and_details() {
    let app = TestApp::spawn_with(&[("ENUMERATION_PROTECTION", "false")]).await;

    for row in COGNITO_ERRORS {
        let attempts = if row.cognito_code.name() == "TooManyRequestsException" {
            3
        } else {
            1
        };
        app.cognito
            .script((0..attempts).map(|_| Reply::row_error(row.cognito_code.name())));
        let answer = post_json(&app, "ConfirmForgotPassword", &confirm_json("erin"), &[]).await;

        let (http, code) = connect_status(row.code);
        let info = answer.assert_error(http, code, row.reason.as_str_name());
        assert_eq!(info["metadata"]["cognitoCode"], row.cognito_code.name());
        assert_eq!(info["metadata"]["awsRequestId"], REQUEST_ID);
        match answer.detail("google.rpc.RetryInfo") {
            Some(retry) => {
                assert_eq!(retry["retryDelay"], "1s", "{}", row.cognito_code.name());
                assert_eq!(answer.header("retry-after"), Some("1"));
            }
            None => assert_eq!(answer.header("retry-after"), None, "{}", row.cognito_code),
        }
        if row.cognito_code.name() == "CodeMismatchException" {
            let bad = answer.detail("google.rpc.BadRequest").unwrap();
            assert_eq!(bad["fieldViolations"][0]["field"], "confirmation_code");
        }
    }
}

#[tokio::test]
async fn the_services_own_refusals_carry_their_details_and_retry_after() {
    let app = TestApp::spawn_with(&[("USERNAME_RATE_LIMIT", "1/1h")]).await;

    let invalid = post_json(&app, "ConfirmForgotPassword", r#"{"username": "x"}"#, &[]).await;
    invalid.assert_error(400, "invalid_argument", "INVALID_REQUEST");
    let fields: Vec<Value> = invalid.detail("google.rpc.BadRequest").unwrap()["fieldViolations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["field"].clone())
        .collect();
    assert_eq!(fields, [json!("confirmation_code"), json!("password")]);

    let other_client = post_json(
        &app,
        "ForgotPassword",
        r#"{"username": "carol", "clientId": "someoneelse1"}"#,
        &[],
    )
    .await;
    other_client.assert_error(403, "permission_denied", "CLIENT_NOT_ALLOWED");

    let first = post_json(&app, "ForgotPassword", r#"{"username": "dave"}"#, &[]).await;
    assert_eq!(first.status, 200, "{first:?}");
    let limited = post_json(&app, "ForgotPassword", r#"{"username": "dave"}"#, &[]).await;
    let info = limited.assert_error(429, "resource_exhausted", "RATE_LIMITED");
    assert_eq!(info["metadata"]["limiter"], "username");
    let delay = limited.detail("google.rpc.RetryInfo").unwrap()["retryDelay"]
        .as_str()
        .unwrap()
        .trim_end_matches('s')
        .parse::<f64>()
        .unwrap();
    let retry_after: f64 = limited.header("retry-after").unwrap().parse().unwrap();
    assert_eq!(retry_after, delay.ceil(), "whole seconds, rounded up");
    let quota = limited.detail("google.rpc.QuotaFailure").unwrap();
    assert_eq!(quota["violations"][0]["subject"], "username", "{quota}");
    assert_eq!(
        app.cognito.recorded().len(),
        1,
        "only the first call reached Cognito"
    );
}

#[tokio::test]
async fn connect_timeout_ms_is_the_callers_deadline() {
    let app = TestApp::spawn().await;
    app.cognito.script([Reply::Hang]);

    let answer = post_json(
        &app,
        "ForgotPassword",
        r#"{"username": "frank"}"#,
        &["--header", "connect-timeout-ms: 300"],
    )
    .await;

    answer.assert_error(504, "deadline_exceeded", "UPSTREAM_TIMEOUT");
}

#[tokio::test]
async fn a_connect_timeout_ms_that_is_not_a_positive_integer_is_refused_naming_the_header() {
    let app = TestApp::spawn().await;

    for value in ["0", "-1", "abc", "12345678901", "1.5"] {
        let header = format!("connect-timeout-ms: {value}");
        let answer = post_json(
            &app,
            "ForgotPassword",
            r#"{"username": "tim"}"#,
            &["--header", &header],
        )
        .await;

        answer.assert_error(400, "invalid_argument", "INVALID_REQUEST");
        let bad = answer
            .detail("google.rpc.BadRequest")
            .expect("a BadRequest");
        assert_eq!(
            bad["fieldViolations"][0]["field"], "Connect-Timeout-Ms",
            "{value}"
        );
    }
    assert!(app.cognito.recorded().is_empty(), "nothing reached Cognito");
}

#[tokio::test]
async fn a_deadline_too_short_to_reach_cognito_is_answered_at_once_and_never_sent() {
    let app = TestApp::spawn().await;

    for ms in ["1", "20", "49"] {
        let header = format!("connect-timeout-ms: {ms}");
        let answer = post_json(
            &app,
            "ForgotPassword",
            r#"{"username": "quick"}"#,
            &["--header", &header],
        )
        .await;
        answer.assert_error(504, "deadline_exceeded", "DEADLINE_TOO_SHORT");
    }
    assert!(app.cognito.recorded().is_empty(), "nothing reached Cognito");

    // Enough time left: the call is sent.
    let answer = post_json(
        &app,
        "ForgotPassword",
        r#"{"username": "quick"}"#,
        &["--header", "connect-timeout-ms: 2000"],
    )
    .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(app.cognito.recorded().len(), 1);
}

/// Writes `request` on a new connection and reads until the server closes it (at most 20 s).
async fn exchange(app: &TestApp, request: &[u8]) -> String {
    let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let mut answer = Vec::new();
    let done = async {
        stream.write_all(request).await?;
        stream.read_to_end(&mut answer).await
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(20), done)
        .await
        .expect("answered and closed within 20 s");
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn a_body_with_broken_http1_framing_is_malformed_request_not_a_caller_gone() {
    let app = TestApp::spawn().await;
    let head = "POST /passwordrecovery.v1.PasswordRecovery/ForgotPassword HTTP/1.1\r\nhost: x\r\n\
                content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
    let extension = format!("5;{}\r\nabcde\r\n0\r\n\r\n", "x".repeat(300_000));
    for (what, chunks) in [
        ("a chunk size that is not hex", "zz\r\nabc\r\n0\r\n\r\n"),
        (
            "a chunk size that overflows",
            "ffffffffffffffffffff\r\nabc\r\n0\r\n\r\n",
        ),
        ("a negative chunk size", "-5\r\nabc\r\n0\r\n\r\n"),
        ("a 300 KB chunk extension", extension.as_str()),
    ] {
        let answer = exchange(&app, format!("{head}{chunks}").as_bytes()).await;

        let answer = parse_answer(answer.as_bytes());
        answer.assert_error(400, "invalid_argument", "MALFORMED_REQUEST");
        assert!(
            answer.header("x-request-id").is_some(),
            "{what}: recorded as a call"
        );
    }
    assert!(app.cognito.recorded().is_empty());
}

#[tokio::test]
async fn a_body_shorter_than_its_length_then_silence_is_answered_408_and_closed() {
    let app = TestApp::spawn_with(&[("REQUEST_BODY_TIMEOUT", "500ms")]).await;
    let started = std::time::Instant::now();
    let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    stream
        .write_all(
            b"POST /passwordrecovery.v1.PasswordRecovery/ForgotPassword HTTP/1.1\r\nhost: x\r\n\
              content-type: application/json\r\ncontent-length: 50\r\n\r\n{\"user",
        )
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stream.read_to_end(&mut answer),
    )
    .await
    .expect("answered and closed")
    .unwrap();

    let answer = parse_answer(&answer);
    let info = answer.assert_error(408, "deadline_exceeded", "REQUEST_TIMEOUT");
    assert_eq!(info["metadata"]["limit"], "500ms");
    assert_eq!(answer.header("connection"), Some("close"));
    assert!(started.elapsed() >= std::time::Duration::from_millis(450));
    assert!(app.cognito.recorded().is_empty());
}

/// A JSON ForgotPassword request for `username` on a kept-alive HTTP/1.1 connection.
fn keep_alive_request(username: &str) -> String {
    let body = format!(r#"{{"username": "{username}"}}"#);
    format!(
        "POST /passwordrecovery.v1.PasswordRecovery/ForgotPassword HTTP/1.1\r\nhost: x\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// Reads one HTTP/1.1 answer with a `content-length` from `stream`, within 10 s.
async fn read_answer(stream: &mut tokio::net::TcpStream) -> Answer {
    let mut raw = Vec::new();
    let read = async {
        loop {
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&raw));
            raw.extend_from_slice(&chunk[..n]);
            if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse().unwrap());
                if raw.len() >= end + 4 + length {
                    return parse_answer(&raw);
                }
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), read)
        .await
        .expect("an answer within 10 s")
}

#[tokio::test]
async fn a_kept_alive_http1_connection_is_timed_from_each_requests_first_byte() {
    let app = TestApp::spawn_with(&[("REQUEST_HEADER_TIMEOUT", "300ms")]).await;
    let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    stream
        .write_all(keep_alive_request("first").as_bytes())
        .await
        .unwrap();
    assert_eq!(read_answer(&mut stream).await.status, 200);

    // Quiet between requests for longer than the header timeout: that is idleness, not a
    // request's headers arriving slowly.
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    stream
        .write_all(keep_alive_request("second").as_bytes())
        .await
        .unwrap();
    assert_eq!(read_answer(&mut stream).await.status, 200);

    // A third request begun and left unfinished is closed within its bound.
    let started = std::time::Instant::now();
    stream
        .write_all(b"POST /passwordrecovery.v1")
        .await
        .unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        stream.read_to_end(&mut rest),
    )
    .await
    .expect("closed within 5 s")
    .ok();
    assert!(started.elapsed() >= std::time::Duration::from_millis(250));
    assert_eq!(app.cognito.recorded().len(), 2);
}

#[tokio::test]
async fn pipelined_requests_outlasting_the_header_timeout_are_both_answered() {
    let app = TestApp::spawn_with(&[("REQUEST_HEADER_TIMEOUT", "300ms")]).await;
    // Cognito takes longer than the header timeout to answer the first.
    app.cognito.script([Reply::After(
        std::time::Duration::from_millis(700),
        Box::new(Reply::Ok(json!({}))),
    )]);
    let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let both = format!("{}{}", keep_alive_request("one"), keep_alive_request("two"));
    stream.write_all(both.as_bytes()).await.unwrap();

    assert_eq!(read_answer(&mut stream).await.status, 200);
    assert_eq!(read_answer(&mut stream).await.status, 200);
}

#[tokio::test]
async fn a_peer_over_its_share_of_calls_is_overloaded_while_another_peer_is_served() {
    let app = TestApp::spawn_with(&[("MAX_CONCURRENT_CALLS_PER_PEER", "1")]).await;
    app.cognito
        .script([Reply::Held(Box::new(Reply::Ok(json!({}))))]);
    let held = confirm_in_the_background(&app, "pat", &["--interface", "127.0.0.1"]);
    app.cognito.arrived(1).await;

    let refused = post_json(
        &app,
        "ForgotPassword",
        r#"{"username": "pat2"}"#,
        &["--interface", "127.0.0.1"],
    )
    .await;
    let info = refused.assert_error(503, "unavailable", "OVERLOADED");
    assert_eq!(info["metadata"]["limit"], "MAX_CONCURRENT_CALLS_PER_PEER");
    let other_peer = post_json(
        &app,
        "ForgotPassword",
        r#"{"username": "pat3"}"#,
        &["--interface", "127.0.0.2"],
    )
    .await;
    assert_eq!(other_peer.status, 200, "{other_peer:?}");

    app.cognito.release(1);
    assert_eq!(held.await.unwrap().status, 200);
}

#[tokio::test]
async fn a_stalled_body_gives_its_place_to_a_complete_call() {
    let app = TestApp::spawn_with(&[("MAX_CONCURRENT_CALLS", "1")]).await;
    let mut stalled = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    stalled
        .write_all(
            b"POST /passwordrecovery.v1.PasswordRecovery/ForgotPassword HTTP/1.1\r\nhost: x\r\n\
              content-type: application/json\r\ncontent-length: 50\r\n\
              expect: 100-continue\r\n\r\n",
        )
        .await
        .unwrap();
    // `100 Continue` comes once the door reads the body: its call holds the one place.
    let mut reply = vec![0u8; 4096];
    let n = stalled.read(&mut reply).await.unwrap();
    assert!(
        reply[..n].starts_with(b"HTTP/1.1 100"),
        "{:?}",
        String::from_utf8_lossy(&reply[..n])
    );
    stalled.write_all(b"{\"user").await.unwrap();

    let answer = post_json(&app, "ForgotPassword", r#"{"username": "whole"}"#, &[]).await;
    assert_eq!(answer.status, 200, "{answer:?}");

    let n = tokio::time::timeout(std::time::Duration::from_secs(10), stalled.read(&mut reply))
        .await
        .expect("the stalled call is answered")
        .unwrap();
    let reply = parse_answer(&reply[..n]);
    let info = reply.assert_error(503, "unavailable", "OVERLOADED");
    assert_eq!(info["metadata"]["limit"], "MAX_CONCURRENT_CALLS");
    assert!(
        reply.json()["message"]
            .as_str()
            .unwrap()
            .contains("still arriving")
    );
}

#[tokio::test]
async fn an_unreachable_cognito_is_unavailable() {
    let url = common::closed_port_url().await;
    let app = TestApp::spawn_with(&[("AWS_ENDPOINT_URL", &url)]).await;

    let answer = post_json(&app, "ForgotPassword", r#"{"username": "gina"}"#, &[]).await;

    answer.assert_error(503, "unavailable", "UPSTREAM_UNAVAILABLE");
}

#[tokio::test]
async fn calls_over_the_cap_are_overloaded_with_retry_after() {
    let app = TestApp::spawn_with(&[("MAX_CONCURRENT_CALLS", "1")]).await;
    app.cognito
        .script([Reply::Held(Box::new(Reply::Ok(json!({}))))]);
    let held = confirm_in_the_background(&app, "hank", &[]);
    app.cognito.arrived(1).await;

    let refused = post_json(&app, "ForgotPassword", r#"{"username": "ivy"}"#, &[]).await;
    refused.assert_error(503, "unavailable", "OVERLOADED");
    assert!(refused.header("retry-after").is_some(), "{refused:?}");

    app.cognito.release(1);
    assert_eq!(held.await.unwrap().status, 200);
}

#[tokio::test]
async fn bad_input_is_refused_before_the_service_and_never_with_a_5xx() {
    let app = TestApp::spawn_with(&[("MAX_REQUEST_BYTES", "1024")]).await;
    let method_url = url(&app, "ForgotPassword");

    for (body, reason) in [
        (r#"{"username": "#, "MALFORMED_REQUEST"),
        ("not json at all", "MALFORMED_REQUEST"),
        (r#"{"username": 42}"#, "MALFORMED_REQUEST"),
        (r#"["alice"]"#, "MALFORMED_REQUEST"),
        (
            r#"{"username": "a", "deliveryMedium": 1}"#,
            "INVALID_REQUEST",
        ),
    ] {
        let answer = post_json(&app, "ForgotPassword", body, &[]).await;
        answer.assert_error(400, "invalid_argument", reason);
    }
    let unknown = post_json(
        &app,
        "ForgotPassword",
        r#"{"username": "a", "shoeSize": 9}"#,
        &[],
    )
    .await;
    assert_eq!(
        unknown.detail("google.rpc.BadRequest").unwrap()["fieldViolations"][0]["field"],
        "shoeSize"
    );
    // A wrong type never echoes the value.
    let wrong = post_json(
        &app,
        "ConfirmForgotPassword",
        r#"{"username": "a", "confirmationCode": "1", "password": ["hunter2-secret"]}"#,
        &[],
    )
    .await;
    assert!(!String::from_utf8_lossy(&wrong.body).contains("hunter2"));

    // Over MAX_REQUEST_BYTES, by Content-Length or streamed in chunks; and over h2c, a body
    // larger than a stream's window (64 KiB), which curl sees answered rather than reset.
    let big = format!(r#"{{"username": "{}"}}"#, "a".repeat(4096));
    let framings: [&[&str]; 2] = [&[], &["--header", "transfer-encoding: chunked"]];
    for extra in framings {
        let answer = post_json(&app, "ForgotPassword", &big, extra).await;
        let info = answer.assert_error(429, "resource_exhausted", "REQUEST_TOO_LARGE");
        assert_eq!(info["metadata"]["limit"], "1024");
    }
    let bigger = format!(r#"{{"username": "{}"}}"#, "a".repeat(100_000));
    let answer = run_curl(&[
        "--http2-prior-knowledge",
        "--header",
        "content-type: application/json",
        "--data-binary",
        &bigger,
        &method_url,
    ])
    .await;
    answer.assert_error(429, "resource_exhausted", "REQUEST_TOO_LARGE");

    let wrong_type = run_curl(&[
        "--http1.1",
        "--header",
        "content-type: text/plain",
        "--data-binary",
        "{}",
        &method_url,
    ])
    .await;
    assert_eq!(wrong_type.status, 415);
    assert!(wrong_type.header("accept-post").is_some());

    let get = run_curl(&["--http1.1", &method_url]).await;
    assert_eq!(get.status, 405);
    assert_eq!(get.header("allow"), Some("POST"));

    let unknown_path = run_curl(&[
        "--http1.1",
        "--header",
        "content-type: application/json",
        "--data-binary",
        "{}",
        &format!(
            "http://{}/passwordrecovery.v1.PasswordRecovery/Nope",
            app.addr
        ),
    ])
    .await;
    assert_eq!(unknown_path.status, 404);
    assert_eq!(unknown_path.json()["code"], "unimplemented");

    let version = post_json(
        &app,
        "ForgotPassword",
        r#"{"username": "a"}"#,
        &["--header", "connect-protocol-version: 2"],
    )
    .await;
    assert_eq!(version.status, 400);
    assert_eq!(version.json()["code"], "invalid_argument");

    assert!(app.cognito.recorded().is_empty(), "nothing reached Cognito");
}

#[tokio::test]
async fn an_http1_client_sending_more_than_a_request_unanswered_is_cut_off() {
    let app = TestApp::spawn_with(&[("MAX_REQUEST_BYTES", "1024")]).await;
    // A complete, valid request whose header block is 100 KiB: within what hyper itself would
    // buffer (about 400 KiB), but past the 16 KiB + MAX_REQUEST_BYTES a client may send before
    // it is answered. The server closes the connection rather than read (and hold) it all.
    let body = r#"{"username": "lee"}"#;
    let mut request = format!(
        "POST /passwordrecovery.v1.PasswordRecovery/ForgotPassword HTTP/1.1\r\nhost: x\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n",
        body.len()
    );
    for i in 0..10 {
        request.push_str(&format!("x-filler-{i}: {}\r\n", "a".repeat(10 * 1024)));
    }
    request.push_str("\r\n");
    request.push_str(body);

    let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let mut answer = Vec::new();
    let exchange = async {
        stream.write_all(request.as_bytes()).await?;
        stream.read_to_end(&mut answer).await
    };
    let ended = tokio::time::timeout(std::time::Duration::from_secs(20), exchange).await;

    assert!(
        ended.is_ok(),
        "the connection was neither answered nor closed"
    );
    assert!(
        answer.is_empty(),
        "answered instead of closed: {}",
        String::from_utf8_lossy(&answer)
    );
    assert!(app.cognito.recorded().is_empty());
}

#[tokio::test]
async fn grpc_and_connect_share_the_port_and_connect_protocol_false_closes_the_json_door() {
    let app = TestApp::spawn().await;
    let target = app.addr.to_string();
    let answer = post_json(&app, "ForgotPassword", r#"{"username": "jo"}"#, &[]).await;
    assert_eq!(answer.status, 200);
    let reply = app.client().await.forgot_password(forgot("jo")).await;
    assert!(reply.is_ok(), "{reply:?}");
    // grpcurl blocks: it runs off the runtime that serves the application.
    let (ok, out, err) = tokio::task::spawn_blocking(move || {
        run_grpcurl(&[
            "-plaintext",
            "-d",
            r#"{"username": "jo"}"#,
            &target,
            "passwordrecovery.v1.PasswordRecovery/ForgotPassword",
        ])
    })
    .await
    .unwrap();
    assert!(ok, "{err}");
    assert!(out.contains("codeDeliveryDetails"), "{out}");

    let closed = TestApp::spawn_with(&[("CONNECT_PROTOCOL", "false")]).await;
    let refused = tokio::process::Command::new(curl())
        .args(["--silent", "--http1.1", "--max-time", "10"])
        .args(["--header", "content-type: application/json"])
        .args(["--data-binary", r#"{"username": "jo"}"#])
        .arg(url(&closed, "ForgotPassword"))
        .output()
        .await
        .unwrap();
    assert!(
        !refused.status.success(),
        "HTTP/1.1 is not spoken with CONNECT_PROTOCOL=false: {}",
        String::from_utf8_lossy(&refused.stdout)
    );
    let reply = closed.client().await.forgot_password(forgot("jo")).await;
    assert!(reply.is_ok(), "{reply:?}");
    assert!(closed.cognito.recorded().len() == 1);
}

#[tokio::test]
async fn the_json_door_works_over_tls_with_http1_and_h2() {
    let ca = Ca::new("test CA");
    let mount = SecretMount::new(&ca.server("server"), None);
    let (cert, key) = (mount.cert(), mount.key());
    let app = TestApp::spawn_with(&[
        ("TLS_CERT_FILE", cert.to_str().unwrap()),
        ("TLS_KEY_FILE", key.to_str().unwrap()),
    ])
    .await;
    let ca_file = mount.dir.join("test-ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();

    let url = format!(
        "https://localhost:{}/passwordrecovery.v1.PasswordRecovery/ForgotPassword",
        app.addr.port()
    );
    let resolve = format!("localhost:{}:127.0.0.1", app.addr.port());
    // ALPN offers both: curl takes HTTP/1.1 when it asks for it, and h2 otherwise.
    for (version, alpn) in [("--http1.1", "http/1.1"), ("--http2", "h2")] {
        let output = tokio::process::Command::new(curl())
            .args(["--silent", "--show-error", "--include", "--verbose"])
            .args([version, "--max-time", "20", "--resolve", &resolve])
            .args(["--cacert", ca_file.to_str().unwrap()])
            .args(["--header", "content-type: application/json"])
            .args(["--data-binary", r#"{"username": "tls-user"}"#])
            .arg(&url)
            .output()
            .await
            .unwrap();
        let verbose = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{verbose}");
        assert!(
            verbose.contains(&format!("ALPN: server accepted {alpn}"))
                || verbose.contains(&format!("ALPN, server accepted to use {alpn}")),
            "{verbose}"
        );
        let answer = parse_answer(&output.stdout);
        assert_eq!(answer.status, 200, "{answer:?}");
        let details = &answer.json()["codeDeliveryDetails"];
        assert_eq!(details["destination"], "a***@e***", "{details}");
    }

    // A body larger than a stream's window is answered, not reset, over TLS's h2 too.
    let big = format!(r#"{{"username": "{}"}}"#, "a".repeat(100_000));
    let answer = run_curl(&[
        "--http2",
        "--resolve",
        &resolve,
        "--cacert",
        ca_file.to_str().unwrap(),
        "--header",
        "content-type: application/json",
        "--data-binary",
        &big,
        &url,
    ])
    .await;
    answer.assert_error(429, "resource_exhausted", "REQUEST_TOO_LARGE");
}

#[tokio::test]
async fn buf_curl_speaks_connect_with_the_repos_schema() {
    let app = TestApp::spawn().await;
    let proto_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("proto");

    for http2 in [false, true] {
        let mut command = tokio::process::Command::new(buf());
        command.args(["curl", "--protocol", "connect", "--schema"]);
        command.arg(&proto_dir);
        if http2 {
            command.arg("--http2-prior-knowledge");
        }
        let output = command
            .args([
                "--data",
                r#"{"username": "kim", "clientId": "testclient123"}"#,
            ])
            .arg(url(&app, "ForgotPassword"))
            .output()
            .await
            .expect("buf runs");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let answer: Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(
            answer["codeDeliveryDetails"]["deliveryMedium"],
            "DELIVERY_MEDIUM_EMAIL"
        );
    }

    // buf curl reads a Connect error (code and details) as any Connect client does.
    let output = tokio::process::Command::new(buf())
        .args(["curl", "--protocol", "connect", "--schema"])
        .arg(&proto_dir)
        .args(["--data", r#"{"username": ""}"#])
        .arg(url(&app, "ForgotPassword"))
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("invalid_argument"), "{stderr}");
    assert!(stderr.contains("INVALID_REQUEST"), "{stderr}");
}
