//! Limits shared by every replica, on Redis (`RATE_LIMIT_REDIS_URL`): the same GCRA with the
//! same settings, run atomically by one Lua script (`gcra.lua`, after go-redis/redis_rate) on
//! the server's clock, one round trip per call for both limiters. Keys are the prefix, the
//! limiter, and for the per-username limit a keyed hash of the user pool and normalised
//! username (never the username; both RPCs share it); each expires when its bucket is full
//! again.
//!
//! Redis never fails a call: on an error or a timeout the call is judged by the in-process
//! limits, Redis is skipped for a backoff period, then probed again; a warn line marks each
//! change of state. A replica remembers a username's denial until its retry time, without
//! asking Redis again. Start-up does not wait for Redis: one multiplexed connection is made in
//! the background and reconnects by itself.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ConnectionInfo, IntoConnectionInfo, Script};
use secrecy::{ExposeSecret, SecretSlice, SecretString};

use super::{Limiter, Verdict};
use crate::domain::PoolUser;
use crate::privacy::UsernameHasher;
use crate::settings::SettingError;

/// Calls judged by Redis, by outcome, and its latency.
pub(crate) const BACKEND_SECONDS: &str = "rate_limit_backend_seconds";
/// 1 while Redis answers, 0 while the in-process limits stand in.
pub(crate) const BACKEND_UP: &str = "rate_limit_backend_up";
/// Redis failures, by `kind` (`timeout`, `unconnected`: not connected yet, `error`).
pub(crate) const BACKEND_ERRORS: &str = "rate_limit_backend_errors_total";

/// The first backoff after a failure; each further failure doubles it, up to the maximum.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Denials remembered at most (a full memo forgets the expired ones, else remembers no more).
const MAX_REMEMBERED: usize = 100_000;

/// `RATE_LIMIT_REDIS_*`.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// `redis://host:port/db` or `rediss://…`, without credentials (a username may be there).
    pub(crate) url: RedisUrl,
    /// `RATE_LIMIT_REDIS_PASSWORD_FILE`'s secret.
    pub(crate) password: Option<SecretString>,
    /// Prefix of every key.
    pub(crate) prefix: String,
    /// How long one round trip may take before the in-process limits judge the call.
    pub(crate) timeout: Duration,
    /// `USERNAME_HASH_KEY_FILE`'s key, which the keys of username buckets derive from, so
    /// every replica names a bucket alike.
    pub(crate) username_hash_key: SecretSlice<u8>,
}

/// The URL of `RATE_LIMIT_REDIS_URL`, checked once: its scheme, and no password in it.
#[derive(Debug, Clone)]
pub struct RedisUrl(ConnectionInfo);

impl RedisUrl {
    /// Parses and checks `url`; the problem, never quoting the URL, when it is unusable.
    pub(crate) fn parse(url: &str) -> Result<Self, &'static str> {
        if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
            return Err("must start with redis:// or rediss://");
        }
        let info = url
            .into_connection_info()
            .map_err(|_| "is not a valid Redis URL")?;
        if info.redis_settings().password().is_some() {
            return Err("must not hold a password: put it in RATE_LIMIT_REDIS_PASSWORD_FILE");
        }
        Ok(Self(info))
    }
}

/// One limiter as the script sees it.
#[derive(Debug, Clone)]
pub(crate) struct Bucket {
    /// The limiter it is.
    pub(crate) limiter: Limiter,
    /// The key.
    pub(crate) key: String,
    /// One call's share of the period, in microseconds.
    pub(crate) interval_us: u64,
    /// The burst.
    pub(crate) burst: u32,
}

/// The fleet-wide limits on Redis.
pub(crate) struct SharedLimits {
    connection: Arc<OnceLock<ConnectionManager>>,
    script: Script,
    /// Empties a bucket (`exhaust.lua`).
    exhaust_script: Script,
    prefix: String,
    timeout: Duration,
    keys: UsernameHasher,
    epoch: Instant,
    /// Nanoseconds since `epoch` before which Redis is not asked (a failure's backoff).
    skip_until: AtomicU64,
    backoff: Mutex<Duration>,
    up: AtomicBool,
    denials: Mutex<HashMap<String, Instant>>,
}

