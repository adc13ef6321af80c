//! The service core, the same for every door: a call and its decoded request in, the reply
//! out. It validates the request into its domain type, checks the app client and the abuse
//! limits, calls Cognito within the call's budget, applies enumeration protection, and
//! finishes the call (one log line, one audit event, its metrics). It knows nothing of HTTP,
//! gRPC or JSON.
//!
//! Each call runs in a task of its own ([`InFlightCalls`]), so once it has been sent to
//! Cognito its outcome is recorded even when the caller goes away; the calls still running
//! when the shutdown grace period ends are abandoned, and recorded as such.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::Code;
use tracing::Instrument;

use super::call::{Call, Caller, Ending, Outcome, Reply, Subject};
use super::parse::{parse_confirm_forgot_password, parse_forgot_password};
use crate::callers::Callers;
use crate::cognito::{AppClient, Budget, Cognito, UpstreamError};
use crate::domain::{
    Account, CodeDelivery, ConfirmForgotPassword, FieldViolation, ForgotPassword, PassThrough,
    PoolUser, Rpc,
};
use crate::error::Classified;
use crate::error::Error;
use crate::idempotency::{Claimed, Idempotency, Remembered, Remembering, Ticket};
use crate::limits::Limits;
use crate::masking::{CodeError, Mask, Masking};
use crate::privacy::UsernameHasher;
use crate::proto::v1 as pb;

/// The alias logs and metrics give a `client_id` this server does not serve.
const UNKNOWN_CLIENT: &str = "unknown";

/// The calls running in their own tasks, and the signal that abandons them.
#[derive(Debug, Default)]
pub struct InFlightCalls {
    tasks: TaskTracker,
    abandon: CancellationToken,
    abandoned: AtomicUsize,
}

impl InFlightCalls {
    /// Abandons every call still running: each records itself as abandoned. Returns how
    /// many there were, once all have, or after `within`.
    pub async fn abandon(&self, within: Duration) -> usize {
        self.abandon.cancel();
        self.tasks.close();
        let _ = tokio::time::timeout(within, self.tasks.wait()).await;
        self.abandoned.load(Ordering::SeqCst)
    }
}

/// The service's state, shared by every call.
#[derive(Debug)]
pub(crate) struct Shared {
    /// The app clients called.
    pub(crate) cognito: Cognito,
    /// Who may call.
    pub(crate) callers: Arc<Callers>,
    /// Every call passes them first.
    pub(crate) limits: Arc<Limits>,
    /// Pseudonyms of usernames in logs and audit events.
    pub(crate) usernames: UsernameHasher,
    /// Answers for unknown users.
    pub(crate) masking: Masking,
    /// Where every call runs.
    pub(crate) calls: Arc<InFlightCalls>,
    /// The outcomes of calls with a `request_id`, for their retries.
    pub(crate) idempotency: Idempotency,
}

/// The PasswordRecovery service, behind every door.
#[derive(Debug, Clone)]
pub(crate) struct Service {
    shared: Arc<Shared>,
}

/// What a valid request is served with.
struct Served {
    /// The RPC.
    rpc: Rpc,
    /// Who called.
    caller: Caller,
    /// The app client it names (or the default); `None` for one this server does not serve.
    client: Option<Arc<AppClient>>,
    /// When the upstream call must be done.
    budget: Budget,
    /// When the caller must be answered: no call is sent that this leaves too little time.
    caller_budget: Budget,
    /// Cancelled when the caller goes away.
    caller_gone: CancellationToken,
}

impl Service {
    /// The service with `shared` state.
    pub(crate) fn new(shared: Shared) -> Self {
        Self {
            shared: Arc::new(shared),
        }
    }

    /// Starts a reset: `call`, whose message `request` has just arrived.
    pub(crate) async fn forgot_password(
        &self,
        call: Call,
        request: pb::ForgotPasswordRequest,
    ) -> Reply<CodeDelivery> {
        let parsed = parse_forgot_password(request);
        self.serve(call, parsed, |shared, request, served| async move {
            shared.forgot_password(request, served).await
        })
        .await
    }

    /// Finishes a reset: `call`, whose message `request` has just arrived.
    pub(crate) async fn confirm_forgot_password(
        &self,
        call: Call,
        request: pb::ConfirmForgotPasswordRequest,
    ) -> Reply<()> {
        let parsed = parse_confirm_forgot_password(request);
        self.serve(call, parsed, |shared, request, served| async move {
            shared.confirm_forgot_password(request, served).await
        })
        .await
    }

