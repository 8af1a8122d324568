//! The audit log: an append-only, hash-chained record of what the gateway did to the data it holds.
//!
//! One JSON object per line in `<data_dir>/audit.jsonl`:
//!
//! ```json
//! {"seq":7,"time_ms":1795564800000,"event":"purge","data":{"stream":"noise",…},"prev":"…","hash":"…"}
//! ```
//!
//! `hash` is the lowercase hex SHA-256 of the line's bytes before `,"hash":`, and `prev` is the
//! previous entry's `hash` (64 zeros for the first entry). Changing an entry breaks its own hash;
//! removing, inserting or reordering entries, or rewriting one with a fresh hash, breaks the
//! chain at the entry after. [`verify`] (`hubgate audit verify FILE`) names the first broken
//! entry and prints the last entry's hash: entries cut off the end leave no trace in the file
//! itself, so an auditor keeps that hash (or compares it with an earlier one) to notice them. Entries are written with
//! `O_APPEND` and synced one by one: the events are rare (purges, key rotations and
//! destructions, budget spends and refusals, starts), and an audit entry that a crash could take
//! back is worth little.
//!
//! **Retention.** The log has its own retention limit (`[audit] retention`, two years by
//! default). The current file is closed as a segment, `audit-<first seq>.jsonl`, once its first
//! entry is older than a segment's span (an eighth of the retention, between an hour and 30
//! days), and segments whose last entry is older than the retention are removed. The chain runs
//! on across segments: the new file's first entry, `audit_segment_start`, carries the previous
//! segment's last sequence and hash as its `prev`, and lists the segments removed with their last
//! hashes, so a removal is itself on the record. `hubgate audit verify audit-*.jsonl
//! audit.jsonl` checks the files in order and that each continues the one before.
//!
//! **Anchoring.** The chain alone cannot show entries cut off its end, an emptied or deleted
//! file, or a chain rewritten from the start with fresh hashes (they are unkeyed). So the head of
//! the chain (the last entry's sequence and hash) is also kept outside the log: in the outbox,
//! as a checkpoint the gateway updates within a second of each entry and when it stops. At start
//! the gateway looks for the anchored entry in the log; when the log ends before it or holds
//! another hash there, the log was cut or rewritten: an `audit_chain_broken` entry records what
//! was anchored and what was found, the error is logged and counted
//! (`hubgate_audit_anchor_mismatches_total`), and the gateway goes on with the log it has. For an
//! auditor the head is also a witness to keep: `GetPolicy` returns it (`audit_head_seq`,
//! `audit_head_hash`) and `hubgate_audit_head_seq` shows its sequence, and `hubgate audit verify
//! --head SEQ:HASH` checks that the files still hold that entry with that hash, so a chain
//! rewritten whole no longer matches a head noted before.
//!
//! Threat model: someone who can edit the log but not the outbox is caught at the next start;
//! someone who can edit both (the whole data directory, with its keys) can rewrite both
//! consistently, and is caught only by a head kept elsewhere (an auditor's note, a scraped
//! metric, a dashboard's `GetPolicy`). Entries written less than a second before a crash may not
//! be anchored yet.
//!
//! Entries name streams, sequence ranges, times, counts and hashes, never a value or an
//! identifier. A write that fails is logged and counted (`hubgate_audit_write_errors_total`); the
//! gateway goes on, since stopping would lose more than the entry.
//!
//! Recorded now: `start` (policy hash, version, the gRPC tokens' grants: holder, digest prefix,
//! scopes), `policy_reloaded` (both hashes), `token_granted`, `token_changed`, `token_revoked`,
//! `policy_rejected` (the running hash, the number of errors and the first with its line and
//! column), `policy_reload_failed` (the hash that could not start, and why), `purge` (stream, reason, records, sequence and time range), `outbox_key_destroyed`,
//! `pseudonym_key_rotated`, `pseudonym_key_destroyed`, `privacy_budget_spent`,
//! `privacy_budget_refused`, `audit_tail_cut`, `audit_segment_start`, `audit_chain_broken`.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use hubgate_exporters::catalogue;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One entry, as written.
#[derive(Debug, Serialize, Deserialize)]
pub struct Entry {
    pub seq: u64,
    pub time_ms: i64,
    pub event: String,
    pub data: serde_json::Value,
    pub prev: String,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

const HASH_FIELD: &[u8] = b",\"hash\":\"";

/// Splits a line into the bytes its hash covers and the hash it claims.
fn split_hash(line: &[u8]) -> Option<(&[u8], &str)> {
    let at = line
        .windows(HASH_FIELD.len())
        .rposition(|w| w == HASH_FIELD)?;
    let claimed = line.get(at + HASH_FIELD.len()..line.len().checked_sub(2)?)?;
    (line.ends_with(b"\"}") && claimed.len() == 64)
        .then(|| std::str::from_utf8(claimed).ok().map(|h| (&line[..at], h)))
        .flatten()
}

#[derive(Debug)]
struct Tail {
    file: File,
    next_seq: u64,
    prev: String,
    /// Sequence and time of the current file's first entry, if it has one.
    first: Option<(u64, i64)>,
}

/// The audit log of a gateway.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    retention_ms: i64,
    segment_ms: i64,
    tail: Mutex<Tail>,
    write_errors: metrics::Counter,
}

