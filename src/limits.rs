//! Abuse limits and load shedding, applied before Cognito: a global rate limit that keeps this
//! replica under its share of Cognito's account-wide quota, a per-username limit (one bucket per
//! RPC per normalised username) against inbox flooding and code guessing, and a bound on calls
//! waiting on Cognito at once.
//!
//! Both limiters are governor's GCRA. The per-username state lives in an LRU map of bounded
//! size, so a flood of distinct usernames evicts the least recently seen ones instead of
//! growing memory.

use std::fmt;
use std::num::{NonZeroU32, NonZeroUsize};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::{InMemoryState, NotKeyed, StateStore};
use governor::{Quota, RateLimiter};
use lru::LruCache;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::domain::Username;

/// Rate-limited calls, by `limiter`.
pub const RATE_LIMITED: &str = "rate_limited_total";
/// Per-username buckets evicted to stay within the key bound.
pub const EVICTIONS: &str = "rate_limit_evictions_total";
/// Calls refused before reaching Cognito, by `reason`.
pub const UPSTREAM_REJECTED: &str = "upstream_rejected_total";

/// How long an overloaded replica asks callers to wait.
pub const OVERLOAD_RETRY_DELAY: Duration = Duration::from_millis(500);

/// `N/D`: a burst of `N` calls, refilled at one every `D/N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateSpec {
    /// The burst.
    pub burst: NonZeroU32,
    /// The time in which the whole burst refills.
    pub period: Duration,
}

impl RateSpec {
    fn quota(self) -> Quota {
        Quota::with_period(self.period / self.burst.get())
            .expect("a positive period")
            .allow_burst(self.burst)
    }
}

impl fmt::Display for RateSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}",
            self.burst,
            humantime::format_duration(self.period)
        )
    }
}

/// `USERNAME_RATE_LIMIT`: `N/D` (e.g. `5/15m`) or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsernameRateLimit {
    /// No per-username limit.
    Off,
    /// This limit per RPC per username.
    Limit(RateSpec),
}

impl FromStr for UsernameRateLimit {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        if value == "off" {
            return Ok(Self::Off);
        }
        let (burst, period) = value
            .split_once('/')
            .ok_or("expected N/DURATION (e.g. 5/15m) or off")?;
        let burst = burst
            .parse::<NonZeroU32>()
            .map_err(|_| format!("{burst:?} is not a positive whole number"))?;
        let period = crate::config::parse_duration(period)?;
        if period < Duration::from_nanos(u64::from(burst.get())) {
            return Err("the period is too short for the burst".into());
        }
        Ok(Self::Limit(RateSpec { burst, period }))
    }
}

impl fmt::Display for UsernameRateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Off => f.write_str("off"),
            Self::Limit(spec) => spec.fmt(f),
        }
    }
}

/// Which limiter refused a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limiter {
    /// `GLOBAL_RATE_LIMIT_RPS`.
    Global,
    /// `USERNAME_RATE_LIMIT`.
    Username,
}

impl Limiter {
    /// The name in metrics, ErrorInfo metadata and QuotaFailure.
    pub fn name(self) -> &'static str {
        match self {
            Self::Global => "global",
            Self::Username => "username",
        }
    }
}

/// A call refused by a limiter: which, its limit, and when a retry can pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimited {
    /// The limiter.
    pub limiter: Limiter,
    /// Its limit, e.g. `5/15m`.
    pub limit: String,
    /// How long until a call would pass.
    pub retry_after: Duration,
}

/// The RPC a per-username bucket belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rpc {
    /// ForgotPassword: bounds codes sent (inbox flooding).
    ForgotPassword,
    /// ConfirmForgotPassword: bounds code guesses.
    ConfirmForgotPassword,
}

type BucketKey = (Rpc, String);

/// GCRA state per key in an LRU map of at most `capacity` keys.
pub struct LruStateStore {
    buckets: Mutex<LruCache<BucketKey, Nanos>>,
    evictions: AtomicU64,
}

impl LruStateStore {
    /// A store holding at most `capacity` keys.
    pub fn new(capacity: NonZeroUsize) -> Self {
        Self {
            buckets: Mutex::new(LruCache::new(capacity)),
            evictions: AtomicU64::new(0),
        }
    }

    /// How many keys were evicted to stay within the bound.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    /// How many keys it holds.
    pub fn len(&self) -> usize {
        self.buckets.lock().expect("rate-limit lock").len()
    }

