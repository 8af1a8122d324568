//! The outbox on redb: the same layout and batch format as on sled, in one redb table.
//!
//! A commit is made durable in the write-ahead log ([`super::wal`]): its inserts wait in memory,
//! where reads find them, until a thread of the outbox's own folds them into redb with one
//! transaction, once they reach [`FOLD_BYTES`] or the oldest is [`FOLD_AFTER`] old (a commit
//! starts the fold, or the fold thread itself when commits stop, which also retries a failed
//! write once a second). The log's
//! other half takes the commits meanwhile; a commit waits only if that half fills before the
//! fold ends. A commit too large for half the log writes what waits and itself to redb in one
//! transaction, as does a purge that reaches a batch still waiting. Opening folds what the log
//! holds past the last fold. Folds and the writes of commits pack the batches of consecutive
//! commits of a stream into larger values ([`super::pack`]); a purge's write does not, so that
//! the batches it chose are the ones it removes, nor a write after a failure, which replaces
//! whatever a fold that failed may have left of what waits.
//!
//! Locks: the log's before the data keys. A commit holds the log's from sealing until its inserts
//! are durable and in memory, and a purge until it has destroyed keys, so that no key is
//! destroyed while a batch sealed with it is on its way in; a commit never waits for a fold
//! with the keys held.
//! redb makes each of its transactions durable before it returns.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use hubgate_exporters::catalogue;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::format::{Packed, batches, encode, named_key, pack, record_key, seq_of};
use super::vault::Vault;
use super::wal::{Insert, Wal};
use super::{
    BatchInfo, Commit, Entry, Finding, Outbox, OutboxError, Purged, ReadBatch, Survey, first_batch,
    purge_batches, read_batches, shred, stream_names, sub_bytes, survey_batches,
};

const TABLE: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("outbox");

/// Key of the id of the last log entry folded into redb (u64 BE).
const FOLDED_KEY: &[u8] = b"w";
/// Size of the log file by default (`store.log_bytes`): two halves of 4 MiB, room for a whole
/// window checkpoint and for what comes while the other half is folded.
const LOG_BYTES: u64 = 8 << 20;
/// Bytes appended to the log's active half at which a commit starts a fold. A fold writes them
/// with redb's fixed cost once; what waits is also held in memory.
pub const FOLD_BYTES: u64 = 1 << 20;
/// Age of the oldest entry of the active half at which a commit, or the fold thread when commits
/// stop, starts a fold.
pub const FOLD_AFTER: Duration = Duration::from_secs(1);

fn db_error(err: impl Into<redb::Error>) -> OutboxError {
    OutboxError::Redb(Box::new(err.into()))
}

/// The log and the folds' progress.
#[derive(Debug)]
struct Log {
    wal: Wal,
    /// Bytes appended to the active half, and when its first entry was.
    active_bytes: u64,
    since: Option<Instant>,
    /// The last entry id of the fold being written, if one is.
    folding: Option<u64>,
    /// A fold or an append failed (or the fold thread is gone): the next commit writes what
    /// waits through to redb, with an id past every entry written, before the log is used again.
    failed: bool,
}

impl Log {
    /// The active half holds nothing yet.
    fn active_empty(&mut self) {
        self.active_bytes = 0;
        self.since = None;
    }

    /// The log starts again from its first half: every entry is in redb.
    fn reset(&mut self) {
        self.wal.reset();
        self.active_empty();
    }
}

/// Inserts durable in the log and not yet folded into redb: by table key, the id of the entry
/// that wrote the value, and the value.
#[derive(Debug)]
struct Waiting {
    inserts: BTreeMap<Vec<u8>, (u64, Arc<[u8]>)>,
    /// Bytes of the keys and values of `inserts`, shown by `gauge`.
    bytes: u64,
    gauge: metrics::Gauge,
}

impl Waiting {
    fn new() -> Self {
        let gauge = metrics::gauge!(catalogue::OUTBOX_LOG_WAITING_BYTES);
        gauge.set(0.0);
        Self {
            inserts: BTreeMap::new(),
            bytes: 0,
            gauge,
        }
    }

    fn insert(&mut self, key: Vec<u8>, id: u64, value: Arc<[u8]>) {
        self.bytes += (key.len() + value.len()) as u64;
        let added = key.len();
        if let Some((_, old)) = self.inserts.insert(key, (id, value)) {
            self.bytes -= (added + old.len()) as u64;
        }
        self.gauge.set(self.bytes as f64);
    }

