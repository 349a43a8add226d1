//! Route persistence through real processes and at full size.
//!
//! `crash_safety_under_sigkill` re-executes this test binary as a child that
//! writes routes and prints the index of each one acknowledged by a flush,
//! SIGKILLs it mid-stream, and checks that the database still holds every
//! acknowledged route and passes `PRAGMA integrity_check`.
//!
//! The `#[ignore]` tests are measurements, not pass/fail timings:
//!   cargo test --release --test it route_persist:: -- --ignored --nocapture --test-threads=1

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ncro::proto::store_path::{StoreHash, NIX_BASE32_ALPHABET};
use ncro::route::persist::{
    open, open_and_load, spawn_writer, unix_now, RouteRow, RowIds, WriteOp, WriterConfig,
};
use ncro::route::{RouteEntry, RouteTable};

/// Set in the child: the database path it writes to.
const CHILD_DB: &str = "NCRO_ROUTE_CRASH_CHILD_DB";
/// Set in the child: the first route index it writes.
const CHILD_FIRST: &str = "NCRO_ROUTE_CRASH_CHILD_FIRST";
const FAR: u64 = 4_000_000_000;

fn hash(i: u64) -> StoreHash {
    let mut s = [b'0'; 32];
    let mut n = i;
    for b in s.iter_mut().rev().take(8) {
        *b = NIX_BASE32_ALPHABET[(n % 32) as usize];
        n /= 32;
    }
    StoreHash::parse(&s).expect("valid hash")
}

fn entry(i: u64, upstream: &Arc<str>, narinfo_len: usize) -> RouteEntry {
    let mut narinfo = format!("StorePath: /nix/store/{}-pkg-{i}\n", hash(i)).into_bytes();
    narinfo.resize(narinfo_len.max(narinfo.len()), b'x');
    RouteEntry {
        upstream: upstream.clone(),
        // Exact size, as the race engine stores it (see RouteEntry::narinfo).
        narinfo: Bytes::copy_from_slice(&narinfo),
        nar_url: format!("nar/{:052}.nar.xz", i).into(),
        nar_hash: format!("sha256:{:052}", i).into(),
        nar_size: i,
        expires_at: FAR,
        verified_at: 1_700_000_000 + i,
        latency_ms: 3.5,
    }
}

/// Kills the child if the parent panics before doing so itself.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // Already dead in the normal path; the error then is expected.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn crash_safety_under_sigkill() {
    if let Ok(path) = std::env::var(CHILD_DB) {
        let first = std::env::var(CHILD_FIRST).map_or(0, |v| v.parse().expect("index"));
        child_writer_loop(&path, first);
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db/routes.db");
    let path = path.to_str().unwrap();
    let mut acked_all = Vec::new();
    // Several kill/recover rounds on the same file: recovery after a crash
    // must itself survive the next crash.
    for round in 0..3u64 {
        let acked = run_and_kill(path, round * 1_000_000, 300 + 50 * round as usize);
        acked_all.extend(acked);
        let (loaded, db) = open_and_load(path, unix_now()).unwrap();
        assert_eq!(db.integrity_check().unwrap(), "ok", "round {round}");
        assert_eq!(loaded.skipped, 0);
        let stored: HashMap<StoreHash, Arc<RouteEntry>> = loaded.routes.into_iter().collect();
        eprintln!(
            "round {round}: {} acknowledged in all, {} stored after SIGKILL",
            acked_all.len(),
            stored.len()
        );
        let upstream: Arc<str> = Arc::from("https://cache.example");
        for &i in &acked_all {
            let got = stored
                .get(&hash(i))
                .unwrap_or_else(|| panic!("acknowledged route {i} lost (round {round})"));
            assert_eq!(**got, entry(i, &upstream, 120), "route {i}");
        }
    }
}

