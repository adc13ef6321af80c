//! Audit events from the real binary: one per reset requested, confirmed or refused, naming the
//! user only by a keyed hash (stable across replicas that share `USERNAME_HASH_KEY_FILE`), the
//! caller by its mTLS identity, and never a username, code, password or secret.

mod common;

use common::certs::{self, Ca, Leaf, SecretMount};
use common::process::ServiceProcess;
use common::{CLIENT_ID, FakeCognito, Reply, forgot};
use password_recovery::proto::v1::ConfirmForgotPasswordRequest;
use password_recovery::proto::v1::password_recovery_client::PasswordRecoveryClient;
use serde_json::Value;
use tonic::Request;
use tonic::transport::Channel;

const USERNAME: &str = "Felicity.Private@example.com";
const CODE: &str = "739184";
const PASSWORD: &str = "Audit-Passw0rd!";

fn confirm() -> ConfirmForgotPasswordRequest {
    ConfirmForgotPasswordRequest {
        username: USERNAME.into(),
        confirmation_code: CODE.into(),
        password: PASSWORD.into(),
        ..Default::default()
    }
}

/// A username hash key file, removed when dropped.
fn key_file() -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), "0123456789abcdef0123456789abcdef\n").unwrap();
    file
}

fn audit_events(lines: &[String]) -> Vec<Value> {
    lines
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|e| e["target"] == "audit")
        .collect()
}

fn assert_private(lines: &[String]) {
    let text = lines.join("\n");
    for private in [
        USERNAME,
        &USERNAME.to_lowercase(),
        "felicity",
        "Felicity",
        CODE,
        PASSWORD,
        common::CLIENT_SECRET,
        "0123456789abcdef",
    ] {
        assert!(!text.contains(private), "{private:?} in the logs");
    }
}

#[tokio::test]
async fn every_reset_leaves_an_audit_event_without_private_data() {
    // Arrange
    let cognito = FakeCognito::start().await;
    let key = key_file();
    let service = ServiceProcess::against(
        &cognito,
        &[
            // Both RPCs spend one budget: the fifth call is refused.
            ("USERNAME_RATE_LIMIT", "4/1h"),
            ("USERNAME_HASH_KEY_FILE", key.path().to_str().unwrap()),
        ],
    )
    .await;
    let mut client = service.client().await;

    // Act: requested, confirmed, refused by Cognito, refused by a limit, refused as invalid.
    let mut request = Request::new(forgot(USERNAME));
    request
        .metadata_mut()
        .insert("x-request-id", "audit-req-1".parse().unwrap());
    client.forgot_password(request).await.unwrap();
    client.confirm_forgot_password(confirm()).await.unwrap();
    cognito.script([Reply::error("CodeMismatchException")]);
    client.confirm_forgot_password(confirm()).await.unwrap_err();
    client
        .forgot_password(forgot(&USERNAME.to_uppercase()))
        .await
        .unwrap();
    client.forgot_password(forgot(USERNAME)).await.unwrap_err();
    client
        .forgot_password(forgot("has space"))
        .await
        .unwrap_err();
    let (_, lines, _) = service.terminate().await;

    // Assert
    let events = audit_events(&lines);
    let summary: Vec<(&str, &str, Option<&str>)> = events
        .iter()
        .map(|e| {
            (
                e["event"].as_str().unwrap(),
                e["grpc.code"].as_str().unwrap(),
                e["reason"].as_str(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("password_reset.requested", "OK", None),
            ("password_reset.confirmed", "OK", None),
            (
                "password_reset.refused",
                "INVALID_ARGUMENT",
                Some("CODE_MISMATCH")
            ),
            ("password_reset.requested", "OK", None),
            (
                "password_reset.refused",
                "RESOURCE_EXHAUSTED",
                Some("RATE_LIMITED")
            ),
            (
                "password_reset.refused",
                "INVALID_ARGUMENT",
                Some("INVALID_REQUEST")
            ),
        ]
    );
    let user = events[0]["user"].as_str().unwrap();
    assert_eq!(user.len(), 32);
    assert!(user.bytes().all(|b| b.is_ascii_hexdigit()));
    for event in &events[..5] {
        assert_eq!(event["user"], user, "one user, one hash, whatever the case");
        assert_eq!(event["caller"], "anonymous");
        assert_eq!(event["client_id"], CLIENT_ID);
        assert!(
            event["request_id"]
                .as_str()
                .is_some_and(|id| !id.is_empty())
        );
    }
    assert_eq!(events[0]["request_id"], "audit-req-1");
    assert_private(&lines);
}

#[tokio::test]
async fn replicas_sharing_the_hash_key_name_a_user_alike() {
    let cognito = FakeCognito::start().await;
    let key = key_file();
    let mut hashes = Vec::new();
    for _ in 0..2 {
        let service = ServiceProcess::against(
            &cognito,
            &[("USERNAME_HASH_KEY_FILE", key.path().to_str().unwrap())],
        )
        .await;
        service
            .client()
            .await
            .forgot_password(forgot(USERNAME))
            .await
            .unwrap();
        let (_, lines, _) = service.terminate().await;
        hashes.push(audit_events(&lines)[0]["user"].as_str().unwrap().to_owned());
    }
    assert_eq!(hashes[0], hashes[1]);
}

async fn mtls_client(
    service: &ServiceProcess,
    ca: &Ca,
    identity: &Leaf,
) -> PasswordRecoveryClient<Channel> {
    let port = service.target.rsplit(':').next().unwrap();
    certs::mtls_client(port.parse().unwrap(), ca, identity).await
}

#[tokio::test]
async fn the_caller_is_named_by_its_certificates_uri_san_else_its_common_name() {
    let cognito = FakeCognito::start().await;
    let ca = Ca::new("callers CA");
    let mount = SecretMount::new(&ca.server("password-recovery"), Some(&ca.pem()));
    let (cert, key, client_ca) = (mount.cert(), mount.key(), mount.ca());
    let service = ServiceProcess::against(
        &cognito,
        &[
            ("TLS_CERT_FILE", cert.to_str().unwrap()),
            ("TLS_KEY_FILE", key.to_str().unwrap()),
            ("TLS_CLIENT_CA_FILE", client_ca.to_str().unwrap()),
        ],
    )
    .await;

    let spiffe = ca.client_with_uri("billing", "spiffe://example.org/ns/billing/sa/api");
    mtls_client(&service, &ca, &spiffe)
        .await
        .forgot_password(forgot(USERNAME))
        .await
        .unwrap();
    mtls_client(&service, &ca, &ca.client("support-tool"))
        .await
        .forgot_password(forgot(USERNAME))
        .await
        .unwrap();
    let (_, lines, _) = service.terminate().await;

    let callers: Vec<_> = audit_events(&lines)
        .iter()
        .map(|e| e["caller"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        callers,
        ["spiffe://example.org/ns/billing/sa/api", "support-tool"]
    );
    assert_private(&lines);
}
