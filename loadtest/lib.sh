# Shared helpers for the loadtest scripts (sourced, not run).
#
# Every script measures ncro and its baseline in the same run on the same
# machine and reports ratios: the machine these numbers come from is a
# shared 2-vCPU VM, so absolute figures drift from one hour to the next.
#
# Conventions:
#   - pinned (LT_PIN=1, the default): servers under test run with
#     `taskset -c 0` (one worker, CPU 0); the load generator runs with
#     `taskset -c 1`;
#   - unpinned (LT_PIN=0): nothing is pinned; servers run one worker per
#     CPU and share every core with the load generator (what a deployment
#     with the client on the same host sees);
#   - every server a script starts is recorded in LT_PIDS / LT_NGINX_PIDFILES
#     and stopped by PID on exit (lt_cleanup, installed by lt_init);
#   - each script writes loadtest/runs/<YYYY-MM-DD>-<name>/ (see README.md).

LT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LT_REPO=$(cd "$LT_DIR/.." && pwd)
LT_HZ=$(getconf CLK_TCK)
LT_PIDS=()
LT_NGINX_PIDFILES=()
# Wait for a quiet machine before a measurement batch: 1-minute load
# average below LOAD_MAX and CPU busy below BUSY_MAX % over a 3 s sample,
# for at most WAIT_MAX seconds (then measure anyway and say so).
LOAD_MAX=${LOAD_MAX:-0.8}
BUSY_MAX=${BUSY_MAX:-15}
WAIT_MAX=${WAIT_MAX:-600}
# 1: pin servers to CPU 0 and clients to CPU 1; 0: pin nothing.
LT_PIN=${LT_PIN:-1}
# wrk threads (lt_wrk); rotate.lua gives each its slice of the list.
WRK_THREADS=${WRK_THREADS:-1}

# lt_pin CPU: the `taskset -c CPU` prefix when pinning, nothing otherwise.
lt_pin() { [ "$LT_PIN" = 1 ] && echo "taskset -c $1"; return 0; }

lt_die() { echo "error: $*" >&2; exit 1; }

# The ncro binary: $1 if given, else the release build of this checkout.
lt_ncro_bin() {
  local b=${1:-${CARGO_TARGET_DIR:-$LT_REPO/target}/release/ncro}
  [ -x "$b" ] || lt_die "no ncro binary at $b (cargo build --release, or pass its path)"
  (cd "$(dirname "$b")" && echo "$PWD/$(basename "$b")")
}

# lt_init NAME: creates the run folder RUN (raw/ inside), the scratch dir
# W (outside the repo: caches, logs, configs), and the cleanup trap.
lt_init() {
  local name=$1 base
  base="${LT_RUNS:-$LT_DIR/runs}/$(date +%F)-$name"
  RUN=$base
  if [ -e "$RUN" ]; then RUN="$base-$(date +%H%M%S)"; fi
  mkdir -p "$RUN/raw"
  W=$(mktemp -d "/tmp/ncro-lt-$name.XXXXXX")
  # nginx workers run as an unprivileged user and must read files in W.
  chmod 755 "$W"
  trap lt_cleanup EXIT
  trap 'exit 130' INT TERM
  : > "$RUN/commands.txt"
  echo "run folder: $RUN" >&2
  echo "scratch:    $W" >&2
}

lt_cleanup() {
  local p f i
  for p in "${LT_PIDS[@]}"; do
    kill -TERM "$p" 2>/dev/null || true
  done
  for f in "${LT_NGINX_PIDFILES[@]}"; do
    [ -s "$f" ] && kill -QUIT "$(cat "$f")" 2>/dev/null || true
  done
  for p in "${LT_PIDS[@]}"; do
    for i in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
  done
  [ -n "${W:-}" ] && [ -d "$W" ] && [ -z "${KEEP_SCRATCH:-}" ] && rm -rf "$W"
  return 0
}

# lt_cmd: logs a command line to commands.txt, then runs it.
lt_cmd() {
  printf '%s\n' "$*" >> "$RUN/commands.txt"
  "$@"
}

