//! Everything before bytes are forwarded: the TLS handshake and each
//! protocol's own way of refusing a client it cannot serve.

pub mod redis;

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::config::Protocol;

/// Why the portal turns a client away after its handshake.
#[derive(Debug, Clone)]
pub enum Refusal {
    /// No eligible member within `hold_timeout`.
    NoMember {
        cluster: String,
        waited: Duration,
        split_brain: bool,
    },
    MaxConnections,
    ShuttingDown,
}

impl Refusal {
    pub fn metric_reason(&self) -> &'static str {
        match self {
            Refusal::NoMember { .. } => "no_leader",
            Refusal::MaxConnections => "max_connections",
            Refusal::ShuttingDown => "shutdown",
        }
    }
}

/// Answers `refusal` in the client's protocol, then closes.
pub async fn refuse<S>(protocol: Protocol, stream: &mut S, refusal: &Refusal)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match protocol {
        Protocol::Redis => redis::refuse(stream, refusal).await,
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

/// Answers a client that spoke plaintext to a TLS endpoint, in its protocol.
pub async fn refuse_plaintext<S>(protocol: Protocol, stream: &mut S)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match protocol {
        Protocol::Redis => redis::refuse_plaintext(stream).await,
    }
}

/// The ALPN protocols an endpoint of `protocol` offers.
pub fn alpn(protocol: Protocol) -> &'static [&'static [u8]] {
    match protocol {
        Protocol::Redis => &[],
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
