//! `portal run`: wires clusters, endpoints and the admin listener together,
//! reloads them on SIGHUP or `POST /reload`, and shuts them down in order
//! on SIGTERM or SIGINT.
//!
//! A reload is prepared, then committed. Preparing does everything that can
//! fail (reading and validating the file, loading every certificate, key
//! and CA, binding new listen addresses) and changes nothing: a failure
//! leaves the running configuration as it was. Committing cannot fail:
//!
//! - A cluster whose settings (members, probe, DCS, backend TLS) are the
//!   same keeps its running instance: its view and probes go on.
//! - A cluster whose settings changed gets a new instance, started beside
//!   the old one with the old view's proven terms (as a peer's, view rule
//!   4), and given until it knows as much as the old one (a leader if the
//!   old had one, as many replicas) or [`settle_limit`] before it takes
//!   over. The old instance's view and probes then stop, and its sessions
//!   follow the new view ([`crate::cluster::follow_successor`]).
//! - Every endpoint gets a new instance with its new settings and
//!   certificate; an endpoint on an address already served takes over that
//!   listener (no connection is refused in between). Sessions of an
//!   endpoint that stays keep running; those of an endpoint that is gone
//!   are drained as on shutdown (`shutdown.drain_timeout`).
//! - `admin` settings need a restart and are left as they are.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{self, AdminState, ReloadOutcome, Served};
use crate::backend::Origination;
use crate::cluster::{self, Cluster};
use crate::config::{self, Config};
use crate::data_threads::{self, DataThreads};
use crate::metrics::Metrics;
use crate::proxy::{self, Endpoint, SessionTasks};

/// Sessions still open this long after they were told to close are
/// abandoned.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// A certificate closer to its end than this is warned about.
const EXPIRY_WARNING: Duration = Duration::from_secs(30 * 24 * 3600);

/// What lives as long as the process.
struct Process {
    metrics: Arc<Metrics>,
    /// Probes, views, DCS sources, the admin listener, peers.
    background: TaskTracker,
    stop_background: CancellationToken,
    /// Every session, for shutdown.
    sessions: TaskTracker,
    /// Parent of every accept loop's token.
    stop_accepting: CancellationToken,
    /// Parent of every session's close token.
    close_sessions: CancellationToken,
    /// View rule 9: with peers, a fresh view's first election waits for a
    /// peer's answer at most this long.
    peer_wait: Option<Duration>,
    /// Where every endpoint accepts and its sessions run.
    data: DataThreads,
}

/// The instances serving now.
#[derive(Default)]
struct Live {
    clusters: Vec<LiveCluster>,
    endpoints: Vec<LiveEndpoint>,
}

struct LiveCluster {
    cluster: Arc<Cluster>,
    /// What its member-side TLS files held when it started.
    tls_files: u64,
    /// Stops its probes, DCS source and view.
    stop: CancellationToken,
    /// Every session on this instance, of any endpoint instance.
    sessions: TaskTracker,
}

struct LiveEndpoint {
    endpoint: Arc<Endpoint>,
    /// Stops its accept loop, which then hands its listener back.
    stop: CancellationToken,
    accepting: Option<JoinHandle<Option<std::net::TcpListener>>>,
    sessions: TaskTracker,
    close: CancellationToken,
}

/// A configuration made ready to serve: everything that can fail is done.
struct Prepared {
    clusters: Vec<PreparedCluster>,
}

struct PreparedCluster {
    config: config::Cluster,
    plan: Plan,
    endpoints: Vec<PreparedEndpoint>,
}

enum Plan {
    /// The running instance at this index stays.
    Keep(usize),
    /// A new instance, replacing the running one at this index, if any.
    Start {
        origination: Option<Origination>,
        replaces: Option<usize>,
    },
}

struct PreparedEndpoint {
    config: config::Endpoint,
    tls: Arc<rustls::ServerConfig>,
    listener: Listener,
}

enum Listener {
    /// The listener of the running endpoint at this index (same address).
    Taken(usize),
    Bound(std::net::TcpListener),
}

