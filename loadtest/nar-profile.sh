#!/usr/bin/env bash
# Where the CPU goes in a loopback NAR transfer, by relay mode: perf samples
# on CPU 1 (the upstream nginx and the curl client, as in nar.sh) per GB
# moved, split by process and by kernel symbol, for "direct" (curl on
# nginx), ncro "copy" and ncro "splice" (ncro alone on CPU 0).
#
# On this placement a transfer is bounded by CPU 1, so samples per GB on
# CPU 1 predict MB/s: whatever a relay mode adds there, or takes away,
# shows up in its throughput ratio against direct. docs/benchmarks.md
# ("NAR relay: why both targets are not met at once") reads this output.
#
# Usage: loadtest/nar-profile.sh [NCRO_BIN] [ROUNDS]     (default ROUNDS=3)
# Env: CACHES (/tmp/ncro-bench/caches), REPS (15 × 100 MiB per sample),
#      FREQ (perf sampling Hz, 4000), BASEPORT (18780), WAIT_MAX (lib.sh).
# Needs perf (Debian: linux-perf) and permission to sample the CPU
# (root, or kernel.perf_event_paranoid ≤ 0).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
NCRO=$(lt_ncro_bin "${1:-}")
ROUNDS=${2:-3}
CACHES=${CACHES:-/tmp/ncro-bench/caches}
REPS=${REPS:-15}; FREQ=${FREQ:-4000}
BASEPORT=${BASEPORT:-18780}
UP=$((BASEPORT + 1)); BIG=$((100 << 20))
command -v perf > /dev/null || lt_die "perf is not installed (apt install linux-perf)"

lt_init nar-profile
lt_machine
lt_caches "$CACHES"
read -r BIG_NI BIG_NAR < <(lt_nar_file "$CACHES" 100m "$BIG")

cat > "$W/nginx.conf" <<NG
worker_processes 1;
worker_cpu_affinity 10;
pid $W/nginx.pid;
error_log $W/nginx-error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  sendfile on; tcp_nopush on; tcp_nodelay on;
  keepalive_timeout 65s;
  default_type application/octet-stream;
  server { listen 127.0.0.1:$UP; root $CACHES/A; }
}
NG
lt_nginx "$W/nginx.conf" 1
lt_wait_http "http://127.0.0.1:$UP/nix-cache-info"

declare -A PORT=([direct]=$UP [copy]=$((BASEPORT + 2)) [splice]=$((BASEPORT + 3)))
for m in copy splice; do
  cat > "$W/ncro-$m.toml" <<NC
[server]
listen = "127.0.0.1:${PORT[$m]}"
workers = 1
cpus = [0]
control_cpu = 0
nar_relay = "$m"
[[upstreams]]
url = "http://127.0.0.1:$UP"
priority = 10
[cache]
db_path = "$W/routes-$m.db"
NC
  lt_ncro "$W/ncro-$m.log" LT_TARGET="$m" -- "$NCRO" serve --config "$W/ncro-$m.toml"
  lt_wait_http "http://127.0.0.1:${PORT[$m]}/nix-cache-info"
  code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:${PORT[$m]}$BIG_NI")
  [ "$code" = 200 ] || lt_die "$m: narinfo answered $code"
done

