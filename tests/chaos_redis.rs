//! Randomized fault injection against real Redis servers and two portals
//! (see `tests/common/chaos/`). The headline check: no write is ever
//! acknowledged by a member that is not the real primary of that moment.
//!
//! `cargo test --test suite chaos_redis:: -- --nocapture` runs seeds 1 and 2 with 12
//! faults each (about 25 s each). `CHAOS_SEED=N` replays one seed,
//! `CHAOS_SEEDS=1,2,3` picks several, `CHAOS_FAULTS=N` the number of
//! faults, `CHAOS_MEMBERS=2..4` the number of Redis members (default 3),
//! `CHAOS_PEERS=0` runs the two portals without peers (by default each
//! names the other in `admin.peers`, as a production deployment does).
//! The long run (`--ignored`, or `bench/chaos.sh`) injects 100 faults per
//! seed.

use crate::common::chaos;

use chaos::{env_number, peers, run_redis, seeds, table, Report, Settings};

async fn run_seeds(default_seeds: &[u64], default_faults: usize) -> Vec<Report> {
    let faults = env_number("CHAOS_FAULTS", default_faults);
    let members = env_number("CHAOS_MEMBERS", 3).clamp(2, 4);
    let mut reports = Vec::new();
    for seed in seeds(default_seeds) {
        println!("==== CHAOS_SEED={seed}: {faults} faults, {members} Redis members ====");
        reports.push(
            run_redis(Settings {
                seed,
                faults,
                members,
                writers_per_portal: 2,
                rdb_rogues: std::env::var("CHAOS_RDB_ROGUES").is_ok_and(|v| v == "1"),
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
async fn redis_chaos() {
    let reports = run_seeds(&[1, 2], 12).await;
    assert_all_pass(&reports);
}

/// At least 100 faults under load: `bench/chaos.sh`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: about 100 faults per seed; run by bench/chaos.sh"]
async fn redis_chaos_long() {
    let reports = run_seeds(&[1], 100).await;
    assert_all_pass(&reports);
}
