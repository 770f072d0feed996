use std::time::{Duration, SystemTime};

use proptest::prelude::*;

use super::*;

const T: Thresholds = Thresholds { rise: 2, fall: 2 };

fn at(n: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(n)
}

fn lineage(id: &str, previous: Option<&str>) -> Term {
    Term::Lineage {
        id: id.to_string(),
        previous: previous.map(str::to_string),
    }
}

fn primary(term: Option<Term>) -> Outcome {
    Outcome::Observed(Observation {
        role: Role::Primary,
        term,
        upstream: None,
        position: None,
        delay: None,
        term_floor: false,
        followers: Vec::new(),
    })
}

fn replica(of: Option<MemberId>) -> Outcome {
    Outcome::Observed(Observation {
        role: Role::Replica,
        term: None,
        upstream: of,
        position: None,
        delay: None,
        term_floor: false,
        followers: Vec::new(),
    })
}

fn replica_on(term: Term, of: Option<MemberId>) -> Outcome {
    Outcome::Observed(Observation {
        role: Role::Replica,
        term: Some(term),
        upstream: of,
        position: None,
        delay: None,
        term_floor: false,
        followers: Vec::new(),
    })
}

fn hard() -> Outcome {
    Outcome::Failed {
        hard: true,
        error: "connection refused".into(),
    }
}

fn soft() -> Outcome {
    Outcome::Failed {
        hard: false,
        error: "timeout".into(),
    }
}

fn feed(view: &mut View, member: MemberId, outcome: Outcome) -> Vec<Transition> {
    view.apply(Report {
        member,
        generation: 0,
        at: at(0),
        outcome,
    })
}

#[test]
fn a_moved_member_is_forgotten_and_stale_reports_are_ignored() {
    let mut v = steady();
    let moved = |generation, outcome| Report {
        member: 0,
        generation,
        at: at(1),
        outcome,
    };
    // The leader's entry moved (generation 1): one report under it, even a
    // good one, starts the member afresh, so it no longer leads.
    let t = v.apply(moved(1, primary(Some(lineage("x", None)))));
    assert!(
        t.contains(&Transition::MemberDown {
            member: 0,
            hard: true
        }),
        "{t:?}"
    );
    assert!(t.contains(&Transition::LeaderLost { member: 0 }), "{t:?}");
    assert_eq!(v.leader(), None);
    assert_eq!(v.snapshot().members[0].generation, 1);
    assert_eq!(v.snapshot().members[0].health, Health::Unknown);
    // A late report about the old address changes nothing.
    let stale = v.snapshot();
    assert!(feed(&mut v, 0, primary(Some(lineage("x", None)))).is_empty());
    assert_eq!(v.snapshot(), stale);
    // Confirmed at the new address, it leads again.
    v.apply(moved(1, primary(Some(lineage("x", None)))));
    assert_eq!(v.leader(), Some(0));
}

/// Two members, `0` leading with term `x`, `1` replicating from it.
fn steady() -> View {
    let mut v = View::new(2, T);
    for _ in 0..2 {
        feed(&mut v, 0, primary(Some(lineage("x", None))));
        feed(&mut v, 1, replica(Some(0)));
    }
    assert_eq!(v.leader(), Some(0));
    v
}

#[test]
fn a_member_leads_only_after_rise_reports() {
    let mut v = View::new(2, T);
    feed(&mut v, 0, primary(Some(lineage("x", None))));
    assert_eq!(v.leader(), None);
    let t = feed(&mut v, 0, primary(Some(lineage("x", None))));
    assert_eq!(v.leader(), Some(0));
    assert!(t.contains(&Transition::MemberUp { member: 0 }));
    assert!(matches!(
        t.last(),
        Some(Transition::LeaderElected { member: 0, .. })
    ));
}

#[test]
fn replicas_are_listed_once_eligible() {
    let v = steady();
    let s = v.snapshot();
    assert_eq!(s.replicas, vec![1]);
    assert_eq!(s.members[1].upstream, Some(0));
    assert!(!s.split_brain);
}

#[test]
fn a_hard_failure_demotes_at_once() {
    let mut v = steady();
    let before = v.epoch();
    let t = feed(&mut v, 0, hard());
    assert_eq!(v.leader(), None);
    assert!(t.contains(&Transition::MemberDown {
        member: 0,
        hard: true
    }));
    assert!(t.contains(&Transition::LeaderLost { member: 0 }));
    assert!(v.epoch() > before);
}

#[test]
fn soft_failures_demote_after_fall() {
    let mut v = View::new(3, Thresholds { rise: 2, fall: 3 });
    for _ in 0..2 {
        feed(&mut v, 0, primary(Some(lineage("x", None))));
        feed(&mut v, 1, replica(Some(0)));
        feed(&mut v, 2, replica(Some(0)));
    }
    let steady = v.snapshot();
    assert_eq!(
        (steady.leader, steady.replicas.clone()),
        (Some(0), vec![1, 2])
    );
    // Below `fall`, leader and replica are suspect: they keep their claims
    // and places, nothing changes, no transition but none at all.
    for missed in 1..3 {
        assert!(feed(&mut v, 0, soft()).is_empty());
        assert!(feed(&mut v, 1, soft()).is_empty());
        let s = v.snapshot();
        assert_eq!(s.leader, Some(0), "after {missed} missed probes");
        assert_eq!(s.replicas, vec![1, 2]);
        assert_eq!(s.epoch, steady.epoch);
        assert_eq!(s.members[0].missed, missed);
        assert_eq!(s.members[0].role, Role::Primary);
        assert_eq!(s.members[0].term, Some(lineage("x", None)));
        assert_eq!(s.members[0].health, Health::Up);
    }
    // A good report clears the suspicion.
    feed(&mut v, 1, replica(Some(0)));
    assert_eq!(v.snapshot().members[1].missed, 0);
    // The `fall`-th failure demotes: the claim is forgotten.
    let t = feed(&mut v, 0, soft());
    assert!(t.contains(&Transition::MemberDown {
        member: 0,
        hard: false
    }));
    assert!(t.contains(&Transition::LeaderLost { member: 0 }));
    let s = v.snapshot();
    assert_eq!(s.leader, None);
    assert_eq!(s.members[0].health, Health::Down);
    assert_eq!(s.members[0].role, Role::Unknown);
}

#[test]
fn a_suspect_leader_is_not_replaced_by_an_unrelated_master() {
    // The issue's scenario: b leads after a promotion, a comes back empty,
    // then b misses one probe (a stall shorter than `fall` probes).
    let mut v = steady();
    feed(&mut v, 0, hard());
    feed(&mut v, 1, primary(Some(lineage("y", Some("x")))));
    assert_eq!(v.leader(), Some(1));
    for _ in 0..3 {
        feed(&mut v, 0, primary(Some(lineage("z", None))));
    }
    let t = feed(&mut v, 1, soft());
    assert!(t.is_empty(), "{t:?}");
    for _ in 0..3 {
        feed(&mut v, 0, primary(Some(lineage("z", None))));
        assert_eq!(v.leader(), Some(1));
    }
    feed(&mut v, 1, primary(Some(lineage("y", Some("x")))));
    assert_eq!(v.leader(), Some(1));
    assert_eq!(
        v.snapshot().members[0].fenced,
        Some(FenceReason::UnrelatedHistory)
    );
}

#[test]
fn an_unrelated_master_never_leads_on_its_own_even_once_the_leader_is_gone() {
    let mut v = steady();
    for _ in 0..3 {
        feed(&mut v, 1, primary(Some(lineage("z", None))));
    }
    assert_eq!(v.leader(), Some(0));
    // The leader dies for good: nobody leads, and the snapshot says why.
    feed(&mut v, 0, hard());
    for _ in 0..5 {
        feed(&mut v, 1, primary(Some(lineage("z", None))));
        assert_eq!(v.leader(), None);
    }
    let s = v.snapshot();
    assert_eq!(s.no_leader, Some(NoLeader::Fenced));
    assert_eq!(s.members[1].fenced, Some(FenceReason::UnrelatedHistory));
    assert!(!s.split_brain);
    // A claimant without any term is no proof either.
    let mut w = steady();
    feed(&mut w, 0, hard());
    for _ in 0..3 {
        feed(&mut w, 1, primary(None));
    }
    assert_eq!(w.leader(), None);
    // The old leader's history, continued, leads at once.
    feed(&mut v, 0, primary(Some(lineage("x", None))));
    feed(&mut v, 0, primary(Some(lineage("x", None))));
    assert_eq!(v.leader(), Some(0));
}

#[test]
fn an_operator_accepts_an_unrelated_master_or_forgets_the_terms() {
    let mut v = steady();
    feed(&mut v, 0, hard());
    for _ in 0..2 {
        feed(&mut v, 1, primary(Some(lineage("z", None))));
    }
    assert_eq!(v.leader(), None);
    // Only a member that claims primary can be accepted.
    assert_eq!(
        v.apply_override(&Override::AcceptLeader(0)),
        Err(OverrideError::NotClaiming("unknown"))
    );
    assert_eq!(
        v.apply_override(&Override::AcceptLeader(9)),
        Err(OverrideError::UnknownMember)
    );
    let before = v.epoch();
    let t = v
        .apply_override(&Override::AcceptLeader(1))
        .expect("1 claims primary");
    assert!(matches!(
        t.as_slice(),
        [Transition::LeaderElected { member: 1, .. }]
    ));
    assert_eq!(v.leader(), Some(1));
    assert!(v.epoch() > before);
    // The old history comes back: the pinned member keeps the role.
    feed(&mut v, 0, primary(Some(lineage("x", None))));
    feed(&mut v, 0, primary(Some(lineage("x", None))));
    assert_eq!(v.leader(), Some(1));
    assert_eq!(
        v.snapshot().members[0].fenced,
        Some(FenceReason::OperatorPinned)
    );

    // Forgetting the terms: the rules decide as on a fresh start, here a
    // lone claimant that is up (it was, as a replica).
    let mut w = steady();
    feed(&mut w, 0, hard());
    feed(&mut w, 1, primary(Some(lineage("z", None))));
    assert_eq!(w.leader(), None);
    w.apply_override(&Override::ForgetTerms).expect("always");
    assert_eq!(w.leader(), Some(1));
    assert_eq!(w.snapshot().leader_term, Some(lineage("z", None)));
}

#[test]
fn accepting_a_member_displaces_an_incumbent_of_another_history() {
    let mut v = steady();
    for _ in 0..2 {
        feed(&mut v, 1, primary(Some(lineage("z", None))));
    }
    assert_eq!(v.leader(), Some(0));
    let t = v
        .apply_override(&Override::AcceptLeader(1))
        .expect("1 claims primary");
    assert!(t.contains(&Transition::LeaderLost { member: 0 }), "{t:?}");
    assert_eq!(v.leader(), Some(1));
    assert_eq!(
        v.snapshot().members[0].fenced,
        Some(FenceReason::OperatorPinned)
    );
    // Once the pinned member is down, the rules decide: 0's history is
    // unrelated to the accepted one.
    feed(&mut v, 1, hard());
    assert_eq!(v.leader(), None);
    assert_eq!(
        v.snapshot().members[0].fenced,
        Some(FenceReason::UnrelatedHistory)
    );
}

