#!/usr/bin/env bash
# /nix-cache-info req/s: ncro vs nginx serving the same bytes as a static
# file, in one run, same machine, same connection count, each server with
# one worker pinned to CPU 0 and wrk pinned to CPU 1.
# Usage: loadtest/cache-info.sh NCRO_BIN [CONNS] [DURATION] [ROUNDS]
set -euo pipefail
NCRO=${1:?usage: cache-info.sh NCRO_BIN [CONNS] [DURATION] [ROUNDS]}
CONNS=${2:-64}; DUR=${3:-10s}; ROUNDS=${4:-3}
W=$(mktemp -d /tmp/ncro-lt.XXXXXX)
NGPORT=18391; NCPORT=18392
mkdir -p "$W/www"
printf 'StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n' > "$W/www/nix-cache-info"
cat > "$W/nginx.conf" <<NG
worker_processes 1;
worker_cpu_affinity 01;
pid $W/nginx.pid;
error_log $W/nginx-error.log;
events { worker_connections 4096; }
http {
  access_log off;
  sendfile on; tcp_nopush on; tcp_nodelay on;
  keepalive_requests 1000000;
  default_type text/x-nix-cache-info;
  server { listen 127.0.0.1:$NGPORT reuseport backlog=4096; root $W/www; }
}
NG
cat > "$W/ncro.toml" <<NC
[server]
listen = "127.0.0.1:$NCPORT"
workers = 1
cpus = [0]
[[upstreams]]
url = "http://127.0.0.1:9"
[cache]
db_path = ":memory:"
[logging]
level = "warn"
NC
nginx -c "$W/nginx.conf" -p "$W"
"$NCRO" serve --config "$W/ncro.toml" > "$W/ncro.log" 2>&1 &
NCPID=$!
cleanup() { kill -TERM $NCPID 2>/dev/null || true; [ -f "$W/nginx.pid" ] && kill -QUIT "$(cat "$W/nginx.pid")" 2>/dev/null || true; }
trap cleanup EXIT
sleep 1
run() { taskset -c 1 wrk -t1 -c"$CONNS" -d"$DUR" "$1" | awk '/Requests\/sec/{print $2}'; }
echo "machine=$(nproc)cpu kernel=$(uname -r) conns=$CONNS dur=$DUR commit=$(git -C "$(dirname "$0")" rev-parse --short HEAD 2>/dev/null || echo ?)"
for r in $(seq 1 "$ROUNDS"); do
  ng=$(run "http://127.0.0.1:$NGPORT/nix-cache-info")
  nc=$(run "http://127.0.0.1:$NCPORT/nix-cache-info")
  echo "round=$r nginx_rps=$ng ncro_rps=$nc ratio=$(echo "scale=3; $nc / $ng" | bc)"
done
