//! The outbox on redb: the same layout and batch format as on sled, in one redb table, with one
//! write transaction per commit (redb makes it durable before `commit` returns).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{
    BatchInfo, Commit, Entry, Outbox, OutboxError, Purged, ReadBatch, Vault, batches, encode,
    first_batch, named_key, purge_batches, read_batches, record_key, seq_of, shred, stream_names,
    sub_bytes,
};

const TABLE: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("outbox");

fn db_error(err: impl Into<redb::Error>) -> OutboxError {
    OutboxError::Redb(Box::new(err.into()))
}

/// The outbox on redb.
#[derive(Debug)]
pub struct RedbOutbox {
    db: Database,
    vault: Vault,
    /// Bytes of record batches held (see [`Outbox::record_bytes`]).
    record_bytes: AtomicU64,
}

impl RedbOutbox {
    /// Opens (or creates) the outbox in directory `dir`: the database in `dir/outbox.redb`, the
    /// data keys in `dir/keys`. A file left by a killed process is repaired by redb on open.
    /// Opening reads every batch once, to learn the bytes held.
    pub fn open(dir: &Path) -> Result<Self, OutboxError> {
        let vault = Vault::open(dir)?;
        // redb's page cache. Records are written once and read back only by readers behind the
        // store's memory tail (a subscriber replaying, an exporter catching up), so a small cache
        // costs neither appends nor replays (`cargo bench -p hubgate --bench outbox`: the same
        // figures with 2 and 16 MiB), while a large one stays resident: with 16 MiB the gateway's
        // steady memory at 50,000 readings/s was 52 MiB, with 2 MiB 28 MiB (BENCHMARKS.md).
        let db = Database::builder()
            .set_cache_size(2 * 1024 * 1024)
            .create(dir.join("outbox.redb"))
            .map_err(db_error)?;
        let tx = db.begin_write().map_err(db_error)?;
        tx.open_table(TABLE).map_err(db_error)?;
        tx.commit().map_err(db_error)?;
        let tx = db.begin_read().map_err(db_error)?;
        let table = tx.open_table(TABLE).map_err(db_error)?;
        let mut bytes = 0;
        for item in table.range(&b"r"[..]..&b"s"[..]).map_err(db_error)? {
            bytes += item.map_err(db_error)?.1.value().len() as u64;
        }
        Ok(Self {
            db,
            vault,
            record_bytes: AtomicU64::new(bytes),
        })
    }

    /// Runs `f` over `stream`'s batches from the one holding `from` (0: from the oldest).
    fn with_batches<T>(
        &self,
        stream: &str,
        from: u64,
        f: impl FnOnce(&mut dyn Iterator<Item = Entry<Vec<u8>>>) -> T,
    ) -> Result<T, OutboxError> {
        let tx = self.db.begin_read().map_err(db_error)?;
        let table = tx.open_table(TABLE).map_err(db_error)?;
        let (lo, hi) = (record_key(stream, 0), record_key(stream, from));
        let start = table
            .range(lo.as_slice()..=hi.as_slice())
            .map_err(db_error)?
            .next_back()
            .transpose()
            .map_err(db_error)?
            .map_or(from, |(k, _)| seq_of(k.value()));
        let (lo, hi) = (record_key(stream, start), record_key(stream, u64::MAX));
        let mut batches = table
            .range(lo.as_slice()..=hi.as_slice())
            .map_err(db_error)?
            .map(|item| {
                let (k, v) = item.map_err(db_error)?;
                Ok((seq_of(k.value()), v.value().to_vec()))
            });
        Ok(f(&mut batches))
    }

    /// Overwrites a stored batch value (tests of damage detection).
    #[cfg(test)]
    pub(super) fn raw_insert(&self, stream: &str, first: u64, value: &[u8]) {
        let tx = self.db.begin_write().unwrap();
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
        let tx = self.db.begin_read().unwrap();
        let table = tx.open_table(TABLE).unwrap();
        let value = table
            .get(record_key(stream, first).as_slice())
            .unwrap()
            .unwrap();
        value.value().to_vec()
    }
}

