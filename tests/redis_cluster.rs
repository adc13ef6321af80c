//! Fleet-wide state on a real Redis Cluster (`RATE_LIMIT_REDIS_MODE=cluster`): six Valkey
//! servers joined by `redis-cli --cluster create` into three primaries with a replica each, and
//! two replicas of the real binary given one seed. They share one user's limit and one retry's
//! outcome; every key carries the one hash tag (so each script's keys share a slot) and
//! expires; a primary killed and failed over, and the slot migrated to another primary, while
//! calls go on: every call is answered, and the limits are shared on the cluster afterwards.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::fleet::Fleet;
use common::redis_cluster::RedisCluster;
use common::{FakeCognito, assert_error, forgot, metric, metric_sum};
use password_recovery::proto::v1::ForgotPasswordRequest;
use tonic::Code;

const CLUSTER: (&str, &str) = ("RATE_LIMIT_REDIS_MODE", "cluster");
/// A global limit too, so that one script touches two keys: a CROSSSLOT error unless they share
/// the tag's slot.
const GLOBAL: (&str, &str) = ("GLOBAL_RATE_LIMIT_RPS", "1000");
const TAG: &str = "{password-recovery:}";

#[tokio::test]
async fn two_replicas_share_one_users_limit_and_a_retrys_outcome_through_a_cluster() {
    let cluster = RedisCluster::start().await;
    let cognito = FakeCognito::start().await;
    let fleet = Fleet::keyed();
    let a = fleet
        .replica_on(&cluster.seed_url(), &cognito, &[CLUSTER, GLOBAL])
        .await;
    let b = fleet
        .replica_on(&cluster.seed_url(), &cognito, &[CLUSTER, GLOBAL])
        .await;
    let (mut a_client, mut b_client) = (a.client().await, b.client().await);

    for round in 0..5 {
        let client = if round % 2 == 0 {
            &mut a_client
        } else {
            &mut b_client
        };
        client
            .forgot_password(forgot("Victim@example.com"))
            .await
            .unwrap();
    }
    for client in [&mut a_client, &mut b_client] {
        let refused = client
            .forgot_password(forgot("victim@example.com"))
            .await
            .unwrap_err();
        let info = assert_error(&refused, Code::ResourceExhausted, "RATE_LIMITED");
        assert_eq!(info.metadata["limiter"], "username");
    }
    assert_eq!(cognito.recorded().len(), 5, "the fleet's five, not ten");
    // Each call's script charged the global and the username bucket together: no CROSSSLOT,
    // nor any other Redis error.
    for replica in [&a, &b] {
        let metrics = replica.scrape().await;
        let errors = metric_sum(&metrics, "rate_limit_backend_errors_total", &[]);
        assert_eq!(errors, 0.0, "{metrics}");
    }

    // A retry on B is answered A's outcome, from the cluster.
    let id = "6a0f3c2e-1b4d-4e8f-9a7c-5d2e1f0b3c4a";
    let with_id = || ForgotPasswordRequest {
        request_id: id.into(),
        ..forgot("ursula")
    };
    a_client.forgot_password(with_id()).await.unwrap();
    let retry = b_client.forgot_password(with_id()).await.unwrap();
    assert_eq!(retry.metadata().get("idempotent-replayed").unwrap(), "true");
    assert_eq!(cognito.recorded().len(), 6);

    // One tag, so one slot on one primary; every key expires; no username in any.
    let keys = cluster.keys().await;
    assert!(keys.len() >= 3, "{keys:?}");

    let holder = keys[0].2;
    for (key, ttl, port) in &keys {
        assert!(key.starts_with(TAG), "{key}");
        assert!(*ttl > 0, "{key} has no time to live");
        assert_eq!(*port, holder, "{key}: every key in the tag's slot");
        assert!(!key.to_lowercase().contains("victim"), "{key}");
    }
}

/// Calls from `client`, each for a new username, until `stop`; counts those answered and
/// those that failed.
fn calls_until(
    mut client: password_recovery::proto::v1::password_recovery_client::PasswordRecoveryClient<
        tonic::transport::Channel,
    >,
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        // Bounded: at most 6 000 calls, 20 ms apart, each within 1 s.
        for i in 0..6000 {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            let mut call = tonic::Request::new(forgot(&format!("during-{i}")));
            call.set_timeout(Duration::from_secs(1));
            match client.forgot_password(call).await {
                Ok(_) => answered.fetch_add(1, Ordering::SeqCst),
                Err(status) => {
                    eprintln!("call {i} failed: {status:?}");
                    failed.fetch_add(1, Ordering::SeqCst)
                }
            };
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}

#[tokio::test]
async fn a_failover_and_a_slot_migration_while_calls_go_on_fail_no_call() {
    let mut cluster = RedisCluster::start().await;
    let cognito = FakeCognito::start().await;
    let fleet = Fleet::keyed();
    let replica = fleet
        .replica_on(&cluster.seed_url(), &cognito, &[CLUSTER, GLOBAL])
        .await;
    let client = replica.client().await;
    let slot = cluster.slot(TAG).await;

    let (stop, answered, failed) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let calls = calls_until(
        client.clone(),
        stop.clone(),
        answered.clone(),
        failed.clone(),
    );
    let first = cluster.primary_of(slot).await;
    cluster.wait_for_key_on(first, "username:").await;

    // The slot's primary dies; its replica is promoted; calls go on throughout.
    cluster.kill_and_fail_over(first, slot).await;
    let promoted = cluster.primary_of(slot).await;
    let before = cluster.keys().await.len();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while cluster.keys().await.len() <= before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "limits never resumed on the cluster"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cluster.wait_for_key_on(promoted, "username:").await;

    // The slot moves to another primary while calls go on.
    let moved_to = cluster.migrate(slot).await;
    let before = cluster
        .keys()
        .await
        .iter()
        .filter(|(_, _, on)| *on == moved_to)
        .count();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let after = cluster
            .keys()
            .await
            .iter()
            .filter(|(_, _, on)| *on == moved_to)
            .count();
        if after > before {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "limits never resumed after the move"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    stop.store(true, Ordering::SeqCst);
    tokio::time::timeout(Duration::from_secs(10), calls)
        .await
        .expect("the calls end")
        .unwrap();
    assert_eq!(failed.load(Ordering::SeqCst), 0, "every call answered");
    assert!(answered.load(Ordering::SeqCst) > 10);
    // The cluster answers again, and the replica says so.
    let metrics = replica.scrape().await;
    assert_eq!(
        metric(&metrics, "rate_limit_backend_up", &[]),
        Some(1.0),
        "{metrics}"
    );
    let failures = metric_sum(&metrics, "rate_limit_backend_errors_total", &[]);
    eprintln!(
        "{} calls answered, {failures} Redis failures judged by the replica's own limits",
        answered.load(Ordering::SeqCst)
    );
    drop(replica);
}
