//! The highest sequence each stream has made visible, kept apart from the data, so that a
//! sequence number is never handed out twice.
//!
//! Each engine keeps a stream's next sequence with its records (redb in its write-ahead log
//! first, sled in its tree). Should the newest data be damaged (a flipped byte in the log's last
//! entries), the engine alone would start from an older next sequence and give numbers that
//! readers have already seen to new records. So after every commit, before its records are
//! shown, the store notes each stream's next sequence here: two small files, `sequences.a` and
//! `sequences.b`, written in turn in place (one `pwrite` each, kept open, never truncated), each
//! with a generation, a length and a CRC-32, so that a torn write leaves the other intact. They
//! are written without a sync: a process that is killed leaves them in the page cache; only a
//! power loss can take back the newest, and then the engine's own synced data is at least as new. At start the next sequence of a stream is the larger of the
//! two, and a difference is damage: those records are lost, and readers get a Gap.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

/// The two files, and what was last written.
#[derive(Debug)]
pub struct HighWater {
    paths: [PathBuf; 2],
    state: Mutex<State>,
    /// The files that held bytes but no valid marks when opened.
    damaged: Vec<String>,
}

#[derive(Debug, Default)]
struct State {
    generation: u64,
    next: BTreeMap<String, u64>,
    /// The two files, opened on the first write.
    files: Option<[File; 2]>,
}

impl HighWater {
    /// Opens the marks in `dir`: the newer valid one of the two files (none when neither is).
    pub fn open(dir: &Path) -> Self {
        let paths = [dir.join("sequences.a"), dir.join("sequences.b")];
        let mut damaged = Vec::new();
        let mut best: Option<(u64, BTreeMap<String, u64>)> = None;
        for path in &paths {
            let Ok(bytes) = std::fs::read(path) else {
                continue;
            };
            match decode(&bytes) {
                Some(marks) if best.as_ref().is_none_or(|b| b.0 < marks.0) => best = Some(marks),
                Some(_) => {}
                None if bytes.is_empty() => {}
                None => {
                    tracing::warn!(file = %path.display(), "the outbox's sequence marks in this file are damaged: the other file's are used");
                    damaged.push(
                        path.file_name()
                            .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
                    );
                }
            }
        }
        let state = best
            .map(|(generation, next)| State {
                generation,
                next,
                files: None,
            })
            .unwrap_or_default();
        Self {
            paths,
            state: Mutex::new(state),
            damaged,
        }
    }

    /// Every stream with a mark.
    pub fn streams(&self) -> Vec<String> {
        self.lock().next.keys().cloned().collect()
    }

    /// Makes the marks written so far durable (the gateway does not wait for this: see above).
    pub fn sync(&self) -> std::io::Result<()> {
        if let Some(files) = &self.lock().files {
            for file in files {
                file.sync_data()?;
            }
        }
        Ok(())
    }

    /// The files (names) that held bytes but no valid marks when opened.
    pub fn damaged_files(&self) -> &[String] {
        &self.damaged
    }

    /// The next sequence of `stream` noted last, if any.
    pub fn next(&self, stream: &str) -> Option<u64> {
        self.lock().next.get(stream).copied()
    }

    /// Notes the next sequence of these streams (never lower than noted before), in the file
    /// not written last.
    pub fn note(&self, marks: impl IntoIterator<Item = (String, u64)>) -> std::io::Result<()> {
        let mut state = self.lock();
        let mut changed = false;
        for (stream, next) in marks {
            let noted = state.next.entry(stream).or_insert(0);
            if next > *noted {
                *noted = next;
                changed = true;
            }
        }
        if !changed {
            return Ok(());
        }
        state.generation += 1;
        let bytes = encode(state.generation, &state.next);
        let slot = (state.generation % 2) as usize;
        if state.files.is_none() {
            let open = |path: &PathBuf| {
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .mode(0o600)
                    .open(path)
            };
            state.files = Some([open(&self.paths[0])?, open(&self.paths[1])?]);
        }
        match &state.files {
            Some(files) => files[slot].write_all_at(&bytes, 0),
            None => Ok(()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// `generation (8 bytes BE) | length of the JSON (4) | its CRC-32 (4) | JSON of the marks`;
/// what follows (an older, longer write) is ignored.
fn encode(generation: u64, next: &BTreeMap<String, u64>) -> Vec<u8> {
    let json = serde_json::to_vec(next).unwrap_or_default();
    let mut bytes = Vec::with_capacity(16 + json.len());
    bytes.extend_from_slice(&generation.to_be_bytes());
    bytes.extend_from_slice(&u32::try_from(json.len()).unwrap_or(u32::MAX).to_be_bytes());
    bytes.extend_from_slice(&crc32fast::hash(&json).to_be_bytes());
    bytes.extend_from_slice(&json);
    bytes
}

fn decode(bytes: &[u8]) -> Option<(u64, BTreeMap<String, u64>)> {
    let generation = u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?);
    let len = u32::from_be_bytes(bytes.get(8..12)?.try_into().ok()?) as usize;
    let crc = u32::from_be_bytes(bytes.get(12..16)?.try_into().ok()?);
    let json = bytes.get(16..16 + len)?;
    (crc32fast::hash(json) == crc)
        .then(|| serde_json::from_slice(json).ok())
        .flatten()
        .map(|next| (generation, next))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_survive_a_reopen_and_a_torn_file() {
        let dir = tempfile::tempdir().unwrap();
        let marks = HighWater::open(dir.path());
        assert_eq!(marks.next("s"), None);
        marks.note([("s".to_owned(), 5)]).unwrap();
        marks
            .note([("s".to_owned(), 9), ("t".to_owned(), 2)])
            .unwrap();
        // Never lower.
        marks.note([("s".to_owned(), 3)]).unwrap();
        let reopened = HighWater::open(dir.path());
        assert_eq!((reopened.next("s"), reopened.next("t")), (Some(9), Some(2)));
        // The newer file torn: the older one still answers.
        let newer = &reopened.paths[(reopened.lock().generation % 2) as usize];
        let bytes = std::fs::read(newer).unwrap();
        std::fs::write(newer, &bytes[..bytes.len() - 3]).unwrap();
        // (A longer, older write under a shorter newer one is ignored past the length.)
        let mut longer = encode(7, &BTreeMap::from([("s".to_owned(), 1)]));
        longer.extend_from_slice(b"stale bytes of an earlier, longer write");
        assert_eq!(decode(&longer).map(|(g, _)| g), Some(7));
        assert_eq!(HighWater::open(dir.path()).next("s"), Some(5));
        // A flipped byte is found by the checksum.
        let mut flipped = bytes.clone();
        let last = flipped.len() - 2;
        flipped[last] ^= 0x01;
        assert_eq!(decode(&flipped), None);
        assert!(decode(&bytes).is_some());
    }
}
