//! systemd integration, written against the protocols rather than libsystemd:
//! readiness, stopping and watchdog notifications (`sd_notify`: one Unix
//! datagram per message to `$NOTIFY_SOCKET`) and socket activation
//! (`LISTEN_PID`/`LISTEN_FDS`, first fd 3). COLD: startup, shutdown and one
//! watchdog thread; nothing here runs on a worker.
//!
//! Without systemd every entry point is a no-op: no `NOTIFY_SOCKET` means no
//! notifier, no `LISTEN_PID` means no inherited listener.

use std::io;
use std::os::fd::RawFd;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use crate::config::env::{EnvLookup, ProcessEnv};

/// The first inherited fd in the socket-activation protocol.
pub const LISTEN_FDS_START: RawFd = 3;

#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    #[error("NOTIFY_SOCKET {0:?}: only absolute paths and abstract names (@name) are supported")]
    UnsupportedNotifyAddr(String),
    #[error("NOTIFY_SOCKET {addr:?}: {source}")]
    Notify { addr: String, source: io::Error },
    #[error("socket activation: {0}")]
    Activation(String),
    #[error("socket activation: fd {fd}: {source}")]
    ActivationFd { fd: RawFd, source: io::Error },
}

// ---------------------------------------------------------------- sd_notify

/// A connectionless sender to systemd's notification socket.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
    /// `$NOTIFY_SOCKET` as given, for error messages.
    name: String,
}

impl Notifier {
    /// The notifier named by `NOTIFY_SOCKET`, or `None` when it is unset or
    /// empty (not started by systemd, or `NotifyAccess=none`).
    pub fn from_env(env: &dyn EnvLookup) -> Result<Option<Notifier>, SystemdError> {
        let Some(name) = env.get("NOTIFY_SOCKET").filter(|v| !v.is_empty()) else {
            return Ok(None);
        };
        let addr = notify_addr(&name)?;
        let socket = UnixDatagram::unbound().map_err(|source| SystemdError::Notify {
            addr: name.clone(),
            source,
        })?;
        Ok(Some(Notifier { socket, addr, name }))
    }

    /// Sends one notification: newline-separated `KEY=value` assignments.
    pub fn send(&self, state: &str) -> Result<(), SystemdError> {
        self.socket
            .send_to_addr(state.as_bytes(), &self.addr)
            .map(drop)
            .map_err(|source| SystemdError::Notify {
                addr: self.name.clone(),
                source,
            })
    }
}

/// `@name` is an abstract socket, `/path` a filesystem socket. (systemd also
/// knows `vsock:` addresses, which only matter inside VMs started by it.)
fn notify_addr(name: &str) -> Result<SocketAddr, SystemdError> {
    let unsupported = || SystemdError::UnsupportedNotifyAddr(name.to_owned());
    if let Some(abstract_name) = name.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        SocketAddr::from_abstract_name(abstract_name.as_bytes()).map_err(|_| unsupported())
    } else if name.starts_with('/') {
        SocketAddr::from_pathname(name).map_err(|_| unsupported())
    } else {
        Err(unsupported())
    }
}