#[test]
fn a_term_a_peer_proved_fences_an_older_claimant_here() {
    // This portal cannot reach the promoted member 1; the old primary 0
    // keeps claiming its old history. A peer proved y (after x).
    let mut v = steady();
    feed(&mut v, 1, hard());
    assert_eq!(v.leader(), Some(0));
    let t = v.apply_peer(PeerTerms {
        term: lineage("y", Some("x")),
        lineage: vec![("y".into(), "x".into())],
    });
    assert!(t.contains(&Transition::LeaderLost { member: 0 }), "{t:?}");
    assert!(t.contains(&Transition::Fenced {
        member: 0,
        reason: FenceReason::OlderThanPeer
    }));
    assert_eq!(v.leader(), None);
    // An older or equal peer term adds nothing; the same answer twice
    // changes nothing.
    assert!(v
        .apply_peer(PeerTerms {
            term: lineage("x", None),
            lineage: vec![],
        })
        .is_empty());
    assert_eq!(v.snapshot().peer_terms, vec![lineage("y", Some("x"))]);
    // Once this portal reaches member 1, it leads at its first report.
    feed(&mut v, 1, primary(Some(lineage("y", Some("x")))));
    assert_eq!(v.leader(), Some(1));
    // Numbers: a peer's newer timeline fences the older primary.
    let mut w = View::new(2, Thresholds { rise: 1, fall: 1 });
    feed(&mut w, 0, primary(Some(Term::Number(3))));
    assert_eq!(w.leader(), Some(0));
    w.apply_peer(PeerTerms {
        term: Term::Number(4),
        lineage: vec![],
    });
    assert_eq!(w.leader(), None);
}

#[test]
fn a_fresh_view_with_peers_makes_no_first_election_before_hearing_them() {
    // A restarted portal: the real primary (member 1) is stalled and does
    // not report; an empty rogue (member 0) is the only live claimant.
    let mut v = View::new(2, T).with_peers();
    for _ in 0..3 {
        feed(&mut v, 0, primary(Some(lineage("z", None))));
    }
    assert_eq!(v.leader(), None);
    assert_eq!(v.snapshot().no_leader, Some(NoLeader::AwaitingPeers));
    // The peer proved y (after x): the rogue is unrelated to it.
    v.apply_peer(PeerTerms {
        term: lineage("y", Some("x")),
        lineage: vec![("y".into(), "x".into())],
    });
    assert_eq!(v.leader(), None);
    assert_eq!(
        v.snapshot().members[0].fenced,
        Some(FenceReason::UnrelatedHistory)
    );
    feed(&mut v, 1, primary(Some(lineage("y", Some("x")))));
    feed(&mut v, 1, primary(Some(lineage("y", Some("x")))));
    assert_eq!(v.leader(), Some(1));

    // Peers that know nothing (or are silent past the wait): the rules
    // decide alone.
    let mut w = View::new(2, T).with_peers();
    for _ in 0..2 {
        feed(&mut w, 0, primary(Some(lineage("z", None))));
    }
    assert_eq!(w.leader(), None);
    w.peers_heard();
    assert_eq!(w.leader(), Some(0));
    // Only the first election waits: later ones do not.
    assert!(w.peers_heard().is_empty());
}

#[test]
fn the_history_moves_on_when_the_last_leader_follows_another() {
    // A portal that (with nothing to go on) elected an empty rogue z; the
    // rogue is then made a replica of the real primary y and syncs: it now
    // holds y's history, and so does the cluster.
    let mut v = View::new(2, T);
    for _ in 0..2 {
        feed(&mut v, 0, primary(Some(lineage("z", None))));
    }
    assert_eq!(v.leader(), Some(0));
    feed(&mut v, 1, primary(Some(lineage("y", Some("x")))));
    feed(&mut v, 1, primary(Some(lineage("y", Some("x")))));
    assert_eq!(v.leader(), Some(0), "the incumbent keeps the role");
    // The rogue becomes a replica, still on its own id until it syncs.
    feed(&mut v, 0, replica_on(lineage("z", None), Some(1)));
    assert_eq!(v.leader(), None);
    assert_eq!(
        v.snapshot().members[1].fenced,
        Some(FenceReason::UnrelatedHistory)
    );
    // Synced: it reports y's id; y's history is the cluster's now.
    feed(&mut v, 0, replica_on(lineage("y", Some("x")), Some(1)));
    assert_eq!(v.leader(), Some(1));
    // A replica of another history that never led moves nothing.
    let mut w = steady();
    feed(&mut w, 0, hard());
    feed(&mut w, 1, replica_on(lineage("q", None), None));
    for _ in 0..2 {
        feed(&mut w, 1, primary(Some(lineage("q", None))));
    }
    assert_eq!(w.leader(), None);
}

#[test]
fn a_restarted_portal_orders_claimants_by_its_peer_term() {
    // A fresh view (a restarted portal) sees the real primary y and an
    // unrelated empty master z: by itself that is a split brain; the peer's
    // proven term settles it.
    let mut v = View::new(2, T);
    v.apply_peer(PeerTerms {
        term: lineage("y", Some("x")),
        lineage: vec![("y".into(), "x".into())],
    });
    for _ in 0..2 {
        feed(&mut v, 0, primary(Some(lineage("z", None))));
        feed(&mut v, 1, primary(Some(lineage("y", Some("x")))));
    }
    assert_eq!(v.leader(), Some(1));
    assert!(!v.snapshot().split_brain);
    assert_eq!(
        v.snapshot().members[0].fenced,
        Some(FenceReason::UnrelatedHistory)
    );
}

#[test]
fn a_promoted_replica_leads_at_its_first_report() {
    let mut v = steady();
    feed(&mut v, 0, hard());
    // The replica, promoted: new id, previous = the old primary's id.
    feed(&mut v, 1, primary(Some(lineage("y", Some("x")))));
    assert_eq!(v.leader(), Some(1));
}

#[test]
fn a_promoted_replica_displaces_a_live_old_primary() {
    let mut v = steady();
    let t = feed(&mut v, 1, primary(Some(lineage("y", Some("x")))));
    assert_eq!(v.leader(), Some(1));
    assert!(t.contains(&Transition::LeaderLost { member: 0 }));
    assert!(t.contains(&Transition::Fenced {
        member: 0,
        reason: FenceReason::OlderTerm
    }));
    // The old primary still says primary with the superseded id: fenced.
    for _ in 0..3 {
        feed(&mut v, 0, primary(Some(lineage("x", None))));
        assert_eq!(v.leader(), Some(1));
    }
}

#[test]
fn a_restarted_empty_master_does_not_displace_the_incumbent() {
    let mut v = steady();
    feed(&mut v, 0, hard());
    feed(&mut v, 1, primary(Some(lineage("y", Some("x")))));
    assert_eq!(v.leader(), Some(1));
    // Member 0 comes back empty, claiming primary with a fresh id; the
    // incumbent misses one probe in two (fall 2: it stays suspect).
    for i in 0..6 {
        feed(&mut v, 0, primary(Some(lineage("z", None))));
        if i % 2 == 0 {
            assert!(feed(&mut v, 1, soft()).is_empty());
        } else {
            feed(&mut v, 1, primary(Some(lineage("y", Some("x")))));
        }
        assert_eq!(v.leader(), Some(1));
    }
    let s = v.snapshot();
    assert!(!s.split_brain, "the incumbent settles it");
    assert_eq!(s.members[0].fenced, Some(FenceReason::UnrelatedHistory));
    assert_eq!(s.members[1].fenced, None);
}

#[test]
fn two_unordered_masters_without_incumbent_mean_no_leader() {
    let mut v = View::new(2, T);
    let mut transitions = Vec::new();
    for _ in 0..3 {
        transitions.extend(feed(&mut v, 0, primary(Some(lineage("a", None)))));
        transitions.extend(feed(&mut v, 1, primary(Some(lineage("b", None)))));
        assert_eq!(v.leader(), None, "the first to rise must not win");
    }
    assert!(v.snapshot().split_brain);
    assert!(transitions.contains(&Transition::SplitBrain {
        claimants: vec![0, 1]
    }));
}

#[test]
fn split_brain_clears_when_one_stops_claiming() {
    let mut v = View::new(2, T);
    for _ in 0..2 {
        feed(&mut v, 0, primary(Some(lineage("a", None))));
        feed(&mut v, 1, primary(Some(lineage("b", None))));
    }
    assert!(v.snapshot().split_brain);
    let t = feed(&mut v, 1, replica(Some(0)));
    assert!(t.contains(&Transition::SplitBrainResolved));
    assert_eq!(v.leader(), Some(0));
}

#[test]
fn a_restarted_old_primary_does_not_block_a_promotion() {
    let mut v = steady();
    feed(&mut v, 0, hard());
    // The old primary is back first, empty, with a fresh id, for longer
    // than `rise`: it does not lead...
    for _ in 0..4 {
        feed(&mut v, 0, primary(Some(lineage("z", None))));
    }
    assert_eq!(v.snapshot().members[0].health, Health::Up);
    assert_eq!(v.leader(), None);
    // ...then the replica is promoted: its lineage continues the last leader's.
    feed(&mut v, 1, primary(Some(lineage("y", Some("x")))));
    assert_eq!(v.leader(), Some(1));
}

#[test]
fn numeric_terms_order_claimants() {
    let mut v = View::new(3, Thresholds { rise: 1, fall: 1 });
    feed(&mut v, 0, primary(Some(Term::Number(3))));
    assert_eq!(v.leader(), Some(0));
    feed(&mut v, 1, primary(Some(Term::Number(4))));
    assert_eq!(v.leader(), Some(1));
    // The old one keeps claiming with term 3: fenced, never leader again.
    feed(&mut v, 1, hard());
    feed(&mut v, 0, primary(Some(Term::Number(3))));
    assert_eq!(v.leader(), None);
    // Another member on 1's own term 4 was not promoted after 1 (that
    // gives a newer term): it reused the number without 1's history.
    feed(&mut v, 2, primary(Some(Term::Number(4))));
    assert_eq!(v.leader(), None);
    assert_eq!(
        v.snapshot().members[2].fenced,
        Some(FenceReason::ReusedTerm)
    );
    feed(&mut v, 2, primary(Some(Term::Number(5))));
    assert_eq!(v.leader(), Some(2));
}

#[test]
fn a_timeline_number_reused_by_another_member_is_not_the_same_history() {
    // PostgreSQL picks the next timeline number from the history files it
    // knows: b promoted onto timeline 2 and took writes; a, promoted later
    // without b's history file, picks timeline 2 again (hostile test B1).
    let tl = |n| Term::Timeline {
        system: 7,
        timeline: n,
    };
    let mut v = View::new(2, T);
    for _ in 0..2 {
        feed(&mut v, 0, primary(Some(tl(1))));
        feed(&mut v, 1, replica_on(tl(1), Some(0)));
    }
    assert_eq!(v.leader(), Some(0));
    feed(&mut v, 0, hard());
    feed(&mut v, 1, primary(Some(tl(2))));
    assert_eq!(v.leader(), Some(1));
    feed(&mut v, 1, hard());
    for _ in 0..3 {
        feed(&mut v, 0, primary(Some(tl(2))));
        assert_eq!(v.leader(), None, "a's timeline 2 is not b's");
    }
    let s = v.snapshot();
    assert_eq!(s.members[0].fenced, Some(FenceReason::ReusedTerm));
    // b comes back on its timeline 2: its own term, it leads again once
    // it has risen.
    for _ in 0..2 {
        feed(&mut v, 1, primary(Some(tl(2))));
    }
    assert_eq!(v.leader(), Some(1));
    // Under a DCS that names a on the reused number (Patroni handing the
    // key back, hostile test B2): held too.
    let mut w = dcs_steady();
    w.apply_dcs(named(Some(1), 11));
    feed(&mut w, 1, pg(2));
    assert_eq!(w.leader(), Some(1));
    w.apply_dcs(named(Some(0), 12));
    feed(&mut w, 1, replica_on(Term::Number(2), Some(0)));
    for _ in 0..3 {
        feed(&mut w, 0, pg(2));
        assert_eq!(w.leader(), None, "the DCS named a reused timeline");
    }
    assert_eq!(
        w.snapshot().members[0].fenced,
        Some(FenceReason::ReusedTerm)
    );
    // The operator decides: accept-leader.
    w.apply_override(&Override::AcceptLeader(0))
        .expect("0 claims");
    assert_eq!(w.leader(), Some(0));
}

