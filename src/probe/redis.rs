//! Redis probe: one persistent RESP3 connection per member (redis-rs), asking
//! `INFO replication`. The connection is opened by [`crate::backend::connect`]
//! (plain TCP, or TLS with `backend_tls`), the same path sessions take.
//!
//! The connection's disconnect notification makes a dropped connection a
//! report at once instead of at the next tick: that is what makes failover
//! event-driven.

use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ProtocolVersion, PushInfo, PushKind, RedisConnectionInfo};
use tokio::sync::mpsc;
use tokio_util::task::AbortOnDropHandle;

use super::{classify_io, Failure, ProbeContext, Prober};
use crate::backend::{self, Origination};
use crate::config::Protocol;
use crate::view::{Observation, Outcome, Role, Term};

/// What `INFO replication` says, in the fields the view needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replication {
    pub role: Role,
    pub replid: Option<String>,
    pub replid2: Option<String>,
    pub master_host: Option<String>,
    pub master_port: Option<u16>,
    pub link_up: bool,
    pub offset: Option<u64>,
}

/// `master_replid2` when there is no previous history.
const NO_REPLID: &str = "0000000000000000000000000000000000000000";

/// Parses the text of `INFO replication`.
pub fn parse_info_replication(text: &str) -> Result<Replication, String> {
    let mut role = None;
    let mut out = Replication {
        role: Role::Unknown,
        replid: None,
        replid2: None,
        master_host: None,
        master_port: None,
        link_up: false,
        offset: None,
    };
    for line in text.lines() {
        let Some((key, value)) = line.trim_end_matches('\r').split_once(':') else {
            continue;
        };
        match key {
            "role" => {
                role = Some(match value {
                    "master" => Role::Primary,
                    "slave" | "replica" => Role::Replica,
                    _ => Role::Unknown,
                })
            }
            "master_replid" if !value.is_empty() && value != NO_REPLID => {
                out.replid = Some(value.to_string())
            }
            "master_replid2" if !value.is_empty() && value != NO_REPLID => {
                out.replid2 = Some(value.to_string())
            }
            "master_host" => out.master_host = Some(value.to_string()),
            "master_port" => out.master_port = value.parse().ok(),
            "master_link_status" => out.link_up = value == "up",
            "master_repl_offset" => out.offset = value.parse().ok(),
            _ => {}
        }
    }
    out.role = role.ok_or_else(|| "INFO replication has no role field".to_string())?;
    Ok(out)
}

impl Replication {
    /// The view's observation; `upstream` resolves `master_host:master_port`.
    pub fn observation(&self, upstream: impl Fn(&str, u16) -> Option<usize>) -> Observation {
        let term = self.replid.as_ref().map(|id| Term::Lineage {
            id: id.clone(),
            previous: self.replid2.clone(),
        });
        let upstream = match (&self.master_host, self.master_port) {
            (Some(host), Some(port)) if self.role == Role::Replica && self.link_up => {
                upstream(host, port)
            }
            _ => None,
        };
        Observation {
            role: self.role,
            term,
            upstream,
            position: self.offset,
            delay: None,
            term_floor: false,
            followers: Vec::new(),
        }
    }
}

/// The probe's connection: the multiplexed client, its disconnect signal
/// and the task that drives it (aborted with the connection).
type Connection = (
    MultiplexedConnection,
    mpsc::UnboundedReceiver<PushInfo>,
    AbortOnDropHandle<()>,
);

/// The probe's connection to one member, plain or TLS (`backend_tls`).
pub struct RedisProber {
    origination: Option<Origination>,
    conn: Option<Connection>,
    /// The connection a renewal replaces, kept until the new one answers
    /// (see [`Prober::reconnect`]).
    spare: Option<Connection>,
}

impl RedisProber {
    pub fn new(origination: Option<Origination>) -> RedisProber {
        RedisProber {
            origination,
            conn: None,
            spare: None,
        }
    }

