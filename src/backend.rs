//! Connecting to members: plain TCP, or TLS originated (PostgreSQL: after an
//! `SSLRequest`; etcd: with ALPN `h2`), verifying the member against a
//! configured CA.

use std::io;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::config::{BackendTls, Protocol};
use crate::frontend::postgres::SSL_REQUEST;
use crate::stream::Stream;
use crate::tls::TlsError;

/// TLS towards the members of one cluster.
#[derive(Clone)]
pub struct Origination {
    connector: TlsConnector,
    server_name: Option<String>,
}

impl Origination {
    pub fn new(config: &BackendTls) -> Result<Origination, TlsError> {
        Ok(Origination {
            connector: TlsConnector::from(crate::tls::client_config(&config.ca)?),
            server_name: config.server_name.clone(),
        })
    }

    /// Like `new`, offering the protocol's ALPN: etcd members serve gRPC
    /// over TLS only to clients that negotiate `h2`.
    pub fn for_protocol(config: &BackendTls, protocol: Protocol) -> Result<Origination, TlsError> {
        if protocol != Protocol::Etcd {
            return Origination::new(config);
        }
        let mut client = (*crate::tls::client_config(&config.ca)?).clone();
        client.alpn_protocols = vec![crate::frontend::etcd::ALPN.to_vec()];
        Ok(Origination {
            connector: TlsConnector::from(std::sync::Arc::new(client)),
            server_name: config.server_name.clone(),
        })
    }

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

    pub fn connector(&self) -> &TlsConnector {
        &self.connector
    }

    pub fn server_name(&self, address: &str) -> io::Result<ServerName<'static>> {
        self.name_for(address)
    }
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
        let name = tls.name_for(address)?;
        let stream = tls.connector.connect(name, tcp).await?;
        Ok(Stream::Originated(Box::new(stream)))
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