#[test]
fn equal_numeric_terms_are_split_brain_and_an_incumbent_keeps_the_role() {
    let mut v = View::new(2, T);
    for _ in 0..2 {
        feed(&mut v, 0, primary(Some(Term::Number(5))));
        feed(&mut v, 1, primary(Some(Term::Number(5))));
    }
    assert_eq!(v.leader(), None);
    assert!(v.snapshot().split_brain);

    let mut v = View::new(2, T);
    for _ in 0..2 {
        feed(&mut v, 0, primary(Some(Term::Number(5))));
    }
    assert_eq!(v.leader(), Some(0));
    for _ in 0..3 {
        feed(&mut v, 1, primary(Some(Term::Number(5))));
    }
    assert_eq!(v.leader(), Some(0), "incumbent keeps the role");
    // On the incumbent's own term: reused, whatever else it is.
    assert_eq!(
        v.snapshot().members[1].fenced,
        Some(FenceReason::ReusedTerm)
    );
}

#[test]
fn a_claimant_contradicted_by_the_replicas_does_not_lead() {
    let mut v = View::new(4, Thresholds { rise: 1, fall: 1 });
    feed(&mut v, 1, replica(Some(0)));
    feed(&mut v, 2, replica(Some(0)));
    feed(&mut v, 3, primary(Some(lineage("q", None))));
    assert_eq!(v.leader(), None, "two replicas follow member 0, not 3");
    feed(&mut v, 0, primary(Some(lineage("p", None))));
    assert_eq!(v.leader(), Some(0));
}

#[test]
fn reports_for_unknown_members_are_ignored() {
    let mut v = View::new(1, T);
    assert!(feed(&mut v, 7, hard()).is_empty());
}

#[test]
fn term_compare_is_antisymmetric_for_lineages() {
    let x = lineage("x", None);
    let y = lineage("y", Some("x"));
    assert_eq!(y.compare(&x), Some(Ordering::Greater));
    assert_eq!(x.compare(&y), Some(Ordering::Less));
    assert_eq!(x.compare(&lineage("z", None)), None);
    assert_eq!(x.compare(&Term::Number(1)), None);
}

// ---- properties over generated report sequences ---------------------------

/// The test's own notion of "provably newer", written independently of the
/// view: numbers compare; a lineage is newer than every ancestor reachable
/// through the `(id, previous)` steps observed so far.
fn oracle_newer(a: &Term, b: &Term, edges: &[(String, String)]) -> bool {
    match (a, b) {
        (Term::Number(a), Term::Number(b)) => a > b,
        (Term::Lineage { id: a, .. }, Term::Lineage { id: b, .. }) => {
            let mut frontier = vec![a.clone()];
            let mut visited = std::collections::HashSet::new();
            while let Some(id) = frontier.pop() {
                for (child, parent) in edges {
                    if *child == id && visited.insert(parent.clone()) {
                        if parent == b {
                            return a != b;
                        }
                        frontier.push(parent.clone());
                    }
                }
            }
            false
        }
        _ => false,
    }
}

/// Terms as the probes report them: numbers; one Redis history `r0 <- r1
/// <- ... <- r11` (an id always has the same predecessor, as a replication
/// id does); fresh ids from a large space, as a master restarted empty
/// makes (`f<n>`); and forks `g<n>` that continue `r<n mod 12>`.
fn term_strategy() -> impl Strategy<Value = Term> {
    prop_oneof![
        (0u64..6).prop_map(Term::Number),
        (0usize..12).prop_map(|i| {
            let previous = i.checked_sub(1).map(|p| format!("r{p}"));
            lineage(&format!("r{i}"), previous.as_deref())
        }),
        any::<u32>().prop_map(|n| lineage(&format!("f{n}"), None)),
        (0u32..64).prop_map(|n| lineage(&format!("g{n}"), Some(&format!("r{}", n % 12)))),
    ]
}

fn outcome_strategy(members: usize) -> impl Strategy<Value = Outcome> {
    prop_oneof![
        3 => term_strategy().prop_map(|t| primary(Some(t))),
        1 => Just(primary(None)),
        2 => (0..members + 1).prop_map(move |m| replica((m < members).then_some(m))),
        2 => (0..members + 1, term_strategy()).prop_map(move |(m, t)| replica_on(
            t,
            (m < members).then_some(m)
        )),
        3 => any::<bool>().prop_map(|hard| Outcome::Failed {
            hard,
            error: "e".into()
        }),
    ]
}

/// The step of the main property: a probe report or a peer portal's term.
#[derive(Debug, Clone)]
enum Event {
    Probe(usize, Outcome),
    Peer(Term),
}

fn scenario() -> impl Strategy<Value = (usize, u32, u32, Vec<Event>)> {
    (2usize..5, 1u32..4, 1u32..4).prop_flat_map(|(n, rise, fall)| {
        let event = prop_oneof![
            12 => (0..n, outcome_strategy(n)).prop_map(|(m, o)| Event::Probe(m, o)),
            1 => term_strategy().prop_map(Event::Peer),
        ];
        (
            Just(n),
            Just(rise),
            Just(fall),
            prop::collection::vec(event, 1..150),
        )
    })
}

/// The lineage step a term carries, if any.
fn edge_of(term: &Term) -> Option<(String, String)> {
    match term {
        Term::Lineage {
            id,
            previous: Some(p),
        } => Some((id.clone(), p.clone())),
        _ => None,
    }
}

/// Rule 8's one way for the reference history to move on, as the property
/// sees it: the leader was lost or changed in this step, and the last
/// leader's member, now a replica, reports a history unrelated to the
/// reference. That history, if any.
fn moved_history(
    reference: &Option<Term>,
    last_leader_member: Option<MemberId>,
    last: &Snapshot,
    now: &Snapshot,
    edges: &[(String, String)],
) -> Option<Term> {
    if now.leader.is_some() && now.leader == last.leader {
        return None;
    }
    let r = reference.as_ref()?;
    let m = last_leader_member?;
    match (now.members[m].role, &now.members[m].term) {
        (Role::Replica, Some(tr))
            if !same_or_newer(tr, r, edges) && !oracle_newer(r, tr, edges) =>
        {
            Some(tr.clone())
        }
        _ => None,
    }
}

/// `a` is the same term as `b` (lineages by id) or provably newer.
fn same_or_newer(a: &Term, b: &Term, edges: &[(String, String)]) -> bool {
    let same = match (a, b) {
        (Term::Lineage { id: x, .. }, Term::Lineage { id: y, .. }) => x == y,
        _ => a == b,
    };
    same || oracle_newer(a, b, edges)
}

/// A probe report or a DCS report, for the DCS property.
#[derive(Debug, Clone)]
enum Step {
    Probe(usize, Outcome),
    Dcs(DcsReport),
}

