//! Idempotent calls (AIP-155, README "Retries"): a call with a `request_id` is remembered for
//! `IDEMPOTENCY_WINDOW` by (caller, user pool, RPC, request id), with a keyed hash of what it
//! asked; a retry is answered the first call's outcome, as that caller saw it, without a second
//! call to Cognito. A duplicate that arrives while the first is running waits for it. The same
//! id with another request is refused (`REQUEST_ID_REUSED`). Only outcomes Cognito decided are
//! remembered; a call refused here, or whose upstream outcome is unknown, is forgotten, so its
//! retry runs again. No username, code or password is stored: keys and fingerprints are keyed
//! hashes, answers are what the caller was sent. At most `IDEMPOTENCY_MAX_KEYS` are held.
//!
//! With Redis (`RATE_LIMIT_REDIS_URL`) the claim and the outcome are the fleet's too
//! ([`shared`]): a call first claims its request on this replica (so duplicates here wait for
//! it without asking Redis), then on Redis; a duplicate running on another replica is polled
//! for until its outcome or the caller's deadline.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

mod shared;

pub(crate) use shared::SharedOutcomes;
use shared::{FleetClaim, FleetRun};

use crate::domain::CodeDelivery;
use crate::error::Classified;
use crate::metrics as m;
use crate::privacy::HmacKey;
use crate::telemetry::Occasionally;

/// A full table is swept of expired outcomes at most this often.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// A duplicate running on another replica is polled for first after this long, then each
/// time twice as long, up to the maximum.
const FIRST_POLL: Duration = Duration::from_millis(20);
const MAX_POLL: Duration = Duration::from_millis(250);
/// A full table is logged at warn at most this often.
static FULL_WARNING: Occasionally = Occasionally::every(Duration::from_secs(60));

/// What a remembered call was answered, as its caller saw it.
#[derive(Debug, Clone)]
pub(crate) enum Remembered {
    /// ForgotPassword's delivery details (real or simulated).
    Delivery(CodeDelivery),
    /// ConfirmForgotPassword's success.
    Confirmed,
    /// The error it was answered.
    Failed(Box<Classified>),
}

/// The most of an answer remembered (its texts): a longer one (a long Lambda trigger message)
/// is not, so one remembered outcome holds at most about 2 KiB ([`crate::memory`]).
pub(crate) const MAX_ANSWER_BYTES: usize = 1024;

impl Remembered {
    /// About how many bytes of text it holds.
    fn text_bytes(&self) -> usize {
        match self {
            Self::Delivery(delivery) => delivery.destination.len() + delivery.attribute_name.len(),
            Self::Confirmed => 0,
            Self::Failed(error) => {
                let details = &error.details;
                let violations: usize = details.bad_request().map_or(0, |bad| {
                    bad.field_violations
                        .iter()
                        .map(|v| v.field.len() + v.description.len())
                        .sum()
                });
                let quota: usize = details.quota_failure().map_or(0, |quota| {
                    quota
                        .violations
                        .iter()
                        .map(|v| v.subject.len() + v.description.len())
                        .sum()
                });
                let info: usize = details.error_info().map_or(0, |info| {
                    info.metadata.iter().map(|(k, v)| k.len() + v.len()).sum()
                });
                error.message.len() + violations + quota + info
            }
        }
    }
}

/// A call's key and the fingerprint of its request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ticket {
    key: [u8; 32],
    fingerprint: [u8; 32],
}

enum Entry {
    /// The first call is running; its outcome, once decided, is sent here (`None`: forgotten).
    Running {
        fingerprint: [u8; 32],
        done: watch::Receiver<Option<Option<Arc<Remembered>>>>,
    },
    /// Decided, and remembered until `until`.
    Done {
        fingerprint: [u8; 32],
        until: Instant,
        answer: Arc<Remembered>,
    },
}

/// What a call with a `request_id` is to do.
pub(crate) enum Claimed {
    /// Run it, then [`Remembering::finish`] it.
    Run(Box<Remembering>),
    /// A call with the same id and request was answered this.
    Replay(Arc<Remembered>),
    /// The same id came with another request.
    Reused,
    /// The caller's deadline came while a call with the same id and request ran.
    TimedOut,
}

