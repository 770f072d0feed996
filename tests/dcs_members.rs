//! Members learned from the DCS: a portal whose configuration lists no
//! members finds them in Patroni's keys in etcd, probes them with the native
//! PostgreSQL probe, routes to them, follows a member whose `conn_url`
//! moves, and adds a member that joins later.
//!
//! etcd and the three PostgreSQL servers (a primary and two streaming
//! standbys) are real. Patroni is not running: the test writes the keys a
//! Patroni agent writes (`members/<name>` with `conn_url` and `api_url`,
//! `leader` with the leader's name) with the stock `etcdctl`, because a real
//! agent changes its `conn_url` only when it is reconfigured, and that is
//! the case this test is for. tests/e2e_patroni.rs runs the same learning
//! against real Patroni agents.

use crate::common;

use common::etcd::EtcdCluster;
use common::pg::*;
use common::*;
use tokio::task::block_in_place;

const SCOPE: &str = "learned";

/// Writes `key` under the scope, as Patroni would.
fn put(etcd: &EtcdCluster, key: &str, value: &str) {
    let key = format!("/service/{SCOPE}/{key}");
    let out = etcd.etcdctl(0, &["put", &key, value]);
    assert!(
        out.status.success(),
        "etcdctl put {key}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A member document like Patroni's (`conn_url`, `api_url`, state, role).
fn member_doc(pg_port: u16, role: &str) -> String {
    format!(
        r#"{{"conn_url": "postgres://127.0.0.1:{pg_port}/postgres", "api_url": "http://127.0.0.1:1/patroni", "state": "running", "role": "{role}", "version": "3.0.2"}}"#
    )
}

/// The portal configuration of `PgPortalConfig` without `members:`, with
/// the etcd DCS.
fn learning_yaml(config: &PgPortalConfig, etcd: &EtcdCluster) -> String {
    let dcs = format!(
        "    dcs:\n      etcd:\n        endpoints: [\"{}\"]\n        scope: {SCOPE}\n        \
         max_members: 4\n",
        etcd.client_address(0)
    );
    replace_members(&config.yaml(), &dcs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_come_from_the_dcs_and_follow_it() {
    let etcd = block_in_place(|| EtcdCluster::start(1));
    let (primary, standby) = block_in_place(primary_and_standby);
    let other = block_in_place(|| PgServer::standby_of(&primary));
    let (pa, pb, pc) = (primary.port(), standby.port(), other.port());
    let certs = temp_certs();
    let config = PgPortalConfig::new(&certs, &[pa, pb]);
    let yaml = learning_yaml(&config, &etcd);
    assert!(!yaml.contains("\n    members:"), "{yaml}");
    let portal = Portal::start(&yaml).await;

    // Nothing in etcd yet: no members, no leader.
    let status = portal
        .wait_for("the DCS read", |s| {
            cluster(s)["dcs"]["state"] == "reachable"
        })
        .await;
    assert_eq!(
        cluster(&status)["members"],
        serde_json::json!([]),
        "{status:#}"
    );
    assert!(cluster(&status)["leader"].is_null(), "{status:#}");

    // The keys appear (through the watch): a leads, b replicates.
    block_in_place(|| {
        put(&etcd, "members/a", &member_doc(pa, "master"));
        put(&etcd, "members/b", &member_doc(pb, "replica"));
        put(&etcd, "leader", "a");
    });
    let status = portal.wait_roles("a", &["b"]).await;
    for (name, port) in [("a", pa), ("b", pb)] {
        let m = member(&status, name);
        assert_eq!(m["from"], "dcs", "{status:#}");
        assert_eq!(m["address"], format!("127.0.0.1:{port}"), "{status:#}");
        assert_eq!(m["api"], "127.0.0.1:1", "{status:#}");
    }
    assert_eq!(pg_reached(config.ports.rw, &certs).await, Ok(pa));
    assert_eq!(pg_reached(config.ports.ro, &certs).await, Ok(pb));

    // b's conn_url moves to the other standby: b is probed there and the
    // replicas endpoint follows.
    block_in_place(|| put(&etcd, "members/b", &member_doc(pc, "replica")));
    portal
        .wait_for("member b at its new address", |s| {
            member(s, "b")["address"] == format!("127.0.0.1:{pc}")
                && member(s, "b")["health"] == "up"
        })
        .await;
    wait_pg_reached(config.ports.ro, &certs, pc).await;
    for _ in 0..5 {
        assert_eq!(pg_reached(config.ports.ro, &certs).await, Ok(pc));
    }

    // A member that joins later is learned and serves reads too.
    block_in_place(|| put(&etcd, "members/c", &member_doc(pb, "replica")));
    let status = portal.wait_roles("a", &["b", "c"]).await;
    assert_eq!(member(&status, "c")["from"], "dcs", "{status:#}");
    let mut reached = std::collections::BTreeSet::new();
    for _ in 0..6 {
        reached.insert(pg_reached(config.ports.ro, &certs).await);
    }
    assert_eq!(
        reached,
        [Ok(pb), Ok(pc)].into_iter().collect(),
        "round robin over b and c"
    );

    // The leader key names a member with no member key: nobody leads.
    block_in_place(|| put(&etcd, "leader", "nobody"));
    portal
        .wait_for("no leader", |s| cluster(s)["leader"].is_null())
        .await;
    let status = portal.status().await;
    assert_eq!(
        member(&status, "a")["fenced"],
        "not_dcs_leader",
        "{status:#}"
    );
    let log = portal.stderr_log();
    assert!(log.contains("member learned from the DCS"), "{log}");
    assert!(
        log.contains("the DCS advertises a new address for this member"),
        "{log}"
    );
}
