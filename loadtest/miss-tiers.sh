#!/usr/bin/env bash
# The miss path under load: ncro with an empty route cache against nginx as
# a fallback chain (try A, on 404 try B, keep-alive to both), in front of
# the same two tiers of static nginx caches, with wrk walking distinct
# present paths so that every request ncro sees is a first-time lookup.
#
# Setup, all on loopback:
#   - one nginx serving caches A and B statically (the two tiers; no
#     access log), used by both ncro and the chain;
#   - ncro: upstream A at priority 10, B at priority 20 (two tiers, the
#     default hedged policy), no public keys (the fake caches carry dummy
#     Sig lines), route database on disk, restarted with a fresh database
#     before each of its runs;
#   - the chain: nginx proxy_pass to A, `error_page 404 = @b` to B;
#   - wrk walks the first MISS_PATHS paths of present-all (a third only in
#     A, a third in both, a third only in B; shuffled). rotate.lua reports
#     how many requests each thread issued against its slice: a run in
#     which some thread wrapped around asked ncro for paths it had already
#     resolved, and is flagged in the summary.
#
# PIN=0 (the default here) pins nothing: nginx `worker_processes auto`,
# ncro one worker per CPU, wrk -t2, all on the machine's cores. PIN=1 pins
# as the other scripts do: ncro and the chain proxy on CPU 0 (one worker),
# the upstream nginx and wrk -t1 on CPU 1.
#
# Usage: loadtest/miss-tiers.sh [NCRO_BIN] [ROUNDS] [DURATION]   (3, 2s)
# Env: MISS_PATHS (50000), CONNS (64), PIN (0), WRK_THREADS, CACHES, MASS_QUERY,
#      LOAD_MAX/BUSY_MAX/WAIT_MAX (lib.sh), BASEPORT (18880).
set -euo pipefail
PIN=${PIN:-0}
export LT_PIN=$PIN
if [ "$PIN" = 0 ]; then export WRK_THREADS=${WRK_THREADS:-2}; fi
. "$(dirname "$0")/lib.sh"
NCRO=$(lt_ncro_bin "${1:-}")
ROUNDS=${2:-3}; DUR=${3:-2s}
CONNS=${CONNS:-64}
MISS_PATHS=${MISS_PATHS:-50000}
# Lines for ncro's [cache.mass_query] (default: none, ncro's defaults),
# e.g. MASS_QUERY="per_upstream_max_inflight = 64".
MASS_QUERY=${MASS_QUERY:-}
CACHES=${CACHES:-/tmp/ncro-bench/caches}
BASEPORT=${BASEPORT:-18880}
UPA=$((BASEPORT + 1)); UPB=$((BASEPORT + 2)); NCPORT=$((BASEPORT + 3)); CHPORT=$((BASEPORT + 4))

if [ "$PIN" = 1 ]; then
  lt_init miss-tiers-pinned
  NG_PROXY="worker_processes 1;
worker_cpu_affinity 01;"
  NG_UP="worker_processes 1;
worker_cpu_affinity 10;"
  NC_WORKERS='workers = 1
cpus = [0]
control_cpu = 0'
  SETUP="ncro and the chain proxy one worker on CPU 0; upstream nginx and wrk -t$WRK_THREADS on CPU 1"
else
  lt_init miss-tiers
  NG_PROXY="worker_processes auto;"; NG_UP="worker_processes auto;"; NC_WORKERS=""
  SETUP="nothing pinned: nginx (upstreams and chain) and ncro one worker per CPU ($(nproc)), wrk -t$WRK_THREADS, all on the same cores"
fi
lt_machine
lt_caches "$CACHES"
L="$W/paths.txt"
head -n "$MISS_PATHS" "$CACHES/lists/present-all.txt" > "$L"
NPATHS=$(wc -l < "$L")
echo "caches: $CACHES (gen-caches.py --no-big, seed 42); paths: first $NPATHS of present-all" >> "$RUN/machine.txt"

