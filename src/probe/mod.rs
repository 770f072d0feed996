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

    /// Makes the next probe open (and verify) a fresh connection. The old
    /// one is kept aside only for a member that answers the new one with
    /// "no free connection slot" ([`Failure::busy`]): a primary full of
    /// clients is not down. Any other failure of the fresh connection (a
    /// certificate that no longer verifies, a timeout, a refusal) is the
    /// probe's failure, and the old connection is dropped.
    fn reconnect(&mut self);
}

/// A failed probe, before it becomes an [`Outcome`].
#[derive(Debug)]
pub struct Failure {
    pub hard: bool,
    pub error: String,
    /// The member answered, and would not take another connection (its
    /// connection slots are full): an older connection to it still says
    /// what it is.
    pub busy: bool,
}

impl Failure {
    pub fn hard(error: impl Into<String>) -> Failure {
        Failure {
            hard: true,
            error: error.into(),
            busy: false,
        }
    }

    pub fn soft(error: impl Into<String>) -> Failure {
        Failure {
            hard: false,
            error: error.into(),
            busy: false,
        }
    }

    /// The portal could not open a connection (out of file descriptors,
    /// say): no fault of the member's, so an older connection still says
    /// what it is, as with [`Failure::busy`].
    pub fn local(error: impl Into<String>) -> Failure {
        Failure::busy(format!("{} (the portal's own limit)", error.into()))
    }

    /// The member refused a new connection for want of a free slot.
    pub fn busy(error: impl Into<String>) -> Failure {
        Failure {
            hard: false,
            error: error.into(),
            busy: true,
        }
    }

    pub fn outcome(self) -> Outcome {
        Outcome::Failed {
            hard: self.hard,
            error: self.error,
        }
    }
}

/// Opens `conn` when there is none with `connect`. After a renewal
/// ([`Prober::reconnect`] put the old connection in `spare`), the old one
/// comes back only when the member answered the new one with "no free
/// slot" or the portal is out of descriptors ([`Failure::busy`]); otherwise
/// it is dropped, and any failure is the probe's.
pub async fn connect_or_keep<C>(
    ctx: &ProbeContext,
    conn: &mut Option<C>,
    spare: &mut Option<C>,
    connect: impl Future<Output = Result<C, Failure>>,
) -> Result<(), Failure> {
    if conn.is_some() {
        return Ok(());
    }
    match connect.await {
        Ok(fresh) => {
            *conn = Some(fresh);
            *spare = None;
            Ok(())
        }
        Err(failure) if failure.busy && spare.is_some() => {
            tracing::debug!(cluster = %ctx.cluster, member = %ctx.name, error = %failure.error, "no new connection to the member now; probing over the older one");
            *conn = spare.take();
            Ok(())
        }
        Err(failure) => {
            *spare = None;
            Err(failure)
        }
    }
}

/// What [`Prober::reconnect`] does with a `conn` and its `spare`.
pub fn set_aside<C>(conn: &mut Option<C>, spare: &mut Option<C>) {
    if let Some(old) = conn.take() {
        *spare = Some(old);
    }
}

