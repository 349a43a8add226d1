//! The real Nix client (Debian nix-bin 2.8) against real caches, through
//! the real ncro binary, driven by the shared nix-harness scripts
//! (`make-caches.sh`, `serve-caches.sh`, `client-fetch.sh`).
//!
//! The harness is found through `NCRO_NIX_HARNESS`, else at
//! `<crate>/../shared/nix-harness`. Without it or without `nix-store` these
//! tests fail (they do not skip): run `.ci/run` or `apt-get install nix-bin`.
//! Caches are built once under `CARGO_TARGET_TMPDIR/nix-harness` and reused
//! by later runs (a warm rebuild takes a few seconds).

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

mod canonical;
mod failover;
mod fallback;
mod hedge;
mod nix_log;
mod ranged;

use crate::fake::{FakeUpstream, TestKey, TestPath};
use crate::harness::{free_ports, tail, test_config, NcroProcess};

/// Upper bound for building the caches from cold (FINDINGS: 10–25 s).
const MAKE_CACHES_LIMIT: Duration = Duration::from_secs(480);
/// Budget for all client fetches of one test (under 5 s with a working
/// proxy; a hanging one uses it up and the remaining cases are skipped).
const FETCH_BUDGET: Duration = Duration::from_secs(150);
/// Per client-fetch.sh run (its own `-t`; we add a margin to kill it).
const FETCH_LIMIT_S: u64 = 60;

/// Roles that must be fetched completely through ncro, and why.
const ROUTED_ROLES: &[(&str, &str)] = &[
    (
        "split_top",
        "closure split across caches: top in A, its dependency only in B",
    ),
    (
        "app_ab",
        "diamond closure in A, B and C with different compressions",
    ),
    ("only_a", "path only in A"),
    ("only_b", "path only in B"),
    ("only_c", "path only in C"),
    ("large_a", "64 MiB NAR (zstd) only in A"),
    ("large_b", "160 MiB NAR (uncompressed) only in B"),
    ("tree_ab", "500-file tree in A and B"),
    ("chain_a_top", "depth-6 chain only in A"),
];

/// The output of one script run.
pub(crate) struct Run {
    /// None when killed (timeout) or ended by a signal.
    pub(crate) code: Option<i32>,
    pub(crate) output: String,
    pub(crate) secs: f64,
}

/// Runs `cmd` in its own process group with stdout+stderr into `log`;
/// after `limit` the whole group (only what this call started) is killed.
pub(crate) fn run(cmd: &mut Command, log: &Path, limit: Duration) -> Run {
    let t = Instant::now();
    let spawned = File::create(log).and_then(|f| {
        let err = f.try_clone()?;
        cmd.stdin(Stdio::null())
            .stdout(f)
            .stderr(err)
            .process_group(0)
            .spawn()
    });
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => panic!("cannot run {cmd:?}: {e}"),
    };
    let code = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status.code(),
            Ok(None) if t.elapsed() < limit => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) | Err(_) => {
                let pgid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
                // SAFETY: signals the process group created for this child
                // (process_group(0) above), which is not reaped yet.
                unsafe { libc::kill(-pgid, libc::SIGKILL) };
                let _ = child.wait(); // reaping after SIGKILL cannot meaningfully fail
                break None;
            }
        }
    };
    let output = std::fs::read(log).map(|b| String::from_utf8_lossy(&b).into_owned());
    Run {
        code,
        output: output.unwrap_or_else(|e| format!("<no log {}: {e}>", log.display())),
        secs: t.elapsed().as_secs_f64(),
    }
}

/// The shared caches, built once per test process.
struct NixCaches {
    scripts: PathBuf,
    out: PathBuf,
    roles: HashMap<String, String>,
    /// Public keys of caches A, B and C.
    keys: [String; 3],
}

impl NixCaches {
    fn role(&self, role: &str) -> &str {
        self.roles.get(role).unwrap_or_else(|| {
            panic!(
                "role {role} missing from {}/manifest.txt",
                self.out.display()
            )
        })
    }

