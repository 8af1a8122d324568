//! The durable outbox: per-stream ordered logs of filtered records, on disk.
//!
//! Only filtered records (encoded `hubgate.v1.Record` messages) and window checkpoints ever enter
//! it, never a raw payload. The store behind it is swappable through the narrow [`Outbox`] trait,
//! implemented on redb ([`RedbOutbox`], the default engine) and on sled ([`SledOutbox`]); both pass
//! the same model tests and the end-to-end SIGKILL crash test. redb is the default: held at a
//! steady number of live records with the oldest purged as new ones come, sled's files grow far
//! past the live data (it does not reuse the space of purged records) and its durable appends
//! are slower (`cargo bench -p hubgate --bench outbox`; BENCHMARKS.md, "Micro-benchmarks").
//!
//! Writes go through [`Outbox::commit`]: every record batch, sequence mark and checkpoint of one
//! pipeline turn is applied atomically and made durable (fsync) before it returns, so after a crash
//! the outbox holds either all of a turn or none of it. The pipeline acknowledges MQTT messages
//! only after that. On redb a commit is made durable in a write-ahead log and folded into the
//! database later, many commits at once ([`RedbOutbox`]); the log holds the same sealed values.
//!
//! Layout (one sled tree or redb table, keys sorted bytewise):
//!
//! ```text
//! 'r' stream 0x00 first-sequence (u64 BE)  → a batch of records
//! 'n' stream                                → the stream's next sequence (u64 BE)
//! 'c' name                                  → a checkpoint
//! ```
//!
//! Records are stored in batches, one key per batch (a key per record is costly on either engine), of
//! at most [`BATCH_MAX`] bytes: a turn's records of a stream take as many batches as they need. A
//! batch value is
//!
//! ```text
//! version (1) | CRC-32 of the rest (u32 LE) | count (u32 LE) | kept at, Unix ms (i64 LE) | sealed body
//! body = for each record: length (u32 LE) | bytes
//! ```
//!
//! so a torn or damaged batch is detected on read and reported, never returned as records. The
//! kept time lets retention purge by age. The next-sequence mark survives purges, so sequence
//! numbers are never reused, even when retention has emptied a stream.
//!
//! When commits are small, redb's folds pack the batches of consecutive commits of a stream into
//! one value under the first one's key ([`pack`]), each part as it was sealed:
//!
//! ```text
//! version 2 | CRC-32 of the rest | count (all parts) | kept at (the oldest part's) | parts
//! part = length (u32 LE) | a version-1 batch value
//! ```
//!
//! A packed value is read, counted and purged as one batch: retention removes it when its oldest
//! part is due, at most [`PACK_SPAN_MS`] before the newest would be.
//!
//! The body is sealed (ChaCha20-Poly1305, nonce = the batch's first sequence) under a data key of
//! the stream, kept in `keys` beside the engine's files, and a purge destroys the keys that no
//! longer seal anything held ([`crate::outbox::data_keys`]). Neither engine overwrites what it deletes:
//! without this, most purged records could still be read from the files (both engines, in a
//! test). With it, a purged record is unreadable once its key goes; the store purges early enough
//! that this happens before the record's retention ends ([`crate::store`]).
//!
//! Checkpoints are sealed the same way (nonce = a per-name version counter), each name under keys
//! of its own that rotate every ten minutes; a key is destroyed once a version sealed under a newer
//! one is durable. So the old versions of a window's state, which hold groups below the minimum
//! size, cannot be read back from free pages either.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub mod data_keys;
mod format;
pub mod high_water;
mod on_sled;
mod vault;

#[cfg(test)]
use format::*;
use format::{Decoded, batch_len, batches, decode, info};
pub use on_sled::SledOutbox;
use vault::Vault;

