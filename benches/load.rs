//! What the service costs next to calling Cognito directly (README "Performance"). Prints a
//! table and writes `target/bench/results.json`; asserts nothing about speed.
//!
//! `make bench` (or `BENCH_BINARY=<the service> cargo bench --bench load`; without it, the
//! binary cargo builds for the bench, which is not quite the shipped one). Everything runs on
//! 127.0.0.1, and every run is bounded in time and in calls. One fast stand-in for Cognito
//! (canned JSON, in this process) answers every scenario:
//! - `service`: the load generator → the release binary at its default settings and log level
//!   → the stand-in; `service_redis`: the same with its limits on Redis (Valkey from `.venv`);
//! - `direct_sdk`: a caller process calling the stand-in through the AWS SDK itself, the same
//!   SDK version the service uses, configured as a careful caller would be (no retries, no
//!   credentials);
//! - `bare_grpc`: a tonic server of the same proto answering at once: the floor of a gRPC hop.
//!
//! Each at 64 calls in flight (throughput) and at 1 (latency). CPU per call is the server's
//! (or the SDK caller's) user + system time from /proc over the calls it made; switches per
//! call are its threads' context switches over them (from /proc/<pid>/task/*/status), the
//! count of times a thread left the CPU to wait or was put off it. With 4 or more
//! cores the processes under test and the load generator are pinned to separate cores; with
//! fewer they share them, and the CPU-per-call ratio is the figure to trust.
//!
//! The same executable plays the two helper processes, chosen by `BENCH_ROLE`. To try a
//! setting, `BENCH_SERVICE_<NAME>=<value>` passes `<NAME>=<value>` to the service, e.g.
//! `BENCH_SERVICE_RUST_LOG=warn,password_recovery::app=info make bench` (the service is found
//! by its "serving gRPC" line).
//!
//! Then **instructions per call**, a figure this machine's noise does not move: the service
//! (at the default log level and at `warn`), the direct SDK caller and the bare tonic server
//! each run under valgrind's callgrind, whose counters are zeroed (`callgrind_control
//! --zero`) after a warm-up and dumped (`--dump`) after a window of `INSTRUCTION_CALLS` calls
//! at 16 in flight; the count covers every thread of the process. This machine has no
//! hardware counters for `perf stat`. The counts are of the CPU valgrind shows (without SHA
//! extensions, for one), so they compare runs and processes, not the machine's own counts.
//! Then **system calls per call**, which instructions do not see (callgrind counts none of
//! the kernel's work): the same four processes run natively over the same windows, while
//! `perf stat` counts the system calls their threads enter (tracepoints
//! `raw_syscalls:sys_enter` and `syscalls:sys_enter_<name>`, enabled and disabled through its
//! control FIFO, which acknowledges each). An exact count, like instructions.
//! `BENCH_INSTRUCTIONS=off` leaves both parts out, `BENCH_INSTRUCTIONS=only` runs them alone, and
//! `BENCH_CALLGRIND_DIR=<dir>` keeps the dumps (`callgrind.<pid>.1`, the counted window) for
//! `callgrind_annotate`. `BENCH_SCENARIOS=service,direct_sdk` times only the scenarios it
//! names (of `service`, `service_redis`, `direct_sdk`, `bare_grpc`), to compare two builds'
//! CPU per call in alternating runs.

#[allow(dead_code)]
#[path = "../tests/common/redis_server.rs"]
mod redis_server;

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use password_recovery::proto::v1 as pb;
use password_recovery::proto::v1::password_recovery_client::PasswordRecoveryClient;
use password_recovery::proto::v1::password_recovery_server::{
    PasswordRecovery, PasswordRecoveryServer,
};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tonic::transport::Channel;

/// How long each throughput run (64 in flight) and each latency run (1 in flight) lasts.
const THROUGHPUT_RUN: Duration = Duration::from_secs(4);
const LATENCY_RUN: Duration = Duration::from_secs(3);
/// No run makes more calls than this, however fast it goes.
const MAX_CALLS: usize = 400_000;
/// Calls before each measured run, so connections and pools are warm.
const WARM_UP_CALLS: usize = 200;
/// Every scenario runs once per round; the report gives the medians.
const ROUNDS: usize = 3;
/// The load generator's HTTP/2 connections (fewer when fewer calls are in flight), each from
/// a loopback address of its own (127.0.0.1, .2, …): 64 calls in flight are then four callers'
/// 16, within the shipped per-peer share of the calls in progress (32).
const CONNECTIONS: usize = 4;

/// The log filter of the `service_warn` scenario: no line or audit event per call.
const WARN: &str = "warn,password_recovery::app=info";

/// The window of calls counted in instructions, and the calls in flight meanwhile.
const INSTRUCTION_CALLS: usize = 1000;
const INSTRUCTION_CONCURRENCY: usize = 16;

const CLIENT_ID: &str = "benchclient";
const CLIENT_SECRET: &str = "bench-client-secret";
const FORGOT_PASSWORD_ANSWER: &str = r#"{"CodeDeliveryDetails":{"Destination":"b***@e***","DeliveryMedium":"EMAIL","AttributeName":"email"}}"#;

/// One scenario at one concurrency.
#[derive(Debug, Clone, Copy)]
struct Measured {
    calls: usize,
    elapsed: Duration,
    p50: Duration,
    p99: Duration,
    /// CPU time of the process under test over the run.
    cpu: Duration,
    /// Times a thread of the process under test went off the CPU over the run (its context
    /// switches, voluntary or not).
    switches: u64,
}

impl Measured {
    fn rps(&self) -> f64 {
        self.calls as f64 / self.elapsed.as_secs_f64()
    }

    fn cpu_per_call(&self) -> Duration {
        self.cpu / self.calls.max(1) as u32
    }

    fn switches_per_call(&self) -> f64 {
        self.switches as f64 / self.calls.max(1) as f64
    }

