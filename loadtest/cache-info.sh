#!/usr/bin/env bash
# /nix-cache-info req/s: ncro vs nginx serving the same bytes as a static
# file, in one run on the same machine. Each server runs one worker pinned
# to CPU 0 (the whole process under `taskset -c 0`); wrk runs on CPU 1.
# Rounds are interleaved (nginx, ncro, then ncro, nginx, ...), and the CPU
# seconds of each server process are read from /proc/PID/stat around each
# wrk run.
#
# Usage: loadtest/cache-info.sh [NCRO_BIN] [CONNS] [DURATION] [ROUNDS]
#   NCRO_BIN  default: $CARGO_TARGET_DIR/release/ncro (or target/release/ncro)
#   CONNS     space-separated connection counts, default "64 1024"
#   DURATION  per wrk run, default 10s;  ROUNDS default 3
# Env: LOAD_MAX, BUSY_MAX, WAIT_MAX (see lib.sh), NGPORT/NCPORT.
# Output: loadtest/runs/<date>-cache-info/ (summary.md, records.txt, raw/).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
NCRO=$(lt_ncro_bin "${1:-}")
CONNS=${2:-"64 1024"}; DUR=${3:-10s}; ROUNDS=${4:-3}
NGPORT=${NGPORT:-18391}; NCPORT=${NCPORT:-18392}

lt_init cache-info
lt_machine
mkdir -p "$W/www"
# Byte for byte what ncro answers with its default cache_priority (30).
printf 'StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n' > "$W/www/nix-cache-info"
echo /nix-cache-info > "$W/list.txt"
cat > "$W/nginx.conf" <<NG
worker_processes 1;
worker_cpu_affinity 01;
pid $W/nginx.pid;
error_log $W/nginx-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  sendfile on; tcp_nopush on; tcp_nodelay on;
  keepalive_timeout 65s;
  keepalive_requests 1000000;
  default_type text/x-nix-cache-info;
  server { listen 127.0.0.1:$NGPORT backlog=4096; root $W/www; }
}
NG
cat > "$W/ncro.toml" <<NC
[server]
listen = "127.0.0.1:$NCPORT"
workers = 1
cpus = [0]
control_cpu = 0
[[upstreams]]
url = "http://127.0.0.1:9"
[cache]
db_path = "$W/routes.db"
NC
cp "$W/nginx.conf" "$RUN/nginx.conf"; cp "$W/ncro.toml" "$RUN/ncro.toml"

lt_nginx "$W/nginx.conf" 0; NGPIDS=$NGINX_PIDS
lt_ncro "$W/ncro.log" -- "$NCRO" serve --config "$W/ncro.toml"
lt_wait_http "http://127.0.0.1:$NGPORT/nix-cache-info"
lt_wait_http "http://127.0.0.1:$NCPORT/nix-cache-info"
cmp <(curl -s "http://127.0.0.1:$NGPORT/nix-cache-info") <(curl -s "http://127.0.0.1:$NCPORT/nix-cache-info") \
  || lt_die "nginx and ncro serve different /nix-cache-info bodies"
DRIVER=$(lt_ncro_driver "$W/ncro.log")
echo "driver: $DRIVER" >> "$RUN/machine.txt"

lt_wait_quiet cache-info
for r in $(seq "$ROUNDS"); do
  for c in $CONNS; do
    if [ $((r % 2)) -eq 1 ]; then order="nginx ncro"; else order="ncro nginx"; fi
    for s in $order; do
      if [ "$s" = nginx ]; then
        lt_wrk "nginx-c$c-r$r" "http://127.0.0.1:$NGPORT" "$W/list.txt" "$c" "$DUR" "$NGPIDS" >/dev/null
      else
        lt_wrk "ncro-c$c-r$r" "http://127.0.0.1:$NCPORT" "$W/list.txt" "$c" "$DUR" "$NCRO_PID" >/dev/null
      fi
      tail -1 "$RUN/records.txt" | cut -d' ' -f1-8,12-13,19 >&2
    done
  done
done
echo "load_at_end: $(cat /proc/loadavg)" >> "$RUN/machine.txt"
# The list file lives in the scratch dir; keep a copy for the commands.
cp "$W/list.txt" "$RUN/list.txt"

{
  echo "# /nix-cache-info: ncro vs nginx static"
  echo
  echo "$(grep -E '^(date|cpu|kernel|git):' "$RUN/machine.txt" | tr '\n' ';' | sed 's/;/; /g')"
  echo
  echo "One worker each on CPU 0, wrk -t1 on CPU 1, $DUR per run, $ROUNDS interleaved rounds; ncro driver: $DRIVER."
  echo "Quiet check before the batch: $(tail -1 "$RUN/load.txt")"
  echo
  lt_wrk_table nginx ncro "$CONNS" "$ROUNDS"
} > "$RUN/summary.md"
cat "$RUN/summary.md"