    fn script(&self, name: &str) -> Command {
        Command::new(self.scripts.join(name))
    }
}

fn caches() -> &'static NixCaches {
    static CACHES: OnceLock<Result<NixCaches, String>> = OnceLock::new();
    match CACHES.get_or_init(make_caches) {
        Ok(c) => c,
        Err(e) => panic!("nix harness setup failed: {e}"),
    }
}

pub(crate) fn harness_scripts() -> Result<PathBuf, String> {
    let dir = match std::env::var_os("NCRO_NIX_HARNESS") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/nix-harness"),
    };
    if !dir.join("client-fetch.sh").is_file() {
        return Err(format!(
            "nix-harness scripts not found in {} (set NCRO_NIX_HARNESS; `.ci/run` points it at ../shared/nix-harness)",
            dir.display()
        ));
    }
    let nix = Command::new("nix-store").arg("--version").output();
    if !nix.is_ok_and(|o| o.status.success()) {
        return Err(
            "nix-store is not installed: run `.ci/run` or `apt-get install nix-bin`".into(),
        );
    }
    Ok(dir)
}

fn make_caches() -> Result<NixCaches, String> {
    let scripts = harness_scripts()?;
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let out = tmp.join("nix-harness");
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    // Another test process on the same target dir may be building too.
    let lock = File::create(tmp.join("nix-harness.lock")).map_err(|e| e.to_string())?;
    // SAFETY: flock on an fd we own; released when `lock` is dropped.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(format!("flock: {}", std::io::Error::last_os_error()));
    }
    let mut cmd = Command::new(scripts.join("make-caches.sh"));
    cmd.arg(&out);
    let r = run(&mut cmd, &tmp.join("make-caches.log"), MAKE_CACHES_LIMIT);
    if r.code != Some(0) {
        return Err(format!(
            "make-caches.sh {} exited {:?} after {:.1}s:\n{}",
            out.display(),
            r.code,
            r.secs,
            tail(&r.output, 40)
        ));
    }
    let manifest = std::fs::read_to_string(out.join("manifest.txt")).map_err(|e| e.to_string())?;
    let roles = manifest
        .lines()
        .filter_map(|l| l.strip_prefix("role "))
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_owned(), it.next()?.to_owned()))
        })
        .collect();
    let key = |c: &str| std::fs::read_to_string(out.join("keys").join(format!("{c}.pk")));
    let keys = [key("A"), key("B"), key("C")].map(|k| k.map(|s| s.trim().to_owned()));
    let keys = match keys {
        [Ok(a), Ok(b), Ok(c)] => [a, b, c],
        _ => return Err(format!("public keys missing in {}/keys", out.display())),
    };
    Ok(NixCaches {
        scripts,
        out,
        roles,
        keys,
    })
}

/// Caches A, B and C served over HTTP for one test; stopped on drop. Each
/// test gets its own serve dir (with a `caches` link to the shared caches)
/// because serve-caches.sh stops earlier servers of the same dir.
struct Served<'a> {
    caches: &'a NixCaches,
    root: PathBuf,
    urls: [String; 3],
}

fn serve<'a>(caches: &'a NixCaches, tag: &str) -> Served<'a> {
    serve_with(caches, tag, ["A", "B", "C"], &[])
}