    /// The life of every call once its message has arrived: from now on it keeps its place
    /// (unless that was taken back first); a request that failed validation is answered at
    /// once; a valid one is `run` in a task of its own within the call's budget, so its
    /// outcome is recorded even if the caller goes away. Then `Call::finish`.
    async fn serve<R, T, F, Fut>(
        &self,
        call: Call,
        parsed: Result<R, Vec<FieldViolation>>,
        run: F,
    ) -> Reply<T>
    where
        R: Retryable + Send + 'static,
        T: Rememberable + Send + 'static,
        F: FnOnce(Arc<Shared>, R, Served) -> Fut + Send + 'static,
        Fut: Future<Output = Outcome<T>> + Send + 'static,
    {
        if let Err(taken_back) = call.arrived() {
            return call.refuse(taken_back, Ending::Answered).widen();
        }
        let request = match parsed {
            Ok(request) => request,
            Err(violations) => {
                let _entered = call.span().clone().entered();
                let invalid = Outcome::plain(Err(Error::InvalidRequest(violations)));
                return call.finish(None, invalid, Ending::Answered);
            }
        };
        let shared = self.shared.clone();
        let account = request.as_ref();
        let client = shared.cognito.select(account.client_id.as_ref()).cloned();
        let subject = shared.subject(account, client.as_deref());
        // An unknown client is refused before any upstream call: its budget does not matter.
        let timeout = client.as_ref().map_or(Duration::ZERO, |c| c.timeout);
        let ticket = client
            .as_deref()
            .and_then(|client| shared.ticket(&request, &call, client));
        // The caller is answered at its deadline; a call with a request_id keeps waiting for
        // Cognito, within COGNITO_TIMEOUT, so that its retry can be told what happened.
        let caller_budget = call.budget(timeout);
        let upstream_budget = match ticket {
            Some(_) => call.budget_without_caller(timeout),
            None => caller_budget,
        };
        let request_id = call.request_id().to_owned();
        let caller_gone = CancellationToken::new();
        let span = call.span().clone();
        let guard = CallerGone(Some((caller_gone.clone(), span.clone())));
        let abandon = shared.calls.abandon.clone();
        // Cancelled when the caller was answered at its deadline while the call goes on.
        let answered_early = CancellationToken::new();
        let task = {
            let caller_gone = caller_gone.clone();
            let answered = answered_early.clone();
            async move {
                let ending = || match (caller_gone.is_cancelled(), answered.is_cancelled()) {
                    (true, _) => Ending::CallerGone,
                    (false, true) => Ending::AnsweredAtDeadline,
                    (false, false) => Ending::Answered,
                };
                let running = match ticket {
                    Some(ticket) => {
                        match shared.claim(ticket, caller_budget, upstream_budget).await {
                            Ok(running) => Some(running),
                            Err(Answered::Replay(result)) => {
                                return call.replay(Some(&subject), result, ending());
                            }
                            Err(Answered::Refused(error)) => {
                                let refused = Outcome::plain(Err(error));
                                return call.finish(Some(&subject), refused, ending());
                            }
                        }
                    }
                    None => None,
                };
                let served = Served {
                    rpc: call.rpc(),
                    caller: call.caller().clone(),
                    client,
                    budget: upstream_budget,
                    caller_budget,
                    caller_gone: caller_gone.clone(),
                };
                let work = run(shared.clone(), request, served);
                tokio::select! {
                    outcome = work => {
                        if let Some(running) = running {
                            running.finish(remembered(&outcome));
                        }
                        call.finish(Some(&subject), outcome, ending())
                    }
                    () = abandon.cancelled() => {
                        shared.calls.abandoned.fetch_add(1, Ordering::SeqCst);
                        call.abandon(Some(&subject)).widen()
                    }
                }
            }
            .instrument(span)
        };
        let mut handle = self.shared.calls.tasks.spawn(task);
        let joined = match (ticket, caller_budget.set_by_caller) {
            (Some(_), true) => tokio::select! {
                joined = &mut handle => joined,
                () = tokio::time::sleep_until(caller_budget.deadline) => {
                    // The call goes on, and its outcome is remembered for the retry; it is
                    // recorded as answered at the deadline, not as its caller gone.
                    answered_early.cancel();
                    guard.disarm();
                    return Reply {
                        request_id,
                        result: Err(Box::new(timed_out(caller_budget).classify())),
                        replayed: false,
                    };
                }
            },
            _ => handle.await,
        };
        guard.disarm();
        joined.unwrap_or_else(|err| {
            tracing::error!(error = %err, "a call's task failed");
            Reply {
                request_id,
                result: Err(Box::new(Error::Internal.classify())),
                replayed: false,
            }
        })
    }
}

