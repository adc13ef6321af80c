//! Abuse limits and load shedding, end to end: each limiter trips with its exact details and a
//! true RetryInfo, case variants share a bucket, refused calls never reach Cognito, the order
//! of checks is as designed, overload is refused at once, oversized requests and idle
//! connections are bounded.

mod common;

use std::num::{NonZeroU32, NonZeroUsize};
use std::time::{Duration, Instant};

use common::{Options, Reply, TestApp, assert_error, confirm, forgot};
use password_recovery::limits::LimitSettings;
use tokio::io::AsyncReadExt;
use tonic::Code;
use tonic_types::StatusExt;

fn limits(username: &str, global_rps: u32, max_concurrent_upstream: usize) -> Options {
    Options {
        limits: LimitSettings {
            username: username.parse().unwrap(),
            username_max_keys: NonZeroUsize::new(1000).unwrap(),
            global_rps: NonZeroU32::new(global_rps),
            max_concurrent_upstream: NonZeroUsize::new(max_concurrent_upstream).unwrap(),
            redis: None,
        },
        ..Options::default()
    }
}

#[tokio::test]
async fn the_per_username_limit_refuses_with_its_details_and_true_wait() {
    let app = TestApp::spawn_with(limits("2/1h", 0, 64)).await;
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
    let app = TestApp::spawn_with(limits("1/1h", 0, 64)).await;
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
    let app = TestApp::spawn_with(limits("3/15m", 0, 64)).await;
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
    let app = TestApp::spawn_with(limits("off", 2, 64)).await;
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
    let app = TestApp::spawn_with(limits("1/1h", 1, 64)).await;
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
    // Arrange: two calls hold both places for 700 ms.
    let app = TestApp::spawn_with(limits("off", 0, 2)).await;
    let slow = || {
        Reply::After(
            Duration::from_millis(700),
            Box::new(Reply::Ok(serde_json::json!({}))),
        )
    };
    app.cognito.script([slow(), slow()]);
    let mut waiting = Vec::new();
    for name in ["w1", "w2"] {
        let mut client = app.client().await;
        waiting.push(tokio::spawn(async move {
            client.forgot_password(forgot(name)).await
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Act
    let mut third = app.client().await;
    let started = Instant::now();
    let status = third.forgot_password(forgot("w3")).await.unwrap_err();

    // Assert
    assert!(
        started.elapsed() < Duration::from_millis(300),
        "it was queued"
    );
    assert_error(&status, Code::Unavailable, "OVERLOADED");
    assert!(status.get_details_retry_info().is_some());
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
    let app = TestApp::spawn_with(Options {
        max_request_bytes: 4096,
        ..Options::default()
    })
    .await;
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
    let app = TestApp::spawn_with(Options {
        idle_timeout: Duration::from_millis(300),
        ..Options::default()
    })
    .await;

    // A call that outlasts the idle timeout completes on its connection.
    app.cognito.script([Reply::After(
        Duration::from_millis(700),
        Box::new(Reply::Ok(serde_json::json!({}))),
    )]);
    app.client()
        .await
        .forgot_password(forgot("eve"))
        .await
        .expect("a long call is not idle");

    // A connection that never calls is closed after the timeout.
    let mut idle = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let started = Instant::now();
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
}
