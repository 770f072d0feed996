#!/usr/bin/env bash
# The portal demo: two portals in front of real database servers, a failover,
# and the old primary coming back.
#
#   bash tests/demo.sh            # all three parts: Redis, PostgreSQL, Patroni
#   bash tests/demo.sh redis      # a Redis primary and replica only
#   bash tests/demo.sh postgres   # a PostgreSQL primary and streaming standby only
#   bash tests/demo.sh patroni    # etcd + Patroni; portals that learn the members from etcd
#
# Installs what is missing (redis-server, redis-tools, postgresql, etcd-server,
# etcd-client, patroni, curl, python3) with apt-get, builds the release
# binary, then runs everything on loopback ports handed out by the OS, in a
# temporary directory that is removed at the end, also when a step fails or
# the demo is interrupted. Every step prints the command it runs and that
# command's real output; every client command runs under `timeout`.
set -euo pipefail

MODE=${1:-all}
case $MODE in
redis | postgres | patroni | all) ;;
-h | --help)
    sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit 0
    ;;
*)
    echo "usage: bash tests/demo.sh [redis|postgres|patroni|all]   (default: all)" >&2
    exit 2
    ;;
esac

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"

STARTED=$(date +%s)

# Nothing from the caller's environment changes where libpq connects or how,
# nor what etcd or etcdctl do (they read ETCD_* / ETCDCTL_* as flags).
while read -r var; do
    unset "$var"
done < <(compgen -e | grep -E '^(PG|ETCD)' || true)

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

# show_as TEXT COMMAND...: prints TEXT as the command line, runs COMMAND.
show_as() {
    printf '   $ %s\n' "$1"
    shift
    "$@" 2>&1 | tr -d '\r' | sed 's/^/     /'
}

