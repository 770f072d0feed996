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
#   SECTIONS="throughput failover idle"  subset of the measurements to run
#   IDLE_N=2000     idle TLS sessions held per proxy for the idle-memory rows
#   MANY_N=10000    concurrent sessions for the many-sessions rows
#   IDLE_SETTLE=2   seconds the sessions sit idle before RSS is read
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
SECTIONS=${SECTIONS:-"throughput failover idle"}
IDLE_N=${IDLE_N:-2000}
MANY_N=${MANY_N:-10000}
IDLE_SETTLE=${IDLE_SETTLE:-2}
OP_TIMEOUTS=${OP_TIMEOUTS:-"5000 250"}
read -r -a FW_EXTRA <<<"${FW_ARGS:-}"
PORTAL_BIN=$ROOT/target/release/portal
FW_BIN=${FW_BIN:-$ROOT/target/release/examples/failover_window}
IDLE_BIN=${IDLE_BIN:-$ROOT/target/release/examples/idle_sessions}
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
# Arguments after the name go to the primary only (its TLS port, maxclients).
start_redis_pair() {
  local dir=$TMP/redis-$1
  shift
  mkdir -p "$dir/a" "$dir/b"
  pick_port PRIMARY_PORT
  pick_port REPLICA_PORT
  local common=(--bind 127.0.0.1 --save "" --appendonly no
    --repl-diskless-sync yes --repl-diskless-sync-delay 0)
  redis-server --port "$PRIMARY_PORT" "${common[@]}" "$@" --dir "$dir/a" --logfile "$dir/a/redis.log" &
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

# HAProxy. Sets HAPROXY_PORT HAPROXY_PID. $2: client/server timeout [60s].
start_haproxy() {
  pick_port HAPROXY_PORT
  pick_port HAPROXY_STATS
  local cfg=$TMP/haproxy-$1.cfg stats=$HAPROXY_STATS
  sed -e "s|@NBTHREAD@|$NBTHREAD|" -e "s|@TIMEOUT@|${2:-60s}|" -e "s|@LISTEN_PORT@|$HAPROXY_PORT|" -e "s|@PEM@|$TMP/certs/haproxy.pem|" \
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
  log "cargo build --release --example failover_window --example idle_sessions"
  cargo build --release --example failover_window --example idle_sessions >&2
fi
[[ -x $FW_BIN ]] || die "$FW_BIN missing"
if section idle; then [[ -x $IDLE_BIN ]] || die "$IDLE_BIN missing"; fi
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
- redis-tls: the primary's own TLS port (\`--tls-port P --tls-cert-file server.crt --tls-key-file server.key --tls-ca-cert-file ca.crt --tls-auth-clients no\`, same certificate as the proxies): TLS to Redis with no proxy hop, a ceiling for the proxies
- GET/SET: \`redis-benchmark -t get,set -n $N -c $CLIENTS -P 1\`, $ROUNDS interleaved rounds, median reported
- new connections: \`redis-benchmark -t ping_inline -n $N_NEWCONN -c $CLIENTS_NEWCONN -k 0\` (one TCP connect + TLS handshake per request), $ROUNDS rounds, median
- failover: bench/failover_window.rs, $REPEATS repetitions per proxy and client profile (per-operation timeout: $OP_TIMEOUTS ms), each on a fresh primary+replica and a fresh proxy, median (min–max)
- idle sessions: bench/idle_sessions.rs (tokio-rustls, CA-verified, SNI localhost, no resumption), $IDLE_N and $MANY_N sessions per proxy (connect, full TLS handshake, PING/+PONG, then idle ${IDLE_SETTLE} s), each count on a freshly started proxy in front of one primary+replica (primary \`--maxclients 20000\`); RSS = VmRSS of the proxy's processes; RLIMIT_NOFILE hard limit $(ulimit -Hn)
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
log "starting redis primary (with a TLS port) + replica, proxies"
pick_port REDIS_TLS_PORT
start_redis_pair main --tls-port "$REDIS_TLS_PORT" --tls-cert-file "$TMP/certs/server.crt" \
  --tls-key-file "$TMP/certs/server.key" --tls-ca-cert-file "$CA" --tls-auth-clients no
has haproxy && start_haproxy main
has portal && start_portal main

negotiated() { # port: "TLSv1.3 TLS_AES_256_GCM_SHA384" as seen by an OpenSSL client
  openssl s_client -connect "127.0.0.1:$1" -servername localhost -CAfile "$CA" -verify_hostname localhost -verify_return_error -brief </dev/null 2>&1 \
    | awk -F': ' '/Protocol version/ {v=$2} /Ciphersuite/ {c=$2} /Verification/ {ok=$2} END {print v, c, "verification:", ok}'
}
TLS_NOTE+="- redis-tls TLS: $(negotiated "$REDIS_TLS_PORT")"$'\n'
has haproxy && TLS_NOTE+="- haproxy TLS: $(negotiated "$HAPROXY_PORT")"$'\n'
has portal && TLS_NOTE+="- portal TLS: $(negotiated "$PORTAL_PORT")"$'\n'
printf '%s\n' "$TLS_NOTE"


targets=(direct redis-tls)
has haproxy && targets+=(haproxy)
has portal && targets+=(portal)
target_args() { # target -> redis-benchmark connection args
  case $1 in
    direct) echo "-h 127.0.0.1 -p $PRIMARY_PORT" ;;
    redis-tls) echo "-h 127.0.0.1 -p $REDIS_TLS_PORT" ;;
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

# ---------------------------------------------------------------- idle sessions
# For each proxy and each count (IDLE_N, MANY_N): a freshly started proxy,
# its RSS read, then bench/idle_sessions.rs opens the sessions (connect, TLS
# handshake, PING/+PONG) and holds them; after IDLE_SETTLE s of idleness the
# proxy's RSS and the primary's connected_clients are read again, then the
# client PINGs every held session once more (alive = held all along).
rss_kib() { # pid: VmRSS of pid and its direct children (HAProxy's), in KiB
  local total=0 p v
  for p in "$1" $(pgrep -P "$1" || true); do
    v=$(awk '/^VmRSS:/ {print $2}' "/proc/$p/status" 2>/dev/null) || continue
    total=$((total + ${v:-0}))
  done
  echo "$total"
}
member_clients() { redis-cli -p "$PRIMARY_PORT" info clients | tr -d '\r' | awk -F: '$1 == "connected_clients" {print $2}'; }
idle_reported() { # out pid: the first line is out, or the client is gone
  grep -q '"ok"' "$1" && return 0
  local st
  st=$(awk '{print $3}' "/proc/$2/stat" 2>/dev/null || true)
  [[ -z $st || $st == Z ]]
}
json_num() { grep -o "\"$1\":[0-9.]*" "$2" | head -1 | cut -d: -f2; }
IDLE_NOTES=""
idle_run() { # proxy kind(idle|many) n
  local p=$1 kind=$2 n=$3 port ppid out=$OUT/raw/idle-$1-$2.json cpid rss0 rss1 m0 m1 ok alive limit
  if [[ $p == haproxy ]]; then
    start_haproxy "idle-$kind" 10m
    port=$HAPROXY_PORT ppid=$HAPROXY_PID
    # HAProxy's session limit, derived from RLIMIT_NOFILE (no maxconn in the cfg).
    limit=$(curl -sf "http://127.0.0.1:$HAPROXY_STATS/stats;csv" | awk -F, '$1 == "redis_tls" && $2 == "FRONTEND" {print $7}')
    limit="maxconn (set by HAProxy from the fd limit) $limit"
  else
    start_portal "idle-$kind"
    port=$PORTAL_PORT ppid=$PORTAL_PID
    limit="max_connections 10000, RLIMIT_NOFILE $(awk '/Max open files/ {print $4}' "/proc/$ppid/limits")"
  fi
  sleep 1 # first probes/checks done, allocations settled
  rss0=$(rss_kib "$ppid")
  m0=$(member_clients)
  "$IDLE_BIN" --label "$p-$kind" --addr "127.0.0.1:$port" --ca "$CA" --sni localhost --n "$n" \
    >"$out" 2>"$TMP/idle.err" &
  cpid=$!
  PIDS+=("$cpid")
  # Up to 10 s per opening, 100 at a time, if the proxy stops answering.
  wait_until $((60 + n / 10)) "idle_sessions via $p ($n sessions) to report" idle_reported "$out" "$cpid"
  grep -q '"ok"' "$out" || { cat "$out" "$TMP/idle.err" >&2; die "idle_sessions via $p failed"; }
  sleep "$IDLE_SETTLE"
  rss1=$(rss_kib "$ppid")
  m1=$(member_clients)
  kill -USR1 "$cpid"
  wait "$cpid" || { cat "$out" "$TMP/idle.err" >&2; die "idle_sessions via $p failed"; }
  local keep=() q
  for q in "${PIDS[@]}"; do [[ $q == "$cpid" ]] || keep+=("$q"); done
  PIDS=("${keep[@]}")
  ok=$(json_num ok "$out")
  alive=$(json_num alive "$out")
  log "  $(head -1 "$out"); alive at the end: $alive; RSS $rss0 -> $rss1 KiB; member connected_clients $m0 -> $m1"
  add "$p.$kind.ok" "$ok"
  add "$p.$kind.alive" "$alive"
  add "$p.$kind.members" "$((m1 - m0))"
  add "$p.$kind.rss0" "$rss0"
  add "$p.$kind.rss1" "$rss1"
  # Per session held when RSS was read: the member-side count then (a session
  # can pass its PING and be closed by the proxy before the reading).
  ((m1 - m0 > 0)) && add "$p.$kind.per" "$(awk -v a="$rss0" -v b="$rss1" -v k="$((m1 - m0))" 'BEGIN {printf "%.2f", (b - a) / k}')"
  IDLE_NOTES+="- $p, $n sessions: $limit; client: $(head -1 "$out" | grep -o '"errors":.*' | sed 's/}$//')"$'\n'
  stop_pid "$ppid"
}
if section idle; then
  # Each process gets the hard limit (the proxy needs 2 fds per session, the
  # client and the primary 1). The portal raises its own; HAProxy sizes its
  # maxconn from it; redis-server clamps maxclients to it.
  ulimit -Sn "$(ulimit -Hn)"
  log "idle sessions: starting redis primary (maxclients 20000) + replica"
  start_redis_pair idle --maxclients 20000
  for kind in idle many; do
    n=$IDLE_N
    [[ $kind == many ]] && n=$MANY_N
    for p in haproxy portal; do
      has "$p" || continue
      log "idle sessions: $n via $p"
      idle_run "$p" "$kind" "$n"
    done
  done
  stop_redis_pair
fi

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
row() { # label direct redis-tls haproxy portal better
  rows+=("| $1 | $(fmt "$2") | $(fmt "$3") | $(fmt "$4") | $(fmt "$5") | $(ratio "$5" "$4") | $(ratio "$5" "$3") | $6 |")
}
vals() { # metric suffix -> the four columns' medians
  local t
  for t in direct redis-tls haproxy portal; do val "$t.$1"; done
}
for op in GET SET; do
  mapfile -t v < <(vals "$op.rps")
  row "$op ops/s" "${v[@]}" "higher"
  mapfile -t v < <(vals "$op.p50")
  row "$op p50 ms" "${v[@]}" "lower"
  mapfile -t v < <(vals "$op.p99")
  row "$op p99 ms" "${v[@]}" "lower"
done
mapfile -t v < <(vals PING_INLINE.rps)
row "new-conn ops/s (-k 0)" "${v[@]}" "higher"
mapfile -t v < <(vals PING_INLINE.p99)
row "new-conn p99 ms" "${v[@]}" "lower"
row "proxy CPU s / 100k req, GET+SET keepalive" "—" "—" "$(cpu_per_100k haproxy getset $((2 * N)))" "$(cpu_per_100k portal getset $((2 * N)))" "lower"
row "proxy CPU s / 100k req, new conn" "—" "—" "$(cpu_per_100k haproxy newconn "$N_NEWCONN")" "$(cpu_per_100k portal newconn "$N_NEWCONN")" "lower"
for opt in $OP_TIMEOUTS; do
  for m in window lag; do
    case $m in
      window) label="failover window ms" ;;
      lag) label="endpoint lag after promotion ms" ;;
    esac
    h=$(val "haproxy.$m.$opt") q=$(val "portal.$m.$opt")
    rows+=("| $label, client timeout $opt ms: median (min–max) | — | — | $(fmt "$h") ($(spread "haproxy.$m.$opt")) | $(fmt "$q") ($(spread "portal.$m.$opt")) | $(ratio "$q" "$h") | — | lower |")
  done
done
held() { # proxy kind -> "held/n, member-side, alive after idle"
  [[ -n ${R[$1.$2.ok]:-} ]] || { echo "—"; return; }
  echo "$(val "$1.$2.ok")/$3 held, $(val "$1.$2.members") at member, $(val "$1.$2.alive") alive"
}
mib() { [[ $1 == "—" ]] && { echo "—"; return; }; awk -v k="$1" 'BEGIN {printf "%.1f", k / 1024}'; }
for kind in idle many; do
  n=$IDLE_N
  [[ $kind == many ]] && n=$MANY_N
  rows+=("| $n idle TLS sessions: held (handshake + PING) / member-side connections / alive after ${IDLE_SETTLE} s idle | — | — | $(held haproxy "$kind" "$n") | $(held portal "$kind" "$n") | | | higher |")
  if [[ $kind == many ]]; then
    h0=$(mib "$(val haproxy.$kind.rss0)") h1=$(val haproxy.$kind.rss1) q0=$(mib "$(val portal.$kind.rss0)") q1=$(val portal.$kind.rss1)
    rows+=("| $n idle TLS sessions: proxy RSS MiB, before → with sessions | — | — | $h0 → $(mib "$h1") | $q0 → $(mib "$q1") | $(ratio "$q1" "$h1") | — | lower |")
  fi
  row "$n idle TLS sessions: RSS growth KiB / session" "—" "—" "$(val haproxy.$kind.per)" "$(val portal.$kind.per)" "lower"
done

rows+=("| leader check (not a measurement) | — | — | tcp-check role:master, $HAPROXY_CHECK | probe INFO replication, interval $PROBE_INTERVAL, fast_interval $FAST_INTERVAL, rise 2, fall 2 | | | |")

TABLE=$(
  echo "## Results"
  echo
  echo "| metric | direct | redis-tls | haproxy | portal | portal/haproxy | portal/redis-tls | better |"
  echo "|---|---:|---:|---:|---:|---:|---:|---|"
  printf '%s\n' "${rows[@]}"
  echo
  echo "portal/haproxy, portal/redis-tls: for ops/s higher is better; for latency, CPU, failover window and lag, RSS lower is better."
  echo "CPU used by other processes during the measurements: $FOREIGN of the machine (0% = quiet machine); load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "direct = plaintext to the primary (no TLS, no proxy); redis-tls = TLS to the primary's own TLS port (no proxy); haproxy and portal = TLS through the proxy."
  if [[ -n $IDLE_NOTES ]]; then
    echo "Idle sessions: RSS = VmRSS of the proxy's processes before the client connects and after the sessions sat idle ${IDLE_SETTLE} s; growth per session = difference / member-side connections at that moment. Session limits and client-side failures:"
    printf '%s' "$IDLE_NOTES"
  fi
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
  for p in haproxy portal; do
    for kind in idle many; do
      echo "- $p $kind sessions: held $(samples "$p.$kind.ok"), member-side $(samples "$p.$kind.members"), alive $(samples "$p.$kind.alive"), RSS KiB $(samples "$p.$kind.rss0") → $(samples "$p.$kind.rss1")"
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