fn dcs_scenario() -> impl Strategy<Value = (usize, Vec<Step>)> {
    (2usize..4).prop_flat_map(|n| {
        let step = prop_oneof![
            4 => (0..n, outcome_strategy(n)).prop_map(|(m, o)| Step::Probe(m, o)),
            1 => ((0..n + 1), 0u64..5).prop_map(move |(m, term)| Step::Dcs(DcsReport::Named {
                leader: (m < n).then_some(m),
                term: Some(term),
            })),
            1 => Just(Step::Dcs(DcsReport::Unreachable { error: "down".into() })),
        ];
        (Just(n), prop::collection::vec(step, 1..120))
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(2000)))]

    #[test]
    fn with_a_dcs_only_the_named_member_leads((n, steps) in dcs_scenario(), rise in 1u32..4, fall in 1u32..4) {
        let mut v = View::new(n, Thresholds { rise, fall }).with_dcs();
        let mut named: Option<MemberId> = None;
        let mut reachable = false;
        for step in steps {
            let before = v.leader();
            match step {
                Step::Probe(member, outcome) => { v.apply(Report { member, generation: 0, at: at(0), outcome }); }
                Step::Dcs(report) => {
                    if let DcsReport::Named { leader, .. } = &report {
                        named = *leader;
                        reachable = true;
                    } else {
                        reachable = false;
                    }
                    v.apply_dcs(report);
                }
            }
            let s = v.snapshot();
            if let Some(l) = s.leader {
                // The leader is the member the DCS names, or (DCS away) the
                // leader it already was; and its own probe says primary.
                if reachable {
                    prop_assert_eq!(Some(l), named);
                } else {
                    prop_assert_eq!(Some(l), before);
                }
                prop_assert_eq!(s.members[l].role, Role::Primary);
                prop_assert!(s.members[l].fenced.is_none());
                // No live claim proves the leader superseded (a stale DCS
                // answer, or a promotion the DCS has not named yet).
                if let Some(lt) = &s.members[l].term {
                    for (id, m) in s.members.iter().enumerate() {
                        if id != l && m.role == Role::Primary {
                            let newer = m.term.as_ref().is_some_and(|t| v.order(t, lt) == Some(std::cmp::Ordering::Greater));
                            prop_assert!(!newer, "leader {} on {} while {} claims newer {:?}", l, lt, id, m.term);
                        }
                    }
                }
            }
            prop_assert!(!s.split_brain);
            for (id, m) in s.members.iter().enumerate() {
                if Some(id) != s.leader && m.fenced.is_none() && m.role == Role::Primary && m.health == Health::Up {
                    // A named, confirmed, up primary leads at once; any
                    // other up primary must carry a fence reason.
                    prop_assert!(false, "member {} claims primary, is neither leader nor fenced: {:?}", id, s);
                }
            }
        }
    }

    #[test]
    fn view_invariants_hold((n, rise, fall, events) in scenario()) {
        let mut v = View::new(n, Thresholds { rise, fall });
        let mut leaders_terms: Vec<Term> = Vec::new();
        let mut last_leader_term: Option<Term> = None;
        let mut reported_by_leaders: Vec<Term> = Vec::new();
        let mut edges: Vec<(String, String)> = Vec::new();
        // The history every leader must continue (rule 8): the last
        // leader's term, or a peer's before any leader was seen.
        let mut reference: Option<Term> = None;
        let mut peer_terms: Vec<Term> = Vec::new();
        let mut last_leader_member: Option<MemberId> = None;
        // Consecutive failed probes per member, counted by the test.
        let mut misses = vec![0u32; n];
        let mut last = v.snapshot();
        for (i, event) in events.into_iter().enumerate() {
            let (member, outcome) = match event {
                Event::Peer(term) => {
                    edges.extend(edge_of(&term));
                    let lineage: Vec<(String, String)> = edge_of(&term).into_iter().collect();
                    v.apply_peer(PeerTerms { term: term.clone(), lineage });
                    if reference.is_none() {
                        reference = Some(term.clone());
                    }
                    peer_terms.push(term);
                    let s = v.snapshot();
                    if s.leader.is_none() {
                        if let Some(tr) = moved_history(&reference, last_leader_member, &last, &s, &edges) {
                            reference = Some(tr);
                        }
                    }
                    if let Some(l) = s.leader {
                        if let Some(t) = &s.members[l].term {
                            for p in &peer_terms {
                                prop_assert!(!oracle_newer(p, t, &edges),
                                    "leader {} on {} older than the peer term {}", l, t, p);
                            }
                        }
                    }
                    prop_assert!(s.epoch >= last.epoch);
                    // A peer's term can elect (a successor of it): the
                    // leader's history is the reference from here on.
                    if let Some(l) = s.leader {
                        if let Some(t) = &s.members[l].term {
                            reference = Some(t.clone());
                            last_leader_term = Some(t.clone());
                            if leaders_terms.last() != Some(t) {
                                leaders_terms.push(t.clone());
                            }
                        }
                        last_leader_member = Some(l);
                    }
                    last = s;
                    continue;
                }
                Event::Probe(member, outcome) => (member, outcome),
            };
            if let Outcome::Observed(Observation { term: Some(t), .. }) = &outcome {
                edges.extend(edge_of(t));
            }
            // A term the sitting leader reports counts as a leader's term.
            if let Outcome::Observed(Observation { role: Role::Primary, term: Some(t), .. }) = &outcome {
                if last.leader == Some(member) {
                    last_leader_term = Some(t.clone());
                    reported_by_leaders.push(t.clone());
                    // It is the reference from now on when it is the
                    // leader's first term or a newer one, even if the
                    // leader loses its role in the same step.
                    if reference.as_ref().is_none_or(|r| oracle_newer(t, r, &edges)) {
                        reference = Some(t.clone());
                    }
                }
            }
            let soft = matches!(outcome, Outcome::Failed { hard: false, .. });
            misses[member] = match outcome {
                Outcome::Observed(_) => 0,
                Outcome::Failed { .. } => misses[member] + 1,
            };
            let transitions = v.apply(Report { member, generation: 0, at: at(i as u64), outcome });
            let s = v.snapshot();

            // The epoch never goes back, and moves exactly when routing changes.
            let routing_changed = s.leader != last.leader || s.replicas != last.replicas;
            prop_assert_eq!(s.epoch, last.epoch + u64::from(routing_changed));

            let moved = moved_history(&reference, last_leader_member, &last, &s, &edges);

            // Rule 1: fewer than `fall` soft failures in a row decide nothing.
            if soft && misses[member] < fall {
                prop_assert!(transitions.is_empty(), "a suspect changed things: {:?}", transitions);
                prop_assert!(!routing_changed, "a suspect changed routing");
                prop_assert_eq!(&s.members[member].role, &last.members[member].role);
                prop_assert_eq!(&s.members[member].term, &last.members[member].term);
            }

            if let Some(l) = s.leader {
                // The leader currently claims primary and is not down.
                prop_assert_eq!(s.members[l].role, Role::Primary);
                prop_assert!(s.members[l].health != Health::Down);
                prop_assert!(!s.replicas.contains(&l));
                // Never a leader with a term older than an earlier leader's
                // or than a term a peer proved.
                if let Some(term) = &s.members[l].term {
                    for earlier in leaders_terms.iter().chain(&peer_terms) {
                        prop_assert!(!oracle_newer(earlier, term, &edges),
                            "leader term {} older than earlier or peer term {}", term, earlier);
                    }
                }
                // Rule 8: every leader continues the reference history.
                match (&reference, &s.members[l].term) {
                    (Some(r), Some(t)) => prop_assert!(same_or_newer(t, r, &edges)
                        || moved.as_ref().is_some_and(|tr| same_or_newer(t, tr, &edges)),
                        "leader {} on {} does not continue {}", l, t, r),
                    (Some(r), None) => prop_assert_eq!(last.leader, Some(l),
                        "a newcomer with no term took over from history {}", r),
                    (None, _) => {}
                }
                // A leader changed only to a member that is eligible or
                // proves a newer term than its predecessor.
                if last.leader != s.leader {
                    let eligible = s.members[l].health == Health::Up;
                    // ...than the last leader's term, or the one the
                    // previous leader reports now.
                    let previous_now = last.leader.and_then(|p| s.members[p].term.clone());
                    let proves = s.members[l].term.as_ref().is_some_and(|t| {
                        [&last_leader_term, &previous_now]
                            .into_iter()
                            .flatten()
                            .chain(&leaders_terms)
                            .chain(&reported_by_leaders)
                            .any(|p| oracle_newer(t, p, &edges))
                    });
                    prop_assert!(eligible || proves,
                        "member {} became leader without rise reports or a newer term", l);
                }
                if let Some(term) = &s.members[l].term {
                    if leaders_terms.last() != Some(term) {
                        leaders_terms.push(term.clone());
                    }
                    last_leader_term = Some(term.clone());
                    reference = Some(term.clone());
                }
                last_leader_member = Some(l);
            } else {
                prop_assert!(s.no_leader.is_some(), "no leader and no reason");
                if let Some(tr) = moved {
                    reference = Some(tr);
                }
            }
            // Replicas are eligible, in the replica role, and never on a
            // term older than the leader's (rule 7); a replica left out
            // for that says so.
            for &r in &s.replicas {
                prop_assert_eq!(s.members[r].health, Health::Up);
                prop_assert_eq!(s.members[r].role, Role::Replica);
                prop_assert_eq!(s.members[r].fenced, None);
                if let (Some(lead), Some(term)) = (&s.leader_term, &s.members[r].term) {
                    prop_assert!(!oracle_newer(lead, term, &edges),
                        "replica {} on term {} behind the leader's {}", r, term, lead);
                    if s.leader.is_some() {
                        prop_assert!(!oracle_newer(term, lead, &edges),
                            "replica {} on term {} ahead of the leader's {}", r, term, lead);
                    }
                }
            }
            for (id, m) in s.members.iter().enumerate() {
                if m.health == Health::Up && m.role == Role::Replica && !s.replicas.contains(&id) && s.leader != Some(id) {
                    prop_assert!(matches!(m.fenced, Some(FenceReason::BehindLeaderTerm | FenceReason::DivergedFromLeader)),
                        "up replica {} left out without a reason: {:?}", id, s);
                }
            }
            // Split brain means no one was provably newest: if it is set
            // without a leader, at least two members claim primary.
            if s.split_brain && s.leader.is_none() {
                let claiming = s.members.iter().filter(|m| m.role == Role::Primary).count();
                prop_assert!(claiming >= 2);
            }
            last = s;
        }
    }

    #[test]
    fn only_the_newest_generation_counts((n, steps) in (2usize..4).prop_flat_map(|n| (Just(n), prop::collection::vec((0..n, 0u64..4, outcome_strategy(n)), 1..120))), rise in 1u32..4, fall in 1u32..4) {
        // Each step reports about generation `g` of a member: a member moves
        // whenever `g` exceeds every generation seen for it before, and a
        // report about an older one is stale.
        let mut v = View::new(n, Thresholds { rise, fall });
        let mut newest = vec![0u64; n];
        for (member, generation, outcome) in steps {
            let before = v.snapshot();
            let stale = generation < newest[member];
            let moved = generation > newest[member];
            let was_up = before.members[member].health == Health::Up;
            let t = v.apply(Report { member, generation, at: at(0), outcome });
            let s = v.snapshot();
            if stale {
                prop_assert!(t.is_empty());
                prop_assert_eq!(&s, &before);
                continue;
            }
            newest[member] = generation;
            if moved && was_up {
                let down = Transition::MemberDown { member, hard: true };
                prop_assert!(t.contains(&down), "{:?}", t);
            }
            for (id, m) in s.members.iter().enumerate() {
                prop_assert_eq!(m.generation, newest[id]);
            }
            if let Some(l) = s.leader {
                // What makes it leader was reported about its newest address
                // (up, or proving a newer term at its first report there).
                prop_assert_eq!(s.members[l].role, Role::Primary);
                prop_assert!(s.members[l].health != Health::Down);
            }
        }
    }

    #[test]
    fn two_eligible_unordered_claimants_never_both_lead((n, steps) in (2usize..4).prop_flat_map(|n| (Just(n), prop::collection::vec((0..n, outcome_strategy(n)), 1..80))), rise in 1u32..4, fall in 1u32..4) {
        // At any time the leader, if any, must be provably newer than or
        // the incumbent over every other up claimant: i.e. no other
        // claimant is provably newer.
        let mut v = View::new(n, Thresholds { rise, fall });
        let mut edges: Vec<(String, String)> = Vec::new();
        for (member, outcome) in steps {
            if let Outcome::Observed(Observation { term: Some(Term::Lineage { id, previous: Some(p) }), .. }) = &outcome {
                edges.push((id.clone(), p.clone()));
            }
            v.apply(Report { member, generation: 0, at: at(0), outcome });
            let s = v.snapshot();
            if let Some(l) = s.leader {
                for (id, m) in s.members.iter().enumerate() {
                    if id == l || m.role != Role::Primary || m.health != Health::Up { continue; }
                    if let (Some(t), Some(lt)) = (&m.term, &s.members[l].term) {
                        prop_assert!(!oracle_newer(t, lt, &edges),
                            "member {} has a newer term than leader {}", id, l);
                    }
                }
            }
        }
    }
}

#[test]
fn a_former_primary_back_on_an_older_timeline_serves_no_reads() {
    let mut v = View::new(3, Thresholds { rise: 1, fall: 1 });
    feed(&mut v, 0, pg(1));
    feed(&mut v, 1, replica_on(Term::Number(1), Some(0)));
    feed(&mut v, 2, replica_on(Term::Number(1), Some(0)));
    assert_eq!(v.snapshot().replicas, vec![1, 2]);

    // 0 dies (2's WAL receiver stops streaming), 1 is promoted onto
    // timeline 2.
    feed(&mut v, 0, hard());
    feed(&mut v, 2, replica_on(Term::Number(1), None));
    feed(&mut v, 1, pg(2));
    let s = v.snapshot();
    assert_eq!(s.leader, Some(1));
    // 2 has not followed yet: still on timeline 1, so no reads.
    assert_eq!(s.replicas, Vec::<MemberId>::new());
    assert_eq!(s.members[2].fenced, Some(FenceReason::BehindLeaderTerm));

    // 0 comes back as a replica before pg_rewind, on its old timeline.
    let t = feed(&mut v, 0, replica_on(Term::Number(1), None));
    assert!(t.contains(&Transition::Fenced {
        member: 0,
        reason: FenceReason::BehindLeaderTerm
    }));
    assert_eq!(v.snapshot().replicas, Vec::<MemberId>::new());
    // Reported again, the reason is not reported again.
    let t = feed(&mut v, 0, replica_on(Term::Number(1), None));
    assert!(
        !t.iter().any(|t| matches!(t, Transition::Fenced { .. })),
        "{t:?}"
    );

    // Each takes reads once it reports the leader's timeline.
    feed(&mut v, 2, replica_on(Term::Number(2), Some(1)));
    assert_eq!(v.snapshot().replicas, vec![2]);
    assert_eq!(v.snapshot().members[2].fenced, None);
    feed(&mut v, 0, replica_on(Term::Number(2), Some(1)));
    let s = v.snapshot();
    assert_eq!(s.replicas, vec![0, 2]);
    assert_eq!(s.members[0].fenced, None);
}

#[test]
fn a_replica_still_on_the_old_primary_history_serves_no_reads() {
    let mut v = View::new(3, T);
    for _ in 0..2 {
        feed(&mut v, 0, primary(Some(lineage("x", None))));
        feed(&mut v, 1, replica_on(lineage("x", None), Some(0)));
        feed(&mut v, 2, replica_on(lineage("x", None), Some(0)));
    }
    assert_eq!(v.snapshot().replicas, vec![1, 2]);
    // 0 is cut off (2's link to it is down); 1 is promoted (REPLICAOF NO
    // ONE): history y after x.
    feed(&mut v, 2, replica_on(lineage("x", None), None));
    feed(&mut v, 1, primary(Some(lineage("y", Some("x")))));
    assert_eq!(v.leader(), Some(1));
    // 2 still carries x, which the leader has moved past.
    assert_eq!(v.snapshot().replicas, Vec::<MemberId>::new());
    // Once it replicates from 1 (PSYNC continues: y after x), it reads again.
    feed(&mut v, 2, replica_on(lineage("y", Some("x")), Some(1)));
    assert_eq!(v.snapshot().replicas, vec![2]);
    // A replica whose history cannot be ordered against the leader's is
    // not provably behind: it stays.
    feed(&mut v, 2, replica_on(lineage("z", None), Some(1)));
    assert_eq!(v.snapshot().replicas, vec![2]);
}

#[test]
fn replica_lag_is_the_leaders_position_minus_its_own() {
    let mut v = View::new(2, Thresholds { rise: 1, fall: 1 });
    feed(
        &mut v,
        0,
        Outcome::Observed(Observation {
            role: Role::Primary,
            term: Some(Term::Number(1)),
            upstream: None,
            position: Some(1000),
            delay: None,
            term_floor: false,
            followers: Vec::new(),
        }),
    );
    feed(
        &mut v,
        1,
        Outcome::Observed(Observation {
            role: Role::Replica,
            term: Some(Term::Number(1)),
            upstream: Some(0),
            position: Some(400),
            delay: Some(Duration::from_millis(300)),
            term_floor: false,
            followers: Vec::new(),
        }),
    );
    let s = v.snapshot();
    assert_eq!(s.members[1].lag_bytes, Some(600));
    assert_eq!(s.members[1].delay, Some(Duration::from_millis(300)));
    assert_eq!(s.members[0].lag_bytes, None);
}

