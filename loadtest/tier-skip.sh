#!/usr/bin/env bash
# tier-skip.sh NCRO_BIN HARNESS_OUT [ROUNDS]
#
# The real Nix client (shared/nix-harness, Nix 2.8) substituting paths that
# only the 2nd and 3rd of three caches hold, every narinfo answer (200 or
# 404) delayed 20 ms at the cache, in three ways per round:
#
#   direct  Nix itself walks the three caches (substituters = "X Y Z",
#           Priority 40/50/60 in their nix-cache-info)
#   off     through ncro with health.early_start_budget = 0 (tier order:
#           ncro asks X, waits for its 404, then Y)
#   on      through ncro with the default budget (early starts)
#
# Each ncro run is a fresh process and route database: a warm-up fetch of
# 75 other paths (the small-ab group, also held by Y and Z only here) lets
# the per-tier statistics learn that X misses, then the measured cold fetch
# of the 100 small-b paths (routes unknown), then a warm fetch of the same
# paths with a fresh client store (every route known). Printed per run:
# the client's fetch_s and, for ncro, the narinfo requests each cache got
# during the cold fetch, race_ms (the mean of ncro's own
# ncro_narinfo_race_duration_seconds over the cold fetch's races) and
# ncro_narinfo_early_starts_total.
#
# NCRO_TOML_EXTRA, if set, is appended to every ncro config (for example
# $'[cache.mass_query]\nper_upstream_max_inflight = 32').
#
# HARNESS_OUT is a make-caches.sh output dir (the tests build one under
# target/tmp/nix-harness). Loopback only; ports 38191-38194.
set -euo pipefail
BIN=$(readlink -f "$1"); H=$(readlink -f "$2"); ROUNDS=${3:-3}
HERE=$(cd "$(dirname "$0")" && pwd)
NH=${NCRO_NIX_HARNESS:-$HERE/../../shared/nix-harness}
[ -x "$NH/client-fetch.sh" ] || NH=/work/shared/nix-harness
OUT=$(mktemp -d /tmp/tier-skip.XXXXXX)
BASE=38191; NCRO_PORT=38194
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$OUT"
}
trap cleanup EXIT

# X: an empty cache; Y and Z: cache B's files (hard links), own priorities.
mkdir -p "$OUT/X"
printf 'StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n' > "$OUT/X/nix-cache-info"
for c in Y:50 Z:60; do
    cp -al "$H/caches/B" "$OUT/${c%%:*}"
    rm "$OUT/${c%%:*}/nix-cache-info"
    printf 'StoreDir: /nix/store\nWantMassQuery: 1\nPriority: %s\n' "${c##*:}" > "$OUT/${c%%:*}/nix-cache-info"
done
i=0
for c in X Y Z; do
    python3 "$NH/cachehttp.py" serve --dir "$OUT/$c" --port $((BASE + i)) \
        --log "$OUT/$c.log" --fault '\.narinfo$=delay=0.02' &
    PIDS+=($!); i=$((i + 1))
done
for i in 0 1 2; do
    for _ in $(seq 1 50); do curl -sf "http://127.0.0.1:$((BASE + i))/nix-cache-info" >/dev/null && break; sleep 0.1; done
done
URLS="http://127.0.0.1:$BASE http://127.0.0.1:$((BASE + 1)) http://127.0.0.1:$((BASE + 2))"
KEYS=$H/keys/trusted-public-keys
mapfile -t LEARN < <(python3 -c "import json,sys; print('\n'.join(json.load(open(sys.argv[1]))['groups']['small-ab']))" "$H/manifest.json")
mapfile -t MEASURE < <(python3 -c "import json,sys; print('\n'.join(json.load(open(sys.argv[1]))['groups']['small-b']))" "$H/manifest.json")

fetch() { # fetch URL PATHS... -> fetch_s
    "$NH/client-fetch.sh" -k "$KEYS" -t 120 "$@" | sed -n 's/.*fetch_s=\([0-9.]*\).*/\1/p'
}
narinfos() { grep -c '\.narinfo' "$OUT/$1.log" 2>/dev/null || echo 0; }
# "sum count" of a histogram, summed over its series, from ncro's /metrics.
hist() { curl -s "$1/metrics" | awk -v n="$2" '$1 ~ "^"n"_sum" {s += $2} $1 ~ "^"n"_count" {c += $2} END {print s + 0, c + 0}'; }

run_ncro() { # run_ncro LABEL BUDGET
    local label=$1 budget=$2 db=$OUT/ncro-$1-$r
    mkdir -p "$db"
    cat > "$db/ncro.toml" <<EOF
[server]
listen = "127.0.0.1:$NCRO_PORT"
[[upstreams]]
url = "http://127.0.0.1:$BASE"
priority = 10
[[upstreams]]
url = "http://127.0.0.1:$((BASE + 1))"
priority = 20
[[upstreams]]
url = "http://127.0.0.1:$((BASE + 2))"
priority = 30
[cache]
db_path = "$db/routes.db"
[health]
early_start_budget = $budget
[logging]
level = "warn"
${NCRO_TOML_EXTRA:-}
EOF
    "$BIN" serve --config "$db/ncro.toml" > "$db/log" 2>&1 &
    local pid=$!
    for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$NCRO_PORT/nix-cache-info" >/dev/null && break; sleep 0.1; done
    local url=http://127.0.0.1:$NCRO_PORT
    fetch "$url" "${LEARN[@]}" >/dev/null
    sleep 2.5 # the control thread's statistics tick once a second
    local x0 y0 z0; x0=$(narinfos X); y0=$(narinfos Y); z0=$(narinfos Z)
    local cold warm r0 r1
    r0=$(hist "$url" ncro_narinfo_race_duration_seconds)
    cold=$(fetch "$url" "${MEASURE[@]}")
    r1=$(hist "$url" ncro_narinfo_race_duration_seconds)
    local x=$(( $(narinfos X) - x0 )) y=$(( $(narinfos Y) - y0 )) z=$(( $(narinfos Z) - z0 ))
    # Mean race time (ms) of the cold fetch's misses, measured inside ncro.
    local race_ms
    race_ms=$(echo "$r0 $r1" | awk '{ if ($4 > $2) printf "%.1f", 1000 * ($3 - $1) / ($4 - $2); else print "-" }')
    warm=$(fetch "$url" "${MEASURE[@]}")
    local early
    early=$(curl -s "$url/metrics" | grep '^ncro_narinfo_early_starts_total' | sed 's/ncro_narinfo_early_starts_total{result="\(.*\)"} /\1=/' | tr '\n' ' ')
    kill "$pid"; wait "$pid" 2>/dev/null || true
    echo "round=$r mode=$label cold_s=$cold warm_s=$warm narinfo_reqs_cold X=$x Y=$y Z=$z paths=${#MEASURE[@]} race_ms=$race_ms early: $early"
}

echo "# bin=$BIN $(date -u +%FT%TZ) paths=${#MEASURE[@]} delay=20ms"
for r in $(seq 1 "$ROUNDS"); do
    d=$(fetch "$URLS" "${MEASURE[@]}")
    echo "round=$r mode=direct fetch_s=$d"
    run_ncro off 0
    run_ncro on 0.1
done
