#!/usr/bin/env bash
# Benchmark: direct Redis vs HAProxy (TLS) vs portal (TLS) on one machine.
#
#   bash bench/run.sh            Redis, then PostgreSQL (bench/postgres.sh)
#   bash bench/run.sh redis      Redis only
#   bash bench/run.sh postgres   PostgreSQL only (same as bash bench/postgres.sh)
#
# Prints the setup and one results table on stdout and writes both to
# bench/out/results.md (raw outputs in bench/out/raw/); the PostgreSQL part
# writes bench/out/postgres.md. Progress goes to stderr. See bench/README.md
# for the methodology.
#
# Knobs (environment):
#   N=100000        requests per GET and per SET run (redis-benchmark -n)
#   CLIENTS=50      concurrent connections for GET/SET (-c)
#   N_NEWCONN=6000  requests for the new-connection run (-k 0)
#   CLIENTS_NEWCONN=20
#   ROUNDS=3        interleaved rounds of the throughput runs (median reported)
#   REPEATS=3       failover repetitions per proxy (median, min, max reported)
#   HAPROXY_CHECK="inter 1s fall 2 rise 2"  HAProxy server check timing
#   NBTHREAD=2      HAProxy threads (the portal's tokio runtime uses one worker per core)
#   PROXIES="haproxy portal"  subset to run (e.g. "haproxy" while portal is not ready)
#   SECTIONS="throughput failover"  subset of the measurements to run
#   OP_TIMEOUTS="5000 250"  failover client profiles: per-operation timeout in ms
#   FW_ARGS=""      extra arguments for failover_window (e.g. "--op-timeout-ms 500")
#   SKIP_BUILD=1    use the existing target/release binaries
#   OUT=bench/out   where results.md and raw/ go
set -Eeuo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH=$ROOT/bench
WHAT=${1:-all}
case $WHAT in
  all | redis) ;;
  postgres) exec bash "$BENCH/postgres.sh" ;;
  patroni) exec bash "$BENCH/patroni.sh" ;;
  *)
    echo "usage: bash bench/run.sh [all|redis|postgres]" >&2
    exit 2
    ;;
esac
OUT=${OUT:-$BENCH/out}
N=${N:-100000}
CLIENTS=${CLIENTS:-50}
N_NEWCONN=${N_NEWCONN:-6000}
CLIENTS_NEWCONN=${CLIENTS_NEWCONN:-20}
ROUNDS=${ROUNDS:-3}
REPEATS=${REPEATS:-3}
NBTHREAD=${NBTHREAD:-2}
HAPROXY_CHECK=${HAPROXY_CHECK:-"inter 1s fall 2 rise 2"}
PROXIES=${PROXIES:-"haproxy portal"}
SKIP_BUILD=${SKIP_BUILD:-0}
SECTIONS=${SECTIONS:-"throughput failover"}
OP_TIMEOUTS=${OP_TIMEOUTS:-"5000 250"}
read -r -a FW_EXTRA <<<"${FW_ARGS:-}"
PORTAL_BIN=$ROOT/target/release/portal
FW_BIN=${FW_BIN:-$ROOT/target/release/examples/failover_window}
# Probe settings, identical on both sides where both have the knob.
PROBE_INTERVAL=1s
FAST_INTERVAL=20ms
PROBE_TIMEOUT=500ms

has() { [[ " $PROXIES " == *" $1 "* ]]; }
section() { [[ " $SECTIONS " == *" $1 "* ]]; }

# log, die, TMP, PIDS, cleanup traps, pick_port, wait_until, cpu_ticks, median, ...
# shellcheck source=bench/lib.sh
source "$BENCH/lib.sh"

