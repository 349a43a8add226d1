#!/usr/bin/env bash
# How often does a hash get raced more than once when many clients ask for
# it at the same moment? Single-flight is per worker; across workers only
# the shared route cache stops a second race. This counts upstream narinfo
# requests per hash (nginx access log) while N concurrent clients ask ncro
# for each fresh hash at once.
# Usage: loadtest/dup-races.sh NCRO_BIN [HASHES] [CLIENTS_PER_HASH] [WORKERS]
set -euo pipefail
NCRO=${1:?usage: dup-races.sh NCRO_BIN [HASHES] [CLIENTS_PER_HASH] [WORKERS]}
HASHES=${2:-200}; PER=${3:-64}; WORKERS=${4:-2}
W=$(mktemp -d /tmp/ncro-dup.XXXXXX)
chmod 755 "$W"  # nginx workers run as an unprivileged user
UPPORT=18491; NCPORT=18492
python3 - "$W/www" "$HASHES" > "$W/hashes.txt" <<'PY'
import hashlib, os, sys
out, n = sys.argv[1], int(sys.argv[2])
alpha = "0123456789abcdfghijklmnpqrsvwxyz"
def b32(data, chars):
    bits = int.from_bytes(data, "little")
    return "".join(alpha[(bits >> (5 * i)) & 31] for i in reversed(range(chars)))
os.makedirs(out, exist_ok=True)
for i in range(n):
    d = hashlib.sha256(f"dup-{i}".encode()).digest()
    h = b32(d[:20], 32)
    nar = b32(hashlib.sha256(d).digest(), 52)
    open(f"{out}/{h}.narinfo", "w").write(
        f"StorePath: /nix/store/{h}-dup-{i}\nURL: nar/{nar}.nar\nCompression: none\n"
        f"NarHash: sha256:{nar}\nNarSize: 1024\nReferences: \n")
    print(h)
PY
cat > "$W/nginx.conf" <<NG
worker_processes 1;
pid $W/nginx.pid;
error_log $W/nginx-error.log;
events { worker_connections 4096; }
http {
  log_format p '\$status \$request_uri';
  access_log $W/access.log p;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:$UPPORT; root $W/www; }
}
NG
cat > "$W/ncro.toml" <<NC
[server]
listen = "127.0.0.1:$NCPORT"
workers = $WORKERS
[[upstreams]]
url = "http://127.0.0.1:$UPPORT"
[cache]
db_path = ":memory:"
[logging]
level = "warn"
NC
nginx -c "$W/nginx.conf" -p "$W"
"$NCRO" serve --config "$W/ncro.toml" > "$W/ncro.log" 2>&1 &
NCPID=$!
cleanup() { kill -TERM $NCPID 2>/dev/null || true; [ -f "$W/nginx.pid" ] && kill -QUIT "$(cat "$W/nginx.pid")" 2>/dev/null || true; }
trap cleanup EXIT
sleep 1
: > "$W/access.log"
while read -r h; do
  for _ in $(seq 1 "$PER"); do echo "url = \"http://127.0.0.1:$NCPORT/$h.narinfo\""; echo "output = /dev/null"; done > "$W/batch.cfg"
  curl -sS --no-progress-meter --parallel --parallel-immediate --parallel-max "$PER" -K "$W/batch.cfg" -w '%{http_code}\n' >> "$W/codes.txt"
done < "$W/hashes.txt"
sleep 0.5
total=$(wc -l < "$W/access.log")
dups=$(awk "{print \$2}" "$W/access.log" | sort | uniq -c | awk '$1 > 1' | wc -l)
ok=$(grep -c '^200$' "$W/codes.txt" || true)
codes=$(sort "$W/codes.txt" | uniq -c | awk '{printf "%s:%s ", $2, $1}')
cut -d" " -f1 "$W/access.log" | sort | uniq -c | sed "s/^/upstream status: /"
echo "workers=$WORKERS hashes=$HASHES clients_per_hash=$PER responses_200=$ok codes=[${codes% }] upstream_requests=$total hashes_raced_twice_or_more=$dups"
