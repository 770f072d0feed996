//! The Patroni target: two PostgreSQL 15 members run by real Patroni agents
//! over a real three-member etcd cluster (the DCS), two portals watching
//! Patroni's keys in etcd (portal 1 probes Patroni's REST API through the
//! harness relays, portal 2 probes PostgreSQL directly, `check: native`),
//! writers through both, and a nemesis that hurts the cluster while Patroni,
//! not the harness, makes every promotion.
//!
//! Faults: `kill -9` of the leader's PostgreSQL (postmaster stopped, then it
//! and every backend killed; its agent lives and starts it again); SIGSTOP of
//! a member's Patroni agent for 1 to 5 s (its PostgreSQL runs on), or of the
//! leader's agent for 12 to 15 s (the leader key expires after `ttl`, 10 s,
//! and the other member promotes while the old primary stays writable); a
//! SIGSTOP of a member's PostgreSQL for 0.2 to 3 s; a switchover (Patroni's
//! REST API, `POST /switchover`); one etcd member stopped, or two (quorum
//! lost) briefly; a portal restart; portal 1's path to a member (PostgreSQL
//! and REST relays) stalled or cut.
//!
//! The truth is watched from outside the portals, every 15 ms: a server
//! process (port and postmaster start time, as the writes report it) is the
//! real primary from the first instant it was seen out of recovery or its
//! member's Patroni answered 200 on `/primary` (whichever came first) until
//! its `kill -9` returned or another process became primary. A frozen old
//! primary that stays writable is not the primary after the other member's
//! promotion.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::io::{self, Read as _, Write as _};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_util::sync::CancellationToken;

use super::checker::{secs, Agreement, History, Identity, Micros, Outcome, Reign, Write};
use super::nemesis::{agree, lock, restart_portal, Heals, Kind, Proc, Resource, Target, World};
use super::redis::signal_pid;
use super::relay::{Mode, Relay};
use super::{on_thread, sampler, start_portals, Clock, Log, Report, Settings};
use crate::common::etcd::EtcdCluster;
use crate::common::patroni::{rest_get, try_direct, PatroniCluster, SUPERUSER_PASSWORD};
use crate::common::pg::{pg_config, pg_error, PgTls};
use crate::common::{free_port, temp_certs};

/// The faults only this target draws (the others: `Kind::Stall` of a
/// member's PostgreSQL, `Kind::PortalRestart`, `Kind::Path`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PatroniFault {
    /// `kill -9` of the leader's PostgreSQL; its agent restarts it.
    KillPostgres,
    /// SIGSTOP of a member's agent for 1 to 5 s (no key expires).
    AgentPause,
    /// SIGSTOP of the leader's agent for 12 to 15 s: its key expires, the
    /// other member promotes, the old primary stays writable until thawed.
    LeaderAgentFreeze,
    /// `POST /switchover` to the leader's REST API.
    Switchover,
    /// One etcd member stopped (SIGTERM) for 1 to 4 s.
    EtcdStop,
    /// Two etcd members stopped for 0.5 to 2.5 s: no quorum.
    EtcdQuorumLoss,
}

impl PatroniFault {
    pub fn label(self) -> &'static str {
        match self {
            PatroniFault::KillPostgres => "kill -9 of the leader's PostgreSQL",
            PatroniFault::AgentPause => "Patroni agent SIGSTOP 1-5 s",
            PatroniFault::LeaderAgentFreeze => "leader's agent SIGSTOP past ttl",
            PatroniFault::Switchover => "switchover",
            PatroniFault::EtcdStop => "one etcd member stopped",
            PatroniFault::EtcdQuorumLoss => "two etcd members stopped (no quorum)",
        }
    }

    /// Faults that change the leader: they start once every heal is done,
    /// the cluster has settled and both portals agree.
    fn topology(self) -> bool {
        matches!(
            self,
            PatroniFault::KillPostgres | PatroniFault::LeaderAgentFreeze | PatroniFault::Switchover
        )
    }
}

/// One step of a Patroni schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PStep {
    pub kind: Kind,
    pub target: Target,
    pub duration: Duration,
    /// Path faults: cut (true) or stall.
    pub cut: bool,
    /// etcd faults: the members stopped.
    pub etcd: Vec<usize>,
    pub pause: Duration,
}

