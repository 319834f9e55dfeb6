#!/usr/bin/env bash
# Releases side by side under the same load: Docker Swarm's `docker service update
# --update-order start-first` (4 replicas of flotilla-demo:latest) against Flotilla's rolling and
# blue-green releases of the same image on the docker driver. Each run sends constant-rate GETs
# with `flotilla bench load` while the release runs, and records failed requests (by kind) and
# the release's total duration.
#
# Swarm's own load balancing (the ingress routing mesh and service VIPs) needs the kernel's
# IPVS, which some VMs lack (no /proc/net/ip_vs). There the Swarm service runs with
# `--endpoint-mode dnsrr` on an attachable overlay network and the load runs in a container on
# that network (the same image carries `flotilla bench load`), addressing the service by name:
# Docker's DNS hands out the healthy tasks, which is Swarm's balancing without IPVS. With IPVS
# the load goes through the published port, as for Flotilla.
#
#   FLOTILLA=target/debug/flotilla scripts/bench-swarm-vs-flotilla.sh
#
# Settings (environment): FLOTILLA (default: flotilla on PATH), RATE (200), LOAD_FOR (60s),
# SWARM_PORT (19080), FLOTILLA_PORT (19081), API_PORT (19450). LOAD_FOR is an upper bound:
# each load is stopped (SIGTERM; it then reports) two seconds after its release returned.
# Needs a Docker Engine that is not part of a swarm: the script runs `docker swarm init` and
# always `docker swarm leave --force` when it ends, so it refuses to touch an existing swarm.
# Everything it creates on the engine carries this run's id (services, containers, networks:
# `bench-web-<pid>`, `bench-net-<pid>`, `bench-load-<pid>`, Flotilla's service `bench-<pid>`), and
# the cleanup removes only those, so other users of the engine keep theirs.
set -euo pipefail

FLOTILLA=${FLOTILLA:-flotilla}
RATE=${RATE:-200}
LOAD_FOR=${LOAD_FOR:-60s}
SWARM_PORT=${SWARM_PORT:-19080}
FLOTILLA_PORT=${FLOTILLA_PORT:-19081}
API_PORT=${API_PORT:-19450}
run=$$
swarm_service="bench-web-$run"
swarm_network="bench-net-$run"
load_container="bench-load-$run"
flotilla_service="bench-$run"

docker info >/dev/null
"$FLOTILLA" demo-image >/dev/null

workdir=$(mktemp -d)
# The CLI reaches this cluster through its own socket (file permissions are the credential).
export FLOTILLA_SOCKET="$workdir/flotilla.sock"
unset FLOTILLA_ADDR
up_pid=""
swarm_state=$(docker info --format '{{.Swarm.LocalNodeState}}')
if [ "$swarm_state" != "inactive" ]; then
    echo "this engine's swarm state is '$swarm_state'; the benchmark only runs on an engine outside any swarm" >&2
    exit 1
fi
swarm_initialised=""
gwbridge_existed=$(docker network ls -q --filter name='^docker_gwbridge$')
cleanup() {
    docker service rm "$swarm_service" >/dev/null 2>&1 || true
    if [ -n "$up_pid" ]; then
        "$FLOTILLA" service rm "$flotilla_service" >/dev/null 2>&1 || true
        sleep 3
        kill "$up_pid" 2>/dev/null || true
        wait "$up_pid" 2>/dev/null || true
    fi
    # Whatever this run's Flotilla left behind (its service name is unique to the run).
    docker ps -aq --filter "label=io.flotilla.service=$flotilla_service" | xargs -r docker rm -f >/dev/null 2>&1 || true
    docker network rm "flotilla-$flotilla_service" >/dev/null 2>&1 || true
    docker rm -f "$load_container" >/dev/null 2>&1 || true
    docker network rm "$swarm_network" >/dev/null 2>&1 || true
    if [ -n "$swarm_initialised" ]; then docker swarm leave --force >/dev/null 2>&1 || true; fi
    # `swarm init` creates docker_gwbridge; leave the engine's networks as they were.
    if [ -z "$gwbridge_existed" ]; then docker network rm docker_gwbridge >/dev/null 2>&1 || true; fi
    rm -rf "$workdir"
}
trap cleanup EXIT

