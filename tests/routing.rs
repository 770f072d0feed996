//! Routing: each endpoint reaches the members its route names.

use crate::common;

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

/// `yaml` with `lines` (each indented as an endpoint key) added to the
/// `ro` endpoint, after its `route:`.
fn ro_with(yaml: &str, lines: &[&str]) -> String {
    let extra: String = lines.iter().map(|l| format!("        {l}\n")).collect();
    let patched = yaml.replacen("route: replicas\n", &format!("route: replicas\n{extra}"), 1);
    assert_ne!(patched, yaml, "no replicas endpoint to patch");
    patched
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_fallback_refuse_refuses_reads_when_no_replica_qualifies() {
    let (a, mut b) = primary_and_replica();
    let certs = temp_certs();
    let config = PortalConfig::new(&certs, &[a.port(), b.port()]).hold_timeout("1s");
    let portal = Portal::start(&ro_with(&config.yaml(), &["replica_fallback: refuse"])).await;
    portal.wait_roles("a", &["b"]).await;
    assert_eq!(reached(config.ports.ro, &certs).await, Ok(b.port()));

    b.kill9();
    portal
        .wait_for("the replica to leave the replica set", |st| {
            replica_names(st).is_empty()
        })
        .await;
    // Held for hold_timeout, then refused in Redis's words; never sent to
    // the leader, which `replica_fallback: leader` (the default) would do.
    for _ in 0..3 {
        let seen = reached(config.ports.ro, &certs).await;
        let err = seen.expect_err("a read reached a member with no replica up");
        assert!(err.contains("TRYAGAIN"), "{err}");
    }
    // The leader endpoint is unaffected.
    assert_eq!(reached(config.ports.rw, &certs).await, Ok(a.port()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_connections_sends_a_new_session_to_the_least_busy_replica() {
    let a = RedisServer::start(None);
    let b = RedisServer::start(Some(a.port()));
    let c = RedisServer::start(Some(a.port()));
    b.wait_link_up();
    c.wait_link_up();
    let certs = temp_certs();
    let config = PortalConfig::new(&certs, &[a.port(), b.port(), c.port()]);
    let portal = Portal::start(&ro_with(&config.yaml(), &["balance: least_connections"])).await;
    portal.wait_roles("a", &["b", "c"]).await;

    // Three sessions, kept open: two on one replica (`busy`), one on the
    // other (`idle`), whichever way the ties went.
    let mut open = Vec::new();
    for _ in 0..3 {
        let mut s = session(config.ports.ro, &certs).await;
        let port = s.server_port().await.expect("INFO server");
        open.push((port, s));
    }
    let count =
        |port: u16, open: &[(u16, Session)]| open.iter().filter(|(p, _)| *p == port).count();
    let (busy, idle) = if count(b.port(), &open) == 2 {
        (b.port(), c.port())
    } else {
        (c.port(), b.port())
    };
    assert_eq!(
        (count(busy, &open), count(idle, &open)),
        (2, 1),
        "ports {open:?}",
        open = open.iter().map(|(p, _)| *p).collect::<Vec<_>>()
    );

    // Close both sessions on `busy`: it now holds 0, `idle` 1. The next
    // session must go to `busy` (round robin would pick `idle`, the one
    // after the last pick). Then each replica holds one, and a fourth and
    // fifth session spread one each.
    open.retain(|(p, _)| *p != busy);
    portal
        .wait_metric("portal_connections_active", &[("endpoint", "ro")], |v| {
            v == 1.0
        })
        .await;
    let mut next = session(config.ports.ro, &certs).await;
    assert_eq!(next.server_port().await.expect("INFO server"), busy);
    let mut more = Vec::new();
    for _ in 0..2 {
        let mut s = session(config.ports.ro, &certs).await;
        more.push(s.server_port().await.expect("INFO server"));
        open.push((0, s));
    }
    more.sort_unstable();
    let mut want = vec![b.port(), c.port()];
    want.sort_unstable();
    assert_eq!(more, want, "two more sessions on a 1/1 split spread 1/1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_probe_logs_in_as_a_redis_acl_user_with_only_info() {
    // The default user needs a password the portal does not have; the
    // probe's own user may run INFO and nothing else (README: "+info").
    let a = RedisServer::start(None);
    let dir = tempfile::TempDir::new().expect("temp dir");
    assert_eq!(
        a.cmd(&[
            "ACL",
            "SETUSER",
            "portal-probe",
            "on",
            ">probe-secret",
            "-@all",
            "+info"
        ]),
        "OK"
    );
    let good = dir.path().join("probe.password");
    std::fs::write(&good, "probe-secret\n").expect("write password file");
    let bad = dir.path().join("wrong.password");
    std::fs::write(&bad, "not-the-secret\n").expect("write password file");
    let certs = temp_certs();
    let config = PortalConfig::new(&certs, &[a.port()]);
    let probe_user = |file: &std::path::Path| {
        config.yaml().replacen(
            "      fall: 2\n",
            &format!(
                "      fall: 2\n      username: portal-probe\n      password_file: {}\n",
                file.display()
            ),
            1,
        )
    };
    // Lock the default user out only now: the harness's own checks above
    // used it.
    assert_eq!(
        a.cmd(&["CONFIG", "SET", "requirepass", "client-secret"]),
        "OK"
    );

    // The wrong password: the member is down with Redis's own error, and
    // there is no leader.
    let wrong = Portal::start(&probe_user(&bad)).await;
    let status = wrong
        .wait_for("the probe to fail on its password", |st| {
            member(st, "a")["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("WRONGPASS"))
        })
        .await;
    assert_eq!(leader(&status), None, "{status:#}");
    drop(wrong);

    // The right one: a leads, and clients log in for themselves.
    let portal = Portal::start(&probe_user(&good)).await;
    portal.wait_roles("a", &[]).await;
    let mut rw = session(config.ports.rw, &certs).await;
    let denied = rw.cmd(&["SET", "k", "v"]).await.expect("a reply");
    assert!(denied.text().contains("NOAUTH"), "{denied:?}");
    assert_eq!(
        rw.cmd(&["AUTH", "client-secret"]).await.expect("AUTH"),
        Reply::Simple("OK".into())
    );
    assert_eq!(
        rw.cmd(&["SET", "k", "v"]).await.expect("SET"),
        Reply::Simple("OK".into())
    );
}

/// A primary with every connection slot taken (clients through the portal
/// filled Redis's `maxclients`) answers the probe's fresh connections with
/// `max number of clients reached`: that is a full member, not a dead one.
/// It stays leader across many renewals of the probe's connection, and the
/// sessions on it keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_with_every_connection_slot_taken_stays_leader_across_probe_renewals() {
    let a = RedisServer::start(None);
    let certs = temp_certs();
    let config = PortalConfig::new(&certs, &[a.port()]);
    let portal = Portal::start(&with_reconnect_interval(&config.yaml(), "300ms")).await;
    let status = portal.wait_roles("a", &[]).await;
    let before = epoch(&status);
    // Room for four more clients than are connected now (the probe).
    let connected = info_number(a.port(), "clients", "connected_clients");
    let room = (connected + 4).to_string();
    assert_eq!(a.cmd(&["CONFIG", "SET", "maxclients", &room]), "OK");
    let mut sessions = Vec::new();
    let mut refused = 0;
    for _ in 0..8 {
        let mut s = session(config.ports.rw, &certs).await;
        match s.cmd(&["PING"]).await {
            Ok(reply) if reply.text() == "PONG" => sessions.push(s),
            _ => refused += 1,
        }
    }
    assert!(refused > 0, "the member was never full");
    assert!(!sessions.is_empty());
    // Several renewals of the probe's connection, each refused for want of a
    // slot: the member stays leader, no session is closed.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status = portal.status().await;
    assert_eq!(leader(&status).as_deref(), Some("a"), "{status:#}");
    assert_eq!(epoch(&status), before, "the view changed: {status:#}");
    for s in &mut sessions {
        let reply = s
            .cmd(&["PING"])
            .await
            .expect("a session on the full primary");
        assert_eq!(reply.text(), "PONG");
    }
    let metrics = portal.metrics().await;
    let closed = metric(
        &metrics,
        "portal_sessions_closed_total",
        &[("endpoint", "rw"), ("reason", "leader_change")],
    )
    .unwrap_or(0.0);
    assert_eq!(closed, 0.0);
}
