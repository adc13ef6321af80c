//! Every call leaves its trace, in the real binary's logs and metrics: a call whose caller
//! cancels while Cognito works, calls abandoned at the end of the grace period (exit code 1),
//! requests that cannot be decoded or are too large, attempts cut off by the timeout, and
//! masked answers that say what Cognito really said. A second stop signal ends the drain at
//! once; a binary username-hash key is accepted.

mod common;

use std::time::Duration;

use common::process::ServiceProcess;
use common::{FakeCognito, Reply, confirm, forgot, metric, raw};
use serde_json::{Value, json};
use tonic::transport::Channel;

fn entries(lines: &[String]) -> Vec<Value> {
    lines
        .iter()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect()
}

fn call_lines(entries: &[Value]) -> Vec<&Value> {
    entries
        .iter()
        .filter(|e| e["target"] == "password_recovery::api::call" && e.get("grpc.method").is_some())
        .collect()
}

fn audit_events(entries: &[Value]) -> Vec<&Value> {
    entries.iter().filter(|e| e["target"] == "audit").collect()
}

#[tokio::test]
async fn a_call_the_caller_cancels_while_cognito_works_is_recorded_with_its_real_outcome() {
    let cognito = FakeCognito::start().await;
    cognito.script([Reply::Held(Box::new(Reply::Ok(json!({
        "CodeDeliveryDetails": {"Destination": "c***@e***", "DeliveryMedium": "EMAIL", "AttributeName": "email"}
    }))))]);
    let mut service = ServiceProcess::against(
        &cognito,
        &[("RUST_LOG", "info,password_recovery::api=debug")],
    )
    .await;
    let mut client = service.client().await;
    let call =
        tokio::spawn(async move { client.forgot_password(forgot("carol@example.com")).await });
    cognito.arrived(1).await;

    call.abort();
    service
        .wait_for_line(|e| {
            e["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("the caller went away"))
        })
        .await;
    cognito.release(1);

    let line = service
        .wait_for_line(|e| e["message"] == "call finished")
        .await;
    assert_eq!(line["caller_gone"], true, "{line}");
    service
        .wait_for_metric(
            "grpc_server_handled_total",
            &["grpc_method=\"ForgotPassword\"", "grpc_code=\"CANCELLED\""],
            |v| v == 1.0,
        )
        .await;
    let (status, lines, _) = service.terminate().await;
    assert_eq!(status.code(), Some(0));
    let entries = entries(&lines);
    let audit = audit_events(&entries);
    assert_eq!(audit.len(), 1, "{audit:?}");
    assert_eq!(
        audit[0]["event"], "password_reset.requested",
        "the real outcome"
    );
    assert_eq!(audit[0]["caller_gone"], true);
}

#[tokio::test]
async fn calls_in_flight_when_the_grace_period_ends_are_each_recorded_and_exit_is_one() {
    let cognito = FakeCognito::start().await;
    cognito.script([
        Reply::Held(Box::new(Reply::Ok(json!({})))),
        Reply::Held(Box::new(Reply::Ok(json!({})))),
    ]);
    let service = ServiceProcess::against(&cognito, &[("SHUTDOWN_GRACE_PERIOD", "300ms")]).await;
    let channel = Channel::from_shared(format!("http://{}", service.target))
        .unwrap()
        .connect()
        .await
        .unwrap();
    for name in ["gina", "hugo"] {
        let mut client =
            password_recovery::proto::v1::password_recovery_client::PasswordRecoveryClient::new(
                channel.clone(),
            );
        tokio::spawn(async move { client.forgot_password(forgot(name)).await });
    }
    cognito.arrived(2).await;

    service.signal("TERM");
    let (status, lines, stderr) = service.exited().await;

    assert_eq!(status.code(), Some(1), "{stderr}");
    let entries = entries(&lines);
    let abandoned: Vec<_> = entries
        .iter()
        .filter(|e| {
            e["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("call abandoned"))
        })
        .collect();
    assert_eq!(abandoned.len(), 2, "{lines:#?}");
    let audit = audit_events(&entries);
    assert_eq!(audit.len(), 2);
    assert!(
        audit
            .iter()
            .all(|e| e["event"] == "password_reset.abandoned")
    );
    let count = entries
        .iter()
        .find(|e| e["level"] == "ERROR" && e["abandoned"] == 2)
        .expect("an error line with the count");
    assert!(count["message"].as_str().unwrap().contains('2'), "{count}");
}

#[tokio::test]
async fn a_second_stop_signal_ends_the_drain_at_once() {
    let cognito = FakeCognito::start().await;
    let mut service = ServiceProcess::against(&cognito, &[("SHUTDOWN_DELAY", "60s")]).await;

    service.signal("TERM");
    service
        .wait_for_line(|e| e["message"] == "stop requested: NOT_SERVING")
        .await;
    service.signal("INT");
    let started = std::time::Instant::now();
    let (status, lines, _) = service.exited().await;

    assert_eq!(status.code(), Some(1));
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(
        lines
            .iter()
            .any(|l| l.contains("received again during the drain")),
        "{lines:#?}"
    );
}

#[tokio::test]
async fn undecodable_and_oversized_requests_leave_a_warn_line_and_the_call_metrics() {
    let cognito = FakeCognito::start().await;
    let service = ServiceProcess::against(&cognito, &[("MAX_REQUEST_BYTES", "1024")]).await;
    let channel = Channel::from_shared(format!("http://{}", service.target))
        .unwrap()
        .connect()
        .await
        .unwrap();

    let malformed = raw::call(channel.clone(), "ConfirmForgotPassword", vec![0x0a, 0x80])
        .await
        .unwrap_err();
    let too_large = raw::call(channel.clone(), "ForgotPassword", vec![0x0a; 5000])
        .await
        .unwrap_err();

    common::assert_error(
        &malformed,
        tonic::Code::InvalidArgument,
        "MALFORMED_REQUEST",
    );
    common::assert_error(
        &too_large,
        tonic::Code::ResourceExhausted,
        "REQUEST_TOO_LARGE",
    );
    let metrics = service.scrape().await;
    assert_eq!(
        metric(
            &metrics,
            "grpc_server_handled_total",
            &[
                "grpc_method=\"ConfirmForgotPassword\"",
                "grpc_code=\"INVALID_ARGUMENT\""
            ]
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            "grpc_server_handled_total",
            &[
                "grpc_method=\"ForgotPassword\"",
                "grpc_code=\"RESOURCE_EXHAUSTED\""
            ]
        ),
        Some(1.0),
        "{metrics}"
    );
    let (_, lines, _) = service.terminate().await;
    let entries = entries(&lines);
    let calls = call_lines(&entries);
    assert_eq!(calls.len(), 2, "{lines:#?}");
    assert!(calls.iter().all(|c| c["level"] == "WARN"));
    let reasons: Vec<_> = calls
        .iter()
        .map(|c| c["reason"].as_str().unwrap())
        .collect();
    assert_eq!(reasons, ["MALFORMED_REQUEST", "REQUEST_TOO_LARGE"]);
    assert!(cognito.recorded().is_empty());
}

#[tokio::test]
async fn an_attempt_cut_off_by_the_timeout_is_observed_in_the_latency_histogram() {
    let cognito = FakeCognito::start().await;
    cognito.script([Reply::Held(Box::new(Reply::Ok(json!({}))))]);
    let service = ServiceProcess::against(&cognito, &[("COGNITO_TIMEOUT", "200ms")]).await;

    let status = service
        .client()
        .await
        .forgot_password(forgot("tim"))
        .await
        .unwrap_err();

    common::assert_error(&status, tonic::Code::DeadlineExceeded, "UPSTREAM_TIMEOUT");
    let metrics = service.scrape().await;
    assert_eq!(
        metric(
            &metrics,
            "cognito_request_seconds_count",
            &["operation=\"ForgotPassword\""]
        ),
        Some(1.0),
        "{metrics}"
    );
    let above_100ms = metric(
        &metrics,
        "cognito_request_seconds_bucket",
        &["operation=\"ForgotPassword\"", "le=\"0.1\""],
    );
    assert_eq!(above_100ms, Some(0.0), "the attempt took the whole timeout");
    cognito.release(1);
    service.terminate().await;
}

#[tokio::test]
async fn a_masked_answer_is_logged_with_what_cognito_really_said() {
    let cognito = FakeCognito::start().await;
    cognito.respond_with(|_| Reply::error("UserNotFoundException"));
    let service = ServiceProcess::against(&cognito, &[]).await;
    let mut client = service.client().await;

    client
        .forgot_password(forgot("nobody@example.com"))
        .await
        .unwrap();
    let status = client
        .confirm_forgot_password(confirm("nobody@example.com"))
        .await
        .unwrap_err();

    common::assert_error(&status, tonic::Code::InvalidArgument, "CODE_MISMATCH");
    let (_, lines, _) = service.terminate().await;
    let entries = entries(&lines);
    let calls = call_lines(&entries);
    assert_eq!(calls.len(), 2, "{lines:#?}");
    for call in &calls {
        assert_eq!(call["masked"], true, "{call}");
        assert_eq!(call["cognito.code"], "UserNotFoundException", "{call}");
    }
    let audit = audit_events(&entries);
    assert!(audit.iter().all(|e| e["event"] == "password_reset.refused"));
    assert!(
        audit.iter().all(|e| e["reason"] == "USER_NOT_FOUND"),
        "{audit:?}"
    );
}

#[tokio::test]
async fn a_username_hash_key_of_any_bytes_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("key");
    let key: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(37) ^ 0x80).collect();
    std::fs::write(&key_file, &key).unwrap();
    assert!(String::from_utf8(key).is_err(), "the key is not UTF-8");
    let cognito = FakeCognito::start().await;

    let service = ServiceProcess::against(
        &cognito,
        &[("USERNAME_HASH_KEY_FILE", key_file.to_str().unwrap())],
    )
    .await;

    service
        .client()
        .await
        .forgot_password(forgot("kim"))
        .await
        .unwrap();
    let (status, lines, _) = service.terminate().await;
    assert_eq!(status.code(), Some(0));
    assert!(
        !lines
            .iter()
            .any(|l| l.contains("USERNAME_HASH_KEY_FILE is not set"))
    );
}

