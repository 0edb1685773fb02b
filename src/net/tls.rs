//! TLS on both sides (rustls, ring provider): certificate loading with SNI selection and
//! reload, the upstream client configuration, and the [`Stream`] type that is plain or TLS.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::config::{Config, TlsConfig, UpstreamConfig};
use crate::types::TlsInfo;

/// A TLS setup problem: which file, and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("{path}: {reason}")]
    File {
        /// File.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// No trusted roots for verifying the upstream.
    #[error("no trusted CA certificates: set upstream.ca_file ({0})")]
    NoRoots(String),
    /// The upstream name is not a valid DNS name or IP address.
    #[error("upstream server name {0:?} is not a DNS name or IP address")]
    BadServerName(String),
}

/// The crypto provider used everywhere (ring: see Cargo.toml).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The provider for client-facing TLS: the same suites, SHA-384 ones last. Clients (rustls,
/// OpenSSL) list `TLS13_AES_256_GCM_SHA384` first, and its SHA-384 key schedule has no CPU
/// instructions behind it (SHA-256 has SHA-NI / ARMv8 SHA): it was the largest single cost of
/// a resumed handshake in `perf` (issue 12). AES-128-GCM is TLS 1.3's mandatory suite.
fn server_provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites
        .sort_by_key(|s| format!("{:?}", s.suite()).ends_with("SHA384"));
    Arc::new(p)
}

fn file_err(path: &Path, reason: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

/// Read a PEM certificate chain.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(path, e))?;
    if certs.is_empty() {
        return Err(file_err(path, "no certificate found"));
    }
    Ok(certs)
}

/// Read a PEM private key (PKCS#8, PKCS#1 RSA or SEC1 EC).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_err(path, e))
}

fn certified_key(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = load_certs(cert)?;
    let key_der = load_key(key)?;
    let signing = provider()
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| file_err(key, e))?;
    let ck = CertifiedKey::new(chain, signing);
    // Catches a key that does not belong to the certificate.
    ck.keys_match().map_err(|e| file_err(cert, e))?;
    Ok(Arc::new(ck))
}

/// Whether `key` loads and belongs to the first certificate of `cert`.
pub(crate) fn check_pair(cert: &Path, key: &Path) -> Result<(), TlsError> {
    certified_key(cert, key).map(drop)
}

/// The certificates popgate serves, chosen by SNI.
#[derive(Debug, Default)]
struct CertSet {
    default: Option<Arc<CertifiedKey>>,
    by_name: HashMap<String, Arc<CertifiedKey>>,
}

impl CertSet {
    fn load(cfg: &TlsConfig) -> Result<CertSet, TlsError> {
        let mut set = CertSet::default();
        if let (Some(cert), Some(key)) = (&cfg.cert, &cfg.key) {
            set.default = Some(certified_key(cert, key)?);
        }
        for c in &cfg.certificates {
            let ck = certified_key(&c.cert, &c.key)?;
            for name in &c.server_names {
                set.by_name.insert(name.to_ascii_lowercase(), ck.clone());
            }
            if set.default.is_none() {
                set.default = Some(ck);
            }
        }
        Ok(set)
    }

    fn pick(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        if let Some(name) = sni {
            let name = name.to_ascii_lowercase();
            if let Some(ck) = self.by_name.get(&name) {
                return Some(ck.clone());
            }
            // One-level wildcard entries like "*.example.org".
            if let Some((_, parent)) = name.split_once('.')
                && let Some(ck) = self.by_name.get(&format!("*.{parent}"))
            {
                return Some(ck.clone());
            }
        }
        self.default.clone()
    }
}

#[derive(Debug)]
struct Resolver {
    certs: CertSet,
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.certs.pick(hello.server_name())
    }
}

/// Client-facing TLS: a rustls acceptor choosing certificates by SNI. A reload builds a new one
/// (open sessions keep the one they started with).
#[derive(Debug, Clone)]
pub struct ServerTls {
    config: Arc<rustls::ServerConfig>,
}

