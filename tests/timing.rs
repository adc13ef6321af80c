//! Timing does not tell unknown users from known ones: against a fake Cognito that takes
//! 80–120 ms to send a code (or refuse one) and 20–40 ms to say "no such user", the best single
//! latency threshold classifies at most 60 % of 200 known + 200 unknown calls per RPC (50 % is
//! chance). Alone in its test binary, so other tests do not compete for its timers.

mod common;

use std::time::Duration;

use common::{Reply, TestApp, assert_error, confirm, forgot};
use rand::Rng;
use rand::seq::SliceRandom;
use serde_json::json;
use tokio::time::Instant;
use tonic::Code;

fn delivered(username: &str) -> Reply {
    let (local, domain) = username.split_once('@').unwrap();
    let first = |s: &str| s.chars().next().unwrap();
    Reply::Ok(json!({
        "CodeDeliveryDetails": {
            "Destination": format!("{}***@{}***", first(local), first(domain)),
            "DeliveryMedium": "EMAIL",
            "AttributeName": "email",
        }
    }))
}

fn username_of(recorded: &common::Recorded) -> String {
    recorded.body["Username"].as_str().unwrap().to_owned()
}

/// The share of `known` and `unknown` latencies the best single threshold classifies
/// correctly (0.5 is chance).
fn best_threshold_accuracy(known: &[Duration], unknown: &[Duration]) -> f64 {
    let mut all: Vec<(Duration, bool)> = known
        .iter()
        .map(|d| (*d, true))
        .chain(unknown.iter().map(|d| (*d, false)))
        .collect();
    all.sort();
    let total = all.len() as f64;
    let (mut known_below, mut unknown_below) = (0usize, 0usize);
    let mut best: f64 = 0.5;
    for (_, is_known) in &all {
        if *is_known {
            known_below += 1;
        } else {
            unknown_below += 1;
        }
        // "Below the threshold is unknown", and the reverse rule.
        let a = (unknown_below + (known.len() - known_below)) as f64 / total;
        let b = (known_below + (unknown.len() - unknown_below)) as f64 / total;
        best = best.max(a).max(b);
    }
    best
}

fn median(latencies: &[Duration]) -> Duration {
    let mut sorted = latencies.to_vec();
    sorted.sort();
    sorted[sorted.len() / 2]
}

/// Known users: Cognito sends a code (or checks it) in 80–120 ms; unknown users: it says so in
/// 20–40 ms. The answers must not tell them apart by timing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timing_does_not_tell_unknown_users_from_known_ones() {
    let app = TestApp::spawn().await;
    app.cognito.respond_with(|request| {
        let username = username_of(request);
        let mut rng = rand::rng();
        if username.starts_with("known") {
            let pause = Duration::from_millis(rng.random_range(80..=120));
            let answer = match request.operation.as_str() {
                "ForgotPassword" => delivered(&username),
                _ => Reply::error("CodeMismatchException"),
            };
            Reply::After(pause, Box::new(answer))
        } else {
            let pause = Duration::from_millis(rng.random_range(20..=40));
            Reply::After(pause, Box::new(Reply::error("UserNotFoundException")))
        }
    });
    let channel = app.channel().await;

    for rpc in ["ForgotPassword", "ConfirmForgotPassword"] {
        let call = |username: String| {
            let mut client =
                password_recovery::proto::v1::password_recovery_client::PasswordRecoveryClient::new(
                    channel.clone(),
                );
            async move {
                let started = Instant::now();
                let answer = match rpc {
                    "ForgotPassword" => client.forgot_password(forgot(&username)).await.map(drop),
                    _ => client
                        .confirm_forgot_password(confirm(&username))
                        .await
                        .map(drop),
                };
                (started.elapsed(), answer)
            }
        };
        // Warm-up: the service has seen real answers, under the same load, before the
        // attacker measures.
        for batch in 0..2 {
            let warm = (0..16).map(|i| call(format!("known-warm-{batch}-{i}@example.com")));
            futures_join(warm).await;
        }
        let mut usernames: Vec<(bool, String)> = (0..200)
            .map(|i| (true, format!("known-{i}@example.com")))
            .chain((0..200).map(|i| (false, format!("nobody-{i}@example.com"))))
            .collect();
        usernames.shuffle(&mut rand::rng());

        let mut known = Vec::new();
        let mut unknown = Vec::new();
        for batch in usernames.chunks(16) {
            let answers = futures_join(batch.iter().map(|(_, u)| call(u.clone()))).await;
            for ((is_known, username), (latency, answer)) in batch.iter().zip(answers) {
                match rpc {
                    "ForgotPassword" => assert!(answer.is_ok(), "{username}: {answer:?}"),
                    _ => {
                        let status = answer.unwrap_err();
                        assert_error(&status, Code::InvalidArgument, "CODE_MISMATCH");
                    }
                }
                if *is_known {
                    known.push(latency);
                } else {
                    unknown.push(latency);
                }
            }
        }

        let accuracy = best_threshold_accuracy(&known, &unknown);
        println!(
            "{rpc}: median known {:?}, unknown {:?}; best single threshold classifies {:.1} %",
            median(&known),
            median(&unknown),
            accuracy * 100.0
        );
        assert!(
            accuracy <= 0.60,
            "{rpc}: timing tells them apart ({accuracy})"
        );
    }
}

/// Awaits every future, concurrently.
async fn futures_join<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut outputs = Vec::new();
    for handle in handles {
        outputs.push(handle.await.unwrap());
    }
    outputs
}
