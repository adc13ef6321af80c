//! Configuration from the environment and command-line flags (README "Configuration"). Every
//! setting is an environment variable and the `--kebab-case` flag of the same name, except
//! secrets, which have no flag (it would show in `ps`). A bad setting is a [`ConfigError`]
//! naming it. Each subsystem's settings are built by a function of its own, with the parsers
//! of [`crate::settings`]; no subsystem imports this module.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::error::ErrorKind;
use clap::{CommandFactory, FromArgMatches, Parser};
use secrecy::{SecretSlice, SecretString};

use crate::callers::{CallersSettings, IdentityHeader};
use crate::cognito::clients::{self, ClientSettings, CognitoSettings, Fallbacks, SHORTHAND_ALIAS};
use crate::domain::ClientId;
use crate::fleet::{RedisMode, RedisSettings, RedisUrl};
use crate::limits::{LimitSettings, UsernameRateLimit};
use crate::places::PeerKey;
pub use crate::settings::parse_duration;
use crate::settings::{
    SettingError, check_endpoint_url, parse_positive_duration, read_secret_bytes, read_secret_file,
};
use crate::telemetry::{LogFormat, LogSettings};
use crate::tls::TlsSettings;

/// How often watched files are re-read when neither `FILE_RELOAD_INTERVAL` nor its older name
/// `TLS_RELOAD_INTERVAL` is set.
const DEFAULT_FILE_RELOAD_INTERVAL: Duration = Duration::from_secs(10);

/// The whole configuration of one process.
#[derive(Debug)]
pub struct Config {
    /// Where the gRPC server listens.
    pub grpc_listen_addr: SocketAddr,
    /// How to reach Cognito and as which app client.
    pub cognito: CognitoSettings,
    /// Mask unknown users (README "Errors": enumeration protection).
    pub enumeration_protection: bool,
    /// How long to keep serving, NOT_SERVING, after a stop signal.
    pub shutdown_delay: Duration,
    /// How long in-flight calls may take to finish once the listener closes.
    pub shutdown_grace_period: Duration,
    /// Logging.
    pub log: LogSettings,
    /// TLS on the gRPC listener, when configured.
    pub tls: Option<TlsSettings>,
    /// How often the TLS files and the app client secret files are re-read.
    pub file_reload_interval: Duration,
    /// Where health is also served in plaintext when TLS is on (for kubelet probes).
    pub health_listen_addr: SocketAddr,
    /// Where `/metrics` is served.
    pub metrics_listen_addr: SocketAddr,
    /// OTLP endpoint for trace export (with the `otel` feature).
    pub otlp_endpoint: Option<String>,
    /// Rate limits and load shedding.
    pub limits: LimitSettings,
    /// The largest request message accepted, in bytes.
    pub max_request_bytes: usize,
    /// HTTP/2 keepalive ping interval.
    pub keepalive_interval: Duration,
    /// Close connections with no call for this long.
    pub idle_timeout: Duration,
    /// The key for username hashes in logs and audit events; random per process when `None`.
    pub username_hash_key: Option<SecretSlice<u8>>,
    /// Calls in progress at once (message read, validated, waiting); one more is refused.
    pub max_concurrent_calls: NonZeroUsize,
    /// Connections open at once on the gRPC port; one more is closed at once.
    pub max_connections: NonZeroUsize,
    /// Streams one HTTP/2 connection may open at once (advertised).
    pub max_concurrent_streams: u32,
    /// Serve the RPCs by the Connect protocol (JSON over HTTP) on the gRPC port too.
    pub connect_protocol: bool,
    /// How long a request's headers may take to arrive.
    pub request_header_timeout: Duration,
    /// How long a request's message may take to arrive after its headers.
    pub request_body_timeout: Duration,
    /// Connections one peer may hold at once.
    pub max_connections_per_peer: NonZeroUsize,
    /// Calls in progress one peer may hold at once.
    pub max_concurrent_calls_per_peer: NonZeroUsize,
    /// What a peer is, for the per-peer shares.
    pub peer_key: PeerKey,
    /// Who may call (`CALLERS_FILE`); `None`: every caller may do everything.
    pub callers: Option<CallersSettings>,
    /// Where a caller without a client certificate is named (`CALLER_IDENTITY_HEADER`).
    pub identity_header: Option<IdentityHeader>,
    /// How long an idempotent call's outcome is remembered (`IDEMPOTENCY_WINDOW`).
    pub idempotency_window: Duration,
    /// At most this many outcomes remembered (`IDEMPOTENCY_MAX_KEYS`).
    pub idempotency_max_keys: NonZeroUsize,
    /// How often each app client is proven (`CLIENT_CHECK_INTERVAL`).
    pub client_check_interval: Duration,
}

/// A setting that is missing or malformed. Displays as one line naming the setting.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The command line or an environment variable did not parse.
    #[error("{0}")]
    Invalid(String),
    /// A setting is missing or has an unusable value.
    #[error(transparent)]
    Setting(#[from] SettingError),
}

impl ConfigError {
    /// A problem with the setting named `setting`.
    pub fn setting(setting: &'static str, problem: impl Into<String>) -> Self {
        Self::Setting(SettingError::new(setting, problem))
    }
}

/// The outcome of reading the command line: a configuration, or text to print and exit 0
/// (`--help`, `--version`).
#[derive(Debug)]
pub enum Command {
    /// Run the service.
    Run(Box<Config>),
    /// Prove every app client once, print a line for each, and exit (`check`).
    Check(Box<Config>),
    /// Print this and exit successfully.
    Print(String),
}