pub async fn run(mut config: Config) -> anyhow::Result<()> {
    let mut signals = Signals::install();
    // View rule 9: with peers, a fresh portal's first election waits for a
    // peer's answer, at most five exchange intervals, between 1 s and 30 s
    // (a peer that is down too must not keep this one from serving).
    let peer_wait = (!config.admin.peers.is_empty() && config.admin.token.is_some()).then(|| {
        config
            .admin
            .peer_interval
            .saturating_mul(5)
            .clamp(Duration::from_secs(1), Duration::from_secs(30))
    });
    let process = Process {
        metrics: Arc::new(Metrics::new()),
        background: TaskTracker::new(),
        stop_background: CancellationToken::new(),
        sessions: TaskTracker::new(),
        stop_accepting: CancellationToken::new(),
        close_sessions: CancellationToken::new(),
        peer_wait,
        data: DataThreads::start(config.data_threads).context("cannot start the data threads")?,
    };
    let metrics = process.metrics.clone();

    // Everything that can fail on bad input (certificates, busy ports) is
    // done before anything starts.
    let mut live = Live::default();
    let prepared = prepare(&config, &live).await?;
    let admin_listener = TcpListener::bind(config.admin.listen)
        .await
        .with_context(|| format!("admin: cannot listen on {}", config.admin.listen))?;

    let (reload_tx, mut reload_rx) = mpsc::channel::<oneshot::Sender<ReloadOutcome>>(4);
    let state = Arc::new(AdminState {
        served: ArcSwap::from_pointee(Served {
            clusters: Vec::new(),
            endpoints: Vec::new(),
        }),
        metrics: metrics.clone(),
        reload: reload_tx,
        draining: false.into(),
        token: config.admin.token.clone(),
        exposed: !config.admin.listen.ip().is_loopback(),
    });
    commit(prepared, &mut live, &process, &config, None).await;
    publish(&live, &state);

    if !config.admin.listen.ip().is_loopback() && config.admin.token.is_none() {
        tracing::warn!(listen = %config.admin.listen, "the admin listener is not on loopback and has no token: /status and /metrics are readable by anyone who reaches it (set admin.token_file or admin.token_env: every path but /health and /ready then requires it)");
    }
    if let Some(token) = &config.admin.token {
        for peer in &config.admin.peers {
            tracing::info!(peer = %peer, "asking a peer portal for its proven terms");
            process.background.spawn(crate::peers::follow(
                peer.clone(),
                token.clone(),
                config.admin.peer_interval,
                state.clone(),
                metrics.clone(),
                process.stop_background.clone(),
            ));
        }
    }
    tracing::info!(listen = %config.admin.listen, "admin listening");
    process.background.spawn(admin::serve(
        admin_listener,
        state.clone(),
        process.stop_background.clone(),
    ));

    let mut reload_again = false;
    let signal = loop {
        let (outcome, reply) = if std::mem::take(&mut reload_again) {
            (
                reload(&mut config, &mut live, &process, &mut signals).await,
                None,
            )
        } else {
            tokio::select! {
                signal = signals.next() => match signal {
                    "SIGHUP" => (reload(&mut config, &mut live, &process, &mut signals).await, None),
                    stop => break stop,
                },
                Some(reply) = reload_rx.recv() => {
                    (reload(&mut config, &mut live, &process, &mut signals).await, Some(reply))
                }
            }
        };
        publish(&live, &state);
        let (outcome, interrupted) = outcome;
        if let Some(reply) = reply {
            let _ = reply.send(outcome);
        }
        if let Some(stop) = interrupted.stop {
            break stop;
        }
        reload_again = interrupted.reload_again;
    };
    shutdown(signal, &config, live, &process, &state, &mut signals).await;
    Ok(())
}

