//! Records other hubs forward (Push), staged with their de-duplication marks.

use std::sync::atomic::Ordering;

use hubgate_exporters::catalogue;
use hubgate_privacy::chain;
use hubgate_proto::v1;

use super::Pipeline;
use crate::record::{from_proto_value, to_proto_value};
use crate::sources::push::PushJob;

/// De-duplication marks of pushing origins held in memory, at most; the rest are read from their
/// checkpoints in the store when next needed.
pub(super) const MAX_CACHED_PUSH_MARKS: usize = 4096;

impl Pipeline {
    /// Stages the records another gateway forwarded (see [`crate::sources::push`]): those not kept
    /// before, with the fields this gateway's policy admits. Returns the origin sequence to
    /// acknowledge once the turn is committed.
    pub fn accept_push(&mut self, job: &PushJob, now_ms: i64) -> anyhow::Result<u64> {
        let stream = &self.policy.streams()[job.stream];
        let mark_name =
            crate::sources::push::mark_name(&job.origin, &job.incarnation, &stream.name);
        let mark = match self.push_marks.get(&mark_name) {
            Some(mark) => *mark,
            None => self
                .store
                .checkpoint(&mark_name)?
                .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
                .map_or(0, u64::from_be_bytes),
        };
        let (mut last, mut duplicates, mut dropped, mut identifiers) = (mark, 0u64, 0u64, 0u64);
        let mut records = Vec::new();
        for r in &job.records {
            if r.sequence <= last {
                duplicates += 1;
                continue;
            }
            last = r.sequence;
            let fields = r
                .fields
                .iter()
                .filter_map(|(p, v)| Some((p.as_str().into(), from_proto_value(v.clone())?)))
                .collect();
            let admitted = chain::admit_forwarded(stream, fields);
            dropped += u64::from(admitted.fields_dropped);
            identifiers += u64::from(admitted.identifiers_suppressed);
            records.push(v1::Record {
                stream: stream.name.clone(),
                sequence: 0,
                event_time: r.event_time,
                policy_hash: r.policy_hash.clone(),
                fields: admitted
                    .fields
                    .into_iter()
                    .map(|(p, v)| (p.into_string(), to_proto_value(v)))
                    .collect(),
                origin: job.origin.clone(),
                origin_sequence: r.sequence,
            });
        }
        let kept = records.len() as u64;
        if kept > 0 {
            self.store
                .stage(&mut self.pending, job.stream, records, now_ms);
            self.pending
                .checkpoint(mark_name.clone(), last.to_be_bytes().to_vec());
            self.push_marks.insert(mark_name, last);
            self.marks_in_turn = true;
        }
        let name = stream.name.clone();
        metrics::counter!(catalogue::PUSH_RECORDS, "stream" => name.clone(), "outcome" => "kept")
            .increment(kept);
        metrics::counter!(catalogue::PUSH_RECORDS, "stream" => name.clone(), "outcome" => "duplicate")
            .increment(duplicates);
        let c = &self.counters[job.stream];
        c.kept.increment(kept);
        c.identifiers_suppressed.increment(identifiers);
        metrics::counter!(catalogue::FIELDS_DROPPED, "stream" => name, "stage" => "forwarded")
            .increment(dropped);
        let s = &self.stats.streams[job.stream];
        s.records_kept.fetch_add(kept, Ordering::Relaxed);
        s.identifiers_suppressed
            .fetch_add(identifiers, Ordering::Relaxed);
        Ok(last)
    }
}
