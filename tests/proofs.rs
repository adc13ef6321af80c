//! Proving the app clients, against the fake Cognito answering the proofs (a ForgotPassword for
//! a username nobody has) in each shape Cognito can: the verdict, its log line, its metrics,
//! readiness and the per-client health; a misconfigured client refused before Cognito while the
//! others serve; a secret rotated to a wrong value caught, and a fixed one let back; an outage
//! that keeps the replica ready; and the `check` command's lines and exit codes.

mod common;

use std::path::PathBuf;

use common::process::{ServiceProcess, command};
use common::{
    CLIENT_ID, CLIENT_SECRET, FakeCognito, Recorded, Reply, assert_error, forgot, health_status,
    metric,
};
use password_recovery::cognito::secret_hash;
use secrecy::SecretString;
use serde_json::Value;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

const SERVICE: &str = "passwordrecovery.v1.PasswordRecovery";

/// Cognito's answer to a wrong or missing secret hash.
fn bad_secret_hash() -> Reply {
    Reply::Error {
        status: 400,
        code: "NotAuthorizedException",
        message: "Unable to verify secret hash for client testclient123",
    }
}

/// A proof's answer: as `secret` would be checked by Cognito, then a simulated delivery.
fn checking_secret(secret: &'static str) -> impl Fn(&Recorded) -> Reply + Send + Sync {
    move |probe| {
        let username = probe.body["Username"].as_str().unwrap();
        let expected = secret_hash(&SecretString::from(secret), username, CLIENT_ID);
        match probe.body["SecretHash"].as_str() == Some(expected.as_str()) {
            true => Reply::Ok(serde_json::json!({"CodeDeliveryDetails": {
                "Destination": "p***@p***", "DeliveryMedium": "EMAIL", "AttributeName": "email"
            }})),
            false => bad_secret_hash(),
        }
    }
}

/// The first proof's line of `service`.
async fn first_proof(service: &mut ServiceProcess) -> Value {
    service
        .wait_for_line(|e| e["probe"] == true && e["client"] == "default")
        .await
}

/// One answer shape: its verdict's line, and how the replica then stands.
struct Shape {
    name: &'static str,
    answer: Option<Reply>,
    extra: &'static [(&'static str, &'static str)],
    message: &'static str,
    level: &'static str,
    mode: Option<&'static str>,
    cause: Option<&'static str>,
    result: &'static str,
}

#[tokio::test]
async fn every_answer_shape_has_its_verdict_line_metrics_and_readiness() {
    let shapes = [
        Shape {
            name: "a simulated delivery",
            answer: None,
            extra: &[],
            message: "app client proven: it works",
            level: "INFO",
            mode: Some("ENABLED"),
            cause: None,
            result: "ready",
        },
        Shape {
            name: "user not found",
            answer: Some(Reply::error("UserNotFoundException")),
            extra: &[],
            message: "app client proven: it works",
            level: "INFO",
            mode: Some("LEGACY"),
            cause: None,
            result: "ready",
        },
        Shape {
            name: "resource not found",
            answer: Some(Reply::error("ResourceNotFoundException")),
            extra: &[],
            message: "app client misconfigured",
            level: "ERROR",
            mode: None,
            cause: Some("no such app client or user pool"),
            result: "misconfigured",
        },
        Shape {
            name: "a bad secret hash",
            answer: Some(bad_secret_hash()),
            extra: &[],
            message: "app client misconfigured",
            level: "ERROR",
            mode: None,
            cause: Some("the client secret is wrong"),
            result: "misconfigured",
        },
        Shape {
            name: "not authorised",
            answer: Some(Reply::Error {
                status: 400,
                code: "NotAuthorizedException",
                message: "Contact administrator to reset password.",
            }),
            extra: &[],
            message: "app client misconfigured",
            level: "ERROR",
            mode: None,
            cause: Some("does not let this client reset passwords"),
            result: "misconfigured",
        },
        Shape {
            name: "a 5xx",
            answer: Some(Reply::Raw {
                status: 503,
                body: "",
            }),
            extra: &[],
            message: "app client not proven",
            level: "WARN",
            mode: None,
            cause: Some("HTTP 503"),
            result: "unproven",
        },
        Shape {
            name: "a timeout",
            answer: Some(Reply::Hang),
            extra: &[("COGNITO_TIMEOUT", "300ms")],
            message: "app client not proven",
            level: "WARN",
            mode: None,
            cause: Some("no answer within"),
            result: "unproven",
        },
    ];
    for shape in shapes {
        let cognito = FakeCognito::start().await;
        if let Some(answer) = shape.answer.clone() {
            cognito.probe_with(move |_| answer.clone());
        }
        let mut service = ServiceProcess::against(&cognito, shape.extra).await;
        let line = first_proof(&mut service).await;
        check_shape(&shape, &line, &service, &cognito).await;
    }

    // Connection refused: a port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let mut service = ServiceProcess::start(&[
        ("COGNITO_CLIENT_ID", CLIENT_ID),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ENDPOINT_URL", &url),
    ])
    .await;
    let line = first_proof(&mut service).await;
    assert_eq!(
        line["message"],
        "app client not proven: Cognito gave no verdict; proving again"
    );
    assert!(
        line["cause"]
            .as_str()
            .unwrap()
            .contains("could not be reached"),
        "{line}"
    );
    assert_eq!(
        health_status(&service.target, SERVICE).await,
        Some(ServingStatus::Serving),
        "an unreachable Cognito does not hold readiness back"
    );
    // A proof is no user's call: no audit event, no call line.
    let (_, lines, _) = service.terminate().await;
    assert!(
        !lines
            .iter()
            .any(|l| l.contains("password_reset.") || l.contains("grpc.method")),
        "{lines:#?}"
    );
}