/// Half of `WATCHDOG_USEC` (systemd's advice), when the watchdog is enabled
/// for this process: `WATCHDOG_PID`, if set, must be `pid`.
pub fn watchdog_period(env: &dyn EnvLookup, pid: u32) -> Option<Duration> {
    if let Some(p) = env.get("WATCHDOG_PID").filter(|v| !v.is_empty()) {
        if p.trim().parse::<u32>().ok() != Some(pid) {
            return None;
        }
    }
    let usec: u64 = env.get("WATCHDOG_USEC")?.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// A liveness check run before every watchdog ping: `Err` names what is
/// broken, and the ping turns into `WATCHDOG=trigger`.
pub type LivenessCheck = Box<dyn FnMut() -> Result<(), String> + Send>;

/// The thread that pings the watchdog while the liveness check passes.
pub struct Watchdog {
    /// Dropped (or sent to) by [`Watchdog::stop`]; the thread exits then.
    stop: mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Watchdog {
    pub fn spawn(
        notifier: Arc<Notifier>,
        period: Duration,
        mut check: LivenessCheck,
    ) -> io::Result<Watchdog> {
        let (stop, stop_rx) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("ncro-watchdog".into())
            .spawn(move || loop {
                if let Err(problem) = check() {
                    // Asking systemd to act now beats waiting for the timeout:
                    // the unit's WatchdogSignal/Restart= policy takes over.
                    tracing::error!(
                        problem,
                        "watchdog: liveness check failed; asking systemd to restart ncro"
                    );
                    let msg = format!("WATCHDOG=trigger\nSTATUS=unhealthy: {problem}");
                    if let Err(e) = notifier.send(&msg) {
                        tracing::warn!(error = %e, "sd_notify failed");
                    }
                    return;
                }
                if let Err(e) = notifier.send("WATCHDOG=1") {
                    tracing::warn!(error = %e, "sd_notify failed");
                }
                match stop_rx.recv_timeout(period) {
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
            })?;
        Ok(Watchdog { stop, thread })
    }

    pub fn stop(self) {
        drop(self.stop);
        // The thread only waits on the channel or sends one datagram.
        let _ = self.thread.join();
    }
}

/// What `app` drives: notifications for the service's lifecycle and the
/// watchdog, each a no-op when systemd did not ask for it. Failures to
/// notify are logged, never fatal: serving matters more than telling.
pub struct Supervisor {
    notifier: Option<Arc<Notifier>>,
    watchdog_period: Option<Duration>,
    watchdog: Option<Watchdog>,
}

impl Supervisor {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`.
    pub fn from_env() -> Supervisor {
        Supervisor::from_lookup(&ProcessEnv, std::process::id())
    }

    pub fn from_lookup(env: &dyn EnvLookup, pid: u32) -> Supervisor {
        let notifier = match Notifier::from_env(env) {
            Ok(n) => n.map(Arc::new),
            Err(e) => {
                tracing::warn!(error = %e, "sd_notify disabled");
                None
            }
        };
        Supervisor {
            watchdog_period: notifier.as_ref().and(watchdog_period(env, pid)),
            notifier,
            watchdog: None,
        }
    }

    /// `READY=1` with a status line, then starts the watchdog (if enabled)
    /// with `check` run before every ping.
    pub fn ready(&mut self, status: &str, check: LivenessCheck) {
        self.send(&format!("READY=1\nSTATUS={status}"));
        if let (Some(n), Some(period)) = (&self.notifier, self.watchdog_period) {
            match Watchdog::spawn(n.clone(), period, check) {
                Ok(w) => {
                    tracing::info!(
                        period_ms = period.as_millis() as u64,
                        "systemd watchdog enabled"
                    );
                    self.watchdog = Some(w);
                }
                Err(e) => tracing::warn!(error = %e, "cannot start the watchdog thread"),
            }
        }
    }

    /// `STOPPING=1`: stops the watchdog first, since systemd disarms it once
    /// the unit is deactivating and workers legitimately exit during a drain.
    pub fn stopping(&mut self, status: &str) {
        if let Some(w) = self.watchdog.take() {
            w.stop();
        }
        self.send(&format!("STOPPING=1\nSTATUS={status}"));
    }

    /// A free-form `STATUS=` line (shown by `systemctl status`).
    pub fn status(&self, status: &str) {
        self.send(&format!("STATUS={status}"));
    }

    fn send(&self, msg: &str) {
        if let Some(n) = &self.notifier {
            if let Err(e) = n.send(msg) {
                tracing::warn!(error = %e, "sd_notify failed");
            }
        }
    }
}

// --------------------------------------------------------- socket activation

/// How many fds systemd passed to this process: `Some(n)` (n ≥ 1) when
/// `LISTEN_PID` is `pid` and `LISTEN_FDS` is a positive count; `None` when
/// the variables are absent, zero, or meant for another process.
pub fn listen_fds(env: &dyn EnvLookup, pid: u32) -> Result<Option<usize>, SystemdError> {
    let Some(listen_pid) = env.get("LISTEN_PID").filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    let listen_pid: u32 = listen_pid.trim().parse().map_err(|_| {
        SystemdError::Activation(format!("LISTEN_PID {listen_pid:?} is not a process id"))
    })?;
    if listen_pid != pid {
        return Ok(None);
    }
    let fds = env.get("LISTEN_FDS").unwrap_or_default();
    let n: usize = fds
        .trim()
        .parse()
        .map_err(|_| SystemdError::Activation(format!("LISTEN_FDS {fds:?} is not a count")))?;
    Ok((n > 0).then_some(n))
}

/// Proves `fd` is a listening TCP socket (IPv4 or IPv6) and marks it
/// close-on-exec, so an odd unit (a datagram or Unix socket, `Accept=yes`)
/// fails at start with a message instead of at the first accept.
pub fn check_listener(fd: RawFd) -> Result<(), SystemdError> {
    let err = |source| SystemdError::ActivationFd { fd, source };
    let bad = |what: &str| {
        SystemdError::Activation(format!(
            "fd {fd} is {what}, not a listening TCP socket; use ListenStream= with Accept=no"
        ))
    };
    if sockopt(fd, libc::SO_TYPE).map_err(err)? != libc::SOCK_STREAM {
        return Err(bad("not a stream socket"));
    }
    let domain = sockopt(fd, libc::SO_DOMAIN).map_err(err)?;
    if domain != libc::AF_INET && domain != libc::AF_INET6 {
        return Err(bad("not an IPv4/IPv6 socket"));
    }
    if sockopt(fd, libc::SO_ACCEPTCONN).map_err(err)? == 0 {
        return Err(bad("a stream socket that is not listening"));
    }
    // SAFETY: fcntl on an fd we just proved is an open socket.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return Err(err(io::Error::last_os_error()));
    }
    Ok(())
}

fn sockopt(fd: RawFd, opt: libc::c_int) -> io::Result<libc::c_int> {
    let mut val: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `val`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&mut val as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(val)
    }
}

/// The listener systemd passed to this process (fd 3), checked, or `None`
/// without socket activation. Unsets `LISTEN_PID`, `LISTEN_FDS` and
/// `LISTEN_FDNAMES` so they cannot leak to anything ncro might start.
///
/// Call before any other thread exists: it changes the process environment.
pub fn take_listener() -> Result<Option<RawFd>, SystemdError> {
    let found = listen_fds(&ProcessEnv, std::process::id());
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(var);
    }
    let Some(n) = found? else {
        return Ok(None);
    };
    check_listener(LISTEN_FDS_START)?;
    if n > 1 {
        tracing::warn!(
            passed = n,
            "socket activation: only the first socket (fd 3) is used; the unit passes more"
        );
    }
    tracing::info!("socket activation: using inherited listener (fd 3)");
    Ok(Some(LISTEN_FDS_START))
}

#[cfg(test)]
mod tests;
