//! TLS from the portal to PostgreSQL members that require it (`backend_tls`).
//!
//! The member runs with `ssl = on`, a server certificate from its own CA
//! (made by `portal certs init`, valid only for the name
//! `pg-member.internal`, never for the address the portal dials), and a
//! `pg_hba.conf` that accepts loopback TCP only over TLS (`hostssl`) and
//! rejects it without (`hostnossl ... reject`). A portal whose cluster has
//! `backend_tls: {ca: MEMBER_CA, server_name: pg-member.internal}` probes the
//! member, elects it, and carries client sessions (and cancel requests) to it
//! over TLS. A portal with the wrong CA, or without the `server_name` the
//! certificate needs, cannot reach the member: its clients get a readable
//! `57P03` after `hold_timeout`, and the portal keeps running. A member
//! that stops answering new connections (the probe's, older, still works)
//! holds a client no longer than `hold_timeout`: the connect is part of the
//! hold.

use crate::common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::pg::*;
use common::*;
use tokio_postgres::error::SqlState;

/// The only name on the member's certificate.
const MEMBER_NAME: &str = "pg-member.internal";

/// The member's CA and its server certificate and key.
struct MemberCerts {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

/// A CA and a server certificate for `MEMBER_NAME` only, separate from the
/// CA the portal's own endpoints use.
fn member_certs(dir: &Path) -> MemberCerts {
    let out = std::process::Command::new(PORTAL)
        .args(["certs", "init", "--dir"])
        .arg(dir)
        .args(["--host", MEMBER_NAME])
        .output()
        .expect("run portal certs init");
    assert!(
        out.status.success(),
        "portal certs init for the member failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    MemberCerts {
        ca: dir.join("ca.crt"),
        cert: dir.join("server.crt"),
        key: dir.join("server.key"),
    }
}

/// A primary that requires TLS with a certificate from its own CA, and that
/// CA's files (in a directory that lives as long as the returned guard).
struct TlsMember {
    server: PgServer,
    certs: MemberCerts,
    _dir: tempfile::TempDir,
}

fn tls_member() -> TlsMember {
    let dir = tempfile::TempDir::new().expect("temp dir for the member's certificates");
    let certs = member_certs(dir.path());
    let mut server = PgServer::primary();
    server.require_tls(&certs.cert, &certs.key);
    TlsMember {
        server,
        certs,
        _dir: dir,
    }
}

/// psql straight to the member (no portal) with `sslmode`; its output.
async fn psql_direct(member: &PgServer, sslmode: &str, sql: &str) -> PsqlOutput {
    let conninfo = format!(
        "host=127.0.0.1 port={} sslmode={sslmode} user=postgres dbname=postgres",
        member.port()
    );
    psql(&conninfo, sql).await
}

/// The member really requires TLS: without it, it refuses; with it, it
/// answers. Guards the tests below against passing on a plaintext leg.
async fn assert_member_requires_tls(member: &PgServer) {
    let plain = psql_direct(member, "disable", "select 1").await;
    assert!(
        !plain.success(),
        "the member let a plaintext client in: {plain:?}"
    );
    assert!(
        plain.stderr.contains("no encryption"),
        "the member refused plaintext, but not through pg_hba (hostnossl reject): {plain:?}"
    );
    let tls = psql_direct(
        member,
        "require",
        "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
    )
    .await;
    assert!(
        tls.success(),
        "psql with TLS straight to the member: {tls:?}"
    );
    assert_eq!(tls.stdout, "t");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_reach_a_tls_only_member_over_tls() {
    let member = tls_member();
    assert_member_requires_tls(&member.server).await;

    let certs = temp_certs();
    let config = PgPortalConfig::new(&certs, &[member.server.port()]).backend_tls(&format!(
        "{{ca: {}, server_name: {MEMBER_NAME}}}",
        member.certs.ca.display()
    ));
    let portal = Portal::start(&config.yaml()).await;
    // The probe can only log in over TLS, so a leader means the probe's TLS works.
    portal.wait_roles("a", &[]).await;

    // psql through the portal: TLS to the portal (verify-full against the
    // portal's CA), and the portal's own TLS to the member.
    let conninfo = portal_conninfo(config.ports.rw, &certs.ca);
    let out = psql(
        &conninfo,
        "select ssl::text || ' ' || version || ' ' || inet_server_port() \
         from pg_stat_ssl where pid = pg_backend_pid()",
    )
    .await;
    assert!(out.success(), "psql through the portal: {out:?}");
    let fields: Vec<&str> = out.stdout.split(' ').collect();
    assert_eq!(
        fields.first().copied(),
        Some("true"),
        "the member does not see TLS on the portal's session: {}",
        out.stdout
    );
    assert!(
        fields.get(1).is_some_and(|v| v.starts_with("TLSv1.")),
        "TLS version on the member: {}",
        out.stdout
    );
    assert_eq!(
        fields.get(2).copied(),
        Some(member.server.port().to_string().as_str()),
        "the session did not reach the member: {}",
        out.stdout
    );

    // tokio-postgres too, with a write and a read back.
    let client = pg_session(config.ports.rw, &certs).await;
    client
        .batch_execute("create table t (v text); insert into t values ('over tls')")
        .await
        .unwrap_or_else(|err| panic!("write through the portal: {}", pg_error(&err)));
    let row = client
        .query_one(
            "select (select v from t), ssl from pg_stat_ssl where pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap_or_else(|err| panic!("read through the portal: {}", pg_error(&err)));
    assert_eq!(row.get::<_, String>(0), "over tls");
    assert!(
        row.get::<_, bool>(1),
        "tokio-postgres session not TLS on the member"
    );

    // Every client backend on the member (the probe, this session) is on TLS.
    let all_tls = member.server.psql(
        "select count(*) filter (where s.ssl)::text || '/' || count(*) \
         from pg_stat_activity a join pg_stat_ssl s using (pid) \
         where a.backend_type = 'client backend' and a.client_addr is not null \
         and a.pid <> pg_backend_pid()",
    );
    let (ssl, total) = all_tls.split_once('/').expect("n/m");
    assert_eq!(ssl, total, "client backends on TLS / all: {all_tls}");
    assert!(
        total.parse::<u32>().is_ok_and(|n| n >= 2),
        "expected the probe and the session on the member, saw {all_tls}"
    );

    // A cancel request crosses the portal's TLS leg too.
    let token = client.cancel_token();
    let sleeping = tokio::spawn(async move { client.simple_query("select pg_sleep(30)").await });
    member.server.wait_psql(
        "select count(*) > 0 from pg_stat_activity \
         where state = 'active' and query = 'select pg_sleep(30)'",
        "t",
    );
    token
        .cancel_query(PgTls::new(&certs.ca))
        .await
        .unwrap_or_else(|err| panic!("cancel_query through the portal: {}", pg_error(&err)));
    let result = tokio::time::timeout(Duration::from_secs(10), sleeping)
        .await
        .expect("pg_sleep(30) still runs 10 s after the cancel request")
        .expect("query task");
    let err = result.expect_err("pg_sleep(30) finished instead of being cancelled");
    assert_eq!(
        err.code(),
        Some(&SqlState::QUERY_CANCELED),
        "{}",
        pg_error(&err)
    );
    portal
        .wait_metric(
            "portal_cancel_requests_total",
            &[("outcome", "forwarded")],
            |v| v >= 1.0,
        )
        .await;
}

/// A portal whose `backend_tls` cannot verify the member: it never elects
/// it, refuses clients readably after `hold_timeout`, and keeps serving.
async fn assert_unreachable(target: &TlsMember, backend_tls: String, want_error: &str) {
    let certs = temp_certs();
    let config = PgPortalConfig::new(&certs, &[target.server.port()])
        .hold_timeout("1s")
        .backend_tls(&backend_tls);
    let mut portal = Portal::start(&config.yaml()).await;

    // The probe reports why it cannot reach the member.
    let status = portal
        .wait_for(&format!("a probe error mentioning {want_error:?}"), |s| {
            member(s, "a")["last_error"]
                .as_str()
                .is_some_and(|e| e.contains(want_error))
        })
        .await;
    assert_eq!(
        cluster(&status)["leader"],
        serde_json::Value::Null,
        "{status:#}"
    );

    // A client gets a readable refusal after hold_timeout, not a hang.
    let started = Instant::now();
    let err = pg_connect(config.ports.rw, &certs)
        .await
        .expect_err("a session got through to a member the portal cannot verify");
    let text = pg_error(&err);
    assert_eq!(
        err.code(),
        Some(&SqlState::CANNOT_CONNECT_NOW),
        "not 57P03: {text}"
    );
    assert!(
        text.contains("portal: no leader for cluster \"main\""),
        "unreadable refusal: {text}"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "refused before hold_timeout (1s): {text} after {:?}",
        started.elapsed()
    );

    // psql says the same.
    let out = psql(&portal_conninfo(config.ports.rw, &certs.ca), "select 1").await;
    assert!(!out.success(), "psql got through: {out:?}");
    assert!(
        out.stderr.contains("portal: no leader for cluster"),
        "psql: {out:?}"
    );

    // The portal keeps running and answering.
    assert!(
        portal.is_running(),
        "the portal exited:\n{}",
        portal.stderr_log()
    );
    let (code, body) = portal.get("/health").await.expect("GET /health");
    assert_eq!((code, body.trim()), (200, "ok"));
    let (code, _) = portal.get("/ready").await.expect("GET /ready");
    assert_eq!(code, 503, "ready without a leader");
    portal
        .wait_metric(
            "portal_connections_refused_total",
            &[("reason", "no_leader")],
            |v| v >= 2.0,
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_backend_ca_or_name_keeps_the_member_out() {
    let member = tls_member();
    assert_member_requires_tls(&member.server).await;

    // The wrong CA: the portal's own endpoint CA, which did not sign the
    // member's certificate.
    let other_ca = temp_certs();
    assert_unreachable(
        &member,
        format!(
            "{{ca: {}, server_name: {MEMBER_NAME}}}",
            other_ca.ca.display()
        ),
        "UnknownIssuer",
    )
    .await;

    // The right CA, but no server_name: the portal checks the certificate
    // against 127.0.0.1, which it does not name.
    assert_unreachable(
        &member,
        format!("{{ca: {}}}", member.certs.ca.display()),
        "not valid for name",
    )
    .await;

    // The member itself was fine all along.
    assert_member_requires_tls(&member.server).await;
}

/// `config/postgres.yaml` passes `portal check` as shipped, and with its
/// commented `backend_tls` block switched on (once the CA file it names
/// exists), so the example a reader copies is valid.
#[test]
fn the_postgres_example_config_passes_check_with_and_without_backend_tls() {
    let root = tempfile::TempDir::new().expect("temp dir");
    let config_dir = root.path().join("config");
    std::fs::create_dir(&config_dir).expect("mkdir config");
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/postgres.yaml");
    let text = std::fs::read_to_string(&example).expect("read config/postgres.yaml");
    let certs = certs(&root.path().join("certs"));

    let check = |yaml: &str, file: &str| {
        let path = config_dir.join(file);
        std::fs::write(&path, yaml).expect("write the config copy");
        let out = std::process::Command::new(PORTAL)
            .arg("check")
            .arg("-c")
            .arg(&path)
            .env_remove("PORTAL_PROBE_PASSWORD")
            .output()
            .expect("run portal check");
        assert!(
            out.status.success(),
            "{file} should pass check:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };

    let summary = check(&text, "postgres.yaml");
    assert!(
        summary.contains("db-rw") && summary.contains("db-ro"),
        "the summary should list both endpoints:\n{summary}"
    );

    let on: String = text
        .lines()
        .map(|line| match line.trim_start() {
            "# backend_tls:" => "    backend_tls:".to_string(),
            rest if rest.starts_with("#   ca:") || rest.starts_with("#   server_name:") => {
                format!("      {}", &rest["#   ".len()..])
            }
            _ => line.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        on.contains("\n    backend_tls:\n      ca: ../certs/members-ca.crt"),
        "the example's backend_tls block is no longer where this test expects it:\n{on}"
    );
    std::fs::copy(&certs.ca, root.path().join("certs/members-ca.crt")).expect("members CA");
    check(&on, "postgres-backend-tls.yaml");
}

/// A TCP forwarder in front of a member that, once told to, accepts new
/// connections and never answers them (nor forwards them), while the
/// connections it already forwards go on: a member whose new connects
/// hang, whose probe does not notice.
struct Blackhole {
    port: u16,
    swallow: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Blackhole {
    async fn start(target: u16) -> Blackhole {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the forwarder");
        let port = listener.local_addr().expect("forwarder address").port();
        let swallow = Arc::new(AtomicBool::new(false));
        let swallowing = swallow.clone();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((mut conn, _)) = listener.accept().await {
                if swallowing.load(Ordering::SeqCst) {
                    held.push(conn); // open, and silent
                    continue;
                }
                tokio::spawn(async move {
                    if let Ok(mut member) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut conn, &mut member).await;
                    }
                });
            }
        });
        Blackhole {
            port,
            swallow,
            task,
        }
    }

    fn swallow_new_connections(&self) {
        self.swallow.store(true, Ordering::SeqCst);
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_timeout_bounds_a_connect_to_a_member_that_never_answers() {
    let member = tls_member();
    let hole = Blackhole::start(member.server.port()).await;
    let certs = temp_certs();
    let hold = Duration::from_millis(500);
    let config = PgPortalConfig::new(&certs, &[hole.port])
        .hold_timeout("500ms")
        .backend_tls(&format!(
            "{{ca: {}, server_name: {MEMBER_NAME}}}",
            member.certs.ca.display()
        ));
    let portal = Portal::start(&config.yaml()).await;
    portal.wait_roles("a", &[]).await;
    assert_eq!(
        pg_reached(config.ports.rw, &certs).await,
        Ok(member.server.port()),
        "a session through the forwarder"
    );

    // New connections to the member now hang before its answer to the
    // SSLRequest: inside the portal's connect. The probe's connection is
    // older and still answers, so the member stays the leader.
    hole.swallow_new_connections();
    for attempt in 0..3 {
        let started = Instant::now();
        let err = pg_connect(config.ports.rw, &certs)
            .await
            .expect_err("a session through a member that never answers");
        let waited = started.elapsed();
        eprintln!(
            "attempt {attempt}: refused after {waited:?}: {}",
            pg_error(&err)
        );
        assert_eq!(
            err.code(),
            Some(&SqlState::CANNOT_CONNECT_NOW),
            "attempt {attempt}: {}",
            pg_error(&err)
        );
        assert!(
            pg_error(&err).contains("timed out"),
            "attempt {attempt}: {}",
            pg_error(&err)
        );
        // hold_timeout, plus the client's TLS and startup, plus slack for a
        // loaded machine; well below the 2 s a connect attempt may take
        // when the hold leaves it that much.
        assert!(
            waited >= hold && waited < hold + Duration::from_millis(700),
            "attempt {attempt}: the client waited {waited:?} with hold_timeout {hold:?}"
        );
    }
    let status = portal.status().await;
    assert_eq!(leader(&status).as_deref(), Some("a"), "{status:#}");
    portal
        .wait_metric(
            "portal_connections_refused_total",
            &[("endpoint", "rw"), ("reason", "connect_failed")],
            |v| v >= 3.0,
        )
        .await;
}
