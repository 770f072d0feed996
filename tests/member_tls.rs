//! TLS towards every member-side service: Redis members that serve only a
//! TLS port (`backend_tls` on a Redis cluster, with the portal's client
//! certificate), Redis Sentinel on TLS only (`dcs.sentinel.tls`), and
//! Patroni with its REST API on HTTPS (`probe.api_tls`) keeping its keys in
//! an etcd that requires TLS and client certificates (`dcs.etcd.tls`).
//!
//! Every server here has no plaintext port at all (Redis and Sentinel
//! `port 0`, etcd `https://` client URLs only, Patroni `restapi.certfile`),
//! so whatever reaches it went over TLS; each certificate is valid only for
//! the names the test says, from a CA made for the test (`common::pki`).
//! The negative cases use a certificate from another CA, or no client
//! certificate, and expect the member down (or the DCS unreachable) and no
//! route.

use crate::common;

use std::fs::OpenOptions;
use std::io;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::etcd::EtcdCluster;
use common::patroni::*;
use common::pki::{tls_query, Leaf, Pki};
use common::*;
use rustls::ClientConfig;
use serde_json::Value;
use tempfile::TempDir;
use tokio::task::block_in_place;

/// The only name on the Redis members' and the Sentinel's certificates.
const REDIS_NAME: &str = "redis.internal";
const MASTER: &str = "portalmaster";

/// A `redis-server` (or `redis-sentinel`) that listens only on a TLS port,
/// in its own temporary directory. Killed (SIGKILL) on drop.
struct TlsRedis {
    port: u16,
    dir: TempDir,
    child: Option<Child>,
    /// How the test itself talks to it: trusting its CA, with a client
    /// certificate.
    client: Arc<ClientConfig>,
    what: &'static str,
}

/// The TLS settings of a Redis server: its certificate and the CA that
/// signs the client certificates (and the replicas') it accepts.
struct ServerTls<'a> {
    leaf: &'a Leaf,
    ca: &'a Path,
    /// `tls-auth-clients`: clients must present a certificate.
    auth_clients: bool,
}

impl ServerTls<'_> {
    fn directives(&self) -> String {
        format!(
            "tls-cert-file {}\ntls-key-file {}\ntls-ca-cert-file {}\ntls-replication yes\n\
             tls-auth-clients {}\n",
            self.leaf.cert.display(),
            self.leaf.key.display(),
            self.ca.display(),
            if self.auth_clients { "yes" } else { "no" }
        )
    }
}

impl TlsRedis {
    /// A Redis server on a TLS port only (`port 0`), a replica of
    /// `127.0.0.1:PORT` over TLS when `replica_of`.
    fn server(tls: &ServerTls, client: Arc<ClientConfig>, replica_of: Option<u16>) -> TlsRedis {
        let dir = TempDir::new().expect("temp dir for redis");
        let port = free_port();
        let mut config = format!(
            "port 0\ntls-port {port}\nbind 127.0.0.1\nsave \"\"\nappendonly no\ndaemonize no\n\
             repl-diskless-sync-delay 0\ndir {}\n{}",
            dir.path().display(),
            tls.directives()
        );
        if let Some(primary) = replica_of {
            config.push_str(&format!("replicaof 127.0.0.1 {primary}\n"));
        }
        TlsRedis::spawn("redis-server", "redis.conf", config, dir, port, client)
    }

    /// A Sentinel on a TLS port only, monitoring the master at
    /// `127.0.0.1:primary` (over TLS: `tls-replication yes`), quorum 1.
    fn sentinel(tls: &ServerTls, client: Arc<ClientConfig>, primary: u16) -> TlsRedis {
        let dir = TempDir::new().expect("temp dir for sentinel");
        let port = free_port();
        let config = format!(
            "port 0\ntls-port {port}\nbind 127.0.0.1\ndaemonize no\nprotected-mode no\ndir {}\n{}\
             sentinel resolve-hostnames no\n\
             sentinel monitor {MASTER} 127.0.0.1 {primary} 1\n\
             sentinel down-after-milliseconds {MASTER} 1000\n\
             sentinel failover-timeout {MASTER} 5000\n",
            dir.path().display(),
            tls.directives()
        );
        TlsRedis::spawn("redis-sentinel", "sentinel.conf", config, dir, port, client)
    }

