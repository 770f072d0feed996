//! The admin HTTP listener (hyper): `/metrics`, `/status`, `/health`,
//! `/ready`, and a status page at `/`; with `admin.token` set, the
//! operator's actions (`POST /clusters/NAME/accept-leader?member=M`,
//! `POST /clusters/NAME/forget-terms`) and the peer exchange
//! ([`crate::peers::PATH`]), both behind `Authorization: Bearer TOKEN`.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::cluster::{ActionError, Cluster};
use crate::config::{self, Secret};
use crate::metrics::Metrics;
use crate::peers;
use crate::proxy::Endpoint;
use crate::view::{DcsView, Override, OverrideError, Snapshot};

/// The cluster and endpoint instances serving now; a reload swaps them.
pub struct Served {
    pub clusters: Vec<Arc<Cluster>>,
    pub endpoints: Vec<Arc<Endpoint>>,
}

/// What a reload did (`Ok`) or why it was refused (`Err`), in words.
pub type ReloadOutcome = Result<String, String>;

/// What the admin pages read.
pub struct AdminState {
    pub served: arc_swap::ArcSwap<Served>,
    pub metrics: Arc<Metrics>,
    /// `POST /reload` asks the main task for a reload here and waits for
    /// its outcome.
    pub reload: tokio::sync::mpsc::Sender<tokio::sync::oneshot::Sender<ReloadOutcome>>,
    /// Set once shutdown starts: `/ready` then answers 503.
    pub draining: AtomicBool,
    /// What the operator's actions and the peer exchange require.
    pub token: Option<Secret>,
    /// The listener is not on a loopback address: with a token, every
    /// path but `/health` and `/ready` requires it.
    pub exposed: bool,
}

/// Admin connections open at once; past it a new one is closed at once.
const MAX_CONNECTIONS: usize = 64;
/// Admin connections open at once from one address: a stranger that holds
/// connections open cannot take the places of a load balancer's or an
/// orchestrator's `/ready` and `/health` checks.
const MAX_CONNECTIONS_PER_SOURCE: usize = 8;
/// How long a client may take to send a request's headers (also the idle
/// time allowed between requests on a kept-alive connection).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest life of one admin connection; it then closes after the request
/// in flight (scrapers reconnect).
const MAX_CONNECTION_AGE: Duration = Duration::from_secs(300);

pub async fn serve(listener: TcpListener, state: Arc<AdminState>, cancel: CancellationToken) {
    let slots = crate::admission::Admission::new(crate::admission::Limits {
        handshakes: MAX_CONNECTIONS,
        handshakes_per_source: MAX_CONNECTIONS_PER_SOURCE,
        sessions: 0,
        sessions_per_source: None,
    });
    let limited = crate::log_limit::LogLimit::default();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::warn!(error = %err, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = cancel.cancelled() => return,
        };
        let slot = match slots.opening(peer.ip()) {
            Ok(slot) => slot,
            Err(denied) => {
                if let Some(suppressed) = limited.admit(denied.reason()) {
                    let limit = match denied {
                        crate::admission::Denied::HandshakesPerSource => MAX_CONNECTIONS_PER_SOURCE,
                        _ => MAX_CONNECTIONS,
                    };
                    tracing::warn!(%peer, limit, suppressed, "admin connection refused: too many open");
                }
                continue;
            }
        };
        let state = state.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&state, &req).await) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let aged = tokio::time::sleep(MAX_CONNECTION_AGE);
            tokio::pin!(aged);
            loop {
                tokio::select! {
                    result = conn.as_mut() => {
                        if let Err(err) = result {
                            tracing::debug!(%peer, error = %err, "admin connection error");
                        }
                        return;
                    }
                    _ = &mut aged => {
                        conn.as_mut().graceful_shutdown();
                        aged.as_mut().reset(tokio::time::Instant::now() + HEADER_READ_TIMEOUT);
                    }
                    _ = cancel.cancelled() => return,
                }
            }
        });
    }
}

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

