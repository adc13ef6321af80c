//! Proving the app clients (README "Proving the app clients"): each is proven
//! ([`AppClient::prove`]) at start-up, after each change of its secret, and every
//! `CLIENT_CHECK_INTERVAL`; one not proven to work is proven again sooner (30 s, doubling back
//! to the interval while Cognito gives no verdict). A verdict sets whether its calls are
//! refused, its health service `client/<alias>`, its metrics, and, for the default client
//! before the replica is first ready, readiness. Once ready, a replica stays ready: a later
//! verdict refuses only that client's calls, so the other clients keep serving and no verdict
//! (nor a Cognito outage) can empty a fleet's endpoints.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rand::Rng;
use tokio::task::JoinSet;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::api::SERVICE_NAME;
use crate::cognito::AppClient;
use crate::cognito::proof::{Mode, Proven, Verdict};
use crate::metrics as m;

/// A client not proven to work is proven again this soon (then, while Cognito gives no
/// verdict, twice as late each time, up to the interval).
const RETRY_INTERVAL: Duration = Duration::from_secs(30);
/// The proofs before serving take at most this long, so an unreachable Cognito does not hold
/// start-up (and the kubelet's startup probe) back; a client left unproven is proven again.
const FIRST_PROOF_TIME: Duration = Duration::from_secs(5);

/// The health service name of the client `alias`.
pub fn health_name(alias: &str) -> String {
    format!("client/{alias}")
}

/// `cognito_client_info`'s `prevent_user_existence_errors` values: each mode, and `unknown`.
const MODES: [&str; 3] = ["ENABLED", "LEGACY", "unknown"];

/// `password-recovery check`: every app client of `config`, proven once within its timeout.
pub async fn check(config: &crate::config::Config) -> Result<Vec<Proven>, crate::app::AppError> {
    let cognito = crate::cognito::Cognito::build(&config.cognito).await?;
    Ok(prove_all(cognito.clients(), Duration::MAX).await)
}

/// Proves every one of `clients` at once, each within `within`; in their order.
async fn prove_all(clients: &[Arc<AppClient>], within: Duration) -> Vec<Proven> {
    let mut proofs = JoinSet::new();
    for (index, client) in clients.iter().enumerate() {
        let client = client.clone();
        proofs.spawn(async move { (index, client.prove(within).await) });
    }
    let mut proven: Vec<(usize, Proven)> = proofs.join_all().await;
    proven.sort_by_key(|(index, _)| *index);
    proven.into_iter().map(|(_, proven)| proven).collect()
}

/// The proofs of a serving replica.
pub(crate) struct Proofs {
    clients: Vec<Arc<AppClient>>,
    /// The index of the default client in `clients`.
    default: usize,
    interval: Duration,
    health: HealthReporter,
    /// True once the replica was ready.
    ready: AtomicBool,
}

impl Proofs {
    /// The proofs of `clients` (the default at `default`) every `interval`, told on `health`.
    pub(crate) fn new(
        clients: Vec<Arc<AppClient>>,
        default: usize,
        interval: Duration,
        health: HealthReporter,
    ) -> Arc<Self> {
        let proofs = Self {
            clients,
            default,
            interval,
            health,
            ready: AtomicBool::new(false),
        };
        for client in &proofs.clients {
            proofs.set_mode(&client.alias, None);
            metrics::gauge!(m::CLIENT_READY, "client" => client.alias.clone()).set(1.0);
            for result in ["ready", "misconfigured", "unproven"] {
                metrics::counter!(m::CLIENT_CHECKS, "client" => client.alias.clone(), "result" => result)
                    .increment(0);
            }
        }
        Arc::new(proofs)
    }

    /// Proves every client once (within [`FIRST_PROOF_TIME`]), then makes the replica ready
    /// unless its default client was proven misconfigured (an unproven one does not hold
    /// readiness back). The verdicts, for [`Proofs::spawn`].
    pub(crate) async fn first(&self) -> Vec<Verdict> {
        let mut verdicts = Vec::with_capacity(self.clients.len());
        let proven = prove_all(&self.clients, FIRST_PROOF_TIME).await;
        for (index, proven) in proven.into_iter().enumerate() {
            self.apply(index, &proven, None).await;
            verdicts.push(proven.verdict);
        }
        let default = &self.clients[self.default];
        if default.misconfigured() {
            self.health
                .set_service_status(SERVICE_NAME, ServingStatus::NotServing)
                .await;
            tracing::error!(
                client = default.alias,
                "the default app client is misconfigured: this replica does not become ready \
                 until a proof passes"
            );
        } else {
            self.become_ready().await;
        }
        verdicts
    }