#[derive(Debug, Parser)]
#[command(
    name = "password-recovery",
    version,
    about,
    override_usage = "password-recovery [check] [OPTIONS]",
    after_help = "`password-recovery check` proves every app client once with the same settings, \
                  prints a line for each, and exits 0 when all work, else 2."
)]
struct Cli {
    /// gRPC listen address.
    #[arg(long, env = "GRPC_LISTEN_ADDR", default_value = "0.0.0.0:50051")]
    grpc_listen_addr: SocketAddr,

    /// The app client id this server serves (required unless COGNITO_CLIENTS_FILE is set).
    #[arg(long, env = "COGNITO_CLIENT_ID")]
    cognito_client_id: Option<String>,

    /// A TOML file naming every app client served (instead of COGNITO_CLIENT_ID and its
    /// secret): see the README's "Several app clients".
    #[arg(long, env = "COGNITO_CLIENTS_FILE")]
    cognito_clients_file: Option<PathBuf>,

    /// File holding the app client's secret (one trailing newline is dropped). The secret
    /// itself can only come from COGNITO_CLIENT_SECRET, never from a flag.
    #[arg(long, env = "COGNITO_CLIENT_SECRET_FILE")]
    cognito_client_secret_file: Option<PathBuf>,

    /// Mask unknown users in answers (true or false).
    #[arg(long, env = "ENUMERATION_PROTECTION", default_value = "true", value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    enumeration_protection: bool,

    /// Also serve the RPCs as JSON over HTTP/1.1 and HTTP/2 (the Connect protocol) on the
    /// gRPC port (true or false).
    #[arg(long, env = "CONNECT_PROTOCOL", default_value = "true", value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    connect_protocol: bool,

    /// How long to keep serving NOT_SERVING after SIGTERM, e.g. 5s.
    #[arg(long, env = "SHUTDOWN_DELAY", default_value = "0s", value_parser = parse_duration)]
    shutdown_delay: Duration,

    /// How long in-flight calls may take to finish at shutdown.
    #[arg(long, env = "SHUTDOWN_GRACE_PERIOD", default_value = "20s", value_parser = parse_duration)]
    shutdown_grace_period: Duration,

    /// Bound on one upstream call to Cognito, retries included.
    #[arg(long, env = "COGNITO_TIMEOUT", default_value = "5s", value_parser = parse_positive_duration)]
    cognito_timeout: Duration,

    /// AWS region of the user pool (else the AWS profile's region).
    #[arg(long, env = "AWS_REGION")]
    aws_region: Option<String>,

    /// Endpoint override for Cognito, e.g. a local emulator.
    #[arg(long, env = "AWS_ENDPOINT_URL")]
    aws_endpoint_url: Option<String>,

    /// Log filter directives.
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    rust_log: String,

    /// Log line format.
    #[arg(long, env = "LOG_FORMAT", default_value = "json", value_enum)]
    log_format: LogFormat,

    /// PEM certificate chain for TLS on the gRPC port (with TLS_KEY_FILE).
    #[arg(long, env = "TLS_CERT_FILE")]
    tls_cert_file: Option<PathBuf>,

    /// PEM private key for TLS (with TLS_CERT_FILE).
    #[arg(long, env = "TLS_KEY_FILE")]
    tls_key_file: Option<PathBuf>,

    /// PEM CA bundle: when set, clients must present a certificate it signed (mTLS).
    #[arg(long, env = "TLS_CLIENT_CA_FILE")]
    tls_client_ca_file: Option<PathBuf>,

    /// How often the TLS files and the app client secret files are read for rotation
    /// (default 10s).
    #[arg(long, env = "FILE_RELOAD_INTERVAL", value_parser = parse_positive_duration)]
    file_reload_interval: Option<Duration>,

    /// The older name of FILE_RELOAD_INTERVAL, used when that is not set.
    #[arg(long, env = "TLS_RELOAD_INTERVAL", value_parser = parse_positive_duration)]
    tls_reload_interval: Option<Duration>,

    /// Plaintext health listener, used when TLS is on (kubelet probes speak plaintext).
    #[arg(long, env = "HEALTH_LISTEN_ADDR", default_value = "0.0.0.0:8081")]
    health_listen_addr: SocketAddr,

    /// Prometheus `/metrics` listener.
    #[arg(long, env = "METRICS_LISTEN_ADDR", default_value = "0.0.0.0:9090")]
    metrics_listen_addr: SocketAddr,

    /// OTLP/gRPC endpoint for traces (builds with the `otel` feature only).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otel_exporter_otlp_endpoint: Option<String>,

    /// Per-username limit, both RPCs together: N/DURATION (burst N, one more every
    /// DURATION/N) or off.
    #[arg(long, env = "USERNAME_RATE_LIMIT", default_value = "5/6h", value_parser = str::parse::<UsernameRateLimit>)]
    username_rate_limit: UsernameRateLimit,

    /// At most this many per-username buckets; a bucket leaves only when it is full again, and
    /// a new username is refused while every bucket is live.
    #[arg(long, env = "USERNAME_RATE_LIMIT_MAX_KEYS", default_value = "1000000")]
    username_rate_limit_max_keys: NonZeroUsize,

    /// Calls per second this replica lets through to Cognito (0: off).
    #[arg(long, env = "GLOBAL_RATE_LIMIT_RPS", default_value = "0")]
    global_rate_limit_rps: u32,

    /// Calls that may wait on Cognito at once; one more is refused (OVERLOADED).
    #[arg(long, env = "MAX_CONCURRENT_UPSTREAM", default_value = "64")]
    max_concurrent_upstream: NonZeroUsize,

