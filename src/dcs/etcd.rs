//! Patroni's keys in etcd, watched with the v3 API.
//!
//! Patroni keeps `<namespace>/<scope>/leader` (the leader's member name,
//! attached to a lease that expires when the leader stops renewing it) and
//! `<namespace>/<scope>/members/<name>` (JSON with the member's `conn_url`).
//! The source reads the whole scope once, then watches it from the next
//! revision: a change of the leader key reaches the view as soon as etcd
//! sends the event. The leader key's create revision is the DCS term: it
//! changes when a member acquires the key anew (a plain put over the
//! existing key, as Patroni 3.0.2 does when it retakes the key, keeps it).
//!
//! The source speaks etcd's gRPC API through the generated clients of
//! [`crate::etcd_api`] (KV `Range`, `Watch`, and `Authenticate` when the DCS
//! has credentials) over one tonic channel, connected to one endpoint at a
//! time (the next after a failure), plaintext or TLS (`dcs.etcd.tls`).

use std::collections::{BTreeMap, HashSet};
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;
use tonic::metadata::AsciiMetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint};
use tonic::Status;

use super::{Reporter, SourceContext, RECONNECT_PAUSE};
use crate::backend::{self, Origination};
use crate::config::{valid_host_port, EtcdDcs, PatroniApi};
use crate::etcd_api::etcdserverpb::auth_client::AuthClient;
use crate::etcd_api::etcdserverpb::kv_client::KvClient;
use crate::etcd_api::etcdserverpb::watch_client::WatchClient;
use crate::etcd_api::etcdserverpb::watch_request::RequestUnion;
use crate::etcd_api::etcdserverpb::{
    AuthenticateRequest, RangeRequest, WatchCreateRequest, WatchRequest,
};
use crate::etcd_api::mvccpb::event::EventType;
use crate::probe::KnownAddress;
use crate::roster::{Learned, Origin};
use crate::stream::Stream;
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
        let api = advertised.api.as_ref().map(ToString::to_string);
        let (address, api) = (advertised.address.as_str(), api.as_deref());
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
    /// From `api_url` (`http://host:port/patroni`, or `https://...` for
    /// an agent with `restapi.certfile`).
    api: Option<PatroniApi>,
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
            api: doc
                .get("api_url")
                .and_then(|url| url.as_str())
                .filter(|url| url.contains("://"))
                .and_then(|url| PatroniApi::parse(url, false)),
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
    // Checked when the configuration was loaded; a failure here means the
    // files changed since.
    let tls = config
        .tls
        .as_ref()
        .map(|tls| Origination::with_alpn(tls, &[crate::frontend::etcd::ALPN]))
        .transpose();
    let tls = match tls {
        Ok(tls) => tls,
        Err(err) => {
            let error = format!("dcs.etcd.tls: {err}");
            tracing::error!(cluster = %ctx.cluster, %error, "cannot build the TLS client for the etcd DCS");
            if reporter.send(DcsReport::Unreachable { error }).await {
                cancel.cancelled().await;
            }
            return;
        }
    };
    let dialer = Dialer::new(&config, tls);
    loop {
        let error = tokio::select! {
            error = session(&config, &dialer, &ctx, &root, &mut reporter) => error,
            _ = cancel.cancelled() => return,
        };
        ctx.up.set(0);
        let Some(error) = error else {
            return; // the view is gone
        };
        // The next session starts with the next endpoint.
        let endpoint = dialer.pass();
        tracing::warn!(cluster = %ctx.cluster, %error, endpoint, "etcd DCS unreachable; keeping the leader only while its probes confirm it");
        if !reporter.send(DcsReport::Unreachable { error }).await {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(RECONNECT_PAUSE) => {}
            _ = cancel.cancelled() => return,
        }
    }
}

/// Makes the connections of the sessions' channels: to the endpoints in
/// turn, starting with the one that answered last (or the one after the
/// last that failed), plain h2c or TLS with ALPN `h2` (`dcs.etcd.tls`),
/// through [`backend::connect_direct`] like every connection the portal
/// originates.
#[derive(Clone)]
struct Dialer {
    endpoints: Arc<[String]>,
    next: Arc<AtomicUsize>,
    tls: Option<Origination>,
    timeout: Duration,
}

