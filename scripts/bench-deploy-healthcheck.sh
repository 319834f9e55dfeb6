#!/usr/bin/env bash
# How long `flotilla deploy` takes to return for a new service of three demo-app replicas
# (process driver, published through the mesh) whose health check has Compose's default timing:
# `interval: 30s`, default timeout and retries, no start_period, no start_interval. `deploy`
# returns once every replica is healthy and every node's mesh routes it, so the figure is how
# long the first probe takes to pass. One `flotilla up` serves all runs; each run deploys,
# times the deploy, checks the published port answers, removes the service and waits for its
# tasks to end.
#
#   FLOTILLA=target/debug/flotilla scripts/bench-deploy-healthcheck.sh
#
# Settings (environment): FLOTILLA (default: flotilla on PATH), RUNS (5), API_PORT (19460),
# PORT (19461, the published port), TIMEOUT (2m, per deploy).
set -euo pipefail

FLOTILLA=${FLOTILLA:-flotilla}
RUNS=${RUNS:-5}
API_PORT=${API_PORT:-19460}
PORT=${PORT:-19461}
TIMEOUT=${TIMEOUT:-2m}

workdir=$(mktemp -d)
# The CLI reaches this cluster through its own socket (file permissions are the credential).
export FLOTILLA_SOCKET="$workdir/flotilla.sock"
unset FLOTILLA_ADDR
up_pid=""
cleanup() {
    if [ -n "$up_pid" ]; then
        "$FLOTILLA" service rm bench-health >/dev/null 2>&1 || true
        sleep 2
        kill "$up_pid" 2>/dev/null || true
        wait "$up_pid" 2>/dev/null || true
    fi
    rm -rf "$workdir"
}
trap cleanup EXIT

"$FLOTILLA" up --data-dir "$workdir/data" --api-addr "127.0.0.1:$API_PORT" --socket "$FLOTILLA_SOCKET" \
    --mesh-bind 127.0.0.1 >"$workdir/up.log" 2>&1 &
up_pid=$!
for _ in $(seq 1 150); do
    if "$FLOTILLA" service ls >/dev/null 2>&1; then break; fi
    if ! kill -0 "$up_pid" 2>/dev/null; then
        echo "flotilla up exited:" >&2
        cat "$workdir/up.log" >&2
        exit 1
    fi
    sleep 0.2
done
"$FLOTILLA" service ls >/dev/null

cat >"$workdir/compose.yaml" <<EOF
services:
  bench-health:
    command: ["flotilla", "demo-app"]
    ports: ["$PORT:8080"]
    x-flotilla:
      healthcheck:
        http: /health
        interval: 30s
    deploy:
      replicas: 3
EOF

# Waits until the service's tasks have all ended (so the next run starts from nothing).
wait_gone() {
    for _ in $(seq 1 300); do
        if [ "$("$FLOTILLA" ps bench-health -o json 2>/dev/null || echo '[]')" = "[]" ]; then
            return 0
        fi
        sleep 0.2
    done
    echo "the tasks of bench-health did not end" >&2
    return 1
}

times=()
for run in $(seq 1 "$RUNS"); do
    start=$(date +%s%N)
    if ! "$FLOTILLA" deploy -f "$workdir/compose.yaml" --timeout "$TIMEOUT" >"$workdir/deploy.log" 2>&1; then
        echo "run $run: deploy failed:" >&2
        cat "$workdir/deploy.log" >&2
        exit 1
    fi
    end=$(date +%s%N)
    ms=$(((end - start) / 1000000))
    code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/" || true)
    echo "run $run: deploy returned after ${ms} ms; GET / on the published port: $code"
    times+=("$ms")
    "$FLOTILLA" service rm bench-health >/dev/null
    wait_gone
done

sorted=$(printf '%s\n' "${times[@]}" | sort -n)
min=$(echo "$sorted" | head -1)
max=$(echo "$sorted" | tail -1)
median=$(echo "$sorted" | sed -n "$(((RUNS + 1) / 2))p")
echo "deploy of 3 replicas, health check interval 30s: min ${min} ms, median ${median} ms, max ${max} ms over $RUNS run(s)"