    /// The largest request message accepted, in bytes.
    #[arg(long, env = "MAX_REQUEST_BYTES", default_value = "65536")]
    max_request_bytes: NonZeroUsize,

    /// Calls in progress at once; one more is refused at once (OVERLOADED), unread.
    #[arg(long, env = "MAX_CONCURRENT_CALLS", default_value = "128")]
    max_concurrent_calls: NonZeroUsize,

    /// Connections open at once on the gRPC port; one more is closed at once.
    #[arg(long, env = "MAX_CONNECTIONS", default_value = "256")]
    max_connections: NonZeroUsize,

    /// Connections one peer (see PEER_KEY) may hold at once; at most MAX_CONNECTIONS.
    #[arg(long, env = "MAX_CONNECTIONS_PER_PEER", default_value = "64")]
    max_connections_per_peer: NonZeroUsize,

    /// Calls in progress one peer (see PEER_KEY) may hold at once; at most
    /// MAX_CONCURRENT_CALLS.
    #[arg(long, env = "MAX_CONCURRENT_CALLS_PER_PEER", default_value = "32")]
    max_concurrent_calls_per_peer: NonZeroUsize,

    /// What a peer is for the per-peer shares: its source address, or none (behind a proxy
    /// or sidecar, where every connection comes from one address).
    #[arg(long, env = "PEER_KEY", default_value = "address", value_enum)]
    peer_key: PeerKey,

    /// How long a request's headers may take to arrive (from the connection's start, or the
    /// first byte of a later HTTP/1.1 request); past it the connection is closed.
    #[arg(long, env = "REQUEST_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_positive_duration)]
    request_header_timeout: Duration,

    /// How long a request's message may take to arrive after its headers; past it the call
    /// is answered DEADLINE_EXCEEDED (REQUEST_TIMEOUT).
    #[arg(long, env = "REQUEST_BODY_TIMEOUT", default_value = "10s", value_parser = parse_positive_duration)]
    request_body_timeout: Duration,

    /// HTTP/2 streams one connection may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS).
    #[arg(long, env = "GRPC_MAX_CONCURRENT_STREAMS", default_value = "32", value_parser = clap::value_parser!(u32).range(1..))]
    grpc_max_concurrent_streams: u32,

    /// Redis for limits shared by every replica: redis://host:port/db or rediss:// (no
    /// password in it). Unset: each replica's own limits.
    #[arg(long, env = "RATE_LIMIT_REDIS_URL")]
    rate_limit_redis_url: Option<String>,

    /// standalone: RATE_LIMIT_REDIS_URL is one server (or a primary); cluster: it is one seed
    /// or configuration endpoint of a Redis Cluster, whose other nodes are discovered.
    #[arg(
        long,
        env = "RATE_LIMIT_REDIS_MODE",
        default_value = "standalone",
        value_enum
    )]
    rate_limit_redis_mode: RedisMode,

    /// File holding the Redis password (one trailing newline is dropped).
    #[arg(long, env = "RATE_LIMIT_REDIS_PASSWORD_FILE")]
    rate_limit_redis_password_file: Option<PathBuf>,

    /// Prefix of every Redis key.
    #[arg(
        long,
        env = "RATE_LIMIT_REDIS_PREFIX",
        default_value = "password-recovery:"
    )]
    rate_limit_redis_prefix: String,

    /// How long a Redis round trip may take before the replica's own limits judge the call.
    #[arg(long, env = "RATE_LIMIT_REDIS_TIMEOUT", default_value = "50ms", value_parser = parse_positive_duration)]
    rate_limit_redis_timeout: Duration,

    /// HTTP/2 keepalive ping interval.
    #[arg(long, env = "GRPC_KEEPALIVE_INTERVAL", default_value = "30s", value_parser = parse_positive_duration)]
    grpc_keepalive_interval: Duration,

    /// Close a connection with no call for this long.
    #[arg(long, env = "GRPC_IDLE_TIMEOUT", default_value = "5m", value_parser = parse_positive_duration)]
    grpc_idle_timeout: Duration,

    /// How often each app client is proven with a ForgotPassword for a username nobody has
    /// (also at start-up and after each change of its secret).
    #[arg(long, env = "CLIENT_CHECK_INTERVAL", default_value = "5m", value_parser = parse_positive_duration)]
    client_check_interval: Duration,

    /// How long the outcome of a call with a request_id is remembered, to answer its retries.
    #[arg(long, env = "IDEMPOTENCY_WINDOW", default_value = "1h", value_parser = parse_positive_duration)]
    idempotency_window: Duration,

    /// At most this many outcomes of calls with a request_id remembered (about 2 KiB each);
    /// while all are in their window, new calls run unremembered.
    #[arg(long, env = "IDEMPOTENCY_MAX_KEYS", default_value = "10000")]
    idempotency_max_keys: NonZeroUsize,

    /// A TOML file naming each caller (by its client certificate's URI SAN, else its CN, or
    /// `anonymous`) and the app clients and RPCs it may use: see the README's "Callers".
    /// Unset: every caller may do everything.
    #[arg(long, env = "CALLERS_FILE")]
    callers_file: Option<PathBuf>,

    /// Behind a mesh whose sidecar terminates mTLS: name a caller without a client certificate
    /// by the sidecar's header. Only safe when nothing but the sidecar reaches the port.
    #[arg(long, env = "CALLER_IDENTITY_HEADER", value_enum)]
    caller_identity_header: Option<IdentityHeader>,

    /// Confirms CALLER_IDENTITY_HEADER with a GRPC_LISTEN_ADDR that is not loopback (true or
    /// false).
    #[arg(long, env = "CALLER_IDENTITY_HEADER_ANY_ADDRESS", default_value = "false", value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    caller_identity_header_any_address: bool,

    /// File holding the key of username hashes in logs and audit events (at least 16 bytes;
    /// one trailing newline is dropped). Unset: a random key per process.
    #[arg(long, env = "USERNAME_HASH_KEY_FILE")]
    username_hash_key_file: Option<PathBuf>,
}