/// Stops accepting (after `shutdown.ready_delay`, while `/ready` says 503),
/// drains the sessions for `shutdown.drain_timeout`, closes the rest, then
/// stops everything else. A second stop signal closes everything at once.
async fn shutdown(
    signal: &str,
    config: &Config,
    mut live: Live,
    process: &Process,
    state: &AdminState,
    signals: &mut Signals,
) {
    let drain = config.shutdown.drain_timeout;
    let ready_delay = config.shutdown.ready_delay;
    state.draining.store(true, Ordering::Relaxed);
    let mut at_once = false;
    if !ready_delay.is_zero() {
        tracing::info!(
            signal,
            ready_delay_ms = ready_delay.as_millis() as u64,
            "shutting down: /ready answers 503; still accepting for shutdown.ready_delay"
        );
        tokio::select! {
            _ = tokio::time::sleep(ready_delay) => {}
            second = signals.next_stop() => {
                tracing::info!(signal = second, "second stop signal: closing every session now");
                at_once = true;
            }
        }
    }
    tracing::info!(
        signal,
        drain_timeout_ms = drain.as_millis() as u64,
        "shutting down: no new connections; draining sessions"
    );
    process.stop_accepting.cancel();
    for endpoint in &mut live.endpoints {
        if let Some(accepting) = endpoint.accepting.take() {
            let _ = accepting.await;
        }
    }
    process.sessions.close();
    let drained = !at_once
        && tokio::select! {
            drained = tokio::time::timeout(drain, process.sessions.wait()) => {
                if drained.is_err() {
                    tracing::info!(
                        open = process.sessions.len(),
                        "drain deadline reached; closing the remaining sessions"
                    );
                }
                drained.is_ok()
            }
            signal = signals.next_stop() => {
                tracing::info!(signal, open = process.sessions.len(), "second stop signal: closing every session now");
                false
            }
        };
    if !drained {
        process.close_sessions.cancel();
        let _ = tokio::time::timeout(CLOSE_GRACE, process.sessions.wait()).await;
    }
    process.stop_background.cancel();
    process.background.close();
    let _ = tokio::time::timeout(CLOSE_GRACE, process.background.wait()).await;
    tracing::info!("stopped");
}

/// Shows the live instances to the admin side and the peers.
fn publish(live: &Live, state: &AdminState) {
    state.served.store(Arc::new(Served {
        clusters: live.clusters.iter().map(|c| c.cluster.clone()).collect(),
        endpoints: live.endpoints.iter().map(|e| e.endpoint.clone()).collect(),
    }));
}

/// A digest of what the member-side TLS files of `cluster` hold now (a
/// file that cannot be read counts as such): a CA or a client certificate
/// replaced under the same path gives the cluster a new view on reload.
fn tls_files_digest(cluster: &config::Cluster) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for path in cluster.member_tls_files() {
        path.hash(&mut hasher);
        std::fs::read(path).ok().hash(&mut hasher);
    }
    hasher.finish()
}

/// A cluster's settings without its endpoints: what its instance runs on.
fn same_cluster(a: &config::Cluster, b: &config::Cluster) -> bool {
    let bare = |c: &config::Cluster| config::Cluster {
        endpoints: Vec::new(),
        ..c.clone()
    };
    bare(a) == bare(b)
}

/// Does everything `config` needs that can fail, against what runs now.
async fn prepare(config: &Config, live: &Live) -> anyhow::Result<Prepared> {
    let mut clusters = Vec::new();
    for c in &config.clusters {
        let running = live
            .clusters
            .iter()
            .position(|l| l.cluster.config.name == c.name);
        let plan = match running {
            Some(i)
                if same_cluster(&live.clusters[i].cluster.config, c)
                    && live.clusters[i].tls_files == tls_files_digest(c) =>
            {
                Plan::Keep(i)
            }
            replaces => Plan::Start {
                origination: match &c.backend_tls {
                    Some(tls) => Some(
                        Origination::for_protocol(tls, c.protocol)
                            .with_context(|| format!("cluster {}: backend_tls", c.name))?,
                    ),
                    None => None,
                },
                replaces,
            },
        };
        let mut endpoints = Vec::new();
        for e in &c.endpoints {
            let tls = crate::tls::server_config(&e.tls, crate::frontend::alpn(c.protocol))
                .with_context(|| format!("endpoint {}", e.name))?;
            let listener = match live
                .endpoints
                .iter()
                .position(|l| l.endpoint.config.listen == e.listen)
            {
                Some(i) => Listener::Taken(i),
                None => Listener::Bound(data_threads::listen(e.listen).with_context(|| {
                    format!("endpoint {}: cannot listen on {}", e.name, e.listen)
                })?),
            };
            endpoints.push(PreparedEndpoint {
                config: e.clone(),
                tls,
                listener,
            });
        }
        clusters.push(PreparedCluster {
            config: c.clone(),
            plan,
            endpoints,
        });
    }
    Ok(Prepared { clusters })
}

