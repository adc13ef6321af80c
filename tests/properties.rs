//! Properties over arbitrary input (proptest), against the application and the fake Cognito:
//! whatever a caller sends and whatever the upstream answers (any status, content type, body,
//! error type), the service never panics, never answers OK for a non-success, gives every error
//! exactly one ErrorInfo, and never puts a password, code or secret into a status or a log line.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

use common::{CLIENT_SECRET, Reply, TestApp, raw};
use password_recovery::proto::v1::{
    ConfirmForgotPasswordRequest, ForgotPasswordRequest, UserContext,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use tonic_types::{ErrorDetail, StatusExt};

/// A runner of `cases` cases that keeps no failure file in the tree.
fn runner(cases: u32) -> TestRunner {
    TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    })
}

/// Every log line of this test process, whatever its level.
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = logs.clone();
        tracing_subscriber::fmt()
            .json()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || Capture(sink.clone()))
            .init();
        logs
    })
    .clone()
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Asserts the property every error must have, and that no secret shows in it.
fn check_error(status: &tonic::Status, secrets: &[&str]) {
    let error_infos = status
        .get_error_details_vec()
        .into_iter()
        .filter(|d| matches!(d, ErrorDetail::ErrorInfo(_)))
        .count();
    assert_eq!(error_infos, 1, "exactly one ErrorInfo: {status:?}");
    let shown = format!(
        "{} {}",
        status.message(),
        String::from_utf8_lossy(status.details())
    );
    for secret in secrets {
        assert!(!shown.contains(secret), "{secret:?} in {status:?}");
    }
}

/// Checks the log lines written since the last check for `secrets`, then forgets them.
fn assert_no_secret_logged(secrets: &[&str]) {
    let logs = std::mem::take(&mut *captured_logs().lock().unwrap());
    let logs = String::from_utf8_lossy(&logs);
    assert!(logs.contains("\"audit\""), "log lines are captured: {logs}");
    for secret in secrets {
        assert!(!logs.contains(secret), "{secret:?} reached a log line");
    }
}

const CONTENT_TYPES: &[&str] = &[
    "application/x-amz-json-1.1",
    "application/json",
    "text/html",
    "text/plain; charset=utf-8",
    "",
];
const ERROR_TYPES: &[&str] = &[
    "UserNotFoundException",
    "InvalidParameterException",
    "CodeMismatchException",
    "TooManyRequestsException",
    "InternalErrorException",
    "NotAuthorizedException",
    "BrandNewException",
    "",
];

fn upstream_reply() -> impl Strategy<Value = (u16, &'static str, Vec<u8>)> {
    let status = prop_oneof![
        Just(200u16),
        Just(400u16),
        Just(429u16),
        Just(500u16),
        100u16..600,
    ];
    let body = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..300),
        (prop::sample::select(ERROR_TYPES), ".{0,40}").prop_map(|(code, message)| {
            serde_json::json!({"__type": code, "message": message})
                .to_string()
                .into_bytes()
        }),
        (".{0,40}", prop::sample::select(&["EMAIL", "SMS", "X"][..])).prop_map(
            |(destination, medium)| {
                serde_json::json!({"CodeDeliveryDetails": {
                    "Destination": destination, "DeliveryMedium": medium, "AttributeName": "email"
                }})
                .to_string()
                .into_bytes()
            }
        ),
        Just(b"{}".to_vec()),
        Just(b"[]".to_vec()),
        Just(br#"{"CodeDeliveryDetails": 5}"#.to_vec()),
    ];
    (status, prop::sample::select(CONTENT_TYPES), body)
}

/// True when the upstream answer is a well-formed Cognito success.
fn well_formed_success(status: u16, content_type: &str, body: &[u8]) -> bool {
    status == 200
        && content_type == "application/x-amz-json-1.1"
        && matches!(
            serde_json::from_slice::<serde_json::Value>(body),
            Ok(serde_json::Value::Object(_))
        )
}

/// The error code an upstream error answer names, if any.
fn error_type(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    Some(value.get("__type")?.as_str()?.to_owned())
}

/// The two properties that read the log capture run one after the other, so neither clears
/// the other's lines.
#[test]
fn no_wrong_answer_and_no_secret_whatever_arrives_from_either_side() {
    whatever_the_upstream_answers_ok_means_success_and_errors_are_well_formed();
    whatever_a_caller_sends_the_answer_is_well_formed_and_keeps_secrets();
}