/// Every environment variable the service reads: each setting, and the secret that has no flag.
pub fn environment_variables() -> Vec<String> {
    let mut names: Vec<String> = Cli::command()
        .get_arguments()
        .filter_map(|arg| arg.get_env())
        .map(|env| env.to_string_lossy().into_owned())
        .collect();
    names.push("COGNITO_CLIENT_SECRET".to_owned());
    names
}

/// The default value of the setting read from environment variable `name`, if it has one.
pub fn default_value(name: &str) -> Option<String> {
    Cli::command()
        .get_arguments()
        .find(|arg| arg.get_env().is_some_and(|env| env == name))
        .and_then(|arg| arg.get_default_values().first())
        .map(|value| value.to_string_lossy().into_owned())
}

impl Config {
    /// Reads the process's command line and environment.
    pub fn load() -> Result<Command, ConfigError> {
        Self::load_from(std::env::args_os(), |name| std::env::var_os(name))
    }

    /// Reads the command line `args` (program name first) and the environment `env`, a
    /// variable's value by name. A flag wins over its variable. Nothing else is read from the
    /// process environment, so tests inject theirs.
    pub fn load_from<I, T>(
        args: I,
        env: impl Fn(&str) -> Option<OsString>,
    ) -> Result<Command, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString>,
    {
        // `check` first: prove every app client once and exit (README "Proving the app
        // clients"); the settings are read as for a run.
        let mut args: Vec<OsString> = args.into_iter().map(Into::into).collect();
        let check = args.get(1).is_some_and(|arg| arg == "check");
        if check {
            args.remove(1);
        }
        let cli = match parse_cli(args, &env) {
            Ok(cli) => cli,
            // Help as the operator needs it: each flag with its variable.
            Err(err) if err.kind() == ErrorKind::DisplayHelp => {
                return Ok(Command::Print(Cli::command().render_help().to_string()));
            }
            Err(err) if !err.use_stderr() => return Ok(Command::Print(err.to_string())),
            Err(err) => return Err(ConfigError::Invalid(one_line(&err))),
        };
        let secret_env = |name: &str| env(name).and_then(|value| value.into_string().ok());
        let cognito = cognito_settings(&cli, secret_env("COGNITO_CLIENT_SECRET"))?;
        let callers = callers_settings(cli.callers_file.as_deref(), &cognito)?;
        let identity_header = identity_header(&cli)?;
        let username_hash_key = username_hash_key(cli.username_hash_key_file.as_deref())?;
        let limits = limit_settings(&cli, username_hash_key.as_ref())?;
        let config = Box::new(Config {
            grpc_listen_addr: cli.grpc_listen_addr,
            cognito,
            enumeration_protection: cli.enumeration_protection,
            shutdown_delay: cli.shutdown_delay,
            shutdown_grace_period: cli.shutdown_grace_period,
            log: LogSettings {
                filter: cli.rust_log,
                format: cli.log_format,
            },
            tls: tls_settings(cli.tls_cert_file, cli.tls_key_file, cli.tls_client_ca_file)?,
            file_reload_interval: cli
                .file_reload_interval
                .or(cli.tls_reload_interval)
                .unwrap_or(DEFAULT_FILE_RELOAD_INTERVAL),
            health_listen_addr: cli.health_listen_addr,
            metrics_listen_addr: cli.metrics_listen_addr,
            otlp_endpoint: cli.otel_exporter_otlp_endpoint.filter(|e| !e.is_empty()),
            limits,
            max_request_bytes: cli.max_request_bytes.get(),
            keepalive_interval: cli.grpc_keepalive_interval,
            idle_timeout: cli.grpc_idle_timeout,
            username_hash_key,
            max_concurrent_calls: cli.max_concurrent_calls,
            max_connections: cli.max_connections,
            max_concurrent_streams: cli.grpc_max_concurrent_streams,
            connect_protocol: cli.connect_protocol,
            request_header_timeout: cli.request_header_timeout,
            request_body_timeout: cli.request_body_timeout,
            max_connections_per_peer: cli.max_connections_per_peer,
            max_concurrent_calls_per_peer: cli.max_concurrent_calls_per_peer,
            peer_key: cli.peer_key,
            callers,
            identity_header,
            idempotency_window: cli.idempotency_window,
            idempotency_max_keys: cli.idempotency_max_keys,
            client_check_interval: cli.client_check_interval,
        });
        Ok(match check {
            true => Command::Check(config),
            false => Command::Run(config),
        })
    }
}

