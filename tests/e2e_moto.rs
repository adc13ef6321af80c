//! End-to-end tests against software nobody on this project wrote: moto's Cognito emulator
//! upstream, the real `password-recovery` binary, and the real `grpcurl` and generated Rust
//! client in front of it, all on free loopback ports.
//!
//! moto is not Cognito, so these tests prove only what moto really does. Where moto differs
//! from real Cognito, the in-process fake (`tests/api.rs`) covers the real behaviour:
//! - moto does not check `SecretHash` (the fake asserts the exact hash the service sends);
//! - moto applies no password policy on ConfirmForgotPassword (no InvalidPasswordException);
//! - ConfirmForgotPassword for an unknown user is ResourceNotFoundException in moto, not
//!   UserNotFoundException, so moto cannot show enumeration protection on confirm;
//! - ForgotPassword for an unknown user answers 200 with made-up details in moto, not
//!   UserNotFoundException;
//! - a wrong code is ExpiredCodeException in moto (only for codes with its
//!   `moto-confirmation-code:` prefix; any other code is accepted), not CodeMismatchException;
//! - a pool with no recovery setting answers with a fake SMS delivery in moto.
//!
//! The reset-flow test reads the real code through `CodeTap`, a recording TCP proxy between the
//! service and moto: moto returns the code only in a response header that the service rightly
//! does not pass on, and using the real code is the only way to prove that the code the user
//! received is the one that works (a code without moto's prefix would pass whatever it was).

mod common;

use aws_sdk_cognitoidentityprovider::error::ProvideErrorMetadata;
use aws_sdk_cognitoidentityprovider::types::AuthFlowType;
use common::moto::{CodeTap, Moto, Pool, REGION, Recovery};
use common::process::ServiceProcess;
use common::tools::run_grpcurl;
use common::{assert_error, forgot, health_status};
use password_recovery::cognito::secret_hash;
use password_recovery::proto::v1::{
    ConfirmForgotPasswordRequest, DeliveryMedium, ForgotPasswordRequest,
};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

const USER: &str = "demo@example.com";
const OLD_PASSWORD: &str = "Old-Passw0rd!";
const NEW_PASSWORD: &str = "N3w-Passw0rd!";
const SERVICE: &str = "passwordrecovery.v1.PasswordRecovery";

async fn service_for(pool: &Pool, endpoint: &str) -> ServiceProcess {
    ServiceProcess::start(&[
        ("COGNITO_CLIENT_ID", &pool.client_id),
        ("COGNITO_CLIENT_SECRET", &pool.client_secret),
        ("AWS_REGION", REGION),
        ("AWS_ENDPOINT_URL", endpoint),
    ])
    .await
}

async fn stack(recovery: Recovery) -> (Moto, Pool, ServiceProcess) {
    let moto = Moto::start();
    let pool = moto.create_pool(recovery).await;
    moto.create_user(&pool, USER, OLD_PASSWORD).await;
    let service = service_for(&pool, &moto.url).await;
    (moto, pool, service)
}

/// Signs in with USER_PASSWORD_AUTH directly against moto; the error code on failure.
async fn sign_in(moto: &Moto, pool: &Pool, password: &str) -> Result<(), String> {
    let secret = Some(pool.client_secret.as_str());
    sign_in_as(moto, &pool.client_id, secret, USER, password).await
}

/// Signs `user` in through app client `client_id` (with its secret, if it has one).
async fn sign_in_as(
    moto: &Moto,
    client_id: &str,
    secret: Option<&str>,
    user: &str,
    password: &str,
) -> Result<(), String> {
    let mut parameters = std::collections::HashMap::from([
        ("USERNAME".to_owned(), user.to_owned()),
        ("PASSWORD".to_owned(), password.to_owned()),
    ]);
    if let Some(secret) = secret {
        let hash = secret_hash(&secret.to_owned().into(), user, client_id);
        parameters.insert("SECRET_HASH".to_owned(), hash);
    }
    moto.admin()
        .initiate_auth()
        .client_id(client_id)
        .auth_flow(AuthFlowType::UserPasswordAuth)
        .set_auth_parameters(Some(parameters))
        .send()
        .await
        .map(|_| ())
        .map_err(|e| e.code().unwrap_or("no code").to_owned())
}