fn whatever_the_upstream_answers_ok_means_success_and_errors_are_well_formed() {
    let logs = captured_logs();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let app = runtime.block_on(TestApp::spawn());
    let client = runtime.block_on(app.client());
    let mut runner = runner(200);

    runner
        .run(
            &(
                upstream_reply(),
                any::<bool>(),
                "[A-Za-z0-9]{12}",
                "[0-9]{8}",
            ),
            |((status, content_type, body), forgot, password, code)| {
                let password = format!("Pw-{password}");
                let code = format!("7{code}");
                let reply = Reply::Bytes {
                    status,
                    content_type,
                    body: body.clone(),
                };
                app.cognito.respond_with(move |_| reply.clone());
                let mut client = client.clone();
                let answer = runtime.block_on(async {
                    if forgot {
                        client
                            .forgot_password(common::forgot("prop@example.com"))
                            .await
                            .map(drop)
                    } else {
                        client
                            .confirm_forgot_password(ConfirmForgotPasswordRequest {
                                username: "prop@example.com".into(),
                                confirmation_code: code.clone(),
                                password: password.clone(),
                                ..Default::default()
                            })
                            .await
                            .map(drop)
                    }
                });
                match answer {
                    Ok(()) => {
                        let masked = forgot
                            && (400..600).contains(&status)
                            && matches!(
                                error_type(&body).as_deref(),
                                Some("UserNotFoundException" | "InvalidParameterException")
                            );
                        prop_assert!(
                            well_formed_success(status, content_type, &body) || masked,
                            "OK for HTTP {status} {content_type:?} {:?}",
                            String::from_utf8_lossy(&body)
                        );
                    }
                    Err(error) => check_error(&error, &[&password, &code, CLIENT_SECRET]),
                }
                assert_no_secret_logged(&[&password, &code, CLIENT_SECRET]);
                Ok(())
            },
        )
        .unwrap();

    drop(logs);
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,40}",
        "[ -~]{0,300}",
        Just(String::new()),
        "\\PC{120,140}"
    ]
}

fn whatever_a_caller_sends_the_answer_is_well_formed_and_keeps_secrets() {
    let _ = captured_logs();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let app = runtime.block_on(TestApp::spawn());
    let channel = runtime.block_on(app.channel());
    let mut runner = runner(200);
    let fields = (
        text(),
        text(),
        "[!-~]{6,20}",
        "[!-~]{6,20}",
        prop::collection::hash_map(".{0,10}", text(), 0..3),
        proptest::option::of((text(), text())),
    );

    runner
        .run(
            &(fields, any::<bool>()),
            |((username, client_id, code, password, metadata, context), forgot)| {
                let code = format!("C0de{code}");
                let password = format!("Pw{password}");
                let user_context = context.map(|(ip_address, encoded_data)| UserContext {
                    ip_address,
                    encoded_data,
                });
                let mut client =
                    password_recovery::proto::v1::password_recovery_client::PasswordRecoveryClient::new(
                        channel.clone(),
                    );
                let answer = runtime.block_on(async {
                    if forgot {
                        client
                            .forgot_password(ForgotPasswordRequest {
                                username,
                                client_id,
                                client_metadata: metadata,
                                user_context,
                                analytics_endpoint_id: String::new(),
                                request_id: String::new(),
                            })
                            .await
                            .map(drop)
                    } else {
                        client
                            .confirm_forgot_password(ConfirmForgotPasswordRequest {
                                username,
                                confirmation_code: code.clone(),
                                password: password.clone(),
                                client_id,
                                client_metadata: metadata,
                                user_context,
                                analytics_endpoint_id: String::new(),
                                request_id: String::new(),
                            })
                            .await
                            .map(drop)
                    }
                });
                if let Err(status) = answer {
                    check_error(&status, &[&code, &password]);
                }
                assert_no_secret_logged(&[&code, &password]);
                Ok(())
            },
        )
        .unwrap();
}

#[test]
fn whatever_bytes_arrive_as_a_message_errors_carry_one_error_info() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let app = runtime.block_on(TestApp::spawn());
    let channel = runtime.block_on(app.channel());
    let mut runner = runner(500);

    runner
        .run(
            &(
                proptest::collection::vec(any::<u8>(), 0..200),
                prop::sample::select(&["ForgotPassword", "ConfirmForgotPassword"][..]),
            ),
            |(bytes, method)| {
                let answer = runtime.block_on(raw::call(channel.clone(), method, bytes));
                if let Err(status) = answer {
                    check_error(&status, &[]);
                }
                Ok(())
            },
        )
        .unwrap();
}
