//! Who may call (README "Callers"). Cognito evaluates no IAM policy for these two operations,
//! so this service is where resets are authorized: `CALLERS_FILE` names each caller by its
//! identity (the mTLS client certificate's URI SAN, else its CN; `anonymous` for a caller
//! without one) with the app clients and RPCs it may use and, optionally, a rate limit of its
//! own. A caller not named is refused. Without the file every caller may do everything.
//!
//! The file is re-read every `FILE_RELOAD_INTERVAL` ([`crate::reload`]): a changed policy
//! applies to the next call, a file that does not load keeps the policy in use.
//!
//! Behind a mesh whose sidecar terminates mTLS, the identity can come from the header the
//! sidecar sets instead (`CALLER_IDENTITY_HEADER`): only safe when nothing but the sidecar can
//! reach the port.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use serde::Deserialize;

use crate::domain::Rpc;
use crate::limits::{Bucket, RateSpec};
use crate::metrics as m;
use crate::reload::Watched;
use crate::settings::{SettingError, parse_toml, read_text};

/// The setting every problem of the callers file is reported under.
const SETTING: &str = "CALLERS_FILE";
/// The name of callers without a client certificate (or identity header).
pub const ANONYMOUS: &str = "anonymous";
/// The metric label of a caller the policy does not name (or of any identified caller when
/// there is no policy): label values stay bounded by the policy.
pub const UNKNOWN: &str = "unknown";
/// The longest caller name accepted (URI SANs and CNs are far shorter).
const MAX_NAME_CHARS: usize = 256;

/// Where a caller's identity comes from when its connection has no client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum IdentityHeader {
    /// Linkerd's `l5d-client-id` (the client's mesh identity).
    #[value(name = "l5d-client-id")]
    L5dClientId,
    /// Istio's (Envoy's) `x-forwarded-client-cert`: the `URI=` of its last element.
    #[value(name = "x-forwarded-client-cert")]
    XForwardedClientCert,
}

impl IdentityHeader {
    /// The identity the header of `headers` names, if it names one: one header line, well
    /// formed, naming printable ASCII of at most 256 characters. Anything else names no one.
    pub(crate) fn identity(self, headers: &http::HeaderMap) -> Option<String> {
        let name = match self {
            Self::L5dClientId => "l5d-client-id",
            Self::XForwardedClientCert => "x-forwarded-client-cert",
        };
        let mut values = headers.get_all(name).iter();
        let value = values.next()?;
        if values.next().is_some() {
            return None;
        }
        let value = value.to_str().ok()?.trim();
        let identity = match self {
            Self::L5dClientId => Some(value.to_owned()),
            Self::XForwardedClientCert => xfcc_uri(value),
        }?;
        let printable = identity.chars().all(|c| c.is_ascii_graphic());
        (!identity.is_empty() && printable && identity.len() <= MAX_NAME_CHARS).then_some(identity)
    }
}

/// The `URI=` of the last element (the client of the nearest proxy, which appends its own) of
/// an `x-forwarded-client-cert` value: elements are separated by `,`, their pairs by `;`, and
/// a value may be quoted, with `\"` inside. A value that does not parse names no one: a quote
/// left open would otherwise hide the proxy's own element behind a caller's forged one.
fn xfcc_uri(value: &str) -> Option<String> {
    let elements = xfcc_elements(value)?;
    let last = elements.last()?;
    let uris: Vec<&String> = last
        .iter()
        .filter(|(key, _)| key.eq_ignore_ascii_case("uri"))
        .map(|(_, value)| value)
        .collect();
    match uris.as_slice() {
        [uri] => Some((*uri).clone()),
        _ => None,
    }
}

