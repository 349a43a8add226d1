//! S3 upstreams through the real `ncro` binary.
//!
//! - Against a real Garage server ([`garage`]) filled with a signed cache
//!   from the shared nix-harness: the real Nix client substitutes closures
//!   through ncro from the S3 upstream raced against an HTTP upstream;
//!   hits, misses, NAR ranges, health probes and metrics; a wrong secret
//!   key; credentials from a shared credentials file with `profile=`.
//!   Garage comes from `NCRO_GARAGE` or `~/.cache/ncro-ci-tools` (`.ci/run`
//!   installs it); without it the test fails under `CI=true` and is skipped
//!   loudly otherwise.
//! - Against a fake S3 (a [`FakeUpstream`] answering presigned paths by
//!   prefix): the request shape, and the 403 rules Garage cannot produce
//!   (AWS's 403 for an absent key once the credentials are known to work;
//!   credential error codes and missing credentials are transient).

mod garage;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use crate::e2e_nix::{fetch, harness_scripts, run, store_hash, summary, Report};
use crate::fake::{FakeUpstream, Fault, PathMatch, TestKey, TestPath};
use crate::harness::{test_config, NcroProcess};
use crate::server::eventually;
use garage::Garage;

/// The small harness caches: no large paths, so building and uploading
/// them takes seconds.
const CACHE_KNOBS: &[(&str, &str)] = &[
    ("NH_SMALL", "12"),
    ("NH_LARGE_MB", "0 0 0"),
    ("NH_MEDIUM_XZ_MB", "0"),
];
const MAKE_CACHES_LIMIT: Duration = Duration::from_secs(480);
const PROBE_WAIT: Duration = Duration::from_secs(15);

/// Environment for ncro that keeps the AWS chain away from the machine's
/// own files and from IMDS (tests talk to loopback only).
fn aws_env(dir: &Path) -> Vec<(&'static str, String)> {
    let none = dir.join("no-such-aws-file").to_string_lossy().into_owned();
    vec![
        ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ("AWS_CONFIG_FILE", none.clone()),
        ("AWS_SHARED_CREDENTIALS_FILE", none),
    ]
}

fn start(config: &str, env: &[(&'static str, String)]) -> NcroProcess {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    NcroProcess::start_with_env(config, &env)
}

fn get(ncro: &NcroProcess, path: &str) -> crate::harness::Response {
    ncro.get(path)
}

// ---------------------------------------------------------------- Garage

/// Caches A, B, C built by make-caches.sh with [`CACHE_KNOBS`], once per
/// test process.
struct SmallCaches {
    scripts: PathBuf,
    out: PathBuf,
    manifest: String,
}

impl SmallCaches {
    fn role(&self, role: &str) -> &str {
        let line = self.manifest.lines().find_map(|l| {
            let mut it = l.strip_prefix("role ")?.split_whitespace();
            (it.next()? == role).then(|| it.next()).flatten()
        });
        line.unwrap_or_else(|| panic!("role {role} not in {}/manifest.txt", self.out.display()))
    }

    fn key(&self, cache: &str) -> String {
        let pk = self.out.join("keys").join(format!("{cache}.pk"));
        let key = std::fs::read_to_string(&pk).unwrap_or_else(|e| panic!("{}: {e}", pk.display()));
        key.trim().to_owned()
    }

    fn cache_dir(&self, cache: &str) -> PathBuf {
        self.out.join("caches").join(cache)
    }

    /// The NAR file behind `role`'s narinfo in `cache` and its `URL:`.
    fn nar_of(&self, cache: &str, role: &str) -> (String, Vec<u8>) {
        let narinfo = self
            .cache_dir(cache)
            .join(format!("{}.narinfo", store_hash(self.role(role))));
        let text = std::fs::read_to_string(&narinfo).expect("narinfo in cache");
        let url = text
            .lines()
            .find_map(|l| l.strip_prefix("URL: "))
            .expect("URL line")
            .to_owned();
        let bytes = std::fs::read(self.cache_dir(cache).join(&url)).expect("NAR file");
        (url, bytes)
    }
}

fn small_caches() -> &'static SmallCaches {
    static CACHES: OnceLock<Result<SmallCaches, String>> = OnceLock::new();
    match CACHES.get_or_init(build_small_caches) {
        Ok(c) => c,
        Err(e) => panic!("nix harness setup failed: {e}"),
    }
}

fn build_small_caches() -> Result<SmallCaches, String> {
    let scripts = harness_scripts()?;
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let out = tmp.join("nix-harness-s3");
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let mut cmd = Command::new(scripts.join("make-caches.sh"));
    cmd.arg(&out).envs(CACHE_KNOBS.iter().copied());
    let r = run(&mut cmd, &tmp.join("make-caches-s3.log"), MAKE_CACHES_LIMIT);
    if r.code != Some(0) {
        return Err(format!(
            "make-caches.sh exited {:?} after {:.1}s:\n{}",
            r.code,
            r.secs,
            crate::harness::tail(&r.output, 40)
        ));
    }
    let manifest = std::fs::read_to_string(out.join("manifest.txt")).map_err(|e| e.to_string())?;
    Ok(SmallCaches {
        scripts,
        out,
        manifest,
    })
}

/// Garage, or `None` (after a loud message) when it is not installed and
/// this is not CI. Under `CI=true` a missing Garage fails the test.
fn garage_or_skip(test: &str) -> Option<PathBuf> {
    match garage::binary() {
        Ok(bin) => Some(bin),
        Err(why) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("{test}: CI=true but {why}")
        }
        Err(why) => {
            eprintln!(
                "\n!!!!!!!! SKIPPED {test}: {why}\n!!!!!!!! (set CI=true to make this a failure)\n"
            );
            None
        }
    }
}

