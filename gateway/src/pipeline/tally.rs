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
    /// Aggregated streams: readings counted in a window, late, and left out otherwise.
    pub(super) absorbed: [u64; 3],
    /// The records kept, encoded (see [`crate::store::Bodies`]).
    pub(super) records: Bodies,
}

/// Where an outcome of offering a record to the windows is tallied: counted, late, or left out.
pub(super) fn absorbed_index(a: Absorbed) -> usize {
    match a {
        Absorbed::Counted => 0,
        Absorbed::Late => 1,
        _ => 2,
    }
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
    /// The counters of a stream; for an aggregated one (`aggregated`), those of what it takes in
    /// are not registered (see [`super::windows::WindowCounters`]).
    pub(super) fn new(stream: &str, aggregated: bool) -> Self {
        let s = stream.to_owned();
        // Not even registered for an aggregated stream: a series at 0 is still a series.
        macro_rules! taken_in {
            ($($args:tt)*) => {
                if aggregated { Counter::noop() } else { metrics::counter!($($args)*) }
            };
        }
        Self {
            messages: taken_in!(catalogue::STREAM_MESSAGES, "stream" => s.clone()),
            dropped_decode: metrics::counter!(catalogue::MESSAGES_DROPPED, "stream" => s.clone(), "reason" => "decode"),
            dropped_media: metrics::counter!(catalogue::MESSAGES_DROPPED, "stream" => s.clone(), "reason" => "media"),
            dropped_bad_time: metrics::counter!(catalogue::MESSAGES_DROPPED, "stream" => s.clone(), "reason" => "bad_time"),
            dropped_invariant: metrics::counter!(catalogue::MESSAGES_DROPPED, "stream" => s.clone(), "reason" => "invariant"),
            fields_dropped: taken_in!(catalogue::FIELDS_DROPPED, "stream" => s.clone(), "stage" => "allow_list"),
            identifiers_suppressed: taken_in!(catalogue::IDENTIFIERS_SUPPRESSED, "stream" => s.clone()),
            pseudonymised: taken_in!(catalogue::FIELDS_PSEUDONYMISED, "stream" => s.clone()),
            locations_generalised: taken_in!(catalogue::LOCATIONS_GENERALISED, "stream" => s.clone(), "outcome" => "cell"),
            locations_invalid: taken_in!(catalogue::LOCATIONS_GENERALISED, "stream" => s.clone(), "outcome" => "invalid"),
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
            // What an aggregated stream takes in is never published (see `WindowCounters`):
            // the in-process stats that `hubgate demo` reads have it.
            if self.windows[index].is_some() {
                let s = &self.stats.streams[index];
                let [counted, late, left_out] = tally.absorbed;
                s.readings_aggregated.fetch_add(counted, Ordering::Relaxed);
                s.dropped_late.fetch_add(late, Ordering::Relaxed);
                s.dropped_aggregate.fetch_add(left_out, Ordering::Relaxed);
            }
            let mut records = std::mem::take(&mut tally.records);
            let kept = records.len() as u64;
            if kept > 0 {
                self.store
                    .stage_encoded(&mut self.pending, self.stage_to[index], &records, now_ms);
                records.clear();
            }
            let (c, s) = (&self.counters[index], &self.stats.streams[index]);
            // Messages dropped whole are published for every stream: a reading that passes never
            // moves them.
            for (counter, stat, n) in [
                (&c.dropped_decode, &s.dropped_decode, tally.dropped_decode),
                (&c.dropped_media, &s.dropped_media, tally.dropped_media),
                (
                    &c.dropped_bad_time,
                    &s.dropped_bad_time,
                    tally.dropped_bad_time,
                ),
            ] {
                counter.increment(n);
                stat.fetch_add(n, Ordering::Relaxed);
            }
            c.dropped_invariant.increment(tally.dropped_invariant);
            // The same figures go to the metrics (an aggregated stream's counters of what it
            // takes in are not registered) and to the stats `hubgate demo` reads.
            for (counter, stat, n) in [
                (&c.messages, &s.messages, tally.messages),
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
