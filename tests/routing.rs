//! Routing: each endpoint reaches the members its route names.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::*;

/// A primary `a`, its replica `b`, and a portal that sees them so.
async fn setup(config: impl FnOnce(PortalConfig) -> PortalConfig) -> Setup {
    let (a, b) = primary_and_replica();
    let certs = temp_certs();
    let config = config(PortalConfig::new(&certs, &[a.port(), b.port()]));
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

struct Setup {
    a: RedisServer,
    b: RedisServer,
    certs: Certs,
    ports: Ports,
    portal: Portal,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_endpoint_reaches_the_primary_and_writes_replicate() {
    let s = setup(|c| c).await;
    let mut rw = session(s.ports.rw, &s.certs).await;

    let role = rw.cmd(&["ROLE"]).await.expect("ROLE");
    assert_eq!(
        role.first().map(Reply::text).as_deref(),
        Some("master"),
        "ROLE through the leader endpoint: {role:?}"
    );
    assert_eq!(rw.server_port().await.expect("INFO server"), s.a.port());

    let set = rw
        .cmd(&["SET", "routing:key", "written-through-portal"])
        .await
        .expect("SET");
    assert_eq!(set, Reply::Simple("OK".into()));

    let deadline = Instant::now() + DEADLINE;
    loop {
        let seen = s.b.cmd(&["GET", "routing:key"]);
        if seen == "written-through-portal" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replica never saw the write; GET says {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_endpoint_reaches_the_replica_then_falls_back_to_the_leader() {
    let mut s = setup(|c| c).await;

    let mut ro = session(s.ports.ro, &s.certs).await;
    assert_eq!(ro.server_port().await.expect("INFO server"), s.b.port());
    let role = ro.cmd(&["ROLE"]).await.expect("ROLE");
    assert_eq!(role.first().map(Reply::text).as_deref(), Some("slave"));
    drop(ro);

    s.b.kill9();
    s.portal
        .wait_for("the replica to leave the replica set", |st| {
            replica_names(st).is_empty()
        })
        .await;
    wait_reached(s.ports.ro, &s.certs, s.a.port()).await;
    // And it stays there while the replica is gone.
    for _ in 0..3 {
        assert_eq!(reached(s.ports.ro, &s.certs).await, Ok(s.a.port()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_endpoint_reaches_both_members() {
    let s = setup(|c| c).await;

    let mut seen = HashSet::new();
    for _ in 0..8 {
        let port = reached(s.ports.any, &s.certs)
            .await
            .expect("a session through the any endpoint");
        seen.insert(port);
    }
    assert_eq!(
        seen,
        HashSet::from([s.a.port(), s.b.port()]),
        "8 sessions through `any` should reach both members"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn third_connection_over_max_connections_is_refused() {
    let s = setup(|c| c.max_connections(2)).await;

    let mut first = session(s.ports.rw, &s.certs).await;
    let mut second = session(s.ports.rw, &s.certs).await;
    for held in [&mut first, &mut second] {
        assert_eq!(
            held.cmd(&["PING"]).await.expect("PING"),
            Reply::Simple("PONG".into())
        );
    }

    let mut third = session(s.ports.rw, &s.certs).await;
    let reply = third.cmd(&["PING"]).await.expect("a refusal reply");
    assert_eq!(
        reply,
        Reply::Error("ERR max number of clients reached".into())
    );
    assert!(
        third.closed_within(DEADLINE).await,
        "the refused connection should be closed"
    );

    // The two sessions are unaffected.
    for held in [&mut first, &mut second] {
        assert_eq!(
            held.cmd(&["PING"]).await.expect("PING"),
            Reply::Simple("PONG".into())
        );
    }

    // Closing one frees its slot.
    drop(first);
    let deadline = Instant::now() + DEADLINE;
    loop {
        let mut next = session(s.ports.rw, &s.certs).await;
        let reply = next.cmd(&["PING"]).await.expect("PING");
        if reply == Reply::Simple("PONG".into()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a slot was never freed after a session closed; last reply {reply:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    s.portal
        .wait_metric(
            "portal_connections_refused_total",
            &[("endpoint", "rw"), ("reason", "max_connections")],
            |v| v >= 1.0,
        )
        .await;
}
