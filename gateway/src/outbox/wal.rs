//! The redb outbox's write-ahead log: what makes a commit durable without a redb transaction.
//!
//! A durable redb transaction writes a new copy of every B-tree page on the path to each leaf it
//! changes, the pages of its system tree and its header: hundreds of KB a commit, whether it
//! holds one record or hundreds (BENCHMARKS.md, "Disk writes at steady rates"). Here a
//! commit's inserts (sealed batches, next-sequence marks and checkpoints, already in their stored
//! form) are appended to one file and made durable with one `fdatasync`, and the outbox folds
//! them into redb from time to time, with one transaction, on a thread of its own.
//!
//! - The file is written with zeros to its full size when created, and then only overwritten:
//!   an `fdatasync` writes the blocks an entry touched and changes no file metadata.
//! - It has two halves. Entries are appended to the active one; when the outbox folds, the other
//!   half becomes active, from its start, while the entries of the first are written to redb.
//!   A half is reused only once its entries are durable in redb.
//! - An entry is `magic | id (u64 LE) | length (u32 LE) | CRC-32 (u32 LE) | payload`, the CRC
//!   over the id, the length and the payload; the payload is a run of `key length (u16 LE) | key
//!   | value length (u32 LE) | value`.
//! - Ids grow by one with every entry and never repeat. A fold stores the last id it folded in
//!   redb, in the same transaction.
//! - Recovery reads each half from its start while each entry is whole (magic, CRC) and has the
//!   id that follows the one before: what follows a torn entry was never acknowledged, and an
//!   entry with another id is left from an earlier use of the half. The entries past the last
//!   folded id, from both halves in order of id, are folded into redb.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

const MAGIC: [u8; 4] = *b"HGWL";
/// Bytes before an entry's payload.
const ENTRY_HEADER: usize = 20;

/// One insert: a table key and its stored value.
pub(super) type Insert = (Vec<u8>, Vec<u8>);

/// The log file and where the next entry goes.
#[derive(Debug)]
pub(super) struct Wal {
    file: File,
    /// Bytes of each half.
    half: u64,
    /// The half entries are appended to (0 or 1).
    active: u64,
    /// Offset of the next entry in the active half.
    end: u64,
    /// Id of the next entry.
    next_id: u64,
}

