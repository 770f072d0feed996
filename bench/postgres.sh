#!/usr/bin/env bash
# Benchmark: PostgreSQL direct (its own TLS) vs HAProxy (TCP pass-through,
# PostgreSQL's TLS) vs portal (terminating TLS) on one machine.
#
#   bash bench/postgres.sh        (also run by `bash bench/run.sh` and `bash bench/run.sh postgres`)
#
# Prints the setup and one results table on stdout and writes both to
# bench/out/postgres.md (raw outputs in bench/out/raw/pg-*). Progress goes to
# stderr. See bench/README.md for the methodology.
#
# Knobs (environment):
#   PG_DURATION=20  seconds per pgbench run (-T)
#   PG_CLIENTS=16   pgbench clients (-c); PG_THREADS=2 (-j)
#   PG_SCALE=16     pgbench -i scale factor (16 branches: one per client)
#   PG_ROUNDS=1     interleaved rounds of the pgbench runs (median reported)
#   PG_REPEATS=5    failover repetitions per proxy and client profile
#   OP_TIMEOUTS="5000 250"  failover client profiles: per-operation timeout in ms
#   HAPROXY_CHECK="inter 1s fall 2 rise 2"  HAProxy server check timing
#   NBTHREAD=2      HAProxy threads (the portal's tokio runtime uses one worker per core)
#   PROXIES="haproxy portal"  subset of proxies to run
#   SECTIONS="throughput failover"  subset of the measurements to run
#   SKIP_BUILD=1    use the existing target/release binaries
#   OUT=bench/out   where postgres.md and raw/ go
set -Eeuo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH=$ROOT/bench
OUT=${OUT:-$BENCH/out}
PG_DURATION=${PG_DURATION:-20}
PG_CLIENTS=${PG_CLIENTS:-16}
PG_THREADS=${PG_THREADS:-2}
PG_SCALE=${PG_SCALE:-16}
PG_ROUNDS=${PG_ROUNDS:-1}
PG_REPEATS=${PG_REPEATS:-5}
OP_TIMEOUTS=${OP_TIMEOUTS:-"5000 250"}
NBTHREAD=${NBTHREAD:-2}
HAPROXY_CHECK=${HAPROXY_CHECK:-"inter 1s fall 2 rise 2"}
PROXIES=${PROXIES:-"haproxy portal"}
SECTIONS=${SECTIONS:-"throughput failover"}
SKIP_BUILD=${SKIP_BUILD:-0}
PORTAL_BIN=$ROOT/target/release/portal
FW_BIN=${PG_FW_BIN:-$ROOT/target/release/examples/pg_failover_window}
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}

has() { [[ " $PROXIES " == *" $1 "* ]]; }
section() { [[ " $SECTIONS " == *" $1 "* ]]; }

KEEP_LOGS="haproxy-*.log portal-*.log pg-*.log"
# log, die, TMP, PIDS, AT_EXIT, cleanup traps, pick_port, wait_until, cpu_ticks, median, ...
# shellcheck source=bench/lib.sh
source "$BENCH/lib.sh"

# ---------------------------------------------------------------- PostgreSQL
# PostgreSQL refuses to run as root: as root, its server binaries run as the
# `postgres` user (as tests/common/pg.rs does), in directories it owns.
if [[ $(id -u) == 0 ]]; then
  id -u postgres >/dev/null 2>&1 || die "running as root needs a postgres user (apt-get install postgresql)"
  AS_PG=(setpriv --reuid=postgres --regid=postgres --init-groups --)
else
  AS_PG=()
