//! TLS and mTLS on the gRPC port with certificates generated per test (rcgen): handshakes
//! accepted and refused, rotation by swapping a Kubernetes-style `..data` symlink, and the
//! plaintext health port that kubelet probes use while TLS is on.

mod common;

use std::time::Duration;

use common::certs::{Ca, Leaf, SecretMount, handshake};
use common::{TestApp, forgot, metric, scrape};
use password_recovery::proto::v1::password_recovery_client::PasswordRecoveryClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const RELOAD: Duration = Duration::from_millis(100);

async fn spawn_tls(mount: &SecretMount, mtls: bool) -> TestApp {
    let (cert, key, ca) = (mount.cert(), mount.key(), mount.ca());
    let mut settings = vec![
        ("TLS_CERT_FILE", cert.to_str().unwrap()),
        ("TLS_KEY_FILE", key.to_str().unwrap()),
        ("TLS_RELOAD_INTERVAL", "100ms"),
    ];
    if mtls {
        settings.push(("TLS_CLIENT_CA_FILE", ca.to_str().unwrap()));
    }
    TestApp::spawn_with(&settings).await
}

async fn tls_channel(app: &TestApp, ca: &Ca, identity: Option<&Leaf>) -> Result<Channel, String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca.pem()))
        .domain_name("localhost");
    if let Some(leaf) = identity {
        tls = tls.identity(Identity::from_pem(&leaf.cert_pem, &leaf.key_pem));
    }
    Channel::from_shared(format!("https://localhost:{}", app.addr.port()))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))
}

async fn call_over(channel: Channel) -> Result<(), tonic::Status> {
    PasswordRecoveryClient::new(channel)
        .forgot_password(forgot("tls-user"))
        .await
        .map(|_| ())
}

#[tokio::test]
async fn tls_serves_grpc_and_refuses_plaintext() {
    let ca = Ca::new("test CA");
    let mount = SecretMount::new(&ca.server("server"), None);
    let app = spawn_tls(&mount, false).await;

    let channel = tls_channel(&app, &ca, None).await.expect("TLS connects");
    call_over(channel).await.expect("a call over TLS");

    let plaintext = Channel::from_shared(format!("http://{}", app.addr))
        .unwrap()
        .connect()
        .await;
    let refused = match plaintext {
        Err(_) => true,
        Ok(channel) => call_over(channel).await.is_err(),
    };
    assert!(refused, "plaintext gRPC was served on the TLS port");
}

#[tokio::test]
async fn mtls_accepts_only_clients_the_ca_signed() {
    let ca = Ca::new("test CA");
    let stranger_ca = Ca::new("another CA");
    let mount = SecretMount::new(&ca.server("server"), Some(&ca.pem()));
    let app = spawn_tls(&mount, true).await;

    let trusted = ca.client("spiffe-caller");
    let channel = tls_channel(&app, &ca, Some(&trusted))
        .await
        .expect("a trusted client connects");
    call_over(channel)
        .await
        .expect("a call with a client certificate");

    assert!(handshake(app.addr, &ca.pem(), Some(&trusted)).await.is_ok());
    let anonymous = handshake(app.addr, &ca.pem(), None).await;
    assert!(
        anonymous.is_err(),
        "a client without a certificate was accepted"
    );
    let stranger = handshake(app.addr, &ca.pem(), Some(&stranger_ca.client("intruder"))).await;
    assert!(
        stranger.is_err(),
        "a client signed by another CA was accepted"
    );
}

#[tokio::test]
async fn rotating_the_secret_swaps_the_certificate_without_dropping_connections() {
    // Arrange: serving v1, with one connection open.
    let ca = Ca::new("test CA");
    let (v1, v2) = (ca.server("server v1"), ca.server("server v2"));
    let mut mount = SecretMount::new(&v1, None);
    let app = spawn_tls(&mount, false).await;
    let open = tls_channel(&app, &ca, None).await.unwrap();
    call_over(open.clone()).await.unwrap();
    assert_eq!(
        handshake(app.addr, &ca.pem(), None).await.unwrap(),
        v1.der()
    );

    // Act: the kubelet swaps `..data`.
    mount.rotate(&v2, None);

    // Assert: new handshakes see v2 once a poll has passed; the open connection still works.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let served = handshake(app.addr, &ca.pem(), None).await.unwrap();
        if served == v2.der() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "v2 never served");
        tokio::time::sleep(RELOAD).await;
    }
    call_over(open)
        .await
        .expect("the connection opened before rotation still works");
}

