//! The store of filtered records that gRPC subscribers read from.
//!
//! Design: one ordered log per stream, with sequence numbers starting at 1 and never reused. Every
//! record is in the durable outbox ([`crate::outbox`]); the newest `memory_records_per_stream` of
//! each stream are also held in memory, so live subscribers never touch the disk and a subscriber
//! replaying older records reads them from the outbox.
//!
//! Writing is two-phase: the pipeline stages the records of a turn ([`Store::stage`]), then
//! [`Store::commit`] writes them, with the turn's window checkpoints, in one atomic and durable
//! outbox commit. Only then do they become visible to readers and are the turn's MQTT messages
//! acknowledged. A reader therefore never sees a record that a crash could take back.
//!
//! Appending never waits for readers; each reader keeps its own cursor and is woken through a
//! watch channel when the log grows, so a slow subscriber falls behind without holding anyone else
//! up. A reader whose cursor points before the oldest record still held is told so with a gap.
//!
//! Limits, enforced on disk and in memory:
//! - retention: records are purged (every second, by [`Store::purge_expired_all`]) and no longer
//!   returned by a read, delivered or not, once they are within one data-key period (a 24th of the
//!   retention, at most an hour) of their retention limit: early enough that the key that sealed
//!   them is destroyed before the first record it sealed reaches the limit;
//! - size: the outbox holds at most `store.max_bytes` of records. Beyond that, `drop_oldest`
//!   purges the oldest batches of any stream, a 64th of the cap more than the commit needs (so a
//!   full outbox purges once per 64th of the cap written, not before every commit), and
//!   `stop_acking` refuses the commit ([`CommitError::Full`]) so the pipeline stops taking
//!   messages until retention frees room. The only excess: one turn's records larger than the
//!   whole cap are written to an empty outbox.
//!
//! The outbox seals records under data keys that purges destroy ([`crate::outbox::data_keys`]), so no
//! record is readable on disk past its retention limit either.
//!
//! Each purge and key destruction is an entry of the audit log ([`crate::governance::audit`]: stream, reason,
//! record count, sequence range and time range), never with record content.
//!
//! Metrics: `hubgate_store_records_purged_total{stream, reason}`,
//! `hubgate_outbox_records_damaged_total{stream}`, `hubgate_outbox_bytes`,
//! `hubgate_outbox_keys_destroyed_total{stream}`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use hubgate_exporters::catalogue;
use hubgate_proto::v1;
use metrics::{Counter, Gauge};
use prost::Message as _;
use tokio::sync::watch;

use crate::config::{OnFull, StoreConfig};
use crate::governance::audit::AuditLog;
use crate::outbox::{Append, Commit, Outbox, OutboxError, Purged};
use crate::record::SEQUENCE_FIELD;
use crate::telemetry::clock::now_ms;

/// How often [`Store::purge_expired_all`] runs (see `crate::app::start`).
pub const PURGE_TICK_MS: i64 = 1_000;

/// A record in the store, with when it was kept: the encoded `hubgate.v1.Record`, as the outbox
/// holds it and subscribers receive it. Records are encoded once, when they are staged, and
/// shared from then on: the records staged together are slices of one buffer, and a copy of a
/// `Stored` is a reference to it.
#[derive(Debug, Clone)]
pub struct Stored {
    pub kept_ms: i64,
    pub sequence: u64,
    pub bytes: Bytes,
}

impl Stored {
    /// The record, decoded.
    pub fn record(&self) -> Result<v1::Record, prost::DecodeError> {
        v1::Record::decode(self.bytes.as_ref())
    }
}

/// Records encoded as `hubgate.v1.Record` messages without their sequence (field 2 left at 0, so
/// absent), back to back in one buffer: what the pipeline hands to [`Store::stage_encoded`].
/// Protobuf decoders take fields in any order, so the store appends each sequence.
#[derive(Debug, Default)]
pub struct Bodies {
    buf: Vec<u8>,
    ends: Vec<usize>,
}

impl Bodies {
    /// Appends one record, which `encode` writes.
    pub fn push_with(&mut self, encode: impl FnOnce(&mut Vec<u8>)) {
        encode(&mut self.buf);
        self.ends.push(self.buf.len());
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    pub fn clear(&mut self) {
        self.buf.clear();
        self.ends.clear();
    }

    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts
            .zip(&self.ends)
            .map(|(start, &end)| &self.buf[start..end])
    }
}