/// The app clients: from `COGNITO_CLIENTS_FILE`, or the one-client settings
/// (`COGNITO_CLIENT_ID` and its secret, `secret_from_env` or a file); not both.
fn cognito_settings(
    cli: &Cli,
    secret_from_env: Option<String>,
) -> Result<CognitoSettings, ConfigError> {
    let endpoint_url = cli.aws_endpoint_url.clone().filter(|u| !u.is_empty());
    if let Some(url) = &endpoint_url {
        check_endpoint_url(url).map_err(|p| ConfigError::setting("AWS_ENDPOINT_URL", p))?;
    }
    let secret_from_env = secret_from_env.filter(|s| !s.is_empty());
    let client_id = cli.cognito_client_id.clone().filter(|id| !id.is_empty());
    let clients_file = cli
        .cognito_clients_file
        .as_deref()
        .filter(|p| !p.as_os_str().is_empty());
    let Some(path) = clients_file else {
        let client = one_client(cli, client_id, secret_from_env, endpoint_url)?;
        return Ok(CognitoSettings {
            clients: vec![client],
            default: 0,
        });
    };
    if client_id.is_some() || secret_from_env.is_some() || cli.cognito_client_secret_file.is_some()
    {
        return Err(ConfigError::setting(
            "COGNITO_CLIENTS_FILE",
            "set either COGNITO_CLIENTS_FILE or COGNITO_CLIENT_ID (with \
             COGNITO_CLIENT_SECRET[_FILE]), not both",
        ));
    }
    let fallbacks = Fallbacks {
        timeout: cli.cognito_timeout,
        endpoint_url,
    };
    let (clients, default) = clients::load_file(path, &fallbacks)?;
    Ok(CognitoSettings { clients, default })
}

/// The callers policy of `file`, checked against the app clients of `cognito`.
fn callers_settings(
    file: Option<&Path>,
    cognito: &CognitoSettings,
) -> Result<Option<CallersSettings>, ConfigError> {
    let Some(file) = file.filter(|p| !p.as_os_str().is_empty()) else {
        return Ok(None);
    };
    let aliases: Vec<&str> = cognito.clients.iter().map(|c| c.alias.as_str()).collect();
    Ok(Some(CallersSettings::load(file, &aliases)?))
}

/// `CALLER_IDENTITY_HEADER`, refused with a listen address others than the sidecar could reach
/// unless `CALLER_IDENTITY_HEADER_ANY_ADDRESS` confirms it.
fn identity_header(cli: &Cli) -> Result<Option<IdentityHeader>, ConfigError> {
    let Some(header) = cli.caller_identity_header else {
        return Ok(None);
    };
    let addr = cli.grpc_listen_addr;
    if !addr.ip().is_loopback() && !cli.caller_identity_header_any_address {
        return Err(ConfigError::setting(
            "CALLER_IDENTITY_HEADER",
            format!(
                "a header names callers only safely when nothing but the mesh's sidecar reaches \
                 the port, and GRPC_LISTEN_ADDR {addr} is not a loopback address: listen on \
                 127.0.0.1 behind the sidecar, or confirm with \
                 CALLER_IDENTITY_HEADER_ANY_ADDRESS=true"
            ),
        ));
    }
    Ok(Some(header))
}

/// The one client of the one-client settings, under the alias `default`, with no pool.
fn one_client(
    cli: &Cli,
    client_id: Option<String>,
    secret_from_env: Option<String>,
    endpoint_url: Option<String>,
) -> Result<ClientSettings, ConfigError> {
    let client_id = client_id.ok_or_else(|| {
        ConfigError::setting(
            "COGNITO_CLIENT_ID",
            "required: the app client id of the user pool (or --cognito-client-id, or \
             COGNITO_CLIENTS_FILE for several clients)",
        )
    })?;
    let client_id = ClientId::parse("COGNITO_CLIENT_ID", client_id)
        .map_err(|v| ConfigError::setting("COGNITO_CLIENT_ID", v.description))?;
    let secret_file = cli.cognito_client_secret_file.clone();
    Ok(ClientSettings {
        alias: SHORTHAND_ALIAS.to_owned(),
        client_id,
        user_pool_id: None,
        region: cli.aws_region.clone().filter(|r| !r.is_empty()),
        endpoint_url,
        timeout: cli.cognito_timeout,
        secret: client_secret(secret_from_env, secret_file.as_deref())?,
        secret_file,
    })
}

/// `USERNAME_HASH_KEY_FILE`'s key: at least 16 bytes.
fn username_hash_key(file: Option<&Path>) -> Result<Option<SecretSlice<u8>>, ConfigError> {
    const SETTING: &str = "USERNAME_HASH_KEY_FILE";
    let Some(path) = file else {
        return Ok(None);
    };
    let key = read_secret_bytes(path).map_err(|e| ConfigError::setting(SETTING, e.to_string()))?;
    if key.len() < 16 {
        return Err(ConfigError::setting(
            SETTING,
            "the key must be at least 16 bytes",
        ));
    }
    Ok(Some(SecretSlice::from(key)))
}

/// The abuse limits, fleet-wide on Redis when `RATE_LIMIT_REDIS_URL` is set (which needs the
/// username hash key, so replicas agree on the keys).
fn limit_settings(
    cli: &Cli,
    username_hash_key: Option<&SecretSlice<u8>>,
) -> Result<LimitSettings, ConfigError> {
    let redis = match cli
        .rate_limit_redis_url
        .as_deref()
        .filter(|u| !u.is_empty())
    {
        None => None,
        Some(url) => Some(redis_settings(cli, url, username_hash_key)?),
    };
    Ok(LimitSettings {
        username: cli.username_rate_limit,
        username_max_keys: cli.username_rate_limit_max_keys,
        global_rps: NonZeroU32::new(cli.global_rate_limit_rps),
        max_concurrent_upstream: cli.max_concurrent_upstream,
        redis,
    })
}

