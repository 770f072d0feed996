//! Certificates for TLS towards the members: a CA made with rcgen and the
//! certificates it signs, as PEM files in a temporary directory.
//!
//! Every leaf is valid for both roles, server and client (extended key
//! usage `serverAuth` and `clientAuth`): Redis presents its
//! `tls-cert-file` when it connects to its primary (`tls-replication`),
//! Patroni its `restapi.certfile` to the other agents, and etcd's gateway
//! its server certificate to its own gRPC server.
//!
//! ```ignore
//! let pki = Pki::new("members");
//! let redis = pki.leaf("redis", &["redis.internal"]);   // server + client
//! let portal = pki.leaf("portal", &["portal"]);         // the portal's client certificate
//! let config = pki.client_config(Some(&portal));        // a test client trusting pki.ca
//! ```

#![allow(dead_code)]

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tempfile::TempDir;

use super::{encode, parse, Reply};

/// A certificate and its key, PEM files.
#[derive(Debug, Clone)]
pub struct Leaf {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A CA and the directory its files live in (removed on drop).
pub struct Pki {
    dir: TempDir,
    /// The CA certificate, PEM.
    pub ca: PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    /// A fresh CA whose common name says `name`.
    pub fn new(name: &str) -> Pki {
        let dir = TempDir::new().expect("temp dir for certificates");
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("test CA {name}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).expect("CA certificate");
        let ca = dir.path().join(format!("{name}-ca.crt"));
        std::fs::write(&ca, cert.pem()).expect("write CA");
        Pki {
            issuer: Issuer::new(params, key),
            dir,
            ca,
        }
    }

    /// A certificate for `hosts` (DNS names or IP addresses), signed by
    /// this CA, usable as a server's and as a client's.
    pub fn leaf(&self, name: &str, hosts: &[&str]) -> Leaf {
        let hosts: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
        let mut params = CertificateParams::new(hosts).expect("leaf params");
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().expect("leaf key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("leaf certificate");
        let leaf = Leaf {
            cert: self.dir.path().join(format!("{name}.crt")),
            key: self.dir.path().join(format!("{name}.key")),
        };
        std::fs::write(&leaf.cert, cert.pem()).expect("write leaf certificate");
        std::fs::write(&leaf.key, key.serialize_pem()).expect("write leaf key");
        // Servers started as another user (Patroni's PostgreSQL user) read
        // them too; these are throwaway test keys.
        for path in [&leaf.cert, &leaf.key, &self.ca] {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644));
        }
        leaf
    }

    /// `leaf` as the harness's `Certs` of a server (the CA key stays here).
    pub fn certs(&self, leaf: &Leaf) -> super::Certs {
        super::Certs {
            dir: self.dir.path().to_path_buf(),
            ca: self.ca.clone(),
            ca_key: PathBuf::new(),
            cert: leaf.cert.clone(),
            key: leaf.key.clone(),
            _tmp: None,
        }
    }

    /// A rustls client trusting only this CA, presenting `identity` when given.
    pub fn client_config(&self, identity: Option<&Leaf>) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&self.ca).expect("read CA") {
            roots.add(cert.expect("CA PEM")).expect("CA accepted");
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots);
        let config = match identity {
            None => builder.with_no_client_auth(),
            Some(leaf) => {
                let chain = CertificateDer::pem_file_iter(&leaf.cert)
                    .expect("read leaf")
                    .collect::<Result<Vec<_>, _>>()
                    .expect("leaf PEM");
                let key = PrivateKeyDer::from_pem_file(&leaf.key).expect("leaf key");
                builder
                    .with_client_auth_cert(chain, key)
                    .expect("client identity")
            }
        };
        Arc::new(config)
    }

    /// The YAML flow map of a portal `ClientTls` block trusting this CA,
    /// with `server_name` and the client certificate when given.
    pub fn yaml(&self, server_name: Option<&str>, identity: Option<&Leaf>) -> String {
        let mut y = format!("{{ca: {}", self.ca.display());
        if let Some(name) = server_name {
            y.push_str(&format!(", server_name: {name}"));
        }
        if let Some(leaf) = identity {
            y.push_str(&format!(
                ", cert: {}, key: {}",
                leaf.cert.display(),
                leaf.key.display()
            ));
        }
        y.push('}');
        y
    }
}

/// A blocking TLS connection to `127.0.0.1:port`, verifying the server as
/// `server_name`.
pub fn tls_stream(
    port: u16,
    config: Arc<ClientConfig>,
    server_name: &str,
    limit: Duration,
) -> io::Result<rustls::StreamOwned<rustls::ClientConnection, TcpStream>> {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let tcp = TcpStream::connect_timeout(&addr, limit)?;
    tcp.set_read_timeout(Some(limit))?;
    tcp.set_write_timeout(Some(limit))?;
    let name = ServerName::try_from(server_name.to_string())
        .map_err(|err| io::Error::new(io::ErrorKind::InvalidInput, err))?;
    let conn = rustls::ClientConnection::new(config, name).map_err(io::Error::other)?;
    let mut stream = rustls::StreamOwned::new(conn, tcp);
    // Complete the handshake now, so that a refused certificate is an
    // error here rather than at the first read.
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock)?;
    }
    Ok(stream)
}

/// One Redis command over a fresh blocking TLS connection.
pub fn tls_query(
    port: u16,
    config: Arc<ClientConfig>,
    server_name: &str,
    args: &[&str],
    limit: Duration,
) -> io::Result<Reply> {
    let mut stream = tls_stream(port, config, server_name, limit)?;
    stream.write_all(&encode(args))?;
    stream.flush()?;
    let mut buf = Vec::new();
    loop {
        if let Some((reply, _)) =
            parse(&buf).map_err(|what| io::Error::new(io::ErrorKind::InvalidData, what))?
        {
            return Ok(reply);
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// An HTTP/1.0 GET over TLS on `127.0.0.1:port` (Patroni's REST API with
/// `restapi.certfile`): the status code and the body.
pub fn https_get(port: u16, config: Arc<ClientConfig>, path: &str) -> Option<(u16, String)> {
    let mut stream = tls_stream(port, config, "127.0.0.1", Duration::from_secs(5)).ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .ok()?;
    let mut raw = Vec::new();
    // Python's server closes without close_notify: keep what was read.
    let _ = stream.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_string()))
}
