//! The integration-test harness: real `redis-server` processes, a real
//! `portal` process, a TLS client and a minimal RESP codec.
//!
//! Every spawned process is owned by a value that kills it (SIGKILL) and
//! waits for it on `Drop`, and every file lives in a `TempDir`, so a test that
//! panics leaves nothing behind. When a test panics, the portal's and the
//! Redis servers' logs are printed as they are dropped.
//!
//! Ports come from below the kernel's ephemeral range (see [`free_port`])
//! and are never handed out twice within one test binary.

#![allow(dead_code)]

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore, SupportedProtocolVersion};
use serde_json::Value;
use tempfile::TempDir;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

pub mod chaos;
pub mod etcd;
pub mod patroni;
pub mod pg;
pub mod pki;

/// The portal binary under test.
pub const PORTAL: &str = env!("CARGO_BIN_EXE_portal");

/// How long a test waits for something that should happen "soon" (a leader
/// elected, a session closed, a failover done). Generous on purpose: tests
/// check behaviour, not speed.
pub const DEADLINE: Duration = Duration::from_secs(15);

/// How often `wait_for` polls `/status`.
const POLL: Duration = Duration::from_millis(20);

// ---- ports ------------------------------------------------------------------

/// Ports handed out come from here: below Linux's ephemeral range
/// (32768-60999 by default), which the kernel draws the local ports of
/// outgoing connections from. A port the OS handed out for `127.0.0.1:0`
/// could be taken, between the test's check and the server's bind, by a
/// probe's or a client's outgoing connection; one from this range cannot.
const PORT_RANGE: std::ops::Range<u16> = 20_000..32_000;

/// A loopback port, outside the ephemeral range, that was free a moment
/// ago and that nobody in this process got before. Each process starts at
/// its own offset in the range, so test binaries run side by side rarely
/// meet.
pub fn free_port() -> u16 {
    static NEXT: OnceLock<Mutex<(u16, HashSet<u16>)>> = OnceLock::new();
    let span = PORT_RANGE.end - PORT_RANGE.start;
    let state = NEXT.get_or_init(|| {
        let seed = std::process::id()
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
        Mutex::new(((seed % u32::from(span)) as u16, HashSet::new()))
    });
    let mut state = state.lock().expect("port state");
    for _ in 0..span {
        let port = PORT_RANGE.start + state.0 % span;
        state.0 = (state.0 + 1) % span;
        if state.1.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            state.1.insert(port);
            return port;
        }
    }
    panic!("no free port left in {PORT_RANGE:?}");
}

// ---- RESP -------------------------------------------------------------------

