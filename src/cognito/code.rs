//! Cognito's error codes as a type: every exception name this service knows (the rows of
//! README "Errors"), parsed once from the SDK's error metadata, and `Other` for any other.

/// Declares [`ErrorCode`] with one variant per known exception name.
macro_rules! error_codes {
    ($($variant:ident => $name:literal,)*) => {
        /// An error code of Cognito's (`ProvideErrorMetadata::code()`), by its exception name.
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $(
                #[doc = concat!("`", $name, "`.")]
                $variant,
            )*
            /// Any other code, as Cognito sent it.
            Other(String),
        }

        impl ErrorCode {
            /// Every known code.
            pub const KNOWN: &[ErrorCode] = &[$(Self::$variant,)*];

            /// The code Cognito's `name` is.
            pub fn parse(name: &str) -> Self {
                match name {
                    $($name => Self::$variant,)*
                    other => Self::Other(other.to_owned()),
                }
            }

            /// Its exception name, as Cognito sends it.
            pub fn name(&self) -> &str {
                match self {
                    $(Self::$variant => $name,)*
                    Self::Other(name) => name,
                }
            }
        }
    };
}

error_codes! {
    CodeMismatch => "CodeMismatchException",
    ExpiredCode => "ExpiredCodeException",
    InvalidPassword => "InvalidPasswordException",
    PasswordHistoryPolicyViolation => "PasswordHistoryPolicyViolationException",
    UserNotFound => "UserNotFoundException",
    UserNotConfirmed => "UserNotConfirmedException",
    InvalidParameter => "InvalidParameterException",
    NotAuthorized => "NotAuthorizedException",
    Forbidden => "ForbiddenException",
    LimitExceeded => "LimitExceededException",
    TooManyFailedAttempts => "TooManyFailedAttemptsException",
    TooManyRequests => "TooManyRequestsException",
    CodeDeliveryFailure => "CodeDeliveryFailureException",
    UserLambdaValidation => "UserLambdaValidationException",
    OperationNotEnabled => "OperationNotEnabledException",
    ResourceNotFound => "ResourceNotFoundException",
    InvalidEmailRoleAccessPolicy => "InvalidEmailRoleAccessPolicyException",
    InvalidSmsRoleAccessPolicy => "InvalidSmsRoleAccessPolicyException",
    InvalidSmsRoleTrustRelationship => "InvalidSmsRoleTrustRelationshipException",
    InvalidLambdaResponse => "InvalidLambdaResponseException",
    UnexpectedLambda => "UnexpectedLambdaException",
    InternalError => "InternalErrorException",
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_known_name_parses_to_itself_and_others_are_kept() {
        for code in ErrorCode::KNOWN {
            assert_eq!(&ErrorCode::parse(code.name()), code);
            assert!(code.name().ends_with("Exception"), "{code}");
        }
        assert_eq!(
            ErrorCode::parse("BrandNewException"),
            ErrorCode::Other("BrandNewException".into())
        );
        assert_eq!(
            ErrorCode::parse("BrandNewException").name(),
            "BrandNewException"
        );
    }
}