    /// Drops what entries up to `last` wrote and no later entry replaced: it is in redb.
    fn folded(&mut self, last: u64) {
        let mut bytes = 0;
        self.inserts.retain(|key, (id, value)| {
            let keep = *id > last;
            if keep {
                bytes += (key.len() + value.len()) as u64;
            }
            keep
        });
        self.bytes = bytes;
        self.gauge.set(bytes as f64);
    }

    fn clear(&mut self) {
        self.inserts.clear();
        self.bytes = 0;
        self.gauge.set(0.0);
    }
}

/// What the outbox shares with its fold thread.
#[derive(Debug)]
struct Shared {
    /// redb, reopened after an I/O error (redb answers every later call with `PreviousIo` until
    /// it is): `None` while it cannot be.
    db: std::sync::RwLock<Option<Arc<Database>>>,
    /// The database's file, to reopen it.
    path: std::path::PathBuf,
    /// Taken by writers (commits, purges) before the data keys.
    log: Mutex<Log>,
    /// Signalled when a fold ends.
    fold_ended: Condvar,
    waiting: Mutex<Waiting>,
    /// Bytes of record batches held (see [`Outbox::record_bytes`]).
    record_bytes: AtomicU64,
    #[cfg(test)]
    faults: Faults,
}

/// Failures a test makes the disk report: each count is how many of the next appends or redb
/// writes fail.
#[cfg(test)]
#[derive(Debug, Default)]
struct Faults {
    /// Appends whose entry is written and synced, and which then fail (as an `fdatasync` that
    /// reports an error after the blocks reached the disk).
    appends: std::sync::atomic::AtomicU32,
    /// Folds and write-throughs into redb that fail before writing anything.
    redb_writes: std::sync::atomic::AtomicU32,
    /// Folds and write-throughs into redb that commit, and then report a failure.
    redb_writes_landed: std::sync::atomic::AtomicU32,
    /// The fold thread leaves the log alone when commits stop (tests that check what waits).
    no_idle_folds: std::sync::atomic::AtomicBool,
    /// Folds wait before writing while this is set (tests of what happens meanwhile).
    hold_folds: std::sync::atomic::AtomicBool,
}

/// Where a fault can be injected.
#[derive(Clone, Copy)]
enum Fault {
    Append,
    RedbWrite,
    RedbWriteLanded,
}

/// A batch waiting in memory: its first sequence and its value.
type WaitingBatch = (u64, Arc<[u8]>);

/// Inserts to fold into redb, up to the log entry `last`.
struct Fold {
    inserts: Vec<(Vec<u8>, Arc<[u8]>)>,
    last: u64,
}

/// The outbox on redb.
#[derive(Debug)]
pub struct RedbOutbox {
    shared: Arc<Shared>,
    vault: Vault,
    /// Damage found in the log when it was opened.
    log_findings: Vec<Finding>,
    folds: Option<mpsc::Sender<Fold>>,
    folder: Option<std::thread::JoinHandle<()>>,
}

/// Writes `inserts` and the id of the last log entry they include to redb, in one durable
/// transaction. The stored id never goes back.
fn write<'v>(
    db: &Database,
    inserts: impl Iterator<Item = (&'v [u8], &'v [u8])>,
    last: u64,
) -> Result<(), OutboxError> {
    let tx = db.begin_write().map_err(db_error)?;
    {
        let mut table = tx.open_table(TABLE).map_err(db_error)?;
        for (key, value) in inserts {
            table.insert(key, value).map_err(db_error)?;
        }
        if last > folded_id(&table)? {
            table
                .insert(FOLDED_KEY, &last.to_be_bytes()[..])
                .map_err(db_error)?;
        }
    }
    tx.commit().map_err(db_error)
}

/// The id of the last log entry folded into redb (0 before the first).
fn folded_id(table: &impl ReadableTable<&'static [u8], &'static [u8]>) -> Result<u64, OutboxError> {
    let value = table.get(FOLDED_KEY).map_err(db_error)?;
    Ok(value
        .and_then(|v| <[u8; 8]>::try_from(v.value()).ok())
        .map_or(0, u64::from_be_bytes))
}

/// What the log's recovery lost, as findings: an entry that is not intact is the last write of a
/// killed process unless entries after it were replayed, which makes it damage and a loss.
fn log_findings(recovery: &super::wal::Recovery) -> Vec<Finding> {
    let lost = !recovery.missing.is_empty();
    let mut findings: Vec<Finding> = recovery
        .damaged
        .iter()
        .map(|offset| Finding {
            file: "outbox.log".into(),
            at: format!("offset {offset}"),
            what: if lost {
                "a log entry that is not intact".into()
            } else {
                "the last log entry is not intact: a write a killed process did not finish, never acknowledged".into()
            },
            lost: false,
        })
        .collect();
    if lost {
        findings.push(Finding {
            file: "outbox.log".into(),
            at: format!("entries {:?}", recovery.missing),
            what: "damaged log entries, before others that were replayed: the records they held are lost".into(),
            lost: true,
        });
    }
    findings
}

