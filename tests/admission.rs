//! Admission against strangers: connections that stay silent (before or
//! after their TLS handshake) hold only an opening place, bounded by
//! `handshake_timeout` and capped per endpoint and per client address;
//! they never take a session's place (`max_connections`) nor a connection
//! to a member. Sessions with no traffic end at `idle_timeout`. Strangers
//! connect from 127.0.0.2 and real clients from 127.0.0.1, so that the
//! per-address limits can tell them apart.

use crate::common;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rustls::pki_types::ServerName;
use tokio::io::AsyncWriteExt;
use tokio_rustls::TlsConnector;

const STRANGER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// A finished TLS handshake from `source`, nothing sent after it.
async fn tls_from(source: IpAddr, port: u16, certs: &Certs) -> std::io::Result<Tls> {
    let tcp = connect_from(source, port).await?;
    let name = ServerName::try_from("localhost").expect("server name");
    let connector = TlsConnector::from(default_client_config(&certs.ca));
    tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake"))?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_strangers_lock_out_no_real_client() {
    let redis = RedisServer::start(None);
    let certs = temp_certs();
    // 6 s: the 120 openings below must all still be open when /status is
    // read, also on a loaded machine (they are made one after the other).
    let config = PortalConfig::new(&certs, &[redis.port()])
        .handshake_timeout("6s")
        .max_connections(5);
    let ports = config.ports;
    let portal = Portal::start(&config.yaml()).await;
    portal.wait_roles("a", &[]).await;
    let before = info_number(redis.port(), "clients", "connected_clients");

    // 60 sockets that never start TLS and 60 TLS sessions that never send
    // a byte: ten times max_connections, more than the member would like.
    let mut silent_tcp = Vec::new();
    let mut silent_tls = Vec::new();
    for _ in 0..60 {
        silent_tcp.push(connect_from(STRANGER, ports.rw).await.expect("silent TCP"));
        silent_tls.push(
            tls_from(STRANGER, ports.rw, &certs)
                .await
                .expect("silent TLS"),
        );
    }

    // Five real clients (max_connections) are all served meanwhile.
    let mut real = Vec::new();
    for i in 0..5 {
        let mut s = session(ports.rw, &certs).await;
        assert_eq!(
            s.cmd(&["PING"]).await.expect("PING"),
            Reply::Simple("PONG".into()),
            "real client {i} while 120 strangers stay silent"
        );
        real.push(s);
    }
    // The silent sessions opened no connection to the member: only the
    // five real ones did.
    let during = info_number(redis.port(), "clients", "connected_clients");
    assert!(
        during <= before + 5 + 2,
        "connected_clients went from {before} to {during} with 5 real sessions and 60 silent TLS sessions"
    );
    let status = portal.status().await;
    let opening = status["clusters"][0]["endpoints"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["name"] == "rw"))
        .map(|e| (e["opening"].as_u64(), e["active"].as_i64()));
    assert_eq!(
        opening,
        Some((Some(120), Some(5))),
        "/status: 120 in their opening, 5 sessions"
    );

    // handshake_timeout ends every silent one.
    for tcp in &mut silent_tcp {
        assert!(
            closed_by_peer(tcp, DEADLINE).await,
            "a silent socket was never closed"
        );
    }
    for tls in &mut silent_tls {
        assert!(
            closed_by_peer(tls, DEADLINE).await,
            "a silent TLS session was never closed"
        );
    }
    for (i, s) in real.iter_mut().enumerate() {
        assert_eq!(
            s.cmd(&["PING"]).await.expect("PING"),
            Reply::Simple("PONG".into()),
            "real client {i} after the strangers were dropped"
        );
    }
    portal
        .wait_metric(
            "portal_tls_handshake_failures_total",
            &[("endpoint", "rw"), ("reason", "timeout")],
            |v| v >= 120.0,
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openings_past_the_per_source_cap_are_closed_at_once() {
    let redis = RedisServer::start(None);
    let certs = temp_certs();
    let config = PortalConfig::new(&certs, &[redis.port()])
        .handshake_timeout("60s")
        .endpoint_key("max_handshakes_per_source: 20");
    let ports = config.ports;
    let portal = Portal::start(&config.yaml()).await;
    portal.wait_roles("a", &[]).await;

    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(connect_from(STRANGER, ports.rw).await.expect("silent TCP"));
    }
    // Wait until the portal has counted the 20 (accept is asynchronous).
    let deadline = Instant::now() + DEADLINE;
    loop {
        let status = portal.status().await;
        let opening = status["clusters"][0]["endpoints"][0]["opening"].as_u64();
        if opening == Some(20) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "opening count {opening:?}, want 20"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The 21st from the same address is closed at once, long before the
    // 60 s handshake_timeout.
    let mut extra = connect_from(STRANGER, ports.rw).await.expect("connect");
    assert!(
        closed_by_peer(&mut extra, DEADLINE).await,
        "the 21st opening from one address was not closed"
    );
    portal
        .wait_metric(
            "portal_connections_refused_total",
            &[("endpoint", "rw"), ("reason", "max_handshakes_per_source")],
            |v| v >= 1.0,
        )
        .await;
    // Another address is served.
    let mut s = session(ports.rw, &certs).await;
    assert_eq!(
        s.cmd(&["PING"]).await.expect("PING"),
        Reply::Simple("PONG".into())
    );
    // The 20 still wait for their handshake: none was closed.
    for tcp in &mut held {
        assert!(!closed_by_peer(tcp, Duration::from_millis(10)).await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_per_source_are_capped_when_configured() {
    let redis = RedisServer::start(None);
    let certs = temp_certs();
    let config =
        PortalConfig::new(&certs, &[redis.port()]).endpoint_key("max_connections_per_source: 2");
    let ports = config.ports;
    let portal = Portal::start(&config.yaml()).await;
    portal.wait_roles("a", &[]).await;

    let mut theirs = Vec::new();
    for _ in 0..2 {
        let mut s = Resp::new(tls_from(STRANGER, ports.rw, &certs).await.expect("TLS"));
        assert_eq!(
            s.cmd(&["PING"]).await.expect("PING"),
            Reply::Simple("PONG".into())
        );
        theirs.push(s);
    }
    let mut third = Resp::new(tls_from(STRANGER, ports.rw, &certs).await.expect("TLS"));
    assert_eq!(
        third.cmd(&["PING"]).await.expect("a refusal"),
        Reply::Error("ERR max number of clients reached".into())
    );
    assert!(third.closed_within(DEADLINE).await);
    // Another address still gets in.
    let mut mine = session(ports.rw, &certs).await;
    assert_eq!(
        mine.cmd(&["PING"]).await.expect("PING"),
        Reply::Simple("PONG".into())
    );
    portal
        .wait_metric(
            "portal_connections_refused_total",
            &[("endpoint", "rw"), ("reason", "max_connections_per_source")],
            |v| v >= 1.0,
        )
        .await;
    // One of theirs goes: the address may open one more.
    drop(theirs.pop());
    let deadline = Instant::now() + DEADLINE;
    loop {
        let mut next = Resp::new(tls_from(STRANGER, ports.rw, &certs).await.expect("TLS"));
        if next.cmd(&["PING"]).await.ok() == Some(Reply::Simple("PONG".into())) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the address's place never came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sessions_end_at_idle_timeout_and_are_logged() {
    let redis = RedisServer::start(None);
    let certs = temp_certs();
    let config = PortalConfig::new(&certs, &[redis.port()])
        .endpoint_key("idle_timeout: 1s")
        .endpoint_key("access_log: true");
    let ports = config.ports;
    let portal = Portal::start(&config.yaml()).await;
    portal.wait_roles("a", &[]).await;

    // Busy for three idle timeouts: never closed.
    let mut busy = session(ports.rw, &certs).await;
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        assert_eq!(
            busy.cmd(&["PING"])
                .await
                .expect("a busy session stays open"),
            Reply::Simple("PONG".into())
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Then silent: closed.
    assert!(
        busy.closed_within(DEADLINE).await,
        "an idle session outlived idle_timeout"
    );
    portal
        .wait_metric(
            "portal_sessions_closed_total",
            &[("endpoint", "rw"), ("reason", "idle_timeout")],
            |v| v >= 1.0,
        )
        .await;
    // One access-log line for it, with what it moved.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let log = portal.stderr_log();
        if let Some(line) = log
            .lines()
            .find(|l| l.contains("portal::access") && l.contains("idle_timeout"))
        {
            assert!(
                line.contains("endpoint=\"rw\"") || line.contains("endpoint=rw"),
                "{line}"
            );
            assert!(
                line.contains("member=\"a\"") || line.contains("member=a"),
                "{line}"
            );
            assert!(!line.contains("from_client=0 "), "{line}");
            break;
        }
        assert!(Instant::now() < deadline, "no access-log line:\n{log}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_client_that_never_reads_is_dropped_within_the_deadline() {
    // No member at all: every session is refused after hold_timeout. The
    // client floods the refusal with commands and never reads its answer.
    let certs = temp_certs();
    let config = PortalConfig::new(&certs, &[free_port()]).hold_timeout("200ms");
    let ports = config.ports;
    let portal = Portal::start(&config.yaml()).await;
    let mut tls = tls_connect(ports.rw, &certs.ca, "localhost")
        .await
        .expect("TLS");
    let flood = vec![b'x'; 64 * 1024];
    let started = Instant::now();
    let ended = tokio::time::timeout(DEADLINE, async {
        loop {
            if tls.write_all(&flood).await.is_err() {
                return;
            }
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "the portal kept a refused client that never reads for {:?}",
        started.elapsed()
    );
    let status = portal.status().await;
    assert_eq!(status["clusters"][0]["endpoints"][0]["active"], 0);
}

/// An HTTP/2 frame.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    out.extend([kind, flags]);
    out.extend(stream.to_be_bytes());
    out.extend(payload);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_refusal_ends_against_a_client_that_pings_and_never_reads() {
    // An etcd cluster whose only member is not there: no leader, every
    // session is refused in gRPC after hold_timeout. The client opens
    // HTTP/2, then sends PINGs (each one asks for an answer) and a request,
    // and never reads: the portal's answers fill the socket.
    let certs = temp_certs();
    let (admin, port) = (free_port(), free_port());
    let yaml = format!(
        "admin:\n  listen: 127.0.0.1:{admin}\n\nclusters:\n  - name: kv\n    protocol: etcd\n    \
         probe:\n      interval: 200ms\n      timeout: 300ms\n      rise: 2\n      fall: 2\n    \
         members:\n      - name: e1\n        address: 127.0.0.1:{}\n    endpoints:\n      \
         - name: kv-leader\n        listen: 127.0.0.1:{port}\n        route: leader\n        \
         tls:\n          cert: {}\n          key: {}\n        hold_timeout: 200ms\n",
        free_port(),
        certs.cert.display(),
        certs.key.display(),
    );
    let portal = Portal::start(&yaml).await;
    let mut config = (*default_client_config(&certs.ca)).clone();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let mut tls = tls_connect_with(port, Arc::new(config), "localhost")
        .await
        .expect("TLS with ALPN h2");
    let mut opening = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    opening.extend(h2_frame(0x4, 0, 0, &[]));
    let pings: Vec<u8> = (0..4096u64)
        .flat_map(|i| h2_frame(0x6, 0, 0, &i.to_be_bytes()))
        .collect();
    opening.extend(&pings);
    // HEADERS on stream 1 (END_STREAM | END_HEADERS): `:method: GET`.
    opening.extend(h2_frame(0x1, 0x5, 1, &[0x82]));
    let started = Instant::now();
    let ended = tokio::time::timeout(DEADLINE, async {
        if tls.write_all(&opening).await.is_err() {
            return;
        }
        loop {
            if tls.write_all(&pings).await.is_err() {
                return;
            }
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "the portal kept a refused HTTP/2 client that never reads for {:?}",
        started.elapsed()
    );
    portal
        .wait_metric(
            "portal_connections_refused_total",
            &[("endpoint", "kv-leader"), ("reason", "no_leader")],
            |v| v >= 1.0,
        )
        .await;
    let status = portal.status().await;
    assert_eq!(status["clusters"][0]["endpoints"][0]["active"], 0);
}
