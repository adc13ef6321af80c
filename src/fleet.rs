//! The fleet's shared state on Redis (`RATE_LIMIT_REDIS_URL`): one multiplexed connection and
//! one account of its health, used by the shared limits (`limits`) and the remembered outcomes
//! of retried calls (`idempotency`). Every key starts with `RATE_LIMIT_REDIS_PREFIX`: on one
//! server or primary (`RATE_LIMIT_REDIS_MODE=standalone`) as it is, on a Redis Cluster
//! (`cluster`) in braces, one hash tag, so that every script's keys share a slot; the cluster
//! client follows redirections, slot migrations and failovers.
//!
//! Redis never fails a call: on an error or a timeout the caller falls back to this replica's
//! own state, Redis is skipped for a backoff period, then probed again; a warn line marks each
//! change of state. Start-up does not wait for Redis: the connection is made in the background
//! and reconnects by itself.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use redis::RedisFuture;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::io::tcp::{TcpSettings, socket2};
use redis::{ConnectionInfo, FromRedisValue, IntoConnectionInfo, ScriptInvocation};
use secrecy::{ExposeSecret, SecretSlice, SecretString};

use crate::settings::SettingError;

/// Round trips to Redis, and their latency.
pub(crate) const BACKEND_SECONDS: &str = "rate_limit_backend_seconds";
/// 1 while Redis answers, 0 while each replica's own state stands in.
pub(crate) const BACKEND_UP: &str = "rate_limit_backend_up";
/// Redis failures, by `kind` (`timeout`, `unconnected`: not connected yet, `error`).
pub(crate) const BACKEND_ERRORS: &str = "rate_limit_backend_errors_total";

/// A background write that got no answer is tried again after this long, then each time
/// twice as long, up to the maximum.
const FIRST_WRITE_PAUSE: Duration = Duration::from_millis(100);
const MAX_WRITE_PAUSE: Duration = Duration::from_secs(1);

/// Why a round trip to Redis gave no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unanswered {
    /// Nothing was sent: Redis is backing off, or not connected yet.
    NotSent,
    /// It was sent and failed or timed out: the script may have run.
    MaybeRan,
}

/// How long making a connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long sent data may stay unacknowledged before a connection is given up (Linux).
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(5);

/// The first backoff after a failure; each further failure doubles it, up to the maximum.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What `RATE_LIMIT_REDIS_URL` names (`RATE_LIMIT_REDIS_MODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RedisMode {
    /// One server, or a primary.
    Standalone,
    /// One seed or configuration endpoint of a Redis Cluster (ElastiCache Serverless, or a
    /// node-based cluster with cluster mode on): the other nodes are discovered, redirections
    /// and failovers followed.
    Cluster,
}

/// `RATE_LIMIT_REDIS_*`.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// `redis://host:port/db` or `rediss://…`, without credentials (a username may be there).
    pub(crate) url: RedisUrl,
    /// Standalone or cluster.
    pub(crate) mode: RedisMode,
    /// `RATE_LIMIT_REDIS_PASSWORD_FILE`'s secret.
    pub(crate) password: Option<SecretString>,
    /// Prefix of every key.
    pub(crate) prefix: String,
    /// How long one round trip may take before this replica's own state decides.
    pub(crate) timeout: Duration,
    /// `USERNAME_HASH_KEY_FILE`'s key, which every key naming a user or a request derives
    /// from, so every replica names them alike.
    pub(crate) username_hash_key: SecretSlice<u8>,
}

/// The URL of `RATE_LIMIT_REDIS_URL`, checked once: its scheme, and no password in it.
#[derive(Debug, Clone)]
pub struct RedisUrl(ConnectionInfo);

impl RedisUrl {
    /// Parses and checks `url` for `mode`; the problem, never quoting the URL, when it is
    /// unusable.
    pub(crate) fn parse(url: &str, mode: RedisMode) -> Result<Self, &'static str> {
        if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
            return Err("must start with redis:// or rediss://");
        }
        let info = url
            .into_connection_info()
            .map_err(|_| "is not a valid Redis URL")?;
        if info.redis_settings().password().is_some() {
            return Err("must not hold a password: put it in RATE_LIMIT_REDIS_PASSWORD_FILE");
        }
        if mode == RedisMode::Cluster && info.redis_settings().db() != 0 {
            return Err(
                "must name database 0 (or none) with RATE_LIMIT_REDIS_MODE=cluster: \
                        Redis Cluster and ElastiCache serve only that one",
            );
        }
        Ok(Self(info))
    }
}

