//! Redis Sentinel as the DCS that names a Redis cluster's leader: a real
//! primary and replica, three real `redis-sentinel` processes (quorum 2) and a
//! portal whose cluster has `dcs: { sentinel: ... }`.

use crate::common;

use std::fs::OpenOptions;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use tempfile::TempDir;

const MASTER: &str = "portalmaster";

/// One `redis-sentinel` on a loopback port with its own (writable) config
/// file in a temporary directory. Killed (SIGKILL) on drop.
struct Sentinel {
    port: u16,
    dir: TempDir,
    child: Option<Child>,
}

impl Sentinel {
    fn start(primary: u16) -> Sentinel {
        let dir = TempDir::new().expect("temp dir for sentinel");
        let port = free_port();
        let config = format!(
            "port {port}\nbind 127.0.0.1\ndaemonize no\nprotected-mode no\ndir {dir}\n\
             sentinel resolve-hostnames no\n\
             sentinel monitor {MASTER} 127.0.0.1 {primary} 2\n\
             sentinel down-after-milliseconds {MASTER} 1000\n\
             sentinel failover-timeout {MASTER} 5000\n",
            dir = dir.path().display()
        );
        let path = dir.path().join("sentinel.conf");
        std::fs::write(&path, config).expect("write sentinel.conf");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.path().join("sentinel.log"))
            .expect("sentinel log file");
        let child = Command::new("redis-sentinel")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            .spawn()
            .expect("spawn redis-sentinel");
        let mut sentinel = Sentinel {
            port,
            dir,
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Reply::Simple(pong)) = query(port, &["PING"], Duration::from_millis(500)) {
                if pong == "PONG" {
                    return sentinel;
                }
            }
            if let Some(status) = sentinel
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "redis-sentinel on {port} exited with {status}:\n{}",
                    sentinel.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "redis-sentinel on {port} did not answer PING:\n{}",
                sentinel.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("sentinel.log")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `SENTINEL master NAME` as field -> value.
    fn master_field(&self, field: &str) -> Option<String> {
        let reply = query(
            self.port,
            &["SENTINEL", "master", MASTER],
            Duration::from_secs(2),
        )
        .ok()?;
        let Reply::Array(Some(items)) = reply else {
            return None;
        };
        let items: Vec<String> = items.iter().map(Reply::text).collect();
        items
            .chunks_exact(2)
            .find(|pair| pair[0] == field)
            .map(|pair| pair[1].clone())
    }

    /// The master's port as this Sentinel names it.
    fn named_port(&self) -> Option<u16> {
        let reply = query(
            self.port,
            &["SENTINEL", "get-master-addr-by-name", MASTER],
            Duration::from_secs(2),
        )
        .ok()?;
        match reply {
            Reply::Array(Some(items)) if items.len() == 2 => items[1].text().parse().ok(),
            _ => None,
        }
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            print_log_tail(&format!("redis-sentinel {}", self.port), &self.log(), 20);
        }
    }
}

/// A primary, its replica, and three Sentinels that all see the replica and
/// each other (so a failover can reach quorum and be authorised).
struct Setup {
    primary: RedisServer,
    replica: RedisServer,
    sentinels: Vec<Sentinel>,
    certs: Certs,
    ports: Ports,
    portal: Portal,
}

