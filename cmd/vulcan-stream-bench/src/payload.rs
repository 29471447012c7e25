//! The benchmark payload: a JSON object the server accepts, stamped with who sent it, its
//! sequence number and its send time, padded to an exact size; and the parser for the frames
//! that come back.
//!
//! The stamp fields come first and in a fixed order so that the parser is a prefix match and
//! three integer scans, not a JSON parse: at a million frames a second the generator's own CPU
//! matters, because it shares the cores with the server it measures.

use std::time::{Duration, Instant};

/// Smallest accepted `--payload-size`: the stamp fields at their longest fit.
pub const MIN_SIZE: usize = 128;
/// Largest accepted `--payload-size`: PostgreSQL limits a NOTIFY payload to 8000 bytes.
pub const MAX_SIZE: usize = 7999;

const BENCH_PREFIX: &str = r#"{"action":"bench","run":"#;

/// One monotonic clock for send stamps and arrival times; both ends live in this process, so
/// `CLOCK_MONOTONIC` (what [`Instant`] reads) needs no synchronisation.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    start: Instant,
}

impl Clock {
    pub fn new() -> Clock {
        Clock {
            start: Instant::now(),
        }
    }

    /// A clock whose zero is `origin_ns` on the machine's monotonic clock (see
    /// [`monotonic_ns`]): processes given the same origin stamp and time on one scale.
    pub fn from_origin(origin_ns: u64) -> Clock {
        let now = Instant::now();
        let since_origin = Duration::from_nanos(monotonic_ns().saturating_sub(origin_ns));
        Clock {
            start: now.checked_sub(since_origin).unwrap_or(now),
        }
    }

    /// This clock's zero on the machine's monotonic clock, for [`Clock::from_origin`] in
    /// another process.
    pub fn origin_ns(&self) -> u64 {
        monotonic_ns().saturating_sub(self.now_ns())
    }

    /// Nanoseconds since the clock was created.
    pub fn now_ns(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock [`Instant`] reads on Linux, and one clock for
/// every process of the machine.
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the struct we own; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    u64::try_from(now.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(now.tv_nsec).unwrap_or(0)
}

impl Default for Clock {
    fn default() -> Clock {
        Clock::new()
    }
}

/// What a payload carries besides its padding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Random per run, so frames of another run on the same channel are not counted.
    pub run: u32,
    /// Which publisher connection sent it; each has its own sequence.
    pub publisher: u32,
    pub seq: u64,
    /// [`Clock::now_ns`] just before the statement carrying it was sent.
    pub sent_ns: u64,
}

/// A frame as the generator sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    Bench(Stamp),
    /// The server's `{"action":"ping"}` heartbeat.
    Ping,
    /// Anything else, including bench frames of another run.
    Other,
}

/// Appends the payload for `stamp`, exactly `size` bytes long, to `out`.
///
/// `size` must be at least [`MIN_SIZE`]; the options check that.
pub fn encode(stamp: Stamp, size: usize, out: &mut String) {
    encode_addressed(stamp, None, size, out);
}

