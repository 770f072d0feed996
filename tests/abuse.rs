//! A bounded abuse run against every protocol at once: thousands of
//! garbage, silent and half-open connections from 127.0.0.2 against a Redis,
//! a PostgreSQL and an etcd endpoint of one portal, while real clients from
//! 127.0.0.1 (RESP, tokio-postgres, etcdctl) keep working through each. The
//! real clients must see no error, and the portal's memory must come back
//! near where it started once the strangers are gone.

use crate::common;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::etcd::{etcdctl, EtcdCluster};
use common::pg::*;
use common::*;
use rand::{Rng, SeedableRng};
use tokio::io::AsyncWriteExt;

const STRANGER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
/// Connections of each kind per endpoint.
const GARBAGE: usize = 600;
const SILENT: usize = 300;
const HALF_OPEN: usize = 300;

/// The portal's resident memory, KiB (`VmRSS`).
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// One stranger's attack on `port`: `GARBAGE` connections that send random
/// bytes and close, `SILENT` that say nothing and `HALF_OPEN` that send half
/// a ClientHello, the last two held open until `release`.
async fn attack(port: u16, seed: u64, release: Arc<AtomicBool>) -> (usize, usize) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut held = Vec::new();
    let mut refused = 0;
    let hello = client_hello(0x0303);
    for i in 0..GARBAGE + SILENT + HALF_OPEN {
        let Ok(mut tcp) = connect_from(STRANGER, port).await else {
            refused += 1;
            continue;
        };
        if i < GARBAGE {
            let len = rng.random_range(1..2048);
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            if bytes[0] == 0x16 {
                bytes[0] = 0x17;
            }
            let _ = tcp.write_all(&bytes).await;
        } else if i < GARBAGE + SILENT {
            held.push(tcp);
        } else {
            let _ = tcp.write_all(&hello[..hello.len() / 2]).await;
            held.push(tcp);
        }
    }
    let kept = held.len();
    while !release.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(held);
    (kept, refused)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_strangers_cost_real_clients_nothing() {
    let redis = RedisServer::start(None);
    let pg = PgServer::primary();
    let etcd = EtcdCluster::start(1);
    let certs = temp_certs();
    let (admin, redis_port, pg_port, etcd_port) =
        (free_port(), free_port(), free_port(), free_port());
    let endpoint = |name: &str, port: u16| {
        format!(
            "    endpoints:\n      - name: {name}\n        listen: 127.0.0.1:{port}\n        \
             route: leader\n        tls:\n          cert: {}\n          key: {}\n        \
             handshake_timeout: 2s\n",
            certs.cert.display(),
            certs.key.display()
        )
    };
    let probe =
        "    probe:\n      interval: 200ms\n      timeout: 500ms\n      rise: 2\n      fall: 2\n";
    let yaml = format!(
        "admin:\n  listen: 127.0.0.1:{admin}\n\nclusters:\n\
         \x20 - name: cache\n    protocol: redis\n{probe}    members:\n      - name: r\n        address: {}\n{}\
         \x20 - name: db\n    protocol: postgres\n{probe}      username: postgres\n    members:\n      - name: p\n        address: {}\n{}\
         \x20 - name: kv\n    protocol: etcd\n{probe}    members:\n      - name: {}\n        address: {}\n{}",
        redis.address(),
        endpoint("redis", redis_port),
        pg.address(),
        endpoint("pg", pg_port),
        etcd.name(0),
        etcd.client_address(0),
        endpoint("etcd", etcd_port),
    );
    let portal = Portal::start(&yaml).await;
    portal
        .wait_for("a leader in all three clusters", |s| {
            s["clusters"]
                .as_array()
                .is_some_and(|c| c.len() == 3 && c.iter().all(|c| !c["leader"].is_null()))
        })
        .await;

    // Real clients, each in a loop until told to stop; every error is kept.
    let stop = Arc::new(AtomicBool::new(false));
    let redis_client = tokio::spawn({
        let (stop, certs) = (stop.clone(), certs.clone());
        async move {
            let mut s = session(redis_port, &certs).await;
            let (mut ok, mut errors) = (0u64, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                match s.cmd(&["INCR", "counter"]).await {
                    Ok(Reply::Integer(_)) => ok += 1,
                    other => errors.push(format!("{other:?}")),
                }
                // And a new session now and then: admission must let it in.
                if ok % 50 == 0 {
                    match reached(redis_port, &certs).await {
                        Ok(_) => {}
                        Err(err) => errors.push(format!("new session: {err}")),
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (ok, errors)
        }
    });
    let pg_client = tokio::spawn({
        let (stop, certs) = (stop.clone(), certs.clone());
        async move {
            let (mut ok, mut errors) = (0u64, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                // A new session each time: the opening is what strangers attack.
                match pg_connect(pg_port, &certs).await {
                    Ok(client) => match client.query_one("select 1", &[]).await {
                        Ok(_) => ok += 1,
                        Err(err) => errors.push(pg_error(&err)),
                    },
                    Err(err) => errors.push(pg_error(&err)),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (ok, errors)
        }
    });
    let etcd_client = tokio::task::spawn_blocking({
        let (stop, ca) = (stop.clone(), certs.ca.clone());
        move || {
            let (mut ok, mut errors) = (0u64, Vec::new());
            let endpoint = format!("localhost:{etcd_port}");
            while !stop.load(Ordering::Relaxed) {
                let out = etcdctl(&endpoint, Some(&ca), &["put", "k", &ok.to_string()]);
                if out.status.success() {
                    ok += 1;
                } else {
                    errors.push(String::from_utf8_lossy(&out.stderr).into_owned());
                }
            }
            (ok, errors)
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = rss_kib(portal.pid());

    // The strangers, all three endpoints at once.
    let seed: u64 = rand::random();
    let release = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let attacks: Vec<_> = [redis_port, pg_port, etcd_port]
        .into_iter()
        .enumerate()
        .map(|(i, port)| tokio::spawn(attack(port, seed + i as u64, release.clone())))
        .collect();
    // Hold them past handshake_timeout, then let go.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_peak = rss_kib(portal.pid());
    release.store(true, Ordering::Relaxed);
    let mut kept = 0;
    for attack in attacks {
        let (held, refused) = attack.await.expect("attack task");
        kept += held;
        assert_eq!(refused, 0, "connects refused by the kernel (seed {seed})");
    }
    let attack_took = started.elapsed();

    // Real clients go on a little after the strangers left, then stop.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let (redis_ok, redis_errors) = redis_client.await.expect("redis client");
    let (pg_ok, pg_errors) = pg_client.await.expect("pg client");
    let (etcd_ok, etcd_errors) = etcd_client.await.expect("etcd client");
    println!(
        "seed {seed}: {} stranger connections ({kept} held) in {attack_took:?}; real clients: \
         redis {redis_ok} ok, postgres {pg_ok} ok, etcd {etcd_ok} ok; RSS {rss_before} KiB \
         before, {rss_peak} KiB under attack",
        3 * (GARBAGE + SILENT + HALF_OPEN)
    );
    assert!(
        redis_errors.is_empty() && pg_errors.is_empty() && etcd_errors.is_empty(),
        "real clients saw errors (seed {seed}): redis {redis_errors:?}; postgres {pg_errors:?}; \
         etcd {etcd_errors:?}"
    );
    assert!(
        redis_ok > 0 && pg_ok > 0 && etcd_ok > 0,
        "a real client did nothing"
    );

    // Nothing left in an opening, and memory back near where it started.
    portal
        .wait_for("no connection left in its opening", |s| {
            s["clusters"].as_array().is_some_and(|c| {
                c.iter()
                    .flat_map(|c| c["endpoints"].as_array().into_iter().flatten())
                    .all(|e| e["opening"] == 0)
            })
        })
        .await;
    let deadline = Instant::now() + DEADLINE;
    let limit = rss_before + rss_before / 2 + 8 * 1024;
    loop {
        let rss = rss_kib(portal.pid());
        if rss <= limit {
            println!("RSS after: {rss} KiB (limit {limit} KiB)");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "RSS stayed at {rss} KiB after the strangers left: {rss_before} KiB before, \
             {rss_peak} KiB under attack, limit {limit} KiB (seed {seed})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