impl fmt::Display for PStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = |d: Duration| d.as_millis();
        match self.kind {
            Kind::Patroni(fault) => write!(f, "{fault:?}")?,
            kind => write!(f, "{kind:?}")?,
        }
        match self.kind {
            Kind::Patroni(PatroniFault::EtcdStop | PatroniFault::EtcdQuorumLoss) => {
                write!(f, " etcd {:?}", self.etcd)?
            }
            Kind::Patroni(PatroniFault::KillPostgres | PatroniFault::Switchover) => {}
            _ => write!(f, " {:?}", self.target)?,
        }
        if self.kind == Kind::Path {
            write!(f, " {}", if self.cut { "cut" } else { "stall" })?;
        }
        if !matches!(
            self.kind,
            Kind::Patroni(PatroniFault::KillPostgres | PatroniFault::Switchover)
        ) {
            write!(f, " for {}ms", ms(self.duration))?;
        }
        write!(f, ", pause {}ms", ms(self.pause))
    }
}

fn millis(rng: &mut StdRng, from: u64, to: u64) -> Duration {
    Duration::from_millis(rng.random_range(from..=to))
}

/// The Patroni schedule for `seed`: `faults` steps, drawn from the RNG
/// only. A leader's agent frozen past `ttl` costs about 20 s (expiry,
/// promotion, rewind of the old leader), so it is drawn rarely.
pub fn patroni_schedule(seed: u64, faults: usize) -> Vec<PStep> {
    let mut rng = StdRng::seed_from_u64(seed);
    const WEIGHTS: [(Kind, u32); 9] = [
        (Kind::Patroni(PatroniFault::KillPostgres), 3),
        (Kind::Stall, 3),
        (Kind::Patroni(PatroniFault::Switchover), 2),
        (Kind::Patroni(PatroniFault::AgentPause), 2),
        (Kind::Patroni(PatroniFault::LeaderAgentFreeze), 1),
        (Kind::Patroni(PatroniFault::EtcdStop), 2),
        (Kind::Patroni(PatroniFault::EtcdQuorumLoss), 1),
        (Kind::PortalRestart, 2),
        (Kind::Path, 3),
    ];
    let total: u32 = WEIGHTS.iter().map(|(_, w)| w).sum();
    let mut steps = Vec::with_capacity(faults);
    while steps.len() < faults {
        let mut pick = rng.random_range(0..total);
        let mut kind = Kind::Stall;
        for (k, w) in WEIGHTS {
            if pick < w {
                kind = k;
                break;
            }
            pick -= w;
        }
        let member_target = |rng: &mut StdRng| {
            if rng.random_bool(0.6) {
                Target::Primary
            } else {
                Target::Replica(0)
            }
        };
        let first_etcd = rng.random_range(0..3);
        let (target, duration, etcd) = match kind {
            Kind::Patroni(PatroniFault::KillPostgres | PatroniFault::Switchover) => {
                (Target::Primary, Duration::ZERO, vec![])
            }
            Kind::Patroni(PatroniFault::AgentPause) => (
                member_target(&mut rng),
                millis(&mut rng, 1000, 5000),
                vec![],
            ),
            Kind::Patroni(PatroniFault::LeaderAgentFreeze) => {
                (Target::Primary, millis(&mut rng, 12000, 15000), vec![])
            }
            Kind::Patroni(PatroniFault::EtcdStop) => (
                Target::Primary,
                millis(&mut rng, 1000, 4000),
                vec![first_etcd],
            ),
            Kind::Patroni(PatroniFault::EtcdQuorumLoss) => (
                Target::Primary,
                millis(&mut rng, 500, 2500),
                vec![first_etcd, (first_etcd + 1) % 3],
            ),
            Kind::PortalRestart => (
                Target::Portal(rng.random_range(0..2)),
                millis(&mut rng, 0, 1000),
                vec![],
            ),
            _ => (member_target(&mut rng), millis(&mut rng, 200, 3000), vec![]),
        };
        let cut = rng.random_bool(0.5);
        steps.push(PStep {
            kind,
            target,
            duration,
            cut,
            etcd,
            pause: millis(&mut rng, 300, 2000),
        });
    }
    steps
}

// ---- members and the truth ---------------------------------------------------

/// The harness's view of one member: the PostgreSQL process the truth
/// watcher saw last.
pub struct PatMember {
    pub name: String,
    pub port: u16,
    /// `port@start` of the last process seen.
    pub run_id: String,
    /// How many processes have been seen on it.
    pub starts: u32,
}

