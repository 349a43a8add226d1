#!/usr/bin/env bash
# Overload: route-cache hit latency and ncro's memory with and without a
# burst of unique narinfo misses far beyond max_concurrent_races, measured
# with `ncro bench` only (no nginx).
#
#   - upstream A (`ncro bench upstream`, CPU 1): N signed paths, answers at
#     once; upstream B (CPU 1): holds nothing and answers everything after
#     DELAY (2 s). Same tier, so a miss race ends only when B's 404 arrives:
#     each miss holds a race permit for DELAY, and the default 64 permits
#     sustain 64 / 2 s = 32 misses/s;
#   - ncro with one worker on CPU 0 (whole process under taskset -c 0),
#     health probes off, the default race limits (64 races, 64 queued per
#     worker, waiting at most race_deadline = 5 s) and
#     per_upstream_max_inflight raised to 64 (see ncro.toml below);
#   - the route cache is warmed with all N paths (A answers at once);
#   - per round, in rotating order, the same open-loop hit run (HIT_RATE
#     req/s over 16 connections, DUR) with, from 1 s before to 1 s after it:
#       quiet: nothing else;
#       burst: `bench run -s narinfo-miss` sending MISS_RATE unique misses/s
#              (open loop) over MISS_CONNS connections, about 60 times what
#              64 races of 2 s can take. Each connection carries about one
#              miss a second, so the ~128 connections whose miss waits for
#              a race or a queue slot hold up little behind them;
#       flood: unique misses from FLOOD_CONNS connections in a closed loop
#              (each sends its next miss as soon as the last is answered):
#              as many shed misses per second as the client can send, a
#              CPU-bound denial of service rather than a burst;
#   - ncro's VmRSS is sampled every 0.2 s: before, peak, and 8 s after each
#     run (after every queued miss has been answered).
#
# Usage: overload.sh [NCRO] [DUR] [ROUNDS]
# Env: N (2000), DELAY (2s), HIT_RATE (2000), MISS_RATE (2000),
#      MISS_CONNS (2048), FLOOD_CONNS (1024), KINDS ("quiet burst flood")
set -euo pipefail
. "$(dirname "$0")/lib.sh"

NCRO=$(lt_ncro_bin "${1:-}")
DUR=${2:-10}
ROUNDS=${3:-3}
N=${N:-2000}
DELAY=${DELAY:-2s}
HIT_RATE=${HIT_RATE:-2000}
MISS_RATE=${MISS_RATE:-2000}
MISS_CONNS=${MISS_CONNS:-2048}
FLOOD_CONNS=${FLOOD_CONNS:-1024}
KINDS=${KINDS:-quiet burst flood}

lt_init overload
lt_machine
{
  echo "n_paths: $N  upstream_b_delay: $DELAY  hit_rate: $HIT_RATE/s  burst: $MISS_RATE/s over $MISS_CONNS conns  flood: $FLOOD_CONNS conns closed loop  dur: ${DUR}s  rounds: $ROUNDS"
} >> "$RUN/machine.txt"

# Three free ports below the ephemeral range: the miss burst opens
# thousands of client connections, whose ephemeral ports could otherwise
# take one of ours between choosing it and binding it.
read -r APORT BPORT NCPORT < <(python3 - <<'PY'
import random, socket
low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
ports = []
while len(ports) < 3:
    p = random.randrange(10000, low)
    try:
        socket.socket().bind(("127.0.0.1", p))
    except OSError:
        continue
    if p not in ports:
        ports.append(p)
print(*ports)
PY
)

