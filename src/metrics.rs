//! Prometheus metrics: the process-wide recorder, the names of every series, and the
//! `/metrics` HTTP endpoint. Labels hold only method, service, code, protocol, outcome names and
//! the configured app clients' aliases: never a username, request id or secret.

use std::future::Future;
use std::sync::{OnceLock, RwLock};
use std::time::Duration;

use axum::http::header::CONTENT_TYPE;
use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

use crate::api::SERVICE_NAME;
use crate::fleet;
use crate::limits;

/// Calls started, by `grpc_service` and `grpc_method`.
pub const GRPC_STARTED: &str = "grpc_server_started_total";
/// Calls finished, by `grpc_service`, `grpc_method` and `grpc_code`.
pub const GRPC_HANDLED: &str = "grpc_server_handled_total";
/// Call latency, by `grpc_service` and `grpc_method`.
pub const GRPC_SECONDS: &str = "grpc_server_handling_seconds";
/// Calls in progress.
pub const GRPC_IN_FLIGHT: &str = "grpc_server_in_flight";
/// Requests sent to Cognito, by `operation` and `outcome` (`ok` or the error code).
pub const COGNITO_REQUESTS: &str = "cognito_requests_total";
/// Cognito request latency, by `operation`.
pub const COGNITO_SECONDS: &str = "cognito_request_seconds";
/// Connections open on the gRPC port.
pub const CONNECTIONS_OPEN: &str = "grpc_connections_open";
/// Connections closed at once, by `reason`: `max_connections` (every connection open had a
/// call in progress) or `peer_share` (so had every one of its peer's).
pub const CONNECTIONS_REFUSED: &str = "grpc_connections_refused_total";
/// Open connections closed to let a new one in (one that had sent no request, else the one
/// idle longest), by `reason`: `max_connections` or `peer_share`.
pub const CONNECTIONS_TAKEN_BACK: &str = "grpc_connections_taken_back_total";
/// Calls whose message was still arriving, answered `OVERLOADED` to let a new call in, by
/// `reason`: `max_concurrent_calls` or `peer_share`.
pub const CALLS_TAKEN_BACK: &str = "grpc_calls_taken_back_total";
/// Calls answered `OVERLOADED` at once, unread, because every place among the calls in
/// progress was held by a call whose message had arrived, by `reason`:
/// `max_concurrent_calls` or `peer_share`.
pub const CALLS_REFUSED: &str = "grpc_calls_refused_total";
/// Requests that did not arrive in time, by `stage`: `headers` (the connection was closed)
/// or `body` (the call was answered `REQUEST_TIMEOUT`).
pub const REQUEST_TIMEOUTS: &str = "grpc_request_timeouts_total";

/// Calls answered the remembered outcome of an earlier call with the same request_id, by
/// `grpc_method`.
pub const IDEMPOTENT_REPLAYS: &str = "idempotent_replays_total";
/// Calls with a request_id run unremembered because `IDEMPOTENCY_MAX_KEYS` outcomes were held.
pub const IDEMPOTENCY_FULL: &str = "idempotency_unremembered_total";
/// Callers policy changes noticed, by `result`: `reloaded`, or `failed` (the previous policy
/// stays in force).
pub const CALLERS_RELOADS: &str = "callers_policy_reloads_total";
/// TLS rotations noticed, by `result`: `reloaded`, or `failed` (the previous certificate stays).
pub const TLS_RELOADS: &str = "tls_certificate_reloads_total";
/// App client secret rotations noticed, by `client` (alias) and `result`: `reloaded`, or
/// `failed` (the previous secret stays).
pub const SECRET_RELOADS: &str = "cognito_client_secret_reloads_total";
/// 1 while an app client serves, 0 while its last proof found it misconfigured, by client.
pub const CLIENT_READY: &str = "cognito_client_ready";
/// 1 for how an app client's pool answers an unknown user, by client and
/// prevent_user_existence_errors (`ENABLED`, `LEGACY`, `unknown`).
pub const CLIENT_INFO: &str = "cognito_client_info";
/// Proofs of app clients, by client and result (`ready`, `misconfigured`, `unproven`).
pub const CLIENT_CHECKS: &str = "cognito_client_checks_total";

/// Latency buckets (seconds), from a fast local answer to `COGNITO_TIMEOUT`'s default and past.
const BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder once and returns the handle that renders it.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)
                .expect("buckets are not empty")
                .build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics stays empty");
            }
            describe();
            count_from_zero();
            let _ = SERIES.set(CallSeries::new());
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(Duration::from_secs(5));
                        upkeep.run_upkeep();
                    }
                })
                .expect("spawn metrics upkeep thread");
            handle
        })
        .clone()
}

