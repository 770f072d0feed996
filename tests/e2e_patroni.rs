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
//!
//! A second cluster has a leader whose Patroni agent is frozen while its
//! PostgreSQL stays a writable primary after the other member is promoted:
//! no write through either portal (one probing Patroni, one probing
//! PostgreSQL) sent after that promotion may be acknowledged by the old
//! primary (see [`frozen_leader`]); an ignored sabotage test shows the check
//! firing when the portals keep sessions open across a leader change.

use crate::common;

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

/// One write through a two-host session; returns the port of the member
/// that committed it.
async fn two_host_write(
    config: &tokio_postgres::Config,
    certs: &Certs,
    id: i64,
) -> Result<u16, String> {
    let client = pg_connect_with(config, PgTls::new(&certs.ca))
        .await
        .map_err(|err| pg_error(&err))?;
    let row = client
        .query_one(
            "insert into writes (id) values ($1) returning inet_server_port()",
            &[&id],
        )
        .await
        .map_err(|err| pg_error(&err))?;
    Ok(row.get::<_, i32>(0) as u16)
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
        Ok(a),
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
    assert_eq!(two_host_write(&two_hosts, &certs, -2).await, Ok(b));

    // Hard kill of the leader b: a takes over on a newer timeline.
    block_in_place(|| cluster.kill9(1));
    let (n1, n2) = (w1.acks().len(), w2.acks().len());
    assert_eq!(block_in_place(|| cluster.wait_new_leader(1)), 0);
    w1.wait_ack_from(a, n1, FAILOVER_DEADLINE).await;
    w2.wait_ack_from(a, n2, FAILOVER_DEADLINE).await;
    let term3 = wait_agree(&[&portal1, &portal2], "a", term2, DEADLINE).await;
    assert!(term3 > term2 && term2 > term1, "{term1} {term2} {term3}");
    assert_eq!(two_host_write(&two_hosts, &certs, -3).await, Ok(a));

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
            Ok(a),
            "two-host client with portal 2 dead"
        );
    }

    let acks1 = w1.stop().await;
    let acks2 = w2.stop().await;
    for acks in [&acks1, &acks2] {
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

/// The old leader stays writable: a's Patroni agent is frozen (SIGSTOP,
/// the Python process only), so its leader key expires after `ttl` and b's
/// agent promotes b, while a's PostgreSQL runs on as a primary on the old
/// timeline and takes a write sent to it directly (the scenario proves it
/// twice: right after b's promotion and just before a's agent is thawed).
/// Portal 1 asks Patroni (`check: patroni`: a's frozen agent stops
/// answering), portal 2 asks PostgreSQL (`check: native`: a keeps answering
/// primary, so only the DCS and the timelines keep writes off it); both
/// watch the DCS. A writer through each portal runs all along. The truth
/// comes from outside the portals: b's Patroni `/primary` and b's
/// `pg_is_in_recovery()`, polled every 10 ms, say when b was promoted; from
/// then on a is not the primary, and a write the writer sent after that
/// instant and a acknowledged is a violation. Then writes resume on b, the
/// portals show a out of the way (portal 2: fenced), a stays frozen and
/// writable 2 s more while new sessions through both portals must land on
/// b, a's agent is thawed and demotes and rewinds a into a replica of b,
/// and still no write goes to a. `on_leader_change` is set on both
/// portals' endpoints (`close` is the default); `dcs: false` leaves portal
/// 2 without the DCS, with only its probes. `keep`, or no DCS, is a
/// sabotage that must make the check fire.
/// Returns the writes acknowledged through portal 1 and portal 2. The
/// cluster is dropped (a's agent thawed first) also when it panics.
async fn frozen_leader(on_leader_change: &str, dcs: bool) -> [Vec<Ack>; 2] {
    let t0 = Instant::now();
    let etcd = block_in_place(|| EtcdCluster::start(3));
    let mut cluster = block_in_place(|| PatroniCluster::start(&etcd.client_addresses(), 2));
    let (a, b) = (cluster.members[0].pg_port, cluster.members[1].pg_port);
    let certs = temp_certs();
    let password = certs.dir.join("postgres.password");
    std::fs::write(&password, SUPERUSER_PASSWORD).expect("write the probe's password file");
    let (p1, p2) = (PortalPorts::new(), PortalPorts::new());
    let endpoint_option = format!("route: leader\n        on_leader_change: {on_leader_change}\n");
    let yaml1 = cluster
        .portal_yaml_with_dcs(&certs, p1.admin, p1.rw, p1.ro)
        .replacen("route: leader\n", &endpoint_option, 1);
    let yaml2 = cluster
        .portal_yaml_native_with_dcs(&certs, p2.admin, p2.rw, p2.ro, &password)
        .replacen("route: leader\n", &endpoint_option, 1);
    let yaml2 = if dcs {
        yaml2
    } else {
        let (head, rest) = yaml2.split_once("    dcs:\n").expect("a dcs section");
        let (_, tail) = rest
            .split_once("    members:\n")
            .expect("a members section");
        format!("{head}    members:\n{tail}")
    };
    let portal1 = Portal::start(&yaml1).await;
    let portal2 = Portal::start(&yaml2).await;
    for portal in [&portal1, &portal2] {
        wait_roles_within(portal, "a", &["b"], DEADLINE).await;
    }
    if dcs {
        wait_agree(&[&portal1, &portal2], "a", 0, DEADLINE).await;
    }
    connect(p1.rw, &certs)
        .await
        .expect("session through portal 1")
        .batch_execute("create table writes (id int8 primary key)")
        .await
        .unwrap_or_else(|err| panic!("create table: {}", pg_error(&err)));
    let writers = [
        Writer::start(p1.rw, &certs),
        Writer::start_from(p2.rw, &certs, 1_000_000_000),
    ];
    for w in &writers {
        w.wait_ack_from(a, 0, DEADLINE).await;
    }
    eprintln!(
        "frozen leader: set up in {:.1}s",
        t0.elapsed().as_secs_f64()
    );

    // Freeze a's agent; watch b from outside the portals.
    let watch = PromotionWatch::start(&cluster, 1);
    let frozen = Instant::now();
    block_in_place(|| cluster.freeze_agent(0));
    assert!(cluster.postgres_runs(0), "a's PostgreSQL runs on");
    let promoted = watch.wait_primary(FAILOVER_DEADLINE).await;
    let counts: Vec<usize> = writers.iter().map(|w| w.acks().len()).collect();

    // Patroni's `/primary` on b may answer 200 before b's PostgreSQL has
    // left recovery (Patroni takes the role as it asks for the promotion):
    // the proof below needs b writable.
    let deadline = Instant::now() + DEADLINE;
    while watch.seen().pg_primary.is_none() {
        assert!(
            Instant::now() < deadline,
            "b did not leave recovery: {:?}",
            watch.seen()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // a is still a writable primary, on the old timeline: this is what
    // makes a write acknowledged by a after `promoted` a real split brain.
    let direct_write = |id: i64| async move {
        let c = direct(a).await;
        let row = c
            .query_one(
                "insert into writes (id) values ($1) \
                 returning inet_server_port(), pg_is_in_recovery(), \
                 ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int",
                &[&id],
            )
            .await
            .unwrap_or_else(|err| {
                panic!("direct write to a after b's promotion: {}", pg_error(&err))
            });
        let done = Instant::now();
        assert_eq!(row.get::<_, i32>(0) as u16, a);
        assert!(!row.get::<_, bool>(1), "a is in recovery");
        (done, row.get::<_, i32>(2))
    };
    let (first_direct, a_timeline) = direct_write(-10).await;
    let b_session = direct(b).await;
    let b_row = b_session
        .query_one(
            "select pg_is_in_recovery(), \
             ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int",
            &[],
        )
        .await
        .expect("b's role and timeline");
    assert!(!b_row.get::<_, bool>(0), "b is promoted");
    let b_timeline: i32 = b_row.get(1);
    assert!(
        first_direct > promoted && b_timeline > a_timeline,
        "a wrote on timeline {a_timeline} while b, promoted, is on timeline {b_timeline}"
    );

    // Writes resume on b, unless a write reaches a first (the check below
    // then says so, rather than a timeout).
    let deadline = Instant::now() + FAILOVER_DEADLINE;
    loop {
        let acks: Vec<Vec<Ack>> = writers.iter().map(Writer::acks).collect();
        let resumed = acks
            .iter()
            .zip(&counts)
            .all(|(acks, &n)| acks.iter().skip(n).any(|x| x.port == b));
        let violated = acks
            .iter()
            .any(|acks| !acked_by_after(acks, a, promoted).is_empty());
        if resumed || violated || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (i, w) in writers.iter().enumerate() {
        assert_none_acked_by_after(
            &format!("portal {} before a's agent was thawed", i + 1),
            &w.acks(),
            a,
            promoted,
        );
    }
    for (i, w) in writers.iter().enumerate() {
        assert!(
            w.acks().iter().skip(counts[i]).any(|x| x.port == b),
            "writes through portal {} did not resume on b within {FAILOVER_DEADLINE:?}; \
             last errors: {:?}",
            i + 1,
            w.last_errors(5)
        );
    }
    let resumed = Instant::now();

    // Both portals route to b and keep a out: portal 2 sees a claim
    // primary and fences it; portal 1 sees a's agent not answering.
    let fenced = portal2
        .wait_for("portal 2: b leading, a fenced", |st| {
            leader(st).as_deref() == Some("b")
                && matches!(
                    member(st, "a")["fenced"].as_str(),
                    Some("older_term" | "not_dcs_leader")
                )
        })
        .await;
    let out = portal1
        .wait_for("portal 1: b leading, a down or fenced", |st| {
            let m = member(st, "a");
            leader(st).as_deref() == Some("b") && (m["health"] == "down" || m["fenced"].is_string())
        })
        .await;
    eprintln!(
        "frozen leader: portal 1 shows a {}; portal 2 shows a {}",
        member(&out, "a"),
        member(&fenced, "a")
    );

    // Keep a frozen, and writable, for 2 s more: the writers go on, and
    // new sessions through each portal (as reconnecting clients open) must
    // reach b although a would take them; both portals keep b leading.
    let hold = Instant::now() + Duration::from_secs(2);
    let mut fresh: [Vec<Ack>; 2] = Default::default();
    let mut id = -1000;
    while Instant::now() < hold {
        for (i, (portal, rw)) in [(&portal1, p1.rw), (&portal2, p2.rw)]
            .into_iter()
            .enumerate()
        {
            id -= 1;
            let sent = Instant::now();
            let session = connect(rw, &certs)
                .await
                .unwrap_or_else(|err| panic!("new session through portal {}: {err}", i + 1));
            let row = session
                .query_one(
                    "insert into writes (id) values ($1) returning inet_server_port()",
                    &[&id],
                )
                .await
                .unwrap_or_else(|err| panic!("write through portal {}: {}", i + 1, pg_error(&err)));
            fresh[i].push(Ack {
                id,
                port: row.get::<_, i32>(0) as u16,
                sent,
                acked: Instant::now(),
            });
            let status = portal.status().await;
            assert_eq!(leader(&status).as_deref(), Some("b"), "{status:#}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (i, fresh) in fresh.iter().enumerate() {
        let what = format!("new sessions through portal {}", i + 1);
        assert_none_acked_by_after(&what, fresh, a, promoted);
        assert!(fresh.iter().all(|x| x.port == b), "{what}: {fresh:?}");
    }

    // a is still writable now, after the writers ran against the portals
    // with it writable all along; then its agent wakes up.
    let (last_direct, _) = direct_write(-11).await;
    // Patroni 3.0.2 may hand the leader key back to a when its agent wakes
    // (its etcd3 `_update_leader` puts the key when the cached leader's
    // lease is not its own); then b is demoted and rewound, and a is the
    // cluster's primary again (view rule 6, "when the DCS goes back").
    let key_back = PromotionWatch::start(&cluster, 0);
    block_in_place(|| cluster.thaw_agent(0));
    let thawed = Instant::now();
    let deadline = Instant::now() + FAILOVER_DEADLINE;
    let went_back = loop {
        let (s1, s2) = (portal1.status().await, portal2.status().await);
        let roles = |st: &serde_json::Value, l: &str, r: &str| {
            leader(st).as_deref() == Some(l) && replica_names(st) == [r]
        };
        if roles(&s1, "b", "a") && roles(&s2, "b", "a") {
            break None;
        }
        if let Some(at) = key_back.seen().key_named {
            if roles(&s1, "a", "b") && roles(&s2, "a", "b") {
                break Some(at);
            }
        }
        assert!(
            Instant::now() < deadline,
            "{FAILOVER_DEADLINE:?} after the thaw the portals show neither b leading (a its \
             replica) nor a leading again after the key went back: {s1:#} {s2:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    key_back.stop().await;
    let now_leading = if went_back.is_some() { a } else { b };
    let counts: Vec<usize> = writers.iter().map(|w| w.acks().len()).collect();
    for (w, n) in writers.iter().zip(counts) {
        w.wait_ack_from(now_leading, n + 3, DEADLINE).await;
    }
    let rejoined = Instant::now();
    let seen = watch.stop().await;
    let [w1, w2] = writers;
    let acks = [w1.stop().await, w2.stop().await];
    for (i, acks) in acks.iter().enumerate() {
        // Once the key went back, a is the primary again: writes it
        // acknowledges from then on are right.
        let before: Vec<Ack> = acks
            .iter()
            .filter(|x| went_back.is_none_or(|at| x.sent < at))
            .cloned()
            .collect();
        assert_none_acked_by_after(&format!("portal {}", i + 1), &before, a, promoted);
    }
    if let Some(at) = went_back {
        eprintln!(
            "frozen leader: Patroni gave the leader key back to a {:.3}s after the thaw; both \
             portals followed it once b was rewound",
            at.saturating_duration_since(thawed).as_secs_f64()
        );
    }
    let since = |t: Instant| format!("{:.3}s", t.saturating_duration_since(frozen).as_secs_f64());
    eprintln!(
        "frozen leader, instants after the freeze: b: {}; first direct write to a {}, last {}; \
         writes resumed on b by {}; {} new sessions through the portals, all on b; a thawed {}, \
         back as a replica of b and writes on b by {}",
        seen.describe(frozen),
        since(first_direct),
        since(last_direct),
        since(resumed),
        fresh[0].len() + fresh[1].len(),
        since(thawed),
        since(rejoined),
    );
    for (i, acks) in acks.iter().enumerate() {
        let last_a = acks.iter().filter(|x| x.port == a).map(|x| x.acked).max();
        let first_b = acks.iter().filter(|x| x.port == b).map(|x| x.acked).min();
        eprintln!(
            "frozen leader: portal {}: {} writes, last acknowledged by a at {}, first by b at {}",
            i + 1,
            acks.len(),
            last_a.map_or("-".into(), since),
            first_b.map_or("-".into(), since),
        );
    }
    eprintln!("frozen leader: {:.1}s in all", t0.elapsed().as_secs_f64());
    acks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_patroni_leaves_a_writable_old_primary_that_gets_no_writes_through_the_portals() {
    frozen_leader("close", true).await;
}

/// Runs [`frozen_leader`] with a sabotage and returns the check's message;
/// panics if the run passes or fails for another reason.
async fn sabotaged(on_leader_change: &'static str, dcs: bool) -> String {
    let outcome = tokio::spawn(frozen_leader(on_leader_change, dcs)).await;
    let Err(err) = outcome else {
        panic!(
            "the frozen-leader check did not fire (on_leader_change: {on_leader_change}, \
             dcs: {dcs})"
        );
    };
    let message = err
        .into_panic()
        .downcast::<String>()
        .map(|m| *m)
        .unwrap_or_default();
    eprintln!("sabotage: the check fired: {message}");
    assert!(
        message.contains("acknowledged by the old primary"),
        "the run failed, but not by the check: {message}"
    );
    message
}

/// Sabotage 1, showing the check above can fail: with
/// `on_leader_change: keep` a session opened to a while it led stays open
/// after a is fenced or down, so the writers go on writing to a, which
/// acknowledges, after b was promoted. Not run by default (each sabotage
/// takes about as long as the real test); run them with
/// `cargo test --test suite e2e_patroni:: -- --ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "sabotage: shows the frozen-leader check fires; run with --ignored"]
async fn sabotage_sessions_kept_on_the_old_primary_are_caught() {
    sabotaged("keep", true).await;
}

/// Sabotage 2: portal 2 without the DCS has only its probes (`check:
/// native`). It moves to b only when a probe of b reports the newer
/// timeline, up to a probe `interval` (200 ms) after the promotion, and
/// until then sends writes to a, which acknowledges them. (A probe may
/// catch b in time in a rare run; then this fails as "did not fire".)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "sabotage: shows the frozen-leader check fires; run with --ignored"]
async fn sabotage_a_portal_without_the_dcs_is_caught() {
    sabotaged("close", false).await;
}
