//! The membership view: a pure state machine from probe reports to the
//! routing snapshot.
//!
//! No I/O, no clock, no locks: the caller feeds [`Report`]s (stamped with the
//! time they were taken) to [`View::apply`] and publishes [`View::snapshot`].
//! The rules:
//!
//! 1. A member is *up* (eligible) after `rise` consecutive good reports. A
//!    *soft* failure (a probe that timed out) makes it *suspect*: it keeps
//!    its last claim (role, term, upstream) and its place, and nothing is
//!    decided because of it: no leader is lost or chosen, no replica leaves
//!    the set, no session is closed. It goes *down*, and its claim is
//!    forgotten, after `fall` consecutive failures, or at once on a *hard*
//!    failure (the probe's connection refused or reset, or a data-path
//!    connect failure). A report that changes its claim acts at once.
//! 2. Among claimants of primary, the confirmed leader (the incumbent)
//!    keeps the role while it is up and still claims it; a rival displaces
//!    it only by proving a strictly newer [`Term`].
//! 3. Without an incumbent, the claimant provably newer than every other
//!    claimant (rising ones included) leads once up. If terms cannot order
//!    them there is no leader and `split_brain` is set.
//! 4. A claimant whose term is older than, or superseded by, a previous
//!    leader's (or a term a peer portal proved, see [`View::apply_peer`]) is
//!    fenced. A claimant that proves a term newer than the last leader's
//!    needs no `rise`: that is the fast path of a promotion.
//! 5. A claimant contradicted by a majority of the replicas that report whom
//!    they follow is not leader. A replica that follows a replica (chained
//!    replication, also once that one is down) says nothing about who leads.
//! 6. With a DCS (Patroni's keys in etcd, Redis Sentinel), the DCS names the
//!    leader and a probe must confirm it: only the named member may lead, and
//!    only while its own probe says primary and the term rules above do not
//!    fence it. Other claimants are fenced (`not_dcs_leader`). While the DCS
//!    is unreachable the last leader keeps the role only as long as its
//!    probes confirm it; no new leader is named until the DCS is back. A
//!    named member does not lead while another live claim proves a newer
//!    term (the DCS answer may be stale), not even an incumbent: nobody
//!    leads until the DCS names the newer claimant or it is demoted. When
//!    the DCS names a member on a term *older* than the last leader's (the
//!    manager went back: Patroni can hand the leader key back to an old
//!    primary that was frozen past its ttl), the term rules fence it until
//!    the cluster shows the newer history is gone: the last leader's own
//!    member reports a replica on a term no newer than the named one's, or
//!    the named member lists it among the members streaming from it (it
//!    was rewound onto it), and no member outside that list reports a
//!    newer term or only a lower bound. Then
//!    the named member's term becomes the reference, and the newer terms
//!    are *abandoned*: they fence nothing, also when a peer reports them.
//! 7. A replica whose term is provably newer than the leader's, or one the
//!    cluster abandoned (rule 6), serves no reads (`diverged_from_leader`):
//!    it holds writes the leader lacks. A replica whose term is provably
//!    older than the leader's serves no reads (`behind_leader_term`): a former primary back before
//!    `pg_rewind` (its timeline may hold writes the cluster lost), or a
//!    replica that has not followed the promotion yet. It takes reads again
//!    once it reports the leader's term.
//! 8. Once a leader has been seen, a claimant whose history is unrelated to
//!    the last leader's (its term neither descends from it nor is ordered
//!    against it, or it reports no term) never leads on its own
//!    (`unrelated_history`), even after that leader is gone: a Redis master
//!    restarted empty, a member rebuilt from scratch. Then there is no
//!    leader and clients are held and refused. A DCS that names it (rule 6)
//!    or an operator ([`Override`]) lets it lead. The last leader's history
//!    moves on only when its own member, now a replica, reports another
//!    one: it follows that history, which then holds the cluster's data.
//!    Another member claiming exactly the term the last leader led on is
//!    fenced too (`reused_term`), DCS or not: a legitimate successor is
//!    promoted onto a newer term (timeline, replication id, raft term),
//!    so one on the same term was promoted without the last leader's
//!    history (a PostgreSQL standby that never received the last leader's
//!    timeline history file picks the same timeline number again).
//! 9. A view configured with peers ([`View::with_peers`]) that remembers no
//!    leader (a portal that just started) elects nobody until a peer has
//!    answered or the caller says the peers are silent
//!    ([`View::peers_heard`]): a restarted portal first learns what its peers
//!    proved, so that a rogue that happens to be the only live claimant at
//!    that moment cannot win its first election.
//!
//! Every change of the leader or of the replica set bumps `epoch`.

use std::cmp::Ordering;
use std::collections::VecDeque;
use std::fmt;
use std::time::SystemTime;

#[cfg(test)]
mod tests;

/// Index of a member in its cluster's configuration order.
pub type MemberId = usize;

/// How many lineage steps (Redis: replid -> replid2) the view remembers.
const LINEAGE_MEMORY: usize = 64;
/// How many terms of past leaders the view remembers for fencing.
const PAST_LEADERS_MEMORY: usize = 16;
/// How many terms proven by peers the view remembers.
const PEER_TERMS_MEMORY: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Primary,
    Replica,
    Unknown,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Replica => "replica",
            Role::Unknown => "unknown",
        }
    }
}

/// What orders two leaders in time.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Term {
    /// A counter that only grows: etcd Raft term, Sentinel config epoch (and
    /// a PostgreSQL timeline whose system identifier is unknown).
    Number(u64),
    /// A PostgreSQL timeline within one database system: `system` is
    /// `pg_control_system()`'s identifier, drawn afresh by every `initdb`.
    /// Timelines of different systems are unordered (rule 8: a member
    /// re-created with initdb is back on timeline 1 of another history).
    Timeline { system: u64, timeline: u64 },
    /// Redis replication history: `id` is the member's `master_replid`,
    /// `previous` its `master_replid2`, the history it continued when it was
    /// promoted.
    Lineage {
        id: String,
        previous: Option<String>,
    },
}