fn describe() {
    describe_counter!(GRPC_STARTED, "gRPC calls started");
    describe_counter!(GRPC_HANDLED, "gRPC calls finished, by status code");
    describe_histogram!(GRPC_SECONDS, Unit::Seconds, "gRPC call latency");
    describe_gauge!(GRPC_IN_FLIGHT, "gRPC calls in progress");
    describe_counter!(COGNITO_REQUESTS, "Requests sent to Cognito, by outcome");
    describe_histogram!(COGNITO_SECONDS, Unit::Seconds, "Cognito request latency");
    describe_gauge!(CONNECTIONS_OPEN, "Connections open on the gRPC port");
    describe_counter!(
        limits::RATE_LIMITED,
        "Calls refused by a rate limit, by limiter"
    );
    describe_gauge!(
        limits::USERNAME_BUCKETS,
        "Per-username buckets held by this replica"
    );
    describe_counter!(
        limits::UPSTREAM_REJECTED,
        "Calls refused because too many were waiting on Cognito (overloaded); calls and \
         peer_calls: deprecated names of grpc_calls_refused_total"
    );
    describe_gauge!(
        fleet::BACKEND_UP,
        "1 while the shared rate-limit backend (Redis) answers, else 0"
    );
    describe_counter!(
        fleet::BACKEND_ERRORS,
        "Failures of the shared rate-limit backend, by kind"
    );
    describe_histogram!(
        fleet::BACKEND_SECONDS,
        Unit::Seconds,
        "Round trips to the shared rate-limit backend"
    );
    describe_counter!(
        IDEMPOTENT_REPLAYS,
        "Calls answered the remembered outcome of an earlier call with the same request_id"
    );
    describe_counter!(
        IDEMPOTENCY_FULL,
        "Calls with a request_id run unremembered: IDEMPOTENCY_MAX_KEYS outcomes were held"
    );
    describe_counter!(
        CALLERS_RELOADS,
        "Changed callers policies loaded (reloaded) or refused (failed: the previous policy stays)"
    );
    describe_counter!(
        TLS_RELOADS,
        "Changed TLS files loaded (reloaded) or refused (failed: the previous certificate stays)"
    );
    describe_gauge!(
        CLIENT_READY,
        "1 while the app client serves, 0 while its last proof found it misconfigured, by client"
    );
    describe_gauge!(
        CLIENT_INFO,
        "1 for how the app client's user pool answers an unknown user, by client and \
         prevent_user_existence_errors (ENABLED, LEGACY, unknown until proven)"
    );
    describe_counter!(
        CLIENT_CHECKS,
        "Proofs of app clients (a ForgotPassword for a username nobody has), by client and \
         result (ready, misconfigured, unproven)"
    );
    describe_counter!(
        SECRET_RELOADS,
        "Changed app client secret files loaded (reloaded) or refused (failed: the previous \
         secret stays), by client"
    );
    describe_counter!(
        CONNECTIONS_REFUSED,
        "Connections closed at once: every connection (or every one of the peer's) had a call \
         in progress"
    );
    describe_counter!(
        CONNECTIONS_TAKEN_BACK,
        "Open connections closed to let a new one in: one that had sent no request, else the \
         one idle longest"
    );
    describe_counter!(
        CALLS_TAKEN_BACK,
        "Calls whose message was still arriving, answered OVERLOADED to let a new call in"
    );
    describe_counter!(
        CALLS_REFUSED,
        "Calls answered OVERLOADED at once, unread: every place among the calls in progress \
         (or the peer's share of them) was held by a call whose message had arrived"
    );
    describe_counter!(
        REQUEST_TIMEOUTS,
        "Requests whose headers (connection closed) or message (call answered) did not arrive \
         in time"
    );
}

