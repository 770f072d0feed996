//! The exchange of proven terms between the portals of the same clusters
//! (view rule 4): each portal serves the newest term it has seen a leader
//! hold, per cluster, at `GET /peer/terms` on its admin listener, and asks
//! every configured peer for theirs every `admin.peer_interval`.
//!
//! Proven terms only grow and the view ignores one it already knows or
//! that is older than one it knows, so answers may arrive late, twice or
//! in any order. A peer that does not answer changes nothing: the view
//! keeps the terms it had. Both sides need the same `admin.token`: a
//! forged term could fence a healthy primary.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::header::{AUTHORIZATION, HOST};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::cluster::Cluster;
use crate::config::Secret;
use crate::metrics::Metrics;
use crate::view::{PeerTerms, Term};

/// The path a portal serves its proven terms on.
pub const PATH: &str = "/peer/terms";

/// Largest answer read from a peer.
const MAX_ANSWER: usize = 1 << 20;

/// A term as JSON: `{"number": n}`, `{"number": timeline, "system":
/// "<decimal>"}` (a string: JSON numbers lose u64 precision in many
/// readers) or `{"id": ..., "previous": ...}`.
pub fn term_json(term: &Term) -> Value {
    match term {
        Term::Number(n) => json!({ "number": n }),
        Term::Timeline { system, timeline } => {
            json!({ "number": timeline, "system": system.to_string() })
        }
        Term::Lineage { id, previous } => json!({ "id": id, "previous": previous }),
    }
}

fn term_from_json(value: &Value) -> Option<Term> {
    if let Some(n) = value.get("number") {
        let timeline = n.as_u64()?;
        return Some(match value.get("system") {
            None | Some(Value::Null) => Term::Number(timeline),
            Some(system) => Term::Timeline {
                system: system.as_str()?.parse().ok()?,
                timeline,
            },
        });
    }
    let id = value.get("id")?.as_str()?.to_string();
    let previous = match value.get("previous") {
        None | Some(Value::Null) => None,
        Some(p) => Some(p.as_str()?.to_string()),
    };
    Some(Term::Lineage { id, previous })
}

/// The document served at [`PATH`]: per cluster, the term of its current
/// (or last) leader and the lineage steps this portal observed.
pub fn terms_document(clusters: &[Arc<Cluster>]) -> Value {
    let clusters: Vec<Value> = clusters
        .iter()
        .filter_map(|c| {
            let snapshot = c.status.load();
            let term = snapshot.leader_term.as_ref()?;
            Some(json!({
                "name": c.config.name,
                "term": term_json(term),
                "lineage": snapshot.lineage,
            }))
        })
        .collect();
    json!({ "clusters": clusters })
}

/// Reads a peer's document: `(cluster name, what it proved)` pairs. Entries
/// that do not parse are skipped.
pub fn parse_document(document: &Value) -> Vec<(String, PeerTerms)> {
    let Some(clusters) = document.get("clusters").and_then(Value::as_array) else {
        return Vec::new();
    };
    clusters
        .iter()
        .filter_map(|c| {
            let name = c.get("name")?.as_str()?.to_string();
            let term = term_from_json(c.get("term")?)?;
            let lineage = c
                .get("lineage")
                .and_then(Value::as_array)
                .map(|steps| {
                    steps
                        .iter()
                        .filter_map(|step| {
                            let pair = step.as_array()?;
                            match pair.as_slice() {
                                [id, previous] => {
                                    Some((id.as_str()?.to_string(), previous.as_str()?.to_string()))
                                }
                                _ => None,
                            }
                        })
                        .collect()
                })
                .unwrap_or_default();
            Some((name, PeerTerms { term, lineage }))
        })
        .collect()
}

