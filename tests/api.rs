//! Black-box tests of the PasswordRecovery API: the real application on `127.0.0.1:0`, a real
//! local HTTP server standing in for Cognito, and the generated gRPC client.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{
    CLIENT_ID, CLIENT_SECRET, REQUEST_ID, Reply, TestApp, assert_error, closed_port_url, confirm,
    error_info, forgot,
};
use password_recovery::cognito::secret_hash;
use password_recovery::error::COGNITO_ERRORS;
use password_recovery::proto::v1::{
    ConfirmForgotPasswordRequest, DeliveryMedium, ForgotPasswordRequest, UserContext,
};
use serde_json::json;
use tonic::{Code, Request};
use tonic_types::{ErrorDetail, StatusExt};

#[tokio::test]
async fn forgot_password_translates_every_field_and_computes_the_secret_hash() {
    // Arrange
    let app = TestApp::spawn().await;
    let mut client = app.client().await;
    let request = ForgotPasswordRequest {
        username: "alice@example.com".into(),
        client_id: String::new(),
        client_metadata: HashMap::from([("source".into(), "web".into())]),
        user_context: Some(UserContext {
            ip_address: "192.0.2.10".into(),
            encoded_data: "encoded".into(),
        }),
        analytics_endpoint_id: "pinpoint-endpoint".into(),
        request_id: String::new(),
    };

    // Act
    let response = client
        .forgot_password(request)
        .await
        .expect("OK")
        .into_inner();

    // Assert
    let details = response.code_delivery_details.expect("details");
    assert_eq!(details.destination, "a***@e***");
    assert_eq!(details.delivery_medium(), DeliveryMedium::Email);
    assert_eq!(details.attribute_name, "email");

    let recorded = app.cognito.recorded();
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0].operation, "ForgotPassword");
    assert!(
        !recorded[0].signed,
        "the call must go unsigned, with no credentials"
    );
    assert_eq!(
        recorded[0].body,
        json!({
            "ClientId": CLIENT_ID,
            "Username": "alice@example.com",
            "SecretHash": secret_hash(&CLIENT_SECRET.into(), "alice@example.com", CLIENT_ID),
            "ClientMetadata": {"source": "web"},
            "UserContextData": {"IpAddress": "192.0.2.10", "EncodedData": "encoded"},
            "AnalyticsMetadata": {"AnalyticsEndpointId": "pinpoint-endpoint"},
        })
    );
}

#[tokio::test]
async fn confirm_forgot_password_translates_every_field() {
    let app = TestApp::spawn().await;
    let mut client = app.client().await;
    let request = ConfirmForgotPasswordRequest {
        username: "bob".into(),
        confirmation_code: "654321".into(),
        password: "N3w-Passw0rd!".into(),
        client_id: CLIENT_ID.into(),
        client_metadata: HashMap::from([("k".into(), "v".into())]),
        user_context: Some(UserContext {
            ip_address: "198.51.100.7".into(),
            encoded_data: String::new(),
        }),
        analytics_endpoint_id: String::new(),
        request_id: String::new(),
    };

    client.confirm_forgot_password(request).await.expect("OK");

    let recorded = app.cognito.recorded();
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0].operation, "ConfirmForgotPassword");
    assert_eq!(
        recorded[0].body,
        json!({
            "ClientId": CLIENT_ID,
            "Username": "bob",
            "ConfirmationCode": "654321",
            "Password": "N3w-Passw0rd!",
            "SecretHash": secret_hash(&CLIENT_SECRET.into(), "bob", CLIENT_ID),
            "ClientMetadata": {"k": "v"},
            "UserContextData": {"IpAddress": "198.51.100.7"},
        })
    );
}

#[tokio::test]
async fn an_app_client_without_a_secret_sends_no_secret_hash() {
    let app = TestApp::spawn_with(&[("COGNITO_CLIENT_SECRET", "")]).await;
    app.client()
        .await
        .forgot_password(forgot("carol"))
        .await
        .expect("OK");
    let body = &app.cognito.recorded()[0].body;
    assert!(body.get("SecretHash").is_none(), "{body}");
}

