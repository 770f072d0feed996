//! Write-unavailability window of a PostgreSQL proxy on failover.
//!
//! The PostgreSQL twin of `failover_window.rs`. A writer task sends
//! `INSERT INTO <table> VALUES (<counter>) RETURNING inet_server_port()`
//! through the proxy (tokio-postgres, `SSLRequest` then TLS with rustls,
//! certificate chain and host name verified) in a tight loop, reconnecting
//! after any error with a small backoff. Once it has written steadily for
//! `--warmup-ms`, the main task wakes an already-running shell that runs
//! `--stop-command` (`pg_ctl stop -m immediate` on the primary); T0 is the
//! instant the primary's postmaster (`--primary-pid`) is seen dead in /proc.
//! At once a second already-running shell runs `--promote-command`
//! (`pg_ctl promote` on the standby), and Tp is the instant the standby,
//! polled over an already-open plaintext connection, first answers
//! `pg_is_in_recovery() = false`.
//!
//! T1 is the acknowledgement time of the first INSERT, sent through the
//! proxy after the stop was ordered, whose own result row names the
//! standby's port (`inet_server_port()` of the server that ran the INSERT).
//! At the end the table is read directly on the new primary as a second
//! check: it must hold that counter.
//!
//! Prints one JSON line: window_ms = T1 - T0, endpoint_lag_ms = T1 - Tp.
//! Exits non-zero if no write reaches the new primary within `--timeout-s`.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use rustls::pki_types::ServerName;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_postgres::config::SslMode;
use tokio_postgres::tls::NoTls;
use tokio_postgres::{Client, SimpleQueryMessage};

#[derive(Parser, Debug)]
#[command(about = "Measure the write-unavailability window of a PostgreSQL proxy on failover")]
struct Args {
    /// Proxy endpoint (leader route), host:port; the client speaks TLS after SSLRequest.
    #[arg(long)]
    proxy: SocketAddr,
    /// CA certificate (PEM) that signed the certificate the client sees.
    #[arg(long)]
    ca: PathBuf,
    /// TLS server name sent as SNI and verified against the certificate.
    #[arg(long, default_value = "localhost")]
    sni: String,
    /// Pid of the primary's postmaster; T0 is when it is gone.
    #[arg(long)]
    primary_pid: u32,
    /// Shell command that stops the primary (e.g. `pg_ctl stop -m immediate -D ...`).
    #[arg(long)]
    stop_command: String,
    /// Standby to promote, reached directly over plaintext, host:port.
    #[arg(long)]
    standby: SocketAddr,
    /// Shell command that promotes the standby (e.g. `pg_ctl promote -D ...`).
    #[arg(long)]
    promote_command: String,
    /// Table written by the loop (created through the proxy if missing).
    #[arg(long, default_value = "failover_window")]
    table: String,
    /// Steady writing through the proxy before the stop, in ms.
    #[arg(long, default_value_t = 1000)]
    warmup_ms: u64,
    /// Pause after a failed connect or statement before reconnecting, in ms.
    #[arg(long, default_value_t = 2)]
    backoff_ms: u64,
    /// Deadline of one connect (TCP, TLS, startup) or statement; on expiry the writer reconnects.
    #[arg(long, default_value_t = 5000)]
    op_timeout_ms: u64,
    /// Give up if no write reaches the new primary this long after T0.
    #[arg(long, default_value_t = 30)]
    timeout_s: u64,
    /// Free-form label copied into the JSON line (e.g. the proxy name).
    #[arg(long, default_value = "")]
    label: String,
}

#[path = "pg_tls.rs"]
mod pg_tls;
use pg_tls::{client_config, RustlsConnect};

fn pg_config(ssl: SslMode) -> tokio_postgres::Config {
    let mut config = tokio_postgres::Config::new();
    config.user("postgres").dbname("postgres").ssl_mode(ssl);
    config
}