/// What a commit did, for the log and `POST /reload`'s answer.
#[derive(Default)]
struct Changes {
    clusters_kept: usize,
    clusters_started: Vec<String>,
    clusters_removed: Vec<String>,
    endpoints_added: Vec<String>,
    endpoints_changed: Vec<String>,
    endpoints_removed: Vec<String>,
    /// Restarted clusters whose new instance did not know as much as the
    /// old one within `settle_limit`.
    unsettled: Vec<String>,
}

impl Changes {
    fn summary(&self) -> String {
        let list = |names: &[String]| {
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        };
        format!(
            "clusters kept: {}; restarted or added: {}; removed: {}; endpoints added: {}; changed: {}; removed: {}",
            self.clusters_kept,
            list(&self.clusters_started),
            list(&self.clusters_removed),
            list(&self.endpoints_added),
            list(&self.endpoints_changed),
            list(&self.endpoints_removed),
        )
    }
}

/// Puts `prepared` in place of what `live` runs. With `signals`, a stop
/// signal that comes while new cluster instances settle cuts the wait short,
/// and a SIGHUP asks for another reload; both are returned.
async fn commit(
    prepared: Prepared,
    live: &mut Live,
    process: &Process,
    config: &Config,
    signals: Option<&mut Signals>,
) -> (Changes, Interrupted) {
    let mut changes = Changes::default();
    let mut old_clusters: Vec<Option<LiveCluster>> = std::mem::take(&mut live.clusters)
        .into_iter()
        .map(Some)
        .collect();
    let old_endpoints = std::mem::take(&mut live.endpoints);

    // Clusters: kept, or started beside the instance they replace.
    let mut successors = Vec::new();
    let mut clusters = Vec::new();
    for pc in &prepared.clusters {
        match &pc.plan {
            Plan::Keep(i) => {
                changes.clusters_kept += 1;
                clusters.push(old_clusters[*i].take());
            }
            Plan::Start {
                origination,
                replaces,
            } => {
                let stop = process.stop_background.child_token();
                let predecessor = replaces.and_then(|i| old_clusters[i].as_ref());
                let new = Cluster::start(
                    pc.config.clone(),
                    origination.clone(),
                    process.peer_wait,
                    process.metrics.clone(),
                    &process.background,
                    stop.clone(),
                    predecessor.map(|p| p.cluster.as_ref()),
                );
                if let Some(old) = predecessor {
                    if let Some(terms) = cluster::inherited_terms(&old.cluster) {
                        new.apply_peer(terms);
                    }
                    successors.push((*replaces, new.clone()));
                }
                changes.clusters_started.push(pc.config.name.clone());
                clusters.push(Some(LiveCluster {
                    tls_files: tls_files_digest(&pc.config),
                    cluster: new,
                    stop,
                    sessions: TaskTracker::new(),
                }));
            }
        }
    }

    // A new instance takes over once it knows as much as the old one.
    let mut interrupted = Interrupted::default();
    if !successors.is_empty() {
        let waits = successors.iter().filter_map(|(old, new)| {
            let old = old_clusters[(*old)?].as_ref()?.cluster.clone();
            let new = new.clone();
            Some(async move {
                let limit = settle_limit(&new.config.probe);
                let settled = tokio::time::timeout(limit, settled(&old, &new))
                    .await
                    .is_ok();
                (new.config.name.clone(), settled)
            })
        });
        let all = futures_util::future::join_all(waits);
        tokio::pin!(all);
        let outcomes = match signals {
            Some(signals) => loop {
                tokio::select! {
                    outcomes = &mut all => break outcomes,
                    signal = signals.next() => {
                        if signal == "SIGHUP" {
                            // Applied once this reload is done: the file
                            // may have changed again.
                            tracing::info!("SIGHUP during a reload: reloading again once this one is done");
                            interrupted.reload_again = true;
                            continue;
                        }
                        interrupted.stop = Some(signal);
                        break Vec::new();
                    }
                }
            },
            None => all.await,
        };
        for (name, settled) in outcomes {
            if !settled {
                changes.unsettled.push(name);
            }
        }
    }

    // Endpoints: a new instance each, on the listener of the same address.
    let mut old_endpoints: Vec<Option<LiveEndpoint>> =
        old_endpoints.into_iter().map(Some).collect();
    let mut handed: Vec<LiveEndpoint> = Vec::new();
    for (pc, live_cluster) in prepared.clusters.into_iter().zip(&clusters) {
        let Some(live_cluster) = live_cluster else {
            continue;
        };
        for pe in pc.endpoints {
            let previous = old_endpoints
                .iter()
                .flatten()
                .chain(&handed)
                .find(|l| l.endpoint.config.name == pe.config.name)
                .map(|l| l.endpoint.clone());
            match &previous {
                None => changes.endpoints_added.push(pe.config.name.clone()),
                Some(p)
                    if p.config != pe.config || !Arc::ptr_eq(&p.cluster, &live_cluster.cluster) =>
                {
                    changes.endpoints_changed.push(pe.config.name.clone())
                }
                Some(_) => {}
            }
            let listener = match pe.listener {
                Listener::Bound(listener) => listener,
                Listener::Taken(i) => {
                    let Some(mut old) = old_endpoints[i].take() else {
                        continue;
                    };
                    old.stop.cancel();
                    let taken = match old.accepting.take() {
                        Some(accepting) => accepting.await.ok().flatten(),
                        None => None,
                    };
                    handed.push(old);
                    match taken {
                        Some(listener) => listener,
                        None => match data_threads::listen(pe.config.listen) {
                            Ok(listener) => listener,
                            Err(err) => {
                                tracing::error!(endpoint = %pe.config.name, listen = %pe.config.listen, error = %err, "cannot listen again after a reload; the endpoint is not served");
                                continue;
                            }
                        },
                    }
                }
            };
            let endpoint = Arc::new(Endpoint::new(
                pe.config,
                live_cluster.cluster.clone(),
                pe.tls,
                process.metrics.clone(),
                previous.as_deref(),
            ));
            if previous.is_none() {
                tracing::info!(
                    endpoint = %endpoint.config.name,
                    cluster = %live_cluster.cluster.config.name,
                    listen = %endpoint.config.listen,
                    route = %endpoint.config.route,
                    "serving"
                );
            }
            record_expiry(&endpoint.config, &process.metrics);
            let stop = process.stop_accepting.child_token();
            let close = process.close_sessions.child_token();
            let sessions = TaskTracker::new();
            let tasks = SessionTasks {
                all: process.sessions.clone(),
                cluster: live_cluster.sessions.clone(),
                endpoint: sessions.clone(),
                close: close.clone(),
            };
            let accepting = tokio::spawn(proxy::serve(
                endpoint.clone(),
                listener,
                process.data.clone(),
                tasks,
                stop.clone(),
            ));
            live.endpoints.push(LiveEndpoint {
                endpoint,
                stop,
                accepting: Some(accepting),
                sessions,
                close,
            });
        }
    }

    // The old endpoint instances: no more accepting. Sessions of an
    // endpoint that stays run on; those of one that is gone are drained.
    for mut old in old_endpoints.into_iter().flatten().chain(handed) {
        old.stop.cancel();
        old.sessions.close();
        let name = &old.endpoint.config.name;
        if live
            .endpoints
            .iter()
            .any(|e| e.endpoint.config.name == *name)
        {
            continue;
        }
        // A removed endpoint's port is closed before the reload answers:
        // every data thread's accept loop has stopped and dropped its copy
        // of the socket, so the address is free to bind again at once.
        if let Some(accepting) = old.accepting.take() {
            drop(accepting.await);
        }
        changes.endpoints_removed.push(name.clone());
        tracing::info!(endpoint = %name, listen = %old.endpoint.config.listen, open = old.sessions.len(), "endpoint removed: no new connections; draining its sessions");
        let _ = process
            .metrics
            .certificate_not_after
            .remove_label_values(&[name]);
        let drain = config.shutdown.drain_timeout;
        process.background.spawn(async move {
            if tokio::time::timeout(drain, old.sessions.wait())
                .await
                .is_err()
            {
                old.close.cancel();
                let _ = tokio::time::timeout(CLOSE_GRACE, old.sessions.wait()).await;
            }
        });
    }

    // The old cluster instances not kept: replaced ones hand their sessions
    // to their successor's view; removed ones stop once their sessions
    // (drained above) are gone.
    for (i, old) in old_clusters.into_iter().enumerate() {
        let Some(old) = old else { continue };
        old.sessions.close();
        let successor = successors
            .iter()
            .find(|(replaced, _)| *replaced == Some(i))
            .map(|(_, new)| new.clone());
        let metrics = process.metrics.clone();
        let stopping = process.stop_background.clone();
        match successor {
            Some(new) => {
                old.stop.cancel();
                forget_members(&metrics, &old.cluster, Some(&new));
                // From now on its sessions, and connections still being
                // routed on it, are on `new`'s view.
                old.cluster.replaced_by(new);
                let done = async move {
                    tokio::select! {
                        () = old.sessions.wait() => {}
                        () = stopping.cancelled() => {}
                    }
                };
                process
                    .background
                    .spawn(cluster::follow_successor(old.cluster, done));
            }
            None => {
                changes
                    .clusters_removed
                    .push(old.cluster.config.name.clone());
                tracing::info!(cluster = %old.cluster.config.name, "cluster removed: its view stops once its sessions are gone");
                process.background.spawn(async move {
                    tokio::select! {
                        () = old.sessions.wait() => {}
                        () = stopping.cancelled() => {}
                    }
                    old.stop.cancel();
                    forget_members(&metrics, &old.cluster, None);
                    let name = old.cluster.config.name.as_str();
                    let _ = metrics.epoch.remove_label_values(&[name]);
                    let _ = metrics.split_brain.remove_label_values(&[name]);
                });
            }
        }
    }
    live.clusters = clusters.into_iter().flatten().collect();
    (changes, interrupted)
}

