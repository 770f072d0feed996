//! Client certificates (mTLS) per endpoint (`tls.client_ca`), with a real
//! `redis-server` and PostgreSQL behind the portal and real clients: rustls
//! with and without a certificate, `redis-cli --cert/--key`, `psql
//! sslcert=/sslkey=`. The client CAs and certificates are made here with
//! rcgen: one "clients" CA the endpoint trusts, one "other" CA it does
//! not.
//!
//! What is attacked: a client without a certificate, or with one from
//! another CA, must not get a session (nor a connection to the member),
//! over TLS 1.3 (where the client's side of the handshake completes before
//! the server has checked its certificate) and TLS 1.2; `client_auth:
//! optional` lets anonymous clients in but still refuses a bad
//! certificate; SIGHUP re-reads the CA file.

use crate::common;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::pg::*;
use common::*;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, SupportedProtocolVersion};
use tempfile::TempDir;

/// A client CA and one client certificate it signed, as PEM files.
struct ClientPki {
    _dir: TempDir,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    /// The client certificate's common name.
    name: String,
}

/// A CA named `NAME CA` and a client certificate `NAME-app` (extended key
/// usage: client authentication) signed by it.
fn client_pki(name: &str) -> ClientPki {
    let dir = TempDir::new().expect("temp dir");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("{name} CA"));
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key"))
        .expect("CA certificate");

    let app = format!("{name}-app");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("client params");
    params.distinguished_name.push(DnType::CommonName, &app);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate().expect("client key");
    let cert = params.signed_by(&key, &ca).expect("client certificate");

    let write = |file: &str, text: String| {
        let path = dir.path().join(file);
        std::fs::write(&path, text).expect("write PEM");
        path
    };
    let ca_path = write("ca.crt", ca.pem());
    let cert_path = write("client.crt", cert.pem());
    let key_path = write("client.key", key.serialize_pem());
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600))
            .expect("chmod client key");
    }
    ClientPki {
        _dir: dir,
        ca: ca_path,
        cert: cert_path,
        key: key_path,
        name: app,
    }
}

