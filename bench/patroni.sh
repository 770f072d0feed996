#!/usr/bin/env bash
# Benchmark: write unavailability during a Patroni switchover, through HAProxy
# configured as Patroni's documentation recommends (REST check OPTIONS
# /primary) versus through the portal (etcd DCS source + native probe).
#
#   bash bench/patroni.sh        (also: bash bench/run.sh patroni)
#
# 3 etcd members + 2 PostgreSQL 15 members under Patroni, both proxies in
# front at once; SWITCHOVERS switchovers alternating direction, each measured
# through both proxies by bench/patroni_switchover_window.rs. Prints the setup
# and one table on stdout and writes both to bench/out/patroni.md (raw JSON
# lines and logs in bench/out/raw/patroni-*). Progress goes to stderr.
#
# Knobs (environment):
#   SWITCHOVERS=6   number of switchovers (alternating pg0->pg1, pg1->pg0)
#   SETTLE_S=3      pause after both proxies are ready again, before the next one
#   NBTHREAD=2      HAProxy threads
#   PORTAL_LOG=info RUST_LOG of the portal (its log is kept in raw/)
#   SKIP_BUILD=1    use the existing target/release binaries
#   OUT=bench/out
set -Eeuo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH=$ROOT/bench
OUT=${OUT:-$BENCH/out}
SWITCHOVERS=${SWITCHOVERS:-6}
SETTLE_S=${SETTLE_S:-3}
NBTHREAD=${NBTHREAD:-2}
PORTAL_LOG=${PORTAL_LOG:-info}
SKIP_BUILD=${SKIP_BUILD:-0}
PORTAL_BIN=$ROOT/target/release/portal
SW_BIN=$ROOT/target/release/examples/patroni_switchover_window
PGBIN=/usr/lib/postgresql/15/bin
PATRONI=/usr/bin/patroni
PATRONICTL=/usr/bin/patronictl
ETCD=/usr/bin/etcd

KEEP_LOGS="haproxy-*.log portal-*.log patroni-*.log etcd-*.log"
# shellcheck source=bench/lib.sh
source "$BENCH/lib.sh"

for b in "$PATRONI" "$PATRONICTL" "$ETCD" "$PGBIN/postgres" "$(command -v haproxy)" "$(command -v curl)"; do
  [[ -x $b ]] || die "$b is required (apt-get install patroni etcd-server postgresql-15 haproxy curl)"
done
if [[ $(id -u) == 0 ]]; then
  AS_PG=(setpriv --reuid=postgres --regid=postgres --init-groups --)
else
  AS_PG=()
fi
chmod 711 "$TMP"
for v in $(compgen -e | grep -E '^(PG|ETCD)' || true); do unset "$v"; done
export BENCH_PG_PASSWORD=bench-su-$RANDOM$RANDOM
REPL_PASSWORD=bench-repl-$RANDOM$RANDOM

cd "$ROOT"
if [[ $SKIP_BUILD != 1 ]]; then
  log "cargo build --release --bin portal --example patroni_switchover_window"
  cargo build --release --bin portal --example patroni_switchover_window >&2
fi
[[ -x $PORTAL_BIN && -x $SW_BIN ]] || die "build the portal and the example first"
mkdir -p "$OUT/raw"
rm -f "$OUT"/raw/patroni-*

# ---------------------------------------------------------------- certs
mkdir -p "$TMP/certs"
"$PORTAL_BIN" certs init --dir "$TMP/certs" --host localhost --host 127.0.0.1 >"$TMP/certs.log" 2>&1 \
  || { cat "$TMP/certs.log" >&2; die "portal certs init failed"; }
