//! Write unavailability through PostgreSQL proxies during a Patroni switchover.
//!
//! One writer per proxy (`--proxy LABEL=HOST:PORT`, repeatable) sends
//! `INSERT INTO <table> VALUES (<counter>) RETURNING inet_server_port(),
//! pg_is_in_recovery()` in a tight loop (tokio-postgres, `SSLRequest` then
//! TLS with rustls, chain and host name verified), reconnecting after any
//! error with a small backoff. Once every writer has written steadily for
//! `--warmup-ms`, T0 is taken and an already-running shell is woken to run
//! `--command` (`patronictl switchover --leader A --candidate B --force`).
//!
//! From T0 a direct writer polls the candidate (`--candidate`, plaintext,
//! an already-open connection) every `--direct-period-ms` with the same
//! INSERT; Tp is the acknowledgement of the first one it accepts, i.e. the
//! moment the new primary accepts writes directly.
//!
//! For each proxy, T1 is the acknowledgement of the first INSERT sent
//! through it after T0 whose own result row names the candidate's port and
//! `pg_is_in_recovery() = false`. At the end the candidate is read directly:
//! it must hold every landed counter.
//!
//! Prints one JSON line: per proxy window_ms = T1 - T0 and
//! endpoint_lag_ms = T1 - Tp; promoted_ms = Tp - T0; command_ms (how long
//! patronictl ran). Exits non-zero if a proxy's writes never reach the
//! candidate within `--timeout-s`, or if the command fails.

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
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_postgres::config::SslMode;
use tokio_postgres::tls::NoTls;
use tokio_postgres::{Client, SimpleQueryMessage};

#[derive(Parser, Debug)]
#[command(
    about = "Measure write unavailability through PostgreSQL proxies during a Patroni switchover"
)]
struct Args {
    /// A proxy to write through: LABEL=HOST:PORT (repeatable); TLS after SSLRequest.
    #[arg(long = "proxy", required = true)]
    proxies: Vec<String>,
    /// CA certificate (PEM) that signed the certificate the clients see.
    #[arg(long)]
    ca: PathBuf,
    /// TLS server name sent as SNI and verified against the certificate.
    #[arg(long, default_value = "localhost")]
    sni: String,
    /// Environment variable holding the `postgres` user's password.
    #[arg(long, default_value = "BENCH_PG_PASSWORD")]
    password_env: String,
    /// The switchover candidate, reached directly over plaintext, HOST:PORT.
    #[arg(long)]
    candidate: SocketAddr,
    /// Shell command that performs the switchover; T0 is when it is started.
    #[arg(long)]
    command: String,
    /// Table written by the loops (created through the first proxy if missing).
    #[arg(long, default_value = "switchover_window")]
    table: String,
    /// Steady writing through every proxy before T0, in ms.
    #[arg(long, default_value_t = 1000)]
    warmup_ms: u64,
    /// Pause after a failed connect or statement through a proxy, in ms.
    #[arg(long, default_value_t = 5)]
    backoff_ms: u64,
    /// Period of the direct writer polling the candidate, in ms.
    #[arg(long, default_value_t = 1)]
    direct_period_ms: u64,
    /// Deadline of one connect (TCP, TLS, startup) or statement through a proxy.
    #[arg(long, default_value_t = 5000)]
    op_timeout_ms: u64,
    /// Give up if a proxy's writes do not reach the candidate this long after T0.
    #[arg(long, default_value_t = 60)]
    timeout_s: u64,
}

#[path = "pg_tls.rs"]
mod pg_tls;
use pg_tls::{client_config, RustlsConnect};

fn pg_config(ssl: SslMode, password: &str) -> tokio_postgres::Config {
    let mut config = tokio_postgres::Config::new();
    config
        .user("postgres")
        .password(password)
        .dbname("postgres")
        .ssl_mode(ssl);
    config
}

type Conn = (Client, tokio::task::JoinHandle<()>);

