//! Prometheus metrics, registered once in a registry of their own.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every metric the portal exports. Names are listed in the README.
pub struct Metrics {
    registry: Registry,
    pub connections_accepted: IntCounterVec,
    pub connections_active: IntGaugeVec,
    pub connections_refused: IntCounterVec,
    pub bytes: IntCounterVec,
    pub tls_handshake_failures: IntCounterVec,
    pub protocol_errors: IntCounterVec,
    pub cancel_requests: IntCounterVec,
    pub sessions_closed: IntCounterVec,
    pub hold_seconds: HistogramVec,
    pub probe_duration: HistogramVec,
    pub probe_failures: IntCounterVec,
    pub leader_changes: IntCounterVec,
    pub epoch: IntGaugeVec,
    pub split_brain: IntGaugeVec,
    pub member_up: IntGaugeVec,
    pub member_is_leader: IntGaugeVec,
    pub dcs_up: IntGaugeVec,
    pub dcs_events: IntCounterVec,
    pub operator_actions: IntCounterVec,
    pub peer_exchanges: IntCounterVec,
    pub fenced: IntCounterVec,
    pub certificate_not_after: IntGaugeVec,
    pub reloads: IntCounterVec,
    pub went_back: IntCounterVec,
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let metric = IntCounterVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|err| panic!("metric {name} is malformed: {err}"));
    registry
        .register(Box::new(metric.clone()))
        .unwrap_or_else(|err| panic!("metric {name} registered twice: {err}"));
    metric
}

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let metric = IntGaugeVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|err| panic!("metric {name} is malformed: {err}"));
    registry
        .register(Box::new(metric.clone()))
        .unwrap_or_else(|err| panic!("metric {name} registered twice: {err}"));
    metric
}

fn histogram(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: Vec<f64>,
) -> HistogramVec {
    let metric = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        .unwrap_or_else(|err| panic!("metric {name} is malformed: {err}"));
    registry
        .register(Box::new(metric.clone()))
        .unwrap_or_else(|err| panic!("metric {name} registered twice: {err}"));
    metric
}

impl Metrics {
    // The panics above can only fire on a programming error in the fixed
    // names below, caught by the unit test; nothing from outside reaches them.
    pub fn new() -> Metrics {
        let r = Registry::new();
        let latency = vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        ];
        Metrics {
            connections_accepted: counter(
                &r,
                "portal_connections_accepted_total",
                "Client connections accepted.",
                &["endpoint"],
            ),
            connections_active: gauge(
                &r,
                "portal_connections_active",
                "Client connections open now.",
                &["endpoint"],
            ),
            connections_refused: counter(
                &r,
                "portal_connections_refused_total",
                "Client connections refused, by reason.",
                &["endpoint", "reason"],
            ),
            bytes: counter(
                &r,
                "portal_bytes_total",
                "Bytes forwarded, by direction.",
                &["endpoint", "direction"],
            ),
            tls_handshake_failures: counter(
                &r,
                "portal_tls_handshake_failures_total",
                "TLS handshakes that failed, by reason.",
                &["endpoint", "reason"],
            ),
            protocol_errors: counter(
                &r,
                "portal_protocol_errors_total",
                "Clients dropped for a protocol violation before routing, by reason.",
                &["endpoint", "reason"],
            ),
            cancel_requests: counter(
                &r,
                "portal_cancel_requests_total",
                "PostgreSQL cancel requests, by outcome (forwarded, unknown_key, failed).",
                &["endpoint", "outcome"],
            ),
            sessions_closed: counter(
                &r,
                "portal_sessions_closed_total",
                "Sessions closed by the portal, by reason.",
                &["endpoint", "reason"],
            ),
            hold_seconds: histogram(
                &r,
                "portal_hold_seconds",
                "Time new connections waited for an eligible member.",
                &["endpoint"],
                vec![0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0],
            ),
            probe_duration: histogram(
                &r,
                "portal_probe_duration_seconds",
                "Duration of successful probes.",
                &["cluster", "member"],
                latency,
            ),
            probe_failures: counter(
                &r,
                "portal_probe_failures_total",
                "Failed probes, by kind (hard: refused/reset, soft: timeout/error).",
                &["cluster", "member", "kind"],
            ),
            leader_changes: counter(
                &r,
                "portal_leader_changes_total",
                "Times the leader changed (including to none).",
                &["cluster"],
            ),
            epoch: gauge(&r, "portal_epoch", "Current view epoch.", &["cluster"]),
            split_brain: gauge(
                &r,
                "portal_split_brain",
                "1 while several members claim primary and terms cannot order them.",
                &["cluster"],
            ),
            member_up: gauge(
                &r,
                "portal_member_up",
                "1 while the member is healthy (probes pass, after rise/fall); eligibility also needs the view's fencing.",
                &["cluster", "member"],
            ),
            member_is_leader: gauge(
                &r,
                "portal_member_is_leader",
                "1 for the current leader.",
                &["cluster", "member"],
            ),
            dcs_up: gauge(
                &r,
                "portal_dcs_up",
                "1 while the cluster's DCS (etcd, Sentinel) answers; while 0 the last leader is kept only as long as its probes confirm it.",
                &["cluster"],
            ),
            dcs_events: counter(
                &r,
                "portal_dcs_events_total",
                "Changes seen by the DCS watch (key events, Sentinel switch-master messages).",
                &["cluster"],
            ),
            operator_actions: counter(
                &r,
                "portal_operator_actions_total",
                "Operator decisions applied to a cluster's view (accept_leader, forget_terms), by outcome (applied, refused).",
                &["cluster", "action", "outcome"],
            ),
            peer_exchanges: counter(
                &r,
                "portal_peer_exchanges_total",
                "Answers asked of peer portals for their proven terms, by outcome (ok, failed).",
                &["peer", "outcome"],
            ),
            fenced: counter(
                &r,
                "portal_fenced_total",
                "Times a member was fenced, by reason (older_term, unrelated_history, older_than_peer_term, ...).",
                &["cluster", "reason"],
            ),
            certificate_not_after: gauge(
                &r,
                "portal_certificate_not_after_seconds",
                "When each endpoint's certificate expires (Unix time of its notAfter).",
                &["endpoint"],
            ),
            went_back: counter(
                &r,
                "portal_dcs_went_back_total",
                "Times the view followed a DCS back to an older history once the newer one was gone (view rule 6).",
                &["cluster"],
            ),
            reloads: counter(
                &r,
                "portal_reloads_total",
                "Configuration reloads (SIGHUP), by result (ok, failed).",
                &["result"],
            ),
            registry: r,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(err) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %err, "metrics encoding failed");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_metrics_register_and_render() {
        let m = Metrics::new();
        m.connections_accepted.with_label_values(&["rw"]).inc();
        m.split_brain.with_label_values(&["cache"]).set(1);
        let text = m.render();
        assert!(text.contains("portal_connections_accepted_total{endpoint=\"rw\"} 1"));
        assert!(text.contains("portal_split_brain{cluster=\"cache\"} 1"));
    }
}
