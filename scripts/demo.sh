#!/usr/bin/env bash
# A local demo: etcd on a free loopback port, the dispenser, and a child that
# prints what it sees each time it is signalled. Cleans up after itself.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v etcd-config-dispenser >/dev/null || { echo "run 'make demo'" >&2; exit 1; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

WORK=$(mktemp -d /tmp/etcd-config-dispenser-demo.XXXXXX)
CLIENT_PORT=$(free_port); PEER_PORT=$(free_port)
ETCD_PID=""; DISPENSER_PID=""
cleanup() {
    [ -n "$DISPENSER_PID" ] && kill "$DISPENSER_PID" 2>/dev/null && wait "$DISPENSER_PID" 2>/dev/null || true
    [ -n "$ETCD_PID" ] && kill "$ETCD_PID" 2>/dev/null && wait "$ETCD_PID" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

say "starting etcd on 127.0.0.1:$CLIENT_PORT (data in $WORK/etcd)"
etcd --data-dir "$WORK/etcd" --name demo \
    --listen-client-urls "http://127.0.0.1:$CLIENT_PORT" --advertise-client-urls "http://127.0.0.1:$CLIENT_PORT" \
    --listen-peer-urls "http://127.0.0.1:$PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$PEER_PORT" \
    --initial-cluster "demo=http://127.0.0.1:$PEER_PORT" >"$WORK/etcd.log" 2>&1 &
ETCD_PID=$!
for _ in $(seq 100); do curl -fsS "http://127.0.0.1:$CLIENT_PORT/health" >/dev/null 2>&1 && break; sleep 0.1; done

export ETCDCTL_API=3
ctl() { etcdctl --endpoints="127.0.0.1:$CLIENT_PORT" "$@" >/dev/null; }

say "writing two keys under /demo"
ctl put /demo/greeting "hello from etcd"
ctl put /demo/app/settings.ini "color=blue"

cat >"$WORK/child.sh" <<'CHILD'
#!/bin/sh
# The program that uses the files: it rereads them on SIGHUP, like nginx does.
show() { echo "   [child] $1: greeting='$(cat "$TARGET/greeting")' settings='$(cat "$TARGET/app/settings.ini" 2>/dev/null)'"; }
trap 'show "SIGHUP received"' HUP
trap 'echo "   [child] SIGTERM: bye"; exit 0' TERM
show "started"
while :; do sleep 0.05; done
CHILD
chmod +x "$WORK/child.sh"

say "etcd-config-dispenser --prefix=/demo --target=$WORK/config -- child.sh"
export TARGET="$WORK/config"
ETCD_ENDPOINTS="127.0.0.1:$CLIENT_PORT" etcd-config-dispenser \
    --prefix=/demo --target="$WORK/config" --signal=SIGHUP -- "$WORK/child.sh" &
DISPENSER_PID=$!
for _ in $(seq 100); do [ -e "$WORK/config/..data" ] && break; sleep 0.1; done
sleep 0.5

say "the target directory: one snapshot, ..data, and a link per top-level name"
ls -la "$WORK/config"

say "changing one key in etcd: the child gets SIGHUP after the new snapshot is live"
ctl put /demo/greeting "hello again"
sleep 0.5

say "one transaction changing two keys: one snapshot, one signal"
printf '\nput /demo/greeting "both changed"\nput /demo/app/settings.ini "color=green"\n\n\n' \
    | etcdctl --endpoints="127.0.0.1:$CLIENT_PORT" txn >/dev/null
sleep 0.5

say "a key that would escape the target is skipped with a warning; the others still arrive"
ctl put "/demo/../../etc/passwd" "nope"
ctl put /demo/new-file "arrived"
sleep 0.5
ls "$WORK/config"

say "stopping: SIGTERM is forwarded to the child, the dispenser exits with its code"
kill -TERM "$DISPENSER_PID"
wait "$DISPENSER_PID" && echo "   exit code 0" || echo "   exit code $?"
DISPENSER_PID=""