/// The result of a read.
#[derive(Debug, Default)]
pub struct Batch {
    /// Sequences `[first, last]` that were asked for but are no longer held.
    pub gap: Option<(u64, u64)>,
    pub records: Vec<Stored>,
    /// Where the next read should start.
    pub next: u64,
}

/// Records staged for the next commit, and the checkpoints to write with them.
#[derive(Debug, Default)]
pub struct Pending {
    commit: Commit,
    /// Per stream index, the staged records in sequence order.
    records: Vec<(usize, Vec<Stored>)>,
}

impl Pending {
    pub fn is_empty(&self) -> bool {
        self.commit.is_empty()
    }

    /// Bytes of the records staged.
    pub fn record_bytes(&self) -> u64 {
        self.commit.record_bytes()
    }

    /// Adds a checkpoint to the commit, replacing one staged earlier under the same name.
    pub fn checkpoint(&mut self, name: String, bytes: Vec<u8>) {
        self.commit.checkpoints.retain(|(n, _)| *n != name);
        self.commit.checkpoints.push((name, bytes));
    }
}

/// Why a commit did not happen. The pending records stay staged; the commit can be retried.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error(
        "the outbox is full ({held} of {max} bytes held) and store.on_full is stop_acking: waiting for retention to free room"
    )]
    Full { held: u64, max: u64 },
    #[error(transparent)]
    Outbox(#[from] OutboxError),
}

/// The in-memory tail of a stream.
#[derive(Debug)]
struct Tail {
    records: VecDeque<Stored>,
    /// The encoded bytes of `records`.
    bytes: usize,
    /// Sequence of the next record committed: everything below is in the outbox.
    next: u64,
}

/// Encoded record bytes a stream's tail holds in memory at most (besides its newest record),
/// whatever `store.memory_records_per_stream` allows: large records are read from the outbox.
const TAIL_BYTES: usize = 1 << 20;

impl Tail {
    fn pop_front(&mut self) {
        if let Some(r) = self.records.pop_front() {
            self.bytes -= r.bytes.len();
        }
    }

    /// Adds committed records, then lets the oldest go beyond `max_records` or [`TAIL_BYTES`].
    fn extend(&mut self, records: Vec<Stored>, max_records: usize) {
        self.bytes += records.iter().map(|r| r.bytes.len()).sum::<usize>();
        self.records.extend(records);
        while self.records.len() > max_records
            || (self.bytes > TAIL_BYTES && self.records.len() > 1)
        {
            self.pop_front();
        }
    }
}

#[derive(Debug)]
struct StreamLog {
    name: String,
    tail: Mutex<Tail>,
    /// Sequence the next staged record gets (only the pipeline stages).
    staged: AtomicU64,
    retention_ms: i64,
    /// How long one data key of the stream seals.
    key_period: Duration,
    /// Sequence of the newest committed record (0 before the first).
    tip: watch::Sender<u64>,
    /// A hold log: its records up to this sequence have been released, and are purged.
    released: AtomicU64,
    purged_retention: Counter,
    purged_capacity: Counter,
    damaged: Counter,
    /// Ranges of sequences known to be damaged (found at start, or by a read), counted once.
    known_damage: Mutex<Vec<(u64, u64)>>,
    keys_destroyed: Counter,
}

/// The outbox name of a stream's hold log. A control character keeps it apart from every
/// stream name a policy can declare.
fn hold_name(stream: &str) -> String {
    format!("\u{2}hold/{stream}")
}

