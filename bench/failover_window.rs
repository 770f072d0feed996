//! Write-unavailability window of a leader-aware Redis proxy on failover.
//!
//! A writer task sends `SET <key> <counter>` through the proxy over TLS in a
//! tight loop, reconnecting after any error with a small backoff. Once it has
//! written steadily for `--warmup-ms`, the main task SIGKILLs the primary,
//! T0 being the instant it is seen dead in /proc, and at once sends
//! `REPLICAOF NO ONE` to the replica over plaintext (acknowledged at Tp).
//! T1 is the acknowledgement time of the first SET, sent through the proxy,
//! that is proven to have landed on the new primary: after the +OK the
//! writer asks `INFO server` on the same connection (a proxy never moves a
//! live session to another member), and the reported `tcp_port` must be the
//! replica's. At the end the key is read back directly from the new primary
//! as a second check.
//!
//! Prints one JSON line: window_ms = T1 - T0, endpoint_lag_ms = T1 - Tp.
//! Exits non-zero if no write reaches the new primary within `--timeout-s`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufStream};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_rustls::TlsConnector;

#[derive(Parser, Debug)]
#[command(about = "Measure the write-unavailability window of a Redis proxy on failover")]
struct Args {
    /// Proxy TLS endpoint (leader route), host:port.
    #[arg(long)]
    proxy: SocketAddr,
    /// CA certificate (PEM) that signed the proxy's certificate.
    #[arg(long)]
    ca: PathBuf,
    /// TLS server name sent as SNI and verified against the certificate.
    #[arg(long, default_value = "localhost")]
    sni: String,
    /// Pid of the current primary redis-server; it receives SIGKILL at T0.
    #[arg(long)]
    primary_pid: u32,
    /// Replica to promote, reached directly over plaintext, host:port.
    #[arg(long)]
    replica: SocketAddr,
    /// Key written by the loop.
    #[arg(long, default_value = "failover:k")]
    key: String,
    /// Steady writing through the proxy before the kill, in ms.
    #[arg(long, default_value_t = 1000)]
    warmup_ms: u64,
    /// Pause after a failed connect or command before reconnecting, in ms.
    #[arg(long, default_value_t = 2)]
    backoff_ms: u64,
    /// Deadline of one connect, handshake or command; on expiry the writer reconnects.
    #[arg(long, default_value_t = 5000)]
    op_timeout_ms: u64,
    /// Give up if no write reaches the new primary this long after T0.
    #[arg(long, default_value_t = 30)]
    timeout_s: u64,
    /// Free-form label copied into the JSON line (e.g. the proxy name).
    #[arg(long, default_value = "")]
    label: String,
}

/// A Redis reply, reduced to what this program needs.
enum Reply {
    Simple(String),
    Error(String),
    Bulk(Option<Vec<u8>>),
    /// An integer or array reply, kept only for error messages.
    Other(String),
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reply::Simple(s) => write!(f, "+{s}"),
            Reply::Error(e) => write!(f, "-{e}"),
            Reply::Bulk(None) => write!(f, "(nil)"),
            Reply::Bulk(Some(b)) => write!(f, "{:?}", String::from_utf8_lossy(b)),
            Reply::Other(o) => write!(f, "{o}"),
        }
    }
}

/// Writes one command as a RESP array of bulk strings.
async fn send_command<S: AsyncWrite + Unpin>(stream: &mut S, args: &[&[u8]]) -> Result<()> {
    let mut buf = Vec::with_capacity(64);
    buf.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for arg in args {
        buf.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        buf.extend_from_slice(arg);
        buf.extend_from_slice(b"\r\n");
    }
    stream.write_all(&buf).await?;
    stream.flush().await?;
    Ok(())
}

async fn read_line<S: AsyncRead + AsyncBufReadExt + Unpin>(stream: &mut S) -> Result<String> {
    let mut line = String::new();
    let n = stream.read_line(&mut line).await?;
    if n == 0 {
        bail!("connection closed by peer");
    }
    let line = line
        .strip_suffix("\r\n")
        .ok_or_else(|| anyhow!("malformed reply line {line:?}"))?;
    Ok(line.to_owned())
}

async fn read_reply<S: AsyncRead + AsyncBufReadExt + Unpin>(stream: &mut S) -> Result<Reply> {
    let line = read_line(stream).await?;
    let (kind, rest) = line
        .split_at_checked(1)
        .ok_or_else(|| anyhow!("empty reply line"))?;
    match kind {
        "+" => Ok(Reply::Simple(rest.to_owned())),
        "-" => Ok(Reply::Error(rest.to_owned())),
        ":" => Ok(Reply::Other(line)),
        "$" => {
            let len: i64 = rest.parse().context("bulk length")?;
            if len < 0 {
                return Ok(Reply::Bulk(None));
            }
            let len = usize::try_from(len).context("bulk length")?;
            let mut data = vec![0u8; len + 2];
            stream.read_exact(&mut data).await?;
            data.truncate(len);
            Ok(Reply::Bulk(Some(data)))
        }
        "*" => {
            let len: i64 = rest.parse().context("array length")?;
            let mut items = Vec::new();
            for _ in 0..len.max(0) {
                items.push(Box::pin(read_reply(stream)).await?);
            }
            Ok(Reply::Other(format!("array of {} replies", items.len())))
        }
        other => bail!("unexpected reply type {other}"),
    }
}

