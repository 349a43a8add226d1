#!/usr/bin/env bash
# NAR streaming: throughput and proxy CPU per GB, ncro vs the nginx
# upstream served directly, for ncro's two relay modes on both monoio
# drivers:
#   uring-copy    nar_relay = "copy",   io_uring (the default driver)
#   uring-splice  nar_relay = "splice", io_uring
#   epoll-copy    nar_relay = "copy",   MONOIO_FORCE_LEGACY_DRIVER=1
#   epoll-splice  nar_relay = "splice", MONOIO_FORCE_LEGACY_DRIVER=1
#   nginx-proxy   nginx proxy_pass (buffering on, 8 x 64k buffers, keep-alive
#                 upstream), one worker on CPU 0: the CPU-per-GB baseline
# (`nar_relay = "auto"` picks one of the ncro modes by driver; this run is
# what decides which.)
#
# Placement: each ncro runs one worker on CPU 0 (whole process under
# taskset -c 0); the upstream nginx (one worker, sendfile) and the clients
# share CPU 1. "direct" is the same clients on the same nginx with CPU 0
# idle. All four ncro instances run at once on their own ports, idle when
# not measured, and the targets are measured in a rotating order per round.
#
# Per target and round:
#   1 stream:   one curl downloading the 100 MiB NAR SINGLE_REPS times over
#               one keep-alive connection;
#   16 streams: STREAMS curls in parallel, each MULTI_REPS times;
#   small:      wrk -t1 -c16 on the 1 MiB NAR for SMALL_DUR (req/s, CPU/req).
# Each ncro first gets the NARs' narinfos (as Nix does), so it routes the
# NAR to the upstream that served them, and must relay them byte-identical.
#
# Usage: loadtest/nar.sh [NCRO_BIN] [ROUNDS]      (default ROUNDS=5)
# Env: CACHES (/tmp/ncro-bench/caches), SINGLE_REPS (20), STREAMS (16),
#      MULTI_REPS (3), SMALL_DUR (5s; empty skips), TARGETS (all six),
#      LOAD_MAX/BUSY_MAX/WAIT_MAX (lib.sh), BASEPORT (18680),
#      NCRO_TOML_EXTRA (lines appended to each ncro config, after [cache];
#      e.g. $'[cache.nar_ranges]\nenabled = false').
set -euo pipefail
. "$(dirname "$0")/lib.sh"
NCRO=$(lt_ncro_bin "${1:-}")
ROUNDS=${2:-5}
CACHES=${CACHES:-/tmp/ncro-bench/caches}
SINGLE_REPS=${SINGLE_REPS:-20}; STREAMS=${STREAMS:-16}; MULTI_REPS=${MULTI_REPS:-3}
SMALL_DUR=${SMALL_DUR-5s}
NCRO_TOML_EXTRA=${NCRO_TOML_EXTRA:-}
TARGETS=${TARGETS:-"direct nginx-proxy uring-copy uring-splice epoll-copy epoll-splice"}
BASEPORT=${BASEPORT:-18680}
UPA=$((BASEPORT + 1)); UPB=$((BASEPORT + 2)); NGPROXY=$((BASEPORT + 3))
BIG=$((100 << 20)); SMALL=$((1 << 20))

lt_init nar
lt_machine
lt_caches "$CACHES"
read -r BIG_NI BIG_NAR < <(lt_nar_file "$CACHES" 100m "$BIG")
read -r SMALL_NI SMALL_NAR < <(lt_nar_file "$CACHES" 1m "$SMALL")
BIG_SUM=$(sha256sum "$CACHES/A$BIG_NAR" | cut -d' ' -f1)
echo "$SMALL_NAR" > "$W/small.txt"; cp "$W/small.txt" "$RUN/small-list.txt"
echo "caches: $CACHES; NARs: 100 MiB $BIG_NAR, 1 MiB $SMALL_NAR (random bytes, Compression: none)" >> "$RUN/machine.txt"

