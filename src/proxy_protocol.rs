//! The PROXY protocol (HAProxy's, versions 1 and 2) in front of a client
//! connection from a trusted balancer: the header names the client the
//! balancer accepted, and that address then stands for the client in the
//! admission limits, the logs and the access log.
//!
//! [`read`] reads exactly the header from the socket and not one byte more:
//! what follows it (a TLS ClientHello, a PostgreSQL SSLRequest) stays in
//! the socket for the frontend. The framing is ours (v1 ends at the first
//! LF, at most 107 bytes; v2 is a 16-byte prefix and the length it
//! announces, capped at [`V2_MAX`] bytes in all); the decoding of the
//! addresses and TLVs is the `ppp` crate's. [`parse`] is pure and total: no
//! input makes it panic.

use std::io;
use std::net::{IpAddr, SocketAddr};

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The start of a version 1 header.
pub const V1_PREFIX: &[u8] = b"PROXY ";
/// The 12-byte signature of a version 2 header.
pub const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// A version 1 header's longest form, CRLF included (the protocol's limit).
pub const V1_MAX: usize = 107;
/// The fixed part of a version 2 header: signature, version and command,
/// family and transport, length.
pub const V2_FIXED: usize = 16;
/// The longest version 2 header accepted, fixed part, addresses and TLVs
/// included: HAProxy's own receive limit. A balancer sends far less (28
/// bytes for TCP over IPv4, 52 over IPv6, plus a few TLVs).
pub const V2_MAX: usize = 536;
/// Bytes read before deciding which version it is: fewer than either
/// version's shortest header (`PROXY UNKNOWN\r\n` is 15 bytes, a v2 header
/// 16), so never a byte past the header.
const SNIFF: usize = 12;

/// A header that was read and understood.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// 1 or 2.
    pub version: u8,
    /// The client's address, as the balancer saw it; `None` when the header
    /// names none (v2 `LOCAL`, e.g. the balancer's own health check; v1
    /// `UNKNOWN`; v2 `UNSPEC`): the connection's own peer address stands.
    pub source: Option<SocketAddr>,
}

/// Why a trusted source's connection had no usable header.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    /// The first bytes are neither `PROXY ` nor the v2 signature (a client
    /// that connected straight to the portal from a trusted network, or a
    /// balancer not set up to send the header).
    #[error("the connection does not start with a PROXY protocol header")]
    Missing,
    /// The connection ended inside the header.
    #[error("the connection ended inside the PROXY protocol header")]
    Truncated,
    /// Longer than [`V1_MAX`] (v1) or [`V2_MAX`] (v2).
    #[error("PROXY protocol header longer than {limit} bytes")]
    TooLong { limit: usize },
    /// Framed, but not a valid header, or one the portal cannot use (UDP,
    /// UNIX sockets).
    #[error("invalid PROXY protocol header: {0}")]
    Malformed(String),
    #[error("reading the PROXY protocol header: {0}")]
    Io(#[source] io::Error),
}

impl HeaderError {
    /// A short, stable label for logs.
    pub fn reason(&self) -> &'static str {
        match self {
            HeaderError::Missing => "missing",
            HeaderError::Truncated => "truncated",
            HeaderError::TooLong { .. } => "too_long",
            HeaderError::Malformed(_) => "malformed",
            HeaderError::Io(_) => "io",
        }
    }
}

/// What the bytes seen so far can still become.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    V1,
    V2,
    /// A prefix of either form: more bytes are needed to tell.
    Undecided,
    Neither,
}

fn start(seen: &[u8]) -> Start {
    let agrees = |form: &[u8]| {
        let n = seen.len().min(form.len());
        seen[..n] == form[..n]
    };
    match (agrees(V1_PREFIX), agrees(V2_SIGNATURE)) {
        (false, false) => Start::Neither,
        (true, _) if seen.len() >= V1_PREFIX.len() => Start::V1,
        (_, true) if seen.len() >= V2_SIGNATURE.len() => Start::V2,
        _ => Start::Undecided,
    }
}