/// TCP to `addr`, then `SSLRequest`, TLS and startup; the connection is
/// driven on its own task. The whole attempt is bounded by `limit`.
async fn connect_tls(
    addr: SocketAddr,
    tls: &RustlsConnect,
    limit: Duration,
) -> Result<(Client, tokio::task::JoinHandle<()>)> {
    let attempt = async {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let tls = RustlsConnect {
            config: Arc::clone(&tls.config),
            name: tls.name.clone(),
        };
        let (client, connection) = pg_config(SslMode::Require)
            .connect_raw(tcp, tls)
            .await
            .map_err(io::Error::other)?;
        let driver = tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok::<_, io::Error>((client, driver))
    };
    Ok(tokio::time::timeout(limit, attempt)
        .await
        .context("connect timeout")??)
}

/// Plain TCP and startup, for the direct connection to the standby.
async fn connect_plain(addr: SocketAddr) -> Result<(Client, tokio::task::JoinHandle<()>)> {
    let attempt = async {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let (client, connection) = pg_config(SslMode::Disable)
            .connect_raw(tcp, NoTls)
            .await
            .map_err(io::Error::other)?;
        let driver = tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok::<_, io::Error>((client, driver))
    };
    tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .with_context(|| format!("connect to {addr} timed out"))?
        .with_context(|| format!("connecting to {addr}"))
}

/// The first column of the first row of a simple query, as text.
async fn first_value(client: &Client, sql: &str) -> Result<Option<String>> {
    for message in client.simple_query(sql).await? {
        if let SimpleQueryMessage::Row(row) = message {
            return Ok(row.get(0).map(str::to_owned));
        }
    }
    bail!("{sql:?} returned no row")
}

// ---- the writer -------------------------------------------------------------

/// Shared between the writer and the coordinator.
struct Shared {
    /// When the stop was ordered; acknowledgements before it are pre-failover.
    stop_ordered: OnceLock<Instant>,
    writes_acked: AtomicU64,
    connects: AtomicU64,
    connects_after_stop: AtomicU64,
    errors_after_stop: AtomicU64,
}

/// The first write proven to have landed on the new primary.
struct Landed {
    acked_at: Instant,
    counter: u64,
}

struct Writer {
    args: Arc<Args>,
    tls: RustlsConnect,
    shared: Arc<Shared>,
}

