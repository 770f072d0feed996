//! Reloads (SIGHUP and `POST /reload`): a changed certificate is served to
//! new handshakes at once while an open session keeps flowing; endpoints are
//! added, changed and removed, and members and probe settings applied, while
//! the sessions that still fit keep flowing; a configuration that cannot
//! apply is refused and the running one stays. Readiness per cluster and
//! endpoint, the ready delay, and a second SIGTERM that closes what the first
//! one was draining.

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

// ---- a reload that changes what is served --------------------------------------

const TOKEN: &str = "r3load";

/// A portal in front of the Redis servers on `members` (named a, b, ... in
/// order; a leads, the rest replicate it), with the admin token, once its
/// view shows that: its certificates, ports, configuration text (which a
/// test edits and reloads) and process.
struct Reloadable {
    certs: Certs,
    ports: Ports,
    yaml: String,
    portal: Portal,
    _dir: tempfile::TempDir,
}

async fn reloadable(members: &[u16], drain_timeout: &str) -> Reloadable {
    let certs = temp_certs();
    let dir = tempfile::TempDir::new().expect("temp dir");
    let config = PortalConfig::new(&certs, members).drain_timeout(drain_timeout);
    let yaml = with_token(&config.yaml(), dir.path(), TOKEN);
    let portal = Portal::start(&yaml).await;
    let replicas: Vec<&str> = NAMES[1..members.len()].to_vec();
    portal.wait_roles("a", &replicas).await;
    Reloadable {
        certs,
        ports: config.ports,
        yaml,
        portal,
        _dir: dir,
    }
}

/// `POST /reload` with the token: its status and answer.
async fn post_reload(portal: &Portal) -> (u16, String) {
    portal
        .post("/reload", Some(TOKEN))
        .await
        .expect("POST /reload")
}

/// A session that sends `INCR key` over and over on its own task, each
/// answer checked against the count, until stopped: a session whose bytes
/// keep flowing through a reload.
struct Flowing {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<(i64, Result<(), String>)>,
}

