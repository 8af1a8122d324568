//! Data keys of the outbox: every record is encrypted at rest, so that a purged record is gone
//! from the disk even where the storage engine leaves its old bytes in free pages.
//!
//! Deleting a record from sled or redb only unlinks it: its bytes stay in the file until the
//! space is reused (measured: most of the purged records of a test could still be found in both
//! engines' files). So each record is sealed with ChaCha20-Poly1305 under a data key of its
//! stream, and when every record a key protects has been purged, the key is destroyed: its slot
//! in the key file is overwritten with zeros in place and synced (crypto-shredding). What remains
//! of the records on disk is then unreadable.
//!
//! - A stream's records are protected by a series of keys, each covering the sequences from its
//!   `first` up to the next key's. A new key starts when the current one is older than the
//!   stream's key period (a 24th of its retention, between 1 s and 1 h), so a key seals records
//!   kept within one period. The store purges records one period before their retention ends
//!   ([`crate::store`]), so a key is destroyed by the time the first record it sealed reaches the
//!   retention limit: no record stays readable past it.
//! - A key seals only in the process that made it. The nonce is the record's sequence number,
//!   unique under one key; a restart may stage different records under sequences a crash left
//!   uncommitted, so it never seals with a key from before.
//! - A key is written to the key file and synced before any record sealed with it is committed.
//!   At start, keys that protect no committed record (made just before a crash) are destroyed.
//! - The key file (`<data_dir>/outbox/keys`) is a sequence of 64-byte slots, each
//!   `live (1) | 0 (3) | CRC-32 of the rest (4) | stream id (8) | first sequence (8) |
//!   made at, Unix ms (8) | key (32)`. It is only ever written in place: never renamed or copied,
//!   so no stale copy of a destroyed key is left behind by the file system's own writes.
//!
//! The key file holds the keys of the records still held: it protects purged records, not live
//! ones, from someone who can read the disk.
//!
//! These keys seal records; the keys that make pseudonyms are the pipeline's
//! (`pipeline::pseudonym_keys`), a system of their own.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;
use std::time::Duration;

use chacha20poly1305::aead::{Aead, AeadInOut, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use zeroize::Zeroizing;

const SLOT: usize = 64;
/// Bytes a sealed record is longer than the plain one (the authentication tag).
pub const OVERHEAD: usize = 16;

/// How long a stream's data key seals before the next one starts: a 24th of the retention,
/// between 1 s and 1 h.
pub fn rotation(retention: Duration) -> Duration {
    (retention / 24).clamp(Duration::from_secs(1), Duration::from_secs(3600))
}

/// A stable 64-bit id of a stream name (FNV-1a): names are the policy's, not secrets, and this runs
/// for every record.
fn stream_id(stream: &str) -> u64 {
    stream.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn nonce(sequence: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&sequence.to_le_bytes());
    Nonce::from(n)
}

struct DataKey {
    slot: usize,
    first: u64,
    made_ms: i64,
    /// Made by this process: the only keys that seal.
    sealing: bool,
    cipher: ChaCha20Poly1305,
}

/// The data keys of every stream, and their file.
pub struct DataKeys {
    file: File,
    /// Per stream id, its keys in order of `first`.
    streams: HashMap<u64, Vec<DataKey>>,
    /// Slots in use.
    used: Vec<bool>,
    /// Slots whose checksum failed when the file was opened.
    damaged: Vec<usize>,
}

impl std::fmt::Debug for DataKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataKeys")
            .field("keys", &self.used.iter().filter(|u| **u).count())
            .finish_non_exhaustive()
    }
}

