//! Abuse limits and load shedding, end to end: each limiter trips with its exact details and a
//! true RetryInfo, case variants share a bucket, refused calls never reach Cognito, the order
//! of checks is as designed, overload is refused at once, oversized requests and idle
//! connections are bounded.

mod common;

use std::time::{Duration, Instant};

use common::{Reply, TestApp, assert_error, confirm, forgot};
use tokio::io::AsyncReadExt;
use tonic::Code;
use tonic_types::StatusExt;

/// An application with these limits.
async fn limited(username: &str, global_rps: u32, max_concurrent_upstream: usize) -> TestApp {
    TestApp::spawn_with(&[
        ("USERNAME_RATE_LIMIT", username),
        ("GLOBAL_RATE_LIMIT_RPS", &global_rps.to_string()),
        (
            "MAX_CONCURRENT_UPSTREAM",
            &max_concurrent_upstream.to_string(),
        ),
    ])
    .await
}

#[tokio::test]
async fn the_per_username_limit_refuses_with_its_details_and_true_wait() {
    let app = limited("2/1h", 0, 64).await;
    let mut client = app.client().await;
    for _ in 0..2 {
        client
            .forgot_password(forgot("yves@example.com"))
            .await
            .unwrap();
    }

    let status = client
        .forgot_password(forgot("yves@example.com"))
        .await
        .unwrap_err();

    let info = assert_error(&status, Code::ResourceExhausted, "RATE_LIMITED");
    assert_eq!(info.metadata["limit"], "2/1h");
    assert_eq!(info.metadata["limiter"], "username");
    // One token every 1h / 2 = 30 minutes, less the moments the calls took.
    let wait = status
        .get_details_retry_info()
        .unwrap()
        .retry_delay
        .unwrap();
    assert!(
        wait <= Duration::from_secs(1800) && wait > Duration::from_secs(1790),
        "{wait:?}"
    );
    let quota = status.get_details_quota_failure().expect("QuotaFailure");
    assert_eq!(quota.violations[0].subject, "username");
    assert_eq!(
        app.cognito.recorded().len(),
        2,
        "the refused call reached Cognito"
    );

    client
        .forgot_password(forgot("someone-else@example.com"))
        .await
        .expect("other users have their own bucket");
}

#[tokio::test]
async fn case_variants_of_a_username_share_one_bucket() {
    let app = limited("1/1h", 0, 64).await;
    let mut client = app.client().await;
    client
        .forgot_password(forgot("Zoë@Example.COM"))
        .await
        .unwrap();
    let status = client
        .forgot_password(forgot("zoë@example.com"))
        .await
        .unwrap_err();
    assert_error(&status, Code::ResourceExhausted, "RATE_LIMITED");
    assert_eq!(app.cognito.recorded().len(), 1);
}

#[tokio::test]
async fn wrong_code_guesses_and_code_requests_spend_one_bucket() {
    let app = limited("4/15m", 0, 64).await;
    let mut client = app.client().await;
    client
        .forgot_password(forgot("abel"))
        .await
        .expect("the first of four");
    for _ in 0..3 {
        app.cognito.script([Reply::error("CodeMismatchException")]);
        let status = client
            .confirm_forgot_password(confirm("abel"))
            .await
            .unwrap_err();
        assert_error(&status, Code::InvalidArgument, "CODE_MISMATCH");
    }
    let status = client
        .confirm_forgot_password(confirm("ABEL"))
        .await
        .unwrap_err();
    let info = assert_error(&status, Code::ResourceExhausted, "RATE_LIMITED");
    assert_eq!(info.metadata["limit"], "4/15m");
    assert_eq!(app.cognito.recorded().len(), 4);
}

