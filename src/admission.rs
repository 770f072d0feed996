//! Who may take what on an endpoint: a connection holds an *opening* ticket
//! while it has not finished its opening (TLS handshake and the protocol's
//! first read), and a *session* ticket once it is established. The two are
//! counted apart, per endpoint and per client address, so that strangers
//! who connect and stay silent exhaust only the openings, which
//! `handshake_timeout` bounds, never the sessions of real clients.
//!
//! Pure bookkeeping: no I/O, no clock. A ticket gives its place back when it
//! is dropped, however the connection ends.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// An endpoint's limits (`max_handshakes`, `max_handshakes_per_source`,
/// `max_connections`, `max_connections_per_source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub handshakes: usize,
    pub handshakes_per_source: usize,
    pub sessions: usize,
    pub sessions_per_source: Option<usize>,
}

/// Which limit turned a connection away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    Handshakes,
    HandshakesPerSource,
    Sessions,
    SessionsPerSource,
}

impl Denied {
    /// The `reason` label of `portal_connections_refused_total`: the config
    /// key whose limit was reached.
    pub fn reason(self) -> &'static str {
        match self {
            Denied::Handshakes => "max_handshakes",
            Denied::HandshakesPerSource => "max_handshakes_per_source",
            Denied::Sessions => "max_connections",
            Denied::SessionsPerSource => "max_connections_per_source",
        }
    }
}

/// The admission state of one endpoint.
pub struct Admission {
    limits: Limits,
    handshakes: Arc<Semaphore>,
    sessions: Arc<Semaphore>,
    handshakes_by_source: Arc<PerSource>,
    sessions_by_source: Arc<PerSource>,
}

/// Held while a connection is in its opening.
#[derive(Debug)]
pub struct OpeningTicket {
    _slot: OwnedSemaphorePermit,
    _source: SourceShare,
}

/// Held while a session is established.
#[derive(Debug)]
pub struct SessionTicket {
    _slot: OwnedSemaphorePermit,
    _source: Option<SourceShare>,
}

