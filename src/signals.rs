//! SIGINT/SIGTERM for `ncro serve` and the long-running bench commands:
//! blocked in every thread (the mask is inherited by threads started
//! afterwards) and taken synchronously by the main thread. COLD.

use std::time::Duration;

/// Blocks SIGINT and SIGTERM in this thread (and threads it starts later).
pub fn block() -> libc::sigset_t {
    // SAFETY: plain libc signal-mask calls on a local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Waits for one of the blocked signals, or until `limit` passes.
/// Returns the signal taken, or `None` when `limit` passed first.
pub fn wait(set: &libc::sigset_t, limit: Option<Duration>) -> Option<i32> {
    let deadline = limit.map(|d| std::time::Instant::now() + d);
    loop {
        let left = deadline.map(|d| d.saturating_duration_since(std::time::Instant::now()));
        if left.is_some_and(|l| l.is_zero()) {
            return None;
        }
        let ts = left.map(|l| libc::timespec {
            tv_sec: l.as_secs() as libc::time_t,
            tv_nsec: l.subsec_nanos() as libc::c_long,
        });
        let ts_ptr = ts.as_ref().map_or(std::ptr::null(), |t| t as *const _);
        // SAFETY: `set` holds blocked signals; `ts_ptr` is null or
        // points at a live timespec.
        let r = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), ts_ptr) };
        if r > 0 {
            return Some(r);
        }
        // EINTR: retry; EAGAIN: the deadline check above returns.
    }
}

/// Where a serving process is in its life, shared by the main thread (the
/// only writer), `/health` and `/metrics`. One relaxed atomic: `/health`
/// reads it with one load.
#[derive(Debug, Default)]
pub struct Phase(std::sync::atomic::AtomicU8);

/// The phases, in order; a process only moves forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Serving normally.
    Serving = 0,
    /// SIGTERM taken, `server.drain_delay` running: everything is still
    /// served, but `/health` answers 503 so balancers move traffic away.
    LameDuck = 1,
    /// Listeners closed; in-flight requests finish (`server.shutdown_grace`).
    Draining = 2,
}

impl Stage {
    pub const ALL: [Stage; 3] = [Stage::Serving, Stage::LameDuck, Stage::Draining];

    /// The `phase` label of `ncro_shutdown_phase` and `/health`'s wording.
    pub fn label(self) -> &'static str {
        match self {
            Stage::Serving => "serving",
            Stage::LameDuck => "lame_duck",
            Stage::Draining => "draining",
        }
    }
}

impl Phase {
    pub fn get(&self) -> Stage {
        match self.0.load(std::sync::atomic::Ordering::Relaxed) {
            0 => Stage::Serving,
            1 => Stage::LameDuck,
            _ => Stage::Draining,
        }
    }

    pub fn set(&self, stage: Stage) {
        self.0
            .store(stage as u8, std::sync::atomic::Ordering::Relaxed);
    }

    /// True once SIGTERM was taken (lame duck or draining).
    pub fn stopping(&self) -> bool {
        self.get() != Stage::Serving
    }
}
