//! Abuse limits and load shedding, applied before Cognito: a global rate limit that keeps this
//! replica under its share of Cognito's account-wide quota, a per-username limit (one bucket per
//! normalised username of a user pool, shared by both RPCs) against inbox flooding and code
//! guessing, and a bound on calls waiting on Cognito at once.
//!
//! Both limiters are one GCRA ([`gcra`]): one bucket for the global limit; for the
//! per-username one, a compact table ([`UsernameTable`]) from a keyed 64-bit hash of (user
//! pool, normalised username) to the bucket's theoretical arrival time. A bucket leaves the table only when it is full
//! again, so nothing is ever forgiven; when the table is full of live buckets, a *new* username
//! is refused (`username_capacity`) rather than forgetting anyone else.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::num::{NonZeroU32, NonZeroUsize};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

mod gcra;
mod shared;

use crate::domain::PoolUser;
pub(crate) use gcra::Bucket;
use gcra::Gcra;

use crate::callers::CallerLimit;
use crate::fleet::RedisSettings;
pub(crate) use shared::SharedLimits;

/// Rate-limited calls, by `limiter`.
pub(crate) const RATE_LIMITED: &str = "rate_limited_total";
/// Per-username buckets held.
pub(crate) const USERNAME_BUCKETS: &str = "rate_limit_username_buckets";

/// A full table is swept for buckets that are full again at most this often, so a flood of new
/// usernames against a full table cannot turn every call into a sweep.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// A full table is logged at warn at most this often.
const CAPACITY_WARN_INTERVAL: Duration = Duration::from_secs(60);
/// Calls refused before reaching Cognito, by `reason`.
pub(crate) const UPSTREAM_REJECTED: &str = "upstream_rejected_total";

/// How long an overloaded replica asks callers to wait.
pub(crate) const OVERLOAD_RETRY_DELAY: Duration = Duration::from_millis(500);

/// `N/D`: a burst of `N` calls, refilled at one every `D/N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateSpec {
    /// The burst.
    pub(crate) burst: NonZeroU32,
    /// The time in which the whole burst refills.
    pub(crate) period: Duration,
}

impl RateSpec {
    /// One call's share of the period: the GCRA emission interval.
    pub(crate) fn interval(self) -> Duration {
        self.period / self.burst.get()
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
    /// This limit per username, both RPCs together.
    Limit(RateSpec),
}

impl FromStr for UsernameRateLimit {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value {
            "off" => Ok(Self::Off),
            limit => limit.parse().map(Self::Limit).map_err(|problem: String| {
                match problem.starts_with("expected") {
                    true => format!("{problem} or off"),
                    false => problem,
                }
            }),
        }
    }
}

impl FromStr for RateSpec {
    type Err = String;

    /// `N/DURATION`, e.g. `5/15m`.
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let (burst, period) = value
            .split_once('/')
            .ok_or("expected N/DURATION (e.g. 5/15m)")?;
        let burst = burst
            .parse::<NonZeroU32>()
            .map_err(|_| format!("{burst:?} is not a positive whole number"))?;
        let period = crate::settings::parse_duration(period)?;
        if period < Duration::from_nanos(u64::from(burst.get())) {
            return Err("the period is too short for the burst".into());
        }
        Ok(Self { burst, period })
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
pub(crate) enum Limiter {
    /// A caller's own `rate_limit` in `CALLERS_FILE`.
    Caller,
    /// `GLOBAL_RATE_LIMIT_RPS`.
    Global,
    /// `USERNAME_RATE_LIMIT`.
    Username,
    /// `USERNAME_RATE_LIMIT_MAX_KEYS`: the table is full of live buckets.
    UsernameCapacity,
}

impl Limiter {
    /// Every limiter.
    pub(crate) const ALL: [Self; 4] = [
        Self::Caller,
        Self::Global,
        Self::Username,
        Self::UsernameCapacity,
    ];

    /// The name in metrics, ErrorInfo metadata and QuotaFailure.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Caller => "caller",
            Self::Global => "global",
            Self::Username => "username",
            Self::UsernameCapacity => "username_capacity",
        }
    }
}

