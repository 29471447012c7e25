//! Positions: where a message stands in the stream, as clients see it and send it back.
//!
//! A position is an *epoch* and an *offset*, written `EPOCH-OFFSET` (for example
//! `6c1f0a93d2b47e05-1042`): URL-safe, at most 64 characters, opaque to clients. The offset grows
//! by one per message. The epoch names one stretch of unbroken continuity: a new one starts when
//! the process starts and after every LISTEN reconnect, because NOTIFYs committed while nothing
//! listened are gone, and a position from before can never be continued exactly. Offset 0 is
//! the start of an epoch, before its first message.

use std::fmt;
use std::str::FromStr;

/// The longest position text accepted or produced.
pub const MAX_LEN: usize = 64;

/// One stretch of unbroken continuity; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Epoch(u64);

impl Epoch {
    /// A fresh epoch, different from `previous`. Random rather than counted, so that two
    /// processes (replicas, or one restarted) never share one.
    pub fn new_after(previous: Option<Epoch>) -> Epoch {
        loop {
            let candidate = Epoch(rand::random::<u64>());
            if Some(candidate) != previous {
                return candidate;
            }
        }
    }

    /// The position before this epoch's first message.
    pub fn start(self) -> Position {
        Position {
            epoch: self,
            offset: 0,
        }
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// A message's place in the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Position {
    pub epoch: Epoch,
    pub offset: u64,
}

impl Position {
    /// The position of the message after this one.
    pub fn next(self) -> Position {
        Position {
            epoch: self.epoch,
            offset: self.offset + 1,
        }
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.epoch, self.offset)
    }
}

/// Why a client's text is not a position.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PositionError {
    #[error("longer than {MAX_LEN} characters")]
    TooLong,
    #[error("expected EPOCH-OFFSET, as sent in a message's \"id\"")]
    Shape,
    #[error("the epoch is not 1 to 16 hexadecimal digits")]
    Epoch,
    #[error("the offset is not a decimal number below 2^64")]
    Offset,
}

impl FromStr for Position {
    type Err = PositionError;

    fn from_str(text: &str) -> Result<Position, PositionError> {
        if text.len() > MAX_LEN {
            return Err(PositionError::TooLong);
        }
        let (epoch, offset) = text.split_once('-').ok_or(PositionError::Shape)?;
        let hex = |c: char| c.is_ascii_hexdigit() && !c.is_ascii_uppercase();
        if epoch.is_empty() || epoch.len() > 16 || !epoch.chars().all(hex) {
            return Err(PositionError::Epoch);
        }
        if offset.is_empty() || !offset.bytes().all(|b| b.is_ascii_digit()) {
            return Err(PositionError::Offset);
        }
        Ok(Position {
            epoch: Epoch(u64::from_str_radix(epoch, 16).map_err(|_| PositionError::Epoch)?),
            offset: offset.parse().map_err(|_| PositionError::Offset)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_round_trip_and_are_url_safe() {
        let epoch = Epoch::new_after(None);
        for offset in [0, 1, 42, u64::MAX] {
            let position = Position { epoch, offset };
            let text = position.to_string();
            assert!(text.len() <= MAX_LEN);
            assert!(
                text.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            );
            assert_eq!(text.parse::<Position>(), Ok(position));
        }
        assert_eq!(epoch.start().next().offset, 1);
        assert_ne!(Epoch::new_after(Some(epoch)), epoch);
    }

    #[test]
    fn malformed_positions_say_what_is_wrong() {
        for (text, error) in [
            ("", PositionError::Shape),
            ("abc", PositionError::Shape),
            ("-1", PositionError::Epoch),
            ("xyz-1", PositionError::Epoch),
            ("ABC-1", PositionError::Epoch),
            ("0123456789abcdef0-1", PositionError::Epoch),
            ("abc-", PositionError::Offset),
            ("abc-+1", PositionError::Offset),
            ("abc-1-2", PositionError::Offset),
            ("abc-18446744073709551616", PositionError::Offset),
            (&"1".repeat(65), PositionError::TooLong),
        ] {
            assert_eq!(text.parse::<Position>(), Err(error), "{text:?}");
        }
        assert!("00ff-7".parse::<Position>().is_ok());
    }
}