/// The span of one segment for a retention: an eighth of it, between an hour and 30 days.
fn segment_span(retention: Duration) -> Duration {
    (retention / 8).clamp(Duration::from_secs(3600), Duration::from_secs(30 * 86_400))
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The first and last entries of a file, parsed, with the last one's hash.
fn ends(path: &Path) -> io::Result<Option<(Entry, Entry, String)>> {
    let bytes = std::fs::read(path)?;
    let mut lines = bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty());
    let Some(first) = lines.next() else {
        return Ok(None);
    };
    let last = lines.next_back().unwrap_or(first);
    let parse = |line: &[u8]| -> io::Result<Entry> {
        serde_json::from_slice(line).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    };
    let hash = split_hash(last)
        .map(|(_, h)| h.to_owned())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no hash"))?;
    Ok(Some((parse(first)?, parse(last)?, hash)))
}

/// The sequence number and hash of the last of `lines`, the complete lines of the log at
/// `path`, if it has any; the chain cannot go on from a last entry that is not valid.
fn last_entry(path: &Path, lines: &[u8]) -> io::Result<Option<(u64, String)>> {
    let Some(last) = lines.split(|b| *b == b'\n').rfind(|l| !l.is_empty()) else {
        return Ok(None);
    };
    let invalid = |why: String| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the last audit entry of {} is not valid: {why}",
                path.display()
            ),
        )
    };
    let entry: Entry = serde_json::from_slice(last).map_err(|e| invalid(e.to_string()))?;
    let (_, hash) = split_hash(last).ok_or_else(|| invalid("no hash".into()))?;
    Ok(Some((entry.seq, hash.to_owned())))
}

impl AuditLog {
    /// Opens (or creates) the log with the default retention; see [`AuditLog::open_with`].
    pub fn open(path: &Path) -> io::Result<Self> {
        Self::open_with(path, crate::config::DEFAULT_AUDIT_RETENTION)
    }

