//! SIGHUP reloads: a changed certificate is served to new handshakes at
//! once while an open session keeps flowing; a configuration that fails
//! validation is refused and the running one stays; a second SIGTERM
//! closes what the first one was draining.

use crate::common;

use std::time::{Duration, Instant};

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_serves_a_new_certificate_and_keeps_open_sessions() {
    let redis = RedisServer::start(None);
    let old = temp_certs();
    let config = PortalConfig::new(&old, &[redis.port()]);
    let ports = config.ports;
    let mut portal = Portal::start(&config.yaml()).await;
    portal.wait_roles("a", &[]).await;
    let mut open = session(ports.rw, &old).await;
    assert_eq!(
        open.cmd(&["SET", "k", "1"]).await.expect("SET"),
        Reply::Simple("OK".into())
    );
    let metrics = portal.metrics().await;
    let expiry = metric(
        &metrics,
        "portal_certificate_not_after_seconds",
        &[("endpoint", "rw")],
    )
    .expect("certificate expiry metric");
    assert!(expiry > 1.7e9, "notAfter {expiry}");

    // A new CA and certificate in the same files the config names.
    let new = temp_certs();
    std::fs::copy(&new.cert, &old.cert).expect("replace the certificate");
    std::fs::copy(&new.key, &old.key).expect("replace the key");
    portal.signal("HUP");
    portal
        .wait_metric("portal_reloads_total", &[("result", "ok")], |v| v >= 1.0)
        .await;
    // New handshakes: the new CA verifies, the old one no longer does.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let with_new = tls_connect(ports.rw, &new.ca, "localhost").await;
        let with_old = tls_connect(ports.rw, &old.ca, "localhost").await;
        if with_new.is_ok() && with_old.is_err() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after SIGHUP: new CA {:?}, old CA {:?}",
            with_new.err(),
            with_old.is_ok()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The session opened before the reload still flows.
    for i in 0..20 {
        assert_eq!(
            open.cmd(&["INCR", "k"])
                .await
                .expect("INCR on the session opened before"),
            Reply::Integer(2 + i)
        );
    }

    // A broken configuration: refused, the running one stays.
    std::fs::write(portal.config_file(), "clusters: [\n").expect("write a broken config");
    portal.signal("HUP");
    portal
        .wait_metric("portal_reloads_total", &[("result", "failed")], |v| {
            v >= 1.0
        })
        .await;
    assert!(
        portal
            .stderr_log()
            .contains("reload refused; the running configuration stays"),
        "{}",
        portal.stderr_log()
    );
    let mut fresh = session(ports.rw, &new).await;
    assert_eq!(
        fresh.cmd(&["GET", "k"]).await.expect("GET"),
        Reply::Bulk(Some(b"21".to_vec()))
    );
    assert_eq!(
        open.cmd(&["PING"]).await.expect("PING"),
        Reply::Simple("PONG".into())
    );
    assert!(portal.is_running(), "the portal exited on SIGHUP");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_closes_the_draining_sessions_at_once() {
    let redis = RedisServer::start(None);
    let certs = temp_certs();
    let config = PortalConfig::new(&certs, &[redis.port()]).drain_timeout("60s");
    let ports = config.ports;
    let mut portal = Portal::start(&config.yaml()).await;
    portal.wait_roles("a", &[]).await;
    let mut open = session(ports.rw, &certs).await;
    assert_eq!(
        open.cmd(&["PING"]).await.expect("PING"),
        Reply::Simple("PONG".into())
    );
    portal.sigterm();
    // Draining: the session is still served.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        open.cmd(&["PING"]).await.expect("PING while draining"),
        Reply::Simple("PONG".into())
    );
    assert!(
        portal.try_exit().is_none(),
        "exited before the drain timeout"
    );
    portal.sigterm();
    assert!(
        open.closed_within(DEADLINE).await,
        "the second SIGTERM did not close the session"
    );
    let status = portal.wait_exit(DEADLINE).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "exit after the second SIGTERM: {status:?}"
    );
}
