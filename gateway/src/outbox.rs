//! The durable outbox: per-stream ordered logs of filtered records, on disk.
//!
//! Only filtered records (encoded `hubgate.v1.Record` messages) and window checkpoints ever enter
//! it, never a raw payload. The store behind it is swappable through the narrow [`Outbox`] trait;
//! [`SledOutbox`] implements it on sled.
//!
//! Layout: records are written in batches, one key per batch (a key per record costs sled about
//! 9 µs), keyed by `stream name, 0x00, first sequence (big-endian)` so that a stream's batches sort
//! in sequence order. A batch value is
//!
//! ```text
//! version (1 byte) | record count (u32 LE) | CRC-32 of the body (u32 LE) | body
//! body = for each record: length (u32 LE) | bytes
//! ```
//!
//! so a torn or damaged batch is detected on read: it is reported as a gap, never returned as
//! records. Checkpoints (serialised window state) live in their own tree by name.
//!
//! Not wired into the gateway yet: the pipeline still keeps records in memory (see
//! [`crate::store`]).

use std::path::Path;

/// Format version of a batch value.
const BATCH_VERSION: u8 = 1;
const HEADER: usize = 9;

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("outbox storage: {0}")]
    Sled(#[from] sled::Error),
    #[error("a batch of {0} records is larger than the outbox can hold in one value")]
    TooLarge(usize),
}

/// What a read returns.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReadBatch {
    /// `(sequence, encoded record)` in sequence order.
    pub records: Vec<(u64, Vec<u8>)>,
    /// Sequence ranges `[first, last]` whose batch failed its checksum: lost, and reported.
    pub damaged: Vec<(u64, u64)>,
}

/// The operations the gateway needs from durable storage.
pub trait Outbox: Send + Sync + 'static {
    /// Appends `records` to `stream` as one batch, with sequences `first, first + 1, …`. Durable
    /// once [`Outbox::flush`] returns.
    fn append(&self, stream: &str, first: u64, records: &[Vec<u8>]) -> Result<(), OutboxError>;
    /// Makes every append so far durable (fsync).
    fn flush(&self) -> Result<(), OutboxError>;
    /// Up to `max` records of `stream` with sequence at least `from`, in order.
    fn read(&self, stream: &str, from: u64, max: usize) -> Result<ReadBatch, OutboxError>;
    /// Removes the batches whose records all have sequences below `before`; returns how many
    /// records were removed.
    fn purge_before(&self, stream: &str, before: u64) -> Result<u64, OutboxError>;
    /// The first and last sequence held for `stream`.
    fn bounds(&self, stream: &str) -> Result<Option<(u64, u64)>, OutboxError>;
    /// Stores a named checkpoint, replacing the previous one.
    fn put_checkpoint(&self, name: &str, bytes: &[u8]) -> Result<(), OutboxError>;
    fn checkpoint(&self, name: &str) -> Result<Option<Vec<u8>>, OutboxError>;
}

