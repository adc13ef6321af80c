//! A Cognito user pool as AWS documents it answering ForgotPassword and ConfirmForgotPassword:
//! accounts in every state, codes pending, expired and superseded, both
//! `PreventUserExistenceErrors` modes, and the per-user attempt limit. Installed as the fake
//! Cognito's rule ([`UserPool::install`]). Every behaviour cites the sentence it follows; where
//! AWS documents nothing, the comment says so and what is modelled instead.
//!
//! Sources:
//! - [errors]: Developer Guide, "Managing user existence error responses"
//!   (cognito-user-pool-managing-errors.html).
//! - [passwords]: Developer Guide, "Passwords, account recovery, and password policies"
//!   (managing-users-passwords.html).
//! - [fp], [cfp]: API Reference, ForgotPassword and ConfirmForgotPassword.
//! - [kc]: AWS Knowledge Center, "cognito-forgot-password".

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::json;

use super::fake_cognito::{FakeCognito, Recorded, Reply};

/// The app client's `PreventUserExistenceErrors`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// [errors]: "When this property has a value of ENABLED, your app client doesn't disclose
    /// the nonexistence of a user account in your user pool with a UserNotFoundException
    /// error."
    Enabled,
    /// [errors]: "When you create a new app client with the Amazon Cognito user pools API,
    /// PreventUserExistenceErrors is LEGACY, or disabled, by default."
    Legacy,
}

/// An account's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Account {
    /// Confirmed, with a verified email: codes can be sent to it.
    Verified,
    /// Confirmed, but no verified email or phone number.
    NoVerifiedContact,
    /// Signed up, never confirmed (so nothing of it is verified).
    Unconfirmed,
    /// Disabled by an administrator.
    Disabled,
    /// Created by an administrator, its temporary password never changed
    /// (`FORCE_CHANGE_PASSWORD`).
    MustChangePassword,
}

/// How long each kind of answer takes: a range drawn from uniformly.
#[derive(Debug, Clone)]
pub struct Latencies {
    /// A code sent (and, in ENABLED mode, a simulated one: an assumption, AWS says nothing of
    /// how long Cognito's own simulated answers take).
    pub delivery: Range<u64>,
    /// A code checked against a pending one: right or wrong (and, in ENABLED mode, the
    /// CodeMismatchException of an unknown or disabled user, assumed alike).
    pub code_checked: Range<u64>,
    /// ExpiredCodeException.
    pub expired: Range<u64>,
    /// Any other error: no such user, a state refused, the attempt limit.
    pub refused: Range<u64>,
}

impl Default for Latencies {
    /// Deliveries slowest, code checks next, then expired codes, then plain refusals: every
    /// kind distinguishable from the others by timing alone.
    fn default() -> Self {
        Self {
            delivery: 80..121,
            code_checked: 70..111,
            expired: 40..61,
            refused: 20..41,
        }
    }
}

struct User {
    account: Account,
    /// The pending code and until when it works.
    code: Option<(String, Instant)>,
}

struct State {
    users: HashMap<String, User>,
    /// Per user, when each attempt (either operation) was made.
    attempts: HashMap<String, Vec<Instant>>,
}

/// A user pool and its app client.
#[derive(Clone)]
pub struct UserPool {
    mode: Mode,
    latencies: Latencies,
    /// Attempts per user per hour before LimitExceededException.
    attempt_limit: usize,
    state: Arc<Mutex<State>>,
}

/// [passwords]: "The recovery code is valid for one hour."
pub const CODE_LIFETIME: Duration = Duration::from_secs(3600);
/// [passwords]: "In a given hour, we allow between 5 and 20 attempts for a user to request or
/// enter a password reset code as part of forgot-password and confirm-forgot-password
/// actions." Modelled at its floor.
pub const ATTEMPTS_PER_HOUR: usize = 5;
const HOUR: Duration = Duration::from_secs(3600);

impl UserPool {
    /// An empty pool in `mode`.
    pub fn new(mode: Mode) -> Self {
        Self {
            mode,
            latencies: Latencies::default(),
            attempt_limit: ATTEMPTS_PER_HOUR,
            state: Arc::new(Mutex::new(State {
                users: HashMap::new(),
                attempts: HashMap::new(),
            })),
        }
    }

    /// The same pool, Cognito's attempt limit at `limit` an hour.
    pub fn with_attempt_limit(mut self, limit: usize) -> Self {
        self.attempt_limit = limit;
        self
    }

    /// Makes `cognito` answer as this pool.
    pub fn install(&self, cognito: &FakeCognito) {
        let pool = self.clone();
        cognito.respond_with(move |request| pool.answer(request));
    }

    /// Adds the account `username` (usernames are matched case-insensitively) in `account`.
    pub fn add(&self, username: &str, account: Account) {
        let mut state = self.state.lock().unwrap();
        state.users.insert(
            username.to_lowercase(),
            User {
                account,
                code: None,
            },
        );
    }

