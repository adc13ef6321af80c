//! TLS and mTLS on the gRPC listener, with certificates that rotate without a restart.
//!
//! The files are polled ([`crate::reload`]) and, when they change, a new rustls
//! `ServerConfig` (certificate and client verifier) replaces the old one. Each new handshake
//! uses the newest config; connections already open keep theirs. The crypto provider is
//! aws-lc-rs, the one the AWS SDK already uses, passed explicitly so no process-wide default
//! is needed.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use tokio_rustls::TlsAcceptor;

use crate::metrics as m;
use crate::reload::Watched;
use crate::settings::SettingError;

/// Where the certificate, key and (for mTLS) client CA come from.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// PEM certificate chain, leaf first (`TLS_CERT_FILE`).
    pub cert_file: PathBuf,
    /// PEM private key (`TLS_KEY_FILE`).
    pub key_file: PathBuf,
    /// PEM CA bundle; when set, clients must present a certificate it signed
    /// (`TLS_CLIENT_CA_FILE`).
    pub client_ca_file: Option<PathBuf>,
}

/// A TLS file that cannot be read or does not load, at start-up or at a rotation. Displays
/// as one line naming the setting.
#[derive(Debug, thiserror::Error)]
#[error("{setting}: {problem}")]
pub(crate) struct TlsError {
    setting: &'static str,
    problem: String,
}

impl TlsError {
    fn new(setting: &'static str, problem: impl Into<String>) -> Self {
        Self {
            setting,
            problem: problem.into(),
        }
    }
}

impl From<TlsError> for SettingError {
    fn from(err: TlsError) -> Self {
        SettingError::new(err.setting, err.problem)
    }
}

/// The raw contents of the files, compared to notice a rotation.
#[derive(PartialEq, Eq)]
struct Material {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

fn read(path: &Path, setting: &'static str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path)
        .map_err(|e| TlsError::new(setting, format!("cannot read {}: {e}", path.display())))
}

impl Material {
    fn read(settings: &TlsSettings) -> Result<Self, TlsError> {
        Ok(Self {
            cert: read(&settings.cert_file, "TLS_CERT_FILE")?,
            key: read(&settings.key_file, "TLS_KEY_FILE")?,
            client_ca: settings
                .client_ca_file
                .as_deref()
                .map(|path| read(path, "TLS_CLIENT_CA_FILE"))
                .transpose()?,
        })
    }

    fn server_config(&self, http1: bool) -> Result<Arc<ServerConfig>, TlsError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let certs = CertificateDer::pem_slice_iter(&self.cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::new("TLS_CERT_FILE", format!("not PEM: {e}")))?;
        if certs.is_empty() {
            return Err(TlsError::new("TLS_CERT_FILE", "holds no certificate"));
        }
        let key = PrivateKeyDer::from_pem_slice(&self.key)
            .map_err(|e| TlsError::new("TLS_KEY_FILE", format!("no private key: {e}")))?;

        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::new("TLS_CERT_FILE", e.to_string()))?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(pem) => {
                let invalid = |e: String| TlsError::new("TLS_CLIENT_CA_FILE", e);
                let mut roots = RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(pem) {
                    let cert = cert.map_err(|e| invalid(format!("not PEM: {e}")))?;
                    roots.add(cert).map_err(|e| invalid(e.to_string()))?;
                }
                if roots.is_empty() {
                    return Err(invalid("holds no certificate".into()));
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .map_err(|e| invalid(e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_single_cert(certs, key).map_err(|e| {
            TlsError::new(
                "TLS_KEY_FILE",
                format!("does not match the certificate: {e}"),
            )
        })?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        if http1 {
            config.alpn_protocols.push(b"http/1.1".to_vec());
        }
        Ok(Arc::new(config))
    }
}

/// The current server config, replaced when the files change.
#[derive(Clone)]
pub(crate) struct ReloadingTls(Arc<Files>);

/// The files, what was last read of them, and the config in use.
struct Files {
    settings: TlsSettings,
    /// Offer HTTP/1.1 by ALPN next to `h2` (the Connect door serves it).
    http1: bool,
    current: RwLock<Arc<ServerConfig>>,
    last: Mutex<Option<Material>>,
}

impl ReloadingTls {
    /// Loads the files once, offering HTTP/1.1 by ALPN when `http1`; a missing or malformed
    /// file is a [`TlsError`] naming it.
    pub(crate) fn load(settings: TlsSettings, http1: bool) -> Result<Self, TlsError> {
        let material = Material::read(&settings)?;
        let config = material.server_config(http1)?;
        Ok(Self(Arc::new(Files {
            settings,
            http1,
            current: RwLock::new(config),
            last: Mutex::new(Some(material)),
        })))
    }

    /// An acceptor with the current config, for one new connection.
    pub(crate) fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.0.current.read().expect("TLS config lock").clone())
    }

    /// The files, to be watched for rotation.
    pub(crate) fn watched(&self) -> Arc<dyn Watched> {
        self.0.clone()
    }
}

impl Watched for Files {
    fn reload(&self) -> Result<bool, String> {
        let material = match Material::read(&self.settings) {
            Ok(material) => material,
            // Mid-rotation files can be briefly absent; the next poll sees them.
            Err(err) => {
                tracing::debug!(error = %err, "TLS files not readable yet");
                return Ok(false);
            }
        };
        let mut last = self.last.lock().expect("TLS files lock");
        if last.as_ref() == Some(&material) {
            return Ok(false);
        }
        let loaded = material.server_config(self.http1);
        *last = Some(material);
        let config = loaded.map_err(|err| err.to_string())?;
        *self.current.write().expect("TLS config lock") = config;
        Ok(true)
    }

    fn report(&self, outcome: Result<(), &str>) {
        match outcome {
            Ok(()) => {
                self.reloads("reloaded").increment(1);
                tracing::info!("TLS certificate reloaded");
            }
            Err(problem) => {
                self.reloads("failed").increment(1);
                tracing::error!(
                    error = problem,
                    "TLS files changed but do not load; keeping the previous certificate"
                );
            }
        }
    }

    fn reloads(&self, result: &'static str) -> metrics::Counter {
        metrics::counter!(m::TLS_RELOADS, "result" => result)
    }
}
