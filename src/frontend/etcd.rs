//! etcd clients speak gRPC over HTTP/2. After TLS (ALPN `h2`, or none) the
//! portal splices bytes to the chosen member, which speaks h2c (or TLS with
//! `h2` when `backend_tls` is set); it never parses the session.
//!
//! Refusals are answered at the HTTP/2 level, so that `etcdctl` and every
//! gRPC client show the portal's reason instead of a bare "connection
//! closed": the portal plays the server's side of the connection preface
//! (SETTINGS, SETTINGS ACK), waits for the client's first request, answers it
//! with a gRPC *Trailers-Only* response (`:status 200`, `grpc-status`,
//! `grpc-message`, END_STREAM), sends GOAWAY and closes. Nothing of the
//! client's request is decoded beyond frame headers; HPACK is only written,
//! with literal fields and no dynamic table.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::Refusal;

/// The only ALPN protocol an etcd endpoint accepts (clients that offer no
/// ALPN at all are accepted too).
pub const ALPN: &[u8] = b"h2";

/// The client connection preface (RFC 9113 §3.4).
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How long a refusal waits for the client's preface and first request.
const REFUSAL_WAIT: Duration = Duration::from_secs(2);
/// How long to drain the client after GOAWAY before closing.
const LINGER: Duration = Duration::from_millis(300);
/// The default SETTINGS_MAX_FRAME_SIZE; the portal advertises no other.
const MAX_FRAME: usize = 16_384;

const FRAME_HEADERS: u8 = 0x1;
const FRAME_SETTINGS: u8 = 0x4;
const FRAME_PING: u8 = 0x6;
const FRAME_GOAWAY: u8 = 0x7;
const FLAG_ACK: u8 = 0x1;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;

/// gRPC status codes used in refusals.
pub const GRPC_UNAVAILABLE: u32 = 14;
pub const GRPC_RESOURCE_EXHAUSTED: u32 = 8;

/// The gRPC status of a refusal: UNAVAILABLE (clients retry it) unless the
/// endpoint is full.
pub fn grpc_status(refusal: &Refusal) -> u32 {
    match refusal {
        Refusal::MaxConnections => GRPC_RESOURCE_EXHAUSTED,
        Refusal::NoMember { .. } | Refusal::ShuttingDown => GRPC_UNAVAILABLE,
    }
}

/// Answers the client's first gRPC request with `refusal`, then closes.
pub async fn refuse<S>(stream: &mut S, refusal: &Refusal)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    refuse_with(stream, grpc_status(refusal), &refusal.message()).await;
}

/// A plaintext HTTP/2 (h2c) client on the TLS endpoint: tell it in gRPC
/// that TLS is required; anything else (garbage, HTTP/1) is closed without
/// a byte in answer.
pub async fn refuse_plaintext<S>(stream: &mut S)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    refuse_with(
        stream,
        GRPC_UNAVAILABLE,
        "portal: this endpoint requires TLS (etcdctl --cacert CA --endpoints=HOST:PORT)",
    )
    .await;
}

/// Plays the server's side up to the client's first HEADERS frame and
/// answers it with `grpc-status: code`; every step is bounded in time and
/// any deviation from HTTP/2 ends the attempt with a plain close.
pub async fn refuse_with<S>(stream: &mut S, code: u32, message: &str)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let answered = tokio::time::timeout(REFUSAL_WAIT, async {
        // The client's preface first: anything that is not HTTP/2 gets no
        // byte from the portal.
        let mut preface = [0u8; PREFACE.len()];
        stream.read_exact(&mut preface).await?;
        if &preface != PREFACE {
            return Ok::<_, std::io::Error>(false);
        }
        stream.write_all(&frame(FRAME_SETTINGS, 0, 0, &[])).await?;
        stream.flush().await?;
        loop {
            let mut head = [0u8; 9];
            stream.read_exact(&mut head).await?;
            let length = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let (kind, flags) = (head[3], head[4]);
            let stream_id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            if length > MAX_FRAME {
                return Ok(false);
            }
            let mut payload = vec![0u8; length];
            stream.read_exact(&mut payload).await?;
            match kind {
                FRAME_SETTINGS if flags & FLAG_ACK == 0 => {
                    stream
                        .write_all(&frame(FRAME_SETTINGS, FLAG_ACK, 0, &[]))
                        .await?;
                }
                FRAME_PING if flags & FLAG_ACK == 0 => {
                    stream
                        .write_all(&frame(FRAME_PING, FLAG_ACK, 0, &payload))
                        .await?;
                }
                FRAME_HEADERS if stream_id != 0 => {
                    let block = trailers_only(code, message);
                    let mut out = frame(
                        FRAME_HEADERS,
                        FLAG_END_STREAM | FLAG_END_HEADERS,
                        stream_id,
                        &block,
                    );
                    out.extend(goaway(stream_id, message));
                    stream.write_all(&out).await?;
                    stream.flush().await?;
                    return Ok(true);
                }
                _ => {}
            }
            stream.flush().await?;
        }
    })
    .await;
    if matches!(answered, Ok(Ok(true))) {
        let _ = stream.shutdown().await;
        let _ = tokio::time::timeout(LINGER, async {
            let mut sink = [0u8; 4096];
            while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
        })
        .await;
    } else {
        let _ = stream.shutdown().await;
    }
}

