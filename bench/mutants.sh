#!/usr/bin/env bash
# Mutation testing of the pure core with cargo-mutants (crates.io): every
# mutant of the view's state machine (src/view/mod.rs), the router
# (src/router.rs) and the config validator (src/config.rs: the `Validator`
# methods, `valid_host_port`, `de_duration`; not the serde plumbing and
# defaults) is built and run against the unit tests (`cargo test --lib`; the
# integration tests start real servers and are far too slow for this), then
# the caught / missed / unviable / timeout counts per file, as markdown.
#
#   bash bench/mutants.sh                        # the three files
#   bash bench/mutants.sh --iterate              # only the mutants the last run did not catch
#   bash bench/mutants.sh --list                 # list the mutants, run nothing
#   bash bench/mutants.sh -f src/router.rs       # one file (replaces the default files and filters)
#   bash bench/mutants.sh -F 'View::newest'      # only the mutants whose name matches (idem)
#   PORTAL_PROPTEST_CASES=2000 bash bench/mutants.sh   # the properties at full strength
#
# Arguments go to `cargo mutants` as they are (see `cargo mutants --help`);
# any file or name filter among them (-f, -F, -e, -E) replaces the default
# ones. Installs cargo-mutants (`cargo install cargo-mutants --locked`) when
# missing.
#
# It runs `--in-place`: each mutant is written into src/ and the tree's own
# target/ is reused, so a mutant costs one incremental build (10 to 15 s
# here) and one unit-test run. cargo-mutants restores the file after each
# mutant and on Ctrl-C; do not edit src/ or build in this tree meanwhile,
# and check `git status` if the run was killed with SIGKILL. One mutant at a
# time (in place there is one tree), under `nice`.
#
# The view's four properties run PORTAL_PROPTEST_CASES [200] cases each
# instead of 2000, from the fixed seed PROPTEST_RNG_SEED [1] so that a run is
# reproducible, without shrinking failures and without writing new
# regression seeds to proptest-regressions/ (the saved seeds are replayed).
# Per-mutant test timeout: MUTANTS_TIMEOUT [90] s. Exit status: cargo
# mutants' own (0 when no mutant was missed; 2 when some were, 3 when some
# timed out). Full results in target/mutants.out/ (caught.txt, missed.txt,
# unviable.txt, timeout.txt, diffs and logs per mutant).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
export PROTOC=${PROTOC:-/nonexistent/protoc}
export PORTAL_PROPTEST_CASES=${PORTAL_PROPTEST_CASES:-200}
export PROPTEST_RNG_SEED=${PROPTEST_RNG_SEED:-1}
export PROPTEST_MAX_SHRINK_ITERS=0
export PROPTEST_DISABLE_FAILURE_PERSISTENCE=1
TIMEOUT=${MUTANTS_TIMEOUT:-90}

if ! cargo mutants --version >/dev/null 2>&1; then
  echo "installing cargo-mutants" >&2
  nice -n 10 cargo install cargo-mutants --locked || exit 1
fi

# The default files and filters, unless the arguments choose their own.
FILTERED=0
for arg in "$@"; do
  case "$arg" in
    -f | -F | -e | -E | --file* | --re* | --exclude*) FILTERED=1 ;;
  esac
done
if [ "$FILTERED" = 0 ]; then
  set -- -f src/view/mod.rs -f src/router.rs -f src/config.rs \
    -F '^src/(view|router)' -F 'Validator|valid_host_port|de_duration' "$@"
fi

for arg in "$@"; do
  case "$arg" in
    --list | --list-files) exec cargo mutants --cargo-arg=--lib "$@" ;;
  esac
done

mkdir -p target
START=$(date +%s)
# `--cargo-arg=--lib`, not `-- --lib`: the build step (`cargo test --no-run`)
# must skip the integration tests and examples too.
nice -n 10 cargo mutants --in-place --timeout "$TIMEOUT" --output target \
  --cargo-arg=--lib "$@"
STATUS=$?
ELAPSED=$(($(date +%s) - START))

OUT=target/mutants.out
echo
echo "## mutants: $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src || echo +changes), cargo-mutants $(cargo mutants --version | awk '{print $2}'), PORTAL_PROPTEST_CASES=$PORTAL_PROPTEST_CASES, $((ELAPSED / 60)) min $((ELAPSED % 60)) s"
echo
echo "| file | caught | missed | unviable | timeout |"
echo "|---|---:|---:|---:|---:|"
for kind in caught missed unviable timeout; do
  [ -f "$OUT/$kind.txt" ] && sed "s/^\([^:]*\):.*/\1 $kind/" "$OUT/$kind.txt"
done | awk '
  { n[$1, $2]++; files[$1] = 1; total[$2]++ }
  END {
    for (f in files)
      printf "| %s | %d | %d | %d | %d |\n", f, n[f, "caught"], n[f, "missed"], n[f, "unviable"], n[f, "timeout"]
    printf "| total | %d | %d | %d | %d |\n", total["caught"], total["missed"], total["unviable"], total["timeout"]
  }' | sort
for kind in missed timeout; do
  if [ -s "$OUT/$kind.txt" ]; then
    echo
    echo "$kind:"
    sed 's/^/    /' "$OUT/$kind.txt"
  fi
done
exit "$STATUS"
