//! No caller can take the service away from the others by holding places without using them.
//! Each test runs the release binary at its shipped defaults against the fake Cognito, an
//! attacker on 127.0.0.2 holding connections or calls without finishing them (stalled gRPC
//! messages, stalled JSON bodies, request headers trickled a byte at a time, a body cut short
//! then silence), and meanwhile an honest caller on 127.0.0.1 making ForgotPassword calls at
//! 20 a second on each of three ways (an open gRPC channel, a new gRPC connection per call,
//! curl over HTTP/1.1). Every attack is bounded in count and time.
//!
//! What must hold, per shape: at least 99 % of the honest calls succeed with a p99 latency of
//! at most 1 s; every stalled connection or stream is closed or answered within its bound
//! (`REQUEST_HEADER_TIMEOUT`, `REQUEST_BODY_TIMEOUT`) plus a scheduling slack; peak RSS stays
//! under the README's memory bound. The figures are printed.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::process::ServiceProcess;
use common::tools::curl;
use common::{CLIENT_ID, FakeCognito, connect_from, forgot, raw};
use password_recovery::config::default_value;
use password_recovery::proto::v1::password_recovery_client::PasswordRecoveryClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

const HONEST: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
const ATTACKER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
/// How long each attack goes on while the honest caller calls.
const ATTACK: Duration = Duration::from_secs(12);
/// Calls per second on each of the honest caller's three ways.
const HONEST_RATE: u32 = 20;
/// Beyond a bound, what scheduling on a loaded 2-core machine may add before a close is seen.
const SLACK: Duration = Duration::from_secs(2);

/// One attack at a time: each measures the machine's whole capacity.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn default_duration(name: &str) -> Duration {
    password_recovery::config::parse_duration(&default_value(name).unwrap()).unwrap()
}

/// The release binary at its defaults (but `extra`) against a fresh fake Cognito.
async fn service(extra: &[(&str, &str)]) -> (ServiceProcess, FakeCognito) {
    let cognito = FakeCognito::start().await;
    let mut settings = vec![
        ("COGNITO_CLIENT_ID", CLIENT_ID),
        ("COGNITO_CLIENT_SECRET", "stalling-test-secret"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ENDPOINT_URL", cognito.url.as_str()),
    ];
    settings.extend_from_slice(extra);
    let service = ServiceProcess::start_release(&settings).await;
    (service, cognito)
}

/// Behind a mesh sidecar every connection comes from one address: no per-peer shares.
const BEHIND_A_SIDECAR: &[(&str, &str)] = &[("PEER_KEY", "none")];

fn endpoint(target: SocketAddr) -> Endpoint {
    Endpoint::from_shared(format!("http://{target}"))
        .unwrap()
        .local_address(Some(HONEST))
        .connect_timeout(Duration::from_secs(5))
}

/// One honest call: whether it succeeded, and how long it took.
#[derive(Debug, Clone)]
struct Sample {
    ok: bool,
    latency: Duration,
    failure: Option<String>,
}

/// The honest caller's three ways of calling.
#[derive(Debug, Clone, Copy)]
enum Way {
    OpenChannel,
    NewConnection,
    CurlHttp1,
}

impl Way {
    const ALL: [Way; 3] = [Way::OpenChannel, Way::NewConnection, Way::CurlHttp1];

    fn name(self) -> &'static str {
        match self {
            Way::OpenChannel => "gRPC, open channel",
            Way::NewConnection => "gRPC, new connection",
            Way::CurlHttp1 => "curl, HTTP/1.1",
        }
    }
}