/// [`encode`], with a string field after the stamp (`("agent_id", "agent-17")`), which the
/// server's filters match; the stamp stays first, so [`parse`] reads it as before. `size`
/// must leave room for the field.
pub fn encode_addressed(stamp: Stamp, field: Option<(&str, &str)>, size: usize, out: &mut String) {
    use std::fmt::Write as _;
    let start = out.len();
    let _ = write!(
        out,
        r#"{BENCH_PREFIX}{},"pub":{},"seq":{},"t":{}"#,
        stamp.run, stamp.publisher, stamp.seq, stamp.sent_ns
    );
    if let Some((name, value)) = field {
        let _ = write!(out, r#","{name}":"{value}""#);
    }
    const PAD_OPEN: &str = r#","pad":""#;
    const PAD_CLOSE: &str = r#""}"#;
    let used = out.len() - start + PAD_OPEN.len() + PAD_CLOSE.len();
    out.push_str(PAD_OPEN);
    out.extend(std::iter::repeat_n('x', size.saturating_sub(used)));
    out.push_str(PAD_CLOSE);
}

/// Classifies a text frame; `run` is this run's id. A `vulcan-stream.v1` frame is read through
/// its envelope: `{"id":"…","data":PAYLOAD}` is the payload, `{"event":"ping",…}` the heartbeat.
pub fn parse(text: &str, run: u32) -> Parsed {
    let text = match text.strip_prefix(r#"{"id":""#) {
        Some(rest) => match rest.split_once(r#"","data":"#) {
            Some((_, payload)) => payload.strip_suffix('}').unwrap_or(payload),
            None => return Parsed::Other,
        },
        None if text.starts_with(r#"{"event":"ping""#) => return Parsed::Ping,
        None => text,
    };
    let Some(rest) = text.strip_prefix(BENCH_PREFIX) else {
        return if is_ping(text) {
            Parsed::Ping
        } else {
            Parsed::Other
        };
    };
    let stamp = (|| {
        let (frame_run, rest) = number(rest, r#","pub":"#)?;
        let (publisher, rest) = number(rest, r#","seq":"#)?;
        let (seq, rest) = number(rest, r#","t":"#)?;
        let (sent_ns, _) = number(rest, ",")?;
        Some(Stamp {
            run: u32::try_from(frame_run).ok()?,
            publisher: u32::try_from(publisher).ok()?,
            seq,
            sent_ns,
        })
    })();
    match stamp {
        Some(stamp) if stamp.run == run => Parsed::Bench(stamp),
        _ => Parsed::Other,
    }
}

fn is_ping(text: &str) -> bool {
    // Short-circuits on length so a flood of foreign frames costs no allocation.
    text == r#"{"action":"ping"}"#
        || (text.len() < 64 && text.replace(' ', "") == r#"{"action":"ping"}"#)
}

/// Reads the decimal number at the start of `s`, which must be followed by `then`.
fn number<'a>(s: &'a str, then: &str) -> Option<(u64, &'a str)> {
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return None;
    }
    let value = s[..digits].parse().ok()?;
    let rest = s[digits..].strip_prefix(then)?;
    Some((value, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_envelopes_are_read_through() {
        let stamp = Stamp {
            run: 7,
            publisher: 1,
            seq: 42,
            sent_ns: 9,
        };
        let mut payload = String::new();
        encode(stamp, MIN_SIZE, &mut payload);
        let v1 = format!(r#"{{"id":"00ab-3","data":{payload}}}"#);
        assert!(matches!(parse(&v1, 7), Parsed::Bench(s) if s.seq == 42));
        assert!(matches!(
            parse(r#"{"event":"ping","id":"00ab-3"}"#, 7),
            Parsed::Ping
        ));
        assert!(matches!(
            parse(r#"{"event":"reset","id":"00ab-3","reason":"evicted"}"#, 7),
            Parsed::Other
        ));
    }

    fn stamp() -> Stamp {
        Stamp {
            run: 7,
            publisher: 3,
            seq: 123_456,
            sent_ns: 98_765_432_100,
        }
    }

    #[test]
    fn encodes_to_the_exact_size_and_parses_back() {
        for size in [MIN_SIZE, 200, 1000, MAX_SIZE] {
            let mut out = String::new();
            encode(stamp(), size, &mut out);
            assert_eq!(out.len(), size, "{out}");
            let value: serde_json::Value = serde_json::from_str(&out).expect("valid JSON");
            assert_eq!(value["action"], "bench");
            assert_eq!(value["seq"], 123_456);
            assert_eq!(parse(&out, 7), Parsed::Bench(stamp()));
        }
    }

    #[test]
    fn an_addressed_payload_carries_its_field_and_parses_back() {
        let mut out = String::new();
        encode_addressed(stamp(), Some(("agent_id", "agent-17")), 200, &mut out);
        assert_eq!(out.len(), 200, "{out}");
        let value: serde_json::Value = serde_json::from_str(&out).expect("valid JSON");
        assert_eq!(value["agent_id"], "agent-17");
        assert_eq!(parse(&out, 7), Parsed::Bench(stamp()));
    }

    #[test]
    fn the_longest_stamp_fits_the_minimum_size() {
        let mut out = String::new();
        let longest = Stamp {
            run: u32::MAX,
            publisher: u32::MAX,
            seq: u64::MAX,
            sent_ns: u64::MAX,
        };
        encode(longest, MIN_SIZE, &mut out);
        assert_eq!(out.len(), MIN_SIZE);
        assert_eq!(parse(&out, u32::MAX), Parsed::Bench(longest));
    }

    #[test]
    fn clocks_with_one_origin_agree() {
        let clock = Clock::new();
        std::thread::sleep(Duration::from_millis(5));
        let other = Clock::from_origin(clock.origin_ns());
        let (a, b) = (clock.now_ns(), other.now_ns());
        assert!(a >= 5_000_000, "{a}");
        assert!(a.abs_diff(b) < 1_000_000, "{a} vs {b}");
    }

    #[test]
    fn pings_other_runs_and_foreign_frames() {
        assert_eq!(parse(r#"{"action":"ping"}"#, 7), Parsed::Ping);
        assert_eq!(parse(r#"{"action": "ping"}"#, 7), Parsed::Ping);
        let mut out = String::new();
        encode(stamp(), 200, &mut out);
        assert_eq!(parse(&out, 8), Parsed::Other);
        assert_eq!(
            parse(r#"{"action":"test","check_id":"x"}"#, 7),
            Parsed::Other
        );
        assert_eq!(
            parse(r#"{"action":"bench","run":7,"pub":x}"#, 7),
            Parsed::Other
        );
    }
}