impl StreamLog {
    /// The log of stream `name`, from the sequence its last run reached: the engine's, or the
    /// one noted apart from the data when that is higher (the newest data was damaged: its
    /// records are lost, which is logged, counted and audited, and readers get a Gap).
    fn open(
        outbox: &dyn Outbox,
        name: &str,
        retention: Duration,
        audit: &AuditLog,
    ) -> Result<Self, OutboxError> {
        let stored = outbox.next_sequence(name)?;
        let next = match outbox.high_water().next(name) {
            Some(noted) if noted > stored => {
                tracing::error!(
                    stream = name,
                    first = stored,
                    last = noted - 1,
                    "the outbox's newest records of the stream are damaged or missing: they are lost, and numbering goes on after them"
                );
                metrics::counter!(catalogue::OUTBOX_RECORDS_DAMAGED, "stream" => name.to_owned())
                    .increment(noted - stored);
                audit.record(
                    now_ms(),
                    "outbox_records_lost",
                    serde_json::json!({
                        "stream": name,
                        "first_sequence": stored,
                        "last_sequence": noted - 1,
                        "reason": "damaged or missing newest data",
                    }),
                );
                noted
            }
            _ => stored,
        };
        let counter = |reason: &'static str| metrics::counter!(catalogue::RECORDS_PURGED, "stream" => name.to_owned(), "reason" => reason);
        Ok(StreamLog {
            name: name.to_owned(),
            tail: Mutex::new(Tail {
                records: VecDeque::new(),
                bytes: 0,
                next,
            }),
            staged: AtomicU64::new(next),
            retention_ms: i64::try_from(retention.as_millis()).unwrap_or(i64::MAX),
            key_period: crate::outbox::data_keys::rotation(retention),
            tip: watch::channel(next - 1).0,
            released: AtomicU64::new(0),
            purged_retention: counter("retention"),
            purged_capacity: counter("capacity"),
            damaged: metrics::counter!(catalogue::OUTBOX_RECORDS_DAMAGED, "stream" => name.to_owned()),
            known_damage: Mutex::new(Vec::new()),
            keys_destroyed: metrics::counter!(catalogue::OUTBOX_KEYS_DESTROYED, "stream" => name.to_owned()),
        })
    }

    fn tail(&self) -> std::sync::MutexGuard<'_, Tail> {
        self.tail.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Notes damaged sequences `first..=last`; returns how many were not known damaged before
    /// (what to count).
    fn note_damage(&self, first: u64, last: u64) -> u64 {
        let mut known = self
            .known_damage
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        newly_damaged(&mut known, first, last)
    }

    /// Records kept before this are purged: one key period and one purge tick (1 s) before their
    /// retention ends, but never more than half the retention early.
    fn cutoff(&self, now_ms: i64) -> i64 {
        let period = i64::try_from(self.key_period.as_millis()).unwrap_or(0);
        let early = (period + PURGE_TICK_MS).min(self.retention_ms / 2);
        now_ms.saturating_sub(self.retention_ms.saturating_sub(early))
    }

    /// Drops from memory what the outbox no longer holds, and what has expired.
    fn forget(&self, purged_through: u64, now_ms: i64) {
        let cutoff = self.cutoff(now_ms);
        let mut tail = self.tail();
        while tail
            .records
            .front()
            .is_some_and(|r| r.sequence <= purged_through || r.kept_ms < cutoff)
        {
            tail.pop_front();
        }
    }
}

/// Notes damaged sequences `first..=last` among those `known` damaged; returns how many were not
/// known before.
fn newly_damaged(known: &mut Vec<(u64, u64)>, first: u64, last: u64) -> u64 {
    let mut covered = 0;
    let mut from = first;
    known.sort_unstable();
    for &(a, b) in known.iter() {
        let (lo, hi) = (a.max(from), b.min(last));
        if lo > hi {
            continue;
        }
        covered += hi - lo + 1;
        from = hi.saturating_add(1);
    }
    let new = (last - first + 1) - covered;
    if new > 0 {
        known.push((first, last));
    }
    new
}

/// Per-stream logs of filtered records. Streams are addressed by their index in the policy; the
/// hold logs of held streams come after them (see [`Store::hold_of`]).
pub struct Store {
    outbox: Arc<dyn Outbox>,
    audit: Arc<AuditLog>,
    purge_lock: Mutex<()>,
    streams: Vec<StreamLog>,
    /// Per stream in the policy, the index of its hold log, if it has one.
    holds: Vec<Option<usize>>,
    max_bytes: u64,
    on_full: OnFull,
    memory_records: usize,
    bytes_held: Gauge,
    bytes_written: Counter,
    commits: Counter,
    /// Why commits are failing now (`None` while they succeed), for `/readyz`.
    failing: watch::Sender<Option<String>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("streams", &self.streams)
            .field("max_bytes", &self.max_bytes)
            .field("on_full", &self.on_full)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// A store for streams with these names and retention limits, on `outbox`. Each stream
    /// continues from the sequence its last run reached.
    pub fn open<'a>(
        outbox: Arc<dyn Outbox>,
        streams: impl IntoIterator<Item = (&'a str, Duration)>,
        config: &StoreConfig,
        audit: Arc<AuditLog>,
    ) -> Result<Self, OutboxError> {
        Self::open_holding(outbox, streams, &[], config, audit)
    }

