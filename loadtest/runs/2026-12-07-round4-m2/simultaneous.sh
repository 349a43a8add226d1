#!/usr/bin/env bash
# Two ncro binaries measured at the same time (same noise): each its own
# fresh route db and its own wrk (-t1 -c32) over its own half of the paths,
# against one nginx serving caches A and B. Prints worker CPU us per miss.
set -euo pipefail
A_BIN=$1; B_BIN=$2; ROUNDS=${3:-10}; DUR=${4:-3}
OUT=/tmp/m2/simul; rm -rf $OUT; mkdir -p $OUT
CACHES=/tmp/ncro-bench/caches; UPA=19181; UPB=19182
LUA=/work/wt-m2/loadtest/rotate.lua
head -n 100000 $CACHES/lists/present-all.txt > $OUT/all.txt
head -n 50000 $OUT/all.txt > $OUT/p0.txt; tail -n 50000 $OUT/all.txt > $OUT/p1.txt
cat > $OUT/nginx-up.conf <<NG
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
nginx -e $OUT/nginx-startup.log -p $OUT -c $OUT/nginx-up.conf
trap 'kill -QUIT $(cat $OUT/nginx-up.pid) 2>/dev/null || true' EXIT
sleep 0.3
wticks() { for t in /proc/$1/task/*; do case $(cat $t/comm) in ncro-worker*) sed 's/.*) //' $t/stat | awk '{print $12 + $13}';; esac; done | awk '{s+=$1} END {print s+0}'; }
hz=$(getconf CLK_TCK)
for r in $(seq $ROUNDS); do
  pids=(); ports=(); bins=("$A_BIN" "$B_BIN")
  for i in 0 1; do
    port=$((19183 + i)); d=$OUT/n$i; rm -rf $d; mkdir -p $d
    printf '[server]\nlisten = "127.0.0.1:%s"\n[[upstreams]]\nurl = "http://127.0.0.1:%s"\npriority = 10\n[[upstreams]]\nurl = "http://127.0.0.1:%s"\npriority = 20\n[cache]\ndb_path = "%s/routes.db"\n[logging]\nlevel = "warn"\n' $port $UPA $UPB $d > $d/ncro.toml
    ${bins[$i]} serve --config $d/ncro.toml > $d/log 2>&1 &
    pids+=($!); ports+=($port)
  done
  for i in 0 1; do for _ in $(seq 100); do curl -sf http://127.0.0.1:${ports[$i]}/nix-cache-info >/dev/null && break; sleep 0.1; done; done
  # alternate which half of the paths each binary gets
  pa=$OUT/p$((r % 2)).txt; pb=$OUT/p$(((r + 1) % 2)).txt
  w0a=$(wticks ${pids[0]}); w0b=$(wticks ${pids[1]})
  wrk -t1 -c32 -d${DUR}s -s $LUA http://127.0.0.1:${ports[0]} -- $pa 1 > $OUT/wrk0.txt 2>&1 &
  k0=$!
  wrk -t1 -c32 -d${DUR}s -s $LUA http://127.0.0.1:${ports[1]} -- $pb 1 > $OUT/wrk1.txt 2>&1 &
  k1=$!
  wait $k0 $k1
  w1a=$(wticks ${pids[0]}); w1b=$(wticks ${pids[1]})
  ra=$(awk '/requests in/ {print $1}' $OUT/wrk0.txt); rb=$(awk '/requests in/ {print $1}' $OUT/wrk1.txt)
  kill -TERM ${pids[0]} ${pids[1]}; wait ${pids[0]} ${pids[1]} 2>/dev/null || true
  awk -v r=$r -v ra=$ra -v rb=$rb -v wa=$((w1a-w0a)) -v wb=$((w1b-w0b)) -v hz=$hz -v la="$(cut -d' ' -f1 /proc/loadavg)" \
    'BEGIN {a=1e6*wa/hz/ra; b=1e6*wb/hz/rb; printf "round %d first: %d req %.1f us/miss  second: %d req %.1f us/miss  second/first %.3f load1=%s\n", r, ra, a, rb, b, b/a, la}' | tee -a $OUT/records.txt
done
awk "{print \$14}" $OUT/records.txt | sort -g | awk '{a[NR]=$1} END {m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; printf "second/first median %.3f (%s-%s), %d rounds\n", m, a[1], a[NR], NR}'