impl Wal {
    /// Opens the log at `path`, creating it `capacity` bytes long (written with zeros, and made
    /// durable with its directory entry) if it is missing or shorter. Returns the log, and the
    /// inserts of each entry found past `folded`, in order: the caller folds them, then calls
    /// [`Wal::reset`].
    pub(super) fn open(
        path: &Path,
        capacity: u64,
        folded: u64,
    ) -> io::Result<(Self, Vec<Vec<Insert>>)> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .mode(0o600)
            .truncate(false)
            .open(path)?;
        let len = file.metadata()?.len();
        if len < capacity {
            // A page at a time: the kernel's page cache may hold a file written in large writes
            // as large folios, and then counts a whole folio (up to 2 MiB) as written each time
            // an entry dirties it (`write_bytes` in /proc/PID/io), although only the dirty
            // blocks reach the disk.
            let zeros = [0u8; 4096];
            let mut at = len;
            while at < capacity {
                let n = zeros.len().min((capacity - at) as usize);
                file.write_all_at(&zeros[..n], at)?;
                at += n as u64;
            }
            file.sync_all()?;
            if let Some(dir) = path.parent() {
                File::open(dir)?.sync_all()?;
            }
        }
        let half = capacity.max(len) / 2;
        let mut bytes = Vec::with_capacity((half * 2) as usize);
        file.read_to_end(&mut bytes)?;
        let mut found: Vec<(u64, Vec<Insert>)> = Vec::new();
        for start in [0, half as usize] {
            let end = (start + half as usize).min(bytes.len());
            let (entries, stopped) = read_chain(&bytes[start..end]);
            found.extend(entries);
            if let Some((offset, id)) = stopped {
                // A write the process did not finish, or damage: either way nothing from here on
                // in this half is replayed (the store's sequence marks tell what that loses).
                tracing::warn!(
                    file = %path.display(),
                    offset = start + offset,
                    entry = id,
                    "an outbox log entry is torn or damaged: it and what follows it in its half are not replayed"
                );
                metrics::counter!(hubgate_exporters::catalogue::OUTBOX_LOG_DAMAGED).increment(1);
            }
        }
        // New entries take ids past every one in the file, so that none can be mistaken for
        // one of them.
        let last_seen = found.iter().map(|(id, _)| *id).max().unwrap_or(0);
        found.retain(|(id, _)| *id > folded);
        found.sort_by_key(|(id, _)| *id);
        let mut entries = Vec::new();
        let mut left = found.len();
        for (id, inserts) in found {
            if id != folded + 1 + entries.len() as u64 {
                break;
            }
            entries.push(inserts);
            left -= 1;
        }
        if left > 0 {
            tracing::error!(
                entries = left,
                "the outbox log holds entries after a missing one: they are not applied"
            );
        }
        let wal = Self {
            file,
            half,
            active: 0,
            end: 0,
            next_id: folded.max(last_seen) + 1,
        };
        Ok((wal, entries))
    }

    /// Appends one entry holding `inserts` to the active half and makes it durable; returns its
    /// id. Returns `Ok(None)`, writing nothing, when the entry does not fit in what is left of
    /// the half.
    pub(super) fn append(&mut self, inserts: &[Insert]) -> io::Result<Option<u64>> {
        let Some(total) = entry_len(inserts) else {
            return Ok(None);
        };
        if self.end + total as u64 > self.half {
            return Ok(None);
        }
        let mut entry = Vec::with_capacity(total);
        entry.extend_from_slice(&MAGIC);
        entry.extend_from_slice(&self.next_id.to_le_bytes());
        // `entry_len` checked that every length fits its field.
        entry.extend_from_slice(&((total - ENTRY_HEADER) as u32).to_le_bytes());
        entry.extend_from_slice(&[0; 4]);
        for (key, value) in inserts {
            entry.extend_from_slice(&(key.len() as u16).to_le_bytes());
            entry.extend_from_slice(key);
            entry.extend_from_slice(&(value.len() as u32).to_le_bytes());
            entry.extend_from_slice(value);
        }
        let crc = crc(&entry[4..16], &entry[ENTRY_HEADER..]);
        entry[16..20].copy_from_slice(&crc.to_le_bytes());
        // The id is used up even if the write fails: the entry may still reach the disk, and
        // no other entry may have its id. After a failure the caller writes through to redb,
        // which records an id at least this one, before anything is appended again.
        self.next_id += 1;
        self.file
            .write_all_at(&entry, self.active * self.half + self.end)?;
        self.file.sync_data()?;
        self.end += total as u64;
        Ok(Some(self.next_id - 1))
    }

    /// Whether an entry of `inserts` could fit in an empty half.
    pub(super) fn fits_a_half(&self, inserts: &[Insert]) -> bool {
        entry_len(inserts).is_some_and(|total| total as u64 <= self.half)
    }

    /// The id of the last entry appended (before the first: the last folded, or the highest in
    /// the file when opened).
    pub(super) fn last_id(&self) -> u64 {
        self.next_id - 1
    }

    /// Makes the other half active, from its start: the entries of this one are being folded.
    pub(super) fn switch(&mut self) {
        self.active = 1 - self.active;
        self.end = 0;
    }

    /// Starts again at the start of the first half, once every entry is durable in redb.
    pub(super) fn reset(&mut self) {
        self.active = 0;
        self.end = 0;
    }

    /// Where the next entry goes in the file (tests: a torn entry is made by hand).
    #[cfg(test)]
    pub(super) fn position(&self) -> u64 {
        self.active * self.half + self.end
    }
}

