//! Failover: the leader endpoint follows a promotion, closes sessions on the
//! old leader, and never hands traffic back to a stale primary.

use crate::common;
// The fault-injection harness's relay: one portal reaches a member through it.
use crate::common::chaos::relay;

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

    // For 2 s every new session reaches b, though b misses probes once in
    // the middle (a 400 ms stall): the empty a never gets the role.
    let sample = async {
        let until = Instant::now() + Duration::from_secs(2);
        while Instant::now() < until {
            assert_eq!(
                reached(s.ports.rw, &s.certs).await,
                Ok(s.b.port()),
                "a new session went somewhere other than the promoted member"
            );
            let status = s.portal.status().await;
            assert_ne!(leader(&status).as_deref(), Some("a"), "{status:#}");
            assert_eq!(status["clusters"][0]["split_brain"], false, "{status:#}");
            assert_eq!(
                member(&status, "a")["fenced"],
                "unrelated_history",
                "{status:#}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let stall = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        s.b.stall(Duration::from_millis(400)).await;
    };
    tokio::join!(sample, stall);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_session_is_served_once_a_leader_appears_within_hold_timeout() {
    let mut s = setup(|c| c).await;
    s.a.kill9();
    s.portal
        .wait_for("no leader after the kill", |st| leader(st).is_none())
        .await;

    // A client arrives while there is no leader: its command waits (the
    // setup's hold_timeout is 5 s) and is served by the member promoted
    // 700 ms later, not refused.
    let client = async {
        let mut held = session(s.ports.rw, &s.certs).await;
        let reply = held.cmd(&["SET", "held:key", "served"]).await;
        let answered = Instant::now();
        let server = held.server_port().await;
        (reply, answered, server)
    };
    let promote = async {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let at = Instant::now();
        s.b.promote();
        at
    };
    let ((reply, answered, server), promoted) = tokio::join!(client, promote);
    assert_eq!(
        reply.expect("a reply to the held SET"),
        Reply::Simple("OK".into())
    );
    assert!(
        answered > promoted,
        "the SET was answered before any member could take it"
    );
    assert_eq!(server.expect("INFO server"), s.b.port());
    assert_eq!(s.b.cmd(&["GET", "held:key"]), "served");
    // The wait shows in the hold histogram: a session held past 0.5 s.
    let text = s.portal.metrics().await;
    let held = metric(&text, "portal_hold_seconds_count", &[("endpoint", "rw")]).unwrap_or(0.0);
    let quick = metric(
        &text,
        "portal_hold_seconds_bucket",
        &[("endpoint", "rw"), ("le", "0.5")],
    )
    .unwrap_or(0.0);
    assert!(held - quick >= 1.0, "no hold over 0.5 s recorded:\n{text}");
}

// ---- faults the rules must survive -------------------------------------------

/// a killed, b promoted, a restarted empty (a master with a fresh
/// replication id): every portal must lead with b and fence a.
async fn promote_b_and_restart_a_empty(a: &mut RedisServer, b: &RedisServer, portals: &[&Portal]) {
    a.kill9();
    b.promote();
    for p in portals {
        p.wait_for("b to lead", |s| leader(s).as_deref() == Some("b"))
            .await;
    }
    a.restart();
    for p in portals {
        p.wait_for("the empty a to be probed as primary and fenced", |s| {
            let m = member(s, "a");
            m["role"] == "primary" && m["health"] == "up" && m["fenced"] == "unrelated_history"
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_leader_is_not_replaced_by_an_empty_restarted_master() {
    // The operator's report: b leads after a promotion, a is back empty and
    // claims master, then b stalls for 1.2 s (a GC pause, a slow fsync).
    let (mut a, b) = primary_and_replica();
    let certs = temp_certs();
    let one = PortalConfig::new(&certs, &[a.port(), b.port()]);
    let two = PortalConfig::new(&certs, &[a.port(), b.port()]);
    // Portal 1 as configured in the report (fall 2: the stall takes b down
    // there); portal 2 with fall 8, so that the stall leaves b suspect only.
    let p1 = Portal::start(&one.yaml()).await;
    let p2 = Portal::start(&two.yaml().replace("fall: 2", "fall: 8")).await;
    for p in [&p1, &p2] {
        p.wait_roles("a", &["b"]).await;
    }
    promote_b_and_restart_a_empty(&mut a, &b, &[&p1, &p2]).await;
    let epoch2 = epoch(&p2.status().await);

    // Sample both portals every 20 ms through the stall and 1 s after it.
    let done = std::sync::atomic::AtomicBool::new(false);
    let sampler = async {
        let mut suspect_seen = false;
        while !done.load(std::sync::atomic::Ordering::Relaxed) {
            for (i, p) in [&p1, &p2].into_iter().enumerate() {
                let s = p.status().await;
                assert_ne!(
                    leader(&s).as_deref(),
                    Some("a"),
                    "portal {} elected the empty master: {s:#}",
                    i + 1
                );
            }
            let s = p2.status().await;
            assert_eq!(
                leader(&s).as_deref(),
                Some("b"),
                "a suspect lost the role: {s:#}"
            );
            assert_eq!(epoch(&s), epoch2, "a suspect changed the routing: {s:#}");
            suspect_seen |= member(&s, "b")["suspect"] == true;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        suspect_seen
    };
    let stall = async {
        b.stall(Duration::from_millis(1200)).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        done.store(true, std::sync::atomic::Ordering::Relaxed);
    };
    let (suspect_seen, ()) = tokio::join!(sampler, stall);
    assert!(
        suspect_seen,
        "portal 2 never showed b as suspect: the stall was not seen"
    );

    // After the stall both portals route new sessions to b, and agree.
    for ports in [one.ports, two.ports] {
        wait_reached(ports.rw, &certs, b.port()).await;
    }
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        for ports in [one.ports, two.ports] {
            assert_eq!(reached(ports.rw, &certs).await, Ok(b.port()));
        }
    }
    let (s1, s2) = (p1.status().await, p2.status().await);
    assert_eq!(leader(&s1), leader(&s2));
    assert_eq!(
        cluster(&s1)["leader_term"],
        cluster(&s2)["leader_term"],
        "{s1:#}\n{s2:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_accepts_the_restarted_master_once_the_leader_is_gone() {
    let (mut a, mut b) = primary_and_replica();
    let certs = temp_certs();
    let dir = tempfile::TempDir::new().expect("temp dir");
    let config = PortalConfig::new(&certs, &[a.port(), b.port()]).hold_timeout("500ms");
    let portal = Portal::start(&with_token(&config.yaml(), dir.path(), "s3cret")).await;
    portal.wait_roles("a", &["b"]).await;
    promote_b_and_restart_a_empty(&mut a, &b, &[&portal]).await;

    // b dies for good: the empty a does not take over on its own.
    b.kill9();
    let status = portal
        .wait_for("b down and no leader", |s| {
            member(s, "b")["health"] == "down" && leader(s).is_none()
        })
        .await;
    assert_eq!(
        cluster(&status)["no_leader"],
        "every_claimant_fenced",
        "{status:#}"
    );
    assert_eq!(
        member(&status, "a")["fenced"],
        "unrelated_history",
        "{status:#}"
    );
    let mut rw = session(config.ports.rw, &certs).await;
    let refused = rw.cmd(&["SET", "operator:key", "lost"]).await;
    assert!(
        refused.as_ref().map_or(true, Reply::is_error),
        "a write was served without a leader: {refused:?}"
    );
    assert_eq!(a.cmd(&["EXISTS", "operator:key"]), "0");

    // The operator's way out: authenticated, named, explicit.
    let path = "/clusters/cache/accept-leader?member=a";
    assert_eq!(portal.post(path, None).await.expect("POST").0, 401);
    assert_eq!(portal.post(path, Some("guess")).await.expect("POST").0, 401);
    let (code, body) = portal
        .post("/clusters/cache/accept-leader?member=zz", Some("s3cret"))
        .await
        .expect("POST");
    assert_eq!(code, 404, "{body}");
    let (code, body) = portal
        .post("/clusters/cache/accept-leader?member=b", Some("s3cret"))
        .await
        .expect("POST");
    assert_eq!(code, 409, "b does not claim primary: {body}");
    let (code, body) = portal.post(path, Some("s3cret")).await.expect("POST");
    assert_eq!(code, 200, "{body}");
    wait_reached(config.ports.rw, &certs, a.port()).await;
    let mut rw = session(config.ports.rw, &certs).await;
    assert_eq!(
        rw.cmd(&["SET", "operator:key", "kept"]).await.expect("SET"),
        Reply::Simple("OK".into())
    );
    assert_eq!(a.cmd(&["GET", "operator:key"]), "kept");
    portal
        .wait_metric(
            "portal_operator_actions_total",
            &[("action", "accept_leader"), ("outcome", "applied")],
            |v| v == 1.0,
        )
        .await;
    assert!(portal.stderr_log().contains("operator decision applied"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_portal_cut_from_the_new_primary_fences_the_old_one_by_its_peer() {
    let (a, b) = primary_and_replica();
    let certs = temp_certs();
    let dir = tempfile::TempDir::new().expect("temp dir");
    // Portal 1 reaches b only through a relay the test cuts; portal 2
    // reaches both. Each names the other as its peer.
    let path_b = relay::Relay::start(b.port()).await;
    let one = PortalConfig::new(&certs, &[a.port(), path_b.port]).hold_timeout("500ms");
    let two = PortalConfig::new(&certs, &[a.port(), b.port()]);
    let peer = |of: &PortalConfig| format!("  peers: [\"127.0.0.1:{}\"]", of.ports.admin);
    let p1 = Portal::start(&with_admin(
        &with_token(&one.yaml(), dir.path(), "t0k"),
        &peer(&two),
    ))
    .await;
    let p2 = Portal::start(&with_admin(
        &with_token(&two.yaml(), dir.path(), "t0k"),
        &peer(&one),
    ))
    .await;
    for p in [&p1, &p2] {
        p.wait_roles("a", &["b"]).await;
    }
    p1.wait_metric("portal_peer_exchanges_total", &[("outcome", "ok")], |v| {
        v >= 1.0
    })
    .await;

    // Portal 1 loses b; then b is promoted while a lives on, still a master
    // that no one told: only portal 2 can see the new term.
    path_b.set(relay::Mode::Cut);
    p1.wait_for("b down on portal 1", |s| member(s, "b")["health"] == "down")
        .await;
    b.promote();
    p2.wait_for("b to lead on portal 2", |s| {
        leader(s).as_deref() == Some("b")
    })
    .await;
    let status = p1
        .wait_for("portal 1 to fence a by its peer's term", |s| {
            member(s, "a")["fenced"] == "older_than_peer_term"
        })
        .await;
    assert_eq!(leader(&status), None, "{status:#}");

    // Writes through portal 1 are refused, never sent to the stale a.
    for i in 0..5 {
        let mut rw = session(one.ports.rw, &certs).await;
        let key = format!("peer:key:{i}");
        let reply = rw.cmd(&["SET", &key, "stale"]).await;
        assert!(
            reply.as_ref().map_or(true, Reply::is_error),
            "portal 1 served a write without a leader: {reply:?}"
        );
        assert_eq!(
            a.cmd(&["EXISTS", &key]),
            "0",
            "a write reached the old primary"
        );
    }
    assert!(
        p1.stderr_log().contains("older_than_peer_term"),
        "the fence is not in portal 1's log"
    );
}
