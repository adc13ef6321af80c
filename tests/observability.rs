//! What operators follow a call by: `x-request-id` round trips, W3C trace context on every log
//! line of a call, and Prometheus metrics scraped after OK and failed calls, with no username,
//! request id or secret in any label. Metrics are read from the real binary, a process of its
//! own, so other tests' calls do not count in them.

mod common;

use common::process::ServiceProcess;
use common::{CLIENT_ID, FakeCognito, Reply, TestApp, assert_error, forgot};
use password_recovery::proto::v1::ConfirmForgotPasswordRequest;
use serde_json::Value;
use tonic::Request;

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const SECRET: &str = "observability-client-secret";

#[tokio::test]
async fn a_callers_request_id_comes_back_on_success_and_on_error() {
    let app = TestApp::spawn().await;
    let mut client = app.client().await;

    let mut request = Request::new(forgot("uma"));
    request
        .metadata_mut()
        .insert("x-request-id", "caller-chosen-id-1".parse().unwrap());
    let response = client.forgot_password(request).await.expect("OK");
    assert_eq!(
        response.metadata().get("x-request-id").unwrap(),
        "caller-chosen-id-1"
    );

    let mut request = Request::new(forgot(" invalid"));
    request
        .metadata_mut()
        .insert("x-request-id", "caller-chosen-id-2".parse().unwrap());
    let status = client.forgot_password(request).await.unwrap_err();
    assert_error(&status, tonic::Code::InvalidArgument, "INVALID_REQUEST");
    assert_eq!(
        status.metadata().get("x-request-id").unwrap(),
        "caller-chosen-id-2"
    );
}

#[tokio::test]
async fn a_call_without_a_request_id_gets_a_generated_one() {
    let app = TestApp::spawn().await;
    let mut client = app.client().await;
    let first = client.forgot_password(forgot("vic")).await.unwrap();
    let second = client.forgot_password(forgot("vic")).await.unwrap();
    let id = |r: &tonic::Response<_>| {
        r.metadata()
            .get("x-request-id")
            .expect("a request id")
            .to_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(id(&first).len(), 36, "a UUID");
    assert_ne!(id(&first), id(&second));
}

async fn start_binary(cognito: &FakeCognito) -> ServiceProcess {
    ServiceProcess::start(&[
        ("COGNITO_CLIENT_ID", CLIENT_ID),
        ("COGNITO_CLIENT_SECRET", SECRET),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ENDPOINT_URL", &cognito.url),
        ("RUST_LOG", "trace"),
    ])
    .await
}

#[tokio::test]
async fn every_log_line_of_a_call_carries_its_request_id_and_trace_id() {
    let cognito = FakeCognito::start().await;
    // A throttled first attempt makes the call log more than its final line.
    cognito.script([Reply::error("TooManyRequestsException")]);
    let service = start_binary(&cognito).await;
    let mut request = Request::new(forgot("walt@example.com"));
    request
        .metadata_mut()
        .insert("x-request-id", "trace-me-123".parse().unwrap());
    request
        .metadata_mut()
        .insert("traceparent", TRACEPARENT.parse().unwrap());
    service
        .client()
        .await
        .forgot_password(request)
        .await
        .expect("OK");

    let (_, lines, _) = service.terminate().await;
    let call_lines: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|e| {
            e["target"]
                .as_str()
                .is_some_and(|t| t.starts_with("password_recovery"))
        })
        .filter(|e| e.get("span").is_some())
        .collect();
    assert!(
        call_lines.len() >= 2,
        "the retry and the result: {lines:#?}"
    );
    for line in &call_lines {
        assert_eq!(line["span"]["request_id"], "trace-me-123", "{line}");
        assert_eq!(
            line["span"]["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736",
            "{line}"
        );
        assert_eq!(line["span"]["parent_span_id"], "00f067aa0ba902b7", "{line}");
    }
}

/// The value of the series `name{labels}` in a Prometheus text scrape, labels in any order.
fn sample(scrape: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (series_name, rest) = series.split_once('{').unwrap_or((series, "}"));
        if series_name != name {
            return None;
        }
        let series_labels: Vec<&str> = rest.trim_end_matches('}').split(',').collect();
        let all = labels
            .iter()
            .all(|(k, v)| series_labels.contains(&format!("{k}=\"{v}\"").as_str()));
        (all && series_labels.len() == labels.len() || labels.is_empty() && rest == "}")
            .then(|| value.parse().ok())
            .flatten()
    })
}