/// Refused or reset means the member is not there: a hard failure. Anything
/// else (a timeout, a full table) may pass.
pub fn classify_io(err: &std::io::Error) -> Failure {
    use std::io::ErrorKind as K;
    if is_local(err) {
        return Failure::local(err.to_string());
    }
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

/// The portal itself is out of something (file descriptors, socket
/// buffers, memory): says nothing about the member.
pub fn is_local(err: &std::io::Error) -> bool {
    const ENOMEM: i32 = 12;
    const ENFILE: i32 = 23;
    const EMFILE: i32 = 24;
    const ENOBUFS: i32 = 105;
    matches!(err.raw_os_error(), Some(ENOMEM | ENFILE | EMFILE | ENOBUFS))
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
/// `reconnect_interval` (never with zero), and at the next probe after the
/// data path suspected the member (a new connection to it failed): a
/// member that accepts no new connection,
/// or whose certificate stopped verifying, must not stay up on the
/// strength of one old connection (see [`Prober::reconnect`]).
pub async fn run<P: Prober>(
    mut prober: P,
    ctx: ProbeContext,
    reports: mpsc::Sender<Report>,
    mut urgent: watch::Receiver<bool>,
    poke: Arc<Notify>,
    cancel: CancellationToken,
) {
    let reconnect_every = ctx.settings.reconnect_interval;
    let mut renewed_at = tokio::time::Instant::now();
    let mut renew = false;
    loop {
        if renew || (!reconnect_every.is_zero() && renewed_at.elapsed() >= reconnect_every) {
            prober.reconnect();
            renewed_at = tokio::time::Instant::now();
            renew = false;
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
        let next = tokio::time::Instant::now() + period;
        // Registered once for the whole wait: a poke between two turns of
        // the loop below is not missed.
        let poked = poke.notified();
        tokio::pin!(poked);
        poked.as_mut().enable();
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next) => break,
                _ = &mut poked => break,
                Ok(()) = urgent.changed() => break,
                _ = prober.disconnected() => {
                    tracing::debug!(cluster = %ctx.cluster, member = %ctx.name, "probe connection dropped; probing again now");
                    break;
                }
                _ = ctx.roster.suspected(ctx.member) => {
                    // The next probe, when it is due (not sooner: failing
                    // sessions must not speed probes up), opens a fresh
                    // connection.
                    if !renew {
                        tracing::debug!(cluster = %ctx.cluster, member = %ctx.name, "a new connection to the member failed; the next probe uses a fresh one");
                    }
                    renew = true;
                }
                _ = cancel.cancelled() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::Observation;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Counts what the loop asks of it; every probe succeeds at once.
    struct Counting {
        probes: Arc<AtomicUsize>,
        renewals: Arc<AtomicUsize>,
    }

    impl Prober for Counting {
        async fn probe(&mut self, _: &ProbeContext) -> (Outcome, Option<Duration>) {
            self.probes.fetch_add(1, Ordering::SeqCst);
            let seen = Observation {
                role: crate::view::Role::Primary,
                term: None,
                upstream: None,
                position: None,
                delay: None,
                term_floor: false,
                followers: Vec::new(),
            };
            (Outcome::Observed(seen), Some(Duration::ZERO))
        }
        async fn disconnected(&mut self) {
            std::future::pending().await
        }
        fn reconnect(&mut self) {
            self.renewals.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Runs the loop for `run_for` of (paused, virtual) time with the
    /// member suspected every `suspect_every`; returns (probes, renewals).
    async fn run_suspected(
        reconnect_interval: Duration,
        suspect_every: Option<Duration>,
        run_for: Duration,
    ) -> (usize, usize) {
        let mut config = crate::roster::tests::cluster(&[("a", "127.0.0.1:1")], None);
        config.probe.interval = Duration::from_millis(200);
        config.probe.fast_interval = Duration::from_millis(20);
        config.probe.reconnect_interval = reconnect_interval;
        let roster = Arc::new(Roster::new(&config));
        let Some(entry) = roster.get(0) else {
            panic!("member a in slot 0");
        };
        let metrics = Metrics::new();
        let ctx = ProbeContext::new(
            "main".into(),
            0,
            &entry,
            config.probe.clone(),
            roster.clone(),
            &metrics,
        );
        let (reports, mut received) = mpsc::channel(1024);
        tokio::spawn(async move { while received.recv().await.is_some() {} });
        let (_urgent_tx, urgent) = watch::channel(false);
        let cancel = CancellationToken::new();
        let (probes, renewals) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let prober = Counting {
            probes: probes.clone(),
            renewals: renewals.clone(),
        };
        let task = tokio::spawn(run(
            prober,
            ctx,
            reports,
            urgent,
            Arc::new(Notify::new()),
            cancel.clone(),
        ));
        let end = tokio::time::Instant::now() + run_for;
        while tokio::time::Instant::now() < end {
            match suspect_every {
                Some(every) => {
                    roster.suspect(0);
                    tokio::time::sleep(every).await;
                }
                None => tokio::time::sleep_until(end).await,
            }
        }
        cancel.cancel();
        let _ = task.await;
        (
            probes.load(Ordering::SeqCst),
            renewals.load(Ordering::SeqCst),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn suspicions_renew_the_connection_at_most_once_per_interval_and_do_not_speed_up_probes()
    {
        // 2 s of a session failing every 5 ms; interval 200 ms.
        let (probes, renewals) = run_suspected(
            Duration::ZERO,
            Some(Duration::from_millis(5)),
            Duration::from_secs(2),
        )
        .await;
        assert!(
            (9..=12).contains(&probes),
            "{probes} probes in 2 s at a 200 ms interval"
        );
        assert!((9..=11).contains(&renewals), "{renewals} renewals in 2 s");
    }

    #[tokio::test(start_paused = true)]
    async fn the_connection_is_renewed_every_reconnect_interval_and_never_with_zero() {
        let quiet = None;
        let (_, renewals) =
            run_suspected(Duration::from_secs(1), quiet, Duration::from_millis(5500)).await;
        assert_eq!(renewals, 5, "renewals in 5.5 s at 1 s");
        let (probes, renewals) =
            run_suspected(Duration::ZERO, quiet, Duration::from_millis(5500)).await;
        assert_eq!(renewals, 0);
        assert!(
            (27..=29).contains(&probes),
            "{probes} probes in 5.5 s at 200 ms"
        );
    }

    #[test]
    fn the_portal_out_of_descriptors_is_not_the_members_failure() {
        let emfile = std::io::Error::from_raw_os_error(24);
        assert!(is_local(&emfile));
        let failure = classify_io(&emfile);
        assert!(failure.busy && !failure.hard, "{failure:?}");
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(!is_local(&refused));
        assert!(classify_io(&refused).hard);
    }
}
