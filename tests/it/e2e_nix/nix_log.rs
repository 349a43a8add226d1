//! `nix log` through ncro with the real Nix client (Debian's 2.8).
//!
//! The shared harness caches carry no build logs (`nix copy` does not copy
//! them), so this test makes its own cache with the real client: it builds
//! a one-line derivation (a fresh one per run, so a log is always
//! written), `nix copy`s the output and `nix store copy-log`s its log into
//! a `file://` cache, and serves that cache's files from a fake upstream
//! placed behind an empty, preferred one. Measured request pattern of
//! `nix log --store http://…` (Nix 2.8): `GET /nix-cache-info`,
//! `GET /<out hash>.narinfo` (for its `Deriver`), `GET /log/<drv basename>`.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use super::{harness_scripts, run, Report};
use crate::fake::{random_hash, FakeUpstream};
use crate::harness::{test_config, NcroProcess};
use crate::server::metric;

const LIMIT: Duration = Duration::from_secs(120);

/// `nix …` with the harness's daemon-less settings and its own disk cache.
fn nix(scripts: &Path, xdg: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(r#"set -e; . "$1/lib.sh"; nh_nix_env "$2"; shift 2; exec "$@""#)
        .arg("nix-env-wrapper")
        .arg(scripts)
        .arg(xdg)
        .args(args);
    cmd
}

/// A fake upstream serving every file of a `file://` cache directory.
fn serve_dir(dir: &Path) -> FakeUpstream {
    let mut builder = FakeUpstream::builder();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read cache dir").flatten() {
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(rel) = path.strip_prefix(dir) {
                let bytes = std::fs::read(&path).expect("read cache file");
                builder = builder.file(&format!("/{}", rel.display()), bytes);
            }
        }
    }
    builder.start()
}

/// Builds a fresh derivation, copies it and its log into `cache`; returns
/// (output path, derivation basename, the log line, public key).
fn make_cache(scripts: &Path, work: &Path) -> (String, String, String, String) {
    let nonce = random_hash();
    let line = format!("ncro-e2e-build-log-{nonce}");
    let expr = format!(
        r#"builtins.derivation {{ name = "ncro-log-{nonce}"; system = builtins.currentSystem; builder = "/bin/sh"; args = ["-c" "echo {line}; echo done > $out"]; }}"#
    );
    std::fs::write(work.join("log.nix"), expr).expect("write expr");
    let script = r#"set -e; . "$1/lib.sh"; nh_nix_env "$2/xdg"; cd "$2"
out=$(nix-build log.nix --no-out-link 2>build.err)
drv=$(nix-store -q --deriver "$out")
nix-store --generate-binary-cache-key e2e-log-1 sk pk
nix copy --to "file://$2/cache?secret-key=$2/sk" "$out"
nix store copy-log --to "file://$2/cache" "$out"
printf 'StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n' > cache/nix-cache-info
echo "OUT=$out"; echo "DRV=${drv##*/}""#;
    let mut cmd = Command::new("bash");
    cmd.args(["-c", script, "make-log-cache"])
        .arg(scripts)
        .arg(work);
    let r = run(&mut cmd, &work.join("make.log"), LIMIT);
    assert_eq!(
        r.code,
        Some(0),
        "making the log cache failed:\n{}",
        r.output
    );
    let field = |k: &str| {
        r.output
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap_or_else(|| panic!("no {k} in:\n{}", r.output))
            .to_owned()
    };
    let pk = std::fs::read_to_string(work.join("pk")).expect("public key");
    (field("OUT="), field("DRV="), line, pk.trim().to_owned())
}

#[test]
fn nix_log_through_ncro() {
    let scripts = harness_scripts().unwrap_or_else(|e| panic!("{e}"));
    let work = tempfile::tempdir().expect("tempdir");
    let (out, drv, line, pk) = make_cache(&scripts, work.path());
    let log_file = work.path().join("cache/log").join(&drv);
    assert!(
        log_file.is_file(),
        "nix store copy-log wrote {}",
        log_file.display()
    );

    let empty = FakeUpstream::builder().cache_info(10).start();
    let with_log = serve_dir(&work.path().join("cache"));
    let db = tempfile::tempdir().expect("tempdir");
    let ups = [
        (empty.url(), 10, pk.clone()),
        (with_log.url(), 20, pk.clone()),
    ];
    let refs: Vec<(&str, i32, &str)> = ups
        .iter()
        .map(|(u, p, k)| (u.as_str(), *p, k.as_str()))
        .collect();
    let ncro = NcroProcess::start(&test_config("127.0.0.1:0", &refs, &db.path().join("r.db")));

    let mut report = Report::default();
    let xdg = work.path().join("client-xdg");
    let mut cmd = nix(
        &scripts,
        &xdg,
        &["nix", "log", "--store", &ncro.url(), &out],
    );
    let r = run(&mut cmd, &work.path().join("nix-log.log"), LIMIT);
    let ok = r.code == Some(0) && r.output.contains(&line);
    report.step(
        "store_http",
        ok,
        &format!("nix log --store {}: rc={:?}", ncro.url(), r.code),
        &r.output,
    );

    // The substituter form: a chroot store that has nothing, ncro as its
    // only substituter.
    let chroot = work.path().join("chroot");
    let chroot = chroot.to_string_lossy();
    let url = ncro.url();
    let xdg2 = work.path().join("client-xdg2");
    let args = [
        "nix",
        "log",
        "--store",
        &chroot,
        "--option",
        "substituters",
        &url,
        "--option",
        "trusted-public-keys",
        &pk,
        &out,
    ];
    let r = run(
        &mut nix(&scripts, &xdg2, &args),
        &work.path().join("nix-log-sub.log"),
        LIMIT,
    );
    let ok = r.code == Some(0) && r.output.contains(&line);
    report.step(
        "substituter",
        ok,
        &format!("nix log via substituters: rc={:?}", r.code),
        &r.output,
    );

    let log_req = format!("/log/{drv}");
    let served = with_log.request_count(&log_req);
    report.step(
        "upstream",
        served >= 1,
        &format!("{served} GET {log_req} at the upstream with the log"),
        "",
    );
    let page = ncro.get("/metrics").text();
    let oks = metric(
        &page,
        "ncro_endpoint_requests_total{endpoint=\"log\",result=\"ok\"}",
    );
    report.step(
        "metric",
        oks == Some(2),
        &format!("log ok count {oks:?} (want 2)"),
        &page,
    );
    report.finish(&format!(
        "nix log through {} (log only at {})",
        ncro.url(),
        with_log.url()
    ));
}
