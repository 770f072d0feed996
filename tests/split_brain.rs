//! Split brain: two unrelated masters and no incumbent mean no leader, and
//! the portal says so instead of picking one.

use crate::common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_unrelated_masters_get_no_leader_and_clients_get_tryagain() {
    let a = RedisServer::start(None);
    let b = RedisServer::start(None);
    let certs = temp_certs();
    let config = PortalConfig::new(&certs, &[a.port(), b.port()]).hold_timeout("1s");
    // rise 5 (a second of probes): both masters have claimed before either
    // could lead alone, also when one first probe is slow.
    let portal = Portal::start(&config.yaml().replace("rise: 2", "rise: 5")).await;

    let status = portal
        .wait_for("split brain to be reported", |s| {
            cluster(s)["split_brain"] == true
        })
        .await;
    assert_eq!(
        cluster(&status)["leader"],
        serde_json::Value::Null,
        "{status:#}"
    );

    let mut client = session(config.ports.rw, &certs).await;
    let reply = client.cmd(&["PING"]).await.expect("a reply to PING");
    let text = reply.text();
    assert!(
        reply.is_error() && text.starts_with("-TRYAGAIN"),
        "expected a -TRYAGAIN error, got {reply:?}"
    );
    assert!(
        text.contains("no leader") && text.contains("\"cache\""),
        "the error should say there is no leader for cache: {text}"
    );
    assert!(
        client.closed_within(DEADLINE).await,
        "the refused client should be disconnected"
    );

    let metrics = portal.metrics().await;
    assert_eq!(
        metric(&metrics, "portal_split_brain", &[("cluster", "cache")]),
        Some(1.0),
        "{metrics}"
    );
    portal
        .wait_metric(
            "portal_connections_refused_total",
            &[("endpoint", "rw"), ("reason", "no_leader")],
            |v| v >= 1.0,
        )
        .await;
    let (code, body) = portal.get("/ready").await.expect("GET /ready");
    assert_eq!(code, 503, "/ready during split brain: {body}");

    // Neither master was chosen in the meantime.
    let status = portal.status().await;
    assert_eq!(
        cluster(&status)["leader"],
        serde_json::Value::Null,
        "{status:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_brain_ends_when_one_master_follows_the_other() {
    let a = RedisServer::start(None);
    let b = RedisServer::start(None);
    let certs = temp_certs();
    let config = PortalConfig::new(&certs, &[a.port(), b.port()]).hold_timeout("1s");
    // rise 5 (a second of probes): both masters have claimed before either
    // could lead alone, also when one first probe is slow.
    let portal = Portal::start(&config.yaml().replace("rise: 2", "rise: 5")).await;
    portal
        .wait_for("split brain to be reported", |s| {
            cluster(s)["split_brain"] == true
        })
        .await;

    b.follow(a.port());
    b.wait_link_up();

    let status = portal.wait_roles("a", &["b"]).await;
    assert_eq!(cluster(&status)["split_brain"], false, "{status:#}");
    wait_reached(config.ports.rw, &certs, a.port()).await;
    let (code, body) = portal.get("/ready").await.expect("GET /ready");
    assert_eq!(code, 200, "/ready with a leader: {body}");
    let metrics = portal.metrics().await;
    assert_eq!(
        metric(&metrics, "portal_split_brain", &[("cluster", "cache")]),
        Some(0.0),
        "{metrics}"
    );
}
