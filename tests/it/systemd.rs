//! systemd integration through the real binary, with systemd played by the
//! test: a listening socket made fd 3 of the child (socket activation), a
//! bound Unix datagram socket as `NOTIFY_SOCKET` (readiness, stopping,
//! watchdog).
//!
//! `LISTEN_PID` and `WATCHDOG_PID` must name ncro's own pid, known only after
//! fork. The child therefore runs `/bin/sh -c 'export LISTEN_PID=$$; exec
//! ncro ...'`: `exec` keeps the pid, so `$$` is ncro's pid.

use std::fs::File;
use std::io;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt as _;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::fake::{FakeUpstream, TestKey, TestPath};
use crate::harness::{free_port, http_get, tail, test_config, HttpConn};

/// Variables systemd sets; the test's own environment must not leak them.
const SYSTEMD_VARS: &[&str] = &[
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
];
const START_DEADLINE: Duration = Duration::from_secs(20);

/// How to start ncro the way systemd would.
#[derive(Default)]
struct Unit<'a> {
    env: Vec<(&'a str, String)>,
    /// Variables set to the child's own pid (`$$` before `exec`).
    own_pid_vars: Vec<&'a str>,
    /// Becomes fd 3 in the child, without close-on-exec.
    fd3: Option<RawFd>,
}

/// A running ncro started by [`Unit::start`]; killed on drop.
struct Service {
    child: std::process::Child,
    dir: tempfile::TempDir,
    exit: Option<ExitStatus>,
}

impl Unit<'_> {
    fn start(&self, config: &str) -> Service {
        let dir = tempfile::Builder::new()
            .prefix("ncro-it-sd-")
            .tempdir()
            .unwrap();
        let config_path = dir.path().join("ncro.toml");
        std::fs::write(&config_path, config).unwrap();
        let exports: String = self
            .own_pid_vars
            .iter()
            .map(|v| format!("export {v}=$$; "))
            .collect();
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(format!("{exports}exec \"$0\" \"$@\""))
            .arg(env!("CARGO_BIN_EXE_ncro"))
            .args(["serve", "--config"])
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(File::create(dir.path().join("stdout.log")).unwrap())
            .stderr(File::create(dir.path().join("stderr.log")).unwrap());
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy();
            if k.starts_with("NCRO_") || SYSTEMD_VARS.contains(&k.as_ref()) {
                cmd.env_remove(k.as_ref());
            }
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        if let Some(src) = self.fd3 {
            // SAFETY: dup2 and fcntl are async-signal-safe, as pre_exec requires.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::dup2(src, 3) < 0 || libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        Service {
            child: cmd.spawn().expect("spawn /bin/sh"),
            dir,
            exit: None,
        }
    }
}

impl Service {
    fn read(&self, name: &str) -> String {
        std::fs::read(self.dir.path().join(name))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    fn logs(&self) -> String {
        format!(
            "--- ncro pid {} ({:?}) ---\n--- stdout ---\n{}\n--- stderr ---\n{}\n--- end ---",
            self.child.id(),
            self.exit,
            tail(&self.read("stdout.log"), 60),
            tail(&self.read("stderr.log"), 60)
        )
    }

    /// Waits until `needle` is in the logs; panics with them on timeout or exit.
    fn wait_for_log(&mut self, needle: &str) {
        let deadline = Instant::now() + START_DEADLINE;
        while !self.read("stdout.log").contains(needle) && !self.read("stderr.log").contains(needle)
        {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.exit = Some(status);
                panic!(
                    "ncro exited ({status}) before logging {needle:?}\n{}",
                    self.logs()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in 20s\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn sigterm(&self) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
        assert!(self.exit.is_none());
        // SAFETY: kill(2) on our own unreaped child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }

    fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                self.exit = Some(status);
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "ncro still running after {limit:?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        if self.exit.is_none() {
            let _ = self.child.kill(); // fails only if it already exited
            let _ = self.child.wait();
        }
    }
}

/// systemd's side of `NOTIFY_SOCKET`.
struct NotifySocket {
    sock: UnixDatagram,
    /// The `NOTIFY_SOCKET` value.
    name: String,
    _dir: Option<tempfile::TempDir>,
}

impl NotifySocket {
    fn path() -> NotifySocket {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        NotifySocket {
            sock: UnixDatagram::bind(&path).unwrap(),
            name: path.display().to_string(),
            _dir: Some(dir),
        }
    }

    fn abstract_name() -> NotifySocket {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("ncro-it-{}-{}", std::process::id(), rand::random::<u64>());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(&name).unwrap();
        NotifySocket {
            sock: UnixDatagram::bind_addr(&addr).unwrap(),
            name: format!("@{name}"),
            _dir: None,
        }
    }

    fn recv_within(&self, limit: Duration) -> Option<String> {
        self.sock.set_read_timeout(Some(limit)).unwrap();
        let mut buf = [0u8; 4096];
        match self.sock.recv(&mut buf) {
            Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                None
            }
            Err(e) => panic!("notify socket: {e}"),
        }
    }

    /// The next message, skipping watchdog pings.
    fn next_state(&self, limit: Duration, svc: &Service) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv_within(left.max(Duration::from_millis(1))) {
                Some(m) if m == "WATCHDOG=1" => continue,
                Some(m) => return m,
                None => panic!("no notification within {limit:?}\n{}", svc.logs()),
            }
        }
    }
}

