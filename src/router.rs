//! Choosing a member for a new connection from the current snapshot.
//!
//! Pure functions over the snapshot and the per-member session counts, so the
//! rules are testable without sockets.

use crate::config::{Balance, MaxLag, ReplicaFallback, Route};
use crate::view::{MemberId, MemberView, Snapshot};

/// The members a route may use now. Replicas must pass `qualifies` (the lag
/// limit); when none does, `replicas` routes fall back per `fallback`.
pub fn candidates(
    snapshot: &Snapshot,
    route: Route,
    fallback: ReplicaFallback,
    qualifies: impl Fn(MemberId) -> bool,
) -> Vec<MemberId> {
    let replicas = snapshot.replicas.iter().copied().filter(|&r| qualifies(r));
    match route {
        Route::Leader => snapshot.leader.into_iter().collect(),
        Route::Replicas => {
            let replicas: Vec<MemberId> = replicas.collect();
            match (replicas.is_empty(), fallback) {
                (false, _) => replicas,
                (true, ReplicaFallback::Leader) => snapshot.leader.into_iter().collect(),
                (true, ReplicaFallback::Refuse) => Vec::new(),
            }
        }
        Route::Any => snapshot.leader.into_iter().chain(replicas).collect(),
    }
}

/// Whether a replica is within `limit`. With a limit set, a replica whose lag
/// is unknown does not qualify.
pub fn within_lag(member: Option<&MemberView>, limit: MaxLag) -> bool {
    if limit == MaxLag::default() {
        return true;
    }
    let Some(member) = member else { return false };
    let bytes_ok = limit
        .bytes
        .is_none_or(|max| member.lag_bytes.is_some_and(|lag| lag <= max));
    let delay_ok = limit
        .duration
        .is_none_or(|max| member.delay.is_some_and(|delay| delay <= max));
    bytes_ok && delay_ok
}

/// Picks one of `candidates`: the `turn`-th in round-robin, or the one with
/// the fewest active sessions (ties go round-robin too).
pub fn choose(
    candidates: &[MemberId],
    balance: Balance,
    turn: usize,
    active: impl Fn(MemberId) -> usize,
) -> Option<MemberId> {
    if candidates.is_empty() {
        return None;
    }
    match balance {
        Balance::RoundRobin => Some(candidates[turn % candidates.len()]),
        Balance::LeastConnections => {
            let fewest = candidates.iter().map(|&m| active(m)).min()?;
            let tied: Vec<MemberId> = candidates
                .iter()
                .copied()
                .filter(|&m| active(m) == fewest)
                .collect();
            Some(tied[turn % tied.len()])
        }
    }
}

/// Whether a session on `member` may stay open under `route` after the view
/// changed. Leader sessions follow the leader; read sessions stay while the
/// member is still eligible at all.
pub fn still_eligible(snapshot: &Snapshot, route: Route, member: MemberId) -> bool {
    match route {
        Route::Leader => snapshot.leader == Some(member),
        Route::Replicas | Route::Any => {
            snapshot.leader == Some(member) || snapshot.replicas.contains(&member)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(leader: Option<MemberId>, replicas: Vec<MemberId>) -> Snapshot {
        Snapshot::routing_only(1, leader, replicas)
    }

    const ALL: fn(MemberId) -> bool = |_| true;

    #[test]
    fn routes_pick_their_members() {
        let s = snapshot(Some(0), vec![1, 2]);
        let fb = ReplicaFallback::Leader;
        assert_eq!(candidates(&s, Route::Leader, fb, ALL), vec![0]);
        assert_eq!(candidates(&s, Route::Replicas, fb, ALL), vec![1, 2]);
        assert_eq!(candidates(&s, Route::Any, fb, ALL), vec![0, 1, 2]);
        assert_eq!(candidates(&s, Route::Replicas, fb, |m| m == 2), vec![2]);
        assert_eq!(candidates(&s, Route::Any, fb, |m| m == 2), vec![0, 2]);
    }

    #[test]
    fn replicas_fall_back_to_the_leader_or_refuse() {
        let s = snapshot(Some(0), vec![]);
        assert_eq!(
            candidates(&s, Route::Replicas, ReplicaFallback::Leader, ALL),
            vec![0]
        );
        assert!(candidates(&s, Route::Replicas, ReplicaFallback::Refuse, ALL).is_empty());
        let lagging = snapshot(Some(0), vec![1]);
        assert_eq!(
            candidates(&lagging, Route::Replicas, ReplicaFallback::Leader, |_| {
                false
            }),
            vec![0]
        );
        let none = snapshot(None, vec![]);
        assert!(candidates(&none, Route::Replicas, ReplicaFallback::Leader, ALL).is_empty());
        assert!(candidates(&none, Route::Leader, ReplicaFallback::Leader, ALL).is_empty());
    }

    fn member(lag_bytes: Option<u64>, delay_ms: Option<u64>) -> MemberView {
        MemberView {
            health: crate::view::Health::Up,
            role: crate::view::Role::Replica,
            term: None,
            upstream: None,
            last_report: None,
            last_error: None,
            fenced: None,
            position: None,
            lag_bytes,
            delay: delay_ms.map(std::time::Duration::from_millis),
            generation: 0,
            missed: 0,
        }
    }

    #[test]
    fn lag_limits_apply_to_bytes_and_delay() {
        let none = MaxLag::default();
        let bytes = MaxLag {
            bytes: Some(100),
            duration: None,
        };
        let both = MaxLag {
            bytes: Some(100),
            duration: Some(std::time::Duration::from_secs(1)),
        };
        assert!(within_lag(None, none));
        assert!(within_lag(Some(&member(Some(100), None)), bytes));
        assert!(!within_lag(Some(&member(Some(101), None)), bytes));
        assert!(
            !within_lag(Some(&member(None, None)), bytes),
            "unknown lag does not qualify"
        );
        assert!(within_lag(Some(&member(Some(5), Some(999))), both));
        assert!(!within_lag(Some(&member(Some(5), Some(1001))), both));
    }

    #[test]
    fn round_robin_cycles() {
        let picks: Vec<_> = (0..4)
            .map(|t| choose(&[1, 2], Balance::RoundRobin, t, |_| 0))
            .collect();
        assert_eq!(picks, vec![Some(1), Some(2), Some(1), Some(2)]);
    }

    #[test]
    fn least_connections_prefers_the_idle_member() {
        let active = |m: MemberId| if m == 1 { 5 } else { 2 };
        for turn in 0..4 {
            assert_eq!(
                choose(&[1, 2], Balance::LeastConnections, turn, active),
                Some(2)
            );
        }
        assert_eq!(choose(&[], Balance::LeastConnections, 0, active), None);
    }

    #[test]
    fn sessions_follow_eligibility() {
        let s = snapshot(Some(1), vec![2]);
        assert!(!still_eligible(&s, Route::Leader, 0));
        assert!(still_eligible(&s, Route::Leader, 1));
        assert!(still_eligible(&s, Route::Replicas, 1));
        assert!(still_eligible(&s, Route::Any, 2));
        assert!(!still_eligible(&s, Route::Replicas, 0));
    }
}