/// Like [`serve`], with the shared cache dir served as each of A, B and C
/// in `dirs` (["A", "A", "C"] serves A twice) and extra environment for
/// serve-caches.sh (`NH_SERVE_ARGS_A` and the like: fault rules).
fn serve_with<'a>(
    caches: &'a NixCaches,
    tag: &str,
    dirs: [&str; 3],
    env: &[(&str, &str)],
) -> Served<'a> {
    let root = caches.out.with_file_name(format!("nix-serve-{tag}"));
    if root.join("serve").is_dir() {
        // Leftovers of a killed run: stop its servers (the script only
        // signals PIDs whose command line is cachehttp.py).
        let mut stop = caches.script("serve-caches.sh");
        run(
            stop.arg("--stop").arg(&root),
            &root.with_extension("stop.log"),
            Duration::from_secs(30),
        );
    }
    let _ = std::fs::remove_dir_all(&root); // absent on a first run
    std::fs::create_dir_all(&root).expect("create serve dir");
    std::fs::create_dir_all(root.join("caches")).expect("create caches dir");
    for (name, dir) in ["A", "B", "C"].into_iter().zip(dirs) {
        let shared = caches.out.join("caches").join(dir);
        std::os::unix::fs::symlink(shared, root.join("caches").join(name)).expect("link cache");
    }
    let mut last = String::new();
    for _ in 0..3 {
        let base = free_ports(3);
        let mut cmd = caches.script("serve-caches.sh");
        cmd.arg(&root)
            .arg(base.to_string())
            .envs(env.iter().copied());
        let r = run(
            &mut cmd,
            &root.with_extension("start.log"),
            Duration::from_secs(60),
        );
        if r.code == Some(0) {
            let urls = [0, 1, 2].map(|i| format!("http://127.0.0.1:{}", base + i));
            return Served { caches, root, urls };
        }
        last = r.output;
    }
    panic!("step `serve caches` failed three times; last output:\n{last}");
}

impl Served<'_> {
    fn access_logs(&self) -> String {
        let mut s = String::new();
        for c in ["A", "B", "C"] {
            let log = std::fs::read_to_string(self.root.join("serve").join(format!("{c}.log")));
            let log = log.unwrap_or_else(|e| format!("<{e}>"));
            s.push_str(&format!(
                "--- cache {c} access log (tail) ---\n{}\n",
                tail(&log, 25)
            ));
        }
        s
    }
}

impl Drop for Served<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.access_logs());
        }
        let mut stop = self.caches.script("serve-caches.sh");
        stop.arg("--stop").arg(&self.root);
        let r = run(
            &mut stop,
            &self.root.with_extension("stop.log"),
            Duration::from_secs(30),
        );
        if r.code != Some(0) {
            eprintln!(
                "serve-caches.sh --stop {} failed:\n{}",
                self.root.display(),
                r.output
            );
        }
    }
}

/// Runs client-fetch.sh against `url` for `paths`.
pub(crate) fn fetch(
    scripts: &Path,
    url: &str,
    keys: &str,
    paths: &[&str],
    extra: &[&str],
    log: &Path,
) -> Run {
    let mut cmd = Command::new(scripts.join("client-fetch.sh"));
    cmd.args(["-K", keys, "-t", &FETCH_LIMIT_S.to_string()])
        .args(extra)
        .arg(url)
        .args(paths);
    run(&mut cmd, log, Duration::from_secs(FETCH_LIMIT_S + 15))
}

/// Collects one line per step so a failure shows every step's outcome.
#[derive(Default)]
pub(crate) struct Report {
    lines: Vec<String>,
    failures: Vec<String>,
}

impl Report {
    pub(crate) fn step(&mut self, name: &str, ok: bool, summary: &str, details: &str) {
        let mark = if ok { "ok  " } else { "FAIL" };
        self.lines.push(format!("{mark} {name:<14} {summary}"));
        if !ok {
            self.failures.push(format!(
                "=== step {name} failed: {summary}\n{}",
                tail(details, 30)
            ));
        }
    }

    pub(crate) fn finish(self, context: &str) {
        let table = self.lines.join("\n");
        if !self.failures.is_empty() {
            panic!("{context}\n{table}\n\n{}", self.failures.join("\n\n"));
        }
        eprintln!("{context}\n{table}");
    }
}