// ---- rule 6: a DCS names the leader, a probe confirms ---------------------

fn named(leader: Option<MemberId>, term: u64) -> DcsReport {
    DcsReport::Named {
        leader,
        term: Some(term),
    }
}

fn pg(term: u64) -> Outcome {
    primary(Some(Term::Number(term)))
}

/// Two members with a DCS: `0` named and confirmed on timeline 1.
fn dcs_steady() -> View {
    let mut v = View::new(2, T).with_dcs();
    v.apply_dcs(named(Some(0), 10));
    for _ in 0..2 {
        feed(&mut v, 0, pg(1));
        feed(&mut v, 1, replica(Some(0)));
    }
    assert_eq!(v.leader(), Some(0));
    v
}

#[test]
fn with_a_dcs_nobody_leads_before_it_is_heard() {
    let mut v = View::new(2, T).with_dcs();
    for _ in 0..3 {
        feed(&mut v, 0, pg(1));
        feed(&mut v, 1, replica(Some(0)));
    }
    assert_eq!(v.leader(), None);
    assert_eq!(v.snapshot().dcs, DcsView::Waiting);
    v.apply_dcs(named(Some(0), 10));
    assert_eq!(v.leader(), Some(0));
}

#[test]
fn the_dcs_leader_leads_only_once_its_probe_confirms() {
    let mut v = dcs_steady();
    // Switchover: the DCS names 1 while 1 still reports replica.
    let t = v.apply_dcs(named(Some(1), 11));
    assert_eq!(v.leader(), None, "{t:?}");
    assert!(t.contains(&Transition::LeaderLost { member: 0 }));
    assert!(t.contains(&Transition::Fenced {
        member: 0,
        reason: FenceReason::NotDcsLeader
    }));
    // 1 is promoted onto timeline 2: its first report confirms it.
    feed(&mut v, 1, pg(2));
    assert_eq!(v.leader(), Some(1));
}

#[test]
fn a_primary_the_dcs_does_not_name_never_leads() {
    let mut v = View::new(2, T).with_dcs();
    v.apply_dcs(named(Some(1), 10));
    for _ in 0..3 {
        feed(&mut v, 0, pg(5));
        feed(&mut v, 1, replica(None));
    }
    assert_eq!(v.leader(), None);
    assert_eq!(
        v.snapshot().members[0].fenced,
        Some(FenceReason::NotDcsLeader)
    );
    assert!(!v.snapshot().split_brain);
}

#[test]
fn the_term_rules_still_fence_a_dcs_named_member() {
    let mut v = dcs_steady();
    // 1 is promoted (timeline 2) and named; then the DCS names 0 again,
    // which comes back on its old timeline: refused.
    v.apply_dcs(named(Some(1), 11));
    feed(&mut v, 1, pg(2));
    assert_eq!(v.leader(), Some(1));
    v.apply_dcs(named(Some(0), 12));
    feed(&mut v, 0, pg(1));
    assert_eq!(v.leader(), None);
    assert_eq!(v.snapshot().members[0].fenced, Some(FenceReason::OlderTerm));
}

#[test]
fn a_member_promoted_behind_the_dcs_back_holds_the_named_one() {
    let mut v = dcs_steady();
    // 1 is promoted by hand onto a newer timeline; the DCS still names 0.
    // 1 cannot lead (not named), and 0 cannot either: 1's newer timeline
    // proves 0 may be stale (or the DCS answer is). Nobody leads.
    let t = feed(&mut v, 1, pg(2));
    assert!(t.contains(&Transition::LeaderLost { member: 0 }), "{t:?}");
    for _ in 0..3 {
        feed(&mut v, 1, pg(2));
        feed(&mut v, 0, pg(1));
        assert_eq!(v.leader(), None);
    }
    let s = v.snapshot();
    assert_eq!(s.members[1].fenced, Some(FenceReason::NotDcsLeader));
    assert_eq!(s.members[0].fenced, Some(FenceReason::OlderTerm));
    assert_eq!(s.no_leader, Some(NoLeader::Dcs));
    assert!(!s.split_brain);
    // The manager demotes 1: 0 leads again.
    feed(&mut v, 1, replica(Some(0)));
    assert_eq!(v.leader(), Some(0));
    // Or the DCS names 1 (a failover the portal saw late): 1 leads.
    let mut w = dcs_steady();
    feed(&mut w, 1, pg(2));
    assert_eq!(w.leader(), None);
    w.apply_dcs(named(Some(1), 11));
    assert_eq!(w.leader(), Some(1));
}

#[test]
fn a_stale_dcs_answer_does_not_keep_a_stalled_incumbent() {
    // Sentinel failed over while the primary 0 was stalled (suspect, so it
    // keeps its claim); 1 reports its promotion before the portal's DCS
    // answer names it. 0 wakes, still a master: it must not take writes.
    let mut v = View::new(2, T).with_dcs();
    v.apply_dcs(named(Some(0), 3));
    for _ in 0..2 {
        feed(&mut v, 0, primary(Some(lineage("x", None))));
        feed(&mut v, 1, replica(Some(0)));
    }
    assert_eq!(v.leader(), Some(0));
    feed(&mut v, 0, soft());
    assert_eq!(v.leader(), Some(0), "suspect: kept");
    feed(&mut v, 1, primary(Some(lineage("y", Some("x")))));
    assert_eq!(v.leader(), None, "a live claim proves 0 superseded");
    feed(&mut v, 0, primary(Some(lineage("x", None))));
    assert_eq!(v.leader(), None, "the stale answer kept the old primary");
    v.apply_dcs(named(Some(1), 4));
    assert_eq!(v.leader(), Some(1));
}

#[test]
fn the_view_follows_a_dcs_that_went_back_once_the_newer_history_is_gone() {
    // 0 led on timeline 1 and froze past the ttl; the DCS named 1, which
    // was promoted onto timeline 2. 0 wakes and Patroni hands it the key
    // back: 0 is named again, still primary on timeline 1.
    let mut v = dcs_steady();
    v.apply_dcs(named(Some(1), 11));
    feed(&mut v, 1, pg(2));
    assert_eq!(v.leader(), Some(1));
    v.apply_peer(PeerTerms {
        term: Term::Number(2),
        lineage: Vec::new(),
    });
    v.apply_dcs(named(Some(0), 12));
    feed(&mut v, 0, pg(1));
    assert_eq!(v.leader(), None, "1 still holds timeline 2");
    // 1 demotes itself but is not rewound yet: its timeline 2 holds
    // writes that 0 does not have.
    for _ in 0..2 {
        feed(&mut v, 1, replica_on(Term::Number(2), None));
        feed(&mut v, 0, pg(1));
        assert_eq!(v.leader(), None, "timeline 2 is still alive on 1");
    }
    assert_eq!(v.snapshot().members[0].fenced, Some(FenceReason::OlderTerm));
    // 1 is rewound onto timeline 1 and follows 0: timeline 2 is gone.
    let t = feed(&mut v, 1, replica_on(Term::Number(1), None));
    assert_eq!(v.leader(), Some(0), "{t:?}");
    assert_eq!(v.snapshot().leader_term, Some(Term::Number(1)));
    // A peer that has not seen it yet still reports timeline 2: abandoned,
    // it fences nothing.
    v.apply_peer(PeerTerms {
        term: Term::Number(2),
        lineage: Vec::new(),
    });
    feed(&mut v, 0, pg(1));
    assert_eq!(v.leader(), Some(0));
    // Timeline 2 may be reused by a later promotion of 1: it leads.
    v.apply_dcs(named(Some(1), 13));
    feed(&mut v, 1, pg(2));
    assert_eq!(v.leader(), Some(1));
    feed(&mut v, 0, replica_on(Term::Number(1), None));
    assert_eq!(v.leader(), Some(1));
}

#[test]
fn a_dcs_that_went_back_is_not_followed_while_the_newer_history_lives() {
    // Three members: 2 streams timeline 2 from 1 when the DCS goes back to
    // 0; 1 is rewound, but 2 still holds timeline 2.
    let mut v = View::new(3, T).with_dcs();
    v.apply_dcs(named(Some(0), 10));
    for _ in 0..2 {
        feed(&mut v, 0, pg(1));
        feed(&mut v, 1, replica(Some(0)));
        feed(&mut v, 2, replica(Some(0)));
    }
    v.apply_dcs(named(Some(1), 11));
    feed(&mut v, 1, pg(2));
    feed(&mut v, 2, replica_on(Term::Number(2), Some(1)));
    assert_eq!(v.leader(), Some(1));
    v.apply_dcs(named(Some(0), 12));
    feed(&mut v, 0, pg(1));
    feed(&mut v, 1, replica_on(Term::Number(1), None));
    assert_eq!(v.leader(), None, "2 still has timeline 2");
    // And if the last leader is down instead of rewound, nothing shows
    // that its history is gone.
    let mut w = dcs_steady();
    w.apply_dcs(named(Some(1), 11));
    feed(&mut w, 1, pg(2));
    w.apply_dcs(named(Some(0), 12));
    feed(&mut w, 1, hard());
    for _ in 0..3 {
        feed(&mut w, 0, pg(1));
        assert_eq!(w.leader(), None);
    }
}

#[test]
fn no_leader_key_means_no_leader() {
    let mut v = dcs_steady();
    let t = v.apply_dcs(DcsReport::Named {
        leader: None,
        term: None,
    });
    assert_eq!(v.leader(), None);
    assert!(t.contains(&Transition::LeaderLost { member: 0 }));
}

#[test]
fn an_unreachable_dcs_drops_the_leader_when_its_probe_fails() {
    let mut v = dcs_steady();
    v.apply_dcs(DcsReport::Unreachable {
        error: "timeout".into(),
    });
    feed(&mut v, 1, replica(Some(0)));
    assert_eq!(v.leader(), Some(0));
    feed(&mut v, 0, hard());
    assert_eq!(v.leader(), None);
    // It comes back claiming primary: without the DCS it is not re-elected.
    feed(&mut v, 0, pg(1));
    feed(&mut v, 0, pg(1));
    assert_eq!(v.leader(), None);
}

#[test]
fn an_unreachable_dcs_keeps_the_leader_only_while_probes_confirm_it() {
    let mut v = dcs_steady();
    v.apply_dcs(DcsReport::Unreachable {
        error: "connection refused".into(),
    });
    assert_eq!(v.leader(), Some(0));
    assert!(matches!(
        v.snapshot().dcs,
        DcsView::Unreachable {
            last_term: Some(10),
            ..
        }
    ));
    // 1 is promoted behind the DCS's back: not named, it cannot lead, and
    // its newer timeline fences the incumbent: nobody leads.
    feed(&mut v, 1, pg(2));
    assert_eq!(v.leader(), None);
    assert_eq!(
        v.snapshot().members[1].fenced,
        Some(FenceReason::NotDcsLeader)
    );
    assert_eq!(v.snapshot().members[0].fenced, Some(FenceReason::OlderTerm));
    feed(&mut v, 1, pg(2));
    assert_eq!(v.leader(), None);
    v.apply_dcs(named(Some(1), 11));
    assert_eq!(v.leader(), Some(1));
}

#[test]
fn dcs_reports_without_a_configured_dcs_are_ignored() {
    let mut v = steady();
    let t = v.apply_dcs(named(Some(1), 3));
    assert!(t.is_empty());
    assert_eq!(v.leader(), Some(0));
    assert_eq!(v.snapshot().dcs, DcsView::Absent);
}

#[test]
fn a_dcs_naming_an_unknown_member_names_nobody() {
    let mut v = dcs_steady();
    v.apply_dcs(named(Some(7), 11));
    assert_eq!(v.leader(), None);
}

