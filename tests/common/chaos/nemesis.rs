//! The nemesis: a schedule of faults drawn up front from a seeded RNG, and
//! the thread that carries it out against real Redis servers, two portals
//! and the relays in front of portal 1.
//!
//! The schedule is a list of steps (fault kind, abstract target, durations,
//! pause before the next step), drawn from `StdRng::seed_from_u64(seed)` and
//! nothing else, so a seed always replays the same schedule. Targets are
//! resolved when a step runs from the nemesis's own bookkeeping (which member
//! is the real primary, which member to promote), which depends only on the
//! steps before it, never on timing.
//!
//! A fault starts in the nemesis thread; its end (the heal: SIGCONT, the
//! restart as a replica, the rogue master's REPLICAOF, ...) runs on its own
//! thread after the fault's duration, so faults overlap: the next step starts
//! after the step's pause, which may be shorter than its duration. A step
//! first waits for the heals pending on what it touches (a member, a relay, a
//! portal); a kill or a promotion first waits for every heal, then checks
//! that both portals agree on the real primary.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::runtime::Handle;

use super::checker::{secs, short, Agreement, Micros, Reign};
use super::redis::{signal_pid, Member};
use super::relay::{Mode, Relay};
use super::{admin_status, Clock, Log};
use crate::common::Portal;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// `kill -9` of the primary, promotion of a replica; later the killed
    /// member comes back as a replica of the new primary.
    KillPromote,
    /// SIGSTOP of a member, SIGCONT after the duration.
    Stall,
    /// A member restarted empty, as a master (a rogue), for the duration;
    /// then made a replica of the real primary. When the target is the
    /// primary, it is first killed and a replica promoted (the old primary
    /// comes back empty).
    RogueMaster,
    /// SIGKILL of one portal; started again with the same configuration
    /// after the duration.
    PortalRestart,
    /// The relay between portal 1 and one member stalls or cuts.
    Path,
    /// `DEBUG SLEEP` of the primary (a slow probe).
    DebugSleep,
    /// PostgreSQL: `kill -9` of the primary, promotion of the standby, and
    /// the old primary started again on its old timeline, as a primary, for
    /// the duration; then rebuilt as a standby of the new primary.
    OldPrimary,
    /// Sentinel target: `kill -9` of the primary; Sentinel fails over (the
    /// harness promotes nobody); once it has, the killed member comes back
    /// empty, as a master, until Sentinel makes it a replica.
    SentinelKill,
    /// Sentinel target: SIGSTOP of the primary until Sentinel has failed
    /// over, then SIGCONT after the duration: the old primary wakes up still
    /// a master while Sentinel names another.
    FrozenPrimary,
    /// Sentinel target: SIGSTOP, or `kill -9` and restart, of one or two
    /// Sentinels for the duration (the DCS blips).
    DcsBlip,
    /// Patroni: a fault only the Patroni target draws (see `patroni.rs`).
    Patroni(super::patroni::PatroniFault),
}

