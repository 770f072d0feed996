//! The Patroni part of the integration-test harness: a real Patroni cluster
//! (Debian's `patroni` 3.0.x, `/usr/bin/patroni`) of PostgreSQL 15 members
//! using a real etcd cluster as its DCS, and a portal configuration with
//! `probe.check: patroni` in front of it.
//!
//! Everything lives in one temporary directory under `/tmp` (each member's
//! YAML, data directory, Unix socket, logs). Patroni runs as the `postgres`
//! user when the tests run as root (PostgreSQL refuses root), so that
//! directory is chowned to it. On `Drop` every process whose command line
//! names that directory (each Patroni agent, each postmaster and its
//! children) is killed with SIGKILL and reaped, also when the test panics,
//! in which case the tail of every member's log is printed first.
//!
//! Timings are short for tests: `ttl: 10`, `loop_wait: 1`,
//! `retry_timeout: 5`, so a hard-killed leader's key expires within ~10 s.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::pg::{pg_config, pg_connect_with, pg_error, PgTls};
use super::{cluster, free_port, leader, member, replica_names, Certs, Portal, NAMES};

pub const PATRONI: &str = "/usr/bin/patroni";
pub const PATRONICTL: &str = "/usr/bin/patronictl";
/// The superuser Patroni creates, and its password; loopback TCP logins
/// need it (`md5`/SCRAM in `pg_hba.conf`).
pub const SUPERUSER: &str = "postgres";
pub const SUPERUSER_PASSWORD: &str = "portal-test-su";
const REPLICATION_PASSWORD: &str = "portal-test-repl";

/// How long the cluster gets to bootstrap, elect, switch over or fail over.
pub const PATRONI_DEADLINE: Duration = Duration::from_secs(60);

/// Fails the test (with how to install it) when Patroni is missing.
pub fn require_patroni() {
    assert!(
        Path::new(PATRONI).is_file() && Path::new(PATRONICTL).is_file(),
        "Patroni is not installed ({PATRONI} is missing): run `bash tests/run.sh`, which \
         installs the Debian packages the tests need, or `apt-get install patroni`"
    );
    super::pg::require_postgres();
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// One Patroni-managed member.
pub struct PatroniMember {
    pub name: String,
    /// PostgreSQL's port on 127.0.0.1.
    pub pg_port: u16,
    /// Patroni's REST API port on 127.0.0.1.
    pub api_port: u16,
    yaml: PathBuf,
    data: PathBuf,
    log: PathBuf,
    agent: Option<Child>,
    /// The agent was stopped with SIGSTOP (see [`PatroniCluster::freeze_agent`]).
    frozen: bool,
}

impl PatroniMember {
    pub fn pg_address(&self) -> String {
        format!("127.0.0.1:{}", self.pg_port)
    }

    pub fn api_address(&self) -> String {
        format!("127.0.0.1:{}", self.api_port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The member's PostgreSQL data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// The postmaster's pid, from `postmaster.pid`, while that process
    /// still runs on this data directory (the file outlives a SIGKILL).
    pub fn postmaster_pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.data.join("postmaster.pid")).ok()?;
        let pid: u32 = text.lines().next()?.trim().parse().ok()?;
        let data = self.data.display().to_string();
        process_table()
            .iter()
            .any(|(p, _, cmdline)| *p == pid && cmdline.contains(&data))
            .then_some(pid)
    }
}

/// TLS for a Patroni cluster: every REST API serves HTTPS with `cert` and
/// `key` (and the agents verify each other against `ca`), and the agents
/// reach etcd over TLS, presenting the same certificate.
#[derive(Clone)]
pub struct PatroniTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// What the harness's own REST requests trust.
    pub client: Arc<rustls::ClientConfig>,
}

/// A Patroni cluster of PostgreSQL members.
pub struct PatroniCluster {
    pub scope: String,
    pub members: Vec<PatroniMember>,
    /// The etcd client addresses Patroni keeps its keys in.
    pub etcd_hosts: Vec<String>,
    root: TempDir,
    /// HTTPS REST APIs and TLS to etcd (copies of the files, in `root`).
    tls: Option<PatroniTls>,
}

impl PatroniCluster {
    /// Starts `count` members (named `a`, `b`, ...) using the etcd cluster
    /// whose client addresses are `etcd_hosts` (`host:port`); the first one
    /// bootstraps and leads, the others are made from it by `pg_basebackup`.
    /// Returns once the first leads and every member is `running` with
    /// the others streaming.
    pub fn start(etcd_hosts: &[String], count: usize) -> PatroniCluster {
        let mut cluster = PatroniCluster::prepare(etcd_hosts, count);
        cluster.launch();
        cluster
    }