    /// True when it holds no key.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl StateStore for LruStateStore {
    type Key = BucketKey;

    fn measure_and_replace<T, F, E>(&self, key: &Self::Key, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let mut buckets = self.buckets.lock().expect("rate-limit lock");
        let (outcome, state) = f(buckets.get(key).copied())?;
        if let Some((evicted, _)) = buckets.push(key.clone(), state)
            && &evicted != key
        {
            self.evictions.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(EVICTIONS).increment(1);
        }
        Ok(outcome)
    }
}

type UsernameLimiter = RateLimiter<BucketKey, LruStateStore, DefaultClock, NoOpMiddleware>;
type GlobalLimiter = RateLimiter<NotKeyed, InMemoryState, DefaultClock, NoOpMiddleware>;

/// The settings of [`Limits`].
#[derive(Debug, Clone)]
pub struct LimitSettings {
    /// Per-username limit.
    pub username: UsernameRateLimit,
    /// At most this many per-username buckets.
    pub username_max_keys: NonZeroUsize,
    /// Calls per second for this replica; `None` is off.
    pub global_rps: Option<NonZeroU32>,
    /// Calls that may wait on Cognito at once.
    pub max_concurrent_upstream: NonZeroUsize,
}

/// Every limit a call passes before Cognito.
pub struct Limits {
    clock: DefaultClock,
    global: Option<(GlobalLimiter, String)>,
    username: Option<(UsernameLimiter, String)>,
    upstream: Arc<Semaphore>,
}

impl fmt::Debug for Limits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Limits")
            .field("global", &self.global.as_ref().map(|(_, limit)| limit))
            .field("username", &self.username.as_ref().map(|(_, limit)| limit))
            .finish_non_exhaustive()
    }
}

impl Limits {
    /// Limits as `settings` says.
    pub fn new(settings: &LimitSettings) -> Self {
        let clock = DefaultClock::default();
        let global = settings.global_rps.map(|rps| {
            let limiter = RateLimiter::direct_with_clock(Quota::per_second(rps), clock.clone());
            (limiter, format!("{rps}/1s"))
        });
        let username = match settings.username {
            UsernameRateLimit::Off => None,
            UsernameRateLimit::Limit(spec) => {
                let store = LruStateStore::new(settings.username_max_keys);
                let limiter = RateLimiter::new(spec.quota(), store, clock.clone());
                Some((limiter, spec.to_string()))
            }
        };
        Self {
            clock,
            global,
            username,
            upstream: Arc::new(Semaphore::new(settings.max_concurrent_upstream.get())),
        }
    }

    /// Charges the global limiter, then the per-username one; the first that refuses decides.
    pub fn check(&self, rpc: Rpc, username: &Username) -> Result<(), RateLimited> {
        if let Some((limiter, limit)) = &self.global {
            limiter
                .check()
                .map_err(|not_until| self.refused(Limiter::Global, limit, &not_until))?;
        }
        if let Some((limiter, limit)) = &self.username {
            let key = (rpc, username.normalised());
            limiter
                .check_key(&key)
                .map_err(|not_until| self.refused(Limiter::Username, limit, &not_until))?;
        }
        Ok(())
    }

    fn refused(
        &self,
        limiter: Limiter,
        limit: &str,
        not_until: &governor::NotUntil<<DefaultClock as Clock>::Instant>,
    ) -> RateLimited {
        metrics::counter!(RATE_LIMITED, "limiter" => limiter.name()).increment(1);
        RateLimited {
            limiter,
            limit: limit.to_owned(),
            retry_after: not_until.wait_time_from(self.clock.now()),
        }
    }

    /// A place among the calls waiting on Cognito, or `None` when all are taken: the caller
    /// is refused at once rather than queued.
    pub fn upstream_permit(&self) -> Option<OwnedSemaphorePermit> {
        let permit = self.upstream.clone().try_acquire_owned().ok();
        if permit.is_none() {
            metrics::counter!(UPSTREAM_REJECTED, "reason" => "overloaded").increment(1);
        }
        permit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str) -> Username {
        Username::parse("username", name.to_owned()).unwrap()
    }

    fn settings(username: &str, global_rps: u32) -> LimitSettings {
        LimitSettings {
            username: username.parse().unwrap(),
            username_max_keys: NonZeroUsize::new(100).unwrap(),
            global_rps: NonZeroU32::new(global_rps),
            max_concurrent_upstream: NonZeroUsize::new(2).unwrap(),
        }
    }

