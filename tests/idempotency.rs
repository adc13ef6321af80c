//! Retries with a `request_id` (AIP-155): a retry is answered the first call's outcome without a
//! second call to Cognito (the fake counts every request it receives), marked
//! `idempotent-replayed`; concurrent duplicates share one upstream call; another request with the
//! same id is refused; what Cognito did not decide is not remembered; by both doors. Replicas of
//! the real binary sharing a real Redis (Valkey) answer a retry alike, and each remembers its own
//! while Redis is down.

mod common;

use std::time::Duration;

use common::fleet::Fleet;
use common::redis_server::RedisServer;
use common::tools::curl;
use common::{FakeCognito, TestApp, assert_error, confirm, forgot, metric};
use password_recovery::proto::v1::{ConfirmForgotPasswordRequest, ForgotPasswordRequest};
use tonic::{Code, Request};

const ID: &str = "5f1c9d1e-8a4b-4c2e-9f3a-2b7d6e8c1a40";

fn forgot_with(username: &str, id: &str) -> ForgotPasswordRequest {
    ForgotPasswordRequest {
        request_id: id.into(),
        ..forgot(username)
    }
}

fn confirm_with(username: &str, id: &str) -> ConfirmForgotPasswordRequest {
    ConfirmForgotPasswordRequest {
        request_id: id.into(),
        ..confirm(username)
    }
}

fn replayed<T>(response: &tonic::Response<T>) -> bool {
    response
        .metadata()
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true")
}

/// An answer of Cognito's that comes after `pause`.
fn late(pause: Duration, reply: common::Reply) -> common::Reply {
    common::Reply::After(pause, Box::new(reply))
}

#[tokio::test]
async fn a_retry_after_the_deadline_gets_the_outcome_cognito_gave_and_sends_nothing_more() {
    let app = TestApp::spawn().await;
    let mut client = app.client().await;
    let delivered = common::Reply::Ok(serde_json::json!({"CodeDeliveryDetails": {
        "Destination": "a***@e***", "DeliveryMedium": "EMAIL", "AttributeName": "email"
    }}));
    app.cognito
        .script([late(Duration::from_millis(400), delivered)]);
    let mut hurried = Request::new(forgot_with("ann@example.com", ID));
    hurried.set_timeout(Duration::from_millis(150));
    let lost = client.forgot_password(hurried).await.unwrap_err();
    assert_eq!(lost.code(), Code::DeadlineExceeded, "{lost:?}");

    // The retry waits for the first call, still waiting on Cognito, or gets what it got.
    let retry = client
        .forgot_password(forgot_with("ann@example.com", ID))
        .await
        .unwrap();
    assert!(replayed(&retry), "{:?}", retry.metadata());
    let details = retry.into_inner().code_delivery_details.unwrap();
    assert_eq!(details.destination, "a***@e***");
    assert_eq!(app.cognito.recorded().len(), 1, "one code sent");

    // ConfirmForgotPassword: the password was changed; the retry must not be a code error.
    app.cognito.script([late(
        Duration::from_millis(400),
        common::Reply::Ok(serde_json::json!({})),
    )]);
    let mut hurried = Request::new(confirm_with("ann@example.com", ID));
    hurried.set_timeout(Duration::from_millis(150));
    client.confirm_forgot_password(hurried).await.unwrap_err();
    app.cognito
        .script([common::Reply::error("ExpiredCodeException")]);
    let retry = client
        .confirm_forgot_password(confirm_with("ann@example.com", ID))
        .await
        .expect("the reset that was done is reported done");
    assert!(replayed(&retry));
    assert_eq!(app.cognito.recorded().len(), 2);
}

#[tokio::test]
async fn concurrent_duplicates_make_one_upstream_call_and_get_one_answer() {
    let app = TestApp::spawn().await;
    app.cognito.script([late(
        Duration::from_millis(300),
        common::Reply::Ok(serde_json::json!({"CodeDeliveryDetails": {
            "Destination": "b***@e***", "DeliveryMedium": "EMAIL", "AttributeName": "email"
        }})),
    )]);
    let channel = app.channel().await;
    let calls: Vec<_> = (0..5)
        .map(|_| {
            let mut client =
                password_recovery::proto::v1::password_recovery_client::PasswordRecoveryClient::new(
                    channel.clone(),
                );
            tokio::spawn(async move { client.forgot_password(forgot_with("bob", ID)).await })
        })
        .collect();
    let mut replays = 0;
    for call in calls {
        let answer = call.await.unwrap().unwrap();
        replays += usize::from(replayed(&answer));
        let details = answer.into_inner().code_delivery_details.unwrap();
        assert_eq!(details.destination, "b***@e***");
    }
    assert_eq!(replays, 4, "every duplicate is the first call's answer");
    assert_eq!(app.cognito.recorded().len(), 1);
}