    fn from_latencies(
        mut latencies: Vec<Duration>,
        elapsed: Duration,
        cpu: Duration,
        switches: u64,
    ) -> Self {
        latencies.sort_unstable();
        let at = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize];
        Self {
            calls: latencies.len(),
            elapsed,
            p50: at(0.5),
            p99: at(0.99),
            cpu,
            switches,
        }
    }
}

/// One scenario at one concurrency over the rounds: the median of each figure.
#[derive(Debug, Clone, Copy)]
struct Summary {
    rps: f64,
    p50: Duration,
    p99: Duration,
    cpu_per_call: Duration,
    switches_per_call: f64,
}

impl Summary {
    fn of(runs: &[Measured]) -> Self {
        Self {
            rps: median(runs.iter().map(|r| r.rps() as u64).collect()) as f64,
            p50: median(runs.iter().map(|r| r.p50).collect()),
            p99: median(runs.iter().map(|r| r.p99).collect()),
            cpu_per_call: median(runs.iter().map(Measured::cpu_per_call).collect()),
            // In hundredths, for an ordered median.
            switches_per_call: median(
                runs.iter()
                    .map(|r| (r.switches_per_call() * 100.0).round() as u64)
                    .collect(),
            ) as f64
                / 100.0,
        }
    }

    fn json(&self) -> Value {
        json!({
            "rps": self.rps.round(),
            "p50_us": self.p50.as_micros() as u64,
            "p99_us": self.p99.as_micros() as u64,
            "cpu_us_per_call": self.cpu_per_call.as_micros() as u64,
            "switches_per_call": self.switches_per_call,
        })
    }
}

fn median<T: Ord + Copy>(mut values: Vec<T>) -> T {
    values.sort_unstable();
    values[values.len() / 2]
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    match std::env::var("BENCH_ROLE").as_deref() {
        Ok("bare_grpc") => runtime.block_on(bare_grpc_server()),
        Ok("direct_sdk") => runtime.block_on(direct_sdk_caller()),
        _ => runtime.block_on(bench()),
    }
}

// ---- The measurements ------------------------------------------------------------------

