//! One cluster at run time: its probes, the task that feeds their reports to
//! the view, and what the data path reads (the routing snapshot and the
//! per-member session counts).

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use futures_util::future::BoxFuture;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backend::Origination;
use crate::config::{self, Check, Protocol};
use crate::dcs;
use crate::frontend::postgres::CancelKeys;
use crate::metrics::Metrics;
use crate::probe::{self, ProbeContext};
use crate::roster::{MemberEntry, Roster};
use crate::view::{
    DcsReport, FenceReason, MemberId, Outcome, Override, OverrideError, PeerTerms, Report,
    Snapshot, Thresholds, Transition, View,
};

/// What reaches the view besides probe and DCS reports.
enum Control {
    /// An operator's decision, answered once applied or refused.
    Override {
        decision: Override,
        reply: oneshot::Sender<Result<(), OverrideError>>,
    },
    /// Terms a peer portal proved.
    Peer(PeerTerms),
    /// A peer answered, without terms for this cluster; or the wait for a
    /// first answer is over (view rule 9).
    PeersHeard,
}

/// Why an operator's decision did not apply.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    #[error(transparent)]
    Refused(#[from] OverrideError),
    #[error("the cluster is shutting down")]
    Closed,
}

/// Live PostgreSQL sessions whose cancel keys are remembered, per cluster.
const CANCEL_KEYS_CAPACITY: usize = 100_000;

/// What the rest of the portal sees of a cluster.
pub struct Cluster {
    pub config: config::Cluster,
    /// Changes only when the epoch does: sessions watch it to close on a
    /// leader change, new connections wait on it while there is no leader.
    pub routing: watch::Receiver<Arc<Snapshot>>,
    /// Its sender: the view task's, or, once a reload replaced this
    /// instance, [`follow_successor`]'s.
    routing_tx: watch::Sender<Arc<Snapshot>>,
    /// The latest snapshot with every member's last report, for `/status`.
    pub status: ArcSwap<Snapshot>,
    /// Sessions open per member name, for least-connections and
    /// `/status`; shared with the instances a reload starts after this one.
    sessions: Arc<SessionCounts>,
    /// PostgreSQL cancel keys of live sessions, and the member (name and
    /// address) that issued each; shared like `sessions`.
    pub cancel_keys: Arc<CancelKeys<Arc<MemberEntry>>>,
    /// The instance a reload replaced this one with, once it did.
    successor: watch::Sender<Option<Arc<Cluster>>>,
    /// TLS to the members, when configured.
    pub origination: Option<Origination>,
    /// Who the members are and where they listen.
    pub roster: Arc<Roster>,
    reports: mpsc::Sender<Report>,
    control: mpsc::Sender<Control>,
}