#[tokio::test]
async fn grpcurl_lists_describes_checks_health_and_calls_with_no_proto_files() {
    let (_moto, _pool, service) = stack(Recovery::VerifiedEmail).await;
    let target = service.target.as_str();

    let (ok, listed, err) = run_grpcurl(&["-plaintext", target, "list"]);
    assert!(ok, "{err}");
    for name in [
        SERVICE,
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(listed.lines().any(|l| l == name), "{name} not in {listed}");
    }

    let (ok, described, err) = run_grpcurl(&["-plaintext", target, "describe", SERVICE]);
    assert!(ok, "{err}");
    assert!(described.contains("rpc ForgotPassword"), "{described}");
    assert!(
        described.contains("rpc ConfirmForgotPassword"),
        "{described}"
    );

    for health_service in ["", SERVICE] {
        let body = format!(r#"{{"service":"{health_service}"}}"#);
        let (ok, answer, err) = run_grpcurl(&[
            "-plaintext",
            "-d",
            &body,
            target,
            "grpc.health.v1.Health/Check",
        ]);
        assert!(ok, "{err}");
        assert!(answer.contains(r#""status": "SERVING""#), "{answer}");
    }

    let body = format!(r#"{{"username":"{USER}"}}"#);
    let method = format!("{SERVICE}/ForgotPassword");
    let (ok, answer, err) = run_grpcurl(&["-plaintext", "-d", &body, target, &method]);
    assert!(ok, "{err}");
    assert!(answer.contains(r#""destination": "d***@e***""#), "{answer}");
    assert!(answer.contains("DELIVERY_MEDIUM_EMAIL"), "{answer}");

    let (ok, _, err) = run_grpcurl(&[
        "-plaintext",
        "-d",
        r#"{"username":" padded"}"#,
        target,
        &method,
    ]);
    assert!(!ok);
    assert!(err.contains("Code: InvalidArgument"), "{err}");
    assert!(err.contains("google.rpc.BadRequest"), "{err}");
    assert!(err.contains(r#""field":"username""#), "{err}");
    assert!(err.contains(r#""reason":"INVALID_REQUEST""#), "{err}");
}

#[tokio::test]
async fn the_full_reset_flow_sets_the_new_password() {
    // Arrange: the service reaches moto through a tap that sees moto's answers.
    let moto = Moto::start();
    let pool = moto.create_pool(Recovery::VerifiedEmail).await;
    moto.create_user(&pool, USER, OLD_PASSWORD).await;
    let tap = CodeTap::start(moto.addr).await;
    let service = service_for(&pool, &tap.url).await;
    let mut client = service.client().await;
    assert_eq!(sign_in(&moto, &pool, OLD_PASSWORD).await, Ok(()));

    // Act
    let delivery = client
        .forgot_password(forgot(USER))
        .await
        .expect("ForgotPassword")
        .into_inner()
        .code_delivery_details
        .expect("delivery details");
    let code = tap.last_code().expect("moto sent a code");
    client
        .confirm_forgot_password(ConfirmForgotPasswordRequest {
            username: USER.into(),
            confirmation_code: code,
            password: NEW_PASSWORD.into(),
            ..Default::default()
        })
        .await
        .expect("ConfirmForgotPassword");

    // Assert
    assert_eq!(delivery.delivery_medium(), DeliveryMedium::Email);
    assert_eq!(delivery.destination, "d***@e***");
    assert_eq!(sign_in(&moto, &pool, NEW_PASSWORD).await, Ok(()));
    assert_eq!(
        sign_in(&moto, &pool, OLD_PASSWORD).await,
        Err("NotAuthorizedException".to_owned())
    );
}

#[tokio::test]
async fn a_retried_reset_with_a_request_id_sends_one_code_and_is_reported_done() {
    let moto = Moto::start();
    let pool = moto.create_pool(Recovery::VerifiedEmail).await;
    moto.create_user(&pool, USER, OLD_PASSWORD).await;
    let tap = CodeTap::start(moto.addr).await;
    let service = service_for(&pool, &tap.url).await;
    let mut client = service.client().await;
    let request_id = "0b7e8f3c-5d2a-4e61-9c8b-7a6f5e4d3c2b";
    // moto sends the start-up proof's username nobody has a code too.
    let before = tap.codes_sent();

    let forgot_again = || password_recovery::proto::v1::ForgotPasswordRequest {
        request_id: request_id.into(),
        ..forgot(USER)
    };
    let first = client.forgot_password(forgot_again()).await.unwrap();
    let retry = client.forgot_password(forgot_again()).await.unwrap();
    assert_eq!(retry.metadata().get("idempotent-replayed").unwrap(), "true");
    assert_eq!(first.into_inner(), retry.into_inner());
    assert_eq!(
        tap.codes_sent() - before,
        1,
        "the retry sent no second code"
    );

    let code = tap.last_code().expect("moto sent a code");
    let confirm_again = || ConfirmForgotPasswordRequest {
        username: USER.into(),
        confirmation_code: code.clone(),
        password: NEW_PASSWORD.into(),
        request_id: request_id.into(),
        ..Default::default()
    };
    client
        .confirm_forgot_password(confirm_again())
        .await
        .unwrap();
    let retry = client
        .confirm_forgot_password(confirm_again())
        .await
        .expect("the done reset is reported done");
    assert_eq!(retry.metadata().get("idempotent-replayed").unwrap(), "true");
    assert_eq!(sign_in(&moto, &pool, NEW_PASSWORD).await, Ok(()));
}

#[tokio::test]
async fn one_pool_with_two_app_clients_resets_through_each() {
    // Arrange: one pool, a client with a secret (web, the default) and one without (mobile),
    // served from a clients file; the service reaches moto through the code tap.
    let moto = Moto::start();
    let pool = moto.create_pool(Recovery::VerifiedEmail).await;
    let (mobile, no_secret) = moto.create_client(&pool.pool_id, false).await;
    assert_eq!(no_secret, None);
    let users = ["web.user@example.com", "mobile.user@example.com"];
    for user in users {
        moto.create_user(&pool, user, OLD_PASSWORD).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("web");
    std::fs::write(&secret_file, &pool.client_secret).unwrap();
    let clients = dir.path().join("clients.toml");
    std::fs::write(
        &clients,
        format!(
            "default = \"web\"\n\
             [clients.web]\nclient_id = \"{}\"\nuser_pool_id = \"{}\"\nregion = \"{REGION}\"\n\
             secret_file = \"{}\"\n\
             [clients.mobile]\nclient_id = \"{mobile}\"\nuser_pool_id = \"{}\"\nregion = \"{REGION}\"\n",
            pool.client_id,
            pool.pool_id,
            secret_file.display(),
            pool.pool_id,
        ),
    )
    .unwrap();
    let tap = CodeTap::start(moto.addr).await;
    let service = ServiceProcess::start(&[
        ("COGNITO_CLIENTS_FILE", clients.to_str().unwrap()),
        ("AWS_ENDPOINT_URL", &tap.url),
    ])
    .await;
    let mut client = service.client().await;
    let secret = Some(pool.client_secret.as_str());

    for (user, client_id, client_secret) in
        [(users[0], "", secret), (users[1], mobile.as_str(), None)]
    {
        // Act
        client
            .forgot_password(ForgotPasswordRequest {
                username: user.into(),
                client_id: client_id.into(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("ForgotPassword for {user}: {e:?}"));
        let code = tap.last_code().expect("moto sent a code");
        client
            .confirm_forgot_password(ConfirmForgotPasswordRequest {
                username: user.into(),
                confirmation_code: code,
                password: NEW_PASSWORD.into(),
                client_id: client_id.into(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("ConfirmForgotPassword for {user}: {e:?}"));

        // Assert: the new password signs in through the client the reset went through.
        let signing_client = if client_id.is_empty() {
            pool.client_id.as_str()
        } else {
            client_id
        };
        let sign_in = |password| sign_in_as(&moto, signing_client, client_secret, user, password);
        assert_eq!(sign_in(NEW_PASSWORD).await, Ok(()), "{user}");
        assert_eq!(
            sign_in(OLD_PASSWORD).await,
            Err("NotAuthorizedException".to_owned()),
            "{user}"
        );
    }
}

#[tokio::test]
async fn a_wrong_code_with_motos_prefix_is_refused_as_every_code_that_does_not_work() {
    let (_moto, _pool, service) = stack(Recovery::VerifiedEmail).await;
    let mut client = service.client().await;
    client
        .forgot_password(forgot(USER))
        .await
        .expect("ForgotPassword");

    let status = client
        .confirm_forgot_password(ConfirmForgotPasswordRequest {
            username: USER.into(),
            confirmation_code: "moto-confirmation-code:000000".into(),
            password: NEW_PASSWORD.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();

    // Under enumeration protection an expired code is answered as every code that does not
    // work is.
    let info = assert_error(&status, Code::InvalidArgument, "CODE_MISMATCH");
    assert_eq!(info.metadata["cognitoCode"], "CodeMismatchException");
}

/// The proof's error line of a service whose default client is misconfigured, once it has
/// started: the calls are refused before Cognito and the service is not ready.
async fn proven_misconfigured(service: &mut ServiceProcess) -> serde_json::Value {
    let line = service
        .wait_for_line(|e| {
            e["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("app client misconfigured"))
        })
        .await;
    assert_eq!(line["level"], "ERROR", "{line}");
    assert_eq!(line["client"], "default", "{line}");
    assert_eq!(
        health_status(&service.target, "passwordrecovery.v1.PasswordRecovery").await,
        Some(ServingStatus::NotServing),
        "not ready"
    );
    let status = service
        .client()
        .await
        .forgot_password(forgot(USER))
        .await
        .unwrap_err();
    let info = assert_error(&status, Code::FailedPrecondition, "CLIENT_MISCONFIGURED");
    assert_eq!(info.metadata["client"], "default");
    line
}

#[tokio::test]
async fn a_good_client_is_proven_ready_and_says_how_its_pool_answers() {
    let (_moto, _pool, mut service) = stack(Recovery::VerifiedEmail).await;
    let line = service
        .wait_for_line(|e| e["message"] == "app client proven: it works")
        .await;
    // moto answers a username nobody has with a delivery, as ENABLED does.
    assert_eq!(line["prevent_user_existence_errors"], "ENABLED", "{line}");
    assert_eq!(line["probe"], true, "{line}");
    assert_eq!(
        health_status(&service.target, "passwordrecovery.v1.PasswordRecovery").await,
        Some(ServingStatus::Serving)
    );
    assert_eq!(
        health_status(&service.target, "client/default").await,
        Some(ServingStatus::Serving)
    );
    let metrics = service.scrape().await;
    assert_eq!(
        common::metric(&metrics, "cognito_client_ready", &[r#"client="default""#]),
        Some(1.0),
        "{metrics}"
    );
    service
        .client()
        .await
        .forgot_password(forgot(USER))
        .await
        .expect("a user's reset starts");
}

#[tokio::test]
async fn a_pool_without_self_service_recovery_is_a_misconfigured_client() {
    // moto answers "Contact administrator to reset password." even for a username nobody has;
    // Cognito documents no message for a pool without self-service recovery. Either way this
    // service cannot reset anyone's password there.
    let (_moto, _pool, mut service) = stack(Recovery::AdminOnly).await;
    let line = proven_misconfigured(&mut service).await;
    let cause = line["cause"].as_str().unwrap();
    assert!(cause.contains("NotAuthorizedException"), "{cause}");
}

#[tokio::test]
async fn an_app_client_cognito_does_not_know_is_a_misconfigured_client() {
    let moto = Moto::start();
    let mut pool = moto.create_pool(Recovery::VerifiedEmail).await;
    pool.client_id = "clientmotodoesnotknow".into();
    let mut service = service_for(&pool, &moto.url).await;
    let line = proven_misconfigured(&mut service).await;
    let cause = line["cause"].as_str().unwrap();
    assert!(cause.contains("ResourceNotFoundException"), "{cause}");
    // `check` says the same, and fails.
    let output = common::process::command(&[
        ("COGNITO_CLIENT_ID", &pool.client_id),
        ("COGNITO_CLIENT_SECRET", &pool.client_secret),
        ("AWS_REGION", REGION),
        ("AWS_ENDPOINT_URL", &moto.url),
    ])
    .arg("check")
    .output()
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(2), "{stdout}");
    assert!(
        stdout.starts_with("client=default verdict=misconfigured prevent_user_existence_errors=-"),
        "{stdout}"
    );
    assert!(stdout.contains("ResourceNotFoundException"), "{stdout}");
}