impl Dialer {
    fn new(config: &EtcdDcs, tls: Option<Origination>) -> Dialer {
        Dialer {
            endpoints: config.endpoints.clone().into(),
            next: Arc::new(AtomicUsize::new(0)),
            tls,
            timeout: config.timeout,
        }
    }

    /// The endpoint tried first.
    fn current(&self) -> &str {
        let n = self.endpoints.len().max(1);
        self.endpoints
            .get(self.next.load(Ordering::Relaxed) % n)
            .map_or("", String::as_str)
    }

    /// Moves on to the next endpoint; returns the one left.
    fn pass(&self) -> String {
        let left = self.current().to_string();
        let n = self.endpoints.len().max(1);
        let next = (self.next.load(Ordering::Relaxed) + 1) % n;
        self.next.store(next, Ordering::Relaxed);
        left
    }

    async fn dial(&self) -> io::Result<Stream> {
        let n = self.endpoints.len();
        let start = self.next.load(Ordering::Relaxed);
        let mut last = None;
        for k in 0..n {
            let i = (start + k) % n;
            let address = &self.endpoints[i];
            // Should this attempt be cut short, the next starts after it.
            self.next.store((i + 1) % n, Ordering::Relaxed);
            match backend::connect_direct(address, self.tls.as_ref(), self.timeout).await {
                Ok(stream) => {
                    self.next.store(i, Ordering::Relaxed);
                    return Ok(stream);
                }
                Err(err) => {
                    tracing::debug!(endpoint = %address, error = %err, "etcd DCS endpoint did not connect");
                    last = Some(io::Error::new(err.kind(), format!("{address}: {err}")));
                }
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("no etcd endpoints")))
    }
}

/// The clients of one session, over one channel.
struct Clients {
    kv: KvClient<InterceptedService<Channel, Token>>,
    watch: WatchClient<InterceptedService<Channel, Token>>,
}

/// Adds etcd's auth token (when the DCS has credentials) to every request,
/// as the `token` metadata etcd reads it from.
#[derive(Clone)]
struct Token(Option<AsciiMetadataValue>);

impl Interceptor for Token {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(token) = &self.0 {
            request.metadata_mut().insert("token", token.clone());
        }
        Ok(request)
    }
}

/// A gRPC status as the session's errors show it.
fn grpc(status: &Status) -> String {
    format!("grpc request error: {status}")
}

/// The shortest time between keepalive pings. etcd closes a client that
/// pings more often than its `--grpc-keepalive-min-time` (5 s by default)
/// with GOAWAY `too_many_pings`: with pings every `timeout` (2 s by
/// default) the watch was cut and re-established every 8 s or so.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// The tonic endpoint of the session's channel (its URI only names the
/// HTTP/2 authority: the [`Dialer`] decides where and how to connect):
/// connect timeout of `timeout`, and HTTP/2 keepalive pings (also while
/// idle, so a silent watch notices a dead member) every
/// [`KEEPALIVE_INTERVAL`] or `timeout`, whichever is longer, each answered
/// within `timeout`.
fn endpoint(address: &str, timeout: Duration) -> Result<Endpoint, String> {
    let endpoint = Endpoint::from_shared(format!("http://{address}"))
        .map_err(|err| format!("invalid uri: {err}"))?;
    Ok(endpoint
        .connect_timeout(timeout)
        .http2_keep_alive_interval(timeout.max(KEEPALIVE_INTERVAL))
        .keep_alive_timeout(timeout)
        .keep_alive_while_idle(true))
}

/// The clients of one session: one channel, connected lazily by the
/// dialer (a request on a connection that fails fails, and the session
/// starts over with the next endpoint), authenticated when the DCS has
/// credentials.
async fn connect(config: &EtcdDcs, dialer: &Dialer) -> Result<Clients, String> {
    let first = config.endpoints.first().ok_or("no endpoints")?;
    let connector = {
        let dialer = dialer.clone();
        tower::service_fn(move |_: tonic::codegen::http::Uri| {
            let dialer = dialer.clone();
            async move { dialer.dial().await.map(TokioIo::new) }
        })
    };
    let channel = endpoint(first, config.timeout)?.connect_with_connector_lazy(connector);
    let token = match (&config.username, &config.password) {
        (Some(user), Some(password)) => {
            let request = AuthenticateRequest {
                name: user.clone(),
                password: password.expose().to_string(),
            };
            let response = AuthClient::new(channel.clone())
                .authenticate(request)
                .await
                .map_err(|status| grpc(&status))?;
            let token = AsciiMetadataValue::try_from(response.into_inner().token)
                .map_err(|err| format!("invalid metadata value: {err}"))?;
            Some(token)
        }
        _ => None,
    };
    let token = Token(token);
    Ok(Clients {
        kv: KvClient::with_interceptor(channel.clone(), token.clone()),
        watch: WatchClient::with_interceptor(channel, token),
    })
}

