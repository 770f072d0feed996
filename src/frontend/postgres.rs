//! The PostgreSQL frontend, written from the protocol documentation
//! ("Message Flow" and "Message Formats" of the frontend/backend protocol).
//!
//! A PostgreSQL client does not open with a ClientHello but with an 8-byte
//! `SSLRequest` (answered `S`, then TLS), or a `GSSENCRequest` (answered `N`),
//! a `CancelRequest`, or a plaintext `StartupMessage`. PostgreSQL 17 clients
//! may instead start TLS at once ("direct" negotiation), which is accepted
//! only with ALPN `postgresql`. Everything is read with exact lengths from the
//! socket, never through a read-ahead buffer, so no byte a client pipelines
//! behind `SSLRequest` is ever taken as if it had come over TLS.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub const SSL_REQUEST: u32 = 80_877_103;
pub const GSSENC_REQUEST: u32 = 80_877_104;
pub const CANCEL_REQUEST: u32 = 80_877_102;
/// Protocol major version 3, in the high 16 bits of a StartupMessage's code.
const PROTOCOL_MAJOR_3: u32 = 3;
/// Longest opening message accepted, as the server's own limit.
pub const MAX_OPENING: u32 = 10_000;
/// A cancel key is 4 bytes before protocol 3.2, at most 256 after.
const MAX_CANCEL_SECRET: u32 = 256;
/// ALPN protocol id of PostgreSQL.
pub const ALPN: &[u8] = b"postgresql";

/// One opening message from a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opening {
    SslRequest,
    GssEncRequest,
    Cancel(CancelKey),
    /// A whole StartupMessage, length prefix included, to replay to the member.
    Startup(Vec<u8>),
}

/// The key of a session, as `BackendKeyData` gave it and `CancelRequest` repeats it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CancelKey {
    pub pid: u32,
    pub secret: Vec<u8>,
}

impl CancelKey {
    /// The CancelRequest message carrying this key.
    pub fn request(&self) -> Vec<u8> {
        let len = 12 + self.secret.len() as u32;
        let mut out = Vec::with_capacity(len as usize);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&CANCEL_REQUEST.to_be_bytes());
        out.extend_from_slice(&self.pid.to_be_bytes());
        out.extend_from_slice(&self.secret);
        out
    }
}

/// Why an opening was refused; `reason` labels the metric.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpeningError {
    #[error("opening message length {0} is below 8")]
    TooShort(u32),
    #[error("opening message length {0} is above {MAX_OPENING}")]
    TooLong(u32),
    #[error("unknown opening code {0}")]
    UnknownCode(u32),
    #[error("{what} with length {len}")]
    BadLength { what: &'static str, len: u32 },
    #[error("{0} is not allowed here")]
    Unexpected(&'static str),
}

impl OpeningError {
    pub fn reason(&self) -> &'static str {
        match self {
            OpeningError::TooShort(_) => "length_too_short",
            OpeningError::TooLong(_) => "length_too_long",
            OpeningError::UnknownCode(_) => "unknown_code",
            OpeningError::BadLength { .. } => "bad_length",
            OpeningError::Unexpected(_) => "unexpected_message",
        }
    }
}

/// What the 8-byte header of an opening says: its length and which message
/// it is, before the body (if any) is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    SslRequest,
    GssEncRequest,
    /// A CancelRequest; `len` bytes in all.
    Cancel {
        len: u32,
    },
    /// A StartupMessage; `len` bytes in all.
    Startup {
        len: u32,
    },
}

/// Decodes an opening's header.
pub fn decode_header(header: [u8; 8]) -> Result<Header, OpeningError> {
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
    let code = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    if len < 8 {
        return Err(OpeningError::TooShort(len));
    }
    if len > MAX_OPENING {
        return Err(OpeningError::TooLong(len));
    }
    match code {
        SSL_REQUEST | GSSENC_REQUEST if len != 8 => Err(OpeningError::BadLength {
            what: if code == SSL_REQUEST {
                "SSLRequest"
            } else {
                "GSSENCRequest"
            },
            len,
        }),
        SSL_REQUEST => Ok(Header::SslRequest),
        GSSENC_REQUEST => Ok(Header::GssEncRequest),
        CANCEL_REQUEST if !(16..=12 + MAX_CANCEL_SECRET).contains(&len) => {
            Err(OpeningError::BadLength {
                what: "CancelRequest",
                len,
            })
        }
        CANCEL_REQUEST => Ok(Header::Cancel { len }),
        code if code >> 16 == PROTOCOL_MAJOR_3 => Ok(Header::Startup { len }),
        code => Err(OpeningError::UnknownCode(code)),
    }
}

