#!/usr/bin/env bash
# Releases side by side under the same load: Docker Swarm's `docker service update
# --update-order start-first` (4 replicas of flotilla-demo:latest) against Flotilla's rolling and
# blue-green releases of the same image on the docker driver. Each run sends constant-rate GETs
# with `flotilla bench load` through the published port while the release runs, and records
# failed requests (by kind) and the release's total duration.
#
#   FLOTILLA=target/debug/flotilla scripts/bench-swarm-vs-flotilla.sh
#
# Settings (environment): FLOTILLA (default: flotilla on PATH), RATE (200), LOAD_FOR (60s),
# SWARM_PORT (19080), FLOTILLA_PORT (19081), API_PORT (19450). Needs a Docker Engine; leaves a
# single-node swarm initialised only if one was not there before.
set -euo pipefail

FLOTILLA=${FLOTILLA:-flotilla}
RATE=${RATE:-200}
LOAD_FOR=${LOAD_FOR:-60s}
SWARM_PORT=${SWARM_PORT:-19080}
FLOTILLA_PORT=${FLOTILLA_PORT:-19081}
API_PORT=${API_PORT:-19450}
export FLOTILLA_ADDR="http://127.0.0.1:$API_PORT"

docker info >/dev/null
"$FLOTILLA" demo-image >/dev/null

workdir=$(mktemp -d)
up_pid=""
swarm_was_active=$(docker info --format '{{.Swarm.LocalNodeState}}')
cleanup() {
    docker service rm bench-web >/dev/null 2>&1 || true
    "$FLOTILLA" service rm web >/dev/null 2>&1 || true
    [ -n "$up_pid" ] && kill "$up_pid" 2>/dev/null && wait "$up_pid" 2>/dev/null || true
    if [ "$swarm_was_active" != "active" ]; then docker swarm leave --force >/dev/null 2>&1 || true; fi
    rm -rf "$workdir"
}
trap cleanup EXIT

# One measured release: load in the background, the release command in the foreground.
measure() { # name port command...
    local name=$1 port=$2; shift 2
    "$FLOTILLA" bench load --url "http://127.0.0.1:$port/" --rate "$RATE" --duration "$LOAD_FOR" -o json >"$workdir/$name.json" &
    local load=$!
    sleep 2
    local start end
    start=$(date +%s.%N)
    "$@" >"$workdir/$name.log" 2>&1
    end=$(date +%s.%N)
    wait "$load"
    local failed kinds
    failed=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["failed"])' "$workdir/$name.json")
    kinds=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["failures"] or "-")' "$workdir/$name.json")
    printf '| %s | %s | %s | %.1f |\n' "$name" "$failed" "$kinds" "$(echo "$end - $start" | bc)"
}

echo "| release | failed requests | failures by kind | duration (s) |"
echo "|---|---|---|---|"

# Swarm.
[ "$swarm_was_active" = "active" ] || docker swarm init >/dev/null
docker service create --detach=false --name bench-web --replicas 4 -p "$SWARM_PORT:8080" \
    --health-cmd "wget -qO- http://127.0.0.1:8080/health || exit 1" --health-interval 1s \
    flotilla-demo:latest flotilla demo-app --version v1 >/dev/null
sleep 5
measure swarm-start-first "$SWARM_PORT" docker service update --detach=false --update-order start-first \
    --args "flotilla demo-app --version v2" bench-web

# Flotilla.
"$FLOTILLA" up --data-dir "$workdir/flotilla" --api-addr "127.0.0.1:$API_PORT" --mesh-bind 127.0.0.1 >"$workdir/up.log" 2>&1 &
up_pid=$!
for _ in $(seq 60); do "$FLOTILLA" node ls >/dev/null 2>&1 && break; sleep 1; done
compose() { # version strategy
    cat >"$workdir/web.yaml" <<YAML
services:
  web:
    image: flotilla-demo:latest
    command: ["flotilla", "demo-app", "--version", "$1"]
    ports: ["$FLOTILLA_PORT:8080"]
    x-flotilla:
      healthcheck: {http: /health, interval: 1s}
      strategy: $2
      blue_green: {scale_down_delay: 5s}
    deploy:
      replicas: 4
      update_config: {order: start-first, monitor: 2s}
YAML
    echo "$workdir/web.yaml"
}
"$FLOTILLA" deploy -f "$(compose v1 rolling)" >/dev/null
measure flotilla-rolling "$FLOTILLA_PORT" "$FLOTILLA" deploy -f "$(compose v2 rolling)"
measure flotilla-blue-green "$FLOTILLA_PORT" "$FLOTILLA" deploy -f "$(compose v3 blue-green)"