/// Starts a child writing from index `first`, SIGKILLs it once `want` routes
/// are acknowledged, and returns every index it acknowledged before dying.
fn run_and_kill(path: &str, first: u64, want: usize) -> Vec<u64> {
    let exe = std::env::current_exe().unwrap();
    let child = Command::new(exe)
        .args([
            "--exact",
            "route_persist::crash_safety_under_sigkill",
            "--nocapture",
        ])
        .args(["--test-threads=1"])
        .env(CHILD_DB, path)
        .env(CHILD_FIRST, first.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    let stdout = child.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(n) = line.strip_prefix("ACK ") {
                if tx.send(n.parse::<u64>().unwrap()).is_err() {
                    break;
                }
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut acked = Vec::new();
    while acked.len() < want {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(i) => acked.push(i),
            Err(e) => panic!("child stalled after {} acks: {e}", acked.len()),
        }
    }
    let pid = child.0.id() as libc::pid_t;
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let status = child.0.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    // Lines already in the pipe were acknowledged before the kill too.
    reader.join().unwrap();
    acked.extend(rx.try_iter());
    acked
}

/// The child: insert routes through the real table and writer, flush every
/// few, print what was acknowledged. Runs until killed (or bounded, in case
/// the parent is gone and nobody kills it).
fn child_writer_loop(path: &str, first: u64) {
    let (_, db) = open_and_load(path, unix_now()).unwrap();
    let cfg = WriterConfig {
        max_entries: 10_000_000,
        sweep_interval: Duration::from_secs(3600),
        batch_max: 256,
        ..WriterConfig::default()
    };
    let (writer, _join) = spawn_writer(db, cfg);
    let upstream: Arc<str> = Arc::from("https://cache.example");
    let table = RouteTable::new(1 << 20, vec![upstream.clone()], Some(writer.clone()));
    let mut out = std::io::stdout().lock();
    for chunk in 0..200_000u64 {
        let start = first + chunk * 7;
        for i in start..start + 7 {
            table.insert(hash(i), Arc::new(entry(i, &upstream, 120)));
        }
        writer.flush_blocking().unwrap();
        for i in start..start + 7 {
            if writeln!(out, "ACK {i}").is_err() {
                return; // parent gone
            }
        }
        if out.flush().is_err() {
            return;
        }
    }
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64
}

#[test]
#[ignore = "measurement: run alone in release"]
fn measure_route_table_memory() {
    const N: u64 = 1_000_000;
    const NARINFO: usize = 550;
    let upstream: Arc<str> = Arc::from("https://cache.example");
    let before = rss_bytes();
    let table = RouteTable::new(N as usize, vec![upstream.clone()], None);
    let empty = rss_bytes();
    for i in 0..N {
        table.insert(hash(i), Arc::new(entry(i, &upstream, NARINFO)));
    }
    let after = rss_bytes();
    let routing = (after - before) as f64 - table.body_bytes() as f64;
    println!(
        "route table: {} entries held of {N}; empty table {:.1} MB; cache slots and maps \
         {:.1} MB; narinfo bodies {:.1} MB (bounded); RSS delta {:.1} MB; {:.0} bytes/route \
         besides the bodies",
        table.len(),
        (empty - before) as f64 / 1e6,
        table.structure_bytes() as f64 / 1e6,
        table.body_bytes() as f64 / 1e6,
        (after - before) as f64 / 1e6,
        routing / N as f64,
    );
    assert!(table.len() as u64 > N * 9 / 10);
    // Steady state: as many again, so half are evicted and ghosts fill up.
    for i in N..2 * N {
        table.insert(hash(i), Arc::new(entry(i, &upstream, NARINFO)));
    }
    let steady = rss_bytes();
    let per_steady = (steady - before) as f64 / table.len() as f64;
    println!(
        "after {} inserts: {} held; cache slots and maps {:.1} MB; RSS delta {:.1} MB; \
         {per_steady:.0} bytes/entry held, bodies included",
        2 * N,
        table.len(),
        table.structure_bytes() as f64 / 1e6,
        (steady - before) as f64 / 1e6,
    );
    // A sanity bound far above the measurement, so a regression that doubles
    // the per-entry cost shows up.
    assert!(per_steady < 400.0, "{per_steady} bytes/entry");
}

#[test]
#[ignore = "measurement: run alone in release"]
fn measure_load_one_million_rows() {
    let n: u64 = std::env::var("NCRO_LOAD_ROWS").map_or(1_000_000, |v| v.parse().unwrap());
    let narinfo: usize = std::env::var("NCRO_LOAD_NARINFO").map_or(550, |v| v.parse().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("routes.db");
    let path = path.to_str().unwrap();
    let upstreams: Vec<Arc<str>> = (0..4).map(|u| Arc::from(format!("https://c{u}"))).collect();

    let cfg = WriterConfig {
        max_entries: n as usize,
        batch_max: 4096,
        ..WriterConfig::default()
    };
    let (writer, join) = spawn_writer(open(path).unwrap(), cfg);
    let table = RouteTable::new(n as usize, upstreams.clone(), Some(writer.clone()));
    let t = Instant::now();
    for i in 0..n {
        table.insert(
            hash(i),
            Arc::new(entry(i, &upstreams[i as usize % 4], narinfo)),
        );
        if writer.queue_depth() > 60_000 {
            writer.flush_blocking().unwrap(); // pace the producer, nothing dropped
        }
    }
    writer.flush_blocking().unwrap();
    let write_s = t.elapsed().as_secs_f64();
    assert_eq!(table.dropped_writes(), 0);
    assert_eq!(writer.write_errors(), 0);
    writer.shutdown_blocking().unwrap();
    join.join().unwrap();
    drop(table);
    let size = std::fs::metadata(path).unwrap().len();

    let before = rss_bytes();
    let t = Instant::now();
    let db = open(path).unwrap();
    let table = RouteTable::new(n as usize, upstreams, None);
    let report = table.load(&db, 1).unwrap();
    let load_s = t.elapsed().as_secs_f64();
    assert_eq!(report.routes as u64, n);
    println!(
        "{n} routes, {narinfo}-byte narinfos, db {:.0} MB: writer {:.0} rows/s ({write_s:.1} s); \
         open + RouteTable::load {load_s:.2} s; {} held; RSS delta {:.1} MB",
        size as f64 / 1e6,
        n as f64 / write_s,
        table.len(),
        (rss_bytes() - before) as f64 / 1e6,
    );
}

/// CPU time (ns) the thread named `name` of this process has used so far:
/// schedstat's run time (ns), or utime + stime (clock ticks) without it.
fn thread_cpu_ns(name: &str) -> u64 {
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let dir = task.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.trim_end() != name {
            continue;
        }
        if let Ok(s) = std::fs::read_to_string(dir.join("schedstat")) {
            return s.split_whitespace().next().unwrap().parse().unwrap();
        }
        let stat = std::fs::read_to_string(dir.join("stat")).unwrap();
        // Fields after the ")" that closes comm: utime and stime are the
        // 12th and 13th.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<u64> = rest
            .split_whitespace()
            .skip(11)
            .take(2)
            .map(|v| v.parse().unwrap())
            .collect();
        return (f[0] + f[1]) * 10_000_000; // USER_HZ = 100
    }
    panic!("no thread named {name}");
}

/// CPU the writer thread spends per route it writes, with routes arriving
/// as under a miss load (NCRO_WRITER_RATE routes/s, 10,000 by default: the
/// load test's ~39k new routes in 4 s) or all at once (rate 0).
///
/// `NCRO_WRITER_RANDOM=1` spreads the store hashes over the whole key space
/// as real ones are (by default they are sequential, so every B-tree is
/// appended to), and `NCRO_WRITER_PREFILL=N` first writes N other routes
/// (not measured), so that the inserts land in a table of realistic size.
/// `NCRO_WRITER_BATCH_MAX` and `NCRO_WRITER_LINGER_MS` override the
/// [`WriterConfig`] defaults.
/// Route `i` of a miss load: a new route (row id `i + 1`, as the route
/// table allocates them) replacing none.
fn new_route(h: StoreHash, e: Arc<RouteEntry>, i: u64) -> WriteOp {
    WriteOp::Route(
        h,
        RouteRow::of(&e),
        RowIds {
            id: i + 1,
            replaces: None,
        },
    )
}

#[test]
#[ignore = "measurement: run alone in release"]
fn measure_writer_cpu_per_route() {
    let env = |k: &str, d: u64| std::env::var(k).map_or(d, |v| v.parse().unwrap());
    let n = env("NCRO_WRITER_ROUTES", 50_000);
    let rate = env("NCRO_WRITER_RATE", 10_000);
    let prefill = env("NCRO_WRITER_PREFILL", 0);
    let random = env("NCRO_WRITER_RANDOM", 0) == 1;
    // 32^8 = 2^40 hashes; an odd multiplier permutes them.
    let key = |i: u64| {
        if random {
            hash(i.wrapping_mul(0x9E37_79B9_7F4B) & ((1 << 40) - 1))
        } else {
            hash(i)
        }
    };
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join("routes.db");
    let path = path.to_str().unwrap();
    let upstreams: Vec<Arc<str>> = (0..4).map(|u| Arc::from(format!("https://c{u}"))).collect();
    // Expiry grows with time as in a server (`now + cache.ttl`): one second
    // per 10,000 routes.
    let route = |i: u64| {
        let mut e = entry(i, &upstreams[i as usize % 4], 600);
        e.expires_at = FAR + i / 10_000;
        Arc::new(e)
    };
    let entries: Vec<_> = (prefill..prefill + n).map(route).collect();

    let mut cfg = WriterConfig::default();
    cfg.batch_max = env("NCRO_WRITER_BATCH_MAX", cfg.batch_max as u64) as usize;
    cfg.linger = Duration::from_millis(env("NCRO_WRITER_LINGER_MS", cfg.linger.as_millis() as u64));
    let (writer, join) = spawn_writer(open(path).unwrap(), cfg);
    for i in 0..prefill {
        let e = route(i);
        while !writer.try_write(new_route(key(i), e.clone(), i)) {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    writer.flush_blocking().unwrap(); // startup sweep and prefill out of the way
    let (cpu0, batches0) = (thread_cpu_ns("ncro-db-writer"), writer.batches_written());
    let t = Instant::now();
    for (i, e) in entries.into_iter().enumerate() {
        let i = i as u64;
        if rate > 0 && i % (rate / 1000).max(1) == 0 {
            // Paced: one small group per millisecond.
            let due = Duration::from_secs_f64(i as f64 / rate as f64);
            if let Some(d) = due.checked_sub(t.elapsed()) {
                std::thread::sleep(d);
            }
        }
        while !writer.try_write(new_route(key(prefill + i), e.clone(), prefill + i)) {
            std::thread::sleep(Duration::from_millis(1)); // queue full: burst mode only
        }
    }
    writer.flush_blocking().unwrap();
    let wall = t.elapsed().as_secs_f64();
    let cpu = thread_cpu_ns("ncro-db-writer") - cpu0;
    let batches = writer.batches_written() - batches0;
    assert_eq!(writer.write_errors(), 0);
    assert_eq!(writer.stored_routes(), prefill + n);
    writer.shutdown_blocking().unwrap();
    join.join().unwrap();
    println!(
        "{n} routes at {} in {wall:.2} s ({} keys, {prefill} rows before): writer thread \
         {:.3} CPU-s, {:.2} us CPU per route, {batches} batches ({:.1} routes each)",
        if rate > 0 {
            format!("{rate}/s")
        } else {
            "full speed".into()
        },
        if random { "random" } else { "sequential" },
        cpu as f64 / 1e9,
        cpu as f64 / 1e3 / n as f64,
        n as f64 / batches as f64,
    );
}

/// What the route table's thread pays to queue a route as a [`RouteRow`]
/// (one allocation, the narinfo and two strings copied, then its
/// `RouteEntry` freed there) instead of handing the `Arc<RouteEntry>` to
/// the writer, which then freed it: the CPU that change moves onto the
/// workers. One thread builds NCRO_ROW_ROUTES
/// (50,000) entries as the race engine does (600-byte narinfos), each
/// queued at once as the route table does (`a`: the `Arc` moved into a
/// vector; `b`: a `RouteRow` built, the entry dropped), alternating `a`
/// and `b` in rounds of 1,000; its CPU time per route, of each.
#[test]
#[ignore = "measurement: run alone in release"]
fn measure_route_row_cost_on_the_worker() {
    let n = std::env::var("NCRO_ROW_ROUTES").map_or(50_000, |v| v.parse().unwrap());
    let up: Arc<str> = Arc::from("https://c0");
    let t = std::thread::spawn(move || {
        let (mut arcs, mut rows) = (Vec::with_capacity(1000), Vec::with_capacity(1000));
        let (mut a, mut b) = (0u64, 0u64);
        for round in 0..n / 1000 {
            for pass in 0..2 {
                let c0 = own_cpu_ns();
                for i in 0..1000u64 {
                    let e = Arc::new(entry(round * 1000 + i, &up, 600));
                    if pass == 0 {
                        arcs.push(e);
                    } else {
                        rows.push(RouteRow::of(&e));
                    }
                }
                let spent = own_cpu_ns() - c0;
                *if pass == 0 { &mut a } else { &mut b } += spent;
                // Freed outside the measured loops (the writer's work).
                std::hint::black_box((&arcs, &rows));
                arcs.clear();
                rows.clear();
            }
        }
        (a, b)
    });
    let (a, b) = t.join().unwrap();
    let per = |ns: u64| ns as f64 / n as f64;
    println!(
        "{n} routes: build + queue the Arc {:.0} ns/route, build + RouteRow + free the entry \
         {:.0} ns/route: {:.0} ns/route more on the worker",
        per(a),
        per(b),
        per(b) - per(a)
    );
}

/// CPU time of the calling thread, exact to the call (`schedstat` of a
/// running thread lags by up to a scheduler tick).
fn own_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer for the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0);
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// ncro 2.2's `routes` table as it left it (its migration added
/// `narinfo_bytes` last), in a file with SQLite's default 4 KiB pages.
const NCRO_2_2_SCHEMA: &str = "
    CREATE TABLE routes (
        store_path TEXT PRIMARY KEY, upstream_url TEXT NOT NULL,
        latency_ms REAL NOT NULL DEFAULT 0, latency_ema REAL NOT NULL DEFAULT 0,
        query_count INTEGER NOT NULL DEFAULT 1, failure_count INTEGER NOT NULL DEFAULT 0,
        last_verified INTEGER NOT NULL DEFAULT 0, ttl INTEGER NOT NULL,
        nar_hash TEXT NOT NULL DEFAULT '', nar_size INTEGER NOT NULL DEFAULT 0,
        nar_url TEXT NOT NULL DEFAULT '',
        created_at INTEGER NOT NULL DEFAULT (strftime('%s','now')),
        narinfo_bytes BLOB);
    CREATE INDEX idx_routes_ttl ON routes(ttl);
    CREATE INDEX idx_routes_last_verified ON routes(last_verified);
    CREATE INDEX idx_routes_nar_url ON routes(nar_url);
    CREATE TABLE upstream_health (url TEXT PRIMARY KEY,
        ema_latency REAL NOT NULL DEFAULT 0, consecutive_fails INTEGER NOT NULL DEFAULT 0,
        total_queries INTEGER NOT NULL DEFAULT 0);
    CREATE TABLE negative_cache (store_path TEXT PRIMARY KEY, expires_at INTEGER NOT NULL);
";

fn scalar(db: &std::path::Path, sql: &str) -> rusqlite::types::Value {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .expect("open routes.db read-only");
    c.busy_timeout(Duration::from_secs(5)).unwrap();
    c.query_row(sql, [], |r| r.get(0)).expect(sql)
}

/// Through the real binary: a `routes.db` written by ncro 2.2 is imported
/// at start (its routes answered from the file, the upstream never asked),
/// and the file is the route log from then on (old table gone, 16 KiB
/// pages, sound).
#[test]
fn the_server_imports_an_ncro_2_2_database() {
    use crate::fake::{FakeUpstream, Fault, PathMatch, TestKey, TestPath};
    use crate::routing::{db_dir, entry, NcroConfig};
    use rusqlite::types::Value;

    let k = TestKey::generate("k-1");
    let paths: Vec<TestPath> = (0..4)
        .map(|i| TestPath::new(&format!("from-2-2-{i}")))
        .collect();
    // Every narinfo request fails: only the imported routes can answer.
    let broken = FakeUpstream::builder()
        .rule(PathMatch::Any, Fault::Status(500))
        .start();
    let dir = db_dir();
    let db = dir.path().join("routes.db");
    let now = unix_now() as i64;
    {
        let c = rusqlite::Connection::open(&db).unwrap();
        let mode: String = c
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        c.execute_batch(NCRO_2_2_SCHEMA).unwrap();
        for (i, p) in paths.iter().enumerate() {
            c.execute(
                "INSERT INTO routes (store_path, upstream_url, latency_ms, last_verified, ttl, \
                 nar_hash, nar_size, nar_url, narinfo_bytes) \
                 VALUES (?1, ?2, 5.0, ?3, ?4, ?5, 1, ?6, ?7)",
                rusqlite::params![
                    p.hash,
                    broken.url(),
                    now - 10 + i as i64,
                    now + 3600,
                    p.nar_hash(),
                    p.nar_url().trim_start_matches('/'),
                    p.narinfo(&[&k]).into_bytes(),
                ],
            )
            .unwrap();
        }
    }
    let ncro = NcroConfig::new(&[entry(broken.url(), 10, &k)], &db).start();
    for p in &paths {
        let r = ncro.get(&p.narinfo_request_path());
        assert_eq!(r.status, 200, "{}", ncro.logs());
        let body = String::from_utf8_lossy(&r.body).into_owned();
        assert!(
            body.contains(&format!("StorePath: {}\n", p.store_path())),
            "{body}"
        );
    }
    let asked = broken
        .requests()
        .iter()
        .filter(|r| r.path.ends_with(".narinfo"))
        .count();
    assert_eq!(asked, 0, "every imported route answered from the file");
    assert!(
        ncro.logs().contains("moved the routes of an older ncro"),
        "{}",
        ncro.logs()
    );
    assert_eq!(
        scalar(&db, "SELECT COUNT(*) FROM route_log"),
        Value::Integer(4)
    );
    assert_eq!(
        scalar(&db, "SELECT COUNT(*) FROM route_body"),
        Value::Integer(4)
    );
    assert_eq!(
        scalar(
            &db,
            "SELECT COUNT(*) FROM sqlite_master WHERE name = 'routes'"
        ),
        Value::Integer(0)
    );
    assert_eq!(scalar(&db, "PRAGMA page_size"), Value::Integer(16384));
    assert_eq!(
        scalar(&db, "PRAGMA integrity_check"),
        Value::Text("ok".into())
    );
}

/// Through the real binary: with `cache.max_entries` routes in the file,
/// each new route evicts the oldest row (and its narinfo).
#[test]
fn the_server_keeps_the_newest_routes_within_max_entries() {
    use crate::fake::{FakeUpstream, TestKey, TestPath};
    use crate::routing::{db_dir, entry, NcroConfig};
    use rusqlite::types::Value;

    let k = TestKey::generate("k-1");
    let paths: Vec<TestPath> = (0..6)
        .map(|i| TestPath::new(&format!("capped-{i}")))
        .collect();
    let mut b = FakeUpstream::builder();
    for p in &paths {
        b = b.path(p, &k);
    }
    let up = b.start();
    let dir = db_dir();
    let db = dir.path().join("routes.db");
    let ncro = NcroConfig::new(&[entry(up.url(), 10, &k)], &db)
        .set("cache", "max_entries", 3)
        .start();
    for p in &paths {
        // One request at a time: row ids follow this order.
        assert_eq!(
            ncro.get(&p.narinfo_request_path()).status,
            200,
            "{}",
            ncro.logs()
        );
    }
    let newest: Vec<String> = paths[3..].iter().map(|p| p.hash.clone()).collect();
    let stored = || -> Vec<String> {
        let c =
            rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                .unwrap();
        c.busy_timeout(Duration::from_secs(5)).unwrap();
        let mut stmt = c.prepare("SELECT hash FROM route_log ORDER BY id").unwrap();
        let rows = stmt.query_map([], |r| r.get::<_, String>(0)).unwrap();
        rows.map(Result::unwrap).collect()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while stored() != newest {
        assert!(
            Instant::now() < deadline,
            "stored {:?}, want {newest:?}",
            stored()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        scalar(&db, "SELECT COUNT(*) FROM route_body"),
        Value::Integer(3)
    );
}
