//! Patroni probe: asks each member's Patroni agent `GET /patroni` on its REST
//! API (`api: host:port`, over HTTPS verified with `probe.api_tls` when the
//! API is HTTPS) and turns the JSON into an [`Observation`].
//!
//! Patroni, not PostgreSQL, is then the source of truth for a member's role:
//! a member is primary only when Patroni says `master`/`primary` *and* its
//! PostgreSQL is `running`, which is what Patroni's own `/primary` check
//! answers 200 for, minus the DCS leader-key check (that is the DCS source's
//! job). The term is the timeline, as with the native probe, so the view's
//! fencing works unchanged.
//!
//! The HTTP/1 connection is kept between probes when the server allows it.
//! Patroni 3.0's REST server (Python's `BaseHTTPRequestHandler`) answers
//! HTTP/1.0 and closes after every response, so against it each probe opens
//! a new connection; a refused connect is a hard failure either way.

use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper::{header, Request, StatusCode, Version};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::sync::oneshot;

use super::{Failure, ProbeContext, Prober};
use crate::backend::{self, Origination};
use crate::config::PatroniApi;
use crate::view::{MemberId, Observation, Outcome, Role, Term};

/// A `/patroni` answer is a few hundred bytes, a few KiB with many
/// replicas; anything bigger is not Patroni.
const MAX_BODY: usize = 256 * 1024;

pub struct PatroniProber {
    /// Patroni's REST address, and whether it is HTTPS.
    api: PatroniApi,
    /// TLS for an HTTPS API (`probe.api_tls`).
    tls: Option<Origination>,
    /// A connection the server agreed to keep open, and a signal that fires
    /// when it closes.
    conn: Option<(SendRequest<Empty<Bytes>>, oneshot::Receiver<()>)>,
}

impl PatroniProber {
    /// `tls` is used for an HTTPS `api` (the caller passes it exactly then).
    pub fn new(api: PatroniApi, tls: Option<Origination>) -> PatroniProber {
        PatroniProber {
            api,
            tls,
            conn: None,
        }
    }

    async fn connect(
        &self,
        timeout: Duration,
    ) -> Result<(SendRequest<Empty<Bytes>>, oneshot::Receiver<()>), Failure> {
        let tls = if self.api.https {
            Some(self.tls.as_ref().ok_or_else(|| {
                Failure::hard(format!(
                    "{} is HTTPS and probe.api_tls is not set",
                    self.api
                ))
            })?)
        } else {
            None
        };
        let stream = backend::connect_direct(&self.api.address, tls, timeout)
            .await
            .map_err(|err| super::classify_io(&err))?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|err| Failure::soft(format!("http handshake: {err}")))?;
        let (closed_tx, closed) = oneshot::channel();
        tokio::spawn(async move {
            let _ = connection.await;
            let _ = closed_tx.send(());
        });
        Ok((sender, closed))
    }

    /// One `GET /patroni`: the body, and whether the connection may be
    /// reused.
    async fn get(
        &self,
        sender: &mut SendRequest<Empty<Bytes>>,
        timeout: Duration,
    ) -> Result<(Bytes, bool), Failure> {
        let request = Request::get("/patroni")
            .header(header::HOST, self.api.address.as_str())
            .header(header::USER_AGENT, "portal-probe")
            .body(Empty::<Bytes>::new())
            .map_err(|err| Failure::soft(format!("building the request: {err}")))?;
        let exchange = async {
            sender
                .ready()
                .await
                .map_err(|err| http_failure("connection not ready", &err))?;
            let response = sender
                .send_request(request)
                .await
                .map_err(|err| http_failure("GET /patroni", &err))?;
            let status = response.status();
            let reusable = keeps_alive(response.version(), response.headers());
            let body = Limited::new(response.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|err| Failure::soft(format!("reading /patroni: {err}")))?
                .to_bytes();
            // Patroni answers /patroni with 200 whatever the member's state;
            // anything else is not Patroni speaking.
            if status != StatusCode::OK {
                return Err(Failure::soft(format!("GET /patroni answered {status}")));
            }
            Ok((body, reusable))
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| Failure::soft(format!("no answer within {timeout:?}")))?
    }
}

