//! The app clients this service serves, as configured: each under a short alias, with its
//! user pool, region, optional endpoint and time bound, and its secret (none, or a file that is
//! re-read while the service runs). They come from `COGNITO_CLIENTS_FILE`, a TOML file, or from
//! the one-client settings (`COGNITO_CLIENT_ID`, `COGNITO_CLIENT_SECRET[_FILE]`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::LazyLock;
use std::time::Duration;

use regex::Regex;
use secrecy::SecretString;
use serde::Deserialize;

use crate::domain::ClientId;
use crate::settings::{
    SettingError, check_endpoint_url, parse_duration, parse_toml, read_secret_file, read_text,
};

/// The setting every problem of the clients file is reported under.
const SETTING: &str = "COGNITO_CLIENTS_FILE";
/// The alias of the one client of the one-client settings.
pub const SHORTHAND_ALIAS: &str = "default";

/// An alias: short, lowercase, fit for a metric label.
static ALIAS: LazyLock<Regex> =
    LazyLock::new(|| Regex::new("^[a-z0-9][a-z0-9_-]{0,31}$").expect("alias pattern"));
/// An AWS region, e.g. `eu-west-1`, `us-gov-west-1`.
static REGION: LazyLock<Regex> =
    LazyLock::new(|| Regex::new("^[a-z]{2}(-[a-z]+)+-[0-9]+$").expect("region pattern"));
/// A user pool id: its region, `_`, letters and digits (Cognito's own pattern).
static USER_POOL_ID: LazyLock<Regex> =
    LazyLock::new(|| Regex::new("^([a-z0-9-]+)_[0-9A-Za-z]+$").expect("user pool id pattern"));

/// One app client.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// Its short name in logs, audit events and metrics.
    pub alias: String,
    /// Its id.
    pub client_id: ClientId,
    /// Its user pool; `None` with the one-client settings.
    pub user_pool_id: Option<String>,
    /// Its pool's region; `None`: `AWS_REGION` or the AWS profile's.
    pub region: Option<String>,
    /// An endpoint override, e.g. an emulator.
    pub endpoint_url: Option<String>,
    /// Bound on one upstream call, retries included.
    pub timeout: Duration,
    /// Its secret as read at start-up; `None`: a client without a secret.
    pub secret: Option<SecretString>,
    /// The file the secret is re-read from while the service runs, when it came from one.
    pub secret_file: Option<PathBuf>,
}

/// The upstream: every app client served, and which serves requests that name none.
#[derive(Debug)]
pub struct CognitoSettings {
    /// The clients, in the order configured; at least one.
    pub clients: Vec<ClientSettings>,
    /// The index in `clients` of the one for requests without a `client_id`.
    pub default: usize,
}

impl CognitoSettings {
    /// The client for requests without a `client_id`.
    pub fn default_client(&self) -> &ClientSettings {
        &self.clients[self.default]
    }
}

/// `COGNITO_CLIENTS_FILE`'s shape.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientsFile {
    /// The alias of the client for requests without a `client_id`.
    default: Option<String>,
    #[serde(default)]
    clients: BTreeMap<String, Entry>,
}

/// One `[clients.<alias>]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    client_id: String,
    user_pool_id: String,
    region: String,
    secret_file: Option<PathBuf>,
    endpoint_url: Option<String>,
    timeout: Option<String>,
}

/// What a client of the file takes from the other settings when it does not say.
#[derive(Debug, Clone)]
pub(crate) struct Fallbacks {
    /// `COGNITO_TIMEOUT`.
    pub timeout: Duration,
    /// `AWS_ENDPOINT_URL`.
    pub endpoint_url: Option<String>,
}

/// Reads and checks the clients file at `path`. Every problem is one line naming the file's
/// alias and field.
pub(crate) fn load_file(
    path: &Path,
    fallbacks: &Fallbacks,
) -> Result<(Vec<ClientSettings>, usize), SettingError> {
    let text = read_text(SETTING, path)?;
    parse(&text, fallbacks)
        .map_err(|problem| SettingError::new(SETTING, format!("{}: {problem}", path.display())))
}