/// redb with hubgate's settings. Its page cache: records are written once and read back only by
/// readers behind the store's memory tail (a subscriber replaying, an exporter catching up), so
/// a small cache costs neither appends nor replays, while a large one stays resident
/// (BENCHMARKS.md, "Micro-benchmarks" and "Figures from the code's comments").
fn open_db(path: &Path) -> Result<Database, OutboxError> {
    Database::builder()
        .set_cache_size(2 * 1024 * 1024)
        .create(path)
        .map_err(db_error)
}

/// Whether `err` leaves redb unusable until it is reopened: an I/O error (a full disk) during a
/// write poisons the database.
fn poisons(err: &OutboxError) -> bool {
    matches!(err, OutboxError::Redb(e) if matches!(**e, redb::Error::PreviousIo | redb::Error::Io(_)))
}

impl Shared {
    /// The database, or an error when it could not be reopened after an I/O error.
    fn db(&self) -> Result<Arc<Database>, OutboxError> {
        self.db
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or_else(|| {
                OutboxError::Log(std::io::Error::other(
                    "redb is closed after an I/O error and could not be reopened yet",
                ))
            })
    }

    /// After `err`: when it poisoned redb, closes it and opens it again, so that the next write
    /// can succeed once the cause (a full disk) is gone. Readers holding the old handle keep it
    /// until they finish; should the reopen fail meanwhile, the next failure tries again.
    fn recover_from(&self, err: &OutboxError) {
        if !poisons(err) {
            return;
        }
        let mut db = self.db.write().unwrap_or_else(PoisonError::into_inner);
        drop(db.take());
        match open_db(&self.path) {
            Ok(reopened) => {
                tracing::warn!(file = %self.path.display(), "reopened the outbox's redb after an I/O error");
                metrics::counter!(catalogue::OUTBOX_REOPENS).increment(1);
                *db = Some(Arc::new(reopened));
            }
            Err(err) => {
                tracing::warn!(%err, file = %self.path.display(), "cannot reopen the outbox's redb yet");
            }
        }
    }

