//! A real Garage S3 server on loopback, for one test: free ports, config
//! and data in a temp dir, one bucket and one access key. Killed (its own
//! PID only) on drop.
//!
//! The binary comes from `NCRO_GARAGE`, else from where `.ci/run` installs
//! it (`~/.cache/ncro-ci-tools/garage-2.5.0/bin/garage`).

use std::io;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{free_ports, tail};

/// The version `.ci/run` installs; the test does not depend on newer features.
pub const GARAGE_VERSION: &str = "2.5.0";
/// Garage answers `status` within about 0.2 s of starting.
const START_LIMIT: Duration = Duration::from_secs(20);
/// Region the test's server signs for.
pub const REGION: &str = "garage";

/// Where the Garage binary is, or why there is none.
pub fn binary() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("NCRO_GARAGE") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("NCRO_GARAGE={} is not a file", p.display()))
        };
    }
    let home = std::env::var_os("HOME").ok_or("HOME is not set")?;
    let p = Path::new(&home).join(format!(
        ".cache/ncro-ci-tools/garage-{GARAGE_VERSION}/bin/garage"
    ));
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!(
            "Garage not found at {} and NCRO_GARAGE is not set; install it with \
             `cargo install garage --version {GARAGE_VERSION} --locked --root \
             ~/.cache/ncro-ci-tools/garage-{GARAGE_VERSION}` (about 18 min on 2 cores) or run .ci/run",
            p.display()
        ))
    }
}

/// A running single-node Garage with bucket [`Garage::bucket`] and a key
/// allowed to read and write it.
pub struct Garage {
    bin: PathBuf,
    dir: tempfile::TempDir,
    child: Child,
    pub s3_port: u16,
    pub bucket: String,
    pub key_id: String,
    pub secret: String,
}

impl Garage {
    /// Starts the server, assigns its layout, creates the bucket and
    /// imports a random key. Panics with Garage's log when a step fails.
    pub fn start(bin: PathBuf, bucket: &str) -> Garage {
        let dir = tempfile::Builder::new()
            .prefix("ncro-garage-")
            .tempdir()
            .expect("tempdir");
        let base = free_ports(3);
        let (s3_port, rpc_port, admin_port) = (base, base + 1, base + 2);
        let config = format!(
            "metadata_dir = \"{d}/meta\"\ndata_dir = \"{d}/data\"\ndb_engine = \"sqlite\"\n\
             replication_factor = 1\nrpc_bind_addr = \"127.0.0.1:{rpc_port}\"\n\
             rpc_public_addr = \"127.0.0.1:{rpc_port}\"\nrpc_secret = \"{secret}\"\n\n\
             [s3_api]\ns3_region = \"{REGION}\"\napi_bind_addr = \"127.0.0.1:{s3_port}\"\n\
             root_domain = \".s3.garage.localhost\"\n\n\
             [admin]\napi_bind_addr = \"127.0.0.1:{admin_port}\"\nadmin_token = \"{token}\"\n",
            d = dir.path().display(),
            secret = random_hex(32),
            token = random_hex(16),
        );
        std::fs::write(dir.path().join("garage.toml"), config).expect("write garage.toml");
        let log = std::fs::File::create(dir.path().join("server.log")).expect("log file");
        let child = Command::new(&bin)
            .arg("-c")
            .arg(dir.path().join("garage.toml"))
            .arg("server")
            .env("RUST_LOG", "garage=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
        let mut g = Garage {
            bin,
            dir,
            child,
            s3_port,
            bucket: bucket.to_owned(),
            key_id: format!("GK{}", random_hex(12)),
            secret: random_hex(32),
        };
        g.wait_ready();
        g.prepare();
        g
    }

    /// `http://127.0.0.1:PORT`, the S3 endpoint.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.s3_port)
    }

    pub fn log(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("server.log"));
        tail(&log.unwrap_or_else(|e| format!("<{e}>")), 40)
    }

    /// Runs `garage -c CFG args...`; panics with its output and the server
    /// log when it fails.
    fn cli(&self, args: &[&str]) -> Output {
        let out = Command::new(&self.bin)
            .arg("-c")
            .arg(self.dir.path().join("garage.toml"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("garage {args:?}: {e}"));
        if !out.status.success() {
            panic!(
                "garage {args:?} failed ({}):\n{}{}\n--- server log ---\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.log()
            );
        }
        out
    }

    /// Until the RPC layer answers `status` and the S3 port accepts.
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + START_LIMIT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("garage exited with {status} at start:\n{}", self.log());
            }
            let status = Command::new(&self.bin)
                .arg("-c")
                .arg(self.dir.path().join("garage.toml"))
                .arg("status")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let s3_up = TcpStream::connect(("127.0.0.1", self.s3_port)).is_ok();
            if status.is_ok_and(|s| s.success()) && s3_up {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "garage not ready within {START_LIMIT:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn prepare(&self) {
        let id = self.cli(&["node", "id", "-q"]);
        let id = String::from_utf8_lossy(&id.stdout);
        let node = id.trim().split('@').next().unwrap_or_default().to_owned();
        self.cli(&["layout", "assign", "-z", "dc1", "-c", "1G", &node]);
        self.cli(&["layout", "apply", "--version", "1"]);
        self.cli(&["bucket", "create", &self.bucket]);
        let (id, secret) = (self.key_id.as_str(), self.secret.as_str());
        self.cli(&["key", "import", "--yes", "-n", "ncro-test", id, secret]);
        self.cli(&[
            "bucket",
            "allow",
            "--read",
            "--write",
            &self.bucket,
            "--key",
            id,
        ]);
    }

    /// Uploads every file under `dir` to the bucket, keyed by its path
    /// relative to `dir`, in one curl run (SigV4 header auth). Returns the
    /// number of objects.
    pub fn upload_dir(&self, dir: &Path) -> usize {
        let mut files = Vec::new();
        collect_files(dir, &mut files).expect("list cache dir");
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--fail-with-body", "--aws-sigv4"])
            .arg(format!("aws:amz:{REGION}:s3"))
            .arg("--user")
            .arg(format!("{}:{}", self.key_id, self.secret))
            // Garage requires the payload hash header; curl signs it.
            .args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"]);
        for f in &files {
            let key = f.strip_prefix(dir).expect("under dir").to_string_lossy();
            cmd.arg("-T").arg(f).arg(format!(
                "http://127.0.0.1:{}/{}/{key}",
                self.s3_port, self.bucket
            ));
        }
        let out = cmd.output().expect("run curl");
        assert!(
            out.status.success(),
            "uploading {} files failed ({}): {}{}",
            files.len(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        files.len()
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- garage server log (tail) ---\n{}", self.log());
        }
        // Our own child, not reaped yet; kill fails only if it already exited.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_files(&path, out)?;
        } else {
            out.push(path);
        }
    }
    out.sort();
    Ok(())
}

/// `n` random bytes as lower-case hex.
pub fn random_hex(n: usize) -> String {
    let bytes: Vec<u8> = (0..n).map(|_| rand::random::<u8>()).collect();
    hex::encode(bytes)
}
