//! The durable outbox: per-stream ordered logs of filtered records, on disk.
//!
//! Only filtered records (encoded `hubgate.v1.Record` messages) and window checkpoints ever enter
//! it, never a raw payload. The store behind it is swappable through the narrow [`Outbox`] trait,
//! implemented on redb ([`RedbOutbox`], the default engine) and on sled ([`SledOutbox`]); both pass
//! the same model tests and the end-to-end SIGKILL crash test. redb is the default: held at
//! 200,000 live records of 200 B with the oldest purged as new ones come (`cargo bench -p hubgate
//! --bench outbox`), sled's files grew to 79x the live data in length while redb's stayed at 1.9x
//! (in allocated blocks, with the batches of today: sled 2.04x, redb 1.07x), and redb's durable
//! appends were faster (twice then, 1.2 times today).
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
//! Records are stored in batches, one key per batch (a key per record costs sled about 9 µs), of
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
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

pub mod data_keys;

use data_keys::DataKeys;

#[cfg(feature = "redb")]
mod on_redb;
#[cfg(feature = "redb")]
mod wal;
#[cfg(feature = "redb")]
pub use on_redb::RedbOutbox;

/// Format version of a batch value.
const BATCH_VERSION: u8 = 1;
/// Format version of a packed batch value: batches of consecutive sequences in one value.
const PACKED_VERSION: u8 = 2;
/// Bytes before the sealed body (or the parts of a packed value): version, CRC, count, kept time.
const HEADER: usize = 17;
/// Most bytes of one batch value, unless a single record is larger. redb gives a value larger
/// than a page a power-of-two number of 4 KiB pages, so a 20 KiB batch took 32 KiB: with turns of
/// 10 to 45 KiB per stream the file held 1.50 times the data, with batches of at most this size
/// 1.13 times (and 2.3 times fewer `pwrite` calls than with batches of at most one page). This
/// is four pages less [`ROOM`].
const BATCH_MAX: usize = 4 * PAGE - ROOM;
/// redb's page.
const PAGE: usize = 4 * 1024;
/// Room a leaf needs beside a value: for the key (at most 73 bytes) and the leaf's 12 bytes of
/// header.
const ROOM: usize = 128;
/// Most bytes of a packed value that fills a page ([`pack`]).
const PAGE_MAX: usize = PAGE - ROOM;
/// Most time between the kept times of the batches packed into one value: retention purges a
/// packed value when its oldest part is due, at most this early for the newest.
const PACK_SPAN_MS: u64 = 1_000;

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

/// The batches `append` is stored as, `(first sequence, records)`: consecutive runs of its records,
/// each at most [`BATCH_MAX`] bytes in the outbox (a record larger than that alone in its batch).
fn batches(append: &Append) -> impl Iterator<Item = (u64, &[bytes::Bytes])> {
    let mut rest = append.records.as_slice();
    let mut first = append.first;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut len = batch_len(&[]);
        let n = rest
            .iter()
            .take_while(|r| {
                len += 4 + r.len();
                len <= BATCH_MAX
            })
            .count()
            .max(1);
        let (batch, tail) = rest.split_at(n);
        rest = tail;
        first += n as u64;
        Some((first - n as u64, batch))
    })
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
}

/// The stream names of next-sequence keys.
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
) -> Result<std::sync::Arc<dyn Outbox>, OutboxError> {
    let dir = data_dir.join("outbox");
    match engine {
        crate::config::Engine::Sled => Ok(std::sync::Arc::new(SledOutbox::open(&dir)?)),
        #[cfg(feature = "redb")]
        crate::config::Engine::Redb => Ok(std::sync::Arc::new(RedbOutbox::open(&dir)?)),
        #[cfg(not(feature = "redb"))]
        crate::config::Engine::Redb => Err(OutboxError::NotBuilt("redb")),
    }
}