/// A cache directory served over plain HTTP by the harness's cachehttp.py.
struct HttpCache {
    child: std::process::Child,
    url: String,
}

impl HttpCache {
    fn start(scripts: &Path, dir: &Path, log: &Path) -> HttpCache {
        let port = crate::harness::free_port();
        let child = Command::new("python3")
            .arg(scripts.join("cachehttp.py"))
            .args(["serve", "--dir"])
            .arg(dir)
            .args(["--port", &port.to_string(), "--log"])
            .arg(log)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("run cachehttp.py");
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let mut cache = HttpCache {
            child,
            url: format!("http://{addr}"),
        };
        let up = eventually(Duration::from_secs(15), || {
            std::net::TcpStream::connect(addr).is_ok()
        });
        if !up || cache.child.try_wait().is_ok_and(|s| s.is_some()) {
            panic!("cachehttp.py did not listen on {addr}");
        }
        cache
    }
}

impl Drop for HttpCache {
    fn drop(&mut self) {
        let _ = self.child.kill(); // our own child; fails only if it exited
        let _ = self.child.wait();
    }
}

/// ncro config: the S3 upstream (cache A) in tier 40, cache B over HTTP
/// in tier 50, health probes every 200 ms when `probes`.
fn garage_config(s3: &str, http: &str, c: &SmallCaches, db: &Path, probes: bool) -> String {
    let (ka, kb) = (c.key("A"), c.key("B"));
    let mut config = test_config("127.0.0.1:0", &[(s3, 40, &ka), (http, 50, &kb)], db);
    if probes {
        config.push_str("\n[health]\nenabled = true\nprobe_interval = \"200ms\"\n");
    }
    config
}

fn s3_url(g: &Garage, extra: &str) -> String {
    format!(
        "s3://{}?endpoint={}&scheme=http&region={}{extra}",
        g.bucket,
        g.endpoint(),
        garage::REGION
    )
}

