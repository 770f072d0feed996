//! The data path of one endpoint: accept, TLS handshake, route (holding while
//! there is no eligible member, connects included, for at most
//! `hold_timeout`), connect, splice; and close the session when its member
//! stops being eligible: the client-to-member direction first, at once, then,
//! for PostgreSQL, at the next backend message boundary with a `57P01`.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use prometheus::{Histogram, IntCounter, IntGauge};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admission::{Admission, Denied, Limits, OpeningTicket};
use crate::backend;
use crate::cluster::Cluster;
use crate::config::{self, OnLeaderChange, Route};
use crate::data_threads::DataThreads;
use crate::frontend::postgres::CancelKey;
use crate::frontend::session::{CloseReason, Closed, SessionHook, CLOSE_DRAIN};
use crate::frontend::{self, Accepted, Frontend, Refusal};
use crate::log_limit::LogLimit;
use crate::metrics::Metrics;
use crate::proxy_protocol::{self, HeaderError};
use crate::router;
use crate::splice::{Relayed, Splice};
use crate::stream::{Prefixed, Stream};
use crate::view::{MemberId, Snapshot};

/// Longest one connect attempt to a member may take (TCP, and TLS when
/// originated), within what is left of `hold_timeout`: a member that
/// blackholes connects must not take a long hold's whole time from the
/// other candidates, or from a leader elected meanwhile.
const CONNECT_ATTEMPT_CAP: Duration = Duration::from_secs(2);
/// Shortest connect attempt, even with less of `hold_timeout` left: a
/// loopback or LAN connect takes well under it, and an attempt cut any
/// shorter would fail on a healthy member.
const CONNECT_ATTEMPT_FLOOR: Duration = Duration::from_millis(100);
/// How long a cancel request may take to reach its member.
const CANCEL_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause before retrying a member after a connect failure the view has not
/// (yet) turned into a new snapshot.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// Counters of one endpoint, resolved once.
struct EndpointMetrics {
    accepted: IntCounter,
    active: IntGauge,
    bytes_in: IntCounter,
    bytes_out: IntCounter,
    hold: Histogram,
    closed_leader_change: IntCounter,
    closed_shutdown: IntCounter,
    closed_idle: IntCounter,
    all: Arc<Metrics>,
}

/// One configured endpoint, ready to serve.
pub struct Endpoint {
    pub config: config::Endpoint,
    pub cluster: Arc<Cluster>,
    acceptor: TlsAcceptor,
    /// Shared with the endpoint's next instance after a reload, when its
    /// limits stay the same.
    admission: Arc<Admission>,
    /// Limits the lines that refused and failed connections log.
    log_limit: LogLimit,
    /// The endpoint's own certificate (DER), to tell a PostgreSQL member
    /// that presents another one over `backend_tls` (SCRAM channel binding
    /// then fails), and the members already warned about.
    certificate: Option<Vec<u8>>,
    binding_warned: std::sync::Mutex<std::collections::HashSet<MemberId>>,
    turn: AtomicUsize,
    metrics: EndpointMetrics,
}

impl Endpoint {
    /// With `previous`, the instance of the same name this one replaces on a
    /// reload: its admission places carry over when the limits are the same
    /// (its open sessions keep counting), else they start afresh.
    pub fn new(
        config: config::Endpoint,
        cluster: Arc<Cluster>,
        tls: Arc<rustls::ServerConfig>,
        metrics: Arc<Metrics>,
        previous: Option<&Endpoint>,
    ) -> Endpoint {
        let name = config.name.as_str();
        let m = EndpointMetrics {
            accepted: metrics.connections_accepted.with_label_values(&[name]),
            active: metrics.connections_active.with_label_values(&[name]),
            bytes_in: metrics.bytes.with_label_values(&[name, "client_to_server"]),
            bytes_out: metrics.bytes.with_label_values(&[name, "server_to_client"]),
            hold: metrics.hold_seconds.with_label_values(&[name]),
            closed_leader_change: metrics
                .sessions_closed
                .with_label_values(&[name, "leader_change"]),
            closed_shutdown: metrics
                .sessions_closed
                .with_label_values(&[name, "shutdown"]),
            closed_idle: metrics
                .sessions_closed
                .with_label_values(&[name, "idle_timeout"]),
            all: metrics,
        };
        let limits = Limits {
            handshakes: config.max_handshakes,
            handshakes_per_source: config.max_handshakes_per_source,
            sessions: config.max_connections,
            sessions_per_source: config.max_connections_per_source,
        };
        let admission = match previous {
            Some(p) if p.admission.limits() == limits => p.admission.clone(),
            _ => Arc::new(Admission::new(limits)),
        };
        Endpoint {
            admission,
            log_limit: LogLimit::default(),
            certificate: endpoint_certificate(&config.tls.cert),
            binding_warned: std::sync::Mutex::default(),
            acceptor: TlsAcceptor::from(tls),
            turn: AtomicUsize::new(0),
            metrics: m,
            config,
            cluster,
        }
    }