/// The end of the key range that holds every key starting with `prefix`
/// (etcd's `WithPrefix`): the prefix with its last byte below 0xff
/// incremented and what follows dropped. A prefix of only 0xff bytes (or
/// none) has no such key: `[0]`, which etcd reads as "to the end".
fn prefix_range_end(prefix: &[u8]) -> Vec<u8> {
    match prefix.iter().rposition(|&b| b < 0xff) {
        Some(last) => {
            let mut end = prefix[..=last].to_vec();
            end[last] += 1;
            end
        }
        None => vec![0],
    }
}

/// One connection: read the scope, then follow its watch. Returns why it
/// ended, or `None` when the view has gone away.
async fn session(
    config: &EtcdDcs,
    dialer: &Dialer,
    ctx: &SourceContext,
    root: &str,
    reporter: &mut Reporter,
) -> Option<String> {
    let mut clients = match tokio::time::timeout(config.timeout, connect(config, dialer)).await {
        Ok(Ok(clients)) => clients,
        Ok(Err(err)) => return Some(format!("connect: {err}")),
        Err(_) => return Some("connect: timed out".into()),
    };
    let range_end = prefix_range_end(root.as_bytes());
    let get = clients.kv.range(RangeRequest {
        key: root.as_bytes().to_vec(),
        range_end: range_end.clone(),
        ..RangeRequest::default()
    });
    let response = match tokio::time::timeout(config.timeout, get).await {
        Ok(Ok(response)) => response.into_inner(),
        Ok(Err(status)) => return Some(format!("read {root}: {}", grpc(&status))),
        Err(_) => return Some(format!("read {root}: timed out")),
    };
    let revision = response.header.as_ref().map_or(0, |h| h.revision);
    let mut scope = Scope::default();
    for kv in response.kvs {
        if let Some(key) = relative_key(&kv.key, root) {
            scope.keys.insert(
                key.to_string(),
                Entry {
                    value: kv.value,
                    created: kv.create_revision,
                },
            );
        }
    }
    let keys: Vec<String> = scope.keys.keys().cloned().collect();
    for key in &keys {
        scope.learn_member(ctx, key).await;
    }
    ctx.up.set(1);
    tracing::info!(cluster = %ctx.cluster, root, revision, endpoint = dialer.current(), tls = dialer.tls.is_some(), "etcd DCS read; watching");
    if !reporter.send(scope.report(ctx)).await {
        return None;
    }

    let create = WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key: root.as_bytes().to_vec(),
            range_end,
            start_revision: revision + 1,
            ..WatchCreateRequest::default()
        })),
    };
    // The request stream stays open for the life of the watch: etcd ties
    // the watcher to it.
    let requests =
        futures_util::stream::once(async move { create }).chain(futures_util::stream::pending());
    let watch = clients.watch.watch(requests);
    let mut stream = match tokio::time::timeout(config.timeout, watch).await {
        Ok(Ok(stream)) => stream.into_inner(),
        Ok(Err(status)) => return Some(format!("watch {root}: {}", grpc(&status))),
        Err(_) => return Some(format!("watch {root}: timed out")),
    };
    loop {
        let message = match stream.message().await {
            Ok(Some(message)) => message,
            Ok(None) => return Some("watch stream ended".into()),
            Err(status) => return Some(format!("watch: {}", grpc(&status))),
        };
        if message.canceled {
            // Also a start revision already compacted away: the next
            // session reads the scope afresh.
            return Some(format!("watch canceled: {}", message.cancel_reason));
        }
        for event in message.events {
            let Some(kv) = event.kv else { continue };
            let Some(key) = relative_key(&kv.key, root) else {
                continue;
            };
            ctx.events.inc();
            match EventType::try_from(event.r#type) {
                Ok(EventType::Put) => {
                    scope.keys.insert(
                        key.to_string(),
                        Entry {
                            value: kv.value,
                            created: kv.create_revision,
                        },
                    );
                    scope.learn_member(ctx, key).await;
                }
                Ok(EventType::Delete) => {
                    scope.keys.remove(key);
                }
                Err(_) => {
                    tracing::debug!(cluster = %ctx.cluster, key, event_type = event.r#type, "watch event of an unknown type; ignored");
                }
            }
        }
        if !reporter.send(scope.report(ctx)).await {
            return None;
        }
    }
}

