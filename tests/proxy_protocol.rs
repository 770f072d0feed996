//! PROXY protocol (v1 and v2) from trusted balancers, with a real
//! `redis-server` and PostgreSQL behind the portal and real TLS clients
//! (rustls, tokio-postgres) after the header. The tests play the balancer:
//! they connect from a loopback address the endpoint trusts (or not),
//! write the header naming a client that is not on this machine
//! (192.0.2.0/24, 2001:db8::/32: documentation networks), then let the
//! client's TLS go on over the same connection.
//!
//! What is attacked: the header's address must be the one the per-source
//! limits and the logs use; a source the endpoint does not trust must
//! never get its header believed; a trusted source that sends no header, a
//! bad one or nothing must be dropped within the opening's deadline and
//! lock nobody out; and no byte after the header may be lost (the header
//! and the ClientHello or SSLRequest arrive in one segment).

use crate::common;

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use common::pg::*;
use common::*;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_postgres::error::SqlState;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_rustls::TlsConnector;

/// The balancer: the address the endpoints trust.
const BALANCER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
/// A source the endpoints do not trust.
const STRANGER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

fn addr(text: &str) -> SocketAddr {
    text.parse().expect("socket address")
}

/// A version 1 header for `client` connecting to `127.0.0.1:port`.
fn v1(client: SocketAddr, port: u16) -> Vec<u8> {
    let family = if client.is_ipv4() { "TCP4" } else { "TCP6" };
    let to = if client.is_ipv4() { "127.0.0.1" } else { "::1" };
    format!(
        "PROXY {family} {} {to} {} {port}\r\n",
        client.ip(),
        client.port()
    )
    .into_bytes()
}

const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// A version 2 `PROXY` header for `client`, with `tlvs` after the
/// addresses.
fn v2(client: SocketAddr, port: u16, tlvs: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    let family = match client.ip() {
        IpAddr::V4(ip) => {
            body.extend(ip.octets());
            body.extend([127, 0, 0, 1]);
            0x11
        }
        IpAddr::V6(ip) => {
            body.extend(ip.octets());
            body.extend(std::net::Ipv6Addr::LOCALHOST.octets());
            0x21
        }
    };
    body.extend(client.port().to_be_bytes());
    body.extend(port.to_be_bytes());
    body.extend(tlvs);
    v2_raw(0x21, family, &body)
}

/// A version 2 header from its parts.
fn v2_raw(version_command: u8, family: u8, body: &[u8]) -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    out.extend([version_command, family]);
    out.extend((body.len() as u16).to_be_bytes());
    out.extend(body);
    out
}

/// A v2 `LOCAL` header (a balancer's own health check): no client named.
fn v2_local() -> Vec<u8> {
    v2_raw(0x20, 0x00, &[])
}

/// Some TLVs a balancer sends: PP2_TYPE_AUTHORITY, PP2_TYPE_NOOP.
fn some_tlvs() -> Vec<u8> {
    let mut tlvs = vec![0x02, 0x00, 0x09];
    tlvs.extend(b"localhost");
    tlvs.extend([0x04, 0x00, 0x02, 0, 0]);
    tlvs
}

/// A TCP stream whose first write carries `header` and the caller's first
/// bytes together, in one `write`: on loopback, one segment, so that the
/// portal receives the header and the ClientHello (or SSLRequest) at once.
struct HeaderFirst {
    inner: TcpStream,
    header: Option<Vec<u8>>,
    queued: Vec<u8>,
    claimed: usize,
}

impl HeaderFirst {
    fn new(inner: TcpStream, header: Vec<u8>) -> Self {
        HeaderFirst {
            inner,
            header: Some(header),
            queued: Vec::new(),
            claimed: 0,
        }
    }
}

