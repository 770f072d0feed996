//! Randomized fault injection against Redis with Sentinel: three real Redis
//! members, three real `redis-sentinel` processes and two portals whose
//! cluster has `dcs: sentinel:` (see `tests/common/chaos/sentinel.rs`).
//! Sentinel makes every promotion; the truth is observed (every member's
//! `ROLE`, every Sentinel's naming and config epoch, polled every 20 ms).
//! The headline check: no write is ever acknowledged by a server that is not
//! the real primary of that moment, above all not by an old primary that was
//! frozen through a failover and wakes up still a master.
//!
//! `cargo test --test suite chaos_sentinel:: -- --nocapture` runs seed 26 with 7
//! faults, every kind of fault, two Sentinel failovers (about 35 s). `CHAOS_SEED=N` replays one seed's schedule (Sentinel's
//! own choices, such as which replica it promotes, are not seeded),
//! `CHAOS_SEEDS=1,2` picks several, `CHAOS_FAULTS=N` the number of faults,
//! `CHAOS_PEERS=0` runs the portals without peers. The long run
//! (`--ignored`, or `bash bench/chaos.sh sentinel`) injects 100 faults.

use crate::common::chaos;

use chaos::sentinel::run_sentinel;
use chaos::{env_number, peers, seeds, table, Report, Settings};

async fn run_seeds(default_seeds: &[u64], default_faults: usize) -> Vec<Report> {
    let faults = env_number("CHAOS_FAULTS", default_faults);
    let mut reports = Vec::new();
    for seed in seeds(default_seeds) {
        println!("==== CHAOS_SEED={seed}: {faults} faults, Redis with 3 Sentinels ====");
        reports.push(
            run_sentinel(Settings {
                seed,
                faults,
                members: 3,
                writers_per_portal: 2,
                rdb_rogues: false,
                peers: peers(),
            })
            .await,
        );
    }
    println!("\n{}", table(&reports));
    reports
}

fn assert_all_pass(reports: &[Report]) {
    let failed: Vec<String> = reports
        .iter()
        .filter(|r| !r.ok())
        .map(Report::failure_text)
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} seeds failed:\n{}\n{}",
        failed.len(),
        reports.len(),
        failed.join("\n"),
        table(reports)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_chaos() {
    // Seed 26's first 7 faults draw every kind (2 failovers).
    let reports = run_seeds(&[26], 7).await;
    assert_all_pass(&reports);
}

/// At least 100 faults under load: `bash bench/chaos.sh sentinel`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: about 100 faults per seed; run by bench/chaos.sh sentinel"]
async fn sentinel_chaos_long() {
    let reports = run_seeds(&[1], 100).await;
    assert_all_pass(&reports);
}