    /// Sessions open now.
    pub fn active(&self) -> i64 {
        self.metrics.active.get()
    }

    /// Connections in their opening now.
    pub fn openings(&self) -> usize {
        self.admission.openings()
    }

    fn refused(&self, reason: &str) {
        self.metrics
            .all
            .connections_refused
            .with_label_values(&[&self.config.name, reason])
            .inc();
    }

    /// SCRAM channel binding (`tls-server-end-point`, libpq's default
    /// `channel_binding=prefer`) binds to the certificate of the TLS
    /// connection each side sees: the client the endpoint's, the member its
    /// own. They agree only when the member serves the endpoint's
    /// certificate; warns once per member when it does not.
    fn check_channel_binding(&self, cluster: &Cluster, member: MemberId, server: &Stream) {
        let (Some(theirs), Some(ours)) = (server.member_certificate(), self.certificate.as_ref())
        else {
            return;
        };
        if theirs == ours.as_slice() {
            return;
        }
        let first = self
            .binding_warned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(member);
        if first {
            tracing::warn!(
                endpoint = %self.config.name,
                member = cluster.member_name(member),
                "the member presents another TLS certificate than this endpoint: SCRAM logins with channel binding (libpq's default channel_binding=prefer) fail with \"SCRAM channel binding check failed\"; serve the endpoint's certificate on the members, or have clients set channel_binding=disable"
            );
        }
    }

    /// The client a trusted source's PROXY header names (its own address
    /// for a header that names none), or `None` when the header is missing,
    /// invalid, or not read within the opening's deadline: then the
    /// connection is dropped, counted (`portal_connections_refused_total
    /// {reason="proxy_protocol"}`) and logged (rate-limited).
    fn proxied(
        &self,
        read: Result<Result<proxy_protocol::Header, HeaderError>, tokio::time::error::Elapsed>,
        peer: SocketAddr,
    ) -> Option<SocketAddr> {
        let ep = self.config.name.as_str();
        let failed = |reason: &'static str, error: String| {
            self.refused("proxy_protocol");
            // Each kind of failure has its own budget of lines.
            let key = match reason {
                "timeout" => "proxy_protocol_timeout",
                "missing" => "proxy_protocol_missing",
                _ => "proxy_protocol_invalid",
            };
            if let Some(suppressed) = self.log_limit.admit(key) {
                tracing::info!(endpoint = ep, %peer, reason, error, suppressed, "no valid PROXY protocol header from a trusted source; connection dropped");
            }
            None
        };
        match read {
            Ok(Ok(header)) => {
                let client = header.source.unwrap_or(peer);
                tracing::debug!(endpoint = ep, peer = %client, proxy = %peer, version = header.version, "PROXY protocol header");
                Some(client)
            }
            Ok(Err(err)) => failed(err.reason(), err.to_string()),
            Err(_) => failed(
                "timeout",
                format!(
                    "no whole header within handshake_timeout ({}ms)",
                    self.config.handshake_timeout.as_millis()
                ),
            ),
        }
    }

    /// Counts and (rate-limited) logs a connection an admission limit
    /// turned away.
    fn denied(&self, denied: Denied, peer: SocketAddr) {
        let reason = denied.reason();
        self.refused(reason);
        if let Some(suppressed) = self.log_limit.admit(reason) {
            let limits = self.admission.limits();
            let limit = match denied {
                Denied::Handshakes => limits.handshakes,
                Denied::HandshakesPerSource => limits.handshakes_per_source,
                Denied::Sessions => limits.sessions,
                Denied::SessionsPerSource => limits.sessions_per_source.unwrap_or(0),
            };
            tracing::warn!(endpoint = %self.config.name, %peer, reason, limit, suppressed, "connection refused: limit reached");
        }
    }
}

