//! The vault: the data keys of an outbox behind one lock, and the sealed checkpoints.

use std::path::Path;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use super::OutboxError;
use super::data_keys::{self, DataKeys};

/// The keys of an outbox, shared by both engines: the directory's key file, behind a lock that a
/// commit holds from sealing until it is durable, and a purge while it destroys keys, so that a
/// key is never destroyed while records sealed with it are on their way in. (The redb engine
/// holds its log's lock for that span instead, around the key lock: see [`RedbOutbox`].)
#[derive(Debug)]
pub(super) struct Vault {
    keys: Mutex<DataKeys>,
    /// Per checkpoint name, the counter of its next version (locked only with `keys`).
    counters: Mutex<std::collections::HashMap<String, u64>>,
    /// The streams' next sequences, kept apart from the engine's data.
    pub(super) high_water: super::high_water::HighWater,
}

/// How long one key seals a checkpoint's versions before the next key starts; older keys are
/// destroyed as soon as a version under a newer one is durable.
pub(super) const CHECKPOINT_KEY_PERIOD: Duration = Duration::from_secs(600);
pub(super) const CHECKPOINT_VERSION: u8 = 1;

/// The data-key series of a checkpoint name (a control character keeps it apart from streams).
pub(super) fn checkpoint_series(name: &str) -> String {
    format!("\u{1}{name}")
}

impl Vault {
    pub(super) fn open(dir: &Path) -> Result<Self, OutboxError> {
        std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
            .create(dir)?;
        Ok(Self {
            keys: Mutex::new(DataKeys::open(&dir.join("keys"))?),
            counters: Mutex::new(std::collections::HashMap::new()),
            high_water: super::high_water::HighWater::open(dir),
        })
    }

    /// Damage found in the key file and the sequence marks when they were opened.
    pub(super) fn findings(&self) -> Vec<super::Finding> {
        let mut findings: Vec<super::Finding> = self
            .lock()
            .damaged_slots()
            .iter()
            .map(|slot| super::Finding {
                file: "keys".into(),
                at: format!("slot {slot} (offset {})", slot * DataKeys::SLOT_BYTES),
                what: "a data key slot that fails its checksum, now erased: the records it sealed, if any, cannot be read (a key torn by a crash sealed none)".into(),
                lost: false,
            })
            .collect();
        findings.extend(
            self.high_water
                .damaged_files()
                .iter()
                .map(|file| super::Finding {
                    file: file.clone(),
                    at: "the whole file".into(),
                    what: "sequence marks that fail their checksum: the other file's are used"
                        .into(),
                    lost: false,
                }),
        );
        findings
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, DataKeys> {
        self.keys.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Seals a version of checkpoint `name`. `stored` gives the version stored now, read only
    /// the first time a name is written in this process. Returns the version's counter and value.
    pub(super) fn seal_checkpoint(
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
    pub(super) fn checkpoints_committed(
        keys: &mut DataKeys,
        written: &[(&str, u64)],
    ) -> Result<(), OutboxError> {
        for (name, counter) in written {
            keys.shred(&checkpoint_series(name), *counter, counter + 1)?;
        }
        Ok(())
    }

    /// Opens a stored checkpoint value; `None` (and an error logged) when it cannot be read.
    pub(super) fn open_checkpoint(&self, name: &str, value: &[u8]) -> Option<Vec<u8>> {
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