impl AsyncRead for HeaderFirst {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for HeaderFirst {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(mut header) = this.header.take() {
            header.extend_from_slice(buf);
            this.queued = header;
            this.claimed = buf.len();
        }
        while !this.queued.is_empty() {
            match Pin::new(&mut this.inner).poll_write(cx, &this.queued) {
                Poll::Ready(Ok(n)) => {
                    this.queued.drain(..n);
                }
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                Poll::Pending => return Poll::Pending,
            }
            if this.queued.is_empty() {
                return Poll::Ready(Ok(this.claimed));
            }
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

type ProxiedTls = tokio_rustls::client::TlsStream<HeaderFirst>;

/// From `source`, `header` then a TLS handshake (trusting the portal's CA
/// as `localhost`), the header and the ClientHello in one segment.
async fn proxied_tls(
    source: IpAddr,
    port: u16,
    header: Vec<u8>,
    certs: &Certs,
) -> io::Result<ProxiedTls> {
    let tcp = connect_from(source, port).await?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from("localhost").expect("server name");
    let connector = TlsConnector::from(default_client_config(&certs.ca));
    tokio::time::timeout(
        Duration::from_secs(10),
        connector.connect(name, HeaderFirst::new(tcp, header)),
    )
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake"))?
}

/// `PING` through a proxied TLS session: the reply, or what went wrong.
async fn ping_through(
    source: IpAddr,
    port: u16,
    header: Vec<u8>,
    certs: &Certs,
) -> Result<Reply, String> {
    let tls = proxied_tls(source, port, header, certs)
        .await
        .map_err(|err| format!("TLS: {err}"))?;
    let mut session = Resp::new(tls);
    session
        .cmd_within(&["PING"], Duration::from_secs(5))
        .await
        .map_err(|err| format!("PING: {err}"))
}

/// Waits until a line of the portal's log contains every one of `parts`;
/// returns it.
async fn wait_log_line(portal: &Portal, parts: &[&str]) -> String {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let log = portal.stderr_log();
        if let Some(line) = log.lines().find(|l| parts.iter().all(|p| l.contains(p))) {
            return line.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no log line with {parts:?}:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// New connections the portal may have opened to its member on its own:
/// a probe reconnects after a failure.
async fn probe_failures(portal: &Portal) -> u64 {
    metric(&portal.metrics().await, "portal_probe_failures_total", &[]).unwrap_or(0.0) as u64
}

/// A lone Redis primary and a portal whose endpoints trust `trusted`,
/// with `tweak` applied to the configuration.
async fn redis_setup(
    trusted: &str,
    tweak: impl FnOnce(PortalConfig) -> PortalConfig,
) -> (RedisServer, Certs, Ports, Portal) {
    let redis = RedisServer::start(None);
    let certs = temp_certs();
    let config = tweak(
        PortalConfig::new(&certs, &[redis.port()])
            .endpoint_key(&format!("proxy_protocol: {{trusted: [{trusted}]}}")),
    );
    let ports = config.ports;
    let portal = Portal::start(&config.yaml()).await;
    portal.wait_roles("a", &[]).await;
    (redis, certs, ports, portal)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_balancers_header_names_the_client_for_limits_and_logs() {
    let (_redis, certs, ports, portal) = redis_setup("127.0.0.1/32", |c| {
        c.endpoint_key("max_connections_per_source: 1")
            .endpoint_key("access_log: true")
    })
    .await;
    let rw = ports.rw;

    // v1, in one segment with the ClientHello: a real session.
    let seven = addr("192.0.2.7:40001");
    let tls = proxied_tls(BALANCER, rw, v1(seven, rw), &certs)
        .await
        .expect("TLS after a v1 header");
    let mut first = Resp::new(tls);
    assert_eq!(
        first.cmd(&["SET", "pp", "v1"]).await.expect("SET"),
        Reply::Simple("OK".into())
    );
    assert_eq!(
        first.cmd(&["GET", "pp"]).await.expect("GET"),
        Reply::Bulk(Some(b"v1".to_vec()))
    );

    // The same client again, through v2: max_connections_per_source (1)
    // counts the header's address, so it is refused...
    let again = ping_through(BALANCER, rw, v2(addr("192.0.2.7:40002"), rw, &[]), &certs).await;
    assert_eq!(
        again,
        Ok(Reply::Error("ERR max number of clients reached".into())),
        "a second session claiming 192.0.2.7"
    );
    let refused = wait_log_line(&portal, &["limit reached", "192.0.2.7:40002"]).await;
    assert!(refused.contains("max_connections_per_source"), "{refused}");
    // ...while other clients of the same balancer (one TCP source,
    // 127.0.0.1, which already holds a session) are admitted: v2 with
    // TLVs, v2 over IPv6, v1 over IPv6.
    for (what, header) in [
        (
            "v2 TCP4 with TLVs",
            v2(addr("192.0.2.8:40003"), rw, &some_tlvs()),
        ),
        ("v2 TCP6", v2(addr("[2001:db8::7]:40004"), rw, &[])),
        ("v1 TCP6", v1(addr("[2001:db8::8]:40005"), rw)),
    ] {
        assert_eq!(
            ping_through(BALANCER, rw, header, &certs).await,
            Ok(Reply::Simple("PONG".into())),
            "{what}"
        );
    }
    // LOCAL names no client: the balancer's own address stands, once.
    let mut local = Resp::new(
        proxied_tls(BALANCER, rw, v2_local(), &certs)
            .await
            .expect("TLS after LOCAL"),
    );
    assert_eq!(
        local.cmd(&["PING"]).await.expect("PING"),
        Reply::Simple("PONG".into())
    );
    assert_eq!(
        ping_through(BALANCER, rw, v2_local(), &certs).await,
        Ok(Reply::Error("ERR max number of clients reached".into())),
        "a second LOCAL session is the balancer's second"
    );
    drop(local);

    // The access log names the client of the header.
    drop(first);
    let line = wait_log_line(&portal, &["portal::access", "client=192.0.2.7:40001"]).await;
    assert!(line.contains("member=\"a\""), "{line}");
    wait_log_line(&portal, &["portal::access", "client=[2001:db8::7]:40004"]).await;
    // Nothing counted as a header failure.
    let metrics = portal.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "portal_connections_refused_total",
            &[("reason", "proxy_protocol")]
        ),
        None,
        "{metrics}"
    );
    assert!(
        metric(
            &metrics,
            "portal_connections_refused_total",
            &[("endpoint", "rw"), ("reason", "max_connections_per_source")]
        ) >= Some(2.0),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_source_cannot_spoof_its_address() {
    let (redis, certs, ports, portal) = redis_setup("127.0.0.3/32, 10.0.0.0/8", |c| {
        c.endpoint_key("access_log: true")
    })
    .await;
    let rw = ports.rw;
    let before = info_number(redis.port(), "stats", "total_connections_received");

    // The same headers a balancer sends, from a source not in the list:
    // the portal takes them for the client's first bytes, which are not
    // TLS. The handshake fails; the member never hears of it.
    for (what, header) in [
        ("v1", v1(addr("192.0.2.7:40001"), rw)),
        ("v2", v2(addr("192.0.2.7:40002"), rw, &[])),
        ("v2 LOCAL", v2_local()),
    ] {
        let result = ping_through(STRANGER, rw, header, &certs).await;
        assert!(
            matches!(&result, Err(e) if e.starts_with("TLS")),
            "{what} from an untrusted source: {result:?}"
        );
    }
    let after = info_number(redis.port(), "stats", "total_connections_received");
    assert!(
        after <= before + 1 + probe_failures(&portal).await,
        "a spoofing connection reached the member: {before} connections before, {after} after"
    );
    portal
        .wait_metric(
            "portal_tls_handshake_failures_total",
            &[("endpoint", "rw"), ("reason", "not_tls")],
            |v| v >= 3.0,
        )
        .await;
    wait_log_line(&portal, &["does not trust", "127.0.0.2"]).await;

    // Untrusted is a direct client: without a header it is served, under
    // its own address.
    let tls = common::connect_from(STRANGER, rw).await.expect("connect");
    let name = ServerName::try_from("localhost").expect("name");
    let tls = TlsConnector::from(default_client_config(&certs.ca))
        .connect(name, tls)
        .await
        .expect("a direct TLS client from an untrusted source");
    let mut direct = Resp::new(tls);
    assert_eq!(
        direct.cmd(&["PING"]).await.expect("PING"),
        Reply::Simple("PONG".into())
    );
    drop(direct);
    let line = wait_log_line(&portal, &["portal::access", "client=127.0.0.2:"]).await;
    assert!(!line.contains("192.0.2.7"), "{line}");
    // And the trusted one's header is believed (the list is not dead).
    assert_eq!(
        ping_through(
            "127.0.0.3".parse().expect("ip"),
            rw,
            v1(addr("192.0.2.9:1"), rw),
            &certs
        )
        .await,
        Ok(Reply::Simple("PONG".into()))
    );
    wait_log_line(&portal, &["portal::access", "client=192.0.2.9:1"]).await;
}

/// Waits for the portal to close `tcp`; how long it took, or `None` when it
/// kept it open for `limit`.
async fn closed_after(tcp: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    closed_by_peer(tcp, limit).await.then(|| started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_source_without_a_valid_header_is_dropped_in_time() {
    let (redis, certs, ports, portal) =
        redis_setup("127.0.0.1/32", |c| c.handshake_timeout("2s")).await;
    let rw = ports.rw;
    let timeout = Duration::from_secs(2);
    let before = info_number(redis.port(), "stats", "total_connections_received");

    // Twenty silent connections and twenty that stop inside the header,
    // all from the balancer's address.
    let started = Instant::now();
    let mut silent = Vec::new();
    let mut stalled = Vec::new();
    for i in 0..20 {
        silent.push(connect_from(BALANCER, rw).await.expect("connect"));
        let mut tcp = connect_from(BALANCER, rw).await.expect("connect");
        let header = if i % 2 == 0 {
            b"PROXY TCP4 192.0.2.7 127.0.0.1".to_vec()
        } else {
            V2_SIGNATURE[..9].to_vec()
        };
        tcp.write_all(&header).await.expect("partial header");
        stalled.push(tcp);
    }
    // Meanwhile a proxied client, and a direct one from elsewhere, are
    // served at once.
    let served = Instant::now();
    assert_eq!(
        ping_through(BALANCER, rw, v2(addr("192.0.2.7:1"), rw, &[]), &certs).await,
        Ok(Reply::Simple("PONG".into()))
    );
    let mut direct = Resp::new(
        tokio_rustls::TlsConnector::from(default_client_config(&certs.ca))
            .connect(
                ServerName::try_from("localhost").expect("name"),
                connect_from(STRANGER, rw).await.expect("connect"),
            )
            .await
            .expect("direct TLS"),
    );
    assert_eq!(
        direct.cmd(&["PING"]).await.expect("PING"),
        Reply::Simple("PONG".into())
    );
    assert!(
        served.elapsed() < Duration::from_secs(1),
        "other clients waited {:?} behind the silent ones",
        served.elapsed()
    );

    // What can never become a header is dropped at once, long before the
    // deadline.
    let mut endless = b"PROXY TCP4 ".to_vec();
    endless.extend(vec![b'1'; 120]);
    let mut huge = V2_SIGNATURE.to_vec();
    huge.extend([0x21, 0x11, 0xff, 0xff]);
    for (what, bytes, then_close) in [
        ("a Redis command", b"PING\r\n".to_vec(), false),
        ("HTTP", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), false),
        ("a ClientHello", client_hello(0x0303), false),
        ("a v1 line past 107 bytes", endless, false),
        ("a v2 header announcing 65535 bytes", huge, false),
        (
            "a v1 header with a bad address",
            b"PROXY TCP4 192.0.2.300 127.0.0.1 1 2\r\n".to_vec(),
            false,
        ),
        (
            "a v2 header of version 1",
            v2_raw(0x11, 0x11, &[0; 12]),
            false,
        ),
        (
            "a v2 UDP header",
            v2_raw(0x21, 0x12, &[192, 0, 2, 7, 127, 0, 0, 1, 0, 1, 0, 2]),
            false,
        ),
        (
            "a truncated header, then the end of the stream",
            b"PROXY TCP4 192.0.2.7".to_vec(),
            true,
        ),
    ] {
        let mut tcp = connect_from(BALANCER, rw).await.expect("connect");
        tcp.write_all(&bytes).await.expect("send");
        if then_close {
            tcp.shutdown().await.expect("shutdown");
        }
        let took = closed_after(&mut tcp, DEADLINE).await;
        assert!(
            took.is_some_and(|t| t < timeout / 2),
            "{what}: closed after {took:?} (handshake_timeout {timeout:?})"
        );
    }
    // A TLS client that sends no header at all fails its handshake.
    let direct_from_trusted = tls_connect(rw, &certs.ca, "localhost").await;
    assert!(
        direct_from_trusted.is_err(),
        "a trusted source got in without a header"
    );

    // The silent and the stalled are dropped at the opening's deadline.
    for tcp in silent.iter_mut().chain(stalled.iter_mut()) {
        assert!(
            closed_by_peer(tcp, DEADLINE).await,
            "a silent or stalled connection was never closed"
        );
    }
    let all_closed = started.elapsed();
    assert!(
        all_closed < timeout + Duration::from_secs(2),
        "the last silent connection closed after {all_closed:?}"
    );
    assert!(
        all_closed >= timeout - Duration::from_millis(100),
        "silent connections closed before handshake_timeout: {all_closed:?}"
    );

    // 40 timeouts, 9 bad openings and the TLS client: each counted.
    portal
        .wait_metric(
            "portal_connections_refused_total",
            &[("endpoint", "rw"), ("reason", "proxy_protocol")],
            |v| v >= 50.0,
        )
        .await;
    let line = wait_log_line(
        &portal,
        &["no valid PROXY protocol header", "reason=\"missing\""],
    )
    .await;
    assert!(line.contains("127.0.0.1:"), "{line}");
    wait_log_line(
        &portal,
        &["no valid PROXY protocol header", "reason=\"timeout\""],
    )
    .await;
    // Only the two served clients reached the member (and this query).
    let after = info_number(redis.port(), "stats", "total_connections_received");
    assert!(
        (before + 3..=before + 3 + probe_failures(&portal).await).contains(&after),
        "{before} connections before, {after} after"
    );
    drop(direct);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_its_header_an_opening_counts_against_the_client_not_the_balancer() {
    let (_redis, certs, ports, portal) = redis_setup("127.0.0.1/32", |c| {
        c.handshake_timeout("30s")
            .endpoint_key("max_handshakes_per_source: 3")
    })
    .await;
    let rw = ports.rw;
    // Three clients of the balancer that send their header, then nothing:
    // they hold openings for 192.0.2.7, not for the balancer...
    let mut held = Vec::new();
    for i in 0..3 {
        let mut tcp = connect_from(BALANCER, rw).await.expect("connect");
        tcp.write_all(&v1(addr(&format!("192.0.2.7:{}", 1000 + i)), rw))
            .await
            .expect("header");
        held.push(tcp);
    }
    let deadline = Instant::now() + DEADLINE;
    while portal.status().await["clusters"][0]["endpoints"][0]["opening"] != 3 {
        assert!(
            Instant::now() < deadline,
            "the three openings were not counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ...so a fourth from that client is closed at once...
    let mut fourth = connect_from(BALANCER, rw).await.expect("connect");
    fourth
        .write_all(&v1(addr("192.0.2.7:1003"), rw))
        .await
        .expect("header");
    assert!(
        closed_after(&mut fourth, Duration::from_secs(10))
            .await
            .is_some_and(|t| t < Duration::from_secs(5)),
        "a fourth opening of 192.0.2.7 was kept (max_handshakes_per_source: 3)"
    );
    portal
        .wait_metric(
            "portal_connections_refused_total",
            &[("endpoint", "rw"), ("reason", "max_handshakes_per_source")],
            |v| v >= 1.0,
        )
        .await;
    wait_log_line(&portal, &["limit reached", "peer=192.0.2.7:1003"]).await;
    // ...while the balancer, with three silent openings under way, still
    // brings in other clients.
    for i in 0..3 {
        assert_eq!(
            ping_through(
                BALANCER,
                rw,
                v2(addr(&format!("192.0.2.{}:1", 20 + i)), rw, &[]),
                &certs
            )
            .await,
            Ok(Reply::Simple("PONG".into())),
            "another client of the balancer"
        );
    }
    for tcp in &mut held {
        assert!(!closed_by_peer(tcp, Duration::from_millis(10)).await);
    }
}

/// The PostgreSQL setup: a lone primary, a portal whose endpoints trust
/// the balancer and log sessions.
async fn pg_setup() -> (PgServer, Certs, PgPorts, Portal) {
    let primary = PgServer::primary();
    let certs = temp_certs();
    let config = PgPortalConfig::new(&certs, &[primary.port()]);
    let yaml = config.yaml().replace(
        "        handshake_timeout: 5s\n",
        "        handshake_timeout: 5s\n        access_log: true\n        \
         proxy_protocol: {trusted: [127.0.0.1/32]}\n",
    );
    let portal = Portal::start(&yaml).await;
    portal.wait_roles("a", &[]).await;
    (primary, certs, config.ports, portal)
}

/// tokio-postgres over a connection that starts with `header`, in one
/// segment with the SSLRequest: the header, `S`, TLS, the startup.
async fn pg_through_header(
    source: IpAddr,
    port: u16,
    header: Vec<u8>,
    certs: &Certs,
) -> Result<tokio_postgres::Client, String> {
    let tcp = connect_from(source, port)
        .await
        .map_err(|err| format!("connect: {err}"))?;
    let stream = HeaderFirst::new(tcp, header);
    let tls =
        MakeTlsConnect::<HeaderFirst>::make_tls_connect(&mut PgTls::new(&certs.ca), "localhost")
            .map_err(|err| format!("TLS setup: {err}"))?;
    let (client, connection) = tokio::time::timeout(
        Duration::from_secs(20),
        pg_config(port).connect_raw(stream, tls),
    )
    .await
    .map_err(|_| "connect_raw timed out".to_string())?
    .map_err(|err| pg_error(&err))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_sessions_and_cancel_requests_through_a_v2_header() {
    let (primary, certs, ports, portal) = pg_setup().await;
    let rw = ports.rw;

    let client = pg_through_header(
        BALANCER,
        rw,
        v2(addr("192.0.2.9:5555"), rw, &some_tlvs()),
        &certs,
    )
    .await
    .unwrap_or_else(|err| panic!("tokio-postgres after a v2 header: {err}"));
    assert_eq!(
        server_port_of(&client).await.expect("query"),
        primary.port()
    );
    wait_log_line(&portal, &["session routed", "peer=192.0.2.9:5555"]).await;

    // A cancel request comes through the balancer too, with a header of
    // its own, then SSLRequest, TLS and the CancelRequest.
    let token = client.cancel_token();
    let sleeping = tokio::spawn(async move {
        let result = client.simple_query("select pg_sleep(30)").await;
        (result, client)
    });
    primary.wait_psql(
        "select count(*) > 0 from pg_stat_activity where state = 'active' \
         and query = 'select pg_sleep(30)'",
        "t",
    );
    let tcp = connect_from(BALANCER, rw).await.expect("connect");
    let stream = HeaderFirst::new(tcp, v1(addr("192.0.2.9:5556"), rw));
    let tls =
        MakeTlsConnect::<HeaderFirst>::make_tls_connect(&mut PgTls::new(&certs.ca), "localhost")
            .expect("TLS setup");
    token
        .cancel_query_raw(stream, tls)
        .await
        .unwrap_or_else(|err| panic!("cancel through a v1 header: {}", pg_error(&err)));
    let (result, client) = tokio::time::timeout(Duration::from_secs(10), sleeping)
        .await
        .expect("pg_sleep(30) still runs 10 s after the cancel")
        .expect("query task");
    let err = result.expect_err("pg_sleep(30) finished despite the cancel");
    assert_eq!(
        err.code(),
        Some(&SqlState::QUERY_CANCELED),
        "{}",
        pg_error(&err)
    );
    portal
        .wait_metric(
            "portal_cancel_requests_total",
            &[("endpoint", "rw"), ("outcome", "forwarded")],
            |v| v >= 1.0,
        )
        .await;
    wait_log_line(
        &portal,
        &["cancel request forwarded", "peer=192.0.2.9:5556"],
    )
    .await;
    drop(client);
    wait_log_line(&portal, &["portal::access", "client=192.0.2.9:5555"]).await;

    // From an untrusted source the same header is a broken opening: no
    // session, no startup message at the member.
    let spoofed = pg_through_header(STRANGER, rw, v2(addr("192.0.2.66:1"), rw, &[]), &certs).await;
    assert!(
        spoofed.is_err(),
        "a header from an untrusted source was believed"
    );
    portal
        .wait_metric("portal_protocol_errors_total", &[("endpoint", "rw")], |v| {
            v >= 1.0
        })
        .await;
    assert!(
        !portal.stderr_log().contains("192.0.2.66"),
        "the spoofed address shows in the log"
    );
    // And a trusted source without a header is no client either.
    assert!(pg_connect(rw, &certs).await.is_err());
    portal
        .wait_metric(
            "portal_connections_refused_total",
            &[("endpoint", "rw"), ("reason", "proxy_protocol")],
            |v| v >= 1.0,
        )
        .await;
}
