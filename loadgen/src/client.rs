//! A small POP3 client for load: plain, STLS or implicit TLS, its own read buffer, and the
//! framing of `popgate-wire` (status lines, the multi-line body scanner).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use popgate_wire::command::line_end;
use popgate_wire::response::{BodyScanner, Scan, Status, StatusLine};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::timeout;

/// Longest status line accepted.
const MAX_LINE: usize = 8 * 1024;

/// What went wrong in a session; the kind is what the report counts.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// TCP connect failed.
    #[error("connect: {0}")]
    Connect(std::io::Error),
    /// The TLS handshake failed.
    #[error("tls: {0}")]
    Tls(std::io::Error),
    /// Reading or writing failed, or the peer closed.
    #[error("io: {0}")]
    Io(std::io::Error),
    /// An operation took longer than the per-operation timeout.
    #[error("timeout: {0}")]
    Timeout(&'static str),
    /// A reply that is not what POP3 says it should be.
    #[error("protocol: {0}")]
    Protocol(String),
}

impl ClientError {
    /// Short name of the kind, for the error counts.
    pub fn kind(&self) -> &'static str {
        match self {
            ClientError::Connect(_) => "connect",
            ClientError::Tls(_) => "tls",
            ClientError::Io(_) => "io",
            ClientError::Timeout(_) => "timeout",
            ClientError::Protocol(_) => "protocol",
        }
    }
}

/// How the client secures the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TlsMode {
    /// Plain TCP.
    None,
    /// Plain TCP, then `STLS` (RFC 2595) after the greeting.
    Stls,
    /// TLS from the first byte (port 995 style).
    Implicit,
}

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct Target {
    /// Server address.
    pub addr: SocketAddr,
    /// TLS mode.
    pub tls: TlsMode,
    /// Client TLS configuration (needed unless `tls` is `None`).
    pub tls_config: Option<Arc<rustls::ClientConfig>>,
    /// Name checked against the certificate (and sent as SNI).
    pub sni: ServerName<'static>,
    /// Spread client source addresses over 127.0.0.1..=127.0.0.N (0 or 1: let the kernel pick).
    pub sources: u8,
    /// Timeout of each single operation (connect, handshake, one reply).
    pub op_timeout: Duration,
}

/// Anything a session can run over.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A connected POP3 session (after the greeting, and after STLS when asked).
pub struct Client<S> {
    io: S,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    op_timeout: Duration,
    /// Whether the TLS handshake resumed an earlier session.
    pub resumed: bool,
}

/// A boxed session stream: plain TCP or TLS.
pub type Session = Client<Box<dyn Io>>;

impl<S: Io> Client<S> {
    /// Wrap a stream, with a read buffer of `cap` bytes.
    pub fn new(io: S, cap: usize, op_timeout: Duration) -> Client<S> {
        Client {
            io,
            buf: vec![0; cap.max(MAX_LINE)],
            start: 0,
            end: 0,
            op_timeout,
            resumed: false,
        }
    }