/// A validated request, as idempotency sees it.
pub(crate) trait Retryable: AsRef<Account> {
    /// Its AIP-155 `request_id`.
    fn request_id(&self) -> Option<uuid::Uuid>;
    /// Everything it asks, which a retry must ask alike.
    fn asks(&self) -> Vec<Vec<u8>>;
}

/// The fields passed through to Cognito, as parts of a request's fingerprint.
fn pass_through_parts(pass_through: &PassThrough) -> Vec<Vec<u8>> {
    let optional = |value: &Option<String>| match value {
        Some(value) => [b"1", value.as_bytes()].concat(),
        None => b"0".to_vec(),
    };
    let mut parts = Vec::new();
    for (key, value) in pass_through.client_metadata.sorted() {
        parts.push(key.as_bytes().to_vec());
        parts.push(value.as_bytes().to_vec());
    }
    parts.push(b"--".to_vec());
    let context = pass_through.user_context.clone().unwrap_or_default();
    parts.push(optional(&context.ip_address));
    parts.push(optional(&context.encoded_data));
    parts.push(optional(&pass_through.analytics_endpoint_id));
    parts
}

impl Retryable for ForgotPassword {
    fn request_id(&self) -> Option<uuid::Uuid> {
        self.request_id
    }

    fn asks(&self) -> Vec<Vec<u8>> {
        let mut parts = vec![self.account.username.as_str().as_bytes().to_vec()];
        parts.extend(pass_through_parts(&self.pass_through));
        parts
    }
}

impl Retryable for ConfirmForgotPassword {
    fn request_id(&self) -> Option<uuid::Uuid> {
        self.request_id
    }

    fn asks(&self) -> Vec<Vec<u8>> {
        let mut parts = vec![
            self.account.username.as_str().as_bytes().to_vec(),
            self.confirmation_code.expose().as_bytes().to_vec(),
            self.password.expose().as_bytes().to_vec(),
        ];
        parts.extend(pass_through_parts(&self.pass_through));
        parts
    }
}

/// An answer that can be remembered and replayed.
pub(crate) trait Rememberable: Sized {
    fn remember(&self) -> Remembered;
    fn replayed(remembered: &Remembered) -> Option<Self>;
}

impl Rememberable for CodeDelivery {
    fn remember(&self) -> Remembered {
        Remembered::Delivery(self.clone())
    }

    fn replayed(remembered: &Remembered) -> Option<Self> {
        match remembered {
            Remembered::Delivery(delivery) => Some(delivery.clone()),
            _ => None,
        }
    }
}

impl Rememberable for () {
    fn remember(&self) -> Remembered {
        Remembered::Confirmed
    }

    fn replayed(remembered: &Remembered) -> Option<Self> {
        matches!(remembered, Remembered::Confirmed).then_some(())
    }
}

/// What an outcome is remembered as, as the caller saw it: only what Cognito decided for good
/// (its success, real or simulated; its answer about this request: a wrong code, a password
/// refused, an account's state). `None` for one refused here (by a limit, masked or not), one
/// whose outcome is unknown (timed out, masked or not; connection lost), and Cognito's answers
/// that a retry may change (throttling, internal errors, a failed delivery, a misconfiguration):
/// their retries run again. The decision depends on what the caller was answered, never on
/// whether it was masked, so it tells no account from another.
fn remembered<T: Rememberable>(outcome: &Outcome<T>) -> Option<Remembered> {
    let error = match &outcome.result {
        Ok(answer) => return Some(answer.remember()),
        Err(error) => error,
    };
    let from_cognito = matches!(
        error,
        Error::Upstream(UpstreamError::Service { .. }) | Error::CodeRefused { .. }
    );
    let classified = error.classify();
    let for_good = matches!(
        classified.code,
        Code::InvalidArgument | Code::FailedPrecondition | Code::NotFound | Code::PermissionDenied
    );
    (from_cognito && for_good).then(|| Remembered::Failed(Box::new(classified)))
}

