//! PostgreSQL clients reach the primary through the portal over TLS the
//! portal terminates, however they open: `SSLRequest` (libpq, tokio-postgres),
//! direct TLS with ALPN `postgresql` (libpq 17), `GSSENCRequest` first. A
//! client that does not ask for TLS gets a readable error, and a client that
//! does not trust the portal's CA does not get in.

use crate::common;

use std::time::Duration;

use common::pg::*;
use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_postgres::config::{SslMode, SslNegotiation};
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

struct Setup {
    primary: PgServer,
    certs: Certs,
    ports: PgPorts,
    portal: Portal,
}

/// A lone primary `a` and a portal that sees it as the leader; the `plain`
/// endpoint (which allows plaintext) when `plaintext_endpoint`.
async fn setup(plaintext_endpoint: bool) -> Setup {
    let primary = PgServer::primary();
    let certs = temp_certs();
    let mut config = PgPortalConfig::new(&certs, &[primary.port()]);
    if plaintext_endpoint {
        config = config.with_plaintext_endpoint();
    }
    let portal = Portal::start(&config.yaml()).await;
    portal.wait_roles("a", &[]).await;
    Setup {
        primary,
        certs,
        ports: config.ports,
        portal,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_with_verify_full_runs_queries_on_the_primary() {
    let s = setup(false).await;
    let conninfo = portal_conninfo(s.ports.rw, &s.certs.ca);

    let one = psql(&conninfo, "select 1").await;
    assert!(one.success(), "psql {conninfo:?}: {one:?}");
    assert_eq!(one.stdout, "1");

    let port = psql(&conninfo, "select inet_server_port()").await;
    assert!(port.success(), "{port:?}");
    assert_eq!(port.stdout, s.primary.port().to_string());

    // psql's own view of the connection: TLS to "localhost", i.e. the portal.
    let info = psql(&conninfo, "\\conninfo").await;
    assert!(info.success(), "{info:?}");
    assert!(
        info.stdout.contains("SSL connection (protocol: TLSv1."),
        "psql does not report a TLS connection: {}",
        info.stdout
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_tls_gets_a_readable_error() {
    let s = setup(true).await;

    // psql with sslmode=disable: refused with a message that says why.
    let conninfo = format!(
        "host=localhost port={} sslmode=disable user=postgres dbname=postgres",
        s.ports.rw
    );
    let out = psql(&conninfo, "select 1").await;
    assert!(
        !out.success(),
        "psql without TLS got through the rw endpoint: {out:?}"
    );
    assert!(
        out.stderr.contains("TLS"),
        "psql's error does not mention TLS: {}",
        out.stderr
    );

    // The same through tokio-postgres, where the SQLSTATE is visible.
    let mut config = pg_config(s.ports.rw);
    config.ssl_mode(SslMode::Disable);
    let err = match pg_connect_with(&config, NoTls).await {
        Ok(_) => panic!("tokio-postgres without TLS got through the rw endpoint"),
        Err(err) => err,
    };
    assert_eq!(
        err.code(),
        Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION),
        "want SQLSTATE 28000, got {}",
        pg_error(&err)
    );

    // By hand: a plaintext StartupMessage gets a FATAL ErrorResponse 28000
    // naming TLS, then the portal closes the connection.
    let mut tcp = TcpStream::connect(("127.0.0.1", s.ports.rw))
        .await
        .expect("connect");
    tcp.write_all(&startup_message("postgres", "postgres"))
        .await
        .expect("send StartupMessage");
    let (answer, closed) = read_until_close(&mut tcp, DEADLINE).await;
    let fields = error_response_in(&answer)
        .unwrap_or_else(|| panic!("no ErrorResponse to a plaintext StartupMessage: {answer:?}"));
    assert_eq!(fields.code(), "28000", "{fields}");
    assert_eq!(fields.severity(), "FATAL", "{fields}");
    assert!(fields.message().contains("TLS"), "{fields}");
    assert!(closed, "the portal kept the refused connection open");

    // Where the configuration allows plaintext, the same client gets in.
    let plain = s.ports.plain.expect("plain endpoint");
    let conninfo =
        format!("host=localhost port={plain} sslmode=disable user=postgres dbname=postgres");
    let out = psql(&conninfo, "select inet_server_port()").await;
    assert!(
        out.success(),
        "psql without TLS on the allow_plaintext endpoint: {out:?}"
    );
    assert_eq!(out.stdout, s.primary.port().to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_trusting_another_ca_fails_verification() {
    let s = setup(false).await;
    let other = temp_certs();

    // Another portal's CA has the same name as ours ("portal CA"), so
    // OpenSSL may take it for the issuer and fail on the signature rather
    // than on the lookup: either way, a TLS error, not a session.
    let out = psql(&portal_conninfo(s.ports.rw, &other.ca), "select 1").await;
    assert!(
        !out.success(),
        "psql verified the portal against another portal's CA: {out:?}"
    );
    assert!(
        out.stderr.contains("SSL error") || out.stderr.contains("certificate verify failed"),
        "psql's error is not a TLS failure: {}",
        out.stderr
    );

    // A CA with another name: the classic verification failure.
    let stranger = other.dir.join("stranger-ca.crt");
    std::fs::write(&stranger, stranger_ca_pem()).expect("write stranger CA");
    let out = psql(&portal_conninfo(s.ports.rw, &stranger), "select 1").await;
    assert!(
        !out.success(),
        "psql verified the portal against an unrelated CA: {out:?}"
    );
    assert!(
        out.stderr.contains("certificate verify failed"),
        "psql's error is not a verification failure: {}",
        out.stderr
    );

    match pg_connect_with(&pg_config(s.ports.rw), PgTls::new(&other.ca)).await {
        Ok(_) => panic!("tokio-postgres verified the portal against an unrelated CA"),
        Err(err) => {
            let text = pg_error(&err);
            assert!(
                text.contains("certificate") || text.contains("UnknownIssuer"),
                "not a certificate error: {text}"
            );
        }
    }

    // Both clients abort the handshake; the portal counts it.
    s.portal
        .wait_metric(
            "portal_tls_handshake_failures_total",
            &[("endpoint", "rw")],
            |v| v >= 1.0,
        )
        .await;

    // And the right CA still works.
    let out = psql(&portal_conninfo(s.ports.rw, &s.certs.ca), "select 1").await;
    assert!(out.success(), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_over_tls_through_the_portal() {
    let s = setup(false).await;
    let client = pg_session(s.ports.rw, &s.certs).await;

    assert_eq!(
        server_port_of(&client).await.expect("inet_server_port"),
        s.primary.port()
    );

    // The extended protocol with parameters, a write and a read back.
    client
        .batch_execute("create table t (id int primary key, note text)")
        .await
        .expect("create table");
    let inserted = client
        .execute(
            "insert into t select g, $1 || g from generate_series(1, $2::int) g",
            &[&"row ", &5000i32],
        )
        .await
        .expect("insert");
    assert_eq!(inserted, 5000);
    let row = client
        .query_one(
            "select count(*), max(note) from t where id <= $1",
            &[&4000i32],
        )
        .await
        .expect("select");
    assert_eq!(row.get::<_, i64>(0), 4000);
    assert_eq!(row.get::<_, String>(1), "row 999");

    // A result larger than a few TLS records crosses the splice intact.
    let rows = client
        .query("select id, note from t order by id", &[])
        .await
        .expect("select all");
    assert_eq!(rows.len(), 5000);
    assert!(rows
        .iter()
        .enumerate()
        .all(|(i, r)| r.get::<_, i32>(0) == i as i32 + 1
            && r.get::<_, String>(1) == format!("row {}", i + 1)));

    // The write is on the primary itself.
    assert_eq!(s.primary.psql("select count(*) from t"), "5000");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_tls_needs_alpn_postgresql() {
    let s = setup(false).await;

    // libpq 17's `sslnegotiation=direct`, when this psql has it.
    let (version, major) = psql_version();
    if major >= 17 {
        let conninfo = format!(
            "{} sslnegotiation=direct",
            portal_conninfo(s.ports.rw, &s.certs.ca)
        );
        let out = psql(&conninfo, "select inet_server_port()").await;
        assert!(out.success(), "psql with direct TLS: {out:?}");
        assert_eq!(out.stdout, s.primary.port().to_string());
    } else {
        eprintln!(
            "note: {version} predates sslnegotiation=direct (libpq 17); \
             direct TLS is tested with rustls and tokio-postgres only"
        );
    }

    // A ClientHello as the very first bytes, offering ALPN `postgresql`,
    // then a StartupMessage inside TLS: AuthenticationOk, ParameterStatus,
    // BackendKeyData, ReadyForQuery from the primary.
    let tls = tls_connect_with(
        s.ports.rw,
        pg_client_config(&s.certs.ca, Some(b"postgresql")),
        "localhost",
    )
    .await
    .expect("direct TLS handshake with ALPN postgresql");
    assert_eq!(
        tls.get_ref().1.alpn_protocol(),
        Some(&b"postgresql"[..]),
        "the portal did not select ALPN postgresql"
    );
    let mut raw = RawPg::startup(tls)
        .await
        .unwrap_or_else(|err| panic!("startup over direct TLS: {err}"));
    assert!(
        raw.parameters.contains_key("server_version"),
        "no ParameterStatus server_version: {:?}",
        raw.parameters
    );
    assert!(raw.backend_key.is_some(), "no BackendKeyData");
    assert_eq!(
        raw.query_value("select inet_server_port()")
            .await
            .unwrap_or_else(|err| panic!("{err}")),
        s.primary.port().to_string()
    );

    // tokio-postgres with sslnegotiation=direct.
    let mut config = pg_config(s.ports.rw);
    config.ssl_negotiation(SslNegotiation::Direct);
    let client = pg_connect_with(&config, PgTls::with_alpn(&s.certs.ca))
        .await
        .unwrap_or_else(|err| panic!("tokio-postgres direct TLS: {}", pg_error(&err)));
    assert_eq!(
        server_port_of(&client).await.expect("inet_server_port"),
        s.primary.port()
    );

    // Direct TLS without ALPN, or with another protocol, is not served.
    for alpn in [None, Some(&b"h2"[..])] {
        let what = format!("direct TLS with ALPN {alpn:?}");
        match tls_connect_with(s.ports.rw, pg_client_config(&s.certs.ca, alpn), "localhost").await {
            Err(_) => {}
            Ok(tls) => match RawPg::startup(tls).await {
                Ok(_) => panic!("{what} was served"),
                Err(RawError::Server(fields)) => {
                    assert_eq!(fields.severity(), "FATAL", "{what}: {fields}")
                }
                Err(_) => {}
            },
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gssenc_request_is_declined_then_ssl_request_proceeds() {
    let s = setup(false).await;

    // libpq sends GSSENCRequest first only when it holds Kerberos
    // credentials, which this machine has not: speak it by hand.
    let mut tcp = TcpStream::connect(("127.0.0.1", s.ports.rw))
        .await
        .expect("connect");
    tcp.write_all(&gssenc_request())
        .await
        .expect("send GSSENCRequest");
    let answer = read_exactly(&mut tcp, 1).await;
    assert_eq!(answer, b"N", "GSSENCRequest answer");

    tcp.write_all(&ssl_request())
        .await
        .expect("send SSLRequest");
    let answer = read_exactly(&mut tcp, 1).await;
    assert_eq!(answer, b"S", "SSLRequest answer after GSSENCRequest");

    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let tls = tokio_rustls::TlsConnector::from(default_client_config(&s.certs.ca))
        .connect(name, tcp)
        .await
        .expect("TLS handshake after GSSENCRequest + SSLRequest");
    let mut raw = RawPg::startup(tls)
        .await
        .unwrap_or_else(|err| panic!("startup after GSSENCRequest + SSLRequest: {err}"));
    assert_eq!(
        raw.query_value("select inet_server_port()")
            .await
            .unwrap_or_else(|err| panic!("{err}")),
        s.primary.port().to_string()
    );

    // psql with gssencmode=prefer (its default) still connects.
    let conninfo = format!(
        "{} gssencmode=prefer",
        portal_conninfo(s.ports.rw, &s.certs.ca)
    );
    let out = psql(&conninfo, "select 1").await;
    assert!(out.success(), "{out:?}");
}

/// A self-signed CA certificate (PEM) named "stranger CA", unrelated to
/// the portal's.
fn stranger_ca_pem() -> String {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "stranger CA");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let key = rcgen::KeyPair::generate().expect("CA key");
    params.self_signed(&key).expect("self-signed CA").pem()
}

/// Reads exactly `n` bytes, within 10 s.
async fn read_exactly(tcp: &mut TcpStream, n: usize) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; n];
    tokio::time::timeout(Duration::from_secs(10), tcp.read_exact(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("no {n}-byte answer within 10 s"))
        .unwrap_or_else(|err| panic!("reading a {n}-byte answer: {err}"));
    buf
}