# Redis pair: primary + replica, no persistence. Sets PRIMARY_PORT REPLICA_PORT PRIMARY_PID REPLICA_PID.
start_redis_pair() {
  local dir=$TMP/redis-$1
  mkdir -p "$dir/a" "$dir/b"
  pick_port PRIMARY_PORT
  pick_port REPLICA_PORT
  local common=(--bind 127.0.0.1 --save "" --appendonly no
    --repl-diskless-sync yes --repl-diskless-sync-delay 0)
  redis-server --port "$PRIMARY_PORT" "${common[@]}" --dir "$dir/a" --logfile "$dir/a/redis.log" &
  PRIMARY_PID=$!
  PIDS+=("$PRIMARY_PID")
  disown "$PRIMARY_PID"
  redis-server --port "$REPLICA_PORT" "${common[@]}" --dir "$dir/b" --logfile "$dir/b/redis.log" \
    --replicaof 127.0.0.1 "$PRIMARY_PORT" &
  REPLICA_PID=$!
  PIDS+=("$REPLICA_PID")
  disown "$REPLICA_PID"
  wait_until 20 "replica in sync" \
    bash -c "redis-cli -p $REPLICA_PORT info replication | grep -q master_link_status:up"
}
stop_redis_pair() {
  stop_pid "$PRIMARY_PID"
  stop_pid "$REPLICA_PID"
}

# HAProxy. Sets HAPROXY_PORT HAPROXY_PID.
start_haproxy() {
  pick_port HAPROXY_PORT
  pick_port HAPROXY_STATS
  local cfg=$TMP/haproxy-$1.cfg stats=$HAPROXY_STATS
  sed -e "s|@NBTHREAD@|$NBTHREAD|" -e "s|@LISTEN_PORT@|$HAPROXY_PORT|" -e "s|@PEM@|$TMP/certs/haproxy.pem|" \
    -e "s|@CHECK@|$HAPROXY_CHECK|" -e "s|@PRIMARY_PORT@|$PRIMARY_PORT|" -e "s|@REPLICA_PORT@|$REPLICA_PORT|" -e "s|@STATS_PORT@|$stats|" \
    "$BENCH/haproxy.cfg.tmpl" >"$cfg"
  haproxy -c -q -f "$cfg" >"$TMP/haproxy-$1.check" 2>&1 || { cat "$TMP/haproxy-$1.check" >&2; die "bad haproxy config"; }
  haproxy -db -f "$cfg" >"$TMP/haproxy-$1.log" 2>&1 &
  HAPROXY_PID=$!
  PIDS+=("$HAPROXY_PID")
  disown "$HAPROXY_PID"
  # Ready = leader UP and replica DOWN, i.e. both have been checked at least twice.
  wait_until 20 "haproxy checks (redis-a UP, redis-b DOWN)" haproxy_ready
}
haproxy_ready() {
  local csv
  csv=$(curl -sf "http://127.0.0.1:$HAPROXY_STATS/stats;csv") || return 1
  awk -F, '$1=="redis_leader" && $2=="redis-a" && $18=="UP" {a=1} $1=="redis_leader" && $2=="redis-b" && $18=="DOWN" {b=1} END {exit !(a && b)}' <<<"$csv"
}

# portal. Sets PORTAL_PORT PORTAL_PID PORTAL_ADMIN.
start_portal() {
  pick_port PORTAL_PORT
  pick_port PORTAL_ADMIN
  local cfg=$TMP/portal-$1.yaml
  cat >"$cfg" <<EOF
admin:
  listen: 127.0.0.1:$PORTAL_ADMIN
shutdown:
  drain_timeout: 1s
clusters:
  - name: bench
    protocol: redis
    probe:
      interval: $PROBE_INTERVAL
      fast_interval: $FAST_INTERVAL
      timeout: $PROBE_TIMEOUT
      rise: 2
      fall: 2
    members:
      - name: redis-a
        address: 127.0.0.1:$PRIMARY_PORT
      - name: redis-b
        address: 127.0.0.1:$REPLICA_PORT
    endpoints:
      - name: bench-rw
        listen: 127.0.0.1:$PORTAL_PORT
        route: leader
        tls:
          cert: $TMP/certs/server.crt
          key: $TMP/certs/server.key
        max_connections: 10000
        on_leader_change: close
EOF
  "$PORTAL_BIN" check -c "$cfg" >"$TMP/portal-$1.check" 2>&1 || { cat "$TMP/portal-$1.check" >&2; die "portal check failed"; }
  RUST_LOG=warn "$PORTAL_BIN" run -c "$cfg" >"$TMP/portal-$1.log" 2>&1 &
  PORTAL_PID=$!
  PIDS+=("$PORTAL_PID")
  disown "$PORTAL_PID"
  # Ready = redis-a leader and redis-b an up replica with a known term (so it can be promoted).
  wait_until 20 "portal status (leader redis-a, replica redis-b up)" portal_ready
}
portal_ready() {
  local js
  js=$(curl -sf "http://127.0.0.1:$PORTAL_ADMIN/status" | tr -d ' \n') || return 1
  [[ $js == *'"leader":"redis-a"'* ]] || return 1
  local b
  b=$(grep -o '{[^{}]*"name":"redis-b"[^{}]*}' <<<"$js") || return 1
  [[ $b == *'"health":"up"'* && $b == *'"role":"replica"'* && $b != *'"term":null'* ]]
}

