//! Remembered outcomes shared by the fleet, on Redis ([`crate::fleet`]), so that a retry that
//! lands on another replica is answered the same. One key per request
//! (`<prefix>request:<keyed hash>`): a call claims it atomically (`claim.lua`) for as long as
//! it may run, then replaces its claim with its outcome for `IDEMPOTENCY_WINDOW`, or deletes it
//! when the outcome is not remembered (`finish.lua`). A value holds the request's fingerprint
//! (a keyed hash) and either the claim's own token or the answer as its caller saw it, never a
//! username, code or password.
//!
//! While Redis fails, [`FleetClaim::Unavailable`]: each replica's own memory answers. A claim
//! that may have landed although Redis gave no answer is finished all the same (`finish.lua`
//! touches only its own claim), and every final write is tried again while Redis gives no
//! answer.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use prost::Message;
use redis::Script;
use tonic::Code;
use tonic_types::{ErrorDetails, StatusExt};

use tokio::time::Instant;

use super::{Remembered, Ticket};
use crate::domain::{CodeDelivery, DeliveryMedium};
use crate::error::{Blame, Classified};
use crate::fleet::{Backend, Unanswered};
use crate::telemetry::Occasionally;

/// Claims a request (`claim.lua`).
static CLAIM: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("claim.lua")));
/// Ends a claim (`finish.lua`).
static FINISH: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("finish.lua")));
/// How much longer than its call a claim is held, besides three Redis timeouts.
const CLAIM_MARGIN: Duration = Duration::from_secs(2);
/// An unreadable outcome is logged at warn at most this often.
static UNREADABLE_WARNING: Occasionally = Occasionally::every(Duration::from_secs(60));

/// A request's value on Redis.
#[derive(Clone, PartialEq, Message)]
struct Stored {
    /// The request's fingerprint.
    #[prost(bytes = "vec", tag = "1")]
    fingerprint: Vec<u8>,
    /// The claim's own token, while its call runs; empty once it is an outcome.
    #[prost(bytes = "vec", tag = "2")]
    claim: Vec<u8>,
    /// 1: a delivery, 2: confirmed, 3: failed.
    #[prost(uint32, tag = "3")]
    kind: u32,
    /// A delivery's masked destination.
    #[prost(string, tag = "4")]
    destination: String,
    /// A delivery's medium: 0 unspecified, 1 email, 2 SMS.
    #[prost(uint32, tag = "5")]
    medium: u32,
    /// A delivery's attribute.
    #[prost(string, tag = "6")]
    attribute_name: String,
    /// A failure, as the `google.rpc.Status` its caller was sent (code, message, details).
    #[prost(bytes = "vec", tag = "7")]
    status: Vec<u8>,
    /// A failure's blame (what its log line's level follows): 1 caller, 2 slow caller,
    /// 3 upstream, 4 capacity, 5 server, 6 refused.
    #[prost(uint32, tag = "8")]
    blame: u32,
}

const DELIVERY: u32 = 1;
const CONFIRMED: u32 = 2;
const FAILED: u32 = 3;

fn medium_number(medium: DeliveryMedium) -> u32 {
    match medium {
        DeliveryMedium::Unspecified => 0,
        DeliveryMedium::Email => 1,
        DeliveryMedium::Sms => 2,
    }
}

fn medium_of(number: u32) -> Option<DeliveryMedium> {
    match number {
        0 => Some(DeliveryMedium::Unspecified),
        1 => Some(DeliveryMedium::Email),
        2 => Some(DeliveryMedium::Sms),
        _ => None,
    }
}

fn blame_number(blame: Blame) -> u32 {
    match blame {
        Blame::Caller => 1,
        Blame::SlowCaller => 2,
        Blame::Upstream => 3,
        Blame::Capacity => 4,
        Blame::Server => 5,
        Blame::Refused => 6,
    }
}

fn blame_of(number: u32) -> Option<Blame> {
    match number {
        1 => Some(Blame::Caller),
        2 => Some(Blame::SlowCaller),
        3 => Some(Blame::Upstream),
        4 => Some(Blame::Capacity),
        5 => Some(Blame::Server),
        6 => Some(Blame::Refused),
        _ => None,
    }
}

