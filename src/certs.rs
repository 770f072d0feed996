//! `portal certs init`: a self-signed CA and a server certificate, with rcgen.
//!
//! The CA is what the service hands to clients (`sslrootcert`, `--cacert`);
//! the server certificate names every host the portal answers as. Keys are
//! ECDSA P-256 and are written with mode 0600.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
pub const SERVER_CERT: &str = "server.crt";
pub const SERVER_KEY: &str = "server.key";

#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("{0} already exists; pass --force to replace the certificates in that directory")]
    Exists(PathBuf),
    #[error("at least one --host is required")]
    NoHosts,
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
}

/// What `init` wrote.
#[derive(Debug)]
pub struct Written {
    pub files: Vec<PathBuf>,
}

/// Generates the CA and a server certificate for `hosts` (DNS names or IP
/// addresses) into `dir`. Refuses to replace existing files unless `force`.
pub fn init(dir: &Path, hosts: &[String], days: u32, force: bool) -> Result<Written, CertsError> {
    if hosts.is_empty() {
        return Err(CertsError::NoHosts);
    }
    let paths: Vec<PathBuf> = [CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY]
        .iter()
        .map(|name| dir.join(name))
        .collect();
    if !force {
        if let Some(existing) = paths.iter().find(|p| p.exists()) {
            return Err(CertsError::Exists(existing.clone()));
        }
    }
    std::fs::create_dir_all(dir).map_err(|source| CertsError::Io {
        path: dir.to_path_buf(),
        source,
    })?;

    let now = OffsetDateTime::now_utc();
    let not_before = now - Duration::hours(1);

    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    let mut ca_name = DistinguishedName::new();
    // A distinct name per CA: clients that index trust stores by subject
    // (OpenSSL's hashed directories, say) must not confuse two of them.
    ca_name.push(DnType::CommonName, format!("portal CA {}", ca_tag(&ca_key)));
    ca_name.push(DnType::OrganizationName, "portal");
    ca_params.distinguished_name = ca_name;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca_params.not_before = not_before;
    ca_params.not_after = now + Duration::days(i64::from(days) + 365);
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let ca = Issuer::new(ca_params, &ca_key);

    let mut params = CertificateParams::new(hosts.to_vec())?;
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, hosts[0].as_str());
    params.distinguished_name = name;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = not_before;
    params.not_after = now + Duration::days(i64::from(days));
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca)?;

    write(&paths[0], ca_cert.pem().as_bytes(), 0o644)?;
    write(&paths[1], ca_key.serialize_pem().as_bytes(), 0o600)?;
    write(&paths[2], cert.pem().as_bytes(), 0o644)?;
    write(&paths[3], key.serialize_pem().as_bytes(), 0o600)?;
    Ok(Written { files: paths })
}

/// Eight hex digits taken from the CA's freshly generated public key.
fn ca_tag(key: &KeyPair) -> String {
    let raw = key.public_key_raw();
    // Skip the SEC1 point-format byte; the rest is uniformly random.
    raw.iter()
        .skip(1)
        .take(4)
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn write(path: &Path, contents: &[u8], mode: u32) -> Result<(), CertsError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let io = |source| CertsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    // `mode` applies only to new files; a replaced key must not stay readable.
    file.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(io)?;
    file.write_all(contents).map_err(io)?;
    file.sync_all().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn writes_a_ca_and_a_server_identity_rustls_accepts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let hosts = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        init(dir.path(), &hosts, 30, false).expect("init");
        for key in [CA_KEY, SERVER_KEY] {
            let mode = std::fs::metadata(dir.path().join(key))
                .expect("stat")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{key}");
        }
        let files = crate::config::TlsFiles {
            cert: dir.path().join(SERVER_CERT),
            key: dir.path().join(SERVER_KEY),
            ..Default::default()
        };
        crate::tls::server_config(&files, &[]).expect("rustls accepts the identity");
        assert!(matches!(
            init(dir.path(), &hosts, 30, false),
            Err(CertsError::Exists(_))
        ));
        init(dir.path(), &hosts, 30, true).expect("--force replaces");
    }
}