impl DataKeys {
    /// Opens (or creates) the key file. A slot whose checksum fails (torn by a crash while its key
    /// was made, or damaged) is logged, listed in [`DataKeys::damaged_slots`] and erased, since the
    /// records it may have sealed can no longer be read.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .mode(0o600)
            .truncate(false)
            .open(path)?;
        let len = usize::try_from(file.metadata()?.len()).unwrap_or(usize::MAX);
        let mut bytes = Zeroizing::new(vec![0u8; len - len % SLOT]);
        file.read_exact_at(&mut bytes, 0)?;
        let mut keys = Self {
            file,
            streams: HashMap::new(),
            used: Vec::new(),
            damaged: Vec::new(),
        };
        for (slot, raw) in bytes.chunks_exact(SLOT).enumerate() {
            keys.used.push(false);
            if raw[0] != 1 {
                continue;
            }
            let crc = u32::from_le_bytes([raw[4], raw[5], raw[6], raw[7]]);
            if crc32fast::hash(&raw[8..]) != crc {
                // Torn by a crash while its key was made (it sealed nothing), or damaged: what
                // it sealed cannot be read either way. The slot is erased, so that it is
                // reported once; batches left without their key are reported at start.
                tracing::error!(
                    slot,
                    "a damaged outbox key slot is erased: what it sealed cannot be read"
                );
                keys.damaged.push(slot);
                continue;
            }
            let word =
                |at: usize| u64::from_le_bytes(raw[at..at + 8].try_into().unwrap_or_default());
            let key: [u8; 32] = raw[32..64].try_into().unwrap_or_default();
            let cipher = ChaCha20Poly1305::new(&Key::from(key));
            keys.used[slot] = true;
            keys.streams.entry(word(8)).or_default().push(DataKey {
                slot,
                first: word(16),
                made_ms: word(24) as i64,
                sealing: false,
                cipher,
            });
        }
        for list in keys.streams.values_mut() {
            list.sort_by_key(|k| k.first);
        }
        for slot in keys.damaged.clone() {
            keys.erase(slot)?;
        }
        Ok(keys)
    }

    /// Overwrites a slot with zeros and syncs it.
    fn erase(&mut self, slot: usize) -> io::Result<()> {
        self.file.write_all_at(&[0u8; SLOT], (slot * SLOT) as u64)?;
        self.file.sync_data()?;
        self.used[slot] = false;
        Ok(())
    }

    /// Makes a key for `stream` from sequence `first` on, on disk before it returns.
    fn make(&mut self, stream: &str, first: u64, now_ms: i64) -> io::Result<()> {
        let id = stream_id(stream);
        // A key starting at the same sequence protects nothing committed yet: replace it.
        if let Some(list) = self.streams.get_mut(&id)
            && let Some(last) = list.last()
            && last.first >= first
        {
            let slot = last.slot;
            list.pop();
            self.erase(slot)?;
        }
        let mut key = Zeroizing::new([0u8; 32]);
        getrandom::fill(key.as_mut_slice()).map_err(io::Error::other)?;
        let slot = match self.used.iter().position(|u| !*u) {
            Some(free) => free,
            None => {
                self.used.push(false);
                self.used.len() - 1
            }
        };
        let mut raw = Zeroizing::new([0u8; SLOT]);
        raw[0] = 1;
        raw[8..16].copy_from_slice(&id.to_le_bytes());
        raw[16..24].copy_from_slice(&first.to_le_bytes());
        raw[24..32].copy_from_slice(&now_ms.to_le_bytes());
        raw[32..64].copy_from_slice(key.as_slice());
        let crc = crc32fast::hash(&raw[8..]);
        raw[4..8].copy_from_slice(&crc.to_le_bytes());
        self.file
            .write_all_at(raw.as_slice(), (slot * SLOT) as u64)?;
        self.file.sync_data()?;
        self.used[slot] = true;
        self.streams.entry(id).or_default().push(DataKey {
            slot,
            first,
            made_ms: now_ms,
            sealing: true,
            cipher: ChaCha20Poly1305::new(&Key::from(*key)),
        });
        Ok(())
    }

    /// Tests: [`DataKeys::seal_in_place`] on a copy of `record`.
    #[cfg(test)]
    pub fn seal(
        &mut self,
        stream: &str,
        sequence: u64,
        now_ms: i64,
        rotation: Duration,
        record: &[u8],
    ) -> io::Result<Vec<u8>> {
        let mut sealed = Vec::with_capacity(record.len() + OVERHEAD);
        sealed.extend_from_slice(record);
        match self.seal_in_place(stream, sequence, now_ms, rotation, &mut sealed, 0) {
            Ok(()) => Ok(sealed),
            Err(err) => {
                // The copy in clear is not left behind in freed memory.
                zeroize::Zeroize::zeroize(&mut sealed);
                Err(err)
            }
        }
    }

    /// Seals record `sequence` of `stream`, in `buf[from..]`: it is encrypted where it is, and
    /// the authentication tag appended. Starts a new key, written to disk first, when the stream
    /// has none this process made or its current one is older than `rotation`. On an error `buf`
    /// is left as it was.
    pub fn seal_in_place(
        &mut self,
        stream: &str,
        sequence: u64,
        now_ms: i64,
        rotation: Duration,
        buf: &mut Vec<u8>,
        from: usize,
    ) -> io::Result<()> {
        let rotation_ms = i64::try_from(rotation.as_millis()).unwrap_or(i64::MAX);
        let current = self.streams.get(&stream_id(stream)).and_then(|l| l.last());
        let fresh = current.is_some_and(|k| {
            k.sealing && k.first <= sequence && now_ms.saturating_sub(k.made_ms) < rotation_ms
        });
        if !fresh {
            self.make(stream, sequence, now_ms)?;
        }
        let key = self
            .streams
            .get(&stream_id(stream))
            .and_then(|l| l.last())
            .ok_or_else(|| io::Error::other("no data key"))?;
        let record = buf
            .get_mut(from..)
            .ok_or_else(|| io::Error::other("nothing to seal"))?;
        let tag = key
            .cipher
            .encrypt_inout_detached(&nonce(sequence), stream.as_bytes(), record.into())
            .map_err(|_| io::Error::other("record too large to seal"))?;
        buf.extend_from_slice(&tag);
        Ok(())
    }

    /// Slots found damaged when the file was opened (a slot is 64 bytes).
    pub fn damaged_slots(&self) -> &[usize] {
        &self.damaged
    }

    /// Bytes of one slot of the key file.
    pub const SLOT_BYTES: usize = SLOT;

    /// Whether a key that can open record `sequence` of `stream` is held.
    pub fn holds(&self, stream: &str, sequence: u64) -> bool {
        self.streams
            .get(&stream_id(stream))
            .is_some_and(|l| l.iter().any(|k| k.first <= sequence))
    }

    /// Opens sealed record `sequence` of `stream`; `None` when its key has been destroyed or the
    /// bytes are not authentic.
    pub fn unseal(&self, stream: &str, sequence: u64, sealed: &[u8]) -> Option<Vec<u8>> {
        let list = self.streams.get(&stream_id(stream))?;
        let key = list.iter().rev().find(|k| k.first <= sequence)?;
        key.cipher
            .decrypt(
                &nonce(sequence),
                Payload {
                    msg: sealed,
                    aad: stream.as_bytes(),
                },
            )
            .ok()
    }

    /// Destroys the keys of `stream` that protect no record at or after `oldest` (the oldest
    /// sequence still held), and keys made for sequences at or after `next` (the next sequence to
    /// be committed: nothing was committed under them). Returns the `first` sequence of each key
    /// destroyed.
    pub fn shred(&mut self, stream: &str, oldest: u64, next: u64) -> io::Result<Vec<u64>> {
        let Some(list) = self.streams.get_mut(&stream_id(stream)) else {
            return Ok(Vec::new());
        };
        // Key i covers [first_i, first_{i+1}); the last one covers [first, next).
        let ends: Vec<u64> = list
            .iter()
            .skip(1)
            .map(|k| k.first)
            .chain(std::iter::once(next))
            .collect();
        let mut doomed = Vec::new();
        let mut kept = Vec::new();
        for (key, end) in std::mem::take(list).into_iter().zip(ends) {
            if end <= oldest || key.first >= next {
                doomed.push((key.slot, key.first));
            } else {
                kept.push(key);
            }
        }
        *list = kept;
        let mut firsts = Vec::new();
        for (slot, first) in doomed {
            self.erase(slot)?;
            firsts.push(first);
        }
        Ok(firsts)
    }

    /// The raw bytes of the key of `stream` that starts at `first` (tests that a destroyed key is
    /// gone from the disk).
    #[cfg(test)]
    pub fn raw_key(&self, path: &Path, stream: &str, first: u64) -> Option<Vec<u8>> {
        let key = self
            .streams
            .get(&stream_id(stream))?
            .iter()
            .find(|k| k.first == first)?;
        let bytes = std::fs::read(path).ok()?;
        Some(bytes[key.slot * SLOT + 32..key.slot * SLOT + 64].to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn sealed_records_open_only_with_their_stream_and_sequence() {
        let dir = tempfile::tempdir().unwrap();
        let mut keys = DataKeys::open(&dir.path().join("k")).unwrap();
        let sealed = keys.seal("air", 7, 0, HOUR, b"pm25 12").unwrap();
        assert_eq!(sealed.len(), 7 + OVERHEAD);
        assert!(!sealed.windows(4).any(|w| w == b"pm25"));
        assert_eq!(
            keys.unseal("air", 7, &sealed).as_deref(),
            Some(&b"pm25 12"[..])
        );
        assert_eq!(keys.unseal("air", 8, &sealed), None);
        assert_eq!(keys.unseal("noise", 7, &sealed), None);
        let mut flipped = sealed.clone();
        flipped[0] ^= 1;
        assert_eq!(keys.unseal("air", 7, &flipped), None);
    }

    #[test]
    fn keys_rotate_survive_a_reopen_and_never_seal_again_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let period = Duration::from_secs(10);
        let (a, b);
        {
            let mut keys = DataKeys::open(&path).unwrap();
            a = keys.seal("s", 1, 0, period, b"one").unwrap();
            // Still the first key at 9 s; a second one from 10 s on.
            keys.seal("s", 2, 9_000, period, b"two").unwrap();
            b = keys.seal("s", 3, 10_000, period, b"three").unwrap();
            assert!(keys.raw_key(&path, "s", 1).is_some());
            assert!(keys.raw_key(&path, "s", 3).is_some());
        }
        let mut keys = DataKeys::open(&path).unwrap();
        assert_eq!(keys.unseal("s", 1, &a).as_deref(), Some(&b"one"[..]));
        assert_eq!(keys.unseal("s", 3, &b).as_deref(), Some(&b"three"[..]));
        // The reopened keys do not seal: sequence 4 gets a key of its own, at once.
        keys.seal("s", 4, 10_001, period, b"four").unwrap();
        assert!(keys.raw_key(&path, "s", 4).is_some());
    }

    #[test]
    fn shredded_keys_are_gone_from_the_file_and_their_records_unreadable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let period = Duration::from_secs(1);
        let mut keys = DataKeys::open(&path).unwrap();
        // Keys from 1, 3 and 5; the records 1..=6 committed (next = 7).
        let sealed: Vec<Vec<u8>> = (1..=6u64)
            .map(|s| {
                let at = ((s - 1) / 2) as i64 * 1_000;
                keys.seal("s", s, at, period, format!("r{s}").as_bytes())
                    .unwrap()
            })
            .collect();
        let first_key = keys.raw_key(&path, "s", 1).unwrap();
        // Records 1..=3 purged: the key from 1 goes; the key from 3 covers 3 and 4, and 4 is held.
        assert_eq!(keys.shred("s", 4, 7).unwrap(), [1]);
        assert_eq!(keys.unseal("s", 1, &sealed[0]), None);
        assert_eq!(keys.unseal("s", 4, &sealed[3]).as_deref(), Some(&b"r4"[..]));
        let file = std::fs::read(&path).unwrap();
        assert!(!file.windows(32).any(|w| w == first_key.as_slice()));
        // Everything purged: every key goes, the current one too.
        assert_eq!(keys.shred("s", 7, 7).unwrap(), [3, 5]);
        assert_eq!(keys.unseal("s", 6, &sealed[5]), None);
        drop(keys);
        let reopened = DataKeys::open(&path).unwrap();
        assert_eq!(reopened.unseal("s", 6, &sealed[5]), None);
        assert!(std::fs::read(&path).unwrap().iter().all(|b| *b == 0));
    }

    #[test]
    fn a_key_made_for_a_commit_that_never_landed_is_destroyed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        {
            let mut keys = DataKeys::open(&path).unwrap();
            keys.seal("s", 1, 0, HOUR, b"committed").unwrap();
            keys.seal("s", 5, 2 * 3_600_000, HOUR, b"never committed")
                .unwrap();
        }
        let mut keys = DataKeys::open(&path).unwrap();
        // Records 1..=4 are held; 5 was never committed.
        assert_eq!(keys.shred("s", 1, 5).unwrap(), [5]);
    }

    #[test]
    fn a_damaged_slot_is_reported_once_and_erased() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let sealed = {
            let mut keys = DataKeys::open(&path).unwrap();
            keys.seal("s", 1, 0, HOUR, b"x").unwrap()
        };
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[40] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let keys = DataKeys::open(&path).unwrap();
        assert_eq!(keys.damaged_slots(), &[0]);
        assert_eq!(keys.unseal("s", 1, &sealed), None);
        assert!(!keys.holds("s", 1));
        // Erased in place: no bytes of the damaged key are left, and the next open finds nothing.
        assert_eq!(std::fs::read(&path).unwrap(), vec![0u8; SLOT]);
        assert!(DataKeys::open(&path).unwrap().damaged_slots().is_empty());
    }

    #[test]
    fn rotation_is_a_24th_of_retention_within_bounds() {
        assert_eq!(rotation(Duration::from_secs(2)), Duration::from_secs(1));
        assert_eq!(rotation(Duration::from_secs(240)), Duration::from_secs(10));
        assert_eq!(rotation(Duration::from_secs(30 * 86_400)), HOUR);
    }
}
