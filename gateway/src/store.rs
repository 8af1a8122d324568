//! The store of filtered records that gRPC subscribers read from.
//!
//! Design: one ordered log per stream. Appending never waits for readers; each reader keeps its
//! own cursor and is woken through a watch channel when the log grows, so a slow subscriber falls
//! behind without holding anyone else up. Records carry per-stream sequence numbers starting at 1.
//! A reader whose cursor points before the oldest record still held is told so with a gap.
//!
//! This implementation holds records in memory, bounded per stream by a record count and by the
//! stream's retention limit (records older than it are purged on every append and read). Only
//! filtered records ever enter it: the privacy chain runs before [`Store::append`].
//!
//! Metrics: `hubgate_store_records_purged_total{stream, reason}`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hubgate_exporters::catalogue;
use hubgate_proto::v1;
use metrics::Counter;
use tokio::sync::watch;

/// A record in the store, with when it was kept.
#[derive(Debug)]
pub struct Stored {
    pub kept_ms: i64,
    pub record: v1::Record,
}

/// The result of a read.
#[derive(Debug, Default)]
pub struct Batch {
    /// Sequences `[first, last]` that were asked for but are no longer held.
    pub gap: Option<(u64, u64)>,
    pub records: Vec<Arc<Stored>>,
    /// Where the next read should start.
    pub next: u64,
}

#[derive(Debug)]
struct Log {
    records: VecDeque<Arc<Stored>>,
    /// Sequence of the next record appended; the records held are `next - len .. next`.
    next: u64,
}

impl Log {
    fn oldest(&self) -> u64 {
        self.next - self.records.len() as u64
    }
}

#[derive(Debug)]
struct StreamLog {
    log: Mutex<Log>,
    retention_ms: i64,
    capacity: usize,
    /// Sequence of the newest record (0 before the first).
    tip: watch::Sender<u64>,
    purged_retention: Counter,
    purged_capacity: Counter,
}

/// Per-stream logs of filtered records. Streams are addressed by their index in the policy.
#[derive(Debug)]
pub struct Store {
    streams: Vec<StreamLog>,
}

impl Store {
    /// A store for streams with these names and retention limits.
    pub fn new<'a>(
        streams: impl IntoIterator<Item = (&'a str, Duration)>,
        capacity: usize,
    ) -> Self {
        let streams = streams
            .into_iter()
            .map(|(name, retention)| StreamLog {
                log: Mutex::new(Log { records: VecDeque::new(), next: 1 }),
                retention_ms: i64::try_from(retention.as_millis()).unwrap_or(i64::MAX),
                capacity,
                tip: watch::channel(0).0,
                purged_retention: metrics::counter!(catalogue::RECORDS_PURGED, "stream" => name.to_owned(), "reason" => "retention"),
                purged_capacity: metrics::counter!(catalogue::RECORDS_PURGED, "stream" => name.to_owned(), "reason" => "capacity"),
            })
            .collect();
        Self { streams }
    }

    fn stream(&self, index: usize) -> &StreamLog {
        &self.streams[index]
    }

    /// Appends records to a stream, assigning their sequence numbers, and wakes its readers.
    pub fn append(
        &self,
        index: usize,
        records: impl IntoIterator<Item = v1::Record>,
        now_ms: i64,
    ) -> u64 {
        let s = self.stream(index);
        let mut log = s.log.lock().unwrap_or_else(PoisonError::into_inner);
        let mut appended = 0;
        for mut record in records {
            record.sequence = log.next;
            log.next += 1;
            log.records.push_back(Arc::new(Stored {
                kept_ms: now_ms,
                record,
            }));
            appended += 1;
        }
        let over = log.records.len().saturating_sub(s.capacity);
        log.records.drain(..over);
        s.purged_capacity.increment(over as u64);
        Self::purge_expired(s, &mut log, now_ms);
        let tip = log.next - 1;
        drop(log);
        s.tip.send_replace(tip);
        appended
    }

    fn purge_expired(s: &StreamLog, log: &mut Log, now_ms: i64) {
        let cutoff = now_ms.saturating_sub(s.retention_ms);
        let expired = log
            .records
            .iter()
            .take_while(|r| r.kept_ms < cutoff)
            .count();
        if expired > 0 {
            log.records.drain(..expired);
            s.purged_retention.increment(expired as u64);
        }
    }

