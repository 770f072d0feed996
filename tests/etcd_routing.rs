//! etcd as a routed protocol: a real 3-member etcd 3.4 cluster behind the
//! portal, driven with the stock `etcdctl` over TLS
//! (`--endpoints=localhost:PORT --cacert CA`).

use crate::common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::etcd::{etcdctl, etcdctl_command, EtcdCluster};
use common::*;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Admin port and the three endpoints of an etcd portal.
struct EtcdPorts {
    admin: u16,
    leader: u16,
    replicas: u16,
    any: u16,
}

/// A portal config for `etcd`: endpoints `kv-leader`, `kv-replicas` and
/// `kv-any`; with `backend_ca`, TLS to the members verified with that CA.
fn etcd_yaml(
    etcd: &EtcdCluster,
    certs: &Certs,
    ports: &EtcdPorts,
    hold: &str,
    backend_ca: Option<&Path>,
) -> String {
    let mut y = format!(
        "admin:\n  listen: 127.0.0.1:{}\n\nclusters:\n  - name: kv\n    protocol: etcd\n    \
         probe:\n      interval: 200ms\n      fast_interval: 20ms\n      timeout: 500ms\n      \
         rise: 2\n      fall: 2\n    members:\n",
        ports.admin
    );
    if let Some(ca) = backend_ca {
        y = y.replace(
            "    members:\n",
            &format!(
                "    backend_tls:\n      ca: {}\n    members:\n",
                ca.display()
            ),
        );
    }
    for i in 0..etcd.len() {
        y.push_str(&format!(
            "      - name: {}\n        address: {}\n",
            etcd.name(i),
            etcd.client_address(i)
        ));
    }
    y.push_str("    endpoints:\n");
    for (name, port, route) in [
        ("kv-leader", ports.leader, "leader"),
        ("kv-replicas", ports.replicas, "replicas"),
        ("kv-any", ports.any, "any"),
    ] {
        y.push_str(&format!(
            "      - name: {name}\n        listen: 127.0.0.1:{port}\n        route: {route}\n        \
             tls:\n          cert: {}\n          key: {}\n        hold_timeout: {hold}\n",
            certs.cert.display(),
            certs.key.display(),
        ));
    }
    y
}

fn ports() -> EtcdPorts {
    EtcdPorts {
        admin: free_port(),
        leader: free_port(),
        replicas: free_port(),
        any: free_port(),
    }
}

/// `etcdctl ARGS` through the portal endpoint on `port`, validating the
/// portal as `localhost` with the generated CA.
fn via(port: u16, ca: &Path, args: &[&str]) -> std::process::Output {
    etcdctl(&format!("localhost:{port}"), Some(ca), args)
}

fn text(out: &std::process::Output) -> String {
    format!(
        "status {}; stdout: {}; stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    )
}

/// The etcd member id of the member a new session through `port` reaches
/// (`etcdctl endpoint status` reports the answering member's id).
fn reached_id(port: u16, ca: &Path) -> Result<u64, String> {
    let out = via(port, ca, &["endpoint", "status", "-w", "json"]);
    if !out.status.success() {
        return Err(text(&out));
    }
    let json: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|err| format!("{err}: {}", text(&out)))?;
    json[0]["Status"]["header"]["member_id"]
        .as_u64()
        .ok_or_else(|| text(&out))
}

