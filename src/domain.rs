//! Validated request types: every value here already satisfies Cognito's documented limits,
//! so a request that parses is one Cognito can accept, and one that does not never leaves the
//! service. Limits and patterns follow Cognito's API reference (README "API").

use std::collections::HashMap;
use std::fmt;
use std::sync::LazyLock;

use regex::Regex;
use secrecy::{ExposeSecret, SecretString};

/// Longest username or alias Cognito accepts, in characters.
pub(crate) const USERNAME_MAX_CHARS: usize = 128;
/// Longest app client id, in characters.
pub(crate) const CLIENT_ID_MAX_CHARS: usize = 128;
/// Longest confirmation code, in characters.
pub(crate) const CONFIRMATION_CODE_MAX_CHARS: usize = 2048;
/// Longest password, in characters.
pub(crate) const PASSWORD_MAX_CHARS: usize = 256;
/// Largest client-metadata value or user-context field, in bytes.
pub(crate) const FREE_TEXT_MAX_BYTES: usize = 131_072;

/// Cognito's username pattern `[\p{L}\p{M}\p{S}\p{N}\p{P}]+`: letters, marks, symbols,
/// numbers and punctuation; no whitespace, no control characters.
static USERNAME_PATTERN: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[\p{L}\p{M}\p{S}\p{N}\p{P}]+$").expect("valid pattern"));

/// The RPCs of the service. Everything that differs per RPC is decided by matching on this,
/// never on strings, so a new RPC fails to compile until every place has decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Rpc {
    /// Starts a reset: Cognito sends the user a code.
    ForgotPassword,
    /// Finishes a reset with the code and a new password.
    ConfirmForgotPassword,
}

impl Rpc {
    /// Every RPC, in the proto's order (a test holds the two together).
    pub(crate) const ALL: [Self; 2] = [Self::ForgotPassword, Self::ConfirmForgotPassword];

    /// The gRPC method name, which is also Cognito's operation name.
    pub(crate) fn method(self) -> &'static str {
        match self {
            Self::ForgotPassword => "ForgotPassword",
            Self::ConfirmForgotPassword => "ConfirmForgotPassword",
        }
    }

    /// The RPC a gRPC path (`/package.Service/Method`) of `service` names, if any.
    pub(crate) fn from_path(service: &str, path: &str) -> Option<Self> {
        let method = path
            .strip_prefix('/')?
            .strip_prefix(service)?
            .strip_prefix('/')?;
        Self::ALL.into_iter().find(|rpc| rpc.method() == method)
    }
}

/// One field that failed validation, named by its proto field path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// The proto field path, e.g. `username` or `user_context.ip_address`.
    pub(crate) field: String,
    /// What is wrong, never quoting the value.
    pub(crate) description: String,
}

/// Every violation found in one request.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Violations(Vec<FieldViolation>);

impl Violations {
    /// Records the outcome of parsing one field and returns the value when it is valid.
    pub(crate) fn check<T>(&mut self, result: Result<T, FieldViolation>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(violation) => {
                self.0.push(violation);
                None
            }
        }
    }

    /// `Ok(value)` when nothing was violated, otherwise every violation.
    pub(crate) fn finish<T>(
        self,
        value: impl FnOnce() -> Option<T>,
    ) -> Result<T, Vec<FieldViolation>> {
        if self.0.is_empty() {
            // Every field parsed, so `value` has everything it needs.
            value().ok_or_else(Vec::new)
        } else {
            Err(self.0)
        }
    }
}

fn violation(field: &str, description: impl Into<String>) -> FieldViolation {
    FieldViolation {
        field: field.to_owned(),
        description: description.into(),
    }
}

fn check_length(field: &str, value: &str, max_chars: usize) -> Result<(), FieldViolation> {
    if value.is_empty() {
        return Err(violation(field, "is required"));
    }
    let chars = value.chars().count();
    if chars > max_chars {
        return Err(violation(
            field,
            format!("must be at most {max_chars} characters, got {chars}"),
        ));
    }
    Ok(())
}

/// Java's ASCII `\s`: space, \t, \n, \v, \f, \r. Cognito's `[\S]+` refuses exactly these.
fn is_java_ascii_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\u{0B}' | '\u{0C}' | '\r')
}

