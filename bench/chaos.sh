#!/usr/bin/env bash
# Long randomized fault injection against real servers and two portals
# (tests/chaos_redis.rs, tests/chaos_postgres.rs, tests/chaos_sentinel.rs and tests/chaos_patroni.rs, harness in
# tests/common/chaos/): at least 100 faults per seed under load from four
# writers, then the table of what the checker found, as markdown.
#
#   bash bench/chaos.sh                 # Redis, seed 1, 100 faults
#   bash bench/chaos.sh postgres        # PostgreSQL (native probes), seed 1, 100 faults
#   bash bench/chaos.sh sentinel        # Redis with 3 Sentinels (Sentinel promotes), seed 1, 100 faults
#   bash bench/chaos.sh patroni         # Patroni over etcd (DCS), seed 1, 100 faults
#   CHAOS_SEEDS=1,2 CHAOS_FAULTS=150 bash bench/chaos.sh
#   CHAOS_SEED=7 bash bench/chaos.sh    # replay one seed
#   CHAOS_PEERS=0 bash bench/chaos.sh   # portals without peers (admin.peers)
#   CHAOS_MEMBERS=2 bash bench/chaos.sh # Redis: two members instead of three
#   CHAOS_RDB_ROGUES=1 bash bench/chaos.sh  # Redis: some rogues start from their RDB
#
# Exit status: 0 when every seed passed, non-zero otherwise. The run's log
# (every step, every leader change each portal showed, every failure with its
# CHAOS_SEED=<n>) goes to the terminal and the full output to
# target/chaos-bench[-postgres|-sentinel|-patroni].log; each seed's server and portal
# logs are kept in target/tmp/chaos[-postgres|-sentinel|-patroni]-seed-<n>/.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export CHAOS_FAULTS=${CHAOS_FAULTS:-100}
TARGET=${1:-redis}
mkdir -p target
case "$TARGET" in
  redis) NAME=chaos_redis::redis_chaos_long; LOG=target/chaos-bench.log ;;
  postgres) NAME=chaos_postgres::postgres_chaos_long; LOG=target/chaos-bench-postgres.log ;;
  sentinel) NAME=chaos_sentinel::sentinel_chaos_long; LOG=target/chaos-bench-sentinel.log ;;
  patroni) NAME=chaos_patroni::patroni_chaos_long; LOG=target/chaos-bench-patroni.log ;;
  *) echo "usage: bash bench/chaos.sh [redis|postgres|sentinel|patroni]" >&2; exit 2 ;;
esac
cargo test --test suite "$NAME" -- --ignored --exact --nocapture 2>&1 | tee "$LOG"
STATUS=${PIPESTATUS[0]}
echo
echo "## chaos ($TARGET): $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src tests || echo +changes), CHAOS_FAULTS=$CHAOS_FAULTS, CHAOS_PEERS=${CHAOS_PEERS:-1}"
echo
# The table the test printed last.
awk '/^\| seed \|/ {table = ""; on = 1} on && /^\|/ {table = table $0 "\n"; next} on {on = 0} END {printf "%s", table}' "$LOG"
exit "$STATUS"