/// Where an endpoint instance's sessions run: each is tracked by every
/// tracker (the process's, for shutdown; its cluster instance's and its
/// endpoint instance's, for a reload that retires either) and ends on its
/// own or at `close`.
#[derive(Clone)]
pub struct SessionTasks {
    pub all: TaskTracker,
    pub cluster: TaskTracker,
    pub endpoint: TaskTracker,
    pub close: CancellationToken,
}

/// Accepts on every data thread until `stop_accepting`, then hands the
/// listening socket back (a reload passes it to the endpoint's next
/// instance: no connection is refused). Each thread accepts on its own
/// duplicate of the socket, and a session stays on the thread that accepted
/// it (`data_threads`).
pub async fn serve(
    endpoint: Arc<Endpoint>,
    listener: std::net::TcpListener,
    threads: DataThreads,
    tasks: SessionTasks,
    stop_accepting: CancellationToken,
) -> Option<std::net::TcpListener> {
    let mut loops = Vec::with_capacity(threads.len());
    let mut listener = Some(listener);
    for (i, handle) in threads.handles().iter().enumerate() {
        // The last thread takes the socket itself, the others a duplicate.
        let socket = if i + 1 == threads.len() {
            listener.take()
        } else {
            match listener.as_ref().map(std::net::TcpListener::try_clone) {
                Some(Ok(copy)) => Some(copy),
                Some(Err(err)) => {
                    tracing::warn!(endpoint = %endpoint.config.name, thread = i, error = %err, "cannot duplicate the listening socket; this data thread does not accept on it");
                    None
                }
                None => None,
            }
        };
        if let Some(socket) = socket {
            loops.push(handle.spawn(accept_loop(
                endpoint.clone(),
                socket,
                tasks.clone(),
                stop_accepting.clone(),
            )));
        }
    }
    let mut handed_back = None;
    for accepting in loops {
        if let Ok(Some(socket)) = accepting.await {
            handed_back = Some(socket);
        }
    }
    tracing::debug!(endpoint = %endpoint.config.name, "stopped accepting");
    handed_back
}

