//! Enumeration protection: an unknown user must be indistinguishable from a known one, by
//! what the answer says and by when it comes, and so must every state of a known account. This
//! module owns all of it: which of Cognito's answers are masked, and as what ([`Mask::of`]);
//! the simulated delivery details (following the username's shape, in Cognito's own masking);
//! and the latency a masked answer imitates (a rolling sample of real answers' latencies per
//! region and kind, drawn from at random: pools in other regions answer in other times).

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

use crate::cognito::{ErrorCode, NotAuthorized, UpstreamError};
use crate::domain::{CodeDelivery, DeliveryMedium, PoolUser, Rpc};
use crate::privacy::UsernameHasher;

/// Latencies kept per imitated outcome: the most recent real answers.
pub const SAMPLE_SIZE: usize = 256;
/// What a masked ForgotPassword imitates until a real delivery has been seen: a delivery's
/// typical latency (± 20 %).
pub const DEFAULT_DELIVERY_LATENCY: Duration = Duration::from_millis(250);
/// What a refused code imitates until real code errors have been seen.
pub const DEFAULT_MISMATCH_LATENCY: Duration = Duration::from_millis(100);
/// A sample's median is trusted (to choose the slower kind of code error) from this many
/// latencies on; before, its default stands for it.
const MEDIAN_FROM: usize = 16;

/// What enumeration protection answers instead of one of Cognito's errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mask {
    /// ForgotPassword: as if a code had been sent, with simulated delivery details.
    Delivery,
    /// ConfirmForgotPassword: the one answer to every code that does not work, whatever the
    /// account's state.
    CodeRefused,
    /// Either RPC: this service's own per-username limit refusing the call.
    UserLimit,
}

impl Mask {
    /// What Cognito's error `code` (with `message`) to `rpc` is answered as under enumeration
    /// protection; `None`: as it is. Only answers an existing account (or its absence) alone
    /// can produce are masked; a misconfiguration (a bad secret hash, an unknown client or
    /// pool, a `NotAuthorizedException` of no known cause) never is.
    pub(crate) fn of(rpc: Rpc, code: &ErrorCode, message: Option<&str>) -> Option<Self> {
        use ErrorCode as C;
        let account_state =
            || *code == C::NotAuthorized && NotAuthorized::of(message).is_account_state();
        // The pool's daily email quota (Cognito's default email sender) is spent only by
        // existing accounts' codes: masked as a delivery. Not documented by AWS; the message
        // is Cognito's as seen.
        let daily_email = *code == C::LimitExceeded
            && message.is_some_and(|m| m.starts_with("Exceeded daily email limit"));
        if daily_email && rpc == Rpc::ForgotPassword {
            return Some(Self::Delivery);
        }
        // Cognito's per-user attempt limit: AWS documents it "for a user"; taken to count only
        // existing accounts.
        if matches!(code, C::LimitExceeded | C::TooManyFailedAttempts) {
            return Some(Self::UserLimit);
        }
        match rpc {
            // No such user; no verified contact to send a code to; not confirmed; disabled, or
            // a password to change first.
            Rpc::ForgotPassword => (matches!(
                code,
                C::UserNotFound
                    | C::InvalidParameter
                    | C::UserNotConfirmed
                    // Only an existing account's address can fail to take a code.
                    | C::CodeDeliveryFailure
            ) || account_state())
            .then_some(Self::Delivery),
            // A wrong code; an expired one, or none requested; no such user; not confirmed;
            // disabled, or a password to change first.
            Rpc::ConfirmForgotPassword => (matches!(
                code,
                C::CodeMismatch | C::ExpiredCode | C::UserNotFound | C::UserNotConfirmed
            ) || account_state())
            .then_some(Self::CodeRefused),
        }
    }
}

/// A failed call to Cognito that enumeration protection answers for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Masked {
    /// What it is answered as.
    pub mask: Mask,
    /// What Cognito really answered (for the call's log line and audit event).
    pub real: ErrorCode,
    /// Cognito's request id, if any.
    pub request_id: Option<String>,
}