#[test]
fn an_unreachable_dcs_keeps_a_suspect_leader() {
    // One missed probe of the leader while the DCS is away: the leader is
    // suspect, not gone, so the cluster keeps it (rule 1 with rule 6).
    let mut v = View::new(2, T).with_dcs();
    v.apply_dcs(named(Some(0), 10));
    for _ in 0..2 {
        feed(&mut v, 0, pg(1));
        feed(&mut v, 1, replica(Some(0)));
    }
    assert_eq!(v.leader(), Some(0));
    v.apply_dcs(DcsReport::Unreachable {
        error: "timeout".into(),
    });
    assert!(feed(&mut v, 0, soft()).is_empty());
    assert_eq!(v.leader(), Some(0));
    feed(&mut v, 0, soft());
    assert_eq!(v.leader(), None, "fall reached: down");
}

#[test]
fn an_accepted_leader_is_pinned_against_successors_and_peers() {
    // The operator's answer to a replica restarted from its sync RDB: it
    // claims a term after b's (it looks promoted) while b is healthy.
    let mut v = View::new(2, T);
    for _ in 0..2 {
        feed(&mut v, 1, primary(Some(lineage("y", Some("x")))));
        feed(&mut v, 0, replica(Some(1)));
    }
    assert_eq!(v.leader(), Some(1));
    feed(&mut v, 0, primary(Some(lineage("r", Some("y")))));
    assert_eq!(v.leader(), Some(0), "replication data says 0 is newer");
    v.apply_override(&Override::AcceptLeader(1))
        .expect("1 claims primary");
    assert_eq!(v.leader(), Some(1));
    assert_eq!(
        v.snapshot().members[0].fenced,
        Some(FenceReason::OperatorPinned)
    );
    // Neither the successor's reports nor a peer's newer term move it.
    for _ in 0..3 {
        feed(&mut v, 0, primary(Some(lineage("r", Some("y")))));
        v.apply_peer(PeerTerms {
            term: lineage("r", Some("y")),
            lineage: vec![("r".into(), "y".into())],
        });
        assert_eq!(v.leader(), Some(1));
    }
    // The pin holds while 1 claims and is not down: a suspect keeps it.
    feed(&mut v, 1, soft());
    assert_eq!(v.leader(), Some(1));
    // Down: the pin is released and the rules decide again.
    feed(&mut v, 1, hard());
    assert_eq!(v.leader(), Some(0));
}

#[test]
fn a_stale_dcs_answer_does_not_elect_an_old_primary_anew() {
    // Sentinel promoted 1 (its term continues 0's) while 0 was stalled and
    // down; the portal's last DCS answer still names 0. 0 wakes up, still
    // a master: it must not be elected again on that stale answer.
    let mut v = View::new(2, T).with_dcs();
    v.apply_dcs(named(Some(0), 3));
    for _ in 0..2 {
        feed(&mut v, 0, primary(Some(lineage("x", None))));
        feed(&mut v, 1, replica(Some(0)));
    }
    assert_eq!(v.leader(), Some(0));
    feed(&mut v, 0, soft());
    feed(&mut v, 0, soft());
    assert_eq!(v.leader(), None, "0 is down");
    feed(&mut v, 1, primary(Some(lineage("y", Some("x")))));
    assert_eq!(v.leader(), None, "1 is not named yet");
    for _ in 0..3 {
        feed(&mut v, 0, primary(Some(lineage("x", None))));
        assert_eq!(v.leader(), None, "the stale answer elected the old primary");
    }
    assert_eq!(v.snapshot().members[0].fenced, Some(FenceReason::OlderTerm));
    // The DCS catches up: 1 leads.
    v.apply_dcs(named(Some(1), 4));
    assert_eq!(v.leader(), Some(1));
}

#[test]
fn a_stale_dcs_answer_does_not_elect_an_old_primary_restarted_empty() {
    // Sentinel promoted 1 after 0 was killed; 0 restarts empty as a master
    // while the portal's last DCS answer still names 0.
    let mut v = View::new(2, T).with_dcs();
    v.apply_dcs(named(Some(0), 3));
    for _ in 0..2 {
        feed(&mut v, 0, primary(Some(lineage("x", None))));
        feed(&mut v, 1, replica(Some(0)));
    }
    feed(&mut v, 0, hard());
    feed(&mut v, 1, primary(Some(lineage("y", Some("x")))));
    for _ in 0..3 {
        feed(&mut v, 0, primary(Some(lineage("z", None))));
        assert_eq!(
            v.leader(),
            None,
            "the stale answer elected the empty master"
        );
    }
    assert_eq!(
        v.snapshot().members[0].fenced,
        Some(FenceReason::UnrelatedHistory)
    );
    v.apply_dcs(named(Some(1), 4));
    assert_eq!(v.leader(), Some(1));
    // With no other claim, a DCS may still name a member of another
    // history (a cluster rebuilt by its manager).
    let mut w = View::new(2, T).with_dcs();
    w.apply_dcs(named(Some(0), 3));
    for _ in 0..2 {
        feed(&mut w, 0, primary(Some(lineage("x", None))));
    }
    feed(&mut w, 0, hard());
    w.apply_dcs(named(Some(1), 4));
    for _ in 0..2 {
        feed(&mut w, 1, primary(Some(lineage("q", None))));
    }
    assert_eq!(w.leader(), Some(1));
}

fn tl(system: u64, timeline: u64) -> Term {
    Term::Timeline { system, timeline }
}

#[test]
fn timelines_of_different_database_systems_are_unordered() {
    assert_eq!(
        tl(7, 2).compare(&tl(7, 1)),
        Some(std::cmp::Ordering::Greater)
    );
    assert_eq!(tl(7, 1).compare(&tl(8, 1)), None);
    // Without a system on one side (an older peer), by number.
    assert_eq!(
        tl(7, 1).compare(&Term::Number(2)),
        Some(std::cmp::Ordering::Less)
    );
}

#[test]
fn a_member_recreated_with_initdb_never_leads_on_its_own() {
    // 0 led on timeline 1 of system 7; it dies. 1 is re-created with initdb
    // (system 8), promoted: timeline 2 of another history. It is not a
    // successor of 0 (rule 8), whatever its timeline number.
    let mut v = View::new(2, T);
    for _ in 0..2 {
        feed(&mut v, 0, primary(Some(tl(7, 1))));
        feed(&mut v, 1, replica_on(tl(7, 1), Some(0)));
    }
    assert_eq!(v.leader(), Some(0));
    feed(&mut v, 0, hard());
    for _ in 0..3 {
        feed(&mut v, 1, primary(Some(tl(8, 2))));
        assert_eq!(v.leader(), None);
    }
    assert_eq!(
        v.snapshot().members[1].fenced,
        Some(FenceReason::UnrelatedHistory)
    );
    // Its own timeline 1 would not do either.
    feed(&mut v, 1, primary(Some(tl(8, 1))));
    assert_eq!(v.leader(), None);
}

#[test]
fn a_standby_that_does_not_stream_proves_nothing_about_a_going_back() {
    // As in the DCS going-back test, but the last leader 1 comes back as a
    // standby that does not stream (not rewound: it cannot follow 0): its
    // checkpoint's timeline 1 is only a floor, it may still hold timeline 2.
    let floor = |term: Term| {
        Outcome::Observed(Observation {
            role: Role::Replica,
            term: Some(term),
            upstream: None,
            position: None,
            delay: None,
            term_floor: true,
            followers: Vec::new(),
        })
    };
    let mut v = dcs_steady();
    v.apply_dcs(named(Some(1), 11));
    feed(&mut v, 1, pg(2));
    assert_eq!(v.leader(), Some(1));
    v.apply_dcs(named(Some(0), 12));
    feed(&mut v, 0, pg(1));
    for _ in 0..3 {
        feed(&mut v, 1, floor(Term::Number(1)));
        feed(&mut v, 0, pg(1));
        assert_eq!(v.leader(), None, "a floor proved the history gone");
    }
    // It streams from 0 on timeline 1: now it is rewound.
    feed(&mut v, 1, replica_on(Term::Number(1), Some(0)));
    assert_eq!(v.leader(), Some(0));
}

#[test]
fn the_named_primarys_streaming_list_proves_a_going_back() {
    // As above with `check: patroni`: every replica's timeline is a floor
    // (Patroni caches it). The last leader 1 reports replica on timeline 1
    // (cached; it may still hold timeline 2): nothing is proved until the
    // named member 0 lists 1 among the members streaming from it.
    let floor = |term: Term| {
        Outcome::Observed(Observation {
            role: Role::Replica,
            term: Some(term),
            upstream: None,
            position: None,
            delay: None,
            term_floor: true,
            followers: Vec::new(),
        })
    };
    let leading = |term: u64, followers: Vec<MemberId>| {
        Outcome::Observed(Observation {
            role: Role::Primary,
            term: Some(Term::Number(term)),
            upstream: None,
            position: None,
            delay: None,
            term_floor: false,
            followers,
        })
    };
    let went_back = || {
        let mut v = View::new(3, T).with_dcs();
        v.apply_dcs(named(Some(0), 10));
        for _ in 0..2 {
            feed(&mut v, 0, pg(1));
            feed(&mut v, 1, floor(Term::Number(1)));
            feed(&mut v, 2, floor(Term::Number(1)));
        }
        assert_eq!(v.leader(), Some(0));
        v.apply_dcs(named(Some(1), 11));
        feed(&mut v, 1, pg(2));
        assert_eq!(v.leader(), Some(1));
        v.apply_dcs(named(Some(0), 12));
        feed(&mut v, 0, leading(1, Vec::new()));
        feed(&mut v, 1, floor(Term::Number(1)));
        v
    };
    let mut v = went_back();
    for _ in 0..3 {
        feed(&mut v, 0, leading(1, vec![2]));
        feed(&mut v, 1, floor(Term::Number(1)));
        assert_eq!(v.leader(), None, "1's cached timeline proved nothing");
    }
    // 1 streams from 0 (and 2 does): timeline 2 is gone from the cluster.
    let t = feed(&mut v, 0, leading(1, vec![1, 2]));
    assert_eq!(v.leader(), Some(0), "{t:?}");
    assert_eq!(v.snapshot().leader_term, Some(Term::Number(1)));
    // 1 streams, but 2, whose report is a floor, does not: 2 may hold
    // timeline 2 (it may have streamed it from 1).
    let mut v = went_back();
    feed(&mut v, 0, leading(1, vec![1]));
    assert_eq!(v.leader(), None, "2's floor may hide timeline 2");
    // And a member that streams but whose last report was a newer term
    // is on the named one's history now.
    let mut v = went_back();
    feed(&mut v, 2, replica_on(Term::Number(2), Some(1)));
    feed(&mut v, 0, leading(1, vec![1]));
    assert_eq!(v.leader(), None, "2 holds timeline 2");
    feed(&mut v, 0, leading(1, vec![1, 2]));
    assert_eq!(v.leader(), Some(0));
    // A name in the list is the streaming client's say-so: while 1 is down
    // (it may hold timeline 2), a client streaming under its name proves
    // nothing (hostile test B3: pg_receivewal with application_name=b).
    let mut v = went_back();
    feed(&mut v, 1, hard());
    for _ in 0..3 {
        feed(&mut v, 0, leading(1, vec![1, 2]));
        assert_eq!(v.leader(), None, "a forged follower proved a going-back");
    }
    // 1 comes back as a replica, and streams: now it counts.
    feed(&mut v, 1, floor(Term::Number(1)));
    feed(&mut v, 0, leading(1, vec![1, 2]));
    assert_eq!(v.leader(), Some(0));
}

