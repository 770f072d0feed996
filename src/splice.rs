//! Relaying a session's bytes both ways, with the two things
//! `tokio::io::copy_bidirectional` cannot do: refuse to write one more byte
//! to the member once a gate says the member is no longer eligible, and,
//! for PostgreSQL, know where the client stands in the member's message
//! stream, so that a session closed on a leader change ends at a message
//! boundary.
//!
//! Each direction has one buffer, read into only when empty, like tokio's
//! own copy. The member-to-client direction feeds what the client has
//! accepted to a [`BackendFraming`], which only walks headers: no copy and
//! no allocation per message. When the session is to be closed, the caller
//! drops the relay (so the client-to-member direction stops at once), then
//! [`Splice::finish_message`] relays the rest of the message the client is
//! in the middle of, out of the same buffer and no further, after which a
//! message of the portal's own may follow.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::frontend::postgres::BackendFraming;

/// How a relay ended.
#[derive(Debug)]
pub enum Relayed {
    /// Both directions reached end of stream, or one failed.
    Finished(io::Result<()>),
    /// The gate closed: nothing more was written to the member.
    Gated,
}

/// One direction: a buffer and where its copy stands.
struct Pipe {
    buf: Box<[u8]>,
    /// Bytes `pos..cap` of `buf` are read and not yet written.
    pos: usize,
    cap: usize,
    read_done: bool,
    need_flush: bool,
    /// The writer was shut down after the reader's end of stream.
    done: bool,
}

impl Pipe {
    fn new(size: usize) -> Pipe {
        Pipe {
            buf: vec![0u8; size].into_boxed_slice(),
            pos: 0,
            cap: 0,
            read_done: false,
            need_flush: false,
            done: false,
        }
    }

    /// Copies until `reader` ends (then shuts `writer` down) or an error.
    /// Before each write, `open` is asked; when it says no, returns
    /// `Ready(None)` with nothing written. Each write's bytes go to
    /// `framing`, if any.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
        mut framing: Option<&mut BackendFraming>,
        open: &mut dyn FnMut() -> bool,
    ) -> Poll<Option<io::Result<()>>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            if self.pos == self.cap && !self.read_done {
                let mut buf = ReadBuf::new(&mut self.buf);
                match reader.as_mut().poll_read(cx, &mut buf) {
                    Poll::Ready(Ok(())) => {
                        let n = buf.filled().len();
                        self.pos = 0;
                        self.cap = n;
                        if n == 0 {
                            self.read_done = true;
                        }
                    }
                    Poll::Ready(Err(err)) => return Poll::Ready(Some(Err(err))),
                    Poll::Pending => {
                        // Nothing more to send for now: push out what the
                        // writer holds (a TLS record in the making).
                        if self.need_flush {
                            if let Err(err) = ready!(writer.as_mut().poll_flush(cx)) {
                                return Poll::Ready(Some(Err(err)));
                            }
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                }
            }
            while self.pos < self.cap {
                if !open() {
                    return Poll::Ready(None);
                }
                let written = ready!(writer
                    .as_mut()
                    .poll_write(cx, &self.buf[self.pos..self.cap]));
                let n = match written {
                    Ok(0) => return Poll::Ready(Some(Err(io::ErrorKind::WriteZero.into()))),
                    Ok(n) => n,
                    Err(err) => return Poll::Ready(Some(Err(err))),
                };
                if let Some(framing) = framing.as_deref_mut() {
                    framing.feed(&self.buf[self.pos..self.pos + n]);
                }
                self.pos += n;
                self.need_flush = true;
            }
            if self.read_done {
                if let Err(err) = ready!(writer.as_mut().poll_shutdown(cx)) {
                    return Poll::Ready(Some(Err(err)));
                }
                self.done = true;
                return Poll::Ready(Some(Ok(())));
            }
        }
    }
}

/// The state of a session's relay, kept across the relay and the close.
pub struct Splice {
    /// Client to member.
    up: Pipe,
    /// Member to client.
    down: Pipe,
    /// Where the client stands in the member's messages (PostgreSQL).
    framing: Option<BackendFraming>,
}

