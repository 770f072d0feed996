//! `portal run`: wires clusters, endpoints and the admin listener together,
//! and shuts them down in order on SIGTERM or SIGINT.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{self, AdminState};
use crate::backend::Origination;
use crate::cluster::Cluster;
use crate::config::{self, Config};
use crate::metrics::Metrics;
use crate::proxy::{self, Endpoint};

/// Sessions still open this long after `close_sessions` are abandoned.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// A certificate closer to its end than this is warned about.
const EXPIRY_WARNING: Duration = Duration::from_secs(30 * 24 * 3600);

pub async fn run(mut config: Config) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let background = TaskTracker::new();
    let stop_background = CancellationToken::new();
    let sessions = TaskTracker::new();
    let stop_accepting = CancellationToken::new();
    let close_sessions = CancellationToken::new();

    // Everything that can fail on bad input (certificates, busy ports) is
    // done before anything starts.
    let mut bound = Vec::new();
    for cluster in &config.clusters {
        for endpoint in &cluster.endpoints {
            let tls =
                crate::tls::server_config(&endpoint.tls, crate::frontend::alpn(cluster.protocol))
                    .with_context(|| format!("endpoint {}", endpoint.name))?;
            let listener = TcpListener::bind(endpoint.listen).await.with_context(|| {
                format!(
                    "endpoint {}: cannot listen on {}",
                    endpoint.name, endpoint.listen
                )
            })?;
            bound.push((cluster.name.clone(), endpoint.clone(), tls, listener));
        }
    }
    let admin_listener = TcpListener::bind(config.admin.listen)
        .await
        .with_context(|| format!("admin: cannot listen on {}", config.admin.listen))?;

    let mut originations = Vec::new();
    for cluster in &config.clusters {
        let origination = match &cluster.backend_tls {
            Some(tls) => Some(
                Origination::for_protocol(tls, cluster.protocol)
                    .with_context(|| format!("cluster {}: backend_tls", cluster.name))?,
            ),
            None => None,
        };
        originations.push(origination);
    }
    // View rule 9: with peers, a fresh portal's first election waits for a
    // peer's answer, at most five exchange intervals, between 1 s and 30 s
    // (a peer that is down too must not keep this one from serving).
    let peer_wait = (!config.admin.peers.is_empty() && config.admin.token.is_some()).then(|| {
        config
            .admin
            .peer_interval
            .saturating_mul(5)
            .clamp(Duration::from_secs(1), Duration::from_secs(30))
    });
    let clusters: Vec<Arc<Cluster>> = config
        .clusters
        .iter()
        .zip(originations)
        .map(|(c, origination)| {
            Cluster::start(
                c.clone(),
                origination,
                peer_wait,
                metrics.clone(),
                &background,
                stop_background.clone(),
            )
        })
        .collect();

    let listeners = TaskTracker::new();
    let mut endpoints = Vec::new();
    for (cluster_name, endpoint_config, tls, listener) in bound {
        let Some(cluster) = clusters.iter().find(|c| c.config.name == cluster_name) else {
            continue;
        };
        let endpoint = Arc::new(Endpoint::new(
            endpoint_config,
            cluster.clone(),
            tls,
            metrics.clone(),
        ));
        tracing::info!(
            endpoint = %endpoint.config.name,
            cluster = %cluster_name,
            listen = %endpoint.config.listen,
            route = %endpoint.config.route,
            "serving"
        );
        record_expiry(&endpoint.config, &metrics);
        listeners.spawn(proxy::serve(
            endpoint.clone(),
            listener,
            sessions.clone(),
            stop_accepting.clone(),
            close_sessions.clone(),
        ));
        endpoints.push(endpoint);
    }

    let state = Arc::new(AdminState {
        clusters,
        endpoints,
        metrics: metrics.clone(),
        draining: false.into(),
        token: config.admin.token.clone(),
        exposed: !config.admin.listen.ip().is_loopback(),
    });
    if !config.admin.listen.ip().is_loopback() && config.admin.token.is_none() {
        tracing::warn!(listen = %config.admin.listen, "the admin listener is not on loopback and has no token: /status and /metrics are readable by anyone who reaches it (set admin.token_file or admin.token_env: every path but /health and /ready then requires it)");
    }
    if let Some(token) = &config.admin.token {
        for peer in &config.admin.peers {
            tracing::info!(peer = %peer, "asking a peer portal for its proven terms");
            background.spawn(crate::peers::follow(
                peer.clone(),
                token.clone(),
                config.admin.peer_interval,
                state.clusters.clone(),
                metrics.clone(),
                stop_background.clone(),
            ));
        }
    }
    tracing::info!(listen = %config.admin.listen, "admin listening");
    background.spawn(admin::serve(
        admin_listener,
        state.clone(),
        stop_background.clone(),
    ));

    let signal = loop {
        match wait_for_signal().await {
            "SIGHUP" => reload(&mut config, &state.endpoints, &metrics),
            stop => break stop,
        }
    };
    let drain = config.shutdown.drain_timeout;
    tracing::info!(
        signal,
        drain_timeout_ms = drain.as_millis() as u64,
        "shutting down: no new connections; draining sessions"
    );
    state.draining.store(true, Ordering::Relaxed);
    stop_accepting.cancel();
    listeners.close();
    listeners.wait().await;

    sessions.close();
    let drained = tokio::select! {
        drained = tokio::time::timeout(drain, sessions.wait()) => {
            if drained.is_err() {
                tracing::info!(
                    open = sessions.len(),
                    "drain deadline reached; closing the remaining sessions"
                );
            }
            drained.is_ok()
        }
        signal = wait_for_stop() => {
            tracing::info!(signal, open = sessions.len(), "second stop signal: closing every session now");
            false
        }
    };
    if !drained {
        close_sessions.cancel();
        let _ = tokio::time::timeout(CLOSE_GRACE, sessions.wait()).await;
    }
    stop_background.cancel();
    background.close();
    let _ = tokio::time::timeout(CLOSE_GRACE, background.wait()).await;
    tracing::info!("stopped");
    Ok(())
}

