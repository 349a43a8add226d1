//! Runs the real `ncro` binary and talks plain HTTP/1.1 to it.
//!
//! [`NcroProcess::start`] writes the config into a temp dir, spawns
//! `ncro serve --config <file>` without any inherited `NCRO_*` variables,
//! waits until the listen address accepts, and kills the process (by its own
//! PID) on drop. Its stdout/stderr go to files that are printed when a test
//! panics while the process is alive.
//!
//! A `listen` with port 0 (e.g. `127.0.0.1:0`) makes the harness pick a
//! free port and retry with another one if ncro reports it taken.

#![allow(dead_code)] // shared by test modules; not every test uses every helper

mod http;
pub use http::{http_get, HttpConn, Response};

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::io::{self, ErrorKind};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long ncro may take to accept connections after spawning.
const START_DEADLINE: Duration = Duration::from_secs(20);
/// Per-read/write socket timeout of the test HTTP client.
const IO_TIMEOUT: Duration = Duration::from_secs(15);
/// Attempts when a chosen free port turns out to be taken.
const PORT_ATTEMPTS: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("config is not valid TOML: {0}")]
    Config(String),
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("ncro exited with {status} before accepting on {addr}\n{logs}")]
    EarlyExit {
        status: ExitStatus,
        addr: SocketAddr,
        logs: String,
    },
    #[error("ncro did not accept on {addr} within {secs}s\n{logs}")]
    NotListening {
        addr: SocketAddr,
        secs: u64,
        logs: String,
    },
}

/// Ports handed out by this process, never handed out twice: ncro binds with
/// SO_REUSEPORT, so two test instances given the same port would silently
/// share it instead of failing.
static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// Where test ports come from: below the kernel's ephemeral range, so
/// connect() never takes them implicitly. A busy load test on the same
/// machine leaves thousands of TIME_WAIT sockets on ephemeral ports (nearly
/// every even one), which makes consecutive ports there almost never free;
/// and bind(0) never hands ports below the range to other processes.
fn port_window(n: u16) -> Option<(u16, u16)> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let low: u16 = range.split_whitespace().next()?.parse().ok()?;
    (low >= 11_000 + n).then_some((10_000, low - n))
}

/// A candidate base port: random in the window, else kernel-chosen.
fn candidate(window: Option<(u16, u16)>) -> Option<u16> {
    match window {
        Some((lo, hi)) => Some(rand::Rng::gen_range(&mut rand::thread_rng(), lo..hi)),
        None => TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .ok(),
    }
}

/// `n` consecutive ports on 127.0.0.1 that were free a moment ago; returns
/// the first. The ports are released before returning.
pub fn free_ports(n: u16) -> u16 {
    let window = port_window(n);
    for _ in 0..500 {
        let Some(base) = candidate(window).filter(|b| b.checked_add(n).is_some()) else {
            continue;
        };
        // Held together so that each check sees the others taken.
        let held: Vec<_> = (0..n)
            .map(|i| TcpListener::bind(("127.0.0.1", base + i)))
            .collect();
        if held.iter().any(|r| r.is_err()) {
            continue;
        }
        let mut guard = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
        let set = guard.get_or_insert_with(HashSet::new);
        if (base..base + n).any(|p| set.contains(&p)) {
            continue;
        }
        set.extend(base..base + n);
        return base;
    }
    panic!("no {n} consecutive free ports on 127.0.0.1 after 500 tries");
}

/// One free port on 127.0.0.1.
pub fn free_port() -> u16 {
    free_ports(1)
}

/// An ncro 2.2-format config: `listen` verbatim, one `[[upstreams]]` per
/// `(url, priority, public_key)` (an empty key is left out), SQLite at `db`,
/// debug text logs.
pub fn test_config(listen: &str, upstreams: &[(&str, i32, &str)], db: &Path) -> String {
    let q = |s: &str| toml::Value::String(s.to_owned()).to_string();
    let mut out = format!("[server]\nlisten = {}\n\n", q(listen));
    for (url, priority, key) in upstreams {
        out.push_str(&format!(
            "[[upstreams]]\nurl = {}\npriority = {priority}\n",
            q(url)
        ));
        if !key.is_empty() {
            out.push_str(&format!("public_key = {}\n", q(key)));
        }
        out.push('\n');
    }
    let db = db.to_string_lossy();
    out.push_str(&format!("[cache]\ndb_path = {}\n\n", q(&db)));
    out.push_str("[logging]\nlevel = \"debug\"\nformat = \"text\"\n");
    out
}

/// The `server.listen` of a config as a socket address to connect to
/// (wildcards become loopback; a leading `:` means all IPv4 addresses).
fn listen_addr(table: &toml::Table) -> Result<SocketAddr, HarnessError> {
    let listen = table
        .get("server")
        .and_then(|s| s.get("listen"))
        .and_then(|l| l.as_str())
        .unwrap_or(":8080");
    let full = match listen.strip_prefix(':') {
        Some(port) => format!("0.0.0.0:{port}"),
        // ncro listens on 127.0.0.1 for `localhost` (worker::check_listen).
        None => match listen.strip_prefix("localhost:") {
            Some(port) => format!("127.0.0.1:{port}"),
            None => listen.to_owned(),
        },
    };
    let mut addr: SocketAddr = full
        .parse()
        .map_err(|e| HarnessError::Config(format!("server.listen {listen:?}: {e}")))?;
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => addr.set_ip(Ipv4Addr::LOCALHOST.into()),
        IpAddr::V6(ip) if ip.is_unspecified() => addr.set_ip(Ipv6Addr::LOCALHOST.into()),
        _ => {}
    }
    Ok(addr)
}