/// An `x-forwarded-client-cert` value's elements, each its `key=value` pairs; `None` when it
/// is malformed (a quote left open, a pair without `=`).
fn xfcc_elements(value: &str) -> Option<Vec<Vec<(String, String)>>> {
    let (mut elements, mut pairs) = (Vec::new(), Vec::new());
    let (mut key, mut current) = (None::<String>, String::new());
    let mut chars = value.chars();
    let finish_pair = |key: &mut Option<String>, current: &mut String, pairs: &mut Vec<_>| {
        let Some(name) = key.take() else {
            return current.trim().is_empty();
        };
        pairs.push((
            name.trim().to_owned(),
            std::mem::take(current).trim().to_owned(),
        ));
        true
    };
    while let Some(c) = chars.next() {
        match c {
            '"' if key.is_some() => loop {
                match chars.next()? {
                    '"' => break,
                    '\\' => current.push(chars.next()?),
                    c => current.push(c),
                }
            },
            '"' => return None,
            '=' if key.is_none() => key = Some(std::mem::take(&mut current)),
            ';' => {
                if !finish_pair(&mut key, &mut current, &mut pairs) {
                    return None;
                }
            }
            ',' => {
                if !finish_pair(&mut key, &mut current, &mut pairs) {
                    return None;
                }
                elements.push(std::mem::take(&mut pairs));
            }
            c => current.push(c),
        }
    }
    if !finish_pair(&mut key, &mut current, &mut pairs) {
        return None;
    }
    elements.push(pairs);
    Some(elements)
}

/// What one caller may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Grant {
    /// The app client aliases it may use.
    clients: BTreeSet<String>,
    /// The RPCs it may call.
    rpcs: BTreeSet<&'static str>,
    /// Its own limit, all its calls together.
    rate_limit: Option<RateSpec>,
}

/// Every caller named, and what each may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    callers: HashMap<String, Grant>,
}

/// `CALLERS_FILE`'s shape.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CallersFile {
    /// Each caller's table, read as an [`Entry`] of its own so that a mistake in it names it.
    #[serde(default)]
    callers: BTreeMap<String, toml::Value>,
}

/// One `[callers."<identity>"]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    clients: Vec<String>,
    rpcs: Option<Vec<String>>,
    rate_limit: Option<String>,
}

impl Policy {
    /// How many callers it names.
    pub fn len(&self) -> usize {
        self.callers.len()
    }

    /// True when it names no caller (every call is then refused).
    pub fn is_empty(&self) -> bool {
        self.callers.is_empty()
    }

    /// Parses and checks the file's text against the app client `aliases` served; a problem
    /// is one line naming the caller and the field.
    pub(crate) fn parse(text: &str, aliases: &[&str]) -> Result<Self, String> {
        let file: CallersFile = parse_toml(text)?;
        let mut callers = HashMap::new();
        for (name, table) in file.callers {
            let entry = Entry::deserialize(table)
                .map_err(|err| format!("callers.{name:?}: {}", err.message().replace('\n', " ")))?;
            let grant = grant(&name, entry, aliases)
                .map_err(|(field, problem)| format!("callers.{name:?}.{field}: {problem}"))?;
            callers.insert(name, grant);
        }
        Ok(Self { callers })
    }
}

fn grant(name: &str, entry: Entry, aliases: &[&str]) -> Result<Grant, (&'static str, String)> {
    if name.is_empty()
        || name.chars().count() > MAX_NAME_CHARS
        || !name.chars().all(|c| c.is_ascii_graphic())
    {
        return Err((
            "name",
            format!("a caller is named by 1 to {MAX_NAME_CHARS} printable ASCII characters"),
        ));
    }
    if name == UNKNOWN {
        return Err((
            "name",
            "`unknown` is the metric label of callers the policy does not name".into(),
        ));
    }
    let mut clients = BTreeSet::new();
    for alias in entry.clients {
        if !aliases.contains(&alias.as_str()) {
            return Err((
                "clients",
                format!(
                    "{alias:?} is not an app client alias this server serves (it serves {})",
                    aliases.join(", ")
                ),
            ));
        }
        clients.insert(alias);
    }
    let rpcs = match entry.rpcs {
        None => Rpc::ALL.iter().map(|rpc| rpc.method()).collect(),
        Some(rpcs) => {
            let mut granted = BTreeSet::new();
            for method in rpcs {
                let rpc = Rpc::ALL.into_iter().find(|rpc| rpc.method() == method);
                let Some(rpc) = rpc else {
                    return Err((
                        "rpcs",
                        format!("{method:?} is not an RPC (ForgotPassword, ConfirmForgotPassword)"),
                    ));
                };
                granted.insert(rpc.method());
            }
            granted
        }
    };
    let rate_limit = entry
        .rate_limit
        .map(|limit| limit.parse::<RateSpec>())
        .transpose()
        .map_err(|problem| {
            (
                "rate_limit",
                format!("{problem}; leave it out for no limit"),
            )
        })?;
    Ok(Grant {
        clients,
        rpcs,
        rate_limit,
    })
}