fn key(stream: &str, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(stream.len() + 9);
    k.extend_from_slice(stream.as_bytes());
    k.push(0);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn seq_of(key: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    if key.len() >= 8 {
        b.copy_from_slice(&key[key.len() - 8..]);
    }
    u64::from_be_bytes(b)
}

fn encode(records: &[Vec<u8>]) -> Result<Vec<u8>, OutboxError> {
    let count = u32::try_from(records.len()).map_err(|_| OutboxError::TooLarge(records.len()))?;
    let body_len: usize = records.iter().map(|r| 4 + r.len()).sum();
    let mut value = Vec::with_capacity(HEADER + body_len);
    value.push(BATCH_VERSION);
    value.extend_from_slice(&count.to_le_bytes());
    value.extend_from_slice(&[0; 4]);
    for r in records {
        let len = u32::try_from(r.len()).map_err(|_| OutboxError::TooLarge(records.len()))?;
        value.extend_from_slice(&len.to_le_bytes());
        value.extend_from_slice(r);
    }
    let crc = crc32fast::hash(&value[HEADER..]);
    value[5..9].copy_from_slice(&crc.to_le_bytes());
    Ok(value)
}

/// The number of records a batch value claims, read from its header.
fn count_of(value: &[u8]) -> u64 {
    value.get(1..5).map_or(0, |b| {
        u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    })
}

/// The records of a batch value, or `None` when it is damaged.
fn decode(value: &[u8]) -> Option<Vec<Vec<u8>>> {
    if value.len() < HEADER || value[0] != BATCH_VERSION {
        return None;
    }
    let crc = u32::from_le_bytes([value[5], value[6], value[7], value[8]]);
    let mut body = &value[HEADER..];
    if crc32fast::hash(body) != crc {
        return None;
    }
    let count = count_of(value);
    let mut out = Vec::with_capacity(usize::try_from(count).ok()?.min(1 << 16));
    for _ in 0..count {
        let len = u32::from_le_bytes(body.get(..4)?.try_into().ok()?) as usize;
        out.push(body.get(4..4 + len)?.to_vec());
        body = &body[4 + len..];
    }
    body.is_empty().then_some(out)
}

/// The outbox on sled.
#[derive(Debug, Clone)]
pub struct SledOutbox {
    db: sled::Db,
    records: sled::Tree,
    checkpoints: sled::Tree,
}

impl SledOutbox {
    /// Opens (or creates) the outbox in directory `path`.
    ///
    /// sled locks its directory; a database closed a moment ago can still hold the lock while its
    /// background flusher stops, so a locked directory is retried for up to two seconds.
    pub fn open(path: &Path) -> Result<Self, OutboxError> {
        let config = sled::Config::new()
            .path(path)
            .cache_capacity(16 * 1024 * 1024);
        let mut attempts = 0;
        let db = loop {
            match config.open() {
                Err(sled::Error::Io(err))
                    if attempts < 40 && err.to_string().contains("could not acquire lock") =>
                {
                    attempts += 1;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                other => break other?,
            }
        };
        Ok(Self {
            records: db.open_tree("records")?,
            checkpoints: db.open_tree("checkpoints")?,
            db,
        })
    }

    /// Bytes the outbox occupies on disk.
    pub fn size_on_disk(&self) -> Result<u64, OutboxError> {
        Ok(self.db.size_on_disk()?)
    }

    /// Overwrites a stored batch value (tests of damage detection).
    #[cfg(test)]
    fn raw_insert(&self, stream: &str, first: u64, value: &[u8]) {
        self.records.insert(key(stream, first), value).unwrap();
    }
}

impl Outbox for SledOutbox {
    fn append(&self, stream: &str, first: u64, records: &[Vec<u8>]) -> Result<(), OutboxError> {
        if records.is_empty() {
            return Ok(());
        }
        self.records.insert(key(stream, first), encode(records)?)?;
        Ok(())
    }

    fn flush(&self) -> Result<(), OutboxError> {
        self.db.flush()?;
        Ok(())
    }

    fn read(&self, stream: &str, from: u64, max: usize) -> Result<ReadBatch, OutboxError> {
        let mut out = ReadBatch::default();
        // Start at the batch that holds `from`: the last one that starts at or before it.
        let start = self
            .records
            .range(key(stream, 0)..=key(stream, from))
            .next_back()
            .transpose()?
            .map_or(from, |(k, _)| seq_of(&k));
        for item in self
            .records
            .range(key(stream, start)..=key(stream, u64::MAX))
        {
            let (k, v) = item?;
            let first = seq_of(&k);
            match decode(&v) {
                Some(records) => {
                    for (i, r) in records.into_iter().enumerate() {
                        let seq = first + i as u64;
                        if seq >= from {
                            out.records.push((seq, r));
                            if out.records.len() >= max {
                                return Ok(out);
                            }
                        }
                    }
                }
                None => {
                    let last = first + count_of(&v).max(1) - 1;
                    if last >= from {
                        out.damaged.push((first.max(from), last));
                    }
                }
            }
        }
        Ok(out)
    }

    fn purge_before(&self, stream: &str, before: u64) -> Result<u64, OutboxError> {
        let mut removed = 0;
        for item in self.records.range(key(stream, 0)..key(stream, before)) {
            let (k, v) = item?;
            let count = count_of(&v);
            if seq_of(&k) + count <= before {
                self.records.remove(&k)?;
                removed += count;
            }
        }
        Ok(removed)
    }

    fn bounds(&self, stream: &str) -> Result<Option<(u64, u64)>, OutboxError> {
        let mut range = self.records.range(key(stream, 0)..=key(stream, u64::MAX));
        let Some((first_key, _)) = range.next().transpose()? else {
            return Ok(None);
        };
        let last = match range.next_back().transpose()? {
            Some((k, v)) => seq_of(&k) + count_of(&v).max(1) - 1,
            None => {
                let v = self.records.get(&first_key)?.unwrap_or_default();
                seq_of(&first_key) + count_of(&v).max(1) - 1
            }
        };
        Ok(Some((seq_of(&first_key), last)))
    }

    fn put_checkpoint(&self, name: &str, bytes: &[u8]) -> Result<(), OutboxError> {
        self.checkpoints.insert(name.as_bytes(), bytes)?;
        Ok(())
    }

    fn checkpoint(&self, name: &str) -> Result<Option<Vec<u8>>, OutboxError> {
        Ok(self.checkpoints.get(name.as_bytes())?.map(|v| v.to_vec()))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    fn rec(seq: u64) -> Vec<u8> {
        format!("record {seq}").into_bytes()
    }

    #[test]
    fn records_survive_a_reopen_and_read_from_any_sequence() {
        let dir = tempfile::tempdir().unwrap();
        {
            let outbox = SledOutbox::open(dir.path()).unwrap();
            outbox
                .append("noise", 1, &(1..=5).map(rec).collect::<Vec<_>>())
                .unwrap();
            outbox
                .append("noise", 6, &(6..=8).map(rec).collect::<Vec<_>>())
                .unwrap();
            outbox
                .append("air", 1, &[b"other stream".to_vec()])
                .unwrap();
            outbox
                .put_checkpoint("footfall", b"{\"windows\":{}}")
                .unwrap();
            outbox.flush().unwrap();
        }
        let outbox = SledOutbox::open(dir.path()).unwrap();
        assert_eq!(outbox.bounds("noise").unwrap(), Some((1, 8)));
        assert_eq!(outbox.bounds("air").unwrap(), Some((1, 1)));
        assert_eq!(outbox.bounds("parking").unwrap(), None);
        let read = outbox.read("noise", 4, 3).unwrap();
        assert_eq!(read.records, vec![(4, rec(4)), (5, rec(5)), (6, rec(6))]);
        assert_eq!(outbox.read("noise", 9, 10).unwrap(), ReadBatch::default());
        assert_eq!(
            outbox.checkpoint("footfall").unwrap().as_deref(),
            Some(&b"{\"windows\":{}}"[..])
        );
    }

    #[test]
    fn a_damaged_batch_is_reported_not_returned() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = SledOutbox::open(dir.path()).unwrap();
        outbox
            .append("noise", 1, &(1..=3).map(rec).collect::<Vec<_>>())
            .unwrap();
        outbox
            .append("noise", 4, &(4..=6).map(rec).collect::<Vec<_>>())
            .unwrap();
        outbox
            .append("noise", 7, &(7..=9).map(rec).collect::<Vec<_>>())
            .unwrap();
        // A flipped bit in the middle batch, and a torn (truncated) last batch.
        let mut value = encode(&(4..=6).map(rec).collect::<Vec<_>>()).unwrap();
        value[HEADER + 6] ^= 0x10;
        outbox.raw_insert("noise", 4, &value);
        let torn = encode(&(7..=9).map(rec).collect::<Vec<_>>()).unwrap();
        outbox.raw_insert("noise", 7, &torn[..torn.len() - 3]);
        let read = outbox.read("noise", 2, 100).unwrap();
        assert_eq!(read.records, vec![(2, rec(2)), (3, rec(3))]);
        assert_eq!(read.damaged, vec![(4, 6), (7, 9)]);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Append(u8),
        Purge(u8),
        Read(u8, u8),
        Reopen,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (1u8..20).prop_map(Op::Append),
            1 => any::<u8>().prop_map(Op::Purge),
            2 => (any::<u8>(), 1u8..50).prop_map(|(f, m)| Op::Read(f, m)),
            1 => Just(Op::Reopen),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        /// The outbox behaves like an ordered map of sequence to record, across reopens.
        #[test]
        fn the_outbox_matches_a_model(ops in prop::collection::vec(op(), 1..40)) {
            let dir = tempfile::tempdir().unwrap();
            let mut outbox = SledOutbox::open(dir.path()).unwrap();
            let mut model: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
            let mut next = 1u64;
            // Batches as (first, count), to model purges of whole batches.
            let mut batches: Vec<(u64, u64)> = Vec::new();
            for op in ops {
                match op {
                    Op::Append(n) => {
                        let records: Vec<Vec<u8>> = (next..next + u64::from(n)).map(rec).collect();
                        outbox.append("s", next, &records).unwrap();
                        for (i, r) in records.into_iter().enumerate() {
                            model.insert(next + i as u64, r);
                        }
                        batches.push((next, u64::from(n)));
                        next += u64::from(n);
                    }
                    Op::Purge(before) => {
                        let before = u64::from(before);
                        let removed = outbox.purge_before("s", before).unwrap();
                        let mut expected = 0;
                        batches.retain(|(f, c)| {
                            if f + c <= before {
                                for s in *f..f + c {
                                    model.remove(&s);
                                }
                                expected += c;
                                false
                            } else {
                                true
                            }
                        });
                        prop_assert_eq!(removed, expected);
                    }
                    Op::Read(from, max) => {
                        let read = outbox.read("s", u64::from(from), usize::from(max)).unwrap();
                        let want: Vec<(u64, Vec<u8>)> = model
                            .range(u64::from(from)..)
                            .take(usize::from(max))
                            .map(|(s, r)| (*s, r.clone()))
                            .collect();
                        prop_assert_eq!(read.records, want);
                        prop_assert!(read.damaged.is_empty());
                    }
                    Op::Reopen => {
                        outbox.flush().unwrap();
                        drop(outbox);
                        outbox = SledOutbox::open(dir.path()).unwrap();
                    }
                }
                let bounds = outbox.bounds("s").unwrap();
                let want = batches
                    .first()
                    .zip(batches.last())
                    .map(|(f, l)| (f.0, l.0 + l.1 - 1));
                prop_assert_eq!(bounds, want);
            }
        }
    }
}
