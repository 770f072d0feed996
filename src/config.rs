//! The configuration: a YAML file parsed into a typed tree and validated once.
//!
//! Parsing uses `serde-saphyr` (a maintained, panic-free YAML deserializer; see
//! the README for why not `serde_yaml`) wrapped in `serde_path_to_error`, so a
//! syntax or type error names the file, the line and the key. Checks that serde
//! cannot express (unique names, addresses that parse, certificate files that
//! exist) run afterwards on values that kept their source location.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_saphyr::Spanned;

/// A configuration error: where it is and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}:{line}:{column}: key `{key}`: {message}")]
    Invalid {
        file: String,
        line: u32,
        column: u32,
        key: String,
        message: String,
    },
}

/// The validated configuration of one portal process.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub file: PathBuf,
    pub admin: Admin,
    pub shutdown: ShutdownSettings,
    /// How many threads run the data path (`data_threads`); `None`: one
    /// per CPU. Read at start only.
    pub data_threads: Option<usize>,
    pub clusters: Vec<Cluster>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Admin {
    pub listen: SocketAddr,
    /// Bearer token that the operator actions (`POST /clusters/...`) and
    /// the peer exchange (`/peer/terms`) require. Without one, both are
    /// refused.
    pub token: Option<Secret>,
    /// The admin addresses of the other portals of the same clusters: each
    /// is asked for the terms it proved (view rule 4).
    pub peers: Vec<String>,
    /// How often each peer is asked.
    pub peer_interval: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ShutdownSettings {
    /// How long sessions may keep running after a stop signal.
    pub drain_timeout: Duration,
    /// After a stop signal, how long `/ready` answers 503 while the
    /// listeners still accept, before they close (a load balancer in front
    /// deregisters the portal meanwhile).
    pub ready_delay: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Redis,
    Postgres,
    Etcd,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Protocol::Redis => f.write_str("redis"),
            Protocol::Postgres => f.write_str("postgres"),
            Protocol::Etcd => f.write_str("etcd"),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Cluster {
    pub name: String,
    pub protocol: Protocol,
    pub probe: ProbeSettings,
    /// Originate TLS to the members, verifying them with this CA.
    pub backend_tls: Option<ClientTls>,
    pub members: Vec<Member>,
    pub endpoints: Vec<Endpoint>,
    /// Where the leader is named, when not by the probes alone.
    pub dcs: Option<Dcs>,
}

impl Cluster {
    /// The files of every TLS client setting towards the member side
    /// (`backend_tls`, the DCS's `tls`, `probe.api_tls`): CAs, then client
    /// certificates and keys.
    pub fn member_tls_files(&self) -> Vec<&std::path::Path> {
        let dcs = match &self.dcs {
            Some(Dcs::Etcd(etcd)) => etcd.tls.as_ref(),
            Some(Dcs::Sentinel(sentinel)) => sentinel.tls.as_ref(),
            None => None,
        };
        [self.backend_tls.as_ref(), dcs, self.probe.api_tls.as_ref()]
            .into_iter()
            .flatten()
            .flat_map(|tls| {
                let identity = tls
                    .identity
                    .iter()
                    .flat_map(|i| [i.cert.as_path(), i.key.as_path()]);
                std::iter::once(tls.ca.as_path()).chain(identity)
            })
            .collect()
    }

    /// How many members the cluster can hold at run time: the configured
    /// ones, or more when an etcd DCS may name others.
    pub fn member_slots(&self) -> usize {
        match &self.dcs {
            Some(Dcs::Etcd(etcd)) => etcd.max_members.max(self.members.len()),
            _ => self.members.len(),
        }
    }
}

/// A distributed configuration store that names the leader.
#[derive(Debug, Clone, PartialEq)]
pub enum Dcs {
    Etcd(EtcdDcs),
    Sentinel(SentinelDcs),
}

/// Patroni's keys in etcd (v3 API): `<prefix>/<scope>/leader` holds the
/// leader's member name.
#[derive(Debug, Clone, PartialEq)]
pub struct EtcdDcs {
    pub endpoints: Vec<String>,
    /// Patroni's `namespace`, without a trailing slash.
    pub prefix: String,
    pub scope: String,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub timeout: Duration,
    /// How many members the cluster may hold in all: the configured ones
    /// plus those learned from Patroni's `members/` keys.
    pub max_members: usize,
    /// TLS to etcd (ALPN `h2`); plaintext HTTP/2 without it.
    pub tls: Option<ClientTls>,
}

/// Redis Sentinel: the master of `master_name`.
#[derive(Debug, Clone, PartialEq)]
pub struct SentinelDcs {
    pub addresses: Vec<String>,
    pub master_name: String,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub timeout: Duration,
    /// TLS to the Sentinels; plaintext without it.
    pub tls: Option<ClientTls>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ProbeSettings {
    pub interval: Duration,
    /// Probe period while the cluster has no leader.
    pub fast_interval: Duration,
    pub timeout: Duration,
    /// How long a probe keeps one connection before opening a fresh one
    /// (and so verifying the member's certificate again); zero keeps it
    /// until it drops.
    pub reconnect_interval: Duration,
    pub rise: u32,
    pub fall: u32,
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// PostgreSQL: the database the probe connects to.
    pub dbname: String,
    /// How members are asked what they are.
    pub check: Check,
    /// `check: patroni`: TLS to the members' Patroni REST API, for every
    /// `api` that is HTTPS.
    pub api_tls: Option<ClientTls>,
}

/// What a probe asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Check {
    /// The member's own protocol (Redis `ROLE`, PostgreSQL queries).
    #[default]
    Native,
    /// PostgreSQL under Patroni: `GET /patroni` on each member's `api`.
    Patroni,
}

/// TLS the portal originates: to the members (`backend_tls`), to a DCS
/// (`dcs.etcd.tls`, `dcs.sentinel.tls`) or to Patroni's REST API
/// (`probe.api_tls`). The same keys everywhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTls {
    /// PEM CA bundle the server's certificate must chain to; nothing else
    /// is trusted.
    pub ca: PathBuf,
    /// Name to verify instead of the host of the address dialled.
    pub server_name: Option<String>,
    /// The portal's own certificate chain and key, for servers that ask
    /// for a client certificate.
    pub identity: Option<Identity>,
}

/// A certificate chain and its private key, PEM: what the portal presents
/// as a TLS client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Where a member's Patroni REST API answers, and whether over HTTPS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatroniApi {
    /// `host:port`.
    pub address: String,
    /// HTTPS, verified with `probe.api_tls`; plain HTTP otherwise.
    pub https: bool,
}

impl PatroniApi {
    /// `host:port`, `http://host:port` or `https://host:port` (a path after
    /// the address, as in Patroni's `api_url`, is ignored); a bare
    /// `host:port` is HTTPS when `https_by_default`.
    pub fn parse(text: &str, https_by_default: bool) -> Option<PatroniApi> {
        let (https, rest) = match text.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("https") => (true, rest),
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => (false, rest),
            Some(_) => return None,
            None => (https_by_default, text),
        };
        let authority = rest.split(['/', '?']).next()?;
        let address = authority.rsplit('@').next()?;
        valid_host_port(address).then(|| PatroniApi {
            address: address.to_string(),
            https,
        })
    }
}

/// `host:port` for HTTP, `https://host:port` for HTTPS (as `/status` shows it).
impl fmt::Display for PatroniApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.https {
            write!(f, "https://{}", self.address)
        } else {
            f.write_str(&self.address)
        }
    }
}

impl serde::Serialize for PatroniApi {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// How far behind the leader a replica may be and still take reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MaxLag {
    pub bytes: Option<u64>,
    pub duration: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplicaFallback {
    /// Send reads to the leader when no replica qualifies.
    #[default]
    Leader,
    /// Hold, then refuse, when no replica qualifies.
    Refuse,
}

/// A credential. Its `Debug` output never shows the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub name: String,
    /// `host:port`; resolved at connect time so DNS names follow changes.
    pub address: String,
    /// Patroni's REST API (set exactly when `probe.check` is `patroni`).
    pub api: Option<PatroniApi>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Route {
    Leader,
    Replicas,
    Any,
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Route::Leader => "leader",
            Route::Replicas => "replicas",
            Route::Any => "any",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    #[default]
    RoundRobin,
    LeastConnections,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnLeaderChange {
    #[default]
    Close,
    Keep,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    pub name: String,
    pub listen: SocketAddr,
    pub route: Route,
    pub balance: Balance,
    pub tls: TlsFiles,
    pub hold_timeout: Duration,
    pub handshake_timeout: Duration,
    /// Established sessions at once.
    pub max_connections: usize,
    /// Established sessions at once from one client address; no limit
    /// when absent.
    pub max_connections_per_source: Option<usize>,
    /// Connections in their opening (TLS handshake and the protocol's first
    /// read) at once, and from one client address.
    pub max_handshakes: usize,
    pub max_handshakes_per_source: usize,
    /// A session with no byte either way for this long is closed; never
    /// when absent.
    pub idle_timeout: Option<Duration>,
    /// One INFO line per finished session (target `portal::access`).
    pub access_log: bool,
    pub on_leader_change: OnLeaderChange,
    /// PostgreSQL: accept clients that do not ask for TLS.
    pub allow_plaintext: bool,
    pub max_lag: MaxLag,
    pub replica_fallback: ReplicaFallback,
    /// Connections from these networks start with a PROXY protocol header
    /// naming the client; none when absent.
    pub proxy_protocol: Option<ProxyProtocol>,
}

/// The endpoint's TLS identity (certificate chain and private key files,
/// PEM) and, when `client_ca` is set, the CAs that sign the client
/// certificates it asks for. Everything [`crate::tls::server_config`]
/// reads, so that a reload re-reads all of it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// PEM file of the CAs client certificates must chain to; no client
    /// certificate is asked for when absent.
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: whether a client without a certificate may still
    /// connect (a certificate it does present must be valid either way).
    pub client_auth: ClientAuth,
}

/// Whether clients must present a certificate (`tls.client_auth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// No certificate signed by `client_ca`, no connection.
    #[default]
    Required,
    /// Clients without a certificate connect too; one that presents a
    /// certificate must present a valid one.
    Optional,
}

/// PROXY protocol (v1 or v2) in front of an endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyProtocol {
    /// Balancers whose connections must start with a header; every other
    /// source is a direct client.
    pub trusted: Vec<Cidr>,
}

impl ProxyProtocol {
    /// Whether connections from `ip` must start with a header.
    pub fn trusts(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.trusted.iter().any(|net| net.contains(ip))
    }
}

