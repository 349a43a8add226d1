//! The "Foundation" issue through the real `ncro` binary over real loopback
//! sockets: the HTTP/1.1 server ([`http`]), workers, drivers and port
//! ownership ([`workers`]), the signal drain ([`drain`]), the upstream
//! side: connection reuse, stale connections and TLS ([`upstream`]), and
//! client-side abuse: `server.max_connections`, unread pipelines and
//! endless request lines ([`limits`]).
//!
//! Every test starts its own ncro (killed on drop) with its own fake
//! upstreams, bounds every wait with a deadline, and leaves generous timing
//! margins: the test machine has two shared cores.

mod drain;
mod http;
mod limits;
mod tls_front;
mod upstream;
mod workers;

use std::ops::{Deref, DerefMut};
use std::time::{Duration, Instant};

use crate::fake::{FakeUpstream, TestKey, TestPath};
use crate::harness::{test_config, NcroProcess};

/// A running ncro and the directory holding its route database; the
/// process is killed (field order) before the directory is removed.
pub struct Running {
    ncro: NcroProcess,
    _db: tempfile::TempDir,
}

impl Deref for Running {
    type Target = NcroProcess;
    fn deref(&self) -> &NcroProcess {
        &self.ncro
    }
}

impl DerefMut for Running {
    fn deref_mut(&mut self) -> &mut NcroProcess {
        &mut self.ncro
    }
}

/// ncro on a free 127.0.0.1 port in front of `upstreams` (url, public key),
/// with `extra` TOML merged over the harness's test config.
pub fn start(upstreams: &[(&str, &str)], extra: &str) -> Running {
    start_with_env(upstreams, extra, &[])
}

/// [`start`] with extra environment variables for the ncro process.
pub fn start_with_env(upstreams: &[(&str, &str)], extra: &str, env: &[(&str, &str)]) -> Running {
    let db = tempfile::Builder::new()
        .prefix("ncro-srv-")
        .tempdir()
        .expect("temp dir");
    let config = config(db.path(), upstreams, extra);
    let ncro = NcroProcess::start_with_env(&config, env);
    // The harness returns once one worker accepts; ncro logs this line when
    // every worker is listening, which tests about workers depend on.
    assert!(
        ncro.wait_for_log("ncro listening", STARTUP),
        "ncro never reported all workers listening\n{}",
        ncro.logs()
    );
    Running { ncro, _db: db }
}

/// How long all workers may take to listen once the first one accepts.
const STARTUP: Duration = Duration::from_secs(20);

/// The test config for `upstreams` (priority 10 each) with `extra` merged
/// over it table by table.
pub fn config(db_dir: &std::path::Path, upstreams: &[(&str, &str)], extra: &str) -> String {
    let ups: Vec<(&str, i32, &str)> = upstreams.iter().map(|(u, k)| (*u, 10, *k)).collect();
    let base = test_config("127.0.0.1:0", &ups, &db_dir.join("routes.db"));
    let mut table: toml::Table = toml::from_str(&base).expect("test config parses");
    let extra: toml::Table = toml::from_str(extra).expect("extra config parses");
    merge(&mut table, extra);
    toml::to_string(&table).expect("config renders")
}

fn merge(into: &mut toml::Table, from: toml::Table) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

/// A fake upstream serving `paths` signed by `key`, plus its
/// `(url, public key)` pair for [`start`].
pub fn fake_with(paths: &[TestPath], key: &TestKey) -> FakeUpstream {
    paths
        .iter()
        .fold(FakeUpstream::builder().cache_info(40), |b, p| {
            b.path(p, key)
        })
        .start()
}

/// The value of the sample `name` (labels included, e.g.
/// `ncro_worker_connections_total{worker="0"}`) in a Prometheus text page.
pub fn metric(page: &str, name: &str) -> Option<u64> {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Polls `cond` every 20 ms until it holds or `within` passes.
pub fn eventually(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The exact `/nix-cache-info` body for a cache priority (with the batch
/// narinfo endpoint advertised).
pub fn cache_info_body(priority: u32) -> String {
    format!("StoreDir: /nix/store\nWantMassQuery: 1\nPriority: {priority}\nGetNarInfosV1: /get-narinfos-v1\n")
}
