//! Patroni's keys in etcd, watched with the v3 API.
//!
//! Patroni keeps `<namespace>/<scope>/leader` (the leader's member name,
//! attached to a lease that expires when the leader stops renewing it) and
//! `<namespace>/<scope>/members/<name>` (JSON with the member's `conn_url`).
//! The source reads the whole scope once, then watches it from the next
//! revision: a change of the leader key reaches the view as soon as etcd
//! sends the event. The leader key's create revision is the DCS term: it
//! changes exactly when a member acquires the key.

use std::collections::{BTreeMap, HashSet};

use etcd_client::{Client, ConnectOptions, EventType, GetOptions, WatchOptions};
use tokio_util::sync::CancellationToken;

use super::{Reporter, SourceContext, RECONNECT_PAUSE};
use crate::config::{valid_host_port, EtcdDcs};
use crate::probe::KnownAddress;
use crate::roster::{Learned, Origin};
use crate::view::DcsReport;

/// One key of the scope: its value and create revision.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    value: Vec<u8>,
    created: i64,
}

/// The scope's keys, relative to `<prefix>/<scope>/`.
#[derive(Debug, Default)]
struct Scope {
    keys: BTreeMap<String, Entry>,
    /// Facts already checked (and warned about when wrong): Patroni
    /// rewrites its member keys every loop; one check per fact is enough.
    warned: HashSet<String>,
}

impl Scope {
    /// What the keys say: the leader by name (mapped to a member) and the
    /// leader key's create revision.
    fn report(&mut self, ctx: &SourceContext) -> DcsReport {
        let Some(entry) = self.keys.get("leader") else {
            return DcsReport::Named {
                leader: None,
                term: None,
            };
        };
        let name = String::from_utf8_lossy(&entry.value);
        let leader = ctx.roster.id_of(name.trim());
        if leader.is_none() && self.warned.insert(format!("leader {name}")) {
            tracing::warn!(cluster = %ctx.cluster, leader = %name, "the DCS names a leader that is not a known member");
        }
        DcsReport::Named {
            leader,
            term: u64::try_from(entry.created).ok(),
        }
    }

    /// Learns the member a `members/<name>` key describes: its address
    /// from `conn_url`, its REST API from `api_url`. A configured member
    /// keeps its configured address (a disagreement is warned about once).
    async fn learn_member(&mut self, ctx: &SourceContext, key: &str) {
        let Some(name) = key.strip_prefix("members/") else {
            return;
        };
        let Some(entry) = self.keys.get(key) else {
            return;
        };
        let Some(advertised) = MemberDocument::parse(&entry.value) else {
            if self.warned.insert(format!("{key} unreadable")) {
                tracing::warn!(cluster = %ctx.cluster, member = name, "Patroni member key without a readable conn_url; not learned");
            }
            return;
        };
        // Patroni rewrites its member key every loop: resolve only an
        // address the roster will take (a new or moved learned member).
        let current = ctx.roster.id_of(name).and_then(|id| ctx.roster.get(id));
        let kept = current.is_some_and(|m| {
            m.origin == Origin::Config
                || (m.address == advertised.address && m.api == advertised.api)
        });
        let address = if kept {
            KnownAddress::unresolved(&advertised.address)
        } else {
            KnownAddress::lookup(&advertised.address).await
        };
        let learned = ctx.roster.learn(name, address, advertised.api.clone());
        let (address, api) = (advertised.address.as_str(), advertised.api.as_deref());
        match learned {
            Learned::Unchanged(_) => {}
            Learned::Added(id) => {
                tracing::info!(cluster = %ctx.cluster, member = name, id, address, api, "member learned from the DCS")
            }
            Learned::Moved(id) => {
                tracing::info!(cluster = %ctx.cluster, member = name, id, address, api, "the DCS advertises a new address for this member")
            }
            Learned::Configured(id) => {
                let configured = ctx.roster.get(id).map(|m| m.address.clone());
                if configured.as_deref() != Some(address)
                    && self.warned.insert(format!("{key} {address}"))
                {
                    tracing::warn!(cluster = %ctx.cluster, member = name, advertised = address, configured, "Patroni advertises another address than the configured one; the configured one is used");
                }
            }
            Learned::Full => {
                if self.warned.insert(format!("{key} full")) {
                    tracing::warn!(cluster = %ctx.cluster, member = name, advertised = address, slots = ctx.roster.len(), "no member slot left (dcs.etcd.max_members); the portal will not route to this member");
                }
            }
        }
    }
}

/// What a Patroni member key advertises.
#[derive(Debug, PartialEq, Eq)]
struct MemberDocument {
    /// `host:port` from `conn_url` (`postgres://[user@]host:port/dbname`).
    address: String,
    /// `host:port` from `api_url` (`http://host:port/patroni`).
    api: Option<String>,
}

impl MemberDocument {
    fn parse(document: &[u8]) -> Option<MemberDocument> {
        let doc: serde_json::Value = serde_json::from_slice(document).ok()?;
        let authority = |field: &str| -> Option<String> {
            let url = doc.get(field)?.as_str()?;
            let rest = url.split_once("://")?.1;
            let authority = rest.split(['/', '?']).next()?;
            let host_port = authority.rsplit('@').next()?;
            valid_host_port(host_port).then(|| host_port.to_string())
        };
        Some(MemberDocument {
            address: authority("conn_url")?,
            api: authority("api_url"),
        })
    }
}

