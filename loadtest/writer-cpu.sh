#!/usr/bin/env bash
# CPU of the route writer thread (`ncro-db-writer`) per route written,
# under the miss load of loadtest/miss-tiers.sh: ncro (2 workers, fresh
# route database on disk) in front of nginx serving the fake caches A and B
# (priority 10 and 20), wrk -t2 -c64 walking the first MISS_PATHS paths of
# present-all with rotate.lua, so that every request is a first-time
# lookup and every route found is a new route.
#
# Per run: the writer thread's on-CPU time is read from
# /proc/PID/task/TID/schedstat (nanoseconds) once ncro answers and again
# SETTLE seconds after wrk ends (its last batch committed), and divided by
# the routes it committed in between (`ncro_route_writer_rows_total`).
# The binaries run alternately, ROUNDS rounds, each on a fresh database.
# The sizes of the database file and its WAL at that moment say whether
# the run included a WAL checkpoint (the file grows only at one).
#
# Usage: loadtest/writer-cpu.sh BIN_A BIN_B [ROUNDS] [DURATION]   (3, 4s)
# Env: MISS_PATHS (50000), CONNS (64), CACHES, BASEPORT (18880), SETTLE (1),
#      MAX_ENTRIES (cache.max_entries: 100000, or twice MISS_PATHS above it),
#      PER_CLASS (gen-caches.py's; 40000 gives 120,000 present paths: use
#      its own CACHES directory),
#      PERF=1 (perf record of the writer thread during each run, into the
#      run folder: perf-BIN-ROUND.data; PERF_ARGS adds options to it, e.g.
#      "--call-graph dwarf,16384"; the sampling costs the thread CPU too,
#      so compare µs/route only between runs without PERF).
set -euo pipefail
export LT_PIN=0 WRK_THREADS=${WRK_THREADS:-2}
. "$(dirname "$0")/lib.sh"
A=$1; B=$2; ROUNDS=${3:-3}; DUR=${4:-4s}
CONNS=${CONNS:-64}; MISS_PATHS=${MISS_PATHS:-50000}; SETTLE=${SETTLE:-1}
# Above MISS_PATHS: no route is evicted (and raced again) during a run.
MAX_ENTRIES=${MAX_ENTRIES:-$((MISS_PATHS > 100000 ? MISS_PATHS * 2 : 100000))}
CACHES=${CACHES:-/tmp/ncro-bench/caches}
BASEPORT=${BASEPORT:-18880}
UPA=$((BASEPORT + 1)); UPB=$((BASEPORT + 2)); NCPORT=$((BASEPORT + 3))

lt_init writer-cpu
lt_machine
lt_caches "$CACHES"
L="$W/paths.txt"
head -n "$MISS_PATHS" "$CACHES/lists/present-all.txt" > "$L"
lt_caches_nginx_conf "$W/nginx-up.conf" "$W" "worker_processes auto;" "$UPA" "$UPB" "$CACHES"
cat > "$W/ncro.toml" <<NC
[server]
listen = "127.0.0.1:$NCPORT"
workers = 2
[[upstreams]]
url = "http://127.0.0.1:$UPA"
priority = 10
[[upstreams]]
url = "http://127.0.0.1:$UPB"
priority = 20
[cache]
db_path = "$W/routes.db"
max_entries = $MAX_ENTRIES
[logging]
level = "warn"
NC
cp "$W/nginx-up.conf" "$W/ncro.toml" "$RUN/"
lt_nginx "$W/nginx-up.conf" 1; UPPIDS=$NGINX_PIDS
lt_wait_http "http://127.0.0.1:$UPA/nix-cache-info"

writer_tid() { # PID: the tid of its ncro-db-writer thread
  local t
  for t in /proc/"$1"/task/*; do
    if [ "$(cat "$t/comm")" = ncro-db-writer ]; then basename "$t"; return; fi
  done
}
writer_ns() { # PID: on-CPU ns of its ncro-db-writer thread
  local tid
  tid=$(writer_tid "$1")
  if [ -n "$tid" ]; then cut -d' ' -f1 "/proc/$1/task/$tid/schedstat"; else echo 0; fi
}
rows() { curl -s "http://127.0.0.1:$NCPORT/metrics" | awk '$1=="ncro_route_writer_rows_total"{print $2}'; }

lt_wait_quiet writer-cpu
for r in $(seq "$ROUNDS"); do
  if [ $((r % 2)) -eq 1 ]; then order="a b"; else order="b a"; fi
  for t in $order; do
    if [ "$t" = a ]; then bin=$A; else bin=$B; fi
    rm -f "$W"/routes.db*
    lt_ncro "$W/ncro-$t-$r.log" -- "$bin" serve --config "$W/ncro.toml"
    lt_wait_http "http://127.0.0.1:$NCPORT/nix-cache-info"
    sleep 0.5
    c0=$(writer_ns "$NCRO_PID"); n0=$(rows)
    if [ "${PERF:-0}" = 1 ]; then
      perf record -q ${PERF_ARGS:-} -t "$(writer_tid "$NCRO_PID")" -o "$RUN/perf-$t-$r.data" 2>/dev/null &
      PERF_PID=$!
    fi
    lt_wrk "$t-r$r" "http://127.0.0.1:$NCPORT" "$L" "$CONNS" "$DUR" "$NCRO_PID" "$UPPIDS" >/dev/null
    sleep "$SETTLE"
    c1=$(writer_ns "$NCRO_PID"); n1=$(rows)
    # The database file only grows at a checkpoint (the WAL's pages are
    # copied into it): db_mb > 0 says this run included one.
    db=$(stat -c %s "$W/routes.db"); wal=$(stat -c %s "$W/routes.db-wal" 2>/dev/null || echo 0)
    if [ "${PERF:-0}" = 1 ]; then kill -INT "$PERF_PID"; wait "$PERF_PID" 2>/dev/null || true; fi
    kill -TERM "$NCRO_PID"; wait "$NCRO_PID" 2>/dev/null || true
    awk -v t="$t" -v r="$r" -v bin="$bin" -v c="$((c1 - c0))" -v n="$((n1 - n0))" -v db="$db" -v wal="$wal" \
      'BEGIN {printf "binary=%s bin=%s round=%d writer_cpu_s=%.3f rows=%d us_per_route=%.2f db_mb=%.1f wal_mb=%.1f\n", t, bin, r, c / 1e9, n, (n > 0 ? c / 1e3 / n : 0), db / 1e6, wal / 1e6}' \
      | tee -a "$RUN/writer.txt"
  done
done
echo "load_at_end: $(cat /proc/loadavg)" >> "$RUN/machine.txt"
