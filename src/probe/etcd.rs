//! etcd probe: one persistent gRPC channel per member (a tonic channel),
//! asking the Maintenance `Status` API through the generated client of
//! [`crate::etcd_api`].
//!
//! A member's status names its own id (`header.member_id`), the id of the
//! leader it knows (`leader`, 0 when it knows none) and its `raft_term`. The
//! member is primary when the two ids are equal; the Raft term is the fence,
//! so a member cut off from the others that still believes it leads (with
//! the older term) loses to the newly elected leader. A follower's
//! `upstream` is the configured member whose own status reported the leader
//! id, so the view's majority-contradiction rule applies to etcd too.
//!
//! The channel's connections are made by [`crate::backend::connect`], the
//! same path sessions take (plain h2c, or TLS with ALPN `h2`): a refused
//! connect is a hard failure at once, and a connection that drops wakes the
//! probe loop through [`Prober::disconnected`].

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

use super::{classify_io, Failure, ProbeContext, Prober};
use crate::backend::{self, Origination};
use crate::config::Protocol;
use crate::etcd_api::etcdserverpb::maintenance_client::MaintenanceClient;
use crate::etcd_api::etcdserverpb::{StatusRequest, StatusResponse};
use crate::stream::Stream;
use crate::view::{MemberId, Observation, Outcome, Role, Term};

/// The etcd member id each configured member reported for itself (0 while
/// unknown), shared by the probes of one cluster.
#[derive(Debug, Default)]
pub struct MemberIds(Vec<AtomicU64>);

impl MemberIds {
    pub fn new(members: usize) -> Arc<MemberIds> {
        Arc::new(MemberIds((0..members).map(|_| AtomicU64::new(0)).collect()))
    }

    fn learn(&self, member: MemberId, id: u64) {
        if let Some(slot) = self.0.get(member) {
            slot.store(id, Ordering::Relaxed);
        }
    }

    /// The configured member that reported `id` as its own.
    pub fn member(&self, id: u64) -> Option<MemberId> {
        if id == 0 {
            return None;
        }
        self.0
            .iter()
            .position(|slot| slot.load(Ordering::Relaxed) == id)
    }
}

/// What one `Status` answer says, in the fields the view needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    pub member_id: u64,
    pub leader: u64,
    pub raft_term: u64,
}

impl Status {
    fn from_response(response: &StatusResponse) -> Result<Status, Failure> {
        let header = response
            .header
            .as_ref()
            .ok_or_else(|| Failure::soft("status answer without a header"))?;
        Ok(Status {
            member_id: header.member_id,
            leader: response.leader,
            raft_term: response.raft_term,
        })
    }

    /// The view's observation; `member_of` maps an etcd member id to a
    /// configured member.
    pub fn observation(&self, member_of: impl Fn(u64) -> Option<MemberId>) -> Observation {
        let role = if self.leader == 0 {
            Role::Unknown
        } else if self.leader == self.member_id {
            Role::Primary
        } else {
            Role::Replica
        };
        Observation {
            role,
            term: Some(Term::Number(self.raft_term)),
            upstream: match role {
                Role::Replica => member_of(self.leader),
                _ => None,
            },
            // Raft indexes count entries, not bytes or time: not comparable
            // with `max_lag`, so not reported.
            position: None,
            delay: None,
            term_floor: false,
            followers: Vec::new(),
        }
    }
}

struct Connection {
    client: MaintenanceClient<tonic::transport::Channel>,
    /// Signalled when a connection of the channel closes.
    closed: Arc<Notify>,
}

pub struct EtcdProber {
    origination: Option<Origination>,
    ids: Arc<MemberIds>,
    conn: Option<Connection>,
}

impl EtcdProber {
    pub fn new(origination: Option<Origination>, ids: Arc<MemberIds>) -> EtcdProber {
        EtcdProber {
            origination,
            ids,
            conn: None,
        }
    }

    async fn connect(&self, ctx: &ProbeContext) -> Result<Connection, Failure> {
        let timeout = ctx.settings.timeout;
        let closed = Arc::new(Notify::new());
        let connector = {
            let address = ctx.address.clone();
            let origination = self.origination.clone();
            let closed = closed.clone();
            tower::service_fn(move |_: tonic::codegen::http::Uri| {
                let (address, origination, closed) =
                    (address.clone(), origination.clone(), closed.clone());
                async move {
                    let stream =
                        backend::connect(Protocol::Etcd, &address, origination.as_ref(), timeout)
                            .await?;
                    Ok::<_, io::Error>(TokioIo::new(Watched {
                        inner: stream,
                        closed,
                    }))
                }
            })
        };
        // The URI only names the authority for HTTP/2; the connector decides
        // where and how to connect.
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", ctx.address))
            .map_err(|err| Failure::soft(format!("bad address {}: {err}", ctx.address)))?
            .connect_timeout(timeout)
            .timeout(timeout);
        let channel = endpoint
            .connect_with_connector(connector)
            .await
            .map_err(|err| failure_from_chain(&err, &err.to_string()))?;
        Ok(Connection {
            client: MaintenanceClient::new(channel),
            closed,
        })
    }
}