impl Writer {
    /// Loops until a write acknowledged after the stop order ran on the standby's port.
    async fn run(self) -> Landed {
        let backoff = Duration::from_millis(self.args.backoff_ms);
        let mut counter = 0u64;
        loop {
            match self.session(&mut counter).await {
                Ok(landed) => return landed,
                Err(_) => {
                    if self.shared.stop_ordered.get().is_some() {
                        self.shared
                            .errors_after_stop
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    tokio::time::sleep(backoff).await;
                }
            }
        }
    }

    /// One connection: write until an error, or until a confirmed landing.
    async fn session(&self, counter: &mut u64) -> Result<Landed> {
        let op = Duration::from_millis(self.args.op_timeout_ms);
        self.shared.connects.fetch_add(1, Ordering::Relaxed);
        if self.shared.stop_ordered.get().is_some() {
            self.shared
                .connects_after_stop
                .fetch_add(1, Ordering::Relaxed);
        }
        let (client, driver) = connect_tls(self.args.proxy, &self.tls, op).await?;
        let result = self.write_loop(&client, counter, op).await;
        driver.abort();
        result
    }

    async fn write_loop(&self, client: &Client, counter: &mut u64, op: Duration) -> Result<Landed> {
        let standby_port = self.args.standby.port();
        loop {
            *counter += 1;
            let sql = format!(
                "insert into {} (v) values ({}) returning inet_server_port()",
                self.args.table, counter
            );
            let port = tokio::time::timeout(op, first_value(client, &sql))
                .await
                .context("INSERT timeout")??;
            let acked_at = Instant::now();
            self.shared.writes_acked.fetch_add(1, Ordering::Relaxed);
            let Some(ordered) = self.shared.stop_ordered.get() else {
                continue;
            };
            if acked_at <= *ordered {
                continue;
            }
            let port: u16 = port
                .ok_or_else(|| anyhow!("inet_server_port() is null (not TCP?)"))?
                .parse()
                .context("inet_server_port()")?;
            if port == standby_port {
                return Ok(Landed {
                    acked_at,
                    counter: *counter,
                });
            }
        }
    }
}

// ---- coordinator ------------------------------------------------------------

/// Polls /proc until `pid` has exited (gone, or a zombie awaiting its parent).
async fn wait_dead(pid: u32, limit: Duration) -> Result<Instant> {
    let path = format!("/proc/{pid}/stat");
    let deadline = Instant::now() + limit;
    loop {
        let now = Instant::now();
        match std::fs::read_to_string(&path) {
            Err(_) => return Ok(now),
            Ok(stat) => {
                // The state letter follows the parenthesised command name.
                let state = stat
                    .rsplit_once(") ")
                    .and_then(|(_, rest)| rest.chars().next());
                if matches!(state, Some('Z' | 'X')) {
                    return Ok(now);
                }
            }
        }
        if now > deadline {
            bail!("pid {pid} still alive {limit:?} after the stop command");
        }
        tokio::task::yield_now().await;
    }
}

/// A shell blocked on `read`, which runs `command` as soon as a line arrives.
struct Trigger {
    child: tokio::process::Child,
    go: tokio::process::ChildStdin,
}

impl Trigger {
    fn spawn(command: &str) -> Result<Trigger> {
        let mut child = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(format!("read _ && {command}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawning a shell for {command:?}"))?;
        let go = child.stdin.take().context("trigger shell stdin")?;
        Ok(Trigger { child, go })
    }

    async fn fire(&mut self) -> Result<()> {
        self.go.write_all(b"go\n").await.context("waking a shell")?;
        self.go.flush().await.context("waking a shell")?;
        Ok(())
    }

