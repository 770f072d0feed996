//! The Redis-with-Sentinel target: three `redis-server` members, three real
//! `redis-sentinel` processes (quorum 2, `down-after-milliseconds` 1000) and
//! two portals, peers of each other, whose cluster has `dcs: sentinel:`
//! (view rule 6: Sentinel names the leader, the probe confirms it).
//!
//! Here Sentinel makes every promotion, not the harness, so the truth is
//! observed rather than kept: an observer polls every member's `ROLE` (and,
//! per connection, its `run_id`) and every Sentinel's `config-epoch` and
//! `get-master-addr-by-name` every 20 ms, and records each change with its
//! time. After the run, [`derive_reigns`] turns those observations into the
//! reigns the checker judges writes against:
//!
//! - a server process becomes the real primary when a Sentinel names its
//!   member with a config epoch newer than the current reign's (a failover
//!   Sentinel's majority authorised) while the process's own `ROLE` says
//!   master; its reign starts at the first observation of that process as a
//!   master after it was seen as a replica (the promotion, 20 ms resolution),
//!   or at the naming for a process that was a master from its start (an
//!   empty restarted master Sentinel later names never reigned before);
//! - the reign ends when a quorum (2 of 3) of Sentinels names a newer
//!   epoch (the brief's "Sentinel's quorum names it and it says master":
//!   before that, a portal that follows its Sentinel may rightly still write
//!   to it), at the `kill -9` of the process (the harness records it), or
//!   when the process is first seen as a replica, whichever comes first. A
//!   stale Sentinel naming an old member with an old epoch changes nothing.
//!   Writes the old primary acknowledged between its successor's promotion
//!   and that quorum are allowed but counted apart ([`Handover`]): the
//!   failover drops them.
//!
//! So an old primary that was SIGSTOPped through a failover and wakes up
//! still a master is *not* the real primary any more: a write it
//! acknowledges once a quorum of Sentinels names the new one is a
//! violation. A write whose round trip started inside its reign passes (the
//! checker's overlap rule) and, when the failover drops it, is lost by the
//! database (asynchronous replication).
//!
//! Portal 1 reaches the members through relays (path faults) and the
//! Sentinels through small RESP translators ([`SentinelNat`]) that rewrite a
//! member's address in `get-master-addr-by-name` replies to its relay's, as
//! NAT would: the portal recognises the member Sentinel names by address.

use std::collections::{BTreeMap, HashMap};
use std::fs::OpenOptions;
use std::io::{self, Read, Write as _};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::checker::{secs, short, Agreement, History, Micros, Outcome, Reign};
use super::nemesis::{
    agree, lock, path_fault, restart_portal, Heals, Kind, Resource, Step, Target, World,
};
use super::redis::{info_field, signal_pid, Member};
use super::relay::Relay;
use super::{
    log_dir_for, on_thread, read_back, sampler, start_portals, writer, Clock, Log, Report, Settings,
};
use crate::common::{
    default_client_config, encode, free_port, parse, temp_certs, PortalConfig, Reply,
};

/// The name Sentinel monitors the cluster under.
pub const MASTER: &str = "chaosmaster";
/// `sentinel down-after-milliseconds`.
pub const DOWN_AFTER_MS: u64 = 1000;
/// `sentinel failover-timeout`: also twice this between two failovers.
pub const FAILOVER_TIMEOUT_MS: u64 = 3000;
/// How often the observer polls each member and each Sentinel.
const POLL: Duration = Duration::from_millis(20);
/// A poll's connect and reply limit.
const POLL_LIMIT: Duration = Duration::from_millis(300);
/// A Sentinel names a member only after it saw it a master; the observer
/// may see that a little later: how far after a naming to look.
const LOOKAHEAD: Micros = 2_000_000;

// ---- redis-sentinel processes ----------------------------------------------------

/// One `redis-sentinel` on a loopback port with its own writable config file.
pub struct SentinelProc {
    pub name: String,
    pub port: u16,
    dir: TempDir,
    child: Option<Child>,
    pub starts: u32,
}

impl SentinelProc {
    /// Writes the configuration (monitoring the master on `primary`) and
    /// starts the process.
    pub fn start(name: &str, primary: u16) -> io::Result<SentinelProc> {
        let dir = TempDir::new()?;
        let port = free_port();
        let config = format!(
            "port {port}\nbind 127.0.0.1\ndaemonize no\nprotected-mode no\ndir {dir}\n\
             sentinel resolve-hostnames no\n\
             sentinel monitor {MASTER} 127.0.0.1 {primary} 2\n\
             sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}\n\
             sentinel failover-timeout {MASTER} {FAILOVER_TIMEOUT_MS}\n",
            dir = dir.path().display()
        );
        std::fs::write(dir.path().join("sentinel.conf"), config)?;
        let mut sentinel = SentinelProc {
            name: name.to_string(),
            port,
            dir,
            child: None,
            starts: 0,
        };
        sentinel.spawn()?;
        Ok(sentinel)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("sentinel.log")
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Starts the process from its config file (which Sentinel rewrites with
    /// what it learned) and waits for PING.
    fn spawn(&mut self) -> io::Result<()> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let child = Command::new("redis-sentinel")
            .arg(self.dir.path().join("sentinel.conf"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        self.starts += 1;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Reply::Simple(pong)) =
                crate::common::query(self.port, &["PING"], Duration::from_millis(500))
            {
                if pong == "PONG" {
                    return Ok(());
                }
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Err(io::Error::other(format!(
                    "redis-sentinel {} exited with {status}:\n{}",
                    self.port,
                    self.log_tail(20)
                )));
            }
            if Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "redis-sentinel {} did not answer PING within 10 s",
                    self.port
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn restart(&mut self) -> io::Result<()> {
        self.kill9();
        self.spawn()
    }

    /// `SENTINEL master NAME` as field -> value.
    pub fn master_field(&self, field: &str) -> Option<String> {
        let reply = crate::common::query(
            self.port,
            &["SENTINEL", "master", MASTER],
            Duration::from_secs(2),
        )
        .ok()?;
        flat_field(&reply, field)
    }
}

impl Drop for SentinelProc {
    fn drop(&mut self) {
        if let Some(pid) = self.pid() {
            let _ = signal_pid(pid, "CONT");
        }
        self.kill9();
    }
}

/// A field of a flat `[field, value, ...]` array reply.
fn flat_field(reply: &Reply, field: &str) -> Option<String> {
    let Reply::Array(Some(items)) = reply else {
        return None;
    };
    items
        .chunks_exact(2)
        .find(|pair| pair[0].text() == field)
        .map(|pair| pair[1].text())
}

// ---- the Sentinel address translator (portal 1) ----------------------------------

/// A RESP proxy from `127.0.0.1:port` to one Sentinel that rewrites a
/// `[ip, port]` reply naming a member (`get-master-addr-by-name`) to the
/// address of that member's relay, as NAT would: portal 1 knows the members
/// only by their relays' addresses. Everything else passes unchanged.
pub struct SentinelNat {
    pub port: u16,
    stop: CancellationToken,
}

impl SentinelNat {
    pub async fn start(target: u16, relay_of: Arc<HashMap<u16, u16>>) -> SentinelNat {
        let port = free_port();
        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind the Sentinel translator");
        let stop = CancellationToken::new();
        let token = stop.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    _ = token.cancelled() => return,
                };
                let Ok((client, _)) = accepted else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let (relay_of, token) = (relay_of.clone(), token.clone());
                tokio::spawn(async move {
                    let _ = translate_one(client, target, relay_of, token).await;
                });
            }
        });
        SentinelNat { port, stop }
    }
}

