//! Several app clients from `COGNITO_CLIENTS_FILE`, against fake Cognitos that record what
//! reaches them: each request goes out with its client's id, SECRET_HASH (or none) and to its
//! region's endpoint; an unknown client never reaches Cognito; a secret rotated the way the
//! kubelet rotates a Secret is used by the next call; clients of one pool share a user's limits.
//! The binary's one-line refusals of bad files are in `tests/binary.rs`.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{FakeCognito, TestApp, assert_error, forgot, metric, scrape};
use password_recovery::cognito::secret_hash;
use password_recovery::proto::v1::ForgotPasswordRequest;
use tonic::Code;

const WEB: &str = "webclient1";
const MOBILE: &str = "mobileclient2";
const SUPPORT: &str = "supportclient3";

/// A directory of secret files laid out as the kubelet mounts a Secret: each name a symlink
/// into `..data`, itself a symlink to a timestamped directory that a rotation replaces.
struct SecretDir {
    dir: tempfile::TempDir,
    generation: u32,
}

impl SecretDir {
    fn new(files: &[(&str, &str)]) -> Self {
        let mut secrets = Self {
            dir: tempfile::tempdir().unwrap(),
            generation: 0,
        };
        secrets.write(files);
        for (name, _) in files {
            std::os::unix::fs::symlink(Path::new("..data").join(name), secrets.path(name)).unwrap();
        }
        secrets
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes a new generation and swaps `..data` to it atomically, as the kubelet does.
    fn write(&mut self, files: &[(&str, &str)]) {
        self.generation += 1;
        let generation = format!(
            "..2026_11_28_12_00_{:02}.{}",
            self.generation, self.generation
        );
        let data = self.dir.path().join(&generation);
        std::fs::create_dir(&data).unwrap();
        for (name, content) in files {
            std::fs::write(data.join(name), content).unwrap();
        }
        let staging = self.dir.path().join("..data_tmp");
        std::os::unix::fs::symlink(&generation, &staging).unwrap();
        std::fs::rename(&staging, self.dir.path().join("..data")).unwrap();
    }
}

/// A clients file: `web` (the default, with a secret) and `mobile` (none) in one eu-west-1
/// pool on the application's own fake Cognito (`AWS_ENDPOINT_URL`), `support` in a us-east-1
/// pool on `us_east_1`.
fn clients_file(dir: &Path, web_secret: &Path, us_east_1: &FakeCognito) -> PathBuf {
    let text = format!(
        r#"
default = "web"

[clients.web]
client_id = "{WEB}"
user_pool_id = "eu-west-1_PoolOne"
region = "eu-west-1"
secret_file = "{}"

[clients.mobile]
client_id = "{MOBILE}"
user_pool_id = "eu-west-1_PoolOne"
region = "eu-west-1"
timeout = "2s"

[clients.support]
client_id = "{SUPPORT}"
user_pool_id = "us-east-1_PoolTwo"
region = "us-east-1"
endpoint_url = "{}"
"#,
        web_secret.display(),
        us_east_1.url
    );
    let path = dir.join("clients.toml");
    std::fs::write(&path, text).unwrap();
    path
}

async fn spawn(secrets: &SecretDir, us_east_1: &FakeCognito, extra: &[(&str, &str)]) -> TestApp {
    let file = clients_file(secrets.dir.path(), &secrets.path("web"), us_east_1);
    let mut settings = vec![
        ("COGNITO_CLIENT_ID", ""),
        ("COGNITO_CLIENT_SECRET", ""),
        ("COGNITO_CLIENTS_FILE", file.to_str().unwrap()),
        ("TLS_RELOAD_INTERVAL", "50ms"),
    ];
    settings.extend_from_slice(extra);
    TestApp::spawn_with(&settings).await
}

fn via(client_id: &str, username: &str) -> ForgotPasswordRequest {
    ForgotPasswordRequest {
        client_id: client_id.into(),
        ..forgot(username)
    }
}

/// Waits (at most 20 s) until `app` has counted a secret rotation of `client` with `result`
/// (`reloaded` or `failed`).
async fn secret_reload_counted(app: &TestApp, client: &str, result: &str) {
    let metrics_addr = app.metrics_addr.to_string();
    let labels = [
        format!("client=\"{client}\""),
        format!("result=\"{result}\""),
    ];
    let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
    let counted = async {
        loop {
            let text = scrape(&metrics_addr).await;
            let count = metric(&text, "cognito_client_secret_reloads_total", &labels);
            if count.is_some_and(|n| n >= 1.0) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), counted)
        .await
        .unwrap_or_else(|_| panic!("no secret {result} counted for {client}"));
}

/// The SECRET_HASH of every request `cognito` received, in order.
fn sent_secret_hashes(cognito: &FakeCognito) -> Vec<String> {
    cognito
        .recorded()
        .iter()
        .map(|r| r.body["SecretHash"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn each_client_calls_with_its_own_id_secret_and_regions_endpoint() {
    let us_east_1 = FakeCognito::start().await;
    let secrets = SecretDir::new(&[("web", "web-secret-1\n")]);
    let app = spawn(&secrets, &us_east_1, &[]).await;
    let mut client = app.client().await;

    client.forgot_password(forgot("ann")).await.unwrap();
    client.forgot_password(via(WEB, "ann")).await.unwrap();
    client.forgot_password(via(MOBILE, "ann")).await.unwrap();
    client.forgot_password(via(SUPPORT, "ann")).await.unwrap();
    let refused = client
        .forgot_password(via("strangerclient9", "ann"))
        .await
        .unwrap_err();

    let eu = app.cognito.recorded();
    assert_eq!(eu.len(), 3, "web twice and mobile: {eu:?}");
    let web_hash = secret_hash(&"web-secret-1".to_owned().into(), "ann", WEB);
    for sent in &eu[..2] {
        assert_eq!(sent.body["ClientId"], WEB, "the default is web");
        assert_eq!(sent.body["SecretHash"], web_hash.as_str());
    }
    assert_eq!(eu[2].body["ClientId"], MOBILE);
    assert!(
        eu[2].body.get("SecretHash").is_none(),
        "mobile has no secret"
    );
    let us = us_east_1.recorded();
    assert_eq!(us.len(), 1);
    assert_eq!(us[0].body["ClientId"], SUPPORT);
    assert!(us.iter().chain(&eu).all(|sent| !sent.signed));

    assert_error(&refused, Code::PermissionDenied, "CLIENT_NOT_ALLOWED");
    assert_eq!(app.cognito.recorded().len() + us_east_1.recorded().len(), 4);

    let metrics = scrape(&app.metrics_addr.to_string()).await;
    let handled = |client: &str, code: &str| {
        metric(
            &metrics,
            "grpc_server_handled_total",
            &[
                &format!("client=\"{client}\""),
                &format!("grpc_code=\"{code}\""),
            ],
        )
    };
    // The recorder is the process's: other tests here count calls too.
    assert!(
        handled("support", "OK").is_some_and(|n| n >= 1.0),
        "{metrics}"
    );
    assert!(
        handled("unknown", "PERMISSION_DENIED").is_some_and(|n| n >= 1.0),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_secret_rotated_by_the_kubelet_is_used_by_the_next_call() {
    let us_east_1 = FakeCognito::start().await;
    let mut secrets = SecretDir::new(&[("web", "before-rotation")]);
    let app = spawn(&secrets, &us_east_1, &[]).await;
    let mut client = app.client().await;
    client.forgot_password(forgot("bea")).await.unwrap();

    secrets.write(&[("web", "after-rotation\n")]);
    secret_reload_counted(&app, "web", "reloaded").await;
    client.forgot_password(forgot("bea")).await.unwrap();

    // A broken rotation (an empty file) keeps the secret in use.
    secrets.write(&[("web", "")]);
    secret_reload_counted(&app, "web", "failed").await;
    client.forgot_password(forgot("bea")).await.unwrap();

    let hash = |secret: &str| secret_hash(&secret.to_owned().into(), "bea", WEB);
    assert_eq!(
        sent_secret_hashes(&app.cognito),
        [
            hash("before-rotation"),
            hash("after-rotation"),
            hash("after-rotation")
        ]
    );
}

#[tokio::test]
async fn clients_of_one_pool_share_a_users_limit_and_other_pools_do_not() {
    let us_east_1 = FakeCognito::start().await;
    let secrets = SecretDir::new(&[("web", "s")]);
    let app = spawn(&secrets, &us_east_1, &[("USERNAME_RATE_LIMIT", "1/1h")]).await;
    let mut client = app.client().await;

    client.forgot_password(via(WEB, "cat")).await.unwrap();
    let through_mobile = client
        .forgot_password(via(MOBILE, "Cat"))
        .await
        .unwrap_err();
    client
        .forgot_password(via(SUPPORT, "cat"))
        .await
        .expect("cat of another pool is another user");

    assert_error(&through_mobile, Code::ResourceExhausted, "RATE_LIMITED");
    assert_eq!(app.cognito.recorded().len(), 1);
}

#[tokio::test]
async fn the_one_client_settings_secret_file_is_reloaded_too() {
    let mut secrets = SecretDir::new(&[("secret", "shorthand-1\n")]);
    let file = secrets.path("secret");
    let app = TestApp::spawn_with(&[
        ("COGNITO_CLIENT_SECRET", ""),
        ("COGNITO_CLIENT_SECRET_FILE", file.to_str().unwrap()),
        ("TLS_RELOAD_INTERVAL", "50ms"),
    ])
    .await;
    let mut client = app.client().await;
    client.forgot_password(forgot("dee")).await.unwrap();

    secrets.write(&[("secret", "shorthand-2\n")]);
    secret_reload_counted(&app, "default", "reloaded").await;
    client.forgot_password(forgot("dee")).await.unwrap();

    let hash = |secret: &str| secret_hash(&secret.to_owned().into(), "dee", common::CLIENT_ID);
    assert_eq!(
        sent_secret_hashes(&app.cognito),
        [hash("shorthand-1"), hash("shorthand-2")]
    );
}