    /// Writes every member's configuration (ports, scope) without starting
    /// anything: a portal can be configured and started before Patroni
    /// writes a single key.
    pub fn prepare(etcd_hosts: &[String], count: usize) -> PatroniCluster {
        Self::prepare_with(etcd_hosts, count, None)
    }

    /// Like `start`, with HTTPS REST APIs and TLS to etcd.
    pub fn start_tls(etcd_hosts: &[String], count: usize, tls: &PatroniTls) -> PatroniCluster {
        let mut cluster = PatroniCluster::prepare_with(etcd_hosts, count, Some(tls));
        cluster.launch();
        cluster
    }

    fn prepare_with(
        etcd_hosts: &[String],
        count: usize,
        tls: Option<&PatroniTls>,
    ) -> PatroniCluster {
        require_patroni();
        let root = tempfile::Builder::new()
            .prefix("portal-patroni-")
            .tempdir_in("/tmp")
            .expect("temp dir for patroni under /tmp");
        // The directory's unique name; PostgreSQL shows it (`cluster_name`)
        // in every backend's process title, which is how `Drop` finds them.
        let scope = root
            .path()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .expect("temp dir name");
        let members: Vec<PatroniMember> = (0..count)
            .map(|i| {
                let name = NAMES[i].to_string();
                PatroniMember {
                    pg_port: free_port(),
                    api_port: free_port(),
                    yaml: root.path().join(format!("{name}.yml")),
                    data: root.path().join(format!("{name}-data")),
                    log: root.path().join(format!("{name}.log")),
                    name,
                    agent: None,
                    frozen: false,
                }
            })
            .collect();
        // Patroni runs as the PostgreSQL user: its TLS files go where it
        // can read them.
        let tls = tls.map(|tls| {
            let copy = |from: &Path, name: &str| {
                let to = root.path().join(name);
                std::fs::copy(from, &to).expect("copy a TLS file for Patroni");
                to
            };
            PatroniTls {
                ca: copy(&tls.ca, "tls-ca.crt"),
                cert: copy(&tls.cert, "tls.crt"),
                key: copy(&tls.key, "tls.key"),
                client: tls.client.clone(),
            }
        });
        let cluster = PatroniCluster {
            scope,
            members,
            etcd_hosts: etcd_hosts.to_vec(),
            root,
            tls,
        };
        for i in 0..count {
            let yaml = cluster.yaml(i, etcd_hosts);
            std::fs::write(&cluster.members[i].yaml, yaml).expect("write patroni yaml");
        }
        if is_root() {
            chown_postgres(cluster.root.path());
        }
        cluster
    }

    /// Starts the members prepared by [`PatroniCluster::prepare`]: the
    /// first bootstraps and leads, the others clone it; returns once all
    /// are running.
    pub fn launch(&mut self) {
        self.spawn(0);
        self.wait_leader_is(0);
        for i in 1..self.members.len() {
            self.spawn(i);
        }
        self.wait_all_running();
    }

    fn yaml(&self, i: usize, etcd_hosts: &[String]) -> String {
        let yaml = self.plain_yaml(i, etcd_hosts);
        let Some(tls) = &self.tls else {
            return yaml;
        };
        let (ca, cert, key) = (tls.ca.display(), tls.cert.display(), tls.key.display());
        yaml.replacen(
            "etcd3:\n",
            &format!(
                "  certfile: {cert}\n  keyfile: {key}\n  cafile: {ca}\n\
                 etcd3:\n  protocol: https\n  cacert: {ca}\n  cert: {cert}\n  key: {key}\n"
            ),
            1,
        )
    }

    fn plain_yaml(&self, i: usize, etcd_hosts: &[String]) -> String {
        let m = &self.members[i];
        let root = self.root.path().display();
        format!(
            "scope: {scope}\n\
             namespace: /service\n\
             name: {name}\n\
             log:\n  level: INFO\n\
             restapi:\n  listen: 127.0.0.1:{api}\n  connect_address: 127.0.0.1:{api}\n\
             etcd3:\n  hosts: {hosts}\n\
             bootstrap:\n\
             \x20 dcs:\n\
             \x20   ttl: 10\n\
             \x20   loop_wait: 1\n\
             \x20   retry_timeout: 5\n\
             \x20   maximum_lag_on_failover: 104857600\n\
             \x20   postgresql:\n\
             \x20     use_pg_rewind: true\n\
             \x20     parameters:\n\
             \x20       wal_level: replica\n\
             \x20       hot_standby: 'on'\n\
             \x20       max_wal_senders: 8\n\
             \x20       max_replication_slots: 8\n\
             \x20       wal_keep_size: 128MB\n\
             \x20       wal_log_hints: 'on'\n\
             \x20 initdb:\n  - encoding: UTF8\n  - no-sync\n\
             \x20 pg_hba:\n\
             \x20 - local all all trust\n\
             \x20 - host all all 127.0.0.1/32 md5\n\
             \x20 - host replication replicator 127.0.0.1/32 md5\n\
             postgresql:\n\
             \x20 listen: 127.0.0.1:{pg}\n\
             \x20 connect_address: 127.0.0.1:{pg}\n\
             \x20 data_dir: {data}\n\
             \x20 bin_dir: {bindir}\n\
             \x20 pgpass: {root}/{name}.pgpass\n\
             \x20 authentication:\n\
             \x20   superuser:\n      username: {su}\n      password: {su_pw}\n\
             \x20   replication:\n      username: replicator\n      password: {repl_pw}\n\
             \x20   rewind:\n      username: {su}\n      password: {su_pw}\n\
             \x20 parameters:\n\
             \x20   unix_socket_directories: '{root}'\n\
             \x20   shared_buffers: 16MB\n\
             \x20   max_connections: 60\n\
             \x20   fsync: 'off'\n\
             \x20   log_min_messages: warning\n",
            scope = self.scope,
            name = m.name,
            api = m.api_port,
            pg = m.pg_port,
            hosts = etcd_hosts.join(","),
            data = m.data.display(),
            bindir = super::pg::bindir().display(),
            su = SUPERUSER,
            su_pw = SUPERUSER_PASSWORD,
            repl_pw = REPLICATION_PASSWORD,
        )
    }