/// Bytes of an entry holding `inserts`; `None` when a key, a value or the payload is too long
/// for its length field.
fn entry_len(inserts: &[Insert]) -> Option<usize> {
    let mut payload = 0usize;
    for (key, value) in inserts {
        u16::try_from(key.len()).ok()?;
        u32::try_from(value.len()).ok()?;
        payload += 6 + key.len() + value.len();
    }
    u32::try_from(payload).ok()?;
    Some(ENTRY_HEADER + payload)
}

fn crc(header: &[u8], payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(header);
    hasher.update(payload);
    hasher.finalize()
}

/// The entries of one half, `(id, inserts)`, from its start while they are whole and their ids
/// follow on.
/// An entry read back: its id and inserts.
type Entry = (u64, Vec<Insert>);

/// The chain of whole entries from the start of `bytes`; and where it stopped at an entry that
/// began (its magic is there, with the id expected next) but is not whole or not intact: its
/// offset and id.
fn read_chain(bytes: &[u8]) -> (Vec<Entry>, Option<(usize, u64)>) {
    let mut entries = Vec::new();
    let mut at = 0;
    let mut expected: Option<u64> = None;
    while let Some(header) = bytes.get(at..at + ENTRY_HEADER) {
        if header[..4] != MAGIC {
            break;
        }
        let id = u64::from_le_bytes(header[4..12].try_into().unwrap_or_default());
        if expected.is_some_and(|e| e != id) {
            // An entry left from an earlier use of the half.
            break;
        }
        let length = u32::from_le_bytes(header[12..16].try_into().unwrap_or_default()) as usize;
        let stored = u32::from_le_bytes(header[16..20].try_into().unwrap_or_default());
        let inserts = bytes
            .get(at + ENTRY_HEADER..at + ENTRY_HEADER + length)
            .filter(|payload| crc(&header[4..16], payload) == stored)
            .and_then(parse_payload);
        let Some(inserts) = inserts else {
            return (entries, Some((at, id)));
        };
        entries.push((id, inserts));
        at += ENTRY_HEADER + length;
        expected = Some(id + 1);
    }
    (entries, None)
}