# show_refused TEXT COMMAND...: like show_as, for a command that must fail.
show_refused() {
    printf '   $ %s\n' "$1"
    shift
    local out status=0
    out=$("$@" 2>&1) || status=$?
    tr -d '\r' <<<"$out" | sed 's/^/     /'
    ((status != 0)) || fail "this command should have been refused: $*"
    note "(exit status $status)"
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

# The directory of PostgreSQL's server binaries (postgres, initdb, pg_ctl,
# pg_basebackup): `pg_config --bindir`, else Debian's newest
# /usr/lib/postgresql/N/bin. Empty when the server is not installed.
pg_bindir() {
    local dir
    dir=$(pg_config --bindir 2>/dev/null || true)
    if [ -n "$dir" ] && [ -x "$dir/postgres" ] && [ -x "$dir/initdb" ]; then
        echo "$dir"
        return
    fi
    for dir in $(printf '%s\n' /usr/lib/postgresql/*/bin | sort -t/ -k4 -n -r); do
        if [ -x "$dir/postgres" ] && [ -x "$dir/initdb" ]; then
            echo "$dir"
            return
        fi
    done
}

# Debian's Patroni (the demo runs these two, not another patroni on PATH).
PATRONI_BIN=/usr/bin/patroni
PATRONICTL=/usr/bin/patronictl

install_missing() {
    local missing=() sudo=()
    case $MODE in
    redis | all)
        command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
        command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
        ;;
    esac
    case $MODE in
    postgres | patroni | all)
        [ -n "$(pg_bindir)" ] || missing+=(postgresql)
        ;;
    esac
    case $MODE in
    patroni | all)
        command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
        command -v etcdctl >/dev/null 2>&1 || missing+=(etcd-client)
        [ -x "$PATRONI_BIN" ] && [ -x "$PATRONICTL" ] || missing+=(patroni)
        ;;
    esac
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
# PostgreSQL runs as user postgres when we are root: it must be able to
# reach its own directories below this one (but not list or read it).
chmod 711 "$WORK"
PIDS=()         # portals, Redis servers, background writers
PG_DATADIRS=()  # PostgreSQL data directories that may have a running server
ETCD_PIDS=()    # etcd members
PATRONI_PIDS=() # Patroni agents
PT_DATADIRS=()  # data directories of Patroni-managed PostgreSQL servers

# proc_alive PID: the process exists and is not a zombie.
proc_alive() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [ "${stat%% *}" != Z ]
}

# frozen_postmaster_pids DATA: the postmaster running on DATA (from
# postmaster.pid, when that process still names DATA on its command line),
# stopped with SIGSTOP so that it forks nothing more, and its children: the
# list to SIGKILL. A live postmaster whose child dies first restarts its
# children, and orphans not on the list would keep its shared memory.
frozen_postmaster_pids() {
    local pm
    pm=$(head -n 1 "$1/postmaster.pid" 2>/dev/null) || return 0
    [[ $pm =~ ^[0-9]+$ ]] || return 0
    tr '\0' ' ' 2>/dev/null <"/proc/$pm/cmdline" | grep -qF -- "$1" || return 0
    kill -STOP "$pm" 2>/dev/null || return 0
    echo "$pm"
    ps -o pid= --ppid "$pm" 2>/dev/null | tr -d ' ' || true
}

# kill9_wait PID...: SIGKILL, reap those that are our children, and wait up
# to 10 s until every one is gone (stderr closed: no "Killed" from bash).
kill9_wait() {
    local pid deadline=$(($(date +%s%N) + 10000000000))
    {
        kill -9 "$@" || true
        for pid in "$@"; do
            wait "$pid" || true
        done
    } 2>/dev/null
    for pid in "$@"; do
        while proc_alive "$pid" && (($(date +%s%N) < deadline)); do sleep 0.02; done
    done
}

# Processes whose command line names a path below $WORK: etcd, and whatever
# Patroni started (postgres, initdb, pg_basebackup, pg_rewind). The regex
# does not match itself, so grep does not find its own command line.
pids_in_work() {
    grep -laE -- "${WORK//./[.]}/" /proc/[0-9]*/cmdline 2>/dev/null | cut -d/ -f3 || true
}

cleanup() {
    local status=$?
    trap - EXIT
    if ((status != 0)) && [ -d "$WORK" ]; then
        for log in "$WORK"/*/portal*.log "$WORK"/redis-*.log "$WORK"/pg-*/server.log \
            "$WORK"/pt-*/patroni.log "$WORK"/etcd/*.log; do
            [ -f "$log" ] || continue
            printf '\n--- last lines of %s\n' "${log#"$WORK"/}" >&2
            tail -n 30 "$log" >&2
        done
    fi
    # Patroni first (SIGKILL, so that no agent restarts its PostgreSQL or
    # waits on etcd), then each postmaster it left and that one's children.
    local pids=() data
    ((${#PATRONI_PIDS[@]} == 0)) || kill9_wait "${PATRONI_PIDS[@]}"
    for data in "${PT_DATADIRS[@]}"; do
        mapfile -t pids < <(frozen_postmaster_pids "$data")
        ((${#pids[@]} == 0)) || kill9_wait "${pids[@]}"
    done
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    for data in "${PG_DATADIRS[@]}"; do
        [ -f "$data/postmaster.pid" ] || continue
        as_pg pg_ctl stop -m immediate -w -t 30 -D "$data" >/dev/null 2>&1 || true
    done
    # etcd last, and SIGKILL: a leader stopped with SIGTERM first tries to
    # hand its leadership to peers that are stopping too.
    ((${#ETCD_PIDS[@]} == 0)) || kill9_wait "${ETCD_PIDS[@]}"
    # Anything still running from the temporary directory.
    for _ in 1 2 3; do
        mapfile -t pids < <(pids_in_work)
        ((${#pids[@]} > 0)) || break
        kill9_wait "${pids[@]}"
    done
    rm -rf "$WORK"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

cd "$WORK"

# free_ports N: N distinct free loopback ports, all held open until printed
# so that the OS cannot hand out the same one twice.
free_ports() {
    python3 -c '
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
' "$1"
}

show "$PORTAL" certs init --dir certs --host localhost --host 127.0.0.1

CURL=(timeout 10 curl -fsS)

# One line per cluster and member from a portal's /status.
status_summary() {
    "${CURL[@]}" "http://127.0.0.1:$1/status" | python3 -c '
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
    "${CURL[@]}" "http://127.0.0.1:$1/status" |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["clusters"][0][sys.argv[1]])' "$2"
}
# member_state ADMIN_PORT INDEX: "role health fenced" of the member at INDEX.
member_state() {
    "${CURL[@]}" "http://127.0.0.1:$1/status" | python3 -c '
import json, sys
m = json.load(sys.stdin)["clusters"][0]["members"][int(sys.argv[1])]
print(m["role"], m["health"], m["fenced"])
' "$2"
}

# start_portals DIR NAME: writes nothing; starts `portal run` for DIR/portal1.yaml
# and DIR/portal2.yaml and waits until both are ready. Sets PORTAL_PID_1/2.
start_portals() {
    local dir=$1
    "$PORTAL" run -c "$dir/portal1.yaml" 2>"$dir/portal1.log" &
    PORTAL_PID_1=$!
    PIDS+=("$PORTAL_PID_1")
    "$PORTAL" run -c "$dir/portal2.yaml" 2>"$dir/portal2.log" &
    PORTAL_PID_2=$!
    PIDS+=("$PORTAL_PID_2")
    wait_until 15 "${CURL[@]}" "http://127.0.0.1:$ADMIN_1/ready" || fail "portal 1 never became ready"
    wait_until 15 "${CURL[@]}" "http://127.0.0.1:$ADMIN_2/ready" || fail "portal 2 never became ready"
}

# stop_pids PID...: SIGTERM, then reap.
stop_pids() {
    local pid
    for pid in "$@"; do kill "$pid" 2>/dev/null || true; done
    for pid in "$@"; do wait "$pid" 2>/dev/null || true; done
}

# ---- Redis ------------------------------------------------------------------

redis_demo() {
    local PORT_A PORT_B
    read -r PORT_A PORT_B LISTEN_1 LISTEN_2 ADMIN_1 ADMIN_2 < <(free_ports 6)
    mkdir -p redis

    # start_redis NAME PORT [redis-server options...]: no persistence, so a
    # restart comes back empty, as a cache without persistence does; no 5 s
    # wait before the first full sync of a replica.
    start_redis() {
        local name=$1 port=$2
        shift 2
        mkdir -p "$WORK/$name"
        redis-server --bind 127.0.0.1 --port "$port" --dir "$WORK/$name" \
            --save '' --appendonly no --repl-diskless-sync-delay 0 --logfile "$WORK/redis-$name.log" "$@" &
        LAST_PID=$!
        PIDS+=("$LAST_PID")
        wait_until 10 timeout 5 redis-cli -p "$port" PING || fail "redis $name did not start on port $port"
    }

    say "Redis step 0: a Redis primary and a replica, two portals"
    note "working directory: $WORK"
    start_redis a "$PORT_A"
    local PID_A=$LAST_PID
    start_redis b "$PORT_B" --replicaof 127.0.0.1 "$PORT_A"
    replica_in_sync() { timeout 5 redis-cli -p "$PORT_B" INFO replication | grep -q '^master_link_status:up'; }
    wait_until 10 replica_in_sync || fail "the replica did not connect to the primary"
    note "redis-a (primary) on 127.0.0.1:$PORT_A, redis-b (replica of redis-a) on 127.0.0.1:$PORT_B"
    show_grep '^(role|master_port|master_link_status)' timeout 10 redis-cli -p "$PORT_B" INFO replication

    # The two portals need different listen and admin ports on the same
    # host, so the demo writes two config files that differ only in those two
    # ports; the cluster, its members and the probe settings are identical.
    # (Binding the second portal to 127.0.0.2 with the same ports would work
    # too, but the certificate and `redis-cli -h localhost` would then have to
    # name 127.0.0.2.)
    write_config() { # FILE LISTEN_PORT ADMIN_PORT
        cat >"$1" <<EOF
admin:
  listen: 127.0.0.1:$3
certs_dir: ../certs
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
    write_config redis/portal1.yaml "$LISTEN_1" "$ADMIN_1"
    write_config redis/portal2.yaml "$LISTEN_2" "$ADMIN_2"
    echo
    note "redis/portal1.yaml (portal2.yaml differs only in the two ports $LISTEN_2 and $ADMIN_2):"
    sed 's/^/     | /' redis/portal1.yaml
    echo
    show "$PORTAL" check -c redis/portal1.yaml

    start_portals redis
    note "portal 1: TLS on 127.0.0.1:$LISTEN_1, admin on 127.0.0.1:$ADMIN_1"
    note "portal 2: TLS on 127.0.0.1:$LISTEN_2, admin on 127.0.0.1:$ADMIN_2"
    show curl -sS -m 5 "http://127.0.0.1:$ADMIN_1/ready"
    show curl -sS -m 5 "http://127.0.0.1:$ADMIN_2/ready"

    CLI=(timeout 10 redis-cli --tls --cacert certs/ca.crt -h localhost)

    say "Redis step 1: writes and reads through both portals reach the primary (redis-a, port $PORT_A)"
    show "${CLI[@]}" -p "$LISTEN_1" SET greeting hello-from-portal-1
    show "${CLI[@]}" -p "$LISTEN_2" GET greeting
    show "${CLI[@]}" -p "$LISTEN_2" SET counter 1
    show "${CLI[@]}" -p "$LISTEN_1" INCR counter
    show_grep '^tcp_port' "${CLI[@]}" -p "$LISTEN_1" INFO server
    show_grep '^tcp_port' "${CLI[@]}" -p "$LISTEN_2" INFO server
    note "Both portals elected the same leader (their epochs count their own view changes):"
    show_status "$ADMIN_1" 1
    show_status "$ADMIN_2" 2

    # poll_write PORT NAME: one connection per attempt, SET then INFO server
    # on it, until the SET succeeded on the promoted member. Writes NAME.done
    # with the nanosecond time of the success, NAME.out with the reply,
    # NAME.tries.
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

    say "Redis step 2: failover: kill -9 the primary, promote the replica"
    note "$ kill -9 $PID_A                      # redis-a, the primary"
    note "$ timeout 10 redis-cli -p $PORT_B REPLICAOF NO ONE   # redis-b becomes a primary"
    note "   (writers start through both portals right after the kill; a portal holds"
    note "    a new connection up to hold_timeout while it has no leader)"
    local T_KILL T_PROMOTED PROMOTE_OUT POLL_1 POLL_2
    T_KILL=$(date +%s%N)
    # Reaped at once, with stderr closed, so bash does not print "Killed".
    { kill -9 "$PID_A" && wait "$PID_A"; } 2>/dev/null || true
    poll_write "$LISTEN_1" redis/portal1 &
    POLL_1=$!
    PIDS+=("$POLL_1")
    poll_write "$LISTEN_2" redis/portal2 &
    POLL_2=$!
    PIDS+=("$POLL_2")
    PROMOTE_OUT=$(timeout 10 redis-cli -p "$PORT_B" REPLICAOF NO ONE 2>&1 | tr -d '\r')
    T_PROMOTED=$(date +%s%N)
    note "REPLICAOF NO ONE answered: $PROMOTE_OUT ($(((T_PROMOTED - T_KILL) / 1000000)) ms after the kill)"

    say "Redis step 3: the first successful write through each portal lands on redis-b (port $PORT_B)"
    local ok=1 n done_at
    wait "$POLL_1" || ok=0
    wait "$POLL_2" || ok=0
    for n in 1 2; do
        if [ -f "redis/portal$n.done" ]; then
            done_at=$(cat "redis/portal$n.done")
            note "portal $n: the write succeeded $(((done_at - T_KILL) / 1000000)) ms after the kill," \
                "$(((done_at - T_PROMOTED) / 1000000)) ms after the promotion, on attempt $(cat "redis/portal$n.tries"):"
            sed 's/^/       /' "redis/portal$n.out"
        else
            note "portal $n: no write succeeded within 10 s ($(cat "redis/portal$n.tries") attempts)"
        fi
        if [ -f "redis/portal$n.failed" ]; then
            note "  replies of the failed attempts before it:"
            sort "redis/portal$n.failed" | uniq -c | sed 's/^/       /'
        fi
    done
    note "(times include starting redis-cli and its TLS handshake; \"after the promotion\""
    note " counts from when REPLICAOF NO ONE returned; one run on this machine)"
    ((ok == 1)) || fail "a portal did not serve a write on the promoted replica"

    leaders_agree() {
        [ "$(status_field "$ADMIN_1" leader)" = "$1" ] && [ "$(status_field "$ADMIN_2" leader)" = "$1" ]
    }
    wait_until 5 leaders_agree redis-b || fail "the portals do not both name redis-b as leader"
    echo
    show_status "$ADMIN_1" 1
    show_status "$ADMIN_2" 2
    agree_note redis-b
    show "${CLI[@]}" -p "$LISTEN_2" GET greeting
    note "(the key written before the failover was replicated to redis-b)"
    echo
    note "What portal 1 logged (the primary's probe connection dropped: demoted at once,"
    note "then the replica was probed every fast_interval until it proved the newer term):"
    grep -E 'member (up|down)|leader (lost|elected)' redis/portal1.log | sed 's/^/     /'

    say "Redis step 4: the old primary comes back empty, claiming primary; the portals keep redis-b"
    note "$ redis-server --port $PORT_A --save '' ...   # same port, no data, a new replication id"
    start_redis a-restarted "$PORT_A"
    show_grep '^(role|master_replid)' timeout 10 redis-cli -p "$PORT_A" INFO replication
    show timeout 10 redis-cli -p "$PORT_A" DBSIZE
    # The portals need `rise` good reports before the newcomer counts as up.
    claims_primary() { [[ "$(member_state "$1" 0)" == "primary up "* ]]; }
    wait_until 10 claims_primary "$ADMIN_1" || fail "portal 1 never saw redis-a claim primary again"
    wait_until 10 claims_primary "$ADMIN_2" || fail "portal 2 never saw redis-a claim primary again"
    show_status "$ADMIN_1" 1
    show_status "$ADMIN_2" 2
    note "redis-a is up and says role:master, but its new replication id does not descend"
    note "from redis-b's history: an unrelated history never leads on its own, even if"
    note "redis-b stalls or dies; redis-a is fenced (unrelated_history), not eligible. Portal logs:"
    grep -H 'fenced\|split brain' redis/portal1.log redis/portal2.log | sed 's/^/     /' || true
    echo
    note "The whole /status document of portal 1 at this point:"
    show curl -sS -m 5 "http://127.0.0.1:$ADMIN_1/status"
    [ "$(status_field "$ADMIN_1" leader)" = redis-b ] || fail "portal 1 moved the leader to redis-a"
    [ "$(status_field "$ADMIN_2" leader)" = redis-b ] || fail "portal 2 moved the leader to redis-a"
    echo
    show "${CLI[@]}" -p "$LISTEN_1" SET after-restart still-on-redis-b
    show_grep '^tcp_port' "${CLI[@]}" -p "$LISTEN_1" INFO server
    show_grep '^tcp_port' "${CLI[@]}" -p "$LISTEN_2" INFO server
    show "${CLI[@]}" -p "$LISTEN_2" GET greeting
    local admin
    for admin in "$ADMIN_1" "$ADMIN_2"; do
        [ "$(status_field "$admin" leader)" = redis-b ] || fail "a portal moved the leader to redis-a"
    done
    note "Writes still land on redis-b (port $PORT_B); nothing was routed to the empty redis-a."
}

# agree_note LEADER: one line on whether both portals' epochs match.
agree_note() {
    local e1 e2
    e1=$(status_field "$ADMIN_1" epoch)
    e2=$(status_field "$ADMIN_2" epoch)
    if [ "$e1" = "$e2" ]; then
        note "Both portals agree: leader $1, epoch $e1."
    else
        note "Both portals agree on leader $1; epochs $e1 and $e2 differ (each portal counts its own view changes)."
    fi
}

# ---- PostgreSQL ---------------------------------------------------------------

# as_pg COMMAND ARGS...: a PostgreSQL server binary, as user postgres when
# we are root (PostgreSQL refuses to run as root), else as ourselves.
as_pg() {
    local cmd=$PGBIN/$1
    shift
    if [ "$(id -u)" -eq 0 ]; then
        setpriv --reuid=postgres --regid=postgres --init-groups -- "$cmd" "$@"
    else
        "$cmd" "$@"
    fi
}

# show_pg COMMAND ARGS...: prints and runs a server command (in $WORK).
show_pg() {
    local who=""
    [ "$(id -u)" -ne 0 ] || who="   # as user postgres"
    show_as "$*$who" as_pg "$@"
}

# A directory the server user owns.
pg_dir() {
    mkdir -p "$WORK/$1"
    [ "$(id -u)" -ne 0 ] || chown postgres:postgres "$WORK/$1"
}

# Settings of both servers: replication, a port and a socket in their own
# directory, no fsync (a demo, not a database to keep).
pg_settings() { # NAME PORT
    cat <<EOF

# portal demo
listen_addresses = '127.0.0.1'
port = $2
unix_socket_directories = '$WORK/$1'
wal_level = replica
max_wal_senders = 8
hot_standby = on
wal_keep_size = '64MB'
fsync = off
max_connections = 40
shared_buffers = 16MB
EOF
}

# Direct (no portal) psql to a member over loopback TCP.
pg_direct() { # PORT SQL
    timeout 15 psql -X -w -At -h 127.0.0.1 -p "$1" -U postgres -d postgres -c "$2"
}

postgres_demo() {
    PGBIN=$(pg_bindir)
    [ -n "$PGBIN" ] || fail "the PostgreSQL server is not installed (apt-get install postgresql)"
    export PATH="$PGBIN:$PATH"
    export PGCONNECT_TIMEOUT=10
    local PG_A PG_B
    read -r PG_A PG_B LISTEN_1 LISTEN_2 ADMIN_1 ADMIN_2 < <(free_ports 6)
    mkdir -p pg

    say "PostgreSQL step 0: a primary and a streaming standby, two portals"
    note "working directory: $WORK; PostgreSQL $("$PGBIN/postgres" --version | awk '{print $3}') from $PGBIN"
    pg_dir pg-a
    local who=""
    [ "$(id -u)" -ne 0 ] || who="   # as user postgres"
    printf '   $ %s\n' "initdb -D pg-a/data -U postgres --auth=trust -E UTF8 --no-locale --no-sync --no-instructions$who"
    as_pg initdb -D pg-a/data -U postgres --auth=trust -E UTF8 --no-locale --no-sync --no-instructions \
        >pg/initdb.log 2>&1 || { cat pg/initdb.log; fail "initdb failed"; }
    note "  (done; its progress report is in pg/initdb.log)"
    # Loopback only, trust: a demo. The portal's probe logs in as postgres.
    cat >"$WORK/pg-a/data/pg_hba.conf" <<EOF
local all         all              trust
host  all         all 127.0.0.1/32 trust
local replication all              trust
host  replication all 127.0.0.1/32 trust
EOF
    pg_settings pg-a "$PG_A" >>"$WORK/pg-a/data/postgresql.conf"
    note "pg-a: postgresql.conf gets port $PG_A, wal_level=replica, hot_standby=on, fsync=off;"
    note "      pg_hba.conf trusts loopback connections (demo only)"
    PG_DATADIRS+=("$WORK/pg-a/data")
    show_pg pg_ctl start -w -D pg-a/data -l pg-a/server.log

    pg_dir pg-b
    show_pg pg_basebackup -D pg-b/data -h 127.0.0.1 -p "$PG_A" -U postgres -R -X stream -c fast
    # The copy names pg-a's port and socket directory; later lines win.
    pg_settings pg-b "$PG_B" >>"$WORK/pg-b/data/postgresql.conf"
    PG_DATADIRS+=("$WORK/pg-b/data")
    show_pg pg_ctl start -w -D pg-b/data -l pg-b/server.log
    streaming() { [ "$(pg_direct "$PG_B" "select status from pg_stat_wal_receiver")" = streaming ]; }
    wait_until 30 streaming || fail "pg-b is not streaming from pg-a"
    note "pg-a (primary) on 127.0.0.1:$PG_A, pg-b (standby of pg-a) on 127.0.0.1:$PG_B:"
    local sql="select application_name, state, sync_state from pg_stat_replication"
    show_as "timeout 15 psql -h 127.0.0.1 -p $PG_A -U postgres -c \"$sql\"" \
        timeout 15 psql -X -h 127.0.0.1 -p "$PG_A" -U postgres -c "$sql"
    sql="select pg_is_in_recovery(), status, sender_port from pg_stat_wal_receiver"
    show_as "timeout 15 psql -h 127.0.0.1 -p $PG_B -U postgres -c \"$sql\"" \
        timeout 15 psql -X -h 127.0.0.1 -p "$PG_B" -U postgres -c "$sql"

    write_pg_config() { # FILE LISTEN_PORT ADMIN_PORT
        cat >"$1" <<EOF
admin:
  listen: 127.0.0.1:$3
certs_dir: ../certs
shutdown:
  drain_timeout: 1s
clusters:
  - name: db
    protocol: postgres
    probe:
      interval: 1s
      fast_interval: 50ms
      timeout: 500ms
      rise: 2
      fall: 2
      username: postgres
    members:
      - name: pg-a
        address: 127.0.0.1:$PG_A
      - name: pg-b
        address: 127.0.0.1:$PG_B
    endpoints:
      - name: db-rw
        listen: 127.0.0.1:$2
        route: leader
        tls: auto
        hold_timeout: 5s
EOF
    }
    write_pg_config pg/portal1.yaml "$LISTEN_1" "$ADMIN_1"
    write_pg_config pg/portal2.yaml "$LISTEN_2" "$ADMIN_2"
    echo
    note "pg/portal1.yaml (portal2.yaml differs only in the two ports $LISTEN_2 and $ADMIN_2):"
    sed 's/^/     | /' pg/portal1.yaml
    echo
    show "$PORTAL" check -c pg/portal1.yaml
    start_portals pg
    note "portal 1: TLS on 127.0.0.1:$LISTEN_1, admin on 127.0.0.1:$ADMIN_1"
    note "portal 2: TLS on 127.0.0.1:$LISTEN_2, admin on 127.0.0.1:$ADMIN_2"

    local P1="host=localhost port=$LISTEN_1 sslmode=verify-full sslrootcert=certs/ca.crt user=postgres dbname=postgres"
    local P2="host=localhost port=$LISTEN_2 sslmode=verify-full sslrootcert=certs/ca.crt user=postgres dbname=postgres"
    local BOTH="host=localhost,localhost port=$LISTEN_1,$LISTEN_2 target_session_attrs=read-write sslmode=verify-full sslrootcert=certs/ca.crt user=postgres dbname=postgres"
    PSQL=(timeout 20 psql -X -w)

    say "PostgreSQL step 1: psql through both portals, TLS verified against the portal's CA"
    note "P1=\"$P1\""
    note "P2=\"$P2\""
    show_as "timeout 20 psql \"\$P1\" -c '\\conninfo'" "${PSQL[@]}" "$P1" -c '\conninfo'
    show_as "timeout 20 psql \"\$P1\" -c 'create table demo (...); insert ...'" "${PSQL[@]}" "$P1" -c \
        "create table demo (id serial primary key, note text, at_port int default inet_server_port())" \
        -c "insert into demo (note) values ('written through portal 1')"
    show_as "timeout 20 psql \"\$P2\" -c \"insert ...; select ...\"" "${PSQL[@]}" "$P2" -c \
        "insert into demo (note) values ('written through portal 2')" -c \
        "select note, at_port, inet_server_port() as now_on, pg_is_in_recovery() as standby from demo order by id"
    note "Both sessions run on pg-a (port $PG_A), the primary."
    echo
    note "A client that does not ask for TLS is refused in PostgreSQL's own words:"
    show_refused "timeout 20 psql \"host=localhost port=$LISTEN_1 sslmode=disable user=postgres\" -c 'select 1'" \
        "${PSQL[@]}" "host=localhost port=$LISTEN_1 sslmode=disable user=postgres dbname=postgres" -c 'select 1'
    echo
    note "libpq's multi-host string names both portals; it uses the first that answers and"
    note "accepts writes (target_session_attrs=read-write), so either portal can go away:"
    note "BOTH=\"$BOTH\""
    show_as "timeout 20 psql \"\$BOTH\" -At -c 'select inet_server_port(), pg_is_in_recovery()'" \
        "${PSQL[@]}" "$BOTH" -At -c 'select inet_server_port(), pg_is_in_recovery()'
    show_status "$ADMIN_1" 1
    show_status "$ADMIN_2" 2
    note "(for PostgreSQL the term is the member's timeline)"

    # poll_pg_write NAME CONNINFO: one connection per attempt, an insert that
    # returns the server's port, until it succeeded on pg-b. Writes
    # NAME.done (nanosecond time), NAME.out, NAME.tries, NAME.failed.
    poll_pg_write() {
        local name=$1 conninfo=$2 tries=0 out now
        local deadline=$(($(date +%s%N) + 30 * 1000000000))
        while (($(date +%s%N) < deadline)); do
            tries=$((tries + 1))
            out=$("${PSQL[@]}" "$conninfo" -At -c \
                "insert into demo (note) values ('after failover via ${name##*/}') returning inet_server_port()" 2>&1) || true
            now=$(date +%s%N)
            if [ "$(head -n 1 <<<"$out")" = "$PG_B" ]; then
                echo "$now" >"$name.done"
                head -n 1 <<<"$out" >"$name.out"
                echo "$tries" >"$name.tries"
                return 0
            fi
            head -n 1 <<<"$out" >>"$name.failed"
            sleep 0.01
        done
        echo "$tries" >"$name.tries"
        return 1
    }

    say "PostgreSQL step 2: failover: stop the primary at once, promote the standby"
    note "(writers start through both portals right after the stop; a portal holds a new"
    note " connection up to hold_timeout, 5s here, while it has no leader)"
    local T_STOP T_PROMOTED POLL_1 POLL_2
    T_STOP=$(date +%s%N)
    show_pg pg_ctl stop -m immediate -w -D pg-a/data
    poll_pg_write pg/portal1 "$P1" &
    POLL_1=$!
    PIDS+=("$POLL_1")
    poll_pg_write pg/portal2 "$P2" &
    POLL_2=$!
    PIDS+=("$POLL_2")
    show_pg pg_ctl promote -w -D pg-b/data
    T_PROMOTED=$(date +%s%N)
    note "(pg_ctl promote -w returned $(((T_PROMOTED - T_STOP) / 1000000)) ms after the stop began; it checks"
    note " the server's state every 100 ms, so it may return after the standby already took writes)"

    say "PostgreSQL step 3: the first successful write through each portal lands on pg-b (port $PG_B)"
    local ok=1 n done_at
    wait "$POLL_1" || ok=0
    wait "$POLL_2" || ok=0
    for n in 1 2; do
        if [ -f "pg/portal$n.done" ]; then
            done_at=$(cat "pg/portal$n.done")
            note "portal $n: insert ... returning inet_server_port() said $(cat "pg/portal$n.out")," \
                "$(((done_at - T_STOP) / 1000000)) ms after the stop began, on attempt $(cat "pg/portal$n.tries")"
        else
            note "portal $n: no write reached pg-b within 30 s ($(cat "pg/portal$n.tries") attempts)"
        fi
        if [ -f "pg/portal$n.failed" ]; then
            note "  first lines of the failed attempts before it:"
            sort "pg/portal$n.failed" | uniq -c | sed 's/^/       /'
        fi
    done
    note "(times include starting psql and its TLS handshake; one run on this machine; a"
    note " connection that arrives while there is no leader is held by the portal, not refused)"
    ((ok == 1)) || fail "a portal did not serve a write on the promoted standby"
    leaders_agree() {
        [ "$(status_field "$ADMIN_1" leader)" = "$1" ] && [ "$(status_field "$ADMIN_2" leader)" = "$1" ]
    }
    wait_until 5 leaders_agree pg-b || fail "the portals do not both name pg-b as leader"
    show_status "$ADMIN_1" 1
    show_status "$ADMIN_2" 2
    agree_note pg-b
    show_as "timeout 20 psql \"\$P1\" -c \"insert ...; select ...\"" "${PSQL[@]}" "$P1" -c \
        "insert into demo (note) values ('written through portal 1 after the failover')" -c \
        "select note, at_port, inet_server_port() as now_on, pg_is_in_recovery() as standby from demo order by id"
    note "The rows written before the failover were streamed to pg-b (at_port: where each row was"
    note "written); new ones land on pg-b (port $PG_B)."
    echo
    note "What portal 1 logged:"
    grep -E 'member (up|down)|leader (lost|elected)' pg/portal1.log | sed 's/^/     /'

    say "PostgreSQL step 4: the old primary restarts on its old timeline, claiming primary"
    # A primary's timeline is the first 8 hex digits of its current WAL file's
    # name (the portal's probe reads it the same way).
    local TIMELINE_SQL="select pg_is_in_recovery(), pg_walfile_name(pg_current_wal_lsn()) as wal_file, ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int as timeline, (select count(*) from demo) as demo_rows"
    show_pg pg_ctl start -w -D pg-a/data -l pg-a/server.log
    note "TIMELINE_SQL=\"$TIMELINE_SQL\""
    show_as "timeout 15 psql -h 127.0.0.1 -p $PG_A -U postgres -c \"\$TIMELINE_SQL\"" \
        timeout 15 psql -X -h 127.0.0.1 -p "$PG_A" -U postgres -c "$TIMELINE_SQL"
    note "pg-a is not in recovery (it thinks it is the primary), on timeline 1; pg-b is on 2:"
    show_as "timeout 15 psql -h 127.0.0.1 -p $PG_B -U postgres -c \"\$TIMELINE_SQL\"" \
        timeout 15 psql -X -h 127.0.0.1 -p "$PG_B" -U postgres -c "$TIMELINE_SQL"
    fenced_primary() { [[ "$(member_state "$1" 0)" == "primary up older_term" ]]; }
    wait_until 15 fenced_primary "$ADMIN_1" || fail "portal 1 does not show pg-a up and fenced: $(member_state "$ADMIN_1" 0)"
    wait_until 15 fenced_primary "$ADMIN_2" || fail "portal 2 does not show pg-a up and fenced: $(member_state "$ADMIN_2" 0)"
    show_status "$ADMIN_1" 1
    show_status "$ADMIN_2" 2
    note "Both portals see pg-a up and claiming primary, but on timeline 1, older than the"
    note "leader's 2: fenced (older_term), no traffic. Portal logs:"
    grep -H 'fenced\|split brain' pg/portal1.log pg/portal2.log | sed 's/^/     /' || true
    echo
    show_as "timeout 20 psql \"\$P2\" -At -c 'insert ... returning inet_server_port()'" "${PSQL[@]}" "$P2" -At -c \
        "insert into demo (note) values ('written through portal 2 with pg-a back') returning inet_server_port()"
    local admin
    for admin in "$ADMIN_1" "$ADMIN_2"; do
        [ "$(status_field "$admin" leader)" = pg-b ] || fail "a portal moved the leader to pg-a"
    done
    note "Writes still land on pg-b (port $PG_B); nothing goes to the stale pg-a."

    say "PostgreSQL step 5: portal 1 stops; the multi-host string goes on through portal 2"
    note "$ kill $PORTAL_PID_1   # portal 1 (SIGTERM: it drains and exits)"
    stop_pids "$PORTAL_PID_1"
    show_as "timeout 20 psql \"\$BOTH\" -At -c 'select inet_server_port(), pg_is_in_recovery()'" \
        "${PSQL[@]}" "$BOTH" -At -c 'select inet_server_port(), pg_is_in_recovery()'
    note "libpq found nothing on port $LISTEN_1, tried port $LISTEN_2 and reached pg-b through portal 2."
}