async fn command<S>(stream: &mut S, args: &[&[u8]]) -> Result<Reply>
where
    S: AsyncRead + AsyncWrite + AsyncBufReadExt + Unpin,
{
    send_command(stream, args).await?;
    read_reply(stream).await
}

fn expect_ok(reply: Reply) -> Result<()> {
    match reply {
        Reply::Simple(s) if s == "OK" => Ok(()),
        Reply::Error(e) => bail!("error reply: {e}"),
        other => bail!("expected +OK, got {other}"),
    }
}

/// Extracts `tcp_port` from an `INFO server` reply.
fn tcp_port(reply: Reply) -> Result<u16> {
    let Reply::Bulk(Some(body)) = reply else {
        bail!("INFO server: unexpected reply {reply}");
    };
    let body = String::from_utf8_lossy(&body);
    body.lines()
        .find_map(|l| l.strip_prefix("tcp_port:"))
        .ok_or_else(|| anyhow!("INFO server: no tcp_port field"))?
        .trim()
        .parse()
        .context("INFO server: tcp_port")
}

fn tls_connector(ca: &std::path::Path) -> Result<TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in
        CertificateDer::pem_file_iter(ca).with_context(|| format!("reading {}", ca.display()))?
    {
        roots
            .add(cert.with_context(|| format!("parsing {}", ca.display()))?)
            .context("adding CA certificate")?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// Shared between the writer and the coordinator.
struct Shared {
    /// When the kill was ordered; acknowledgements before it are pre-failover.
    kill_ordered: OnceLock<Instant>,
    writes_acked: AtomicU64,
    connects: AtomicU64,
    connects_after_kill: AtomicU64,
    errors_after_kill: AtomicU64,
}

/// The first write proven to have landed on the new primary.
struct Landed {
    acked_at: Instant,
    counter: u64,
}

struct Writer {
    args: Arc<Args>,
    connector: TlsConnector,
    server_name: ServerName<'static>,
    shared: Arc<Shared>,
}

impl Writer {
    /// Loops until a write acknowledged after the kill is confirmed on the replica's port.
    async fn run(self) -> Landed {
        let backoff = Duration::from_millis(self.args.backoff_ms);
        let mut counter = 0u64;
        loop {
            match self.session(&mut counter).await {
                Ok(landed) => return landed,
                Err(_) => {
                    if self.shared.kill_ordered.get().is_some() {
                        self.shared
                            .errors_after_kill
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
        if self.shared.kill_ordered.get().is_some() {
            self.shared
                .connects_after_kill
                .fetch_add(1, Ordering::Relaxed);
        }
        let tcp = tokio::time::timeout(op, TcpStream::connect(self.args.proxy))
            .await
            .context("connect timeout")??;
        tcp.set_nodelay(true)?;
        let tls = tokio::time::timeout(op, self.connector.connect(self.server_name.clone(), tcp))
            .await
            .context("handshake timeout")??;
        let mut conn = BufStream::new(tls);
        let key = self.args.key.as_bytes();
        let replica_port = self.args.replica.port();
        // The member behind this session, learnt once per connection.
        let mut backend_port: Option<u16> = None;
        loop {
            *counter += 1;
            let value = counter.to_string();
            let reply =
                tokio::time::timeout(op, command(&mut conn, &[b"SET", key, value.as_bytes()]))
                    .await
                    .context("SET timeout")??;
            expect_ok(reply)?;
            let acked_at = Instant::now();
            self.shared.writes_acked.fetch_add(1, Ordering::Relaxed);
            let Some(ordered) = self.shared.kill_ordered.get() else {
                continue;
            };
            if acked_at <= *ordered {
                continue;
            }
            let port = match backend_port {
                Some(p) => p,
                None => {
                    let reply = tokio::time::timeout(op, command(&mut conn, &[b"INFO", b"server"]))
                        .await
                        .context("INFO timeout")??;
                    let p = tcp_port(reply)?;
                    backend_port = Some(p);
                    p
                }
            };
            if port == replica_port {
                return Ok(Landed {
                    acked_at,
                    counter: *counter,
                });
            }
        }
    }
}

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
            bail!("pid {pid} still alive {limit:?} after SIGKILL");
        }
        tokio::task::yield_now().await;
    }
}

async fn plain_connect(addr: SocketAddr) -> Result<BufStream<TcpStream>> {
    let tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    tcp.set_nodelay(true)?;
    Ok(BufStream::new(tcp))
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Arc::new(Args::parse());
    let connector = tls_connector(&args.ca)?;
    let server_name =
        ServerName::try_from(args.sni.clone()).context("--sni is not a valid server name")?;
    let shared = Arc::new(Shared {
        kill_ordered: OnceLock::new(),
        writes_acked: AtomicU64::new(0),
        connects: AtomicU64::new(0),
        connects_after_kill: AtomicU64::new(0),
        errors_after_kill: AtomicU64::new(0),
    });

    // Open the promotion connection before T0 so that promoting costs one round trip.
    let mut replica = plain_connect(args.replica).await?;
    match command(&mut replica, &[b"PING"]).await? {
        Reply::Simple(s) if s == "PONG" => {}
        other => bail!("replica PING: {other}"),
    }

    // A shell blocked on `read`, whose builtin kill runs as soon as we write a line.
    let mut killer = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(format!("read _ && kill -9 {}", args.primary_pid))
        .stdin(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("spawning the killer shell")?;
    let mut killer_go = killer.stdin.take().context("killer shell stdin")?;

    let (tx, rx) = oneshot::channel();
    let writer = Writer {
        args: Arc::clone(&args),
        connector,
        server_name,
        shared: Arc::clone(&shared),
    };
    let writer_task = tokio::spawn(async move {
        let landed = writer.run().await;
        let _ = tx.send(landed);
    });

    // Warm up: the proxy must be carrying writes before the primary dies.
    let warmup_deadline = Instant::now() + Duration::from_secs(args.timeout_s);
    while shared.writes_acked.load(Ordering::Relaxed) == 0 {
        if Instant::now() > warmup_deadline {
            writer_task.abort();
            bail!(
                "no write acknowledged through {} before the kill",
                args.proxy
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(args.warmup_ms)).await;
    let writes_before = shared.writes_acked.load(Ordering::Relaxed);
    let connects_before = shared.connects.load(Ordering::Relaxed);

    // The kill is ordered by waking an already-running shell, whose builtin
    // kill(2) follows without a process spawn. T0 is the instant the primary
    // is then seen dead in /proc (kill_ms after the order); the promotion is
    // sent right after, as an operator would.
    let ordered = Instant::now();
    let _ = shared.kill_ordered.set(ordered);
    killer_go
        .write_all(b"go\n")
        .await
        .context("signalling the killer shell")?;
    killer_go.flush().await?;
    let t0 = wait_dead(args.primary_pid, Duration::from_secs(2)).await?;
    expect_ok(command(&mut replica, &[b"REPLICAOF", b"NO", b"ONE"]).await?)
        .context("REPLICAOF NO ONE")?;
    let promoted = Instant::now();
    let status = killer
        .wait()
        .await
        .context("waiting for the killer shell")?;
    if !status.success() {
        writer_task.abort();
        bail!("kill -9 {} failed: {status}", args.primary_pid);
    }

    let landed = match tokio::time::timeout(Duration::from_secs(args.timeout_s), rx).await {
        Ok(Ok(landed)) => landed,
        Ok(Err(_)) => bail!("writer stopped without a result"),
        Err(_) => {
            writer_task.abort();
            bail!(
                "no write through {} reached the new primary within {}s of the kill",
                args.proxy,
                args.timeout_s
            );
        }
    };

    // Second, independent check: the new primary holds this write or a later one.
    let stored = match command(&mut replica, &[b"GET", args.key.as_bytes()]).await? {
        Reply::Bulk(Some(v)) => String::from_utf8_lossy(&v).parse::<u64>().ok(),
        _ => None,
    };
    let verified = stored.is_some_and(|v| v >= landed.counter);

    let line = serde_json::json!({
        "label": args.label,
        "proxy": args.proxy.to_string(),
        "window_ms": ms(landed.acked_at.saturating_duration_since(t0)),
        "endpoint_lag_ms": ms(landed.acked_at.saturating_duration_since(promoted)),
        "promote_ms": ms(promoted - t0),
        "kill_ms": ms(t0 - ordered),
        "writes_before_kill": writes_before,
        "connects_before_kill": connects_before,
        "connects_after_kill": shared.connects_after_kill.load(Ordering::Relaxed),
        "errors_after_kill": shared.errors_after_kill.load(Ordering::Relaxed),
        "landed_counter": landed.counter,
        "new_primary_value": stored,
        "verified": verified,
    });
    println!("{line}");
    if !verified {
        bail!(
            "new primary holds {stored:?}, expected >= {}",
            landed.counter
        );
    }
    Ok(())
}
