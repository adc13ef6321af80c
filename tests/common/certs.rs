//! Certificates generated per test with rcgen: a CA, server and client leaves, PEM files laid
//! out as Kubernetes mounts a Secret (`..data` symlink to a timestamped directory), and TLS
//! clients that trust the CA.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// A certificate authority.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A leaf certificate and its key, in PEM.
#[derive(Clone)]
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Leaf {
    /// The certificate in DER, to compare with what a peer presented.
    pub fn der(&self) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(self.cert_pem.as_bytes()).unwrap()
    }
}

impl Ca {
    /// A new self-signed CA named `name`.
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Self { issuer }
    }

    /// The CA certificate in PEM.
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate for `localhost` and 127.0.0.1, with common name `name`.
    pub fn server(&self, name: &str) -> Leaf {
        self.leaf(
            name,
            vec!["localhost".into(), "127.0.0.1".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A client certificate with common name `name`.
    pub fn client(&self, name: &str) -> Leaf {
        self.leaf(name, Vec::new(), ExtendedKeyUsagePurpose::ClientAuth)
    }

    /// A client certificate with common name `name` and the URI SAN `uri` (e.g. SPIFFE).
    pub fn client_with_uri(&self, name: &str, uri: &str) -> Leaf {
        self.leaf_with(
            name,
            Vec::new(),
            Some(uri),
            ExtendedKeyUsagePurpose::ClientAuth,
        )
    }

    fn leaf(&self, name: &str, sans: Vec<String>, usage: ExtendedKeyUsagePurpose) -> Leaf {
        self.leaf_with(name, sans, None, usage)
    }

    fn leaf_with(
        &self,
        name: &str,
        sans: Vec<String>,
        uri: Option<&str>,
        usage: ExtendedKeyUsagePurpose,
    ) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(sans).unwrap();
        if let Some(uri) = uri {
            params
                .subject_alt_names
                .push(SanType::URI(uri.try_into().unwrap()));
        }
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![usage];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

/// A directory laid out as Kubernetes mounts a Secret: `tls.crt`, `tls.key` and `ca.crt` are
/// symlinks into `..data`, itself a symlink to a timestamped directory; [`Self::rotate`] swaps
/// `..data` atomically, as the kubelet does.
pub struct SecretMount {
    pub dir: PathBuf,
    generation: u32,
    _removed_on_drop: tempfile::TempDir,
}

impl SecretMount {
    /// A fresh mount holding `server` and, if given, the client CA `client_ca`.
    pub fn new(server: &Leaf, client_ca: Option<&str>) -> Self {
        let temp = tempfile::tempdir().unwrap();
        let mut mount = Self {
            dir: temp.path().to_owned(),
            generation: 0,
            _removed_on_drop: temp,
        };
        mount.write_generation(server, client_ca);
        for name in ["tls.crt", "tls.key", "ca.crt"] {
            std::os::unix::fs::symlink(Path::new("..data").join(name), mount.dir.join(name))
                .unwrap();
        }
        mount
    }

    fn write_generation(&mut self, server: &Leaf, client_ca: Option<&str>) {
        self.generation += 1;
        let name = format!(
            "..2026_11_28_00_00_{:02}.{}",
            self.generation, self.generation
        );
        let data = self.dir.join(&name);
        std::fs::create_dir_all(&data).unwrap();
        std::fs::write(data.join("tls.crt"), &server.cert_pem).unwrap();
        std::fs::write(data.join("tls.key"), &server.key_pem).unwrap();
        std::fs::write(data.join("ca.crt"), client_ca.unwrap_or_default()).unwrap();
        let staging = self.dir.join("..data_tmp");
        let _ = std::fs::remove_file(&staging);
        std::os::unix::fs::symlink(&name, &staging).unwrap();
        std::fs::rename(&staging, self.dir.join("..data")).unwrap();
    }

    /// Swaps in a new generation of files, as a Secret update does.
    pub fn rotate(&mut self, server: &Leaf, client_ca: Option<&str>) {
        self.write_generation(server, client_ca);
    }

    pub fn cert(&self) -> PathBuf {
        self.dir.join("tls.crt")
    }

    pub fn key(&self) -> PathBuf {
        self.dir.join("tls.key")
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
}

/// Completes a TLS handshake with `addr` trusting `ca_pem`, presenting `client` if given, and
/// returns the certificate the server presented; `Err` when the handshake fails.
pub async fn handshake(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    client: Option<&Leaf>,
) -> Result<CertificateDer<'static>, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match client {
        Some(leaf) => builder
            .with_client_auth_cert(
                vec![leaf.der()],
                PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let mut tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), stream)
        .await
        .map_err(|e| e.to_string())?;
    // With TLS 1.3 a refused client certificate shows only on the first read.
    use tokio::io::AsyncWriteExt;
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut byte = [0u8; 1];
    use tokio::io::AsyncReadExt;
    match tls.read(&mut byte).await {
        Ok(0) => return Err("the server closed the connection".into()),
        Ok(_) => {}
        Err(e) => return Err(e.to_string()),
    }
    let (_, connection) = tls.get_ref();
    Ok(connection.peer_certificates().unwrap()[0]
        .clone()
        .into_owned())
}

/// A PasswordRecovery client over mTLS to `localhost:port`, trusting `ca` and presenting
/// `identity`.
pub async fn mtls_client(
    port: u16,
    ca: &Ca,
    identity: &Leaf,
) -> password_recovery::proto::v1::password_recovery_client::PasswordRecoveryClient<
    tonic::transport::Channel,
> {
    use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca.pem()))
        .identity(Identity::from_pem(&identity.cert_pem, &identity.key_pem))
        .domain_name("localhost");
    let channel = Channel::from_shared(format!("https://localhost:{port}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .expect("mTLS connects");
    password_recovery::proto::v1::password_recovery_client::PasswordRecoveryClient::new(channel)
}