impl Kind {
    /// The kinds a Redis schedule draws.
    pub const ALL: [Kind; 6] = [
        Kind::KillPromote,
        Kind::Stall,
        Kind::RogueMaster,
        Kind::PortalRestart,
        Kind::Path,
        Kind::DebugSleep,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Kind::KillPromote => "kill -9 + promote",
            Kind::Stall => "SIGSTOP stall",
            Kind::RogueMaster => "empty restarted master",
            Kind::PortalRestart => "portal restart",
            Kind::Path => "portal 1 path stall/cut",
            Kind::DebugSleep => "DEBUG SLEEP",
            Kind::OldPrimary => "old primary back on its old timeline",
            Kind::SentinelKill => "kill -9 of the primary + Sentinel failover",
            Kind::FrozenPrimary => "primary SIGSTOPped through a Sentinel failover",
            Kind::DcsBlip => "Sentinel SIGSTOP/kill",
            Kind::Patroni(fault) => fault.label(),
        }
    }

    pub fn topology(self) -> bool {
        matches!(
            self,
            Kind::KillPromote
                | Kind::RogueMaster
                | Kind::OldPrimary
                | Kind::SentinelKill
                | Kind::FrozenPrimary
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The real primary when the step runs.
    Primary,
    /// A member by its index in the configuration.
    Member(usize),
    /// The n-th (modulo their number) of the members that are not the
    /// primary.
    Replica(usize),
    Portal(usize),
    /// Sentinels: how many (1 or 2), from which index (modulo 3).
    Sentinels {
        first: usize,
        count: usize,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub kind: Kind,
    pub target: Target,
    /// How long the fault lasts (stall, rogue window, portal down, path
    /// fault, sleep) or, for a kill, until the killed member restarts.
    pub duration: Duration,
    /// For kills: from the kill to the promotion.
    pub down: Duration,
    /// For kills: which replica is promoted (modulo their number).
    pub promote: usize,
    /// For path faults: cut (true) or stall.
    pub cut: bool,
    /// For a rogue master: start it from the RDB file of its last sync
    /// rather than empty (only when the schedule is asked for these).
    pub keep_rdb: bool,
    /// From the start of this fault to the next step.
    pub pause: Duration,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = |d: Duration| d.as_millis();
        write!(f, "{:?} {:?}", self.kind, self.target)?;
        match self.kind {
            Kind::KillPromote | Kind::RogueMaster | Kind::OldPrimary => write!(
                f,
                " down {}ms promote #{} for {}ms{}",
                ms(self.down),
                self.promote,
                ms(self.duration),
                if self.keep_rdb { " from its RDB" } else { "" }
            )?,
            Kind::Path => write!(
                f,
                " {} for {}ms",
                if self.cut { "cut" } else { "stall" },
                ms(self.duration)
            )?,
            Kind::DcsBlip => write!(
                f,
                " {} for {}ms",
                if self.cut {
                    "kill -9 + restart"
                } else {
                    "SIGSTOP"
                },
                ms(self.duration)
            )?,
            _ => write!(f, " for {}ms", ms(self.duration))?,
        }
        write!(f, ", pause {}ms", ms(self.pause))
    }
}

fn millis(rng: &mut StdRng, from: u64, to: u64) -> Duration {
    Duration::from_millis(rng.random_range(from..=to))
}

/// The schedule for `seed`: `faults` steps against `members` members and two
/// portals. Drawn from the RNG only. `rdb_rogues` lets half the rogue masters
/// start from their last sync's RDB (see `Member::restart`); the draws are
/// the same either way.
pub fn schedule(seed: u64, faults: usize, members: usize, rdb_rogues: bool) -> Vec<Step> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut steps: Vec<Step> = Vec::with_capacity(faults);
    const WEIGHTS: [(Kind, u32); 6] = [
        (Kind::KillPromote, 3),
        (Kind::Stall, 3),
        (Kind::RogueMaster, 3),
        (Kind::PortalRestart, 1),
        (Kind::Path, 2),
        (Kind::DebugSleep, 2),
    ];
    let total: u32 = WEIGHTS.iter().map(|(_, w)| w).sum();
    while steps.len() < faults {
        // Inside a rogue master's window, often make the primary slow or
        // unreachable: the trap the portal must not fall into.
        let after_rogue = steps.last().is_some_and(|s| s.kind == Kind::RogueMaster);
        let kind = if after_rogue && rng.random_bool(0.6) {
            match rng.random_range(0..4) {
                0 | 1 => Kind::Stall,
                2 => Kind::Path,
                _ => Kind::DebugSleep,
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
        let primary_or_member = |rng: &mut StdRng, p: f64| {
            if after_rogue || rng.random_bool(p) {
                Target::Primary
            } else {
                Target::Member(rng.random_range(0..members))
            }
        };
        let step = match kind {
            Kind::KillPromote | Kind::OldPrimary | Kind::Patroni(_) => Step {
                kind,
                target: Target::Primary,
                duration: millis(&mut rng, 300, 3000),
                down: millis(&mut rng, 0, 800),
                promote: rng.random_range(0..members),
                cut: false,
                pause: millis(&mut rng, 300, 2000),
                keep_rdb: false,
            },
            Kind::RogueMaster => Step {
                kind,
                target: if rng.random_bool(0.7) {
                    Target::Primary
                } else {
                    Target::Replica(rng.random_range(0..members))
                },
                duration: millis(&mut rng, 1000, 4000),
                down: millis(&mut rng, 0, 800),
                promote: rng.random_range(0..members),
                cut: false,
                pause: millis(&mut rng, 200, 1000),
                keep_rdb: rng.random_bool(0.5) && rdb_rogues,
            },
            Kind::Stall => Step {
                kind,
                target: primary_or_member(&mut rng, 0.5),
                duration: millis(&mut rng, 200, 3000),
                down: Duration::ZERO,
                promote: 0,
                cut: false,
                pause: millis(&mut rng, 200, 2000),
                keep_rdb: false,
            },
            Kind::Path => Step {
                kind,
                target: primary_or_member(&mut rng, 0.5),
                duration: millis(&mut rng, 200, 3000),
                down: Duration::ZERO,
                promote: 0,
                cut: !after_rogue && rng.random_bool(0.5),
                pause: millis(&mut rng, 200, 2000),
                keep_rdb: false,
            },
            Kind::DebugSleep => Step {
                kind,
                target: Target::Primary,
                duration: millis(&mut rng, 500, 2000),
                down: Duration::ZERO,
                promote: 0,
                cut: false,
                pause: millis(&mut rng, 200, 2000),
                keep_rdb: false,
            },
            Kind::PortalRestart => Step {
                kind,
                target: Target::Portal(rng.random_range(0..2)),
                duration: millis(&mut rng, 0, 1000),
                down: Duration::ZERO,
                promote: 0,
                cut: false,
                pause: millis(&mut rng, 300, 2000),
                keep_rdb: false,
            },
            Kind::SentinelKill | Kind::FrozenPrimary | Kind::DcsBlip => {
                unreachable!("not drawn by the Redis schedule")
            }
        };
        steps.push(step);
    }
    steps
}

/// One portal process slot: its configuration, and the process of the
/// moment (none while it is down).
pub struct PortalSlot {
    pub yaml: String,
    pub admin: SocketAddr,
    pub rw: u16,
    /// +1 each time the process is killed: samples taken across a change are
    /// thrown away, the others are attributed to one process.
    pub incarnation: AtomicU32,
    pub process: Mutex<Option<Portal>>,
}

/// Everything the nemesis and its heal threads act on.
pub struct World<M> {
    pub clock: Clock,
    pub log: Log,
    pub handle: Handle,
    pub members: Vec<Mutex<M>>,
    pub names: Vec<String>,
    pub ports: Vec<u16>,
    /// Portal 1's relays, one per member.
    pub relays: Vec<Relay>,
    pub portals: Vec<PortalSlot>,
    pub truth: Mutex<Vec<Reign>>,
    /// What each server process (by run id) was.
    pub processes: Mutex<HashMap<String, String>>,
    /// Faults the harness failed to apply or heal.
    pub errors: Mutex<Vec<String>>,
    /// Where the servers' and portals' logs are saved.
    pub log_dir: std::path::PathBuf,
}

pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<M: Proc> World<M> {
    pub fn member(&self, i: usize) -> MutexGuard<'_, M> {
        lock(&self.members[i])
    }

    /// Adds to the story of the current process of member `i`.
    pub fn note_process(&self, i: usize, what: &str) {
        let m = self.member(i);
        let at = secs(self.clock.now());
        let mut processes = lock(&self.processes);
        let story = processes
            .entry(m.process_id())
            .or_insert_with(|| format!("{}:", m.describe()));
        story.push_str(&format!(" {what} at {at};"));
    }
}

impl<M> World<M> {
    /// Writes `text` to `name` in the run's log directory.
    pub fn save_log(&self, name: &str, text: &str) {
        let _ = std::fs::create_dir_all(&self.log_dir);
        let _ = std::fs::write(self.log_dir.join(name), text);
    }

    pub fn error(&self, what: String) {
        self.log
            .line(&self.clock, &format!("HARNESS ERROR: {what}"));
        lock(&self.errors).push(what);
    }
}

/// What a pending heal touches: a step that touches the same waits for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    Member(usize),
    Relay(usize),
    Portal(usize),
    Sentinel(usize),
}

