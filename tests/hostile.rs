//! The promises that matter against a hostile caller, end to end against the fake Cognito:
//! unknown users are indistinguishable from known ones by their answers (by timing:
//! `tests/timing.rs`), the
//! per-username limit forgives nothing under a flood, an upstream answer that is not a
//! well-formed Cognito answer is never taken for a success, and a request that cannot be read
//! gets this service's own status.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use common::{Reply, TestApp, assert_error, confirm, forgot, raw};
use serde_json::json;
use tonic::Code;
use tonic_types::StatusExt;

/// Cognito's own masking of a known user's destination (the oracle the service must match).
fn cognito_destination(username: &str) -> (String, &'static str, &'static str) {
    if let Some(digits) = username.strip_prefix('+') {
        let (hidden, shown) = digits.split_at(digits.len() - 4);
        return (
            format!("+{}{shown}", "*".repeat(hidden.len())),
            "SMS",
            "phone_number",
        );
    }
    let (local, domain) = username.split_once('@').unwrap();
    let first = |s: &str| s.chars().next().unwrap();
    (
        format!("{}***@{}***", first(local), first(domain)),
        "EMAIL",
        "email",
    )
}

fn delivered(username: &str) -> Reply {
    let (destination, medium, attribute) = cognito_destination(username);
    Reply::Ok(json!({
        "CodeDeliveryDetails": {
            "Destination": destination,
            "DeliveryMedium": medium,
            "AttributeName": attribute,
        }
    }))
}

