#!/usr/bin/env bash
# Compares the Flotilla routing mesh with nginx as an HTTP reverse proxy, side by side:
# wrk against the backend directly, through nginx, and through the mesh (throughput at
# saturation), then one fixed rate against each (latency at moderate load). Loopback only.
#
#   FLOTILLA=target/release/flotilla scripts/bench-mesh-nginx.sh
#
# Settings (environment): FLOTILLA (default: flotilla on PATH), CONNECTIONS (32), THREADS (2),
# DURATION (10s), BACKEND_PORT / NGINX_PORT / MESH_PORT (18080-18082). BACKEND_CMD and MESH_CMD
# replace the commands that start the backend and the mesh. RATE is the fixed rate in
# requests/s (default: RATE_PERCENT, 30, percent of the direct wrk throughput); RATE=0 skips
# the fixed-rate phase. ROUNDS (1) repeats the wrk phase, alternating the targets' order.
# The fixed-rate phase uses `flotilla bench mesh --rate --target` (wrk has no fixed-rate mode).
set -euo pipefail

FLOTILLA=${FLOTILLA:-flotilla}
CONNECTIONS=${CONNECTIONS:-32}
THREADS=${THREADS:-2}
DURATION=${DURATION:-10s}
RATE=${RATE:-}
RATE_PERCENT=${RATE_PERCENT:-30}
ROUNDS=${ROUNDS:-1}
BACKEND_PORT=${BACKEND_PORT:-18080}
NGINX_PORT=${NGINX_PORT:-18081}
MESH_PORT=${MESH_PORT:-18082}
BACKEND_CMD=${BACKEND_CMD:-"$FLOTILLA demo-app --port $BACKEND_PORT"}
MESH_CMD=${MESH_CMD:-"$FLOTILLA bench mesh --serve 127.0.0.1:$BACKEND_PORT --listen 127.0.0.1:$MESH_PORT"}

if ! command -v nginx >/dev/null || ! command -v wrk >/dev/null; then
    echo "installing nginx and wrk from Debian" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y nginx-light wrk >/dev/null 2>&1 ||
        { apt-get update >/dev/null && apt-get install -y nginx-light wrk >/dev/null; }
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

workdir=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    rm -rf "$workdir"
}
trap cleanup EXIT

wait_port() {
    for _ in $(seq 1 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    echo "nothing listens on 127.0.0.1:$1" >&2
    exit 1
}

$BACKEND_CMD >"$workdir/backend.log" 2>&1 &
pids+=($!)
wait_port "$BACKEND_PORT"

cat >"$workdir/nginx.conf" <<EOF
worker_processes auto;
daemon off;
pid $workdir/nginx.pid;
error_log $workdir/nginx-error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    upstream backend {
        server 127.0.0.1:$BACKEND_PORT;
        keepalive 128;
    }
    server {
        listen 127.0.0.1:$NGINX_PORT;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$host;
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
        }
    }
}
EOF
"$NGINX" -p "$workdir" -c "$workdir/nginx.conf" &
pids+=($!)
wait_port "$NGINX_PORT"

$MESH_CMD >"$workdir/mesh.log" 2>&1 &
pids+=($!)
wait_port "$MESH_PORT"

# wrk prints latencies as 250.00us / 1.20ms / 1.00s; this turns them into milliseconds.
to_ms() {
    awk -v v="$1" 'BEGIN {
        if (v ~ /us$/) { sub(/us$/, "", v); printf "%.3f", v / 1000 }
        else if (v ~ /ms$/) { sub(/ms$/, "", v); printf "%.3f", v }
        else if (v ~ /s$/) { sub(/s$/, "", v); printf "%.3f", v * 1000 }
        else { printf "%s", v }
    }'
}