/// Asks `peer` for its terms every `interval` until `cancel`, and hands
/// each cluster's answer to the cluster of the same name.
pub async fn follow(
    peer: String,
    token: Secret,
    interval: Duration,
    served: Arc<crate::admin::AdminState>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    let ok = metrics.peer_exchanges.with_label_values(&[&peer, "ok"]);
    let failed = metrics.peer_exchanges.with_label_values(&[&peer, "failed"]);
    // The answer must come within the interval (and never later than 2 s):
    // a stale answer is worth little.
    let limit = interval.clamp(Duration::from_millis(100), Duration::from_secs(2));
    let mut reachable: Option<bool> = None;
    // The cluster instances told that this peer answered (a reload may
    // start new ones).
    let mut told: std::collections::HashSet<usize> = std::collections::HashSet::new();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = cancel.cancelled() => return,
        }
        let answer = tokio::select! {
            answer = tokio::time::timeout(limit, fetch(&peer, &token)) => answer
                .unwrap_or_else(|_| Err(format!("no answer within {limit:?}"))),
            _ = cancel.cancelled() => return,
        };
        match answer {
            Ok(document) => {
                ok.inc();
                if reachable != Some(true) {
                    tracing::info!(peer = %peer, "peer portal answers");
                    reachable = Some(true);
                }
                let answers = parse_document(&document);
                let clusters = served.served.load().clusters.clone();
                for cluster in &clusters {
                    let first = told.insert(Arc::as_ptr(cluster) as usize);
                    match answers
                        .iter()
                        .find(|(name, _)| *name == cluster.config.name)
                    {
                        Some((_, terms)) => cluster.apply_peer(terms.clone()),
                        // The peer knows no leader of this cluster either:
                        // say so once, so a fresh view stops waiting.
                        None if first => cluster.peers_heard(),
                        None => {}
                    }
                }
            }
            Err(error) => {
                failed.inc();
                if reachable != Some(false) {
                    // `?error`: the text may hold a peer's answer; Debug escapes
                    // its newlines, so it cannot forge log lines.
                    tracing::warn!(peer = %peer, error = ?error, "peer portal does not answer; keeping the terms already proven");
                    reachable = Some(false);
                }
            }
        }
    }
}

async fn fetch(peer: &str, token: &Secret) -> Result<Value, String> {
    let stream = TcpStream::connect(peer)
        .await
        .map_err(|err| format!("connect: {err}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|err| format!("handshake: {err}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let request = Request::get(PATH)
        .header(HOST, peer)
        .header(AUTHORIZATION, format!("Bearer {}", token.expose()))
        .body(Empty::<Bytes>::new())
        .map_err(|err| format!("request: {err}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|err| format!("request: {err}"))?;
    let status = response.status();
    let body = http_body_util::Limited::new(response.into_body(), MAX_ANSWER)
        .collect()
        .await
        .map_err(|err| format!("body: {err}"))?
        .to_bytes();
    if !status.is_success() {
        return Err(format!(
            "answered {status}: {}",
            String::from_utf8_lossy(&body).trim()
        ));
    }
    serde_json::from_slice(&body).map_err(|err| format!("not JSON: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terms_survive_the_round_trip() {
        for term in [
            Term::Number(7),
            Term::Lineage {
                id: "b".into(),
                previous: Some("a".into()),
            },
            Term::Lineage {
                id: "c".into(),
                previous: None,
            },
        ] {
            assert_eq!(term_from_json(&term_json(&term)), Some(term));
        }
    }

    #[test]
    fn a_document_parses_and_bad_entries_are_skipped() {
        let doc = json!({"clusters": [
            {"name": "cache", "term": {"id": "y", "previous": "x"}, "lineage": [["y", "x"], ["bad"]]},
            {"name": "pg", "term": {"number": 3}},
            {"name": "broken", "term": {"number": "three"}},
            {"term": {"number": 1}},
        ]});
        let parsed = parse_document(&doc);
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[0].0, "cache");
        assert_eq!(
            parsed[0].1.lineage,
            vec![("y".to_string(), "x".to_string())]
        );
        assert_eq!(parsed[1].1.term, Term::Number(3));
        assert!(parse_document(&json!("garbage")).is_empty());
    }
}