/// Puts every event counter whose labels are known up front at 0, so that an alert's
/// `increase()` sees its first event (a series that appears at 1 shows no increase), and the
/// username buckets' gauge at 0, so that a dashboard shows it from the start.
fn count_from_zero() {
    let zero = |counter: metrics::Counter| counter.increment(0);
    for reason in ["max_connections", "peer_share"] {
        zero(metrics::counter!(CONNECTIONS_REFUSED, "reason" => reason));
        zero(metrics::counter!(CONNECTIONS_TAKEN_BACK, "reason" => reason));
    }
    for reason in ["max_concurrent_calls", "peer_share"] {
        zero(metrics::counter!(CALLS_REFUSED, "reason" => reason));
        zero(metrics::counter!(CALLS_TAKEN_BACK, "reason" => reason));
    }
    for stage in ["headers", "body"] {
        zero(metrics::counter!(REQUEST_TIMEOUTS, "stage" => stage));
    }
    for limiter in limits::Limiter::ALL {
        zero(metrics::counter!(limits::RATE_LIMITED, "limiter" => limiter.name()));
    }
    zero(metrics::counter!(limits::UPSTREAM_REJECTED, "reason" => "overloaded"));
    zero(metrics::counter!(IDEMPOTENCY_FULL));
    // No bucket yet: the gauge is there before the first one (with limits on Redis, until a
    // Redis outage puts the replica on its own).
    metrics::gauge!(limits::USERNAME_BUCKETS).set(0.0);
}

/// The labels of a call's series. Every value but the client's and the caller's is one of a
/// fixed set; those two are bounded by the configured app clients and the callers policy.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub(crate) struct CallLabels<'a> {
    pub(crate) method: &'static str,
    pub(crate) protocol: &'static str,
    /// The caller's label ([`crate::callers::Callers::label`]).
    pub(crate) caller: &'a str,
    /// The app client's alias, or `-`; empty for a series without it.
    pub(crate) client: &'a str,
    /// The gRPC code's name; empty for a series without it.
    pub(crate) code: &'static str,
    pub(crate) reason: Option<&'static str>,
}

/// [`CallLabels`] owned, as a key of [`Handles`]; hashed alike.
#[derive(Hash, PartialEq, Eq)]
struct OwnedLabels {
    method: &'static str,
    protocol: &'static str,
    caller: Box<str>,
    client: Box<str>,
    code: &'static str,
    reason: Option<&'static str>,
}

impl hashbrown::Equivalent<OwnedLabels> for CallLabels<'_> {
    fn equivalent(&self, key: &OwnedLabels) -> bool {
        (
            self.method,
            self.protocol,
            self.caller,
            self.client,
            self.code,
            self.reason,
        ) == (
            key.method,
            key.protocol,
            &*key.caller,
            &*key.client,
            key.code,
            key.reason,
        )
    }
}

/// Handles of one series by labels: registered with the recorder the first time a set of
/// labels is seen, then reused.
struct Handles<H>(RwLock<hashbrown::HashMap<OwnedLabels, H>>);

impl<H: Clone> Handles<H> {
    fn new() -> Self {
        Self(RwLock::new(hashbrown::HashMap::new()))
    }

    fn get(&self, labels: &CallLabels<'_>, register: impl FnOnce() -> H) -> H {
        if let Some(handle) = self.0.read().unwrap_or_else(|e| e.into_inner()).get(labels) {
            return handle.clone();
        }
        let mut handles = self.0.write().unwrap_or_else(|e| e.into_inner());
        let key = OwnedLabels {
            method: labels.method,
            protocol: labels.protocol,
            caller: labels.caller.into(),
            client: labels.client.into(),
            code: labels.code,
            reason: labels.reason,
        };
        handles.entry(key).or_insert_with(register).clone()
    }
}

/// The series every call counts in, their handles kept, so that a call neither builds labels
/// nor looks its series up in the recorder.
pub(crate) struct CallSeries {
    in_flight: metrics::Gauge,
    started: Handles<metrics::Counter>,
    handled: Handles<metrics::Counter>,
    seconds: Handles<metrics::Histogram>,
    /// By operation (in `method`; the other labels empty).
    upstream: Handles<UpstreamSeries>,
}

/// The series a request to Cognito for one operation counts in when it succeeds:
/// `cognito_requests_total{outcome="ok"}` and `cognito_request_seconds` (which every attempt
/// records). A failed request's outcome can be any code Cognito sends: it is looked up.
#[derive(Clone)]
pub(crate) struct UpstreamSeries {
    pub(crate) ok: metrics::Counter,
    pub(crate) seconds: metrics::Histogram,
}

static SERIES: OnceLock<CallSeries> = OnceLock::new();