/// Retries `etcdctl put` through `port` until it succeeds (a failover may
/// be in progress), up to `DEADLINE`.
fn put_until_ok(port: u16, ca: &Path, key: &str, value: &str) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let out = via(port, ca, &["put", key, value]);
        if out.status.success() && String::from_utf8_lossy(&out.stdout).contains("OK") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "put {key} through port {port} did not succeed: {}",
            text(&out)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn get(port: u16, ca: &Path, key: &str) -> String {
    let out = via(port, ca, &["get", key, "--print-value-only"]);
    assert!(out.status.success(), "get {key}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A long-running `etcdctl watch KEY` through the portal; its output lines
/// arrive on a channel. Killed on drop.
struct Watch {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Watch {
    fn start(port: u16, ca: &Path, key: &str) -> Watch {
        let mut command = etcdctl_command(&format!("localhost:{port}"), Some(ca));
        let mut child = command
            .args(["watch", key])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn etcdctl watch");
        let stdout = child.stdout.take().expect("watch stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Watch { child, lines }
    }

    /// Calls `put` (which writes `value` somewhere) every 300 ms until the
    /// watch prints `value`; panics after `DEADLINE`.
    fn wait_for(&mut self, value: &str, put: impl Fn()) {
        let deadline = Instant::now() + DEADLINE;
        let mut seen = Vec::new();
        loop {
            put();
            let until = Instant::now() + Duration::from_millis(300);
            while let Some(left) = until.checked_duration_since(Instant::now()) {
                match self.lines.recv_timeout(left) {
                    Ok(line) if line == value => return,
                    Ok(line) => seen.push(line),
                    Err(_) => break,
                }
            }
            assert!(
                Instant::now() < deadline,
                "watch never printed {value:?}; it printed {seen:?}; running: {:?}",
                self.child.try_wait()
            );
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start(hold: &str) -> (EtcdCluster, Certs, EtcdPorts, Portal) {
    let etcd = EtcdCluster::start(3);
    let certs = temp_certs();
    let ports = ports();
    let portal = Portal::start(&etcd_yaml(&etcd, &certs, &ports, hold, None)).await;
    (etcd, certs, ports, portal)
}

/// Waits until `/status` names member `i` leader with the term etcd reports.
async fn wait_portal_leader(portal: &Portal, etcd: &EtcdCluster, i: usize) -> serde_json::Value {
    let name = etcd.name(i).to_string();
    // The term shown is the one of the leader's last report: right after an
    // election etcd may already be a term further (a probe that timed out
    // keeps the member's last claim), so wait until both say the same.
    portal
        .wait_for(&format!("leader {name} on etcd's raft_term"), |s| {
            leader(s).as_deref() == Some(name.as_str())
                && etcd.status(i).is_some_and(|raft| {
                    member(s, &name)["term"] == serde_json::json!(raft.raft_term.to_string())
                })
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_get_watch_and_status_through_the_portal() {
    let (etcd, certs, ports, portal) = start("5s").await;
    let leader_index = etcd.leader();
    let status = wait_portal_leader(&portal, &etcd, leader_index).await;
    let followers: Vec<String> = (0..3)
        .filter(|&i| i != leader_index)
        .map(|i| etcd.name(i).to_string())
        .collect();
    portal
        .wait_for("both followers as replicas", |s| {
            let mut r = replica_names(s);
            r.sort();
            r == followers
        })
        .await;
    assert_eq!(
        member(&status, etcd.name(leader_index))["role"],
        "primary",
        "{status:#}"
    );

    put_until_ok(ports.leader, &certs.ca, "greeting", "hello");
    assert_eq!(get(ports.leader, &certs.ca, "greeting"), "hello");
    assert_eq!(get(ports.replicas, &certs.ca, "greeting"), "hello");
    assert_eq!(get(ports.any, &certs.ca, "greeting"), "hello");
    // The direct view agrees.
    let direct = etcd.etcdctl(0, &["get", "greeting", "--print-value-only"]);
    assert_eq!(String::from_utf8_lossy(&direct.stdout).trim(), "hello");

    // Routes reach the members they name.
    let leader_id = etcd.status(leader_index).expect("leader status").member_id;
    assert_eq!(reached_id(ports.leader, &certs.ca), Ok(leader_id));
    for _ in 0..4 {
        let id = reached_id(ports.replicas, &certs.ca).expect("replicas endpoint");
        assert_ne!(id, leader_id, "the replicas route reached the leader");
    }

    // A watch through the portal sees a put made directly on a member.
    let follower = (0..3).find(|&i| i != leader_index).expect("a follower");
    let mut watch = Watch::start(ports.leader, &certs.ca, "news");
    watch.wait_for("direct-put", || {
        let out = etcd.etcdctl(follower, &["put", "news", "direct-put"]);
        assert!(out.status.success(), "direct put: {}", text(&out));
    });
    drop(portal);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_moves_the_leader_endpoint() {
    let (mut etcd, certs, ports, portal) = start("5s").await;
    let old = etcd.leader();
    wait_portal_leader(&portal, &etcd, old).await;
    put_until_ok(ports.leader, &certs.ca, "k", "before");
    let old_term = etcd.status(old).expect("status").raft_term;

    etcd.kill9(old);
    let new = etcd.wait_leader_except(old);
    let status = wait_portal_leader(&portal, &etcd, new).await;
    let new_status = etcd.status(new).expect("new leader status");
    assert!(new_status.raft_term > old_term, "{status:#}");

    put_until_ok(ports.leader, &certs.ca, "k", "after");
    assert_eq!(get(ports.leader, &certs.ca, "k"), "after");
    assert_eq!(
        reached_id(ports.leader, &certs.ca),
        Ok(new_status.member_id)
    );
    assert_eq!(
        member(&status, etcd.name(old))["health"],
        "down",
        "{status:#}"
    );
    // The dead member's probe failed hard (connection refused), not by timeout.
    portal
        .wait_metric(
            "portal_probe_failures_total",
            &[("member", etcd.name(old)), ("kind", "hard")],
            |v| v >= 1.0,
        )
        .await;

    // The old leader comes back as a follower of the new one.
    etcd.restart(old);
    wait_portal_leader(&portal, &etcd, new).await;
    portal
        .wait_for("the restarted member as a replica", |s| {
            replica_names(s).iter().any(|r| r == etcd.name(old))
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_and_garbage_clients_are_dropped_while_a_session_works() {
    let (etcd, certs, ports, portal) = start("5s").await;
    let leader_index = etcd.leader();
    wait_portal_leader(&portal, &etcd, leader_index).await;
    let mut watch = Watch::start(ports.leader, &certs.ca, "live");
    watch.wait_for("one", || put_until_ok(ports.any, &certs.ca, "live", "one"));

    // etcdctl without TLS speaks h2c: refused at the HTTP/2 level.
    let plain = etcdctl(
        &format!("127.0.0.1:{}", ports.leader),
        None,
        &["get", "live", "--command-timeout=2s"],
    );
    assert!(
        !plain.status.success(),
        "plaintext etcdctl: {}",
        text(&plain)
    );
    assert!(
        String::from_utf8_lossy(&plain.stderr).contains("requires TLS"),
        "the refusal names TLS: {}",
        text(&plain)
    );

    // Garbage: no answer, closed.
    let (answer, ending) =
        exchange_raw(ports.leader, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 1 << 16).await;
    assert_eq!(ending, Ending::Closed, "garbage was not dropped");
    assert!(
        answer.is_empty(),
        "garbage got an answer: {:?}",
        String::from_utf8_lossy(&answer)
    );
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", ports.leader))
        .await
        .expect("connect");
    tcp.write_all(&[0x16, 0x03, 0x01, 0x00, 0x05, 0xde, 0xad, 0xbe, 0xef, 0x00])
        .await
        .expect("send junk");
    let mut buf = [0u8; 256];
    let closed = tokio::time::timeout(DEADLINE, async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "a broken TLS record was not dropped");

    // The parallel session is untouched.
    watch.wait_for("two", || {
        put_until_ok(ports.leader, &certs.ca, "live", "two")
    });
    let metrics = portal.metrics().await;
    assert!(
        metric(
            &metrics,
            "portal_tls_handshake_failures_total",
            &[("endpoint", "kv-leader"), ("reason", "not_tls")]
        )
        .unwrap_or(0.0)
            >= 2.0,
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_raft_leader_clients_get_a_grpc_refusal() {
    let (mut etcd, certs, ports, portal) = start("500ms").await;
    let leader_index = etcd.leader();
    wait_portal_leader(&portal, &etcd, leader_index).await;
    // Two of three gone: the survivor cannot elect a leader.
    let survivor = (leader_index + 1) % 3;
    for i in (0..3).filter(|&i| i != survivor) {
        etcd.kill9(i);
    }
    portal.wait_for("no leader", |s| leader(s).is_none()).await;
    let out = via(
        ports.leader,
        &certs.ca,
        &["put", "k", "v", "--command-timeout=3s"],
    );
    assert!(
        !out.status.success(),
        "put without a leader: {}",
        text(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("portal: no leader for cluster"),
        "etcdctl shows the portal's reason: {}",
        text(&out)
    );
    portal
        .wait_metric(
            "portal_connections_refused_total",
            &[("endpoint", "kv-leader"), ("reason", "no_leader")],
            |v| v >= 1.0,
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_the_members_with_alpn_h2() {
    let certs = temp_certs();
    let etcd = EtcdCluster::start_tls(3, &certs);
    let ports = ports();
    let portal = Portal::start(&etcd_yaml(&etcd, &certs, &ports, "5s", Some(&certs.ca))).await;
    let leader_index = etcd.leader();
    wait_portal_leader(&portal, &etcd, leader_index).await;
    put_until_ok(ports.leader, &certs.ca, "secure", "yes");
    assert_eq!(get(ports.replicas, &certs.ca, "secure"), "yes");
    let leader_id = etcd.status(leader_index).expect("leader status").member_id;
    assert_eq!(reached_id(ports.leader, &certs.ca), Ok(leader_id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_with_alpn_h2_or_none_pass_others_are_refused() {
    let (etcd, certs, ports, portal) = start("5s").await;
    wait_portal_leader(&portal, &etcd, etcd.leader()).await;

    // No ALPN: accepted, and the member's own HTTP/2 server answers the
    // preface with its SETTINGS frame.
    let mut tls = tls_connect(ports.leader, &certs.ca, "localhost")
        .await
        .expect("TLS without ALPN");
    assert_eq!(tls.get_ref().1.alpn_protocol(), None);
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .expect("send preface");
    let mut head = [0u8; 9];
    tokio::time::timeout(DEADLINE, tls.read_exact(&mut head))
        .await
        .expect("member answered in time")
        .expect("read the member's first frame");
    assert_eq!(
        head[3], 0x4,
        "the member's first frame is SETTINGS: {head:?}"
    );

    // ALPN h2: negotiated.
    let mut h2 = (*default_client_config(&certs.ca)).clone();
    h2.alpn_protocols = vec![b"h2".to_vec()];
    let tls = tls_connect_with(ports.leader, std::sync::Arc::new(h2), "localhost")
        .await
        .expect("TLS with ALPN h2");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));

    // ALPN without h2: the handshake fails.
    let mut http1 = (*default_client_config(&certs.ca)).clone();
    http1.alpn_protocols = vec![b"http/1.1".to_vec()];
    let refused = tls_connect_with(ports.leader, std::sync::Arc::new(http1), "localhost").await;
    assert!(refused.is_err(), "ALPN http/1.1 must be refused");
}

#[test]
fn etcd_protocol_parses_and_unknown_keys_name_their_line() {
    let certs = temp_certs();
    let dir = TempDir::new().expect("temp dir");
    let path = dir.path().join("portal.yaml");
    let yaml = format!(
        "admin:\n  listen: 127.0.0.1:{}\nclusters:\n  - name: kv\n    protocol: etcd\n    members:\n      \
         - name: etcd0\n        address: 127.0.0.1:{}\n      - name: etcd1\n        address: 127.0.0.1:{}\n    \
         endpoints:\n      - name: kv\n        listen: 127.0.0.1:{}\n        route: leader\n        \
         tls:\n          cert: {}\n          key: {}\n",
        free_port(),
        free_port(),
        free_port(),
        free_port(),
        certs.cert.display(),
        certs.key.display()
    );
    std::fs::write(&path, &yaml).expect("write config");
    let out = Command::new(PORTAL)
        .arg("check")
        .arg("-c")
        .arg(&path)
        .output()
        .expect("run portal check");
    assert!(out.status.success(), "{}", text(&out));

    let bad = yaml.replace(
        "    protocol: etcd\n",
        "    protocol: etcd\n    etcd_prefix: /x\n",
    );
    let line = bad
        .lines()
        .position(|l| l.contains("etcd_prefix"))
        .expect("line")
        + 1;
    std::fs::write(&path, &bad).expect("write config");
    let out = Command::new(PORTAL)
        .arg("check")
        .arg("-c")
        .arg(&path)
        .output()
        .expect("run portal check");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        stderr.contains(&format!("portal.yaml:{line}:")) && stderr.contains("etcd_prefix"),
        "expected portal.yaml:{line}: and the key in {stderr}"
    );

    let member_typo = yaml.replacen("        address:", "        adress:", 1);
    let line = member_typo
        .lines()
        .position(|l| l.contains("adress"))
        .expect("line")
        + 1;
    std::fs::write(&path, &member_typo).expect("write config");
    let out = Command::new(PORTAL)
        .arg("check")
        .arg("-c")
        .arg(&path)
        .output()
        .expect("run portal check");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!("portal.yaml:{line}:")) && stderr.contains("members[0].adress"),
        "expected portal.yaml:{line}: and members[0].adress in {stderr}"
    );
}