impl Masked {
    /// What Cognito said, when the answer hides it: a wrong code answered as a refused code
    /// is what the answer says, not a mask.
    pub fn hidden(&self) -> Option<ErrorCode> {
        (self.real != ErrorCode::CodeMismatch).then(|| self.real.clone())
    }
}

/// A real code error of Cognito's, whose latencies a refused code imitates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CodeError {
    /// `CodeMismatchException`: a wrong code.
    Mismatch,
    /// `ExpiredCodeException`: an expired code, or none requested.
    Expired,
}

impl CodeError {
    /// The code error Cognito's `code` is, if it is one.
    pub(crate) fn of(code: &ErrorCode) -> Option<Self> {
        match code {
            ErrorCode::CodeMismatch => Some(Self::Mismatch),
            ErrorCode::ExpiredCode => Some(Self::Expired),
            _ => None,
        }
    }
}

/// The latencies of one region's real answers, per kind.
#[derive(Debug)]
struct RegionSamples {
    delivery: LatencySample,
    code_mismatch: LatencySample,
    expired_code: LatencySample,
}

impl RegionSamples {
    fn new() -> Self {
        Self {
            delivery: LatencySample::new(DEFAULT_DELIVERY_LATENCY),
            code_mismatch: LatencySample::new(DEFAULT_MISMATCH_LATENCY),
            expired_code: LatencySample::new(DEFAULT_MISMATCH_LATENCY),
        }
    }

    fn code_error(&self, kind: CodeError) -> &LatencySample {
        match kind {
            CodeError::Mismatch => &self.code_mismatch,
            CodeError::Expired => &self.expired_code,
        }
    }

    /// The code error whose answers come later: the one every refused code is timed like.
    fn slower_code_error(&self) -> CodeError {
        if self.expired_code.typical() > self.code_mismatch.typical() {
            CodeError::Expired
        } else {
            CodeError::Mismatch
        }
    }
}

/// Simulated answers and their timing.
#[derive(Debug)]
pub struct Masking {
    enabled: bool,
    hasher: UsernameHasher,
    /// By the region of the user pools whose answers are imitated.
    regions: HashMap<String, RegionSamples>,
    /// For a region not named at construction.
    elsewhere: RegionSamples,
    /// How late a timer wakes up, on average (µs): a masked answer aims this much earlier,
    /// so busy workers do not make it systematically slower than the real one.
    lateness_us: AtomicU64,
}