impl ServerTls {
    /// Load the certificates of `[tls]`; TLS 1.2 and 1.3 only.
    pub fn new(cfg: &TlsConfig) -> Result<ServerTls, TlsError> {
        let resolver = Arc::new(Resolver {
            certs: CertSet::load(cfg)?,
        });
        let mut config = rustls::ServerConfig::builder_with_provider(server_provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(resolver);
        config.alpn_protocols = vec![b"pop3".to_vec()];
        // Our order, not the client's: see `server_provider`.
        config.ignore_client_order = true;
        Ok(ServerTls {
            config: Arc::new(config),
        })
    }

    /// An acceptor for handshakes.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config.clone())
    }
}

/// Upstream-facing TLS: the client config and the name to verify.
#[derive(Debug, Clone)]
pub struct UpstreamTls {
    config: Arc<rustls::ClientConfig>,
    /// `server_name` when configured (or set per session by [`UpstreamTls::named`]);
    /// otherwise the host part of the address dialled.
    name: Option<ServerName<'static>>,
}

impl UpstreamTls {
    /// Build from `[upstream]`: system roots (rustls-native-certs) unless `ca_file`, optional
    /// client certificate, and `verify = false` only when explicitly configured.
    pub fn new(cfg: &UpstreamConfig) -> Result<UpstreamTls, TlsError> {
        let name = match &cfg.server_name {
            Some(host) => Some(
                ServerName::try_from(host.clone())
                    .map_err(|_| TlsError::BadServerName(host.clone()))?,
            ),
            None => {
                // original-destination: each session names its server.
                if !cfg.original_destination() {
                    for a in &cfg.address {
                        address_name(a)?;
                    }
                }
                None
            }
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?;
        let builder = if cfg.verify {
            let mut roots = rustls::RootCertStore::empty();
            match &cfg.ca_file {
                Some(ca) => {
                    for c in load_certs(ca)? {
                        roots.add(c).map_err(|e| file_err(ca, e))?;
                    }
                }
                None => {
                    let found = rustls_native_certs::load_native_certs();
                    for c in found.certs {
                        let _ = roots.add(c);
                    }
                    if roots.is_empty() {
                        let why = found
                            .errors
                            .first()
                            .map(|e| e.to_string())
                            .unwrap_or_else(|| "the system store is empty".into());
                        return Err(TlsError::NoRoots(why));
                    }
                }
            }
            builder.with_root_certificates(roots)
        } else {
            tracing::warn!(
                upstream = cfg.label(),
                "upstream.verify = false: the upstream certificate is NOT verified; \
                 anyone on the path can impersonate the server"
            );
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerify(provider())))
        };
        let config = match (&cfg.client_cert, &cfg.client_key) {
            (Some(cert), Some(key)) => {
                builder.with_client_auth_cert(load_certs(cert)?, load_key(key)?)?
            }
            _ => builder.with_no_client_auth(),
        };
        Ok(UpstreamTls {
            config: Arc::new(config),
            name,
        })
    }

    /// Whether the name to verify is chosen per session (see [`UpstreamTls::named`]).
    pub fn needs_name(&self) -> bool {
        self.name.is_none()
    }

    /// The same settings, verifying (and sending as SNI) `name`.
    pub fn named(&self, name: ServerName<'static>) -> UpstreamTls {
        UpstreamTls {
            config: self.config.clone(),
            name: Some(name),
        }
    }

    /// Handshake over an established TCP connection to `address` (`host:port`).
    pub async fn connect(&self, tcp: TcpStream, address: &str) -> io::Result<Stream> {
        let connector = tokio_rustls::TlsConnector::from(self.config.clone());
        let name = match &self.name {
            Some(n) => n.clone(),
            None => address_name(address).map_err(io::Error::other)?,
        };
        let tls = connector.connect(name, tcp).await?;
        Ok(Stream::Tls(Box::new(tokio_rustls::TlsStream::Client(tls))))
    }
}