impl Admission {
    pub fn new(limits: Limits) -> Admission {
        Admission {
            limits,
            handshakes: Arc::new(Semaphore::new(limits.handshakes)),
            sessions: Arc::new(Semaphore::new(limits.sessions)),
            handshakes_by_source: Arc::default(),
            sessions_by_source: Arc::default(),
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// A place for a new connection's opening, or why there is none.
    pub fn opening(&self, source: IpAddr) -> Result<OpeningTicket, Denied> {
        let source = PerSource::take(
            &self.handshakes_by_source,
            source,
            self.limits.handshakes_per_source,
        )
        .ok_or(Denied::HandshakesPerSource)?;
        let slot = self
            .handshakes
            .clone()
            .try_acquire_owned()
            .map_err(|_| Denied::Handshakes)?;
        Ok(OpeningTicket {
            _slot: slot,
            _source: source,
        })
    }

    /// Moves an opening's per-source share to `source` (the client a
    /// trusted balancer's PROXY header names; the share was taken for the
    /// balancer's address at accept): the endpoint's place is kept, the
    /// balancer's share goes back once the client's is taken. Denied when
    /// `source` holds `max_handshakes_per_source` openings already.
    pub fn reassign(&self, ticket: OpeningTicket, source: IpAddr) -> Result<OpeningTicket, Denied> {
        if ticket._source.source == source {
            return Ok(ticket);
        }
        let share = PerSource::take(
            &self.handshakes_by_source,
            source,
            self.limits.handshakes_per_source,
        )
        .ok_or(Denied::HandshakesPerSource)?;
        Ok(OpeningTicket {
            _slot: ticket._slot,
            _source: share,
        })
    }

    /// A place for an established session, or why there is none.
    pub fn session(&self, source: IpAddr) -> Result<SessionTicket, Denied> {
        let share = match self.limits.sessions_per_source {
            Some(limit) => Some(
                PerSource::take(&self.sessions_by_source, source, limit)
                    .ok_or(Denied::SessionsPerSource)?,
            ),
            None => None,
        };
        let slot = self
            .sessions
            .clone()
            .try_acquire_owned()
            .map_err(|_| Denied::Sessions)?;
        Ok(SessionTicket {
            _slot: slot,
            _source: share,
        })
    }

    /// Connections in their opening now.
    pub fn openings(&self) -> usize {
        self.limits.handshakes - self.handshakes.available_permits()
    }

    /// Established sessions now.
    pub fn sessions(&self) -> usize {
        self.limits.sessions - self.sessions.available_permits()
    }

    /// Client addresses with a connection in its opening now.
    pub fn opening_sources(&self) -> usize {
        self.handshakes_by_source.len()
    }
}

/// How many connections each client address holds.
#[derive(Debug, Default)]
struct PerSource(Mutex<HashMap<IpAddr, usize>>);

impl PerSource {
    fn counts(&self) -> MutexGuard<'_, HashMap<IpAddr, usize>> {
        // The map stays consistent whatever panicked while holding it: each
        // change is one insert or one remove.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn take(table: &Arc<PerSource>, source: IpAddr, limit: usize) -> Option<SourceShare> {
        let mut counts = table.counts();
        let held = counts.entry(source).or_insert(0);
        if *held >= limit {
            if *held == 0 {
                counts.remove(&source);
            }
            return None;
        }
        *held += 1;
        Some(SourceShare {
            table: table.clone(),
            source,
        })
    }

    fn len(&self) -> usize {
        self.counts().len()
    }
}

/// One connection's share of its address's count.
#[derive(Debug)]
struct SourceShare {
    table: Arc<PerSource>,
    source: IpAddr,
}

impl Drop for SourceShare {
    fn drop(&mut self) {
        let mut counts = self.table.counts();
        if let Some(held) = counts.get_mut(&self.source) {
            *held -= 1;
            if *held == 0 {
                counts.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2));

    fn limits() -> Limits {
        Limits {
            handshakes: 3,
            handshakes_per_source: 2,
            sessions: 2,
            sessions_per_source: None,
        }
    }

    #[test]
    fn openings_are_capped_per_source_then_per_endpoint() {
        let admission = Admission::new(limits());
        let a1 = admission.opening(A).expect("first from A");
        let _a2 = admission.opening(A).expect("second from A");
        assert_eq!(
            admission.opening(A).expect_err("third from A"),
            Denied::HandshakesPerSource
        );
        let _b1 = admission.opening(B).expect("B has its own share");
        assert_eq!(
            admission.opening(B).expect_err("the endpoint is full"),
            Denied::Handshakes
        );
        assert_eq!(admission.openings(), 3);
        assert_eq!(admission.opening_sources(), 2);
        drop(a1);
        assert_eq!(admission.openings(), 2);
        let _a3 = admission.opening(A).expect("A's place came back");
    }

    #[test]
    fn a_refused_opening_leaves_no_trace() {
        let admission = Admission::new(Limits {
            handshakes_per_source: 0,
            ..limits()
        });
        assert_eq!(
            admission.opening(A).expect_err("no place"),
            Denied::HandshakesPerSource
        );
        assert_eq!(admission.opening_sources(), 0);
        assert_eq!(admission.openings(), 0);
        // A refusal for the endpoint's cap gives the source's share back.
        let admission = Admission::new(Limits {
            handshakes: 1,
            ..limits()
        });
        let _b = admission.opening(B).expect("B");
        assert_eq!(admission.opening(A).expect_err("full"), Denied::Handshakes);
        assert_eq!(admission.opening_sources(), 1);
    }

    #[test]
    fn a_reassigned_opening_counts_for_its_new_source() {
        let admission = Admission::new(limits());
        // A balancer (A) accepted two, each for a client B.
        let first = admission.opening(A).expect("first");
        let second = admission.opening(A).expect("second");
        assert_eq!(
            admission.opening(A).expect_err("A's share is full"),
            Denied::HandshakesPerSource
        );
        let first = admission.reassign(first, B).expect("B's first");
        assert_eq!(admission.openings(), 2, "the endpoint's places are kept");
        // A has a place again; B holds one.
        let third = admission.opening(A).expect("A's place came back");
        drop(third);
        let second = admission.reassign(second, B).expect("B's second");
        let again = admission.opening(A).expect("from A");
        assert_eq!(
            admission.reassign(again, B).expect_err("B holds two"),
            Denied::HandshakesPerSource
        );
        assert_eq!(
            admission.openings(),
            2,
            "a refused move gives the place back"
        );
        // Moving to the same address changes nothing, even at the limit.
        let second = admission.reassign(second, B).expect("same address");
        drop((first, second));
        assert_eq!((admission.openings(), admission.opening_sources()), (0, 0));
    }

    #[test]
    fn sessions_do_not_compete_with_openings() {
        let admission = Admission::new(limits());
        let _openings: Vec<_> = (0..2)
            .map(|_| admission.opening(A).expect("opening"))
            .collect();
        let _s1 = admission
            .session(A)
            .expect("a session despite the openings");
        let s2 = admission.session(B).expect("second session");
        assert_eq!(
            admission.session(B).expect_err("max_connections"),
            Denied::Sessions
        );
        assert_eq!(admission.sessions(), 2);
        drop(s2);
        assert_eq!(admission.sessions(), 1);
        let _s2 = admission.session(B).expect("a place again");
    }

    #[test]
    fn sessions_per_source_when_configured() {
        let admission = Admission::new(Limits {
            sessions: 10,
            sessions_per_source: Some(1),
            ..limits()
        });
        let a = admission.session(A).expect("A");
        assert_eq!(
            admission.session(A).expect_err("A has one"),
            Denied::SessionsPerSource
        );
        let _b = admission.session(B).expect("B");
        drop(a);
        let _a = admission.session(A).expect("A again");
        assert_eq!(admission.sessions(), 2);
    }
}