/// Parses and checks the file's text; a problem is one line.
pub(crate) fn parse(
    text: &str,
    fallbacks: &Fallbacks,
) -> Result<(Vec<ClientSettings>, usize), String> {
    let file: ClientsFile = parse_toml(text)?;
    if file.clients.is_empty() {
        return Err("names no client: add a [clients.<alias>] table".into());
    }
    let mut clients = Vec::with_capacity(file.clients.len());
    let mut ids: HashMap<String, String> = HashMap::new();
    for (alias, entry) in file.clients {
        let client = check(&alias, entry, fallbacks)?;
        if let Some(other) = ids.insert(client.client_id.to_string(), alias.clone()) {
            return Err(format!(
                "clients.{alias}.client_id: the same app client as clients.{other}"
            ));
        }
        clients.push(client);
    }
    let default = match &file.default {
        Some(alias) => clients
            .iter()
            .position(|c| &c.alias == alias)
            .ok_or_else(|| format!("default: no client is named {alias:?}"))?,
        None if clients.len() == 1 => 0,
        None => return Err("default: required when there is more than one client".into()),
    };
    Ok((clients, default))
}

/// Checks one `[clients.<alias>]` entry.
fn check(alias: &str, entry: Entry, fallbacks: &Fallbacks) -> Result<ClientSettings, String> {
    let field = |name: &str, problem: String| format!("clients.{alias}.{name}: {problem}");
    if !ALIAS.is_match(alias) {
        return Err(format!(
            "clients.{alias}: an alias is 1–32 of a-z, 0-9, '_' and '-', starting with a \
             letter or digit"
        ));
    }
    let client_id = ClientId::parse("client_id", entry.client_id)
        .map_err(|v| field("client_id", v.description))?;
    if !REGION.is_match(&entry.region) {
        return Err(field(
            "region",
            format!("{:?} is not an AWS region (e.g. eu-west-1)", entry.region),
        ));
    }
    let pool_region = USER_POOL_ID
        .captures(&entry.user_pool_id)
        .and_then(|c| c.get(1))
        .map(|m| m.as_str());
    match pool_region {
        None => {
            return Err(field(
                "user_pool_id",
                format!(
                    "{:?} is not a user pool id (e.g. eu-west-1_AbCdEfGhI)",
                    entry.user_pool_id
                ),
            ));
        }
        Some(region) if region != entry.region => {
            return Err(field(
                "user_pool_id",
                format!("the pool is in {region}, not in region {}", entry.region),
            ));
        }
        Some(_) => {}
    }
    let endpoint_url = match entry.endpoint_url {
        Some(url) => {
            check_endpoint_url(&url).map_err(|problem| field("endpoint_url", problem))?;
            Some(url)
        }
        None => fallbacks.endpoint_url.clone(),
    };
    let timeout = match entry.timeout {
        Some(text) => match parse_duration(&text) {
            Ok(Duration::ZERO) => return Err(field("timeout", "must be longer than zero".into())),
            Ok(timeout) => timeout,
            Err(problem) => return Err(field("timeout", problem)),
        },
        None => fallbacks.timeout,
    };
    let secret = entry
        .secret_file
        .as_deref()
        .map(read_secret_file)
        .transpose()
        .map_err(|e| field("secret_file", e.to_string()))?
        .map(SecretString::from);
    Ok(ClientSettings {
        alias: alias.to_owned(),
        client_id,
        user_pool_id: Some(entry.user_pool_id),
        region: Some(entry.region),
        endpoint_url,
        timeout,
        secret,
        secret_file: entry.secret_file,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    fn fallbacks() -> Fallbacks {
        Fallbacks {
            timeout: Duration::from_secs(5),
            endpoint_url: None,
        }
    }

    const TWO: &str = r#"
        default = "web"
        [clients.web]
        client_id = "1example23456789"
        user_pool_id = "eu-west-1_AbCdEfGhI"
        region = "eu-west-1"
        timeout = "2s"
        [clients.mobile]
        client_id = "2example98765432"
        user_pool_id = "eu-west-1_AbCdEfGhI"
        region = "eu-west-1"
        endpoint_url = "http://127.0.0.1:5000"
    "#;

    #[test]
    fn a_file_of_two_clients_parses_with_its_default() {
        let (clients, default) = parse(TWO, &fallbacks()).unwrap();
        assert_eq!(clients.len(), 2);
        let web = &clients[default];
        assert_eq!(web.alias, "web");
        assert_eq!(web.client_id.as_str(), "1example23456789");
        assert_eq!(web.user_pool_id.as_deref(), Some("eu-west-1_AbCdEfGhI"));
        assert_eq!(web.timeout, Duration::from_secs(2));
        assert!(web.secret.is_none());
        let mobile = clients.iter().find(|c| c.alias == "mobile").unwrap();
        assert_eq!(mobile.timeout, Duration::from_secs(5), "COGNITO_TIMEOUT");
        assert_eq!(
            mobile.endpoint_url.as_deref(),
            Some("http://127.0.0.1:5000")
        );
    }

    #[test]
    fn a_secret_file_is_read_and_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("web");
        std::fs::write(&secret, "s3cret-value\n").unwrap();
        let text = format!(
            "[clients.web]\nclient_id = \"abc\"\nuser_pool_id = \"eu-west-1_A\"\n\
             region = \"eu-west-1\"\nsecret_file = {:?}\n",
            secret.display().to_string()
        );
        let (clients, default) = parse(&text, &fallbacks()).unwrap();
        assert_eq!(default, 0, "one client needs no default");
        let read = clients[0].secret.as_ref().unwrap();
        assert_eq!(read.expose_secret(), "s3cret-value");
        assert_eq!(clients[0].secret_file.as_deref(), Some(secret.as_path()));
        assert!(!format!("{clients:?}").contains("s3cret"));
    }

    #[test]
    fn every_problem_is_one_line_naming_the_alias_and_field() {
        let client = |alias: &str, body: &str| {
            format!(
                "[clients.{alias}]\nclient_id = \"abc{alias}\"\nuser_pool_id = \"eu-west-1_A\"\n\
                 region = \"eu-west-1\"\n{body}\n"
            )
        };
        let cases = [
            (String::new(), "names no client"),
            (
                "default = \"x\"\n".to_owned() + &client("web", ""),
                "default: no client is named \"x\"",
            ),
            (client("web", "") + &client("app", ""), "default: required"),
            (client("web", "colour = \"red\""), "unknown field `colour`"),
            (
                client("web", "secret_file = \"/nonexistent/secret\""),
                "clients.web.secret_file: cannot read /nonexistent/secret",
            ),
            (client("web", "timeout = \"5\""), "clients.web.timeout"),
            (
                client("web", "timeout = \"0s\""),
                "clients.web.timeout: must be longer than zero",
            ),
            (
                client("web", "endpoint_url = \"localhost:1\""),
                "clients.web.endpoint_url",
            ),
            (
                client("\"Web!\"", "").replace("abc\"Web!\"", "abcweb"),
                "clients.Web!: an alias",
            ),
            (
                client("web", "").replace("eu-west-1\"\n", "europe\"\n"),
                "clients.web.region",
            ),
            (
                client("web", "").replace("eu-west-1_A", "eu-west-2_A"),
                "clients.web.user_pool_id: the pool is in eu-west-2",
            ),
            (
                client("web", "").replace("eu-west-1_A", "pool"),
                "clients.web.user_pool_id",
            ),
            (
                client("web", "").replace("abcweb", "not valid"),
                "clients.web.client_id",
            ),
            (
                "default = \"a\"\n".to_owned()
                    + &client("a", "")
                    + &client("b", "").replace("abcb", "abca"),
                "clients.b.client_id: the same app client as clients.a",
            ),
            (client("web", "") + &client("web", ""), "duplicate key"),
            ("[clients.web\n".to_owned(), "line 1"),
        ];
        for (text, expected) in cases {
            let problem = parse(&text, &fallbacks()).unwrap_err();
            assert!(!problem.contains('\n'), "{problem}");
            assert!(
                problem.contains(expected),
                "{expected:?} not in {problem:?}\n{text}"
            );
        }
    }
}