impl Flowing {
    fn start(mut session: Session, key: &'static str) -> Flowing {
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut n = 0;
            loop {
                if stopped.try_recv().is_ok() {
                    return (n, Ok(()));
                }
                match session.cmd(&["INCR", key]).await {
                    Ok(Reply::Integer(v)) if v == n + 1 => n = v,
                    other => return (n, Err(format!("INCR number {}: {other:?}", n + 1))),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        Flowing { stop, task }
    }

    /// Stops it: how many INCRs it made, or the first failure.
    async fn finish(self) -> Result<i64, String> {
        let _ = self.stop.send(());
        match self.task.await.expect("the flowing task") {
            (n, Ok(())) => Ok(n),
            (n, Err(err)) => Err(format!("after {n} INCRs: {err}")),
        }
    }
}

/// The names of the endpoints `/status` lists.
fn endpoint_names(status: &serde_json::Value) -> Vec<String> {
    cluster(status)["endpoints"]
        .as_array()
        .map(|e| {
            e.iter()
                .filter_map(|e| e["name"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// An endpoint block for the generated configuration.
fn endpoint_block(name: &str, port: u16, route: &str, certs: &Certs) -> String {
    format!(
        "      - name: {name}\n        listen: 127.0.0.1:{port}\n        route: {route}\n        \
         tls:\n          cert: {}\n          key: {}\n",
        certs.cert.display(),
        certs.key.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_adds_changes_and_removes_endpoints_while_a_session_flows() {
    let (a, b) = primary_and_replica();
    let Reloadable {
        certs,
        ports,
        yaml,
        portal,
        _dir,
    } = reloadable(&[a.port(), b.port()], "1s").await;
    let flowing = Flowing::start(session(ports.rw, &certs).await, "k");
    let mut on_any = session(ports.any, &certs).await;
    assert_eq!(
        on_any.cmd(&["PING"]).await.expect("PING on any"),
        Reply::Simple("PONG".into())
    );

    // `any` removed, `rw` changed, `extra` added.
    let extra = free_port();
    let (kept, _any) = yaml
        .split_once("      - name: any\n")
        .expect("the generated config ends with the any endpoint");
    let new_yaml = format!("{kept}{}", endpoint_block("extra", extra, "leader", &certs)).replacen(
        "hold_timeout: 3s",
        "hold_timeout: 4s",
        1,
    );
    std::fs::write(portal.config_file(), &new_yaml).expect("write the new config");
    // By SIGHUP here (the other tests use POST /reload, the same reload).
    portal.signal("HUP");
    portal
        .wait_metric("portal_reloads_total", &[("result", "ok")], |v| v >= 1.0)
        .await;
    let log = portal.stderr_log();
    let answer = log
        .lines()
        .find(|l| l.contains(" reloaded "))
        .unwrap_or_else(|| panic!("no reloaded line in:\n{log}"));
    for part in [
        "endpoints added: extra",
        "changed: rw",
        "removed: any",
        "clusters kept: 1",
    ] {
        assert!(answer.contains(part), "{part:?} not in {answer:?}");
    }

    // The new endpoint serves, on the leader.
    assert_eq!(reached(extra, &certs).await, Ok(a.port()));
    // The removed one accepts no connection, and its session is drained
    // (drain_timeout 1s), then closed.
    let deadline = Instant::now() + DEADLINE;
    while tokio::net::TcpStream::connect(("127.0.0.1", ports.any))
        .await
        .is_ok()
    {
        assert!(
            Instant::now() < deadline,
            "the removed endpoint still accepts"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        on_any.closed_within(DEADLINE).await,
        "the removed endpoint's session was not closed"
    );
    let status = portal.status().await;
    assert_eq!(endpoint_names(&status), ["rw", "ro", "extra"], "{status:#}");
    // The changed endpoint serves new sessions, and the session opened
    // before the reload flowed all along.
    assert_eq!(reached(ports.rw, &certs).await, Ok(a.port()));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let made = flowing
        .finish()
        .await
        .expect("the rw session through the reload");
    assert!(made > 10, "only {made} INCRs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_of_members_keeps_the_sessions_that_fit_and_they_follow_the_new_view() {
    let (a, b) = primary_and_replica();
    let c = RedisServer::start(Some(a.port()));
    c.wait_link_up();
    let Reloadable {
        certs,
        ports,
        yaml,
        portal,
        _dir,
    } = reloadable(&[a.port(), b.port()], "1s").await;
    let flowing = Flowing::start(session(ports.rw, &certs).await, "k");
    let mut on_b = session(ports.ro, &certs).await;
    assert_eq!(on_b.server_port().await.expect("INFO on ro"), b.port());
    // Open through both reloads below, each of which replaces the view.
    let mut oldest = session(ports.rw, &certs).await;
    assert_eq!(oldest.server_port().await.expect("INFO"), a.port());

    // b leaves, c joins, and the probe settings change: a new view.
    let new_yaml = yaml
        .replace(
            &format!("      - name: b\n        address: 127.0.0.1:{}\n", b.port()),
            &format!("      - name: c\n        address: 127.0.0.1:{}\n", c.port()),
        )
        .replace("interval: 200ms", "interval: 150ms");
    assert_ne!(new_yaml, yaml);
    std::fs::write(portal.config_file(), &new_yaml).expect("write the new config");
    let (code, answer) = post_reload(&portal).await;
    assert_eq!(code, 200, "{answer}");
    assert!(answer.contains("restarted or added: cache"), "{answer}");

    // The session on b, which left, is closed; the one on a flows on.
    assert!(
        on_b.closed_within(DEADLINE).await,
        "the session on the removed member stayed open"
    );
    portal.wait_roles("a", &["c"]).await;
    wait_reached(ports.ro, &certs, c.port()).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let made = flowing
        .finish()
        .await
        .expect("the rw session through the reload");
    assert!(made > 10, "only {made} INCRs");

    // A session from before the reload follows the new view: a failover
    // to c closes it.
    let mut before = session(ports.rw, &certs).await;
    assert_eq!(before.server_port().await.expect("INFO"), a.port());
    // A connection whose TLS handshake is done and whose first command
    // comes after the reload: routed on the view serving then.
    let pending = tls_connect(ports.rw, &certs.ca, "localhost")
        .await
        .expect("TLS connect");
    let mut old = {
        // Opened before a second reload that restarts the cluster again.
        let (code, answer) = {
            std::fs::write(
                portal.config_file(),
                new_yaml.replace("interval: 150ms", "interval: 200ms"),
            )
            .expect("write");
            post_reload(&portal).await
        };
        assert_eq!(code, 200, "{answer}");
        before
    };
    assert_eq!(
        old.cmd(&["PING"]).await.expect("PING after the reload"),
        Reply::Simple("PONG".into())
    );
    let mut pending = Resp::new(pending);
    assert_eq!(
        pending
            .cmd(&["PING"])
            .await
            .expect("the first command after the reload"),
        Reply::Simple("PONG".into())
    );
    assert_eq!(pending.server_port().await.expect("INFO"), a.port());
    // Sessions opened before the reloads still count on their member.
    let status = portal.status().await;
    assert_eq!(member(&status, "a")["sessions"], 3, "{status:#}");
    c.promote();
    a.follow(c.port());
    portal.wait_roles("c", &["a"]).await;
    for (what, session) in [
        ("opened before the last reload", &mut old),
        ("opened before both reloads", &mut oldest),
        ("first routed after the last reload", &mut pending),
    ] {
        assert!(
            session.closed_within(DEADLINE).await,
            "a session {what} stayed on the old leader after a failover"
        );
    }
    wait_reached(ports.rw, &certs, c.port()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_readiness_follows_the_replicas_lag() {
    let (a, b) = primary_and_replica();
    let certs = temp_certs();
    let config = PortalConfig::new(&certs, &[a.port(), b.port()]);
    let ports = config.ports;
    let yaml = config.yaml().replacen(
        "route: replicas\n",
        "route: replicas\n        max_lag: {bytes: 1000}\n        replica_fallback: refuse\n",
        1,
    );
    let portal = Portal::start(&yaml).await;
    portal.wait_roles("a", &["b"]).await;
    let ready = |path: &'static str| {
        let portal = &portal;
        async move { portal.get(path).await.expect("GET").0 }
    };
    assert_eq!(ready("/ready/endpoint/ro").await, 200);
    // b's link is cut (it cannot authenticate to a any more) while a takes
    // writes: b stays a replica, further and further behind.
    b.cmd(&["CONFIG", "SET", "masteruser", "nobody"]);
    b.cmd(&["CONFIG", "SET", "masterauth", "nope"]);
    a.cmd(&["CLIENT", "KILL", "TYPE", "replica"]);
    for i in 0..50 {
        a.cmd(&["SET", &format!("k{i}"), &"x".repeat(200)]);
    }
    // Once the endpoint refuses new sessions, its readiness says so too.
    let deadline = Instant::now() + DEADLINE;
    let refused = loop {
        match reached(ports.ro, &certs).await {
            Err(refused) => break refused,
            Ok(_) => assert!(Instant::now() < deadline, "b never lagged past max_lag"),
        }
    };
    assert!(refused.contains("no replica of cluster"), "{refused}");
    assert_eq!(
        ready("/ready/endpoint/ro").await,
        503,
        "ro refuses sessions but says it is ready: {:#}",
        portal.status().await
    );
    assert_eq!(ready("/ready/endpoint/rw").await, 200);
    assert_eq!(ready("/ready/cluster/cache").await, 200);
    // Healed: ready again.
    b.cmd(&["CONFIG", "SET", "masteruser", ""]);
    b.cmd(&["CONFIG", "SET", "masterauth", ""]);
    let deadline = Instant::now() + DEADLINE;
    while ready("/ready/endpoint/ro").await != 200 {
        assert!(
            Instant::now() < deadline,
            "/ready/endpoint/ro never came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(reached(ports.ro, &certs).await, Ok(b.port()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_cannot_apply_changes_nothing() {
    let redis = RedisServer::start(None);
    let Reloadable {
        certs,
        ports,
        yaml,
        portal,
        _dir,
    } = reloadable(&[redis.port()], "10s").await;

    // Without the token: refused.
    let (code, _) = portal.post("/reload", None).await.expect("POST");
    assert_eq!(code, 401);

    // An unknown key: the error names the file, the line and the key.
    let bad = yaml.replacen(
        "hold_timeout: 3s",
        "hold_timeout: 3s\n        bogus_key: 1",
        1,
    );
    std::fs::write(portal.config_file(), &bad).expect("write");
    let (code, answer) = post_reload(&portal).await;
    assert_eq!(code, 422, "{answer}");
    assert!(
        answer.contains("portal.yaml") && answer.contains("bogus_key"),
        "{answer}"
    );

    // A new endpoint on a busy address: refused as a whole, so the other
    // change in the same file (the `any` endpoint removed) is not applied.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let busy_port = busy.local_addr().expect("addr").port();
    let (kept, _any) = yaml.split_once("      - name: any\n").expect("any");
    let new_yaml = format!(
        "{kept}{}",
        endpoint_block("extra", busy_port, "leader", &certs)
    );
    std::fs::write(portal.config_file(), &new_yaml).expect("write");
    let (code, answer) = post_reload(&portal).await;
    assert_eq!(code, 422, "{answer}");
    assert!(answer.contains("cannot listen on"), "{answer}");
    let status = portal.status().await;
    assert_eq!(endpoint_names(&status), ["rw", "ro", "any"], "{status:#}");
    assert_eq!(reached(ports.any, &certs).await, Ok(redis.port()));
    portal
        .wait_metric("portal_reloads_total", &[("result", "failed")], |v| {
            v >= 2.0
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_threads_need_a_restart_and_the_rest_of_the_reload_applies() {
    let redis = RedisServer::start(None);
    let Reloadable {
        certs,
        ports,
        yaml,
        portal,
        _dir,
    } = reloadable(&[redis.port()], "10s").await;
    let flowing = Flowing::start(session(ports.rw, &certs).await, "k");

    // data_threads changed (the default is one per CPU), and `any` removed.
    let (kept, _any) = yaml.split_once("      - name: any\n").expect("any");
    std::fs::write(portal.config_file(), format!("data_threads: 7\n{kept}")).expect("write");
    let (code, answer) = post_reload(&portal).await;
    assert_eq!(code, 200, "{answer}");
    assert!(
        answer.contains("removed: any")
            && answer.contains("not applied (needs a restart): data_threads"),
        "{answer}"
    );
    // The removed endpoint's port was closed before the answer: every data
    // thread's copy of the socket is gone, so it can be bound at once; and
    // re-adding the endpoint straight after works, each time.
    for round in 0..10 {
        drop(
            std::net::TcpListener::bind(("127.0.0.1", ports.any)).unwrap_or_else(|err| {
                panic!("round {round}: the removed endpoint's port is still bound: {err}")
            }),
        );
        std::fs::write(portal.config_file(), &yaml).expect("write");
        let (code, answer) = post_reload(&portal).await;
        assert!(
            code == 200 && answer.contains("added: any"),
            "round {round}: {answer}"
        );
        std::fs::write(portal.config_file(), format!("data_threads: 7\n{kept}")).expect("write");
        let (code, answer) = post_reload(&portal).await;
        assert!(
            code == 200 && answer.contains("removed: any"),
            "round {round}: {answer}"
        );
    }
    // The endpoint handed from one instance to the next serves on every
    // data thread, and the session opened before flowed all along.
    for _ in 0..8 {
        assert_eq!(reached(ports.rw, &certs).await, Ok(redis.port()));
    }
    let made = flowing
        .finish()
        .await
        .expect("the rw session through the reload");
    assert!(made > 0, "no INCR");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_per_cluster_and_endpoint_and_the_ready_delay() {
    let redis = RedisServer::start(None);
    let certs = temp_certs();
    let config =
        PortalConfig::new(&certs, &[redis.port()]).endpoint_key("replica_fallback: refuse");
    let ports = config.ports;
    let yaml = config
        .yaml()
        .replacen("shutdown:\n", "shutdown:\n  ready_delay: 2s\n", 1);
    let mut portal = Portal::start(&yaml).await;
    portal.wait_roles("a", &[]).await;
    let code = |path: &'static str| {
        let portal = &portal;
        async move { portal.get(path).await.expect("GET").0 }
    };
    assert_eq!(code("/ready").await, 200);
    assert_eq!(code("/ready/cluster/cache").await, 200);
    assert_eq!(code("/ready/endpoint/rw").await, 200);
    assert_eq!(code("/ready/endpoint/any").await, 200);
    // No replica, and no fallback to the leader.
    let (status, body) = portal.get("/ready/endpoint/ro").await.expect("GET");
    assert_eq!(
        (status, body.trim()),
        (503, "no member for ro (route replicas)")
    );
    assert_eq!(code("/ready/endpoint/nope").await, 404);
    assert_eq!(code("/ready/cluster/nope").await, 404);

    // SIGTERM: /ready says 503 at once while new sessions are still served.
    portal.sigterm();
    let deadline = Instant::now() + DEADLINE;
    while code("/ready/endpoint/rw").await != 503 {
        assert!(Instant::now() < deadline, "/ready stayed 200 after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(code("/ready").await, 503);
    let mut during = session(ports.rw, &certs).await;
    assert_eq!(
        during
            .cmd(&["PING"])
            .await
            .expect("a new session during ready_delay"),
        Reply::Simple("PONG".into())
    );
    drop(during);
    let status = portal.wait_exit(DEADLINE).await;
    assert!(status.is_some_and(|s| s.success()), "exit: {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_view_from_a_reload_keeps_what_the_old_view_proved() {
    // b was promoted and a came back empty, claiming primary: the running
    // view fences a because it saw b's term lead. A fresh view that had not
    // seen it could not order the two claims; the reload's new view must
    // inherit it and keep b.
    let (mut a, b) = primary_and_replica();
    let Reloadable {
        certs,
        ports,
        yaml,
        portal,
        _dir,
    } = reloadable(&[a.port(), b.port()], "10s").await;
    a.kill9();
    b.promote();
    portal
        .wait_for("b to lead", |s| leader(s).as_deref() == Some("b"))
        .await;
    a.restart();
    portal
        .wait_for("the empty a to claim primary and be fenced", |s| {
            let m = member(s, "a");
            m["role"] == "primary" && m["health"] == "up" && m["fenced"] == "unrelated_history"
        })
        .await;

    std::fs::write(
        portal.config_file(),
        yaml.replace("interval: 200ms", "interval: 150ms"),
    )
    .expect("write");
    let (code, answer) = post_reload(&portal).await;
    assert_eq!(code, 200, "{answer}");
    assert!(answer.contains("restarted or added: cache"), "{answer}");
    let status = portal
        .wait_for("the new view to elect b and fence a", |s| {
            leader(s).as_deref() == Some("b") && member(s, "a")["fenced"] == "unrelated_history"
        })
        .await;
    assert_eq!(cluster(&status)["split_brain"], false, "{status:#}");
    assert_eq!(reached(ports.rw, &certs).await, Ok(b.port()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sighup_during_a_reload_is_applied_after_it() {
    let (a, b) = primary_and_replica();
    let Reloadable {
        certs,
        yaml,
        portal,
        _dir,
        ..
    } = reloadable(&[a.port(), b.port()], "10s").await;
    // b replaced by a member nobody listens for: the new view never has
    // the old one's replica, and the reload waits its whole settle time.
    // (Probes every second: the wait is over 4 s.)
    let gone = free_port();
    let first = yaml
        .replace(
            &format!("address: 127.0.0.1:{}\n", b.port()),
            &format!("address: 127.0.0.1:{gone}\n"),
        )
        .replace("interval: 200ms", "interval: 1s");
    std::fs::write(portal.config_file(), &first).expect("write");
    let slow = {
        let admin = portal.admin_address();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut tcp = tokio::net::TcpStream::connect(admin).await.expect("admin");
            tcp.write_all(
                format!("POST /reload HTTP/1.0\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 0\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .expect("POST");
            let mut answer = String::new();
            tcp.read_to_string(&mut answer).await.expect("answer");
            answer
        })
    };
    // While it waits: another change, and a SIGHUP.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let extra = free_port();
    let (kept, _any) = first.split_once("      - name: any\n").expect("any");
    std::fs::write(
        portal.config_file(),
        format!("{kept}{}", endpoint_block("extra", extra, "leader", &certs)),
    )
    .expect("write");
    portal.signal("HUP");
    let answer = slow.await.expect("the first reload");
    assert!(answer.contains("200 OK"), "{answer}");
    portal
        .wait_metric("portal_reloads_total", &[("result", "ok")], |v| v >= 2.0)
        .await;
    assert_eq!(reached(extra, &certs).await, Ok(a.port()));
    assert!(
        portal.stderr_log().contains("SIGHUP during a reload"),
        "{}",
        portal.stderr_log()
    );
}
