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
