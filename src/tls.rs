//! TLS settings: the endpoints' server side, and the client side of every
//! TLS connection the portal originates (members, Patroni's REST API, etcd,
//! Sentinel); rustls with TLS 1.3 and 1.2 only.
//!
//! The suites are rustls's (ring) modern defaults, all AEAD with forward
//! secrecy: TLS 1.3 AES-256-GCM, AES-128-GCM and ChaCha20-Poly1305, and for
//! TLS 1.2 ECDHE with the same ciphers. The server's order wins. TLS 1.0 and
//! 1.1 ClientHellos are refused with a `protocol_version` alert. ECDSA, Ed25519
//! and RSA keys (PKCS#8, PKCS#1 or SEC1 PEM) are accepted. With a
//! `client_ca`, clients authenticate with a certificate that chains to it
//! (required, or optional with `client_auth: optional`).

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::ServerConfig;

use crate::config::{ClientAuth, ClientTls, TlsFiles};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {what}")]
    File { path: String, what: String },
    #[error("certificate {cert} and key {key} do not make an identity: {source}")]
    Identity {
        cert: String,
        key: String,
        #[source]
        source: rustls::Error,
    },
}

fn file_error(path: &Path, what: impl ToString) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        what: what.to_string(),
    }
}

/// Reads a PEM certificate chain.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|err| file_error(path, err))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| file_error(path, err))?;
    if certs.is_empty() {
        return Err(file_error(path, "no PEM certificate in the file"));
    }
    Ok(certs)
}

/// When the first certificate of the PEM file `path` expires (its
/// `notAfter`), as Unix seconds.
pub fn not_after(path: &Path) -> Result<i64, TlsError> {
    let certs = load_certs(path)?;
    let (_, cert) = x509_parser::parse_x509_certificate(certs[0].as_ref())
        .map_err(|err| file_error(path, format!("not an X.509 certificate: {err}")))?;
    Ok(cert.validity().not_after.timestamp())
}

/// Builds the server side configuration for one endpoint: its certificate
/// and key and, with `client_ca`, the verifier of client certificates
/// (rustls's WebPKI verifier: a chain to one of those CAs, valid now, for
/// client authentication).
pub fn server_config(files: &TlsFiles, alpn: &[&[u8]]) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = load_certs(&files.cert)?;
    let key =
        PrivateKeyDer::from_pem_file(&files.key).map_err(|err| file_error(&files.key, err))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let identity_error = |source| TlsError::Identity {
        cert: files.cert.display().to_string(),
        key: files.key.display().to_string(),
        source,
    };
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(identity_error)?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            builder.with_client_cert_verifier(client_verifier(ca, files.client_auth, provider)?)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(identity_error)?;
    config.ignore_client_order = true;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// Verifies client certificates against the CAs in the PEM file `ca`.
fn client_verifier(
    ca: &Path,
    auth: ClientAuth,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs(ca)? {
        roots
            .add(cert)
            .map_err(|err| file_error(ca, format!("not a usable CA certificate: {err}")))?;
    }
    let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
    let builder = match auth {
        ClientAuth::Required => builder,
        ClientAuth::Optional => builder.allow_unauthenticated(),
    };
    builder.build().map_err(|err| {
        file_error(
            ca,
            format!("cannot verify client certificates with it: {err}"),
        )
    })
}

/// The subject of a client's certificate (DER), as `CN=app,O=example`.
pub fn certificate_subject(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(cert.subject().to_string())
}

/// The client side of TLS the portal originates (to members, a DCS,
/// Patroni's REST API): TLS 1.3 and 1.2, trusting only the CAs in
/// `tls.ca` (PEM), presenting `tls.identity` when set (servers that ask
/// for a client certificate: Redis's `tls-auth-clients`, etcd's
/// `--client-cert-auth`), offering `alpn`.
pub fn client_config(
    tls: &ClientTls,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let ca = &tls.ca;
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs(ca)? {
        roots.add(cert).map_err(|err| file_error(ca, err))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|err| file_error(ca, err))?
        .with_root_certificates(roots);
    let mut config = match &tls.identity {
        None => builder.with_no_client_auth(),
        Some(files) => {
            let certs = load_certs(&files.cert)?;
            let key = PrivateKeyDer::from_pem_file(&files.key)
                .map_err(|err| file_error(&files.key, err))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|source| TlsError::Identity {
                    cert: files.cert.display().to_string(),
                    key: files.key.display().to_string(),
                    source,
                })?
        }
    };
    // No session resumption: a resumed handshake carries no certificate,
    // so a member whose certificate expired or was replaced by one that
    // does not verify would go on getting sessions as long as the portal
    // reconnects within the ticket's lifetime. Every connection verifies.
    config.resumption = rustls::client::Resumption::disabled();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// A short, stable label for a failed handshake, for metrics.
pub fn handshake_failure_reason(err: &std::io::Error) -> &'static str {
    use rustls::Error as E;
    if err.kind() == std::io::ErrorKind::UnexpectedEof {
        return "eof";
    }
    match err.get_ref().and_then(|inner| inner.downcast_ref::<E>()) {
        Some(E::InvalidMessage(_)) => "not_tls",
        Some(E::PeerIncompatible(rustls::PeerIncompatible::SupportedVersionsExtensionRequired))
        | Some(E::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered))
        | Some(E::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOfferedOrEnabled)) => {
            "protocol_version"
        }
        Some(E::PeerIncompatible(_)) => "incompatible",
        Some(E::AlertReceived(_)) => "alert",
        Some(E::NoCertificatesPresented) | Some(E::InvalidCertificate(_)) => "certificate",
        _ => match err.kind() {
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe => "eof",
            _ => "other",
        },
    }
}
