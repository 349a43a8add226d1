#!/usr/bin/env bash
# Memory and start-up footprint (targets: 1,000,000 routes under 300 MB RSS
# and loaded in under 2 s; 10,000 idle keep-alive connections under 100 MB).
#
#  routes  A route database with ROUTES realistic routes (gen-routes.py:
#          ~550-byte narinfos, two upstreams; generated once and kept in
#          CACHES) is copied to scratch. ncro (2 workers) starts on it twice:
#          the first start moves the database's ncro 2.2 `routes` table into
#          the route log and rewrites the file with 16 KiB pages (reported,
#          not the figure); the second is measured: the
#          "route database loaded" time ncro logs, the wall time until it
#          answers, its CPU time and its RSS. Then HITS distinct routes are
#          requested (their narinfos are read back from the database and kept
#          in memory up to cache.narinfo_memory_mb) and RSS is read again.
#  idle    ncro (2 workers, empty route table) and loadtest/idle-conns.py
#          opening IDLE_CONNS keep-alive connections, one request each, then idle;
#          RSS before and after.
#
# Usage: loadtest/footprint.sh [NCRO_BIN]
# Env: ROUTES (1000000), HITS (200000), IDLE_CONNS (10000), CACHES
#      (/tmp/ncro-bench/caches), BASEPORT (18880), LOAD_MAX/BUSY_MAX/WAIT_MAX.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
NCRO=$(lt_ncro_bin "${1:-}")
ROUTES=${ROUTES:-1000000}; HITS=${HITS:-200000}; IDLE_CONNS=${IDLE_CONNS:-10000}
CACHES=${CACHES:-/tmp/ncro-bench/caches}
BASEPORT=${BASEPORT:-18880}
PORT=$((BASEPORT + 1)); IPORT=$((BASEPORT + 2))

lt_init footprint
lt_machine
mkdir -p "$CACHES"
GEN=$(sha256sum "$LT_DIR/gen-routes.py" | cut -c1-16)
SRC="$CACHES/routes-$ROUTES-$GEN.db"
if [ ! -s "$SRC" ] || [ ! -s "$SRC.hashes" ]; then
  lt_cmd python3 "$LT_DIR/gen-routes.py" "$SRC" "$ROUTES" \
    --upstreams "http://127.0.0.1:$((BASEPORT + 3)),http://127.0.0.1:$((BASEPORT + 4))" >&2
fi
echo "route database: $SRC ($(du -m "$SRC" | cut -f1) MB)" >> "$RUN/machine.txt"
lt_cmd cp "$SRC" "$W/routes.db"
# The generated routes were verified when the file was made; ncro drops
# routes older than its TTL at load, so a file kept from an earlier day
# would load nothing. Move every timestamp forward by the file's age.
lt_cmd python3 -c '
import sqlite3, sys, time
c = sqlite3.connect(sys.argv[1])
d = int(time.time()) - c.execute("SELECT MAX(last_verified) FROM routes").fetchone()[0]
c.execute("UPDATE routes SET last_verified = last_verified + ?, ttl = ttl + ?", (d, d))
c.commit()' "$W/routes.db"
cat > "$W/ncro-routes.toml" <<NC
[server]
listen = "127.0.0.1:$PORT"
workers = 2
[[upstreams]]
url = "http://127.0.0.1:$((BASEPORT + 3))"
priority = 10
[[upstreams]]
url = "http://127.0.0.1:$((BASEPORT + 4))"
priority = 10
[cache]
db_path = "$W/routes.db"
max_entries = $((ROUTES + ROUTES / 10))
[health]
enabled = false
NC
cp "$W/ncro-routes.toml" "$RUN/"

rss_kb() { awk '/^VmRSS/{print $2}' "/proc/$1/status"; }
hwm_kb() { awk '/^VmHWM/{print $2}' "/proc/$1/status"; }
cpu_s() { awk -v hz="$LT_HZ" '{printf "%.2f", ($14 + $15) / hz}' "/proc/$1/stat"; }

# start_routes LABEL: starts ncro on the route DB, waits until it answers;
# records load time (ncro's log), wall time, CPU and RSS.
start_routes() {
  local label=$1 t0 t1 ms i
  t0=$(date +%s.%N)
  lt_ncro "$W/ncro-$label.log" -- "$NCRO" serve --config "$W/ncro-routes.toml"
  for i in $(seq 1200); do curl -s -o /dev/null "http://127.0.0.1:$PORT/nix-cache-info" && break; sleep 0.05; done
  t1=$(date +%s.%N)
  ms=$(grep -o '"route database loaded".*' "$W/ncro-$label.log" | grep -o '"ms":[0-9]*' | cut -d: -f2)
  local routes
  routes=$(grep -o '"route database loaded".*' "$W/ncro-$label.log" | grep -o '"routes":[0-9]*' | cut -d: -f2)
  [ "${routes:-0}" -gt 0 ] || lt_die "ncro loaded no routes from $W/routes.db (see $W/ncro-$label.log)"
  sleep 0.5
  echo "label=$label routes=${routes:-0} load_ms=${ms:-0} ready_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.2f", b - a}') cpu_s=$(cpu_s "$NCRO_PID") rss_kB=$(rss_kb "$NCRO_PID") hwm_kB=$(hwm_kb "$NCRO_PID") load1=$(lt_load1)" \
    | tee -a "$RUN/records.txt"
}