impl Prober for PatroniProber {
    async fn probe(&mut self, ctx: &ProbeContext) -> (Outcome, Option<Duration>) {
        let started = Instant::now();
        let timeout = ctx.settings.timeout;
        let (mut sender, closed) = match self.conn.take() {
            Some((sender, closed)) if !sender.is_closed() => (sender, closed),
            _ => match self.connect(timeout).await {
                Ok(conn) => conn,
                Err(failure) => return (failure.outcome(), None),
            },
        };
        let body = match self.get(&mut sender, timeout).await {
            Ok((body, reusable)) => {
                if reusable {
                    self.conn = Some((sender, closed));
                }
                body
            }
            Err(failure) => return (failure.outcome(), None),
        };
        let member_named = |name: &str, client: Option<&str>| {
            let id = ctx.roster.id_of(name)?;
            let entry = ctx.roster.get(id)?;
            same_host(&entry.address, client).then_some(id)
        };
        match observation(&body, SystemTime::now(), member_named) {
            Ok(seen) => (Outcome::Observed(seen), Some(started.elapsed())),
            Err(failure) => (failure.outcome(), None),
        }
    }

    fn reconnect(&mut self) {
        self.conn = None;
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

/// Whether an HTTP/1 response leaves the connection open.
fn keeps_alive(version: Version, headers: &hyper::HeaderMap) -> bool {
    let connection = |token: &str| {
        headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    match version {
        Version::HTTP_11 => !connection("close"),
        Version::HTTP_10 => connection("keep-alive"),
        _ => false,
    }
}

/// A transport error under hyper (refused, reset) is classified like any
/// socket error; a protocol error is soft.
fn http_failure(phase: &str, err: &hyper::Error) -> Failure {
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            let mut failure = super::classify_io(io);
            failure.error = format!("{phase}: {}", failure.error);
            return failure;
        }
        source = cause.source();
    }
    if err.is_closed() || err.is_incomplete_message() {
        return Failure::hard(format!("{phase}: {err}"));
    }
    Failure::soft(format!("{phase}: {err}"))
}

/// The parts of Patroni's `/patroni` answer the probe reads (Patroni 3.x;
/// `api.py`, `get_postgresql_status`). Unknown fields are ignored: Patroni
/// adds some in every release.
#[derive(Debug, Deserialize)]
struct Status {
    state: Option<String>,
    role: Option<String>,
    timeline: Option<u64>,
    xlog: Option<Xlog>,
    /// pg_control's system identifier, as a decimal string.
    database_system_identifier: Option<String>,
    /// A primary's `pg_stat_replication` rows.
    #[serde(default)]
    replication: Vec<Replication>,
}

/// One row of a primary's `replication` list.
#[derive(Debug, Deserialize)]
struct Replication {
    /// The standby's `application_name`: Patroni sets it to the member name.
    application_name: Option<String>,
    /// The standby's IP address as the primary sees it.
    client_addr: Option<String>,
    state: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Xlog {
    /// A primary's current WAL position.
    location: Option<u64>,
    /// A replica's last received and last replayed positions.
    received_location: Option<u64>,
    replayed_location: Option<u64>,
    /// Commit time of the last replayed transaction, PostgreSQL's text form
    /// (`2024-01-02 03:04:05.678901+00:00`); null before the first one.
    replayed_timestamp: Option<String>,
}

/// Maps one `/patroni` body to what the view needs; `now` dates a
/// replica's replay delay.
///
/// - role: `master`/`primary` with state `running` is [`Role::Primary`];
///   `replica` and `standby_leader` (the read-only leader of a standby
///   cluster) with state `running` are [`Role::Replica`]; other roles
///   (`demoted`, `uninitialized`) are [`Role::Unknown`].
/// - a state other than `running` (`starting`, `stopping`, `stopped`,
///   `crashed`, `restarting`, `unknown`) is a soft failure: the agent
///   answers, but its PostgreSQL takes no sessions, as Patroni's `/primary`
///   and `/replica` checks answer 503 then.
/// - term: the timeline, within the database system Patroni reports
///   (`database_system_identifier`); a replica's timeline is only a lower
///   bound (`term_floor`): Patroni caches it (see below).
/// - position: a primary's `xlog.location`; a replica's
///   `xlog.replayed_location` (what Patroni's `/replica?lag=` compares), else
///   `received_location`.
/// - delay: 0 when the replica replayed all it received; else how long ago
///   the last replayed transaction committed; unknown without that time.
/// - followers: a primary's `replication` rows in state `streaming`, by
///   member name and client address (`member_named`); names the portal
///   does not know, or whose address is not the member's, are skipped.
fn observation(
    body: &[u8],
    now: SystemTime,
    member_named: impl Fn(&str, Option<&str>) -> Option<MemberId>,
) -> Result<Observation, Failure> {
    let status: Status = serde_json::from_slice(body)
        .map_err(|err| Failure::soft(format!("/patroni is not Patroni's JSON: {err}")))?;
    let state = status.state.as_deref().unwrap_or("unknown");
    let role_text = status.role.as_deref().unwrap_or("unknown");
    if state != "running" {
        return Err(Failure::soft(format!(
            "patroni reports postgres {state} (role {role_text})"
        )));
    }
    let role = match role_text {
        "master" | "primary" => Role::Primary,
        // A replica that reports no timeline (Patroni has read none yet: a
        // member back after a failover, before pg_rewind) is not known to
        // follow the leader's history: no reads until it reports one.
        "replica" | "standby_leader" if status.timeline.is_some() => Role::Replica,
        _ => Role::Unknown,
    };
    let xlog = status.xlog.as_ref();
    let (position, delay) = match role {
        Role::Primary => (xlog.and_then(|x| x.location), Some(Duration::ZERO)),
        _ => match xlog {
            Some(x) => (
                x.replayed_location.or(x.received_location),
                replay_delay(x, now),
            ),
            None => (None, None),
        },
    };
    Ok(Observation {
        role,
        term: status.timeline.map(|timeline| {
            match status
                .database_system_identifier
                .as_deref()
                .and_then(|s| s.parse::<u64>().ok())
            {
                Some(system) => Term::Timeline { system, timeline },
                None => Term::Number(timeline),
            }
        }),
        upstream: None,
        position,
        delay: match role {
            Role::Primary => None,
            _ => delay,
        },
        // Patroni reports a replica's timeline from a cache it refreshes
        // only when it differs from the leader's (`replica_cached_timeline`):
        // a member promoted and not rewound (pg_rewind finds "no rewind
        // required" while its control file still shows the old timeline)
        // can go on showing the leader's timeline. Only a lower bound.
        term_floor: role == Role::Replica,
        followers: match role {
            Role::Primary => status
                .replication
                .iter()
                .filter(|r| r.state.as_deref() == Some("streaming"))
                .filter_map(|r| {
                    member_named(r.application_name.as_deref()?, r.client_addr.as_deref())
                })
                .collect(),
            _ => Vec::new(),
        },
    })
}

/// Whether a replication client at `client` can be the member at
/// `address` (`host:port`): when both are IP addresses they must be the
/// same; a host name (or no client address) cannot be checked here.
fn same_host(address: &str, client: Option<&str>) -> bool {
    let host = address
        .rsplit_once(':')
        .map_or(address, |(host, _)| host)
        .trim_start_matches('[')
        .trim_end_matches(']');
    match (
        host.parse::<std::net::IpAddr>(),
        client.map(|c| c.parse::<std::net::IpAddr>()),
    ) {
        (Ok(member), Some(Ok(client))) => member.to_canonical() == client.to_canonical(),
        _ => true,
    }
}

fn replay_delay(xlog: &Xlog, now: SystemTime) -> Option<Duration> {
    let replayed = xlog.replayed_location?;
    match xlog.received_location {
        // Caught up with what arrived (a restarted standby may report a
        // received position behind the replayed one until it streams).
        Some(received) if received <= replayed => Some(Duration::ZERO),
        None => Some(Duration::ZERO),
        Some(_) => {
            let at = parse_pg_timestamp(xlog.replayed_timestamp.as_deref()?)?;
            Some(now.duration_since(at).unwrap_or(Duration::ZERO))
        }
    }
}

/// Parses PostgreSQL's `timestamptz` text (`YYYY-MM-DD HH:MM:SS[.ffffff]`
/// followed by an offset `+HH`, `+HH:MM` or `-HH:MM`).
fn parse_pg_timestamp(text: &str) -> Option<SystemTime> {
    // The offset's sign comes after the time part, which starts at index 11.
    let split = text.get(11..)?.rfind(['+', '-'])? + 11;
    let (local, offset) = text.split_at(split);
    let sign: i64 = if offset.starts_with('-') { -1 } else { 1 };
    let digits = &offset[1..];
    let (hours, minutes) = match digits.split_once(':') {
        Some((h, m)) => (h.parse::<i64>().ok()?, m.parse::<i64>().ok()?),
        None => (digits.parse::<i64>().ok()?, 0),
    };
    let as_utc = humantime::parse_rfc3339_weak(local.trim()).ok()?;
    let shift = Duration::from_secs(u64::try_from(hours * 3600 + minutes * 60).ok()?);
    // Local time = UTC + offset, so UTC = local - offset.
    if sign > 0 {
        as_utc.checked_sub(shift)
    } else {
        as_utc.checked_add(shift)
    }
}

#[cfg(test)]
mod tests {
    //! The fixtures are verbatim `GET /patroni` answers captured from
    //! Debian's Patroni 3.0.2 managing PostgreSQL 15 (etcd 3.4 as DCS):
    //! a bootstrap primary, a streaming replica, a switchover, a hard kill of
    //! the primary and the old primary's return after `pg_rewind`.