    /// Connects the way sessions do ([`backend::connect`]: plain, or TLS
    /// verified against `backend_tls`), then hands the stream to redis-rs
    /// (RESP3 `HELLO`, with the probe's credentials).
    async fn connect(
        origination: Option<&Origination>,
        ctx: &ProbeContext,
    ) -> Result<Connection, Failure> {
        let timeout = ctx.settings.timeout;
        let stream = backend::connect(Protocol::Redis, &ctx.address, origination, timeout)
            .await
            .map_err(|err| classify_io(&err))?;
        let mut settings = RedisConnectionInfo::default().set_protocol(ProtocolVersion::RESP3);
        if let Some(user) = &ctx.settings.username {
            settings = settings.set_username(user);
        }
        if let Some(password) = &ctx.settings.password {
            settings = settings.set_password(password.expose());
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let config = AsyncConnectionConfig::new()
            .set_response_timeout(Some(timeout))
            .set_push_sender(tx);
        let (conn, driver) = tokio::time::timeout(
            timeout,
            MultiplexedConnection::new_with_config(&settings, stream, config),
        )
        .await
        .map_err(|_| Failure::soft(format!("no HELLO answer within {timeout:?}")))?
        .map_err(|err| hello_failure(&err))?;
        let driver = AbortOnDropHandle::new(tokio::spawn(driver));
        Ok((conn, rx, driver))
    }

    async fn query(conn: &mut MultiplexedConnection, timeout: Duration) -> Result<String, Failure> {
        let cmd = redis::cmd("INFO").arg("replication").clone();
        match tokio::time::timeout(timeout, cmd.query_async::<String>(conn)).await {
            Ok(Ok(text)) => Ok(text),
            Ok(Err(err)) => Err(redis_failure(&err)),
            Err(_) => Err(Failure::soft(format!("no answer within {timeout:?}"))),
        }
    }
}

impl Prober for RedisProber {
    async fn probe(&mut self, ctx: &ProbeContext) -> (Outcome, Option<Duration>) {
        let started = Instant::now();
        let connect = Self::connect(self.origination.as_ref(), ctx);
        if let Err(failure) =
            super::connect_or_keep(ctx, &mut self.conn, &mut self.spare, connect).await
        {
            return (failure.outcome(), None);
        }
        let Some((conn, _, _)) = self.conn.as_mut() else {
            return (Failure::soft("no connection").outcome(), None);
        };
        let result = Self::query(conn, ctx.settings.timeout).await;
        match result.and_then(|text| parse_info_replication(&text).map_err(Failure::soft)) {
            Ok(replication) => {
                let seen = replication.observation(|host, port| ctx.member_at(host, port));
                (Outcome::Observed(seen), Some(started.elapsed()))
            }
            Err(failure) => {
                self.conn = None;
                (failure.outcome(), None)
            }
        }
    }

    fn reconnect(&mut self) {
        super::set_aside(&mut self.conn, &mut self.spare);
    }