struct Pending {
    what: String,
    resources: Vec<Resource>,
    handle: JoinHandle<()>,
}

/// The heals in flight, each on its own thread.
#[derive(Default)]
pub struct Heals {
    pending: Vec<Pending>,
}

impl Heals {
    /// Waits for the pending heals that touch a resource `touches` accepts.
    pub fn join<M>(&mut self, world: &World<M>, touches: impl Fn(Resource) -> bool) {
        let (now, later): (Vec<Pending>, Vec<Pending>) = self
            .pending
            .drain(..)
            .partition(|p| p.resources.iter().any(|&r| touches(r)));
        self.pending = later;
        for p in now {
            if p.handle.join().is_err() {
                world.error(format!("the heal of {} panicked", p.what));
            }
        }
    }

    /// Runs `f` (sleep, then undo the fault) on its own thread.
    pub fn spawn(
        &mut self,
        what: String,
        resources: Vec<Resource>,
        f: impl FnOnce() + Send + 'static,
    ) {
        let handle = std::thread::spawn(f);
        self.pending.push(Pending {
            what,
            resources,
            handle,
        });
    }
}

/// Carries out a schedule. Runs on its own thread (blocking calls).
pub struct Nemesis {
    pub world: Arc<World<Member>>,
    /// The real primary, by the nemesis's bookkeeping.
    pub primary: usize,
    /// The primary a failover just killed.
    primary_before_failover: usize,
    heals: Heals,
    pub counts: BTreeMap<Kind, usize>,
    pub agreements: Vec<Agreement>,
    /// How long both portals get to agree once everything has healed.
    pub agree_within: Duration,
}