    use super::*;

    fn fixture(name: &str) -> &'static [u8] {
        match name {
            "primary_tl1" => include_bytes!("patroni_fixtures/primary_tl1.json"),
            "primary_tl2" => include_bytes!("patroni_fixtures/primary_tl2.json"),
            "primary_promoted_tl3" => include_bytes!("patroni_fixtures/primary_promoted_tl3.json"),
            "replica_streaming_tl2" => {
                include_bytes!("patroni_fixtures/replica_streaming_tl2.json")
            }
            "replica_replay_behind" => {
                include_bytes!("patroni_fixtures/replica_replay_behind.json")
            }
            "replica_replayed_timestamp" => {
                include_bytes!("patroni_fixtures/replica_replayed_timestamp.json")
            }
            "replica_starting" => include_bytes!("patroni_fixtures/replica_starting.json"),
            "demoted_stopped" => include_bytes!("patroni_fixtures/demoted_stopped.json"),
            other => panic!("no fixture {other}"),
        }
    }

    /// The fixtures' replica is Patroni member `m1`, member 1 here.
    fn observe(body: &[u8], now: SystemTime) -> Result<Observation, Failure> {
        observation(body, now, |name, client| {
            (name == "m1" && same_host("127.0.0.1:5433", client)).then_some(1)
        })
    }