/// An IP network: an address and a prefix length (`10.0.0.0/8`,
/// `2001:db8::/32`; a bare address is the one host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `ADDRESS/PREFIX` or `ADDRESS`. Host bits must be zero (a
    /// typo such as `10.0.0.1/8` is an error, not a surprise), and an
    /// IPv4-mapped IPv6 network is the IPv4 network it maps.
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let network: IpAddr = address.trim().parse().map_err(|_| {
            format!("{text:?} is not an IP network (write 10.0.0.0/8, 192.0.2.7 or 2001:db8::/32)")
        })?;
        let bits = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => bits,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= bits)
                .ok_or_else(|| format!("{text:?}: the prefix length must be 0 to {bits}"))?,
        };
        let (network, prefix) = match network {
            IpAddr::V6(v6) if prefix >= 96 => match v6.to_ipv4_mapped() {
                Some(v4) => (IpAddr::V4(v4), prefix - 96),
                None => (network, prefix),
            },
            _ => (network, prefix),
        };
        let cidr = Cidr { network, prefix };
        if cidr.masked(network) != network {
            return Err(format!(
                "{text:?} has bits set past its prefix length; write {}/{prefix}",
                cidr.masked(network)
            ));
        }
        Ok(cidr)
    }

    /// `ip` with the bits past the prefix cleared.
    fn masked(&self, ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(v4) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V4((u32::from(v4) & mask).into())
            }
            IpAddr::V6(v6) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V6((u128::from(v6) & mask).into())
            }
        }
    }

    /// Whether `ip` is in this network (an IPv4 address is never in an
    /// IPv6 network, nor the other way round).
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.network.is_ipv4() && self.masked(ip) == self.network
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl Config {
    /// File descriptors the endpoints may use at their limits: two per
    /// session (client and member), one per connection in its opening,
    /// and a margin for listeners, probes, the DCS and the admin side.
    pub fn descriptors_needed(&self) -> u64 {
        let endpoints: u64 = self
            .clusters
            .iter()
            .flat_map(|c| &c.endpoints)
            .map(|e| 2 * e.max_connections as u64 + e.max_handshakes as u64)
            .sum();
        // Each data thread: its runtime's epoll and wakeup descriptors, and
        // a copy of every endpoint's listening socket.
        let listeners = self
            .clusters
            .iter()
            .map(|c| c.endpoints.len() as u64)
            .sum::<u64>();
        let threads = crate::data_threads::DataThreads::count(self.data_threads) as u64;
        endpoints + threads * (2 + listeners) + 256
    }

    /// Reads, parses and validates `file`.
    pub fn load(file: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
            file: file.display().to_string(),
            source,
        })?;
        Config::parse(file, &text)
    }

    /// Parses and validates `text`, naming `file` in errors and resolving
    /// relative paths against its directory.
    pub fn parse(file: &Path, text: &str) -> Result<Config, ConfigError> {
        let raw = parse_raw(file, text)?;
        let base = file
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        Validator { file, base: &base }.validate(raw)
    }

    pub fn endpoint_count(&self) -> usize {
        self.clusters.iter().map(|c| c.endpoints.len()).sum()
    }
}

fn parse_raw(file: &Path, text: &str) -> Result<RawConfig, ConfigError> {
    let mut path = String::new();
    let options = serde_saphyr::options! { with_snippet: false };
    let parsed = serde_saphyr::with_deserializer_from_str_with_options(text, options, |de| {
        serde_path_to_error::deserialize::<_, RawConfig>(de).map_err(|err| {
            // `Spanned` fields show up as a `.value` step; hide it.
            path = err.path().to_string().replace(".value", "");
            err.into_inner()
        })
    });
    parsed.map_err(|err| {
        let (line, column) = err
            .location()
            .map(|l| (l.line() as u32, l.column() as u32))
            .unwrap_or((0, 0));
        ConfigError::Invalid {
            file: file.display().to_string(),
            line,
            column,
            key: if path.is_empty() || path == "." {
                "(top level)".to_string()
            } else {
                path
            },
            message: bare_message(&err.to_string()),
        }
    })
}

/// serde-saphyr prefixes its messages with "error: line N column M: ";
/// the location is reported in our own format, so strip it.
fn bare_message(text: &str) -> String {
    let first = text.lines().next().unwrap_or(text);
    let first = first.strip_prefix("error: ").unwrap_or(first);
    let message = match first.find(": ") {
        Some(at) if first.starts_with("line ") => &first[at + 2..],
        _ => first,
    };
    // Some messages also end with " at line N, column M".
    match message.rfind(" at line ") {
        Some(at) if message[at..].contains(", column ") => message[..at].to_string(),
        _ => message.to_string(),
    }
}

/// More data threads than this is a typo, not a machine.
const MAX_DATA_THREADS: u32 = 1024;

// ---- the raw, serde-facing tree -------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    admin: RawAdmin,
    certs_dir: Option<Spanned<String>>,
    #[serde(default)]
    shutdown: RawShutdown,
    data_threads: Option<Spanned<u32>>,
    clusters: Vec<RawCluster>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    #[serde(default = "default_admin_listen")]
    listen: Spanned<String>,
    token_file: Option<Spanned<String>>,
    token_env: Option<Spanned<String>>,
    #[serde(default)]
    peers: Vec<Spanned<String>>,
    #[serde(default = "default_peer_interval", deserialize_with = "de_duration")]
    peer_interval: Duration,
}

impl Default for RawAdmin {
    fn default() -> Self {
        RawAdmin {
            listen: default_admin_listen(),
            token_file: None,
            token_env: None,
            peers: Vec::new(),
            peer_interval: default_peer_interval(),
        }
    }
}

fn default_peer_interval() -> Duration {
    Duration::from_millis(200)
}

fn default_admin_listen() -> Spanned<String> {
    unspanned("127.0.0.1:9090".to_string())
}

