#!/bin/bash
# Starts 3 managers and 1 worker on this host (non-loopback IP in $IP) from BIN and leaves them
# running; logs in /tmp/c{1..4}.log. Usage: BIN=target/debug/flotilla IP=192.0.2.2 scripts/cluster-smoke.sh
set -eu
B=${BIN:-target/debug/flotilla}; IP=${IP:?set IP to a non-loopback address of this host}
rm -rf /tmp/c1 /tmp/c2 /tmp/c3 /tmp/c4
$B init --data-dir /tmp/c1 --socket /tmp/c1.sock --listen-addr $IP:17451 --api-addr 127.0.0.1:17450 --node-name m1 > /tmp/c1.log 2>&1 & echo $! > /tmp/c1.pid; sleep 3
export FLOTILLA_SOCKET=/tmp/c1.sock  # the CLI talks to m1 over its socket
MT=$(timeout 5 $B token show manager); WT=$(timeout 5 $B token show worker)
FLOTILLA_JOIN_TOKEN=$MT $B join $IP:17451 --data-dir /tmp/c2 --listen-addr $IP:17461 --api-addr 127.0.0.1:17460 --node-name m2 --task-ports 33000-33100 > /tmp/c2.log 2>&1 & echo $! > /tmp/c2.pid
sleep 4
FLOTILLA_JOIN_TOKEN=$MT $B join $IP:17451 --data-dir /tmp/c4 --listen-addr $IP:17471 --api-addr 127.0.0.1:17470 --node-name m3 --task-ports 34000-34100 > /tmp/c4.log 2>&1 & echo $! > /tmp/c4.pid
FLOTILLA_JOIN_TOKEN=$WT $B join $IP:17451 --data-dir /tmp/c3 --listen-addr $IP:17481 --node-name w1 --task-ports 35000-35100 > /tmp/c3.log 2>&1 & echo $! > /tmp/c3.pid
sleep 6