impl Stored {
    /// The outcome `answer` of the request of `fingerprint`.
    fn outcome(fingerprint: &[u8; 32], answer: &Remembered) -> Self {
        let mut stored = Self {
            fingerprint: fingerprint.to_vec(),
            ..Self::default()
        };
        match answer {
            Remembered::Delivery(delivery) => {
                stored.kind = DELIVERY;
                stored.destination = delivery.destination.clone();
                stored.medium = medium_number(delivery.medium);
                stored.attribute_name = delivery.attribute_name.clone();
            }
            Remembered::Confirmed => stored.kind = CONFIRMED,
            Remembered::Failed(error) => {
                stored.kind = FAILED;
                let status = tonic::Status::with_error_details(
                    error.code,
                    error.message.clone(),
                    error.details.clone(),
                );
                stored.status = status.details().to_vec();
                stored.blame = blame_number(error.blame);
            }
        }
        stored
    }

    /// The answer it holds; `None` for one this version cannot read (then not replayed).
    fn remembered(&self) -> Option<Remembered> {
        match self.kind {
            DELIVERY => Some(Remembered::Delivery(CodeDelivery {
                destination: self.destination.clone(),
                medium: medium_of(self.medium)?,
                attribute_name: self.attribute_name.clone(),
            })),
            CONFIRMED => Some(Remembered::Confirmed),
            FAILED => {
                let sent = tonic_types::Status::decode(self.status.as_slice()).ok()?;
                let code = Code::from_i32(sent.code);
                let status =
                    tonic::Status::with_details(code, sent.message, self.status.clone().into());
                let details: ErrorDetails = status.check_error_details().ok()?;
                let reason = details.error_info()?.reason.clone();
                let message = status.message().to_owned();
                let error =
                    Classified::restored(code, &reason, message, blame_of(self.blame)?, details)?;
                Some(Remembered::Failed(Box::new(error)))
            }
            _ => None,
        }
    }
}

/// What Redis says of a request.
pub(crate) enum FleetClaim {
    /// Nobody held it: this call runs it, then [`FleetRun::finish`]es it.
    First(FleetRun),
    /// It was answered this, remembered for that much longer.
    Done(Remembered, Duration),
    /// A call on some replica runs it, and holds its claim for that much longer.
    Running(Duration),
    /// It came with another request.
    Reused,
    /// Redis gave no answer (or one this version cannot read): this replica's memory
    /// decides. When the claim may have landed, the call is to finish it all the same.
    Unavailable(Option<FleetRun>),
}

/// The outcomes on Redis.
#[derive(Debug)]
pub(crate) struct SharedOutcomes {
    backend: Arc<Backend>,
}

impl SharedOutcomes {
    /// Outcomes on `backend`.
    pub(crate) fn new(backend: Arc<Backend>) -> Self {
        Self { backend }
    }

    /// Claims `ticket`'s request, for a call that runs until `until`, or says who holds it.
    /// Its outcome is to be remembered for `window`.
    pub(crate) async fn claim(
        &self,
        ticket: Ticket,
        until: Instant,
        window: Duration,
    ) -> FleetClaim {
        // The format is in the key, so that another version's requests are other requests.
        let key = self.backend.key("request:v1", &ticket.key);
        // The claim outlives its call by a margin for masking and the final write, whose
        // attempts each take at most the Redis timeout; a replica that dies holding it holds it
        // no longer.
        let margin = CLAIM_MARGIN + self.backend.timeout * 3;
        let hold = until.saturating_duration_since(Instant::now()) + margin;
        let token: [u8; 16] = rand::random();
        let claim = Stored {
            fingerprint: ticket.fingerprint.to_vec(),
            claim: token.to_vec(),
            ..Stored::default()
        }
        .encode_to_vec();
        let mut invocation = CLAIM.prepare_invoke();
        invocation.key(&key).arg(&claim).arg(millis(hold));
        let held = self
            .backend
            .invoke::<Option<(Vec<u8>, i64)>>(&invocation)
            .await;
        let run = || FleetRun {
            backend: self.backend.clone(),
            key,
            claim,
            fingerprint: ticket.fingerprint,
            window,
            expires: Instant::now() + hold,
            finished: false,
        };
        let (held, ttl) = match held {
            Err(Unanswered::NotSent) => return FleetClaim::Unavailable(None),
            Err(Unanswered::MaybeRan) => return FleetClaim::Unavailable(Some(run())),
            Ok(None) => return FleetClaim::First(run()),
            Ok(Some(held)) => held,
        };
        let left = Duration::from_millis(u64::try_from(ttl).unwrap_or(0));
        let Ok(stored) = Stored::decode(held.as_slice()) else {
            return unreadable();
        };
        if stored.fingerprint != ticket.fingerprint {
            return FleetClaim::Reused;
        }
        // Its own claim: a cluster client resent the script after a broken connection, and
        // the first run had landed.
        if stored.claim == token {
            return FleetClaim::First(run());
        }
        if !stored.claim.is_empty() {
            return FleetClaim::Running(left);
        }
        match stored.remembered() {
            Some(answer) => FleetClaim::Done(answer, left),
            None => unreadable(),
        }
    }
}

