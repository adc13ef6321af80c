//! Memory and throughput of the release binary under a bounded loopback load: the figures
//! the Kubernetes resource requests and limits are sized from (README "Deploying on
//! Kubernetes"). Prints numbers; asserts nothing about speed.
//!
//! `make bench` (or `cargo bench --bench load`). The load is bounded in count and time and
//! goes to 127.0.0.1 only: a fake Cognito in this process, the service as a child process.

#[allow(dead_code)]
#[path = "../tests/common/fake_cognito.rs"]
mod fake_cognito;

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

#[tokio::main]
async fn main() {
    let cognito = fake_cognito::FakeCognito::start().await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_password-recovery"))
        .env_clear()
        .envs([
            ("COGNITO_CLIENT_ID", "benchclient"),
            ("COGNITO_CLIENT_SECRET", "bench-secret"),
            ("AWS_REGION", "us-east-1"),
            ("AWS_ENDPOINT_URL", cognito.url.as_str()),
            ("AWS_EC2_METADATA_DISABLED", "true"),
            ("GRPC_LISTEN_ADDR", "127.0.0.1:0"),
            ("METRICS_LISTEN_ADDR", "127.0.0.1:0"),
            ("USERNAME_RATE_LIMIT", "off"),
            ("RUST_LOG", "warn,password_recovery::app=info"),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("the release binary starts");
    let pid = child.id().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next_line().await.unwrap().expect("serving line");
        let entry: serde_json::Value = serde_json::from_str(&line).unwrap();
        if entry["message"] == "serving gRPC" {
            break entry["addr"].as_str().unwrap().to_owned();
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

    tokio::time::sleep(Duration::from_secs(1)).await;
    let (idle_rss, _) = memory_kib(pid);

    let mut channels = Vec::new();
    for _ in 0..CONNECTIONS {
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
    for worker in 0..CONCURRENCY {
        let mut client = PasswordRecoveryClient::new(channels[worker % CONNECTIONS].clone());
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            for i in (worker..CALLS).step_by(CONCURRENCY) {
                if Instant::now() > deadline {
                    break;
                }
                let sent = Instant::now();
                client
                    .forgot_password(ForgotPasswordRequest {
                        username: format!("user-{i}@example.com"),
                        ..Default::default()
                    })
                    .await
                    .expect("OK under load");
                latencies.push(sent.elapsed());
            }
            latencies
        }));
    }
    let mut peak_rss_under_load = 0;
    let sampler = async {
        loop {
            peak_rss_under_load = peak_rss_under_load.max(memory_kib(pid).0);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let mut latencies = Vec::new();
    tokio::select! {
        () = sampler => unreachable!(),
        done = futures_join(workers) => latencies.extend(done.into_iter().flatten()),
    }
    let elapsed = started.elapsed();
    let (after_rss, high_water) = memory_kib(pid);
    latencies.sort();
    let percentile = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize];

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
        percentile(0.5).as_secs_f64() * 1e3,
        percentile(0.99).as_secs_f64() * 1e3
    );
    println!(
        "  peak RSS under load:      {:>7} KiB",
        peak_rss_under_load.max(after_rss)
    );
    println!("  high-water RSS (VmHWM):   {:>7} KiB", high_water);
    println!("  RSS after load:           {:>7} KiB", after_rss);

    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
}

async fn futures_join<T>(handles: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut results = Vec::with_capacity(handles.len());
    for handle in handles {
        results.push(handle.await.expect("worker"));
    }
    results
}
