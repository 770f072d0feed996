//! The PostgreSQL target: a primary and a streaming standby (native probes,
//! no DCS), two portals, writers through both, and a nemesis that kills the
//! primary (`kill -9` of the postmaster and every backend), promotes the
//! standby (`pg_ctl promote`), stalls members (SIGSTOP of the postmaster and
//! its children), starts an old primary again on its old timeline (as a
//! primary: every portal must fence it, `older_term`), restarts portals and
//! stalls or cuts portal 1's paths.
//!
//! The truth is the harness's own promotions: a server process (port and
//! postmaster start time) is the real primary from the moment `pg_ctl
//! promote` was started on it (or from the start) until its `kill -9`
//! returned. After a promotion the killed member is rebuilt as a standby of
//! the new primary (`pg_basebackup`), so kill-and-promote rounds can repeat.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;

use super::checker::{History, Identity, Outcome, Reign, Write};
use super::nemesis::{
    agree, end_reign, lock, path_fault, restart_portal, Heals, Kind, Proc, Resource, Step, Target,
    World,
};
use super::redis::signal_pid;
use super::relay::Relay;
use super::{on_thread, sampler, start_portals, Clock, Log, Report, Settings};
use crate::common::pg::PgPortalConfig;
use crate::common::pg::{bindir, clear_pg_env, pg_config, run, run_as, server_command, PgTls};
use crate::common::{free_port, temp_certs};

/// The statement every write runs: the row, and who acknowledged it.
const INSERT: &str = "INSERT INTO chaos (writer, value) VALUES ($1, $2) RETURNING \
     inet_server_port(), pg_is_in_recovery(), \
     (SELECT timeline_id FROM pg_control_checkpoint()), \
     (extract(epoch FROM pg_postmaster_start_time()) * 1000000)::bigint";

/// The identity of a server process: its port and its postmaster's start
/// time in microseconds (what `INSERT` returns).
fn process_id(port: u16, started: i64) -> String {
    format!("{port}@{started}")
}

/// One PostgreSQL member: a port and a directory kept across rebuilds, and
/// the server of the moment.
pub struct PgMember {
    pub name: String,
    pub port: u16,
    root: TempDir,
    running: bool,
    /// `port@start` of the current process.
    pub run_id: String,
    pub starts: u32,
    /// The timeline at the last start or promotion.
    pub timeline: u32,
}

impl Proc for PgMember {
    fn process_id(&self) -> String {
        self.run_id.clone()
    }

    fn describe(&self) -> String {
        format!(
            "{} process #{} (port {}, postmaster started {})",
            self.name,
            self.starts,
            self.port,
            self.run_id.split('@').nth(1).unwrap_or("?")
        )
    }
}

impl PgMember {
    fn empty(name: &str) -> PgMember {
        let root = tempfile::Builder::new()
            .prefix("portal-chaos-pg-")
            .tempdir_in("/tmp")
            .expect("temp dir for postgres under /tmp");
        if let Some((uid, gid)) = run_as() {
            std::os::unix::fs::chown(root.path(), Some(uid), Some(gid))
                .expect("chown the postgres temp dir to postgres");
        }
        PgMember {
            name: name.to_string(),
            port: free_port(),
            root,
            running: false,
            run_id: String::new(),
            starts: 0,
            timeline: 0,
        }
    }

    fn root(&self) -> &Path {
        self.root.path()
    }

