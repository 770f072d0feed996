#!/usr/bin/env bash
# The test command: formatting, lints, then every test (unit and property
# tests of the view, config and parsers, and the integration tests that start
# real servers on loopback ports).
#
#   bash tests/run.sh
#
# Installs the Debian packages the tests need when they are missing, then runs
# each step and stops at the first failure (non-zero exit). Once the tests have
# run, the last line is their totals: "tests: N passed, N failed, N skipped".
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"

# Debian packages the integration tests start or call. They are installed only
# when missing (apt-get update runs only then).
TEST_PACKAGES=(
    protobuf-compiler # protoc, which etcd-client's build script needs
    redis-server # redis-server, started by the Redis tests
    redis-tools  # redis-cli, the stock client the tests drive
    openssl      # the openssl command some TLS tests use as a client
    postgresql   # initdb, pg_ctl, pg_basebackup, psql for the PostgreSQL tests
    etcd-server  # etcd, the three-member Raft clusters of the etcd and Patroni tests
    etcd-client  # etcdctl, the stock client of the etcd tests
    patroni      # Patroni and patronictl, for the end-to-end test
    redis-sentinel # redis-sentinel, for the Sentinel source tests
)

STARTED=$(date +%s)
step() {
    printf '\n==> [%ss] %s\n' "$(($(date +%s) - STARTED))" "$*"
}

install_missing() {
    local missing=() sudo=() pkg
    if ! command -v dpkg-query >/dev/null 2>&1; then
        echo "no dpkg here: make sure these are installed: ${TEST_PACKAGES[*]}"
        return 0
    fi
    for pkg in "${TEST_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' ||
            missing+=("$pkg")
    done
    if ((${#missing[@]} == 0)); then
        echo "already installed: ${TEST_PACKAGES[*]}"
        return 0
    fi
    if [ "$(id -u)" -ne 0 ]; then
        if ! command -v sudo >/dev/null 2>&1; then
            echo "need root or sudo to install: ${missing[*]}" >&2
            exit 1
        fi
        sudo=(sudo)
    fi
    echo "installing: ${missing[*]}"
    # A source that cannot be reached need not stop the install from the others.
    "${sudo[@]}" apt-get update -qq || echo "apt-get update failed; trying the install anyway" >&2
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

step "packages: ${TEST_PACKAGES[*]}"
install_missing

step "cargo fmt --all -- --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings

# cargo test rather than cargo-nextest: both took the same time here, and the
# integration-test harness hands out ports without repeats within one test
# process, which holds for cargo test (one process per test binary, binaries
# one after another) but not for nextest (one process per test). The crate
# has no doctests. cargo test closes on the summary of its last target (often
# "0 passed"), so the totals of every target are added up and printed last.
export RUST_BACKTRACE=1
step "cargo test --all-targets --no-fail-fast"
TEST_LOG=$(mktemp)
trap 'rm -f "$TEST_LOG"' EXIT
set +e
cargo test --all-targets --no-fail-fast 2>&1 | tee "$TEST_LOG"
TEST_STATUS=${PIPESTATUS[0]}
set -e
# The totals are the very last line, whether the tests passed or not.
TOTALS=$(awk '/^test result:/ {
        for (i = 2; i <= NF; i++) {
            if ($i == "passed;") passed += $(i - 1)
            if ($i == "failed;") failed += $(i - 1)
            if ($i == "ignored;") ignored += $(i - 1)
        }
    }
    END { printf "tests: %d passed, %d failed, %d skipped\n", passed, failed, ignored }' "$TEST_LOG")
if ((TEST_STATUS != 0)); then
    step "cargo test failed (exit $TEST_STATUS)"
    echo "$TOTALS"
    exit "$TEST_STATUS"
fi
step "fmt, clippy and every test passed"
echo "$TOTALS"