    /// [`Store::open`], with a hold log for each stream of `held` (by index): records the
    /// pipeline keeps there until their release (see [`Store::hold_of`]). A stream that is no
    /// longer held keeps its hold log until what it holds has been released.
    pub fn open_holding<'a>(
        outbox: Arc<dyn Outbox>,
        streams: impl IntoIterator<Item = (&'a str, Duration)>,
        held: &[usize],
        config: &StoreConfig,
        audit: Arc<AuditLog>,
    ) -> Result<Self, OutboxError> {
        let mut logs = Vec::new();
        let mut retentions = Vec::new();
        for (name, retention) in streams {
            logs.push(StreamLog::open(&*outbox, name, retention, &audit)?);
            retentions.push(retention);
        }
        let stored = outbox.streams()?;
        let mut holds = vec![None; logs.len()];
        for (index, hold) in holds.iter_mut().enumerate() {
            let name = hold_name(&logs[index].name);
            if held.contains(&index) || stored.contains(&name) {
                *hold = Some(logs.len());
                logs.push(StreamLog::open(&*outbox, &name, retentions[index], &audit)?);
            }
        }
        let store = Self {
            outbox,
            audit,
            purge_lock: Mutex::new(()),
            streams: logs,
            holds,
            max_bytes: config.max_bytes,
            on_full: config.on_full,
            memory_records: config.memory_records_per_stream.max(1),
            bytes_held: metrics::gauge!(catalogue::OUTBOX_BYTES),
            bytes_written: metrics::counter!(catalogue::OUTBOX_WRITTEN_BYTES),
            commits: metrics::counter!(catalogue::OUTBOX_COMMITS),
            failing: watch::channel(None).0,
        };
        store.bytes_held.set(store.outbox.record_bytes() as f64);
        store.report_damage()?;
        // Keys left by a crash, or by purges that stopped short of destroying them.
        for s in &store.streams {
            let swept = store.outbox.purge_while(&s.name, &mut |_| false)?;
            store.purged(s, "retention", &swept, now_ms());
        }
        // A stream the policy no longer declares has no retention left: all of it goes.
        for name in store.outbox.streams()? {
            if store.streams.iter().any(|s| s.name == name) {
                continue;
            }
            let purged = store.outbox.purge_while(&name, &mut |_| true)?;
            tracing::warn!(stream = %name, records = purged.records, "records of a stream the policy no longer declares are purged");
            store.audit.record(
                now_ms(),
                "purge",
                serde_json::json!({
                    "stream": name,
                    "reason": "stream_removed",
                    "records": purged.records,
                    "first_sequence": purged.sequences.map(|s| s.0),
                    "last_sequence": purged.sequences.map(|s| s.1),
                    "keys_destroyed": purged.keys_destroyed.len(),
                }),
            );
        }
        Ok(store)
    }

    /// Reports the damage the outbox finds at start: in its files as it opened them, and in every
    /// stream's batches (a checksum that fails, sequences no batch holds). Each is logged with the
    /// file, where it is and what it held, counted, and audited; readers get a Gap for it.
    fn report_damage(&self) -> Result<(), OutboxError> {
        for finding in self.outbox.findings() {
            tracing::error!(file = %finding.file, at = %finding.at, "outbox damage found at start: {}", finding.what);
            self.audit.record(
                now_ms(),
                "outbox_damage_found",
                serde_json::json!({ "file": finding.file, "at": finding.at, "what": finding.what }),
            );
        }
        let file = self.outbox.data_file();
        for s in &self.streams {
            for damage in self.outbox.survey(&s.name, false)?.damaged {
                let records = s.note_damage(damage.first, damage.last);
                s.damaged.increment(records);
                tracing::error!(
                    file,
                    stream = %s.name,
                    first = damage.first,
                    last = damage.last,
                    "outbox damage found at start: {}; these records are lost, and readers get a Gap",
                    damage.why
                );
                self.audit.record(
                    now_ms(),
                    "outbox_records_lost",
                    serde_json::json!({
                        "stream": s.name,
                        "file": file,
                        "first_sequence": damage.first,
                        "last_sequence": damage.last,
                        "reason": damage.why,
                    }),
                );
            }
        }
        Ok(())
    }

    /// The hold log of stream `index`, if it has one: where the pipeline keeps the stream's
    /// records until their release. A hold log is read and written like a stream (by its
    /// index), but no reader outside the pipeline ever sees it.
    pub fn hold_of(&self, index: usize) -> Option<usize> {
        self.holds.get(index).copied().flatten()
    }

