//! Everything before bytes are forwarded: sniffing the opening, the TLS
//! handshake, each protocol's own negotiation, and each protocol's way of
//! refusing a client it cannot serve.

pub mod etcd;
pub mod postgres;
pub mod redis;
pub mod session;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use crate::config::Protocol;
use crate::log_limit::LogLimit;
use crate::metrics::Metrics;
use crate::stream::Stream;
use postgres::{CancelKey, Opening as PgOpening, ReadError};

/// Why the portal turns a client away after its handshake.
#[derive(Debug, Clone)]
pub enum Refusal {
    /// No eligible member within `hold_timeout`.
    NoMember {
        cluster: String,
        waited: Duration,
        split_brain: bool,
        /// The cluster has a leader, but the route wants a replica and none
        /// qualifies (`max_lag`, `replica_fallback: refuse`).
        no_replica: bool,
        /// Set when a member was chosen but connecting to it kept failing.
        connect_error: Option<String>,
    },
    MaxConnections,
    ShuttingDown,
}

impl Refusal {
    pub fn metric_reason(&self) -> &'static str {
        match self {
            Refusal::NoMember {
                connect_error: Some(_),
                ..
            } => "connect_failed",
            Refusal::NoMember {
                no_replica: true, ..
            } => "no_replica",
            Refusal::NoMember { .. } => "no_leader",
            Refusal::MaxConnections => "max_connections",
            Refusal::ShuttingDown => "shutdown",
        }
    }

    pub fn message(&self) -> String {
        match self {
            Refusal::NoMember {
                cluster,
                waited,
                split_brain,
                no_replica,
                connect_error,
            } => {
                if let Some(error) = connect_error {
                    return format!(
                        "portal: could not connect to a member of cluster \"{cluster}\" within {}ms: {error}",
                        waited.as_millis()
                    );
                }
                if *no_replica {
                    return format!(
                        "portal: no replica of cluster \"{cluster}\" qualifies for this endpoint (max_lag, replica_fallback: refuse) after waiting {}ms",
                        waited.as_millis()
                    );
                }
                let why = if *split_brain {
                    " (split brain: several members claim primary and their terms cannot order them)"
                } else {
                    ""
                };
                format!(
                    "portal: no leader for cluster \"{cluster}\" after waiting {}ms{why}",
                    waited.as_millis()
                )
            }
            Refusal::MaxConnections => "portal: too many connections to this endpoint".to_string(),
            Refusal::ShuttingDown => "portal: shutting down".to_string(),
        }
    }
}

/// Longest any refusal may take, whatever the client does (sends PINGs and
/// never reads, stops reading with a full window): past it the connection
/// is dropped.
pub const REFUSAL_DEADLINE: Duration = Duration::from_secs(3);

/// Answers `refusal` in the client's protocol, then closes; within
/// [`REFUSAL_DEADLINE`].
pub async fn refuse<S>(protocol: Protocol, stream: &mut S, refusal: &Refusal)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let _ = tokio::time::timeout(
        REFUSAL_DEADLINE,
        refuse_unbounded(protocol, stream, refusal),
    )
    .await;
}

async fn refuse_unbounded<S>(protocol: Protocol, stream: &mut S, refusal: &Refusal)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match protocol {
        Protocol::Redis => redis::refuse(stream, refusal).await,
        Protocol::Etcd => etcd::refuse(stream, refusal).await,
        Protocol::Postgres => {
            let sqlstate = match refusal {
                Refusal::NoMember { .. } => "57P03", // cannot_connect_now
                Refusal::MaxConnections => "53300",  // too_many_connections
                Refusal::ShuttingDown => "57P01",    // admin_shutdown
            };
            postgres::send_error(stream, sqlstate, &refusal.message()).await
        }
    }
}

/// The ALPN protocols an endpoint of `protocol` offers.
pub fn alpn(protocol: Protocol) -> &'static [&'static [u8]] {
    match protocol {
        Protocol::Redis => &[],
        Protocol::Postgres => &[postgres::ALPN],
        Protocol::Etcd => &[etcd::ALPN],
    }
}

/// What a client's first bytes say it is about to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opening {
    /// A TLS handshake record; `hello_version` is the ClientHello's
    /// `legacy_version` when the first segment held it (0x0303 for TLS 1.2
    /// and 1.3 clients, lower for older ones).
    Tls { hello_version: Option<u16> },
    /// Anything else: a plaintext client, or garbage.
    Plaintext,
    /// The client closed before sending anything.
    Closed,
}