/// One RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Simple(String),
    /// The error line without its leading `-`.
    Error(String),
    Integer(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

impl Reply {
    /// The reply as text: simple strings and bulk strings as they are,
    /// integers in decimal, errors with their leading `-`, arrays as their
    /// elements' texts, one a line.
    pub fn text(&self) -> String {
        match self {
            Reply::Simple(s) => s.clone(),
            Reply::Error(e) => format!("-{e}"),
            Reply::Integer(i) => i.to_string(),
            Reply::Bulk(Some(b)) => String::from_utf8_lossy(b).into_owned(),
            Reply::Bulk(None) | Reply::Array(None) => "(nil)".to_string(),
            Reply::Array(Some(items)) => {
                items.iter().map(Reply::text).collect::<Vec<_>>().join("\n")
            }
        }
    }

    pub fn is_error(&self) -> bool {
        matches!(self, Reply::Error(_))
    }

    /// The first element of an array reply.
    pub fn first(&self) -> Option<&Reply> {
        match self {
            Reply::Array(Some(items)) => items.first(),
            _ => None,
        }
    }
}

/// A command as a RESP array of bulk strings.
pub fn encode(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Parses one reply from the start of `buf`: `Ok(None)` while `buf` does not
/// yet hold a whole reply, else the reply and how many bytes it took.
pub fn parse(buf: &[u8]) -> Result<Option<(Reply, usize)>, String> {
    parse_at(buf, 0)
}

fn parse_at(buf: &[u8], at: usize) -> Result<Option<(Reply, usize)>, String> {
    let Some(&kind) = buf.get(at) else {
        return Ok(None);
    };
    let Some(end) = buf[at..].windows(2).position(|w| w == b"\r\n") else {
        return Ok(None);
    };
    let line = &buf[at + 1..at + end];
    let next = at + end + 2;
    let text = || String::from_utf8_lossy(line).into_owned();
    let number = || -> Result<i64, String> {
        text()
            .parse::<i64>()
            .map_err(|_| format!("bad RESP length or integer {:?}", text()))
    };
    Ok(match kind {
        b'+' => Some((Reply::Simple(text()), next)),
        b'-' => Some((Reply::Error(text()), next)),
        b':' => Some((Reply::Integer(number()?), next)),
        b'$' => {
            let len = number()?;
            if len < 0 {
                return Ok(Some((Reply::Bulk(None), next)));
            }
            let len = len as usize;
            if buf.len() < next + len + 2 {
                return Ok(None);
            }
            if &buf[next + len..next + len + 2] != b"\r\n" {
                return Err("bulk string not terminated by CRLF".into());
            }
            Some((
                Reply::Bulk(Some(buf[next..next + len].to_vec())),
                next + len + 2,
            ))
        }
        b'*' => {
            let len = number()?;
            if len < 0 {
                return Ok(Some((Reply::Array(None), next)));
            }
            let mut items = Vec::with_capacity(len as usize);
            let mut at = next;
            for _ in 0..len {
                match parse_at(buf, at)? {
                    Some((item, after)) => {
                        items.push(item);
                        at = after;
                    }
                    None => return Ok(None),
                }
            }
            Some((Reply::Array(Some(items)), at))
        }
        other => {
            let shown = String::from_utf8_lossy(&buf[at..buf.len().min(at + 60)]).into_owned();
            return Err(format!(
                "not a RESP reply (type byte {other:#04x}): {shown:?}"
            ));
        }
    })
}

/// A RESP connection over any async stream (TLS through the portal, or plain
/// TCP). Partial reads are buffered until a whole reply has arrived.
pub struct Resp<S> {
    pub stream: S,
    buf: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Resp<S> {
    pub fn new(stream: S) -> Self {
        Resp {
            stream,
            buf: Vec::new(),
        }
    }

    pub async fn send(&mut self, args: &[&str]) -> io::Result<()> {
        self.stream.write_all(&encode(args)).await?;
        self.stream.flush().await
    }

    /// Reads one reply; `UnexpectedEof` when the peer closed first.
    pub async fn read_reply(&mut self) -> io::Result<Reply> {
        loop {
            match parse(&self.buf) {
                Ok(Some((reply, used))) => {
                    self.buf.drain(..used);
                    return Ok(reply);
                }
                Ok(None) => {}
                Err(what) => return Err(io::Error::new(io::ErrorKind::InvalidData, what)),
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed before a whole reply",
                ));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Sends a command and reads its reply, within 10 s.
    pub async fn cmd(&mut self, args: &[&str]) -> io::Result<Reply> {
        self.cmd_within(args, Duration::from_secs(10)).await
    }

    pub async fn cmd_within(&mut self, args: &[&str], limit: Duration) -> io::Result<Reply> {
        match tokio::time::timeout(limit, async {
            self.send(args).await?;
            self.read_reply().await
        })
        .await
        {
            Ok(result) => result,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no reply to {args:?} within {limit:?}"),
            )),
        }
    }

    /// Waits up to `limit` for the peer to close (EOF or an error); true if
    /// it did. Bytes that arrive meanwhile are kept for `read_reply`.
    pub async fn closed_within(&mut self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// The `tcp_port` of the Redis server at the other end (`INFO server`).
    pub async fn server_port(&mut self) -> io::Result<u16> {
        let reply = self.cmd(&["INFO", "server"]).await?;
        tcp_port(&reply).ok_or_else(|| {
            io::Error::other(format!("INFO server without tcp_port: {}", reply.text()))
        })
    }
}

/// Reads `tcp_port:` from an `INFO server` reply.
pub fn tcp_port(info: &Reply) -> Option<u16> {
    let Reply::Bulk(Some(_)) = info else {
        return None;
    };
    info.text()
        .lines()
        .find_map(|l| l.strip_prefix("tcp_port:"))
        .and_then(|p| p.trim().parse().ok())
}

/// Waits until the replica on `port` (asked with `cmd`) reports its link to
/// its primary up; panics with its INFO and `log` after `DEADLINE`.
pub fn wait_replica_link(port: u16, cmd: impl Fn(&[&str]) -> String, log: impl Fn() -> String) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let info = cmd(&["INFO", "replication"]);
        if info.contains("master_link_status:up") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "replica {port} did not sync:\n{info}\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The number `field` in `INFO section` of the Redis server on `port`
/// (e.g. `clients`, `connected_clients`; this query's own connection
/// counts).
pub fn info_number(port: u16, section: &str, field: &str) -> u64 {
    let info = query(port, &["INFO", section], Duration::from_secs(5))
        .expect("INFO")
        .text();
    info.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in {info}"))
}

/// One command over a fresh blocking TCP connection (direct to a server).
pub fn query(port: u16, args: &[&str], limit: Duration) -> io::Result<Reply> {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut tcp = std::net::TcpStream::connect_timeout(&addr, limit)?;
    tcp.set_read_timeout(Some(limit))?;
    tcp.set_write_timeout(Some(limit))?;
    tcp.write_all(&encode(args))?;
    let mut buf = Vec::new();
    loop {
        if let Some((reply, _)) =
            parse(&buf).map_err(|what| io::Error::new(io::ErrorKind::InvalidData, what))?
        {
            return Ok(reply);
        }
        let mut chunk = [0u8; 4096];
        let n = tcp.read(&mut chunk)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

// ---- redis-server -----------------------------------------------------------

/// A `redis-server` on a loopback port in its own temporary directory,
/// without persistence. Killed (SIGKILL) on drop.
pub struct RedisServer {
    port: u16,
    replica_of: Option<u16>,
    dir: TempDir,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a server (a replica of `127.0.0.1:PORT` if `replica_of`) and
    /// waits until it answers PING.
    pub fn start(replica_of: Option<u16>) -> RedisServer {
        let mut server = RedisServer {
            port: free_port(),
            replica_of,
            dir: TempDir::new().expect("temp dir for redis"),
            child: None,
        };
        server.spawn();
        server
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    fn spawn(&mut self) {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("redis log file");
        let port = self.port.to_string();
        let mut command = Command::new("redis-server");
        command
            .args(["--port", &port, "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            // A replica's first sync would otherwise wait 5 s for company.
            .args(["--repl-diskless-sync-delay", "0"])
            .arg("--dir")
            .arg(self.dir.path());
        if let Some(primary) = self.replica_of {
            command.args(["--replicaof", "127.0.0.1", &primary.to_string()]);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);

        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Reply::Simple(pong)) = query(self.port, &["PING"], Duration::from_millis(500))
            {
                if pong == "PONG" {
                    return;
                }
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "redis-server on port {} exited with {status}:\n{}",
                    self.port,
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} did not answer PING within 10 s:\n{}",
                self.port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops the server with SIGSTOP for `pause`, then SIGCONT: a stall (a
    /// GC pause, a slow disk) that the server does not notice.
    pub async fn stall(&self, pause: Duration) {
        let pid = self.pid().expect("the server runs").to_string();
        let signal = |sig: &str| {
            let status = Command::new("kill")
                .args([sig, &pid])
                .status()
                .expect("run kill");
            assert!(status.success(), "kill {sig} {pid}");
        };
        signal("-STOP");
        tokio::time::sleep(pause).await;
        signal("-CONT");
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port with the same arguments
    /// (after `kill9`). Without persistence it comes back empty, with a new
    /// replication id.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// One command, direct to this server over plain TCP.
    pub fn query(&self, args: &[&str]) -> io::Result<Reply> {
        query(self.port, args, Duration::from_secs(5))
    }

    /// One command, direct to this server; the reply as text (errors keep
    /// their leading `-`). Panics if the server cannot be reached.
    pub fn cmd(&self, args: &[&str]) -> String {
        self.query(args)
            .unwrap_or_else(|err| panic!("redis {} {args:?}: {err}", self.port))
            .text()
    }

    /// `REPLICAOF NO ONE`.
    pub fn promote(&self) {
        let reply = self.cmd(&["REPLICAOF", "NO", "ONE"]);
        assert_eq!(reply, "OK", "REPLICAOF NO ONE on {}", self.port);
    }

    /// `REPLICAOF 127.0.0.1 PORT`.
    pub fn follow(&self, primary: u16) {
        let reply = self.cmd(&["REPLICAOF", "127.0.0.1", &primary.to_string()]);
        assert_eq!(reply, "OK", "REPLICAOF on {}", self.port);
    }

    /// Waits until this replica's link to its primary is up.
    pub fn wait_link_up(&self) {
        wait_replica_link(self.port, |args| self.cmd(args), || self.log());
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            print_log_tail(&format!("redis-server {}", self.port), &self.log(), 15);
        }
    }
}

/// Prints the last `lines` lines of a server's log, for a failing test.
pub fn print_log_tail(what: &str, log: &str, lines: usize) {
    let tail: Vec<&str> = log.lines().rev().take(lines).collect();
    eprintln!("---- {what} log (last lines) ----");
    for line in tail.iter().rev() {
        eprintln!("{line}");
    }
}

/// A primary and a replica of it whose link is up.
pub fn primary_and_replica() -> (RedisServer, RedisServer) {
    let primary = RedisServer::start(None);
    let replica = RedisServer::start(Some(primary.port()));
    replica.wait_link_up();
    (primary, replica)
}

// ---- certificates -----------------------------------------------------------

/// The files `portal certs init` writes.
#[derive(Clone)]
pub struct Certs {
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub ca_key: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Keeps a temporary directory alive as long as the paths are used.
    _tmp: Option<Arc<TempDir>>,
}

/// Runs `portal certs init --dir DIR --host localhost --host 127.0.0.1`.
pub fn certs(dir: &Path) -> Certs {
    let out = Command::new(PORTAL)
        .args(["certs", "init", "--dir"])
        .arg(dir)
        .args(["--host", "localhost", "--host", "127.0.0.1"])
        .output()
        .expect("run portal certs init");
    assert!(
        out.status.success(),
        "portal certs init failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Certs {
        dir: dir.to_path_buf(),
        ca: dir.join("ca.crt"),
        ca_key: dir.join("ca.key"),
        cert: dir.join("server.crt"),
        key: dir.join("server.key"),
        _tmp: None,
    }
}

/// `certs` in a fresh temporary directory that lives as long as the value.
pub fn temp_certs() -> Certs {
    let tmp = TempDir::new().expect("temp dir for certs");
    let mut certs = certs(tmp.path());
    certs._tmp = Some(Arc::new(tmp));
    certs
}

// ---- TLS client -------------------------------------------------------------

pub type Tls = tokio_rustls::client::TlsStream<TcpStream>;
pub type Session = Resp<Tls>;

/// A rustls client configuration trusting only the CA in `ca_file`, offering
/// `versions`.
pub fn client_config(
    ca_file: &Path,
    versions: &[&'static SupportedProtocolVersion],
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_file).expect("read CA file") {
        roots
            .add(cert.expect("CA PEM"))
            .expect("CA certificate accepted");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

/// A TCP connection to `127.0.0.1:port` from the local address `source`
/// (any of 127.0.0.0/8 on Linux): a client the per-address limits can tell
/// apart from the tests' others.
pub async fn connect_from(source: std::net::IpAddr, port: u16) -> io::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    socket
        .connect(SocketAddr::from(([127, 0, 0, 1], port)))
        .await
}

/// Reads (and drops) until the peer closes `stream`; true if it did (EOF
/// or an error) within `limit`.
pub async fn closed_by_peer<S: AsyncRead + Unpin>(stream: &mut S, limit: Duration) -> bool {
    tokio::time::timeout(limit, async {
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// TLS 1.2 and 1.3, trusting `ca_file`.
pub fn default_client_config(ca_file: &Path) -> Arc<ClientConfig> {
    client_config(ca_file, &[&rustls::version::TLS13, &rustls::version::TLS12])
}

/// Connects to `127.0.0.1:port` and runs the TLS handshake, validating the
/// server as `server_name`; the whole attempt is bounded by 10 s.
pub async fn tls_connect_with(
    port: u16,
    config: Arc<ClientConfig>,
    server_name: &str,
) -> io::Result<Tls> {
    let name = ServerName::try_from(server_name.to_string())
        .map_err(|err| io::Error::new(io::ErrorKind::InvalidInput, err))?;
    let attempt = async {
        let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
        tcp.set_nodelay(true)?;
        TlsConnector::from(config).connect(name, tcp).await
    };
    tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .unwrap_or_else(|_| {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "TLS connect timed out",
            ))
        })
}

/// `tls_connect_with` TLS 1.2/1.3 trusting `ca_file`.
pub async fn tls_connect(port: u16, ca_file: &Path, server_name: &str) -> io::Result<Tls> {
    tls_connect_with(port, default_client_config(ca_file), server_name).await
}

/// A RESP session through the portal endpoint on `port`, validating the
/// portal as `localhost` with the generated CA. Panics if TLS fails.
pub async fn session(port: u16, certs: &Certs) -> Session {
    let tls = tls_connect(port, &certs.ca, "localhost")
        .await
        .unwrap_or_else(|err| panic!("TLS connect to endpoint on port {port}: {err}"));
    Resp::new(tls)
}

/// Which Redis server a new session through the endpoint on `port` reaches:
/// its `tcp_port`, or the error (a refusal, a closed connection) as text.
pub async fn reached(port: u16, certs: &Certs) -> Result<u16, String> {
    let tls = tls_connect(port, &certs.ca, "localhost")
        .await
        .map_err(|err| format!("TLS connect: {err}"))?;
    let mut session = Resp::new(tls);
    let reply = session
        .cmd(&["INFO", "server"])
        .await
        .map_err(|err| format!("INFO server: {err}"))?;
    tcp_port(&reply).ok_or_else(|| reply.text())
}

/// Polls new sessions through the endpoint on `port` until one reaches the
/// server on `want`; panics with what the last attempt saw after `DEADLINE`.
pub async fn wait_reached(port: u16, certs: &Certs, want: u16) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let seen = reached(port, certs).await;
        if seen == Ok(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "endpoint {port} did not reach server {want} within {DEADLINE:?}; last saw {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---- configuration ----------------------------------------------------------

/// Ports of the admin listener and the three endpoints of `PortalConfig`.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub admin: u16,
    /// `rw`: route leader.
    pub rw: u16,
    /// `ro`: route replicas.
    pub ro: u16,
    /// `any`: route any.
    pub any: u16,
}

/// The common configuration: one Redis cluster `cache` with members named
/// `a`, `b`, ... (in the order given), endpoints `rw` (leader), `ro`
/// (replicas) and `any`, TLS from explicit cert/key files, fast probes.
#[derive(Debug, Clone)]
pub struct PortalConfig {
    pub members: Vec<(String, u16)>,
    pub ports: Ports,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub hold_timeout: String,
    pub handshake_timeout: String,
    pub drain_timeout: String,
    pub max_connections: Option<usize>,
    pub on_leader_change: Option<String>,
    /// More keys for every endpoint, as `key: value` lines.
    pub endpoint_keys: Vec<String>,
}

/// Member names in configuration order.
pub const NAMES: [&str; 4] = ["a", "b", "c", "d"];

impl PortalConfig {
    pub fn new(certs: &Certs, member_ports: &[u16]) -> PortalConfig {
        PortalConfig {
            members: member_ports
                .iter()
                .enumerate()
                .map(|(i, &p)| (NAMES[i].to_string(), p))
                .collect(),
            ports: Ports {
                admin: free_port(),
                rw: free_port(),
                ro: free_port(),
                any: free_port(),
            },
            cert: certs.cert.clone(),
            key: certs.key.clone(),
            hold_timeout: "3s".into(),
            handshake_timeout: "5s".into(),
            drain_timeout: "10s".into(),
            max_connections: None,
            on_leader_change: None,
            endpoint_keys: Vec::new(),
        }
    }

    /// Adds `line` (`key: value`) to every endpoint.
    pub fn endpoint_key(mut self, line: &str) -> Self {
        self.endpoint_keys.push(line.into());
        self
    }

    pub fn hold_timeout(mut self, d: &str) -> Self {
        self.hold_timeout = d.into();
        self
    }

    pub fn handshake_timeout(mut self, d: &str) -> Self {
        self.handshake_timeout = d.into();
        self
    }

    pub fn drain_timeout(mut self, d: &str) -> Self {
        self.drain_timeout = d.into();
        self
    }

    pub fn max_connections(mut self, n: usize) -> Self {
        self.max_connections = Some(n);
        self
    }

    pub fn on_leader_change(mut self, what: &str) -> Self {
        self.on_leader_change = Some(what.into());
        self
    }

    pub fn tls_files(mut self, cert: &Path, key: &Path) -> Self {
        self.cert = cert.to_path_buf();
        self.key = key.to_path_buf();
        self
    }

    pub fn yaml(&self) -> String {
        let mut y = String::new();
        y.push_str(&format!(
            "admin:\n  listen: 127.0.0.1:{}\n\nshutdown:\n  drain_timeout: {}\n\n",
            self.ports.admin, self.drain_timeout
        ));
        y.push_str(
            "clusters:\n  - name: cache\n    protocol: redis\n    probe:\n      \
             interval: 200ms\n      fast_interval: 20ms\n      timeout: 300ms\n      \
             rise: 2\n      fall: 2\n    members:\n",
        );
        for (name, port) in &self.members {
            y.push_str(&format!(
                "      - name: {name}\n        address: 127.0.0.1:{port}\n"
            ));
        }
        y.push_str("    endpoints:\n");
        for (name, port, route) in [
            ("rw", self.ports.rw, "leader"),
            ("ro", self.ports.ro, "replicas"),
            ("any", self.ports.any, "any"),
        ] {
            y.push_str(&format!(
                "      - name: {name}\n        listen: 127.0.0.1:{port}\n        route: {route}\n        \
                 tls:\n          cert: {}\n          key: {}\n        hold_timeout: {}\n        \
                 handshake_timeout: {}\n",
                self.cert.display(),
                self.key.display(),
                self.hold_timeout,
                self.handshake_timeout,
            ));
            if let Some(n) = self.max_connections {
                y.push_str(&format!("        max_connections: {n}\n"));
            }
            if let Some(what) = &self.on_leader_change {
                y.push_str(&format!("        on_leader_change: {what}\n"));
            }
            for line in &self.endpoint_keys {
                y.push_str(&format!("        {line}\n"));
            }
        }
        y
    }
}

/// `yaml` (of [`PortalConfig`]) with the probe's `reconnect_interval` set
/// (`0s`: no periodic renewal of the probe's connection).
pub fn with_reconnect_interval(yaml: &str, interval: &str) -> String {
    yaml.replacen(
        "      fall: 2\n",
        &format!("      fall: 2\n      reconnect_interval: {interval}\n"),
        1,
    )
}

/// `yaml` with `lines` added to its `admin:` section.
pub fn with_admin(yaml: &str, lines: &str) -> String {
    yaml.replacen("\n\nshutdown:", &format!("\n{lines}\n\nshutdown:"), 1)
}

/// A portal configuration's text with a `token_file` holding `token`.
pub fn with_token(yaml: &str, dir: &Path, token: &str) -> String {
    let file = dir.join("admin.token");
    std::fs::write(&file, format!("{token}\n")).expect("write the token file");
    with_admin(yaml, &format!("  token_file: {}", file.display()))
}

/// A generated configuration (one cluster) with its `members:` block
/// replaced by `replacement` (e.g. a `dcs:` block the members are learned
/// from).
pub fn replace_members(yaml: &str, replacement: &str) -> String {
    let (head, rest) = yaml
        .split_once("    members:\n")
        .expect("the generated config lists members");
    let endpoints = rest
        .find("    endpoints:\n")
        .expect("the generated config lists endpoints");
    format!("{head}{replacement}{}", &rest[endpoints..])
}

// ---- the portal process -----------------------------------------------------

/// A running `portal run -c FILE`, its config and logs in a temporary
/// directory. Killed (SIGKILL) on drop; its stderr is printed if the test is
/// panicking.
pub struct Portal {
    dir: TempDir,
    child: Child,
    exited: Option<ExitStatus>,
    admin: SocketAddr,
}

impl Portal {
    /// Writes `yaml` to a temporary `portal.yaml`, starts the portal and
    /// waits until `/health` answers 200.
    pub async fn start(yaml: &str) -> Portal {
        let dir = TempDir::new().expect("temp dir for portal");
        let config = dir.path().join("portal.yaml");
        std::fs::write(&config, yaml).expect("write portal.yaml");
        let stderr = File::create(dir.path().join("stderr.log")).expect("stderr log");
        let stdout = File::create(dir.path().join("stdout.log")).expect("stdout log");
        let child = Command::new(PORTAL)
            .arg("run")
            .arg("-c")
            .arg(&config)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info,portal=debug".into()),
            )
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("spawn portal");
        let mut portal = Portal {
            dir,
            child,
            exited: None,
            admin: admin_address(yaml),
        };

        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Ok((200, _)) = portal.get("/health").await {
                return portal;
            }
            if let Some(status) = portal.try_exit() {
                panic!(
                    "portal exited with {status} before /health answered:\n{}",
                    portal.stderr_log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "portal /health did not answer within {DEADLINE:?}:\n{}",
                portal.stderr_log()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stderr_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    /// The exit status, if the process has exited.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    pub fn is_running(&mut self) -> bool {
        self.try_exit().is_none()
    }

    /// Waits up to `limit` for the process to exit.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.try_exit() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    pub fn sigterm(&self) {
        self.signal("TERM");
    }

    /// Sends `SIG{name}` (`TERM`, `HUP`, ...) to the portal.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} {} failed", self.pid());
    }

    /// The portal's `portal.yaml`, which a reload re-reads.
    pub fn config_file(&self) -> PathBuf {
        self.dir.path().join("portal.yaml")
    }

    /// The admin listener's address (`host:port`), as a peer names it.
    pub fn admin_address(&self) -> String {
        self.admin.to_string()
    }

    /// An HTTP/1.0 GET on the admin listener: status code and body.
    pub async fn get(&self, path: &str) -> io::Result<(u16, String)> {
        self.request("GET", path, None).await
    }

    /// An HTTP/1.0 GET on the admin listener with a bearer token.
    pub async fn get_with_token(&self, path: &str, token: &str) -> io::Result<(u16, String)> {
        self.request("GET", path, Some(token)).await
    }

    /// An HTTP/1.0 POST on the admin listener, with a bearer token if given.
    pub async fn post(&self, path: &str, token: Option<&str>) -> io::Result<(u16, String)> {
        self.request("POST", path, token).await
    }

    async fn request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
    ) -> io::Result<(u16, String)> {
        let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
        let attempt = async {
            let mut tcp = TcpStream::connect(self.admin).await?;
            tcp.write_all(
                format!(
                    "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
                )
                .as_bytes(),
            )
            .await?;
            let mut raw = Vec::new();
            tcp.read_to_end(&mut raw).await?;
            Ok::<_, io::Error>(raw)
        };
        let raw = tokio::time::timeout(Duration::from_secs(5), attempt)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "admin GET timed out"))??;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| io::Error::other(format!("not an HTTP response: {text:?}")))?;
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| io::Error::other(format!("no status code in {head:?}")))?;
        Ok((code, body.to_string()))
    }

    /// `GET /status` as JSON.
    pub async fn status(&self) -> Value {
        let (code, body) = self
            .get("/status")
            .await
            .unwrap_or_else(|err| panic!("GET /status: {err}\n{}", self.stderr_log()));
        assert_eq!(code, 200, "GET /status: {body}");
        serde_json::from_str(&body).unwrap_or_else(|err| panic!("/status JSON: {err}: {body}"))
    }

    /// `GET /metrics`.
    pub async fn metrics(&self) -> String {
        let (code, body) = self
            .get("/metrics")
            .await
            .unwrap_or_else(|err| panic!("GET /metrics: {err}\n{}", self.stderr_log()));
        assert_eq!(code, 200, "GET /metrics: {body}");
        body
    }

    /// Polls `/status` every 20 ms until `ok` holds, for up to `DEADLINE`;
    /// returns the status that satisfied it. Panics naming `what`.
    pub async fn wait_for(&self, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
        self.wait_for_within(what, DEADLINE, ok).await
    }

    pub async fn wait_for_within(
        &self,
        what: &str,
        limit: Duration,
        ok: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let status = self.status().await;
            if ok(&status) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "waited {limit:?} for {what}; last /status:\n{status:#}"
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until the leader is `name` and the replicas are exactly
    /// `replicas` (names).
    pub async fn wait_roles(&self, name: &str, replicas: &[&str]) -> Value {
        self.wait_for(&format!("leader {name} with replicas {replicas:?}"), |s| {
            let c = cluster(s);
            c["leader"] == name && replica_names(s) == replicas
        })
        .await
    }

    /// Polls `/metrics` until the series (summed over matching label sets)
    /// satisfies `ok`; returns its value.
    pub async fn wait_metric(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        ok: impl Fn(f64) -> bool,
    ) -> f64 {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let text = self.metrics().await;
            let value = metric(&text, name, labels).unwrap_or(0.0);
            if ok(value) {
                return value;
            }
            assert!(
                Instant::now() < deadline,
                "metric {name}{labels:?} = {value} did not reach the expected value; /metrics:\n{text}"
            );
            tokio::time::sleep(POLL).await;
        }
    }
}

impl Drop for Portal {
    fn drop(&mut self) {
        if self.try_exit().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- portal stderr ----\n{}", self.stderr_log());
        }
    }
}

/// `admin.listen` of a config written by `PortalConfig` (or by hand, with
/// `listen:` as the first key under `admin:`); the default otherwise.
fn admin_address(yaml: &str) -> SocketAddr {
    let mut in_admin = false;
    for line in yaml.lines() {
        if line.starts_with("admin:") {
            in_admin = true;
            continue;
        }
        if in_admin {
            if !line.starts_with(' ') && !line.trim().is_empty() {
                break;
            }
            if let Some(value) = line.trim().strip_prefix("listen:") {
                let mut address: SocketAddr = value.trim().parse().expect("admin.listen address");
                // A listener on every address is asked on loopback.
                if address.ip().is_unspecified() {
                    address.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
                }
                return address;
            }
        }
    }
    "127.0.0.1:9090".parse().expect("default admin address")
}

// ---- reading /status and /metrics --------------------------------------------

/// The first (only) cluster in a `/status` document.
pub fn cluster(status: &Value) -> &Value {
    &status["clusters"][0]
}

pub fn leader(status: &Value) -> Option<String> {
    cluster(status)["leader"].as_str().map(str::to_string)
}

pub fn epoch(status: &Value) -> u64 {
    cluster(status)["epoch"]
        .as_u64()
        .unwrap_or_else(|| panic!("/status without an epoch: {status:#}"))
}

pub fn replica_names(status: &Value) -> Vec<String> {
    cluster(status)["replicas"]
        .as_array()
        .map(|r| {
            r.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The member called `name` in a `/status` document.
pub fn member<'a>(status: &'a Value, name: &str) -> &'a Value {
    cluster(status)["members"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["name"] == name))
        .unwrap_or_else(|| panic!("no member {name} in /status: {status:#}"))
}

/// The sum of the samples of `name` whose labels include all of `labels`;
/// `None` if no sample matches.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut sum = None;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (series_name, series_labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if series_name != name {
            continue;
        }
        let present: Vec<(&str, &str)> = series_labels
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.trim(), v.trim().trim_matches('"')))
            .collect();
        if labels.iter().all(|want| present.contains(want)) {
            if let Ok(v) = value.trim().parse::<f64>() {
                *sum.get_or_insert(0.0) += v;
            }
        }
    }
    sum
}

