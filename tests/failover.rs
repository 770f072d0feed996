//! Failover: the leader endpoint follows a promotion, closes sessions on the
//! old leader, and never hands traffic back to a stale primary.

mod common;

use std::time::{Duration, Instant};

use common::*;

struct Setup {
    a: RedisServer,
    b: RedisServer,
    certs: Certs,
    ports: Ports,
    portal: Portal,
}

/// A primary `a`, its replica `b`, and a portal that sees them so.
async fn setup(config: impl FnOnce(PortalConfig) -> PortalConfig) -> Setup {
    let (a, b) = primary_and_replica();
    let certs = temp_certs();
    let config = config(PortalConfig::new(&certs, &[a.port(), b.port()]).hold_timeout("5s"));
    let portal = Portal::start(&config.yaml()).await;
    portal.wait_roles("a", &["b"]).await;
    Setup {
        a,
        b,
        certs,
        ports: config.ports,
        portal,
    }
}

/// Kills the primary, promotes the replica, and checks the portal follows:
/// the old session closes, new sessions reach `b`, `/status` says so.
async fn fail_over(s: &mut Setup) {
    let mut old = session(s.ports.rw, &s.certs).await;
    assert_eq!(
        old.cmd(&["PING"]).await.expect("PING"),
        Reply::Simple("PONG".into())
    );
    assert_eq!(old.server_port().await.expect("INFO"), s.a.port());
    let before = epoch(&s.portal.status().await);

    s.a.kill9();
    s.b.promote();

    assert!(
        old.closed_within(DEADLINE).await,
        "the session on the killed primary was not closed"
    );
    wait_reached(s.ports.rw, &s.certs, s.b.port()).await;

    let status = s.portal.status().await;
    assert_eq!(leader(&status).as_deref(), Some("b"), "{status:#}");
    assert!(
        epoch(&status) > before,
        "epoch did not grow past {before}: {status:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_primary_and_promoted_replica_moves_the_leader_endpoint() {
    let mut s = setup(|c| c).await;
    fail_over(&mut s).await;

    // Writes through the portal land on the new primary.
    let mut rw = session(s.ports.rw, &s.certs).await;
    assert_eq!(
        rw.cmd(&["SET", "failover:key", "after"])
            .await
            .expect("SET"),
        Reply::Simple("OK".into())
    );
    assert_eq!(s.b.cmd(&["GET", "failover:key"]), "after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_empty_old_primary_gets_no_traffic() {
    let mut s = setup(|c| c).await;
    fail_over(&mut s).await;

    // The old primary comes back empty, as a master with a new replication
    // id: it claims primary but cannot prove a newer term than `b`.
    s.a.restart();
    s.portal
        .wait_for("the restarted member to be probed as a primary", |st| {
            let a = member(st, "a");
            a["role"] == "primary" && a["health"] == "up"
        })
        .await;

    let until = Instant::now() + Duration::from_secs(2);
    let mut sessions = 0;
    while Instant::now() < until {
        assert_eq!(
            reached(s.ports.rw, &s.certs).await,
            Ok(s.b.port()),
            "a new session went somewhere other than the promoted member"
        );
        sessions += 1;
        let status = s.portal.status().await;
        assert_eq!(leader(&status).as_deref(), Some("b"), "{status:#}");
        // The incumbent settles it: the rival is fenced, no split-brain alarm.
        assert_eq!(status["clusters"][0]["split_brain"], false, "{status:#}");
        assert_eq!(
            member(&status, "a")["fenced"],
            "incumbent_leads",
            "{status:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(sessions > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promotion_while_the_old_primary_lives_closes_its_sessions() {
    let s = setup(|c| c).await;
    let mut old = session(s.ports.rw, &s.certs).await;
    assert_eq!(old.server_port().await.expect("INFO"), s.a.port());
    let before = epoch(&s.portal.status().await);

    // `b` takes over the history of `a`, which proves it newer; `a` is still
    // up and still says master, but must lose the role.
    s.b.promote();

    assert!(
        old.closed_within(DEADLINE).await,
        "the session on the demoted primary was not closed"
    );
    wait_reached(s.ports.rw, &s.certs, s.b.port()).await;
    let status = s.portal.status().await;
    assert_eq!(leader(&status).as_deref(), Some("b"), "{status:#}");
    assert!(epoch(&status) > before, "{status:#}");
    s.portal
        .wait_metric(
            "portal_sessions_closed_total",
            &[("endpoint", "rw"), ("reason", "leader_change")],
            |v| v >= 1.0,
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_leader_change_keep_leaves_sessions_open() {
    let s = setup(|c| c.on_leader_change("keep")).await;
    let mut old = session(s.ports.rw, &s.certs).await;
    assert_eq!(old.server_port().await.expect("INFO"), s.a.port());

    s.b.promote();
    wait_reached(s.ports.rw, &s.certs, s.b.port()).await;

    // The session routed to `a` is still there and still talks to `a`.
    assert_eq!(
        old.cmd(&["PING"]).await.expect("PING on the kept session"),
        Reply::Simple("PONG".into())
    );
    assert_eq!(old.server_port().await.expect("INFO"), s.a.port());
}