impl Cluster {
    /// Starts the probes and the view task on `tasks`; both stop on `cancel`.
    /// With `peer_wait`, the portal has peers: the first election waits for
    /// a peer's answer, or that long (view rule 9). With `predecessor`, the
    /// instance a reload replaces: its session counts and cancel keys carry
    /// over (its sessions go on).
    pub fn start(
        config: config::Cluster,
        origination: Option<Origination>,
        peer_wait: Option<Duration>,
        metrics: Arc<Metrics>,
        tasks: &TaskTracker,
        cancel: CancellationToken,
        predecessor: Option<&Cluster>,
    ) -> Arc<Cluster> {
        let roster = Arc::new(Roster::new(&config));
        let mut view = View::new(
            roster.len(),
            Thresholds {
                rise: config.probe.rise,
                fall: config.probe.fall,
            },
        );
        if config.dcs.is_some() {
            view = view.with_dcs();
        }
        // Rule 9 (no first election before the peers are heard) is for
        // the probes' own elections; with a DCS, the DCS names the leader.
        if peer_wait.is_some() && config.dcs.is_none() {
            view = view.with_peers();
        }
        let first = Arc::new(view.snapshot());
        let (routing_tx, routing) = watch::channel(first.clone());
        let (reports, reports_rx) = mpsc::channel(1024);
        let (control, control_rx) = mpsc::channel(64);
        let (urgent_tx, urgent) = watch::channel(true);
        let poke = Arc::new(Notify::new());

        let cluster = Arc::new(Cluster {
            sessions: predecessor.map_or_else(Arc::default, |p| p.sessions.clone()),
            cancel_keys: predecessor.map_or_else(
                || Arc::new(CancelKeys::new(CANCEL_KEYS_CAPACITY)),
                |p| p.cancel_keys.clone(),
            ),
            successor: watch::Sender::new(None),
            origination,
            status: ArcSwap::new(first),
            routing,
            routing_tx,
            reports,
            control,
            roster,
            config,
        });

        // Checked when the configuration was loaded; a failure here means
        // the files changed since: HTTPS members are then not probed.
        let api_tls = cluster.config.probe.api_tls.as_ref().and_then(|tls| {
            Origination::with_alpn(tls, &[b"http/1.1"])
                .map_err(|err| {
                    tracing::error!(cluster = %cluster.config.name, error = %err, "probe.api_tls: cannot build the TLS client; HTTPS Patroni APIs are not probed");
                })
                .ok()
        });
        let probes = Probes {
            cluster: cluster.clone(),
            api_tls,
            name: Arc::from(cluster.config.name.as_str()),
            etcd_ids: probe::etcd::MemberIds::new(cluster.roster.len()),
            metrics: metrics.clone(),
            urgent,
            poke: poke.clone(),
            cancel: cancel.clone(),
        };
        for id in 0..cluster.roster.len() {
            if let Some(slot) = cluster.roster.subscribe(id) {
                tasks.spawn(probes.clone().follow(id, slot));
            }
        }

        let (dcs_tx, dcs_rx) = mpsc::channel(64);
        if let Some(dcs) = cluster.config.dcs.clone() {
            let ctx = dcs::SourceContext::new(&cluster.config, cluster.roster.clone(), &metrics);
            tasks.spawn(dcs::run(dcs, ctx, dcs_tx, cancel.clone()));
        } else {
            drop(dcs_tx);
        }

        tasks.spawn(supervise(
            cluster.clone(),
            view,
            Inputs {
                reports: reports_rx,
                dcs: dcs_rx,
                control: control_rx,
                peer_wait,
            },
            urgent_tx,
            poke,
            metrics,
            cancel,
        ));
        cluster
    }

    /// Tells the view that `member` (at the address of `generation`) cannot
    /// be reached, as if its probe had been refused: the data path failed to
    /// connect, the member moved, or it cannot be probed at all.
    pub fn report_hard_failure(&self, member: usize, generation: u64, error: String) {
        let report = Report {
            member,
            generation,
            at: std::time::SystemTime::now(),
            outcome: Outcome::Failed { hard: true, error },
        };
        if self.reports.try_send(report).is_err() {
            tracing::debug!(cluster = %self.config.name, "report queue full; dropping a connect-failure report");
        }
    }

    /// Applies an operator's decision to the view, once the view task has
    /// taken it.
    pub async fn apply_override(&self, decision: Override) -> Result<(), ActionError> {
        let (reply, answer) = oneshot::channel();
        self.control
            .send(Control::Override { decision, reply })
            .await
            .map_err(|_| ActionError::Closed)?;
        answer
            .await
            .map_err(|_| ActionError::Closed)?
            .map_err(ActionError::from)
    }

    /// Hands what a peer portal proved to the view; dropped when the view
    /// is busy (the peer is asked again soon).
    pub fn apply_peer(&self, terms: PeerTerms) {
        if self.control.try_send(Control::Peer(terms)).is_err() {
            tracing::debug!(cluster = %self.config.name, "control queue full; dropping a peer answer");
        }
    }

    /// A peer answered without terms for this cluster (view rule 9).
    pub fn peers_heard(&self) {
        if self.control.try_send(Control::PeersHeard).is_err() {
            tracing::debug!(cluster = %self.config.name, "control queue full; dropping a peer answer");
        }
    }

    /// The member's name, or `?` for an empty slot.
    pub fn member_name(&self, member: usize) -> String {
        self.roster.name(member)
    }

    /// Counts a session on `member` until the guard drops.
    pub fn session_guard(&self, member: usize) -> SessionCount {
        let name = self.roster.name(member);
        self.sessions.add(&name);
        SessionCount {
            sessions: self.sessions.clone(),
            name,
        }
    }

    /// Sessions open on `member`, on this instance and on those it replaced.
    pub fn sessions_on(&self, member: usize) -> usize {
        self.roster
            .get(member)
            .map_or(0, |entry| self.sessions.get(&entry.name))
    }

