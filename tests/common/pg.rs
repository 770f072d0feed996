//! The PostgreSQL part of the integration-test harness: real `postgres`
//! servers (a primary made with `initdb`, standbys made with
//! `pg_basebackup -R`), a portal configuration for a `protocol: postgres`
//! cluster, and clients that reach them through the portal: `tokio-postgres`
//! over rustls, stock `psql`, and a raw wire-protocol client for the openings
//! a library would never send.
//!
//! Every server lives in its own temporary directory under `/tmp` and is
//! stopped (`pg_ctl stop -m immediate`) and removed on `Drop`, also when the
//! test panics, in which case the tail of its log is printed first.
//!
//! PostgreSQL refuses to run as root: when the tests run as root, the server
//! binaries (`initdb`, `pg_ctl`, `pg_basebackup`) run as the `postgres` system
//! user through `setpriv`, in directories chowned to it. Clients (`psql`, the
//! Rust clients) run as whoever runs the tests; loopback connections use
//! `trust` authentication.

#![allow(dead_code)]

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tempfile::TempDir;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_postgres::config::{SslMode, SslNegotiation};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};
use tokio_postgres::Client;
use tokio_rustls::TlsConnector;

use super::{default_client_config, free_port, Certs, Tls, DEADLINE, NAMES};

/// Where Debian's PostgreSQL 15 server binaries live.
pub const DEBIAN_PG_BINDIR: &str = "/usr/lib/postgresql/15/bin";

/// How long a server gets to start, stop, promote or catch up.
const SERVER_DEADLINE: Duration = Duration::from_secs(60);

// ---- binaries and users -----------------------------------------------------

/// The directory holding `postgres`, `initdb`, `pg_ctl`, `pg_basebackup` and
/// `psql`: `pg_config --bindir` when it has a `postgres` binary, else
/// Debian's PostgreSQL 15 directory.
///
/// Panics, telling how to install the server, when neither has one: a test
/// that needs PostgreSQL fails rather than silently skipping.
pub fn bindir() -> &'static Path {
    static BINDIR: OnceLock<PathBuf> = OnceLock::new();
    BINDIR.get_or_init(|| {
        let from_pg_config = Command::new("pg_config")
            .arg("--bindir")
            .output()
            .ok()
            .filter(|out| out.status.success())
            .map(|out| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
        let candidates = from_pg_config
            .into_iter()
            .chain([PathBuf::from(DEBIAN_PG_BINDIR)]);
        for dir in candidates {
            if dir.join("postgres").is_file() && dir.join("initdb").is_file() {
                return dir;
            }
        }
        panic!(
            "the PostgreSQL server is not installed ({DEBIAN_PG_BINDIR}/postgres is missing): \
             run `bash tests/run.sh`, which installs the Debian packages the tests need \
             (postgresql), or `apt-get install postgresql`"
        );
    })
}

/// Fails the test (with how to install it) when the PostgreSQL server is
/// missing. Every test that starts a server calls it first, through
/// `PgServer::primary`.
pub fn require_postgres() {
    bindir();
}

pub fn bin(name: &str) -> PathBuf {
    bindir().join(name)
}

/// The uid and gid of the `postgres` user when this process runs as root
/// (PostgreSQL must then run as that user); `None` otherwise.
pub fn run_as() -> Option<(u32, u32)> {
    static RUN_AS: OnceLock<Option<(u32, u32)>> = OnceLock::new();
    *RUN_AS.get_or_init(|| {
        if id(&["-u"]) != 0 {
            return None;
        }
        Some((id(&["-u", "postgres"]), id(&["-g", "postgres"])))
    })
}

fn id(args: &[&str]) -> u32 {
    let out = Command::new("id").args(args).output().expect("run id");
    assert!(
        out.status.success(),
        "`id {}` failed (running as root needs a `postgres` user, which Debian's \
         postgresql package creates): {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("numeric id")
}

/// A command for the PostgreSQL server binary `name`, run as the `postgres`
/// user when we are root, in `cwd` (which that user can enter).
pub fn server_command(name: &str, cwd: &Path) -> Command {
    let mut command = match run_as() {
        Some(_) => {
            let mut c = Command::new("setpriv");
            c.args([
                "--reuid=postgres",
                "--regid=postgres",
                "--init-groups",
                "--",
            ])
            .arg(bin(name));
            c
        }
        None => Command::new(bin(name)),
    };
    command.current_dir(cwd).stdin(Stdio::null());
    clear_pg_env(&mut command);
    command
}

/// Removes libpq's `PG*` variables so that nothing from the caller's
/// environment changes where a client connects or how.
pub fn clear_pg_env(command: &mut Command) {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PG") {
            command.env_remove(&key);
        }
    }
}

