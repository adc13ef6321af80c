//! The Connect protocol's unary calls (connectrpc.com/docs/protocol) on the gRPC port, for
//! callers without a gRPC stack: `POST /passwordrecovery.v1.PasswordRecovery/<Method>` with a
//! proto3 JSON (`application/json`) or binary (`application/proto`) body, over HTTP/1.1 or
//! HTTP/2, answered by the very same service as gRPC calls: the same places among the calls in
//! progress, validation, limits, enumeration protection, budget, log line, audit event and
//! metrics (`protocol="connect"`).
//!
//! [`Protocols`] sits in front of tonic's routes and sends a request by its content type:
//! `application/grpc…` to tonic exactly as before, anything else here. The body is read to
//! `MAX_REQUEST_BYTES` and no further; errors are Connect's JSON error, each gRPC detail
//! carried as `{"type", "value" (base64 of the protobuf), "debug" (the detail as JSON)}`, with
//! `Retry-After` wherever a `RetryInfo` is.

use std::convert::Infallible;
use std::io::ErrorKind;
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use bytes::Bytes;
use http::header::{ALLOW, CONNECTION, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, HeaderValue, Method, StatusCode, Version};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use prost::Message;
use serde_json::{Value, json};
use tonic::body::Body;
use tonic::{Code, Status};
use tonic_types::ErrorDetails;
use tower::Service as HttpService;

use super::call::{Call, Ending, Protocol, Refusal, Reply};
use super::intake::Gate;
use super::service::Service;
use super::{HttpFuture, HttpResponse, SERVICE_NAME};
use crate::connections::{ConnectionInfo, Unanswered};
use crate::domain::{FieldViolation, Rpc};
use crate::error::{Classified, Error};
use crate::proto::v1 as pb;
use crate::telemetry::{REPLAYED_HEADER, REQUEST_ID_HEADER};

/// The content types a unary Connect call may carry, as `Accept-Post` lists them.
const ACCEPTED: &str = "application/json, application/proto";
/// The caller's deadline header.
const CONNECT_TIMEOUT: &str = "connect-timeout-ms";
/// The longest field name quoted back in an "unknown field" answer.
const FIELD_NAME_MAX_CHARS: usize = 64;

/// A unary call's message encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Codec {
    /// Proto3 JSON (`application/json`).
    Json,
    /// Binary protobuf (`application/proto`).
    Proto,
}

impl Codec {
    /// The codec of a `Content-Type`: `application/json` (any charset parameter naming UTF-8)
    /// or `application/proto`; `None` for anything else.
    fn of(headers: &HeaderMap) -> Option<Self> {
        let value = headers.get(CONTENT_TYPE)?.to_str().ok()?;
        let mut parts = value.split(';').map(str::trim);
        let essence = parts.next()?.to_ascii_lowercase();
        let utf8 = parts.all(|param| match param.split_once('=') {
            Some((name, charset)) if name.trim().eq_ignore_ascii_case("charset") => charset
                .trim()
                .trim_matches('"')
                .eq_ignore_ascii_case("utf-8"),
            _ => true,
        });
        match essence.as_str() {
            "application/json" if utf8 => Some(Self::Json),
            "application/proto" => Some(Self::Proto),
            _ => None,
        }
    }

    fn content_type(self) -> &'static str {
        match self {
            Self::Json => "application/json",
            Self::Proto => "application/proto",
        }
    }

    /// Decodes a request message; a refusal names what is wrong without quoting any value.
    fn decode<M>(self, body: &[u8]) -> Result<M, Error>
    where
        M: Message + Default + serde::de::DeserializeOwned,
    {
        match self {
            Self::Proto => M::decode(body).map_err(|_| Error::MalformedRequest),
            Self::Json => serde_json::from_slice(body).map_err(|err| refused_json(&err)),
        }
    }

    fn encode<M: Message + serde::Serialize>(self, message: &M) -> Vec<u8> {
        match self {
            Self::Proto => message.encode_to_vec(),
            // Generated serialisers of plain messages cannot fail.
            Self::Json => serde_json::to_vec(message).unwrap_or_else(|_| b"{}".to_vec()),
        }
    }
}

