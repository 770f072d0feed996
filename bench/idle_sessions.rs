//! Opens N idle TLS sessions through a Redis proxy and holds them.
//!
//! Each session: TCP connect, TLS handshake (the bench CA, SNI and name
//! check `--sni`), one `PING` answered by `+PONG`; then it sits idle. At most
//! `--concurrency` sessions are in their opening at a time, and each opening
//! has `--timeout-ms` to finish (a proxy that stops accepting leaves the
//! connection in the listen backlog, unanswered).
//!
//! Once every opening has finished it prints one JSON line (`ok`, `failed`,
//! the errors by kind) and holds the sessions that succeeded until it gets
//! SIGUSR1, SIGTERM or SIGINT. Then it sends one more `PING` on each held
//! session and prints a second JSON line with how many still answered
//! (`alive`), i.e. were held by the proxy through the idle period, and exits.
//!
//! Raises its own soft RLIMIT_NOFILE to the hard limit (one descriptor per
//! session).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use clap::Parser;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::Semaphore;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

#[derive(Parser, Debug)]
#[command(about = "Open N idle TLS sessions (handshake + PING) through a proxy and hold them")]
struct Args {
    /// Proxy TLS endpoint, host:port.
    #[arg(long)]
    addr: SocketAddr,
    /// CA certificate (PEM) that signed the proxy's certificate.
    #[arg(long)]
    ca: PathBuf,
    /// TLS server name sent as SNI and verified against the certificate.
    #[arg(long, default_value = "localhost")]
    sni: String,
    /// Sessions to open.
    #[arg(long)]
    n: usize,
    /// Sessions in their opening (connect, handshake, PING) at a time.
    #[arg(long, default_value_t = 100)]
    concurrency: usize,
    /// Deadline of one session's opening, in ms.
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
    /// Free-form label copied into the JSON lines.
    #[arg(long, default_value = "")]
    label: String,
}

type Session = TlsStream<TcpStream>;

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
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    // Every session does a full handshake, as N distinct clients would.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// `PING` on an open session; Ok when `+PONG` comes back.
async fn ping(s: &mut Session) -> Result<(), String> {
    s.write_all(b"PING\r\n")
        .await
        .map_err(|e| format!("ping write: {}", e.kind()))?;
    s.flush()
        .await
        .map_err(|e| format!("ping write: {}", e.kind()))?;
    let mut buf = [0u8; 7];
    let mut got = 0;
    while got < buf.len() {
        match s.read(&mut buf[got..]).await {
            Ok(0) => return Err("ping: closed by peer".into()),
            Ok(k) => got += k,
            Err(e) => return Err(format!("ping read: {}", e.kind())),
        }
    }
    if &buf == b"+PONG\r\n" {
        Ok(())
    } else {
        Err(format!(
            "ping: unexpected reply {:?}",
            String::from_utf8_lossy(&buf)
        ))
    }
}

async fn open(
    addr: SocketAddr,
    tls: TlsConnector,
    name: ServerName<'static>,
) -> Result<Session, String> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {}", e.kind()))?;
    let mut s = tls.connect(name, tcp).await.map_err(|e| {
        // rustls errors (bad certificate, ...) keep their text; I/O errors their kind.
        match e.get_ref() {
            Some(inner) => format!("handshake: {inner}"),
            None => format!("handshake: {}", e.kind()),
        }
    })?;
    ping(&mut s).await?;
    Ok(s)
}

fn json_errors(errors: &BTreeMap<String, usize>) -> String {
    let items: Vec<String> = errors
        .iter()
        .map(|(k, v)| format!("{}:{}", serde_json::Value::String(k.clone()), v))
        .collect();
    format!("{{{}}}", items.join(","))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let nofile = rlimit::increase_nofile_limit(u64::MAX).context("raising RLIMIT_NOFILE")?;
    let tls = tls_connector(&args.ca)?;
    let name = ServerName::try_from(args.sni.clone()).map_err(|e| anyhow!("--sni: {e}"))?;
    // Registered before the first session opens, so an early stop is not lost.
    let mut usr1 = signal(SignalKind::user_defined1())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;

    let start = Instant::now();
    let limit = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let deadline = Duration::from_millis(args.timeout_ms);
    let mut tasks = Vec::with_capacity(args.n);
    for _ in 0..args.n {
        let permit = limit.clone().acquire_owned().await?;
        let (tls, name) = (tls.clone(), name.clone());
        let addr = args.addr;
        tasks.push(tokio::spawn(async move {
            let r = match tokio::time::timeout(deadline, open(addr, tls, name)).await {
                Ok(r) => r,
                Err(_) => Err("timeout (connect, handshake or PING)".to_string()),
            };
            drop(permit);
            r
        }));
    }
    let mut held = Vec::with_capacity(args.n);
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    for t in tasks {
        match t.await? {
            Ok(s) => held.push(s),
            Err(e) => *errors.entry(e).or_default() += 1,
        }
    }
    let open_ms = start.elapsed().as_secs_f64() * 1e3;
    println!(
        "{{\"label\":{},\"n\":{},\"ok\":{},\"failed\":{},\"open_ms\":{:.0},\"nofile\":{},\"errors\":{}}}",
        serde_json::Value::String(args.label.clone()),
        args.n,
        held.len(),
        args.n - held.len(),
        open_ms,
        nofile,
        json_errors(&errors)
    );
    std::io::stdout().flush()?;

    tokio::select! {
        _ = usr1.recv() => {}
        _ = term.recv() => {}
        _ = int.recv() => {}
    }

    // Were they held all along? One more PING each, a bounded number at a time.
    let held_n = held.len();
    let mut checks = Vec::with_capacity(held_n);
    for mut s in held {
        let permit = limit.clone().acquire_owned().await?;
        checks.push(tokio::spawn(async move {
            let r = tokio::time::timeout(deadline, ping(&mut s)).await;
            drop(permit);
            let _ = s.shutdown().await;
            matches!(r, Ok(Ok(())))
        }));
    }
    let mut alive = 0usize;
    for c in checks {
        if c.await? {
            alive += 1;
        }
    }
    println!(
        "{{\"label\":{},\"held\":{},\"alive\":{}}}",
        serde_json::Value::String(args.label),
        held_n,
        alive
    );
    Ok(())
}