/// Runs `command`, panicking with its output when it fails.
pub fn run(command: &mut Command, what: &str) -> Output {
    let out = command
        .output()
        .unwrap_or_else(|err| panic!("{what}: could not run {command:?}: {err}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{command:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

// ---- postgres servers -------------------------------------------------------

/// A PostgreSQL server on `127.0.0.1:port` with its data directory, Unix
/// socket and log in a temporary directory under `/tmp`.
///
/// Configured for tests: `fsync=off`, `synchronous_commit=off`,
/// `wal_level=replica` with WAL senders and `hot_standby`, `trust`
/// authentication for loopback (normal and replication connections), user
/// `postgres`. Stopped with `pg_ctl stop -m immediate` and removed on drop.
pub struct PgServer {
    root: TempDir,
    port: u16,
    running: bool,
}

impl PgServer {
    /// `initdb` a new cluster and start it as a primary; returns once it
    /// accepts connections.
    pub fn primary() -> PgServer {
        require_postgres();
        let mut server = PgServer::empty();
        run(
            server_command("initdb", server.root()).args([
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
            server.data().join("pg_hba.conf"),
            "local all         all          trust\n\
             host  all         all          127.0.0.1/32 trust\n\
             local replication all          trust\n\
             host  replication all          127.0.0.1/32 trust\n",
        )
        .expect("write pg_hba.conf");
        server.append_conf(
            "\n# portal tests\n\
             listen_addresses = '127.0.0.1'\n\
             max_connections = 60\n\
             shared_buffers = 16MB\n\
             wal_level = replica\n\
             max_wal_senders = 8\n\
             max_replication_slots = 8\n\
             wal_keep_size = '256MB'\n\
             hot_standby = on\n\
             wal_receiver_status_interval = 1s\n\
             fsync = off\n\
             synchronous_commit = off\n\
             log_line_prefix = '%m [%p] %q%u@%d '\n\
             log_connections = on\n\
             log_disconnections = on\n",
        );
        server.set_port_and_socket();
        server.start();
        server
    }

    /// A streaming standby of `primary` made with
    /// `pg_basebackup -R -X stream`; returns once it is in recovery, accepts
    /// connections and its WAL receiver is streaming.
    pub fn standby_of(primary: &PgServer) -> PgServer {
        require_postgres();
        let mut server = PgServer::empty();
        run(
            server_command("pg_basebackup", server.root())
                .args(["-D", "data", "-h", "127.0.0.1", "-p"])
                .arg(primary.port.to_string())
                .args(["-U", "postgres", "-R", "-X", "stream", "-c", "fast", "-N"])
                .env("PGCONNECT_TIMEOUT", "10"),
            "pg_basebackup",
        );
        // The copied postgresql.conf names the primary's port and socket
        // directory; later lines win.
        server.set_port_and_socket();
        server.start();
        server.wait_streaming();
        server
    }

    /// A fresh temporary directory that the server user owns.
    fn empty() -> PgServer {
        let root = tempfile::Builder::new()
            .prefix("portal-pg-")
            .tempdir_in("/tmp")
            .expect("temp dir for postgres under /tmp");
        if let Some((uid, gid)) = run_as() {
            std::os::unix::fs::chown(root.path(), Some(uid), Some(gid))
                .expect("chown the postgres temp dir to postgres");
        }
        PgServer {
            root,
            port: free_port(),
            running: false,
        }
    }

    fn root(&self) -> &Path {
        self.root.path()
    }

    pub fn data(&self) -> PathBuf {
        self.root().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.root().join("server.log")
    }

    fn append_conf(&self, text: &str) {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(self.data().join("postgresql.conf"))
            .expect("open postgresql.conf");
        file.write_all(text.as_bytes())
            .expect("append to postgresql.conf");
    }

    fn set_port_and_socket(&mut self) {
        self.append_conf(&format!(
            "\nport = {}\nunix_socket_directories = '{}'\n",
            self.port,
            self.root().display()
        ));
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn is_running(&self) -> bool {
        self.running
    }

    /// The server's log (`pg_ctl -l`).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts the server (again: same directory, same port) with
    /// `pg_ctl start -w` and waits until it accepts connections. A server
    /// stopped with `stop_immediate` runs crash recovery first; a former
    /// primary comes back as a primary on its old timeline.
    pub fn start(&mut self) {
        assert!(!self.running, "postgres on port {} already runs", self.port);
        let log = self.log_path();
        let out = server_command("pg_ctl", self.root())
            .args(["start", "-w", "-t", "60", "-D", "data", "-l"])
            .arg(&log)
            .output()
            .expect("run pg_ctl start");
        if !out.status.success() {
            panic!(
                "pg_ctl start on port {} failed ({}):\n{}{}\n---- server log ----\n{}",
                self.port,
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.log()
            );
        }
        self.running = true;
        let deadline = Instant::now() + SERVER_DEADLINE;
        loop {
            match self.try_psql("select 1") {
                Ok(one) if one == "1" => return,
                other => assert!(
                    Instant::now() < deadline,
                    "postgres on port {} does not answer `select 1` ({other:?}):\n{}",
                    self.port,
                    self.log()
                ),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `pg_ctl stop -m immediate`: the postmaster and every backend are gone
    /// when this returns, without a shutdown checkpoint (like a crash).
    pub fn stop_immediate(&mut self) {
        if !self.running {
            return;
        }
        run(
            server_command("pg_ctl", self.root()).args([
                "stop",
                "-m",
                "immediate",
                "-w",
                "-t",
                "60",
                "-D",
                "data",
            ]),
            &format!("pg_ctl stop -m immediate (port {})", self.port),
        );
        self.running = false;
    }

    /// Makes the stopped server start next time as a standby
    /// (`standby.signal`) with nothing to stream from: a former primary
    /// back in recovery on its own timeline, before anyone rewinds it.
    pub fn signal_standby(&self) {
        assert!(!self.running, "postgres on port {} runs", self.port);
        let path = self.data().join("standby.signal");
        std::fs::write(&path, "").expect("write standby.signal");
        if let Some((uid, gid)) = run_as() {
            std::os::unix::fs::chown(&path, Some(uid), Some(gid)).expect("chown standby.signal");
        }
    }

    /// `pg_ctl promote -w`: returns once the standby accepts writes.
    pub fn promote(&self) {
        run(
            server_command("pg_ctl", self.root()).args(["promote", "-w", "-t", "60", "-D", "data"]),
            &format!("pg_ctl promote (port {})", self.port),
        );
        assert!(
            !self.is_in_recovery(),
            "postgres on port {} still in recovery after pg_ctl promote -w",
            self.port
        );
    }

    /// One statement, direct to this server with `psql -At`; its output,
    /// trimmed, or the error `psql` printed.
    pub fn try_psql(&self, sql: &str) -> Result<String, String> {
        let mut command = Command::new(bin("psql"));
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
            .env("PGCONNECT_TIMEOUT", "10")
            .stdin(Stdio::null())
            .output()
            .map_err(|err| format!("run psql: {err}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(format!(
                "psql ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// `try_psql`, panicking on failure.
    pub fn psql(&self, sql: &str) -> String {
        self.try_psql(sql)
            .unwrap_or_else(|err| panic!("postgres on port {}: {sql:?}: {err}", self.port))
    }

    /// `pg_is_in_recovery()`.
    pub fn is_in_recovery(&self) -> bool {
        match self.psql("select pg_is_in_recovery()").as_str() {
            "t" => true,
            "f" => false,
            other => panic!("pg_is_in_recovery() said {other:?}"),
        }
    }

    /// The server's current timeline: a primary's from the name of its
    /// current WAL file, a standby's from its WAL receiver (or, when that is
    /// not connected, from the last checkpoint).
    pub fn timeline(&self) -> u32 {
        if self.is_in_recovery() {
            let received = self.psql("select received_tli from pg_stat_wal_receiver");
            let text = if received.is_empty() {
                self.psql("select timeline_id from pg_control_checkpoint()")
            } else {
                received
            };
            text.parse()
                .unwrap_or_else(|_| panic!("timeline {text:?} on port {}", self.port))
        } else {
            let walfile = self.psql("select pg_walfile_name(pg_current_wal_lsn())");
            u32::from_str_radix(&walfile[..8.min(walfile.len())], 16)
                .unwrap_or_else(|_| panic!("WAL file name {walfile:?} on port {}", self.port))
        }
    }

    /// Waits until this standby is in recovery and its WAL receiver streams.
    pub fn wait_streaming(&self) {
        let deadline = Instant::now() + SERVER_DEADLINE;
        loop {
            let state = self.try_psql(
                "select pg_is_in_recovery()::text || ' ' || \
                 coalesce((select status from pg_stat_wal_receiver), 'none')",
            );
            if state.as_deref() == Ok("true streaming") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "standby on port {} is not streaming (recovery, receiver: {state:?}):\n{}",
                self.port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until `sql` on this server prints `want`.
    pub fn wait_psql(&self, sql: &str, want: &str) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let got = self.try_psql(sql);
            if got.as_deref() == Ok(want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "postgres on port {}: {sql:?} gave {got:?}, not {want:?}, within {DEADLINE:?}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl PgServer {
    /// Makes this server require TLS from TCP clients: copies `cert` and
    /// `key` (PEM) into the data directory (owned by the server user, key
    /// mode 0600, as PostgreSQL insists), sets `ssl = on`, replaces
    /// `pg_hba.conf` so that loopback TCP connections, normal and
    /// replication, are accepted only over TLS (`hostssl ... trust`) and
    /// rejected without it (`hostnossl ... reject`), and restarts the server.
    /// The Unix socket keeps `trust`. `try_psql` still works (libpq's default
    /// `sslmode=prefer` negotiates TLS without verifying).
    pub fn require_tls(&mut self, cert: &Path, key: &Path) {
        for (from, to) in [(cert, "member.crt"), (key, "member.key")] {
            let dest = self.data().join(to);
            std::fs::copy(from, &dest).unwrap_or_else(|err| {
                panic!("copy {} to {}: {err}", from.display(), dest.display())
            });
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o600))
                .expect("chmod 0600 the member's TLS file");
            if let Some((uid, gid)) = run_as() {
                std::os::unix::fs::chown(&dest, Some(uid), Some(gid))
                    .expect("chown the member's TLS file to postgres");
            }
        }
        std::fs::write(
            self.data().join("pg_hba.conf"),
            "local     all         all          trust\n\
             hostssl   all         all          127.0.0.1/32 trust\n\
             hostnossl all         all          127.0.0.1/32 reject\n\
             local     replication all          trust\n\
             hostssl   replication all          127.0.0.1/32 trust\n\
             hostnossl replication all          127.0.0.1/32 reject\n",
        )
        .expect("write pg_hba.conf");
        self.append_conf(
            "\n# portal tests: TLS required\n\
             ssl = on\n\
             ssl_cert_file = 'member.crt'\n\
             ssl_key_file = 'member.key'\n",
        );
        self.restart();
    }

    /// `pg_ctl stop -m fast`, then `start`.
    pub fn restart(&mut self) {
        if self.running {
            run(
                server_command("pg_ctl", self.root())
                    .args(["stop", "-m", "fast", "-w", "-t", "60", "-D", "data"]),
                &format!("pg_ctl stop -m fast (port {})", self.port),
            );
            self.running = false;
        }
        self.start();
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if self.running {
            let _ = server_command("pg_ctl", self.root())
                .args(["stop", "-m", "immediate", "-w", "-t", "60", "-D", "data"])
                .output();
            self.running = false;
        }
        if std::thread::panicking() {
            super::print_log_tail(&format!("postgres {}", self.port), &self.log(), 30);
        }
    }
}

/// A primary and a streaming standby of it.
pub fn primary_and_standby() -> (PgServer, PgServer) {
    let primary = PgServer::primary();
    let standby = PgServer::standby_of(&primary);
    (primary, standby)
}

// ---- portal configuration ---------------------------------------------------

/// Ports of the admin listener and the endpoints of `PgPortalConfig`.
#[derive(Debug, Clone, Copy)]
pub struct PgPorts {
    pub admin: u16,
    /// `rw`: route leader.
    pub rw: u16,
    /// `ro`: route replicas.
    pub ro: u16,
    /// `plain`: route leader, `allow_plaintext: true` (only when asked for).
    pub plain: Option<u16>,
}

/// A portal configuration with one `protocol: postgres` cluster `main`
/// whose members are named `a`, `b`, ... in the order given, endpoints `rw`
/// (leader) and `ro` (replicas), TLS from the generated certificate files,
/// and fast probes as user `postgres` (interval 200ms, fast_interval 20ms,
/// timeout 1s, rise 2, fall 2).
#[derive(Debug, Clone)]
pub struct PgPortalConfig {
    pub members: Vec<(String, u16)>,
    pub ports: PgPorts,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub hold_timeout: String,
    pub handshake_timeout: String,
    pub on_leader_change: Option<String>,
    /// `max_lag` of `ro`, as a YAML flow mapping (`{bytes: 1000}`).
    pub max_lag: Option<String>,
    pub replica_fallback: Option<String>,
    /// The cluster's `backend_tls`, as a YAML flow mapping
    /// (`{ca: /path/ca.crt, server_name: db.internal}`).
    pub backend_tls: Option<String>,
}

impl PgPortalConfig {
    pub fn new(certs: &Certs, member_ports: &[u16]) -> PgPortalConfig {
        PgPortalConfig {
            members: member_ports
                .iter()
                .enumerate()
                .map(|(i, &p)| (NAMES[i].to_string(), p))
                .collect(),
            ports: PgPorts {
                admin: free_port(),
                rw: free_port(),
                ro: free_port(),
                plain: None,
            },
            cert: certs.cert.clone(),
            key: certs.key.clone(),
            hold_timeout: "5s".into(),
            handshake_timeout: "5s".into(),
            on_leader_change: None,
            max_lag: None,
            replica_fallback: None,
            backend_tls: None,
        }
    }

    pub fn backend_tls(mut self, flow_mapping: &str) -> Self {
        self.backend_tls = Some(flow_mapping.into());
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

    pub fn on_leader_change(mut self, what: &str) -> Self {
        self.on_leader_change = Some(what.into());
        self
    }

    pub fn max_lag(mut self, flow_mapping: &str) -> Self {
        self.max_lag = Some(flow_mapping.into());
        self
    }

    pub fn replica_fallback(mut self, what: &str) -> Self {
        self.replica_fallback = Some(what.into());
        self
    }

    /// Adds the endpoint `plain` (route leader) that lets clients in without
    /// TLS.
    pub fn with_plaintext_endpoint(mut self) -> Self {
        self.ports.plain = Some(free_port());
        self
    }

    pub fn yaml(&self) -> String {
        let mut y = format!(
            "admin:\n  listen: 127.0.0.1:{}\n\nshutdown:\n  drain_timeout: 5s\n\n\
             clusters:\n  - name: main\n    protocol: postgres\n    probe:\n      \
             interval: 200ms\n      fast_interval: 20ms\n      timeout: 1s\n      \
             rise: 2\n      fall: 2\n      username: postgres\n      dbname: postgres\n",
            self.ports.admin
        );
        if let Some(tls) = &self.backend_tls {
            y.push_str(&format!("    backend_tls: {tls}\n"));
        }
        y.push_str("    members:\n");
        for (name, port) in &self.members {
            y.push_str(&format!(
                "      - name: {name}\n        address: 127.0.0.1:{port}\n"
            ));
        }
        y.push_str("    endpoints:\n");
        let mut endpoints = vec![
            ("rw", self.ports.rw, "leader"),
            ("ro", self.ports.ro, "replicas"),
        ];
        if let Some(plain) = self.ports.plain {
            endpoints.push(("plain", plain, "leader"));
        }
        for (name, port, route) in endpoints {
            y.push_str(&format!(
                "      - name: {name}\n        listen: 127.0.0.1:{port}\n        route: {route}\n        \
                 tls:\n          cert: {}\n          key: {}\n        hold_timeout: {}\n        \
                 handshake_timeout: {}\n",
                self.cert.display(),
                self.key.display(),
                self.hold_timeout,
                self.handshake_timeout,
            ));
            if let Some(what) = &self.on_leader_change {
                y.push_str(&format!("        on_leader_change: {what}\n"));
            }
            if name == "ro" {
                if let Some(lag) = &self.max_lag {
                    y.push_str(&format!("        max_lag: {lag}\n"));
                }
                if let Some(what) = &self.replica_fallback {
                    y.push_str(&format!("        replica_fallback: {what}\n"));
                }
            }
            if name == "plain" {
                y.push_str("        allow_plaintext: true\n");
            }
        }
        y
    }
}

// ---- tokio-postgres over rustls ---------------------------------------------

/// A `MakeTlsConnect` for tokio-postgres on tokio-rustls: verifies the
/// server's certificate chain against the given roots and its name against
/// the connection's `host` (what libpq calls `sslmode=verify-full`). No
/// channel binding.
#[derive(Clone)]
pub struct PgTls {
    config: Arc<ClientConfig>,
}

impl PgTls {
    /// TLS 1.2/1.3 trusting only `ca_file`, no ALPN (as libpq before 17).
    pub fn new(ca_file: &Path) -> PgTls {
        PgTls {
            config: default_client_config(ca_file),
        }
    }

    /// As `new`, offering ALPN `postgresql` (as libpq 17 does, and as direct
    /// TLS requires).
    pub fn with_alpn(ca_file: &Path) -> PgTls {
        PgTls {
            config: pg_client_config(ca_file, Some(b"postgresql")),
        }
    }
}

impl<S> MakeTlsConnect<S> for PgTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type TlsConnect = PgTlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> io::Result<PgTlsConnect> {
        let name = ServerName::try_from(domain.to_string())
            .map_err(|err| io::Error::new(io::ErrorKind::InvalidInput, err))?;
        Ok(PgTlsConnect {
            connector: TlsConnector::from(self.config.clone()),
            name,
        })
    }
}

/// One TLS handshake for tokio-postgres (made by `PgTls`).
pub struct PgTlsConnect {
    connector: TlsConnector,
    name: ServerName<'static>,
}

impl<S> TlsConnect<S> for PgTlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<PgTlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let tls = self.connector.connect(self.name, stream).await?;
            Ok(PgTlsStream(tls))
        })
    }
}

/// A client TLS stream as tokio-postgres wants it.
pub struct PgTlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for PgTlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for PgTlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for PgTlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

/// TLS 1.2/1.3 trusting only `ca_file`, offering `alpn` if given.
pub fn pg_client_config(ca_file: &Path, alpn: Option<&[u8]>) -> Arc<ClientConfig> {
    let mut config = (*default_client_config(ca_file)).clone();
    config.alpn_protocols = alpn.map(|p| vec![p.to_vec()]).unwrap_or_default();
    Arc::new(config)
}

/// A tokio-postgres configuration for the endpoint on `port`: host
/// `localhost` (the name the certificate is checked against) at 127.0.0.1,
/// user and database `postgres`, TLS required (via `SSLRequest`), a 10 s
/// connect timeout.
pub fn pg_config(port: u16) -> tokio_postgres::Config {
    let mut config = tokio_postgres::Config::new();
    config
        .host("localhost")
        .hostaddr([127, 0, 0, 1].into())
        .port(port)
        .user("postgres")
        .dbname("postgres")
        .ssl_mode(SslMode::Require)
        .ssl_negotiation(SslNegotiation::Postgres)
        .connect_timeout(Duration::from_secs(10));
    config
}

/// Connects with `config` and `tls`, drives the connection on a task, and
/// returns the client. Panics if the attempt neither succeeds nor fails
/// within 30 s.
pub async fn pg_connect_with<T>(
    config: &tokio_postgres::Config,
    tls: T,
) -> Result<Client, tokio_postgres::Error>
where
    T: MakeTlsConnect<tokio_postgres::Socket> + Send + 'static,
    T::TlsConnect: Send,
    T::Stream: Send + 'static,
    <T::TlsConnect as TlsConnect<tokio_postgres::Socket>>::Future: Send,
{
    let limit = Duration::from_secs(30);
    let (client, connection) = tokio::time::timeout(limit, config.connect(tls))
        .await
        .unwrap_or_else(|_| panic!("tokio-postgres connect did not finish within {limit:?}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// tokio-postgres through the endpoint on `port`, TLS via `SSLRequest`,
/// verifying the portal as `localhost` against the generated CA.
pub async fn pg_connect(port: u16, certs: &Certs) -> Result<Client, tokio_postgres::Error> {
    pg_connect_with(&pg_config(port), PgTls::new(&certs.ca)).await
}

/// `pg_connect`, panicking on failure.
pub async fn pg_session(port: u16, certs: &Certs) -> Client {
    pg_connect(port, certs)
        .await
        .unwrap_or_else(|err| panic!("tokio-postgres through port {port}: {}", pg_error(&err)))
}

/// `inet_server_port()`: which member a session reached.
pub async fn server_port_of(client: &Client) -> Result<u16, tokio_postgres::Error> {
    let row = client.query_one("select inet_server_port()", &[]).await?;
    Ok(row.get::<_, i32>(0) as u16)
}

/// An error with its SQLSTATE and the whole source chain, for messages.
pub fn pg_error(err: &tokio_postgres::Error) -> String {
    let mut text = match err.code() {
        Some(code) => format!("[{}] {err}", code.code()),
        None => err.to_string(),
    };
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

/// Which member a new session through the endpoint on `port` reaches, or
/// the error as text.
pub async fn pg_reached(port: u16, certs: &Certs) -> Result<u16, String> {
    let client = pg_connect(port, certs)
        .await
        .map_err(|err| format!("connect: {}", pg_error(&err)))?;
    server_port_of(&client)
        .await
        .map_err(|err| format!("select inet_server_port(): {}", pg_error(&err)))
}

/// Polls new sessions through the endpoint on `port` until one reaches the
/// member on `want`; panics with what the last attempt saw after `DEADLINE`.
pub async fn wait_pg_reached(port: u16, certs: &Certs, want: u16) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let seen = pg_reached(port, certs).await;
        if seen == Ok(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "endpoint {port} did not reach postgres {want} within {DEADLINE:?}; last saw {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---- psql -------------------------------------------------------------------

/// What a `psql` run printed and how it ended.
#[derive(Debug)]
pub struct PsqlOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl PsqlOutput {
    pub fn success(&self) -> bool {
        self.status.success()
    }
}

/// The libpq connection string for the endpoint on `port` as a user would
/// write it: `host=localhost port=P sslmode=verify-full sslrootcert=CA
/// user=postgres dbname=postgres`.
pub fn portal_conninfo(port: u16, ca: &Path) -> String {
    format!(
        "host=localhost port={port} sslmode=verify-full sslrootcert={} \
         user=postgres dbname=postgres",
        ca.display()
    )
}

/// `psql "CONNINFO" -X -w -At -v ON_ERROR_STOP=1 -c SQL` with
/// `PGCONNECT_TIMEOUT=10` and no other `PG*` variables; killed after 60 s.
pub async fn psql(conninfo: &str, sql: &str) -> PsqlOutput {
    let mut command = Command::new(bin("psql"));
    clear_pg_env(&mut command);
    command
        .arg(conninfo)
        .args(["-X", "-w", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .env("PGCONNECT_TIMEOUT", "10")
        .stdin(Stdio::null());
    let mut command = tokio::process::Command::from(command);
    command.kill_on_drop(true);
    let limit = Duration::from_secs(60);
    let out = tokio::time::timeout(limit, command.output())
        .await
        .unwrap_or_else(|_| panic!("psql {conninfo:?} -c {sql:?} did not finish in {limit:?}"))
        .expect("run psql");
    PsqlOutput {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).trim().to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    }
}

/// The version line of the `psql` the tests use
/// (`psql (PostgreSQL) 15.x ...`) and its major version.
pub fn psql_version() -> (String, u32) {
    let out = run(Command::new(bin("psql")).arg("--version"), "psql --version");
    let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let major = line
        .split_whitespace()
        .nth(2)
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("no version in {line:?}"));
    (line, major)
}

// ---- the wire protocol by hand ------------------------------------------------

/// `CancelRequest` code (1234.5678).
pub const CANCEL_REQUEST_CODE: u32 = 80_877_102;
/// `SSLRequest` code (1234.5679).
pub const SSL_REQUEST_CODE: u32 = 80_877_103;
/// `GSSENCRequest` code (1234.5680).
pub const GSSENC_REQUEST_CODE: u32 = 80_877_104;
/// Protocol 3.0, the code of a `StartupMessage`.
pub const PROTOCOL_3_0: u32 = 196_608;

/// A length-prefixed opening message (no type byte): `code` and `body`.
pub fn opening(code: u32, body: &[u8]) -> Vec<u8> {
    let mut out = ((8 + body.len()) as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(body);
    out
}

pub fn ssl_request() -> Vec<u8> {
    opening(SSL_REQUEST_CODE, &[])
}

pub fn gssenc_request() -> Vec<u8> {
    opening(GSSENC_REQUEST_CODE, &[])
}

pub fn cancel_request(pid: i32, key: i32) -> Vec<u8> {
    let mut body = pid.to_be_bytes().to_vec();
    body.extend_from_slice(&key.to_be_bytes());
    opening(CANCEL_REQUEST_CODE, &body)
}

/// A protocol 3.0 `StartupMessage` for `user` on `database`.
pub fn startup_message(user: &str, database: &str) -> Vec<u8> {
    let mut body = Vec::new();
    for (k, v) in [("user", user), ("database", database)] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    opening(PROTOCOL_3_0, &body)
}

/// A frontend message with a type byte (`Q`uery, `X` Terminate, ...).
pub fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&((4 + body.len()) as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// A simple-query message.
pub fn query_message(sql: &str) -> Vec<u8> {
    let mut body = sql.as_bytes().to_vec();
    body.push(0);
    message(b'Q', &body)
}

/// The fields of an `ErrorResponse` or `NoticeResponse`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorFields(pub HashMap<char, String>);

impl ErrorFields {
    pub fn parse(body: &[u8]) -> ErrorFields {
        let mut fields = HashMap::new();
        let mut rest = body;
        while let Some((&kind, after)) = rest.split_first() {
            if kind == 0 {
                break;
            }
            let end = after.iter().position(|&b| b == 0).unwrap_or(after.len());
            fields.insert(
                kind as char,
                String::from_utf8_lossy(&after[..end]).into_owned(),
            );
            rest = after.get(end + 1..).unwrap_or(&[]);
        }
        ErrorFields(fields)
    }

    /// SQLSTATE (`C`).
    pub fn code(&self) -> &str {
        self.0.get(&'C').map_or("", String::as_str)
    }

    /// The primary message (`M`).
    pub fn message(&self) -> &str {
        self.0.get(&'M').map_or("", String::as_str)
    }

    /// `S`: ERROR, FATAL, ...
    pub fn severity(&self) -> &str {
        self.0.get(&'S').map_or("", String::as_str)
    }
}

impl fmt::Display for ErrorFields {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.severity(), self.code(), self.message())
    }
}

/// Reads one backend message: its type byte and body. Refuses lengths over
/// 16 MiB (a confused peer, not PostgreSQL).
pub async fn read_message<S: AsyncRead + Unpin>(stream: &mut S) -> io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    stream.read_exact(&mut head).await?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if !(4..=16 << 20).contains(&len) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("backend message {:?} with length {len}", head[0] as char),
        ));
    }
    let mut body = vec![0u8; len - 4];
    stream.read_exact(&mut body).await?;
    Ok((head[0], body))
}

/// What a raw exchange with a PostgreSQL front end can end in besides
/// success.
#[derive(Debug)]
pub enum RawError {
    Io(io::Error),
    /// An `ErrorResponse`.
    Server(ErrorFields),
    /// Something that is not what the protocol says should come.
    Protocol(String),
}

impl fmt::Display for RawError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RawError::Io(err) => write!(f, "I/O: {err}"),
            RawError::Server(fields) => write!(f, "ErrorResponse {fields}"),
            RawError::Protocol(what) => write!(f, "protocol: {what}"),
        }
    }
}

impl From<io::Error> for RawError {
    fn from(err: io::Error) -> Self {
        RawError::Io(err)
    }
}

/// A session spoken by hand over any stream (plain TCP, TLS after
/// `SSLRequest`, direct TLS): startup with `trust` authentication and
/// simple queries.
pub struct RawPg<S> {
    pub stream: S,
    /// `BackendKeyData`: process id and secret key.
    pub backend_key: Option<(i32, i32)>,
    /// `ParameterStatus` values from the startup.
    pub parameters: HashMap<String, String>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> RawPg<S> {
    /// Sends a `StartupMessage` for user and database `postgres` and reads
    /// up to `ReadyForQuery`: `AuthenticationOk`, `ParameterStatus`,
    /// `BackendKeyData`. Bounded by 20 s.
    pub async fn startup(stream: S) -> Result<RawPg<S>, RawError> {
        let mut session = RawPg {
            stream,
            backend_key: None,
            parameters: HashMap::new(),
        };
        let limit = Duration::from_secs(20);
        tokio::time::timeout(limit, session.run_startup())
            .await
            .map_err(|_| RawError::Protocol(format!("startup took over {limit:?}")))??;
        Ok(session)
    }

    async fn run_startup(&mut self) -> Result<(), RawError> {
        self.stream
            .write_all(&startup_message("postgres", "postgres"))
            .await?;
        self.stream.flush().await?;
        let mut authenticated = false;
        loop {
            let (tag, body) = read_message(&mut self.stream).await?;
            match tag {
                b'R' if body.get(..4) == Some(&[0, 0, 0, 0]) => authenticated = true,
                b'R' => {
                    return Err(RawError::Protocol(format!(
                        "authentication request {body:?} (the tests use trust)"
                    )))
                }
                b'S' => {
                    let mut parts = body.split(|&b| b == 0);
                    let name = String::from_utf8_lossy(parts.next().unwrap_or_default());
                    let value = String::from_utf8_lossy(parts.next().unwrap_or_default());
                    self.parameters
                        .insert(name.into_owned(), value.into_owned());
                }
                b'K' if body.len() >= 8 => {
                    let pid = i32::from_be_bytes(body[0..4].try_into().expect("4 bytes"));
                    let key = i32::from_be_bytes(body[4..8].try_into().expect("4 bytes"));
                    self.backend_key = Some((pid, key));
                }
                b'N' => {}
                b'E' => return Err(RawError::Server(ErrorFields::parse(&body))),
                b'Z' if authenticated => return Ok(()),
                other => {
                    return Err(RawError::Protocol(format!(
                        "unexpected {:?} during startup",
                        other as char
                    )))
                }
            }
        }
    }

    /// Sends a simple query and sends the query only; read its result with
    /// `finish_query` (so that something can happen in between).
    pub async fn send_query(&mut self, sql: &str) -> Result<(), RawError> {
        self.stream.write_all(&query_message(sql)).await?;
        self.stream.flush().await?;
        Ok(())
    }

    /// Reads a simple query's result up to `ReadyForQuery`: the rows as
    /// text, or the error. Bounded by `limit`.
    pub async fn finish_query(
        &mut self,
        limit: Duration,
    ) -> Result<Vec<Vec<Option<String>>>, RawError> {
        let read = async {
            let mut rows = Vec::new();
            let mut error = None;
            loop {
                let (tag, body) = read_message(&mut self.stream).await?;
                match tag {
                    b'D' => rows.push(data_row(&body)?),
                    b'E' => error = Some(ErrorFields::parse(&body)),
                    b'Z' => {
                        return match error {
                            Some(fields) => Err(RawError::Server(fields)),
                            None => Ok(rows),
                        }
                    }
                    _ => {}
                }
            }
        };
        tokio::time::timeout(limit, read)
            .await
            .map_err(|_| RawError::Protocol(format!("no ReadyForQuery within {limit:?}")))?
    }

    /// A simple query and its result, within 20 s.
    pub async fn query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, RawError> {
        self.send_query(sql).await?;
        self.finish_query(Duration::from_secs(20)).await
    }

    /// The first column of the first row of `sql`.
    pub async fn query_value(&mut self, sql: &str) -> Result<String, RawError> {
        let rows = self.query(sql).await?;
        rows.first()
            .and_then(|r| r.first().cloned().flatten())
            .ok_or_else(|| RawError::Protocol(format!("{sql:?} returned no value")))
    }
}

fn data_row(body: &[u8]) -> Result<Vec<Option<String>>, RawError> {
    let bad = || RawError::Protocol(format!("malformed DataRow {body:?}"));
    let count = u16::from_be_bytes(body.get(..2).ok_or_else(bad)?.try_into().expect("2 bytes"));
    let mut at = 2;
    let mut row = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let len = i32::from_be_bytes(
            body.get(at..at + 4)
                .ok_or_else(bad)?
                .try_into()
                .expect("4 bytes"),
        );
        at += 4;
        if len < 0 {
            row.push(None);
        } else {
            let value = body.get(at..at + len as usize).ok_or_else(bad)?;
            row.push(Some(String::from_utf8_lossy(value).into_owned()));
            at += len as usize;
        }
    }
    Ok(row)
}

/// TCP to `127.0.0.1:port`, `SSLRequest`, expects `S`, then the TLS
/// handshake with `config`, validating the server as `localhost`. Bounded by
/// 10 s.
pub async fn ssl_request_connect(port: u16, config: Arc<ClientConfig>) -> io::Result<Tls> {
    let attempt = async {
        let mut tcp = TcpStream::connect(("127.0.0.1", port)).await?;
        tcp.set_nodelay(true)?;
        tcp.write_all(&ssl_request()).await?;
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer).await?;
        if answer[0] != b'S' {
            return Err(io::Error::other(format!(
                "SSLRequest answered {:?}, not 'S'",
                answer[0] as char
            )));
        }
        let name = ServerName::try_from("localhost").expect("server name");
        TlsConnector::from(config).connect(name, tcp).await
    };
    tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .unwrap_or_else(|_| {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "SSLRequest + TLS timed out",
            ))
        })
}

/// A raw session through the endpoint on `port`: `SSLRequest`, TLS trusting
/// the generated CA, startup. Panics on failure.
pub async fn raw_session(port: u16, certs: &Certs) -> RawPg<Tls> {
    let tls = ssl_request_connect(port, default_client_config(&certs.ca))
        .await
        .unwrap_or_else(|err| panic!("SSLRequest + TLS to port {port}: {err}"));
    RawPg::startup(tls)
        .await
        .unwrap_or_else(|err| panic!("startup through port {port}: {err}"))
}

/// Reads whatever the peer sends until it closes (or `limit` passes): the
/// bytes, and whether it closed.
pub async fn read_until_close<S: AsyncRead + Unpin>(
    stream: &mut S,
    limit: Duration,
) -> (Vec<u8>, bool) {
    let mut got = Vec::new();
    let closed = tokio::time::timeout(limit, async {
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .is_ok();
    (got, closed)
}

/// The first `ErrorResponse` in `bytes` (backend messages from the start),
/// if the bytes hold a whole one.
pub fn error_response_in(bytes: &[u8]) -> Option<ErrorFields> {
    let mut at = 0;
    while bytes.len() >= at + 5 {
        let len = u32::from_be_bytes(bytes[at + 1..at + 5].try_into().expect("4 bytes")) as usize;
        let end = at + 1 + len;
        if len < 4 || end > bytes.len() {
            return None;
        }
        if bytes[at] == b'E' {
            return Some(ErrorFields::parse(&bytes[at + 5..end]));
        }
        at = end;
    }
    None
}