    /// The instance serving in this one's place now: itself, or the last
    /// of the instances reloads replaced it with.
    pub fn latest(self: &Arc<Self>) -> Arc<Cluster> {
        follow_chain(self).0
    }

    /// Marks this instance as replaced by `next` (a reload).
    pub fn replaced_by(&self, next: Arc<Cluster>) {
        self.successor.send_replace(Some(next));
    }
}

/// What a reload hands from a cluster's running instance to the one that
/// replaces it: the newest term the old view saw a leader hold and the
/// lineage it learned, given to the new view as a peer's (view rule 4), so
/// the new view fences what the old one fenced from its first report.
pub fn inherited_terms(old: &Cluster) -> Option<PeerTerms> {
    let snapshot = old.status.load();
    Some(PeerTerms {
        term: snapshot.leader_term.clone()?,
        lineage: snapshot.lineage.clone(),
    })
}

/// The last instance of the chain of successors from `from`, and a
/// receiver that wakes when that one is replaced in turn.
fn follow_chain(from: &Arc<Cluster>) -> (Arc<Cluster>, watch::Receiver<Option<Arc<Cluster>>>) {
    let mut current = from.clone();
    loop {
        // Subscribed before looking: a successor set meanwhile wakes it.
        let replaced = current.successor.subscribe();
        let next = replaced.borrow().clone();
        match next {
            Some(next) => current = next,
            None => return (current, replaced),
        }
    }
}

/// After a reload replaced `old` (its view stopped, [`Cluster::replaced_by`]
/// set): feeds `old`'s sessions the view of the instance serving in its
/// place, following later reloads too, so that each session stays open
/// exactly while its member, the same name at the same address, is
/// eligible under that view. Returns when `done` does.
pub async fn follow_successor(old: Arc<Cluster>, done: impl std::future::Future<Output = ()>) {
    tokio::pin!(done);
    let mut epoch = old.routing.borrow().epoch;
    let (mut latest, mut replaced) = follow_chain(&old);
    let mut next = latest.routing.clone();
    loop {
        let snapshot = next.borrow_and_update().clone();
        let in_old = |id: MemberId| {
            let entry = latest.roster.get(id)?;
            let old_id = old.roster.id_of(&entry.name)?;
            let before = old.roster.get(old_id)?;
            (before.address == entry.address).then_some(old_id)
        };
        epoch += 1;
        old.routing_tx
            .send_replace(Arc::new(successor_snapshot(&snapshot, in_old, epoch)));
        tokio::select! {
            changed = next.changed() => if changed.is_err() { return },
            changed = replaced.changed() => {
                if changed.is_err() {
                    return;
                }
                (latest, replaced) = follow_chain(&latest);
                next = latest.routing.clone();
            }
            () = &mut done => return,
        }
    }
}

/// `snapshot` of a successor instance in the member ids of its predecessor
/// (`in_old`; `None` for a member the predecessor did not have), under
/// `epoch`, above every one the predecessor's sessions saw. Only what a
/// running session asks (`router::still_eligible`) is carried: new
/// sessions route on the successor itself ([`Cluster::latest`]).
fn successor_snapshot(
    snapshot: &Snapshot,
    in_old: impl Fn(MemberId) -> Option<MemberId>,
    epoch: u64,
) -> Snapshot {
    Snapshot {
        split_brain: snapshot.split_brain,
        leader_term: snapshot.leader_term.clone(),
        dcs: snapshot.dcs.clone(),
        no_leader: snapshot.no_leader,
        ..Snapshot::routing_only(
            epoch,
            snapshot.leader.and_then(&in_old),
            snapshot
                .replicas
                .iter()
                .filter_map(|&r| in_old(r))
                .collect(),
        )
    }
}

/// What every member's probe task shares.
#[derive(Clone)]
struct Probes {
    cluster: Arc<Cluster>,
    /// TLS to HTTPS Patroni APIs (`probe.api_tls`).
    api_tls: Option<Origination>,
    name: Arc<str>,
    etcd_ids: Arc<probe::etcd::MemberIds>,
    metrics: Arc<Metrics>,
    urgent: watch::Receiver<bool>,
    poke: Arc<Notify>,
    cancel: CancellationToken,
}

