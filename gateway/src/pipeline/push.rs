//! Records other hubs forward (Push): admitted under this hub's policy, de-duplicated, and
//! staged with their de-duplication marks.

use std::sync::atomic::Ordering;

use hubgate_exporters::catalogue;
use hubgate_privacy::forwarded::{self, Admitted};
use hubgate_privacy::invariants::{self, Violation};
use hubgate_privacy::{Record, StreamPolicy};
use hubgate_proto::v1;
use tonic::Status;

use super::Pipeline;
use crate::record::{from_proto_value, to_proto_value};
use crate::sources::push::{Marks, PushJob};

/// De-duplication marks of pushing origins held in memory, at most; the rest are read from their
/// checkpoints in the store when next needed.
pub(super) const MAX_CACHED_PUSH_MARKS: usize = 4096;

/// Why forwarded records were not kept.
#[derive(Debug)]
pub enum PushRefused {
    /// A record cannot be admitted under this hub's policy: the request is refused whole.
    Invalid(Status),
    /// The store could not be read.
    Store(anyhow::Error),
}

/// What a request's new records came to: each admitted record, and the counts.
#[derive(Debug, Default)]
struct Intake {
    records: Vec<v1::Record>,
    dropped: u64,
    identifiers: u64,
    pseudonymised: u64,
}

impl Pipeline {
    /// Stages the records another gateway forwarded (see [`crate::sources::push`]): those not
    /// kept before, admitted under this gateway's policy. Returns the origin sequence to
    /// acknowledge once the turn is committed. A request with a record that cannot be admitted
    /// is refused whole, and nothing of it is staged.
    pub fn accept_push(&mut self, job: &PushJob, now_ms: i64) -> Result<u64, PushRefused> {
        let stream = &self.policy.streams()[job.stream];
        let marks_name = crate::sources::push::marks_name(&job.origin, &stream.name);
        let mut marks = match self.push_marks.get(&marks_name) {
            Some(marks) => marks.clone(),
            None => self
                .store
                .checkpoint(&marks_name)
                .map_err(|e| PushRefused::Store(e.into()))?
                .map(|b| Marks::decode(&b))
                .unwrap_or_default(),
        };
        let mark = match marks.get(&job.incarnation) {
            Some(mark) => mark,
            None => self
                .store
                .checkpoint(&crate::sources::push::legacy_mark_name(
                    &job.origin,
                    &job.incarnation,
                    &stream.name,
                ))
                .map_err(|e| PushRefused::Store(e.into()))?
                .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
                .map_or(0, u64::from_be_bytes),
        };
        let fresh: Vec<&v1::Record> = job.records.iter().filter(|r| r.sequence > mark).collect();
        let duplicates = (job.records.len() - fresh.len()) as u64;
        let name = stream.name.clone();
        let intake = match self.admit_all(job, &fresh, now_ms) {
            Ok(intake) => intake,
            Err(status) => {
                metrics::counter!(catalogue::PUSH_RECORDS, "stream" => name, "outcome" => "refused")
                    .increment(fresh.len() as u64);
                return Err(PushRefused::Invalid(status));
            }
        };
        let last = fresh.last().map_or(mark, |r| r.sequence);
        let kept = intake.records.len() as u64;
        if kept > 0 {
            self.store.stage(
                &mut self.pending,
                self.stage_to[job.stream],
                intake.records,
                now_ms,
            );
            marks.set(&job.incarnation, last);
            self.pending.checkpoint(marks_name.clone(), marks.encode());
            self.push_marks.insert(marks_name, marks);
            self.marks_in_turn = true;
        }
        metrics::counter!(catalogue::PUSH_RECORDS, "stream" => name.clone(), "outcome" => "kept")
            .increment(kept);
        metrics::counter!(catalogue::PUSH_RECORDS, "stream" => name.clone(), "outcome" => "duplicate")
            .increment(duplicates);
        let c = &self.counters[job.stream];
        c.kept.increment(kept);
        c.identifiers_suppressed.increment(intake.identifiers);
        c.pseudonymised.increment(intake.pseudonymised);
        metrics::counter!(catalogue::FIELDS_DROPPED, "stream" => name, "stage" => "forwarded")
            .increment(intake.dropped);
        let s = &self.stats.streams[job.stream];
        s.records_kept.fetch_add(kept, Ordering::Relaxed);
        s.identifiers_suppressed
            .fetch_add(intake.identifiers, Ordering::Relaxed);
        Ok(last)
    }

    /// Admits each of `records` under the stream's policy with this hub's current key, or says
    /// which record and field cannot be.
    fn admit_all(
        &mut self,
        job: &PushJob,
        records: &[&v1::Record],
        now_ms: i64,
    ) -> Result<Intake, Status> {
        let stream: &StreamPolicy = &self.policy.streams()[job.stream];
        let own = self.policy_hash.as_str();
        let key = self.keys.key(job.stream, now_ms);
        let mut intake = Intake::default();
        for r in records {
            let refused = |v: Violation| {
                Status::invalid_argument(format!(
                    "record {} of stream '{}' is refused: {v}",
                    r.sequence, stream.name
                ))
            };
            invariants::check_policy_hash(&r.policy_hash, |h| {
                h == own || job.announced.contains(h)
            })
            .map_err(refused)?;
            let Admitted {
                record,
                fields_dropped,
                identifiers_suppressed,
                pseudonymised,
            } = forwarded::admit(stream, as_record(r), key, now_ms).map_err(refused)?;
            intake.dropped += u64::from(fields_dropped);
            intake.identifiers += u64::from(identifiers_suppressed);
            intake.pseudonymised += u64::from(pseudonymised);
            intake.records.push(v1::Record {
                stream: stream.name.clone(),
                sequence: 0,
                event_time: Some(crate::record::event_time(record.event_time_ms)),
                policy_hash: r.policy_hash.clone(),
                fields: record
                    .fields
                    .into_iter()
                    .map(|(p, v)| (p.into_string(), to_proto_value(v)))
                    .collect(),
                origin: job.origin.clone(),
                origin_sequence: r.sequence,
            });
        }
        Ok(intake)
    }
}

/// A forwarded record as the privacy crate takes it. A value without a kind is left out; a
/// record without an event time gets an impossible one, which the admission refuses.
fn as_record(r: &v1::Record) -> Record {
    let event_time_ms = r
        .event_time
        .and_then(|t| {
            let nanos = u32::try_from(t.nanos).ok().filter(|n| *n < 1_000_000_000)?;
            t.seconds
                .checked_mul(1000)?
                .checked_add(i64::from(nanos / 1_000_000))
        })
        .unwrap_or(-1);
    Record {
        event_time_ms,
        fields: r
            .fields
            .iter()
            .filter_map(|(p, v)| Some((p.as_str().into(), from_proto_value(v.clone())?)))
            .collect(),
    }
}