    async fn disconnected(&mut self) {
        loop {
            let Some((_, pushes, _)) = self.conn.as_mut() else {
                return std::future::pending().await;
            };
            match pushes.recv().await {
                Some(push) if push.kind != PushKind::Disconnection => continue,
                _ => {
                    self.conn = None;
                    return;
                }
            }
        }
    }
}

/// A failed `HELLO` on a connection the member accepted. Redis over its
/// `maxclients` answers `-ERR max number of clients reached` and closes:
/// busy, whether the answer or only the close arrives.
fn hello_failure(err: &redis::RedisError) -> Failure {
    let text = err.to_string();
    if text.contains("max number of clients") || err.is_connection_dropped() {
        return Failure::busy(text);
    }
    redis_failure(err)
}

fn redis_failure(err: &redis::RedisError) -> Failure {
    if err.is_connection_refusal() || err.is_connection_dropped() {
        return Failure::hard(err.to_string());
    }
    if let Some(io) =
        std::error::Error::source(err).and_then(|s| s.downcast_ref::<std::io::Error>())
    {
        return classify_io(io);
    }
    Failure::soft(err.to_string())
}

/// Splits `host:port`, with `[v6]:port` accepted.
pub fn split_host_port(address: &str) -> Option<(&str, u16)> {
    let (host, port) = address.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Some((host, port.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRIMARY: &str = "# Replication\r\nrole:master\r\nconnected_slaves:1\r\nslave0:ip=127.0.0.1,port=6380,state=online,offset=42,lag=0\r\nmaster_failover_state:no-failover\r\nmaster_replid:8e4f0d5c3a7b2f1e9d6c5b4a3f2e1d0c9b8a7f6e\r\nmaster_replid2:0000000000000000000000000000000000000000\r\nmaster_repl_offset:42\r\nsecond_repl_offset:-1\r\n";
    const PROMOTED: &str = "# Replication\r\nrole:master\r\nconnected_slaves:0\r\nmaster_replid:1111111111111111111111111111111111111111\r\nmaster_replid2:8e4f0d5c3a7b2f1e9d6c5b4a3f2e1d0c9b8a7f6e\r\nmaster_repl_offset:42\r\nsecond_repl_offset:43\r\n";
    const REPLICA: &str = "# Replication\r\nrole:slave\r\nmaster_host:127.0.0.1\r\nmaster_port:6379\r\nmaster_link_status:up\r\nmaster_last_io_seconds_ago:1\r\nmaster_replid:8e4f0d5c3a7b2f1e9d6c5b4a3f2e1d0c9b8a7f6e\r\nmaster_replid2:0000000000000000000000000000000000000000\r\n";

    #[test]
    fn a_primary_reports_its_lineage() {
        let r = parse_info_replication(PRIMARY).expect("parse");
        assert_eq!(r.role, Role::Primary);
        let seen = r.observation(|_, _| None);
        assert_eq!(
            seen.term,
            Some(Term::Lineage {
                id: "8e4f0d5c3a7b2f1e9d6c5b4a3f2e1d0c9b8a7f6e".into(),
                previous: None
            })
        );
    }

    #[test]
    fn a_promoted_replica_is_provably_newer() {
        let old = parse_info_replication(PRIMARY)
            .expect("parse")
            .observation(|_, _| None);
        let new = parse_info_replication(PROMOTED)
            .expect("parse")
            .observation(|_, _| None);
        let (Some(old), Some(new)) = (old.term, new.term) else {
            panic!("terms expected");
        };
        assert_eq!(new.compare(&old), Some(std::cmp::Ordering::Greater));
    }

    #[test]
    fn a_replica_names_its_upstream_only_when_the_link_is_up() {
        let r = parse_info_replication(REPLICA).expect("parse");
        let at = |host: &str, port: u16| (host == "127.0.0.1" && port == 6379).then_some(0);
        assert_eq!(r.observation(at).upstream, Some(0));
        let down = REPLICA.replace("master_link_status:up", "master_link_status:down");
        let r = parse_info_replication(&down).expect("parse");
        assert_eq!(r.observation(at).upstream, None);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(parse_info_replication("").is_err());
        assert!(parse_info_replication("role").is_err());
        assert!(parse_info_replication("\u{0}:\u{ffff}\n::::").is_err());
        let r = parse_info_replication("role:sentinel\nmaster_port:99999").expect("parse");
        assert_eq!(r.role, Role::Unknown);
        assert_eq!(r.master_port, None);
    }

    #[test]
    fn host_port_splits() {
        assert_eq!(split_host_port("127.0.0.1:6379"), Some(("127.0.0.1", 6379)));
        assert_eq!(split_host_port("[::1]:6379"), Some(("::1", 6379)));
        assert_eq!(split_host_port("redis"), None);
    }
}