impl Probes {
    /// Probes the member in slot `id` for as long as the slot holds it; a
    /// member whose address changes is reported down (what its probe said
    /// was about the old address) and probed afresh at the new one.
    async fn follow(self, id: MemberId, mut slot: watch::Receiver<Option<Arc<MemberEntry>>>) {
        loop {
            let entry = slot.borrow_and_update().clone();
            let probe = entry.as_ref().and_then(|entry| self.probe(id, entry));
            let changed = match probe {
                Some(probe) => tokio::select! {
                    () = probe => return,
                    changed = slot.changed() => changed,
                },
                None => tokio::select! {
                    changed = slot.changed() => changed,
                    _ = self.cancel.cancelled() => return,
                },
            };
            if changed.is_err() {
                return;
            }
            if let (Some(old), Some(new)) = (&entry, slot.borrow().as_ref()) {
                tracing::info!(cluster = %self.name, member = %new.name, from = %old.address, to = %new.address, "member moved; probing its new address");
                // Reported at once under the new generation: the view
                // forgets the old address before the new probe answers.
                self.cluster.report_hard_failure(
                    id,
                    new.generation,
                    format!("the member moved from {} to {}", old.address, new.address),
                );
            }
        }
    }

    /// The probe task for one member, or `None` when it cannot be probed.
    fn probe(&self, id: MemberId, entry: &MemberEntry) -> Option<BoxFuture<'static, ()>> {
        let cluster = &self.cluster;
        let ctx = ProbeContext::new(
            self.name.clone(),
            id,
            entry,
            cluster.config.probe.clone(),
            cluster.roster.clone(),
            &self.metrics,
        );
        let (reports, urgent, poke, cancel) = (
            cluster.reports.clone(),
            self.urgent.clone(),
            self.poke.clone(),
            self.cancel.clone(),
        );
        Some(match cluster.config.protocol {
            Protocol::Redis => Box::pin(probe::run(
                probe::redis::RedisProber::new(cluster.origination.clone()),
                ctx,
                reports,
                urgent,
                poke,
                cancel,
            )),
            Protocol::Postgres if cluster.config.probe.check == Check::Patroni => {
                let Some(api) = entry.api.clone() else {
                    let error =
                        "no Patroni REST address (api_url) for this member; it is not probed";
                    tracing::warn!(cluster = %self.name, member = %entry.name, error);
                    cluster.report_hard_failure(id, entry.generation, error.to_string());
                    return None;
                };
                let tls = match (api.https, &self.api_tls) {
                    (false, _) => None,
                    (true, Some(tls)) => Some(tls.clone()),
                    (true, None) => {
                        let error = format!(
                            "Patroni's REST API is HTTPS ({api}) but the portal has no TLS settings for it (probe.api_tls); it is not probed"
                        );
                        tracing::warn!(cluster = %self.name, member = %entry.name, %error);
                        cluster.report_hard_failure(id, entry.generation, error);
                        return None;
                    }
                };
                Box::pin(probe::run(
                    probe::patroni::PatroniProber::new(api, tls),
                    ctx,
                    reports,
                    urgent,
                    poke,
                    cancel,
                ))
            }
            Protocol::Postgres => Box::pin(probe::run(
                probe::postgres::PostgresProber::new(cluster.origination.clone()),
                ctx,
                reports,
                urgent,
                poke,
                cancel,
            )),
            Protocol::Etcd => Box::pin(probe::run(
                probe::etcd::EtcdProber::new(cluster.origination.clone(), self.etcd_ids.clone()),
                ctx,
                reports,
                urgent,
                poke,
                cancel,
            )),
        })
    }
}

/// Sessions open per member name.
#[derive(Default)]
struct SessionCounts(std::sync::Mutex<std::collections::HashMap<String, usize>>);

impl SessionCounts {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, usize>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn add(&self, name: &str) {
        *self.lock().entry(name.to_string()).or_default() += 1;
    }

    fn remove(&self, name: &str) {
        let mut counts = self.lock();
        if let Some(count) = counts.get_mut(name) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.remove(name);
            }
        }
    }

    fn get(&self, name: &str) -> usize {
        self.lock().get(name).copied().unwrap_or(0)
    }
}

/// Decrements a member's session count on drop.
pub struct SessionCount {
    sessions: Arc<SessionCounts>,
    name: String,
}