#[tokio::test]
async fn the_global_limit_sheds_bursts_across_users() {
    let app = limited("off", 2, 64).await;
    let mut client = app.client().await;
    client.forgot_password(forgot("u1")).await.unwrap();
    client.confirm_forgot_password(confirm("u2")).await.unwrap();

    let status = client.forgot_password(forgot("u3")).await.unwrap_err();

    let info = assert_error(&status, Code::ResourceExhausted, "RATE_LIMITED");
    assert_eq!(info.metadata["limiter"], "global");
    assert_eq!(info.metadata["limit"], "2/1s");
    let wait = status
        .get_details_retry_info()
        .unwrap()
        .retry_delay
        .unwrap();
    assert!(
        wait > Duration::ZERO && wait <= Duration::from_millis(500),
        "{wait:?}"
    );
    assert_eq!(
        status.get_details_quota_failure().unwrap().violations[0].subject,
        "global"
    );
    assert_eq!(app.cognito.recorded().len(), 2);
}

#[tokio::test]
async fn invalid_requests_and_foreign_clients_are_refused_before_any_limit() {
    let app = limited("1/1h", 1, 64).await;
    let mut client = app.client().await;
    for _ in 0..3 {
        let status = client.forgot_password(forgot(" padded")).await.unwrap_err();
        assert_error(&status, Code::InvalidArgument, "INVALID_REQUEST");
        let mut request = forgot("carl");
        request.client_id = "notourclient".into();
        let status = client.forgot_password(request).await.unwrap_err();
        assert_error(&status, Code::PermissionDenied, "CLIENT_NOT_ALLOWED");
    }
    client
        .forgot_password(forgot("carl"))
        .await
        .expect("no limiter was charged by refused calls");
}

#[tokio::test]
async fn a_call_past_max_concurrent_upstream_is_refused_at_once() {
    // Arrange: two calls hold both places, their answers held by Cognito.
    let app = limited("off", 0, 2).await;
    let held = || Reply::Held(Box::new(Reply::Ok(serde_json::json!({}))));
    app.cognito.script([held(), held()]);
    let mut waiting = Vec::new();
    for name in ["w1", "w2"] {
        let mut client = app.client().await;
        waiting.push(tokio::spawn(async move {
            client.forgot_password(forgot(name)).await
        }));
    }
    app.cognito.arrived(2).await;

    // Act: a third call while both are still held.
    let status = app
        .client()
        .await
        .forgot_password(forgot("w3"))
        .await
        .unwrap_err();

    // Assert: answered while the places are still taken, so it was not queued behind them.
    assert_error(&status, Code::Unavailable, "OVERLOADED");
    assert!(status.get_details_retry_info().is_some());
    app.cognito.release(2);
    for call in waiting {
        call.await
            .unwrap()
            .expect("the calls holding places finish");
    }
    assert_eq!(app.cognito.recorded().len(), 2);
    app.client()
        .await
        .forgot_password(forgot("w4"))
        .await
        .expect("places are given back");
}

#[tokio::test]
async fn a_request_over_max_request_bytes_is_refused() {
    let app = TestApp::spawn_with(&[("MAX_REQUEST_BYTES", "4096")]).await;
    let mut request = forgot("dora");
    request
        .client_metadata
        .insert("big".into(), "x".repeat(5000));
    let status = app
        .client()
        .await
        .forgot_password(request)
        .await
        .unwrap_err();
    let info = assert_error(&status, Code::ResourceExhausted, "REQUEST_TOO_LARGE");
    assert_eq!(info.metadata["limit"], "4096");
    assert!(status.message().contains("4096"), "{status:?}");
    assert!(app.cognito.recorded().is_empty());
}

#[tokio::test]
async fn idle_connections_are_closed_but_not_during_a_call() {
    let app = TestApp::spawn_with(&[("GRPC_IDLE_TIMEOUT", "300ms")]).await;

    // A call whose answer Cognito holds, and a connection that never calls.
    app.cognito
        .script([Reply::Held(Box::new(Reply::Ok(serde_json::json!({}))))]);
    let mut client = app.client().await;
    let call = tokio::spawn(async move { client.forgot_password(forgot("eve")).await });
    app.cognito.arrived(1).await;
    let mut idle = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let started = Instant::now();

    // The connection that never calls is closed after the timeout...
    common::closed_within(
        &mut idle,
        Duration::from_secs(5),
        "the server closed the idle connection",
    )
    .await;
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );

    // ...while the call, which has now outlasted the timeout, completes on its connection.
    assert!(!call.is_finished(), "the call ended early");
    app.cognito.release(1);
    call.await.unwrap().expect("a long call is not idle");
}