#[tokio::test]
async fn the_same_id_for_another_request_is_refused_naming_the_field() {
    let app = TestApp::spawn().await;
    let mut client = app.client().await;
    client
        .forgot_password(forgot_with("carol", ID))
        .await
        .unwrap();
    let reused = client
        .forgot_password(forgot_with("dave", ID))
        .await
        .unwrap_err();
    assert_error(&reused, Code::InvalidArgument, "REQUEST_ID_REUSED");
    let bad = tonic_types::StatusExt::get_details_bad_request(&reused).unwrap();
    assert_eq!(bad.field_violations[0].field, "request_id");
    // What is passed to the Lambda triggers is part of the request too.
    let reused = client
        .forgot_password(ForgotPasswordRequest {
            client_metadata: [("source".to_owned(), "app".to_owned())].into(),
            ..forgot_with("carol", ID)
        })
        .await
        .unwrap_err();
    assert_error(&reused, Code::InvalidArgument, "REQUEST_ID_REUSED");
    // Another RPC is another call: the same id is its own there.
    client
        .confirm_forgot_password(confirm_with("carol", ID))
        .await
        .unwrap();
    // A password that differs is another request too.
    let reused = client
        .confirm_forgot_password(ConfirmForgotPasswordRequest {
            password: "An0ther-Passw0rd!".into(),
            ..confirm_with("carol", ID)
        })
        .await
        .unwrap_err();
    assert_error(&reused, Code::InvalidArgument, "REQUEST_ID_REUSED");
    assert_eq!(app.cognito.recorded().len(), 2);

    let invalid = client
        .forgot_password(forgot_with("carol", "not-a-uuid"))
        .await
        .unwrap_err();
    let info = assert_error(&invalid, Code::InvalidArgument, "INVALID_REQUEST");
    assert!(invalid.message().contains("request_id"), "{info:?}");
}

#[tokio::test]
async fn what_cognito_did_not_decide_is_not_remembered_and_a_window_ends() {
    let app = TestApp::spawn_with(&[("COGNITO_TIMEOUT", "200ms")]).await;
    let mut client = app.client().await;
    app.cognito.script([common::Reply::Hang]);
    let timed_out = client
        .forgot_password(forgot_with("erin", ID))
        .await
        .unwrap_err();
    assert_error(&timed_out, Code::DeadlineExceeded, "UPSTREAM_TIMEOUT");
    let retry = client
        .forgot_password(forgot_with("erin", ID))
        .await
        .unwrap();
    assert!(!replayed(&retry), "an unknown outcome runs again");
    assert_eq!(app.cognito.recorded().len(), 2);

    let app = TestApp::spawn_with(&[("IDEMPOTENCY_WINDOW", "1ns")]).await;
    let mut client = app.client().await;
    client
        .forgot_password(forgot_with("erin", ID))
        .await
        .unwrap();
    let again = client
        .forgot_password(forgot_with("erin", ID))
        .await
        .unwrap();
    assert!(!replayed(&again), "past its window a call is new");
    assert_eq!(app.cognito.recorded().len(), 2);
}

#[tokio::test]
async fn a_masked_answer_is_replayed_as_it_was_and_a_replay_charges_no_limit() {
    let app = TestApp::spawn_with(&[("USERNAME_RATE_LIMIT", "1/1h")]).await;
    let mut client = app.client().await;
    app.cognito
        .script([common::Reply::error("UserNotFoundException")]);
    let first = client
        .forgot_password(forgot_with("nobody@example.com", ID))
        .await
        .unwrap();
    assert!(!replayed(&first));
    let again = client
        .forgot_password(forgot_with("nobody@example.com", ID))
        .await
        .unwrap();
    assert!(replayed(&again));
    assert_eq!(first.into_inner(), again.into_inner());
    assert_eq!(app.cognito.recorded().len(), 1);
    // The user's one call an hour was charged once: a new request is refused.
    let limited = client
        .forgot_password(forgot("nobody@example.com"))
        .await
        .unwrap_err();
    assert_error(&limited, Code::ResourceExhausted, "RATE_LIMITED");
}