impl Masking {
    /// Masks unknown users when `enabled`, imitating the answers of pools in `regions`;
    /// usernames of no recognised shape get destinations keyed by `hasher`.
    pub fn new<'a>(
        enabled: bool,
        hasher: UsernameHasher,
        regions: impl IntoIterator<Item = &'a str>,
    ) -> Self {
        Self {
            enabled,
            hasher,
            regions: regions
                .into_iter()
                .map(|region| (region.to_owned(), RegionSamples::new()))
                .collect(),
            elsewhere: RegionSamples::new(),
            lateness_us: AtomicU64::new(0),
        }
    }

    fn samples(&self, region: &str) -> &RegionSamples {
        self.regions.get(region).unwrap_or(&self.elsewhere)
    }

    /// What Cognito's error `err` to `rpc` is answered as ([`Mask::of`]); `None` when it is
    /// answered as it is, and always when protection is off.
    pub(crate) fn mask(&self, rpc: Rpc, err: &UpstreamError) -> Option<Masked> {
        let UpstreamError::Service {
            code,
            message,
            request_id,
        } = err
        else {
            return None;
        };
        let mask = Mask::of(rpc, code, message.as_deref()).filter(|_| self.enabled)?;
        Some(Masked {
            mask,
            real: code.clone(),
            request_id: request_id.clone(),
        })
    }

    /// Remembers how long a real delivery from `region` took, counting from when it was sent.
    pub fn observe_delivery(&self, region: &str, latency: Duration) {
        self.samples(region).delivery.record(latency);
    }

    /// Waits until a latency drawn from `region`'s real deliveries has passed since `sent`,
    /// but never past `deadline`. Holds nothing but a timer. False when the deadline came
    /// first: the real answer imitated would not have come in time, and the call must be
    /// answered as one that ran out of time is.
    pub async fn imitate_delivery(&self, region: &str, sent: Instant, deadline: Instant) -> bool {
        let target = sent + self.samples(region).delivery.draw();
        self.wait_until(target, deadline).await
    }

    /// Times a refused code (sent at `sent`; `real`: the code error Cognito answered, if it
    /// was one) like the slower of `region`'s two real code errors: an answer of that kind
    /// goes at once, as late as it came; any other waits until a latency drawn from that
    /// kind's sample has passed, never past `deadline`. Each real code error is remembered.
    /// False when the deadline came first (see [`Self::imitate_delivery`]).
    pub(crate) async fn time_code_refusal(
        &self,
        region: &str,
        real: Option<CodeError>,
        sent: Instant,
        deadline: Instant,
    ) -> bool {
        let samples = self.samples(region);
        if let Some(kind) = real {
            samples.code_error(kind).record(sent.elapsed());
        }
        let slower = samples.slower_code_error();
        if real == Some(slower) {
            return true;
        }
        let target = sent + samples.code_error(slower).draw();
        self.wait_until(target, deadline).await
    }

    /// Sleeps until `target` (or `deadline`, if earlier), aimed earlier by the timer's
    /// measured lateness; true when `target` was before `deadline`.
    async fn wait_until(&self, target: Instant, deadline: Instant) -> bool {
        let in_time = target <= deadline;
        let lateness = Duration::from_micros(self.lateness_us.load(Ordering::Relaxed));
        let wake = target.checked_sub(lateness).unwrap_or(target).min(deadline);
        if wake <= Instant::now() {
            return in_time;
        }
        tokio::time::sleep_until(wake).await;
        // A moving average (1/8) of how late the timer woke.
        let late = u64::try_from(Instant::now().duration_since(wake).as_micros()).unwrap_or(0);
        let _ = self
            .lateness_us
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |average| {
                Some(average - average / 8 + late / 8)
            });
        in_time
    }

    /// Delivery details for an unknown user, as Cognito would answer for a known one: an
    /// email-shaped username gets that email's mask (`z***@e***`), an E.164 phone number its
    /// mask (`+*******0123`), anything else an email mask keyed by the user's hash.
    pub(crate) fn simulated_delivery(&self, user: PoolUser<'_>) -> CodeDelivery {
        let name = user.username.as_str();
        if let Some(destination) = email_mask(name) {
            return email(destination);
        }
        if let Some(destination) = phone_mask(name) {
            return CodeDelivery {
                destination,
                medium: DeliveryMedium::Sms,
                attribute_name: "phone_number".to_owned(),
            };
        }
        let digest = self.hasher.digest(user);
        let letter = |byte: u8| char::from(b'a' + byte % 26);
        email(format!("{}***@{}***", letter(digest[0]), letter(digest[1])))
    }
}

fn email(destination: String) -> CodeDelivery {
    CodeDelivery {
        destination,
        medium: DeliveryMedium::Email,
        attribute_name: "email".to_owned(),
    }
}

/// Cognito's mask of an email: first character of the local part, `***@`, first character of
/// the domain, `***`. Lowercase, as addresses are almost always stored, so changing the case of
/// a typed username does not tell a simulated answer from a real one.
fn email_mask(name: &str) -> Option<String> {
    let (local, domain) = name.split_once('@')?;
    if domain.contains('@') {
        return None;
    }
    let first = |part: &str| part.chars().next().map(|c| c.to_lowercase().to_string());
    Some(format!("{}***@{}***", first(local)?, first(domain)?))
}

/// Cognito's mask of an E.164 phone number: `+`, a star per hidden digit, the last 4 digits.
fn phone_mask(name: &str) -> Option<String> {
    let digits = name.strip_prefix('+')?;
    if !(8..=15).contains(&digits.len()) || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (hidden, shown) = digits.split_at(digits.len() - 4);
    Some(format!("+{}{shown}", "*".repeat(hidden.len())))
}