    /// Proves each client again after each change of its secret and on its schedule, until the
    /// tasks are aborted; `first` holds the verdicts of [`Proofs::first`].
    pub(crate) fn spawn(self: &Arc<Self>, first: Vec<Verdict>) -> JoinSet<()> {
        let mut tasks = JoinSet::new();
        for (index, last) in first.into_iter().enumerate() {
            let proofs = self.clone();
            tasks.spawn(async move {
                let client = proofs.clients[index].clone();
                let (mut last, mut unproven) = (last, 0);
                loop {
                    tokio::select! {
                        () = tokio::time::sleep(proofs.pause(&last, unproven)) => {}
                        () = client.secret_changed() => {}
                    }
                    let proven = client.prove(Duration::MAX).await;
                    proofs.apply(index, &proven, Some(&last)).await;
                    if index == proofs.default && !client.misconfigured() {
                        proofs.become_ready().await;
                    }
                    unproven = match proven.verdict {
                        Verdict::Unproven(_) => unproven + 1,
                        _ => 0,
                    };
                    last = proven.verdict;
                }
            });
        }
        tasks
    }

    /// Every client's health NOT_SERVING, as the replica stops (once the tasks are stopped).
    pub(crate) async fn stopping(&self) {
        for client in &self.clients {
            self.health
                .set_service_status(health_name(&client.alias), ServingStatus::NotServing)
                .await;
        }
    }

    /// How long until a client whose `last` verdict was that (after `unproven` verdictless
    /// proofs in a row) is proven again: the interval when it works, 30 s when it is
    /// misconfigured, 30 s doubling back to the interval while Cognito gives no verdict; spread
    /// by ±10 % so that a fleet's proofs do not come together.
    fn pause(&self, last: &Verdict, unproven: u32) -> Duration {
        let pause = match last {
            Verdict::Works(_) => self.interval,
            Verdict::Misconfigured(_) => RETRY_INTERVAL,
            Verdict::Unproven(_) => RETRY_INTERVAL.saturating_mul(1 << unproven.min(16)),
        };
        pause
            .min(self.interval)
            .mul_f64(rand::rng().random_range(0.9..=1.1))
    }

    /// Applies `proven` to the client at `index`; logs it unless it is the `last` verdict.
    async fn apply(&self, index: usize, proven: &Proven, last: Option<&Verdict>) {
        let client = &self.clients[index];
        let alias = client.alias.clone();
        metrics::counter!(m::CLIENT_CHECKS, "client" => alias.clone(), "result" => proven.verdict.name()).increment(1);
        let changed = last != Some(&proven.verdict);
        let latency_ms = u64::try_from(proven.latency.as_millis()).unwrap_or(u64::MAX);
        match &proven.verdict {
            Verdict::Works(mode) => {
                client.set_misconfigured(false);
                self.set_mode(&alias, Some(*mode));
                if changed {
                    tracing::info!(
                        client = alias,
                        probe = true,
                        prevent_user_existence_errors = mode.name(),
                        latency_ms,
                        "app client proven: it works"
                    );
                }
                if *mode == Mode::Legacy && changed {
                    tracing::warn!(
                        client = alias,
                        probe = true,
                        "the app client's pool answers PreventUserExistenceErrors=LEGACY: only \
                         this service's enumeration protection hides who has an account"
                    );
                }
            }
            Verdict::Misconfigured(cause) => {
                client.set_misconfigured(true);
                self.set_mode(&alias, None);
                if changed {
                    tracing::error!(
                        client = alias,
                        probe = true,
                        cause,
                        latency_ms,
                        "app client misconfigured: its calls are refused (CLIENT_MISCONFIGURED) \
                         until a proof passes"
                    );
                }
            }
            // No verdict: whatever was decided stands.
            Verdict::Unproven(cause) => {
                if changed {
                    tracing::warn!(
                        client = alias,
                        probe = true,
                        cause,
                        latency_ms,
                        "app client not proven: Cognito gave no verdict; proving again"
                    );
                }
            }
        }
        let ready = !client.misconfigured();
        metrics::gauge!(m::CLIENT_READY, "client" => alias.clone()).set(f64::from(u8::from(ready)));
        let status = match ready {
            true => ServingStatus::Serving,
            false => ServingStatus::NotServing,
        };
        self.health
            .set_service_status(health_name(&alias), status)
            .await;
    }

    /// Sets `cognito_client_info` to `mode` (`None`: unknown).
    fn set_mode(&self, alias: &str, mode: Option<Mode>) {
        let current = mode.map_or("unknown", Mode::name);
        for mode in MODES {
            let value = f64::from(u8::from(mode == current));
            metrics::gauge!(m::CLIENT_INFO, "client" => alias.to_owned(), "prevent_user_existence_errors" => mode).set(value);
        }
    }

    /// Makes the replica ready, once.
    async fn become_ready(&self) {
        if !self.ready.swap(true, Ordering::SeqCst) {
            self.health
                .set_service_status(SERVICE_NAME, ServingStatus::Serving)
                .await;
        }
    }
}
