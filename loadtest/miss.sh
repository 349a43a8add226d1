#!/usr/bin/env bash
# The miss path: what ncro adds to a lookup it has to ask upstreams about.
# All upstreams are `ncro bench upstream` (synthetic, signed narinfos,
# answers from memory) so their latency is known; the load generator is
# `ncro bench run`. Three parts, in one run:
#
#  1. added latency (target: <= 100 us at p50): one upstream with no added
#     delay on CPU 1, ncro (1 worker, CPU 0, route DB on disk, the
#     upstream's public key configured) in front of it. One connection,
#     closed loop, so nothing queues:
#       miss   `narinfo-miss` (fresh random hashes: upstream 404, ncro 404)
#       found  first-time lookups of paths the upstream has (`--once` over
#              a fresh slice of its list each round: parse, signature
#              check, route insert)
#     direct vs through ncro, rounds alternating; the figure is the p50
#     difference.
#  2. two upstreams of different latency: A (2 ms, holds half the paths)
#     and B (6 ms, holds all), ncro racing both (same priority) vs nginx as
#     a fallback chain (A, then B on 404), 8 connections, first-time found
#     lookups and fresh misses.
#  3. herd (target: one upstream request per hash): 1000 connections ask
#     for the same fresh hash at once (`narinfo-herd`), round after round,
#     through a 2-worker ncro; the upstream (20 ms) counts what it got.
#
# Usage: loadtest/miss.sh [NCRO_BIN] [ROUNDS] [DURATION]   (default 3, 5s)
# Env: BASEPORT (18780), HERD_CONNS (1000), HERD_ROUNDS (30),
#      LOAD_MAX/BUSY_MAX/WAIT_MAX (lib.sh).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
NCRO=$(lt_ncro_bin "${1:-}")
ROUNDS=${2:-3}; DUR=${3:-5s}
BASEPORT=${BASEPORT:-18780}
HERD_CONNS=${HERD_CONNS:-1000}; HERD_ROUNDS=${HERD_ROUNDS:-30}
SP=$((BASEPORT + 1)); NC1=$((BASEPORT + 2)); AP=$((BASEPORT + 3)); BP=$((BASEPORT + 4))
NC2=$((BASEPORT + 5)); CHP=$((BASEPORT + 6)); HP=$((BASEPORT + 7)); NC3=$((BASEPORT + 8))
SLICE=20000

lt_init miss
lt_machine

# ncro_conf PORT DB WORKERS CPUS "URL KEY PRIORITY" ...
ncro_conf() {
  local port=$1 db=$2 workers=$3 cpus=$4; shift 4
  printf '[server]\nlisten = "127.0.0.1:%s"\nworkers = %s\ncpus = [%s]\ncontrol_cpu = 0\n' "$port" "$workers" "$cpus"
  local u
  for u in "$@"; do
    set -- $u
    printf '[[upstreams]]\nurl = "%s"\npublic_key = "%s"\npriority = %s\n' "$1" "$2" "$3"
  done
  printf '[cache]\ndb_path = "%s"\n[health]\nenabled = false\n[logging]\nlevel = "warn"\n' "$db"
}

wait_ncro() { lt_wait_http "http://127.0.0.1:$1/nix-cache-info"; }

# ---------------------------------------------------------------- part 1
lt_upstream single "$SP" 1 --narinfos $((SLICE * (ROUNDS + 1)))
SKEY=$UP_KEY
ncro_conf "$NC1" "$W/single.db" 1 0 "http://127.0.0.1:$SP $SKEY 10" > "$W/ncro-single.toml"
cp "$W/ncro-single.toml" "$RUN/"
lt_wait_quiet miss
for r in $(seq "$ROUNDS"); do
  # A fresh ncro and a fresh slice of the list each round: every lookup is
  # a first-time one.
  rm -f "$W"/single.db*
  lt_ncro "$W/ncro-single-$r.log" -- "$NCRO" serve --config "$W/ncro-single.toml"
  wait_ncro "$NC1"
  sed -n "$((r * SLICE + 1)),$(((r + 1) * SLICE))p" "$W/single/hashes.txt" > "$W/slice-$r.txt"
  if [ $((r % 2)) -eq 1 ]; then order="direct ncro"; else order="ncro direct"; fi
  for t in $order; do
    port=$([ "$t" = direct ] && echo "$SP" || echo "$NC1")
    lt_bench "miss-$t-r$r" -t "http://127.0.0.1:$port" -s narinfo-miss --connections 1 -d "$DUR" >/dev/null
    lt_bench "found-$t-r$r" -t "http://127.0.0.1:$port" -s narinfo-hit -l "$W/slice-$r.txt" --once \
      --connections 1 -d "$DUR" >/dev/null
  done
  kill -TERM "$NCRO_PID"; wait "$NCRO_PID" 2>/dev/null || true