#[test]
fn an_operators_pin_yields_when_the_dcs_names_another_leader() {
    let mut v = dcs_steady();
    v.apply_override(&Override::AcceptLeader(0))
        .expect("0 claims primary");
    assert_eq!(v.snapshot().pinned, Some(0));
    // The same answer again changes nothing.
    v.apply_dcs(named(Some(0), 10));
    assert_eq!(v.snapshot().pinned, Some(0));
    // The manager fails over to 1 (timeline 2): the DCS decided after the
    // operator, and 1 leads.
    v.apply_dcs(named(Some(1), 11));
    assert_eq!(v.snapshot().pinned, None);
    feed(&mut v, 1, pg(2));
    assert_eq!(v.leader(), Some(1));

    // A pin on a member the DCS does not name holds while the DCS repeats
    // the answer the operator overrode: only a new decision unpins it.
    let mut v = dcs_steady();
    feed(&mut v, 1, pg(2));
    v.apply_override(&Override::AcceptLeader(1))
        .expect("1 claims primary");
    assert_eq!(v.leader(), Some(1));
    for _ in 0..3 {
        v.apply_dcs(named(Some(0), 10));
        assert_eq!(v.snapshot().pinned, Some(1), "the same answer unpinned it");
        feed(&mut v, 1, pg(2));
        assert_eq!(v.leader(), Some(1));
    }
    v.apply_dcs(named(Some(0), 12));
    assert_eq!(
        v.snapshot().pinned,
        Some(1),
        "the same leader, another key revision"
    );
    v.apply_dcs(DcsReport::Named {
        leader: None,
        term: None,
    });
    assert_eq!(v.snapshot().pinned, None, "the DCS changed its answer");
}

#[test]
fn a_chained_replica_of_a_down_member_does_not_contradict_the_leader() {
    // 1 leads; 0 replicates from 1; 2 replicates from 0 (chained). 0 stops:
    // 2 still reports 0 as its upstream, which says nothing about 1.
    let mut v = View::new(3, T);
    for _ in 0..2 {
        feed(&mut v, 1, primary(Some(Term::Number(3))));
        feed(&mut v, 0, replica(Some(1)));
        feed(&mut v, 2, replica(Some(0)));
    }
    assert_eq!(v.leader(), Some(1));
    feed(&mut v, 0, hard());
    feed(&mut v, 2, replica(Some(0)));
    feed(&mut v, 1, primary(Some(Term::Number(3))));
    assert_eq!(v.leader(), Some(1));
    assert_eq!(v.snapshot().members[1].fenced, None);
}

#[test]
fn a_member_down_with_the_newer_history_still_holds_a_going_back() {
    // Three members: 2 streamed timeline 2 from 1, then 1 is rewound onto
    // 0's timeline 1 while the DCS names 0 again. 2 still holds timeline 2:
    // stopping it (to rewind it) must not let 0 lead, and once it is back
    // on timeline 2 (not rewound) it serves no reads.
    let mut v = View::new(3, T).with_dcs();
    v.apply_dcs(named(Some(0), 10));
    for _ in 0..2 {
        feed(&mut v, 0, pg(1));
        feed(&mut v, 1, replica(Some(0)));
        feed(&mut v, 2, replica(Some(0)));
    }
    v.apply_dcs(named(Some(1), 11));
    feed(&mut v, 1, pg(2));
    feed(&mut v, 2, replica_on(Term::Number(2), Some(1)));
    assert_eq!(v.leader(), Some(1));
    v.apply_dcs(named(Some(0), 12));
    feed(&mut v, 0, pg(1));
    feed(&mut v, 1, replica_on(Term::Number(1), Some(0)));
    assert_eq!(v.leader(), None, "2 holds timeline 2");
    feed(&mut v, 2, hard());
    feed(&mut v, 0, pg(1));
    assert_eq!(v.leader(), None, "2 is down, not gone");
    // 2 comes back, not rewound, streaming nothing: still held.
    feed(&mut v, 2, replica_on(Term::Number(2), None));
    assert_eq!(v.leader(), None);
    // 2 is rewound and streams timeline 1 from 0: the going-back is done.
    feed(&mut v, 2, replica_on(Term::Number(1), Some(0)));
    feed(&mut v, 2, replica_on(Term::Number(1), Some(0)));
    assert_eq!(v.leader(), Some(0));
    assert_eq!(v.snapshot().replicas, vec![1, 2]);
}

#[test]
fn a_replica_ahead_of_the_leader_or_on_an_abandoned_term_serves_no_reads() {
    let mut v = View::new(2, T);
    for _ in 0..2 {
        feed(&mut v, 0, pg(1));
        feed(&mut v, 1, replica_on(Term::Number(1), Some(0)));
    }
    assert_eq!(v.snapshot().replicas, vec![1]);
    // 1 reports timeline 2 as a standby: it was promoted and demoted
    // without a rewind; it holds writes 0 lacks.
    feed(&mut v, 1, replica_on(Term::Number(2), None));
    assert_eq!(v.leader(), Some(0));
    assert!(v.snapshot().replicas.is_empty());
    assert_eq!(
        v.snapshot().members[1].fenced,
        Some(FenceReason::DivergedFromLeader)
    );
    feed(&mut v, 1, replica_on(Term::Number(1), Some(0)));
    assert_eq!(v.snapshot().replicas, vec![1]);
}

// ---- mutation testing ------------------------------------------------------

