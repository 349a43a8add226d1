//! The global log subscriber: `logging.level` (an EnvFilter directive,
//! validated by config), `logging.format` (one JSON object per line, or
//! human text), `logging.timestamps`, and journald framing. Writes go to
//! stdout synchronously, which is fine because nothing on the request path
//! logs at info (the access log is debug, target `ncro::access`). COLD.
//!
//! When stdout is the journal (systemd sets `JOURNAL_STREAM` to the
//! `device:inode` of the stream it connected, and stdout's match), lines
//! carry no timestamp (journald adds its own) and start with their syslog
//! priority, `<3>` error, `<4>` warn, `<6>` info, `<7>` debug and trace,
//! which journald strips and stores as the entry's priority, so
//! `journalctl -p warning` filters them. A stdout redirected elsewhere
//! keeps the plain form even when `JOURNAL_STREAM` is inherited.

use std::io::IsTerminal as _;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::registry::LookupSpan;

use crate::config::{Config, LogFormat};

/// How lines are framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Framing {
    pub timestamps: bool,
    /// `<N>` syslog priority prefix.
    pub priority: bool,
}

impl Framing {
    /// From the config and whether stdout is the journal.
    pub fn new(timestamps: bool, journal: bool) -> Framing {
        Framing {
            timestamps: timestamps && !journal,
            priority: journal,
        }
    }
}

/// True when `JOURNAL_STREAM` (`device:inode`, decimal) names the file
/// open as `fd`, as systemd documents for detecting a journal stream.
pub fn fd_is_journal(journal_stream: Option<&str>, fd: libc::c_int) -> bool {
    let Some((dev, ino)) = journal_stream.and_then(|v| v.trim().split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    // SAFETY: fstat writes into the zeroed struct we own; a closed or
    // invalid fd only makes it fail.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return false;
    }
    st.st_dev as u64 == dev && st.st_ino as u64 == ino
}

/// The syslog priority of a tracing level.
pub fn priority(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "<3>",
        Level::WARN => "<4>",
        Level::INFO => "<6>",
        _ => "<7>",
    }
}

/// Writes the priority prefix (when on), then the inner format's line.
struct Prefixed<F> {
    on: bool,
    inner: F,
}

impl<S, N, F> FormatEvent<S, N> for Prefixed<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        if self.on {
            writer.write_str(priority(event.metadata().level()))?;
        }
        self.inner.format_event(ctx, writer, event)
    }
}

/// Installs the subscriber for `cfg`, then logs the config summary, the
/// config warnings and which spellings won.
pub fn init(cfg: &Config) {
    let journal = fd_is_journal(
        std::env::var("JOURNAL_STREAM").ok().as_deref(),
        libc::STDOUT_FILENO,
    );
    let framing = Framing::new(cfg.logging.timestamps, journal);
    let ansi = std::io::stdout().is_terminal() && !journal;
    let filter = || crate::config::log_filter(&cfg.logging.level).unwrap_or_else(|_| "info".into());
    let builder = || {
        tracing_subscriber::fmt()
            .with_env_filter(filter())
            .with_ansi(ansi)
            .with_writer(std::io::stdout)
    };
    let on = framing.priority;
    // A second init (tests running in-process) is harmless; ignore it.
    let _ = match (cfg.logging.format, framing.timestamps) {
        (LogFormat::Json, true) => builder()
            .fmt_fields(format::JsonFields::new())
            .event_format(Prefixed {
                on,
                inner: format().json(),
            })
            .try_init(),
        (LogFormat::Json, false) => builder()
            .fmt_fields(format::JsonFields::new())
            .event_format(Prefixed {
                on,
                inner: format().json().without_time(),
            })
            .try_init(),
        (LogFormat::Text, true) => builder()
            .event_format(Prefixed {
                on,
                inner: format(),
            })
            .try_init(),
        (LogFormat::Text, false) => builder()
            .event_format(Prefixed {
                on,
                inner: format().without_time(),
            })
            .try_init(),
    };
    super::log_config_summary(cfg);
    for w in &cfg.warnings {
        tracing::warn!(target: "ncro::config", "{w}");
    }
    for p in &cfg.precedence {
        tracing::info!(target: "ncro::config", "{p}");
    }
}

fn format() -> format::Format {
    format::Format::default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt as _;
    use std::os::unix::io::AsRawFd as _;

    #[test]
    fn framing_rules() {
        assert_eq!(
            Framing::new(true, false),
            Framing {
                timestamps: true,
                priority: false
            }
        );
        assert_eq!(
            Framing::new(false, false),
            Framing {
                timestamps: false,
                priority: false
            }
        );
        for ts in [true, false] {
            assert_eq!(
                Framing::new(ts, true),
                Framing {
                    timestamps: false,
                    priority: true
                }
            );
        }
        assert_eq!(priority(&Level::ERROR), "<3>");
        assert_eq!(priority(&Level::WARN), "<4>");
        assert_eq!(priority(&Level::INFO), "<6>");
        assert_eq!(priority(&Level::DEBUG), "<7>");
        assert_eq!(priority(&Level::TRACE), "<7>");
    }

    #[test]
    fn journal_stream_must_name_this_fd() {
        let f = tempfile::tempfile().unwrap();
        let m = f.metadata().unwrap();
        let fd = f.as_raw_fd();
        let right = format!("{}:{}", m.dev(), m.ino());
        assert!(fd_is_journal(Some(&right), fd));
        let wrong = format!("{}:{}", m.dev(), m.ino() + 1);
        assert!(!fd_is_journal(Some(&wrong), fd));
        for bad in ["", "1", "a:b", ":"] {
            assert!(!fd_is_journal(Some(bad), fd), "{bad:?}");
        }
        assert!(!fd_is_journal(None, fd));
    }
}