/// The next SIGTERM, SIGINT or SIGHUP.
async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    let hup = signal(SignalKind::hangup());
    match (term, int, hup) {
        (Ok(mut term), Ok(mut int), Ok(mut hup)) => tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
            _ = hup.recv() => "SIGHUP",
        },
        _ => {
            tracing::warn!("cannot install signal handlers; only Ctrl-C will stop the portal");
            let _ = tokio::signal::ctrl_c().await;
            "SIGINT"
        }
    }
}

/// The next SIGTERM or SIGINT (a SIGHUP during shutdown is ignored).
async fn wait_for_stop() -> &'static str {
    loop {
        let signal = wait_for_signal().await;
        if signal != "SIGHUP" {
            return signal;
        }
    }
}

/// Sets `portal_certificate_not_after_seconds` for `endpoint` and warns
/// when its certificate expires within [`EXPIRY_WARNING`].
fn record_expiry(endpoint: &config::Endpoint, metrics: &Metrics) {
    match crate::tls::not_after(&endpoint.tls.cert) {
        Ok(at) => {
            metrics
                .certificate_not_after
                .with_label_values(&[&endpoint.name])
                .set(at);
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            let left = at - now;
            if left < EXPIRY_WARNING.as_secs() as i64 {
                tracing::warn!(
                    endpoint = %endpoint.name,
                    cert = %endpoint.tls.cert.display(),
                    days_left = left / 86_400,
                    "the endpoint's certificate expires within 30 days (or has expired)"
                );
            }
        }
        Err(err) => {
            tracing::warn!(endpoint = %endpoint.name, error = %err, "cannot read the certificate's expiry")
        }
    }
}

