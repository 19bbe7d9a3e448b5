//! TLS for the public APIs: one certificate and key (PEM files) serve both
//! the gRPC API (through tonic) and the HTTP API (through a listener that
//! completes the handshake before axum sees a connection).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::server::TlsStream;

/// How long a client gets to finish its handshake.
const HANDSHAKE: Duration = Duration::from_secs(5);

/// A certificate chain and its private key, as PEM files.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    /// The leaf's private key.
    pub key: PathBuf,
}

fn read(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading the TLS {what} {}", path.display()))
}

impl TlsFiles {
    /// Both files or neither; one alone is a mistake worth naming.
    pub fn from_args(cert: Option<PathBuf>, key: Option<PathBuf>) -> anyhow::Result<Option<Self>> {
        match (cert, key) {
            (Some(cert), Some(key)) => Ok(Some(Self { cert, key })),
            (None, None) => Ok(None),
            (Some(_), None) => {
                anyhow::bail!("--tls-cert needs --tls-key (the certificate's private key)")
            }
            (None, Some(_)) => anyhow::bail!("--tls-key needs --tls-cert (the certificate chain)"),
        }
    }

    /// The gRPC server's TLS configuration.
    pub fn grpc(&self) -> anyhow::Result<tonic::transport::ServerTlsConfig> {
        // Parsed here too, so a bad file fails at start with its name.
        self.rustls(&[])?;
        let identity = tonic::transport::Identity::from_pem(
            read(&self.cert, "certificate")?,
            read(&self.key, "key")?,
        );
        Ok(tonic::transport::ServerTlsConfig::new().identity(identity))
    }

    fn rustls(&self, alpn: &[&[u8]]) -> anyhow::Result<Arc<rustls::ServerConfig>> {
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(&read(&self.cert, "certificate")?)
                .collect::<Result<_, _>>()
                .with_context(|| format!("parsing the TLS certificate {}", self.cert.display()))?;
        anyhow::ensure!(
            !certs.is_empty(),
            "the TLS certificate file {} holds no certificate",
            self.cert.display()
        );
        let key = PrivateKeyDer::from_pem_slice(&read(&self.key, "key")?)
            .with_context(|| format!("parsing the TLS key {}", self.key.display()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .context("the TLS key does not fit the certificate")?;
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(cfg))
    }

    /// Wraps the HTTP API's listener.
    pub fn http(&self, tcp: TcpListener) -> anyhow::Result<TlsListener> {
        Ok(TlsListener {
            tcp,
            acceptor: TlsAcceptor::from(self.rustls(&[b"h2", b"http/1.1"])?),
        })
    }
}

/// A listener that hands axum connections whose TLS handshake is done.
pub struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (tcp, addr) = match self.tcp.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting an HTTP connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // Small messages (WebSocket events, SSE lines) leave at once.
            let _ = tcp.set_nodelay(true);
            match tokio::time::timeout(HANDSHAKE, self.acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => return (tls, addr),
                Ok(Err(e)) => tracing::debug!(%addr, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(%addr, "TLS handshake timed out"),
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}
