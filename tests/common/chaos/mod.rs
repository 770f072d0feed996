//! Randomized fault injection (Jepsen-style) against real Redis servers and
//! two real portals, checking the portal's one promise: no write is ever
//! acknowledged by a member that is not the real primary of that moment.
//!
//! - `nemesis`: the seeded schedule of faults and the thread that applies
//!   them (and keeps the truth: which server process was the real primary
//!   when);
//! - `relay`: the TCP relays portal 1 reaches the members through;
//! - `redis`: the member processes;
//! - `postgres`, `sentinel`: the PostgreSQL and Redis-with-Sentinel targets;
//! - `checker`: pure checks over the recorded history;
//! - here: the writers, the `/status` sampler, one run, and the report.
//!
//! Every failure message and every log line names `CHAOS_SEED=<n>`: run
//! `CHAOS_SEED=<n> cargo test --test suite chaos_redis:: -- --nocapture` to replay it.

#![allow(dead_code)]

pub mod checker;
pub mod nemesis;
pub mod patroni;
pub mod postgres;
pub mod redis;
pub mod relay;
pub mod sentinel;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::ClientConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::common::{
    default_client_config, encode, query, temp_certs, tls_connect_with, Portal, PortalConfig,
    Reply, Resp,
};
use checker::{
    check, secs, short, History, Identity, Micros, Outcome, Reign, Sample, Verdict, Write,
};
use nemesis::{lock, schedule, Kind, Nemesis, PortalSlot, World};
use redis::{info_field, Member};
use relay::Relay;

/// The run's clock: microseconds since its start, shared by every task.
#[derive(Clone, Copy)]
pub struct Clock(Instant);

impl Clock {
    pub fn now(&self) -> Micros {
        self.0.elapsed().as_micros() as Micros
    }
}

/// The run's log: every line names the seed and the time; printed as it
/// goes (seen with `--nocapture`, or when the test fails) and kept.
#[derive(Clone)]
pub struct Log {
    seed: u64,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Log {
    pub fn line(&self, clock: &Clock, what: &str) {
        let line = format!("[CHAOS_SEED={} t={}] {what}", self.seed, secs(clock.now()));
        println!("{line}");
        lock(&self.lines).push(line);
    }
}

/// What one run is asked to do.
#[derive(Debug, Clone)]
pub struct Settings {
    pub seed: u64,
    pub faults: usize,
    pub members: usize,
    pub writers_per_portal: u32,
    /// Let some rogue masters start from their last sync's RDB.
    pub rdb_rogues: bool,
    /// Configure the two portals as each other's peers (`admin.peers`, a
    /// shared `admin.token_file`), as a production deployment would.
    pub peers: bool,
}

/// What one run found.
pub struct Report {
    pub seed: u64,
    pub counts: BTreeMap<Kind, usize>,
    pub verdict: Verdict,
    pub harness_errors: Vec<String>,
    pub took: Duration,
    /// The test module that replays it (`cargo test --test suite TEST::`).
    pub test: &'static str,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.verdict.ok()
    }

    /// One line: what the run did and found.
    pub fn summary(&self, samples: usize) -> String {
        let v = &self.verdict;
        format!(
            "done in {:.1}s: {} writes, {} acked ({} without identity), {} to a non-primary, \
             {} lost by the portal, {} lost by the database (+{} unknown acknowledger), \
             {samples} /status samples, longest unavailability {} from {}",
            self.took.as_secs_f64(),
            v.writes,
            v.acked,
            v.acked_without_identity,
            v.non_primary.len(),
            v.lost_by_portal.len(),
            v.lost_by_database,
            v.lost_unknown_by_database,
            secs(v.longest_unavailability.0),
            secs(v.longest_unavailability.1),
        )
    }

    /// The failures, each block naming the seed.
    pub fn failure_text(&self) -> String {
        let mut out = format!(
            "CHAOS_SEED={} failed (replay: CHAOS_SEED={} cargo test --test suite {}:: -- --nocapture):\n{}",
            self.seed,
            self.seed,
            self.test,
            self.verdict.failures()
        );
        if !self.harness_errors.is_empty() {
            out.push_str(&format!(
                "harness errors (faults not applied or healed as planned): {}\n",
                self.harness_errors.join(" | ")
            ));
        }
        out
    }
}