#[tokio::test]
async fn a_caller_gone_mid_message_is_recorded_as_cancelled() {
    let cognito = FakeCognito::start().await;
    let service = ServiceProcess::against(&cognito, &[]).await;
    // A request whose message never comes, on a raw HTTP/2 stream the test can reset.
    let tcp = tokio::net::TcpStream::connect(&service.target)
        .await
        .unwrap();
    let (mut h2, connection) = h2::client::handshake(tcp).await.unwrap();
    let connection = tokio::spawn(connection);
    let request = raw::http2_request(&service.target, "ForgotPassword");
    let (response, mut stream) = h2.send_request(request, false).unwrap();
    // Half of a message: its prefix announces 100 bytes.
    stream
        .send_data(
            bytes::Bytes::from_static(b"\x00\x00\x00\x00\x64\x0a\x03abc"),
            false,
        )
        .unwrap();
    service
        .wait_for_metric("grpc_server_in_flight", &[], |v| v == 1.0)
        .await;

    // The caller goes away: its connection breaks mid-message.
    connection.abort();
    drop((h2, response, stream));

    service
        .wait_for_metric(
            "grpc_server_handled_total",
            &["grpc_code=\"CANCELLED\""],
            |v| v == 1.0,
        )
        .await;
    let (_, lines, _) = service.terminate().await;
    let entries = entries(&lines);
    let calls = call_lines(&entries);
    assert_eq!(calls.len(), 1, "{lines:#?}");
    assert_eq!(calls[0]["reason"], "CANCELLED");
    assert!(cognito.recorded().is_empty());
}