/// One data thread's accept loop: registers `socket` with this thread's
/// runtime, accepts until `stop_accepting`, and hands the socket back
/// unregistered.
async fn accept_loop(
    endpoint: Arc<Endpoint>,
    socket: std::net::TcpListener,
    tasks: SessionTasks,
    stop_accepting: CancellationToken,
) -> Option<std::net::TcpListener> {
    let listener = match TcpListener::from_std(socket) {
        Ok(listener) => listener,
        Err(err) => {
            tracing::error!(endpoint = %endpoint.config.name, error = %err, "cannot register the listening socket on a data thread");
            return None;
        }
    };
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop_accepting.cancelled() => break,
        };
        match accepted {
            Ok((tcp, peer)) => {
                endpoint.metrics.accepted.inc();
                match endpoint.admission.opening(peer.ip()) {
                    Ok(ticket) => {
                        let session =
                            session(endpoint.clone(), tcp, peer, ticket, tasks.close.clone());
                        // Spawned on this thread's runtime: the session
                        // never leaves it.
                        tasks.all.spawn(
                            tasks
                                .cluster
                                .track_future(tasks.endpoint.track_future(session)),
                        );
                    }
                    // Refused as cheaply as possible: closed at once, no
                    // task, no TLS, no byte read.
                    Err(denied) => endpoint.denied(denied, peer),
                }
            }
            Err(err) => {
                // Out of file descriptors or similar: back off, keep serving.
                if let Some(suppressed) = endpoint.log_limit.admit("accept_failed") {
                    tracing::warn!(endpoint = %endpoint.config.name, error = %err, suppressed, "accept failed");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        // One new connection per turn of this thread's scheduler: every
        // task that is ready (the open sessions, the openings under way)
        // runs before the next accept. A flood of connections whose
        // handshakes cost CPU then queues in the kernel's backlog, not in
        // front of the sessions already open on this thread.
        tokio::task::yield_now().await;
    }
    match listener.into_std() {
        Ok(socket) => Some(socket),
        Err(err) => {
            tracing::warn!(endpoint = %endpoint.config.name, error = %err, "cannot unregister the listening socket");
            None
        }
    }
}

/// Decrements the active gauge when a session ends, however it ends.
struct ActiveGuard(IntGauge);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

async fn session(
    endpoint: Arc<Endpoint>,
    mut tcp: TcpStream,
    peer: SocketAddr,
    ticket: OpeningTicket,
    close: CancellationToken,
) {
    let ep = endpoint.config.name.as_str();
    let protocol = endpoint.cluster.config.protocol;
    tune(&tcp);
    // The opening's deadline covers the PROXY header too.
    let deadline = tokio::time::Instant::now() + endpoint.config.handshake_timeout;
    // From a trusted balancer, the client is the one its header names:
    // from here on `peer` is that client, for the limits and the logs.
    let (peer, ticket) = match &endpoint.config.proxy_protocol {
        Some(pp) if pp.trusts(peer.ip()) => {
            let read = tokio::select! {
                read = tokio::time::timeout_at(deadline, Box::pin(proxy_protocol::read(&mut tcp))) => read,
                _ = close.cancelled() => return,
            };
            let Some(client) = endpoint.proxied(read, peer) else {
                return;
            };
            match endpoint.admission.reassign(ticket, client.ip()) {
                Ok(ticket) => (client, ticket),
                Err(denied) => return endpoint.denied(denied, client),
            }
        }
        _ => (peer, ticket),
    };

    let frontend = Frontend {
        endpoint: ep,
        protocol,
        acceptor: &endpoint.acceptor,
        allow_plaintext: endpoint.config.allow_plaintext,
        metrics: &endpoint.metrics.all,
        log_limit: &endpoint.log_limit,
    };
    // Boxed, like the routing below: the task of an idle session keeps
    // the size of its largest state, and these are only passed through.
    let opening = tokio::time::timeout_at(deadline, Box::pin(frontend.accept(tcp, peer)));
    let accepted = tokio::select! {
        result = opening => match result {
            Ok(accepted) => accepted,
            Err(_) => {
                endpoint.metrics.all.tls_handshake_failures.with_label_values(&[ep, "timeout"]).inc();
                if let Some(suppressed) = endpoint.log_limit.admit("handshake_timeout") {
                    tracing::info!(endpoint = ep, %peer, timeout_ms = endpoint.config.handshake_timeout.as_millis() as u64, suppressed, "opening timed out (TLS handshake or first read); connection dropped");
                }
                return;
            }
        },
        _ = close.cancelled() => return,
    };
    let (mut client, preface) = match accepted {
        Accepted::Session { client, preface } => (client, preface),
        Accepted::Cancel(key) => {
            drop(ticket);
            Box::pin(forward_cancel(&endpoint, key, peer)).await;
            return;
        }
        Accepted::Dropped => return,
    };
    // With `tls.client_ca`: who the client's certificate says it is.
    let client_cert = client
        .client_certificate()
        .and_then(crate::tls::certificate_subject);
    // Established: the opening's place goes back, a session's is taken.
    drop(ticket);
    let _ticket = match endpoint.admission.session(peer.ip()) {
        Ok(ticket) => ticket,
        Err(denied) => {
            endpoint.denied(denied, peer);
            let mut client = Prefixed::new(&preface, &mut client);
            Box::pin(frontend::refuse(
                protocol,
                &mut client,
                &Refusal::MaxConnections,
            ))
            .await;
            return;
        }
    };
    endpoint.metrics.active.inc();
    let _active = ActiveGuard(endpoint.metrics.active.clone());
    let started = Instant::now();

    let routed = tokio::select! {
        routed = Box::pin(route(&endpoint, peer)) => routed,
        _ = close.cancelled() => Err(Refusal::ShuttingDown),
    };
    let Routed {
        cluster,
        member,
        mut server,
        mut routing,
    } = match routed {
        Ok(routed) => routed,
        Err(refusal) => {
            let reason = refusal.metric_reason();
            endpoint.refused(reason);
            if let Some(suppressed) = endpoint.log_limit.admit(reason) {
                tracing::warn!(endpoint = ep, %peer, reason, suppressed, "no member to route to; connection refused");
            }
            let mut client = Prefixed::new(&preface, &mut client);
            Box::pin(frontend::refuse(protocol, &mut client, &refusal)).await;
            return;
        }
    };
    let _count = cluster.session_guard(member);
    let hook = SessionHook::for_protocol(protocol);
    if hook.binds_channel() {
        endpoint.check_channel_binding(&cluster, member, &server);
    }
    let epoch = routing.borrow().epoch;
    let (user, database) = hook.identity(&preface);
    tracing::debug!(endpoint = ep, %peer, member = cluster.member_name(member), epoch, user, database, "session routed");
    let route = endpoint.config.route;
    let close_on_change = endpoint.config.on_leader_change == OnLeaderChange::Close;
    // A second look at the routing snapshots, asked before every write to
    // the member; `routing` itself wakes the session when it is idle.
    let mut gate = Gate {
        enabled: close_on_change,
        routing: routing.clone(),
        route,
        member,
        shut: false,
    };
    // Not even the startup message goes to a member that has just lost its
    // eligibility; the relay below then closes the session at once.
    if !preface.is_empty() && gate.open() {
        if let Err(err) = server.write_all(&preface).await {
            tracing::warn!(endpoint = ep, %peer, member = cluster.member_name(member), error = %err, "member closed before the session started");
            return;
        }
    }

    let bytes = Arc::new(SessionBytes::default());
    // The client's first bytes, read in the opening, count as its bytes.
    endpoint.metrics.bytes_in.inc_by(preface.len() as u64);
    bytes
        .from_client
        .fetch_add(preface.len() as u64, Ordering::Relaxed);
    // Sent: an idle session holds no copy.
    drop(preface);
    let mut client = Counted {
        inner: client,
        read: endpoint.metrics.bytes_in.clone(),
        written: endpoint.metrics.bytes_out.clone(),
        session: bytes.clone(),
    };
    let mut server = hook.member_side(server, cluster.clone(), member);
    let mut splice = Splice::new(hook.framed());
    let mut open = || gate.open();
    let idle_timeout = endpoint.config.idle_timeout;
    let ended = {
        let relay =
            std::future::poll_fn(|cx| splice.poll_relay(cx, &mut client, &mut server, &mut open));
        // Biased: a snapshot that makes the member ineligible is seen before
        // one more byte is relayed.
        tokio::select! {
            biased;
            _ = no_longer_eligible(&mut routing, route, member), if close_on_change => Ended::Ineligible,
            _ = close.cancelled() => Ended::Shutdown,
            _ = idle(&bytes, idle_timeout.unwrap_or(Duration::MAX)), if idle_timeout.is_some() => Ended::Idle,
            relayed = relay => match relayed {
                Relayed::Gated => Ended::Ineligible,
                Relayed::Finished(result) => Ended::Finished(result),
            },
        }
    };
    // From here on nothing is written to the member: the relay is gone.
    let member_name = cluster.member_name(member);
    let why = match &ended {
        Ended::Finished(Ok(())) => "closed",
        Ended::Finished(Err(_)) => "error",
        Ended::Ineligible => "leader_change",
        Ended::Shutdown => "shutdown",
        Ended::Idle => "idle_timeout",
    };
    match ended {
        Ended::Finished(result) => {
            if let Err(err) = result {
                tracing::debug!(endpoint = ep, %peer, error = %err, "session ended with an error");
            }
        }
        Ended::Ineligible => {
            endpoint.metrics.closed_leader_change.inc();
            let epoch = routing.borrow().epoch;
            // Tell the client why, where its parser expects a new message
            // (PostgreSQL: 57P01, as the server does on a forced disconnect).
            let closed = Box::pin(hook.close(
                CloseReason::LeaderChange,
                &mut splice,
                &mut client,
                &mut server,
            ))
            .await;
            match closed {
                Closed::Plainly => tracing::info!(
                    endpoint = ep, %peer, member = member_name, epoch,
                    "member no longer eligible for this route; session closed"
                ),
                Closed::AtBoundary(relayed) => tracing::info!(
                    endpoint = ep, %peer, member = member_name, epoch, relayed,
                    "member no longer eligible for this route; session closed at a message boundary with 57P01"
                ),
                Closed::MemberEnded => tracing::info!(
                    endpoint = ep, %peer, member = member_name, epoch,
                    "member no longer eligible for this route; session closed (the member's stream ended mid-message)"
                ),
                Closed::Failed(err) => tracing::info!(
                    endpoint = ep, %peer, member = member_name, epoch, error = %err,
                    "member no longer eligible for this route; session closed (relaying the rest of the message failed)"
                ),
                Closed::TimedOut => tracing::info!(
                    endpoint = ep, %peer, member = member_name, epoch, timeout_ms = CLOSE_DRAIN.as_millis() as u64,
                    "member no longer eligible for this route; session closed mid-message, the rest not relayed in time"
                ),
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), client.inner.shutdown()).await;
        }
        Ended::Idle => {
            endpoint.metrics.closed_idle.inc();
            Box::pin(hook.close(CloseReason::Idle, &mut splice, &mut client, &mut server)).await;
            tracing::debug!(endpoint = ep, %peer, member = member_name, "session idle for idle_timeout; closed");
            let _ = tokio::time::timeout(Duration::from_millis(100), client.inner.shutdown()).await;
        }
        Ended::Shutdown => {
            endpoint.metrics.closed_shutdown.inc();
            let _ = tokio::time::timeout(Duration::from_millis(100), client.inner.shutdown()).await;
        }
    }
    if endpoint.config.access_log {
        let from_client = bytes.from_client.load(Ordering::Relaxed);
        let to_client = bytes.to_client.load(Ordering::Relaxed);
        let duration_ms = started.elapsed().as_millis() as u64;
        match &client_cert {
            Some(subject) => tracing::info!(
                target: "portal::access",
                endpoint = ep, client = %peer, client_cert = subject.as_str(), member = member_name,
                from_client, to_client, duration_ms, ended = why,
                "session"
            ),
            None => tracing::info!(
                target: "portal::access",
                endpoint = ep, client = %peer, member = member_name,
                from_client, to_client, duration_ms, ended = why,
                "session"
            ),
        }
    }
}

