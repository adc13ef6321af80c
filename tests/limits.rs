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
async fn wrong_code_guesses_use_up_the_confirm_bucket() {
    let app = limited("3/15m", 0, 64).await;
    let mut client = app.client().await;
    client
        .forgot_password(forgot("abel"))
        .await
        .expect("ForgotPassword has its own bucket");
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
    assert_eq!(info.metadata["limit"], "3/15m");
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
    let mut sink = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), idle.read_to_end(&mut sink))
        .await
        .expect("the server closed the idle connection")
        .ok();
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