    /// [`write`] to the database, reopening it after an error that poisoned it.
    fn write_db<'v>(
        &self,
        inserts: impl Iterator<Item = (&'v [u8], &'v [u8])>,
        last: u64,
    ) -> Result<(), OutboxError> {
        let written = self.db().and_then(|db| write(&db, inserts, last));
        if let Err(err) = &written {
            self.recover_from(err);
        }
        written
    }

    /// A failure the tests inject at `fault`, if one is due.
    #[cfg(test)]
    fn injected(&self, fault: Fault) -> std::io::Result<()> {
        let count = match fault {
            Fault::Append => &self.faults.appends,
            Fault::RedbWrite => &self.faults.redb_writes,
            Fault::RedbWriteLanded => &self.faults.redb_writes_landed,
        };
        match count.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)) {
            Ok(_) => Err(std::io::Error::other("injected failure")),
            Err(_) => Ok(()),
        }
    }

    #[cfg(not(test))]
    fn injected(&self, _: Fault) -> std::io::Result<()> {
        Ok(())
    }

    /// Writes `inserts` to redb with the id of the last entry they include ([`write`]): a fold
    /// of the log, counted as written or failed.
    fn fold_into_redb<'v>(
        &self,
        inserts: impl Iterator<Item = (&'v [u8], &'v [u8])>,
        last: u64,
    ) -> Result<(), OutboxError> {
        let written = (self.injected(Fault::RedbWrite).map_err(OutboxError::Log))
            .and_then(|()| self.write_db(inserts, last))
            .and_then(|()| {
                self.injected(Fault::RedbWriteLanded)
                    .map_err(OutboxError::Log)
            });
        let outcome = if written.is_ok() { "written" } else { "failed" };
        metrics::counter!(catalogue::OUTBOX_LOG_FOLDS, "outcome" => outcome).increment(1);
        written
    }

    fn lock_log(&self) -> MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_waiting(&self) -> MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What waits in memory now, by key.
    fn waiting_now(&self) -> Vec<(Vec<u8>, Arc<[u8]>)> {
        let waiting = self.lock_waiting();
        let inserts = waiting.inserts.iter();
        inserts
            .map(|(k, (_, v))| (k.clone(), Arc::clone(v)))
            .collect()
    }

    /// A fold of the active half's entries.
    fn fold_of(&self, log: &Log) -> Fold {
        Fold {
            inserts: self.waiting_now(),
            last: log.wal.last_id(),
        }
    }

    /// Marks the fold up to entry `last` as being written, and makes the other half active.
    fn folding(log: &mut Log, last: u64) {
        log.folding = Some(last);
        log.wal.switch();
        log.active_empty();
    }

    /// What the fold thread does when commits have stopped coming: after a failure, writes what
    /// waits through to redb (as the next commit would); otherwise, once the active half's oldest
    /// entry is [`FOLD_AFTER`] old, returns a fold of it to write.
    fn idle_fold(&self) -> Option<Fold> {
        let mut log = self.lock_log();
        #[cfg(test)]
        if self.faults.no_idle_folds.load(Ordering::SeqCst) {
            return None;
        }
        // A fold handed over meanwhile is this thread's next job (and `no_fold` would wait for
        // it forever).
        if log.folding.is_some() {
            return None;
        }
        if log.failed {
            if let Err(err) = self.write_through(log, &[], false) {
                tracing::warn!(error = %err, "could not write the outbox log into redb: retried");
            }
            return None;
        }
        if log.since.is_none_or(|since| since.elapsed() < FOLD_AFTER) {
            return None;
        }
        let fold = self.fold_of(&log);
        Self::folding(&mut log, fold.last);
        Some(fold)
    }

    /// Waits until no fold is being written.
    fn no_fold<'a>(&'a self, mut log: MutexGuard<'a, Log>) -> MutexGuard<'a, Log> {
        while log.folding.is_some() {
            log = self
                .fold_ended
                .wait(log)
                .unwrap_or_else(PoisonError::into_inner);
        }
        log
    }

    /// Writes what waits and `inserts` to redb at once, and starts the log again; what waits
    /// packed, if `packed` ([`pack`]) and no write failed. Waits for a fold being written first.
    fn write_through<'a>(
        &'a self,
        log: MutexGuard<'a, Log>,
        inserts: &[Insert],
        packed: bool,
    ) -> Result<MutexGuard<'a, Log>, OutboxError> {
        let mut log = self.no_fold(log);
        if !log.failed && inserts.is_empty() && self.lock_waiting().inserts.is_empty() {
            // Every entry of the log is in redb.
            log.reset();
            return Ok(log);
        }
        // Nobody else adds to what waits while the log's lock is held.
        let waiting = self.waiting_now();
        // After a failure, what waits may be in redb already, packed by a fold that failed
        // after its commit, or that failed to learn it committed. Written unpacked, every
        // value under a key that waits is replaced; packed again, in groups that may differ as
        // more waits now, a part could stay behind in an old value beside its new one.
        let (waiting, growth) = if packed && !log.failed {
            pack(&waiting)
        } else {
            let unchanged = waiting.iter().map(|(k, v)| (k.as_slice(), (&v[..]).into()));
            (unchanged.collect(), 0)
        };
        let all = waiting
            .iter()
            .map(|(k, v): &Packed<'_>| (*k, v.as_ref()))
            .chain(inserts.iter().map(|(k, v)| (k.as_slice(), v.as_slice())));
        let last = log.wal.last_id();
        self.fold_into_redb(all, last)?;
        self.record_bytes.fetch_add(growth, Ordering::Relaxed);
        self.lock_waiting().clear();
        log.reset();
        log.failed = false;
        Ok(log)
    }

    /// Folds what a [`Fold`] holds (on the fold thread), then drops from memory what it wrote
    /// and no later entry replaced.
    fn fold(&self, fold: &Fold) {
        #[cfg(test)]
        while self.faults.hold_folds.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
        let (inserts, growth) = pack(&fold.inserts);
        let result = self.fold_into_redb(inserts.iter().map(|(k, v)| (*k, v.as_ref())), fold.last);
        if let Err(err) = &result {
            tracing::warn!(error = %err, "could not fold the outbox log into redb: retried");
        } else {
            self.record_bytes.fetch_add(growth, Ordering::Relaxed);
            self.lock_waiting().folded(fold.last);
        }
        let mut log = self.lock_log();
        log.folding = None;
        log.failed |= result.is_err();
        drop(log);
        self.fold_ended.notify_all();
    }
}

