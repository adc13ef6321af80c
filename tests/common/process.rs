//! The real `password-recovery` binary as a child process, with a clean environment (no AWS
//! credentials, no profile, no instance-metadata lookups), its JSON log lines followed.

use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use password_recovery::proto::v1::password_recovery_client::PasswordRecoveryClient;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tonic::transport::Channel;

/// The binary under test.
pub const BINARY: &str = env!("CARGO_BIN_EXE_password-recovery");

/// The release build of the binary, for measurements; `make test` builds it first.
pub const RELEASE_BINARY: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/target/release/password-recovery"
);

/// The binary with only `vars` (and a throw-away HOME) in its environment.
pub fn command(vars: &[(&str, &str)]) -> Command {
    command_for(BINARY, vars)
}

/// `binary` with only `vars` (and a throw-away HOME) in its environment.
pub fn command_for(binary: &str, vars: &[(&str, &str)]) -> Command {
    let home = std::env::temp_dir().join("password-recovery-test-home");
    std::fs::create_dir_all(&home).unwrap();
    let mut command = match std::env::var_os("PASSWORD_RECOVERY_PROFILE_DIR") {
        // `make symbol-order` profiles the release build under the memory tests' loads.
        Some(dir) if binary == RELEASE_BINARY => {
            let mut under = Command::new("valgrind");
            under
                .args(["--tool=callgrind", "--demangle=no", "--dump-instr=no"])
                // Killed at a test's end, it keeps what the last dump holds.
                .arg("--dump-every-bb=1000000")
                .arg({
                    let mut out = std::ffi::OsString::from("--callgrind-out-file=");
                    out.push(dir);
                    out.push("/callgrind.%p");
                    out
                })
                .arg(binary);
            under
        }
        _ => Command::new(binary),
    };
    command
        .env_clear()
        .env("HOME", home)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .envs(vars.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// A running service process.
pub struct ServiceProcess {
    child: Child,
    lines: Vec<String>,
    /// Lines before this index were looked at by `wait_for_line`.
    matched: usize,
    incoming: mpsc::UnboundedReceiver<String>,
    /// `127.0.0.1:PORT`, where it serves gRPC.
    pub target: String,
    /// `127.0.0.1:PORT`, where it serves `/metrics`.
    pub metrics_addr: String,
}

impl ServiceProcess {
    /// Starts the binary on a free loopback port with `vars` and waits until it serves.
    pub async fn start(vars: &[(&str, &str)]) -> Self {
        Self::start_binary(BINARY, vars).await
    }

    /// Starts the binary as the test app client (`CLIENT_ID`, `CLIENT_SECRET`) against
    /// `cognito`, with `extra` settings.
    pub async fn against(cognito: &super::FakeCognito, extra: &[(&str, &str)]) -> Self {
        let mut vars = vec![
            ("COGNITO_CLIENT_ID", super::CLIENT_ID),
            ("COGNITO_CLIENT_SECRET", super::CLIENT_SECRET),
            ("AWS_REGION", "us-east-1"),
            ("AWS_ENDPOINT_URL", cognito.url.as_str()),
        ];
        vars.extend_from_slice(extra);
        Self::start(&vars).await
    }

    /// Starts the release build; fails, saying how to build it, when it is missing.
    pub async fn start_release(vars: &[(&str, &str)]) -> Self {
        assert!(
            std::path::Path::new(RELEASE_BINARY).exists(),
            "{RELEASE_BINARY} is missing: run `cargo build --release --locked` (make test does)"
        );
        Self::start_binary(RELEASE_BINARY, vars).await
    }

    /// Starts `binary` like [`Self::start`].
    pub async fn start_binary(binary: &str, vars: &[(&str, &str)]) -> Self {
        let mut vars = vars.to_vec();
        vars.push(("GRPC_LISTEN_ADDR", "127.0.0.1:0"));
        vars.push(("HEALTH_LISTEN_ADDR", "127.0.0.1:0"));
        if !vars.iter().any(|(name, _)| *name == "METRICS_LISTEN_ADDR") {
            vars.push(("METRICS_LISTEN_ADDR", "127.0.0.1:0"));
        }
        let mut child = command_for(binary, &vars)
            .spawn()
            .expect("the binary starts");
        let mut reader = BufReader::new(child.stdout.take().unwrap()).lines();
        let (send, incoming) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(line)) = reader.next_line().await {
                let _ = send.send(line);
            }
        });
        let mut process = Self {
            child,
            lines: Vec::new(),
            matched: 0,
            incoming,
            target: String::new(),
            metrics_addr: String::new(),
        };
        process.target = process.serving_addr().await;
        process
    }

    async fn serving_addr(&mut self) -> String {
        let wait = async {
            while let Some(line) = self.incoming.recv().await {
                let entry: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|_| panic!("log lines are JSON: {line}"));
                self.lines.push(line);
                if entry["message"] == "serving gRPC" {
                    self.metrics_addr = entry["metrics_addr"].as_str().unwrap().to_owned();
                    return entry["addr"].as_str().unwrap().to_owned();
                }
            }
            let mut stderr = String::new();
            let _ = self
                .child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut stderr)
                .await;
            panic!("exited before serving: {:?} {stderr}", self.lines);
        };
        tokio::time::timeout(Duration::from_secs(30), wait)
            .await
            .expect("serves within 30 s")
    }

    /// A PasswordRecovery client connected to it.
    pub async fn client(&self) -> PasswordRecoveryClient<Channel> {
        PasswordRecoveryClient::connect(format!("http://{}", self.target))
            .await
            .expect("connects")
    }

    /// Scrapes `/metrics` and returns the Prometheus text.
    pub async fn scrape(&self) -> String {
        super::scrape(&self.metrics_addr).await
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("still running")
    }

    /// Its resident memory now and at its peak (VmRSS, VmHWM), in bytes.
    pub fn memory(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("/proc/PID/status is readable");
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .unwrap_or_else(|| panic!("{name} in /proc/PID/status"))
                * 1024
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// Sends `signal` (e.g. `TERM`, `INT`) to the process.
    pub fn signal(&self, signal: &str) {
        let sent = std::process::Command::new("kill")
            .args([format!("-{signal}"), self.pid().to_string()])
            .status()
            .expect("kill runs");
        assert!(sent.success(), "SIG{signal} not delivered");
    }

    /// Waits (at most 30 s) for the next log line that `matches` (start-up's lines included),
    /// and returns it; a line is matched at most once.
    pub async fn wait_for_line(&mut self, matches: impl Fn(&Value) -> bool) -> Value {
        while self.matched < self.lines.len() {
            self.matched += 1;
            let entry: Value =
                serde_json::from_str(&self.lines[self.matched - 1]).expect("JSON log line");
            if matches(&entry) {
                return entry;
            }
        }
        let wait = async {
            while let Some(line) = self.incoming.recv().await {
                self.matched = self.lines.len() + 1;
                self.lines.push(line.clone());
                let entry: Value = serde_json::from_str(&line).expect("JSON log line");
                if matches(&entry) {
                    return entry;
                }
            }
            panic!("the process ended first: {:#?}", self.lines);
        };
        tokio::time::timeout(Duration::from_secs(30), wait)
            .await
            .expect("the log line within 30 s")
    }

    /// Scrapes until the series `name` with `labels` has a value that `reached` accepts (at
    /// most 30 s): a signal from the process itself.
    pub async fn wait_for_metric(
        &self,
        name: &str,
        labels: &[&str],
        reached: impl Fn(f64) -> bool,
    ) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let metrics = self.scrape().await;
            if super::metric(&metrics, name, labels).is_some_and(&reached) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name} {labels:?} never reached the value awaited: {metrics}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Sends SIGTERM and returns the exit status, every stdout line and stderr.
    pub async fn terminate(self) -> (ExitStatus, Vec<String>, String) {
        self.signal("TERM");
        self.exited().await
    }

    /// Waits (at most 30 s) for the process to exit; returns its status, every stdout line
    /// and stderr.
    pub async fn exited(mut self) -> (ExitStatus, Vec<String>, String) {
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("exits within 30 s")
            .unwrap();
        while let Some(line) = self.incoming.recv().await {
            self.lines.push(line);
        }
        let mut stderr = String::new();
        self.child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .await
            .unwrap();
        (status, self.lines, stderr)
    }
}
