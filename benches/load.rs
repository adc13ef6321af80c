//! Memory and throughput of the release binary under a bounded loopback load: the figures
//! the Kubernetes resource requests and limits are sized from (README "Deploying on
//! Kubernetes"). Prints numbers; asserts nothing about speed.
//!
//! `make bench` (or `cargo bench --bench load`). The load is bounded in count and time and
//! goes to 127.0.0.1 only: a fake Cognito in this process, the service as a child process,
//! and for the shared limits a Valkey server from `.venv` (`make tools` installs it).

#[allow(dead_code)]
#[path = "../tests/common/fake_cognito.rs"]
mod fake_cognito;
#[allow(dead_code)]
#[path = "../tests/common/redis_server.rs"]
mod redis_server;

use std::process::Stdio;
use std::time::{Duration, Instant};

use password_recovery::proto::v1::ForgotPasswordRequest;
use password_recovery::proto::v1::password_recovery_client::PasswordRecoveryClient;
use tokio::io::{AsyncBufReadExt, BufReader};
use tonic::transport::Channel;

const CALLS: usize = 20_000;
const CONCURRENCY: usize = 64;
const CONNECTIONS: usize = 8;
const TIME_LIMIT: Duration = Duration::from_secs(60);
/// Calls one at a time, for the Redis round trip's latency.
const LATENCY_CALLS: usize = 2_000;

/// VmRSS and VmHWM (peak) of `pid`, in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// A service process and what it needs.
struct Service {
    child: tokio::process::Child,
    pid: u32,
    addr: String,
}

impl Service {
    async fn start(cognito_url: &str, extra: &[(&str, &str)]) -> Self {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_password-recovery"))
            .env_clear()
            .envs([
                ("COGNITO_CLIENT_ID", "benchclient"),
                ("COGNITO_CLIENT_SECRET", "bench-secret"),
                ("AWS_REGION", "us-east-1"),
                ("AWS_ENDPOINT_URL", cognito_url),
                ("AWS_EC2_METADATA_DISABLED", "true"),
                ("GRPC_LISTEN_ADDR", "127.0.0.1:0"),
                ("METRICS_LISTEN_ADDR", "127.0.0.1:0"),
                (
                    "RUST_LOG",
                    "warn,password_recovery::app=info,password_recovery::limits=info",
                ),
            ])
            .envs(extra.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("the release binary starts");
        let pid = child.id().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let wants_redis = extra.iter().any(|(k, _)| *k == "RATE_LIMIT_REDIS_URL");
        let (mut addr, mut connected) = (None, !wants_redis);
        while addr.is_none() || !connected {
            let line = lines.next_line().await.unwrap().expect("a log line");
            let entry: serde_json::Value = serde_json::from_str(&line).unwrap();
            if entry["message"] == "serving gRPC" {
                addr = Some(entry["addr"].as_str().unwrap().to_owned());
            }
            connected |= entry["message"] == "rate-limit backend connected";
        }
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Self {
            child,
            pid,
            addr: addr.unwrap(),
        }
    }

    async fn stop(mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        let _ = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await;
    }
}

/// `calls` ForgotPassword calls, `concurrency` at a time over `connections`, within the time
/// limit; returns each call's latency and the time taken. Usernames are unique per run.
async fn load(
    addr: &str,
    run: &str,
    calls: usize,
    concurrency: usize,
    connections: usize,
) -> (Vec<Duration>, Duration) {
    let mut channels = Vec::new();
    for _ in 0..connections {
        channels.push(
            Channel::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect()
                .await
                .unwrap(),
        );
    }
    let started = Instant::now();
    let deadline = started + TIME_LIMIT;
    let mut workers = Vec::new();
    for worker in 0..concurrency {
        let mut client = PasswordRecoveryClient::new(channels[worker % connections].clone());
        let run = run.to_owned();
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            for i in (worker..calls).step_by(concurrency) {
                if Instant::now() > deadline {
                    break;
                }
                let sent = Instant::now();
                client
                    .forgot_password(ForgotPasswordRequest {
                        username: format!("{run}-{i}@example.com"),
                        ..Default::default()
                    })
                    .await
                    .expect("OK under load");
                latencies.push(sent.elapsed());
            }
            latencies
        }));
    }
    let mut latencies: Vec<Duration> = futures_join(workers).await.into_iter().flatten().collect();
    latencies.sort();
    (latencies, started.elapsed())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p) as usize]
}