impl RedbOutbox {
    /// Opens (or creates) the outbox in directory `dir`: the database in `dir/outbox.redb`, its
    /// log in `dir/outbox.log`, the data keys in `dir/keys`. A file left by a killed process is
    /// repaired by redb on open, and what the log holds past the last fold is folded. Opening
    /// reads every batch once, to learn the bytes held.
    pub fn open(dir: &Path) -> Result<Self, OutboxError> {
        Self::open_with(dir, LOG_BYTES)
    }

    /// [`RedbOutbox::open`] with a write-ahead log of `log_bytes` (a larger existing log keeps
    /// its size).
    pub fn open_with(dir: &Path, log_bytes: u64) -> Result<Self, OutboxError> {
        let vault = Vault::open(dir)?;
        let path = dir.join("outbox.redb");
        let log_path = dir.join("outbox.log");
        let in_db = |err| OutboxError::in_file(&path, err);
        // redb asserts on some damage it finds in its pages: that becomes an error naming the
        // file, not a crash. Nothing opened here is used after a panic.
        let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let db = open_db(&path).map_err(in_db)?;
            let folded = (|| {
                let tx = db.begin_write().map_err(db_error)?;
                let folded = folded_id(&tx.open_table(TABLE).map_err(db_error)?)?;
                tx.commit().map_err(db_error)?;
                Ok(folded)
            })()
            .map_err(in_db)?;
            let (mut wal, entries, recovery) = Wal::open(&log_path, log_bytes, folded)
                .map_err(|err| OutboxError::in_file(&log_path, OutboxError::Log(err)))?;
            let inserts = entries
                .iter()
                .flatten()
                .map(|(k, v)| (k.as_slice(), v.as_slice()));
            write(&db, inserts, wal.last_id()).map_err(in_db)?;
            wal.reset();
            Ok::<_, OutboxError>((db, wal, recovery))
        }));
        let (db, wal, recovery) = opened.map_err(|panic| {
            OutboxError::in_file(&path, OutboxError::Panicked(super::panic_text(&*panic)))
        })??;
        let shared = Shared {
            db: std::sync::RwLock::new(Some(Arc::new(db))),
            path,
            log: Mutex::new(Log {
                wal,
                active_bytes: 0,
                since: None,
                folding: None,
                failed: false,
            }),
            fold_ended: Condvar::new(),
            waiting: Mutex::new(Waiting::new()),
            record_bytes: AtomicU64::new(0),
            #[cfg(test)]
            faults: Faults::default(),
        };
        shared
            .record_bytes
            .store(record_bytes(&*shared.db()?)?, Ordering::Relaxed);
        let shared = Arc::new(shared);
        let (folds, jobs) = mpsc::channel::<Fold>();
        let folder = start_folder(Arc::clone(&shared), jobs).map_err(OutboxError::Log)?;
        Ok(Self {
            shared,
            vault,
            log_findings: log_findings(&recovery),
            folds: Some(folds),
            folder: Some(folder),
        })
    }

    /// `stream`'s batches waiting in memory, in order, and a read transaction of redb begun
    /// at the same moment: no fold ends in between, so every part of a value that a fold packed
    /// and the read sees in redb is still waiting, or none is.
    fn waiting_batches(
        &self,
        stream: &str,
    ) -> Result<(Vec<WaitingBatch>, redb::ReadTransaction), OutboxError> {
        let (lo, hi) = (record_key(stream, 0), record_key(stream, u64::MAX));
        let waiting = self.shared.lock_waiting();
        let batches = (waiting.inserts.range(lo..=hi))
            .map(|(k, (_, v))| (seq_of(k), Arc::clone(v)))
            .collect();
        let tx = self.shared.db()?.begin_read().map_err(db_error)?;
        Ok((batches, tx))
    }

    /// The value waiting in memory under `key`.
    fn waiting_value(&self, key: &[u8]) -> Option<Arc<[u8]>> {
        let waiting = self.shared.lock_waiting();
        waiting.inserts.get(key).map(|(_, v)| Arc::clone(v))
    }

    /// The value stored under `key`: waiting in memory, or in redb.
    fn stored(&self, key: &[u8]) -> Result<Option<Vec<u8>>, OutboxError> {
        // Memory before redb: a fold that ends in between has written the value to redb first.
        if let Some(value) = self.waiting_value(key) {
            return Ok(Some(value.to_vec()));
        }
        let tx = self.shared.db()?.begin_read().map_err(db_error)?;
        let table = tx.open_table(TABLE).map_err(db_error)?;
        let value = table.get(key).map_err(db_error)?;
        Ok(value.map(|v| v.value().to_vec()))
    }

    /// Hands the active half's entries to the fold thread and makes the other half active.
    fn start_fold(&self, log: &mut Log) {
        let fold = self.shared.fold_of(log);
        let last = fold.last;
        let sent = (self.folds.as_ref()).is_some_and(|folds| folds.send(fold).is_ok());
        if sent {
            Shared::folding(log, last);
        } else {
            log.failed = true;
        }
    }

    /// Runs `f` over `stream`'s batches from the one holding `from` (0: from the oldest), those
    /// in redb and then those waiting in memory.
    fn with_batches<T>(
        &self,
        stream: &str,
        from: u64,
        f: impl FnOnce(&mut dyn Iterator<Item = Entry<Vec<u8>>>) -> T,
    ) -> Result<T, OutboxError> {
        // redb asserts on some damage it meets in a page (a page zeroed on disk): the read
        // fails with an error naming the file, and the gateway goes on.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.with_batches_unguarded(stream, from, f)
        }))
        .unwrap_or_else(|panic| {
            Err(OutboxError::in_file(
                &self.shared.path,
                OutboxError::Panicked(super::panic_text(&*panic)),
            ))
        })
    }

    fn with_batches_unguarded<T>(
        &self,
        stream: &str,
        from: u64,
        f: impl FnOnce(&mut dyn Iterator<Item = Entry<Vec<u8>>>) -> T,
    ) -> Result<T, OutboxError> {
        // A batch being folded is in both (packed, under its first part's key, in redb).
        let (waiting, tx) = self.waiting_batches(stream)?;
        let table = tx.open_table(TABLE).map_err(db_error)?;
        let (lo, hi) = (record_key(stream, 0), record_key(stream, from));
        let in_db = table
            .range(lo.as_slice()..=hi.as_slice())
            .map_err(db_error)?
            .next_back()
            .transpose()
            .map_err(db_error)?
            .map(|(k, _)| seq_of(k.value()));
        let in_waiting = waiting.iter().rev().map(|(s, _)| *s).find(|&s| s <= from);
        let start = in_db.max(in_waiting).unwrap_or(from);
        let (lo, hi) = (record_key(stream, start), record_key(stream, u64::MAX));
        let mut from_db = table
            .range(lo.as_slice()..=hi.as_slice())
            .map_err(db_error)?
            .map(|item| {
                let (k, v) = item.map_err(db_error)?;
                Ok((seq_of(k.value()), v.value().to_vec()))
            })
            .peekable();
        let mut from_waiting = waiting.into_iter().filter(|(s, _)| *s >= start).peekable();
        // In order of sequence; a batch in both (folded meanwhile) is taken once, from memory.
        let mut batches = std::iter::from_fn(move || {
            let db_next = match from_db.peek() {
                Some(Ok((s, _))) => Some(*s),
                Some(Err(_)) => return from_db.next(),
                None => None,
            };
            match (db_next, from_waiting.peek().map(|(s, _)| *s)) {
                (Some(d), Some(w)) if d < w => from_db.next(),
                (Some(d), Some(w)) => {
                    if d == w {
                        from_db.next();
                    }
                    from_waiting.next().map(|(s, v)| Ok((s, v.to_vec())))
                }
                (Some(_), None) => from_db.next(),
                (None, _) => from_waiting.next().map(|(s, v)| Ok((s, v.to_vec()))),
            }
        });
        Ok(f(&mut batches))
    }

    /// Writes what waits to redb as it is (tests that read or write redb's table directly).
    #[cfg(test)]
    pub(super) fn fold(&self) {
        let log = self.shared.lock_log();
        drop(self.shared.write_through(log, &[], false).unwrap());
    }

    /// Writes what waits to redb packed, as folds do.
    #[cfg(test)]
    pub(super) fn fold_packed(&self) {
        let log = self.shared.lock_log();
        drop(self.shared.write_through(log, &[], true).unwrap());
    }

    /// Overwrites a stored batch value (tests of damage detection).
    #[cfg(test)]
    pub(super) fn raw_insert(&self, stream: &str, first: u64, value: &[u8]) {
        self.fold();
        let tx = self.shared.db().unwrap().begin_write().unwrap();
        tx.open_table(TABLE)
            .unwrap()
            .insert(record_key(stream, first).as_slice(), value)
            .unwrap();
        tx.commit().unwrap();
    }

    #[cfg(test)]
    pub(super) fn vault_for_tests(&self) -> &Vault {
        &self.vault
    }

    #[cfg(test)]
    pub(super) fn raw_get(&self, stream: &str, first: u64) -> Vec<u8> {
        self.fold();
        let tx = self.shared.db().unwrap().begin_read().unwrap();
        let table = tx.open_table(TABLE).unwrap();
        let value = table
            .get(record_key(stream, first).as_slice())
            .unwrap()
            .unwrap();
        value.value().to_vec()
    }
}

