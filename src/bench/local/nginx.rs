//! `ncro bench local --nginx`: nginx as a fallback chain (try the first
//! cache, on 404 the second; keep-alive to both), the proxy people run
//! today, in front of the same synthetic caches as ncro. A child process
//! in the foreground, stopped by its PID.

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::super::BenchError;

const START_DEADLINE: Duration = Duration::from_secs(10);
const STOP_DEADLINE: Duration = Duration::from_secs(10);

pub struct Nginx {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
    exited: bool,
}

impl Nginx {
    /// Starts `bin` listening on a free loopback port in front of
    /// `first` and `second` (`http://host:port` URLs).
    pub fn start(bin: &Path, first: &str, second: &str) -> Result<Nginx, BenchError> {
        let err = |what: &str, e: &dyn std::fmt::Display| {
            BenchError::Proxy(format!("nginx: {what}: {e}"))
        };
        let dir = std::env::temp_dir().join(format!(
            "ncro-bench-nginx-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        std::fs::create_dir_all(&dir).map_err(|e| err("temp dir", &e))?;
        let addr = super::free_port()?;
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, chain_conf(&dir, addr, first, second))
            .map_err(|e| err("writing its config", &e))?;
        let log = std::fs::File::create(dir.join("stderr.log")).map_err(|e| err("log file", &e))?;
        let child = Command::new(bin)
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(dir.join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| err(&format!("starting {}", bin.display()), &e))?;
        let mut n = Nginx {
            child,
            addr,
            dir,
            exited: false,
        };
        n.wait_accepting()?;
        Ok(n)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn wait_accepting(&mut self) -> Result<(), BenchError> {
        let deadline = Instant::now() + START_DEADLINE;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.exited = true;
                let log = std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default();
                return Err(BenchError::Proxy(format!(
                    "nginx exited with {status}: {log}"
                )));
            }
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(BenchError::Proxy(format!(
            "nginx did not accept on {} within {START_DEADLINE:?}",
            self.addr
        )))
    }

    /// SIGQUIT (graceful stop of the master and its workers), then wait;
    /// SIGKILL after the deadline.
    pub fn stop(mut self) {
        if self.exited {
            return;
        }
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: kill(2) on our own unreaped child, so the PID is still ours.
            unsafe { libc::kill(pid, libc::SIGQUIT) };
        }
        let deadline = Instant::now() + STOP_DEADLINE;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                self.exited = true;
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if !self.exited {
            // Fails only if the child already exited; it is reaped below.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // Best effort: a leftover temp dir is harmless.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The fallback chain: `first`, and `second` when `first` answers 404.
/// In the foreground (`daemon off`) so that the child is the master.
pub fn chain_conf(dir: &Path, addr: SocketAddr, first: &str, second: &str) -> String {
    let d = dir.display();
    let host = |url: &str| {
        url.trim_start_matches("http://")
            .trim_end_matches('/')
            .to_owned()
    };
    let mut s = String::new();
    let _ = write!(
        s,
        "daemon off;\nworker_processes auto;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off; tcp_nodelay on;\n  keepalive_timeout 65s; keepalive_requests 1000000;\n  \
         client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;\n  \
         fastcgi_temp_path {d}/fcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n  \
         upstream first {{ server {}; keepalive 256; keepalive_requests 1000000; }}\n  \
         upstream second {{ server {}; keepalive 256; keepalive_requests 1000000; }}\n  \
         proxy_http_version 1.1;\n  proxy_set_header Connection \"\";\n  \
         proxy_buffering on; proxy_buffer_size 16k; proxy_buffers 8 64k; proxy_max_temp_file_size 0;\n  \
         server {{\n    listen {addr} backlog=4096;\n    \
         location / {{ proxy_pass http://first; proxy_intercept_errors on; error_page 404 = @second; }}\n    \
         location @second {{ proxy_pass http://second; }}\n  }}\n}}\n",
        host(first),
        host(second),
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_config_names_both_caches_in_order() {
        let conf = chain_conf(
            Path::new("/tmp/x"),
            "127.0.0.1:9000".parse().unwrap(),
            "http://127.0.0.1:1001",
            "http://127.0.0.1:1002/",
        );
        assert!(conf.starts_with("daemon off;\n"), "{conf}");
        assert!(conf.contains("upstream first { server 127.0.0.1:1001; keepalive 256;"));
        assert!(conf.contains("upstream second { server 127.0.0.1:1002; keepalive 256;"));
        assert!(conf.contains("listen 127.0.0.1:9000 backlog=4096;"));
        assert!(conf.contains("error_page 404 = @second;"));
        assert!(conf.contains("pid /tmp/x/nginx.pid;"));
        // Balanced braces: nginx would refuse the file otherwise.
        assert_eq!(conf.matches('{').count(), conf.matches('}').count());
    }
}