fn check_no_whitespace(field: &str, value: &str) -> Result<(), FieldViolation> {
    if value.chars().any(is_java_ascii_space) {
        return Err(violation(
            field,
            "must not contain spaces, tabs or line breaks",
        ));
    }
    Ok(())
}

/// A username or alias (email, phone number) as Cognito accepts it.
#[derive(Clone, PartialEq, Eq, Hash)]
pub(crate) struct Username(String);

impl Username {
    /// Parses `value` as the proto field `field`.
    pub(crate) fn parse(field: &str, value: String) -> Result<Self, FieldViolation> {
        check_length(field, &value, USERNAME_MAX_CHARS)?;
        if !USERNAME_PATTERN.is_match(&value) {
            return Err(violation(
                field,
                "may contain only letters, marks, symbols, numbers and punctuation \
                 (no whitespace or control characters)",
            ));
        }
        Ok(Self(value))
    }

    /// The username as the caller sent it.
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }

    /// The form under which one user is counted and hashed: Unicode lowercase, nothing
    /// trimmed (whitespace is invalid anyway). Cognito usernames are case-insensitive by default.
    pub(crate) fn normalised(&self) -> String {
        self.0.to_lowercase()
    }
}

/// A user as a user pool knows them. Usernames are unique within a pool, not within an app
/// client, so per-username limits, pseudonyms and simulated answers are keyed by both: calling
/// through another client of the same pool changes nothing.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PoolUser<'a> {
    /// The user pool's id; `None` with the one-client settings, which name no pool.
    pub(crate) pool: Option<&'a str>,
    /// The username.
    pub(crate) username: &'a Username,
}

impl<'a> PoolUser<'a> {
    /// `username` in `pool`.
    pub(crate) fn new(pool: Option<&'a str>, username: &'a Username) -> Self {
        Self { pool, username }
    }

    /// What keyed hashes of the user take, in order: the pool id and a NUL when there is a
    /// pool, then the normalised username (so with no pool, exactly the normalised username).
    pub(crate) fn key(&self) -> String {
        match self.pool {
            Some(pool) => format!("{pool}\0{}", self.username.normalised()),
            None => self.username.normalised(),
        }
    }
}

/// Usernames are personal data: debug output never shows one.
impl fmt::Debug for Username {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Username(<redacted>)")
    }
}

/// A Cognito app client id: 1–128 of `[A-Za-z0-9_+]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClientId(String);

impl ClientId {
    /// Parses `value` as the proto field (or setting) `field`.
    pub fn parse(field: &str, value: String) -> Result<Self, FieldViolation> {
        check_length(field, &value, CLIENT_ID_MAX_CHARS)?;
        if !value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'+')
        {
            return Err(violation(
                field,
                "may contain only ASCII letters, digits, '_' and '+'",
            ));
        }
        Ok(Self(value))
    }

    /// The client id.
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The code Cognito sent the user. Secret: never printed.
pub(crate) struct ConfirmationCode(SecretString);

impl ConfirmationCode {
    /// Parses `value` as the proto field `field`.
    pub(crate) fn parse(field: &str, value: String) -> Result<Self, FieldViolation> {
        let value = SecretString::from(value);
        check_length(field, value.expose_secret(), CONFIRMATION_CODE_MAX_CHARS)?;
        check_no_whitespace(field, value.expose_secret())?;
        Ok(Self(value))
    }

    /// The code itself, for the one place that sends it to Cognito.
    pub(crate) fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl fmt::Debug for ConfirmationCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ConfirmationCode(<redacted>)")
    }
}

/// A new password. Secret: never printed. Cognito applies the pool's policy itself.
pub(crate) struct Password(SecretString);

impl Password {
    /// Parses `value` as the proto field `field`.
    pub(crate) fn parse(field: &str, value: String) -> Result<Self, FieldViolation> {
        let value = SecretString::from(value);
        check_length(field, value.expose_secret(), PASSWORD_MAX_CHARS)?;
        check_no_whitespace(field, value.expose_secret())?;
        Ok(Self(value))
    }