impl Term {
    /// `Some(Greater)` when `self` is provably newer than `other`,
    /// `Some(Less)` when provably older, `None` when the two cannot be ordered.
    pub fn compare(&self, other: &Term) -> Option<Ordering> {
        match (self, other) {
            (Term::Number(a), Term::Number(b)) => Some(a.cmp(b)),
            (
                Term::Timeline {
                    system: sa,
                    timeline: a,
                },
                Term::Timeline {
                    system: sb,
                    timeline: b,
                },
            ) => (sa == sb).then(|| a.cmp(b)),
            // A timeline whose system is unknown (a peer portal of an older
            // version, a probe that could not read it) compares by number.
            (Term::Number(a), Term::Timeline { timeline: b, .. })
            | (Term::Timeline { timeline: a, .. }, Term::Number(b)) => Some(a.cmp(b)),
            (
                Term::Lineage {
                    id: a,
                    previous: pa,
                },
                Term::Lineage {
                    id: b,
                    previous: pb,
                },
            ) => {
                if a == b {
                    Some(Ordering::Equal)
                } else if pa.as_deref() == Some(b.as_str()) {
                    Some(Ordering::Greater)
                } else if pb.as_deref() == Some(a.as_str()) {
                    Some(Ordering::Less)
                } else {
                    None
                }
            }
            _ => None,
        }
    }
}

impl fmt::Display for Term {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Term::Number(n) => write!(f, "{n}"),
            Term::Timeline { system, timeline } => write!(f, "{timeline} (system {system})"),
            Term::Lineage { id, previous: None } => write!(f, "replid:{id}"),
            Term::Lineage {
                id,
                previous: Some(p),
            } => write!(f, "replid:{id} (after {p})"),
        }
    }
}

/// What one probe of one member saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    pub role: Role,
    pub term: Option<Term>,
    /// The member this one replicates from, when it says so and its link is up.
    pub upstream: Option<MemberId>,
    /// Replication position (PostgreSQL: WAL LSN written or replayed; Redis:
    /// replication offset). A replica's lag is the leader's minus its own.
    pub position: Option<u64>,
    /// How long a replica's replay trails what it received (PostgreSQL).
    pub delay: Option<std::time::Duration>,
    /// `term` is only a lower bound: the member may be on a newer one. A
    /// PostgreSQL standby that is not streaming reports its last
    /// checkpoint's timeline, which lags a promotion (rule 6).
    pub term_floor: bool,
    /// The members this one, a primary, says stream from it now (Patroni's
    /// `replication` list, `state: streaming`). A standby can only stream
    /// from a primary whose history contains its own, so each is on this
    /// member's term whatever its own report says (rule 6).
    pub followers: Vec<MemberId>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Observed(Observation),
    /// The probe failed. `hard` means the member is certainly unreachable
    /// (connection refused or reset), not merely slow.
    Failed {
        hard: bool,
        error: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub member: MemberId,
    /// Which incarnation of the member (its address) the report is about:
    /// it grows when the member moves. A newer one makes the view forget
    /// what it knew of the member; an older one is stale and ignored.
    pub generation: u64,
    /// When the probe finished; kept for display, never compared to a clock.
    pub at: SystemTime,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Not yet `rise` good reports since start.
    Unknown,
    Up,
    Down,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Unknown => "unknown",
            Health::Up => "up",
            Health::Down => "down",
        }
    }
}

/// One member as the view sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberView {
    pub health: Health,
    pub role: Role,
    pub term: Option<Term>,
    pub upstream: Option<MemberId>,
    pub last_report: Option<SystemTime>,
    pub last_error: Option<String>,
    /// Why the member's claim to be primary is ignored, or why a replica
    /// serves no reads, if either is so.
    pub fenced: Option<FenceReason>,
    pub position: Option<u64>,
    /// Bytes behind the leader, from the last reports of both.
    pub lag_bytes: Option<u64>,
    pub delay: Option<std::time::Duration>,
    /// The incarnation everything above is about (see [`Report`]).
    pub generation: u64,
    /// Consecutive failed probes: above 0 while up, the member is suspect
    /// (rule 1) and keeps its last claim.
    pub missed: u32,
}

/// What a DCS says about a cluster, as its watcher last saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DcsReport {
    /// The DCS answered: `leader` is the member holding the leader key
    /// (`None`: no one does), `term` what orders leaders in the DCS (etcd:
    /// the leader key's create revision; Sentinel: the config epoch).
    Named {
        leader: Option<MemberId>,
        term: Option<u64>,
    },
    /// The DCS cannot be reached.
    Unreachable { error: String },
}

/// The DCS as the view holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DcsView {
    /// No DCS configured: the probes alone decide.
    Absent,
    /// Configured, but nothing heard yet.
    Waiting,
    Named {
        leader: Option<MemberId>,
        term: Option<u64>,
    },
    Unreachable {
        error: String,
        /// The last answer before the DCS went away.
        last_term: Option<u64>,
    },
}

/// The published state of a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Grows by one at every change of `leader` or `replicas`.
    pub epoch: u64,
    pub leader: Option<MemberId>,
    /// Eligible members in the replica role, in member order.
    pub replicas: Vec<MemberId>,
    /// Several members claim primary, terms cannot order them and no
    /// incumbent settles it: there is no leader because of the ambiguity.
    pub split_brain: bool,
    /// The current (or last) leader's term.
    pub leader_term: Option<Term>,
    pub dcs: DcsView,
    pub members: Vec<MemberView>,
    /// Why there is no leader, when there is none.
    pub no_leader: Option<NoLeader>,
    /// Terms peer portals proved (rule 4), newest last.
    pub peer_terms: Vec<Term>,
    /// The lineage steps `(id, previous)` the view knows, oldest first:
    /// what a peer needs to order Redis replication ids.
    pub lineage: Vec<(String, String)>,
    /// The member an operator accepted as leader, while the pin holds.
    pub pinned: Option<MemberId>,
}

impl Snapshot {
    /// A snapshot that says only who leads and who replicates, under
    /// `epoch`: no member reports, no terms, no DCS.
    pub fn routing_only(epoch: u64, leader: Option<MemberId>, replicas: Vec<MemberId>) -> Snapshot {
        Snapshot {
            epoch,
            leader,
            replicas,
            split_brain: false,
            leader_term: None,
            dcs: DcsView::Absent,
            members: Vec::new(),
            no_leader: None,
            peer_terms: Vec::new(),
            lineage: Vec::new(),
            pinned: None,
        }
    }
}

/// Why a snapshot has no leader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoLeader {
    /// No up member claims primary.
    NoClaimant,
    /// A claimant is waiting for `rise` good reports.
    Rising,
    /// Claimants whose terms cannot be ordered, and no incumbent (rule 3).
    SplitBrain,
    /// Every claimant is fenced (rules 4, 5, 8).
    Fenced,
    /// A fresh view waits for its peers' proven terms (rule 9).
    AwaitingPeers,
    /// A DCS is configured and names no confirmed leader (rule 6).
    Dcs,
}