impl Nemesis {
    pub fn new(world: Arc<World<Member>>, primary: usize) -> Nemesis {
        Nemesis {
            world,
            primary,
            primary_before_failover: primary,
            heals: Heals::default(),
            counts: BTreeMap::new(),
            agreements: Vec::new(),
            agree_within: Duration::from_secs(10),
        }
    }

    fn log(&self, what: &str) {
        self.world.log.line(&self.world.clock, what);
    }

    /// Runs every step, then heals everything and checks agreement.
    pub fn run(&mut self, steps: &[Step]) {
        for (i, step) in steps.iter().enumerate() {
            self.log(&format!("step {}/{}: {step}", i + 1, steps.len()));
            self.step(step);
            std::thread::sleep(step.pause);
        }
        self.join(|_| true);
        self.agree();
    }

    /// Waits for the pending heals that touch a resource `touches` accepts.
    fn join(&mut self, touches: impl Fn(Resource) -> bool) {
        self.heals.join(&self.world, touches);
    }

    fn heal(&mut self, what: String, resources: Vec<Resource>, f: impl FnOnce() + Send + 'static) {
        self.heals.spawn(what, resources, f);
    }

    fn member_of(&self, target: Target) -> usize {
        let n = self.world.members.len();
        match target {
            Target::Primary => self.primary,
            Target::Member(i) => i % n,
            Target::Replica(i) => {
                let replicas: Vec<usize> = (0..n).filter(|&m| m != self.primary).collect();
                replicas[i % replicas.len()]
            }
            Target::Portal(_) | Target::Sentinels { .. } => {
                unreachable!("not a member: {target:?}")
            }
        }
    }