/// The JSON door's answer at `addr` to `body` for `method`: its status line, headers and body,
/// lowercased.
async fn json_call(addr: impl std::fmt::Display, method: &str, body: &str) -> String {
    let url = format!("http://{addr}/passwordrecovery.v1.PasswordRecovery/{method}");
    let output = tokio::process::Command::new(curl())
        .args([
            "--silent",
            "--include",
            "--header",
            "content-type: application/json",
            "--data-binary",
            body,
            &url,
        ])
        .output()
        .await
        .expect("curl runs");
    String::from_utf8_lossy(&output.stdout).to_lowercase()
}

#[tokio::test]
async fn a_call_by_grpc_is_replayed_to_its_retry_by_the_json_door() {
    let app = TestApp::spawn().await;
    app.client()
        .await
        .forgot_password(forgot_with("fay", ID))
        .await
        .unwrap();
    let body = format!(r#"{{"username": "fay", "requestId": "{ID}"}}"#);
    let answer = json_call(app.addr, "ForgotPassword", &body).await;
    assert!(answer.starts_with("http/1.1 200"), "{answer}");
    assert!(answer.contains("idempotent-replayed: true"), "{answer}");
    assert!(answer.contains("a***@e***"), "{answer}");
    assert_eq!(app.cognito.recorded().len(), 1);
}

#[tokio::test]
async fn an_error_cognito_gave_for_good_is_replayed_marked_and_one_a_retry_may_change_is_not() {
    let app = TestApp::spawn_with(&[("ENUMERATION_PROTECTION", "false")]).await;
    let mut client = app.client().await;
    app.cognito
        .script([common::Reply::error("InvalidPasswordException")]);
    let first = client
        .confirm_forgot_password(confirm_with("gus", ID))
        .await
        .unwrap_err();
    assert_error(&first, Code::InvalidArgument, "INVALID_PASSWORD");
    let again = client
        .confirm_forgot_password(confirm_with("gus", ID))
        .await
        .unwrap_err();
    assert_error(&again, Code::InvalidArgument, "INVALID_PASSWORD");
    assert_eq!(again.message(), first.message());
    assert_eq!(
        again.metadata().get("idempotent-replayed").unwrap(),
        "true",
        "the marker travels in the trailers of an error"
    );
    assert_eq!(app.cognito.recorded().len(), 1);

    // Cognito's internal error may be gone on the retry: it runs again.
    app.cognito
        .script([common::Reply::error("InternalErrorException")]);
    let first = client
        .forgot_password(forgot_with("gus", ID))
        .await
        .unwrap_err();
    assert_error(&first, Code::Unavailable, "INTERNAL_ERROR");
    let retry = client
        .forgot_password(forgot_with("gus", ID))
        .await
        .unwrap();
    assert!(!replayed(&retry));
    assert_eq!(app.cognito.recorded().len(), 3);
}

#[tokio::test]
async fn a_refusal_is_never_replayed_masked_or_not() {
    // Cognito's attempt limit, which only an existing account reaches, is answered as this
    // service's own per-username limit: neither is remembered, so a retry cannot tell them
    // apart by a replay marker.
    let app = TestApp::spawn_with(&[("USERNAME_RATE_LIMIT", "5/6h")]).await;
    let mut client = app.client().await;
    app.cognito
        .script([common::Reply::error("LimitExceededException")]);
    let first = client
        .forgot_password(forgot_with("hal@example.com", ID))
        .await
        .unwrap_err();
    assert_error(&first, Code::ResourceExhausted, "RATE_LIMITED");
    let retry = client
        .forgot_password(forgot_with("hal@example.com", ID))
        .await
        .unwrap_err();
    assert_error(&retry, Code::ResourceExhausted, "RATE_LIMITED");
    assert!(retry.metadata().get("idempotent-replayed").is_none());
    assert_eq!(
        app.cognito.recorded().len(),
        1,
        "the own limit refused the retry"
    );
}

/// A delivery, as Cognito answers one.
fn delivered(destination: &str) -> common::Reply {
    common::Reply::Ok(serde_json::json!({"CodeDeliveryDetails": {
        "Destination": destination, "DeliveryMedium": "EMAIL", "AttributeName": "email"
    }}))
}

#[tokio::test]
async fn replicas_sharing_redis_answer_a_retry_alike_with_one_upstream_call() {
    let redis = RedisServer::start().await;
    let cognito = FakeCognito::start().await;
    let fleet = Fleet::keyed();
    let a = fleet.replica(&redis, &cognito, &[]).await;
    let b = fleet.replica(&redis, &cognito, &[]).await;
    let (mut a_client, mut b_client) = (a.client().await, b.client().await);

    // Answered on A, retried on B: B replays A's answer.
    cognito.script([delivered("g***@e***")]);
    let first = a_client
        .forgot_password(forgot_with("Gail@example.com", ID))
        .await
        .unwrap();
    assert!(!replayed(&first));
    let retry = b_client
        .forgot_password(forgot_with("Gail@example.com", ID))
        .await
        .unwrap();
    assert!(replayed(&retry), "{:?}", retry.metadata());
    let details = retry.into_inner().code_delivery_details.unwrap();
    assert_eq!(details.destination, "g***@e***");
    assert_eq!(
        cognito.recorded().len(),
        1,
        "one code sent across the fleet"
    );
    // The JSON door of B answers the same, and another request with the id is refused there.
    let body = format!(r#"{{"username": "Gail@example.com", "requestId": "{ID}"}}"#);
    let answer = json_call(&b.target, "ForgotPassword", &body).await;
    assert!(answer.starts_with("http/1.1 200"), "{answer}");
    assert!(answer.contains("idempotent-replayed: true"), "{answer}");
    let reused = b_client
        .forgot_password(forgot_with("someone-else", ID))
        .await
        .unwrap_err();
    assert_error(&reused, Code::InvalidArgument, "REQUEST_ID_REUSED");

    // A duplicate on B while A's call still waits on Cognito waits for its outcome: a confirmed
    // reset is reported done to both, after one upstream call.
    const SECOND: &str = "0d7e5b9a-3c1f-4e8d-a2b6-9f4c8e1d7a35";
    cognito.script([common::Reply::Held(Box::new(common::Reply::Ok(
        serde_json::json!({}),
    )))]);
    let running = tokio::spawn(async move {
        a_client
            .confirm_forgot_password(confirm_with("Gail@example.com", SECOND))
            .await
    });
    cognito.arrived(2).await;
    // B's claim finds A's, and B polls: each is a script Redis runs.
    let scripts = redis.scripts_run().await;
    let duplicate = tokio::spawn(async move {
        b_client
            .confirm_forgot_password(confirm_with("Gail@example.com", SECOND))
            .await
    });
    while redis.scripts_run().await < scripts + 2 {
        tokio::task::yield_now().await;
    }
    cognito.release(1);
    let first = running.await.unwrap().expect("the reset is done");
    let duplicate = duplicate.await.unwrap().expect("and reported done");
    assert!(!replayed(&first));
    assert!(replayed(&duplicate), "{:?}", duplicate.metadata());
    assert_eq!(
        cognito.recorded().len(),
        2,
        "one confirmation reached Cognito"
    );
    let metrics = b.scrape().await;
    for method in ["ForgotPassword", "ConfirmForgotPassword"] {
        let method = format!("grpc_method=\"{method}\"");
        let replays = metric(&metrics, "idempotent_replays_total", &[&method]);
        assert!(replays.is_some_and(|n| n >= 1.0), "{metrics}");
    }

    // On Redis: one key per request, prefixed, hashed, within the window; no user in them.
    let keys = redis.keys().await;
    let requests: Vec<_> = keys
        .iter()
        .filter(|(key, _)| key.starts_with("password-recovery:request:"))
        .collect();
    assert_eq!(requests.len(), 2, "{keys:?}");
    for (key, ttl) in requests {
        assert!(!key.to_lowercase().contains("gail"), "{key}");
        assert!(*ttl > 0 && *ttl <= 3_600_000, "{key}: {ttl} ms");
    }
    let mut connection = redis.connection().await.unwrap();
    for (key, _) in &keys {
        let value: Vec<u8> = redis::cmd("GET")
            .arg(key)
            .query_async(&mut connection)
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&value).to_lowercase();
        assert!(!text.contains("gail"), "{key} holds the username");
        assert!(!text.contains("passw0rd"), "{key} holds the password");
    }
}

#[tokio::test]
async fn with_redis_down_each_replica_remembers_its_own_and_no_call_fails() {
    let mut redis = RedisServer::start().await;
    let cognito = FakeCognito::start().await;
    let fleet = Fleet::keyed();
    let mut a = fleet.replica(&redis, &cognito, &[]).await;
    let b = fleet.replica(&redis, &cognito, &[]).await;
    let (mut a_client, mut b_client) = (a.client().await, b.client().await);
    // A call that Redis answers, so that A sees it go.
    a_client.forgot_password(forgot("warm-up")).await.unwrap();
    redis.kill();

    let first = a_client
        .forgot_password(forgot_with("hal", ID))
        .await
        .expect("answered without Redis");
    assert!(!replayed(&first));
    let retry = a_client
        .forgot_password(forgot_with("hal", ID))
        .await
        .unwrap();
    assert!(replayed(&retry), "A remembers its own");
    let reused = a_client
        .forgot_password(forgot_with("ida", ID))
        .await
        .unwrap_err();
    assert_error(&reused, Code::InvalidArgument, "REQUEST_ID_REUSED");
    assert_eq!(cognito.recorded().len(), 2);
    // B never saw it: without Redis, it runs again there (as the README says).
    let elsewhere = b_client
        .forgot_password(forgot_with("hal", ID))
        .await
        .expect("answered without Redis");
    assert!(!replayed(&elsewhere));
    assert_eq!(cognito.recorded().len(), 3);
    a.wait_for_line(|e| {
        e["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("rate-limit backend failed"))
    })
    .await;
    let metrics = a.scrape().await;
    assert_eq!(metric(&metrics, "rate_limit_backend_up", &[]), Some(0.0));
}

/// A TCP proxy to `upstream` on a free loopback port whose connections can be cut, as a broken
/// network cuts them.
struct Cuttable {
    url: String,
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
    links: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Cuttable {
    async fn start(upstream: u16) -> Self {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("redis://{}/0", listener.local_addr().unwrap());
        let open = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let links = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (accepting, held) = (open.clone(), links.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                // Cut: a new connection is closed at once.
                if !accepting.load(Ordering::SeqCst) {
                    continue;
                }
                let link = tokio::spawn(async move {
                    let mut server = tokio::net::TcpStream::connect(("127.0.0.1", upstream))
                        .await
                        .unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
                held.lock().unwrap().push(link.abort_handle());
            }
        });
        Self { url, open, links }
    }

    /// Closes every connection and every new one until `restore`.
    fn cut(&self) {
        self.open.store(false, std::sync::atomic::Ordering::SeqCst);
        for link in self.links.lock().unwrap().drain(..) {
            link.abort();
        }
    }

    fn restore(&self) {
        self.open.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

#[tokio::test]
async fn an_outcome_whose_write_the_network_lost_is_written_again() {
    let redis = RedisServer::start().await;
    let proxy = Cuttable::start(redis.port).await;
    let cognito = FakeCognito::start().await;
    let fleet = Fleet::keyed();
    let mut a = fleet
        .replica(&redis, &cognito, &[("RATE_LIMIT_REDIS_URL", &proxy.url)])
        .await;
    let b = fleet.replica(&redis, &cognito, &[]).await;
    let (mut a_client, mut b_client) = (a.client().await, b.client().await);

    cognito.script([common::Reply::Held(Box::new(delivered("j***@e***")))]);
    let running =
        tokio::spawn(async move { a_client.forgot_password(forgot_with("jo", ID)).await });
    cognito.arrived(1).await;
    // Cognito answers while A's connection to Redis is cut: A answers its caller all the same,
    // and its write of the outcome fails.
    proxy.cut();
    cognito.release(1);
    let first = running.await.unwrap().expect("answered without Redis");
    assert!(!replayed(&first));
    a.wait_for_line(|e| {
        e["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("rate-limit backend failed"))
    })
    .await;
    proxy.restore();

    // A tries the write again until its claim would expire: the outcome lands.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let keys = redis.keys().await;
        let (_, ttl) = keys
            .iter()
            .find(|(key, _)| key.starts_with("password-recovery:request:"))
            .expect("the claim or its outcome is there");
        // An outcome lives for the window (an hour); a claim only seconds.
        if *ttl > 60_000 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the outcome never replaced the claim"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let retry = b_client
        .forgot_password(forgot_with("jo", ID))
        .await
        .unwrap();
    assert!(replayed(&retry), "{:?}", retry.metadata());
    assert_eq!(cognito.recorded().len(), 1, "one code sent");
}