/// One ForgotPassword by `way`, within 5 s.
async fn honest_call(way: Way, target: SocketAddr, open: Channel, username: String) -> Sample {
    let started = Instant::now();
    let call = async {
        match way {
            Way::OpenChannel => PasswordRecoveryClient::new(open)
                .forgot_password(forgot(&username))
                .await
                .map(|_| ())
                .map_err(|s| format!("{:?} {}", s.code(), s.message())),
            Way::NewConnection => {
                let channel = endpoint(target)
                    .connect()
                    .await
                    .map_err(|e| e.to_string())?;
                PasswordRecoveryClient::new(channel)
                    .forgot_password(forgot(&username))
                    .await
                    .map(|_| ())
                    .map_err(|s| format!("{:?} {}", s.code(), s.message()))
            }
            Way::CurlHttp1 => {
                let body = format!(r#"{{"username": "{username}"}}"#);
                let output = tokio::process::Command::new(curl())
                    .args(["--http1.1", "--silent", "--max-time", "5", "--interface"])
                    .arg(HONEST.to_string())
                    .args(["--output", "/dev/null", "--write-out", "%{http_code}"])
                    .args(["--header", "content-type: application/json"])
                    .args(["--data-binary", &body])
                    .arg(format!(
                        "http://{target}/passwordrecovery.v1.PasswordRecovery/ForgotPassword"
                    ))
                    .output()
                    .await
                    .map_err(|e| e.to_string())?;
                let status = String::from_utf8_lossy(&output.stdout).into_owned();
                match status.as_str() {
                    "200" => Ok(()),
                    _ => Err(format!(
                        "HTTP {status} (curl exit {:?})",
                        output.status.code()
                    )),
                }
            }
        }
    };
    let result = tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .unwrap_or_else(|_| Err("no answer within 5 s".into()));
    Sample {
        ok: result.is_ok(),
        latency: started.elapsed(),
        failure: result.err(),
    }
}

/// Calls at `HONEST_RATE` a second on each way for `duration`; every call's sample by way.
async fn honest_caller(target: SocketAddr, duration: Duration) -> Vec<(Way, Vec<Sample>)> {
    let open = endpoint(target)
        .connect()
        .await
        .expect("the honest channel");
    let mut ways = JoinSet::new();
    for way in Way::ALL {
        let open = open.clone();
        ways.spawn(async move {
            let mut calls = JoinSet::new();
            let mut tick = tokio::time::interval(Duration::from_secs(1) / HONEST_RATE);
            let end = Instant::now() + duration;
            let mut i = 0;
            while Instant::now() < end {
                tick.tick().await;
                let username = format!("honest-{i}-{:?}@example.com", way).to_lowercase();
                calls.spawn(honest_call(way, target, open.clone(), username));
                i += 1;
            }
            let samples = calls.join_all().await;
            (way, samples)
        });
    }
    ways.join_all().await
}

/// Prints the honest caller's figures and asserts ≥ 99 % OK with p99 ≤ 1 s, in all.
fn judge_honest(shape: &str, results: &[(Way, Vec<Sample>)]) {
    let p99 = |samples: &mut Vec<Duration>| {
        samples.sort();
        samples[(samples.len() * 99).div_ceil(100).saturating_sub(1)]
    };
    let mut all = Vec::new();
    for (way, samples) in results {
        let ok = samples.iter().filter(|s| s.ok).count();
        let mut latencies: Vec<_> = samples.iter().map(|s| s.latency).collect();
        println!(
            "{shape}: honest {}: {ok}/{} OK ({:.1} %), p99 {:?}",
            way.name(),
            samples.len(),
            100.0 * ok as f64 / samples.len() as f64,
            p99(&mut latencies)
        );
        for failure in samples.iter().filter_map(|s| s.failure.as_ref()).take(3) {
            println!("{shape}:   failed: {failure}");
        }
        all.extend(samples.iter().cloned());
    }
    let ok = all.iter().filter(|s| s.ok).count();
    let rate = ok as f64 / all.len() as f64;
    let mut latencies: Vec<_> = all.iter().map(|s| s.latency).collect();
    let p99 = p99(&mut latencies);
    println!(
        "{shape}: honest in all: {ok}/{} OK ({:.1} %), p99 {p99:?}",
        all.len(),
        100.0 * rate
    );
    assert!(
        rate >= 0.99,
        "{shape}: only {:.1} % of honest calls OK",
        100.0 * rate
    );
    assert!(p99 <= Duration::from_secs(1), "{shape}: honest p99 {p99:?}");
}

/// How long each of the attacker's connections or streams lived before it was closed or
/// answered.
#[derive(Default, Clone)]
struct Lifetimes(Arc<Mutex<Vec<Duration>>>);

impl Lifetimes {
    fn record(&self, lifetime: Duration) {
        self.0.lock().unwrap().push(lifetime);
    }

    /// Prints how many there were and the longest, and asserts it within `bound` + slack.
    fn judge(&self, shape: &str, bound: Duration) {
        let lifetimes = self.0.lock().unwrap();
        let longest = lifetimes.iter().max().copied().unwrap_or_default();
        println!(
            "{shape}: {} attacker connections or streams, each closed or answered within \
             {longest:?} (bound {bound:?})",
            lifetimes.len()
        );
        assert!(!lifetimes.is_empty(), "{shape}: the attack never ran");
        assert!(
            longest <= bound + SLACK,
            "{shape}: one was held {longest:?}, past the bound {bound:?}"
        );
    }
}

/// Runs `attack` (which ends on its own, within `ATTACK` plus its bound) while the honest
/// caller calls, then judges both and the service's peak memory.
async fn under_attack<F>(
    settings: &[(&str, &str)],
    shape: &str,
    bound: Duration,
    attack: impl FnOnce(SocketAddr, Lifetimes) -> F,
) where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let _alone = ONE_AT_A_TIME.lock().await;
    let (service, _cognito) = service(settings).await;
    let target: SocketAddr = service.target.parse().unwrap();
    // One call first, so the connection pool to Cognito is up before the clock starts.
    service
        .client()
        .await
        .forgot_password(forgot("warm"))
        .await
        .unwrap();

    let lifetimes = Lifetimes::default();
    let attacking = tokio::spawn(attack(target, lifetimes.clone()));
    let honest = honest_caller(target, ATTACK).await;
    attacking.await.expect("the attack ends");

    judge_honest(shape, &honest);
    lifetimes.judge(shape, bound);
    let (_, peak) = service.memory();
    let bound = common::shipped_memory_bound();
    println!(
        "{shape}: peak RSS {} KiB (bound {} KiB)",
        peak >> 10,
        bound >> 10
    );
    assert!(
        peak < bound,
        "{shape}: peak RSS {peak} over the bound {bound}"
    );
    let metrics = service.scrape().await;
    for series in [
        "grpc_request_timeouts_total",
        "grpc_calls_taken_back_total",
        "grpc_connections_taken_back_total",
        "grpc_connections_refused_total",
    ] {
        let count: f64 = metrics
            .lines()
            .filter(|l| l.starts_with(series))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .fold(0.0, |sum, n| sum + n);
        println!("{shape}: {series} {count}");
    }
    service.terminate().await;
}