/// SIGHUP: re-reads the configuration file and the certificates. A file
/// that fails validation, or a certificate or key that does not load, is
/// refused with its error and the running configuration stays. Otherwise
/// every endpoint's certificate is re-read and served to new handshakes at
/// once (open sessions keep theirs); other changes are listed as needing a
/// restart and not applied.
fn reload(running: &mut Config, endpoints: &[Arc<Endpoint>], metrics: &Metrics) {
    let failed = |error: String| {
        metrics.reloads.with_label_values(&["failed"]).inc();
        tracing::error!(file = %running.file.display(), error, "reload refused; the running configuration stays");
    };
    let new = match Config::load(&running.file) {
        Ok(new) => new,
        Err(err) => return failed(err.to_string()),
    };
    let mut prepared = Vec::new();
    for endpoint in endpoints {
        let Some((protocol, fresh)) = new.clusters.iter().find_map(|c| {
            c.endpoints
                .iter()
                .find(|e| e.name == endpoint.config.name)
                .map(|e| (c.protocol, e))
        }) else {
            continue;
        };
        match crate::tls::server_config(&fresh.tls, crate::frontend::alpn(protocol)) {
            Ok(tls) => prepared.push((endpoint, tls, fresh.clone())),
            Err(err) => return failed(format!("endpoint {}: {err}", fresh.name)),
        }
    }
    for (endpoint, tls, fresh) in &prepared {
        endpoint.replace_tls(tls.clone(), &fresh.tls.cert);
        record_expiry(fresh, metrics);
    }
    let not_applied = needs_restart(running, &new);
    // What runs now: the old configuration with the new certificate files.
    for cluster in &mut running.clusters {
        for endpoint in &mut cluster.endpoints {
            if let Some((_, _, fresh)) = prepared.iter().find(|(_, _, f)| f.name == endpoint.name) {
                endpoint.tls = fresh.tls.clone();
            }
        }
    }
    metrics.reloads.with_label_values(&["ok"]).inc();
    if not_applied.is_empty() {
        tracing::info!(endpoints = prepared.len(), "reloaded: certificates re-read");
    } else {
        tracing::warn!(
            endpoints = prepared.len(),
            not_applied = %not_applied.join("; "),
            "reloaded: certificates re-read; other changes need a restart and were not applied"
        );
    }
}

/// The parts of `new` that differ from `old` beyond certificate files.
fn needs_restart(old: &Config, new: &Config) -> Vec<String> {
    let mut changes = Vec::new();
    if format!("{:?}", old.admin) != format!("{:?}", new.admin) {
        changes.push("admin".to_string());
    }
    if format!("{:?}", old.shutdown) != format!("{:?}", new.shutdown) {
        changes.push("shutdown".to_string());
    }
    // Compared without endpoints, and endpoints without their TLS files.
    let bare = |c: &config::Cluster| {
        let mut c = c.clone();
        c.endpoints.clear();
        format!("{c:?}")
    };
    let endpoint = |e: &config::Endpoint| {
        let mut e = e.clone();
        e.tls = old_tls_placeholder();
        format!("{e:?}")
    };
    for c in &new.clusters {
        match old.clusters.iter().find(|o| o.name == c.name) {
            None => changes.push(format!("cluster {} added", c.name)),
            Some(o) => {
                if bare(o) != bare(c) {
                    changes.push(format!("cluster {} changed", c.name));
                }
                for e in &c.endpoints {
                    match o.endpoints.iter().find(|oe| oe.name == e.name) {
                        None => changes.push(format!("endpoint {} added", e.name)),
                        Some(oe) if endpoint(oe) != endpoint(e) => {
                            changes.push(format!("endpoint {} changed", e.name))
                        }
                        Some(_) => {}
                    }
                }
                for oe in &o.endpoints {
                    if !c.endpoints.iter().any(|e| e.name == oe.name) {
                        changes.push(format!("endpoint {} removed", oe.name));
                    }
                }
            }
        }
    }
    for o in &old.clusters {
        if !new.clusters.iter().any(|c| c.name == o.name) {
            changes.push(format!("cluster {} removed", o.name));
        }
    }
    changes
}

fn old_tls_placeholder() -> config::TlsFiles {
    config::TlsFiles::default()
}
