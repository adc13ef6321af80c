//! Who may call (`CALLERS_FILE`): callers named by their mTLS certificate (URI SAN, else CN),
//! `anonymous`, or a mesh sidecar's header; what each may use; each caller's own limit, on
//! this replica and fleet-wide on Redis; a policy rotated while serving. Every refused call
//! is checked to reach no fake Cognito (it records every request). The binary's one-line
//! refusals of bad files are in `tests/binary.rs`.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::certs::{Ca, Leaf, SecretMount, mtls_client};
use common::process::ServiceProcess;
use common::redis_server::RedisServer;
use common::tools::curl;
use common::{CLIENT_ID, FakeCognito, TestApp, assert_error, confirm, forgot, metric, scrape};
use password_recovery::proto::v1::ForgotPasswordRequest;
use password_recovery::proto::v1::password_recovery_client::PasswordRecoveryClient;
use tonic::transport::Channel;
use tonic::{Code, Request};
use tonic_types::StatusExt;

const WEB: &str = "webclient1";
const SUPPORT: &str = "supportclient2";
const BACKEND: &str = "spiffe://cluster.local/ns/web/sa/backend";

/// Two app clients, `web` (the default) and `support`, on the application's fake Cognito.
fn clients_file(dir: &Path) -> PathBuf {
    let text = format!(
        r#"
default = "web"
[clients.web]
client_id = "{WEB}"
user_pool_id = "eu-west-1_PoolOne"
region = "eu-west-1"
[clients.support]
client_id = "{SUPPORT}"
user_pool_id = "eu-west-1_PoolOne"
region = "eu-west-1"
"#
    );
    let path = dir.join("clients.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// The backend (by its SPIFFE id) may use `web` for both RPCs, at most 2 calls an hour; the
/// support tool (by its CN) both clients, ForgotPassword only.
const POLICY: &str = r#"
[callers."spiffe://cluster.local/ns/web/sa/backend"]
clients = ["web"]
rate_limit = "2/1h"

[callers.support-tool]
clients = ["web", "support"]
rpcs = ["ForgotPassword"]
"#;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// An mTLS client of `app` presenting `identity`.
async fn mtls(app: &TestApp, ca: &Ca, identity: &Leaf) -> PasswordRecoveryClient<Channel> {
    mtls_client(app.addr.port(), ca, identity).await
}

fn via(client_id: &str, username: &str) -> ForgotPasswordRequest {
    ForgotPasswordRequest {
        username: username.into(),
        client_id: client_id.into(),
        ..Default::default()
    }
}

/// Asserts `status` is the callers policy's refusal of `caller`, lacking `lacks` (a metadata
/// key and its value) when given.
fn assert_not_allowed(status: &tonic::Status, caller: &str, lacks: Option<(&str, &str)>) {
    let info = assert_error(status, Code::PermissionDenied, "CALLER_NOT_ALLOWED");
    assert_eq!(info.metadata["caller"], caller, "{status:?}");
    if let Some((key, value)) = lacks {
        assert_eq!(info.metadata[key], value, "{status:?}");
    }
}

struct Mtls {
    app: TestApp,
    ca: Ca,
    dir: tempfile::TempDir,
    _mount: SecretMount,
}

/// The application with TLS, client certificates required, the two clients and `policy`.
async fn with_mtls(policy: &str, extra: &[(&str, &str)]) -> Mtls {
    let ca = Ca::new("callers CA");
    let mount = SecretMount::new(&ca.server("password-recovery"), Some(&ca.pem()));
    let dir = tempfile::tempdir().unwrap();
    let clients = clients_file(dir.path());
    let callers = write(dir.path(), "callers.toml", policy);
    let (cert, key, client_ca) = (mount.cert(), mount.key(), mount.ca());
    let mut settings = vec![
        ("COGNITO_CLIENT_ID", ""),
        ("COGNITO_CLIENT_SECRET", ""),
        ("COGNITO_CLIENTS_FILE", clients.to_str().unwrap()),
        ("CALLERS_FILE", callers.to_str().unwrap()),
        ("TLS_CERT_FILE", cert.to_str().unwrap()),
        ("TLS_KEY_FILE", key.to_str().unwrap()),
        ("TLS_CLIENT_CA_FILE", client_ca.to_str().unwrap()),
    ];
    settings.extend_from_slice(extra);
    let app = TestApp::spawn_with(&settings).await;
    Mtls {
        app,
        ca,
        dir,
        _mount: mount,
    }
}

#[tokio::test]
async fn each_caller_may_use_only_the_clients_and_rpcs_it_is_granted() {
    // The mesh's header is honoured on plaintext connections only, never over TLS.
    let Mtls { app, ca, .. } =
        with_mtls(POLICY, &[("CALLER_IDENTITY_HEADER", "l5d-client-id")]).await;
    let mut backend = mtls(&app, &ca, &ca.client_with_uri("backend", BACKEND)).await;
    let mut support = mtls(&app, &ca, &ca.client("support-tool")).await;
    let mut stranger = mtls(&app, &ca, &ca.client("stranger")).await;

    backend.forgot_password(via(WEB, "ann")).await.unwrap();
    support.forgot_password(via(SUPPORT, "ann")).await.unwrap();
    support.forgot_password(via("", "ann")).await.unwrap();
    assert_eq!(app.cognito.recorded().len(), 3);

    let refused = backend
        .forgot_password(via(SUPPORT, "ann"))
        .await
        .unwrap_err();
    assert_not_allowed(&refused, BACKEND, Some(("client", "support")));
    let refused = support
        .confirm_forgot_password(confirm("ann"))
        .await
        .unwrap_err();
    assert_not_allowed(
        &refused,
        "support-tool",
        Some(("rpc", "ConfirmForgotPassword")),
    );
    let refused = stranger.forgot_password(via(WEB, "ann")).await.unwrap_err();
    assert_not_allowed(&refused, "stranger", None);
    let mut claiming = Request::new(via(WEB, "ann"));
    claiming
        .metadata_mut()
        .insert("l5d-client-id", BACKEND.parse().unwrap());
    let refused = stranger.forgot_password(claiming).await.unwrap_err();
    assert_not_allowed(&refused, "stranger", None);
    // A caller that may not call the RPC learns nothing of its request, valid or not.
    let refused = stranger.forgot_password(via(WEB, "")).await.unwrap_err();
    assert_not_allowed(&refused, "stranger", None);
    // An unknown client is still the client's refusal.
    let refused = backend
        .forgot_password(via("someoneelse1", "ann"))
        .await
        .unwrap_err();
    assert_error(&refused, Code::PermissionDenied, "CLIENT_NOT_ALLOWED");
    assert_eq!(
        app.cognito.recorded().len(),
        3,
        "no refused call reached Cognito"
    );
    // An identity may not claim the anonymous grant by its name.
    let mut anonymous = mtls(&app, &ca, &ca.client("anonymous")).await;
    let refused = anonymous
        .forgot_password(via(WEB, "ann"))
        .await
        .unwrap_err();
    assert_not_allowed(&refused, "anonymous", None);

    // The call metrics carry the caller: the policy's names, `unknown` for the others.
    let metrics = scrape(&app.metrics_addr.to_string()).await;
    let handled = |caller: &str, code: &str| {
        metric(
            &metrics,
            "grpc_server_handled_total",
            &[
                &format!("caller=\"{caller}\""),
                &format!("grpc_code=\"{code}\""),
            ],
        )
    };
    // (The recorder is the process's, and other tests here count calls too: counts are not
    // this test's alone, labels are.)
    assert!(handled(BACKEND, "OK").is_some(), "{metrics}");
    assert!(handled("support-tool", "OK").is_some(), "{metrics}");
    assert!(
        handled("unknown", "PERMISSION_DENIED").is_some(),
        "{metrics}"
    );
    assert!(!metrics.contains("caller=\"stranger\""), "{metrics}");
}

#[tokio::test]
async fn a_caller_over_its_own_limit_is_refused_and_others_are_not() {
    let Mtls { app, ca, .. } = with_mtls(POLICY, &[]).await;
    let mut backend = mtls(&app, &ca, &ca.client_with_uri("backend", BACKEND)).await;
    let mut support = mtls(&app, &ca, &ca.client("support-tool")).await;
    // A call refused by the policy charges nothing: the whole burst is still there.
    for _ in 0..3 {
        let refused = backend
            .forgot_password(via(SUPPORT, "u0"))
            .await
            .unwrap_err();
        assert_not_allowed(&refused, BACKEND, Some(("client", "support")));
    }
    backend.forgot_password(via(WEB, "u1")).await.unwrap();
    backend.forgot_password(via(WEB, "u2")).await.unwrap();

    let limited = backend.forgot_password(via(WEB, "u3")).await.unwrap_err();
    let info = assert_error(&limited, Code::ResourceExhausted, "RATE_LIMITED");
    assert_eq!(info.metadata["limiter"], "caller");
    assert_eq!(info.metadata["limit"], "2/1h");
    // One call every 30 minutes: the true wait, less the moments the test took.
    let delay = limited
        .get_details_retry_info()
        .unwrap()
        .retry_delay
        .unwrap();
    assert!(
        delay > Duration::from_secs(29 * 60) && delay <= Duration::from_secs(30 * 60),
        "{delay:?}"
    );
    let quota = limited.get_details_quota_failure().unwrap();
    assert_eq!(quota.violations[0].subject, "caller");

    for username in ["u3", "u4", "u5"] {
        support.forgot_password(via(WEB, username)).await.unwrap();
    }
    assert_eq!(app.cognito.recorded().len(), 5);
}

#[tokio::test]
async fn anonymous_callers_are_one_caller_granted_or_not() {
    let dir = tempfile::tempdir().unwrap();
    let granted = write(
        dir.path(),
        "granted.toml",
        "[callers.anonymous]\nclients = [\"default\"]\nrpcs = [\"ForgotPassword\"]\n",
    );
    let app = TestApp::spawn_with(&[
        ("CALLERS_FILE", granted.to_str().unwrap()),
        ("USERNAME_RATE_LIMIT", "1/1h"),
    ])
    .await;
    let mut client = app.client().await;
    // Refused calls charge no limit: ann's one call an hour is still there after them.
    for _ in 0..2 {
        let refused = client
            .confirm_forgot_password(confirm("ann"))
            .await
            .unwrap_err();
        assert_not_allowed(
            &refused,
            "anonymous",
            Some(("rpc", "ConfirmForgotPassword")),
        );
    }
    client.forgot_password(forgot("ann")).await.unwrap();
    let limited = client.forgot_password(forgot("ann")).await.unwrap_err();
    let info = assert_error(&limited, Code::ResourceExhausted, "RATE_LIMITED");
    assert_eq!(info.metadata["limiter"], "username");
    assert_eq!(app.cognito.recorded().len(), 1);

    let none = write(
        dir.path(),
        "none.toml",
        "[callers.someone]\nclients = [\"default\"]\n",
    );
    let app = TestApp::spawn_with(&[("CALLERS_FILE", none.to_str().unwrap())]).await;
    let refused = app
        .client()
        .await
        .forgot_password(forgot("ann"))
        .await
        .unwrap_err();
    assert_not_allowed(&refused, "anonymous", None);
    assert!(app.cognito.recorded().is_empty());
}

#[tokio::test]
async fn behind_a_sidecar_the_meshs_header_names_the_caller_by_both_doors() {
    let dir = tempfile::tempdir().unwrap();
    let linkerd_id = "backend.web.serviceaccount.identity.linkerd.cluster.local";
    let policy = format!("[callers.\"{linkerd_id}\"]\nclients = [\"default\"]\n");
    let callers = write(dir.path(), "callers.toml", &policy);
    let app = TestApp::spawn_with(&[
        ("CALLERS_FILE", callers.to_str().unwrap()),
        ("CALLER_IDENTITY_HEADER", "l5d-client-id"),
    ])
    .await;
    let mut client = app.client().await;
    let mut request = Request::new(forgot("ann"));
    request
        .metadata_mut()
        .insert("l5d-client-id", linkerd_id.parse().unwrap());
    client.forgot_password(request).await.unwrap();
    let refused = client.forgot_password(forgot("ann")).await.unwrap_err();
    assert_not_allowed(&refused, "anonymous", None);
    let mut request = Request::new(forgot("ann"));
    request
        .metadata_mut()
        .insert("l5d-client-id", "other.identity".parse().unwrap());
    let refused = client.forgot_password(request).await.unwrap_err();
    assert_not_allowed(&refused, "other.identity", None);

    // The JSON door names callers alike.
    let url = format!(
        "http://{}/passwordrecovery.v1.PasswordRecovery/ForgotPassword",
        app.addr
    );
    let post = |identity: &str, body: &'static str| {
        let header = format!("l5d-client-id: {identity}");
        let url = url.clone();
        async move {
            let output = tokio::process::Command::new(curl())
                .args([
                    "--silent",
                    "--write-out",
                    "\n%{http_code}",
                    "--header",
                    "content-type: application/json",
                    "--header",
                    &header,
                    "--data-binary",
                    body,
                    &url,
                ])
                .output()
                .await
                .expect("curl runs");
            String::from_utf8_lossy(&output.stdout).into_owned()
        }
    };
    let allowed = post(linkerd_id, r#"{"username": "ann"}"#).await;
    assert!(allowed.trim_end().ends_with("200"), "{allowed}");
    let refused = post("other.identity", r#"{"username": "ann"}"#).await;
    assert!(refused.trim_end().ends_with("403"), "{refused}");
    assert!(refused.contains("CALLER_NOT_ALLOWED"), "{refused}");
    // Refused before its body is read: it learns nothing of its request.
    let refused = post("other.identity", "not json").await;
    assert!(refused.trim_end().ends_with("403"), "{refused}");
    assert_eq!(
        app.cognito.recorded().len(),
        2,
        "refused calls reached Cognito"
    );

    // Istio's header names the caller by its last element, the sidecar's own.
    let policy = format!("[callers.\"{BACKEND}\"]\nclients = [\"default\"]\n");
    let callers = write(dir.path(), "istio.toml", &policy);
    let app = TestApp::spawn_with(&[
        ("CALLERS_FILE", callers.to_str().unwrap()),
        ("CALLER_IDENTITY_HEADER", "x-forwarded-client-cert"),
    ])
    .await;
    let mut client = app.client().await;
    let with_xfcc = |value: String| {
        let mut request = Request::new(forgot("ann"));
        request
            .metadata_mut()
            .insert("x-forwarded-client-cert", value.parse().unwrap());
        request
    };
    let sidecar = format!("By=spiffe://cluster.local/ns/pr/sa/default;Hash=ab;URI={BACKEND}");
    client.forgot_password(with_xfcc(sidecar)).await.unwrap();
    let forged = format!(
        "URI={BACKEND};X=\",By=spiffe://cluster.local/ns/pr/sa/default;URI=spiffe://x/ns/evil"
    );
    let refused = client.forgot_password(with_xfcc(forged)).await.unwrap_err();
    assert_not_allowed(&refused, "anonymous", None);
    assert_eq!(app.cognito.recorded().len(), 1);
}

#[tokio::test]
async fn a_rotated_policy_applies_to_the_next_calls_and_a_broken_one_keeps_the_last() {
    let Mtls { app, ca, dir, .. } = with_mtls(POLICY, &[("FILE_RELOAD_INTERVAL", "50ms")]).await;
    let mut newcomer = mtls(&app, &ca, &ca.client("newcomer")).await;
    let refused = newcomer.forgot_password(via(WEB, "ann")).await.unwrap_err();
    assert_not_allowed(&refused, "newcomer", None);
    let mut backend = mtls(&app, &ca, &ca.client_with_uri("backend", BACKEND)).await;
    backend.forgot_password(via(WEB, "u1")).await.unwrap();
    backend.forgot_password(via(WEB, "u2")).await.unwrap();

    // Written aside and renamed into place, as a ConfigMap update lands.
    let replace = |text: &str| {
        let staged = write(dir.path(), "callers.toml.new", text);
        std::fs::rename(staged, dir.path().join("callers.toml")).unwrap();
    };
    replace(&format!(
        "{POLICY}\n[callers.newcomer]\nclients = [\"web\"]\n"
    ));
    let metrics_addr = app.metrics_addr.to_string();
    let reloads = |result: &'static str| {
        let metrics_addr = metrics_addr.clone();
        async move {
            let metrics = scrape(&metrics_addr).await;
            metric(
                &metrics,
                "callers_policy_reloads_total",
                &[&format!("result=\"{result}\"")],
            )
        }
    };
    wait_until(|| async { reloads("reloaded").await == Some(1.0) }).await;
    newcomer.forgot_password(via(WEB, "ann")).await.unwrap();
    // The backend's limit did not change: its spent bucket stays spent.
    let limited = backend.forgot_password(via(WEB, "u3")).await.unwrap_err();
    let info = assert_error(&limited, Code::ResourceExhausted, "RATE_LIMITED");
    assert_eq!(info.metadata["limiter"], "caller");

    replace("[callers.newcomer\nclients = [");
    wait_until(|| async { reloads("failed").await == Some(1.0) }).await;
    newcomer.forgot_password(via(WEB, "bob")).await.unwrap();
    assert_eq!(app.cognito.recorded().len(), 4);
}

/// Polls `done` every 20 ms until it holds, for at most 10 s.
async fn wait_until<F, Fut>(done: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let waited = tokio::time::timeout(Duration::from_secs(10), async {
        while !done().await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    waited.expect("within 10 s");
}

#[tokio::test]
async fn a_callers_limit_is_fleet_wide_on_redis() {
    let redis = RedisServer::start().await;
    let cognito = FakeCognito::start().await;
    let dir = tempfile::tempdir().unwrap();
    let key_file = write(dir.path(), "hash-key", "callers-test-username-hash-key");
    let callers = write(
        dir.path(),
        "callers.toml",
        "[callers.a]\nclients = [\"default\"]\nrate_limit = \"2/1h\"\n\
         [callers.b]\nclients = [\"default\"]\nrate_limit = \"2/1h\"\n",
    );
    let replica = || async {
        let vars = [
            ("COGNITO_CLIENT_ID", CLIENT_ID),
            ("AWS_REGION", "us-east-1"),
            ("AWS_ENDPOINT_URL", cognito.url.as_str()),
            ("RATE_LIMIT_REDIS_URL", redis.url.as_str()),
            ("USERNAME_HASH_KEY_FILE", key_file.to_str().unwrap()),
            ("CALLERS_FILE", callers.to_str().unwrap()),
            ("CALLER_IDENTITY_HEADER", "l5d-client-id"),
        ];
        let mut replica = ServiceProcess::start(&vars).await;
        replica
            .wait_for_line(|e| e["message"] == "rate-limit backend connected")
            .await;
        replica
    };
    let (one, two) = (replica().await, replica().await);
    let (mut one_client, mut two_client) = (one.client().await, two.client().await);
    let as_caller = |caller: &str, username: &str| {
        let mut request = Request::new(forgot(username));
        request
            .metadata_mut()
            .insert("l5d-client-id", caller.parse().unwrap());
        request
    };
    one_client
        .forgot_password(as_caller("a", "u1"))
        .await
        .unwrap();
    two_client
        .forgot_password(as_caller("a", "u2"))
        .await
        .unwrap();
    let limited = one_client
        .forgot_password(as_caller("a", "u3"))
        .await
        .unwrap_err();
    let info = assert_error(&limited, Code::ResourceExhausted, "RATE_LIMITED");
    assert_eq!(info.metadata["limiter"], "caller");
    let limited = two_client
        .forgot_password(as_caller("a", "u4"))
        .await
        .unwrap_err();
    assert_error(&limited, Code::ResourceExhausted, "RATE_LIMITED");
    two_client
        .forgot_password(as_caller("b", "u5"))
        .await
        .unwrap();
    one_client
        .forgot_password(as_caller("b", "u6"))
        .await
        .unwrap();
    assert_eq!(cognito.recorded().len(), 4);
    let keys = redis.keys().await;
    assert!(
        keys.iter()
            .any(|(key, _)| key.starts_with("password-recovery:caller:")),
        "{keys:?}"
    );
    drop((one, two));
}
