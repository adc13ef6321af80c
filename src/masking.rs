//! Enumeration protection: an unknown user must be indistinguishable from a known one, by
//! what the answer says and by when it comes. This module owns both halves: the simulated
//! delivery details (following the username's shape, in Cognito's own masking), and the
//! latency a masked answer imitates (a rolling sample of real answers' latencies per region and
//! imitated outcome, drawn from at random: pools in other regions answer in other times).

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

use crate::domain::{CodeDelivery, DeliveryMedium, PoolUser};
use crate::privacy::UsernameHasher;

/// Latencies kept per imitated outcome: the most recent real answers.
pub const SAMPLE_SIZE: usize = 256;
/// What a masked ForgotPassword imitates until a real delivery has been seen: a delivery's
/// typical latency (± 20 %).
pub const DEFAULT_DELIVERY_LATENCY: Duration = Duration::from_millis(250);
/// What a masked ConfirmForgotPassword imitates until a real CodeMismatch has been seen.
pub const DEFAULT_MISMATCH_LATENCY: Duration = Duration::from_millis(100);

/// The real outcome a masked answer stands in for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Imitated {
    /// ForgotPassword: a code was sent.
    Delivery,
    /// ConfirmForgotPassword: the code was wrong.
    CodeMismatch,
}

/// The latencies of one region's real answers, per imitated outcome.
#[derive(Debug)]
struct RegionSamples {
    delivery: LatencySample,
    code_mismatch: LatencySample,
}

impl RegionSamples {
    fn new() -> Self {
        Self {
            delivery: LatencySample::new(DEFAULT_DELIVERY_LATENCY),
            code_mismatch: LatencySample::new(DEFAULT_MISMATCH_LATENCY),
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

    /// True when unknown users are masked.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    fn sample(&self, region: &str, outcome: Imitated) -> &LatencySample {
        let samples = self.regions.get(region).unwrap_or(&self.elsewhere);
        match outcome {
            Imitated::Delivery => &samples.delivery,
            Imitated::CodeMismatch => &samples.code_mismatch,
        }
    }

    /// Remembers how long a real `outcome` from `region` took, counting from when it was sent.
    pub fn observe(&self, region: &str, outcome: Imitated, latency: Duration) {
        self.sample(region, outcome).record(latency);
    }

    /// Waits until a latency drawn from `region`'s real `outcome`s has passed since `sent`, but
    /// never past `deadline`. Holds nothing but a timer.
    pub async fn imitate(&self, region: &str, outcome: Imitated, sent: Instant, deadline: Instant) {
        let target = sent + self.sample(region, outcome).draw();
        let lateness = Duration::from_micros(self.lateness_us.load(Ordering::Relaxed));
        let wake = target.checked_sub(lateness).unwrap_or(target).min(deadline);
        if wake <= Instant::now() {
            return;
        }
        tokio::time::sleep_until(wake).await;
        // A moving average (1/8) of how late the timer woke.
        let late = u64::try_from(Instant::now().duration_since(wake).as_micros()).unwrap_or(0);
        let _ = self
            .lateness_us
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |average| {
                Some(average - average / 8 + late / 8)
            });
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
        m.observe("eu-west-1", Imitated::Delivery, Duration::from_secs(60));
        let sent = Instant::now();
        m.imitate(
            "eu-west-1",
            Imitated::Delivery,
            sent,
            sent + Duration::from_secs(2),
        )
        .await;
        assert_eq!(sent.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn each_region_imitates_its_own_answers() {
        let m = Masking::new(
            true,
            UsernameHasher::random(),
            ["eu-west-1", "ap-southeast-2"],
        );
        m.observe(
            "ap-southeast-2",
            Imitated::Delivery,
            Duration::from_secs(30),
        );
        let sent = Instant::now();
        let deadline = sent + Duration::from_secs(60);

        m.imitate("eu-west-1", Imitated::Delivery, sent, deadline)
            .await;
        let near = sent.elapsed();
        m.imitate("ap-southeast-2", Imitated::Delivery, sent, deadline)
            .await;

        assert!(near <= DEFAULT_DELIVERY_LATENCY * 6 / 5, "{near:?}");
        assert!(
            sent.elapsed() >= Duration::from_secs(29),
            "{:?}",
            sent.elapsed()
        );
    }
}