cat > "$W/nginx.conf" <<NG
worker_processes 1;
worker_cpu_affinity 10;
pid $W/nginx.pid;
error_log $W/nginx-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  sendfile on; tcp_nopush on; tcp_nodelay on;
  keepalive_timeout 65s;
  keepalive_requests 1000000;
  types { text/x-nix-narinfo narinfo; application/x-nix-nar nar; }
  default_type text/plain;
  server { listen 127.0.0.1:$UPA backlog=4096; root $CACHES/A; }
  server { listen 127.0.0.1:$UPB backlog=4096; root $CACHES/B; }
}
NG
cp "$W/nginx.conf" "$RUN/nginx.conf"
lt_nginx "$W/nginx.conf" 1; NGPIDS=$NGINX_PIDS
lt_wait_http "http://127.0.0.1:$UPA/nix-cache-info"

# The baseline proxy: nginx proxy_pass on CPU 0, as the shared kit's
# fallback proxy configures it (buffering on, never spooling to disk).
mkdir -p "$W/px"
cat > "$W/nginx-proxy.conf" <<NG
worker_processes 1;
worker_cpu_affinity 01;
pid $W/nginx-proxy.pid;
error_log $W/nginx-proxy-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  tcp_nodelay on;
  keepalive_timeout 65s;
  keepalive_requests 1000000;
  client_body_temp_path $W/px/body;
  proxy_temp_path $W/px/proxy;
  fastcgi_temp_path $W/px/fcgi;
  uwsgi_temp_path $W/px/uwsgi;
  scgi_temp_path $W/px/scgi;
  upstream cache_a { server 127.0.0.1:$UPA; keepalive 64; keepalive_requests 1000000; }
  proxy_http_version 1.1;
  proxy_set_header Connection "";
  proxy_buffering on;
  proxy_buffer_size 16k;
  proxy_buffers 8 64k;
  proxy_busy_buffers_size 128k;
  proxy_max_temp_file_size 0;
  server { listen 127.0.0.1:$NGPROXY backlog=4096; location / { proxy_pass http://cache_a; } }
}
NG
cp "$W/nginx-proxy.conf" "$RUN/nginx-proxy.conf"
lt_nginx "$W/nginx-proxy.conf" 0; PXPIDS=$NGINX_PIDS
lt_wait_http "http://127.0.0.1:$NGPROXY/nix-cache-info"

declare -A PORT PID DRV
i=10
for t in $TARGETS; do
  [ "$t" = direct ] && { PORT[$t]=$UPA; continue; }
  [ "$t" = nginx-proxy ] && { PORT[$t]=$NGPROXY; continue; }
  i=$((i + 1)); PORT[$t]=$((BASEPORT + i))
  case $t in
    uring-*) envs=(LT_TARGET="$t") ;;
    epoll-*) envs=(LT_TARGET="$t" MONOIO_FORCE_LEGACY_DRIVER=1) ;;
    *) lt_die "unknown target $t" ;;
  esac
  cat > "$W/ncro-$t.toml" <<NC
[server]
listen = "127.0.0.1:${PORT[$t]}"
workers = 1
cpus = [0]
control_cpu = 0
nar_relay = "${t#*-}"
[[upstreams]]
url = "http://127.0.0.1:$UPA"
priority = 10
[[upstreams]]
url = "http://127.0.0.1:$UPB"
priority = 20
[cache]
db_path = "$W/routes-$t.db"
$NCRO_TOML_EXTRA
NC
  cp "$W/ncro-$t.toml" "$RUN/ncro-$t.toml"
  lt_ncro "$W/ncro-$t.log" "${envs[@]}" -- "$NCRO" serve --config "$W/ncro-$t.toml"
  PID[$t]=$NCRO_PID
done
for t in $TARGETS; do
  [ "$t" = direct ] && continue
  base="http://127.0.0.1:${PORT[$t]}"
  if [ "$t" = nginx-proxy ]; then
    sum=$(curl -s "$base$BIG_NAR" | sha256sum | cut -d' ' -f1)
    [ "$sum" = "$BIG_SUM" ] || lt_die "nginx-proxy relayed a 100 MiB NAR that differs from the file"
    continue
  fi
  lt_wait_http "$base/nix-cache-info"
  DRV[$t]=$(lt_ncro_driver "$W/ncro-$t.log")
  [ "${DRV[$t]}" = "${t%-*}" ] || [ "${DRV[$t]}-${t%-*}" = io_uring-uring ] \
    || lt_die "$t runs the ${DRV[$t]} driver"
  for ni in "$BIG_NI" "$SMALL_NI"; do
    code=$(curl -s -o /dev/null -w '%{http_code}' "$base$ni")
    [ "$code" = 200 ] || lt_die "$t: narinfo $ni answered $code"
  done
  sum=$(curl -s "$base$BIG_NAR" | sha256sum | cut -d' ' -f1)
  [ "$sum" = "$BIG_SUM" ] || lt_die "$t relayed a 100 MiB NAR that differs from the file"
  echo "$t: driver ${DRV[$t]}, pid ${PID[$t]}, narinfos 200, 100 MiB NAR byte-identical" | tee -a "$RUN/machine.txt" >&2