    #[test]
    fn username_rate_limit_parses_n_per_duration_or_off() {
        assert_eq!("off".parse(), Ok(UsernameRateLimit::Off));
        let UsernameRateLimit::Limit(spec) = "5/15m".parse().unwrap() else {
            panic!("a limit");
        };
        assert_eq!(spec.burst.get(), 5);
        assert_eq!(spec.period, Duration::from_secs(900));
        assert_eq!(spec.to_string(), "5/15m");
        for bad in ["", "5", "0/15m", "-1/15m", "5/15", "five/15m", "5/0s", "5/"] {
            assert!(bad.parse::<UsernameRateLimit>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_burst_passes_then_the_true_wait_is_one_refill() {
        let limits = Limits::new(&settings("5/15m", 0));
        for _ in 0..5 {
            limits.check(Rpc::ForgotPassword, &user("alice")).unwrap();
        }
        let refused = limits
            .check(Rpc::ForgotPassword, &user("alice"))
            .unwrap_err();
        assert_eq!(refused.limiter, Limiter::Username);
        assert_eq!(refused.limit, "5/15m");
        // One token every 15m / 5 = 3 minutes, less the moments the test took.
        assert!(refused.retry_after <= Duration::from_secs(180));
        assert!(
            refused.retry_after > Duration::from_secs(179),
            "{refused:?}"
        );
    }

    #[test]
    fn buckets_are_per_rpc_and_case_insensitive() {
        let limits = Limits::new(&settings("1/1h", 0));
        limits
            .check(Rpc::ForgotPassword, &user("Ünïcode@Example.com"))
            .unwrap();
        assert!(
            limits
                .check(Rpc::ForgotPassword, &user("ünïcode@example.COM"))
                .is_err()
        );
        limits
            .check(Rpc::ConfirmForgotPassword, &user("ünïcode@example.com"))
            .expect("another RPC has its own bucket");
        limits
            .check(Rpc::ForgotPassword, &user("someone-else"))
            .unwrap();
    }

    #[test]
    fn the_global_limit_is_charged_first() {
        let limits = Limits::new(&settings("off", 2));
        limits.check(Rpc::ForgotPassword, &user("a")).unwrap();
        limits
            .check(Rpc::ConfirmForgotPassword, &user("b"))
            .unwrap();
        let refused = limits.check(Rpc::ForgotPassword, &user("c")).unwrap_err();
        assert_eq!(refused.limiter, Limiter::Global);
        assert_eq!(refused.limit, "2/1s");
        assert!(refused.retry_after <= Duration::from_millis(500));
    }

    #[test]
    fn upstream_permits_are_refused_at_once_when_taken() {
        let limits = Limits::new(&settings("off", 0));
        let first = limits.upstream_permit().unwrap();
        let _second = limits.upstream_permit().unwrap();
        assert!(limits.upstream_permit().is_none());
        drop(first);
        assert!(limits.upstream_permit().is_some());
    }

    #[test]
    fn a_million_distinct_usernames_stay_within_the_key_bound() {
        const KEYS: usize = 100_000;
        const USERNAMES: usize = 1_000_000;
        let store = LruStateStore::new(NonZeroUsize::new(KEYS).unwrap());
        let touch = |key: &BucketKey| {
            store
                .measure_and_replace(key, |_| Ok::<_, ()>(((), Nanos::from(1u64))))
                .unwrap();
        };
        let rss_before = resident_kib();

        for i in 0..USERNAMES {
            touch(&(Rpc::ForgotPassword, format!("user-{i:07}@example.com")));
        }

        let rss_after = resident_kib();
        assert_eq!(store.len(), KEYS);
        assert_eq!(store.evictions(), (USERNAMES - KEYS) as u64);
        let buckets = store.buckets.lock().unwrap();
        let newest = (
            Rpc::ForgotPassword,
            format!("user-{:07}@example.com", USERNAMES - 1),
        );
        let oldest = (Rpc::ForgotPassword, "user-0000000@example.com".to_owned());
        assert!(buckets.contains(&newest) && !buckets.contains(&oldest));
        println!(
            "{USERNAMES} distinct usernames through a {KEYS}-key store: {} keys kept, RSS \
             {rss_before} KiB -> {rss_after} KiB",
            buckets.len()
        );
    }

    /// The process's resident set size, for the memory report.
    fn resident_kib() -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|status| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            })
            .unwrap_or(0)
    }
}