# ---- Patroni: etcd, Patroni, and portals that learn the members --------------

PT_SCOPE=portal-demo # Patroni's scope; also PostgreSQL's cluster_name
PT_SU_PASSWORD=portal-demo-su
PT_REPL_PASSWORD=portal-demo-repl
declare -A PT_PID=() # member name -> its Patroni agent's pid

# pt_yaml NAME PG_PORT API_PORT: a member's Patroni configuration, as the
# integration tests write it (tests/common/patroni.rs): etcd3 as the DCS,
# ttl 10 s and loop_wait 1 s, PostgreSQL and the REST API on loopback,
# passwords for TCP logins, its socket in its own directory.
pt_yaml() {
    local dir=$WORK/pt-$1
    cat <<EOF
scope: $PT_SCOPE
namespace: /service
name: $1
log:
  level: INFO
restapi:
  listen: 127.0.0.1:$3
  connect_address: 127.0.0.1:$3
etcd3:
  hosts: $ETCD_HOSTS
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
  listen: 127.0.0.1:$2
  connect_address: 127.0.0.1:$2
  data_dir: $dir/data
  bin_dir: $PGBIN
  pgpass: $dir/pgpass
  authentication:
    superuser:
      username: postgres
      password: $PT_SU_PASSWORD
    replication:
      username: replicator
      password: $PT_REPL_PASSWORD
    rewind:
      username: postgres
      password: $PT_SU_PASSWORD
  parameters:
    unix_socket_directories: '$dir'
    shared_buffers: 16MB
    max_connections: 60
    fsync: 'off'
    log_min_messages: warning
EOF
}