# How the load reaches Swarm's service: a command prefix and a URL (see the top).
if [ -e /proc/net/ip_vs ]; then
    swarm_load=("$FLOTILLA")
    swarm_url="http://127.0.0.1:$SWARM_PORT/"
    swarm_net=(-p "$SWARM_PORT:8080")
else
    swarm_load=(docker run --rm --name "$load_container" --network "$swarm_network" flotilla-demo:latest)
    swarm_url="http://$swarm_service:8080/"
    swarm_net=(--network "$swarm_network" --endpoint-mode dnsrr)
fi

# One measured release: load in the background, the release command in the foreground.
measure() { # name url load-command... -- release-command...
    local name=$1 url=$2; shift 2
    local loader=()
    while [ "$1" != "--" ]; do loader+=("$1"); shift; done
    shift
    "${loader[@]}" bench load --url "$url" --rate "$RATE" --duration "$LOAD_FOR" -o json >"$workdir/$name.json" &
    local load=$!
    sleep 2
    local start end rc=0
    start=$(date +%s.%N)
    "$@" >"$workdir/$name.log" 2>&1 || rc=$?
    end=$(date +%s.%N)
    sleep 2
    # `docker run` does not pass SIGTERM on without a TTY; stop the container itself.
    if [ "${loader[0]}" = docker ]; then
        docker kill --signal TERM "$load_container" >/dev/null 2>&1 || true
    else
        kill -TERM "$load" 2>/dev/null || true
    fi
    wait "$load"
    if [ "$rc" != 0 ]; then
        echo "$name: the release command failed ($rc):" >&2
        cat "$workdir/$name.log" >&2
    fi
    local sent failed kinds
    sent=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["sent"])' "$workdir/$name.json")
    failed=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["failed"])' "$workdir/$name.json")
    kinds=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["failures"] or "-")' "$workdir/$name.json")
    printf '| %s | %s | %s | %s | %.1f |\n' "$name" "$sent" "$failed" "$kinds" "$(echo "$end - $start" | bc)"
}

echo "| release | requests sent | failed requests | failures by kind | duration (s) |"
echo "|---|---:|---:|---|---:|"

# Swarm.
swarm_initialised=1
docker swarm init --advertise-addr 127.0.0.1 >/dev/null
[ -e /proc/net/ip_vs ] || docker network create -d overlay --attachable "$swarm_network" >/dev/null
# The image's entrypoint is /flotilla, so the arguments start at the subcommand.
docker service create --detach=false --name "$swarm_service" --replicas 4 "${swarm_net[@]}" \
    --health-cmd "wget -qO- http://127.0.0.1:8080/health || exit 1" --health-interval 1s \
    flotilla-demo:latest demo-app --version v1 >/dev/null
sleep 5
measure swarm-start-first "$swarm_url" "${swarm_load[@]}" -- docker service update --detach=false --update-order start-first \
    --args "demo-app --version v2" "$swarm_service"
docker service rm "$swarm_service" >/dev/null

# Flotilla.
"$FLOTILLA" up --data-dir "$workdir/flotilla" --api-addr "127.0.0.1:$API_PORT" --socket "$FLOTILLA_SOCKET" --mesh-bind 127.0.0.1 >"$workdir/up.log" 2>&1 &
up_pid=$!
for _ in $(seq 60); do "$FLOTILLA" node ls >/dev/null 2>&1 && break; sleep 1; done
compose() { # version strategy
    cat >"$workdir/web.yaml" <<YAML
services:
  $flotilla_service:
    image: flotilla-demo:latest
    command: ["demo-app", "--version", "$1"]
    ports: ["$FLOTILLA_PORT:8080"]
    x-flotilla:
      ports: [{published: $FLOTILLA_PORT, protocol: http}]
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
for _ in $(seq 60); do
    "$FLOTILLA" bench load --url "http://127.0.0.1:$FLOTILLA_PORT/" --rate 20 --duration 1s -o json \
        | python3 -c 'import json,sys; sys.exit(json.load(sys.stdin)["failed"] != 0)' && break
    sleep 1
done
measure flotilla-rolling "http://127.0.0.1:$FLOTILLA_PORT/" "$FLOTILLA" -- "$FLOTILLA" deploy -f "$(compose v2 rolling)"
measure flotilla-blue-green "http://127.0.0.1:$FLOTILLA_PORT/" "$FLOTILLA" -- "$FLOTILLA" deploy -f "$(compose v3 blue-green)"