impl Drop for RedbOutbox {
    /// Lets a fold being written end: what it has not written stays in the log.
    fn drop(&mut self) {
        drop(self.folds.take());
        if let Some(folder) = self.folder.take() {
            let _ = folder.join();
        }
    }
}

/// Bytes of record batches held in `db`.
fn record_bytes(db: &Database) -> Result<u64, OutboxError> {
    let tx = db.begin_read().map_err(db_error)?;
    let table = tx.open_table(TABLE).map_err(db_error)?;
    let mut bytes = 0;
    for item in table.range(&b"r"[..]..&b"s"[..]).map_err(db_error)? {
        bytes += item.map_err(db_error)?.1.value().len() as u64;
    }
    Ok(bytes)
}

/// Starts the thread that folds the log into redb: the folds commits hand over, and, when they
/// stop, what is left waiting.
fn start_folder(
    shared: Arc<Shared>,
    jobs: mpsc::Receiver<Fold>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("hubgate-fold".into())
        .spawn(move || {
            loop {
                let fold = match jobs.recv_timeout(FOLD_AFTER) {
                    Ok(fold) => fold,
                    Err(mpsc::RecvTimeoutError::Timeout) => match shared.idle_fold() {
                        Some(fold) => fold,
                        None => continue,
                    },
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                };
                let folded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    shared.fold(&fold);
                }));
                if folded.is_err() {
                    // As a failed fold: the next commit writes through.
                    let mut log = shared.lock_log();
                    log.folding = None;
                    log.failed = true;
                    drop(log);
                    shared.fold_ended.notify_all();
                }
            }
        })
}