done

# ---------------------------------------------------------------- part 2
lt_upstream a "$AP" 1 --narinfos $((SLICE * (ROUNDS + 1))) --latency 2ms --hit-ratio 0.5
AKEY=$UP_KEY
lt_upstream b "$BP" 1 --narinfos $((SLICE * (ROUNDS + 1))) --latency 6ms
BKEY=$UP_KEY
ncro_conf "$NC2" "$W/two.db" 1 0 "http://127.0.0.1:$AP $AKEY 10" "http://127.0.0.1:$BP $BKEY 10" > "$W/ncro-two.toml"
mkdir -p "$W/px"
cat > "$W/nginx-chain.conf" <<NG
worker_processes 1;
worker_cpu_affinity 01;
pid $W/nginx-chain.pid;
error_log $W/nginx-chain-error.log warn;
events { worker_connections 4096; }
http {
  access_log off; tcp_nodelay on;
  keepalive_timeout 65s; keepalive_requests 1000000;
  client_body_temp_path $W/px/body; proxy_temp_path $W/px/proxy;
  fastcgi_temp_path $W/px/fcgi; uwsgi_temp_path $W/px/uwsgi; scgi_temp_path $W/px/scgi;
  upstream cache_a { server 127.0.0.1:$AP; keepalive 256; }
  upstream cache_b { server 127.0.0.1:$BP; keepalive 256; }
  proxy_http_version 1.1;
  proxy_set_header Connection "";
  proxy_buffering on; proxy_buffer_size 16k; proxy_buffers 8 64k; proxy_max_temp_file_size 0;
  server {
    listen 127.0.0.1:$CHP backlog=4096;
    location / { proxy_pass http://cache_a; proxy_intercept_errors on; error_page 404 = @b; }
    location @b { proxy_pass http://cache_b; }
  }
}
NG
cp "$W/ncro-two.toml" "$W/nginx-chain.conf" "$RUN/"
lt_nginx "$W/nginx-chain.conf" 0
lt_wait_http "http://127.0.0.1:$CHP/nix-cache-info"
for r in $(seq "$ROUNDS"); do
  rm -f "$W"/two.db*
  lt_ncro "$W/ncro-two-$r.log" -- "$NCRO" serve --config "$W/ncro-two.toml"
  wait_ncro "$NC2"
  # The chain gets the slice after ncro's, so that both see only fresh paths.
  sed -n "$((r * SLICE + 1)),$((r * SLICE + SLICE / 2))p" "$W/b/hashes.txt" > "$W/two-ncro-$r.txt"
  sed -n "$((r * SLICE + SLICE / 2 + 1)),$(((r + 1) * SLICE))p" "$W/b/hashes.txt" > "$W/two-chain-$r.txt"
  if [ $((r % 2)) -eq 1 ]; then order="chain ncro"; else order="ncro chain"; fi
  for t in $order; do
    port=$([ "$t" = chain ] && echo "$CHP" || echo "$NC2")
    lt_bench "two-found-$t-r$r" -t "http://127.0.0.1:$port" -s narinfo-hit -l "$W/two-$t-$r.txt" --once \
      --connections 8 -d "$DUR" >/dev/null
    lt_bench "two-miss-$t-r$r" -t "http://127.0.0.1:$port" -s narinfo-miss --connections 8 -d "$DUR" >/dev/null
  done
  kill -TERM "$NCRO_PID"; wait "$NCRO_PID" 2>/dev/null || true
done

# ---------------------------------------------------------------- part 3
lt_upstream herd "$HP" 1 --narinfos "$HERD_ROUNDS" --latency 20ms
HKEY=$UP_KEY
ncro_conf "$NC3" "$W/herd.db" 2 "0, 1" "http://127.0.0.1:$HP $HKEY 10" > "$W/ncro-herd.toml"
cp "$W/ncro-herd.toml" "$RUN/"
printf 'env taskset -c 0,1 %s serve --config ncro-herd.toml\n' "$NCRO" >> "$RUN/commands.txt"
taskset -c 0,1 "$NCRO" serve --config "$W/ncro-herd.toml" > "$W/ncro-herd.log" 2>&1 &
NCRO_PID=$!; LT_PIDS+=("$NCRO_PID")
wait_ncro "$NC3"
ulimit -n "$(ulimit -Hn)"
lt_bench herd -t "http://127.0.0.1:$NC3" -s narinfo-herd -l "$W/herd/hashes.txt" \
  --connections "$HERD_CONNS" -d 120s >/dev/null
HERD_UP=$(curl -s "http://127.0.0.1:$HP/_bench/stats")
echo "$HERD_UP" > "$RUN/raw/herd-upstream-stats.json"
curl -s "http://127.0.0.1:$NC3/metrics" | grep -E '^ncro_narinfo_(cache_hits|cache_misses|singleflight_waiters)_total' \
  > "$RUN/raw/herd-ncro-metrics.txt" || true
HERD_REQ=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["narinfo"])' "$HERD_UP")
echo "label=herd-upstream narinfo_requests=$HERD_REQ rounds=$HERD_ROUNDS connections=$HERD_CONNS" >> "$RUN/records.txt"
echo "load_at_end: $(cat /proc/loadavg)" >> "$RUN/machine.txt"

# ---------------------------------------------------------------- summary
# Per-round difference of KEY between "<a>-r<r>" and "<b>-r<r>" (b - a).
diffs() { # PREFIX_A PREFIX_B KEY
  local r va vb out=""
  for r in $(seq "$ROUNDS"); do
    va=$(lt_rec "$1-r$r" "$3"); vb=$(lt_rec "$2-r$r" "$3")
    [ -n "$va" ] && [ -n "$vb" ] && out+="$((vb - va)) "
  done
  echo "${out% }"
}
{
  echo "# Miss path: latency ncro adds, two upstreams, thundering herd"
  echo
  grep -E '^(date|cpu|kernel|git|load_at_start|load_at_end):' "$RUN/machine.txt" | sed 's/^/    /'
  echo
  echo "ncro: 1 worker on CPU 0 (parts 1-2), 2 workers on CPUs 0,1 (part 3); synthetic upstreams and"
  echo "\`ncro bench run\` (one client thread) on CPU 1. $ROUNDS rounds of $DUR per measurement."
  echo "Quiet check: $(tail -1 "$RUN/load.txt")"
  echo
  echo "## 1. Latency added by ncro (one upstream, no delay, 1 connection)"
  echo
  echo "| lookup | direct p50 µs | through ncro p50 µs | added p50 µs per round | **added p50, median** | direct p99 µs | ncro p99 µs |"
  echo "|---|---|---|---|---|---|---|"
  for k in miss found; do
    d=$(diffs "$k-direct" "$k-ncro" p50_us)
    printf '| %s | %s | %s | %s | **%s** | %s | %s |\n' "$k" \
      "$(lt_stat "^$k-direct-r" p50_us)" "$(lt_stat "^$k-ncro-r" p50_us)" "$d" \
      "$(tr ' ' '\n' <<< "$d" | lt_median)" "$(lt_stat "^$k-direct-r" p99_us)" "$(lt_stat "^$k-ncro-r" p99_us)"
  done
  echo
  echo "miss = \`narinfo-miss\` (upstream 404, ncro 404 and a negative entry); found = first-time lookup of a"
  echo "path the upstream has (\`--once\`): parse, ed25519 check, route insert and DB write queued."
  echo
  echo "## 2. Two upstreams: A 2 ms (holds half), B 6 ms (holds all); 8 connections"
  echo
  echo "| lookup | server | req/s | p50 µs | p90 µs | p99 µs | statuses |"
  echo "|---|---|---|---|---|---|---|"
  for k in found miss; do
    for t in ncro chain; do
      printf '| %s | %s | %s | %s | %s | %s | %s |\n' "$k" "$t" \
        "$(lt_stat "^two-$k-$t-r" rps)" "$(lt_stat "^two-$k-$t-r" p50_us)" \
        "$(lt_stat "^two-$k-$t-r" p90_us)" "$(lt_stat "^two-$k-$t-r" p99_us)" "$(lt_rec "two-$k-$t-r1" statuses)"
    done
  done
  echo
  echo "ncro races A and B (same priority) and answers with the first 200, or 404 once both said so;"
  echo "the chain asks A, then B after A's 404."
  echo
  echo "## 3. Herd: $HERD_CONNS connections ask for the same fresh hash at once, $HERD_ROUNDS rounds"
  echo
  echo "- upstream narinfo requests: **$HERD_REQ** for $HERD_ROUNDS hashes (target: one per hash)"
  echo "- client side: $(grep '^label=herd ' "$RUN/records.txt" | cut -d' ' -f2-8)"
  echo "- ncro: $(tr '\n' ' ' < "$RUN/raw/herd-ncro-metrics.txt")"
  echo
  lt_check_records
} > "$RUN/summary.md"
cat "$RUN/summary.md"