    async fn fill(&mut self, what: &'static str) -> Result<(), ClientError> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let n = timeout(self.op_timeout, self.io.read(&mut self.buf[self.end..]))
            .await
            .map_err(|_| ClientError::Timeout(what))?
            .map_err(ClientError::Io)?;
        if n == 0 {
            return Err(ClientError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        self.end += n;
        Ok(())
    }

    /// Read one line (with its line end).
    pub async fn read_line(&mut self, what: &'static str) -> Result<Vec<u8>, ClientError> {
        loop {
            if let Some(n) = line_end(&self.buf[self.start..self.end]) {
                let line = self.buf[self.start..self.start + n].to_vec();
                self.start += n;
                return Ok(line);
            }
            if self.end - self.start >= MAX_LINE {
                return Err(ClientError::Protocol(format!("{what}: line too long")));
            }
            self.fill(what).await?;
        }
    }

    /// Read a status line; `-ERR` or garbage is a protocol error naming `what`.
    pub async fn expect_ok(&mut self, what: &'static str) -> Result<Vec<u8>, ClientError> {
        let line = self.read_line(what).await?;
        match StatusLine::parse(&line) {
            Ok(s) if s.status == Status::Ok => Ok(line),
            _ => Err(ClientError::Protocol(format!(
                "{what}: {}",
                popgate_wire::printable(&line)
            ))),
        }
    }

    /// Send a command line (CRLF added).
    pub async fn send(&mut self, line: &str) -> Result<(), ClientError> {
        let mut bytes = Vec::with_capacity(line.len() + 2);
        bytes.extend_from_slice(line.as_bytes());
        bytes.extend_from_slice(b"\r\n");
        // The flush matters under TLS: records a write left queued in rustls go out.
        timeout(self.op_timeout, async {
            self.io.write_all(&bytes).await?;
            self.io.flush().await
        })
        .await
        .map_err(|_| ClientError::Timeout("write"))?
        .map_err(ClientError::Io)
    }

    /// Send a command and expect `+OK`.
    pub async fn command(&mut self, line: &str, what: &'static str) -> Result<(), ClientError> {
        self.send(line).await?;
        self.expect_ok(what).await.map(drop)
    }

    /// Read a multi-line body up to and including its terminator; returns the octets read
    /// (body as sent, dot-stuffing and terminator included).
    pub async fn read_body(&mut self, what: &'static str) -> Result<u64, ClientError> {
        let mut scanner = BodyScanner::new();
        let mut total = 0u64;
        loop {
            if self.start < self.end {
                let chunk = &self.buf[self.start..self.end];
                match scanner.scan(chunk) {
                    Scan::End(n) => {
                        self.start += n;
                        return Ok(total + n as u64);
                    }
                    Scan::More { held } => {
                        // Keep a possible terminator start for the next read.
                        let take = chunk.len() - held;
                        total += take as u64;
                        self.start += take;
                        if held > 0 {
                            // Re-scan the held bytes with what follows: rewind the scanner.
                            scanner = BodyScanner::new();
                        }
                    }
                    Scan::BareLfEnd { .. } => {
                        return Err(ClientError::Protocol(format!(
                            "{what}: `.` line ended by a bare LF"
                        )));
                    }
                }
            }
            self.fill(what).await?;
        }
    }

    /// `+OK` then a multi-line body; returns the status line and the body octets.
    pub async fn multiline(
        &mut self,
        line: &str,
        what: &'static str,
    ) -> Result<(Vec<u8>, u64), ClientError> {
        self.send(line).await?;
        let status = self.expect_ok(what).await?;
        let n = self.read_body(what).await?;
        Ok((status, n))
    }

    /// `USER`/`PASS`.
    pub async fn login(&mut self, user: &str, pass: &str) -> Result<(), ClientError> {
        self.command(&format!("USER {user}"), "USER").await?;
        self.command(&format!("PASS {pass}"), "PASS").await
    }

    /// `QUIT` and its `+OK`.
    pub async fn quit(&mut self) -> Result<(), ClientError> {
        self.command("QUIT", "QUIT").await
    }

    /// `RETR n`: checks the body is at least as long as the size the status line announces
    /// (RFC 1939 servers say `+OK <octets> octets`) and returns the octets read.
    pub async fn retr(&mut self, n: u32) -> Result<u64, ClientError> {
        let (status, got) = self.multiline(&format!("RETR {n}"), "RETR").await?;
        let announced = std::str::from_utf8(&status)
            .ok()
            .and_then(|s| s.split_whitespace().nth(1))
            .and_then(|w| w.parse::<u64>().ok());
        // `got` includes the terminator `.CRLF`; stuffing only adds octets.
        if let Some(size) = announced
            && got < size + 3
        {
            return Err(ClientError::Protocol(format!(
                "RETR {n}: {got} octets read, {size} announced"
            )));
        }
        Ok(got)
    }

    /// The stream and any bytes read past the last reply (there must be none before STLS).
    fn into_inner(self) -> (S, usize) {
        (self.io, self.end - self.start)
    }

    fn boxed(self) -> Session
    where
        S: 'static,
    {
        Client {
            io: Box::new(self.io),
            buf: self.buf,
            start: self.start,
            end: self.end,
            op_timeout: self.op_timeout,
            resumed: self.resumed,
        }
    }
}

/// Connect to `t.addr`, from 127.0.0.(1 + i % sources) when sources are spread.
async fn tcp(t: &Target, i: u64) -> Result<TcpStream, ClientError> {
    let sock = match t.addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(ClientError::Connect)?;
    if t.sources > 1 && t.addr.ip().is_loopback() && t.addr.is_ipv4() {
        let last = 1 + (i % u64::from(t.sources)) as u8;
        let src = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)), 0);
        sock.bind(src).map_err(ClientError::Connect)?;
    }
    let stream = timeout(t.op_timeout, sock.connect(t.addr))
        .await
        .map_err(|_| ClientError::Timeout("connect"))?
        .map_err(ClientError::Connect)?;
    // Commands are small and answered one at a time: do not let Nagle hold them.
    stream.set_nodelay(true).map_err(ClientError::Connect)?;
    Ok(stream)
}

