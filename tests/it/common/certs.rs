//! Throw-away X.509 material for tests: a private CA and server certificates it signs.
//!
//! Nothing here expires during a test run (rcgen's default validity is 1975..4096) and nothing
//! is read from the repository, so no test depends on certificate files that age.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tempfile::TempDir;

/// A throw-away certificate authority with a directory for the files it issues.
///
/// The directory (and every file `issue*` wrote) lives as long as the `TestPki`.
pub struct TestPki {
    /// The CA certificate, PEM.
    pub ca_pem: String,
    /// Where `ca_pem` is written (`ca.pem` in `dir`): give this to clients as the trust anchor.
    pub ca_path: PathBuf,
    /// Holds the CA and everything issued.
    pub dir: TempDir,
    issuer: Issuer<'static, KeyPair>,
    next: AtomicUsize,
}

/// Certificate and private key of one issued server certificate, both PEM.
pub struct IssuedPem {
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestPki {
    /// A fresh CA (ECDSA P-256) in a fresh temp dir.
    pub fn new() -> TestPki {
        let dir = tempfile::Builder::new()
            .prefix("pki")
            .tempdir()
            .expect("create temp dir for test PKI");
        let (ca_pem, issuer) = new_ca("popgate test CA");
        let ca_path = dir.path().join("ca.pem");
        std::fs::write(&ca_path, &ca_pem).expect("write ca.pem");
        TestPki {
            ca_pem,
            ca_path,
            dir,
            issuer,
            next: AtomicUsize::new(0),
        }
    }

    /// Where the CA certificate is (same as `self.ca_path`).
    pub fn ca_path(&self) -> &Path {
        &self.ca_path
    }

    /// A server certificate signed by this CA for `names`: DNS names (`"localhost"`) and IP
    /// addresses (`"127.0.0.1"`, `"::1"`, which become IP SANs). The first name is also the
    /// subject CN. Returns the paths of the certificate (leaf only) and its key, both PEM.
    pub fn issue(&self, names: &[&str]) -> (PathBuf, PathBuf) {
        let issued = self.issue_pem(names);
        self.write_pair(&issued)
    }

    /// Like [`TestPki::issue`], in memory.
    pub fn issue_pem(&self, names: &[&str]) -> IssuedPem {
        sign_leaf(&self.issuer, names, false)
    }

    /// A certificate signed by this CA whose only name is `wrong-name.invalid`: a client that
    /// checks names must refuse it for `localhost` / `127.0.0.1`.
    pub fn issue_wrong_name(&self) -> (PathBuf, PathBuf) {
        self.issue(&["wrong-name.invalid"])
    }

    /// A certificate for `names` signed by this CA but valid only in 2000: expired.
    pub fn issue_expired(&self, names: &[&str]) -> (PathBuf, PathBuf) {
        let issued = sign_leaf(&self.issuer, names, true);
        self.write_pair(&issued)
    }

    /// A certificate for the right `names` signed by another, unknown CA: a client that trusts
    /// only `ca_path` must refuse it.
    pub fn issue_untrusted(&self, names: &[&str]) -> (PathBuf, PathBuf) {
        let (_pem, other) = new_ca("some other CA");
        let issued = sign_leaf(&other, names, false);
        self.write_pair(&issued)
    }

    fn write_pair(&self, issued: &IssuedPem) -> (PathBuf, PathBuf) {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let cert = self.dir.path().join(format!("cert{n}.pem"));
        let key = self.dir.path().join(format!("key{n}.pem"));
        std::fs::write(&cert, &issued.cert_pem).expect("write cert");
        std::fs::write(&key, &issued.key_pem).expect("write key");
        (cert, key)
    }
}

impl Default for TestPki {
    fn default() -> Self {
        TestPki::new()
    }
}

fn new_ca(cn: &str) -> (String, Issuer<'static, KeyPair>) {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, cn);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "popgate tests");
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate().expect("generate CA key");
    let cert = params.self_signed(&key).expect("self-sign CA");
    (cert.pem(), Issuer::new(params, key))
}

fn sign_leaf(issuer: &Issuer<'static, KeyPair>, names: &[&str], expired: bool) -> IssuedPem {
    assert!(
        !names.is_empty(),
        "a server certificate needs at least one name"
    );
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let mut params = CertificateParams::new(names.clone()).expect("leaf params (bad name?)");
    params
        .distinguished_name
        .push(DnType::CommonName, &names[0]);
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // Both usages: the same leaves serve as server certificates and as popgate's client
    // certificate toward an upstream that asks for one.
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    if expired {
        params.not_before = rcgen::date_time_ymd(2000, 1, 1);
        params.not_after = rcgen::date_time_ymd(2000, 12, 31);
    }
    let key = KeyPair::generate().expect("generate leaf key");
    let cert = params.signed_by(&key, issuer).expect("sign leaf");
    IssuedPem {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

/// A rustls server config (popgate's crypto provider and protocol versions) serving the
/// certificate chain `cert` with the key `key` (PEM files), no client authentication.
pub fn rustls_server(cert: &Path, key: &Path) -> std::sync::Arc<rustls::ServerConfig> {
    let certs = popgate::tls::load_certs(cert).unwrap();
    let key = popgate::tls::load_key(key).unwrap();
    std::sync::Arc::new(
        rustls::ServerConfig::builder_with_provider(popgate::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap(),
    )
}

/// The certificates in the PEM file `ca`, as roots of trust.
pub fn roots(ca: &Path) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    for c in popgate::tls::load_certs(ca).unwrap() {
        roots.add(c).unwrap();
    }
    roots
}

/// A rustls client config (popgate's crypto provider and protocol versions) that trusts the
/// CA certificates in the PEM file `ca`, no client certificate.
pub fn rustls_client(ca: &Path) -> std::sync::Arc<rustls::ClientConfig> {
    std::sync::Arc::new(
        rustls::ClientConfig::builder_with_provider(popgate::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots(ca))
            .with_no_client_auth(),
    )
}

/// A TLS client over `tcp` for the server name `localhost`, trusting the CA in `ca` (PEM).
pub async fn tls_connect(
    tcp: tokio::net::TcpStream,
    ca: &Path,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    tokio_rustls::TlsConnector::from(rustls_client(ca))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap()
}