    /// Opens (or creates) the log and finds where its chain ends. A last line without its newline
    /// (the process died while writing it) is cut off, and the cut is itself recorded. Entries
    /// are kept for `retention` (in segments; see the module's documentation).
    pub fn open_with(path: &Path, retention: Duration) -> io::Result<Self> {
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let complete = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        let torn = bytes.len() - complete;
        if torn > 0 {
            file.set_len(complete as u64)?;
            file.seek(SeekFrom::End(0))?;
            file.sync_data()?;
        }
        let lines = &bytes[..complete];
        let first = lines
            .split(|b| *b == b'\n')
            .find(|l| !l.is_empty())
            .and_then(|l| serde_json::from_slice::<Entry>(l).ok())
            .map(|e| (e.seq, e.time_ms));
        let mut continued = None;
        let (next_seq, prev) = match last_entry(path, lines)? {
            Some((seq, hash)) => (seq + 1, hash),
            None => match Self::last_segment(path)? {
                // A fresh file after a segment was closed (and the process died before writing
                // to the new one): the chain continues from the segment.
                Some((seq, hash, name)) => {
                    continued = Some((seq, hash.clone(), name));
                    (seq + 1, hash)
                }
                None => (1, GENESIS.to_owned()),
            },
        };
        let log = Self {
            path: path.to_owned(),
            retention_ms: millis(retention),
            segment_ms: millis(segment_span(retention)),
            tail: Mutex::new(Tail {
                file,
                next_seq,
                prev,
                first,
            }),
            write_errors: metrics::counter!(catalogue::AUDIT_WRITE_ERRORS),
        };
        if let Some((previous_last_seq, previous_last_hash, previous_segment)) = continued {
            let mut tail = log.tail.lock().unwrap_or_else(PoisonError::into_inner);
            log.append(
                &mut tail,
                crate::telemetry::clock::now_ms(),
                "audit_segment_start",
                serde_json::json!({
                    "previous_segment": previous_segment,
                    "previous_last_seq": previous_last_seq,
                    "previous_last_hash": previous_last_hash,
                    "removed_by_retention": [],
                }),
            );
        }
        if torn > 0 {
            log.record(
                crate::telemetry::clock::now_ms(),
                "audit_tail_cut",
                serde_json::json!({ "bytes": torn }),
            );
        }
        Ok(log)
    }

    /// The head of the chain: the last entry's sequence and hash (0 and the genesis before any).
    pub fn head(&self) -> Head {
        let tail = self.tail.lock().unwrap_or_else(PoisonError::into_inner);
        Head {
            seq: tail.next_seq - 1,
            hash: tail.prev.clone(),
        }
    }

    /// The hash of entry `seq`, from the current file or a closed segment; `None` when no file
    /// holds it.
    pub fn hash_of(&self, seq: u64) -> io::Result<Option<String>> {
        let mut files: Vec<PathBuf> = Self::segments(self.dir())?
            .into_iter()
            .map(|(_, p)| p)
            .collect();
        files.push(self.path.clone());
        hash_in_files(&files, seq)
    }

    /// Checks the chain against `anchored`, the head kept outside the log (see the module's
    /// documentation). A log that ends before it, or holds another hash there, was cut or
    /// rewritten: that is recorded as `audit_chain_broken`, logged and counted, and `false` is
    /// returned.
    pub fn check_anchor(&self, anchored: &Head, now_ms: i64) -> bool {
        let head = self.head();
        let found = if head.seq < anchored.seq {
            None
        } else if head.seq == anchored.seq {
            Some(head.hash.clone())
        } else {
            self.hash_of(anchored.seq).ok().flatten()
        };
        if found.as_deref() == Some(anchored.hash.as_str()) {
            return true;
        }
        metrics::counter!(catalogue::AUDIT_ANCHOR_MISMATCHES).increment(1);
        tracing::error!(
            anchored_seq = anchored.seq,
            head_seq = head.seq,
            "the audit log does not hold the entry its anchor names: it was cut or rewritten"
        );
        self.record(
            now_ms,
            "audit_chain_broken",
            serde_json::json!({
                "anchored_seq": anchored.seq,
                "anchored_hash": anchored.hash,
                "found_hash_at_anchored_seq": found,
                "head_seq_found": head.seq,
                "head_hash_found": head.hash,
            }),
        );
        false
    }

    /// Appends an entry and syncs it. `data` must hold no value or identifier from a reading.
    /// Closes the current segment first when it has grown old (see the module's documentation).
    pub fn record(&self, time_ms: i64, event: &str, data: serde_json::Value) {
        let mut tail = self.tail.lock().unwrap_or_else(PoisonError::into_inner);
        if tail
            .first
            .is_some_and(|(_, first_ms)| time_ms.saturating_sub(first_ms) >= self.segment_ms)
            && let Err(err) = self.rotate(&mut tail, time_ms)
        {
            self.write_errors.increment(1);
            tracing::error!(%err, "cannot start a new audit log segment; going on in the current one");
        }
        self.append(&mut tail, time_ms, event, data);
    }

