//! Proto → domain and back: each request is parsed into its validated domain type, naming
//! every violated field; a delivery becomes its proto answer.

use std::collections::HashMap;

use crate::domain::{
    Account, ClientMetadata, CodeDelivery, ConfirmForgotPassword, ConfirmationCode, DeliveryMedium,
    FieldViolation, ForgotPassword, PassThrough, Password, UserContext, Username, Violations,
    free_text, optional_client_id, optional_request_id,
};
use crate::proto::v1 as pb;

fn pass_through(
    violations: &mut Violations,
    client_metadata: HashMap<String, String>,
    user_context: Option<pb::UserContext>,
    analytics_endpoint_id: String,
) -> PassThrough {
    let client_metadata = violations
        .check(ClientMetadata::parse("client_metadata", client_metadata))
        .unwrap_or_default();
    let user_context = user_context
        .and_then(|c| UserContext::parse("user_context", c.ip_address, c.encoded_data, violations));
    let analytics_endpoint_id = violations
        .check(free_text("analytics_endpoint_id", analytics_endpoint_id))
        .flatten();
    PassThrough {
        client_metadata,
        user_context,
        analytics_endpoint_id,
    }
}

/// Validates a ForgotPassword request, naming every violated field.
pub fn parse_forgot_password(
    request: pb::ForgotPasswordRequest,
) -> Result<ForgotPassword, Vec<FieldViolation>> {
    let mut violations = Violations::default();
    let username = violations.check(Username::parse("username", request.username));
    let client_id = violations.check(optional_client_id("client_id", request.client_id));
    let request_id = violations.check(optional_request_id("request_id", request.request_id));
    let pass_through = pass_through(
        &mut violations,
        request.client_metadata,
        request.user_context,
        request.analytics_endpoint_id,
    );
    violations.finish(|| {
        Some(ForgotPassword {
            account: Account {
                username: username?,
                client_id: client_id?,
            },
            request_id: request_id?,
            pass_through,
        })
    })
}

/// Validates a ConfirmForgotPassword request, naming every violated field.
pub fn parse_confirm_forgot_password(
    request: pb::ConfirmForgotPasswordRequest,
) -> Result<ConfirmForgotPassword, Vec<FieldViolation>> {
    let mut violations = Violations::default();
    let username = violations.check(Username::parse("username", request.username));
    let confirmation_code = violations.check(ConfirmationCode::parse(
        "confirmation_code",
        request.confirmation_code,
    ));
    let password = violations.check(Password::parse("password", request.password));
    let client_id = violations.check(optional_client_id("client_id", request.client_id));
    let request_id = violations.check(optional_request_id("request_id", request.request_id));
    let pass_through = pass_through(
        &mut violations,
        request.client_metadata,
        request.user_context,
        request.analytics_endpoint_id,
    );
    violations.finish(|| {
        Some(ConfirmForgotPassword {
            account: Account {
                username: username?,
                client_id: client_id?,
            },
            request_id: request_id?,
            confirmation_code: confirmation_code?,
            password: password?,
            pass_through,
        })
    })
}

impl From<CodeDelivery> for pb::ForgotPasswordResponse {
    fn from(delivery: CodeDelivery) -> Self {
        let medium = match delivery.medium {
            DeliveryMedium::Unspecified => pb::DeliveryMedium::Unspecified,
            DeliveryMedium::Email => pb::DeliveryMedium::Email,
            DeliveryMedium::Sms => pb::DeliveryMedium::Sms,
        };
        Self {
            code_delivery_details: Some(pb::CodeDeliveryDetails {
                destination: delivery.destination,
                delivery_medium: medium.into(),
                attribute_name: delivery.attribute_name,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_violated_field_is_named_at_once() {
        let violations = parse_confirm_forgot_password(pb::ConfirmForgotPasswordRequest {
            username: " bob".into(),
            confirmation_code: String::new(),
            password: "has space".into(),
            client_id: "bad-id".into(),
            request_id: "not-a-uuid".into(),
            user_context: Some(pb::UserContext {
                ip_address: "x".repeat(131_073),
                encoded_data: String::new(),
            }),
            ..Default::default()
        })
        .unwrap_err();
        let fields: Vec<_> = violations.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "username",
                "confirmation_code",
                "password",
                "client_id",
                "request_id",
                "user_context.ip_address"
            ]
        );
        let text = format!("{violations:?}");
        assert!(!text.contains("has space"), "values are never echoed");
    }

    #[test]
    fn a_valid_request_passes_everything_through() {
        let request = parse_forgot_password(pb::ForgotPasswordRequest {
            username: "a@b.com".into(),
            client_id: String::new(),
            client_metadata: HashMap::from([("k".into(), "v".into())]),
            user_context: Some(pb::UserContext {
                ip_address: "192.0.2.1".into(),
                encoded_data: String::new(),
            }),
            analytics_endpoint_id: "endpoint".into(),
            request_id: "123E4567-E89B-42D3-A456-426614174000".into(),
        })
        .unwrap();
        assert_eq!(request.account.client_id, None);
        assert_eq!(
            request.request_id.unwrap().to_string(),
            "123e4567-e89b-42d3-a456-426614174000"
        );
        assert_eq!(
            request.pass_through.analytics_endpoint_id.as_deref(),
            Some("endpoint")
        );
        let context = request.pass_through.user_context.unwrap();
        assert_eq!(context.ip_address.as_deref(), Some("192.0.2.1"));
        assert_eq!(context.encoded_data, None);
    }
}