/// TLS record type of a handshake message.
const TLS_HANDSHAKE: u8 = 0x16;
/// Handshake message type of a ClientHello.
const CLIENT_HELLO: u8 = 0x01;
/// `legacy_version` of a TLS 1.2 (and 1.3) ClientHello.
const TLS12_VERSION: u16 = 0x0303;

/// Classifies the first bytes, as far as they have arrived.
pub fn classify_opening(first: &[u8]) -> Opening {
    match first {
        [] => Opening::Closed,
        [TLS_HANDSHAKE, _, _, _, _, CLIENT_HELLO, _, _, _, major, minor, ..] => Opening::Tls {
            hello_version: Some(u16::from_be_bytes([*major, *minor])),
        },
        [TLS_HANDSHAKE, ..] => Opening::Tls {
            hello_version: None,
        },
        _ => Opening::Plaintext,
    }
}

/// Peeks at the client's first bytes without consuming them.
pub async fn sniff(tcp: &TcpStream) -> std::io::Result<Opening> {
    let mut first = [0u8; 11];
    let n = tcp.peek(&mut first).await?;
    Ok(classify_opening(&first[..n]))
}

/// The most a Redis or etcd client's first read takes in: the bytes the
/// member receives first (the rest follows in the relay). Small, since it
/// is held while a client that finished its handshake stays silent.
const FIRST_READ: usize = 2 * 1024;

/// What the frontend made of a new connection.
pub enum Accepted {
    /// A client to route; `preface` is what the member must receive first
    /// (PostgreSQL: the StartupMessage the portal read; Redis and etcd: the
    /// client's first bytes).
    Session { client: Stream, preface: Vec<u8> },
    /// A PostgreSQL CancelRequest to forward.
    Cancel(CancelKey),
    /// Dropped, counted and logged already.
    Dropped,
}

/// One endpoint's frontend settings.
pub struct Frontend<'a> {
    pub endpoint: &'a str,
    pub protocol: Protocol,
    pub acceptor: &'a TlsAcceptor,
    pub allow_plaintext: bool,
    pub metrics: &'a Metrics,
    /// Limits the lines a failed opening logs.
    pub log_limit: &'a LogLimit,
}