fn upstream() -> (FakeUpstream, TestPath, TestKey) {
    let key = TestKey::generate("sd-test-1");
    let path = TestPath::new("sd-hello");
    let up = FakeUpstream::builder()
        .cache_info(40)
        .path(&path, &key)
        .start();
    (up, path, key)
}

fn config(listen: &str, up: &FakeUpstream, key: &TestKey, db: &tempfile::TempDir) -> String {
    let url = up.url();
    let pk = key.public_key();
    test_config(listen, &[(&url, 10, &pk)], &db.path().join("routes.db"))
}

#[test]
fn socket_activation_serves_on_the_inherited_listener() {
    let (up, path, key) = upstream();
    let db = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let unit = Unit {
        env: vec![("LISTEN_FDS", "1".into())],
        own_pid_vars: vec!["LISTEN_PID"],
        fd3: Some(listener.as_raw_fd()),
    };
    let mut svc = unit.start(&config("", &up, &key, &db));
    // From now on only ncro holds the socket.
    drop(listener);
    svc.wait_for_log("socket activation: using inherited listener (fd 3)");
    svc.wait_for_log("ncro listening");

    // Fresh connections land on whichever worker accepts first; all serve.
    for _ in 0..8 {
        let r = http_get(addr, "/nix-cache-info").unwrap();
        assert_eq!(r.status, 200);
        assert!(r.text().contains("StoreDir: /nix/store"), "{}", r.text());
    }
    let mut conn = HttpConn::connect(addr).unwrap();
    for _ in 0..3 {
        let r = conn.get(&path.narinfo_request_path()).unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(r.text().contains(&path.store_path()));
    }
    assert_eq!(conn.get("/nix-cache-info").unwrap().status, 200);

    svc.sigterm();
    assert!(
        svc.wait_exit(Duration::from_secs(15)).success(),
        "{}",
        svc.logs()
    );
}

#[test]
fn inherited_listener_skips_the_port_check() {
    let (up, _path, key) = upstream();
    let db = tempfile::tempdir().unwrap();
    // server.listen names a port that is taken: on its own ncro refuses it.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap().to_string();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let unit = Unit {
        env: vec![("LISTEN_FDS", "1".into())],
        own_pid_vars: vec!["LISTEN_PID"],
        fd3: Some(listener.as_raw_fd()),
    };
    let mut svc = unit.start(&config(&busy, &up, &key, &db));
    drop(listener);
    svc.wait_for_log("ncro listening");
    assert_eq!(http_get(addr, "/nix-cache-info").unwrap().status, 200);
    svc.sigterm();
    assert!(svc.wait_exit(Duration::from_secs(15)).success());
}

#[test]
fn listen_fds_for_another_process_are_ignored() {
    let (up, _path, key) = upstream();
    let db = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let unit = Unit {
        // pid 1 is never ncro: the variables were meant for someone else.
        env: vec![("LISTEN_FDS", "1".into()), ("LISTEN_PID", "1".into())],
        own_pid_vars: vec![],
        fd3: Some(listener.as_raw_fd()),
    };
    let mut svc = unit.start(&config("", &up, &key, &db));
    let status = svc.wait_exit(START_DEADLINE);
    assert_eq!(status.code(), Some(1), "{}", svc.logs());
    let err = svc.read("stderr.log");
    assert!(
        err.contains("server.listen is empty and no listening socket was inherited"),
        "{err}"
    );
}