    /// The password itself, for the one place that sends it to Cognito.
    pub(crate) fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

/// Key-value pairs for the pool's Lambda triggers; each value at most 131072 bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ClientMetadata(HashMap<String, String>);

impl ClientMetadata {
    /// Parses the proto map field `field`, naming the first key whose value is too long.
    pub(crate) fn parse(
        field: &str,
        value: HashMap<String, String>,
    ) -> Result<Self, FieldViolation> {
        let mut oversized: Vec<&str> = value
            .iter()
            .filter(|(_, v)| v.len() > FREE_TEXT_MAX_BYTES)
            .map(|(k, _)| k.as_str())
            .collect();
        if !oversized.is_empty() {
            oversized.sort_unstable();
            return Err(violation(
                field,
                format!(
                    "values must be at most {FREE_TEXT_MAX_BYTES} bytes; too long for {} key(s), \
                     first {:?}",
                    oversized.len(),
                    oversized[0].chars().take(64).collect::<String>()
                ),
            ));
        }
        Ok(Self(value))
    }

    /// The pairs, or `None` when there are none (so nothing is sent).
    pub(crate) fn into_map(self) -> Option<HashMap<String, String>> {
        (!self.0.is_empty()).then_some(self.0)
    }

    /// Its pairs, sorted by key.
    pub(crate) fn sorted(&self) -> Vec<(&str, &str)> {
        let mut pairs: Vec<(&str, &str)> = self
            .0
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        pairs.sort_unstable();
        pairs
    }
}

/// The end user's context for Cognito's threat protection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct UserContext {
    /// The end user's source IP address.
    pub(crate) ip_address: Option<String>,
    /// The advanced-security SDK's encoded data.
    pub(crate) encoded_data: Option<String>,
}

impl UserContext {
    /// Parses the two fields of the proto message at `field`; `None` when both are empty.
    pub(crate) fn parse(
        field: &str,
        ip_address: String,
        encoded_data: String,
        violations: &mut Violations,
    ) -> Option<Self> {
        let ip_address = violations.check(free_text(&format!("{field}.ip_address"), ip_address));
        let encoded_data =
            violations.check(free_text(&format!("{field}.encoded_data"), encoded_data));
        let context = Self {
            ip_address: ip_address.flatten(),
            encoded_data: encoded_data.flatten(),
        };
        (context.ip_address.is_some() || context.encoded_data.is_some()).then_some(context)
    }
}

/// An optional free-text field: empty means absent, longer than 131072 bytes is refused.
pub(crate) fn free_text(field: &str, value: String) -> Result<Option<String>, FieldViolation> {
    if value.len() > FREE_TEXT_MAX_BYTES {
        return Err(violation(
            field,
            format!("must be at most {FREE_TEXT_MAX_BYTES} bytes"),
        ));
    }
    Ok((!value.is_empty()).then_some(value))
}

/// The client id a request names: the configured one when empty.
pub(crate) fn optional_client_id(
    field: &str,
    value: String,
) -> Result<Option<ClientId>, FieldViolation> {
    if value.is_empty() {
        Ok(None)
    } else {
        ClientId::parse(field, value).map(Some)
    }
}

/// An optional AIP-155 `request_id`: empty, or a UUID in its hyphenated form (any case).
pub(crate) fn optional_request_id(
    field: &str,
    value: String,
) -> Result<Option<uuid::Uuid>, FieldViolation> {
    if value.is_empty() {
        return Ok(None);
    }
    let hyphenated = value.len() == 36 && value.as_bytes()[8] == b'-';
    match uuid::Uuid::try_parse(&value) {
        Ok(id) if hyphenated => Ok(Some(id)),
        _ => Err(violation(
            field,
            "must be a UUID such as 123e4567-e89b-42d3-a456-426614174000, or empty",
        )),
    }
}

/// What both operations pass through to Cognito untouched.
#[derive(Debug, Clone, Default)]
pub(crate) struct PassThrough {
    /// Pairs for the pool's Lambda triggers.
    pub(crate) client_metadata: ClientMetadata,
    /// The end user's context.
    pub(crate) user_context: Option<UserContext>,
    /// The Pinpoint analytics endpoint id.
    pub(crate) analytics_endpoint_id: Option<String>,
}