stop_ncro() { kill -TERM "$NCRO_PID"; wait "$NCRO_PID" 2>/dev/null || true; }

lt_wait_quiet footprint
start_routes routes-first-start
stop_ncro
start_routes routes-load
head -"$HITS" "$SRC.hashes" > "$W/hits.txt"
lt_bench routes-hits -t "http://127.0.0.1:$PORT" -s narinfo-hit -l "$W/hits.txt" --once \
  --connections 32 -d 300s >/dev/null
echo "label=routes-after-hits rss_kB=$(rss_kb "$NCRO_PID") hwm_kB=$(hwm_kb "$NCRO_PID") $(curl -s "http://127.0.0.1:$PORT/metrics" | awk '/^ncro_route_narinfo_(memory_bytes|disk_reads_total) /{printf "%s=%s ", $1, $2}')" \
  | tee -a "$RUN/records.txt"
stop_ncro

# ---------------------------------------------------------------- idle
cat > "$W/ncro-idle.toml" <<NC
[server]
listen = "127.0.0.1:$IPORT"
workers = 2
read_timeout = "600s"
[[upstreams]]
url = "http://127.0.0.1:$((BASEPORT + 3))"
[cache]
db_path = ":memory:"
[health]
enabled = false
NC
cp "$W/ncro-idle.toml" "$RUN/"
ulimit -n "$(ulimit -Hn)"
[ "$(ulimit -n)" -gt $((IDLE_CONNS + 100)) ] || lt_die "ulimit -n $(ulimit -n) is too low for $IDLE_CONNS connections"
for drv in io_uring epoll; do
  envs=(); [ "$drv" = epoll ] && envs=(MONOIO_FORCE_LEGACY_DRIVER=1)
  lt_ncro "$W/ncro-idle-$drv.log" "${envs[@]}" -- "$NCRO" serve --config "$W/ncro-idle.toml"
  lt_wait_http "http://127.0.0.1:$IPORT/nix-cache-info"
  r0=$(rss_kb "$NCRO_PID")
  printf 'python3 loadtest/idle-conns.py 127.0.0.1 %s %s /nix-cache-info 120\n' "$IPORT" "$IDLE_CONNS" >> "$RUN/commands.txt"
  coproc IDLE { python3 "$LT_DIR/idle-conns.py" 127.0.0.1 "$IPORT" "$IDLE_CONNS" /nix-cache-info 120; }
  read -r line <&"${IDLE[0]}"
  sleep 1
  r1=$(rss_kb "$NCRO_PID")
  echo "label=idle-$drv conns=$IDLE_CONNS $line rss_before_kB=$r0 rss_idle_kB=$r1 per_conn_B=$(( (r1 - r0) * 1024 / IDLE_CONNS ))" \
    | tee -a "$RUN/records.txt"
  eval "exec ${IDLE[1]}>&-"
  wait "$IDLE_PID" 2>/dev/null || true
  stop_ncro
done
echo "load_at_end: $(cat /proc/loadavg)" >> "$RUN/machine.txt"

{
  echo "# Footprint: 1M routes, 10k idle connections"
  echo
  grep -E '^(date|cpu|kernel|git|load_at_start|load_at_end|route database):' "$RUN/machine.txt" | sed 's/^/    /'
  echo
  echo "ncro with 2 workers. Quiet check: $(tail -1 "$RUN/load.txt")"
  echo
  echo "| measurement | routes | load ms (ncro's log) | ready s (wall) | ncro CPU s | RSS MB |"
  echo "|---|---|---|---|---|---|"
  for l in routes-first-start routes-load; do
    printf '| %s | %s | %s | %s | %s | %s |\n' "$l" "$(lt_rec "$l" routes)" "$(lt_rec "$l" load_ms)" \
      "$(lt_rec "$l" ready_s)" "$(lt_rec "$l" cpu_s)" "$(awk -v k="$(lt_rec "$l" rss_kB)" 'BEGIN{printf "%.0f", k / 1024}')"
  done
  printf '| after %s distinct hits | | | | | %s |\n' "$HITS" "$(awk -v k="$(lt_rec routes-after-hits rss_kB)" 'BEGIN{printf "%.0f", k / 1024}')"
  echo
  echo "routes-first-start also imports the ncro 2.2 routes table into the route log (and rewrites the file with 16 KiB pages), once per database written by ncro 2.2."
  echo "Hits: $(grep '^label=routes-hits ' "$RUN/records.txt" | cut -d' ' -f2-8)"
  echo "After them: $(grep '^label=routes-after-hits ' "$RUN/records.txt" | cut -d' ' -f4-)"
  echo
  echo "| driver | idle connections | RSS before MB | RSS idle MB | bytes per connection |"
  echo "|---|---|---|---|---|"
  for drv in io_uring epoll; do
    printf '| %s | %s | %s | %s | %s |\n' "$drv" "$(lt_rec "idle-$drv" open)" \
      "$(awk -v k="$(lt_rec "idle-$drv" rss_before_kB)" 'BEGIN{printf "%.0f", k / 1024}')" \
      "$(awk -v k="$(lt_rec "idle-$drv" rss_idle_kB)" 'BEGIN{printf "%.0f", k / 1024}')" "$(lt_rec "idle-$drv" per_conn_B)"
  done
} > "$RUN/summary.md"
cat "$RUN/summary.md"
