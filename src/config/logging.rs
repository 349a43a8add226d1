//! `[logging]` validation and the tracing filter built from
//! `logging.level`.

use super::{invalid, raw, ConfigError, LogFormat, LoggingConfig};

/// The tracing filter for a validated `logging.level`. Field values in
/// directives (`target[span{field=value}]=level`) are matched as literal
/// text, not as regular expressions: tracing-subscriber compiles such a
/// regex into a full DFA, and some short patterns took minutes of CPU
/// (found by the `config` fuzz target).
pub fn log_filter(
    level: &str,
) -> Result<tracing_subscriber::EnvFilter, tracing_subscriber::filter::ParseError> {
    tracing_subscriber::EnvFilter::builder()
        .with_regex(false)
        .parse(level)
}

pub(super) fn validate_logging(l: &raw::RawLogging) -> Result<LoggingConfig, ConfigError> {
    let format = match l.format.as_str() {
        "json" => LogFormat::Json,
        "text" => LogFormat::Text,
        other => {
            return Err(invalid(format!(
                "logging.format must be \"json\" or \"text\", got {other:?}"
            )))
        }
    };
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    // Directives are trimmed here and passed on trimmed: tracing-subscriber
    // 0.3 trims each directive but then slices the untrimmed text with the
    // trimmed offsets, which panics on leading whitespace followed by a
    // multi-byte character (found by the `config` fuzz target).
    let directives: Vec<&str> = l
        .level
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect();
    let level = directives.join(",");
    for &directive in &directives {
        // A bare word is a valid filter (it names a target), but in practice
        // it is a misspelt level ("inof") that silently disables logging.
        if !directive.contains('=') && !LEVELS.contains(&directive.to_ascii_lowercase().as_str()) {
            return Err(invalid(format!(
                "logging.level {:?}: {directive:?} is not a level (trace, debug, info, warn, error, off) or a target=level directive",
                l.level
            )));
        }
    }
    log_filter(&level).map_err(|e| {
        invalid(format!(
            "logging.level {:?} is not a valid level or filter directive: {e}",
            l.level
        ))
    })?;
    Ok(LoggingConfig {
        level,
        format,
        timestamps: l.timestamps,
    })
}