    fn append(&self, tail: &mut Tail, time_ms: i64, event: &str, data: serde_json::Value) {
        let entry = Entry {
            seq: tail.next_seq,
            time_ms,
            event: event.to_owned(),
            data,
            prev: tail.prev.clone(),
        };
        let length = tail.file.metadata().map(|m| m.len());
        let written = serde_json::to_vec(&entry)
            .map_err(io::Error::other)
            .and_then(|mut line| {
                // `{…}` becomes `{…,"hash":"<SHA-256 of {…>"}`.
                line.pop();
                let hash = hex(&Sha256::digest(&line));
                line.extend_from_slice(HASH_FIELD);
                line.extend_from_slice(hash.as_bytes());
                line.extend_from_slice(b"\"}\n");
                tail.file.write_all(&line)?;
                tail.file.sync_data()?;
                Ok(hash)
            });
        match written {
            Ok(hash) => {
                tail.prev = hash;
                tail.first.get_or_insert((entry.seq, time_ms));
                tail.next_seq += 1;
            }
            Err(err) => {
                // Whatever part of the entry reached the file would fork the chain: cut it off.
                if let Ok(length) = length {
                    let _ = tail.file.set_len(length);
                }
                self.write_errors.increment(1);
                tracing::error!(%err, event, "cannot write the audit log");
            }
        }
    }

    fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }

    /// Closed segments, `(first seq, path)`, oldest first.
    fn segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
        let mut segments: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)?
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let seq = name
                    .strip_prefix("audit-")?
                    .strip_suffix(".jsonl")?
                    .parse()
                    .ok()?;
                Some((seq, e.path()))
            })
            .collect();
        segments.sort();
        Ok(segments)
    }

    /// The last sequence and hash of the newest closed segment, and its file name.
    fn last_segment(path: &Path) -> io::Result<Option<(u64, String, String)>> {
        let dir = path.parent().unwrap_or(Path::new("."));
        let Some((_, newest)) = Self::segments(dir)?.pop() else {
            return Ok(None);
        };
        let name = newest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(ends(&newest)?.map(|(_, last, hash)| (last.seq, hash, name)))
    }

    /// Closes the current file as a segment, removes the segments past the retention, and starts
    /// a new file whose first entry says so. Once the segment is closed, the new file's first
    /// entry is always written, with whatever could not be removed.
    fn rotate(&self, tail: &mut Tail, time_ms: i64) -> io::Result<()> {
        let Some((first_seq, _)) = tail.first else {
            return Ok(());
        };
        let segment_name = format!("audit-{first_seq:020}.jsonl");
        let segment = self.dir().join(&segment_name);
        std::fs::rename(&self.path, &segment)?;
        let file = match OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&self.path)
        {
            Ok(file) => file,
            Err(err) => {
                // Go on in the segment, under its old name.
                let _ = std::fs::rename(&segment, &self.path);
                return Err(err);
            }
        };
        tail.file = file;
        tail.first = None;
        if let Err(err) = File::open(self.dir()).and_then(|d| d.sync_all()) {
            self.write_errors.increment(1);
            tracing::error!(%err, "cannot sync the audit log's directory");
        }
        let (mut removed, mut kept) = (Vec::new(), Vec::new());
        for (_, old) in Self::segments(self.dir()).unwrap_or_default() {
            let Ok(Some((first, last, hash))) = ends(&old) else {
                continue;
            };
            if last.time_ms >= time_ms.saturating_sub(self.retention_ms) {
                continue;
            }
            let about = serde_json::json!({
                "file": old.file_name().map(|n| n.to_string_lossy().into_owned()),
                "first_seq": first.seq,
                "last_seq": last.seq,
                "last_hash": hash,
            });
            match std::fs::remove_file(&old) {
                Ok(()) => removed.push(about),
                Err(err) => {
                    tracing::error!(%err, "cannot remove an expired audit log segment");
                    kept.push(about);
                }
            }
        }
        let previous_last_seq = tail.next_seq - 1;
        let previous_last_hash = tail.prev.clone();
        let mut data = serde_json::json!({
            "previous_segment": segment_name,
            "previous_last_seq": previous_last_seq,
            "previous_last_hash": previous_last_hash,
            "removed_by_retention": removed,
        });
        if !kept.is_empty() {
            data["expired_not_removed"] = kept.into();
        }
        self.append(tail, time_ms, "audit_segment_start", data);
        Ok(())
    }
}