/// One HTTP/2 frame.
fn frame(kind: u8, flags: u8, stream_id: u32, payload: &[u8]) -> Vec<u8> {
    let length = payload.len().min(MAX_FRAME) as u32;
    let mut out = Vec::with_capacity(9 + length as usize);
    out.extend_from_slice(&length.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(&payload[..length as usize]);
    out
}

/// GOAWAY: no stream after `last_stream` was processed, NO_ERROR, the
/// reason as debug data.
fn goaway(last_stream: u32, message: &str) -> Vec<u8> {
    let mut payload = (last_stream & 0x7fff_ffff).to_be_bytes().to_vec();
    payload.extend_from_slice(&0u32.to_be_bytes());
    let debug = message.as_bytes();
    payload.extend_from_slice(&debug[..debug.len().min(1024)]);
    frame(FRAME_GOAWAY, 0, 0, &payload)
}

/// The HPACK block of a gRPC Trailers-Only response.
pub fn trailers_only(code: u32, message: &str) -> Vec<u8> {
    // `:status: 200` is entry 8 of the static table.
    let mut block = vec![0x88];
    literal(&mut block, "content-type", "application/grpc");
    literal(&mut block, "grpc-status", &code.to_string());
    // Keep the whole block well inside one frame.
    let message: String = percent_encode(message).chars().take(4096).collect();
    literal(&mut block, "grpc-message", &message);
    block
}

/// "Literal Header Field without Indexing — New Name", no Huffman.
fn literal(block: &mut Vec<u8>, name: &str, value: &str) {
    block.push(0x00);
    string(block, name.as_bytes());
    string(block, value.as_bytes());
}

fn string(block: &mut Vec<u8>, bytes: &[u8]) {
    integer(block, 7, 0x00, bytes.len());
    block.extend_from_slice(bytes);
}

/// An HPACK integer with an `prefix`-bit prefix (RFC 7541 §5.1).
fn integer(block: &mut Vec<u8>, prefix: u32, first_bits: u8, value: usize) {
    let max = (1usize << prefix) - 1;
    if value < max {
        block.push(first_bits | value as u8);
        return;
    }
    block.push(first_bits | max as u8);
    let mut rest = value - max;
    while rest >= 128 {
        block.push((rest % 128 + 128) as u8);
        rest /= 128;
    }
    block.push(rest as u8);
}

/// gRPC's `grpc-message` encoding: bytes outside printable ASCII, and `%`,
/// as `%XX`.
fn percent_encode(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for &b in message.as_bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hpack_integers_follow_rfc7541() {
        // C.1.1 / C.1.2 of RFC 7541: 10 and 1337 with a 5-bit prefix.
        let mut out = Vec::new();
        integer(&mut out, 5, 0, 10);
        assert_eq!(out, [0x0a]);
        out.clear();
        integer(&mut out, 5, 0, 1337);
        assert_eq!(out, [0x1f, 0x9a, 0x0a]);
        out.clear();
        integer(&mut out, 7, 0, 127);
        assert_eq!(out, [0x7f, 0x00]);
    }

    #[test]
    fn messages_are_percent_encoded() {
        assert_eq!(percent_encode("a b\"c"), "a b\"c");
        assert_eq!(percent_encode("100%\n"), "100%25%0A");
        assert_eq!(percent_encode("é"), "%C3%A9");
    }

    #[test]
    fn trailers_only_block_is_literal_fields() {
        let block = trailers_only(14, "no");
        assert_eq!(block[0], 0x88);
        let text = String::from_utf8_lossy(&block);
        assert!(text.contains("grpc-status"));
        assert!(text.contains("application/grpc"));
        assert!(block.ends_with(b"grpc-message\x02no"));
    }

    #[test]
    fn frames_have_a_nine_byte_header() {
        let f = frame(FRAME_HEADERS, FLAG_END_STREAM | FLAG_END_HEADERS, 3, b"abc");
        assert_eq!(f[..9], [0, 0, 3, 1, 5, 0, 0, 0, 3]);
        assert_eq!(&f[9..], b"abc");
        let g = goaway(3, "x");
        assert_eq!(g[..9], [0, 0, 9, 7, 0, 0, 0, 0, 0]);
    }
}