pub async fn run(
    config: EtcdDcs,
    ctx: SourceContext,
    mut reporter: Reporter,
    cancel: CancellationToken,
) {
    let root = format!("{}/{}/", config.prefix, config.scope);
    loop {
        let error = tokio::select! {
            error = session(&config, &ctx, &root, &mut reporter) => error,
            _ = cancel.cancelled() => return,
        };
        ctx.up.set(0);
        let Some(error) = error else {
            return; // the view is gone
        };
        tracing::warn!(cluster = %ctx.cluster, %error, "etcd DCS unreachable; keeping the leader only while its probes confirm it");
        if !reporter.send(DcsReport::Unreachable { error }).await {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(RECONNECT_PAUSE) => {}
            _ = cancel.cancelled() => return,
        }
    }
}

/// One connection: read the scope, then follow its watch. Returns why it
/// ended, or `None` when the view has gone away.
async fn session(
    config: &EtcdDcs,
    ctx: &SourceContext,
    root: &str,
    reporter: &mut Reporter,
) -> Option<String> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(config.timeout)
        .with_keep_alive(config.timeout, config.timeout)
        .with_keep_alive_while_idle(true);
    if let (Some(user), Some(password)) = (&config.username, &config.password) {
        options = options.with_user(user.clone(), password.expose().to_string());
    }
    let connect = Client::connect(&config.endpoints, Some(options));
    let mut client = match tokio::time::timeout(config.timeout, connect).await {
        Ok(Ok(client)) => client,
        Ok(Err(err)) => return Some(format!("connect: {err}")),
        Err(_) => return Some("connect: timed out".into()),
    };
    let get = client.get(root, Some(GetOptions::new().with_prefix()));
    let response = match tokio::time::timeout(config.timeout, get).await {
        Ok(Ok(response)) => response,
        Ok(Err(err)) => return Some(format!("read {root}: {err}")),
        Err(_) => return Some(format!("read {root}: timed out")),
    };
    let revision = response.header().map_or(0, |h| h.revision());
    let mut scope = Scope::default();
    for kv in response.kvs() {
        if let Some(key) = kv.key_str().ok().and_then(|k| k.strip_prefix(root)) {
            scope.keys.insert(
                key.to_string(),
                Entry {
                    value: kv.value().to_vec(),
                    created: kv.create_revision(),
                },
            );
        }
    }
    let keys: Vec<String> = scope.keys.keys().cloned().collect();
    for key in &keys {
        scope.learn_member(ctx, key).await;
    }
    ctx.up.set(1);
    tracing::info!(cluster = %ctx.cluster, root, revision, "etcd DCS read; watching");
    if !reporter.send(scope.report(ctx)).await {
        return None;
    }

    let watch = client.watch(
        root,
        Some(
            WatchOptions::new()
                .with_prefix()
                .with_start_revision(revision + 1),
        ),
    );
    let mut stream = match tokio::time::timeout(config.timeout, watch).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(err)) => return Some(format!("watch {root}: {err}")),
        Err(_) => return Some(format!("watch {root}: timed out")),
    };
    loop {
        let message = match stream.message().await {
            Ok(Some(message)) => message,
            Ok(None) => return Some("watch stream ended".into()),
            Err(err) => return Some(format!("watch: {err}")),
        };
        if message.canceled() {
            return Some(format!("watch canceled: {}", message.cancel_reason()));
        }
        for event in message.events() {
            let Some(kv) = event.kv() else { continue };
            let Some(key) = kv.key_str().ok().and_then(|k| k.strip_prefix(root)) else {
                continue;
            };
            ctx.events.inc();
            match event.event_type() {
                EventType::Put => {
                    scope.keys.insert(
                        key.to_string(),
                        Entry {
                            value: kv.value().to_vec(),
                            created: kv.create_revision(),
                        },
                    );
                    scope.learn_member(ctx, key).await;
                }
                EventType::Delete => {
                    scope.keys.remove(key);
                }
            }
        }
        if !reporter.send(scope.report(ctx)).await {
            return None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_documents_give_the_database_and_api_addresses() {
        let doc = br#"{"conn_url": "postgres://127.0.0.1:5433/postgres", "api_url": "http://127.0.0.1:8008/patroni", "state": "running"}"#;
        assert_eq!(
            MemberDocument::parse(doc),
            Some(MemberDocument {
                address: "127.0.0.1:5433".into(),
                api: Some("127.0.0.1:8008".into()),
            })
        );
        let with_user = br#"{"conn_url": "postgres://u:p@db1:5432/postgres?sslmode=require"}"#;
        assert_eq!(
            MemberDocument::parse(with_user),
            Some(MemberDocument {
                address: "db1:5432".into(),
                api: None,
            })
        );
        let v6 = br#"{"conn_url": "postgres://[::1]:5432/postgres", "api_url": "https://[::1]:8008/patroni"}"#;
        assert_eq!(
            MemberDocument::parse(v6).map(|d| (d.address, d.api)),
            Some(("[::1]:5432".into(), Some("[::1]:8008".into())))
        );
        assert_eq!(MemberDocument::parse(b"not json"), None);
        assert_eq!(MemberDocument::parse(br#"{"state": "running"}"#), None);
        assert_eq!(
            MemberDocument::parse(br#"{"conn_url": "postgres://no-port/x"}"#),
            None
        );
        assert_eq!(MemberDocument::parse(br#"{"conn_url": 5}"#), None);
    }
}