    fn spawn(
        what: &'static str,
        file: &str,
        config: String,
        dir: TempDir,
        port: u16,
        client: Arc<ClientConfig>,
    ) -> TlsRedis {
        let path = dir.path().join(file);
        std::fs::write(&path, config).expect("write the server's config");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.path().join("server.log"))
            .expect("log file");
        let child = Command::new(what)
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|err| panic!("spawn {what}: {err}"));
        let mut server = TlsRedis {
            port,
            dir,
            child: Some(child),
            client,
            what,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Reply::Simple(pong)) = server.query(&["PING"]) {
                if pong == "PONG" {
                    return server;
                }
            }
            if let Some(status) = server
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("{what} on {port} exited with {status}:\n{}", server.log());
            }
            assert!(
                Instant::now() < deadline,
                "{what} on TLS port {port} did not answer PING:\n{}",
                server.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// One command over TLS, verifying the server as `REDIS_NAME`.
    fn query(&self, args: &[&str]) -> io::Result<Reply> {
        tls_query(
            self.port,
            self.client.clone(),
            REDIS_NAME,
            args,
            Duration::from_secs(2),
        )
    }

    fn cmd(&self, args: &[&str]) -> String {
        self.query(args)
            .unwrap_or_else(|err| panic!("{} {} {args:?}: {err}", self.what, self.port))
            .text()
    }

    /// Waits until this replica's link to its primary is up.
    fn wait_link_up(&self) {
        wait_replica_link(self.port, |args| self.cmd(args), || self.log());
    }
    /// The master's TLS port as this Sentinel names it.
    fn named_port(&self) -> Option<u16> {
        match self
            .query(&["SENTINEL", "get-master-addr-by-name", MASTER])
            .ok()?
        {
            Reply::Array(Some(items)) if items.len() == 2 => items[1].text().parse().ok(),
            _ => None,
        }
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            print_log_tail(&format!("{} {}", self.what, self.port), &self.log(), 20);
        }
    }
}

/// `yaml` (one cluster) with `block` right after its `protocol:` line.
fn after_protocol(yaml: &str, block: &str) -> String {
    let line = yaml
        .lines()
        .find(|l| l.starts_with("    protocol: "))
        .expect("a protocol line");
    yaml.replacen(&format!("{line}\n"), &format!("{line}\n{block}"), 1)
}

/// The TLS port of the Redis server a new session through the portal
/// endpoint on `port` reaches (`CONFIG GET tls-port`), or the error.
async fn reached_tls(port: u16, certs: &Certs) -> Result<u16, String> {
    let tls = tls_connect(port, &certs.ca, "localhost")
        .await
        .map_err(|err| format!("TLS connect: {err}"))?;
    let mut session = Resp::new(tls);
    let reply = session
        .cmd(&["CONFIG", "GET", "tls-port"])
        .await
        .map_err(|err| format!("CONFIG GET: {err}"))?;
    match &reply {
        Reply::Array(Some(items)) if items.len() == 2 => items[1]
            .text()
            .parse()
            .map_err(|_| format!("tls-port {:?}", items[1].text())),
        other => Err(other.text()),
    }
}