/// Whether `first` (a connection's first bytes, at least 5 of them) looks
/// like the start of a PROXY protocol header: what a balancer sends that
/// the endpoint does not trust.
pub fn looks_like_header(first: &[u8]) -> bool {
    first.len() >= 5 && matches!(start(first), Start::V1 | Start::V2 | Start::Undecided)
}

/// Decodes one whole header: `bytes` is exactly the header (v1 up to and
/// including its CRLF; v2 its fixed part and the length it announces).
pub fn parse(bytes: &[u8]) -> Result<Header, HeaderError> {
    match start(bytes) {
        Start::V1 => parse_v1(bytes),
        Start::V2 => parse_v2(bytes),
        Start::Undecided => Err(HeaderError::Truncated),
        Start::Neither => Err(HeaderError::Missing),
    }
}

fn parse_v1(bytes: &[u8]) -> Result<Header, HeaderError> {
    use ppp::v1::Addresses;
    if bytes.len() > V1_MAX {
        return Err(HeaderError::TooLong { limit: V1_MAX });
    }
    if !bytes.ends_with(b"\r\n") {
        return Err(HeaderError::Malformed(
            "a version 1 header ends with CRLF".into(),
        ));
    }
    let header = ppp::v1::Header::try_from(bytes)
        .map_err(|err| HeaderError::Malformed(format!("version 1: {err}")))?;
    // ppp stops at the first CR; the header must end there.
    if header.header.len() != bytes.len() {
        return Err(HeaderError::Malformed(
            "version 1: a CR before the end of the line".into(),
        ));
    }
    let source = match header.addresses {
        Addresses::Tcp4(a) => Some(SocketAddr::new(a.source_address.into(), a.source_port)),
        Addresses::Tcp6(a) => Some(client(a.source_address.into(), a.source_port)),
        Addresses::Unknown => None,
    };
    Ok(Header { version: 1, source })
}

fn parse_v2(bytes: &[u8]) -> Result<Header, HeaderError> {
    use ppp::v2::{Addresses, Command, Protocol};
    if bytes.len() > V2_MAX {
        return Err(HeaderError::TooLong { limit: V2_MAX });
    }
    if bytes.len() < V2_FIXED {
        return Err(HeaderError::Truncated);
    }
    let announced = V2_FIXED + usize::from(u16::from_be_bytes([bytes[14], bytes[15]]));
    if announced != bytes.len() {
        return Err(HeaderError::Malformed(format!(
            "version 2: the header announces {announced} bytes, {} were given",
            bytes.len()
        )));
    }
    let header = ppp::v2::Header::try_from(bytes)
        .map_err(|err| HeaderError::Malformed(format!("version 2: {err}")))?;
    // The TLVs are not used, but they must be well formed (each one's
    // length within the header, nothing left over).
    for tlv in header.tlvs() {
        tlv.map_err(|err| HeaderError::Malformed(format!("version 2 TLV: {err}")))?;
    }
    let source = match (header.command, header.addresses, header.protocol) {
        // A connection the balancer made itself (a health check): the
        // addresses, whatever they say, are to be ignored.
        (Command::Local, _, _) => None,
        (Command::Proxy, Addresses::Unspecified, _) => None,
        (Command::Proxy, Addresses::IPv4(a), Protocol::Stream) => {
            Some(SocketAddr::new(a.source_address.into(), a.source_port))
        }
        (Command::Proxy, Addresses::IPv6(a), Protocol::Stream) => {
            Some(client(a.source_address.into(), a.source_port))
        }
        (Command::Proxy, addresses, protocol) => {
            return Err(HeaderError::Malformed(format!(
                "version 2: {:?} over {protocol:?} is not a TCP client",
                addresses.address_family()
            )))
        }
    };
    Ok(Header { version: 2, source })
}

/// An IPv6 client address, IPv4-mapped ones as the IPv4 address they are.
fn client(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip.to_canonical(), port)
}

