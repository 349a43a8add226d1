#!/usr/bin/env bash
# Every comparison of issue 6 in one unattended run (about 10-15 minutes),
# written to loadtest/runs/<date>-all/: machine, kernel, driver, commit,
# load, exact commands, raw outputs of each part (one folder per script)
# and summary.md, the table of targets with this run's figures.
#
#   narinfo-hit.sh  route-cache hits vs nginx static and nginx fallback chain, c64 and c1024,
#                   pinned per core, then again with nothing pinned (PIN=0: every server one
#                   worker per CPU, wrk -t2, all sharing the same cores)
#   miss.sh         latency ncro adds, two upstreams of different latency, 1000-client herd
#   miss-tiers.sh   fresh-route-cache misses under load (50k distinct present paths, two
#                   tiers of static nginx, wrk c64) vs the nginx fallback chain, nothing pinned
#   nar.sh          NAR relay 1 and 16 streams vs direct and nginx proxy_pass, CPU per GB,
#                   copy and splice on both drivers, 1 MiB NAR req/s
#   footprint.sh    1M routes (load time, RSS), 10k idle connections (RSS)
#   nar-profile.sh  perf samples per GB on the clients' CPU by relay mode (if perf works)
#
# Usage: loadtest/run-all.sh [NCRO_BIN]
# The binary is copied first, so a build during the run cannot replace it.
# Env: WAIT_MAX (60: seconds each part waits for a quiet machine before
#      measuring anyway; the load is recorded either way), LOAD_MAX (1.0),
#      BUSY_MAX (15), QUICK=1 (short runs, to try the script).
set -euo pipefail
# Before lib.sh, which would otherwise set its own (longer) defaults.
export WAIT_MAX=${WAIT_MAX:-60} LOAD_MAX=${LOAD_MAX:-1.0} BUSY_MAX=${BUSY_MAX:-15}
. "$(dirname "$0")/lib.sh"
SRC_BIN=$(lt_ncro_bin "${1:-}")

lt_init all
NCRO="$W/ncro"
cp "$SRC_BIN" "$NCRO"
lt_machine
echo "ncro_bin_copied_from: $SRC_BIN" >> "$RUN/machine.txt"
started=$(date +%s)

if [ "${QUICK:-}" = 1 ]; then
  HIT=(2s 1); MISS=(1 2s); TIERS=(1 1s); NAR=(1); export SINGLE_REPS=2 MULTI_REPS=1 SMALL_DUR=2s
  export ROUTES=${ROUTES:-100000} HITS=20000 IDLE_CONNS=2000 HERD_ROUNDS=5
else
  HIT=(10s 2); MISS=(3 4s); TIERS=(3 2s); NAR=(5); export SINGLE_REPS=20 MULTI_REPS=3 SMALL_DUR=3s
fi

# part NAME SCRIPT ARGS...: runs a part with its run folder inside ours.
part() {
  local name=$1; shift
  echo "== $name ($(date +%T), load $(cut -d' ' -f1-3 /proc/loadavg))" | tee -a "$RUN/load.txt" >&2
  printf 'LT_RUNS=<this folder> %s\n' "$*" >> "$RUN/commands.txt"
  LT_RUNS="$RUN" "$@" > "$RUN/$name.log" 2>&1 || echo "PART FAILED: $name (see $name.log)" | tee -a "$RUN/load.txt" >&2
}

part narinfo-hit "$LT_DIR/narinfo-hit.sh" "$NCRO" "${HIT[@]}"
part narinfo-hit-unpinned env PIN=0 "$LT_DIR/narinfo-hit.sh" "$NCRO" "${HIT[@]}"
part miss "$LT_DIR/miss.sh" "$NCRO" "${MISS[@]}"
part miss-tiers "$LT_DIR/miss-tiers.sh" "$NCRO" "${TIERS[@]}"
part nar "$LT_DIR/nar.sh" "$NCRO" "${NAR[@]}"
part footprint "$LT_DIR/footprint.sh" "$NCRO"
# Evidence for the NAR rows (docs/benchmarks.md), where perf can sample.
if command -v perf > /dev/null && perf stat -a -o /dev/null true 2> /dev/null; then
  part nar-profile "$LT_DIR/nar-profile.sh" "$NCRO" 3
fi
echo "load_at_end: $(cat /proc/loadavg)" >> "$RUN/machine.txt"
echo "duration_s: $(( $(date +%s) - started ))" >> "$RUN/machine.txt"