async fn handshake(
    t: &Target,
    stream: TcpStream,
) -> Result<(tokio_rustls::client::TlsStream<TcpStream>, bool), ClientError> {
    let Some(cfg) = &t.tls_config else {
        return Err(ClientError::Tls(std::io::Error::other(
            "TLS asked without a TLS configuration",
        )));
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::clone(cfg));
    let tls = timeout(t.op_timeout, connector.connect(t.sni.clone(), stream))
        .await
        .map_err(|_| ClientError::Timeout("TLS handshake"))?
        .map_err(ClientError::Tls)?;
    let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    Ok((tls, resumed))
}

/// Connect (the `i`-th session picks the source address), secure as `t.tls` asks and read the
/// greeting; `cap` is the read buffer size.
pub async fn connect(t: &Target, i: u64, cap: usize) -> Result<Session, ClientError> {
    let stream = tcp(t, i).await?;
    match t.tls {
        TlsMode::None => {
            let mut c = Client::new(stream, cap, t.op_timeout);
            c.expect_ok("greeting").await?;
            Ok(c.boxed())
        }
        TlsMode::Implicit => {
            let (tls, resumed) = handshake(t, stream).await?;
            let mut c = Client::new(tls, cap, t.op_timeout).boxed();
            c.resumed = resumed;
            c.expect_ok("greeting").await?;
            Ok(c)
        }
        TlsMode::Stls => {
            let mut c = Client::new(stream, MAX_LINE, t.op_timeout);
            c.expect_ok("greeting").await?;
            c.command("STLS", "STLS").await?;
            let (stream, extra) = c.into_inner();
            if extra > 0 {
                return Err(ClientError::Protocol(format!(
                    "STLS: {extra} plaintext bytes after +OK"
                )));
            }
            let (tls, resumed) = handshake(t, stream).await?;
            let mut c = Client::new(tls, cap, t.op_timeout).boxed();
            c.resumed = resumed;
            Ok(c)
        }
    }
}

/// Accepts any server certificate (`--insecure`, for self-signed test certificates).
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
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
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Why the TLS client configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// The CA file could not be read or parsed.
    #[error("CA file {0}: {1}")]
    Ca(String, String),
    /// rustls refused the settings.
    #[error("TLS settings: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Client TLS configuration trusting the PEM certificates in `ca` (or anything with
