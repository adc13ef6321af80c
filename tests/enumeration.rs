//! Enumeration protection against Cognito's documented answers (`common::cognito_model`): for
//! each state an account can be in, in both `PreventUserExistenceErrors` modes, K usernames of
//! accounts in that state and K unknown usernames are called once each, half by gRPC and half
//! by JSON, and
//! - every answer is the same (after the request id, and the base64 copy of each detail,
//!   whose protobuf map order varies, are set aside);
//! - the best single latency threshold, chosen on one half of the calls and scored on the other,
//!   classifies at most 60 % of them (50 % is chance).
//!
//! Why it cannot flake. Calls go in batches of 12 pairs (an account's username and an unknown
//! one, by the same door), so whatever slows or speeds a batch (the machine's other work) moves
//! both classes alike; whole batches go to one half or the other, so the threshold, chosen on
//! the first half alone, knows nothing of the second. Given the batches' conditions, each
//! scored call is then classified right independently, and when the service is at chance the
//! two classes' probabilities of being right add up to 1 in each batch, so the share scored
//! right averages 1/2; by Hoeffding's inequality it exceeds 0.5 + 0.1 over n calls with
//! probability at most exp(−2 n 0.1²). With n = 512 scored calls that is exp(−10.24) = 3.6e−5
//! per case, and 25 cases (12 states × 2 modes, and a short deadline) make 9.0e−4 (the
//! deadline case's answer shares, compared at 4.8 standard deviations, add 1.6e−6): a service at
//! chance fails less than once in 1 000 runs. A service that answered each kind of answer as it
//! came scored 93 % here.
//!
//! The model's latencies (`Latencies::default`) make every kind of answer distinguishable
//! from every other: deliveries 80–120 ms, code checks 70–110 ms, expired codes 40–60 ms, other
//! refusals 20–40 ms. The service is warmed with real answers of each kind first, as a
//! long-running replica is.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::cognito_model::{Account, Mode, UserPool};
use common::{TestApp, confirm, forgot};
use password_recovery::proto::v1::password_recovery_client::PasswordRecoveryClient;
use rand::seq::SliceRandom;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic_types::StatusExt;

/// Usernames per class (accounts in the state, unknown) and case.
const PER_CLASS: usize = 512;
/// Calls in flight at once: under the peer's share of the calls in progress.
const CONCURRENCY: usize = 24;
/// The code every call sends.
const SENT_CODE: &str = "123456";

/// One case at a time: each measures timing.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The RPCs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rpc {
    ForgotPassword,
    ConfirmForgotPassword,
}

impl Rpc {
    fn method(self) -> &'static str {
        match self {
            Rpc::ForgotPassword => "ForgotPassword",
            Rpc::ConfirmForgotPassword => "ConfirmForgotPassword",
        }
    }
}

/// What a known username is, for ConfirmForgotPassword: its account, and its code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Code {
    /// No code requested.
    None,
    /// A code pending, not the one sent.
    Wrong,
    /// The code sent, but sent more than an hour ago.
    Expired,
    /// The code sent, then replaced by a newer ForgotPassword.
    Superseded,
}

/// Makes `username` an account in `account` with `code`.
fn prepare(pool: &UserPool, username: &str, account: Account, code: Code) {
    pool.add(username, account);
    match code {
        Code::None => {}
        Code::Wrong => pool.send_code(username, "654321", Duration::ZERO),
        Code::Expired => pool.send_code(username, SENT_CODE, Duration::from_secs(3660)),
        Code::Superseded => {
            pool.send_code(username, SENT_CODE, Duration::from_secs(60));
            pool.send_code(username, "654321", Duration::ZERO);
        }
    }
}

/// An answer, as comparable across calls: gRPC status code, message and details, or the
/// response; or the JSON door's HTTP status and body.
type Answer = String;

