# shellcheck shell=bash
# Helpers shared by bench/run.sh (Redis) and bench/postgres.sh (PostgreSQL).
# Sourced, not run. Expects OUT to be set; sets TMP, PIDS, AT_EXIT and the
# cleanup traps. KEEP_LOGS: globs (relative to TMP) copied to $OUT/raw on exit.

log() { printf '# %s %s\n' "$(date +%T)" "$*" >&2; }
die() { log "FATAL: $*"; exit 1; }

# ---------------------------------------------------------------- cleanup
TMP=$(mktemp -d /tmp/portal-bench.XXXXXX)
PIDS=()    # every background process the script started
AT_EXIT=() # shell commands run first on exit (e.g. stopping daemonized servers)
KEEP_LOGS=${KEEP_LOGS:-"haproxy-*.log portal-*.log"}

stop_pid() { # pid: TERM, wait up to 5 s, then KILL; always reaps
  local pid=$1 i state
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do
    state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || true)
    [[ -z $state || $state == Z ]] && break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  local keep=() p
  for p in "${PIDS[@]}"; do [[ $p == "$pid" ]] || keep+=("$p"); done
  PIDS=("${keep[@]}")
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM ERR
  local p c g
  for c in "${AT_EXIT[@]}"; do eval "$c" >/dev/null 2>&1 || true; done
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  sleep 0.3
  for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  # Keep the proxies' own logs for a post-mortem.
  if [[ -d $OUT/raw ]]; then
    # shellcheck disable=SC2086 # $g is a glob
    for g in $KEEP_LOGS; do cp "$TMP"/$g "$OUT/raw/" 2>/dev/null || true; done
  fi
  rm -rf "$TMP"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'log "error at line $LINENO: $BASH_COMMAND"' ERR

# ---------------------------------------------------------------- helpers
USED_PORTS=" "
pick_port() { # VAR: a free loopback port below the ephemeral range, never handed out twice
  local p
  for _ in $(seq 200); do
    p=$((20000 + RANDOM % 12000))
    [[ $USED_PORTS == *" $p "* ]] && continue
    [[ -z $(ss -Htan "( sport = :$p or dport = :$p )") ]] || continue
    USED_PORTS+="$p "
    printf -v "$1" '%s' "$p"
    return 0
  done
  die "no free port found"
}

wait_until() { # seconds description command...: poll every 50 ms
  local secs=$1 what=$2 deadline
  shift 2
  deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "timed out after ${secs}s waiting for $what"
    sleep 0.05
  done
}

cpu_ticks() { # utime+stime of pid and its direct children, in clock ticks
  local total=0 p f
  for p in "$1" $(pgrep -P "$1" || true); do
    f=$(sed 's/^.*) //' "/proc/$p/stat" 2>/dev/null) || continue
    # after "pid (comm) ": field 1 = state, 12 = utime, 13 = stime
    total=$((total + $(awk '{print $12 + $13}' <<<"$f")))
  done
  echo "$total"
}

median() { sort -g | awk '{a[NR]=$1} END {if (NR == 0) print "nan"; else if (NR % 2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
minmax() { sort -g | awk 'function f(v) {return v >= 1000 ? sprintf("%.0f", v) : sprintf("%.3g", v)} NR==1{lo=$1} {hi=$1} END {if (NR) printf "%s–%s", f(lo), f(hi); else printf "n/a"}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (a+0 > 0 && b+0 > 0) {r = a / b; if (r >= 0.1) printf "%.2f", r; else printf "%.4f (1/%.0f)", r, 1 / r} else printf "—"}'; }
fmt() { awk -v v="$1" 'BEGIN {if (v == "—" || v == "nan") print "—"; else if (v+0 >= 1000) printf "%.0f", v; else printf "%.3g", v}'; }

# CPU used by processes outside the script's tree while it measures, as a
# share of all CPU time: busy jiffies from /proc/stat minus our own tree's
# (this shell's utime+stime plus that of every child it has reaped).
machine_ticks() { awk '/^cpu / {busy = $2 + $3 + $4 + $7 + $8 + $9; total = busy + $5 + $6; print busy, total}' /proc/stat; }
own_ticks() { sed 's/^.*) //' "/proc/$$/stat" | awk '{print $12 + $13 + $14 + $15}'; }