impl NoLeader {
    pub fn as_str(self) -> &'static str {
        match self {
            NoLeader::NoClaimant => "no_member_claims_primary",
            NoLeader::Rising => "claimant_rising",
            NoLeader::SplitBrain => "split_brain",
            NoLeader::Fenced => "every_claimant_fenced",
            NoLeader::AwaitingPeers => "awaiting_peers",
            NoLeader::Dcs => "dcs_names_no_confirmed_leader",
        }
    }
}

/// An operator's decision that the rules cannot make on their own (rule 8):
/// after a deliberate rebuild, or terms that went backwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Override {
    /// Accept this member, which must claim primary now, as the leader: the
    /// remembered terms are forgotten, its term becomes the one later
    /// claimants are ordered against, and it is *pinned*: it leads while it
    /// claims primary and is not down, whatever other members or peers
    /// claim, until it fails or stops claiming, a DCS names another leader
    /// than it did, or another decision.
    AcceptLeader(MemberId),
    /// Forget every remembered term (past leaders, lineage, peer terms): the
    /// rules then decide as on a fresh start.
    ForgetTerms,
}

/// Why an [`Override`] was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OverrideError {
    #[error("no such member")]
    UnknownMember,
    #[error("the member does not claim primary now (its last probe says {0})")]
    NotClaiming(&'static str),
}

/// What a peer portal proved about the same cluster: the newest term it has
/// seen a leader hold, and the lineage steps it observed (so that Redis
/// replication ids can be ordered here too).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerTerms {
    pub term: Term,
    pub lineage: Vec<(String, String)>,
}

/// A change the view made, for logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    MemberUp {
        member: MemberId,
    },
    MemberDown {
        member: MemberId,
        hard: bool,
    },
    LeaderElected {
        member: MemberId,
        term: Option<Term>,
        previous: Option<MemberId>,
    },
    LeaderLost {
        member: MemberId,
    },
    SplitBrain {
        claimants: Vec<MemberId>,
    },
    SplitBrainResolved,
    /// A member claims primary but is fenced (older or superseded term,
    /// or contradicted by the replicas).
    Fenced {
        member: MemberId,
        reason: FenceReason,
    },
    /// The DCS went back to an older history and the newer one is gone
    /// from the cluster (rule 6): `to` is the reference now, `abandoned`
    /// the terms given up.
    WentBack {
        to: Term,
        abandoned: Vec<Term>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FenceReason {
    OlderTerm,
    Contradicted,
    /// An incumbent leads and this claimant cannot prove a newer term.
    Incumbent,
    /// A DCS is configured and does not name this member leader.
    NotDcsLeader,
    /// A replica on a term provably older than the leader's (rule 7).
    BehindLeaderTerm,
    /// A replica on a term newer than the leader's, or on one the cluster
    /// abandoned (rules 6 and 7): it holds writes the leader lacks.
    DivergedFromLeader,
    /// A claimant whose history is unrelated to the last leader's (rule 8).
    UnrelatedHistory,
    /// A claimant older than a term a peer portal proved (rule 4).
    OlderThanPeer,
    /// Another member than the one that led on the last leader's term
    /// claims that very term (rule 8): a promotion that reused a term
    /// number without the history behind it (a PostgreSQL standby promoted
    /// without the last leader's timeline history picks the same timeline
    /// number again).
    ReusedTerm,
    /// An operator pinned another member as leader.
    OperatorPinned,
}

impl FenceReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FenceReason::OlderTerm => "older_term",
            FenceReason::Contradicted => "contradicted_by_replicas",
            FenceReason::Incumbent => "incumbent_leads",
            FenceReason::NotDcsLeader => "not_dcs_leader",
            FenceReason::BehindLeaderTerm => "behind_leader_term",
            FenceReason::DivergedFromLeader => "diverged_from_leader",
            FenceReason::UnrelatedHistory => "unrelated_history",
            FenceReason::OlderThanPeer => "older_than_peer_term",
            FenceReason::ReusedTerm => "reused_term",
            FenceReason::OperatorPinned => "operator_pinned_another",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    pub rise: u32,
    pub fall: u32,
}

#[derive(Debug, Clone)]
struct MemberState {
    health: Health,
    ok_streak: u32,
    fail_streak: u32,
    /// Latest observation; kept while the member is suspect, `None` once
    /// it is down.
    seen: Option<Observation>,
    last_report: Option<SystemTime>,
    last_error: Option<String>,
    /// Fence reason last reported, so each is logged once.
    fenced: Option<FenceReason>,
    generation: u64,
    /// The role of the last observation, kept once the member is down.
    last_role: Role,
    /// The term of the last observation and whether it was only a lower
    /// bound, kept once the member is down: a member that went down
    /// holding a newer history still holds it (rule 6).
    last_term: Option<Term>,
    last_floor: bool,
}

impl MemberState {
    fn fresh(generation: u64) -> MemberState {
        MemberState {
            health: Health::Unknown,
            ok_streak: 0,
            fail_streak: 0,
            seen: None,
            last_report: None,
            last_error: None,
            fenced: None,
            generation,
            last_role: Role::Unknown,
            last_term: None,
            last_floor: false,
        }
    }
}

/// The membership view of one cluster.
#[derive(Debug, Clone)]
pub struct View {
    thresholds: Thresholds,
    members: Vec<MemberState>,
    leader: Option<MemberId>,
    /// Term of the current leader, or of the last one when there is none.
    /// It only moves forward, except when a new election cannot relate the
    /// winner's term to it.
    leader_term: Option<Term>,
    /// The member `leader_term` was last seen with as leader.
    last_leader: Option<MemberId>,
    /// The member that led on `leader_term` itself; none when the term
    /// came from elsewhere (a peer, a history move, a going-back). Another
    /// member claiming that same term reused it (rule 8).
    term_holder: Option<MemberId>,
    /// Rule 9: no first election before the peers are heard.
    awaiting_peers: bool,
    /// The member an operator accepted as leader, while it holds.
    pinned: Option<MemberId>,
    /// Observed lineage steps `(id, previous)`, oldest first: they make
    /// [`View::order`] transitive across several promotions.
    lineage: VecDeque<(String, String)>,
    /// Terms that have led: a claimant older than any of them is fenced.
    past_leaders: VecDeque<Term>,
    /// Terms peer portals proved: a claimant older than any is fenced.
    peer_terms: VecDeque<Term>,
    /// Terms the cluster abandoned (rule 6: the manager went back to an
    /// older history and the member that held these followed it): no
    /// longer a reason to fence, also when a peer still reports one.
    abandoned: VecDeque<Term>,
    replicas: Vec<MemberId>,
    split_brain: bool,
    no_leader: Option<NoLeader>,
    epoch: u64,
    dcs: DcsView,
}

