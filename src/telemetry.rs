//! Logging and call context: `tracing` to standard output, as JSON lines (the default) or text,
//! filtered by `RUST_LOG`; request ids and W3C trace context that tie a call's lines together.
//! Log lines never hold passwords, codes, secrets or usernames (see `privacy`).

use std::io::IsTerminal;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, fmt};

use crate::settings::SettingError;

mod lines;
mod stdout;

pub(crate) use stdout::together;

/// Where and how log lines are written.
#[derive(Debug, Clone)]
pub struct LogSettings {
    /// An `EnvFilter` directive, e.g. `info` or `password_recovery=debug`.
    pub filter: String,
    /// JSON lines or human-readable text.
    pub format: LogFormat,
}

/// The shape of log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Human-readable text.
    Text,
}

/// What must outlive logging: the trace exporter, flushed by [`Telemetry::shutdown`].
#[must_use = "keep it until the process stops, then call shutdown"]
pub struct Telemetry {
    #[cfg(feature = "otel")]
    tracer_provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Telemetry {
    /// Flushes spans not yet exported.
    pub fn shutdown(self) {
        #[cfg(feature = "otel")]
        if let Some(provider) = self.tracer_provider
            && let Err(err) = provider.shutdown()
        {
            tracing::warn!(error = %err, "flushing traces failed");
        }
    }
}

/// Installs the global subscriber: log lines to stdout and, with the `otel` feature and an
/// `otlp_endpoint`, spans exported over OTLP/gRPC. A malformed `RUST_LOG` is a
/// [`SettingError`]; a subscriber already installed (as in tests) is left in place.
pub fn init(
    settings: &LogSettings,
    otlp_endpoint: Option<&str>,
) -> Result<Telemetry, SettingError> {
    let filter = EnvFilter::try_new(&settings.filter)
        .map_err(|e| SettingError::new("RUST_LOG", format!("not a log filter: {e}")))?;
    let ansi = std::io::stdout().is_terminal();
    let lines = match settings.format {
        LogFormat::Json => fmt::layer()
            .fmt_fields(lines::SpanFields)
            .event_format(lines::JsonLines)
            .with_writer(stdout::Stdout)
            .boxed(),
        LogFormat::Text => fmt::layer()
            .with_ansi(ansi)
            .with_writer(stdout::Stdout)
            .boxed(),
    };
    let subscriber = tracing_subscriber::registry().with(filter).with(lines);

    #[cfg(feature = "otel")]
    {
        let (layer, tracer_provider) = match otlp_endpoint {
            Some(endpoint) => {
                let (layer, provider) = otel::layer(endpoint)?;
                (Some(layer), Some(provider))
            }
            None => (None, None),
        };
        // Ignoring the error keeps a subscriber a test installed first.
        let _ = subscriber.with(layer).try_init();
        Ok(Telemetry { tracer_provider })
    }
    #[cfg(not(feature = "otel"))]
    {
        let _ = subscriber.try_init();
        if otlp_endpoint.is_some() {
            tracing::warn!(
                "OTEL_EXPORTER_OTLP_ENDPOINT is set, but this build has no `otel` feature: \
                 traces are not exported"
            );
        }
        Ok(Telemetry {})
    }
}

#[cfg(feature = "otel")]
mod otel {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::WithExportConfig;
    use opentelemetry_sdk::Resource;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use tracing_subscriber::registry::LookupSpan;

    use crate::settings::SettingError;

