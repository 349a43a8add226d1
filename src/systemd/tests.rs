use super::*;
use crate::config::env::MapEnv;
use std::os::fd::AsRawFd;
use std::time::Instant;

/// A bound datagram socket standing in for systemd's notification socket.
struct FakeSystemd {
    sock: UnixDatagram,
    name: String,
    _dir: tempfile::TempDir,
}

impl FakeSystemd {
    fn bind() -> FakeSystemd {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        FakeSystemd {
            sock,
            name: path.display().to_string(),
            _dir: dir,
        }
    }

    fn recv(&self) -> String {
        let mut buf = [0u8; 4096];
        let n = self.sock.recv(&mut buf).expect("a notification within 5s");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    fn recv_within(&self, d: Duration) -> Option<String> {
        self.sock.set_read_timeout(Some(d)).unwrap();
        let mut buf = [0u8; 4096];
        let got = self.sock.recv(&mut buf).ok();
        self.sock
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        got.map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
    }
}

#[test]
fn notify_addresses() {
    assert!(notify_addr("/run/systemd/notify").is_ok());
    let a = notify_addr("@ncro-test").unwrap();
    use std::os::linux::net::SocketAddrExt;
    assert_eq!(a.as_abstract_name(), Some(&b"ncro-test"[..]));
    for bad in ["relative/path", "vsock:2:1234"] {
        assert!(
            matches!(
                notify_addr(bad),
                Err(SystemdError::UnsupportedNotifyAddr(_))
            ),
            "{bad}"
        );
    }
}

#[test]
fn no_notify_socket_means_no_notifier() {
    assert!(Notifier::from_env(&MapEnv::new(&[])).unwrap().is_none());
    let empty = MapEnv::new(&[("NOTIFY_SOCKET", "")]);
    assert!(Notifier::from_env(&empty).unwrap().is_none());
}

#[test]
fn sends_to_a_path_socket() {
    let sd = FakeSystemd::bind();
    let env = MapEnv::new(&[("NOTIFY_SOCKET", &sd.name)]);
    let n = Notifier::from_env(&env).unwrap().unwrap();
    n.send("READY=1\nSTATUS=up").unwrap();
    assert_eq!(sd.recv(), "READY=1\nSTATUS=up");
}

#[test]
fn sends_to_an_abstract_socket() {
    use std::os::linux::net::SocketAddrExt;
    let name = format!("ncro-unit-{}-{}", std::process::id(), rand::random::<u64>());
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let sock = UnixDatagram::bind_addr(&addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let env = MapEnv::new(&[("NOTIFY_SOCKET", &format!("@{name}"))]);
    Notifier::from_env(&env)
        .unwrap()
        .unwrap()
        .send("STOPPING=1")
        .unwrap();
    let mut buf = [0u8; 64];
    let n = sock.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"STOPPING=1");
}

#[test]
fn send_to_a_missing_socket_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let gone = dir.path().join("gone.sock").display().to_string();
    let n = Notifier::from_env(&MapEnv::new(&[("NOTIFY_SOCKET", &gone)]))
        .unwrap()
        .unwrap();
    assert!(matches!(
        n.send("READY=1"),
        Err(SystemdError::Notify { .. })
    ));
}

#[test]
fn watchdog_period_is_half_the_timeout_and_respects_watchdog_pid() {
    let env = |v: &[(&str, &str)]| MapEnv::new(v);
    let p = watchdog_period(&env(&[("WATCHDOG_USEC", "200000")]), 42);
    assert_eq!(p, Some(Duration::from_millis(100)));
    let p = watchdog_period(
        &env(&[("WATCHDOG_USEC", "200000"), ("WATCHDOG_PID", "42")]),
        42,
    );
    assert_eq!(p, Some(Duration::from_millis(100)));
    let other = env(&[("WATCHDOG_USEC", "200000"), ("WATCHDOG_PID", "43")]);
    assert_eq!(watchdog_period(&other, 42), None);
    assert_eq!(watchdog_period(&env(&[("WATCHDOG_USEC", "0")]), 42), None);
    assert_eq!(watchdog_period(&env(&[("WATCHDOG_USEC", "x")]), 42), None);
    assert_eq!(watchdog_period(&env(&[]), 42), None);
}

#[test]
fn listen_fds_follows_the_protocol() {
    let env = |v: &[(&str, &str)]| MapEnv::new(v);
    let ours = env(&[("LISTEN_PID", "42"), ("LISTEN_FDS", "1")]);
    assert_eq!(listen_fds(&ours, 42).unwrap(), Some(1));
    let two = env(&[("LISTEN_PID", "42"), ("LISTEN_FDS", "2")]);
    assert_eq!(listen_fds(&two, 42).unwrap(), Some(2));
    // Meant for another process (e.g. inherited through a wrapper).
    assert_eq!(listen_fds(&ours, 7).unwrap(), None);
    assert_eq!(listen_fds(&env(&[("LISTEN_FDS", "1")]), 42).unwrap(), None);
    let zero = env(&[("LISTEN_PID", "42"), ("LISTEN_FDS", "0")]);
    assert_eq!(listen_fds(&zero, 42).unwrap(), None);
    let junk = env(&[("LISTEN_PID", "42"), ("LISTEN_FDS", "one")]);
    assert!(matches!(
        listen_fds(&junk, 42),
        Err(SystemdError::Activation(_))
    ));
    let bad_pid = env(&[("LISTEN_PID", "me"), ("LISTEN_FDS", "1")]);
    assert!(listen_fds(&bad_pid, 42).is_err());
}