impl Drop for SentinelNat {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn translate_one(
    client: TcpStream,
    target: u16,
    relay_of: Arc<HashMap<u16, u16>>,
    stop: CancellationToken,
) -> io::Result<()> {
    client.set_nodelay(true)?;
    let server = tokio::time::timeout(
        Duration::from_secs(2),
        TcpStream::connect(("127.0.0.1", target)),
    )
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "translator connect"))??;
    server.set_nodelay(true)?;
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let up = tokio::io::copy(&mut cr, &mut sw);
    let down = async {
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 16 * 1024];
        let mut raw = false;
        loop {
            let n = sr.read(&mut chunk).await?;
            if n == 0 {
                return Ok::<_, io::Error>(());
            }
            if raw {
                cw.write_all(&chunk[..n]).await?;
                continue;
            }
            buf.extend_from_slice(&chunk[..n]);
            loop {
                match parse(&buf) {
                    Ok(Some((reply, used))) => {
                        let out = encode_reply(&translate(reply, &relay_of));
                        cw.write_all(&out).await?;
                        buf.drain(..used);
                    }
                    Ok(None) => break,
                    Err(_) => {
                        // Not RESP2 as expected: pass everything on as it is.
                        cw.write_all(&buf).await?;
                        buf.clear();
                        raw = true;
                        break;
                    }
                }
            }
        }
    };
    tokio::select! {
        _ = up => {}
        _ = down => {}
        _ = stop.cancelled() => {}
    }
    Ok(())
}

/// `[ip, port]` naming a member becomes `[ip, relay port]`.
fn translate(reply: Reply, relay_of: &HashMap<u16, u16>) -> Reply {
    if let Reply::Array(Some(items)) = &reply {
        if let [Reply::Bulk(Some(ip)), Reply::Bulk(Some(port))] = items.as_slice() {
            let port: Option<u16> = std::str::from_utf8(port).ok().and_then(|p| p.parse().ok());
            if let Some(relay) = port.and_then(|p| relay_of.get(&p)) {
                return Reply::Array(Some(vec![
                    Reply::Bulk(Some(ip.clone())),
                    Reply::Bulk(Some(relay.to_string().into_bytes())),
                ]));
            }
        }
    }
    reply
}

/// A reply as RESP2 bytes.
fn encode_reply(reply: &Reply) -> Vec<u8> {
    let mut out = Vec::new();
    fn put(out: &mut Vec<u8>, reply: &Reply) {
        match reply {
            Reply::Simple(s) => out.extend_from_slice(format!("+{s}\r\n").as_bytes()),
            Reply::Error(e) => out.extend_from_slice(format!("-{e}\r\n").as_bytes()),
            Reply::Integer(i) => out.extend_from_slice(format!(":{i}\r\n").as_bytes()),
            Reply::Bulk(None) => out.extend_from_slice(b"$-1\r\n"),
            Reply::Bulk(Some(b)) => {
                out.extend_from_slice(format!("${}\r\n", b.len()).as_bytes());
                out.extend_from_slice(b);
                out.extend_from_slice(b"\r\n");
            }
            Reply::Array(None) => out.extend_from_slice(b"*-1\r\n"),
            Reply::Array(Some(items)) => {
                out.extend_from_slice(format!("*{}\r\n", items.len()).as_bytes());
                for item in items {
                    put(out, item);
                }
            }
        }
    }
    put(&mut out, reply);
    out
}

// ---- the observer ---------------------------------------------------------------

/// What one poll of a member's `ROLE` said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    Master,
    /// A replica of the member on port `of`; `up` when its link is.
    Replica {
        of: u16,
        up: bool,
    },
    /// No answer (stopped, killed, restarting).
    Silent,
}

/// A member's `ROLE` as observed at `at` (the reply's arrival): recorded
/// when it differs from the one before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleObs {
    pub member: usize,
    /// The process that answered (empty when `Silent`).
    pub run_id: String,
    pub at: Micros,
    pub seen: Seen,
}

/// Whom a Sentinel named at `at`: recorded when it differs from the one
/// before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameObs {
    pub sentinel: usize,
    pub at: Micros,
    /// The member on the port Sentinel named (`None`: not a member's port).
    pub member: Option<usize>,
    pub port: u16,
    /// `config-epoch`, read just before the name (so never newer than it).
    pub epoch: u64,
}

/// Polls every member and every Sentinel on its own thread until stopped.
pub struct Observer {
    clock: Clock,
    log: Log,
    names: Vec<String>,
    ports: Vec<u16>,
    /// Changes only, in the order observed.
    pub roles: Mutex<Vec<RoleObs>>,
    pub named: Mutex<Vec<NameObs>>,
    /// The latest observation of each member / Sentinel (its `at` is the
    /// last poll's, even when nothing changed).
    latest_role: Mutex<Vec<Option<RoleObs>>>,
    latest_named: Mutex<Vec<Option<NameObs>>>,
    stop: AtomicBool,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// A blocking RESP connection with pipelining.
struct Conn {
    tcp: std::net::TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    fn open(port: u16) -> io::Result<Conn> {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let tcp = std::net::TcpStream::connect_timeout(&addr, POLL_LIMIT)?;
        tcp.set_read_timeout(Some(POLL_LIMIT))?;
        tcp.set_write_timeout(Some(POLL_LIMIT))?;
        tcp.set_nodelay(true)?;
        Ok(Conn {
            tcp,
            buf: Vec::new(),
        })
    }