/// How many cases each property runs: `default`, unless the environment
/// variable `PORTAL_PROPTEST_CASES` says otherwise (a mutation run,
/// `bench/mutants.sh`, lowers it to test many builds quickly). A value that
/// does not parse leaves the default.
fn cases(default: u32) -> u32 {
    std::env::var("PORTAL_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

// The tests below each state a behaviour that a mutant of src/view/mod.rs
// broke without any other test failing (bench/mutants.sh).

#[test]
fn terms_print_as_the_status_page_documents() {
    assert_eq!(Term::Number(7).to_string(), "7");
    assert_eq!(lineage("ab12", None).to_string(), "replid:ab12");
    assert_eq!(
        lineage("cd34", Some("ab12")).to_string(),
        "replid:cd34 (after ab12)"
    );
}

#[test]
fn status_names_are_the_documented_ones() {
    // README, "Status": `members[].health`, `members[].role`,
    // `clusters[].no_leader` and `members[].fenced`.
    let health = [Health::Unknown, Health::Up, Health::Down].map(Health::as_str);
    assert_eq!(health, ["unknown", "up", "down"]);
    let role = [Role::Primary, Role::Replica, Role::Unknown].map(Role::as_str);
    assert_eq!(role, ["primary", "replica", "unknown"]);
    let no_leader = [
        NoLeader::NoClaimant,
        NoLeader::Rising,
        NoLeader::SplitBrain,
        NoLeader::Fenced,
        NoLeader::AwaitingPeers,
        NoLeader::Dcs,
    ]
    .map(NoLeader::as_str);
    assert_eq!(
        no_leader,
        [
            "no_member_claims_primary",
            "claimant_rising",
            "split_brain",
            "every_claimant_fenced",
            "awaiting_peers",
            "dcs_names_no_confirmed_leader",
        ]
    );
    let fenced = [
        FenceReason::Incumbent,
        FenceReason::OlderTerm,
        FenceReason::OlderThanPeer,
        FenceReason::UnrelatedHistory,
        FenceReason::Contradicted,
        FenceReason::OperatorPinned,
        FenceReason::NotDcsLeader,
        FenceReason::BehindLeaderTerm,
    ]
    .map(FenceReason::as_str);
    assert_eq!(
        fenced,
        [
            "incumbent_leads",
            "older_term",
            "older_than_peer_term",
            "unrelated_history",
            "contradicted_by_replicas",
            "operator_pinned_another",
            "not_dcs_leader",
            "behind_leader_term",
        ]
    );
}

#[test]
fn the_reason_for_no_leader_names_the_case() {
    let mut v = View::new(2, T);
    feed(&mut v, 0, replica(None));
    assert_eq!(v.snapshot().no_leader, Some(NoLeader::NoClaimant));
    feed(&mut v, 1, primary(Some(lineage("x", None))));
    assert_eq!(v.snapshot().no_leader, Some(NoLeader::Rising));
    for _ in 0..2 {
        feed(&mut v, 0, primary(Some(lineage("y", None))));
    }
    feed(&mut v, 1, primary(Some(lineage("x", None))));
    assert!(v.snapshot().split_brain);
    assert_eq!(v.snapshot().no_leader, Some(NoLeader::SplitBrain));
}

#[test]
fn a_dcs_naming_a_member_past_the_last_names_nobody() {
    // Members 0 and 1: index 2 is one past the last.
    let mut v = dcs_steady();
    v.apply_dcs(named(Some(2), 11));
    assert_eq!(
        v.snapshot().dcs,
        DcsView::Named {
            leader: None,
            term: Some(11)
        }
    );
    assert_eq!(v.leader(), None);
}

#[test]
fn an_unreachable_dcs_keeps_the_last_term_it_named_while_it_stays_away() {
    let mut v = dcs_steady();
    for error in ["timeout", "refused"] {
        v.apply_dcs(DcsReport::Unreachable {
            error: error.into(),
        });
        assert_eq!(
            v.snapshot().dcs,
            DcsView::Unreachable {
                error: error.into(),
                last_term: Some(10)
            }
        );
    }
}

#[test]
fn the_view_remembers_as_many_lineage_steps_as_its_memory_holds() {
    // One more step than the memory holds: the oldest is forgotten, the
    // others are all kept (a peer needs them to order replication ids).
    let mut v = View::new(2, T);
    for i in 1..=LINEAGE_MEMORY + 1 {
        let (id, previous) = (format!("s{i}"), format!("s{}", i - 1));
        feed(&mut v, 0, replica_on(lineage(&id, Some(&previous)), None));
    }
    let steps = v.snapshot().lineage;
    assert_eq!(steps.len(), LINEAGE_MEMORY);
    assert_eq!(steps[0], ("s2".to_string(), "s1".to_string()));
    let last = format!("s{}", LINEAGE_MEMORY + 1);
    assert_eq!(steps[LINEAGE_MEMORY - 1].0, last);
}

#[test]
fn the_view_remembers_as_many_unordered_peer_terms_as_its_memory_holds() {
    let mut v = View::new(2, T);
    let terms: Vec<Term> = (0..=PEER_TERMS_MEMORY)
        .map(|i| lineage(&format!("f{i}"), None))
        .collect();
    for term in &terms {
        v.apply_peer(PeerTerms {
            term: term.clone(),
            lineage: Vec::new(),
        });
    }
    assert_eq!(v.snapshot().peer_terms, terms[1..].to_vec());
}

#[test]
fn a_dcs_named_claimant_older_than_any_remembered_leader_is_fenced() {
    // Leaders of PAST_LEADERS_MEMORY + 1 unrelated histories in turn (the
    // DCS names each), each history `h<k>` continuing `p<k>`; then the DCS
    // names a member on `p2`, older than the second of them, which the view
    // still remembers.
    let mut v = View::new(2, Thresholds { rise: 1, fall: 1 }).with_dcs();
    let leaders = PAST_LEADERS_MEMORY as u64 + 1;
    for k in 1..=leaders {
        let (m, other) = ((k % 2) as MemberId, ((k + 1) % 2) as MemberId);
        feed(&mut v, other, replica(Some(m)));
        v.apply_dcs(named(Some(m), k));
        let term = lineage(&format!("h{k}"), Some(&format!("p{k}")));
        feed(&mut v, m, primary(Some(term)));
        assert_eq!(v.leader(), Some(m), "leader {k}");
    }
    let last = (leaders % 2) as MemberId;
    let first = 1 - last;
    feed(&mut v, last, replica(Some(first)));
    v.apply_dcs(named(Some(first), leaders + 1));
    feed(&mut v, first, primary(Some(lineage("p2", None))));
    assert_eq!(v.leader(), None);
    assert_eq!(
        v.snapshot().members[first].fenced,
        Some(FenceReason::OlderTerm)
    );
}

#[test]
fn every_term_abandoned_when_the_dcs_went_back_fences_nothing_within_the_views_memory() {
    // 0 leads on timelines 1 to 17 in turn; a peer proves 18. The DCS then
    // goes back to 1 on timeline 1, 0 rewound onto it: 2..=18 are
    // abandoned, seventeen terms, one more than the memory holds. A peer
    // still reporting any of the sixteen newest fences nothing.
    let mut v = dcs_steady();
    let newest = PAST_LEADERS_MEMORY as u64 + 2;
    for timeline in 2..newest {
        feed(&mut v, 0, pg(timeline));
        assert_eq!(v.leader(), Some(0));
    }
    feed(&mut v, 1, pg(1));
    feed(&mut v, 0, replica_on(Term::Number(1), Some(1)));
    v.apply_peer(PeerTerms {
        term: Term::Number(newest),
        lineage: Vec::new(),
    });
    v.apply_dcs(named(Some(1), 11));
    assert_eq!(v.leader(), Some(1), "the DCS went back to timeline 1");
    for abandoned in 3..=newest {
        v.apply_peer(PeerTerms {
            term: Term::Number(abandoned),
            lineage: Vec::new(),
        });
        assert_eq!(v.leader(), Some(1), "peer term {abandoned}");
    }
}

#[test]
fn accepting_the_member_that_already_leads_changes_no_routing() {
    let mut v = steady();
    let epoch = v.epoch();
    let t = v
        .apply_override(&Override::AcceptLeader(0))
        .expect("0 claims primary");
    assert!(t.is_empty(), "{t:?}");
    assert_eq!(v.leader(), Some(0));
    assert_eq!(v.epoch(), epoch);
}

#[test]
fn accepting_a_rising_member_takes_the_role_from_the_incumbent_at_once() {
    let mut v = View::new(3, T);
    for _ in 0..2 {
        feed(&mut v, 0, primary(Some(lineage("x", None))));
        feed(&mut v, 1, replica(Some(0)));
    }
    feed(&mut v, 2, primary(Some(lineage("z", None))));
    assert_eq!(v.leader(), Some(0));
    let epoch = v.epoch();
    let t = v
        .apply_override(&Override::AcceptLeader(2))
        .expect("2 claims primary");
    assert!(t.contains(&Transition::LeaderLost { member: 0 }), "{t:?}");
    assert_eq!(v.leader(), None, "2 is not up yet");
    assert_eq!(v.epoch(), epoch + 1, "routing changed: the leader is gone");
    feed(&mut v, 2, primary(Some(lineage("z", None))));
    assert_eq!(v.leader(), Some(2));
}

#[test]
fn an_accepted_leader_that_stops_claiming_primary_loses_the_role() {
    let mut v = steady();
    feed(&mut v, 0, hard());
    for _ in 0..2 {
        feed(&mut v, 1, primary(Some(lineage("z", None))));
    }
    v.apply_override(&Override::AcceptLeader(1))
        .expect("1 claims primary");
    assert_eq!(v.leader(), Some(1));
    feed(&mut v, 1, replica(None));
    assert_eq!(v.leader(), None);
    assert_eq!(v.snapshot().members[1].health, Health::Up);
}

#[test]
fn an_accepted_leader_carries_no_fence_of_its_own() {
    // 2 restarted empty while 1 still replicates from 0: the replicas
    // contradict 2, but the operator's decision overrides that.
    let mut v = View::new(3, T);
    for _ in 0..2 {
        feed(&mut v, 0, primary(Some(lineage("x", None))));
        feed(&mut v, 1, replica(Some(0)));
        feed(&mut v, 2, primary(Some(lineage("z", None))));
    }
    assert_eq!(v.leader(), Some(0));
    v.apply_override(&Override::AcceptLeader(2))
        .expect("2 claims primary");
    assert_eq!(v.leader(), Some(2));
    let s = v.snapshot();
    assert_eq!(s.members[2].fenced, None);
    assert_eq!(s.members[0].fenced, Some(FenceReason::OperatorPinned));
}

#[test]
fn a_lone_claimant_without_a_term_leads_on_a_fresh_view() {
    // Rule 3 with one claimant: nothing to order it against.
    let mut v = View::new(2, T);
    for _ in 0..2 {
        feed(&mut v, 0, primary(None));
        feed(&mut v, 1, replica(Some(0)));
    }
    assert_eq!(v.leader(), Some(0));
}

#[test]
fn a_replica_that_is_not_up_yet_does_not_contradict_the_leader() {
    let mut v = View::new(3, T);
    for _ in 0..2 {
        feed(&mut v, 0, primary(Some(lineage("x", None))));
    }
    assert_eq!(v.leader(), Some(0));
    // One report (rise is 2) of a replica that follows another member.
    feed(&mut v, 1, replica(Some(2)));
    assert_eq!(v.leader(), Some(0));
    assert_eq!(v.snapshot().members[0].fenced, None);
}

#[test]
fn half_the_replicas_following_another_member_do_not_contradict_the_leader() {
    // Cascading replication: 2 streams from 1, which streams from 0. Only
    // a majority of the reporting replicas contradicts (rule 5).
    let mut v = View::new(3, T);
    for _ in 0..2 {
        feed(&mut v, 0, primary(Some(lineage("x", None))));
        feed(&mut v, 1, replica(Some(0)));
        feed(&mut v, 2, replica(Some(1)));
    }
    assert_eq!(v.leader(), Some(0));
    assert_eq!(v.snapshot().members[0].fenced, None);
    assert_eq!(v.snapshot().replicas, vec![1, 2]);
}

#[test]
fn a_named_leader_that_moves_to_another_history_keeps_the_role_when_the_dcs_goes_away() {
    // Sentinel names 0, which restarts between two probes with a fresh
    // replication id and is still named: the leader's term moves with it,
    // so that when the DCS goes away its probes still confirm it (rule 6).
    let mut v = View::new(2, T).with_dcs();
    v.apply_dcs(named(Some(0), 3));
    for _ in 0..2 {
        feed(&mut v, 0, primary(Some(lineage("x", None))));
        feed(&mut v, 1, replica(Some(0)));
    }
    feed(&mut v, 0, primary(Some(lineage("y", None))));
    assert_eq!(v.leader(), Some(0));
    assert_eq!(v.snapshot().leader_term, Some(lineage("y", None)));
    v.apply_dcs(DcsReport::Unreachable {
        error: "timeout".into(),
    });
    feed(&mut v, 0, primary(Some(lineage("y", None))));
    assert_eq!(v.leader(), Some(0));
}

#[test]
fn under_a_dcs_the_last_leaders_member_following_another_history_moves_no_reference() {
    // 0 led on x. 1 restarted empty (z) and 0 was made its replica; 2 was
    // promoted and continues x. A (stale) DCS answer naming 1 must not win
    // while 2 holds x's data: with a DCS, rule 8's move of the reference to
    // the history the last leader's member follows does not apply.
    let mut v = View::new(3, T).with_dcs();
    v.apply_dcs(named(Some(0), 3));
    for _ in 0..2 {
        feed(&mut v, 0, primary(Some(lineage("x", None))));
        feed(&mut v, 1, replica(Some(0)));
        feed(&mut v, 2, replica(Some(0)));
    }
    assert_eq!(v.leader(), Some(0));
    feed(&mut v, 1, primary(Some(lineage("z", None))));
    feed(&mut v, 0, replica_on(lineage("z", None), Some(1)));
    feed(&mut v, 2, primary(Some(lineage("x2", Some("x")))));
    assert_eq!(v.leader(), None);
    assert_eq!(v.snapshot().leader_term, Some(lineage("x", None)));
    v.apply_dcs(named(Some(1), 4));
    assert_eq!(v.leader(), None);
    assert_eq!(
        v.snapshot().members[1].fenced,
        Some(FenceReason::UnrelatedHistory)
    );
}

#[test]
fn a_dcs_that_went_back_is_not_followed_while_the_last_leaders_term_is_unknown() {
    // As in the_view_follows_a_dcs_that_went_back_once_the_newer_history_is_gone,
    // but 1, the last leader, reports a replica without a timeline: nothing
    // shows that it was rewound.
    let mut v = dcs_steady();
    v.apply_dcs(named(Some(1), 11));
    feed(&mut v, 1, pg(2));
    assert_eq!(v.leader(), Some(1));
    v.apply_dcs(named(Some(0), 12));
    for _ in 0..2 {
        feed(&mut v, 0, pg(1));
        feed(&mut v, 1, replica(Some(0)));
        assert_eq!(v.leader(), None);
    }
    assert_eq!(v.snapshot().members[0].fenced, Some(FenceReason::OlderTerm));
}

#[test]
fn a_dcs_that_went_back_is_not_followed_while_the_last_leader_follows_a_history_in_between() {
    // Redis lineages n <- k <- l: 1 led on n, 0 on k, then on l. The DCS
    // names 1 again (on n); 0 is demoted and reports k without its
    // predecessor (a replica after a full resync reports no replid2): k is
    // older than l but not shown to be no newer than n, so nothing shows
    // that the newer history is gone.
    let mut v = View::new(2, T).with_dcs();
    v.apply_dcs(named(Some(1), 1));
    for _ in 0..2 {
        feed(&mut v, 1, primary(Some(lineage("n", None))));
        feed(&mut v, 0, replica_on(lineage("n", None), Some(1)));
    }
    assert_eq!(v.leader(), Some(1));
    v.apply_dcs(named(Some(0), 2));
    feed(&mut v, 0, primary(Some(lineage("k", Some("n")))));
    feed(&mut v, 1, replica_on(lineage("k", Some("n")), Some(0)));
    assert_eq!(v.leader(), Some(0));
    feed(&mut v, 0, primary(Some(lineage("l", Some("k")))));
    assert_eq!(v.snapshot().leader_term, Some(lineage("l", Some("k"))));
    feed(&mut v, 1, primary(Some(lineage("n", None))));
    v.apply_dcs(named(Some(1), 3));
    feed(&mut v, 0, replica_on(lineage("k", None), Some(1)));
    assert_eq!(v.leader(), None);
    assert_eq!(v.snapshot().members[1].fenced, Some(FenceReason::OlderTerm));
}

#[test]
fn of_two_claimants_at_once_the_provably_newer_leads() {
    // A fresh view, no leader yet: both claim in the same rounds. The one
    // whose term is newer leads (the other is fenced as older than a live
    // claim); it is not a split brain.
    let mut v = View::new(2, T);
    for _ in 0..2 {
        feed(&mut v, 0, primary(Some(Term::Number(3))));
        feed(&mut v, 1, primary(Some(Term::Number(4))));
    }
    assert_eq!(v.leader(), Some(1));
    assert!(!v.snapshot().split_brain);
    let mut v = View::new(3, T);
    for _ in 0..2 {
        feed(&mut v, 2, primary(Some(lineage("z", Some("y")))));
        feed(&mut v, 0, primary(Some(lineage("x", None))));
        feed(&mut v, 1, replica_on(lineage("y", Some("x")), None));
    }
    // 2 descends from x through y: newer than 0's x.
    assert_eq!(v.leader(), Some(2));
}

#[test]
fn half_the_replicas_against_a_claimant_do_not_contradict_it() {
    // Claimant 0; replica 1 follows it, replica 2 follows 3 (which never
    // answered). One of two is not a majority against 0: it leads.
    let mut v = View::new(4, Thresholds { rise: 1, fall: 1 });
    feed(&mut v, 1, replica(Some(0)));
    feed(&mut v, 2, replica(Some(3)));
    feed(&mut v, 0, primary(Some(lineage("p", None))));
    assert_eq!(
        v.leader(),
        Some(0),
        "one against, one for: not contradicted"
    );
    // Two of three against: contradicted.
    let mut v = View::new(5, Thresholds { rise: 1, fall: 1 });
    feed(&mut v, 1, replica(Some(0)));
    feed(&mut v, 2, replica(Some(3)));
    feed(&mut v, 4, replica(Some(3)));
    feed(&mut v, 0, primary(Some(lineage("p", None))));
    assert_eq!(v.leader(), None);
    assert_eq!(
        v.snapshot().members[0].fenced,
        Some(FenceReason::Contradicted)
    );
}