fn unspanned<T>(value: T) -> Spanned<T> {
    Spanned {
        value,
        referenced: serde_saphyr::Location::UNKNOWN,
        defined: serde_saphyr::Location::UNKNOWN,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShutdown {
    #[serde(default = "default_drain", deserialize_with = "de_duration")]
    drain_timeout: Duration,
    #[serde(default, deserialize_with = "de_duration_or_zero")]
    ready_delay: Duration,
}

impl Default for RawShutdown {
    fn default() -> Self {
        RawShutdown {
            drain_timeout: default_drain(),
            ready_delay: Duration::ZERO,
        }
    }
}

fn default_drain() -> Duration {
    Duration::from_secs(10)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    name: Spanned<String>,
    protocol: Protocol,
    #[serde(default)]
    probe: RawProbe,
    backend_tls: Option<Spanned<RawClientTls>>,
    members: Option<Spanned<Vec<RawMember>>>,
    endpoints: Vec<RawEndpoint>,
    dcs: Option<Spanned<RawDcs>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDcs {
    etcd: Option<RawDcsEtcd>,
    sentinel: Option<RawDcsSentinel>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDcsEtcd {
    endpoints: Spanned<Vec<String>>,
    #[serde(default = "default_dcs_prefix")]
    prefix: Spanned<String>,
    scope: Spanned<String>,
    username: Option<String>,
    password_file: Option<Spanned<String>>,
    password_env: Option<Spanned<String>>,
    #[serde(default = "default_dcs_timeout", deserialize_with = "de_duration")]
    timeout: Duration,
    #[serde(default = "default_max_members")]
    max_members: Spanned<usize>,
    tls: Option<Spanned<RawClientTls>>,
}

fn default_max_members() -> Spanned<usize> {
    unspanned(16)
}

/// More slots than this would only mean a typo: every slot is a probe task
/// and a set of metric series.
const MAX_MEMBERS_LIMIT: usize = 64;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDcsSentinel {
    addresses: Spanned<Vec<String>>,
    master_name: Spanned<String>,
    username: Option<String>,
    password_file: Option<Spanned<String>>,
    password_env: Option<Spanned<String>>,
    #[serde(default = "default_dcs_timeout", deserialize_with = "de_duration")]
    timeout: Duration,
    tls: Option<Spanned<RawClientTls>>,
}

fn default_dcs_prefix() -> Spanned<String> {
    unspanned("/service".to_string())
}

fn default_dcs_timeout() -> Duration {
    Duration::from_secs(2)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProbe {
    #[serde(default = "default_interval", deserialize_with = "de_duration")]
    interval: Duration,
    #[serde(default = "default_fast_interval", deserialize_with = "de_duration")]
    fast_interval: Duration,
    #[serde(default = "default_probe_timeout", deserialize_with = "de_duration")]
    timeout: Duration,
    #[serde(
        default = "default_reconnect_interval",
        deserialize_with = "de_duration_or_zero"
    )]
    reconnect_interval: Duration,
    #[serde(default = "default_rise")]
    rise: Spanned<u32>,
    #[serde(default = "default_rise")]
    fall: Spanned<u32>,
    username: Option<String>,
    password_file: Option<Spanned<String>>,
    password_env: Option<Spanned<String>>,
    #[serde(default = "default_dbname")]
    dbname: String,
    check: Option<Spanned<Check>>,
    api_tls: Option<Spanned<RawClientTls>>,
}

fn default_dbname() -> String {
    "postgres".to_string()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClientTls {
    ca: Spanned<String>,
    server_name: Option<Spanned<String>>,
    cert: Option<Spanned<String>>,
    key: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMaxLag {
    bytes: Option<u64>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    duration: Option<Duration>,
}

impl Default for RawProbe {
    fn default() -> Self {
        RawProbe {
            interval: default_interval(),
            fast_interval: default_fast_interval(),
            timeout: default_probe_timeout(),
            reconnect_interval: default_reconnect_interval(),
            rise: default_rise(),
            fall: default_rise(),
            username: None,
            password_file: None,
            password_env: None,
            dbname: default_dbname(),
            check: None,
            api_tls: None,
        }
    }
}

fn default_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_fast_interval() -> Duration {
    Duration::from_millis(50)
}
fn default_probe_timeout() -> Duration {
    Duration::from_millis(500)
}
fn default_reconnect_interval() -> Duration {
    Duration::from_secs(30)
}
fn default_rise() -> Spanned<u32> {
    unspanned(2)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMember {
    name: Spanned<String>,
    address: Spanned<String>,
    api: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEndpoint {
    name: Spanned<String>,
    listen: Spanned<String>,
    route: Route,
    #[serde(default)]
    balance: Balance,
    tls: Spanned<RawTls>,
    #[serde(default = "default_hold", deserialize_with = "de_duration")]
    hold_timeout: Duration,
    #[serde(default = "default_handshake", deserialize_with = "de_duration")]
    handshake_timeout: Duration,
    #[serde(default = "default_max_connections")]
    max_connections: Spanned<usize>,
    max_connections_per_source: Option<Spanned<usize>>,
    #[serde(default = "default_max_handshakes")]
    max_handshakes: Spanned<usize>,
    #[serde(default = "default_max_handshakes_per_source")]
    max_handshakes_per_source: Spanned<usize>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    idle_timeout: Option<Duration>,
    #[serde(default = "default_false")]
    access_log: Spanned<bool>,
    #[serde(default)]
    on_leader_change: OnLeaderChange,
    #[serde(default = "default_false")]
    allow_plaintext: Spanned<bool>,
    max_lag: Option<Spanned<RawMaxLag>>,
    #[serde(default)]
    replica_fallback: ReplicaFallback,
    proxy_protocol: Option<Spanned<RawProxyProtocol>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProxyProtocol {
    trusted: Vec<Spanned<String>>,
}

fn default_false() -> Spanned<bool> {
    unspanned(false)
}

fn default_hold() -> Duration {
    Duration::from_secs(3)
}
fn default_handshake() -> Duration {
    Duration::from_secs(5)
}
fn default_max_connections() -> Spanned<usize> {
    unspanned(10_000)
}
fn default_max_handshakes() -> Spanned<usize> {
    unspanned(1_024)
}
fn default_max_handshakes_per_source() -> Spanned<usize> {
    unspanned(256)
}

/// `tls: auto` or `tls: {cert: PATH, key: PATH, client_ca: PATH,
/// client_auth: required|optional}` (`cert` and `key` both, or neither for
/// `certs_dir`'s, as `auto`).
enum RawTls {
    Auto,
    Files(Box<RawTlsFiles>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTlsFiles {
    cert: Option<Spanned<String>>,
    key: Option<Spanned<String>>,
    client_ca: Option<Spanned<String>>,
    client_auth: Option<Spanned<ClientAuth>>,
}

impl<'de> Deserialize<'de> for RawTls {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TlsVisitor;
        impl<'de> Visitor<'de> for TlsVisitor {
            type Value = RawTls;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "`auto` or a map with `cert` and `key` (and `client_ca`, `client_auth`)",
                )
            }
            fn visit_str<E: de::Error>(self, value: &str) -> Result<RawTls, E> {
                if value == "auto" {
                    Ok(RawTls::Auto)
                } else {
                    Err(E::invalid_value(de::Unexpected::Str(value), &self))
                }
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawTls, A::Error> {
                let files = RawTlsFiles::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(RawTls::Files(Box::new(files)))
            }
        }
        deserializer.deserialize_any(TlsVisitor)
    }
}

fn de_opt_duration<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Duration>, D::Error> {
    de_duration(deserializer).map(Some)
}

fn de_duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let duration = de_duration_or_zero(deserializer)?;
    if duration.is_zero() {
        return Err(de::Error::custom("a duration must be greater than zero"));
    }
    Ok(duration)
}

/// A duration where `0s` means "none".
fn de_duration_or_zero<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    humantime::parse_duration(&text).map_err(|err| {
        de::Error::custom(format!(
            "invalid duration {text:?} ({err}); write it like 500ms, 3s or 1m"
        ))
    })
}

// ---- validation -----------------------------------------------------------

struct Validator<'a> {
    file: &'a Path,
    base: &'a Path,
}

impl Validator<'_> {
    fn error<T>(
        &self,
        at: &Spanned<T>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.display().to_string(),
            line: at.referenced.line() as u32,
            column: at.referenced.column() as u32,
            key: key.into(),
            message: message.into(),
        }
    }

    fn resolve(&self, path: &str) -> PathBuf {
        let path = Path::new(path);
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.base.join(path)
        }
    }

    fn validate(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let admin_listen: SocketAddr = raw.admin.listen.value.parse().map_err(|_| {
            self.error(
                &raw.admin.listen,
                "admin.listen",
                format!("{:?} is not an ip:port address", raw.admin.listen.value),
            )
        })?;

        let data_threads = match &raw.data_threads {
            None => None,
            Some(n) if (1..=MAX_DATA_THREADS).contains(&n.value) => Some(n.value as usize),
            Some(n) => {
                return Err(self.error(
                    n,
                    "data_threads",
                    format!("must be between 1 and {MAX_DATA_THREADS}"),
                ))
            }
        };

        if raw.clusters.is_empty() {
            return Err(ConfigError::Invalid {
                file: self.file.display().to_string(),
                line: 0,
                column: 0,
                key: "clusters".into(),
                message: "at least one cluster is required".into(),
            });
        }

        let mut cluster_names = HashSet::new();
        let mut endpoint_names = HashSet::new();
        let mut listens = HashSet::from([admin_listen]);
        let mut clusters = Vec::with_capacity(raw.clusters.len());
        for (ci, rc) in raw.clusters.into_iter().enumerate() {
            let at = format!("clusters[{ci}]");
            if rc.name.value.is_empty() || !cluster_names.insert(rc.name.value.clone()) {
                return Err(self.error(
                    &rc.name,
                    format!("{at}.name"),
                    format!("cluster name {:?} is empty or used twice", rc.name.value),
                ));
            }
            if let Some(check) = &rc.probe.check {
                if check.value == Check::Patroni && rc.protocol != Protocol::Postgres {
                    return Err(self.error(
                        check,
                        format!("{at}.probe.check"),
                        "`check: patroni` applies to `protocol: postgres` clusters",
                    ));
                }
            }
            let probe = self.probe(&at, rc.probe)?;

            let learns_members = rc
                .dcs
                .as_ref()
                .is_some_and(|d| d.value.etcd.is_some() && d.value.sentinel.is_none());
            let raw_members = rc.members.as_ref().map_or(&[][..], |m| &m.value[..]);
            if raw_members.is_empty() && !learns_members {
                let message = "at least one member is required (or an etcd DCS to learn them from)";
                return Err(match &rc.members {
                    Some(members) => self.error(members, format!("{at}.members"), message),
                    None => self.error(&rc.name, format!("{at}.members"), message),
                });
            }
            let mut member_names = HashSet::new();
            let mut addresses = HashSet::new();
            let mut members = Vec::new();
            for (mi, m) in raw_members.iter().enumerate() {
                let mat = format!("{at}.members[{mi}]");
                if m.name.value.is_empty() || !member_names.insert(m.name.value.clone()) {
                    return Err(self.error(
                        &m.name,
                        format!("{mat}.name"),
                        format!(
                            "member name {:?} is empty or used twice in this cluster",
                            m.name.value
                        ),
                    ));
                }
                if !valid_host_port(&m.address.value) {
                    return Err(self.error(
                        &m.address,
                        format!("{mat}.address"),
                        format!("{:?} is not host:port", m.address.value),
                    ));
                }
                if !addresses.insert(m.address.value.clone()) {
                    return Err(self.error(
                        &m.address,
                        format!("{mat}.address"),
                        format!("address {} is used by two members", m.address.value),
                    ));
                }
                let api = self.member_api(&mat, m, &probe)?;
                members.push(Member {
                    name: m.name.value.clone(),
                    address: m.address.value.clone(),
                    api,
                });
            }

            if rc.endpoints.is_empty() {
                return Err(self.error(
                    &rc.name,
                    format!("{at}.endpoints"),
                    "at least one endpoint is required",
                ));
            }
            let mut endpoints = Vec::new();
            for (ei, re) in rc.endpoints.into_iter().enumerate() {
                let eat = format!("{at}.endpoints[{ei}]");
                if re.name.value.is_empty() || !endpoint_names.insert(re.name.value.clone()) {
                    return Err(self.error(
                        &re.name,
                        format!("{eat}.name"),
                        format!("endpoint name {:?} is empty or used twice", re.name.value),
                    ));
                }
                let listen: SocketAddr = re.listen.value.parse().map_err(|_| {
                    self.error(
                        &re.listen,
                        format!("{eat}.listen"),
                        format!("{:?} is not an ip:port address", re.listen.value),
                    )
                })?;
                if !listens.insert(listen) {
                    return Err(self.error(
                        &re.listen,
                        format!("{eat}.listen"),
                        format!(
                            "{listen} is already used by another endpoint or the admin listener"
                        ),
                    ));
                }
                for (value, key) in [
                    (&re.max_connections, "max_connections"),
                    (&re.max_handshakes, "max_handshakes"),
                    (&re.max_handshakes_per_source, "max_handshakes_per_source"),
                ]
                .into_iter()
                .chain(
                    re.max_connections_per_source
                        .as_ref()
                        .map(|v| (v, "max_connections_per_source")),
                ) {
                    if value.value == 0 {
                        return Err(self.error(
                            value,
                            format!("{eat}.{key}"),
                            "must be at least 1",
                        ));
                    }
                }

                let tls = self.tls(&eat, &re.tls, raw.certs_dir.as_ref())?;
                let proxy_protocol = match &re.proxy_protocol {
                    None => None,
                    Some(pp) => Some(self.proxy_protocol(&eat, pp)?),
                };
                if re.allow_plaintext.value && rc.protocol != Protocol::Postgres {
                    return Err(self.error(
                        &re.allow_plaintext,
                        format!("{eat}.allow_plaintext"),
                        "only PostgreSQL endpoints can accept plaintext clients",
                    ));
                }
                let max_lag = match &re.max_lag {
                    None => MaxLag::default(),
                    Some(lag) if re.route == Route::Leader => {
                        return Err(self.error(
                            lag,
                            format!("{eat}.max_lag"),
                            "max_lag applies to `replicas` and `any` routes, not `leader`",
                        ))
                    }
                    Some(lag) if lag.value.bytes.is_none() && lag.value.duration.is_none() => {
                        return Err(self.error(
                            lag,
                            format!("{eat}.max_lag"),
                            "set `bytes`, `duration` or both",
                        ))
                    }
                    Some(lag) => MaxLag {
                        bytes: lag.value.bytes,
                        duration: lag.value.duration,
                    },
                };
                endpoints.push(Endpoint {
                    name: re.name.value,
                    listen,
                    route: re.route,
                    balance: re.balance,
                    tls,
                    hold_timeout: re.hold_timeout,
                    handshake_timeout: re.handshake_timeout,
                    max_connections: re.max_connections.value,
                    max_connections_per_source: re.max_connections_per_source.map(|v| v.value),
                    max_handshakes: re.max_handshakes.value,
                    max_handshakes_per_source: re.max_handshakes_per_source.value,
                    idle_timeout: re.idle_timeout,
                    access_log: re.access_log.value,
                    on_leader_change: re.on_leader_change,
                    allow_plaintext: re.allow_plaintext.value,
                    max_lag,
                    replica_fallback: re.replica_fallback,
                    proxy_protocol,
                });
            }

            let backend_tls = match &rc.backend_tls {
                None => None,
                Some(raw) => Some(self.client_tls(&format!("{at}.backend_tls"), raw)?),
            };
            if rc.protocol == Protocol::Postgres
                && probe.check == Check::Native
                && probe.username.is_none()
            {
                return Err(self.error(
                    &rc.name,
                    format!("{at}.probe.username"),
                    "PostgreSQL probes need a username",
                ));
            }
            let dcs = match &rc.dcs {
                None => None,
                Some(raw) => Some(self.dcs(&at, rc.protocol, raw, members.len())?),
            };
            clusters.push(Cluster {
                name: rc.name.value,
                protocol: rc.protocol,
                probe,
                backend_tls,
                members,
                endpoints,
                dcs,
            });
        }

        let token = self.secret(
            "admin",
            "token",
            raw.admin.token_file.as_ref(),
            raw.admin.token_env.as_ref(),
        )?;
        // Surrounding spaces are dropped; a token with spaces inside, or an
        // empty one, could never be sent as a bearer token.
        let token = token.map(|t| Secret(t.expose().trim().to_string()));
        if let Some(t) = &token {
            let problem = if t.expose().is_empty() {
                Some("the token is empty")
            } else if t
                .expose()
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
            {
                Some("the token contains spaces or control characters")
            } else {
                None
            };
            let at = raw
                .admin
                .token_file
                .as_ref()
                .or(raw.admin.token_env.as_ref());
            if let (Some(problem), Some(at)) = (problem, at) {
                return Err(self.error(at, "admin.token", problem));
            }
        }
        let mut peers = Vec::new();
        for (i, peer) in raw.admin.peers.iter().enumerate() {
            if !valid_host_port(&peer.value) {
                return Err(self.error(
                    peer,
                    format!("admin.peers[{i}]"),
                    format!(
                        "{:?} is not host:port (a peer portal's admin address)",
                        peer.value
                    ),
                ));
            }
            peers.push(peer.value.clone());
        }
        if !peers.is_empty() && token.is_none() {
            if let Some(first) = raw.admin.peers.first() {
                return Err(self.error(
                    first,
                    "admin.peers",
                    "peers need a shared `admin.token_file` or `admin.token_env`: the exchange is authenticated",
                ));
            }
        }

        Ok(Config {
            file: self.file.to_path_buf(),
            admin: Admin {
                listen: admin_listen,
                token,
                peers,
                peer_interval: raw.admin.peer_interval,
            },
            shutdown: ShutdownSettings {
                drain_timeout: raw.shutdown.drain_timeout,
                ready_delay: raw.shutdown.ready_delay,
            },
            data_threads,
            clusters,
        })
    }

    fn probe(&self, at: &str, raw: RawProbe) -> Result<ProbeSettings, ConfigError> {
        for (value, key) in [(&raw.rise, "rise"), (&raw.fall, "fall")] {
            if value.value == 0 {
                return Err(self.error(value, format!("{at}.probe.{key}"), "must be at least 1"));
            }
        }
        let password = self.secret(
            &format!("{at}.probe"),
            "password",
            raw.password_file.as_ref(),
            raw.password_env.as_ref(),
        )?;
        let check = raw.check.as_ref().map(|c| c.value).unwrap_or_default();
        let api_tls =
            match &raw.api_tls {
                None => None,
                Some(tls) if check != Check::Patroni => return Err(self.error(
                    tls,
                    format!("{at}.probe.api_tls"),
                    "`api_tls` is TLS to Patroni's REST API: it applies only with `check: patroni`",
                )),
                Some(tls) => Some(self.client_tls(&format!("{at}.probe.api_tls"), tls)?),
            };
        Ok(ProbeSettings {
            interval: raw.interval,
            fast_interval: raw.fast_interval,
            timeout: raw.timeout,
            reconnect_interval: raw.reconnect_interval,
            rise: raw.rise.value,
            fall: raw.fall.value,
            username: raw.username,
            password,
            dbname: raw.dbname,
            check,
            api_tls,
        })
    }

    /// A member's `api`: required with `check: patroni`, refused without it
    /// (a key that would be ignored is a trap). `host:port` is HTTPS when
    /// `probe.api_tls` is set, plain HTTP otherwise; `http://` and
    /// `https://` say it explicitly, and HTTPS needs `probe.api_tls`.
    fn member_api(
        &self,
        at: &str,
        member: &RawMember,
        probe: &ProbeSettings,
    ) -> Result<Option<PatroniApi>, ConfigError> {
        let api = match (&member.api, probe.check) {
            (None, Check::Patroni) => {
                return Err(self.error(
                    &member.name,
                    format!("{at}.api"),
                    format!(
                        "member {:?} needs `api: host:port` (its Patroni REST address) with `probe.check: patroni`",
                        member.name.value
                    ),
                ))
            }
            (Some(api), Check::Native) => {
                return Err(self.error(
                    api,
                    format!("{at}.api"),
                    "`api` is Patroni's REST address; it is used only with `probe.check: patroni`",
                ))
            }
            (None, Check::Native) => return Ok(None),
            (Some(api), Check::Patroni) => api,
        };
        let parsed = PatroniApi::parse(&api.value, probe.api_tls.is_some()).ok_or_else(|| {
            self.error(
                api,
                format!("{at}.api"),
                format!(
                    "{:?} is not host:port (or http://host:port, https://host:port)",
                    api.value
                ),
            )
        })?;
        if parsed.https && probe.api_tls.is_none() {
            return Err(self.error(
                api,
                format!("{at}.api"),
                format!(
                    "{:?} is HTTPS: set `probe.api_tls` (at least `ca`, the CA Patroni's certificate chains to)",
                    api.value
                ),
            ));
        }
        Ok(Some(parsed))
    }

    /// TLS settings the portal originates with: the CA must exist and
    /// hold certificates, `cert` and `key` come together and make an
    /// identity, `server_name` is a DNS name or an IP address.
    fn client_tls(&self, at: &str, raw: &Spanned<RawClientTls>) -> Result<ClientTls, ConfigError> {
        let raw_tls = &raw.value;
        let ca = self.resolve(&raw_tls.ca.value);
        if let Some(name) = &raw_tls.server_name {
            if rustls::pki_types::ServerName::try_from(name.value.as_str()).is_err() {
                return Err(self.error(
                    name,
                    format!("{at}.server_name"),
                    format!("{:?} is not a DNS name or an IP address", name.value),
                ));
            }
        }
        let identity = match (&raw_tls.cert, &raw_tls.key) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some(Identity {
                cert: self.resolve(&cert.value),
                key: self.resolve(&key.value),
            }),
            (Some(cert), None) => {
                return Err(self.error(
                    cert,
                    format!("{at}.key"),
                    "`cert` needs `key` (the client certificate's private key)",
                ))
            }
            (None, Some(key)) => {
                return Err(self.error(
                    key,
                    format!("{at}.cert"),
                    "`key` needs `cert` (the client certificate chain)",
                ))
            }
        };
        let tls = ClientTls {
            ca,
            server_name: raw_tls.server_name.as_ref().map(|n| n.value.clone()),
            identity,
        };
        // Build it once now: an unreadable CA, a file without a PEM
        // certificate or a key that does not match its certificate is a
        // configuration error, not a failure at the first connection.
        if let Err(err) = crate::tls::client_config(&tls, &[]) {
            let (key, at_value) = match &err {
                crate::tls::TlsError::File { path, .. } => {
                    match (&raw_tls.cert, &raw_tls.key, &tls.identity) {
                        (Some(cert), _, Some(files))
                            if *path == files.cert.display().to_string() =>
                        {
                            ("cert", cert)
                        }
                        (_, Some(key), Some(files)) if *path == files.key.display().to_string() => {
                            ("key", key)
                        }
                        _ => ("ca", &raw_tls.ca),
                    }
                }
                crate::tls::TlsError::Identity { .. } => match &raw_tls.key {
                    Some(key) => ("key", key),
                    None => ("ca", &raw_tls.ca),
                },
            };
            return Err(self.error(at_value, format!("{at}.{key}"), err.to_string()));
        }
        Ok(tls)
    }

    /// A password from a file or an environment variable, never inline.
    fn secret(
        &self,
        at: &str,
        stem: &str,
        file: Option<&Spanned<String>>,
        env: Option<&Spanned<String>>,
    ) -> Result<Option<Secret>, ConfigError> {
        Ok(match (file, env) {
            (Some(_), Some(env)) => {
                return Err(self.error(
                    env,
                    format!("{at}.{stem}_env"),
                    format!("set {stem}_file or {stem}_env, not both"),
                ))
            }
            (Some(file), None) => {
                let path = self.resolve(&file.value);
                let text = std::fs::read_to_string(&path).map_err(|err| {
                    self.error(
                        file,
                        format!("{at}.{stem}_file"),
                        format!("cannot read {}: {err}", path.display()),
                    )
                })?;
                Some(Secret(text.trim_end_matches(['\r', '\n']).to_string()))
            }
            (None, Some(env)) => {
                let value = std::env::var(&env.value).map_err(|_| {
                    self.error(
                        env,
                        format!("{at}.{stem}_env"),
                        format!("environment variable {} is not set", env.value),
                    )
                })?;
                Some(Secret(value))
            }
            (None, None) => None,
        })
    }

    fn max_members(
        &self,
        at: &str,
        raw: &Spanned<usize>,
        configured: usize,
    ) -> Result<usize, ConfigError> {
        let at = format!("{at}.max_members");
        if raw.value == 0 || raw.value > MAX_MEMBERS_LIMIT {
            return Err(self.error(
                raw,
                at,
                format!("must be between 1 and {MAX_MEMBERS_LIMIT}"),
            ));
        }
        if raw.value < configured {
            return Err(self.error(
                raw,
                at,
                format!("is {} but {configured} members are configured", raw.value),
            ));
        }
        Ok(raw.value)
    }

    fn dcs(
        &self,
        at: &str,
        protocol: Protocol,
        raw: &Spanned<RawDcs>,
        configured: usize,
    ) -> Result<Dcs, ConfigError> {
        let at = format!("{at}.dcs");
        let list = |values: &Spanned<Vec<String>>, key: &str| -> Result<Vec<String>, ConfigError> {
            if values.value.is_empty() {
                return Err(self.error(
                    values,
                    format!("{at}.{key}"),
                    "at least one address is required",
                ));
            }
            for v in &values.value {
                if !valid_host_port(v) {
                    return Err(self.error(
                        values,
                        format!("{at}.{key}"),
                        format!("{v:?} is not host:port"),
                    ));
                }
            }
            Ok(values.value.clone())
        };
        match (&raw.value.etcd, &raw.value.sentinel) {
            (Some(etcd), None) => {
                let at = format!("{at}.etcd");
                if protocol != Protocol::Postgres {
                    return Err(self.error(raw, at, "an etcd DCS holds Patroni's keys: it names the leader of PostgreSQL clusters"));
                }
                if etcd.scope.value.is_empty() {
                    return Err(self.error(
                        &etcd.scope,
                        format!("{at}.scope"),
                        "must not be empty",
                    ));
                }
                if !etcd.prefix.value.starts_with('/') {
                    return Err(self.error(
                        &etcd.prefix,
                        format!("{at}.prefix"),
                        "must start with /",
                    ));
                }
                Ok(Dcs::Etcd(EtcdDcs {
                    endpoints: list(&etcd.endpoints, "etcd.endpoints")?,
                    prefix: etcd.prefix.value.trim_end_matches('/').to_string(),
                    scope: etcd.scope.value.clone(),
                    username: etcd.username.clone(),
                    password: self.secret(
                        &at,
                        "password",
                        etcd.password_file.as_ref(),
                        etcd.password_env.as_ref(),
                    )?,
                    timeout: etcd.timeout,
                    max_members: self.max_members(&at, &etcd.max_members, configured)?,
                    tls: match &etcd.tls {
                        None => None,
                        Some(tls) => Some(self.client_tls(&format!("{at}.tls"), tls)?),
                    },
                }))
            }
            (None, Some(sentinel)) => {
                let at = format!("{at}.sentinel");
                if protocol != Protocol::Redis {
                    return Err(self.error(
                        raw,
                        at,
                        "Redis Sentinel names the leader of Redis clusters",
                    ));
                }
                if sentinel.master_name.value.is_empty() {
                    return Err(self.error(
                        &sentinel.master_name,
                        format!("{at}.master_name"),
                        "must not be empty",
                    ));
                }
                Ok(Dcs::Sentinel(SentinelDcs {
                    addresses: list(&sentinel.addresses, "sentinel.addresses")?,
                    master_name: sentinel.master_name.value.clone(),
                    username: sentinel.username.clone(),
                    password: self.secret(
                        &at,
                        "password",
                        sentinel.password_file.as_ref(),
                        sentinel.password_env.as_ref(),
                    )?,
                    timeout: sentinel.timeout,
                    tls: match &sentinel.tls {
                        None => None,
                        Some(tls) => Some(self.client_tls(&format!("{at}.tls"), tls)?),
                    },
                }))
            }
            _ => Err(self.error(raw, at, "set exactly one of `etcd` or `sentinel`")),
        }
    }

    fn tls(
        &self,
        at: &str,
        raw: &Spanned<RawTls>,
        certs_dir: Option<&Spanned<String>>,
    ) -> Result<TlsFiles, ConfigError> {
        let from_certs_dir = || -> Result<(PathBuf, PathBuf), ConfigError> {
            let dir = certs_dir.map(|d| self.resolve(&d.value)).ok_or_else(|| {
                self.error(
                    raw,
                    format!("{at}.tls"),
                    "`tls: auto` (or `tls` without `cert` and `key`) needs `certs_dir` at the top level",
                )
            })?;
            Ok((dir.join("server.crt"), dir.join("server.key")))
        };
        let mut files = match &raw.value {
            RawTls::Auto => {
                let (cert, key) = from_certs_dir()?;
                TlsFiles {
                    cert,
                    key,
                    ..TlsFiles::default()
                }
            }
            RawTls::Files(f) => {
                let (cert, key) = match (&f.cert, &f.key) {
                    (Some(cert), Some(key)) => (self.resolve(&cert.value), self.resolve(&key.value)),
                    (None, None) => from_certs_dir()?,
                    (Some(one), None) | (None, Some(one)) => {
                        return Err(self.error(
                            one,
                            format!("{at}.tls"),
                            "set both `cert` and `key`, or neither (then `certs_dir`'s server.crt and server.key are used)",
                        ))
                    }
                };
                TlsFiles {
                    cert,
                    key,
                    ..TlsFiles::default()
                }
            }
        };
        for (path, key) in [(&files.cert, "cert"), (&files.key, "key")] {
            if let Err(err) = std::fs::metadata(path) {
                return Err(self.error(
                    raw,
                    format!("{at}.tls.{key}"),
                    format!(
                        "{}: {err} (make one with `portal certs init --dir DIR --host NAME`)",
                        path.display()
                    ),
                ));
            }
        }
        if let RawTls::Files(f) = &raw.value {
            match (&f.client_ca, &f.client_auth) {
                (None, Some(auth)) => {
                    return Err(self.error(
                        auth,
                        format!("{at}.tls.client_auth"),
                        "`client_auth` applies with `client_ca` (the CAs that sign client certificates)",
                    ))
                }
                (None, None) => {}
                (Some(ca), auth) => {
                    let path = self.resolve(&ca.value);
                    if let Err(err) = std::fs::metadata(&path) {
                        return Err(self.error(
                            ca,
                            format!("{at}.tls.client_ca"),
                            format!(
                                "{}: {err} (the PEM file of the CAs that sign client certificates)",
                                path.display()
                            ),
                        ));
                    }
                    files.client_ca = Some(path);
                    files.client_auth = auth.as_ref().map(|a| a.value).unwrap_or_default();
                }
            }
        }
        Ok(files)
    }

    fn proxy_protocol(
        &self,
        at: &str,
        raw: &Spanned<RawProxyProtocol>,
    ) -> Result<ProxyProtocol, ConfigError> {
        if raw.value.trusted.is_empty() {
            return Err(self.error(
                raw,
                format!("{at}.proxy_protocol.trusted"),
                "list the balancers' networks (CIDRs such as 10.0.0.0/8) whose connections carry a PROXY header; it must not be empty",
            ));
        }
        let mut trusted = Vec::new();
        for (i, entry) in raw.value.trusted.iter().enumerate() {
            let cidr = Cidr::parse(&entry.value).map_err(|message| {
                self.error(entry, format!("{at}.proxy_protocol.trusted[{i}]"), message)
            })?;
            trusted.push(cidr);
        }
        Ok(ProxyProtocol { trusted })
    }
}

pub(crate) fn valid_host_port(address: &str) -> bool {
    if address.parse::<SocketAddr>().is_ok() {
        return true;
    }
    match address.rsplit_once(':') {
        Some((host, port)) => {
            !host.is_empty()
                && !host.contains(':')
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_')
                && port.parse::<u16>().is_ok_and(|p| p != 0)
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certs() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("server.crt"), "x").expect("write");
        std::fs::write(dir.path().join("server.key"), "x").expect("write");
        dir
    }

    fn config(dir: &Path, body: &str) -> Result<Config, ConfigError> {
        Config::parse(&dir.join("portal.yaml"), body)
    }

    const GOOD: &str = "\
certs_dir: .
clusters:
  - name: cache
    protocol: redis
    members:
      - name: a
        address: 127.0.0.1:6379
      - name: b
        address: localhost:6380
    endpoints:
      - name: rw
        listen: 127.0.0.1:7000
        route: leader
        tls: auto
        hold_timeout: 2s
";

    #[test]
    fn data_threads_default_to_one_per_cpu_and_are_bounded() {
        let dir = certs();
        let cfg = config(dir.path(), GOOD).expect("valid");
        assert_eq!(cfg.data_threads, None);
        let cfg = config(dir.path(), &format!("data_threads: 3\n{GOOD}")).expect("valid");
        assert_eq!(cfg.data_threads, Some(3));
        for bad in ["0", "1025", "-1", "many"] {
            let (line, key, message) = invalid(&format!("\ndata_threads: {bad}\n{GOOD}"));
            assert_eq!(
                (line, key.as_str()),
                (2, "data_threads"),
                "{bad}: {message}"
            );
        }
    }

    #[test]
    fn ready_delay_is_off_by_default_and_may_be_zero() {
        let dir = certs();
        let cfg = config(dir.path(), GOOD).expect("valid");
        assert_eq!(cfg.shutdown.ready_delay, Duration::ZERO);
        for (text, want) in [("0s", 0), ("5s", 5)] {
            let body = format!("shutdown:\n  ready_delay: {text}\n{GOOD}");
            let cfg = config(dir.path(), &body).expect("valid");
            assert_eq!(cfg.shutdown.ready_delay, Duration::from_secs(want));
        }
        let (line, key, _) = invalid(&format!("shutdown:\n  ready_delay: soon\n{GOOD}"));
        assert_eq!((line, key.as_str()), (2, "shutdown.ready_delay"));
    }

    #[test]
    fn good_config_gets_defaults() {
        let dir = certs();
        let cfg = config(dir.path(), GOOD).expect("valid");
        let c = &cfg.clusters[0];
        assert_eq!(c.probe.interval, Duration::from_secs(1));
        assert_eq!(c.probe.rise, 2);
        assert_eq!(c.probe.reconnect_interval, Duration::from_secs(30));
        assert_eq!(c.endpoints[0].hold_timeout, Duration::from_secs(2));
        assert_eq!(c.endpoints[0].on_leader_change, OnLeaderChange::Close);
        assert_eq!(c.endpoints[0].tls.cert, dir.path().join("./server.crt"));
        assert_eq!(cfg.admin.listen, "127.0.0.1:9090".parse().expect("addr"));
    }

    #[test]
    fn admission_keys_have_defaults_and_limits() {
        let dir = certs();
        let cfg = config(dir.path(), GOOD).expect("valid");
        let e = &cfg.clusters[0].endpoints[0];
        assert_eq!(
            (
                e.max_connections,
                e.max_connections_per_source,
                e.max_handshakes,
                e.max_handshakes_per_source
            ),
            (10_000, None, 1_024, 256)
        );
        assert_eq!((e.idle_timeout, e.access_log), (None, false));
        let threads = crate::data_threads::DataThreads::count(None) as u64;
        assert_eq!(
            cfg.descriptors_needed(),
            2 * 10_000 + 1_024 + threads * (2 + 1) + 256
        );
        let with = |line: &str| {
            GOOD.replace(
                "        hold_timeout: 2s\n",
                &format!("        hold_timeout: 2s\n        {line}\n"),
            )
        };
        let endpoint = |line: &str| {
            config(dir.path(), &with(line)).expect("valid").clusters[0].endpoints[0].clone()
        };
        assert_eq!(
            endpoint("idle_timeout: 90s").idle_timeout,
            Some(Duration::from_secs(90))
        );
        let (_, at, message) = invalid(&with("idle_timeout: 0s"));
        assert_eq!(
            (at.as_str(), message.as_str()),
            (
                "clusters[0].endpoints[0].idle_timeout",
                "a duration must be greater than zero"
            )
        );
        assert_eq!(
            endpoint("max_connections_per_source: 3").max_connections_per_source,
            Some(3)
        );
        assert!(endpoint("access_log: true").access_log);
        for key in [
            "max_connections",
            "max_connections_per_source",
            "max_handshakes",
            "max_handshakes_per_source",
        ] {
            let (line, at, message) = invalid(&with(&format!("{key}: 0")));
            assert_eq!(
                (line, at.as_str(), message.as_str()),
                (
                    16,
                    format!("clusters[0].endpoints[0].{key}").as_str(),
                    "must be at least 1"
                ),
                "{key}"
            );
        }
    }

    fn invalid(body: &str) -> (u32, String, String) {
        let dir = certs();
        match config(dir.path(), body) {
            Err(ConfigError::Invalid {
                line, key, message, ..
            }) => (line, key, message),
            other => panic!("expected an Invalid error, got {other:?}"),
        }
    }

    #[test]
    fn admin_token_and_peers() {
        let dir = certs();
        std::fs::write(dir.path().join("token"), "s3cret\n").expect("write");
        let with_admin = |admin: &str| format!("admin:\n{admin}{GOOD}");
        let cfg = config(
            dir.path(),
            &with_admin(
                "  token_file: token\n  peers: [\"127.0.0.1:9091\"]\n  peer_interval: 1s\n",
            ),
        )
        .expect("valid");
        assert_eq!(cfg.admin.token.as_ref().map(Secret::expose), Some("s3cret"));
        assert_eq!(cfg.admin.peers, vec!["127.0.0.1:9091".to_string()]);
        assert_eq!(cfg.admin.peer_interval, Duration::from_secs(1));
        let invalid = |body: &str| match config(dir.path(), body) {
            Err(ConfigError::Invalid {
                line, key, message, ..
            }) => (line, key, message),
            other => panic!("expected an Invalid error, got {other:?}"),
        };
        // Peers without a token: the exchange would be open to anyone.
        let (line, key, message) = invalid(&with_admin("  peers: [\"127.0.0.1:9091\"]\n"));
        assert_eq!((line, key.as_str()), (2, "admin.peers"), "{message}");
        let (line, key, _) = invalid(&with_admin("  token_file: token\n  peers: [\"nope\"]\n"));
        assert_eq!((line, key.as_str()), (3, "admin.peers[0]"));
        let (line, key, message) = invalid(&with_admin("  token_file: missing\n"));
        assert_eq!((line, key.as_str()), (2, "admin.token_file"));
        assert!(message.contains("missing"), "{message}");
        std::fs::write(dir.path().join("empty"), "\n").expect("write");
        let (_, key, _) = invalid(&with_admin("  token_file: empty\n"));
        assert_eq!(key, "admin.token");
        std::fs::write(dir.path().join("spaced"), "  tok en \n").expect("write");
        let (_, key, message) = invalid(&with_admin("  token_file: spaced\n"));
        assert_eq!(key, "admin.token", "{message}");
        std::fs::write(dir.path().join("padded"), "  tok  \n").expect("write");
        let cfg = config(dir.path(), &with_admin("  token_file: padded\n")).expect("valid");
        assert_eq!(cfg.admin.token.as_ref().map(Secret::expose), Some("tok"));
        let (_, key, _) = invalid(&with_admin("  peer_interval: 0s\n"));
        assert_eq!(key, "admin.peer_interval");
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let (line, key, message) =
            invalid(&GOOD.replace("address: localhost", "adress: localhost"));
        assert_eq!(line, 9);
        assert!(key.starts_with("clusters[0].members[1]"), "{key}");
        assert!(message.contains("adress"), "{message}");
    }

    #[test]
    fn bad_duration_names_line_and_key() {
        let (line, key, message) = invalid(&GOOD.replace("hold_timeout: 2s", "hold_timeout: 2q"));
        assert_eq!(line, 15);
        assert_eq!(key, "clusters[0].endpoints[0].hold_timeout");
        assert!(message.contains("2q"), "{message}");
    }

    #[test]
    fn semantic_errors_name_line_and_key() {
        let (line, key, _) = invalid(&GOOD.replace("localhost:6380", "localhost"));
        assert_eq!((line, key.as_str()), (9, "clusters[0].members[1].address"));
        let (line, key, _) = invalid(&GOOD.replace("127.0.0.1:7000", "127.0.0.1:9090"));
        assert_eq!(
            (line, key.as_str()),
            (12, "clusters[0].endpoints[0].listen")
        );
        let (_, key, _) = invalid(&GOOD.replace("name: b", "name: a"));
        assert_eq!(key, "clusters[0].members[1].name");
        let (_, key, message) = invalid(&GOOD.replace("certs_dir: .", "certs_dir: ./nope"));
        assert_eq!(key, "clusters[0].endpoints[0].tls.cert");
        assert!(message.contains("nope"), "{message}");
    }

    #[test]
    fn tls_accepts_files_and_rejects_other_words() {
        let dir = certs();
        let body = GOOD.replace("tls: auto", "tls: {cert: server.crt, key: server.key}");
        let cfg = config(dir.path(), &body).expect("valid");
        assert_eq!(
            cfg.clusters[0].endpoints[0].tls.key,
            dir.path().join("server.key")
        );
        let (line, key, _) = invalid(&GOOD.replace("tls: auto", "tls: maybe"));
        assert_eq!((line, key.as_str()), (14, "clusters[0].endpoints[0].tls"));
    }

    #[test]
    fn client_certificates_need_a_ca_file() {
        let dir = certs();
        std::fs::write(dir.path().join("clients.crt"), "x").expect("write");
        let with_tls =
            |tls: &str| GOOD.replace("        tls: auto\n", &format!("        tls:\n{tls}"));
        let cfg = config(
            dir.path(),
            &with_tls("          cert: server.crt\n          key: server.key\n          client_ca: clients.crt\n"),
        )
        .expect("valid");
        let tls = &cfg.clusters[0].endpoints[0].tls;
        assert_eq!(tls.client_ca, Some(dir.path().join("clients.crt")));
        assert_eq!(tls.client_auth, ClientAuth::Required, "required by default");
        // Without cert and key: certs_dir's, as `auto`.
        let cfg = config(
            dir.path(),
            &with_tls("          client_ca: clients.crt\n          client_auth: optional\n"),
        )
        .expect("valid");
        let tls = &cfg.clusters[0].endpoints[0].tls;
        assert_eq!(tls.cert, dir.path().join("./server.crt"));
        assert_eq!(tls.client_auth, ClientAuth::Optional);

        let (line, key, message) = invalid(&with_tls("          client_ca: missing.crt\n"));
        assert_eq!(
            (line, key.as_str()),
            (15, "clusters[0].endpoints[0].tls.client_ca")
        );
        assert!(message.contains("missing.crt"), "{message}");
        let (line, key, message) = invalid(&with_tls("          client_auth: optional\n"));
        assert_eq!(
            (line, key.as_str()),
            (15, "clusters[0].endpoints[0].tls.client_auth")
        );
        assert!(message.contains("client_ca"), "{message}");
        let (line, key, _) = invalid(&with_tls(
            "          client_ca: clients.crt\n          client_auth: sometimes\n",
        ));
        assert_eq!(
            (line, key.as_str()),
            (16, "clusters[0].endpoints[0].tls.client_auth")
        );
        let (line, key, message) = invalid(&with_tls("          cert: server.crt\n"));
        assert_eq!((line, key.as_str()), (15, "clusters[0].endpoints[0].tls"));
        assert!(message.contains("both"), "{message}");
    }

    #[test]
    fn proxy_protocol_trusts_listed_networks_only() {
        let dir = certs();
        let with = |pp: &str| {
            GOOD.replace(
                "        hold_timeout: 2s\n",
                &format!("        hold_timeout: 2s\n        proxy_protocol:\n{pp}"),
            )
        };
        let cfg = config(
            dir.path(),
            &with("          trusted: [127.0.0.2/32, 10.0.0.0/8, \"2001:db8::/32\", 192.0.2.7]\n"),
        )
        .expect("valid");
        let pp = cfg.clusters[0].endpoints[0]
            .proxy_protocol
            .clone()
            .expect("proxy_protocol");
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        for yes in [
            "127.0.0.2",
            "10.1.2.3",
            "2001:db8::1",
            "192.0.2.7",
            "::ffff:10.9.9.9",
        ] {
            assert!(pp.trusts(ip(yes)), "{yes}");
        }
        for no in ["127.0.0.1", "11.0.0.1", "2001:db9::1", "192.0.2.8", "::1"] {
            assert!(!pp.trusts(ip(no)), "{no}");
        }
        assert!(
            config(dir.path(), GOOD).expect("valid").clusters[0].endpoints[0]
                .proxy_protocol
                .is_none()
        );

        let (line, key, _) = invalid(&with("          trusted: []\n"));
        assert_eq!(
            (line, key.as_str()),
            (17, "clusters[0].endpoints[0].proxy_protocol.trusted")
        );
        let (line, key, message) = invalid(&with(
            "          trusted:\n            - 10.0.0.0/8\n            - 10.0.0.1/8\n",
        ));
        assert_eq!(
            (line, key.as_str()),
            (19, "clusters[0].endpoints[0].proxy_protocol.trusted[1]")
        );
        assert!(message.contains("10.0.0.0/8"), "{message}");
        let (_, key, _) = invalid(&with("          trusted: [10.0.0.0/33]\n"));
        assert_eq!(key, "clusters[0].endpoints[0].proxy_protocol.trusted[0]");
        let (_, key, _) = invalid(&with("          trusted: [balancer.local]\n"));
        assert_eq!(key, "clusters[0].endpoints[0].proxy_protocol.trusted[0]");
        let (_, key, _) = invalid(&with(
            "          trusted: [10.0.0.0/8]\n          v2: true\n",
        ));
        assert!(
            key.starts_with("clusters[0].endpoints[0].proxy_protocol"),
            "{key}"
        );
    }

    #[test]
    fn cidr_edges() {
        let any4 = Cidr::parse("0.0.0.0/0").expect("all of IPv4");
        assert!(any4.contains("203.0.113.1".parse().expect("ip")));
        assert!(!any4.contains("::1".parse().expect("ip")));
        let any6 = Cidr::parse("::/0").expect("all of IPv6");
        assert!(any6.contains("2001:db8::1".parse().expect("ip")));
        assert!(!any6.contains("10.0.0.1".parse().expect("ip")));
        let mapped = Cidr::parse("::ffff:10.0.0.0/104").expect("mapped");
        assert_eq!(mapped.to_string(), "10.0.0.0/8");
        assert!(Cidr::parse("10.0.0.0/").is_err());
        assert!(Cidr::parse("/8").is_err());
        assert!(Cidr::parse("2001:db8::1/32").is_err());
        assert_eq!(Cidr::parse("::1").expect("host").to_string(), "::1/128");
    }

    #[test]
    fn secrets_do_not_print() {
        assert_eq!(format!("{:?}", Secret("hunter2".into())), "Secret(***)");
    }

    const PATRONI: &str = "\
certs_dir: .
clusters:
  - name: pg
    protocol: postgres
    probe:
      check: patroni
    members:
      - name: a
        address: 127.0.0.1:5432
        api: 127.0.0.1:8008
      - name: b
        address: 127.0.0.1:5433
        api: 127.0.0.1:8009
    endpoints:
      - name: rw
        listen: 127.0.0.1:7000
        route: leader
        tls: auto
";

    #[test]
    fn patroni_check_needs_each_members_api() {
        let dir = certs();
        let cfg = config(dir.path(), PATRONI).expect("valid");
        let c = &cfg.clusters[0];
        assert_eq!(c.probe.check, Check::Patroni);
        assert_eq!(
            c.members[1]
                .api
                .as_ref()
                .map(ToString::to_string)
                .as_deref(),
            Some("127.0.0.1:8009")
        );
        assert!(c.probe.username.is_none(), "no PostgreSQL login needed");

        let (line, key, message) = invalid(&PATRONI.replace("        api: 127.0.0.1:8009\n", ""));
        assert_eq!((line, key.as_str()), (11, "clusters[0].members[1].api"));
        assert!(message.contains("needs `api"), "{message}");

        let (line, key, _) = invalid(&PATRONI.replace("api: 127.0.0.1:8008", "api: nope"));
        assert_eq!((line, key.as_str()), (10, "clusters[0].members[0].api"));

        let (line, key, message) = invalid(&PATRONI.replace("check: patroni", "check: native"));
        assert_eq!((line, key.as_str()), (10, "clusters[0].members[0].api"));
        assert!(message.contains("only with"), "{message}");

        let (line, key, _) = invalid(&PATRONI.replace("protocol: postgres", "protocol: redis"));
        assert_eq!((line, key.as_str()), (6, "clusters[0].probe.check"));

        let (line, key, _) = invalid(&PATRONI.replace("check: patroni", "check: maybe"));
        assert_eq!((line, key.as_str()), (6, "clusters[0].probe.check"));
    }

    #[test]
    fn host_port_forms() {
        assert!(valid_host_port("127.0.0.1:1"));
        assert!(valid_host_port("[::1]:6379"));
        assert!(valid_host_port("redis-0.svc:6379"));
        assert!(!valid_host_port("redis"));
        assert!(!valid_host_port("redis:0"));
        assert!(!valid_host_port(":6379"));
    }

    const LEARNING: &str = "\
certs_dir: .
clusters:
  - name: pg
    protocol: postgres
    probe:
      check: patroni
    dcs:
      etcd:
        endpoints: [127.0.0.1:2379]
        scope: demo
        max_members: 4
    endpoints:
      - name: rw
        listen: 127.0.0.1:7000
        route: leader
        tls: auto
";

    #[test]
    fn an_etcd_dcs_may_supply_the_members() {
        let dir = certs();
        let cfg = config(dir.path(), LEARNING).expect("valid");
        let c = &cfg.clusters[0];
        assert!(c.members.is_empty());
        assert_eq!(c.member_slots(), 4);
        match &c.dcs {
            Some(Dcs::Etcd(etcd)) => {
                assert_eq!(
                    (etcd.prefix.as_str(), etcd.scope.as_str()),
                    ("/service", "demo")
                );
                assert_eq!(etcd.max_members, 4);
            }
            other => panic!("expected an etcd DCS, got {other:?}"),
        }
        let default = config(
            dir.path(),
            &LEARNING.replace("        max_members: 4\n", ""),
        )
        .expect("valid");
        assert_eq!(default.clusters[0].member_slots(), 16);

        let (line, key, message) = invalid(&LEARNING.replace("max_members: 4", "max_members: 0"));
        assert_eq!(
            (line, key.as_str()),
            (11, "clusters[0].dcs.etcd.max_members")
        );
        assert!(message.contains("between 1 and"), "{message}");

        let with_members = LEARNING.replace(
            "    endpoints:\n      - name: rw",
            "    members:\n      - {name: a, address: 127.0.0.1:5432, api: 127.0.0.1:8008}\n      \
             - {name: b, address: 127.0.0.1:5433, api: 127.0.0.1:8009}\n    endpoints:\n      - name: rw",
        );
        assert_eq!(
            config(dir.path(), &with_members).expect("valid").clusters[0].member_slots(),
            4
        );
        let (line, key, message) =
            invalid(&with_members.replace("max_members: 4", "max_members: 1"));
        assert_eq!(
            (line, key.as_str()),
            (11, "clusters[0].dcs.etcd.max_members")
        );
        assert!(message.contains("2 members are configured"), "{message}");

        let (line, key, message) = invalid(&LEARNING.replace(
            "    dcs:\n      etcd:\n        endpoints: [127.0.0.1:2379]\n        scope: demo\n        max_members: 4\n",
            "",
        ));
        assert_eq!((line, key.as_str()), (3, "clusters[0].members"));
        assert!(message.contains("etcd DCS to learn them"), "{message}");
    }

    #[test]
    fn dcs_errors_name_their_key() {
        let (line, key, _) = invalid(&LEARNING.replace("scope: demo", "scope: \"\""));
        assert_eq!((line, key.as_str()), (10, "clusters[0].dcs.etcd.scope"));
        let (line, key, _) = invalid(&LEARNING.replace("[127.0.0.1:2379]", "[\"localhost\"]"));
        assert_eq!((line, key.as_str()), (9, "clusters[0].dcs.etcd.endpoints"));
        let (_, key, message) = invalid(&LEARNING.replace("protocol: postgres", "protocol: redis"));
        assert!(key.starts_with("clusters[0]"), "{key}");
        assert!(!message.is_empty());
        let sentinel = GOOD.replace(
            "    members:\n",
            "    dcs:\n      sentinel:\n        addresses: [127.0.0.1:26379]\n        master_name: \"\"\n    members:\n",
        );
        let (_, key, _) = invalid(&sentinel);
        assert_eq!(key, "clusters[0].dcs.sentinel.master_name");
    }

    /// `GOOD` and a second Redis cluster named `cluster` whose endpoint is
    /// named `endpoint`.
    fn with_second_cluster(cluster: &str, endpoint: &str) -> String {
        format!(
            "{GOOD}  - name: {cluster}\n    protocol: redis\n    members:\n      \
             - name: a\n        address: 127.0.0.1:6390\n    endpoints:\n      \
             - name: {endpoint}\n        listen: 127.0.0.1:7001\n        route: leader\n        \
             tls: auto\n"
        )
    }

    #[test]
    fn cluster_names_are_unique_and_not_empty() {
        let dir = certs();
        let cfg = config(dir.path(), &with_second_cluster("other", "ro")).expect("valid");
        assert_eq!(cfg.clusters.len(), 2);
        let (line, key, message) = invalid(&with_second_cluster("cache", "ro"));
        assert_eq!((line, key.as_str()), (16, "clusters[1].name"), "{message}");
        let (line, key, _) = invalid(&GOOD.replace("name: cache", "name: \"\""));
        assert_eq!((line, key.as_str()), (3, "clusters[0].name"));
    }

    #[test]
    fn endpoint_names_are_unique_across_clusters_and_not_empty() {
        let (line, key, message) = invalid(&with_second_cluster("other", "rw"));
        assert_eq!(
            (line, key.as_str()),
            (22, "clusters[1].endpoints[0].name"),
            "{message}"
        );
        let (line, key, _) = invalid(&GOOD.replace("name: rw", "name: \"\""));
        assert_eq!((line, key.as_str()), (11, "clusters[0].endpoints[0].name"));
    }

    #[test]
    fn only_postgres_endpoints_accept_plaintext() {
        let dir = certs();
        let plaintext = "        tls: auto\n        allow_plaintext: true\n";
        let cfg = config(
            dir.path(),
            &PATRONI.replace("        tls: auto\n", plaintext),
        )
        .expect("valid");
        assert!(cfg.clusters[0].endpoints[0].allow_plaintext);
        let (line, key, _) = invalid(&GOOD.replace("        tls: auto\n", plaintext));
        assert_eq!(
            (line, key.as_str()),
            (15, "clusters[0].endpoints[0].allow_plaintext")
        );
    }

    #[test]
    fn max_lag_applies_to_read_routes_and_needs_a_limit() {
        let dir = certs();
        let read = |lag: &str| {
            GOOD.replace("route: leader", "route: replicas").replace(
                "hold_timeout: 2s",
                &format!("hold_timeout: 2s\n        max_lag: {lag}"),
            )
        };
        let cfg = config(dir.path(), &read("{bytes: 100}")).expect("valid");
        let lag = cfg.clusters[0].endpoints[0].max_lag;
        assert_eq!((lag.bytes, lag.duration), (Some(100), None));
        let cfg = config(dir.path(), &read("{duration: 1s}")).expect("valid");
        let lag = cfg.clusters[0].endpoints[0].max_lag;
        assert_eq!(
            (lag.bytes, lag.duration),
            (None, Some(Duration::from_secs(1)))
        );

        let (line, key, message) = invalid(&read("{}"));
        assert_eq!(
            (line, key.as_str()),
            (16, "clusters[0].endpoints[0].max_lag")
        );
        assert!(message.contains("set `bytes`"), "{message}");
        let leader = read("{bytes: 100}").replace("route: replicas", "route: leader");
        let (line, key, message) = invalid(&leader);
        assert_eq!(
            (line, key.as_str()),
            (16, "clusters[0].endpoints[0].max_lag")
        );
        assert!(message.contains("not `leader`"), "{message}");
    }

    /// A real PEM CA (`ca.crt`), a certificate with its key (`id.crt`,
    /// `id.key`) and a key of another pair (`other.key`) in `dir`.
    fn pem_files(dir: &Path) {
        let ca = rcgen::generate_simple_self_signed(vec!["ca.test".to_string()]).expect("ca");
        let id = rcgen::generate_simple_self_signed(vec!["portal.test".to_string()]).expect("id");
        let other = rcgen::KeyPair::generate().expect("key");
        for (name, text) in [
            ("ca.crt", ca.cert.pem()),
            ("id.crt", id.cert.pem()),
            ("id.key", id.signing_key.serialize_pem()),
            ("other.key", other.serialize_pem()),
        ] {
            std::fs::write(dir.join(name), text).expect("write");
        }
    }

    /// `body` with `block` (lines indented for a cluster's keys) after
    /// the `protocol:` line.
    fn after_protocol(body: &str, block: &str) -> String {
        let at = body.find("    protocol: ").expect("a protocol line");
        let end = at + body[at..].find('\n').expect("end of line") + 1;
        format!("{}{block}{}", &body[..end], &body[end..])
    }

    #[test]
    fn tls_to_the_members_applies_to_every_protocol() {
        let dir = certs();
        pem_files(dir.path());
        let block = "    backend_tls:\n      ca: ca.crt\n      server_name: db.internal\n      \
                     cert: id.crt\n      key: id.key\n";
        for body in [GOOD, PATRONI] {
            let cfg = config(dir.path(), &after_protocol(body, block)).expect("valid");
            let tls = cfg.clusters[0].backend_tls.as_ref().expect("backend TLS");
            assert_eq!(tls.ca, dir.path().join("ca.crt"));
            assert_eq!(tls.server_name.as_deref(), Some("db.internal"));
            assert_eq!(
                tls.identity,
                Some(Identity {
                    cert: dir.path().join("id.crt"),
                    key: dir.path().join("id.key"),
                })
            );
        }
        let cfg = config(
            dir.path(),
            &after_protocol(GOOD, "    backend_tls: {ca: ca.crt}\n"),
        )
        .expect("valid");
        let tls = cfg.clusters[0].backend_tls.as_ref().expect("backend TLS");
        assert_eq!((tls.server_name.as_deref(), &tls.identity), (None, &None));
    }

    #[test]
    fn client_tls_errors_name_file_line_and_key() {
        let dir = certs();
        pem_files(dir.path());
        let check = |block: &str, line: u32, key: &str, says: &str| {
            let body = after_protocol(GOOD, &format!("    backend_tls:\n{block}"));
            match config(dir.path(), &body) {
                Err(ConfigError::Invalid {
                    file,
                    line: l,
                    key: k,
                    message,
                    ..
                }) => {
                    assert!(file.ends_with("portal.yaml"), "{file}");
                    assert_eq!(
                        (l, k.as_str()),
                        (line, format!("clusters[0].backend_tls.{key}").as_str()),
                        "{message}"
                    );
                    assert!(message.contains(says), "{key}: {message}");
                }
                other => panic!("expected an Invalid error for {block:?}, got {other:?}"),
            }
        };
        check("      ca: missing.crt\n", 6, "ca", "missing.crt");
        // `server.crt` holds no PEM certificate.
        check("      ca: server.crt\n", 6, "ca", "no PEM certificate");
        check(
            "      ca: ca.crt\n      cert: id.crt\n",
            7,
            "key",
            "needs `key`",
        );
        check(
            "      ca: ca.crt\n      key: id.key\n",
            7,
            "cert",
            "needs `cert`",
        );
        check(
            "      ca: ca.crt\n      cert: server.crt\n      key: id.key\n",
            7,
            "cert",
            "no PEM certificate",
        );
        check(
            "      ca: ca.crt\n      cert: id.crt\n      key: other.key\n",
            8,
            "key",
            "do not make an identity",
        );
        check(
            "      ca: ca.crt\n      server_name: \"not a name\"\n",
            7,
            "server_name",
            "not a DNS name",
        );
        let (line, key, message) = invalid(&after_protocol(
            GOOD,
            "    backend_tls: {ca: ca.crt, verify: no}\n",
        ));
        assert_eq!((line, key.as_str()), (5, "clusters[0].backend_tls.verify"));
        assert!(message.contains("unknown field"), "{message}");
    }

    #[test]
    fn a_dcs_may_be_reached_over_tls() {
        let dir = certs();
        pem_files(dir.path());
        let etcd = LEARNING.replace(
            "        max_members: 4\n",
            "        max_members: 4\n        tls: {ca: ca.crt, cert: id.crt, key: id.key}\n",
        );
        let cfg = config(dir.path(), &etcd).expect("valid");
        match &cfg.clusters[0].dcs {
            Some(Dcs::Etcd(etcd)) => {
                let tls = etcd.tls.as_ref().expect("etcd TLS");
                assert_eq!(tls.ca, dir.path().join("ca.crt"));
                assert!(tls.identity.is_some());
            }
            other => panic!("expected an etcd DCS, got {other:?}"),
        }
        let (line, key, _) = invalid(&etcd.replace("ca: ca.crt", "ca: nope.crt"));
        assert_eq!((line, key.as_str()), (12, "clusters[0].dcs.etcd.tls.ca"));

        let sentinel = |tls: &str| {
            after_protocol(
                GOOD,
                &format!(
                    "    dcs:\n      sentinel:\n        addresses: [127.0.0.1:26379]\n        \
                     master_name: m\n        tls: {tls}\n"
                ),
            )
        };
        let cfg = config(
            dir.path(),
            &sentinel("{ca: ca.crt, server_name: s.internal}"),
        )
        .expect("valid");
        match &cfg.clusters[0].dcs {
            Some(Dcs::Sentinel(s)) => {
                let tls = s.tls.as_ref().expect("Sentinel TLS");
                assert_eq!(tls.server_name.as_deref(), Some("s.internal"));
            }
            other => panic!("expected a Sentinel DCS, got {other:?}"),
        }
        let (line, key, _) = invalid(&sentinel("{ca: ca.crt, key: id.key}"));
        assert_eq!(
            (line, key.as_str()),
            (9, "clusters[0].dcs.sentinel.tls.cert")
        );
    }

    #[test]
    fn patroni_apis_over_https_need_api_tls() {
        let dir = certs();
        pem_files(dir.path());
        let https = PATRONI.replace("api: 127.0.0.1:8008", "api: https://127.0.0.1:8008");
        let (line, key, message) = invalid(&https);
        assert_eq!((line, key.as_str()), (10, "clusters[0].members[0].api"));
        assert!(message.contains("probe.api_tls"), "{message}");

        let with_tls = |body: &str| {
            body.replace(
                "      check: patroni\n",
                "      check: patroni\n      api_tls: {ca: ca.crt, server_name: patroni.internal}\n",
            )
        };
        let cfg = config(dir.path(), &with_tls(&https)).expect("valid");
        let c = &cfg.clusters[0];
        let apis: Vec<String> = c
            .members
            .iter()
            .filter_map(|m| m.api.as_ref().map(ToString::to_string))
            .collect();
        // A bare host:port is HTTPS once `api_tls` is set.
        assert_eq!(apis, ["https://127.0.0.1:8008", "https://127.0.0.1:8009"]);
        let tls = c.probe.api_tls.as_ref().expect("api TLS");
        assert_eq!(tls.server_name.as_deref(), Some("patroni.internal"));
        // An explicit http:// stays plain.
        let plain = with_tls(PATRONI).replace("api: 127.0.0.1:8009", "api: http://127.0.0.1:8009");
        let cfg = config(dir.path(), &plain).expect("valid");
        assert_eq!(
            cfg.clusters[0].members[1].api,
            Some(PatroniApi {
                address: "127.0.0.1:8009".into(),
                https: false
            })
        );
        // Without `api_tls`, a bare address is plain HTTP, as before.
        let cfg = config(dir.path(), PATRONI).expect("valid");
        assert_eq!(
            cfg.clusters[0].members[0].api.as_ref().map(|a| a.https),
            Some(false)
        );

        let (line, key, _) = invalid(&PATRONI.replace("api: 127.0.0.1:8008", "api: ftp://x:1"));
        assert_eq!((line, key.as_str()), (10, "clusters[0].members[0].api"));
        let native = with_tls(PATRONI)
            .replace("check: patroni", "check: native")
            .replace("        api: 127.0.0.1:8008\n", "")
            .replace("        api: 127.0.0.1:8009\n", "");
        let (line, key, message) = invalid(&native);
        assert_eq!((line, key.as_str()), (7, "clusters[0].probe.api_tls"));
        assert!(message.contains("check: patroni"), "{message}");
        let (line, key, _) = invalid(&with_tls(PATRONI).replace("ca: ca.crt", "ca: gone.crt"));
        assert_eq!((line, key.as_str()), (7, "clusters[0].probe.api_tls.ca"));
    }

    #[test]
    fn patroni_api_addresses_parse() {
        let parse = |text: &str, https: bool| PatroniApi::parse(text, https).map(|a| a.to_string());
        assert_eq!(
            parse("127.0.0.1:8008", false).as_deref(),
            Some("127.0.0.1:8008")
        );
        assert_eq!(
            parse("127.0.0.1:8008", true).as_deref(),
            Some("https://127.0.0.1:8008")
        );
        assert_eq!(
            parse("HTTPS://db-1:8008/patroni", false).as_deref(),
            Some("https://db-1:8008")
        );
        assert_eq!(
            parse("http://u:p@[::1]:8008/patroni?x", true).as_deref(),
            Some("[::1]:8008")
        );
        assert_eq!(parse("ftp://db-1:8008", false), None);
        assert_eq!(parse("https://db-1", false), None);
        assert_eq!(parse("", false), None);
    }

    #[test]
    fn max_members_is_bounded_by_the_limit_and_the_configured_members() {
        let dir = certs();
        let slots = |max: usize| LEARNING.replace("max_members: 4", &format!("max_members: {max}"));
        let cfg = config(dir.path(), &slots(MAX_MEMBERS_LIMIT)).expect("valid");
        assert_eq!(cfg.clusters[0].member_slots(), MAX_MEMBERS_LIMIT);
        let (line, key, message) = invalid(&slots(MAX_MEMBERS_LIMIT + 1));
        assert_eq!(
            (line, key.as_str()),
            (11, "clusters[0].dcs.etcd.max_members")
        );
        assert!(message.contains("between 1 and"), "{message}");
        // As many slots as configured members is enough.
        let two_members = slots(2).replace(
            "    endpoints:\n      - name: rw",
            "    members:\n      - {name: a, address: 127.0.0.1:5432, api: 127.0.0.1:8008}\n      \
             - {name: b, address: 127.0.0.1:5433, api: 127.0.0.1:8009}\n    endpoints:\n      - name: rw",
        );
        let cfg = config(dir.path(), &two_members).expect("valid");
        assert_eq!(cfg.clusters[0].member_slots(), 2);
    }

    #[test]
    fn host_names_are_letters_digits_dots_dashes_and_underscores() {
        assert!(valid_host_port("redis_0.svc-1:6379"));
        for bad in ["red is:6379", "redis/0:6379", "redis@0:6379"] {
            assert!(!valid_host_port(bad), "{bad}");
        }
    }
}
