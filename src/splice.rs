//! Relaying a session's bytes both ways, with the two things
//! `tokio::io::copy_bidirectional` cannot do: refuse to write one more byte
//! to the member once a gate says the member is no longer eligible, and,
//! for PostgreSQL, know where the client stands in the member's message
//! stream, so that a session closed on a leader change ends at a message
//! boundary.
//!
//! A session holds no buffer while it is idle. Each direction reads into
//! the worker thread's scratch buffer and writes what it read at once; only
//! bytes the writer did not take (it is slow, or a gate closed) are copied
//! into a buffer of the session's own, freed once they are written. So an
//! idle session costs its TLS state and sockets, not two 16 KiB buffers.
//! The member-to-client direction feeds what the client has accepted to a
//! [`BackendFraming`], which only walks headers: no copy and no allocation
//! per message. When the session is to be closed, the caller drops the
//! relay (so the client-to-member direction stops at once), then
//! [`Splice::finish_message`] relays the rest of the message the client is
//! in the middle of, from what is held and then from the member, and no
//! further, after which a message of the portal's own may follow.

use std::cell::RefCell;
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

/// The size of each worker thread's scratch buffer: one read's worth of
/// bytes, at most (a few TLS records).
pub const SCRATCH: usize = 64 * 1024;

/// One read of [`Splice::finish_message`] (a session being closed).
const CLOSE_READ: usize = 16 * 1024;

thread_local! {
    /// Where every session on this thread reads into. Borrowed only within
    /// one synchronous [`Pipe::poll_copy`], never across an `await`.
    static SCRATCH_BUFFER: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; SCRATCH].into_boxed_slice());
}

/// One direction: the bytes read and not yet written, if any, and where
/// the copy stands.
struct Pipe {
    /// Bytes `pos..` of `held` are read and not yet written. Empty (no
    /// allocation) while the writer keeps up.
    held: Vec<u8>,
    pos: usize,
    read_done: bool,
    need_flush: bool,
    /// The writer was shut down after the reader's end of stream.
    done: bool,
}

/// What writing a slice came to.
enum Wrote {
    /// All of it.
    All,
    /// `n` bytes; the writer is not ready for the rest.
    Part(usize, Poll<io::Error>),
}

impl Pipe {
    fn new() -> Pipe {
        Pipe {
            held: Vec::new(),
            pos: 0,
            read_done: false,
            need_flush: false,
            done: false,
        }
    }

    fn holds(&self) -> bool {
        self.pos < self.held.len()
    }