/// A raw HTTP/2 ForgotPassword stream that announces a 100-byte message and sends 10 bytes of
/// it; returns the response to come and the stream, kept open.
async fn stalled_grpc_message(
    target: &str,
) -> (h2::client::ResponseFuture, h2::SendStream<bytes::Bytes>) {
    let tcp = tokio::net::TcpStream::connect(target).await.unwrap();
    let (h2, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut ready = h2.ready().await.unwrap();
    let (response, mut stream) = ready
        .send_request(common::raw::http2_request(target, "ForgotPassword"), false)
        .unwrap();
    let mut partial = vec![0u8; 15];
    partial[1..5].copy_from_slice(&100u32.to_be_bytes());
    stream.send_data(partial.into(), false).unwrap();
    (response, stream)
}

/// The gRPC status of a trailers-only answer.
async fn grpc_status(response: h2::client::ResponseFuture) -> tonic::Status {
    let response = tokio::time::timeout(Duration::from_secs(10), response)
        .await
        .expect("answered within 10 s")
        .expect("a response");
    tonic::Status::from_header_map(response.headers()).expect("a trailers-only gRPC status")
}

#[tokio::test]
async fn a_grpc_message_that_does_not_arrive_in_time_is_answered_request_timeout() {
    let app = TestApp::spawn_with(&[("REQUEST_BODY_TIMEOUT", "500ms")]).await;
    let started = Instant::now();

    let (response, _stream) = stalled_grpc_message(&app.addr.to_string()).await;
    let status = grpc_status(response).await;

    let info = assert_error(&status, Code::DeadlineExceeded, "REQUEST_TIMEOUT");
    assert_eq!(info.metadata["limit"], "500ms");
    assert!(started.elapsed() >= Duration::from_millis(450));
    assert!(app.cognito.recorded().is_empty());
}

#[tokio::test]
async fn a_stalled_grpc_message_gives_its_place_to_a_complete_call() {
    let cognito = common::FakeCognito::start().await;
    let service =
        common::process::ServiceProcess::against(&cognito, &[("MAX_CONCURRENT_CALLS", "1")]).await;
    let (response, _stream) = stalled_grpc_message(&service.target).await;
    service
        .wait_for_metric("grpc_server_in_flight", &[], |v| v >= 1.0)
        .await;

    let answered = service
        .client()
        .await
        .forgot_password(forgot("whole"))
        .await;

    assert!(answered.is_ok(), "{answered:?}");
    let status = grpc_status(response).await;
    let info = assert_error(&status, Code::Unavailable, "OVERLOADED");
    assert_eq!(info.metadata["limit"], "MAX_CONCURRENT_CALLS");
    assert!(status.message().contains("still arriving"), "{status:?}");
    assert!(status.get_details_retry_info().is_some());
    service
        .wait_for_metric(
            "grpc_calls_taken_back_total",
            &["max_concurrent_calls"],
            |v| v >= 1.0,
        )
        .await;
    service.terminate().await;
}

#[tokio::test]
async fn a_connection_whose_request_headers_do_not_arrive_in_time_is_closed() {
    let app = TestApp::spawn_with(&[("REQUEST_HEADER_TIMEOUT", "300ms")]).await;
    for first_bytes in [&b""[..], b"POS", b"PRI * HTTP/2.0\r\n"] {
        // The server's clock starts at its accept, after this one's.
        let started = Instant::now();
        let mut slow = tokio::net::TcpStream::connect(app.addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut slow, first_bytes)
            .await
            .unwrap();

        let mut sink = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut sink))
            .await
            .expect("the server closed the connection")
            .ok();

        assert!(
            started.elapsed() >= Duration::from_millis(250),
            "{first_bytes:?}: closed after {:?}",
            started.elapsed()
        );
        // Nothing, or (for a preface cut short, which hyper then reads as HTTP/1.1) a 400.
        assert!(
            sink.is_empty() || sink.starts_with(b"HTTP/1.1 400"),
            "{first_bytes:?}: {}",
            String::from_utf8_lossy(&sink)
        );
    }
    // A client that sends its request promptly is served.
    app.client()
        .await
        .forgot_password(forgot("prompt"))
        .await
        .expect("served");
}

