//! Counting what arrived: per-sequence bookkeeping (new, duplicate, late) with bounded memory,
//! and latency histograms that thousands of clients share without contention.

use std::sync::Mutex;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// How many sequence numbers below the highest one seen are remembered exactly. A frame older
/// than that cannot be told apart from a duplicate and is counted as late.
const RECENT: u64 = 128;

/// One receiver's view of one publisher's sequence.
#[derive(Debug, Clone, Default)]
pub struct SeqState {
    /// Highest sequence number seen plus one (0: nothing seen yet).
    next: u64,
    /// Bit `i` set: sequence number `next - 1 - i` has been seen.
    recent: u128,
    /// Distinct sequence numbers seen.
    pub unique: u64,
    pub duplicated: u64,
    /// Arrived after a higher sequence number of the same publisher.
    pub out_of_order: u64,
}

/// What [`SeqState::record`] made of a sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    New,
    Late,
    Duplicate,
}

impl SeqState {
    pub fn record(&mut self, seq: u64) -> Arrival {
        if seq >= self.next {
            let shift = seq + 1 - self.next;
            self.recent = if shift >= 128 {
                1
            } else {
                (self.recent << shift) | 1
            };
            self.next = seq + 1;
            self.unique += 1;
            return Arrival::New;
        }
        let age = self.next - 1 - seq;
        if age < RECENT {
            let bit = 1u128 << age;
            if self.recent & bit != 0 {
                self.duplicated += 1;
                return Arrival::Duplicate;
            }
            self.recent |= bit;
        }
        self.unique += 1;
        self.out_of_order += 1;
        Arrival::Late
    }
}

/// Delivery counts, for one client or summed over many.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Counts {
    /// Distinct bench frames of this run received.
    pub delivered: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
}

impl Counts {
    /// Counts for a receiver whose per-publisher states are `states`, given how many messages
    /// each publisher committed.
    pub fn from_states(states: &[SeqState], published: &[u64]) -> Counts {
        let mut counts = Counts::default();
        for (i, state) in states.iter().enumerate() {
            let sent = published.get(i).copied().unwrap_or(0);
            counts.delivered += state.unique;
            counts.lost += sent.saturating_sub(state.unique);
            counts.duplicated += state.duplicated;
            counts.out_of_order += state.out_of_order;
        }
        counts
    }

    pub fn add(&mut self, other: &Counts) {
        self.delivered += other.delivered;
        self.lost += other.lost;
        self.duplicated += other.duplicated;
        self.out_of_order += other.out_of_order;
    }

    pub fn is_clean(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.out_of_order == 0
    }
}

/// Latencies in nanoseconds, from 1 ns to an hour, three significant digits: percentiles with
/// bounded memory (about 256 KiB per histogram) and a bounded relative error (0.1 %).
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("constant bounds are valid")
}

/// Histograms shared by many receivers. Each receiver buffers a few values and adds them to
/// one shard under its mutex, so a lock is taken once per [`LocalLatency::CAPACITY`] frames and
/// rarely contended.
pub struct SharedLatency {
    shards: Vec<Mutex<Histogram<u64>>>,
}

impl SharedLatency {
    pub fn new(shards: usize) -> SharedLatency {
        SharedLatency {
            shards: (0..shards.max(1))
                .map(|_| Mutex::new(new_histogram()))
                .collect(),
        }
    }

    /// A buffer for receiver number `id`.
    pub fn local(&self, id: usize) -> LocalLatency {
        LocalLatency {
            shard: id % self.shards.len(),
            values: Vec::new(),
        }
    }

    pub fn flush(&self, local: &mut LocalLatency) {
        if local.values.is_empty() {
            return;
        }
        let mut shard = self.shards[local.shard]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for &value in &local.values {
            shard.saturating_record(value.max(1));
        }
        local.values.clear();
    }

    /// All shards merged.
    pub fn merged(&self) -> Histogram<u64> {
        let mut total = new_histogram();
        for shard in &self.shards {
            let shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            total.add(&*shard).expect("same bounds");
        }
        total
    }
}

/// One receiver's unflushed latencies.
pub struct LocalLatency {
    shard: usize,
    values: Vec<u64>,
}

impl LocalLatency {
    pub const CAPACITY: usize = 64;

    /// Buffers `ns`; true when the buffer should be flushed.
    pub fn push(&mut self, ns: u64) -> bool {
        if self.values.capacity() == 0 {
            self.values.reserve_exact(Self::CAPACITY);
        }
        self.values.push(ns);
        self.values.len() >= Self::CAPACITY
    }
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Percentiles {
    pub count: u64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        Percentiles {
            count: h.len(),
            p50_us: us(h.value_at_quantile(0.50)),
            p90_us: us(h.value_at_quantile(0.90)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
            mean_us: h.mean() / 1000.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_sequence_is_all_new() {
        let mut s = SeqState::default();
        for seq in 0..1000 {
            assert_eq!(s.record(seq), Arrival::New);
        }
        let counts = Counts::from_states(&[s], &[1000]);
        assert_eq!(
            counts,
            Counts {
                delivered: 1000,
                ..Counts::default()
            }
        );
    }

    #[test]
    fn gaps_duplicates_and_late_frames() {
        let mut s = SeqState::default();
        assert_eq!(s.record(0), Arrival::New);
        assert_eq!(s.record(1), Arrival::New);
        assert_eq!(s.record(1), Arrival::Duplicate);
        assert_eq!(s.record(5), Arrival::New);
        assert_eq!(s.record(3), Arrival::Late);
        assert_eq!(s.record(3), Arrival::Duplicate);
        assert_eq!(s.record(0), Arrival::Duplicate);
        let counts = Counts::from_states(&[s], &[7]);
        // 0, 1, 3, 5 arrived; 2, 4, 6 did not.
        assert_eq!(counts.delivered, 4);
        assert_eq!(counts.lost, 3);
        assert_eq!(counts.duplicated, 3);
        assert_eq!(counts.out_of_order, 1);
        assert!(!counts.is_clean());
    }

    #[test]
    fn a_long_jump_forgets_the_window() {
        let mut s = SeqState::default();
        s.record(0);
        assert_eq!(s.record(1000), Arrival::New);
        assert_eq!(s.record(999), Arrival::Late);
        assert_eq!(s.record(999), Arrival::Duplicate);
        // Too old to remember: counted as late, not as a duplicate.
        assert_eq!(s.record(0), Arrival::Late);
    }

    #[test]
    fn shards_merge_into_percentiles() {
        let shared = SharedLatency::new(4);
        for id in 0..10 {
            let mut local = shared.local(id);
            for v in 1..=100u64 {
                if local.push(v * 1000) {
                    shared.flush(&mut local);
                }
            }
            shared.flush(&mut local);
        }
        let p = Percentiles::of(&shared.merged());
        assert_eq!(p.count, 1000);
        assert!((p.p50_us - 50.0).abs() < 0.1, "{p:?}");
        assert!((p.p99_us - 99.0).abs() < 0.1, "{p:?}");
        assert!((p.max_us - 100.0).abs() < 0.1, "{p:?}");
    }
}