/// What a JSON body that did not decode is refused as: an unknown field is an invalid argument
/// naming the field; anything else (not JSON, a value of the wrong type) is
/// `MALFORMED_REQUEST`. serde's messages may quote the value (a password, say), so they are
/// never passed on; only an unknown field's name is.
fn refused_json(err: &serde_json::Error) -> Error {
    let message = err.to_string();
    let unknown = message
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split_once('`'))
        .map(|(name, _)| name);
    match unknown {
        Some(name) if err.is_data() => Error::InvalidRequest(vec![FieldViolation {
            field: name.chars().take(FIELD_NAME_MAX_CHARS).collect(),
            description: "unknown field".into(),
        }]),
        _ => Error::MalformedRequest,
    }
}

/// Serves the PasswordRecovery RPCs by the Connect protocol.
#[derive(Clone)]
pub(crate) struct Connect {
    service: Service,
    gate: Gate,
}

impl Connect {
    /// The Connect door to `service`, whose calls take their places at `gate` like gRPC's.
    pub fn new(service: Service, gate: Gate) -> Self {
        Self { service, gate }
    }

    /// Answers one HTTP request that is not gRPC. On HTTP/2, a body this door answered
    /// without reading to its end is read and dropped behind the answer ([`linger`]), so the
    /// client sees the answer rather than a reset stream.
    async fn serve(self, request: http::Request<Body>) -> HttpResponse {
        let http1 = request.version() < Version::HTTP_2;
        let (parts, body) = request.into_parts();
        let declared = declared_length(&parts.headers);
        let mut body = Some(body);
        let within = self.gate.body_timeout();
        let answer = self.answer(parts, &mut body, http1).await;
        if let (false, Some(unread)) = (http1, body) {
            linger(unread, declared, within);
        }
        answer
    }

    /// The answer to a request with `parts`; `body` is taken once it is read.
    async fn answer(
        self,
        parts: http::request::Parts,
        body: &mut Option<Body>,
        http1: bool,
    ) -> HttpResponse {
        let Some(rpc) = Rpc::from_path(SERVICE_NAME, parts.uri.path()) else {
            return protocol_error(
                StatusCode::NOT_FOUND,
                Code::Unimplemented,
                "no such procedure: this port serves /passwordrecovery.v1.PasswordRecovery/\
                 ForgotPassword and /ConfirmForgotPassword",
            );
        };
        if parts.method != Method::POST {
            let mut answer = protocol_error(
                StatusCode::METHOD_NOT_ALLOWED,
                Code::Unimplemented,
                "use POST",
            );
            answer
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static("POST"));
            return answer;
        }
        let Some(codec) = Codec::of(&parts.headers) else {
            let mut answer = protocol_error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                Code::Unknown,
                "unsupported content type: use application/json or application/proto",
            );
            answer
                .headers_mut()
                .insert("accept-post", HeaderValue::from_static(ACCEPTED));
            return answer;
        };
        if let Some(problem) = unsupported_headers(&parts.headers) {
            return protocol_error(StatusCode::BAD_REQUEST, Code::InvalidArgument, problem);
        }
        let call = match self
            .gate
            .start(rpc, Protocol::Connect, &parts.headers, &parts.extensions)
        {
            Ok(call) => call,
            Err(refused) => return error_answer(refused),
        };
        // From here on, a call whose caller goes away is dropped, and so finished as
        // cancelled.
        let message = match self.read_message(&call, &parts.headers, body).await {
            Ok(message) => message,
            Err((error, ending)) => return refuse(call, error, ending, http1),
        };
        match rpc {
            Rpc::ForgotPassword => match codec.decode::<pb::ForgotPasswordRequest>(&message) {
                Ok(request) => {
                    let reply = self.service.forgot_password(call, request).await;
                    answer(codec, reply.map(pb::ForgotPasswordResponse::from))
                }
                Err(error) => refuse(call, error, Ending::Answered, http1),
            },
            Rpc::ConfirmForgotPassword => {
                match codec.decode::<pb::ConfirmForgotPasswordRequest>(&message) {
                    Ok(request) => {
                        let reply = self.service.confirm_forgot_password(call, request).await;
                        answer(codec, reply.map(|()| pb::ConfirmForgotPasswordResponse {}))
                    }
                    Err(error) => refuse(call, error, Ending::Answered, http1),
                }
            }
        }
    }

    /// The message of `call`, read to `MAX_REQUEST_BYTES` within `REQUEST_BODY_TIMEOUT`; or
    /// why there is none. `body` is taken unless it is refused unread: by a bad
    /// `Connect-Timeout-Ms`, or by its length.
    async fn read_message(
        &self,
        call: &Call,
        headers: &HeaderMap,
        body: &mut Option<Body>,
    ) -> Result<Bytes, (Error, Ending)> {
        if let Some(violation) = bad_timeout(headers) {
            return Err((Error::InvalidRequest(vec![violation]), Ending::Answered));
        }
        let limit = self.gate.max_request_bytes();
        if declared_length(headers).is_some_and(|length| length > limit as u64) {
            return Err((Error::RequestTooLarge { limit }, Ending::Answered));
        }
        let unread = body.take().ok_or((Error::Internal, Ending::Answered))?;
        tokio::select! {
            read = read_body(unread, limit) => read,
            error = call.stalled(self.gate.body_timeout()) => Err((error, Ending::Answered)),
        }
    }
}