# ---------------------------------------------------------------- install, build
missing=()
for b in redis-server redis-cli redis-benchmark haproxy; do command -v "$b" >/dev/null || missing+=("$b"); done
if ((${#missing[@]})); then
  log "installing (missing: ${missing[*]})"
  apt-get install -y redis-server redis-tools haproxy >&2
fi
for b in curl openssl ss pgrep; do command -v "$b" >/dev/null || die "$b is required"; done

cd "$ROOT"
if [[ $SKIP_BUILD != 1 ]]; then
  log "cargo build --release"
  cargo build --release >&2
  log "cargo build --release --example failover_window"
  cargo build --release --example failover_window >&2
fi
[[ -x $FW_BIN ]] || die "$FW_BIN missing"
if has portal; then [[ -x $PORTAL_BIN ]] || die "$PORTAL_BIN missing"; fi

# ---------------------------------------------------------------- certs
mkdir -p "$TMP/certs" "$OUT/raw"
find "$OUT/raw" -maxdepth 1 -type f ! -name 'pg-*' -delete # pg-*: bench/postgres.sh's
if has portal; then
  "$PORTAL_BIN" certs init --dir "$TMP/certs" --host localhost --host 127.0.0.1 >"$TMP/certs.log" 2>&1 \
    || { cat "$TMP/certs.log" >&2; die "portal certs init failed"; }
  CERT_SOURCE="portal certs init"
else
  # HAProxy-only runs (portal not built yet): an equivalent ECDSA P-256 CA + leaf.
  (
    cd "$TMP/certs"
    openssl ecparam -name prime256v1 -genkey -noout -out ca.key
    openssl req -x509 -new -key ca.key -subj /CN=bench-ca -days 2 -out ca.crt
    openssl ecparam -name prime256v1 -genkey -noout -out server.key
    openssl req -new -key server.key -subj /CN=localhost -out server.csr
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' >san.ext
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -extfile san.ext -out server.crt
  ) >"$TMP/certs.log" 2>&1 || { cat "$TMP/certs.log" >&2; die "openssl certs failed"; }
  CERT_SOURCE="openssl (ECDSA P-256)"
fi
cat "$TMP/certs/server.crt" "$TMP/certs/server.key" >"$TMP/certs/haproxy.pem"
CA=$TMP/certs/ca.crt
TLS_ARGS=(--tls --cacert "$CA" --sni localhost)

# ---------------------------------------------------------------- setup
# Anything else competing for the 2 cores skews every column; say so.
others=$(pgrep -l '^(redis-benchmar|redis-server|haproxy|portal|cargo|rustc)' | paste -sd',' || true)
git_rev=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo "no commit")
git_dirty=$(git -C "$ROOT" status --porcelain 2>/dev/null | wc -l)
SETUP=$(
  cat <<EOF
## Setup

- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')
- machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')), $(awk '/MemTotal/ {printf "%.1f GiB RAM", $2/1048576}' /proc/meminfo), kernel $(uname -r)
- redis-server $(redis-server --version | grep -o 'v=[^ ]*' | cut -d= -f2), redis-benchmark from the same package, $(haproxy -v | head -1 | cut -d' ' -f1-3), $(openssl version | cut -d' ' -f1-2)
- portal: git $git_rev ($git_dirty uncommitted paths), $(if has portal; then "$PORTAL_BIN" --version 2>/dev/null || echo "portal"; else echo "not run"; fi), cargo build --release
- load average at start: $(cut -d' ' -f1-3 /proc/loadavg); other redis/haproxy/portal/cargo processes at start: ${others:-none}
- everything on 127.0.0.1, all processes share the $(nproc) cores; certificate: ECDSA P-256 from $CERT_SOURCE; clients verify it against the CA (redis-benchmark \`--tls --cacert ca.crt --sni localhost\`)
- GET/SET: \`redis-benchmark -t get,set -n $N -c $CLIENTS -P 1\`, $ROUNDS interleaved rounds, median reported
- new connections: \`redis-benchmark -t ping_inline -n $N_NEWCONN -c $CLIENTS_NEWCONN -k 0\` (one TCP connect + TLS handshake per request), $ROUNDS rounds, median
- failover: bench/failover_window.rs, $REPEATS repetitions per proxy and client profile (per-operation timeout: $OP_TIMEOUTS ms), each on a fresh primary+replica and a fresh proxy, median (min–max)
- HAProxy: nbthread $NBTHREAD, mode tcp, ssl-min-ver TLSv1.2, tcp-check PING / info replication / role:master, \`check $HAPROXY_CHECK on-marked-down shutdown-sessions\`, timeout check 500ms, timeout connect 1s (so a retry after a refused connect waits 1 s), no logging
- portal: probe interval $PROBE_INTERVAL, fast_interval $FAST_INTERVAL, timeout $PROBE_TIMEOUT, rise 2, fall 2, route leader, on_leader_change close, RUST_LOG=warn, tokio default (one worker per core)
EOF
)
printf '%s\n\n' "$SETUP"

# ---------------------------------------------------------------- contention
# CPU used by processes outside this script's tree while it measures, as a
# share of all CPU time: busy jiffies from /proc/stat minus our own tree's
# (this shell's utime+stime plus that of every child it has reaped).
read -r BUSY0 TOTAL0 <<<"$(machine_ticks)"
OWN0=$(own_ticks)

# ---------------------------------------------------------------- throughput, latency, CPU
declare -A R   # R[target.metric]: newline-separated samples
targets=()
add() { R[$1]+="$2"$'\n'; }
TLS_NOTE=""
if section throughput; then
log "starting redis primary+replica, proxies"
start_redis_pair main
has haproxy && start_haproxy main
has portal && start_portal main

negotiated() { # port: "TLSv1.3 TLS_AES_256_GCM_SHA384" as seen by an OpenSSL client
  openssl s_client -connect "127.0.0.1:$1" -servername localhost -CAfile "$CA" -verify_hostname localhost -verify_return_error -brief </dev/null 2>&1 \
    | awk -F': ' '/Protocol version/ {v=$2} /Ciphersuite/ {c=$2} /Verification/ {ok=$2} END {print v, c, "verification:", ok}'
}
has haproxy && TLS_NOTE+="- haproxy TLS: $(negotiated "$HAPROXY_PORT")"$'\n'
has portal && TLS_NOTE+="- portal TLS: $(negotiated "$PORTAL_PORT")"$'\n'
printf '%s\n' "$TLS_NOTE"


targets=(direct)
has haproxy && targets+=(haproxy)
has portal && targets+=(portal)
target_args() { # target -> redis-benchmark connection args
  case $1 in
    direct) echo "-h 127.0.0.1 -p $PRIMARY_PORT" ;;
    haproxy) echo "-h 127.0.0.1 -p $HAPROXY_PORT" ;;
    portal) echo "-h 127.0.0.1 -p $PORTAL_PORT" ;;
  esac
}
target_pid() {
  case $1 in
    haproxy) echo "$HAPROXY_PID" ;;
    portal) echo "$PORTAL_PID" ;;
    *) echo "" ;;
  esac
}

run_rb() { # target tag extra-args...: runs redis-benchmark --csv, leaves the CSV in raw/, adds samples
  local t=$1 tag=$2 pid before after csv
  shift 2
  local conn tls=()
  read -r -a conn <<<"$(target_args "$t")"
  [[ $t != direct ]] && tls=("${TLS_ARGS[@]}")
  pid=$(target_pid "$t")
  [[ -n $pid ]] && before=$(cpu_ticks "$pid")
  csv=$OUT/raw/$tag-$t-r$round.csv
  # timeout: redis-benchmark 7.0 with --tls spins forever if it cannot connect.
  timeout --foreground 600 redis-benchmark "${conn[@]}" "${tls[@]}" "$@" --csv >"$csv" 2>"$TMP/rb.err" || { cat "$TMP/rb.err" >&2; die "redis-benchmark $t $tag failed"; }
  if [[ -n $pid ]]; then
    after=$(cpu_ticks "$pid")
    add "$t.$tag.ticks" "$((after - before))"
  fi
  local test rps p50 p99
  while IFS=, read -r test rps _ _ p50 _ p99 _; do
    [[ $test == test ]] && continue
    add "$t.$test.rps" "$rps"
    add "$t.$test.p50" "$p50"
    add "$t.$test.p99" "$p99"
  done < <(tr -d '"' <"$csv")
  grep -q . < <(tail -n +2 "$csv") || die "redis-benchmark $t $tag printed no results (see $csv)"
}

for ((round = 1; round <= ROUNDS; round++)); do
  for t in "${targets[@]}"; do
    log "round $round/$ROUNDS: GET/SET via $t"
    run_rb "$t" getset -t get,set -n "$N" -c "$CLIENTS" -P 1
  done
  for t in "${targets[@]}"; do
    log "round $round/$ROUNDS: new connections via $t"
    run_rb "$t" newconn -t ping_inline -n "$N_NEWCONN" -c "$CLIENTS_NEWCONN" -k 0
  done
done

has haproxy && stop_pid "$HAPROXY_PID"
has portal && stop_pid "$PORTAL_PID"
stop_redis_pair
fi

# ---------------------------------------------------------------- failover
# Two client profiles: a patient one (5 s per connect/handshake/command, so a
# write parked inside the proxy waits for it) and an impatient one (250 ms, so
# the client abandons a parked write and reconnects).
section failover || REPEATS=0
for ((rep = 1; rep <= REPEATS; rep++)); do
  for opt in $OP_TIMEOUTS; do
    for p in haproxy portal; do
      has "$p" || continue
      log "failover $rep/$REPEATS via $p, client op timeout ${opt} ms"
      start_redis_pair "fo-$p-$opt-$rep"
      if [[ $p == haproxy ]]; then
        start_haproxy "fo-$opt-$rep"
        port=$HAPROXY_PORT ppid=$HAPROXY_PID
      else
        start_portal "fo-$opt-$rep"
        port=$PORTAL_PORT ppid=$PORTAL_PID
      fi
      json=$OUT/raw/failover-$p-op$opt-$rep.json
      "$FW_BIN" --label "$p" --proxy "127.0.0.1:$port" --ca "$CA" --sni localhost \
        --primary-pid "$PRIMARY_PID" --replica "127.0.0.1:$REPLICA_PORT" --op-timeout-ms "$opt" \
        "${FW_EXTRA[@]}" >"$json" 2>"$TMP/fw.err" \
        || { cat "$json" "$TMP/fw.err" >&2; die "failover_window via $p failed"; }
      log "  $(cat "$json")"
      add "$p.window.$opt" "$(grep -o '"window_ms":[0-9.]*' "$json" | cut -d: -f2)"
      add "$p.lag.$opt" "$(grep -o '"endpoint_lag_ms":[0-9.]*' "$json" | cut -d: -f2)"
      stop_pid "$ppid"
      stop_redis_pair
    done
  done
done

# ---------------------------------------------------------------- table
sleep 0.2 # let the last children be reaped
read -r BUSY1 TOTAL1 <<<"$(machine_ticks)"
OWN1=$(own_ticks)
FOREIGN=$(awk -v b=$((BUSY1 - BUSY0)) -v t=$((TOTAL1 - TOTAL0)) -v o=$((OWN1 - OWN0)) \
  'BEGIN {f = b - o; if (f < 0) f = 0; printf "%.0f%%", (t > 0) ? 100 * f / t : 0}')
CLK_TCK=$(getconf CLK_TCK)
val() { # key -> median of samples, or —
  [[ -n ${R[$1]:-} ]] || { echo "—"; return; }
  printf '%s' "${R[$1]}" | median
}
spread() { [[ -n ${R[$1]:-} ]] || { echo "—"; return; }; printf '%s' "${R[$1]}" | minmax; }
cpu_per_100k() { # target tag requests-per-round
  [[ -n ${R[$1.$2.ticks]:-} ]] || { echo "—"; return; }
  printf '%s' "${R[$1.$2.ticks]}" | awk -v hz="$CLK_TCK" -v n="$3" '{t+=$1; k++} END {printf "%.2f", t / hz / (n * k) * 100000}'
}

rows=()
row() { # label direct haproxy portal better
  rows+=("| $1 | $(fmt "$2") | $(fmt "$3") | $(fmt "$4") | $(ratio "$4" "$3") | $5 |")
}
for op in GET SET; do
  row "$op ops/s" "$(val direct.$op.rps)" "$(val haproxy.$op.rps)" "$(val portal.$op.rps)" "higher"
  row "$op p50 ms" "$(val direct.$op.p50)" "$(val haproxy.$op.p50)" "$(val portal.$op.p50)" "lower"
  row "$op p99 ms" "$(val direct.$op.p99)" "$(val haproxy.$op.p99)" "$(val portal.$op.p99)" "lower"
done
row "new-conn ops/s (-k 0)" "$(val direct.PING_INLINE.rps)" "$(val haproxy.PING_INLINE.rps)" "$(val portal.PING_INLINE.rps)" "higher"
row "new-conn p99 ms" "$(val direct.PING_INLINE.p99)" "$(val haproxy.PING_INLINE.p99)" "$(val portal.PING_INLINE.p99)" "lower"
row "proxy CPU s / 100k req, GET+SET keepalive" "—" "$(cpu_per_100k haproxy getset $((2 * N)))" "$(cpu_per_100k portal getset $((2 * N)))" "lower"
row "proxy CPU s / 100k req, new conn" "—" "$(cpu_per_100k haproxy newconn "$N_NEWCONN")" "$(cpu_per_100k portal newconn "$N_NEWCONN")" "lower"
for opt in $OP_TIMEOUTS; do
  for m in window lag; do
    case $m in
      window) label="failover window ms" ;;
      lag) label="endpoint lag after promotion ms" ;;
    esac
    h=$(val "haproxy.$m.$opt") q=$(val "portal.$m.$opt")
    rows+=("| $label, client timeout $opt ms: median (min–max) | — | $(fmt "$h") ($(spread "haproxy.$m.$opt")) | $(fmt "$q") ($(spread "portal.$m.$opt")) | $(ratio "$q" "$h") | lower |")
  done
done

rows+=("| leader check (not a measurement) | — | tcp-check role:master, $HAPROXY_CHECK | probe INFO replication, interval $PROBE_INTERVAL, fast_interval $FAST_INTERVAL, rise 2, fall 2 | | |")

TABLE=$(
  echo "## Results"
  echo
  echo "| metric | direct | haproxy | portal | portal/haproxy | better |"
  echo "|---|---:|---:|---:|---:|---|"
  printf '%s\n' "${rows[@]}"
  echo
  echo "portal/haproxy: for ops/s higher is better; for latency, CPU, failover window and lag lower is better."
  echo "CPU used by other processes during the measurements: $FOREIGN of the machine (0% = quiet machine); load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "direct = plaintext to the primary (no TLS, no proxy); haproxy and portal = TLS through the proxy."
)
# Every sample behind the medians, for results.md only: the spread between
# rounds says how much of a portal/haproxy difference is noise.
samples() { if [[ -n ${R[$1]:-} ]]; then printf '%s' "${R[$1]}" | paste -sd' '; else echo "—"; fi; }
SAMPLES=$(
  echo "## Samples behind the medians (run order)"
  echo
  for t in "${targets[@]}"; do
    for op in GET SET PING_INLINE; do
      echo "- $t $op ops/s: $(samples "$t.$op.rps"); p99 ms: $(samples "$t.$op.p99")"
    done
  done
  for t in haproxy portal; do
    for tag in getset newconn; do
      echo "- $t proxy CPU ticks ($CLK_TCK/s) per $tag run: $(samples "$t.$tag.ticks")"
    done
  done
  for p in haproxy portal; do
    for opt in $OP_TIMEOUTS; do
      echo "- $p failover window ms, client timeout $opt ms: $(samples "$p.window.$opt")"
    done
  done
)
printf '%s\n' "$TABLE"
printf '# portal benchmark\n\n%s\n\n%s\n%s\n\n%s\n' "$SETUP" "$TLS_NOTE" "$TABLE" "$SAMPLES" >"$OUT/results.md"
log "wrote $OUT/results.md"

if [[ $WHAT == all ]]; then
  echo
  bash "$BENCH/postgres.sh"
fi