# start_patroni NAME: the member's Patroni agent in the background, as user
# postgres when we are root (PostgreSQL refuses root), in pt-NAME/.
start_patroni() {
    local dir=$WORK/pt-$1 cmd=("$PATRONI_BIN" "$WORK/pt-$1/patroni.yml") who=""
    if [ "$(id -u)" -eq 0 ]; then
        cmd=(setpriv --reuid=postgres --regid=postgres --init-groups -- "${cmd[@]}")
        who="   # as user postgres"
    fi
    printf '   $ %s\n' "$PATRONI_BIN pt-$1/patroni.yml >>pt-$1/patroni.log 2>&1 &$who"
    (cd "$dir" && exec "${cmd[@]}") </dev/null >>"$dir/patroni.log" 2>&1 &
    PT_PID[$1]=$!
    PATRONI_PIDS+=("$!")
}

# without PID ARRAY_NAME: removes PID from the named array (a process that
# is gone; its pid may be reused).
without() {
    local -n arr=$2
    local kept=() p
    for p in "${arr[@]}"; do
        [ "$p" = "$1" ] || kept+=("$p")
    done
    arr=("${kept[@]}")
}

# Patroni's REST API of the member whose API listens on $1: GET $2 answers 200.
pt_rest_ok() { "${CURL[@]}" -o /dev/null "http://127.0.0.1:$1$2"; }