/// The latencies of the most recent real answers of one kind.
#[derive(Debug)]
struct LatencySample {
    default: Duration,
    ring: Mutex<Ring>,
}

#[derive(Debug)]
struct Ring {
    /// Microseconds, oldest overwritten first.
    values: Vec<u32>,
    next: usize,
}

impl LatencySample {
    fn new(default: Duration) -> Self {
        Self {
            default,
            ring: Mutex::new(Ring {
                values: Vec::with_capacity(SAMPLE_SIZE),
                next: 0,
            }),
        }
    }

    fn record(&self, latency: Duration) {
        let micros = u32::try_from(latency.as_micros()).unwrap_or(u32::MAX);
        let mut ring = self.ring.lock().expect("latency sample lock");
        if ring.values.len() < SAMPLE_SIZE {
            ring.values.push(micros);
        } else {
            let at = ring.next;
            ring.values[at] = micros;
        }
        ring.next = (ring.next + 1) % SAMPLE_SIZE;
    }

    /// The sample's median once it has [`MEDIAN_FROM`] latencies; before, the larger of its
    /// default and the median of what it has, so that a few slow answers already count.
    fn typical(&self) -> Duration {
        let ring = self.ring.lock().expect("latency sample lock");
        let mut values = ring.values.clone();
        drop(ring);
        if values.is_empty() {
            return self.default;
        }
        let middle = values.len() / 2;
        let (_, median, _) = values.select_nth_unstable(middle);
        let median = Duration::from_micros(u64::from(*median));
        match values.len() < MEDIAN_FROM {
            true => median.max(self.default),
            false => median,
        }
    }

