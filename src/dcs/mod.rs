//! DCS sources: tasks that watch where a cluster's leader is named (Patroni's
//! keys in etcd, Redis Sentinel) and turn it into [`DcsReport`]s for the view.
//! Like a probe, a source never decides who leads: the view still needs the
//! named member's own probe to confirm it (design rule 5).

pub mod etcd;
pub mod sentinel;

use std::sync::Arc;
use std::time::Duration;

use prometheus::{IntCounter, IntGauge};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{self, Dcs};
use crate::metrics::Metrics;
use crate::roster::Roster;
use crate::view::DcsReport;

/// How long a source waits before reconnecting after losing its DCS.
const RECONNECT_PAUSE: Duration = Duration::from_millis(250);

/// What a source knows about the cluster it serves.
pub struct SourceContext {
    pub cluster: Arc<str>,
    /// The members: a source maps names and addresses to ids here, and an
    /// etcd source adds the members Patroni advertises.
    pub roster: Arc<Roster>,
    pub up: IntGauge,
    pub events: IntCounter,
}

impl SourceContext {
    pub fn new(config: &config::Cluster, roster: Arc<Roster>, metrics: &Metrics) -> Self {
        let name = config.name.as_str();
        SourceContext {
            cluster: Arc::from(name),
            roster,
            up: metrics.dcs_up.with_label_values(&[name]),
            events: metrics.dcs_events.with_label_values(&[name]),
        }
    }
}

/// Forwards reports to the view, dropping repeats. Returns `false` once the
/// view is gone.
pub struct Reporter {
    tx: mpsc::Sender<DcsReport>,
    last: Option<DcsReport>,
}

impl Reporter {
    pub fn new(tx: mpsc::Sender<DcsReport>) -> Reporter {
        Reporter { tx, last: None }
    }

    pub async fn send(&mut self, report: DcsReport) -> bool {
        if self.last.as_ref() == Some(&report) {
            return true;
        }
        self.last = Some(report.clone());
        self.tx.send(report).await.is_ok()
    }
}

/// Runs the configured source until `cancel`.
pub async fn run(
    dcs: Dcs,
    ctx: SourceContext,
    tx: mpsc::Sender<DcsReport>,
    cancel: CancellationToken,
) {
    let reporter = Reporter::new(tx);
    match dcs {
        Dcs::Etcd(etcd) => etcd::run(etcd, ctx, reporter, cancel).await,
        Dcs::Sentinel(sentinel) => sentinel::run(sentinel, ctx, reporter, cancel).await,
    }
}