    /// Reads up to `max` records of a stream from sequence `from` on.
    pub fn read(&self, index: usize, from: u64, max: usize, now_ms: i64) -> Batch {
        let s = self.stream(index);
        let mut log = s.log.lock().unwrap_or_else(PoisonError::into_inner);
        Self::purge_expired(s, &mut log, now_ms);
        let oldest = log.oldest();
        let mut batch = Batch::default();
        let mut from = from.max(1);
        if from < oldest {
            batch.gap = Some((from, oldest - 1));
            from = oldest;
        }
        let skip = usize::try_from(from - oldest).unwrap_or(usize::MAX);
        batch.records = log.records.iter().skip(skip).take(max).cloned().collect();
        batch.next = from + batch.records.len() as u64;
        batch
    }

    /// Removes every record older than its stream's retention limit.
    pub fn purge_expired_all(&self, now_ms: i64) {
        for s in &self.streams {
            let mut log = s.log.lock().unwrap_or_else(PoisonError::into_inner);
            Self::purge_expired(s, &mut log, now_ms);
        }
    }

    /// `(oldest held, newest kept)` sequences of a stream; 0 where there is none.
    pub fn positions(&self, index: usize) -> (u64, u64) {
        let log = self
            .stream(index)
            .log
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let oldest = if log.records.is_empty() {
            0
        } else {
            log.oldest()
        };
        (oldest, log.next - 1)
    }

    /// Sequence the next record of a stream will get: where a live reader starts.
    pub fn next_sequence(&self, index: usize) -> u64 {
        self.stream(index)
            .log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .next
    }

    /// A receiver that changes whenever the stream grows.
    pub fn watch(&self, index: usize) -> watch::Receiver<u64> {
        self.stream(index).tip.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(n: i64) -> v1::Record {
        v1::Record {
            stream: "s".into(),
            event_time: Some(prost_types::Timestamp {
                seconds: n,
                nanos: 0,
            }),
            ..Default::default()
        }
    }

    fn seqs(b: &Batch) -> Vec<u64> {
        b.records.iter().map(|r| r.record.sequence).collect()
    }

    fn store(capacity: usize) -> Store {
        Store::new([("s", Duration::from_secs(60))], capacity)
    }

    #[test]
    fn sequences_start_at_one_and_reads_resume_without_gaps_or_duplicates() {
        let s = store(100);
        assert_eq!(s.positions(0), (0, 0));
        s.append(0, (0..5).map(rec), 0);
        let b = s.read(0, 1, 3, 0);
        assert_eq!(seqs(&b), [1, 2, 3]);
        assert_eq!(b.gap, None);
        s.append(0, (5..7).map(rec), 0);
        let b2 = s.read(0, b.next, 100, 0);
        assert_eq!(seqs(&b2), [4, 5, 6, 7]);
        assert_eq!(s.read(0, b2.next, 100, 0).records.len(), 0);
        assert_eq!(s.positions(0), (1, 7));
        assert_eq!(s.next_sequence(0), 8);
    }

    #[test]
    fn a_reader_behind_the_capacity_gets_a_gap() {
        let s = store(3);
        s.append(0, (0..10).map(rec), 0);
        assert_eq!(s.positions(0), (8, 10));
        let b = s.read(0, 2, 100, 0);
        assert_eq!(b.gap, Some((2, 7)));
        assert_eq!(seqs(&b), [8, 9, 10]);
        assert_eq!(b.next, 11);
    }

    #[test]
    fn records_older_than_retention_are_purged() {
        let s = store(100);
        s.append(0, (0..2).map(rec), 0);
        s.append(0, (2..3).map(rec), 30_000);
        // At 61 s the first two are older than the 60 s limit; the third is not.
        let b = s.read(0, 1, 100, 61_000);
        assert_eq!(b.gap, Some((1, 2)));
        assert_eq!(seqs(&b), [3]);
        let b = s.read(0, 1, 100, 91_000);
        assert_eq!(seqs(&b), Vec::<u64>::new());
        assert_eq!(b.next, 4);
    }

    #[test]
    fn watchers_see_appends() {
        let s = store(10);
        let mut w = s.watch(0);
        assert!(!w.has_changed().unwrap());
        s.append(0, [rec(1)], 0);
        assert!(w.has_changed().unwrap());
        assert_eq!(*w.borrow_and_update(), 1);
    }
}