    /// A latency drawn uniformly from the sample, or the default ± 20 % while it is empty.
    fn draw(&self) -> Duration {
        let mut rng = rand::rng();
        let ring = self.ring.lock().expect("latency sample lock");
        if ring.values.is_empty() {
            return self.default.mul_f64(rng.random_range(0.8..=1.2));
        }
        Duration::from_micros(u64::from(
            ring.values[rng.random_range(0..ring.values.len())],
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Username;

    fn user(name: &str) -> Username {
        Username::parse("username", name.to_owned()).unwrap()
    }

    fn masking() -> Masking {
        Masking::new(
            true,
            UsernameHasher::derived(b"secret", "test"),
            ["eu-west-1"],
        )
    }

    #[test]
    fn email_shaped_usernames_get_cognitos_email_mask() {
        let delivery = masking().simulated_delivery(PoolUser::new(None, &user("zed@example.org")));
        assert_eq!(delivery.destination, "z***@e***");
        assert_eq!(delivery.medium, DeliveryMedium::Email);
        assert_eq!(delivery.attribute_name, "email");
        assert_eq!(
            masking()
                .simulated_delivery(PoolUser::new(None, &user("Zed@Example.org")))
                .destination,
            "z***@e***"
        );
        assert_eq!(
            masking()
                .simulated_delivery(PoolUser::new(None, &user("élodie@ünï.fr")))
                .destination,
            "é***@ü***"
        );
    }

    #[test]
    fn phone_shaped_usernames_get_cognitos_phone_mask() {
        let delivery = masking().simulated_delivery(PoolUser::new(None, &user("+14155550123")));
        assert_eq!(delivery.destination, "+*******0123");
        assert_eq!(delivery.medium, DeliveryMedium::Sms);
        assert_eq!(delivery.attribute_name, "phone_number");
        assert_eq!(
            masking()
                .simulated_delivery(PoolUser::new(None, &user("+447700900123")))
                .destination,
            "+********0123"
        );
    }

    #[test]
    fn other_usernames_get_a_keyed_mask_stable_per_username() {
        let m = masking();
        for name in [
            "alice",
            "a@b@c",
            "@example.com",
            "bob@",
            "+123",
            "+1415555012x",
        ] {
            let first = m.simulated_delivery(PoolUser::new(None, &user(name)));
            assert_eq!(
                first,
                masking().simulated_delivery(PoolUser::new(None, &user(name))),
                "{name}"
            );
            assert_eq!(first.medium, DeliveryMedium::Email, "{name}");
            let d = first.destination.as_bytes();
            assert_eq!(d.len(), 9, "{name}: {}", first.destination);
            assert!(d[0].is_ascii_lowercase() && d[5].is_ascii_lowercase());
            assert_eq!(&first.destination[1..5], "***@");
        }
        let spread: std::collections::HashSet<_> = (0..50)
            .map(|i| {
                m.simulated_delivery(PoolUser::new(None, &user(&format!("user{i}"))))
                    .destination
            })
            .collect();
        assert!(spread.len() > 10, "{spread:?}");
    }

    #[test]
    fn draws_come_from_the_sample_once_it_has_data() {
        let sample = LatencySample::new(Duration::from_millis(100));
        for _ in 0..100 {
            let d = sample.draw();
            assert!(d >= Duration::from_millis(80) && d <= Duration::from_millis(120));
        }
        sample.record(Duration::from_millis(7));
        sample.record(Duration::from_millis(9));
        for _ in 0..100 {
            let d = sample.draw();
            assert!(d == Duration::from_millis(7) || d == Duration::from_millis(9));
        }
    }

    #[test]
    fn the_sample_keeps_only_the_most_recent_latencies() {
        let sample = LatencySample::new(Duration::ZERO);
        for ms in 0..(SAMPLE_SIZE as u64 + 10) {
            sample.record(Duration::from_millis(ms));
        }
        let ring = sample.ring.lock().unwrap();
        assert_eq!(ring.values.len(), SAMPLE_SIZE);
        assert!(ring.values.iter().all(|&us| us >= 10_000));
    }

    #[tokio::test(start_paused = true)]
    async fn an_imitation_never_outlasts_the_deadline() {
        let m = masking();
        m.observe_delivery("eu-west-1", Duration::from_secs(60));
        let sent = Instant::now();
        let in_time = m
            .imitate_delivery("eu-west-1", sent, sent + Duration::from_secs(2))
            .await;
        assert_eq!(sent.elapsed(), Duration::from_secs(2));
        assert!(!in_time, "the real answer would not have come in time");
        m.observe_delivery("eu-west-1", Duration::from_secs(1));
        let sent = Instant::now();
        // A draw of 60 s or 1 s: in time only when it was 1 s.
        let in_time = m
            .imitate_delivery("eu-west-1", sent, sent + Duration::from_secs(2))
            .await;
        assert_eq!(in_time, sent.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn each_region_imitates_its_own_answers() {
        let m = Masking::new(
            true,
            UsernameHasher::random(),
            ["eu-west-1", "ap-southeast-2"],
        );
        m.observe_delivery("ap-southeast-2", Duration::from_secs(30));
        let sent = Instant::now();
        let deadline = sent + Duration::from_secs(60);

        m.imitate_delivery("eu-west-1", sent, deadline).await;
        let near = sent.elapsed();
        m.imitate_delivery("ap-southeast-2", sent, deadline).await;

        assert!(near <= DEFAULT_DELIVERY_LATENCY * 6 / 5, "{near:?}");
        assert!(
            sent.elapsed() >= Duration::from_secs(29),
            "{:?}",
            sent.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn every_refused_code_is_timed_like_the_slower_real_code_error() {
        let m = masking();
        let deadline = Instant::now() + Duration::from_secs(60);
        // Wrong codes take 3 s, expired ones 1 s.
        for _ in 0..MEDIAN_FROM {
            let sent = Instant::now() - Duration::from_secs(3);
            m.time_code_refusal("eu-west-1", Some(CodeError::Mismatch), sent, deadline)
                .await;
            let sent = Instant::now() - Duration::from_secs(1);
            m.time_code_refusal("eu-west-1", Some(CodeError::Expired), sent, deadline)
                .await;
        }
        // A wrong code is the slower kind: answered as it came (here, after its 3 s, so that
        // the latency it adds to the sample is one more 3 s).
        let called = Instant::now();
        let sent = called - Duration::from_secs(3);
        m.time_code_refusal("eu-west-1", Some(CodeError::Mismatch), sent, deadline)
            .await;
        assert_eq!(called.elapsed(), Duration::ZERO);
        // An expired code, or no such user, waits as long as a wrong code takes.
        for real in [Some(CodeError::Expired), None] {
            let sent = Instant::now();
            m.time_code_refusal("eu-west-1", real, sent, deadline).await;
            assert!(
                sent.elapsed() >= Duration::from_millis(2990),
                "{real:?}: {:?}",
                sent.elapsed()
            );
        }
    }

    #[test]
    fn only_answers_an_account_alone_can_give_are_masked() {
        use Mask::*;
        let fp = Rpc::ForgotPassword;
        let cfp = Rpc::ConfirmForgotPassword;
        let cases: &[(Rpc, &str, Option<&str>, Option<Mask>)] = &[
            (fp, "UserNotFoundException", None, Some(Delivery)),
            (fp, "InvalidParameterException", None, Some(Delivery)),
            (fp, "UserNotConfirmedException", None, Some(Delivery)),
            (
                fp,
                "NotAuthorizedException",
                Some("User is disabled."),
                Some(Delivery),
            ),
            (
                fp,
                "NotAuthorizedException",
                Some("User password cannot be reset in the current state."),
                Some(Delivery),
            ),
            (fp, "LimitExceededException", None, Some(UserLimit)),
            (fp, "CodeDeliveryFailureException", None, Some(Delivery)),
            (
                fp,
                "LimitExceededException",
                Some("Exceeded daily email limit for the operation or the account."),
                Some(Delivery),
            ),
            (cfp, "CodeMismatchException", None, Some(CodeRefused)),
            (cfp, "ExpiredCodeException", None, Some(CodeRefused)),
            (cfp, "UserNotFoundException", None, Some(CodeRefused)),
            (cfp, "UserNotConfirmedException", None, Some(CodeRefused)),
            (
                cfp,
                "NotAuthorizedException",
                Some("User is disabled."),
                Some(CodeRefused),
            ),
            (cfp, "LimitExceededException", None, Some(UserLimit)),
            (cfp, "TooManyFailedAttemptsException", None, Some(UserLimit)),
            // Misconfigurations and everything else: never masked.
            (
                fp,
                "NotAuthorizedException",
                Some("Unable to verify secret hash for client x"),
                None,
            ),
            (cfp, "NotAuthorizedException", Some("Something else."), None),
            (fp, "ResourceNotFoundException", None, None),
            (cfp, "ResourceNotFoundException", None, None),
            (cfp, "InvalidPasswordException", None, None),
            (fp, "TooManyRequestsException", None, None),
        ];
        for (rpc, code, message, mask) in cases {
            assert_eq!(
                Mask::of(*rpc, &ErrorCode::parse(code), *message),
                *mask,
                "{rpc:?} {code} {message:?}"
            );
        }
        let not_found = UpstreamError::Service {
            code: ErrorCode::UserNotFound,
            message: None,
            request_id: Some("r-1".into()),
        };
        let masked = masking().mask(fp, &not_found).unwrap();
        assert_eq!(
            (masked.mask, masked.request_id.as_deref()),
            (Delivery, Some("r-1"))
        );
        assert_eq!(masked.hidden(), Some(ErrorCode::UserNotFound));
        let mismatch = UpstreamError::Service {
            code: ErrorCode::CodeMismatch,
            message: None,
            request_id: None,
        };
        let masked = masking().mask(cfp, &mismatch).unwrap();
        assert_eq!(
            masked.hidden(),
            None,
            "a wrong code is what the answer says"
        );
        let off = Masking::new(false, UsernameHasher::random(), ["eu-west-1"]);
        assert_eq!(off.mask(fp, &not_found), None);
    }
}
