//! The HTTP client under the SDK, guarded: every answer's body is read here with a cap
//! ([`MAX_BODY_BYTES`]), so a huge or endless body is refused after the cap and never buffered
//! whole, and a success is accepted only when it is a well-formed Cognito answer (HTTP 200,
//! Cognito's JSON content type, a JSON object). Anything else fails the attempt with an
//! [`InvalidResponse`]; a body that breaks off mid-way fails it as an I/O error.

use std::fmt;

use aws_smithy_http_client::proxy::ProxyConfig;
use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};
use aws_smithy_http_client::{Builder, ConnectorBuilder};
use aws_smithy_runtime_api::client::http::{
    HttpClient, HttpConnector, HttpConnectorFuture, HttpConnectorSettings, SharedHttpClient,
    SharedHttpConnector,
};
use aws_smithy_runtime_api::client::orchestrator::{HttpRequest, HttpResponse};
use aws_smithy_runtime_api::client::result::ConnectorError;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::body::SdkBody;
use http_body_util::{BodyExt, LengthLimitError, Limited};

/// The largest answer body read from Cognito. Its answers are a few hundred bytes; the
/// longest (a Lambda trigger's message) stays far below this.
pub(crate) const MAX_BODY_BYTES: usize = 64 * 1024;

/// The content type of Cognito's answers (JSON 1.1 protocol).
const COGNITO_CONTENT_TYPE: &str = "application/x-amz-json-1.1";

/// An answer that is not a well-formed Cognito answer. Holds what an operator needs to see
/// (status, content type, byte count), never the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InvalidResponse {
    /// The HTTP status.
    pub(crate) status: u16,
    /// The content type, cut to printable ASCII and at most 64 characters.
    pub(crate) content_type: String,
    /// Bytes read before giving up: the whole body, or the cap.
    pub(crate) bytes: usize,
    /// What is wrong with it.
    pub(crate) problem: &'static str,
}

impl fmt::Display for InvalidResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid answer from Cognito: {} (HTTP {}, content type {:?}, {} bytes)",
            self.problem, self.status, self.content_type, self.bytes
        )
    }
}

impl std::error::Error for InvalidResponse {}

/// The SDK's default HTTPS client (hyper 1, rustls on aws-lc-rs, proxy from the environment)
/// behind the guard.
pub(crate) fn guarded_https_client() -> SharedHttpClient {
    let inner = Builder::new().build_with_connector_fn(|settings, components| {
        let mut builder =
            ConnectorBuilder::default().tls_provider(Provider::Rustls(CryptoMode::AwsLc));
        builder.set_connector_settings(settings.cloned());
        if let Some(components) = components {
            builder.set_sleep_impl(components.sleep_impl());
        }
        builder.set_proxy_config(Some(ProxyConfig::from_env()));
        builder.build()
    });
    SharedHttpClient::new(Guarded(inner))
}

#[derive(Debug)]
struct Guarded(SharedHttpClient);

impl HttpClient for Guarded {
    fn http_connector(
        &self,
        settings: &HttpConnectorSettings,
        components: &RuntimeComponents,
    ) -> SharedHttpConnector {
        SharedHttpConnector::new(GuardedConnector(
            self.0.http_connector(settings, components),
        ))
    }
}

#[derive(Debug)]
struct GuardedConnector(SharedHttpConnector);

impl HttpConnector for GuardedConnector {
    fn call(&self, request: HttpRequest) -> HttpConnectorFuture {
        let sent = self.0.call(request);
        HttpConnectorFuture::new(async move { checked(sent.await?).await })
    }
}