# pt_streams_to API NAME: the member whose REST API is on port API lists a
# WAL receiver named NAME (Patroni names them after members) as streaming in
# its GET /patroni. Patroni's /replica check answers 200 before that, and a
# switchover to a replica that does not stream yet loses recent writes.
pt_streams_to() {
    "${CURL[@]}" "http://127.0.0.1:$1/patroni" | python3 -c '
import json, sys
replication = json.load(sys.stdin).get("replication") or []
sys.exit(not any(r.get("application_name") == sys.argv[1] and r.get("state") == "streaming"
                 for r in replication))' "$2"
}

# The Patroni part's summary of a portal's /status: the cluster's leader,
# leader_term and DCS view, then per member where it was learned from and
# where the portal reaches it.
pt_status_summary() {
    "${CURL[@]}" "http://127.0.0.1:$1/status" | python3 -c '
import json, sys
c = json.load(sys.stdin)["clusters"][0]
d = c["dcs"] or {}
print("leader=%s leader_term=%s epoch=%d" % (json.dumps(c["leader"]), json.dumps(c["leader_term"]), c["epoch"]))
print("dcs: source=%s state=%s leader=%s term=%s" % (
    d.get("source"), d.get("state"), json.dumps(d.get("leader")), json.dumps(d.get("term"))))
for m in c["members"]:
    fenced = " fenced=%s" % m["fenced"] if m.get("fenced") else ""
    print("  %s from=%s address=%s api=%s role=%-7s health=%-4s term=%s%s" % (
        m["name"], m["from"], m["address"], m["api"], m["role"], m["health"], m["term"] or "-", fenced))
'
}
show_pt_status() {
    printf '   $ curl -s http://127.0.0.1:%s/status   (portal %s, summarised)\n' "$1" "$2"
    pt_status_summary "$1" | sed 's/^/     /'
}

# pt_agreement ADMIN_PORT: "LEADER LEADER_TERM DCS_STATE DCS_LEADER DCS_TERM",
# what two portals of one configuration must agree on.
pt_agreement() {
    "${CURL[@]}" "http://127.0.0.1:$1/status" | python3 -c '
import json, sys
c = json.load(sys.stdin)["clusters"][0]
d = c["dcs"] or {}
# leader_term reads "3 (system 7713...)": the timeline, then its system.
term = (c["leader_term"] or "-").split()
system = term[2].rstrip(")") if len(term) > 2 else "-"
print(c["leader"], term[0], d.get("state"), d.get("leader"), d.get("term"), system)
'
}

