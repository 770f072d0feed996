//! Choosing a member for a new connection from the current snapshot.
//!
//! Pure functions over the snapshot and the per-member session counts, so the
//! rules are testable without sockets.

use crate::config::{Balance, Route};
use crate::view::{MemberId, Snapshot};

/// The members a route may use now, in preference order.
pub fn candidates(snapshot: &Snapshot, route: Route) -> Vec<MemberId> {
    match route {
        Route::Leader => snapshot.leader.into_iter().collect(),
        Route::Replicas if snapshot.replicas.is_empty() => snapshot.leader.into_iter().collect(),
        Route::Replicas => snapshot.replicas.clone(),
        Route::Any => snapshot
            .leader
            .into_iter()
            .chain(snapshot.replicas.iter().copied())
            .collect(),
    }
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
        Snapshot {
            epoch: 1,
            leader,
            replicas,
            split_brain: false,
            members: Vec::new(),
        }
    }

    #[test]
    fn routes_pick_their_members() {
        let s = snapshot(Some(0), vec![1, 2]);
        assert_eq!(candidates(&s, Route::Leader), vec![0]);
        assert_eq!(candidates(&s, Route::Replicas), vec![1, 2]);
        assert_eq!(candidates(&s, Route::Any), vec![0, 1, 2]);
    }

    #[test]
    fn replicas_fall_back_to_the_leader() {
        let s = snapshot(Some(0), vec![]);
        assert_eq!(candidates(&s, Route::Replicas), vec![0]);
        let none = snapshot(None, vec![]);
        assert!(candidates(&none, Route::Replicas).is_empty());
        assert!(candidates(&none, Route::Leader).is_empty());
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