#[test]
fn socket_activation_refuses_a_socket_that_is_not_listening_tcp() {
    let (up, _path, key) = upstream();
    let db = tempfile::tempdir().unwrap();
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let unit = Unit {
        env: vec![("LISTEN_FDS", "1".into())],
        own_pid_vars: vec!["LISTEN_PID"],
        fd3: Some(udp.as_raw_fd()),
    };
    let mut svc = unit.start(&config("", &up, &key, &db));
    let status = svc.wait_exit(START_DEADLINE);
    assert_eq!(status.code(), Some(1), "{}", svc.logs());
    let err = svc.read("stderr.log");
    assert!(
        err.contains("fd 3 is not a stream socket, not a listening TCP socket"),
        "{err}"
    );
}

#[test]
fn sd_notify_ready_after_start_and_stopping_on_sigterm() {
    let (up, _path, key) = upstream();
    let db = tempfile::tempdir().unwrap();
    let notify = NotifySocket::path();
    let port = free_port();
    let unit = Unit {
        env: vec![("NOTIFY_SOCKET", notify.name.clone())],
        ..Unit::default()
    };
    let mut svc = unit.start(&config(&format!("127.0.0.1:{port}"), &up, &key, &db));
    let ready = notify.next_state(START_DEADLINE, &svc);
    assert!(ready.starts_with("READY=1\n"), "{ready}");
    assert!(
        ready.contains(&format!("STATUS=serving on 127.0.0.1:{port}")),
        "{ready}"
    );
    // READY=1 means serving: the very next request must be answered.
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert_eq!(http_get(addr, "/nix-cache-info").unwrap().status, 200);
    // No watchdog was asked for, so nothing else is sent while running.
    assert_eq!(notify.recv_within(Duration::from_millis(300)), None);

    svc.sigterm();
    let stopping = notify.next_state(Duration::from_secs(10), &svc);
    assert!(stopping.starts_with("STOPPING=1"), "{stopping}");
    assert!(
        svc.wait_exit(Duration::from_secs(15)).success(),
        "{}",
        svc.logs()
    );
}

#[test]
fn watchdog_pings_at_half_the_interval_on_an_abstract_socket() {
    let (up, _path, key) = upstream();
    let db = tempfile::tempdir().unwrap();
    let notify = NotifySocket::abstract_name();
    let unit = Unit {
        env: vec![
            ("NOTIFY_SOCKET", notify.name.clone()),
            ("WATCHDOG_USEC", "200000".into()),
        ],
        own_pid_vars: vec!["WATCHDOG_PID"],
        fd3: None,
    };
    let mut svc = unit.start(&config("127.0.0.1:0", &up, &key, &db));
    let ready = notify.next_state(START_DEADLINE, &svc);
    assert!(ready.starts_with("READY=1"), "{ready}");
    let mut pings = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while pings.len() < 6 && Instant::now() < deadline {
        match notify.recv_within(Duration::from_secs(2)) {
            Some(m) => {
                assert_eq!(m, "WATCHDOG=1");
                pings.push(Instant::now());
            }
            None => panic!("watchdog silent for 2s (period 100ms)\n{}", svc.logs()),
        }
    }
    assert_eq!(pings.len(), 6, "{}", svc.logs());
    // Periodic, not a burst: five gaps of about 100ms each.
    let spread = pings[5] - pings[0];
    assert!(
        spread >= Duration::from_millis(350),
        "6 pings within {spread:?}"
    );

    svc.sigterm();
    let stopping = notify.next_state(Duration::from_secs(10), &svc);
    assert!(stopping.starts_with("STOPPING=1"), "{stopping}");
    // systemd disarms the watchdog while stopping; ncro stops pinging.
    assert_eq!(notify.recv_within(Duration::from_millis(300)), None);
    assert!(
        svc.wait_exit(Duration::from_secs(15)).success(),
        "{}",
        svc.logs()
    );
}

#[test]
fn watchdog_for_another_pid_is_not_served() {
    let (up, _path, key) = upstream();
    let db = tempfile::tempdir().unwrap();
    let notify = NotifySocket::path();
    let unit = Unit {
        env: vec![
            ("NOTIFY_SOCKET", notify.name.clone()),
            ("WATCHDOG_USEC", "100000".into()),
            ("WATCHDOG_PID", "1".into()),
        ],
        ..Unit::default()
    };
    let mut svc = unit.start(&config("127.0.0.1:0", &up, &key, &db));
    let ready = notify.next_state(START_DEADLINE, &svc);
    assert!(ready.starts_with("READY=1"), "{ready}");
    assert_eq!(notify.recv_within(Duration::from_millis(500)), None);
    svc.sigterm();
    assert!(svc.wait_exit(Duration::from_secs(15)).success());
}