/// The name to verify for `address`: its host part.
fn address_name(address: &str) -> Result<ServerName<'static>, TlsError> {
    let host = crate::config::split_host_port(address)
        .map(|(h, _)| h.to_owned())
        .unwrap_or_default();
    ServerName::try_from(host.clone()).map_err(|_| TlsError::BadServerName(host))
}

/// Accepts any certificate (signatures are still checked): `upstream.verify = false`.
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A connection to a client or to the upstream: plain, or TLS on top of TCP.
#[derive(Debug)]
pub enum Stream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS (client or server side) over TCP.
    Tls(Box<tokio_rustls::TlsStream<TcpStream>>),
    /// Given away during a TLS upgrade; every operation fails.
    Detached,
}

impl Stream {
    /// Whether TLS is active on this connection.
    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    /// Negotiated TLS parameters, if TLS is active.
    pub fn tls_info(&self) -> Option<TlsInfo> {
        let Stream::Tls(s) = self else { return None };
        let (common, sni): (&rustls::CommonState, _) = match s.as_ref() {
            tokio_rustls::TlsStream::Server(s) => {
                let c = s.get_ref().1;
                (c, c.server_name().map(str::to_owned))
            }
            tokio_rustls::TlsStream::Client(s) => (s.get_ref().1, None),
        };
        Some(TlsInfo {
            version: common
                .protocol_version()
                .map(|v| format!("{v:?}"))
                .unwrap_or_default(),
            cipher: common
                .negotiated_cipher_suite()
                .map(|c| format!("{:?}", c.suite()))
                .unwrap_or_default(),
            sni,
        })
    }

    /// Close with a TCP reset (and no TLS close_notify), so that the peer sees an error
    /// rather than an orderly end: used when a message was cut, so no client can take the
    /// truncated body for a complete one.
    pub fn abort(self) {
        let tcp = match &self {
            Stream::Plain(tcp) => tcp,
            Stream::Tls(s) => s.get_ref().0,
            Stream::Detached => return,
        };
        if let Err(e) = tcp.set_zero_linger() {
            tracing::debug!(error = %e, "SO_LINGER 0 failed; the close will be a FIN");
        }
        drop(self);
    }

    /// Upgrade a plain client connection: the server side of a TLS handshake.
    pub async fn accept_tls(self, tls: &ServerTls) -> io::Result<Stream> {
        match self {
            Stream::Plain(tcp) => {
                let s = tls.acceptor().accept(tcp).await?;
                Ok(Stream::Tls(Box::new(tokio_rustls::TlsStream::Server(s))))
            }
            _ => Err(io::Error::other("TLS upgrade of a non-plain stream")),
        }
    }
}

fn detached() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "stream detached")
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::Detached => Poll::Ready(Err(detached())),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::Detached => Poll::Ready(Err(detached())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::Detached => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::Detached => Poll::Ready(Ok(())),
        }
    }
}

/// TLS material of a whole config, built once at start and on reload.
#[derive(Debug, Clone, Default)]
pub struct TlsSetup {
    /// Client-facing TLS, when `[tls]` is configured.
    pub server: Option<ServerTls>,
    /// Upstream TLS of each upstream (same order as `Config::upstreams`), when its `tls` is
    /// not `none`.
    pub upstreams: Vec<Option<UpstreamTls>>,
}

impl TlsSetup {
    /// Load everything the config asks for.
    pub fn new(config: &Config) -> Result<TlsSetup, TlsError> {
        let server = match &config.tls {
            Some(t) => Some(ServerTls::new(t)?),
            None => None,
        };
        let upstreams = config
            .upstreams
            .iter()
            .map(|u| match u.tls {
                crate::config::TlsMode::None => Ok(None),
                _ => UpstreamTls::new(u).map(Some),
            })
            .collect::<Result<_, _>>()?;
        Ok(TlsSetup { server, upstreams })
    }
}