/// TCP to `addr`, then `SSLRequest`, TLS and startup; the connection is
/// driven on its own task. The whole attempt is bounded by `limit`.
async fn connect_tls(
    addr: SocketAddr,
    tls: &RustlsConnect,
    password: &str,
    limit: Duration,
) -> Result<Conn> {
    let attempt = async {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let tls = RustlsConnect {
            config: Arc::clone(&tls.config),
            name: tls.name.clone(),
        };
        let (client, connection) = pg_config(SslMode::Require, password)
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

/// Plain TCP and startup, for the direct connection to the candidate.
async fn connect_plain(addr: SocketAddr, password: &str) -> Result<Conn> {
    let attempt = async {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let (client, connection) = pg_config(SslMode::Disable, password)
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

/// The first row of a simple query, every column as text.
async fn first_row(client: &Client, sql: &str) -> Result<Vec<Option<String>>> {
    for message in client.simple_query(sql).await? {
        if let SimpleQueryMessage::Row(row) = message {
            return Ok((0..row.len())
                .map(|i| row.get(i).map(str::to_owned))
                .collect());
        }
    }
    bail!("{sql:?} returned no row")
}

async fn first_value(client: &Client, sql: &str) -> Result<Option<String>> {
    Ok(first_row(client, sql).await?.into_iter().next().flatten())
}

// ---- writers ----------------------------------------------------------------

/// Shared between one proxy's writer and the coordinator.
#[derive(Default)]
struct Counts {
    writes_acked: AtomicU64,
    connects_after_t0: AtomicU64,
    errors_after_t0: AtomicU64,
}

/// The first write proven to have landed on the new primary.
struct Landed {
    acked_at: Instant,
    counter: u64,
}

struct Writer {
    args: Arc<Args>,
    proxy: SocketAddr,
    /// Counters of different writers never collide: writer k writes k, k+10, ...
    base: u64,
    tls: RustlsConnect,
    password: Arc<str>,
    t0: Arc<OnceLock<Instant>>,
    counts: Arc<Counts>,
}

impl Writer {
    async fn run(self) -> Landed {
        let backoff = Duration::from_millis(self.args.backoff_ms);
        let mut counter = self.base;
        loop {
            if self.t0.get().is_some() {
                self.counts
                    .connects_after_t0
                    .fetch_add(1, Ordering::Relaxed);
            }
            match self.session(&mut counter).await {
                Ok(landed) => return landed,
                Err(_) => {
                    if self.t0.get().is_some() {
                        self.counts.errors_after_t0.fetch_add(1, Ordering::Relaxed);
                    }
                    tokio::time::sleep(backoff).await;
                }
            }
        }
    }

    async fn session(&self, counter: &mut u64) -> Result<Landed> {
        let op = Duration::from_millis(self.args.op_timeout_ms);
        let (client, driver) = connect_tls(self.proxy, &self.tls, &self.password, op).await?;
        let result = self.write_loop(&client, counter, op).await;
        driver.abort();
        result
    }

    async fn write_loop(&self, client: &Client, counter: &mut u64, op: Duration) -> Result<Landed> {
        let candidate_port = self.args.candidate.port().to_string();
        loop {
            *counter += 10;
            let sql = format!(
                "insert into {} (v) values ({}) returning inet_server_port(), pg_is_in_recovery()",
                self.args.table, counter
            );
            let row = tokio::time::timeout(op, first_row(client, &sql))
                .await
                .context("INSERT timeout")??;
            let acked_at = Instant::now();
            self.counts.writes_acked.fetch_add(1, Ordering::Relaxed);
            let Some(t0) = self.t0.get() else {
                continue;
            };
            if acked_at <= *t0 {
                continue;
            }
            let port = row.first().cloned().flatten();
            let recovery = row.get(1).cloned().flatten();
            if port.is_none() {
                bail!("inet_server_port() is null (not TCP?)");
            }
            if port.as_deref() == Some(candidate_port.as_str()) && recovery.as_deref() == Some("f")
            {
                return Ok(Landed {
                    acked_at,
                    counter: *counter,
                });
            }
        }
    }
}

/// From T0, INSERTs on the candidate directly every `period` until one is
/// accepted; returns its acknowledgement time and how many were refused.
async fn direct_writer(args: &Args, password: &str, conn: Conn) -> Result<(Instant, u64)> {
    let period = Duration::from_millis(args.direct_period_ms);
    let deadline = Instant::now() + Duration::from_secs(args.timeout_s);
    let sql = format!("insert into {} (v) values (0) returning 1", args.table);
    let mut conn = Some(conn);
    let mut refused = 0u64;
    loop {
        if Instant::now() > deadline {
            bail!(
                "the candidate accepted no write within {}s of T0",
                args.timeout_s
            );
        }
        let current = match conn.take() {
            Some(c) => c,
            None => match connect_plain(args.candidate, password).await {
                Ok(c) => c,
                Err(_) => {
                    tokio::time::sleep(period).await;
                    continue;
                }
            },
        };
        match tokio::time::timeout(Duration::from_secs(5), first_value(&current.0, &sql)).await {
            Ok(Ok(_)) => return Ok((Instant::now(), refused)),
            Ok(Err(_)) if !current.0.is_closed() => {
                refused += 1;
                conn = Some(current);
            }
            _ => {
                refused += 1;
                current.1.abort();
            }
        }
        tokio::time::sleep(period).await;
    }
}

// ---- the switchover command -------------------------------------------------

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
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
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

    /// Waits for the command; returns when it ended and what it printed.
    async fn wait(mut self) -> Result<(Instant, String)> {
        let mut out = self.child.stdout.take().context("trigger stdout")?;
        let mut err = self.child.stderr.take().context("trigger stderr")?;
        let finish = async {
            let mut text = String::new();
            let mut etext = String::new();
            let _ = out.read_to_string(&mut text).await;
            let _ = err.read_to_string(&mut etext).await;
            let status = self.child.wait().await?;
            Ok::<_, io::Error>((Instant::now(), status, text + &etext))
        };
        let (ended, status, text) = tokio::time::timeout(Duration::from_secs(120), finish)
            .await
            .context("the switchover command did not finish within 120 s")??;
        if !status.success() {
            bail!("the switchover command failed ({status}):\n{text}");
        }
        Ok((ended, text))
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

fn parse_proxy(spec: &str) -> Result<(String, SocketAddr)> {
    let (label, addr) = spec
        .split_once('=')
        .ok_or_else(|| anyhow!("--proxy {spec:?}: expected LABEL=HOST:PORT"))?;
    let addr = addr
        .parse()
        .with_context(|| format!("--proxy {spec:?}: bad address"))?;
    Ok((label.to_string(), addr))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Arc::new(Args::parse());
    if !valid_identifier(&args.table) {
        bail!("--table must be a lower-case SQL identifier");
    }
    let proxies = args
        .proxies
        .iter()
        .map(|s| parse_proxy(s))
        .collect::<Result<Vec<_>>>()?;
    let password: Arc<str> = std::env::var(&args.password_env)
        .with_context(|| format!("${} (the postgres password) is not set", args.password_env))?
        .into();
    let config = client_config(&args.ca)?;
    let name =
        ServerName::try_from(args.sni.clone()).context("--sni is not a valid server name")?;
    let tls = RustlsConnect { config, name };

    // The table, created through the first proxy, must have reached the candidate.
    let setup = Duration::from_secs(10);
    {
        let (client, driver) = connect_tls(proxies[0].1, &tls, &password, setup).await?;
        let create = format!("create table if not exists {} (v bigint)", args.table);
        tokio::time::timeout(setup, client.simple_query(&create))
            .await
            .context("create table timed out")??;
        driver.abort();
    }
    let direct = connect_plain(args.candidate, &password).await?;
    let check = connect_plain(args.candidate, &password).await?;
    let present = format!("select to_regclass('{}') is not null", args.table);
    let deadline = Instant::now() + Duration::from_secs(args.timeout_s);
    while first_value(&check.0, &present).await?.as_deref() != Some("t") {
        if Instant::now() > deadline {
            bail!("table {} did not replicate to the candidate", args.table);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if first_value(&check.0, "select pg_is_in_recovery()")
        .await?
        .as_deref()
        != Some("t")
    {
        bail!("the candidate {} is not a replica", args.candidate);
    }

    let mut trigger = Trigger::spawn(&args.command)?;
    let t0_cell = Arc::new(OnceLock::new());
    let mut writers = Vec::new();
    for (k, (label, addr)) in proxies.iter().enumerate() {
        let counts = Arc::new(Counts::default());
        let (tx, rx) = oneshot::channel();
        let writer = Writer {
            args: Arc::clone(&args),
            proxy: *addr,
            base: k as u64 + 1,
            tls: RustlsConnect {
                config: Arc::clone(&tls.config),
                name: tls.name.clone(),
            },
            password: Arc::clone(&password),
            t0: Arc::clone(&t0_cell),
            counts: Arc::clone(&counts),
        };
        let task = tokio::spawn(async move {
            let _ = tx.send(writer.run().await);
        });
        writers.push((label.clone(), counts, rx, task));
    }

    // Warm up: every proxy must be carrying writes before the switchover.
    let warmup_deadline = Instant::now() + Duration::from_secs(args.timeout_s);
    while writers
        .iter()
        .any(|(_, c, _, _)| c.writes_acked.load(Ordering::Relaxed) == 0)
    {
        if Instant::now() > warmup_deadline {
            bail!("some proxy acknowledged no write before the switchover");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(args.warmup_ms)).await;
    let before: Vec<u64> = writers
        .iter()
        .map(|(_, c, _, _)| c.writes_acked.load(Ordering::Relaxed))
        .collect();

    let t0 = Instant::now();
    let _ = t0_cell.set(t0);
    trigger.fire().await?;
    // Waited on its own task so that its end is timed while the writers run.
    let command = tokio::spawn(trigger.wait());
    let (promoted, refused) = direct_writer(&args, &password, direct).await?;

    let mut results = Vec::new();
    for (label, counts, rx, task) in writers {
        let left =
            (t0 + Duration::from_secs(args.timeout_s)).saturating_duration_since(Instant::now());
        let landed = match tokio::time::timeout(left, rx).await {
            Ok(Ok(landed)) => landed,
            Ok(Err(_)) => bail!("the writer through {label} stopped without a result"),
            Err(_) => {
                task.abort();
                bail!(
                    "no write through {label} reached the candidate within {}s of T0",
                    args.timeout_s
                );
            }
        };
        results.push((label, counts, landed));
    }
    let (ended, output) = command.await.context("the switchover command task")??;
    if !output.contains("Successfully switched over") {
        bail!("the switchover command did not report success:\n{output}");
    }

    let mut json = serde_json::Map::new();
    json.insert("candidate".into(), args.candidate.to_string().into());
    json.insert("promoted_ms".into(), ms(promoted - t0).into());
    json.insert("direct_refused".into(), refused.into());
    json.insert(
        "command_ms".into(),
        ms(ended.saturating_duration_since(t0)).into(),
    );
    let mut all_verified = true;
    for ((label, counts, landed), writes_before) in results.into_iter().zip(before) {
        let sql = format!(
            "select count(*) from {} where v = {}",
            args.table, landed.counter
        );
        let stored = first_value(&check.0, &sql).await?;
        let verified = stored.as_deref() == Some("1");
        all_verified &= verified;
        json.insert(
            label,
            serde_json::json!({
                "window_ms": ms(landed.acked_at.saturating_duration_since(t0)),
                "endpoint_lag_ms": ms(landed.acked_at.saturating_duration_since(promoted)),
                "lag_sign": if landed.acked_at >= promoted { "+" } else { "-" },
                "writes_before": writes_before,
                "connects_after_t0": counts.connects_after_t0.load(Ordering::Relaxed),
                "errors_after_t0": counts.errors_after_t0.load(Ordering::Relaxed),
                "landed_counter": landed.counter,
                "verified": verified,
            }),
        );
    }
    println!("{}", serde_json::Value::Object(json));
    if !all_verified {
        bail!("the candidate does not hold every landed counter");
    }
    Ok(())
}