impl View {
    pub fn new(member_count: usize, thresholds: Thresholds) -> View {
        let fresh = MemberState::fresh(0);
        View {
            thresholds: Thresholds {
                rise: thresholds.rise.max(1),
                fall: thresholds.fall.max(1),
            },
            members: vec![fresh; member_count],
            leader: None,
            leader_term: None,
            last_leader: None,
            term_holder: None,
            awaiting_peers: false,
            pinned: None,
            lineage: VecDeque::new(),
            past_leaders: VecDeque::new(),
            peer_terms: VecDeque::new(),
            abandoned: VecDeque::new(),
            replicas: Vec::new(),
            split_brain: false,
            no_leader: Some(NoLeader::NoClaimant),
            epoch: 0,
            dcs: DcsView::Absent,
        }
    }

    /// A view whose leader a DCS names (rule 6); until the DCS is heard
    /// from there is no leader.
    pub fn with_dcs(mut self) -> View {
        self.dcs = DcsView::Waiting;
        self
    }

    /// A view whose portal has peers: it makes no first election before
    /// [`View::peers_heard`] or a peer's terms (rule 9).
    pub fn with_peers(mut self) -> View {
        self.awaiting_peers = true;
        self
    }

    /// A peer answered (with or without terms for this cluster), or the
    /// peers stayed silent for as long as the caller waits: rule 9 no
    /// longer holds the first election back.
    pub fn peers_heard(&mut self) -> Vec<Transition> {
        let mut out = Vec::new();
        if self.awaiting_peers {
            self.awaiting_peers = false;
            self.decide(&mut out);
        }
        out
    }

    /// Applies what the DCS says now and returns the changes it caused.
    /// Ignored when the view was built without a DCS.
    pub fn apply_dcs(&mut self, report: DcsReport) -> Vec<Transition> {
        let mut out = Vec::new();
        if self.dcs == DcsView::Absent {
            return out;
        }
        // An operator's pin yields when the DCS names another leader than
        // it did: the manager made a decision after the operator's.
        if let (Some(p), DcsReport::Named { leader, .. }) = (self.pinned, &report) {
            let before = match &self.dcs {
                DcsView::Named { leader, .. } => *leader,
                _ => None,
            };
            if *leader != before && *leader != Some(p) {
                self.pinned = None;
            }
        }
        self.dcs = match report {
            DcsReport::Named { leader, term } => DcsView::Named {
                leader: leader.filter(|m| *m < self.members.len()),
                term,
            },
            DcsReport::Unreachable { error } => DcsView::Unreachable {
                error,
                last_term: match &self.dcs {
                    DcsView::Named { term, .. } => *term,
                    DcsView::Unreachable { last_term, .. } => *last_term,
                    _ => None,
                },
            },
        };
        self.decide(&mut out);
        out
    }

    /// The only member the DCS lets lead now, or `None` for "nobody".
    /// `Err(())` when there is no DCS and the probes alone decide.
    fn dcs_choice(&self) -> Result<Option<MemberId>, ()> {
        match &self.dcs {
            DcsView::Absent => Err(()),
            DcsView::Waiting => Ok(None),
            DcsView::Named { leader, .. } => Ok(*leader),
            // Keep the incumbent only while its probes confirm it.
            DcsView::Unreachable { .. } => Ok(self.leader),
        }
    }