impl Outbox for RedbOutbox {
    fn high_water(&self) -> &super::high_water::HighWater {
        &self.vault.high_water
    }

    fn survey(&self, stream: &str, deep: bool) -> Result<Survey, OutboxError> {
        let next = self.next_sequence(stream)?;
        self.with_batches(stream, 0, |batches| {
            survey_batches(&self.vault, stream, batches, next, deep)
        })?
    }

    fn findings(&self) -> Vec<Finding> {
        let mut findings = self.vault.findings();
        findings.extend(self.log_findings.iter().cloned());
        findings
    }

    fn data_file(&self) -> &'static str {
        "outbox.redb"
    }

    fn commit(&self, commit: &Commit) -> Result<(), OutboxError> {
        let mut log = self.shared.lock_log();
        let mut keys = self.vault.lock();
        let mut inserts = Vec::new();
        let mut added = 0;
        for a in commit.appends.iter().filter(|a| !a.records.is_empty()) {
            for (first, records) in batches(a) {
                let value = encode(&mut keys, a, first, records)?;
                added += value.len() as u64;
                inserts.push((record_key(&a.stream, first), value));
            }
            let next = a.first + a.records.len() as u64;
            inserts.push((named_key(b'n', &a.stream), next.to_be_bytes().to_vec()));
        }
        let mut written = Vec::new();
        for (name, bytes) in &commit.checkpoints {
            let key = named_key(b'c', name);
            let (counter, value) = self
                .vault
                .seal_checkpoint(&mut keys, name, bytes, || self.stored(&key))?;
            inserts.push((key, value));
            written.push((name.as_str(), counter));
        }
        // Waiting for a fold with the keys held would stop readers, and take the log's lock
        // again after the keys (the other order is the rule).
        drop(keys);
        if inserts.is_empty() {
            return Ok(());
        }
        if log.failed || !log.wal.fits_a_half(&inserts) {
            log = self.shared.write_through(log, &inserts, true)?;
        } else {
            let id = loop {
                let appended = (log.wal.append(&inserts))
                    .and_then(|id| match id {
                        Some(_) => self.shared.injected(Fault::Append).map(|()| id),
                        None => Ok(id),
                    })
                    .map_err(|err| {
                        // The entry may have reached the disk: redb must record an id past it
                        // before the log is used again.
                        log.failed = true;
                        OutboxError::Log(err)
                    })?;
                if let Some(id) = appended {
                    break id;
                }
                // The active half is full: once the other is free, it takes the commits.
                log = self.shared.no_fold(log);
                if log.failed {
                    log = self.shared.write_through(log, &[], false)?;
                } else {
                    self.start_fold(&mut log);
                }
            };
            let mut waiting = self.shared.lock_waiting();
            for (key, value) in inserts {
                log.active_bytes += (key.len() + value.len()) as u64;
                waiting.insert(key, id, value.into());
            }
            drop(waiting);
            let since = *log.since.get_or_insert_with(Instant::now);
            if log.folding.is_none()
                && (log.active_bytes >= FOLD_BYTES || since.elapsed() >= FOLD_AFTER)
            {
                self.start_fold(&mut log);
            }
        }
        // Durable: older versions of the checkpoints may go.
        let mut keys = self.vault.lock();
        Vault::checkpoints_committed(&mut keys, &written)?;
        drop(keys);
        drop(log);
        self.shared.record_bytes.fetch_add(added, Ordering::Relaxed);
        Ok(())
    }

    fn read(&self, stream: &str, from: u64, max: usize) -> Result<ReadBatch, OutboxError> {
        self.with_batches(stream, from, |batches| {
            read_batches(&self.vault, stream, batches, from, max, &|| {
                self.next_sequence(stream)
            })
        })?
    }

    fn oldest(&self, stream: &str) -> Result<Option<BatchInfo>, OutboxError> {
        self.with_batches(stream, 0, |batches| {
            first_batch(batches, &|| self.next_sequence(stream).unwrap_or(0))
        })?
    }

    fn purge_while(
        &self,
        stream: &str,
        purge: &mut dyn FnMut(&BatchInfo) -> bool,
    ) -> Result<Purged, OutboxError> {
        // Held until the keys are shredded: a commit holds it from sealing until its batches are
        // durable and readable, so no key is destroyed while a batch sealed with it is on its
        // way in. A fold being written ends first: it could write one of the batches again, or
        // pack the batches chosen into a value that holds more.
        let log = self.shared.lock_log();
        let mut log = self.shared.no_fold(log);
        let (mut purged, firsts) = self.with_batches(stream, 0, |batches| {
            purge_batches(batches, purge, &|| self.next_sequence(stream).unwrap_or(0))
        })??;
        if !firsts.is_empty() {
            // One that waits in memory goes to redb first, as it is.
            let waits = {
                let waiting = self.shared.lock_waiting();
                let mut keys = firsts.iter().map(|&first| record_key(stream, first));
                keys.any(|key| waiting.inserts.contains_key(&key))
            };
            if waits {
                log = self.shared.write_through(log, &[], false)?;
            }
            let removed = (|| {
                let tx = self.shared.db()?.begin_write().map_err(db_error)?;
                {
                    let mut table = tx.open_table(TABLE).map_err(db_error)?;
                    for &first in &firsts {
                        table
                            .remove(record_key(stream, first).as_slice())
                            .map_err(db_error)?;
                    }
                }
                tx.commit().map_err(db_error)
            })();
            if let Err(err) = &removed {
                self.shared.recover_from(err);
            }
            removed?;
            sub_bytes(&self.shared.record_bytes, purged.bytes);
        }
        shred(self, &self.vault, stream, &mut purged)?;
        drop(log);
        Ok(purged)
    }

    fn next_sequence(&self, stream: &str) -> Result<u64, OutboxError> {
        let value = self.stored(&named_key(b'n', stream))?;
        Ok(value
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map_or(1, u64::from_be_bytes))
    }

    fn checkpoint(&self, name: &str) -> Result<Option<Vec<u8>>, OutboxError> {
        let value = self.stored(&named_key(b'c', name))?;
        Ok(value.and_then(|v| self.vault.open_checkpoint(name, &v)))
    }

    fn record_bytes(&self) -> u64 {
        self.shared.record_bytes.load(Ordering::Relaxed)
    }

    fn streams(&self) -> Result<Vec<String>, OutboxError> {
        self.names(b'n')
    }

    fn checkpoint_names(&self) -> Result<Vec<String>, OutboxError> {
        self.names(b'c')
    }
}

impl RedbOutbox {
    /// The names of the keys of `kind` ('n': streams, 'c': checkpoints).
    fn names(&self, kind: u8) -> Result<Vec<String>, OutboxError> {
        let (lo, hi) = ([kind], [kind + 1]);
        let mut names: BTreeSet<Vec<u8>> = self
            .shared
            .lock_waiting()
            .inserts
            .range(lo.to_vec()..hi.to_vec())
            .map(|(k, _)| k.clone())
            .collect();
        let tx = self.shared.db()?.begin_read().map_err(db_error)?;
        let table = tx.open_table(TABLE).map_err(db_error)?;
        for item in table.range(&lo[..]..&hi[..]).map_err(db_error)? {
            names.insert(item.map_err(db_error)?.0.value().to_vec());
        }
        stream_names(names.into_iter().map(Ok))
    }
}

#[cfg(test)]
mod tests;