async fn check_shape(shape: &Shape, line: &Value, service: &ServiceProcess, cognito: &FakeCognito) {
    let name = shape.name;
    let message = line["message"].as_str().unwrap();
    assert!(message.starts_with(shape.message), "{name}: {line}");
    assert_eq!(line["level"], shape.level, "{name}: {line}");
    assert!(line["latency_ms"].is_u64(), "{name}: {line}");
    if let Some(mode) = shape.mode {
        assert_eq!(
            line["prevent_user_existence_errors"], mode,
            "{name}: {line}"
        );
    }
    if let Some(cause) = shape.cause {
        let said = line["cause"].as_str().unwrap();
        assert!(said.contains(cause), "{name}: {said}");
        assert!(!said.contains(CLIENT_SECRET), "{name}: {said}");
    }
    let misconfigured = shape.result == "misconfigured";
    let metrics = service.scrape().await;
    let client = r#"client="default""#;
    let ready = metric(&metrics, "cognito_client_ready", &[client]);
    assert_eq!(
        ready,
        Some(f64::from(u8::from(!misconfigured))),
        "{name}: {metrics}"
    );
    let result = format!(r#"result="{}""#, shape.result);
    let checks = metric(&metrics, "cognito_client_checks_total", &[client, &result]);
    assert_eq!(checks, Some(1.0), "{name}: {metrics}");
    let mode = format!(
        r#"prevent_user_existence_errors="{}""#,
        shape.mode.unwrap_or("unknown")
    );
    let info = metric(&metrics, "cognito_client_info", &[client, &mode]);
    assert_eq!(info, Some(1.0), "{name}: {metrics}");
    let probes = r#"operation="ForgotPasswordProbe""#;
    assert!(
        metric(&metrics, "cognito_requests_total", &[probes]).is_some(),
        "{name}"
    );

    let (serving, not_serving) = (
        Some(ServingStatus::Serving),
        Some(ServingStatus::NotServing),
    );
    let expected = if misconfigured { not_serving } else { serving };
    assert_eq!(
        health_status(&service.target, SERVICE).await,
        expected,
        "{name}"
    );
    assert_eq!(
        health_status(&service.target, "client/default").await,
        expected,
        "{name}"
    );
    assert_eq!(
        health_status(&service.target, "").await,
        serving,
        "{name}: alive"
    );

    let answer = service.client().await.forgot_password(forgot("ann")).await;
    match misconfigured {
        true => {
            let status = answer.unwrap_err();
            let info = assert_error(&status, Code::FailedPrecondition, "CLIENT_MISCONFIGURED");
            assert_eq!(info.metadata["client"], "default");
            assert!(
                cognito.recorded().is_empty(),
                "{name}: refused before Cognito"
            );
        }
        false => {
            answer.unwrap_or_else(|e| panic!("{name}: {e:?}"));
            assert_eq!(cognito.recorded().len(), 1, "{name}");
        }
    }
}

/// A clients file in `dir`: `web` (the default, `webclient123`) and `other` (alias, client id),
/// in two pools on `cognito`.
fn two_clients(dir: &std::path::Path, cognito: &FakeCognito, other: (&str, &str)) -> PathBuf {
    let (alias, id) = other;
    let file = dir.join("clients.toml");
    let text = format!(
        r#"
default = "web"

[clients.web]
client_id = "webclient123"
user_pool_id = "us-east-1_PoolOne"
region = "us-east-1"
endpoint_url = "{url}"

[clients.{alias}]
client_id = "{id}"
user_pool_id = "us-east-1_PoolTwo"
region = "us-east-1"
endpoint_url = "{url}"
"#,
        url = cognito.url
    );
    std::fs::write(&file, text).unwrap();
    file
}

#[tokio::test]
async fn a_misconfigured_client_is_refused_while_the_others_serve() {
    let cognito = FakeCognito::start().await;
    cognito.probe_with(|probe| match probe.body["ClientId"].as_str() {
        Some("brokenclient456") => Reply::error("ResourceNotFoundException"),
        _ => Reply::error("UserNotFoundException"),
    });
    let dir = tempfile::tempdir().unwrap();
    let file = two_clients(dir.path(), &cognito, ("partner", "brokenclient456"));
    let service = ServiceProcess::start(&[
        ("COGNITO_CLIENTS_FILE", file.to_str().unwrap()),
        ("AWS_REGION", "us-east-1"),
    ])
    .await;
    let serving = Some(ServingStatus::Serving);
    assert_eq!(health_status(&service.target, SERVICE).await, serving);
    assert_eq!(health_status(&service.target, "client/web").await, serving);
    assert_eq!(
        health_status(&service.target, "client/partner").await,
        Some(ServingStatus::NotServing)
    );
    let mut client = service.client().await;
    let refused = client
        .forgot_password(password_recovery::proto::v1::ForgotPasswordRequest {
            client_id: "brokenclient456".into(),
            ..forgot("ann")
        })
        .await
        .unwrap_err();
    let info = assert_error(&refused, Code::FailedPrecondition, "CLIENT_MISCONFIGURED");
    assert_eq!(info.metadata["client"], "partner");
    assert!(cognito.recorded().is_empty());
    client
        .forgot_password(forgot("ann"))
        .await
        .expect("web serves");
    let metrics = service.scrape().await;
    let legacy = r#"prevent_user_existence_errors="LEGACY""#;
    assert_eq!(
        metric(
            &metrics,
            "cognito_client_info",
            &[r#"client="web""#, legacy]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(&metrics, "cognito_client_ready", &[r#"client="partner""#]),
        Some(0.0)
    );
}

#[tokio::test]
async fn a_rotated_secret_is_proven_at_once_and_only_the_client_is_refused() {
    let cognito = FakeCognito::start().await;
    cognito.probe_with(checking_secret(CLIENT_SECRET));
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("client-secret");
    // A wrong secret at start-up: never ready.
    std::fs::write(&secret, "a-wrong-secret").unwrap();
    let mut service = ServiceProcess::against(
        &cognito,
        &[
            ("COGNITO_CLIENT_SECRET", ""),
            ("COGNITO_CLIENT_SECRET_FILE", secret.to_str().unwrap()),
            ("FILE_RELOAD_INTERVAL", "100ms"),
        ],
    )
    .await;
    let line = first_proof(&mut service).await;
    assert!(
        line["cause"].as_str().unwrap().contains("secret is wrong"),
        "{line}"
    );
    assert!(!line.to_string().contains("a-wrong-secret"), "{line}");
    assert_eq!(
        health_status(&service.target, SERVICE).await,
        Some(ServingStatus::NotServing)
    );

    // Fixed: proven at once (not after the 30 s a misconfigured client waits), and ready.
    std::fs::write(&secret, CLIENT_SECRET).unwrap();
    let proven = service.wait_for_line(|e| e["message"] == "app client proven: it works");
    tokio::time::timeout(std::time::Duration::from_secs(5), proven)
        .await
        .expect("proven as soon as the secret changed");
    assert_eq!(
        health_status(&service.target, SERVICE).await,
        Some(ServingStatus::Serving)
    );
    let mut client = service.client().await;
    client.forgot_password(forgot("ann")).await.expect("served");

    // Rotated to a wrong value while serving: its calls are refused, the replica stays ready.
    std::fs::write(&secret, "another-wrong-secret").unwrap();
    service
        .wait_for_line(|e| {
            e["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("app client misconfigured"))
        })
        .await;
    let refused = client.forgot_password(forgot("ann")).await.unwrap_err();
    assert_error(&refused, Code::FailedPrecondition, "CLIENT_MISCONFIGURED");
    assert_eq!(
        cognito.recorded().len(),
        1,
        "the refused call reached no Cognito"
    );
    assert_eq!(
        health_status(&service.target, SERVICE).await,
        Some(ServingStatus::Serving),
        "once ready, a replica stays ready"
    );
    assert_eq!(
        health_status(&service.target, "client/default").await,
        Some(ServingStatus::NotServing)
    );
}

#[tokio::test]
async fn a_cognito_outage_keeps_the_replica_ready() {
    let cognito = FakeCognito::start().await;
    let outage = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let down = outage.clone();
    cognito.probe_with(
        move |_| match down.load(std::sync::atomic::Ordering::SeqCst) {
            true => Reply::error("InternalErrorException"),
            false => Reply::error("UserNotFoundException"),
        },
    );
    let mut service =
        ServiceProcess::against(&cognito, &[("CLIENT_CHECK_INTERVAL", "200ms")]).await;
    first_proof(&mut service).await;
    outage.store(true, std::sync::atomic::Ordering::SeqCst);
    let line = service
        .wait_for_line(|e| {
            e["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("app client not proven"))
        })
        .await;
    assert!(
        line["cause"]
            .as_str()
            .unwrap()
            .contains("InternalErrorException"),
        "{line}"
    );
    let serving = Some(ServingStatus::Serving);
    assert_eq!(health_status(&service.target, SERVICE).await, serving);
    assert_eq!(
        health_status(&service.target, "client/default").await,
        serving
    );
    service
        .client()
        .await
        .forgot_password(forgot("ann"))
        .await
        .expect("a Cognito outage is not a misconfiguration");
    let metrics = service.scrape().await;
    let unproven = r#"result="unproven""#;
    assert!(metric(&metrics, "cognito_client_checks_total", &[unproven]).is_some_and(|n| n >= 1.0));
}

#[tokio::test]
async fn check_prints_a_line_per_client_and_exits_0_only_when_all_work() {
    let cognito = FakeCognito::start().await;
    let run = |extra: &[(&str, &str)]| {
        let mut vars = vec![
            ("COGNITO_CLIENT_ID", CLIENT_ID),
            ("COGNITO_CLIENT_SECRET", CLIENT_SECRET),
            ("AWS_REGION", "us-east-1"),
            ("AWS_ENDPOINT_URL", cognito.url.as_str()),
        ];
        vars.extend_from_slice(extra);
        command(&vars).arg("check").output()
    };
    let works = run(&[]).await.unwrap();
    let stdout = String::from_utf8_lossy(&works.stdout);
    assert_eq!(works.status.code(), Some(0), "{stdout}");
    let line = stdout.trim();
    assert!(
        line.starts_with(
            "client=default verdict=ready prevent_user_existence_errors=ENABLED latency="
        ),
        "{line}"
    );
    assert!(line.ends_with("ms"), "{line}");
    assert_eq!(stdout.lines().count(), 1);

    cognito.probe_with(|_| bad_secret_hash());
    let wrong = run(&[]).await.unwrap();
    let stdout = String::from_utf8_lossy(&wrong.stdout);
    assert_eq!(wrong.status.code(), Some(2), "{stdout}");
    assert!(stdout.contains("verdict=misconfigured"), "{stdout}");
    assert!(stdout.contains("Unable to verify secret hash"), "{stdout}");
    assert!(!stdout.contains(CLIENT_SECRET), "{stdout}");

    cognito.probe_with(|_| Reply::error("TooManyRequestsException"));
    let throttled = run(&[]).await.unwrap();
    let stdout = String::from_utf8_lossy(&throttled.stdout);
    assert_eq!(
        throttled.status.code(),
        Some(2),
        "no proof is no pass: {stdout}"
    );
    assert!(stdout.contains("verdict=unproven"), "{stdout}");

    // A configuration that does not load is the usual one line and exit 2.
    let broken = run(&[("CLIENT_CHECK_INTERVAL", "0s")]).await.unwrap();
    let stderr = String::from_utf8_lossy(&broken.stderr);
    assert_eq!(broken.status.code(), Some(2));
    assert!(stderr.contains("CLIENT_CHECK_INTERVAL"), "{stderr}");
    // One proof per check that loaded; the throttled one tried three times, as any call is.
    assert_eq!(cognito.probes().len(), 1 + 1 + 3);

    // Several clients: a line each, by alias, and exit 2 when one fails.
    cognito.probe_with(|probe| match probe.body["ClientId"].as_str() {
        Some("zzzclient999") => Reply::error("ResourceNotFoundException"),
        _ => Reply::error("UserNotFoundException"),
    });
    let dir = tempfile::tempdir().unwrap();
    let file = two_clients(dir.path(), &cognito, ("archive", "zzzclient999"));
    let output = command(&[
        ("COGNITO_CLIENTS_FILE", file.to_str().unwrap()),
        ("AWS_REGION", "us-east-1"),
    ])
    .arg("check")
    .output()
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(2), "{stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(
        lines[0].starts_with("client=archive verdict=misconfigured"),
        "{stdout}"
    );
    assert!(
        lines[1].starts_with("client=web verdict=ready prevent_user_existence_errors=LEGACY"),
        "{stdout}"
    );
}
