#!/usr/bin/env bash
# Parallel ranged NAR fetches ([cache.nar_ranges]): a 128 MiB NAR from
# `ncro bench upstream` capped at CAP per connection, fetched directly and
# through ncro in the same run (alternating, ROUNDS times), sha256 of
# every body compared; then two holders of the same NAR, the first killed
# mid-transfer; then PAR concurrent transfers, with ncro's peak RSS.
#
#   loadtest/nar-ranges.sh [NCRO] [ROUNDS]
#   env: CAP (16MiB), SIZE (128MiB), RTT (0ms), PAR (10), PORT (18811),
#        EXTRA (TOML appended to ncro's config, e.g. a [cache.nar_ranges]
#        table), QUICK=1 (the direct/ncro rounds only)
set -euo pipefail
NCRO=${1:-${CARGO_TARGET_DIR:-target}/release/ncro}
ROUNDS=${2:-3}
CAP=${CAP:-16MiB}
SIZE=${SIZE:-128MiB}
RTT=${RTT:-0ms}
PAR=${PAR:-10}
PORT=${PORT:-18811}
OUT=$(mktemp -d /tmp/nar-ranges.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

upstream() { # PORT -> starts a capped synthetic cache, echoes its PID
  "$NCRO" bench upstream --listen "127.0.0.1:$1" --narinfos 2 --nar-size "$SIZE" \
    --conn-rate "$CAP" --rtt "$RTT" --threads 2 --write-lists "$OUT/lists" >"$OUT/up-$1.log" 2>&1 &
  echo $!
}
wait_port() { for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$1/nix-cache-info" && return; sleep 0.1; done; echo "port $1 never answered" >&2; exit 1; }

A=$PORT; B=$((PORT + 1)); P=$((PORT + 2))
pa=$(upstream $A); pids+=("$pa")
pb=$(upstream $B); pids+=("$pb")
wait_port $A; wait_port $B
cat >"$OUT/ncro.toml" <<EOF
[server]
listen = "127.0.0.1:$P"
workers = 1
[[upstreams]]
url = "http://127.0.0.1:$A"
priority = 10
[[upstreams]]
url = "http://127.0.0.1:$B"
priority = 20
[cache]
db_path = "$OUT/routes.db"
[logging]
level = "info"
${EXTRA-[cache.nar_ranges]
min_latency = "0s"}
EOF
"$NCRO" serve --config "$OUT/ncro.toml" >"$OUT/ncro.log" 2>&1 &
pn=$!; pids+=("$pn")
wait_port $P
NAR=$(head -1 "$OUT/lists/nars.txt")
get() { curl -s -o "$OUT/$2" -w '%{http_code} %{size_download} %{time_total}' "$1/$NAR"; }
hwm() { awk '/VmHWM/ {print $2 / 1024 " MiB"}' "/proc/$pn/status"; }

echo "ncro $NCRO; NAR $SIZE; cap $CAP per connection; rtt $RTT; rss before: $(awk '/VmRSS/ {print $2 / 1024 " MiB"}' /proc/$pn/status)"
want=""
for r in $(seq "$ROUNDS"); do
  d=$(get "http://127.0.0.1:$A" direct.bin)
  v=$(get "http://127.0.0.1:$P" via.bin)
  sd=$(sha256sum "$OUT/direct.bin" | cut -c1-16); sv=$(sha256sum "$OUT/via.bin" | cut -c1-16)
  want=$sd
  echo "round $r: direct $d s  sha $sd | via ncro $v s  sha $sv | ratio $(awk -v a="${d##* }" -v b="${v##* }" 'BEGIN{printf "%.1f", a/b}')x"
done
echo "ncro peak RSS after single transfers: $(hwm)"
[ "${QUICK:-0}" = 1 ] && exit 0

# PAR transfers at once (bounded by max_memory; the rest one stream each).
start=$(date +%s.%N)
cp=()
for i in $(seq "$PAR"); do get "http://127.0.0.1:$P" "par$i.bin" >"$OUT/par$i.txt" & cp+=($!); done
wait "${cp[@]}"
end=$(date +%s.%N)
ok=0; for i in $(seq "$PAR"); do [ "$(sha256sum "$OUT/par$i.bin" | cut -c1-16)" = "$want" ] && ok=$((ok + 1)); rm -f "$OUT/par$i.bin"; done
echo "$PAR concurrent via ncro: $ok/$PAR byte-exact in $(awk -v a="$start" -v b="$end" 'BEGIN{printf "%.2f", b-a}') s; ncro peak RSS $(hwm)"

# Two holders, the first dies 0.5 s into the transfer.
( sleep 0.5; kill -9 "$pa" ) &
v=$(get "http://127.0.0.1:$P" dying.bin)
sv=$(sha256sum "$OUT/dying.bin" | cut -c1-16)
echo "holder A killed mid-transfer: via ncro $v s  sha $sv $([ "$sv" = "$want" ] && echo byte-exact || echo MISMATCH)"
echo "logs in $OUT"
