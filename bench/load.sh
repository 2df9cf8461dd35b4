#!/usr/bin/env bash
# bench/load.sh: client impact of swaps under load (issue 7, part 2), side by side.
#
#   bench/load.sh                      # all four targets, about 3 minutes each
#   SWAPS=1000 TARGETS="kvd nginx" bench/load.sh
#
# Builds the release binaries, installs nginx and HAProxy from Debian packages if they are
# missing, then runs `loadgen` with the same load against each target in turn:
#
#   kvd      the reference supervisor (handoff-supervisor) with kvd; a swap is
#            `handoffctl handoff <fresh copy of kvd>`, then the wait for the old kvd's exit
#   httpd    the same with handoff-httpd (HTTP on the std driver)
#   nginx    an nginx binary upgrade: USR2, the new master and its workers up, WINCH and QUIT
#            to the old master, the wait for its exit
#   haproxy  a HAProxy master-worker reload: USR2 to the master, the new worker up, the wait
#            for the old worker's exit
#
# A swap command returns once the old process is gone, so every target's swap window spans the
# same thing: from the trigger to the last moment the old binary could touch a client.
#
# Writes target/bench/load.md (the side-by-side table) and keeps each run's raw output in
# target/bench/load-<target>.{txt,json,server.log}. Every server it starts runs under a
# `reaper` of its own (a child subreaper: daemonised and orphaned processes stay below it); on
# exit, the descendants of each recorded reaper pid are stopped, never anything by name.
#
# Environment (defaults): SWAPS (200), INTERVAL_MS (150), OPEN_RATE (500), CLOSED (8),
# WARMUP (2), COOLDOWN (2), TARGETS ("kvd httpd nginx haproxy"), NGINX_WORKERS (2); DUMP=1 also
# keeps every request in target/bench/load-<target>.dump (loadgen --dump).
set -euo pipefail

# ------------------------------------------------------------------------------------------
# Helpers, for both the script and its swap subcommands. Waits poll with a bound; the pause
# between two polls is a `read -t` on an idle pipe (no process started for each poll).

exec {SNOOZE_FD}<> <(:)
snooze() { read -rt "$1" -u "$SNOOZE_FD" || true; }
# Sets NOW to the time in milliseconds.
now_ms() {
    local t=${EPOCHREALTIME/[.,]/}
    NOW=$((t / 1000))
}
die() {
    echo "load.sh: $*" >&2
    exit 1
}