impl Proc for PatMember {
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

fn process_id(port: u16, started: i64) -> String {
    format!("{port}@{started}")
}

/// What the truth watcher last heard from one member's PostgreSQL.
#[derive(Default, Clone)]
struct Heard {
    /// When it last answered, with no error since.
    fresh: Option<Micros>,
}

/// Records that the process `id` of member `m` was seen primary at `at`
/// (`rest`: by Patroni's `/primary`, else by leaving recovery). A new
/// process ends the reign open before it (a superseded primary's
/// unreplicated writes are rewound away, so its reign is marked as ended
/// by a failover, like a kill). A process whose reign ended may reign again
/// only when its Patroni says it leads (`/primary` 200: it holds the leader
/// key again), never because it is still out of recovery: a frozen old
/// primary stays writable but is not the primary.
fn observe_primary(world: &World<PatMember>, m: usize, id: &str, at: Micros, rest: bool) {
    let again = {
        let mut truth = lock(&world.truth);
        if truth.iter().any(|r| r.run_id == id && r.to.is_none()) {
            return;
        }
        let again = truth.iter().any(|r| r.run_id == id);
        if again && !rest {
            return;
        }
        if let Some(open) = truth.iter_mut().find(|r| r.to.is_none()) {
            open.to = Some(at);
            open.killed = true;
        }
        truth.push(Reign {
            run_id: id.to_string(),
            member: world.names[m].clone(),
            from: at,
            to: None,
            killed: false,
        });
        again
    };
    let how = if rest {
        "Patroni /primary 200"
    } else {
        "out of recovery"
    };
    world.log.line(
        &world.clock,
        &format!(
            "truth: {} ({id}) is the primary from {} ({how}){}",
            world.names[m],
            secs(at),
            if again {
                " AGAIN, after another process reigned: Patroni gave the leader key back"
            } else {
                ""
            }
        ),
    );
    world.note_process(
        m,
        &format!(
            "primary {}from {} ({how})",
            if again { "again " } else { "" },
            secs(at)
        ),
    );
}

/// Whether the open reign is a process that had reigned before another
/// one: Patroni went back to an older timeline.
fn went_back(world: &World<PatMember>) -> bool {
    let truth = lock(&world.truth);
    let Some(open) = truth.iter().find(|r| r.to.is_none()) else {
        return false;
    };
    truth
        .iter()
        .any(|r| r.run_id == open.run_id && r.to.is_some())
}

/// The open reign: (member, process), if any.
fn reigning(world: &World<PatMember>) -> Option<(usize, String)> {
    let truth = lock(&world.truth);
    let r = truth.iter().find(|r| r.to.is_none())?;
    let m = world.names.iter().position(|n| *n == r.member)?;
    Some((m, r.run_id.clone()))
}

/// Polls every member's PostgreSQL (`pg_is_in_recovery()`, the postmaster's
/// start time) and Patroni's `/primary`, every 15 ms, until `stop`.
fn start_truth_watch(
    world: Arc<World<PatMember>>,
    api_ports: Vec<u16>,
    stop: CancellationToken,
) -> Vec<std::thread::JoinHandle<()>> {
    let heard: Arc<Mutex<Vec<Heard>>> =
        Arc::new(Mutex::new(vec![Heard::default(); api_ports.len()]));
    let mut threads = Vec::new();
    for (m, &api) in api_ports.iter().enumerate() {
        let (world2, heard2, stop2) = (world.clone(), heard.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            while !stop2.is_cancelled() {
                let primary = rest_get(api, "/primary").is_some_and(|(code, _)| code == 200);
                let at = world2.clock.now();
                if primary {
                    // Only a process the poll below heard from, with no
                    // error since, within 500 ms: never a stale identity.
                    let fresh = lock(&heard2)[m].fresh;
                    if fresh.is_some_and(|t| at.saturating_sub(t) < 500_000) {
                        let id = world2.member(m).run_id.clone();
                        if !id.is_empty() {
                            observe_primary(&world2, m, &id, at, true);
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(15));
            }
        }));
        let (world2, heard2, stop2) = (world.clone(), heard.clone(), stop.clone());
        let port = world.ports[m];
        world.handle.spawn(async move {
            let mut client = None;
            while !stop2.is_cancelled() {
                if client.is_none() {
                    client = tokio::time::timeout(Duration::from_millis(500), try_direct(port))
                        .await
                        .ok()
                        .and_then(Result::ok);
                }
                if let Some(c) = client.as_ref() {
                    let answer = tokio::time::timeout(
                        Duration::from_millis(300),
                        c.query_one(
                            "SELECT pg_is_in_recovery(), \
                             (extract(epoch FROM pg_postmaster_start_time()) * 1000000)::bigint",
                            &[],
                        ),
                    )
                    .await;
                    let at = world2.clock.now();
                    match answer {
                        Ok(Ok(row)) => {
                            let in_recovery: bool = row.get(0);
                            let id = process_id(port, row.get::<_, i64>(1));
                            let changed = {
                                let mut member = world2.member(m);
                                if member.run_id != id {
                                    member.run_id = id.clone();
                                    member.starts += 1;
                                    true
                                } else {
                                    false
                                }
                            };
                            if changed {
                                world2.note_process(m, "seen");
                                world2.log.line(
                                    &world2.clock,
                                    &format!(
                                        "{} runs PostgreSQL process {id} ({})",
                                        world2.names[m],
                                        if in_recovery {
                                            "in recovery"
                                        } else {
                                            "primary"
                                        }
                                    ),
                                );
                            }
                            lock(&heard2)[m].fresh = Some(at);
                            if !in_recovery {
                                observe_primary(&world2, m, &id, at, false);
                            }
                        }
                        _ => {
                            lock(&heard2)[m].fresh = None;
                            client = None;
                        }
                    }
                } else {
                    lock(&heard2)[m].fresh = None;
                }
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
        });
    }
    threads
}

// ---- the nemesis -----------------------------------------------------------------

/// What the nemesis acts on besides the `World`.
pub struct Patroni {
    pub cluster: Mutex<PatroniCluster>,
    pub etcd: Mutex<EtcdCluster>,
    /// Portal 1's relays to each member's REST API (`World::relays` are
    /// those to its PostgreSQL).
    pub api_relays: Vec<Relay>,
}

impl Drop for Patroni {
    fn drop(&mut self) {
        // SIGCONT everything a fault may have left stopped before the
        // cluster's own drop kills it.
        let cluster = lock(&self.cluster);
        for (i, m) in cluster.members.iter().enumerate() {
            if let Some(pid) = cluster.agent_pid(i) {
                let _ = signal_pid(pid, "CONT");
            }
            for pid in postgres_pids(m.postmaster_pid()) {
                let _ = signal_pid(pid, "CONT");
            }
        }
    }
}

/// The resource of member `m`'s agent, and of etcd member `k`.
fn agent(m: usize) -> Resource {
    Resource::Member(10 + m)
}

fn etcd(k: usize) -> Resource {
    Resource::Member(20 + k)
}

/// The postmaster `pid` and every process under it.
fn postgres_pids(pid: Option<u32>) -> Vec<u32> {
    let Some(pid) = pid else {
        return Vec::new();
    };
    let table = process_table();
    let mut found = vec![pid];
    let mut frontier = vec![pid];
    while let Some(parent) = frontier.pop() {
        for &(p, ppid) in &table {
            if ppid == parent && !found.contains(&p) {
                found.push(p);
                frontier.push(p);
            }
        }
    }
    found
}

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

/// `POST path` with a JSON `body` on loopback `port` (a Patroni REST API,
/// or a portal's admin listener with a bearer `token`): status and body.
fn rest_post(port: u16, path: &str, body: &str, token: Option<&str>) -> io::Result<(u16, String)> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(40)))?;
    stream.write_all(
        format!(
            "POST {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n{auth}Content-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((code, body.trim().to_string()))
}

/// Carries out a Patroni schedule. Runs on its own thread.
pub struct PatNemesis {
    pub world: Arc<World<PatMember>>,
    pub patroni: Arc<Patroni>,
    pub api_ports: Vec<u16>,
    heals: Heals,
    pub counts: BTreeMap<Kind, usize>,
    pub agreements: Vec<Agreement>,
}

impl PatNemesis {
    fn log(&self, what: &str) {
        self.world.log.line(&self.world.clock, what);
    }

    pub fn run(&mut self, steps: &[PStep]) {
        for (i, step) in steps.iter().enumerate() {
            self.log(&format!("step {}/{}: {step}", i + 1, steps.len()));
            self.step(step);
            std::thread::sleep(step.pause);
        }
        self.heals.join(&self.world, |_| true);
        self.settle();
        self.agree();
    }

    /// The real primary now: the open reign's member.
    fn primary(&self) -> Option<usize> {
        reigning(&self.world).map(|(m, _)| m)
    }

    fn member_of(&self, target: Target) -> usize {
        let primary = self.primary().unwrap_or(0);
        match target {
            Target::Primary => primary,
            _ => 1 - primary,
        }
    }

    /// Waits (up to 60 s) until a reigning process's member is Patroni's
    /// leader (`/primary` 200) and the other member is a streaming replica
    /// of it (`/replica` 200, in the leader's `replication` list).
    fn settle(&mut self) {
        let started = Instant::now();
        let mut last = String::new();
        while started.elapsed() < Duration::from_secs(60) {
            if let Some((m, id)) = reigning(&self.world) {
                let current = self.world.member(m).run_id == id;
                let leads = rest_get(self.api_ports[m], "/primary").map(|(c, _)| c) == Some(200);
                let other = 1 - m;
                let replica =
                    rest_get(self.api_ports[other], "/replica").map(|(c, _)| c) == Some(200);
                let streaming = rest_get(self.api_ports[m], "/patroni")
                    .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(&body).ok())
                    .is_some_and(|s| {
                        s["replication"].as_array().is_some_and(|list| {
                            list.iter().any(|r| {
                                r["state"] == "streaming"
                                    && r["application_name"] == self.world.names[other].as_str()
                            })
                        })
                    });
                if current && leads && replica && streaming {
                    self.log(&format!(
                        "settled: {} leads, {} streams from it ({:.1}s)",
                        self.world.names[m],
                        self.world.names[other],
                        started.elapsed().as_secs_f64()
                    ));
                    return;
                }
                last = format!(
                    "{} reigns: current process {current}, /primary {leads}; {}: /replica \
                     {replica}, streaming {streaming}",
                    self.world.names[m], self.world.names[other]
                );
            } else {
                last = "no process reigns".into();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.world
            .error(format!("the cluster did not settle within 60 s: {last}"));
    }

    fn agree(&mut self) {
        let Some(m) = self.primary() else {
            self.world.error("no real primary to agree on".into());
            return;
        };
        let real = self.world.names[m].clone();
        let a = agree(&self.world, &real, Duration::from_secs(10));
        let failed = a.took.is_none();
        self.agreements.push(a);
        if failed && went_back(&self.world) {
            self.accept_leader(&real);
        }
    }

    /// Patroni handed the leader key back to a process on an older
    /// timeline than a promotion the portals have seen: they fence it
    /// (`older_term`) until an operator acts. The harness acts as the
    /// operator (`accept-leader` on both portals, with the peers' token),
    /// so the run goes on; the failed agreement stays in the verdict.
    fn accept_leader(&mut self, real: &str) {
        self.world.error(format!(
            "Patroni made {real} leader again on an older timeline than a promotion the \
             portals had seen; operator action: accept-leader?member={real} on both portals"
        ));
        for (p, slot) in self.world.portals.iter().enumerate() {
            let answer = rest_post(
                slot.admin.port(),
                &format!("/clusters/main/accept-leader?member={real}"),
                "",
                Some("chaos-peer-token"),
            );
            self.log(&format!(
                "portal {}: accept-leader {real}: {answer:?}",
                p + 1
            ));
        }
        let a = agree(&self.world, real, Duration::from_secs(10));
        self.agreements.push(a);
    }

    fn step(&mut self, step: &PStep) {
        *self.counts.entry(step.kind).or_default() += 1;
        if let Kind::Patroni(fault) = step.kind {
            if fault.topology() {
                self.heals.join(&self.world, |_| true);
                self.settle();
                self.agree();
            }
        }
        match step.kind {
            Kind::Patroni(PatroniFault::KillPostgres) => self.kill_postgres(),
            Kind::Patroni(PatroniFault::Switchover) => self.switchover(),
            Kind::Patroni(PatroniFault::AgentPause | PatroniFault::LeaderAgentFreeze) => {
                let m = self.member_of(step.target);
                self.freeze_agent(m, step.duration);
            }
            Kind::Patroni(PatroniFault::EtcdStop | PatroniFault::EtcdQuorumLoss) => {
                self.stop_etcd(&step.etcd, step.duration)
            }
            Kind::Stall => {
                let m = self.member_of(step.target);
                self.stall_postgres(m, step.duration);
            }
            Kind::Path => {
                let m = self.member_of(step.target);
                self.path(m, step.cut, step.duration);
            }
            Kind::PortalRestart => {
                let Target::Portal(p) = step.target else {
                    unreachable!("a portal restart targets a portal")
                };
                restart_portal(&self.world, &mut self.heals, p, step.duration);
            }
            other => unreachable!("{other:?} in a Patroni schedule"),
        }
    }

    /// SIGSTOP of the postmaster, SIGKILL of its children and then of it;
    /// the reign of that process ends when the kill returns.
    fn kill_postgres(&mut self) {
        let Some((m, id)) = reigning(&self.world) else {
            self.log("no real primary: kill skipped");
            return;
        };
        self.heals.join(&self.world, |r| r == Resource::Member(m));
        let (pid, data) = {
            let cluster = lock(&self.patroni.cluster);
            (
                cluster.members[m].postmaster_pid(),
                cluster.members[m].data_dir().to_path_buf(),
            )
        };
        let Some(pid) = pid else {
            self.log(&format!(
                "{}'s PostgreSQL does not run: kill skipped",
                self.world.names[m]
            ));
            return;
        };
        let _ = signal_pid(pid, "STOP");
        let mut pids = postgres_pids(Some(pid));
        pids.retain(|&p| p != pid);
        for &p in &pids {
            let _ = signal_pid(p, "KILL");
        }
        let _ = signal_pid(pid, "KILL");
        pids.push(pid);
        wait_gone(&pids);
        let at = self.world.clock.now();
        // A killed postmaster nobody reaps lingers as a zombie, and its pid
        // file would stop the next start: remove it (if still its own).
        let pid_file = data.join("postmaster.pid");
        let first = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|t| t.lines().next().and_then(|l| l.trim().parse::<u32>().ok()));
        if first == Some(pid) {
            let _ = std::fs::remove_file(&pid_file);
        }
        {
            let mut truth = lock(&self.world.truth);
            if let Some(r) = truth.iter_mut().find(|r| r.run_id == id && r.to.is_none()) {
                r.to = Some(at);
                r.killed = true;
            }
        }
        self.world.note_process(m, "killed (kill -9)");
        self.log(&format!(
            "kill -9 {}'s PostgreSQL (the primary, {id}, {} processes)",
            self.world.names[m],
            pids.len()
        ));
    }

    fn switchover(&mut self) {
        let Some(m) = self.primary() else {
            self.log("no real primary: switchover skipped");
            return;
        };
        let (from, to) = (self.world.names[m].clone(), self.world.names[1 - m].clone());
        let body = format!("{{\"leader\": \"{from}\", \"candidate\": \"{to}\"}}");
        self.log(&format!("POST /switchover {from} -> {to}"));
        match rest_post(self.api_ports[m], "/switchover", &body, None) {
            Ok((200, text)) => self.log(&format!("switchover: {text}")),
            Ok((code, text)) => self.log(&format!("switchover refused: {code} {text}")),
            Err(err) => self.log(&format!("switchover: no answer: {err}")),
        }
    }

    fn freeze_agent(&mut self, m: usize, d: Duration) {
        self.heals.join(&self.world, |r| r == agent(m));
        let pid = lock(&self.patroni.cluster).agent_pid(m);
        let Some(pid) = pid else {
            self.log("no agent: freeze skipped");
            return;
        };
        if let Err(err) = signal_pid(pid, "STOP") {
            self.world.error(format!("SIGSTOP agent: {err}"));
            return;
        }
        let name = self.world.names[m].clone();
        self.log(&format!(
            "SIGSTOP {name}'s Patroni agent{} for {}ms",
            if Some(m) == self.primary() {
                " (the leader)"
            } else {
                ""
            },
            d.as_millis()
        ));
        let world = self.world.clone();
        self.heals.spawn(
            format!("freeze of {name}'s agent"),
            vec![agent(m)],
            move || {
                std::thread::sleep(d);
                if let Err(err) = signal_pid(pid, "CONT") {
                    world.error(format!("SIGCONT {name}'s agent: {err}"));
                }
                world
                    .log
                    .line(&world.clock, &format!("SIGCONT {name}'s Patroni agent"));
            },
        );
    }

    fn stall_postgres(&mut self, m: usize, d: Duration) {
        self.heals.join(&self.world, |r| r == Resource::Member(m));
        let pid = lock(&self.patroni.cluster).members[m].postmaster_pid();
        let pids = postgres_pids(pid);
        if pids.is_empty() {
            self.log(&format!(
                "{}'s PostgreSQL does not run: stall skipped",
                self.world.names[m]
            ));
            return;
        }
        for &p in &pids {
            let _ = signal_pid(p, "STOP");
        }
        let name = self.world.names[m].clone();
        self.log(&format!(
            "SIGSTOP {name}'s PostgreSQL (postmaster and {} children){} for {}ms",
            pids.len() - 1,
            if Some(m) == self.primary() {
                " (the primary)"
            } else {
                ""
            },
            d.as_millis()
        ));
        let world = self.world.clone();
        self.heals.spawn(
            format!("stall of {name}'s PostgreSQL"),
            vec![Resource::Member(m)],
            move || {
                std::thread::sleep(d);
                for &p in pids.iter().rev() {
                    let _ = signal_pid(p, "CONT");
                }
                world
                    .log
                    .line(&world.clock, &format!("SIGCONT {name}'s PostgreSQL"));
            },
        );
    }

    fn stop_etcd(&mut self, members: &[usize], d: Duration) {
        self.heals
            .join(&self.world, |r| (0..3).any(|k| r == etcd(k)));
        for &k in members {
            lock(&self.patroni.etcd).stop(k);
        }
        self.log(&format!(
            "etcd member(s) {members:?} stopped (SIGTERM){} for {}ms",
            if members.len() > 1 { ": no quorum" } else { "" },
            d.as_millis()
        ));
        let world = self.world.clone();
        let patroni = self.patroni.clone();
        let members = members.to_vec();
        self.heals.spawn(
            format!("etcd {members:?} stopped"),
            members.iter().map(|&k| etcd(k)).collect(),
            move || {
                std::thread::sleep(d);
                for &k in &members {
                    lock(&patroni.etcd).restart(k);
                }
                world.log.line(
                    &world.clock,
                    &format!("etcd member(s) {members:?} started again, healthy"),
                );
            },
        );
    }

    /// Stalls or cuts portal 1's relays (PostgreSQL and REST) to member `m`.
    fn path(&mut self, m: usize, cut: bool, d: Duration) {
        self.heals.join(&self.world, |r| r == Resource::Relay(m));
        let mode = if cut { Mode::Cut } else { Mode::Stall };
        self.world.relays[m].set(mode);
        self.patroni.api_relays[m].set(mode);
        let name = self.world.names[m].clone();
        self.log(&format!(
            "path portal 1 -> {name} (PostgreSQL and REST): {mode:?} for {}ms",
            d.as_millis()
        ));
        let (world, patroni) = (self.world.clone(), self.patroni.clone());
        self.heals.spawn(
            format!("path to {name}"),
            vec![Resource::Relay(m)],
            move || {
                std::thread::sleep(d);
                world.relays[m].resume();
                patroni.api_relays[m].resume();
                world.log.line(
                    &world.clock,
                    &format!("path portal 1 -> {name}: forwarding"),
                );
            },
        );
    }
}

// ---- writers and the run -------------------------------------------------------

const INSERT: &str = "INSERT INTO chaos (writer, value) VALUES ($1, $2) RETURNING \
     inet_server_port(), \
     (extract(epoch FROM pg_postmaster_start_time()) * 1000000)::bigint";

/// One writer: `INSERT` of (id, n) with n = 1, 2, ... through the portal's
/// `rw` endpoint (TLS, the superuser's password); reconnects after any
/// error. Every acknowledgement names the server process.
async fn writer(
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
        config
            .password(SUPERUSER_PASSWORD)
            .connect_timeout(Duration::from_secs(3));
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
                    let started: i64 = row.get(1);
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
                    let failed = err.as_db_error().is_some_and(|db| db.severity() == "ERROR");
                    let error = pg_error(&err);
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

/// Every (writer, value) row on the member on `port`.
async fn read_back(port: u16) -> io::Result<HashMap<u32, HashSet<u64>>> {
    let client = try_direct(port).await.map_err(io::Error::other)?;
    let rows = client
        .query("SELECT writer, value FROM chaos", &[])
        .await
        .map_err(|err| io::Error::other(pg_error(&err)))?;
    let mut data: HashMap<u32, HashSet<u64>> = HashMap::new();
    for row in rows {
        let (w, v): (i32, i64) = (row.get(0), row.get(1));
        data.entry(w as u32).or_default().insert(v as u64);
    }
    Ok(data)
}

/// `yaml` with each `address:`/`api:` of a member replaced by its relay.
fn through_relays(yaml: &str, pg: &[(u16, u16)], api: &[(u16, u16)]) -> String {
    let mut yaml = yaml.to_string();
    for &(from, to) in pg {
        yaml = yaml.replace(
            &format!("address: 127.0.0.1:{from}\n"),
            &format!("address: 127.0.0.1:{to}\n"),
        );
    }
    for &(from, to) in api {
        yaml = yaml.replace(
            &format!("api: 127.0.0.1:{from}\n"),
            &format!("api: 127.0.0.1:{to}\n"),
        );
    }
    yaml.replace("hold_timeout: 10s", "hold_timeout: 3s")
}

/// One chaos run against Patroni: etcd (3), Patroni (`a` bootstraps and
/// leads, `b` replicates), portal 1 through relays (`check: patroni`),
/// portal 2 direct (`check: native`), both with the etcd DCS; the schedule
/// for `settings.seed`, then the checks.
pub async fn run_patroni(settings: Settings) -> Report {
    let started = Instant::now();
    let clock = Clock(started);
    let log = Log {
        seed: settings.seed,
        lines: Arc::default(),
    };
    let steps = patroni_schedule(settings.seed, settings.faults);
    log.line(
        &clock,
        &format!(
            "schedule: {} faults against 2 Patroni members, 3 etcd members and 2 portals",
            steps.len()
        ),
    );
    for (i, step) in steps.iter().enumerate() {
        log.line(&clock, &format!("  {}: {step}", i + 1));
    }
    let (etcd, cluster) = on_thread(|| {
        let etcd = EtcdCluster::start(3);
        let cluster = PatroniCluster::start(&etcd.client_addresses(), 2);
        (etcd, cluster)
    })
    .await;
    log.line(&clock, "etcd (3) and Patroni (a leads, b streams) are up");
    let names: Vec<String> = cluster.members.iter().map(|m| m.name.clone()).collect();
    let ports: Vec<u16> = cluster.members.iter().map(|m| m.pg_port).collect();
    let api_ports: Vec<u16> = cluster.members.iter().map(|m| m.api_port).collect();
    try_direct(ports[0])
        .await
        .expect("a session to a")
        .batch_execute("CREATE TABLE chaos (writer int NOT NULL, value bigint NOT NULL)")
        .await
        .unwrap_or_else(|err| panic!("create the chaos table: {}", pg_error(&err)));

    let mut relays = Vec::new();
    let mut api_relays = Vec::new();
    for (&pg, &api) in ports.iter().zip(&api_ports) {
        relays.push(Relay::start(pg).await);
        api_relays.push(Relay::start(api).await);
    }
    let certs = temp_certs();
    let password = certs.dir.join("postgres.password");
    std::fs::write(&password, SUPERUSER_PASSWORD).expect("write the probe's password file");
    let (admins, rws) = ([free_port(), free_port()], [free_port(), free_port()]);
    let ros = [free_port(), free_port()];
    let pg_map: Vec<(u16, u16)> = ports
        .iter()
        .zip(&relays)
        .map(|(&p, r)| (p, r.port))
        .collect();
    let api_map: Vec<(u16, u16)> = api_ports
        .iter()
        .zip(&api_relays)
        .map(|(&p, r)| (p, r.port))
        .collect();
    let yaml1 = through_relays(
        &cluster.portal_yaml_with_dcs(&certs, admins[0], rws[0], ros[0]),
        &pg_map,
        &api_map,
    );
    let yaml2 = through_relays(
        &cluster.portal_yaml_native_with_dcs(&certs, admins[1], rws[1], ros[1], &password),
        &[],
        &[],
    );
    let (portals, _token_dir) =
        start_portals(&log, &clock, [yaml1, yaml2], admins, rws, settings.peers).await;
    let world = Arc::new(World {
        clock,
        log: log.clone(),
        handle: tokio::runtime::Handle::current(),
        members: names
            .iter()
            .zip(&ports)
            .map(|(name, &port)| {
                Mutex::new(PatMember {
                    name: name.clone(),
                    port,
                    run_id: String::new(),
                    starts: 0,
                })
            })
            .collect(),
        names: names.clone(),
        ports: ports.clone(),
        relays,
        portals,
        truth: Mutex::new(Vec::new()),
        processes: Mutex::new(HashMap::new()),
        errors: Mutex::new(Vec::new()),
        log_dir: super::log_dir_for("patroni", settings.seed),
    });
    let _ = std::fs::remove_dir_all(&world.log_dir);
    let patroni = Arc::new(Patroni {
        cluster: Mutex::new(cluster),
        etcd: Mutex::new(etcd),
        api_relays,
    });
    let stop_truth = CancellationToken::new();
    let truth_threads = start_truth_watch(world.clone(), api_ports.clone(), stop_truth.clone());
    let deadline = Instant::now() + Duration::from_secs(20);
    while reigning(&world).map(|(m, _)| m) != Some(0) {
        assert!(
            Instant::now() < deadline,
            "CHAOS_SEED={}: the truth watcher never saw a primary",
            settings.seed
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    super::wait_first_leader(&world, settings.seed, Duration::from_secs(30)).await;
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
            writers.push(tokio::spawn(writer(
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

    let (counts, agreements) = {
        let (world, patroni, api_ports) = (world.clone(), patroni.clone(), api_ports.clone());
        on_thread(move || {
            let mut nemesis = PatNemesis {
                world,
                patroni,
                api_ports,
                heals: Heals::default(),
                counts: BTreeMap::new(),
                agreements: Vec::new(),
            };
            nemesis.run(&steps);
            (nemesis.counts, nemesis.agreements)
        })
        .await
    };
    let primary = reigning(&world).map(|(m, _)| m).unwrap_or(0);
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
    stop_truth.cancel();
    for t in truth_threads {
        let _ = on_thread(move || t.join()).await;
    }
    let final_data = match read_back(ports[primary]).await {
        Ok(d) => Some(d),
        Err(err) => {
            world.error(format!("read-back from the final primary: {err}"));
            None
        }
    };
    {
        let cluster = lock(&patroni.cluster);
        for m in &cluster.members {
            world.save_log(&format!("patroni-{}.log", m.name), &m.log());
        }
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
    let report = super::conclude(
        &world,
        history,
        settings.seed,
        counts,
        started,
        "chaos_patroni",
    );
    drop(world);
    on_thread(move || drop(patroni)).await;
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_patroni_seed_replays_the_same_schedule() {
        assert_eq!(patroni_schedule(3, 40), patroni_schedule(3, 40));
        assert_ne!(patroni_schedule(3, 40), patroni_schedule(4, 40));
        let s = patroni_schedule(1, 300);
        for fault in [
            PatroniFault::KillPostgres,
            PatroniFault::AgentPause,
            PatroniFault::LeaderAgentFreeze,
            PatroniFault::Switchover,
            PatroniFault::EtcdStop,
            PatroniFault::EtcdQuorumLoss,
        ] {
            assert!(
                s.iter().any(|st| st.kind == Kind::Patroni(fault)),
                "{fault:?}"
            );
        }
    }
}