mkdir -p "$W/px"
lt_caches_nginx_conf "$W/nginx-up.conf" "$W" "$NG_UP" "$UPA" "$UPB" "$CACHES"
cat > "$W/nginx-chain.conf" <<NG
$NG_PROXY
pid $W/nginx-chain.pid;
error_log $W/nginx-chain-error.log warn;
events { worker_connections 4096; }
http {
  access_log off; tcp_nodelay on;
  keepalive_timeout 65s; keepalive_requests 1000000;
  client_body_temp_path $W/px/body; proxy_temp_path $W/px/proxy;
  fastcgi_temp_path $W/px/fcgi; uwsgi_temp_path $W/px/uwsgi; scgi_temp_path $W/px/scgi;
  upstream cache_a { server 127.0.0.1:$UPA; keepalive 256; keepalive_requests 1000000; }
  upstream cache_b { server 127.0.0.1:$UPB; keepalive 256; keepalive_requests 1000000; }
  proxy_http_version 1.1;
  proxy_set_header Connection "";
  proxy_buffering on; proxy_buffer_size 16k; proxy_buffers 8 64k;
  proxy_busy_buffers_size 128k; proxy_max_temp_file_size 0;
  server {
    listen 127.0.0.1:$CHPORT backlog=4096;
    location / { proxy_pass http://cache_a; proxy_intercept_errors on; error_page 404 = @b; }
    location @b { proxy_pass http://cache_b; }
  }
}
NG
cat > "$W/ncro.toml" <<NC
[server]
listen = "127.0.0.1:$NCPORT"
$NC_WORKERS
[[upstreams]]
url = "http://127.0.0.1:$UPA"
priority = 10
[[upstreams]]
url = "http://127.0.0.1:$UPB"
priority = 20
[cache]
db_path = "$W/routes.db"
[cache.mass_query]
$MASS_QUERY
[logging]
level = "warn"
NC
cp "$W/nginx-up.conf" "$W/nginx-chain.conf" "$W/ncro.toml" "$RUN/"

lt_nginx "$W/nginx-up.conf" 1; UPPIDS=$NGINX_PIDS
lt_nginx "$W/nginx-chain.conf" 0; CHPIDS=$NGINX_PIDS
lt_wait_http "http://127.0.0.1:$UPA/nix-cache-info"
lt_wait_http "http://127.0.0.1:$CHPORT/nix-cache-info"

# Did every wrk thread stay within its slice (no path asked twice)?
wrapped() { awk '/^thread/ {split($3, i, "="); split($4, s, "="); if (i[2] + 0 > s[2] + 0) w = 1} END {print w ? "yes" : "no"}' "$1"; }

lt_wait_quiet miss-tiers
for r in $(seq "$ROUNDS"); do
  if [ $((r % 2)) -eq 1 ]; then order="chain ncro"; else order="ncro chain"; fi
  for t in $order; do
    if [ "$t" = ncro ]; then
      rm -f "$W"/routes.db*
      lt_ncro "$W/ncro-$r.log" -- "$NCRO" serve --config "$W/ncro.toml"
      lt_wait_http "http://127.0.0.1:$NCPORT/nix-cache-info"
      lt_wrk "ncro-c$CONNS-r$r" "http://127.0.0.1:$NCPORT" "$L" "$CONNS" "$DUR" "$NCRO_PID" "$UPPIDS" >/dev/null
      kill -TERM "$NCRO_PID"; wait "$NCRO_PID" 2>/dev/null || true
    else
      lt_wrk "chain-c$CONNS-r$r" "http://127.0.0.1:$CHPORT" "$L" "$CONNS" "$DUR" "$CHPIDS" "$UPPIDS" >/dev/null
    fi
    echo "wrapped=$(wrapped "$RUN/raw/$t-c$CONNS-r$r.txt") $(tail -1 "$RUN/records.txt" | cut -d' ' -f1-8,12-17)" >&2
  done
done
echo "load_at_end: $(cat /proc/loadavg)" >> "$RUN/machine.txt"

{
  echo "# Miss path under load: ncro (fresh route cache, two tiers) vs nginx fallback chain"
  echo
  grep -E '^(date|cpu|kernel|git|ncro_bin_sha256):' "$RUN/machine.txt" | sed 's/^/    /'
  echo
  echo "$SETUP. $NPATHS distinct present paths (A only, both, B only: a third each), wrk -c$CONNS,"
  echo "$DUR per run, $ROUNDS interleaved rounds; ncro restarted with an empty route database before each run."
  echo "Quiet check before the batch: $(tail -1 "$RUN/load.txt")"
  echo
  lt_wrk_table chain ncro "$CONNS" "$ROUNDS"
  echo
  for f in "$RUN"/raw/ncro-*.txt; do
    [ "$(wrapped "$f")" = yes ] && echo "- WARNING: $(basename "$f" .txt) wrapped around its slice: some requests were route-cache hits"
  done
  lt_check_records
} > "$RUN/summary.md"
cat "$RUN/summary.md"