# portals_agree LEADER LEADER_TERM_ABOVE DCS_TERM_ABOVE: both portals name
# LEADER with the same leader_term and dcs.term, above the given ones, and
# their DCS view is reachable and names LEADER too. Sets AGREED_LT, AGREED_DT.
portals_agree() {
    local a1 a2 leader lt state dleader dt system
    a1=$(pt_agreement "$ADMIN_1") && a2=$(pt_agreement "$ADMIN_2") || return 1
    [ "$a1" = "$a2" ] || return 1
    read -r leader lt state dleader dt system <<<"$a1"
    [ "$leader" = "$1" ] && [ "$dleader" = "$1" ] && [ "$state" = reachable ] || return 1
    [[ $lt =~ ^[0-9]+$ && $dt =~ ^[0-9]+$ ]] || return 1
    ((lt > $2 && dt > $3)) || return 1
    AGREED_LT=$lt
    AGREED_DT=$dt
}
expect_agreement() { # LEADER LEADER_TERM_ABOVE DCS_TERM_ABOVE
    wait_until 30 portals_agree "$@" ||
        fail "the portals do not agree on leader $1 (leader_term > $2, dcs.term > $3):" \
            "portal 1 says '$(pt_agreement "$ADMIN_1" || true)'," \
            "portal 2 says '$(pt_agreement "$ADMIN_2" || true)' (leader timeline dcs.state dcs.leader dcs.term system)"
    note "Both portals agree: leader $1, timeline $AGREED_LT, dcs.term $AGREED_DT (the DCS, reachable, names $1 too)."
}

# members_learned ADMIN_PORT: /status lists a and b, both learned from etcd,
# at the PostgreSQL and REST addresses Patroni published.
members_learned() {
    "${CURL[@]}" "http://127.0.0.1:$1/status" | python3 -c '
import json, sys
ms = json.load(sys.stdin)["clusters"][0]["members"]
want = {"a": ["dcs", "127.0.0.1:" + sys.argv[1], "127.0.0.1:" + sys.argv[2]],
        "b": ["dcs", "127.0.0.1:" + sys.argv[3], "127.0.0.1:" + sys.argv[4]]}
got = {m["name"]: [m["from"], m["address"], m["api"]] for m in ms}
sys.exit(0 if got == want else 1)
' "$PG_A" "$API_A" "$PG_B" "$API_B"
}

# replica_is ADMIN_PORT NAME: the portal's replicas are exactly [NAME].
replica_is() {
    "${CURL[@]}" "http://127.0.0.1:$1/status" |
        python3 -c 'import json, sys; sys.exit(json.load(sys.stdin)["clusters"][0]["replicas"] != [sys.argv[1]])' "$2"
}

# poll_pt_write NAME CONNINFO PORT SECONDS: one psql per attempt, an insert
# that returns the server's port, until one lands on the member whose
# PostgreSQL listens on PORT. Writes NAME.done (nanosecond time), NAME.tries,
# NAME.failed (the first line of each attempt that did not land there).
poll_pt_write() {
    local name=$1 conninfo=$2 want=$3 tries=0 out now first
    local deadline=$(($(date +%s%N) + $4 * 1000000000))
    while (($(date +%s%N) < deadline)); do
        tries=$((tries + 1))
        out=$("${PSQL[@]}" "$conninfo" -At -c \
            "insert into demo (note) values ('via ${name##*/}') returning inet_server_port()" 2>&1) || true
        now=$(date +%s%N)
        first=$(head -n 1 <<<"$out")
        if [ "$first" = "$want" ]; then
            echo "$now" >"$name.done"
            echo "$tries" >"$name.tries"
            return 0
        fi
        if [[ $first =~ ^[0-9]+$ ]]; then
            echo "written on port $first" >>"$name.failed"
        else
            echo "$first" >>"$name.failed"
        fi
        sleep 0.05
    done
    echo "$tries" >"$name.tries"
    return 1
}

