//! Crash safety of the route database through the real `ncro` binary.
//!
//! - SIGKILL in the middle of a stream of route writes: every route the
//!   writer had acknowledged (committed) before the kill is there after a
//!   restart, and `PRAGMA integrity_check` is ok.
//! - A database that cannot be opened (path under /proc, a directory, a
//!   read-only file system) and a disk that fills up while ncro runs:
//!   ncro keeps serving from memory, says so loudly in the log and in
//!   `ncro_route_db_degraded`, and never exits.
//!
//! "Acknowledged" is the writer's commit (docs/operations.md, "Crash
//! safety"): a route counts once `ncro_route_writer_rows_total` has counted
//! it, which is also when another SQLite reader of `routes.db` sees it.
//!
//! The read-only and full-disk cases run ncro in a user and mount namespace
//! of its own (`unshare -rm`) over a small tmpfs, so they work for root
//! (where permission bits stop nothing) and for other users alike. Where
//! namespaces are not available they are skipped with a message, except
//! under `CI`, where that is a failure.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use crate::fake::{FakeUpstream, Fault, PathMatch, TestKey, TestPath};
use crate::harness::{HttpConn, NcroProcess};
use crate::metrics::scrape;
use crate::routing::{db_dir, entry, NcroConfig};
use crate::server::eventually;

/// Longest wait for something the writer thread does on its own.
const WRITER_WAIT: Duration = Duration::from_secs(20);

/// Store hash -> narinfo of every route in the route log (the newest row of
/// each hash), read by an independent SQLite connection (none while the
/// file does not exist).
fn db_routes(db: &Path, flags: OpenFlags) -> HashMap<String, Vec<u8>> {
    let Ok(c) = Connection::open_with_flags(db, flags) else {
        return HashMap::new();
    };
    c.busy_timeout(Duration::from_secs(5))
        .expect("busy_timeout");
    let mut stmt = c
        .prepare(
            "SELECT l.hash, b.narinfo FROM route_log l JOIN route_body b ON b.id = l.id \
             ORDER BY l.id",
        )
        .expect("route tables");
    let rows = stmt
        .query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
        })
        .expect("query routes");
    rows.map(|r| r.expect("route row")).collect()
}

fn integrity_check(db: &Path) -> String {
    let c = Connection::open(db).expect("open routes.db");
    c.query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("integrity_check")
}

/// A fake upstream holding `n` signed paths.
fn upstream_with(n: usize, key: &TestKey) -> (FakeUpstream, Vec<TestPath>) {
    let paths: Vec<TestPath> = (0..n).map(|i| TestPath::new(&format!("p{i}"))).collect();
    let mut b = FakeUpstream::builder();
    for p in &paths {
        b = b.path(p, key);
    }
    (b.start(), paths)
}