fn record_key(stream: &str, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(stream.len() + 10);
    k.push(b'r');
    k.extend_from_slice(stream.as_bytes());
    k.push(0);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn named_key(kind: u8, name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(name.len() + 1);
    k.push(kind);
    k.extend_from_slice(name.as_bytes());
    k
}

fn seq_of(key: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    if key.len() >= 8 {
        b.copy_from_slice(&key[key.len() - 8..]);
    }
    u64::from_be_bytes(b)
}

fn batch_len(records: &[bytes::Bytes]) -> usize {
    HEADER + data_keys::OVERHEAD + records.iter().map(|r| 4 + r.len()).sum::<usize>()
}

/// The keys of an outbox, shared by both engines: the directory's key file, behind a lock that a
/// commit holds from sealing until it is durable, and a purge while it destroys keys, so that a
/// key is never destroyed while records sealed with it are on their way in. (The redb engine
/// holds its log's lock for that span instead, around the key lock: see [`RedbOutbox`].)
#[derive(Debug)]
struct Vault {
    keys: Mutex<DataKeys>,
    /// Per checkpoint name, the counter of its next version (locked only with `keys`).
    counters: Mutex<std::collections::HashMap<String, u64>>,
}

/// How long one key seals a checkpoint's versions before the next key starts; older keys are
/// destroyed as soon as a version under a newer one is durable.
const CHECKPOINT_KEY_PERIOD: Duration = Duration::from_secs(600);
const CHECKPOINT_VERSION: u8 = 1;

/// The data-key series of a checkpoint name (a control character keeps it apart from streams).
fn checkpoint_series(name: &str) -> String {
    format!("\u{1}{name}")
}

impl Vault {
    fn open(dir: &Path) -> Result<Self, OutboxError> {
        std::fs::create_dir_all(dir)?;
        Ok(Self {
            keys: Mutex::new(DataKeys::open(&dir.join("keys"))?),
            counters: Mutex::new(std::collections::HashMap::new()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, DataKeys> {
        self.keys.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Seals a version of checkpoint `name`. `stored` gives the version stored now, read only
    /// the first time a name is written in this process. Returns the version's counter and value.
    fn seal_checkpoint(
        &self,
        keys: &mut DataKeys,
        name: &str,
        bytes: &[u8],
        stored: impl FnOnce() -> Result<Option<Vec<u8>>, OutboxError>,
    ) -> Result<(u64, Vec<u8>), OutboxError> {
        let mut counters = self.counters.lock().unwrap_or_else(PoisonError::into_inner);
        let counter = match counters.get(name) {
            Some(next) => *next,
            None => stored()?
                .and_then(|v| {
                    v.get(1..9)
                        .map(|c| u64::from_be_bytes(c.try_into().unwrap_or_default()))
                })
                .map_or(1, |c| c + 1),
        };
        counters.insert(name.to_owned(), counter + 1);
        // The state is copied into the value once, and sealed where it is.
        let mut value = Vec::with_capacity(9 + bytes.len() + data_keys::OVERHEAD);
        value.push(CHECKPOINT_VERSION);
        value.extend_from_slice(&counter.to_be_bytes());
        value.extend_from_slice(bytes);
        if let Err(err) = keys.seal_in_place(
            &checkpoint_series(name),
            counter,
            crate::telemetry::clock::now_ms(),
            CHECKPOINT_KEY_PERIOD,
            &mut value,
            9,
        ) {
            zeroize::Zeroize::zeroize(&mut value);
            return Err(err.into());
        }
        Ok((counter, value))
    }

    /// Destroys the keys of checkpoint versions older than the ones just committed.
    fn checkpoints_committed(
        keys: &mut DataKeys,
        written: &[(&str, u64)],
    ) -> Result<(), OutboxError> {
        for (name, counter) in written {
            keys.shred(&checkpoint_series(name), *counter, counter + 1)?;
        }
        Ok(())
    }

    /// Opens a stored checkpoint value; `None` (and an error logged) when it cannot be read.
    fn open_checkpoint(&self, name: &str, value: &[u8]) -> Option<Vec<u8>> {
        let opened = (value.first() == Some(&CHECKPOINT_VERSION))
            .then(|| value.get(1..9))
            .flatten()
            .and_then(|c| {
                let counter = u64::from_be_bytes(c.try_into().unwrap_or_default());
                self.lock()
                    .unseal(&checkpoint_series(name), counter, &value[9..])
            });
        if opened.is_none() {
            tracing::error!(
                checkpoint = name,
                "a checkpoint cannot be read: it is ignored"
            );
        }
        opened
    }
}

/// The stored value of a batch: its header, and its records framed and sealed. The records are
/// framed into the value and sealed where they are: they are copied once.
fn encode(
    keys: &mut DataKeys,
    append: &Append,
    first: u64,
    records: &[bytes::Bytes],
) -> Result<Vec<u8>, OutboxError> {
    let too_large = || OutboxError::TooLarge(records.len());
    let count = u32::try_from(records.len()).map_err(|_| too_large())?;
    let mut value = Vec::with_capacity(batch_len(records));
    value.push(BATCH_VERSION);
    value.extend_from_slice(&[0; 4]);
    value.extend_from_slice(&count.to_le_bytes());
    value.extend_from_slice(&append.kept_ms.to_le_bytes());
    for r in records {
        let Ok(len) = u32::try_from(r.len()) else {
            zeroize::Zeroize::zeroize(&mut value);
            return Err(too_large());
        };
        value.extend_from_slice(&len.to_le_bytes());
        value.extend_from_slice(r);
    }
    if let Err(err) = keys.seal_in_place(
        &append.stream,
        first,
        append.kept_ms,
        append.key_period,
        &mut value,
        HEADER,
    ) {
        // Records in clear are not left behind in freed memory.
        zeroize::Zeroize::zeroize(&mut value);
        return Err(err.into());
    }
    let crc = crc32fast::hash(&value[5..]);
    value[1..5].copy_from_slice(&crc.to_le_bytes());
    Ok(value)
}

/// Whether a batch value, packed or not, is intact: its version is known and its checksum
/// matches.
fn intact(value: &[u8]) -> bool {
    value.len() >= HEADER
        && (value[0] == BATCH_VERSION || value[0] == PACKED_VERSION)
        && crc32fast::hash(&value[5..])
            == u32::from_le_bytes([value[1], value[2], value[3], value[4]])
}

/// The count of records in a batch value's header.
fn count_of(value: &[u8]) -> u32 {
    u32::from_le_bytes([value[5], value[6], value[7], value[8]])
}

/// The kept time in a batch value's header.
fn kept_of(value: &[u8]) -> i64 {
    i64::from_le_bytes(value[9..17].try_into().unwrap_or_default())
}

/// A value to write in place of another: unchanged, or packed.
type Packed<'a> = (&'a [u8], std::borrow::Cow<'a, [u8]>);

/// Packs the record batches among `inserts` (sorted by key, as what waits in redb's log) that
/// hold consecutive sequences of one stream, kept at most [`PACK_SPAN_MS`] after the run's first
/// (or before it): each such run becomes values of at most [`BATCH_MAX`] bytes ([`pack_groups`];
/// a group of one batch is written as it was). Other inserts are kept as they are. Returns what
/// to write instead of `inserts`, in the same order, and how many bytes more it holds.
///
/// Why: redb splits a full leaf into halves and never fills the left one again when keys only
/// grow, so batches smaller than a page, as small commits write them, left the file 1.4 to 1.6
/// times their size. Packed, most values fill four pages of their own.
fn pack<K: AsRef<[u8]>, V: AsRef<[u8]>>(inserts: &[(K, V)]) -> (Vec<Packed<'_>>, u64) {
    let mut out = Vec::with_capacity(inserts.len());
    let mut growth = 0;
    let mut rest = inserts;
    while !rest.is_empty() {
        let mut len = 1;
        if let Some((stream, mut next)) = batch_span(&rest[0]) {
            let kept = kept_of(rest[0].1.as_ref());
            while let Some((s, n)) = rest.get(len).and_then(batch_span) {
                let (key, value) = (rest[len].0.as_ref(), rest[len].1.as_ref());
                if s != stream
                    || seq_of(key) != next
                    || kept_of(value).abs_diff(kept) > PACK_SPAN_MS
                {
                    break;
                }
                next = n;
                len += 1;
            }
        }
        let (run, tail) = rest.split_at(len);
        rest = tail;
        for group in pack_groups(run) {
            let key = group[0].0.as_ref();
            if let [(_, value)] = group {
                out.push((key, std::borrow::Cow::Borrowed(value.as_ref())));
                continue;
            }
            let value = packed_value(group);
            let parts: usize = group.iter().map(|(_, v)| v.as_ref().len()).sum();
            growth += (value.len() - parts) as u64;
            out.push((key, std::borrow::Cow::Owned(value)));
        }
    }
    (out, growth)
}

/// A record batch's stream prefix of its key and the sequence after its last; `None` for other
/// inserts and for anything but an intact, unpacked batch.
fn batch_span<K: AsRef<[u8]>, V: AsRef<[u8]>>((key, value): &(K, V)) -> Option<(&[u8], u64)> {
    let (key, value) = (key.as_ref(), value.as_ref());
    let record = key.first() == Some(&b'r') && key.len() > 9;
    (record && value.first() == Some(&BATCH_VERSION) && intact(value)).then(|| {
        (
            &key[..key.len() - 8],
            seq_of(key) + u64::from(count_of(value)),
        )
    })
}

/// Bytes a packed value of `parts` takes.
fn packed_len<K, V: AsRef<[u8]>>(parts: &[(K, V)]) -> usize {
    HEADER
        + parts
            .iter()
            .map(|(_, v)| 4 + v.as_ref().len())
            .sum::<usize>()
}

/// How a run of batches is packed: in order, groups of at most [`BATCH_MAX`] bytes; the last
/// group in values of at most [`PAGE_MAX`] instead if those take fewer pages than it would.
fn pack_groups<K, V: AsRef<[u8]>>(run: &[(K, V)]) -> Vec<&[(K, V)]> {
    let mut groups = split_run(run, BATCH_MAX);
    if let Some(last) = groups.pop() {
        let pages = split_run(last, PAGE_MAX);
        if pages.len() < pages_of(packed_len(last)) {
            groups.extend(pages);
        } else {
            groups.push(last);
        }
    }
    groups
}

/// `run` in order, in groups of at most `max` bytes packed (a batch larger than that alone).
fn split_run<K, V: AsRef<[u8]>>(mut run: &[(K, V)], max: usize) -> Vec<&[(K, V)]> {
    let mut groups = Vec::new();
    while !run.is_empty() {
        let mut len = HEADER;
        let n = run
            .iter()
            .take_while(|(_, v)| {
                len += 4 + v.as_ref().len();
                len <= max
            })
            .count()
            .max(1);
        let (group, rest) = run.split_at(n);
        groups.push(group);
        run = rest;
    }
    groups
}

/// Pages of 4 KiB that redb gives a value of `len` bytes of its own: a power of two.
fn pages_of(len: usize) -> usize {
    (len + ROOM).div_ceil(PAGE).next_power_of_two()
}

/// The packed value of `parts`, intact batches of consecutive sequences.
fn packed_value<K, V: AsRef<[u8]>>(parts: &[(K, V)]) -> Vec<u8> {
    let count = parts
        .iter()
        .fold(0u32, |n, (_, v)| n.saturating_add(count_of(v.as_ref())));
    let kept = parts.iter().map(|(_, v)| kept_of(v.as_ref())).min();
    let mut value = Vec::with_capacity(packed_len(parts));
    value.push(PACKED_VERSION);
    value.extend_from_slice(&[0; 4]);
    value.extend_from_slice(&count.to_le_bytes());
    value.extend_from_slice(&kept.unwrap_or_default().to_le_bytes());
    for (_, part) in parts {
        let part = part.as_ref();
        // A part is at most a batch (or one record) long: well within u32.
        value.extend_from_slice(&u32::try_from(part.len()).unwrap_or(u32::MAX).to_le_bytes());
        value.extend_from_slice(part);
    }
    let crc = crc32fast::hash(&value[5..]);
    value[1..5].copy_from_slice(&crc.to_le_bytes());
    value
}

/// The header of an intact batch value; `count` and `kept_ms` of a damaged one are unknown.
fn info(first: u64, value: &[u8], next_first: impl FnOnce() -> u64) -> BatchInfo {
    let bytes = value.len() as u64;
    if intact(value) {
        BatchInfo {
            first,
            count: u64::from(count_of(value)),
            kept_ms: kept_of(value),
            bytes,
            damaged: false,
        }
    } else {
        // The damaged batch ends where the next one starts.
        let count = next_first().saturating_sub(first).max(1);
        BatchInfo {
            first,
            count,
            kept_ms: i64::MIN,
            bytes,
            damaged: true,
        }
    }
}

/// What a stored batch holds for a reader.
enum Decoded {
    /// Its records, each with when it was kept.
    Records(Vec<(i64, Vec<u8>)>),
    /// Its data key was destroyed: purged.
    Shredded,
    Damaged,
}

fn decode(keys: &DataKeys, stream: &str, first: u64, value: &[u8]) -> Decoded {
    if !intact(value) {
        return Decoded::Damaged;
    }
    if value[0] == BATCH_VERSION {
        return decode_batch(keys, stream, first, value);
    }
    let mut records = Vec::new();
    let mut rest = &value[HEADER..];
    while !rest.is_empty() {
        let Some(part) = next_framed(&mut rest) else {
            return Decoded::Damaged;
        };
        if part.first() != Some(&BATCH_VERSION) {
            return Decoded::Damaged;
        }
        match decode_batch(keys, stream, first + records.len() as u64, part) {
            Decoded::Records(part) => records.extend(part),
            other => return other,
        }
    }
    if records.len() as u64 == u64::from(count_of(value)) {
        Decoded::Records(records)
    } else {
        Decoded::Damaged
    }
}

/// Takes the next `length (u32 LE) | bytes` off the front of `rest`; `None` if it is cut short.
fn next_framed<'v>(rest: &mut &'v [u8]) -> Option<&'v [u8]> {
    let len = rest
        .get(..4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)?;
    let framed = rest.get(4..4 + len)?;
    *rest = &rest[4 + len..];
    Some(framed)
}

/// [`decode`] for a batch as a commit writes it.
fn decode_batch(keys: &DataKeys, stream: &str, first: u64, value: &[u8]) -> Decoded {
    if !intact(value) {
        return Decoded::Damaged;
    }
    if !keys.holds(stream, first) {
        return Decoded::Shredded;
    }
    let count = count_of(value);
    let kept_ms = kept_of(value);
    let Some(body) = keys.unseal(stream, first, &value[HEADER..]) else {
        return Decoded::Damaged;
    };
    let body = zeroize::Zeroizing::new(body);
    let mut rest = body.as_slice();
    let mut out = Vec::with_capacity(usize::try_from(count).unwrap_or(0).min(1 << 16));
    for _ in 0..count {
        let Some(record) = next_framed(&mut rest) else {
            return Decoded::Damaged;
        };
        out.push((kept_ms, record.to_vec()));
    }
    if rest.is_empty() {
        Decoded::Records(out)
    } else {
        Decoded::Damaged
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

/// The outbox on sled.
#[derive(Debug)]
pub struct SledOutbox {
    db: sled::Db,
    tree: sled::Tree,
    vault: Vault,
    /// Bytes of record batches held (see [`Outbox::record_bytes`]).
    record_bytes: AtomicU64,
}

impl SledOutbox {
    /// Opens (or creates) the outbox in directory `dir`: sled's files in `dir/sled/`, the data keys
    /// in `dir/keys`.
    ///
    /// sled locks its directory; a database closed a moment ago can still hold the lock while its
    /// background flusher stops, so a locked directory is retried for up to two seconds. Opening
    /// reads every batch header once, to learn the bytes held.
    pub fn open(dir: &Path) -> Result<Self, OutboxError> {
        let vault = Vault::open(dir)?;
        let config = sled::Config::new()
            .path(dir.join("sled"))
            .cache_capacity(16 * 1024 * 1024);
        let mut attempts = 0;
        let db = loop {
            match config.open() {
                Err(sled::Error::Io(err))
                    if attempts < 40 && err.to_string().contains("could not acquire lock") =>
                {
                    attempts += 1;
                    std::thread::sleep(Duration::from_millis(50));
                }
                other => break other?,
            }
        };
        let tree = db.open_tree("outbox")?;
        let mut bytes = 0;
        for item in tree.scan_prefix(b"r") {
            bytes += item?.1.len() as u64;
        }
        Ok(Self {
            db,
            tree,
            vault,
            record_bytes: AtomicU64::new(bytes),
        })
    }

    /// The batches of `stream` from the one holding sequence `from` on.
    fn batches_from(
        &self,
        stream: &str,
        from: u64,
    ) -> Result<impl Iterator<Item = Entry<sled::IVec>>, OutboxError> {
        let start = self
            .tree
            .range(record_key(stream, 0)..=record_key(stream, from))
            .next_back()
            .transpose()?
            .map_or(from, |(k, _)| seq_of(&k));
        Ok(self
            .tree
            .range(record_key(stream, start)..=record_key(stream, u64::MAX))
            .map(|item| Ok(item.map(|(k, v)| (seq_of(&k), v))?)))
    }

    /// Overwrites a stored batch value (tests of damage detection).
    #[cfg(test)]
    fn raw_insert(&self, stream: &str, first: u64, value: &[u8]) {
        self.tree.insert(record_key(stream, first), value).unwrap();
    }

    #[cfg(test)]
    fn raw_get(&self, stream: &str, first: u64) -> Vec<u8> {
        self.tree
            .get(record_key(stream, first))
            .unwrap()
            .unwrap()
            .to_vec()
    }
}

impl Outbox for SledOutbox {
    fn commit(&self, commit: &Commit) -> Result<(), OutboxError> {
        let mut keys = self.vault.lock();
        let mut batch = sled::Batch::default();
        let mut added = 0;
        for a in commit.appends.iter().filter(|a| !a.records.is_empty()) {
            for (first, records) in batches(a) {
                let value = encode(&mut keys, a, first, records)?;
                added += value.len() as u64;
                batch.insert(record_key(&a.stream, first), value);
            }
            let next = a.first + a.records.len() as u64;
            batch.insert(named_key(b'n', &a.stream), &next.to_be_bytes());
        }
        let mut written = Vec::new();
        for (name, bytes) in &commit.checkpoints {
            let key = named_key(b'c', name);
            let (counter, value) = self.vault.seal_checkpoint(&mut keys, name, bytes, || {
                Ok(self.tree.get(&key)?.map(|v| v.to_vec()))
            })?;
            batch.insert(key, value);
            written.push((name.as_str(), counter));
        }
        self.tree.apply_batch(batch)?;
        self.db.flush()?;
        Vault::checkpoints_committed(&mut keys, &written)?;
        drop(keys);
        self.record_bytes.fetch_add(added, Ordering::Relaxed);
        Ok(())
    }

    fn read(&self, stream: &str, from: u64, max: usize) -> Result<ReadBatch, OutboxError> {
        let batches = self.batches_from(stream, from)?;
        read_batches(&self.vault, stream, batches, from, max, &|| {
            self.next_sequence(stream)
        })
    }

    fn oldest(&self, stream: &str) -> Result<Option<BatchInfo>, OutboxError> {
        first_batch(self.batches_from(stream, 0)?, &|| {
            self.next_sequence(stream).unwrap_or(0)
        })
    }

    fn purge_while(
        &self,
        stream: &str,
        purge: &mut dyn FnMut(&BatchInfo) -> bool,
    ) -> Result<Purged, OutboxError> {
        let (mut purged, firsts) = purge_batches(self.batches_from(stream, 0)?, purge, &|| {
            self.next_sequence(stream).unwrap_or(0)
        })?;
        if !firsts.is_empty() {
            let mut removals = sled::Batch::default();
            for first in firsts {
                removals.remove(record_key(stream, first));
            }
            self.tree.apply_batch(removals)?;
            self.db.flush()?;
            sub_bytes(&self.record_bytes, purged.bytes);
        }
        shred(self, &self.vault, stream, &mut purged)?;
        Ok(purged)
    }

    fn next_sequence(&self, stream: &str) -> Result<u64, OutboxError> {
        Ok(self
            .tree
            .get(named_key(b'n', stream))?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map_or(1, u64::from_be_bytes))
    }

    fn checkpoint(&self, name: &str) -> Result<Option<Vec<u8>>, OutboxError> {
        let value = self.tree.get(named_key(b'c', name))?;
        Ok(value.and_then(|v| self.vault.open_checkpoint(name, &v)))
    }

    fn record_bytes(&self) -> u64 {
        self.record_bytes.load(Ordering::Relaxed)
    }

    fn streams(&self) -> Result<Vec<String>, OutboxError> {
        stream_names(self.tree.scan_prefix(b"n").map(|item| Ok(item?.0)))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    /// What the tests need from each backend beyond the trait.
    trait Backend: Outbox + Sized {
        fn open_in(dir: &Path) -> Self;
        /// Overwrites a stored batch value (tests of damage detection).
        fn raw(&self, stream: &str, first: u64, value: &[u8]);
        /// A stored batch value.
        fn raw_value(&self, stream: &str, first: u64) -> Vec<u8>;
        fn vault(&self) -> &Vault;
        /// Moves what a commit made durable elsewhere into the engine's main store (redb's log).
        fn fold(&self);
    }

    impl Backend for SledOutbox {
        fn open_in(dir: &Path) -> Self {
            SledOutbox::open(dir).unwrap()
        }
        fn raw(&self, stream: &str, first: u64, value: &[u8]) {
            self.raw_insert(stream, first, value);
        }
        fn raw_value(&self, stream: &str, first: u64) -> Vec<u8> {
            self.raw_get(stream, first)
        }
        fn vault(&self) -> &Vault {
            &self.vault
        }
        fn fold(&self) {}
    }

    #[cfg(feature = "redb")]
    impl Backend for RedbOutbox {
        fn open_in(dir: &Path) -> Self {
            RedbOutbox::open(dir).unwrap()
        }
        fn raw(&self, stream: &str, first: u64, value: &[u8]) {
            self.raw_insert(stream, first, value);
        }
        fn raw_value(&self, stream: &str, first: u64) -> Vec<u8> {
            self.raw_get(stream, first)
        }
        fn vault(&self) -> &Vault {
            self.vault_for_tests()
        }
        fn fold(&self) {
            RedbOutbox::fold(self);
        }
    }

    /// Runs each generic test on every backend built.
    macro_rules! on_every_backend {
        ($($test:ident),* $(,)?) => {
            mod sled {
                $(#[test] fn $test() { super::$test::<super::SledOutbox>() })*
            }
            #[cfg(feature = "redb")]
            mod redb {
                $(#[test] fn $test() { super::$test::<super::RedbOutbox>() })*
            }
        };
    }

    on_every_backend!(
        records_and_checkpoints_survive_a_reopen_and_read_from_any_sequence,
        purges_by_age_keep_sequences_moving_forward,
        a_damaged_batch_is_reported_not_returned,
        purged_records_cannot_be_read_back_from_the_disk,
        checkpoints_are_sealed_and_old_versions_shredded,
        a_large_append_is_stored_in_bounded_batches,
    );

    fn rec(seq: u64) -> Vec<u8> {
        format!("record {seq}").into_bytes()
    }

    fn append(stream: &str, first: u64, last: u64, kept_ms: i64) -> Append {
        Append {
            stream: stream.into(),
            first,
            kept_ms,
            key_period: Duration::from_secs(10),
            records: (first..=last).map(|s| rec(s).into()).collect(),
        }
    }

    fn commit(outbox: &impl Outbox, appends: Vec<Append>) {
        outbox
            .commit(&Commit {
                appends,
                checkpoints: Vec::new(),
            })
            .unwrap();
    }

    fn seqs(read: &ReadBatch) -> Vec<u64> {
        read.records.iter().map(|r| r.sequence).collect()
    }

    fn records_and_checkpoints_survive_a_reopen_and_read_from_any_sequence<B: Backend>() {
        let dir = tempfile::tempdir().unwrap();
        {
            let outbox = B::open_in(dir.path());
            outbox
                .commit(&Commit {
                    appends: vec![append("noise", 1, 5, 10), append("air", 1, 1, 10)],
                    checkpoints: vec![("window/footfall".into(), b"{\"windows\":{}}".to_vec())],
                })
                .unwrap();
            commit(&outbox, vec![append("noise", 6, 8, 20)]);
        }
        let outbox = B::open_in(dir.path());
        assert_eq!(outbox.next_sequence("noise").unwrap(), 9);
        assert_eq!(outbox.next_sequence("air").unwrap(), 2);
        assert_eq!(outbox.next_sequence("parking").unwrap(), 1);
        assert_eq!(
            outbox
                .oldest("noise")
                .unwrap()
                .map(|b| (b.first, b.count, b.kept_ms)),
            Some((1, 5, 10))
        );
        let read = outbox.read("noise", 4, 3).unwrap();
        assert_eq!(seqs(&read), [4, 5, 6]);
        assert_eq!(read.records[0].bytes, rec(4));
        assert_eq!((read.records[1].kept_ms, read.records[2].kept_ms), (10, 20));
        assert_eq!(outbox.read("noise", 9, 10).unwrap(), ReadBatch::default());
        assert_eq!(
            outbox.checkpoint("window/footfall").unwrap().as_deref(),
            Some(&b"{\"windows\":{}}"[..])
        );
        // The byte count is rebuilt from the batches on open.
        let expected = [
            append("noise", 1, 5, 10),
            append("air", 1, 1, 10),
            append("noise", 6, 8, 20),
        ]
        .iter()
        .map(|a| batch_len(&a.records) as u64)
        .sum::<u64>();
        assert_eq!(outbox.record_bytes(), expected);
    }

    fn a_large_append_is_stored_in_bounded_batches<B: Backend>() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = B::open_in(dir.path());
        // 300 records of 200 bytes, and in their midst one of 20 KiB: larger than a batch.
        let mut records: Vec<bytes::Bytes> = (1..=300)
            .map(|s| {
                let mut r = rec(s);
                r.resize(200, b'x');
                r.into()
            })
            .collect();
        records.insert(150, vec![7; 20 * 1024].into());
        let commit = Commit {
            appends: vec![Append {
                records: records.clone(),
                ..append("s", 1, 1, 10)
            }],
            checkpoints: Vec::new(),
        };
        outbox.commit(&commit).unwrap();
        assert_eq!(outbox.record_bytes(), commit.record_bytes());
        assert_eq!(outbox.next_sequence("s").unwrap(), 302);
        let read = outbox.read("s", 1, 1_000).unwrap();
        assert_eq!(seqs(&read), (1..=301).collect::<Vec<_>>());
        assert!(
            read.records
                .iter()
                .zip(&records)
                .all(|(r, b)| r.bytes == **b)
        );

        // The batches, oldest first, by taking them off one by one.
        let mut batches = Vec::new();
        while let Some(b) = outbox.oldest("s").unwrap() {
            outbox
                .purge_while("s", &mut |p| p.first == b.first)
                .unwrap();
            batches.push(b);
        }
        assert!(batches.len() >= 5, "{batches:?}");
        assert!(
            batches
                .windows(2)
                .all(|w| w[0].first + w[0].count == w[1].first)
        );
        assert_eq!(batches.iter().map(|b| b.count).sum::<u64>(), 301);
        assert_eq!(
            batches.iter().map(|b| b.bytes).sum::<u64>(),
            commit.record_bytes()
        );
        for (i, b) in batches.iter().enumerate() {
            if b.first == 151 {
                assert_eq!(b.count, 1, "the large record is alone: {b:?}");
                continue;
            }
            assert!(b.bytes <= BATCH_MAX as u64, "{b:?}");
            // Each batch is filled, but the last before the large record and the last of all.
            let followed_by_large = batches.get(i + 1).is_some_and(|n| n.first == 151);
            if !followed_by_large && i + 1 < batches.len() {
                assert!(b.bytes + 204 > BATCH_MAX as u64, "{b:?}");
            }
        }
    }

    fn purges_by_age_keep_sequences_moving_forward<B: Backend>() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = B::open_in(dir.path());
        commit(&outbox, vec![append("s", 1, 3, 1_000)]);
        commit(&outbox, vec![append("s", 4, 4, 2_000)]);
        commit(&outbox, vec![append("s", 5, 6, 3_000)]);
        let purged = outbox.purge_while("s", &mut |b| b.kept_ms < 2_500).unwrap();
        assert_eq!(purged.records, 4);
        assert_eq!(purged.sequences, Some((1, 4)));
        assert_eq!(purged.kept_ms, Some((1_000, 2_000)));
        assert_eq!(seqs(&outbox.read("s", 1, 10).unwrap()), [5, 6]);
        outbox.purge_while("s", &mut |_| true).unwrap();
        assert_eq!(outbox.oldest("s").unwrap(), None);
        assert_eq!(outbox.record_bytes(), 0);
        drop(outbox);
        // Emptied by retention, the stream still continues from 7 after a restart.
        let outbox = B::open_in(dir.path());
        assert_eq!(outbox.next_sequence("s").unwrap(), 7);
    }

    fn a_damaged_batch_is_reported_not_returned<B: Backend>() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = B::open_in(dir.path());
        for (f, l) in [(1, 3), (4, 6), (7, 9)] {
            commit(&outbox, vec![append("noise", f, l, 5)]);
        }
        // A flipped bit in the middle batch, and a torn (truncated) last batch.
        let mut value = outbox.raw_value("noise", 4);
        value[HEADER + 6] ^= 0x10;
        outbox.raw("noise", 4, &value);
        let torn = outbox.raw_value("noise", 7);
        outbox.raw("noise", 7, &torn[..torn.len() - 3]);
        // A read stops before the damage once it has records …
        let read = outbox.read("noise", 2, 100).unwrap();
        assert_eq!(seqs(&read), [2, 3]);
        assert!(read.damaged.is_empty());
        // … and reports it when it starts there.
        let read = outbox.read("noise", 4, 100).unwrap();
        assert_eq!(seqs(&read), Vec::<u64>::new());
        assert_eq!(read.damaged, vec![(4, 6), (7, 9)]);
        // Retention removes damaged batches first.
        let purged = outbox.purge_while("noise", &mut |b| b.kept_ms < 0).unwrap();
        assert_eq!(purged, Purged::default());
        let mut seen = Vec::new();
        outbox
            .purge_while("noise", &mut |b| {
                seen.push((b.first, b.count, b.damaged));
                true
            })
            .unwrap();
        assert_eq!(seen, [(1, 3, false), (4, 3, true), (7, 3, true)]);
    }

    /// Every file under `dir`, concatenated.
    fn disk_bytes(dir: &Path) -> Vec<u8> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                out.extend(disk_bytes(&path));
            } else {
                out.extend(std::fs::read(&path).unwrap());
            }
        }
        out
    }

    fn holds(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    /// Neither engine overwrites what it deletes; the destroyed data key makes what is left of a
    /// purged record unreadable.
    fn purged_records_cannot_be_read_back_from_the_disk<B: Backend>() {
        let dir = tempfile::tempdir().unwrap();
        let marked = |first: u64, kept_ms: i64| {
            let mut a = append("s", first, first + 99, kept_ms);
            for (i, r) in a.records.iter_mut().enumerate() {
                *r = format!("MARKER-{:05}", first + i as u64)
                    .into_bytes()
                    .into();
            }
            a
        };
        let outbox = B::open_in(dir.path());
        // Two key periods (10 s each): records 1..=200 under one key, 201..=300 under the next.
        commit(&outbox, vec![marked(1, 0)]);
        commit(&outbox, vec![marked(101, 5_000)]);
        let key_path = dir.path().join("keys");
        let old_key = outbox.vault().lock().raw_key(&key_path, "s", 1).unwrap();
        commit(&outbox, vec![marked(201, 10_000)]);
        // Sealed: no record is on disk in clear.
        assert!(!holds(&disk_bytes(dir.path()), b"MARKER-"));
        // Purging the first batch leaves the key: the second batch still needs it.
        let purged = outbox.purge_while("s", &mut |b| b.first == 1).unwrap();
        assert!(purged.keys_destroyed.is_empty());
        assert!(holds(&disk_bytes(dir.path()), &old_key));
        // Purging the second destroys it, in the key file too.
        let purged = outbox.purge_while("s", &mut |b| b.first == 101).unwrap();
        assert_eq!(purged.keys_destroyed, [1]);
        assert!(!holds(&disk_bytes(dir.path()), &old_key));
        // The records still held read as before, also after a reopen.
        drop(outbox);
        let outbox = B::open_in(dir.path());
        let read = outbox.read("s", 1, 1000).unwrap();
        assert_eq!(seqs(&read), (201..=300).collect::<Vec<_>>());
        assert_eq!(read.records[0].bytes, b"MARKER-00201");
        assert!(read.damaged.is_empty());
    }

    /// A packed value holds only sealed parts, and a purge of it destroys the keys its parts
    /// alone needed, also where its parts were sealed under two keys.
    #[cfg(feature = "redb")]
    #[test]
    fn packed_values_hold_sealed_parts_and_their_purge_destroys_their_keys() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = RedbOutbox::open(dir.path()).unwrap();
        let marked = |first: u64, kept_ms: i64| Append {
            records: (first..first + 10)
                .map(|s| format!("MARKER-{s:05}").into_bytes().into())
                .collect(),
            key_period: Duration::from_secs(1),
            ..append("s", first, first, kept_ms)
        };
        // Keys rotate every second: 1..=20 under the first key, 21..=40 under the next; the
        // three batches kept within a second of each other are packed into one value.
        for (first, kept_ms) in [(1, 500), (11, 900), (21, 1_500), (31, 2_400)] {
            commit(&outbox, vec![marked(first, kept_ms)]);
        }
        outbox.fold_packed();
        let oldest = outbox.oldest("s").unwrap().unwrap();
        assert_eq!((oldest.first, oldest.count), (1, 30));
        assert!(!holds(&disk_bytes(dir.path()), b"MARKER-"));
        let key_path = dir.path().join("keys");
        let first_key = outbox.vault().lock().raw_key(&key_path, "s", 1).unwrap();
        let second_key = outbox.vault().lock().raw_key(&key_path, "s", 21).unwrap();
        // The packed value goes whole; the first key with it, the second stays for 31..=40.
        let purged = outbox.purge_while("s", &mut |b| b.kept_ms < 600).unwrap();
        assert_eq!(
            (purged.records, purged.keys_destroyed.clone()),
            (30, vec![1])
        );
        let disk = disk_bytes(dir.path());
        assert!(!holds(&disk, &first_key));
        assert!(holds(&disk, &second_key));
        let read = outbox.read("s", 1, 100).unwrap();
        assert_eq!(seqs(&read), (31..=40).collect::<Vec<_>>());
    }

    fn checkpoint_commit(outbox: &impl Outbox, name: &str, bytes: &[u8]) {
        outbox
            .commit(&Commit {
                appends: Vec::new(),
                checkpoints: vec![(name.into(), bytes.to_vec())],
            })
            .unwrap();
    }

    fn checkpoints_are_sealed_and_old_versions_shredded<B: Backend>() {
        let dir = tempfile::tempdir().unwrap();
        let key_path = dir.path().join("keys");
        let series = checkpoint_series("window/footfall");
        let first_key = {
            let outbox = B::open_in(dir.path());
            checkpoint_commit(&outbox, "window/footfall", b"GROUPS-v1");
            checkpoint_commit(&outbox, "window/footfall", b"GROUPS-v2");
            assert_eq!(
                outbox.checkpoint("window/footfall").unwrap().as_deref(),
                Some(&b"GROUPS-v2"[..])
            );
            outbox
                .vault()
                .lock()
                .raw_key(&key_path, &series, 1)
                .unwrap()
        };
        assert!(!holds(&disk_bytes(dir.path()), b"GROUPS-"));
        // A new process seals the next version under a key of its own; once it is durable, the
        // key of the older versions is destroyed.
        let outbox = B::open_in(dir.path());
        assert_eq!(
            outbox.checkpoint("window/footfall").unwrap().as_deref(),
            Some(&b"GROUPS-v2"[..])
        );
        checkpoint_commit(&outbox, "window/footfall", b"GROUPS-v3");
        assert!(!holds(&disk_bytes(dir.path()), &first_key));
        assert_eq!(
            outbox.checkpoint("window/footfall").unwrap().as_deref(),
            Some(&b"GROUPS-v3"[..])
        );
        assert_eq!(outbox.checkpoint("window/other").unwrap(), None);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Append(u8),
        Purge(u8),
        Read(u8, u8),
        Reopen,
        Fold,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (1u8..20).prop_map(Op::Append),
            1 => any::<u8>().prop_map(Op::Purge),
            2 => (any::<u8>(), 1u8..50).prop_map(|(f, m)| Op::Read(f, m)),
            1 => Just(Op::Reopen),
            1 => Just(Op::Fold),
        ]
    }

    /// The outbox behaves like an ordered map of sequence to record, across reopens.
    fn the_outbox_matches_a_model<B: Backend>(ops: Vec<Op>) -> Result<(), TestCaseError> {
        let dir = tempfile::tempdir().unwrap();
        let mut outbox = B::open_in(dir.path());
        let mut model: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        let mut next = 1u64;
        // Batches as (first, count), to model purges of whole batches.
        let mut batches: Vec<(u64, u64)> = Vec::new();
        for op in ops {
            match op {
                Op::Append(n) => {
                    let n = u64::from(n);
                    commit(&outbox, vec![append("s", next, next + n - 1, 0)]);
                    for s in next..next + n {
                        model.insert(s, rec(s));
                    }
                    batches.push((next, n));
                    next += n;
                }
                Op::Purge(before) => {
                    let before = u64::from(before);
                    let removed = outbox
                        .purge_while("s", &mut |b| b.first + b.count <= before)
                        .unwrap();
                    let mut expected = 0;
                    while let Some(&(f, c)) = batches.first() {
                        if f + c > before {
                            break;
                        }
                        for s in f..f + c {
                            model.remove(&s);
                        }
                        expected += c;
                        batches.remove(0);
                    }
                    prop_assert_eq!(removed.records, expected);
                }
                Op::Read(from, max) => {
                    let read = outbox.read("s", u64::from(from), usize::from(max)).unwrap();
                    let want: Vec<(u64, Vec<u8>)> = model
                        .range(u64::from(from)..)
                        .take(usize::from(max))
                        .map(|(s, r)| (*s, r.clone()))
                        .collect();
                    let got: Vec<(u64, Vec<u8>)> = read
                        .records
                        .into_iter()
                        .map(|r| (r.sequence, r.bytes))
                        .collect();
                    prop_assert_eq!(got, want);
                    prop_assert!(read.damaged.is_empty());
                }
                Op::Reopen => {
                    drop(outbox);
                    outbox = B::open_in(dir.path());
                }
                Op::Fold => outbox.fold(),
            }
            prop_assert_eq!(outbox.next_sequence("s").unwrap(), next);
            prop_assert_eq!(
                outbox.oldest("s").unwrap().map(|b| b.first),
                batches.first().map(|b| b.0)
            );
            let bytes: u64 = batches
                .iter()
                .map(|&(f, c)| {
                    batch_len(&(f..f + c).map(|s| rec(s).into()).collect::<Vec<_>>()) as u64
                })
                .sum();
            prop_assert_eq!(outbox.record_bytes(), bytes);
        }
        Ok(())
    }

    /// Records of a stream as `values` hold them, by stream: sequence, kept time, bytes; and the
    /// values of other keys.
    type Contents = (
        BTreeMap<Vec<u8>, Vec<(u64, i64, Vec<u8>)>>,
        Vec<(Vec<u8>, Vec<u8>)>,
    );

    fn contents<'v>(
        keys: &DataKeys,
        values: impl Iterator<Item = (&'v [u8], &'v [u8])>,
    ) -> Contents {
        let (mut records, mut others) = (BTreeMap::new(), Vec::new());
        for (key, value) in values {
            if key[0] != b'r' {
                others.push((key.to_vec(), value.to_vec()));
                continue;
            }
            let stream = &key[1..key.len() - 9];
            let first = seq_of(key);
            let name = std::str::from_utf8(stream).unwrap();
            let Decoded::Records(held) = decode(keys, name, first, value) else {
                panic!("a value of {name} from {first} does not decode");
            };
            let list: &mut Vec<_> = records.entry(stream.to_vec()).or_default();
            list.extend(
                (first..)
                    .zip(held)
                    .map(|(seq, (kept, bytes))| (seq, kept, bytes)),
            );
        }
        (records, others)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Batches as commits write them (of two streams, with gaps in the sequences), packed:
        /// every record reads back as it was, with its kept time, other values are kept as they
        /// are, and packed values are at most a batch long and span at most a second of kept
        /// times.
        #[test]
        fn packing_keeps_every_record_in_bounded_values(
            specs in prop::collection::vec((0usize..2, 1u64..8, 1usize..2_500, prop::bool::weighted(0.1)), 1..60)
        ) {
            let dir = tempfile::tempdir().unwrap();
            let vault = Vault::open(dir.path()).unwrap();
            let mut keys = vault.lock();
            let mut next = [1u64; 2];
            let mut inserts = BTreeMap::new();
            inserts.insert(named_key(b'c', "window"), b"checkpoint".to_vec());
            for (i, (stream, n, size, gap)) in specs.into_iter().enumerate() {
                let name = ["a", "b"][stream];
                let first = next[stream] + u64::from(gap);
                let records = (first..first + n).map(|q| {
                    let mut r = rec(q);
                    r.resize(size, b'.');
                    r.into()
                });
                let a = Append {
                    stream: name.into(),
                    first,
                    kept_ms: 100 * i as i64,
                    // A new data key every second: some packed values hold parts of two.
                    key_period: Duration::from_secs(1),
                    records: records.collect(),
                };
                for (first, batch) in batches(&a) {
                    inserts.insert(record_key(name, first), encode(&mut keys, &a, first, batch).unwrap());
                }
                next[stream] = first + n;
                inserts.insert(named_key(b'n', name), next[stream].to_be_bytes().to_vec());
            }
            let inserts: Vec<(Vec<u8>, Vec<u8>)> = inserts.into_iter().collect();
            let (packed, growth) = pack(&inserts);

            let before = contents(&keys, inserts.iter().map(|(k, v)| (k.as_slice(), v.as_slice())));
            let after = contents(&keys, packed.iter().map(|(k, v)| (*k, v.as_ref())));
            prop_assert_eq!(&after, &before);
            let bytes = |values: &mut dyn Iterator<Item = usize>| values.sum::<usize>() as u64;
            prop_assert_eq!(
                bytes(&mut packed.iter().map(|(_, v)| v.len())),
                bytes(&mut inserts.iter().map(|(_, v)| v.len())) + growth
            );
            for (key, value) in &packed {
                if value[0] != PACKED_VERSION || key[0] != b'r' {
                    continue;
                }
                prop_assert!(value.len() <= BATCH_MAX, "{}", value.len());
                let name = std::str::from_utf8(&key[1..key.len() - 9]).unwrap();
                let Decoded::Records(held) = decode(&keys, name, seq_of(key), value) else {
                    unreachable!("checked above");
                };
                let kept = held.iter().map(|(kept, _)| *kept);
                let span = kept.clone().max().unwrap() - kept.min().unwrap();
                prop_assert!(span <= PACK_SPAN_MS as i64, "{}", span);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn sled_matches_the_model(ops in prop::collection::vec(op(), 1..40)) {
            the_outbox_matches_a_model::<SledOutbox>(ops)?;
        }

        #[cfg(feature = "redb")]
        #[test]
        fn redb_matches_the_model(ops in prop::collection::vec(op(), 1..40)) {
            the_outbox_matches_a_model::<RedbOutbox>(ops)?;
        }
    }
}
