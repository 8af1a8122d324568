//! What one batch did per stream, counted as it goes and flushed to the metrics and the shared
//! stats once per batch.

use std::sync::atomic::Ordering;

use hubgate_exporters::catalogue;
use hubgate_privacy::window::Absorbed;
use metrics::Counter;

use super::Pipeline;
use crate::store::Bodies;

/// Per-batch tallies for one stream, flushed to [`StreamStats`] and metrics once per batch.
#[derive(Debug, Default)]
pub(super) struct Tally {
    pub(super) messages: u64,
    pub(super) bytes_in: u64,
    pub(super) dropped_decode: u64,
    pub(super) dropped_media: u64,
    pub(super) dropped_bad_time: u64,
    /// Records that broke the stream's output invariants (see `hubgate_privacy::invariants`).
    pub(super) dropped_invariant: u64,
    pub(super) fields_dropped: u64,
    pub(super) identifiers_suppressed: u64,
    pub(super) pseudonymised: u64,
    pub(super) locations_generalised: u64,
    pub(super) locations_invalid: u64,
    pub(super) bytes_kept: u64,
    pub(super) field_bytes_kept: u64,
    /// Per [`Absorbed`] outcome, indexed by [`absorbed_index`].
    pub(super) absorbed: [u64; ABSORBED.len()],
    /// The records kept, encoded (see [`crate::store::Bodies`]).
    pub(super) records: Bodies,
}

/// Every outcome of offering a record to the windows, with its metric label.
pub(super) const ABSORBED: [(Absorbed, &str); 7] = [
    (Absorbed::Counted, "counted"),
    (Absorbed::Late, "late"),
    (Absorbed::Early, "early"),
    (Absorbed::NoContributor, "no_contributor"),
    (Absorbed::NoGroupKey, "no_group_key"),
    (Absorbed::Bounded, "bounded"),
    (Absorbed::Full, "state_full"),
];

pub(super) fn absorbed_index(a: Absorbed) -> usize {
    ABSORBED.iter().position(|(x, _)| *x == a).unwrap_or(0)
}

#[derive(Debug)]
pub(super) struct StreamCounters {
    pub(super) messages: Counter,
    pub(super) dropped_decode: Counter,
    pub(super) dropped_media: Counter,
    pub(super) dropped_bad_time: Counter,
    pub(super) dropped_invariant: Counter,
    pub(super) fields_dropped: Counter,
    pub(super) identifiers_suppressed: Counter,
    pub(super) pseudonymised: Counter,
    pub(super) locations_generalised: Counter,
    pub(super) locations_invalid: Counter,
    pub(super) kept: Counter,
}

impl StreamCounters {
    pub(super) fn new(stream: &str) -> Self {
        let s = stream.to_owned();
        Self {
            messages: metrics::counter!(catalogue::STREAM_MESSAGES, "stream" => s.clone()),
            dropped_decode: metrics::counter!(catalogue::MESSAGES_DROPPED, "stream" => s.clone(), "reason" => "decode"),
            dropped_media: metrics::counter!(catalogue::MESSAGES_DROPPED, "stream" => s.clone(), "reason" => "media"),
            dropped_bad_time: metrics::counter!(catalogue::MESSAGES_DROPPED, "stream" => s.clone(), "reason" => "bad_time"),
            dropped_invariant: metrics::counter!(catalogue::MESSAGES_DROPPED, "stream" => s.clone(), "reason" => "invariant"),
            fields_dropped: metrics::counter!(catalogue::FIELDS_DROPPED, "stream" => s.clone(), "stage" => "allow_list"),
            identifiers_suppressed: metrics::counter!(catalogue::IDENTIFIERS_SUPPRESSED, "stream" => s.clone()),
            pseudonymised: metrics::counter!(catalogue::FIELDS_PSEUDONYMISED, "stream" => s.clone()),
            locations_generalised: metrics::counter!(catalogue::LOCATIONS_GENERALISED, "stream" => s.clone(), "outcome" => "cell"),
            locations_invalid: metrics::counter!(catalogue::LOCATIONS_GENERALISED, "stream" => s.clone(), "outcome" => "invalid"),
            kept: metrics::counter!(catalogue::RECORDS_KEPT, "stream" => s),
        }
    }
}

impl Pipeline {
    /// Stages each stream's records of the batch and flushes its tallies.
    pub(super) fn flush_tallies(&mut self, now_ms: i64) {
        for (index, tally) in self.tallies.iter_mut().enumerate() {
            if tally.messages == 0 {
                continue;
            }
            if let Some(windows) = &self.windows[index] {
                let s = &self.stats.streams[index];
                for (i, n) in tally.absorbed.iter().enumerate() {
                    windows.counters.absorbed[i].increment(*n);
                }
                let counted = tally.absorbed[absorbed_index(Absorbed::Counted)];
                let late = tally.absorbed[absorbed_index(Absorbed::Late)];
                let all: u64 = tally.absorbed.iter().sum();
                s.readings_aggregated.fetch_add(counted, Ordering::Relaxed);
                s.dropped_late.fetch_add(late, Ordering::Relaxed);
                s.dropped_aggregate
                    .fetch_add(all - counted - late, Ordering::Relaxed);
            }
            let mut records = std::mem::take(&mut tally.records);
            let kept = records.len() as u64;
            if kept > 0 {
                self.store
                    .stage_encoded(&mut self.pending, index, &records, now_ms);
                records.clear();
            }
            let (c, s) = (&self.counters[index], &self.stats.streams[index]);
            // The same figures go to the metrics and to the stats `hubgate demo` reads.
            for (counter, stat, n) in [
                (&c.messages, &s.messages, tally.messages),
                (&c.dropped_decode, &s.dropped_decode, tally.dropped_decode),
                (&c.dropped_media, &s.dropped_media, tally.dropped_media),
                (
                    &c.dropped_bad_time,
                    &s.dropped_bad_time,
                    tally.dropped_bad_time,
                ),
                (&c.fields_dropped, &s.fields_dropped, tally.fields_dropped),
                (
                    &c.identifiers_suppressed,
                    &s.identifiers_suppressed,
                    tally.identifiers_suppressed,
                ),
                (&c.pseudonymised, &s.pseudonymised, tally.pseudonymised),
                (
                    &c.locations_generalised,
                    &s.locations_generalised,
                    tally.locations_generalised,
                ),
                (&c.kept, &s.records_kept, kept),
            ] {
                counter.increment(n);
                stat.fetch_add(n, Ordering::Relaxed);
            }
            c.locations_invalid.increment(tally.locations_invalid);
            c.dropped_invariant.increment(tally.dropped_invariant);
            s.bytes_in.fetch_add(tally.bytes_in, Ordering::Relaxed);
            s.bytes_kept.fetch_add(tally.bytes_kept, Ordering::Relaxed);
            s.field_bytes_kept
                .fetch_add(tally.field_bytes_kept, Ordering::Relaxed);
            *tally = Tally {
                records,
                ..Tally::default()
            };
        }
    }
}