/// The callers policy as configured: its file and what it held at start-up.
#[derive(Debug, Clone)]
pub struct CallersSettings {
    /// `CALLERS_FILE`.
    pub file: PathBuf,
    /// Its policy at start-up.
    pub policy: Policy,
    /// The text it was read from, so that a reload sees a change made since.
    text: String,
    /// The app client aliases served, which every reload is checked against.
    aliases: Vec<String>,
}

impl CallersSettings {
    /// Reads and checks the callers file at `path` against the app client `aliases` served.
    /// Every problem is one line naming the file, the caller and the field.
    pub fn load(path: &Path, aliases: &[&str]) -> Result<Self, SettingError> {
        let text = read_text(SETTING, path)?;
        let policy = Policy::parse(&text, aliases).map_err(|problem| {
            SettingError::new(SETTING, format!("{}: {problem}", path.display()))
        })?;
        Ok(Self {
            file: path.to_owned(),
            policy,
            text,
            aliases: aliases.iter().map(|a| (*a).to_owned()).collect(),
        })
    }
}

/// Why a caller was refused: what it lacks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Lacks {
    /// The policy does not name it.
    Unnamed,
    /// It may not call this RPC.
    Rpc(&'static str),
    /// It may not use this app client.
    Client(String),
}

/// One caller's own limit, in force.
#[derive(Debug)]
pub(crate) struct CallerLimit {
    /// The caller's name.
    pub name: String,
    /// Its limit.
    pub spec: RateSpec,
    /// The limit as written, e.g. `10/1s`.
    pub limit: String,
    /// Its bucket on this replica.
    pub bucket: Bucket,
}

/// A policy in force, with a bucket for each caller that has a limit.
#[derive(Debug)]
struct Active {
    policy: Policy,
    limits: HashMap<String, Arc<CallerLimit>>,
}

impl Active {
    /// `policy`, keeping the buckets of `previous` whose caller's limit did not change.
    fn new(policy: Policy, previous: Option<&Active>) -> Self {
        let limits = policy
            .callers
            .iter()
            .filter_map(|(name, grant)| {
                let spec = grant.rate_limit?;
                let kept = previous
                    .and_then(|p| p.limits.get(name))
                    .filter(|l| l.spec == spec)
                    .cloned();
                let limit = kept.unwrap_or_else(|| {
                    Arc::new(CallerLimit {
                        name: name.clone(),
                        spec,
                        limit: spec.to_string(),
                        bucket: Bucket::new(spec),
                    })
                });
                Some((name.clone(), limit))
            })
            .collect();
        Self { policy, limits }
    }
}

/// Who may call, as the service checks it on every call.
#[derive(Debug)]
pub(crate) struct Callers {
    /// `None`: no policy, every caller may do everything.
    active: RwLock<Option<Arc<Active>>>,
    /// The file and aliases a reload reads and checks, with its text as last read.
    file: Option<(PathBuf, Vec<String>)>,
    last_text: Mutex<Option<String>>,
}

impl Callers {
    /// The policy of `settings`, or none.
    pub(crate) fn new(settings: Option<&CallersSettings>) -> Self {
        let Some(settings) = settings else {
            return Self {
                active: RwLock::new(None),
                file: None,
                last_text: Mutex::new(None),
            };
        };
        Self {
            active: RwLock::new(Some(Arc::new(Active::new(settings.policy.clone(), None)))),
            file: Some((settings.file.clone(), settings.aliases.clone())),
            last_text: Mutex::new(Some(settings.text.clone())),
        }
    }