/// Returns once no byte has moved either way for `timeout` (checked four
/// times per `timeout`, so it returns within a quarter more).
async fn idle(bytes: &SessionBytes, timeout: Duration) {
    let tick = (timeout / 4).max(Duration::from_millis(10));
    let mut last = bytes.total();
    let mut quiet = Duration::ZERO;
    loop {
        tokio::time::sleep(tick).await;
        let now = bytes.total();
        if now == last {
            quiet += tick;
            if quiet >= timeout {
                return;
            }
        } else {
            last = now;
            quiet = Duration::ZERO;
        }
    }
}

/// One session's bytes each way.
#[derive(Debug, Default)]
struct SessionBytes {
    from_client: AtomicU64,
    to_client: AtomicU64,
}

impl SessionBytes {
    fn total(&self) -> u64 {
        self.from_client.load(Ordering::Relaxed) + self.to_client.load(Ordering::Relaxed)
    }
}

/// The first certificate of the PEM file `path`, DER; none when it cannot
/// be read (the TLS setup reports that).
fn endpoint_certificate(path: &std::path::Path) -> Option<Vec<u8>> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::pem_file_iter(path)
        .ok()?
        .next()?
        .ok()
        .map(|cert| cert.as_ref().to_vec())
}

/// Why a session's relay stopped.
enum Ended {
    Finished(io::Result<()>),
    Ineligible,
    Shutdown,
    /// No byte either way for `idle_timeout`.
    Idle,
}

