//! Limits shared by every replica, on Redis (`RATE_LIMIT_REDIS_URL`, [`crate::fleet`]): the
//! same GCRA with the same settings, run atomically by one Lua script (`gcra.lua`, after
//! go-redis/redis_rate) on the server's clock, one round trip per call for both limiters. Keys
//! are the prefix, the limiter, and for the per-username limit a keyed hash of the user pool
//! and normalised username (never the username; both RPCs share it); each expires when its
//! bucket is full again.
//!
//! Redis never fails a call: while it fails, the call is judged by the in-process limits. A
//! replica remembers a username's denial until its retry time, without asking Redis again.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use redis::Script;
use secrecy::ExposeSecret;

use super::{Limiter, Verdict};
use crate::domain::PoolUser;
use crate::fleet::{Backend, RedisSettings};
use crate::privacy::UsernameHasher;

/// Charges buckets (`gcra.lua`).
static GCRA: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("gcra.lua")));
/// Empties a bucket (`exhaust.lua`).
static EXHAUST: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("exhaust.lua")));
/// How long emptying a bucket is tried for while Redis gives no answer.
const EXHAUST_WITHIN: Duration = Duration::from_secs(5);
/// Denials remembered at most (a full memo forgets the expired ones, else remembers no more).
const MAX_REMEMBERED: usize = 100_000;

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
    backend: Arc<Backend>,
    keys: UsernameHasher,
    denials: Mutex<HashMap<String, Instant>>,
}

impl std::fmt::Debug for SharedLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedLimits")
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

impl SharedLimits {
    /// Limits on `backend`, the Redis of `settings`.
    pub(crate) fn new(backend: Arc<Backend>, settings: &RedisSettings) -> Self {
        Self {
            backend,
            keys: UsernameHasher::derived(
                settings.username_hash_key.expose_secret(),
                "password-recovery/rate-limit-keys",
            ),
            denials: Mutex::new(HashMap::new()),
        }
    }

    /// The key of the global limiter.
    pub(crate) fn global_key(&self) -> String {
        format!("{}global", self.backend.prefix)
    }

    /// The key of the caller `name`'s bucket: a digest of the name, so every key is short.
    pub(crate) fn caller_key(&self, name: &str) -> String {
        use sha2::Digest;
        self.backend
            .key("caller", &sha2::Sha256::digest(name.as_bytes()))
    }

    /// The key of `user`'s bucket (both RPCs share it): a keyed hash, never the username.
    pub(crate) fn username_key(&self, user: PoolUser<'_>) -> String {
        self.backend.key("username", &self.keys.digest(user))
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
        let mut invocation = GCRA.prepare_invoke();
        for bucket in buckets {
            invocation
                .key(&bucket.key)
                .arg(bucket.interval_us.max(1))
                .arg(bucket.burst);
        }
        match self
            .backend
            .invoke::<(usize, u64)>(&invocation)
            .await
            .ok()?
        {
            (0, _) => Some(Verdict::Admitted),
            (index, wait_us) if index <= buckets.len() => {
                let limiter = buckets[index - 1].limiter;
                Some(Verdict::Refused(limiter, Duration::from_micros(wait_us)))
            }
            _ => {
                self.backend.unexpected_answer();
                None
            }
        }
    }

    /// Empties `bucket` on Redis, in the background (a failure only means the other replicas
    /// keep admitting the user until Cognito refuses).
    pub(crate) fn exhaust(&self, bucket: Bucket) {
        let mut invocation = EXHAUST.prepare_invoke();
        invocation
            .key(&bucket.key)
            .arg(bucket.interval_us.max(1))
            .arg(bucket.burst);
        self.backend.spawn(invocation, EXHAUST_WITHIN);
    }
}