fi
chmod 711 "$TMP" # the postgres user must reach its directories below TMP
# Nothing from the caller's libpq environment (PGHOST, PGSSLMODE, ...; this script's knobs are PG_*).
for v in $(compgen -e | grep '^PG' | grep -v '^PG_' || true); do unset "$v"; done
pg() { # binary args...: a PostgreSQL server binary, as the server user
  local b=$1
  shift
  (cd "$TMP" && "${AS_PG[@]}" "$PGBIN/$b" "$@")
}
PG_DIRS=() # every server directory started (stopped -m immediate on exit)
# shellcheck disable=SC2016 # evaluated at exit
AT_EXIT+=('for d in "${PG_DIRS[@]}"; do pg pg_ctl stop -m immediate -w -t 20 -D "$d/data"; done')

psql_at() { # port sql: one statement, plaintext, output trimmed
  timeout 20 "$PGBIN/psql" -X -w -At -h 127.0.0.1 -p "$1" -U postgres -d postgres -v ON_ERROR_STOP=1 -c "$2" 2>/dev/null
}

# A stopped, initialised cluster that every primary is copied from:
# TLS with the bench certificate, replication allowed, trust on loopback.
make_template() {
  local d=$TMP/pg-template
  mkdir -p "$d"
  [[ ${#AS_PG[@]} -eq 0 ]] || chown postgres:postgres "$d"
  pg initdb -D "$d/data" -U postgres --auth=trust -E UTF8 --no-locale --no-sync --no-instructions >"$TMP/initdb.out" 2>&1 \
    || { cat "$TMP/initdb.out" >&2; die "initdb failed"; }
  cp "$TMP/certs/server.crt" "$TMP/certs/server.key" "$d/data/"
  chmod 600 "$d/data/server.key"
  [[ ${#AS_PG[@]} -eq 0 ]] || chown postgres:postgres "$d/data/server.crt" "$d/data/server.key"
  cat >"$d/data/pg_hba.conf" <<'EOF'
local all         all          trust
host  all         all          127.0.0.1/32 trust
local replication all          trust
host  replication all          127.0.0.1/32 trust
EOF
  cat >>"$d/data/postgresql.conf" <<'EOF'

# portal bench
listen_addresses = '127.0.0.1'
max_connections = 100
shared_buffers = 128MB
wal_level = replica
max_wal_senders = 8
wal_keep_size = '256MB'
hot_standby = on
wal_receiver_status_interval = 1s
fsync = off
synchronous_commit = off
full_page_writes = off
ssl = on
ssl_cert_file = 'server.crt'
ssl_key_file = 'server.key'
ssl_min_protocol_version = 'TLSv1.2'
EOF
}

pg_set_port() { # dir port
  printf "\nport = %s\nunix_socket_directories = '%s'\n" "$2" "$1" | "${AS_PG[@]}" tee -a "$1/data/postgresql.conf" >/dev/null
}
pg_start() { # dir
  pg pg_ctl start -w -t 60 -D "$1/data" -l "$1/server.log" >/dev/null || { tail -20 "$1/server.log" >&2; die "pg_ctl start $1 failed"; }
  PG_DIRS+=("$1")
}
pg_stop() { # dir
  pg pg_ctl stop -m immediate -w -t 60 -D "$1/data" >/dev/null 2>&1 || true
  local keep=() d
  for d in "${PG_DIRS[@]}"; do [[ $d == "$1" ]] || keep+=("$d"); done
  PG_DIRS=("${keep[@]}")
  cp "$1/server.log" "$TMP/pg-$(basename "$1").log" 2>/dev/null || true
  rm -rf "$1"
}
postmaster_pid() { head -1 "$1/data/postmaster.pid"; }

# Primary (copy of the template) + streaming standby (pg_basebackup -R).
# Sets PRIMARY_DIR PRIMARY_PORT STANDBY_DIR STANDBY_PORT.
start_pg_pair() {
  PRIMARY_DIR=$TMP/pg-$1-a STANDBY_DIR=$TMP/pg-$1-b
  pick_port PRIMARY_PORT
  pick_port STANDBY_PORT
  cp -a "$TMP/pg-template" "$PRIMARY_DIR"
  pg_set_port "$PRIMARY_DIR" "$PRIMARY_PORT"
  pg_start "$PRIMARY_DIR"
  mkdir -p "$STANDBY_DIR"
  [[ ${#AS_PG[@]} -eq 0 ]] || chown postgres:postgres "$STANDBY_DIR"
  PGCONNECT_TIMEOUT=10 pg pg_basebackup -D "$STANDBY_DIR/data" -h 127.0.0.1 -p "$PRIMARY_PORT" -U postgres -R -X stream -c fast -N \
    >"$TMP/basebackup.out" 2>&1 || { cat "$TMP/basebackup.out" >&2; die "pg_basebackup failed"; }
  pg_set_port "$STANDBY_DIR" "$STANDBY_PORT"
  pg_start "$STANDBY_DIR"
  wait_until 60 "standby streaming" \
    bash -c "[[ \$(timeout 20 $PGBIN/psql -X -w -At -h 127.0.0.1 -p $STANDBY_PORT -U postgres -d postgres -c \"select pg_is_in_recovery()::text || ' ' || coalesce((select status from pg_stat_wal_receiver), 'none')\") == 'true streaming' ]]"
}
stop_pg_pair() {
  pg_stop "$PRIMARY_DIR"
  pg_stop "$STANDBY_DIR"
}

# ---------------------------------------------------------------- proxies
# HAProxy. Sets HAPROXY_PORT HAPROXY_PID.
start_haproxy() {
  pick_port HAPROXY_PORT
  pick_port HAPROXY_STATS
  local cfg=$TMP/haproxy-pg-$1.cfg
  sed -e "s|@NBTHREAD@|$NBTHREAD|" -e "s|@LISTEN_PORT@|$HAPROXY_PORT|" -e "s|@CHECK@|$HAPROXY_CHECK|" \
    -e "s|@PRIMARY_PORT@|$PRIMARY_PORT|" -e "s|@STANDBY_PORT@|$STANDBY_PORT|" -e "s|@STATS_PORT@|$HAPROXY_STATS|" \
    "$BENCH/haproxy-pg.cfg.tmpl" >"$cfg"
  haproxy -c -q -f "$cfg" >"$TMP/haproxy-pg-$1.check" 2>&1 || { cat "$TMP/haproxy-pg-$1.check" >&2; die "bad haproxy config"; }
  haproxy -db -f "$cfg" >"$TMP/haproxy-pg-$1.log" 2>&1 &
  HAPROXY_PID=$!
  PIDS+=("$HAPROXY_PID")
  disown "$HAPROXY_PID"
  wait_until 20 "haproxy checks (pg-a UP, pg-b UP as backup)" haproxy_ready
}
haproxy_ready() {
  local csv
  csv=$(curl -sf "http://127.0.0.1:$HAPROXY_STATS/stats;csv") || return 1
  awk -F, '$1=="pg_primary" && $2=="pg-a" && $18=="UP" {a=1} $1=="pg_primary" && $2=="pg-b" && $18=="UP" {b=1} END {exit !(a && b)}' <<<"$csv"
}

# portal: default probe settings (those of config/example.yaml), tls: auto.
# Sets PORTAL_PORT PORTAL_PID PORTAL_ADMIN.
start_portal() {
  pick_port PORTAL_PORT
  pick_port PORTAL_ADMIN
  local cfg=$TMP/portal-pg-$1.yaml
  cat >"$cfg" <<EOF
admin:
  listen: 127.0.0.1:$PORTAL_ADMIN
certs_dir: $TMP/certs
shutdown:
  drain_timeout: 1s
clusters:
  - name: bench
    protocol: postgres
    probe:
      username: postgres
    members:
      - name: pg-a
        address: 127.0.0.1:$PRIMARY_PORT
      - name: pg-b
        address: 127.0.0.1:$STANDBY_PORT
    endpoints:
      - name: bench-rw
        listen: 127.0.0.1:$PORTAL_PORT
        route: leader
        tls: auto
EOF
  "$PORTAL_BIN" check -c "$cfg" >"$TMP/portal-pg-$1.check" 2>&1 || { cat "$TMP/portal-pg-$1.check" >&2; die "portal check failed"; }
  RUST_LOG=warn "$PORTAL_BIN" run -c "$cfg" >"$TMP/portal-pg-$1.log" 2>&1 &
  PORTAL_PID=$!
  PIDS+=("$PORTAL_PID")
  disown "$PORTAL_PID"
  wait_until 20 "portal status (leader pg-a, replica pg-b up)" portal_ready
}
portal_ready() {
  local js b
  js=$(curl -sf "http://127.0.0.1:$PORTAL_ADMIN/status" | tr -d ' \n') || return 1
  [[ $js == *'"leader":"pg-a"'* ]] || return 1
  b=$(grep -o '{[^{}]*"name":"pg-b"[^{}]*}' <<<"$js") || return 1
  [[ $b == *'"health":"up"'* && $b == *'"role":"replica"'* ]]
}

# ---------------------------------------------------------------- install, build
missing=()
for b in haproxy pgbench curl openssl ss pgrep setpriv; do command -v "$b" >/dev/null || missing+=("$b"); done
[[ -x $PGBIN/postgres ]] || missing+=(postgresql)
if ((${#missing[@]})); then
  log "installing (missing: ${missing[*]})"
  apt-get install -y postgresql postgresql-contrib haproxy >&2
fi
for b in haproxy pgbench curl openssl ss pgrep; do command -v "$b" >/dev/null || die "$b is required"; done

cd "$ROOT"
if [[ $SKIP_BUILD != 1 ]]; then
  log "cargo build --release --bin portal --example pg_failover_window"
  cargo build --release --bin portal --example pg_failover_window >&2
fi
[[ -x $FW_BIN ]] || die "$FW_BIN missing"
has portal && { [[ -x $PORTAL_BIN ]] || die "$PORTAL_BIN missing"; }

# ---------------------------------------------------------------- certs, template
mkdir -p "$TMP/certs" "$OUT/raw"
rm -f "$OUT"/raw/pg-*
"$PORTAL_BIN" certs init --dir "$TMP/certs" --host localhost --host 127.0.0.1 >"$TMP/certs.log" 2>&1 \
  || { cat "$TMP/certs.log" >&2; die "portal certs init failed"; }
CA=$TMP/certs/ca.crt
make_template

# libpq (pgbench, psql): TLS verified against the bench CA and the name
# localhost, at 127.0.0.1; no GSSAPI attempt; a connect timeout.
PGENV=(PGHOST=localhost PGHOSTADDR=127.0.0.1 PGUSER=postgres PGDATABASE=postgres
  PGSSLMODE=verify-full "PGSSLROOTCERT=$CA" PGGSSENCMODE=disable PGCONNECT_TIMEOUT=10)

# ---------------------------------------------------------------- setup
others=$(pgrep -l '^(pgbench|postgres|redis-server|redis-benchmar|haproxy|portal|cargo|rustc)$' 2>/dev/null | paste -sd',' || true)
git_rev=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo "no commit")
git_dirty=$(git -C "$ROOT" status --porcelain 2>/dev/null | wc -l)
SETUP=$(
  cat <<EOF
## Setup (PostgreSQL)

- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')
- machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')), $(awk '/MemTotal/ {printf "%.1f GiB RAM", $2/1048576}' /proc/meminfo), kernel $(uname -r)
- $("$PGBIN/postgres" --version), $(pgbench --version), $(haproxy -v | head -1 | cut -d' ' -f1-3), $(openssl version | cut -d' ' -f1-2)
- portal: git $git_rev ($git_dirty uncommitted paths), $("$PORTAL_BIN" --version 2>/dev/null || echo portal), cargo build --release
- load average at start: $(cut -d' ' -f1-3 /proc/loadavg); other pgbench/postgres/redis/haproxy/portal/cargo processes at start: ${others:-none}
- everything on 127.0.0.1, all processes share the $(nproc) cores; certificate: ECDSA P-256 from portal certs init, used by the portal and by both PostgreSQL servers; libpq clients use sslmode=verify-full sslrootcert=ca.crt host=localhost hostaddr=127.0.0.1
- PostgreSQL: primary + streaming standby (pg_basebackup -R), fsync off, synchronous_commit off, full_page_writes off, shared_buffers 128MB, ssl on
- pgbench: scale $PG_SCALE, \`-c $PG_CLIENTS -j $PG_THREADS -T $PG_DURATION\`: select-only (-S), TPC-B-like (default script), select-only with -C (new connection per transaction); $PG_ROUNDS interleaved round(s), median reported
- failover: bench/pg_failover_window.rs, $PG_REPEATS repetitions per proxy and client profile (per-operation timeout: $OP_TIMEOUTS ms), each on a fresh primary+standby and a fresh proxy, median (min–max)
- HAProxy: nbthread $NBTHREAD, mode tcp (TLS passed through to PostgreSQL), \`option pgsql-check user postgres\`, standby as \`backup\`, \`check $HAPROXY_CHECK on-marked-down shutdown-sessions\`, timeout check 500ms, timeout connect 1s, no logging
- portal: protocol postgres, route leader, tls auto, default probe (interval 1s, fast_interval 50ms, timeout 500ms, rise 2, fall 2; as config/example.yaml), on_leader_change close (default), plaintext to the members, RUST_LOG=warn
EOF
)
printf '%s\n\n' "$SETUP"

read -r BUSY0 TOTAL0 <<<"$(machine_ticks)"
OWN0=$(own_ticks)

declare -A R # R[target.metric]: newline-separated samples
add() { R[$1]+="$2"$'\n'; }
TLS_NOTE=""
targets=(direct)
has haproxy && targets+=(haproxy)
has portal && targets+=(portal)

# ---------------------------------------------------------------- throughput
if section throughput; then
  log "starting postgres primary+standby, proxies"
  start_pg_pair main
  log "pgbench -i -s $PG_SCALE"
  timeout 600 env "${PGENV[@]}" PGPORT="$PRIMARY_PORT" pgbench -i -q -s "$PG_SCALE" >"$OUT/raw/pg-init.txt" 2>&1 \
    || { cat "$OUT/raw/pg-init.txt" >&2; die "pgbench -i failed"; }
  has haproxy && start_haproxy main
  has portal && start_portal main

  negotiated() { # port: what an OpenSSL client negotiates after the SSLRequest
    timeout 20 openssl s_client -starttls postgres -connect "127.0.0.1:$1" -servername localhost -CAfile "$CA" \
      -verify_hostname localhost -verify_return_error -brief </dev/null 2>&1 \
      | awk -F': ' '/Protocol version/ {v=$2} /Ciphersuite/ {c=$2} /Verification/ {ok=$2} END {print v, c, "verification:", ok}'
  }
  target_port() {
    case $1 in
      direct) echo "$PRIMARY_PORT" ;;
      haproxy) echo "$HAPROXY_PORT" ;;
      portal) echo "$PORTAL_PORT" ;;
    esac
  }
  target_pid() {
    case $1 in
      haproxy) echo "$HAPROXY_PID" ;;
      portal) echo "$PORTAL_PID" ;;
      *) echo "" ;;
    esac
  }
  for t in "${targets[@]}"; do
    TLS_NOTE+="- $t TLS (openssl s_client -starttls postgres): $(negotiated "$(target_port "$t")")"$'\n'
  done
  printf '%s\n' "$TLS_NOTE"

  # CPU of the primary's postmaster and of its exited (reaped) children, i.e.
  # the backends of connections that have ended: utime+stime+cutime+cstime.
  # Long-lived auxiliary processes (checkpointer, WAL writer and sender) are
  # not in it until they exit.
  server_ticks() { sed 's/^.*) //' "/proc/$1/stat" | awk '{print $12 + $13 + $14 + $15}'; }

  run_pgb() { # target tag pgbench-args...: one timed pgbench run; adds tps, latency, CPU samples
    local t=$1 tag=$2 pid before after txt port spid sbefore
    shift 2
    port=$(target_port "$t")
    pid=$(target_pid "$t")
    txt=$OUT/raw/pg-$tag-$t-r$round.txt
    [[ -n $pid ]] && before=$(cpu_ticks "$pid")
    spid=$(postmaster_pid "$PRIMARY_DIR")
    sbefore=$(server_ticks "$spid")
    # timeout: a hung proxy must not hang the bench.
    timeout --foreground -k 5 $((PG_DURATION + 120)) env "${PGENV[@]}" PGPORT="$port" \
      pgbench -c "$PG_CLIENTS" -j "$PG_THREADS" -T "$PG_DURATION" "$@" >"$txt" 2>"$TMP/pgbench.err" \
      || { cat "$txt" "$TMP/pgbench.err" >&2; die "pgbench $tag via $t failed"; }
    if [[ -n $pid ]]; then
      after=$(cpu_ticks "$pid")
      add "$t.$tag.ticks" "$((after - before))"
    fi
    sleep 0.5 # the client's backends exit and are reaped by the postmaster
    add "$t.$tag.sticks" "$(($(server_ticks "$spid") - sbefore))"
    local tps lat n failed
    tps=$(awk '/^tps = / {print $3; exit}' "$txt")
    lat=$(awk '/^latency average = / {print $4; exit}' "$txt")
    n=$(awk -F': ' '/^number of transactions actually processed/ {print $2; exit}' "$txt" | cut -d/ -f1)
    failed=$(awk -F': ' '/^number of failed transactions/ {print $2; exit}' "$txt" | cut -d' ' -f1)
    [[ -n $tps && -n $lat && -n $n ]] || die "pgbench $tag via $t printed no results (see $txt)"
    [[ ${failed:-0} == 0 ]] || die "pgbench $tag via $t: $failed failed transactions (see $txt)"
    add "$t.$tag.tps" "$tps"
    add "$t.$tag.lat" "$lat"
    add "$t.$tag.n" "$n"
    log "  $t $tag: tps $tps, latency $lat ms, $n transactions"
  }

  for ((round = 1; round <= PG_ROUNDS; round++)); do
    for w in select tpcb select_c; do
      for t in "${targets[@]}"; do
        log "round $round/$PG_ROUNDS: pgbench $w via $t"
        case $w in
          select) run_pgb "$t" "$w" -S ;;
          tpcb) run_pgb "$t" "$w" ;;
          select_c) run_pgb "$t" "$w" -S -C ;;
        esac
      done
    done
  done

  has haproxy && stop_pid "$HAPROXY_PID"
  has portal && stop_pid "$PORTAL_PID"
  stop_pg_pair
fi

# ---------------------------------------------------------------- failover
section failover || PG_REPEATS=0
for ((rep = 1; rep <= PG_REPEATS; rep++)); do
  for opt in $OP_TIMEOUTS; do
    for p in haproxy portal; do
      has "$p" || continue
      log "failover $rep/$PG_REPEATS via $p, client op timeout ${opt} ms"
      start_pg_pair "fo-$p-$opt-$rep"
      if [[ $p == haproxy ]]; then
        start_haproxy "fo-$opt-$rep"
        port=$HAPROXY_PORT ppid=$HAPROXY_PID
      else
        start_portal "fo-$opt-$rep"
        port=$PORTAL_PORT ppid=$PORTAL_PID
      fi
      json=$OUT/raw/pg-failover-$p-op$opt-$rep.json
      as_pg=""
      ((${#AS_PG[@]})) && as_pg="${AS_PG[*]} "
      timeout -k 5 120 "$FW_BIN" --label "$p" --proxy "127.0.0.1:$port" --ca "$CA" --sni localhost \
        --primary-pid "$(postmaster_pid "$PRIMARY_DIR")" \
        --stop-command "cd $TMP && exec ${as_pg}$PGBIN/pg_ctl stop -m immediate -w -t 60 -D $PRIMARY_DIR/data" \
        --standby "127.0.0.1:$STANDBY_PORT" \
        --promote-command "cd $TMP && exec ${as_pg}$PGBIN/pg_ctl promote -W -D $STANDBY_DIR/data" \
        --op-timeout-ms "$opt" >"$json" 2>"$TMP/fw.err" \
        || { cat "$json" "$TMP/fw.err" >&2; die "pg_failover_window via $p failed"; }
      log "  $(cat "$json")"
      add "$p.window.$opt" "$(grep -o '"window_ms":[0-9.]*' "$json" | cut -d: -f2)"
      add "$p.lag.$opt" "$(grep -o '"endpoint_lag_ms":[0-9.]*' "$json" | cut -d: -f2)"
      add "$p.promote.$opt" "$(grep -o '"promote_ms":[0-9.]*' "$json" | cut -d: -f2)"
      stop_pid "$ppid"
      stop_pg_pair
    done
  done
done

# ---------------------------------------------------------------- table
sleep 0.2
read -r BUSY1 TOTAL1 <<<"$(machine_ticks)"
OWN1=$(own_ticks)
FOREIGN=$(awk -v b=$((BUSY1 - BUSY0)) -v t=$((TOTAL1 - TOTAL0)) -v o=$((OWN1 - OWN0)) \
  'BEGIN {f = b - o; if (f < 0) f = 0; printf "%.0f%%", (t > 0) ? 100 * f / t : 0}')
CLK_TCK=$(getconf CLK_TCK)
val() { [[ -n ${R[$1]:-} ]] || { echo "—"; return; }; printf '%s' "${R[$1]}" | median; }
spread() { [[ -n ${R[$1]:-} ]] || { echo "—"; return; }; printf '%s' "${R[$1]}" | minmax; }
cpu_per_100k() { # target tag [ticks|sticks|both]: CPU seconds per 100k transactions, over all rounds
  local kind=${3:-ticks}
  [[ -n ${R[$1.$2.n]:-} ]] || { echo "—"; return; }
  case $kind in
    ticks | sticks) [[ -n ${R[$1.$2.$kind]:-} ]] || { echo "—"; return; } ;;
    both) [[ -n ${R[$1.$2.ticks]:-} && -n ${R[$1.$2.sticks]:-} ]] || { echo "—"; return; } ;;
  esac
  local ticks
  if [[ $kind == both ]]; then
    ticks=$(paste <(printf '%s' "${R[$1.$2.ticks]}") <(printf '%s' "${R[$1.$2.sticks]}") | awk '{print $1 + $2}')
  else
    ticks=${R[$1.$2.$kind]}
  fi
  paste <(printf '%s' "$ticks") <(printf '%s' "${R[$1.$2.n]}") \
    | awk -v hz="$CLK_TCK" '{t += $1; n += $2} END {if (n > 0) printf "%.2f", t / hz / n * 100000; else print "—"}'
}

rows=()
row() { # label direct haproxy portal better
  rows+=("| $1 | $(fmt "$2") | $(fmt "$3") | $(fmt "$4") | $(ratio "$4" "$3") | $(ratio "$4" "$2") | $5 |")
}
for w in select tpcb select_c; do
  case $w in
    select) name="select-only (-S)" ;;
    tpcb) name="TPC-B-like" ;;
    select_c) name="select-only, new connection per tx (-S -C)" ;;
  esac
  row "$name tps" "$(val "direct.$w.tps")" "$(val "haproxy.$w.tps")" "$(val "portal.$w.tps")" higher
  row "$name latency avg ms" "$(val "direct.$w.lat")" "$(val "haproxy.$w.lat")" "$(val "portal.$w.lat")" lower
done
for w in select tpcb select_c; do
  row "proxy CPU s / 100k tx, $w" "—" "$(cpu_per_100k haproxy "$w")" "$(cpu_per_100k portal "$w")" lower
done
for w in select tpcb select_c; do
  row "PostgreSQL CPU s / 100k tx, $w" "$(cpu_per_100k direct "$w" sticks)" "$(cpu_per_100k haproxy "$w" sticks)" "$(cpu_per_100k portal "$w" sticks)" lower
done
for w in select tpcb select_c; do
  row "proxy + PostgreSQL CPU s / 100k tx, $w" "$(cpu_per_100k direct "$w" sticks)" "$(cpu_per_100k haproxy "$w" both)" "$(cpu_per_100k portal "$w" both)" lower
done
for opt in $OP_TIMEOUTS; do
  for m in window lag; do
    case $m in
      window) label="failover window ms" ;;
      lag) label="endpoint lag after promotion ms" ;;
    esac
    h=$(val "haproxy.$m.$opt") q=$(val "portal.$m.$opt")
    rows+=("| $label, client timeout $opt ms: median (min–max) | — | $(fmt "$h") ($(spread "haproxy.$m.$opt")) | $(fmt "$q") ($(spread "portal.$m.$opt")) | $(ratio "$q" "$h") | — | lower |")
  done
done
rows+=("| leader check (not a measurement) | — | pgsql-check (any server that accepts a login), standby as backup, $HAPROXY_CHECK | probe pg_is_in_recovery/timeline, interval 1s, fast_interval 50ms, rise 2, fall 2 | | | |")

TABLE=$(
  echo "## Results (PostgreSQL)"
  echo
  echo "| metric | direct | haproxy | portal | portal/haproxy | portal/direct | better |"
  echo "|---|---:|---:|---:|---:|---:|---|"
  printf '%s\n' "${rows[@]}"
  echo
  echo "direct = libpq TLS to PostgreSQL; haproxy = libpq TLS through HAProxy (TCP) to PostgreSQL; portal = libpq TLS to the portal, plaintext from the portal to PostgreSQL."
  echo "CPU used by other processes during the measurements: $FOREIGN of the machine (0% = quiet machine); load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
)
samples() { if [[ -n ${R[$1]:-} ]]; then printf '%s' "${R[$1]}" | paste -sd' '; else echo "—"; fi; }
SAMPLES=$(
  echo "## Samples behind the medians (run order)"
  echo
  for t in "${targets[@]}"; do
    for w in select tpcb select_c; do
      echo "- $t $w tps: $(samples "$t.$w.tps"); latency ms: $(samples "$t.$w.lat"); transactions: $(samples "$t.$w.n"); proxy CPU ticks ($CLK_TCK/s): $(samples "$t.$w.ticks"); PostgreSQL CPU ticks: $(samples "$t.$w.sticks")"
    done
  done
  for p in haproxy portal; do
    for opt in $OP_TIMEOUTS; do
      echo "- $p failover window ms, client timeout $opt ms: $(samples "$p.window.$opt"); endpoint lag ms: $(samples "$p.lag.$opt"); promotion took ms: $(samples "$p.promote.$opt")"
    done
  done
)
printf '%s\n' "$TABLE"
printf '# portal benchmark: PostgreSQL\n\n%s\n\n%s\n%s\n\n%s\n' "$SETUP" "$TLS_NOTE" "$TABLE" "$SAMPLES" >"$OUT/postgres.md"
log "wrote $OUT/postgres.md"