fn parse_payload(mut payload: &[u8]) -> Option<Vec<Insert>> {
    let mut inserts = Vec::new();
    while !payload.is_empty() {
        let k = u16::from_le_bytes(payload.get(..2)?.try_into().ok()?) as usize;
        let key = payload.get(2..2 + k)?.to_vec();
        payload = &payload[2 + k..];
        let v = u32::from_le_bytes(payload.get(..4)?.try_into().ok()?) as usize;
        let value = payload.get(4..4 + v)?.to_vec();
        payload = &payload[4 + v..];
        inserts.push((key, value));
    }
    Some(inserts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inserts(tag: u8, n: usize) -> Vec<Insert> {
        (0..n)
            .map(|i| (vec![b'r', tag, i as u8], vec![tag; 100 + i]))
            .collect()
    }

    const CAPACITY: u64 = 64 * 1024;

    /// A damaged entry ends the chain, and says where it is; stale bytes after the chain's end do
    /// not.
    #[test]
    fn a_damaged_entry_is_located() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal");
        let (mut wal, _) = Wal::open(&path, CAPACITY, 0).unwrap();
        for tag in 1..=3 {
            wal.append(&inserts(tag, 2)).unwrap();
        }
        let bytes = std::fs::read(&path).unwrap();
        let half = &bytes[..(CAPACITY / 2) as usize];
        let (entries, stopped) = read_chain(half);
        assert_eq!((entries.len(), stopped), (3, None));
        let second = ENTRY_HEADER + entries_len(&inserts(1, 2));
        let mut damaged = half.to_vec();
        damaged[second + ENTRY_HEADER + 5] ^= 0x01;
        let (entries, stopped) = read_chain(&damaged);
        assert_eq!(entries.len(), 1);
        assert_eq!(stopped, Some((second, 2)));
    }

    /// The bytes of one entry's payload.
    fn entries_len(inserts: &[Insert]) -> usize {
        inserts.iter().map(|(k, v)| 2 + k.len() + 4 + v.len()).sum()
    }

    #[test]
    fn entries_are_read_back_after_the_folded_id_and_a_torn_one_ends_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal");
        let (mut wal, found) = Wal::open(&path, CAPACITY, 0).unwrap();
        assert!(found.is_empty());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), CAPACITY);
        for tag in 1..=3 {
            assert_eq!(
                wal.append(&inserts(tag, tag as usize)).unwrap(),
                Some(u64::from(tag))
            );
        }
        assert_eq!(wal.last_id(), 3);
        let (_, found) = Wal::open(&path, CAPACITY, 0).unwrap();
        assert_eq!(found, vec![inserts(1, 1), inserts(2, 2), inserts(3, 3)]);
        // Entries up to the folded id are not returned.
        let (reopened, found) = Wal::open(&path, CAPACITY, 1).unwrap();
        assert_eq!(found, vec![inserts(2, 2), inserts(3, 3)]);
        assert_eq!(reopened.last_id(), 3);

        // A torn last entry: the ones before it survive.
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&[0xff; 8], wal.position() - 8).unwrap();
        let (_, found) = Wal::open(&path, CAPACITY, 0).unwrap();
        assert_eq!(found, vec![inserts(1, 1), inserts(2, 2)]);
    }

    #[test]
    fn the_halves_take_turns_and_entries_left_from_before_a_fold_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal");
        let (mut wal, _) = Wal::open(&path, CAPACITY, 0).unwrap();
        for tag in 1..=4 {
            wal.append(&inserts(tag, 3)).unwrap().unwrap();
        }
        // Entries 1-4 are being folded; 5 and 6 go to the second half.
        wal.switch();
        wal.append(&inserts(5, 1)).unwrap().unwrap();
        wal.append(&inserts(6, 1)).unwrap().unwrap();
        // A crash before the fold ends: all six, in order.
        let (_, found) = Wal::open(&path, CAPACITY, 0).unwrap();
        let all: Vec<_> = (1..=6)
            .map(|t| inserts(t, if t <= 4 { 3 } else { 1 }))
            .collect();
        assert_eq!(found, all);
        // After it: 5 and 6.
        let (_, found) = Wal::open(&path, CAPACITY, 4).unwrap();
        assert_eq!(found, all[4..]);
        // The first half is reused once 5 and 6 are folded; entry 7 overwrites entry 1, and
        // entries 2-4 after it are older and end its chain.
        wal.switch();
        wal.append(&inserts(7, 1)).unwrap().unwrap();
        let (reopened, found) = Wal::open(&path, CAPACITY, 6).unwrap();
        assert_eq!(found, vec![inserts(7, 1)]);
        assert_eq!(reopened.last_id(), 7);
        // Entries after a gap are not returned, and new ones take ids past every one seen.
        let (reopened, found) = Wal::open(&path, CAPACITY, 2).unwrap();
        assert!(found.is_empty());
        assert_eq!(reopened.last_id(), 7);
    }

    #[test]
    fn an_entry_that_does_not_fit_is_refused_and_nothing_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal");
        let (mut wal, _) = Wal::open(&path, 8192, 0).unwrap();
        assert!(wal.append(&inserts(1, 10)).unwrap().is_some());
        let before = std::fs::read(&path).unwrap();
        let large = [(vec![1], vec![0; 4000])];
        assert!(wal.fits_a_half(&large));
        assert_eq!(wal.append(&large).unwrap(), None);
        assert_eq!(std::fs::read(&path).unwrap(), before);
        assert_eq!(wal.last_id(), 1);
        wal.switch();
        assert_eq!(wal.append(&large).unwrap(), Some(2));
        assert!(!wal.fits_a_half(&[(vec![1], vec![0; 5000])]));
    }
}