/// The head of the chain: its last entry's sequence and hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    pub seq: u64,
    pub hash: String,
}

impl Head {
    /// `SEQ:HASH`, as `hubgate audit verify --head` takes it.
    pub fn parse(text: &str) -> Option<Self> {
        let (seq, hash) = text.split_once(':')?;
        let hash = hash.trim();
        let seq = seq.trim().parse().ok()?;
        (hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit())).then(|| Head {
            seq,
            hash: hash.to_ascii_lowercase(),
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Option<Self> {
        serde_json::from_slice(bytes).ok()
    }
}

/// The hash of entry `seq` in any of `files`, if one holds it.
pub fn hash_in_files(files: &[PathBuf], seq: u64) -> io::Result<Option<String>> {
    for path in files {
        if let Some(hash) = hash_in(path, seq)? {
            return Ok(Some(hash));
        }
    }
    Ok(None)
}

/// The hash of entry `seq` in the file at `path`, if it holds it.
fn hash_in(path: &Path, seq: u64) -> io::Result<Option<String>> {
    let reader = match File::open(path) {
        Ok(file) => BufReader::new(file),
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(err),
    };
    for line in reader.split(b'\n') {
        let line = line?;
        let Ok(entry) = serde_json::from_slice::<Entry>(&line) else {
            continue;
        };
        if entry.seq == seq {
            return Ok(split_hash(&line).map(|(_, h)| h.to_owned()));
        }
    }
    Ok(None)
}

/// What [`verify`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The whole chain holds: its number of entries, the hash of the last line, and, for a file
    /// that continues an earlier segment, the hash of that segment's last entry.
    Intact {
        entries: u64,
        last_hash: String,
        continues: Option<String>,
    },
    /// The first entry that does not follow from the one before, by line number (from 1).
    Broken { line: usize, reason: String },
}

/// Checks the chain of an audit log file from its first entry. The first entry chains from the
/// fixed genesis, or, in a file that continues a closed segment, is an `audit_segment_start`
/// that names the hash it continues from.
pub fn verify(path: &Path) -> io::Result<Verdict> {
    let reader = BufReader::new(File::open(path)?);
    let mut prev = GENESIS.to_owned();
    let mut continues = None;
    let mut expected_seq = None;
    let mut entries = 0;
    for (i, line) in reader.split(b'\n').enumerate() {
        let line = line?;
        let number = i + 1;
        let broken = |reason: String| {
            Ok(Verdict::Broken {
                line: number,
                reason,
            })
        };
        let entry: Entry = match serde_json::from_slice(&line) {
            Ok(entry) => entry,
            Err(e) => return broken(format!("not an audit entry: {e}")),
        };
        let Some((covered, claimed)) = split_hash(&line) else {
            return broken("it has no hash".into());
        };
        if hex(&Sha256::digest(covered)) != claimed {
            return broken("its content does not match its hash".into());
        }
        if number == 1 && entry.prev != GENESIS {
            let from = entry.data["previous_last_hash"].as_str();
            let from_seq = entry.data["previous_last_seq"].as_u64();
            if entry.event != "audit_segment_start"
                || from != Some(entry.prev.as_str())
                || from_seq.map(|s| s + 1) != Some(entry.seq)
            {
                return broken("it neither starts the chain nor continues a segment".into());
            }
            continues = Some(entry.prev.clone());
            prev = entry.prev.clone();
        }
        if entry.prev != prev {
            return broken("its prev hash does not match the entry before it".into());
        }
        if expected_seq.is_some_and(|s| s != entry.seq) {
            return broken(format!(
                "sequence {} where {} was expected",
                entry.seq,
                expected_seq.unwrap_or_default()
            ));
        }
        expected_seq = Some(entry.seq + 1);
        prev = claimed.to_owned();
        entries += 1;
    }
    Ok(Verdict::Intact {
        entries,
        last_hash: prev,
        continues,
    })
}

/// The last hashes of the segments that `audit_segment_start` entries in `paths` record as
/// removed by retention.
fn removed_hashes(paths: &[PathBuf]) -> io::Result<std::collections::HashSet<String>> {
    let mut hashes = std::collections::HashSet::new();
    for path in paths {
        for line in BufReader::new(File::open(path)?).split(b'\n') {
            let Ok(entry) = serde_json::from_slice::<Entry>(&line?) else {
                continue;
            };
            if entry.event != "audit_segment_start" {
                continue;
            }
            for removed in entry.data["removed_by_retention"]
                .as_array()
                .into_iter()
                .flatten()
            {
                if let Some(hash) = removed["last_hash"].as_str() {
                    hashes.insert(hash.to_owned());
                }
            }
        }
    }
    Ok(hashes)
}

/// Checks several files of one log, oldest first (the closed segments, then `audit.jsonl`):
/// each on its own, each one after the first continuing the one before, and the first starting
/// the chain or continuing a segment that a later entry records as removed by retention (so that
/// leaving out the oldest files is found too).
pub fn verify_files(paths: &[PathBuf]) -> io::Result<Vec<Verdict>> {
    let mut verdicts = Vec::with_capacity(paths.len());
    let mut previous: Option<String> = None;
    let removed = removed_hashes(paths)?;
    for path in paths {
        let mut verdict = verify(path)?;
        if let (
            Some(before),
            Verdict::Intact {
                continues: from, ..
            },
        ) = (&previous, &verdict)
            && from.as_ref() != Some(before)
        {
            verdict = Verdict::Broken {
                line: 1,
                reason: "it does not continue the file before it".into(),
            };
        }
        if let (
            true,
            Verdict::Intact {
                continues: Some(from),
                ..
            },
        ) = (verdicts.is_empty(), &verdict)
            && !removed.contains(from)
        {
            verdict = Verdict::Broken {
                line: 1,
                reason: "it continues entries that are neither in the files given nor recorded as removed by retention".into(),
            };
        }
        previous = match &verdict {
            Verdict::Intact { last_hash, .. } => Some(last_hash.clone()),
            Verdict::Broken { .. } => None,
        };
        verdicts.push(verdict);
    }
    Ok(verdicts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn log_with(dir: &Path, n: u64) -> PathBuf {
        let path = dir.join("audit.jsonl");
        let log = AuditLog::open(&path).unwrap();
        for i in 0..n {
            log.record(
                crate::telemetry::clock::now_ms() + i as i64,
                "purge",
                json!({"stream": "noise", "records": i}),
            );
        }
        path
    }

    /// The anchor catches what the chain alone cannot: a cut tail, an emptied or deleted file,
    /// a chain rewritten whole; and lets an intact log (or one that went on) pass.
    #[test]
    fn the_anchor_catches_cut_emptied_deleted_and_rewritten_logs() {
        let broken = |log: &AuditLog| {
            let text = std::fs::read_to_string(&log.path).unwrap();
            text.contains("\"event\":\"audit_chain_broken\"")
        };
        // Intact, and gone on after the anchor: passes.
        let dir = tempfile::tempdir().unwrap();
        let path = log_with(dir.path(), 5);
        let log = AuditLog::open(&path).unwrap();
        let anchored = log.head();
        assert_eq!(anchored.seq, 5);
        assert!(log.check_anchor(&anchored, 0));
        log.record(1, "start", json!({}));
        assert_eq!(
            log.hash_of(5).unwrap().as_deref(),
            Some(anchored.hash.as_str())
        );
        assert!(log.check_anchor(&anchored, 0));
        assert!(!broken(&log));
        drop(log);
        // The last two lines cut.
        let text = std::fs::read_to_string(&path).unwrap();
        let kept: Vec<&str> = text.lines().take(4).collect();
        std::fs::write(&path, kept.join("\n") + "\n").unwrap();
        assert!(matches!(verify(&path).unwrap(), Verdict::Intact { .. }));
        let log = AuditLog::open(&path).unwrap();
        assert!(!log.check_anchor(&anchored, 0));
        assert!(broken(&log));
        drop(log);
        // Emptied, and deleted.
        for damage in [
            |p: &Path| std::fs::write(p, b"").unwrap(),
            |p: &Path| std::fs::remove_file(p).unwrap(),
        ] {
            damage(&path);
            let log = AuditLog::open(&path).unwrap();
            assert!(!log.check_anchor(&anchored, 0));
            assert!(broken(&log));
        }
        // Rewritten whole with fresh hashes, as long as before: every entry verifies, but not
        // the anchored one.
        std::fs::remove_file(&path).unwrap();
        let forged = AuditLog::open(&path).unwrap();
        for i in 0..5 {
            forged.record(i, "purge", json!({"stream": "noise", "records": 0}));
        }
        assert!(matches!(verify(&path).unwrap(), Verdict::Intact { .. }));
        assert_eq!(forged.head().seq, anchored.seq);
        assert!(!forged.check_anchor(&anchored, 0));
        let head = Head::parse(&format!("{}:{}", anchored.seq, anchored.hash)).unwrap();
        assert_eq!(head, anchored);
        assert_ne!(
            hash_in_files(std::slice::from_ref(&path), head.seq).unwrap(),
            Some(head.hash)
        );
    }

    #[test]
    fn an_intact_chain_verifies_and_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = log_with(dir.path(), 3);
        AuditLog::open(&path)
            .unwrap()
            .record(2_000, "start", json!({}));
        let Verdict::Intact {
            entries,
            last_hash,
            continues: None,
        } = verify(&path).unwrap()
        else {
            panic!("{:?}", verify(&path));
        };
        assert_eq!(entries, 4);
        let text = std::fs::read_to_string(&path).unwrap();
        let last = text.lines().last().unwrap();
        assert!(last.ends_with(&format!(",\"hash\":\"{last_hash}\"}}")));
        let entry: Entry = serde_json::from_str(last).unwrap();
        assert_eq!((entry.seq, entry.event.as_str()), (4, "start"));
    }

    #[test]
    fn tampering_with_one_entry_is_found_at_the_entry_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = log_with(dir.path(), 5);
        let text = std::fs::read_to_string(&path).unwrap();
        // Change a count in entry 3: its own hash no longer matches.
        let tampered = text.replacen("\"records\":2", "\"records\":0", 1);
        assert_ne!(tampered, text);
        std::fs::write(&path, &tampered).unwrap();
        assert!(matches!(
            verify(&path).unwrap(),
            Verdict::Broken { line: 3, .. }
        ));
        // Change it and give it a fresh hash: the entry after it no longer follows.
        let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
        let changed = lines[2].replacen("\"records\":2", "\"records\":0", 1);
        let (covered, _) = split_hash(changed.as_bytes()).unwrap();
        let rehashed = format!(
            "{},\"hash\":\"{}\"}}",
            std::str::from_utf8(covered).unwrap(),
            hex(&Sha256::digest(covered))
        );
        lines[2] = rehashed;
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        assert!(matches!(
            verify(&path).unwrap(),
            Verdict::Broken { line: 4, .. }
        ));
        // Removing entry 2 breaks the chain at the entry that followed it.
        let mut lines: Vec<&str> = text.lines().collect();
        lines.remove(1);
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        assert!(matches!(
            verify(&path).unwrap(),
            Verdict::Broken { line: 2, .. }
        ));
        // A forged log must still start from the fixed genesis.
        let forged = "{\"seq\":1,\"time_ms\":0,\"event\":\"x\",\"data\":{},\"prev\":\"ab\"";
        let line = format!("{forged},\"hash\":\"{}\"}}\n", hex(&Sha256::digest(forged)));
        std::fs::write(&path, line).unwrap();
        assert!(matches!(
            verify(&path).unwrap(),
            Verdict::Broken { line: 1, .. }
        ));
    }