fn redis_settings(
    cli: &Cli,
    url: &str,
    username_hash_key: Option<&SecretSlice<u8>>,
) -> Result<RedisSettings, ConfigError> {
    let url = RedisUrl::parse(url, cli.rate_limit_redis_mode)
        .map_err(|p| ConfigError::setting("RATE_LIMIT_REDIS_URL", p))?;
    let username_hash_key = username_hash_key.cloned().ok_or_else(|| {
        ConfigError::setting(
            "USERNAME_HASH_KEY_FILE",
            "required with RATE_LIMIT_REDIS_URL: replicas must agree on the keys of the shared \
             limits",
        )
    })?;
    let password = cli
        .rate_limit_redis_password_file
        .as_deref()
        .map(read_secret_file)
        .transpose()
        .map_err(|e| ConfigError::setting("RATE_LIMIT_REDIS_PASSWORD_FILE", e.to_string()))?
        .map(SecretString::from);
    let prefix = &cli.rate_limit_redis_prefix;
    if cli.rate_limit_redis_mode == RedisMode::Cluster
        && (prefix.is_empty() || prefix.contains(['{', '}']))
    {
        return Err(ConfigError::setting(
            "RATE_LIMIT_REDIS_PREFIX",
            "must be non-empty and hold no { or } with RATE_LIMIT_REDIS_MODE=cluster: it is \
             every key's hash tag",
        ));
    }
    Ok(RedisSettings {
        url,
        mode: cli.rate_limit_redis_mode,
        password,
        prefix: cli.rate_limit_redis_prefix.clone(),
        timeout: cli.rate_limit_redis_timeout,
        username_hash_key,
    })
}

/// Parses `args` with, for every setting `env` holds and the command line does not, its
/// `--flag=value` added: a flag wins over its variable, as with clap's own environment
/// reading, which is turned off so that nothing else is read.
fn parse_cli(
    args: impl IntoIterator<Item = impl Into<OsString>>,
    env: &impl Fn(&str) -> Option<OsString>,
) -> Result<Cli, clap::Error> {
    let command = Cli::command();
    let mut argv: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let given = |long: &str| {
        argv.iter().skip(1).any(|arg| {
            arg.to_str()
                .and_then(|arg| arg.strip_prefix("--"))
                .is_some_and(|arg| {
                    arg == long || arg.strip_prefix(long).is_some_and(|v| v.starts_with('='))
                })
        })
    };
    let mut from_env = Vec::new();
    for arg in command.get_arguments() {
        let (Some(name), Some(long)) = (arg.get_env(), arg.get_long()) else {
            continue;
        };
        if let Some(value) = name.to_str().and_then(env).filter(|_| !given(long)) {
            let mut flag = OsString::from(format!("--{long}="));
            flag.push(value);
            from_env.push(flag);
        }
    }
    argv.extend(from_env);
    let matches = command
        .mut_args(|arg| arg.env(None))
        .try_get_matches_from(argv)?;
    Cli::from_arg_matches(&matches)
}

/// Clap's message, which names the flag and its variable, folded onto one line.
fn one_line(err: &clap::Error) -> String {
    err.to_string()
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with("For more information"))
        .map(|line| line.strip_prefix("error: ").unwrap_or(line))
        .collect::<Vec<_>>()
        .join(" ")
}

fn client_secret(
    from_env: Option<String>,
    file: Option<&Path>,
) -> Result<Option<SecretString>, ConfigError> {
    let secret = match (from_env, file) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::setting(
                "COGNITO_CLIENT_SECRET",
                "set either COGNITO_CLIENT_SECRET or COGNITO_CLIENT_SECRET_FILE, not both",
            ));
        }
        (Some(secret), None) => secret,
        (None, Some(path)) => read_secret_file(path)
            .map_err(|e| ConfigError::setting("COGNITO_CLIENT_SECRET_FILE", e.to_string()))?,
        (None, None) => return Ok(None),
    };
    Ok(Some(SecretString::from(secret)))
}

