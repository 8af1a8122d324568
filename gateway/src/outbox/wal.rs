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
    /// durable with its directory entry) if it is missing or shorter. Returns the log, the
    /// inserts of each entry found past `folded`, in order of id (the caller folds them, then
    /// calls [`Wal::reset`]), and what was damaged.
    pub(super) fn open(
        path: &Path,
        capacity: u64,
        folded: u64,
    ) -> io::Result<(Self, Vec<Vec<Insert>>, Recovery)> {
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
        let mut recovered = recover(&bytes, half as usize, folded);
        for &offset in &recovered.damaged {
            // A write the process did not finish (its last entry, after a kill), or damage: what
            // a damaged entry held is lost, and the outbox reports the sequences it misses.
            tracing::warn!(
                file = %path.display(),
                offset,
                "an outbox log entry is torn or damaged: it is not replayed"
            );
            metrics::counter!(hubgate_exporters::catalogue::OUTBOX_LOG_DAMAGED).increment(1);
        }
        if !recovered.missing.is_empty() {
            tracing::error!(
                file = %path.display(),
                entries = ?recovered.missing,
                "outbox log entries are damaged: what they held is lost; the entries after them are replayed"
            );
        }
        let last_seen = recovered.last_seen;
        let entries = std::mem::take(&mut recovered.entries);
        let wal = Self {
            file,
            half,
            active: 0,
            end: 0,
            next_id: folded.max(last_seen) + 1,
        };
        Ok((wal, entries, recovered.report()))
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

/// An entry read back: its id and inserts.
type Entry = (u64, Vec<Insert>);

/// What recovery found in the log.
#[derive(Debug, Default)]
struct Recovered {
    /// The entries past the folded id, in order of id.
    entries: Vec<Vec<Insert>>,
    /// Offsets where an entry began (its magic is there) but is not whole or not intact.
    damaged: Vec<u64>,
    /// Ids past the folded one that no intact entry has, below the highest that one has: damaged
    /// entries whose successors were written.
    missing: Vec<u64>,
    /// The highest id of an intact entry in the file.
    last_seen: u64,
}

/// What the log's recovery lost, for a report ([`super::Finding`]).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct Recovery {
    /// Offsets of entries that began but are not intact: the last one after a kill, or damage.
    pub(super) damaged: Vec<u64>,
    /// Entries lost before others that were replayed: damage, not a torn write.
    pub(super) missing: Vec<u64>,
}

impl Recovered {
    fn report(&self) -> Recovery {
        Recovery {
            damaged: self.damaged.clone(),
            missing: self.missing.clone(),
        }
    }
}

/// The intact entries of the log with ids past `folded`, in order of id, up to the first id
/// missing, unless an entry was found damaged: then a damaged entry does not hide the ones after
/// it. Each half is read as a chain from its start; where an entry that
/// began is not intact, the rest of the half is searched for the next intact one. An intact
/// entry left from an earlier use of a half has an id no higher than `folded` (a half is reused
/// only once its entries are in redb), so every intact entry past `folded` is one to replay.
fn recover(bytes: &[u8], half: usize, folded: u64) -> Recovered {
    let mut found: Vec<Entry> = Vec::new();
    let mut out = Recovered::default();
    for start in [0, half] {
        let end = (start + half).min(bytes.len());
        let region = &bytes[start.min(end)..end];
        let mut at = 0;
        while let Some(header) = region.get(at..at + ENTRY_HEADER) {
            if let Some((entry, len)) = entry_at(region, at) {
                found.push(entry);
                at += len;
                continue;
            }
            // Not an intact entry: never written (zeros), damage (a flipped byte, a zeroed page),
            // the last write of a process that was killed, or what an earlier use of the half
            // left. Damage if an entry to replay follows.
            let began = header[..4] == MAGIC;
            let next = (at + 1..region.len().saturating_sub(ENTRY_HEADER))
                .filter(|&i| region[i..i + 4] == MAGIC)
                .find(|&i| entry_at(region, i).is_some_and(|((id, _), _)| id > folded));
            if next.is_some() || began {
                out.damaged.push((start + at) as u64);
            }
            match next {
                Some(next) => at = next,
                None => break,
            }
        }
    }
    out.last_seen = found.iter().map(|(id, _)| *id).max().unwrap_or(0);
    found.retain(|(id, _)| *id > folded);
    found.sort_by_key(|(id, _)| *id);
    found.dedup_by_key(|(id, _)| *id);
    // Without damage, ids end at the first one missing: an entry past a gap was applied to redb
    // another way (a purge's write-through) and must not be applied again. With damage, the
    // entries after a damaged one are replayed, and the ids no intact entry has are reported.
    let damaged = !out.damaged.is_empty();
    let mut expected = folded + 1;
    for (id, inserts) in found {
        if id != expected && !damaged {
            break;
        }
        out.missing.extend(expected..id);
        expected = id + 1;
        out.entries.push(inserts);
    }
    out
}