/// The violation of a `Connect-Timeout-Ms` that is not Connect's positive integer of at most
/// 10 digits; `None` when it is absent or well formed.
fn bad_timeout(headers: &HeaderMap) -> Option<FieldViolation> {
    let value = headers.get(CONNECT_TIMEOUT)?;
    let valid = value
        .to_str()
        .ok()
        .and_then(super::call::parse_connect_timeout)
        .is_some();
    (!valid).then(|| FieldViolation {
        field: "Connect-Timeout-Ms".into(),
        description: "must be a positive integer of at most 10 digits (milliseconds)".into(),
    })
}

/// The most of an unread HTTP/2 request body read and dropped behind an early answer.
const LINGER_BYTES: u64 = 1 << 20;

/// Reads and drops the rest of `body` (a request answered before its end) for at most
/// `within` and [`LINGER_BYTES`], then drops it: an HTTP/2 client still sending then gets the
/// end of its stream (or, past either bound, a reset with NO_ERROR) after the whole answer,
/// which some clients (curl) need to report the answer at all. A body announcing more than
/// the bound (`declared`, its `Content-Length`) is not read.
fn linger(body: Body, declared: Option<u64>, within: Duration) {
    if declared.is_some_and(|length| length > LINGER_BYTES) {
        return;
    }
    tokio::spawn(async move {
        let drain = async {
            let mut body = std::pin::pin!(body);
            let mut read = 0u64;
            while let Some(Ok(frame)) = body.frame().await {
                read += frame.data_ref().map_or(0, |d| d.len() as u64);
                if read > LINGER_BYTES {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(within, drain).await;
    });
}

/// A request header this door does not accept: a `Connect-Protocol-Version` other than 1, or a
/// compressed body.
fn unsupported_headers(headers: &HeaderMap) -> Option<&'static str> {
    let value = |name: &str| headers.get(name).map(|v| v.to_str().unwrap_or("?").trim());
    if value("connect-protocol-version").is_some_and(|v| v != "1") {
        return Some("unsupported Connect-Protocol-Version: this server speaks version 1");
    }
    if value("content-encoding").is_some_and(|v| !v.eq_ignore_ascii_case("identity")) {
        return Some("compressed requests are not accepted: send the body uncompressed");
    }
    None
}

/// Reads the body to `limit` bytes and no further: a longer one is `REQUEST_TOO_LARGE` once
/// the limit is passed; a body that breaks off means the caller went away, one whose framing
/// is broken (a bad chunk, say) is `MALFORMED_REQUEST`.
async fn read_body(body: Body, limit: usize) -> Result<Bytes, (Error, Ending)> {
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err) if err.downcast_ref::<LengthLimitError>().is_some() => {
            Err((Error::RequestTooLarge { limit }, Ending::Answered))
        }
        Err(err) => Err(body_failure(&*err, limit)),
    }
}

/// What a body that failed to arrive means: more than a request's worth sent unanswered
/// (the connection stopped reading: `REQUEST_TOO_LARGE`); its framing broken (hyper's
/// decoder refused it, invalid data or input: `MALFORMED_REQUEST`); otherwise the connection
/// or stream ended under it (a TLS record error included), and the caller went away.
fn body_failure(err: &(dyn std::error::Error + 'static), limit: usize) -> (Error, Ending) {
    let mut cause = Some(err);
    while let Some(err) = cause {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            let inner = io.get_ref();
            if inner.is_some_and(|e| e.is::<Unanswered>()) {
                return (Error::RequestTooLarge { limit }, Ending::Answered);
            }
            if inner.is_some_and(|e| e.is::<rustls::Error>()) {
                return (Error::Cancelled, Ending::CallerGone);
            }
            return match io.kind() {
                ErrorKind::InvalidData | ErrorKind::InvalidInput => {
                    (Error::MalformedRequest, Ending::Answered)
                }
                _ => (Error::Cancelled, Ending::CallerGone),
            };
        }
        cause = err.source();
    }
    (Error::Cancelled, Ending::CallerGone)
}