    /// Gives `username` the pending `code`, sent `age` ago, as ForgotPassword would have.
    pub fn send_code(&self, username: &str, code: &str, age: Duration) {
        let mut state = self.state.lock().unwrap();
        let user = state
            .users
            .get_mut(&username.to_lowercase())
            .expect("a user");
        user.code = Some((
            code.to_owned(),
            Instant::now() + CODE_LIFETIME.saturating_sub(age),
        ));
    }

    /// The code pending for `username`, if any.
    pub fn pending_code(&self, username: &str) -> Option<String> {
        let state = self.state.lock().unwrap();
        let user = state.users.get(&username.to_lowercase())?;
        user.code.as_ref().map(|(code, _)| code.clone())
    }

    /// Cognito's answer to one request, after the time that kind of answer takes.
    fn answer(&self, request: &Recorded) -> Reply {
        let username = request.body["Username"]
            .as_str()
            .unwrap_or_default()
            .to_lowercase();
        let (reply, took) = match request.operation.as_str() {
            "ForgotPassword" => self.forgot_password(&username),
            "ConfirmForgotPassword" => {
                let code = request.body["ConfirmationCode"]
                    .as_str()
                    .unwrap_or_default();
                self.confirm_forgot_password(&username, code)
            }
            _ => (
                Reply::error("UnknownOperationException"),
                &self.latencies.refused,
            ),
        };
        let pause = rand::rng().random_range(took.clone());
        Reply::After(Duration::from_millis(pause), Box::new(reply))
    }

    /// Counts an attempt of an existing user; true when it is over the limit.
    fn over_attempt_limit(&self, state: &mut State, username: &str) -> bool {
        let now = Instant::now();
        let attempts = state.attempts.entry(username.to_owned()).or_default();
        attempts.retain(|at| now.duration_since(*at) < HOUR);
        if attempts.len() >= self.attempt_limit {
            return true;
        }
        attempts.push(now);
        false
    }

    fn forgot_password(&self, username: &str) -> (Reply, &Range<u64>) {
        let l = &self.latencies;
        let mut state = self.state.lock().unwrap();
        let Some(account) = state.users.get(username).map(|u| u.account) else {
            return match self.mode {
                // [errors], ForgotPassword: "When a user isn't found, is deactivated, or
                // doesn't have a verified delivery mechanism to recover their password,
                // Amazon Cognito returns CodeDeliveryDetails with a simulated delivery medium".
                Mode::Enabled => (delivered(username), &l.delivery),
                // API Reference, PreventUserExistenceErrors (CreateUserPoolClient): "When set to
                // LEGACY, those APIs return a UserNotFoundException exception if the user
                // doesn't exist in the user pool." (Message as seen.)
                Mode::Legacy => (not_found(), &l.refused),
            };
        };
        // An assumption: only an existing account has attempts to count ([passwords] says
        // "for a user", and nothing of unknown usernames).
        if self.over_attempt_limit(&mut state, username) {
            return (attempt_limit(), &l.refused);
        }
        match (account, self.mode) {
            (Account::Verified, _) => {
                // [fp]: "Sends a password-reset confirmation code to the email address or phone
                // number of the requested username." A new code replaces the pending one: AWS
                // does not document whether an earlier code still works; an Amplify
                // maintainer's test found "older codes are not accepted", which is modelled
                // (another user report, aws-sdk-net-extensions-cognito#137, says the opposite).
                let code = format!("{:06}", rand::rng().random_range(0..1_000_000));
                let user = state.users.get_mut(username).expect("the user");
                user.code = Some((code, Instant::now() + CODE_LIFETIME));
                (delivered(username), &l.delivery)
            }
            // [errors], ENABLED: deactivated users and users without a verified delivery
            // mechanism get a simulated delivery (quoted above).
            (
                Account::Disabled | Account::NoVerifiedContact | Account::Unconfirmed,
                Mode::Enabled,
            ) => (delivered(username), &l.delivery),
            // LEGACY and disabled: AWS documents nothing. Assumed: NotAuthorizedException "User
            // is disabled.", as Cognito is seen to answer for a disabled account elsewhere
            // (an administrator's reset, sign-in); a 2016 report saw ResourceNotFoundException.
            (Account::Disabled, Mode::Legacy) => (disabled(), &l.refused),
            // [fp]: "If neither a verified phone number nor a verified email exists, Amazon
            // Cognito responds with an InvalidParameterException error." (Message: [kc].) An
            // inference: an unconfirmed account has nothing verified (reports
            // conflict: some saw a 200 with no code sent).
            (Account::NoVerifiedContact | Account::Unconfirmed, Mode::Legacy) => (
                error(
                    "InvalidParameterException",
                    "Cannot reset password for the user as there is no registered/verified \
                     email or phone_number",
                ),
                &l.refused,
            ),
            // [kc]: "If the user status is FORCE_CHANGE_PASSWORD, then users can't use the
            // ForgotPassword API"; this message is seen (the reports do not say in which mode:
            // modelled in both).
            (Account::MustChangePassword, _) => (cannot_reset(), &l.refused),
        }
    }