/// How a call with a `request_id` was answered without running.
enum Answered<T> {
    /// The remembered outcome of the earlier call.
    Replay(Result<T, Box<Classified>>),
    /// Refused: the id reused for another request, or the caller's deadline came while the
    /// earlier call ran.
    Refused(Error),
}

/// A remembered answer as the reply it was.
fn replay<T: Rememberable>(answer: &Remembered) -> Result<T, Box<Classified>> {
    match answer {
        Remembered::Failed(error) => Err(error.clone()),
        answer => T::replayed(answer).ok_or_else(|| Box::new(Error::Internal.classify())),
    }
}

/// What a call whose budget ran out while waiting on Cognito is answered: what a masked
/// answer imitating a real one that would have come too late is answered too.
fn timed_out(budget: Budget) -> Error {
    Error::Upstream(UpstreamError::Timeout {
        set_by_caller: budget.set_by_caller,
    })
}

/// Dropped with the handler when the caller cancels or goes away before the answer: tells
/// the call, which goes on to record its outcome.
struct CallerGone(Option<(CancellationToken, tracing::Span)>);

impl CallerGone {
    /// The caller got its answer.
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for CallerGone {
    fn drop(&mut self) {
        if let Some((token, span)) = self.0.take() {
            token.cancel();
            tracing::debug!(
                parent: &span,
                "the caller went away; the call goes on to record its outcome"
            );
        }
    }
}

impl Shared {
    /// The ticket of a call with a `request_id`: who asks (the caller, the user pool, the RPC,
    /// the id) and what (everything the request asks, and the app client).
    fn ticket<R: Retryable>(&self, request: &R, call: &Call, client: &AppClient) -> Option<Ticket> {
        let id = request.request_id()?;
        let pool = client.pool.as_deref().unwrap_or(client.id.as_str());
        let who: [&[u8]; 4] = [
            call.caller().name().as_bytes(),
            pool.as_bytes(),
            call.rpc().method().as_bytes(),
            id.as_bytes(),
        ];
        let mut asks = request.asks();
        asks.push(client.id.as_str().as_bytes().to_vec());
        let what: Vec<&[u8]> = asks.iter().map(Vec::as_slice).collect();
        Some(self.idempotency.ticket(&who, &what))
    }

    /// Claims `ticket`: the call runs (with where to remember its outcome, which it holds
    /// within `upstream`), or is answered at once: the earlier call's outcome (waited for,
    /// within the caller's `budget`, while it runs), or a refusal.
    async fn claim<T: Rememberable>(
        &self,
        ticket: Ticket,
        budget: Budget,
        upstream: Budget,
    ) -> Result<Box<Remembering>, Answered<T>> {
        match self
            .idempotency
            .claim(ticket, budget.deadline, upstream.deadline)
            .await
        {
            Claimed::Run(remembering) => Ok(remembering),
            Claimed::Replay(answer) => Err(Answered::Replay(replay(&answer))),
            Claimed::Reused => Err(Answered::Refused(Error::RequestIdReused)),
            Claimed::TimedOut => Err(Answered::Refused(timed_out(budget))),
        }
    }

    fn subject(&self, account: &Account, client: Option<&AppClient>) -> Subject {
        let pool = client.and_then(|c| c.pool.as_deref());
        Subject {
            user: self
                .usernames
                .pseudonym(PoolUser::new(pool, &account.username)),
            client_id: match (&account.client_id, client) {
                (Some(id), _) => id.to_string(),
                (None, Some(client)) => client.id.to_string(),
                (None, None) => "-".to_owned(),
            },
            client: client
                .map_or(UNKNOWN_CLIENT, |c| c.alias.as_str())
                .to_owned(),
        }
    }