/// Where a running call's outcome will be remembered: here (unless the table was full) and
/// on Redis (unless it failed).
pub(crate) struct Remembering {
    here: Option<Running>,
    fleet: Option<FleetRun>,
}

impl Remembering {
    /// The call was answered `answer`: remembered when `Some` (Cognito decided it), else
    /// forgotten so that a retry runs again. Calls waiting for it are told either way.
    pub(crate) fn finish(self, answer: Option<Remembered>) {
        let answer = answer
            .filter(|answer| answer.text_bytes() <= MAX_ANSWER_BYTES)
            .map(Arc::new);
        if let Some(fleet) = self.fleet {
            fleet.finish(answer.as_deref());
        }
        if let Some(here) = self.here {
            let window = here.window;
            here.settle(answer, window);
        }
    }
}

/// What the table of this replica says of a call with a `request_id`.
enum Claim {
    /// It is the first: run it, then [`Running::finish`] it.
    First(Running),
    /// A call with the same id and request was answered this.
    Replay(Arc<Remembered>),
    /// A call with the same id and request is running: wait for its outcome.
    Wait(watch::Receiver<Option<Option<Arc<Remembered>>>>),
    /// The same id came with another request.
    Reused,
    /// Every place is held by a remembered outcome still in its window: run it unremembered.
    Full,
}

/// The remembered calls.
pub(crate) struct Idempotency {
    window: Duration,
    max_keys: usize,
    key: HmacKey,
    entries: Arc<Mutex<HashMap<[u8; 32], Entry>>>,
    /// When the full table was last swept of expired outcomes.
    swept: Mutex<Option<Instant>>,
    /// The fleet's, on Redis.
    fleet: Option<SharedOutcomes>,
}

impl std::fmt::Debug for Idempotency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idempotency")
            .field("window", &self.window)
            .field("max_keys", &self.max_keys)
            .field("fleet", &self.fleet)
            .finish_non_exhaustive()
    }
}

impl Idempotency {
    /// Calls remembered for `window`, at most `max_keys` of them, hashed under `key`.
    pub(crate) fn new(window: Duration, max_keys: usize, key: [u8; 32]) -> Self {
        Self {
            window,
            max_keys,
            key: HmacKey::new(&key),
            entries: Arc::new(Mutex::new(HashMap::new())),
            swept: Mutex::new(None),
            fleet: None,
        }
    }

    /// These outcomes, shared by the fleet on `fleet`.
    pub(crate) fn with_fleet(mut self, fleet: SharedOutcomes) -> Self {
        self.fleet = Some(fleet);
        self
    }

    /// The ticket of a call: its key from `who` (caller, user pool, RPC, request id), its
    /// fingerprint from `what` (everything it asks).
    pub(crate) fn ticket(&self, who: &[&[u8]], what: &[&[u8]]) -> Ticket {
        Ticket {
            key: self.key.mac_framed(who),
            fingerprint: self.key.mac_framed(what),
        }
    }

    /// What the call of `ticket` is to do: run (until `until` at most), or be answered at
    /// once; a duplicate still running is waited for until the caller's `deadline`.
    pub(crate) async fn claim(&self, ticket: Ticket, deadline: Instant, until: Instant) -> Claimed {
        loop {
            let here = match self.claim_here(ticket) {
                Claim::First(running) => Some(running),
                Claim::Full => None,
                Claim::Reused => return Claimed::Reused,
                Claim::Replay(answer) => return Claimed::Replay(answer),
                Claim::Wait(mut running) => {
                    let decided =
                        tokio::time::timeout_at(deadline, running.wait_for(Option::is_some));
                    match decided.await {
                        Err(_) => return Claimed::TimedOut,
                        Ok(Ok(decided)) => {
                            if let Some(answer) = decided.clone().flatten() {
                                return Claimed::Replay(answer);
                            }
                        }
                        Ok(Err(_)) => {}
                    }
                    // The earlier call was not remembered: this one runs, unless another
                    // claimed first.
                    continue;
                }
            };
            return match &self.fleet {
                Some(fleet) => self.claim_fleet(fleet, ticket, here, deadline, until).await,
                None => Claimed::Run(Box::new(Remembering { here, fleet: None })),
            };
        }
    }

