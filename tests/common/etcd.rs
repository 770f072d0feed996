//! The etcd part of the integration-test harness: a real N-member etcd 3.4
//! cluster (`/usr/bin/etcd`) on free loopback ports, each member in its own
//! directory under one temporary directory.
//!
//! ```ignore
//! let mut etcd = EtcdCluster::start(3);          // waits until every member is healthy
//! let leader = etcd.leader();                    // index of the Raft leader
//! etcd.kill9(leader);                            // SIGKILL, data kept
//! etcd.wait_leader_except(leader);               // the others elect a new leader
//! etcd.restart(leader);                          // same name, ports and data dir
//! let out = etcd.etcdctl(0, &["put", "k", "v"]); // stock etcdctl against member 0
//! ```
//!
//! Members are named `etcd0`, `etcd1`, ...; each has a client URL
//! (`client_address(i)`, `host:port`) and a peer URL on `127.0.0.1`. Heartbeat
//! and election timeouts are tuned low (50 ms / 500 ms) so that a new leader
//! is elected within about a second of the old one's death. Each cluster has
//! a unique `--initial-cluster-token`.
//!
//! With `start_tls`, clients must use TLS (server certificate and key from
//! `Certs`, i.e. valid for `localhost` and `127.0.0.1`); peers always talk
//! plain HTTP.
//!
//! Every process is killed (SIGKILL) and waited for on `Drop`, and the
//! temporary directory is removed; when the test is panicking the tail of
//! each member's log is printed first.

#![allow(dead_code)]

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::pki::Leaf;
use super::{free_port, Certs, DEADLINE};

/// The etcd server binary.
pub const ETCD: &str = "/usr/bin/etcd";
/// The etcd command-line client.
pub const ETCDCTL: &str = "etcdctl";

/// How long a cluster gets to become healthy.
const START_DEADLINE: Duration = Duration::from_secs(30);

/// One member's fixed identity: what it was started with, kept across
/// restarts.
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

/// A running etcd cluster. See the module documentation.
pub struct EtcdCluster {
    root: TempDir,
    token: String,
    members: Vec<Member>,
    tls: Option<Certs>,
    /// With TLS: clients must present a certificate from `tls.ca`
    /// (`--client-cert-auth`); etcdctl presents this one.
    client_auth: Option<Leaf>,
}

impl EtcdCluster {
    /// Starts an `n`-member cluster with plaintext client URLs and waits
    /// until every member reports healthy (a leader is elected).
    pub fn start(n: usize) -> EtcdCluster {
        Self::start_with(n, None, None)
    }

    /// Like `start`, but clients must speak TLS, validated against
    /// `certs.ca` (server certificate `certs.cert` for localhost/127.0.0.1).
    pub fn start_tls(n: usize, certs: &Certs) -> EtcdCluster {
        Self::start_with(n, Some(certs.clone()), None)
    }

    /// Like `start_tls`, and clients must also present a certificate that
    /// chains to `certs.ca` (`--client-cert-auth`); the harness's etcdctl
    /// presents `client`.
    pub fn start_tls_client_auth(n: usize, certs: &Certs, client: &Leaf) -> EtcdCluster {
        Self::start_with(n, Some(certs.clone()), Some(client.clone()))
    }

    fn start_with(n: usize, tls: Option<Certs>, client_auth: Option<Leaf>) -> EtcdCluster {
        assert!(n > 0, "an etcd cluster needs at least one member");
        assert!(
            Path::new(ETCD).is_file(),
            "{ETCD} is missing: run `bash tests/run.sh`, which installs the Debian \
             packages the tests need (etcd-server, etcd-client)"
        );
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let token = format!(
            "portal-test-{}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default()
        );
        let members = (0..n)
            .map(|i| Member {
                name: format!("etcd{i}"),
                client_port: free_port(),
                peer_port: free_port(),
                child: None,
            })
            .collect();
        let mut cluster = EtcdCluster {
            root: TempDir::new().expect("temp dir for etcd"),
            token,
            members,
            tls,
            client_auth,
        };
        for i in 0..n {
            cluster.spawn(i);
        }
        for i in 0..n {
            cluster.wait_healthy(i, START_DEADLINE);
        }
        cluster
    }

