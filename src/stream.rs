//! One stream type for both legs of a session: plain TCP, TLS accepted from
//! a client, or TLS originated to a member.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

pub enum Stream {
    Plain(TcpStream),
    Accepted(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    Originated(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Stream {
    /// The ALPN protocol the client and the portal agreed on, if any.
    pub fn alpn(&self) -> Option<&[u8]> {
        match self {
            Stream::Accepted(tls) => tls.get_ref().1.alpn_protocol(),
            _ => None,
        }
    }

    /// The certificate a client presented on a TLS leg the portal accepted
    /// (only when the endpoint asks for one: `tls.client_ca`).
    pub fn client_certificate(&self) -> Option<&[u8]> {
        match self {
            Stream::Accepted(tls) => tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(|cert| cert.as_ref()),
            _ => None,
        }
    }

    /// The certificate a member presented on a TLS leg the portal opened.
    pub fn member_certificate(&self) -> Option<&[u8]> {
        match self {
            Stream::Originated(tls) => tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(|cert| cert.as_ref()),
            _ => None,
        }
    }
}

macro_rules! each {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Stream::Plain($s) => $e,
            Stream::Accepted($s) => $e,
            Stream::Originated($s) => $e,
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        each!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        each!(self, s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, s => Pin::new(s).poll_shutdown(cx))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        each!(self, s => Pin::new(s).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Accepted(s) => s.is_write_vectored(),
            Stream::Originated(s) => s.is_write_vectored(),
        }
    }
}

/// A stream whose first reads return `prefix`: bytes already read from it
/// (a client's first bytes, read to open the session) handed back to code
/// that reads the stream from its start (a refusal in the client's
/// protocol). Writes go straight to the stream.
pub struct Prefixed<'a, S> {
    prefix: &'a [u8],
    inner: &'a mut S,
}

impl<'a, S> Prefixed<'a, S> {
    pub fn new(prefix: &'a [u8], inner: &'a mut S) -> Self {
        Prefixed { prefix, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<'_, S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix = &this.prefix[n..];
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut *this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<'_, S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn a_prefixed_stream_reads_its_prefix_first() {
        let (mut near, mut far) = tokio::io::duplex(64);
        far.write_all(b" world").await.expect("write");
        drop(far);
        let mut read = String::new();
        Prefixed::new(b"hello", &mut near)
            .read_to_string(&mut read)
            .await
            .expect("read");
        assert_eq!(read, "hello world");
    }
}
