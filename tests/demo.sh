#!/usr/bin/env bash
# The portal demo: two portals in front of a real Redis primary and replica,
# a failover, and the old primary coming back empty.
#
#   bash tests/demo.sh
#
# Installs redis-server, redis-tools, curl and python3 when missing, builds the
# release binary, then runs everything on loopback ports handed out by the OS,
# in a temporary directory that is removed at the end (about 20-40 s after the
# build). Every step prints the command it runs and that command's real output.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"

STARTED=$(date +%s)

say() { printf '\n== %s\n' "$*"; }
note() { printf '   %s\n' "$*"; }
fail() {
    printf '\nDEMO FAILED: %s\n' "$*" >&2
    exit 1
}

# Prints a command as a user would type it, runs it, indents its output.
show() {
    printf '   $ %s\n' "$*"
    "$@" 2>&1 | tr -d '\r' | sed 's/^/     /'
}

# Like `show`, keeping only the output lines that match the regex $1.
show_grep() {
    local pattern=$1
    shift
    printf '   $ %s | grep -E '\''%s'\''\n' "$*" "$pattern"
    "$@" 2>&1 | tr -d '\r' | grep -E "$pattern" | sed 's/^/     /'
}

# Runs "$@" quietly every 50 ms until it succeeds or $1 seconds pass.
wait_until() {
    local deadline=$(($(date +%s%N) + $1 * 1000000000))
    shift
    until "$@" >/dev/null 2>&1; do
        (($(date +%s%N) < deadline)) || return 1
        sleep 0.05
    done
}