/// The body's length by its `Content-Length`, when it has one.
fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// Finishes `call` with `error` before it reached the service, and answers it. A message that
/// did not arrive in time is answered 408; on HTTP/1.1 the connection then closes, since the
/// rest of the body will never be read.
fn refuse(call: Call, error: Error, ending: Ending, http1: bool) -> HttpResponse {
    let timed_out = matches!(error, Error::RequestTimeout { .. });
    let mut answer = error_answer(call.refuse(error, ending));
    if timed_out {
        *answer.status_mut() = StatusCode::REQUEST_TIMEOUT;
        if http1 {
            answer
                .headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
    }
    answer
}

/// The service's reply as a Connect response.
fn answer<M: Message + serde::Serialize>(codec: Codec, reply: Reply<M>) -> HttpResponse {
    let mut answer = match reply.result {
        Ok(message) => {
            let body = Body::new(Full::new(Bytes::from(codec.encode(&message))));
            let mut answer = http::Response::new(body);
            answer
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(codec.content_type()));
            answer
        }
        Err(error) => error_json(&error),
    };
    copy_request_id(&reply.request_id, answer.headers_mut());
    if reply.replayed {
        answer
            .headers_mut()
            .insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
    }
    answer
}

/// A refusal as a Connect error answer.
fn error_answer(refused: Refusal) -> HttpResponse {
    answer(
        Codec::Json,
        refused.widen::<pb::ConfirmForgotPasswordResponse>(),
    )
}

/// A Connect error for `error`: its HTTP status, the JSON error with every detail, and
/// `Retry-After` when the details hold a `RetryInfo`.
fn error_json(error: &Classified) -> HttpResponse {
    let body = json!({
        "code": connect_code(error.code),
        "message": error.message,
        "details": details_json(&error.details),
    });
    let mut answer = json_error(http_status(error.code), &body);
    let retry_after = error.details.retry_info().and_then(|info| info.retry_delay);
    if let Some(delay) = retry_after {
        answer
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(whole_seconds(delay)));
    }
    answer
}

/// An error of the protocol itself (no call started): no details.
fn protocol_error(http: StatusCode, code: Code, message: &str) -> HttpResponse {
    json_error(
        http,
        &json!({ "code": connect_code(code), "message": message }),
    )
}

fn json_error(http: StatusCode, body: &Value) -> HttpResponse {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut answer = http::Response::new(Body::new(Full::new(Bytes::from(bytes))));
    *answer.status_mut() = http;
    answer
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    answer
}

fn copy_request_id(request_id: &str, headers: &mut HeaderMap) {
    if let Ok(id) = HeaderValue::from_str(request_id) {
        headers.insert(REQUEST_ID_HEADER, id);
    }
}

/// Whole seconds, rounded up: what `Retry-After` can say of a delay.
fn whole_seconds(delay: Duration) -> u64 {
    delay.as_secs() + u64::from(delay.subsec_nanos() > 0)
}

/// The details of an error as Connect carries them, in the order gRPC's
/// `grpc-status-details-bin` holds them: each `{"type", "value" (base64 of the protobuf),
/// "debug" (the detail as proto3 JSON)}`.
fn details_json(details: &ErrorDetails) -> Vec<Value> {
    use tonic_types::pb;
    fn detail(type_name: &str, message: &impl Message, debug: Value) -> Value {
        json!({
            "type": type_name,
            "value": STANDARD_NO_PAD.encode(message.encode_to_vec()),
            "debug": debug,
        })
    }
    let mut json = Vec::new();
    if let Some(info) = details.retry_info() {
        let debug = match info.retry_delay {
            Some(delay) => json!({ "retryDelay": proto_json_duration(delay) }),
            None => json!({}),
        };
        let message = pb::RetryInfo::from(info.clone());
        json.push(detail("google.rpc.RetryInfo", &message, debug));
    }
    if let Some(quota) = details.quota_failure() {
        let violations: Vec<Value> = quota
            .violations
            .iter()
            .map(|v| json!({ "subject": v.subject, "description": v.description }))
            .collect();
        let message = pb::QuotaFailure::from(quota.clone());
        let debug = json!({ "violations": violations });
        json.push(detail("google.rpc.QuotaFailure", &message, debug));
    }
    if let Some(info) = details.error_info() {
        let debug =
            json!({ "reason": info.reason, "domain": info.domain, "metadata": info.metadata });
        let message = pb::ErrorInfo::from(info.clone());
        json.push(detail("google.rpc.ErrorInfo", &message, debug));
    }
    if let Some(bad) = details.bad_request() {
        let violations: Vec<Value> = bad
            .field_violations
            .iter()
            .map(|v| json!({ "field": v.field, "description": v.description }))
            .collect();
        let message = pb::BadRequest::from(bad.clone());
        let debug = json!({ "fieldViolations": violations });
        json.push(detail("google.rpc.BadRequest", &message, debug));
    }
    json
}