# poll_report NAME N MEMBER REF_NS REF_TEXT [REF2_NS REF2_TEXT]: when the
# first write through portal N landed on MEMBER, relative to REF (and REF2).
poll_report() {
    local name=$1 n=$2 member=$3 done_at when also=""
    # relative NS TEXT: "N ms after TEXT" or "N ms before TEXT".
    relative() {
        local ms=$(((done_at - $1) / 1000000))
        if ((ms >= 0)); then echo "$ms ms after $2"; else echo "$((-ms)) ms before $2"; fi
    }
    if [ ! -f "$name.done" ]; then
        note "portal $n: no write landed on $member ($(cat "$name.tries") attempts)"
    else
        done_at=$(cat "$name.done")
        when=$(relative "$4" "$5")
        (($# < 7)) || also=", $(relative "$6" "$7")"
        note "portal $n: the first write on $member landed $when$also (attempt $(cat "$name.tries"))"
    fi
    if [ -f "$name.failed" ]; then
        note "  the attempts before it (first line of each, counted):"
        sort "$name.failed" | uniq -c | sed 's/^/       /'
    fi
}

patroni_demo() {
    PGBIN=$(pg_bindir)
    [ -n "$PGBIN" ] || fail "the PostgreSQL server is not installed (apt-get install postgresql)"
    if [ ! -x "$PATRONI_BIN" ] || [ ! -x "$PATRONICTL" ]; then
        fail "Patroni is not installed (apt-get install patroni)"
    fi
    command -v etcd >/dev/null 2>&1 || fail "etcd is not installed (apt-get install etcd-server)"
    export PATH="$PGBIN:$PATH"
    export PGCONNECT_TIMEOUT=20 # longer than db-rw's hold_timeout
    local E0 E1 E2 EP0 EP1 EP2 PG_A API_A PG_B API_B RO_1 RO_2
    read -r E0 E1 E2 EP0 EP1 EP2 PG_A API_A PG_B API_B LISTEN_1 RO_1 ADMIN_1 LISTEN_2 RO_2 ADMIN_2 \
        < <(free_ports 16)
    mkdir -p patroni etcd

    say "Patroni step 0: a three-member etcd cluster, where Patroni keeps the leader key"
    note "working directory: $WORK"
    local i args client peer cports=("$E0" "$E1" "$E2") pports=("$EP0" "$EP1" "$EP2")
    local initial="etcd0=http://127.0.0.1:$EP0,etcd1=http://127.0.0.1:$EP1,etcd2=http://127.0.0.1:$EP2"
    for i in 0 1 2; do
        client=http://127.0.0.1:${cports[i]}
        peer=http://127.0.0.1:${pports[i]}
        # As tests/common/etcd.rs: fast heartbeats and elections, a small
        # backend quota, logs on stderr.
        args=(--name "etcd$i" --data-dir "$WORK/etcd/etcd$i"
            --listen-client-urls "$client" --advertise-client-urls "$client"
            --listen-peer-urls "$peer" --initial-advertise-peer-urls "$peer"
            --initial-cluster "$initial" --initial-cluster-token "portal-demo-$$"
            --initial-cluster-state new --heartbeat-interval 50 --election-timeout 500
            --snapshot-count 10000 --quota-backend-bytes 104857600
            --logger zap --log-outputs stderr)
        printf '   $ etcd %s >etcd/etcd%s.log 2>&1 &\n' "${args[*]}" "$i"
        etcd "${args[@]}" </dev/null >"etcd/etcd$i.log" 2>&1 &
        ETCD_PIDS+=("$!")
    done
    for i in 0 1 2; do
        wait_until 30 timeout 10 etcdctl --endpoints="127.0.0.1:${cports[i]}" --dial-timeout=3s \
            --command-timeout=5s endpoint health || fail "etcd$i did not become healthy within 30 s"
    done
    note "etcd0: clients on 127.0.0.1:$E0, peers on 127.0.0.1:$EP0"
    note "etcd1: clients on 127.0.0.1:$E1, peers on 127.0.0.1:$EP1"
    note "etcd2: clients on 127.0.0.1:$E2, peers on 127.0.0.1:$EP2"
    ETCD_HOSTS="127.0.0.1:$E0,127.0.0.1:$E1,127.0.0.1:$E2"
    local ETCDCTL=(timeout 10 etcdctl --endpoints="$ETCD_HOSTS" --dial-timeout=3s --command-timeout=5s)
    note "ETCD=$ETCD_HOSTS"
    show_as "timeout 10 etcdctl --endpoints=\$ETCD endpoint status -w table" "${ETCDCTL[@]}" endpoint status -w table

    say "Patroni step 1: two Patroni members: a bootstraps and leads, b is cloned from a"
    note "PostgreSQL $("$PGBIN/postgres" --version | awk '{print $3}') from $PGBIN, Patroni $("$PATRONI_BIN" --version 2>&1 | awk '{print $2}')"
    pg_dir pt-a
    pg_dir pt-b
    pt_yaml a "$PG_A" "$API_A" >pt-a/patroni.yml
    pt_yaml b "$PG_B" "$API_B" >pt-b/patroni.yml
    note "pt-a/patroni.yml (pt-b/patroni.yml differs only in its name, ports and directory):"
    sed 's/^/     | /' pt-a/patroni.yml
    echo
    PT_DATADIRS+=("$WORK/pt-a/data" "$WORK/pt-b/data")
    local T0
    T0=$(date +%s)
    start_patroni a
    wait_until 90 pt_rest_ok "$API_A" /primary || fail "Patroni a did not bootstrap and lead within 90 s"
    note "(a leads after $(($(date +%s) - T0)) s: initdb, the leader key in etcd, PostgreSQL up)"
    T0=$(date +%s)
    start_patroni b
    wait_until 90 pt_rest_ok "$API_B" /replica || fail "Patroni b did not come up as a replica within 90 s"
    wait_until 30 pt_streams_to "$API_A" b || fail "b does not stream from a"
    note "(b runs as a replica after $(($(date +%s) - T0)) s: pg_basebackup from a, then streaming)"
    note "a: PostgreSQL on 127.0.0.1:$PG_A, Patroni REST API on 127.0.0.1:$API_A"
    note "b: PostgreSQL on 127.0.0.1:$PG_B, Patroni REST API on 127.0.0.1:$API_B"
    show_as "timeout 30 patronictl -c pt-a/patroni.yml list" timeout 30 "$PATRONICTL" -c pt-a/patroni.yml list
    echo
    note "Patroni's keys in etcd; each member key holds the member's conn_url and api_url:"
    etcd_keys() { "${ETCDCTL[@]}" get --prefix --keys-only "$1" | sed '/^$/d'; }
    show_as "timeout 10 etcdctl --endpoints=\$ETCD get --prefix --keys-only /service/$PT_SCOPE/" \
        etcd_keys "/service/$PT_SCOPE/"
    show_as "timeout 10 etcdctl --endpoints=\$ETCD get --print-value-only /service/$PT_SCOPE/members/b" \
        "${ETCDCTL[@]}" get --print-value-only "/service/$PT_SCOPE/members/b"

    say "Patroni step 2: two portals with no members list: they learn a and b from etcd"
    write_pt_config() { # FILE RW_PORT RO_PORT ADMIN_PORT
        cat >"$1" <<EOF
admin:
  listen: 127.0.0.1:$4
certs_dir: ../certs
shutdown:
  drain_timeout: 1s
clusters:
  - name: db
    protocol: postgres
    dcs:
      etcd:
        endpoints: ["127.0.0.1:$E0", "127.0.0.1:$E1", "127.0.0.1:$E2"]
        prefix: /service
        scope: $PT_SCOPE
        timeout: 2s
    probe:
      check: patroni
      interval: 500ms
      fast_interval: 50ms
      timeout: 1s
      rise: 2
      fall: 2
    # No members: the portal learns them from Patroni's member keys in etcd.
    endpoints:
      - name: db-rw
        listen: 127.0.0.1:$2
        route: leader
        tls: auto
        hold_timeout: 15s
      - name: db-ro
        listen: 127.0.0.1:$3
        route: replicas
        tls: auto
        hold_timeout: 10s
EOF
    }
    write_pt_config patroni/portal1.yaml "$LISTEN_1" "$RO_1" "$ADMIN_1"
    write_pt_config patroni/portal2.yaml "$LISTEN_2" "$RO_2" "$ADMIN_2"
    note "patroni/portal1.yaml (portal2.yaml differs only in its ports $LISTEN_2, $RO_2 and $ADMIN_2):"
    sed 's/^/     | /' patroni/portal1.yaml
    echo
    show "$PORTAL" check -c patroni/portal1.yaml
    start_portals patroni
    note "portal 1: TLS on 127.0.0.1:$LISTEN_1 (db-rw) and 127.0.0.1:$RO_1 (db-ro), admin on 127.0.0.1:$ADMIN_1"
    note "portal 2: TLS on 127.0.0.1:$LISTEN_2 (db-rw) and 127.0.0.1:$RO_2 (db-ro), admin on 127.0.0.1:$ADMIN_2"
    wait_until 15 members_learned "$ADMIN_1" || fail "portal 1 did not learn a and b from etcd"
    wait_until 15 members_learned "$ADMIN_2" || fail "portal 2 did not learn a and b from etcd"
    expect_agreement a 0 0
    local LT=$AGREED_LT DT=$AGREED_DT
    wait_until 15 replica_is "$ADMIN_1" b || fail "portal 1 does not route db-ro to b"
    wait_until 15 replica_is "$ADMIN_2" b || fail "portal 2 does not route db-ro to b"
    show_pt_status "$ADMIN_1" 1
    show_pt_status "$ADMIN_2" 2
    note "Every member is \"from\": \"dcs\", at the address of its conn_url and the REST API of its api_url;"
    note "dcs.term is the create revision of the leader key, which etcd shows too:"
    leader_key() { "${ETCDCTL[@]}" get "/service/$PT_SCOPE/leader" -w fields | grep -E '"(CreateRevision|Value)"'; }
    show_as "timeout 10 etcdctl --endpoints=\$ETCD get /service/$PT_SCOPE/leader -w fields | grep -E '\"(CreateRevision|Value)\"'" \
        leader_key

    local AUTH="user=postgres password=$PT_SU_PASSWORD dbname=postgres"
    local TLS="sslmode=verify-full sslrootcert=certs/ca.crt"
    local P1="host=localhost port=$LISTEN_1 $TLS $AUTH"
    local P2="host=localhost port=$LISTEN_2 $TLS $AUTH"
    local R1="host=localhost port=$RO_1 $TLS $AUTH"
    local R2="host=localhost port=$RO_2 $TLS $AUTH"
    PSQL=(timeout 30 psql -X -w)
    local WHERE="select inet_server_port(), pg_is_in_recovery()"

    say "Patroni step 3: psql through both portals, TLS verified against the portal's CA"
    note "P1=\"$P1\""
    note "P2=\"$P2\"   (R1, R2: the same on the db-ro ports $RO_1 and $RO_2)"
    show_as "timeout 30 psql \"\$P1\" -c 'create table demo (...)' -c 'insert ...' -c '$WHERE'" \
        "${PSQL[@]}" "$P1" -c \
        "create table demo (id serial primary key, note text, at_port int default inet_server_port())" \
        -c "insert into demo (note) values ('written through portal 1')" -c "$WHERE"
    show_as "timeout 30 psql \"\$P2\" -c 'insert ...' -c '$WHERE'" "${PSQL[@]}" "$P2" \
        -c "insert into demo (note) values ('written through portal 2')" -c "$WHERE"
    local out
    for out in "$P1" "$P2"; do
        [ "$("${PSQL[@]}" "$out" -At -c "$WHERE")" = "$PG_A|f" ] || fail "a write session did not reach a (port $PG_A)"
    done
    note "Both run on a (port $PG_A), not in recovery: the leader. The db-ro endpoints reach the replica b:"
    replica_has_rows() { [ "$("${PSQL[@]}" "$R1" -At -c 'select count(*) from demo')" = 2 ]; }
    wait_until 15 replica_has_rows || fail "the replica b did not show the two rows through db-ro"
    show_as "timeout 30 psql \"\$R1\" -c '$WHERE, (select count(*) from demo) as demo_rows'" \
        "${PSQL[@]}" "$R1" -c "$WHERE, (select count(*) from demo) as demo_rows"
    show_as "timeout 30 psql \"\$R2\" -At -c '$WHERE'" "${PSQL[@]}" "$R2" -At -c "$WHERE"
    [ "$("${PSQL[@]}" "$R2" -At -c "$WHERE")" = "$PG_B|t" ] || fail "db-ro of portal 2 did not reach b (port $PG_B)"

    say "Patroni step 4: patronictl switchover from a to b"
    note "(writers start through both portals just before the switchover: one psql per attempt,"
    note " an insert returning inet_server_port(), until one lands on b, port $PG_B)"
    local T_START T_RET POLL_1 POLL_2 sw_out sw_status=0 ok=1
    T_START=$(date +%s%N)
    poll_pt_write patroni/switch1 "$P1" "$PG_B" 60 &
    POLL_1=$!
    PIDS+=("$POLL_1")
    poll_pt_write patroni/switch2 "$P2" "$PG_B" 60 &
    POLL_2=$!
    PIDS+=("$POLL_2")
    printf '   $ %s\n' "timeout 60 patronictl -c pt-a/patroni.yml switchover --leader a --candidate b --force"
    sw_out=$(timeout 60 "$PATRONICTL" -c pt-a/patroni.yml switchover --leader a --candidate b --force 2>&1) ||
        sw_status=$?
    T_RET=$(date +%s%N)
    tr -d '\r' <<<"$sw_out" | sed 's/^/     /'
    if ((sw_status != 0)) || ! grep -q 'Successfully switched over' <<<"$sw_out"; then
        fail "patronictl switchover failed (exit status $sw_status)"
    fi
    note "(patronictl returned after $(((T_RET - T_START) / 1000000)) ms)"
    wait "$POLL_1" || ok=0
    wait "$POLL_2" || ok=0
    without "$POLL_1" PIDS
    without "$POLL_2" PIDS
    poll_report patroni/switch1 1 "b (port $PG_B)" "$T_RET" "patronictl returned" "$T_START" "it was started"
    poll_report patroni/switch2 2 "b (port $PG_B)" "$T_RET" "patronictl returned" "$T_START" "it was started"
    note "(times include starting psql and its TLS handshake; one run on this machine; a connection"
    note " that arrives while the portal has no leader is held up to hold_timeout, 15s on db-rw)"
    ((ok == 1)) || fail "a portal did not send a write to b after the switchover"
    expect_agreement b "$LT" "$DT"
    LT=$AGREED_LT
    DT=$AGREED_DT
    note "(Patroni restarts a as a replica of b; the portals take it back once it reports so)"
    wait_until 60 pt_rest_ok "$API_A" /replica || fail "a did not come back as a replica of b within 60 s"
    wait_until 30 pt_streams_to "$API_B" a || fail "a does not stream from b"
    wait_until 15 replica_is "$ADMIN_1" a || fail "portal 1 does not route db-ro to a"
    wait_until 15 replica_is "$ADMIN_2" a || fail "portal 2 does not route db-ro to a"
    show_as "timeout 30 patronictl -c pt-a/patroni.yml list" timeout 30 "$PATRONICTL" -c pt-a/patroni.yml list
    show_pt_status "$ADMIN_1" 1
    show_pt_status "$ADMIN_2" 2
    portals_agree b $((LT - 1)) $((DT - 1)) || fail "the portals no longer agree on leader b, leader_term $LT, dcs.term $DT"
    show_as "timeout 30 psql \"\$P2\" -At -c '$WHERE'" "${PSQL[@]}" "$P2" -At -c "$WHERE"
    show_as "timeout 30 psql \"\$R1\" -At -c '$WHERE'" "${PSQL[@]}" "$R1" -At -c "$WHERE"
    note "Writes land on b (port $PG_B), the new leader; db-ro now reaches a (port $PG_A), a replica again."
    echo
    note "What portal 1 logged:"
    grep -E 'member (up|down)|leader (lost|elected)|dcs' patroni/portal1.log | tail -n 12 | sed 's/^/     /' || true

    say "Patroni step 5: kill -9 the leader b: its Patroni agent and its PostgreSQL"
    local PM_B T_KILL T_PROMOTED
    mapfile -t PM_B < <(frozen_postmaster_pids "$WORK/pt-b/data")
    ((${#PM_B[@]} > 0)) || fail "found no postmaster running on pt-b/data"
    note "$ kill -STOP ${PM_B[0]}; kill -9 ${PT_PID[b]} ${PM_B[*]}   # b's Patroni agent, its postmaster (${PM_B[0]}, frozen first) and the postmaster's children"
    T_KILL=$(date +%s%N)
    kill9_wait "${PT_PID[b]}" "${PM_B[@]}"
    without "${PT_PID[b]}" PATRONI_PIDS
    note "(writers start through both portals right after the kill, until a write lands on a, port $PG_A;"
    note " Patroni on a promotes only once b's leader key expires: ttl 10 s)"
    poll_pt_write patroni/fail1 "$P1" "$PG_A" 90 &
    POLL_1=$!
    PIDS+=("$POLL_1")
    poll_pt_write patroni/fail2 "$P2" "$PG_A" 90 &
    POLL_2=$!
    PIDS+=("$POLL_2")
    wait_until 90 pt_rest_ok "$API_A" /primary || fail "Patroni did not promote a within 90 s of the kill"
    T_PROMOTED=$(date +%s%N)
    note "a's REST API answered GET /primary with 200 $(((T_PROMOTED - T_KILL) / 1000000)) ms after the kill"
    ok=1
    wait "$POLL_1" || ok=0
    wait "$POLL_2" || ok=0
    without "$POLL_1" PIDS
    without "$POLL_2" PIDS
    poll_report patroni/fail1 1 "a (port $PG_A)" "$T_KILL" "the kill" "$T_PROMOTED" "a answered /primary"
    poll_report patroni/fail2 2 "a (port $PG_A)" "$T_KILL" "the kill" "$T_PROMOTED" "a answered /primary"
    if [ "$(cat patroni/fail1.tries)" = 1 ] && [ "$(cat patroni/fail2.tries)" = 1 ]; then
        note "(attempt 1 each: the portals held those first connections, TLS done, while there was no"
        note " leader, and sent them to a once its probe confirmed it; db-rw's hold_timeout is 15s,"
        note " longer than Patroni's ttl of 10 s)"
    fi
    ((ok == 1)) || fail "a portal did not send a write to a after the failover"
    expect_agreement a "$LT" "$DT"
    show_pt_status "$ADMIN_1" 1
    show_pt_status "$ADMIN_2" 2
    show_as "timeout 30 patronictl -c pt-a/patroni.yml list" timeout 30 "$PATRONICTL" -c pt-a/patroni.yml list
    local ROWS="select note, at_port, count(*) as rows from demo group by note, at_port order by min(id)"
    note "ROWS=\"$ROWS\""
    show_as "timeout 30 psql \"\$P1\" -c 'insert ...' -c \"\$ROWS\"" "${PSQL[@]}" "$P1" \
        -c "insert into demo (note) values ('written through portal 1 after the failover')" -c "$ROWS"
    note "Every row is still there: written on a (port $PG_A), on b (port $PG_B) after the switchover"
    note "and streamed to a, then on a again; at_port says where each was written."

    say "Patroni step 6: portal 2 dies; the multi-host string goes on through portal 1"
    local BOTH="host=localhost,localhost port=$LISTEN_2,$LISTEN_1 target_session_attrs=read-write $TLS $AUTH"
    note "$ kill -9 $PORTAL_PID_2   # portal 2"
    kill9_wait "$PORTAL_PID_2"
    without "$PORTAL_PID_2" PIDS
    show_refused "curl -sS -m 5 http://127.0.0.1:$ADMIN_2/ready" curl -sS -m 5 "http://127.0.0.1:$ADMIN_2/ready"
    note "BOTH=\"$BOTH\""
    note "(portal 2 is named first, so libpq has to skip it)"
    show_as "timeout 30 psql \"\$BOTH\" -At -c 'insert ... returning inet_server_port(), pg_is_in_recovery()'" \
        "${PSQL[@]}" "$BOTH" -At -c \
        "insert into demo (note) values ('written through BOTH') returning inet_server_port(), pg_is_in_recovery()"
    [ "$("${PSQL[@]}" "$BOTH" -At -c "$WHERE")" = "$PG_A|f" ] || fail "the multi-host string did not reach a through portal 1"
    note "libpq found nothing on port $LISTEN_2, tried port $LISTEN_1 and wrote on a through portal 1."
}

case $MODE in
redis) redis_demo ;;
postgres) postgres_demo ;;
patroni) patroni_demo ;;
all)
    redis_demo
    say "Stopping the Redis part (portals and servers)"
    stop_pids "${PIDS[@]}"
    PIDS=()
    postgres_demo
    say "Stopping the PostgreSQL part (portals and servers)"
    stop_pids "${PIDS[@]}"
    PIDS=()
    for data in "${PG_DATADIRS[@]}"; do
        as_pg pg_ctl stop -m fast -w -t 30 -D "$data" >/dev/null 2>&1 || true
    done
    PG_DATADIRS=()
    patroni_demo
    ;;
esac

say "Done in $(($(date +%s) - STARTED)) s; stopping the portals and servers"