done

lt_wait_quiet nar
set -- $TARGETS
NT=$#
for r in $(seq "$ROUNDS"); do
  # Rotate the order each round so no target always runs first or last.
  order=""; k=$(( (r - 1) % NT ))
  for j in $(seq 0 $((NT - 1))); do idx=$(( (k + j) % NT + 1 )); order+="${!idx} "; done
  for t in $order; do
    case $t in
      direct) sp=""; tp="" ;;
      nginx-proxy) sp=$PXPIDS; tp="" ;;
      *) sp=${PID[$t]}; tp=${PID[$t]} ;;
    esac
    url="http://127.0.0.1:${PORT[$t]}$BIG_NAR"
    lt_curl "$t-s1-r$r" "$url" 1 "$SINGLE_REPS" "$sp" "$NGPIDS" "$BIG" "$tp" | cut -d' ' -f1,4,6-10,16 >&2
    lt_curl "$t-s$STREAMS-r$r" "$url" "$STREAMS" "$MULTI_REPS" "$sp" "$NGPIDS" "$BIG" "$tp" | cut -d' ' -f1,4,6-10,16,18 >&2
    if [ -n "$SMALL_DUR" ]; then
      lt_wrk "$t-small-r$r" "http://127.0.0.1:${PORT[$t]}" "$W/small.txt" 16 "$SMALL_DUR" "$sp" "$NGPIDS" \
        | cut -d' ' -f1,6-8,12-13 >&2
    fi
  done
done
echo "load_at_end: $(cat /proc/loadavg)" >> "$RUN/machine.txt"
for t in $TARGETS; do
  case $t in direct | nginx-proxy) continue ;; esac
  echo "$t: VmHWM $(awk '/^VmHWM/{print $2, $3}' "/proc/${PID[$t]}/status")" >> "$RUN/machine.txt"
done

# Per-round ratio KEY(b)/KEY(a) for records "<a>-<kind>-r<round>".
ratio_cell() { # A B KIND KEY
  local rr
  rr=$(lt_ratios "$1" "$2" "$4" "$ROUNDS" "$3-r%s")
  [ -z "$rr" ] && { echo "-"; return; }
  printf '%s (%s)' "$(tr ' ' '\n' <<< "$rr" | lt_median)" "$rr"
}

