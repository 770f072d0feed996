//! Malformed PostgreSQL openings (random bytes, a truncated SSLRequest, a
//! huge or tiny length, an unknown request code) are refused one by one and
//! counted, while a good session beside them keeps running queries.

use crate::common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::pg::*;
use common::*;
use rand::{Rng, SeedableRng};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// The refusals the portal counts for the endpoint `rw`: protocol errors
/// and TLS handshake failures (timeouts, EOF), all reasons.
async fn refusals(portal: &Portal) -> f64 {
    let text = portal.metrics().await;
    metric(&text, "portal_protocol_errors_total", &[("endpoint", "rw")]).unwrap_or(0.0)
        + metric(
            &text,
            "portal_tls_handshake_failures_total",
            &[("endpoint", "rw")],
        )
        .unwrap_or(0.0)
}

/// Waits until `refusals` exceeds `before`; panics naming `what`.
async fn wait_counted(portal: &Portal, before: f64, what: &str) -> f64 {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let now = refusals(portal).await;
        if now > before {
            return now;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not counted in portal_protocol_errors_total or \
             portal_tls_handshake_failures_total for rw (still {now}); /metrics:\n{}",
            portal.metrics().await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends `bytes` on a new connection to `port`, then (if `half_close`)
/// shuts down the sending side; returns what came back before the portal
/// closed the connection. Panics if it did not close within `DEADLINE`.
async fn send_and_wait_close(port: u16, bytes: &[u8], half_close: bool, what: &str) -> Vec<u8> {
    let mut tcp = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    tcp.write_all(bytes).await.expect("send");
    if half_close {
        tcp.shutdown().await.expect("shutdown the sending side");
    }
    let (answer, closed) = read_until_close(&mut tcp, DEADLINE).await;
    assert!(closed, "{what}: the portal kept the connection open");
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_openings_are_refused_and_counted_without_disturbing_a_session() {
    let primary = PgServer::primary();
    let certs = temp_certs();
    let config = PgPortalConfig::new(&certs, &[primary.port()]).handshake_timeout("2s");
    let ports = config.ports;
    let mut portal = Portal::start(&config.yaml()).await;
    portal.wait_roles("a", &[]).await;

    // The good session: a query in a loop until told to stop; any failure
    // ends the loop and is returned.
    let good = pg_session(ports.rw, &certs).await;
    let stop = Arc::new(AtomicBool::new(false));
    let good_task = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut queries = 0u64;
            while !stop.load(Ordering::Relaxed) {
                match good.query_one("select $1::int + 1", &[&41i32]).await {
                    Ok(row) if row.get::<_, i32>(0) == 42 => queries += 1,
                    Ok(_) => return Err(format!("query #{} gave a wrong answer", queries + 1)),
                    Err(err) => {
                        return Err(format!("query #{} failed: {}", queries + 1, pg_error(&err)))
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Ok(queries)
        }
    });

    let mut counted = refusals(&portal).await;

    // Openings the spec calls malformed get ErrorResponse 08P01, then close.
    let huge = [0x7f, 0xff, 0xff, 0xff, 0x00, 0x03, 0x00, 0x00];
    let tiny = [0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00];
    let unknown_code = opening(80_877_105, &[]); // 1234.5681: no such request
    for (what, bytes) in [
        ("length 0x7fffffff", &huge[..]),
        ("length 4", &tiny[..]),
        ("unknown code 1234.5681 with length 8", &unknown_code[..]),
    ] {
        let answer = send_and_wait_close(ports.rw, bytes, false, what).await;
        let fields = error_response_in(&answer)
            .unwrap_or_else(|| panic!("{what}: no ErrorResponse, got {answer:?}"));
        assert_eq!(fields.code(), "08P01", "{what}: {fields}");
        counted = wait_counted(&portal, counted, what).await;
        protocol_errors_have_reason(&portal).await;
    }

    // A truncated SSLRequest: the length, then nothing. Once with the
    // connection closed at once, once left hanging past handshake_timeout.
    send_and_wait_close(ports.rw, &[0, 0, 0, 8], true, "truncated SSLRequest, EOF").await;
    counted = wait_counted(&portal, counted, "truncated SSLRequest, EOF").await;
    send_and_wait_close(
        ports.rw,
        &[0, 0, 0, 8],
        false,
        "truncated SSLRequest, stall",
    )
    .await;
    counted = wait_counted(&portal, counted, "truncated SSLRequest, stall").await;

    // An SSLRequest answered 'S', followed by something that is not TLS.
    let mut not_tls = ssl_request();
    not_tls.extend_from_slice(b"GET / HTTP/1.1\r\nHost: portal\r\n\r\n");
    let answer = send_and_wait_close(ports.rw, &not_tls, false, "SSLRequest, then HTTP").await;
    assert_eq!(answer.first(), Some(&b'S'), "SSLRequest answer: {answer:?}");
    counted = wait_counted(&portal, counted, "SSLRequest, then HTTP").await;

    // Random bytes (reproducible: the seed is printed on failure), the
    // sending side closed after them. Never a ClientHello by accident.
    let seed: u64 = rand::random();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for round in 0..20 {
        let len = rng.random_range(1..300);
        let mut bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        if bytes[0] == 0x16 {
            bytes[0] = 0x17;
        }
        let what = format!("random bytes, seed {seed}, round {round}: {bytes:02x?}");
        send_and_wait_close(ports.rw, &bytes, true, &what).await;
        counted = wait_counted(&portal, counted, &what).await;
        assert!(portal.is_running(), "{what}: the portal exited");
    }

    stop.store(true, Ordering::Relaxed);
    let queries = good_task
        .await
        .expect("good session task")
        .unwrap_or_else(|err| panic!("the good session was disturbed: {err}"));
    assert!(queries > 0, "the good session ran no query");
    assert!(portal.is_running(), "the portal exited");

    // And the endpoint still serves new clients.
    assert_eq!(pg_reached(ports.rw, &certs).await, Ok(primary.port()));
}

/// The metric for malformed openings exists with an endpoint and a reason.
async fn protocol_errors_have_reason(portal: &Portal) {
    let text = portal.metrics().await;
    assert!(
        text.lines()
            .any(|l| l.starts_with("portal_protocol_errors_total{")
                && l.contains("endpoint=\"rw\"")
                && l.contains("reason=\"")),
        "no portal_protocol_errors_total{{endpoint=\"rw\",reason=...}} series:\n{text}"
    );
}