install_missing() {
    local missing=() sudo=()
    command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
    command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
    command -v curl >/dev/null 2>&1 || missing+=(curl)
    command -v python3 >/dev/null 2>&1 || missing+=(python3)
    ((${#missing[@]} > 0)) || return 0
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 || fail "need root or sudo to install: ${missing[*]}"
        sudo=(sudo)
    fi
    say "Installing ${missing[*]} (apt-get)"
    "${sudo[@]}" apt-get update -qq || echo "apt-get update failed; trying the install anyway" >&2
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

install_missing

say "Building the portal (cargo build --release)"
cargo build --release
PORTAL=$REPO/target/release/portal

WORK=$(mktemp -d "${TMPDIR:-/tmp}/portal-demo.XXXXXX")
PIDS=()

cleanup() {
    local status=$?
    trap - EXIT
    if ((status != 0)) && [ -d "$WORK" ]; then
        for log in "$WORK"/portal1.log "$WORK"/portal2.log "$WORK"/redis-*.log; do
            [ -f "$log" ] || continue
            printf '\n--- last lines of %s\n' "${log##*/}" >&2
            tail -n 30 "$log" >&2
        done
    fi
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$WORK"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

cd "$WORK"

# Six distinct free loopback ports, all held open until printed so that the
# OS cannot hand out the same one twice.
read -r PORT_A PORT_B LISTEN_1 LISTEN_2 ADMIN_1 ADMIN_2 < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(6)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
')

# start_redis NAME PORT [redis-server options...]: no persistence, so a
# restart comes back empty, as a cache without persistence does; no 5 s wait
# before the first full sync of a replica.
start_redis() {
    local name=$1 port=$2
    shift 2
    mkdir -p "$WORK/$name"
    redis-server --bind 127.0.0.1 --port "$port" --dir "$WORK/$name" \
        --save '' --appendonly no --repl-diskless-sync-delay 0 --logfile "$WORK/redis-$name.log" "$@" &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
    wait_until 10 redis-cli -p "$port" PING || fail "redis $name did not start on port $port"
}

say "Step 0: a Redis primary and a replica, certificates, two portals"
note "working directory: $WORK"
start_redis a "$PORT_A"
PID_A=$LAST_PID
start_redis b "$PORT_B" --replicaof 127.0.0.1 "$PORT_A"
replica_in_sync() { redis-cli -p "$PORT_B" INFO replication | grep -q '^master_link_status:up'; }
wait_until 10 replica_in_sync || fail "the replica did not connect to the primary"
note "redis-a (primary) on 127.0.0.1:$PORT_A, redis-b (replica of redis-a) on 127.0.0.1:$PORT_B"
show_grep '^(role|master_port|master_link_status)' redis-cli -p "$PORT_B" INFO replication

echo
show "$PORTAL" certs init --dir certs --host localhost --host 127.0.0.1

# The two portals need different listen and admin ports on the same host, so
# the demo writes two config files that differ only in those two ports; the
# cluster, its members and the probe settings are identical. (Binding the
# second portal to 127.0.0.2 with the same ports would work too, but the
# certificate and `redis-cli -h localhost` would then have to name 127.0.0.2.)
write_config() { # FILE LISTEN_PORT ADMIN_PORT
    cat >"$1" <<EOF
admin:
  listen: 127.0.0.1:$3
certs_dir: certs
shutdown:
  drain_timeout: 1s
clusters:
  - name: cache
    protocol: redis
    probe:
      interval: 1s
      fast_interval: 50ms
      timeout: 500ms
      rise: 2
      fall: 2
    members:
      - name: redis-a
        address: 127.0.0.1:$PORT_A
      - name: redis-b
        address: 127.0.0.1:$PORT_B
    endpoints:
      - name: cache-rw
        listen: 127.0.0.1:$2
        route: leader
        tls: auto
        hold_timeout: 3s
EOF
}
write_config portal1.yaml "$LISTEN_1" "$ADMIN_1"
write_config portal2.yaml "$LISTEN_2" "$ADMIN_2"
echo
note "portal1.yaml (portal2.yaml differs only in the two ports $LISTEN_2 and $ADMIN_2):"
sed 's/^/     | /' portal1.yaml
echo
show "$PORTAL" check -c portal1.yaml

"$PORTAL" run -c portal1.yaml 2>portal1.log &
PIDS+=($!)
"$PORTAL" run -c portal2.yaml 2>portal2.log &
PIDS+=($!)
wait_until 15 curl -fsS "http://127.0.0.1:$ADMIN_1/ready" || fail "portal 1 never became ready"
wait_until 15 curl -fsS "http://127.0.0.1:$ADMIN_2/ready" || fail "portal 2 never became ready"
note "portal 1: TLS on 127.0.0.1:$LISTEN_1, admin on 127.0.0.1:$ADMIN_1"
note "portal 2: TLS on 127.0.0.1:$LISTEN_2, admin on 127.0.0.1:$ADMIN_2"
show curl -sS "http://127.0.0.1:$ADMIN_1/ready"
show curl -sS "http://127.0.0.1:$ADMIN_2/ready"

CLI=(redis-cli --tls --cacert certs/ca.crt -h localhost)

# One line per cluster and member from a portal's /status.
status_summary() {
    curl -fsS "http://127.0.0.1:$1/status" | python3 -c '
import json, sys
c = json.load(sys.stdin)["clusters"][0]
print("leader=%s epoch=%d split_brain=%s" % (json.dumps(c["leader"]), c["epoch"], json.dumps(c["split_brain"])))
for m in c["members"]:
    fenced = " fenced=%s" % m["fenced"] if m.get("fenced") else ""
    print("  %-8s role=%-7s health=%-4s eligible=%-5s%s term=%s" % (
        m["name"], m["role"], m["health"], json.dumps(m["eligible"]), fenced, m["term"] or "-"))
'
}
show_status() {
    printf '   $ curl -s http://127.0.0.1:%s/status   (portal %s, summarised)\n' "$1" "$2"
    status_summary "$1" | sed 's/^/     /'
}
# status_field ADMIN_PORT FIELD: the cluster's leader or epoch.
status_field() {
    curl -fsS "http://127.0.0.1:$1/status" |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["clusters"][0][sys.argv[1]])' "$2"
}

say "Step 1: writes and reads through both portals reach the primary (redis-a, port $PORT_A)"
show "${CLI[@]}" -p "$LISTEN_1" SET greeting hello-from-portal-1
show "${CLI[@]}" -p "$LISTEN_2" GET greeting
show "${CLI[@]}" -p "$LISTEN_2" SET counter 1
show "${CLI[@]}" -p "$LISTEN_1" INCR counter
show_grep '^tcp_port' "${CLI[@]}" -p "$LISTEN_1" INFO server
show_grep '^tcp_port' "${CLI[@]}" -p "$LISTEN_2" INFO server
note "Both portals elected the same leader (their epochs count their own view changes):"
show_status "$ADMIN_1" 1
show_status "$ADMIN_2" 2

# poll_write PORT NAME: one connection per attempt, SET then INFO server on it,
# until the SET succeeded on the promoted member. Writes NAME.done with the
# nanosecond time of the success, NAME.out with the reply, NAME.tries.
poll_write() {
    local port=$1 name=$2 tries=0 out now
    local deadline=$(($(date +%s%N) + 10 * 1000000000))
    while (($(date +%s%N) < deadline)); do
        tries=$((tries + 1))
        out=$(printf 'SET after-failover written-through-%s\nINFO server\n' "$name" |
            "${CLI[@]}" -p "$port" 2>&1 | tr -d '\r') || true
        now=$(date +%s%N)
        if grep -qx 'OK' <<<"$out" && grep -qx "tcp_port:$PORT_B" <<<"$out"; then
            echo "$now" >"$name.done"
            grep -E '^(OK|tcp_port:)' <<<"$out" >"$name.out"
            echo "$tries" >"$name.tries"
            return 0
        fi
        head -n 1 <<<"$out" >>"$name.failed"
        sleep 0.01
    done
    echo "$tries" >"$name.tries"
    return 1
}

say "Step 2: failover: kill -9 the primary, promote the replica"
note "$ kill -9 $PID_A                      # redis-a, the primary"
note "$ redis-cli -p $PORT_B REPLICAOF NO ONE   # redis-b becomes a primary"
note "   (writers start through both portals right after the kill; a portal holds"
note "    a new connection up to hold_timeout while it has no leader)"
T_KILL=$(date +%s%N)
# Reaped at once, with stderr closed, so bash does not print "Killed".
{ kill -9 "$PID_A" && wait "$PID_A"; } 2>/dev/null || true
poll_write "$LISTEN_1" portal1 &
POLL_1=$!
PIDS+=("$POLL_1")
poll_write "$LISTEN_2" portal2 &
POLL_2=$!
PIDS+=("$POLL_2")
PROMOTE_OUT=$(redis-cli -p "$PORT_B" REPLICAOF NO ONE 2>&1 | tr -d '\r')
T_PROMOTED=$(date +%s%N)
note "REPLICAOF NO ONE answered: $PROMOTE_OUT ($(((T_PROMOTED - T_KILL) / 1000000)) ms after the kill)"

say "Step 3: the first successful write through each portal lands on redis-b (port $PORT_B)"
ok=1
wait "$POLL_1" || ok=0
wait "$POLL_2" || ok=0
for n in 1 2; do
    if [ -f "portal$n.done" ]; then
        done_at=$(cat "portal$n.done")
        note "portal $n: the write succeeded $(((done_at - T_KILL) / 1000000)) ms after the kill," \
            "$(((done_at - T_PROMOTED) / 1000000)) ms after the promotion, on attempt $(cat "portal$n.tries"):"
        sed 's/^/       /' "portal$n.out"
    else
        note "portal $n: no write succeeded within 10 s ($(cat "portal$n.tries") attempts)"
    fi
    if [ -f "portal$n.failed" ]; then
        note "  replies of the failed attempts before it:"
        sort "portal$n.failed" | uniq -c | sed 's/^/       /'
    fi
done
note "(times include starting redis-cli and its TLS handshake; \"after the promotion\""
note " counts from when REPLICAOF NO ONE returned; one run on this machine)"
((ok == 1)) || fail "a portal did not serve a write on the promoted replica"

leaders_agree() {
    [ "$(status_field "$ADMIN_1" leader)" = redis-b ] && [ "$(status_field "$ADMIN_2" leader)" = redis-b ]
}
wait_until 5 leaders_agree || fail "the portals do not both name redis-b as leader"
echo
show_status "$ADMIN_1" 1
show_status "$ADMIN_2" 2
E1=$(status_field "$ADMIN_1" epoch)
E2=$(status_field "$ADMIN_2" epoch)
if [ "$E1" = "$E2" ]; then
    note "Both portals agree: leader redis-b, epoch $E1."
else
    note "Both portals agree on leader redis-b; epochs $E1 and $E2 differ (each portal counts its own view changes)."
fi
show "${CLI[@]}" -p "$LISTEN_2" GET greeting
note "(the key written before the failover was replicated to redis-b)"
echo
note "What portal 1 logged (the primary's probe connection dropped: demoted at once,"
note "then the replica was probed every fast_interval until it proved the newer term):"
grep -E 'member (up|down)|leader (lost|elected)' portal1.log | sed 's/^/     /'

say "Step 4: the old primary comes back empty, claiming primary; the portals keep redis-b"
note "$ redis-server --port $PORT_A --save '' ...   # same port, no data, a new replication id"
start_redis a-restarted "$PORT_A"
show_grep '^(role|master_replid)' redis-cli -p "$PORT_A" INFO replication
show redis-cli -p "$PORT_A" DBSIZE
# The portals need `rise` good reports before the newcomer counts as up.
claims_primary() {
    curl -fsS "http://127.0.0.1:$1/status" | python3 -c '
import json, sys
m = json.load(sys.stdin)["clusters"][0]["members"][0]
sys.exit(0 if (m["role"], m["health"]) == ("primary", "up") else 1)
'
}
wait_until 10 claims_primary "$ADMIN_1" || fail "portal 1 never saw redis-a claim primary again"
wait_until 10 claims_primary "$ADMIN_2" || fail "portal 2 never saw redis-a claim primary again"
show_status "$ADMIN_1" 1
show_status "$ADMIN_2" 2
note "redis-a is up and says role:master, but its new replication id does not descend"
note "from redis-b's history, so it cannot prove a newer term: the incumbent redis-b"
note "keeps the role and redis-a is fenced (incumbent_leads), not eligible. Portal logs:"
grep -H 'fenced\|split brain' portal1.log portal2.log | sed 's/^/     /' || true
echo
note "The whole /status document of portal 1 at this point:"
show curl -sS "http://127.0.0.1:$ADMIN_1/status"
[ "$(status_field "$ADMIN_1" leader)" = redis-b ] || fail "portal 1 moved the leader to redis-a"
[ "$(status_field "$ADMIN_2" leader)" = redis-b ] || fail "portal 2 moved the leader to redis-a"
echo
show "${CLI[@]}" -p "$LISTEN_1" SET after-restart still-on-redis-b
show_grep '^tcp_port' "${CLI[@]}" -p "$LISTEN_1" INFO server
show_grep '^tcp_port' "${CLI[@]}" -p "$LISTEN_2" INFO server
show "${CLI[@]}" -p "$LISTEN_2" GET greeting
for admin in "$ADMIN_1" "$ADMIN_2"; do
    [ "$(status_field "$admin" leader)" = redis-b ] || fail "a portal moved the leader to redis-a"
done
note "Writes still land on redis-b (port $PORT_B); nothing was routed to the empty redis-a."

say "Done in $(($(date +%s) - STARTED)) s; stopping the portals and Redis servers"