/// Clients asking for `paths` (split between them, each over one keep-alive
/// connection) until they run out, ncro goes away, or `stop` is set.
/// Returns what each answered path's narinfo was, by hash.
struct Stream {
    answered: Arc<Mutex<HashMap<String, Vec<u8>>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Stream {
    fn start(ncro: &NcroProcess, paths: &[TestPath], clients: usize) -> Stream {
        let answered = Arc::new(Mutex::new(HashMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..clients)
            .map(|c| {
                let mine: Vec<(String, String)> = paths
                    .iter()
                    .skip(c)
                    .step_by(clients)
                    .map(|p| (p.hash.clone(), p.narinfo_request_path()))
                    .collect();
                let (addr, answered, stop) = (ncro.addr(), answered.clone(), stop.clone());
                std::thread::spawn(move || {
                    let Ok(mut conn) = HttpConn::connect(addr) else {
                        return;
                    };
                    for (hash, path) in mine {
                        if stop.load(Ordering::SeqCst) {
                            return;
                        }
                        // An error is ncro being killed under the request.
                        let Ok(r) = conn.get(&path) else { return };
                        assert_eq!(r.status, 200, "{path}: {}", r.text());
                        lock(&answered).insert(hash, r.body);
                    }
                })
            })
            .collect();
        Stream {
            answered,
            stop,
            threads,
        }
    }

    fn answered(&self) -> usize {
        lock(&self.answered).len()
    }

    fn finish(self) -> HashMap<String, Vec<u8>> {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            t.join().expect("client thread");
        }
        std::mem::take(&mut *lock(&self.answered))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn acknowledged_routes_survive_sigkill_mid_stream() {
    const PATHS: usize = 3000;
    let key = TestKey::generate("crash-1");
    let (mut up, paths) = upstream_with(PATHS, &key);
    let db = db_dir();
    let db_path = db.path().join("routes.db");
    // `keep`: the database holds the upstream's narinfo, which is then
    // exactly what was served (`to_self` would serve its URL rewritten).
    let cfg = NcroConfig::new(&[entry(up.url(), 10, &key)], &db_path)
        .set("server", "workers", 2)
        .upstream(0, "nar_url_mode", "keep");
    let mut ncro = cfg.start();
    let stream = Stream::start(&ncro, &paths, 4);
    assert!(
        eventually(Duration::from_secs(60), || stream.answered() >= 300),
        "only {} routes answered\n{}",
        stream.answered(),
        ncro.logs()
    );
    // The writer gathers up to `linger` (50 ms) before its first commit; a
    // fast build answers 300 routes sooner than that.
    assert!(
        eventually(Duration::from_secs(60), || {
            scrape(&ncro).value("ncro_route_writer_rows_total", &[]) > 0.0
        }),
        "no commit\n{}",
        ncro.logs()
    );
    // The acknowledgments: what the writer says it committed, then what a
    // reader of the file sees. Taken while the clients keep writing.
    let committed = scrape(&ncro).value("ncro_route_writer_rows_total", &[]) as usize;
    let visible = db_routes(&db_path, OpenFlags::SQLITE_OPEN_READ_ONLY);
    ncro.kill();
    let at_kill = stream.answered();
    let answered = stream.finish();
    eprintln!(
        "at SIGKILL: {at_kill} answered, {committed} counted committed, {} visible to a reader",
        visible.len()
    );
    assert!(
        at_kill < PATHS,
        "the stream must still be running at the kill"
    );
    assert!(committed > 0 && !visible.is_empty(), "nothing acknowledged");

    assert_eq!(integrity_check(&db_path), "ok");
    let stored = db_routes(&db_path, OpenFlags::default());
    assert!(
        stored.len() >= committed,
        "{} rows after the kill, {committed} were counted committed",
        stored.len()
    );
    for (hash, bytes) in &visible {
        assert_eq!(stored.get(hash), Some(bytes), "acknowledged route {hash}");
    }
    // A route is inserted before its answer is written, so every stored
    // route holds what was (or was about to be) served.
    for (hash, bytes) in &stored {
        if let Some(served) = answered.get(hash) {
            assert_eq!(bytes, served, "stored narinfo of {hash}");
        }
    }

    // The restarted ncro answers the acknowledged routes from the table:
    // the upstream now fails everything.
    let addr = up.addr();
    up.stop();
    let broken = FakeUpstream::builder()
        .rule(PathMatch::Any, Fault::Status(500))
        .start_on(addr)
        .expect("rebind the upstream's port");
    let ncro = cfg.start();
    let mut conn = HttpConn::connect(ncro.addr()).expect("connect");
    for (hash, bytes) in &visible {
        let r = conn.get(&format!("/{hash}.narinfo")).expect("answer");
        assert_eq!(r.status, 200, "{hash}\n{}", ncro.logs());
        assert_eq!(&r.body, bytes);
    }
    let asked = broken.requests();
    assert!(
        asked.iter().all(|r| !r.path.ends_with(".narinfo")),
        "served from the restored table, yet asked {asked:?}"
    );
    let m = scrape(&ncro);
    assert_eq!(m.value("ncro_route_db_degraded", &[]), 0.0);
    assert_eq!(m.value("ncro_route_db_rows", &[]), stored.len() as f64);
}

/// A path ncro cannot open degrades to memory-only: it starts, logs an
/// error, reports `ncro_route_db_degraded 1`, and still remembers routes.
fn assert_memory_only(ncro: &NcroProcess, up: &FakeUpstream, p: &TestPath) {
    assert!(
        ncro.wait_for_log("cannot open the route database", Duration::from_secs(5)),
        "{}",
        ncro.logs()
    );
    let m = scrape(ncro);
    assert_eq!(m.value("ncro_route_db_degraded", &[]), 1.0, "{}", m.text);
    assert!(!m.has_metric("ncro_route_db_rows"), "no database, no rows");
    for _ in 0..2 {
        let r = ncro.get(&p.narinfo_request_path());
        assert_eq!(r.status, 200, "{}", ncro.logs());
    }
    assert_eq!(
        up.request_count(&p.narinfo_request_path()),
        1,
        "the second answer came from memory"
    );
}

#[test]
fn an_unopenable_database_path_degrades_to_memory_only() {
    let key = TestKey::generate("crash-2");
    let (up, paths) = upstream_with(2, &key);
    let dir = db_dir();
    // Neither can be created or opened, as root or not: procfs refuses new
    // directories, and a directory is not a database file.
    let cases = [
        PathBuf::from(format!("/proc/ncro-it-{}/routes.db", std::process::id())),
        dir.path().to_path_buf(),
    ];
    for (db, p) in cases.iter().zip(&paths) {
        let ncro = NcroConfig::new(&[entry(up.url(), 10, &key)], db).start();
        assert_memory_only(&ncro, &up, p);
    }
}

/// Runs ncro in a new user and mount namespace with a tmpfs of `size` on
/// `dir`, holding copies of `seed`'s files, made read-only before ncro
/// starts when `read_only` (a read-only bind remount: writes fail with
/// EROFS; a plain `remount,ro` of the tmpfs is refused in a user namespace). None (after saying why) where namespaces are
/// not available and `CI` is not set.
fn start_on_tmpfs(
    cfg: &NcroConfig,
    dir: &Path,
    size: &str,
    seed: Option<&Path>,
    read_only: bool,
) -> Option<NcroProcess> {
    let probe = std::process::Command::new("unshare")
        .args(["-rm", "true"])
        .status();
    if !probe.as_ref().is_ok_and(|s| s.success()) {
        let why = format!("`unshare -rm` is not available here ({probe:?})");
        assert!(std::env::var_os("CI").is_none(), "{why}");
        eprintln!("SKIPPED: {why}; this test needs a user and mount namespace");
        return None;
    }
    // $1 dir, $2 size, $3 seed dir or "", $4 1 for read-only; then ncro's argv.
    let script = r#"set -e
mount -t tmpfs -o "size=$2,mode=0755" ncro-it "$1"
if [ -n "$3" ]; then cp -- "$3"/* "$1"/; fi
if [ "$4" = 1 ]; then mount -o remount,bind,ro "$1"; fi
shift 4
exec "$@""#;
    let seed = seed.map_or(String::new(), |s| s.display().to_string());
    let dir = dir.display().to_string();
    let ro = if read_only { "1" } else { "0" };
    let args = [
        "-rm",
        "sh",
        "-c",
        script,
        "sh",
        &dir,
        size,
        &seed,
        ro,
        env!("CARGO_BIN_EXE_ncro"),
    ];
    let ncro = NcroProcess::try_start_with("unshare", &args, &cfg.render())
        .unwrap_or_else(|e| panic!("starting ncro in a namespace: {e}"));
    Some(ncro)
}

#[test]
fn a_read_only_file_system_degrades_to_memory_only() {
    let key = TestKey::generate("crash-3");
    let (up, paths) = upstream_with(2, &key);
    // A database written by a normal run, then served from a read-only
    // file system.
    let seed = db_dir();
    let seeded = NcroConfig::new(&[entry(up.url(), 10, &key)], &seed.path().join("routes.db"));
    let mut first = seeded.start();
    assert_eq!(first.get(&paths[0].narinfo_request_path()).status, 200);
    first.sigterm();
    assert!(first.wait_exit(Duration::from_secs(20)).success());
    drop(first);

    let mount = db_dir();
    let cfg = NcroConfig::new(
        &[entry(up.url(), 10, &key)],
        &mount.path().join("routes.db"),
    );
    let Some(ncro) = start_on_tmpfs(&cfg, mount.path(), "4m", Some(seed.path()), true) else {
        return;
    };
    assert_memory_only(&ncro, &up, &paths[1]);
    assert!(
        ncro.stdout().contains("is not writable"),
        "the log names the cause\n{}",
        ncro.logs()
    );
}

/// Fills the file system holding `dir` (seen through ncro's own mount
/// namespace) with one file; returns its path.
fn fill(dir: &Path) -> PathBuf {
    let filler = dir.join("filler");
    let mut f = std::fs::File::create(&filler).expect("create filler");
    let chunk = vec![0u8; 64 * 1024];
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling {}: {e}", filler.display()),
        }
    }
    // tmpfs may accept a partial last write; make sure nothing is left.
    while f.write(&[0u8; 512]).is_ok_and(|n| n > 0) {}
    filler
}

#[test]
fn a_full_disk_degrades_to_memory_and_recovers() {
    let key = TestKey::generate("crash-4");
    let (up, paths) = upstream_with(90, &key);
    let (before, rest) = paths.split_at(10);
    let (during, after) = rest.split_at(40);
    let mount = db_dir();
    let db = mount.path().join("routes.db");
    let cfg = NcroConfig::new(&[entry(up.url(), 10, &key)], &db);
    let Some(mut ncro) = start_on_tmpfs(&cfg, mount.path(), "4m", None, false) else {
        return;
    };
    // The tmpfs exists only in ncro's mount namespace; /proc/PID/root
    // resolves paths there.
    let inside = PathBuf::from(format!("/proc/{}/root", ncro.pid())).join(
        mount
            .path()
            .strip_prefix("/")
            .expect("temp dirs are absolute"),
    );
    let get_all = |ps: &[TestPath]| {
        let mut conn = HttpConn::connect(ncro.addr()).expect("connect");
        for p in ps {
            let r = conn.get(&p.narinfo_request_path()).expect("answer");
            assert_eq!(r.status, 200, "{}", ncro.logs());
        }
    };
    let rows = |n: &NcroProcess| scrape(n).value("ncro_route_writer_rows_total", &[]);
    get_all(before);
    assert!(eventually(WRITER_WAIT, || rows(&ncro) >= 10.0));

    let filler = fill(&inside);
    get_all(during);
    let errors = |n: &NcroProcess| scrape(n).value("ncro_route_writer_errors_total", &[]);
    assert!(
        eventually(WRITER_WAIT, || errors(&ncro) >= 1.0),
        "writes to a full disk never failed\n{}",
        ncro.logs()
    );
    assert_eq!(scrape(&ncro).value("ncro_route_db_degraded", &[]), 1.0);
    assert!(
        ncro.wait_for_log("disk_full", Duration::from_secs(5)),
        "{}",
        ncro.logs()
    );
    // Still routing: the routes learnt while the disk was full are served
    // from memory, the upstream is not asked again.
    get_all(during);
    for p in during {
        assert_eq!(up.request_count(&p.narinfo_request_path()), 1);
    }

    std::fs::remove_file(&filler).expect("remove filler");
    get_all(after);
    assert!(
        eventually(WRITER_WAIT, || scrape(&ncro)
            .value("ncro_route_db_degraded", &[])
            == 0.0),
        "never recovered\n{}",
        ncro.logs()
    );
    assert!(ncro.wait_for_log("writes succeed again", Duration::from_secs(5)));
    // SQLite resolves the /proc/PID/root link to "/" and would open the
    // host's path instead, so check a copy of the files. The writer is idle
    // (every route is committed, the sweep is minutes away), so a copy of
    // the database and its WAL is a consistent snapshot.
    let want = (before.len() + after.len()) as f64;
    assert!(eventually(WRITER_WAIT, || rows(&ncro) >= want));
    let copy = db_dir();
    for suffix in ["", "-wal"] {
        let name = format!("routes.db{suffix}");
        std::fs::copy(inside.join(&name), copy.path().join(&name)).expect("copy database");
    }
    let copied = copy.path().join("routes.db");
    assert_eq!(integrity_check(&copied), "ok");
    let stored: HashSet<String> = db_routes(&copied, OpenFlags::default())
        .into_keys()
        .collect();
    for p in before.iter().chain(after) {
        assert!(stored.contains(&p.hash), "{} persisted", p.name);
    }
    // Held back while the disk was full, written once it had room: the
    // "degraded" gauge clears only when nothing is held back any more.
    let lost = during.iter().filter(|p| !stored.contains(&p.hash)).count();
    assert_eq!(
        lost,
        0,
        "{lost} of {} routes learnt on the full disk were not persisted\n{}",
        during.len(),
        ncro.logs()
    );
    assert!(ncro.wait_for_log(
        "held back while it failed are now stored",
        Duration::from_secs(1)
    ));
    ncro.sigterm();
    let status = ncro.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{status}\n{}", ncro.logs());
}