impl std::fmt::Debug for SharedLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedLimits")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl SharedLimits {
    /// Limits on the Redis of `settings`; connects in the background.
    pub(crate) fn start(settings: &RedisSettings) -> Result<Self, SettingError> {
        let mut info = settings.url.0.clone();
        if let Some(password) = &settings.password {
            let redis = info
                .redis_settings()
                .clone()
                .set_password(password.expose_secret());
            info = info.set_redis_settings(redis);
        }
        let client = redis::Client::open(info)
            .map_err(|e| SettingError::new("RATE_LIMIT_REDIS_URL", e.to_string()))?;
        let connection = Arc::new(OnceLock::new());
        tokio::spawn(connect(client, connection.clone()));
        metrics::gauge!(BACKEND_UP).set(0.0);
        Ok(Self {
            connection,
            script: Script::new(include_str!("gcra.lua")),
            exhaust_script: Script::new(include_str!("exhaust.lua")),
            prefix: settings.prefix.clone(),
            timeout: settings.timeout,
            keys: UsernameHasher::derived(
                settings.username_hash_key.expose_secret(),
                "password-recovery/rate-limit-keys",
            ),
            epoch: Instant::now(),
            skip_until: AtomicU64::new(0),
            backoff: Mutex::new(FIRST_BACKOFF),
            up: AtomicBool::new(false),
            denials: Mutex::new(HashMap::new()),
        })
    }

    /// The key of the global limiter.
    pub(crate) fn global_key(&self) -> String {
        format!("{}global", self.prefix)
    }

    /// The key of the caller `name`'s bucket: a digest of the name, so every key is short.
    pub(crate) fn caller_key(&self, name: &str) -> String {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(name.as_bytes());
        let hash: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        format!("{}caller:{hash}", self.prefix)
    }

    /// The key of `user`'s bucket (both RPCs share it): a keyed hash, never the username.
    pub(crate) fn username_key(&self, user: PoolUser<'_>) -> String {
        let digest = self.keys.digest(user);
        let hash: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        format!("{}username:{hash}", self.prefix)
    }

    /// How long `key` was refused for, if this replica remembers a denial still in force.
    pub(crate) fn remembered_denial(&self, key: &str) -> Option<Duration> {
        let denials = self.denials.lock().expect("denials lock");
        let until = *denials.get(key)?;
        until.checked_duration_since(Instant::now())
    }

    /// Remembers that `key` is refused for `wait`.
    pub(crate) fn remember_denial(&self, key: &str, wait: Duration) {
        let now = Instant::now();
        let mut denials = self.denials.lock().expect("denials lock");
        if denials.len() >= MAX_REMEMBERED {
            denials.retain(|_, until| *until > now);
            if denials.len() >= MAX_REMEMBERED {
                return;
            }
        }
        denials.insert(key.to_owned(), now + wait);
    }

    /// Charges `buckets` in order, atomically, on Redis; `None` when Redis did not answer
    /// in time or failed (the in-process limits then judge).
    pub(crate) async fn check(&self, buckets: &[Bucket]) -> Option<Verdict> {
        let now = self.now();
        if now < self.skip_until.load(Ordering::Relaxed) {
            return None;
        }
        let Some(connection) = self.connection.get() else {
            // Still connecting: no backoff, so the connection is used as soon as it is made.
            metrics::counter!(BACKEND_ERRORS, "kind" => "unconnected").increment(1);
            return None;
        };
        let mut connection = connection.clone();
        let mut invocation = self.script.prepare_invoke();
        for bucket in buckets {
            invocation
                .key(&bucket.key)
                .arg(bucket.interval_us.max(1))
                .arg(bucket.burst);
        }
        let started = Instant::now();
        let answer = tokio::time::timeout(
            self.timeout,
            invocation.invoke_async::<(usize, u64)>(&mut connection),
        )
        .await;
        metrics::histogram!(BACKEND_SECONDS).record(started.elapsed().as_secs_f64());
        match answer {
            Ok(Ok((0, _))) => {
                self.answered();
                Some(Verdict::Admitted)
            }
            Ok(Ok((index, wait_us))) if index <= buckets.len() => {
                self.answered();
                let limiter = buckets[index - 1].limiter;
                Some(Verdict::Refused(limiter, Duration::from_micros(wait_us)))
            }
            Ok(Ok(_)) => {
                self.failed("error", "an answer the script cannot give");
                None
            }
            Ok(Err(err)) => {
                self.failed("error", &err.to_string());
                None
            }
            Err(_) => {
                self.failed("timeout", "no answer within RATE_LIMIT_REDIS_TIMEOUT");
                None
            }
        }
    }

    /// Empties `bucket` on Redis, in the background (within `RATE_LIMIT_REDIS_TIMEOUT`; a
    /// failure only means the other replicas keep admitting the user until Cognito refuses).
    pub(crate) fn exhaust(&self, bucket: Bucket) {
        let Some(connection) = self.connection.get() else {
            return;
        };
        let mut connection = connection.clone();
        let (script, timeout) = (self.exhaust_script.clone(), self.timeout);
        tokio::spawn(async move {
            let mut invocation = script.prepare_invoke();
            invocation
                .key(&bucket.key)
                .arg(bucket.interval_us.max(1))
                .arg(bucket.burst);
            let emptied =
                tokio::time::timeout(timeout, invocation.invoke_async::<i64>(&mut connection));
            if !matches!(emptied.await, Ok(Ok(_))) {
                metrics::counter!(BACKEND_ERRORS, "kind" => "error").increment(1);
            }
        });
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn answered(&self) {
        *self.backoff.lock().expect("backoff lock") = FIRST_BACKOFF;
        if !self.up.swap(true, Ordering::Relaxed) {
            metrics::gauge!(BACKEND_UP).set(1.0);
            tracing::warn!("rate-limit backend answers: limits are shared by the fleet again");
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
                "rate-limit backend failed: each replica's own limits judge calls until it \
                 answers again"
            );
        }
    }
}

/// Makes the one multiplexed connection, retrying until it succeeds; it then reconnects by
/// itself.
async fn connect(client: redis::Client, slot: Arc<OnceLock<ConnectionManager>>) {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_number_of_retries(2);
    let mut pause = FIRST_BACKOFF;
    loop {
        match ConnectionManager::new_with_config(client.clone(), config.clone()).await {
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