impl Drop for SessionCount {
    fn drop(&mut self) {
        self.sessions.remove(&self.name);
    }
}

/// The view task's inputs.
struct Inputs {
    reports: mpsc::Receiver<Report>,
    dcs: mpsc::Receiver<DcsReport>,
    control: mpsc::Receiver<Control>,
    /// How long the first election waits for a peer (view rule 9).
    peer_wait: Option<Duration>,
}

#[allow(clippy::too_many_arguments)]
async fn supervise(
    cluster: Arc<Cluster>,
    mut view: View,
    inputs: Inputs,
    urgent: watch::Sender<bool>,
    poke: Arc<Notify>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    let name = cluster.config.name.as_str();
    let member = |id: usize| cluster.roster.name(id);
    let epoch_gauge = metrics.epoch.with_label_values(&[name]);
    let split_gauge = metrics.split_brain.with_label_values(&[name]);
    let leader_changes = metrics.leader_changes.with_label_values(&[name]);
    let Inputs {
        mut reports,
        mut dcs,
        mut control,
        peer_wait,
    } = inputs;
    let mut dcs_open = true;
    // Rule 9's wait ends at a peer's first answer or at this deadline.
    let peers_silent = tokio::time::sleep(peer_wait.unwrap_or_default());
    tokio::pin!(peers_silent);
    let mut awaiting_peers = peer_wait.is_some() && cluster.config.dcs.is_none();
    loop {
        let mut poke_all = false;
        let transitions = tokio::select! {
            _ = &mut peers_silent, if awaiting_peers => {
                awaiting_peers = false;
                tracing::warn!(cluster = name, "no peer answered in time: electing without their terms");
                view.peers_heard()
            }
            command = control.recv() => match command {
                Some(Control::Override { decision, reply }) => {
                    let (action, target) = match &decision {
                        Override::AcceptLeader(m) => ("accept_leader", Some(member(*m))),
                        Override::ForgetTerms => ("forget_terms", None),
                    };
                    let result = view.apply_override(&decision);
                    let outcome = if result.is_ok() { "applied" } else { "refused" };
                    metrics.operator_actions.with_label_values(&[name, action, outcome]).inc();
                    let transitions = match result {
                        Ok(transitions) => {
                            tracing::warn!(cluster = name, action, member = target, epoch = view.epoch(), "operator decision applied");
                            let _ = reply.send(Ok(()));
                            transitions
                        }
                        Err(err) => {
                            tracing::warn!(cluster = name, action, member = target, error = %err, "operator decision refused");
                            let _ = reply.send(Err(err));
                            Vec::new()
                        }
                    };
                    poke_all = true;
                    transitions
                }
                Some(Control::Peer(terms)) => {
                    awaiting_peers = false;
                    view.apply_peer(terms)
                }
                Some(Control::PeersHeard) => {
                    awaiting_peers = false;
                    view.peers_heard()
                }
                None => return,
            },
            report = reports.recv() => match report {
                Some(report) => view.apply(report),
                None => return,
            },
            report = dcs.recv(), if dcs_open => match report {
                Some(report) => {
                    log_dcs(name, &report, &cluster.roster);
                    // The named member's probe must confirm it: ask now.
                    poke_all = true;
                    view.apply_dcs(report)
                }
                None => {
                    dcs_open = false;
                    continue;
                }
            },
            _ = cancel.cancelled() => return,
        };
        for t in transitions {
            match t {
                Transition::MemberUp { member: m } => {
                    metrics
                        .member_up
                        .with_label_values(&[name, &member(m)])
                        .set(1);
                    tracing::info!(cluster = name, member = member(m), "member up");
                }
                Transition::MemberDown { member: m, hard } => {
                    metrics
                        .member_up
                        .with_label_values(&[name, &member(m)])
                        .set(0);
                    poke_all |= hard;
                    tracing::warn!(cluster = name, member = member(m), hard, "member down");
                }
                Transition::LeaderElected {
                    member: m,
                    term,
                    previous,
                } => {
                    metrics
                        .member_is_leader
                        .with_label_values(&[name, &member(m)])
                        .set(1);
                    leader_changes.inc();
                    tracing::info!(
                        cluster = name,
                        leader = member(m),
                        previous = previous.map(member),
                        term = term.map(|t| t.to_string()),
                        epoch = view.epoch(),
                        "leader elected"
                    );
                }
                Transition::LeaderLost { member: m } => {
                    metrics
                        .member_is_leader
                        .with_label_values(&[name, &member(m)])
                        .set(0);
                    if view.leader().is_none() {
                        leader_changes.inc();
                    }
                    poke_all = true;
                    tracing::warn!(cluster = name, member = member(m), "leader lost");
                }
                Transition::SplitBrain { claimants } => {
                    split_gauge.set(1);
                    let claimants: Vec<String> = claimants.into_iter().map(member).collect();
                    tracing::error!(
                        cluster = name,
                        claimants = ?claimants,
                        "split brain: several members claim primary and their terms cannot order them"
                    );
                }
                Transition::SplitBrainResolved => {
                    split_gauge.set(0);
                    tracing::info!(cluster = name, "split brain resolved");
                }
                Transition::Fenced {
                    member: m,
                    reason: reason @ FenceReason::BehindLeaderTerm,
                } => {
                    metrics
                        .fenced
                        .with_label_values(&[name, reason.as_str()])
                        .inc();
                    tracing::warn!(
                        cluster = name,
                        member = member(m),
                        reason = reason.as_str(),
                        "replica is on a term older than the leader's: no reads until it follows"
                    );
                }
                Transition::Fenced { member: m, reason } => {
                    metrics
                        .fenced
                        .with_label_values(&[name, reason.as_str()])
                        .inc();
                    tracing::warn!(
                        cluster = name,
                        member = member(m),
                        reason = reason.as_str(),
                        "member claims primary but is fenced"
                    );
                }
                Transition::WentBack { to, abandoned } => {
                    metrics.went_back.with_label_values(&[name]).inc();
                    let abandoned: Vec<String> = abandoned.iter().map(|t| t.to_string()).collect();
                    tracing::warn!(
                        cluster = name,
                        term = %to,
                        abandoned = %abandoned.join(", "),
                        "the DCS went back to an older history and the newer one is gone from the cluster: the named member's term is the reference, the newer terms are abandoned"
                    );
                }
            }
        }
        let snapshot = Arc::new(view.snapshot());
        epoch_gauge.set(i64::try_from(snapshot.epoch).unwrap_or(i64::MAX));
        cluster.status.store(snapshot.clone());
        let has_leader = snapshot.leader.is_some();
        cluster.routing_tx.send_if_modified(|current| {
            if current.epoch != snapshot.epoch {
                *current = snapshot;
                true
            } else {
                false
            }
        });
        urgent.send_if_modified(|u| {
            let changed = *u == has_leader;
            *u = !has_leader;
            changed
        });
        if poke_all {
            poke.notify_waiters();
        }
    }
}

