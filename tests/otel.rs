//! Traces over OTLP/gRPC, as the README promises: the release binary built with `--features
//! otel` (`make test` builds it as `target/release/password-recovery-otel`) exports each call's
//! span to a real OTLP/gRPC receiver (the collector's `TraceService`, from the
//! `opentelemetry-proto` service definitions) as a child of the caller's `traceparent`, or as a
//! root without one, under `service.name` `password-recovery`, and no exported byte holds the
//! username, the code or the password.

mod common;

use std::sync::{Arc, Mutex};

use common::process::ServiceProcess;
use common::{CLIENT_ID, CLIENT_SECRET, FakeCognito, confirm, forgot};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::Span;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

/// The release binary with the `otel` feature.
const OTEL_BINARY: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/target/release/password-recovery-otel"
);

/// An OTLP/gRPC trace receiver that keeps every export it is sent.
#[derive(Clone, Default)]
struct Receiver {
    exports: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        self.exports.lock().unwrap().push(request.into_inner());
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Receiver {
    /// Serves on a free loopback port; returns its `http://` endpoint.
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        format!("http://{addr}")
    }
}

fn text(value: &Option<AnyValue>) -> Option<&str> {
    match value.as_ref()?.value.as_ref()? {
        any_value::Value::StringValue(text) => Some(text),
        _ => None,
    }
}

fn attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a str> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| text(&kv.value))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn each_call_is_exported_over_otlp_as_a_child_of_its_traceparent() {
    assert!(
        std::path::Path::new(OTEL_BINARY).exists(),
        "{OTEL_BINARY} is missing: run `make test`, or `cargo build --release --locked \
         --features otel && cp target/release/password-recovery {OTEL_BINARY}`"
    );
    let receiver = Receiver::default();
    let endpoint = receiver.start().await;
    let cognito = FakeCognito::start().await;
    let service = ServiceProcess::start_binary(
        OTEL_BINARY,
        &[
            ("COGNITO_CLIENT_ID", CLIENT_ID),
            ("COGNITO_CLIENT_SECRET", CLIENT_SECRET),
            ("AWS_REGION", "us-east-1"),
            ("AWS_ENDPOINT_URL", cognito.url.as_str()),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ],
    )
    .await;
    let mut client = service.client().await;
    let (trace_id, parent_id) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let username = "otel.private@example.com";

    // A call in the caller's trace, and one that starts its own.
    let mut traced = Request::new(forgot(username));
    traced.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{parent_id}-01").parse().unwrap(),
    );
    client.forgot_password(traced).await.unwrap();
    let request = confirm(username);
    let (code, password) = (request.confirmation_code.clone(), request.password.clone());
    client.confirm_forgot_password(request).await.unwrap();
    assert_eq!(cognito.recorded().len(), 2);
    // The batch exporter sends what it holds when the process stops.
    let (status, _, stderr) = service.terminate().await;
    assert_eq!(status.code(), Some(0), "{stderr}");

    let exports = receiver.exports.lock().unwrap().clone();
    assert!(!exports.is_empty(), "nothing was exported");
    let mut calls: Vec<&Span> = Vec::new();
    for export in &exports {
        for resource_spans in &export.resource_spans {
            let resource = resource_spans.resource.as_ref().expect("a resource");
            assert_eq!(
                attribute(&resource.attributes, "service.name"),
                Some("password-recovery"),
                "{resource:?}"
            );
            for scope in &resource_spans.scope_spans {
                calls.extend(scope.spans.iter().filter(|span| span.name == "call"));
            }
        }
    }
    assert_eq!(calls.len(), 2, "one span per call: {calls:#?}");
    let method = |span: &Span| attribute(&span.attributes, "grpc.method").map(str::to_owned);
    let child = calls
        .iter()
        .find(|span| method(span).as_deref() == Some("ForgotPassword"))
        .expect("ForgotPassword's span");
    assert_eq!(hex(&child.trace_id), trace_id, "in the caller's trace");
    assert_eq!(
        hex(&child.parent_span_id),
        parent_id,
        "the caller's span its parent"
    );
    assert_ne!(hex(&child.span_id), parent_id);

    let root = calls
        .iter()
        .find(|span| method(span).as_deref() == Some("ConfirmForgotPassword"))
        .expect("ConfirmForgotPassword's span");
    assert!(root.parent_span_id.is_empty(), "a root span: {root:?}");
    assert_ne!(hex(&root.trace_id), trace_id, "a trace of its own");
    assert_eq!(root.trace_id.len(), 16);
    assert!(root.trace_id.iter().any(|&b| b != 0));

    // Nothing exported holds what a log line may not.
    let everything = format!("{exports:?}");
    for secret in [username, &code, &password, CLIENT_SECRET] {
        assert!(!everything.contains(secret), "{secret} was exported");
    }
}