    fn at(text: &str) -> SystemTime {
        humantime::parse_rfc3339(text).expect("test timestamp")
    }

    fn seen(name: &str) -> Observation {
        observe(fixture(name), at("2026-11-23T09:45:00Z"))
            .unwrap_or_else(|f| panic!("{name}: {f:?}"))
    }

    /// The fixtures' `database_system_identifier`.
    const SYSTEM: u64 = 7711300288317185771;

    fn timeline(timeline: u64) -> Term {
        Term::Timeline {
            system: SYSTEM,
            timeline,
        }
    }

    #[test]
    fn a_running_replica_without_a_timeline_takes_no_reads() {
        // What Patroni can answer for a member back after a failover before
        // it has read a timeline: nothing shows whose history it holds.
        let body = br#"{"state": "running", "role": "replica", "xlog": {"received_location": 1, "replayed_location": 1}}"#;
        let seen = observe(body, SystemTime::UNIX_EPOCH).expect("an observation");
        assert_eq!((seen.role, seen.term), (Role::Unknown, None));
        let body = br#"{"state": "running", "role": "replica", "timeline": 2, "xlog": {"received_location": 1, "replayed_location": 1}}"#;
        let seen = observe(body, SystemTime::UNIX_EPOCH).expect("an observation");
        assert_eq!(
            (seen.role, seen.term),
            (Role::Replica, Some(Term::Number(2)))
        );
    }

