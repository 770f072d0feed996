//! Misbehaving clients are dropped without disturbing anyone else.

use crate::common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// `len` pseudo-random bytes (xorshift, seeded from the clock), never
/// starting with a TLS handshake record type.
fn garbage(len: usize) -> Vec<u8> {
    let mut x = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0x9e37_79b9_7f4a_7c15, |d| d.as_nanos() as u64)
        | 1;
    let mut out: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    if out[0] == 0x16 {
        out[0] = 0x17;
    }
    out
}

async fn connect(port: u16) -> TcpStream {
    TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("TCP connect to the endpoint")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_clients_do_not_disturb_a_good_session() {
    let redis = RedisServer::start(None);
    let certs = temp_certs();
    let config = PortalConfig::new(&certs, &[redis.port()]).handshake_timeout("1s");
    let ports = config.ports;
    let mut portal = Portal::start(&config.yaml()).await;
    portal.wait_roles("a", &[]).await;

    // The good session: PING in a loop until told to stop; any failure ends
    // the loop and is returned.
    let stop = Arc::new(AtomicBool::new(false));
    let mut good = session(ports.rw, &certs).await;
    let good_task = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut pings = 0u64;
            while !stop.load(Ordering::Relaxed) {
                match good.cmd(&["PING"]).await {
                    Ok(Reply::Simple(pong)) if pong == "PONG" => pings += 1,
                    other => return Err(format!("PING #{} failed: {other:?}", pings + 1)),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Ok(pings)
        }
    });

    // 4 KiB of garbage over plain TCP: closed.
    let garbage_client = tokio::spawn(async move {
        let mut tcp = connect(ports.rw).await;
        let _ = tcp.write_all(&garbage(4096)).await;
        closed_by_peer(&mut tcp, DEADLINE).await
    });

    // Connects and says nothing: closed after handshake_timeout.
    let silent_client = tokio::spawn(async move {
        let mut tcp = connect(ports.rw).await;
        closed_by_peer(&mut tcp, DEADLINE).await
    });

    // Half a ClientHello, then nothing: closed after handshake_timeout.
    let stalled_client = tokio::spawn(async move {
        let hello = client_hello(0x0303);
        let mut tcp = connect(ports.rw).await;
        tcp.write_all(&hello[..hello.len() / 2])
            .await
            .expect("send half a hello");
        closed_by_peer(&mut tcp, DEADLINE).await
    });

    // 50 clients connect and go away at once; every other one completes a
    // TLS handshake first.
    let crowd: Vec<_> = (0..50)
        .map(|i| {
            let ca = certs.ca.clone();
            tokio::spawn(async move {
                if i % 2 == 0 {
                    drop(connect(ports.rw).await);
                } else {
                    let tls = tls_connect(ports.rw, &ca, "localhost").await;
                    drop(tls.expect("TLS handshake in the crowd"));
                }
            })
        })
        .collect();
    for client in crowd {
        client.await.expect("crowd client");
    }

    assert!(
        garbage_client.await.expect("garbage client"),
        "the garbage client was not disconnected"
    );
    assert!(
        silent_client.await.expect("silent client"),
        "the silent client was not disconnected"
    );
    assert!(
        stalled_client.await.expect("stalled client"),
        "the client stalled mid-handshake was not disconnected"
    );

    stop.store(true, Ordering::Relaxed);
    let pings = good_task
        .await
        .expect("good session task")
        .unwrap_or_else(|err| panic!("the good session failed: {err}"));
    assert!(pings > 0, "the good session never ran");

    assert!(
        portal.is_running(),
        "the portal died:\n{}",
        portal.stderr_log()
    );
    let mut fresh = session(ports.rw, &certs).await;
    assert_eq!(
        fresh.cmd(&["PING"]).await.expect("PING on a fresh session"),
        Reply::Simple("PONG".into())
    );

    for reason in ["timeout", "not_tls"] {
        portal
            .wait_metric(
                "portal_tls_handshake_failures_total",
                &[("endpoint", "rw"), ("reason", reason)],
                |v| v > 0.0,
            )
            .await;
    }
    let metrics = portal.metrics().await;
    assert!(
        metric(
            &metrics,
            "portal_tls_handshake_failures_total",
            &[("endpoint", "rw"), ("reason", "timeout")]
        ) >= Some(2.0),
        "both the silent and the stalled client should count as timeouts:\n{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_redis_client_is_told_to_use_tls() {
    let redis = RedisServer::start(None);
    let certs = temp_certs();
    let config = PortalConfig::new(&certs, &[redis.port()]);
    let portal = Portal::start(&config.yaml()).await;
    portal.wait_roles("a", &[]).await;

    let tcp = connect(config.ports.rw).await;
    let mut plain = Resp::new(tcp);
    let reply = plain.cmd(&["PING"]).await.expect("a reply");
    assert!(
        reply.is_error() && reply.text().contains("TLS"),
        "a plaintext client should get an error mentioning TLS, got {reply:?}"
    );
    assert!(plain.closed_within(DEADLINE).await);
}