# ---------------------------------------------------------------- summary
ALL=$RUN
sub() { find "$ALL" -maxdepth 1 -type d -name "*-$1" | head -1; }
# in SUBRUN FN ARGS...: runs a lib.sh helper against a part's records.
in_run() { local d=$1; shift; (RUN=$d; "$@"); }
median_of() { if [ -z "$1" ]; then echo -; else tr ' ' '\n' <<< "$1" | lt_median; fi; }
verdict() { # VALUE OP LIMIT -> met / NOT met / -
  [ -z "$1" ] || [ "$1" = - ] && { echo "-"; return; }
  awk -v v="$1" -v l="$3" -v op="$2" 'BEGIN{ok = (op == ">=") ? v >= l : v <= l; print ok ? "met" : "**NOT met**"}'
}
HITD=$(sub narinfo-hit); HITU=$(sub narinfo-hit-unpinned); TIERD=$(sub miss-tiers); MISSD=$(sub miss); NARD=$(sub nar); FPD=$(sub footprint)
row() { printf '| %s | %s | %s | %s |\n' "$1" "$2" "$3" "$4"; }
{
  echo "# All comparisons, one run"
  echo
  sed 's/^/    /' "$RUN/machine.txt"
  echo
  echo "Parts and the load before each:"
  echo
  sed 's/^/    /' "$RUN/load.txt"
  echo
  echo "Ratios are medians of per-round ratios measured in the same part of this run. Each part's"
  echo "folder has its own summary.md, records.txt, raw/ outputs, configs and commands."
  echo
  echo "| target | measured in this run | goal | verdict |"
  echo "|---|---|---|---|"
  if [ -n "$HITD" ]; then
    for c in 64 1024; do
      r=$(median_of "$(in_run "$HITD" lt_ratios nginx ncro rps "${HIT[1]}" "c$c-r%s")")
      row "narinfo hit, c$c: ncro ÷ nginx static, req/s" "**$r**" "≥ 1.0" "$(verdict "$r" '>=' 1.0)"
      r=$(median_of "$(in_run "$HITD" lt_ratios chain ncro rps "${HIT[1]}" "c$c-r%s")")
      row "narinfo hit, c$c: ncro ÷ nginx fallback chain, req/s" "$r" "(reference)" "-"
    done
  fi
  if [ -n "$HITU" ]; then
    for c in 64 1024; do
      r=$(median_of "$(in_run "$HITU" lt_ratios nginx ncro rps "${HIT[1]}" "c$c-r%s")")
      row "narinfo hit, c$c, nothing pinned (same cores as wrk): ncro ÷ nginx static, req/s" "**$r**" "≥ 1.5" "$(verdict "$r" '>=' 1.5)"
      r=$(median_of "$(in_run "$HITU" lt_ratios nginx ncro us_cpu_per_req "${HIT[1]}" "c$c-r%s")")
      row "narinfo hit, c$c, nothing pinned: ncro ÷ nginx static, server CPU per request" "$r" "(why)" "-"
    done
  fi
  if [ -n "$TIERD" ]; then
    r=$(median_of "$(in_run "$TIERD" lt_ratios chain ncro rps "${TIERS[0]}" "c64-r%s")")
    row "miss, fresh route cache, 2 tiers, c64, nothing pinned: ncro ÷ nginx fallback chain, req/s" "**$r**" "≥ 1.0" "$(verdict "$r" '>=' 1.0)"
    r=$(median_of "$(in_run "$TIERD" lt_ratios chain ncro us_cpu_per_req "${TIERS[0]}" "c64-r%s")")
    row "miss, fresh route cache, 2 tiers, c64: ncro ÷ chain, server CPU per request" "$r" "(why)" "-"
  fi
  if [ -n "$NARD" ]; then
    for s in 1 16; do
      r=$(median_of "$(in_run "$NARD" lt_ratios direct uring-splice MBps "${NAR[0]}" "s$s-r%s")")
      row "NAR relay, $s stream(s), io_uring + splice (default): ncro ÷ direct, MB/s" "**$r**" "≥ 0.95" "$(verdict "$r" '>=' 0.95)"
      r=$(median_of "$(in_run "$NARD" lt_ratios nginx-proxy uring-splice cpu_s_per_GB "${NAR[0]}" "s$s-r%s")")
      row "NAR relay, $s stream(s): ncro ÷ nginx proxy_pass, proxy CPU s per GB" "**$r**" "≤ 0.5" "$(verdict "$r" '<=' 0.5)"
      r=$(median_of "$(in_run "$NARD" lt_ratios direct uring-splice side_cpu_s_per_GB "${NAR[0]}" "s$s-r%s")")
      row "NAR relay, $s stream(s), splice: CPU 1 (upstream + clients) s per GB ÷ direct's" "$r" "(why)" "-"
      r=$(median_of "$(in_run "$NARD" lt_ratios direct uring-copy MBps "${NAR[0]}" "s$s-r%s")")
      row "NAR relay, $s stream(s), io_uring + copy: ncro ÷ direct, MB/s" "$r" "(reference)" "-"
      r=$(median_of "$(in_run "$NARD" lt_ratios nginx-proxy uring-copy cpu_s_per_GB "${NAR[0]}" "s$s-r%s")")
      row "NAR relay, $s stream(s), io_uring + copy: ncro ÷ nginx proxy_pass, proxy CPU s per GB" "$r" "(reference)" "-"
      r=$(median_of "$(in_run "$NARD" lt_ratios direct uring-copy side_cpu_s_per_GB "${NAR[0]}" "s$s-r%s")")
      row "NAR relay, $s stream(s), copy: CPU 1 (upstream + clients) s per GB ÷ direct's" "$r" "(why)" "-"
    done
  fi
  if [ -n "$MISSD" ]; then
    for k in miss found; do
      d=""
      for r in $(seq "${MISS[0]}"); do
        a=$(in_run "$MISSD" lt_rec "$k-direct-r$r" p50_us); b=$(in_run "$MISSD" lt_rec "$k-ncro-r$r" p50_us)
        [ -n "$a" ] && [ -n "$b" ] && d+="$((b - a)) "
      done
      d=$(median_of "${d% }")
      row "miss path ($k), latency ncro adds at p50, µs" "**$d**" "≤ 100" "$(verdict "$d" '<=' 100)"
    done
    hr=$(in_run "$MISSD" lt_rec herd-upstream narinfo_requests); hn=$(in_run "$MISSD" lt_rec herd-upstream rounds)
    hc=$(in_run "$MISSD" lt_rec herd-upstream connections)
    row "herd: upstream requests for $hn hashes, each asked by $hc clients at once" "**$hr**" "$hn" \
      "$([ -n "$hr" ] && [ "$hr" = "$hn" ] && echo met || echo '**NOT met**')"
  fi
  if [ -n "$FPD" ]; then
    n=$(in_run "$FPD" lt_rec routes-load routes)
    mb=$(awk -v k="$(in_run "$FPD" lt_rec routes-load rss_kB)" 'BEGIN{printf "%.0f", k / 1024}')
    row "$n routes: RSS after load, MB" "**$mb**" "< 300" "$(verdict "$mb" '<=' 300)"
    mb=$(awk -v k="$(in_run "$FPD" lt_rec routes-after-hits rss_kB)" 'BEGIN{printf "%.0f", k / 1024}')
    row "$n routes: RSS after ${HITS:-200000} distinct hits (narinfos cached), MB" "**$mb**" "< 300" "$(verdict "$mb" '<=' 300)"
    ms=$(in_run "$FPD" lt_rec routes-load load_ms); s=$(in_run "$FPD" lt_rec routes-load ready_s)
    row "$n routes: load (ncro's log) / start until answering" "**$ms ms** / $s s" "< 2 s" \
      "$(verdict "$(awk -v m="$ms" 'BEGIN{print m / 1000}')" '<=' 2)"
    for drv in io_uring epoll; do
      mb=$(awk -v k="$(in_run "$FPD" lt_rec "idle-$drv" rss_idle_kB)" 'BEGIN{printf "%.0f", k / 1024}')
      row "$(in_run "$FPD" lt_rec "idle-$drv" open) idle keep-alive connections ($drv): RSS, MB" "**$mb**" "< 100" "$(verdict "$mb" '<=' 100)"
    done
  fi
  PROFD=$(sub nar-profile)
  if [ -n "$PROFD" ]; then
    echo
    echo "Where the NAR relay's CPU goes on the client's CPU (nar-profile part):"
    echo
    sed -n '/^| mode/,/^$/p' "$PROFD/summary.md"
  fi
  echo
  grep -h "WARNING" "$ALL"/*/summary.md 2>/dev/null | sed 's/^/    /' || true
  grep -h "PART FAILED" "$RUN/load.txt" || true
} > "$RUN/summary.md"
cat "$RUN/summary.md"
