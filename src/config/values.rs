//! Parsers for the text of one value, shared by the file and the environment (a file's
//! integer reaches them in its decimal form). Each returns the reason a value is wrong; the
//! caller adds the variable or key and the value.

use std::time::Duration;

use log::LevelFilter;

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