/// A call refused by a limiter: which, its limit, and when a retry can pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RateLimited {
    /// The limiter.
    pub(crate) limiter: Limiter,
    /// Its limit, e.g. `5/15m`.
    pub(crate) limit: String,
    /// How long until a call would pass.
    pub(crate) retry_after: Duration,
}

/// The per-username GCRA buckets: a keyed 64-bit hash of (user pool, normalised username) to the
/// bucket's theoretical arrival time (TAT, nanoseconds since the table was made). The key is
/// SipHash under a random per-process key, so callers can neither read usernames back nor
/// aim collisions at a victim. Each bucket costs about 36 bytes of memory.
pub(crate) struct UsernameTable {
    spec: RateSpec,
    gcra: Gcra,
    capacity: usize,
    keys: RandomState,
    epoch: Instant,
    state: Mutex<TableState>,
    /// Nanoseconds since `epoch` of the last capacity warning, plus one (0: never).
    warned: AtomicU64,
}

struct TableState {
    buckets: HashMap<u64, u64>,
    /// No bucket is full again before this (a lower bound: buckets only get later).
    earliest_full: u64,
    /// When the table was last swept, plus one (0: never).
    swept: u64,
}

/// What the limits decided for one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Admitted and charged.
    Admitted,
    /// Refused by this limiter: a call passes after this long. The per-username table refuses
    /// as `Username` (the bucket has no token) or `UsernameCapacity` (a new username, and the
    /// table is full of live buckets).
    Refused(Limiter, Duration),
}

impl UsernameTable {
    /// A table for `spec` holding at most `capacity` buckets.
    pub(crate) fn new(spec: RateSpec, capacity: NonZeroUsize) -> Self {
        Self {
            spec,
            gcra: Gcra::new(spec),
            capacity: capacity.get(),
            keys: RandomState::new(),
            epoch: Instant::now(),
            state: Mutex::new(TableState {
                buckets: HashMap::new(),
                earliest_full: u64::MAX,
                swept: 0,
            }),
            warned: AtomicU64::new(0),
        }
    }

    /// At most this many buckets.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// The limit of every bucket.
    pub(crate) fn spec(&self) -> RateSpec {
        self.spec
    }

    fn key(&self, user: PoolUser<'_>) -> u64 {
        self.keys.hash_one(user.key())
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Charges `user`'s bucket, making it if the table has room.
    pub(crate) fn check(&self, user: PoolUser<'_>) -> Verdict {
        let key = self.key(user);
        self.check_key(key, self.now())
    }

    /// Empties `user`'s bucket (making it if the table has room), as a spent burst leaves it:
    /// its next call waits one emission interval.
    pub(crate) fn exhaust(&self, user: PoolUser<'_>) {
        let key = self.key(user);
        let now = self.now();
        let empty = self.gcra.emptied(now);
        let mut guard = self.state.lock().expect("rate-limit lock");
        let state = &mut *guard;
        let has_room = state.buckets.len() < self.capacity || state.sweep(now);
        let new_bucket = match state.buckets.get_mut(&key) {
            Some(tat) => {
                *tat = (*tat).max(empty);
                false
            }
            None if has_room => state.buckets.insert(key, empty).is_none(),
            None => false,
        };
        state.earliest_full = state.earliest_full.min(empty);
        let buckets = state.buckets.len();
        drop(guard);
        if new_bucket {
            metrics::gauge!(USERNAME_BUCKETS).set(buckets as f64);
        }
    }

    fn check_key(&self, key: u64, now: u64) -> Verdict {
        let mut guard = self.state.lock().expect("rate-limit lock");
        let state = &mut *guard;
        let tat = match state.buckets.get(&key).copied() {
            Some(tat) => tat,
            None if state.buckets.len() >= self.capacity && !state.sweep(now) => {
                let wait = state.earliest_full.saturating_sub(now).max(1_000_000_000);
                drop(guard);
                self.warn_full(now);
                let wait = Duration::from_nanos(wait);
                return Verdict::Refused(Limiter::UsernameCapacity, wait);
            }
            None => now,
        };
        let new_tat = match self.gcra.charge(tat, now) {
            Ok(new_tat) => new_tat,
            Err(wait) => return Verdict::Refused(Limiter::Username, wait),
        };
        let new_bucket = state.buckets.insert(key, new_tat).is_none();
        state.earliest_full = state.earliest_full.min(new_tat);
        let buckets = state.buckets.len();
        drop(guard);
        // Only a new bucket changes the count; the gauge is set outside the lock.
        if new_bucket {
            metrics::gauge!(USERNAME_BUCKETS).set(buckets as f64);
        }
        Verdict::Admitted
    }

    fn warn_full(&self, now: u64) {
        let last = self.warned.load(Ordering::Relaxed);
        let due =
            last == 0 || now.saturating_sub(last - 1) >= CAPACITY_WARN_INTERVAL.as_nanos() as u64;
        if due
            && self
                .warned
                .compare_exchange(last, now + 1, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                capacity = self.capacity,
                "USERNAME_RATE_LIMIT_MAX_KEYS reached: every bucket is live, so calls for new \
                 usernames are refused (username_capacity) until buckets refill"
            );
        }
    }

