#!/usr/bin/env bash
# The benchmarks of BENCHMARKS.md, one command each:
#
#   bench/run.sh floor     fork + exec of a trivial binary, an fsync'd small file      (~10 s)
#   bench/run.sh latency   200 handoffs of handoff-httpd and of kvd, phase by phase    (~30 s)
#   bench/run.sh scale     1, 10, 100, 1,000, 5,000, 9,000 listeners                        (~3 min)
#   bench/run.sh micro     criterion: frames, one machine step, a simulated handoff    (~3 min)
#   bench/run.sh load      client impact under load: ours, nginx, HAProxy (bench/load.sh)
#   bench/run.sh all       all of the above, in this order
#
# Reports go to target/bench/*.md. HANDOFFS (latency, default 200), SCALE_COUNTS (default
# 1,10,100,1000,10000) and SCALE_HANDOFFS (default 20) change the sizes. Run on a quiet
# machine: the figures are wall-clock times on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/bench
mkdir -p "$out"

build() {
    cargo build --release -q -p handoff-bench -p handoff-demo -p handoff-supervisor
}

what=${1:-all}
case "$what" in
floor)
    build
    target/release/handoff-latency --floor --samples 500 --markdown "$out/floor.md"
    ;;
latency)
    build
    n=${HANDOFFS:-200}
    target/release/handoff-latency --daemon httpd --handoffs "$n" --markdown "$out/latency-httpd.md"
    target/release/handoff-latency --daemon kvd --handoffs "$n" --markdown "$out/latency-kvd.md"
    ;;
scale)
    build
    target/release/handoff-scale --counts "${SCALE_COUNTS:-1,10,100,1000,5000,9000}" \
        --handoffs "${SCALE_HANDOFFS:-20}" --markdown "$out/scale.md"
    ;;
micro)
    cargo bench -p handoff-proto 2>&1 | tee "$out/micro.txt" | grep -E '^[a-z_/ 0-9]+time:|^[a-z]' || true
    ;;
load)
    bench/load.sh
    ;;
all)
    for w in floor latency scale micro load; do
        "$0" "$w"
    done
    ;;
*)
    echo "usage: bench/run.sh floor|latency|scale|micro|load|all" >&2
    exit 2
    ;;
esac