    pub fn leader(&self) -> Option<MemberId> {
        self.leader
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Applies one report and returns the changes it caused. Reports for
    /// unknown members are ignored.
    pub fn apply(&mut self, report: Report) -> Vec<Transition> {
        let mut out = Vec::new();
        let Thresholds { rise, fall } = self.thresholds;
        let Some(state) = self.members.get_mut(report.member) else {
            return out;
        };
        if report.generation < state.generation {
            return out;
        }
        if report.generation > state.generation {
            // The member moved: nothing known of the old address holds.
            if state.health == Health::Up {
                out.push(Transition::MemberDown {
                    member: report.member,
                    hard: true,
                });
            }
            *state = MemberState::fresh(report.generation);
        }
        state.last_report = Some(report.at);
        match report.outcome {
            Outcome::Observed(seen) => {
                if let Some(Term::Lineage {
                    id,
                    previous: Some(previous),
                }) = &seen.term
                {
                    self.learn_step(id.clone(), previous.clone());
                }
                let Some(state) = self.members.get_mut(report.member) else {
                    return out;
                };
                state.ok_streak = state.ok_streak.saturating_add(1);
                state.fail_streak = 0;
                state.last_error = None;
                state.last_role = seen.role;
                state.last_term = seen.term.clone();
                state.last_floor = seen.term_floor;
                state.seen = Some(seen);
                if state.health != Health::Up && state.ok_streak >= rise {
                    state.health = Health::Up;
                    out.push(Transition::MemberUp {
                        member: report.member,
                    });
                }
            }
            Outcome::Failed { hard, error } => {
                let Some(state) = self.members.get_mut(report.member) else {
                    return out;
                };
                state.ok_streak = 0;
                state.fail_streak = state.fail_streak.saturating_add(1);
                state.last_error = Some(error);
                // Rule 1: below `fall` soft failures the member is suspect
                // and keeps its claim; only down forgets it.
                if hard || state.fail_streak >= fall {
                    state.seen = None;
                    state.fenced = None;
                    if state.health != Health::Down {
                        state.health = Health::Down;
                        out.push(Transition::MemberDown {
                            member: report.member,
                            hard,
                        });
                    }
                }
            }
        }
        self.decide(&mut out);
        out
    }

    fn learn_step(&mut self, id: String, previous: String) {
        let step = (id, previous);
        if !self.lineage.contains(&step) {
            self.lineage.push_back(step);
            if self.lineage.len() > LINEAGE_MEMORY {
                self.lineage.pop_front();
            }
        }
    }

    /// Applies what a peer portal proved (rule 4) and returns the changes it
    /// caused. Proven terms only grow, so peers' answers can arrive in any
    /// order: a term already known, or older than one known, adds nothing.
    pub fn apply_peer(&mut self, peer: PeerTerms) -> Vec<Transition> {
        let mut out = Vec::new();
        self.awaiting_peers = false;
        for (id, previous) in peer.lineage.into_iter().take(LINEAGE_MEMORY) {
            self.learn_step(id, previous);
        }
        let term = peer.term;
        if self.abandoned.contains(&term) {
            // The cluster went back from this history (rule 6); a peer that
            // has not seen it yet still reports it.
            self.decide(&mut out);
            return out;
        }
        let known = self
            .peer_terms
            .iter()
            .any(|t| matches!(self.order(&term, t), Some(Ordering::Equal | Ordering::Less)));
        if !known {
            // Terms the new one supersedes add nothing any more.
            let kept: VecDeque<Term> = self
                .peer_terms
                .iter()
                .filter(|t| !self.newer(&term, t))
                .cloned()
                .collect();
            self.peer_terms = kept;
            self.peer_terms.push_back(term.clone());
            if self.peer_terms.len() > PEER_TERMS_MEMORY {
                self.peer_terms.pop_front();
            }
        }
        // A fresh portal (a restart) has no leader of its own to order
        // claimants against: the peer's leader is that reference (rule 8).
        if self.leader_term.is_none() && self.dcs == DcsView::Absent {
            self.leader_term = Some(term);
        }
        self.decide(&mut out);
        out
    }

    /// Applies an operator's decision (rule 8) and returns the changes it
    /// caused.
    pub fn apply_override(
        &mut self,
        decision: &Override,
    ) -> Result<Vec<Transition>, OverrideError> {
        let mut out = Vec::new();
        match decision {
            Override::AcceptLeader(member) => {
                let state = self
                    .members
                    .get(*member)
                    .ok_or(OverrideError::UnknownMember)?;
                let role = state.seen.as_ref().map_or(Role::Unknown, |s| s.role);
                if role != Role::Primary {
                    return Err(OverrideError::NotClaiming(role.as_str()));
                }
                let term = state.seen.as_ref().and_then(|s| s.term.clone());
                self.forget_terms();
                self.pinned = Some(*member);
                // The accepted member displaces any other incumbent.
                if self.leader != Some(*member) {
                    if let Some(old) = self.leader.take() {
                        out.push(Transition::LeaderLost { member: old });
                        let before = self.epoch;
                        if let Some(t) = term {
                            self.set_leader_term(t, Some(*member));
                        }
                        self.decide(&mut out);
                        if self.epoch == before {
                            self.epoch += 1;
                        }
                        return Ok(out);
                    }
                }
                if let Some(t) = term {
                    self.set_leader_term(t, Some(*member));
                }
            }
            Override::ForgetTerms => {
                self.forget_terms();
                self.pinned = None;
            }
        }
        self.decide(&mut out);
        Ok(out)
    }

    fn forget_terms(&mut self) {
        self.leader_term = None;
        self.last_leader = None;
        self.term_holder = None;
        self.past_leaders.clear();
        self.lineage.clear();
        self.peer_terms.clear();
        self.abandoned.clear();
    }

    /// The term a member currently claims, if it claims primary.
    fn claim(&self, member: MemberId) -> Option<Option<&Term>> {
        let seen = self.members.get(member)?.seen.as_ref()?;
        (seen.role == Role::Primary).then_some(seen.term.as_ref())
    }

    /// Orders two terms using everything observed: `Greater` when `a` is
    /// provably newer than `b`. Numbers compare as numbers; a lineage is
    /// newer than each of its known ancestors.
    pub fn order(&self, a: &Term, b: &Term) -> Option<Ordering> {
        match (a, b) {
            (Term::Lineage { id: a_id, .. }, Term::Lineage { id: b_id, .. }) => {
                if a_id == b_id {
                    Some(Ordering::Equal)
                } else if self.descends(a, b_id) {
                    Some(Ordering::Greater)
                } else if self.descends(b, a_id) {
                    Some(Ordering::Less)
                } else {
                    None
                }
            }
            _ => a.compare(b),
        }
    }

    /// Whether `ancestor` is in the history of `term`.
    fn descends(&self, term: &Term, ancestor: &str) -> bool {
        let Term::Lineage { id, previous } = term else {
            return false;
        };
        let mut seen = vec![id.as_str()];
        let mut next = previous.as_deref();
        while let Some(step) = next {
            if step == ancestor {
                return true;
            }
            if seen.contains(&step) {
                return false; // a cycle in reported ids: stop
            }
            seen.push(step);
            next = self
                .lineage
                .iter()
                .rev()
                .find(|(id, _)| id == step)
                .map(|(_, previous)| previous.as_str());
        }
        false
    }

    fn newer(&self, a: &Term, b: &Term) -> bool {
        self.order(a, b) == Some(Ordering::Greater)
    }

    /// Whether `term` is provably older than the current (or last) leader's.
    fn behind_leader(&self, term: Option<&Term>) -> bool {
        match (term, &self.leader_term) {
            (Some(term), Some(last)) => self.order(term, last) == Some(Ordering::Less),
            _ => false,
        }
    }

    /// Whether a replica's `term` is provably newer than the leader's, or
    /// one the cluster abandoned (rule 6): it holds writes the leader does
    /// not have, and serves no reads.
    fn diverged(&self, term: Option<&Term>) -> bool {
        let Some(term) = term else {
            return false;
        };
        self.abandoned.contains(term)
            || (self.leader.is_some()
                && self
                    .leader_term
                    .as_ref()
                    .is_some_and(|last| self.newer(term, last)))
    }

    /// A claimant that proves a term newer than the last leader's may lead
    /// before `rise` reports: the fast path of a promotion.
    fn proves_newer_than_last_leader(&self, term: Option<&Term>) -> bool {
        match (term, &self.leader_term) {
            (Some(term), Some(last)) => self.newer(term, last),
            _ => false,
        }
    }

    /// The one claimant provably newer than every other, if there is one.
    fn newest(&self, claimants: &[&Claimant]) -> Option<MemberId> {
        match claimants {
            [] => None,
            [only] => Some(only.id),
            _ => claimants.iter().find_map(|c| {
                let term = c.term.as_ref()?;
                claimants
                    .iter()
                    .filter(|o| o.id != c.id)
                    .all(|o| o.term.as_ref().is_some_and(|t| self.newer(term, t)))
                    .then_some(c.id)
            }),
        }
    }

    fn contradicted(&self, claimant: MemberId) -> bool {
        let mut against = 0usize;
        let mut reporting = 0usize;
        for (id, m) in self.members.iter().enumerate() {
            if id == claimant || m.health != Health::Up {
                continue;
            }
            if let Some(Observation {
                role: Role::Replica,
                upstream: Some(up),
                ..
            }) = &m.seen
            {
                // A replica that follows a replica (chained replication;
                // also when that replica has gone down since) says nothing
                // about who leads.
                if self
                    .members
                    .get(*up)
                    .is_some_and(|m| m.last_role == Role::Replica)
                {
                    continue;
                }
                reporting += 1;
                if *up != claimant {
                    against += 1;
                }
            }
        }
        reporting > 0 && against * 2 > reporting
    }

    /// Decides leader, replicas and fences from what is known now; bumps
    /// the epoch once if routing changed.
    fn decide(&mut self, out: &mut Vec<Transition>) {
        let before = (self.leader, self.replicas.clone());
        self.decide_pass(out);
        // Rule 8: with no leader, the last leader's member, now a replica,
        // follows another history: that history holds the cluster's data
        // now and becomes the one claimants must continue. Decided within
        // this same decision, so that deciding again changes nothing.
        if let Some(term) = self.history_moved() {
            self.set_leader_term(term, None);
            self.decide_pass(out);
        } else if let Some(term) = self.dcs_went_back() {
            let abandoned = self.go_back_to(term.clone());
            out.push(Transition::WentBack {
                to: term,
                abandoned,
            });
            self.decide_pass(out);
        }
        if (self.leader, &self.replicas) != (before.0, &before.1) {
            self.epoch += 1;
        }
    }

    fn decide_pass(&mut self, out: &mut Vec<Transition>) {
        // An operator's pin holds while its member claims primary and is
        // not down; then the rules decide again.
        if let Some(p) = self.pinned {
            let holds = self.claim(p).is_some() && self.members[p].health != Health::Down;
            if !holds {
                self.pinned = None;
            }
        }
        // An incumbent that now reports a term newer than the recorded one
        // (or a first one) moves the reference that successors must beat.
        if let Some(t) = self.leader.and_then(|l| self.claim(l)).flatten().cloned() {
            let forward = match &self.leader_term {
                None => true,
                Some(last) => self.newer(&t, last),
            };
            if forward {
                self.set_leader_term(t, self.leader);
            }
        }

        // Claimants: members whose latest report claims primary, minus those
        // fenced. Rising members count too: while they cannot lead yet, they
        // make an election ambiguous.
        let mut claimants: Vec<Claimant> = Vec::new();
        let mut fenced_now: Vec<(MemberId, FenceReason)> = Vec::new();
        let claims: Vec<(MemberId, Option<&Term>)> = (0..self.members.len())
            .filter_map(|id| self.claim(id).map(|term| (id, term)))
            .collect();
        let anyone_claims = !claims.is_empty();
        for &(id, term) in &claims {
            // Older than a past leader, or than another live claim: fenced,
            // so a write never goes to a member with an older term. While a
            // DCS answers, it names the leader: a member promoted behind its
            // back proves a newer term but cannot lead; it only keeps the
            // named one from leading (below).
            let dcs_answers = matches!(self.dcs, DcsView::Named { .. });
            let older = term.is_some_and(|t| {
                self.past_leaders
                    .iter()
                    .any(|past| self.order(t, past) == Some(Ordering::Less))
                    || (!dcs_answers
                        && claims
                            .iter()
                            .any(|(_, other)| other.is_some_and(|o| self.newer(o, t))))
            });
            let older_than_peer = term.is_some_and(|t| {
                self.peer_terms
                    .iter()
                    .any(|p| self.order(t, p) == Some(Ordering::Less))
            });
            // Rule 8: unless a DCS answers (and names whom it names), a
            // claim must continue the last leader's history; a claim with
            // no term proves nothing (whoever makes it, so that deciding
            // again on the same reports gives the same answer).
            let unrelated = !dcs_answers
                && match (term, &self.leader_term) {
                    (_, None) => false,
                    (Some(t), Some(last)) => self.order(t, last).is_none(),
                    (None, Some(_)) => true,
                };
            // Rule 8: the last leader's own term, claimed by another member.
            // A legitimate successor is promoted onto a newer term (a new
            // timeline, replication id or raft term); one on the same term
            // was promoted without the last leader's history.
            let reused = match (term, &self.leader_term, self.term_holder) {
                (Some(t), Some(last), Some(holder)) => {
                    holder != id && self.order(t, last) == Some(Ordering::Equal)
                }
                _ => false,
            };
            // Reasons that do not depend on who leads now come first, so
            // that deciding again on the same reports gives the same reason.
            if older {
                fenced_now.push((id, FenceReason::OlderTerm));
            } else if older_than_peer {
                fenced_now.push((id, FenceReason::OlderThanPeer));
            } else if self.contradicted(id) {
                fenced_now.push((id, FenceReason::Contradicted));
            } else if unrelated {
                fenced_now.push((id, FenceReason::UnrelatedHistory));
            } else if reused {
                fenced_now.push((id, FenceReason::ReusedTerm));
            } else {
                claimants.push(Claimant {
                    id,
                    term: term.cloned(),
                    up: self.members[id].health == Health::Up,
                });
            }
        }

        // Successors prove a term newer than the last leader's: they lead at
        // once, displacing an incumbent.
        let successors: Vec<&Claimant> = claimants
            .iter()
            .filter(|c| self.proves_newer_than_last_leader(c.term.as_ref()))
            .collect();
        // The incumbent keeps its privilege only while its term is the one it
        // was elected with (or a provably newer one).
        let incumbent = self.leader.filter(|l| {
            claimants.iter().any(|c| {
                c.id == *l
                    && c.up
                    && match (&c.term, &self.leader_term) {
                        (Some(t), Some(last)) => {
                            matches!(
                                self.order(t, last),
                                Some(Ordering::Equal | Ordering::Greater)
                            )
                        }
                        (None, _) => true,
                        (Some(_), None) => true,
                    }
            })
        });

        // Rule 9: a fresh view with peers waits for what they proved.
        let awaiting = self.awaiting_peers && self.leader.is_none() && self.leader_term.is_none();
        let (leader, split) = if let Some(p) = self.pinned {
            // The operator decided: the pinned member leads once up; every
            // other claimant is fenced, and so are no fences of its own.
            fenced_now.retain(|(id, _)| *id != p);
            for &(id, _) in &claims {
                if id != p {
                    fenced_now.retain(|(f, _)| *f != id);
                    fenced_now.push((id, FenceReason::OperatorPinned));
                }
            }
            let up = self.members[p].health == Health::Up;
            (up.then_some(p), false)
        } else if awaiting {
            (None, false)
        } else if let Ok(named) = self.dcs_choice() {
            // Rule 6: the DCS names, a probe confirms, the term rules still fence.
            for c in claimants.iter().filter(|c| Some(c.id) != named) {
                fenced_now.push((c.id, FenceReason::NotDcsLeader));
            }
            let confirmed = named.filter(|n| {
                claimants.iter().any(|c| {
                    c.id == *n && (c.up || self.proves_newer_than_last_leader(c.term.as_ref()))
                })
            });
            // The named member must not be provably older than another live
            // claim: the DCS answer may be stale (Sentinel names the new
            // primary about a second after promoting it), and the old
            // primary, woken from a stall, still says master. This holds
            // for the incumbent too: it loses the role, and nobody leads,
            // until the DCS names the newer claimant or the managers demote
            // it (a member promoted behind the DCS's back is demoted by
            // Patroni and by Sentinel). Likewise a named newcomer of a
            // history unrelated to the last leader's (an old primary
            // restarted empty) while another live claim continues that
            // history (the member the DCS is about to name).
            let continues = |term: &Term| {
                self.leader_term
                    .as_ref()
                    .and_then(|last| self.order(term, last))
                    .is_some_and(|o| o != Ordering::Less)
            };
            let stale = confirmed.and_then(|n| {
                let incumbent = Some(n) == self.leader;
                let named_term = self.claim(n).flatten();
                let unrelated = !incumbent
                    && named_term.is_none_or(|t| {
                        self.leader_term
                            .as_ref()
                            .is_some_and(|last| self.order(t, last).is_none())
                    });
                claims.iter().find_map(|(other, term)| {
                    let o = term.filter(|_| *other != n)?;
                    if named_term.is_some_and(|t| self.newer(o, t)) {
                        Some((n, FenceReason::OlderTerm))
                    } else if unrelated && continues(o) {
                        Some((n, FenceReason::UnrelatedHistory))
                    } else {
                        None
                    }
                })
            });
            if let Some(fence) = stale {
                fenced_now.push(fence);
            }
            (confirmed.filter(|_| stale.is_none()), false)
        } else if !successors.is_empty() {
            match self.newest(&successors) {
                Some(id) => (Some(id), false),
                None => (None, true),
            }
        } else if let Some(inc) = incumbent {
            let rivals: Vec<MemberId> = claimants
                .iter()
                .filter(|c| c.id != inc && c.up)
                .map(|c| c.id)
                .collect();
            for id in &rivals {
                fenced_now.push((*id, FenceReason::Incumbent));
            }
            // The incumbent settles it: rivals are fenced, not a split brain.
            (Some(inc), false)
        } else {
            let all: Vec<&Claimant> = claimants.iter().collect();
            match self.newest(&all) {
                Some(id) => (all.iter().any(|c| c.id == id && c.up).then_some(id), false),
                None => (None, claimants.len() > 1),
            }
        };

        self.no_leader = match leader {
            Some(_) => None,
            None if split => Some(NoLeader::SplitBrain),
            None if awaiting => Some(NoLeader::AwaitingPeers),
            None if self.dcs != DcsView::Absent => Some(NoLeader::Dcs),
            None if !claimants.is_empty() => Some(NoLeader::Rising),
            None if !anyone_claims => Some(NoLeader::NoClaimant),
            None => Some(NoLeader::Fenced),
        };
        if split != self.split_brain {
            self.split_brain = split;
            out.push(if split {
                Transition::SplitBrain {
                    claimants: claimants.iter().map(|c| c.id).collect(),
                }
            } else {
                Transition::SplitBrainResolved
            });
        }

        if leader != self.leader {
            let previous = self.leader;
            if let Some(old) = previous {
                out.push(Transition::LeaderLost { member: old });
            }
            if let Some(new) = leader {
                let term = self.claim(new).flatten().cloned();
                if let Some(t) = &term {
                    self.set_leader_term(t.clone(), Some(new));
                }
                self.last_leader = Some(new);
                self.members[new].fenced = None;
                // Elected on the fast path (rule 4) before `rise` reports:
                // it is eligible now, and says so.
                if self.members[new].health != Health::Up {
                    self.members[new].health = Health::Up;
                    out.push(Transition::MemberUp { member: new });
                }
                out.push(Transition::LeaderElected {
                    member: new,
                    term,
                    previous,
                });
            }
            self.leader = leader;
        } else if let Some(l) = leader {
            // Same leader: follow its term when it moved forward, or when it
            // was re-elected without its incumbent privilege.
            if let Some(t) = self.claim(l).flatten().cloned() {
                let moved = match &self.leader_term {
                    None => true,
                    Some(last) => incumbent.is_none() || self.newer(&t, last),
                };
                if moved {
                    self.set_leader_term(t, Some(l));
                }
            }
        }

        // Replicas: eligible members in the replica role, but for those on a
        // term older than the (new) leader's (rule 7).
        let mut replicas: Vec<MemberId> = Vec::new();
        for (id, m) in self.members.iter().enumerate() {
            let Some(seen) = m.seen.as_ref().filter(|s| s.role == Role::Replica) else {
                continue;
            };
            if self.behind_leader(seen.term.as_ref()) {
                fenced_now.push((id, FenceReason::BehindLeaderTerm));
            } else if self.diverged(seen.term.as_ref()) {
                fenced_now.push((id, FenceReason::DivergedFromLeader));
            } else if Some(id) != leader && m.health == Health::Up {
                replicas.push(id);
            }
        }

        // `fenced` is exactly this decision's set; each new reason is reported once.
        for (id, state) in self.members.iter_mut().enumerate() {
            let now = fenced_now.iter().find(|(f, _)| *f == id).map(|(_, r)| *r);
            if let Some(reason) = now {
                if state.fenced != now {
                    out.push(Transition::Fenced { member: id, reason });
                }
            }
            state.fenced = now;
        }

        if replicas != self.replicas {
            self.replicas = replicas;
        }
    }

    /// The history the last leader's member follows as a replica, when it
    /// is unrelated to the remembered one and nobody leads (rule 8).
    fn history_moved(&self) -> Option<Term> {
        if self.leader.is_some() || self.dcs != DcsView::Absent {
            return None;
        }
        let seen = self.members.get(self.last_leader?)?.seen.as_ref()?;
        let term = seen.term.as_ref()?;
        let last = self.leader_term.as_ref()?;
        (seen.role == Role::Replica && self.order(term, last).is_none()).then(|| term.clone())
    }

    /// Rule 6: the DCS names a member whose term is older than the last
    /// leader's, and the last leader's own member now reports a replica's
    /// role on a term no newer than the named one's, or the named member
    /// says the last leader's member streams from it (the manager rewound it
    /// onto the named member's history: Patroni 3.0.2 can hand the leader
    /// key back to an old primary that was frozen past its ttl), and no
    /// member outside the named one's followers reports a term newer than
    /// the named one's or only a lower bound. The newer
    /// history is then gone from the cluster: the named member's term
    /// becomes the reference.
    fn dcs_went_back(&self) -> Option<Term> {
        if self.leader.is_some() {
            return None;
        }
        let DcsView::Named {
            leader: Some(named),
            ..
        } = self.dcs
        else {
            return None;
        };
        let last_leader = self.last_leader.filter(|l| *l != named)?;
        let named_term = self.claim(named)??;
        let last = self.leader_term.as_ref()?;
        if self.order(named_term, last) != Some(Ordering::Less) {
            return None;
        }
        // Members the named one says stream from it are on its history,
        // whatever their own (possibly cached) reports say.
        // Only members whose own latest report is a replica's count: a
        // name in the list is the streaming client's say-so
        // (`application_name`), and a member that is down may still hold
        // the newer history whoever streams under its name.
        let followers: Vec<MemberId> = self
            .members
            .get(named)
            .and_then(|m| m.seen.as_ref())
            .map_or(&[][..], |seen| &seen.followers)
            .iter()
            .copied()
            .filter(|&f| {
                self.members
                    .get(f)
                    .and_then(|m| m.seen.as_ref())
                    .is_some_and(|seen| seen.role == Role::Replica)
            })
            .collect();
        // A term that is only a lower bound proves nothing here: the member
        // may still be on the newer history, and so may any other member
        // whose last report was one, down or not (down is not gone).
        let floors = self
            .members
            .iter()
            .enumerate()
            .any(|(id, m)| id != named && m.last_floor && !followers.contains(&id));
        if floors {
            return None;
        }
        let rewound = followers.contains(&last_leader) || {
            let seen = self.members.get(last_leader)?.seen.as_ref()?;
            seen.role == Role::Replica
                && seen.term.as_ref().is_some_and(|t| {
                    self.order(t, last) == Some(Ordering::Less)
                        && matches!(
                            self.order(t, named_term),
                            Some(Ordering::Less | Ordering::Equal)
                        )
                })
        };
        let newer_held = self.members.iter().enumerate().any(|(id, m)| {
            !followers.contains(&id)
                && m.last_term
                    .as_ref()
                    .is_some_and(|t| self.newer(t, named_term))
        });
        (rewound && !newer_held).then(|| named_term.clone())
    }

    /// Makes `term` the reference and forgets every remembered term newer
    /// than it (past leaders' and peers'), marking them abandoned.
    fn go_back_to(&mut self, term: Term) -> Vec<Term> {
        let newer: Vec<Term> = self
            .past_leaders
            .iter()
            .chain(self.peer_terms.iter())
            .filter(|t| self.newer(t, &term))
            .cloned()
            .collect();
        self.past_leaders.retain(|t| !newer.contains(t));
        self.peer_terms.retain(|t| !newer.contains(t));
        for t in &newer {
            if !self.abandoned.contains(t) {
                self.abandoned.push_back(t.clone());
                if self.abandoned.len() > PAST_LEADERS_MEMORY {
                    self.abandoned.pop_front();
                }
            }
        }
        self.set_leader_term(term, None);
        let mut given_up = newer;
        given_up.dedup();
        given_up
    }

    fn set_leader_term(&mut self, term: Term, holder: Option<MemberId>) {
        self.term_holder = holder;
        // A term that leads again (a timeline number reused after a
        // rewind) is no longer abandoned.
        self.abandoned.retain(|t| *t != term);
        if !self.past_leaders.contains(&term) {
            self.past_leaders.push_back(term.clone());
            if self.past_leaders.len() > PAST_LEADERS_MEMORY {
                self.past_leaders.pop_front();
            }
        }
        self.leader_term = Some(term);
    }

    pub fn snapshot(&self) -> Snapshot {
        let leader_position = self
            .leader
            .and_then(|l| self.members[l].seen.as_ref())
            .and_then(|s| s.position);
        Snapshot {
            epoch: self.epoch,
            leader: self.leader,
            replicas: self.replicas.clone(),
            split_brain: self.split_brain,
            leader_term: self.leader_term.clone(),
            dcs: self.dcs.clone(),
            no_leader: self.no_leader,
            peer_terms: self.peer_terms.iter().cloned().collect(),
            lineage: self.lineage.iter().cloned().collect(),
            pinned: self.pinned,
            members: self
                .members
                .iter()
                .map(|m| MemberView {
                    health: m.health,
                    role: m.seen.as_ref().map_or(Role::Unknown, |s| s.role),
                    term: m.seen.as_ref().and_then(|s| s.term.clone()),
                    upstream: m.seen.as_ref().and_then(|s| s.upstream),
                    last_report: m.last_report,
                    last_error: m.last_error.clone(),
                    fenced: m.fenced,
                    position: m.seen.as_ref().and_then(|s| s.position),
                    lag_bytes: match (leader_position, m.seen.as_ref()) {
                        (Some(lead), Some(seen)) if seen.role == Role::Replica => {
                            seen.position.map(|p| lead.saturating_sub(p))
                        }
                        _ => None,
                    },
                    delay: m.seen.as_ref().and_then(|s| s.delay),
                    generation: m.generation,
                    missed: if m.health == Health::Down {
                        0
                    } else {
                        m.fail_streak
                    },
                })
                .collect(),
        }
    }
}

struct Claimant {
    id: MemberId,
    term: Option<Term>,
    up: bool,
}