/// A remembered outcome this version cannot read (another version's, during a rollout): the
/// call runs, remembered by this replica only.
fn unreadable() -> FleetClaim {
    if let Some(held_back) = UNREADABLE_WARNING.due() {
        tracing::warn!(
            since_last_warning = held_back,
            "an outcome on Redis this version cannot read: the retry runs again"
        );
    }
    FleetClaim::Unavailable(None)
}

/// A call's claim on Redis. Dropped unfinished, its request is forgotten.
pub(crate) struct FleetRun {
    backend: Arc<Backend>,
    key: String,
    claim: Vec<u8>,
    fingerprint: [u8; 32],
    window: Duration,
    /// When the claim expires: after that, there is nothing to finish.
    expires: Instant,
    finished: bool,
}

impl FleetRun {
    /// Replaces the claim with `answer`, or forgets the request when `None`, in the background,
    /// tried again while Redis gives no answer until the claim expires by itself.
    pub(crate) fn finish(mut self, answer: Option<&Remembered>) {
        self.finished = true;
        let outcome = answer.map_or_else(Vec::new, |answer| {
            Stored::outcome(&self.fingerprint, answer).encode_to_vec()
        });
        self.end(outcome);
    }

    fn end(&self, outcome: Vec<u8>) {
        let mut invocation = FINISH.prepare_invoke();
        invocation
            .key(&self.key)
            .arg(&self.claim)
            .arg(outcome)
            .arg(millis(self.window));
        let within = self.expires.saturating_duration_since(Instant::now());
        self.backend.spawn(invocation, within);
    }
}

impl Drop for FleetRun {
    fn drop(&mut self) {
        if !self.finished {
            self.end(Vec::new());
        }
    }
}

/// `duration` in whole milliseconds, at least one (Redis refuses an expiry of zero).
fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;

    #[test]
    fn every_remembered_answer_reads_back_as_it_was_given() {
        let fingerprint = [3; 32];
        let delivery = Remembered::Delivery(CodeDelivery {
            destination: "a***@e***".into(),
            medium: DeliveryMedium::Sms,
            attribute_name: "phone_number".into(),
        });
        let refused = Error::CodeRefused {
            request_id: Some("aws-1".into()),
        }
        .classify();
        for answer in [
            delivery,
            Remembered::Confirmed,
            Remembered::Failed(Box::new(refused)),
        ] {
            let bytes = Stored::outcome(&fingerprint, &answer).encode_to_vec();
            let stored = Stored::decode(bytes.as_slice()).unwrap();
            assert_eq!(stored.fingerprint, fingerprint);
            assert!(stored.claim.is_empty());
            match (stored.remembered().expect("readable"), &answer) {
                (Remembered::Failed(read), Remembered::Failed(given)) => {
                    let said = |e: &Classified| (e.code, e.reason, e.message.clone(), e.blame);
                    assert_eq!(said(&read), said(given));
                    let info = |e: &Classified| e.details.error_info().unwrap().metadata.clone();
                    assert_eq!(info(&read), info(given));
                    let fields = |e: &Classified| {
                        let bad = e.details.bad_request().unwrap();
                        let fields = bad.field_violations.iter();
                        fields
                            .map(|v| (v.field.clone(), v.description.clone()))
                            .collect::<Vec<_>>()
                    };
                    assert_eq!(fields(&read), fields(given));
                }
                (read, given) => assert_eq!(format!("{read:?}"), format!("{given:?}")),
            }
        }
        // A reason no Cognito error becomes is not replayed.
        let mut foreign = Stored::outcome(
            &fingerprint,
            &Remembered::Failed(Box::new(Error::RequestIdReused.classify())),
        );
        assert!(foreign.remembered().is_none());
        foreign.kind = 9;
        assert!(foreign.remembered().is_none());
    }
}
