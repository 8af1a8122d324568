//! The outbox on sled.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::format::{batches, encode, named_key, record_key, seq_of};
use super::vault::Vault;
use super::{
    BatchInfo, Commit, Entry, Finding, Outbox, OutboxError, Purged, ReadBatch, Survey, first_batch,
    purge_batches, read_batches, shred, stream_names, sub_bytes, survey_batches,
};

/// The outbox on sled.
#[derive(Debug)]
pub struct SledOutbox {
    /// sled and its tree; closed and opened again after an I/O error (`None` while it cannot be).
    open: std::sync::RwLock<Option<(sled::Db, sled::Tree)>>,
    /// sled's directory.
    sled_dir: std::path::PathBuf,
    pub(super) vault: Vault,
    /// Bytes of record batches held (see [`Outbox::record_bytes`]).
    record_bytes: AtomicU64,
    /// What was damaged when it opened (a snapshot set aside).
    findings: Vec<Finding>,
    /// A write failed with an I/O error: sled is to be opened again before the next one.
    failed: std::sync::atomic::AtomicBool,
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
    /// holds nothing the database needs, but sled would refuse to start on it. A snapshot sled
    /// cannot open with is set aside, and the database read from sled's log instead. Damage that
    /// stops the open, or makes sled panic, is an error naming the file, not a crash.
    pub fn open(dir: &Path) -> Result<Self, OutboxError> {
        let vault = Vault::open(dir)?;
        let sled_dir = dir.join("sled");
        let (db, tree, bytes, findings) = open_recovering(&sled_dir)?;
        Ok(Self {
            open: std::sync::RwLock::new(Some((db, tree))),
            sled_dir,
            vault,
            record_bytes: AtomicU64::new(bytes),
            findings,
            failed: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// sled and its tree (handles: cheap to clone).
    fn handles(&self) -> Result<(sled::Db, sled::Tree), OutboxError> {
        self.open
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .ok_or_else(|| {
                OutboxError::Log(std::io::Error::other(
                    "sled is closed after an I/O error and could not be reopened yet",
                ))
            })
    }

    fn tree(&self) -> Result<sled::Tree, OutboxError> {
        Ok(self.handles()?.1)
    }

    /// Applies `batch` to the tree and makes it durable. After an I/O error (a full disk) sled
    /// answers every later write with it, so it is marked to be closed and opened again before the
    /// next write ([`SledOutbox::reopen_if_failed`]), which can then succeed once the cause is
    /// gone.
    fn apply_durably(&self, batch: sled::Batch) -> Result<(), OutboxError> {
        let (db, tree) = self.handles()?;
        let applied = tree.apply_batch(batch).and_then(|()| db.flush().map(drop));
        drop((db, tree));
        let Err(err) = applied else {
            return Ok(());
        };
        if matches!(err, sled::Error::Io(_)) {
            self.failed.store(true, Ordering::Relaxed);
        }
        Err(err.into())
    }

    /// Closes sled and opens it again when a write failed with an I/O error, with the recovery of
    /// a start ([`open_recovering`]). Called before a write, with no lock of the outbox held:
    /// readers finish with the old handles (sled's lock is free once they do) and meanwhile get
    /// an error, not a wait. Should sled not open yet, the next write tries again.
    fn reopen_if_failed(&self) {
        if !self.failed.load(Ordering::Relaxed) {
            return;
        }
        let old = self
            .open
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        drop(old);
        match open_recovering(&self.sled_dir) {
            Ok((db, tree, bytes, findings)) => {
                tracing::warn!(dir = %self.sled_dir.display(), "reopened the outbox's sled after an I/O error");
                for finding in findings {
                    tracing::warn!(file = %finding.file, "{}", finding.what);
                }
                metrics::counter!(hubgate_exporters::catalogue::OUTBOX_REOPENS).increment(1);
                self.record_bytes.store(bytes, Ordering::Relaxed);
                *self
                    .open
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some((db, tree));
                self.failed.store(false, Ordering::Relaxed);
            }
            Err(err) => {
                tracing::warn!(dir = %self.sled_dir.display(), %err, "cannot reopen the outbox's sled yet");
            }
        }
    }

    /// Runs the read `f`: a panic inside sled (it asserts on some damage it meets) becomes an
    /// error naming sled's log, and the gateway goes on.
    fn guarded<T>(&self, f: impl FnOnce() -> Result<T, OutboxError>) -> Result<T, OutboxError> {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|panic| {
            Err(OutboxError::in_file(
                &self.sled_dir.join("db"),
                OutboxError::Panicked(super::panic_text(&*panic)),
            ))
        })
    }

    /// The batches of `stream` from the one holding sequence `from` on.
    fn batches_from(
        &self,
        stream: &str,
        from: u64,
    ) -> Result<impl Iterator<Item = Entry<sled::IVec>>, OutboxError> {
        let tree = self.tree()?;
        let start = tree
            .range(record_key(stream, 0)..=record_key(stream, from))
            .next_back()
            .transpose()?
            .map_or(from, |(k, _)| seq_of(&k));
        Ok(tree
            .range(record_key(stream, start)..=record_key(stream, u64::MAX))
            .map(|item| Ok(item.map(|(k, v)| (seq_of(&k), v))?)))
    }

    /// Overwrites a stored batch value (tests of damage detection).
    #[cfg(test)]
    pub(crate) fn raw_insert(&self, stream: &str, first: u64, value: &[u8]) {
        self.tree()
            .unwrap()
            .insert(record_key(stream, first), value)
            .unwrap();
    }

    #[cfg(test)]
    pub(crate) fn raw_get(&self, stream: &str, first: u64) -> Vec<u8> {
        self.tree()
            .unwrap()
            .get(record_key(stream, first))
            .unwrap()
            .unwrap()
            .to_vec()
    }
}

/// Opens sled in `sled_dir` as [`SledOutbox::open`] says: an unfinished snapshot removed, a
/// damaged configuration file written again, a snapshot sled cannot open with set aside (in the
/// outbox's directory). Returns the handles, the bytes of record batches held, and what was
/// damaged.
#[allow(clippy::type_complexity)]
fn open_recovering(
    sled_dir: &Path,
) -> Result<(sled::Db, sled::Tree, u64, Vec<Finding>), OutboxError> {
    let dir = sled_dir.parent().unwrap_or(sled_dir);
    remove_unfinished_snapshots(sled_dir);
    let conf = restore_damaged_conf(sled_dir)?;
    let (db, tree, bytes, mut findings) = match open_tree(sled_dir) {
        Ok((db, tree, bytes)) => (db, tree, bytes, Vec::new()),
        Err(first) if first.other.is_some() => return Err(first.name(sled_dir, &[])),
        Err(first) => {
            // sled's snapshot only speeds up its start: without it, sled reads its whole log.
            // A damaged snapshot is moved aside and the database opened from the log.
            let snapshots = move_snapshots_aside(sled_dir, dir);
            if snapshots.is_empty() {
                return Err(first.name(sled_dir, &[]));
            }
            match open_tree(sled_dir) {
                Ok((db, tree, bytes)) => {
                    let findings = snapshots.iter().map(|(name, aside)| {
                        tracing::warn!(file = %sled_dir.join(name).display(), moved_to = %aside.display(), "sled could not open with this snapshot; it is moved aside and the database was read from its log");
                        Finding {
                            file: format!("sled/{name}"),
                            at: "the whole file".into(),
                            what: format!("a snapshot sled could not open with ({}); moved to {} and the database read from its log", first.why, aside.display()),
                            lost: false,
                        }
                    }).collect();
                    (db, tree, bytes, findings)
                }
                Err(_) => {
                    put_snapshots_back(sled_dir, &snapshots);
                    let names: Vec<String> = snapshots.into_iter().map(|(n, _)| n).collect();
                    return Err(first.name(sled_dir, &names));
                }
            }
        }
    };
    findings.extend(conf);
    Ok((db, tree, bytes, findings))
}

/// Why sled could not open a directory, and the file it points at when it says.
struct OpenFailure {
    /// The file sled named (by its log offset, or as its configuration), relative to its
    /// directory.
    file: Option<String>,
    why: String,
    /// An error that is not about the files' contents (permissions, a lock, the disk).
    other: Option<OutboxError>,
}

impl OpenFailure {
    /// The error, naming the file: the one sled named, or else its log and the snapshots tried.
    fn name(self, sled_dir: &Path, snapshots: &[String]) -> OutboxError {
        if let Some(other) = self.other {
            return other;
        }
        let file = |name: &str| sled_dir.join(name).display().to_string();
        let files = match self.file {
            Some(name) => file(&name),
            None => std::iter::once("db")
                .chain(snapshots.iter().map(String::as_str))
                .map(file)
                .collect::<Vec<_>>()
                .join(" or "),
        };
        OutboxError::Damaged {
            files,
            why: self.why,
        }
    }
}

/// sled's settings, the same for every hubgate outbox.
fn sled_config(sled_dir: &Path) -> sled::Config {
    sled::Config::new()
        .path(sled_dir)
        .cache_capacity(16 * 1024 * 1024)
}

/// sled's configuration file (`conf`: its storage settings, then their CRC-32) when it fails its
/// checksum: sled would read it anyway, and fail on its log or read the log wrongly. hubgate opens
/// every outbox with the same settings, so the file is written again as a new database of those
/// settings has it; the damaged one is kept beside it as `conf.damaged`.
fn restore_damaged_conf(sled_dir: &Path) -> Result<Option<Finding>, OutboxError> {
    let path = sled_dir.join("conf");
    let Ok(bytes) = std::fs::read(&path) else {
        return Ok(None);
    };
    let intact = |b: &[u8]| {
        b.len() > 8 && crc32fast::hash(&b[..b.len() - 4]).to_le_bytes() == b[b.len() - 4..]
    };
    if intact(&bytes) {
        return Ok(None);
    }
    let fresh = sled_dir.with_file_name("sled-conf-template");
    let _ = std::fs::remove_dir_all(&fresh);
    drop(sled_config(&fresh).open()?);
    let good = std::fs::read(fresh.join("conf"));
    let _ = std::fs::remove_dir_all(&fresh);
    let good = good?;
    if !intact(&good) {
        return Err(OutboxError::Damaged {
            files: path.display().to_string(),
            why: "the configuration file fails its checksum, and cannot be made again".into(),
        });
    }
    std::fs::rename(&path, sled_dir.join("conf.damaged"))?;
    std::fs::write(&path, good)?;
    tracing::warn!(file = %path.display(), "sled's configuration file failed its checksum: written again with hubgate's settings (the damaged one is conf.damaged)");
    Ok(Some(Finding {
        file: "sled/conf".into(),
        at: "the whole file".into(),
        what: "sled's configuration file failed its checksum: written again with hubgate's fixed settings; the damaged one is kept as conf.damaged".into(),
        lost: false,
    }))
}

/// Opens sled in `sled_dir` and its tree, reading every batch header once to learn the bytes
/// held. A panic inside sled (it asserts on some damage) becomes a failure.
fn open_tree(sled_dir: &Path) -> Result<(sled::Db, sled::Tree, u64), OpenFailure> {
    let config = sled_config(sled_dir);
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
    let failure = |file: Option<&str>, why: String| OpenFailure {
        file: file.map(str::to_owned),
        why,
        other: None,
    };
    match opened {
        Ok(Ok(opened)) => Ok(opened),
        Ok(Err(OutboxError::Sled(sled::Error::Corruption { at, .. }))) => {
            // sled's disk pointers are not public; their Debug form says where.
            let at = format!("{at:?}");
            Err(if at.contains("Blob") {
                failure(
                    Some("blobs"),
                    format!("sled reads corrupted data in a blob ({at})"),
                )
            } else if let Some(offset) = at
                .strip_prefix("Some(Inline(")
                .and_then(|r| r.strip_suffix("))"))
            {
                failure(
                    Some("db"),
                    format!("sled reads corrupted data at offset {offset}"),
                )
            } else {
                failure(None, "sled reports corruption in its files".into())
            })
        }
        Ok(Err(OutboxError::Sled(sled::Error::Unsupported(why)))) => Err(failure(
            Some("conf"),
            format!("sled cannot use its configuration file: {why}"),
        )),
        Ok(Err(other)) => Err(OpenFailure {
            file: None,
            why: other.to_string(),
            other: Some(other),
        }),
        Err(panic) => Err(failure(
            None,
            format!(
                "sled panicked while reading it: {}",
                super::panic_text(&*panic)
            ),
        )),
    }
}

/// Moves sled's snapshots (`snap.*`) out of `sled_dir` into `outbox_dir`, each renamed
/// `sled-snapshot-set-aside.<name>`; returns each file's name and where it went.
fn move_snapshots_aside(sled_dir: &Path, outbox_dir: &Path) -> Vec<(String, std::path::PathBuf)> {
    let Ok(entries) = std::fs::read_dir(sled_dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let aside = outbox_dir.join(format!("sled-snapshot-set-aside.{name}"));
            (name.starts_with("snap.") && std::fs::rename(entry.path(), &aside).is_ok())
                .then_some((name, aside))
        })
        .collect()
}

/// Undoes [`move_snapshots_aside`].
fn put_snapshots_back(sled_dir: &Path, snapshots: &[(String, std::path::PathBuf)]) {
    for (name, aside) in snapshots {
        if let Err(err) = std::fs::rename(aside, sled_dir.join(name)) {
            tracing::error!(file = %aside.display(), %err, "cannot put a sled snapshot back");
        }
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

    fn survey(&self, stream: &str, deep: bool) -> Result<Survey, OutboxError> {
        self.guarded(|| {
            let next = self.next_sequence(stream)?;
            survey_batches(
                &self.vault,
                stream,
                self.batches_from(stream, 0)?,
                next,
                deep,
            )
        })
    }

    fn findings(&self) -> Vec<Finding> {
        let mut findings = self.vault.findings();
        findings.extend(self.findings.iter().cloned());
        findings
    }

    fn data_file(&self) -> &'static str {
        "sled/db"
    }

    fn commit(&self, commit: &Commit) -> Result<(), OutboxError> {
        self.reopen_if_failed();
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
                Ok(self.tree()?.get(&key)?.map(|v| v.to_vec()))
            })?;
            batch.insert(key, value);
            written.push((name.as_str(), counter));
        }
        self.apply_durably(batch)?;
        Vault::checkpoints_committed(&mut keys, &written)?;
        drop(keys);
        self.record_bytes.fetch_add(added, Ordering::Relaxed);
        Ok(())
    }

    fn read(&self, stream: &str, from: u64, max: usize) -> Result<ReadBatch, OutboxError> {
        self.guarded(|| {
            let batches = self.batches_from(stream, from)?;
            read_batches(&self.vault, stream, batches, from, max, &|| {
                self.next_sequence(stream)
            })
        })
    }

    fn oldest(&self, stream: &str) -> Result<Option<BatchInfo>, OutboxError> {
        self.guarded(|| {
            first_batch(self.batches_from(stream, 0)?, &|| {
                self.next_sequence(stream).unwrap_or(0)
            })
        })
    }

    fn purge_while(
        &self,
        stream: &str,
        purge: &mut dyn FnMut(&BatchInfo) -> bool,
    ) -> Result<Purged, OutboxError> {
        self.reopen_if_failed();
        let (mut purged, firsts) = purge_batches(self.batches_from(stream, 0)?, purge, &|| {
            self.next_sequence(stream).unwrap_or(0)
        })?;
        if !firsts.is_empty() {
            let mut removals = sled::Batch::default();
            for first in firsts {
                removals.remove(record_key(stream, first));
            }
            self.apply_durably(removals)?;
            sub_bytes(&self.record_bytes, purged.bytes);
        }
        shred(self, &self.vault, stream, &mut purged)?;
        Ok(purged)
    }

    fn next_sequence(&self, stream: &str) -> Result<u64, OutboxError> {
        Ok(self
            .tree()?
            .get(named_key(b'n', stream))?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map_or(1, u64::from_be_bytes))
    }

    fn checkpoint(&self, name: &str) -> Result<Option<Vec<u8>>, OutboxError> {
        let value = self.tree()?.get(named_key(b'c', name))?;
        Ok(value.and_then(|v| self.vault.open_checkpoint(name, &v)))
    }

    fn record_bytes(&self) -> u64 {
        self.record_bytes.load(Ordering::Relaxed)
    }

    fn streams(&self) -> Result<Vec<String>, OutboxError> {
        stream_names(self.tree()?.scan_prefix(b"n").map(|item| Ok(item?.0)))
    }

    fn checkpoint_names(&self) -> Result<Vec<String>, OutboxError> {
        stream_names(self.tree()?.scan_prefix(b"c").map(|item| Ok(item?.0)))
    }
}