/// Errors reading an opening: the socket's, or the client's.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Protocol(#[from] OpeningError),
}

/// Reads one opening message, exactly its bytes.
pub async fn read_opening<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Opening, ReadError> {
    let mut header = [0u8; 8];
    stream.read_exact(&mut header).await?;
    match decode_header(header)? {
        Header::SslRequest => Ok(Opening::SslRequest),
        Header::GssEncRequest => Ok(Opening::GssEncRequest),
        Header::Cancel { len } => {
            let mut body = vec![0u8; len as usize - 8];
            stream.read_exact(&mut body).await?;
            let pid = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
            Ok(Opening::Cancel(CancelKey {
                pid,
                secret: body[4..].to_vec(),
            }))
        }
        Header::Startup { len } => {
            let mut message = vec![0u8; len as usize];
            message[..8].copy_from_slice(&header);
            stream.read_exact(&mut message[8..]).await?;
            Ok(Opening::Startup(message))
        }
    }
}

/// The `user` and `database` of a StartupMessage, for logs.
pub fn startup_identity(message: &[u8]) -> (Option<String>, Option<String>) {
    let mut user = None;
    let mut database = None;
    let mut fields = message.get(8..).unwrap_or_default().split(|b| *b == 0);
    while let (Some(key), Some(value)) = (fields.next(), fields.next()) {
        if key.is_empty() {
            break;
        }
        let value = String::from_utf8_lossy(value).into_owned();
        match key {
            b"user" => user = Some(value),
            b"database" => database = Some(value),
            _ => {}
        }
    }
    (user, database)
}

/// An `ErrorResponse` message, severity FATAL.
pub fn error_response(sqlstate: &str, message: &str) -> Vec<u8> {
    let mut body = Vec::new();
    for (field, value) in [
        (b'S', "FATAL"),
        (b'V', "FATAL"),
        (b'C', sqlstate),
        (b'M', message),
    ] {
        body.push(field);
        // A NUL inside a field would end it early: drop any.
        body.extend(value.bytes().filter(|b| *b != 0));
        body.push(0);
    }
    body.push(0);
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(b'E');
    out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// Sends an ErrorResponse and closes.
pub async fn send_error<S: AsyncWrite + Unpin>(stream: &mut S, sqlstate: &str, message: &str) {
    let _ = tokio::time::timeout(super::REFUSAL_DEADLINE, async {
        stream.write_all(&error_response(sqlstate, message)).await?;
        stream.flush().await?;
        stream.shutdown().await
    })
    .await;
}

/// Watches the first messages a member sends a client for `BackendKeyData`,
/// then gets out of the way: after `ReadyForQuery` (or an error) it is done.
#[derive(Debug, Default)]
pub struct KeyWatcher {
    /// Bytes of the current message header (type + length) seen so far.
    header: Vec<u8>,
    /// Bytes of the current message body still to come.
    remaining: usize,
    /// The body of a BackendKeyData being collected.
    key_body: Option<Vec<u8>>,
    done: bool,
}

/// Longest BackendKeyData body: pid + a 256-byte key.
const MAX_KEY_BODY: usize = 4 + MAX_CANCEL_SECRET as usize;

impl KeyWatcher {
    pub fn new() -> KeyWatcher {
        KeyWatcher::default()
    }

    pub fn done(&self) -> bool {
        self.done
    }

    /// Feeds bytes from the member; returns the key once it is complete.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Option<CancelKey> {
        let mut found = None;
        while !self.done && !bytes.is_empty() {
            if self.remaining == 0 && self.header.len() < 5 {
                let take = (5 - self.header.len()).min(bytes.len());
                self.header.extend_from_slice(&bytes[..take]);
                bytes = &bytes[take..];
                if self.header.len() < 5 {
                    break;
                }
                let kind = self.header[0];
                let len = u32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]);
                let Some(body) = (len as usize).checked_sub(4) else {
                    self.done = true; // not the protocol we expect: stop watching
                    break;
                };
                match kind {
                    b'K' if (8..=MAX_KEY_BODY).contains(&body) => {
                        self.key_body = Some(Vec::with_capacity(body))
                    }
                    b'Z' | b'E' => self.done = true,
                    _ => {}
                }
                self.remaining = body;
                if body == 0 {
                    self.header.clear();
                }
                continue;
            }
            let take = self.remaining.min(bytes.len());
            if let Some(key) = self.key_body.as_mut() {
                key.extend_from_slice(&bytes[..take]);
            }
            bytes = &bytes[take..];
            self.remaining -= take;
            if self.remaining == 0 {
                self.header.clear();
                if let Some(body) = self.key_body.take() {
                    let pid = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
                    found = Some(CancelKey {
                        pid,
                        secret: body[4..].to_vec(),
                    });
                }
            }
        }
        found
    }
}