    /// Starts member `i`'s Patroni agent (again).
    fn spawn(&mut self, i: usize) {
        let m = &mut self.members[i];
        assert!(m.agent.is_none(), "patroni {} already runs", m.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)
            .expect("open patroni log");
        if is_root() {
            chown_postgres(&m.log);
        }
        let err = log.try_clone().expect("clone log handle");
        let mut command = if is_root() {
            let mut c = Command::new("setpriv");
            c.args([
                "--reuid=postgres",
                "--regid=postgres",
                "--init-groups",
                "--",
                PATRONI,
            ]);
            c
        } else {
            Command::new(PATRONI)
        };
        command
            .arg(&m.yaml)
            .current_dir(self.root.path())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PG") {
                command.env_remove(&key);
            }
        }
        m.agent = Some(command.spawn().expect("spawn patroni"));
    }

    /// GET `path` on member `i`'s REST API: the status code, or `None` when
    /// it does not answer.
    pub fn rest_status(&self, i: usize, path: &str) -> Option<u16> {
        self.rest(i, path).map(|(code, _)| code)
    }

    /// GET `path` on member `i`'s REST API, HTTP or HTTPS.
    fn rest(&self, i: usize, path: &str) -> Option<(u16, String)> {
        let port = self.members[i].api_port;
        match &self.tls {
            None => rest_get(port, path),
            Some(tls) => super::pki::https_get(port, tls.client.clone(), path),
        }
    }

    /// GET `/patroni` on member `i`, as JSON.
    pub fn rest_json(&self, i: usize) -> Option<serde_json::Value> {
        let (_, body) = self.rest(i, "/patroni")?;
        serde_json::from_str(&body).ok()
    }

    /// The member Patroni names leader (`GET /leader` answers 200), if one
    /// does.
    pub fn leader(&self) -> Option<usize> {
        (0..self.members.len()).find(|&i| {
            self.members[i].agent.is_some() && self.rest_status(i, "/leader") == Some(200)
        })
    }

    /// Waits until member `i` leads and its PostgreSQL runs as primary.
    pub fn wait_leader_is(&self, i: usize) {
        self.wait_until(&format!("{} leading", self.members[i].name), || {
            self.rest_status(i, "/primary") == Some(200)
        });
    }

    /// Waits until some member other than `not` leads; returns it.
    pub fn wait_new_leader(&self, not: usize) -> usize {
        let mut found = None;
        self.wait_until("a new leader", || {
            found = (0..self.members.len())
                .find(|&i| i != not && self.rest_status(i, "/primary") == Some(200));
            found.is_some()
        });
        found.unwrap_or(not)
    }

    /// Waits until every running member is `running` and, but for the
    /// leader, answers Patroni's `/replica` check and streams from the
    /// leader. `/replica` alone is not enough: a replica that has not
    /// started streaming yet (its slot is created a moment later) answers
    /// 200 too, and a switchover to it then loses what the leader committed
    /// since the base backup.
    pub fn wait_all_running(&self) {
        self.wait_until("every member running and streaming", || {
            let Some(leader) = self.leader() else {
                return false;
            };
            let streaming = self.streaming_from(leader);
            (0..self.members.len()).all(|i| {
                self.members[i].agent.is_none()
                    || i == leader
                    || (self.rest_status(i, "/replica") == Some(200)
                        && streaming.contains(&self.members[i].name))
            })
        });
    }

    /// The members whose WAL receivers stream from member `i`, by the
    /// `replication` list of its `GET /patroni` (Patroni names each
    /// receiver's `application_name` after its member).
    fn streaming_from(&self, i: usize) -> Vec<String> {
        let Some(status) = self.rest_json(i) else {
            return Vec::new();
        };
        status["replication"]
            .as_array()
            .map(|list| {
                list.iter()
                    .filter(|r| r["state"] == "streaming")
                    .filter_map(|r| r["application_name"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn wait_until(&self, what: &str, mut ok: impl FnMut() -> bool) {
        let deadline = Instant::now() + PATRONI_DEADLINE;
        loop {
            if ok() {
                return;
            }
            if Instant::now() > deadline {
                self.print_logs();
                panic!("patroni: no {what} within {PATRONI_DEADLINE:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `patronictl -c YAML list`, for messages.
    pub fn list(&self) -> String {
        let out = self.patronictl(&["list"]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    fn patronictl(&self, args: &[&str]) -> std::process::Output {
        Command::new(PATRONICTL)
            .arg("-c")
            .arg(&self.members[0].yaml)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run patronictl")
    }

    /// `patronictl switchover --leader FROM --candidate TO --force`; panics
    /// when it fails. Returns once `to` leads.
    pub fn switchover(&self, from: usize, to: usize) {
        let out = self.patronictl(&[
            "switchover",
            "--leader",
            &self.members[from].name,
            "--candidate",
            &self.members[to].name,
            "--force",
        ]);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && text.contains("Successfully switched over"),
            "patronictl switchover failed ({}):\n{text}",
            out.status
        );
        self.wait_until(
            &format!("{} leading after the switchover", self.members[to].name),
            || self.rest_status(to, "/primary") == Some(200),
        );
    }

    /// SIGKILL member `i`'s Patroni agent and its PostgreSQL (postmaster and
    /// every backend), as a machine crash would: all of them, with none
    /// left to restart the others.
    pub fn kill9(&mut self, i: usize) {
        let postmaster = self.members[i].postmaster_pid();
        if let Some(mut agent) = self.members[i].agent.take() {
            let _ = agent.kill();
            let _ = agent.wait();
        }
        if let Some(pid) = postmaster {
            // Freeze the postmaster before listing its children. Killed
            // one by one, a child dying first makes a live postmaster
            // start crash recovery with new children that are not on the
            // list; orphaned, they keep the shared memory block, and the
            // member's Patroni cannot start PostgreSQL again until they
            // notice (seen: 53 s). A stopped postmaster forks nothing.
            signal("-STOP", &[pid]);
            let mut pids = descendants(pid);
            pids.push(pid);
            signal("-KILL", &pids);
            wait_gone(&pids);
        }
        // The agent's other children (none expected), by the YAML they name.
        let yaml = self.members[i].yaml.display().to_string();
        let data = self.members[i].data.display().to_string();
        let others = pids_naming(&[&yaml, &data]);
        signal("-KILL", &others);
        wait_gone(&others);
    }

    /// Starts member `i`'s agent again after `kill9`; Patroni recovers its
    /// PostgreSQL and rejoins it (with `pg_rewind` if needed).
    pub fn restart(&mut self, i: usize) {
        self.spawn(i);
    }

    /// The pid of member `i`'s Patroni agent (the Python process: `setpriv`
    /// and the script's interpreter exec in place, so it is the child's).
    pub fn agent_pid(&self, i: usize) -> Option<u32> {
        self.members[i].agent.as_ref().map(Child::id)
    }

    /// SIGSTOP member `i`'s Patroni agent, and only it: its PostgreSQL
    /// (a separate process tree) keeps running in whatever role it had. A
    /// frozen leader's agent stops renewing the leader key, which expires
    /// after `ttl` (10 s here); the other member's agent then takes the key
    /// and promotes its PostgreSQL, while the frozen member's PostgreSQL
    /// still runs as a primary on the old timeline and takes any write sent
    /// to it directly: two writable primaries, as with a partitioned or
    /// paused leader. Returns once the kernel reports the process stopped.
    /// `Drop` thaws it before killing anything.
    pub fn freeze_agent(&mut self, i: usize) {
        let pid = self
            .agent_pid(i)
            .unwrap_or_else(|| panic!("patroni {} does not run", self.members[i].name));
        signal("-STOP", &[pid]);
        self.members[i].frozen = true;
        let deadline = Instant::now() + Duration::from_secs(5);
        while process_state(pid) != Some('T') {
            assert!(
                Instant::now() < deadline,
                "patroni {} (pid {pid}) did not stop: state {:?}",
                self.members[i].name,
                process_state(pid)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGCONT member `i`'s agent after [`PatroniCluster::freeze_agent`].
    pub fn thaw_agent(&mut self, i: usize) {
        if let Some(pid) = self.agent_pid(i) {
            signal("-CONT", &[pid]);
        }
        self.members[i].frozen = false;
    }

    /// Whether member `i`'s PostgreSQL runs (its postmaster is alive).
    pub fn postgres_runs(&self, i: usize) -> bool {
        self.members[i].postmaster_pid().is_some()
    }

    pub fn print_logs(&self) {
        for m in &self.members {
            let what = format!("patroni {} (api {}, pg {})", m.name, m.api_port, m.pg_port);
            super::print_log_tail(&what, &m.log(), 40);
        }
    }

    /// A portal configuration: one `protocol: postgres` cluster `main` with
    /// `probe.check: patroni` (interval 200ms, fast 20ms, timeout 1s, rise
    /// 2, fall 2), every member with its `api`, endpoints `rw` (leader) and
    /// `ro` (replicas), both TLS with the given certificate, hold 10s.
    pub fn portal_yaml(&self, certs: &Certs, admin: u16, rw: u16, ro: u16) -> String {
        let mut y = format!(
            "admin:\n  listen: 127.0.0.1:{admin}\n\nshutdown:\n  drain_timeout: 2s\n\n\
             clusters:\n  - name: main\n    protocol: postgres\n    probe:\n      \
             check: patroni\n      interval: 200ms\n      fast_interval: 20ms\n      \
             timeout: 1s\n      rise: 2\n      fall: 2\n    members:\n"
        );
        for m in &self.members {
            y.push_str(&format!(
                "      - name: {}\n        address: 127.0.0.1:{}\n        api: 127.0.0.1:{}\n",
                m.name, m.pg_port, m.api_port
            ));
        }
        y.push_str("    endpoints:\n");
        for (name, port, route) in [("rw", rw, "leader"), ("ro", ro, "replicas")] {
            y.push_str(&format!(
                "      - name: {name}\n        listen: 127.0.0.1:{port}\n        route: {route}\n        \
                 tls:\n          cert: {}\n          key: {}\n        hold_timeout: 10s\n",
                certs.cert.display(),
                certs.key.display(),
            ));
        }
        y
    }

    /// As [`PatroniCluster::portal_yaml`], plus the DCS source: the portal
    /// watches Patroni's keys in etcd and only the member holding the
    /// leader key may lead (once its probe confirms it).
    pub fn portal_yaml_with_dcs(&self, certs: &Certs, admin: u16, rw: u16, ro: u16) -> String {
        let yaml = self.portal_yaml(certs, admin, rw, ro);
        let endpoints: Vec<String> = self.etcd_hosts.iter().map(|h| format!("\"{h}\"")).collect();
        let dcs = format!(
            "    dcs:\n      etcd:\n        endpoints: [{}]\n        prefix: /service\n        \
             scope: {}\n        timeout: 2s\n    members:\n",
            endpoints.join(", "),
            self.scope
        );
        yaml.replacen("    members:\n", &dcs, 1)
    }

    /// As [`PatroniCluster::portal_yaml_with_dcs`], with no `members:` at
    /// all: the portal learns them (addresses from `conn_url`, REST from
    /// `api_url`) from Patroni's member keys.
    pub fn portal_yaml_learning_members(
        &self,
        certs: &Certs,
        admin: u16,
        rw: u16,
        ro: u16,
    ) -> String {
        super::replace_members(&self.portal_yaml_with_dcs(certs, admin, rw, ro), "")
    }

    /// As [`PatroniCluster::portal_yaml_with_dcs`], with `probe.check:
    /// native`: the portal asks each member's PostgreSQL what it is (as the
    /// superuser, its password in `password_file`), not its Patroni agent.
    /// A member whose agent is frozen then still answers primary on its
    /// timeline; only the DCS and the terms can fence it.
    pub fn portal_yaml_native_with_dcs(
        &self,
        certs: &Certs,
        admin: u16,
        rw: u16,
        ro: u16,
        password_file: &Path,
    ) -> String {
        let yaml = self.portal_yaml_with_dcs(certs, admin, rw, ro);
        let yaml = yaml.replacen(
            "      check: patroni\n",
            &format!(
                "      check: native\n      username: {SUPERUSER}\n      password_file: {}\n      \
                 dbname: postgres\n",
                password_file.display()
            ),
            1,
        );
        yaml.lines()
            .filter(|l| !l.trim_start().starts_with("api: "))
            .map(|l| format!("{l}\n"))
            .collect()
    }
}

impl Drop for PatroniCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_logs();
        }
        // A stopped agent dies of SIGKILL too, but thawed first it is in
        // no state a kill could leave half done.
        for i in 0..self.members.len() {
            if self.members[i].frozen {
                self.thaw_agent(i);
            }
        }
        for i in 0..self.members.len() {
            self.kill9(i);
        }
        // Anything else started from this directory (a postmaster whose
        // agent died first, a pg_rewind, a pg_basebackup).
        let root = self.root.path().display().to_string();
        for _ in 0..3 {
            let left = pids_naming(&[&root, &self.scope]);
            if left.is_empty() {
                break;
            }
            signal("-KILL", &left);
            wait_gone(&left);
        }
    }
}

fn chown_postgres(path: &Path) {
    let status = Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(path)
        .status()
        .expect("run chown");
    assert!(status.success(), "chown -R postgres {}", path.display());
}

/// A tiny HTTP/1.0 GET against Patroni's REST API on loopback.
pub fn rest_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_string()))
}

/// `kill SIGNAL PID...`, ignoring processes already gone.
fn signal(signal: &str, pids: &[u32]) {
    if pids.is_empty() {
        return;
    }
    let _ = Command::new("kill")
        .arg(signal)
        .args(pids.iter().map(u32::to_string))
        .stderr(Stdio::null())
        .status();
}

/// Processes whose parent chain leads to `pid`.
fn descendants(pid: u32) -> Vec<u32> {
    let table = process_table();
    let mut out = Vec::new();
    let mut frontier = vec![pid];
    while let Some(parent) = frontier.pop() {
        for (child, ppid, _) in &table {
            if *ppid == parent && !out.contains(child) {
                out.push(*child);
                frontier.push(*child);
            }
        }
    }
    out
}

/// Processes whose command line contains one of `needles`.
fn pids_naming(needles: &[&str]) -> Vec<u32> {
    let me = std::process::id();
    process_table()
        .into_iter()
        .filter(|(pid, _, cmdline)| *pid != me && needles.iter().any(|n| cmdline.contains(n)))
        .map(|(pid, _, _)| pid)
        .collect()
}

/// `(pid, ppid, cmdline)` of every live process, from `/proc`.
fn process_table() -> Vec<(u32, u32, String)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let e = e.ok()?;
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
        // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
        let after = &stat[stat.rfind(')')? + 2..];
        let mut fields = after.split_whitespace();
        let state = fields.next()?;
        if state == "Z" {
            return None;
        }
        let ppid: u32 = fields.next()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        Some((pid, ppid, cmdline))
    })
    .collect()
}

/// The state letter of `/proc/PID/stat` (`R`, `S`, `T` when stopped, ...).
fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 2..].chars().next()
}

fn wait_gone(pids: &[u32]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let live = process_table();
        if !pids.iter().any(|p| live.iter().any(|(q, _, _)| q == p)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---- clients through the portal ---------------------------------------------

/// tokio-postgres through the portal endpoint on `port` (TLS via
/// `SSLRequest`, the portal verified as `localhost`), logging in with the
/// superuser's password.
pub async fn connect(port: u16, certs: &Certs) -> Result<tokio_postgres::Client, String> {
    let mut config = pg_config(port);
    config
        .password(SUPERUSER_PASSWORD)
        .connect_timeout(Duration::from_secs(5));
    pg_connect_with(&config, PgTls::new(&certs.ca))
        .await
        .map_err(|err| pg_error(&err))
}

/// A session straight to a member, bypassing the portal.
pub async fn direct(port: u16) -> tokio_postgres::Client {
    try_direct(port)
        .await
        .unwrap_or_else(|err| panic!("direct session to {port}: {err}"))
}

/// As [`direct`], an error instead of a panic.
pub async fn try_direct(port: u16) -> Result<tokio_postgres::Client, String> {
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(port)
        .user(SUPERUSER)
        .password(SUPERUSER_PASSWORD)
        .dbname("postgres")
        .connect_timeout(Duration::from_secs(2));
    pg_connect_with(&config, tokio_postgres::NoTls)
        .await
        .map_err(|err| pg_error(&err))
}

/// One acknowledged write: its id, the port of the member that committed
/// it (`inet_server_port()` in the INSERT's `RETURNING`), the instant just
/// before the writer sent it and the instant the acknowledgement arrived.
#[derive(Debug, Clone, Copy)]
pub struct Ack {
    pub id: i64,
    pub port: u16,
    pub sent: Instant,
    pub acked: Instant,
}

/// Writes through the portal's leader endpoint in a loop, reconnecting
/// after any error, until stopped. Each write reports, in the same
/// statement, `inet_server_port()` of the member that committed it, and is
/// stamped with when it was sent and when it was acknowledged.
pub struct Writer {
    acks: Arc<Mutex<Vec<Ack>>>,
    errors: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    pub fn start(port: u16, certs: &Certs) -> Writer {
        Writer::start_from(port, certs, 0)
    }

    /// A writer whose ids start after `first_id`, so that several writers
    /// share one table.
    pub fn start_from(port: u16, certs: &Certs, first_id: i64) -> Writer {
        let acks = Arc::new(Mutex::new(Vec::new()));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let certs = certs.clone();
        let task = tokio::spawn({
            let (acks, errors, stop) = (acks.clone(), errors.clone(), stop.clone());
            async move {
                let mut client = None;
                let mut id: i64 = first_id;
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
                    let sent = Instant::now();
                    let answer = tokio::time::timeout(
                        Duration::from_secs(5),
                        c.query_one(
                            "insert into writes (id) values ($1) returning inet_server_port()",
                            &[&id],
                        ),
                    )
                    .await;
                    let acked = Instant::now();
                    match answer {
                        Ok(Ok(row)) => {
                            let port: i32 = row.get(0);
                            acks.lock().expect("acks").push(Ack {
                                id,
                                port: port as u16,
                                sent,
                                acked,
                            });
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Ok(Err(err)) => {
                            // Which member refused it, when the session
                            // still answers: for the failure message.
                            let on = match c
                                .query_one("select inet_server_port(), pg_is_in_recovery()", &[])
                                .await
                            {
                                Ok(row) => format!(
                                    " (member on {}, in recovery: {})",
                                    row.get::<_, i32>(0),
                                    row.get::<_, bool>(1)
                                ),
                                Err(_) => String::new(),
                            };
                            errors
                                .lock()
                                .expect("errors")
                                .push(format!("{}{on}", pg_error(&err)));
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

    pub fn acks(&self) -> Vec<Ack> {
        self.acks.lock().expect("acks").clone()
    }

    /// The last few errors (connects refused, writes failed), newest first.
    pub fn last_errors(&self, n: usize) -> Vec<String> {
        let errors = self.errors.lock().expect("errors");
        errors.iter().rev().take(n).cloned().collect()
    }

    /// Waits until a write acknowledged by the member on `port` arrives
    /// after `after` acknowledgements; panics after `limit`.
    pub async fn wait_ack_from(&self, port: u16, after: usize, limit: Duration) {
        if !self.ack_from_within(port, after, limit).await {
            panic!(
                "no write acknowledged by the member on {port} within {limit:?}; \
                 last errors: {:?}; acks: {}",
                self.last_errors(5),
                self.acks().len()
            );
        }
    }

    /// As [`Writer::wait_ack_from`], false instead of a panic.
    pub async fn ack_from_within(&self, port: u16, after: usize, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if self.acks().iter().skip(after).any(|a| a.port == port) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn stop(self) -> Vec<Ack> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        let acks = self.acks.lock().expect("acks").clone();
        acks
    }
}

// ---- the truth: when a member became primary, seen from outside the portal --

/// When the scenario moved the leadership to one member, observed directly
/// (never through a portal): the first instant each source said so. An
/// instant is taken when the answer arrived, so the member was already
/// promoted then: a write sent after it did not race the promotion.
#[derive(Debug, Clone, Copy, Default)]
pub struct Promotion {
    /// etcd's leader key (`<namespace>/<scope>/leader`) named the member.
    pub key_named: Option<Instant>,
    /// The member's Patroni answered 200 on `/primary`.
    pub rest_primary: Option<Instant>,
    /// The member's PostgreSQL answered `pg_is_in_recovery()` false.
    pub pg_primary: Option<Instant>,
}

impl Promotion {
    /// The first instant the member was provably primary: Patroni's
    /// `/primary` on it answered 200 or its PostgreSQL left recovery,
    /// whichever was seen first.
    pub fn primary_since(&self) -> Option<Instant> {
        match (self.rest_primary, self.pg_primary) {
            (Some(r), Some(p)) => Some(r.min(p)),
            (r, p) => r.or(p),
        }
    }

    /// The three instants relative to `origin`, for messages and logs.
    pub fn describe(&self, origin: Instant) -> String {
        let at = |t: Option<Instant>| {
            t.map_or("not seen".to_string(), |t| {
                format!("{:.3}s", t.saturating_duration_since(origin).as_secs_f64())
            })
        };
        format!(
            "leader key named it at {}, /primary 200 at {}, pg_is_in_recovery() false at {}",
            at(self.key_named),
            at(self.rest_primary),
            at(self.pg_primary)
        )
    }
}

/// Polls, every 10 ms and independently of any portal, etcd's leader key,
/// Patroni's `/primary` on one member and that member's
/// `pg_is_in_recovery()`, recording the first instant each says the member
/// leads.
pub struct PromotionWatch {
    seen: Arc<Mutex<Promotion>>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl PromotionWatch {
    pub fn start(cluster: &PatroniCluster, i: usize) -> PromotionWatch {
        let seen = Arc::new(Mutex::new(Promotion::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let member = &cluster.members[i];
        let period = Duration::from_millis(10);

        let rest = std::thread::spawn({
            let (seen, stop, api) = (seen.clone(), stop.clone(), member.api_port);
            move || {
                while !stop.load(Ordering::Relaxed) {
                    if rest_get(api, "/primary").is_some_and(|(code, _)| code == 200) {
                        seen.lock().expect("seen").rest_primary = Some(Instant::now());
                        return;
                    }
                    std::thread::sleep(period);
                }
            }
        });
        let key = std::thread::spawn({
            let (seen, stop) = (seen.clone(), stop.clone());
            let endpoints = cluster.etcd_hosts.join(",");
            let key = format!("/service/{}/leader", cluster.scope);
            let name = member.name.clone();
            move || {
                while !stop.load(Ordering::Relaxed) {
                    let out = super::etcd::etcdctl(
                        &endpoints,
                        None,
                        &["get", &key, "--print-value-only"],
                    );
                    if String::from_utf8_lossy(&out.stdout).trim() == name {
                        seen.lock().expect("seen").key_named = Some(Instant::now());
                        return;
                    }
                    std::thread::sleep(period);
                }
            }
        });
        let task = tokio::spawn({
            let (seen, stop, port) = (seen.clone(), stop.clone(), member.pg_port);
            async move {
                let mut client = None;
                while !stop.load(Ordering::Relaxed) {
                    if client.is_none() {
                        client = try_direct(port).await.ok();
                    }
                    if let Some(c) = client.as_ref() {
                        match c.query_one("select pg_is_in_recovery()", &[]).await {
                            Ok(row) if !row.get::<_, bool>(0) => {
                                seen.lock().expect("seen").pg_primary = Some(Instant::now());
                                return;
                            }
                            Ok(_) => {}
                            Err(_) => client = None,
                        }
                    }
                    tokio::time::sleep(period).await;
                }
            }
        });
        PromotionWatch {
            seen,
            stop,
            threads: vec![rest, key],
            task,
        }
    }

    pub fn seen(&self) -> Promotion {
        *self.seen.lock().expect("seen")
    }

    /// Waits until the member is provably primary
    /// ([`Promotion::primary_since`]); panics after `limit`.
    pub async fn wait_primary(&self, limit: Duration) -> Instant {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(at) = self.seen().primary_since() {
                return at;
            }
            assert!(
                Instant::now() < deadline,
                "the member was not promoted within {limit:?}: {:?}",
                self.seen()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops polling (waiting up to 2 s for the last of the three sources
    /// to be seen) and returns what was seen.
    pub async fn stop(self) -> Promotion {
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            let seen = self.seen();
            if seen.key_named.is_some() && seen.rest_primary.is_some() && seen.pg_primary.is_some()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.stop.store(true, Ordering::Relaxed);
        let seen = self.seen.clone();
        let _ = self.task.await;
        for t in self.threads {
            let _ = tokio::task::block_in_place(|| t.join());
        }
        let seen = *seen.lock().expect("seen");
        seen
    }
}

/// The writes in `acks` that the member on `old` acknowledged although the
/// writer sent them after `since`, the instant another member was provably
/// primary: a client was told they committed on a member that was no longer
/// the cluster's primary (Patroni rewinds them away when that member
/// rejoins). Writes sent earlier and acknowledged later raced the promotion
/// and are not counted.
pub fn acked_by_after(acks: &[Ack], old: u16, since: Instant) -> Vec<Ack> {
    acks.iter()
        .filter(|a| a.port == old && a.sent > since)
        .copied()
        .collect()
}

/// Panics, listing them with their instants relative to `since`, when
/// [`acked_by_after`] finds any.
pub fn assert_none_acked_by_after(what: &str, acks: &[Ack], old: u16, since: Instant) {
    let bad = acked_by_after(acks, old, since);
    if bad.is_empty() {
        return;
    }
    let ms = |t: Instant| t.saturating_duration_since(since).as_millis();
    let shown: Vec<String> = bad
        .iter()
        .take(10)
        .map(|a| {
            format!(
                "id {} sent +{} ms, acked +{} ms",
                a.id,
                ms(a.sent),
                ms(a.acked)
            )
        })
        .collect();
    let last = bad.last().map_or(0, |a| ms(a.acked));
    panic!(
        "{what}: {} write(s) acknowledged by the old primary (port {old}) although sent after \
         the new primary was confirmed (instants after that confirmation; the last acked \
         +{last} ms): {}{}",
        bad.len(),
        shown.join("; "),
        if bad.len() > shown.len() { "; ..." } else { "" }
    );
}

/// The leader's timeline, from its term as `/status` shows it
/// (`3 (system 7713...)`).
pub fn leader_term(status: &serde_json::Value) -> Option<u64> {
    let name = leader(status)?;
    let term = member(status, &name)["term"].as_str()?;
    term.split_whitespace().next()?.parse().ok()
}

pub async fn wait_roles_within(portal: &Portal, name: &str, replicas: &[&str], limit: Duration) {
    portal
        .wait_for_within(
            &format!("leader {name} with replicas {replicas:?}"),
            limit,
            |st| cluster(st)["leader"] == name && replica_names(st) == replicas,
        )
        .await;
}