    fn pipeline(&mut self, commands: &[&[&str]]) -> io::Result<Vec<Reply>> {
        let mut bytes = Vec::new();
        for c in commands {
            bytes.extend(encode(c));
        }
        self.tcp.write_all(&bytes)?;
        let mut replies = Vec::new();
        while replies.len() < commands.len() {
            match parse(&self.buf).map_err(io::Error::other)? {
                Some((reply, used)) => {
                    self.buf.drain(..used);
                    replies.push(reply);
                }
                None => {
                    let mut chunk = [0u8; 8192];
                    let n = self.tcp.read(&mut chunk)?;
                    if n == 0 {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                    self.buf.extend_from_slice(&chunk[..n]);
                }
            }
        }
        Ok(replies)
    }
}

/// A `ROLE` reply as [`Seen`].
fn seen_of(role: &Reply) -> Option<Seen> {
    let Reply::Array(Some(items)) = role else {
        return None;
    };
    match items.first()?.text().as_str() {
        "master" => Some(Seen::Master),
        "slave" => {
            let of = match items.get(2)? {
                Reply::Integer(p) => u16::try_from(*p).ok()?,
                other => other.text().parse().ok()?,
            };
            let up = items.get(3).is_some_and(|s| s.text() == "connected");
            Some(Seen::Replica { of, up })
        }
        _ => None,
    }
}

impl Observer {
    pub fn start(
        clock: Clock,
        log: Log,
        names: Vec<String>,
        ports: Vec<u16>,
        sentinel_ports: Vec<u16>,
    ) -> Arc<Observer> {
        let observer = Arc::new(Observer {
            clock,
            log,
            latest_role: Mutex::new(vec![None; ports.len()]),
            latest_named: Mutex::new(vec![None; sentinel_ports.len()]),
            names,
            ports: ports.clone(),
            roles: Mutex::default(),
            named: Mutex::default(),
            stop: AtomicBool::new(false),
            threads: Mutex::default(),
        });
        let mut threads = Vec::new();
        for (m, &port) in ports.iter().enumerate() {
            let o = observer.clone();
            threads.push(std::thread::spawn(move || o.watch_member(m, port)));
        }
        for (s, &port) in sentinel_ports.iter().enumerate() {
            let o = observer.clone();
            threads.push(std::thread::spawn(move || o.watch_sentinel(s, port)));
        }
        *lock(&observer.threads) = threads;
        observer
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in lock(&self.threads).drain(..) {
            let _ = t.join();
        }
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn watch_member(&self, m: usize, port: u16) {
        while !self.stopped() {
            let session = Conn::open(port).and_then(|mut conn| {
                let info = conn.pipeline(&[&["INFO", "server"]])?;
                let run_id = info_field(&info[0], "run_id")
                    .ok_or_else(|| io::Error::other("INFO server without run_id"))?;
                Ok((conn, run_id))
            });
            let Ok((mut conn, run_id)) = session else {
                self.record_role(m, String::new(), Seen::Silent);
                std::thread::sleep(POLL);
                continue;
            };
            while !self.stopped() {
                let seen = conn
                    .pipeline(&[&["ROLE"]])
                    .ok()
                    .and_then(|r| seen_of(&r[0]));
                let Some(seen) = seen else {
                    self.record_role(m, String::new(), Seen::Silent);
                    break;
                };
                self.record_role(m, run_id.clone(), seen);
                std::thread::sleep(POLL);
            }
        }
    }

    fn watch_sentinel(&self, s: usize, port: u16) {
        while !self.stopped() {
            let Ok(mut conn) = Conn::open(port) else {
                std::thread::sleep(POLL);
                continue;
            };
            while !self.stopped() {
                // The epoch first: Sentinel changes the name and the epoch in
                // one step, so the name read after it is never older.
                let replies = conn.pipeline(&[
                    &["SENTINEL", "master", MASTER],
                    &["SENTINEL", "get-master-addr-by-name", MASTER],
                ]);
                let Ok(replies) = replies else { break };
                let epoch = flat_field(&replies[0], "config-epoch").and_then(|e| e.parse().ok());
                let named = match &replies[1] {
                    Reply::Array(Some(items)) if items.len() == 2 => items[1].text().parse().ok(),
                    _ => None,
                };
                if let (Some(epoch), Some(named)) = (epoch, named) {
                    self.record_named(s, named, epoch);
                }
                std::thread::sleep(POLL);
            }
        }
    }

    fn record_role(&self, member: usize, run_id: String, seen: Seen) {
        let obs = RoleObs {
            member,
            run_id,
            at: self.clock.now(),
            seen,
        };
        let changed = {
            let mut latest = lock(&self.latest_role);
            let changed = latest[member]
                .as_ref()
                .is_none_or(|l| l.run_id != obs.run_id || l.seen != obs.seen);
            latest[member] = Some(obs.clone());
            changed
        };
        if changed {
            let what = match &obs.seen {
                Seen::Master => "master".to_string(),
                Seen::Replica { of, up } => format!(
                    "replica of {} (link {})",
                    self.name_of_port(*of),
                    if *up { "up" } else { "down" }
                ),
                Seen::Silent => "silent".to_string(),
            };
            let id = if obs.run_id.is_empty() {
                String::new()
            } else {
                format!(" (run_id {})", short(&obs.run_id))
            };
            self.log.line(
                &self.clock,
                &format!("observed: {}{id} ROLE {what}", self.names[member]),
            );
            lock(&self.roles).push(obs);
        }
    }

    fn record_named(&self, sentinel: usize, port: u16, epoch: u64) {
        let obs = NameObs {
            sentinel,
            at: self.clock.now(),
            member: self.ports.iter().position(|&p| p == port),
            port,
            epoch,
        };
        let changed = {
            let mut latest = lock(&self.latest_named);
            let changed = latest[sentinel]
                .as_ref()
                .is_none_or(|l| l.port != port || l.epoch != epoch);
            latest[sentinel] = Some(obs.clone());
            changed
        };
        if changed {
            self.log.line(
                &self.clock,
                &format!(
                    "observed: Sentinel {} names {} (config epoch {epoch})",
                    sentinel + 1,
                    self.name_of_port(port)
                ),
            );
            lock(&self.named).push(obs);
        }
    }

    fn name_of_port(&self, port: u16) -> String {
        self.ports
            .iter()
            .position(|&p| p == port)
            .map(|m| self.names[m].clone())
            .unwrap_or_else(|| format!("port {port}"))
    }

    /// The member the freshest, newest naming names, with its epoch.
    pub fn named_now(&self) -> Option<(usize, u64)> {
        let now = self.clock.now();
        lock(&self.latest_named)
            .iter()
            .flatten()
            .filter(|n| now.saturating_sub(n.at) < 1_000_000)
            .filter_map(|n| n.member.map(|m| (m, n.epoch)))
            .max_by_key(|&(_, e)| e)
    }

    /// Whether a Sentinel names a member other than `old` with an epoch
    /// newer than `epoch`, that member's `ROLE` saying master: a failover.
    pub fn failed_over(&self, old: usize, epoch: u64) -> Option<(usize, u64)> {
        let (m, e) = self.named_now()?;
        let master = lock(&self.latest_role)[m]
            .as_ref()
            .is_some_and(|r| r.seen == Seen::Master);
        (m != old && e > epoch && master).then_some((m, e))
    }

    /// `Ok(primary)` when every Sentinel names the same member with the same
    /// epoch, that member says master and every other member is its replica
    /// with the link up, all seen within the last second; else what is not.
    pub fn settled(&self) -> Result<usize, String> {
        let now = self.clock.now();
        let fresh = |at: Micros| now.saturating_sub(at) < 1_000_000;
        let named = lock(&self.latest_named).clone();
        let mut primary = None;
        for (s, n) in named.iter().enumerate() {
            let Some(n) = n.as_ref().filter(|n| fresh(n.at)) else {
                return Err(format!("Sentinel {} silent", s + 1));
            };
            match (primary, n.member) {
                (_, None) => return Err(format!("Sentinel {} names port {}", s + 1, n.port)),
                (None, Some(m)) => primary = Some((m, n.epoch)),
                (Some(p), Some(m)) if p != (m, n.epoch) => {
                    return Err(format!(
                        "the Sentinels disagree: {p:?} and {:?}",
                        (m, n.epoch)
                    ))
                }
                _ => {}
            }
        }
        let (p, _) = primary.ok_or("no Sentinel")?;
        let roles = lock(&self.latest_role).clone();
        for (m, r) in roles.iter().enumerate() {
            let Some(r) = r.as_ref().filter(|r| fresh(r.at)) else {
                return Err(format!("{} not seen", self.names[m]));
            };
            let want = if m == p {
                Seen::Master
            } else {
                Seen::Replica {
                    of: self.ports[p],
                    up: true,
                }
            };
            if r.seen != want {
                return Err(format!(
                    "{} is {:?}, not {want:?} (Sentinel names {})",
                    self.names[m], r.seen, self.names[p]
                ));
            }
        }
        Ok(p)
    }

    /// The run id of member `m`'s process as last seen.
    pub fn run_id(&self, m: usize) -> Option<String> {
        lock(&self.latest_role)[m]
            .as_ref()
            .map(|r| r.run_id.clone())
            .filter(|r| !r.is_empty())
    }
}

// ---- the truth --------------------------------------------------------------------

/// The reigns (see the module doc) from the observations: `roles` and
/// `named` as recorded (changes), `kills` the harness's `kill -9`s (run id,
/// when it returned), `first` the first primary's reign (from the start) and
/// `first_epoch` the config epoch then. Also returns notes on namings that
/// could not be tied to a process, and each failover's window (see
/// [`Handover`]).
pub fn derive_reigns(
    names: &[String],
    roles: &[RoleObs],
    named: &[NameObs],
    kills: &[(String, Micros)],
    first: Reign,
    first_epoch: u64,
) -> (Vec<Reign>, Vec<String>, Vec<Handover>) {
    let mut notes = Vec::new();
    let mut handovers = Vec::new();
    let mut truth = vec![first];
    let mut epoch = first_epoch;
    let mut named: Vec<&NameObs> = named.iter().collect();
    named.sort_by_key(|n| n.at);
    for n in &named {
        if n.epoch <= epoch {
            continue;
        }
        let Some(m) = n.member else {
            notes.push(format!(
                "Sentinel {} named port {} (epoch {}) at {}: not a member",
                n.sentinel + 1,
                n.port,
                n.epoch,
                secs(n.at)
            ));
            continue;
        };
        let Some((run_id, from)) = promoted_process(roles, m, n.at) else {
            notes.push(format!(
                "Sentinel {} named {} (epoch {}) at {}, but no process of {} was seen a master then",
                n.sentinel + 1,
                names[m],
                n.epoch,
                secs(n.at),
                names[m]
            ));
            continue;
        };
        let old_epoch = epoch;
        epoch = n.epoch;
        let last = truth.last_mut().expect("the first reign");
        if last.run_id == run_id {
            continue;
        }
        // The old primary reigns until a quorum of Sentinels names a newer
        // epoch (or it is killed or demoted): until then a portal that
        // follows Sentinel may rightly still write to it.
        let quorum = quorum_moved_on(&named, old_epoch, n.at);
        end(last, quorum.unwrap_or(Micros::MAX).max(from));
        handovers.push(Handover {
            old_run_id: last.run_id.clone(),
            promoted: from,
            first_named: n.at,
            quorum,
        });
        truth.push(Reign {
            run_id,
            member: names[m].clone(),
            from,
            to: None,
            killed: false,
        });
    }
    for r in &mut truth {
        for (run_id, at) in kills {
            if *run_id == r.run_id && *at >= r.from {
                end(r, *at);
            }
        }
        let demoted = roles
            .iter()
            .filter(|o| {
                o.run_id == r.run_id && o.at > r.from && matches!(o.seen, Seen::Replica { .. })
            })
            .map(|o| o.at)
            .min();
        if let Some(at) = demoted {
            end(r, at);
        }
        if r.to == Some(Micros::MAX) {
            r.to = None;
        }
    }
    (truth, notes, handovers)
}

/// One failover as observed: the old primary's process, when its successor
/// was promoted (its first observation as a master), when a Sentinel first
/// named it, and when a quorum (2 of 3) of Sentinels first named an epoch
/// newer than the old one. Writes the old primary acknowledged between the
/// promotion and the quorum are not violations (a portal following Sentinel
/// cannot know better before its Sentinel answers), but the failover drops
/// them: they are counted apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handover {
    pub old_run_id: String,
    pub promoted: Micros,
    pub first_named: Micros,
    pub quorum: Option<Micros>,
}

/// The first time from `since` on when at least 2 Sentinels' latest namings
/// carry an epoch newer than `old`.
fn quorum_moved_on(named: &[&NameObs], old: u64, since: Micros) -> Option<Micros> {
    let mut latest: HashMap<usize, u64> = HashMap::new();
    for n in named {
        latest.insert(n.sentinel, n.epoch);
        if n.at >= since && latest.values().filter(|&&e| e > old).count() >= 2 {
            return Some(n.at);
        }
    }
    None
}

/// Ends a reign at `at` (or earlier if it already ended): a kill, a
/// demotion or another's promotion, each of which may drop the writes it had
/// not replicated.
fn end(r: &mut Reign, at: Micros) {
    let at = at.max(r.from);
    if at == Micros::MAX {
        return;
    }
    r.to = Some(r.to.map_or(at, |t| t.min(at)));
    r.killed = true;
}

/// The process of member `m` Sentinel named at `at`, and when its reign
/// starts: its last observation at or before `at` if a master, else its
/// first observation as a master within `LOOKAHEAD` after. Its reign starts
/// at the first observation of that stretch as a master when it was seen a
/// replica just before (a promotion), else at the naming.
fn promoted_process(roles: &[RoleObs], m: usize, at: Micros) -> Option<(String, Micros)> {
    let mut seen: Vec<&RoleObs> = roles
        .iter()
        .filter(|o| o.member == m && o.seen != Seen::Silent)
        .collect();
    seen.sort_by_key(|o| o.at);
    let idx = match seen.iter().rposition(|o| o.at <= at) {
        Some(i) if seen[i].seen == Seen::Master => i,
        _ => seen
            .iter()
            .position(|o| o.at > at && o.at <= at + LOOKAHEAD && o.seen == Seen::Master)?,
    };
    let run_id = &seen[idx].run_id;
    let mut start = idx;
    while start > 0 && seen[start - 1].run_id == *run_id && seen[start - 1].seen == Seen::Master {
        start -= 1;
    }
    let promoted = start > 0
        && seen[start - 1].run_id == *run_id
        && matches!(seen[start - 1].seen, Seen::Replica { .. });
    let from = if promoted {
        seen[start].at
    } else {
        seen[start].at.max(at)
    };
    Some((run_id.clone(), from))
}

// ---- the schedule -----------------------------------------------------------------

fn millis(rng: &mut StdRng, from: u64, to: u64) -> Duration {
    Duration::from_millis(rng.random_range(from..=to))
}

/// The kinds a Sentinel schedule draws.
pub const SENTINEL_KINDS: [Kind; 6] = [
    Kind::SentinelKill,
    Kind::FrozenPrimary,
    Kind::Stall,
    Kind::DcsBlip,
    Kind::PortalRestart,
    Kind::Path,
];

/// The Sentinel schedule for `seed`: `faults` steps against three members,
/// three Sentinels and two portals, from the RNG only. Right after a
/// failover (the old primary is then back as a master Sentinel does not
/// name), the new primary is often stalled or cut off from portal 1, a
/// portal restarts, or Sentinels blip.
pub fn sentinel_schedule(seed: u64, faults: usize) -> Vec<Step> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut steps: Vec<Step> = Vec::with_capacity(faults);
    const WEIGHTS: [(Kind, u32); 6] = [
        (Kind::SentinelKill, 2),
        (Kind::FrozenPrimary, 3),
        (Kind::Stall, 2),
        (Kind::DcsBlip, 2),
        (Kind::PortalRestart, 1),
        (Kind::Path, 2),
    ];
    let total: u32 = WEIGHTS.iter().map(|(_, w)| w).sum();
    while steps.len() < faults {
        let after_failover = steps.last().is_some_and(|s| s.kind.topology());
        let kind = if after_failover && rng.random_bool(0.7) {
            match rng.random_range(0..5) {
                0 => Kind::Stall,
                1 | 2 => Kind::Path,
                3 => Kind::PortalRestart,
                _ => Kind::DcsBlip,
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
            Kind::DcsBlip => Target::Sentinels {
                first: rng.random_range(0..3),
                count: if rng.random_bool(0.4) { 2 } else { 1 },
            },
            Kind::SentinelKill | Kind::FrozenPrimary => Target::Primary,
            _ if after_failover || rng.random_bool(0.4) => Target::Primary,
            _ => Target::Replica(rng.random_range(0..2)),
        };
        let duration = match kind {
            // From the failover to the restart / the SIGCONT.
            Kind::SentinelKill | Kind::FrozenPrimary => millis(&mut rng, 0, 2000),
            // Below down-after-milliseconds: slow, not failed over.
            Kind::Stall => millis(&mut rng, 200, 800),
            Kind::DcsBlip => millis(&mut rng, 500, 4000),
            Kind::PortalRestart => millis(&mut rng, 0, 1000),
            _ => millis(&mut rng, 200, 3000),
        };
        steps.push(Step {
            kind,
            target,
            duration,
            down: Duration::ZERO,
            promote: 0,
            cut: match kind {
                Kind::Path => !after_failover && rng.random_bool(0.5),
                Kind::DcsBlip => rng.random_bool(0.5),
                _ => false,
            },
            keep_rdb: false,
            pause: millis(&mut rng, 200, 1500),
        });
    }
    steps
}

// ---- the nemesis ------------------------------------------------------------------

/// Carries out a Sentinel schedule. Runs on its own thread.
pub struct SentinelNemesis {
    pub world: Arc<World<Member>>,
    pub sentinels: Arc<Vec<Mutex<SentinelProc>>>,
    pub observer: Arc<Observer>,
    /// The harness's `kill -9`s of members: run id, when it returned.
    pub kills: Arc<Mutex<Vec<(String, Micros)>>>,
    heals: Heals,
    pub counts: BTreeMap<Kind, usize>,
    pub agreements: Vec<Agreement>,
    /// The primary by the last observation (targets resolve against it).
    pub primary: usize,
}

impl SentinelNemesis {
    fn log(&self, what: &str) {
        self.world.log.line(&self.world.clock, what);
    }