#[tokio::main]
async fn main() {
    let cognito = fake_cognito::FakeCognito::start().await;

    // Memory and throughput, the limits in process.
    let service = Service::start(&cognito.url, &[("USERNAME_RATE_LIMIT", "off")]).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (idle_rss, _) = memory_kib(service.pid);
    let pid = service.pid;
    let mut peak_rss_under_load = 0;
    let sampler = async {
        loop {
            peak_rss_under_load = peak_rss_under_load.max(memory_kib(pid).0);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let (latencies, elapsed) = tokio::select! {
        () = sampler => unreachable!(),
        done = load(&service.addr, "user", CALLS, CONCURRENCY, CONNECTIONS) => done,
    };
    let (after_rss, high_water) = memory_kib(pid);
    service.stop().await;

    println!("password-recovery release binary, loopback, fake Cognito answering at once");
    println!("  idle RSS:                 {:>7} KiB", idle_rss);
    println!(
        "  load: {} ForgotPassword calls, {CONCURRENCY} concurrent over {CONNECTIONS} connections",
        latencies.len()
    );
    println!(
        "  throughput:               {:>7.0} calls/s",
        latencies.len() as f64 / elapsed.as_secs_f64()
    );
    println!(
        "  latency p50 / p99:        {:>7.2} / {:.2} ms",
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3
    );
    println!(
        "  peak RSS under load:      {:>7} KiB",
        peak_rss_under_load.max(after_rss)
    );
    println!("  high-water RSS (VmHWM):   {:>7} KiB", high_water);
    println!("  RSS after load:           {:>7} KiB", after_rss);

    // The Redis round trip: one call at a time, the default limits in process, then on Redis.
    let redis = redis_server::RedisServer::start().await;
    let key_dir = tempfile::tempdir().unwrap();
    let key_file = key_dir.path().join("hash-key");
    std::fs::write(&key_file, "bench-username-hash-key-0123456789").unwrap();
    let key_file = key_file.to_str().unwrap().to_owned();
    println!(
        "limits in process vs on Redis (Valkey on loopback), {LATENCY_CALLS} calls one at a time:"
    );
    let mut p50s = Vec::new();
    for (name, extra) in [
        ("in process", vec![]),
        (
            "on Redis",
            vec![
                ("RATE_LIMIT_REDIS_URL", redis.url.as_str()),
                ("USERNAME_HASH_KEY_FILE", key_file.as_str()),
            ],
        ),
    ] {
        let service = Service::start(&cognito.url, &extra).await;
        let run = name.replace(' ', "-");
        let (latencies, _) = load(&service.addr, &run, LATENCY_CALLS, 1, 1).await;
        service.stop().await;
        let p50 = percentile(&latencies, 0.5);
        println!(
            "  {name:<12} p50 / p99:   {:>7.3} / {:.3} ms",
            p50.as_secs_f64() * 1e3,
            percentile(&latencies, 0.99).as_secs_f64() * 1e3
        );
        p50s.push(p50);
    }
    println!(
        "  Redis round trip adds:    {:>7.3} ms at p50",
        (p50s[1].as_secs_f64() - p50s[0].as_secs_f64()) * 1e3
    );
}

async fn futures_join<T>(handles: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut results = Vec::with_capacity(handles.len());
    for handle in handles {
        results.push(handle.await.expect("worker"));
    }
    results
}
