//! Remembered outcomes shared by the fleet, on Redis ([`crate::fleet`]), so that a retry that
//! lands on another replica is answered the same. One key per request
//! (`<prefix>request:<keyed hash>`): a call claims it atomically (`claim.lua`) for as long as
//! it may run, then replaces its claim with its outcome for `IDEMPOTENCY_WINDOW`, or deletes it
//! when the outcome is not remembered (`finish.lua`). A value holds the request's fingerprint
//! (a keyed hash) and either the claim's own token or the answer as its caller saw it, never a
//! username, code or password.
//!
//! While Redis fails, [`FleetClaim::Unavailable`]: each replica's own memory answers.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use prost::Message;
use redis::Script;
use tonic::Code;
use tonic_types::{ErrorDetails, StatusExt};

use super::{Remembered, Ticket};
use crate::domain::{CodeDelivery, DeliveryMedium};
use crate::error::{Blame, Classified};
use crate::fleet::Backend;

/// Claims a request (`claim.lua`).
static CLAIM: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("claim.lua")));
/// Ends a claim (`finish.lua`).
static FINISH: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("finish.lua")));

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
    /// A failure's gRPC code.
    #[prost(int32, tag = "7")]
    code: i32,
    /// A failure's ErrorInfo reason.
    #[prost(string, tag = "8")]
    reason: String,
    /// A failure's status message.
    #[prost(string, tag = "9")]
    message: String,
    /// A failure's blame (what its log line's level follows).
    #[prost(uint32, tag = "10")]
    blame: u32,
    /// A failure's details, as the `google.rpc.Status` its caller was sent.
    #[prost(bytes = "vec", tag = "11")]
    details: Vec<u8>,
}

const DELIVERY: u32 = 1;
const CONFIRMED: u32 = 2;
const FAILED: u32 = 3;

const BLAMES: [Blame; 5] = [
    Blame::Caller,
    Blame::SlowCaller,
    Blame::Upstream,
    Blame::Capacity,
    Blame::Server,
];
const MEDIUMS: [DeliveryMedium; 3] = [
    DeliveryMedium::Unspecified,
    DeliveryMedium::Email,
    DeliveryMedium::Sms,
];

/// The index of `value` in `all`, as stored.
fn index_of<T: PartialEq>(all: &[T], value: &T) -> u32 {
    all.iter()
        .position(|v| v == value)
        .and_then(|i| u32::try_from(i).ok())
        .unwrap_or(0)
}

/// The value stored as `index` in `all`.
fn at<T: Copy>(all: &[T], index: u32) -> Option<T> {
    all.get(usize::try_from(index).ok()?).copied()
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
                stored.medium = index_of(&MEDIUMS, &delivery.medium);
                stored.attribute_name = delivery.attribute_name.clone();
            }
            Remembered::Confirmed => stored.kind = CONFIRMED,
            Remembered::Failed(error) => {
                stored.kind = FAILED;
                stored.code = error.code as i32;
                stored.reason = error.reason.to_owned();
                stored.message = error.message.clone();
                stored.blame = index_of(&BLAMES, &error.blame);
                let status =
                    tonic::Status::with_error_details(error.code, "", error.details.clone());
                stored.details = status.details().to_vec();
            }
        }
        stored
    }

    /// The answer it holds; `None` for one this version cannot read (then not replayed).
    fn remembered(&self) -> Option<Remembered> {
        match self.kind {
            DELIVERY => Some(Remembered::Delivery(CodeDelivery {
                destination: self.destination.clone(),
                medium: at(&MEDIUMS, self.medium)?,
                attribute_name: self.attribute_name.clone(),
            })),
            CONFIRMED => Some(Remembered::Confirmed),
            FAILED => {
                let code = Code::from_i32(self.code);
                let status = tonic::Status::with_details(code, "", self.details.clone().into());
                let details: ErrorDetails = status.check_error_details().ok()?;
                let blame = at(&BLAMES, self.blame)?;
                let error =
                    Classified::restored(code, &self.reason, self.message.clone(), blame, details)?;
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
    /// A call on some replica runs it.
    Running,
    /// It came with another request.
    Reused,
    /// Redis failed or holds what this version cannot read: this replica's memory decides.
    Unavailable,
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

    /// The key of `ticket`'s request.
    fn key(&self, ticket: &Ticket) -> String {
        let hash: String = ticket.key[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!("{}request:{hash}", self.backend.prefix)
    }

    /// Claims `ticket`'s request for `hold` (how long its call may run), or says who holds it.
    pub(crate) async fn claim(
        &self,
        ticket: Ticket,
        hold: Duration,
        window: Duration,
    ) -> FleetClaim {
        let key = self.key(&ticket);
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
        let (held, ttl) = match held {
            None => return FleetClaim::Unavailable,
            Some(None) => {
                return FleetClaim::First(FleetRun {
                    backend: self.backend.clone(),
                    key,
                    claim,
                    fingerprint: ticket.fingerprint,
                    window,
                    finished: false,
                });
            }
            Some(Some(held)) => held,
        };
        let Ok(stored) = Stored::decode(held.as_slice()) else {
            return FleetClaim::Unavailable;
        };
        if stored.fingerprint != ticket.fingerprint {
            return FleetClaim::Reused;
        }
        if !stored.claim.is_empty() {
            return FleetClaim::Running;
        }
        let left = Duration::from_millis(u64::try_from(ttl).unwrap_or(0));
        match stored.remembered() {
            Some(answer) => FleetClaim::Done(answer, left),
            None => FleetClaim::Unavailable,
        }
    }
}

/// A call's claim on Redis. Dropped unfinished, its request is forgotten.
pub(crate) struct FleetRun {
    backend: Arc<Backend>,
    key: String,
    claim: Vec<u8>,
    fingerprint: [u8; 32],
    window: Duration,
    finished: bool,
}

impl FleetRun {
    /// Replaces the claim with `answer`, or forgets the request when `None`, in the background
    /// (while Redis fails, the claim expires by itself).
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
        self.backend.spawn(invocation);
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