    fn active(&self) -> Option<Arc<Active>> {
        self.active
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The name of the caller with `identity` (`None`: no certificate) as logs and audit
    /// events show it: its identity, or `anonymous`.
    pub(crate) fn name(identity: Option<&str>) -> &str {
        identity.unwrap_or(ANONYMOUS)
    }

    /// The policy's name for the caller with `identity`: `anonymous` for none; a presented
    /// identity that is a reserved name (`anonymous`, `unknown`) names no entry, so that no
    /// certificate or header can claim the anonymous grant's place.
    fn key(identity: Option<&str>) -> Option<&str> {
        match identity {
            None => Some(ANONYMOUS),
            Some(ANONYMOUS | UNKNOWN) => None,
            Some(identity) => Some(identity),
        }
    }

    fn grant<'a>(active: &'a Active, identity: Option<&str>) -> Option<(&'a str, &'a Grant)> {
        let key = Self::key(identity)?;
        active
            .policy
            .callers
            .get_key_value(key)
            .map(|(name, grant)| (name.as_str(), grant))
    }

    /// The caller's label in metrics: its name when the policy names it, `anonymous`, or
    /// `unknown`.
    #[cfg(test)]
    pub(crate) fn label(&self, identity: Option<&str>) -> String {
        self.at_intake(identity, Rpc::ForgotPassword).0
    }

    /// Checks that the caller with `identity` may call `rpc` with the app client `alias`; its
    /// own limit, if it has one.
    pub(crate) fn admit(
        &self,
        identity: Option<&str>,
        rpc: Rpc,
        alias: &str,
    ) -> Result<Option<Arc<CallerLimit>>, Lacks> {
        let Some(active) = self.active() else {
            return Ok(None);
        };
        let (name, grant) = Self::grant(&active, identity).ok_or(Lacks::Unnamed)?;
        if !grant.rpcs.contains(rpc.method()) {
            return Err(Lacks::Rpc(rpc.method()));
        }
        if !grant.clients.contains(alias) {
            return Err(Lacks::Client(alias.to_owned()));
        }
        Ok(active.limits.get(name).cloned())
    }

    /// Checks that the caller with `identity` may call `rpc` at all (before its request is
    /// read).
    #[cfg(test)]
    pub(crate) fn may_call(&self, identity: Option<&str>, rpc: Rpc) -> Result<(), Lacks> {
        self.at_intake(identity, rpc).1
    }

    /// At a call's start, with one look at the policy: the caller's label ([`Self::label`])
    /// and whether it may call `rpc` at all ([`Self::may_call`]).
    pub(crate) fn at_intake(
        &self,
        identity: Option<&str>,
        rpc: Rpc,
    ) -> (String, Result<(), Lacks>) {
        let active = self.active();
        let unnamed = || match identity {
            None => ANONYMOUS.to_owned(),
            Some(_) => UNKNOWN.to_owned(),
        };
        let Some(active) = active.as_deref() else {
            return (unnamed(), Ok(()));
        };
        match Self::grant(active, identity) {
            None => (unnamed(), Err(Lacks::Unnamed)),
            Some((name, grant)) if grant.rpcs.contains(rpc.method()) => (name.to_owned(), Ok(())),
            Some((name, _)) => (name.to_owned(), Err(Lacks::Rpc(rpc.method()))),
        }
    }
}

impl Watched for Callers {
    fn reload(&self) -> Result<bool, String> {
        let Some((path, aliases)) = &self.file else {
            return Ok(false);
        };
        let text = read_text(SETTING, path).map_err(|e| e.problem)?;
        let mut last = self.last_text.lock().unwrap_or_else(|e| e.into_inner());
        if last.as_deref() == Some(text.as_str()) {
            return Ok(false);
        }
        let aliases: Vec<&str> = aliases.iter().map(String::as_str).collect();
        let parsed = Policy::parse(&text, &aliases);
        *last = Some(text);
        let policy = parsed.map_err(|problem| format!("{}: {problem}", path.display()))?;
        let mut active = self.active.write().unwrap_or_else(|e| e.into_inner());
        if active.as_ref().is_some_and(|a| a.policy == policy) {
            return Ok(false);
        }
        *active = Some(Arc::new(Active::new(policy, active.as_deref())));
        Ok(true)
    }

