#!/usr/bin/env bash
# The portal as a sidecar, in real containers (podman, rootful).
#
#   bash tests/container.sh            # build (or reuse) the images, then run the test
#   bash tests/container.sh images     # build (or reuse) the images only
#   FORCE=1 bash tests/container.sh    # rebuild every image (no layer cache), even if its tag exists
#
# Needs root. Installs what is missing (podman, runc, debootstrap,
# redis-tools, curl, python3) with apt-get. No image is pulled from a
# registry: the bookworm base is made with debootstrap from the Debian mirror
# apt already uses and imported as localhost/debian:bookworm-slim; the
# Dockerfile's build stage runs on localhost/rust:1-bookworm, that base plus
# gcc, the host's Rust toolchain (rustc --print sysroot) and the host's CA
# bundle (cargo reaches the crate registry with it as the host does). The
# repository's Dockerfile is built as it is, with those two bases passed as
# build arguments. An image whose tag exists is reused (the portal image's
# tag is a hash of the Dockerfile, Cargo.toml, Cargo.lock and src/). Build
# logs go to target/container/.
#
# Older portal images and build layers stay in podman's store: `podman image
# prune` removes the untagged ones.
#
# The test, on a podman network of its own, with every host port on 127.0.0.1
# (the admin listeners stay on the pods' loopback; the test asks them with
# podman exec ... curl):
#   a. pod A: a Redis container and the portal image in its network namespace
#      (--network container:..., as in a Kubernetes pod), reaching Redis on
#      127.0.0.1; redis-cli on the host, TLS verified against the CA the
#      portal image made, SET/GET through the published port.
#   c. the image's HEALTHCHECK (podman healthcheck run); uid 10001.
#   d. podman stop: the portal drains an open session, then exits 0.
#   b. pod B: a Redis replica of pod A's Redis and a second portal; both
#      portals run deploy/portal.yaml (both members, by name); a failover
#      (REPLICAOF NO ONE on the replica, the old primary made its replica)
#      seen through both: writes land on the new primary.
# Every container and the network are removed at the end, also on failure.
set -euo pipefail

MODE=${1:-all}
case $MODE in
all | images) ;;
-h | --help)
    sed -n '2,/^set -euo pipefail/{/^set/!p}' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit 0
    ;;
*)
    echo "usage: bash tests/container.sh [images]" >&2
    exit 2
    ;;
esac

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
STARTED=$(date +%s)
FORCE=${FORCE:-0}

BASE_IMAGE=localhost/debian:bookworm-slim
BUILDER_IMAGE=localhost/rust:1-bookworm
REDIS_IMAGE=localhost/portal-test-redis:bookworm
LOGS=$REPO/target/container

PASSED=()
say() { printf '\n== [%ss] %s\n' "$(($(date +%s) - STARTED))" "$*"; }
note() { printf '   %s\n' "$*"; }
pass() {
    PASSED+=("$*")
    printf '   ok: %s\n' "$*"
}
FAILED=""
fail() {
    FAILED=$*
    printf '\nFAIL: %s\n' "$*" >&2
    exit 1
}

# Prints a command as typed, runs it, indents its output; fails with its status.
show() {
    printf '   $ %s\n' "$*"
    local out status=0
    out=$("$@" 2>&1) || status=$?
    [ -z "$out" ] || tr -d '\r' <<<"$out" | sed 's/^/     /'
    return "$status"
}

# Like show, without the command's standard output (a container's id).
show_quiet() {
    printf '   $ %s\n' "$*"
    local out status=0
    out=$("$@" 2>&1 >/dev/null) || status=$?
    [ -z "$out" ] || tr -d '\r' <<<"$out" | sed 's/^/     /'
    return "$status"
}