/// The 32-character hash part of a store path from the manifest.
pub(crate) fn store_hash(path: &str) -> &str {
    let hash = path.strip_prefix("/nix/store/").and_then(|p| p.get(..32));
    hash.unwrap_or_else(|| panic!("not a store path: {path}"))
}

/// The last `client-fetch:` summary line of a run, for the report.
pub(crate) fn summary(r: &Run) -> String {
    let line = r
        .output
        .lines()
        .rev()
        .find(|l| l.starts_with("client-fetch:"));
    format!(
        "rc={:?} {:.1}s {}",
        r.code,
        r.secs,
        line.unwrap_or("(no summary line)")
    )
}

/// Starts a proxy over A, B and C through `start` (ncro, or the reference
/// stand-in), then runs every client case through it.
fn client_flow(tag: &str, start: impl FnOnce(&str) -> NcroProcess) {
    let c = caches();
    let served = serve(c, tag);
    let db = tempfile::tempdir().expect("tempdir");
    let ups: Vec<(&str, i32, &str)> = (0..3)
        .map(|i| (served.urls[i].as_str(), 50, c.keys[i].as_str()))
        .collect();
    let proxy = start(&test_config(
        "127.0.0.1:0",
        &ups,
        &db.path().join("routes.db"),
    ));
    let report = fetch_cases(c, &proxy, db.path());
    report.finish(&format!(
        "nix client through {} (upstreams {:?})",
        proxy.url(),
        served.urls
    ));
}

fn fetch_cases(c: &NixCaches, proxy: &NcroProcess, logs: &Path) -> Report {
    let keys = c.keys.join(" ");
    let started = Instant::now();
    let mut report = Report::default();
    let in_budget = |name: &str, report: &mut Report| {
        let ok = started.elapsed() < FETCH_BUDGET;
        if !ok {
            report.step(name, false, "not run: time budget exhausted", "");
        }
        ok
    };
    let url = proxy.url();
    for (role, why) in ROUTED_ROLES {
        if in_budget(role, &mut report) {
            let r = fetch(
                &c.scripts,
                &url,
                &keys,
                &[c.role(role)],
                &[],
                &logs.join(format!("{role}.log")),
            );
            report.step(
                role,
                r.code == Some(0),
                &format!("{why}: {}", summary(&r)),
                &r.output,
            );
        }
    }
    if in_budget("all_parallel", &mut report) {
        // Every closure at once with parallel NAR downloads.
        let all: Vec<&str> = ROUTED_ROLES.iter().map(|(role, _)| c.role(role)).collect();
        let r = fetch(
            &c.scripts,
            &url,
            &keys,
            &all,
            &["-o", "--max-jobs 8"],
            &logs.join("all.log"),
        );
        report.step("all_parallel", r.code == Some(0), &summary(&r), &r.output);
    }
    let absent = c.role("absent");
    if in_budget("absent", &mut report) {
        let r = fetch(
            &c.scripts,
            &url,
            &keys,
            &[absent],
            &[],
            &logs.join("absent.log"),
        );
        let clean = r.code == Some(1) && r.output.contains("don't know how to build");
        report.step(
            "absent",
            clean,
            &format!("client must fail cleanly: {}", summary(&r)),
            &r.output,
        );
    }
    let narinfo = format!("/{}.narinfo", store_hash(absent));
    match proxy.request("GET", &narinfo, &[]) {
        Ok(resp) => {
            let s = format!("proxy answers GET {narinfo} with {}", resp.status);
            report.step("absent_404", resp.status == 404, &s, &resp.text());
        }
        Err(e) => report.step("absent_404", false, &format!("GET {narinfo}: {e}"), ""),
    }
    report
}

/// The whole flow through ncro. Fails at step `start ncro` until ncro
/// serves, then per client case (every case's outcome is printed).
#[test]
fn nix_client_fetches_through_ncro() {
    client_flow("e2e", |config| {
        NcroProcess::try_start(config).unwrap_or_else(|e| panic!("step `start ncro` failed: {e}"))
    });
}

