//! Routing for a PostgreSQL cluster: `rw` reaches the primary, `ro` the
//! streaming standby (falling back to the primary when no standby
//! qualifies), and with no leader a client on `rw` is told so in
//! PostgreSQL's own terms (SQLSTATE 57P03) after `hold_timeout`.

use crate::common;

use std::time::{Duration, Instant};

use common::pg::*;
use common::*;
use tokio_postgres::error::SqlState;

struct Setup {
    primary: PgServer,
    standby: PgServer,
    certs: Certs,
    ports: PgPorts,
    portal: Portal,
}

/// A primary `a`, its streaming standby `b`, and a portal that sees them so.
async fn setup(config: impl FnOnce(PgPortalConfig) -> PgPortalConfig) -> Setup {
    let (primary, standby) = primary_and_standby();
    let certs = temp_certs();
    let config = config(PgPortalConfig::new(
        &certs,
        &[primary.port(), standby.port()],
    ));
    let portal = Portal::start(&config.yaml()).await;
    portal.wait_roles("a", &["b"]).await;
    Setup {
        primary,
        standby,
        certs,
        ports: config.ports,
        portal,
    }
}

async fn in_recovery(client: &tokio_postgres::Client) -> bool {
    client
        .query_one("select pg_is_in_recovery()", &[])
        .await
        .expect("pg_is_in_recovery()")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_reach_the_primary_and_reads_the_standby() {
    let s = setup(|c| c).await;

    let rw = pg_session(s.ports.rw, &s.certs).await;
    assert_eq!(server_port_of(&rw).await.expect("port"), s.primary.port());
    assert!(!in_recovery(&rw).await, "rw reached a server in recovery");
    rw.batch_execute(
        "create table routed (id int primary key, v text); \
         insert into routed values (1, 'written through rw')",
    )
    .await
    .expect("write through rw");
    assert_eq!(
        s.primary.psql("select v from routed where id = 1"),
        "written through rw"
    );

    let ro = pg_session(s.ports.ro, &s.certs).await;
    assert_eq!(server_port_of(&ro).await.expect("port"), s.standby.port());
    assert!(
        in_recovery(&ro).await,
        "ro reached a server not in recovery"
    );

    // The row replicates and becomes visible through ro.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let rows = ro
            .query("select v from routed where id = 1", &[])
            .await
            .map(|rows| {
                rows.iter()
                    .map(|r| r.get::<_, String>(0))
                    .collect::<Vec<_>>()
            });
        match rows {
            Ok(v) if v == ["written through rw"] => break,
            other => assert!(
                Instant::now() < deadline,
                "the row written through rw is not visible through ro within {DEADLINE:?}: \
                 {:?}",
                other.map_err(|e| pg_error(&e))
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // ro is read-only because the standby is.
    let err = ro
        .batch_execute("insert into routed values (2, 'through ro')")
        .await
        .expect_err("a write through ro succeeded");
    assert_eq!(
        err.code(),
        Some(&SqlState::READ_ONLY_SQL_TRANSACTION),
        "{}",
        pg_error(&err)
    );

    // /status shows the standby's lag, once known.
    s.portal
        .wait_for("lag_bytes of the standby in /status", |st| {
            member(st, "b")["lag_bytes"].is_u64()
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_endpoint_falls_back_to_the_primary_when_the_standby_stops() {
    let mut s = setup(|c| c).await;
    wait_pg_reached(s.ports.ro, &s.certs, s.standby.port()).await;

    s.standby.stop_immediate();
    s.portal.wait_roles("a", &[]).await;

    // replica_fallback defaults to `leader`.
    wait_pg_reached(s.ports.ro, &s.certs, s.primary.port()).await;
    let ro = pg_session(s.ports.ro, &s.certs).await;
    assert!(!in_recovery(&ro).await);

    // The standby comes back and takes the reads again.
    s.standby.start();
    s.standby.wait_streaming();
    s.portal.wait_roles("a", &["b"]).await;
    wait_pg_reached(s.ports.ro, &s.certs, s.standby.port()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_lagging_past_max_lag_gets_no_reads() {
    let s = setup(|c| c.max_lag("{bytes: 65536}")).await;
    wait_pg_reached(s.ports.ro, &s.certs, s.standby.port()).await;

    // The standby keeps receiving WAL but stops replaying it: what it
    // serves falls behind the primary by megabytes.
    s.standby.psql("select pg_wal_replay_pause()");
    s.primary.psql(
        "create table filler as select g, repeat('x', 200) as pad \
         from generate_series(1, 20000) g",
    );
    s.portal
        .wait_for("the standby's lag_bytes over 65536", |st| {
            member(st, "b")["lag_bytes"].as_u64() > Some(65536)
        })
        .await;

    // No standby qualifies: ro falls back to the primary.
    wait_pg_reached(s.ports.ro, &s.certs, s.primary.port()).await;

    // Replay resumes, the standby catches up and serves reads again.
    s.standby.psql("select pg_wal_replay_resume()");
    s.standby.wait_psql("select count(*) from filler", "20000");
    wait_pg_reached(s.ports.ro, &s.certs, s.standby.port()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_leader_the_client_gets_57p03_after_hold_timeout() {
    let mut s = setup(|c| c.hold_timeout("1s")).await;

    // The primary stops and nobody promotes the standby.
    s.primary.stop_immediate();
    s.portal
        .wait_for("no leader", |st| leader(st).is_none())
        .await;

    // psql prints the portal's FATAL message.
    let out = psql(&portal_conninfo(s.ports.rw, &s.certs.ca), "select 1").await;
    assert!(!out.success(), "psql got a session with no leader: {out:?}");
    assert!(
        out.stderr.contains("no leader"),
        "psql's error does not say there is no leader: {}",
        out.stderr
    );

    // tokio-postgres sees the SQLSTATE, after the portal held the client.
    let started = Instant::now();
    let err = match pg_connect(s.ports.rw, &s.certs).await {
        Ok(_) => panic!("tokio-postgres got a session with no leader"),
        Err(err) => err,
    };
    let waited = started.elapsed();
    assert_eq!(
        err.code(),
        Some(&SqlState::CANNOT_CONNECT_NOW),
        "want SQLSTATE 57P03, got {}",
        pg_error(&err)
    );
    assert!(
        waited >= Duration::from_millis(900),
        "refused after {waited:?}, before hold_timeout (1s)"
    );
    s.portal
        .wait_metric(
            "portal_connections_refused_total",
            &[("endpoint", "rw"), ("reason", "no_leader")],
            |v| v >= 2.0,
        )
        .await;

    // Reads still have the standby.
    let ro = pg_session(s.ports.ro, &s.certs).await;
    assert_eq!(server_port_of(&ro).await.expect("port"), s.standby.port());
}