    #[test]
    fn a_torn_last_line_is_cut_and_the_cut_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let path = log_with(dir.path(), 2);
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(b"{\"seq\":3,\"time").unwrap();
        drop(file);
        let log = AuditLog::open(&path).unwrap();
        log.record(3_000, "start", json!({}));
        assert!(matches!(
            verify(&path).unwrap(),
            Verdict::Intact { entries: 4, .. }
        ));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"event\":\"audit_tail_cut\""));
    }

    fn files(dir: &Path) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = AuditLog::segments(dir)
            .unwrap()
            .into_iter()
            .map(|(_, p)| p)
            .collect();
        files.push(dir.join("audit.jsonl"));
        files
    }

    const HOUR: i64 = 3_600_000;

    #[test]
    fn segments_rotate_and_expire_and_the_chain_runs_across_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        // 8 hours of retention: segments of an hour.
        let retention = Duration::from_secs(8 * 3600);
        let log = AuditLog::open_with(&path, retention).unwrap();
        let t0 = 1_800_000_000_000;
        for i in 0..24 {
            log.record(
                t0 + i * HOUR / 2,
                "purge",
                json!({"stream": "noise", "i": i}),
            );
        }
        // 12 hours of entries: the current file and the segments of the last 8 hours remain.
        let all = files(dir.path());
        let verdicts = verify_files(&all).unwrap();
        assert!(
            verdicts.iter().all(|v| matches!(v, Verdict::Intact { .. })),
            "{verdicts:?}"
        );
        let segments = all.len() - 1;
        assert!((7..=9).contains(&segments), "{segments} segments");
        // The oldest entries are gone, and their removal is on the record with the last hash.
        let text: String = all
            .iter()
            .map(|p| std::fs::read_to_string(p).unwrap())
            .collect();
        assert!(
            !text.contains("\"i\":0,"),
            "the first entry is past the retention"
        );
        assert!(text.contains("\"i\":23,"));
        let removals: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|e| e["event"] == "audit_segment_start")
            .flat_map(|e| {
                e["data"]["removed_by_retention"]
                    .as_array()
                    .unwrap()
                    .clone()
            })
            .collect();
        assert!(!removals.is_empty());
        assert!(
            removals
                .iter()
                .all(|r| r["last_hash"].as_str().unwrap().len() == 64)
        );
        // The current file alone verifies, saying where it continues from.
        assert!(matches!(
            verify(&path).unwrap(),
            Verdict::Intact {
                continues: Some(_),
                ..
            }
        ));
        // Leaving out the oldest remaining segment is found: what the next one continues was not
        // removed by retention.
        let verdicts = verify_files(&all[1..]).unwrap();
        assert!(
            matches!(&verdicts[0], Verdict::Broken { line: 1, reason } if reason.contains("neither in the files given")),
            "{verdicts:?}"
        );
        // A segment left out breaks the continuity at the file after the gap.
        let mut gapped = all.clone();
        gapped.remove(1);
        let verdicts = verify_files(&gapped).unwrap();
        assert!(matches!(verdicts[0], Verdict::Intact { .. }));
        assert!(
            matches!(&verdicts[1], Verdict::Broken { line: 1, reason } if reason.contains("does not continue")),
            "{verdicts:?}"
        );
    }

    #[test]
    fn a_segment_closed_just_before_a_crash_is_continued_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = log_with(dir.path(), 3);
        // The process died between closing the segment and writing to the new file.
        std::fs::rename(&path, dir.path().join("audit-00000000000000000001.jsonl")).unwrap();
        let log = AuditLog::open(&path).unwrap();
        log.record(5_000, "start", json!({}));
        let verdicts = verify_files(&files(dir.path())).unwrap();
        assert!(
            verdicts.iter().all(|v| matches!(v, Verdict::Intact { .. })),
            "{verdicts:?}"
        );
        let text = std::fs::read_to_string(&path).unwrap();
        let first: Entry = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(
            (first.seq, first.event.as_str()),
            (4, "audit_segment_start")
        );
    }
}