/// `streams` gRPC streams on each of `connections` connections, each announcing a 100-byte
/// message and sending 10 bytes of it, then nothing; a stream answered is opened again until
/// the attack ends.
async fn stalled_grpc_messages(
    target: SocketAddr,
    connections: usize,
    streams: usize,
    lifetimes: Lifetimes,
) {
    let end = Instant::now() + ATTACK;
    let mut tasks = JoinSet::new();
    for _ in 0..connections {
        let lifetimes = lifetimes.clone();
        tasks.spawn(async move {
            while Instant::now() < end {
                let Ok(tcp) = connect_from(ATTACKER, target).await else {
                    continue;
                };
                let Ok((h2, connection)) = h2::client::handshake(tcp).await else {
                    continue;
                };
                let driver = tokio::spawn(connection);
                let mut streams_of_one = JoinSet::new();
                for _ in 0..streams {
                    let (h2, lifetimes) = (h2.clone(), lifetimes.clone());
                    streams_of_one.spawn(async move {
                        while Instant::now() < end {
                            let Ok(mut ready) = h2.clone().ready().await else {
                                return;
                            };
                            let request = raw::http2_request(&target.to_string(), "ForgotPassword");
                            let Ok((response, mut stream)) = ready.send_request(request, false)
                            else {
                                return;
                            };
                            let mut partial = vec![0u8; 15];
                            partial[1..5].copy_from_slice(&100u32.to_be_bytes());
                            let _ = stream.send_data(Bytes::from(partial), false);
                            let sent = Instant::now();
                            let answered = tokio::time::timeout(ATTACK + SLACK * 4, response).await;
                            lifetimes.record(sent.elapsed());
                            if !matches!(answered, Ok(Ok(_))) {
                                return;
                            }
                        }
                    });
                }
                streams_of_one.join_all().await;
                driver.abort();
            }
        });
    }
    tasks.join_all().await;
}

/// A JSON request's head announcing a 100-byte body, and 10 bytes of it.
const STALLED_JSON: &[u8] =
    b"POST /passwordrecovery.v1.PasswordRecovery/ForgotPassword HTTP/1.1\r\n\
    host: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"username";

/// Writes `request` on a connection from the attacker, then waits for the first byte of an
/// answer or the connection's end; returns how long that took, and what came.
async fn send_and_wait(
    target: SocketAddr,
    request: &[u8],
    within: Duration,
) -> Option<(Duration, Vec<u8>)> {
    let mut tcp = connect_from(ATTACKER, target).await.ok()?;
    let sent = Instant::now();
    if tcp.write_all(request).await.is_err() {
        return Some((sent.elapsed(), Vec::new()));
    }
    let mut first = vec![0u8; 64];
    let read = tokio::time::timeout(within, tcp.read(&mut first)).await;
    let got = match read {
        Ok(Ok(n)) => first[..n].to_vec(),
        _ => Vec::new(),
    };
    Some((sent.elapsed(), got))
}

