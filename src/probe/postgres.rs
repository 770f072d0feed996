//! PostgreSQL probe: one persistent tokio-postgres session per member,
//! asking in one round trip whether it is in recovery, its timeline (the
//! term), its WAL position and whom it streams from.
//!
//! The connection is opened by [`crate::backend::connect`] (plain, or TLS after
//! `SSLRequest`), the same path sessions take, then handed to tokio-postgres.

use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tokio_postgres::config::SslMode;
use tokio_postgres::{Client, NoTls};

use super::{Failure, ProbeContext, Prober};
use crate::backend::{self, Origination};
use crate::config::Protocol;
use crate::view::{Observation, Outcome, Role, Term};

/// One round trip. A primary's timeline is the first 8 hex digits of its
/// current WAL file name; a standby's is the one its WAL receiver streams
/// (or the last checkpoint's when it is not streaming). `delay` is how far
/// replay trails what was received, in seconds, 0 when caught up. `system`
/// tells apart database systems (every initdb draws a new one), so that a
/// member re-created from scratch is an unrelated history (view rule 8).
const QUERY: &str = "\
select pg_is_in_recovery() as standby,
  (case when pg_is_in_recovery()
     then coalesce((select received_tli from pg_stat_wal_receiver limit 1),
                   (select timeline_id from pg_control_checkpoint()))
     else ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int
   end)::int8 as timeline,
  ((case when pg_is_in_recovery() then pg_last_wal_replay_lsn() else pg_current_wal_lsn() end)
     - '0/0'::pg_lsn)::int8 as position,
  (select sender_host || ':' || sender_port from pg_stat_wal_receiver
     where status = 'streaming' limit 1) as upstream,
  (case when not pg_is_in_recovery() or pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() then 0
     else coalesce(extract(epoch from now() - pg_last_xact_replay_timestamp()), 0)
   end)::float8 as delay,
  (select system_identifier from pg_control_system()) as system";

pub struct PostgresProber {
    origination: Option<Origination>,
    conn: Option<(Client, oneshot::Receiver<()>)>,
    /// The connection a renewal replaces, kept until the new one answers
    /// (see [`Prober::reconnect`]).
    spare: Option<(Client, oneshot::Receiver<()>)>,
}

impl PostgresProber {
    pub fn new(origination: Option<Origination>) -> PostgresProber {
        PostgresProber {
            origination,
            conn: None,
            spare: None,
        }
    }

    async fn connect(
        origination: Option<&Origination>,
        ctx: &ProbeContext,
    ) -> Result<(Client, oneshot::Receiver<()>), Failure> {
        let timeout = ctx.settings.timeout;
        let stream = backend::connect(Protocol::Postgres, &ctx.address, origination, timeout)
            .await
            .map_err(|err| super::classify_io(&err))?;
        let mut config = tokio_postgres::Config::new();
        config
            .ssl_mode(SslMode::Disable) // TLS, if any, is already up
            .application_name("portal-probe")
            .dbname(&ctx.settings.dbname)
            .connect_timeout(timeout);
        if let Some(user) = &ctx.settings.username {
            config.user(user);
        }
        if let Some(password) = &ctx.settings.password {
            config.password(password.expose());
        }
        let (client, connection) = tokio::time::timeout(timeout, config.connect_raw(stream, NoTls))
            .await
            .map_err(|_| Failure::soft(format!("no startup answer within {timeout:?}")))?
            .map_err(|err| match err.code() {
                // `too many clients already`, `remaining connection slots
                // are reserved ...`: full, not down.
                Some(code) if *code == tokio_postgres::error::SqlState::TOO_MANY_CONNECTIONS => {
                    Failure::busy(pg_failure(&err).error)
                }
                _ => pg_failure(&err),
            })?;
        let (closed_tx, closed) = oneshot::channel();
        tokio::spawn(async move {
            let _ = connection.await;
            let _ = closed_tx.send(());
        });
        Ok((client, closed))
    }
}

impl Prober for PostgresProber {
    async fn probe(&mut self, ctx: &ProbeContext) -> (Outcome, Option<Duration>) {
        let started = Instant::now();
        let connect = Self::connect(self.origination.as_ref(), ctx);
        if let Err(failure) =
            super::connect_or_keep(ctx, &mut self.conn, &mut self.spare, connect).await
        {
            return (failure.outcome(), None);
        }
        let Some((client, _)) = self.conn.as_ref() else {
            return (Failure::soft("no connection").outcome(), None);
        };
        let timeout = ctx.settings.timeout;
        let row = match tokio::time::timeout(timeout, client.query_one(QUERY, &[])).await {
            Ok(Ok(row)) => row,
            Ok(Err(err)) => {
                self.conn = None;
                return (pg_failure(&err).outcome(), None);
            }
            Err(_) => {
                self.conn = None;
                return (
                    Failure::soft(format!("no answer within {timeout:?}")).outcome(),
                    None,
                );
            }
        };
        let parsed = (|| -> Result<Observation, tokio_postgres::Error> {
            let standby: bool = row.try_get("standby")?;
            let timeline: Option<i64> = row.try_get("timeline")?;
            let position: Option<i64> = row.try_get("position")?;
            let upstream: Option<String> = row.try_get("upstream")?;
            let delay: Option<f64> = row.try_get("delay")?;
            let system: Option<i64> = row.try_get("system")?;
            let timeline = timeline.and_then(|t| u64::try_from(t).ok());
            Ok(Observation {
                role: if standby {
                    Role::Replica
                } else {
                    Role::Primary
                },
                term: timeline.map(|timeline| match system {
                    // The identifier is an unsigned 64-bit number that SQL
                    // shows as a signed one: the same bits either way.
                    Some(system) => Term::Timeline {
                        system: system as u64,
                        timeline,
                    },
                    None => Term::Number(timeline),
                }),
                // A standby that does not stream reports its last
                // checkpoint's timeline: the one it replays may be newer.
                term_floor: standby && upstream.is_none(),
                followers: Vec::new(),
                upstream: upstream
                    .as_deref()
                    .and_then(crate::probe::redis::split_host_port)
                    .and_then(|(host, port)| ctx.member_at(host, port)),
                position: position.and_then(|p| u64::try_from(p).ok()),
                delay: delay
                    .filter(|d| d.is_finite() && *d >= 0.0)
                    .map(Duration::from_secs_f64),
            })
        })();
        match parsed {
            Ok(seen) => (Outcome::Observed(seen), Some(started.elapsed())),
            Err(err) => (
                Failure::soft(format!("unexpected probe answer: {err}")).outcome(),
                None,
            ),
        }
    }

    fn reconnect(&mut self) {
        super::set_aside(&mut self.conn, &mut self.spare);
    }

    async fn disconnected(&mut self) {
        match self.conn.as_mut() {
            Some((_, closed)) => {
                let _ = closed.await;
                self.conn = None;
            }
            None => std::future::pending().await,
        }
    }
}

/// A refused or reset connection is hard; a server that answers with an
/// error (starting up, shutting down, auth) is soft.
fn pg_failure(err: &tokio_postgres::Error) -> Failure {
    if let Some(io) =
        std::error::Error::source(err).and_then(|s| s.downcast_ref::<std::io::Error>())
    {
        return super::classify_io(io);
    }
    if err.is_closed() {
        return Failure::hard(err.to_string());
    }
    match err.as_db_error() {
        Some(db) => Failure::soft(format!("{}: {}", db.code().code(), db.message())),
        None => Failure::soft(err.to_string()),
    }
}
