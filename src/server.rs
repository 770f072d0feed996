//! `portal run`: wires clusters, endpoints and the admin listener together,
//! and shuts them down in order on SIGTERM or SIGINT.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{self, AdminState};
use crate::backend::Origination;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::proxy::{self, Endpoint};

/// Sessions still open this long after `close_sessions` are abandoned.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

pub async fn run(config: Config) -> anyhow::Result<()> {
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
    });
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

    let signal = wait_for_signal().await;
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
    if tokio::time::timeout(drain, sessions.wait()).await.is_err() {
        tracing::info!(
            open = sessions.len(),
            "drain deadline reached; closing the remaining sessions"
        );
        close_sessions.cancel();
        let _ = tokio::time::timeout(CLOSE_GRACE, sessions.wait()).await;
    }
    stop_background.cancel();
    background.close();
    let _ = tokio::time::timeout(CLOSE_GRACE, background.wait()).await;
    tracing::info!("stopped");
    Ok(())
}

async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        },
        _ => {
            tracing::warn!("cannot install signal handlers; only Ctrl-C will stop the portal");
            let _ = tokio::signal::ctrl_c().await;
            "SIGINT"
        }
    }
}