    /// Claims `ticket` on Redis too, for the call that holds it `here`: a duplicate running on
    /// another replica is polled for until `deadline`, and so, while Redis gives no answer, is
    /// one seen running until its claim expires.
    async fn claim_fleet(
        &self,
        fleet: &SharedOutcomes,
        ticket: Ticket,
        here: Option<Running>,
        deadline: Instant,
        until: Instant,
    ) -> Claimed {
        let mut pause = FIRST_POLL;
        // When the claim of a duplicate seen running elsewhere expires.
        let mut held_until: Option<Instant> = None;
        loop {
            let claim = fleet.claim(ticket, until, self.window).await;
            let now = Instant::now();
            match claim {
                // Too late to run: dropped, the claim is let go.
                FleetClaim::First(_) if now >= deadline => return Claimed::TimedOut,
                FleetClaim::First(run) => {
                    return Claimed::Run(Box::new(Remembering {
                        here,
                        fleet: Some(run),
                    }));
                }
                FleetClaim::Unavailable(_) if held_until.is_some_and(|held| now < held) => {}
                FleetClaim::Unavailable(run) => {
                    return Claimed::Run(Box::new(Remembering { here, fleet: run }));
                }
                // Dropped, `here` is forgotten, and its duplicates here find the same.
                FleetClaim::Reused => return Claimed::Reused,
                FleetClaim::Done(answer, left) => {
                    let answer = Arc::new(answer);
                    if let Some(here) = here {
                        here.settle(Some(answer.clone()), left.min(self.window));
                    }
                    return Claimed::Replay(answer);
                }
                FleetClaim::Running(left) => held_until = Some(now + left),
            }
            if now >= deadline {
                return Claimed::TimedOut;
            }
            // The last poll is at the deadline itself.
            tokio::time::sleep(pause.min(deadline - now)).await;
            pause = (pause * 2).min(MAX_POLL);
        }
    }

    /// What this replica's table says of the call of `ticket`.
    fn claim_here(&self, ticket: Ticket) -> Claim {
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        match entries.get(&ticket.key) {
            Some(Entry::Done {
                fingerprint,
                until,
                answer,
            }) if *until > now => {
                return match *fingerprint == ticket.fingerprint {
                    true => Claim::Replay(answer.clone()),
                    false => Claim::Reused,
                };
            }
            Some(Entry::Running { fingerprint, done }) => {
                return match *fingerprint == ticket.fingerprint {
                    true => Claim::Wait(done.clone()),
                    false => Claim::Reused,
                };
            }
            Some(Entry::Done { .. }) | None => {}
        }
        if entries.len() >= self.max_keys && !entries.contains_key(&ticket.key) {
            // Expired outcomes are swept when the table is full, at most once a second, so a
            // flood of new ids cannot turn every call into a sweep.
            let mut swept = self.swept.lock().unwrap_or_else(|e| e.into_inner());
            if swept.is_none_or(|at| now.duration_since(at) >= SWEEP_INTERVAL) {
                *swept = Some(now);
                entries.retain(|_, entry| match entry {
                    Entry::Done { until, .. } => *until > now,
                    Entry::Running { .. } => true,
                });
            }
            if entries.len() >= self.max_keys {
                metrics::counter!(m::IDEMPOTENCY_FULL).increment(1);
                if let Some(held_back) = FULL_WARNING.due() {
                    tracing::warn!(
                        max_keys = self.max_keys,
                        since_last_warning = held_back,
                        "IDEMPOTENCY_MAX_KEYS reached: calls with a request_id run unremembered by \
                         this replica (on Redis, when it is used, they still are) until \
                         outcomes leave their window"
                    );
                }
                return Claim::Full;
            }
        }
        let (send, done) = watch::channel(None);
        entries.insert(
            ticket.key,
            Entry::Running {
                fingerprint: ticket.fingerprint,
                done,
            },
        );
        Claim::First(Running {
            ticket,
            send: Some(send),
            window: self.window,
            entries: self.entries.clone(),
        })
    }

    /// How many calls are remembered or running.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.lock().unwrap().len()
    }
}