/// Polls new sessions through `port` until one reaches the server whose
/// TLS port is `want`.
async fn wait_reached_tls(port: u16, certs: &Certs, want: u16) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let seen = reached_tls(port, certs).await;
        if seen == Ok(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "endpoint {port} did not reach the server on TLS port {want}; last saw {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A TLS-only primary and replica (replicating over TLS, both requiring
/// client certificates), their CA, and the portal's client certificate.
struct RedisPair {
    primary: TlsRedis,
    replica: TlsRedis,
    pki: Pki,
    portal_leaf: Leaf,
    member_leaf: Leaf,
}

fn redis_pair() -> RedisPair {
    let pki = Pki::new("redis");
    let member_leaf = pki.leaf("redis", &[REDIS_NAME]);
    let portal_leaf = pki.leaf("portal", &["portal.internal"]);
    let harness = pki.leaf("harness", &["harness.internal"]);
    let client = pki.client_config(Some(&harness));
    let tls = ServerTls {
        leaf: &member_leaf,
        ca: &pki.ca,
        auth_clients: true,
    };
    let primary = TlsRedis::server(&tls, client.clone(), None);
    let replica = TlsRedis::server(&tls, client, Some(primary.port));
    replica.wait_link_up();
    RedisPair {
        primary,
        replica,
        pki,
        portal_leaf,
        member_leaf,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_members_on_tls_only_carry_sessions_and_a_failover() {
    let pair = block_in_place(redis_pair);
    let (p, r) = (pair.primary.port, pair.replica.port);
    // No client certificate, no session: the members really require one.
    let bare = tls_query(
        p,
        pair.pki.client_config(None),
        REDIS_NAME,
        &["PING"],
        Duration::from_secs(2),
    );
    assert!(
        bare.is_err(),
        "a client without a certificate got in: {bare:?}"
    );

    let certs = temp_certs();
    let config = PortalConfig::new(&certs, &[p, r]);
    let backend_tls = format!(
        "    backend_tls: {}\n",
        pair.pki.yaml(Some(REDIS_NAME), Some(&pair.portal_leaf))
    );
    let portal = Portal::start(&after_protocol(&config.yaml(), &backend_tls)).await;
    // Only a probe that speaks TLS with the client certificate and
    // verifies `redis.internal` sees either member.
    portal.wait_roles("a", &["b"]).await;

    let mut session = session(config.ports.rw, &certs).await;
    let set = session.cmd(&["SET", "k", "over tls"]).await.expect("SET");
    assert_eq!(set.text(), "OK");
    let got = session.cmd(&["GET", "k"]).await.expect("GET");
    assert_eq!(got.text(), "over tls");
    assert_eq!(reached_tls(config.ports.rw, &certs).await, Ok(p));
    assert_eq!(reached_tls(config.ports.ro, &certs).await, Ok(r));
    // The write is on the primary (and replicated, over TLS).
    assert_eq!(pair.primary.cmd(&["GET", "k"]), "over tls");

    // Failover: the replica is promoted, the old primary follows it.
    block_in_place(|| {
        assert_eq!(pair.replica.cmd(&["REPLICAOF", "NO", "ONE"]), "OK");
        let follow = pair
            .primary
            .cmd(&["REPLICAOF", "127.0.0.1", &r.to_string()]);
        assert_eq!(follow, "OK");
        pair.primary.wait_link_up();
    });
    portal.wait_roles("b", &["a"]).await;
    wait_reached_tls(config.ports.rw, &certs, r).await;
    let mut session = common::session(config.ports.rw, &certs).await;
    let set = session.cmd(&["SET", "k2", "after"]).await.expect("SET");
    assert_eq!(set.text(), "OK");
    assert_eq!(pair.replica.cmd(&["GET", "k2"]), "after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_member_from_another_ca_is_never_routed_to_until_its_ca_is_configured() {
    let theirs = Pki::new("theirs");
    let ours = Pki::new("ours");
    let leaf = theirs.leaf("redis", &[REDIS_NAME, "127.0.0.1"]);
    // Client certificates not required: only the portal's own check can
    // keep it from this member.
    let tls = ServerTls {
        leaf: &leaf,
        ca: &theirs.ca,
        auth_clients: false,
    };
    let untrusted = block_in_place(|| TlsRedis::server(&tls, theirs.client_config(None), None));

    let certs = temp_certs();
    let config = PortalConfig::new(&certs, &[untrusted.port]).hold_timeout("500ms");
    let backend_tls = format!("    backend_tls: {}\n", ours.yaml(None, None));
    let portal = Portal::start(&after_protocol(&config.yaml(), &backend_tls)).await;
    let status = portal
        .wait_for("the probe to refuse the member's certificate", |s| {
            member(s, "a")["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("certificate") || e.contains("UnknownIssuer"))
        })
        .await;
    assert!(leader(&status).is_none(), "{status:#}");
    assert_ne!(member(&status, "a")["health"], "up", "{status:#}");
    let refused = reached_tls(config.ports.rw, &certs).await;
    assert!(
        refused.as_ref().is_err_and(|e| e.contains("TRYAGAIN")),
        "a session reached the untrusted member: {refused:?}"
    );
    // Still down after several probe rounds (never up in between).
    tokio::time::sleep(Duration::from_millis(800)).await;
    let status = portal.status().await;
    assert!(leader(&status).is_none(), "{status:#}");
    assert_ne!(member(&status, "a")["health"], "up", "{status:#}");
    let up = portal
        .wait_metric("portal_member_up", &[("member", "a")], |v| v == 0.0)
        .await;
    assert_eq!(up, 0.0);

    // The operator puts the member's CA in the file the configuration
    // names (same path, new contents) and reloads: it is read again.
    std::fs::copy(&theirs.ca, &ours.ca).expect("replace the CA file");
    portal.signal("HUP");
    portal
        .wait_metric("portal_reloads_total", &[("result", "ok")], |v| v >= 1.0)
        .await;
    portal.wait_roles("a", &[]).await;
    assert_eq!(
        reached_tls(config.ports.rw, &certs).await,
        Ok(untrusted.port)
    );
}

/// One TLS-only Redis member (client certificates not required) and the
/// portal's `backend_tls` block trusting its CA.
fn lone_tls_member(pki: &Pki) -> (TlsRedis, Leaf, String) {
    let leaf = pki.leaf("redis", &[REDIS_NAME]);
    let tls = ServerTls {
        leaf: &leaf,
        ca: &pki.ca,
        auth_clients: false,
    };
    let server = TlsRedis::server(&tls, pki.client_config(None), None);
    let block = format!("    backend_tls: {}\n", pki.yaml(Some(REDIS_NAME), None));
    (server, leaf, block)
}

/// Waits until `name` is down with a `last_error` that `says` matches.
async fn wait_down(portal: &Portal, name: &str, why: &str, says: impl Fn(&str) -> bool) -> Value {
    portal
        .wait_for(why, |s| {
            let m = member(s, name);
            m["health"] != "up" && m["last_error"].as_str().is_some_and(&says)
        })
        .await
}

/// Gives `server` the certificate `leaf` for its new handshakes (as an
/// operator rotating it would); connections open keep the old one.
fn rotate_to(server: &TlsRedis, leaf: &Leaf) {
    let set = block_in_place(|| {
        server.cmd(&[
            "CONFIG",
            "SET",
            "tls-cert-file",
            &leaf.cert.display().to_string(),
            "tls-key-file",
            &leaf.key.display().to_string(),
        ])
    });
    assert_eq!(set, "OK");
}

fn about_the_certificate(error: &str) -> bool {
    error.contains("certificate") || error.contains("UnknownIssuer")
}

/// A member whose certificate stops verifying while the probe's older
/// connection still works (an operator rotated it to one from another CA)
/// must not stay up on that connection: the first session that fails to
/// verify it makes the probe check over a fresh connection. The periodic
/// reconnect is off, so nothing else can find it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_certificate_stops_verifying_goes_down_at_the_first_session_it_fails() {
    let pki = Pki::new("rotated");
    let (server, _leaf, backend_tls) = block_in_place(|| lone_tls_member(&pki));
    let other_ca = Pki::new("rogue");
    let rogue = other_ca.leaf("redis", &[REDIS_NAME]);

    let certs = temp_certs();
    let config = PortalConfig::new(&certs, &[server.port]).hold_timeout("1s");
    let yaml = with_reconnect_interval(&after_protocol(&config.yaml(), &backend_tls), "0s");
    let portal = Portal::start(&yaml).await;
    portal.wait_roles("a", &[]).await;
    assert_eq!(reached_tls(config.ports.rw, &certs).await, Ok(server.port));

    // New handshakes get the other CA's certificate; the probe's connection
    // was verified before.
    rotate_to(&server, &rogue);
    let refused = reached_tls(config.ports.rw, &certs).await;
    assert!(
        refused.as_ref().is_err_and(|e| e.contains("TRYAGAIN")),
        "a session reached a member whose certificate does not verify: {refused:?}"
    );
    let status = wait_down(
        &portal,
        "a",
        "the member down for its certificate",
        about_the_certificate,
    )
    .await;
    assert!(leader(&status).is_none(), "{status:#}");
    let (code, body) = portal.get("/ready/cluster/cache").await.expect("/ready");
    assert_eq!(code, 503, "{body}");
}

/// The same rotation with no client at all: the probe's connection is
/// replaced every `reconnect_interval`, so readiness tells the truth
/// without waiting for a client to fail first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_certificate_stops_verifying_goes_down_within_a_reconnect_interval() {
    let pki = Pki::new("expiring");
    let (server, _leaf, backend_tls) = block_in_place(|| lone_tls_member(&pki));
    let other_ca = Pki::new("rogue");
    let rogue = other_ca.leaf("redis", &[REDIS_NAME]);

    let certs = temp_certs();
    let config = PortalConfig::new(&certs, &[server.port]);
    let yaml = with_reconnect_interval(&after_protocol(&config.yaml(), &backend_tls), "1s");
    let portal = Portal::start(&yaml).await;
    portal.wait_roles("a", &[]).await;
    let (code, _) = portal.get("/ready/cluster/cache").await.expect("/ready");
    assert_eq!(code, 200);

    rotate_to(&server, &rogue);
    wait_down(
        &portal,
        "a",
        "the member down for its certificate, with no client",
        about_the_certificate,
    )
    .await;
    let (code, body) = portal.get("/ready/cluster/cache").await.expect("/ready");
    assert_eq!(code, 503, "{body}");
}

/// A member that takes no new connection (they are accepted, then never
/// answered) while the probe's connection keeps answering: the sessions
/// that time out connecting to it make the probe try a fresh connection,
/// which times out too, and the member goes down; it comes back once new
/// connections are answered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_answers_no_new_connection_goes_down_and_comes_back() {
    let pki = Pki::new("wedged");
    let (server, _leaf, backend_tls) = block_in_place(|| lone_tls_member(&pki));
    let relay = common::chaos::relay::Relay::start(server.port).await;

    let certs = temp_certs();
    let config = PortalConfig::new(&certs, &[relay.port]).hold_timeout("1s");
    let yaml = with_reconnect_interval(&after_protocol(&config.yaml(), &backend_tls), "0s");
    let portal = Portal::start(&yaml).await;
    portal.wait_roles("a", &[]).await;
    assert_eq!(reached_tls(config.ports.rw, &certs).await, Ok(server.port));

    relay.set(common::chaos::relay::Mode::StallNew);
    let refused = reached_tls(config.ports.rw, &certs).await;
    assert!(
        refused.as_ref().is_err_and(|e| e.contains("TRYAGAIN")),
        "{refused:?}"
    );
    let status = wait_down(
        &portal,
        "a",
        "the member down: no new connection answered",
        |e| e.contains("timed out") || e.contains("timeout"),
    )
    .await;
    assert!(leader(&status).is_none(), "{status:#}");

    relay.resume();
    portal.wait_roles("a", &[]).await;
    assert_eq!(reached_tls(config.ports.rw, &certs).await, Ok(server.port));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_on_tls_only_names_the_leader_and_its_failover() {
    let pair = block_in_place(redis_pair);
    let (p, r) = (pair.primary.port, pair.replica.port);
    let harness = pair.pki.leaf("harness-sentinel", &["harness.internal"]);
    let sentinel = block_in_place(|| {
        let tls = ServerTls {
            leaf: &pair.member_leaf,
            ca: &pair.pki.ca,
            auth_clients: true,
        };
        TlsRedis::sentinel(&tls, pair.pki.client_config(Some(&harness)), p)
    });

    let certs = temp_certs();
    let config = PortalConfig::new(&certs, &[p, r]);
    let client_tls = pair.pki.yaml(Some(REDIS_NAME), Some(&pair.portal_leaf));
    let block = format!(
        "    backend_tls: {client_tls}\n    dcs:\n      sentinel:\n        addresses: [\"{}\"]\n        \
         master_name: {MASTER}\n        timeout: 1s\n        tls: {client_tls}\n",
        sentinel.address()
    );
    let portal = Portal::start(&after_protocol(&config.yaml(), &block)).await;
    let status = portal
        .wait_for("Sentinel over TLS naming a, and a leading", |s| {
            let c = cluster(s);
            c["dcs"]["state"] == "reachable" && c["dcs"]["leader"] == "a" && c["leader"] == "a"
        })
        .await;
    assert_eq!(cluster(&status)["dcs"]["source"], "sentinel", "{status:#}");

    // A failover Sentinel runs (over TLS to both members), once it has
    // found the replica (it answers NOGOODSLAVE until then).
    block_in_place(|| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let reply = sentinel.cmd(&["SENTINEL", "FAILOVER", MASTER]);
            if reply == "OK" {
                break;
            }
            assert!(
                reply.starts_with("-NOGOODSLAVE") && Instant::now() < deadline,
                "SENTINEL FAILOVER: {reply}\n{}",
                sentinel.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        while sentinel.named_port() != Some(r) {
            assert!(
                Instant::now() < deadline,
                "Sentinel did not fail over to {r}:\n{}",
                sentinel.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    portal
        .wait_for("Sentinel naming b, and b leading", |s| {
            let c = cluster(s);
            c["dcs"]["leader"] == "b" && c["leader"] == "b"
        })
        .await;
    wait_reached_tls(config.ports.rw, &certs, r).await;
}

/// `yaml` of a learning, `check: patroni` portal with `api_tls` and the
/// etcd DCS's `tls` set to the given flow maps.
fn patroni_tls_yaml(yaml: &str, api_tls: &str, etcd_tls: &str) -> String {
    yaml.replacen(
        "      check: patroni\n",
        &format!("      check: patroni\n      api_tls: {api_tls}\n"),
        1,
    )
    .replacen(
        "        timeout: 2s\n",
        &format!("        timeout: 2s\n        tls: {etcd_tls}\n"),
        1,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patroni_on_https_with_its_keys_in_an_etcd_on_tls() {
    // One certificate for every server (etcd, each Patroni REST API, and
    // each agent as etcd's client), one for the portal as etcd's client.
    let pki = Pki::new("patroni");
    let server = pki.leaf("server", &["127.0.0.1", "localhost"]);
    let portal_leaf = pki.leaf("portal", &["portal.internal"]);
    let etcd =
        block_in_place(|| EtcdCluster::start_tls_client_auth(1, &pki.certs(&server), &server));
    let patroni_tls = PatroniTls {
        ca: pki.ca.clone(),
        cert: server.cert.clone(),
        key: server.key.clone(),
        client: pki.client_config(None),
    };
    let patroni =
        block_in_place(|| PatroniCluster::start_tls(&etcd.client_addresses(), 2, &patroni_tls));
    let certs = temp_certs();
    let (admin, rw, ro) = (free_port(), free_port(), free_port());
    let base = patroni.portal_yaml_learning_members(&certs, admin, rw, ro);
    let api_tls = pki.yaml(None, None);
    let etcd_tls = pki.yaml(None, Some(&portal_leaf));
    let portal = Portal::start(&patroni_tls_yaml(&base, &api_tls, &etcd_tls)).await;

    // The members come from the DCS over TLS, with their HTTPS api_url,
    // and only HTTPS probes can have told who leads.
    wait_roles_within(&portal, "a", &["b"], PATRONI_DEADLINE).await;
    let status = portal.status().await;
    for m in &patroni.members {
        let seen = member(&status, &m.name);
        assert_eq!(seen["from"], "dcs", "{status:#}");
        assert_eq!(
            seen["api"],
            format!("https://127.0.0.1:{}", m.api_port),
            "{status:#}"
        );
    }
    assert_eq!(cluster(&status)["dcs"]["state"], "reachable");
    let client = connect(rw, &certs).await.expect("session through rw");
    client
        .batch_execute("create table t (v int); insert into t values (1)")
        .await
        .unwrap_or_else(|err| panic!("write through rw: {}", common::pg::pg_error(&err)));
    let a = patroni.members[0].pg_port;
    assert_eq!(common::pg::server_port_of(&client).await.expect("port"), a);

    // Portals that cannot verify (another CA for Patroni's API; no client
    // certificate, or another CA, for etcd) never route.
    let other = Pki::new("other");
    let wrong_api = Portal::start(&patroni_tls_yaml(
        &patroni.portal_yaml_learning_members(&certs, free_port(), free_port(), free_port()),
        &other.yaml(None, None),
        &etcd_tls,
    ))
    .await;
    let no_client_cert = Portal::start(&patroni_tls_yaml(
        &patroni.portal_yaml_learning_members(&certs, free_port(), free_port(), free_port()),
        &api_tls,
        &pki.yaml(None, None),
    ))
    .await;
    let wrong_etcd = Portal::start(&patroni_tls_yaml(
        &patroni.portal_yaml_learning_members(&certs, free_port(), free_port(), free_port()),
        &api_tls,
        &other.yaml(None, Some(&portal_leaf)),
    ))
    .await;

    // The switchover reaches the portal through HTTPS probes and the TLS
    // DCS; a write lands on b.
    block_in_place(|| patroni.switchover(0, 1));
    wait_roles_within(&portal, "b", &["a"], PATRONI_DEADLINE).await;
    let b = patroni.members[1].pg_port;
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Ok(client) = connect(rw, &certs).await {
            if client
                .batch_execute("insert into t values (2)")
                .await
                .is_ok()
            {
                assert_eq!(common::pg::server_port_of(&client).await.expect("port"), b);
                break;
            }
        }
        assert!(Instant::now() < deadline, "no write through rw on b");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let status = wrong_api
        .wait_for("members learned but their HTTPS API refused", |s| {
            let c = cluster(s);
            c["dcs"]["state"] == "reachable"
                && c["members"].as_array().is_some_and(|m| m.len() == 2)
                && member(s, "a")["last_error"]
                    .as_str()
                    .is_some_and(|e| e.contains("certificate") || e.contains("UnknownIssuer"))
        })
        .await;
    assert!(leader(&status).is_none(), "{status:#}");
    for (name, portal) in [
        ("no client certificate", &no_client_cert),
        ("another CA", &wrong_etcd),
    ] {
        let status = portal
            .wait_for(&format!("the etcd DCS unreachable ({name})"), |s| {
                cluster(s)["dcs"]["state"] == "unreachable"
            })
            .await;
        let c = cluster(&status);
        assert!(c["leader"].is_null(), "{name}: {status:#}");
        assert_eq!(c["members"], serde_json::json!([]), "{name}: {status:#}");
    }
}
