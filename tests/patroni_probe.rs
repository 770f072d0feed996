//! A portal with `probe.check: patroni` in front of a real Patroni cluster
//! (three etcd members, two PostgreSQL 15 members run by Patroni): writes
//! through the TLS leader endpoint reach Patroni's leader, follow a
//! `patronictl switchover` and a hard kill of the leader, and are never
//! acknowledged by a member in recovery; `/status` shows the new leader
//! with its newer timeline as the term.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    _etcd: Etcd,
    certs: Certs,
    rw: u16,
    ro: u16,
}

async fn setup() -> Setup {
    let etcd = block_in_place(|| Etcd::start(3));
    let cluster = block_in_place(|| PatroniCluster::start(&etcd.hosts(), 2));
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

/// tokio-postgres through the portal endpoint on `port` (TLS via
/// `SSLRequest`, the portal verified as `localhost`), logging in with the
/// superuser's password.
async fn connect(port: u16, certs: &Certs) -> Result<tokio_postgres::Client, String> {
    let mut config = pg_config(port);
    config
        .password(SUPERUSER_PASSWORD)
        .connect_timeout(Duration::from_secs(5));
    pg_connect_with(&config, PgTls::new(&certs.ca))
        .await
        .map_err(|err| pg_error(&err))
}

/// A session straight to a member, bypassing the portal.
async fn direct(port: u16) -> tokio_postgres::Client {
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(port)
        .user(SUPERUSER)
        .password(SUPERUSER_PASSWORD)
        .dbname("postgres");
    pg_connect_with(&config, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|err| panic!("direct session to {port}: {}", pg_error(&err)))
}

/// One acknowledged write: its id, the port of the member that committed
/// it, and whether that member said it was in recovery.
#[derive(Debug, Clone, Copy)]
struct Ack {
    id: i64,
    port: u16,
    in_recovery: bool,
}

/// Writes through the portal's leader endpoint in a loop, reconnecting
/// after any error, until stopped. Each write reports, in the same
/// statement, `pg_is_in_recovery()` and `inet_server_port()` of the member
/// that committed it.
struct Writer {
    acks: Arc<Mutex<Vec<Ack>>>,
    errors: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    fn start(port: u16, certs: &Certs) -> Writer {
        let acks = Arc::new(Mutex::new(Vec::new()));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let certs = certs.clone();
        let task = tokio::spawn({
            let (acks, errors, stop) = (acks.clone(), errors.clone(), stop.clone());
            async move {
                let mut client = None;
                let mut id: i64 = 0;
                while !stop.load(Ordering::Relaxed) {
                    if client.is_none() {
                        match connect(port, &certs).await {
                            Ok(c) => client = Some(c),
                            Err(err) => {
                                errors
                                    .lock()
                                    .expect("errors")
                                    .push(format!("connect: {err}"));
                                tokio::time::sleep(Duration::from_millis(50)).await;
                                continue;
                            }
                        }
                    }
                    let Some(c) = client.as_ref() else { continue };
                    id += 1;
                    let answer = tokio::time::timeout(
                        Duration::from_secs(5),
                        c.query_one(
                            "insert into writes (id) values ($1) \
                             returning pg_is_in_recovery(), inet_server_port()",
                            &[&id],
                        ),
                    )
                    .await;
                    match answer {
                        Ok(Ok(row)) => {
                            let in_recovery: bool = row.get(0);
                            let port: i32 = row.get(1);
                            acks.lock().expect("acks").push(Ack {
                                id,
                                port: port as u16,
                                in_recovery,
                            });
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Ok(Err(err)) => {
                            errors.lock().expect("errors").push(pg_error(&err));
                            client = None;
                        }
                        Err(_) => {
                            errors
                                .lock()
                                .expect("errors")
                                .push("write timed out".into());
                            client = None;
                        }
                    }
                }
            }
        });
        Writer {
            acks,
            errors,
            stop,
            task,
        }
    }

    fn acks(&self) -> Vec<Ack> {
        self.acks.lock().expect("acks").clone()
    }

    /// Waits until a write acknowledged by the member on `port` arrives
    /// after `after` acknowledgements; panics after `limit`.
    async fn wait_ack_from(&self, port: u16, after: usize, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            if self.acks().iter().skip(after).any(|a| a.port == port) {
                return;
            }
            if Instant::now() > deadline {
                let errors = self.errors.lock().expect("errors").clone();
                let last: Vec<&String> = errors.iter().rev().take(5).collect();
                panic!(
                    "no write acknowledged by the member on {port} within {limit:?}; \
                     last errors: {last:?}; acks: {}",
                    self.acks().len()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn stop(self) -> Vec<Ack> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        let acks = self.acks.lock().expect("acks").clone();
        acks
    }
}

/// The leader's term (timeline) as `/status` shows it.
fn leader_term(status: &serde_json::Value) -> Option<u64> {
    let name = leader(status)?;
    member(status, &name)["term"].as_str()?.parse().ok()
}

async fn wait_roles_within(portal: &Portal, name: &str, replicas: &[&str], limit: Duration) {
    portal
        .wait_for_within(
            &format!("leader {name} with replicas {replicas:?}"),
            limit,
            |st| cluster(st)["leader"] == name && replica_names(st) == replicas,
        )
        .await;
}

fn assert_no_ack_in_recovery(acks: &[Ack]) {
    let bad: Vec<&Ack> = acks.iter().filter(|a| a.in_recovery).collect();
    assert!(
        bad.is_empty(),
        "writes acknowledged by a member in recovery: {bad:?}"
    );
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

    block_in_place(|| s.cluster.switchover(0, 1));
    let switched = writer.acks().len();
    writer.wait_ack_from(b, switched, DEADLINE).await;
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

    assert_no_ack_in_recovery(&acks);
    // Once the portal followed the switchover, every write lands on b.
    let first_on_b = acks.iter().position(|x| x.port == b).expect("a write on b");
    let stray: Vec<&Ack> = acks[first_on_b..].iter().filter(|x| x.port != b).collect();
    assert!(stray.is_empty(), "writes on a after b took over: {stray:?}");
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

    block_in_place(|| s.cluster.kill9(0));
    let killed = writer.acks().len();
    let new = block_in_place(|| s.cluster.wait_new_leader(0));
    assert_eq!(new, 1);
    writer.wait_ack_from(b, killed, FAILOVER_DEADLINE).await;
    let status = s
        .portal
        .wait_for("b leading on a newer timeline", |st| {
            leader(st).as_deref() == Some("b") && leader_term(st).is_some_and(|t| t > old_term)
        })
        .await;
    assert_eq!(member(&status, "a")["health"], "down", "{status:#}");

    // The killed member comes back (Patroni rewinds it) as a replica.
    block_in_place(|| s.cluster.restart(0));
    block_in_place(|| s.cluster.wait_all_running());
    wait_roles_within(&s.portal, "b", &["a"], FAILOVER_DEADLINE).await;
    let ro = connect(s.ro, &s.certs).await.expect("session through ro");
    assert_eq!(
        server_port_of(&ro).await.expect("port"),
        s.cluster.members[0].pg_port
    );

    let acks = writer.stop().await;
    assert_no_ack_in_recovery(&acks);
    let first_on_b = acks.iter().position(|x| x.port == b).expect("a write on b");
    let stray: Vec<&Ack> = acks[first_on_b..].iter().filter(|x| x.port != b).collect();
    assert!(stray.is_empty(), "writes on a after b took over: {stray:?}");
}