    /// How many buckets it holds.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.state.lock().expect("rate-limit lock").buckets.len()
    }
}

impl TableState {
    /// Drops the buckets that are full again; true when that made room. Sweeps only when some
    /// bucket can be full again, and at most once per [`SWEEP_INTERVAL`].
    fn sweep(&mut self, now: u64) -> bool {
        let interval = SWEEP_INTERVAL.as_nanos() as u64;
        if now < self.earliest_full || (self.swept != 0 && now - (self.swept - 1) < interval) {
            return false;
        }
        let before = self.buckets.len();
        self.buckets.retain(|_, tat| *tat > now);
        self.earliest_full = self.buckets.values().copied().min().unwrap_or(u64::MAX);
        self.swept = now + 1;
        metrics::gauge!(USERNAME_BUCKETS).set(self.buckets.len() as f64);
        self.buckets.len() < before
    }
}

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
    /// Fleet-wide limits on Redis; `None`: this replica's own.
    pub redis: Option<RedisSettings>,
}

/// Every limit a call passes before Cognito.
pub(crate) struct Limits {
    global: Option<(gcra::Bucket, NonZeroU32, String)>,
    username: Option<(UsernameTable, String)>,
    /// On Redis when configured: the in-process limiters then judge only while it fails.
    shared: Option<SharedLimits>,
    upstream: Arc<Semaphore>,
}

impl fmt::Debug for Limits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Limits")
            .field("global", &self.global.as_ref().map(|(_, _, limit)| limit))
            .field("username", &self.username.as_ref().map(|(_, limit)| limit))
            .finish_non_exhaustive()
    }
}

impl Limits {
    /// Limits as `settings` says.
    pub(crate) fn new(settings: &LimitSettings) -> Self {
        let global = settings.global_rps.map(|rps| {
            let spec = RateSpec {
                burst: rps,
                period: Duration::from_secs(1),
            };
            (gcra::Bucket::new(spec), rps, format!("{rps}/1s"))
        });
        let username = match settings.username {
            UsernameRateLimit::Off => None,
            UsernameRateLimit::Limit(spec) => Some((
                UsernameTable::new(spec, settings.username_max_keys),
                spec.to_string(),
            )),
        };
        Self {
            global,
            username,
            shared: None,
            upstream: Arc::new(Semaphore::new(settings.max_concurrent_upstream.get())),
        }
    }

    /// These limits, enforced fleet-wide on `shared`.
    pub(crate) fn with_shared(mut self, shared: SharedLimits) -> Self {
        self.shared = Some(shared);
        self
    }