impl Splice {
    /// Buffers of `buffer` bytes each way; `framed` tracks PostgreSQL
    /// backend message boundaries on the way to the client.
    pub fn new(buffer: usize, framed: bool) -> Splice {
        Splice {
            up: Pipe::new(buffer),
            down: Pipe::new(buffer),
            framing: framed.then(BackendFraming::new),
        }
    }

    /// Relays both ways until both directions end, one fails, or `open`
    /// says no: it is asked first, and again before every write to the
    /// member, so no byte reaches the member once it has said no.
    pub fn poll_relay<C, S>(
        &mut self,
        cx: &mut Context<'_>,
        client: &mut C,
        server: &mut S,
        open: &mut dyn FnMut() -> bool,
    ) -> Poll<Relayed>
    where
        C: AsyncRead + AsyncWrite + Unpin + ?Sized,
        S: AsyncRead + AsyncWrite + Unpin + ?Sized,
    {
        if !open() {
            return Poll::Ready(Relayed::Gated);
        }
        let mut pending = false;
        if !self.up.done {
            match self.up.poll_copy(
                cx,
                Pin::new(&mut *client),
                Pin::new(&mut *server),
                None,
                open,
            ) {
                Poll::Ready(None) => return Poll::Ready(Relayed::Gated),
                Poll::Ready(Some(Err(err))) => return Poll::Ready(Relayed::Finished(Err(err))),
                Poll::Ready(Some(Ok(()))) => {}
                Poll::Pending => pending = true,
            }
        }
        if !self.down.done {
            let framing = self.framing.as_mut();
            match self.down.poll_copy(
                cx,
                Pin::new(&mut *server),
                Pin::new(&mut *client),
                framing,
                &mut || true,
            ) {
                // Never: this direction's gate is always open.
                Poll::Ready(None) => return Poll::Ready(Relayed::Gated),
                Poll::Ready(Some(Err(err))) => return Poll::Ready(Relayed::Finished(Err(err))),
                Poll::Ready(Some(Ok(()))) => {}
                Poll::Pending => pending = true,
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(Relayed::Finished(Ok(())))
        }
    }

    /// True when the client has been given whole backend messages only.
    pub fn at_boundary(&self) -> bool {
        self.framing
            .as_ref()
            .is_some_and(BackendFraming::at_boundary)
    }

    /// After the relay was dropped: relays member to client the rest of the
    /// message the client is in the middle of, from what is buffered and
    /// then from `server`, and not one byte more; flushes. `Some(bytes
    /// relayed)` once the client stands at a boundary; `None` when that
    /// cannot be (no framing, framing lost, the member's stream or the
    /// client's side already ended). Bound it with a timeout: the client
    /// may not be reading.
    pub async fn finish_message<C, S>(
        &mut self,
        client: &mut C,
        server: &mut S,
    ) -> io::Result<Option<u64>>
    where
        C: AsyncWrite + Unpin + ?Sized,
        S: AsyncRead + Unpin + ?Sized,
    {
        let Some(framing) = self.framing.as_mut() else {
            return Ok(None);
        };
        let down = &mut self.down;
        if down.done {
            return Ok(None);
        }
        let mut relayed = 0u64;
        loop {
            let need = match framing.needed() {
                None => return Ok(None),
                Some(0) => break,
                Some(n) => n,
            };
            if down.pos == down.cap {
                if down.read_done {
                    return Ok(None);
                }
                let n = server.read(&mut down.buf).await?;
                down.pos = 0;
                down.cap = n;
                if n == 0 {
                    down.read_done = true;
                    return Ok(None);
                }
            }
            let end = down.pos + need.min(down.cap - down.pos);
            let n = client.write(&down.buf[down.pos..end]).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            framing.feed(&down.buf[down.pos..down.pos + n]);
            down.pos += n;
            relayed += n as u64;
        }
        client.flush().await?;
        Ok(Some(relayed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![kind];
        m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    /// A member's output: rows of several sizes, then the end of a query.
    fn member_output() -> (Vec<u8>, Vec<usize>) {
        let mut out = Vec::new();
        let mut boundaries = vec![0];
        for m in [
            message(b'T', b"\x00\x01c\x00"),
            message(b'D', &[b'x'; 5000]),
            message(b'D', &[b'y'; 3]),
            message(b'D', &[b'z'; 40_000]),
            message(b'C', b"SELECT 3\x00"),
            message(b'Z', b"I"),
        ] {
            out.extend(m);
            boundaries.push(out.len());
        }
        (out, boundaries)
    }

    #[tokio::test]
    async fn finish_message_relays_up_to_the_next_boundary_and_no_further() {
        let (out, boundaries) = member_output();
        // The client was given `given` bytes; the splice holds the next
        // `held` bytes in its buffer; the rest is still with the member.
        for given in (0..out.len()).step_by(997).chain(boundaries.clone()) {
            for held in [0, 1, 4, 5, 100, 16 * 1024] {
                let held = held.min(out.len() - given);
                let mut splice = Splice::new(16 * 1024, true);
                if let Some(f) = splice.framing.as_mut() {
                    f.feed(&out[..given]);
                }
                splice.down.buf[..held].copy_from_slice(&out[given..given + held]);
                splice.down.cap = held;
                let mut member: &[u8] = &out[given + held..];
                let mut client: Vec<u8> = Vec::new();
                let relayed = splice
                    .finish_message(&mut client, &mut member)
                    .await
                    .expect("in-memory streams");
                let next = *boundaries
                    .iter()
                    .find(|b| **b >= given)
                    .expect("a boundary");
                assert_eq!(client, &out[given..next], "given {given}, held {held}");
                assert_eq!(relayed, Some((next - given) as u64));
                assert!(splice.at_boundary());
            }
        }
    }

    #[tokio::test]
    async fn finish_message_gives_up_when_the_member_ends_mid_message() {
        let (out, _) = member_output();
        let mut splice = Splice::new(1024, true);
        if let Some(f) = splice.framing.as_mut() {
            f.feed(&out[..10]);
        }
        let mut member: &[u8] = &out[10..2000]; // ends inside the first DataRow
        let mut client: Vec<u8> = Vec::new();
        let relayed = splice
            .finish_message(&mut client, &mut member)
            .await
            .expect("in-memory streams");
        assert_eq!(relayed, None);
        assert!(!splice.at_boundary());
    }

    #[tokio::test]
    async fn a_closed_gate_stops_the_client_to_member_direction() {
        use std::future::poll_fn;
        use std::sync::atomic::{AtomicBool, Ordering};

        let (mut client, mut client_far) = tokio::io::duplex(64 * 1024);
        let (mut server, mut server_far) = tokio::io::duplex(64 * 1024);
        let open = AtomicBool::new(true);
        let mut splice = Splice::new(1024, true);
        let mut gate = || open.load(Ordering::SeqCst);

        client_far.write_all(b"before").await.expect("write");
        let relay = poll_fn(|cx| splice.poll_relay(cx, &mut client, &mut server, &mut gate));
        let mut got = [0u8; 6];
        tokio::select! {
            relayed = relay => panic!("relay ended: {relayed:?}"),
            read = server_far.read_exact(&mut got) => { read.expect("read"); }
        }
        assert_eq!(&got, b"before");

        open.store(false, Ordering::SeqCst);
        client_far.write_all(b"after").await.expect("write");
        let relayed =
            poll_fn(|cx| splice.poll_relay(cx, &mut client, &mut server, &mut gate)).await;
        assert!(matches!(relayed, Relayed::Gated), "{relayed:?}");
        drop(client);
        drop(server);
        let mut rest = Vec::new();
        server_far.read_to_end(&mut rest).await.expect("read");
        assert!(
            rest.is_empty(),
            "{rest:?} reached the member after the gate closed"
        );
    }
}
