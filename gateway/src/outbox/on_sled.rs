//! The outbox on sled.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::format::{batches, encode, named_key, record_key, seq_of};
use super::vault::Vault;
use super::{
    BatchInfo, Commit, Entry, Outbox, OutboxError, Purged, ReadBatch, first_batch, purge_batches,
    read_batches, shred, stream_names, sub_bytes,
};

/// The outbox on sled.
#[derive(Debug)]
pub struct SledOutbox {
    db: sled::Db,
    tree: sled::Tree,
    pub(super) vault: Vault,
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
    ///
    /// A snapshot sled left half-written (`snap.*.generating`: killed while the disk was full) is
    /// removed first, with a warning: sled renames a snapshot once it is complete, so such a file
    /// holds nothing the database needs, but sled would refuse to start on it. Damaged files that
    /// make sled panic while opening become an error naming the directory, not a crash.
    pub fn open(dir: &Path) -> Result<Self, OutboxError> {
        let vault = Vault::open(dir)?;
        let sled_dir = dir.join("sled");
        remove_unfinished_snapshots(&sled_dir);
        let config = sled::Config::new()
            .path(&sled_dir)
            .cache_capacity(16 * 1024 * 1024);
        let damaged = |why: String| OutboxError::Damaged {
            dir: sled_dir.display().to_string(),
            why,
        };
        // Nothing opened here is used after a panic: it is dropped, and the error returned.
        let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(
            || -> Result<_, OutboxError> {
                let db = open_retrying(&config)?;
                let tree = db.open_tree("outbox")?;
                let mut bytes = 0;
                for item in tree.scan_prefix(b"r") {
                    bytes += item?.1.len() as u64;
                }
                Ok((db, tree, bytes))
            },
        ));
        let (db, tree, bytes) = match opened {
            Ok(Ok(opened)) => opened,
            Ok(Err(OutboxError::Sled(sled::Error::Corruption { .. }))) => {
                return Err(damaged("sled reports corruption in its files".into()));
            }
            Ok(Err(err)) => return Err(err),
            Err(panic) => {
                let why = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "sled panicked".to_owned());
                return Err(damaged(format!("sled panicked while reading it: {why}")));
            }
        };
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
    pub(crate) fn raw_insert(&self, stream: &str, first: u64, value: &[u8]) {
        self.tree.insert(record_key(stream, first), value).unwrap();
    }

    #[cfg(test)]
    pub(crate) fn raw_get(&self, stream: &str, first: u64) -> Vec<u8> {
        self.tree
            .get(record_key(stream, first))
            .unwrap()
            .unwrap()
            .to_vec()
    }
}

/// sled's open, retried for up to two seconds while a database closed a moment ago still holds
/// the directory's lock.
fn open_retrying(config: &sled::Config) -> Result<sled::Db, OutboxError> {
    let mut attempts = 0;
    loop {
        match config.open() {
            Err(sled::Error::Io(err))
                if attempts < 40 && err.to_string().contains("could not acquire lock") =>
            {
                attempts += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            other => return Ok(other?),
        }
    }
}

/// Removes the snapshots sled began and did not finish (`snap.*.generating`) from `sled_dir`.
fn remove_unfinished_snapshots(sled_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(sled_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            let path = entry.path();
            match std::fs::remove_file(&path) {
                Ok(()) => tracing::warn!(
                    file = %path.display(),
                    "removed a snapshot sled began and did not finish (it holds nothing the database needs)"
                ),
                Err(err) => {
                    tracing::error!(file = %path.display(), %err, "cannot remove an unfinished sled snapshot")
                }
            }
        }
    }
}

impl Outbox for SledOutbox {
    fn high_water(&self) -> &super::high_water::HighWater {
        &self.vault.high_water
    }

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