CA=$TMP/certs/ca.crt
mkdir -p "$TMP/pgcerts"
cp "$TMP/certs/server.crt" "$TMP/certs/server.key" "$TMP/pgcerts/"
chmod 600 "$TMP/pgcerts/server.key"
[[ ${#AS_PG[@]} -eq 0 ]] || chown -R postgres:postgres "$TMP/pgcerts"

# ---------------------------------------------------------------- etcd
ETCD_CLIENTS=() ETCD_ENDPOINTS=()
declare -a EPEER
for i in 0 1 2; do
  pick_port NEWPORT1
  pick_port NEWPORT2
  ETCD_CLIENTS+=("$NEWPORT1")
  ETCD_ENDPOINTS+=("127.0.0.1:$NEWPORT1")
  EPEER[i]=$NEWPORT2
done
initial=""
for i in 0 1 2; do initial+="${initial:+,}etcd$i=http://127.0.0.1:${EPEER[i]}"; done
for i in 0 1 2; do
  "$ETCD" --name "etcd$i" --data-dir "$TMP/etcd$i" \
    --listen-client-urls "http://127.0.0.1:${ETCD_CLIENTS[i]}" --advertise-client-urls "http://127.0.0.1:${ETCD_CLIENTS[i]}" \
    --listen-peer-urls "http://127.0.0.1:${EPEER[i]}" --initial-advertise-peer-urls "http://127.0.0.1:${EPEER[i]}" \
    --initial-cluster "$initial" --initial-cluster-token "bench-$$" --initial-cluster-state new \
    --heartbeat-interval 50 --election-timeout 500 --snapshot-count 10000 --quota-backend-bytes 104857600 \
    --logger zap --log-outputs stderr >"$TMP/etcd-$i.log" 2>&1 &
  PIDS+=("$!")
  disown "$!"
done
ETCDCTL_API=3 wait_until 30 "etcd cluster healthy" \
  timeout 5 etcdctl --endpoints="$(IFS=,; echo "${ETCD_ENDPOINTS[*]}")" endpoint health
log "etcd up: ${ETCD_ENDPOINTS[*]}"

# ---------------------------------------------------------------- patroni
SCOPE=bench$$
PDIR=$TMP/patroni
mkdir -p "$PDIR"
NAMES=(pg0 pg1)
declare -a PGPORT APIPORT
for i in 0 1; do
  pick_port NEWPORT1
  pick_port NEWPORT2
  PGPORT[i]=$NEWPORT1
  APIPORT[i]=$NEWPORT2
  cat >"$PDIR/${NAMES[i]}.yml" <<EOF
scope: $SCOPE
namespace: /service
name: ${NAMES[i]}
log:
  level: INFO
restapi:
  listen: 127.0.0.1:${APIPORT[i]}
  connect_address: 127.0.0.1:${APIPORT[i]}
etcd3:
  hosts: $(IFS=,; echo "${ETCD_ENDPOINTS[*]}")
bootstrap:
  dcs:
    ttl: 10
    loop_wait: 1
    retry_timeout: 5
    maximum_lag_on_failover: 104857600
    postgresql:
      use_pg_rewind: true
      parameters:
        wal_level: replica
        hot_standby: 'on'
        max_wal_senders: 8
        max_replication_slots: 8
        wal_keep_size: 128MB
        wal_log_hints: 'on'
  initdb:
  - encoding: UTF8
  - no-sync
  pg_hba:
  - local all all trust
  - host all all 127.0.0.1/32 md5
  - host replication replicator 127.0.0.1/32 md5
postgresql:
  listen: 127.0.0.1:${PGPORT[i]}
  connect_address: 127.0.0.1:${PGPORT[i]}
  data_dir: $PDIR/${NAMES[i]}-data
  bin_dir: $PGBIN
  pgpass: $PDIR/${NAMES[i]}.pgpass
  authentication:
    superuser:
      username: postgres
      password: $BENCH_PG_PASSWORD
    replication:
      username: replicator
      password: $REPL_PASSWORD
    rewind:
      username: postgres
      password: $BENCH_PG_PASSWORD
  parameters:
    unix_socket_directories: '$PDIR'
    shared_buffers: 32MB
    max_connections: 100
    fsync: 'off'
    synchronous_commit: 'off'
    ssl: 'on'
    ssl_cert_file: '$TMP/pgcerts/server.crt'
    ssl_key_file: '$TMP/pgcerts/server.key'
    log_min_messages: warning
EOF
done
[[ ${#AS_PG[@]} -eq 0 ]] || chown -R postgres:postgres "$PDIR"
# shellcheck disable=SC2016 # evaluated at exit: stop every postmaster below PDIR
AT_EXIT+=('for i in 0 1; do [[ -f $PDIR/${NAMES[i]}-data/postmaster.pid ]] && (cd "$TMP" && "${AS_PG[@]}" "$PGBIN/pg_ctl" stop -m immediate -w -t 20 -D "$PDIR/${NAMES[i]}-data"); done')
start_patroni() { # index
  (cd "$PDIR" && exec "${AS_PG[@]}" "$PATRONI" "$PDIR/${NAMES[$1]}.yml") </dev/null >"$TMP/patroni-${NAMES[$1]}.log" 2>&1 &
  PIDS+=("$!")
  disown "$!"
}
rest() { curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://127.0.0.1:${APIPORT[$1]}$2" || true; }
is_primary() { [[ $(rest "$1" /primary) == 200 ]]; }
is_replica() { [[ $(rest "$1" /replica) == 200 ]]; }
# Member $1 answers /replica and the other member (the leader) lists its WAL
# receiver as streaming in GET /patroni. /replica alone answers 200 before
# streaming starts, and a switchover then would lose recent writes.
replica_streaming() {
  is_replica "$1" && curl -s --max-time 2 "http://127.0.0.1:${APIPORT[1 - $1]}/patroni" | python3 -c '
import json, sys
replication = json.load(sys.stdin).get("replication") or []
sys.exit(not any(r.get("application_name") == sys.argv[1] and r.get("state") == "streaming"
                 for r in replication))' "${NAMES[$1]}"
}
start_patroni 0
wait_until 90 "pg0 leading" is_primary 0
start_patroni 1
wait_until 90 "pg1 replicating" replica_streaming 1
PCTL=("$PATRONICTL" -c "$PDIR/pg0.yml")
log "patroni up: pg0 ${PGPORT[0]} (api ${APIPORT[0]}), pg1 ${PGPORT[1]} (api ${APIPORT[1]})"

# ---------------------------------------------------------------- HAProxy (Patroni's recommended config)
pick_port HAPROXY_PORT
pick_port HAPROXY_STATS
cat >"$TMP/haproxy.cfg" <<EOF
global
    maxconn 1000
    nbthread $NBTHREAD

defaults
    mode tcp
    log global
    retries 2
    timeout client 30m
    timeout connect 4s
    timeout server 30m
    timeout check 5s

listen stats
    mode http
    bind 127.0.0.1:$HAPROXY_STATS
    stats enable
    stats uri /stats

listen primary
    bind 127.0.0.1:$HAPROXY_PORT
    option httpchk OPTIONS /primary
    http-check expect status 200
    default-server inter 3s fall 3 rise 2 on-marked-down shutdown-sessions
    server pg0 127.0.0.1:${PGPORT[0]} maxconn 100 check port ${APIPORT[0]}
    server pg1 127.0.0.1:${PGPORT[1]} maxconn 100 check port ${APIPORT[1]}
EOF
haproxy -c -q -f "$TMP/haproxy.cfg" >"$TMP/haproxy.check" 2>&1 || { cat "$TMP/haproxy.check" >&2; die "bad haproxy config"; }
haproxy -db -f "$TMP/haproxy.cfg" >"$TMP/haproxy-patroni.log" 2>&1 &
PIDS+=("$!")
disown "$!"
haproxy_ready() { # leader-index: that server UP, the other DOWN
  local csv
  csv=$(curl -sf --max-time 2 "http://127.0.0.1:$HAPROXY_STATS/stats;csv") || return 1
  awk -F, -v up="${NAMES[$1]}" '$1=="primary" && $2==up && $18=="UP" {a=1} $1=="primary" && $2!=up && $2 ~ /^pg/ && $18=="DOWN" {b=1} END {exit !(a && b)}' <<<"$csv"
}

# ---------------------------------------------------------------- portal (DCS source + native probe)
pick_port PORTAL_PORT
pick_port PORTAL_ADMIN
endpoints=$(printf '"%s", ' "${ETCD_ENDPOINTS[@]}")
cat >"$TMP/portal.yaml" <<EOF
admin:
  listen: 127.0.0.1:$PORTAL_ADMIN
shutdown:
  drain_timeout: 1s
clusters:
  - name: pg
    protocol: postgres
    dcs:
      etcd:
        endpoints: [${endpoints%, }]
        prefix: /service
        scope: $SCOPE
    probe:
      username: postgres
      password_env: BENCH_PG_PASSWORD
    # No members: they are learned from Patroni's member keys (conn_url).
    endpoints:
      - name: rw
        listen: 127.0.0.1:$PORTAL_PORT
        route: leader
        tls:
          cert: $TMP/certs/server.crt
          key: $TMP/certs/server.key
EOF
"$PORTAL_BIN" check -c "$TMP/portal.yaml" >"$TMP/portal.check" 2>&1 || { cat "$TMP/portal.check" >&2; die "portal check failed"; }
RUST_LOG=$PORTAL_LOG "$PORTAL_BIN" run -c "$TMP/portal.yaml" >"$TMP/portal-patroni.log" 2>&1 &
PIDS+=("$!")
disown "$!"
portal_ready() { # leader-index: that member leads, the other is an up replica
  local js b
  js=$(curl -sf --max-time 2 "http://127.0.0.1:$PORTAL_ADMIN/status" | tr -d ' \n') || return 1
  [[ $js == *"\"leader\":\"${NAMES[$1]}\""* ]] || return 1
  b=$(grep -o "{[^{}]*\"name\":\"${NAMES[1 - $1]}\"[^{}]*}" <<<"$js") || return 1
  [[ $b == *'"health":"up"'* && $b == *'"role":"replica"'* ]]
}
ready() { is_primary "$1" && replica_streaming "$((1 - $1))" && haproxy_ready "$1" && portal_ready "$1"; }
wait_until 60 "haproxy and portal routing to pg0" ready 0
log "proxies ready: haproxy $HAPROXY_PORT, portal $PORTAL_PORT"

# ---------------------------------------------------------------- setup text
git_rev=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo "no commit")
git_dirty=$(git -C "$ROOT" status --porcelain 2>/dev/null | wc -l)
SETUP=$(
  cat <<EOF
## Setup (Patroni switchover)

- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')
- machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')), $(awk '/MemTotal/ {printf "%.1f GiB RAM", $2/1048576}' /proc/meminfo), kernel $(uname -r); load average at start: $(cut -d' ' -f1-3 /proc/loadavg)
- $("$PGBIN/postgres" --version), patroni $("$PATRONI" --version 2>/dev/null | awk '{print $2}'), etcd $("$ETCD" --version | awk '/etcd Version/ {print $3}'), $(haproxy -v | head -1 | cut -d' ' -f1-3)
- portal: git $git_rev ($git_dirty uncommitted paths), cargo build --release
- 3 etcd members (--heartbeat-interval 50 --election-timeout 500), 2 Patroni members (ttl 10, loop_wait 1, retry_timeout 5), PostgreSQL ssl on (fsync off, synchronous_commit off); all on 127.0.0.1
- HAProxy (Patroni docs): mode tcp (PostgreSQL's TLS passed through), \`option httpchk OPTIONS /primary\`, \`http-check expect status 200\`, \`default-server inter 3s fall 3 rise 2 on-marked-down shutdown-sessions\`, \`check port\` = each member's REST port, timeout connect 4s, timeout check 5s, nbthread $NBTHREAD
- portal: route leader, TLS terminated, DCS source \`dcs: { etcd: { endpoints: [3 members], prefix: /service, scope } }\` with no \`members:\` (learned from Patroni's member keys), native PostgreSQL probe (username postgres + password, default interval 1s / fast_interval 50ms / timeout 500ms / rise 2 / fall 2), on_leader_change close, hold_timeout default, RUST_LOG=$PORTAL_LOG
- measured by bench/patroni_switchover_window.rs: one TLS writer per proxy at once (tokio-postgres + rustls, verify chain and name; 5 ms backoff after an error; 5 s per-operation timeout), a direct plaintext writer polling the candidate every 1 ms from T0; T0 = start of \`patronictl switchover --leader A --candidate B --force\`; $SWITCHOVERS switchovers alternating direction, next one after both proxies route to the new leader, the old one streams again, and ${SETTLE_S}s
EOF
)
printf '%s\n\n' "$SETUP"

# ---------------------------------------------------------------- switchovers
declare -A R
add() { R[$1]+="$2"$'\n'; }
leader=0
for ((n = 1; n <= SWITCHOVERS; n++)); do
  cand=$((1 - leader))
  log "switchover $n/$SWITCHOVERS: ${NAMES[leader]} -> ${NAMES[cand]}"
  json=$OUT/raw/patroni-switchover-$n.json
  cmd="$(printf '%q ' "${PCTL[@]}") switchover --leader ${NAMES[leader]} --candidate ${NAMES[cand]} --force"
  timeout 300 "$SW_BIN" --proxy "haproxy=127.0.0.1:$HAPROXY_PORT" --proxy "portal=127.0.0.1:$PORTAL_PORT" \
    --ca "$CA" --sni localhost --candidate "127.0.0.1:${PGPORT[cand]}" --command "$cmd" --table "sw$n" \
    >"$json" 2>"$TMP/sw.err" || { cat "$json" "$TMP/sw.err" >&2; die "switchover $n measurement failed"; }
  log "  $(cat "$json")"
  for p in haproxy portal; do
    for m in window_ms endpoint_lag_ms; do
      add "$p.$m" "$(grep -o "\"$p\":{[^}]*}" "$json" | grep -o "\"$m\":[0-9.]*" | cut -d: -f2)"
    done
  done
  add promoted_ms "$(grep -o '"promoted_ms":[0-9.]*' "$json" | cut -d: -f2)"
  add command_ms "$(grep -o '"command_ms":[0-9.]*' "$json" | cut -d: -f2)"
  leader=$cand
  wait_until 90 "haproxy and portal routing to ${NAMES[leader]}, ${NAMES[1 - leader]} streaming" ready "$leader"
  sleep "$SETTLE_S"
done

# ---------------------------------------------------------------- table
val() { printf '%s' "${R[$1]}" | median; }
spread() { printf '%s' "${R[$1]}" | minmax; }
samples() { printf '%s' "${R[$1]}" | paste -sd' '; }
TABLE=$(
  echo "## Results (Patroni switchover, $SWITCHOVERS switchovers, both proxies measured in each)"
  echo
  echo "| metric, ms | haproxy (Patroni docs config): median (min–max) | portal (DCS + native probe): median (min–max) | portal/haproxy |"
  echo "|---|---:|---:|---:|"
  echo "| (a) write unavailability: switchover start → first write through the proxy on the new primary | $(fmt "$(val haproxy.window_ms)") ($(spread haproxy.window_ms)) | $(fmt "$(val portal.window_ms)") ($(spread portal.window_ms)) | $(ratio "$(val portal.window_ms)" "$(val haproxy.window_ms)") |"
  echo "| (b) endpoint lag after promotion: new primary accepts a direct write → first write through the proxy on it | $(fmt "$(val haproxy.endpoint_lag_ms)") ($(spread haproxy.endpoint_lag_ms)) | $(fmt "$(val portal.endpoint_lag_ms)") ($(spread portal.endpoint_lag_ms)) | $(ratio "$(val portal.endpoint_lag_ms)" "$(val haproxy.endpoint_lag_ms)") |"
  echo
  echo "- switchover start → candidate accepts a direct write (promoted_ms): $(fmt "$(val promoted_ms)") ($(spread promoted_ms)); patronictl run time: $(fmt "$(val command_ms)") ($(spread command_ms))"
  echo "- samples (run order): haproxy window $(samples haproxy.window_ms); portal window $(samples portal.window_ms); haproxy lag $(samples haproxy.endpoint_lag_ms); portal lag $(samples portal.endpoint_lag_ms); promoted $(samples promoted_ms)"
  echo "- load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
)
printf '%s\n' "$TABLE"
printf '# Patroni switchover benchmark\n\n%s\n\n%s\n' "$SETUP" "$TABLE" >"$OUT/patroni.md"
log "wrote $OUT/patroni.md"