/// A gRPC answer, normalised.
fn grpc_answer<T: std::fmt::Debug>(result: Result<tonic::Response<T>, tonic::Status>) -> Answer {
    let status = match result {
        Ok(response) => return format!("OK {:?}", response.into_inner()),
        Err(status) => status,
    };
    let info = status.get_details_error_info().map(|info| {
        let metadata: BTreeMap<_, _> = info.metadata.into_iter().collect();
        (info.reason, info.domain, metadata)
    });
    let bad = status.get_details_bad_request().map(|bad| {
        bad.field_violations
            .into_iter()
            .map(|v| (v.field, v.description))
            .collect::<Vec<_>>()
    });
    let retry = status
        .get_details_retry_info()
        .and_then(|r| r.retry_delay)
        .map(|d| d.as_secs() / 60);
    format!(
        "{:?} {:?} {info:?} {bad:?} retry-minutes {retry:?}",
        status.code(),
        status.message()
    )
}

/// A JSON-door answer, normalised: each detail's base64 `value` (the protobuf of its `debug`,
/// in a varying map order) is set aside, a RetryInfo's delay kept in whole minutes.
fn json_answer(status: u16, mut body: Value) -> Answer {
    if let Some(details) = body["details"].as_array_mut() {
        for detail in details {
            if let Some(detail) = detail.as_object_mut() {
                detail.remove("value");
                if let Some(delay) = detail["debug"]["retryDelay"].as_str() {
                    let secs: f64 = delay.trim_end_matches('s').parse().unwrap();
                    detail["debug"]["retryDelay"] = json!((secs as u64) / 60);
                }
            }
        }
    }
    format!("HTTP {status} {body}")
}