/// Where a stream of backend messages stands, fed the bytes a client has
/// been given: at a message boundary, or how many bytes short of the next
/// one. Every message a member sends after the startup message is framed
/// (a type byte, then a big-endian length that counts itself), so a session
/// can be cut where the client's parser expects a new message, and the
/// portal's own `ErrorResponse` lands there rather than inside a half-relayed
/// `DataRow`.
///
/// The state is a few integers; `feed` walks message headers and skips
/// bodies, without copying or allocating.
#[derive(Debug, Default, Clone)]
pub struct BackendFraming {
    /// Bytes of the current header (type + length) seen: 0 at a boundary or
    /// inside a body, 1 to 4 inside a header.
    header_seen: u8,
    /// The length field as it arrives, when a header is split.
    len: [u8; 4],
    /// Body bytes of the current message still to come.
    remaining: usize,
    /// A length below 4: not PostgreSQL framing; no boundary is ever known
    /// again.
    lost: bool,
}

impl BackendFraming {
    pub fn new() -> BackendFraming {
        BackendFraming::default()
    }

    /// Advances over `bytes`, the next ones the client was given.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() && !self.lost {
            if self.remaining > 0 {
                let take = self.remaining.min(bytes.len());
                self.remaining -= take;
                bytes = &bytes[take..];
                continue;
            }
            if self.header_seen == 0 && bytes.len() >= 5 {
                // The common case: a whole header in hand.
                self.start_body([bytes[1], bytes[2], bytes[3], bytes[4]]);
                bytes = &bytes[5..];
                continue;
            }
            // A header split across writes: one byte at a time.
            if self.header_seen > 0 {
                self.len[usize::from(self.header_seen) - 1] = bytes[0];
            }
            self.header_seen += 1;
            bytes = &bytes[1..];
            if self.header_seen == 5 {
                self.header_seen = 0;
                self.start_body(self.len);
            }
        }
    }

    fn start_body(&mut self, len: [u8; 4]) {
        match (u32::from_be_bytes(len) as usize).checked_sub(4) {
            Some(body) => self.remaining = body,
            None => self.lost = true,
        }
    }

    /// How many more bytes the client needs before the current message is
    /// whole or its length is known: 0 at a boundary; the rest of the
    /// header inside a header (feed them, then ask again); the rest of the
    /// body inside a body. `None` once the framing is lost.
    pub fn needed(&self) -> Option<usize> {
        if self.lost {
            None
        } else if self.remaining > 0 {
            Some(self.remaining)
        } else if self.header_seen > 0 {
            Some(5 - usize::from(self.header_seen))
        } else {
            Some(0)
        }
    }

    /// True when the client has been given whole messages only.
    pub fn at_boundary(&self) -> bool {
        self.needed() == Some(0)
    }
}

/// Which member (`M`) issued which cancel key. Bounded: when full, new keys
/// are not recorded (their cancels are then dropped, as for unknown keys).
pub struct CancelKeys<M> {
    keys: Mutex<HashMap<CancelKey, M>>,
    capacity: usize,
}

impl<M: Clone> CancelKeys<M> {
    pub fn new(capacity: usize) -> CancelKeys<M> {
        CancelKeys {
            keys: Mutex::new(HashMap::new()),
            capacity,
        }
    }

    /// Records `key`; false when the map is full.
    pub fn insert(&self, key: CancelKey, member: M) -> bool {
        let Ok(mut keys) = self.keys.lock() else {
            return false;
        };
        if keys.len() >= self.capacity && !keys.contains_key(&key) {
            return false;
        }
        keys.insert(key, member);
        true
    }

    pub fn remove(&self, key: &CancelKey) {
        if let Ok(mut keys) = self.keys.lock() {
            keys.remove(key);
        }
    }

    pub fn member(&self, key: &CancelKey) -> Option<M> {
        self.keys.lock().ok()?.get(key).cloned()
    }