/// A running `ncro serve`; killed on drop if still running.
pub struct NcroProcess {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
    exit: Option<ExitStatus>,
}

impl NcroProcess {
    /// Starts ncro and waits until it accepts; panics with its logs if not.
    pub fn start(config_toml: &str) -> NcroProcess {
        NcroProcess::try_start(config_toml).unwrap_or_else(|e| panic!("starting ncro: {e}"))
    }

    pub fn try_start(config_toml: &str) -> Result<NcroProcess, HarnessError> {
        NcroProcess::try_start_with(env!("CARGO_BIN_EXE_ncro"), &[], config_toml)
    }

    /// Like [`Self::start`] with extra environment variables for ncro
    /// (e.g. `MONOIO_FORCE_LEGACY_DRIVER`); `NCRO_*` ones are honoured too.
    pub fn start_with_env(config_toml: &str, env: &[(&str, &str)]) -> NcroProcess {
        let launch = Launch {
            program: env!("CARGO_BIN_EXE_ncro"),
            pre_args: &[],
            env,
        };
        launch
            .start(config_toml)
            .unwrap_or_else(|e| panic!("starting ncro: {e}"))
    }

    /// Like [`Self::try_start`] but runs `program pre_args... serve --config
    /// FILE` (the harness's own tests use a stand-in server).
    pub fn try_start_with(
        program: &str,
        pre_args: &[&str],
        config_toml: &str,
    ) -> Result<NcroProcess, HarnessError> {
        Launch {
            program,
            pre_args,
            env: &[],
        }
        .start(config_toml)
    }

