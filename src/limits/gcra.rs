//! The one GCRA of this service (the generic cell rate algorithm, as in governor and
//! go-redis/redis_rate): a bucket is its theoretical arrival time (TAT); each call moves it one
//! emission interval later, and a bucket holds `burst` intervals. The per-username table keeps
//! one TAT per bucket, [`Bucket`] one for the global limit, and the Lua scripts on Redis
//! (`gcra.lua`, `exhaust.lua`) do the same arithmetic in microseconds.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::RateSpec;

/// A limit's GCRA, in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Gcra {
    /// One call's share of the period.
    interval: u64,
    /// How far ahead of now a bucket's TAT may be: the whole burst.
    tolerance: u64,
}

impl Gcra {
    pub(crate) fn new(spec: RateSpec) -> Self {
        let interval = u64::try_from(spec.interval().as_nanos()).unwrap_or(u64::MAX);
        Self {
            interval,
            tolerance: interval.saturating_mul(u64::from(spec.burst.get())),
        }
    }

    /// The TAT after one call at `now` on a bucket at `tat`, or how long until the call would
    /// pass when the bucket holds no token.
    pub(crate) fn charge(self, tat: u64, now: u64) -> Result<u64, Duration> {
        let new_tat = tat.max(now).saturating_add(self.interval);
        match new_tat - now > self.tolerance {
            true => Err(Duration::from_nanos(new_tat - now - self.tolerance)),
            false => Ok(new_tat),
        }
    }

    /// The TAT of a bucket emptied at `now`, as a spent burst leaves it.
    pub(crate) fn emptied(self, now: u64) -> u64 {
        now.saturating_add(self.tolerance)
    }
}

/// One bucket on its own (the global limit), safe to charge from every thread.
#[derive(Debug)]
pub(crate) struct Bucket {
    gcra: Gcra,
    epoch: Instant,
    /// Nanoseconds since `epoch`.
    tat: AtomicU64,
}

impl Bucket {
    /// A full bucket of `spec`.
    pub(crate) fn new(spec: RateSpec) -> Self {
        Self {
            gcra: Gcra::new(spec),
            epoch: Instant::now(),
            tat: AtomicU64::new(0),
        }
    }

    /// Charges one call; how long until one would pass when the bucket holds no token.
    pub(crate) fn charge(&self) -> Result<(), Duration> {
        let now = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let mut tat = self.tat.load(Ordering::Acquire);
        loop {
            let new_tat = self.gcra.charge(tat, now)?;
            match self
                .tat
                .compare_exchange_weak(tat, new_tat, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Ok(()),
                Err(current) => tat = current,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use super::*;

    fn gcra(burst: u32, period: Duration) -> Gcra {
        Gcra::new(RateSpec {
            burst: NonZeroU32::new(burst).unwrap(),
            period,
        })
    }

    #[test]
    fn a_burst_passes_then_one_call_per_interval() {
        let second = 1_000_000_000;
        let g = gcra(2, Duration::from_secs(2));
        let now = 10 * second;
        let tat = g.charge(0, now).unwrap();
        let tat = g.charge(tat, now).unwrap();
        assert_eq!(g.charge(tat, now), Err(Duration::from_secs(1)));
        assert_eq!(g.charge(tat, now + second), Ok(now + 3 * second));
        assert_eq!(g.emptied(now), now + 2 * second);
        assert_eq!(
            g.charge(g.emptied(now), now),
            Err(Duration::from_secs(1)),
            "an emptied bucket waits one interval"
        );
    }

    #[test]
    fn a_bucket_lets_its_burst_through_from_every_thread_and_no_more() {
        let bucket = std::sync::Arc::new(Bucket::new(RateSpec {
            burst: NonZeroU32::new(100).unwrap(),
            period: Duration::from_secs(3600),
        }));
        let passed: usize = (0..4)
            .map(|_| {
                let bucket = bucket.clone();
                std::thread::spawn(move || (0..50).filter(|_| bucket.charge().is_ok()).count())
            })
            .map(|thread| thread.join().unwrap())
            .sum();
        assert_eq!(passed, 100);
        let wait = bucket.charge().unwrap_err();
        assert!(wait > Duration::from_secs(35), "{wait:?}");
    }
}