async fn setup() -> Setup {
    let (primary, replica) = primary_and_replica();
    let sentinels: Vec<Sentinel> = (0..3).map(|_| Sentinel::start(primary.port())).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = sentinels.iter().all(|s| {
            s.master_field("num-other-sentinels").as_deref() == Some("2")
                && s.master_field("num-slaves").as_deref() == Some("1")
        });
        if ready {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the Sentinels did not discover each other and the replica within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let certs = temp_certs();
    let config = PortalConfig::new(&certs, &[primary.port(), replica.port()]);
    let addresses: Vec<String> = sentinels.iter().map(Sentinel::address).collect();
    let dcs = format!(
        "    dcs:\n      sentinel:\n        addresses: [{}]\n        master_name: {MASTER}\n        \
         timeout: 2s\n    members:\n",
        addresses.join(", ")
    );
    let yaml = config.yaml().replacen("    members:\n", &dcs, 1);
    assert!(
        yaml.contains("sentinel:"),
        "dcs block not inserted:\n{yaml}"
    );
    let ports = config.ports;
    let portal = Portal::start(&yaml).await;
    Setup {
        primary,
        replica,
        sentinels,
        certs,
        ports,
        portal,
    }
}

fn dcs(status: &Value) -> &Value {
    &cluster(status)["dcs"]
}

fn dcs_term(status: &Value) -> u64 {
    dcs(status)["term"]
        .as_u64()
        .unwrap_or_else(|| panic!("/status dcs without a term: {status:#}"))
}

/// One write through a new session on the leader endpoint: the `tcp_port`
/// of the server that acknowledged `SET key value` with `OK`, or why not.
async fn write_through(port: u16, certs: &Certs, key: &str, value: &str) -> Result<u16, String> {
    let tls = tls_connect(port, &certs.ca, "localhost")
        .await
        .map_err(|err| format!("TLS connect: {err}"))?;
    let mut session = Resp::new(tls);
    let info = session
        .cmd_within(&["INFO", "server"], Duration::from_secs(5))
        .await
        .map_err(|err| format!("INFO server: {err}"))?;
    let server = tcp_port(&info).ok_or_else(|| info.text())?;
    let reply = session
        .cmd_within(&["SET", key, value], Duration::from_secs(5))
        .await
        .map_err(|err| format!("SET: {err}"))?;
    if reply.text() == "OK" {
        Ok(server)
    } else {
        Err(format!("SET on {server}: {}", reply.text()))
    }
}

/// Polls writes through the leader endpoint until one is acknowledged by the
/// server on `want`; panics with the last attempt after `limit`.
async fn wait_write_lands(port: u16, certs: &Certs, want: u16, limit: Duration) {
    let deadline = Instant::now() + limit;
    let mut i = 0u64;
    loop {
        i += 1;
        let key = format!("probe:{want}:{i}");
        let seen = write_through(port, certs, &key, "x").await;
        if seen == Ok(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no write through the portal landed on {want} within {limit:?}; last: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_names_the_leader_and_writes_land_on_it() {
    let s = setup().await;
    let status = s
        .portal
        .wait_for("dcs reachable, naming a, a leading", |st| {
            dcs(st)["source"] == "sentinel"
                && dcs(st)["state"] == "reachable"
                && dcs(st)["leader"] == "a"
                && leader(st).as_deref() == Some("a")
        })
        .await;
    let epoch = s.sentinels[0]
        .master_field("config-epoch")
        .and_then(|e| e.parse::<u64>().ok());
    assert_eq!(dcs(&status)["term"].as_u64(), epoch, "{status:#}");
    assert_eq!(member(&status, "b")["role"], "replica", "{status:#}");

    let landed = write_through(s.ports.rw, &s.certs, "sentinel:k", "v1")
        .await
        .unwrap_or_else(|err| panic!("write through the portal: {err}"));
    assert_eq!(landed, s.primary.port());
    assert_eq!(s.primary.cmd(&["GET", "sentinel:k"]), "v1");
    // The primary says so itself, too.
    let mut session = session(s.ports.rw, &s.certs).await;
    let role = session.cmd(&["ROLE"]).await.expect("ROLE");
    assert_eq!(role.first().map(Reply::text).as_deref(), Some("master"));
    drop(s.replica);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_is_followed_and_no_write_lands_elsewhere() {
    let mut s = setup().await;
    let before = s
        .portal
        .wait_for("a named and leading", |st| {
            dcs(st)["state"] == "reachable" && leader(st).as_deref() == Some("a")
        })
        .await;
    let term_before = dcs_term(&before);
    let old = s.primary.port();
    let new = s.replica.port();

    // A writer through the portal, recording who acknowledged each write and
    // when relative to the kill.
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let rw = s.ports.rw;
    let certs = s.certs.clone();
    let acks = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = acks.clone();
    let writer = tokio::spawn(async move {
        let mut acked: Vec<(u64, u16, Instant)> = Vec::new();
        let mut i = 0u64;
        while !*stop_rx.borrow() {
            i += 1;
            let key = format!("w:{i}");
            if let Ok(server) = write_through(rw, &certs, &key, &i.to_string()).await {
                acked.push((i, server, Instant::now()));
                counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                _ = stop_rx.changed() => {}
            }
        }
        acked
    });
    // The kill comes once the writer has a write acknowledged (by the
    // primary), however slow this machine is.
    let deadline = Instant::now() + DEADLINE;
    while acks.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        assert!(
            Instant::now() < deadline,
            "no write acknowledged before the kill"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    s.primary.kill9();
    let killed = Instant::now();

    // Sentinel fails over (down-after 1 s, so well within 20 s).
    let deadline = Instant::now() + Duration::from_secs(20);
    while !s.sentinels.iter().all(|x| x.named_port() == Some(new)) {
        assert!(
            Instant::now() < deadline,
            "Sentinel did not fail over to {new} within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let failed_over = killed.elapsed();

    let after = s
        .portal
        .wait_for("the portal follows Sentinel to b", |st| {
            dcs(st)["state"] == "reachable"
                && dcs(st)["leader"] == "b"
                && leader(st).as_deref() == Some("b")
        })
        .await;
    assert!(
        dcs_term(&after) > term_before,
        "config epoch did not grow: {term_before} -> {after:#}"
    );
    let epoch = s.sentinels[0]
        .master_field("config-epoch")
        .and_then(|e| e.parse::<u64>().ok());
    assert_eq!(dcs(&after)["term"].as_u64(), epoch, "{after:#}");
    wait_write_lands(rw, &s.certs, new, DEADLINE).await;

    // The old primary comes back empty, claiming master, until Sentinel
    // turns it into a replica (it waits several seconds before doing so).
    // Meanwhile it is a master Sentinel does not name: fenced, never written.
    s.primary.restart();
    let back = s
        .portal
        .wait_for_within(
            "a back, claiming master, fenced",
            Duration::from_secs(20),
            |st| member(st, "a")["role"] == "primary" && !member(st, "a")["fenced"].is_null(),
        )
        .await;
    assert_eq!(leader(&back).as_deref(), Some("b"), "{back:#}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = stop_tx.send(true);
    let acked = writer.await.expect("writer task");

    let after_kill: Vec<&(u64, u16, Instant)> =
        acked.iter().filter(|(_, _, at)| *at > killed).collect();
    assert!(
        acked
            .iter()
            .any(|(_, server, at)| *server == old && *at < killed),
        "no write landed on the primary before the kill: {acked:?}"
    );
    assert!(
        !after_kill.is_empty(),
        "no write was acknowledged after the failover"
    );
    for (i, server, _) in &after_kill {
        assert_eq!(
            *server, new,
            "write {i} was acknowledged by {server}, which Sentinel did not name"
        );
        // An acknowledged write is really on the member Sentinel names.
        assert_eq!(s.replica.cmd(&["GET", &format!("w:{i}")]), i.to_string());
    }
    let role = s.replica.cmd(&["ROLE"]);
    assert!(role.starts_with("master"), "{role}");
    eprintln!(
        "failover: Sentinel named {new} {failed_over:?} after the kill; epoch {term_before} -> {}; {} writes acked after the kill; restarted a fenced {}",
        dcs_term(&after),
        after_kill.len(),
        member(&back, "a")["fenced"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_sentinel_does_not_name_holds_writes_until_sentinel_demotes_it() {
    let s = setup().await;
    s.portal.wait_roles("a", &["b"]).await;
    // Behind Sentinel's back: b becomes a second master, on a replication
    // history that continues a's (it proves a newer term). The portal
    // cannot tell this from a failover Sentinel has not announced yet, so
    // neither leads (view rule 6): b is not named, a may be superseded.
    s.replica.promote();
    let claimed = Instant::now();
    let status = s
        .portal
        .wait_for_within(
            "b fenced not_dcs_leader and a fenced older_term",
            Duration::from_secs(30),
            |st| {
                member(st, "b")["role"] == "primary"
                    && member(st, "b")["fenced"] == "not_dcs_leader"
                    && member(st, "a")["fenced"] == "older_term"
            },
        )
        .await;
    assert_eq!(leader(&status), None, "{status:#}");
    assert_eq!(dcs(&status)["leader"], "a", "{status:#}");
    assert_eq!(
        cluster(&status)["no_leader"],
        "dcs_names_no_confirmed_leader",
        "{status:#}"
    );
    // A write now is held, then refused: it reaches neither master. (Unless
    // Sentinel already made b a replica again and a leads: then it lands
    // on a.)
    let held = write_through(s.ports.rw, &s.certs, "held", "v").await;
    let now = s.portal.status().await;
    match held {
        Err(err) => assert!(err.contains("TRYAGAIN"), "{err}"),
        Ok(port) => {
            assert_eq!(port, s.primary.port(), "a held write landed on b");
            assert_eq!(leader(&now).as_deref(), Some("a"), "{now:#}");
        }
    }
    // Sentinel makes b a replica of a again (+convert-to-slave): a leads
    // again, and writes land on it.
    let back = s
        .portal
        .wait_for_within(
            "Sentinel demoting b and a leading again",
            Duration::from_secs(60),
            |st| leader(st).as_deref() == Some("a") && member(st, "b")["role"] == "replica",
        )
        .await;
    assert!(member(&back, "a")["fenced"].is_null(), "{back:#}");
    for i in 0..5 {
        let key = format!("fenced:{i}");
        let landed = write_through(s.ports.rw, &s.certs, &key, "v")
            .await
            .unwrap_or_else(|err| panic!("write {i} through the portal: {err}"));
        assert_eq!(landed, s.primary.port(), "write {i}");
    }
    eprintln!(
        "b claimed master behind Sentinel's back; a led again {:?} later",
        claimed.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_sentinel_gone_the_last_leader_keeps_serving() {
    let mut s = setup().await;
    s.portal.wait_roles("a", &["b"]).await;
    for sentinel in &mut s.sentinels {
        sentinel.kill9();
    }
    let status = s
        .portal
        .wait_for("dcs unreachable", |st| dcs(st)["state"] == "unreachable")
        .await;
    assert!(dcs(&status)["last_term"].is_u64(), "{status:#}");
    assert!(dcs(&status)["error"].is_string(), "{status:#}");
    assert_eq!(leader(&status).as_deref(), Some("a"), "{status:#}");

    for i in 0..5 {
        let key = format!("nosentinel:{i}");
        let landed = write_through(s.ports.rw, &s.certs, &key, "v")
            .await
            .unwrap_or_else(|err| panic!("write {i} without Sentinels: {err}"));
        assert_eq!(landed, s.primary.port(), "write {i}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let status = s.portal.status().await;
    assert_eq!(dcs(&status)["state"], "unreachable", "{status:#}");
    assert_eq!(leader(&status).as_deref(), Some("a"), "{status:#}");

    // Only while its probe confirms it: with a gone too, nobody leads, and
    // no new leader is named without the DCS (b is a replica anyway).
    s.primary.kill9();
    let status = s
        .portal
        .wait_for("no leader once a is gone", |st| leader(st).is_none())
        .await;
    assert_eq!(dcs(&status)["state"], "unreachable", "{status:#}");
    let refused = write_through(s.ports.rw, &s.certs, "nosentinel:after", "v").await;
    assert!(refused.is_err(), "a write was acknowledged: {refused:?}");
}