/// A key of the scope relative to `root`; `None` for a key outside it or
/// not UTF-8.
fn relative_key<'k>(key: &'k [u8], root: &str) -> Option<&'k str> {
    std::str::from_utf8(key).ok()?.strip_prefix(root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_range_ends_after_its_last_key() {
        assert_eq!(
            prefix_range_end(b"/service/main/"),
            b"/service/main0".to_vec()
        );
        assert_eq!(prefix_range_end(b"a"), b"b".to_vec());
        assert_eq!(prefix_range_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_range_end(b"a\xfe\xff\xff"), b"a\xff".to_vec());
        assert_eq!(prefix_range_end(b"\xff\xff"), vec![0]);
        assert_eq!(prefix_range_end(b""), vec![0]);
    }

    #[test]
    fn endpoints_name_the_authority() {
        let timeout = Duration::from_secs(2);
        let uri = |address: &str| endpoint(address, timeout).map(|e| e.uri().to_string());
        assert_eq!(uri("127.0.0.1:2379"), Ok("http://127.0.0.1:2379/".into()));
        assert_eq!(uri("[::1]:2379"), Ok("http://[::1]:2379/".into()));
        assert_eq!(uri("etcd1:2379"), Ok("http://etcd1:2379/".into()));
        assert!(uri("not a uri").is_err());
    }

    #[tokio::test]
    async fn the_dialer_starts_where_it_last_connected_and_moves_on_after_a_failure() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let open = listener.local_addr().expect("address").to_string();
        let closed = {
            let gone = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            gone.local_addr().expect("address").to_string()
        };
        let config = EtcdDcs {
            endpoints: vec![closed.clone(), open.clone()],
            prefix: "/service".into(),
            scope: "main".into(),
            username: None,
            password: None,
            timeout: Duration::from_secs(1),
            max_members: 4,
            tls: None,
        };
        let dialer = Dialer::new(&config, None);
        assert_eq!(dialer.current(), closed);
        // The refused endpoint is skipped, the open one kept for next time.
        dialer.dial().await.expect("the second endpoint answers");
        assert_eq!(dialer.current(), open);
        dialer.dial().await.expect("again");
        assert_eq!(dialer.current(), open);
        // A failed session moves on (and round).
        assert_eq!(dialer.pass(), open);
        assert_eq!(dialer.current(), closed);
        drop(listener);
        let Err(err) = dialer.dial().await else {
            panic!("nothing listens, yet the dialer connected");
        };
        assert!(
            err.to_string().contains(&closed) || err.to_string().contains(&open),
            "{err}"
        );
    }

    #[test]
    fn keys_outside_the_scope_are_not_its_keys() {
        let root = "/service/main/";
        assert_eq!(relative_key(b"/service/main/leader", root), Some("leader"));
        assert_eq!(relative_key(b"/service/mainx/leader", root), None);
        assert_eq!(relative_key(b"/service/main/\xff", root), None);
    }

    #[test]
    fn member_documents_give_the_database_and_api_addresses() {
        let doc = br#"{"conn_url": "postgres://127.0.0.1:5433/postgres", "api_url": "http://127.0.0.1:8008/patroni", "state": "running"}"#;
        assert_eq!(
            MemberDocument::parse(doc),
            Some(MemberDocument {
                address: "127.0.0.1:5433".into(),
                api: Some(PatroniApi {
                    address: "127.0.0.1:8008".into(),
                    https: false
                }),
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
            Some((
                "[::1]:5432".into(),
                Some(PatroniApi {
                    address: "[::1]:8008".into(),
                    https: true
                })
            ))
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