    fn report(&self, outcome: Result<(), &str>) {
        match outcome {
            Ok(()) => {
                self.reloads("reloaded").increment(1);
                tracing::info!("callers policy reloaded");
            }
            Err(problem) => {
                self.reloads("failed").increment(1);
                tracing::error!(
                    error = problem,
                    "CALLERS_FILE changed but does not load; the previous policy stays in force"
                );
            }
        }
    }

    fn reloads(&self, result: &'static str) -> metrics::Counter {
        metrics::counter!(m::CALLERS_RELOADS, "result" => result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALIASES: &[&str] = &["web", "support"];

    fn parse(text: &str) -> Result<Policy, String> {
        Policy::parse(text, ALIASES)
    }

    const POLICY: &str = r#"
        [callers."spiffe://cluster.local/ns/web/sa/backend"]
        clients = ["web"]
        rpcs = ["ForgotPassword"]
        rate_limit = "10/1s"

        [callers.anonymous]
        clients = []
    "#;

    fn callers(text: &str) -> Callers {
        // Only the policy matters here: the file is never re-read.
        let callers = Callers::new(None);
        *callers.active.write().unwrap() = Some(Arc::new(Active::new(parse(text).unwrap(), None)));
        callers
    }

    #[test]
    fn a_caller_may_do_what_it_is_granted_and_nothing_else() {
        let callers = callers(POLICY);
        let web = "spiffe://cluster.local/ns/web/sa/backend";
        let limit = callers
            .admit(Some(web), Rpc::ForgotPassword, "web")
            .unwrap();
        assert_eq!(limit.unwrap().limit, "10/1s");
        assert_eq!(
            callers
                .admit(Some(web), Rpc::ForgotPassword, "support")
                .unwrap_err(),
            Lacks::Client("support".into())
        );
        assert_eq!(
            callers
                .admit(Some(web), Rpc::ConfirmForgotPassword, "web")
                .unwrap_err(),
            Lacks::Rpc("ConfirmForgotPassword")
        );
        assert_eq!(
            callers
                .admit(Some("someone"), Rpc::ForgotPassword, "web")
                .unwrap_err(),
            Lacks::Unnamed
        );
        assert_eq!(
            callers.admit(None, Rpc::ForgotPassword, "web").unwrap_err(),
            Lacks::Client("web".into()),
            "anonymous may call every RPC but with no client"
        );
        assert_eq!(callers.label(Some(web)), web);
        assert_eq!(callers.label(Some("someone")), UNKNOWN);
        assert_eq!(callers.label(None), ANONYMOUS);
        // Without a policy, everyone may do everything.
        let open = Callers::new(None);
        assert!(
            open.admit(Some("x"), Rpc::ConfirmForgotPassword, "web")
                .unwrap()
                .is_none()
        );
        assert_eq!(open.label(Some("x")), UNKNOWN);
        // No certificate or header can claim the anonymous grant by its name.
        assert_eq!(
            callers.may_call(Some(ANONYMOUS), Rpc::ForgotPassword),
            Err(Lacks::Unnamed)
        );
        assert_eq!(callers.label(Some(ANONYMOUS)), UNKNOWN);
    }

    #[test]
    fn every_mistake_is_one_line_naming_the_caller_and_the_field() {
        for (text, expected) in [
            (
                "[callers.a]\nclients = [\"mobile\"]",
                "callers.\"a\".clients: \"mobile\" is not an app client alias",
            ),
            (
                "[callers.a]\nclients = []\nrpcs = [\"SignUp\"]",
                "callers.\"a\".rpcs: \"SignUp\" is not an RPC",
            ),
            (
                "[callers.a]\nclients = []\nrate_limit = \"fast\"",
                "callers.\"a\".rate_limit: expected N/DURATION",
            ),
            (
                "[callers.a]\nclients = []\nrole = \"admin\"",
                "callers.\"a\": unknown field `role`",
            ),
            (
                "[callers.a]\nrpcs = []",
                "callers.\"a\": missing field `clients`",
            ),
            (
                "[callers.unknown]\nclients = []",
                "callers.\"unknown\".name:",
            ),
            ("[callers]\na = 1", "callers.\"a\":"),
            ("[callers.a]\nclients = [\n", "line 2: unclosed array"),
            (
                "[callers.\"has space\"]\nclients = []",
                "callers.\"has space\".name:",
            ),
        ] {
            let problem = parse(text).unwrap_err();
            assert!(problem.contains(expected), "{text:?}: {problem}");
            assert!(!problem.contains('\n'), "{problem}");
        }
    }

    #[test]
    fn a_reload_keeps_the_buckets_of_unchanged_limits() {
        let first = Active::new(parse(POLICY).unwrap(), None);
        let web = "spiffe://cluster.local/ns/web/sa/backend";
        let bucket = |active: &Active| Arc::as_ptr(&active.limits[web]);
        let same = Active::new(parse(POLICY).unwrap(), Some(&first));
        assert_eq!(bucket(&same), bucket(&first));
        let changed = Active::new(
            parse(&POLICY.replace("10/1s", "5/1s")).unwrap(),
            Some(&first),
        );
        assert_ne!(bucket(&changed), bucket(&first));
    }

    #[test]
    fn identities_come_from_the_mesh_header_when_asked() {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            "l5d-client-id",
            "web.ns.serviceaccount.identity.linkerd.cluster.local"
                .parse()
                .unwrap(),
        );
        headers.insert(
            "x-forwarded-client-cert",
            "By=spiffe://a;URI=spiffe://old,By=spiffe://cluster.local/ns/pr/sa/default;Hash=ab;Subject=\"CN=x,O=y\";URI=spiffe://cluster.local/ns/web/sa/backend"
                .parse()
                .unwrap(),
        );
        assert_eq!(
            IdentityHeader::L5dClientId.identity(&headers).as_deref(),
            Some("web.ns.serviceaccount.identity.linkerd.cluster.local")
        );
        assert_eq!(
            IdentityHeader::XForwardedClientCert
                .identity(&headers)
                .as_deref(),
            Some("spiffe://cluster.local/ns/web/sa/backend")
        );
        assert_eq!(
            IdentityHeader::L5dClientId.identity(&http::HeaderMap::new()),
            None
        );
        // Two header lines name no one.
        headers.append("l5d-client-id", "second".parse().unwrap());
        assert_eq!(IdentityHeader::L5dClientId.identity(&headers), None);
    }

    #[test]
    fn a_forged_xfcc_element_never_names_the_caller() {
        let xfcc = |value: &str| {
            let mut headers = http::HeaderMap::new();
            headers.insert("x-forwarded-client-cert", value.parse().unwrap());
            IdentityHeader::XForwardedClientCert.identity(&headers)
        };
        // A quote left open would hide the proxy's own element behind the caller's.
        assert_eq!(
            xfcc(
                r#"URI=spiffe://cluster.local/ns/web/sa/backend;X=",By=spiffe://pr;URI=spiffe://attacker"#
            ),
            None
        );
        assert_eq!(
            xfcc(r#"Subject="CN=a\",URI=spiffe://forged";URI=spiffe://real"#),
            Some("spiffe://real".into()),
            "an escaped quote stays inside its value"
        );
        assert_eq!(
            xfcc("URI=spiffe://a;URI=spiffe://b"),
            None,
            "two URIs in one element"
        );
        assert_eq!(xfcc("By=spiffe://pr;Hash=ab"), None, "no URI");
        assert_eq!(xfcc("URI"), None);
        assert_eq!(
            xfcc(r#"URI="spiffe://a b""#),
            None,
            "printable without spaces only"
        );
    }
}