/// A `google.protobuf.Duration` in proto3 JSON: seconds with up to 9 fractional digits, `s`.
fn proto_json_duration(delay: Duration) -> String {
    match delay.subsec_nanos() {
        0 => format!("{}s", delay.as_secs()),
        nanos => {
            let fraction = format!("{nanos:09}");
            format!("{}.{}s", delay.as_secs(), fraction.trim_end_matches('0'))
        }
    }
}

/// Connect's name of a gRPC code.
fn connect_code(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "canceled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

/// The HTTP status of a Connect error with `code`, from the protocol's table.
fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            StatusCode::BAD_REQUEST
        }
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::Ok | Code::Unknown | Code::Internal | Code::DataLoss => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    }
}

/// The answer to a request that arrived on a connection whose place was just taken back: it
/// is closing, and nothing of the request was done.
fn closing(grpc: bool) -> HttpResponse {
    const CLOSING: &str = "this connection is closing; retry on a new one";
    match grpc {
        true => Status::unavailable(CLOSING).into_http(),
        false => protocol_error(StatusCode::SERVICE_UNAVAILABLE, Code::Unavailable, CLOSING),
    }
}

/// True for a gRPC request (`application/grpc`, `application/grpc+proto`, …).
fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// In front of tonic's routes `S`: gRPC requests go to them, any other to the Connect door
/// (when it is open; `CONNECT_PROTOCOL=false` closes it and everything goes to tonic).
#[derive(Clone)]
pub(crate) struct Protocols<S> {
    grpc: S,
    connect: Option<Connect>,
}

/// Puts [`Protocols`] in front of a service.
#[derive(Clone)]
pub(crate) struct ProtocolsLayer {
    connect: Option<Connect>,
}

impl ProtocolsLayer {
    /// Sends non-gRPC requests to `connect`, or, with `None`, everything to the routes.
    pub fn new(connect: Option<Connect>) -> Self {
        Self { connect }
    }
}

impl<S> tower::Layer<S> for ProtocolsLayer {
    type Service = Protocols<S>;

    fn layer(&self, grpc: S) -> Protocols<S> {
        Protocols {
            grpc,
            connect: self.connect.clone(),
        }
    }
}

