//! A portal with `probe.check: patroni` in front of a real Patroni cluster
//! (three etcd members, two PostgreSQL 15 members run by Patroni): writes
//! through the TLS leader endpoint reach Patroni's leader, follow a
//! `patronictl switchover` (losing none) and a hard kill of the leader;
//! `/status` shows the new leader with its newer timeline as the term.
//! In both the old leader cannot take a write once the new one is promoted
//! (demoted first, or dead), so whether the portal would send it one is
//! checked where it can: `tests/e2e_patroni.rs`, with a frozen Patroni
//! agent in front of a still-writable old primary.

use crate::common;

use std::time::{Duration, Instant};

use common::etcd::EtcdCluster;
use common::patroni::*;
use common::pg::*;
use common::*;
use tokio::task::block_in_place;

/// Failover after a hard kill waits for the leader key to expire
/// (`ttl: 10`) and Patroni's next loop: give it room.
const FAILOVER_DEADLINE: Duration = Duration::from_secs(60);

struct Setup {
    // Dropped in this order: the portal, then Patroni, then etcd.
    portal: Portal,
    cluster: PatroniCluster,
    _etcd: EtcdCluster,
    certs: Certs,
    rw: u16,
    ro: u16,
}

async fn setup() -> Setup {
    let etcd = block_in_place(|| EtcdCluster::start(3));
    let cluster = block_in_place(|| PatroniCluster::start(&etcd.client_addresses(), 2));
    let certs = temp_certs();
    let (admin, rw, ro) = (free_port(), free_port(), free_port());
    let portal = Portal::start(&cluster.portal_yaml(&certs, admin, rw, ro)).await;
    portal.wait_roles("a", &["b"]).await;
    let s = Setup {
        portal,
        cluster,
        _etcd: etcd,
        certs,
        rw,
        ro,
    };
    let client = connect(s.rw, &s.certs).await.expect("session through rw");
    client
        .batch_execute("create table writes (id int8 primary key)")
        .await
        .unwrap_or_else(|err| panic!("create table: {}", pg_error(&err)));
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_follow_a_patronictl_switchover() {
    let s = setup().await;
    let (a, b) = (s.cluster.members[0].pg_port, s.cluster.members[1].pg_port);

    // Reads go to the replica, writes to the leader.
    let ro = connect(s.ro, &s.certs).await.expect("session through ro");
    assert_eq!(server_port_of(&ro).await.expect("port"), b);
    let before = s.portal.status().await;
    assert_eq!(leader_term(&before), Some(1), "{before:#}");

    let writer = Writer::start(s.rw, &s.certs);
    writer.wait_ack_from(a, 0, DEADLINE).await;

    let started = Instant::now();
    block_in_place(|| s.cluster.switchover(0, 1));
    let switched = writer.acks().len();
    writer.wait_ack_from(b, switched, DEADLINE).await;
    // For the log only (never asserted): includes patronictl's own time.
    eprintln!(
        "switchover: first write acknowledged by b {:?} after patronictl started",
        started.elapsed()
    );
    let status = s
        .portal
        .wait_for("b leading on a newer timeline", |st| {
            leader(st).as_deref() == Some("b") && leader_term(st).is_some_and(|t| t > 1)
        })
        .await;
    // The former leader rejoins as a replica and takes reads again.
    block_in_place(|| s.cluster.wait_all_running());
    wait_roles_within(&s.portal, "b", &["a"], FAILOVER_DEADLINE).await;
    let acks = writer.stop().await;

    // A switchover loses nothing: every acknowledged write is on b.
    let on_b = direct(b).await;
    let ids: Vec<i64> = on_b
        .query("select id from writes", &[])
        .await
        .expect("read writes on b")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let lost: Vec<i64> = acks
        .iter()
        .map(|x| x.id)
        .filter(|id| !ids.contains(id))
        .collect();
    assert!(
        lost.is_empty(),
        "acknowledged writes missing on b: {lost:?}"
    );
    assert!(
        acks.iter().any(|x| x.port == a) && acks.iter().any(|x| x.port == b),
        "writes on both members: {status:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_resume_after_a_hard_kill_of_the_leader() {
    let mut s = setup().await;
    let b = s.cluster.members[1].pg_port;
    let writer = Writer::start(s.rw, &s.certs);
    writer
        .wait_ack_from(s.cluster.members[0].pg_port, 0, DEADLINE)
        .await;
    let before = s.portal.status().await;
    let old_term = leader_term(&before).expect("a term");

    let started = Instant::now();
    block_in_place(|| s.cluster.kill9(0));
    let killed = writer.acks().len();
    let new = block_in_place(|| s.cluster.wait_new_leader(0));
    assert_eq!(new, 1);
    writer.wait_ack_from(b, killed, FAILOVER_DEADLINE).await;
    // For the log only (never asserted): dominated by Patroni's `ttl: 10`.
    eprintln!(
        "hard kill: first write acknowledged by b {:?} after the kill",
        started.elapsed()
    );
    let status = s
        .portal
        .wait_for("b leading on a newer timeline", |st| {
            leader(st).as_deref() == Some("b") && leader_term(st).is_some_and(|t| t > old_term)
        })
        .await;
    assert_eq!(member(&status, "a")["health"], "down", "{status:#}");

    // The killed member comes back (Patroni rewinds it) as a replica. It
    // may first run as a replica on its old timeline, before `pg_rewind`
    // (Patroni's `/replica` answers 200 then): the portal sends it no reads
    // until it reports b's timeline.
    block_in_place(|| s.cluster.restart(0));
    let back = s
        .portal
        .wait_for_within("a back as a replica of b", FAILOVER_DEADLINE, |st| {
            let replicas = replica_names(st);
            if replicas.iter().any(|r| r == "a") {
                assert_eq!(
                    member(st, "a")["term"],
                    member(st, "b")["term"],
                    "a takes reads on another timeline than the leader's: {st:#}"
                );
            }
            leader(st).as_deref() == Some("b") && replicas == ["a"]
        })
        .await;
    assert_eq!(member(&back, "a")["fenced"], serde_json::Value::Null);
    let ro = connect(s.ro, &s.certs).await.expect("session through ro");
    assert_eq!(
        server_port_of(&ro).await.expect("port"),
        s.cluster.members[0].pg_port
    );

    writer.stop().await;
}

/// The window check of `tests/e2e_patroni.rs` on made-up acknowledgements:
/// it counts a write acknowledged by the old primary only when it was sent
/// after the new primary was confirmed, and fires on such a write (here a
/// "truth" instant set deliberately early makes it fire).
#[test]
fn the_window_check_counts_writes_sent_after_the_promotion() {
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    let ack = |id, port, sent, acked| Ack {
        id,
        port,
        sent: at(sent),
        acked: at(acked),
    };
    let (a, b) = (5432, 5433);
    let acks = [
        ack(1, a, 0, 10),
        ack(2, a, 90, 120), // sent before the promotion at 100, acked after
        ack(3, b, 130, 140),
        ack(4, a, 150, 160), // sent after it: a violation
    ];
    let bad = acked_by_after(&acks, a, at(100));
    assert_eq!(bad.iter().map(|x| x.id).collect::<Vec<_>>(), [4]);
    assert!(acked_by_after(&acks, a, at(150)).is_empty());
    assert!(acked_by_after(&acks, b, at(0)).len() == 1);
    let fired = std::panic::catch_unwind(|| assert_none_acked_by_after("test", &acks, a, at(80)));
    let message = fired
        .expect_err("the check must fire")
        .downcast::<String>()
        .map(|m| *m)
        .unwrap_or_default();
    assert!(
        message.contains("2 write(s) acknowledged by the old primary (port 5432)")
            && message.contains("id 2 sent +10 ms, acked +40 ms"),
        "{message}"
    );
    assert_none_acked_by_after("test", &acks, a, at(150));
}