    /// How many members the cluster was started with.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The member's `--name` (`etcd0`, `etcd1`, ...).
    pub fn name(&self, i: usize) -> &str {
        &self.members[i].name
    }

    /// All member names, in order.
    pub fn names(&self) -> Vec<String> {
        self.members.iter().map(|m| m.name.clone()).collect()
    }

    pub fn client_port(&self, i: usize) -> u16 {
        self.members[i].client_port
    }

    /// The member's client address, `127.0.0.1:PORT`.
    pub fn client_address(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.members[i].client_port)
    }

    /// All client addresses, in member order.
    pub fn client_addresses(&self) -> Vec<String> {
        (0..self.len()).map(|i| self.client_address(i)).collect()
    }

    /// The member's client URL (`http://` or `https://`).
    pub fn client_url(&self, i: usize) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.members[i].client_port)
    }

    fn peer_url(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.members[i].peer_port)
    }

    /// The process id of a running member; `None` after `kill9`/`stop`.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members[i].child.as_ref().map(Child::id)
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.members[i].child.is_some()
    }

    fn dir(&self, i: usize) -> PathBuf {
        self.root.path().join(&self.members[i].name)
    }

    fn log_path(&self, i: usize) -> PathBuf {
        self.root
            .path()
            .join(format!("{}.log", self.members[i].name))
    }

    /// The member's log (stdout and stderr) so far.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.log_path(i)).unwrap_or_default()
    }

    fn spawn(&mut self, i: usize) {
        let initial_cluster = (0..self.len())
            .map(|j| format!("{}={}", self.members[j].name, self.peer_url(j)))
            .collect::<Vec<_>>()
            .join(",");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(i))
            .expect("etcd log file");
        let client_url = self.client_url(i);
        let peer_url = self.peer_url(i);
        let mut command = Command::new(ETCD);
        command
            .arg("--name")
            .arg(&self.members[i].name)
            .arg("--data-dir")
            .arg(self.dir(i))
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &initial_cluster])
            .args(["--initial-cluster-token", &self.token])
            .args(["--initial-cluster-state", "new"])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            // Tests write little; keep the WAL and snapshots from growing.
            .args([
                "--snapshot-count",
                "10000",
                "--quota-backend-bytes",
                "104857600",
            ])
            .args(["--logger", "zap", "--log-outputs", "stderr"]);
        if let Some(certs) = &self.tls {
            command
                .arg("--cert-file")
                .arg(&certs.cert)
                .arg("--key-file")
                .arg(&certs.key);
            if self.client_auth.is_some() {
                command
                    .arg("--client-cert-auth")
                    .arg("--trusted-ca-file")
                    .arg(&certs.ca);
            }
        }
        // etcd reads ETCD_* variables as flags; none from the caller.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("ETCD") {
                command.env_remove(&key);
            }
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            .spawn()
            .expect("spawn etcd");
        self.members[i].child = Some(child);
    }

    /// A stock `etcdctl` (API v3) command against member `i` only, with the
    /// CA when the cluster uses TLS and a 5 s command timeout.
    pub fn etcdctl_command(&self, i: usize) -> Command {
        let endpoint = match self.tls {
            Some(_) => format!("localhost:{}", self.members[i].client_port),
            None => self.client_address(i),
        };
        let mut command = etcdctl_command(&endpoint, self.tls.as_ref().map(|c| c.ca.as_path()));
        if let Some(client) = &self.client_auth {
            command
                .arg("--cert")
                .arg(&client.cert)
                .arg("--key")
                .arg(&client.key);
        }
        command
    }

    /// Runs `etcdctl ARGS` against member `i`; its output, successful or not.
    pub fn etcdctl(&self, i: usize, args: &[&str]) -> Output {
        self.etcdctl_command(i)
            .args(args)
            .output()
            .expect("run etcdctl")
    }

    /// `etcdctl endpoint health` succeeds against member `i`.
    pub fn is_healthy(&self, i: usize) -> bool {
        self.etcdctl(i, &["endpoint", "health"]).status.success()
    }

    /// Waits up to `limit` until member `i` is healthy; panics with its log
    /// if it exits or the deadline passes.
    pub fn wait_healthy(&mut self, i: usize, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            if self.is_healthy(i) {
                return;
            }
            if let Some(status) = self.members[i]
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "etcd member {} exited with {status}:\n{}",
                    self.members[i].name,
                    self.log(i)
                );
            }
            assert!(
                Instant::now() < deadline,
                "etcd member {} not healthy within {limit:?}:\n{}",
                self.members[i].name,
                self.log(i)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What member `i` reports in `etcdctl endpoint status`: its own member
    /// id, the leader's id and the Raft term (all as etcd prints them, ids in
    /// hex). `None` if it does not answer.
    pub fn status(&self, i: usize) -> Option<EtcdStatus> {
        let out = self.etcdctl(i, &["endpoint", "status", "-w", "json"]);
        if !out.status.success() {
            return None;
        }
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let status = &json[0]["Status"];
        Some(EtcdStatus {
            member_id: status["header"]["member_id"].as_u64()?,
            leader: status["leader"].as_u64()?,
            raft_term: status["raftTerm"].as_u64()?,
        })
    }

    /// The index of the member that is the Raft leader, as a running member
    /// reports it and that member confirms; waits up to `DEADLINE`.
    pub fn leader(&self) -> usize {
        self.wait_leader_where(|_| true)
    }

    /// Waits (up to `DEADLINE`) until a running member other than `old` is
    /// the confirmed leader; its index.
    pub fn wait_leader_except(&self, old: usize) -> usize {
        self.wait_leader_where(|i| i != old)
    }

    fn wait_leader_where(&self, ok: impl Fn(usize) -> bool) -> usize {
        let deadline = Instant::now() + DEADLINE;
        loop {
            for i in (0..self.len()).filter(|&i| self.is_running(i)) {
                if let Some(s) = self.status(i) {
                    if s.member_id == s.leader && ok(i) {
                        return i;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "no etcd leader within {DEADLINE:?} (want one that passes the filter)"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL member `i` and wait for it to be gone; its data stays.
    pub fn kill9(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM member `i` (a clean stop) and wait up to 10 s, then SIGKILL.
    pub fn stop(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts member `i` again (after `kill9`/`stop`, or SIGKILLing it first
    /// if it runs) with the same name, ports and data, and waits until it is
    /// healthy.
    pub fn restart(&mut self, i: usize) {
        self.kill9(i);
        self.spawn(i);
        self.wait_healthy(i, START_DEADLINE);
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.len() {
            self.kill9(i);
        }
        if std::thread::panicking() {
            for i in 0..self.len() {
                super::print_log_tail(&format!("etcd member {}", self.name(i)), &self.log(i), 15);
            }
        }
    }
}

/// One member's view as `etcdctl endpoint status` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EtcdStatus {
    pub member_id: u64,
    pub leader: u64,
    pub raft_term: u64,
}

/// A stock `etcdctl` command (API v3) for `endpoint` (`host:port`), trusting
/// `ca` for TLS when given, with a 5 s command timeout and no `ETCDCTL_*`
/// variables from the caller's environment.
pub fn etcdctl_command(endpoint: &str, ca: Option<&Path>) -> Command {
    let mut command = Command::new(ETCDCTL);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("ETCDCTL") {
            command.env_remove(&key);
        }
    }
    command
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoint}"))
        .args(["--command-timeout=5s", "--dial-timeout=3s"])
        .stdin(Stdio::null());
    if let Some(ca) = ca {
        command.arg("--cacert").arg(ca);
    }
    command
}

/// Runs `etcdctl ARGS` against `endpoint` (trusting `ca` when given).
pub fn etcdctl(endpoint: &str, ca: Option<&Path>, args: &[&str]) -> Output {
    etcdctl_command(endpoint, ca)
        .args(args)
        .output()
        .expect("run etcdctl")
}
