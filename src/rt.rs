//! Thread runtimes: every thread that runs a monoio runtime (workers, the
//! control thread, `ncro bench`'s client and upstream threads) is pinned
//! and builds it here, the same way; and the wall clock they share.
//!
//! The runtime is a FusionDriver one with timers: io_uring when the kernel
//! has it, epoll when it has not (or `MONOIO_FORCE_LEGACY_DRIVER=1`), and
//! also epoll when setting the ring up fails (ENOMEM from a low memlock
//! limit or memory pressure): a thread on epoll works, one that exits does
//! not.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

/// The runtime [`build_pinned`] returns.
pub type Runtime = monoio::FusionRuntime<
    monoio::time::TimeDriver<monoio::IoUringDriver>,
    monoio::time::TimeDriver<monoio::LegacyDriver>,
>;

/// Something [`build_pinned`] worked around; the caller logs it in its own
/// words.
pub enum Warning<'a> {
    /// The thread could not be pinned to `cpu`; it runs unpinned.
    Unpinned {
        cpu: usize,
        error: &'a dyn fmt::Debug,
    },
    /// io_uring could not be set up; the runtime uses epoll.
    Epoll(&'a std::io::Error),
}

/// Pins the calling thread to `cpu` (when given), then builds its runtime
/// (see the module docs). Called on the thread that will run it: a monoio
/// runtime belongs to the thread that built it.
pub fn build_pinned(cpu: Option<usize>, warn: impl Fn(Warning<'_>)) -> std::io::Result<Runtime> {
    if let Some(cpu) = cpu {
        if let Err(e) = monoio::utils::bind_to_cpu_set(Some(cpu)) {
            warn(Warning::Unpinned { cpu, error: &e });
        }
    }
    match monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .with_entries(1024)
        .build()
    {
        Ok(rt) => Ok(rt),
        Err(e) => {
            warn(Warning::Epoll(&e));
            let rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
                .enable_timer()
                .build()?;
            Ok(rt.into())
        }
    }
}

/// The driver of the runtime the calling thread runs in: "io_uring" or
/// "epoll".
pub fn driver() -> &'static str {
    if monoio::utils::is_legacy() {
        "epoll"
    } else {
        "io_uring"
    }
}

/// Wall-clock seconds since the Unix epoch (0 before it).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn builds_a_runtime_with_timers_even_when_pinning_fails() {
        std::thread::spawn(|| {
            let warned = std::cell::Cell::new(None);
            let mut rt = build_pinned(Some(1 << 20), |w| {
                if let Warning::Unpinned { cpu, .. } = w {
                    warned.set(Some(cpu));
                }
            })
            .expect("runtime");
            assert_eq!(warned.get(), Some(1 << 20));
            let driver = rt.block_on(async {
                monoio::time::sleep(Duration::from_millis(1)).await;
                driver()
            });
            assert!(matches!(driver, "io_uring" | "epoll"), "{driver}");
        })
        .join()
        .expect("runtime thread");
    }
}
