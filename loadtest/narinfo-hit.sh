#!/usr/bin/env bash
# narinfo hits: ncro answering from its route cache vs nginx serving the
# same narinfo files statically (the ceiling for a narinfo server), and vs
# nginx as a fallback-chain proxy (try A, on 404 try B) in front of the
# same caches (what a cache-less proxy costs).
#
# Setup, all on loopback:
#   - one nginx (worker_processes 1, CPU 0) with three servers: the static
#     ceiling (cache A, no access log) and upstreams A and B for ncro (with
#     an access log, so every request ncro forwards is counted);
#   - ncro with one worker on CPU 0 (whole process under taskset -c 0),
#     upstreams A and B at equal priority (raced), no public keys (the fake
#     caches carry dummy Sig lines; ncro skips verification without keys);
#   - ncro's route cache is warmed by requesting every path of the list once;
#     the measured runs must then forward nothing upstream (checked per run);
#   - the chain proxy (nginx, worker_processes 1, CPU 0) forwards to a second
#     upstream nginx on CPU 1 (beside wrk), so CPU 0 holds only the proxy;
#   - wrk -t1 on CPU 1 walks the same 20k list (rotate.lua) against all,
#     same duration, interleaved rounds (order rotates per round).
#
# PIN=0 pins nothing instead: nginx `worker_processes auto` (one per
# CPU), ncro one worker per CPU (`workers` unset), the chain proxy and its
# upstreams likewise, and wrk with WRK_THREADS (2) threads, all sharing the
# machine's cores as the scheduler sees fit. That is the same-cores
# comparison a deployment with its clients on the same host gets; the
# pinned one isolates the server's own cost.
#
# Usage: loadtest/narinfo-hit.sh [NCRO_BIN] [DURATION] [ROUNDS]
#   defaults: release build of this checkout, 15s, 3
# Env: CONNS ("64 1024"), CACHES (/tmp/ncro-bench/caches), LIST (a-20k),
#      CHAIN (1: also measure the nginx chain proxy; 0: skip it),
#      PIN (1: pinned per core; 0: nothing pinned), WRK_THREADS (1 pinned,
#      2 unpinned), LOAD_MAX/BUSY_MAX/WAIT_MAX (lib.sh), BASEPORT (18480).
set -euo pipefail
PIN=${PIN:-1}
export LT_PIN=$PIN
if [ "$PIN" = 0 ]; then export WRK_THREADS=${WRK_THREADS:-2}; fi
. "$(dirname "$0")/lib.sh"
NCRO=$(lt_ncro_bin "${1:-}")
DUR=${2:-15s}; ROUNDS=${3:-3}
CONNS=${CONNS:-"64 1024"}
CACHES=${CACHES:-/tmp/ncro-bench/caches}
LIST=${LIST:-a-20k}
BASEPORT=${BASEPORT:-18480}
CHAIN=${CHAIN:-1}
CEIL=$((BASEPORT + 1)); UPA=$((BASEPORT + 2)); UPB=$((BASEPORT + 3)); NCPORT=$((BASEPORT + 4))
CHPORT=$((BASEPORT + 5)); CHA=$((BASEPORT + 6)); CHB=$((BASEPORT + 7))

if [ "$PIN" = 1 ]; then
  lt_init narinfo-hit
  NG_WORKERS="worker_processes 1;"; NG_CPU0="worker_cpu_affinity 01;"; NG_CPU1="worker_cpu_affinity 10;"
  NC_WORKERS='workers = 1
cpus = [0]
control_cpu = 0'
  SETUP="One worker each on CPU 0, wrk -t1 on CPU 1"
else
  lt_init narinfo-hit-unpinned
  NG_WORKERS="worker_processes auto;"; NG_CPU0=""; NG_CPU1=""
  NC_WORKERS=""
  SETUP="Nothing pinned: nginx and ncro one worker per CPU ($(nproc)), wrk -t$WRK_THREADS, all on the same cores"
fi
lt_machine
lt_caches "$CACHES"
L="$CACHES/lists/$LIST.txt"
[ -s "$L" ] || lt_die "no list $L"
NPATHS=$(wc -l < "$L")
echo "caches: $CACHES (gen-caches.py --no-big, seed 42); list: $LIST ($NPATHS paths)" >> "$RUN/machine.txt"