lt_wait_quiet nar-profile
GB=$(awk -v r="$REPS" -v b="$BIG" 'BEGIN{printf "%.4f", r * b / 1e9}')
for r in $(seq "$ROUNDS"); do
  for m in direct copy splice; do
    url="http://127.0.0.1:${PORT[$m]}$BIG_NAR"
    args=(); for _ in $(seq "$REPS"); do args+=(-o /dev/null "$url"); done
    data="$RUN/raw/$m-r$r.perf"
    printf 'perf record -F %s -C 1 -o raw/%s-r%s.perf -- taskset -c 1 curl -s -o /dev/null %s (× %s)\n' \
      "$FREQ" "$m" "$r" "$url" "$REPS" >> "$RUN/commands.txt"
    # MB/s from curl's own transfer times: perf's start and stop are not
    # part of the transfer.
    perf record -q -F "$FREQ" -C 1 -o "$data" -- taskset -c 1 curl -s -w '%{size_download} %{time_total}\n' \
      "${args[@]}" > "$RUN/raw/$m-r$r.curl.txt" 2> /dev/null
    read -r bytes secs < <(awk '{b += $1; t += $2} END{print b, t}' "$RUN/raw/$m-r$r.curl.txt")
    [ "$bytes" = "$((REPS * BIG))" ] || lt_die "$m: received $bytes bytes, not $((REPS * BIG))"
    perf report -i "$data" --sort comm --stdio -n 2> /dev/null | awk '!/^#/ && NF' \
      > "$RUN/raw/$m-r$r.comm.txt"
    perf report -i "$data" --sort comm,sym --stdio -n 2> /dev/null | awk '!/^#/ && NF && ++n <= 40' \
      > "$RUN/raw/$m-r$r.sym.txt"
    rm -f "$data"
    awk -v label="$m-r$r" -v gb="$GB" -v secs="$secs" -v f="$FREQ" '
      {n[$3] += $2; all += $2}
      END {printf "label=%s MBps=%.0f cpu1_samples_per_GB=%.0f cpu1_s_per_GB=%.3f curl_s_per_GB=%.3f nginx_s_per_GB=%.3f\n",
           label, gb * 1000 / secs, all / gb, all / f / gb, n["curl"] / f / gb, n["nginx"] / f / gb}' \
      "$RUN/raw/$m-r$r.comm.txt" | tee -a "$RUN/records.txt"
  done
done

# The symbols whose samples per GB (summed over rounds) differ most from
# direct in either relay mode: "process symbol direct copy splice".
sym_diffs() {
  awk -v gb="$GB" -v rounds="$ROUNDS" '
    FNR == 1 {split(FILENAME, p, "/"); mode = p[length(p)]; sub(/-r[0-9]+\.sym\.txt$/, "", mode)}
    NF >= 5 {k = $3 " " $5; n[mode, k] += $2; keys[k] = 1}
    END {
      for (k in keys) {
        d = n["direct", k] / rounds / gb; c = n["copy", k] / rounds / gb; s = n["splice", k] / rounds / gb
        dev = (s - d > 0 ? s - d : d - s); if (c - d > dev) dev = c - d; if (d - c > dev) dev = d - c
        printf "%.0f %s %.0f %.0f %.0f\n", dev, k, d, c, s
      }
    }' "$RUN"/raw/*-r*.sym.txt | sort -rn | head -12 | cut -d' ' -f2-
}

{
  echo "# NAR relay: CPU 1 samples per GB by relay mode"
  echo
  grep -E '^(date|cpu|kernel|git):' "$RUN/machine.txt" | sed 's/^/    /'
  echo
  echo "nginx (sendfile) and curl on CPU 1, ncro (one worker) alone on CPU 0; $ROUNDS rounds of"
  echo "$REPS × 100 MiB over one keep-alive connection per mode, perf at $FREQ Hz on CPU 1 only."
  echo "Medians with (min–max) over rounds."
  echo
  echo "| mode | MB/s | CPU 1 s/GB | curl s/GB | nginx s/GB |"
  echo "|---|---|---|---|---|"
  for m in direct copy splice; do
    printf '| %s | %s | %s | %s | %s |\n' "$m" "$(lt_stat "^$m-r" MBps)" "$(lt_stat "^$m-r" cpu1_s_per_GB)" \
      "$(lt_stat "^$m-r" curl_s_per_GB)" "$(lt_stat "^$m-r" nginx_s_per_GB)"
  done
  echo
  echo "Samples per GB of the symbols that differ most from direct (mean over rounds; the"
  echo "top 40 of each profile; under a VM, samples land on the timer interrupt that took them):"
  echo
  echo "| process | kernel symbol | direct | copy | splice |"
  echo "|---|---|---|---|---|"
  sym_diffs | while read -r c sym d cp sp; do printf '| %s | %s | %s | %s | %s |\n' "$c" "$sym" "$d" "$cp" "$sp"; done
  echo
  echo "Top symbols per mode and round: raw/<mode>-r<round>.sym.txt."
} > "$RUN/summary.md"
cat "$RUN/summary.md"