    pub fn run(&mut self, steps: &[Step]) {
        for (i, step) in steps.iter().enumerate() {
            self.log(&format!("step {}/{}: {step}", i + 1, steps.len()));
            self.step(step);
            std::thread::sleep(step.pause);
        }
        self.heals.join(&self.world, |_| true);
        self.settle();
        self.agree();
    }

    /// Waits (up to 60 s) until Sentinel and the members have settled: one
    /// master everybody names and follows (Sentinel makes a restarted or
    /// woken old primary a replica some 8 s after it is back).
    fn settle(&mut self) {
        let start = Instant::now();
        loop {
            let last = match self.observer.settled() {
                Ok(p) => {
                    self.primary = p;
                    self.log(&format!(
                        "settled after {:.1}s: Sentinel names {}, every member follows it",
                        start.elapsed().as_secs_f64(),
                        self.world.names[p]
                    ));
                    return;
                }
                Err(why) => why,
            };
            if start.elapsed() > Duration::from_secs(60) {
                self.world
                    .error(format!("the cluster did not settle within 60 s: {last}"));
                if let Some((p, _)) = self.observer.named_now() {
                    self.primary = p;
                }
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn agree(&mut self) {
        let real = self.world.names[self.primary].clone();
        let a = agree(&self.world, &real, Duration::from_secs(10));
        self.agreements.push(a);
    }

    fn refresh_primary(&mut self) {
        if let Some((p, _)) = self.observer.named_now() {
            self.primary = p;
        }
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

    /// Waits up to 30 s for Sentinel to name a member other than `old` with
    /// an epoch newer than `epoch`.
    fn wait_failover(&mut self, old: usize, epoch: u64) -> Option<usize> {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            if let Some((m, e)) = self.observer.failed_over(old, epoch) {
                self.log(&format!(
                    "Sentinel failed over to {} (config epoch {e}) {:.1}s after the fault",
                    self.world.names[m],
                    start.elapsed().as_secs_f64()
                ));
                self.primary = m;
                return Some(m);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.world.error(format!(
            "Sentinel did not fail over from {} within 30 s",
            self.world.names[old]
        ));
        None
    }

    fn step(&mut self, step: &Step) {
        *self.counts.entry(step.kind).or_default() += 1;
        if step.kind.topology() {
            self.heals.join(&self.world, |_| true);
            self.settle();
            self.agree();
        } else {
            self.refresh_primary();
        }
        match step.kind {
            Kind::SentinelKill => {
                let old = self.primary;
                let epoch = self.observer.named_now().map_or(0, |(_, e)| e);
                let world = self.world.clone();
                let run_id = world.member(old).run_id.clone();
                world.member(old).kill9();
                lock(&self.kills).push((run_id, world.clock.now()));
                world.note_process(old, "killed (kill -9)");
                self.log(&format!("kill -9 {} (the primary)", world.names[old]));
                self.wait_failover(old, epoch);
                let wait = step.duration;
                self.heals.spawn(
                    format!("restart of {}", world.names[old]),
                    vec![Resource::Member(old)],
                    move || {
                        std::thread::sleep(wait);
                        let name = world.names[old].clone();
                        let restarted = world.member(old).restart(None, true);
                        match restarted {
                            Ok(()) => {
                                world.note_process(
                                    old,
                                    "restarted empty, as a master (until Sentinel makes it a replica)",
                                );
                                world.log.line(
                                    &world.clock,
                                    &format!(
                                        "{name} restarted empty, as a master: run_id {} \
                                         (Sentinel will make it a replica)",
                                        short(&world.member(old).run_id)
                                    ),
                                );
                            }
                            Err(err) => world.error(format!("restart of {name}: {err}")),
                        }
                    },
                );
            }
            Kind::FrozenPrimary => {
                let old = self.primary;
                let epoch = self.observer.named_now().map_or(0, |(_, e)| e);
                let world = self.world.clone();
                let Some(pid) = world.member(old).pid() else {
                    self.log("the primary has no process: skipped");
                    return;
                };
                if let Err(err) = signal_pid(pid, "STOP") {
                    world.error(format!("SIGSTOP {}: {err}", world.names[old]));
                    return;
                }
                self.log(&format!(
                    "SIGSTOP {} (the primary) until Sentinel fails over",
                    world.names[old]
                ));
                let new = self.wait_failover(old, epoch);
                let wait = step.duration;
                self.heals.spawn(
                    format!("SIGCONT of {}", world.names[old]),
                    vec![Resource::Member(old)],
                    move || {
                        std::thread::sleep(wait);
                        if let Err(err) = signal_pid(pid, "CONT") {
                            world.error(format!("SIGCONT {}: {err}", world.names[old]));
                        }
                        world.note_process(old, "woken up (SIGCONT) after a failover");
                        world.log.line(
                            &world.clock,
                            &format!(
                                "SIGCONT {}: it wakes up a master while Sentinel names {}",
                                world.names[old],
                                new.map_or("nobody new".into(), |n| world.names[n].clone())
                            ),
                        );
                    },
                );
            }
            Kind::Stall => {
                let m = self.member_of(step.target);
                self.heals.join(&self.world, |r| r == Resource::Member(m));
                let Some(pid) = self.world.member(m).pid() else {
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
                self.heals.spawn(
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
            Kind::DcsBlip => {
                let Target::Sentinels { first, count } = step.target else {
                    unreachable!("a DCS blip targets Sentinels")
                };
                let n = self.sentinels.len();
                let which: Vec<usize> = (0..count).map(|k| (first + k) % n).collect();
                self.heals.join(&self.world, |r| {
                    which.iter().any(|&s| r == Resource::Sentinel(s))
                });
                let kill = step.cut;
                let mut pids = Vec::new();
                for &s in &which {
                    let mut sentinel = lock(&self.sentinels[s]);
                    if kill {
                        sentinel.kill9();
                    } else if let Some(pid) = sentinel.pid() {
                        let _ = signal_pid(pid, "STOP");
                        pids.push(pid);
                    }
                }
                let shown = which
                    .iter()
                    .map(|s| (s + 1).to_string())
                    .collect::<Vec<_>>()
                    .join(" and ");
                self.log(&format!(
                    "Sentinel {shown}: {}",
                    if kill { "kill -9" } else { "SIGSTOP" }
                ));
                let (world, sentinels, d) =
                    (self.world.clone(), self.sentinels.clone(), step.duration);
                self.heals.spawn(
                    format!("Sentinel {shown}"),
                    which.iter().map(|&s| Resource::Sentinel(s)).collect(),
                    move || {
                        std::thread::sleep(d);
                        if kill {
                            for &s in &which {
                                let restarted = lock(&sentinels[s]).restart();
                                if let Err(err) = restarted {
                                    world.error(format!("restart of Sentinel {}: {err}", s + 1));
                                }
                            }
                        } else {
                            for &pid in &pids {
                                let _ = signal_pid(pid, "CONT");
                            }
                        }
                        world.log.line(
                            &world.clock,
                            &format!(
                                "Sentinel {shown}: {}",
                                if kill { "started again" } else { "SIGCONT" }
                            ),
                        );
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
            Kind::KillPromote
            | Kind::RogueMaster
            | Kind::DebugSleep
            | Kind::OldPrimary
            | Kind::Patroni(_) => {
                unreachable!("not a Sentinel fault: {:?}", step.kind)
            }
        }
    }
}

// ---- the run ----------------------------------------------------------------------

/// The `dcs: sentinel:` block for a cluster, inserted before `members:`.
fn with_sentinel_dcs(yaml: &str, addresses: &[u16]) -> String {
    let list = addresses
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(", ");
    let dcs = format!(
        "    dcs:\n      sentinel:\n        addresses: [{list}]\n        master_name: {MASTER}\n        \
         timeout: 1s\n    members:\n"
    );
    let out = yaml.replacen("    members:\n", &dcs, 1);
    assert!(out.contains("sentinel:"), "dcs block not inserted:\n{yaml}");
    out
}

/// One chaos run against Redis with Sentinel: members `a` (the first
/// primary), `b`, `c`; Sentinels 1 to 3; portal 1 through relays (and
/// Sentinel translators), portal 2 direct; writers through both; the
/// schedule for `settings.seed`; then the truth from the observations, and
/// the checks.
pub async fn run_sentinel(settings: Settings) -> Report {
    let started = Instant::now();
    let clock = Clock(started);
    let seed = settings.seed;
    let log = Log {
        seed,
        lines: Arc::default(),
    };
    let steps = sentinel_schedule(seed, settings.faults);
    log.line(
        &clock,
        &format!(
            "schedule: {} faults against 3 Redis members, 3 Sentinels and 2 portals",
            steps.len()
        ),
    );
    for (i, step) in steps.iter().enumerate() {
        log.line(&clock, &format!("  {}: {step}", i + 1));
    }
    let names: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
    let (members, sentinels) = {
        let names = names.clone();
        on_thread(move || {
            let primary = Member::start(&names[0], None).expect("start the primary");
            let mut members = vec![primary];
            for name in &names[1..] {
                members.push(Member::start(name, Some(members[0].port)).expect("start a replica"));
            }
            for m in &members[1..] {
                m.wait_link_up(members[0].port, Duration::from_secs(15))
                    .unwrap_or_else(|err| panic!("CHAOS_SEED={seed}: replica link: {err}"));
            }
            let sentinels: Vec<SentinelProc> = (1..=3)
                .map(|i| {
                    SentinelProc::start(&format!("sentinel-{i}"), members[0].port)
                        .unwrap_or_else(|err| panic!("CHAOS_SEED={seed}: start Sentinel {i}: {err}"))
                })
                .collect();
            let deadline = Instant::now() + Duration::from_secs(30);
            while !sentinels.iter().all(|s| {
                s.master_field("num-other-sentinels").as_deref() == Some("2")
                    && s.master_field("num-slaves").as_deref() == Some("2")
            }) {
                assert!(
                    Instant::now() < deadline,
                    "CHAOS_SEED={seed}: the Sentinels did not discover each other and the replicas within 30 s"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            (members, sentinels)
        })
        .await
    };
    log.line(
        &clock,
        "3 Sentinels monitor a, know each other and both replicas",
    );
    let ports: Vec<u16> = members.iter().map(|m| m.port).collect();
    let sentinel_ports: Vec<u16> = sentinels.iter().map(|s| s.port).collect();
    let first_epoch: u64 = sentinels[0]
        .master_field("config-epoch")
        .and_then(|e| e.parse().ok())
        .unwrap_or(0);
    let mut relays = Vec::new();
    for &port in &ports {
        relays.push(Relay::start(port).await);
    }
    let relay_ports: Vec<u16> = relays.iter().map(|r| r.port).collect();
    let relay_of: Arc<HashMap<u16, u16>> = Arc::new(
        ports
            .iter()
            .copied()
            .zip(relay_ports.iter().copied())
            .collect(),
    );
    let mut nats = Vec::new();
    for &port in &sentinel_ports {
        nats.push(SentinelNat::start(port, relay_of.clone()).await);
    }
    let nat_ports: Vec<u16> = nats.iter().map(|n| n.port).collect();
    // Portal 2 asks the Sentinels in the other order: the two portals often
    // follow different Sentinels.
    let reversed: Vec<u16> = sentinel_ports.iter().rev().copied().collect();

    let certs = temp_certs();
    let configs = [
        PortalConfig::new(&certs, &relay_ports),
        PortalConfig::new(&certs, &ports),
    ];
    let yamls = [
        with_sentinel_dcs(&configs[0].yaml(), &nat_ports),
        with_sentinel_dcs(&configs[1].yaml(), &reversed),
    ];
    let (portals, _token_dir) = start_portals(
        &log,
        &clock,
        yamls,
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
        log_dir: log_dir_for("sentinel", seed),
    });
    let _ = std::fs::remove_dir_all(&world.log_dir);
    for i in 0..names.len() {
        world.note_process(
            i,
            if i == 0 {
                "the first primary"
            } else {
                "a first replica"
            },
        );
    }
    let first = Reign {
        run_id: world.member(0).run_id.clone(),
        member: names[0].clone(),
        from: 0,
        to: None,
        killed: false,
    };
    let sentinels = Arc::new(sentinels.into_iter().map(Mutex::new).collect::<Vec<_>>());
    let observer = Observer::start(
        clock,
        log.clone(),
        names.clone(),
        ports.clone(),
        sentinel_ports.clone(),
    );

    super::wait_first_leader(&world, seed, Duration::from_secs(20)).await;
    log.line(
        &clock,
        "both portals lead with a (named by Sentinel); writers start",
    );

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

    let kills: Arc<Mutex<Vec<(String, Micros)>>> = Arc::default();
    let (counts, agreements, primary) = {
        let (world, sentinels, observer, kills) = (
            world.clone(),
            sentinels.clone(),
            observer.clone(),
            kills.clone(),
        );
        on_thread(move || {
            let mut nemesis = SentinelNemesis {
                world,
                sentinels,
                observer,
                kills,
                heals: Heals::default(),
                counts: BTreeMap::new(),
                agreements: Vec::new(),
                primary: 0,
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
    {
        let observer = observer.clone();
        on_thread(move || observer.stop()).await;
    }

    // The truth, from what was observed.
    let roles = lock(&observer.roles).clone();
    let named = lock(&observer.named).clone();
    let (truth, notes, handovers) =
        derive_reigns(&names, &roles, &named, &lock(&kills), first, first_epoch);
    for note in &notes {
        log.line(&clock, &format!("truth: {note}"));
    }
    for r in &truth {
        log.line(
            &clock,
            &format!(
                "truth: {} (run_id {}) the real primary from {} to {}",
                r.member,
                short(&r.run_id),
                secs(r.from),
                r.to.map_or("the end".into(), secs)
            ),
        );
    }
    let mut handed_over = 0;
    for h in &handovers {
        let (from, to) = (h.promoted, h.quorum.unwrap_or(Micros::MAX));
        let acked = writes
            .iter()
            .filter(|w| match &w.outcome {
                Outcome::Acked { at, by: Some(by) } => {
                    by.run_id == h.old_run_id && *at >= from && *at < to
                }
                _ => false,
            })
            .count();
        handed_over += acked;
        log.line(
            &clock,
            &format!(
                "failover: successor promoted at {}, first named at {}, named by a quorum at {}; \
                 {acked} writes acknowledged by the old primary (run_id {}) in between \
                 (allowed: no Sentinel quorum named the successor yet; the failover drops them)",
                secs(h.promoted),
                secs(h.first_named),
                h.quorum.map_or("never".into(), secs),
                short(&h.old_run_id)
            ),
        );
    }
    log.line(
        &clock,
        &format!(
            "{} failovers; {handed_over} writes acknowledged by an old primary after its \
             successor's promotion and before a Sentinel quorum named the successor",
            handovers.len()
        ),
    );
    match truth.last() {
        Some(r) if r.to.is_none() && r.member == names[primary] => {}
        other => world.error(format!(
            "the observed truth does not end with {} reigning: {other:?}",
            names[primary]
        )),
    }
    *lock(&world.truth) = truth.clone();

    for (i, name) in names.iter().enumerate() {
        let tail = world.member(i).log_tail(100_000);
        world.save_log(&format!("redis-{name}.log"), &tail);
    }
    for (i, s) in sentinels.iter().enumerate() {
        world.save_log(
            &format!("sentinel-{}.log", i + 1),
            &lock(s).log_tail(100_000),
        );
    }
    let history = History {
        writes,
        truth,
        samples,
        agreements,
        processes: lock(&world.processes).clone(),
        final_data,
        writers_from,
        writers_to,
    };
    let report = super::conclude(&world, history, seed, counts, started, "chaos_sentinel");
    drop(nats);
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Micros = 1000;

    fn names() -> Vec<String> {
        ["a", "b", "c"].iter().map(|s| s.to_string()).collect()
    }

    fn role(member: usize, run_id: &str, at_ms: u64, seen: Seen) -> RoleObs {
        RoleObs {
            member,
            run_id: run_id.into(),
            at: at_ms * MS,
            seen,
        }
    }

    fn name(sentinel: usize, at_ms: u64, member: usize, epoch: u64) -> NameObs {
        NameObs {
            sentinel,
            at: at_ms * MS,
            member: Some(member),
            port: 6000 + member as u16,
            epoch,
        }
    }

    fn first() -> Reign {
        Reign {
            run_id: "a1".into(),
            member: "a".into(),
            from: 0,
            to: None,
            killed: false,
        }
    }

    const OF_A: Seen = Seen::Replica { of: 6000, up: true };

    #[test]
    fn a_kill_then_a_sentinel_promotion() {
        let roles = vec![
            role(0, "a1", 0, Seen::Master),
            role(1, "b1", 0, OF_A),
            role(0, "", 10_000, Seen::Silent),
            role(1, "b1", 12_000, Seen::Master),
            // a comes back empty, a master, never named: never reigns.
            role(0, "a2", 14_000, Seen::Master),
        ];
        let named = vec![
            name(0, 0, 0, 0),
            name(1, 12_300, 1, 1),
            name(0, 13_000, 1, 1),
        ];
        let kills = vec![("a1".to_string(), 10_000 * MS)];
        let (truth, notes, _) = derive_reigns(&names(), &roles, &named, &kills, first(), 0);
        assert!(notes.is_empty(), "{notes:?}");
        assert_eq!(truth.len(), 2, "{truth:?}");
        assert_eq!((truth[0].to, truth[0].killed), (Some(10_000 * MS), true));
        assert_eq!(
            (truth[1].run_id.as_str(), truth[1].from),
            ("b1", 12_000 * MS)
        );
        assert_eq!(truth[1].to, None);
    }

    #[test]
    fn a_frozen_primary_that_wakes_up_a_master_is_not_the_primary() {
        let roles = vec![
            role(0, "a1", 0, Seen::Master),
            role(1, "b1", 0, OF_A),
            role(0, "", 2_000, Seen::Silent),
            role(1, "b1", 5_000, Seen::Master),
            // SIGCONT: a still says master, then Sentinel demotes it.
            role(0, "a1", 7_000, Seen::Master),
            role(0, "a1", 15_000, Seen::Replica { of: 6001, up: true }),
        ];
        // Sentinel 3 was stopped and names a with the old epoch afterwards.
        let named = vec![
            name(0, 5_200, 1, 1),
            name(1, 5_260, 1, 1),
            name(2, 7_500, 0, 0),
        ];
        let (truth, _, handovers) = derive_reigns(&names(), &roles, &named, &[], first(), 0);
        assert_eq!(truth.len(), 2, "{truth:?}");
        // a reigns until a quorum names b, b from its promotion.
        assert_eq!((truth[0].to, truth[0].killed), (Some(5_260 * MS), true));
        assert_eq!(handovers[0].quorum, Some(5_260 * MS));
        assert_eq!(truth[1].from, 5_000 * MS);
        let write_to_a = super::super::checker::Write {
            writer: 1,
            portal: 0,
            value: 1,
            sent: 7_100 * MS,
            outcome: super::super::checker::Outcome::Acked {
                at: 7_101 * MS,
                by: Some(super::super::checker::Identity {
                    run_id: "a1".into(),
                    port: 6000,
                }),
            },
        };
        let writes = [write_to_a];
        let found = super::super::checker::written_to_non_primary(&writes, &truth);
        assert_eq!(found.len(), 1);
    }

    #[test]
    fn a_naming_seen_before_the_role_and_a_rogue_named_later() {
        let roles = vec![
            role(0, "a1", 0, Seen::Master),
            role(2, "c1", 0, OF_A),
            // The observer sees c as a master only after Sentinel names it.
            role(2, "c1", 3_050, Seen::Master),
            // c killed; c2 starts as a master (never a replica) and is named
            // with a newer epoch later: its reign starts at that naming.
            role(2, "c2", 9_000, Seen::Master),
        ];
        let named = vec![
            name(0, 3_000, 2, 4),
            name(2, 3_100, 2, 4),
            name(1, 10_000, 2, 5),
        ];
        let kills = vec![("c1".to_string(), 8_000 * MS)];
        let (truth, notes, _) = derive_reigns(&names(), &roles, &named, &kills, first(), 0);
        assert!(notes.is_empty(), "{notes:?}");
        assert_eq!(truth.len(), 3, "{truth:?}");
        assert_eq!(truth[0].to, Some(3_100 * MS));
        assert_eq!((truth[1].from, truth[1].to), (3_050 * MS, Some(8_000 * MS)));
        assert_eq!(
            (truth[2].run_id.as_str(), truth[2].from),
            ("c2", 10_000 * MS)
        );
    }

    #[test]
    fn a_live_primary_failed_over_reigns_until_a_quorum_names_its_successor() {
        let roles = vec![
            role(0, "a1", 0, Seen::Master),
            role(2, "c1", 0, OF_A),
            role(2, "c1", 22_611, Seen::Master),
            role(0, "a1", 32_000, Seen::Replica { of: 6002, up: true }),
        ];
        let named = vec![name(2, 23_454, 2, 3), name(1, 23_519, 2, 3)];
        let (truth, _, handovers) = derive_reigns(&names(), &roles, &named, &[], first(), 2);
        assert_eq!(truth[0].to, Some(23_519 * MS), "{truth:?}");
        assert_eq!(truth[1].from, 22_611 * MS);
        assert_eq!(
            handovers,
            vec![Handover {
                old_run_id: "a1".into(),
                promoted: 22_611 * MS,
                first_named: 23_454 * MS,
                quorum: Some(23_519 * MS),
            }]
        );
        let by_a = |at_ms: u64| super::super::checker::Write {
            writer: 1,
            portal: 1,
            value: at_ms,
            sent: at_ms * MS,
            outcome: super::super::checker::Outcome::Acked {
                at: at_ms * MS,
                by: Some(super::super::checker::Identity {
                    run_id: "a1".into(),
                    port: 6000,
                }),
            },
        };
        let writes = [by_a(23_000), by_a(23_600)];
        let found = super::super::checker::written_to_non_primary(&writes, &truth);
        assert_eq!(found, vec![&writes[1]]);
    }

    #[test]
    fn a_naming_without_a_master_is_noted_not_followed() {
        let roles = vec![role(0, "a1", 0, Seen::Master), role(1, "b1", 0, OF_A)];
        let named = vec![name(0, 1_000, 1, 1)];
        let (truth, notes, _) = derive_reigns(&names(), &roles, &named, &[], first(), 0);
        assert_eq!(truth.len(), 1);
        assert_eq!(notes.len(), 1, "{notes:?}");
    }

    #[test]
    fn the_translator_rewrites_only_a_members_address() {
        let map: HashMap<u16, u16> = [(6000, 7000)].into_iter().collect();
        let addr = |p: &str| {
            Reply::Array(Some(vec![
                Reply::Bulk(Some(b"127.0.0.1".to_vec())),
                Reply::Bulk(Some(p.as_bytes().to_vec())),
            ]))
        };
        assert_eq!(translate(addr("6000"), &map), addr("7000"));
        assert_eq!(translate(addr("6001"), &map), addr("6001"));
        let other = Reply::Array(Some(vec![Reply::Integer(1), Reply::Simple("x".into())]));
        assert_eq!(translate(other.clone(), &map), other);
        let bytes = encode_reply(&addr("7000"));
        assert_eq!(parse(&bytes).unwrap(), Some((addr("7000"), bytes.len())));
    }

    #[test]
    fn a_seed_replays_the_same_sentinel_schedule() {
        assert_eq!(sentinel_schedule(3, 40), sentinel_schedule(3, 40));
        let s = sentinel_schedule(1, 300);
        for kind in SENTINEL_KINDS {
            assert!(
                s.iter().any(|step| step.kind == kind),
                "{kind:?} never drawn"
            );
        }
    }
}