# Runs "$@" quietly every 200 ms until it succeeds or $1 seconds pass.
wait_until() {
    local deadline=$(($(date +%s) + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        (($(date +%s) < deadline)) || return 1
        sleep 0.2
    done
}

[ "$(id -u)" -eq 0 ] || fail "run as root: rootful podman, debootstrap and apt-get need it"

install_missing() {
    local missing=()
    command -v podman >/dev/null 2>&1 || missing+=(podman)
    command -v runc >/dev/null 2>&1 || missing+=(runc)
    command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
    command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
    command -v curl >/dev/null 2>&1 || missing+=(curl)
    command -v python3 >/dev/null 2>&1 || missing+=(python3)
    ((${#missing[@]} > 0)) || return 0
    say "Installing ${missing[*]} (apt-get)"
    apt-get update -qq || echo "apt-get update failed; trying the install anyway" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}
install_missing

WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/portal-container.XXXXXX")
mkdir -p "$LOGS"

# runc and cgroupfs (no systemd here), and no default ulimits: with podman's
# default ones every container fails here ("error setting rlimit type 7:
# operation not permitted").
cat >"$WORK/containers.conf" <<'EOF'
[containers]
default_ulimits = []

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
export CONTAINERS_CONF=$WORK/containers.conf
PODMAN=(podman --runtime runc --cgroup-manager cgroupfs)

# The names of this run's containers (removed in reverse order) and network.
CONTAINERS=()
NETWORK=""

cleanup() {
    local status=$? name
    trap - EXIT
    set +e
    if ((status != 0)) && ((${#CONTAINERS[@]} > 0)); then
        for name in "${CONTAINERS[@]}"; do
            printf '\n--- last lines of podman logs %s\n' "$name" >&2
            "${PODMAN[@]}" logs --tail 25 "$name" >&2 2>&1
        done
    fi
    # Portals first: they live in their Redis container's network namespace.
    local i
    for ((i = ${#CONTAINERS[@]} - 1; i >= 0; i--)); do
        "${PODMAN[@]}" rm -f -t 0 "${CONTAINERS[i]}" >/dev/null 2>&1
    done
    [ -z "$NETWORK" ] || "${PODMAN[@]}" network rm -f "$NETWORK" >/dev/null 2>&1
    [ -d "$WORK/rootfs" ] && umount -R "$WORK/rootfs/proc" "$WORK/rootfs/sys" >/dev/null 2>&1
    rm -rf "$WORK"
    echo
    if ((status == 0)); then
        echo "PASS: ${#PASSED[@]} checks in $(($(date +%s) - STARTED)) s"
    else
        echo "FAIL after ${#PASSED[@]} passed checks ($(($(date +%s) - STARTED)) s): ${FAILED:-exit status $status}"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- images -----------------------------------------------------------------

image_exists() { [ "$FORCE" != 1 ] && "${PODMAN[@]}" image exists "$1"; }
# FORCE=1 rebuilds without podman's layer cache too.
NO_CACHE=()
[ "$FORCE" != 1 ] || NO_CACHE=(--no-cache)

# The first Debian (not security) mirror in apt's sources, or the security
# one (empty when there is none).
apt_uri() {
    local uri
    uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources \
        2>/dev/null | grep -v '^[[:space:]]*#' |
        grep -oE "https?://[^[:space:]]+/$1/?([[:space:]]|\$)" | head -n 1 | tr -d '[:space:]' || true)
    echo "${uri%/}"
}

build_base() {
    image_exists "$BASE_IMAGE" && {
        note "reusing $BASE_IMAGE"
        return
    }
    local mirror security root=$WORK/rootfs
    mirror=${DEBIAN_MIRROR:-$(apt_uri debian)}
    [ -n "$mirror" ] || fail "no Debian mirror in apt's sources: set DEBIAN_MIRROR to one"
    security=$(apt_uri debian-security)
    note "debootstrap --variant=minbase bookworm $root $mirror   (log: $LOGS/debootstrap.log)"
    debootstrap --variant=minbase bookworm "$root" "$mirror" >"$LOGS/debootstrap.log" 2>&1 ||
        fail "debootstrap failed; see $LOGS/debootstrap.log"
    # As the official slim image: no documentation, manual pages or
    # translations, now or from packages installed later; apt keeps no
    # downloaded packages.
    cat >"$root/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
    cat >"$root/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
    find "$root/usr/share/doc" -mindepth 1 ! -type d ! -name copyright -delete
    find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
    rm -rf "$root"/usr/share/{man,groff,info,lintian,linda}/*
    find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
    rm -f "$root/etc/apt/sources.list"
    {
        printf 'Types: deb\nURIs: %s\nSuites: bookworm bookworm-updates\nComponents: main\n' "$mirror"
        printf 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n'
        if [ -n "$security" ]; then
            printf '\nTypes: deb\nURIs: %s\nSuites: bookworm-security\nComponents: main\n' "$security"
            printf 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n'
        fi
    } >"$root/etc/apt/sources.list.d/debian.sources"
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
        "$root"/var/log/* "$root/etc/resolv.conf" "$root/etc/hostname"
    note "tar -C $root -c . | podman import - $BASE_IMAGE"
    tar --numeric-owner -C "$root" --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' -c . |
        "${PODMAN[@]}" import --change 'CMD ["bash"]' - "$BASE_IMAGE" >"$LOGS/import.log" 2>&1 ||
        fail "podman import failed; see $LOGS/import.log"
    rm -rf "$root"
}

build_builder() {
    image_exists "$BUILDER_IMAGE" && {
        note "reusing $BUILDER_IMAGE"
        return
    }
    local sysroot
    sysroot=$(rustc --print sysroot 2>/dev/null) || fail "the builder image needs the host's Rust toolchain: rustc not found"
    local ca=/etc/ssl/certs/ca-certificates.crt
    [ -f "$ca" ] || fail "the builder image takes the host's CA bundle: $ca not found"
    note "podman build -f tests/container/builder.Containerfile -v $sysroot:/mnt/rust:ro \\"
    note "    -v $ca:/mnt/host-ca.crt:ro -t $BUILDER_IMAGE   (log: $LOGS/builder.log)"
    "${PODMAN[@]}" build --network host --pull=never "${NO_CACHE[@]}" -f tests/container/builder.Containerfile \
        --build-arg BASE_IMAGE="$BASE_IMAGE" -v "$sysroot:/mnt/rust:ro" -v "$ca:/mnt/host-ca.crt:ro" \
        -t "$BUILDER_IMAGE" tests/container \
        >"$LOGS/builder.log" 2>&1 || fail "building $BUILDER_IMAGE failed; see $LOGS/builder.log"
}

build_redis() {
    image_exists "$REDIS_IMAGE" && {
        note "reusing $REDIS_IMAGE"
        return
    }
    note "podman build -f tests/container/redis.Containerfile -t $REDIS_IMAGE   (log: $LOGS/redis.log)"
    "${PODMAN[@]}" build --network host --pull=never "${NO_CACHE[@]}" -f tests/container/redis.Containerfile \
        --build-arg BASE_IMAGE="$BASE_IMAGE" -t "$REDIS_IMAGE" tests/container \
        >"$LOGS/redis.log" 2>&1 || fail "building $REDIS_IMAGE failed; see $LOGS/redis.log"
}

# The portal image's tag: a hash of everything its build reads.
PORTAL_TAG=$({
    cat Dockerfile Cargo.toml Cargo.lock
    find src -type f -print0 | LC_ALL=C sort -z | xargs -0 cat
} | sha256sum | cut -c1-12)
PORTAL_IMAGE=localhost/portal:$PORTAL_TAG

build_portal() {
    if image_exists "$PORTAL_IMAGE"; then
        note "reusing $PORTAL_IMAGE"
    else
        local t0
        t0=$(date +%s)
        note "nice podman build --network host --format docker --build-arg BUILDER_IMAGE=$BUILDER_IMAGE \\"
        note "    --build-arg RUNTIME_IMAGE=$BASE_IMAGE -t $PORTAL_IMAGE .   (log: $LOGS/portal.log)"
        # --format docker: the OCI format has no HEALTHCHECK.
        nice "${PODMAN[@]}" build --network host --pull=never "${NO_CACHE[@]}" --format docker \
            --build-arg BUILDER_IMAGE="$BUILDER_IMAGE" --build-arg RUNTIME_IMAGE="$BASE_IMAGE" \
            -t "$PORTAL_IMAGE" . >"$LOGS/portal.log" 2>&1 || {
            tail -n 30 "$LOGS/portal.log" >&2
            fail "podman build of the Dockerfile failed; see $LOGS/portal.log"
        }
        note "built in $(($(date +%s) - t0)) s"
    fi
    "${PODMAN[@]}" tag "$PORTAL_IMAGE" localhost/portal:latest
}

say "Images (FORCE=1 rebuilds)"
build_base
build_builder
build_redis
build_portal
show "${PODMAN[@]}" images --filter reference=localhost/debian --filter reference=localhost/rust \
    --filter reference=localhost/portal-test-redis --filter reference=localhost/portal
pass "images: $BASE_IMAGE, $BUILDER_IMAGE, $REDIS_IMAGE, $PORTAL_IMAGE"

[ "$MODE" = images ] && exit 0

# ---- the test ---------------------------------------------------------------

# free_ports N: N distinct free loopback ports, all held open until printed.
free_ports() {
    python3 -c '
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
' "$1"
}

RUN_ID=pct$$
REDIS_A=$RUN_ID-redis-a     # pod A: Redis, the owner of the network namespace
PORTAL_A=$RUN_ID-portal-a   # pod A: the sidecar of parts a, c and d
PORTAL_A2=$RUN_ID-portal-a2 # pod A: the sidecar of part b
REDIS_B=$RUN_ID-redis-b     # pod B: the replica
PORTAL_B=$RUN_ID-portal-b   # pod B: its sidecar
read -r TLS_A TLS_B < <(free_ports 2)

CA=$WORK/certs/ca.crt
REDIS_CLI=(timeout 10 redis-cli --tls --cacert "$CA" -h localhost)

# Part a's configuration: the one member on the pod's loopback. The endpoint
# binds 0.0.0.0 so that the port published on the host's 127.0.0.1 reaches it;
# the admin listener stays on its default, 127.0.0.1:9090, where the image's
# HEALTHCHECK asks and where the test asks too (podman exec ... curl).
cat >"$WORK/single.yaml" <<'YAML'
certs_dir: certs
shutdown:
  drain_timeout: 15s
clusters:
  - name: cache
    protocol: redis
    probe: { interval: 250ms, fast_interval: 50ms, timeout: 500ms, rise: 2, fall: 2 }
    members:
      - { name: redis-a, address: 127.0.0.1:6379 }
    endpoints:
      - name: cache-rw
        listen: 0.0.0.0:7000
        route: leader
        tls: auto
YAML
# Part b runs deploy/portal.yaml as it is (the Dockerfile's example): members
# redis-a:6379 and redis-b:6379, the network aliases of the two Redis
# containers, resolved by podman's DNS, and the names the replicas use for
# their primary, so that each portal knows whom a replica follows.

# run_portal NAME POD CONFIG: the portal image in POD's network namespace,
# CONFIG at /etc/portal/portal.yaml and the certificates in /etc/portal/certs.
run_portal() {
    CONTAINERS+=("$1")
    show_quiet "${PODMAN[@]}" run -d --name "$1" --network "container:$2" \
        -v "$3:/etc/portal/portal.yaml:ro" -v "$WORK/certs:/etc/portal/certs:ro" "$PORTAL_IMAGE"
}
# admin CONTAINER PATH: GET from the portal's admin listener, inside its pod.
admin() { timeout 10 "${PODMAN[@]}" exec "$1" curl -fsS "http://127.0.0.1:9090$2"; }
# status_of CONTAINER PYTHON_EXPR [ARG]: the expression evaluated on the
# portal's /status (as s; ARG as sys.argv[2]).
status_of() {
    admin "$1" /status |
        python3 -c 'import json, sys; s = json.load(sys.stdin); print(eval(sys.argv[1]))' "$2" "${3:-}"
}
leader_is() { [ "$(status_of "$1" 's["clusters"][0]["leader"]')" = "$2" ]; }
# follows PORTAL MEMBER UPSTREAM: the portal sees MEMBER replicate from UPSTREAM.
follows() {
    [ "$(status_of "$1" '[m["upstream"] for m in s["clusters"][0]["members"] if m["name"] == sys.argv[2]][0]' "$2")" = "$3" ]
}
show_status() {
    printf '   $ podman exec %s curl -s http://127.0.0.1:9090/status   (summarised)\n' "$1"
    admin "$1" /status | python3 -c '
import json, sys
c = json.load(sys.stdin)["clusters"][0]
print("leader=%s epoch=%d" % (json.dumps(c["leader"]), c["epoch"]))
for m in c["members"]:
    print("  %-8s %-15s role=%-7s health=%-4s upstream=%s fenced=%s" % (m["name"], m["address"],
        m["role"], m["health"], json.dumps(m["upstream"]), json.dumps(m["fenced"])))
' | sed 's/^/     /'
}
# redis_in CONTAINER ARGS...: redis-cli inside a Redis container, on its loopback.
redis_in() { timeout 10 "${PODMAN[@]}" exec "$1" redis-cli "${@:2}"; }
# run_id_of ARGS...: the run_id in the INFO server answer of redis-cli ARGS.
run_id_of() { "$@" INFO server | tr -d '\r' | sed -n 's/^run_id://p'; }

say "Certificates: portal certs init, run by the portal image itself (as uid 10001)"
note "(podman schedules a HEALTHCHECK with a systemd timer; this machine runs no systemd, so"
note " every podman run of the image logs two errors about it; part c runs the check itself)"
mkdir -p "$WORK/certs" "$WORK/other-ca"
chown 10001 "$WORK/certs" "$WORK/other-ca"
show "${PODMAN[@]}" run --rm -v "$WORK/certs:/certs" "$PORTAL_IMAGE" \
    certs init --dir /certs --host localhost --host 127.0.0.1 || fail "portal certs init failed"
"${PODMAN[@]}" run --rm -v "$WORK/other-ca:/certs" "$PORTAL_IMAGE" \
    certs init --dir /certs --host localhost >/dev/null 2>&1 || fail "portal certs init (a second CA) failed"
show ls -ln "$WORK/certs"

say "Network: podman network create $RUN_ID (a bridge of its own, with DNS for the aliases)"
NETWORK=$RUN_ID
show_quiet "${PODMAN[@]}" network create "$NETWORK" || fail "podman network create failed"

# ---- a. pod A --------------------------------------------------------------

say "a. Pod A: Redis, and the portal in its network namespace"
CONTAINERS+=("$REDIS_A")
show_quiet "${PODMAN[@]}" run -d --name "$REDIS_A" --network "$NETWORK" --network-alias redis-a \
    -p "127.0.0.1:$TLS_A:7000" "$REDIS_IMAGE" || fail "the Redis container did not start"
wait_until 30 redis_in "$REDIS_A" PING || fail "redis-a does not answer PING"
run_portal "$PORTAL_A" "$REDIS_A" "$WORK/single.yaml" || fail "the portal container did not start"
note "(pod A's port 7000 is published on the host at 127.0.0.1:$TLS_A)"
wait_until 60 admin "$PORTAL_A" /ready || fail "portal A never became ready"
show "${PODMAN[@]}" exec "$PORTAL_A" curl -fsS http://127.0.0.1:9090/ready
show_status "$PORTAL_A"
show "${PODMAN[@]}" exec "$PORTAL_A" id || fail "podman exec id failed"
[ "$("${PODMAN[@]}" exec "$PORTAL_A" id -u):$("${PODMAN[@]}" exec "$PORTAL_A" id -g)" = 10001:10001 ] ||
    fail "the portal does not run as uid 10001, gid 10001"
pass "a: the portal runs as uid 10001 in pod A's network namespace and is ready"

show "${REDIS_CLI[@]}" -p "$TLS_A" SET container-test "hello from the host" || fail "SET through portal A failed"
out=$("${REDIS_CLI[@]}" -p "$TLS_A" GET container-test) || fail "GET through portal A failed"
show "${REDIS_CLI[@]}" -p "$TLS_A" GET container-test
[ "$out" = "hello from the host" ] || fail "GET through portal A returned '$out'"
[ "$(redis_in "$REDIS_A" GET container-test)" = "hello from the host" ] || fail "the key is not on redis-a"
pass "a: SET/GET with redis-cli --tls --cacert CA through 127.0.0.1:$TLS_A (the key is on redis-a)"

note "Redis sees the session from the pod's loopback (CLIENT INFO through the portal):"
out=$("${REDIS_CLI[@]}" -p "$TLS_A" CLIENT INFO) || fail "CLIENT INFO through portal A failed"
show "${REDIS_CLI[@]}" -p "$TLS_A" CLIENT INFO
grep -q 'addr=127\.0\.0\.1:[0-9]* laddr=127\.0\.0\.1:6379 ' <<<"$out" ||
    fail "the session does not reach Redis from and at 127.0.0.1"
pass "a: the portal reaches Redis on 127.0.0.1 inside the pod"

note "A client that trusts another CA is refused; one without TLS gets the portal's error:"
out=$(timeout 10 redis-cli --tls --cacert "$WORK/other-ca/ca.crt" -h localhost -p "$TLS_A" PING 2>&1 || true)
printf '   $ redis-cli --tls --cacert OTHER-CA/ca.crt -h localhost -p %s PING\n' "$TLS_A"
tr -d '\r' <<<"$out" | sed 's/^/     /'
[ "$out" != PONG ] && grep -q 'certificate verify failed' <<<"$out" || fail "a client with another CA was not refused"
out=$(timeout 10 redis-cli -h 127.0.0.1 -p "$TLS_A" PING 2>&1 || true)
printf '   $ redis-cli -h 127.0.0.1 -p %s PING\n' "$TLS_A"
tr -d '\r' <<<"$out" | sed 's/^/     /'
grep -q 'requires TLS' <<<"$out" || fail "a plaintext client did not get the TLS-required error"
pass "a: the CA is verified (another CA refused), plaintext refused"

# ---- c. the HEALTHCHECK ----------------------------------------------------

say "c. The image's HEALTHCHECK"
show "${PODMAN[@]}" inspect --format '{{json .Config.Healthcheck}}' "$PORTAL_A"
show "${PODMAN[@]}" healthcheck run "$PORTAL_A" || fail "podman healthcheck run: unhealthy"
show "${PODMAN[@]}" inspect --format '{{.State.Health.Status}}' "$PORTAL_A"
[ "$("${PODMAN[@]}" inspect --format '{{.State.Health.Status}}' "$PORTAL_A")" = healthy ] ||
    fail "the container is not healthy"
pass "c: podman healthcheck run: healthy"

# ---- d. podman stop drains -------------------------------------------------

say "d. podman stop: the portal drains an open session, then exits 0"
note "(a session blocked in BLPOP for 8 s through portal A; then podman stop -t 30)"
printf '   $ redis-cli --tls ... -p %s BLPOP drain-test 8 &\n' "$TLS_A"
timeout 30 redis-cli --tls --cacert "$CA" -h localhost -p "$TLS_A" BLPOP drain-test 8 >"$WORK/blpop.out" 2>&1 &
BLPOP_PID=$!
active() { [ "$(status_of "$PORTAL_A" 's["clusters"][0]["endpoints"][0]["active"]')" -ge 1 ]; }
wait_until 10 active || fail "the BLPOP session did not show on /status"
T0=$(date +%s%N)
printf '   $ podman stop -t 30 %s &\n' "$PORTAL_A"
"${PODMAN[@]}" stop -t 30 "$PORTAL_A" >"$WORK/stop.out" 2>&1 &
STOP_PID=$!
draining() { "${PODMAN[@]}" logs "$PORTAL_A" 2>&1 | grep -q 'shutting down'; }
wait_until 10 draining || fail "the portal did not log its shutdown"
# podman exec cannot enter a stopping container: another container in the
# pod asks, as a probe would.
printf '   $ podman run --rm --network container:%s --entrypoint curl PORTAL_IMAGE -s http://127.0.0.1:9090/ready\n' "$REDIS_A"
out=$(timeout 20 "${PODMAN[@]}" run --rm --network "container:$REDIS_A" --entrypoint curl "$PORTAL_IMAGE" \
    -s -w ' HTTP %{http_code}' http://127.0.0.1:9090/ready 2>/dev/null || true)
out=$(tr -d '\n' <<<"$out")
note "  $out"
[ "$out" = "draining HTTP 503" ] || fail "/ready did not answer 503 draining while draining"
out=$(timeout 10 redis-cli --tls --cacert "$CA" -h localhost -p "$TLS_A" PING 2>&1 || true)
printf '   $ redis-cli --tls ... -p %s PING   (while draining)\n' "$TLS_A"
tr -d '\r' <<<"$out" | sed 's/^/     /'
[ "$out" != PONG ] || fail "the draining portal accepted a new connection"
status=0
wait "$BLPOP_PID" || status=$?
T_BLPOP=$(date +%s%N)
note "BLPOP ended with exit status $status $(((T_BLPOP - T0) / 1000000)) ms after podman stop began, printing '$(tr -d '\r\n' <"$WORK/blpop.out")'"
((status == 0)) || fail "the open session did not end normally (exit status $status)"
! grep -qi 'error\|closed' "$WORK/blpop.out" || fail "the open session was cut"
wait "$STOP_PID" || fail "podman stop failed: $(cat "$WORK/stop.out")"
T1=$(date +%s%N)
note "podman stop returned after $(((T1 - T0) / 1000000)) ms (timeout 30 s)"
show "${PODMAN[@]}" inspect --format 'exit code {{.State.ExitCode}}, status {{.State.Status}}' "$PORTAL_A"
show bash -c "${PODMAN[*]} logs $PORTAL_A 2>&1 | tail -n 3"
[ "$("${PODMAN[@]}" inspect --format '{{.State.ExitCode}}' "$PORTAL_A")" = 0 ] ||
    fail "the portal container did not exit 0"
pass "d: podman stop: new connections refused, the open session finished, exit code 0"

# ---- b. two pods, a failover ----------------------------------------------

say "b. Pod B: a replica of redis-a and its portal; both portals run deploy/portal.yaml"
CONTAINERS+=("$REDIS_B")
show_quiet "${PODMAN[@]}" run -d --name "$REDIS_B" --network "$NETWORK" --network-alias redis-b \
    -p "127.0.0.1:$TLS_B:7000" "$REDIS_IMAGE" --replicaof redis-a 6379 ||
    fail "the replica's container did not start"
link_up() { redis_in "$1" INFO replication | grep -q '^master_link_status:up'; }
wait_until 30 link_up "$REDIS_B" || fail "redis-b did not connect to redis-a"
show bash -c "${PODMAN[*]} exec $REDIS_B redis-cli INFO replication | grep -E '^(role|master_host|master_port|master_link_status):'"
run_portal "$PORTAL_A2" "$REDIS_A" "$REPO/deploy/portal.yaml" || fail "portal A (part b) did not start"
run_portal "$PORTAL_B" "$REDIS_B" "$REPO/deploy/portal.yaml" || fail "portal B did not start"
note "(pod B's port 7000 is published on the host at 127.0.0.1:$TLS_B)"
wait_until 60 leader_is "$PORTAL_A2" redis-a || fail "portal A does not name redis-a the leader"
wait_until 60 leader_is "$PORTAL_B" redis-a || fail "portal B does not name redis-a the leader"
wait_until 30 follows "$PORTAL_A2" redis-b redis-a || fail "portal A does not see redis-b follow redis-a"
wait_until 30 follows "$PORTAL_B" redis-b redis-a || fail "portal B does not see redis-b follow redis-a"
show_status "$PORTAL_A2"
show_status "$PORTAL_B"
pass "b: both portals: leader redis-a, redis-b its replica"

show "${REDIS_CLI[@]}" -p "$TLS_A" SET before-a "through portal A" || fail "SET through portal A failed"
show "${REDIS_CLI[@]}" -p "$TLS_B" SET before-b "through portal B" || fail "SET through portal B failed"
replicated() { [ "$(redis_in "$REDIS_B" GET before-a)" = "through portal A" ] &&
    [ "$(redis_in "$REDIS_B" GET before-b)" = "through portal B" ]; }
wait_until 10 replicated || fail "the writes did not reach redis-b by replication"
show redis_in "$REDIS_B" MGET before-a before-b
pass "b: writes through both portals land on redis-a and replicate to redis-b"

say "b. Failover: REPLICAOF NO ONE on redis-b; redis-a becomes its replica"
show redis_in "$REDIS_B" REPLICAOF NO ONE || fail "REPLICAOF NO ONE failed"
show redis_in "$REDIS_A" REPLICAOF redis-b 6379 || fail "REPLICAOF redis-b 6379 on redis-a failed"
wait_until 30 leader_is "$PORTAL_A2" redis-b || fail "portal A does not name redis-b the leader"
wait_until 30 leader_is "$PORTAL_B" redis-b || fail "portal B does not name redis-b the leader"
wait_until 30 link_up "$REDIS_A" || fail "redis-a does not replicate from redis-b"
wait_until 30 follows "$PORTAL_A2" redis-a redis-b || fail "portal A does not see redis-a follow redis-b"
wait_until 30 follows "$PORTAL_B" redis-a redis-b || fail "portal B does not see redis-a follow redis-b"
show_status "$PORTAL_A2"
show_status "$PORTAL_B"
pass "b: both portals: leader redis-b, redis-a its replica"

RUN_ID_B=$(run_id_of redis_in "$REDIS_B")
note "redis-b's run_id: $RUN_ID_B"
write_after() { [ "$("${REDIS_CLI[@]}" -p "$1" SET "after-$1" "written after the failover")" = OK ]; }
for port in "$TLS_A" "$TLS_B"; do
    wait_until 30 write_after "$port" || fail "SET through 127.0.0.1:$port failed after the failover"
    show "${REDIS_CLI[@]}" -p "$port" SET "after-$port" "written after the failover"
    via=$(run_id_of "${REDIS_CLI[@]}" -p "$port")
    note "run_id seen through 127.0.0.1:$port: $via"
    [ "$via" = "$RUN_ID_B" ] || fail "127.0.0.1:$port does not lead to redis-b"
    [ "$(redis_in "$REDIS_B" GET "after-$port")" = "written after the failover" ] ||
        fail "the write through 127.0.0.1:$port is not on redis-b"
done
show redis_in "$REDIS_B" MGET before-a before-b "after-$TLS_A" "after-$TLS_B"
pass "b: after the failover, writes through both portals land on redis-b"

show "${PODMAN[@]}" healthcheck run "$PORTAL_B" || fail "podman healthcheck run $PORTAL_B: unhealthy"
pass "c: portal B healthy too"

say "The image"
show "${PODMAN[@]}" images "$PORTAL_IMAGE"
say "All checks passed"
for check in "${PASSED[@]}"; do note "PASS $check"; done