    #[test]
    fn a_member_without_a_system_identifier_has_a_bare_timeline() {
        let body =
            br#"{"state": "running", "role": "master", "timeline": 4, "xlog": {"location": 1}}"#;
        let seen = observe(body, SystemTime::UNIX_EPOCH).expect("an observation");
        assert_eq!(seen.term, Some(Term::Number(4)));
    }

    #[test]
    fn a_running_master_is_primary_with_its_timeline_and_location() {
        assert_eq!(
            seen("primary_tl1"),
            Observation {
                role: Role::Primary,
                term: Some(timeline(1)),
                upstream: None,
                position: Some(50_331_744),
                delay: None,
                term_floor: false,
                // It lists `m2`, a member this portal does not know.
                followers: Vec::new(),
            }
        );
        let promoted = seen("primary_promoted_tl3");
        assert_eq!(promoted.role, Role::Primary);
        assert_eq!(promoted.term, Some(timeline(3)));
        assert_eq!(promoted.position, Some(56_858_184));
    }

    #[test]
    fn a_primary_names_the_members_streaming_from_it() {
        assert_eq!(seen("primary_tl2").followers, vec![1]);
        // Only `streaming` proves the standby is on the primary's history;
        // `startup` or `catchup` rows and rows without a name do not count.
        let mut body: serde_json::Value =
            serde_json::from_slice(fixture("primary_tl2")).expect("fixture json");
        for state in ["startup", "catchup", "backup", "stopping"] {
            body["replication"][0]["state"] = serde_json::json!(state);
            let bytes = serde_json::to_vec(&body).expect("json");
            let seen = observe(&bytes, SystemTime::UNIX_EPOCH).expect("observation");
            assert_eq!(seen.followers, Vec::<MemberId>::new(), "{state}");
        }
        body["replication"] = serde_json::json!([{"state": "streaming"}]);
        let bytes = serde_json::to_vec(&body).expect("json");
        let seen = observe(&bytes, SystemTime::UNIX_EPOCH).expect("observation");
        assert_eq!(seen.followers, Vec::<MemberId>::new());
        // The right name from another address is someone else.
        body["replication"] = serde_json::json!([
            {"application_name": "m1", "client_addr": "10.0.0.9", "state": "streaming"}
        ]);
        let bytes = serde_json::to_vec(&body).expect("json");
        let seen = observe(&bytes, SystemTime::UNIX_EPOCH).expect("observation");
        assert_eq!(seen.followers, Vec::<MemberId>::new());
        assert!(same_host("[::1]:5432", Some("::1")));
        assert!(same_host("127.0.0.1:5432", Some("::ffff:127.0.0.1")));
        assert!(
            same_host("db1.internal:5432", Some("10.0.0.9")),
            "names are not checked"
        );
        assert!(!same_host("10.0.0.8:5432", Some("10.0.0.9")));
        // A replica's list (a cascading standby's) says nothing about the
        // primary's history: a replica has no followers here.
        let mut body: serde_json::Value =
            serde_json::from_slice(fixture("replica_streaming_tl2")).expect("fixture json");
        body["replication"] = serde_json::json!([{"application_name": "m1", "state": "streaming"}]);
        let bytes = serde_json::to_vec(&body).expect("json");
        let seen = observe(&bytes, SystemTime::UNIX_EPOCH).expect("observation");
        assert_eq!(seen.followers, Vec::<MemberId>::new());
    }

