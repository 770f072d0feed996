//! PostgreSQL failover through the portal: when the primary dies and the
//! standby is promoted, sessions on the old primary end, new sessions reach
//! the promoted member, and the old primary, restarted on its older
//! timeline still believing it is the primary, gets no connection; back as
//! a standby on that timeline, it gets no read either. A session closed in
//! the middle of a large result ends at a message boundary: whole rows, then
//! the portal's `57P01`, never an `ErrorResponse` inside a half-relayed row.

use crate::common;

use std::time::{Duration, Instant};

use common::pg::*;
use common::*;
use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::watch;
use tokio_postgres::error::SqlState;

struct Setup {
    primary: PgServer,
    standby: PgServer,
    certs: Certs,
    ports: PgPorts,
    portal: Portal,
}

/// A primary `a`, its streaming standby `b`, and a portal that sees them so.
async fn setup() -> Setup {
    let (primary, standby) = primary_and_standby();
    let certs = temp_certs();
    let config = PgPortalConfig::new(&certs, &[primary.port(), standby.port()]);
    let portal = Portal::start(&config.yaml()).await;
    portal.wait_roles("a", &["b"]).await;
    Setup {
        primary,
        standby,
        certs,
        ports: config.ports,
        portal,
    }
}

/// Waits until a query on `client` fails (the session was closed).
async fn wait_session_closed(client: &tokio_postgres::Client, what: &str) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let answer =
            tokio::time::timeout(Duration::from_secs(5), client.simple_query("select 1")).await;
        if let Ok(Err(_)) = answer {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the session still answers {DEADLINE:?} later"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promoted_standby_takes_over_and_the_restarted_old_primary_is_fenced() {
    let mut s = setup().await;
    let old = pg_session(s.ports.rw, &s.certs).await;
    assert_eq!(server_port_of(&old).await.expect("port"), s.primary.port());
    let before = epoch(&s.portal.status().await);

    s.primary.stop_immediate();
    s.standby.promote();
    assert_eq!(s.standby.timeline(), 2);

    wait_session_closed(&old, "the session on the stopped primary").await;
    wait_pg_reached(s.ports.rw, &s.certs, s.standby.port()).await;
    let status = s.portal.status().await;
    assert_eq!(leader(&status).as_deref(), Some("b"), "{status:#}");
    assert!(epoch(&status) > before, "{status:#}");

    // Writes go to the promoted member.
    let rw = pg_session(s.ports.rw, &s.certs).await;
    rw.batch_execute(
        "create table after_failover (v text); insert into after_failover values ('b')",
    )
    .await
    .unwrap_or_else(|err| panic!("write after failover: {}", pg_error(&err)));
    assert_eq!(s.standby.psql("select v from after_failover"), "b");

    // The old primary comes back on timeline 1, still a primary.
    s.primary.start();
    assert!(!s.primary.is_in_recovery());
    assert_eq!(s.primary.timeline(), 1);
    s.portal
        .wait_for("the old primary probed as a primary and fenced", |st| {
            let a = member(st, "a");
            a["role"] == "primary" && a["health"] == "up" && a["fenced"] == "older_term"
        })
        .await;

    // The old primary is writable (it is a primary on timeline 1): a table
    // like the one written through the portal exists there too, so a
    // misrouted insert would land.
    s.primary.psql("create table after_failover (v text)");
    let until = Instant::now() + Duration::from_secs(2);
    let mut written = 0;
    while Instant::now() < until {
        // A write through the portal each round, on a fresh session.
        let rw = pg_session(s.ports.rw, &s.certs).await;
        let row = rw
            .query_one(
                "insert into after_failover values ('through the portal') returning inet_server_port()",
                &[],
            )
            .await
            .unwrap_or_else(|err| panic!("write through the portal: {}", pg_error(&err)));
        let port: i32 = row.get(0);
        assert_eq!(
            port,
            i32::from(s.standby.port()),
            "a write through the portal went somewhere other than the promoted member"
        );
        written += 1;
        let status = s.portal.status().await;
        assert_eq!(leader(&status).as_deref(), Some("b"), "{status:#}");
        assert_eq!(member(&status, "a")["fenced"], "older_term", "{status:#}");
        assert_eq!(cluster(&status)["split_brain"], false, "{status:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(written >= 3, "only {written} writes in 2 s");
    // Nothing written through the portal reached the old primary, though it
    // would have taken it.
    assert_eq!(
        s.primary
            .psql("select count(*) from after_failover where v = 'through the portal'"),
        "0"
    );
    assert_eq!(
        s.standby
            .psql("select count(*) from after_failover where v = 'through the portal'"),
        written.to_string()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_old_primary_back_as_a_standby_on_its_old_timeline_serves_no_reads() {
    let mut s = setup().await;
    s.primary.stop_immediate();
    s.standby.promote();
    assert_eq!(s.standby.timeline(), 2);
    wait_pg_reached(s.ports.rw, &s.certs, s.standby.port()).await;

    // a restarts in recovery, as a failover manager restarts a former
    // primary, but nothing has rewound it or pointed it at b: a replica on
    // timeline 1, whose WAL may hold writes b never had.
    s.primary.signal_standby();
    s.primary.start();
    assert!(s.primary.is_in_recovery());
    assert_eq!(s.primary.timeline(), 1);
    s.portal
        .wait_for(
            "a probed as a replica behind b's timeline and fenced",
            |st| {
                let a = member(st, "a");
                a["role"] == "replica"
                    && a["health"] == "up"
                    && a["term"]
                        .as_str()
                        .is_some_and(|t| t.starts_with("1 (system "))
                    && a["fenced"] == "behind_leader_term"
            },
        )
        .await;

    // No read reaches it: the replicas endpoint has no replica and falls
    // back to the leader.
    let until = Instant::now() + Duration::from_secs(2);
    let mut sessions = 0;
    while Instant::now() < until {
        assert_eq!(
            pg_reached(s.ports.ro, &s.certs).await,
            Ok(s.standby.port()),
            "a read session went somewhere other than the leader"
        );
        sessions += 1;
        let status = s.portal.status().await;
        assert_eq!(replica_names(&status), Vec::<String>::new(), "{status:#}");
        assert_eq!(leader(&status).as_deref(), Some("b"), "{status:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(sessions > 0);
    assert!(
        s.portal.stderr_log().contains("behind_leader_term"),
        "the fence is logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promotion_while_the_old_primary_runs_closes_its_sessions() {
    let s = setup().await;
    let old = pg_session(s.ports.rw, &s.certs).await;
    assert_eq!(server_port_of(&old).await.expect("port"), s.primary.port());

    // `b` moves to timeline 2 while `a` still runs as a primary on 1: the
    // newer timeline wins, and sessions on `a` are closed
    // (on_leader_change: close, the default).
    s.standby.promote();
    wait_pg_reached(s.ports.rw, &s.certs, s.standby.port()).await;
    wait_session_closed(&old, "the session on the demoted primary").await;

    let status = s.portal.status().await;
    assert_eq!(leader(&status).as_deref(), Some("b"), "{status:#}");
    assert_eq!(member(&status, "a")["fenced"], "older_term", "{status:#}");
    s.portal
        .wait_metric(
            "portal_sessions_closed_total",
            &[("endpoint", "rw"), ("reason", "leader_change")],
            |v| v >= 1.0,
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_leader_change_keep_leaves_postgres_sessions_open() {
    let (primary, standby) = primary_and_standby();
    let certs = temp_certs();
    let config =
        PgPortalConfig::new(&certs, &[primary.port(), standby.port()]).on_leader_change("keep");
    let portal = Portal::start(&config.yaml()).await;
    portal.wait_roles("a", &["b"]).await;
    let old = pg_session(config.ports.rw, &certs).await;
    assert_eq!(server_port_of(&old).await.expect("port"), primary.port());

    standby.promote();
    wait_pg_reached(config.ports.rw, &certs, standby.port()).await;
    let status = portal.status().await;
    assert_eq!(leader(&status).as_deref(), Some("b"), "{status:#}");

    // The session routed to `a` stays open and still talks to `a` (the
    // operator chose `keep`: the client decides when to reconnect).
    for _ in 0..3 {
        assert_eq!(
            server_port_of(&old)
                .await
                .expect("the kept session answers"),
            primary.port()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let text = portal.metrics().await;
    assert_eq!(
        metric(
            &text,
            "portal_sessions_closed_total",
            &[("endpoint", "rw"), ("reason", "leader_change")]
        )
        .unwrap_or(0.0),
        0.0,
        "{text}"
    );
}

/// Bytes of `repeat('x', ROW)`: one `DataRow` of `BIG_QUERY`.
const ROW: usize = 1_000_000;
/// More rows than can be read before the promotion closes the session.
const BIG_QUERY: &str = "select repeat('x', 1000000) from generate_series(1, 2000)";

/// How a large result that was cut off by a leader change ended, as the
/// client saw it.
#[derive(Debug)]
enum CutOff {
    /// Whole rows, then the portal's `57P01` ErrorResponse, then the close.
    Notice { rows: usize },
    /// Whole rows, then the close; `partial` bytes of one more message, all
    /// of them what that message should hold.
    Closed { rows: usize, partial: usize },
}

/// Reads into `buf` until it is full or the peer closes; how much it got.
/// A TLS session cut without close_notify counts as closed.
async fn read_upto<S: AsyncRead + Unpin>(stream: &mut S, buf: &mut [u8]) -> usize {
    let mut got = 0;
    while got < buf.len() {
        match stream.read(&mut buf[got..]).await {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    got
}

/// Reads `BIG_QUERY`'s result (after its `RowDescription`) slowly, as a
/// client that processes rows, checking every byte: each `DataRow` must be
/// exactly one column of `ROW` x's. Publishes the rows read so far on
/// `progress`. An error is the stream corrupted: something else where row
/// bytes should be, or a message other than a row or the closing `57P01`.
async fn read_big_result<S: AsyncRead + Unpin>(
    stream: &mut S,
    progress: &watch::Sender<usize>,
) -> Result<CutOff, String> {
    let (tag, _) = read_message(stream)
        .await
        .map_err(|err| format!("RowDescription: {err}"))?;
    if tag != b'T' {
        return Err(format!(
            "{:?} where the RowDescription should be",
            tag as char
        ));
    }
    let mut want_head = vec![b'D'];
    want_head.extend_from_slice(&((4 + 2 + 4 + ROW) as u32).to_be_bytes());
    let mut want_prefix = vec![0u8, 1];
    want_prefix.extend_from_slice(&(ROW as u32).to_be_bytes());
    let body_len = 2 + 4 + ROW;
    let mut chunk = vec![0u8; 64 * 1024];
    let mut rows = 0;
    loop {
        let mut head = [0u8; 5];
        let got = read_upto(stream, &mut head).await;
        if got == 0 {
            return Ok(CutOff::Closed { rows, partial: 0 });
        }
        match head[0] {
            b'D' => {}
            b'E' if got == 5 => {
                let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
                if !(4..=64 * 1024).contains(&len) {
                    return Err(format!("after {rows} rows: an ErrorResponse of length {len}"));
                }
                let mut body = vec![0u8; len - 4];
                if read_upto(stream, &mut body).await < body.len() {
                    return Err(format!("after {rows} rows: a truncated ErrorResponse"));
                }
                let fields = ErrorFields::parse(&body);
                if fields.code() != "57P01" {
                    return Err(format!("after {rows} rows: ErrorResponse {fields}"));
                }
                let (after, closed) = read_until_close(stream, Duration::from_secs(10)).await;
                if !after.is_empty() || !closed {
                    return Err(format!(
                        "after the 57P01: {} more bytes, closed: {closed}",
                        after.len()
                    ));
                }
                return Ok(CutOff::Notice { rows });
            }
            other => {
                return Err(format!(
                    "after {rows} rows: a message {:?} ({got} header bytes); the query should still be running",
                    other as char
                ))
            }
        }
        if head[..got] != want_head[..got] {
            return Err(format!(
                "row {rows}: header {:?}, not a DataRow of {ROW} bytes",
                &head[..got]
            ));
        }
        if got < 5 {
            return Ok(CutOff::Closed { rows, partial: got });
        }
        let mut at = 0;
        while at < body_len {
            let want = chunk.len().min(body_len - at);
            let n = read_upto(stream, &mut chunk[..want]).await;
            for (i, &b) in chunk[..n].iter().enumerate() {
                let offset = at + i;
                let expected = want_prefix.get(offset).copied().unwrap_or(b'x');
                if b != expected {
                    return Err(format!(
                        "row {rows}: byte {offset} of the DataRow body is {b:#04x}, not {expected:#04x}: \
                         the stream is corrupted (bytes there: {:?})",
                        String::from_utf8_lossy(&chunk[i..n.min(i + 40)])
                    ));
                }
            }
            at += n;
            if n < want {
                return Ok(CutOff::Closed {
                    rows,
                    partial: 5 + at,
                });
            }
            // A client busy with each chunk: the result takes long enough
            // to be cut off in its middle.
            tokio::time::sleep(Duration::from_millis(4)).await;
        }
        rows += 1;
        progress.send_replace(rows);
    }
}

/// How a tokio-postgres client's `BIG_QUERY` ended: `Ok` with what it saw
/// when that is a clean end (the `57P01`, or a closed connection), `Err`
/// for anything that shows a corrupted stream.
async fn stream_big_result(
    client: tokio_postgres::Client,
    progress: watch::Sender<usize>,
) -> Result<String, String> {
    let params: [&str; 0] = [];
    let rows = client
        .query_raw(BIG_QUERY, params)
        .await
        .map_err(|err| format!("query: {}", pg_error(&err)))?;
    let mut rows = std::pin::pin!(rows);
    let mut count = 0;
    while let Some(row) = rows.next().await {
        let err = match row {
            Ok(row) => {
                let value: &str = row.try_get(0).map_err(|err| pg_error(&err))?;
                if value.len() != ROW || value.bytes().any(|b| b != b'x') {
                    return Err(format!("row {count} holds something else than {ROW} x's"));
                }
                count += 1;
                progress.send_replace(count);
                tokio::time::sleep(Duration::from_millis(40)).await;
                continue;
            }
            Err(err) => err,
        };
        return match err.as_db_error() {
            Some(db) if db.code() == &SqlState::ADMIN_SHUTDOWN => {
                Ok(format!("57P01 after {count} rows: {}", db.message()))
            }
            Some(_) => Err(format!("after {count} rows: {}", pg_error(&err))),
            // A closed connection, or one that ended inside a message.
            None if err.is_closed()
                || err
                    .to_string()
                    .starts_with("error communicating with the server") =>
            {
                Ok(format!("closed after {count} rows: {}", pg_error(&err)))
            }
            // "unexpected message from server", "error parsing response
            // from server", ...: the stream was corrupted.
            None => Err(format!("after {count} rows: {}", pg_error(&err))),
        };
    }
    Err(format!(
        "the query finished ({count} rows) before the promotion"
    ))
}

/// Waits until `progress` reaches `rows`.
async fn wait_rows(progress: &mut watch::Receiver<usize>, rows: usize, what: &str) {
    tokio::time::timeout(DEADLINE, progress.wait_for(|n| *n >= rows))
        .await
        .unwrap_or_else(|_| panic!("{what}: fewer than {rows} rows within {DEADLINE:?}"))
        .unwrap_or_else(|_| panic!("{what}: the reader ended before {rows} rows"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_cut_off_in_a_large_result_ends_at_a_message_boundary() {
    let s = setup().await;
    let mut raw = raw_session(s.ports.rw, &s.certs).await;
    let port = raw
        .query_value("select inet_server_port()")
        .await
        .unwrap_or_else(|err| panic!("raw session: {err}"));
    assert_eq!(port, s.primary.port().to_string());
    let library = pg_session(s.ports.rw, &s.certs).await;
    assert_eq!(
        server_port_of(&library).await.expect("port"),
        s.primary.port()
    );

    // Both sessions in the middle of a result of 1 MB rows...
    raw.send_query(BIG_QUERY)
        .await
        .unwrap_or_else(|err| panic!("send the query: {err}"));
    let (raw_tx, mut raw_rows) = watch::channel(0);
    let raw_reader = tokio::spawn(async move {
        let mut stream = raw.stream;
        read_big_result(&mut stream, &raw_tx).await
    });
    let (library_tx, mut library_rows) = watch::channel(0);
    let library_reader = tokio::spawn(stream_big_result(library, library_tx));
    wait_rows(&mut raw_rows, 2, "raw session").await;
    wait_rows(&mut library_rows, 2, "tokio-postgres session").await;

    // ... when a promotion demotes their member.
    s.standby.promote();
    let raw_end = tokio::time::timeout(DEADLINE, raw_reader)
        .await
        .expect("the raw session was not closed")
        .expect("raw reader task");
    let library_end = tokio::time::timeout(DEADLINE, library_reader)
        .await
        .expect("the tokio-postgres session was not closed")
        .expect("tokio-postgres reader task");
    eprintln!("raw session: {raw_end:?}");
    eprintln!("tokio-postgres session: {library_end:?}");
    let raw_end = raw_end.unwrap_or_else(|err| panic!("raw session: {err}"));
    let library_end = library_end.unwrap_or_else(|err| panic!("tokio-postgres session: {err}"));
    match raw_end {
        CutOff::Notice { rows } => assert!(rows >= 2),
        CutOff::Closed { rows, partial } => {
            assert!(rows >= 2);
            assert!(partial < 5 + 2 + 4 + ROW, "a whole row counts as a row");
        }
    }
    assert!(!library_end.is_empty());
    s.portal
        .wait_metric(
            "portal_sessions_closed_total",
            &[("endpoint", "rw"), ("reason", "leader_change")],
            |v| v >= 2.0,
        )
        .await;
    let log = s.portal.stderr_log();
    assert!(
        log.contains("session closed at a message boundary with 57P01")
            || log.contains("session closed mid-message"),
        "the close is logged"
    );
}