/// Whose password a request is about, and through which app client: what every RPC names,
/// and what the client allowlist, the limits, logs and audit events look at.
#[derive(Debug, Clone)]
pub(crate) struct Account {
    /// The user, as the caller typed the username or alias.
    pub(crate) username: Username,
    /// The app client the caller named, if any.
    pub(crate) client_id: Option<ClientId>,
}

/// A valid ForgotPassword request.
#[derive(Debug)]
pub(crate) struct ForgotPassword {
    /// Whose password to reset.
    pub(crate) account: Account,
    /// Makes the call idempotent (AIP-155).
    pub(crate) request_id: Option<uuid::Uuid>,
    /// Fields passed through to Cognito.
    pub(crate) pass_through: PassThrough,
}

/// A valid ConfirmForgotPassword request.
#[derive(Debug)]
pub(crate) struct ConfirmForgotPassword {
    /// Whose password to set.
    pub(crate) account: Account,
    /// Makes the call idempotent (AIP-155).
    pub(crate) request_id: Option<uuid::Uuid>,
    /// The code the user received.
    pub(crate) confirmation_code: ConfirmationCode,
    /// The new password.
    pub(crate) password: Password,
    /// Fields passed through to Cognito.
    pub(crate) pass_through: PassThrough,
}

impl AsRef<Account> for ForgotPassword {
    fn as_ref(&self) -> &Account {
        &self.account
    }
}

impl AsRef<Account> for ConfirmForgotPassword {
    fn as_ref(&self) -> &Account {
        &self.account
    }
}

/// How Cognito delivered a confirmation code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DeliveryMedium {
    /// Cognito did not say, or said something this service does not know.
    Unspecified,
    /// By email.
    Email,
    /// By SMS.
    Sms,
}