    /// Ready once the port accepts and, where the log level shows it, ncro
    /// has logged `ncro listening`: another process (a parallel test's
    /// fake upstream, say) may hold the port for a moment, and a connect
    /// alone would take its listener for ncro's.
    fn wait_accepting(&mut self, announces: bool) -> Result<(), HarnessError> {
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait()? {
                self.exit = Some(status);
                let (addr, logs) = (self.addr, self.logs());
                return Err(HarnessError::EarlyExit { status, addr, logs });
            }
            let announced = !announces || self.logs().contains("ncro listening");
            if announced
                && TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let (addr, logs) = (self.addr, self.logs());
                let secs = START_DEADLINE.as_secs();
                return Err(HarnessError::NotListening { addr, secs, logs });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR` (no trailing slash).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The temp dir holding `ncro.toml`, `stdout.log` and `stderr.log`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// GET on a fresh connection; panics (with ncro's logs) on I/O errors.
    pub fn get(&self, path: &str) -> Response {
        self.request("GET", path, &[]).unwrap_or_else(|e| {
            panic!(
                "GET {path} from ncro at {}: {e}\n{}",
                self.addr,
                self.logs()
            )
        })
    }

    /// Any request on a fresh connection.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> io::Result<Response> {
        HttpConn::connect(self.addr)?.request(method, path, headers)
    }

    pub fn stdout(&self) -> String {
        read_lossy(&self.dir.path().join("stdout.log"))
    }

    pub fn stderr(&self) -> String {
        read_lossy(&self.dir.path().join("stderr.log"))
    }

    /// Config, exit state and the tails of both logs, for failure messages.
    pub fn logs(&self) -> String {
        let config = read_lossy(&self.dir.path().join("ncro.toml"));
        format!(
            "--- ncro pid {} on {} ({}) ---\n--- config ---\n{config}--- stdout (tail) ---\n{}\n--- stderr (tail) ---\n{}\n--- end of ncro logs ---",
            self.child.id(),
            self.addr,
            self.exit.map_or("running".to_owned(), |s| s.to_string()),
            tail(&self.stdout(), 60),
            tail(&self.stderr(), 120),
        )
    }

    /// Polls stdout+stderr until `needle` shows up; false on timeout.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.stderr().contains(needle) || self.stdout().contains(needle) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn sigterm(&self) {
        self.signal(libc::SIGTERM);
    }

    /// Sends `sig` to this process only (no process group).
    pub fn signal(&self, sig: libc::c_int) {
        if self.exit.is_some() {
            return;
        }
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
        // SAFETY: kill(2) on our own child's PID; the child is not reaped yet
        // (`exit` is None), so the PID cannot have been reused.
        unsafe { libc::kill(pid, sig) };
    }

    /// Waits for exit; on timeout kills it and panics with the logs.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        if let Some(status) = self.exit {
            return status;
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    self.exit = Some(status);
                    return status;
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Ok(None) => {
                    let logs = self.logs();
                    self.kill();
                    panic!("ncro did not exit within {timeout:?}\n{logs}");
                }
                Err(e) => panic!("waiting for ncro: {e}"),
            }
        }
    }

    /// SIGKILL and reap, if still running.
    pub fn kill(&mut self) {
        if self.exit.is_none() {
            let _ = self.child.kill(); // fails only if it already exited
            self.exit = self.child.wait().ok();
        }
    }
}

impl Drop for NcroProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        self.kill();
    }
}

/// Which program to run as "ncro".
struct Launch<'a> {
    program: &'a str,
    pre_args: &'a [&'a str],
    /// Set after the `NCRO_*` variables are removed, so they win.
    env: &'a [(&'a str, &'a str)],
}

impl Launch<'_> {
    /// Spawns with the config's port, or picks free ports for port 0.
    fn start(&self, config_toml: &str) -> Result<NcroProcess, HarnessError> {
        let mut table: toml::Table =
            toml::from_str(config_toml).map_err(|e| HarnessError::Config(e.to_string()))?;
        // Health probes add requests and connections to every fake upstream,
        // which would skew the counts most tests assert on; tests of health
        // itself say `[health] enabled = true`.
        let health = table
            .entry("health")
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if let Some(h) = health.as_table_mut() {
            h.entry("enabled").or_insert(toml::Value::Boolean(false));
        }
        // Index summary refreshes would add requests the same way; tests
        // of index routing say `[index] enabled = true`.
        let index = table
            .entry("index")
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if let Some(i) = index.as_table_mut() {
            i.entry("enabled").or_insert(toml::Value::Boolean(false));
        }
        let wanted = listen_addr(&table)?;
        if wanted.port() != 0 {
            let text = toml::to_string(&table).map_err(|e| HarnessError::Config(e.to_string()))?;
            return self.spawn(&text, wanted);
        }
        let mut last = None;
        for _ in 0..PORT_ATTEMPTS {
            let addr = SocketAddr::new(wanted.ip(), free_port());
            set_listen(&mut table, addr);
            let text = toml::to_string(&table).map_err(|e| HarnessError::Config(e.to_string()))?;
            match self.spawn(&text, addr) {
                Err(HarnessError::EarlyExit { logs, .. }) if port_taken(&logs) => last = Some(logs),
                other => return other,
            }
        }
        Err(HarnessError::Config(format!(
            "every chosen port was taken; last logs:\n{}",
            last.unwrap_or_default()
        )))
    }

    fn spawn(&self, config: &str, addr: SocketAddr) -> Result<NcroProcess, HarnessError> {
        let dir = tempfile::Builder::new().prefix("ncro-it-").tempdir()?;
        let config_path = dir.path().join("ncro.toml");
        std::fs::write(&config_path, config)?;
        let mut cmd = Command::new(self.program);
        cmd.args(self.pre_args)
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(File::create(dir.path().join("stdout.log"))?)
            .stderr(File::create(dir.path().join("stderr.log"))?);
        for key in ncro_vars(std::env::vars_os().map(|(k, _)| k)) {
            cmd.env_remove(key);
        }
        // No netrc from the account running the tests (a test passes NETRC).
        cmd.env("NETRC", "/dev/null");
        cmd.envs(self.env.iter().copied());
        let child = cmd.spawn()?;
        let mut p = NcroProcess {
            child,
            addr,
            dir,
            exit: None,
        };
        // Stand-ins (the reference proxy) log their own way.
        let ncro = self.program == env!("CARGO_BIN_EXE_ncro");
        p.wait_accepting(ncro && logs_info(config))?;
        Ok(p)
    }
}

/// Whether the config's log level lets info lines (`ncro listening`) through.
fn logs_info(config: &str) -> bool {
    let table: toml::Table = toml::from_str(config).unwrap_or_default();
    let level = table
        .get("logging")
        .and_then(|l| l.get("level"))
        .and_then(|l| l.as_str())
        .unwrap_or("info");
    matches!(level, "trace" | "debug" | "info")
}

fn set_listen(table: &mut toml::Table, addr: SocketAddr) {
    let server = table
        .entry("server")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    if let Some(t) = server.as_table_mut() {
        t.insert("listen".into(), toml::Value::String(addr.to_string()));
    }
}

/// The `NCRO_*` names among `keys`: they would override the test's config.
/// `AWS_*` ones too: ambient AWS credentials or profiles must not reach the
/// S3 upstreams of a test (S3 tests pass their own).
fn ncro_vars(keys: impl Iterator<Item = OsString>) -> Vec<OsString> {
    keys.filter(|k| {
        let k = k.to_string_lossy();
        k.starts_with("NCRO_") || k.starts_with("AWS_")
    })
    .collect()
}

fn port_taken(logs: &str) -> bool {
    let l = logs.to_ascii_lowercase();
    l.contains("address already in use") || l.contains("addrinuse") || l.contains("os error 98")
}

fn read_lossy(path: &Path) -> String {
    std::fs::read(path).map_or_else(
        |e| format!("<{}: {e}>", path.display()),
        |b| String::from_utf8_lossy(&b).into_owned(),
    )
}

/// The last `n` lines of `s`.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests;