/// `count` HTTP/1.1 connections each holding a stalled JSON body, opened again once answered.
async fn stalled_json_bodies(target: SocketAddr, count: usize, lifetimes: Lifetimes) {
    let end = Instant::now() + ATTACK;
    let mut tasks = JoinSet::new();
    for _ in 0..count {
        let lifetimes = lifetimes.clone();
        tasks.spawn(async move {
            while Instant::now() < end {
                let Some((held, _)) = send_and_wait(target, STALLED_JSON, ATTACK * 2).await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                lifetimes.record(held);
                // A connection refused at once is retried after a pause, not in a tight loop.
                if held < Duration::from_millis(100) {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        });
    }
    tasks.join_all().await;
}

/// `count` connections each sending a request head one byte every 2 s; each closed is
/// opened again a second later until the attack ends.
async fn slow_headers(target: SocketAddr, count: usize, lifetimes: Lifetimes) {
    let end = Instant::now() + ATTACK;
    let mut tasks = JoinSet::new();
    for _ in 0..count {
        let lifetimes = lifetimes.clone();
        tasks.spawn(async move {
            while Instant::now() < end {
                let Ok(mut tcp) = connect_from(ATTACKER, target).await else {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                };
                let opened = Instant::now();
                let mut head = STALLED_JSON.iter();
                let mut sink = [0u8; 64];
                loop {
                    tokio::select! {
                        read = tcp.read(&mut sink) => match read {
                            Ok(n) if n > 0 => {}
                            _ => break,
                        },
                        () = tokio::time::sleep(Duration::from_secs(2)) => {
                            let Some(byte) = head.next() else { break };
                            if tcp.write_all(&[*byte]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                lifetimes.record(opened.elapsed());
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }
    tasks.join_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_grpc_messages_on_five_connections_of_thirty_streams() {
    under_attack(
        &[],
        "5 x 30 stalled gRPC messages",
        default_duration("REQUEST_BODY_TIMEOUT"),
        |target, lifetimes| stalled_grpc_messages(target, 5, 30, lifetimes),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_grpc_messages_on_fifty_connections_of_thirty_streams() {
    under_attack(
        &[],
        "50 x 30 stalled gRPC messages",
        default_duration("REQUEST_BODY_TIMEOUT"),
        |target, lifetimes| stalled_grpc_messages(target, 50, 30, lifetimes),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_stalled_json_bodies() {
    under_attack(
        &[],
        "200 stalled JSON bodies",
        default_duration("REQUEST_BODY_TIMEOUT"),
        |target, lifetimes| stalled_json_bodies(target, 200, lifetimes),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_connections_trickling_their_headers() {
    under_attack(
        &[],
        "1000 slow-header connections",
        default_duration("REQUEST_HEADER_TIMEOUT"),
        |target, lifetimes| slow_headers(target, 1000, lifetimes),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_bodies_cut_short_then_silence_are_answered_408() {
    let answers = Arc::new(Mutex::new(Vec::new()));
    let seen = answers.clone();
    under_attack(
        &[],
        "50 short bodies",
        default_duration("REQUEST_BODY_TIMEOUT"),
        move |target, lifetimes| async move {
            let mut tasks = JoinSet::new();
            for _ in 0..50 {
                tasks.spawn(send_and_wait(target, STALLED_JSON, ATTACK * 2));
            }
            for (held, answer) in tasks.join_all().await.into_iter().flatten() {
                lifetimes.record(held);
                seen.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&answer).into_owned());
            }
        },
    )
    .await;
    // Past the attacker's share of calls, each newcomer took the place of its own oldest
    // stalled call, which was answered 503 (OVERLOADED); the rest waited out their bound.
    let answers = answers.lock().unwrap();
    assert_eq!(answers.len(), 50);
    let timed_out = answers
        .iter()
        .filter(|a| a.starts_with("HTTP/1.1 408"))
        .count();
    let taken_back = answers
        .iter()
        .filter(|a| a.starts_with("HTTP/1.1 503"))
        .count();
    println!("50 short bodies: {timed_out} answered 408, {taken_back} answered 503");
    assert_eq!(timed_out + taken_back, 50, "{answers:?}");
    assert_eq!(
        timed_out as u64,
        common::default_number("MAX_CONCURRENT_CALLS_PER_PEER")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_grpc_messages_behind_a_sidecar_lose_their_places_to_complete_calls() {
    under_attack(
        BEHIND_A_SIDECAR,
        "5 x 30 stalled gRPC messages, PEER_KEY=none",
        default_duration("REQUEST_BODY_TIMEOUT"),
        |target, lifetimes| stalled_grpc_messages(target, 5, 30, lifetimes),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_header_connections_behind_a_sidecar_lose_their_places_to_new_ones() {
    under_attack(
        BEHIND_A_SIDECAR,
        "1000 slow-header connections, PEER_KEY=none",
        default_duration("REQUEST_HEADER_TIMEOUT"),
        |target, lifetimes| slow_headers(target, 1000, lifetimes),
    )
    .await;
}