    /// In the order of the README: client allowlist, the caller's grant, the client's last
    /// proof, the caller's own limit, global limit, per-username limit, a place among the calls waiting on Cognito;
    /// then, unless the caller has gone or its deadline leaves too little time, Cognito.
    /// Returns the app client to call and the place.
    async fn admit(
        &self,
        account: &Account,
        served: &Served,
    ) -> Result<(Arc<AppClient>, OwnedSemaphorePermit), Error> {
        let client = served.client.clone().ok_or(Error::ClientNotAllowed)?;
        let caller_limit = self
            .callers
            .admit(served.caller.identity.as_deref(), served.rpc, &client.alias)
            .map_err(|lacks| Error::CallerNotAllowed {
                caller: served.caller.name().to_owned(),
                lacks,
            })?;
        if client.misconfigured() {
            return Err(Error::ClientMisconfigured {
                client: client.alias.clone(),
            });
        }
        // Checked before the limits too, so that a call that cannot be sent costs no limit.
        let in_time = || match served.caller_budget.too_short(Instant::now()) {
            true => Err(Error::DeadlineTooShort),
            false => Ok(()),
        };
        in_time()?;
        let user = PoolUser::new(client.pool.as_deref(), &account.username);
        self.limits
            .admit(caller_limit.as_deref(), user)
            .await
            .map_err(Error::RateLimited)?;
        let permit = self.limits.upstream_permit().ok_or(Error::Overloaded {
            limit: "MAX_CONCURRENT_UPSTREAM",
        })?;
        if served.caller_gone.is_cancelled() {
            return Err(Error::Cancelled);
        }
        in_time()?;
        Ok((client, permit))
    }

    async fn forgot_password(
        &self,
        request: ForgotPassword,
        served: Served,
    ) -> Outcome<CodeDelivery> {
        let (client, permit) = match self.admit(&request.account, &served).await {
            Ok(admitted) => admitted,
            Err(refused) => return Outcome::plain(Err(refused)),
        };
        let (sent, budget) = (Instant::now(), served.budget);
        let user = PoolUser::new(client.pool.as_deref(), &request.account.username);
        let err = match client.forgot_password(&request, budget).await {
            Ok(delivery) => {
                self.masking
                    .observe_delivery(client.region(), sent.elapsed());
                return Outcome::plain(Ok(delivery));
            }
            Err(err) => err,
        };
        let Some(masked) = self.masking.mask(Rpc::ForgotPassword, &err) else {
            return Outcome::plain(Err(Error::Upstream(err)));
        };
        let result = match self.exhausted(masked.mask, user) {
            Some(refused) => Err(refused),
            None => match self
                .masking
                .imitate_delivery(client.region(), sent, budget.deadline)
                .await
            {
                true => Ok(self.masking.simulated_delivery(user)),
                false => Err(timed_out(budget)),
            },
        };
        // Held until the answer goes, as a real delivery holds it.
        drop(permit);
        Outcome {
            result,
            masked: masked.hidden(),
        }
    }

    async fn confirm_forgot_password(
        &self,
        request: ConfirmForgotPassword,
        served: Served,
    ) -> Outcome<()> {
        let (client, permit) = match self.admit(&request.account, &served).await {
            Ok(admitted) => admitted,
            Err(refused) => return Outcome::plain(Err(refused)),
        };
        let (sent, budget) = (Instant::now(), served.budget);
        let user = PoolUser::new(client.pool.as_deref(), &request.account.username);
        let err = match client.confirm_forgot_password(&request, budget).await {
            Ok(()) => return Outcome::plain(Ok(())),
            Err(err) => err,
        };
        let Some(masked) = self.masking.mask(Rpc::ConfirmForgotPassword, &err) else {
            return Outcome::plain(Err(Error::Upstream(err)));
        };
        let result = match self.exhausted(masked.mask, user) {
            Some(refused) => Err(refused),
            // Every code that does not work is one answer, as late as the slower real code
            // error.
            None => match self
                .masking
                .time_code_refusal(
                    client.region(),
                    CodeError::of(&masked.real),
                    sent,
                    budget.deadline,
                )
                .await
            {
                true => Err(Error::CodeRefused {
                    request_id: masked.request_id.clone(),
                }),
                false => Err(timed_out(budget)),
            },
        };
        drop(permit);
        Outcome {
            result,
            masked: masked.hidden(),
        }
    }

    /// For Cognito's own per-user attempt limit (`Mask::UserLimit`), this service's
    /// per-username limit's refusal, the user's bucket emptied; `None` for any other mask, or
    /// with no per-username limit (the call is then masked as any other is).
    fn exhausted(&self, mask: Mask, user: PoolUser<'_>) -> Option<Error> {
        match mask {
            Mask::UserLimit => self.limits.exhaust(user).map(Error::RateLimited),
            Mask::Delivery | Mask::CodeRefused => None,
        }
    }
}