/// The intact entry at `at`, and its length: magic, a payload within `bytes`, its CRC.
fn entry_at(bytes: &[u8], at: usize) -> Option<(Entry, usize)> {
    let header = bytes.get(at..at + ENTRY_HEADER)?;
    if header[..4] != MAGIC {
        return None;
    }
    let id = u64::from_le_bytes(header[4..12].try_into().ok()?);
    let length = u32::from_le_bytes(header[12..16].try_into().ok()?) as usize;
    let stored = u32::from_le_bytes(header[16..20].try_into().ok()?);
    let payload = bytes.get(at + ENTRY_HEADER..at + ENTRY_HEADER + length)?;
    if crc(&header[4..16], payload) != stored {
        return None;
    }
    Some(((id, parse_payload(payload)?), ENTRY_HEADER + length))
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

    /// A damaged entry is located, and does not hide the entries after it, whether the damage is
    /// in its payload, its length or its magic; stale bytes after the chain's end are not damage.
    #[test]
    fn a_damaged_entry_is_located_and_the_entries_after_it_are_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal");
        let (mut wal, _, _) = Wal::open(&path, CAPACITY, 0).unwrap();
        for tag in 1..=3 {
            wal.append(&inserts(tag, 2)).unwrap();
        }
        let bytes = std::fs::read(&path).unwrap();
        let half = (CAPACITY / 2) as usize;
        let clean = recover(&bytes, half, 0);
        assert_eq!(clean.entries.len(), 3);
        assert!(clean.damaged.is_empty() && clean.missing.is_empty());
        let second = ENTRY_HEADER + entries_len(&inserts(1, 2));
        for flipped in [second + ENTRY_HEADER + 5, second + 13, second + 1] {
            let mut damaged = bytes.clone();
            damaged[flipped] ^= 0x01;
            let found = recover(&damaged, half, 0);
            assert_eq!(
                found.entries,
                vec![inserts(1, 2), inserts(3, 2)],
                "flip at {flipped}"
            );
            assert_eq!(found.damaged, vec![second as u64]);
            assert_eq!(found.missing, vec![2]);
            assert_eq!(found.last_seen, 3);
        }
        // A zeroed page that starts where an entry does.
        let mut zeroed = bytes.clone();
        zeroed[second..second + ENTRY_HEADER].fill(0);
        let found = recover(&zeroed, half, 0);
        assert_eq!(found.entries, vec![inserts(1, 2), inserts(3, 2)]);
        assert_eq!(
            (found.damaged, found.missing),
            (vec![second as u64], vec![2])
        );
        // Damage to the last entry: it is lost, and nothing says more than that it is torn.
        let third = second * 2;
        let mut damaged = bytes.clone();
        damaged[third + ENTRY_HEADER] ^= 0x01;
        let found = recover(&damaged, half, 0);
        assert_eq!(found.entries, vec![inserts(1, 2), inserts(2, 2)]);
        assert_eq!((found.damaged, found.missing), (vec![third as u64], vec![]));
    }

    /// The bytes of one entry's payload.
    fn entries_len(inserts: &[Insert]) -> usize {
        inserts.iter().map(|(k, v)| 2 + k.len() + 4 + v.len()).sum()
    }

    #[test]
    fn entries_are_read_back_after_the_folded_id_and_a_torn_one_ends_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal");
        let (mut wal, found, _) = Wal::open(&path, CAPACITY, 0).unwrap();
        assert!(found.is_empty());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), CAPACITY);
        for tag in 1..=3 {
            assert_eq!(
                wal.append(&inserts(tag, tag as usize)).unwrap(),
                Some(u64::from(tag))
            );
        }
        assert_eq!(wal.last_id(), 3);
        let (_, found, _) = Wal::open(&path, CAPACITY, 0).unwrap();
        assert_eq!(found, vec![inserts(1, 1), inserts(2, 2), inserts(3, 3)]);
        // Entries up to the folded id are not returned.
        let (reopened, found, _) = Wal::open(&path, CAPACITY, 1).unwrap();
        assert_eq!(found, vec![inserts(2, 2), inserts(3, 3)]);
        assert_eq!(reopened.last_id(), 3);

        // A torn last entry: the ones before it survive.
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&[0xff; 8], wal.position() - 8).unwrap();
        let (_, found, _) = Wal::open(&path, CAPACITY, 0).unwrap();
        assert_eq!(found, vec![inserts(1, 1), inserts(2, 2)]);
    }

    #[test]
    fn the_halves_take_turns_and_entries_left_from_before_a_fold_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal");
        let (mut wal, _, _) = Wal::open(&path, CAPACITY, 0).unwrap();
        for tag in 1..=4 {
            wal.append(&inserts(tag, 3)).unwrap().unwrap();
        }
        // Entries 1-4 are being folded; 5 and 6 go to the second half.
        wal.switch();
        wal.append(&inserts(5, 1)).unwrap().unwrap();
        wal.append(&inserts(6, 1)).unwrap().unwrap();
        // A crash before the fold ends: all six, in order.
        let (_, found, _) = Wal::open(&path, CAPACITY, 0).unwrap();
        let all: Vec<_> = (1..=6)
            .map(|t| inserts(t, if t <= 4 { 3 } else { 1 }))
            .collect();
        assert_eq!(found, all);
        // After it: 5 and 6.
        let (_, found, _) = Wal::open(&path, CAPACITY, 4).unwrap();
        assert_eq!(found, all[4..]);
        // The first half is reused once 5 and 6 are folded; entry 7 overwrites entry 1, and
        // entries 2-4 after it are older and end its chain.
        wal.switch();
        wal.append(&inserts(7, 1)).unwrap().unwrap();
        let (reopened, found, _) = Wal::open(&path, CAPACITY, 6).unwrap();
        assert_eq!(found, vec![inserts(7, 1)]);
        assert_eq!(reopened.last_id(), 7);
        // New ones take ids past every one seen.
        let (reopened, _, _) = Wal::open(&path, CAPACITY, 6).unwrap();
        assert_eq!(reopened.last_id(), 7);
    }

    #[test]
    fn an_entry_that_does_not_fit_is_refused_and_nothing_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal");
        let (mut wal, _, _) = Wal::open(&path, 8192, 0).unwrap();
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