#[cfg(feature = "redb")]
mod on_redb;
#[cfg(feature = "redb")]
mod wal;
#[cfg(feature = "redb")]
pub use on_redb::RedbOutbox;

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("outbox storage: {0}")]
    Sled(#[from] sled::Error),
    #[cfg(feature = "redb")]
    #[error("outbox storage: {0}")]
    Redb(Box<redb::Error>),
    #[cfg(not(feature = "redb"))]
    #[error("this build has no {0} engine")]
    NotBuilt(&'static str),
    #[error("outbox data keys: {0}")]
    Keys(#[from] std::io::Error),
    #[error("outbox log: {0}")]
    Log(std::io::Error),
    #[error("a batch of {0} records is larger than the outbox can hold in one value")]
    TooLarge(usize),
    #[error("sled cannot open its files ({files}): {why}")]
    Damaged { files: String, why: String },
    #[error("the storage engine panicked: {0}")]
    Panicked(String),
    #[error("{file}: {err}")]
    InFile { file: String, err: Box<OutboxError> },
}

impl OutboxError {
    /// `err`, said of `file`.
    pub fn in_file(file: &Path, err: OutboxError) -> Self {
        Self::InFile {
            file: file.display().to_string(),
            err: Box::new(err),
        }
    }
}

/// The message of a panic caught with `catch_unwind`.
fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

/// Records appended to one stream, with sequences `first, first + 1, …`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Append {
    pub stream: String,
    pub first: u64,
    /// When the records were kept (Unix ms): retention counts from here.
    pub kept_ms: i64,
    /// How long one data key of the stream seals (see [`data_keys::rotation`]).
    pub key_period: Duration,
    /// Encoded records, shared with the store's memory tail.
    pub records: Vec<bytes::Bytes>,
}

/// Everything one pipeline turn writes, applied atomically.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Commit {
    pub appends: Vec<Append>,
    /// Named checkpoints, each replacing the previous one of its name.
    pub checkpoints: Vec<(String, Vec<u8>)>,
}

impl Commit {
    pub fn is_empty(&self) -> bool {
        self.appends.iter().all(|a| a.records.is_empty()) && self.checkpoints.is_empty()
    }

    /// Bytes the commit's record batches take in the outbox.
    pub fn record_bytes(&self) -> u64 {
        self.appends
            .iter()
            .flat_map(batches)
            .map(|(_, records)| batch_len(records) as u64)
            .sum()
    }
}

/// A record read back, with its sequence and when it was kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    pub sequence: u64,
    pub kept_ms: i64,
    pub bytes: Vec<u8>,
}

/// What a read returns.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReadBatch {
    /// Consecutive records in sequence order.
    pub records: Vec<StoredRecord>,
    /// Sequence ranges `[first, last]` before the first record returned whose batch failed its
    /// checksum or authentication: lost, and reported. A read stops at a damaged batch once it
    /// has records. Batches whose data key was destroyed by a purge are skipped, not reported.
    pub damaged: Vec<(u64, u64)>,
}

/// The header of a stored batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchInfo {
    pub first: u64,
    pub count: u64,
    /// When the batch was kept; `i64::MIN` for a damaged batch (which retention removes first).
    pub kept_ms: i64,
    /// Bytes the batch takes in the outbox.
    pub bytes: u64,
    pub damaged: bool,
}

/// What a purge removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Purged {
    pub records: u64,
    pub bytes: u64,
    /// First and last sequence removed.
    pub sequences: Option<(u64, u64)>,
    /// Oldest and newest kept time of the batches removed (damaged batches not included).
    pub kept_ms: Option<(i64, i64)>,
    /// The first sequence of each data key destroyed because nothing it sealed is held any more.
    pub keys_destroyed: Vec<u64>,
}

impl Purged {
    fn add(&mut self, info: &BatchInfo) {
        self.records += info.count;
        self.bytes += info.bytes;
        let last = info.first + info.count.max(1) - 1;
        self.sequences = Some(
            self.sequences
                .map_or((info.first, last), |(f, _)| (f, last)),
        );
        if !info.damaged {
            self.kept_ms = Some(self.kept_ms.map_or((info.kept_ms, info.kept_ms), |(a, b)| {
                (a.min(info.kept_ms), b.max(info.kept_ms))
            }));
        }
    }
}

/// Damage an outbox found in one of its files when it was opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// The file, relative to the outbox's directory.
    pub file: String,
    /// Where in the file.
    pub at: String,
    /// What it means.
    pub what: String,
    /// Whether records were lost with it (otherwise it cost nothing, or the loss is found
    /// again by [`Outbox::survey`]).
    pub lost: bool,
}

/// A range of a stream's sequences the outbox cannot serve, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    pub first: u64,
    pub last: u64,
    pub why: &'static str,
}

/// What a look over every batch of a stream found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Survey {
    pub batches: u64,
    /// Records whose batches are intact (and, looked at deeply, authentic).
    pub records: u64,
    pub damaged: Vec<Damage>,
}