impl Prober for EtcdProber {
    async fn probe(&mut self, ctx: &ProbeContext) -> (Outcome, Option<Duration>) {
        let started = Instant::now();
        if self.conn.is_none() {
            match self.connect(ctx).await {
                Ok(conn) => self.conn = Some(conn),
                Err(failure) => return (failure.outcome(), None),
            }
        }
        let Some(conn) = self.conn.as_mut() else {
            return (Failure::soft("no connection").outcome(), None);
        };
        let timeout = ctx.settings.timeout;
        let answer = match tokio::time::timeout(timeout, conn.client.status(StatusRequest {})).await
        {
            Ok(Ok(response)) => Status::from_response(response.get_ref()),
            Ok(Err(status)) => Err(etcd_failure(&status)),
            Err(_) => Err(Failure::soft(format!("no answer within {timeout:?}"))),
        };
        match answer {
            Ok(status) => {
                self.ids.learn(ctx.member, status.member_id);
                let seen = status.observation(|id| self.ids.member(id));
                (Outcome::Observed(seen), Some(started.elapsed()))
            }
            Err(failure) => {
                // A fresh channel next time: its connect says at once whether
                // the member is there at all.
                self.conn = None;
                (failure.outcome(), None)
            }
        }
    }

    fn reconnect(&mut self) {
        self.conn = None;
    }

    async fn disconnected(&mut self) {
        match self.conn.as_ref() {
            Some(conn) => {
                let closed = conn.closed.clone();
                closed.notified().await;
                self.conn = None;
            }
            None => std::future::pending().await,
        }
    }
}

/// Refused or reset anywhere in the error chain is hard (a transport error
/// travels as the gRPC status's source); a member that answers with a gRPC
/// error (no leader, too many requests) is soft.
fn etcd_failure(status: &tonic::Status) -> Failure {
    failure_from_chain(status, &format!("grpc request error: {status}"))
}

fn failure_from_chain(err: &(dyn std::error::Error + 'static), text: &str) -> Failure {
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            let mut failure = classify_io(io);
            failure.error = text.to_string();
            return failure;
        }
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            if h.is_closed() || h.is_incomplete_message() || h.is_canceled() {
                return Failure::hard(text.to_string());
            }
        }
        next = e.source();
    }
    Failure::soft(text.to_string())
}

/// A connection of the probe's channel that signals when it closes: on EOF,
/// on an error, or when hyper drops it.
struct Watched {
    inner: Stream,
    closed: Arc<Notify>,
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.closed.notify_one();
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        match &polled {
            Poll::Ready(Ok(())) if buf.filled().len() == before && buf.remaining() > 0 => {
                self.closed.notify_one()
            }
            Poll::Ready(Err(_)) => self.closed.notify_one(),
            _ => {}
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
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

    #[test]
    fn the_leader_is_the_member_that_names_itself() {
        let ids = MemberIds::new(3);
        ids.learn(0, 0xa);
        ids.learn(1, 0xb);
        let leader = Status {
            member_id: 0xa,
            leader: 0xa,
            raft_term: 7,
        }
        .observation(|id| ids.member(id));
        assert_eq!(leader.role, Role::Primary);
        assert_eq!(leader.term, Some(Term::Number(7)));
        assert_eq!(leader.upstream, None);

        let follower = Status {
            member_id: 0xb,
            leader: 0xa,
            raft_term: 7,
        }
        .observation(|id| ids.member(id));
        assert_eq!(follower.role, Role::Replica);
        assert_eq!(follower.upstream, Some(0));

        // A leader id no configured member has reported: no upstream.
        let unknown = Status {
            member_id: 0xb,
            leader: 0xc,
            raft_term: 8,
        }
        .observation(|id| ids.member(id));
        assert_eq!(unknown.upstream, None);

        let leaderless = Status {
            member_id: 0xb,
            leader: 0,
            raft_term: 9,
        }
        .observation(|id| ids.member(id));
        assert_eq!(leaderless.role, Role::Unknown);
        assert_eq!(ids.member(0), None);
    }

    #[test]
    fn refused_in_the_chain_is_hard() {
        let refused = io::Error::new(io::ErrorKind::ConnectionRefused, "refused");
        assert!(failure_from_chain(&refused, "x").hard);
        let slow = io::Error::new(io::ErrorKind::TimedOut, "slow");
        assert!(!failure_from_chain(&slow, "x").hard);
        let status = tonic::Status::unavailable("etcdserver: no leader");
        assert!(!failure_from_chain(&status, "x").hard);
    }

    #[test]
    fn a_transport_error_under_a_status_is_classified_by_its_cause() {
        let refused = io::Error::new(io::ErrorKind::ConnectionRefused, "refused");
        let status = tonic::Status::from_error(Box::new(refused));
        let failure = etcd_failure(&status);
        assert!(failure.hard, "{}", failure.error);
        assert!(failure.error.starts_with("grpc request error: "));
        let answered = tonic::Status::resource_exhausted("etcdserver: too many requests");
        assert!(!etcd_failure(&answered).hard);
    }
}
