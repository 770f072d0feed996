//! Probes: one task per member, speaking the member's own protocol, turning
//! what it sees into a [`Report`] for the view. A probe never decides who
//! leads.

pub mod etcd;
pub mod patroni;
pub mod postgres;
pub mod redis;

use std::future::Future;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use prometheus::{Histogram, IntCounter};
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::config::ProbeSettings;
use crate::metrics::Metrics;
use crate::roster::{MemberEntry, Roster};
use crate::view::{MemberId, Outcome, Report};

/// One protocol's way of asking a member what it is.
pub trait Prober: Send {
    /// Probes once (connecting first if needed); returns the outcome and,
    /// on success, how long it took.
    fn probe(
        &mut self,
        ctx: &ProbeContext,
    ) -> impl Future<Output = (Outcome, Option<Duration>)> + Send;

    /// Resolves when the persistent connection drops; pending when there is
    /// no connection to watch.
    fn disconnected(&mut self) -> impl Future<Output = ()> + Send;

    /// Drops the persistent connection, so the next probe opens (and
    /// verifies) a fresh one.
    fn reconnect(&mut self);
}

/// A failed probe, before it becomes an [`Outcome`].
#[derive(Debug)]
pub struct Failure {
    pub hard: bool,
    pub error: String,
}

impl Failure {
    pub fn hard(error: impl Into<String>) -> Failure {
        Failure {
            hard: true,
            error: error.into(),
        }
    }

    pub fn soft(error: impl Into<String>) -> Failure {
        Failure {
            hard: false,
            error: error.into(),
        }
    }

    pub fn outcome(self) -> Outcome {
        Outcome::Failed {
            hard: self.hard,
            error: self.error,
        }
    }
}

/// Refused or reset means the member is not there: a hard failure. Anything
/// else (a timeout, a full table) may pass.
pub fn classify_io(err: &std::io::Error) -> Failure {
    use std::io::ErrorKind as K;
    match err.kind() {
        K::ConnectionRefused
        | K::ConnectionReset
        | K::ConnectionAborted
        | K::BrokenPipe
        | K::UnexpectedEof
        | K::NotConnected => Failure::hard(err.to_string()),
        _ => Failure::soft(err.to_string()),
    }
}

/// A member's address as written, and what it resolved to when learned:
/// to recognise the member when a replica names its upstream.
#[derive(Debug, Clone)]
pub struct KnownAddress {
    pub configured: String,
    pub resolved: Vec<SocketAddr>,
}

impl KnownAddress {
    /// Resolves now, blocking: for the configuration, read before the
    /// runtime serves anyone.
    pub fn resolve(configured: &str) -> KnownAddress {
        KnownAddress {
            configured: configured.to_string(),
            resolved: configured
                .to_socket_addrs()
                .map(|addrs| addrs.collect())
                .unwrap_or_default(),
        }
    }

    /// Not resolved: for an address that will only be compared as text.
    pub fn unresolved(configured: &str) -> KnownAddress {
        KnownAddress {
            configured: configured.to_string(),
            resolved: Vec::new(),
        }
    }

    /// Resolves on the runtime: for addresses learned while serving.
    pub async fn lookup(configured: &str) -> KnownAddress {
        KnownAddress {
            configured: configured.to_string(),
            resolved: tokio::net::lookup_host(configured)
                .await
                .map(|addrs| addrs.collect())
                .unwrap_or_default(),
        }
    }
}

/// Everything one probe task needs to know.
pub struct ProbeContext {
    pub cluster: Arc<str>,
    pub member: MemberId,
    pub name: String,
    pub address: String,
    /// The roster entry's generation, stamped on every report.
    pub generation: u64,
    pub settings: ProbeSettings,
    pub roster: Arc<Roster>,
    pub duration: Histogram,
    pub hard_failures: IntCounter,
    pub soft_failures: IntCounter,
}

impl ProbeContext {
    pub fn new(
        cluster: Arc<str>,
        member: MemberId,
        entry: &MemberEntry,
        settings: ProbeSettings,
        roster: Arc<Roster>,
        metrics: &Metrics,
    ) -> ProbeContext {
        let name = entry.name.as_str();
        let labels = [&*cluster, name];
        ProbeContext {
            duration: metrics.probe_duration.with_label_values(&labels),
            hard_failures: metrics
                .probe_failures
                .with_label_values(&[&*cluster, name, "hard"]),
            soft_failures: metrics
                .probe_failures
                .with_label_values(&[&*cluster, name, "soft"]),
            cluster,
            member,
            name: name.to_string(),
            address: entry.address.clone(),
            generation: entry.generation,
            settings,
            roster,
        }
    }

    /// The member listening at `host:port`, as a replica names its upstream.
    pub fn member_at(&self, host: &str, port: u16) -> Option<MemberId> {
        self.roster.member_at(host, port)
    }
}

/// Runs one member's probe until `cancel`: probe, report, wait `interval`
/// (or `fast_interval` while `urgent`), or probe again at once when poked or
/// when the connection drops.
///
/// The probe's connection is replaced by a fresh one every
/// `reconnect_interval`, and when the data path suspects the member (a new
/// connection to it failed; at most once per `interval`): a member
/// that accepts no new connection, or whose certificate stopped verifying,
/// must not stay up on the strength of one old connection.
pub async fn run<P: Prober>(
    mut prober: P,
    ctx: ProbeContext,
    reports: mpsc::Sender<Report>,
    mut urgent: watch::Receiver<bool>,
    poke: Arc<Notify>,
    cancel: CancellationToken,
) {
    let reconnect_every = ctx.settings.reconnect_interval;
    let mut connected_at = tokio::time::Instant::now();
    loop {
        if !reconnect_every.is_zero() && connected_at.elapsed() >= reconnect_every {
            prober.reconnect();
            connected_at = tokio::time::Instant::now();
        }
        let (outcome, took) = tokio::select! {
            result = prober.probe(&ctx) => result,
            _ = cancel.cancelled() => return,
        };
        match (&outcome, took) {
            (Outcome::Observed(_), Some(took)) => ctx.duration.observe(took.as_secs_f64()),
            (Outcome::Failed { hard: true, error }, _) => {
                ctx.hard_failures.inc();
                tracing::debug!(cluster = %ctx.cluster, member = %ctx.name, error = %error, "probe failed (hard)");
            }
            (Outcome::Failed { hard: false, error }, _) => {
                ctx.soft_failures.inc();
                tracing::debug!(cluster = %ctx.cluster, member = %ctx.name, error = %error, "probe failed");
            }
            _ => {}
        }
        let report = Report {
            member: ctx.member,
            generation: ctx.generation,
            at: std::time::SystemTime::now(),
            outcome,
        };
        if reports.send(report).await.is_err() {
            return;
        }
        let period = if *urgent.borrow_and_update() {
            ctx.settings.fast_interval
        } else {
            ctx.settings.interval
        };
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = poke.notified() => {}
            Ok(()) = urgent.changed() => {}
            _ = prober.disconnected() => {
                tracing::debug!(cluster = %ctx.cluster, member = %ctx.name, "probe connection dropped; probing again now");
            }
            _ = ctx.roster.suspected(ctx.member) => {
                if connected_at.elapsed() >= ctx.settings.interval {
                    tracing::debug!(cluster = %ctx.cluster, member = %ctx.name, "a new connection to the member failed; probing it over a fresh one");
                    prober.reconnect();
                    connected_at = tokio::time::Instant::now();
                }
            }
            _ = cancel.cancelled() => return,
        }
    }
}