    #[test]
    fn a_streaming_replica_reports_its_replayed_position() {
        assert_eq!(
            seen("replica_streaming_tl2"),
            Observation {
                role: Role::Replica,
                term: Some(timeline(2)),
                upstream: None,
                position: Some(50_431_792),
                delay: Some(Duration::ZERO),
                term_floor: true,
                followers: Vec::new(),
            }
        );
    }

    #[test]
    fn patroni_positions_drive_the_views_lag_and_max_lag() {
        use crate::config::MaxLag;
        use crate::view::{Report, Thresholds, View};
        // Captured right after a 100 000-row insert on the primary of
        // timeline 2: the replica had received 56858136 and replayed only
        // 51922496. The primary's answer of the same moment was not kept, so
        // its location is set to what the replica had received.
        let mut primary = seen("primary_tl2");
        primary.position = Some(56_858_136);
        let replica = seen("replica_replay_behind");
        assert_eq!(replica.role, Role::Replica);
        assert_eq!(replica.position, Some(51_922_496));
        // Behind, with no replayed transaction time: the delay is unknown,
        // so a `max_lag.duration` limit excludes it.
        assert_eq!(replica.delay, None);

        let mut view = View::new(2, Thresholds { rise: 1, fall: 1 });
        for (member, seen) in [(0, primary), (1, replica)] {
            view.apply(Report {
                member,
                generation: 0,
                at: SystemTime::UNIX_EPOCH,
                outcome: Outcome::Observed(seen),
            });
        }
        let snapshot = view.snapshot();
        assert_eq!(snapshot.leader, Some(0));
        assert_eq!(snapshot.replicas, vec![1]);
        let member = snapshot.members.get(1);
        assert_eq!(member.and_then(|m| m.lag_bytes), Some(4_935_640));
        let limit = |bytes| MaxLag {
            bytes: Some(bytes),
            duration: None,
        };
        assert!(!crate::router::within_lag(member, limit(1_000_000)));
        assert!(crate::router::within_lag(member, limit(5_000_000)));
        let duration = MaxLag {
            bytes: None,
            duration: Some(Duration::from_secs(3600)),
        };
        assert!(!crate::router::within_lag(member, duration));
    }

    #[test]
    fn delay_counts_from_the_last_replayed_commit_when_behind() {
        let mut body: serde_json::Value =
            serde_json::from_slice(fixture("replica_replayed_timestamp")).expect("fixture json");
        // Caught up (received == replayed): no delay, whatever the clock.
        let caught_up = observe(
            fixture("replica_replayed_timestamp"),
            at("2030-01-01T00:00:00Z"),
        )
        .expect("observation");
        assert_eq!(caught_up.delay, Some(Duration::ZERO));
        assert_eq!(caught_up.term, Some(timeline(1)));
        // The same answer with more received than replayed: the delay is
        // now minus `replayed_timestamp` (09:44:15.047248 UTC).
        body["xlog"]["received_location"] = serde_json::json!(50_500_000u64);
        let bytes = serde_json::to_vec(&body).expect("json");
        let behind = observe(&bytes, at("2026-11-23T09:44:25.047248Z")).expect("observation");
        assert_eq!(behind.delay, Some(Duration::from_secs(10)));
    }

    #[test]
    fn a_restarted_replica_with_a_stale_received_position_is_caught_up() {
        // After pg_rewind the received position (50331648) trails the
        // replayed one (56858648) until the WAL receiver streams again; but
        // its state is `starting`, so it is not usable yet.
        let failure = observe(fixture("replica_starting"), at("2026-11-23T09:45:00Z"))
            .expect_err("starting is not running");
        assert!(!failure.hard);
        assert!(failure.error.contains("starting"), "{}", failure.error);
        let mut body: serde_json::Value =
            serde_json::from_slice(fixture("replica_starting")).expect("fixture json");
        body["state"] = serde_json::json!("running");
        let running = observe(
            &serde_json::to_vec(&body).expect("json"),
            at("2026-11-23T09:45:00Z"),
        )
        .expect("observation");
        assert_eq!(running.position, Some(56_858_648));
        assert_eq!(running.delay, Some(Duration::ZERO));
    }