    pub fn len(&self) -> usize {
        self.keys.lock().map_or(0, |k| k.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(len: u32, code: u32) -> [u8; 8] {
        let mut h = [0u8; 8];
        h[..4].copy_from_slice(&len.to_be_bytes());
        h[4..].copy_from_slice(&code.to_be_bytes());
        h
    }

    #[test]
    fn openings_decode() {
        assert_eq!(
            decode_header(header(8, SSL_REQUEST)),
            Ok(Header::SslRequest)
        );
        assert_eq!(
            decode_header(header(8, GSSENC_REQUEST)),
            Ok(Header::GssEncRequest)
        );
        assert_eq!(
            decode_header(header(16, CANCEL_REQUEST)),
            Ok(Header::Cancel { len: 16 })
        );
        assert_eq!(
            decode_header(header(40, 196_608)),
            Ok(Header::Startup { len: 40 })
        );
        assert_eq!(
            decode_header(header(7, SSL_REQUEST)),
            Err(OpeningError::TooShort(7))
        );
        assert_eq!(
            decode_header(header(0x7fff_ffff, 196_608)),
            Err(OpeningError::TooLong(0x7fff_ffff))
        );
        assert_eq!(
            decode_header(header(8, 1234)),
            Err(OpeningError::UnknownCode(1234))
        );
        assert!(matches!(
            decode_header(header(12, SSL_REQUEST)),
            Err(OpeningError::BadLength { .. })
        ));
        assert!(matches!(
            decode_header(header(12, CANCEL_REQUEST)),
            Err(OpeningError::BadLength { .. })
        ));
    }

    #[tokio::test]
    async fn openings_read_exactly_their_bytes() {
        let mut input: Vec<u8> = Vec::new();
        input.extend_from_slice(&header(8, SSL_REQUEST));
        input.extend_from_slice(b"\x16\x03\x01"); // a ClientHello starts: not ours to read
        let mut reader = &input[..];
        assert_eq!(
            read_opening(&mut reader).await.expect("read"),
            Opening::SslRequest
        );
        assert_eq!(reader, b"\x16\x03\x01");

        let key = CancelKey {
            pid: 42,
            secret: vec![1, 2, 3, 4],
        };
        let request = key.request();
        let mut reader = &request[..];
        assert_eq!(
            read_opening(&mut reader).await.expect("read"),
            Opening::Cancel(key)
        );
    }

    #[tokio::test]
    async fn a_truncated_opening_is_an_io_error_not_a_panic() {
        let mut reader: &[u8] = &[0, 0, 0, 40, 0, 3, 0, 0, b'u'];
        assert!(matches!(
            read_opening(&mut reader).await,
            Err(ReadError::Io(_))
        ));
        let mut reader: &[u8] = &[0, 0];
        assert!(matches!(
            read_opening(&mut reader).await,
            Err(ReadError::Io(_))
        ));
    }

    #[test]
    fn startup_identity_reads_user_and_database() {
        let mut m = header(0, 196_608).to_vec();
        m.extend_from_slice(b"user\0alice\0database\0shop\0\0");
        assert_eq!(
            startup_identity(&m),
            (Some("alice".into()), Some("shop".into()))
        );
        assert_eq!(startup_identity(b"short"), (None, None));
    }

    #[test]
    fn error_responses_are_well_formed() {
        let e = error_response("57P03", "no\0leader");
        assert_eq!(e[0], b'E');
        let len = u32::from_be_bytes([e[1], e[2], e[3], e[4]]) as usize;
        assert_eq!(len + 1, e.len());
        assert!(e.windows(6).any(|w| w == b"C57P03"));
        assert_eq!(*e.last().expect("nonempty"), 0);
    }

    fn message(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![kind];
        m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    #[test]
    fn the_key_watcher_finds_backend_key_data_across_any_split() {
        let mut stream = Vec::new();
        stream.extend(message(b'R', &0u32.to_be_bytes()));
        stream.extend(message(b'S', b"server_version\x0015\x00"));
        let mut key_body = 4242u32.to_be_bytes().to_vec();
        key_body.extend_from_slice(&[9, 8, 7, 6]);
        stream.extend(message(b'K', &key_body));
        stream.extend(message(b'Z', b"I"));
        stream.extend(b"after ReadyForQuery, never parsed");
        let want = CancelKey {
            pid: 4242,
            secret: vec![9, 8, 7, 6],
        };
        for chunk in 1..=stream.len() {
            let mut w = KeyWatcher::new();
            let mut found = None;
            for piece in stream.chunks(chunk) {
                if let Some(k) = w.feed(piece) {
                    found = Some(k);
                }
            }
            assert_eq!(found.as_ref(), Some(&want), "chunk size {chunk}");
            assert!(w.done(), "chunk size {chunk}");
        }
    }

    #[test]
    fn the_key_watcher_survives_garbage() {
        let mut w = KeyWatcher::new();
        assert_eq!(w.feed(&[b'K', 0, 0, 0, 1]), None); // length below 4
        assert!(w.done());
        let mut w = KeyWatcher::new();
        assert_eq!(w.feed(&[b'K', 0xff, 0xff, 0xff, 0xff, 1, 2, 3]), None); // oversized: not collected
        let mut w = KeyWatcher::new();
        assert_eq!(w.feed(&message(b'E', b"SFATAL\0\0")), None);
        assert!(w.done());
    }

    /// Messages of every shape: empty bodies, short, one long enough that
    /// its length needs more than one byte.
    fn framed_stream() -> (Vec<u8>, Vec<usize>) {
        let mut stream = Vec::new();
        let mut boundaries = vec![0];
        for m in [
            message(b'1', b""),
            message(b'T', b"\x00\x01col\x00"),
            message(b'D', &[b'x'; 300]),
            message(b'n', b""),
            message(b'D', &[b'y'; 7]),
            message(b'C', b"SELECT 2\x00"),
            message(b'Z', b"I"),
        ] {
            stream.extend(m);
            boundaries.push(stream.len());
        }
        (stream, boundaries)
    }

    /// What `needed` must say `at` bytes into `stream`.
    fn expected_need(boundaries: &[usize], at: usize) -> usize {
        if boundaries.contains(&at) {
            return 0;
        }
        let start = *boundaries.iter().rev().find(|b| **b < at).expect("a start");
        let end = *boundaries.iter().find(|b| **b > at).expect("an end");
        if at < start + 5 {
            start + 5 - at
        } else {
            end - at
        }
    }

    #[test]
    fn backend_framing_knows_every_boundary_across_any_split() {
        let (stream, boundaries) = framed_stream();
        // Fed in pieces of every size, and checked after every piece.
        for chunk in 1..=stream.len() {
            let mut f = BackendFraming::new();
            let mut at = 0;
            for piece in stream.chunks(chunk) {
                f.feed(piece);
                at += piece.len();
                assert_eq!(
                    f.needed(),
                    Some(expected_need(&boundaries, at)),
                    "chunk size {chunk}, offset {at}"
                );
            }
            assert!(f.at_boundary(), "chunk size {chunk}");
        }
        // Cut once at every byte, and at every pair of bytes.
        for i in 0..=stream.len() {
            for j in i..=stream.len() {
                let mut f = BackendFraming::new();
                f.feed(&stream[..i]);
                assert_eq!(
                    f.needed(),
                    Some(expected_need(&boundaries, i)),
                    "cut at {i}"
                );
                f.feed(&stream[i..j]);
                assert_eq!(
                    f.needed(),
                    Some(expected_need(&boundaries, j)),
                    "cuts at {i}, {j}"
                );
                f.feed(&stream[j..]);
                assert!(f.at_boundary(), "cuts at {i}, {j}");
            }
        }
    }

    #[test]
    fn backend_framing_needed_walks_to_the_next_boundary() {
        // Feeding exactly what `needed` asks for, from any offset, reaches
        // the next boundary and never passes it: how a close finishes the
        // message a client is in the middle of.
        let (stream, boundaries) = framed_stream();
        for start in 0..stream.len() {
            let mut f = BackendFraming::new();
            f.feed(&stream[..start]);
            let mut at = start;
            while let Some(n) = f.needed().filter(|n| *n > 0) {
                f.feed(&stream[at..at + n]);
                at += n;
            }
            let next = *boundaries
                .iter()
                .find(|b| **b >= start)
                .expect("a boundary");
            assert_eq!(at, next, "from offset {start}");
        }
    }

    #[test]
    fn backend_framing_gives_up_on_lengths_below_four() {
        let mut f = BackendFraming::new();
        f.feed(&[b'D', 0, 0, 0, 3, 1, 2, 3]);
        assert_eq!(f.needed(), None);
        assert!(!f.at_boundary());
        f.feed(&message(b'Z', b"I"));
        assert_eq!(f.needed(), None);
    }

    #[test]
    fn cancel_keys_are_bounded() {
        let keys = CancelKeys::new(1);
        let a = CancelKey {
            pid: 1,
            secret: vec![1],
        };
        let b = CancelKey {
            pid: 2,
            secret: vec![2],
        };
        assert!(keys.insert(a.clone(), 0));
        assert!(!keys.insert(b.clone(), 1));
        assert_eq!(keys.member(&a), Some(0));
        assert_eq!(keys.member(&b), None);
        keys.remove(&a);
        assert!(keys.is_empty());
    }
}