upstream() { # LABEL PORT ARGS...: starts a bench upstream on CPU 1
  local label=$1 port=$2; shift 2
  printf 'taskset -c 1 %s bench upstream --listen 127.0.0.1:%s --threads 1 %s\n' "$NCRO" "$port" "$*" >> "$RUN/commands.txt"
  taskset -c 1 "$NCRO" bench upstream --listen "127.0.0.1:$port" --threads 1 "$@" > "$W/$label.log" 2>&1 &
  LT_PIDS+=("$!")
}
upstream a "$APORT" --narinfos "$N" --seed 1
upstream b "$BPORT" --narinfos 1 --seed 99 --latency "$DELAY"
lt_wait_http "http://127.0.0.1:$APORT/nix-cache-info"
# B answers after DELAY, longer than lt_wait_http's 1 s per try.
for i in $(seq 20); do
  curl -s -o /dev/null --max-time 5 "http://127.0.0.1:$BPORT/nix-cache-info" && break
  [ "$i" -lt 20 ] || lt_die "upstream B does not answer"
  sleep 0.2
done
KEY=$(awk '/^public key:/{print $3}' "$W/a.log")
[ -n "$KEY" ] || lt_die "upstream A printed no public key"

cat > "$W/ncro.toml" <<NC
[server]
listen = "127.0.0.1:$NCPORT"
workers = 1
cpus = [0]

[[upstreams]]
url = "http://127.0.0.1:$APORT"
priority = 10
public_key = "$KEY"

[[upstreams]]
url = "http://127.0.0.1:$BPORT"
priority = 10

[cache]
db_path = "$W/routes.db"
max_entries = 100000

# Every race may ask B at once, so each miss holds its race permit for
# DELAY and nothing else limits it (with the default 8, races would queue
# for B, time out, and put B in a cooldown that turns misses into fast 502s).
[cache.mass_query]
max_concurrent_races = 64
per_upstream_max_inflight = 64

[health]
enabled = false
NC
cp "$W/ncro.toml" "$RUN/ncro.toml"
lt_ncro "$W/ncro.log" -- "$NCRO" serve --config "$W/ncro.toml"
lt_wait_http "http://127.0.0.1:$NCPORT/nix-cache-info"
T="http://127.0.0.1:$NCPORT"

rss() { awk '/^VmRSS:/{print $2}' "/proc/$NCRO_PID/status"; }
metric() { curl -s "$T/metrics" | awk -v n="$1" '$1 == n {print $2}'; }
shed() { curl -s "$T/metrics" | awk '$1 ~ /^ncro_narinfo_shed_total/ {s += $2} END {print s + 0}'; }

# Warm the route cache with every path (and check they are all hits).
lt_cmd taskset -c 1 "$NCRO" bench run -q -t "$T" -s narinfo-hit --synthetic "$N" --seed 1 \
  --connections 16 --threads 1 -n "$((2 * N))" --json "$RUN/raw/warm.json" > "$RUN/raw/warm.txt"
echo "routes after warm-up: $(metric ncro_route_entries)" | tee -a "$RUN/machine.txt" >&2

hits() { # LABEL
  lt_cmd taskset -c 1 "$NCRO" bench run -q -t "$T" -s narinfo-hit --synthetic "$N" --seed 1 \
    -r "$HIT_RATE" --connections 16 --threads 1 -d "${DUR}s" --json "$RUN/raw/$1.json" > "$RUN/raw/$1.txt"
}