fn log_dcs(cluster: &str, report: &DcsReport, roster: &Roster) {
    match report {
        DcsReport::Named { leader, term } => tracing::info!(
            cluster,
            leader = leader.map(|l| roster.name(l)),
            term,
            "DCS names the leader"
        ),
        DcsReport::Unreachable { error } => {
            tracing::warn!(cluster, %error, "DCS unreachable")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Route;
    use crate::router::still_eligible;

    #[test]
    fn a_successor_snapshot_speaks_in_the_predecessors_ids() {
        // Old ids: a=0, b=1, c=2. New ids: c=0, b=1, d=2 (a removed, d added,
        // c moved to the first slot).
        let in_old = |id: MemberId| match id {
            0 => Some(2),
            1 => Some(1),
            _ => None,
        };
        let next = successor_snapshot(&Snapshot::routing_only(1, Some(0), vec![1, 2]), in_old, 9);
        assert_eq!(next.epoch, 9);
        assert_eq!(next.leader, Some(2), "c leads, old id 2");
        assert_eq!(next.replicas, vec![1], "d was not a member before");
        assert!(still_eligible(&next, Route::Leader, 2));
        assert!(
            !still_eligible(&next, Route::Leader, 0),
            "a's sessions close"
        );
        assert!(still_eligible(&next, Route::Replicas, 1));
        // A new leader the old instance never had: no old session fits.
        let next = successor_snapshot(&Snapshot::routing_only(2, Some(2), vec![]), in_old, 10);
        assert_eq!(next.leader, None);
        assert!(!still_eligible(&next, Route::Leader, 2));
    }
}