    #[test]
    fn a_demoted_member_is_a_soft_failure() {
        let failure =
            observe(fixture("demoted_stopped"), at("2026-11-23T09:45:00Z")).expect_err("stopped");
        assert!(!failure.hard);
        assert!(failure.error.contains("stopped"), "{}", failure.error);
        assert!(failure.error.contains("demoted"), "{}", failure.error);
    }

    #[test]
    fn a_master_that_is_not_running_never_claims_primary() {
        for state in ["starting", "stopping", "restarting", "crashed", "unknown"] {
            let mut body: serde_json::Value =
                serde_json::from_slice(fixture("primary_tl2")).expect("fixture json");
            body["state"] = serde_json::json!(state);
            let bytes = serde_json::to_vec(&body).expect("json");
            assert!(observe(&bytes, SystemTime::UNIX_EPOCH).is_err(), "{state}");
        }
        let mut body: serde_json::Value =
            serde_json::from_slice(fixture("primary_tl2")).expect("fixture json");
        body["role"] = serde_json::json!("primary"); // Patroni 3.1 onwards
        let bytes = serde_json::to_vec(&body).expect("json");
        assert_eq!(
            observe(&bytes, SystemTime::UNIX_EPOCH)
                .expect("observation")
                .role,
            Role::Primary
        );
        body["role"] = serde_json::json!("standby_leader");
        let bytes = serde_json::to_vec(&body).expect("json");
        assert_eq!(
            observe(&bytes, SystemTime::UNIX_EPOCH)
                .expect("observation")
                .role,
            Role::Replica
        );
    }

    #[test]
    fn garbage_is_a_soft_failure() {
        for body in [&b""[..], b"<html>", b"[]", b"{\"state\": 3}"] {
            let failure = observe(body, SystemTime::UNIX_EPOCH).expect_err("not patroni");
            assert!(!failure.hard);
        }
        // A JSON object without state is not running.
        assert!(observe(b"{}", SystemTime::UNIX_EPOCH).is_err());
    }

    #[test]
    fn postgres_timestamps_with_offsets() {
        let utc = at("2026-11-23T09:44:15.047248Z");
        assert_eq!(
            parse_pg_timestamp("2026-11-23 09:44:15.047248+00:00"),
            Some(utc)
        );
        assert_eq!(
            parse_pg_timestamp("2026-11-23 11:44:15.047248+02"),
            Some(utc)
        );
        assert_eq!(
            parse_pg_timestamp("2026-11-23 05:14:15.047248-04:30"),
            Some(utc)
        );
        assert_eq!(
            parse_pg_timestamp("2026-11-23 09:44:15+00"),
            Some(at("2026-11-23T09:44:15Z"))
        );
        assert_eq!(parse_pg_timestamp("yesterday"), None);
        assert_eq!(parse_pg_timestamp(""), None);
        assert_eq!(parse_pg_timestamp("2026-11-23 09:44:15.047248+xx"), None);
    }

    #[test]
    fn keep_alive_follows_the_http_version_and_connection_header() {
        let mut headers = hyper::HeaderMap::new();
        assert!(keeps_alive(Version::HTTP_11, &headers));
        assert!(!keeps_alive(Version::HTTP_10, &headers)); // Patroni 3.0
        headers.insert(header::CONNECTION, "Keep-Alive".parse().expect("value"));
        assert!(keeps_alive(Version::HTTP_10, &headers));
        headers.insert(header::CONNECTION, "close".parse().expect("value"));
        assert!(!keeps_alive(Version::HTTP_11, &headers));
    }
}