    /// The records of hold log `hold` up to `through` have been released (durably): they are
    /// purged from it on the next purge tick.
    pub fn released(&self, hold: usize, through: u64) {
        self.stream(hold)
            .released
            .fetch_max(through, Ordering::Relaxed);
    }

    /// The most bytes of records the outbox holds (`store.max_bytes`).
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    fn stream(&self, index: usize) -> &StreamLog {
        &self.streams[index]
    }

    /// Stages records for the next commit, assigning their sequence numbers.
    pub fn stage(
        &self,
        pending: &mut Pending,
        index: usize,
        records: impl IntoIterator<Item = v1::Record>,
        now_ms: i64,
    ) {
        let mut bodies = Bodies::default();
        for mut record in records {
            record.sequence = 0;
            bodies.push_with(|buf| record.encode_raw(buf));
        }
        self.stage_encoded(pending, index, &bodies, now_ms);
    }

    /// Stages records given encoded without their sequence (see [`Bodies`]) for the next commit:
    /// each gets its sequence number written after it (the last value of a field is the one a
    /// decoder keeps).
    pub fn stage_encoded(&self, pending: &mut Pending, index: usize, bodies: &Bodies, now_ms: i64) {
        use prost::encoding::{WireType, encode_key, encode_varint};
        let s = self.stream(index);
        let first = s.staged.load(Ordering::Relaxed);
        // Every record with its sequence appended, back to back in one buffer.
        let mut buf = Vec::with_capacity(bodies.buf.len() + bodies.len() * 11);
        let mut ends = Vec::with_capacity(bodies.len());
        for (i, body) in bodies.iter().enumerate() {
            buf.extend_from_slice(body);
            encode_key(SEQUENCE_FIELD, WireType::Varint, &mut buf);
            encode_varint(first + i as u64, &mut buf);
            ends.push(buf.len());
        }
        let buf = Bytes::from(buf);
        let mut encoded = Vec::with_capacity(ends.len());
        let mut stored = Vec::with_capacity(ends.len());
        let mut start = 0;
        for (i, end) in ends.into_iter().enumerate() {
            let bytes = buf.slice(start..end);
            start = end;
            encoded.push(bytes.clone());
            stored.push(Stored {
                kept_ms: now_ms,
                sequence: first + i as u64,
                bytes,
            });
        }
        if stored.is_empty() {
            return;
        }
        s.staged.fetch_add(stored.len() as u64, Ordering::Relaxed);
        pending.commit.appends.push(Append {
            stream: s.name.clone(),
            first,
            kept_ms: now_ms,
            key_period: s.key_period,
            records: encoded,
        });
        pending.records.push((index, stored));
    }

    /// Writes the staged records and checkpoints durably, then shows the records to readers.
    ///
    /// On an error nothing is written and `pending` is left as it was, to be retried.
    pub fn commit(&self, pending: &mut Pending, now_ms: i64) -> Result<(), CommitError> {
        if pending.is_empty() {
            return Ok(());
        }
        let need = pending.commit.record_bytes();
        let held = self.outbox.record_bytes();
        // A turn larger than the whole cap is written into an empty outbox rather than never.
        if held > 0 && held + need > self.max_bytes {
            match self.on_full {
                OnFull::StopAcking => {
                    return Err(CommitError::Full {
                        held,
                        max: self.max_bytes,
                    });
                }
                OnFull::DropOldest => self.make_room(need, now_ms)?,
            }
        }
        self.outbox.commit(&pending.commit)?;
        self.bytes_held.set(self.outbox.record_bytes() as f64);
        self.bytes_written.increment(need);
        self.commits.increment(1);
        crate::telemetry::stats::TRAFFIC
            .outbox_written
            .fetch_add(need, Ordering::Relaxed);
        // Before any record is shown, its stream's next sequence is noted apart from the data:
        // damage to the newest data can then never make a number be handed out twice.
        let marks = pending.records.iter().filter_map(|(index, records)| {
            let last = records.last()?;
            Some((self.stream(*index).name.clone(), last.sequence + 1))
        });
        if let Err(err) = self.outbox.high_water().note(marks) {
            tracing::error!(%err, "cannot note the streams' next sequences apart from the outbox");
        }
        for (index, records) in std::mem::take(&mut pending.records) {
            let s = self.stream(index);
            let mut tail = s.tail();
            if let Some(last) = records.last() {
                tail.next = last.sequence + 1;
            }
            tail.extend(records, self.memory_records);
            let tip = tail.next - 1;
            drop(tail);
            s.tip.send_replace(tip);
        }
        pending.commit = Commit::default();
        Ok(())
    }