run() { # KIND ROUND
  local kind=$1 r=$2 label="$1-r$2" before peak after s0 s1 sampler mpid
  before=$(rss); s0=$(shed)
  echo "$before" > "$W/peak"
  ( p=$before; while :; do v=$(rss) || exit 0; [ "$v" -gt "$p" ] && p=$v && echo "$p" > "$W/peak"; sleep 0.2; done ) &
  sampler=$!
  local load=()
  case $kind in
    burst) load=(-r "$MISS_RATE" --connections "$MISS_CONNS") ;;
    flood) load=(--connections "$FLOOD_CONNS") ;;
  esac
  if [ "$kind" != quiet ]; then
    # nice 10: the miss generator shares CPU 1 with the hit generator, whose
    # open-loop latencies would otherwise include waiting for CPU 1.
    lt_cmd taskset -c 1 nice -n 10 "$NCRO" bench run -q -t "$T" -s narinfo-miss "${load[@]}" \
      --threads 1 -d "$((DUR + 2))s" --timeout 10s \
      --json "$RUN/raw/$label-misses.json" > "$RUN/raw/$label-misses.txt" &
    mpid=$!
    sleep 1
  fi
  local t0 t1 w0 w1
  t0=$(lt_ticks "$NCRO_PID"); w0=$(date +%s%N)
  hits "$label"
  t1=$(lt_ticks "$NCRO_PID"); w1=$(date +%s%N)
  if [ "$kind" != quiet ]; then wait "$mpid"; fi
  # Queued misses are answered within race_deadline (5 s); a cooldown that
  # a flood may have put B in lasts upstream_cooldown (15 s).
  sleep 16
  kill "$sampler" 2>/dev/null || true
  wait "$sampler" 2>/dev/null || true
  peak=$(cat "$W/peak"); after=$(rss); s1=$(shed)
  local cpu
  cpu=$(( 100 * (t1 - t0) * 1000000000 / LT_HZ / (w1 - w0) ))
  python3 - "$RUN/raw/$label.json" "$RUN/raw/$label-misses.json" "$label" "$before" "$peak" "$after" "$((s1 - s0))" "$(lt_load1)" "$cpu" <<'PY' | tee -a "$RUN/records.txt"
import json, os, sys
hit_f, miss_f, label, before, peak, after, shed, load, cpu = sys.argv[1:]
h = json.load(open(hit_f))
lat = h["latency_us"]
rec = dict(label=label, hit_req_s=round(h["req_per_s"]), hit_errors=h["errors"],
           hit_p50_us=lat["p50"], hit_p90_us=lat["p90"], hit_p99_us=lat["p99"],
           hit_p999_us=lat["p999"], hit_max_us=lat["max"],
           ncro_cpu_pct=cpu, rss_before_kib=before, rss_peak_kib=peak, rss_after_kib=after,
           shed=shed, load1=load)
if os.path.exists(miss_f):
    m = json.load(open(miss_f))
    st = m["statuses"]
    rec.update(miss_req_s=round(m["req_per_s"]), miss_503=st.get("503", 0),
               miss_404=st.get("404", 0),
               miss_other=sum(v for k, v in st.items() if k not in ("404", "503")),
               miss_p50_us=m["latency_us"]["p50"], miss_p99_us=m["latency_us"]["p99"])
print(" ".join(f"{k}={v}" for k, v in rec.items()))
PY
}

lt_wait_quiet batch
for r in $(seq "$ROUNDS"); do
  read -ra kinds <<< "$KINDS"
  for i in "${!kinds[@]}"; do
    run "${kinds[$(( (i + r - 1) % ${#kinds[@]} ))]}" "$r"
  done
done

{
  echo "# Overload: hit latency with and without a miss burst"
  echo
  echo "One ncro worker on CPU 0; clients and upstreams on CPU 1. Hits: $HIT_RATE req/s open loop over 16 connections, ${DUR}s."
  echo "Burst: $MISS_RATE unique misses/s (open loop) over $MISS_CONNS connections. Flood: unique misses from $FLOOD_CONNS connections, closed loop."
  echo "Every miss race lasts $DELAY (upstream B); 64 races, 64 queued."
  echo
  echo "| run | hit p50 µs | hit p99 µs | hit p99.9 µs | hit max µs | misses/s answered | 503 | 404 | other | shed (metric) | ncro CPU % | RSS before / peak / after KiB | load1 |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
  while read -r line; do
    f() { lt_field "$line" "$1"; }
    echo "| $(f label) | $(f hit_p50_us) | $(f hit_p99_us) | $(f hit_p999_us) | $(f hit_max_us) | $(f miss_req_s) | $(f miss_503) | $(f miss_404) | $(f miss_other) | $(f shed) | $(f ncro_cpu_pct) | $(f rss_before_kib) / $(f rss_peak_kib) / $(f rss_after_kib) | $(f load1) |"
  done < "$RUN/records.txt"
} > "$RUN/summary.md"
cat "$RUN/summary.md"
