#!/usr/bin/env bash
# Long randomized fault injection against real Redis servers and two portals
# (tests/chaos.rs, tests/common/chaos/): at least 100 faults per seed under
# load from four writers, then the table of what the checker found, as
# markdown.
#
#   bash bench/chaos.sh                 # seed 1, 100 faults
#   CHAOS_SEEDS=1,2 CHAOS_FAULTS=150 bash bench/chaos.sh
#   CHAOS_SEED=7 bash bench/chaos.sh    # replay one seed
#   CHAOS_MEMBERS=2 bash bench/chaos.sh # two Redis members instead of three
#   CHAOS_RDB_ROGUES=1 bash bench/chaos.sh  # some rogues start from their RDB
#
# Exit status: 0 when every seed passed, non-zero otherwise. The run's log
# (every step, every leader change each portal showed, every failure with its
# CHAOS_SEED=<n>) goes to the terminal and the full output to
# target/chaos-bench.log; each seed's server and portal logs are kept in
# target/tmp/chaos-seed-<n>/.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export CHAOS_FAULTS=${CHAOS_FAULTS:-100}
mkdir -p target
LOG=target/chaos-bench.log
cargo test --test chaos redis_chaos_long -- --ignored --exact --nocapture 2>&1 | tee "$LOG"
STATUS=${PIPESTATUS[0]}
echo
echo "## chaos: $(date -u +%Y-%m-%dT%H:%MZ), CHAOS_FAULTS=$CHAOS_FAULTS"
echo
# The table the test printed last.
awk '/^\| seed \|/ {table = ""; on = 1} on && /^\|/ {table = table $0 "\n"; next} on {on = 0} END {printf "%s", table}' "$LOG"
exit "$STATUS"