    /// Makes room for `need` more bytes by purging the oldest batches of any stream, down to a
    /// 64th of the cap below what `need` requires: a full outbox then purges once per 64th of the
    /// cap written, in a few transactions, rather than before every commit.
    fn make_room(&self, need: u64, now_ms: i64) -> Result<(), OutboxError> {
        let _one_purge_at_a_time = self.purging();
        let target = (self.max_bytes - self.max_bytes / 64).saturating_sub(need);
        loop {
            let held = self.outbox.record_bytes();
            if held <= target {
                return Ok(());
            }
            let want = held - target;
            let mut oldest = Vec::new();
            for (index, s) in self.streams.iter().enumerate() {
                if let Some(batch) = self.outbox.oldest(&s.name)? {
                    oldest.push((batch.kept_ms, index));
                }
            }
            oldest.sort_unstable();
            let Some(&(first_kept, _)) = oldest.first() else {
                return Ok(());
            };
            // Taking the bytes held as kept evenly from the oldest batch until now, the batches
            // kept until `cutoff` hold about `want` bytes. Each stream in turn, oldest first,
            // loses its batches kept until then, until `want` bytes are freed; what is still
            // missing (records were not kept evenly) is found in the next round.
            let span = now_ms.saturating_sub(first_kept).max(0) as u128;
            let cutoff = first_kept.saturating_add((span * want as u128 / held as u128) as i64);
            let mut freed = 0;
            for (kept, index) in oldest {
                // In order of their oldest batch: the streams after one kept past `cutoff` have
                // nothing to lose in this round.
                if freed >= want || kept > cutoff {
                    break;
                }
                let s = self.stream(index);
                let purged = self.outbox.purge_while(&s.name, &mut |b| {
                    let purge = freed < want && b.kept_ms <= cutoff;
                    freed += if purge { b.bytes } else { 0 };
                    purge
                })?;
                s.purged_capacity.increment(purged.records);
                self.purged(s, "capacity", &purged, now_ms);
            }
            if freed == 0 {
                return Ok(());
            }
        }
    }

    /// Held during each purge: the retention task and a full outbox's `drop_oldest` must not both
    /// purge the same batch.
    fn purging(&self) -> std::sync::MutexGuard<'_, ()> {
        self.purge_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Accounts for a purge: memory, gauge and audit event.
    fn purged(&self, s: &StreamLog, reason: &str, purged: &Purged, now_ms: i64) {
        if let Some((first, last)) = purged.sequences {
            self.purge_recorded(s, reason, purged, first, last, now_ms);
        }
        for first in &purged.keys_destroyed {
            s.keys_destroyed.increment(1);
            self.audit.record(
                now_ms,
                "outbox_key_destroyed",
                serde_json::json!({ "stream": s.name, "first_sequence": first }),
            );
        }
    }

    fn purge_recorded(
        &self,
        s: &StreamLog,
        reason: &str,
        purged: &Purged,
        first: u64,
        last: u64,
        now_ms: i64,
    ) {
        s.forget(last, now_ms);
        self.bytes_held.set(self.outbox.record_bytes() as f64);
        let (oldest_ms, newest_ms) = purged.kept_ms.unwrap_or_default();
        tracing::info!(stream = %s.name, reason, records = purged.records, "records purged");
        self.audit.record(
            now_ms,
            "purge",
            serde_json::json!({
                "stream": s.name,
                "reason": reason,
                "records": purged.records,
                "first_sequence": first,
                "last_sequence": last,
                "kept_from_ms": oldest_ms,
                "kept_to_ms": newest_ms,
            }),
        );
    }

    /// Removes every record older than its stream's retention limit, and what hold logs have
    /// released, from disk and memory.
    pub fn purge_expired_all(&self, now_ms: i64) {
        for s in &self.streams {
            let _one_purge_at_a_time = self.purging();
            let cutoff = s.cutoff(now_ms);
            self.purge_released(s, now_ms);
            match self
                .outbox
                .purge_while(&s.name, &mut |b| b.kept_ms < cutoff)
            {
                Ok(purged) => {
                    s.purged_retention.increment(purged.records);
                    self.purged(s, "retention", &purged, now_ms);
                }
                Err(err) => {
                    tracing::error!(stream = %s.name, %err, "cannot purge expired records");
                }
            }
            s.forget(0, now_ms);
        }
    }