/// TLS on the gRPC port: a certificate and its key, and a client CA for mTLS.
fn tls_settings(
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    client_ca_file: Option<PathBuf>,
) -> Result<Option<TlsSettings>, ConfigError> {
    match (cert_file, key_file) {
        (Some(cert_file), Some(key_file)) => Ok(Some(TlsSettings {
            cert_file,
            key_file,
            client_ca_file,
        })),
        (Some(_), None) => Err(ConfigError::setting(
            "TLS_KEY_FILE",
            "required when TLS_CERT_FILE is set",
        )),
        (None, Some(_)) => Err(ConfigError::setting(
            "TLS_CERT_FILE",
            "required when TLS_KEY_FILE is set",
        )),
        (None, None) if client_ca_file.is_some() => Err(ConfigError::setting(
            "TLS_CLIENT_CA_FILE",
            "mTLS needs TLS_CERT_FILE and TLS_KEY_FILE too",
        )),
        (None, None) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::*;

    /// The configuration from `args` and the environment `env`, and nothing else.
    fn run(args: &[&str], env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let args = std::iter::once("password-recovery").chain(args.iter().copied());
        let env = |name: &str| {
            env.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, value)| OsString::from(value))
        };
        match Config::load_from(args, env)? {
            Command::Run(config) => Ok(*config),
            Command::Check(_) => panic!("unexpected check"),
            Command::Print(text) => panic!("unexpected print: {text}"),
        }
    }

    #[test]
    fn check_comes_first_and_reads_the_same_settings() {
        let env = |name: &str| (name == "COGNITO_CLIENT_ID").then(|| OsString::from("abc"));
        let load = |args: &[&str]| {
            let args = std::iter::once("password-recovery").chain(args.iter().copied());
            Config::load_from(args, env)
        };
        let Ok(Command::Check(config)) = load(&["check", "--aws-region", "eu-west-1"]) else {
            panic!("check with its settings");
        };
        assert_eq!(config.cognito.default_client().client_id.as_str(), "abc");
        assert!(matches!(load(&["check", "--help"]), Ok(Command::Print(_))));
        // Only first: anywhere else it is an unexpected argument, as any other word is.
        let Err(ConfigError::Invalid(problem)) = load(&["--aws-region", "eu-west-1", "check"])
        else {
            panic!("check after a flag");
        };
        assert!(problem.contains("check"), "{problem}");
        assert!(matches!(
            load(&["--aws-region", "eu-west-1"]),
            Ok(Command::Run(_))
        ));
    }

    #[test]
    fn settings_and_defaults_are_listed_for_the_manifests() {
        let names = environment_variables();
        for name in [
            "GRPC_LISTEN_ADDR",
            "COGNITO_CLIENT_SECRET",
            "USERNAME_HASH_KEY_FILE",
        ] {
            assert!(names.iter().any(|n| n == name), "{name}");
        }
        assert_eq!(
            default_value("GRPC_LISTEN_ADDR").as_deref(),
            Some("0.0.0.0:50051")
        );
        assert_eq!(default_value("COGNITO_CLIENT_ID"), None);
    }

    #[test]
    fn defaults_follow_the_contract() {
        let config = run(
            &["--cognito-client-id", "abc", "--aws-region", "eu-west-1"],
            &[],
        )
        .expect("valid");
        assert_eq!(config.grpc_listen_addr, "0.0.0.0:50051".parse().unwrap());
        assert!(config.enumeration_protection);
        assert_eq!(config.shutdown_delay, Duration::ZERO);
        assert_eq!(config.shutdown_grace_period, Duration::from_secs(20));
        assert_eq!(
            config.cognito.default_client().timeout,
            Duration::from_secs(5)
        );
        assert_eq!(config.log.format, LogFormat::Json);
        assert!(config.cognito.default_client().secret.is_none());
        assert!(config.tls.is_none());
        assert_eq!(config.health_listen_addr, "0.0.0.0:8081".parse().unwrap());
        assert_eq!(config.metrics_listen_addr, "0.0.0.0:9090".parse().unwrap());
        assert_eq!(config.limits.username, "5/6h".parse().unwrap());
        assert_eq!(config.limits.username_max_keys.get(), 1_000_000);
        assert_eq!(config.limits.global_rps, None);
        assert_eq!(config.limits.max_concurrent_upstream.get(), 64);
        assert_eq!(config.max_request_bytes, 1 << 16);
        assert_eq!(config.max_concurrent_calls.get(), 128);
        assert_eq!(config.max_connections.get(), 256);
        assert_eq!(config.max_concurrent_streams, 32);
        assert_eq!(config.max_connections_per_peer.get(), 64);
        assert_eq!(config.max_concurrent_calls_per_peer.get(), 32);
        assert_eq!(config.peer_key, PeerKey::Address);
        assert_eq!(config.request_header_timeout, Duration::from_secs(10));
        assert_eq!(config.request_body_timeout, Duration::from_secs(10));
        assert_eq!(config.keepalive_interval, Duration::from_secs(30));
        assert_eq!(config.idle_timeout, Duration::from_secs(300));
        assert!(config.username_hash_key.is_none());
    }

    #[test]
    fn tls_needs_both_certificate_and_key() {
        let base = ["--cognito-client-id", "abc"];
        let with = |extra: &[&str]| {
            let args: Vec<&str> = base.iter().chain(extra).copied().collect();
            run(&args, &[])
        };
        let err = with(&["--tls-cert-file", "c.pem"]).unwrap_err();
        assert!(err.to_string().starts_with("TLS_KEY_FILE"), "{err}");
        let err = with(&["--tls-key-file", "k.pem"]).unwrap_err();
        assert!(err.to_string().starts_with("TLS_CERT_FILE"), "{err}");
        let err = with(&["--tls-client-ca-file", "ca.pem"]).unwrap_err();
        assert!(err.to_string().starts_with("TLS_CLIENT_CA_FILE"), "{err}");
        let tls = with(&["--tls-cert-file", "c.pem", "--tls-key-file", "k.pem"])
            .unwrap()
            .tls
            .expect("TLS on");
        assert_eq!(tls.client_ca_file, None);
    }

    #[test]
    fn a_bad_flag_value_is_one_line_naming_the_flag() {
        let err = run(
            &["--cognito-client-id", "abc", "--cognito-timeout", "5"],
            &[],
        )
        .unwrap_err();
        let line = err.to_string();
        assert!(!line.contains('\n'), "{line}");
        assert!(line.contains("--cognito-timeout"), "{line}");
        assert!(line.contains("COGNITO_TIMEOUT"), "{line}");
    }

    #[test]
    fn a_malformed_client_id_is_refused() {
        let err = run(&["--cognito-client-id", "not valid"], &[]).unwrap_err();
        assert!(err.to_string().starts_with("COGNITO_CLIENT_ID:"), "{err}");
    }

    #[test]
    fn secret_from_env_and_file_together_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("secret");
        std::fs::write(&file, "s3cret\n").unwrap();
        let file = file.to_str().unwrap();

        let err = run(
            &[
                "--cognito-client-id",
                "abc",
                "--cognito-client-secret-file",
                file,
            ],
            &[("COGNITO_CLIENT_SECRET", "other")],
        )
        .unwrap_err();
        assert!(err.to_string().contains("not both"), "{err}");
        assert!(!err.to_string().contains("s3cret") && !err.to_string().contains("other"));

        let config = run(
            &[
                "--cognito-client-id",
                "abc",
                "--cognito-client-secret-file",
                file,
            ],
            &[],
        )
        .unwrap();
        let secret = config
            .cognito
            .default_client()
            .secret
            .as_ref()
            .expect("secret read");
        assert_eq!(
            secret.expose_secret(),
            "s3cret",
            "one trailing newline dropped"
        );
        assert!(!format!("{:?}", config.cognito).contains("s3cret"));
    }

    #[test]
    fn settings_come_from_the_given_environment_and_a_flag_wins() {
        let env = [
            ("COGNITO_CLIENT_ID", "fromenv"),
            ("COGNITO_TIMEOUT", "2s"),
            ("ENUMERATION_PROTECTION", "off"),
            ("AWS_REGION", "eu-north-1"),
        ];
        let config = run(&["--cognito-timeout", "3s"], &env).unwrap();
        assert_eq!(
            config.cognito.default_client().client_id.as_str(),
            "fromenv"
        );
        assert_eq!(
            config.cognito.default_client().timeout,
            Duration::from_secs(3)
        );
        assert!(!config.enumeration_protection);
        assert_eq!(
            config.cognito.default_client().region.as_deref(),
            Some("eu-north-1")
        );

        // A malformed variable is not read when its flag is given, as with clap's own reading.
        let config = run(
            &["--cognito-timeout=4s"],
            &[("COGNITO_TIMEOUT", "4"), env[0]],
        )
        .unwrap();
        assert_eq!(
            config.cognito.default_client().timeout,
            Duration::from_secs(4)
        );

        // Only the given environment is read: `make test` itself sets AWS_REGION.
        let config = run(&["--cognito-client-id", "abc"], &[]).unwrap();
        assert_eq!(config.cognito.default_client().region, None);
        let err = run(&[], &[]).unwrap_err();
        assert!(err.to_string().starts_with("COGNITO_CLIENT_ID:"), "{err}");
    }

    #[test]
    fn the_file_reload_interval_keeps_its_older_name() {
        let base = ["--cognito-client-id", "abc"];
        let interval = |env: &[(&str, &str)]| run(&base, env).unwrap().file_reload_interval;
        assert_eq!(interval(&[]), Duration::from_secs(10));
        assert_eq!(
            interval(&[("TLS_RELOAD_INTERVAL", "3s")]),
            Duration::from_secs(3)
        );
        assert_eq!(
            interval(&[
                ("FILE_RELOAD_INTERVAL", "2s"),
                ("TLS_RELOAD_INTERVAL", "3s")
            ]),
            Duration::from_secs(2)
        );
        let err = run(&base, &[("FILE_RELOAD_INTERVAL", "0s")]).unwrap_err();
        assert!(err.to_string().contains("FILE_RELOAD_INTERVAL"), "{err}");
    }

    #[test]
    fn an_unusable_endpoint_or_redis_url_names_its_setting() {
        let base = ["--cognito-client-id", "abc"];
        let err = run(&base, &[("AWS_ENDPOINT_URL", "localhost:5000")]).unwrap_err();
        assert!(err.to_string().starts_with("AWS_ENDPOINT_URL:"), "{err}");
        let err = run(&base, &[("RATE_LIMIT_REDIS_URL", "redis://:pw@127.0.0.1")]).unwrap_err();
        assert!(
            err.to_string().starts_with("RATE_LIMIT_REDIS_URL:"),
            "{err}"
        );
        assert!(!err.to_string().contains("pw@"), "{err}");
        // A cluster has database 0 only; a mode that is not one is named too.
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key");
        std::fs::write(&key, "a-username-hash-key-of-some-length").unwrap();
        let keyed = [("USERNAME_HASH_KEY_FILE", key.to_str().unwrap())];
        let with = |extra: &[(&'static str, &'static str)]| {
            let mut env: Vec<(&str, &str)> = keyed.to_vec();
            env.extend_from_slice(extra);
            run(&base, &env)
        };
        let cluster = ("RATE_LIMIT_REDIS_MODE", "cluster");
        let err = with(&[
            cluster,
            ("RATE_LIMIT_REDIS_URL", "redis://127.0.0.1:7000/3"),
        ])
        .unwrap_err();
        assert!(
            err.to_string().starts_with("RATE_LIMIT_REDIS_URL:"),
            "{err}"
        );
        assert!(err.to_string().contains("database 0"), "{err}");
        let config = with(&[
            cluster,
            ("RATE_LIMIT_REDIS_URL", "rediss://cfg.example:6379"),
        ])
        .unwrap();
        let redis = config.limits.redis.expect("redis settings");
        assert_eq!(redis.mode, crate::fleet::RedisMode::Cluster);
        for prefix in ["", "a{b}:"] {
            let url = ("RATE_LIMIT_REDIS_URL", "redis://127.0.0.1:7000");
            let err = with(&[cluster, url, ("RATE_LIMIT_REDIS_PREFIX", prefix)]).unwrap_err();
            assert!(
                err.to_string().starts_with("RATE_LIMIT_REDIS_PREFIX:"),
                "{err}"
            );
        }
        let err = with(&[("RATE_LIMIT_REDIS_MODE", "sentinel")]).unwrap_err();
        assert!(err.to_string().contains("RATE_LIMIT_REDIS_MODE"), "{err}");
    }
}