impl Frontend<'_> {
    fn handshake_failed(&self, reason: &str) {
        self.metrics
            .tls_handshake_failures
            .with_label_values(&[self.endpoint, reason])
            .inc();
    }

    fn protocol_error(&self, reason: &str) {
        self.metrics
            .protocol_errors
            .with_label_values(&[self.endpoint, reason])
            .inc();
    }

    /// Whether to log a line for a failed opening; `Some(suppressed)`.
    fn log(&self, reason: &'static str) -> Option<u64> {
        self.log_limit.admit(reason)
    }

    /// Runs the opening of a new connection up to the point where it can be
    /// routed: the TLS handshake and the protocol's first read (PostgreSQL:
    /// the StartupMessage or CancelRequest; Redis and etcd: the client's
    /// first bytes, so that a client that says nothing never costs a
    /// connection to a member). The caller bounds it with the handshake
    /// timeout.
    pub async fn accept(&self, tcp: TcpStream, peer: SocketAddr) -> Accepted {
        let opening = match sniff(&tcp).await {
            Ok(opening) => opening,
            Err(err) => {
                self.handshake_failed("eof");
                tracing::debug!(endpoint = self.endpoint, %peer, error = %err, "client connection failed before the handshake");
                return Accepted::Dropped;
            }
        };
        if opening == Opening::Closed {
            self.handshake_failed("eof");
            tracing::debug!(endpoint = self.endpoint, %peer, "client closed before the handshake");
            return Accepted::Dropped;
        }
        if opening == Opening::Plaintext {
            self.note_untrusted_header(&tcp, peer).await;
        }
        match self.protocol {
            Protocol::Postgres => self.accept_postgres(tcp, peer, opening).await,
            Protocol::Redis | Protocol::Etcd => self.accept_tls_only(tcp, peer, opening).await,
        }
    }

    /// A PROXY protocol header from a source the endpoint does not trust
    /// (or on an endpoint without `proxy_protocol`) is the client's first
    /// bytes like any others, and fails the opening as they would; this
    /// only says so in the log, since it usually means a balancer missing
    /// from `proxy_protocol.trusted`.
    async fn note_untrusted_header(&self, tcp: &TcpStream, peer: SocketAddr) {
        let mut first = [0u8; 12];
        let Ok(n) = tcp.peek(&mut first).await else {
            return;
        };
        if crate::proxy_protocol::looks_like_header(&first[..n]) {
            if let Some(suppressed) = self.log("proxy_protocol_untrusted") {
                tracing::info!(endpoint = self.endpoint, %peer, suppressed, "a PROXY protocol header from a source this endpoint does not trust (proxy_protocol.trusted); treated as a direct client's bytes, the opening fails");
            }
        }
    }

    async fn tls(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
        hello_version: Option<u16>,
    ) -> Option<Stream> {
        match self.acceptor.accept(tcp).await {
            Ok(stream) => Some(Stream::Accepted(Box::new(stream))),
            Err(err) => {
                let reason = match hello_version {
                    Some(version) if version < TLS12_VERSION => "protocol_version",
                    _ => crate::tls::handshake_failure_reason(&err),
                };
                self.handshake_failed(reason);
                if let Some(suppressed) = self.log("tls_handshake") {
                    tracing::info!(endpoint = self.endpoint, %peer, reason, error = %err, suppressed, "TLS handshake failed; connection dropped");
                }
                None
            }
        }
    }

    /// Redis and etcd: TLS first, or nothing (etcd: ALPN `h2` or none;
    /// rustls refuses other ALPN offers). A plaintext client gets a refusal
    /// in its own protocol (a RESP error, an HTTP/2 gRPC error) and is dropped.
    async fn accept_tls_only(
        &self,
        mut tcp: TcpStream,
        peer: SocketAddr,
        opening: Opening,
    ) -> Accepted {
        match opening {
            Opening::Tls { hello_version } => {
                let Some(mut client) = self.tls(tcp, peer, hello_version).await else {
                    return Accepted::Dropped;
                };
                let mut preface = vec![0u8; FIRST_READ];
                match client.read(&mut preface).await {
                    Ok(n) if n > 0 => {
                        preface.truncate(n);
                        preface.shrink_to_fit();
                        Accepted::Session { client, preface }
                    }
                    Ok(_) => {
                        tracing::debug!(endpoint = self.endpoint, %peer, "client closed after the TLS handshake, before sending anything");
                        Accepted::Dropped
                    }
                    Err(err) => {
                        tracing::debug!(endpoint = self.endpoint, %peer, error = %err, "client connection failed after the TLS handshake");
                        Accepted::Dropped
                    }
                }
            }
            _ => {
                self.handshake_failed("not_tls");
                if let Some(suppressed) = self.log("not_tls") {
                    tracing::info!(endpoint = self.endpoint, %peer, reason = "not_tls", suppressed, "client did not start TLS; connection dropped");
                }
                let refusal = async {
                    match self.protocol {
                        Protocol::Etcd => etcd::refuse_plaintext(&mut tcp).await,
                        _ => redis::refuse_plaintext(&mut tcp).await,
                    }
                };
                let _ = tokio::time::timeout(REFUSAL_DEADLINE, refusal).await;
                Accepted::Dropped
            }
        }
    }

    async fn accept_postgres(
        &self,
        mut tcp: TcpStream,
        peer: SocketAddr,
        opening: Opening,
    ) -> Accepted {
        // Direct TLS (PostgreSQL 17 `sslnegotiation=direct`): only with ALPN.
        if let Opening::Tls { hello_version } = opening {
            let Some(mut client) = self.tls(tcp, peer, hello_version).await else {
                return Accepted::Dropped;
            };
            if client.alpn() != Some(postgres::ALPN) {
                self.protocol_error("direct_tls_without_alpn");
                if let Some(suppressed) = self.log("direct_tls_without_alpn") {
                    tracing::info!(endpoint = self.endpoint, %peer, suppressed, "direct TLS without ALPN \"postgresql\"; connection dropped");
                }
                postgres::send_error(
                    &mut client,
                    "08P01",
                    "portal: direct TLS connections must use ALPN \"postgresql\"",
                )
                .await;
                return Accepted::Dropped;
            }
            return self.after_tls(client, peer).await;
        }
        let mut gss_answered = false;
        loop {
            match postgres::read_opening(&mut tcp).await {
                Ok(PgOpening::SslRequest) => {
                    if tcp.write_all(b"S").await.is_err() {
                        return Accepted::Dropped;
                    }
                    let hello_version = match sniff(&tcp).await {
                        Ok(Opening::Tls { hello_version }) => hello_version,
                        _ => None,
                    };
                    let Some(client) = self.tls(tcp, peer, hello_version).await else {
                        return Accepted::Dropped;
                    };
                    return self.after_tls(client, peer).await;
                }
                Ok(PgOpening::GssEncRequest) if !gss_answered => {
                    gss_answered = true;
                    if tcp.write_all(b"N").await.is_err() {
                        return Accepted::Dropped;
                    }
                }
                Ok(PgOpening::GssEncRequest) => {
                    return self
                        .reject(
                            &mut tcp,
                            peer,
                            postgres::OpeningError::Unexpected("a second GSSENCRequest"),
                        )
                        .await;
                }
                Ok(PgOpening::Cancel(key)) => return Accepted::Cancel(key),
                Ok(PgOpening::Startup(message)) if self.allow_plaintext => {
                    return Accepted::Session {
                        client: Stream::Plain(tcp),
                        preface: message,
                    };
                }
                Ok(PgOpening::Startup(_)) => {
                    self.handshake_failed("not_tls");
                    if let Some(suppressed) = self.log("not_tls") {
                        tracing::info!(endpoint = self.endpoint, %peer, reason = "not_tls", suppressed, "plaintext PostgreSQL client on a TLS-only endpoint; refused");
                    }
                    postgres::send_error(
                        &mut tcp,
                        "28000",
                        "portal: this endpoint requires TLS; connect with sslmode=require, verify-ca or verify-full",
                    )
                    .await;
                    return Accepted::Dropped;
                }
                Err(ReadError::Protocol(err)) => return self.reject(&mut tcp, peer, err).await,
                Err(ReadError::Io(err)) => {
                    self.protocol_error("truncated");
                    if let Some(suppressed) = self.log("truncated") {
                        tracing::info!(endpoint = self.endpoint, %peer, error = %err, suppressed, "client closed mid-opening; connection dropped");
                    }
                    return Accepted::Dropped;
                }
            }
        }
    }

    /// Inside TLS, a PostgreSQL client sends its StartupMessage or a CancelRequest.
    async fn after_tls(&self, mut client: Stream, peer: SocketAddr) -> Accepted {
        match postgres::read_opening(&mut client).await {
            Ok(PgOpening::Startup(message)) => Accepted::Session {
                client,
                preface: message,
            },
            Ok(PgOpening::Cancel(key)) => Accepted::Cancel(key),
            Ok(PgOpening::SslRequest) | Ok(PgOpening::GssEncRequest) => {
                self.reject(
                    &mut client,
                    peer,
                    postgres::OpeningError::Unexpected("an encryption request inside TLS"),
                )
                .await
            }
            Err(ReadError::Protocol(err)) => self.reject(&mut client, peer, err).await,
            Err(ReadError::Io(err)) => {
                self.protocol_error("truncated");
                if let Some(suppressed) = self.log("truncated") {
                    tracing::info!(endpoint = self.endpoint, %peer, error = %err, suppressed, "client closed mid-opening; connection dropped");
                }
                Accepted::Dropped
            }
        }
    }

    async fn reject<S>(
        &self,
        stream: &mut S,
        peer: SocketAddr,
        err: postgres::OpeningError,
    ) -> Accepted
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        self.protocol_error(err.reason());
        if let Some(suppressed) = self.log("protocol_violation") {
            tracing::info!(endpoint = self.endpoint, %peer, reason = err.reason(), error = %err, suppressed, "protocol violation in the opening; connection dropped");
        }
        postgres::send_error(
            stream,
            "08P01",
            &format!("portal: invalid opening message: {err}"),
        )
        .await;
        Accepted::Dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openings_are_classified() {
        assert_eq!(classify_opening(b""), Opening::Closed);
        assert_eq!(classify_opening(b"PING\r\n"), Opening::Plaintext);
        assert_eq!(
            classify_opening(&[0x16, 0x03, 0x01]),
            Opening::Tls {
                hello_version: None
            }
        );
        let tls11 = [
            0x16, 0x03, 0x01, 0x00, 0x40, 0x01, 0x00, 0x00, 0x3c, 0x03, 0x02,
        ];
        assert_eq!(
            classify_opening(&tls11),
            Opening::Tls {
                hello_version: Some(0x0302)
            }
        );
    }
}