/// Reads the body of `response` up to the cap and checks the answer.
async fn checked(mut response: HttpResponse) -> Result<HttpResponse, ConnectorError> {
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .unwrap_or_default()
        .to_owned();
    let invalid = |bytes, problem| {
        ConnectorError::other(
            Box::new(InvalidResponse {
                status,
                content_type: printable(&content_type),
                bytes,
                problem,
            }),
            None,
        )
    };
    let body = match Limited::new(response.take_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(err) if err.is::<LengthLimitError>() => {
            return Err(invalid(MAX_BODY_BYTES, "the body is larger than 64 KiB"));
        }
        // The connection broke or the body was cut short: the way to Cognito failed.
        Err(err) => return Err(ConnectorError::io(err)),
    };
    if status == 200 {
        if !is_cognito_json(&content_type) {
            return Err(invalid(
                body.len(),
                "a success without Cognito's JSON content type",
            ));
        }
        let Ok(serde_json::Value::Object(object)) =
            serde_json::from_slice::<serde_json::Value>(&body)
        else {
            return Err(invalid(
                body.len(),
                "a success whose body is not a JSON object",
            ));
        };
        // An answer naming an error (the awsJson1_1 protocol names an error by its `__type`)
        // is that error whatever its status: the SDK, which takes any 200 for a success, is
        // given it as one, so it is never taken for a delivery or a reset password.
        if object
            .get("__type")
            .is_some_and(serde_json::Value::is_string)
        {
            *response.status_mut() = http::StatusCode::BAD_REQUEST.into();
        }
    } else if !(400..=599).contains(&status) {
        return Err(invalid(body.len(), "neither a success nor an error status"));
    }
    *response.body_mut() = SdkBody::from(body);
    Ok(response)
}

/// True for `application/x-amz-json-1.1`, with or without parameters, in any case.
fn is_cognito_json(content_type: &str) -> bool {
    content_type
        .split(';')
        .next()
        .is_some_and(|media| media.trim().eq_ignore_ascii_case(COGNITO_CONTENT_TYPE))
}

/// At most 64 printable ASCII characters of an upstream-controlled header, for a log line.
pub(super) fn printable(value: &str) -> String {
    value
        .chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(64)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_smithy_runtime_api::http::StatusCode;

    fn response(status: u16, content_type: &str, body: &'static str) -> HttpResponse {
        let mut response =
            HttpResponse::new(StatusCode::try_from(status).unwrap(), SdkBody::from(body));
        if !content_type.is_empty() {
            response
                .headers_mut()
                .insert("content-type", content_type.to_owned());
        }
        response
    }

    async fn problem(status: u16, content_type: &str, body: &'static str) -> Option<String> {
        match checked(response(status, content_type, body)).await {
            Ok(_) => None,
            Err(err) => Some(
                std::error::Error::source(&err)
                    .and_then(|e| e.downcast_ref::<InvalidResponse>())
                    .expect("an InvalidResponse")
                    .problem
                    .to_owned(),
            ),
        }
    }

    #[tokio::test]
    async fn only_a_json_object_with_cognitos_content_type_is_a_success() {
        let json = "application/x-amz-json-1.1";
        assert_eq!(problem(200, json, "{}").await, None);
        assert_eq!(
            problem(200, "Application/X-Amz-Json-1.1; charset=utf-8", "{}").await,
            None
        );
        assert!(problem(200, "text/html", "<html></html>").await.is_some());
        assert!(problem(200, "", "{}").await.is_some());
        assert!(problem(200, json, "<html>").await.is_some());
        assert!(problem(200, json, "[1]").await.is_some());
        assert!(problem(200, json, "").await.is_some());
        assert!(problem(204, json, "").await.is_some());
        assert!(problem(302, "text/html", "moved").await.is_some());
    }

    #[tokio::test]
    async fn errors_pass_to_the_sdk_for_classification() {
        let body = r#"{"__type":"UserNotFoundException"}"#;
        assert_eq!(problem(400, "application/x-amz-json-1.1", body).await, None);
        assert_eq!(problem(503, "text/html", "<html>").await, None);
        // An error answered with HTTP 200 reaches the SDK as an error.
        let passed = checked(response(200, "application/x-amz-json-1.1", body))
            .await
            .unwrap();
        assert_eq!(passed.status().as_u16(), 400);
        let success = checked(response(
            200,
            "application/x-amz-json-1.1",
            r#"{"__type":7}"#,
        ))
        .await
        .unwrap();
        assert_eq!(success.status().as_u16(), 200);
    }

    #[tokio::test]
    async fn a_body_over_the_cap_is_refused() {
        let big: &'static str = Box::leak("x".repeat(MAX_BODY_BYTES + 1).into_boxed_str());
        let err = checked(response(200, "application/x-amz-json-1.1", big))
            .await
            .unwrap_err();
        let invalid = std::error::Error::source(&err)
            .and_then(|e| e.downcast_ref::<InvalidResponse>())
            .unwrap();
        assert_eq!(invalid.bytes, MAX_BODY_BYTES);
        let shown = invalid.to_string();
        assert!(!shown.contains("xxxx"), "the body is never shown: {shown}");
    }
}