/// The operations the gateway needs from durable storage.
pub trait Outbox: Send + Sync + 'static {
    /// Applies `commit` atomically and makes it durable before returning.
    fn commit(&self, commit: &Commit) -> Result<(), OutboxError>;
    /// Up to `max` consecutive records of `stream` from sequence `from` on (see [`ReadBatch`]).
    fn read(&self, stream: &str, from: u64, max: usize) -> Result<ReadBatch, OutboxError>;
    /// The oldest batch held for `stream`.
    fn oldest(&self, stream: &str) -> Result<Option<BatchInfo>, OutboxError>;
    /// Removes `stream`'s batches from the oldest on, while `purge` says so, then destroys the
    /// data keys that no longer seal anything held (also when nothing was removed); durable on
    /// return.
    fn purge_while(
        &self,
        stream: &str,
        purge: &mut dyn FnMut(&BatchInfo) -> bool,
    ) -> Result<Purged, OutboxError>;
    /// The sequence the next record of `stream` gets: 1 for a stream never written.
    fn next_sequence(&self, stream: &str) -> Result<u64, OutboxError>;
    /// The last checkpoint stored under `name`.
    fn checkpoint(&self, name: &str) -> Result<Option<Vec<u8>>, OutboxError>;
    /// Bytes of record batches held, over all streams (the figure the size cap applies to).
    fn record_bytes(&self) -> u64;
    /// Every stream ever written.
    fn streams(&self) -> Result<Vec<String>, OutboxError>;
    /// The names of the checkpoints stored.
    fn checkpoint_names(&self) -> Result<Vec<String>, OutboxError>;
    /// The streams' next sequences as last made visible, kept apart from the data (see
    /// [`high_water`]).
    fn high_water(&self) -> &high_water::HighWater;
    /// Looks at every batch of `stream`: a checksum that fails, a data key missing, a range no
    /// batch holds before the stream's next sequence; `deep` also opens each batch
    /// (authenticates it under its key). For a start or an offline look: a purge running
    /// meanwhile would be taken for damage.
    fn survey(&self, stream: &str, deep: bool) -> Result<Survey, OutboxError>;
    /// Damage found in the outbox's files when it was opened (its log, key file, sequence marks).
    fn findings(&self) -> Vec<Finding>;
    /// The engine's data file, relative to the outbox's directory.
    fn data_file(&self) -> &'static str;
}

/// The names in keys of one kind (next-sequence keys: streams; checkpoint keys: checkpoints).
fn stream_names<K: AsRef<[u8]>>(
    keys: impl Iterator<Item = Result<K, OutboxError>>,
) -> Result<Vec<String>, OutboxError> {
    keys.map(|k| k.map(|k| String::from_utf8_lossy(&k.as_ref()[1..]).into_owned()))
        .collect()
}

/// Opens the outbox of `engine` in `<data_dir>/outbox/`.
pub fn open(
    engine: crate::config::Engine,
    data_dir: &Path,
    log_bytes: u64,
) -> Result<std::sync::Arc<dyn Outbox>, OutboxError> {
    let dir = data_dir.join("outbox");
    match engine {
        crate::config::Engine::Sled => Ok(std::sync::Arc::new(SledOutbox::open(&dir)?)),
        #[cfg(feature = "redb")]
        crate::config::Engine::Redb => {
            Ok(std::sync::Arc::new(RedbOutbox::open_with(&dir, log_bytes)?))
        }
        #[cfg(not(feature = "redb"))]
        crate::config::Engine::Redb => Err(OutboxError::NotBuilt("redb")),
    }
}

/// One stored batch as an engine yields it: its first sequence and its value.
type Entry<V> = Result<(u64, V), OutboxError>;

/// Up to `max` consecutive records from `from` on, out of a stream's batches in order, starting
/// with the one that holds `from` (see [`ReadBatch`]).
fn read_batches<V: AsRef<[u8]>>(
    vault: &Vault,
    stream: &str,
    batches: impl Iterator<Item = Entry<V>>,
    from: u64,
    max: usize,
    next_sequence: &dyn Fn() -> Result<u64, OutboxError>,
) -> Result<ReadBatch, OutboxError> {
    let mut out = ReadBatch::default();
    let mut batches = batches.peekable();
    while let Some(item) = batches.next() {
        let (first, value) = item?;
        let decoded = decode(&vault.lock(), stream, first, value.as_ref());
        match decoded {
            Decoded::Records(records) => {
                for (i, (kept_ms, bytes)) in records.into_iter().enumerate() {
                    let sequence = first + i as u64;
                    if sequence >= from {
                        out.records.push(StoredRecord {
                            sequence,
                            kept_ms,
                            bytes,
                        });
                        if out.records.len() >= max {
                            return Ok(out);
                        }
                    }
                }
                continue;
            }
            _ if !out.records.is_empty() => break,
            Decoded::Shredded => continue,
            Decoded::Damaged => {}
        }
        let next_first = match batches.peek() {
            Some(Ok((next, _))) => *next,
            _ => next_sequence()?,
        };
        let last = next_first.saturating_sub(1).max(first);
        if last >= from {
            out.damaged.push((first.max(from), last));
        }
    }
    Ok(out)
}