    fn step(&mut self, step: &Step) {
        *self.counts.entry(step.kind).or_default() += 1;
        if step.kind.topology() {
            self.join(|_| true);
            self.agree();
        }
        match step.kind {
            Kind::KillPromote => {
                let new = self.fail_over(step);
                let old = self.primary_before_failover;
                let world = self.world.clone();
                let delay = step.duration;
                let replicas = others(world.members.len(), new);
                self.heal(
                    format!("restart of {} as a replica", world.names[old]),
                    replicas.iter().map(|&m| Resource::Member(m)).collect(),
                    move || {
                        std::thread::sleep(delay);
                        restart_as_replica(&world, old, new);
                        wait_replicas(&world, new, &replicas);
                    },
                );
            }
            Kind::RogueMaster => {
                let (victim, primary, touched) = if step.target == Target::Primary {
                    let new = self.fail_over(step);
                    let touched = others(self.world.members.len(), new);
                    (self.primary_before_failover, new, touched)
                } else {
                    let victim = self.member_of(step.target);
                    self.world.member(victim).kill9();
                    self.log(&format!("kill -9 {} (a replica)", self.world.names[victim]));
                    (victim, self.primary, vec![victim])
                };
                let world = self.world.clone();
                let name = world.names[victim].clone();
                let result = world.member(victim).restart(None, !step.keep_rdb);
                let what = if step.keep_rdb {
                    "restarted as a master from its last sync's RDB (a rogue claiming a newer term)"
                } else {
                    "restarted empty, as a master (a rogue)"
                };
                match result {
                    Ok(()) => {
                        world.note_process(victim, what);
                        let term = world
                            .member(victim)
                            .cmd(&["INFO", "replication"], Duration::from_secs(2))
                            .map(|info| {
                                let field =
                                    |f| super::redis::info_field(&info, f).unwrap_or_default();
                                format!(
                                    "master_replid {} master_replid2 {}",
                                    short(&field("master_replid")),
                                    short(&field("master_replid2"))
                                )
                            })
                            .unwrap_or_default();
                        self.log(&format!(
                            "{name} {what}: run_id {}, {term}, for {}ms",
                            short(&world.member(victim).run_id),
                            step.duration.as_millis()
                        ));
                    }
                    Err(err) => world.error(format!("restart of {name} as a master: {err}")),
                }
                let window = step.duration;
                self.heal(
                    format!("the rogue {name}"),
                    touched.iter().map(|&m| Resource::Member(m)).collect(),
                    move || {
                        std::thread::sleep(window);
                        let follow = world.member(victim).follow(world.ports[primary]);
                        match follow {
                            Ok(()) => {
                                world.log.line(
                                    &world.clock,
                                    &format!(
                                        "{name} (rogue) told REPLICAOF {}",
                                        world.names[primary]
                                    ),
                                );
                                world.note_process(victim, "made a replica");
                            }
                            Err(err) => {
                                world.error(format!("REPLICAOF on the rogue {name}: {err}"))
                            }
                        }
                        wait_replicas(&world, primary, &touched);
                    },
                );
            }
            Kind::Stall => {
                let m = self.member_of(step.target);
                self.join(|r| r == Resource::Member(m));
                let Some(pid) = self.world.member(m).pid() else {
                    self.log(&format!(
                        "{} has no process: stall skipped",
                        self.world.names[m]
                    ));
                    return;
                };
                if let Err(err) = signal_pid(pid, "STOP") {
                    self.world
                        .error(format!("SIGSTOP {}: {err}", self.world.names[m]));
                    return;
                }
                self.log(&format!(
                    "SIGSTOP {}{}",
                    self.world.names[m],
                    if m == self.primary {
                        " (the primary)"
                    } else {
                        ""
                    }
                ));
                let world = self.world.clone();
                let d = step.duration;
                self.heal(
                    format!("stall of {}", world.names[m]),
                    vec![Resource::Member(m)],
                    move || {
                        std::thread::sleep(d);
                        if let Err(err) = signal_pid(pid, "CONT") {
                            world.error(format!("SIGCONT {}: {err}", world.names[m]));
                        }
                        world
                            .log
                            .line(&world.clock, &format!("SIGCONT {}", world.names[m]));
                    },
                );
            }
            Kind::DebugSleep => {
                let m = self.member_of(step.target);
                self.join(|r| r == Resource::Member(m));
                let world = self.world.clone();
                let d = step.duration;
                self.log(&format!(
                    "DEBUG SLEEP {:.3} on {}",
                    d.as_secs_f64(),
                    world.names[m]
                ));
                self.heal(
                    format!("DEBUG SLEEP of {}", world.names[m]),
                    vec![Resource::Member(m)],
                    move || {
                        let reply = world.member(m).cmd(
                            &["DEBUG", "SLEEP", &format!("{:.3}", d.as_secs_f64())],
                            d + Duration::from_secs(5),
                        );
                        if let Err(err) = reply {
                            world.error(format!("DEBUG SLEEP on {}: {err}", world.names[m]));
                        }
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
            Kind::OldPrimary => unreachable!("a PostgreSQL fault in a Redis schedule"),
            Kind::SentinelKill | Kind::FrozenPrimary | Kind::DcsBlip => {
                unreachable!("a Sentinel fault in a Redis schedule")
            }
            Kind::Patroni(_) => unreachable!("a Patroni fault in a Redis schedule"),
        }
    }
}

/// Stalls or cuts the relay between portal 1 and member `m` for
/// `step.duration`.
pub fn path_fault<M: Send + 'static>(
    world: &Arc<World<M>>,
    heals: &mut Heals,
    m: usize,
    step: &Step,
) {
    heals.join(world, |r| r == Resource::Relay(m));
    let mode = if step.cut { Mode::Cut } else { Mode::Stall };
    world.relays[m].set(mode);
    world.log.line(
        &world.clock,
        &format!("path portal 1 -> {}: {mode:?}", world.names[m]),
    );
    let world = world.clone();
    let d = step.duration;
    heals.spawn(
        format!("path to {}", world.names[m]),
        vec![Resource::Relay(m)],
        move || {
            std::thread::sleep(d);
            world.relays[m].resume();
            world.log.line(
                &world.clock,
                &format!("path portal 1 -> {}: forwarding", world.names[m]),
            );
        },
    );
}

/// SIGKILL of portal `p`; started again with the same configuration after
/// `down`.
pub fn restart_portal<M: Send + 'static>(
    world: &Arc<World<M>>,
    heals: &mut Heals,
    p: usize,
    down: Duration,
) {
    heals.join(world, |r| r == Resource::Portal(p));
    let slot = &world.portals[p];
    let incarnation = slot.incarnation.fetch_add(1, Ordering::SeqCst);
    if let Some(process) = lock(&slot.process).take() {
        world.save_log(
            &format!("portal-{}-process-{incarnation}.log", p + 1),
            &process.stderr_log(),
        );
    }
    world
        .log
        .line(&world.clock, &format!("portal {} killed (SIGKILL)", p + 1));
    let world = world.clone();
    heals.spawn(
        format!("restart of portal {}", p + 1),
        vec![Resource::Portal(p)],
        move || {
            std::thread::sleep(down);
            let slot = &world.portals[p];
            let portal = world.handle.block_on(Portal::start(&slot.yaml));
            *lock(&slot.process) = Some(portal);
            world
                .log
                .line(&world.clock, &format!("portal {} started again", p + 1));
        },
    );
}

/// Restarts member `old` (killed) as a replica of `primary` and waits for
/// its link.
fn restart_as_replica(world: &World<Member>, old: usize, primary: usize) {
    let name = &world.names[old];
    let result = world.member(old).restart(Some(world.ports[primary]), false);
    match result {
        Ok(()) => {
            world.note_process(
                old,
                &format!("restarted as a replica of {}", world.names[primary]),
            );
            world.log.line(
                &world.clock,
                &format!("{name} restarted as a replica of {}", world.names[primary]),
            );
        }
        Err(err) => world.error(format!("restart of {name}: {err}")),
    }
}

/// Every member index but `primary`.
fn others(n: usize, primary: usize) -> Vec<usize> {
    (0..n).filter(|&m| m != primary).collect()
}

/// Waits until each of `replicas` has its link up with `primary`.
fn wait_replicas(world: &World<Member>, primary: usize, replicas: &[usize]) {
    for &m in replicas {
        let result = world
            .member(m)
            .wait_link_up(world.ports[primary], Duration::from_secs(20));
        if let Err(err) = result {
            world.error(format!("replica {}: {err}", world.names[m]));
        }
    }
}

impl Nemesis {
    /// `kill -9` of the primary, the promotion of a replica after
    /// `step.down`, and the other replicas told to follow it. Returns the new
    /// primary; the old one is in `primary_before_failover`.
    fn fail_over(&mut self, step: &Step) -> usize {
        let world = self.world.clone();
        let old = self.primary;
        world.member(old).kill9();
        let killed_at = world.clock.now();
        end_reign(&world, killed_at);
        self.log(&format!("kill -9 {} (the primary)", world.names[old]));
        std::thread::sleep(step.down);

        let n = world.members.len();
        let replicas: Vec<usize> = (0..n).filter(|&m| m != old).collect();
        let first = step.promote % replicas.len();
        let mut new = None;
        for k in 0..replicas.len() {
            let candidate = replicas[(first + k) % replicas.len()];
            let from = world.clock.now();
            let result = world.member(candidate).promote();
            match result {
                Ok(()) => {
                    let run_id = world.member(candidate).run_id.clone();
                    lock(&world.truth).push(Reign {
                        run_id,
                        member: world.names[candidate].clone(),
                        from,
                        to: None,
                        killed: false,
                    });
                    world.note_process(candidate, "promoted to primary");
                    new = Some(candidate);
                    break;
                }
                Err(err) => world.error(format!(
                    "REPLICAOF NO ONE on {}: {err}",
                    world.names[candidate]
                )),
            }
        }
        let new = new.unwrap_or_else(|| panic!("no replica could be promoted"));
        self.log(&format!(
            "REPLICAOF NO ONE on {}: OK (the new primary)",
            world.names[new]
        ));
        for &m in &replicas {
            if m != new {
                let result = world.member(m).follow(world.ports[new]);
                if let Err(err) = result {
                    world.error(format!("REPLICAOF on {}: {err}", world.names[m]));
                }
            }
        }
        self.primary_before_failover = old;
        self.primary = new;
        new
    }

