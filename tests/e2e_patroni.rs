//! The deployment the design aims at, end to end: three etcd members, two
//! PostgreSQL members run by Patroni, and TWO portal processes (on different
//! ports) watching Patroni's keys in etcd (the DCS names the leader) and
//! probing Patroni's REST API (which confirms it). Portal 1 lists no members
//! and starts before Patroni does: it learns every member from the watch
//! on Patroni's member keys. Portal 2 lists them.
//! Through a switchover and a hard kill of the leader, writes through both
//! portals resume on the new leader; both portals' `/status` agree on the
//! leader, its term and the DCS term after every change, and a sampler
//! checks them all along: no portal's term goes back, and a term never names
//! two different leaders across the portals. Killing one portal leaves the
//! other serving, and a
//! libpq-style client given both portals (two hosts,
//! `target_session_attrs=read-write`) keeps working.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::etcd::EtcdCluster;
use common::patroni::*;
use common::pg::*;
use common::*;
use tokio::task::block_in_place;
use tokio_postgres::config::TargetSessionAttrs;

const FAILOVER_DEADLINE: Duration = Duration::from_secs(60);

struct PortalPorts {
    admin: u16,
    rw: u16,
    ro: u16,
}

impl PortalPorts {
    fn new() -> PortalPorts {
        PortalPorts {
            admin: free_port(),
            rw: free_port(),
            ro: free_port(),
        }
    }
}

/// What one portal's `/status` says: leader, its term, and the DCS's
/// leader and term (the leader key's create revision).
type Said = (Option<String>, Option<u64>, Option<String>, Option<u64>);

fn said(status: &serde_json::Value) -> Said {
    let dcs = &cluster(status)["dcs"];
    (
        leader(status),
        leader_term(status),
        dcs["leader"].as_str().map(str::to_string),
        dcs["term"].as_u64(),
    )
}