/// The `/status` fields the harness reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub epoch: u64,
    pub leader: Option<String>,
    pub term: Option<String>,
}

/// `GET /status` on an admin listener (1 s limit): the first cluster's
/// epoch, leader and leader term, or `None` when it does not answer.
/// Waits until every portal names member `a` leader, panicking with the
/// seed after `limit`: every target starts from there.
pub async fn wait_first_leader<M>(world: &World<M>, seed: u64, limit: Duration) {
    for (p, slot) in world.portals.iter().enumerate() {
        let deadline = Instant::now() + limit;
        loop {
            let s = admin_status(slot.admin).await;
            if s.as_ref().and_then(|s| s.leader.as_deref()) == Some("a") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "CHAOS_SEED={seed}: portal {} did not elect a at start: {s:?}",
                p + 1
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Saves every portal's log, checks `history`, logs the verdict and saves
/// the run's own log: the end every target shares.
pub fn conclude<M>(
    world: &World<M>,
    history: History,
    seed: u64,
    counts: BTreeMap<Kind, usize>,
    started: Instant,
    test: &'static str,
) -> Report {
    for (p, slot) in world.portals.iter().enumerate() {
        if let Some(process) = lock(&slot.process).as_ref() {
            world.save_log(
                &format!(
                    "portal-{}-process-{}.log",
                    p + 1,
                    slot.incarnation.load(Ordering::SeqCst)
                ),
                &process.stderr_log(),
            );
        }
    }
    world.log.line(
        &world.clock,
        &format!("logs saved in {}", world.log_dir.display()),
    );
    let verdict = check(&history);
    let report = Report {
        seed,
        counts,
        verdict,
        harness_errors: lock(&world.errors).clone(),
        took: started.elapsed(),
        test,
    };
    world
        .log
        .line(&world.clock, &report.summary(history.samples.len()));
    if !report.ok() {
        world.log.line(&world.clock, &report.failure_text());
    }
    world.save_log("chaos.log", &lock(&world.log.lines).join("\n"));
    report
}

pub async fn admin_status(admin: SocketAddr) -> Option<Status> {
    let attempt = async {
        let mut tcp = TcpStream::connect(admin).await?;
        tcp.write_all(b"GET /status HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .await?;
        let mut raw = Vec::new();
        tcp.read_to_end(&mut raw).await?;
        Ok::<_, io::Error>(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(1), attempt)
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.") || !head.contains(" 200 ") {
        return None;
    }
    let json: serde_json::Value = serde_json::from_str(body).ok()?;
    let cluster = &json["clusters"][0];
    Some(Status {
        epoch: cluster["epoch"].as_u64()?,
        leader: cluster["leader"].as_str().map(str::to_string),
        term: cluster["leader_term"].as_str().map(str::to_string),
    })
}

/// Samples one portal's `/status` every 50 ms until `stop`. A sample whose
/// request straddled a restart of the portal is thrown away.
async fn sampler<M: Send + 'static>(
    world: Arc<World<M>>,
    portal: usize,
    stop: CancellationToken,
) -> Vec<Sample> {
    let mut samples = Vec::new();
    let mut last = None;
    let slot = &world.portals[portal];
    while !stop.is_cancelled() {
        let before = slot.incarnation.load(Ordering::SeqCst);
        let status = admin_status(slot.admin).await;
        let after = slot.incarnation.load(Ordering::SeqCst);
        if let (Some(s), true) = (status, before == after) {
            let shown = (before, s.leader.clone(), s.term.clone());
            if last.as_ref() != Some(&shown) {
                world.log.line(
                    &world.clock,
                    &format!(
                        "portal {} (process #{before}) shows leader {} term {} epoch {}",
                        portal + 1,
                        s.leader.as_deref().unwrap_or("none"),
                        s.term
                            .as_deref()
                            .map(short_term)
                            .unwrap_or_else(|| "none".into()),
                        s.epoch
                    ),
                );
                last = Some(shown);
            }
            samples.push(Sample {
                portal,
                incarnation: before,
                at: world.clock.now(),
                epoch: s.epoch,
                leader: s.leader,
                term: s.term,
            });
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            _ = stop.cancelled() => {}
        }
    }
    samples
}

/// A Redis term with its ids shortened: `replid:1234abcd (after 5678ef01)`.
fn short_term(term: &str) -> String {
    term.split(' ')
        .map(|word| {
            let (head, id) = match word.split_once(':') {
                Some((h, id)) => (format!("{h}:"), id),
                None => (String::new(), word),
            };
            let tail = if id.ends_with(')') { ")" } else { "" };
            let bare = id.trim_start_matches('(').trim_end_matches(')');
            let lead = if id.starts_with('(') { "(" } else { "" };
            format!("{head}{lead}{}{tail}", short(bare))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Where one seed's logs are saved: under the target directory.
pub fn log_dir(seed: u64) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("chaos-seed-{seed}"))
}

/// Where one seed's logs of another target (`postgres`) are saved.
pub fn log_dir_for(target: &str, seed: u64) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("chaos-{target}-seed-{seed}"))
}

/// Parses `run_id` and `tcp_port` from an `INFO server` reply.
fn identity(info: &Reply) -> Option<Identity> {
    Some(Identity {
        run_id: info_field(info, "run_id")?,
        port: info_field(info, "tcp_port")?.parse().ok()?,
    })
}

/// One writer: `RPUSH chaos:<id> <n>` with n = 1, 2, ... through the
/// portal's `rw` endpoint, each pipelined with `INFO server` to learn who
/// acknowledged it; reconnects after any error, until `stop`.
async fn writer(
    id: u32,
    portal: usize,
    port: u16,
    tls: Arc<ClientConfig>,
    clock: Clock,
    stop: CancellationToken,
) -> Vec<Write> {
    let mut writes = Vec::new();
    let mut n = 0u64;
    let key = format!("chaos:{id}");
    while !stop.is_cancelled() {
        let connect = tokio::time::timeout(
            Duration::from_secs(3),
            tls_connect_with(port, tls.clone(), "localhost"),
        );
        let tls_stream = tokio::select! {
            r = connect => r,
            _ = stop.cancelled() => break,
        };
        let Ok(Ok(tls_stream)) = tls_stream else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let mut session = Resp::new(tls_stream);
        while !stop.is_cancelled() {
            n += 1;
            let value = n.to_string();
            let mut bytes = encode(&["RPUSH", &key, &value]);
            bytes.extend(encode(&["INFO", "server"]));
            let sent = clock.now();
            let first = tokio::time::timeout(Duration::from_secs(5), async {
                session.stream.write_all(&bytes).await?;
                session.stream.flush().await?;
                session.read_reply().await
            })
            .await;
            let record = |outcome| Write {
                writer: id,
                portal,
                value: n,
                sent,
                outcome,
            };
            match first {
                Ok(Ok(Reply::Integer(_))) => {
                    let at = clock.now();
                    let second =
                        tokio::time::timeout(Duration::from_secs(2), session.read_reply()).await;
                    let by = match second {
                        Ok(Ok(info)) => identity(&info),
                        _ => None,
                    };
                    let known = by.is_some();
                    writes.push(record(Outcome::Acked { at, by }));
                    if !known {
                        break;
                    }
                }
                Ok(Ok(other)) => {
                    writes.push(record(Outcome::Failed {
                        at: clock.now(),
                        error: other.text(),
                    }));
                    break;
                }
                Ok(Err(err)) => {
                    writes.push(record(Outcome::Unknown {
                        at: clock.now(),
                        error: err.to_string(),
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
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    writes
}

/// Each writer's values on the member at `port`.
fn read_back(port: u16, writers: &[u32]) -> io::Result<HashMap<u32, HashSet<u64>>> {
    let mut data = HashMap::new();
    for &w in writers {
        let reply = query(
            port,
            &["LRANGE", &format!("chaos:{w}"), "0", "-1"],
            Duration::from_secs(10),
        )?;
        let Reply::Array(Some(items)) = reply else {
            return Err(io::Error::other(format!("LRANGE chaos:{w}: {reply:?}")));
        };
        data.insert(
            w,
            items.iter().filter_map(|i| i.text().parse().ok()).collect(),
        );
    }
    Ok(data)
}

/// Runs on a blocking-friendly thread and returns its result to async code.
async fn on_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.await.expect("the thread panicked")
}

/// `yaml` with `lines` added to its `admin:` section (the configurations
/// the tests write have `shutdown:` right after it).
pub fn with_admin(yaml: &str, lines: &str) -> String {
    yaml.replacen("\n\nshutdown:", &format!("\n{lines}\n\nshutdown:"), 1)
}

/// Starts the two portals from their configurations; with `peers`, each
/// names the other in `admin.peers` and both read the same
/// `admin.token_file` (kept in the returned directory).
pub async fn start_portals(
    log: &Log,
    clock: &Clock,
    yamls: [String; 2],
    admins: [u16; 2],
    rws: [u16; 2],
    peers: bool,
) -> (Vec<PortalSlot>, tempfile::TempDir) {
    let dir = tempfile::TempDir::new().expect("temp dir for the admin token");
    let token = dir.path().join("admin.token");
    std::fs::write(&token, "chaos-peer-token\n").expect("write the admin token");
    let mut portals = Vec::new();
    for (p, yaml) in yamls.into_iter().enumerate() {
        let yaml = if peers {
            with_admin(
                &yaml,
                &format!(
                    "  token_file: {}\n  peers: [\"127.0.0.1:{}\"]",
                    token.display(),
                    admins[1 - p]
                ),
            )
        } else {
            yaml
        };
        let process = Portal::start(&yaml).await;
        portals.push(PortalSlot {
            yaml,
            admin: SocketAddr::from(([127, 0, 0, 1], admins[p])),
            rw: rws[p],
            incarnation: AtomicU32::new(0),
            process: Mutex::new(Some(process)),
        });
    }
    log.line(
        clock,
        if peers {
            "portals 1 and 2 are each other's peers (admin.peers, admin.token_file)"
        } else {
            "portals without peers (CHAOS_PEERS=0)"
        },
    );
    (portals, dir)
}

/// One chaos run against Redis: members `a`, `b`, ... (`a` the first
/// primary), portal 1 through relays, portal 2 direct, writers through both,
/// the nemesis's schedule for `settings.seed`, then the checks.
pub async fn run_redis(settings: Settings) -> Report {
    let started = Instant::now();
    let clock = Clock(started);
    let log = Log {
        seed: settings.seed,
        lines: Arc::default(),
    };
    let steps = schedule(
        settings.seed,
        settings.faults,
        settings.members,
        settings.rdb_rogues,
    );
    log.line(
        &clock,
        &format!(
            "schedule: {} faults against {} Redis members and 2 portals",
            steps.len(),
            settings.members
        ),
    );
    for (i, step) in steps.iter().enumerate() {
        log.line(&clock, &format!("  {}: {step}", i + 1));
    }

    // Members: a is the primary, the others its replicas, links up.
    let names: Vec<String> = ["a", "b", "c", "d"][..settings.members]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let members = {
        let names = names.clone();
        on_thread(move || {
            let primary = Member::start(&names[0], None).expect("start the primary");
            let mut members = vec![primary];
            for name in &names[1..] {
                let m = Member::start(name, Some(members[0].port)).expect("start a replica");
                members.push(m);
            }
            for m in &members[1..] {
                m.wait_link_up(members[0].port, Duration::from_secs(15))
                    .expect("replica link up");
            }
            members
        })
        .await
    };
    let ports: Vec<u16> = members.iter().map(|m| m.port).collect();
    let mut relays = Vec::new();
    for &port in &ports {
        relays.push(Relay::start(port).await);
    }
    let relay_ports: Vec<u16> = relays.iter().map(|r| r.port).collect();

    let certs = temp_certs();
    let configs = [
        PortalConfig::new(&certs, &relay_ports),
        PortalConfig::new(&certs, &ports),
    ];
    let admins = [configs[0].ports.admin, configs[1].ports.admin];
    let rws = [configs[0].ports.rw, configs[1].ports.rw];
    let yamls = [configs[0].yaml(), configs[1].yaml()];
    let (portals, _token_dir) =
        start_portals(&log, &clock, yamls, admins, rws, settings.peers).await;

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
        log_dir: log_dir(settings.seed),
    });
    let _ = std::fs::remove_dir_all(&world.log_dir);
    for i in 0..settings.members {
        world.note_process(
            i,
            if i == 0 {
                "the first primary"
            } else {
                "a first replica"
            },
        );
    }
    lock(&world.truth).push(Reign {
        run_id: world.member(0).run_id.clone(),
        member: names[0].clone(),
        from: 0,
        to: None,
        killed: false,
    });

    // Both portals must see a as the leader before anything starts.
    wait_first_leader(&world, settings.seed, Duration::from_secs(15)).await;
    log.line(&clock, "both portals lead with a; writers start");

    let stop_writers = CancellationToken::new();
    let stop_samplers = CancellationToken::new();
    let tls = default_client_config(&certs.ca);
    let samplers: Vec<_> = (0..2)
        .map(|p| tokio::spawn(sampler(world.clone(), p, stop_samplers.clone())))
        .collect();
    let mut writer_ids = Vec::new();
    let mut writers = Vec::new();
    for p in 0..2 {
        for k in 0..settings.writers_per_portal {
            let id = (p as u32 + 1) * 100 + k;
            writer_ids.push(id);
            writers.push(tokio::spawn(writer(
                id,
                p,
                world.portals[p].rw,
                tls.clone(),
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
            let mut nemesis = Nemesis::new(world, 0);
            nemesis.run(&steps);
            (nemesis.counts, nemesis.agreements, nemesis.primary)
        })
        .await
    };
    log.line(
        &clock,
        &format!("faults done; the final primary is {}", names[primary]),
    );

    // A last second of writes on the settled cluster, then stop and read back.
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
    let final_port = ports[primary];
    let final_data = {
        let ids = writer_ids.clone();
        on_thread(move || read_back(final_port, &ids)).await
    };
    let final_data = match final_data {
        Ok(d) => Some(d),
        Err(err) => {
            world.error(format!("read-back from the final primary: {err}"));
            None
        }
    };

    for (i, name) in names.iter().enumerate() {
        let tail = world.member(i).log_tail(100_000);
        world.save_log(&format!("redis-{name}.log"), &tail);
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
    conclude(
        &world,
        history,
        settings.seed,
        counts,
        started,
        "chaos_redis",
    )
}

/// The reports as a markdown table.
pub fn table(reports: &[Report]) -> String {
    let mut out = String::from(
        "| seed | faults injected | writes acknowledged | acked without identity | \
         written to a non-primary | lost by the portal | lost by the database | \
         longest time to agree | longest unavailability | verdict |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    let mut total: BTreeMap<Kind, usize> = BTreeMap::new();
    for r in reports {
        let faults: usize = r.counts.values().sum();
        let kinds = r
            .counts
            .iter()
            .map(|(k, n)| format!("{n} {}", k.label()))
            .collect::<Vec<_>>()
            .join(", ");
        for (k, n) in &r.counts {
            *total.entry(*k).or_default() += n;
        }
        let v = &r.verdict;
        out.push_str(&format!(
            "| {} | {faults} ({kinds}) | {} | {} | {} | {} | {} (+{} unknown acknowledger) | {} | {} | {} |\n",
            r.seed,
            v.acked,
            v.acked_without_identity,
            v.non_primary.len(),
            v.lost_by_portal.len(),
            v.lost_by_database,
            v.lost_unknown_by_database,
            secs(v.longest_agree),
            secs(v.longest_unavailability.0),
            if r.ok() { "pass" } else { "FAIL" },
        ));
    }
    out
}

/// Seeds from `CHAOS_SEED` (one) or `CHAOS_SEEDS` (comma-separated), else
/// `default`.
pub fn seeds(default: &[u64]) -> Vec<u64> {
    if let Ok(one) = std::env::var("CHAOS_SEED") {
        return vec![one.trim().parse().expect("CHAOS_SEED is a number")];
    }
    match std::env::var("CHAOS_SEEDS") {
        Ok(list) => list
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|s| {
                s.trim()
                    .parse()
                    .expect("CHAOS_SEEDS: numbers, comma-separated")
            })
            .collect(),
        Err(_) => default.to_vec(),
    }
}

/// Whether the portals are each other's peers: yes unless `CHAOS_PEERS=0`.
pub fn peers() -> bool {
    std::env::var("CHAOS_PEERS").map_or(true, |v| v.trim() != "0")
}

/// `name` from the environment as a number, else `default`.
pub fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.trim()
                .parse()
                .unwrap_or_else(|_| panic!("{name} is a number"))
        })
        .unwrap_or(default)
}