async fn handle(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() == Method::POST {
        return operator_action(state, req).await;
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET or HEAD, or POST for the operator's actions\n".into(),
        );
    }
    let path = req.uri().path();
    let probe_path = path == "/health" || path == "/ready" || path.starts_with("/ready/");
    if state.exposed && state.token.is_some() && !probe_path {
        if let Some(refusal) = unauthorized(state, req) {
            return refusal;
        }
    }
    match path {
        peers::PATH => unauthorized(state, req).unwrap_or_else(|| {
            respond(
                StatusCode::OK,
                "application/json",
                format!("{}\n", peers::terms_document(&state.served.load().clusters)),
            )
        }),
        "/health" => respond(StatusCode::OK, "text/plain", "ok\n".into()),
        "/ready" => ready(state),
        _ if path.starts_with("/ready/") => ready_part(state, &path["/ready/".len()..]),
        "/metrics" => respond(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            state.metrics.render(),
        ),
        "/status" => respond(
            StatusCode::OK,
            "application/json",
            format!("{:#}\n", status_json(state)),
        ),
        "/" => respond(
            StatusCode::OK,
            "text/html; charset=utf-8",
            status_page(state),
        ),
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

/// The refusal of a request that does not carry the configured token
/// (`None`: it does). Every such request is refused when no token is
/// configured: the actions are then off.
fn unauthorized(state: &AdminState, req: &Request<Incoming>) -> Option<Response<Full<Bytes>>> {
    let Some(token) = &state.token else {
        return Some(respond(
            StatusCode::FORBIDDEN,
            "text/plain",
            "disabled: set admin.token_file or admin.token_env to enable operator actions and peers\n"
                .into(),
        ));
    };
    let given = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        // The scheme is case-insensitive (RFC 9110).
        .and_then(|v| {
            v.get(..7)
                .filter(|scheme| scheme.eq_ignore_ascii_case("bearer "))
                .and_then(|_| v.get(7..))
        })
        .unwrap_or("");
    if constant_time_eq(given.as_bytes(), token.expose().as_bytes()) {
        None
    } else {
        Some(respond(
            StatusCode::UNAUTHORIZED,
            "text/plain",
            "missing or wrong bearer token\n".into(),
        ))
    }
}

/// Compares without an early exit, so the time taken does not tell how
/// much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `POST /clusters/NAME/accept-leader?member=M` and
/// `POST /clusters/NAME/forget-terms` (view rule 8).
async fn operator_action(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if let Some(refusal) = unauthorized(state, req) {
        return refusal;
    }
    let text = |status, body: String| respond(status, "text/plain", body);
    let path = req.uri().path();
    if path == "/reload" {
        return reload(state).await;
    }
    let Some((name, action)) = path
        .strip_prefix("/clusters/")
        .and_then(|rest| rest.split_once('/'))
    else {
        return text(StatusCode::NOT_FOUND, "not found\n".into());
    };
    let served = state.served.load_full();
    let Some(cluster) = served.clusters.iter().find(|c| c.config.name == name) else {
        return text(StatusCode::NOT_FOUND, format!("no cluster {name:?}\n"));
    };
    let decision = match action {
        "forget-terms" => Override::ForgetTerms,
        "accept-leader" => {
            let member = req
                .uri()
                .query()
                .unwrap_or("")
                .split('&')
                .find_map(|kv| kv.strip_prefix("member="));
            let Some(member) = member else {
                return text(
                    StatusCode::BAD_REQUEST,
                    "accept-leader needs ?member=NAME\n".into(),
                );
            };
            let Some(id) = cluster.roster.id_of(member) else {
                return text(
                    StatusCode::NOT_FOUND,
                    format!("no member {member:?} in {name}\n"),
                );
            };
            Override::AcceptLeader(id)
        }
        _ => return text(StatusCode::NOT_FOUND, "not found\n".into()),
    };
    match cluster.apply_override(decision).await {
        Ok(()) => {
            let snapshot = cluster.status.load();
            respond(
                StatusCode::OK,
                "application/json",
                format!(
                    "{:#}\n",
                    cluster_json(cluster, &snapshot, &served.endpoints)
                ),
            )
        }
        Err(ActionError::Refused(err @ OverrideError::NotClaiming(_))) => {
            text(StatusCode::CONFLICT, format!("refused: {err}\n"))
        }
        Err(err) => text(StatusCode::SERVICE_UNAVAILABLE, format!("refused: {err}\n")),
    }
}

fn ready(state: &AdminState) -> Response<Full<Bytes>> {
    if state.draining.load(Ordering::Relaxed) {
        return respond(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "draining\n".into(),
        );
    }
    let served = state.served.load();
    let missing: Vec<&str> = served
        .clusters
        .iter()
        .filter(|c| c.status.load().leader.is_none())
        .map(|c| c.config.name.as_str())
        .collect();
    if missing.is_empty() {
        respond(StatusCode::OK, "text/plain", "ready\n".into())
    } else {
        respond(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            format!("no leader for: {}\n", missing.join(", ")),
        )
    }
}

/// `POST /reload`: the same reload as SIGHUP, answered with its outcome.
async fn reload(state: &AdminState) -> Response<Full<Bytes>> {
    let text = |status, body: String| respond(status, "text/plain", body);
    let (reply, outcome) = tokio::sync::oneshot::channel();
    if state.reload.send(reply).await.is_err() {
        return text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n".into());
    }
    match outcome.await {
        Ok(Ok(done)) => text(StatusCode::OK, format!("{done}\n")),
        Ok(Err(refused)) => text(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("reload refused; the running configuration stays: {refused}\n"),
        ),
        Err(_) => text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n".into()),
    }
}

/// `/ready/cluster/NAME`: the cluster has a leader. `/ready/endpoint/NAME`:
/// the endpoint has a member to route a new session to now (its route,
/// lag limit and replica fallback applied). Both 503 while draining.
fn ready_part(state: &AdminState, what: &str) -> Response<Full<Bytes>> {
    let text = |status, body: String| respond(status, "text/plain", body);
    let served = state.served.load();
    let unavailable = |why: String| text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n"));
    let answer = match what.split_once('/') {
        Some(("cluster", name)) => {
            let Some(cluster) = served.clusters.iter().find(|c| c.config.name == name) else {
                return text(StatusCode::NOT_FOUND, format!("no cluster {name:?}\n"));
            };
            if cluster.status.load().leader.is_some() {
                Ok(())
            } else {
                Err(format!("no leader for {name}"))
            }
        }
        Some(("endpoint", name)) => {
            let Some(endpoint) = served.endpoints.iter().find(|e| e.config.name == name) else {
                return text(StatusCode::NOT_FOUND, format!("no endpoint {name:?}\n"));
            };
            let cluster = endpoint.cluster.latest();
            let snapshot = cluster.routing.borrow().clone();
            let candidates =
                crate::proxy::candidates_now(&endpoint.config, &snapshot, &cluster.status.load());
            let config = &endpoint.config;
            if candidates.is_empty() {
                Err(format!("no member for {name} (route {})", config.route))
            } else {
                Ok(())
            }
        }
        _ => {
            return text(
                StatusCode::NOT_FOUND,
                "/ready/cluster/NAME or /ready/endpoint/NAME\n".into(),
            )
        }
    };
    if state.draining.load(Ordering::Relaxed) {
        return unavailable("draining".into());
    }
    match answer {
        Ok(()) => text(StatusCode::OK, "ready\n".into()),
        Err(why) => unavailable(why),
    }
}

fn rfc3339(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

fn member_name(cluster: &Cluster, id: Option<usize>) -> Value {
    id.and_then(|id| cluster.roster.get(id))
        .map_or(Value::Null, |m| Value::String(m.name.clone()))
}

fn cluster_json(cluster: &Cluster, snapshot: &Snapshot, endpoints: &[Arc<Endpoint>]) -> Value {
    let members: Vec<Value> = cluster
        .roster
        .members()
        .into_iter()
        .map(|(id, m)| {
            let seen = snapshot.members.get(id);
            json!({
                "name": m.name,
                "address": m.address,
                "api": m.api,
                "from": m.origin.as_str(),
                "role": seen.map_or("unknown", |s| s.role.as_str()),
                "health": seen.map_or("unknown", |s| s.health.as_str()),
                "eligible": snapshot.leader == Some(id) || snapshot.replicas.contains(&id),
                "leader": snapshot.leader == Some(id),
                "term": seen.and_then(|s| s.term.as_ref()).map(|t| t.to_string()),
                "upstream": member_name(cluster, seen.and_then(|s| s.upstream)),
                "last_probe": seen.and_then(|s| s.last_report).map(rfc3339),
                "last_error": seen.and_then(|s| s.last_error.clone()),
                "fenced": seen.and_then(|s| s.fenced).map(|f| f.as_str()),
                "suspect": seen.is_some_and(|s| s.missed > 0),
                "missed_probes": seen.map_or(0, |s| s.missed),
                "position": seen.and_then(|s| s.position),
                "lag_bytes": seen.and_then(|s| s.lag_bytes),
                "replay_delay_ms": seen.and_then(|s| s.delay).map(|d| d.as_millis() as u64),
                "sessions": cluster.sessions_on(id),
            })
        })
        .collect();
    let endpoints: Vec<Value> = endpoints
        .iter()
        .filter(|e| std::ptr::eq(e.cluster.as_ref(), cluster))
        .map(|e| {
            json!({
                "name": e.config.name,
                "listen": e.config.listen.to_string(),
                "route": e.config.route.to_string(),
                "active": e.active(),
                "opening": e.openings(),
            })
        })
        .collect();
    json!({
        "name": cluster.config.name,
        "protocol": cluster.config.protocol.to_string(),
        "epoch": snapshot.epoch,
        "leader": member_name(cluster, snapshot.leader),
        "replicas": snapshot.replicas.iter().map(|&r| member_name(cluster, Some(r))).collect::<Vec<_>>(),
        "split_brain": snapshot.split_brain,
        "no_leader": snapshot.no_leader.map(|n| n.as_str()),
        "leader_term": snapshot.leader_term.as_ref().map(|t| t.to_string()),
        "peer_terms": snapshot.peer_terms.iter().map(|t| t.to_string()).collect::<Vec<_>>(),
        "pinned": member_name(cluster, snapshot.pinned),
        "dcs": dcs_json(cluster, &snapshot.dcs),
        "members": members,
        "endpoints": endpoints,
    })
}

/// What the DCS says, as the view holds it; `null` without a DCS.
fn dcs_json(cluster: &Cluster, dcs: &DcsView) -> Value {
    let source = match &cluster.config.dcs {
        None => return Value::Null,
        Some(config::Dcs::Etcd(_)) => "etcd",
        Some(config::Dcs::Sentinel(_)) => "sentinel",
    };
    match dcs {
        DcsView::Absent | DcsView::Waiting => json!({"source": source, "state": "waiting"}),
        DcsView::Named { leader, term } => json!({
            "source": source,
            "state": "reachable",
            "leader": member_name(cluster, *leader),
            "term": term,
        }),
        DcsView::Unreachable { error, last_term } => json!({
            "source": source,
            "state": "unreachable",
            "error": error,
            "last_term": last_term,
        }),
    }
}

/// The `/status` document.
pub fn status_json(state: &AdminState) -> Value {
    let served = state.served.load();
    let clusters: Vec<Value> = served
        .clusters
        .iter()
        .map(|c| cluster_json(c, &c.status.load(), &served.endpoints))
        .collect();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "draining": state.draining.load(Ordering::Relaxed),
        "clusters": clusters,
    })
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn status_page(state: &AdminState) -> String {
    let mut html = String::from(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>portal</title>\
         <meta http-equiv=\"refresh\" content=\"2\">\
         <style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:2em}\
         td,th{border:1px solid #ccc;padding:4px 10px;text-align:left}.leader{background:#dfd}\
         .down{background:#fdd}.warn{color:#b00;font-weight:bold}</style></head><body><h1>portal</h1>",
    );
    for cluster in &state.served.load().clusters {
        let s = cluster.status.load();
        let leader = s
            .leader
            .map_or("none".to_string(), |l| cluster.member_name(l));
        let _ = write!(
            html,
            "<h2>{} ({})</h2><p>epoch {} &middot; leader <b>{}</b>{}</p>\
             <table><tr><th>member</th><th>address</th><th>role</th><th>health</th><th>term</th><th>sessions</th><th>last error</th></tr>",
            escape(&cluster.config.name),
            cluster.config.protocol,
            s.epoch,
            escape(&leader),
            if s.split_brain { " <span class=\"warn\">split brain</span>" } else { "" },
        );
        for (id, m) in cluster.roster.members() {
            let Some(v) = s.members.get(id) else { continue };
            let class = if s.leader == Some(id) {
                "leader"
            } else if v.health == crate::view::Health::Down {
                "down"
            } else {
                ""
            };
            let _ = write!(
                html,
                "<tr class=\"{class}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                escape(&m.name),
                escape(&m.address),
                v.role.as_str(),
                v.health.as_str(),
                escape(&v.term.as_ref().map(|t| t.to_string()).unwrap_or_default()),
                cluster.sessions_on(id),
                escape(v.last_error.as_deref().unwrap_or("")),
            );
        }
        html.push_str("</table>");
    }
    html.push_str("<p><a href=\"/status\">/status</a> &middot; <a href=\"/metrics\">/metrics</a></p></body></html>\n");
    html
}