/// Polls both portals until each names `name` leader with a term above
/// `above`, the DCS (reachable) names the same member, and both portals
/// say exactly the same; returns the term.
async fn wait_agree(portals: &[&Portal], name: &str, above: u64, limit: Duration) -> u64 {
    let deadline = Instant::now() + limit;
    loop {
        let mut seen = Vec::new();
        for p in portals {
            let status = p.status().await;
            assert_eq!(cluster(&status)["dcs"]["source"], "etcd", "{status:#}");
            seen.push(said(&status));
        }
        let first = seen[0].clone();
        if first.0.as_deref() == Some(name)
            && first.1.is_some_and(|t| t > above)
            && first.2.as_deref() == Some(name)
            && first.3.is_some()
            && seen.iter().all(|s| *s == first)
        {
            return first.1.unwrap_or(0);
        }
        assert!(
            Instant::now() < deadline,
            "the portals do not agree on leader {name} with a term above {above} within \
             {limit:?}: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `/status` of the portal whose admin listener is on `port`; `None` when
/// it does not answer (a portal being killed).
async fn status_at(port: u16) -> Option<serde_json::Value> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fetch = async {
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        tcp.write_all(b"GET /status HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .await
            .ok()?;
        let mut raw = Vec::new();
        tcp.read_to_end(&mut raw).await.ok()?;
        let text = String::from_utf8(raw).ok()?;
        serde_json::from_str(text.split_once("\r\n\r\n")?.1).ok()
    };
    tokio::time::timeout(Duration::from_secs(2), fetch)
        .await
        .ok()?
}

/// Samples both portals' `/status` every 20 ms while failovers happen.
struct Sampler {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<(usize, Said)>>,
}

impl Sampler {
    fn start(admins: [u16; 2]) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut samples = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                for (i, port) in admins.iter().enumerate() {
                    if let Some(status) = status_at(*port).await {
                        samples.push((i, said(&status)));
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            samples
        });
        Sampler { stop, task }
    }

    /// Stops and checks: per portal, the leader's term and the DCS term
    /// never go back; across portals, one term never names two leaders.
    async fn check(self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        let samples = self.task.await.expect("sampler task");
        let mut last: HashMap<usize, (u64, u64)> = HashMap::new();
        let mut term_leader: HashMap<u64, String> = HashMap::new();
        let mut dcs_leader: HashMap<u64, Option<String>> = HashMap::new();
        for (portal, (leader, term, dcs_name, dcs_term)) in &samples {
            let entry = last.entry(*portal).or_insert((0, 0));
            if let (Some(leader), Some(term)) = (leader, term) {
                assert!(
                    *term >= entry.0,
                    "portal {portal}: term went back to {term} from {}",
                    entry.0
                );
                entry.0 = *term;
                let first = term_leader.entry(*term).or_insert_with(|| leader.clone());
                assert_eq!(
                    first, leader,
                    "term {term} names two leaders across the portals"
                );
            }
            if let Some(dt) = dcs_term {
                assert!(
                    *dt >= entry.1,
                    "portal {portal}: DCS term went back to {dt} from {}",
                    entry.1
                );
                entry.1 = *dt;
                let first = dcs_leader.entry(*dt).or_insert_with(|| dcs_name.clone());
                assert_eq!(
                    first, dcs_name,
                    "DCS term {dt} names two leaders across the portals"
                );
            }
        }
        samples.len()
    }
}

/// A tokio-postgres configuration naming both portals' `rw` endpoints, as
/// libpq's `host=localhost,localhost port=P1,P2 target_session_attrs=read-write`.
fn two_host_config(rw: [u16; 2]) -> tokio_postgres::Config {
    let mut config = pg_config(rw[0]);
    config
        .host("localhost")
        .hostaddr([127, 0, 0, 1].into())
        .port(rw[1])
        .password(SUPERUSER_PASSWORD)
        .target_session_attrs(TargetSessionAttrs::ReadWrite)
        .connect_timeout(Duration::from_secs(5));
    config
}

/// One write through a two-host session; returns the member port that
/// committed it and whether that member was in recovery.
async fn two_host_write(
    config: &tokio_postgres::Config,
    certs: &Certs,
    id: i64,
) -> Result<(u16, bool), String> {
    let client = pg_connect_with(config, PgTls::new(&certs.ca))
        .await
        .map_err(|err| pg_error(&err))?;
    let row = client
        .query_one(
            "insert into writes (id) values ($1) \
             returning inet_server_port(), pg_is_in_recovery()",
            &[&id],
        )
        .await
        .map_err(|err| pg_error(&err))?;
    Ok((row.get::<_, i32>(0) as u16, row.get(1)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_portals_in_front_of_patroni_agree_and_survive_failovers() {
    let etcd = block_in_place(|| EtcdCluster::start(3));
    let mut cluster = PatroniCluster::prepare(&etcd.client_addresses(), 2);
    let (a, b) = (cluster.members[0].pg_port, cluster.members[1].pg_port);
    let certs = temp_certs();
    let (p1, p2) = (PortalPorts::new(), PortalPorts::new());
    let portal1 =
        Portal::start(&cluster.portal_yaml_learning_members(&certs, p1.admin, p1.rw, p1.ro)).await;
    let empty = portal1.status().await;
    assert_eq!(
        common::cluster(&empty)["members"],
        serde_json::json!([]),
        "{empty:#}"
    );
    block_in_place(|| cluster.launch());
    let mut portal2 =
        Portal::start(&cluster.portal_yaml_with_dcs(&certs, p2.admin, p2.rw, p2.ro)).await;
    let sampler = Sampler::start([p1.admin, p2.admin]);
    let term1 = wait_agree(&[&portal1, &portal2], "a", 0, DEADLINE).await;
    assert_eq!(term1, 1);
    // Portal 1 learned both members from the DCS, with the addresses
    // Patroni advertises; portal 2 uses its configured ones.
    let (status1, status2) = (portal1.status().await, portal2.status().await);
    for (i, m) in cluster.members.iter().enumerate() {
        let learned = member(&status1, &m.name);
        assert_eq!(learned["from"], "dcs", "{status1:#}");
        assert_eq!(learned["address"], format!("127.0.0.1:{}", m.pg_port));
        assert_eq!(learned["api"], format!("127.0.0.1:{}", m.api_port));
        assert_eq!(member(&status2, &m.name)["from"], "config", "member {i}");
    }

    let setup = connect(p1.rw, &certs)
        .await
        .expect("session through portal 1");
    setup
        .batch_execute("create table writes (id int8 primary key)")
        .await
        .unwrap_or_else(|err| panic!("create table: {}", pg_error(&err)));
    drop(setup);
    // Reads through either portal reach the replica, once both list it
    // (before that the replicas endpoint falls back to the leader).
    for portal in [&portal1, &portal2] {
        wait_roles_within(portal, "a", &["b"], DEADLINE).await;
    }
    for ro in [p1.ro, p2.ro] {
        let c = connect(ro, &certs).await.expect("session through ro");
        assert_eq!(server_port_of(&c).await.expect("port"), b);
    }
    let two_hosts = two_host_config([p1.rw, p2.rw]);
    assert_eq!(
        two_host_write(&two_hosts, &certs, -1).await,
        Ok((a, false)),
        "two-host client before any failover"
    );

    // Two writers, one through each portal, with disjoint ids.
    let w1 = Writer::start(p1.rw, &certs);
    let w2 = Writer::start_from(p2.rw, &certs, 1_000_000_000);
    w1.wait_ack_from(a, 0, DEADLINE).await;
    w2.wait_ack_from(a, 0, DEADLINE).await;

    // Switchover a -> b.
    block_in_place(|| cluster.switchover(0, 1));
    let (n1, n2) = (w1.acks().len(), w2.acks().len());
    w1.wait_ack_from(b, n1, DEADLINE).await;
    w2.wait_ack_from(b, n2, DEADLINE).await;
    let term2 = wait_agree(&[&portal1, &portal2], "b", term1, DEADLINE).await;
    block_in_place(|| cluster.wait_all_running());
    assert_eq!(two_host_write(&two_hosts, &certs, -2).await, Ok((b, false)));

    // Hard kill of the leader b: a takes over on a newer timeline.
    block_in_place(|| cluster.kill9(1));
    let (n1, n2) = (w1.acks().len(), w2.acks().len());
    assert_eq!(block_in_place(|| cluster.wait_new_leader(1)), 0);
    w1.wait_ack_from(a, n1, FAILOVER_DEADLINE).await;
    w2.wait_ack_from(a, n2, FAILOVER_DEADLINE).await;
    let term3 = wait_agree(&[&portal1, &portal2], "a", term2, DEADLINE).await;
    assert!(term3 > term2 && term2 > term1, "{term1} {term2} {term3}");
    assert_eq!(two_host_write(&two_hosts, &certs, -3).await, Ok((a, false)));

    let samples = sampler.check().await;
    assert!(samples > 20, "the sampler saw only {samples} answers");

    // Kill portal 2 hard: portal 1 keeps serving its writer, and the
    // two-host client falls over to portal 1.
    let _ = std::process::Command::new("kill")
        .args(["-9", &portal2.pid().to_string()])
        .status();
    assert!(
        portal2.wait_exit(Duration::from_secs(10)).await.is_some(),
        "portal 2 did not die"
    );
    let n1 = w1.acks().len();
    tokio::time::sleep(Duration::from_millis(500)).await;
    w1.wait_ack_from(a, n1 + 5, DEADLINE).await;
    let two_hosts_reversed = two_host_config([p2.rw, p1.rw]);
    for (id, config) in [(-4, &two_hosts), (-5, &two_hosts_reversed)] {
        assert_eq!(
            two_host_write(config, &certs, id).await,
            Ok((a, false)),
            "two-host client with portal 2 dead"
        );
    }

    let acks1 = w1.stop().await;
    let acks2 = w2.stop().await;
    for acks in [&acks1, &acks2] {
        assert_no_ack_in_recovery(acks);
        for (port, name) in [(a, "a"), (b, "b")] {
            assert!(
                acks.iter().any(|x| x.port == port),
                "no write acknowledged by {name}"
            );
        }
    }
    let status = portal1.status().await;
    assert_eq!(member(&status, "b")["health"], "down", "{status:#}");
}