/// `ncro_upstream_requests_total` for one upstream and outcome (0 if absent).
fn outcomes(page: &str, upstream: &str, outcome: &str) -> u64 {
    let (u, o) = (
        format!("upstream=\"{upstream}\""),
        format!("outcome=\"{outcome}\""),
    );
    page.lines()
        .filter(|l| l.starts_with("ncro_upstream_requests_total{"))
        .find(|l| l.contains(&u) && l.contains(&o))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

fn health_entry(ncro: &NcroProcess, url: &str) -> serde_json::Value {
    let h: serde_json::Value = serde_json::from_slice(&get(ncro, "/health").body).expect("JSON");
    let list = h["upstreams"].as_array().cloned().unwrap_or_default();
    list.into_iter()
        .find(|u| u["url"] == url)
        .unwrap_or_else(|| panic!("{url} not in /health: {h}"))
}

#[test]
fn garage_end_to_end() {
    let Some(bin) = garage_or_skip("s3::garage_end_to_end") else {
        return;
    };
    let c = small_caches();
    let g = Garage::start(bin, "nixcache");
    let uploaded = g.upload_dir(&c.cache_dir("A"));
    let tmp = tempfile::tempdir().expect("tempdir");
    let http = HttpCache::start(&c.scripts, &c.cache_dir("B"), &tmp.path().join("B.log"));
    let mut report = Report::default();
    report.step(
        "upload",
        uploaded > 10,
        &format!("{uploaded} objects of cache A"),
        "",
    );
    served_from_s3(c, &g, &http, tmp.path(), &mut report);
    wrong_secret(c, &g, &http, tmp.path(), &mut report);
    profile_credentials(c, &g, tmp.path(), &mut report);
    report.finish(&format!("S3 upstream on Garage {}", g.endpoint()));
}

/// Cache A on S3 raced against cache B over HTTP, with the Nix client.
fn served_from_s3(c: &SmallCaches, g: &Garage, http: &HttpCache, dir: &Path, r: &mut Report) {
    let url = s3_url(g, "");
    let config = garage_config(&url, &http.url, c, &dir.join("main.db"), true);
    let mut env = aws_env(dir);
    env.push(("AWS_ACCESS_KEY_ID", g.key_id.clone()));
    env.push(("AWS_SECRET_ACCESS_KEY", g.secret.clone()));
    let ncro = start(&config, &env);

    let only_a = format!("/{}.narinfo", store_hash(c.role("only_a")));
    let resp = get(&ncro, &only_a);
    let signed_a = resp.text().contains("Sig: cache-a-1:");
    r.step(
        "hit_s3",
        resp.status == 200 && signed_a,
        &format!("{only_a}: {} (want 200 signed by cache A)", resp.status),
        &resp.text(),
    );
    let only_b = format!("/{}.narinfo", store_hash(c.role("only_b")));
    let resp = get(&ncro, &only_b);
    r.step(
        "hit_http",
        resp.status == 200,
        &format!("{only_b}: {} (S3 404, HTTP 200)", resp.status),
        &resp.text(),
    );
    let absent = format!("/{}.narinfo", store_hash(c.role("absent")));
    let resp = get(&ncro, &absent);
    r.step(
        "miss",
        resp.status == 404,
        &format!("{absent}: {} (both 404)", resp.status),
        &resp.text(),
    );

    let (nar_url, nar) = c.nar_of("A", "tree_ab");
    // This URL (xz) is only in cache A, so only S3 can serve it.
    let nar_path = format!("/{nar_url}");
    let (from, to) = (10, nar.len().min(400) - 1);
    let range = format!("bytes={from}-{to}");
    let resp = ncro
        .request("GET", &nar_path, &[("Range", &range)])
        .expect("range request");
    let want_cr = format!("bytes {from}-{to}/{}", nar.len());
    let ok = resp.status == 206
        && resp.body == nar[from..=to]
        && resp.header("Content-Range") == Some(want_cr.as_str());
    r.step(
        "nar_range",
        ok,
        &format!(
            "{nar_path} {range}: {} {:?}",
            resp.status,
            resp.header("Content-Range")
        ),
        "",
    );
    let resp = get(&ncro, &nar_path);
    r.step(
        "nar_full",
        resp.status == 200 && resp.body == nar,
        &format!("{nar_path}: {} {} bytes", resp.status, resp.body.len()),
        "",
    );

    let probed = eventually(PROBE_WAIT, || {
        let e = health_entry(&ncro, &url);
        e["status"] == "ACTIVE" && e["cache_info"] == true
    });
    r.step(
        "health_probe",
        probed,
        "S3 upstream ACTIVE with nix-cache-info seen",
        &health_entry(&ncro, &url).to_string(),
    );

    let page = get(&ncro, "/metrics").text();
    let (won, missed) = (
        outcomes(&page, &url, "accepted"),
        outcomes(&page, &url, "not_found"),
    );
    r.step(
        "metrics",
        won >= 1 && missed >= 1,
        &format!("S3 upstream accepted={won} not_found={missed}"),
        &page,
    );

    let keys = format!("{} {}", c.key("A"), c.key("B"));
    let roles = ["split_top", "app_ab", "chain_a_top"];
    let paths: Vec<&str> = roles.iter().map(|role| c.role(role)).collect();
    let run = fetch(
        &c.scripts,
        &ncro.url(),
        &keys,
        &paths,
        &[],
        &dir.join("fetch.log"),
    );
    r.step(
        "nix_client",
        run.code == Some(0),
        &format!(
            "{roles:?} (split_top's dependency only on HTTP): {}",
            summary(&run)
        ),
        &run.output,
    );
}

/// A wrong secret key: S3 refuses with 403 AccessDenied ("Invalid
/// signature"), which must stay a 502, never a remembered 404.
fn wrong_secret(c: &SmallCaches, g: &Garage, http: &HttpCache, dir: &Path, r: &mut Report) {
    let url = s3_url(g, "");
    let config = garage_config(&url, &http.url, c, &dir.join("wrong.db"), false);
    let mut env = aws_env(dir);
    env.push(("AWS_ACCESS_KEY_ID", g.key_id.clone()));
    env.push(("AWS_SECRET_ACCESS_KEY", garage::random_hex(32)));
    let ncro = start(&config, &env);
    let only_a = format!("/{}.narinfo", store_hash(c.role("only_a")));
    let statuses: Vec<u16> = (0..2).map(|_| get(&ncro, &only_a).status).collect();
    r.step(
        "bad_secret",
        statuses == [502, 502],
        &format!("{only_a} twice: {statuses:?} (want 502, not cached)"),
        &ncro.logs(),
    );
    let only_b = format!("/{}.narinfo", store_hash(c.role("only_b")));
    let status = get(&ncro, &only_b).status;
    r.step(
        "bad_secret_b",
        status == 200,
        &format!("{only_b} from HTTP: {status}"),
        "",
    );
    let page = get(&ncro, "/metrics").text();
    let auth = outcomes(&page, &url, "auth");
    r.step(
        "bad_secret_metric",
        auth >= 2,
        &format!("outcome=auth: {auth}"),
        &page,
    );
}

/// Credentials from a shared credentials file, chosen with `profile=`.
fn profile_credentials(c: &SmallCaches, g: &Garage, dir: &Path, r: &mut Report) {
    let file = dir.join("credentials");
    let text = format!(
        "[default]\naws_access_key_id = GKnotthisone\naws_secret_access_key = nope\n\n\
         [ncro-test]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
        g.key_id, g.secret
    );
    std::fs::write(&file, text).expect("write credentials");
    let url = s3_url(g, "&profile=ncro-test");
    let db = dir.join("profile.db");
    let config = test_config("127.0.0.1:0", &[(&url, 40, &c.key("A"))], &db);
    let mut env = aws_env(dir);
    env.retain(|(k, _)| *k != "AWS_SHARED_CREDENTIALS_FILE");
    env.push((
        "AWS_SHARED_CREDENTIALS_FILE",
        file.to_string_lossy().into_owned(),
    ));
    let ncro = start(&config, &env);
    let only_a = format!("/{}.narinfo", store_hash(c.role("only_a")));
    let status = get(&ncro, &only_a).status;
    r.step(
        "profile",
        status == 200,
        &format!("{only_a} with profile=ncro-test: {status}"),
        &ncro.logs(),
    );
}

// ---------------------------------------------------------------- fake S3

const BUCKET: &str = "cache";
const REGION: &str = "test-region";

/// A complete HTTP/1.1 response for [`Fault::Raw`].
fn raw(status: &str, content_type: &str, body: &[u8]) -> Fault {
    let mut r = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    Fault::Raw(r)
}

fn s3_error(status: &str, code: &str) -> Fault {
    let body = format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>test</Message></Error>");
    raw(status, "application/xml", body.as_bytes())
}

/// A fake S3 bucket holding `paths`; every other key gets `otherwise`.
fn fake_s3(paths: &[&TestPath], key: &TestKey, otherwise: Fault) -> FakeUpstream {
    let info = "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n";
    let mut b = FakeUpstream::builder().rule(
        PathMatch::prefix(&format!("/{BUCKET}/nix-cache-info?")),
        raw("200 OK", "text/x-nix-cache-info", info.as_bytes()),
    );
    for p in paths {
        let narinfo = p.narinfo(&[key]);
        b = b
            .rule(
                PathMatch::prefix(&format!("/{BUCKET}{}?", p.narinfo_request_path())),
                raw("200 OK", "text/x-nix-narinfo", narinfo.as_bytes()),
            )
            .rule(
                PathMatch::prefix(&format!("/{BUCKET}{}?", p.nar_request_path())),
                raw("200 OK", "application/x-nix-nar", &p.nar),
            );
    }
    b.rule(PathMatch::Any, otherwise).start()
}

fn fake_s3_url(s3: &FakeUpstream) -> String {
    format!(
        "s3://{BUCKET}?endpoint={}&scheme=http&region={REGION}",
        s3.addr()
    )
}

/// ncro with the fake S3 (tier 40) and an empty HTTP cache (tier 50).
fn start_with_fake(
    s3: &FakeUpstream,
    http: &FakeUpstream,
    key: &TestKey,
    env: &[(&'static str, String)],
) -> (NcroProcess, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = fake_s3_url(s3);
    let pk = key.public_key();
    let config = test_config(
        "127.0.0.1:0",
        &[(&url, 40, &pk), (&http.url(), 50, &pk)],
        &dir.path().join("routes.db"),
    );
    let mut all = aws_env(dir.path());
    all.extend(env.iter().cloned());
    (start(&config, &all), dir)
}

fn test_creds() -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ACCESS_KEY_ID", "AKIDNCROTEST".into()),
        ("AWS_SECRET_ACCESS_KEY", "secret".into()),
    ]
}

#[test]
fn s3_requests_are_presigned_for_the_bucket() {
    let key = TestKey::generate("fake-s3-1");
    let p = TestPath::new("presigned");
    let s3 = fake_s3(&[&p], &key, s3_error("404 Not Found", "NoSuchKey"));
    let http = FakeUpstream::builder().start();
    let (ncro, _dir) = start_with_fake(&s3, &http, &key, &test_creds());
    assert_eq!(get(&ncro, &p.narinfo_request_path()).status, 200);
    let resp = ncro
        .request("GET", &p.nar_request_path(), &[("Range", "bytes=2-9")])
        .expect("NAR");
    assert_eq!(
        (resp.status, resp.body.len()),
        (200, p.nar.len()),
        "the fake ignores Range"
    );
    let log = s3.requests();
    let nar = log
        .iter()
        .find(|q| {
            q.path
                .starts_with(&format!("/{BUCKET}{}?", p.nar_request_path()))
        })
        .unwrap_or_else(|| panic!("no NAR request in {log:?}"));
    assert_eq!(
        nar.header("Range"),
        Some("bytes=2-9"),
        "Range passes unsigned"
    );
    assert_eq!(nar.header("Host"), Some(s3.addr().to_string().as_str()));
    let query = nar.path.split_once('?').map(|(_, q)| q).unwrap_or_default();
    for want in [
        "X-Amz-Algorithm=AWS4-HMAC-SHA256",
        "X-Amz-SignedHeaders=host",
        "X-Amz-Expires=3600",
        "X-Amz-Credential=AKIDNCROTEST%2F",
    ] {
        assert!(query.contains(want), "{want} missing from {query}");
    }
    assert!(
        query.contains(&format!("%2F{REGION}%2Fs3%2Faws4_request")),
        "{query}"
    );
    assert!(query.contains("X-Amz-Signature="), "{query}");
}

#[test]
fn s3_403_is_a_miss_once_the_credentials_work() {
    let key = TestKey::generate("fake-s3-1");
    let hit = TestPath::new("hit");
    // AWS without s3:ListBucket: 403 AccessDenied for every absent key.
    let s3 = fake_s3(&[&hit], &key, s3_error("403 Forbidden", "AccessDenied"));
    let http = FakeUpstream::builder().start();
    let (ncro, _dir) = start_with_fake(&s3, &http, &key, &test_creds());
    let first = TestPath::new("absent-1").narinfo_request_path();
    assert_eq!(
        get(&ncro, &first).status,
        502,
        "before any 2xx a 403 may be a bad key: transient"
    );
    assert_eq!(get(&ncro, &hit.narinfo_request_path()).status, 200);
    let second = TestPath::new("absent-2").narinfo_request_path();
    assert_eq!(
        get(&ncro, &second).status,
        404,
        "credentials proven: 403 is a miss"
    );
    assert_eq!(
        get(&ncro, &first).status,
        404,
        "the early 502 was not cached"
    );
    let before = s3.requests().len();
    assert_eq!(get(&ncro, &second).status, 404);
    assert_eq!(s3.requests().len(), before, "the miss is negative-cached");
}

#[test]
fn s3_credential_errors_are_transient() {
    let key = TestKey::generate("fake-s3-1");
    let hit = TestPath::new("hit");
    let denied = TestPath::new("denied");
    let s3 = FakeUpstream::builder()
        .rule(
            PathMatch::prefix(&format!("/{BUCKET}{}?", hit.narinfo_request_path())),
            raw(
                "200 OK",
                "text/x-nix-narinfo",
                hit.narinfo(&[&key]).as_bytes(),
            ),
        )
        .rule(
            PathMatch::prefix(&format!("/{BUCKET}{}?", denied.narinfo_request_path())),
            s3_error("403 Forbidden", "SignatureDoesNotMatch"),
        )
        .rule(PathMatch::Any, s3_error("404 Not Found", "NoSuchBucket"))
        .start();
    let http = FakeUpstream::builder().start();
    let (ncro, _dir) = start_with_fake(&s3, &http, &key, &test_creds());
    assert_eq!(get(&ncro, &hit.narinfo_request_path()).status, 200);
    for _ in 0..2 {
        assert_eq!(get(&ncro, &denied.narinfo_request_path()).status, 502);
    }
    let other = TestPath::new("other").narinfo_request_path();
    assert_eq!(get(&ncro, &other).status, 502, "NoSuchBucket is not a miss");
    let page = get(&ncro, "/metrics").text();
    assert_eq!(outcomes(&page, &fake_s3_url(&s3), "auth"), 3, "{page}");
}

#[test]
fn s3_without_credentials_answers_502() {
    let key = TestKey::generate("fake-s3-1");
    let hit = TestPath::new("hit");
    let s3 = fake_s3(&[&hit], &key, s3_error("404 Not Found", "NoSuchKey"));
    let http = FakeUpstream::builder().start();
    // The whole chain runs, IMDS included, but IMDS is a closed loopback
    // port: this also drives the chain's own HTTP client (ring TLS setup).
    let imds = format!("http://127.0.0.1:{}", crate::harness::free_port());
    let env = [
        ("AWS_EC2_METADATA_DISABLED", "false".to_owned()),
        ("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds),
    ];
    let (ncro, _dir) = start_with_fake(&s3, &http, &key, &env);
    assert_eq!(get(&ncro, &hit.narinfo_request_path()).status, 502);
    assert!(s3.requests().is_empty(), "nothing unsigned is sent");
    assert!(
        ncro.wait_for_log("cannot get S3 credentials", Duration::from_secs(5)),
        "the chain's failure is logged"
    );
}