    fn agree(&mut self) {
        let real = self.world.names[self.primary].clone();
        let agreement = agree(&self.world, &real, self.agree_within);
        self.agreements.push(agreement);
    }
}

/// What a member type tells the harness about its current process.
pub trait Proc {
    /// The identity of the current process, as acknowledged writes name it
    /// (Redis: `run_id`; PostgreSQL: port and postmaster start time).
    fn process_id(&self) -> String;
    /// `a process #2 (run_id 1234abcd, port 6000)`, for reports.
    fn describe(&self) -> String;
}

impl Proc for Member {
    fn process_id(&self) -> String {
        self.run_id.clone()
    }

    fn describe(&self) -> String {
        format!(
            "{} process #{} (run_id {}, port {})",
            self.name,
            self.starts,
            short(&self.run_id),
            self.port
        )
    }
}

/// Polls both portals' `/status` until both name the real primary (`real`)
/// with the same term, for up to `within`; returns how long it took. Once
/// every fault has healed the real primary runs and continues the lineage,
/// so "no leader" on both portals is not agreement: it is unavailability
/// the portal should have ended, and fails the check.
pub fn agree<M>(world: &World<M>, real: &str, within: Duration) -> Agreement {
    let settled_at = world.clock.now();
    let start = Instant::now();
    let mut detail = String::new();
    let took = loop {
        let seen: Vec<Option<(Option<String>, Option<String>)>> = world
            .portals
            .iter()
            .map(|slot| {
                world
                    .handle
                    .block_on(admin_status(slot.admin))
                    .map(|s| (s.leader, s.term))
            })
            .collect();
        let agreed = seen.iter().all(|s| {
            s.as_ref()
                .is_some_and(|(leader, term)| leader.as_deref() == Some(real) && term.is_some())
        }) && seen.windows(2).all(|w| w[0] == w[1]);
        if agreed {
            break Some(start.elapsed().as_micros() as Micros);
        }
        detail = seen
            .iter()
            .enumerate()
            .map(|(p, s)| format!("portal {}: {s:?}", p + 1))
            .collect::<Vec<_>>()
            .join("; ");
        if start.elapsed() > within {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    match took {
        Some(t) => world.log.line(
            &world.clock,
            &format!("portals agree on {real} after {}", secs(t)),
        ),
        None => world.log.line(
            &world.clock,
            &format!("portals did NOT agree on {real} within {within:?}: {detail}"),
        ),
    }
    Agreement {
        settled_at,
        took,
        detail: format!("real primary {real}; {detail}"),
    }
}

/// Ends the current reign (the primary was killed at `at`).
pub fn end_reign<M>(world: &World<M>, at: Micros) {
    let mut truth = lock(&world.truth);
    if let Some(reign) = truth.iter_mut().rev().find(|r| r.to.is_none()) {
        reign.to = Some(at);
        reign.killed = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_replays_the_same_schedule() {
        assert_eq!(schedule(7, 50, 3, false), schedule(7, 50, 3, false));
        assert_ne!(schedule(7, 50, 3, false), schedule(8, 50, 3, false));
        let s = schedule(1, 300, 3, true);
        for kind in Kind::ALL {
            assert!(
                s.iter().any(|step| step.kind == kind),
                "{kind:?} never drawn"
            );
        }
        assert!(s.iter().any(|step| step.keep_rdb));
        assert!(!schedule(1, 300, 3, false).iter().any(|step| step.keep_rdb));
        // The trap: a rogue master followed by a slow or stalled primary.
        assert!(s.windows(2).any(|w| w[0].kind == Kind::RogueMaster
            && w[1].target == Target::Primary
            && matches!(w[1].kind, Kind::Stall | Kind::DebugSleep)));
    }
}