/// Signals that came while a reload waited for new views to settle.
#[derive(Default)]
struct Interrupted {
    /// A stop signal: the wait was cut short, and the portal stops next.
    stop: Option<&'static str>,
    /// A SIGHUP: another reload follows this one.
    reload_again: bool,
}

/// Clears the per-member gauges an old cluster instance set that its
/// successor (if any) will not: members it no longer has, and the leader
/// mark of every member the successor does not see leading.
fn forget_members(metrics: &Metrics, old: &Cluster, new: Option<&Arc<Cluster>>) {
    let name = old.config.name.as_str();
    let leader = new.and_then(|n| n.status.load().leader.map(|l| n.member_name(l)));
    for (_, member) in old.roster.members() {
        let kept = new.is_some_and(|n| n.roster.id_of(&member.name).is_some());
        if kept {
            if leader.as_deref() != Some(member.name.as_str()) {
                metrics
                    .member_is_leader
                    .with_label_values(&[name, &member.name])
                    .set(0);
            }
        } else {
            let _ = metrics.member_up.remove_label_values(&[name, &member.name]);
            let _ = metrics
                .member_is_leader
                .remove_label_values(&[name, &member.name]);
        }
    }
}

/// How long a restarted cluster's new instance may take to know as much as
/// the old one: `rise` probes and one more, a probe's timeout, and a second
/// (between 1 s and 30 s).
fn settle_limit(probe: &config::ProbeSettings) -> Duration {
    (probe.interval.saturating_mul(probe.rise.saturating_add(1))
        + probe.timeout
        + Duration::from_secs(1))
    .clamp(Duration::from_secs(1), Duration::from_secs(30))
}