#[tokio::test]
async fn invalid_requests_name_every_field_and_never_reach_cognito() {
    let app = TestApp::spawn().await;
    let mut client = app.client().await;

    let status = client
        .confirm_forgot_password(ConfirmForgotPasswordRequest {
            username: "x".repeat(129),
            confirmation_code: String::new(),
            password: "has a space".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();

    assert_error(&status, Code::InvalidArgument, "INVALID_REQUEST");
    let fields: Vec<_> = status
        .get_details_bad_request()
        .expect("BadRequest")
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect();
    assert_eq!(fields, ["username", "confirmation_code", "password"]);
    assert!(!status.message().contains("has a space"));

    let status = client
        .forgot_password(forgot("trailing "))
        .await
        .unwrap_err();
    assert_error(&status, Code::InvalidArgument, "INVALID_REQUEST");

    assert!(app.cognito.recorded().is_empty(), "Cognito was called");
}

#[tokio::test]
async fn a_client_id_this_server_does_not_serve_is_refused_before_cognito() {
    let app = TestApp::spawn().await;
    let mut client = app.client().await;

    let mut request = forgot("dave");
    request.client_id = "someoneelsesclient".into();
    let status = client.forgot_password(request).await.unwrap_err();
    assert_error(&status, Code::PermissionDenied, "CLIENT_NOT_ALLOWED");
    assert!(app.cognito.recorded().is_empty());

    let mut request = forgot("dave");
    request.client_id = CLIENT_ID.into();
    client
        .forgot_password(request)
        .await
        .expect("the configured client is served");
}

#[tokio::test]
async fn every_cognito_error_maps_end_to_end_with_its_details() {
    let app = TestApp::spawn_with(&[("ENUMERATION_PROTECTION", "false")]).await;
    let mut client = app.client().await;

    for row in COGNITO_ERRORS {
        app.cognito
            .script([Reply::row_error(row.cognito_code.name())]);
        if row.cognito_code.name() == "TooManyRequestsException" {
            // Throttling is retried: let every attempt be throttled.
            app.cognito.script([
                Reply::error(row.cognito_code.name()),
                Reply::error(row.cognito_code.name()),
            ]);
        }
        let status = client
            .confirm_forgot_password(confirm("erin"))
            .await
            .unwrap_err();

        let info = assert_error(&status, row.code, row.reason.as_str_name());
        assert_eq!(info.metadata["cognitoCode"], row.cognito_code.name());
        assert_eq!(info.metadata["awsRequestId"], REQUEST_ID);
        let error_infos = status
            .get_error_details_vec()
            .into_iter()
            .filter(|d| matches!(d, ErrorDetail::ErrorInfo(_)))
            .count();
        assert_eq!(error_infos, 1, "exactly one ErrorInfo");
    }
}

#[tokio::test]
async fn cognito_errors_answered_with_http_200_or_403_still_map_by_code() {
    // Without enumeration protection, which answers Cognito's attempt limit as its own.
    let app = TestApp::spawn_with(&[("ENUMERATION_PROTECTION", "false")]).await;
    let mut client = app.client().await;
    // HTTP 200 is the risky one: the SDK takes any 200 for a success, so an error it carries
    // must not become a delivery, or a password taken for reset.
    for status in [200, 403] {
        let limit = Reply::Error {
            status,
            code: "LimitExceededException",
            message: "Attempt limit exceeded, please try after some time.",
        };
        app.cognito.script([limit.clone()]);
        let refused = client.forgot_password(forgot("frank")).await.unwrap_err();
        assert_error(&refused, Code::ResourceExhausted, "LIMIT_EXCEEDED");
        app.cognito.script([limit]);
        let refused = client
            .confirm_forgot_password(confirm("frank"))
            .await
            .unwrap_err();
        assert_error(&refused, Code::ResourceExhausted, "LIMIT_EXCEEDED");
    }
}

#[tokio::test]
async fn invalid_password_carries_the_pools_policy_text() {
    let app = TestApp::spawn().await;
    app.cognito.script([Reply::Error {
        status: 400,
        code: "InvalidPasswordException",
        message: "Password does not conform to policy: Password must have symbol characters",
    }]);
    let status = app
        .client()
        .await
        .confirm_forgot_password(confirm("gina"))
        .await
        .unwrap_err();
    assert_error(&status, Code::InvalidArgument, "INVALID_PASSWORD");
    let violation = &status.get_details_bad_request().unwrap().field_violations[0];
    assert_eq!(violation.field, "password");
    assert_eq!(
        violation.description,
        "Password does not conform to policy: Password must have symbol characters"
    );
}

#[tokio::test]
async fn a_lambda_triggers_message_reaches_the_caller() {
    let app = TestApp::spawn().await;
    app.cognito.script([Reply::Error {
        status: 400,
        code: "UserLambdaValidationException",
        message: "CustomMessage failed with error: locale not supported.",
    }]);
    let status = app
        .client()
        .await
        .forgot_password(forgot("hank"))
        .await
        .unwrap_err();
    assert_error(&status, Code::FailedPrecondition, "USER_LAMBDA_VALIDATION");
    assert_eq!(
        status.message(),
        "CustomMessage failed with error: locale not supported."
    );
}

#[tokio::test]
async fn forgot_password_for_unknown_user_is_masked() {
    let app = TestApp::spawn().await;
    let mut client = app.client().await;

    app.cognito.script([Reply::error("UserNotFoundException")]);
    let first = client
        .forgot_password(forgot("nobody@example.com"))
        .await
        .expect("masked as OK")
        .into_inner();
    app.cognito.script([Reply::error("UserNotFoundException")]);
    let again = client
        .forgot_password(forgot("nobody@example.com"))
        .await
        .expect("masked as OK")
        .into_inner();
    // No verified contact: also indistinguishable from a real delivery.
    app.cognito
        .script([Reply::error("InvalidParameterException")]);
    let no_contact = client
        .forgot_password(forgot("nobody@example.com"))
        .await
        .expect("masked as OK")
        .into_inner();

    let details = first.code_delivery_details.clone().unwrap();
    assert_eq!(details.delivery_medium(), DeliveryMedium::Email);
    assert_eq!(details.attribute_name, "email");
    // The address's own mask, as Cognito would show it: not a keyed one of the hash.
    assert_eq!(details.destination, "n***@e***");
    assert_eq!(first, again, "the same username gets the same answer");
    assert_eq!(first, no_contact);
}

#[tokio::test]
async fn confirm_for_unknown_user_is_indistinguishable_from_a_wrong_code() {
    let app = TestApp::spawn().await;
    let mut client = app.client().await;

    app.cognito.script([Reply::error("UserNotFoundException")]);
    let unknown = client
        .confirm_forgot_password(confirm("nobody"))
        .await
        .unwrap_err();
    app.cognito.script([Reply::Error {
        status: 400,
        code: "CodeMismatchException",
        message: "Invalid verification code provided, please try again.",
    }]);
    let mismatch = client
        .confirm_forgot_password(confirm("somebody"))
        .await
        .unwrap_err();

    assert_eq!(unknown.code(), mismatch.code());
    assert_eq!(unknown.message(), mismatch.message());
    let (unknown_info, mismatch_info) = (error_info(&unknown), error_info(&mismatch));
    assert_eq!(unknown_info.reason, mismatch_info.reason);
    assert_eq!(unknown_info.metadata, mismatch_info.metadata);
    assert_eq!(
        format!("{:?}", unknown.get_details_bad_request()),
        format!("{:?}", mismatch.get_details_bad_request())
    );
    assert_eq!(
        error_info(&unknown).metadata["cognitoCode"],
        "CodeMismatchException"
    );
}

#[tokio::test]
async fn unknown_user_is_not_found_with_enumeration_protection_off() {
    let app = TestApp::spawn_with(&[("ENUMERATION_PROTECTION", "false")]).await;
    let mut client = app.client().await;
    app.cognito.script([Reply::error("UserNotFoundException")]);
    let status = client.forgot_password(forgot("nobody")).await.unwrap_err();
    assert_error(&status, Code::NotFound, "USER_NOT_FOUND");
    app.cognito
        .script([Reply::error("InvalidParameterException")]);
    let status = client.forgot_password(forgot("nobody")).await.unwrap_err();
    assert_error(&status, Code::FailedPrecondition, "INVALID_PARAMETER");
}

#[tokio::test]
async fn throttling_is_retried_and_can_succeed() {
    let app = TestApp::spawn().await;
    app.cognito.script([
        Reply::error("TooManyRequestsException"),
        Reply::error("TooManyRequestsException"),
    ]);
    app.client()
        .await
        .forgot_password(forgot("ivan"))
        .await
        .expect("third attempt succeeds");
    assert_eq!(app.cognito.recorded().len(), 3);
}

#[tokio::test]
async fn throttling_gives_up_after_three_attempts_with_retry_info() {
    let app = TestApp::spawn().await;
    app.cognito.script([
        Reply::error("TooManyRequestsException"),
        Reply::error("TooManyRequestsException"),
        Reply::error("TooManyRequestsException"),
    ]);
    let status = app
        .client()
        .await
        .forgot_password(forgot("judy"))
        .await
        .unwrap_err();
    assert_error(&status, Code::ResourceExhausted, "TOO_MANY_REQUESTS");
    let retry = status.get_details_retry_info().expect("RetryInfo");
    assert_eq!(retry.retry_delay, Some(Duration::from_secs(1)));
    assert_eq!(app.cognito.recorded().len(), 3);
}

#[tokio::test]
async fn errors_cognito_may_have_processed_are_never_retried() {
    // Without enumeration protection, so that each error is answered as it is.
    let app = TestApp::spawn_with(&[("ENUMERATION_PROTECTION", "false")]).await;
    let mut client = app.client().await;
    let cases = [
        (
            Reply::error("InternalErrorException"),
            Code::Unavailable,
            "INTERNAL_ERROR",
        ),
        (
            Reply::error("LimitExceededException"),
            Code::ResourceExhausted,
            "LIMIT_EXCEEDED",
        ),
        (
            Reply::error("CodeDeliveryFailureException"),
            Code::Unavailable,
            "CODE_DELIVERY_FAILURE",
        ),
        (
            Reply::Raw {
                status: 500,
                body: "",
            },
            Code::Unavailable,
            "INTERNAL_ERROR",
        ),
        (
            Reply::Raw {
                status: 503,
                body: "{}",
            },
            Code::Unavailable,
            "INTERNAL_ERROR",
        ),
    ];
    for (i, (reply, code, reason)) in cases.into_iter().enumerate() {
        app.cognito.script([reply]);
        let status = client.forgot_password(forgot("kim")).await.unwrap_err();
        assert_error(&status, code, reason);
        assert_eq!(app.cognito.recorded().len(), i + 1, "{reason} was retried");
    }
}

#[tokio::test]
async fn an_unknown_cognito_code_is_unknown_and_named() {
    let app = TestApp::spawn().await;
    app.cognito.script([Reply::error("SomethingNewException")]);
    let status = app
        .client()
        .await
        .forgot_password(forgot("lena"))
        .await
        .unwrap_err();
    let info = assert_error(&status, Code::Unknown, "UNKNOWN_UPSTREAM_ERROR");
    assert_eq!(info.metadata["cognitoCode"], "SomethingNewException");
}

#[tokio::test]
async fn an_unreachable_cognito_is_unavailable() {
    let closed = closed_port_url().await;
    let app = TestApp::spawn_with(&[("AWS_ENDPOINT_URL", &closed)]).await;
    let status = app
        .client()
        .await
        .forgot_password(forgot("mike"))
        .await
        .unwrap_err();
    assert_error(&status, Code::Unavailable, "UPSTREAM_UNAVAILABLE");
}

#[tokio::test]
async fn a_hung_cognito_is_answered_before_the_callers_deadline() {
    let app = TestApp::spawn().await;
    app.cognito.script([Reply::Hang]);
    let mut client = app.client().await;
    let mut request = Request::new(forgot("nina"));
    request.set_timeout(Duration::from_millis(500));

    let started = Instant::now();
    let status = client.forgot_password(request).await.unwrap_err();
    let elapsed = started.elapsed();

    // The service's own answer, with its reason, not tonic's CANCELLED at the deadline.
    assert_error(&status, Code::DeadlineExceeded, "UPSTREAM_TIMEOUT");
    assert!(
        elapsed < Duration::from_millis(500),
        "answered after {elapsed:?}"
    );
    assert!(
        status.message().contains("deadline"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn cognito_timeout_bounds_the_upstream_call() {
    let app = TestApp::spawn_with(&[("COGNITO_TIMEOUT", "300ms")]).await;
    app.cognito.script([Reply::Hang]);
    let status = app
        .client()
        .await
        .confirm_forgot_password(confirm("olga"))
        .await
        .unwrap_err();
    assert_error(&status, Code::DeadlineExceeded, "UPSTREAM_TIMEOUT");
    assert!(
        status.message().contains("COGNITO_TIMEOUT"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn a_slow_but_timely_cognito_answer_is_passed_on() {
    let app = TestApp::spawn().await;
    app.cognito.script([Reply::After(
        Duration::from_millis(200),
        Box::new(Reply::Ok(json!({
            "CodeDeliveryDetails": {
                "Destination": "+*******0100",
                "DeliveryMedium": "SMS",
                "AttributeName": "phone_number"
            }
        }))),
    )]);
    let details = app
        .client()
        .await
        .forgot_password(forgot("paul"))
        .await
        .expect("OK")
        .into_inner()
        .code_delivery_details
        .unwrap();
    assert_eq!(details.delivery_medium(), DeliveryMedium::Sms);
    assert_eq!(details.destination, "+*******0100");
    assert_eq!(details.attribute_name, "phone_number");
}
