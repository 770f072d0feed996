//! Cancel requests through the portal: a client's CancelRequest, sent on a
//! new connection over TLS (tokio-postgres, libpq 17) or in plaintext (libpq
//! before 17, psql's Ctrl-C), reaches the member that runs the query and
//! cancels it (SQLSTATE 57014). A CancelRequest with a key nobody issued
//! does nothing.

use crate::common;

use std::time::{Duration, Instant};

use common::pg::*;
use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_postgres::error::SqlState;

/// How long a cancelled `pg_sleep(30)` may take to return: generous, far
/// below the 30 s it would take uncancelled.
const CANCEL_DEADLINE: Duration = Duration::from_secs(10);

struct Setup {
    primary: PgServer,
    certs: Certs,
    ports: PgPorts,
    portal: Portal,
}

async fn setup() -> Setup {
    let primary = PgServer::primary();
    let certs = temp_certs();
    let config = PgPortalConfig::new(&certs, &[primary.port()]);
    let portal = Portal::start(&config.yaml()).await;
    portal.wait_roles("a", &[]).await;
    Setup {
        primary,
        certs,
        ports: config.ports,
        portal,
    }
}

/// Waits until the primary runs `query` in an active backend.
fn wait_running(primary: &PgServer, query: &str) {
    primary.wait_psql(
        &format!(
            "select count(*) > 0 from pg_stat_activity \
             where state = 'active' and query = '{}'",
            query.replace('\'', "''")
        ),
        "t",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_cancel_over_tls_cancels_the_query() {
    let s = setup().await;
    let client = pg_session(s.ports.rw, &s.certs).await;
    let token = client.cancel_token();

    let sleeping = tokio::spawn(async move {
        let result = client.simple_query("select pg_sleep(30)").await;
        (result, client)
    });
    wait_running(&s.primary, "select pg_sleep(30)");

    // The token connects to the portal like the session did (SSLRequest,
    // TLS) and sends the CancelRequest inside TLS.
    let sent = Instant::now();
    token
        .cancel_query(PgTls::new(&s.certs.ca))
        .await
        .unwrap_or_else(|err| panic!("cancel_query through the portal: {}", pg_error(&err)));
    let (result, client) = tokio::time::timeout(CANCEL_DEADLINE, sleeping)
        .await
        .unwrap_or_else(|_| {
            panic!("pg_sleep(30) still runs {CANCEL_DEADLINE:?} after the cancel request")
        })
        .expect("query task");
    let took = sent.elapsed();
    let err = match result {
        Ok(_) => panic!("pg_sleep(30) finished normally after a cancel ({took:?})"),
        Err(err) => err,
    };
    assert_eq!(
        err.code(),
        Some(&SqlState::QUERY_CANCELED),
        "want SQLSTATE 57014 (the cancel took {took:?}), got {}",
        pg_error(&err)
    );
    eprintln!("cancel over TLS: the query returned {took:?} after the cancel request");

    // Only the query was cancelled: the session goes on.
    assert_eq!(
        server_port_of(&client)
            .await
            .expect("the session after the cancel"),
        s.primary.port()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_cancel_request_cancels_the_query() {
    let s = setup().await;
    let mut session = raw_session(s.ports.rw, &s.certs).await;
    let (pid, key) = session
        .backend_key
        .expect("BackendKeyData through the portal");
    assert_eq!(
        session
            .query_value("select pg_backend_pid()")
            .await
            .unwrap_or_else(|err| panic!("{err}")),
        pid.to_string(),
        "the BackendKeyData pid is not the backend's"
    );

    session
        .send_query("select pg_sleep(30)")
        .await
        .expect("send the query");
    wait_running(&s.primary, "select pg_sleep(30)");

    // As libpq before 17 does: a new connection, no TLS, the 16 bytes.
    let sent = Instant::now();
    let mut tcp = TcpStream::connect(("127.0.0.1", s.ports.rw))
        .await
        .expect("connect for the cancel");
    tcp.write_all(&cancel_request(pid, key))
        .await
        .expect("send CancelRequest");
    let (answer, closed) = read_until_close(&mut tcp, DEADLINE).await;
    assert!(closed, "the portal kept the cancel connection open");
    assert!(
        answer.is_empty(),
        "a CancelRequest got an answer: {answer:?}"
    );

    let result = session.finish_query(CANCEL_DEADLINE).await;
    let took = sent.elapsed();
    match result {
        Err(RawError::Server(fields)) => assert_eq!(
            fields.code(),
            "57014",
            "want SQLSTATE 57014 (the cancel took {took:?}), got {fields}"
        ),
        other => panic!(
            "pg_sleep(30) after a plaintext cancel ({took:?} later): want 57014, got {:?}",
            other.map_err(|e| e.to_string())
        ),
    }
    eprintln!("plaintext cancel: the query returned {took:?} after the cancel request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_requests_with_unknown_keys_do_nothing() {
    let s = setup().await;
    let mut session = raw_session(s.ports.rw, &s.certs).await;
    let (pid, key) = session
        .backend_key
        .expect("BackendKeyData through the portal");

    session
        .send_query("select pg_sleep(5), 'survived'")
        .await
        .expect("send the query");
    wait_running(&s.primary, "select pg_sleep(5), 'survived'");

    // Keys nobody issued: a random pair, and the session's pid with a wrong
    // secret; in plaintext and inside TLS. Each connection is closed
    // without an answer, as PostgreSQL itself does.
    let random: (i32, i32) = (rand::random(), rand::random());
    let wrong_secret = (pid, key.wrapping_add(1));
    for (what, (p, k)) in [("random key", random), ("wrong secret", wrong_secret)] {
        let mut tcp = TcpStream::connect(("127.0.0.1", s.ports.rw))
            .await
            .expect("connect");
        tcp.write_all(&cancel_request(p, k)).await.expect("send");
        let (answer, closed) = read_until_close(&mut tcp, DEADLINE).await;
        assert!(closed, "plaintext cancel ({what}): connection left open");
        assert!(
            answer.is_empty(),
            "plaintext cancel ({what}) got an answer: {answer:?}"
        );

        let mut tls = ssl_request_connect(s.ports.rw, default_client_config(&s.certs.ca))
            .await
            .unwrap_or_else(|err| panic!("SSLRequest + TLS for a cancel: {err}"));
        tls.write_all(&cancel_request(p, k)).await.expect("send");
        tls.flush().await.expect("flush");
        let (answer, closed) = read_until_close(&mut tls, DEADLINE).await;
        assert!(closed, "TLS cancel ({what}): connection left open");
        assert!(
            answer.is_empty(),
            "TLS cancel ({what}) got an answer: {answer:?}"
        );
    }

    // The query ran to its end, and the session still works.
    let rows = session
        .finish_query(Duration::from_secs(20))
        .await
        .unwrap_or_else(|err| panic!("the query under foreign cancel requests: {err}"));
    assert_eq!(rows[0][1].as_deref(), Some("survived"));
    assert_eq!(
        session
            .query_value("select inet_server_port()")
            .await
            .unwrap_or_else(|err| panic!("{err}")),
        s.primary.port().to_string()
    );
    let mut portal = s.portal;
    assert!(portal.is_running(), "the portal died");
}

/// Sends `select pg_sleep(30)` on `client`, waits until `server` runs it,
/// cancels it with the client's token through the portal, and checks the
/// query ended with 57014.
async fn cancel_sleep_on(client: tokio_postgres::Client, server: &PgServer, certs: &Certs) {
    let token = client.cancel_token();
    let sleeping = tokio::spawn(async move { client.simple_query("select pg_sleep(30)").await });
    wait_running(server, "select pg_sleep(30)");
    token
        .cancel_query(PgTls::new(&certs.ca))
        .await
        .unwrap_or_else(|err| panic!("cancel_query through the portal: {}", pg_error(&err)));
    let result = tokio::time::timeout(CANCEL_DEADLINE, sleeping)
        .await
        .unwrap_or_else(|_| panic!("pg_sleep(30) still runs {CANCEL_DEADLINE:?} after the cancel"))
        .expect("query task");
    let err = result.expect_err("pg_sleep(30) finished normally after a cancel");
    assert_eq!(
        err.code(),
        Some(&SqlState::QUERY_CANCELED),
        "{}",
        pg_error(&err)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_a_session_on_the_standby_and_on_the_promoted_member() {
    let (primary, standby) = primary_and_standby();
    let certs = temp_certs();
    let config = PgPortalConfig::new(&certs, &[primary.port(), standby.port()]);
    let portal = Portal::start(&config.yaml()).await;
    portal.wait_roles("a", &["b"]).await;

    // A session on the standby (replicas endpoint): its cancel key routes
    // to the standby, not to the leader.
    let reader = pg_session(config.ports.ro, &certs).await;
    assert_eq!(server_port_of(&reader).await.expect("port"), standby.port());
    cancel_sleep_on(reader, &standby, &certs).await;

    // After a failover, a new session on the promoted member: its cancel
    // reaches the promoted member.
    standby.promote();
    wait_pg_reached(config.ports.rw, &certs, standby.port()).await;
    let writer = pg_session(config.ports.rw, &certs).await;
    assert_eq!(server_port_of(&writer).await.expect("port"), standby.port());
    cancel_sleep_on(writer, &standby, &certs).await;
    // The portal counts a cancel once the member has closed the cancel
    // connection, which can come after the client already saw 57014.
    for endpoint in ["ro", "rw"] {
        portal
            .wait_metric(
                "portal_cancel_requests_total",
                &[("endpoint", endpoint), ("outcome", "forwarded")],
                |v| v >= 1.0,
            )
            .await;
    }
    let text = portal.metrics().await;
    for endpoint in ["ro", "rw"] {
        let forwarded = metric(
            &text,
            "portal_cancel_requests_total",
            &[("endpoint", endpoint), ("outcome", "forwarded")],
        );
        assert_eq!(forwarded, Some(1.0), "{endpoint}: one cancel each: {text}");
    }
}
