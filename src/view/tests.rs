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
    })
}

fn replica(of: Option<MemberId>) -> Outcome {
    Outcome::Observed(Observation {
        role: Role::Replica,
        term: None,
        upstream: of,
        position: None,
        delay: None,
    })
}

fn replica_on(term: Term, of: Option<MemberId>) -> Outcome {
    Outcome::Observed(Observation {
        role: Role::Replica,
        term: Some(term),
        upstream: of,
        position: None,
        delay: None,
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
    let mut v = steady();
    feed(&mut v, 0, soft());
    // One soft failure: the member is not Up-and-claiming any more, so it
    // cannot lead, but it is not marked down yet.
    assert_eq!(v.snapshot().members[0].health, Health::Up);
    feed(&mut v, 0, soft());
    assert_eq!(v.snapshot().members[0].health, Health::Down);
    assert_eq!(v.leader(), None);
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
    // Member 0 comes back empty, claiming primary with a fresh id.
    for _ in 0..5 {
        feed(&mut v, 0, primary(Some(lineage("z", None))));
        feed(&mut v, 1, primary(Some(lineage("y", Some("x")))));
        assert_eq!(v.leader(), Some(1));
    }
    let s = v.snapshot();
    assert!(!s.split_brain, "the incumbent settles it");
    assert_eq!(s.members[0].fenced, Some(FenceReason::Incumbent));
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
    // The old primary is back first, empty, with a fresh id...
    feed(&mut v, 0, primary(Some(lineage("z", None))));
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
    feed(&mut v, 2, primary(Some(Term::Number(4))));
    assert_eq!(v.leader(), Some(2));
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
    assert_eq!(v.snapshot().members[1].fenced, Some(FenceReason::Incumbent));
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

/// A chain of lineages t0 <- t1 <- t2, plus two unrelated ones.
fn term_pool() -> Vec<Term> {
    vec![
        lineage("t0", None),
        lineage("t1", Some("t0")),
        lineage("t2", Some("t1")),
        lineage("u", None),
        lineage("v", Some("u")),
        Term::Number(1),
        Term::Number(2),
    ]
}

fn outcome_strategy(members: usize) -> impl Strategy<Value = Outcome> {
    let pool = term_pool();
    let pool_for_replicas = term_pool();
    prop_oneof![
        (0..pool.len()).prop_map(move |i| primary(Some(pool[i].clone()))),
        Just(primary(None)),
        (0..members + 1).prop_map(move |m| replica((m < members).then_some(m))),
        (0..members + 1, 0..pool_for_replicas.len()).prop_map(move |(m, i)| replica_on(
            pool_for_replicas[i].clone(),
            (m < members).then_some(m)
        )),
        any::<bool>().prop_map(|hard| Outcome::Failed {
            hard,
            error: "e".into()
        }),
    ]
}

fn scenario() -> impl Strategy<Value = (usize, u32, u32, Vec<(usize, Outcome)>)> {
    (2usize..5, 1u32..4, 1u32..4).prop_flat_map(|(n, rise, fall)| {
        (
            Just(n),
            Just(rise),
            Just(fall),
            prop::collection::vec((0..n, outcome_strategy(n)), 1..120),
        )
    })
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
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn with_a_dcs_only_the_named_member_leads((n, steps) in dcs_scenario()) {
        let mut v = View::new(n, Thresholds { rise: 1, fall: 1 }).with_dcs();
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
            }
            prop_assert!(!s.split_brain);
            for (id, m) in s.members.iter().enumerate() {
                if Some(id) != s.leader && m.fenced.is_none() && m.role == Role::Primary && m.health == Health::Up {
                    // With rise 1 a named, confirmed primary leads at once;
                    // any other up primary must carry a fence reason.
                    prop_assert!(false, "member {} claims primary, is neither leader nor fenced: {:?}", id, s);
                }
            }
        }
    }

    #[test]
    fn view_invariants_hold((n, rise, fall, steps) in scenario()) {
        let mut v = View::new(n, Thresholds { rise, fall });
        let mut leaders_terms: Vec<Term> = Vec::new();
        let mut last_leader_term: Option<Term> = None;
        let mut reported_by_leaders: Vec<Term> = Vec::new();
        let mut edges: Vec<(String, String)> = Vec::new();
        let mut last = v.snapshot();
        for (i, (member, outcome)) in steps.into_iter().enumerate() {
            if let Outcome::Observed(Observation { term: Some(Term::Lineage { id, previous: Some(p) }), .. }) = &outcome {
                edges.push((id.clone(), p.clone()));
            }
            // A term the sitting leader reports counts as a leader's term.
            if let Outcome::Observed(Observation { role: Role::Primary, term: Some(t), .. }) = &outcome {
                if last.leader == Some(member) {
                    last_leader_term = Some(t.clone());
                    reported_by_leaders.push(t.clone());
                }
            }
            v.apply(Report { member, generation: 0, at: at(i as u64), outcome });
            let s = v.snapshot();

            // The epoch never goes back, and moves exactly when routing changes.
            let routing_changed = s.leader != last.leader || s.replicas != last.replicas;
            prop_assert_eq!(s.epoch, last.epoch + u64::from(routing_changed));

            if let Some(l) = s.leader {
                // The leader currently claims primary.
                prop_assert_eq!(s.members[l].role, Role::Primary);
                prop_assert!(!s.replicas.contains(&l));
                // Never a leader with a term older than an earlier leader's.
                if let Some(term) = &s.members[l].term {
                    for earlier in &leaders_terms {
                        prop_assert!(!oracle_newer(earlier, term, &edges),
                            "leader term {} older than earlier leader term {}", term, earlier);
                    }
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
                }
            }
            for (id, m) in s.members.iter().enumerate() {
                if m.health == Health::Up && m.role == Role::Replica && !s.replicas.contains(&id) {
                    prop_assert_eq!(m.fenced, Some(FenceReason::BehindLeaderTerm),
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
    fn only_the_newest_generation_counts((n, steps) in (2usize..4).prop_flat_map(|n| (Just(n), prop::collection::vec((0..n, 0u64..4, outcome_strategy(n)), 1..120)))) {
        // Each step reports about generation `g` of a member: a member moves
        // whenever `g` exceeds every generation seen for it before, and a
        // report about an older one is stale.
        let mut v = View::new(n, Thresholds { rise: 1, fall: 1 });
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
                // What makes it leader was reported about its newest address.
                prop_assert_eq!(s.members[l].role, Role::Primary);
                prop_assert_eq!(s.members[l].health, Health::Up);
            }
        }
    }

    #[test]
    fn two_eligible_unordered_claimants_never_both_lead((n, steps) in (2usize..4).prop_flat_map(|n| (Just(n), prop::collection::vec((0..n, outcome_strategy(n)), 1..80)))) {
        // With rise 1 every claimant is eligible at once; at any time the
        // leader, if any, must be provably newer than or the incumbent over
        // every other claimant: i.e. no other claimant is provably newer.
        let mut v = View::new(n, Thresholds { rise: 1, fall: 1 });
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
fn a_member_promoted_behind_the_dcs_back_does_not_unseat_the_named_one() {
    let mut v = dcs_steady();
    // 1 is promoted by hand onto a newer timeline; the DCS still names 0.
    for _ in 0..3 {
        feed(&mut v, 1, pg(2));
    }
    assert_eq!(v.leader(), Some(0));
    let s = v.snapshot();
    assert_eq!(s.members[1].fenced, Some(FenceReason::NotDcsLeader));
    assert_eq!(s.members[0].fenced, None);
    assert!(!s.split_brain);
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