#[tokio::test]
async fn a_broken_rotation_keeps_the_previous_certificate() {
    let ca = Ca::new("test CA");
    let v1 = ca.server("server v1");
    let mut mount = SecretMount::new(&v1, None);
    let app = spawn_tls(&mount, false).await;

    let broken = Leaf {
        cert_pem: "not a certificate".into(),
        key_pem: v1.key_pem.clone(),
    };
    let metrics_addr = app.metrics_addr.to_string();
    let failed = || async {
        let text = scrape(&metrics_addr).await;
        metric(
            &text,
            "tls_certificate_reloads_total",
            &["result=\"failed\""],
        )
        .unwrap_or(0.0)
    };
    // Only this test writes broken files, so the process-wide count moves only for it.
    let before = failed().await;
    mount.rotate(&broken, None);

    // The reloader counts the broken files it read; the previous certificate is still served.
    let noticed = async {
        while failed().await <= before {
            tokio::time::sleep(RELOAD).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), noticed)
        .await
        .expect("the reloader never read the broken files");
    assert_eq!(
        handshake(app.addr, &ca.pem(), None).await.unwrap(),
        v1.der()
    );

    // And the reloader is alive after it: a good rotation still applies.
    let v2 = ca.server("server v2");
    mount.rotate(&v2, None);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while handshake(app.addr, &ca.pem(), None).await.unwrap() != v2.der() {
        assert!(tokio::time::Instant::now() < deadline, "v2 never served");
        tokio::time::sleep(RELOAD).await;
    }
}

#[tokio::test]
async fn rotating_the_client_ca_changes_who_may_connect() {
    let (ca, next_ca) = (Ca::new("CA 2026"), Ca::new("CA 2027"));
    let server = ca.server("server");
    let mut mount = SecretMount::new(&server, Some(&ca.pem()));
    let app = spawn_tls(&mount, true).await;
    let next_client = next_ca.client("caller 2027");
    assert!(
        handshake(app.addr, &ca.pem(), Some(&next_client))
            .await
            .is_err()
    );

    mount.rotate(&server, Some(&next_ca.pem()));

    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while handshake(app.addr, &ca.pem(), Some(&next_client))
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new CA never applied"
        );
        tokio::time::sleep(RELOAD).await;
    }
    assert!(
        handshake(app.addr, &ca.pem(), Some(&ca.client("caller 2026")))
            .await
            .is_err(),
        "the old CA still admits clients"
    );
}

#[tokio::test]
async fn health_is_served_in_plaintext_on_its_own_port_when_tls_is_on() {
    let ca = Ca::new("test CA");
    let mount = SecretMount::new(&ca.server("server"), Some(&ca.pem()));
    let app = spawn_tls(&mount, true).await;
    let health_addr = app.health_addr.expect("a health port with TLS on");

    // kubelet's probe: plaintext, no client certificate.
    let channel = Channel::from_shared(format!("http://{health_addr}"))
        .unwrap()
        .connect()
        .await
        .expect("plaintext health port");
    for service in ["", "passwordrecovery.v1.PasswordRecovery"] {
        let status = HealthClient::new(channel.clone())
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health answers")
            .into_inner()
            .status();
        assert_eq!(status, ServingStatus::Serving, "{service:?}");
    }

    // Only health is there: the API stays behind mTLS.
    let status = call_over(channel).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unimplemented);
}

#[tokio::test]
async fn without_tls_there_is_no_separate_health_port() {
    let app = TestApp::spawn().await;
    assert_eq!(app.health_addr, None);
}