impl Outbox for RedbOutbox {
    fn commit(&self, commit: &Commit) -> Result<(), OutboxError> {
        let mut keys = self.vault.lock();
        let tx = self.db.begin_write().map_err(db_error)?;
        let mut added = 0;
        let mut written = Vec::new();
        {
            let mut table = tx.open_table(TABLE).map_err(db_error)?;
            for a in commit.appends.iter().filter(|a| !a.records.is_empty()) {
                for (first, records) in batches(a) {
                    let value = encode(&mut keys, a, first, records)?;
                    added += value.len() as u64;
                    table
                        .insert(record_key(&a.stream, first).as_slice(), value.as_slice())
                        .map_err(db_error)?;
                }
                let next = a.first + a.records.len() as u64;
                table
                    .insert(
                        named_key(b'n', &a.stream).as_slice(),
                        &next.to_be_bytes()[..],
                    )
                    .map_err(db_error)?;
            }
            for (name, bytes) in &commit.checkpoints {
                let key = named_key(b'c', name);
                let (counter, value) =
                    self.vault.seal_checkpoint(&mut keys, name, bytes, || {
                        let stored = table.get(key.as_slice()).map_err(db_error)?;
                        Ok(stored.map(|v| v.value().to_vec()))
                    })?;
                table
                    .insert(key.as_slice(), value.as_slice())
                    .map_err(db_error)?;
                written.push((name.as_str(), counter));
            }
        }
        tx.commit().map_err(db_error)?;
        Vault::checkpoints_committed(&mut keys, &written)?;
        drop(keys);
        self.record_bytes.fetch_add(added, Ordering::Relaxed);
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
        let (mut purged, firsts) = self.with_batches(stream, 0, |batches| {
            purge_batches(batches, purge, &|| self.next_sequence(stream).unwrap_or(0))
        })??;
        if !firsts.is_empty() {
            let tx = self.db.begin_write().map_err(db_error)?;
            {
                let mut table = tx.open_table(TABLE).map_err(db_error)?;
                for first in firsts {
                    table
                        .remove(record_key(stream, first).as_slice())
                        .map_err(db_error)?;
                }
            }
            tx.commit().map_err(db_error)?;
            sub_bytes(&self.record_bytes, purged.bytes);
        }
        shred(self, &self.vault, stream, &mut purged)?;
        Ok(purged)
    }

    fn next_sequence(&self, stream: &str) -> Result<u64, OutboxError> {
        let tx = self.db.begin_read().map_err(db_error)?;
        let table = tx.open_table(TABLE).map_err(db_error)?;
        let value = table
            .get(named_key(b'n', stream).as_slice())
            .map_err(db_error)?;
        Ok(value
            .and_then(|v| <[u8; 8]>::try_from(v.value()).ok())
            .map_or(1, u64::from_be_bytes))
    }

    fn checkpoint(&self, name: &str) -> Result<Option<Vec<u8>>, OutboxError> {
        let tx = self.db.begin_read().map_err(db_error)?;
        let table = tx.open_table(TABLE).map_err(db_error)?;
        let value = table
            .get(named_key(b'c', name).as_slice())
            .map_err(db_error)?;
        Ok(value.and_then(|v| self.vault.open_checkpoint(name, v.value())))
    }

    fn record_bytes(&self) -> u64 {
        self.record_bytes.load(Ordering::Relaxed)
    }

    fn streams(&self) -> Result<Vec<String>, OutboxError> {
        let tx = self.db.begin_read().map_err(db_error)?;
        let table = tx.open_table(TABLE).map_err(db_error)?;
        let keys = table
            .range(&b"n"[..]..&b"o"[..])
            .map_err(db_error)?
            .map(|item| Ok(item.map_err(db_error)?.0.value().to_vec()));
        stream_names(keys)
    }
}