/// Returns once `new` has a leader if `old` has one, and as many replicas.
async fn settled(old: &Cluster, new: &Cluster) {
    let mut routing = new.routing.clone();
    loop {
        let ready = {
            let (old, new) = (old.status.load(), routing.borrow_and_update());
            (old.leader.is_none() || new.leader.is_some())
                && new.replicas.len() >= old.replicas.len()
        };
        if ready {
            return;
        }
        if routing.changed().await.is_err() {
            return;
        }
    }
}

/// SIGHUP and `POST /reload`: re-reads the configuration file and applies
/// it (see the module's documentation). A file that fails validation, a
/// certificate that does not load or an address that cannot be bound is
/// refused with its error, and the running configuration stays. Returns
/// the outcome, and the signals that came meanwhile.
async fn reload(
    running: &mut Config,
    live: &mut Live,
    process: &Process,
    signals: &mut Signals,
) -> (ReloadOutcome, Interrupted) {
    let metrics = &process.metrics;
    let failed = |error: String| {
        metrics.reloads.with_label_values(&["failed"]).inc();
        tracing::error!(file = %running.file.display(), error, "reload refused; the running configuration stays");
        (Err(error), Interrupted::default())
    };
    let mut new = match Config::load(&running.file) {
        Ok(new) => new,
        Err(err) => return failed(err.to_string()),
    };
    let prepared = match prepare(&new, live).await {
        Ok(prepared) => prepared,
        Err(err) => return failed(format!("{err:#}")),
    };
    let admin_changed = new.admin != running.admin;
    // The admin listener, its token and the peers stay as they are.
    new.admin = running.admin.clone();
    // So do the data threads.
    let threads_changed = DataThreads::count(new.data_threads) != process.data.len();
    new.data_threads = running.data_threads;
    let (changes, interrupted) = commit(prepared, live, process, &new, Some(signals)).await;
    *running = new;
    metrics.reloads.with_label_values(&["ok"]).inc();
    let summary = changes.summary();
    if changes.unsettled.is_empty() {
        tracing::info!(changes = %summary, "reloaded");
    } else {
        tracing::warn!(changes = %summary, unsettled = %changes.unsettled.join(", "), "reloaded; a restarted cluster's new view did not know its leader and replicas within its settle time and took over anyway");
    }
    let mut outcome = format!("reloaded: {summary}");
    if admin_changed {
        tracing::warn!(
            not_applied = "admin",
            "the admin settings changed; they need a restart and were not applied"
        );
        outcome.push_str("; not applied (needs a restart): admin");
    }
    if threads_changed {
        tracing::warn!(
            not_applied = "data_threads",
            "data_threads changed; it needs a restart and was not applied"
        );
        outcome.push_str("; not applied (needs a restart): data_threads");
    }
    (Ok(outcome), interrupted)
}