impl<S> HttpService<http::Request<Body>> for Protocols<S>
where
    S: HttpService<http::Request<Body>, Response = HttpResponse, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = HttpResponse;
    type Error = Infallible;
    type Future = HttpFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.grpc.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        // Every request passes here once its headers have arrived, and keeps its connection
        // in use (never taken back) until it is answered.
        let grpc = is_grpc(request.headers());
        let in_use = match request.extensions().get::<ConnectionInfo>() {
            Some(connection) => match connection.request_started() {
                Some(in_use) => Some(in_use),
                None => return Box::pin(std::future::ready(Ok(closing(grpc)))),
            },
            None => None,
        };
        match &self.connect {
            Some(connect) if !grpc => {
                let connect = connect.clone();
                Box::pin(async move {
                    let _in_use = in_use;
                    Ok(connect.serve(request).await)
                })
            }
            _ => {
                let served = self.grpc.call(request);
                Box::pin(async move {
                    let _in_use = in_use;
                    served.await
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(content_type: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_str(content_type).unwrap());
        headers
    }

    #[test]
    fn content_types_select_the_codec() {
        assert_eq!(Codec::of(&headers("application/json")), Some(Codec::Json));
        assert_eq!(
            Codec::of(&headers("Application/JSON; charset=utf-8")),
            Some(Codec::Json)
        );
        assert_eq!(Codec::of(&headers("application/proto")), Some(Codec::Proto));
        for other in [
            "application/json; charset=latin1",
            "application/connect+json",
            "text/plain",
            "application/grpc",
        ] {
            assert_eq!(Codec::of(&headers(other)), None, "{other}");
        }
        assert_eq!(Codec::of(&HeaderMap::new()), None);
    }

    #[test]
    fn json_refusals_name_an_unknown_field_and_never_quote_a_value() {
        let unknown = Codec::Json
            .decode::<pb::ForgotPasswordRequest>(br#"{"username": "a", "nickname": "b"}"#)
            .unwrap_err();
        match unknown {
            Error::InvalidRequest(violations) => {
                assert_eq!(violations[0].field, "nickname");
            }
            other => panic!("{other:?}"),
        }
        for body in [
            &br#"{"username": "#[..],
            br#"{"username": 7}"#,
            br#"{"password": ["hunter2"]}"#,
            b"not json",
        ] {
            let refused = Codec::Json
                .decode::<pb::ConfirmForgotPasswordRequest>(body)
                .unwrap_err();
            assert!(matches!(refused, Error::MalformedRequest), "{refused:?}");
        }
        // Both spellings of a field are accepted.
        let request: pb::ConfirmForgotPasswordRequest = Codec::Json
            .decode(br#"{"confirmationCode": "1", "client_id": "c"}"#)
            .unwrap();
        assert_eq!(request.confirmation_code, "1");
        assert_eq!(request.client_id, "c");
    }

    proptest::proptest! {
        /// Whatever a caller sends, decoding answers a caller's error (never a panic, never a
        /// server fault), and the answer never quotes a value of the body.
        #[test]
        fn any_body_decodes_or_is_refused_as_the_callers_error(
            body in proptest::collection::vec(proptest::num::u8::ANY, 0..256),
            secret in "[a-z]{12}",
        ) {
            let with_secret = format!(r#"{{"username": "u", "password": {{"x": "{secret}"}}}}"#);
            for bytes in [&body[..], with_secret.as_bytes()] {
                for codec in [Codec::Json, Codec::Proto] {
                    if let Err(error) = codec.decode::<pb::ConfirmForgotPasswordRequest>(bytes) {
                        let refused = error.classify();
                        proptest::prop_assert_eq!(refused.code, Code::InvalidArgument);
                        proptest::prop_assert!(!refused.message.contains(&secret));
                    }
                }
            }
        }
    }

    #[test]
    fn a_body_that_fails_is_told_apart_by_its_cause() {
        use std::io::Error as Io;
        let kind = |err: Io| body_failure(&err, 10);
        assert_eq!(
            kind(Io::new(ErrorKind::InvalidInput, "invalid chunk size")),
            (Error::MalformedRequest, Ending::Answered)
        );
        assert_eq!(
            kind(Io::new(ErrorKind::UnexpectedEof, "incomplete body")),
            (Error::Cancelled, Ending::CallerGone)
        );
        assert_eq!(
            kind(Io::new(ErrorKind::InvalidData, Unanswered)),
            (Error::RequestTooLarge { limit: 10 }, Ending::Answered)
        );
        let tls = rustls::Error::DecryptError;
        assert_eq!(
            kind(Io::new(ErrorKind::InvalidData, tls)),
            (Error::Cancelled, Ending::CallerGone)
        );
        // Behind the layers hyper and tonic wrap it in, the same.
        let wrapped = Status::from_error(Box::new(Io::new(ErrorKind::InvalidData, "bad chunk")));
        assert_eq!(
            body_failure(&wrapped, 10),
            (Error::MalformedRequest, Ending::Answered)
        );
    }

    #[test]
    fn codes_follow_connects_table() {
        assert_eq!(connect_code(Code::Cancelled), "canceled");
        assert_eq!(http_status(Code::Cancelled).as_u16(), 499);
        assert_eq!(http_status(Code::ResourceExhausted).as_u16(), 429);
        assert_eq!(http_status(Code::FailedPrecondition).as_u16(), 400);
        assert_eq!(http_status(Code::Unavailable).as_u16(), 503);
        assert_eq!(http_status(Code::DeadlineExceeded).as_u16(), 504);
        assert_eq!(http_status(Code::Unimplemented).as_u16(), 501);
        assert_eq!(http_status(Code::PermissionDenied).as_u16(), 403);
    }

    #[test]
    fn delays_round_up_to_whole_seconds_and_print_as_proto_json() {
        assert_eq!(whole_seconds(Duration::from_secs(3)), 3);
        assert_eq!(whole_seconds(Duration::from_millis(1001)), 2);
        assert_eq!(whole_seconds(Duration::from_millis(1)), 1);
        assert_eq!(proto_json_duration(Duration::from_secs(180)), "180s");
        assert_eq!(proto_json_duration(Duration::from_millis(1500)), "1.5s");
    }
}