/// Forwards a PostgreSQL CancelRequest to the member that issued the key.
/// Unknown keys are dropped quietly, as the server itself does.
async fn forward_cancel(endpoint: &Endpoint, key: CancelKey, peer: SocketAddr) {
    let ep = endpoint.config.name.as_str();
    let cluster = endpoint.cluster.latest();
    let outcome = |what: &str| {
        endpoint
            .metrics
            .all
            .cancel_requests
            .with_label_values(&[ep, what])
            .inc();
    };
    // The member that issued the key, as it was then (a reload may have
    // replaced the cluster's instance since; the key table is shared).
    let Some(entry) = cluster.cancel_keys.member(&key) else {
        outcome("unknown_key");
        tracing::debug!(endpoint = ep, %peer, pid = key.pid, "cancel request with an unknown key; ignored");
        return;
    };
    let forwarded = async {
        let mut server = backend::connect(
            cluster.config.protocol,
            &entry.address,
            cluster.origination.as_ref(),
            CANCEL_CONNECT_TIMEOUT,
        )
        .await?;
        server.write_all(&key.request()).await?;
        server.flush().await?;
        // The server answers nothing and closes; wait for that, briefly.
        let mut sink = [0u8; 64];
        let _ = tokio::time::timeout(Duration::from_secs(1), server.read(&mut sink)).await;
        Ok::<_, std::io::Error>(())
    };
    match forwarded.await {
        Ok(()) => {
            outcome("forwarded");
            tracing::info!(endpoint = ep, %peer, member = %entry.name, pid = key.pid, "cancel request forwarded");
        }
        Err(err) => {
            outcome("failed");
            tracing::warn!(endpoint = ep, %peer, member = %entry.name, error = %err, "cancel request could not be forwarded");
        }
    }
}