    /// Writes `bytes` to `writer` until all are written, the writer is not
    /// ready, or `open` says no (`Part` with `Pending` then, and the caller
    /// returns `Ready(None)` instead).
    fn write_out<W: AsyncWrite + ?Sized>(
        cx: &mut Context<'_>,
        mut writer: Pin<&mut W>,
        bytes: &[u8],
        framing: &mut Option<&mut BackendFraming>,
        open: &mut dyn FnMut() -> bool,
        gated: &mut bool,
    ) -> Wrote {
        let mut at = 0;
        while at < bytes.len() {
            if !open() {
                *gated = true;
                return Wrote::Part(at, Poll::Pending);
            }
            match writer.as_mut().poll_write(cx, &bytes[at..]) {
                Poll::Ready(Ok(0)) => {
                    return Wrote::Part(at, Poll::Ready(io::ErrorKind::WriteZero.into()))
                }
                Poll::Ready(Ok(n)) => {
                    if let Some(framing) = framing.as_deref_mut() {
                        framing.feed(&bytes[at..at + n]);
                    }
                    at += n;
                }
                Poll::Ready(Err(err)) => return Wrote::Part(at, Poll::Ready(err)),
                Poll::Pending => return Wrote::Part(at, Poll::Pending),
            }
        }
        Wrote::All
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
        let mut gated = false;
        loop {
            // What an earlier write left, first.
            if self.holds() {
                let wrote = Pipe::write_out(
                    cx,
                    writer.as_mut(),
                    &self.held[self.pos..],
                    &mut framing,
                    open,
                    &mut gated,
                );
                match wrote {
                    Wrote::All => {
                        self.held = Vec::new();
                        self.pos = 0;
                        self.need_flush = true;
                    }
                    Wrote::Part(n, end) => {
                        self.pos += n;
                        self.need_flush |= n > 0;
                        if gated {
                            return Poll::Ready(None);
                        }
                        return match end {
                            Poll::Ready(err) => Poll::Ready(Some(Err(err))),
                            Poll::Pending => Poll::Pending,
                        };
                    }
                }
            }
            if self.read_done {
                if let Err(err) = ready!(writer.as_mut().poll_shutdown(cx)) {
                    return Poll::Ready(Some(Err(err)));
                }
                self.done = true;
                return Poll::Ready(Some(Ok(())));
            }
            // Read into the thread's scratch buffer and write it out at
            // once; keep only what the writer did not take.
            let step = SCRATCH_BUFFER.with(|scratch| {
                let Ok(mut scratch) = scratch.try_borrow_mut() else {
                    // Never: nothing polled from here reaches back here.
                    return Some(Poll::Ready(Some(Err(io::Error::other(
                        "relay scratch buffer in use",
                    )))));
                };
                let mut buf = ReadBuf::new(&mut scratch[..]);
                match reader.as_mut().poll_read(cx, &mut buf) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(err)) => return Some(Poll::Ready(Some(Err(err)))),
                    Poll::Pending => return Some(Poll::Pending),
                }
                let n = buf.filled().len();
                if n == 0 {
                    self.read_done = true;
                    return None;
                }
                let bytes = &scratch[..n];
                match Pipe::write_out(cx, writer.as_mut(), bytes, &mut framing, open, &mut gated) {
                    Wrote::All => {
                        self.need_flush = true;
                        None
                    }
                    Wrote::Part(k, end) => {
                        self.held = bytes[k..].to_vec();
                        self.pos = 0;
                        self.need_flush |= k > 0;
                        if gated {
                            return Some(Poll::Ready(None));
                        }
                        match end {
                            Poll::Ready(err) => Some(Poll::Ready(Some(Err(err)))),
                            Poll::Pending => Some(Poll::Pending),
                        }
                    }
                }
            });
            match step {
                None => continue,
                Some(Poll::Pending) => {
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
                Some(ready) => return ready,
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
    /// `framed` tracks PostgreSQL backend message boundaries on the way to
    /// the client.
    pub fn new(framed: bool) -> Splice {
        Splice {
            up: Pipe::new(),
            down: Pipe::new(),
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
            if !down.holds() {
                if down.read_done {
                    return Ok(None);
                }
                let mut buf = vec![0u8; CLOSE_READ];
                let n = server.read(&mut buf).await?;
                if n == 0 {
                    down.read_done = true;
                    return Ok(None);
                }
                buf.truncate(n);
                down.held = buf;
                down.pos = 0;
            }
            let end = down.pos + need.min(down.held.len() - down.pos);
            let n = client.write(&down.held[down.pos..end]).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            framing.feed(&down.held[down.pos..down.pos + n]);
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
                let mut splice = Splice::new(true);
                if let Some(f) = splice.framing.as_mut() {
                    f.feed(&out[..given]);
                }
                splice.down.held = out[given..given + held].to_vec();
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
        let mut splice = Splice::new(true);
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
        let mut splice = Splice::new(true);
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

    /// A writer that takes a few bytes at a time and is often not ready
    /// (waking itself), the way a slow client's socket behaves.
    struct Stingy {
        got: Vec<u8>,
        seed: u64,
    }

    impl Stingy {
        fn next(&mut self) -> u64 {
            self.seed = self
                .seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.seed >> 33
        }
    }

    impl AsyncWrite for Stingy {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            if self.next().is_multiple_of(3) {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let n = (1 + self.next() as usize % 7000).min(buf.len());
            self.got.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn every_byte_reaches_a_slow_writer_in_order_and_nothing_is_held_after() {
        use std::future::poll_fn;
        for seed in 0..20u64 {
            let data: Vec<u8> = (0..300_000u32)
                .map(|i| (i * 7 + seed as u32) as u8)
                .collect();
            let mut reader: &[u8] = &data;
            let mut writer = Stingy {
                got: Vec::new(),
                seed,
            };
            let mut pipe = Pipe::new();
            let copied = poll_fn(|cx| {
                pipe.poll_copy(
                    cx,
                    Pin::new(&mut reader),
                    Pin::new(&mut writer),
                    None,
                    &mut || true,
                )
            })
            .await;
            assert!(matches!(copied, Some(Ok(()))), "seed {seed}: {copied:?}");
            assert!(writer.got == data, "seed {seed}: bytes lost or reordered");
            assert!(
                !pipe.holds() && pipe.held.capacity() == 0,
                "seed {seed}: a buffer is still held"
            );
        }
    }
}
