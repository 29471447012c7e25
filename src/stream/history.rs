//! The most recent messages of the current epoch, kept so that a client that reconnects can be
//! sent what it missed.
//!
//! Bounded three ways, each from the configuration: by count, by bytes and by age. The byte
//! bound counts every encoding a message holds ([`Outgoing::size`]), so it is a bound on the
//! memory the history keeps alive, never exceeded: the oldest messages go first to make room,
//! and a message larger than the whole bound is not kept (the history then starts after it).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::message::{Outgoing, Position, ResetReason};

/// How much history is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryLimits {
    pub max_messages: usize,
    pub max_bytes: usize,
    pub max_age: Duration,
}

impl Default for HistoryLimits {
    /// 10,000 messages, 64 MiB, one hour (the configuration's defaults): a few minutes of a
    /// busy stream, enough for rolling deploys and network blips, at a memory cost an operator
    /// can plan for.
    fn default() -> Self {
        HistoryLimits {
            max_messages: 10_000,
            max_bytes: 64 << 20,
            max_age: Duration::from_secs(3600),
        }
    }
}

/// Messages in growing offsets, oldest first.
#[derive(Debug)]
pub struct History {
    entries: VecDeque<(Instant, Arc<Outgoing>)>,
    bytes: usize,
    limits: HistoryLimits,
}

impl History {
    pub fn new(limits: HistoryLimits) -> History {
        History {
            entries: VecDeque::new(),
            bytes: 0,
            limits,
        }
    }

    /// Keeps `message`, received at `now`, dropping the oldest as the bounds require.
    pub fn push(&mut self, now: Instant, message: Arc<Outgoing>) {
        let size = message.size();
        if size > self.limits.max_bytes || self.limits.max_messages == 0 {
            self.clear();
            return;
        }
        while self.entries.len() >= self.limits.max_messages
            || self.bytes + size > self.limits.max_bytes
        {
            self.pop_oldest();
        }
        self.bytes += size;
        self.entries.push_back((now, message));
        self.expire(now);
    }

    /// Forgets everything (a new epoch starts).
    pub fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    /// Bytes held, as counted against the bound.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every message after `since`, up to `head` (the newest published), or why they cannot
    /// all be given.
    pub fn after(
        &mut self,
        now: Instant,
        since: Position,
        head: Position,
    ) -> Result<Vec<Arc<Outgoing>>, ResetReason> {
        if since.epoch != head.epoch {
            return Err(ResetReason::OtherEpoch);
        }
        if since.offset > head.offset {
            return Err(ResetReason::Ahead);
        }
        if since.offset == head.offset {
            return Ok(Vec::new());
        }
        self.expire(now);
        let Some((_, oldest)) = self.entries.front() else {
            return Err(ResetReason::Evicted);
        };
        let first = oldest.position().offset;
        if first > since.offset + 1 {
            return Err(ResetReason::Evicted);
        }
        // Offsets grow but may skip (in table mode positions are shared by every channel, and
        // a row the check refuses keeps its position): search rather than count.
        let skip = self
            .entries
            .partition_point(|(_, m)| m.position().offset <= since.offset);
        Ok(self
            .entries
            .iter()
            .skip(skip)
            .map(|(_, m)| m.clone())
            .collect())
    }

