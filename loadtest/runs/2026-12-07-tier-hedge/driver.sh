#!/usr/bin/env bash
H=/work/tgt-dev/tmp/nix-harness
for r in 1 2 3; do
  for v in a2fb9b1:8 702a173:8 702a173:32; do
    b=${v%%:*}; n=${v##*:}
    bin=/work/ncro-final-a2fb9b1; [ "$b" = 702a173 ] && bin=/work/ncro-hd-702a173
    echo "== pass $r $b inflight=$n load=$(cut -d' ' -f1 /proc/loadavg)"
    NCRO_TOML_EXTRA=$'[cache.mass_query]\nper_upstream_max_inflight = '$n bash /work/wt-hd/loadtest/tier-skip.sh "$bin" "$H" 1 2>&1 | grep -E '^round'
  done
done