    async fn wait(mut self, what: &str) -> Result<()> {
        let status = tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .with_context(|| format!("{what} did not finish within 60 s"))??;
        if !status.success() {
            bail!("{what} failed: {status}");
        }
        Ok(())
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn valid_identifier(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Arc::new(Args::parse());
    if !valid_identifier(&args.table) {
        bail!("--table must be a lower-case SQL identifier");
    }
    let config = client_config(&args.ca)?;
    let name =
        ServerName::try_from(args.sni.clone()).context("--sni is not a valid server name")?;
    let tls = RustlsConnect { config, name };
    let shared = Arc::new(Shared {
        stop_ordered: OnceLock::new(),
        writes_acked: AtomicU64::new(0),
        connects: AtomicU64::new(0),
        connects_after_stop: AtomicU64::new(0),
        errors_after_stop: AtomicU64::new(0),
    });

    // The table, created through the proxy, must have reached the standby.
    let setup_limit = Duration::from_secs(10);
    {
        let (client, driver) = connect_tls(args.proxy, &tls, setup_limit).await?;
        let create = format!("create table if not exists {} (v bigint)", args.table);
        tokio::time::timeout(setup_limit, client.simple_query(&create))
            .await
            .context("create table timed out")??;
        driver.abort();
    }
    // Open the standby connection before T0 so that Tp is one round trip away.
    let (standby, _standby_driver) = connect_plain(args.standby).await?;
    let present = format!("select to_regclass('{}') is not null", args.table);
    let deadline = Instant::now() + Duration::from_secs(args.timeout_s);
    while first_value(&standby, &present).await?.as_deref() != Some("t") {
        if Instant::now() > deadline {
            bail!("table {} did not replicate to the standby", args.table);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if first_value(&standby, "select pg_is_in_recovery()")
        .await?
        .as_deref()
        != Some("t")
    {
        bail!("{} is not a standby", args.standby);
    }

    let mut stopper = Trigger::spawn(&args.stop_command)?;
    let mut promoter = Trigger::spawn(&args.promote_command)?;

    let (tx, rx) = oneshot::channel();
    let writer = Writer {
        args: Arc::clone(&args),
        tls: RustlsConnect {
            config: Arc::clone(&tls.config),
            name: tls.name.clone(),
        },
        shared: Arc::clone(&shared),
    };
    let writer_task = tokio::spawn(async move {
        let landed = writer.run().await;
        let _ = tx.send(landed);
    });

    // Warm up: the proxy must be carrying writes before the primary stops.
    let warmup_deadline = Instant::now() + Duration::from_secs(args.timeout_s);
    while shared.writes_acked.load(Ordering::Relaxed) == 0 {
        if Instant::now() > warmup_deadline {
            writer_task.abort();
            bail!(
                "no write acknowledged through {} before the stop",
                args.proxy
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(args.warmup_ms)).await;
    let writes_before = shared.writes_acked.load(Ordering::Relaxed);
    let connects_before = shared.connects.load(Ordering::Relaxed);

    // Stop ordered by waking a waiting shell; T0 when the postmaster is gone;
    // the promotion follows at once, by waking the other shell.
    let ordered = Instant::now();
    let _ = shared.stop_ordered.set(ordered);
    stopper.fire().await?;
    let t0 = wait_dead(args.primary_pid, Duration::from_secs(30)).await?;
    promoter.fire().await?;
    let promote_sent = Instant::now();
    let promoted = loop {
        let answer = tokio::time::timeout(
            Duration::from_secs(5),
            first_value(&standby, "select pg_is_in_recovery()"),
        )
        .await
        .context("pg_is_in_recovery() on the standby timed out")??;
        let now = Instant::now();
        if answer.as_deref() == Some("f") {
            break now;
        }
        if now > t0 + Duration::from_secs(args.timeout_s) {
            writer_task.abort();
            bail!(
                "the standby is still in recovery {}s after T0",
                args.timeout_s
            );
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    stopper.wait("the stop command").await?;
    promoter.wait("the promote command").await?;

    let landed = match tokio::time::timeout(Duration::from_secs(args.timeout_s), rx).await {
        Ok(Ok(landed)) => landed,
        Ok(Err(_)) => bail!("writer stopped without a result"),
        Err(_) => {
            writer_task.abort();
            bail!(
                "no write through {} reached the new primary within {}s of the stop",
                args.proxy,
                args.timeout_s
            );
        }
    };

    // Second, independent check: the new primary holds this write.
    let check = format!(
        "select count(*) from {} where v = {}",
        args.table, landed.counter
    );
    let stored = first_value(&standby, &check).await?;
    let verified = stored.as_deref() == Some("1");

    let line = serde_json::json!({
        "label": args.label,
        "proxy": args.proxy.to_string(),
        "window_ms": ms(landed.acked_at.saturating_duration_since(t0)),
        "endpoint_lag_ms": ms(landed.acked_at.saturating_duration_since(promoted)),
        "promote_ms": ms(promoted.saturating_duration_since(t0)),
        "promote_sent_ms": ms(promote_sent.saturating_duration_since(t0)),
        "stop_ms": ms(t0.saturating_duration_since(ordered)),
        "writes_before_stop": writes_before,
        "connects_before_stop": connects_before,
        "connects_after_stop": shared.connects_after_stop.load(Ordering::Relaxed),
        "errors_after_stop": shared.errors_after_stop.load(Ordering::Relaxed),
        "landed_counter": landed.counter,
        "verified": verified,
    });
    println!("{line}");
    if !verified {
        bail!(
            "the new primary does not hold counter {} (count {stored:?})",
            landed.counter
        );
    }
    Ok(())
}