    fn data(&self) -> PathBuf {
        self.root().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.root().join("server.log")
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn append_conf(&self, text: &str) {
        use std::io::Write as _;
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(self.data().join("postgresql.conf"))
            .expect("open postgresql.conf");
        file.write_all(text.as_bytes())
            .expect("append to postgresql.conf");
    }

    /// `initdb`, the test configuration, start, and the `chaos` table.
    pub fn primary(name: &str) -> PgMember {
        let mut m = PgMember::empty(name);
        run(
            server_command("initdb", m.root()).args([
                "-D",
                "data",
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",
                "--no-instructions",
            ]),
            "initdb",
        );
        std::fs::write(
            m.data().join("pg_hba.conf"),
            "local all         all          trust\n\
             host  all         all          127.0.0.1/32 trust\n\
             local replication all          trust\n\
             host  replication all          127.0.0.1/32 trust\n",
        )
        .expect("write pg_hba.conf");
        m.append_conf(
            "\n# portal chaos\n\
             listen_addresses = '127.0.0.1'\n\
             max_connections = 60\n\
             shared_buffers = 16MB\n\
             wal_level = replica\n\
             max_wal_senders = 8\n\
             wal_keep_size = '64MB'\n\
             hot_standby = on\n\
             wal_receiver_status_interval = 1s\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n\
             log_line_prefix = '%m [%p] %q%u@%d '\n",
        );
        m.set_port();
        m.start().expect("start the first primary");
        m.psql("CREATE TABLE chaos (writer int NOT NULL, value bigint NOT NULL)")
            .expect("create the chaos table");
        m
    }

    /// A new member, a streaming standby of the member on `primary`.
    pub fn standby(name: &str, primary: u16) -> PgMember {
        let mut m = PgMember::empty(name);
        m.rebuild(primary).expect("the first standby");
        m
    }

    fn set_port(&self) {
        self.append_conf(&format!(
            "\nport = {}\nunix_socket_directories = '{}'\n",
            self.port,
            self.root().display()
        ));
    }

    /// Throws the data directory away and makes it again with
    /// `pg_basebackup -R` from the member on `primary`; starts it as a
    /// standby and waits until it streams.
    pub fn rebuild(&mut self, primary: u16) -> io::Result<()> {
        self.kill9();
        let _ = std::fs::remove_dir_all(self.data());
        let out = server_command("pg_basebackup", self.root())
            .args(["-D", "data", "-h", "127.0.0.1", "-p"])
            .arg(primary.to_string())
            .args(["-U", "postgres", "-R", "-X", "stream", "-c", "fast", "-N"])
            .env("PGCONNECT_TIMEOUT", "10")
            .output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "pg_basebackup from {primary}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        self.set_port();
        self.start()?;
        self.wait_streaming(Duration::from_secs(30))
    }

    /// `pg_ctl start -w`, then reads the new process's identity.
    pub fn start(&mut self) -> io::Result<()> {
        let out = server_command("pg_ctl", self.root())
            .args(["start", "-w", "-t", "60", "-D", "data", "-l"])
            .arg(self.log_path())
            .output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "pg_ctl start ({}): {}\n{}",
                self.port,
                String::from_utf8_lossy(&out.stderr).trim(),
                self.log_tail(20)
            )));
        }
        self.running = true;
        self.starts += 1;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let answer = self.psql(
                "SELECT (extract(epoch FROM pg_postmaster_start_time()) * 1000000)::bigint \
                 || ' ' || (SELECT timeline_id FROM pg_control_checkpoint())",
            );
            if let Ok(text) = &answer {
                let mut words = text.split_whitespace();
                if let (Some(started), Some(tl)) = (words.next(), words.next()) {
                    self.run_id = process_id(self.port, started.parse().unwrap_or(0));
                    self.timeline = tl.parse().unwrap_or(0);
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "postgres {} does not answer: {answer:?}",
                    self.port
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The postmaster's pid, from `postmaster.pid`.
    pub fn postmaster_pid(&self) -> Option<u32> {
        if !self.running {
            return None;
        }
        let text = std::fs::read_to_string(self.data().join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// The postmaster and every process under it.
    pub fn pids(&self) -> Vec<u32> {
        let Some(pid) = self.postmaster_pid() else {
            return Vec::new();
        };
        let mut pids = descendants(pid);
        pids.insert(0, pid);
        pids
    }

    /// SIGSTOP of the postmaster (so it forks nothing), then SIGKILL of it
    /// and every backend, as a machine crash would; waits until all are
    /// gone.
    pub fn kill9(&mut self) {
        if let Some(pid) = self.postmaster_pid() {
            let _ = signal_pid(pid, "STOP");
            let mut pids = descendants(pid);
            pids.push(pid);
            for &p in &pids {
                let _ = signal_pid(p, "KILL");
            }
            wait_gone(&pids);
            // A killed postmaster may linger as a zombie (nothing reaps it
            // in a container) and its pid file would stop the next start.
            // The same for the socket's lock file.
            let _ = std::fs::remove_file(self.data().join("postmaster.pid"));
            let _ = std::fs::remove_file(self.root().join(format!(".s.PGSQL.{}.lock", self.port)));
            let _ = std::fs::remove_file(self.root().join(format!(".s.PGSQL.{}", self.port)));
        }
        self.running = false;
    }

    /// `pg_ctl promote -w`; the new timeline.
    pub fn promote(&mut self) -> io::Result<()> {
        let out = server_command("pg_ctl", self.root())
            .args(["promote", "-w", "-t", "30", "-D", "data"])
            .output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "pg_ctl promote ({}): {}",
                self.port,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        if let Ok(tl) = self.psql("SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)") {
            self.timeline = u32::from_str_radix(&tl, 16).unwrap_or(0);
        }
        Ok(())
    }

    /// One statement with `psql -At`, its output trimmed.
    pub fn psql(&self, sql: &str) -> Result<String, String> {
        let mut command = Command::new(bindir().join("psql"));
        clear_pg_env(&mut command);
        let out = command
            .args([
                "-X",
                "-w",
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
            ])
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-U", "postgres", "-d", "postgres", "-c", sql])
            .env("PGCONNECT_TIMEOUT", "5")
            .stdin(Stdio::null())
            .output()
            .map_err(|err| format!("run psql: {err}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }

    pub fn wait_streaming(&self, limit: Duration) -> io::Result<()> {
        let deadline = Instant::now() + limit;
        let mut last = Ok(String::new());
        while Instant::now() < deadline {
            last = self.psql(
                "SELECT pg_is_in_recovery()::text || ' ' || \
                 coalesce((SELECT status FROM pg_stat_wal_receiver), 'none')",
            );
            if last.as_deref() == Ok("true streaming") {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(io::Error::other(format!(
            "{} is not streaming within {limit:?}: {last:?}",
            self.name
        )))
    }
}

impl Drop for PgMember {
    fn drop(&mut self) {
        for pid in self.pids() {
            let _ = signal_pid(pid, "CONT");
        }
        self.kill9();
    }
}

/// `(pid, ppid)` of every live process, from `/proc`.
fn process_table() -> Vec<(u32, u32)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let e = e.ok()?;
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
        let after = &stat[stat.rfind(')')? + 2..];
        let mut fields = after.split_whitespace();
        if fields.next()? == "Z" {
            return None;
        }
        Some((pid, fields.next()?.parse().ok()?))
    })
    .collect()
}

fn descendants(root: u32) -> Vec<u32> {
    let table = process_table();
    let mut found = Vec::new();
    let mut frontier = vec![root];
    while let Some(parent) = frontier.pop() {
        for &(pid, ppid) in &table {
            if ppid == parent && !found.contains(&pid) {
                found.push(pid);
                frontier.push(pid);
            }
        }
    }
    found
}

fn wait_gone(pids: &[u32]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let live = process_table();
        if !pids.iter().any(|p| live.iter().any(|(q, _)| q == p)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---- the schedule -------------------------------------------------------------

fn millis(rng: &mut StdRng, from: u64, to: u64) -> Duration {
    Duration::from_millis(rng.random_range(from..=to))
}

/// The PostgreSQL schedule for `seed`: `faults` steps against two members
/// (a primary and a standby) and two portals. Right after an old primary is
/// back on its old timeline, the real primary is often stalled or cut off
/// from portal 1, or a portal restarts (it then knows no past leader: only
/// the timelines, and its peer, tell it which claimant is stale).
pub fn pg_schedule(seed: u64, faults: usize) -> Vec<Step> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut steps: Vec<Step> = Vec::with_capacity(faults);
    const WEIGHTS: [(Kind, u32); 5] = [
        (Kind::KillPromote, 2),
        (Kind::OldPrimary, 3),
        (Kind::Stall, 3),
        (Kind::PortalRestart, 2),
        (Kind::Path, 2),
    ];
    let total: u32 = WEIGHTS.iter().map(|(_, w)| w).sum();
    while steps.len() < faults {
        let after_old = steps.last().is_some_and(|s| s.kind == Kind::OldPrimary);
        let kind = if after_old && rng.random_bool(0.7) {
            match rng.random_range(0..4) {
                0 | 1 => Kind::Stall,
                2 => Kind::Path,
                _ => Kind::PortalRestart,
            }
        } else {
            let mut pick = rng.random_range(0..total);
            let mut chosen = Kind::Stall;
            for (kind, weight) in WEIGHTS {
                if pick < weight {
                    chosen = kind;
                    break;
                }
                pick -= weight;
            }
            chosen
        };
        let target = match kind {
            Kind::PortalRestart => Target::Portal(rng.random_range(0..2)),
            Kind::KillPromote | Kind::OldPrimary => Target::Primary,
            _ if after_old || rng.random_bool(0.6) => Target::Primary,
            _ => Target::Replica(0),
        };
        let step = Step {
            kind,
            target,
            duration: match kind {
                Kind::KillPromote => millis(&mut rng, 300, 2000),
                Kind::OldPrimary => millis(&mut rng, 1000, 4000),
                Kind::PortalRestart => millis(&mut rng, 0, 1000),
                _ => millis(&mut rng, 200, 3000),
            },
            down: millis(&mut rng, 0, 800),
            promote: 0,
            cut: !after_old && rng.random_bool(0.5),
            keep_rdb: false,
            pause: millis(&mut rng, 200, 1500),
        };
        steps.push(step);
    }
    steps
}

// ---- the nemesis ----------------------------------------------------------------

/// Carries out a PostgreSQL schedule. Runs on its own thread.
pub struct PgNemesis {
    pub world: Arc<World<PgMember>>,
    /// The real primary (0 or 1); the other member is the standby.
    pub primary: usize,
    heals: Heals,
    pub counts: BTreeMap<Kind, usize>,
    pub agreements: Vec<super::checker::Agreement>,
}

impl PgNemesis {
    fn log(&self, what: &str) {
        self.world.log.line(&self.world.clock, what);
    }

    fn agree(&mut self) {
        let real = self.world.names[self.primary].clone();
        let a = agree(&self.world, &real, Duration::from_secs(10));
        self.agreements.push(a);
    }

    pub fn run(&mut self, steps: &[Step]) {
        for (i, step) in steps.iter().enumerate() {
            self.log(&format!("step {}/{}: {step}", i + 1, steps.len()));
            self.step(step);
            std::thread::sleep(step.pause);
        }
        self.heals.join(&self.world, |_| true);
        self.agree();
    }

    fn member_of(&self, target: Target) -> usize {
        match target {
            Target::Primary => self.primary,
            _ => 1 - self.primary,
        }
    }

    fn step(&mut self, step: &Step) {
        *self.counts.entry(step.kind).or_default() += 1;
        if step.kind.topology() {
            self.heals.join(&self.world, |_| true);
            self.agree();
        }
        match step.kind {
            Kind::KillPromote | Kind::OldPrimary => self.fail_over(step),
            Kind::Stall => {
                let m = self.member_of(step.target);
                self.heals.join(&self.world, |r| r == Resource::Member(m));
                let pids = self.world.member(m).pids();
                if pids.is_empty() {
                    self.log(&format!(
                        "{} has no process: stall skipped",
                        self.world.names[m]
                    ));
                    return;
                }
                for &pid in &pids {
                    let _ = signal_pid(pid, "STOP");
                }
                self.log(&format!(
                    "SIGSTOP {} (postmaster and {} children){}",
                    self.world.names[m],
                    pids.len() - 1,
                    if m == self.primary {
                        " (the primary)"
                    } else {
                        ""
                    }
                ));
                let world = self.world.clone();
                let d = step.duration;
                self.heals.spawn(
                    format!("stall of {}", world.names[m]),
                    vec![Resource::Member(m)],
                    move || {
                        std::thread::sleep(d);
                        for &pid in pids.iter().rev() {
                            let _ = signal_pid(pid, "CONT");
                        }
                        world
                            .log
                            .line(&world.clock, &format!("SIGCONT {}", world.names[m]));
                    },
                );
            }
            Kind::Path => {
                let m = self.member_of(step.target);
                path_fault(&self.world, &mut self.heals, m, step);
            }
            Kind::PortalRestart => {
                let Target::Portal(p) = step.target else {
                    unreachable!("a portal restart targets a portal")
                };
                restart_portal(&self.world, &mut self.heals, p, step.duration);
            }
            Kind::RogueMaster
            | Kind::DebugSleep
            | Kind::SentinelKill
            | Kind::FrozenPrimary
            | Kind::DcsBlip
            | Kind::Patroni(_) => {
                unreachable!("a Redis fault in a PostgreSQL schedule")
            }
        }
    }

    /// `kill -9` of the primary, `pg_ctl promote` of the standby after
    /// `step.down`; for `OldPrimary`, the old primary started again on its
    /// old timeline for `step.duration`. Then (on a heal thread) the old
    /// primary is rebuilt as a standby of the new one.
    fn fail_over(&mut self, step: &Step) {
        let world = self.world.clone();
        let old = self.primary;
        let new = 1 - old;
        world.member(old).kill9();
        end_reign(&world, world.clock.now());
        world.note_process(old, "killed (kill -9)");
        self.log(&format!("kill -9 {} (the primary)", world.names[old]));
        std::thread::sleep(step.down);
        let from = world.clock.now();
        let promoted = world.member(new).promote();
        match promoted {
            Ok(()) => {
                let (run_id, tl) = {
                    let m = world.member(new);
                    (m.run_id.clone(), m.timeline)
                };
                lock(&world.truth).push(Reign {
                    run_id,
                    member: world.names[new].clone(),
                    from,
                    to: None,
                    killed: false,
                });
                world.note_process(new, &format!("promoted to timeline {tl}"));
                self.log(&format!(
                    "pg_ctl promote {}: OK, timeline {tl} (the new primary)",
                    world.names[new]
                ));
            }
            Err(err) => world.error(format!("promote {}: {err}", world.names[new])),
        }
        self.primary = new;
        let mut wait = Duration::from_millis(300).max(step.duration / 2);
        if step.kind == Kind::OldPrimary {
            let started = world.member(old).start();
            match started {
                Ok(()) => {
                    let tl = world.member(old).timeline;
                    world.note_process(
                        old,
                        &format!("started again on its old timeline {tl}, as a primary (stale)"),
                    );
                    self.log(&format!(
                        "{} started again on its old timeline {tl} as a primary, for {}ms",
                        world.names[old],
                        step.duration.as_millis()
                    ));
                }
                Err(err) => world.error(format!("restart of {}: {err}", world.names[old])),
            }
            wait = step.duration;
        }
        let primary_port = world.ports[new];
        self.heals.spawn(
            format!("rebuild of {}", world.names[old]),
            vec![Resource::Member(old)],
            move || {
                std::thread::sleep(wait);
                let name = world.names[old].clone();
                let rebuilt = world.member(old).rebuild(primary_port);
                match rebuilt {
                    Ok(()) => {
                        world.note_process(
                            old,
                            &format!("rebuilt as a standby of {}", world.names[new]),
                        );
                        world.log.line(
                            &world.clock,
                            &format!(
                                "{name} rebuilt (pg_basebackup) as a standby of {}",
                                world.names[new]
                            ),
                        );
                    }
                    Err(err) => world.error(format!("rebuild of {name}: {err}")),
                }
            },
        );
    }
}

// ---- writers and the run ----------------------------------------------------------

/// One writer: `INSERT` of (id, n) with n = 1, 2, ... through the portal's
/// `rw` endpoint (tokio-postgres over TLS); reconnects after any error.
async fn pg_writer(
    id: u32,
    portal: usize,
    port: u16,
    ca: PathBuf,
    clock: Clock,
    stop: CancellationToken,
) -> Vec<Write> {
    let mut writes = Vec::new();
    let mut n = 0i64;
    while !stop.is_cancelled() {
        let mut config = pg_config(port);
        config.connect_timeout(Duration::from_secs(3));
        let connect = tokio::time::timeout(Duration::from_secs(4), config.connect(PgTls::new(&ca)));
        let connected = tokio::select! {
            r = connect => r,
            _ = stop.cancelled() => break,
        };
        let Ok(Ok((client, connection))) = connected else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let driver = tokio::spawn(async move {
            let _ = connection.await;
        });
        let prepared = tokio::time::timeout(Duration::from_secs(3), client.prepare(INSERT)).await;
        let Ok(Ok(statement)) = prepared else {
            driver.abort();
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        while !stop.is_cancelled() {
            n += 1;
            let sent = clock.now();
            let answer = tokio::time::timeout(
                Duration::from_secs(5),
                client.query_one(&statement, &[&(id as i32), &n]),
            )
            .await;
            let record = |outcome| Write {
                writer: id,
                portal,
                value: n as u64,
                sent,
                outcome,
            };
            match answer {
                Ok(Ok(row)) => {
                    let at = clock.now();
                    let server_port: i32 = row.get(0);
                    let started: i64 = row.get(3);
                    writes.push(record(Outcome::Acked {
                        at,
                        by: Some(Identity {
                            run_id: process_id(server_port as u16, started),
                            port: server_port as u16,
                        }),
                    }));
                }
                Ok(Err(err)) => {
                    let at = clock.now();
                    // An ERROR rolled the statement back; anything else
                    // (FATAL, a closed connection) leaves it unknown.
                    let failed = err.as_db_error().is_some_and(|db| db.severity() == "ERROR");
                    let error = crate::common::pg::pg_error(&err);
                    writes.push(record(if failed {
                        Outcome::Failed { at, error }
                    } else {
                        Outcome::Unknown { at, error }
                    }));
                    break;
                }
                Err(_) => {
                    writes.push(record(Outcome::Unknown {
                        at: clock.now(),
                        error: "no reply within 5 s".into(),
                    }));
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        driver.abort();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    writes
}

/// Every (writer, value) row on the member.
fn pg_read_back(member: &PgMember) -> io::Result<HashMap<u32, HashSet<u64>>> {
    let text = member
        .psql("SELECT writer || ' ' || value FROM chaos")
        .map_err(io::Error::other)?;
    let mut data: HashMap<u32, HashSet<u64>> = HashMap::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if let (Some(w), Some(v)) = (words.next(), words.next()) {
            if let (Ok(w), Ok(v)) = (w.parse(), v.parse()) {
                data.entry(w).or_default().insert(v);
            }
        }
    }
    Ok(data)
}

/// One chaos run against PostgreSQL: `a` the first primary, `b` its
/// standby, portal 1 through relays, portal 2 direct, the schedule for
/// `settings.seed`, then the checks.
pub async fn run_postgres(settings: Settings) -> Report {
    let started = Instant::now();
    let clock = Clock(started);
    let log = Log {
        seed: settings.seed,
        lines: Arc::default(),
    };
    let steps = pg_schedule(settings.seed, settings.faults);
    log.line(
        &clock,
        &format!(
            "schedule: {} faults against a PostgreSQL primary and standby and 2 portals",
            steps.len()
        ),
    );
    for (i, step) in steps.iter().enumerate() {
        log.line(&clock, &format!("  {}: {step}", i + 1));
    }
    let names = vec!["a".to_string(), "b".to_string()];
    let members = on_thread(|| {
        let a = PgMember::primary("a");
        let b = PgMember::standby("b", a.port);
        vec![a, b]
    })
    .await;
    let ports: Vec<u16> = members.iter().map(|m| m.port).collect();
    let mut relays = Vec::new();
    for &port in &ports {
        relays.push(Relay::start(port).await);
    }
    let relay_ports: Vec<u16> = relays.iter().map(|r| r.port).collect();
    let certs = temp_certs();
    let configs = [
        PgPortalConfig::new(&certs, &relay_ports).hold_timeout("3s"),
        PgPortalConfig::new(&certs, &ports).hold_timeout("3s"),
    ];
    let (portals, _token_dir) = start_portals(
        &log,
        &clock,
        [configs[0].yaml(), configs[1].yaml()],
        [configs[0].ports.admin, configs[1].ports.admin],
        [configs[0].ports.rw, configs[1].ports.rw],
        settings.peers,
    )
    .await;
    let world = Arc::new(World {
        clock,
        log: log.clone(),
        handle: tokio::runtime::Handle::current(),
        members: members.into_iter().map(Mutex::new).collect(),
        names: names.clone(),
        ports: ports.clone(),
        relays,
        portals,
        truth: Mutex::new(Vec::new()),
        processes: Mutex::new(HashMap::new()),
        errors: Mutex::new(Vec::new()),
        log_dir: super::log_dir_for("postgres", settings.seed),
    });
    let _ = std::fs::remove_dir_all(&world.log_dir);
    world.note_process(0, "the first primary");
    world.note_process(1, "the first standby");
    lock(&world.truth).push(Reign {
        run_id: world.member(0).run_id.clone(),
        member: "a".into(),
        from: 0,
        to: None,
        killed: false,
    });
    super::wait_first_leader(&world, settings.seed, Duration::from_secs(20)).await;
    log.line(&clock, "both portals lead with a; writers start");

    let stop_writers = CancellationToken::new();
    let stop_samplers = CancellationToken::new();
    let samplers: Vec<_> = (0..2)
        .map(|p| tokio::spawn(sampler(world.clone(), p, stop_samplers.clone())))
        .collect();
    let mut writers = Vec::new();
    for p in 0..2 {
        for k in 0..settings.writers_per_portal {
            let id = (p as u32 + 1) * 100 + k;
            writers.push(tokio::spawn(pg_writer(
                id,
                p,
                world.portals[p].rw,
                certs.ca.clone(),
                clock,
                stop_writers.clone(),
            )));
        }
    }
    let writers_from = clock.now();
    tokio::time::sleep(Duration::from_secs(1)).await;

    let (counts, agreements, primary) = {
        let world = world.clone();
        on_thread(move || {
            let mut nemesis = PgNemesis {
                world,
                primary: 0,
                heals: Heals::default(),
                counts: BTreeMap::new(),
                agreements: Vec::new(),
            };
            nemesis.run(&steps);
            (nemesis.counts, nemesis.agreements, nemesis.primary)
        })
        .await
    };
    log.line(
        &clock,
        &format!("faults done; the final primary is {}", names[primary]),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let writers_to = clock.now();
    stop_writers.cancel();
    let mut writes = Vec::new();
    for w in writers {
        writes.extend(w.await.expect("writer task"));
    }
    stop_samplers.cancel();
    let mut samples = Vec::new();
    for s in samplers {
        samples.extend(s.await.expect("sampler task"));
    }
    let final_data = {
        let world = world.clone();
        on_thread(move || pg_read_back(&world.member(primary))).await
    };
    let final_data = match final_data {
        Ok(d) => Some(d),
        Err(err) => {
            world.error(format!("read-back from the final primary: {err}"));
            None
        }
    };
    for (i, name) in names.iter().enumerate() {
        let tail = world.member(i).log_tail(20_000);
        world.save_log(&format!("postgres-{name}.log"), &tail);
    }
    let history = History {
        writes,
        truth: lock(&world.truth).clone(),
        samples,
        agreements,
        processes: lock(&world.processes).clone(),
        final_data,
        writers_from,
        writers_to,
    };
    super::conclude(
        &world,
        history,
        settings.seed,
        counts,
        started,
        "chaos_postgres",
    )
}