async fn bench() {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let pinning = Pinning::for_cores(cores);
    pinning.pin_self();
    let standin = start_standin().await;
    // The shipped build, which `make bench` copies aside before cargo builds this bench: the
    // binary cargo builds for a bench has the dev-dependencies' features too, which renames
    // its functions, so the linker's order (`link/symbol-order.txt`) finds few of them.
    let shipped = std::env::var("BENCH_BINARY").ok();
    let binary = shipped
        .as_deref()
        .unwrap_or(env!("CARGO_BIN_EXE_password-recovery"));
    assert!(
        std::path::Path::new(binary).exists(),
        "BENCH_BINARY={binary} is missing: `make bench` copies the shipped build there"
    );
    if std::env::var("BENCH_INSTRUCTIONS").as_deref() == Ok("only") {
        print_instructions(&instructions(binary, &standin).await);
        println!();
        print_syscalls(&syscalls(binary, &standin).await);
        return;
    }

    let timed = timed_scenarios();
    let mut runs: BTreeMap<&str, BTreeMap<&str, Vec<Measured>>> = BTreeMap::new();
    let mut record = |concurrency: &'static str, scenario: &'static str, measured: Measured| {
        runs.entry(concurrency)
            .or_default()
            .entry(scenario)
            .or_default()
            .push(measured);
    };
    let (mut startups, mut idle_rss, mut loaded_rss) = (Vec::new(), Vec::new(), Vec::new());
    let redis = redis_server::RedisServer::start().await;
    let key = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(key.path(), "bench-username-hash-key-0123456789").unwrap();
    let redis_settings = [
        ("RATE_LIMIT_REDIS_URL", redis.url.as_str()),
        ("USERNAME_HASH_KEY_FILE", key.path().to_str().unwrap()),
    ];

    // Every scenario once per round, the rounds reported by their medians: on a shared
    // machine one run of a few seconds can be off by half.
    for _ in 0..ROUNDS {
        // The service at its defaults: start-up, memory, then both loads.
        if timed.contains(&"service") {
            let started = Instant::now();
            let service = Service::start(binary, &standin, &[], &pinning).await;
            startups.push(started.elapsed());
            idle_rss.push(rss_kib(service.pid));
            let c64 = grpc_load(&service.addr, 64, THROUGHPUT_RUN, service.pid).await;
            loaded_rss.push(rss_kib(service.pid));
            let c1 = grpc_load(&service.addr, 1, LATENCY_RUN, service.pid).await;
            record("c64", "service", c64);
            record("c1", "service", c1);
            service.stop().await;
        }

        // The same with its limits on Redis.
        if timed.contains(&"service_redis") {
            let service = Service::start(binary, &standin, &redis_settings, &pinning).await;
            let c64 = grpc_load(&service.addr, 64, THROUGHPUT_RUN, service.pid).await;
            let c1 = grpc_load(&service.addr, 1, LATENCY_RUN, service.pid).await;
            record("c64", "service_redis", c64);
            record("c1", "service_redis", c1);
            service.stop().await;
        }

        // The AWS SDK called directly, in a process of its own.
        if timed.contains(&"direct_sdk") {
            for (concurrency, label, run) in [(64, "c64", THROUGHPUT_RUN), (1, "c1", LATENCY_RUN)] {
                let measured = direct_sdk(&standin, concurrency, run, &pinning).await;
                record(label, "direct_sdk", measured);
            }
        }

        // The floor: a gRPC hop to a server that answers at once.
        if timed.contains(&"bare_grpc") {
            let mut bare = Helper::start("bare_grpc", &[], &pinning).await;
            let addr = bare.first_line.clone();
            record(
                "c64",
                "bare_grpc",
                grpc_load(&addr, 64, THROUGHPUT_RUN, bare.pid).await,
            );
            record(
                "c1",
                "bare_grpc",
                grpc_load(&addr, 1, LATENCY_RUN, bare.pid).await,
            );
            bare.child.kill().await.ok();
        }
    }
    // Each round's own ratio: the two ran within seconds of each other, so a slow spell of the
    // machine moves both.
    let round_ratios: Vec<f64> = match runs
        .get("c64")
        .map(|c| (c.get("service"), c.get("direct_sdk")))
    {
        Some((Some(service), Some(sdk))) => service
            .iter()
            .zip(sdk)
            .map(|(s, d)| s.cpu_per_call().as_secs_f64() / d.cpu_per_call().as_secs_f64())
            .collect(),
        _ => Vec::new(),
    };
    let results: BTreeMap<&str, BTreeMap<&str, Summary>> = runs
        .into_iter()
        .map(|(c, scenarios)| {
            let scenarios = scenarios
                .into_iter()
                .map(|(name, runs)| (name, Summary::of(&runs)))
                .collect();
            (c, scenarios)
        })
        .collect();
    if timed.len() < SCENARIOS.len() {
        // A partial run: its table and ratio, but no results.json, which holds every figure.
        print_table(&results, cores, &pinning);
        print_cpu_ratio(&results, &round_ratios);
        return;
    }
    let startup = median(startups);
    let idle_rss_kib = median(idle_rss);
    let loaded_rss_kib = median(loaded_rss);

    let binary_bytes = stripped_size(binary);
    print_table(&results, cores, &pinning);
    println!();
    println!(
        "exec to serving gRPC: {:.1} ms",
        startup.as_secs_f64() * 1e3
    );
    println!("RSS idle / after the c=64 run: {idle_rss_kib} / {loaded_rss_kib} KiB");
    match binary_bytes {
        Some(bytes) => println!("stripped binary: {:.1} MiB", bytes as f64 / 1048576.0),
        None => println!("stripped binary: `strip` (binutils) is not installed"),
    }
    print_cpu_ratio(&results, &round_ratios);

    let mut json = serde_json::Map::new();
    for (concurrency, scenarios) in &results {
        let scenarios: serde_json::Map<String, Value> = scenarios
            .iter()
            .map(|(name, measured)| ((*name).to_owned(), measured.json()))
            .collect();
        json.insert((*concurrency).to_owned(), Value::Object(scenarios));
    }
    json.insert("cpu_ratio_by_round".into(), json!(round_ratios));
    json.insert("startup_ms".into(), json!(startup.as_secs_f64() * 1e3));
    json.insert("idle_rss_kib".into(), json!(idle_rss_kib));
    json.insert("loaded_rss_kib".into(), json!(loaded_rss_kib));
    json.insert("binary_bytes".into(), json!(binary_bytes));
    json.insert("cores".into(), json!(cores));
    json.insert("pinned".into(), json!(pinning.is_on()));
    if std::env::var("BENCH_INSTRUCTIONS").as_deref() != Ok("off") {
        let counted = instructions(binary, &standin).await;
        println!();
        print_instructions(&counted);
        json.insert(
            "instructions_per_call".into(),
            counted
                .iter()
                .map(|(name, count)| ((*name).to_owned(), json!(count)))
                .collect::<serde_json::Map<_, _>>()
                .into(),
        );
        let counted = syscalls(binary, &standin).await;
        println!();
        print_syscalls(&counted);
        json.insert(
            "syscalls_per_call".into(),
            counted
                .iter()
                .map(|(name, counts)| {
                    let counts: serde_json::Map<_, _> = counts
                        .iter()
                        .map(|(syscall, n)| (syscall.clone(), json!(n)))
                        .collect();
                    ((*name).to_owned(), Value::Object(counts))
                })
                .collect::<serde_json::Map<_, _>>()
                .into(),
        );
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("results.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap()).unwrap();
    println!("written: {}", path.display());
}

/// The scenarios a run times, in their order in a round.
const SCENARIOS: [&str; 4] = ["service", "service_redis", "direct_sdk", "bare_grpc"];

/// The scenarios `BENCH_SCENARIOS` names (comma-separated), or all of them.
fn timed_scenarios() -> Vec<&'static str> {
    let Ok(named) = std::env::var("BENCH_SCENARIOS") else {
        return SCENARIOS.to_vec();
    };
    let named: Vec<&str> = named.split(',').map(str::trim).collect();
    if let Some(unknown) = named.iter().find(|n| !SCENARIOS.contains(n)) {
        panic!("BENCH_SCENARIOS names {unknown:?}: the scenarios are {SCENARIOS:?}");
    }
    SCENARIOS
        .into_iter()
        .filter(|s| named.contains(s))
        .collect()
}

/// The service against the SDK called directly, where the run timed both.
fn print_cpu_ratio(results: &BTreeMap<&str, BTreeMap<&str, Summary>>, round_ratios: &[f64]) {
    let of = |c: &str, s: &str| results.get(c).and_then(|r| r.get(s)).copied();
    let (Some(service64), Some(sdk64), Some(service1), Some(sdk1)) = (
        of("c64", "service"),
        of("c64", "direct_sdk"),
        of("c1", "service"),
        of("c1", "direct_sdk"),
    ) else {
        return;
    };
    println!(
        "service / direct SDK: throughput {:.2}×, CPU per call {:.2}× (c=64); p50 {:+} µs (c=1)",
        service64.rps / sdk64.rps,
        service64.cpu_per_call.as_secs_f64() / sdk64.cpu_per_call.as_secs_f64(),
        service1.p50.as_micros() as i64 - sdk1.p50.as_micros() as i64,
    );
    let ratios: Vec<String> = round_ratios.iter().map(|r| format!("{r:.2}×")).collect();
    println!(
        "CPU per call, service / direct SDK, round by round (c=64): {}",
        ratios.join(", ")
    );
}

fn print_table(results: &BTreeMap<&str, BTreeMap<&str, Summary>>, cores: usize, pinning: &Pinning) {
    println!(
        "{cores} cores, {}; loopback; a stand-in Cognito answering at once; medians of {ROUNDS} rounds",
        if pinning.is_on() {
            "the process under test and the load generator pinned apart"
        } else {
            "every process sharing every core"
        }
    );
    println!(
        "{:<5} {:<14} {:>10} {:>9} {:>9} {:>14} {:>16}",
        "", "scenario", "calls/s", "p50 µs", "p99 µs", "CPU µs/call", "switches/call"
    );
    for concurrency in ["c64", "c1"] {
        for scenario in SCENARIOS {
            let Some(&m) = results.get(concurrency).and_then(|r| r.get(scenario)) else {
                continue;
            };
            println!(
                "{:<5} {:<14} {:>10.0} {:>9} {:>9} {:>14} {:>16.2}",
                concurrency,
                scenario,
                m.rps,
                m.p50.as_micros(),
                m.p99.as_micros(),
                m.cpu_per_call.as_micros(),
                m.switches_per_call
            );
        }
    }
}

/// Calls ForgotPassword on `addr` with `concurrency` calls in flight for `run` (at most
/// `MAX_CALLS`), after a warm-up, measuring `pid`'s CPU time over the measured calls.
async fn grpc_load(addr: &str, concurrency: usize, run: Duration, pid: u32) -> Measured {
    let connections = concurrency.clamp(1, CONNECTIONS);
    let mut channels = Vec::new();
    for peer in 0..connections {
        let from = std::net::IpAddr::from([127, 0, 0, u8::try_from(peer + 1).unwrap()]);
        let endpoint = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .local_address(Some(from));
        channels.push(endpoint.connect().await.expect("connects"));
    }
    let clients: Vec<_> = (0..concurrency)
        .map(|i| PasswordRecoveryClient::new(channels[i % connections].clone()))
        .collect();
    let clients: std::sync::Arc<[_]> = clients.into();
    let run_id: u64 = rand::random();
    let call = move |worker: usize, n: usize| {
        let mut client = clients[worker % clients.len()].clone();
        async move {
            let request = pb::ForgotPasswordRequest {
                username: format!("u{run_id:x}-{n}@example.com"),
                ..Default::default()
            };
            client
                .forgot_password(request)
                .await
                .expect("OK under load");
        }
    };
    measure(concurrency, run, pid, call).await
}

/// `concurrency` workers calling `call(worker, n)` (`n` unique per call) for `run`, at most
/// `MAX_CALLS` in all, after `WARM_UP_CALLS`; `pid`'s CPU time is taken over the measured calls.
async fn measure<F, Fut>(concurrency: usize, run: Duration, pid: u32, call: F) -> Measured
where
    F: Fn(usize, usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    for n in 0..WARM_UP_CALLS {
        call(n % concurrency, n).await;
    }
    let (cpu_before, switches_before) = (cpu_time(pid), switches(pid));
    let started = Instant::now();
    let deadline = started + run;
    let per_worker = MAX_CALLS / concurrency;
    let workers: Vec<_> = (0..concurrency)
        .map(|worker| {
            let call = call.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(4096);
                for i in 0..per_worker {
                    let sent = Instant::now();
                    if sent >= deadline {
                        break;
                    }
                    call(worker, WARM_UP_CALLS + worker * per_worker + i).await;
                    latencies.push(sent.elapsed());
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for worker in workers {
        latencies.extend(worker.await.unwrap());
    }
    let elapsed = started.elapsed();
    Measured::from_latencies(
        latencies,
        elapsed,
        cpu_time(pid) - cpu_before,
        switches(pid).saturating_sub(switches_before),
    )
}

/// The `direct_sdk` scenario: a caller process of its own, which reports its figures.
async fn direct_sdk(
    standin: &str,
    concurrency: usize,
    run: Duration,
    pinning: &Pinning,
) -> Measured {
    let settings = [
        ("STANDIN_URL", standin.to_owned()),
        ("CONCURRENCY", concurrency.to_string()),
        ("RUN_MS", run.as_millis().to_string()),
    ];
    let settings: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut caller = Helper::start("direct_sdk", &settings, pinning).await;
    let report: Value = serde_json::from_str(&caller.first_line).expect("the caller's report");
    let _ = caller.child.wait().await;
    let micros = |field: &str| Duration::from_micros(report[field].as_u64().unwrap());
    Measured {
        calls: report["calls"].as_u64().unwrap() as usize,
        elapsed: micros("elapsed_us"),
        p50: micros("p50_us"),
        p99: micros("p99_us"),
        cpu: micros("cpu_us"),
        switches: report["switches"].as_u64().unwrap(),
    }
}

// ---- The processes ---------------------------------------------------------------------

/// Where processes run: apart when there are cores enough, else wherever the kernel likes.
struct Pinning {
    /// `(cores for the process under test, cores for this load generator)`.
    split: Option<(String, Vec<usize>)>,
}

impl Pinning {
    fn for_cores(cores: usize) -> Self {
        if cores < 4 {
            return Self { split: None };
        }
        let half = cores / 2;
        Self {
            split: Some((format!("0-{}", half - 1), (half..cores).collect())),
        }
    }

    fn is_on(&self) -> bool {
        self.split.is_some()
    }

    /// Pins this process (the load generator and the stand-in) to its cores.
    fn pin_self(&self) {
        let Some((_, mine)) = &self.split else {
            return;
        };
        // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes inside it.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            for core in mine {
                libc::CPU_SET(*core, &mut set);
            }
            libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set);
        }
    }

    /// `program` as a command, pinned to the cores of the process under test.
    fn command(&self, program: &str) -> Command {
        match &self.split {
            Some((cores, _)) => {
                let mut command = Command::new("taskset");
                command.args(["--cpu-list", cores, program]);
                command
            }
            None => Command::new(program),
        }
    }
}

/// The service's release binary, its log lines drained.
struct Service {
    child: Child,
    pid: u32,
    addr: String,
}

impl Service {
    /// Starts it at its defaults plus `extra`; returns once it serves gRPC.
    async fn start(binary: &str, standin: &str, extra: &[(&str, &str)], pinning: &Pinning) -> Self {
        Self::start_as(pinning.command(binary), standin, extra).await
    }

    /// Starts `command` (the binary, or valgrind running it) like [`Service::start`].
    async fn start_as(mut command: Command, standin: &str, extra: &[(&str, &str)]) -> Self {
        let mut child = command
            .env_clear()
            .envs([
                ("COGNITO_CLIENT_ID", CLIENT_ID),
                ("COGNITO_CLIENT_SECRET", CLIENT_SECRET),
                ("AWS_REGION", "us-east-1"),
                ("AWS_ENDPOINT_URL", standin),
                ("AWS_EC2_METADATA_DISABLED", "true"),
                ("GRPC_LISTEN_ADDR", "127.0.0.1:0"),
                ("HEALTH_LISTEN_ADDR", "127.0.0.1:0"),
                ("METRICS_LISTEN_ADDR", "127.0.0.1:0"),
            ])
            .envs(extra.iter().copied())
            .envs(std::env::vars().filter_map(|(name, value)| {
                Some((name.strip_prefix("BENCH_SERVICE_")?.to_owned(), value))
            }))
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
            let entry: Value = serde_json::from_str(&line).unwrap();
            if entry["message"] == "serving gRPC" {
                addr = entry["addr"].as_str().map(str::to_owned);
            }
            connected |= entry["message"] == "rate-limit backend connected";
        }
        // Every call writes a log line and an audit event, read here as a collector would.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Self {
            child,
            pid,
            addr: addr.unwrap(),
        }
    }

    async fn stop(mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
        let _ = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await;
    }
}