fn cloexec(fd: RawFd) -> bool {
    // SAFETY: F_GETFD on an fd the test owns.
    unsafe { libc::fcntl(fd, libc::F_GETFD) & libc::FD_CLOEXEC != 0 }
}

#[test]
fn accepts_a_listening_tcp_socket_and_sets_cloexec() {
    for addr in ["127.0.0.1:0", "[::1]:0"] {
        let Ok(l) = std::net::TcpListener::bind(addr) else {
            continue; // no IPv6 loopback on this machine
        };
        // SAFETY: clearing FD_CLOEXEC on the listener the test owns.
        unsafe { libc::fcntl(l.as_raw_fd(), libc::F_SETFD, 0) };
        check_listener(l.as_raw_fd()).unwrap();
        assert!(cloexec(l.as_raw_fd()));
    }
}

#[test]
fn refuses_sockets_that_are_not_listening_tcp() {
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let e = check_listener(udp.as_raw_fd()).unwrap_err().to_string();
    assert!(e.contains("not a stream socket"), "{e}");

    let dir = tempfile::tempdir().unwrap();
    let unix = std::os::unix::net::UnixListener::bind(dir.path().join("s")).unwrap();
    let e = check_listener(unix.as_raw_fd()).unwrap_err().to_string();
    assert!(e.contains("not an IPv4/IPv6 socket"), "{e}");

    // A TCP socket that was bound but never listen()ed.
    // SAFETY: plain socket(2); the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    assert!(fd >= 0);
    let e = check_listener(fd).unwrap_err().to_string();
    // SAFETY: closing the fd created above.
    unsafe { libc::close(fd) };
    assert!(e.contains("not listening"), "{e}");
}

#[test]
fn refuses_fds_that_are_not_sockets_or_not_open() {
    let file = tempfile::tempfile().unwrap();
    let e = check_listener(file.as_raw_fd()).unwrap_err();
    assert!(
        matches!(&e, SystemdError::ActivationFd { source, .. } if source.raw_os_error() == Some(libc::ENOTSOCK)),
        "{e}"
    );
    // Not a closed fd of our own: another test thread could reuse it.
    let e = check_listener(-1).unwrap_err();
    assert!(
        matches!(&e, SystemdError::ActivationFd { source, .. } if source.raw_os_error() == Some(libc::EBADF)),
        "{e}"
    );
}

#[test]
fn watchdog_pings_periodically_until_stopped() {
    let sd = FakeSystemd::bind();
    let n = Arc::new(
        Notifier::from_env(&MapEnv::new(&[("NOTIFY_SOCKET", &sd.name)]))
            .unwrap()
            .unwrap(),
    );
    let start = Instant::now();
    let w = Watchdog::spawn(n, Duration::from_millis(30), Box::new(|| Ok(()))).unwrap();
    for _ in 0..4 {
        assert_eq!(sd.recv(), "WATCHDOG=1");
    }
    // Four pings, three periods apart at least.
    assert!(start.elapsed() >= Duration::from_millis(90));
    w.stop();
    // Pings sent before stop() may still be queued; after them, silence.
    while sd.recv_within(Duration::from_millis(10)).is_some() {}
    assert_eq!(sd.recv_within(Duration::from_millis(150)), None);
}

#[test]
fn failed_liveness_check_triggers_the_watchdog_and_stops_pinging() {
    let sd = FakeSystemd::bind();
    let n = Arc::new(
        Notifier::from_env(&MapEnv::new(&[("NOTIFY_SOCKET", &sd.name)]))
            .unwrap()
            .unwrap(),
    );
    let mut calls = 0;
    let check: LivenessCheck = Box::new(move || {
        calls += 1;
        if calls < 3 {
            Ok(())
        } else {
            Err("worker 1 exited".into())
        }
    });
    let w = Watchdog::spawn(n, Duration::from_millis(10), check).unwrap();
    assert_eq!(sd.recv(), "WATCHDOG=1");
    assert_eq!(sd.recv(), "WATCHDOG=1");
    assert_eq!(
        sd.recv(),
        "WATCHDOG=trigger\nSTATUS=unhealthy: worker 1 exited"
    );
    assert_eq!(sd.recv_within(Duration::from_millis(100)), None);
    w.stop();
}

#[test]
fn supervisor_lifecycle() {
    let sd = FakeSystemd::bind();
    let env = MapEnv::new(&[("NOTIFY_SOCKET", &sd.name), ("WATCHDOG_USEC", "40000")]);
    let mut s = Supervisor::from_lookup(&env, 1);
    s.status("loading");
    assert_eq!(sd.recv(), "STATUS=loading");
    s.ready("serving", Box::new(|| Ok(())));
    assert_eq!(sd.recv(), "READY=1\nSTATUS=serving");
    assert_eq!(sd.recv(), "WATCHDOG=1");
    assert_eq!(sd.recv(), "WATCHDOG=1");
    s.stopping("draining");
    let mut last = sd.recv();
    while last == "WATCHDOG=1" {
        last = sd.recv(); // pings sent before the watchdog stopped
    }
    assert_eq!(last, "STOPPING=1\nSTATUS=draining");
    assert_eq!(sd.recv_within(Duration::from_millis(100)), None);
}

#[test]
fn supervisor_without_systemd_is_silent() {
    let mut s = Supervisor::from_lookup(&MapEnv::new(&[("WATCHDOG_USEC", "1000")]), 1);
    s.ready(
        "serving",
        Box::new(|| panic!("no watchdog without NOTIFY_SOCKET")),
    );
    s.stopping("draining");
    assert!(s.watchdog.is_none());
}