    /// Removes from a hold log the batches it has released whole. Not a purge of records (they
    /// live on in their stream), so not audited as one; the data keys it destroys are.
    fn purge_released(&self, s: &StreamLog, now_ms: i64) {
        let released = s.released.load(Ordering::Relaxed);
        if released == 0 {
            return;
        }
        let purge = &mut |b: &crate::outbox::BatchInfo| b.first + b.count.max(1) - 1 <= released;
        match self.outbox.purge_while(&s.name, purge) {
            Ok(purged) => {
                s.forget(released, now_ms);
                self.bytes_held.set(self.outbox.record_bytes() as f64);
                for first in &purged.keys_destroyed {
                    s.keys_destroyed.increment(1);
                    self.audit.record(
                        now_ms,
                        "outbox_key_destroyed",
                        serde_json::json!({ "stream": s.name, "first_sequence": first }),
                    );
                }
            }
            Err(err) => tracing::error!(stream = %s.name, %err, "cannot purge released records"),
        }
    }

    /// Whether a read from `from` must go to the disk (it is before the records held in memory).
    pub fn reads_disk(&self, index: usize, from: u64) -> bool {
        let tail = self.stream(index).tail();
        from < tail.next && tail.records.front().is_none_or(|r| from < r.sequence)
    }

    /// Reads up to `max` consecutive records of a stream from sequence `from` on. Reads from disk
    /// when `from` is older than the records held in memory (see [`Store::reads_disk`]).
    pub fn read(&self, index: usize, from: u64, max: usize, now_ms: i64) -> Batch {
        let s = self.stream(index);
        let from = from.max(1);
        let cutoff = s.cutoff(now_ms);
        let memory_oldest = {
            let tail = s.tail();
            if from >= tail.next {
                return Batch {
                    next: from,
                    ..Batch::default()
                };
            }
            match tail.records.front() {
                Some(front) if front.sequence <= from => {
                    let skip = usize::try_from(from - front.sequence).unwrap_or(usize::MAX);
                    let mut fresh = Fresh::new(cutoff, max);
                    for r in tail.records.iter().skip(skip) {
                        if !fresh.offer(r.sequence, r.kept_ms, || Some(r.clone())) {
                            break;
                        }
                    }
                    return fresh.batch(from, tail.next);
                }
                Some(front) => front.sequence,
                None => tail.next,
            }
        };
        let read = match self.outbox.read(&s.name, from, max) {
            Ok(read) => read,
            Err(err) => {
                tracing::error!(stream = %s.name, %err, "cannot read the outbox");
                return Batch {
                    next: from,
                    ..Batch::default()
                };
            }
        };
        for &(first, last) in &read.damaged {
            let new = s.note_damage(first, last);
            if new > 0 {
                tracing::error!(stream = %s.name, first, last, "damaged outbox batch: its records are lost");
                s.damaged.increment(new);
            }
        }
        let mut fresh = Fresh::new(cutoff, max);
        for r in read.records {
            // Batches are authenticated, so a record that does not decode was written damaged.
            let decoded = || match v1::Record::decode(r.bytes.as_slice()) {
                Ok(record) if record.sequence == r.sequence => Some(Stored {
                    kept_ms: r.kept_ms,
                    sequence: r.sequence,
                    bytes: Bytes::from(r.bytes),
                }),
                _ => {
                    s.damaged.increment(1);
                    None
                }
            };
            if !fresh.offer(r.sequence, r.kept_ms, decoded) {
                break;
            }
        }
        fresh.batch(from, memory_oldest)
    }

    /// [`Store::read`] from an async task: on a blocking thread when it goes to the disk. `None`
    /// when the runtime is shutting down.
    pub async fn read_async(
        self: &Arc<Self>,
        index: usize,
        from: u64,
        max: usize,
    ) -> Option<Batch> {
        if self.reads_disk(index, from) {
            let store = Arc::clone(self);
            tokio::task::spawn_blocking(move || store.read(index, from, max, now_ms()))
                .await
                .ok()
        } else {
            Some(self.read(index, from, max, now_ms()))
        }
    }