    fn confirm_forgot_password(&self, username: &str, code: &str) -> (Reply, &Range<u64>) {
        let l = &self.latencies;
        let mismatch = || {
            error(
                "CodeMismatchException",
                "Invalid verification code provided, please try again.",
            )
        };
        let mut state = self.state.lock().unwrap();
        let Some(account) = state.users.get(username).map(|u| u.account) else {
            return match self.mode {
                // [errors], ConfirmForgotPassword: "Amazon Cognito returns the
                // CodeMismatchException error for users that don't exist or are disabled."
                Mode::Enabled => (mismatch(), &l.code_checked),
                // API Reference (above): LEGACY returns "a UserNotFoundException exception if
                // the user doesn't exist in the user pool".
                Mode::Legacy => (not_found(), &l.refused),
            };
        };
        if self.over_attempt_limit(&mut state, username) {
            return (attempt_limit(), &l.refused);
        }
        match (account, self.mode) {
            // [errors], quoted above: disabled users get CodeMismatchException under ENABLED.
            (Account::Disabled, Mode::Enabled) => (mismatch(), &l.code_checked),
            (Account::Disabled, Mode::Legacy) => (disabled(), &l.refused),
            // [cfp] lists UserNotConfirmedException: "This exception is thrown when a user isn't
            // confirmed successfully." Modelled in both modes (AWS says nothing of ENABLED).
            (Account::Unconfirmed, _) => (
                error("UserNotConfirmedException", "User is not confirmed."),
                &l.refused,
            ),
            // AWS documents nothing for ConfirmForgotPassword here: assumed the same refusal as
            // ForgotPassword's.
            (Account::MustChangePassword, _) => (cannot_reset(), &l.refused),
            (Account::Verified | Account::NoVerifiedContact, _) => {
                let user = state.users.get_mut(username).expect("the user");
                match &user.code {
                    // [errors]: "If a code isn't requested when using ForgotPassword, Amazon
                    // Cognito returns the ExpiredCodeException error." (Said of ENABLED;
                    // modelled in LEGACY too. Message as seen.)
                    None => (expired(), &l.expired),
                    // [passwords]: "The recovery code is valid for one hour."; [cfp]
                    // ExpiredCodeException: "This exception is thrown if a code has expired."
                    Some((_, valid_until)) if Instant::now() >= *valid_until => {
                        (expired(), &l.expired)
                    }
                    // [cfp] CodeMismatchException: "This exception is thrown if the provided
                    // code doesn't match what the server was expecting."
                    Some((pending, _)) if pending != code => (mismatch(), &l.code_checked),
                    Some(_) => {
                        // The password is set and the code used up.
                        user.code = None;
                        (Reply::Ok(json!({})), &l.code_checked)
                    }
                }
            }
        }
    }
}

fn error(code: &'static str, message: &'static str) -> Reply {
    Reply::Error {
        status: 400,
        code,
        message,
    }
}

/// LEGACY's answer for a username the pool does not have (the message as seen).
fn not_found() -> Reply {
    error(
        "UserNotFoundException",
        "Username/client id combination not found.",
    )
}

/// The per-user attempt limit's refusal. AWS does not name the exception; LimitExceededException
/// "This exception is thrown when a user exceeds the limit for a requested Amazon Web Services
/// resource" ([fp]) is what it is seen to be, with this message.
fn attempt_limit() -> Reply {
    error(
        "LimitExceededException",
        "Attempt limit exceeded, please try after some time.",
    )
}

/// A disabled account's refusal (see the LEGACY arms).
fn disabled() -> Reply {
    error("NotAuthorizedException", "User is disabled.")
}

/// A must-change-password account's refusal (see the arms).
fn cannot_reset() -> Reply {
    error(
        "NotAuthorizedException",
        "User password cannot be reset in the current state.",
    )
}

fn expired() -> Reply {
    error(
        "ExpiredCodeException",
        "Invalid code provided, please request a code again.",
    )
}

/// Cognito's delivery details for an account whose username is its email: "The simulated
/// delivery medium is determined by the input username format" ([errors]), and a real one is
/// the email's mask.
fn delivered(username: &str) -> Reply {
    let (local, domain) = username.split_once('@').unwrap_or((username, "x"));
    let first = |s: &str| s.chars().next().unwrap_or('x');
    Reply::Ok(json!({
        "CodeDeliveryDetails": {
            "Destination": format!("{}***@{}***", first(local), first(domain)),
            "DeliveryMedium": "EMAIL",
            "AttributeName": "email",
        }
    }))
}
