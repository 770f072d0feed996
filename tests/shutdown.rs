//! Graceful shutdown: SIGTERM stops new connections, lets open sessions
//! run for `drain_timeout`, then exits 0.

use crate::common;

use std::time::{Duration, Instant};

use common::*;

/// Polls until a TCP connect to `port` is refused; panics after `DEADLINE`.
async fn wait_connect_refused(port: u16) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            Err(_) => return,
            Ok(accepted) => drop(accepted),
        }
        assert!(
            Instant::now() < deadline,
            "the endpoint on {port} still accepts connections after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_open_sessions_and_refuses_new_ones() {
    let redis = RedisServer::start(None);
    let certs = temp_certs();
    let config = PortalConfig::new(&certs, &[redis.port()]).drain_timeout("3s");
    let mut portal = Portal::start(&config.yaml()).await;
    portal.wait_roles("a", &[]).await;

    let mut open = session(config.ports.rw, &certs).await;
    assert_eq!(
        open.cmd(&["PING"]).await.expect("PING before SIGTERM"),
        Reply::Simple("PONG".into())
    );

    portal.sigterm();
    let signalled = Instant::now();
    // Inside the drain (right after the signal, well before its 3 s end):
    // the open session keeps working.
    assert_eq!(
        open.cmd(&["PING"]).await.expect("PING right after SIGTERM"),
        Reply::Simple("PONG".into())
    );
    assert_eq!(
        open.cmd(&["SET", "drain:key", "v"])
            .await
            .expect("SET during the drain"),
        Reply::Simple("OK".into())
    );
    assert!(
        signalled.elapsed() < Duration::from_secs(3),
        "the drain-window commands came after drain_timeout: the check means nothing"
    );
    assert_eq!(redis.query(&["GET", "drain:key"]).expect("GET").text(), "v");
    wait_connect_refused(config.ports.rw).await;

    // After the drain the session is closed and the process exits 0.
    assert!(
        open.closed_within(DEADLINE).await,
        "the session outlived the drain"
    );
    let status = portal
        .wait_exit(DEADLINE)
        .await
        .unwrap_or_else(|| panic!("the portal did not exit:\n{}", portal.stderr_log()));
    assert!(
        status.success(),
        "exit status {status}:\n{}",
        portal.stderr_log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_without_sessions_exits_zero() {
    let redis = RedisServer::start(None);
    let certs = temp_certs();
    let config = PortalConfig::new(&certs, &[redis.port()]).drain_timeout("2s");
    let mut portal = Portal::start(&config.yaml()).await;
    portal.wait_roles("a", &[]).await;

    portal.sigterm();
    let status = portal
        .wait_exit(DEADLINE)
        .await
        .unwrap_or_else(|| panic!("the portal did not exit:\n{}", portal.stderr_log()));
    assert!(
        status.success(),
        "exit status {status}:\n{}",
        portal.stderr_log()
    );
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", config.ports.rw))
            .await
            .is_err(),
        "nothing listens after exit"
    );
}