cat > "$W/nginx.conf" <<NG
$NG_WORKERS
$NG_CPU0
pid $W/nginx.pid;
error_log $W/nginx-error.log warn;
events { worker_connections 4096; }
http {
  sendfile on; tcp_nopush on; tcp_nodelay on;
  keepalive_timeout 65s;
  keepalive_requests 1000000;
  types { text/x-nix-narinfo narinfo; application/x-nix-nar nar; }
  default_type text/plain;
  # The ceiling: static files, nothing logged (open_file_cache stays off,
  # as in the baselines: 20k files would exceed the fd limit).
  server { listen 127.0.0.1:$CEIL backlog=4096; root $CACHES/A; access_log off; }
  # ncro's upstreams: every forwarded request is logged and counted.
  server { listen 127.0.0.1:$UPA backlog=4096; root $CACHES/A; access_log $W/upstream.log; }
  server { listen 127.0.0.1:$UPB backlog=4096; root $CACHES/B; access_log $W/upstream.log; }
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
priority = 10
[cache]
db_path = "$W/routes.db"
NC
cp "$W/nginx.conf" "$RUN/nginx.conf"; cp "$W/ncro.toml" "$RUN/ncro.toml"

lt_nginx "$W/nginx.conf" 0; NGPIDS=$NGINX_PIDS
SERVERS="nginx ncro"
if [ "$CHAIN" = 1 ]; then
  mkdir -p "$W/px"
  # The chain's own upstreams, on CPU 1 beside wrk.
  cat > "$W/nginx-chain-up.conf" <<NG
$NG_WORKERS
$NG_CPU1
pid $W/nginx-chain-up.pid;
error_log $W/nginx-chain-up-error.log warn;
events { worker_connections 4096; }
http {
  access_log off; sendfile on; tcp_nopush on; tcp_nodelay on;
  keepalive_timeout 65s; keepalive_requests 1000000;
  types { text/x-nix-narinfo narinfo; }
  server { listen 127.0.0.1:$CHA backlog=4096; root $CACHES/A; }
  server { listen 127.0.0.1:$CHB backlog=4096; root $CACHES/B; }
}
NG
  # The shared kit's fallback proxy, one worker on CPU 0.
  cat > "$W/nginx-chain.conf" <<NG
$NG_WORKERS
$NG_CPU0
pid $W/nginx-chain.pid;
error_log $W/nginx-chain-error.log warn;
events { worker_connections 4096; }
http {
  access_log off; tcp_nodelay on;
  keepalive_timeout 65s; keepalive_requests 1000000;
  client_body_temp_path $W/px/body; proxy_temp_path $W/px/proxy;
  fastcgi_temp_path $W/px/fcgi; uwsgi_temp_path $W/px/uwsgi; scgi_temp_path $W/px/scgi;
  upstream cache_a { server 127.0.0.1:$CHA; keepalive 256; keepalive_requests 1000000; }
  upstream cache_b { server 127.0.0.1:$CHB; keepalive 256; keepalive_requests 1000000; }
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
  cp "$W/nginx-chain.conf" "$RUN/nginx-chain.conf"; cp "$W/nginx-chain-up.conf" "$RUN/nginx-chain-up.conf"
  lt_nginx "$W/nginx-chain-up.conf" 1; CHUPPIDS=$NGINX_PIDS
  lt_nginx "$W/nginx-chain.conf" 0; CHPIDS=$NGINX_PIDS
  lt_wait_http "http://127.0.0.1:$CHPORT/nix-cache-info"
  SERVERS="nginx ncro chain"
fi
lt_ncro "$W/ncro.log" -- "$NCRO" serve --config "$W/ncro.toml"
lt_wait_http "http://127.0.0.1:$CEIL/nix-cache-info"
lt_wait_http "http://127.0.0.1:$NCPORT/nix-cache-info"
DRIVER=$(lt_ncro_driver "$W/ncro.log")
echo "driver: $DRIVER" >> "$RUN/machine.txt"

# Warm: every path once, 32 in flight, on CPU 1.
awk -v p="$NCPORT" '{printf "url = \"http://127.0.0.1:%s%s\"\noutput = \"/dev/null\"\n", p, $1}' "$L" > "$W/warm.curl"
echo "taskset -c 1 curl -s -Z --parallel-max 32 -w '%{http_code}\\n' -K warm.curl  # one url per path of $LIST" >> "$RUN/commands.txt"
t0=$(date +%s.%N)
$(lt_pin 1) curl -s -Z --parallel-max 32 -w '%{http_code}\n' -K "$W/warm.curl" > "$W/warm.codes" || true
t1=$(date +%s.%N)
WARM_CODES=$(sort "$W/warm.codes" | uniq -c | awk '{printf "%s×%s ", $2, $1}')
WARM_UP=$(wc -l < "$W/upstream.log")
WARM=$(awk -v a="$t0" -v b="$t1" -v n="$NPATHS" 'BEGIN{printf "%.1f s (%.0f misses/s)", b - a, n / (b - a)}')
printf 'warm: %s; codes: %s; upstream requests: %s\n' "$WARM" "$WARM_CODES" "$WARM_UP" | tee -a "$RUN/machine.txt" >&2
[ "$(grep -c '^200$' "$W/warm.codes")" -eq "$NPATHS" ] || lt_die "warm-up did not return 200 for every path: $WARM_CODES"

# Same bytes? Compare a few bodies between the ceiling and ncro.
SAME=0
for p in $(head -5 "$L"); do
  cmp -s <(curl -s "http://127.0.0.1:$CEIL$p") <(curl -s "http://127.0.0.1:$NCPORT$p") && SAME=$((SAME + 1))
done
HDR_NG=$(curl -s -o /dev/null -D - "http://127.0.0.1:$CEIL$(head -1 "$L")" | wc -c)
HDR_NC=$(curl -s -o /dev/null -D - "http://127.0.0.1:$NCPORT$(head -1 "$L")" | wc -c)
echo "bodies identical: $SAME/5; response head bytes: nginx $HDR_NG, ncro $HDR_NC" | tee -a "$RUN/machine.txt" >&2

lt_wait_quiet narinfo-hit
set -- $SERVERS
NS=$#
for r in $(seq "$ROUNDS"); do
  for c in $CONNS; do
    # Rotate the order each round so no server always runs first.
    order=""; k=$(( (r - 1) % NS ))
    for j in $(seq 0 $((NS - 1))); do idx=$(( (k + j) % NS + 1 )); order+="${!idx} "; done
    for s in $order; do
      case $s in
        nginx) lt_wrk "nginx-c$c-r$r" "http://127.0.0.1:$CEIL" "$L" "$c" "$DUR" "$NGPIDS" >/dev/null ;;
        ncro) lt_wrk "ncro-c$c-r$r" "http://127.0.0.1:$NCPORT" "$L" "$c" "$DUR" "$NCRO_PID" "$NGPIDS" "$W/upstream.log" >/dev/null ;;
        chain) lt_wrk "chain-c$c-r$r" "http://127.0.0.1:$CHPORT" "$L" "$c" "$DUR" "$CHPIDS" "$CHUPPIDS" >/dev/null ;;
      esac
      tail -1 "$RUN/records.txt" | cut -d' ' -f1-8,12-17,19 >&2
    done
  done