/// Idle time before the first keepalive probe on both legs of a session, so
/// a vanished peer does not pin a session (and a member's count) forever.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// No Nagle delay (requests are small and latency-bound) and TCP keepalive.
pub fn tune(tcp: &TcpStream) {
    let _ = tcp.set_nodelay(true);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(3);
    let _ = socket2::SockRef::from(tcp).set_tcp_keepalive(&keepalive);
}

/// A session's member, connected, on the cluster instance whose view
/// chose it (and whose routing it watches).
struct Routed {
    cluster: Arc<Cluster>,
    member: MemberId,
    server: Stream,
    routing: watch::Receiver<Arc<Snapshot>>,
}

/// Picks and connects a member, holding up to `hold_timeout` while none is
/// eligible or reachable.
async fn route(endpoint: &Endpoint, peer: SocketAddr) -> Result<Routed, Refusal> {
    let config = &endpoint.config;
    let started = Instant::now();
    let deadline = tokio::time::Instant::from_std(started + config.hold_timeout);
    let mut cluster = endpoint.cluster.latest();
    let mut routing = cluster.routing.clone();
    let mut last_error: Option<String>;
    loop {
        // A reload may have replaced the cluster's instance (this endpoint
        // instance too) since the connection came in: route on the view
        // serving now.
        let latest = cluster.latest();
        if !Arc::ptr_eq(&latest, &cluster) {
            cluster = latest;
            routing = cluster.routing.clone();
        }
        let snapshot = routing.borrow_and_update().clone();
        let candidates = candidates_now(config, &snapshot, &cluster.status.load());
        let turn = endpoint.turn.fetch_add(1, Ordering::Relaxed);
        let choice = router::choose(&candidates, config.balance, turn, |m| {
            cluster.sessions_on(m)
        });
        let mut failed = false;
        last_error = None;
        // The view's verdict holds for the address it was probed at: a
        // member that moved since is not used until its new address is.
        let chosen = choice.and_then(|m| Some((m, cluster.roster.get(m)?)));
        let confirmed = chosen.as_ref().is_some_and(|(m, entry)| {
            snapshot.members.get(*m).map(|v| v.generation) == Some(entry.generation)
        });
        if let (Some((member, _)), false) = (&chosen, confirmed) {
            failed = true;
            last_error = Some(format!(
                "member {} moved; waiting for its probe at the new address",
                cluster.member_name(*member)
            ));
        }
        if let (Some((member, entry)), true) = (chosen, confirmed) {
            match backend::connect(
                cluster.config.protocol,
                &entry.address,
                cluster.origination.as_ref(),
                connect_timeout(deadline),
            )
            .await
            {
                Ok(server) => {
                    // The view may have moved while we connected.
                    let current = routing.borrow().clone();
                    if current.epoch == snapshot.epoch
                        || router::still_eligible(&current, config.route, member)
                    {
                        endpoint
                            .metrics
                            .hold
                            .observe(started.elapsed().as_secs_f64());
                        return Ok(Routed {
                            cluster,
                            member,
                            server,
                            routing,
                        });
                    }
                    continue;
                }
                Err(err) if err.kind() == std::io::ErrorKind::TimedOut => {
                    failed = true;
                    last_error = Some(err.to_string());
                    tracing::warn!(endpoint = %config.name, %peer, member = cluster.member_name(member), error = %err, "connect to member timed out");
                    // Not proof that the member is gone, but its probe's
                    // older connection is no proof that it is there.
                    cluster.roster.suspect(member);
                }
                Err(err) if crate::probe::is_local(&err) => {
                    // Out of file descriptors, say: the member is not at
                    // fault, and it is not reported or suspected.
                    failed = true;
                    last_error = Some(err.to_string());
                    if let Some(suppressed) = endpoint.log_limit.admit("local_connect_error") {
                        tracing::warn!(endpoint = %config.name, %peer, member = cluster.member_name(member), error = %err, suppressed, "cannot open a connection to the member: the portal is out of a resource");
                    }
                }
                Err(err) => {
                    failed = true;
                    last_error = Some(err.to_string());
                    let hard = crate::probe::classify_io(&err).hard;
                    tracing::warn!(endpoint = %config.name, %peer, member = cluster.member_name(member), error = %err, hard, "connect to member failed");
                    if hard {
                        cluster.report_hard_failure(
                            member,
                            entry.generation,
                            format!("data-path connect: {err}"),
                        );
                    } else {
                        // A certificate that no longer verifies, say: the
                        // probe finds out over a fresh connection.
                        cluster.roster.suspect(member);
                    }
                }
            }
        }
        tokio::select! {
            changed = routing.changed() => {
                if changed.is_err() {
                    return Err(Refusal::ShuttingDown);
                }
            }
            _ = tokio::time::sleep(RETRY_PAUSE), if failed => {}
            _ = tokio::time::sleep_until(deadline) => {
                let last = routing.borrow().clone();
                return Err(Refusal::NoMember {
                    cluster: cluster.config.name.clone(),
                    waited: started.elapsed(),
                    split_brain: last.split_brain,
                    no_replica: last.leader.is_some() && config.route == Route::Replicas,
                    connect_error: last_error,
                });
            }
        }
    }
}