/// Where a confirmation code went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CodeDelivery {
    /// The masked destination, e.g. `a***@e***`.
    pub(crate) destination: String,
    /// The medium.
    pub(crate) medium: DeliveryMedium,
    /// The attribute the destination came from, e.g. `email`.
    pub(crate) attribute_name: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rpcs_are_the_services_methods() {
        use prost::Message;
        let set = prost_types::FileDescriptorSet::decode(crate::proto::FILE_DESCRIPTOR_SET)
            .expect("descriptor set");
        let methods: Vec<&str> = set
            .file
            .iter()
            .flat_map(|file| file.service.iter().map(move |s| (file.package(), s)))
            .filter(|(package, service)| {
                format!("{package}.{}", service.name()) == crate::api::SERVICE_NAME
            })
            .flat_map(|(_, service)| service.method.iter().map(|m| m.name()))
            .collect();
        let ours: Vec<&str> = Rpc::ALL.iter().map(|rpc| rpc.method()).collect();
        assert_eq!(methods, ours);
        for rpc in Rpc::ALL {
            let path = format!("/{}/{}", crate::api::SERVICE_NAME, rpc.method());
            assert_eq!(Rpc::from_path(crate::api::SERVICE_NAME, &path), Some(rpc));
        }
    }

    fn username(value: &str) -> Result<Username, FieldViolation> {
        Username::parse("username", value.to_owned())
    }

    #[test]
    fn username_accepts_emails_phones_and_non_ascii_letters() {
        for ok in [
            "a@b.com",
            "+14155550100",
            "Zoë_Ørsted",
            "名前",
            "user-name.1",
            "a",
            "e\u{301}",
        ] {
            assert!(username(ok).is_ok(), "{ok:?} should be valid");
        }
    }

    #[test]
    fn username_length_is_counted_in_characters() {
        assert!(username(&"a".repeat(128)).is_ok());
        assert!(username(&"é".repeat(128)).is_ok());
        let err = username(&"a".repeat(129)).unwrap_err();
        assert_eq!(err.field, "username");
        assert!(err.description.contains("128"), "{}", err.description);
    }

    #[test]
    fn username_refuses_empty_whitespace_and_control_characters() {
        for bad in [
            "",
            " alice",
            "alice ",
            "al ice",
            "alice\t",
            "alice\n",
            "a\u{0}b",
            "a\u{7f}b",
            "a\u{a0}b",
            "a\u{2003}b",
        ] {
            let err = username(bad).unwrap_err();
            assert_eq!(err.field, "username", "{bad:?}");
        }
    }

    #[test]
    fn client_id_is_ascii_word_characters_and_plus() {
        assert!(ClientId::parse("client_id", "abc_DEF+123".into()).is_ok());
        assert!(ClientId::parse("client_id", "a".repeat(128)).is_ok());
        for bad in ["", "abc-def", "abc def", "é", &"a".repeat(129)] {
            let err = ClientId::parse("client_id", bad.into()).unwrap_err();
            assert_eq!(err.field, "client_id", "{bad:?}");
        }
        assert_eq!(optional_client_id("client_id", String::new()), Ok(None));
    }

    #[test]
    fn code_and_password_refuse_only_java_ascii_whitespace() {
        assert!(ConfirmationCode::parse("confirmation_code", "123456".into()).is_ok());
        assert!(ConfirmationCode::parse("confirmation_code", "x".repeat(2048)).is_ok());
        assert!(ConfirmationCode::parse("confirmation_code", "x".repeat(2049)).is_err());
        assert!(Password::parse("password", "Pässwörd!1".into()).is_ok());
        assert!(Password::parse("password", "p".repeat(256)).is_ok());
        assert!(Password::parse("password", "p".repeat(257)).is_err());
        // Java's \S is ASCII-only: a no-break space is not whitespace to Cognito.
        assert!(Password::parse("password", "a\u{a0}b".into()).is_ok());
        for bad in ["", " x", "x ", "a\tb", "a\u{0B}b", "a\u{0C}b", "a\rb"] {
            assert!(Password::parse("password", bad.into()).is_err(), "{bad:?}");
            assert!(
                ConfirmationCode::parse("confirmation_code", bad.into()).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let code = ConfirmationCode::parse("confirmation_code", "987654".into()).unwrap();
        let password = Password::parse("password", "Hunter2!".into()).unwrap();
        let user = username("alice@example.com").unwrap();
        let printed = format!("{code:?} {password:?} {user:?}");
        assert!(!printed.contains("987654"));
        assert!(!printed.contains("Hunter2"));
        assert!(!printed.contains("alice"));
    }

    #[test]
    fn free_text_is_bounded_in_bytes_and_empty_means_absent() {
        assert_eq!(free_text("f", String::new()), Ok(None));
        assert!(free_text("f", "é".repeat(FREE_TEXT_MAX_BYTES / 2)).is_ok());
        assert!(free_text("f", "é".repeat(FREE_TEXT_MAX_BYTES / 2 + 1)).is_err());
    }

    #[test]
    fn client_metadata_names_the_field_for_an_oversized_value() {
        let ok = HashMap::from([("k".to_owned(), "v".repeat(FREE_TEXT_MAX_BYTES))]);
        assert!(ClientMetadata::parse("client_metadata", ok).is_ok());
        let bad = HashMap::from([("big".to_owned(), "v".repeat(FREE_TEXT_MAX_BYTES + 1))]);
        let err = ClientMetadata::parse("client_metadata", bad).unwrap_err();
        assert_eq!(err.field, "client_metadata");
        assert!(err.description.contains("\"big\""), "{}", err.description);
        assert_eq!(ClientMetadata::default().into_map(), None);
    }

    #[test]
    fn user_context_collects_violations_per_field() {
        let mut violations = Violations::default();
        let context = UserContext::parse(
            "user_context",
            "x".repeat(FREE_TEXT_MAX_BYTES + 1),
            "data".into(),
            &mut violations,
        );
        assert_eq!(
            context.and_then(|c| c.encoded_data),
            Some("data".to_owned())
        );
        let violations = violations.finish(|| Some(())).unwrap_err();
        assert_eq!(violations.len(), 1);
        assert_eq!(violations[0].field, "user_context.ip_address");

        let mut none = Violations::default();
        assert_eq!(
            UserContext::parse("user_context", String::new(), String::new(), &mut none),
            None
        );
    }
}