done
echo "load_at_end: $(cat /proc/loadavg)" >> "$RUN/machine.txt"
RSS=$(awk '/^VmHWM|^VmRSS/{printf "%s %s kB; ", $1, $2}' "/proc/$NCRO_PID/status")
FWD=$(lt_values '^ncro-' upstream_reqs | awk '{s+=$1} END{print s+0}')

{
  echo "# narinfo hits: ncro (route cache) vs nginx static"
  echo
  grep -E '^(date|cpu|kernel|git):' "$RUN/machine.txt" | sed 's/^/    /'
  echo
  echo "$SETUP, list $LIST ($NPATHS paths, rotate.lua), $DUR per run,"
  echo "$ROUNDS interleaved rounds. ncro driver: $DRIVER. Warm-up: $WARM."
  echo "Requests ncro forwarded upstream during the measured runs: $FWD (0 = all hits). ncro $RSS"
  echo "Quiet check before the batch: $(tail -1 "$RUN/load.txt")"
  echo
  lt_wrk_table nginx ncro "$CONNS" "$ROUNDS"
  if [ "$CHAIN" = 1 ]; then
    echo
    echo "Against nginx as a fallback-chain proxy (every request forwarded to cache A):"
    echo
    lt_wrk_table chain ncro "$CONNS" "$ROUNDS"
  fi
  echo
  lt_check_records
} > "$RUN/summary.md"
cat "$RUN/summary.md"
