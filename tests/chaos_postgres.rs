//! Randomized fault injection against a real PostgreSQL primary and
//! streaming standby (native probes) and two portals (see
//! `tests/common/chaos/postgres.rs`). The headline check: no write is ever
//! acknowledged by a server that is not the real primary of that moment.
//!
//! `cargo test --test suite chaos_postgres:: -- --nocapture` runs seed 1 with 10
//! faults (about 30 s). `CHAOS_SEED=N` replays one seed, `CHAOS_SEEDS=1,2`
//! picks several, `CHAOS_FAULTS=N` the number of faults, `CHAOS_PEERS=0`
//! runs the portals without peers. The long run (`--ignored`, or
//! `bash bench/chaos.sh postgres`) injects 100 faults.

use crate::common::chaos;

use chaos::postgres::run_postgres;
use chaos::{env_number, peers, seeds, table, Report, Settings};

async fn run_seeds(default_seeds: &[u64], default_faults: usize) -> Vec<Report> {
    let faults = env_number("CHAOS_FAULTS", default_faults);
    let mut reports = Vec::new();
    for seed in seeds(default_seeds) {
        println!("==== CHAOS_SEED={seed}: {faults} faults, PostgreSQL primary and standby ====");
        reports.push(
            run_postgres(Settings {
                seed,
                faults,
                members: 2,
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
async fn postgres_chaos() {
    let reports = run_seeds(&[1], 10).await;
    assert_all_pass(&reports);
}

/// At least 100 faults under load: `bash bench/chaos.sh postgres`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: about 100 faults per seed; run by bench/chaos.sh postgres"]
async fn postgres_chaos_long() {
    let reports = run_seeds(&[1], 100).await;
    assert_all_pass(&reports);
}