/// The first call of a ticket, running. Dropped unfinished, it is forgotten.
struct Running {
    ticket: Ticket,
    send: Option<watch::Sender<Option<Option<Arc<Remembered>>>>>,
    window: Duration,
    entries: Arc<Mutex<HashMap<[u8; 32], Entry>>>,
}

impl Running {
    /// The call was answered `answer`: remembered for `window` when `Some`, else forgotten.
    /// Calls waiting for it are told either way.
    fn settle(mut self, answer: Option<Arc<Remembered>>, window: Duration) {
        {
            let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
            match &answer {
                Some(answer) => {
                    entries.insert(
                        self.ticket.key,
                        Entry::Done {
                            fingerprint: self.ticket.fingerprint,
                            until: Instant::now() + window,
                            answer: answer.clone(),
                        },
                    );
                }
                None => {
                    entries.remove(&self.ticket.key);
                }
            }
        }
        if let Some(send) = self.send.take() {
            let _ = send.send(Some(answer));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(send) = self.send.take() {
            self.entries
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&self.ticket.key);
            let _ = send.send(Some(None));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(max_keys: usize) -> Idempotency {
        Idempotency::new(Duration::from_secs(3600), max_keys, [7; 32])
    }

    #[tokio::test]
    async fn a_decided_call_is_replayed_and_its_id_never_reused_for_another_request() {
        let store = store(10);
        let ticket = store.ticket(&[b"caller", b"id-1"], &[b"ann"]);
        let Claim::First(first) = store.claim_here(ticket) else {
            panic!("the first call runs");
        };
        let Claim::Wait(mut waiting) = store.claim_here(ticket) else {
            panic!("a duplicate waits");
        };
        assert!(matches!(
            store.claim_here(store.ticket(&[b"caller", b"id-1"], &[b"bob"])),
            Claim::Reused
        ));
        first.settle(
            Some(Arc::new(Remembered::Confirmed)),
            Duration::from_secs(3600),
        );
        waiting.changed().await.unwrap();
        assert!(matches!(
            waiting.borrow().as_ref(),
            Some(Some(answer)) if matches!(**answer, Remembered::Confirmed)
        ));
        assert!(matches!(store.claim_here(ticket), Claim::Replay(_)));
        assert!(matches!(
            store.claim_here(store.ticket(&[b"caller", b"id-1"], &[b"bob"])),
            Claim::Reused
        ));
        // Framed parts: ("ab", "c") is not ("a", "bc").
        assert_ne!(
            store.ticket(&[b"ab", b"c"], &[]),
            store.ticket(&[b"a", b"bc"], &[])
        );
    }

    #[tokio::test]
    async fn an_undecided_call_is_forgotten_and_its_waiters_told() {
        let store = store(10);
        let ticket = store.ticket(&[b"caller", b"id-2"], &[b"ann"]);
        let Claim::First(first) = store.claim_here(ticket) else {
            panic!("the first call runs");
        };
        let Claim::Wait(mut waiting) = store.claim_here(ticket) else {
            panic!("a duplicate waits");
        };
        drop(first);
        waiting.changed().await.unwrap();
        assert!(matches!(waiting.borrow().as_ref(), Some(None)));
        assert!(matches!(store.claim_here(ticket), Claim::First(_)));
    }

    #[test]
    fn memory_is_bounded_and_expired_outcomes_make_room() {
        let expiring = Idempotency::new(Duration::ZERO, 2, [7; 32]);
        for id in [b"1", b"2"] {
            let Claim::First(first) = expiring.claim_here(expiring.ticket(&[id], &[])) else {
                panic!("room for two");
            };
            first.settle(Some(Arc::new(Remembered::Confirmed)), Duration::ZERO);
        }
        // Both expired at once (a zero window): a third makes room.
        assert!(matches!(
            expiring.claim_here(expiring.ticket(&[b"3"], &[])),
            Claim::First(_)
        ));
        let full = store(1);
        let Claim::First(_running) = full.claim_here(full.ticket(&[b"1"], &[])) else {
            panic!("room for one");
        };
        assert!(matches!(
            full.claim_here(full.ticket(&[b"2"], &[])),
            Claim::Full
        ));
        assert_eq!(full.len(), 1);
    }
}