#[tokio::test]
async fn metrics_count_calls_by_code_and_cognito_requests_by_outcome() {
    // Arrange
    let cognito = FakeCognito::start().await;
    let service = start_binary(&cognito).await;
    let mut client = service.client().await;
    let username = "xena.private@example.com";

    // Act: two OK calls, one invalid, one Cognito error.
    client.forgot_password(forgot(username)).await.unwrap();
    client.forgot_password(forgot(username)).await.unwrap();
    client
        .forgot_password(forgot("bad name"))
        .await
        .unwrap_err();
    cognito.script([Reply::error("CodeMismatchException")]);
    let mut request = Request::new(ConfirmForgotPasswordRequest {
        username: username.into(),
        confirmation_code: "424242".into(),
        password: "Secret-Passw0rd!".into(),
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("x-request-id", "request-id-not-a-label".parse().unwrap());
    client.confirm_forgot_password(request).await.unwrap_err();
    let scrape = service.scrape().await;

    // Assert
    let service_name = ("grpc_service", "passwordrecovery.v1.PasswordRecovery");
    let forgot_method = ("grpc_method", "ForgotPassword");
    let confirm_method = ("grpc_method", "ConfirmForgotPassword");
    let grpc = ("protocol", "grpc");
    let client = ("client", "default");
    // A caller without a certificate, and no callers policy.
    let caller = ("caller", "anonymous");
    let at = |name, labels: &[(&str, &str)]| {
        sample(&scrape, name, labels).unwrap_or_else(|| panic!("{name} {labels:?}:\n{scrape}"))
    };
    assert_eq!(
        at(
            "grpc_server_started_total",
            &[service_name, grpc, caller, forgot_method]
        ),
        3.0
    );
    assert_eq!(
        at(
            "grpc_server_handled_total",
            &[
                service_name,
                grpc,
                caller,
                client,
                forgot_method,
                ("grpc_code", "OK")
            ]
        ),
        2.0
    );
    assert_eq!(
        at(
            "grpc_server_handled_total",
            &[
                service_name,
                grpc,
                caller,
                ("client", "-"),
                forgot_method,
                ("grpc_code", "INVALID_ARGUMENT"),
                ("reason", "INVALID_REQUEST")
            ]
        ),
        1.0
    );
    assert_eq!(
        at(
            "grpc_server_handled_total",
            &[
                service_name,
                grpc,
                caller,
                client,
                confirm_method,
                ("grpc_code", "INVALID_ARGUMENT"),
                ("reason", "CODE_MISMATCH")
            ]
        ),
        1.0
    );
    assert_eq!(
        at(
            "grpc_server_handling_seconds_count",
            &[service_name, grpc, caller, client, forgot_method]
        ),
        2.0
    );
    assert_eq!(
        at(
            "grpc_server_handling_seconds_count",
            &[service_name, grpc, caller, ("client", "-"), forgot_method]
        ),
        1.0
    );
    assert_eq!(at("grpc_server_in_flight", &[]), 0.0);
    assert_eq!(
        at(
            "cognito_requests_total",
            &[("operation", "ForgotPassword"), ("outcome", "ok")]
        ),
        2.0
    );
    assert_eq!(
        at(
            "cognito_requests_total",
            &[
                ("operation", "ConfirmForgotPassword"),
                ("outcome", "CodeMismatchException")
            ]
        ),
        1.0
    );
    assert_eq!(
        at(
            "cognito_request_seconds_count",
            &[("operation", "ForgotPassword")]
        ),
        2.0
    );
    assert!(
        scrape.contains("cognito_request_seconds_bucket{"),
        "{scrape}"
    );

    for private in [
        username,
        "xena",
        "424242",
        "Secret-Passw0rd",
        SECRET,
        "request-id-not-a-label",
    ] {
        assert!(!scrape.contains(private), "{private:?} in the scrape");
    }
    let (_, lines, _) = service.terminate().await;
    let logs = lines.join("\n");
    for private in [username, "xena", "424242", "Secret-Passw0rd", SECRET] {
        assert!(!logs.contains(private), "{private:?} in the logs");
    }
}
