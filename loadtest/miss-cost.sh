#!/usr/bin/env bash
# CPU and allocator calls per narinfo miss, two binaries alternated.
#
# The load of loadtest/miss-tiers.sh without the nginx chain: one nginx
# serving caches A and B on loopback, ncro with A at priority 10 and B at
# 20 and a fresh route database per run, wrk -t2 -c64 with rotate.lua over
# the first MISS_PATHS paths of present-all. Per run it prints requests,
# req/s, the CPU of the ncro process and of its ncro-worker-* threads per
# request (/proc tick counts over the wrk run), and the established
# upstream connections at the end. With COUNT=1 each binary gets one more
# run under uprobes on libc's malloc, posix_memalign, realloc and free and
# io_uring tracepoints (root; exact counts per request on the worker
# threads, robust to other load on the machine, but the probes slow it).
#
# Usage: loadtest/miss-cost.sh BEFORE_BIN AFTER_BIN [ROUNDS] [SECONDS]  (6, 3)
# Env: CACHES (/tmp/ncro-bench/caches), MISS_PATHS (50000), BASEPORT (18980),
#      COUNT (0), OUT (a new folder under /tmp).
set -euo pipefail
BEFORE=$1; AFTER=$2; ROUNDS=${3:-6}; DUR=${4:-3}
CACHES=${CACHES:-/tmp/ncro-bench/caches}; MISS_PATHS=${MISS_PATHS:-50000}
BASEPORT=${BASEPORT:-18980}; COUNT=${COUNT:-0}
UPA=$((BASEPORT + 1)); UPB=$((BASEPORT + 2)); NC=$((BASEPORT + 3))
OUT=${OUT:-$(mktemp -d /tmp/miss-cost.XXXXXX)}
LUA="$(cd "$(dirname "$0")" && pwd)/rotate.lua"
mkdir -p "$OUT"
head -n "$MISS_PATHS" "$CACHES/lists/present-all.txt" > "$OUT/paths.txt"
cat > "$OUT/nginx-up.conf" <<NG
worker_processes auto;
pid $OUT/nginx-up.pid;
error_log $OUT/nginx-up-error.log warn;
events { worker_connections 4096; }
http {
  access_log off; sendfile on; tcp_nopush on; tcp_nodelay on;
  keepalive_timeout 65s; keepalive_requests 1000000;
  types { text/x-nix-narinfo narinfo; }
  server { listen 127.0.0.1:$UPA backlog=4096; root $CACHES/A; }
  server { listen 127.0.0.1:$UPB backlog=4096; root $CACHES/B; }
}
NG
cat > "$OUT/ncro.toml" <<NC
[server]
listen = "127.0.0.1:$NC"
[[upstreams]]
url = "http://127.0.0.1:$UPA"
priority = 10
[[upstreams]]
url = "http://127.0.0.1:$UPB"
priority = 20
[cache]
db_path = "$OUT/routes.db"
[logging]
level = "warn"
NC
nginx -e "$OUT/nginx-startup.log" -p "$OUT" -c "$OUT/nginx-up.conf"
NCRO_PID=
cleanup() {
  [ -n "$NCRO_PID" ] && kill -TERM "$NCRO_PID" 2>/dev/null || true
  [ -s "$OUT/nginx-up.pid" ] && kill -QUIT "$(cat "$OUT/nginx-up.pid")" 2>/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$UPA/nix-cache-info" >/dev/null && break; sleep 0.1; done

start_ncro() { # BIN LABEL
  rm -f "$OUT"/routes.db*
  "$1" serve --config "$OUT/ncro.toml" > "$OUT/ncro-$2.log" 2>&1 &
  NCRO_PID=$!
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$NC/nix-cache-info" >/dev/null && return; sleep 0.1; done
  echo "ncro did not start: $OUT/ncro-$2.log" >&2; exit 1
}
stop_ncro() { kill -TERM "$NCRO_PID"; wait "$NCRO_PID" 2>/dev/null || true; NCRO_PID=; }
proc_ticks() { awk '{print $14 + $15}' "/proc/$NCRO_PID/stat"; }
worker_ticks() {
  local t
  for t in /proc/"$NCRO_PID"/task/*; do
    case $(cat "$t/comm") in ncro-worker*) sed 's/.*) //' "$t/stat" | awk '{print $12 + $13}';; esac
  done | awk '{s += $1} END {print s + 0}'
}
run_wrk() { wrk -t2 -c64 -d"${DUR}s" -s "$LUA" "http://127.0.0.1:$NC" -- "$OUT/paths.txt" 2 > "$OUT/wrk-$1.txt" 2>&1; }

one() { # BIN LABEL
  local p0 p1 w0 w1 reqs conns hz
  hz=$(getconf CLK_TCK)
  start_ncro "$1" "$2"
  p0=$(proc_ticks); w0=$(worker_ticks)
  run_wrk "$2"
  p1=$(proc_ticks); w1=$(worker_ticks)
  conns=$(ss -tnH state established "( dport = :$UPA or dport = :$UPB )" | wc -l)
  stop_ncro
  reqs=$(awk '/requests in/ {print $1}' "$OUT/wrk-$2.txt")
  awk -v l="$2" -v r="$reqs" -v p=$((p1 - p0)) -v w=$((w1 - w0)) -v hz="$hz" -v d="$DUR" -v c="$conns" -v la="$(cut -d' ' -f1 /proc/loadavg)" \
    'BEGIN {printf "%s requests=%d rps=%.0f cpu_us_per_req=%.1f worker_us_per_req=%.1f upstream_conns=%d load1=%s\n", l, r, r / d, 1e6 * p / hz / r, 1e6 * w / hz / r, c, la}' \
    | tee -a "$OUT/records.txt"
}

count() { # BIN LABEL
  local libc ev reqs
  libc=$(ldd "$1" | awk '/libc.so/ {print $3}')
  for f in malloc posix_memalign realloc free; do
    perf probe -q -x "$libc" --add "$f" 2>/dev/null || true
  done
  ev=probe_libc:malloc,probe_libc:posix_memalign,probe_libc:realloc,probe_libc:free,io_uring:io_uring_submit_req
  start_ncro "$1" "$2"
  perf stat -x, -e "$ev" --per-thread -p "$NCRO_PID" -o "$OUT/count-$2.txt" -- sleep $((DUR + 1)) &
  local ps=$!
  sleep 0.3
  run_wrk "$2"
  wait "$ps"
  stop_ncro
  reqs=$(awk '/requests in/ {print $1}' "$OUT/wrk-$2.txt")
  awk -F, -v r="$reqs" -v l="$2" '$1 ~ /^ncro-worker/ && $2 ~ /^[0-9]+$/ {v[$4] += $2}
    END {printf "%s requests=%d per request on the workers:", l, r; for (k in v) printf " %s=%.2f", k, v[k] / r; printf "\n"}' \
    "$OUT/count-$2.txt" | tee -a "$OUT/records.txt"
}

echo "before=$BEFORE after=$AFTER rounds=$ROUNDS dur=${DUR}s out=$OUT" | tee "$OUT/records.txt"
for r in $(seq "$ROUNDS"); do
  if [ $((r % 2)) -eq 1 ]; then one "$BEFORE" "before-r$r"; one "$AFTER" "after-r$r"
  else one "$AFTER" "after-r$r"; one "$BEFORE" "before-r$r"; fi
done
if [ "$COUNT" = 1 ]; then count "$BEFORE" before-count; count "$AFTER" after-count; fi
for who in before after; do
  for k in worker_us_per_req cpu_us_per_req rps; do
    grep "^$who-r" "$OUT/records.txt" | tr ' ' '\n' | awk -F= -v k="$k" '$1 == k {print $2}' | sort -g |
      awk -v w="$who" -v k="$k" '{a[NR] = $1} END {m = (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2; printf "%s %s median %s (%s-%s), %d runs\n", w, k, m, a[1], a[NR], NR}'
  done
done | tee -a "$OUT/records.txt"
