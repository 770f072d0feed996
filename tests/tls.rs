//! TLS termination: who can talk to an endpoint and who cannot.

use crate::common;

use std::path::Path;
use std::process::Command;

use common::*;
use rustls::ProtocolVersion;

/// A single primary behind a portal; waits until it leads.
async fn portal_for(primary: &RedisServer, certs: &Certs) -> (Portal, Ports) {
    let config = PortalConfig::new(certs, &[primary.port()]);
    let portal = Portal::start(&config.yaml()).await;
    portal.wait_roles("a", &[]).await;
    (portal, config.ports)
}

/// Whether a handshake error is the client rejecting the server certificate.
fn is_certificate_rejection(err: &std::io::Error) -> bool {
    matches!(
        err.get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>()),
        Some(rustls::Error::InvalidCertificate(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_trusting_the_generated_ca_gets_pong() {
    let redis = RedisServer::start(None);
    let certs = temp_certs();
    let (_portal, ports) = portal_for(&redis, &certs).await;

    for name in ["localhost", "127.0.0.1"] {
        let tls = tls_connect(ports.rw, &certs.ca, name)
            .await
            .unwrap_or_else(|err| panic!("TLS as {name}: {err}"));
        let mut session = Resp::new(tls);
        let reply = session.cmd(&["PING"]).await.expect("PING");
        assert_eq!(reply, Reply::Simple("PONG".into()), "server name {name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_trusting_another_ca_is_refused() {
    let redis = RedisServer::start(None);
    let certs = temp_certs();
    let other = temp_certs();
    let (_portal, ports) = portal_for(&redis, &certs).await;

    let err = tls_connect(ports.rw, &other.ca, "localhost")
        .await
        .expect_err("a client trusting a different CA must not complete the handshake");
    assert!(
        is_certificate_rejection(&err),
        "expected a certificate rejection, got: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_server_name_is_refused() {
    let redis = RedisServer::start(None);
    let certs = temp_certs();
    let (_portal, ports) = portal_for(&redis, &certs).await;

    let err = tls_connect(ports.rw, &certs.ca, "wrong.example")
        .await
        .expect_err("the certificate is not valid for wrong.example");
    assert!(
        is_certificate_rejection(&err),
        "expected a certificate rejection, got: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls12_only_and_tls13_only_clients_both_work() {
    let redis = RedisServer::start(None);
    let certs = temp_certs();
    let (_portal, ports) = portal_for(&redis, &certs).await;

    for (version, expected) in [
        (&rustls::version::TLS12, ProtocolVersion::TLSv1_2),
        (&rustls::version::TLS13, ProtocolVersion::TLSv1_3),
    ] {
        let config = client_config(&certs.ca, &[version]);
        let tls = tls_connect_with(ports.rw, config, "localhost")
            .await
            .unwrap_or_else(|err| panic!("{expected:?} handshake: {err}"));
        assert_eq!(tls.get_ref().1.protocol_version(), Some(expected));
        let mut session = Resp::new(tls);
        let reply = session.cmd(&["PING"]).await.expect("PING");
        assert_eq!(reply, Reply::Simple("PONG".into()), "over {expected:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls11_client_hello_gets_no_server_hello() {
    let redis = RedisServer::start(None);
    let certs = temp_certs();
    let (portal, ports) = portal_for(&redis, &certs).await;

    // Control: the same hand-made hello saying TLS 1.2 gets a ServerHello
    // (a handshake record whose first message is type 2), so the refusal
    // below is about the version and nothing else.
    let (answer, ending) = exchange_raw(ports.rw, &client_hello(0x0303), 6).await;
    assert_eq!(ending, Ending::Enough, "{answer:02x?}");
    assert!(
        answer.len() >= 6 && answer[0] == 0x16 && answer[5] == 0x02,
        "the crafted TLS 1.2 hello should get a ServerHello, got {:02x?}",
        &answer[..answer.len().min(16)]
    );

    // Whatever comes back before the close: an alert record, or nothing.
    let (answer, ending) = exchange_raw(ports.rw, &client_hello(0x0302), usize::MAX).await;
    assert_eq!(ending, Ending::Closed, "the TLS 1.1 client was not dropped");
    assert!(
        answer.is_empty() || answer[0] == 0x15,
        "a TLS 1.1 hello must get an alert or a close, not {:02x?}",
        &answer[..answer.len().min(16)]
    );
    // A fatal (2) protocol_version (70) alert, as the README says.
    assert_eq!(
        answer.get(5..7),
        Some(&[2u8, 70][..]),
        "alert {:02x?}",
        &answer[..answer.len().min(16)]
    );

    portal
        .wait_metric(
            "portal_tls_handshake_failures_total",
            &[("endpoint", "rw"), ("reason", "protocol_version")],
            |v| v >= 1.0,
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_redis_cli_with_tls_gets_pong() {
    let redis = RedisServer::start(None);
    let certs = temp_certs();
    let (_portal, ports) = portal_for(&redis, &certs).await;

    let out = tokio::process::Command::new("redis-cli")
        .arg("--tls")
        .arg("--cacert")
        .arg(&certs.ca)
        .args(["-h", "127.0.0.1", "-p", &ports.rw.to_string(), "PING"])
        .output()
        .await
        .expect("run redis-cli");
    assert!(out.status.success(), "redis-cli: {out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "PONG",
        "redis-cli stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Makes an RSA CA and an RSA server certificate for localhost/127.0.0.1
/// with the openssl command line; `pkcs1` writes the server key in the
/// traditional `BEGIN RSA PRIVATE KEY` form instead of PKCS#8.
fn openssl_rsa_certs(dir: &Path, pkcs1: bool) {
    let run = |args: &str| {
        let out = Command::new("openssl")
            .args(args.split_whitespace())
            .current_dir(dir)
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "openssl {args}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
         keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    )
    .expect("write server.ext");
    run(
        "req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 2 \
         -subj /CN=portal-test-RSA-CA -addext basicConstraints=critical,CA:TRUE \
         -addext keyUsage=critical,keyCertSign,cRLSign",
    );
    run("req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=localhost");
    run(
        "x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
         -out server.crt -days 2 -extfile server.ext",
    );
    if pkcs1 {
        run("rsa -in server.key -traditional -out server.pkcs1.key");
        std::fs::rename(dir.join("server.pkcs1.key"), dir.join("server.key")).expect("rename");
        let key = std::fs::read_to_string(dir.join("server.key")).expect("read key");
        assert!(key.contains("BEGIN RSA PRIVATE KEY"), "not PKCS#1: {key}");
    }
}

async fn rsa_server_key_works(pkcs1: bool) {
    let redis = RedisServer::start(None);
    let certs = temp_certs();
    let rsa = tempfile::TempDir::new().expect("temp dir");
    openssl_rsa_certs(rsa.path(), pkcs1);

    let config = PortalConfig::new(&certs, &[redis.port()]).tls_files(
        &rsa.path().join("server.crt"),
        &rsa.path().join("server.key"),
    );
    let portal = Portal::start(&config.yaml()).await;
    portal.wait_roles("a", &[]).await;

    let ca = rsa.path().join("ca.crt");
    for (version, expected) in [
        (&rustls::version::TLS12, ProtocolVersion::TLSv1_2),
        (&rustls::version::TLS13, ProtocolVersion::TLSv1_3),
    ] {
        let tls = tls_connect_with(config.ports.rw, client_config(&ca, &[version]), "localhost")
            .await
            .unwrap_or_else(|err| panic!("RSA certificate over {expected:?}: {err}"));
        let mut session = Resp::new(tls);
        let reply = session.cmd(&["PING"]).await.expect("PING");
        assert_eq!(reply, Reply::Simple("PONG".into()));
    }

    // The portal's own CA does not vouch for the RSA certificate.
    let err = tls_connect(config.ports.rw, &certs.ca, "localhost")
        .await
        .expect_err("the generated CA did not sign the RSA certificate");
    assert!(is_certificate_rejection(&err), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsa_server_key_pkcs8_works() {
    rsa_server_key_works(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsa_server_key_pkcs1_works() {
    rsa_server_key_works(true).await;
}