    /// Charges the limits, fleet-wide on Redis when configured and answering, else this
    /// replica's own.
    /// The caller's own limit (`caller`), when it has one, is charged first.
    pub(crate) async fn admit(
        &self,
        caller: Option<&CallerLimit>,
        user: PoolUser<'_>,
    ) -> Result<(), RateLimited> {
        if let Some(shared) = &self.shared {
            // None: Redis is unavailable, and this replica's own limits judge.
            if let Some(verdict) = self.check_shared(shared, caller, user).await {
                return verdict;
            }
        }
        if let Some(caller) = caller {
            caller
                .bucket
                .charge()
                .map_err(|wait| refused(Limiter::Caller, &caller.limit, wait))?;
        }
        self.check(user)
    }

    /// The per-username limit's refusal of `user`, its bucket emptied first (on Redis too,
    /// when it is shared): what a call is answered when Cognito's own per-user attempt limit
    /// refused it, under enumeration protection, so that it is the refusal this limit gives
    /// (with the wait it would give just after a spent burst). `None` when there is no
    /// per-username limit.
    pub(crate) fn exhaust(&self, user: PoolUser<'_>) -> Option<RateLimited> {
        let (table, limit) = self.username.as_ref()?;
        table.exhaust(user);
        let wait = match table.check(user) {
            Verdict::Refused(_, wait) => wait,
            Verdict::Admitted => table.spec().interval(),
        };
        if let Some(shared) = &self.shared {
            let key = shared.username_key(user);
            shared.remember_denial(&key, wait);
            shared.exhaust(shared::Bucket {
                limiter: Limiter::Username,
                key,
                interval_us: u64::try_from(table.spec().interval().as_micros()).unwrap_or(u64::MAX),
                burst: table.spec().burst.get(),
            });
        }
        Some(refused(Limiter::Username, limit, wait))
    }

    async fn check_shared(
        &self,
        shared: &SharedLimits,
        caller: Option<&CallerLimit>,
        user: PoolUser<'_>,
    ) -> Option<Result<(), RateLimited>> {
        let username = self
            .username
            .as_ref()
            .map(|(table, limit)| (table.spec(), shared.username_key(user), limit));
        if let Some((_, key, limit)) = &username
            && let Some(wait) = shared.remembered_denial(key)
        {
            return Some(Err(refused(Limiter::Username, limit, wait)));
        }
        let mut buckets = Vec::with_capacity(3);
        let mut limits = Vec::with_capacity(3);
        if let Some(caller) = caller {
            buckets.push(shared::Bucket {
                limiter: Limiter::Caller,
                key: shared.caller_key(&caller.name),
                interval_us: u64::try_from(caller.spec.interval().as_micros()).unwrap_or(u64::MAX),
                burst: caller.spec.burst.get(),
            });
            limits.push(caller.limit.as_str());
        }
        if let Some((_, rps, limit)) = &self.global {
            buckets.push(shared::Bucket {
                limiter: Limiter::Global,
                key: shared.global_key(),
                interval_us: 1_000_000 / u64::from(rps.get()),
                burst: rps.get(),
            });
            limits.push(limit.as_str());
        }
        if let Some((spec, key, limit)) = username {
            buckets.push(shared::Bucket {
                limiter: Limiter::Username,
                key,
                interval_us: u64::try_from(spec.interval().as_micros()).unwrap_or(u64::MAX),
                burst: spec.burst.get(),
            });
            limits.push(limit.as_str());
        }
        if buckets.is_empty() {
            return Some(Ok(()));
        }
        // None: Redis did not answer in time or failed.
        match shared.check(&buckets).await? {
            Verdict::Admitted => Some(Ok(())),
            Verdict::Refused(limiter, wait) => {
                let index = buckets.iter().position(|b| b.limiter == limiter)?;
                if limiter == Limiter::Username {
                    shared.remember_denial(&buckets[index].key, wait);
                }
                Some(Err(refused(limiter, limits[index], wait)))
            }
        }
    }