/// Reads one header from the start of `tcp`, exactly its bytes: a valid
/// header's last byte is the last one read. Fails as soon as the bytes seen
/// can no longer be a header (a direct client's first bytes are refused
/// at once, not at the deadline). The caller bounds the time it takes.
pub async fn read(tcp: &mut TcpStream) -> Result<Header, HeaderError> {
    let mut buf = [0u8; V2_MAX];
    let mut len = 0;
    // Up to SNIFF bytes, however they arrive, until the form is known.
    let form = loop {
        match start(&buf[..len]) {
            Start::Neither => return Err(HeaderError::Missing),
            Start::V1 if len >= SNIFF => break Start::V1,
            Start::V2 if len >= SNIFF => break Start::V2,
            _ => {}
        }
        len += read_some(tcp, &mut buf[len..SNIFF]).await?;
    };
    match form {
        Start::V2 => {
            fill(tcp, &mut buf[len..V2_FIXED]).await?;
            let total = V2_FIXED + usize::from(u16::from_be_bytes([buf[14], buf[15]]));
            if total > V2_MAX {
                return Err(HeaderError::TooLong { limit: V2_MAX });
            }
            fill(tcp, &mut buf[V2_FIXED..total]).await?;
            parse(&buf[..total])
        }
        _ => {
            // Version 1: up to the first LF, peeking so as to consume no
            // byte after it.
            while !buf[..len].contains(&b'\n') {
                if len >= V1_MAX {
                    return Err(HeaderError::TooLong { limit: V1_MAX });
                }
                let mut window = [0u8; V1_MAX];
                let room = V1_MAX - len;
                let seen = tcp
                    .peek(&mut window[..room])
                    .await
                    .map_err(HeaderError::Io)?;
                if seen == 0 {
                    return Err(HeaderError::Truncated);
                }
                let take = window[..seen]
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(seen, |at| at + 1);
                fill(tcp, &mut buf[len..len + take]).await?;
                len += take;
            }
            let end = buf[..len]
                .iter()
                .position(|&b| b == b'\n')
                .map_or(len, |at| at + 1);
            parse(&buf[..end])
        }
    }
}

/// One read into `buf` (not empty); end of stream is a truncated header.
async fn read_some(tcp: &mut TcpStream, buf: &mut [u8]) -> Result<usize, HeaderError> {
    match tcp.read(buf).await {
        Ok(0) => Err(HeaderError::Truncated),
        Ok(n) => Ok(n),
        Err(err) => Err(HeaderError::Io(err)),
    }
}