fn username_of(recorded: &common::Recorded) -> String {
    recorded.body["Username"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn an_unknown_user_gets_byte_for_byte_the_answer_a_known_user_gets() {
    let app = TestApp::spawn().await;
    let known = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let rule_known = known.clone();
    app.cognito.respond_with(move |request| {
        if rule_known.load(std::sync::atomic::Ordering::SeqCst) {
            delivered(&username_of(request))
        } else {
            Reply::error("UserNotFoundException")
        }
    });
    let usernames = [
        "zed@example.org",
        "alice.smith+tag@mail.example.com",
        "b@c.io",
        "élodie@ünïversité.fr",
        "+14155550123",
        "+447700900123",
        "+33612345678",
    ];
    let mut client = app.client().await;

    for username in usernames {
        known.store(true, std::sync::atomic::Ordering::SeqCst);
        let real = client.forgot_password(forgot(username)).await.unwrap();
        known.store(false, std::sync::atomic::Ordering::SeqCst);
        let simulated = client.forgot_password(forgot(username)).await.unwrap();

        assert_eq!(
            prost::Message::encode_to_vec(real.get_ref()),
            prost::Message::encode_to_vec(simulated.get_ref()),
            "{username}: {:?} vs {:?}",
            real.get_ref(),
            simulated.get_ref()
        );
    }
}

#[tokio::test]
async fn a_flood_of_new_usernames_does_not_forgive_a_spent_bucket() {
    let app = TestApp::spawn_with(&[
        ("USERNAME_RATE_LIMIT", "5/15m"),
        ("USERNAME_RATE_LIMIT_MAX_KEYS", "50"),
    ])
    .await;
    app.cognito
        .respond_with(|_| Reply::error("CodeMismatchException"));
    let mut client = app.client().await;
    for _ in 0..5 {
        let status = client
            .confirm_forgot_password(confirm("victim@example.com"))
            .await
            .unwrap_err();
        assert_error(&status, Code::InvalidArgument, "CODE_MISMATCH");
    }

    let mut at_capacity = 0;
    for i in 0..120 {
        let status = client
            .confirm_forgot_password(confirm(&format!("flood-{i}@example.com")))
            .await
            .unwrap_err();
        if status.code() == Code::ResourceExhausted {
            let info = assert_error(&status, Code::ResourceExhausted, "RATE_LIMITED");
            assert_eq!(info.metadata["limiter"], "username_capacity");
            let wait = status
                .get_details_retry_info()
                .unwrap()
                .retry_delay
                .unwrap();
            assert!(wait >= Duration::from_secs(1), "{wait:?}");
            at_capacity += 1;
        }
    }

    assert_eq!(at_capacity, 120 - 49, "the table holds 50 buckets");
    let status = client
        .confirm_forgot_password(confirm("victim@example.com"))
        .await
        .unwrap_err();
    let info = assert_error(&status, Code::ResourceExhausted, "RATE_LIMITED");
    assert_eq!(
        info.metadata["limiter"], "username",
        "the victim was forgiven"
    );
    assert_eq!(
        app.cognito.recorded().len(),
        5 + 49,
        "refused calls never reach Cognito"
    );
}

#[tokio::test]
async fn no_answer_but_a_well_formed_cognito_success_is_ok() {
    let app = TestApp::spawn().await;
    let mut client = app.client().await;
    let amz = "application/x-amz-json-1.1";
    let cases = [
        (
            "an HTML page",
            Reply::Bytes {
                status: 200,
                content_type: "text/html",
                body: b"<html>welcome to the hotel wifi</html>".to_vec(),
            },
        ),
        (
            "not JSON",
            Reply::Bytes {
                status: 200,
                content_type: amz,
                body: b"OK".to_vec(),
            },
        ),
        (
            "a JSON array",
            Reply::Bytes {
                status: 200,
                content_type: amz,
                body: b"[]".to_vec(),
            },
        ),
        (
            "an empty body",
            Reply::Bytes {
                status: 200,
                content_type: amz,
                body: Vec::new(),
            },
        ),
        (
            "a redirect",
            Reply::Bytes {
                status: 302,
                content_type: "text/html",
                body: b"moved".to_vec(),
            },
        ),
        ("a 50 MB body", Reply::Huge(50 << 20)),
    ];
    for (what, reply) in cases {
        for rpc in ["ForgotPassword", "ConfirmForgotPassword"] {
            let before = app.cognito.recorded().len();
            let streamed_before = app.cognito.huge_bytes_sent();
            app.cognito.script([reply.clone()]);
            let status = match rpc {
                "ForgotPassword" => client.forgot_password(forgot("amy")).await.map(drop),
                _ => client
                    .confirm_forgot_password(confirm("amy"))
                    .await
                    .map(drop),
            }
            .expect_err(what);
            assert_error(&status, Code::Unavailable, "UPSTREAM_INVALID_RESPONSE");
            assert_eq!(
                app.cognito.recorded().len(),
                before + 1,
                "{what}: not retried"
            );
            // What the fake handed to the connection by the time the answer came: the 64 KiB
            // read, and what the sockets' buffers took (a few MiB over loopback), never the
            // whole body.
            let streamed = app.cognito.huge_bytes_sent() - streamed_before;
            assert!(
                streamed < 25 << 20,
                "{what}: read no further than the cap, but {streamed} bytes were streamed"
            );
        }
    }

    // A destination no Cognito would send.
    app.cognito
        .script([Reply::Ok(json!({"CodeDeliveryDetails": {
            "Destination": "x".repeat(40_000), "DeliveryMedium": "EMAIL", "AttributeName": "email"
        }}))]);
    let status = client.forgot_password(forgot("amy")).await.unwrap_err();
    assert_error(&status, Code::Unavailable, "UPSTREAM_INVALID_RESPONSE");
    app.cognito
        .script([Reply::Ok(json!({"CodeDeliveryDetails": {
            "Destination": "a***@b***\u{7}", "DeliveryMedium": "EMAIL", "AttributeName": "email"
        }}))]);
    let status = client.forgot_password(forgot("amy")).await.unwrap_err();
    assert_error(&status, Code::Unavailable, "UPSTREAM_INVALID_RESPONSE");
}

#[tokio::test]
async fn an_answer_cut_short_is_upstream_unavailable() {
    let app = TestApp::spawn().await;
    let mut client = app.client().await;
    for rpc in ["ForgotPassword", "ConfirmForgotPassword"] {
        app.cognito.script([Reply::Truncated]);
        let status = match rpc {
            "ForgotPassword" => client.forgot_password(forgot("amy")).await.map(drop),
            _ => client
                .confirm_forgot_password(confirm("amy"))
                .await
                .map(drop),
        }
        .unwrap_err();
        assert_error(&status, Code::Unavailable, "UPSTREAM_UNAVAILABLE");
    }
}

#[tokio::test]
async fn http_429_without_a_code_is_retried_like_throttling() {
    let app = TestApp::spawn().await;
    app.cognito.script([Reply::Raw {
        status: 429,
        body: "",
    }]);

    app.client()
        .await
        .forgot_password(forgot("amy"))
        .await
        .expect("the retry succeeds");

    assert_eq!(app.cognito.recorded().len(), 2);
}

#[tokio::test]
async fn a_request_that_cannot_be_decoded_is_malformed_request() {
    let app = TestApp::spawn().await;
    let channel = app.channel().await;
    let garbage: [&[u8]; 4] = [
        b"\xff\xff\xff\xff",
        b"\x0a\x80",
        b"\x0a\x02\xc3\x28",
        b"\x0b",
    ];
    for bytes in garbage {
        for rpc in ["ForgotPassword", "ConfirmForgotPassword"] {
            let status = raw::call(channel.clone(), rpc, bytes.to_vec())
                .await
                .unwrap_err();
            let info = assert_error(&status, Code::InvalidArgument, "MALFORMED_REQUEST");
            assert!(info.metadata.is_empty(), "{info:?}");
            assert!(status.metadata().get("x-request-id").is_some());
        }
    }
    assert!(app.cognito.recorded().is_empty());
}

#[tokio::test]
async fn calls_beyond_max_concurrent_calls_are_refused_unread() {
    let app = TestApp::spawn_with(&[("MAX_CONCURRENT_CALLS", "2")]).await;
    app.cognito.script([
        Reply::Held(Box::new(Reply::Ok(json!({})))),
        Reply::Held(Box::new(Reply::Ok(json!({})))),
    ]);
    let channel = app.channel().await;
    let held: Vec<_> = (0..2)
        .map(|i| {
            let mut client =
                password_recovery::proto::v1::password_recovery_client::PasswordRecoveryClient::new(
                    channel.clone(),
                );
            tokio::spawn(async move { client.forgot_password(forgot(&format!("h{i}"))).await })
        })
        .collect();
    app.cognito.arrived(2).await;

    let status = raw::call(channel.clone(), "ForgotPassword", vec![0xff; 60_000])
        .await
        .unwrap_err();

    let info = assert_error(&status, Code::Unavailable, "OVERLOADED");
    // Only the bound it ran into: nothing of the unread message.
    assert_eq!(
        info.metadata,
        HashMap::from([("limit".to_owned(), "MAX_CONCURRENT_CALLS".to_owned())])
    );
    assert!(status.get_details_retry_info().is_some());
    app.cognito.release(2);
    for call in held {
        call.await.unwrap().expect("the held calls finish");
    }
    let distinct: HashSet<_> = app.cognito.recorded().iter().map(username_of).collect();
    assert_eq!(distinct.len(), 2);
}