    /// Charges the global limiter, then the per-username one; the first that refuses decides.
    pub(crate) fn check(&self, user: PoolUser<'_>) -> Result<(), RateLimited> {
        if let Some((bucket, _, limit)) = &self.global {
            bucket
                .charge()
                .map_err(|wait| refused(Limiter::Global, limit, wait))?;
        }
        if let Some((table, limit)) = &self.username {
            match table.check(user) {
                Verdict::Admitted => {}
                Verdict::Refused(Limiter::UsernameCapacity, wait) => {
                    let capacity = format!("{} usernames", table.capacity());
                    return Err(refused(Limiter::UsernameCapacity, &capacity, wait));
                }
                Verdict::Refused(limiter, wait) => return Err(refused(limiter, limit, wait)),
            }
        }
        Ok(())
    }

    /// A place among the calls waiting on Cognito, or `None` when all are taken: the caller
    /// is refused at once rather than queued.
    pub(crate) fn upstream_permit(&self) -> Option<OwnedSemaphorePermit> {
        let permit = self.upstream.clone().try_acquire_owned().ok();
        if permit.is_none() {
            metrics::counter!(UPSTREAM_REJECTED, "reason" => "overloaded").increment(1);
        }
        permit
    }
}

fn refused(limiter: Limiter, limit: &str, retry_after: Duration) -> RateLimited {
    metrics::counter!(RATE_LIMITED, "limiter" => limiter.name()).increment(1);
    RateLimited {
        limiter,
        limit: limit.to_owned(),
        retry_after,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Username;

    fn user(name: &str) -> Username {
        Username::parse("username", name.to_owned()).unwrap()
    }

    fn settings(username: &str, global_rps: u32) -> LimitSettings {
        LimitSettings {
            username: username.parse().unwrap(),
            username_max_keys: NonZeroUsize::new(100).unwrap(),
            global_rps: NonZeroU32::new(global_rps),
            max_concurrent_upstream: NonZeroUsize::new(2).unwrap(),
            redis: None,
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
            limits.check(PoolUser::new(None, &user("alice"))).unwrap();
        }
        let refused = limits
            .check(PoolUser::new(None, &user("alice")))
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
    fn both_rpcs_share_a_bucket_and_it_is_case_insensitive() {
        let limits = Limits::new(&settings("2/1h", 0));
        limits
            .check(PoolUser::new(None, &user("Ünïcode@Example.com")))
            .unwrap();
        limits
            .check(PoolUser::new(None, &user("ünïcode@example.COM")))
            .unwrap();
        assert!(
            limits
                .check(PoolUser::new(None, &user("ünïcode@example.com")))
                .is_err(),
            "a ForgotPassword and a ConfirmForgotPassword spend one budget"
        );
        limits
            .check(PoolUser::new(None, &user("someone-else")))
            .unwrap();
    }

    #[test]
    fn exhausting_a_bucket_refuses_as_the_limit_would_with_a_true_wait() {
        let limits = Limits::new(&settings("5/6h", 0));
        let bob = user("bob");
        limits.check(PoolUser::new(None, &bob)).unwrap();

        let refused = limits.exhaust(PoolUser::new(None, &bob)).expect("a limit");

        assert_eq!(refused.limiter, Limiter::Username);
        assert_eq!(refused.limit, "5/6h");
        // As just after a spent burst: one interval, less the moment since.
        assert!(refused.retry_after <= Duration::from_secs(4320));
        assert!(
            refused.retry_after > Duration::from_secs(4319),
            "{refused:?}"
        );
        let next = limits.check(PoolUser::new(None, &bob)).unwrap_err();
        assert_eq!(
            (next.limiter, next.limit.as_str()),
            (Limiter::Username, "5/6h")
        );
        assert!(next.retry_after > Duration::from_secs(4319), "{next:?}");
        // Someone else's bucket is untouched.
        limits.check(PoolUser::new(None, &user("carol"))).unwrap();
        assert!(
            Limits::new(&settings("off", 0))
                .exhaust(PoolUser::new(None, &bob))
                .is_none()
        );
    }

    #[test]
    fn a_user_has_one_bucket_per_pool_whatever_the_client() {
        let limits = Limits::new(&settings("1/1h", 0));
        let alice = user("alice");
        let in_pool = |pool| PoolUser::new(pool, &alice);
        limits.check(in_pool(Some("eu-west-1_A"))).unwrap();
        assert!(
            limits.check(in_pool(Some("eu-west-1_A"))).is_err(),
            "another client of the same pool shares the bucket"
        );
        limits
            .check(in_pool(Some("eu-west-1_B")))
            .expect("another pool's alice is another user");
    }

    #[test]
    fn the_global_limit_is_charged_first() {
        let limits = Limits::new(&settings("off", 2));
        limits.check(PoolUser::new(None, &user("a"))).unwrap();
        limits.check(PoolUser::new(None, &user("b"))).unwrap();
        let refused = limits.check(PoolUser::new(None, &user("c"))).unwrap_err();
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

    fn table(limit: &str, capacity: usize) -> UsernameTable {
        let UsernameRateLimit::Limit(spec) = limit.parse().unwrap() else {
            panic!("a limit");
        };
        UsernameTable::new(spec, NonZeroUsize::new(capacity).unwrap())
    }

    const MINUTE: u64 = 60_000_000_000;

    #[test]
    fn a_flood_of_new_usernames_never_forgives_a_spent_bucket() {
        let table = table("5/15m", 1000);
        let victim = 1u64;
        for _ in 0..5 {
            assert_eq!(table.check_key(victim, MINUTE), Verdict::Admitted);
        }
        assert!(matches!(
            table.check_key(victim, MINUTE),
            Verdict::Refused(Limiter::Username, _)
        ));

        let mut at_capacity = 0;
        for flood in 2..20_000u64 {
            match table.check_key(flood, MINUTE + flood) {
                Verdict::Admitted => {}
                Verdict::Refused(Limiter::UsernameCapacity, wait) => {
                    at_capacity += 1;
                    assert!(wait >= Duration::from_secs(1), "{wait:?}");
                }
                Verdict::Refused(..) => panic!("a new username is never limited"),
            }
        }

        assert_eq!(table.len(), 1000);
        assert_eq!(at_capacity, 20_000 - 2 - 999);
        let Verdict::Refused(Limiter::Username, wait) = table.check_key(victim, MINUTE + 20_000)
        else {
            panic!("the victim's bucket was forgiven");
        };
        assert!(wait > Duration::from_secs(179), "{wait:?}");
    }

    #[test]
    fn buckets_leave_only_when_full_again() {
        let table = table("1/1m", 2);
        assert_eq!(table.check_key(1, MINUTE), Verdict::Admitted);
        assert_eq!(table.check_key(2, MINUTE + MINUTE / 2), Verdict::Admitted);
        // Bucket 1 is full again after one minute, bucket 2 after 1.5.
        assert!(matches!(
            table.check_key(3, MINUTE + MINUTE / 2 + 1),
            Verdict::Refused(Limiter::UsernameCapacity, _)
        ));
        assert_eq!(table.check_key(3, 2 * MINUTE + 1), Verdict::Admitted);
        assert_eq!(table.len(), 2);
        assert!(matches!(
            table.check_key(2, 2 * MINUTE + 2),
            Verdict::Refused(Limiter::Username, _)
        ));
    }

    #[test]
    fn a_million_usernames_fit_the_default_bound_within_its_budget() {
        const BUCKETS: u64 = 1_000_000;
        let table = table("5/15m", BUCKETS as usize);
        let rss_before = resident_kib();

        for key in 0..BUCKETS {
            let key = key.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            assert_eq!(table.check_key(key, MINUTE), Verdict::Admitted);
        }

        let grown_kib = resident_kib().saturating_sub(rss_before);
        assert_eq!(table.len(), BUCKETS as usize);
        println!("{BUCKETS} per-username buckets: RSS grew {grown_kib} KiB");
        assert!(
            grown_kib < 40 * 1024,
            "the README's budget is 40 MiB for 1000000 buckets; grew {grown_kib} KiB"
        );
    }

    /// The process's resident set size: the test cannot judge without it, so it fails.
    fn resident_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status")
            .expect("/proc/self/status: the memory test needs Linux's procfs");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .filter(|kib| *kib > 0)
            .expect("VmRSS in /proc/self/status")
    }
}