impl CallSeries {
    /// The calls' series, once [`install`] has put the recorder in place (before it, there is
    /// nowhere to count).
    pub(crate) fn get() -> Option<&'static Self> {
        SERIES.get()
    }

    fn new() -> Self {
        Self {
            in_flight: metrics::gauge!(GRPC_IN_FLIGHT),
            started: Handles::new(),
            handled: Handles::new(),
            seconds: Handles::new(),
            upstream: Handles::new(),
        }
    }

    /// The series of requests to Cognito for `operation`.
    pub(crate) fn upstream(&self, operation: &'static str) -> UpstreamSeries {
        let labels = CallLabels {
            method: operation,
            protocol: "",
            caller: "",
            client: "",
            code: "",
            reason: None,
        };
        self.upstream.get(&labels, || UpstreamSeries {
            ok: metrics::counter!(COGNITO_REQUESTS, "operation" => operation, "outcome" => "ok"),
            seconds: metrics::histogram!(COGNITO_SECONDS, "operation" => operation),
        })
    }

    /// `grpc_server_in_flight`.
    pub(crate) fn in_flight(&self) -> &metrics::Gauge {
        &self.in_flight
    }

    /// `grpc_server_started_total` of a call of `method` by `protocol` from `caller`.
    pub(crate) fn started(
        &self,
        method: &'static str,
        protocol: &'static str,
        caller: &str,
    ) -> metrics::Counter {
        let labels = CallLabels {
            method,
            protocol,
            caller,
            client: "",
            code: "",
            reason: None,
        };
        self.started.get(&labels, || {
            metrics::counter!(GRPC_STARTED, "grpc_service" => SERVICE_NAME, "grpc_method" => labels.method, "protocol" => labels.protocol, "caller" => labels.caller.to_owned())
        })
    }

    /// `grpc_server_handled_total` of `labels`.
    pub(crate) fn handled(&self, labels: &CallLabels<'_>) -> metrics::Counter {
        self.handled.get(labels, || {
            let (client, caller) = (labels.client.to_owned(), labels.caller.to_owned());
            match labels.reason {
                None => metrics::counter!(GRPC_HANDLED, "grpc_service" => SERVICE_NAME, "grpc_method" => labels.method, "grpc_code" => labels.code, "protocol" => labels.protocol, "client" => client, "caller" => caller),
                Some(reason) => metrics::counter!(GRPC_HANDLED, "grpc_service" => SERVICE_NAME, "grpc_method" => labels.method, "grpc_code" => labels.code, "protocol" => labels.protocol, "client" => client, "caller" => caller, "reason" => reason),
            }
        })
    }

    /// `grpc_server_handling_seconds` of `labels` but the code and reason.
    pub(crate) fn seconds(&self, labels: &CallLabels<'_>) -> metrics::Histogram {
        let labels = CallLabels {
            code: "",
            reason: None,
            ..*labels
        };
        self.seconds.get(&labels, || {
            metrics::histogram!(GRPC_SECONDS, "grpc_service" => SERVICE_NAME, "grpc_method" => labels.method, "protocol" => labels.protocol, "client" => labels.client.to_owned(), "caller" => labels.caller.to_owned())
        })
    }
}

/// Serves `GET /metrics` in Prometheus text format on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    handle: PrometheusHandle,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let router = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let handle = handle.clone();
            async move {
                (
                    [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
                    handle.render(),
                )
            }
        }),
    );
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use std::hash::BuildHasher;

    use super::*;

    fn labels<'a>(caller: &'a str, client: &'a str) -> CallLabels<'a> {
        CallLabels {
            method: "ForgotPassword",
            protocol: "grpc",
            caller,
            client,
            code: "OK",
            reason: None,
        }
    }

    #[test]
    fn borrowed_labels_find_the_handle_their_owned_twin_keys() {
        let handles: Handles<u32> = Handles::new();
        let registered = std::cell::Cell::new(0);
        let register = || {
            registered.set(registered.get() + 1);
            registered.get()
        };
        let (web, app) = (String::from("web"), String::from("app"));
        assert_eq!(handles.get(&labels(&web, "mobile"), register), 1);
        assert_eq!(handles.get(&labels("web", "mobile"), register), 1);
        assert_eq!(handles.get(&labels(&app, "mobile"), register), 2);
        assert_eq!(handles.get(&labels("web", "-"), register), 3);
        assert_eq!(handles.get(&labels(&app, "mobile"), register), 2);
        assert_eq!(registered.get(), 3);

        // Found by the read path alone: the borrowed labels hash as the owned key does.
        let map = handles.0.read().unwrap();
        let key = map
            .keys()
            .find(|key| &*key.caller == "web" && &*key.client == "mobile");
        let key = key.expect("registered");
        let hasher = map.hasher();
        assert_eq!(
            hasher.hash_one(labels("web", "mobile")),
            hasher.hash_one(key)
        );
        assert!(map.get(&labels("web", "mobile")).is_some());
    }
}