# Whether process $1 is alive (a zombie is not).
alive() {
    local s
    { read -r s < "/proc/$1/stat"; } 2> /dev/null || return 1
    s=${s##*) }
    [[ ${s:0:1} != Z && ${s:0:1} != X ]]
}

gone() { ! alive "$1"; }

# Sets KIDS to the children of process $1 (an array).
children() {
    KIDS=()
    { read -r -a KIDS < "/proc/$1/task/$1/children"; } 2> /dev/null || true
}

# Sets TREE to the descendants of process $1.
descendants() {
    TREE=()
    local todo=("$1") p
    while ((${#todo[@]})); do
        p=${todo[0]}
        todo=("${todo[@]:1}")
        children "$p"
        TREE+=("${KIDS[@]}")
        todo+=("${KIDS[@]}")
    done
}

# wait_for SECONDS WHAT COMMAND…: run COMMAND every 2 ms until it succeeds; fail after SECONDS.
wait_for() {
    local bound=$1 what=$2
    shift 2
    now_ms
    local end=$((NOW + bound * 1000))
    until "$@"; do
        now_ms
        ((NOW < end)) || die "timed out after ${bound} s waiting for $what"
        snooze 0.002
    done
}

# ------------------------------------------------------------------------------------------
# Swap subcommands (loadgen runs them through `sh -c`).

# ours-prepare DIR BIN NAME: a fresh copy of BIN as DIR/bins/NAME-v<n+1>, and the pid serving
# now; removes the copy before the serving one (outside the swap window).
ours_prepare() {
    local d=$1 bin=$2 name=$3 n
    n=$(< "$d/n")
    rm -f "$d/bins/$name-v$((n - 1))"
    cp "$bin" "$d/bins/$name-v$((n + 1))"
    echo $((n + 1)) > "$d/n"
    local st
    st=$("$d/handoffctl" --socket "$d/trig.sock" status)
    [[ $st =~ serving_pid=([0-9]+) ]] || die "no serving pid in: $st"
    echo "${BASH_REMATCH[1]}" > "$d/old.pid"
}

# ours-swap DIR NAME: hand off to the copy, then wait for the old daemon's exit.
ours_swap() {
    local d=$1 name=$2 n old
    n=$(< "$d/n")
    old=$(< "$d/old.pid")
    local out
    out=$("$d/handoffctl" --socket "$d/trig.sock" --timeout 30 handoff "$d/bins/$name-v$n") ||
        die "handoff to $name-v$n: $out"
    wait_for 30 "the old daemon $old to exit" gone "$old"
}

# nginx-swap DIR WORKERS: a binary upgrade, the documented way.
nginx_swap() {
    local d=$1 workers=$2 old new=
    read -r old < "$d/nginx.pid"
    [[ ! -e $d/nginx.pid.oldbin ]] || die "nginx.pid.oldbin exists: a previous upgrade is unfinished"
    kill -USR2 "$old"
    # The old master renames nginx.pid to nginx.pid.oldbin, then the new one writes nginx.pid:
    # either file may be missing or empty when read.
    new_master_up() {
        [[ -s $d/nginx.pid.oldbin ]] || return 1
        { read -r new < "$d/nginx.pid"; } 2> /dev/null || return 1
        [[ -n $new && $new != "$old" ]] && alive "$new"
    }
    wait_for 10 "the new nginx master" new_master_up
    workers_up() {
        children "$new"
        ((${#KIDS[@]} >= workers))
    }
    wait_for 10 "the new master's $workers workers" workers_up
    kill -WINCH "$old"
    kill -QUIT "$old"
    wait_for 60 "the old nginx master $old to exit" gone "$old"
}

# haproxy-swap DIR LOG: USR2 to the master; the new worker up and the master done reloading (its
# "Loading success." in LOG); the old workers gone. Even so, at one reload every ~150 ms HAProxy
# 2.6's master now and then (1 to 4 swaps in 200 here) takes a USR2 and does not reload: no
# "Reloading HAProxy", the signal caught (SigCgt), nothing pending or blocked. That swap fails
# after 10 s with the master's signal state in its message.
haproxy_swap() {
    local d=$1 log=$2 master old p loaded
    master=$(< "$d/master.pid")
    loaded=$(grep -c "Loading success" "$log" || true)
    children "$master"
    old=("${KIDS[@]}")
    ((${#old[@]})) || die "the HAProxy master $master has no worker"
    kill -USR2 "$master"
    new_worker_up() {
        local c
        children "$master"
        for c in "${KIDS[@]}"; do
            [[ " ${old[*]} " == *" $c "* ]] || return 0
        done
        return 1
    }
    if ! (wait_for 10 "a new HAProxy worker" new_worker_up); then
        # Why: the master's signal state (a USR2 pending and blocked, or gone).
        grep -E '^(State|SigPnd|ShdPnd|SigBlk|SigIgn|SigCgt)' "/proc/$master/status" | tr '\n' ' ' >&2
        die "no new HAProxy worker within 10 s of USR2"
    fi
    master_loaded() { (($(grep -c "Loading success" "$log") > loaded)); }
    wait_for 10 "the HAProxy master's \"Loading success.\"" master_loaded
    for p in "${old[@]}"; do
        wait_for 60 "the old HAProxy worker $p to exit" gone "$p"
    done
}

case "${1:-}" in
    ours-prepare) shift; ours_prepare "$@"; exit ;;
    ours-swap) shift; ours_swap "$@"; exit ;;
    nginx-swap) shift; nginx_swap "$@"; exit ;;
    haproxy-swap) shift; haproxy_swap "$@"; exit ;;
    "") ;;
    *) die "unknown subcommand $1" ;;
esac

# ------------------------------------------------------------------------------------------
# The run.

SELF=$(realpath "$0")
ROOT=$(cd "$(dirname "$SELF")/.." && pwd)
OUT=$ROOT/target/bench
REL=$ROOT/target/release
SWAPS=${SWAPS:-200}
INTERVAL_MS=${INTERVAL_MS:-150}
OPEN_RATE=${OPEN_RATE:-500}
CLOSED=${CLOSED:-8}
WARMUP=${WARMUP:-2}
COOLDOWN=${COOLDOWN:-2}
TARGETS=${TARGETS:-kvd httpd nginx haproxy}
NGINX_WORKERS=${NGINX_WORKERS:-2}
NGINX=/usr/sbin/nginx
HAPROXY=/usr/sbin/haproxy

mkdir -p "$OUT"
# Short: the supervisor's control socket path must fit in 108 bytes.
WORK=$(mktemp -d /tmp/hload.XXXXXX)
REAPERS=()
LOADGEN_PID=

# stop_tree PID: TERM every descendant of the reaper PID (a child subreaper: every process it
# started, daemonised or orphaned, stays below it), wait (bounded) for the reaper to exit (it does
# once all of them are gone), then KILL whatever is left.
stop_tree() {
    local r=$1 p
    alive "$r" || return 0
    descendants "$r"
    for p in "${TREE[@]}"; do kill -TERM "$p" 2> /dev/null || true; done
    now_ms
    local end=$((NOW + 20000))
    while alive "$r" && ((NOW < end)); do
        snooze 0.01
        now_ms
    done
    if alive "$r"; then
        echo "load.sh: the processes under reaper $r did not stop within 20 s; killing them" >&2
        descendants "$r"
        for p in "${TREE[@]}"; do kill -KILL "$p" 2> /dev/null || true; done
        kill -KILL "$r" 2> /dev/null || true
    fi
    wait "$r" 2> /dev/null || true
}

cleanup() {
    local g p
    if [[ -n ${LOADGEN_PID:-} ]] && alive "$LOADGEN_PID"; then
        # loadgen and the swap command it runs.
        descendants "$LOADGEN_PID"
        kill -TERM "$LOADGEN_PID" "${TREE[@]}" 2> /dev/null || true
        wait "$LOADGEN_PID" 2> /dev/null || true
    fi
    for g in "${REAPERS[@]}"; do stop_tree "$g"; done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start NAME LOG CMD…: CMD under a reaper of its own (in a session of its own, so a terminal's
# signals reach only us); sets $GROUP to the reaper's pid.
start() {
    local log=$2
    shift 2
    # --wait: should setsid have to fork (were we a group leader), it waits for the reaper, so
    # that the recorded pid stays an ancestor of everything started.
    setsid --wait "$REL/reaper" "$@" >> "$log" 2>&1 < /dev/null &
    GROUP=$!
    REAPERS+=("$GROUP")
}

echo "== building (release)"
(cd "$ROOT" && cargo build --release -q -p handoff-supervisor -p handoff-demo -p handoff-bench)

if [[ ! -x $NGINX || ! -x $HAPROXY ]]; then
    echo "== installing nginx and haproxy (Debian packages)"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx haproxy
fi
NGINX_V=$("$NGINX" -v 2>&1)
NGINX_V=${NGINX_V%%$'\n'*}
HAPROXY_V=$("$HAPROXY" -v)
HAPROXY_V=${HAPROXY_V%%$'\n'*}
HAPROXY_V=${HAPROXY_V% - https*}
[[ $HAPROXY_V == *"version 2.6"* ]] || echo "load.sh: warning: expected HAProxy 2.6, have: $HAPROXY_V" >&2

LOADGEN=(
    "$REL/loadgen" --open-rate "$OPEN_RATE" --closed "$CLOSED" --warmup "$WARMUP"
    --swaps "$SWAPS" --interval "$INTERVAL_MS" --cooldown "$COOLDOWN" --wait-ready 30
    # A bound on the whole run: no swap starts later than this.
    --max-secs $((WARMUP + SWAPS * 2 + 120))
)

# run_loadgen TARGET PROTO PORT EXTRA…
run_loadgen() {
    local t=$1 proto=$2 port=$3
    shift 3
    echo "== $t: $SWAPS swaps under load (load average: $(cut -d' ' -f1-3 /proc/loadavg))"
    # In the background, so that a signal to this script runs its trap at once.
    "${LOADGEN[@]}" --label "$t" --proto "$proto" --addr "127.0.0.1:$port" \
        --json "$OUT/load-$t.json" ${DUMP:+--dump "$OUT/load-$t.dump"} "$@" > "$OUT/load-$t.txt" 2>&1 &
    LOADGEN_PID=$!
    wait "$LOADGEN_PID" || echo "load.sh: loadgen failed for $t (see $OUT/load-$t.txt)" >&2
    LOADGEN_PID=
    sed -n '/^RESULT /!p' "$OUT/load-$t.txt"
}

# ours TARGET BIN LISTENER PROTO: the reference supervisor with BIN (kvd or handoff-httpd).
ours() {
    local t=$1 bin=$2 lname=$3 proto=$4 d=$WORK/$1 port
    port=$("$REL/loadgen" --print-free-port)
    mkdir -p "$d/data" "$d/bins"
    cp "$REL/handoffctl" "$d/handoffctl"
    cp "$bin" "$d/bins/$t-v0"
    echo 0 > "$d/n"
    cat > "$d/handoff.toml" <<EOF
control_socket = "$d/ctl.sock"
trigger_socket = "$d/trig.sock"
binary = "$d/bins/$t-v0"
args = ["--data", "$d/data", "--socket", "$d/ctl.sock"]
binary_dir = "$d/bins"
drain_grace_secs = 5
deadline_secs = 20

[[listeners]]
name = "$lname"
addr = "127.0.0.1:$port"
EOF
    local log=$OUT/load-$t.server.log
    : > "$log"
    start "$t" "$log" "$REL/handoff-supervisor" --config "$d/handoff.toml"
    local g=$GROUP
    serving() { "$d/handoffctl" --socket "$d/trig.sock" status 2> /dev/null | grep -q '^state=idle serving_pid=[0-9]'; }
    wait_for 30 "$t under the supervisor" serving
    run_loadgen "$t" "$proto" "$port" \
        --pre-swap-cmd "'$SELF' ours-prepare '$d' '$bin' '$t'" \
        --swap-cmd "'$SELF' ours-swap '$d' '$t'"
    stop_tree "$g"
}

nginx_target() {
    local d=$WORK/nginx port
    port=$("$REL/loadgen" --print-free-port)
    mkdir -p "$d/logs" "$d/tmp"
    cat > "$d/nginx.conf" <<EOF
# A binary upgrade needs a daemon: a master whose parent is still the one that started it
# ignores USR2 (the guard against re-executing the new binary). It stays under the reaper.
daemon on;
master_process on;
worker_processes $NGINX_WORKERS;
pid $d/nginx.pid;
error_log $d/logs/error.log notice;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_timeout 65s;
    keepalive_requests 100000;
    client_body_temp_path $d/tmp/body;
    proxy_temp_path $d/tmp/proxy;
    fastcgi_temp_path $d/tmp/fastcgi;
    uwsgi_temp_path $d/tmp/uwsgi;
    scgi_temp_path $d/tmp/scgi;
    server {
        listen 127.0.0.1:$port;
        location / { return 200 "ok\n"; }
    }
}
EOF
    local log=$OUT/load-nginx.server.log
    : > "$log"
    start nginx "$log" "$NGINX" -c "$d/nginx.conf" -p "$d/" -e "$d/logs/error.log"
    local g=$GROUP
    up() {
        [[ -s $d/nginx.pid ]] || return 1
        children "$(< "$d/nginx.pid")"
        ((${#KIDS[@]} >= NGINX_WORKERS))
    }
    wait_for 30 "nginx and its workers" up
    run_loadgen nginx http "$port" --swap-cmd "'$SELF' nginx-swap '$d' $NGINX_WORKERS"
    cp "$d/logs/error.log" "$OUT/load-nginx.error.log" 2> /dev/null || true
    stop_tree "$g"
}

haproxy_target() {
    local d=$WORK/haproxy port
    port=$("$REL/loadgen" --print-free-port)
    mkdir -p "$d"
    cat > "$d/haproxy.cfg" <<EOF
global
    maxconn 8000
    stats socket $d/admin.sock mode 600 level admin expose-fd listeners
    log stderr format short local0 notice

defaults
    mode http
    log global
    option http-keep-alive
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 30s

frontend fe
    bind 127.0.0.1:$port
    http-request return status 200 content-type text/plain string "ok"
EOF
    local log=$OUT/load-haproxy.server.log
    : > "$log"
    start haproxy "$log" "$HAPROXY" -W -S "$d/master.sock" -f "$d/haproxy.cfg"
    local g=$GROUP
    # The reaper's child is the master.
    master_up() {
        children "$g"
        ((${#KIDS[@]})) || return 1
        local m=${KIDS[0]}
        echo "$m" > "$d/master.pid"
        children "$m"
        ((${#KIDS[@]}))
    }
    wait_for 30 "the HAProxy master and its worker" master_up
    run_loadgen haproxy http "$port" --swap-cmd "'$SELF' haproxy-swap '$d' '$log'"
    stop_tree "$g"
}

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
echo "== $(nproc) cores, load average $LOAD_START; $NGINX_V; $HAPROXY_V"
for t in $TARGETS; do
    rm -f "$OUT/load-$t".*
    case $t in
        kvd) ours kvd "$REL/kvd" kv kvd ;;
        httpd)
            if [[ -x $REL/handoff-httpd ]]; then
                ours httpd "$REL/handoff-httpd" http http
            else
                echo "load.sh: no $REL/handoff-httpd; skipping httpd" >&2
            fi
            ;;
        nginx) nginx_target ;;
        haproxy) haproxy_target ;;
        *) die "unknown target $t" ;;
    esac
done

# ------------------------------------------------------------------------------------------
# The table.

# val FILE KEY: a value of loadgen's JSON object (flat: "key":value or "key":"text").
val() {
    local j
    j=$(< "$1")
    if [[ $j =~ \"$2\":\"([^\"]*)\" ]] || [[ $j =~ \"$2\":([^,\}]*) ]]; then
        echo "${BASH_REMATCH[1]}"
    else
        echo "?"
    fi
}

# f1 X: X with one decimal ("?" stays).
f1() {
    if [[ $1 =~ ^[0-9.]+$ ]]; then printf '%.1f' "$1"; else echo "$1"; fi
}

{
    echo "# Client impact of swaps under load"
    echo
    echo "$(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, load average at the start $LOAD_START, at the end $(cut -d' ' -f1-3 /proc/loadavg)."
    echo "Load on each target: $OPEN_RATE new connections/s with one request each (open-loop, o) and"
    echo "$CLOSED keep-alive clients (closed-loop, c); $SWAPS swaps, one every $INTERVAL_MS ms. $NGINX_V;"
    echo "$HAPROXY_V. A swap window runs from the trigger to the exit of the old process."
    echo "Latencies in ms, of answered requests: \"in swaps\" = requests overlapping a swap window,"
    echo "\"steady\" = the others. Errors per 1,000 swaps count every error of the run (the raw"
    echo "counts by kind in brackets)."
    echo "Resent: kvd's \"not executed, send it again\" (an end of stream before the answer, ERR"
    echo "retry), by protocol not an error. Stall: the longest time in which no request of that"
    echo "kind of client completed. Raw output: target/bench/load-<target>.txt and .json."
    echo
    echo "| target | swaps (failed) | swap p50 / max | open-loop errors / 1k swaps | closed-loop errors / 1k swaps | resent o / c | p99 in swaps o / c | max in swaps o / c | steady p99 o / c | longest stall o / c |"
    echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    for t in $TARGETS; do
        f=$OUT/load-$t.json
        [[ -s $f ]] || {
            echo "| $t | not run | | | | | | | | |"
            continue
        }
        v() { val "$f" "$1"; }
        kinds() { [[ $(v "$1") == - ]] || echo " ($(v "$1"))"; }
        echo "| $t | $(v swaps) ($(v swaps_failed)) | $(f1 "$(v swap_p50_ms)") / $(f1 "$(v swap_max_ms)") |" \
            "$(v open_loop_errors_per_1k_swaps)$(kinds open_loop_error_kinds) |" \
            "$(v closed_loop_errors_per_1k_swaps)$(kinds closed_loop_error_kinds) |" \
            "$(v open_loop_resent) / $(v closed_loop_resent) |" \
            "$(f1 "$(v open_loop_window_p99_ms)") / $(f1 "$(v closed_loop_window_p99_ms)") |" \
            "$(f1 "$(v open_loop_window_max_ms)") / $(f1 "$(v closed_loop_window_max_ms)") |" \
            "$(f1 "$(v open_loop_steady_p99_ms)") / $(f1 "$(v closed_loop_steady_p99_ms)") |" \
            "$(f1 "$(v open_loop_stall_ms)") / $(f1 "$(v closed_loop_stall_ms)") |"
    done
} > "$OUT/load.md"
echo
cat "$OUT/load.md"