/// Bytes of a crafted ClientHello: record version 0x0301, `client_version`
/// as given, a fixed random, no session id, ECDHE-GCM and older CBC suites,
/// null compression, and the extensions a TLS 1.2 server needs to answer
/// (supported groups, point formats, signature algorithms) but no
/// `supported_versions`, so `client_version` alone says what the client
/// speaks.
pub fn client_hello(client_version: u16) -> Vec<u8> {
    fn extension(kind: u16, data: &[u8]) -> Vec<u8> {
        let mut out = kind.to_be_bytes().to_vec();
        out.extend_from_slice(&(data.len() as u16).to_be_bytes());
        out.extend_from_slice(data);
        out
    }
    fn u16_list(items: &[u16]) -> Vec<u8> {
        let mut out = ((items.len() * 2) as u16).to_be_bytes().to_vec();
        for item in items {
            out.extend_from_slice(&item.to_be_bytes());
        }
        out
    }

    let mut body = Vec::new();
    body.extend_from_slice(&client_version.to_be_bytes());
    body.extend((0u8..32).map(|i| i.wrapping_mul(37).wrapping_add(11)));
    body.push(0); // session id length
    body.extend(u16_list(&[0xc02b, 0xc02f, 0xc013, 0x002f, 0x0035]));
    body.extend_from_slice(&[1, 0]); // one compression method: null

    let mut extensions = Vec::new();
    extensions.extend(extension(0x000a, &u16_list(&[0x001d, 0x0017]))); // x25519, P-256
    extensions.extend(extension(0x000b, &[1, 0])); // uncompressed points
    extensions.extend(extension(0x000d, &u16_list(&[0x0403, 0x0804, 0x0401])));
    body.extend_from_slice(&(extensions.len() as u16).to_be_bytes());
    body.extend(extensions);

    let mut handshake = vec![0x01]; // ClientHello
    handshake.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    handshake.extend_from_slice(&body);

    let mut record = vec![0x16, 0x03, 0x01]; // handshake record, TLS 1.0 record version
    record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
    record.extend_from_slice(&handshake);
    record
}

/// How [`exchange_raw`] stopped reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// `enough` bytes came.
    Enough,
    /// The peer closed (or reset) the connection.
    Closed,
    /// Neither within `DEADLINE`: the peer kept the connection open.
    TimedOut,
}

/// Sends `bytes` on a fresh plain TCP connection to `port` and collects what
/// comes back until the peer closes, `enough` bytes came, or `DEADLINE`;
/// says which.
pub async fn exchange_raw(port: u16, bytes: &[u8], enough: usize) -> (Vec<u8>, Ending) {
    let mut tcp = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    tcp.write_all(bytes).await.expect("send");
    let mut answer = Vec::new();
    let ending = tokio::time::timeout(DEADLINE, async {
        let mut chunk = [0u8; 4096];
        while answer.len() < enough {
            match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => return Ending::Closed,
                Ok(n) => answer.extend_from_slice(&chunk[..n]),
            }
        }
        Ending::Enough
    })
    .await
    .unwrap_or(Ending::TimedOut);
    (answer, ending)
}