#[tokio::test]
async fn a_new_connection_takes_the_place_of_one_that_sent_no_request() {
    let app = TestApp::spawn_with(&[("MAX_CONNECTIONS", "2")]).await;
    // Two connections that say nothing take both places, the first one first.
    let mut first = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let _second = tokio::net::TcpStream::connect(app.addr).await.unwrap();

    let answered = app.client().await.forgot_password(forgot("newcomer")).await;

    assert!(answered.is_ok(), "{answered:?}");
    common::closed_within(
        &mut first,
        Duration::from_secs(5),
        "the oldest silent connection was closed",
    )
    .await;
}

#[tokio::test]
async fn a_grpc_deadline_too_short_to_reach_cognito_is_never_sent() {
    let app = TestApp::spawn().await;
    let mut client = app.client().await;

    // 40 ms, sent as the header alone: no client-side timer races the service's answer.
    let status = call_with_grpc_timeout(&app.addr.to_string(), "40m", &forgot("hasty")).await;
    assert_error(&status, Code::DeadlineExceeded, "DEADLINE_TOO_SHORT");

    // 1 ms: whoever answers first (this service, or tonic's own timer), nothing is sent.
    let mut request = tonic::Request::new(forgot("hastier"));
    request.set_timeout(Duration::from_millis(1));
    let status = client.forgot_password(request).await.unwrap_err();
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    // A call with time enough is sent, after them: it is the only one Cognito sees.
    client.forgot_password(forgot("patient")).await.unwrap();
    let recorded = app.cognito.recorded();
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    assert_eq!(recorded[0].body["Username"], "patient");
}

/// Calls ForgotPassword with `request` over raw HTTP/2 with a `grpc-timeout` header (and no
/// timer of the client's own); returns the call's status from its trailers.
async fn call_with_grpc_timeout(
    target: &str,
    timeout: &str,
    request: &password_recovery::proto::v1::ForgotPasswordRequest,
) -> tonic::Status {
    let tcp = tokio::net::TcpStream::connect(target).await.unwrap();
    let (h2, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut ready = h2.ready().await.unwrap();
    let mut headers = common::raw::http2_request(target, "ForgotPassword");
    headers
        .headers_mut()
        .insert("grpc-timeout", timeout.parse().unwrap());
    let (response, mut stream) = ready.send_request(headers, false).unwrap();
    let message = prost::Message::encode_to_vec(request);
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(&message);
    stream.send_data(framed.into(), true).unwrap();
    let response = response.await.expect("a response");
    if let Some(status) = tonic::Status::from_header_map(response.headers()) {
        return status;
    }
    let mut body = response.into_body();
    while body.data().await.is_some() {}
    let trailers = body.trailers().await.unwrap().expect("trailers");
    tonic::Status::from_header_map(&trailers).expect("a gRPC status")
}

#[tokio::test]
async fn a_connection_with_a_call_in_progress_is_never_taken_back() {
    let app = TestApp::spawn_with(&[("MAX_CONNECTIONS", "1")]).await;
    app.cognito
        .script([Reply::Held(Box::new(Reply::Ok(serde_json::json!({}))))]);
    let mut client = app.client().await;
    let held = tokio::spawn(async move { client.forgot_password(forgot("busy")).await });
    app.cognito.arrived(1).await;

    // The one place is in use: a newcomer is closed as soon as it is accepted.
    let mut newcomer = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    common::closed_within(
        &mut newcomer,
        Duration::from_secs(5),
        "the newcomer was closed",
    )
    .await;

    app.cognito.release(1);
    held.await
        .unwrap()
        .expect("the call in progress kept its connection");
}