# Sum of utime+stime, in ticks, over the given PIDs (all threads, and
# io-wq workers, which are threads of the process).
lt_ticks() {
  local t=0 p s
  for p in $1; do
    [ -r "/proc/$p/stat" ] || continue
    s=$(cat "/proc/$p/stat") || continue
    s=${s##*) }
    t=$((t + $(awk '{print $12 + $13}' <<< "$s")))
  done
  echo "$t"
}

# "busy steal total" ticks from /proc/stat (busy = user nice system irq softirq).
lt_sys() { awk '/^cpu /{print $2+$3+$4+$7+$8, $9, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat; }

lt_load1() { cut -d' ' -f1 /proc/loadavg; }

# ksoftirqd threads: under load, loopback packet processing of our own
# traffic moves there, so it is reported apart from other tenants.
LT_KSOFTIRQ=$(ps -eo pid=,comm= | awk '$2 ~ /^ksoftirqd\// {printf "%s ", $1}')

# CPU busy % of the whole machine over $1 seconds.
lt_busy_pct() {
  local b0 s0 a0 b1 s1 a1
  read -r b0 s0 a0 < <(lt_sys); sleep "${1:-3}"; read -r b1 s1 a1 < <(lt_sys)
  echo $(( 100 * (b1 - b0) / (a1 - a0 + 1) ))
}

# Compilers and other heavy processes of other users of the machine.
lt_heavy() {
  ps -eo pid=,comm= | awk '$2 ~ /^(rustc|cargo|cc|cc1|ld|ld\.lld|clang|rust-lld|lld|mold|python3?)$/ {n[$2]++}
    END {for (k in n) printf "%s=%d ", k, n[k]; print ""}'
}

# lt_wait_quiet LABEL: waits (bounded) for a quiet machine; logs to load.txt.
lt_wait_quiet() {
  local label=$1 waited=0 l b
  while :; do
    l=$(lt_load1); b=$(lt_busy_pct 3)
    if awk -v l="$l" -v m="$LOAD_MAX" 'BEGIN{exit !(l < m)}' && [ "$b" -lt "$BUSY_MAX" ]; then
      printf '%s %s quiet after %ss: load1=%s busy=%s%% heavy=[%s]\n' \
        "$(date +%T)" "$label" "$waited" "$l" "$b" "$(lt_heavy)" | tee -a "$RUN/load.txt" >&2
      return 0
    fi
    if [ "$waited" -ge "$WAIT_MAX" ]; then
      printf '%s %s NOT QUIET after %ss, measuring anyway: load1=%s busy=%s%% heavy=[%s]\n' \
        "$(date +%T)" "$label" "$waited" "$l" "$b" "$(lt_heavy)" | tee -a "$RUN/load.txt" >&2
      return 0
    fi
    printf '%s %s waiting: load1=%s busy=%s%% heavy=[%s]\n' \
      "$(date +%T)" "$label" "$l" "$b" "$(lt_heavy)" >&2
    sleep 12; waited=$((waited + 15))
  done
}

lt_wait_http() { # URL: up to 10 s for any HTTP answer
  local i
  for i in $(seq 100); do
    curl -s -o /dev/null --max-time 1 "$1" && return 0
    sleep 0.1
  done
  lt_die "nothing answers at $1"
}

# lt_nginx CONF [CPU]: starts nginx on CPU 0 (or CPU), records its pid file
# for cleanup and sets NGINX_PIDS to "master worker...". Not in a subshell:
# the pid file must reach LT_NGINX_PIDFILES of the script itself.
lt_nginx() {
  local conf=$1 cpu=${2:-0} pidf i m
  pidf=$(awk '$1=="pid"{gsub(";","",$2); print $2}' "$conf")
  LT_NGINX_PIDFILES+=("$pidf")
  lt_cmd $(lt_pin "$cpu") nginx -e "$W/nginx-startup.log" -p "$W" -c "$conf"
  for i in $(seq 50); do [ -s "$pidf" ] && break; sleep 0.1; done
  m=$(cat "$pidf")
  sleep 0.3
  NGINX_PIDS="$m $(ps --ppid "$m" -o pid= | tr '\n' ' ')"
}

# lt_ncro LOGFILE ENV... -- ARGS...: starts ncro on CPU 0 in the background,
# sets NCRO_PID. Env assignments (e.g. MONOIO_FORCE_LEGACY_DRIVER=1) come first.
lt_ncro() {
  local log=$1; shift
  local envs=()
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done
  shift
  printf 'env %s %s %s\n' "${envs[*]}" "$(lt_pin 0)" "$*" >> "$RUN/commands.txt"
  env "${envs[@]}" $(lt_pin 0) "$@" > "$log" 2>&1 &
  NCRO_PID=$!
  LT_PIDS+=("$NCRO_PID")
}

# Driver ncro reported at start ("io_uring" or "epoll"), from its log.
lt_ncro_driver() { grep -o '"driver":"[a-z_]*"' "$1" | head -1 | cut -d'"' -f4; }

# CPU seconds of a command run on CPU 1 (via its parent shell's cutime).
# lt_on_cpu1 CMD...: runs CMD pinned to CPU 1; prints the client CPU ticks
# on fd 3 (the caller redirects it).
lt_on_cpu1() {
  $(lt_pin 1) bash -c '"$@"; rc=$?; s=$(cat /proc/$$/stat); s=${s##*) }; awk "{print \$14 + \$15}" <<< "$s" >&3; exit $rc' lt "$@"
}

lt_machine() {
  {
    echo "date: $(date -Is)"
    echo "host: 2-vCPU shared VM; load generator on the same machine"
    echo "nproc: $(nproc)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
    echo "kernel: $(uname -r)"
    echo "mem: $(awk '/MemTotal/{printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
    echo "ulimit_n: $(ulimit -n)"
    echo "git: $(git -C "$LT_REPO" rev-parse HEAD) ($(git -C "$LT_REPO" rev-parse --abbrev-ref HEAD))$(git -C "$LT_REPO" diff --quiet HEAD -- src Cargo.toml Cargo.lock || echo ' + uncommitted changes in src')"
    if [ -n "${NCRO:-}" ]; then
      echo "ncro_bin: $NCRO"
      echo "ncro_bin_sha256: $(sha256sum "$NCRO" | cut -d' ' -f1)"
      echo "ncro_bin_mtime: $(date -r "$NCRO" -Is)"
      echo "ncro_version: $("$NCRO" --version 2>&1 | head -1)"
    fi
    echo "nginx: $(nginx -v 2>&1 | cut -d/ -f2)"
    echo "wrk: $(wrk -v 2>&1 | head -1 | awk '{print $2}')"
    echo "curl: $(curl --version | head -1 | awk '{print $2}')"
    echo "load_at_start: $(cat /proc/loadavg)"
  } > "$RUN/machine.txt"
}

# lt_wrk LABEL URL LIST CONNS DUR "SERVER_PIDS" ["UPSTREAM_PIDS"] [UPSTREAM_LOG]
# One wrk run pinned to CPU 1 with rotate.lua. Raw output in raw/LABEL.txt;
# prints one key=value record (also appended to records.txt).
lt_wrk() {
  local label=$1 url=$2 list=$3 conns=$4 dur=$5 spids=$6 upids=${7:-} ulog=${8:-}
  local out="$RUN/raw/$label.txt" s0 s1 u0 u1 k0 k1 b0 st0 a0 b1 st1 a1 t0 t1 c l0 ul0=0 ul1=0
  l0=$(lt_load1)
  [ -n "$ulog" ] && ul0=$(cat $ulog 2>/dev/null | wc -l)
  printf '%s wrk -t%s -c%s -d%s --latency -s loadtest/rotate.lua %s -- %s %s\n' \
    "$(lt_pin 1)" "$WRK_THREADS" "$conns" "$dur" "$url" "$list" "$WRK_THREADS" >> "$RUN/commands.txt"
  s0=$(lt_ticks "$spids"); u0=$(lt_ticks "$upids"); k0=$(lt_ticks "$LT_KSOFTIRQ"); read -r b0 st0 a0 < <(lt_sys)
  t0=$(date +%s.%N)
  c=$(lt_on_cpu1 wrk -t"$WRK_THREADS" -c"$conns" -d"$dur" --latency -s "$LT_DIR/rotate.lua" "$url" -- "$list" "$WRK_THREADS" \
        3>&1 > "$out" 2>&1) || echo "wrk exited non-zero" >> "$out"
  t1=$(date +%s.%N)
  s1=$(lt_ticks "$spids"); u1=$(lt_ticks "$upids"); k1=$(lt_ticks "$LT_KSOFTIRQ"); read -r b1 st1 a1 < <(lt_sys)
  [ -n "$ulog" ] && ul1=$(cat $ulog 2>/dev/null | wc -l)
  awk -v label="$label" -v conns="$conns" -v dur="$dur" -v t0="$t0" -v t1="$t1" -v hz="$LT_HZ" \
      -v s="$((s1 - s0))" -v u="$((u1 - u0))" -v c="${c:-0}" -v b="$((b1 - b0))" -v st="$((st1 - st0))" -v k="$((k1 - k0))" \
      -v l0="$l0" -v ureq="$((ul1 - ul0))" '
    /^Requests\/sec/ {rps = $2}
    /requests in/ {reqs = $1}
    /Non-2xx/ {non2xx = $5}
    /Socket errors/ {sub(/^ *Socket errors: /, ""); gsub(/ /, ""); err = $0}
    /^latency_ms/ {for (i = 2; i <= NF; i++) {split($i, kv, "="); lat[kv[1]] = kv[2]}}
    END {
      el = t1 - t0; scpu = s / hz; ucpu = u / hz; ccpu = c / hz; busy = b / hz
      ksirq = k / hz; other = busy - scpu - ucpu - ccpu - ksirq; if (other < 0) other = 0
      printf "label=%s conns=%d dur=%s elapsed_s=%.2f requests=%d rps=%.0f p50_ms=%s p99_ms=%s max_ms=%s non2xx=%d sockerr=%s server_cpu_s=%.2f us_cpu_per_req=%.2f upstream_cpu_s=%.2f upstream_reqs=%d client_cpu_s=%.2f ksoftirqd_s=%.2f machine_busy_s=%.2f other_cpu_s=%.2f steal_s=%.2f load1_before=%s\n",
        label, conns, dur, el, reqs, rps, lat["p50"], lat["p99"], lat["max"], non2xx + 0, (err == "" ? "none" : err),
        scpu, (reqs > 0 ? 1e6 * scpu / reqs : 0), ucpu, ureq, ccpu, ksirq, busy, other, st / hz, l0
    }' "$out" | tee -a "$RUN/records.txt"
}

# Field KEY of a key=value record line.
lt_field() { tr ' ' '\n' <<< "$1" | awk -F= -v k="$2" '$1==k{print $2}'; }

# Median of the numbers on stdin.
lt_median() {
  sort -g | awk '{a[NR]=$1} END{
    if (NR == 0) {print "-"; exit}
    m = (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2
    if (m >= 1000) printf "%.0f\n", m; else printf "%.3g\n", m}'
}

# Values of KEY over the records whose label matches the regex PAT.
lt_values() { awk -v pat="$1" -v k="$2" '{lab=""; v=""; for (i=1;i<=NF;i++){split($i,kv,"="); if (kv[1]=="label") lab=kv[2]; if (kv[1]==k) v=kv[2]} if (lab ~ pat && v != "" && v != "-") print v}' "$RUN/records.txt"; }

# "median (min–max)" of KEY over records matching PAT.
lt_stat() {
  local v
  v=$(lt_values "$1" "$2")
  [ -z "$v" ] && { echo "-"; return; }
  printf '%s (%s–%s)' "$(lt_median <<< "$v")" "$(sort -g <<< "$v" | head -1)" "$(sort -g <<< "$v" | tail -1)"
}

# Ratio B/A of KEY between records "A-<suffix>" and "B-<suffix>" for each
# round suffix; prints the per-round ratios, space-separated.
lt_ratios() { # A_PREFIX B_PREFIX KEY ROUNDS SUFFIX_FMT(with %s for the round)
  local a=$1 b=$2 k=$3 rounds=$4 fmt=$5 r va vb sfx out=""
  for r in $(seq "$rounds"); do
    # shellcheck disable=SC2059
    sfx=$(printf "$fmt" "$r")
    va=$(lt_values "^$a-$sfx\$" "$k"); vb=$(lt_values "^$b-$sfx\$" "$k")
    [ -n "$va" ] && [ -n "$vb" ] && out+="$(awk -v x="$va" -v y="$vb" 'BEGIN{printf "%.3f", (x > 0 ? y / x : 0)}') "
  done
  echo "${out% }"
}

# Markdown rows comparing a baseline and ncro over wrk records labelled
# <prefix>-c<conns>-r<round>. Prints a table for each connection count.
lt_wrk_table() { # BASE_PREFIX NCRO_PREFIX "CONNS" ROUNDS
  local base=$1 nc=$2 conns=$3 rounds=$4 c p rr cr
  echo "| conns | server | req/s, median (min–max) | p50 ms | p99 ms | server CPU µs/req | other tenants' CPU s per run |"
  echo "|---|---|---|---|---|---|---|"
  for c in $conns; do
    for p in "$base" "$nc"; do
      printf '| %s | %s | %s | %s | %s | %s | %s |\n' "$c" "$p" \
        "$(lt_stat "^$p-c$c-r" rps)" "$(lt_stat "^$p-c$c-r" p50_ms)" "$(lt_stat "^$p-c$c-r" p99_ms)" \
        "$(lt_stat "^$p-c$c-r" us_cpu_per_req)" "$(lt_stat "^$p-c$c-r" other_cpu_s)"
    done
  done
  echo
  echo "| conns | ncro/$base req/s per round | median | ncro/$base CPU per request per round | median |"
  echo "|---|---|---|---|---|"
  for c in $conns; do
    rr=$(lt_ratios "$base" "$nc" rps "$rounds" "c$c-r%s")
    cr=$(lt_ratios "$base" "$nc" us_cpu_per_req "$rounds" "c$c-r%s")
    printf '| %s | %s | **%s** | %s | %s |\n' "$c" "$rr" "$(tr ' ' '\n' <<< "$rr" | lt_median)" \
      "$cr" "$(tr ' ' '\n' <<< "$cr" | lt_median)"
  done
}

# Flags records with non-2xx answers or socket errors (a run that served
# errors is not a throughput figure). Prints nothing when all are clean.
lt_check_records() {
  awk '{delete f; for (i=1;i<=NF;i++){split($i,kv,"="); f[kv[1]]=kv[2]}
        if (("non2xx" in f) && (f["non2xx"] != 0 || f["sockerr"] != "none")) printf "- WARNING: %s: non2xx=%s sockerr=%s\n", f["label"], f["non2xx"], f["sockerr"]}' "$RUN/records.txt"
}

# lt_caches DIR: the fake caches A and B from gen-caches.py (seed 42, no
# big NAR files: ~330 MB, ~15 s), PER_CLASS (20000) paths a class.
# Reused when already there; made again (A, B and lists emptied first:
# the size decides which cache holds a hash) when the generator or
# PER_CLASS changed.
# lt_caches_nginx_conf FILE DIR PROCESS_LINES UPA UPB CACHES: writes an nginx
# config (pid and error log in DIR) serving the fake caches CACHES/A on
# 127.0.0.1:UPA and CACHES/B on 127.0.0.1:UPB statically, keep-alive;
# PROCESS_LINES are the worker lines (e.g. "worker_processes auto;").
lt_caches_nginx_conf() {
  local file=$1 dir=$2 proc=$3 upa=$4 upb=$5 caches=$6
  cat > "$file" <<NG
$proc
pid $dir/nginx-up.pid;
error_log $dir/nginx-up-error.log warn;
events { worker_connections 4096; }
http {
  access_log off; sendfile on; tcp_nopush on; tcp_nodelay on;
  keepalive_timeout 65s; keepalive_requests 1000000;
  types { text/x-nix-narinfo narinfo; }
  server { listen 127.0.0.1:$upa backlog=4096; root $caches/A; }
  server { listen 127.0.0.1:$upb backlog=4096; root $caches/B; }
}
NG
}

lt_caches() {
  local dir=$1 per=${PER_CLASS:-20000}
  local gen
  gen="$(sha256sum "$LT_DIR/gen-caches.py" | cut -c1-16) per-class=$per"
  # Regenerate when made by another version of the generator or size.
  if [ "$(cat "$dir/.generator" 2>/dev/null)" != "$gen" ] || [ ! -s "$dir/lists/big-nars.txt" ]; then
    rm -rf "${dir:?}/A" "$dir/B" "$dir/lists"
    lt_cmd python3 "$LT_DIR/gen-caches.py" "$dir" --no-big --per-class "$per" >&2
    echo "$gen" > "$dir/.generator"
  fi
  chmod -R a+rX "$dir"
}

# lt_nar_file DIR LABEL BYTES: makes the NAR named for LABEL (1m, 100m, 1g)
# in big-nars.txt exist with BYTES random bytes, hard-linked into A and B.
# Prints "NARINFO_PATH NAR_PATH".
lt_nar_file() {
  local dir=$1 label=$2 size=$3 ni nar
  read -r ni nar < <(awk -v l="$label" '$1==l{print $2, $3}' "$dir/lists/big-nars.txt")
  [ -n "$nar" ] || lt_die "no $label NAR in $dir/lists/big-nars.txt"
  if [ "$(stat -c %s "$dir/A$nar" 2>/dev/null || echo 0)" != "$size" ]; then
    head -c "$size" /dev/urandom > "$dir/A$nar.tmp" && mv "$dir/A$nar.tmp" "$dir/A$nar"
    chmod 644 "$dir/A$nar"
  fi
  ln -f "$dir/A$nar" "$dir/B$nar"
  echo "$ni $nar"
}

# lt_threads_max PID OUTFILE: samples the thread count of PID every 0.2 s
# (io_uring splice shows up as extra iou-wrk threads) and keeps the maximum
# in OUTFILE; runs in the background, sets SAMPLER_PID.
lt_threads_max() {
  local pid=$1 out=$2
  echo 0 > "$out"
  ( max=0
    while [ -d "/proc/$pid/task" ]; do
      n=$(ls "/proc/$pid/task" | wc -l)
      [ "$n" -gt "$max" ] && { max=$n; echo "$max" > "$out"; }
      sleep 0.2
    done ) &
  SAMPLER_PID=$!
}

# lt_curl LABEL URL STREAMS REPS "SERVER_PIDS" "UPSTREAM_PIDS" SIZE [THREADS_PID]
# STREAMS concurrent curls on CPU 1, each downloading URL REPS times over
# one keep-alive connection to /dev/null. Prints one key=value record
# (appended to records.txt): aggregate MB/s = bytes / wall time of the batch;
# all_cpu_s_per_GB = proxy + upstream + clients + ksoftirqd CPU per GB (on
# loopback the kernel charges the receive copy to whichever side runs it,
# so only this total compares relay modes fully).
lt_curl() {
  local label=$1 url=$2 n=$3 reps=$4 spids=$5 upids=$6 size=$7 tpid=${8:-}
  local out="$RUN/raw/$label.txt" s0 s1 u0 u1 k0 k1 b0 st0 a0 b1 st1 a1 t0 t1 c l0 i tmax=- script
  l0=$(lt_load1)
  script='for i in $(seq "$1"); do curl -s -w "%{http_code} %{size_download} %{speed_download} %{time_total}\n" $(for j in $(seq "$2"); do printf -- "-o /dev/null %s " "$3"; done) & done; wait'
  printf 'taskset -c 1 bash -c %q nar %s %s %s\n' "$script" "$n" "$reps" "$url" >> "$RUN/commands.txt"
  [ -n "$tpid" ] && lt_threads_max "$tpid" "$W/threads.max"
  s0=$(lt_ticks "$spids"); u0=$(lt_ticks "$upids"); k0=$(lt_ticks "$LT_KSOFTIRQ"); read -r b0 st0 a0 < <(lt_sys)
  t0=$(date +%s.%N)
  c=$(lt_on_cpu1 bash -c "$script" nar "$n" "$reps" "$url" 3>&1 > "$out" 2>&1)
  t1=$(date +%s.%N)
  s1=$(lt_ticks "$spids"); u1=$(lt_ticks "$upids"); k1=$(lt_ticks "$LT_KSOFTIRQ"); read -r b1 st1 a1 < <(lt_sys)
  if [ -n "$tpid" ]; then
    kill "$SAMPLER_PID" 2>/dev/null || true; wait "$SAMPLER_PID" 2>/dev/null || true
    tmax=$(cat "$W/threads.max")
  fi
  awk -v label="$label" -v n="$n" -v reps="$reps" -v size="$size" -v t0="$t0" -v t1="$t1" -v hz="$LT_HZ" \
      -v s="$((s1 - s0))" -v u="$((u1 - u0))" -v c="${c:-0}" -v b="$((b1 - b0))" -v st="$((st1 - st0))" -v k="$((k1 - k0))" \
      -v l0="$l0" -v tmax="$tmax" '
    {bytes += $2; xfers++; if ($1 != 200 || $2 != size) bad++
     sp = $3 / 1e6; if (xfers == 1 || sp < mn) mn = sp; if (sp > mx) mx = sp}
    END {
      el = t1 - t0; gb = bytes / 1e9; scpu = s / hz; ucpu = u / hz; ccpu = c / hz; busy = b / hz
      ksirq = k / hz; other = busy - scpu - ucpu - ccpu - ksirq; if (other < 0) other = 0
      printf "label=%s streams=%d transfers=%d bad=%d bytes=%.0f wall_s=%.3f MBps=%.0f stream_MBps=%.0f..%.0f server_cpu_s=%.2f cpu_s_per_GB=%.3f upstream_cpu_s=%.2f up_cpu_s_per_GB=%.3f client_cpu_s=%.2f ksoftirqd_s=%.2f machine_busy_s=%.2f other_cpu_s=%.2f steal_s=%.2f max_threads=%s load1_before=%s all_cpu_s_per_GB=%.3f side_cpu_s_per_GB=%.3f\n",
        label, n, xfers, bad + (xfers != n * reps), bytes, el, bytes / 1e6 / el, mn, mx, scpu, (gb > 0 ? scpu / gb : 0),
        ucpu, (gb > 0 ? ucpu / gb : 0), ccpu, ksirq, busy, other, st / hz, tmax, l0,
        (gb > 0 ? (scpu + ucpu + ccpu + ksirq) / gb : 0), (gb > 0 ? (ucpu + ccpu + ksirq) / gb : 0)
    }' "$out" | tee -a "$RUN/records.txt"
}

# lt_bench LABEL ARGS...: `ncro bench run ARGS` on CPU 1 (one client
# thread), JSON in raw/LABEL.json; prints one key=value record (also in
# records.txt) with req/s and latency percentiles in microseconds.
lt_bench() {
  local label=$1; shift
  local json="$RUN/raw/$label.json" l0
  l0=$(lt_load1)
  printf 'taskset -c 1 ncro bench run -q --threads 1 %s --json raw/%s.json\n' "$*" "$label" >> "$RUN/commands.txt"
  taskset -c 1 "$NCRO" bench run -q --threads 1 "$@" --json "$json" > "$RUN/raw/$label.txt" 2>&1 \
    || { echo "label=$label failed=1" | tee -a "$RUN/records.txt"; return 0; }
  python3 - "$json" "$label" "$l0" <<'PY' | tee -a "$RUN/records.txt"
import json, sys
j = json.load(open(sys.argv[1])); l = j["latency_us"]
st = ",".join(f"{k}:{v}" for k, v in sorted(j["statuses"].items())) or "none"
print(f"label={sys.argv[2]} requests={j['requests']} rps={j['req_per_s']:.0f} "
      f"p50_us={l['p50']} p90_us={l['p90']} p99_us={l['p99']} max_us={l['max']} "
      f"errors={j['errors']} statuses={st} load1_before={sys.argv[3]}")
PY
}

# lt_upstream NAME PORT CPU ARGS...: a synthetic cache (`ncro bench
# upstream`) on CPU, its lists in $W/NAME; sets UP_PID and UP_KEY.
lt_upstream() {
  local name=$1 port=$2 cpu=$3; shift 3
  mkdir -p "$W/$name"
  printf 'taskset -c %s ncro bench upstream --listen 127.0.0.1:%s --threads 1 --write-lists %s %s\n' \
    "$cpu" "$port" "$name" "$*" >> "$RUN/commands.txt"
  taskset -c "$cpu" "$NCRO" bench upstream --listen "127.0.0.1:$port" --threads 1 \
    --write-lists "$W/$name" "$@" > "$W/$name.log" 2>&1 &
  UP_PID=$!
  LT_PIDS+=("$UP_PID")
  local i
  for i in $(seq 600); do grep -q '^serving' "$W/$name.log" 2>/dev/null && break; sleep 0.1; done
  grep -q '^serving' "$W/$name.log" || lt_die "bench upstream $name did not start: $(tail -3 "$W/$name.log")"
  UP_KEY=$(awk '/^public key: /{print $3}' "$W/$name.log")
}

# Field KEY of the last record labelled LABEL.
lt_rec() { lt_field "$(grep "^label=$1 " "$RUN/records.txt" | tail -1)" "$2"; }