/// The connection to Redis and its health, shared by everything kept there.
pub(crate) struct Backend {
    connection: Arc<OnceLock<Connection>>,
    /// Prefix of every key.
    pub(crate) prefix: String,
    /// How long one round trip may take.
    pub(crate) timeout: Duration,
    epoch: Instant,
    /// Nanoseconds since `epoch` before which Redis is not asked (a failure's backoff).
    skip_until: AtomicU64,
    backoff: Mutex<Duration>,
    up: AtomicBool,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl Backend {
    /// The Redis of `settings`; connects in the background.
    pub(crate) fn start(settings: &RedisSettings) -> Result<Arc<Self>, SettingError> {
        let mut info = settings.url.0.clone();
        if let Some(password) = &settings.password {
            let redis = info
                .redis_settings()
                .clone()
                .set_password(password.expose_secret());
            info = info.set_redis_settings(redis);
        }
        // A node that goes silent without a reset (a lost host, a partition) is given up on
        // within seconds, not the kernel's quarter of an hour, in both modes.
        let tcp = TcpSettings::default()
            .set_nodelay(true)
            .set_keepalive(
                socket2::TcpKeepalive::new()
                    .with_time(Duration::from_secs(5))
                    .with_interval(Duration::from_secs(1)),
            )
            .set_user_timeout(TCP_USER_TIMEOUT);
        let info = info.set_tcp_settings(tcp.clone());
        let unusable =
            |e: redis::RedisError| SettingError::new("RATE_LIMIT_REDIS_URL", e.to_string());
        let client = match settings.mode {
            RedisMode::Standalone => {
                Client::Standalone(Box::new(redis::Client::open(info).map_err(unusable)?))
            }
            // The cluster's client reads the password from the seed's settings, and follows
            // MOVED and ASK, slot migrations and failovers itself.
            RedisMode::Cluster => Client::Cluster(Box::new(
                // Each node's own commands (its PING, CLUSTER SLOTS, SCRIPT LOAD) get at least
                // a second; one call at most RATE_LIMIT_REDIS_TIMEOUT in all. The retries
                // follow MOVED and ASK (and resend after a broken connection).
                ClusterClientBuilder::new([info])
                    .connection_timeout(CONNECT_TIMEOUT)
                    .response_timeout(settings.timeout.max(Duration::from_secs(1)))
                    .overall_response_timeout(Some(settings.timeout))
                    .retries(2)
                    .tcp_settings(tcp)
                    .build()
                    .map_err(unusable)?,
            )),
        };
        let connection = Arc::new(OnceLock::new());
        tokio::spawn(connect(client, connection.clone()));
        metrics::gauge!(BACKEND_UP).set(0.0);
        for kind in ["unconnected", "error", "timeout"] {
            metrics::counter!(BACKEND_ERRORS, "kind" => kind).increment(0);
        }
        // In a cluster, every key carries one hash tag: each script's keys share a slot.
        let prefix = match settings.mode {
            RedisMode::Standalone => settings.prefix.clone(),
            RedisMode::Cluster => format!("{{{}}}", settings.prefix),
        };
        Ok(Arc::new(Self {
            connection,
            prefix,
            timeout: settings.timeout,
            epoch: Instant::now(),
            skip_until: AtomicU64::new(0),
            backoff: Mutex::new(FIRST_BACKOFF),
            up: AtomicBool::new(false),
        }))
    }

    /// Runs `invocation` within `RATE_LIMIT_REDIS_TIMEOUT`, unless Redis is backing off; the
    /// failure counted when it gives no answer.
    pub(crate) async fn invoke<T: FromRedisValue>(
        &self,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<T, Unanswered> {
        if self.now() < self.skip_until.load(Ordering::Relaxed) {
            return Err(Unanswered::NotSent);
        }
        self.round_trip(invocation).await
    }

    /// Runs `invocation` in the background, for a write that is to land if it can: tried
    /// again while Redis gives no answer (it must be harmless to run twice), backoff or not,
    /// pausing 100 ms, then twice as long each time up to 1 s, until `within` has passed.
    pub(crate) fn spawn(self: &Arc<Self>, invocation: ScriptInvocation<'static>, within: Duration) {
        // No runtime (a call dropped as the process ends): the write is lost, as on a failure.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let backend = self.clone();
        let until = tokio::time::Instant::now() + within;
        runtime.spawn(async move {
            let mut pause = FIRST_WRITE_PAUSE;
            loop {
                match backend.round_trip::<i64>(&invocation).await {
                    Ok(_) | Err(Unanswered::NotSent) => return,
                    Err(Unanswered::MaybeRan) => {}
                }
                if tokio::time::Instant::now() + pause >= until {
                    return;
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(MAX_WRITE_PAUSE);
            }
        });
    }

    /// The key of `kind` for `digest`: the prefix, the kind, and the digest's first 16 bytes
    /// in hex.
    pub(crate) fn key(&self, kind: &str, digest: &[u8]) -> String {
        let hash: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
        format!("{}{kind}:{hash}", self.prefix)
    }

    /// One round trip, counted and timed, within `RATE_LIMIT_REDIS_TIMEOUT`.
    async fn round_trip<T: FromRedisValue>(
        &self,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<T, Unanswered> {
        let Some(mut connection) = self.connection() else {
            // Still connecting: no backoff, so the connection is used as soon as it is made.
            metrics::counter!(BACKEND_ERRORS, "kind" => "unconnected").increment(1);
            return Err(Unanswered::NotSent);
        };
        let started = Instant::now();
        let answer =
            tokio::time::timeout(self.timeout, invocation.invoke_async::<T>(&mut connection)).await;
        metrics::histogram!(BACKEND_SECONDS).record(started.elapsed().as_secs_f64());
        match answer {
            Ok(Ok(answer)) => {
                self.answered();
                Ok(answer)
            }
            Ok(Err(err)) => {
                self.failed("error", &err.to_string());
                Err(Unanswered::MaybeRan)
            }
            Err(_) => {
                self.failed("timeout", "no answer within RATE_LIMIT_REDIS_TIMEOUT");
                Err(Unanswered::MaybeRan)
            }
        }
    }

    /// Counts an answer no script of this service gives as a failure.
    pub(crate) fn unexpected_answer(&self) {
        self.failed("error", "an answer the script cannot give");
    }

    fn connection(&self) -> Option<Connection> {
        self.connection.get().cloned()
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn answered(&self) {
        *self.backoff.lock().expect("backoff lock") = FIRST_BACKOFF;
        if !self.up.swap(true, Ordering::Relaxed) {
            metrics::gauge!(BACKEND_UP).set(1.0);
            tracing::warn!(
                "rate-limit backend answers: limits and remembered retries are shared by the \
                 fleet again"
            );
        }
    }

    fn failed(&self, kind: &'static str, detail: &str) {
        metrics::counter!(BACKEND_ERRORS, "kind" => kind).increment(1);
        let backoff = {
            let mut backoff = self.backoff.lock().expect("backoff lock");
            let current = *backoff;
            *backoff = (current * 2).min(MAX_BACKOFF);
            current
        };
        let until = self.now() + u64::try_from(backoff.as_nanos()).unwrap_or(u64::MAX);
        self.skip_until.store(until, Ordering::Relaxed);
        if self.up.swap(false, Ordering::Relaxed) {
            metrics::gauge!(BACKEND_UP).set(0.0);
            tracing::warn!(
                kind,
                detail,
                retry_in = %humantime::format_duration(backoff),
                "rate-limit backend failed: each replica's own limits judge calls, and its own \
                 memory answers retries, until it answers again"
            );
        }
    }
}

/// How Redis is reached: one server, or a cluster.
enum Client {
    Standalone(Box<redis::Client>),
    Cluster(Box<ClusterClient>),
}

/// The one multiplexed connection: to one server (reconnecting by itself), or to a cluster
/// (one connection per node, redirections followed, reconnecting by itself).
#[derive(Clone)]
enum Connection {
    Standalone(ConnectionManager),
    Cluster(ClusterConnection),
}

impl redis::aio::ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> RedisFuture<'a, redis::Value> {
        match self {
            Self::Standalone(connection) => connection.req_packed_command(cmd),
            Self::Cluster(connection) => connection.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Self::Standalone(connection) => connection.req_packed_commands(pipeline, offset, count),
            Self::Cluster(connection) => connection.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Standalone(connection) => connection.get_db(),
            Self::Cluster(connection) => connection.get_db(),
        }
    }
}

impl Client {
    async fn connect(&self) -> redis::RedisResult<Connection> {
        match self {
            Self::Standalone(client) => {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_number_of_retries(2);
                ConnectionManager::new_with_config(client.as_ref().clone(), config)
                    .await
                    .map(Connection::Standalone)
            }
            Self::Cluster(client) => client.get_async_connection().await.map(Connection::Cluster),
        }
    }
}

/// Makes the one multiplexed connection, retrying until it succeeds; it then reconnects by
/// itself.
async fn connect(client: Client, slot: Arc<OnceLock<Connection>>) {
    let mut pause = FIRST_BACKOFF;
    loop {
        match client.connect().await {
            Ok(connection) => {
                let _ = slot.set(connection);
                tracing::info!("rate-limit backend connected");
                return;
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot connect to the rate-limit backend yet; in-process limits meanwhile");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(MAX_BACKOFF);
            }
        }
    }
}