    fn expire(&mut self, now: Instant) {
        while self
            .entries
            .front()
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) > self.limits.max_age)
        {
            self.pop_oldest();
        }
    }

    fn pop_oldest(&mut self) {
        if let Some((_, message)) = self.entries.pop_front() {
            self.bytes -= message.size();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Epoch;

    fn messages(epoch: Epoch, offsets: std::ops::RangeInclusive<u64>) -> Vec<Arc<Outgoing>> {
        offsets
            .map(|offset| {
                let payload = format!(r#"{{"n":{offset}}}"#);
                Arc::new(Outgoing::message(Position { epoch, offset }, &payload))
            })
            .collect()
    }

    fn offsets(found: &[Arc<Outgoing>]) -> Vec<u64> {
        found.iter().map(|m| m.position().offset).collect()
    }

    #[test]
    fn serves_what_follows_a_position_and_refuses_what_it_cannot() {
        let epoch = Epoch::new_after(None);
        let now = Instant::now();
        let mut history = History::new(HistoryLimits {
            max_messages: 3,
            ..HistoryLimits::default()
        });
        for message in messages(epoch, 1..=5) {
            history.push(now, message);
        }
        let head = Position { epoch, offset: 5 };
        let at = |offset| Position { epoch, offset };
        assert_eq!(
            offsets(&history.after(now, at(2), head).expect("2")),
            [3, 4, 5]
        );
        assert_eq!(offsets(&history.after(now, at(4), head).expect("4")), [5]);
        assert!(history.after(now, at(5), head).expect("head").is_empty());
        assert_eq!(history.after(now, at(1), head), Err(ResetReason::Evicted));
        assert_eq!(history.after(now, at(6), head), Err(ResetReason::Ahead));
        let other = Epoch::new_after(Some(epoch)).start();
        assert_eq!(
            history.after(now, other, head),
            Err(ResetReason::OtherEpoch)
        );
    }

    #[test]
    fn offsets_with_gaps_are_searched_not_counted() {
        let epoch = Epoch::new_after(None);
        let now = Instant::now();
        let mut history = History::new(HistoryLimits::default());
        for offset in [3, 7, 8, 20] {
            for message in messages(epoch, offset..=offset) {
                history.push(now, message);
            }
        }
        let head = Position { epoch, offset: 20 };
        let at = |offset| Position { epoch, offset };
        assert_eq!(
            offsets(&history.after(now, at(3), head).expect("3")),
            [7, 8, 20]
        );
        assert_eq!(
            offsets(&history.after(now, at(2), head).expect("2")),
            [3, 7, 8, 20]
        );
        assert_eq!(
            offsets(&history.after(now, at(10), head).expect("10")),
            [20]
        );
        assert_eq!(history.after(now, at(1), head), Err(ResetReason::Evicted));
    }

    #[test]
    fn the_byte_bound_is_never_exceeded() {
        let epoch = Epoch::new_after(None);
        let all = messages(epoch, 1..=100);
        let one = all[0].size();
        let now = Instant::now();
        let mut history = History::new(HistoryLimits {
            max_bytes: one * 10 + one / 2,
            ..HistoryLimits::default()
        });
        for message in &all {
            history.push(now, message.clone());
            assert!(history.bytes() <= one * 10 + one / 2);
        }
        assert_eq!(history.len(), 10);
        let sum: usize = history.entries.iter().map(|(_, m)| m.size()).sum();
        assert_eq!(history.bytes(), sum);

        let huge = "x".repeat(one * 20);
        let big = Arc::new(Outgoing::message(
            Position { epoch, offset: 101 },
            &format!(r#"{{"x":"{huge}"}}"#),
        ));
        history.push(now, big);
        assert!(history.is_empty());
        assert_eq!(history.bytes(), 0);
        let head = Position { epoch, offset: 101 };
        let before = Position { epoch, offset: 99 };
        assert_eq!(history.after(now, before, head), Err(ResetReason::Evicted));
    }

    #[test]
    fn old_messages_expire() {
        let epoch = Epoch::new_after(None);
        let start = Instant::now();
        let mut history = History::new(HistoryLimits {
            max_age: Duration::from_secs(60),
            ..HistoryLimits::default()
        });
        let all = messages(epoch, 1..=2);
        history.push(start, all[0].clone());
        history.push(start + Duration::from_secs(30), all[1].clone());
        let head = Position { epoch, offset: 2 };
        let later = start + Duration::from_secs(61);
        assert_eq!(
            history.after(later, epoch.start(), head),
            Err(ResetReason::Evicted)
        );
        let from_one = Position { epoch, offset: 1 };
        assert_eq!(
            offsets(&history.after(later, from_one, head).expect("1")),
            [2]
        );
    }
}