/// This executable in one of its helper roles, with the first line it printed.
struct Helper {
    child: Child,
    pid: u32,
    first_line: String,
    /// Its further lines.
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl Helper {
    /// Starts `command` (valgrind running this executable in a role) with its stdin piped,
    /// and reads its first line.
    async fn spawn(mut command: Command) -> Self {
        command.stdin(Stdio::piped()).stderr(Stdio::null());
        Self::launch(
            command,
            "the helper starts (under valgrind for instructions: apt-get install valgrind)",
        )
        .await
    }

    /// Spawns `command` with its stdout piped and reads its first line.
    async fn launch(mut command: Command, fails: &str) -> Self {
        let mut child = command
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect(fails);
        let pid = child.id().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first_line = lines.next_line().await.unwrap().expect("the helper's line");
        Self {
            child,
            pid,
            first_line,
            lines,
        }
    }

    async fn say(&mut self, line: &str) {
        use tokio::io::AsyncWriteExt;
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .unwrap();
        stdin.flush().await.unwrap();
    }

    async fn next_line(&mut self) -> String {
        let line = self.lines.next_line().await.unwrap();
        line.expect("the helper's line")
    }

    async fn start(role: &str, settings: &[(&str, &str)], pinning: &Pinning) -> Self {
        let me = std::env::current_exe().unwrap();
        let mut command = pinning.command(me.to_str().unwrap());
        command
            .env("BENCH_ROLE", role)
            .envs(settings.iter().copied())
            .stderr(Stdio::inherit());
        Self::launch(command, "the helper starts").await
    }
}

/// The stand-in for Cognito: every request gets the canned ForgotPassword answer.
async fn start_standin() -> String {
    let router = axum::Router::new().fallback(|| async {
        (
            [
                ("content-type", "application/x-amz-json-1.1"),
                ("x-amzn-requestid", "bench-request-id"),
            ],
            FORGOT_PASSWORD_ANSWER,
        )
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    url
}

/// User + system CPU time of `pid` so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of stat(5), 12 and 13 after the name.
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_micros((ticks(11) + ticks(12)) * 1_000_000 / per_second)
}

/// Context switches of every thread of `pid` so far, voluntary (it waited: for a socket, a
/// timer, another thread's wake-up) or not (preempted): each is a time a thread left the CPU,
/// the measure of the hand-offs between threads a call makes. A thread that ended meanwhile
/// is not counted.
fn switches(pid: u32) -> u64 {
    let Ok(threads) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    threads
        .flatten()
        .map(|thread| {
            let status = std::fs::read_to_string(thread.path().join("status")).unwrap_or_default();
            status
                .lines()
                .filter_map(|line| {
                    line.strip_prefix("voluntary_ctxt_switches:")
                        .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
                })
                .filter_map(|count| count.trim().parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum()
}

/// VmRSS of `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The size of `binary` once stripped of symbols, if `strip` is installed.
fn stripped_size(binary: &str) -> Option<u64> {
    let copy = tempfile::NamedTempFile::new().unwrap();
    std::fs::copy(binary, copy.path()).unwrap();
    let stripped = std::process::Command::new("strip")
        .arg(copy.path())
        .status()
        .ok()?
        .success();
    stripped.then(|| std::fs::metadata(copy.path()).unwrap().len())
}

// ---- The helper roles ------------------------------------------------------------------

/// `bare_grpc`: the service's proto, answered at once; prints its address.
async fn bare_grpc_server() {
    struct Bare;

    #[tonic::async_trait]
    impl PasswordRecovery for Bare {
        async fn forgot_password(
            &self,
            _: tonic::Request<pb::ForgotPasswordRequest>,
        ) -> Result<tonic::Response<pb::ForgotPasswordResponse>, tonic::Status> {
            Ok(tonic::Response::new(pb::ForgotPasswordResponse {
                code_delivery_details: Some(pb::CodeDeliveryDetails {
                    destination: "b***@e***".into(),
                    delivery_medium: pb::DeliveryMedium::Email.into(),
                    attribute_name: "email".into(),
                }),
            }))
        }

        async fn confirm_forgot_password(
            &self,
            _: tonic::Request<pb::ConfirmForgotPasswordRequest>,
        ) -> Result<tonic::Response<pb::ConfirmForgotPasswordResponse>, tonic::Status> {
            Ok(tonic::Response::new(pb::ConfirmForgotPasswordResponse {}))
        }
    }

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!("{}", listener.local_addr().unwrap());
    tonic::transport::Server::builder()
        .add_service(PasswordRecoveryServer::new(Bare))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
        .await
        .unwrap();
}

/// `direct_sdk`: ForgotPassword through the AWS SDK, `CONCURRENCY` in flight for `RUN_MS`,
/// after a warm-up; prints one JSON line with its figures and its own CPU time.
async fn direct_sdk_caller() {
    use aws_config::BehaviorVersion;
    use aws_config::retry::RetryConfig;
    use aws_sdk_cognitoidentityprovider::Client;

    let setting = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} is set"));
    let concurrency: usize = setting("CONCURRENCY").parse().unwrap();
    let run = Duration::from_millis(setting("RUN_MS").parse().unwrap());
    let config = aws_config::defaults(BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .no_credentials()
        .retry_config(RetryConfig::disabled())
        .endpoint_url(setting("STANDIN_URL"))
        .load()
        .await;
    let client = Client::new(&config);
    let secret = secrecy::SecretString::from(CLIENT_SECRET);
    let run_id: u64 = rand::random();
    let call = move |_worker: usize, n: usize| {
        let username = format!("u{run_id:x}-{n}@example.com");
        let hash = password_recovery::cognito::secret_hash(&secret, &username, CLIENT_ID);
        let client = client.clone();
        async move {
            client
                .forgot_password()
                .client_id(CLIENT_ID)
                .username(username)
                .secret_hash(hash)
                .send()
                .await
                .expect("OK under load");
        }
    };
    if std::env::var("COUNTED_CALLS").is_ok() {
        let calls: usize = setting("COUNTED_CALLS").parse().unwrap();
        return counted_window(concurrency, calls, call).await;
    }
    let measured = measure(concurrency, run, std::process::id(), call).await;
    let report = json!({
        "calls": measured.calls,
        "elapsed_us": measured.elapsed.as_micros() as u64,
        "p50_us": measured.p50.as_micros() as u64,
        "p99_us": measured.p99.as_micros() as u64,
        "cpu_us": measured.cpu.as_micros() as u64,
        "switches": measured.switches,
    });
    println!("{report}");
}

// ---- Instructions and system calls per call ----------------------------------------------

/// What is counted over a window of calls: instructions (callgrind, the process run under
/// valgrind) or system calls (perf's tracepoints, the process run natively).
enum Counter {
    Instructions { dir: std::path::PathBuf },
    Syscalls,
}

/// The system calls broken out by name; the total counts every one.
const SYSCALLS: [&str; 8] = [
    "write",
    "writev",
    "sendto",
    "recvfrom",
    "read",
    "epoll_wait",
    "futex",
    "getrandom",
];

/// A count in progress: callgrind's (its counters were zeroed; it dumps to `dir`), or perf's.
enum Counting<'a> {
    Instructions { dir: &'a std::path::Path },
    Syscalls(Box<Perf>),
}

impl Counter {
    fn command(&self, program: &str) -> Command {
        match self {
            Counter::Instructions { dir } => {
                let mut command = Command::new("valgrind");
                command.args([
                    "-q",
                    "--tool=callgrind",
                    "--vgdb=yes",
                    "--compress-strings=no",
                    &format!("--callgrind-out-file={}/callgrind.%p", dir.display()),
                    program,
                ]);
                command
            }
            Counter::Syscalls => Command::new(program),
        }
    }

    async fn start(&self, pid: u32) -> Counting<'_> {
        match self {
            Counter::Instructions { dir } => {
                callgrind(pid, "--zero").await;
                Counting::Instructions { dir }
            }
            Counter::Syscalls => Counting::Syscalls(Box::new(Perf::enabled(pid).await)),
        }
    }
}

impl Counting<'_> {
    /// The counts since the start, per call: the total first, then any breakdown.
    async fn stop(self, pid: u32) -> Vec<(String, f64)> {
        let per_call = |count: u64| count as f64 / INSTRUCTION_CALLS as f64;
        match self {
            Counting::Instructions { dir } => {
                vec![("instructions".into(), per_call(dumped(dir, pid).await))]
            }
            Counting::Syscalls(perf) => perf
                .finish()
                .await
                .into_iter()
                .map(|(name, count)| (name, per_call(count)))
                .collect(),
        }
    }
}

/// The counts per call of each process under test over `INSTRUCTION_CALLS` calls at
/// `INSTRUCTION_CONCURRENCY` in flight, after `WARM_UP_CALLS`.
async fn counted(
    counter: &Counter,
    binary: &str,
    standin: &str,
) -> Vec<(&'static str, Vec<(String, f64)>)> {
    let mut counted = Vec::new();
    for (name, extra) in [
        ("service", &[][..]),
        // `app` at info still says where it serves; the calls' lines and audit events go.
        ("service_warn", &[("RUST_LOG", WARN)][..]),
    ] {
        let service = Service::start_as(counter.command(binary), standin, extra).await;
        fixed_load(&service.addr, INSTRUCTION_CONCURRENCY, WARM_UP_CALLS).await;
        let counting = counter.start(service.pid).await;
        fixed_load(&service.addr, INSTRUCTION_CONCURRENCY, INSTRUCTION_CALLS).await;
        counted.push((name, counting.stop(service.pid).await));
        service.stop().await;
    }

    let me = std::env::current_exe().unwrap();
    let mut bare = counter.command(me.to_str().unwrap());
    bare.env("BENCH_ROLE", "bare_grpc");
    let mut bare = Helper::spawn(bare).await;
    let addr = bare.first_line.clone();
    fixed_load(&addr, INSTRUCTION_CONCURRENCY, WARM_UP_CALLS).await;
    let counting = counter.start(bare.pid).await;
    fixed_load(&addr, INSTRUCTION_CONCURRENCY, INSTRUCTION_CALLS).await;
    counted.push(("bare_grpc", counting.stop(bare.pid).await));
    bare.child.kill().await.ok();

    // The SDK caller calls by itself: it says when it is warm and when its window is done.
    let mut sdk = counter.command(me.to_str().unwrap());
    sdk.env("BENCH_ROLE", "direct_sdk")
        .env("STANDIN_URL", standin)
        .env("CONCURRENCY", INSTRUCTION_CONCURRENCY.to_string())
        .env("RUN_MS", "0")
        .env("COUNTED_CALLS", INSTRUCTION_CALLS.to_string());
    let mut sdk = Helper::spawn(sdk).await;
    assert_eq!(sdk.first_line, "warm");
    let counting = counter.start(sdk.pid).await;
    sdk.say("go").await;
    assert_eq!(sdk.next_line().await, "done");
    counted.push(("direct_sdk", counting.stop(sdk.pid).await));
    sdk.say("exit").await;
    let _ = sdk.child.wait().await;
    counted
}

/// Instructions per call of each process under test, counted by callgrind.
async fn instructions(binary: &str, standin: &str) -> Vec<(&'static str, u64)> {
    // `BENCH_CALLGRIND_DIR` keeps the dumps there, for `callgrind_annotate`.
    let temporary = tempfile::tempdir().unwrap();
    let kept = std::env::var_os("BENCH_CALLGRIND_DIR").map(std::path::PathBuf::from);
    let dir = kept.unwrap_or_else(|| temporary.path().to_owned());
    counted(&Counter::Instructions { dir }, binary, standin)
        .await
        .into_iter()
        .map(|(name, counts)| (name, counts[0].1 as u64))
        .collect()
}

/// System calls per call of each process under test, counted by perf.
async fn syscalls(binary: &str, standin: &str) -> Vec<(&'static str, Vec<(String, f64)>)> {
    counted(&Counter::Syscalls, binary, standin).await
}

/// `perf stat` attached to a process's threads, counting the system calls they enter while
/// enabled (through its control FIFO, which acknowledges each command).
struct Perf {
    child: Child,
    ctl: tokio::net::unix::pipe::Sender,
    ack: BufReader<tokio::net::unix::pipe::Receiver>,
    out: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Perf {
    /// Attaches to `pid` (the threads it has now) and starts counting.
    async fn enabled(pid: u32) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (ctl, ack, out) = (
            dir.path().join("ctl"),
            dir.path().join("ack"),
            dir.path().join("counts.csv"),
        );
        for fifo in [&ctl, &ack] {
            let path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
            // SAFETY: mkfifo(3) on a NUL-terminated path in our own temporary directory.
            assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
        }
        // Opened read-write, a FIFO's end never waits for the other's: perf failing to start
        // cannot hang the bench (its acknowledgements are awaited with a timeout).
        let mut fifo = tokio::net::unix::pipe::OpenOptions::new();
        fifo.read_write(true);
        let ack_end = BufReader::new(fifo.open_receiver(&ack).unwrap());
        let ctl_end = fifo.open_sender(&ctl).unwrap();
        let events = std::iter::once("raw_syscalls:sys_enter".to_owned())
            .chain(
                SYSCALLS
                    .iter()
                    .map(|name| format!("syscalls:sys_enter_{name}")),
            )
            .collect::<Vec<_>>()
            .join(",");
        let child = Command::new("perf")
            .args(["stat", "--delay=-1", "-x,", "--no-big-num"])
            .arg(format!(
                "--control=fifo:{},{}",
                ctl.display(),
                ack.display()
            ))
            .arg("-o")
            .arg(&out)
            .args(["-e", &events, "-p", &pid.to_string()])
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("perf runs: apt-get install linux-perf");
        let mut perf = Self {
            child,
            ctl: ctl_end,
            ack: ack_end,
            out,
            _dir: dir,
        };
        // Acknowledged once perf has attached to every thread and switched the counters on.
        perf.command("enable").await;
        perf
    }

    /// Sends `command` and waits for perf's acknowledgement.
    async fn command(&mut self, command: &str) {
        use tokio::io::AsyncWriteExt;
        self.ctl
            .write_all(format!("{command}\n").as_bytes())
            .await
            .unwrap();
        let mut acked = String::new();
        let read = tokio::time::timeout(Duration::from_secs(30), self.ack.read_line(&mut acked));
        if !matches!(read.await, Ok(Ok(_))) {
            use tokio::io::AsyncReadExt;
            self.child.start_kill().ok();
            let mut said = String::new();
            if let Some(mut stderr) = self.child.stderr.take() {
                stderr.read_to_string(&mut said).await.ok();
            }
            panic!(
                "perf did not acknowledge {command}: {said} (its tracepoints need root, or \
                 tracefs readable and kernel.perf_event_paranoid at -1)"
            );
        }
        // perf writes its C string's NUL too: "ack\n\0".
        let acked = acked.trim_matches(|c: char| c == '\0' || c.is_whitespace());
        assert_eq!(acked, "ack", "perf acknowledges {command}");
    }

    /// Stops counting and returns the total, then each of `SYSCALLS`.
    async fn finish(mut self) -> Vec<(String, u64)> {
        self.command("disable").await;
        // SAFETY: kill(2) on our own child's pid; perf prints its counts on SIGINT.
        unsafe { libc::kill(self.child.id().unwrap() as i32, libc::SIGINT) };
        // It exits non-zero after SIGINT: its counts say whether it ran.
        let said = self.child.wait_with_output().await.unwrap().stderr;
        let csv = std::fs::read_to_string(&self.out).unwrap_or_default();
        let csv = format!("{csv}{}", String::from_utf8_lossy(&said));
        let count = |event: &str| {
            csv.lines()
                .map(|line| line.split(',').collect::<Vec<_>>())
                .find(|fields| fields.get(2) == Some(&event))
                .map(|fields| {
                    let count = fields[0].parse();
                    count.unwrap_or_else(|_| panic!("perf did not count {event}: {csv}"))
                })
                .unwrap_or_else(|| panic!("perf counted {event}: {csv}"))
        };
        std::iter::once(("all".to_owned(), count("raw_syscalls:sys_enter")))
            .chain(SYSCALLS.iter().map(|name| {
                (
                    (*name).to_owned(),
                    count(&format!("syscalls:sys_enter_{name}")),
                )
            }))
            .collect()
    }
}

/// The system calls a thread makes to wait (for its sockets, for another thread): how many
/// depends on how the threads happened to meet, where the others follow from the calls.
const WAITS: [&str; 2] = ["epoll_wait", "futex"];

fn print_syscalls(counted: &[(&str, Vec<(String, f64)>)]) {
    println!(
        "system calls per call (perf, {INSTRUCTION_CALLS} calls at {INSTRUCTION_CONCURRENCY} in \
         flight after {WARM_UP_CALLS}, every thread of the process):"
    );
    for (name, counts) in counted {
        let named: Vec<String> = counts[1..]
            .iter()
            .filter(|(_, n)| *n >= 0.005)
            .map(|(syscall, n)| format!("{syscall} {n:.2}"))
            .collect();
        println!("  {name:<14} {:>6.2}   {}", counts[0].1, named.join(", "));
    }
    // Every one but the waits, which the direct SDK caller's own load generator adds to.
    let of = |name: &str| {
        counted
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(0.0, |(_, counts)| {
                let waits: f64 = counts[1..]
                    .iter()
                    .filter(|(syscall, _)| WAITS.contains(&syscall.as_str()))
                    .map(|(_, n)| n)
                    .sum();
                counts[0].1 - waits
            })
    };
    let floor = of("direct_sdk") + of("bare_grpc");
    println!(
        "but the waits ({}): service {:.2}, at warn {:.2}, direct SDK + bare hop {floor:.2}: \
         {:.2}× and {:.2}×",
        WAITS.join(", "),
        of("service"),
        of("service_warn"),
        of("service") / floor,
        of("service_warn") / floor,
    );
}

fn print_instructions(counted: &[(&str, u64)]) {
    let of = |name: &str| {
        counted
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(0, |(_, c)| *c)
    };
    println!(
        "instructions per call (callgrind, {INSTRUCTION_CALLS} calls at {INSTRUCTION_CONCURRENCY} \
         in flight after {WARM_UP_CALLS}, every thread of the process):"
    );
    for (name, count) in counted {
        println!("  {name:<14} {:>8.1}k", *count as f64 / 1e3);
    }
    let floor = (of("direct_sdk") + of("bare_grpc")) as f64;
    println!(
        "service / (direct SDK + bare hop): {:.2}× at the default log level, {:.2}× at warn",
        of("service") as f64 / floor,
        of("service_warn") as f64 / floor,
    );
}

/// Exactly `calls` ForgotPassword calls on `addr`, `concurrency` in flight.
async fn fixed_load(addr: &str, concurrency: usize, calls: usize) {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connects");
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let run_id: u64 = rand::random::<u64>() | 1 << 63;
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let mut client = PasswordRecoveryClient::new(channel.clone());
            let next = next.clone();
            tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if n >= calls {
                        break;
                    }
                    let request = pb::ForgotPasswordRequest {
                        username: format!("u{run_id:x}-{n:06}@example.com"),
                        ..Default::default()
                    };
                    client
                        .forgot_password(request)
                        .await
                        .expect("OK under load");
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.unwrap();
    }
}

/// The SDK caller's counted window: `WARM_UP_CALLS`, "warm", then on "go" `calls` calls,
/// "done", and on "exit" the end.
async fn counted_window<F, Fut>(concurrency: usize, calls: usize, call: F)
where
    F: Fn(usize, usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let run = |offset: usize, calls: usize| {
        let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let workers: Vec<_> = (0..concurrency)
            .map(|worker| {
                let (call, next) = (call.clone(), next.clone());
                tokio::spawn(async move {
                    loop {
                        let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if n >= calls {
                            break;
                        }
                        call(worker, offset + n).await;
                    }
                })
            })
            .collect::<Vec<_>>();
        async move {
            for worker in workers {
                worker.await.unwrap();
            }
        }
    };
    let told = |word: &'static str| async move {
        let line = tokio::task::spawn_blocking(|| {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line).map(|_| line)
        });
        assert_eq!(line.await.unwrap().unwrap().trim(), word);
    };
    run(0, WARM_UP_CALLS).await;
    println!("warm");
    told("go").await;
    run(WARM_UP_CALLS, calls).await;
    println!("done");
    told("exit").await;
}

/// `callgrind_control <action> <pid>`.
async fn callgrind(pid: u32, action: &str) {
    let output = Command::new("callgrind_control")
        .args([action, &pid.to_string()])
        .output()
        .await
        .expect("callgrind_control (valgrind) runs: apt-get install valgrind");
    // It exits 0 when it finds no callgrind run too: only "sending command" says it was sent.
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success() && said.contains("sending command"),
        "callgrind_control {action} {pid}: {said}"
    );
}

/// Dumps `pid`'s counters and returns the instructions counted since they were zeroed.
async fn dumped(dir: &std::path::Path, pid: u32) -> u64 {
    callgrind(pid, "--dump").await;
    let file = dir.join(format!("callgrind.{pid}.1"));
    for _ in 0..600 {
        if let Ok(text) = std::fs::read_to_string(&file)
            && let Some(total) = text.lines().find_map(|l| l.strip_prefix("summary:"))
        {
            return total.trim().parse().unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no callgrind dump at {}", file.display());
}
