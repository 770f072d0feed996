//! Everything before bytes are forwarded: the TLS handshake and each
//! protocol's own way of refusing a client it cannot serve.

pub mod redis;

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

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

/// The ALPN protocols an endpoint of `protocol` offers.
pub fn alpn(protocol: Protocol) -> &'static [&'static [u8]] {
    match protocol {
        Protocol::Redis => &[],
    }
}