/// `insecure`); session resumption (tickets and IDs, in memory) when `resume`.
pub fn tls_config(
    ca: Option<&std::path::Path>,
    insecure: bool,
    resume: bool,
) -> Result<Arc<rustls::ClientConfig>, TlsSetupError> {
    use rustls::pki_types::pem::PemObject;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()?;
    let mut cfg = if insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
            .with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        if let Some(ca) = ca {
            let name = ca.display().to_string();
            let certs = rustls::pki_types::CertificateDer::pem_file_iter(ca)
                .map_err(|e| TlsSetupError::Ca(name.clone(), e.to_string()))?;
            for cert in certs {
                let cert = cert.map_err(|e| TlsSetupError::Ca(name.clone(), e.to_string()))?;
                roots
                    .add(cert)
                    .map_err(|e| TlsSetupError::Ca(name.clone(), e.to_string()))?;
            }
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    if !resume {
        cfg.resumption = rustls::client::Resumption::disabled();
    }
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use popgate_demo::{DemoServer, Mailbox, ServerOptions};

    fn target(addr: SocketAddr) -> Target {
        Target {
            addr,
            tls: TlsMode::None,
            tls_config: None,
            sni: ServerName::try_from("localhost").unwrap_or_else(|_| unreachable!()),
            sources: 4,
            op_timeout: Duration::from_secs(5),
        }
    }

    fn big_message(lines: usize) -> Vec<u8> {
        let mut m = b"Subject: big\r\n\r\n".to_vec();
        for i in 0..lines {
            // Every 7th line starts with a dot: stuffed on the wire.
            if i.is_multiple_of(7) {
                m.extend_from_slice(b".");
            }
            m.extend_from_slice(b"0123456789abcdefghijklmnopqrstuvwxyz\r\n");
        }
        m
    }

    #[tokio::test]
    async fn session_against_the_demo_server() {
        let msg = big_message(20_000);
        let len = msg.len() as u64;
        let srv = DemoServer::start(
            "127.0.0.1:0".parse().unwrap_or_else(|_| unreachable!()),
            ServerOptions::new(vec![Mailbox::new("u", "p", vec![b"a\r\n".to_vec(), msg])]),
        )
        .await
        .unwrap_or_else(|e| panic!("demo server: {e}"));
        let t = target(srv.local_addr());
        // A small read buffer: the body crosses many reads and terminator splits.
        let mut c = connect(&t, 3, 16)
            .await
            .unwrap_or_else(|e| panic!("connect: {e}"));
        c.login("u", "p")
            .await
            .unwrap_or_else(|e| panic!("login: {e}"));
        let (_, list) = c
            .multiline("LIST", "LIST")
            .await
            .unwrap_or_else(|e| panic!("LIST: {e}"));
        assert!(list > 3);
        let got = c.retr(2).await.unwrap_or_else(|e| panic!("RETR: {e}"));
        // Body + one stuffing dot per 7 lines + terminator.
        assert_eq!(got, len + 20_000_u64.div_ceil(7) + 3);
        // The session is still in step after the body.
        c.command("NOOP", "NOOP")
            .await
            .unwrap_or_else(|e| panic!("NOOP: {e}"));
        c.quit().await.unwrap_or_else(|e| panic!("QUIT: {e}"));
    }

    #[tokio::test]
    async fn wrong_password_is_a_protocol_error() {
        let srv = DemoServer::start(
            "127.0.0.1:0".parse().unwrap_or_else(|_| unreachable!()),
            ServerOptions::new(vec![Mailbox::new("u", "p", vec![])]),
        )
        .await
        .unwrap_or_else(|e| panic!("demo server: {e}"));
        let mut c = connect(&target(srv.local_addr()), 0, 1024)
            .await
            .unwrap_or_else(|e| panic!("connect: {e}"));
        let e = c.login("u", "nope").await.err();
        assert_eq!(e.map(|e| e.kind()), Some("protocol"));
    }

    #[tokio::test]
    async fn refused_connection_is_a_connect_error() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
        let addr = l.local_addr().unwrap_or_else(|e| panic!("{e}"));
        drop(l);
        let e = connect(&target(addr), 0, 1024).await.err();
        assert_eq!(e.map(|e| e.kind()), Some("connect"));
    }

    #[test]
    fn body_terminator_split_across_reads_is_found() {
        // Drive read_body over an in-memory duplex stream, one byte per write.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("{e}"));
        rt.block_on(async {
            let (a, mut b) = tokio::io::duplex(1);
            let body = b"line\r\n..dot\r\n.\r\n+OK next\r\n";
            let writer = tokio::spawn(async move {
                for byte in body {
                    let _ = b.write_all(&[*byte]).await;
                }
                b
            });
            let mut c = Client::new(a, 16, Duration::from_secs(5));
            let n = c.read_body("body").await.unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(n, 16);
            let next = c.read_line("next").await.unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(next, b"+OK next\r\n");
            drop(writer.await);
        });
    }
}