declare -A RPS P50 P99
targets=(direct:$BACKEND_PORT nginx:$NGINX_PORT mesh:$MESH_PORT)
for round in $(seq 1 "$ROUNDS"); do
    order=("${targets[@]}")
    if ((round % 2 == 0)); then
        order=(mesh:$MESH_PORT nginx:$NGINX_PORT direct:$BACKEND_PORT)
    fi
    for target in "${order[@]}"; do
        name=${target%%:*}
        port=${target##*:}
        url="http://127.0.0.1:$port/"
        wrk -t"$THREADS" -c"$CONNECTIONS" -d1s "$url" >/dev/null # warm-up
        out=$(wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency "$url")
        rps=$(awk '/^Requests\/sec:/ { print $2 }' <<<"$out")
        p50=$(to_ms "$(awk '$1 == "50%" { print $2 }' <<<"$out")")
        p99=$(to_ms "$(awk '$1 == "99%" { print $2 }' <<<"$out")")
        printf 'round %d %-7s %10.0f req/s  p50 %s ms  p99 %s ms\n' "$round" "$name" "$rps" "$p50" "$p99" >&2
        if grep -q "Non-2xx\|Socket errors" <<<"$out"; then
            echo "warning: $name had errors:" >&2
            grep "Non-2xx\|Socket errors" <<<"$out" >&2
        fi
        # Sums over the rounds; averaged below.
        RPS[$name]=$(awk -v a="${RPS[$name]:-0}" -v b="$rps" 'BEGIN { print a + b }')
        P50[$name]=$(awk -v a="${P50[$name]:-0}" -v b="$p50" 'BEGIN { print a + b }')
        P99[$name]=$(awk -v a="${P99[$name]:-0}" -v b="$p99" 'BEGIN { print a + b }')
    done
done
for name in direct nginx mesh; do
    RPS[$name]=$(awk -v a="${RPS[$name]}" -v n="$ROUNDS" 'BEGIN { print a / n }')
    P50[$name]=$(awk -v a="${P50[$name]}" -v n="$ROUNDS" 'BEGIN { printf "%.3f", a / n }')
    P99[$name]=$(awk -v a="${P99[$name]}" -v n="$ROUNDS" 'BEGIN { printf "%.3f", a / n }')
done

printf '\nsaturation (wrk -t%s -c%s, %s, mean of %s round(s))\n' "$THREADS" "$CONNECTIONS" "$DURATION" "$ROUNDS"
printf '%-8s %12s %10s %10s\n' target "req/s" "p50 ms" "p99 ms"
for name in direct nginx mesh; do
    printf '%-8s %12.0f %10s %10s\n' "$name" "${RPS[$name]}" "${P50[$name]}" "${P99[$name]}"
done
awk -v m="${RPS[mesh]}" -v n="${RPS[nginx]}" 'BEGIN {
    printf "mesh/nginx throughput: %.2fx\n", m / n
}'

if [[ -z "$RATE" ]]; then
    RATE=$(awk -v r="${RPS[direct]}" -v p="$RATE_PERCENT" 'BEGIN { printf "%d", r * p / 100 }')
fi
if ((RATE > 0)); then
    # Same keep-alive connections as wrk, each on its own fixed schedule (`bench mesh --rate`;
    # a request held up by the previous one counts from when it was due).
    printf '\nfixed rate %s req/s, %s connections, %s per target\n' "$RATE" "$CONNECTIONS" "$DURATION"
    out=$($FLOTILLA bench mesh --rate "$RATE" --connections "$CONNECTIONS" --duration "$DURATION" \
        --target "direct=127.0.0.1:$BACKEND_PORT" --target "nginx=127.0.0.1:$NGINX_PORT" \
        --target "mesh=127.0.0.1:$MESH_PORT")
    echo "$out" | tail -n +2
    awk '$1 == "direct" { d = $4 } $1 == "nginx" { n = $4 } $1 == "mesh" { m = $4 }
        END { printf "added p99 over direct at this rate: mesh %.3f ms, nginx %.3f ms\n", m - d, n - d }' <<<"$out"
fi