/// The members a new session of the endpoint (`config`) may go to now:
/// the leader and replicas of the routing `snapshot`, replicas' lag as the
/// latest reports (`status`) say. `/ready/endpoint/NAME` asks the same.
pub fn candidates_now(
    config: &config::Endpoint,
    snapshot: &Snapshot,
    status: &Snapshot,
) -> Vec<MemberId> {
    router::candidates(snapshot, config.route, config.replica_fallback, |m| {
        router::within_lag(status.members.get(m), config.max_lag)
    })
}

/// How long the next connect attempt may take: what is left until the
/// hold's `deadline`, so that attempts (retries and other candidates
/// included) share one `hold_timeout`; at least the floor, at most the cap.
fn connect_timeout(deadline: tokio::time::Instant) -> Duration {
    deadline
        .saturating_duration_since(tokio::time::Instant::now())
        .clamp(CONNECT_ATTEMPT_FLOOR, CONNECT_ATTEMPT_CAP)
}

/// Whether the member of a session may still be written to: once the
/// routing snapshot says it is no longer eligible, never again. Looks at the
/// snapshot only when it has changed since the last look, so asking costs
/// one atomic load: cheap enough before every write to the member.
struct Gate {
    /// Off with `on_leader_change: keep`.
    enabled: bool,
    routing: watch::Receiver<Arc<Snapshot>>,
    route: Route,
    member: MemberId,
    shut: bool,
}

impl Gate {
    fn open(&mut self) -> bool {
        if self.enabled && !self.shut && self.routing.has_changed().unwrap_or(false) {
            // (An error means the view is gone: shutdown closes sessions its
            // own way.)
            let snapshot = self.routing.borrow_and_update();
            self.shut = !router::still_eligible(&snapshot, self.route, self.member);
        }
        !self.shut
    }
}

/// Resolves when `member` stops being eligible for `route`.
async fn no_longer_eligible(
    routing: &mut watch::Receiver<Arc<Snapshot>>,
    route: Route,
    member: MemberId,
) {
    loop {
        if !router::still_eligible(&routing.borrow_and_update(), route, member) {
            return;
        }
        if routing.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// A stream that counts the bytes read from and written to it.
struct Counted<S> {
    inner: S,
    read: IntCounter,
    written: IntCounter,
    session: Arc<SessionBytes>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        if n > 0 {
            self.read.inc_by(n as u64);
            self.session
                .from_client
                .fetch_add(n as u64, Ordering::Relaxed);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &polled {
            self.written.inc_by(*n as u64);
            self.session
                .to_client
                .fetch_add(*n as u64, Ordering::Relaxed);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn future_size<A, B, C, D, E, F: std::future::Future>(
        _: &impl Fn(A, B, C, D, E) -> F,
    ) -> usize {
        std::mem::size_of::<F>()
    }

    /// A session's task is allocated at the size of its largest state and
    /// keeps it while idle: the opening, routing, refusals and closes are
    /// boxed so that an idle session does not pay for them (5.8 KiB before).
    #[test]
    fn a_session_task_stays_small() {
        let size = future_size(&session);
        assert!(
            size <= 2048,
            "the session future is {size} bytes; box the new large state"
        );
    }
}
