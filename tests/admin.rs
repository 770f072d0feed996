//! The admin listener as an operator exposes it: on every address, every
//! path but `/health` and the `/ready` paths needs the token; on loopback,
//! only what changes state does. And the certificate expiry warning.

use crate::common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_listener_off_loopback_needs_the_token_for_all_but_health_and_ready() {
    let redis = RedisServer::start(None);
    let certs = temp_certs();
    let dir = tempfile::TempDir::new().expect("temp dir");
    let config = PortalConfig::new(&certs, &[redis.port()]);
    let admin = config.ports.admin;
    let yaml = with_token(&config.yaml(), dir.path(), "adm1n").replacen(
        &format!("listen: 127.0.0.1:{admin}"),
        &format!("listen: 0.0.0.0:{admin}"),
        1,
    );
    let portal = Portal::start(&yaml).await;
    // (`/status`, which wait_roles reads, needs the token here.)
    let deadline = std::time::Instant::now() + DEADLINE;
    while portal.get("/ready").await.expect("GET").0 != 200 {
        assert!(std::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    for path in [
        "/health",
        "/ready",
        "/ready/cluster/cache",
        "/ready/endpoint/rw",
    ] {
        assert_eq!(portal.get(path).await.expect("GET").0, 200, "{path}");
    }
    for path in ["/status", "/metrics", "/", "/peer/terms"] {
        let (code, body) = portal.get(path).await.expect("GET");
        assert_eq!(code, 401, "{path} without the token: {body}");
    }
    for path in ["/status", "/metrics"] {
        let (code, body) = portal.get_with_token(path, "adm1n").await.expect("GET");
        assert_eq!(code, 200, "{path} with the token: {body}");
    }
    assert_eq!(portal.post("/reload", None).await.expect("POST").0, 401);
    assert_eq!(
        portal.post("/reload", Some("adm1n")).await.expect("POST").0,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_loopback_reads_are_open_and_changes_need_the_token() {
    let redis = RedisServer::start(None);
    let certs = temp_certs();
    let config = PortalConfig::new(&certs, &[redis.port()]);
    // No token at all: what changes state is off.
    let portal = Portal::start(&config.yaml()).await;
    portal.wait_roles("a", &[]).await;
    assert_eq!(portal.get("/status").await.expect("GET").0, 200);
    let (code, body) = portal.post("/reload", None).await.expect("POST");
    assert_eq!(code, 403, "{body}");
    let (code, _) = portal
        .post("/clusters/cache/forget-terms", None)
        .await
        .expect("POST");
    assert_eq!(code, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_close_to_its_end_is_warned_about() {
    let redis = RedisServer::start(None);
    let dir = tempfile::TempDir::new().expect("temp dir");
    let out = std::process::Command::new(PORTAL)
        .args(["certs", "init", "--dir"])
        .arg(dir.path())
        .args(["--host", "localhost", "--days", "10"])
        .output()
        .expect("portal certs init");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let certs = temp_certs();
    let config = PortalConfig::new(&certs, &[redis.port()]).tls_files(
        &dir.path().join("server.crt"),
        &dir.path().join("server.key"),
    );
    let portal = Portal::start(&config.yaml()).await;
    portal.wait_roles("a", &[]).await;
    let log = portal.stderr_log();
    assert!(
        log.contains("certificate expires within 30 days")
            && (log.contains("days_left=9") || log.contains("days_left=10")),
        "{log}"
    );
    let metrics = portal.metrics().await;
    let at = metric(
        &metrics,
        "portal_certificate_not_after_seconds",
        &[("endpoint", "rw")],
    )
    .expect("expiry metric");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as f64;
    let days = (at - now) / 86_400.0;
    assert!((9.0..=10.5).contains(&days), "{days} days left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_holding_admin_connections_does_not_lock_out_readiness_checks() {
    let redis = RedisServer::start(None);
    let certs = temp_certs();
    let config = PortalConfig::new(&certs, &[redis.port()]);
    let admin = config.ports.admin;
    let portal = Portal::start(&config.yaml()).await;
    portal.wait_roles("a", &[]).await;
    // More idle connections from 127.0.0.2 than the admin listener takes
    // in all.
    let stranger: std::net::IpAddr = [127, 0, 0, 2].into();
    let mut idle = Vec::new();
    for _ in 0..70 {
        if let Ok(tcp) = connect_from(stranger, admin).await {
            idle.push(tcp);
        }
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    for _ in 0..5 {
        let (code, body) = portal.get("/ready").await.expect("GET /ready");
        assert_eq!(code, 200, "{body}");
    }
    // Past its share, the stranger's connections are closed at once.
    let mut extra = connect_from(stranger, admin).await.expect("connect");
    assert!(
        closed_by_peer(&mut extra, std::time::Duration::from_secs(2)).await,
        "a connection past the per-source share stayed open"
    );
    drop(idle);
}