/// Fills `buf` exactly.
async fn fill(tcp: &mut TcpStream, buf: &mut [u8]) -> Result<(), HeaderError> {
    match tcp.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => Err(HeaderError::Truncated),
        Err(err) => Err(HeaderError::Io(err)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;

    /// A v2 header: `command` (0 LOCAL, 1 PROXY), `family_transport` (0x11
    /// TCP4, 0x21 TCP6, ...), `body` (addresses then TLVs).
    fn v2(command: u8, family_transport: u8, body: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.push(0x20 | command);
        out.push(family_transport);
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    fn tcp4(src: [u8; 4], sport: u16) -> Vec<u8> {
        let mut body = src.to_vec();
        body.extend([127, 0, 0, 1]);
        body.extend(sport.to_be_bytes());
        body.extend(7000u16.to_be_bytes());
        body
    }

    fn addr(text: &str) -> Option<SocketAddr> {
        Some(text.parse().expect("socket address"))
    }

    #[test]
    fn version_1_forms() {
        let h = parse(b"PROXY TCP4 192.0.2.7 127.0.0.1 40001 7000\r\n").expect("tcp4");
        assert_eq!((h.version, h.source), (1, addr("192.0.2.7:40001")));
        let h = parse(b"PROXY TCP6 2001:db8::7 ::1 40001 7000\r\n").expect("tcp6");
        assert_eq!(h.source, addr("[2001:db8::7]:40001"));
        let h = parse(b"PROXY TCP6 ::ffff:192.0.2.9 ::1 1 7000\r\n").expect("mapped");
        assert_eq!(h.source, addr("192.0.2.9:1"), "IPv4-mapped is IPv4");
        let h = parse(b"PROXY UNKNOWN\r\n").expect("unknown");
        assert_eq!((h.version, h.source), (1, None));
        let h = parse(b"PROXY UNKNOWN ffff::1 ::1 1 2\r\n").expect("unknown with addresses");
        assert_eq!(h.source, None);
    }

    #[test]
    fn version_1_hostile() {
        for bad in [
            &b"PROXY TCP4 192.0.2.7 127.0.0.1 40001\r\n"[..], // a port missing
            b"PROXY TCP4 192.0.2.7 127.0.0.1 40001 7000\n",   // LF without CR
            b"PROXY TCP4 192.0.2.7 127.0.0.1 40001 7000 9\r\n", // one field too many
            b"PROXY TCP4 192.0.2.300 127.0.0.1 40001 7000\r\n", // not an address
            b"PROXY TCP4 2001:db8::7 127.0.0.1 40001 7000\r\n", // the wrong family
            b"PROXY TCP4 192.0.2.7 127.0.0.1 70000 7000\r\n", // port out of range
            b"PROXY TCP4 192.0.2.7 127.0.0.1 040001 7000\r\n", // leading zero
            b"PROXY UDP4 192.0.2.7 127.0.0.1 40001 7000\r\n",
            b"PROXY tcp4 192.0.2.7 127.0.0.1 40001 7000\r\n",
            b"PROXY TCP4  192.0.2.7 127.0.0.1 40001 7000\r\n", // two spaces
            b"PROXY TCP4 192.0.2.7\r127.0.0.1 40001 7000\r\n", // CR inside
            b"PROXY \xff\xfe 1 2 3 4\r\n",                     // not UTF-8
            b"PROXY \r\n",
        ] {
            assert!(
                matches!(parse(bad), Err(HeaderError::Malformed(_))),
                "{:?} gave {:?}",
                String::from_utf8_lossy(bad),
                parse(bad)
            );
        }
        let long = format!("PROXY UNKNOWN {}\r\n", "x".repeat(100));
        assert!(matches!(
            parse(long.as_bytes()),
            Err(HeaderError::TooLong { limit: 107 })
        ));
        assert!(matches!(parse(b"PROX"), Err(HeaderError::Truncated)));
        assert!(matches!(parse(b"PROXZ "), Err(HeaderError::Missing)));
        assert!(matches!(parse(b""), Err(HeaderError::Truncated)));
    }

    #[test]
    fn version_2_forms() {
        let h = parse(&v2(1, 0x11, &tcp4([192, 0, 2, 7], 40001))).expect("tcp4");
        assert_eq!((h.version, h.source), (2, addr("192.0.2.7:40001")));
        let mut six = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7)
            .octets()
            .to_vec();
        six.extend(Ipv6Addr::LOCALHOST.octets());
        six.extend(40001u16.to_be_bytes());
        six.extend(7000u16.to_be_bytes());
        let h = parse(&v2(1, 0x21, &six)).expect("tcp6");
        assert_eq!(h.source, addr("[2001:db8::7]:40001"));
        // LOCAL: the balancer's own connection; addresses ignored.
        let h = parse(&v2(0, 0x11, &tcp4([192, 0, 2, 7], 1))).expect("local");
        assert_eq!(h.source, None);
        let h = parse(&v2(0, 0x00, &[])).expect("local, no addresses");
        assert_eq!(h.source, None);
        let h = parse(&v2(1, 0x00, &[])).expect("proxy, unspecified");
        assert_eq!(h.source, None);
    }

    #[test]
    fn version_2_with_tlvs() {
        let mut body = tcp4([192, 0, 2, 7], 40001);
        body.extend([0x02, 0x00, 0x09]); // PP2_TYPE_AUTHORITY
        body.extend(b"localhost");
        body.extend([0x04, 0x00, 0x03, 0, 0, 0]); // PP2_TYPE_NOOP
        body.extend([0xE0, 0x00, 0x00]); // a custom type, empty
        let h = parse(&v2(1, 0x11, &body)).expect("with TLVs");
        assert_eq!(h.source, addr("192.0.2.7:40001"));
        // A TLV whose length runs past the header.
        let mut bad = tcp4([192, 0, 2, 7], 40001);
        bad.extend([0x02, 0x00, 0x20, b'x']);
        assert!(matches!(
            parse(&v2(1, 0x11, &bad)),
            Err(HeaderError::Malformed(_))
        ));
        // Two bytes left over: not even a TLV's type and length.
        let mut bad = tcp4([192, 0, 2, 7], 40001);
        bad.extend([0x02, 0x00]);
        assert!(matches!(
            parse(&v2(1, 0x11, &bad)),
            Err(HeaderError::Malformed(_))
        ));
    }

    #[test]
    fn version_2_hostile() {
        let good = v2(1, 0x11, &tcp4([192, 0, 2, 7], 1));
        // Version 1 in the binary form, and an unknown version.
        for byte in [0x11, 0x31] {
            let mut bad = good.clone();
            bad[12] = byte;
            assert!(matches!(parse(&bad), Err(HeaderError::Malformed(_))));
        }
        // Unknown command.
        let mut bad = good.clone();
        bad[12] = 0x22;
        assert!(matches!(parse(&bad), Err(HeaderError::Malformed(_))));
        // UDP, UNIX sockets, an unknown family, TCP4 with too few bytes.
        for family in [0x12, 0x31, 0x41, 0x10] {
            assert!(
                matches!(
                    parse(&v2(1, family, &tcp4([192, 0, 2, 7], 1))),
                    Err(HeaderError::Malformed(_))
                ),
                "{family:#x}"
            );
        }
        assert!(matches!(
            parse(&v2(1, 0x11, &[192, 0, 2, 7])),
            Err(HeaderError::Malformed(_))
        ));
        assert!(matches!(
            parse(&v2(1, 0x21, &tcp4([192, 0, 2, 7], 1))),
            Err(HeaderError::Malformed(_))
        ));
        // Announced length and bytes given disagree.
        let mut short = good.clone();
        short.pop();
        assert!(matches!(parse(&short), Err(HeaderError::Malformed(_))));
        // Too long, and a wrong signature.
        let huge = v2(1, 0x11, &vec![0u8; V2_MAX]);
        assert!(matches!(parse(&huge), Err(HeaderError::TooLong { .. })));
        let mut wrong = good.clone();
        wrong[11] = b'X';
        assert!(matches!(parse(&wrong), Err(HeaderError::Missing)));
        assert!(matches!(parse(&good[..10]), Err(HeaderError::Truncated)));
    }

    #[test]
    fn every_prefix_and_every_byte_flip_is_refused_or_parsed_without_panic() {
        let inputs = [
            v2(1, 0x11, &tcp4([192, 0, 2, 7], 40001)),
            b"PROXY TCP4 192.0.2.7 127.0.0.1 40001 7000\r\n".to_vec(),
        ];
        for input in &inputs {
            for end in 0..input.len() {
                assert!(parse(&input[..end]).is_err(), "prefix of {end} bytes");
            }
            for at in 0..input.len() {
                for flip in [0x01, 0x80, 0xff] {
                    let mut bytes = input.clone();
                    bytes[at] ^= flip;
                    let _ = parse(&bytes);
                }
            }
        }
    }

    #[test]
    fn looks_like_a_header() {
        assert!(looks_like_header(b"PROXY TCP4 1"));
        assert!(looks_like_header(b"PROXY"));
        assert!(looks_like_header(&V2_SIGNATURE[..11]));
        assert!(!looks_like_header(b"PROX"));
        assert!(!looks_like_header(b"PING\r\n"));
        assert!(!looks_like_header(&[0x16, 3, 1, 0, 200, 1]));
    }

    /// A connected pair of loopback sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        let (client, accepted) = tokio::join!(TcpStream::connect(address), listener.accept());
        (client.expect("connect"), accepted.expect("accept").0)
    }

    /// Writes `chunks` with a pause between them, then `after`; reads one
    /// header on the other side and what follows it.
    async fn read_through(
        chunks: &[&[u8]],
        after: &[u8],
    ) -> (Result<Header, HeaderError>, Vec<u8>) {
        let (mut client, mut server) = pair().await;
        let chunks: Vec<Vec<u8>> = chunks.iter().map(|c| c.to_vec()).collect();
        let after = after.to_vec();
        let writer = tokio::spawn(async move {
            for chunk in chunks {
                client.write_all(&chunk).await.expect("write");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            client.write_all(&after).await.expect("write");
            client.shutdown().await.expect("shutdown");
        });
        let header = tokio::time::timeout(Duration::from_secs(5), read(&mut server))
            .await
            .expect("read within 5 s");
        let mut rest = Vec::new();
        if header.is_ok() {
            server.read_to_end(&mut rest).await.expect("rest");
        }
        writer.await.expect("writer");
        (header, rest)
    }

    #[tokio::test]
    async fn reading_stops_at_the_end_of_the_header() {
        let hello = [0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5];
        let v1 = b"PROXY TCP4 192.0.2.7 127.0.0.1 40001 7000\r\n";
        // All at once, followed at once by the ClientHello.
        let (header, rest) = read_through(&[], &[&v1[..], &hello[..]].concat()).await;
        assert_eq!(header.expect("v1").source, addr("192.0.2.7:40001"));
        assert_eq!(rest, hello);
        // Byte by byte (a slow balancer), then the ClientHello.
        let bytes: Vec<&[u8]> = v1.chunks(1).collect();
        let (header, rest) = read_through(&bytes, &hello).await;
        assert_eq!(
            header.expect("v1 byte by byte").source,
            addr("192.0.2.7:40001")
        );
        assert_eq!(rest, hello);
        // v2 with a TLV, split inside the fixed part and inside the body.
        let mut body = tcp4([192, 0, 2, 8], 2);
        body.extend([0x04, 0x00, 0x01, 0]);
        let header = v2(1, 0x11, &body);
        let (parsed, rest) = read_through(
            &[&header[..5], &header[5..14], &header[14..20], &header[20..]],
            &hello,
        )
        .await;
        assert_eq!(parsed.expect("v2").source, addr("192.0.2.8:2"));
        assert_eq!(rest, hello);
    }

    #[tokio::test]
    async fn reading_refuses_early_and_caps_the_length() {
        // A direct client's first bytes: refused at once, not at a timeout.
        let (header, _) = read_through(&[b"PING\r\n"], b"").await;
        assert!(matches!(header, Err(HeaderError::Missing)), "{header:?}");
        let (header, _) = read_through(&[&[0x16, 0x03, 0x01]], b"").await;
        assert!(matches!(header, Err(HeaderError::Missing)), "{header:?}");
        // Truncated: the connection ends inside the header.
        let (header, _) = read_through(&[b"PROXY TCP4 192.0.2.7"], b"").await;
        assert!(matches!(header, Err(HeaderError::Truncated)), "{header:?}");
        let (header, _) = read_through(&[&V2_SIGNATURE[..7]], b"").await;
        assert!(matches!(header, Err(HeaderError::Truncated)), "{header:?}");
        // A v2 header announcing 65535 bytes is refused after its 16.
        let mut huge = V2_SIGNATURE.to_vec();
        huge.extend([0x21, 0x11, 0xff, 0xff]);
        let (header, _) = read_through(&[&huge], b"").await;
        assert!(
            matches!(header, Err(HeaderError::TooLong { limit: V2_MAX })),
            "{header:?}"
        );
        // A v1 line with no end.
        let endless = format!("PROXY TCP4 {}", "1".repeat(200));
        let (header, _) = read_through(&[endless.as_bytes()], b"").await;
        assert!(
            matches!(header, Err(HeaderError::TooLong { limit: V1_MAX })),
            "{header:?}"
        );
    }
}