/// A rustls client trusting the portal's CA, offering `versions`, with the
/// client certificate of `pki` when given.
fn client_with(
    portal_ca: &Path,
    versions: &[&'static SupportedProtocolVersion],
    pki: Option<&ClientPki>,
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(portal_ca).expect("portal CA") {
        roots.add(cert.expect("CA PEM")).expect("CA accepted");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .expect("versions")
        .with_root_certificates(roots);
    Arc::new(match pki {
        None => builder.with_no_client_auth(),
        Some(pki) => {
            let chain = CertificateDer::pem_file_iter(&pki.cert)
                .expect("client certificate")
                .collect::<Result<Vec<_>, _>>()
                .expect("client certificate PEM");
            let key = PrivateKeyDer::from_pem_file(&pki.key).expect("client key");
            builder
                .with_client_auth_cert(chain, key)
                .expect("client certificate and key")
        }
    })
}

const BOTH: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13, &rustls::version::TLS12];
const TLS12: &[&SupportedProtocolVersion] = &[&rustls::version::TLS12];

/// `PING` through the endpoint on `port`: the reply, or the error (a
/// failed handshake, or, over TLS 1.3, the alert that ends the connection
/// at the first read).
async fn ping(port: u16, config: Arc<ClientConfig>) -> Result<Reply, String> {
    let tls = tls_connect_with(port, config, "localhost")
        .await
        .map_err(|err| format!("handshake: {err}"))?;
    let mut session = Resp::new(tls);
    session
        .cmd_within(&["PING"], Duration::from_secs(5))
        .await
        .map_err(|err| format!("PING: {err}"))
}

/// `PortalConfig`'s YAML with `lines` added to every endpoint's `tls`
/// block (after its `key:`).
fn with_tls_lines(config: &PortalConfig, lines: &str) -> String {
    let key = format!("          key: {}\n", config.key.display());
    let yaml = config.yaml();
    assert!(yaml.contains(&key), "no tls key line in:\n{yaml}");
    yaml.replace(&key, &format!("{key}{lines}"))
}

async fn redis_cli(
    port: u16,
    portal_ca: &Path,
    pki: Option<&ClientPki>,
) -> io::Result<(bool, String)> {
    let mut command = tokio::process::Command::new("redis-cli");
    command.arg("--tls").arg("--cacert").arg(portal_ca);
    if let Some(pki) = pki {
        command
            .arg("--cert")
            .arg(&pki.cert)
            .arg("--key")
            .arg(&pki.key);
    }
    command.args(["-h", "localhost", "-p", &port.to_string(), "PING"]);
    command.kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(20), command.output())
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "redis-cli"))??;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_clients_with_a_certificate_from_the_client_ca_get_in() {
    let redis = RedisServer::start(None);
    let certs = temp_certs();
    let clients = client_pki("clients");
    let other = client_pki("other");
    let config = PortalConfig::new(&certs, &[redis.port()]).endpoint_key("access_log: true");
    let yaml = with_tls_lines(
        &config,
        &format!("          client_ca: {}\n", clients.ca.display()),
    );
    let rw = config.ports.rw;
    let portal = Portal::start(&yaml).await;
    portal.wait_roles("a", &[]).await;
    let before = info_number(redis.port(), "stats", "total_connections_received");

    // Refused, over TLS 1.3 and 1.2: no certificate, one from another CA,
    // and the portal's own server certificate's CA (not a client CA).
    for (what, config) in [
        (
            "no certificate, TLS 1.3",
            client_with(&certs.ca, BOTH, None),
        ),
        (
            "no certificate, TLS 1.2",
            client_with(&certs.ca, TLS12, None),
        ),
        (
            "another CA's certificate, TLS 1.3",
            client_with(&certs.ca, BOTH, Some(&other)),
        ),
        (
            "another CA's certificate, TLS 1.2",
            client_with(&certs.ca, TLS12, Some(&other)),
        ),
    ] {
        let result = ping(rw, config).await;
        assert!(result.is_err(), "{what}: {result:?}");
    }
    let (ok, out) = redis_cli(rw, &certs.ca, None).await.expect("redis-cli");
    assert!(
        !out.contains("PONG"),
        "redis-cli without a certificate: {ok} {out}"
    );
    let after = info_number(redis.port(), "stats", "total_connections_received");
    let probe_failures =
        metric(&portal.metrics().await, "portal_probe_failures_total", &[]).unwrap_or(0.0) as u64;
    assert!(
        after <= before + 1 + probe_failures,
        "a client without a valid certificate reached the member ({before} -> {after})"
    );
    portal
        .wait_metric(
            "portal_tls_handshake_failures_total",
            &[("endpoint", "rw"), ("reason", "certificate")],
            |v| v >= 5.0,
        )
        .await;
    let log = portal.stderr_log();
    assert!(log.contains("TLS handshake failed"), "{log}");

    // Admitted: the client CA's certificate, over both versions, and
    // redis-cli with --cert/--key.
    for versions in [BOTH, TLS12] {
        assert_eq!(
            ping(rw, client_with(&certs.ca, versions, Some(&clients))).await,
            Ok(Reply::Simple("PONG".into()))
        );
    }
    let (ok, out) = redis_cli(rw, &certs.ca, Some(&clients))
        .await
        .expect("redis-cli");
    assert!(ok && out.trim() == "PONG", "redis-cli --cert --key: {out}");

    // The access log names the certificate's subject.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let log = portal.stderr_log();
        if let Some(line) = log
            .lines()
            .find(|l| l.contains("portal::access") && l.contains("client_cert="))
        {
            assert!(line.contains(&format!("CN={}", clients.name)), "{line}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no access-log line with client_cert:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn optional_client_auth_admits_anonymous_clients_but_no_bad_certificate() {
    let redis = RedisServer::start(None);
    let certs = temp_certs();
    let clients = client_pki("clients");
    let other = client_pki("other");
    let config = PortalConfig::new(&certs, &[redis.port()]);
    let yaml = with_tls_lines(
        &config,
        &format!(
            "          client_ca: {}\n          client_auth: optional\n",
            clients.ca.display()
        ),
    );
    let rw = config.ports.rw;
    let portal = Portal::start(&yaml).await;
    portal.wait_roles("a", &[]).await;

    assert_eq!(
        ping(rw, client_with(&certs.ca, BOTH, None)).await,
        Ok(Reply::Simple("PONG".into())),
        "an anonymous client"
    );
    assert_eq!(
        ping(rw, client_with(&certs.ca, BOTH, Some(&clients))).await,
        Ok(Reply::Simple("PONG".into())),
        "the client CA's certificate"
    );
    let bad = ping(rw, client_with(&certs.ca, BOTH, Some(&other))).await;
    assert!(bad.is_err(), "another CA's certificate: {bad:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_re_reads_the_client_ca() {
    let redis = RedisServer::start(None);
    let certs = temp_certs();
    let first = client_pki("first");
    let second = client_pki("second");
    // The endpoint's CA file, which the test rewrites.
    let dir = TempDir::new().expect("temp dir");
    let ca_file = dir.path().join("clients-ca.crt");
    std::fs::copy(&first.ca, &ca_file).expect("copy CA");
    let config = PortalConfig::new(&certs, &[redis.port()]);
    let yaml = with_tls_lines(
        &config,
        &format!("          client_ca: {}\n", ca_file.display()),
    );
    let rw = config.ports.rw;
    let portal = Portal::start(&yaml).await;
    portal.wait_roles("a", &[]).await;
    let pong = Ok(Reply::Simple("PONG".into()));
    assert_eq!(
        ping(rw, client_with(&certs.ca, BOTH, Some(&first))).await,
        pong
    );
    assert!(ping(rw, client_with(&certs.ca, BOTH, Some(&second)))
        .await
        .is_err());

    // Same path, another CA in it: a reload re-reads it.
    std::fs::copy(&second.ca, &ca_file).expect("replace the CA");
    portal.signal("HUP");
    portal
        .wait_metric("portal_reloads_total", &[("result", "ok")], |v| v >= 1.0)
        .await;
    assert_eq!(
        ping(rw, client_with(&certs.ca, BOTH, Some(&second))).await,
        pong
    );
    assert!(ping(rw, client_with(&certs.ca, BOTH, Some(&first)))
        .await
        .is_err());

    // A CA file that no longer holds a certificate: the reload is refused
    // and the running verifier stays.
    std::fs::write(&ca_file, "not a certificate\n").expect("break the CA file");
    portal.signal("HUP");
    portal
        .wait_metric("portal_reloads_total", &[("result", "failed")], |v| {
            v >= 1.0
        })
        .await;
    assert_eq!(
        ping(rw, client_with(&certs.ca, BOTH, Some(&second))).await,
        pong
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_with_a_client_certificate_gets_in_and_without_one_does_not() {
    let primary = PgServer::primary();
    let certs = temp_certs();
    let clients = client_pki("clients");
    let config = PgPortalConfig::new(&certs, &[primary.port()]);
    let key = format!("          key: {}\n", certs.key.display());
    let yaml = config.yaml().replace(
        &key,
        &format!("{key}          client_ca: {}\n", clients.ca.display()),
    );
    let portal = Portal::start(&yaml).await;
    portal.wait_roles("a", &[]).await;
    let conninfo = portal_conninfo(config.ports.rw, &certs.ca);

    let with_cert = format!(
        "{conninfo} sslcert={} sslkey={}",
        clients.cert.display(),
        clients.key.display()
    );
    let out = psql(&with_cert, "select inet_server_port()").await;
    assert!(out.success(), "psql with a client certificate: {out:?}");
    assert_eq!(out.stdout, primary.port().to_string());

    // No certificate (sslcert pointing nowhere, so that libpq does not
    // pick up ~/.postgresql/postgresql.crt).
    let without = format!("{conninfo} sslcert=/nonexistent/none.crt sslkey=/nonexistent/none.key");
    let out = psql(&without, "select 1").await;
    assert!(
        !out.success(),
        "psql without a client certificate got in: {out:?}"
    );
    portal
        .wait_metric(
            "portal_tls_handshake_failures_total",
            &[("endpoint", "rw"), ("reason", "certificate")],
            |v| v >= 1.0,
        )
        .await;
}
