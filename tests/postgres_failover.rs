//! PostgreSQL failover through the portal: when the primary dies and the
//! standby is promoted, sessions on the old primary end, new sessions reach
//! the promoted member, and the old primary, restarted on its older
//! timeline still believing it is the primary, gets no connection; back as
//! a standby on that timeline, it gets no read either.

mod common;

use std::time::{Duration, Instant};

use common::pg::*;
use common::*;

struct Setup {
    primary: PgServer,
    standby: PgServer,
    certs: Certs,
    ports: PgPorts,
    portal: Portal,
}

/// A primary `a`, its streaming standby `b`, and a portal that sees them so.
async fn setup() -> Setup {
    let (primary, standby) = primary_and_standby();
    let certs = temp_certs();
    let config = PgPortalConfig::new(&certs, &[primary.port(), standby.port()]);
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

/// Waits until a query on `client` fails (the session was closed).
async fn wait_session_closed(client: &tokio_postgres::Client, what: &str) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let answer =
            tokio::time::timeout(Duration::from_secs(5), client.simple_query("select 1")).await;
        if let Ok(Err(_)) = answer {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the session still answers {DEADLINE:?} later"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promoted_standby_takes_over_and_the_restarted_old_primary_is_fenced() {
    let mut s = setup().await;
    let old = pg_session(s.ports.rw, &s.certs).await;
    assert_eq!(server_port_of(&old).await.expect("port"), s.primary.port());
    let before = epoch(&s.portal.status().await);

    s.primary.stop_immediate();
    s.standby.promote();
    assert_eq!(s.standby.timeline(), 2);

    wait_session_closed(&old, "the session on the stopped primary").await;
    wait_pg_reached(s.ports.rw, &s.certs, s.standby.port()).await;
    let status = s.portal.status().await;
    assert_eq!(leader(&status).as_deref(), Some("b"), "{status:#}");
    assert!(epoch(&status) > before, "{status:#}");

    // Writes go to the promoted member.
    let rw = pg_session(s.ports.rw, &s.certs).await;
    rw.batch_execute(
        "create table after_failover (v text); insert into after_failover values ('b')",
    )
    .await
    .unwrap_or_else(|err| panic!("write after failover: {}", pg_error(&err)));
    assert_eq!(s.standby.psql("select v from after_failover"), "b");

    // The old primary comes back on timeline 1, still a primary.
    s.primary.start();
    assert!(!s.primary.is_in_recovery());
    assert_eq!(s.primary.timeline(), 1);
    s.portal
        .wait_for("the old primary probed as a primary and fenced", |st| {
            let a = member(st, "a");
            a["role"] == "primary" && a["health"] == "up" && a["fenced"] == "older_term"
        })
        .await;

    let until = Instant::now() + Duration::from_secs(2);
    let mut sessions = 0;
    while Instant::now() < until {
        assert_eq!(
            pg_reached(s.ports.rw, &s.certs).await,
            Ok(s.standby.port()),
            "a new session went somewhere other than the promoted member"
        );
        sessions += 1;
        let status = s.portal.status().await;
        assert_eq!(leader(&status).as_deref(), Some("b"), "{status:#}");
        assert_eq!(member(&status, "a")["fenced"], "older_term", "{status:#}");
        assert_eq!(cluster(&status)["split_brain"], false, "{status:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(sessions > 0);
    // Nothing written through the portal reached the old primary.
    assert_eq!(
        s.primary
            .psql("select count(*) from pg_tables where tablename = 'after_failover'"),
        "0"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_old_primary_back_as_a_standby_on_its_old_timeline_serves_no_reads() {
    let mut s = setup().await;
    s.primary.stop_immediate();
    s.standby.promote();
    assert_eq!(s.standby.timeline(), 2);
    wait_pg_reached(s.ports.rw, &s.certs, s.standby.port()).await;

    // a restarts in recovery, as a failover manager restarts a former
    // primary, but nothing has rewound it or pointed it at b: a replica on
    // timeline 1, whose WAL may hold writes b never had.
    s.primary.signal_standby();
    s.primary.start();
    assert!(s.primary.is_in_recovery());
    assert_eq!(s.primary.timeline(), 1);
    s.portal
        .wait_for(
            "a probed as a replica behind b's timeline and fenced",
            |st| {
                let a = member(st, "a");
                a["role"] == "replica"
                    && a["health"] == "up"
                    && a["term"] == "1"
                    && a["fenced"] == "behind_leader_term"
            },
        )
        .await;

    // No read reaches it: the replicas endpoint has no replica and falls
    // back to the leader.
    let until = Instant::now() + Duration::from_secs(2);
    let mut sessions = 0;
    while Instant::now() < until {
        assert_eq!(
            pg_reached(s.ports.ro, &s.certs).await,
            Ok(s.standby.port()),
            "a read session went somewhere other than the leader"
        );
        sessions += 1;
        let status = s.portal.status().await;
        assert_eq!(replica_names(&status), Vec::<String>::new(), "{status:#}");
        assert_eq!(leader(&status).as_deref(), Some("b"), "{status:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(sessions > 0);
    assert!(
        s.portal.stderr_log().contains("behind_leader_term"),
        "the fence is logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promotion_while_the_old_primary_runs_closes_its_sessions() {
    let s = setup().await;
    let old = pg_session(s.ports.rw, &s.certs).await;
    assert_eq!(server_port_of(&old).await.expect("port"), s.primary.port());

    // `b` moves to timeline 2 while `a` still runs as a primary on 1: the
    // newer timeline wins, and sessions on `a` are closed
    // (on_leader_change: close, the default).
    s.standby.promote();
    wait_pg_reached(s.ports.rw, &s.certs, s.standby.port()).await;
    wait_session_closed(&old, "the session on the demoted primary").await;

    let status = s.portal.status().await;
    assert_eq!(leader(&status).as_deref(), Some("b"), "{status:#}");
    assert_eq!(member(&status, "a")["fenced"], "older_term", "{status:#}");
    s.portal
        .wait_metric(
            "portal_sessions_closed_total",
            &[("endpoint", "rw"), ("reason", "leader_change")],
            |v| v >= 1.0,
        )
        .await;
}