{
  echo "# NAR streaming: ncro (copy / splice, io_uring / epoll) vs nginx direct"
  echo
  grep -E '^(date|cpu|kernel|git):' "$RUN/machine.txt" | sed 's/^/    /'
  echo
  echo "ncro: one worker on CPU 0; upstream nginx (sendfile, 1 worker) and curl/wrk on CPU 1."
  echo "$ROUNDS rounds, targets in rotating order. 1 stream = 1 curl × $SINGLE_REPS × 100 MiB (keep-alive);"
  echo "$STREAMS streams = $STREAMS curls × $MULTI_REPS × 100 MiB; small = wrk -t1 -c16 ${SMALL_DUR:-(skipped)} on the 1 MiB NAR."
  echo "MB = 10^6 bytes, GB = 10^9 bytes. CPU s/GB = proxy (ncro) CPU seconds per GB relayed, from /proc/PID/stat"
  echo "(includes io-wq threads). Medians with (min–max) over rounds."
  echo "Quiet check before the batch: $(tail -1 "$RUN/load.txt")"
  echo
  echo "| target | 1 stream MB/s | proxy CPU s/GB | CPU 1 s/GB | all CPU s/GB | $STREAMS streams MB/s | proxy CPU s/GB | CPU 1 s/GB | all CPU s/GB | max threads | small req/s | p99 ms | proxy CPU µs/req |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
  for t in $TARGETS; do
    printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$t" \
      "$(lt_stat "^$t-s1-r" MBps)" "$(lt_stat "^$t-s1-r" cpu_s_per_GB)" "$(lt_stat "^$t-s1-r" side_cpu_s_per_GB)" "$(lt_stat "^$t-s1-r" all_cpu_s_per_GB)" \
      "$(lt_stat "^$t-s$STREAMS-r" MBps)" "$(lt_stat "^$t-s$STREAMS-r" cpu_s_per_GB)" "$(lt_stat "^$t-s$STREAMS-r" side_cpu_s_per_GB)" "$(lt_stat "^$t-s$STREAMS-r" all_cpu_s_per_GB)" \
      "$(lt_stat "^$t-s$STREAMS-r" max_threads)" \
      "$(lt_stat "^$t-small-r" rps)" "$(lt_stat "^$t-small-r" p99_ms)" "$(lt_stat "^$t-small-r" us_cpu_per_req)"
  done
  echo
  echo "proxy CPU: the proxy's own (ncro, or the nginx-proxy master and worker; 0 for direct). CPU 1: upstream nginx + clients + ksoftirqd per GB,"
  echo "the work on the CPU that bounds a loopback transfer (the clients' receive copy is there). all CPU: proxy + CPU 1, the fair"
  echo "total on loopback, where the kernel charges the receive-side copy to whichever process runs it."
  echo
  echo "Ratios, median (per round):"
  echo
  echo "| comparison | 1 stream MB/s | 1 stream CPU/GB | $STREAMS streams MB/s | $STREAMS streams CPU/GB | small req/s |"
  echo "|---|---|---|---|---|---|"
  for t in $TARGETS; do
    [ "$t" = direct ] && continue
    printf '| %s / direct | %s | all: %s | %s | all: %s | %s |\n' "$t" \
      "$(ratio_cell direct "$t" s1 MBps)" "$(ratio_cell direct "$t" s1 all_cpu_s_per_GB)" \
      "$(ratio_cell direct "$t" "s$STREAMS" MBps)" "$(ratio_cell direct "$t" "s$STREAMS" all_cpu_s_per_GB)" \
      "$(ratio_cell direct "$t" small rps)"
  done
  case " $TARGETS " in
    *" nginx-proxy "*)
      for t in $TARGETS; do
        case $t in direct | nginx-proxy) continue ;; esac
        printf '| %s / nginx-proxy | %s | proxy: %s | %s | proxy: %s | %s |\n' "$t" \
          "$(ratio_cell nginx-proxy "$t" s1 MBps)" "$(ratio_cell nginx-proxy "$t" s1 cpu_s_per_GB)" \
          "$(ratio_cell nginx-proxy "$t" "s$STREAMS" MBps)" "$(ratio_cell nginx-proxy "$t" "s$STREAMS" cpu_s_per_GB)" \
          "$(ratio_cell nginx-proxy "$t" small rps)"
      done ;;
  esac
  for d in uring epoll; do
    case " $TARGETS " in *" $d-copy "*" $d-splice "*) ;; *) continue ;; esac
    printf '| %s: splice / copy | %s | %s | %s | %s | %s |\n' "$d" \
      "$(ratio_cell "$d-copy" "$d-splice" s1 MBps)" "$(ratio_cell "$d-copy" "$d-splice" s1 cpu_s_per_GB)" \
      "$(ratio_cell "$d-copy" "$d-splice" "s$STREAMS" MBps)" "$(ratio_cell "$d-copy" "$d-splice" "s$STREAMS" cpu_s_per_GB)" \
      "$(ratio_cell "$d-copy" "$d-splice" small rps)"
  done
  echo
  awk '{delete f; for (i=1;i<=NF;i++){split($i,kv,"="); f[kv[1]]=kv[2]} if (f["bad"] != "" && f["bad"] != 0) printf "- WARNING: %s: %s transfers not 200 with the full size\n", f["label"], f["bad"]}' "$RUN/records.txt"
  lt_check_records
} > "$RUN/summary.md"
cat "$RUN/summary.md"
