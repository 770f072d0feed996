//! The protocol-specific side of an established session, behind one hook,
//! so that the relay in [`crate::proxy`] is one protocol-free loop.
//! PostgreSQL has one: the startup message's user and database in the logs,
//! the cancel key of each session (so that a `CancelRequest` on a new
//! connection reaches the right member), a close at a message boundary
//! with an `ErrorResponse` the client understands (`57P01` on a leader
//! change, `57P05` on `idle_timeout`), and the channel-binding check. Redis
//! and etcd need none of it: their sessions just end.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::cluster::Cluster;
use crate::config::Protocol;
use crate::frontend::postgres::{self, CancelKey, KeyWatcher};
use crate::splice::Splice;
use crate::stream::Stream;
use crate::view::MemberId;

/// How long a PostgreSQL session closed on a leader change may take to
/// finish relaying the message its client is in the middle of (and to take
/// the `57P01` after it). Past that it is closed mid-message, without one.
pub const CLOSE_DRAIN: Duration = Duration::from_secs(1);

/// What a session does that depends on its protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionHook {
    /// Redis, etcd: bytes only.
    Bytes,
    Postgres,
}

/// Why the portal closes a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The member is no longer eligible for the endpoint's route.
    LeaderChange,
    /// No byte moved either way for `idle_timeout`.
    Idle,
}

/// How a session closed by the portal ended.
#[derive(Debug)]
pub enum Closed {
    /// The protocol has no notice to send: the session just ends.
    Plainly,
    /// The message in flight was finished (`relayed` more bytes), then the
    /// ErrorResponse sent.
    AtBoundary(u64),
    /// The member's stream ended mid-message; no ErrorResponse.
    MemberEnded,
    /// Relaying the rest of the message failed.
    Failed(io::Error),
    /// The rest did not come within [`CLOSE_DRAIN`]: closed mid-message.
    TimedOut,
}

impl SessionHook {
    pub fn for_protocol(protocol: Protocol) -> SessionHook {
        match protocol {
            Protocol::Postgres => SessionHook::Postgres,
            Protocol::Redis | Protocol::Etcd => SessionHook::Bytes,
        }
    }

    /// Whether the relay follows the member's message boundaries (see
    /// [`Splice::new`]).
    pub fn framed(self) -> bool {
        self == SessionHook::Postgres
    }

    /// Whether SCRAM channel binding can fail on this protocol when the
    /// member's certificate is not the endpoint's.
    pub fn binds_channel(self) -> bool {
        self == SessionHook::Postgres
    }

    /// The user and database the client's first bytes name, for the logs.
    pub fn identity(self, preface: &[u8]) -> (Option<String>, Option<String>) {
        match self {
            SessionHook::Postgres => postgres::startup_identity(preface),
            SessionHook::Bytes => (None, None),
        }
    }

    /// The member's side of the session, watching for what the protocol
    /// needs to record.
    pub fn member_side(
        self,
        server: Stream,
        cluster: Arc<Cluster>,
        member: MemberId,
    ) -> KeyWatched {
        KeyWatched {
            inner: server,
            watcher: (self == SessionHook::Postgres).then(KeyWatcher::new),
            cluster,
            member,
            key: None,
        }
    }

    /// Ends a session the portal closes, after the relay was dropped: for
    /// PostgreSQL, finishes the backend message the client is in the middle
    /// of, then sends an ErrorResponse (an ErrorResponse inside a
    /// half-relayed DataRow would corrupt the client's stream; closing
    /// mid-message is the lesser harm when the message cannot be finished
    /// within [`CLOSE_DRAIN`]).
    pub async fn close<C>(
        self,
        why: CloseReason,
        splice: &mut Splice,
        client: &mut C,
        server: &mut KeyWatched,
    ) -> Closed
    where
        C: AsyncWrite + Unpin + ?Sized,
    {
        if self != SessionHook::Postgres {
            return Closed::Plainly;
        }
        let (sqlstate, message) = match why {
            CloseReason::LeaderChange => (
                "57P01",
                "portal: the member this session used is no longer eligible (leader change); reconnect",
            ),
            // What PostgreSQL's own idle_session_timeout sends.
            CloseReason::Idle => (
                "57P05",
                "portal: terminating connection due to idle timeout (idle_timeout)",
            ),
        };
        let notice = postgres::error_response(sqlstate, message);
        let drained = tokio::time::timeout(CLOSE_DRAIN, async {
            let relayed = splice.finish_message(client, server).await?;
            if relayed.is_some() {
                client.write_all(&notice).await?;
                client.flush().await?;
            }
            Ok::<_, io::Error>(relayed)
        })
        .await;
        match drained {
            Ok(Ok(Some(relayed))) => Closed::AtBoundary(relayed),
            Ok(Ok(None)) => Closed::MemberEnded,
            Ok(Err(err)) => Closed::Failed(err),
            Err(_) => Closed::TimedOut,
        }
    }
}

/// The member's side of a session. For PostgreSQL it records the session's
/// cancel key when `BackendKeyData` passes, and forgets it when the session
/// ends; for the other protocols it only passes bytes through.
pub struct KeyWatched {
    inner: Stream,
    watcher: Option<KeyWatcher>,
    cluster: Arc<Cluster>,
    member: MemberId,
    key: Option<CancelKey>,
}

impl AsyncRead for KeyWatched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let this = &mut *self;
        if let Some(watcher) = this.watcher.as_mut() {
            if let Some(key) = watcher.feed(&buf.filled()[before..]) {
                let issuer = this.cluster.roster.get(this.member);
                if issuer.is_some_and(|issuer| this.cluster.cancel_keys.insert(key.clone(), issuer))
                {
                    this.key = Some(key);
                } else {
                    tracing::warn!(cluster = %this.cluster.config.name, "cancel key table full; this session cannot be cancelled through the portal");
                }
            }
            if watcher.done() {
                this.watcher = None;
            }
        }
        polled
    }
}

impl AsyncWrite for KeyWatched {
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

impl Drop for KeyWatched {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.cluster.cancel_keys.remove(&key);
        }
    }
}