    /// A layer exporting spans to the OTLP/gRPC collector at `endpoint`.
    pub(crate) fn layer<S>(
        endpoint: &str,
    ) -> Result<
        (
            tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::Tracer>,
            SdkTracerProvider,
        ),
        SettingError,
    >
    where
        S: tracing::Subscriber + for<'span> LookupSpan<'span>,
    {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()
            .map_err(|e| SettingError::new("OTEL_EXPORTER_OTLP_ENDPOINT", e.to_string()))?;
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(
                Resource::builder()
                    .with_service_name(env!("CARGO_PKG_NAME"))
                    .build(),
            )
            .build();
        let tracer = provider.tracer(env!("CARGO_PKG_NAME"));
        Ok((tracing_opentelemetry::layer().with_tracer(tracer), provider))
    }
}

/// Lets a repeated warning through at most once per interval, counting the ones held back in
/// between, so that a flood (of stalled requests, say) is one line a minute, not one a request.
pub(crate) struct Occasionally {
    interval: std::time::Duration,
    last: std::sync::Mutex<Option<std::time::Instant>>,
    held_back: std::sync::atomic::AtomicU64,
}

impl Occasionally {
    /// At most one line per `interval`.
    pub(crate) const fn every(interval: std::time::Duration) -> Self {
        Self {
            interval,
            last: std::sync::Mutex::new(None),
            held_back: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// `Some(n)` when a line may be written now, `n` being how many were held back since the
    /// last one; `None` (and one more held back) otherwise.
    pub(crate) fn due(&self) -> Option<u64> {
        use std::sync::atomic::Ordering;
        let now = std::time::Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|at| now.duration_since(at) < self.interval) {
            self.held_back.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *last = Some(now);
        Some(self.held_back.swap(0, Ordering::Relaxed))
    }
}

/// The request id header: taken from the call, or generated.
pub(crate) const REQUEST_ID_HEADER: &str = "x-request-id";
/// Marks an answer that is the remembered outcome of an earlier call with the same
/// `request_id` (a header on the JSON door; initial metadata, or trailers on error, on gRPC).
pub(crate) const REPLAYED_HEADER: &str = "idempotent-replayed";

/// The longest caller-supplied request id kept; a longer or non-printable one is replaced.
const REQUEST_ID_MAX_LEN: usize = 128;

/// The caller's `x-request-id` if it is 1–128 printable ASCII characters, else a new UUID
/// (version 4). Its random bits come from the thread's CSPRNG (`rand::rng()`, ChaCha12 seeded
/// and reseeded from the OS): `Uuid::new_v4` asks the kernel for each one, a system call per
/// call.
pub(crate) fn request_id(supplied: Option<&str>) -> String {
    supplied
        .filter(|id| {
            (1..=REQUEST_ID_MAX_LEN).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_graphic())
        })
        .map(str::to_owned)
        .unwrap_or_else(|| {
            uuid::Builder::from_random_bytes(rand::random::<u128>().to_le_bytes())
                .into_uuid()
                .to_string()
        })
}

/// A W3C `traceparent` (version 00): the trace this call belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TraceParent {
    /// 32 lowercase hex digits, not all zero.
    pub(crate) trace_id: String,
    /// The caller's span id: 16 lowercase hex digits, not all zero.
    pub(crate) parent_id: String,
    /// The caller's sampling decision.
    pub(crate) sampled: bool,
}

impl TraceParent {
    /// Parses a `traceparent` header; `None` when it is malformed, as the spec asks.
    pub(crate) fn parse(value: &str) -> Option<Self> {
        let mut parts = value.trim().split('-');
        let (version, trace_id, parent_id, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let hex = |s: &str, len: usize| {
            s.len() == len
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        let nonzero = |s: &str| s.bytes().any(|b| b != b'0');
        // Version 00 has exactly four fields; later versions may append more.
        if !hex(version, 2) || version == "ff" || (version == "00" && parts.next().is_some()) {
            return None;
        }
        if !hex(trace_id, 32) || !nonzero(trace_id) || !hex(parent_id, 16) || !nonzero(parent_id) {
            return None;
        }
        if !hex(flags, 2) {
            return None;
        }
        let flags = u8::from_str_radix(flags, 16).ok()?;
        Some(Self {
            trace_id: trace_id.to_owned(),
            parent_id: parent_id.to_owned(),
            sampled: flags & 1 == 1,
        })
    }
}

/// Makes `span` a child of the caller's span in exported traces (with the `otel` feature).
#[cfg(not(feature = "otel"))]
pub(crate) fn link_remote_parent(_span: &tracing::Span, _trace: Option<&TraceParent>) {}

/// Makes `span` a child of the caller's span in exported traces.
#[cfg(feature = "otel")]
pub(crate) fn link_remote_parent(span: &tracing::Span, trace: Option<&TraceParent>) {
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
    };
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    let Some(trace) = trace else { return };
    let (Ok(trace_id), Ok(span_id)) = (
        TraceId::from_hex(&trace.trace_id),
        SpanId::from_hex(&trace.parent_id),
    ) else {
        return;
    };
    let flags = if trace.sampled {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    let remote = SpanContext::new(trace_id, span_id, flags, true, TraceState::default());
    // Fails only when no OpenTelemetry layer is installed: then there is nothing to link.
    let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_occasional_warning_is_let_through_once_per_interval_counting_the_rest() {
        let warn = Occasionally::every(std::time::Duration::from_secs(3600));
        assert_eq!(warn.due(), Some(0));
        assert_eq!(warn.due(), None);
        assert_eq!(warn.due(), None);
        let always = Occasionally::every(std::time::Duration::ZERO);
        assert_eq!(always.due(), Some(0));
        assert_eq!(always.due(), Some(0));
        *warn.last.lock().unwrap() = None;
        assert_eq!(warn.due(), Some(2), "the two held back are counted");
    }

    #[test]
    fn a_valid_request_id_is_kept_and_anything_else_replaced() {
        assert_eq!(request_id(Some("abc-123")), "abc-123");
        for bad in [
            None,
            Some(""),
            Some("has space"),
            Some("ünï"),
            Some(&*"x".repeat(129)),
        ] {
            let generated = request_id(bad);
            assert_eq!(generated.len(), 36, "{bad:?} → {generated}");
            let parsed = uuid::Uuid::parse_str(&generated).unwrap();
            assert_eq!(parsed.get_version(), Some(uuid::Version::Random));
            assert_eq!(parsed.get_variant(), uuid::Variant::RFC4122);
        }
        assert_ne!(request_id(None), request_id(None));
    }

    #[test]
    fn traceparent_follows_the_w3c_format() {
        let parsed =
            TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(parsed.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(parsed.parent_id, "00f067aa0ba902b7");
        assert!(parsed.sampled);
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
        // A future version may carry more fields.
        assert!(
            TraceParent::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-x")
                .is_some()
        );
    }
}