/// The stop and reload signals, installed once so that none is lost
/// between two waits.
struct Signals {
    installed: Option<(
        tokio::signal::unix::Signal,
        tokio::signal::unix::Signal,
        tokio::signal::unix::Signal,
    )>,
}

impl Signals {
    fn install() -> Signals {
        use tokio::signal::unix::{signal, SignalKind};
        let installed = match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) {
            (Ok(term), Ok(int), Ok(hup)) => Some((term, int, hup)),
            _ => {
                tracing::warn!("cannot install signal handlers; only Ctrl-C will stop the portal");
                None
            }
        };
        Signals { installed }
    }

    /// The next SIGTERM, SIGINT or SIGHUP.
    async fn next(&mut self) -> &'static str {
        match &mut self.installed {
            Some((term, int, hup)) => tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
                _ = hup.recv() => "SIGHUP",
            },
            None => {
                let _ = tokio::signal::ctrl_c().await;
                "SIGINT"
            }
        }
    }

    /// The next SIGTERM or SIGINT (a SIGHUP meanwhile is ignored).
    async fn next_stop(&mut self) -> &'static str {
        loop {
            let signal = self.next().await;
            if signal != "SIGHUP" {
                return signal;
            }
            tracing::info!("SIGHUP ignored: shutting down");
        }
    }
}

/// Sets `portal_certificate_not_after_seconds` for `endpoint` and warns
/// when its certificate expires within [`EXPIRY_WARNING`].
fn record_expiry(endpoint: &config::Endpoint, metrics: &Metrics) {
    match crate::tls::not_after(&endpoint.tls.cert) {
        Ok(at) => {
            metrics
                .certificate_not_after
                .with_label_values(&[&endpoint.name])
                .set(at);
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            let left = at - now;
            if left < EXPIRY_WARNING.as_secs() as i64 {
                tracing::warn!(
                    endpoint = %endpoint.name,
                    cert = %endpoint.tls.cert.display(),
                    days_left = left / 86_400,
                    "the endpoint's certificate expires within 30 days (or has expired)"
                );
            }
        }
        Err(err) => {
            tracing::warn!(endpoint = %endpoint.name, error = %err, "cannot read the certificate's expiry")
        }
    }
}