/// [`Outbox::survey`] over a stream's batches in order, before its next sequence `next`.
fn survey_batches<V: AsRef<[u8]>>(
    vault: &Vault,
    stream: &str,
    batches: impl Iterator<Item = Entry<V>>,
    next: u64,
    deep: bool,
) -> Result<Survey, OutboxError> {
    let mut out = Survey::default();
    let mut expected: Option<u64> = None;
    let mut batches = batches.peekable();
    while let Some(item) = batches.next() {
        let (first, value) = item?;
        let value = value.as_ref();
        if let Some(e) = expected.filter(|&e| first > e) {
            out.damaged.push(Damage {
                first: e,
                last: first - 1,
                why: "missing: no batch holds these sequences",
            });
        }
        out.batches += 1;
        let next_first = match batches.peek() {
            Some(Ok((n, _))) => *n,
            _ => next,
        };
        let batch = info(first, value, || next_first);
        let last = first + batch.count.max(1) - 1;
        // A purge removes batches before it destroys their keys, so a batch held without its key
        // (no purge runs meanwhile) lost the key to damage: a slot torn, zeroed or cut off.
        let keys = vault.lock();
        let why = if batch.damaged {
            Some("the batch fails its checksum")
        } else if !keys.holds(stream, first) {
            Some("the batch's data key is missing from the key file")
        } else if deep {
            match decode(&keys, stream, first, value) {
                Decoded::Records(records) => {
                    out.records += records.len() as u64;
                    None
                }
                Decoded::Shredded | Decoded::Damaged => {
                    Some("the batch cannot be opened: it or its data key is damaged")
                }
            }
        } else {
            out.records += batch.count;
            None
        };
        drop(keys);
        if let Some(why) = why {
            match out.damaged.last_mut() {
                // Consecutive batches lost for one reason are one range.
                Some(d) if d.why == why && d.last + 1 == first => d.last = last,
                _ => out.damaged.push(Damage { first, last, why }),
            }
        }
        expected = Some(expected.map_or(last + 1, |e| e.max(last + 1)));
    }
    if let Some(e) = expected.filter(|&e| e < next) {
        out.damaged.push(Damage {
            first: e,
            last: next - 1,
            why: "missing: no batch holds these sequences",
        });
    }
    Ok(out)
}

/// The batches to remove from the front of a stream while `purge` says so, and what they held.
fn purge_batches<V: AsRef<[u8]>>(
    batches: impl Iterator<Item = Entry<V>>,
    purge: &mut dyn FnMut(&BatchInfo) -> bool,
    next_sequence: &dyn Fn() -> u64,
) -> Result<(Purged, Vec<u64>), OutboxError> {
    let mut purged = Purged::default();
    let mut firsts = Vec::new();
    let mut batches = batches.peekable();
    while let Some(item) = batches.next() {
        let (first, value) = item?;
        let next_first = || match batches.peek() {
            Some(Ok((next, _))) => *next,
            _ => next_sequence(),
        };
        let batch = info(first, value.as_ref(), next_first);
        if !purge(&batch) {
            break;
        }
        purged.add(&batch);
        firsts.push(first);
    }
    Ok((purged, firsts))
}

/// The header of the first of a stream's batches.
fn first_batch<V: AsRef<[u8]>>(
    batches: impl Iterator<Item = Entry<V>>,
    next_sequence: &dyn Fn() -> u64,
) -> Result<Option<BatchInfo>, OutboxError> {
    let mut found = None;
    purge_batches(
        batches,
        &mut |b| {
            found = Some(*b);
            false
        },
        next_sequence,
    )?;
    Ok(found)
}

/// Destroys the data keys of `stream` that seal nothing held once a purge is durable. Takes the
/// vault's lock before reading the bounds, so no commit is between sealing and writing.
fn shred<O: Outbox + ?Sized>(
    outbox: &O,
    vault: &Vault,
    stream: &str,
    purged: &mut Purged,
) -> Result<(), OutboxError> {
    let mut keys = vault.lock();
    let next = outbox.next_sequence(stream)?;
    let oldest = outbox.oldest(stream)?.map_or(next, |b| b.first);
    purged.keys_destroyed = keys.shred(stream, oldest, next)?;
    Ok(())
}

/// Takes `bytes` off a byte count, stopping at zero.
fn sub_bytes(count: &AtomicU64, bytes: u64) {
    let _ = count.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
        Some(held.saturating_sub(bytes))
    });
}

#[cfg(test)]
mod tests;
