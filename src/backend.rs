//! Connecting to members, a DCS or Patroni's REST API: plain TCP, or TLS
//! originated (PostgreSQL: after an `SSLRequest`; etcd: with ALPN `h2`;
//! the others at once), verifying the server against a configured CA only,
//! with a client certificate when configured.

use std::io;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::config::{ClientTls, Protocol};
use crate::frontend::postgres::SSL_REQUEST;
use crate::stream::Stream;
use crate::tls::TlsError;

/// TLS the portal originates to one kind of server (a cluster's members,
/// a DCS, Patroni's REST API): the client configuration and the name to
/// verify.
#[derive(Clone)]
pub struct Origination {
    connector: TlsConnector,
    server_name: Option<String>,
}

impl Origination {
    /// Without ALPN.
    pub fn new(config: &ClientTls) -> Result<Origination, TlsError> {
        Origination::with_alpn(config, &[])
    }

    /// Offering `alpn` (etcd serves gRPC over TLS only to clients that
    /// negotiate `h2`).
    pub fn with_alpn(config: &ClientTls, alpn: &[&[u8]]) -> Result<Origination, TlsError> {
        Ok(Origination {
            connector: TlsConnector::from(crate::tls::client_config(config, alpn)?),
            server_name: config.server_name.clone(),
        })
    }

    /// For the members of a `protocol` cluster: etcd members get ALPN `h2`.
    pub fn for_protocol(config: &ClientTls, protocol: Protocol) -> Result<Origination, TlsError> {
        match protocol {
            Protocol::Etcd => Origination::with_alpn(config, &[crate::frontend::etcd::ALPN]),
            Protocol::Redis | Protocol::Postgres => Origination::new(config),
        }
    }

    /// The name the server at `address` must prove: `server_name` when
    /// set, else the address's host (a DNS name or an IP address).
    fn name_for(&self, address: &str) -> io::Result<ServerName<'static>> {
        let host = match &self.server_name {
            Some(name) => name.as_str(),
            None => crate::probe::redis::split_host_port(address)
                .map(|(host, _)| host)
                .unwrap_or(address),
        };
        ServerName::try_from(host.to_string()).map_err(|err| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("server name {host:?}: {err}"),
            )
        })
    }

    /// The TLS handshake on `tcp`, to the server at `address`.
    async fn handshake(&self, address: &str, tcp: TcpStream) -> io::Result<Stream> {
        let name = self.name_for(address)?;
        let stream = self.connector.connect(name, tcp).await?;
        Ok(Stream::Originated(Box::new(stream)))
    }
}

/// Connects to `address` within `timeout`, then starts TLS at once when
/// `tls` is set: the way of every server but PostgreSQL (Redis, Sentinel,
/// etcd, Patroni's REST API).
pub async fn connect_direct(
    address: &str,
    tls: Option<&Origination>,
    timeout: Duration,
) -> io::Result<Stream> {
    connect(Protocol::Redis, address, tls, timeout).await
}

/// Connects to `address` within `timeout`, then starts TLS the protocol's way
/// when `tls` is set.
pub async fn connect(
    protocol: Protocol,
    address: &str,
    tls: Option<&Origination>,
    timeout: Duration,
) -> io::Result<Stream> {
    let tcp = tokio::time::timeout(timeout, TcpStream::connect(address))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect to {address} timed out"),
            )
        })??;
    crate::proxy::tune(&tcp);
    let Some(tls) = tls else {
        return Ok(Stream::Plain(tcp));
    };
    let handshake = async {
        let mut tcp = tcp;
        if protocol == Protocol::Postgres {
            let mut request = [0u8; 8];
            request[..4].copy_from_slice(&8u32.to_be_bytes());
            request[4..].copy_from_slice(&SSL_REQUEST.to_be_bytes());
            tcp.write_all(&request).await?;
            let mut answer = [0u8; 1];
            tcp.read_exact(&mut answer).await?;
            if answer[0] != b'S' {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!(
                        "member {address} does not accept TLS (answered {:?})",
                        answer[0] as char
                    ),
                ));
            }
        }
        tls.handshake(address, tcp).await
    };
    tokio::time::timeout(timeout, handshake)
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("TLS to {address} timed out"),
            )
        })?
}
