//! Proving the app clients (README "Proving the app clients"): each is proven
//! ([`AppClient::prove`]) at start-up, after each change of its secret, and every
//! `CLIENT_CHECK_INTERVAL` (every 30 s at most while it is not proven to work). A verdict sets
//! whether its calls are refused, its health service `client/<alias>`, its metrics, and, for the
//! default client before the replica is first ready, readiness. Once ready, a replica stays
//! ready: a later verdict refuses only that client's calls, so the other clients keep serving and
//! no verdict (nor a Cognito outage) can empty a fleet's endpoints.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use tokio::task::JoinSet;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::api::SERVICE_NAME;
use crate::cognito::AppClient;
use crate::cognito::proof::{Mode, Verdict};
use crate::metrics as m;

/// A client not proven to work is proven again after this long at most.
const RETRY_INTERVAL: Duration = Duration::from_secs(30);

/// The health service name of the client `alias`.
pub fn health_name(alias: &str) -> String {
    format!("client/{alias}")
}

/// The label values of `cognito_client_info`'s `prevent_user_existence_errors`.
const MODES: [&str; 3] = ["ENABLED", "LEGACY", "unknown"];

/// What a proof found, and how long it took.
#[derive(Debug, Clone)]
pub struct Proven {
    /// The client's alias.
    pub alias: String,
    /// The verdict.
    pub verdict: Verdict,
    /// How long Cognito took (retries included).
    pub latency: Duration,
}

impl Proven {
    /// One line: alias, verdict, mode, latency, and the cause unless it works.
    pub fn line(&self) -> String {
        let mode = match &self.verdict {
            Verdict::Works(mode) => mode.name(),
            _ => "-",
        };
        let mut line = format!(
            "client={} verdict={} prevent_user_existence_errors={mode} latency={}ms",
            self.alias,
            self.verdict.name(),
            self.latency.as_millis()
        );
        if let Verdict::Misconfigured(cause) | Verdict::Unproven(cause) = &self.verdict {
            line.push_str(&format!(" cause={cause:?}"));
        }
        line
    }
}

/// Proves `client` once.
pub(crate) async fn prove(client: &AppClient) -> Proven {
    let (verdict, latency) = client.prove().await;
    Proven {
        alias: client.alias.clone(),
        verdict,
        latency,
    }
}

/// `password-recovery check`: every app client of `config`, proven once.
pub async fn check(config: &crate::config::Config) -> Result<Vec<Proven>, crate::app::AppError> {
    let cognito = crate::cognito::Cognito::build(&config.cognito).await?;
    Ok(prove_all(cognito.clients()).await)
}

/// Proves every one of `clients` at once.
pub(crate) async fn prove_all(clients: &[Arc<AppClient>]) -> Vec<Proven> {
    let mut proofs = JoinSet::new();
    for (index, client) in clients.iter().enumerate() {
        let client = client.clone();
        proofs.spawn(async move { (index, prove(&client).await) });
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
    /// Each client's last verdict, so that a line is logged only when it changes.
    last: Mutex<Vec<Option<Verdict>>>,
}

impl Proofs {
    /// The proofs of `clients` (the default at `default`) every `interval`, told on `health`.
    pub(crate) fn new(
        clients: Vec<Arc<AppClient>>,
        default: usize,
        interval: Duration,
        health: HealthReporter,
    ) -> Arc<Self> {
        for client in &clients {
            for mode in MODES {
                let value = f64::from(u8::from(mode == "unknown"));
                metrics::gauge!(m::CLIENT_INFO, "client" => client.alias.clone(), "prevent_user_existence_errors" => mode).set(value);
            }
            metrics::gauge!(m::CLIENT_READY, "client" => client.alias.clone()).set(1.0);
        }
        let last = Mutex::new(vec![None; clients.len()]);
        Arc::new(Self {
            clients,
            default,
            interval,
            health,
            ready: AtomicBool::new(false),
            last,
        })
    }

    /// Proves every client once, then makes the replica ready unless its default client was
    /// proven misconfigured (an unproven one does not hold readiness back).
    pub(crate) async fn first(&self) {
        for (index, proven) in prove_all(&self.clients).await.into_iter().enumerate() {
            self.apply(index, &proven).await;
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
    }

    /// Proves each client again after each change of its secret and every interval, until the
    /// tasks are aborted.
    pub(crate) fn spawn(self: &Arc<Self>) -> JoinSet<()> {
        let mut tasks = JoinSet::new();
        for (index, client) in self.clients.iter().cloned().enumerate() {
            let proofs = self.clone();
            tasks.spawn(async move {
                loop {
                    let pause = proofs.pause(&client);
                    tokio::select! {
                        () = tokio::time::sleep(pause) => {}
                        () = client.secret_changed() => {}
                    }
                    let proven = prove(&client).await;
                    proofs.apply(index, &proven).await;
                    if index == proofs.default && !client.misconfigured() {
                        proofs.become_ready().await;
                    }
                }
            });
        }
        tasks
    }

    /// How long until `client` is proven again: the interval, spread by ±10 % so that a
    /// fleet's proofs do not come together, or sooner while it is not proven to work.
    fn pause(&self, client: &AppClient) -> Duration {
        let spread = self.interval.mul_f64(rand::rng().random_range(0.9..=1.1));
        match client.misconfigured() {
            true => spread.min(RETRY_INTERVAL),
            false => spread,
        }
    }

    /// Applies `proven` to the client at `index`; logs it when its verdict changed.
    async fn apply(&self, index: usize, proven: &Proven) {
        let client = &self.clients[index];
        let alias = client.alias.clone();
        metrics::counter!(m::CLIENT_CHECKS, "client" => alias.clone(), "result" => proven.verdict.name()).increment(1);
        let changed = {
            let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            let changed = last[index].as_ref() != Some(&proven.verdict);
            last[index] = Some(proven.verdict.clone());
            changed
        };
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