    /// Commits are failing (a full disk, an I/O error): `/readyz` says so with `reason`, the gauge
    /// `hubgate_outbox_failing` is 1, and the start of the episode is audited.
    pub fn commits_failing(&self, reason: &str) {
        let started = self.failing.send_if_modified(|now| {
            let first = now.is_none();
            *now = Some(reason.to_owned());
            first
        });
        if started {
            metrics::gauge!(catalogue::OUTBOX_FAILING).set(1.0);
            self.audit.record(
                now_ms(),
                "outbox_commits_failing",
                serde_json::json!({ "reason": reason }),
            );
        }
    }

    /// Commits succeed again after `failures` failed attempts since `since_ms`: the episode
    /// ends, and is audited.
    pub fn commits_recovered(&self, failures: u32, since_ms: i64) {
        if self.failing.send_replace(None).is_some() {
            metrics::gauge!(catalogue::OUTBOX_FAILING).set(0.0);
            self.audit.record(
                now_ms(),
                "outbox_commits_recovered",
                serde_json::json!({ "failed_attempts": failures, "since_ms": since_ms }),
            );
        }
    }

    /// Why commits are failing now, if they are (see [`Store::commits_failing`]).
    pub fn failing(&self) -> watch::Receiver<Option<String>> {
        self.failing.subscribe()
    }

    /// Stores a named checkpoint on its own, durably (for state outside the pipeline's turns).
    pub fn save_checkpoint(&self, name: &str, bytes: Vec<u8>) -> Result<(), OutboxError> {
        self.outbox.commit(&Commit {
            appends: Vec::new(),
            checkpoints: vec![(name.to_owned(), bytes)],
        })
    }

    /// `(oldest held, newest kept)` sequences of a stream; 0 where there is none.
    pub fn positions(&self, index: usize) -> (u64, u64) {
        let s = self.stream(index);
        let last = s.tail().next - 1;
        let oldest = match self.outbox.oldest(&s.name) {
            Ok(Some(batch)) => batch.first,
            _ => s.tail().records.front().map_or(0, |r| r.sequence),
        };
        (oldest, last)
    }

    /// Sequence the next record of a stream will get: where a live reader starts.
    pub fn next_sequence(&self, index: usize) -> u64 {
        self.stream(index).tail().next
    }

    /// A receiver that changes whenever the stream grows.
    pub fn watch(&self, index: usize) -> watch::Receiver<u64> {
        self.stream(index).tip.subscribe()
    }

    /// The last checkpoint committed under `name`.
    pub fn checkpoint(&self, name: &str) -> Result<Option<Vec<u8>>, OutboxError> {
        self.outbox.checkpoint(name)
    }
}

/// Collects the consecutive records a read returns: records gone at the front (expired, or
/// unreadable) are skipped and become the gap; the first one gone after a record kept, or a hole
/// in the sequence, ends the batch, as does `max`.
struct Fresh {
    cutoff: i64,
    max: usize,
    records: Vec<Stored>,
    /// The last sequence skipped at the front.
    skipped_to: Option<u64>,
}

impl Fresh {
    fn new(cutoff: i64, max: usize) -> Self {
        Self {
            cutoff,
            max,
            records: Vec::new(),
            skipped_to: None,
        }
    }

    /// Offers the next record; returns false when the batch is complete.
    fn offer(
        &mut self,
        sequence: u64,
        kept_ms: i64,
        record: impl FnOnce() -> Option<Stored>,
    ) -> bool {
        if self.records.len() >= self.max
            || self
                .records
                .last()
                .is_some_and(|l| l.sequence + 1 != sequence)
        {
            return false;
        }
        let record = if kept_ms < self.cutoff {
            None
        } else {
            record()
        };
        match record {
            Some(record) => self.records.push(record),
            None if self.records.is_empty() => self.skipped_to = Some(sequence),
            None => return false,
        }
        true
    }

    /// The batch for a read from `from`; when nothing at all was offered, everything before
    /// `resume` is gone.
    fn batch(self, from: u64, resume: u64) -> Batch {
        let (start, next) = match (self.records.first(), self.records.last(), self.skipped_to) {
            (Some(first), Some(last), _) => (first.sequence, last.sequence + 1),
            (_, _, Some(skipped)) => (skipped + 1, skipped + 1),
            _ => (resume, resume),
        };
        Batch {
            gap: (start > from).then(|| (from, start - 1)),
            records: self.records,
            next,
        }
    }
}

#[cfg(test)]
mod tests;
