//! Parsers for the text of one value, shared by the file and the environment (a file's
//! integer reaches them in its decimal form). Each returns the reason a value is wrong; the
//! caller adds the variable or key and the value.

use std::time::Duration;

use log::LevelFilter;

use super::SourceKind;

pub(super) fn parse_port(text: &str) -> Result<u16, String> {
    text.trim()
        .parse::<u16>()
        .map_err(|_| "not a port number (0-65535)".to_owned())
}

/// Whole seconds from 1 to a day: 0 would make a ticker spin, and more than a day is a typo.
pub(super) fn parse_seconds(text: &str) -> Result<Duration, String> {
    match text.trim().parse::<u64>() {
        Ok(0) => Err("must be at least 1 second".to_owned()),
        Ok(secs) if secs <= 86_400 => Ok(Duration::from_secs(secs)),
        _ => Err("not a whole number of seconds (1-86400)".to_owned()),
    }
}

/// A count or size that must not be zero (a zero queue or frame size would refuse everything).
pub(super) fn parse_positive(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(0) | Err(_) => Err("not a positive whole number".to_owned()),
        Ok(n) => Ok(n),
    }
}

/// A count or size that may be zero (zero turns the feature off).
pub(super) fn parse_count(text: &str) -> Result<usize, String> {
    text.trim()
        .parse::<usize>()
        .map_err(|_| "not a whole number".to_owned())
}

/// `notify` or `table`, in any case.
pub(super) fn parse_source(text: &str) -> Result<SourceKind, String> {
    match text.trim().to_ascii_lowercase().as_str() {
        "notify" => Ok(SourceKind::Notify),
        "table" => Ok(SourceKind::Table),
        _ => Err("not a source (notify, table)".to_owned()),
    }
}

/// The largest payload a table-mode publisher may store, in bytes: at least NOTIFY's 7,999
/// (table mode must not be stricter than notify mode), at most 256 MiB (every encoding of a
/// message is held in memory, and PostgreSQL's text stops at 1 GB).
pub(super) fn parse_max_payload(text: &str) -> Result<usize, String> {
    const MAX: usize = 256 << 20;
    match text.trim().parse::<usize>() {
        Ok(n) if (7_999..=MAX).contains(&n) => Ok(n),
        _ => Err(format!("not a size in bytes from 7999 to {MAX}")),
    }
}

/// How long table rows are kept, in whole seconds: from a minute (shorter would race clients
/// that resume after a blip) to ten years.
pub(super) fn parse_retention(text: &str) -> Result<Duration, String> {
    const MAX: u64 = 10 * 366 * 86_400;
    match text.trim().parse::<u64>() {
        Ok(secs) if (60..=MAX).contains(&secs) => Ok(Duration::from_secs(secs)),
        _ => Err(format!("not a whole number of seconds from 60 to {MAX}")),
    }
}

/// Milliseconds between the sequencer's looks for new rows: 1 to 1000 (0 would spin; more than
/// a second would make every publish wait that long).
pub(super) fn parse_poll_interval(text: &str) -> Result<Duration, String> {
    match text.trim().parse::<u64>() {
        Ok(ms) if (1..=1000).contains(&ms) => Ok(Duration::from_millis(ms)),
        _ => Err("not a whole number of milliseconds from 1 to 1000".to_owned()),
    }
}

/// Log level names of the original (DEBUG … PANIC) in any case, plus TRACE and OFF.
pub fn parse_level(text: &str) -> Result<LevelFilter, String> {
    Ok(match text.trim().to_ascii_uppercase().as_str() {
        "TRACE" => LevelFilter::Trace,
        "DEBUG" => LevelFilter::Debug,
        "INFO" => LevelFilter::Info,
        "WARN" | "WARNING" => LevelFilter::Warn,
        "ERROR" | "FATAL" | "PANIC" => LevelFilter::Error,
        "OFF" => LevelFilter::Off,
        _ => {
            return Err(
                "not a log level (DEBUG, INFO, WARN, ERROR, FATAL, PANIC, TRACE, OFF)".to_owned(),
            );
        }
    })
}

/// PostgreSQL channel names are identifiers: at most 63 bytes, and no NUL.
pub(super) fn parse_channel(text: &str) -> Result<String, String> {
    if text.is_empty() {
        Err("the channel name is empty".to_owned())
    } else if text.len() > 63 {
        Err("a channel name is at most 63 bytes".to_owned())
    } else if text.contains('\0') {
        Err("a channel name cannot contain NUL".to_owned())
    } else {
        Ok(text.to_owned())
    }
}

/// One path segment; a leading slash is tolerated (`/stream` and `stream` both mean `/stream`).
pub(super) fn parse_stream_path(text: &str) -> Result<String, String> {
    let segment = text.strip_prefix('/').unwrap_or(text);
    if segment.is_empty() {
        return Err("the stream path is empty".to_owned());
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || "-._~".contains(c);
    if !segment.chars().all(allowed) {
        return Err(
            "the stream path is one URL path segment (letters, digits, '-', '.', '_', '~')"
                .to_owned(),
        );
    }
    Ok(segment.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_are_bounded() {
        assert_eq!(parse_seconds(" 7 "), Ok(Duration::from_secs(7)));
        assert_eq!(parse_seconds("86400"), Ok(Duration::from_secs(86_400)));
        assert!(parse_seconds("0").is_err());
        assert!(parse_seconds("86401").is_err());
        assert!(parse_seconds("-1").is_err());
    }

    #[test]
    fn table_mode_settings_are_bounded() {
        assert_eq!(parse_source("Table"), Ok(SourceKind::Table));
        assert_eq!(parse_source("notify"), Ok(SourceKind::Notify));
        assert!(parse_source("outbox").is_err());
        assert_eq!(parse_max_payload("7999"), Ok(7_999));
        assert!(parse_max_payload("7998").is_err());
        assert!(parse_max_payload(&((256usize << 20) + 1).to_string()).is_err());
        assert_eq!(parse_retention("60"), Ok(Duration::from_secs(60)));
        assert!(parse_retention("59").is_err());
        assert_eq!(parse_poll_interval("5"), Ok(Duration::from_millis(5)));
        assert!(parse_poll_interval("0").is_err());
        assert!(parse_poll_interval("1001").is_err());
    }

    #[test]
    fn levels_of_the_original_in_any_case() {
        assert_eq!(parse_level("Debug"), Ok(LevelFilter::Debug));
        assert_eq!(parse_level("PANIC"), Ok(LevelFilter::Error));
        assert!(parse_level("verbose").is_err());
    }

    #[test]
    fn channel_names_are_identifiers() {
        assert_eq!(parse_channel("My-Events"), Ok("My-Events".to_owned()));
        assert!(parse_channel(&"x".repeat(64)).is_err());
        assert!(parse_channel("a\0b").is_err());
    }
}