/// The same flow through the harness's naive merging proxy: shows the flow
/// and its expectations are right, so a failure above is ncro's.
#[test]
fn nix_client_flow_passes_with_reference_proxy() {
    let cachehttp = caches().scripts.join("cachehttp.py");
    let wrapper = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/reference-proxy.py");
    let (wrapper, cachehttp) = (wrapper.to_string_lossy(), cachehttp.to_string_lossy());
    client_flow("reference", |config| {
        NcroProcess::try_start_with("python3", &[&wrapper, &cachehttp], config)
            .unwrap_or_else(|e| panic!("step `start reference proxy` failed: {e}"))
    });
}

#[test]
fn nix_harness_direct_smoke() {
    // The same flow against cache A directly: proves the harness, the
    // caches and the client work, independent of ncro.
    let c = caches();
    let served = serve(c, "direct");
    let logs = tempfile::tempdir().expect("tempdir");
    let a = &served.urls[0];
    let mut report = Report::default();
    let paths = [c.role("only_a"), c.role("chain_a_top")];
    let r = fetch(
        &c.scripts,
        a,
        &c.keys[0],
        &paths,
        &[],
        &logs.path().join("a.log"),
    );
    report.step("only_a+chain", r.code == Some(0), &summary(&r), &r.output);
    let absent = c.role("absent");
    let r = fetch(
        &c.scripts,
        a,
        &c.keys[0],
        &[absent],
        &[],
        &logs.path().join("absent.log"),
    );
    report.step("absent", r.code == Some(1), &summary(&r), &r.output);
    let log = std::fs::read_to_string(served.root.join("serve/A.log")).unwrap_or_default();
    let asked = format!("path=/{}.narinfo", store_hash(absent));
    let answered_404 = log
        .lines()
        .any(|l| l.contains(&asked) && l.contains("status=404"));
    report.step(
        "absent_log",
        answered_404,
        "cache A logged a 404 for the absent narinfo",
        &log,
    );
    report.finish(&format!("nix client directly against cache A {a}"));
}

#[test]
fn nix_accepts_fake_signed_narinfo() {
    // The fake's narinfo signing and NARs are accepted by the real client,
    // and a signature by an untrusted key is not: tests that build narinfos
    // with `fake::nix` therefore test against what Nix really checks.
    let scripts = harness_scripts().unwrap_or_else(|e| panic!("{e}"));
    let key = TestKey::generate("fake-cache-1");
    let stranger = TestKey::generate("fake-cache-1");
    let dep = TestPath::new("fake-dep");
    let top = TestPath::new("fake-top").reference(&dep);
    let unsigned = TestPath::new("fake-untrusted");
    let up = FakeUpstream::builder()
        .cache_info(40)
        .path(&dep, &key)
        .path(&top, &key)
        .path(&unsigned, &stranger)
        .start();
    let logs = tempfile::tempdir().expect("tempdir");
    let pk = key.public_key();
    let mut report = Report::default();
    let r = fetch(
        &scripts,
        &up.url(),
        &pk,
        &[&top.store_path()],
        &[],
        &logs.path().join("ok.log"),
    );
    report.step("signed", r.code == Some(0), &summary(&r), &r.output);
    let r = fetch(
        &scripts,
        &up.url(),
        &pk,
        &[&unsigned.store_path()],
        &[],
        &logs.path().join("bad.log"),
    );
    let refused = r.code == Some(1) && r.output.contains("is not signed by any of the keys");
    report.step("untrusted_sig", refused, &summary(&r), &r.output);
    let nar_fetches = up
        .requests()
        .iter()
        .filter(|q| q.path.starts_with("/nar/"))
        .count();
    report.step(
        "nar_requests",
        nar_fetches == 2,
        &format!("{nar_fetches} NAR requests (want 2)"),
        "",
    );
    report.finish(&format!(
        "nix client against the fake upstream {}",
        up.url()
    ));
}