/// POSTs `body` to the JSON door's `method` on a connection of its own, with
/// `Connect-Timeout-Ms` when `timeout_ms` is given.
async fn post_json(
    addr: SocketAddr,
    method: &str,
    body: &Value,
    timeout_ms: Option<u64>,
) -> (u16, Value) {
    let body = body.to_string();
    let deadline = timeout_ms.map_or(String::new(), |ms| format!("connect-timeout-ms: {ms}\r\n"));
    let request = format!(
        "POST /passwordrecovery.v1.PasswordRecovery/{method} HTTP/1.1\r\nhost: x\r\n\
         content-type: application/json\r\nconnection: close\r\n{deadline}\
         content-length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, serde_json::from_str(body).unwrap())
}

/// One call of `rpc` for `username`, by gRPC or by JSON (with `Connect-Timeout-Ms` when
/// `timeout_ms` is given): its answer and latency.
async fn call(
    rpc: Rpc,
    username: String,
    by_json: bool,
    channel: Channel,
    addr: SocketAddr,
    timeout_ms: Option<u64>,
) -> (Answer, Duration) {
    let started = Instant::now();
    let answer = match (rpc, by_json) {
        (Rpc::ForgotPassword, false) => grpc_answer(
            PasswordRecoveryClient::new(channel)
                .forgot_password(forgot(&username))
                .await,
        ),
        (Rpc::ConfirmForgotPassword, false) => {
            let mut request = confirm(&username);
            request.confirmation_code = SENT_CODE.into();
            grpc_answer(
                PasswordRecoveryClient::new(channel)
                    .confirm_forgot_password(request)
                    .await,
            )
        }
        (_, true) => {
            let body = match rpc {
                Rpc::ForgotPassword => json!({ "username": username }),
                Rpc::ConfirmForgotPassword => json!({
                    "username": username,
                    "confirmationCode": SENT_CODE,
                    "password": "N3w-Passw0rd!",
                }),
            };
            let (status, body) = post_json(addr, rpc.method(), &body, timeout_ms).await;
            json_answer(status, body)
        }
    };
    (answer, started.elapsed())
}

/// One call's result: its batch, whether its username is an account's, whether it went by
/// JSON, its answer and latency.
struct Called {
    batch: usize,
    known: bool,
    by_json: bool,
    answer: Answer,
    latency: Duration,
}

/// Calls `rpc` once for each username of `pairs` (an account's, an unknown one), in batches of
/// `CONCURRENCY` (each pair in one batch, by one door: alternately gRPC and JSON, or JSON alone
/// with `timeout_ms`).
async fn call_pairs(
    app: &TestApp,
    rpc: Rpc,
    pairs: &[(String, String)],
    timeout_ms: Option<u64>,
) -> Vec<Called> {
    let channel = app.channel().await;
    let mut results = Vec::new();
    for (batch, chunk) in pairs.chunks(CONCURRENCY / 2).enumerate() {
        let mut calls = JoinSet::new();
        for (i, (known, unknown)) in chunk.iter().enumerate() {
            let by_json = timeout_ms.is_some() || i % 2 == 1;
            for (is_known, username) in [(true, known), (false, unknown)] {
                let (channel, addr, username) = (channel.clone(), app.addr, username.clone());
                calls.spawn(async move {
                    let (answer, latency) =
                        call(rpc, username, by_json, channel, addr, timeout_ms).await;
                    Called {
                        batch,
                        known: is_known,
                        by_json,
                        answer,
                        latency,
                    }
                });
            }
        }
        results.extend(calls.join_all().await);
    }
    results
}

/// The best single latency threshold's accuracy on `test`, the threshold (and which side is
/// "known") chosen on `train`; each is (known, unknown) latencies in milliseconds.
fn held_out_accuracy(train: (&[f64], &[f64]), test: (&[f64], &[f64])) -> f64 {
    let mut candidates: Vec<f64> = train.0.iter().chain(train.1).copied().collect();
    candidates.sort_by(f64::total_cmp);
    let score = |(known, unknown): (&[f64], &[f64]), threshold: f64, known_below: bool| {
        let right = known
            .iter()
            .filter(|&&l| (l < threshold) == known_below)
            .count()
            + unknown
                .iter()
                .filter(|&&l| (l < threshold) != known_below)
                .count();
        right as f64 / (known.len() + unknown.len()) as f64
    };
    let (mut best, mut chosen) = (0.0, (0.0, true));
    for &threshold in &candidates {
        for known_below in [true, false] {
            let accuracy = score(train, threshold, known_below);
            if accuracy > best {
                (best, chosen) = (accuracy, (threshold, known_below));
            }
        }
    }
    score(test, chosen.0, chosen.1)
}

fn median(mut latencies: Vec<f64>) -> f64 {
    latencies.sort_by(f64::total_cmp);
    latencies[latencies.len() / 2]
}

/// Warms the service with real answers of every kind `rpc` has: deliveries, or wrong and
/// expired codes.
async fn warm_up(app: &TestApp, pool: &UserPool, rpc: Rpc) {
    let mut pairs = Vec::new();
    for i in 0..24 {
        let mut warm = Vec::new();
        for (j, code) in [Code::Wrong, Code::None].into_iter().enumerate() {
            let username = format!("m-warm-{i}-{j}@example.com");
            let code = match rpc {
                Rpc::ForgotPassword => Code::None,
                Rpc::ConfirmForgotPassword => code,
            };
            prepare(pool, &username, Account::Verified, code);
            warm.push(username);
        }
        pairs.push((warm[0].clone(), warm[1].clone()));
    }
    call_pairs(app, rpc, &pairs, None).await;
}

/// One case: accounts in `account` (with `code`) against unknown usernames, for `rpc` in
/// `mode`, with the caller's deadline `timeout_ms` if given. Asserts the answers identical and
/// the timing at chance; returns the figures line.
async fn case(
    rpc: Rpc,
    mode: Mode,
    account: Account,
    code: Code,
    timeout_ms: Option<u64>,
) -> String {
    let _alone = ONE_AT_A_TIME.lock().await;
    let app = TestApp::spawn().await;
    let pool = UserPool::new(mode);
    pool.install(&app.cognito);
    warm_up(&app, &pool, rpc).await;

    // The same first letters, so that a real mask and a simulated one may be alike.
    let mut pairs: Vec<(String, String)> = (0..PER_CLASS)
        .map(|i| {
            let known = format!("m-known-{i}@example.com");
            prepare(&pool, &known, account, code);
            (known, format!("m-nobody-{i}@example.com"))
        })
        .collect();
    pairs.shuffle(&mut rand::rng());
    let results = call_pairs(&app, rpc, &pairs, timeout_ms).await;

    let deadline = timeout_ms.map_or(String::new(), |ms| format!(", deadline {ms} ms"));
    let label = format!(
        "{} {mode:?} {account:?} code {code:?}{deadline}",
        rpc.method()
    );
    for by_json in [false, true] {
        let mut distinct: BTreeMap<&Answer, (usize, usize)> = BTreeMap::new();
        for called in results.iter().filter(|c| c.by_json == by_json) {
            let counts = distinct.entry(&called.answer).or_default();
            match called.known {
                true => counts.0 += 1,
                false => counts.1 += 1,
            }
        }
        let door = if by_json { "JSON" } else { "gRPC" };
        match timeout_ms {
            None => assert!(
                distinct.len() <= 1,
                "{label}, by {door}: answers differ (known, unknown): {distinct:#?}"
            ),
            // Against a deadline an answer may come in time or not: each answer is as frequent
            // for both classes (4.8 standard deviations of the difference of two shares of 512).
            Some(_) => {
                for (answer, (known, unknown)) in &distinct {
                    let share = |n: usize| n as f64 / PER_CLASS as f64;
                    assert!(
                        (share(*known) - share(*unknown)).abs() <= 0.15,
                        "{label}, by {door}: {answer} for {known} known, {unknown} unknown"
                    );
                }
            }
        }
    }
    // Whole batches to either half.
    let latencies = |known: bool, half: usize| -> Vec<f64> {
        results
            .iter()
            .filter(|c| c.known == known && c.batch % 2 == half)
            .map(|c| c.latency.as_secs_f64() * 1e3)
            .collect()
    };
    let (known_a, unknown_a) = (latencies(true, 0), latencies(false, 0));
    let (known_b, unknown_b) = (latencies(true, 1), latencies(false, 1));
    let accuracy = held_out_accuracy((&known_a, &unknown_a), (&known_b, &unknown_b));
    let figures = format!(
        "{label}: {} calls, answered alike by each door ({}); median known {:.1} ms, unknown \
         {:.1} ms; held-out best threshold classifies {:.1} %",
        results.len(),
        results[0].answer.chars().take(60).collect::<String>(),
        median([known_a, known_b].concat()),
        median([unknown_a, unknown_b].concat()),
        accuracy * 100.0
    );
    println!("{figures}");
    assert!(accuracy <= 0.60, "{figures}");
    figures
}

const FORGOT_PASSWORD_STATES: [Account; 5] = [
    Account::Verified,
    Account::NoVerifiedContact,
    Account::Unconfirmed,
    Account::Disabled,
    Account::MustChangePassword,
];

const CONFIRM_STATES: [(Account, Code); 7] = [
    (Account::Verified, Code::None),
    (Account::Verified, Code::Wrong),
    (Account::Verified, Code::Expired),
    (Account::Verified, Code::Superseded),
    (Account::Disabled, Code::None),
    (Account::Unconfirmed, Code::None),
    (Account::MustChangePassword, Code::None),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forgot_password_tells_no_account_state_apart_in_legacy_mode() {
    for account in FORGOT_PASSWORD_STATES {
        case(Rpc::ForgotPassword, Mode::Legacy, account, Code::None, None).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forgot_password_tells_no_account_state_apart_in_enabled_mode() {
    for account in FORGOT_PASSWORD_STATES {
        case(
            Rpc::ForgotPassword,
            Mode::Enabled,
            account,
            Code::None,
            None,
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirm_forgot_password_tells_no_account_state_apart_in_legacy_mode() {
    for (account, code) in CONFIRM_STATES {
        case(
            Rpc::ConfirmForgotPassword,
            Mode::Legacy,
            account,
            code,
            None,
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirm_forgot_password_tells_no_account_state_apart_in_enabled_mode() {
    for (account, code) in CONFIRM_STATES {
        case(
            Rpc::ConfirmForgotPassword,
            Mode::Enabled,
            account,
            code,
            None,
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_between_a_refusal_and_a_delivery_tells_nothing() {
    // A real delivery (80–120 ms) mostly misses a 90 ms deadline and is answered
    // DEADLINE_EXCEEDED; an unknown user's refusal (20–40 ms) comes in time, but its imitation
    // misses the deadline as often, and is answered alike.
    let figures = case(
        Rpc::ForgotPassword,
        Mode::Legacy,
        Account::Verified,
        Code::None,
        Some(90),
    )
    .await;
    println!("{figures}");
}

/// A scripted burst of alternating ForgotPassword and ConfirmForgotPassword calls (a wrong code
/// each time) for one known and one unknown username, with `username_limit`: the sequence of
/// answers of each.
async fn alternating_calls(username_limit: &str, mode: Mode) -> (Vec<Answer>, Vec<Answer>) {
    let _alone = ONE_AT_A_TIME.lock().await;
    let app = TestApp::spawn_with(&[("USERNAME_RATE_LIMIT", username_limit)]).await;
    let pool = UserPool::new(mode);
    pool.install(&app.cognito);
    pool.add("m-known@example.com", Account::Verified);
    let channel = app.channel().await;
    let mut sequences = Vec::new();
    for username in ["m-known@example.com", "m-nobody@example.com"] {
        let mut answers = Vec::new();
        for i in 0..12 {
            let rpc = match i % 2 {
                0 => Rpc::ForgotPassword,
                _ => Rpc::ConfirmForgotPassword,
            };
            let (answer, _) =
                call(rpc, username.into(), false, channel.clone(), app.addr, None).await;
            answers.push(answer);
        }
        sequences.push(answers);
    }
    let unknown = sequences.pop().unwrap();
    (sequences.pop().unwrap(), unknown)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hour_of_attempts_answers_a_known_user_as_an_unknown_one() {
    // At the shipped default (5/6h), the service's limit refuses the 6th call, before
    // Cognito's own attempt limit (modelled at its documented floor, 5 an hour) can.
    let default = password_recovery::config::default_value("USERNAME_RATE_LIMIT").unwrap();
    for mode in [Mode::Legacy, Mode::Enabled] {
        let (known, unknown) = alternating_calls(&default, mode).await;
        for (i, (k, u)) in known.iter().zip(&unknown).enumerate() {
            println!("{mode:?} call {}: {k}", i + 1);
            assert_eq!(k, u, "{mode:?}, call {}", i + 1);
        }
        assert!(known[5].contains("RATE_LIMITED"), "{}", known[5]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_username_limit_above_cognitos_lets_its_attempt_limit_tell_a_known_user() {
    // The residual the README names: with a limit looser than Cognito's floor (or several
    // replicas without Redis), Cognito's LimitExceededException arrives for the known user
    // first. It is answered exactly as this service's limit would refuse, but earlier in the
    // sequence than the unknown user's.
    let (known, unknown) = alternating_calls("10/1h", Mode::Legacy).await;
    assert!(
        known[5].contains("RATE_LIMITED") && known[5].contains("username"),
        "{}",
        known[5]
    );
    assert!(!unknown[5].contains("RATE_LIMITED"), "{}", unknown[5]);
    assert_eq!(
        without_wait(&known[5]),
        without_wait(&unknown[10]),
        "the same refusal, but not at the same call"
    );
}

/// A refusal without how long to wait (which depends on when the calls came).
fn without_wait(answer: &str) -> String {
    let answer = answer.split(" retry-minutes").next().unwrap_or(answer);
    match answer.split_once("; retry in") {
        Some((before, after)) => {
            format!(
                "{before}{}",
                after.split_once('"').map_or("", |(_, rest)| rest)
            )
        }
        None => answer.to_owned(),
    }
}
